"""Training and evaluation: ``train(...)``, ``evaluate(...)``, ``train_one_epoch(...)``,
``load_model(...)``. The run's configuration is ``TrainConfig`` (``config.py``).

The loop is deliberately plain (nanoGPT style): build data, model and optimizer, then for every
epoch train, evaluate (once), checkpoint, and rewrite ``metrics.json`` and ``curves.png``. A
sparse model computes on its own activity mask (``model.make_mask``, via
``masks.activity_mask``) in training, evaluation and the prediction sheet. A run folder:

    metrics.json             config, one entry per epoch, "final" (accuracy or miou in 0-1, loss,
                             per-class scores, measured density, parameters, images per second)
    checkpoint.safetensors   weights + optimizer + epoch + RNG + config + history (resumable)
    model.safetensors        weights only (+ config), written at the end
    curves.png               loss and metric per epoch
    predictions.png          input | ground truth | prediction | active mask
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import random
import time
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from . import distributed, models  # noqa: F401  (models: registers the models)
from .checkpoint import (CHECKPOINT_NAME, WEIGHTS_NAME, CheckpointError, atomic_write, load_checkpoint,
                         restore_rng, save_checkpoint, save_weights, state_dict_mismatch)
from .config import TrainConfig
from .data import build_dataset, dataset_info
from .device import autocast, check_amp, grad_scaler, loader_options, resolve_device
from .masks import activity_mask, measured_density
from .metrics import ConfusionMatrix
from .registry import count_parameters, create_model, is_model, list_models, model_kwargs
from .streets import IGNORE_INDEX

log = logging.getLogger("spconv2d.zoo")


# --------------------------------------------------------------------------------------------
# small pieces (torchvision-reference style)
# --------------------------------------------------------------------------------------------
def get_datasets(cfg: TrainConfig):
    common = dict(data_root=cfg.data_root, download=cfg.download, size=cfg.size, seed=cfg.seed)
    if cfg.cache_dir is not None:
        if cfg.data == "cityscapes":
            common["cache_dir"] = cfg.cache_dir
        else:
            log.warning("--cache-dir is ignored for %s (held in memory; only cityscapes is cached)", cfg.data)
    train = build_dataset(cfg.data, "train", num_samples=cfg.num_train, **common)
    val = build_dataset(cfg.data, "val", num_samples=cfg.num_val, **common)
    return train, val


def build_model(cfg: TrainConfig, info) -> torch.nn.Module:
    """``create_model(cfg.model, ...)`` for the data set ``info`` describes (a ``DatasetInfo`` or
    a data set: ``task``, ``num_classes``, ``in_chans``, ``image_size``).

    Every entry point gets ``num_classes`` and ``in_chans``; ``img_size`` and the resolved
    ``mask_policy`` / ``density`` go to those that name them. ``cfg.model_kwargs`` go to it as
    they are (an unknown one is a ``TypeError``)."""
    offered = dict(img_size=tuple(info.image_size), mask_policy=cfg.mask_policy, density=cfg.density)
    takes = model_kwargs(cfg.model)
    kw = {k: v for k, v in offered.items() if k in takes}
    model = create_model(cfg.model, num_classes=info.num_classes, in_chans=info.in_chans, **kw, **cfg.model_kwargs)
    task = getattr(model, "task", None)
    if task is not None and task != info.task:
        raise ValueError(f"model {cfg.model!r} does {task} but data set {cfg.data!r} is {info.task}")
    return model


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy(logits, targets, ignore_index=255)`` (mean over the counted pixels),
    computed on the pixel rows ``[B*H*W, K]`` when ``[B, K, H, W]`` logits are stored
    channels-last (the sparse U-Net's are: its pixel rows are a view), where the classes are
    the contiguous last dim: the same loss and gradient, without the channels-last log-softmax
    over dim 1 (measured: forward + backward 32.6 -> 20.9 ms at a streets batch of 16, one
    thread, AMD EPYC VM; NCHW logits, e.g. ``unet``'s, 17.1 ms as they are)."""
    if logits.dim() == 4 and not logits.is_contiguous() and logits.is_contiguous(memory_format=torch.channels_last):
        K = logits.shape[1]
        return F.cross_entropy(logits.permute(0, 2, 3, 1).reshape(-1, K), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX)
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)


