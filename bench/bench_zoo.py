"""Model-zoo inference benchmarks: dense vs sparse twins, side by side, same inputs.

    BENCH_THREADS=2 python -m pytest bench/bench_zoo.py --benchmark-group-by=group \
        --benchmark-json=bench/results/zoo_2thread_run1.json

On a VM whose speed drifts, run it a few times in a row and compare the runs' medians (docs/ZOO.md
quotes the median of three runs' medians and the fastest round).

Groups
    unet-streets-64x128-b16   unet | sparse_unet (mask given) | sparse_unet (mask policy included)
                              at densities 0.1 / 0.25 / 0.3 | sparse_unet 0.3 without the
                              refinement of uncertain pixels (refine=False); eval mode, no grad
    unet-vs-sparse-*          the issue-11 goals, each in one test: unet, unet in channels-last
                              memory (model and input; the faster dense layout here) and
                              sparse_unet (mask policy inside the timing) alternating round by
                              round (medians and the ratios ``speedup`` and
                              ``speedup_vs_channels_last`` in ``extra_info``; the benchmark's own
                              timing is of sparse_unet): inference at batch 16 of 64x128 and at
                              batch 4 of 256x512, and a training step (forward with the aux
                              output, the zoo's loss ``engine.criterion``, backward, AdamW) at
                              batch 16
    cnn-mnist-b256            cnn | sparse_cnn (active = non-zero pixels)
    choice-*                  the zoo's measured implementation choices, each next to the
                              alternative it replaced, on the shapes of a streets batch of 16
                              (docs/ARCHITECTURE.md, "Measured choices — zoo"):
                              python -m pytest bench/bench_zoo.py -k choice --benchmark-group-by=group
The goals' ratios depend on the allocator: on the shared VMs ``unet`` paid page faults on freshly
mapped memory that ``sparse_unet`` mostly did not, and with glibc told to keep what it frees
(``MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=1073741824`` in the environment, the
regime of a process that has run a while) the ratios were lower; ``extra_info["malloc"]``
records those variables, so measure and quote both regimes (docs/ZOO.md, "Speed").
Weights come from runs/<model>-<data>/model.safetensors when present, otherwise random init. Use
trained weights for sparse_unet: how many pixels it refines depends on how certain the model is
(an untrained one hits the refine_fraction cap and guides every cell). ``extra_info`` records density, threads and parameters.
"""
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import spconv2d.zoo as zoo
from spconv2d.zoo.blocks import bilinear_up
from spconv2d.zoo.data import build_dataset
from spconv2d.zoo.engine import criterion
from spconv2d.zoo.inactive import logit_margin
from spconv2d.zoo.masks import measured_density
from spconv2d.zoo.threads import auto_threads

DEFAULT_THREADS = auto_threads  # without BENCH_THREADS: the idle cores (bench/conftest.py)
DENSITIES = (0.1, 0.25, 0.3)


def _weights(name):
    data = "mnist" if "cnn" in name else "streets"
    return os.path.join("runs", f"{name}-{data}", "model.safetensors")


def _trained(name):
    return os.path.isfile(_weights(name))


def _model(name, **kw):
    m = zoo.create_model(name, **kw)
    path = _weights(name)
    if os.path.isfile(path):
        from safetensors.torch import load_file

        m.load_state_dict(load_file(path))
    return m.eval()


@pytest.fixture(scope="module")
def streets_batch():
    return build_dataset("streets", "val", num_samples=16).images


@pytest.fixture(scope="module")
def mnist_batch():
    return build_dataset("mnist", "val").images[::4][:256].contiguous()


def _run(benchmark, fn, rounds=15):
    with torch.no_grad():
        fn()  # warm-up (first-call allocations, map caches are per batch anyway)
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)


@pytest.mark.benchmark(group="unet-streets-64x128-b16")
def test_unet_dense(benchmark, streets_batch):
    m = _model("unet")
    benchmark.extra_info.update(density=1.0, threads=torch.get_num_threads(), parameters=sum(p.numel() for p in m.parameters()),
                                trained=_trained("unet"))
    _run(benchmark, lambda: m(streets_batch))


