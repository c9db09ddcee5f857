"""Measuring a zoo model: multiply-accumulates, per-level density, latency, per-stage time.

Used by the trade-off study (``study.py``) and ``bench/steps_zoo.py``.

* ``MacCounter`` — ``with MacCounter(model) as mc: model(images)`` counts what the model's layers
  compute: its dense layers (``nn.Conv2d``, ``nn.ConvTranspose2d``, ``nn.Linear``) through
  forward hooks (``layer_macs``: analytic, output positions x K x C_in/groups x C_out; a
  transposed conv, like ``sp.profile``, input positions x K x C_in x C_out/groups) and its
  sparse ops through ``sp.profile()`` (kernel-map pairs x C_in x C_out on the sparse path; the
  dense twin's count of each layer alongside). ``mc.summary(images=N)`` gives the counts per
  image and the measured density of every level of the network. The same helper counts a dense
  model and its sparse twin, so ``dense_macs`` of the twins agree (tested). Not counted: the
  activity mask, the inactive pixels' guided upsampling and refinement, BN, pooling — they are
  in the latency, not in the MACs.
* ``time_alternating`` — one forward per model per round, the models alternating round by round
  (the order reversed every other round) so that a drifting machine slows all alike; CUDA
  events on a GPU.
* ``instrument_stages`` — per-stage wall time of a U-Net by wrapping its public steps on the
  instance (``SparseUNet``'s docstring lists them; ``unet`` has the same modules and
  ``context``).
"""
from __future__ import annotations

import functools
import statistics
import time
from collections import defaultdict
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn as nn

import spconv2d as sp