def criterion(task: str, aux_weight: float = 0.0) -> Callable:
    """Cross-entropy (255 = ignore for segmentation; :func:`cross_entropy`), plus ``aux_weight``
    x the aux output's."""

    def loss_fn(outputs, targets):
        if isinstance(outputs, tuple):
            main, aux = outputs
            return cross_entropy(main, targets) + aux_weight * cross_entropy(aux, targets)
        return cross_entropy(outputs, targets)

    return loss_fn


def augment(images: torch.Tensor, targets: torch.Tensor, task: str):
    """MNIST: random shifts of up to 2 pixels; segmentation: random horizontal flips."""
    if task == "classification":
        B, C, H, W = images.shape
        p = 2
        padded = F.pad(images, (p, p, p, p))
        iy = torch.randint(0, 2 * p + 1, (B, 1)) + torch.arange(H)[None]  # [B, H]
        ix = torch.randint(0, 2 * p + 1, (B, 1)) + torch.arange(W)[None]  # [B, W]
        rows = padded.gather(2, iy[:, None, :, None].expand(B, C, H, W + 2 * p))
        return rows.gather(3, ix[:, None, None, :].expand(B, C, H, W)), targets
    flip = torch.rand(images.shape[0]) < 0.5
    images, targets = images.clone(), targets.clone()
    images[flip] = images[flip].flip(-1)
    targets[flip] = targets[flip].flip(-1)
    return images, targets


def get_lr(step: int, total: int, base_lr: float, warmup: float) -> float:
    """Linear warm-up then cosine decay to 1 % of ``base_lr``."""
    w = max(1, int(warmup * total))
    if step < w:
        return base_lr * (step + 1) / w
    t = min(1.0, (step - w) / max(1, total - w))
    return base_lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t)))


def seed_epoch(seed: int, epoch: int, rank: int = 0) -> None:
    """Seed torch's, numpy's and Python's global RNGs for one epoch of one process (augmentation,
    dropout) from ``(seed, epoch, rank)``: each process draws its own numbers, and a run resumed
    at an epoch draws what the uninterrupted run drew there, whatever the number of processes
    before the interruption."""
    state = np.random.SeedSequence([seed, epoch, rank]).generate_state(2)
    torch.manual_seed(int(state[0]) << 32 | int(state[1]))
    np.random.seed(int(state[0]))
    random.seed(int(state[1]))