@pytest.mark.benchmark(group="unet-streets-64x128-b16")
@pytest.mark.parametrize("density", DENSITIES)
def test_sparse_unet_given_mask(benchmark, streets_batch, density):
    m = _model("sparse_unet", density=density)
    mask = m.make_mask(streets_batch)  # the model's own policy, computed outside the timing
    benchmark.extra_info.update(density=measured_density(mask), threads=torch.get_num_threads(), mask=f"{m.policy.policy}, precomputed",
                                trained=_trained("sparse_unet"))
    _run(benchmark, lambda: m(streets_batch, mask))


@pytest.mark.benchmark(group="unet-streets-64x128-b16")
@pytest.mark.parametrize("density", DENSITIES)
def test_sparse_unet_with_mask_policy(benchmark, streets_batch, density):
    m = _model("sparse_unet", density=density)
    benchmark.extra_info.update(density=density, threads=torch.get_num_threads(), mask=f"{m.policy.policy} policy inside the timing",
                                trained=_trained("sparse_unet"))
    _run(benchmark, lambda: m(streets_batch))


@pytest.mark.benchmark(group="unet-streets-64x128-b16")
def test_sparse_unet_without_refinement(benchmark, streets_batch):
    m = _model("sparse_unet", refine=False)
    benchmark.extra_info.update(density=m.policy.density, threads=torch.get_num_threads(), mask=f"{m.policy.policy} policy inside the timing", refine=False)
    _run(benchmark, lambda: m(streets_batch))


def _alternating(fns, rounds):
    """Median seconds of each function over ``rounds`` rounds, the functions alternating, their
    order reversed every other round (what runs right after which model changes its allocator
    state: page faults on freshly mapped memory are expensive on the VM)."""
    import statistics
    import time

    times = {k: [] for k in fns}
    for f in fns.values():
        f()
    names = list(fns)
    for r in range(rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _goal(benchmark, fns, rounds=15, **info):
    """``fns``: ``unet`` (the zoo's model as it runs: NCHW), ``unet-channels_last`` (the same
    weights with the model and its input in channels-last memory, the faster dense layout on
    this CPU) and ``sparse_unet``, alternating round by round."""
    med = _alternating(fns, rounds)
    sparse = med["sparse_unet"]
    benchmark.extra_info.update(threads=torch.get_num_threads(), alternating_rounds=rounds,
                                unet_ms=1e3 * med["unet"], unet_channels_last_ms=1e3 * med["unet-channels_last"],
                                sparse_unet_ms=1e3 * sparse, speedup=med["unet"] / sparse,
                                speedup_vs_channels_last=med["unet-channels_last"] / sparse,
                                trained=_trained("sparse_unet"), malloc=_malloc_env(), **info)
    benchmark.pedantic(fns["sparse_unet"], rounds=5, iterations=1, warmup_rounds=1)


def _malloc_env():
    """glibc's allocator settings from the environment (empty: its defaults)."""
    return {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}


def _inference(images, rounds, **info):
    d, s = _model("unet").eval(), _model("sparse_unet").eval()
    dcl = _model("unet").eval().to(memory_format=torch.channels_last)
    icl = images.contiguous(memory_format=torch.channels_last)
    return dict(fns={"unet": lambda: d(images), "unet-channels_last": lambda: dcl(icl),
                     "sparse_unet": lambda: s(images)}, rounds=rounds, density=s.policy.density, **info)


@pytest.mark.benchmark(group="unet-vs-sparse-inference-64x128-b16")
def test_goal_inference_64x128(benchmark, streets_batch):
    with torch.no_grad():
        _goal(benchmark, **_inference(streets_batch, 15, shape=[16, 64, 128]))


@pytest.mark.benchmark(group="unet-vs-sparse-inference-256x512-b4")
def test_goal_inference_256x512(benchmark):
    images = build_dataset("streets", "val", num_samples=4, size=(256, 512)).images
    with torch.no_grad():
        _goal(benchmark, **_inference(images, 9, shape=[4, 256, 512]))


@pytest.mark.benchmark(group="unet-vs-sparse-train-step-64x128-b16")
def test_goal_training_step(benchmark):
    data = build_dataset("streets", "train", num_samples=16)
    targets = data.targets
    loss_fn = criterion("segmentation", aux_weight=0.4)
    steps = {}
    for name, model, fmt in (("unet", "unet", torch.contiguous_format),
                             ("unet-channels_last", "unet", torch.channels_last),
                             ("sparse_unet", "sparse_unet", torch.contiguous_format)):
        m = _model(model).train().to(memory_format=fmt)
        images = data.images.contiguous(memory_format=fmt)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)

        def step(m=m, opt=opt, images=images):
            loss = loss_fn(m(images, return_aux=True), targets)  # the zoo's training loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        steps[name] = step
    _goal(benchmark, steps, rounds=9, shape=[16, 64, 128])


