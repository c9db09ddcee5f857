"""Model zoo: registry, forward/backward of every model, dense <-> sparse twins."""
import pytest
import torch
import torch.nn.functional as F

import spconv2d.zoo as zoo
from spconv2d.zoo.masks import make_mask
from spconv2d.zoo.registry import register_model

MNIST_MODELS = ("mlp", "cnn", "sparse_cnn")
SEG_MODELS = ("unet", "sparse_unet")



def _input_for(name):
    g = torch.Generator().manual_seed(0)
    if name in MNIST_MODELS:
        x = torch.rand(3, 1, 28, 28, generator=g)
        x[x < 0.75] = 0  # strokes: ~25 % non-zero pixels
        return x, torch.randint(0, 10, (3,), generator=g)
    return torch.rand(2, 3, 32, 64, generator=g), torch.randint(0, 19, (2, 32, 64), generator=g)


def test_registry_lists_the_five_models():
    assert set(zoo.list_models()) >= {"mlp", "cnn", "sparse_cnn", "unet", "sparse_unet"}
    assert zoo.list_models("sparse_*") == ["sparse_cnn", "sparse_unet"]
    with pytest.raises(KeyError, match="unknown model"):
        zoo.create_model("no_such_model")


def test_register_model_decorator_and_duplicates():
    @register_model(name="_test_tiny")
    def tiny(num_classes=3):
        return torch.nn.Linear(4, num_classes)

    m = zoo.create_model("_test_tiny", num_classes=5)
    assert m.out_features == 5 and m.model_name == "_test_tiny"
    with pytest.raises(ValueError, match="already registered"):
        register_model(lambda: None, name="_test_tiny")


@pytest.mark.parametrize("name", sorted(set(zoo.list_models()) - {"_test_tiny"}))
def test_forward_backward_every_model(name):
    torch.manual_seed(0)
    model = zoo.create_model(name)
    x, y = _input_for(name)
    if name in MNIST_MODELS:
        out = model(x)
        assert out.shape == (len(x), 10)
        loss = torch.nn.functional.cross_entropy(out, y)
    else:  # the coarse head is trained through the auxiliary output
        out, aux = model(x, return_aux=True)
        assert out.shape == aux.shape == (len(x), 19, *x.shape[-2:])
        loss = torch.nn.functional.cross_entropy(out, y) + torch.nn.functional.cross_entropy(aux, y)
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert sum(float(p.grad.abs().sum()) for p in model.parameters()) > 0


@pytest.mark.parametrize("dense,sparse", [("unet", "sparse_unet"), ("cnn", "sparse_cnn")])
def test_state_dict_exchange(dense, sparse):
    torch.manual_seed(0)
    d, s = zoo.create_model(dense), zoo.create_model(sparse)
    assert {k: v.shape for k, v in d.state_dict().items()} == {k: v.shape for k, v in s.state_dict().items()}
    s.load_state_dict(d.state_dict())          # dense -> sparse
    torch.manual_seed(1)
    d2 = zoo.create_model(dense)
    d2.load_state_dict(s.state_dict())         # sparse -> dense
    for k, v in d.state_dict().items():
        assert torch.equal(v, d2.state_dict()[k]), k


def test_sparse_unet_with_every_pixel_active_equals_unet():
    torch.manual_seed(0)
    d, s = zoo.create_model("unet").eval(), zoo.create_model("sparse_unet").eval()
    with torch.no_grad():  # non-trivial BN statistics
        for bn in [m for m in d.modules() if isinstance(m, torch.nn.BatchNorm2d)]:
            bn.running_mean.uniform_(-0.2, 0.2), bn.running_var.uniform_(0.5, 2)
    s.load_state_dict(d.state_dict())
    x = torch.rand(2, 3, 32, 64)
    with torch.no_grad():
        a = d(x)
        b = s(x, torch.ones(2, 32, 64, dtype=torch.bool))
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_sparse_unet_inactive_pixels_take_the_coarse_prediction():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 64)
    mask = make_mask(x, "edge", 0.2)
    for upsample in ("guided", "bilinear"):
        s = zoo.create_model("sparse_unet", density=0.2, upsample=upsample, refine=False).eval()
        with torch.no_grad():
            out, coarse = s(x, mask, return_aux=True)
        inactive = ~mask[:, None].expand_as(out)
        assert torch.equal(out[inactive], coarse[inactive])
        assert not torch.allclose(out[~inactive], coarse[~inactive])


def _window_mean(logits, images, b, y, x, radius, sigma_r):
    """The refinement formula for one pixel, written out."""
    H, W = logits.shape[-2:]
    num, den = 0.0, 0.0
    for qy in range(max(0, y - radius), min(H, y + radius + 1)):
        for qx in range(max(0, x - radius), min(W, x + radius + 1)):
            wq = torch.exp(-(images[b, :, y, x] - images[b, :, qy, qx]).pow(2).sum() / (2 * sigma_r ** 2))
            num, den = num + wq * logits[b, :, qy, qx], den + wq
    return num / den


