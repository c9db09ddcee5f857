"""The trade-off study: ``spconv2d study`` / ``spconv2d.zoo.run_study(...)``.

One command trains (or reuses) the zoo's models, measures them side by side on this machine and
writes a report:

    spconv2d study                        # mnist + streets, the default budgets (docs/ZOO.md)
    spconv2d study --quick                # a smoke run: tiny budgets (< 3 min on a 2-core CPU)
    spconv2d study --data cityscapes --data-root DIR --device cuda

    from spconv2d.zoo import StudyConfig, run_study
    results = run_study(StudyConfig(data=("streets",), quick=True))

What it runs, per data set: classification (``mnist``): ``mlp``, ``cnn``, ``sparse_cnn``;
segmentation (``streets``, ``cityscapes``): ``unet`` and ``sparse_unet`` trained at the default
density, ``sparse_unet`` evaluated at every density of the sweep and, with
``train_per_density``, also trained at each. Training goes through ``engine.train`` into a run
folder keyed by the run's configuration (``<runs>/<model>-<data>-<key>``): a later study with
the same configuration reuses the finished run (``retrain`` forces a new one), an unfinished one
is resumed from its checkpoint.

What it measures, per model and density: the validation metric (accuracy / mIoU, per class),
parameters, MACs per image (dense and executed, ``measure.MacCounter``) and the measured density
of every level, over the whole validation split; latency per image at batch 1 and at the default
batch, at each CPU thread count (default 1 and all cores) and on the GPU when ``device`` is
CUDA, every model of a data set timed in the same rounds, alternating (``measure.time_alternating``),
the sparse models' own mask policy inside the timing; per-stage time of the two U-Nets; training
time. Machine facts go with the numbers.

What it writes into ``out`` (default ``reports/study-<data>``): ``results.json`` (every number),
``REPORT.md`` and the figures (``report.py``), ``qualitative-<data>.npz`` (the scenes of the
qualitative figure), and ``study_state.json``: the completed stages of this study. An interrupted
study resumes from it (same configuration); a finished one is measured afresh (only the training
is reused).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import platform
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader

from . import engine, measure
from .checkpoint import CHECKPOINT_NAME, WEIGHTS_NAME, CheckpointError, load_checkpoint
from .config import TrainConfig
from .data import dataset_info
from .device import resolve_device
from .registry import count_parameters, model_defaults

log = logging.getLogger("spconv2d.zoo")

SCHEMA = "spconv2d.study/1"
DEFAULT_DENSITIES = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
MODELS = {"classification": ("mlp", "cnn", "sparse_cnn"), "segmentation": ("unet", "sparse_unet")}
DENSE_TWIN = {"sparse_cnn": "cnn", "sparse_unet": "unet"}
STATE_NAME = "study_state.json"
RESULTS_NAME = "results.json"
# --quick: tiny training budgets (one epoch of a few hundred digits / a few dozen scenes), few
# timing rounds and scenes; a smoke run (the report says so)
QUICK = dict(epochs=1, rounds=3, warmup=1, num_scenes=3, timing_budget_s=10.0,
             split={"classification": (1000, 300), "segmentation": (64, 16)})
DEFAULTS = dict(rounds=15, warmup=2, num_scenes=6, timing_budget_s=None)
# fields of a run's TrainConfig that do not change what is trained
RUN_KEY_IGNORED = ("out", "resume", "progress", "num_workers", "num_predictions", "download", "cache_dir")


@dataclass
class StudyConfig:
    """The study's options (``spconv2d study --help``). ``None``: the default, or the ``quick``
    preset's value (``resolved()``)."""

    data: Tuple[str, ...] = ("mnist", "streets")
    data_root: Optional[str] = None
    out: Optional[str] = None                      # default reports/study-<data>
    runs: str = os.path.join("runs", "study")      # where the trained runs live (keyed folders)
    quick: bool = False
    densities: Optional[Tuple[float, ...]] = None  # sparse_unet's sweep (default DEFAULT_DENSITIES)
    train_per_density: bool = False
    retrain: bool = False
    device: str = "cpu"                            # cpu | cuda | auto
    threads: Optional[int] = None                  # training/evaluation threads (None: torch's)
    timing_threads: Optional[Tuple[int, ...]] = None  # CPU thread counts timed (default 1, all cores)
    rounds: Optional[int] = None                   # timing rounds per setting
    warmup: Optional[int] = None                   # untimed rounds first
    timing_budget_s: Optional[float] = None        # stop a timing setting's rounds after this (quick: 10 s)
    timing_batch: Optional[int] = None             # default: the models' training batch size
    epochs: Optional[int] = None                   # override every model's epochs
    num_train: Optional[int] = None                # override every data set's split sizes
    num_val: Optional[int] = None
    size: Optional[Tuple[int, int]] = None         # segmentation image size
    num_scenes: Optional[int] = None               # scenes in the qualitative figure
    seed: int = 0
    progress: bool = True
    model_kwargs: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # per model (Python only)
    command: Optional[str] = None                  # the command line, for the report

    def __post_init__(self):
        if isinstance(self.data, str):
            self.data = (self.data,)
        self.data = tuple(self.data)
        for name in ("densities", "timing_threads", "size"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, tuple(v))

    def resolved(self) -> "StudyConfig":
        """A copy with every ``None`` filled in (the ``quick`` preset where it applies) and the
        device resolved; ``ValueError`` for an unknown data set or a bad value."""
        c = dataclasses.replace(self, model_kwargs=copy.deepcopy(self.model_kwargs))
        for d in c.data:
            dataset_info(d)  # unknown data sets: the zoo's one error message
        if not c.data:
            raise ValueError("study: no data set given")
        if c.device == "auto":
            c.device = "cuda" if torch.cuda.is_available() else "cpu"
        if torch.device(c.device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"study: device {c.device!r} requested but CUDA is not available")
        preset = QUICK if c.quick else DEFAULTS
        for k in ("rounds", "warmup", "num_scenes", "timing_budget_s"):
            if getattr(c, k) is None:
                setattr(c, k, preset[k])
        if c.quick and c.epochs is None:
            c.epochs = QUICK["epochs"]
        if c.densities is None:
            c.densities = DEFAULT_DENSITIES
        c.densities = tuple(sorted({float(d) for d in c.densities}))
        if any(not 0 < d <= 1 for d in c.densities):
            raise ValueError(f"study: densities must be in (0, 1], got {c.densities}")
        if c.timing_threads is None:
            cores = os.cpu_count() or 1
            c.timing_threads = (1, cores) if cores > 1 else (1,)
        c.timing_threads = tuple(dict.fromkeys(int(t) for t in c.timing_threads))
        if c.rounds < 1 or any(t < 1 for t in c.timing_threads):
            raise ValueError("study: rounds and timing threads must be >= 1")
        if c.out is None:
            c.out = os.path.join("reports", "study-" + "-".join(c.data))
        return c

    def fingerprint(self) -> str:
        """What a resumed study must share with the interrupted one (not threads, progress,
        retrain or the command line)."""
        d = dataclasses.asdict(self)
        for k in ("threads", "progress", "retrain", "command", "out"):
            d.pop(k)
        return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]

    def to_command(self) -> str:
        """An equivalent ``spconv2d study`` command line (the options that differ from the
        defaults; ``model_kwargs`` have no option and are noted)."""
        parts = ["spconv2d", "study"]
        defaults = StudyConfig()
        for f in dataclasses.fields(self):
            v, d = getattr(self, f.name), getattr(defaults, f.name)
            if f.name in ("command", "model_kwargs", "threads") or v == d or v is None:
                continue
            flag = "--" + f.name.replace("_", "-")
            if isinstance(v, bool):
                parts.append(flag if v else "--no-progress" if f.name == "progress" else "")
            elif isinstance(v, tuple):
                parts += [flag] + [str(x) for x in v]
            else:
                parts += [flag, str(v)]
        cmd = " ".join(p for p in parts if p)
        if self.model_kwargs:
            cmd += f"   # Python only: model_kwargs={self.model_kwargs}"
        return cmd


