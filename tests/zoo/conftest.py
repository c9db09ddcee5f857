"""Shared by the zoo's tests: model inputs and the refinement formula written out."""
import pytest
import torch

import spconv2d.zoo as zoo


def _input_for(name):
    g = torch.Generator().manual_seed(0)
    if zoo.model_defaults(name).data == "mnist":
        x = torch.rand(3, 1, 28, 28, generator=g)
        x[x < 0.75] = 0  # strokes: ~25 % non-zero pixels
        return x, torch.randint(0, 10, (3,), generator=g)
    return torch.rand(2, 3, 32, 64, generator=g), torch.randint(0, 19, (2, 32, 64), generator=g)


def _window_mean(logits, images, b, y, x, radius, sigma_r):
    """The refinement formula for one pixel, written out."""
    H, W = logits.shape[-2:]
    num, den = 0.0, 0.0
    for qy in range(max(0, y - radius), min(H, y + radius + 1)):
        for qx in range(max(0, x - radius), min(W, x + radius + 1)):
            wq = torch.exp(-(images[b, :, y, x] - images[b, :, qy, qx]).pow(2).sum() / (2 * sigma_r ** 2))
            num, den = num + wq * logits[b, :, qy, qx], den + wq
    return num / den


@pytest.fixture
def input_for():
    """``input_for(model_name) -> (images, targets)``: a small seeded batch for that model."""
    return _input_for


@pytest.fixture
def window_mean():
    """``window_mean(logits, images, b, y, x, radius, sigma_r)``: ``refine_at`` for one pixel."""
    return _window_mean
