"""The sparse U-Net's inactive pixels: guided upsampling, top-2 margins, cell states, refinement."""
import pytest
import torch
import torch.nn.functional as F

import spconv2d.zoo as zoo


def test_refine_at_equals_its_formula(window_mean):
    from spconv2d.zoo.inactive import refine_at

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 9, 11, generator=g, dtype=torch.float64)
    images = torch.rand(2, 3, 9, 11, generator=g, dtype=torch.float64)
    idx = torch.tensor([0, 5, 10, 50, 98, 99, 120, 197])  # corners, borders, both images
    got = refine_at(logits, images, idx, radius=2, sigma_r=0.3)
    for i, f in enumerate(idx.tolist()):
        b, y, x = f // 99, (f // 11) % 9, f % 11
        torch.testing.assert_close(got[i], window_mean(logits, images, b, y, x, 2, 0.3))
    # differentiable w.r.t. the logits (the CSR product), like the gather it stands for
    lg = logits.clone().requires_grad_(True)
    refine_at(lg, images, idx, radius=2, sigma_r=0.3).sum().backward()
    assert lg.grad is not None and lg.grad.abs().sum() > 0


@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_refined_copy_equals_the_row_write_of_refine_at_forward_and_backward(layout):
    """``refined_copy`` (training's one-op refinement) against the composition it replaces,
    ``with_pixel_rows(logits, idx, refine_at(logits, ...))``: values, and the gradient of a
    random upstream gradient, with refined pixels inside each other's windows, at borders and
    corners, in both images."""
    from spconv2d.zoo.inactive import refine_at, refined_copy, with_pixel_rows

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 9, 11, generator=g, dtype=torch.float64)
    if layout == "channels_last":
        logits = logits.contiguous(memory_format=torch.channels_last)
    images = torch.rand(2, 3, 9, 11, generator=g, dtype=torch.float64)
    idx = torch.tensor([0, 5, 6, 10, 16, 17, 50, 98, 99, 120, 121, 197])
    upstream = torch.randn(2, 5, 9, 11, generator=g, dtype=torch.float64)
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    got = refined_copy(a, images, idx, radius=2, sigma_r=0.3)
    want = with_pixel_rows(b, idx, refine_at(b, images, idx, radius=2, sigma_r=0.3))
    torch.testing.assert_close(got, want)
    assert got.is_contiguous(memory_format=torch.channels_last)
    (got * upstream).sum().backward()
    (want * upstream).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)
    torch.autograd.gradcheck(lambda t: refined_copy(t, images, idx, radius=1, sigma_r=0.3),
                             (logits[:, :2].clone().requires_grad_(),))


@pytest.mark.parametrize("layout, guided", [("channels_last", True), ("nchw", True), ("channels_last", False)])
def test_compose_rows_equals_its_row_writes_forward_and_backward(layout, guided):
    """``compose_rows`` (training's assembly as one op) against the row writes it replaces:
    ``pred`` = bil with the guided rows, ``out`` = pred with head + bil's rows at the active
    pixels (some of them also guided): values, and the gradients of random upstream gradients
    of both outputs w.r.t. bil, the guided rows and the head."""
    from spconv2d.zoo.inactive import compose_rows, pixel_rows, with_pixel_rows

    g = torch.Generator().manual_seed(4)
    B, K, H, W = 2, 5, 6, 7
    bil = torch.randn(B, K, H, W, generator=g, dtype=torch.float64)
    if layout == "channels_last":
        bil = bil.contiguous(memory_format=torch.channels_last)
    n = B * H * W
    g_idx = torch.randperm(n, generator=g)[:30] if guided else torch.zeros(0, dtype=torch.long)
    a_idx = torch.cat([g_idx[:5], torch.randperm(n, generator=g)[:20]]).unique() if guided else torch.randperm(n, generator=g)[:20]
    g_rows = torch.randn(len(g_idx), K, generator=g, dtype=torch.float64)
    head = torch.randn(len(a_idx), K, generator=g, dtype=torch.float64)
    up_out, up_pred = (torch.randn(B, K, H, W, generator=g, dtype=torch.float64) for _ in range(2))
    leaves = [[t.clone().requires_grad_() for t in (bil, g_rows, head)] for _ in range(2)]
    out, pred = compose_rows(leaves[0][0], g_idx, leaves[0][1], a_idx, leaves[0][2])
    b1, r1, h1 = leaves[1]
    want_pred = with_pixel_rows(b1, g_idx, r1)
    want_out = with_pixel_rows(want_pred, a_idx, h1 + pixel_rows(b1)[a_idx])
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(pred, want_pred)
    assert out.is_contiguous(memory_format=torch.channels_last)
    ((out * up_out).sum() + (pred * up_pred).sum()).backward()
    ((want_out * up_out).sum() + (want_pred * up_pred).sum()).backward()
    for got, want in zip(leaves[0], leaves[1]):
        torch.testing.assert_close(got.grad, want.grad)
    # only one output used (the other's gradient is None inside the op)
    x = bil.clone().requires_grad_()
    compose_rows(x, g_idx, g_rows, a_idx, head)[0].sum().backward()
    y = bil.clone().requires_grad_()
    with_pixel_rows(with_pixel_rows(y, g_idx, g_rows), a_idx, head + pixel_rows(y)[a_idx]).sum().backward()
    torch.testing.assert_close(x.grad, y.grad)


