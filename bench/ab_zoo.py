"""``sparse_unet`` of an earlier commit next to today's, in one process, alternating round by round.

    python bench/ab_zoo.py --base 90e997e [--threads 2] [--mode infer|big|train] [--rounds 15]
                           [--batch N] [--json out.json]

On a shared VM the speed of separate invocations drifts by more than most changes are worth (the
same ``unet`` batch took 220-330 ms on one thread within an hour), so a change is judged here:
``unet`` (today's code), ``sparse_unet`` at ``--base`` and today's ``sparse_unet`` run one after
the other in every round (the order reversed every other round), on the same batch, with the
trained weights of ``runs/<model>-streets/``; printed: the medians and the medians of the
round-by-round ratios. ``--mode``: ``infer`` (batch 16 of 64x128, no grad), ``big`` (batch 4 of
256x512) or ``train`` (a training step: forward with the aux output, the zoo's loss
(``engine.criterion``, each version its own), backward, AdamW, as ``bench_zoo.py -k goal``);
``--batch`` changes the batch size (e.g. 1: where the fixed per-forward costs show).

The base commit's ``spconv2d``, ``zoo`` and ``kernels`` are extracted with ``git archive`` into
a temporary folder and imported as the package ``spconv2d_base`` (every ``spconv2d`` word of its
sources renamed), so both versions live side by side; its numba kernels compile into that
folder's own cache on first use (the warm-up rounds). A diagnostic for the docs' "this session
vs its start" numbers, not a benchmark of the library.
"""
import argparse
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

import torch


def extract_base(commit: str, root: str) -> str:
    """``commit``'s package as ``spconv2d_base`` under ``root``; returns the folder to put on
    ``sys.path``."""
    tar = subprocess.run(["git", "archive", "--format=tar", commit, "spconv2d", "zoo", "kernels"],
                         check=True, capture_output=True).stdout
    src = os.path.join(root, "src")
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(src, filter="data")
    pkg = os.path.join(root, "spconv2d_base")
    os.rename(os.path.join(src, "spconv2d"), pkg)
    os.rename(os.path.join(src, "zoo"), os.path.join(pkg, "zoo"))
    os.rename(os.path.join(src, "kernels"), os.path.join(pkg, "kernels"))
    word = re.compile(r"\bspconv2d\b")
    for folder, _, files in os.walk(pkg):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path) as f:
                    text = f.read()
                with open(path, "w") as f:
                    f.write(word.sub("spconv2d_base", text))
    return root


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the earlier commit (any git revision)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mode", choices=("infer", "big", "train"), default="infer")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--batch", type=int, help="images per batch (default: 16 for infer and train, 4 for big)")
    ap.add_argument("--json", help="write the medians and ratios here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        sys.path.insert(0, extract_base(args.base, tmp))
        import spconv2d_base.zoo as zoo_base
        import spconv2d.zoo as zoo
        from safetensors.torch import load_file
        from spconv2d.zoo.data import build_dataset

        def load(z, name, **kw):
            m = z.create_model(name, **kw)
            path = os.path.join("runs", f"{name}-streets", "model.safetensors")
            if os.path.isfile(path):
                m.load_state_dict(load_file(path))
            return m

        models = {"unet": load(zoo, "unet"), "base": load(zoo_base, "sparse_unet"), "now": load(zoo, "sparse_unet")}
        if args.mode == "train":
            data = build_dataset("streets", "train", num_samples=args.batch or 16)
            x, y = data.images, data.targets
            opts = {k: torch.optim.AdamW(m.train().parameters(), lr=1e-4) for k, m in models.items()}
            from spconv2d.zoo.engine import criterion
            import spconv2d_base.zoo.engine as engine_base
            # each side with its own version's training loss (the zoo's, aux weight 0.4)
            losses = {"unet": criterion("segmentation", 0.4), "now": criterion("segmentation", 0.4),
                      "base": engine_base.criterion("segmentation", 0.4)}

            def call(k):
                loss = losses[k](models[k](x, return_aux=True), y)
                opts[k].zero_grad(set_to_none=True)
                loss.backward()
                opts[k].step()
        else:
            n, size = (16, (64, 128)) if args.mode == "infer" else (4, (256, 512))
            n = args.batch or n
            images = build_dataset("streets", "val", num_samples=n, size=size).images
            for m in models.values():
                m.eval()

            def call(k):
                with torch.no_grad():
                    models[k](images)

        times = {k: [] for k in models}
        names = list(models)
        for r in range(args.rounds + 2):  # two warm-up rounds (compilation)
            for k in (names if r % 2 == 0 else names[::-1]):
                t0 = time.perf_counter()
                call(k)
                if r >= 2:
                    times[k].append(time.perf_counter() - t0)
    med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    ratio = {f"{a}/{b}": statistics.median([p / q for p, q in zip(times[a], times[b])])
             for a, b in (("unet", "base"), ("unet", "now"), ("base", "now"))}
    print(f"{args.mode}{'' if args.batch is None else f' batch {args.batch}'}, {args.threads} thread(s), {args.rounds} rounds, base {args.base}: "
          + ", ".join(f"{k} {v:.1f} ms" for k, v in med.items()) + " | "
          + ", ".join(f"{k} {v:.2f}" for k, v in ratio.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(base=args.base, mode=args.mode, batch=args.batch, threads=args.threads, rounds=args.rounds,
                           median_ms=med, median_ratio=ratio), f, indent=1)


if __name__ == "__main__":
    main()
