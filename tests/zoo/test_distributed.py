"""Training on several processes: two CPU processes (gloo, on localhost) against one.

* samplers: the global batches do not depend on the number of processes; the evaluation shards
  partition the split;
* the batch-norm converter: sparse layers -> SparseSyncBatchNorm2d, dense ones -> nn.SyncBatchNorm
  (CUDA) / DenseSyncBatchNorm2d (CPU), nothing else touched;
* two spawned processes: a sharded evaluation equals one process's; dense and sparse synchronised
  batch norm over an uneven split of a batch equal one process's batch norm on the whole batch;
* torchrun: two processes train like one process on the same global batch, a failure on one rank
  stops both (error shown, no hang), only rank 0 writes, and the run resumes under torchrun.
"""
import json
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.utils.data import DataLoader

import spconv2d as sp
import spconv2d.zoo as zoo
from spconv2d.zoo import distributed, engine
from spconv2d.zoo.checkpoint import load_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))


# ------------------------------------------------------------------------------------ samplers
@pytest.mark.parametrize("n", [12, 13])
def test_global_batches_do_not_depend_on_the_number_of_processes(n):
    """Process r takes positions r, r+P, ... of one permutation per epoch, so the union of the P
    processes' step-k batches of b items is the one process's step-k batch of P*b items."""
    data = list(range(n))
    for epoch in range(3):
        one = distributed.train_sampler(data, distributed.Processes(), seed=5)
        one.set_epoch(epoch)
        single = list(DataLoader(data, batch_size=4, sampler=one, drop_last=True))
        per_rank = []
        for rank in range(2):
            s = distributed.train_sampler(data, distributed.Processes(rank, 2), seed=5)
            s.set_epoch(epoch)
            per_rank.append(list(DataLoader(data, batch_size=2, sampler=s, drop_last=True)))
        assert len(per_rank[0]) == len(per_rank[1]) == len(single)
        for k, batch in enumerate(single):
            assert sorted(per_rank[0][k].tolist() + per_rank[1][k].tolist()) == sorted(batch.tolist())
    assert one.seed == 5


@pytest.mark.parametrize("n,p", [(5, 2), (7, 3), (1, 2), (0, 2)])
def test_evaluation_shards_are_the_one_process_batches_dealt_out(n, p):
    one = list(distributed.ShardBatchSampler(n, 2, distributed.Processes()))
    assert one == [list(range(i, min(n, i + 2))) for i in range(0, n, 2)]
    shards = [list(distributed.ShardBatchSampler(n, 2, distributed.Processes(r, p))) for r in range(p)]
    assert sorted(b for s in shards for b in s) == one  # a partition of the same batches
    assert [len(distributed.ShardBatchSampler(n, 2, distributed.Processes(r, p))) for r in range(p)] == \
        [len(s) for s in shards]


