"""Training loop: loss goes down, outputs, one evaluation per epoch, resume after an interruption,
checkpoint errors, load_model for every data set."""
import json

import pytest
import torch

import spconv2d.zoo as zoo
from spconv2d.zoo import engine
from spconv2d.zoo.checkpoint import CheckpointError, load_checkpoint, save_weights
from spconv2d.zoo.data import DATASETS, DatasetInfo, dataset_info

TINY_MNIST = dict(data="mnist", num_train=256, num_val=64, batch_size=32, progress=False)
TINY_STREETS = dict(data="streets", num_train=8, num_val=4, batch_size=4, size=(32, 64), progress=False,
                    num_predictions=2)


def test_tiny_training_run_loss_goes_down(tmp_path):
    m = zoo.train(model="mlp", epochs=4, lr=3e-3, out=str(tmp_path), **TINY_MNIST)
    losses = [e["train_loss"] for e in m["epochs"]]
    assert len(losses) == 4 and losses[-1] < losses[0] * 0.7, losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    f = m["final"]
    assert 0 <= f["accuracy"] <= 1 and f["accuracy"] > 0.3
    assert f["parameters"] == sum(p.numel() for p in zoo.create_model("mlp").parameters())
    assert f["density"] == 1.0 and f["images_per_second"] > 0 and len(f["per_class_accuracy"]) == 10
    for name in ("metrics.json", "checkpoint.safetensors", "model.safetensors", "curves.png", "predictions.png"):
        assert (tmp_path / name).is_file(), name
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["final"]["accuracy"] == f["accuracy"] and len(on_disk["epochs"]) == 4


