"""Checkpoint writes: a run killed mid-write leaves a temporary file that the next write in that
folder removes; the rename is made durable by fsyncing the folder."""
import os
import signal
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

import spconv2d.zoo as zoo
from spconv2d.zoo.checkpoint import (CHECKPOINT_NAME, WEIGHTS_NAME, atomic_write, load_checkpoint,
                                     remove_stale_temps, save_weights)
from spconv2d.zoo.engine import write_json


def _dead_pid() -> int:
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                       check=True)
    return int(p.stdout)


def _temps(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_a_run_killed_while_writing_its_checkpoint_is_cleaned_up_by_the_next(tmp_path):
    """A real kill: the child process dies (SIGKILL) in the middle of writing its second
    checkpoint; the first one is intact, the temporary file stays behind, and resuming in that
    folder removes it."""
    out = tmp_path / "run"
    child = textwrap.dedent(f"""
        import os, signal
        import safetensors.torch
        real, calls = safetensors.torch.save_file, []

        def save_then_die(tensors, path, metadata=None):
            calls.append(path)
            if len(calls) == 1:  # epoch 1: written normally
                return real(tensors, path, metadata=metadata)
            with open(path, "wb") as f:  # epoch 2: half a file, then the process is killed
                f.write(b"\\0" * 100_000)
                f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        safetensors.torch.save_file = save_then_die
        from spconv2d.zoo.cli import main
        main(["train", "mlp", "--epochs", "2", "--num-train", "32", "--num-val", "16", "--batch-size", "32",
              "--out", {str(out)!r}, "--no-progress", "--threads", "1"])
    """)
    p = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = p.communicate(timeout=600)
    assert p.returncode == -signal.SIGKILL, err
    left = _temps(out)
    assert left == [f"{CHECKPOINT_NAME}.tmp{p.pid}"], left
    assert (out / left[0]).stat().st_size == 100_000
    assert load_checkpoint(str(out))["epoch"] == 1  # the previous checkpoint is intact

    res = zoo.train(model="mlp", out=str(out), resume=True, progress=False)
    assert [e["epoch"] for e in res["epochs"]] == [1, 2]
    assert _temps(out) == []


def test_only_our_stale_temporary_files_are_removed(tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    names = {
        f"{CHECKPOINT_NAME}.tmp{dead}": False,   # a killed run's: removed
        f"{WEIGHTS_NAME}.tmp{dead}": False,      # the other run file's: removed by any save there
        f"{CHECKPOINT_NAME}.tmp{alive}": True,   # a live process may still be writing it
        f"{CHECKPOINT_NAME}.tmpfoo": True,       # not our naming
        f"{CHECKPOINT_NAME}.tmp{dead}.bak": True,
        f"notes.safetensors.tmp{dead}": True,    # not a file we write
        f"x{CHECKPOINT_NAME}.tmp{dead}": True,
    }
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    save_weights(str(tmp_path / WEIGHTS_NAME), torch.nn.Linear(2, 2), {"model": "mlp"})
    assert _temps(tmp_path) == sorted(n for n, kept in names.items() if kept)
    assert (tmp_path / WEIGHTS_NAME).is_file()

    (tmp_path / f"metrics.json.tmp{dead}").write_text("{")  # metrics.json goes the same way
    write_json(str(tmp_path / "metrics.json"), {"a": 1})
    assert f"metrics.json.tmp{dead}" not in _temps(tmp_path)
    assert remove_stale_temps(str(tmp_path / "nothing-here")) == []


def test_the_folder_is_fsynced_after_the_rename(tmp_path, monkeypatch):
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        return real_fsync(fd)

    def replace(a, b):
        events.append("replace")
        return real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write(str(tmp_path / "f.bin"), lambda tmp: open(tmp, "wb").close())
    assert events == ["fsync file", "replace", "fsync folder"]
    assert _temps(tmp_path) == [] and (tmp_path / "f.bin").is_file()
