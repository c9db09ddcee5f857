"""``spconv2d`` command line: ``list``, ``train``, ``eval``, ``predict``.

    spconv2d train sparse_cnn --data mnist            # the main one: ~1-2 min on a 2-core CPU
    spconv2d train sparse_unet --data streets --density 0.3
    spconv2d eval runs/sparse_cnn-mnist
    spconv2d predict runs/sparse_unet-streets street.png --out preds/
    spconv2d list
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

log = logging.getLogger("spconv2d.zoo")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spconv2d", description="spconv2d model zoo: train, evaluate, predict.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True)

    sub.add_parser("list", help="list models and data sets")

    t = sub.add_parser("train", help="train a model (defaults per model and data set)")
    t.add_argument("model", help="registered model name (see `spconv2d list`)")
    t.add_argument("--data", help="mnist | streets | cityscapes (default: the model's)")
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--density", type=float, help="target fraction of active pixels (edge/contrast/residual policy)")
    t.add_argument("--mask-policy", choices=["nonzero", "edge", "contrast", "residual", "full"])
    t.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="segmentation image size")
    t.add_argument("--num-train", type=int, help="streets: number of training scenes")
    t.add_argument("--num-val", type=int, help="streets: number of validation scenes")
    t.add_argument("--device", default="cpu")
    t.add_argument("--out", help="output folder (default runs/MODEL-DATA)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--data-root", help="folder with MNIST/raw/ or Cityscapes' leftImg8bit/ + gtFine/")
    t.add_argument("--download", action="store_true", help="MNIST only: download into --data-root")
    t.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    t.add_argument("--threads", type=int, help="torch CPU threads")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    e = sub.add_parser("eval", help="evaluate a checkpoint on its data set's validation split")
    e.add_argument("checkpoint", help="checkpoint/weights file or run folder")
    e.add_argument("--data-root")
    e.add_argument("--device", default="cpu")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--density", type=float, help="override the activity density (sparse models)")
    e.add_argument("--no-refine", action="store_true",
                   help="sparse_unet: skip the refinement of uncertain inactive pixels")
    e.add_argument("--out", help="also write the metrics to this JSON file")

    q = sub.add_parser("predict", help="predict images with a checkpoint")
    q.add_argument("checkpoint")
    q.add_argument("images", nargs="+")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--device", default="cpu")
    q.add_argument("--density", type=float, help="override the activity density (sparse models)")
    return p


def cmd_list(args) -> int:
    from . import list_models
    from .data import DATASETS
    from .engine import MODEL_DEFAULTS
    from .registry import model_entrypoint

    print("models:")
    for name in list_models():
        doc = (model_entrypoint(name).__doc__ or "").strip().splitlines()[0:1]
        d = MODEL_DEFAULTS.get(name, {})
        print(f"  {name:<12} data={d.get('data', '?'):<8} epochs={d.get('epochs', '?'):<3} {doc[0] if doc else ''}")
    print("data sets:", ", ".join(DATASETS))
    return 0


def cmd_train(args) -> int:
    from .engine import TrainConfig, train

    cfg = TrainConfig(model=args.model, data=args.data, epochs=args.epochs, batch_size=args.batch_size,
                      lr=args.lr, weight_decay=args.weight_decay, density=args.density,
                      mask_policy=args.mask_policy, size=tuple(args.size) if args.size else None,
                      num_train=args.num_train, num_val=args.num_val, device=args.device, out=args.out,
                      resume=args.resume, seed=args.seed, data_root=args.data_root, download=args.download,
                      num_workers=args.workers, threads=args.threads, progress=not args.no_progress)
    metrics = train(cfg)
    f = metrics["final"]
    m = f["metric"]
    out = metrics["config"]["out"]
    print(f"{metrics['model']} on {metrics['data']}: {m} {100 * f[m]:.2f}%  loss {f['loss']:.4f}  "
          f"density {f['density']:.3f}  {f['images_per_second']:.0f} img/s  ({f['epochs']} epochs, "
          f"{f['train_time_s']:.0f}s)")
    print(f"results: {os.path.abspath(out)} (metrics.json, checkpoint.safetensors, curves.png, predictions.png)")
    return 0


def _data_loader_for(cfg, args):
    from torch.utils.data import DataLoader

    from .engine import get_datasets

    if args.data_root:
        cfg.data_root = args.data_root
    _, val = get_datasets(cfg)
    return val, DataLoader(val, batch_size=args.batch_size, shuffle=False)


def cmd_eval(args) -> int:
    from .engine import evaluate, load_model, mask_policy_for, write_json

    model, cfg, ck, info = load_model(args.checkpoint, args.device)
    if args.density is not None:
        cfg.density = args.density
        if hasattr(model, "policy"):
            model.policy.density = args.density
    if args.no_refine:
        if not hasattr(model, "refine"):
            raise SystemExit(f"--no-refine: {cfg.model} has no refinement (sparse_unet only)")
        model.refine = False
    val, loader = _data_loader_for(cfg, args)
    res = evaluate(model, loader, task=val.task, num_classes=val.num_classes, device=args.device,
                   policy=mask_policy_for(cfg, model), class_names=val.class_names,
                   eval_classes=getattr(val, "eval_classes", None))
    res.update(model=cfg.model, data=cfg.data, data_source=val.source, checkpoint=ck["path"])
    m = "accuracy" if val.task == "classification" else "miou"
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

    from .engine import load_model, mask_policy_for, write_json
    from .streets import colorize
    from .viz import save_classification_sheet

    model, cfg, ck, info = load_model(args.checkpoint, args.device)
    if args.density is not None:
        cfg.density = args.density
    policy = mask_policy_for(cfg, model)
    os.makedirs(args.out, exist_ok=True)
    H, W = info.image_size
    results = []
    for path in args.images:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image not found: {path}")
        img = Image.open(path).convert("L" if info.in_chans == 1 else "RGB").resize((W, H), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
        x = (x[None] if x.dim() == 2 else x.permute(2, 0, 1))[None].to(args.device)
        mask = policy(x) if policy is not None else None
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


def main(argv: Optional[List[str]] = None) -> int:
    from .checkpoint import CheckpointError

    args = _parser().parse_args(argv)
    root = logging.getLogger("spconv2d.zoo")
    if not root.handlers:
        h = _StderrHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        root.addHandler(h)
    root.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if args.cmd in ("eval", "predict"):
        import torch

        from .engine import auto_threads

        torch.set_num_threads(auto_threads())
    try:
        return {"list": cmd_list, "train": cmd_train, "eval": cmd_eval, "predict": cmd_predict}[args.cmd](args)
    except (CheckpointError, FileNotFoundError, ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"spconv2d {args.cmd}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
