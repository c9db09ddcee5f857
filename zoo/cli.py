"""``spconv2d`` command line: ``list``, ``train``, ``eval``, ``predict``, ``study``.

    spconv2d train sparse_cnn --data mnist            # the main one (docs/ZOO.md: results, times)
    spconv2d train sparse_unet --data streets --density 0.3
    spconv2d eval runs/sparse_cnn-mnist
    spconv2d predict runs/sparse_unet-streets street.png --out preds/
    spconv2d list
    spconv2d study [--quick]                          # the trade-off study (zoo/study.py)

Several processes: ``torchrun --nproc-per-node N -m spconv2d.zoo.cli train MODEL ...`` (or
``torchrun --nproc-per-node N --no-python spconv2d train MODEL ...``); rank 0 logs and writes.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

from .checkpoint import CheckpointError
from .config import TrainConfig
from .distributed import env_rank, launched_by_torchrun
from .threads import set_threads
from .validation import (check_density, check_device, check_input_folder, check_int, check_output_file,
                         check_output_folder)

log = logging.getLogger("spconv2d.zoo")


def build_parser() -> argparse.ArgumentParser:
    """The ``spconv2d`` argument parser; ``train``'s options are one per ``TrainConfig.cli_fields()``
    field, plus ``--threads``."""
    p = argparse.ArgumentParser(prog="spconv2d", description="spconv2d model zoo: train, evaluate, predict.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True)

    sub.add_parser("list", help="list models and data sets")

    t = sub.add_parser("train", help="train a model (defaults per model and data set)")
    TrainConfig.add_arguments(t)  # one option per TrainConfig field
    t.add_argument("--threads", type=int, help="torch CPU threads (default: the idle cores)")

    e = sub.add_parser("eval", help="evaluate a checkpoint on its data set's validation split")
    e.add_argument("checkpoint", help="checkpoint/weights file or run folder")
    e.add_argument("--data-root")
    e.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU) | cpu | cuda[:N]")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--density", type=float, help="override the activity density (sparse models)")
    e.add_argument("--threads", type=int, help="torch CPU threads (default: the idle cores)")
    e.add_argument("--no-refine", action="store_true",
                   help="sparse_unet: skip the refinement of uncertain inactive pixels")
    e.add_argument("--out", help="also write the metrics to this JSON file")

    q = sub.add_parser("predict", help="predict images with a checkpoint")
    q.add_argument("checkpoint")
    q.add_argument("images", nargs="+")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU) | cpu | cuda[:N]")
    q.add_argument("--density", type=float, help="override the activity density (sparse models)")
    q.add_argument("--threads", type=int, help="torch CPU threads (default: the idle cores)")

    from .study import add_arguments as add_study_arguments

    add_study_arguments(sub.add_parser("study", help="the trade-off study: train (or reuse), measure, report "
                                                     "(docs/ZOO.md, 'The trade-off study')"))
    return p


def cmd_list(args) -> int:
    from . import list_models
    from .data import DATASETS
    from .registry import model_defaults, model_entrypoint

    print("models:")
    for name in list_models():
        doc = (model_entrypoint(name).__doc__ or "").strip().splitlines()[0:1]
        d = model_defaults(name)
        print(f"  {name:<12} data={d.data:<8} epochs={d.epochs:<3} {doc[0] if doc else ''}")
    print("data sets:", ", ".join(DATASETS))
    return 0


def cmd_train(args) -> int:
    from .engine import train

    if launched_by_torchrun():  # a process's error goes to torchrun's summary, with its rank and traceback
        from torch.distributed.elastic.multiprocessing.errors import record

        train = record(train)
    metrics = train(TrainConfig.from_args(args))
    if env_rank() != 0:  # under torchrun, rank 0 reports the run
        return 0
    f = metrics["final"]
    m = f["metric"]
    out = metrics["config"]["out"]
    print(f"{metrics['model']} on {metrics['data']}: {m} {100 * f[m]:.2f}%  loss {f['loss']:.4f}  "
          f"density {f['density']:.3f}  {f['images_per_second']:.0f} img/s  ({f['epochs']} epochs, "
          f"{f['train_time_s']:.0f}s)")
    print(f"results: {os.path.abspath(out)} (metrics.json, checkpoint.safetensors, curves.png, predictions.png)")
    return 0


def cmd_study(args, argv=None) -> int:
    from .study import from_args, run_study

    results = run_study(from_args(args, argv))
    out = results["study"]["config"]["out"]
    print(f"study done in {results['study']['elapsed_s']:.0f}s: {os.path.abspath(os.path.join(out, 'REPORT.md'))}")
    return 0


def _data_loader_for(cfg, args):
    from torch.utils.data import DataLoader

    from .engine import get_datasets

    if args.data_root:
        cfg.data_root = args.data_root
    _, val = get_datasets(cfg)
    return val, DataLoader(val, batch_size=args.batch_size, shuffle=False)


def _load(args, **overrides):
    """``load_model`` for ``eval`` / ``predict``, with ``--density`` set on a sparse model."""
    from .device import resolve_device
    from .engine import load_model

    args.device = str(resolve_device(args.device))  # auto -> cuda | cpu; ValueError if unavailable
    model, cfg, ck, info = load_model(args.checkpoint, args.device, **overrides)
    if args.density is not None:
        if getattr(model, "sparse", False):
            model.set_mask_policy(density=args.density)
        else:
            log.warning("--density is ignored by the dense model %s", cfg.model)
    return model, cfg, ck, info


def check_args(args) -> None:
    """Every subcommand's options, checked before anything is loaded or written: ``--threads``,
    ``train``'s (``TrainConfig.validate``), ``eval`` / ``predict``'s own."""
    check_int("threads", getattr(args, "threads", None), 1, optional=True)
    if args.cmd == "train":  # train() validates too; here the error comes before any log line
        TrainConfig.from_args(args).validate()
    if args.cmd in ("eval", "predict"):
        check_device(args.device)
        check_density("density", args.density, optional=True)
    if args.cmd == "eval":
        check_int("batch_size", args.batch_size, 1)
        check_input_folder("data_root", args.data_root, optional=True)
        check_output_file("out", args.out, optional=True)
    if args.cmd == "predict":
        check_output_folder("out", args.out)
        for path in args.images:
            if not os.path.exists(path):
                raise FileNotFoundError(f"image not found: {path}")
            if os.path.isdir(path):
                raise IsADirectoryError(f"image {path} is a folder, not an image file")


def read_image(path: str, mode: str, size):
    """The image at ``path`` in PIL ``mode``, resized to ``size`` ``(H, W)``; a file PIL cannot
    read or decode is a ``ValueError`` naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert(mode).resize((size[1], size[0]), Image.BILINEAR)
    except UnidentifiedImageError:
        raise ValueError(f"cannot read image {path}: not an image format PIL knows") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated / corrupt data (PIL's own errors)
        raise ValueError(f"cannot read image {path}: {e}") from None


def cmd_eval(args) -> int:
    from .checkpoint import load_checkpoint
    from .engine import evaluate, write_json
    from .registry import is_model, model_kwargs

    if args.no_refine:  # the model built with refine=False: only an entry point taking refine=
        name = load_checkpoint(args.checkpoint)["config"].get("model")
        if is_model(name) and "refine" not in model_kwargs(name):
            raise ValueError(f"--no-refine: model {name!r} has no refinement step (sparse_unet only)")
    model, cfg, ck, info = _load(args, **({"refine": False} if args.no_refine else {}))
    val, loader = _data_loader_for(cfg, args)
    res = evaluate(model, loader, task=info.task, num_classes=info.num_classes, device=args.device,
                   class_names=info.class_names, eval_classes=info.eval_classes)
    res.update(model=cfg.model, data=cfg.data, data_source=val.source, checkpoint=ck["path"])
    m = "accuracy" if info.task == "classification" else "miou"
    print(f"{cfg.model} on {val.source}: {m} {100 * res[m]:.2f}%  loss {res['loss']:.4f}  "
          f"density {res['density']:.3f}  {res['images_per_second']:.0f} img/s")
    if args.out:
        write_json(args.out, res)
        print(f"metrics written to {os.path.abspath(args.out)}")
    return 0


def cmd_predict(args) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from .engine import write_json
    from .masks import activity_mask
    from .streets import colorize
    from .viz import save_classification_sheet

    model, cfg, ck, info = _load(args)
    H, W = info.image_size
    # every image is read before anything is written: an unreadable one leaves no partial output
    images = [read_image(path, "L" if info.in_chans == 1 else "RGB", (H, W)) for path in args.images]
    os.makedirs(args.out, exist_ok=True)
    results = []
    for path, img in zip(args.images, images):
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
        x = (x[None] if x.dim() == 2 else x.permute(2, 0, 1))[None].to(args.device)
        mask = activity_mask(model, x)
        with torch.no_grad():
            logits = model(x, mask)
        stem = os.path.splitext(os.path.basename(path))[0]
        entry = {"image": path, "density": float(mask.float().mean()) if mask is not None else 1.0}
        if logits.dim() == 2:
            prob = logits.softmax(1)[0]
            k = int(prob.argmax())
            entry.update(label=info.class_names[k], probability=float(prob[k]))
            out = os.path.join(args.out, f"{stem}_pred.png")
            save_classification_sheet(x.cpu(), None, [k], None if mask is None else mask.cpu(), out,
                                      info.class_names, title=f"{cfg.model}: {info.class_names[k]}")
        else:
            pred = logits.argmax(1)[0].cpu().numpy().astype(np.uint8)
            Image.fromarray(pred).save(os.path.join(args.out, f"{stem}_trainids.png"))
            m = (mask[0].cpu().numpy() if mask is not None else np.ones((H, W), bool)).astype(np.uint8) * 255
            sheet = np.concatenate([np.asarray(img.convert("RGB")), colorize(pred),
                                    np.repeat(m[..., None], 3, 2)], 1)
            out = os.path.join(args.out, f"{stem}_pred.png")
            Image.fromarray(sheet).save(out)
        entry["output"] = out
        results.append(entry)
        print(f"{path} -> {out}" + (f"  ({entry['label']}, p={entry['probability']:.3f})" if "label" in entry else ""))
    write_json(os.path.join(args.out, "predictions.json"), results)
    return 0


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (pytest and notebooks
    swap the stream; a handler bound to the old one would write to a closed file)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


# What a user can get wrong: bad arguments (ValueError: validation.py, TrainConfig.validate, the
# data sets, the models), files and folders that are not there or not what was meant, unusable
# checkpoints. Anything else is a bug in spconv2d and keeps its traceback.
USER_ERRORS = (ValueError, CheckpointError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               PermissionError)
MAX_MESSAGE = 500  # characters of a (one-line) error message


def error_line(cmd: str, error: BaseException) -> str:
    """``spconv2d <cmd>: error: <message>`` on one line (whitespace collapsed, long messages
    such as a state-dict mismatch cut at ``MAX_MESSAGE`` characters)."""
    msg = " ".join(str(error).split()) or type(error).__name__
    if len(msg) > MAX_MESSAGE:
        msg = msg[:MAX_MESSAGE - 4] + " ..."
    return f"spconv2d {cmd}: error: {msg}"


def main(argv: Optional[List[str]] = None) -> int:
    """Run the ``spconv2d`` command; returns the exit code: 0, or 2 for a user error (a bad
    argument, file or checkpoint), reported as one line on stderr without a traceback
    (argparse's own errors exit with 2 too)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    rank = env_rank()
    root = logging.getLogger("spconv2d.zoo")
    if not root.handlers:
        h = _StderrHandler()
        prefix = f"[rank {rank}] " if rank else ""
        h.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(message)s", "%H:%M:%S"))
        root.addHandler(h)
    # under torchrun, rank 0 speaks for the run; the others say only what goes wrong
    root.setLevel(logging.DEBUG if args.verbose else logging.INFO if rank == 0 else logging.WARNING)
    try:
        check_args(args)
        if args.cmd in ("train", "eval", "predict", "study"):  # the application sets the threads, not train()
            n = set_threads(args.threads)
            log.log(logging.INFO if args.cmd == "train" else logging.DEBUG, "torch CPU threads: %d%s", n,
                    "" if args.threads else " (auto: idle cores)")
        if args.cmd == "study":
            return cmd_study(args, argv)
        return {"list": cmd_list, "train": cmd_train, "eval": cmd_eval, "predict": cmd_predict}[args.cmd](args)
    except USER_ERRORS as e:
        print(error_line(args.cmd, e), file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