def test_guided_upsample_of_some_cells_writes_only_those():
    from spconv2d.zoo.inactive import guided_upsample

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
    from spconv2d.zoo.blocks import bilinear_up
    from spconv2d.zoo.inactive import guided_upsample, logit_margin

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


def test_guided_upsample_follows_colour_inside_mixed_cells():
    from spconv2d.zoo.inactive import guided_upsample

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
    from spconv2d.zoo.inactive import guided_upsample

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


def test_logit_margin_is_top1_minus_top2():
    from spconv2d.zoo.inactive import logit_margin

    x = torch.randn(2, 7, 5, 6, generator=torch.Generator().manual_seed(4))
    top = x.topk(2, dim=1).values
    torch.testing.assert_close(logit_margin(x, 1), top[:, 0] - top[:, 1])
    torch.testing.assert_close(logit_margin(x.permute(0, 2, 3, 1), 3), top[:, 0] - top[:, 1])
    assert logit_margin(torch.tensor([[2.0, 2.0, 1.0]]), 1).item() == 0.0  # a tie at the top
    assert logit_margin(torch.ones(3, 1), 1).isinf().all()  # one class: never uncertain


@pytest.mark.numba
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_kernels_equal_the_tensor_formulation(dtype):
    """At inference the numba kernel of ``zoo.fused`` stands in for the tensor code (which
    training differentiates): the same values in every window (corners, borders, both images)."""
    from spconv2d.zoo import fused
    from spconv2d.zoo.inactive import refine_at

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 7, 4, 6, generator=g, dtype=dtype)
    images = torch.rand(2, 3, 16, 24, generator=g, dtype=dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    assert not fused.usable(logits.clone().requires_grad_(), grad=True) and fused.usable(logits, grad=True)
    big = torch.randn(2, 7, 16, 24, generator=g, dtype=dtype)
    idx = torch.tensor([0, 5, 23, 24, 200, 383, 384, 500, 767])
    torch.testing.assert_close(refine_at(big, images, idx), refine_at(big.clone().requires_grad_(), images, idx).detach(),
                               **tol)


@pytest.mark.numba
@pytest.mark.parametrize("K", [1, 2, 19])
def test_fused_uncertain_pixels_equal_the_tensor_selection(K):
    """The refinement's candidates: inactive pixels of unsure cells with a top-2 margin below
    the threshold, raster order, the margins themselves; ties at the top (margin 0)."""
    from spconv2d.zoo import fused
    from spconv2d.zoo.inactive import logit_margin, pixel_rows

    g = torch.Generator().manual_seed(K)
    B, h, w = 3, 4, 6
    out = torch.randn(B, K, 4 * h, 4 * w, generator=g).contiguous(memory_format=torch.channels_last)
    out[0, :, 3, 5] = 2.0  # every class ties
    mask = torch.rand(B, 4 * h, 4 * w, generator=g) < 0.3
    unsure = torch.rand(B, h, w, generator=g) < 0.6
    unsure[0, 0, 1] = True
    mask[0, 3, 5] = False
    idx, marg = fused.uncertain_pixels(pixel_rows(out), mask, unsure, 0.5)
    cand = unsure.repeat_interleave(4, 1).repeat_interleave(4, 2) & ~mask
    ref = cand.view(-1).nonzero().squeeze(1)
    ref_m = logit_margin(pixel_rows(out)[ref], 1)
    assert torch.equal(idx, ref[ref_m < 0.5]) and torch.equal(marg, ref_m[ref_m < 0.5])
    assert K == 1 or (3 * 4 * w + 5) in idx.tolist()


@pytest.mark.numba
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("K", [1, 7, 8, 16, 19, 33])
@pytest.mark.parametrize("radius", [1, 3])
def test_fused_refinement_equals_the_tensor_formulation_for_any_width(dtype, K, radius):
    """Logit widths below, at and between the kernel's vector width (8): whole vectors, the
    scalar tail, both; windows clipped at every border."""
    from spconv2d.zoo.inactive import refine_at

    g = torch.Generator().manual_seed(K + radius)
    logits = torch.randn(2, K, 12, 20, generator=g, dtype=dtype)
    images = torch.rand(2, 3, 12, 20, generator=g, dtype=dtype)
    idx = torch.tensor([0, 1, 19, 20, 130, 239, 240, 259, 460, 479])
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(refine_at(logits, images, idx, radius),
                               refine_at(logits.clone().requires_grad_(), images, idx, radius).detach(), **tol)


def _tensor_assembly(coarse, images, cells, fine, pix):
    """What ``SparseUNet.assemble`` computes with tensor ops (its path for training)."""
    from spconv2d.zoo.blocks import bilinear_up
    from spconv2d.zoo.inactive import guided_upsample, pixel_rows, put_pixel_rows

    out = bilinear_up(coarse, images.shape[-2:])
    fine = fine + pixel_rows(out).index_select(0, pix)
    guided_upsample(coarse, images, out=out, cells=cells)
    put_pixel_rows(out, pix, fine)
    return out


@pytest.mark.numba
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("K", [7, 19])
def test_fused_compose_equals_the_tensor_assembly(dtype, K):
    """``fused.compose`` (one pass, each pixel written once) = bilinear upsampling, guided
    upsampling in the chosen cells, the head's rows plus the bilinear logits at the active
    pixels; one image without active pixels, cells at every border."""
    from spconv2d.zoo import fused
    from spconv2d.zoo.inactive import guided_spatial_term

    g = torch.Generator().manual_seed(K)
    B, h, w = 3, 3, 5
    coarse = 3 * torch.randn(B, K, h, w, generator=g, dtype=dtype)
    images = torch.rand(B, 3, 4 * h, 4 * w, generator=g, dtype=dtype)
    mask = torch.rand(B, 4 * h, 4 * w, generator=g) < 0.3
    mask[1] = False
    cells = torch.rand(B, h, w, generator=g) < 0.5
    pix = mask.view(-1).nonzero().squeeze(1)
    fine = torch.randn(pix.numel(), K, generator=g, dtype=dtype)
    out = fused.compose(coarse, images, cells, fine, mask.nonzero(), 0.05, guided_spatial_term(4, dtype))
    assert out.is_contiguous(memory_format=torch.channels_last)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, _tensor_assembly(coarse, images, cells, fine, pix), **tol)


