"""The trade-off study end to end (a test-sized ``--quick`` study), its resumption after an
interruption, and the reuse of trained runs keyed by their configuration."""
import json
import os

import pytest

import spconv2d.zoo as zoo
from spconv2d.zoo import engine, measure, study
from spconv2d.zoo.cli import main
from spconv2d.zoo.config import TrainConfig

# test-sized: tiny splits and images, one epoch, one timing round at one thread, two densities
TINY = dict(quick=True, num_train=16, num_val=6, size=(32, 64), densities=(0.1, 1.0), timing_threads=(1,),
            rounds=1, warmup=1, timing_batch=3, num_scenes=2, progress=False, model_kwargs={"mlp": {"hidden": (32,)}})

MODEL_FIELDS = {"id", "label", "model", "data", "task", "sparse", "dense_twin", "density", "trained_density",
                "measured_density", "metric", "value", "loss", "per_class", "parameters", "macs", "levels", "ops",
                "latency", "speedup_vs_dense", "train"}
LATENCY_FIELDS = {"device", "threads", "batch", "rounds", "median_ms", "p25_ms", "p75_ms", "min_ms", "max_ms",
                  "per_image_ms", "per_image_p25_ms", "per_image_p75_ms"}
FIGURES = ("pareto.png", "density_sweep-streets.png", "time_breakdown-streets.png", "per_class-streets.png",
           "qualitative-streets.png", "training_curves.png")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished test-sized study of mnist and streets, through the command line."""
    root = tmp_path_factory.mktemp("study")
    out, runs = root / "report", root / "runs"
    cfg = study.StudyConfig(out=str(out), runs=str(runs), **TINY)
    results = study.run_study(cfg)
    return cfg, results, out


def test_quick_study_writes_the_report_every_figure_and_every_field(finished):
    cfg, results, out = finished
    for name in ("results.json", "REPORT.md", "study_state.json", "qualitative-streets.npz") + FIGURES:
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["schema"] == study.SCHEMA and on_disk["study"]["quick"] is True
    for k in ("cpu", "cores", "torch", "triton", "gpu", "cpu_backend", "load_average"):
        assert k in on_disk["machine"], k
    assert set(on_disk["data"]) == {"mnist", "streets"}
    ids = {d: [m["id"] for m in b["models"]] for d, b in on_disk["data"].items()}
    assert ids == {"mnist": ["mlp", "cnn", "sparse_cnn"],
                   "streets": ["unet", "sparse_unet@0.10", "sparse_unet@0.30", "sparse_unet@1.00"]}
    for data, b in on_disk["data"].items():
        assert b["settings"] == ["cpu-1t-b1", "cpu-1t-b3"]
        for m in b["models"]:
            assert MODEL_FIELDS <= set(m), (m["id"], MODEL_FIELDS - set(m))
            assert 0 <= m["value"] <= 1 and m["parameters"] > 0
            assert 0 < m["macs"]["executed_per_image"] <= m["macs"]["dense_per_image"]
            assert (m["levels"] or m["model"] == "mlp") and all(0 < lv["density"] <= 1 for lv in m["levels"])
            assert set(m["latency"]) == set(b["settings"])
            for lat in m["latency"].values():
                assert LATENCY_FIELDS <= set(lat) and lat["per_image_ms"] > 0
            assert m["train"]["action"] == "trained" and m["train"]["epochs"] == 1 and m["train"]["history"]
            if m["sparse"]:
                assert set(m["speedup_vs_dense"]) == set(b["settings"]) and m["macs"]["op_paths"]
                assert m["macs"]["fraction"] < 1 or m["density"] == 1.0
            else:
                assert m["speedup_vs_dense"] is None and m["macs"]["fraction"] == 1.0
    seg = on_disk["data"]["streets"]
    assert seg["steps"]["cpu-1t-b3"]["models"]["sparse_unet"]["stages_ms"]["refinement"]["median"] >= 0
    assert {lv["shape"][0] for lv in seg["models"][1]["levels"]} == {32, 16, 8}
    report = (out / "REPORT.md").read_text()
    assert "Smoke run" in report and "## Where sparsity pays" in report and "spconv2d study" in report
    for f in FIGURES:
        assert f"]({f})" in report, f
    assert set(on_disk["figures"]) >= {"pareto", "training_curves", "density_sweep-streets"}


def test_a_second_study_reuses_the_runs_and_measures_again(finished, monkeypatch):
    cfg, first, out = finished

    def no_training(*a, **k):
        raise AssertionError("a finished run with the same configuration must be reused")

    monkeypatch.setattr(engine, "train", no_training)
    evaluated = []
    real = engine.evaluate
    monkeypatch.setattr(engine, "evaluate", lambda *a, **k: evaluated.append(1) or real(*a, **k))
    second = study.run_study(cfg)
    models = [m for b in second["data"].values() for m in b["models"]]
    assert {m["train"]["action"] for m in models} == {"reused"} and len(evaluated) == len(models)
    assert not second["study"]["resumed"]
    assert [m["value"] for m in models] == [m["value"] for b in first["data"].values() for m in b["models"]]


def test_an_interrupted_study_resumes_where_it_stopped(tmp_path, monkeypatch):
    cfg = study.StudyConfig(data=("mnist",), out=str(tmp_path / "r"), runs=str(tmp_path / "runs"), **TINY)
    real = measure.time_alternating
    calls = {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(measure, "time_alternating", interrupted)
    with pytest.raises(KeyboardInterrupt):
        study.run_study(cfg)
    state = json.loads((tmp_path / "r" / study.STATE_NAME).read_text())
    assert not state["complete"] and "time/mnist/cpu-1t-b1" in state["stages"]
    assert "time/mnist/cpu-1t-b3" not in state["stages"] and not (tmp_path / "r" / "REPORT.md").exists()

    monkeypatch.setattr(measure, "time_alternating", real)
    monkeypatch.setattr(engine, "evaluate", lambda *a, **k: pytest.fail("evaluated again after resuming"))
    monkeypatch.setattr(engine, "train", lambda *a, **k: pytest.fail("trained again after resuming"))
    res = study.run_study(cfg)
    assert res["study"]["resumed"]
    done_before = {s["stage"] for s in res["study"]["stages"] if s["resumed"]}
    assert done_before == set(state["stages"]) and "time/mnist/cpu-1t-b3" not in done_before
    assert (tmp_path / "r" / "REPORT.md").is_file()
    assert json.loads((tmp_path / "r" / study.STATE_NAME).read_text())["complete"]
    # another configuration does not resume that state: it starts over
    other = study.StudyConfig(**{**cfg.__dict__, "rounds": 2})
    assert other.resolved().fingerprint() != cfg.resolved().fingerprint()


def test_reuse_is_detected_and_a_changed_config_is_not_reused(tmp_path, monkeypatch):
    base = TrainConfig(model="mlp", data="mnist", epochs=1, num_train=32, num_val=16, progress=False,
                       model_kwargs={"hidden": (16,)})
    trained = []
    real = engine.train
    monkeypatch.setattr(engine, "train", lambda *a, **k: trained.append(1) or real(*a, **k))
    runs = str(tmp_path)
    first = study.ensure_run(base, runs)
    assert first["action"] == "trained" and len(trained) == 1
    again = study.ensure_run(TrainConfig(**{**base.__dict__, "progress": True, "num_workers": 0}), runs)
    assert again["action"] == "reused" and again["dir"] == first["dir"] and len(trained) == 1
    changed = study.ensure_run(TrainConfig(**{**base.__dict__, "lr": 1e-3}), runs)
    assert changed["action"] == "trained" and changed["dir"] != first["dir"] and len(trained) == 2
    forced = study.ensure_run(base, runs, retrain=True)
    assert forced["action"] == "trained" and forced["dir"] == first["dir"] and len(trained) == 3
    # more epochs than the finished run: resumed from its checkpoint, not started over
    longer = study.ensure_run(TrainConfig(**{**base.__dict__, "epochs": 2}), runs)
    assert longer["action"] == "trained"  # epochs are part of the key: a new folder
    cfg2 = TrainConfig(**{**base.__dict__, "epochs": 2}).resolved()
    assert study.run_dir(cfg2, runs) == longer["dir"] != first["dir"]
    # the key ignores what does not change the result, and new fields at their defaults
    a = study.run_fields(TrainConfig(**{**base.__dict__, "out": "x", "num_predictions": 3}).resolved())
    assert a == study.run_fields(base.resolved()) and "out" not in a and "progress" not in a
    assert json.loads(open(os.path.join(first["dir"], "study_run.json")).read())["fields"] == first["fields"]


def test_an_unfinished_run_is_resumed(tmp_path, monkeypatch):
    base = TrainConfig(model="mlp", data="mnist", epochs=2, num_train=32, num_val=16, progress=False)
    out = study.run_dir(base.resolved(), str(tmp_path))
    real = engine.train_one_epoch
    calls = {"n": 0}

    def crash(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(engine, "train_one_epoch", crash)
    with pytest.raises(KeyboardInterrupt):
        study.ensure_run(base, str(tmp_path))
    monkeypatch.setattr(engine, "train_one_epoch", real)
    r = study.ensure_run(base, str(tmp_path))
    assert r["action"] == "resumed" and r["dir"] == out and len(r["metrics"]["epochs"]) == 2


def test_study_command_line(tmp_path, capsys):
    args = ["study", "--data", "mnist", "--quick", "--out", str(tmp_path / "r"), "--runs", str(tmp_path / "runs"),
            "--num-train", "16", "--num-val", "6", "--timing-threads", "1", "--rounds", "1", "--warmup", "1",
            "--timing-batch", "3", "--no-progress", "--threads", "1"]
    assert main(args) == 0
    assert "REPORT.md" in capsys.readouterr().out
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert res["study"]["command"] == "spconv2d " + " ".join(args)
    assert res["study"]["config"]["data"] == ["mnist"] and res["study"]["config"]["epochs"] == 1
    assert main(["study", "--data", "nosuchdata", "--out", str(tmp_path / "x")]) == 2
    assert "unknown data set" in capsys.readouterr().err


def test_config_defaults_and_the_equivalent_command():
    c = study.StudyConfig().resolved()
    assert c.data == ("mnist", "streets") and c.densities == study.DEFAULT_DENSITIES
    assert c.out == os.path.join("reports", "study-mnist-streets") and c.rounds == 15 and c.epochs is None
    q = study.StudyConfig(quick=True, data="streets", densities=(0.5, 0.1, 0.5)).resolved()
    assert q.epochs == 1 and q.rounds == 3 and q.densities == (0.1, 0.5) and q.out.endswith("study-streets")
    given = study.StudyConfig(quick=True, data="streets", densities=(0.1, 0.5), progress=False)
    assert given.to_command() == "spconv2d study --data streets --quick --densities 0.1 0.5 --no-progress"
    plan = study.Plan(q)
    assert [p.id for p in plan.points["streets"]] == ["unet", "sparse_unet@0.10", "sparse_unet@0.30",
                                                      "sparse_unet@0.50"]
    per = study.Plan(study.StudyConfig(data="streets", densities=(0.1, 0.3), train_per_density=True).resolved())
    assert set(per.runs) == {"unet-streets", "sparse_unet-streets", "sparse_unet-streets-d0.10"}
    assert per.points["streets"][-1].id == "sparse_unet[trained 0.10]@0.10"
    with pytest.raises(ValueError):
        study.StudyConfig(densities=(0.0,)).resolved()
    assert zoo.run_study is study.run_study
