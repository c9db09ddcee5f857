"""One thread: the numba kernels' serial compilations against their ``parallel=True`` ones run on
one thread (what every launch did before ``runtime.ParallelKernel``), alternating round by round
in one process on trained zoo models.

    python bench/serial_vs_parallel.py [--rounds 15]

Needs the seed-0 run ``runs/sparse_unet-streets`` (``spconv2d train sparse_unet --data streets``)
and a ``sparse_cnn`` run under ``runs/study/`` (``spconv2d study``). A diagnostic script, like
``steps_zoo.py``; its numbers are quoted in docs/ARCHITECTURE.md, "Measured choices".
"""
import argparse
import glob
import statistics
import time

import numba
import torch

from spconv2d.backends.numba_kernels import runtime
from spconv2d.zoo.data import build_dataset
from spconv2d.zoo.engine import load_model

SERIAL = runtime.ParallelKernel.compiled


def parallel_on_one_thread(self, threads):
    """The previous behaviour: the ``parallel=True`` compilation, on one numba thread."""
    numba.set_num_threads(1)
    return SERIAL(self, 2)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(1)
    sparse_unet = load_model("runs/sparse_unet-streets")[0]
    sparse_cnn = load_model(sorted(glob.glob("runs/study/sparse_cnn-mnist-*"))[0])[0]
    scenes = build_dataset("streets", "val", num_samples=16).images[:16]
    digits = build_dataset("mnist", "val")
    cases = {"sparse_unet, batch 16": (sparse_unet, scenes),
             "sparse_cnn, batch 1": (sparse_cnn, torch.stack([digits[0][0]])),
             "sparse_cnn, batch 64": (sparse_cnn, torch.stack([digits[i][0] for i in range(64)]))}
    variants = {"parallel": parallel_on_one_thread, "serial": SERIAL}
    times = {(case, v): [] for case in cases for v in variants}
    with torch.no_grad():
        for r in range(args.rounds + 3):  # 3 warm-up rounds (compilation)
            order = list(variants.items()) if r % 2 == 0 else list(variants.items())[::-1]
            for v, compiled in order:
                runtime.ParallelKernel.compiled = compiled
                for case, (model, x) in cases.items():
                    t0 = time.perf_counter()
                    model(x)
                    if r >= 3:
                        times[(case, v)].append(time.perf_counter() - t0)
    runtime.ParallelKernel.compiled = SERIAL
    for case in cases:
        p, s = (statistics.median(times[(case, v)]) for v in variants)
        print(f"{case}: parallel compilation on 1 thread {p * 1e3:.2f} ms, serial {s * 1e3:.2f} ms, "
              f"speed-up {p / s:.2f}x")


if __name__ == "__main__":
    main()