@pytest.mark.benchmark(group="cnn-mnist-b256")
def test_cnn_dense(benchmark, mnist_batch):
    m = _model("cnn")
    benchmark.extra_info.update(density=1.0, threads=torch.get_num_threads())
    _run(benchmark, lambda: m(mnist_batch))


@pytest.mark.benchmark(group="cnn-mnist-b256")
def test_sparse_cnn(benchmark, mnist_batch):
    m = _model("sparse_cnn")
    benchmark.extra_info.update(density=measured_density((mnist_batch != 0).any(1)), threads=torch.get_num_threads())
    _run(benchmark, lambda: m(mnist_batch))


# --------------------------------------------------------------------------------------------
# measured choices: each implementation next to the alternative it replaced
# --------------------------------------------------------------------------------------------
B, K, h, w = 16, 19, 16, 32  # a streets batch: coarse logits at H/4 x W/4 of 64x128


@pytest.fixture(scope="module")
def coarse():
    return torch.randn(B, K, h, w, generator=torch.Generator().manual_seed(0))


@pytest.mark.benchmark(group="choice-top2-margin")
@pytest.mark.parametrize("form", ["running top-2 (logit_margin)", "topk"])
def test_choice_margin(benchmark, coarse, form):
    if form == "topk":
        def fn():
            top = coarse.topk(2, dim=1).values
            return top[:, 0] - top[:, 1]
    else:
        def fn():
            return logit_margin(coarse, 1)
    _run(benchmark, fn, rounds=50)


@pytest.mark.benchmark(group="choice-cell-labels")
@pytest.mark.parametrize("form", ["max().indices", "argmax"])
def test_choice_labels(benchmark, coarse, form):
    fn = (lambda: coarse.argmax(1, keepdim=True)) if form == "argmax" else (lambda: coarse.max(1, keepdim=True).indices)
    _run(benchmark, fn, rounds=50)


@pytest.mark.benchmark(group="choice-bilinear-up")
@pytest.mark.parametrize("form", ["channels-last (bilinear_up)", "contiguous NCHW"])
def test_choice_bilinear(benchmark, coarse, form):
    if form == "contiguous NCHW":
        fn = lambda: F.interpolate(coarse, size=(4 * h, 4 * w), mode="bilinear", align_corners=False)  # noqa: E731
    else:
        fn = lambda: bilinear_up(coarse, (4 * h, 4 * w))  # noqa: E731
    _run(benchmark, fn, rounds=30)


@pytest.mark.benchmark(group="choice-window-mean")
@pytest.mark.parametrize("form", ["CSR x dense (refine_at)", "gather buffer"])
def test_choice_window_mean(benchmark, form):
    """The refinement's weighted window sums: 3 % of a batch's pixels, 7x7 windows, 19 classes."""
    g = torch.Generator().manual_seed(0)
    n_pix = B * 4 * h * 4 * w
    table = torch.randn(n_pix, K, generator=g)
    M, k = int(0.03 * n_pix), 49
    cols = torch.randint(0, n_pix, (M, k), generator=g).sort(1).values
    wgt = torch.rand(M, k, generator=g)
    if form == "gather buffer":
        fn = lambda: (wgt[..., None] * table[cols]).sum(1)  # noqa: E731
    else:
        crow = torch.arange(0, (M + 1) * k, k)

        def fn():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                A = torch.sparse_csr_tensor(crow, cols.reshape(-1), wgt.reshape(-1), size=(M, n_pix))
            return A @ table
    _run(benchmark, fn, rounds=30)


