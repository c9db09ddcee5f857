"""Sparse convolution kernels (spconv2d.kernels.conv) against float64 references built from nbr."""
import pytest
import torch

from spconv2d.kernel_map import pair_lists
from spconv2d.kernels import conv as kc
from spconv2d.kernels import interpreting
from spconv2d.testing import triton_device

DEVICE = triton_device() or "cpu"
INTERPRET = interpreting()
pytestmark = pytest.mark.triton

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=2e-2, atol=2e-2),
       torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}


# -- references (float64, straight from the definitions) ---------------------------------
def ref_forward(x, w, nbr, bias=None):
    x, w = x.double().cpu(), w.double().cpu()
    nbr = nbr.cpu().long()
    out = torch.zeros(nbr.shape[1], w.shape[2], dtype=torch.float64)
    for k in range(nbr.shape[0]):
        g = torch.where((nbr[k] >= 0)[:, None], x[nbr[k].clamp(min=0)], torch.zeros(()).double())
        out += g @ w[k]
    if bias is not None:
        out += bias.double().cpu()
    return out


def ref_backward_input(g, w, nbr, n_in):
    g, w, nbr = g.double().cpu(), w.double().cpu(), nbr.cpu().long()
    out = torch.zeros(n_in, w.shape[1], dtype=torch.float64)
    for k in range(nbr.shape[0]):
        j = torch.nonzero(nbr[k] >= 0).flatten()
        out.index_add_(0, nbr[k, j], g[j] @ w[k].T)
    return out


def ref_backward_weight(x, g, nbr):
    x, g, nbr = x.double().cpu(), g.double().cpu(), nbr.cpu().long()
    K = nbr.shape[0]
    out = torch.zeros(K, x.shape[1], g.shape[1], dtype=torch.float64)
    for k in range(K):
        j = torch.nonzero(nbr[k] >= 0).flatten()
        out[k] = x[nbr[k, j]].T @ g[j]
    return out


def random_kmap(gen, K, n_in, n_out, p_keep=0.6):
    """A valid map: for each offset, an injective partial map outputs -> inputs."""
    nbr = torch.full((K, n_out), -1, dtype=torch.int32)
    for k in range(K):
        m = min(n_in, n_out)
        ins = torch.randperm(n_in, generator=gen)[:m]
        outs = torch.randperm(n_out, generator=gen)[:m]
        keep = torch.rand(m, generator=gen) < p_keep
        nbr[k, outs[keep]] = ins[keep].to(torch.int32)
    return nbr


def reverse(nbr, n_in):
    K = nbr.shape[0]
    rev = torch.full((K, n_in), -1, dtype=torch.int32)
    k, j = (nbr >= 0).nonzero(as_tuple=True)
    rev[k, nbr[k, j].long()] = j.to(torch.int32)
    return rev


def _close(got, expect, dtype):
    torch.testing.assert_close(got.double().cpu(), expect, **TOL[dtype])


def _data(gen, n_in, c_in, c_out, K, dtype):
    x = torch.randn(n_in, c_in, generator=gen).to(dtype).to(DEVICE)
    w = (torch.randn(K, c_in, c_out, generator=gen) / (K * c_in) ** 0.5).to(dtype).to(DEVICE)
    b = torch.randn(c_out, generator=gen).to(DEVICE)
    return x, w, b


# -- forward -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("c_in,c_out", [(3, 5), (17, 3), (16, 33)])
def test_forward_matches_reference(dtype, c_in, c_out, gen):
    K, n_in, n_out = 9, 70, 90
    nbr = random_kmap(gen, K, n_in, n_out).to(DEVICE)
    x, w, b = _data(gen, n_in, c_in, c_out, K, dtype)
    out = kc.sparse_conv(x, w, nbr, b, kc.tile_plan(nbr))
    assert out.dtype == dtype and out.shape == (n_out, c_out)
    _close(out, ref_forward(x, w, nbr, b), dtype)


@pytest.mark.parametrize("sort", [False, True, None])
def test_forward_plans_give_identical_results(sort, gen):
    K, n_in, n_out = 9, 60, 100
    nbr = random_kmap(gen, K, n_in, n_out, p_keep=0.3).to(DEVICE)
    nbr[:, 20:40] = -1  # rows with no neighbour at all: bias only
    x, w, b = _data(gen, n_in, 5, 7, K, torch.float32)
    plan = kc.tile_plan(nbr, sort=sort)
    if sort is not None:
        assert plan.sorted == sort
    out = kc.sparse_conv(x, w, nbr, b, plan)
    expect = ref_forward(x, w, nbr, b)
    _close(out, expect, torch.float32)
    # the tile masks only skip work: the unplanned kernel gives the same numbers
    _close(kc.sparse_conv(x, w, nbr, b), expect, torch.float32)
    assert torch.allclose(out[20:40].cpu(), b.cpu().expand(20, 7))