# --------------------------------------------------------------------------------------------
# command line (``spconv2d study``; cli.py adds the subcommand)
# --------------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    """The ``spconv2d study`` options."""
    p.add_argument("--data", nargs="+", default=list(StudyConfig.data),
                   help="data sets (default: mnist streets; cityscapes needs --data-root)")
    p.add_argument("--data-root", help="folder with MNIST/raw/ or Cityscapes' leftImg8bit/ + gtFine/")
    p.add_argument("--out", help="report folder (default reports/study-<data>)")
    p.add_argument("--runs", default=StudyConfig.runs, help="folder of the trained runs, keyed by their "
                   "configuration (default runs/study)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny training budgets, few rounds "
                   "and scenes (< 3 min on a 2-core CPU)")
    p.add_argument("--densities", nargs="+", type=float, help="sparse_unet's density sweep "
                   f"(default {' '.join(map(str, DEFAULT_DENSITIES))})")
    p.add_argument("--train-per-density", action="store_true",
                   help="also train sparse_unet at every density of the sweep")
    p.add_argument("--retrain", action="store_true", help="train again even when a finished run with "
                   "the same configuration exists")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto (training, evaluation, GPU timing)")
    p.add_argument("--threads", type=int, help="torch CPU threads for training and evaluation "
                   "(default: the idle cores)")
    p.add_argument("--timing-threads", nargs="+", type=int, help="CPU thread counts the latency is "
                   "measured at (default: 1 and all cores)")
    p.add_argument("--rounds", type=int, help=f"timing rounds per setting (default {DEFAULTS['rounds']}, "
                   f"--quick {QUICK['rounds']})")
    p.add_argument("--warmup", type=int, help="untimed rounds before timing")
    p.add_argument("--timing-budget-s", type=float, help="stop a timing setting after the round that ends past "
                   f"this many seconds (default: none; --quick {QUICK['timing_budget_s']:g})")
    p.add_argument("--timing-batch", type=int, help="the batch timed besides batch 1 (default: the "
                   "models' training batch size)")
    p.add_argument("--epochs", type=int, help="override every model's training epochs")
    p.add_argument("--num-train", type=int, help="override the training split size (every data set)")
    p.add_argument("--num-val", type=int, help="override the validation split size (every data set)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="segmentation image size")
    p.add_argument("--num-scenes", type=int, help="validation scenes in the qualitative figure")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def from_args(args, argv: Optional[Sequence[str]] = None) -> StudyConfig:
    names = {f.name for f in dataclasses.fields(StudyConfig)} - {"model_kwargs", "command"}
    kw = {k: getattr(args, k) for k in names if hasattr(args, k)}
    cmd = " ".join(["spconv2d"] + list(argv)) if argv is not None else None
    return StudyConfig(command=cmd, **kw)


# --------------------------------------------------------------------------------------------
# training runs, keyed by their configuration
# --------------------------------------------------------------------------------------------
def _field_defaults() -> Dict[str, Any]:
    out = {}
    for f in dataclasses.fields(TrainConfig):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


def run_fields(cfg: TrainConfig) -> Dict[str, Any]:
    """What identifies a (resolved) run: its config without the fields that do not change the
    result (output folder, progress bar, workers, ...) and without fields at their dataclass
    default (so that a new option, at its default, keeps old runs' keys); the device as the type
    it resolves to, left out when that is the CPU (``auto`` on a machine without a GPU trains
    the same run as ``cpu``)."""
    d = json.loads(json.dumps(cfg.to_dict(), default=str))  # as metrics.json holds it (tuples -> lists)
    defaults = json.loads(json.dumps(_field_defaults(), default=str))
    out = {}
    for k, v in d.items():
        if k in RUN_KEY_IGNORED:
            continue
        if k == "device":
            v = resolve_device(v).type if v == "auto" else torch.device(v).type
            if v == "cpu":
                continue
        if k in defaults and v == defaults[k]:
            continue
        out[k] = v
    return out


def run_key(cfg: TrainConfig) -> str:
    """A short hash of ``run_fields(cfg)`` (``cfg`` resolved)."""
    return hashlib.sha1(json.dumps(run_fields(cfg), sort_keys=True, default=str).encode()).hexdigest()[:10]


def run_dir(cfg: TrainConfig, runs: str) -> str:
    return os.path.join(runs, f"{cfg.model}-{cfg.data}-{run_key(cfg)}")


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def ensure_run(cfg: TrainConfig, runs: str, retrain: bool = False) -> Dict[str, Any]:
    """Train ``cfg`` into its keyed folder under ``runs``, or reuse / resume what is there.

    Reused: the folder's ``metrics.json`` has the same ``run_fields``, every epoch done, and
    ``model.safetensors`` exists (not with ``retrain``). Resumed: its checkpoint has the same
    configuration and fewer epochs. Otherwise trained from scratch. Returns ``{"dir", "key",
    "action": "reused" | "resumed" | "trained", "metrics", "threads", "wall_s"}``."""
    cfg = dataclasses.replace(cfg, out=None, resume=False).resolved()
    want = run_fields(cfg)
    out = run_dir(cfg, runs)
    cfg.out = out
    metrics = _read_json(os.path.join(out, "metrics.json"))
    side = _read_json(os.path.join(out, "study_run.json")) or {}
    same = metrics is not None and run_fields(TrainConfig.from_dict(metrics["config"])) == want
    finished = same and len(metrics["epochs"]) >= cfg.epochs and os.path.isfile(os.path.join(out, WEIGHTS_NAME))
    if finished and not retrain:
        return {"dir": out, "key": run_key(cfg), "action": "reused", "metrics": metrics,
                "threads": side.get("threads"), "wall_s": side.get("wall_s"), "fields": want}
    action = "trained"
    ckpt_path = os.path.join(out, CHECKPOINT_NAME)
    if not retrain and os.path.isfile(ckpt_path):
        try:
            ck = load_checkpoint(ckpt_path)
            if (ck["epoch"] is not None and ck["optimizer_state"] is not None
                    and run_fields(TrainConfig.from_dict(ck["config"])) == want and ck["epoch"] < cfg.epochs):
                action = "resumed"
        except CheckpointError as e:
            log.warning("%s: unreadable checkpoint, training from scratch (%s)", out, e)
    elif metrics is not None and not same:
        log.warning("%s holds a run of another configuration; training from scratch", out)
    t0 = time.perf_counter()
    if action == "resumed":
        metrics = engine.train(model=cfg.model, out=out, resume=True, epochs=cfg.epochs, device=cfg.device,
                               progress=cfg.progress)
    else:
        metrics = engine.train(cfg)
    wall = time.perf_counter() - t0
    threads = torch.get_num_threads()
    engine.write_json(os.path.join(out, "study_run.json"), {"threads": threads, "wall_s": wall, "action": action,
                                                            "fields": want})
    return {"dir": out, "key": run_key(cfg), "action": action, "metrics": metrics, "threads": threads,
            "wall_s": wall, "fields": want}


def train_command(fields: Dict[str, Any], out: str) -> str:
    """The ``spconv2d train`` command of a run (its ``run_fields``)."""
    parts = ["spconv2d", "train", str(fields.get("model", TrainConfig.model))]
    flags = {}
    for f in TrainConfig.cli_fields():
        meta = f.metadata["cli"]
        if not meta.get("positional"):
            flags[f.name] = meta.get("flag") or "--" + f.name.replace("_", "-")
    for k, v in fields.items():
        if k in ("model", "device") or k not in flags:
            continue
        if isinstance(v, bool):
            parts.append(flags[k])
        elif isinstance(v, list):
            parts += [flags[k]] + [str(x) for x in v]
        else:
            parts += [flags[k], str(v)]
    if fields.get("device", "cpu") != "cpu":
        parts += ["--device", fields["device"]]
    parts += ["--out", out]
    cmd = " ".join(parts)
    if fields.get("model_kwargs"):
        cmd += f"   # Python only: model_kwargs={fields['model_kwargs']}"
    return cmd


# --------------------------------------------------------------------------------------------
# machine facts
# --------------------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_facts(device: str) -> Dict[str, Any]:
    """CPU model, cores, threads, load, GPU, library versions (what the numbers depend on)."""
    import spconv2d
    from spconv2d import backends

    try:
        load = list(os.getloadavg())
    except (OSError, AttributeError):
        load = None
    facts = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads_default": torch.get_num_threads(),
             "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
             "triton": _version("triton"), "numba": _version("numba"), "spconv2d": spconv2d.__version__,
             "cpu_backend": backends.resolve(torch.device("cpu")).name, "load_average": load,
             "gpu": None, "cuda": torch.version.cuda, "cudnn": None}
    if torch.device(device).type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(torch.device(device))
        facts["cudnn"] = torch.backends.cudnn.version()
        facts["gpu_backend"] = backends.resolve(torch.device(device)).name
    return facts


