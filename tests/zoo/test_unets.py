"""Segmentation U-Nets: unet and sparse_unet (the twins, inactive pixels, refinement)."""
import pytest
import torch

import spconv2d.zoo as zoo
from spconv2d.zoo.masks import make_mask


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


def test_sparse_unet_refines_exactly_the_uncertain_inactive_pixels(window_mean):
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
    from spconv2d.zoo.inactive import logit_margin

    chosen = ~mask & (logit_margin(base) < s.margin)  # (pixels of sure cells never are)
    assert chosen.any() and (~chosen).any()
    assert torch.equal(out.permute(0, 2, 3, 1)[~chosen], base.permute(0, 2, 3, 1)[~chosen])
    for b, y, xx in chosen.nonzero().tolist()[::37]:
        torch.testing.assert_close(out[b, :, y, xx], window_mean(base, x, b, y, xx, s.refine_radius, s.refine_sigma_r),
                                   rtol=1e-4, atol=1e-4)
    # the cap keeps the least certain ones
    s.refine_fraction = 0.01
    with torch.no_grad():
        capped = s(x, mask)
    changed = (capped != base).any(1)
    assert 0 < changed.sum() <= int(0.01 * changed.numel())


def test_unet_rejects_sizes_not_multiple_of_4():
    with pytest.raises(ValueError, match="multiple of 4"):
        zoo.create_model("unet")(torch.rand(1, 3, 30, 64))


def test_sparse_unet_handles_an_image_without_active_pixels():
    torch.manual_seed(0)
    s = zoo.create_model("sparse_unet")
    mask = torch.zeros(2, 32, 64, dtype=torch.bool)
    mask[1, 4:9, 4:9] = True
    o = s(torch.rand(2, 3, 32, 64), mask)
    assert o.shape == (2, 19, 32, 64) and torch.isfinite(o).all()