def test_forward_is_deterministic(gen):
    nbr = random_kmap(gen, 9, 80, 80).to(DEVICE)
    x, w, b = _data(gen, 80, 19, 18, 9, torch.float32)
    plan = kc.tile_plan(nbr, sort=True)
    a = kc.sparse_conv(x, w, nbr, b, plan)
    assert torch.equal(a, kc.sparse_conv(x, w, nbr, b, plan))


def test_forward_without_bias_and_noncontiguous_operands(gen):
    K, n_in, n_out = 4, 40, 50
    nbr = random_kmap(gen, K, n_in, n_out).to(DEVICE)
    xb = torch.randn(n_in, 11, generator=gen).to(DEVICE)
    x = xb[:, 2:9]                                                   # row stride 11
    w = torch.randn(K, 6, 7, generator=gen).to(DEVICE).transpose(1, 2)  # [K, 7, 6], strided
    assert not x.is_contiguous() and not w.is_contiguous()
    out = kc.sparse_conv(x, w, nbr, None, kc.tile_plan(nbr))
    _close(out, ref_forward(x, w, nbr), torch.float32)


def test_forward_mixed_weight_dtype_is_cast(gen):
    nbr = random_kmap(gen, 9, 30, 30).to(DEVICE)
    x, w, b = _data(gen, 30, 5, 6, 9, torch.float16)
    out = kc.sparse_conv(x, w.float(), nbr, b.double())
    assert out.dtype == torch.float16
    _close(out, ref_forward(x, w, nbr, b), torch.float16)


def test_forward_empty_cases(gen):
    x, w, b = _data(gen, 10, 3, 4, 9, torch.float32)
    nbr0 = torch.empty(9, 0, dtype=torch.int32, device=DEVICE)
    assert kc.sparse_conv(x, w, nbr0, b, kc.tile_plan(nbr0)).shape == (0, 4)
    # no inputs: every output is the bias
    nbr = torch.full((9, 5), -1, dtype=torch.int32, device=DEVICE)
    out = kc.sparse_conv(x[:0], w, nbr, b)
    assert torch.allclose(out.cpu(), b.cpu().expand(5, 4))
    assert torch.equal(kc.sparse_conv(x[:0], w, nbr, None).cpu(), torch.zeros(5, 4))


def test_forward_more_than_64_offsets_has_no_masks(gen):
    K = 66
    nbr = random_kmap(gen, K, 20, 20, p_keep=0.2).to(DEVICE)
    plan = kc.tile_plan(nbr)
    assert plan.submasks is None and plan.perm is None
    x, w, b = _data(gen, 20, 3, 3, K, torch.float32)
    _close(kc.sparse_conv(x, w, nbr, b, plan), ref_forward(x, w, nbr, b), torch.float32)


def test_forward_rejects_bad_shapes(gen):
    nbr = random_kmap(gen, 9, 10, 10).to(DEVICE)
    x, w, _ = _data(gen, 10, 3, 4, 9, torch.float32)
    with pytest.raises(ValueError):
        kc.sparse_conv(x, w[:4], nbr)
    with pytest.raises(TypeError):
        kc.sparse_conv(x, w, nbr.long())


# -- input gradient ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_input_matches_reference(dtype, gen):
    K, n_in, n_out, c_in, c_out = 9, 60, 45, 5, 17
    nbr = random_kmap(gen, K, n_in, n_out)
    rev = reverse(nbr, n_in).to(DEVICE)
    nbr = nbr.to(DEVICE)
    x, w, _ = _data(gen, n_in, c_in, c_out, K, dtype)
    g = torch.randn(n_out, c_out, generator=gen).to(dtype).to(DEVICE)
    grad_in = kc.sparse_conv_backward_input(g, w, rev, kc.tile_plan(rev))
    assert grad_in.shape == (n_in, c_in) and grad_in.dtype == dtype
    _close(grad_in, ref_backward_input(g, w, nbr, n_in), dtype)


