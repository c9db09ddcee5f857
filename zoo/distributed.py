"""Training on several processes with PyTorch's own engine (``torchrun``, DDP): the process
group, the samplers that split the data, synchronised batch norm, and the reductions.

    torchrun --nproc-per-node 2 -m spconv2d.zoo.cli train sparse_unet --data streets

``train()`` calls ``setup`` (joins the process group torchrun describes, gloo on the CPU, NCCL on
CUDA), wraps the model with ``wrap_model`` (synchronised batch norm, then
``DistributedDataParallel``), draws its batches with ``train_sampler`` (one permutation of the
data set per epoch, seeded by ``seed + epoch``, interleaved over the processes, as
``DistributedSampler`` does) and evaluates a ``ShardBatchSampler`` share per process, summing
the results with ``all_reduce``. With one process every function here is the identity (or a
no-op), so one code path serves both.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DistributedSampler, Sampler

import spconv2d as sp

from .device import resolve_device

log = logging.getLogger("spconv2d.zoo")


@dataclass(frozen=True)
class Processes:
    """Who this process is among the run's processes (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: Optional[str] = None  # gloo | nccl, None for one process

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs and writes the run's files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    """Whether the launcher's variables (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``) are set, as
    ``torchrun`` / ``torch.distributed.run`` set them for each process."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def env_rank() -> int:
    """This process's rank as the launcher states it (0 when not launched by torchrun)."""
    return int(os.environ.get("RANK", 0)) if launched_by_torchrun() else 0


def _local() -> tuple:
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return local_rank, local_world


def setup(device: str = "auto") -> tuple:
    """``(Processes, torch.device, created)`` for a run on ``device`` (``resolve_device``'s names).

    * A process group already initialised (by the caller): it is used as it is.
    * Launched by torchrun with ``WORLD_SIZE`` > 1: the process joins the group its variables
      describe (``env://``), NCCL when the device is CUDA (``cuda:LOCAL_RANK``), gloo otherwise;
      ``created`` is True and ``teardown`` leaves it again.
    * Otherwise: one process, no group.
    """
    if dist.is_available() and dist.is_initialized():
        local_rank, local_world = _local()
        dev = resolve_device(device, local_rank)
        procs = Processes(dist.get_rank(), dist.get_world_size(), local_rank, local_world, dist.get_backend())
        return procs, dev, False
    if launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
        local_rank, local_world = _local()
        dev = resolve_device(device, local_rank)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend, init_method="env://", **({"device_id": dev} if dev.type == "cuda" else {}))
        procs = Processes(dist.get_rank(), dist.get_world_size(), local_rank, local_world, backend)
        return procs, dev, True
    return Processes(), resolve_device(device), False


def teardown(created: bool) -> None:
    """Leave the process group ``setup`` joined (``created``); a group the caller made stays."""
    if created and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def train_sampler(dataset, procs: Processes, seed: int) -> DistributedSampler:
    """The training order: per epoch (``set_epoch``) one permutation of the data set seeded by
    ``seed + epoch``, of which process ``r`` takes positions ``r, r + P, r + 2P, ...``.

    So a step's *global* batch (the union of the processes' batches of ``b`` items) is the same
    ``P * b`` consecutive positions of the same permutation whatever the number of processes
    ``P``: one process with batch ``P * b`` sees the same global batches as ``P`` processes with
    batch ``b`` (``DistributedSampler`` pads the permutation with its first items to a multiple
    of ``P``)."""
    return DistributedSampler(dataset, num_replicas=procs.world_size, rank=procs.rank, shuffle=True, seed=seed)


class ShardBatchSampler(Sampler):
    """Process ``rank``'s batches of ``range(n)`` for an evaluation: the one-process batches
    ``[0, b), [b, 2b), ...`` dealt out in turns (batch ``k`` to process ``k mod P``), without the
    padding ``DistributedSampler`` adds. The shares partition the split, so the sums over the
    processes count every item once; and each batch is exactly a batch of a one-process
    evaluation with the same batch size, so a model whose output depends on the batch it is in
    (``sparse_unet`` caps its refinement at a fraction of the batch's pixels) computes the same
    predictions either way."""

    def __init__(self, n: int, batch_size: int, procs: Processes):
        self.n, self.batch_size, self.rank, self.world_size = int(n), int(batch_size), procs.rank, procs.world_size

    def __iter__(self) -> Iterator[list]:
        for start in range(self.rank * self.batch_size, self.n, self.world_size * self.batch_size):
            yield list(range(start, min(self.n, start + self.batch_size)))

    def __len__(self) -> int:
        return len(range(self.rank * self.batch_size, self.n, self.world_size * self.batch_size))