# --------------------------------------------------------------------------------------------
# the plan: runs, evaluated points, stages
# --------------------------------------------------------------------------------------------
@dataclass
class Point:
    """One evaluated model: a run, evaluated at a density (``None``: its own policy)."""

    id: str
    data: str
    model: str
    run: str                       # the run's id in the plan
    density: Optional[float]       # evaluation density (sparse_unet sweep)
    trained_density: Optional[float]
    label: str


def _fmt_d(d: Optional[float]) -> str:
    return "" if d is None else f"{d:.2f}"


class Plan:
    """The runs to train and the points to measure, per data set."""

    def __init__(self, cfg: StudyConfig):
        self.cfg = cfg
        self.runs: Dict[str, TrainConfig] = {}
        self.points: Dict[str, List[Point]] = {}
        self.task: Dict[str, str] = {}
        for data in cfg.data:
            info = dataset_info(data, cfg.size)
            self.task[data] = info.task
            pts: List[Point] = []
            for model in MODELS[info.task]:
                md = model_defaults(model)
                if model == "sparse_unet":
                    dens = md.density  # trained there; always evaluated there too
                    rid = self._add_run(data, model, info.task, None)
                    for d in sorted(set(cfg.densities) | {dens}):
                        pts.append(Point(f"{model}@{_fmt_d(d)}", data, model, rid, d, dens,
                                         f"{model} @ {_fmt_d(d)}"))
                    if cfg.train_per_density:
                        for d in cfg.densities:
                            if abs(d - dens) < 1e-9:
                                continue
                            r2 = self._add_run(data, model, info.task, d)
                            pts.append(Point(f"{model}[trained {_fmt_d(d)}]@{_fmt_d(d)}", data, model, r2, d, d,
                                             f"{model} trained @ {_fmt_d(d)}"))
                else:
                    rid = self._add_run(data, model, info.task, None)
                    pts.append(Point(model, data, model, rid, None, md.density, model))
            self.points[data] = pts

    def _add_run(self, data, model, task, density) -> str:
        cfg = self.cfg
        kw = dict(model=model, data=data, data_root=cfg.data_root, seed=cfg.seed, device=cfg.device,
                  progress=cfg.progress, num_predictions=4 if cfg.quick else 8,
                  model_kwargs=dict(cfg.model_kwargs.get(model, {})))
        if cfg.epochs is not None:
            kw["epochs"] = cfg.epochs
        if task == "segmentation" and cfg.size is not None:
            kw["size"] = cfg.size
        if cfg.quick:
            kw["num_train"], kw["num_val"] = QUICK["split"][task]
        if cfg.num_train is not None:
            kw["num_train"] = cfg.num_train
        if cfg.num_val is not None:
            kw["num_val"] = cfg.num_val
        if density is not None:
            kw["density"] = density
        rid = f"{model}-{data}" + ("" if density is None else f"-d{_fmt_d(density)}")
        self.runs[rid] = TrainConfig(**kw)
        return rid

    def timing_batch(self, data: str) -> int:
        """The batch timed besides batch 1: ``cfg.timing_batch`` or the models' training batch
        size, at most the validation split's size."""
        b = self.cfg.timing_batch or model_defaults(MODELS[self.task[data]][-1]).batch_size
        n_val = self.runs[f"{MODELS[self.task[data]][0]}-{data}"].resolved().num_val
        return max(1, min(b, n_val)) if n_val else b

    def batches(self, data: str) -> Tuple[int, ...]:
        return tuple(dict.fromkeys((1, self.timing_batch(data))))

    def reference(self, data: str) -> Dict[str, Point]:
        """The dense U-Net and the sparse one at its trained (default) density."""
        pts = self.points[data]
        dense = next(p for p in pts if p.model == "unet")
        sparse = next(p for p in pts if p.model == "sparse_unet" and p.run == f"sparse_unet-{data}"
                      and abs(p.density - p.trained_density) < 1e-9)
        return {"unet": dense, "sparse_unet": sparse}

    def settings(self) -> List[Dict[str, Any]]:
        """Timing settings (without the batch): CPU at each thread count, then the GPU."""
        out = [{"device": "cpu", "threads": t} for t in self.cfg.timing_threads]
        if torch.device(self.cfg.device).type == "cuda":
            out.append({"device": self.cfg.device, "threads": None})
        return out