@pytest.mark.numba
def test_sparse_unet_numba_assembly_equals_the_tensor_path(monkeypatch):
    """Inference on a CPU with numba assembles the output in one kernel; the same logits (up to
    rounding) and labels as the tensor path training uses."""
    import types

    import spconv2d.zoo as zoo
    from spconv2d.zoo import unets
    from spconv2d.zoo.masks import make_mask

    torch.manual_seed(0)
    s = zoo.create_model("sparse_unet", density=0.3).eval()
    x = torch.rand(2, 3, 32, 64)
    mask = make_mask(x, "residual", 0.3)
    with torch.no_grad():
        fast = s(x, mask)
        monkeypatch.setattr(unets, "fused", types.SimpleNamespace(usable=lambda *a, **k: False))
        ref = s(x, mask)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(fast.argmax(1), ref.argmax(1))


@pytest.mark.numba
def test_fast_exp_is_exp():
    """float32: within float32 rounding of exp on [-87, 0] (vectorised polynomial); float64:
    ``math.exp`` itself."""
    import math

    import numpy as np
    from numba import njit

    from spconv2d.zoo.pixel_kernels import fast_exp

    @njit
    def run(x, out):
        for i in range(x.shape[0]):
            out[i] = fast_exp(x[i])

    x = np.concatenate([-np.linspace(0, 87, 100001), [-1e-30, -0.5 * math.log(2)]])
    out32 = np.empty(x.shape, np.float32)
    run(x.astype(np.float32), out32)
    ref = np.exp(x.astype(np.float32).astype(np.float64))
    assert np.max(np.abs(out32 - ref) / ref) < 2e-7
    out64 = np.empty(x.shape)
    run(x, out64)
    assert np.array_equal(out64, np.exp(x))


