"""Model-zoo inference benchmarks: dense vs sparse twins, side by side, same inputs.

    BENCH_THREADS=2 python -m pytest bench/bench_zoo.py --benchmark-group-by=group \
        --benchmark-json=bench/results/zoo_2thread_run1.json

On a VM whose speed drifts, run it a few times in a row and compare the runs' medians (docs/ZOO.md
quotes the median of three runs' medians and the fastest round).

Groups
    unet-streets-64x128-b16   unet | sparse_unet (mask given) | sparse_unet (mask policy included)
                              at densities 0.1 / 0.25 / 0.3 | sparse_unet 0.3 without the
                              refinement of uncertain pixels (refine=False); eval mode, no grad
    cnn-mnist-b256            cnn | sparse_cnn (active = non-zero pixels)
Weights come from runs/<model>-<data>/model.safetensors when present, otherwise random init. Use
trained weights for sparse_unet: how many pixels it refines depends on how certain the model is
(an untrained one hits the refine_fraction cap and guides every cell). ``extra_info`` records density, threads and parameters.
"""
import os

import pytest
import torch

import spconv2d.zoo as zoo
from spconv2d.zoo.data import build_dataset
from spconv2d.zoo.engine import auto_threads
from spconv2d.zoo.masks import measured_density

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
    mask = m.policy(streets_batch)  # the model's own policy, computed outside the timing
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