# ------------------------------------------------------------------------- batch-norm converter
@pytest.mark.parametrize("device", ["cpu", "cuda"], ids=["cpu-layers", "gpu-layers"])  # no CUDA needed
def test_converter_synchronises_sparse_and_dense_batch_norm_separately(device):
    """A SparseBatchNorm2d is an nn.BatchNorm1d on the features, so nn.SyncBatchNorm's own converter
    would make it a dense layer; the zoo's converts the sparse and the dense layers apart. (With
    device "cuda" only the modules are built: nothing runs.)"""
    torch.manual_seed(0)
    model = zoo.create_model("sparse_unet", width=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n_sparse = sum(isinstance(m, sp.nn.SparseBatchNorm2d) for m in model.modules())
    n_dense = sum(type(m) is nn.BatchNorm2d for m in model.modules())
    assert n_sparse > 0 and n_dense > 0  # the context head is dense

    naive = nn.SyncBatchNorm.convert_sync_batchnorm(zoo.create_model("sparse_unet", width=8))
    assert not any(isinstance(m, sp.nn.SparseBatchNorm2d) for m in naive.modules())  # why it is not used

    converted = distributed.convert_sync_batchnorm(model, torch.device(device))
    dense_cls = nn.SyncBatchNorm if device == "cuda" else distributed.DenseSyncBatchNorm2d
    assert sum(type(m) is sp.nn.SparseSyncBatchNorm2d for m in converted.modules()) == n_sparse
    assert sum(type(m) is dense_cls for m in converted.modules()) == n_dense
    assert not any(type(m) in (nn.BatchNorm2d, sp.nn.SparseBatchNorm2d) for m in converted.modules())
    after = converted.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


# ------------------------------------------------------------------- two spawned processes
def _eval_setup():
    torch.manual_seed(0)
    model = zoo.create_model("sparse_unet", width=8).eval()
    ds = zoo.build_dataset("streets", "val", num_samples=5, size=(32, 64))
    return model, ds


def _evaluate(model, loader):
    return engine.evaluate(model, loader, task="segmentation", num_classes=19, device="cpu",
                           class_names=zoo.data.CITYSCAPES_CLASSES, eval_classes=zoo.data.STREET_CLASSES)


class _TwoNorms(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense, self.sparse = nn.BatchNorm2d(3, momentum=0.3), sp.nn.SparseBatchNorm2d(3, momentum=0.3)
        with torch.no_grad():
            for bn in (self.dense, self.sparse):
                bn.weight.uniform_(0.5, 2), bn.bias.uniform_(-1, 1)

    def forward(self, x, mask):
        return self.dense(x), self.sparse(sp.SparseTensor.from_dense(x, mask)).features


def _norm_data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 5, 6, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 5, 6, generator=g) < 0.4
    gd, gs = torch.randn(4, 3, 5, 6, generator=g, dtype=torch.float64), torch.randn(int(mask.sum()), 3, generator=g,
                                                                                    dtype=torch.float64)
    return x, mask, gd, gs


def _norm_step(model, x, mask, gd, gs):
    x = x.clone().requires_grad_()
    d, s = model(x, mask)
    ((d * gd).sum() + (s * gs).sum()).backward()
    return {"d": d.detach(), "s": s.detach(), "gx": x.grad, **{k: v.detach().clone() for k, v in model.state_dict().items()},
            **{k + ".grad": p.grad for k, p in model.named_parameters()}}


def _spawned(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        procs = distributed.Processes(rank, 2)
        model, ds = _eval_setup()  # 5 scenes in batches of 2: rank 0 evaluates [0, 1] and [4], rank 1 [2, 3]
        res = _evaluate(model, DataLoader(ds, batch_sampler=distributed.ShardBatchSampler(len(ds), 2, procs)))
        torch.manual_seed(0)
        norms = distributed.convert_sync_batchnorm(_TwoNorms().double(), torch.device("cpu"))
        assert type(norms.dense) is distributed.DenseSyncBatchNorm2d
        x, mask, gd, gs = _norm_data()
        keep = slice(0, 1) if rank == 0 else slice(1, 4)  # uneven: one image, three images
        rows = int(mask[:keep.start].sum())
        n = int(mask[keep].sum())
        step = _norm_step(norms.train(), x[keep], mask[keep], gd[keep], gs[rows:rows + n])
        torch.save({"eval": res, "norms": step}, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # both processes done before either tears the group down
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_spawned_processes_sharded_evaluation_and_synchronised_batch_norm(tmp_path):
    mp.spawn(_spawned, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r = [torch.load(tmp_path / f"rank{i}.pt", weights_only=False) for i in range(2)]

    model, ds = _eval_setup()
    one = _evaluate(model, DataLoader(ds, batch_size=2))
    for rank in range(2):  # every process returns the figures of the whole split
        two = r[rank]["eval"]
        assert two["images"] == one["images"] == 5
        assert two["miou"] == one["miou"] and two["pixel_accuracy"] == one["pixel_accuracy"]
        assert two["per_class_iou"] == one["per_class_iou"]
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
        assert two["density"] == pytest.approx(one["density"], rel=1e-12)

    torch.manual_seed(0)
    x, mask, gd, gs = _norm_data()
    ref = _norm_step(_TwoNorms().double().train(), x, mask, gd, gs)
    n0 = int(mask[:1].sum())
    a, b = r[0]["norms"], r[1]["norms"]
    torch.testing.assert_close(torch.cat([a["d"], b["d"]]), ref["d"])
    torch.testing.assert_close(torch.cat([a["s"], b["s"]]), ref["s"])
    torch.testing.assert_close(torch.cat([a["gx"], b["gx"]]), ref["gx"])
    assert ref["s"].shape[0] == n0 + b["s"].shape[0]
    for k in ("dense.running_mean", "dense.running_var", "sparse.running_mean", "sparse.running_var"):
        torch.testing.assert_close(a[k], ref[k], msg=k)
        torch.testing.assert_close(b[k], ref[k], msg=k)
    for k in ("dense.weight.grad", "dense.bias.grad", "sparse.weight.grad", "sparse.bias.grad"):
        torch.testing.assert_close(a[k] + b[k], ref[k], msg=k)  # each process holds its share


# ---------------------------------------------------------------------------------- torchrun
TINY = dict(model="sparse_cnn", data="mnist", num_train=64, num_val=31, epochs=3, lr=1e-3, augment=False,
            model_kwargs={"width": 8, "drop": 0.0}, num_predictions=2, progress=False)


def _torchrun(spec, timeout=240):
    """``torchrun --standalone --nproc-per-node 2 torchrun_hooks.py SPEC``: (exit code, output, seconds)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--monitor-interval", "0.2", os.path.join(HERE, "torchrun_hooks.py"), json.dumps(spec)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::FutureWarning")
    t0 = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout, env=env)
    return p.returncode, p.stdout, time.perf_counter() - t0


def _events(log, rank):
    path = f"{log}.rank{rank}"
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def single_process_reference(tmp_path_factory):
    """The run on one process with the global batch (16), and its state after epoch 1."""
    out = tmp_path_factory.mktemp("one")
    states = {}
    real = engine.save_checkpoint

    def keep(path, model, optimizer, epoch, *a, **k):
        states[epoch] = {k2: v.detach().clone() for k2, v in model.state_dict().items()}
        return real(path, model, optimizer, epoch, *a, **k)

    engine.save_checkpoint = keep
    try:
        metrics = zoo.train(out=str(out), batch_size=16, **TINY)
    finally:
        engine.save_checkpoint = real
    return metrics, states


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_fail_together_write_on_rank0_and_resume(tmp_path, single_process_reference):
    """Two gloo processes with batch 8 each end with the weights of one process with batch 16.

    Why they are equal: the training order is one permutation per epoch (``seed + epoch``) that
    the processes take in turns, so each step's two batches of 8 are the one process's batch of
    16 (``test_global_batches_do_not_depend_on_the_number_of_processes``); the loss is a mean over
    images and each process holds the same number of images, so DDP's average of the two
    processes' gradients is the gradient of the mean over all 16; synchronised batch norm
    normalises with the statistics of all 16 images' active sites and updates the running
    statistics with them; and nothing else is random (no augmentation, no dropout, the same
    initialisation on both). What remains is the order of float sums, hence 1e-5, not 0.

    One launch: rank 1 raises when epoch 2 starts. torchrun stops rank 0 (which is waiting in a
    collective), exits non-zero with the error in its output, and the run folder holds the
    checkpoint of epoch 1, equal to the one process's after epoch 1. An audit hook in each
    process records the files it writes under the run folder: rank 1 wrote none.

    Second launch: ``spconv2d train ... --resume`` under torchrun finishes epochs 2 and 3; the
    final weights equal the uninterrupted one-process run's, the metrics state the processes
    and both batch sizes, and the sharded evaluation of 31 images (16 + 15) equals the one
    process's."""
    ref, ref_states = single_process_reference
    out, log = tmp_path / "run", str(tmp_path / "events")
    train = dict(TINY, out=str(out), batch_size=8)
    code, output, seconds = _torchrun({"out": str(out), "log": log, "fail": [1, 2], "train": train})
    assert code != 0, output
    assert "injected failure on rank 1 in epoch 2" in output, output[-3000:]
    assert seconds < 200  # stopped, not hung (the timeout would raise)
    ck = load_checkpoint(str(out / "checkpoint.safetensors"))
    assert ck["epoch"] == 1
    for k, v in ref_states[1].items():
        torch.testing.assert_close(ck["model_state"][k], v, rtol=0, atol=1e-5, msg=k)
    assert _events(log, 1) == []  # rank 1 wrote nothing
    replaced = {os.path.basename(e[2]) for e in _events(log, 0) if e[0] == "os.rename"}
    assert {"checkpoint.safetensors", "metrics.json"} <= replaced

    code, output, seconds = _torchrun({"out": str(out), "log": log, "cli": [
        "train", "sparse_cnn", "--out", str(out), "--resume", "--no-progress", "--threads", "1"]})
    assert code == 0, output[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert [e["epoch"] for e in m["epochs"]] == [1, 2, 3]
    assert m["run"]["processes"] == 2 and m["run"]["backend"] == "gloo" and m["run"]["sync_bn"]
    assert (m["run"]["batch_size_per_process"], m["run"]["global_batch_size"]) == (8, 16)
    assert "batch 8 per process, global batch 16" in output
    final = load_checkpoint(str(out / "model.safetensors"))["model_state"]
    for k, v in ref_states[3].items():
        torch.testing.assert_close(final[k], v, rtol=0, atol=1e-5, msg=k)
    assert m["final"]["images"] == ref["final"]["images"] == 31
    assert m["final"]["accuracy"] == ref["final"]["accuracy"]
    assert m["final"]["loss"] == pytest.approx(ref["final"]["loss"], abs=1e-5)
    assert _events(log, 1) == []
    written = {os.path.basename(e[-1]) for e in _events(log, 0)}
    assert {"model.safetensors", "predictions.png", "curves.png"} <= written
    assert [p.name for p in out.iterdir() if ".tmp" in p.name] == []