@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_cross_entropy_matches_torch_in_every_layout(layout):
    """The criterion's segmentation loss is ``F.cross_entropy(ignore_index=255)`` whatever the
    logits' memory layout (channels-last logits go through their pixel rows): loss and gradient."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 6, 7, generator=g, dtype=torch.float64)
    if layout == "channels_last":
        logits = logits.contiguous(memory_format=torch.channels_last)
        assert not logits.is_contiguous()
    targets = torch.randint(0, 5, (3, 6, 7), generator=g)
    targets[0, :2] = 255
    aux = torch.randn(3, 5, 6, 7, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    xa, xb = aux.clone().requires_grad_(), aux.clone().requires_grad_()
    got = engine.criterion("segmentation", 0.4)((a, xa), targets)
    F = torch.nn.functional
    want = F.cross_entropy(b, targets, ignore_index=255) + 0.4 * F.cross_entropy(xb, targets, ignore_index=255)
    torch.testing.assert_close(got, want)
    got.backward(), want.backward()
    torch.testing.assert_close(a.grad, b.grad)
    torch.testing.assert_close(xa.grad, xb.grad)


def test_sparse_segmentation_run_reports_density_and_miou(tmp_path):
    m = zoo.train(model="sparse_unet", epochs=1, density=0.3, out=str(tmp_path), **TINY_STREETS)
    f = m["final"]
    assert 0 <= f["miou"] <= 1 and abs(f["density"] - 0.3) < 0.01
    assert set(f["per_class_iou"]) == set(zoo.data.CITYSCAPES_CLASSES)
    assert m["config"]["mask_policy"] == "residual" and m["config"]["size"] == [32, 64]


class _FixedPredictor(torch.nn.Module):
    """Segmenter returning the logits it was built with, whatever the input."""

    def __init__(self, pred, num_classes=19):
        super().__init__()
        self.logits = torch.nn.functional.one_hot(pred, num_classes).permute(0, 3, 1, 2).float()

    def forward(self, images, mask=None):
        return self.logits


def test_miou_averages_the_data_sets_classes_and_counts_every_pixel():
    """Road (0) and sky (10) labelled; the prediction gets 2 road pixels right, calls 1 road
    pixel 'motorcycle' (17, not a streets class) and 1 sky pixel 'road'."""
    target = torch.tensor([[[0, 0, 0, 10]]])
    pred = torch.tensor([[[0, 0, 17, 0]]])
    loader = [(torch.zeros(1, 3, 1, 4), target)]
    kw = dict(task="segmentation", num_classes=19, device="cpu", class_names=zoo.data.CITYSCAPES_CLASSES)
    res = engine.evaluate(_FixedPredictor(pred), loader, eval_classes=zoo.data.STREET_CLASSES, **kw)
    road, sky = 2 / 4, 0.0  # road: 2 hits / (3 labelled + 1 false positive); sky: 0 / 1
    assert res["miou"] == pytest.approx((road + sky) / 2)
    assert res["per_class_iou"]["motorcycle"] == 0.0  # still reported
    everything = engine.evaluate(_FixedPredictor(pred), loader, **kw)  # all 19 classes evaluated
    assert everything["miou"] == pytest.approx((road + sky + 0.0) / 3)
    streets = zoo.data.build_dataset("streets", "val", num_samples=2, size=(32, 64))
    assert streets.eval_classes == zoo.data.STREET_CLASSES
    assert zoo.data.limit(streets, 1).eval_classes == zoo.data.STREET_CLASSES


class Interrupt(Exception):
    pass


def test_interrupted_run_resumes_and_matches_uninterrupted(tmp_path, monkeypatch):
    kw = dict(model="sparse_cnn", epochs=3, **dict(TINY_MNIST, num_train=96, num_val=32))
    ref = zoo.train(out=str(tmp_path / "ref"), **kw)

    real = engine.train_one_epoch
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # dies during the second epoch
            raise Interrupt
        return real(*a, **k)

    monkeypatch.setattr(engine, "train_one_epoch", flaky)
    with pytest.raises(Interrupt):
        zoo.train(out=str(tmp_path / "run"), **kw)
    ck = load_checkpoint(str(tmp_path / "run"))
    assert ck["epoch"] == 1 and len(ck["history"]) == 1  # only the current epoch's work is lost
    monkeypatch.setattr(engine, "train_one_epoch", real)
    res = zoo.train(model="sparse_cnn", out=str(tmp_path / "run"), resume=True, progress=False)
    assert [e["epoch"] for e in res["epochs"]] == [1, 2, 3]
    assert res["final"]["epochs"] == 3
    a = load_checkpoint(str(tmp_path / "ref"))["model_state"]
    b = load_checkpoint(str(tmp_path / "run"))["model_state"]
    for k in a:  # resuming reproduces the uninterrupted run exactly
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    assert res["final"]["accuracy"] == pytest.approx(ref["final"]["accuracy"], abs=1e-9)


def test_resume_can_extend_a_finished_run(tmp_path):
    zoo.train(model="mlp", epochs=1, out=str(tmp_path), **TINY_MNIST)
    res = zoo.train(model="mlp", epochs=2, out=str(tmp_path), resume=True, progress=False)
    assert [e["epoch"] for e in res["epochs"]] == [1, 2]


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint to resume"):
        zoo.train(model="mlp", out=str(tmp_path / "none"), resume=True, **TINY_MNIST)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(str(tmp_path / "missing.safetensors"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "checkpoint.safetensors").write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(str(bad))
    with pytest.raises(CheckpointError, match="corrupt"):
        zoo.train(model="mlp", out=str(bad), resume=True, **TINY_MNIST)
    # a valid run, truncated mid-file
    zoo.train(model="mlp", epochs=1, out=str(tmp_path / "ok"), **TINY_MNIST)
    p = tmp_path / "ok" / "checkpoint.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(str(p))
    with pytest.raises(CheckpointError, match="is a 'mlp' run"):
        (tmp_path / "ok" / "checkpoint.safetensors").unlink()
        zoo.train(model="mlp", epochs=1, out=str(tmp_path / "ok2"), **TINY_MNIST)
        zoo.train(model="cnn", out=str(tmp_path / "ok2"), resume=True, progress=False)


def test_checkpoint_is_written_atomically(tmp_path, monkeypatch):
    zoo.train(model="mlp", epochs=1, out=str(tmp_path), **TINY_MNIST)
    before = (tmp_path / "checkpoint.safetensors").read_bytes()
    import safetensors.torch

    def boom(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        zoo.train(model="mlp", epochs=2, out=str(tmp_path), resume=True, progress=False)
    assert (tmp_path / "checkpoint.safetensors").read_bytes() == before  # previous one intact
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []


def test_one_evaluation_per_epoch_and_none_twice(tmp_path, monkeypatch):
    calls, real = [], engine.evaluate

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(engine, "evaluate", counted)
    m = zoo.train(model="mlp", epochs=2, out=str(tmp_path), **dict(TINY_MNIST, num_train=64, num_val=32))
    assert len(calls) == 2 and len(m["epochs"]) == 2
    assert m["final"]["accuracy"] == m["epochs"][-1]["accuracy"]  # the final numbers are the last epoch's
    zoo.train(model="mlp", epochs=2, out=str(tmp_path), resume=True, progress=False)  # finished: evaluate once
    assert len(calls) == 3


@pytest.mark.parametrize("data,model,size", [("mnist", "mlp", None), ("mnist", "sparse_cnn", None),
                                             ("streets", "unet", (32, 64)), ("streets", "sparse_unet", None),
                                             ("cityscapes", "sparse_unet", (64, 128))])
def test_load_model_works_for_every_data_set(tmp_path, data, model, size):
    """The run's config is all load_model needs: the data set describes itself (no data loaded)."""
    assert data in DATASETS
    torch.manual_seed(0)
    cfg = engine.TrainConfig(model=model, data=data, size=size, out=str(tmp_path)).resolved()
    info = dataset_info(cfg.data, cfg.size)
    ref = engine.build_model(cfg, info).eval()
    save_weights(str(tmp_path / "model.safetensors"), ref, cfg.to_dict())
    loaded, cfg2, ck, info2 = engine.load_model(str(tmp_path))
    assert isinstance(info2, DatasetInfo) and info2 == info and cfg2 == cfg
    for k, v in ref.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = torch.rand(2, info.in_chans, *info.image_size)
    with torch.no_grad():
        out = loaded(x)
    assert out.shape == ((2, info.num_classes) if info.task == "classification" else (2, info.num_classes, *info.image_size))
    if data != "cityscapes":  # the covered data set itself (Cityscapes needs its files)
        ds = zoo.build_dataset(data, "val", num_samples=2, size=cfg.size)
        assert (ds.task, ds.num_classes, ds.in_chans, ds.image_size) == \
            (info2.task, info2.num_classes, info2.in_chans, info2.image_size)


def test_load_model_overrides_and_rejects_unknown_arguments(tmp_path):
    cfg = engine.TrainConfig(model="sparse_unet", size=(32, 64), out=str(tmp_path)).resolved()
    save_weights(str(tmp_path / "model.safetensors"), engine.build_model(cfg, dataset_info("streets", (32, 64))),
                 cfg.to_dict())
    model, cfg2, _, _ = engine.load_model(str(tmp_path), refine=False)
    assert model.refine is False and cfg2.model_kwargs == {"refine": False}
    with pytest.raises(TypeError, match="takes no keyword argument"):
        engine.load_model(str(tmp_path), bogus=1)