# --------------------------------------------------------------------------------------------
# multiply-accumulates
# --------------------------------------------------------------------------------------------
def layer_macs(module: nn.Module, inputs, output) -> int:
    """Multiply-accumulates of one call of a dense layer (0 for other modules).

    ``nn.Conv2d``: output positions x ``kh*kw`` x ``C_in/groups`` x ``C_out``;
    ``nn.ConvTranspose2d``: input positions x ``kh*kw`` x ``C_in`` x ``C_out/groups`` (every
    input pixel is multiplied by the whole kernel); ``nn.Linear``: rows x ``in`` x ``out``."""
    if isinstance(module, nn.Linear):
        return (output.numel() // module.out_features) * module.in_features * module.out_features
    if isinstance(module, nn.ConvTranspose2d):
        x = inputs[0]
        positions = x.numel() // x.shape[-3]  # [B,] C, H, W -> B*H*W
        kh, kw = module.kernel_size
        return positions * kh * kw * module.in_channels * (module.out_channels // module.groups)
    if isinstance(module, nn.Conv2d):
        positions = output.numel() // output.shape[-3]
        kh, kw = module.kernel_size
        return positions * kh * kw * (module.in_channels // module.groups) * module.out_channels
    return 0


DENSE_LAYERS = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


class MacCounter:
    """Counts the MACs a model computes in the ``with`` block (see the module docstring).

    Attributes after the block: ``dense_layer_macs`` (the hooked dense layers, executed by both
    twins), ``profile`` (the ``sp.profile`` of the sparse ops), ``dense_layer_shapes`` (the input
    grid of every hooked conv call, for the dense models' level list)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.dense_layer_macs = 0
        self.dense_layer_shapes: List[tuple] = []
        self.profile = None
        self._hooks: list = []
        self._prof_cm = None

    def _hook(self, module, inputs, output):
        self.dense_layer_macs += layer_macs(module, inputs, output)
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            x = inputs[0]
            self.dense_layer_shapes.append((x.shape[0] if x.dim() == 4 else 1, tuple(x.shape[-2:])))

    def __enter__(self) -> "MacCounter":
        self._hooks = [m.register_forward_hook(self._hook) for m in self.model.modules()
                       if isinstance(m, DENSE_LAYERS)]
        self._prof_cm = sp.profile()
        self.profile = self._prof_cm.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._prof_cm.__exit__(*exc)

    @property
    def executed_macs(self) -> int:
        """What the model computed: the sparse ops' executed MACs plus the dense layers'."""
        return self.profile.executed_macs + self.dense_layer_macs

    @property
    def dense_macs(self) -> int:
        """What its dense twin computes on the same inputs (for a dense model: executed_macs)."""
        return self.profile.dense_macs + self.dense_layer_macs

    def levels(self) -> List[Dict[str, Any]]:
        """Measured density of every grid the sparse ops ran on, finest first: ``shape`` (H, W)
        and ``density`` = active input sites / (batch x H x W), over every call. A model without
        sparse ops: its dense convs' input grids, density 1."""
        sites, cells = defaultdict(int), defaultdict(int)
        for r in self.profile.records:
            sites[tuple(r.in_shape)] += r.n_in
            cells[tuple(r.in_shape)] += r.batch_size * r.in_shape[0] * r.in_shape[1]
        if not cells:
            shapes = {s for _, s in self.dense_layer_shapes}
            return [{"shape": list(s), "density": 1.0} for s in sorted(shapes, key=lambda s: -s[0] * s[1])]
        return [{"shape": list(s), "density": sites[s] / cells[s]}
                for s in sorted(cells, key=lambda s: -s[0] * s[1])]

    def summary(self, images: int) -> Dict[str, Any]:
        """Counts per image over ``images`` images, the fraction executed, levels, paths."""
        n = max(1, images)
        paths = defaultdict(int)
        for r in self.profile.records:
            paths[r.path] += 1
        return {"dense_per_image": self.dense_macs / n, "executed_per_image": self.executed_macs / n,
                "fraction": self.executed_macs / self.dense_macs if self.dense_macs else 1.0,
                "sparse_ops_executed_per_image": self.profile.executed_macs / n,
                "dense_layers_per_image": self.dense_layer_macs / n,
                "images": images, "levels": self.levels(), "op_paths": dict(paths)}


def count_macs(model: nn.Module, images: torch.Tensor, mask: Optional[torch.Tensor] = None) -> MacCounter:
    """One forward of ``model`` on ``images`` (no grad) inside a ``MacCounter``."""
    with torch.no_grad(), MacCounter(model) as mc:
        model(images) if mask is None else model(images, mask)
    return mc


def op_records(counter: MacCounter, limit: Optional[int] = None) -> List[Dict[str, Any]]:
    """The profile's records as plain dicts (the first ``limit``: one forward's worth)."""
    import dataclasses

    recs = counter.profile.records if limit is None else counter.profile.records[:limit]
    out = []
    for r in recs:
        d = dataclasses.asdict(r)
        d["in_shape"], d["out_shape"] = list(d["in_shape"]), list(d["out_shape"])
        out.append(d)
    return out


# --------------------------------------------------------------------------------------------
# latency
# --------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(calls: Mapping[str, Callable[[int], Any]], rounds: int, warmup: int = 2,
                     device: Optional[torch.device] = None,
                     on_round: Optional[Callable[[int], None]] = None,
                     budget_s: Optional[float] = None) -> Dict[str, List[float]]:
    """Seconds per call of each ``calls[name](round)``, ``rounds`` rounds, every model once per
    round, alternating (even rounds in the given order, odd rounds reversed). ``warmup`` untimed
    rounds first (compilation, autotuning, allocator). On a CUDA ``device`` each call is timed
    with CUDA events (warm-up and timing synchronised). ``budget_s``: stop after the first round
    that ends past this many seconds from the start (warm-up included; at least one round), so
    that an overloaded machine cannot stretch a smoke run: the lists are then shorter."""
    t_start = time.perf_counter()
    device = torch.device(device or "cpu")
    names = list(calls)
    times: Dict[str, List[float]] = {n: [] for n in names}
    cuda = device.type == "cuda"
    with torch.no_grad():
        for r in range(warmup):
            for n in names:
                calls[n](r)
        _sync(device)
        for r in range(rounds):
            for n in (names if r % 2 == 0 else names[::-1]):
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    calls[n](r)
                    end.record()
                    end.synchronize()
                    times[n].append(start.elapsed_time(end) / 1e3)
                else:
                    t0 = time.perf_counter()
                    calls[n](r)
                    times[n].append(time.perf_counter() - t0)
            if on_round is not None:
                on_round(r)
            if budget_s is not None and time.perf_counter() - t_start > budget_s:
                break
    return times


def _quantile(xs: Sequence[float], q: float) -> float:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def spread(xs: Sequence[float], scale: float = 1.0) -> Dict[str, float]:
    """``median``, ``p25``, ``p75``, ``min``, ``max`` of ``xs`` times ``scale``."""
    return {"median": scale * statistics.median(xs), "p25": scale * _quantile(xs, 0.25),
            "p75": scale * _quantile(xs, 0.75), "min": scale * min(xs), "max": scale * max(xs)}


def paired_ratios(num: Sequence[float], den: Sequence[float]) -> Dict[str, float]:
    """Spread of the round-by-round ratios ``num[r] / den[r]`` (two models timed in the same
    rounds: a speed-up measured pairwise, drift cancels within a round)."""
    return spread([a / b for a, b in zip(num, den) if b > 0])


# --------------------------------------------------------------------------------------------
# per-stage time of a U-Net
# --------------------------------------------------------------------------------------------
# (stage name, attribute, kind) in forward order; ``kind`` "method": wrapped on the instance,
# "module": the submodule's forward wrapped. A model without the attribute skips the stage.
# Stages in NESTED_STAGES run inside another stage (their time is part of it: sums skip them).
UNET_STAGES = (
    ("mask", "make_mask", "method"),
    ("enc0", "enc0", "module"), ("down1", "down1", "module"), ("enc1", "enc1", "module"),
    ("down2", "down2", "module"), ("enc2", "enc2", "module"),
    ("dense context head", "context", "method"),
    ("up2", "up2", "module"), ("dec1", "dec1", "module"), ("up1", "up1", "module"),
    ("dec0", "dec0", "module"), ("head", "head", "module"),
    ("cell states", "cell_states", "method"), ("output assembly", "assemble", "method"),
    ("guided upsampling", "upsample_guided", "method"), ("refinement", "refine_uncertain", "method"),
)
#: stage -> the stage it runs inside (the tensor path of the output assembly; its numba path
#: computes the guided upsampling in the same pass)
NESTED_STAGES = {"guided upsampling": "output assembly"}


def timed(times: Dict[str, List[float]], name: str, fn: Callable, device: Optional[torch.device] = None) -> Callable:
    """``fn`` wrapped to append its wall time to ``times[name]`` (synchronised on CUDA)."""
    device = torch.device(device or "cpu")

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _sync(device)
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return wrapper


def instrument_stages(model: nn.Module, times: Dict[str, List[float]], device: Optional[torch.device] = None,
                      stages=UNET_STAGES) -> List[str]:
    """Time a U-Net's steps by wrapping them on the instance (``unet`` and ``sparse_unet``);
    returns the names of the stages the model has. ``times`` is a ``defaultdict(list)``."""
    found = []
    for name, attr, kind in stages:
        target = getattr(model, attr, None)
        if target is None:
            continue
        if kind == "module":
            target.forward = timed(times, name, target.forward, device)
        else:
            setattr(model, attr, timed(times, name, target, device))
        found.append(name)
    return found
