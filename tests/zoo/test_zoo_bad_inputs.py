"""Bad input to the zoo gets a clear error: the command line's rows and the Python API's.

The zoo's half of the bad-input table (the core's: tests/core/test_bad_inputs.py). One row per
kind of bad input.

* ``CLI`` rows: ``spconv2d`` arguments (``{name}`` placeholders are the files of the ``files``
  fixture; ``{fresh}`` a folder that does not exist yet) and a pattern the message must match
  (it names the problem). Each must exit with 2 and end stderr with exactly one line
  ``spconv2d <cmd>: error: <message>``, without a traceback; where ``{fresh}`` is the output
  folder, nothing may have been written.
* ``ARGPARSE`` rows: what argparse itself rejects (exit code 2, its own message).
* ``API`` rows: the same checks when ``spconv2d.zoo`` is called from Python: the exception type
  (``TypeError`` for types, ``ValueError`` for values, ``CheckpointError`` / ``FileNotFoundError``
  / ``NotADirectoryError`` for files) and the message pattern.
"""
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import spconv2d.zoo as zoo
from spconv2d.zoo.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, save_weights
from spconv2d.zoo.cli import main
from spconv2d.zoo.config import TrainConfig
from spconv2d.zoo.engine import load_model, make_optimizer
from spconv2d.zoo.masks import MaskPolicy
from spconv2d.zoo.threads import set_threads