@pytest.mark.numba
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_ieee_div_is_division_without_the_zero_check(dtype):
    """``ieee_div(a, b)`` = numpy's ``a / b`` bit for bit, inf / NaN for a zero divisor (numba's
    own ``/`` raises there)."""
    import numpy as np
    from numba import njit

    from spconv2d.zoo.pixel_kernels import ieee_div

    @njit
    def run(a, b, out):
        for i in range(a.shape[0]):
            out[i] = ieee_div(a[i], b[i])

    rng = np.random.default_rng(0)
    a = np.concatenate([rng.standard_normal(1000) * 1e3, [1.0, -1.0, 0.0]]).astype(dtype)
    b = np.concatenate([rng.standard_normal(1000), [0.0, 0.0, 0.0]]).astype(dtype)
    out = np.empty_like(a)
    run(a, b, out)
    with np.errstate(divide="ignore", invalid="ignore"):
        ref = a / b
    assert np.array_equal(out, ref, equal_nan=True) and out.dtype == a.dtype
    assert np.isposinf(out[-3]) and np.isneginf(out[-2]) and np.isnan(out[-1])


@pytest.mark.numba
def test_fused_kernels_bit_identical_on_one_and_two_threads():
    """The output assembly, the refinement's candidates and the refinement at a size that runs two threads (PyTorch's
    OpenMP team): the same bits as on one thread, and across runs (each output row written by
    one task, in a fixed order)."""
    from spconv2d.backends.numba_kernels.runtime import PARALLEL_MIN_WORK
    from spconv2d.zoo import fused
    from spconv2d.zoo.inactive import guided_spatial_term, pixel_rows

    g = torch.Generator().manual_seed(0)
    B, K, h, w = 8, 19, 16, 32
    coarse = 3 * torch.randn(B, K, h, w, generator=g)
    images = torch.rand(B, 3, 4 * h, 4 * w, generator=g)
    coords = (torch.rand(B, 4 * h, 4 * w, generator=g) < 0.3).nonzero()
    fine = torch.randn(len(coords), K, generator=g)
    cells = torch.rand(B, h, w, generator=g) < 0.5
    idx = torch.arange(0, B * 16 * h * w, 7)
    assert B * 16 * h * w * K // 32 >= PARALLEL_MIN_WORK and idx.numel() * 49 * 22 // 64 >= PARALLEL_MIN_WORK

    def run():
        out = fused.compose(coarse, images, cells, fine, coords, 0.05, guided_spatial_term(4))
        unsure = torch.ones(B, h, w, dtype=torch.bool)
        return (out, *fused.uncertain_pixels(pixel_rows(out), torch.zeros(B, 4 * h, 4 * w, dtype=torch.bool),
                                              unsure, 2.0), fused.refine_at(out, images, idx, 3, 0.05))

    old = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            results.append(run())
    finally:
        torch.set_num_threads(old)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_with_pixel_rows_writes_out_of_place_and_carries_both_gradients():
    from spconv2d.zoo.inactive import put_pixel_rows, with_pixel_rows

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 4, 6, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_()
    rows = torch.randn(3, 5, generator=g, requires_grad=True)
    idx = torch.tensor([0, 13, 47])
    y = with_pixel_rows(x, idx, rows)
    ref = x.detach().clone()
    put_pixel_rows(ref, idx, rows.detach())
    assert torch.equal(y, ref) and y.is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(x.detach(), ref)  # x itself unchanged
    grad = torch.randn(y.shape, generator=g)
    y.backward(grad)
    gx = grad.clone()
    put_pixel_rows(gx, idx, torch.zeros(3, 5))
    assert torch.equal(x.grad, gx)
    assert torch.equal(rows.grad, grad.permute(0, 2, 3, 1).reshape(-1, 5)[idx])


def test_sparse_unet_recording_autograd_computes_what_inference_does(monkeypatch):
    """With autograd recording, the tensor path writes the logits out of place (cheaper
    backward); the values are those of the in-place inference path, aux included (up to
    rounding: at inference the refinement runs the numba kernel and the batch norms are folded
    into the convs)."""
    import types

    import spconv2d.zoo as zoo
    from spconv2d.zoo import unets
    from spconv2d.zoo.masks import make_mask

    torch.manual_seed(0)
    s = zoo.create_model("sparse_unet", density=0.3).eval()
    x = torch.rand(2, 3, 32, 64)
    mask = make_mask(x, "residual", 0.3)
    monkeypatch.setattr(unets, "fused", types.SimpleNamespace(usable=lambda *a, **k: False))
    out, aux = s(x, mask, return_aux=True)  # parameters require grad: out of place
    assert out.requires_grad
    with torch.no_grad():
        ref_out, ref_aux = s(x, mask, return_aux=True)
    torch.testing.assert_close(out.detach(), ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux.detach(), ref_aux, rtol=1e-5, atol=1e-6)
    (out.sum() + aux.sum()).backward()
    assert all(p.grad is not None for n, p in s.named_parameters() if n.startswith(("head", "coarse")))
