"""Activity-mask policies."""
import pytest
import torch
import torch.nn.functional as F

from spconv2d.zoo.masks import (MaskPolicy, make_mask, measured_density, residual_energy, ridge_energy,
                                sobel_energy)



@pytest.mark.parametrize("policy", ["edge", "contrast", "residual"])
@pytest.mark.parametrize("density", [0.1, 0.25, 0.5])
def test_energy_policies_hit_the_target_density(policy, density):
    x = torch.rand(3, 3, 32, 64)
    m = make_mask(x, policy, density)
    assert m.shape == (3, 32, 64) and m.dtype == torch.bool
    for i in range(3):  # per image
        assert abs(measured_density(m[i]) - density) < 0.01


def test_edge_policy_is_threshold_then_dilation_and_prefers_edges():
    x = torch.zeros(1, 1, 32, 32)
    x[..., 10:20, 10:20] = 1.0  # a square: energy only on its border
    x = x + 0.001 * torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    m = make_mask(x, "edge", 0.2, dilation=3)
    e = sobel_energy(x)
    # the dilated band around the square's border is active and is most of the active set;
    # the rest of the budget goes to the noise
    ring = F.max_pool2d((e > 0.2).float()[:, None], 3, 1, 1)[:, 0] > 0
    assert m[ring].all() and ring.sum() > 0.7 * m.sum()
    assert abs(int(m.sum()) - round(0.2 * 32 * 32)) <= 6  # up to ties of the dilated energy
    # equals the dilation of the energy thresholded at the same value
    t = F.max_pool2d(e[:, None], 3, 1, 1).flatten().topk(round(0.2 * 32 * 32)).values[-1]
    dil = F.max_pool2d((e >= t).float()[:, None], 3, 1, 1)[:, 0] > 0
    assert torch.equal(m, dil)


def test_residual_policy_covers_what_the_coarse_level_misses():
    """Residual = image - bilinear_up(avg_pool4(image)): ~0 on flat areas and smooth gradients
    (the coarse level reproduces them), large at a thin pole and on both sides of a step."""
    H, W = 32, 64
    rows = torch.linspace(0, 0.6, H)[:, None].expand(H, W)
    x = torch.stack([rows, rows * 0.5, 1 - rows])[None].clone()  # a smooth 'sky/road' gradient
    x[..., :, 40:] = 0.2  # a step: a second flat region
    x[..., 4:28, 21] = 0.9  # a one-pixel 'pole'
    e = residual_energy(x)
    assert e.shape == (1, H, W)
    # flat interiors / the gradient away from any boundary: (near) zero energy
    assert e[0, 2:30, 4:16].max() < 0.02 and e[0, 2:18, 46:62].max() < 1e-5
    m = make_mask(x, "residual", 0.1)
    assert abs(measured_density(m) - 0.1) < 0.01
    assert m[0, 4:28, 21].float().mean() > 0.9  # the pole is active
    assert m[0, 8:24, 39:41].all()  # both sides of the step boundary
    assert not m[0, 2:30, 4:16].any()
    # no dilation by default (a dilated residual would be a different, wider mask)
    assert MaskPolicy("residual").dilation == 1 and MaskPolicy("edge").dilation == 3
    assert not torch.equal(make_mask(x, "residual", 0.1, dilation=3), m)


def test_ridge_energy_equals_its_formula():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 5, 9, generator=g, dtype=torch.float64)
    xp = F.pad(x, (2, 2, 0, 0), mode="replicate")
    ref = torch.zeros(2, 5, 9, dtype=torch.float64)
    for d in (1, 2):
        a, b = x - xp[..., 2 - d:2 - d + 9], x - xp[..., 2 + d:2 + d + 9]
        r = torch.minimum(a, b).clamp_min(0) + torch.minimum(-a, -b).clamp_min(0)
        ref = torch.maximum(ref, r.amax(1))
    torch.testing.assert_close(ridge_energy(x), ref)


def test_ridge_energy_finds_thin_vertical_lines_not_steps_or_ramps():
    ramp = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(1, 3, 16, 32).clone()
    assert ridge_energy(ramp).abs().max() < 1e-6
    step = torch.zeros(1, 3, 16, 32)
    step[..., :, 20:] = 0.7
    assert ridge_energy(step).abs().max() < 1e-6
    x = torch.full((1, 3, 16, 32), 0.4)
    x[..., :, 8] = 0.9  # a bright 1-px line
    x[..., :, 20:22] = 0.0  # a dark 2-px line
    r = ridge_energy(x)
    assert r.shape == (1, 16, 32)
    assert torch.allclose(r[0, :, 8], torch.tensor(0.5)) and torch.allclose(r[0, :, 20:22], torch.tensor(0.4))
    assert r[0, :, 24:].max() < 1e-6 and r[0, :, :6].max() < 1e-6
    # a thin line with a weak colour difference beats a strong texture-free step in the mask
    y = torch.full((1, 3, 32, 64), 0.5)
    y[..., :, 32:] = 0.9  # step of 0.4
    y[..., 4:28, 12] = 0.62  # pole of 0.12
    m = make_mask(y, "residual", 0.06)
    assert m[0, 4:28, 12].all() and m[0, :, 31:33].any()