def make_optimizer(model, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def _forward(model, images, mask, train_seg: bool):
    if train_seg:
        return model(images, mask, return_aux=True)
    return model(images, mask)


def train_one_epoch(model, loader, optimizer, loss_fn, *, task: str, epoch: int, epochs: int,
                    step0: int, total_steps: int, lr: float, warmup: float, device,
                    aux: bool, progress: bool = True, amp: str = "off", scaler=None,
                    augmentation: bool = True) -> Dict[str, float]:
    """One pass over ``loader`` (augmented unless ``augmentation`` is False, the LR set per step
    by ``get_lr``); a sparse model computes on its own activity mask (``model.make_mask``).
    ``model`` may be a ``DistributedDataParallel`` wrapper: the figures returned are then those
    of all processes (summed images, their mean loss and density). ``amp``: autocast mode
    (``device.autocast``); ``scaler``: a ``GradScaler`` (fp16). Returns train loss, images per
    second (compute only, all processes), mean mask density and the number of steps."""
    from tqdm import tqdm

    model.train()
    net = distributed.unwrap(model)
    device = torch.device(device)
    scaler = scaler if scaler is not None else grad_scaler(device, "off")
    tot_loss, n_img, t_compute, active, pixels = 0.0, 0, 0.0, 0.0, 0.0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", disable=not progress, leave=False,
               dynamic_ncols=True)
    step = step0
    for images, targets in bar:
        t0 = time.perf_counter()
        if augmentation:
            images, targets = augment(images, targets, task)
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        mask = activity_mask(net, images)
        if mask is not None:
            active, pixels = active + float(mask.sum()), pixels + mask.numel()
        for g in optimizer.param_groups:
            g["lr"] = get_lr(step, total_steps, lr, warmup)
        with autocast(device, amp):
            out = _forward(model, images, mask, aux and task == "segmentation")
            loss = loss_fn(out, targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        step += 1
        t_compute += time.perf_counter() - t0
        tot_loss += loss.item() * len(images)
        n_img += len(images)
        bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{n_img / max(t_compute, 1e-9):.0f}")
    bar.close()
    tot_loss, n_img, active, pixels = distributed.all_reduce([tot_loss, n_img, active, pixels]).tolist()
    t_compute = float(distributed.all_reduce([t_compute], "max")[0])
    return {"train_loss": tot_loss / max(n_img, 1), "train_images_per_s": n_img / max(t_compute, 1e-9),
            "train_density": active / pixels if pixels else 1.0, "steps": step - step0}


@torch.no_grad()
def evaluate(model, loader, *, task: str, num_classes: int, device, class_names=None,
             eval_classes=None, amp: str = "off") -> Dict[str, Any]:
    """Loss, accuracy (classification) or mIoU over all labelled pixels (segmentation),
    per-class scores, measured density (active / all pixels) and inference images per second
    (a sparse model's own mask computation included).

    mIoU (``ConfusionMatrix.miou``) averages the IoU of the data set's ``eval_classes`` (default:
    all) that occur in the ground truth or the prediction, like Cityscapes' fixed list of
    evaluated classes. Every labelled pixel counts: a pixel predicted as a class outside the list
    is an error of its true class (it lowers that class's IoU), it just does not add a class of
    its own.

    Under ``torch.distributed`` each process evaluates the share of the split its ``loader``
    draws (``distributed.ShardBatchSampler``) and the sums are all-reduced (the confusion matrix,
    the loss, the counts), so every process returns the figures of the whole split: the mIoU
    equals that of one process on the same split. ``images_per_second``: all processes' images
    over the slowest process's compute time."""
    model = distributed.unwrap(model)
    model.eval()
    device = torch.device(device)
    cm = ConfusionMatrix(num_classes, device=device)
    tot_loss, n_img, t_compute, active, pixels = 0.0, 0, 0.0, 0.0, 0.0
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        t0 = time.perf_counter()
        mask = activity_mask(model, images)
        with autocast(device, amp):
            logits = model(images, mask)
        t_compute += time.perf_counter() - t0
        if mask is not None:
            active, pixels = active + float(mask.sum()), pixels + mask.numel()
        loss = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
        cm.update(logits.argmax(1), targets)
        tot_loss += loss.item()
        n_img += len(images)
    cm.all_reduce()
    tot_loss, n_img, active, pixels = distributed.all_reduce([tot_loss, n_img, active, pixels]).tolist()
    t_compute = float(distributed.all_reduce([t_compute], "max")[0])
    names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
    res: Dict[str, Any] = {"loss": tot_loss / max(cm.total, 1), "images": int(n_img),
                           "images_per_second": n_img / max(t_compute, 1e-9),
                           "density": active / pixels if pixels else 1.0}
    if task == "classification":
        res["accuracy"] = cm.accuracy()
        acc = cm.class_accuracy()
        res["per_class_accuracy"] = {n: (None if acc[i].isnan() else float(acc[i])) for i, n in enumerate(names)}
    else:
        iou, present = cm.iou(), cm.present()
        res["miou"] = cm.miou(eval_classes)
        res["pixel_accuracy"] = cm.accuracy()
        res["per_class_iou"] = {n: (float(iou[i]) if present[i] else None) for i, n in enumerate(names)}
    return res


@torch.no_grad()
def save_prediction_sheet(model, dataset, cfg: TrainConfig, path: str, device) -> None:
    from .viz import save_classification_sheet, save_segmentation_sheet

    n = min(cfg.num_predictions, len(dataset))
    if n == 0:
        return
    model.eval()
    idx = torch.linspace(0, len(dataset) - 1, n).long().tolist()  # spread over the split
    images = torch.stack([dataset[i][0] for i in idx]).to(device)
    targets = torch.stack([torch.as_tensor(dataset[i][1]) for i in idx])
    mask = activity_mask(model, images)
    preds = model(images, mask).argmax(1).cpu()
    title = f"{cfg.model} on {cfg.data}" + (f", density {measured_density(mask):.2f}" if mask is not None else "")
    if dataset.task == "classification":
        save_classification_sheet(images.cpu(), targets, preds, None if mask is None else mask.cpu(), path,
                                  dataset.class_names, title)
    else:
        save_segmentation_sheet(images.cpu(), targets, preds, None if mask is None else mask.cpu(), path, title)


def write_json(path: str, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)

    atomic_write(path, write)


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------
def train(config: Optional[TrainConfig] = None, **kwargs) -> Dict[str, Any]:
    """Train a zoo model; returns the metrics dict also written to ``<out>/metrics.json``.

    ``train(model="cnn", data="mnist", epochs=3, out="runs/cnn")`` or ``train(TrainConfig(...))``.
    ``resume=True`` continues from ``<out>/checkpoint.safetensors`` (its config, with ``epochs``
    and the run-time options ``device``, ``progress``, ``num_workers``, ``cache_dir`` taken
    from the call when given). Runs on torch's current CPU threads (the ``spconv2d`` command sets
    them: ``--threads``, default the idle cores).

    Every epoch: train, evaluate once on the validation split, checkpoint, rewrite
    ``metrics.json`` and ``curves.png``; at the end ``model.safetensors`` and ``predictions.png``.

    Several processes (``torchrun --nproc-per-node N``, or a process group the caller
    initialised): ``distributed.setup`` joins the group, the model trains under
    ``DistributedDataParallel`` with synchronised batch norm (``sync_bn``), each process draws
    ``batch_size`` items per step from its share of one permutation per epoch (global batch
    ``N x batch_size``), the evaluation is split over the processes and summed, and only rank 0
    logs and writes files. Each epoch reseeds the global RNGs from ``(seed, epoch, rank)``
    (``seed_epoch``), so a resumed run repeats the uninterrupted one.
    """
    cfg = dataclasses.replace(config, **kwargs) if config is not None else TrainConfig(**kwargs)
    cfg.validate()  # bad arguments fail here, before anything is read or written
    ckpt = None
    if cfg.resume:
        out = cfg.out or TrainConfig(model=cfg.model, data=cfg.data).resolved().out
        path = os.path.join(out, CHECKPOINT_NAME)
        if not os.path.isfile(path):
            raise CheckpointError(f"--resume: no checkpoint to resume from at {path}")
        ckpt = load_checkpoint(path)
        if ckpt["epoch"] is None or ckpt["optimizer_state"] is None:
            raise CheckpointError(f"{path} holds weights only; it cannot be resumed")
        saved = TrainConfig.from_dict(ckpt["config"])
        if saved.model != cfg.model:
            raise CheckpointError(f"{path} is a {saved.model!r} run, not {cfg.model!r}")
        over = {"resume": True, "out": out, "device": cfg.device, "progress": cfg.progress,
                "num_workers": cfg.num_workers, "cache_dir": cfg.cache_dir}
        if config is not None and config.epochs is not None or kwargs.get("epochs") is not None:
            over["epochs"] = cfg.epochs
        cfg = dataclasses.replace(saved, **over)
    cfg = cfg.resolved()
    procs, device, created = distributed.setup(cfg.device)
    # On an error the process leaves with it, group and all: the launcher (torchrun, mp.spawn)
    # sees it exit and stops the others, which may be waiting in a collective (nothing here
    # waits on a barrier an ended process would never reach).
    metrics = _run(cfg, ckpt, procs, device)
    distributed.teardown(created)
    return metrics


def _run(cfg: TrainConfig, ckpt, procs: "distributed.Processes", device: torch.device) -> Dict[str, Any]:
    main = procs.is_main
    info_log = log.info if main else log.debug  # rank 0 speaks for the run
    check_amp(device, cfg.amp)
    if main:
        os.makedirs(cfg.out, exist_ok=True)

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    ds_train, ds_val = get_datasets(cfg)
    info_log("data: %s | %s", ds_train.source, ds_val.source)
    info = dataset_info(cfg.data, cfg.size)
    net = build_model(cfg, info).to(device)  # the same initialisation on every process
    n_params = count_parameters(net)
    info_log("model: %s (%s parameters)", cfg.model, f"{n_params:,}")
    optimizer = make_optimizer(net, cfg.lr, cfg.weight_decay)
    start_epoch, history = 0, []
    if ckpt is not None:
        net.load_state_dict(ckpt["model_state"])
        optimizer.load_state_dict(ckpt["optimizer_state"])
        restore_rng(ckpt["rng"])
        start_epoch, history = ckpt["epoch"], ckpt["history"]
        info_log("resumed %s at epoch %d/%d", ckpt["path"], start_epoch, cfg.epochs)
    elif main and os.path.exists(os.path.join(cfg.out, CHECKPOINT_NAME)):
        log.warning("%s already holds a checkpoint; starting over (use --resume to continue)", cfg.out)
    model = distributed.wrap_model(net, procs, device, cfg.sync_bn)

    sampler = distributed.train_sampler(ds_train, procs, cfg.seed)
    opts = loader_options(ds_train, device, cfg.num_workers, procs.local_world_size)
    # the loaders draw their workers' seeds from their own generators, not from the global RNG
    # that augmentation and dropout use (so those do not depend on the loaders' workers)
    train_loader = DataLoader(ds_train, batch_size=cfg.batch_size, sampler=sampler,
                              drop_last=len(sampler) > cfg.batch_size,
                              generator=torch.Generator().manual_seed(cfg.seed), **opts)
    val_loader = DataLoader(ds_val, batch_sampler=distributed.ShardBatchSampler(len(ds_val), cfg.batch_size * 2, procs),
                            generator=torch.Generator().manual_seed(cfg.seed), **opts)
    task = info.task
    metric = "accuracy" if task == "classification" else "miou"
    loss_fn = criterion(task, cfg.aux_weight)
    total_steps = cfg.epochs * len(train_loader)
    scaler = grad_scaler(device, cfg.amp)
    run_info = {"device": str(device), "amp": cfg.amp, "processes": procs.world_size,
                "backend": procs.backend, "batch_size_per_process": cfg.batch_size,
                "global_batch_size": cfg.batch_size * procs.world_size,
                "sync_bn": bool(cfg.sync_bn and procs.distributed), "data_loader_workers": opts["num_workers"]}
    info_log("%d process%s (%s) on %s, amp %s: batch %d per process, global batch %d, %d steps per epoch%s",
             procs.world_size, "es" if procs.distributed else "", procs.backend or "no process group", device,
             cfg.amp, cfg.batch_size, run_info["global_batch_size"], len(train_loader),
             ", synchronised batch norm" if run_info["sync_bn"] else "")

    def run_evaluation():
        distributed.broadcast_buffers(net)  # one model evaluated by every process
        return evaluate(net, val_loader, task=task, num_classes=info.num_classes, device=device,
                        class_names=info.class_names, eval_classes=info.eval_classes, amp=cfg.amp)

    metrics = None
    t_run = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        seed_epoch(cfg.seed, epoch, procs.rank)
        tr = train_one_epoch(model, train_loader, optimizer, loss_fn, task=task, epoch=epoch, epochs=cfg.epochs,
                             step0=epoch * len(train_loader), total_steps=total_steps, lr=cfg.lr,
                             warmup=cfg.warmup, device=device, aux=cfg.aux_weight > 0,
                             progress=cfg.progress and main, amp=cfg.amp, scaler=scaler,
                             augmentation=cfg.augment)
        t_train = time.perf_counter() - t0
        evaluation = run_evaluation()
        entry = {"epoch": epoch + 1, "train_loss": tr["train_loss"], "val_loss": evaluation["loss"],
                 metric: evaluation[metric], "lr": optimizer.param_groups[0]["lr"],
                 "train_images_per_s": tr["train_images_per_s"],
                 "val_images_per_s": evaluation["images_per_second"],
                 "density": evaluation["density"], "processes": procs.world_size,
                 "global_batch_size": run_info["global_batch_size"], "train_time_s": t_train,
                 "time_s": time.perf_counter() - t0}
        history.append(entry)
        info_log("epoch %d/%d  train_loss %.4f  val_loss %.4f  %s %.2f%%  density %.3f  %.1fs",
                 epoch + 1, cfg.epochs, tr["train_loss"], evaluation["loss"], metric, 100 * evaluation[metric],
                 evaluation["density"], entry["time_s"])
        if main:  # one writer; each file written whole, then moved into place
            save_checkpoint(os.path.join(cfg.out, CHECKPOINT_NAME), net, optimizer, epoch + 1, cfg.to_dict(),
                            history)
            metrics = _write_outputs(cfg, history, evaluation, n_params, metric, ds_train, run_info)
        else:
            metrics = _metrics(cfg, history, evaluation, n_params, metric, ds_train, run_info)
    if metrics is None:  # nothing left to train (resumed a finished run): its one evaluation
        evaluation = run_evaluation()
        metrics = (_write_outputs if main else _metrics)(cfg, history, evaluation, n_params, metric, ds_train,
                                                         run_info)
    if main:
        save_weights(os.path.join(cfg.out, WEIGHTS_NAME), net, cfg.to_dict())
        save_prediction_sheet(net, ds_val, cfg, os.path.join(cfg.out, "predictions.png"), device)
    info_log("done in %.1fs: val %s %.2f%% -> results in %s", time.perf_counter() - t_run, metric,
             100 * metrics["final"][metric], os.path.abspath(cfg.out))
    return metrics


def _metrics(cfg, history, evaluation, n_params, metric, ds_train, run_info) -> Dict[str, Any]:
    final = dict(evaluation)
    final.update(parameters=n_params, epochs=len(history), metric=metric,
                 train_time_s=sum(h["time_s"] for h in history))
    return {"model": cfg.model, "data": cfg.data, "data_source": ds_train.source, "run": dict(run_info),
            "config": cfg.to_dict(), "epochs": history, "final": final}


def _write_outputs(cfg, history, evaluation, n_params, metric, ds_train, run_info) -> Dict[str, Any]:
    from .viz import save_curves

    metrics = _metrics(cfg, history, evaluation, n_params, metric, ds_train, run_info)
    write_json(os.path.join(cfg.out, "metrics.json"), metrics)
    if history:
        save_curves(history, os.path.join(cfg.out, "curves.png"), metric)
    return metrics


def load_model(checkpoint: str, device: str = "cpu", **overrides):
    """``(model, config, checkpoint dict, DatasetInfo)`` from a checkpoint / weights file or a run
    folder: the model is built for ``dataset_info(config.data, config.size)`` and loaded, in eval
    mode on ``device`` (a name ``resolve_device`` takes: ``auto`` is CUDA when available). ``overrides`` replace the run's entry-point arguments (e.g.
    ``refine=False`` for ``sparse_unet``; an argument the model does not take is a ``TypeError``)."""
    ck = load_checkpoint(checkpoint)
    cfg = TrainConfig.from_dict(ck["config"])
    if not is_model(cfg.model):
        raise CheckpointError(f"{ck['path']} is a {cfg.model!r} run, a model not registered here "
                              f"(registered: {', '.join(list_models())})")
    cfg = cfg.resolved()
    cfg.model_kwargs = {**cfg.model_kwargs, **overrides}
    info = dataset_info(cfg.data, cfg.size)
    model = build_model(cfg, info)
    try:
        model.load_state_dict(ck["model_state"])
    except RuntimeError as e:
        why = state_dict_mismatch(model, ck["model_state"]) or " ".join(str(e).split())
        raise CheckpointError(f"{ck['path']} does not match model {cfg.model!r}: {why}") from e
    model.to(resolve_device(device)).eval()
    return model, cfg, ck, info
