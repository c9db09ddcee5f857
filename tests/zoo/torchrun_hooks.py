"""Launched by ``test_distributed.py`` under ``torchrun``: one process of a zoo run, instrumented.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/zoo/torchrun_hooks.py SPEC

``SPEC`` (JSON): ``out`` (the run folder), ``log`` (a file prefix: this process appends its
events to ``<log>.rank<R>``), ``fail`` (optional ``[rank, epoch]``: that rank raises when that
epoch starts), and either ``train`` (keyword arguments of ``spconv2d.zoo.train``) or ``cli`` (the
``spconv2d`` command's arguments, run as ``python -m spconv2d.zoo.cli`` runs them).

An audit hook (``sys.addaudithook``) records every file this process opens for writing, renames
or removes under ``out``: Python's own events, so the record does not depend on which zoo
function writes. Each event is written and flushed at once, so the record survives the process
being stopped by the launcher.
"""
import json
import os
import runpy
import sys

spec = json.loads(sys.argv[1])
rank = int(os.environ["RANK"])
out = os.path.realpath(spec["out"]) + os.sep
record = open(f"{spec['log']}.rank{rank}", "a", buffering=1)  # opened before the hook is installed


def _under_out(path) -> bool:
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    return isinstance(path, str) and os.path.realpath(path).startswith(out)


def _audit(event, args):
    if event == "open":
        path, mode, flags = args
        writing = (mode is not None and any(c in mode for c in "wax+")) or (
            mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if writing and _under_out(path):
            record.write(json.dumps(["open", os.fsdecode(path)]) + "\n")
    elif event in ("os.rename", "os.remove", "os.unlink"):
        if _under_out(args[0]) or (event == "os.rename" and _under_out(args[1])):
            record.write(json.dumps([event] + [os.fsdecode(a) for a in args[:2] if isinstance(a, (str, bytes))]) + "\n")


sys.addaudithook(_audit)

if spec.get("fail"):
    from spconv2d.zoo import engine

    fail_rank, fail_epoch = spec["fail"]
    real = engine.train_one_epoch

    def train_one_epoch(*args, **kw):
        if rank == fail_rank and kw["epoch"] + 1 == fail_epoch:
            raise RuntimeError(f"injected failure on rank {rank} in epoch {fail_epoch}")
        return real(*args, **kw)

    engine.train_one_epoch = train_one_epoch

if "train" in spec:
    import spconv2d.zoo as zoo

    zoo.train(**spec["train"])
else:
    sys.argv = ["spconv2d"] + spec["cli"]
    runpy.run_module("spconv2d.zoo.cli", run_name="__main__", alter_sys=True)