def setting_name(device: str, threads: Optional[int], batch: int) -> str:
    dev = torch.device(device).type
    return f"{dev}-{threads}t-b{batch}" if dev == "cpu" else f"{dev}-b{batch}"


# --------------------------------------------------------------------------------------------
# the study
# --------------------------------------------------------------------------------------------
class _State:
    """``study_state.json``: the results of the completed stages, written after each stage."""

    def __init__(self, path: str, fingerprint: str):
        self.path, self.fingerprint = path, fingerprint
        old = _read_json(path)
        if old and old.get("fingerprint") == fingerprint and not old.get("complete"):
            self.stages = old.get("stages", {})
            self.started = old.get("started")
            self.resumed = bool(self.stages)
        else:
            self.stages, self.started, self.resumed = {}, None, False
        self.complete = False

    def save(self) -> None:
        engine.write_json(self.path, {"fingerprint": self.fingerprint, "complete": self.complete,
                                      "started": self.started, "stages": self.stages})


class Study:
    """Runs the stages of one study (``run_study`` is the entry point)."""

    def __init__(self, cfg: StudyConfig):
        self.given = cfg  # as given (the command line in the report), before resolved()
        self.cfg = cfg.resolved()
        self.plan = Plan(self.cfg)
        self.device = torch.device(self.cfg.device)
        self._models: Dict[Tuple[str, str], torch.nn.Module] = {}
        self._val: Dict[str, Any] = {}
        self._infos: Dict[str, Any] = {}

    # ------------------------------------------------------------------ helpers
    def _threads(self):
        """A context setting the training / evaluation threads (``cfg.threads``), restored after."""

        @contextlib.contextmanager
        def cm(n):
            old = torch.get_num_threads()
            if n:
                torch.set_num_threads(n)
            try:
                yield
            finally:
                torch.set_num_threads(old)
        return cm(self.cfg.threads)

    def val_set(self, data: str):
        """The validation split every run of ``data`` is evaluated on (as ``engine.get_datasets``
        builds it from the runs' shared configuration)."""
        if data not in self._val:
            from .data import build_dataset

            cfg = self.plan.runs[f"{MODELS[self.plan.task[data]][0]}-{data}"].resolved()
            self._val[data] = build_dataset(cfg.data, "val", num_samples=cfg.num_val, data_root=cfg.data_root,
                                            download=cfg.download, size=cfg.size, seed=cfg.seed)
        return self._val[data]

    def model(self, point: Point, run_info: Dict[str, Any], device: torch.device) -> torch.nn.Module:
        """The point's model on ``device`` (eval mode), its mask policy at the point's density."""
        key = (point.id + "/" + point.data, str(device))
        if key not in self._models:
            model, _, _, info = engine.load_model(run_info["dir"], str(device))
            self._infos[point.data] = info
            if point.density is not None and getattr(model, "sparse", False):
                model.set_mask_policy(density=point.density)
            self._models[key] = model
        return self._models[key]

    # ------------------------------------------------------------------ stages
    def stage_train(self, rid: str) -> Dict[str, Any]:
        with self._threads():
            r = ensure_run(self.plan.runs[rid], self.cfg.runs, self.cfg.retrain)
        m = r["metrics"]
        return {"dir": r["dir"], "key": r["key"], "action": r["action"], "fields": r["fields"],
                "threads": r["threads"], "wall_s": r["wall_s"], "train_time_s": m["final"]["train_time_s"],
                "epochs": m["epochs"], "data_source": m.get("data_source"),
                "command": train_command(r["fields"], r["dir"])}

    def stage_eval(self, point: Point, runs: Dict[str, Any]) -> Dict[str, Any]:
        run = runs[point.run]
        model = self.model(point, run, self.device)
        info = self._infos[point.data]
        val = self.val_set(point.data)
        bs = 2 * model_defaults(point.model).batch_size
        loader = DataLoader(val, batch_size=bs, shuffle=False)
        with self._threads(), measure.MacCounter(model) as mc:
            res = engine.evaluate(model, loader, task=info.task, num_classes=info.num_classes, device=self.device,
                                  class_names=info.class_names, eval_classes=info.eval_classes)
        metric = "accuracy" if info.task == "classification" else "miou"
        macs = mc.summary(images=res["images"])
        per_forward = len(mc.profile.records) // max(1, len(loader))
        return {"metric": metric, "value": res[metric], "loss": res["loss"],
                "per_class": res.get("per_class_iou", res.get("per_class_accuracy")),
                "pixel_accuracy": res.get("pixel_accuracy"), "measured_density": res["density"],
                "images": res["images"], "parameters": count_parameters(model), "macs": macs,
                "ops": measure.op_records(mc, per_forward)}

    def _inputs(self, data: str, batch: int, device: torch.device) -> torch.Tensor:
        val = self.val_set(data)
        n = min(batch, len(val))
        return torch.stack([val[i][0] for i in range(n)]).to(device)

    def stage_timing(self, data: str, setting: Dict[str, Any], batch: int, runs) -> Dict[str, Any]:
        """Latency of every point of ``data`` at one setting, all models in the same rounds
        (batch 1: round ``r`` runs validation image ``r`` mod the timing batch)."""
        device = torch.device(setting["device"])
        images = self._inputs(data, self.plan.timing_batch(data), device)
        models = {p.id: self.model(p, runs[p.run], device) for p in self.plan.points[data]}
        if batch == 1:
            calls = {pid: (lambda r, m=m: m(images[r % len(images)][None])) for pid, m in models.items()}
        else:
            calls = {pid: (lambda r, m=m: m(images)) for pid, m in models.items()}
        old_threads, old_bench = torch.get_num_threads(), torch.backends.cudnn.benchmark
        try:
            if setting["threads"]:
                torch.set_num_threads(setting["threads"])
            warmup = self.cfg.warmup if device.type == "cpu" else max(self.cfg.warmup, 5)
            if device.type == "cuda":
                torch.backends.cudnn.benchmark = True  # the dense twin's convolutions: cuDNN's best
            times = measure.time_alternating(calls, self.cfg.rounds, warmup, device,
                                             budget_s=self.cfg.timing_budget_s)
        finally:
            torch.set_num_threads(old_threads)
            torch.backends.cudnn.benchmark = old_bench
        n_img = 1 if batch == 1 else len(images)
        rounds = len(next(iter(times.values())))
        return {"device": device.type, "threads": setting["threads"], "batch": n_img, "rounds": rounds,
                "seconds": times, "spread_ms": {pid: measure.spread(t, 1e3) for pid, t in times.items()},
                "per_image_ms": {pid: measure.spread(t, 1e3 / n_img) for pid, t in times.items()}}

    def stage_unet_steps(self, data: str, setting: Dict[str, Any], runs) -> Dict[str, Any]:
        """Per-stage time of ``unet`` and ``sparse_unet`` (default density) at the timing batch."""
        device = torch.device(setting["device"])
        batch = self.plan.timing_batch(data)
        x = self._inputs(data, batch, device)
        pts = self.plan.reference(data)
        stage_times: Dict[str, Dict[str, List[float]]] = {}
        calls = {}
        for name in ("unet", "sparse_unet"):
            m = copy.deepcopy(self.model(pts[name], runs[pts[name].run], device))
            stage_times[name] = defaultdict(list)
            measure.instrument_stages(m, stage_times[name], device)
            calls[name] = (lambda r, m=m: m(x))
        old, old_bench = torch.get_num_threads(), torch.backends.cudnn.benchmark
        try:
            if setting["threads"]:
                torch.set_num_threads(setting["threads"])
            if device.type == "cuda":
                torch.backends.cudnn.benchmark = True
            totals = measure.time_alternating(calls, self.cfg.rounds, self.cfg.warmup, device,
                                              budget_s=self.cfg.timing_budget_s)
        finally:
            torch.set_num_threads(old)
            torch.backends.cudnn.benchmark = old_bench
        out = {"device": device.type, "threads": setting["threads"], "batch": len(x), "models": {},
               "rounds": len(totals["unet"])}
        skip = self.cfg.warmup  # the warm-up rounds' stage times come first
        for name in calls:
            stages = {k: measure.spread(v[skip:], 1e3) for k, v in stage_times[name].items() if v[skip:]}
            total = measure.spread(totals[name], 1e3)
            other = total["median"] - sum(s["median"] for k, s in stages.items() if k not in measure.NESTED_STAGES)
            out["models"][name] = {"point": pts[name].id, "stages_ms": stages, "total_ms": total, "other_ms": other}
        return out

    def stage_qualitative(self, data: str, runs) -> Dict[str, Any]:
        import numpy as np

        val = self.val_set(data)
        n = min(self.cfg.num_scenes, len(val))
        idx = torch.linspace(0, len(val) - 1, n).long().tolist()
        images = torch.stack([val[i][0] for i in idx]).to(self.device)
        targets = torch.stack([torch.as_tensor(val[i][1]) for i in idx])
        pts = self.plan.reference(data)
        dense = self.model(pts["unet"], runs[pts["unet"].run], self.device)
        sparse = self.model(pts["sparse_unet"], runs[pts["sparse_unet"].run], self.device)
        with torch.no_grad(), self._threads():
            mask = sparse.make_mask(images)
            pd = dense(images).argmax(1).cpu()
            ps = sparse(images, mask).argmax(1).cpu()
        name = f"qualitative-{data}.npz"
        np.savez_compressed(os.path.join(self.cfg.out, name),
                            images=(images.cpu().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy(),
                            targets=targets.numpy().astype(np.uint8), dense=pd.numpy().astype(np.uint8),
                            sparse=ps.numpy().astype(np.uint8), mask=mask.cpu().numpy(), indices=np.array(idx),
                            density=np.array(sparse.policy.density))
        return {"file": name, "indices": idx, "points": [pts["unet"].id, pts["sparse_unet"].id]}

    # ------------------------------------------------------------------ the run
    def stages(self) -> List[Tuple[str, Callable[[Dict[str, Any]], Any]]]:
        """``(name, fn(done))``: ``done`` maps every completed stage's name to its result."""
        plan, out = self.plan, []
        for rid in plan.runs:
            out.append((f"train/{rid}", lambda done, rid=rid: self.stage_train(rid)))

        def runs_of(done):
            return {rid: done[f"train/{rid}"] for rid in plan.runs}

        for data, pts in plan.points.items():
            for p in pts:
                out.append((f"eval/{data}/{p.id}", lambda done, p=p: self.stage_eval(p, runs_of(done))))
        for data in plan.points:
            for s in plan.settings():
                for b in plan.batches(data):
                    name = f"time/{data}/{setting_name(s['device'], s['threads'], b)}"
                    out.append((name, lambda done, d=data, s=s, b=b: self.stage_timing(d, s, b, runs_of(done))))
        for data, task in plan.task.items():
            if task != "segmentation":
                continue
            for s in plan.settings():
                name = f"steps/{data}/{setting_name(s['device'], s['threads'], plan.timing_batch(data))}"
                out.append((name, lambda done, d=data, s=s: self.stage_unet_steps(d, s, runs_of(done))))
            out.append((f"qualitative/{data}", lambda done, d=data: self.stage_qualitative(d, runs_of(done))))
        return out

    def run(self) -> Dict[str, Any]:
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        cfg = self.cfg
        os.makedirs(cfg.out, exist_ok=True)
        state = _State(os.path.join(cfg.out, STATE_NAME), cfg.fingerprint())
        if state.started is None:
            state.started = datetime.datetime.now().isoformat(timespec="seconds")
        if state.resumed:
            log.info("study: resuming %s (%d stages done)", cfg.out, len(state.stages))
        machine_start = machine_facts(cfg.device)
        stages = self.stages()
        t_study = time.perf_counter()
        timings = []
        # the bar and the log lines share stderr: route the zoo logger's console handler (the
        # command's) through tqdm; a logger without one (Python use) is left as it is
        console = any(isinstance(h, logging.StreamHandler) for h in log.handlers)
        with (logging_redirect_tqdm(loggers=[log]) if console else contextlib.nullcontext()):
            bar = tqdm(total=len(stages) + 1, desc="study", disable=not cfg.progress, dynamic_ncols=True)
            for i, (name, fn) in enumerate(stages):
                if name in state.stages:
                    timings.append({"stage": name, "seconds": state.stages[name].get("_seconds"), "resumed": True})
                    bar.update(1)
                    continue
                bar.set_description(f"study: {name}")
                t0 = time.perf_counter()
                result = fn(state.stages)
                dt = time.perf_counter() - t0
                result["_seconds"] = dt
                state.stages[name] = result
                state.save()
                timings.append({"stage": name, "seconds": dt, "resumed": False})
                log.info("study [%d/%d] %s: %s (%.1fs)", i + 1, len(stages) + 1, name, _describe(name, result), dt)
                bar.update(1)
            bar.set_description("study: report")
            t0 = time.perf_counter()
            results = assemble(self, state.stages, machine_start, timings, time.perf_counter() - t_study, state)
            from .report import write_report

            results["figures"] = write_report(results, cfg.out)
            results["study"]["report_s"] = time.perf_counter() - t0
            engine.write_json(os.path.join(cfg.out, RESULTS_NAME), results)
            state.complete = True
            state.save()
            log.info("study [%d/%d] report: %s (%.1fs)", len(stages) + 1, len(stages) + 1,
                     os.path.join(cfg.out, "REPORT.md"), time.perf_counter() - t0)
            bar.update(1)
            bar.close()
        return results


def _describe(name: str, r: Dict[str, Any]) -> str:
    kind = name.split("/")[0]
    if kind == "train":
        m = r["epochs"][-1] if r["epochs"] else {}
        score = m.get("miou", m.get("accuracy"))
        return (f"{r['action']} {r['dir']} ({len(r['epochs'])} epochs, {r['train_time_s']:.0f}s of training"
                + (f", val {100 * score:.2f}%" if score is not None else "") + ")")
    if kind == "eval":
        return (f"{r['metric']} {100 * r['value']:.2f}%, density {r['measured_density']:.3f}, "
                f"{r['macs']['executed_per_image'] / 1e6:.1f} MMAC/image ({100 * r['macs']['fraction']:.0f}% of dense)")
    if kind == "time":
        return ", ".join(f"{k} {v['median']:.2f}" for k, v in r["per_image_ms"].items()) + " ms/image"
    if kind == "steps":
        return ", ".join(f"{k} {v['total_ms']['median']:.1f}" for k, v in r["models"].items()) + " ms/batch"
    if kind == "qualitative":
        return f"{len(r['indices'])} scenes -> {r['file']}"
    return ""


def assemble(study: Study, done: Dict[str, Any], machine_start: Dict[str, Any], timings, elapsed: float,
             state: _State) -> Dict[str, Any]:
    """``results.json``: every number, per data set and per evaluated point."""
    cfg, plan = study.cfg, study.plan
    runs = {rid: done[f"train/{rid}"] for rid in plan.runs}
    machine = dict(machine_start)
    try:
        machine["load_average_end"] = list(os.getloadavg())
    except (OSError, AttributeError):
        machine["load_average_end"] = None
    cfg_dict = dataclasses.asdict(cfg)
    results: Dict[str, Any] = {
        "schema": SCHEMA,
        "study": {"config": cfg_dict, "quick": cfg.quick, "command": cfg.command or study.given.to_command(),
                  "python_command": _python_command(study.given), "started": state.started,
                  "finished": datetime.datetime.now().isoformat(timespec="seconds"),
                  "elapsed_s": elapsed, "resumed": state.resumed,
                  "stages_s": sum(t["seconds"] or 0 for t in timings),
                  "train_s": sum(t["seconds"] or 0 for t in timings if t["stage"].startswith("train/")),
                  "stages": timings},
        "machine": machine, "data": {}}
    for data, pts in plan.points.items():
        task = plan.task[data]
        batch = plan.timing_batch(data)
        settings = [setting_name(s["device"], s["threads"], b) for s in plan.settings() for b in plan.batches(data)]
        entries = []
        for p in pts:
            ev = done[f"eval/{data}/{p.id}"]
            run = runs[p.run]
            latency, speedup = {}, {}
            for sname in settings:
                t = done[f"time/{data}/{sname}"]
                sp_ms, pi = t["spread_ms"][p.id], t["per_image_ms"][p.id]
                latency[sname] = {"device": t["device"], "threads": t["threads"], "batch": t["batch"],
                                  "rounds": t["rounds"], "median_ms": sp_ms["median"], "p25_ms": sp_ms["p25"],
                                  "p75_ms": sp_ms["p75"], "min_ms": sp_ms["min"], "max_ms": sp_ms["max"],
                                  "per_image_ms": pi["median"], "per_image_p25_ms": pi["p25"],
                                  "per_image_p75_ms": pi["p75"]}
                twin = DENSE_TWIN.get(p.model)
                if twin is not None:
                    dense_id = next(q.id for q in pts if q.model == twin)
                    pr = measure.paired_ratios(t["seconds"][dense_id], t["seconds"][p.id])
                    speedup[sname] = {"ratio_of_medians": t["spread_ms"][dense_id]["median"] / sp_ms["median"],
                                      "paired_median": pr["median"], "paired_p25": pr["p25"], "paired_p75": pr["p75"]}
            hist = run["epochs"]
            entries.append({
                "id": p.id, "label": p.label, "model": p.model, "data": data, "task": task,
                "sparse": p.model in DENSE_TWIN, "dense_twin": DENSE_TWIN.get(p.model),
                "density": p.density, "trained_density": p.trained_density,
                "measured_density": ev["measured_density"], "metric": ev["metric"], "value": ev["value"],
                "loss": ev["loss"], "per_class": ev["per_class"], "pixel_accuracy": ev["pixel_accuracy"],
                "parameters": ev["parameters"], "macs": {k: v for k, v in ev["macs"].items()},
                "levels": ev["macs"]["levels"], "ops": ev["ops"], "latency": latency,
                "speedup_vs_dense": speedup if p.model in DENSE_TWIN else None,
                "train": {"run": run["dir"], "action": run["action"], "command": run["command"],
                          "train_time_s": run["train_time_s"], "epochs": len(hist), "threads": run["threads"],
                          "history": hist, "fields": run["fields"]},
            })
        info = dataset_info(data, cfg.size)
        block = {"task": task, "metric": entries[0]["metric"], "timing_batch": batch, "settings": settings,
                 "source": study.val_set(data).source, "train_source": runs[pts[0].run].get("data_source"),
                 "eval_classes": [info.class_names[i] for i in info.eval_classes], "models": entries}
        if task == "segmentation":
            block["steps"] = {s: done[f"steps/{data}/{s}"] for s in
                              (setting_name(x["device"], x["threads"], batch) for x in plan.settings())}
            block["qualitative"] = done[f"qualitative/{data}"]
        results["data"][data] = block
    return results


def _python_command(cfg: StudyConfig) -> str:
    d = StudyConfig()
    kw = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.name in ("command",) or v == getattr(d, f.name) or v is None:
            continue
        kw.append(f"{f.name}={v!r}")
    return f"spconv2d.zoo.run_study(StudyConfig({', '.join(kw)}))"


def run_study(config: Optional[StudyConfig] = None, **kwargs) -> Dict[str, Any]:
    """Run the study (``StudyConfig`` or its fields as keywords); returns ``results.json``'s
    content. Sets torch's CPU threads while it times (restored after)."""
    cfg = dataclasses.replace(config, **kwargs) if config is not None else StudyConfig(**kwargs)
    return Study(cfg).run()
