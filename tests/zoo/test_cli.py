"""The `spconv2d` command line, end to end, in-process on tiny settings."""
import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from spconv2d.zoo.cli import build_parser, main
from spconv2d.zoo.config import TrainConfig


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("mlp", "cnn", "sparse_cnn", "unet", "sparse_unet", "streets", "cityscapes"):
        assert name in out


def test_train_eval_predict_segmentation(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "sparse_unet", "--data", "streets", "--epochs", "2", "--num-train", "8", "--num-val", "4",
            "--batch-size", "4", "--size", "32", "64", "--density", "0.2", "--out", str(out), "--no-progress",
            "--seed", "3"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "miou" in printed
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["epochs"]) == 2 and m["config"]["density"] == 0.2 and m["config"]["seed"] == 3
    assert abs(m["final"]["density"] - 0.2) < 0.01
    for f in ("checkpoint.safetensors", "model.safetensors", "curves.png", "predictions.png"):
        assert (out / f).is_file()

    assert main(["eval", str(out), "--out", str(tmp_path / "eval.json")]) == 0
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["miou"] == pytest.approx(m["final"]["miou"], abs=1e-6)
    assert main(["eval", str(out / "model.safetensors")]) == 0  # weights-only file works too
    assert main(["eval", str(out), "--no-refine", "--out", str(tmp_path / "noref.json")]) == 0
    assert 0 <= json.loads((tmp_path / "noref.json").read_text())["miou"] <= 1

    img = (np.random.default_rng(0).random((40, 80, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "street.png")
    assert main(["predict", str(out), str(tmp_path / "street.png"), "--out", str(tmp_path / "pred")]) == 0
    assert (tmp_path / "pred" / "street_pred.png").is_file()
    ids = np.asarray(Image.open(tmp_path / "pred" / "street_trainids.png"))
    assert ids.shape == (32, 64) and ids.max() < 19
    preds = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert abs(preds[0]["density"] - 0.2) < 0.02


def test_train_resume_and_predict_classification(tmp_path, capsys):
    out = tmp_path / "cnn"
    base = ["train", "mlp", "--data", "mnist", "--num-train", "64", "--num-val", "32", "--batch-size", "32",
            "--out", str(out), "--no-progress"]
    assert main(base + ["--epochs", "1"]) == 0
    assert main(base + ["--epochs", "2", "--resume"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert [e["epoch"] for e in m["epochs"]] == [1, 2]
    digit = np.zeros((28, 28), np.uint8)
    digit[5:23, 13:15] = 255
    Image.fromarray(digit).save(tmp_path / "one.png")
    capsys.readouterr()
    assert main(["eval", str(out), "--no-refine"]) == 2
    assert "has no refinement step (sparse_unet only)" in capsys.readouterr().err
    assert main(["predict", str(out / "checkpoint.safetensors"), str(tmp_path / "one.png"),
                 "--out", str(tmp_path / "p")]) == 0
    preds = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert preds[0]["label"] in [str(i) for i in range(10)] and 0 < preds[0]["probability"] <= 1


def test_errors_are_clear(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope.safetensors")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint at all")
    assert main(["eval", str(bad)]) == 2
    assert "corrupt" in capsys.readouterr().err
    assert main(["train", "mlp", "--out", str(tmp_path / "x"), "--resume"]) == 2
    assert "no checkpoint to resume" in capsys.readouterr().err
    assert main(["train", "unet", "--data", "cityscapes", "--data-root", str(tmp_path), "--out",
                 str(tmp_path / "cs")]) == 2
    err = capsys.readouterr().err
    assert "leftImg8bit" in err and "cityscapes-dataset.com" in err
    assert main(["train", "bogus_model"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_train_options_are_the_train_config_fields():
    """One option per TrainConfig field (model_kwargs aside), with the field's default and help."""
    fields = {f.name for f in TrainConfig.cli_fields()}
    assert fields == {f.name for f in dataclasses.fields(TrainConfig)} - {"model_kwargs"}
    assert all(f.metadata["cli"]["help"] for f in TrainConfig.cli_fields())
    args = build_parser().parse_args(["train", "mlp"])
    assert set(vars(args)) - {"cmd", "verbose", "threads"} == fields  # CLI-only: --threads, -v
    assert TrainConfig.from_args(args) == TrainConfig(model="mlp")  # the same defaults
    argv = ["train", "sparse_unet", "--data", "streets", "--epochs", "2", "--batch-size", "4", "--lr", "0.1",
            "--weight-decay", "0.2", "--density", "0.25", "--mask-policy", "edge", "--size", "32", "64",
            "--num-train", "8", "--num-val", "4", "--device", "meta", "--out", "o", "--resume", "--seed", "3",
            "--data-root", "r", "--download", "--aux-weight", "0.5", "--warmup", "0.1", "--workers", "2",
            "--num-predictions", "3", "--no-progress", "--threads", "1", "--amp", "bf16", "--no-sync-bn",
            "--no-augment", "--cache-dir", "c"]
    expected = TrainConfig(model="sparse_unet", data="streets", epochs=2, batch_size=4, lr=0.1, weight_decay=0.2,
                           density=0.25, mask_policy="edge", size=(32, 64), num_train=8, num_val=4, device="meta",
                           out="o", resume=True, seed=3, data_root="r", download=True, aux_weight=0.5, warmup=0.1,
                           num_workers=2, num_predictions=3, progress=False, amp="bf16", sync_bn=False,
                           augment=False, cache_dir="c")
    args = build_parser().parse_args(argv)
    assert TrainConfig.from_args(args) == expected and args.threads == 1
    # every option is in argv above, so a new field fails here until it is tested
    default = TrainConfig()
    assert {n for n in fields if getattr(expected, n) != getattr(default, n)} == fields
    with pytest.raises(SystemExit):  # argparse rejects what the field does not allow
        build_parser().parse_args(["train", "mlp", "--mask-policy", "bogus"])


def test_eval_density_of_a_dense_model_is_ignored_with_a_warning(tmp_path, caplog):
    out = tmp_path / "mlp"
    assert main(["train", "mlp", "--data", "mnist", "--epochs", "1", "--num-train", "32", "--num-val", "16",
                 "--out", str(out), "--no-progress", "--threads", "1"]) == 0
    assert main(["eval", str(out), "--density", "0.2", "--threads", "1"]) == 0
    assert "ignored by the dense model mlp" in caplog.text