def test_backward_input_submanifold_uses_flipped_table(gen):
    # a symmetric map (3x3 submanifold on random pixels): rev = nbr.flip(0)
    H, W = 9, 8
    m = torch.rand(1, H, W, generator=gen) < 0.5
    c = m.nonzero()
    idx = torch.full((H + 2, W + 2), -1, dtype=torch.int32)
    idx[c[:, 1] + 1, c[:, 2] + 1] = torch.arange(c.shape[0], dtype=torch.int32)
    nbr = torch.stack([idx[c[:, 1] + 1 + dy, c[:, 2] + 1 + dx]
                       for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
    assert torch.equal(reverse(nbr, c.shape[0]), nbr.flip(0))
    n = c.shape[0]
    x, w, _ = _data(gen, n, 4, 6, 9, torch.float32)
    g = torch.randn(n, 6, generator=gen).to(DEVICE)
    rev = nbr.flip(0).contiguous().to(DEVICE)
    got = kc.sparse_conv_backward_input(g, w, rev, kc.tile_plan(rev))
    _close(got, ref_backward_input(g, w, nbr, n), torch.float32)


# -- weight gradient ---------------------------------------------------------------------
@pytest.mark.parametrize("splits", [1, 3, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_weight_matches_reference(splits, dtype, gen):
    K, n_in, n_out, c_in, c_out = 9, 70, 80, 17, 5
    nbr = random_kmap(gen, K, n_in, n_out).to(DEVICE)
    nbr[4] = -1  # an offset with no pairs
    x, _, _ = _data(gen, n_in, c_in, c_out, K, dtype)
    g = torch.randn(n_out, c_out, generator=gen).to(dtype).to(DEVICE)
    plan = kc.wgrad_plan(*pair_lists(nbr), splits=splits)
    if splits is not None:
        assert plan.splits == splits and plan.chunk_start.numel() == K * splits
    gw = kc.sparse_conv_weight_grad(x, g, plan)
    assert gw.shape == (K, c_in, c_out) and gw.dtype == dtype
    expect = ref_backward_weight(x, g, nbr)
    _close(gw, expect, dtype)
    assert (gw[4] == 0).all()
    gw32 = kc.sparse_conv_weight_grad(x, g, plan, out_dtype=torch.float32)
    assert gw32.dtype == torch.float32
    _close(gw32, expect, dtype)


def test_backward_weight_chunks_cover_pairs_exactly(gen):
    nbr = random_kmap(gen, 5, 50, 50).to(DEVICE)
    ptr, in_idx, out_idx = pair_lists(nbr)
    plan = kc.wgrad_plan(ptr, in_idx, out_idx, splits=4)
    s, e = plan.chunk_start.cpu().tolist(), plan.chunk_end.cpu().tolist()
    for k in range(5):
        covered = []
        for i in range(k * 4, (k + 1) * 4):
            assert ptr[k] <= s[i] <= e[i] <= ptr[k + 1]
            covered += list(range(s[i], e[i]))
        assert covered == list(range(ptr[k], ptr[k + 1]))
    # automatic split count: many pairs -> several chunks, capped
    auto = kc.wgrad_plan([0, 10000, 20000], in_idx.new_zeros(20000), in_idx.new_zeros(20000),
                         pairs_per_program=1000, max_splits=8)
    assert auto.splits == 8


def test_backward_weight_empty_and_deterministic(gen):
    x, _, _ = _data(gen, 10, 3, 4, 9, torch.float32)
    g = torch.randn(6, 4, generator=gen).to(DEVICE)
    nbr = torch.full((9, 6), -1, dtype=torch.int32, device=DEVICE)
    gw = kc.sparse_conv_weight_grad(x, g, kc.wgrad_plan(*pair_lists(nbr)))
    assert gw.shape == (9, 3, 4) and (gw == 0).all()
    nbr = random_kmap(gen, 9, 10, 6).to(DEVICE)
    plan = kc.wgrad_plan(*pair_lists(nbr), splits=2)
    assert torch.equal(kc.sparse_conv_weight_grad(x, g, plan), kc.sparse_conv_weight_grad(x, g, plan))


@pytest.mark.skipif(DEVICE == "cuda", reason="fp64 accumulation is meant for the interpreter")
def test_float64_accumulates_in_float64(gen):
    K, n_in, n_out = 9, 30, 40
    nbr = random_kmap(gen, K, n_in, n_out).to(DEVICE)
    x = torch.randn(n_in, 5, generator=gen, dtype=torch.float64)
    w = torch.randn(K, 5, 6, generator=gen, dtype=torch.float64)
    b = torch.randn(6, generator=gen, dtype=torch.float64)
    out = kc.sparse_conv(x, w, nbr, b, kc.tile_plan(nbr))
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref_forward(x, w, nbr, b), rtol=1e-12, atol=1e-12)
    g = torch.randn(n_out, 6, generator=gen, dtype=torch.float64)
    gw = kc.sparse_conv_weight_grad(x, g, kc.wgrad_plan(*pair_lists(nbr), splits=2))
    torch.testing.assert_close(gw, ref_backward_weight(x, g, nbr), rtol=1e-12, atol=1e-12)


# -- precision and autotune policy -------------------------------------------------------
def test_fp32_precision_policy(monkeypatch):
    assert kc.input_precision(torch.float32, None) in ("ieee", "tf32")
    assert kc.input_precision(torch.float32, False) == "ieee"
    assert kc.input_precision(torch.float32, True) == "tf32"
    monkeypatch.setattr(kc, "tf32_enabled", lambda: False)
    assert kc.input_precision(torch.float32, None) == "ieee"
    monkeypatch.setattr(kc, "tf32_enabled", lambda: True)
    assert kc.input_precision(torch.float32, None) == "tf32"


def test_tf32_follows_torch_flag():
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert not kc.tf32_enabled()
        torch.backends.cuda.matmul.allow_tf32 = True
        assert kc.tf32_enabled()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def test_autotune_keys_and_interpreter_config():
    for kern in (kc.sparse_conv_kernel, kc.sparse_conv_wgrad_kernel):
        assert "n_rows" not in kern.keys and "N" not in kern.keys
        if INTERPRET:
            assert len(kern.configs) == 1
        for cfg in kern.configs:
            assert all(v >= 16 for k, v in cfg.kwargs.items() if k.startswith("BLOCK_"))
    assert set(kc.sparse_conv_kernel.keys) == {"C_in", "C_out", "K"}


# -- GPU only ----------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("c", [32, 64, 128])
def test_gpu_bf16_and_fp16_all_ops(c, gen):
    K, n = 9, 5000
    nbr = random_kmap(gen, K, n, n, p_keep=0.7)
    rev = reverse(nbr, n).cuda()
    nbr = nbr.cuda()
    for dtype in (torch.bfloat16, torch.float16):
        x, w, b = _data(gen, n, c, c, K, dtype)
        g = torch.randn(n, c, generator=gen).to(dtype).cuda()
        _close(kc.sparse_conv(x, w, nbr, b, kc.tile_plan(nbr)), ref_forward(x, w, nbr, b), dtype)
        _close(kc.sparse_conv_backward_input(g, w, rev, kc.tile_plan(rev)),
               ref_backward_input(g, w, nbr, n), dtype)
        gw = kc.sparse_conv_weight_grad(x, g, kc.wgrad_plan(*pair_lists(nbr)), torch.float32)
        ref = ref_backward_weight(x, g, nbr)
        torch.testing.assert_close(gw.double().cpu(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@pytest.mark.cuda
def test_gpu_fp32_exact_by_default_tf32_opt_in(gen):
    K, n, c = 9, 4000, 64
    nbr = random_kmap(gen, K, n, n).cuda()
    x, w, b = _data(gen, n, c, c, K, torch.float32)
    ref = ref_forward(x, w, nbr, b)
    exact = kc.sparse_conv(x, w, nbr, b, allow_tf32=False)
    torch.testing.assert_close(exact.double().cpu(), ref, rtol=1e-5, atol=1e-5)
    tf32 = kc.sparse_conv(x, w, nbr, b, allow_tf32=True)
    torch.testing.assert_close(tf32.double().cpu(), ref, rtol=1e-2, atol=1e-2)
    assert (tf32 - exact).abs().max() > 0  # TF32 really was used


@pytest.mark.cuda
def test_gpu_autotune_cache_independent_of_n(gen):
    K, c = 9, 32
    for n in (1000, 3000, 7777):
        nbr = random_kmap(gen, K, n, n).cuda()
        x, w, b = _data(gen, n, c, c, K, torch.float16)
        _close(kc.sparse_conv(x, w, nbr, b, kc.tile_plan(nbr)), ref_forward(x, w, nbr, b),
               torch.float16)
    keys = [k for k in kc.sparse_conv_kernel.cache if k[0] == c and k[1] == c]
    assert len({k[:3] for k in keys}) == 1
