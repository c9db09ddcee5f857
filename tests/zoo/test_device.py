"""Devices and precision: --device auto, unavailable devices, --amp, DataLoader options."""
import logging

import pytest
import torch

import spconv2d.zoo as zoo
from spconv2d.zoo import device as zdevice
from spconv2d.zoo.cli import main
from spconv2d.zoo.device import check_amp, loader_options, resolve_device


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_auto_is_cuda_when_available_else_cpu(no_cuda):
    assert resolve_device("auto") == torch.device("cpu") == resolve_device(None)
    assert resolve_device("cpu", local_rank=1) == torch.device("cpu")


def test_auto_and_cuda_take_the_local_rank(two_gpus):
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda:0", local_rank=1) == torch.device("cuda", 0)  # an explicit index is kept
    with pytest.raises(ValueError, match=r"'cuda:2' is not available: this machine has 2 CUDA device"):
        resolve_device("cuda:2")


def test_an_unavailable_or_unknown_device_is_a_value_error_naming_it(no_cuda):
    with pytest.raises(ValueError, match=r"device 'cuda' is not available"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match=r"device 'cuda:1' is not available"):
        resolve_device("cuda:1")
    with pytest.raises(ValueError, match=r"unknown device 'gpu0'"):
        resolve_device("gpu0")


def test_the_cli_reports_an_unavailable_device_and_amp_mode(no_cuda, tmp_path, capsys):
    base = ["train", "mlp", "--num-train", "32", "--num-val", "16", "--epochs", "1", "--no-progress",
            "--out", str(tmp_path / "run"), "--threads", "1"]
    assert main(base + ["--device", "cuda"]) == 2
    assert "device 'cuda' is not available" in capsys.readouterr().err
    assert main(base + ["--amp", "fp16"]) == 2
    assert "--amp fp16 needs a CUDA device" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "run"), "--device", "cuda:0"]) == 2
    assert "device 'cuda:0' is not available" in capsys.readouterr().err


def test_check_amp(monkeypatch, caplog):
    cpu = torch.device("cpu")
    check_amp(cpu, "off")
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        check_amp(cpu, "fp16")
    with pytest.raises(ValueError, match="unknown --amp"):
        check_amp(cpu, "fp8")
    monkeypatch.setattr(zdevice, "cpu_has_native_bf16", lambda: False)
    check_amp(cpu, "bf16")
    assert "without native bf16" in caplog.text
    caplog.clear()
    monkeypatch.setattr(zdevice, "cpu_has_native_bf16", lambda: True)
    check_amp(cpu, "bf16")
    assert caplog.text == ""


def test_bf16_autocast_trains_on_the_cpu(tmp_path, caplog):
    """The sparse U-Net (sparse convs, the dense context head, the CSR refinement) under bf16."""
    with caplog.at_level(logging.ERROR):  # no "without native bf16" noise on CPUs lacking it
        m = zoo.train(model="sparse_unet", data="streets", epochs=1, num_train=4, num_val=2, batch_size=2,
                      size=(32, 64), amp="bf16", device="cpu", out=str(tmp_path), progress=False,
                      num_predictions=1)
    assert m["run"]["amp"] == "bf16" and m["run"]["device"] == "cpu"
    assert torch.isfinite(torch.tensor(m["final"]["loss"])) and 0 <= m["final"]["miou"] <= 1
    assert torch.isfinite(torch.tensor(m["epochs"][0]["train_loss"]))


def test_loader_options_follow_the_data_and_the_device(monkeypatch):
    in_memory = zoo.build_dataset("mnist", "val", num_samples=4)
    assert in_memory.in_memory
    assert loader_options(in_memory, torch.device("cpu")) == \
        {"num_workers": 0, "pin_memory": False, "persistent_workers": False}

    class OnDisk:  # a data set that decodes files (cityscapes without its cache)
        in_memory = False

    monkeypatch.setattr(zdevice.os, "cpu_count", lambda: 16)
    opts = loader_options(OnDisk(), torch.device("cuda", 0), local_processes=2)
    assert opts == {"num_workers": 4, "pin_memory": True, "persistent_workers": True}
    monkeypatch.setattr(zdevice.os, "cpu_count", lambda: 2)
    assert loader_options(OnDisk(), torch.device("cpu"), local_processes=2)["num_workers"] == 0
    assert loader_options(OnDisk(), torch.device("cpu"), num_workers=3)["num_workers"] == 3  # --workers wins