def test_refine_at_equals_its_formula():
    from spconv2d.zoo.models import refine_at

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 9, 11, generator=g, dtype=torch.float64)
    images = torch.rand(2, 3, 9, 11, generator=g, dtype=torch.float64)
    idx = torch.tensor([0, 5, 10, 50, 98, 99, 120, 197])  # corners, borders, both images
    got = refine_at(logits, images, idx, radius=2, sigma_r=0.3)
    for i, f in enumerate(idx.tolist()):
        b, y, x = f // 99, (f // 11) % 9, f % 11
        torch.testing.assert_close(got[i], _window_mean(logits, images, b, y, x, 2, 0.3))
    # differentiable w.r.t. the logits (the CSR product), like the gather it stands for
    lg = logits.clone().requires_grad_(True)
    refine_at(lg, images, idx, radius=2, sigma_r=0.3).sum().backward()
    assert lg.grad is not None and lg.grad.abs().sum() > 0


def test_guided_upsample_of_some_cells_writes_only_those():
    from spconv2d.zoo.models import guided_upsample

    g = torch.Generator().manual_seed(1)
    logits, images = torch.randn(2, 4, 4, 6, generator=g), torch.rand(2, 3, 16, 24, generator=g)
    cells = torch.rand(2, 4, 6, generator=g) < 0.5
    out = torch.full((2, 4, 16, 24), 7.0)
    guided_upsample(logits, images, out=out, cells=cells)
    inside = cells.repeat_interleave(4, 1).repeat_interleave(4, 2)[:, None].expand_as(out)
    torch.testing.assert_close(out[inside], guided_upsample(logits, images)[inside])
    assert torch.equal(out[~inside], torch.full_like(out[~inside], 7.0))


def test_cell_states_bound_what_upsampling_can_change():
    """The shortcut behind the sparse U-Net's inactive pixels: in a cell whose 3x3
    neighbourhood agrees on a label (not *mixed*), bilinear and guided upsampling give every
    pixel that label; where the neighbourhood's margins are also >= ``margin`` (not *unsure*),
    with a margin >= ``margin``: neither guided upsampling nor refinement is needed there."""
    from spconv2d.zoo.models import bilinear_up, guided_upsample, logit_margin

    s = zoo.create_model("sparse_unet")
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 3, (2, 4, 8), generator=g).repeat_interleave(2, 1).repeat_interleave(2, 2)
    scale = torch.ones(2, 1, 8, 16)
    scale[:, :, :, :6] = 0.25  # a low-margin band: unanimous but unsure cells
    coarse = 4.0 * scale * F.one_hot(labels, 5).permute(0, 3, 1, 2).float() + 0.5 * torch.rand(2, 5, 8, 16, generator=g)
    images = torch.rand(2, 3, 32, 64, generator=g)
    mixed, unsure = s.cell_states(coarse)
    assert mixed.any() and (unsure & ~mixed).any() and (~unsure).any() and (mixed <= unsure).all()
    up4 = lambda t: t.repeat_interleave(4, -2).repeat_interleave(4, -1)  # noqa: E731
    for up in (bilinear_up(coarse, (32, 64)), guided_upsample(coarse, images)):
        same = up4(~mixed)
        assert torch.equal(up.argmax(1)[same], up4(coarse.argmax(1))[same])
        assert (logit_margin(up)[up4(~unsure)] >= s.margin - 1e-5).all()


def test_sparse_unet_refines_exactly_the_uncertain_inactive_pixels():
    torch.manual_seed(0)
    s = zoo.create_model("sparse_unet", density=0.3).eval()
    s.refine_fraction = 1.0  # no cap: every uncertain pixel
    x = torch.rand(2, 3, 32, 64)
    mask = make_mask(x, "residual", 0.3)
    with torch.no_grad():
        s.refine = False
        base = s(x, mask)
        s.refine = True
        out = s(x, mask)
    from spconv2d.zoo.models import logit_margin

    chosen = ~mask & (logit_margin(base) < s.margin)  # (pixels of sure cells never are)
    assert chosen.any() and (~chosen).any()
    assert torch.equal(out.permute(0, 2, 3, 1)[~chosen], base.permute(0, 2, 3, 1)[~chosen])
    for b, y, xx in chosen.nonzero().tolist()[::37]:
        torch.testing.assert_close(out[b, :, y, xx], _window_mean(base, x, b, y, xx, s.refine_radius, s.refine_sigma_r),
                                   rtol=1e-4, atol=1e-4)
    # the cap keeps the least certain ones
    s.refine_fraction = 0.01
    with torch.no_grad():
        capped = s(x, mask)
    changed = (capped != base).any(1)
    assert 0 < changed.sum() <= int(0.01 * changed.numel())