def test_segmentation_defaults_use_the_residual_policy():
    import spconv2d.zoo as zoo
    from spconv2d.zoo.engine import TrainConfig

    assert zoo.create_model("sparse_unet").policy.policy == "residual"
    c = TrainConfig(model="sparse_unet", data="streets").resolved()
    assert c.mask_policy == "residual" and c.density == 0.3
    assert TrainConfig(model="sparse_cnn").resolved().mask_policy == "nonzero"


def test_nonzero_full_and_errors():
    x = torch.zeros(2, 1, 8, 8)
    x[0, 0, 2, 3] = 0.5
    assert make_mask(x, "nonzero").sum() == 1
    assert make_mask(x, "full").all()
    with pytest.raises(ValueError, match="density"):
        make_mask(x, "edge", 0.0)
    with pytest.raises(ValueError, match="unknown mask policy"):
        MaskPolicy("bogus")
    assert "edge" in repr(MaskPolicy("edge", 0.3))


def test_a_sparse_model_owns_its_mask_policy():
    import spconv2d.zoo as zoo
    from spconv2d.zoo.masks import activity_mask

    x = torch.rand(2, 3, 32, 64, generator=torch.Generator().manual_seed(5))
    s = zoo.create_model("sparse_unet", refine=False).eval()
    assert s.sparse and torch.equal(s.make_mask(x), make_mask(x, "residual", 0.3))
    assert torch.equal(activity_mask(s, x), s.make_mask(x))
    with torch.no_grad():  # without a mask, forward computes on make_mask's
        torch.testing.assert_close(s(x), s(x, s.make_mask(x)))
    s.set_mask_policy(density=0.2)  # eval --density: same policy, new density
    assert s.policy.policy == "residual" and abs(measured_density(s.make_mask(x)) - 0.2) < 0.01
    s.set_mask_policy("edge")  # and the policy, keeping the density
    assert (s.policy.policy, s.policy.density, s.policy.dilation) == ("edge", 0.2, 3)
    assert torch.equal(s.make_mask(x), make_mask(x, "edge", 0.2))
    with pytest.raises(ValueError, match="unknown mask policy"):
        s.set_mask_policy("bogus")
    dense = zoo.create_model("unet")
    assert not dense.sparse and activity_mask(dense, x) is None


@pytest.mark.numba
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("size", [(16, 24), (7, 3), (9, 1)])
def test_fused_residual_energy_equals_the_tensor_ops_exactly(dtype, size):
    """The one-pass numba energy of the ``residual`` policy (used wherever numba is installed)
    is bit for bit ``max(residual_energy, ridge_energy)`` of the tensor ops: borders, sizes that
    are not multiples of the cell, widths below the ridge distances; so are the masks."""
    from spconv2d.zoo import fused
    from spconv2d.zoo.masks import coarse_approximation, threshold_density

    g = torch.Generator().manual_seed(7)
    images = torch.rand(3, 3, *size, generator=g, dtype=dtype)
    images[0, :, :, min(1, size[1] - 1)] = 1.0  # a thin line: ridge energy
    ref = torch.maximum(residual_energy(images), ridge_energy(images))
    assert torch.equal(fused.residual_ridge_energy(images, coarse_approximation(images)), ref)
    assert torch.equal(make_mask(images, "residual", 0.3), threshold_density(ref, 0.3, 1))


def _kth_selection(energy, k):
    flat = energy.reshape(energy.shape[0], -1)
    return (flat >= flat.kthvalue(flat.shape[1] - k + 1, dim=1, keepdim=True).values).view_as(energy)


@pytest.mark.numba
@pytest.mark.parametrize("values", ["uniform", "ties", "signed"])
def test_radix_select_threshold_is_kthvalue_exactly(values):
    """``fused.top_fraction`` (the mask threshold by radix select, used for float32 energies
    with numba) selects what ``kthvalue`` selects: many ties, negative values, -0.0 next to
    +0.0, k from 1 to every pixel; 1 and 2 threads alike; an image with a NaN -> None (the
    tensor ops decide)."""
    from spconv2d.zoo import fused

    g = torch.Generator().manual_seed(11)
    e = torch.rand(3, 17, 23, generator=g)
    if values == "ties":
        e = (e * 6).floor()
    elif values == "signed":
        e = torch.randn(3, 17, 23, generator=g)
        e[0, 0, :7], e[1, :, 0] = -0.0, 0.0
    n = 17 * 23
    old = torch.get_num_threads()
    try:
        for k in (1, 2, 37, n // 2, n - 1, n):
            ref = _kth_selection(e, k)
            for threads in (1, 2):
                torch.set_num_threads(threads)
                assert torch.equal(fused.top_fraction(e, k), ref), (k, threads)
    finally:
        torch.set_num_threads(old)
    from spconv2d.zoo.masks import threshold_density

    e[2, 3, 4] = float("nan")
    assert fused.top_fraction(e, 5) is None
    assert torch.equal(threshold_density(e, 0.3, 1), _kth_selection(e, round(0.3 * n)))  # falls back
