"""GPU throughput of SubMConv2d 3x3 (issue 3, point 6). Skipped entirely without CUDA.

Grid: fp16 / bf16; 32 / 64 / 128 channels (in = out); one 1024x2048 image and a batch of eight
512x1024 images; densities 1 % .. 100 %; ``random`` (i.i.d. pixels) and ``blob`` (thresholded
smooth noise: large connected regions, like the activity masks of real images) masks.

Implementations compared in one run, on the same inputs (one pytest-benchmark group per input):

* ``spconv2d-triton``  our Triton kernels (``with sp.backend("triton")``), kernel map cached;
* ``spconv2d-torch``   our PyTorch path on the GPU (``with sp.backend("torch")``), map cached;
* ``dense-cudnn``      ``F.conv2d`` on the dense image, channels_last, ``cudnn.benchmark=True``;
* ``spconv-2.3.8``     peer (``spconv-cu126``), indices cached through ``indice_key``;
* ``spconv-triton``    peer (``spconv-triton`` 1.0.0, spconv API), indices cached likewise.

Peers are skipped when not importable. Kernel-map construction is timed separately
(``test_kmap_build``: fresh SparseTensor -> submanifold map, ``hash`` vs ``grid`` index, which is
the measurement behind ``TritonBackend.default_index_strategy``), and ``test_row_order`` ablates
the mask-sorted row order of the forward kernel. ``test_train_step`` times forward + backward.

Every timed call synchronises (``torch.cuda.synchronize()``) inside; warm-up rounds compile and
autotune before timing. ``SPCONV2D_BENCH_QUICK=1`` runs a reduced grid.

    python -m pytest bench/bench_gpu_conv.py --benchmark-json=bench/results/gpu_conv.json
    python bench/report.py bench/results/gpu_conv.json
"""
import functools
import importlib
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    pytest.skip("GPU benchmark: needs CUDA", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("GPU benchmark: unset TRITON_INTERPRET", allow_module_level=True)

import spconv2d as sp  # noqa: E402

QUICK = os.environ.get("SPCONV2D_BENCH_QUICK", "0") not in ("", "0")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
CHANNELS = [64] if QUICK else [32, 64, 128]
SHAPES = {"1x1024x2048": (1, 1024, 2048), "8x512x1024": (8, 512, 1024)}
DENSITIES = [0.01, 0.1, 0.5] if QUICK else [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
MASKS = ["random", "blob"]
ROUNDS, WARMUP = (5, 2) if QUICK else (10, 3)
DEV = torch.device("cuda")


# -- inputs ------------------------------------------------------------------------------
def make_mask(kind: str, B: int, H: int, W: int, density: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device=DEV).manual_seed(seed)
    if density >= 1.0:
        return torch.ones(B, H, W, dtype=torch.bool, device=DEV)
    if kind == "random":
        return torch.rand(B, H, W, generator=g, device=DEV) < density
    # blob: smooth noise (coarse grid, bicubic upsampling) thresholded at its quantile
    coarse = torch.randn(B, 1, max(H // 64, 2), max(W // 64, 2), generator=g, device=DEV)
    fine = F.interpolate(coarse, size=(H, W), mode="bicubic", align_corners=False)[:, 0]
    fine = fine + 0.05 * torch.randn(B, H, W, generator=g, device=DEV)
    thr = torch.quantile(fine.flatten()[:: max(1, fine.numel() // 2**24)].float(), 1 - density)
    return fine > thr


@functools.lru_cache(maxsize=1)
def make_case(shape_name: str, density: float, mask_kind: str, C: int, dtype_name: str):
    B, H, W = SHAPES[shape_name]
    dtype = DTYPES[dtype_name]
    mask = make_mask(mask_kind, B, H, W, density)
    coords = mask.nonzero().to(torch.int32)
    g = torch.Generator(device=DEV).manual_seed(1)
    feats = torch.randn(coords.shape[0], C, generator=g, device=DEV).to(dtype)
    weight = (torch.randn(C, C, 3, 3, generator=g, device=DEV) / (9 * C) ** 0.5).to(dtype)
    bias = torch.randn(C, generator=g, device=DEV).to(dtype)
    return dict(B=B, H=H, W=W, coords=coords, feats=feats, weight=weight, bias=bias,
                n=coords.shape[0], density=coords.shape[0] / (B * H * W))


def _timed(fn):
    def call():
        out = fn()
        torch.cuda.synchronize()
        return out

    return call


def _run(benchmark, fn, group, name, case, **info):
    benchmark.group = group
    benchmark.name = name
    benchmark.extra_info.update(impl=name, active=case["n"], density=case["density"],
                                shape=[case["B"], case["H"], case["W"]], **info)
    with torch.no_grad():
        benchmark.pedantic(_timed(fn), rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP)


@pytest.fixture(autouse=True)
def _cudnn_benchmark():
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    yield
    torch.backends.cudnn.benchmark = old


def _peer(module_names):
    for name in module_names:
        try:
            return importlib.import_module(name)
        except Exception:  # noqa: BLE001 - any import failure means "peer absent"
            continue
    pytest.skip(f"peer not importable: {', '.join(module_names)}")


PEERS = {
    "spconv-2.3.8": ("spconv.pytorch",),
    "spconv-triton": ("spconv_triton.pytorch", "spconv_triton"),
}
IMPLS = ["spconv2d-triton", "spconv2d-torch", "dense-cudnn", *PEERS]


def _sparse_forward(case, backend_name):  # a backend name or instance
    x = sp.SparseTensor(case["feats"], case["coords"], spatial_shape=(case["H"], case["W"]),
                        batch_size=case["B"])
    C = case["feats"].shape[1]
    conv = sp.nn.SubMConv2d(C, C, 3).to(device=DEV, dtype=case["feats"].dtype)
    with torch.no_grad():
        conv.weight.copy_(case["weight"])
        conv.bias.copy_(case["bias"])

    def fn():
        with sp.backend(backend_name):
            return conv(x)

    return fn


def _dense_forward(case):
    B, H, W, C = case["B"], case["H"], case["W"], case["feats"].shape[1]
    dense = torch.zeros(B, H, W, C, dtype=case["feats"].dtype, device=DEV)
    c = case["coords"].long()
    dense[c[:, 0], c[:, 1], c[:, 2]] = case["feats"]
    dense = dense.permute(0, 3, 1, 2)  # NCHW shape, channels_last memory
    assert dense.is_contiguous(memory_format=torch.channels_last)
    w = case["weight"].contiguous(memory_format=torch.channels_last)
    return lambda: F.conv2d(dense, w, case["bias"], padding=1)


def _peer_forward(case, mod):
    C = case["feats"].shape[1]
    conv = mod.SubMConv2d(C, C, 3, bias=True, indice_key="bench").to(device=DEV,
                                                                     dtype=case["feats"].dtype)
    with torch.no_grad():
        conv.weight.copy_(case["weight"].permute(0, 2, 3, 1))  # spconv: [out, kh, kw, in]
        conv.bias.copy_(case["bias"])
    x = mod.SparseConvTensor(case["feats"], case["coords"], [case["H"], case["W"]], case["B"])
    return lambda: conv(x)  # x keeps its indice_dict: maps are built in the warm-up only


# -- the main grid -----------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("C", CHANNELS)
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_subm_conv(benchmark, dtype_name, shape_name, C, density, mask_kind, impl):
    if impl in PEERS:
        mod = _peer(PEERS[impl])
    case = make_case(shape_name, density, mask_kind, C, dtype_name)
    if impl == "spconv2d-triton":
        fn = _sparse_forward(case, "triton")
    elif impl == "spconv2d-torch":
        fn = _sparse_forward(case, "torch")
    elif impl == "dense-cudnn":
        fn = _dense_forward(case)
    else:
        fn = _peer_forward(case, mod)
    pairs_flops = 2 * 9 * case["n"] * C * C  # upper bound (all 9 taps); dense: 2*9*B*H*W*C*C
    _run(benchmark, fn, f"subm3x3-{dtype_name}-{shape_name}-C{C}-d{density}-{mask_kind}", impl,
         case, channels=C, dtype=dtype_name, mask=mask_kind, target_density=density,
         flops_upper_bound=pairs_flops)


# -- kernel-map construction (hash vs grid index) ----------------------------------------
@pytest.mark.parametrize("strategy", ["hash", "grid"])
@pytest.mark.parametrize("backend_name", ["triton", "torch"])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_kmap_build(benchmark, shape_name, density, mask_kind, backend_name, strategy):
    from spconv2d import backends, maps

    case = make_case(shape_name, density, mask_kind, 32, "fp16")
    be = backends.resolve(DEV, backend_name)
    if backend_name == "torch" and strategy == "hash":
        strategy = "sort"  # the PyTorch path's non-dense index

    def fn():
        x = sp.SparseTensor(case["feats"], case["coords"], spatial_shape=(case["H"], case["W"]),
                            batch_size=case["B"])  # fresh coordinate manager: nothing cached
        return maps.subm_map(x, (3, 3), (1, 1), be, strategy).kmap.nbr

    _run(benchmark, fn, f"kmap-subm3x3-{shape_name}-d{density}-{mask_kind}",
         f"{backend_name}-{strategy}", case, strategy=strategy, backend=backend_name,
         key_space=case["B"] * case["H"] * case["W"])


# -- ablation: mask-sorted vs raster row order -------------------------------------------
@pytest.mark.parametrize("order", ["auto", "sorted", "raster"])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_row_order(benchmark, shape_name, density, mask_kind, order):
    from spconv2d.backends import create_backend

    case = make_case(shape_name, density, mask_kind, 64, "fp16")
    be = create_backend("triton", sort_rows={"auto": None, "sorted": True, "raster": False}[order])
    fn = _sparse_forward(case, be)
    _run(benchmark, fn, f"roworder-fp16-{shape_name}-C64-d{density}-{mask_kind}", order,
         case, channels=64, mask=mask_kind)


# -- forward + backward ------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["spconv2d-triton", "spconv2d-torch", "dense-cudnn"])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_train_step(benchmark, shape_name, density, mask_kind, impl):
    C, dtype_name = 64, "bf16"
    case = make_case(shape_name, density, mask_kind, C, dtype_name)
    if impl == "dense-cudnn":
        w = case["weight"].contiguous(memory_format=torch.channels_last).requires_grad_()
        b = case["bias"].clone().requires_grad_()
        B, H, W = case["B"], case["H"], case["W"]
        img = torch.zeros(B, H, W, C, dtype=case["feats"].dtype, device=DEV)
        c = case["coords"].long()
        img[c[:, 0], c[:, 1], c[:, 2]] = case["feats"]
        img = img.permute(0, 3, 1, 2).requires_grad_()

        def step():
            out = F.conv2d(img, w, b, padding=1)
            out.backward(torch.ones_like(out))
    else:
        backend_name = "triton" if impl == "spconv2d-triton" else "torch"
        feats = case["feats"].clone().requires_grad_()
        x = sp.SparseTensor(feats, case["coords"], spatial_shape=(case["H"], case["W"]),
                            batch_size=case["B"])
        conv = sp.nn.SubMConv2d(C, C, 3).to(device=DEV, dtype=feats.dtype)

        def step():
            with sp.backend(backend_name):
                out = conv(x).features
            out.backward(torch.ones_like(out))

    benchmark.group = f"train-subm3x3-{dtype_name}-{shape_name}-C{C}-d{density}-{mask_kind}"
    benchmark.name = impl
    benchmark.extra_info.update(impl=impl, active=case["n"], density=case["density"],
                                channels=C, dtype=dtype_name, mask=mask_kind)
    benchmark.pedantic(_timed(step), rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP)


# -- correctness guard: what is timed computes the right thing ---------------------------
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_triton_matches_dense(shape_name):
    case = make_case(shape_name, 0.05, "blob", 32, "fp16")
    out = _sparse_forward(case, "triton")()
    dense = _dense_forward(case)()
    c = case["coords"].long()
    ref = dense.permute(0, 2, 3, 1)[c[:, 0], c[:, 1], c[:, 2]]
    torch.testing.assert_close(out.features.float(), ref.float(), rtol=3e-2, atol=3e-2)
