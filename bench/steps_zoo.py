"""Where a ``sparse_unet`` batch goes: per-step wall times next to ``unet``, the two models
alternating round by round, the order reversed every other round (so that a drifting machine
slows both alike and neither always runs after the other).

    python bench/steps_zoo.py [--threads 2] [--rounds 15] [--density 0.3] [--batch 16] [--size 64 128]
                              [--no-refine] [--ops]

A diagnostic, not a benchmark (``bench_zoo.py`` is the benchmark): steps are timed by wrapping
the public steps of ``SparseUNet.forward`` (its docstring lists them: ``make_mask``, the
submodules, ``context``, ``cell_states``, ``assemble``, ``refine_uncertain``) on the
instance (``spconv2d.zoo.measure.instrument_stages``, also used by ``spconv2d study``), so the
total includes a little overhead.
``--ops`` also times every sparse op of one forward with ``sp.profile(timing=True)`` (median over
the rounds): which convolutions the sparse stages' time is in, and how it scales with threads.
``--batch 1`` shows the fixed per-step costs (at batch 1 they are most of the time).
The last line is the ceiling of the speed-up at this density: ``unet``'s time over that of
``sparse_unet``'s layers alone (its conv steps ``enc0`` ... ``head`` and the dense context
head), i.e. the ratio if the mask, the cell states, the output assembly, the refinement and the
glue between the layers cost nothing.
Weights come from ``runs/<model>-streets/model.safetensors`` when present (how much the sparse
model refines depends on them).
"""
import argparse
import os
import statistics
import time
from collections import defaultdict

import torch

import spconv2d as sp
import spconv2d.zoo as zoo
from spconv2d.zoo.data import build_dataset
from spconv2d.zoo.measure import instrument_stages


#: the steps that are layers of the network (the twins share them); the rest of ``forward`` is
#: what the sparse twin adds around them
LAYER_STEPS = ("enc0", "down1", "enc1", "down2", "enc2", "dense context head", "up2", "dec1", "up1", "dec0", "head")


def load(name, **kw):
    model = zoo.create_model(name, **kw).eval()
    path = os.path.join("runs", f"{name}-streets", "model.safetensors")
    if os.path.isfile(path):
        from safetensors.torch import load_file

        model.load_state_dict(load_file(path))
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--density", type=float, default=0.3)
    ap.add_argument("--batch", type=int, default=16, help="images per batch (streets val scenes)")
    ap.add_argument("--size", type=int, nargs=2, default=(64, 128), metavar=("H", "W"),
                    help="scene size (the goals: 64 128 at batch 16, 256 512 at batch 4)")
    ap.add_argument("--no-refine", action="store_true", help="sparse_unet(refine=False)")
    ap.add_argument("--ops", action="store_true", help="also time each sparse op (sp.profile)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    images = build_dataset("streets", "val", num_samples=args.batch, size=tuple(args.size)).images
    dense, sparse = load("unet"), load("sparse_unet", density=args.density, refine=not args.no_refine)
    steps, total = defaultdict(list), defaultdict(list)
    with torch.no_grad():
        for _ in range(2):
            dense(images), sparse(images)
        instrument_stages(sparse, steps)
        for r in range(args.rounds):  # the order reversed every other round (allocator state)
            for name, model in ((("unet", dense), ("sparse_unet", sparse)) if r % 2 == 0 else
                                (("sparse_unet", sparse), ("unet", dense))):
                t0 = time.perf_counter()
                model(images)
                total[name].append(time.perf_counter() - t0)
    ms = {k: 1e3 * statistics.median(v) for k, v in total.items()}
    print(f"batch {args.batch} x 3 x {args.size[0]} x {args.size[1]}, {args.threads} thread(s), medians of {args.rounds} alternating rounds: "
          f"unet {ms['unet']:.1f} ms, sparse_unet {ms['sparse_unet']:.1f} ms "
          f"(unet / sparse_unet = {ms['unet'] / ms['sparse_unet']:.2f})")
    step_ms = {k: 1e3 * statistics.median(v) for k, v in steps.items()}
    print("sparse_unet steps (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in step_ms.items()))
    layers = sum(step_ms[k] for k in LAYER_STEPS)
    print(f"sparse_unet's layers alone ({' + '.join(LAYER_STEPS)}): {layers:.1f} ms; the rest "
          f"{ms['sparse_unet'] - layers:.1f} ms; ceiling at zero cost for the rest: "
          f"unet / layers = {ms['unet'] / layers:.2f}")
    if args.ops:
        ops = defaultdict(list)
        with torch.no_grad():
            for _ in range(args.rounds):
                with sp.profile(timing=True) as prof:
                    sparse(images)
                for i, r in enumerate(prof.records):
                    ops[i].append(r)
        total_ops = sum(statistics.median(r.seconds for r in rs) for rs in ops.values())
        print(f"sparse ops of one forward: {len(ops)}, {1e3 * total_ops:.1f} ms in all (medians)")
        for i, rs in ops.items():
            r = rs[0]
            print(f"  {i:2d} {r.op:16s} {r.path:6s} {r.c_in:3d}->{r.c_out:<3d} sites {r.n_in:6d}->{r.n_out:<6d} "
                  f"pairs {r.pairs or 0:7d}  {1e3 * statistics.median(q.seconds for q in rs):6.2f} ms")


if __name__ == "__main__":
    main()
