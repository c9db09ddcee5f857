"""The numba kernels' first-call cost: a fresh process runs ``sparse_unet`` (random weights) on a
batch of 16 streets-sized images, twice in a row — once with an empty numba cache (``cold``: every
kernel the forward needs is compiled) and once more with the cache it left (``warm``).

    python bench/first_call.py [--threads 2]

Each run is its own Python process with ``NUMBA_CACHE_DIR`` pointing at a new temporary folder,
so the project's own ``__pycache__`` is neither read nor written. The README quotes its output.
"""
import argparse
import os
import subprocess
import sys
import tempfile

CHILD = """
import sys, time
t0 = time.perf_counter()
import torch
import spconv2d.zoo as zoo
torch.set_num_threads(int(sys.argv[1]))
model = zoo.create_model("sparse_unet").eval()
x = torch.rand(16, 3, 64, 128)
t1 = time.perf_counter()
with torch.no_grad():
    model(x)
    t2 = time.perf_counter()
    model(x)
t3 = time.perf_counter()
print(f"import + model {t1 - t0:.2f} s, first batch {t2 - t1:.2f} s, second batch {t3 - t2:.3f} s")
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for run in ("cold", "warm"):
            out = subprocess.run([sys.executable, "-c", CHILD, str(args.threads)], env=env, check=True,
                                 capture_output=True, text=True)
            print(f"{run}: {out.stdout.strip()}")


if __name__ == "__main__":
    main()