def test_guided_upsample_follows_colour_inside_mixed_cells():
    from spconv2d.zoo.models import guided_upsample

    # two flat regions whose boundary crosses a 4x4 cell (x = 13: cell 12..15 is 3/4 bright)
    x = torch.zeros(1, 3, 16, 32)
    x[..., :, 13:] = 1.0
    bright = (F.avg_pool2d(x, 4)[0, 0] > 0.5).float()  # the cells' majority class
    logits = torch.stack([1 - bright, bright])[None] * 10
    g = guided_upsample(logits, x).argmax(1)[0]
    b = F.interpolate(logits, size=(16, 32), mode="bilinear", align_corners=False).argmax(1)[0]
    truth = (x[0, 0] > 0.5).long()
    assert torch.equal(g, truth)  # every pixel follows its colour
    assert not torch.equal(b, truth)  # bilinear gets the mixed cell wrong
    # flat image: a smooth (weights sum to 1) interpolation; constant logits stay constant
    flat = torch.full((1, 4, 4, 8), 3.0)
    torch.testing.assert_close(guided_upsample(flat, torch.rand(1, 3, 16, 32)), torch.full((1, 4, 16, 32), 3.0))


def test_guided_upsample_equals_its_formula():
    """Against the docstring's formula, pixel by pixel (replicate-padded cell neighbourhoods)."""
    from spconv2d.zoo.models import guided_upsample

    g = torch.Generator().manual_seed(0)
    cell, sr, ss = 4, 0.3, 2.0
    logits = torch.randn(2, 3, 2, 3, generator=g, dtype=torch.float64)
    images = torch.rand(2, 3, 8, 12, generator=g, dtype=torch.float64)
    means = F.avg_pool2d(images, cell)
    ref = torch.empty(2, 3, 8, 12, dtype=torch.float64)
    for b in range(2):
        for y in range(8):
            for x in range(12):
                cy, cx = y // cell, x // cell
                scores, cands = [], []
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        ny, nx = min(max(cy + dy, 0), 1), min(max(cx + dx, 0), 2)  # replicate
                        # distance to the centre of the (unclamped) neighbour cell position
                        py, px = (cy + dy) * cell + cell / 2, (cx + dx) * cell + cell / 2
                        d2s = (y + 0.5 - py) ** 2 + (x + 0.5 - px) ** 2
                        d2r = float((images[b, :, y, x] - means[b, :, ny, nx]).pow(2).sum())
                        scores.append(-d2s / (2 * ss ** 2) - d2r / (2 * sr ** 2))
                        cands.append(logits[b, :, ny, nx])
                wgt = torch.softmax(torch.tensor(scores, dtype=torch.float64), 0)
                ref[b, :, y, x] = (wgt[:, None] * torch.stack(cands)).sum(0)
    torch.testing.assert_close(guided_upsample(logits, images, cell, sr, ss), ref)


def test_sparse_cnn_ignores_background_when_mask_is_nonzero():
    torch.manual_seed(0)
    m = zoo.create_model("sparse_cnn").eval()
    x, _ = _input_for("sparse_cnn")
    with torch.no_grad():
        a = m(x)
        b = m(x, (x != 0).any(1))  # explicit mask = the default (non-zero pixels)
    torch.testing.assert_close(a, b)


def test_unet_rejects_sizes_not_multiple_of_4():
    with pytest.raises(ValueError, match="multiple of 4"):
        zoo.create_model("unet")(torch.rand(1, 3, 30, 64))


def test_sparse_models_handle_an_image_without_active_pixels():
    torch.manual_seed(0)
    x = torch.zeros(2, 1, 28, 28)
    x[1, 0, 10:15, 10:12] = 1.0
    m = zoo.create_model("sparse_cnn")
    out = m(x)
    out.sum().backward()
    assert torch.isfinite(out).all()
    s = zoo.create_model("sparse_unet")
    mask = torch.zeros(2, 32, 64, dtype=torch.bool)
    mask[1, 4:9, 4:9] = True
    o = s(torch.rand(2, 3, 32, 64), mask)
    assert o.shape == (2, 19, 32, 64) and torch.isfinite(o).all()


def test_logit_margin_is_top1_minus_top2():
    from spconv2d.zoo.models import logit_margin

    x = torch.randn(2, 7, 5, 6, generator=torch.Generator().manual_seed(4))
    top = x.topk(2, dim=1).values
    torch.testing.assert_close(logit_margin(x, 1), top[:, 0] - top[:, 1])
    torch.testing.assert_close(logit_margin(x.permute(0, 2, 3, 1), 3), top[:, 0] - top[:, 1])
    assert logit_margin(torch.tensor([[2.0, 2.0, 1.0]]), 1).item() == 0.0  # a tie at the top
    assert logit_margin(torch.ones(3, 1), 1).isinf().all()  # one class: never uncertain