# --------------------------------------------------------------------------------------------
# reductions
# --------------------------------------------------------------------------------------------
def all_reduce(values, op: str = "sum") -> torch.Tensor:
    """``values`` (a tensor or a sequence of numbers) reduced over the processes (``sum`` or
    ``max``) as a float64 CPU tensor; unchanged with one process. Works on gloo and NCCL (the
    reduction runs on the current CUDA device under NCCL)."""
    t = torch.as_tensor(values, dtype=torch.float64).clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        t = t.to(on)
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        t = t.cpu()
    return t


def broadcast_buffers(model: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (batch-norm running statistics) to every process, so that an
    evaluation split over the processes evaluates one model. With synchronised batch norm they
    are already equal; without it each process tracked its own batches' statistics."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    for b in model.buffers():
        dist.broadcast(b.data, src)


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------
class DenseSyncBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training statistics are those of every pixel of every process,
    for the CPU, where ``nn.SyncBatchNorm`` refuses to run. The dense map is a ``SparseTensor``
    with every pixel active, normalised by ``sp.functional.sync_batch_norm`` (per-channel sums and
    counts all-reduced, differentiably). Same parameters, buffers and ``state_dict`` as
    ``nn.BatchNorm2d``; outside training, or without a group of several processes, it is one."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self.process_group) > 1):
            return super().forward(x)
        self._check_input_dim(x)
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        B, _, H, W = x.shape
        s = sp.SparseTensor.from_dense(x, torch.ones(B, H, W, dtype=torch.bool, device=x.device))
        y = sp.functional.sync_batch_norm(s, self.running_mean, self.running_var, self.weight, self.bias,
                                          self.momentum, self.eps, self.process_group, self.num_batches_tracked)
        return y.to_dense()

    @classmethod
    def from_batch_norm(cls, bn: nn.BatchNorm2d, process_group=None) -> "DenseSyncBatchNorm2d":
        """A ``DenseSyncBatchNorm2d`` sharing ``bn``'s parameters and buffers."""
        sync = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, process_group)
        if bn.affine:
            sync.weight, sync.bias = bn.weight, bn.bias
        sync.running_mean, sync.running_var = bn.running_mean, bn.running_var
        sync.num_batches_tracked = bn.num_batches_tracked
        sync.train(bn.training)
        return sync


def convert_sync_batchnorm(model: nn.Module, device: torch.device, process_group=None) -> nn.Module:
    """``model`` with every batch norm synchronised over the processes (in place, like
    ``nn.SyncBatchNorm.convert_sync_batchnorm``; parameters, buffers and state_dict keys kept):

    * ``sp.nn.SparseBatchNorm2d`` -> ``sp.nn.SparseSyncBatchNorm2d`` (statistics of the active
      sites of every process);
    * the dense ``nn.BatchNorm2d`` (e.g. ``sparse_unet``'s context head, every BN of ``unet``)
      -> ``nn.SyncBatchNorm`` on CUDA, ``DenseSyncBatchNorm2d`` on other devices.

    ``nn.SyncBatchNorm.convert_sync_batchnorm`` is applied to dense layers one by one, never to
    the model: it converts every subclass of PyTorch's batch-norm base, the sparse layers (a
    ``SparseBatchNorm2d`` is an ``nn.BatchNorm1d`` on the features) included, which would make
    them dense layers that cannot take a ``SparseTensor``."""
    model = sp.nn.SparseSyncBatchNorm2d.convert_sync_batchnorm(model, process_group)
    dense = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

    def convert(module: nn.Module) -> nn.Module:
        if isinstance(module, sp.nn.SparseBatchNorm2d) or isinstance(module, (nn.SyncBatchNorm, DenseSyncBatchNorm2d)):
            return module
        if isinstance(module, dense):
            if device.type == "cuda":
                return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
            if isinstance(module, nn.BatchNorm2d):
                return DenseSyncBatchNorm2d.from_batch_norm(module, process_group)
            log.warning("%s is not synchronised on %s (nn.SyncBatchNorm needs CUDA)", type(module).__name__,
                        device.type)
            return module
        for name, child in module.named_children():
            new = convert(child)
            if new is not child:
                setattr(module, name, new)
        return module

    return convert(model)


def wrap_model(model: nn.Module, procs: Processes, device: torch.device, sync_bn: bool = True) -> nn.Module:
    """The module that trains: ``model`` itself for one process; with several, its batch norms
    synchronised (``sync_bn``, ``convert_sync_batchnorm``) and the whole wrapped in
    ``DistributedDataParallel`` (gradients averaged over the processes during ``backward``;
    ``broadcast_buffers`` only without synchronised batch norm, whose buffers stay equal).
    ``unwrap`` gives ``model`` back (the same object, converted in place)."""
    if not procs.distributed:
        return model
    if sync_bn:
        convert_sync_batchnorm(model, device)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=not sync_bn)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper (or ``model`` itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