@pytest.mark.benchmark(group="choice-refine")
@pytest.mark.parametrize("form", ["numba kernel (zoo.fused)", "tensor formulation"])
def test_choice_refine(benchmark, form):
    """refine_at at inference: 3 % of a batch's pixels, 7x7 windows, 19 classes; the numba
    kernel vs the tensor code (colour weights + CSR product), which training differentiates."""
    pytest.importorskip("numba")
    from spconv2d.zoo import fused
    from spconv2d.zoo.inactive import refine_at

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, K, 4 * h, 4 * w, generator=g).contiguous(memory_format=torch.channels_last)
    images = torch.rand(B, 3, 4 * h, 4 * w, generator=g)
    idx = torch.randperm(logits.numel() // K, generator=g)[:int(0.03 * logits.numel() / K)].sort().values
    if form.startswith("numba"):
        fn = lambda: fused.refine_at(logits, images, idx, 3, 0.05)  # noqa: E731
    else:
        lg = logits.clone().requires_grad_()  # (a gradient wanted: the tensor formulation)

        def fn():
            with torch.enable_grad():
                return refine_at(lg, images, idx, 3, 0.05)
    _run(benchmark, fn, rounds=20)


@pytest.mark.benchmark(group="choice-guided-softmax")
@pytest.mark.parametrize("form", ["middle dim [n, 9, 16]", "last dim [n, 16, 9]"])
def test_choice_guided_softmax(benchmark, form):
    """guided_upsample's softmax over the 9 neighbour cells of the mixed cells' pixels."""
    n = int(0.4 * B * h * w)  # mixed cells
    score = torch.randn(n, 9, 16, generator=torch.Generator().manual_seed(0))
    if form.startswith("last"):
        score = score.transpose(1, 2).contiguous()
        fn = lambda: torch.softmax(score, 2)  # noqa: E731
    else:
        fn = lambda: torch.softmax(score, 1)  # noqa: E731
    _run(benchmark, fn, rounds=50)


@pytest.mark.benchmark(group="choice-assembly")
@pytest.mark.parametrize("form", ["numba kernel (fused.compose)", "tensor ops"])
def test_choice_assembly(benchmark, coarse, form):
    """SparseUNet.assemble at inference: every pixel's logits before the refinement (30 % active
    pixels, guided upsampling in 55 % of the cells); one pass that writes each pixel once vs
    bilinear everywhere + gather at the active pixels + guided upsampling + the fine rows."""
    pytest.importorskip("numba")
    from spconv2d.zoo import fused
    from spconv2d.zoo.inactive import guided_spatial_term, guided_upsample, put_pixel_rows

    g = torch.Generator().manual_seed(0)
    images = torch.rand(B, 3, 4 * h, 4 * w, generator=g)
    coords = (torch.rand(B, 4 * h, 4 * w, generator=g) < 0.3).nonzero()
    pix = (coords[:, 0] * 4 * h + coords[:, 1]) * 4 * w + coords[:, 2]
    head = torch.randn(pix.numel(), K, generator=g)
    cells = torch.rand(B, h, w, generator=g) < 0.55
    spatial = guided_spatial_term(4)
    if form.startswith("numba"):
        fn = lambda: fused.compose(coarse, images, cells, head, coords, 0.05, spatial)  # noqa: E731
    else:
        def fn():
            out = bilinear_up(coarse, images.shape[-2:])
            fine = head + out.permute(0, 2, 3, 1).reshape(-1, K).index_select(0, pix)
            guided_upsample(coarse, images, out=out, cells=cells)
            put_pixel_rows(out, pix, fine)
            return out
    _run(benchmark, fn, rounds=30)


@pytest.mark.benchmark(group="choice-refinement-candidates")
@pytest.mark.parametrize("form", ["numba kernel (fused.uncertain_pixels)", "tensor ops"])
def test_choice_candidates(benchmark, form):
    """The refinement's candidates: inactive pixels (70 %) of unsure cells (65 %) with a top-2
    margin below 2, and their margins; one kernel vs upsampled cell states, a nonzero over every
    pixel, gathered margins and a filter."""
    pytest.importorskip("numba")
    from spconv2d.zoo import fused
    from spconv2d.zoo.inactive import pixel_rows

    g = torch.Generator().manual_seed(0)
    rows = pixel_rows(torch.randn(B, K, 4 * h, 4 * w, generator=g).contiguous(memory_format=torch.channels_last))
    mask = torch.rand(B, 4 * h, 4 * w, generator=g) < 0.3
    unsure = torch.rand(B, h, w, generator=g) < 0.65
    if form.startswith("numba"):
        fn = lambda: fused.uncertain_pixels(rows, mask, unsure, 2.0)  # noqa: E731
    else:
        def fn():
            cand = unsure.repeat_interleave(4, 1).repeat_interleave(4, 2) & ~mask
            idx = cand.view(-1).nonzero().squeeze(1)
            marg = logit_margin(rows.index_select(0, idx), 1)
            return idx[marg < 2.0], marg[marg < 2.0]
    _run(benchmark, fn, rounds=30)


@pytest.mark.benchmark(group="choice-from-dense")
@pytest.mark.parametrize("form", ["fused pass (numba backend)", "torch ops"])
def test_choice_from_dense(benchmark, streets_batch, form):
    """``SparseTensor.from_dense`` of a streets batch at 30 % (the residual policy's mask): the
    numba backend's one pass (coords, keys, features) vs nonzero + gather."""
    pytest.importorskip("numba")
    import spconv2d as sp
    from spconv2d.zoo.masks import make_mask

    mask = make_mask(streets_batch, "residual", 0.3)
    name = "numba" if form.startswith("fused") else "torch"

    def fn():
        with sp.backend(name):
            return sp.SparseTensor.from_dense(streets_batch, mask)
    _run(benchmark, fn, rounds=30)


@pytest.mark.benchmark(group="choice-fold-batch-norm")
def test_choice_fold(benchmark, streets_batch):
    """ConvBNReLU at inference: the batch norm folded into the conv (and, on the sparse twin,
    the ReLU in the conv's epilogue) vs conv -> BN -> ReLU as modules; both twins, the four
    alternating round by round (``extra_info``: medians and ``fold_speedup_<model>``)."""
    from spconv2d.zoo import blocks

    d, s = _model("unet"), _model("sparse_unet")

    def run(model, fold):
        def fn():
            blocks.FOLD_BATCH_NORM = fold
            try:
                return model(streets_batch)
            finally:
                blocks.FOLD_BATCH_NORM = True
        return fn

    fns = {f"{name}-{'folded' if fold else 'modules'}": run(m, fold)
           for name, m in (("unet", d), ("sparse_unet", s)) for fold in (True, False)}
    with torch.no_grad():
        med = _alternating(fns, 31)
    benchmark.extra_info.update(threads=torch.get_num_threads(), alternating_rounds=31,
                                **{f"{k}_ms": 1e3 * v for k, v in med.items()},
                                fold_speedup_unet=med["unet-modules"] / med["unet-folded"],
                                fold_speedup_sparse_unet=med["sparse_unet-modules"] / med["sparse_unet-folded"])
    with torch.no_grad():
        benchmark.pedantic(fns["sparse_unet-folded"], rounds=5, iterations=1, warmup_rounds=1)


@pytest.mark.benchmark(group="choice-mask-threshold")
@pytest.mark.parametrize("form", ["radix select (fused.top_fraction)", "kthvalue"])
def test_choice_threshold(benchmark, streets_batch, form):
    """The residual mask's threshold on a streets batch (each image's k-th largest energy at
    30 %, and the comparison): the numba radix select vs ``kthvalue`` (the same mask)."""
    pytest.importorskip("numba")
    from spconv2d.zoo import fused
    from spconv2d.zoo.masks import coarse_approximation

    energy = fused.residual_ridge_energy(streets_batch, coarse_approximation(streets_batch))
    flat = energy.view(energy.shape[0], -1)
    k = round(0.3 * flat.shape[1])
    if form.startswith("radix"):
        fn = lambda: fused.top_fraction(energy, k)  # noqa: E731
    else:
        def fn():
            return (flat >= flat.kthvalue(flat.shape[1] - k + 1, dim=1, keepdim=True).values).view_as(energy)
    _run(benchmark, fn, rounds=50)