TINY = "--num-train 2 --num-val 2 --epochs 1 --no-progress --threads 1"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Runs, checkpoints and images, good and bad (no training: checkpoints of fresh models)."""
    d = tmp_path_factory.mktemp("bad_inputs")
    torch.manual_seed(0)
    cfg = TrainConfig(model="mlp", out=str(d / "run")).resolved().to_dict()
    mlp = zoo.create_model("mlp")
    os.makedirs(d / "run")
    save_checkpoint(str(d / "run" / "checkpoint.safetensors"), mlp, make_optimizer(mlp, 1e-3, 0.0), 1, cfg, [])
    p = {"run": d / "run", "dir": d / "empty"}
    p["dir"].mkdir()
    for name in ("garbage_run", "weights_run", "unregistered", "mismatch"):
        (d / name).mkdir()
        p[name] = d / name
    (d / "garbage_run" / "checkpoint.safetensors").write_bytes(b"\x00\x01garbage" * 10)
    save_weights(str(d / "weights_run" / "checkpoint.safetensors"), mlp, cfg)  # weights only
    save_weights(str(d / "unregistered" / "model.safetensors"), mlp, dict(cfg, model="gone_model"))
    save_weights(str(d / "mismatch" / "model.safetensors"), mlp, dict(cfg, model="cnn"))
    whole = (d / "run" / "checkpoint.safetensors").read_bytes()
    p["truncated"] = d / "truncated.safetensors"
    p["truncated"].write_bytes(whole[: len(whole) // 2])
    p["foreign"] = d / "foreign.safetensors"
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(3)}, str(p["foreign"]))
    p["file"] = d / "notes.txt"
    p["file"].write_text("a plain file\n")
    p["image"] = d / "digit.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(p["image"])
    p["notimage"] = d / "notimage.png"
    p["notimage"].write_text("this is text, not a PNG\n")
    p["cutimage"] = d / "cut.png"
    png = p["image"].read_bytes()
    p["cutimage"].write_bytes(png[: len(png) // 2])
    p["tmp"] = d
    return p


CLI = [
    # -- train: budgets and sizes
    ("threads-negative", "train mlp --threads -1", r"threads must be >= 1, got -1"),
    ("threads-zero", "eval {run} --threads 0", r"threads must be >= 1, got 0"),
    ("epochs-zero", "train mlp --epochs 0 --out {fresh}", r"epochs must be >= 1, got 0"),
    ("epochs-negative", "train mlp --epochs -3 --out {fresh}", r"epochs must be >= 1, got -3"),
    ("batch-size-zero", "train mlp --batch-size 0 --out {fresh}", r"batch_size must be >= 1, got 0"),
    ("lr-zero", "train mlp --lr 0 --out {fresh}", r"lr must be > 0, got 0"),
    ("lr-nan", "train mlp --lr nan --out {fresh}", r"lr must be a finite number, got nan"),
    ("weight-decay-negative", "train mlp --weight-decay -0.1 --out {fresh}", r"weight_decay must be >= 0"),
    ("num-train-zero", "train mlp --num-train 0 --out {fresh}", r"num_train must be >= 1, got 0 \(an empty training split\)"),
    ("num-val-zero", "train mlp --num-val 0 --out {fresh}", r"num_val must be >= 1, got 0 \(an empty validation split\)"),
    ("size-zero", "train unet --size 0 0 --out {fresh}", r"size must be >= 1 in both dimensions, got 0x0"),
    ("size-negative", "train sparse_unet --size -4 8 --out {fresh}", r"size must be >= 1 in both dimensions, got -4x8"),
    ("size-not-multiple", "train unet --size 30 62 --out {fresh}", r"size 30x62: model 'unet' needs .* multiples of 4"),
    ("size-of-fixed-data-set", "train mlp --size 32 32 --out {fresh}", r"data set 'mnist' has a fixed image size of 28x28"),
    ("density-above-one", "train sparse_unet --density 1.5 --out {fresh}", r"density must be in \(0, 1\], got 1.5"),
    ("density-zero", "train sparse_cnn --mask-policy edge --density 0 --out {fresh}", r"density must be in \(0, 1\], got 0"),
    ("aux-weight-negative", "train unet --aux-weight -1 --out {fresh}", r"aux_weight must be >= 0"),
    ("warmup-above-one", "train mlp --warmup 1.5 --out {fresh}", r"warmup must be in \[0, 1\], got 1.5"),
    ("workers-negative", "train mlp --workers -1 --out {fresh}", r"num_workers must be >= 0, got -1"),
    ("num-predictions-negative", "train mlp --num-predictions -2 --out {fresh}", r"num_predictions must be >= 0"),
    ("seed-negative", "train mlp --seed -1 --out {fresh}", r"seed must be >= 0, got -1"),
    # -- train: names, devices, folders
    ("unknown-model", "train resnet --out {fresh}", r"unknown model 'resnet'; registered models: .*cnn, mlp, sparse_cnn"),
    ("unknown-data-set", "train mlp --data imagenet --out {fresh}", r"unknown data set 'imagenet'; choose from mnist"),
    ("device-not-a-device", "train mlp --device bogus --out {fresh}", r"device 'bogus' is not a torch device"),
    ("device-unavailable", "train mlp --device cuda:99 --out {fresh}", r"device 'cuda:99' is not available"),
    ("device-meta", "train mlp --device meta --out {fresh}", r"device 'meta' holds no data"),
    ("data-root-missing", "train mlp --data-root {fresh}/nowhere --out {fresh}", r"data_root '.*nowhere' does not exist"),
    ("data-root-a-file", "train mlp --data-root {file} --out {fresh}", r"data_root '.*notes.txt' is a file, not a folder"),
    ("download-without-root", "train mlp --download --out {fresh}", r"download needs data_root"),
    ("out-a-file", "train mlp --out {file}", r"out '.*notes.txt' is a file, not a folder"),
    ("cityscapes-missing", "train sparse_unet --data cityscapes --data-root {dir} " + TINY + " --out {tmp}/cs",
     r"Cityscapes data not found: missing .*leftImg8bit.*cityscapes-dataset.com"),
    ("task-mismatch", "train mlp --data streets --size 8 8 " + TINY + " --out {tmp}/mismatch_run",
     r"model 'mlp' does classification but data set 'streets' is segmentation"),
    # -- train --resume: checkpoints
    ("resume-nothing", "train mlp --resume --out {fresh}", r"no checkpoint to resume from at .*checkpoint.safetensors"),
    ("resume-other-model", "train cnn --resume --out {run}", r"is a 'mlp' run, not 'cnn'"),
    ("resume-corrupt", "train mlp --resume --out {garbage_run}", r"is corrupt or not a safetensors file"),
    ("resume-weights-only", "train mlp --resume --out {weights_run}", r"holds weights only; it cannot be resumed"),
    # -- eval
    ("eval-missing-checkpoint", "eval {fresh}/x.safetensors", r"checkpoint not found: .*x.safetensors"),
    ("eval-folder-without-checkpoint", "eval {dir}", r"no checkpoint.safetensors or model.safetensors in folder"),
    ("eval-not-safetensors", "eval {image}", r"digit.png is corrupt or not a safetensors file"),
    ("eval-truncated-checkpoint", "eval {truncated}", r"truncated.safetensors is corrupt"),
    ("eval-foreign-safetensors", "eval {foreign}", r"is not a spconv2d.zoo checkpoint \(format=''\)"),
    ("eval-unregistered-model", "eval {unregistered}", r"is a 'gone_model' run, a model not registered here"),
    ("eval-weights-of-another-model", "eval {mismatch}", r"does not match model 'cnn'"),
    ("eval-batch-size-zero", "eval {run} --batch-size 0", r"batch_size must be >= 1, got 0"),
    ("eval-density-above-one", "eval {run} --density 2", r"density must be in \(0, 1\], got 2"),
    ("eval-device-unavailable", "eval {run} --device cuda:99", r"device 'cuda:99' is not available"),
    ("eval-no-refine-without-refinement", "eval {run} --no-refine", r"--no-refine: model 'mlp' has no refinement step"),
    ("eval-data-root-missing", "eval {run} --data-root {fresh}", r"data_root '.*' does not exist"),
    ("eval-out-a-folder", "eval {run} --out {dir}", r"out '.*empty' is a folder, not a file"),
    ("eval-out-in-missing-folder", "eval {run} --out {fresh}/m.json", r"out '.*m.json': folder '.*' does not exist"),
    # -- predict
    ("predict-not-an-image", "predict {run} {notimage} --out {fresh}", r"cannot read image .*notimage.png: not an image format PIL knows"),
    ("predict-truncated-image", "predict {run} {image} {cutimage} --out {fresh}", r"cannot read image .*cut.png: .*truncated"),
    ("predict-missing-image", "predict {run} {fresh}.png --out {fresh}", r"image not found: .*\.png"),
    ("predict-image-a-folder", "predict {run} {dir} --out {fresh}", r"image .*empty is a folder, not an image file"),
    ("predict-out-a-file", "predict {run} {image} --out {file}", r"out '.*notes.txt' is a file, not a folder"),
    ("predict-density-zero", "predict {run} {image} --density 0 --out {fresh}", r"density must be in \(0, 1\], got 0"),
    ("predict-corrupt-checkpoint", "predict {garbage_run} {image} --out {fresh}", r"is corrupt or not a safetensors file"),
]

ARGPARSE = [
    ("epochs-not-an-integer", "train mlp --epochs three", r"argument --epochs: invalid int value: 'three'"),
    ("mask-policy-unknown", "train sparse_unet --mask-policy blobs", r"argument --mask-policy: invalid choice: 'blobs'"),
    ("size-one-number", "train unet --size 32", r"argument --size: expected 2 arguments"),
    ("unknown-subcommand", "serve mlp", r"invalid choice: 'serve'"),
]


def _argv(template, files, fresh):
    paths = {k: shlex.quote(str(v)) for k, v in files.items()}
    return shlex.split(template.format(fresh=shlex.quote(str(fresh)), **paths))


@pytest.mark.parametrize("template,pattern", [r[1:] for r in CLI], ids=[r[0] for r in CLI])
def test_cli_rejects_bad_input_with_one_line_and_exit_code_2(template, pattern, files, tmp_path, capsys):
    fresh = tmp_path / "fresh"
    argv = _argv(template, files, fresh)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.rstrip("\n").splitlines()
    errors = [ln for ln in lines if ": error: " in ln]
    assert errors == [lines[-1]], err  # one error line, the last one
    assert re.fullmatch(rf"spconv2d {argv[0]}: error: .*{pattern}.*", lines[-1]), lines[-1]
    assert not fresh.exists(), "a rejected command wrote output"


@pytest.mark.parametrize("template,pattern", [r[1:] for r in ARGPARSE], ids=[r[0] for r in ARGPARSE])
def test_argparse_errors_exit_with_2(template, pattern, capsys):
    with pytest.raises(SystemExit) as e:
        main(shlex.split(template))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert re.search(pattern, err) and "Traceback" not in err, err


def test_argument_errors_come_before_anything_else(files, tmp_path, capsys):
    """Up-front checks: their error is the only line on stderr (no log line before it)."""
    for argv in (["train", "mlp", "--epochs", "0"], ["eval", str(files["run"]), "--batch-size", "0"],
                 ["predict", str(files["run"]), str(files["notimage"]), "--out", str(tmp_path / "p")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and err.startswith(f"spconv2d {argv[0]}: error: "), err


def _train(**kw):
    return lambda f: zoo.train(**dict(dict(model="mlp", progress=False, out=str(f["tmp"] / "api_out")), **kw))


def _validate(**kw):
    return lambda f: TrainConfig(**dict(dict(model="mlp"), **kw)).validate()


API = [
    ("api-unknown-model", _train(model="resnet"), ValueError, r"unknown model 'resnet'"),
    ("api-model-not-a-string", _validate(model=3), TypeError, r"model must be a registered model's name"),
    ("api-epochs-zero", _train(epochs=0), ValueError, r"epochs must be >= 1, got 0"),
    ("api-epochs-float", _train(epochs=2.5), TypeError, r"epochs must be an integer, got float 2.5"),
    ("api-epochs-bool", _validate(epochs=True), TypeError, r"epochs must be an integer, got bool"),
    ("api-lr-string", _validate(lr="0.1"), TypeError, r"lr must be a number, got str '0.1'"),
    ("api-lr-inf", _validate(lr=float("inf")), ValueError, r"lr must be a finite number"),
    ("api-size-one-number", _validate(model="unet", size=(32,)), TypeError, r"size must be two integers \(H, W\)"),
    ("api-size-string", _validate(model="unet", size="32x64"), TypeError, r"size must be two integers"),
    ("api-size-floats", _validate(model="unet", size=(32.0, 64.0)), TypeError, r"size must be two integers"),
    ("api-data-not-a-string", _validate(data=["mnist"]), TypeError, r"data must be a string"),
    ("api-mask-policy-unknown", _validate(model="sparse_unet", mask_policy="blobs"), ValueError, r"unknown mask policy 'blobs'"),
    ("api-device-not-a-string", _validate(device=0), TypeError, r"device must be a string"),
    ("api-progress-not-a-bool", _validate(progress="no"), TypeError, r"progress must be True or False"),
    ("api-task-mismatch", _validate(model="unet", data="mnist"), ValueError,
     r"model 'unet' does segmentation but data set 'mnist' is classification"),
    ("api-sync-bn-not-a-bool", _validate(sync_bn=1), TypeError, r"sync_bn must be True or False"),
    ("api-amp-unknown", _validate(amp="fp8"), ValueError, r"unknown mixed-precision mode 'fp8'"),
    ("api-cache-dir-a-file", lambda f: TrainConfig(model="mlp", cache_dir=str(f["file"])).validate(),
     NotADirectoryError, r"cache_dir '.*notes.txt' is a file"),
    ("api-out-not-a-path", _validate(out=3), TypeError, r"out must be a path"),
    ("api-seed-too-large", _validate(seed=2**32), ValueError, r"seed must be <= 4294967295"),
    ("api-model-kwargs-not-a-dict", _validate(model_kwargs=[("width", 8)]), TypeError, r"model_kwargs must be a dict"),
    ("api-data-root-a-file", lambda f: TrainConfig(model="mlp", data_root=str(f["file"])).validate(),
     NotADirectoryError, r"data_root '.*notes.txt' is a file"),
    ("api-set-threads-zero", lambda f: set_threads(0), ValueError, r"threads must be >= 1, got 0"),
    ("api-model-density", lambda f: zoo.create_model("sparse_unet", density=1.5), ValueError, r"density must be in \(0, 1\]"),
    ("api-mask-policy-object", lambda f: MaskPolicy("blobs"), ValueError, r"unknown mask policy 'blobs'"),
    ("api-load-missing-checkpoint", lambda f: load_checkpoint(str(f["tmp"] / "none.safetensors")), CheckpointError, r"checkpoint not found"),
    ("api-load-model-unregistered", lambda f: load_model(str(f["unregistered"])), CheckpointError, r"'gone_model' run, a model not registered"),
]


@pytest.mark.parametrize("call,exc,pattern", [r[1:] for r in API], ids=[r[0] for r in API])
def test_api_rejects_bad_input_clearly(call, exc, pattern, files):
    with pytest.raises(exc, match=pattern):
        call(files)
    assert not (files["tmp"] / "api_out").exists()


@pytest.mark.parametrize("argv,kwargs", [
    ("--epochs 0", dict(epochs=0)),
    ("--size 30 62", dict(model="unet", size=(30, 62))),
    ("--device bogus", dict(device="bogus")),
    ("--num-val 0", dict(num_val=0)),
])
def test_the_api_raises_what_the_cli_prints(argv, kwargs, tmp_path, capsys):
    kwargs = dict(dict(model="mlp", out=str(tmp_path / "o")), **kwargs)
    with pytest.raises(ValueError) as e:
        zoo.train(**kwargs)
    assert main(["train", kwargs["model"], "--out", kwargs["out"]] + argv.split()) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"spconv2d train: error: {e.value}"


def test_the_table_is_big_enough():
    """At least 20 kinds here; with the core's table well over 40."""
    assert len(CLI) + len(ARGPARSE) + len(API) >= 20


@pytest.mark.parametrize("args", [["train", "mlp", "--threads", "-1"], ["train", "mlp", "--device", "bogus"],
                                  ["predict", "{run}", "{notimage}", "--out", "{fresh}"]],
                         ids=["threads", "device", "predict-not-an-image"])
def test_the_command_prints_no_traceback(args, files, tmp_path):
    """The issue's three cases, through a real process (``python -m spconv2d.zoo.cli`` is the
    ``spconv2d`` console script's ``main``)."""
    argv = [a.format(fresh=tmp_path / "fresh", **files) for a in args]
    p = subprocess.run([sys.executable, "-m", "spconv2d.zoo.cli"] + argv, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith(f"spconv2d {argv[0]}: error: ")
