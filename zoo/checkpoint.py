"""Checkpoints: one safetensors file holding everything needed to resume.

``checkpoint.safetensors`` tensors: ``model.<name>`` (the model's state_dict), ``optim.<i>.<key>``
(optimizer per-parameter state), ``rng.torch`` (the global torch RNG state); metadata (strings):
``format``, ``model``, ``epoch`` (epochs completed), ``config``, ``history``,
``optim_param_groups``, ``optim_scalars``, ``rng_numpy``, ``rng_python`` (JSON). No pickle is
involved, so loading a checkpoint cannot run code. Writes go to a temporary file in the same
folder (``<name>.tmp<pid>``), fsynced and moved into place with ``os.replace`` (atomic), then the
folder is fsynced, so a crash leaves the previous checkpoint intact; the temporary file a killed
process leaves behind is removed by the next write of that file (``atomic_write``).
"""
from __future__ import annotations

import json
import os
import random
import re
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch

FORMAT = "spconv2d.zoo.checkpoint/1"
CHECKPOINT_NAME = "checkpoint.safetensors"
WEIGHTS_NAME = "model.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, corrupt or incompatible."""


def _tensor(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous().clone()


def temp_path(path: str) -> str:
    """Where ``atomic_write`` writes ``path`` first: ``<path>.tmp<pid>``."""
    return f"{path}.tmp{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftover (a failed earlier write): ours to replace
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # someone else's live process, or no way to tell
        return True
    return True


def remove_stale_temps(path: str) -> list:
    """Remove ``<path>.tmp<pid>`` files (``temp_path``'s naming, nothing else) whose process is
    gone: what a run killed while writing ``path`` leaves behind. A live process's temp file is
    kept (another run writing into the same folder). Returns the removed paths."""
    folder, name = os.path.split(os.path.abspath(path))
    pattern = re.compile(re.escape(name) + r"\.tmp(\d+)")
    removed = []
    try:
        entries = os.listdir(folder)
    except OSError:
        return removed
    for entry in entries:
        m = pattern.fullmatch(entry)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        stale = os.path.join(folder, entry)
        try:
            os.remove(stale)
        except FileNotFoundError:  # removed meanwhile by someone else
            continue
        removed.append(stale)
    return removed


def fsync_folder(folder: str) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where the OS cannot open or fsync a
    folder (Windows, some network file systems)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a temporary file in the folder of ``path``, fsync it, ``os.replace`` it
    onto ``path`` (atomic: readers see the old or the new file, never a partial one), then fsync
    the folder so the rename survives a power loss. Stale temporary files of a killed earlier
    run (``remove_stale_temps``) are removed first; a failed write removes its own."""
    remove_stale_temps(path)
    tmp = temp_path(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_folder(os.path.dirname(os.path.abspath(path)))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save(tensors: Dict[str, torch.Tensor], path: str, metadata: Dict[str, str]) -> None:
    """``safetensors`` ``save_file`` through ``atomic_write``. Stale temporary files of both run
    files (checkpoint and weights) in the folder are removed first."""
    from safetensors.torch import save_file

    folder = os.path.dirname(os.path.abspath(path))
    for name in (CHECKPOINT_NAME, WEIGHTS_NAME):
        remove_stale_temps(os.path.join(folder, name))
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_checkpoint(path: str, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer],
                    epoch: int, config: Dict[str, Any], history: list) -> None:
    tensors = {f"model.{k}": _tensor(v) for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "model": str(config.get("model")), "epoch": str(epoch),
            "config": json.dumps(config), "history": json.dumps(history)}
    if optimizer is not None:
        sd = optimizer.state_dict()
        scalars = {}
        for i, st in sd["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"optim.{i}.{k}"] = _tensor(v)
                else:
                    scalars[f"{i}.{k}"] = v
        meta["optim_param_groups"] = json.dumps(sd["param_groups"])
        meta["optim_scalars"] = json.dumps(scalars)
    tensors["rng.torch"] = torch.get_rng_state().clone()
    npst = np.random.get_state()
    meta["rng_numpy"] = json.dumps([npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])])
    meta["rng_python"] = json.dumps(random.getstate(), default=list)
    atomic_save(tensors, path, meta)


def save_weights(path: str, model: torch.nn.Module, config: Dict[str, Any]) -> None:
    """Weights only (plain state_dict keys), with the config in the metadata."""
    tensors = {k: _tensor(v) for k, v in model.state_dict().items()}
    atomic_save(tensors, path, {"format": FORMAT + "+weights", "model": str(config.get("model")),
                                "config": json.dumps(config)})


def resolve_checkpoint_path(path: str) -> str:
    """A run folder resolves to its ``checkpoint.safetensors`` (or ``model.safetensors``)."""
    if os.path.isdir(path):
        for name in (CHECKPOINT_NAME, WEIGHTS_NAME):
            p = os.path.join(path, name)
            if os.path.isfile(p):
                return p
        raise CheckpointError(f"no {CHECKPOINT_NAME} or {WEIGHTS_NAME} in folder {path}")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Read a checkpoint (or weights) file -> dict with ``model_state``, ``config``, ``epoch``,
    ``history``, ``optimizer_state`` (or None) and ``rng`` (or None). Raises CheckpointError."""
    from safetensors import safe_open

    path = resolve_checkpoint_path(path)
    try:
        tensors = {}
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except Exception as e:  # safetensors raises its own error types for truncated/garbage files
        raise CheckpointError(f"checkpoint {path} is corrupt or not a safetensors file "
                              f"({type(e).__name__}: {e})") from e
    fmt = meta.get("format", "")
    if not fmt.startswith(FORMAT):
        raise CheckpointError(f"{path} is not a spconv2d.zoo checkpoint (format={fmt!r})")
    try:
        config = json.loads(meta["config"])
        if fmt.endswith("+weights"):
            return {"path": path, "model_state": tensors, "config": config, "epoch": None,
                    "history": [], "optimizer_state": None, "rng": None}
        model_state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        opt_state = None
        if "optim_param_groups" in meta:
            state: Dict[int, Dict[str, Any]] = {}
            for k, v in tensors.items():
                if k.startswith("optim."):
                    _, i, name = k.split(".", 2)
                    state.setdefault(int(i), {})[name] = v
            for k, v in json.loads(meta["optim_scalars"]).items():
                i, name = k.split(".", 1)
                state.setdefault(int(i), {})[name] = v
            opt_state = {"state": state, "param_groups": json.loads(meta["optim_param_groups"])}
        npst = json.loads(meta["rng_numpy"])
        pyst = json.loads(meta["rng_python"])
        rng = {"torch": tensors["rng.torch"],
               "numpy": (npst[0], np.asarray(npst[1], dtype=np.uint32), npst[2], npst[3], npst[4]),
               "python": (pyst[0], tuple(pyst[1]), pyst[2])}
        return {"path": path, "model_state": model_state, "config": config, "epoch": int(meta["epoch"]),
                "history": json.loads(meta["history"]), "optimizer_state": opt_state, "rng": rng}
    except (KeyError, ValueError, TypeError, IndexError) as e:
        raise CheckpointError(f"checkpoint {path} is incomplete or corrupt ({type(e).__name__}: {e})") from e


def state_dict_mismatch(model: torch.nn.Module, state: Dict[str, torch.Tensor], show: int = 3) -> str:
    """How ``state`` differs from ``model``'s state_dict, in one line: the number of missing,
    unexpected and differently shaped keys, the first ``show`` of each ("" if it matches)."""
    own = model.state_dict()
    kinds = (("missing", [k for k in own if k not in state]),
             ("unexpected", [k for k in state if k not in own]),
             ("of another shape", [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]))
    return "; ".join(f"{len(keys)} {what} key(s) ({', '.join(keys[:show])}{', ...' if len(keys) > show else ''})"
                     for what, keys in kinds if keys)


def restore_rng(rng: Dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
