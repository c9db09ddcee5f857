"""Where a run computes and in which precision: ``resolve_device`` (``auto``: CUDA when available),
``check_amp`` / ``autocast`` / ``grad_scaler`` (``--amp off|bf16|fp16``) and ``loader_options``
(DataLoader workers and pinned memory for the device).

    device = resolve_device("auto")                 # cuda (cuda:LOCAL_RANK under torchrun) or cpu
    check_amp(device, "bf16")                       # ValueError for fp16 on a CPU
    with autocast(device, "bf16"):
        loss = loss_fn(model(images), targets)
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
from typing import Any, Dict, Optional

import torch

log = logging.getLogger("spconv2d.zoo")

AMP_MODES = ("off", "bf16", "fp16")
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto", local_rank: Optional[int] = None) -> torch.device:
    """The ``torch.device`` a run uses. ``auto``: CUDA when ``torch.cuda.is_available()``, else
    the CPU. A CUDA device without an index is ``cuda:<local_rank>`` when ``local_rank`` is
    given (one GPU per process under torchrun), else the current CUDA device.

    A device this machine does not have is a ``ValueError`` naming it (``cuda`` without CUDA,
    ``cuda:3`` on a two-GPU machine, ``mps`` without Metal); an unknown name is one too."""
    if name is None or name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {name!r} (auto, cpu, cuda, cuda:N, ...): {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} is not available: this PyTorch sees no CUDA device "
                             f"(torch {torch.__version__}); use --device cpu or auto")
        if device.index is None:
            device = torch.device("cuda", local_rank if local_rank is not None else torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} is not available: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"device {name!r} is not available (no Metal device)")
    elif device.type not in ("cpu", "meta"):
        module = getattr(torch, device.type, None)
        is_available = getattr(module, "is_available", None)
        if is_available is None or not is_available():
            raise ValueError(f"device {name!r} is not available")
    return device


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes bf16 natively (AVX512-BF16 or AMX; Linux ``/proc/cpuinfo``)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def check_amp(device: torch.device, amp: str) -> None:
    """Raise ``ValueError`` for an ``amp`` mode the device cannot run: ``fp16`` needs CUDA (loss
    scaling); ``bf16`` needs a CUDA device that supports it, or the CPU (warning when the CPU has
    no native bf16, where autocast costs more than it saves)."""
    if amp not in AMP_MODES:
        raise ValueError(f"unknown --amp {amp!r}; choose from {', '.join(AMP_MODES)}")
    if amp == "off":
        return
    if device.type == "cuda":
        if amp == "bf16" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"--amp bf16: {torch.cuda.get_device_name(device)} does not support bf16; use --amp fp16")
        return
    if device.type == "cpu":
        if amp == "fp16":
            raise ValueError("--amp fp16 needs a CUDA device (autocast with loss scaling); "
                             "on a CPU use --amp bf16 or --amp off")
        if not cpu_has_native_bf16():
            log.warning("--amp bf16 on a CPU without native bf16 (AVX512-BF16 / AMX): autocast will "
                        "likely be slower than float32")
        return
    raise ValueError(f"--amp {amp} is supported on CUDA and CPU devices, not {device.type}")


def autocast(device: torch.device, amp: str):
    """``torch.autocast(device.type, dtype)`` for ``amp`` ``bf16`` / ``fp16``; a null context
    for ``off``. Sparse convolutions autocast like ``nn.Conv2d`` (the core's rule)."""
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_AMP_DTYPES[amp])


def grad_scaler(device: torch.device, amp: str) -> "torch.amp.GradScaler":
    """A ``GradScaler``, enabled for ``fp16`` only (bf16 has float32's range: no loss scaling).
    Disabled, ``scale(loss)`` is ``loss`` and ``step(opt)`` is ``opt.step()``."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")


def loader_options(dataset, device: torch.device, num_workers: Optional[int] = None,
                   local_processes: int = 1) -> Dict[str, Any]:
    """DataLoader keyword arguments for ``dataset`` on ``device``.

    ``num_workers`` None chooses: 0 for a data set held in memory (``dataset.in_memory``:
    ``mnist``, ``streets``, a cached ``cityscapes``; a batch is a few tensor copies, and worker
    processes would only compete with the compute threads), otherwise (``cityscapes`` decoding
    PNGs) up to 4 per process, leaving a core per process for the compute. Pinned memory (and
    non-blocking copies) on CUDA; persistent workers whenever there are workers."""
    if num_workers is None:
        if getattr(dataset, "in_memory", False):
            num_workers = 0
        else:
            per_process = (os.cpu_count() or 1) // max(1, local_processes)
            num_workers = max(0, min(4, per_process - 1))
    return {"num_workers": num_workers, "pin_memory": device.type == "cuda",
            "persistent_workers": num_workers > 0}
