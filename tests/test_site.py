"""A model fitted to a site: `quietwire train --init` (fine-tuning an existing model on the
site's flow log) and bench/bench_site.py's figures (issue 12's first "done when"), at a size
that runs in seconds: the bundled model, calibrated, trained and fine-tuned on a generated
network it has never seen."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

pytest.importorskip("torch", reason="the trainer extra (torch) is not installed")

from quietwire import DATA  # noqa: E402
from quietwire.agent.detect.model import DEFAULT_MODEL, ScoringModel  # noqa: E402
from quietwire.cli import main  # noqa: E402

from .conftest import REPO  # noqa: E402

PREPROCESSING = ("pre/log_mask", "pre/center", "pre/scale", "pre/indicator_index")


def initializers(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def weight_distance(a: dict, b: dict, prefix: str) -> float:
    """Relative L2 distance between two models' weights under ``prefix``."""
    names = [n for n in a if n.startswith(prefix) and n.endswith(("weight_t", "weight", "bias"))]
    diff = sum(float(np.sum((a[n] - b[n]) ** 2)) for n in names)
    return (diff / sum(float(np.sum(a[n] ** 2)) for n in names)) ** 0.5


@pytest.fixture(scope="module")
def site_log(tmp_path_factory):
    """A flow log written by `quietwire replay --flow-log` (the bundled sample capture)."""
    work = tmp_path_factory.mktemp("site")
    log = work / "flows.json"
    capture = str(DATA / "sample.pcap")
    replay = ["replay", capture, "--alerts", str(work / "alerts.json"), "--flow-log", str(log)]
    assert main(replay) == 0
    return log


def test_fine_tuning_keeps_the_models_preprocessing_and_starts_from_it(site_log, tmp_path, capsys):
    """--init: the new model has the bundled model's preprocessing and score, weights near its
    (a model trained from scratch as long is far from them), thresholds from the new data's
    held-out flows, and its lineage in the metadata."""
    from quietwire.trainer.data import load_benign

    tuned, scratch = tmp_path / "tuned.onnx", tmp_path / "scratch.onnx"
    common = ["train", "--benign", str(site_log), "--train-steps", "30"]
    assert main([*common, "--init", str(DEFAULT_MODEL), "-o", str(tuned)]) == 0
    out = capsys.readouterr().out
    assert f"fine-tuned from: {DEFAULT_MODEL}" in out
    score = ScoringModel(DEFAULT_MODEL).score_kind
    assert main([*common, "--score", score, "-o", str(scratch)]) == 0

    base, new, fresh = (initializers(p) for p in (DEFAULT_MODEL, tuned, scratch))
    for name in PREPROCESSING:
        assert np.array_equal(base[name], new[name]), name
    assert not np.array_equal(base["pre/center"], fresh["pre/center"])  # a refit differs
    assert np.array_equal(base["contrib/noise"], new["contrib/noise"])
    for prefix in ("denoiser/", "dte/"):
        moved = weight_distance(base, new, prefix)
        assert 0 < moved < 0.5 * weight_distance(base, fresh, prefix), prefix

    bundled, model = ScoringModel(DEFAULT_MODEL), ScoringModel(tuned)
    assert model.score_kind == bundled.score_kind
    lineage = model.training["fine_tuned_from"]
    assert lineage["version"] == bundled.version
    assert lineage["trained_flows"] == bundled.training["flows"]
    assert lineage["date"].endswith("Z") and lineage["model"] == str(DEFAULT_MODEL)
    assert model.training["config"]["train_steps"] == 30
    # mask augmentation is off when fine-tuning (masked values would sit at the first
    # training's medians), on when training from scratch
    assert model.training["config"]["mask_augment"] == 0.0
    assert ScoringModel(scratch).training["config"]["mask_augment"] == 0.15

    # Thresholds: the new model's own scores on the held-out share of the new data.
    x = load_benign([site_log], known_malicious={}).features
    held = np.random.default_rng(0).permutation(len(x))[: max(int(len(x) * 0.2), 20)]
    expected = np.quantile(model.score(x[held]).score, 0.99, method="higher")
    assert model.thresholds[0.01] == pytest.approx(float(expected), rel=1e-4)
    assert model.thresholds[0.01] != bundled.thresholds[0.01]


def test_init_refuses_another_schema_score_or_file(site_log, tmp_path, capsys):
    proto = onnx.load(str(DEFAULT_MODEL))
    for prop in proto.metadata_props:
        if prop.key == "schema_hash":
            prop.value = "0000000000000000"
    other = tmp_path / "other.onnx"
    onnx.save_model(proto, str(other))
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    out = str(tmp_path / "m.onnx")
    train = ["train", "--benign", str(site_log), "-o", out, "--train-steps", "5"]

    assert main([*train, "--init", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(other) in err[0]
    assert "expects feature schema 0000000000000000" in err[0]
    assert "retrain it with this version: quietwire train --benign" in err[0]

    assert main([*train, "--init", str(junk)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(junk) in err[0]

    other_score = "noise" if ScoringModel(DEFAULT_MODEL).score_kind != "noise" else "dte"
    assert main([*train, "--init", str(DEFAULT_MODEL), "--score", other_score]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fine-tuning keeps the model's score" in err[0]
    assert not (tmp_path / "m.onnx").exists()


@pytest.fixture(scope="module")
def bench_site():
    spec = importlib.util.spec_from_file_location("bench_site", REPO / "bench" / "bench_site.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_site_figures(bench_site, tmp_path, capsys):
    """bench/bench_site.py, small: a generated network's benign half through replay, calibrate,
    train and train --init; every model on the second half. The bundled model's figures agree
    with the scores replay wrote into the flow log; the models learnt from the site's flow log
    find more of the attacks than the bundled model at their own FPR-1e-2 thresholds."""
    from quietwire.trainer.traffic.trafficgen import read_labels

    r = bench_site.site_figures(
        # dte_clean needs more steps than dte did: at 200, a model trained from scratch on
        # these 1,709 records kept 56% of the attacks over its threshold, at 500 93%
        tmp_path,
        scale=1,
        duration=300,
        train_steps=500,
        init_steps=125,
        allow_few_flows=True,
    )
    table = bench_site.format_table(r)
    print(table)
    models = r["models"]
    assert set(models) == set(bench_site.MODELS)
    assert "unlabelled" not in r["attack_records"] and len(r["attack_records"]) >= 10

    # The bundled model's share, counted again from the scores replay logged per record.
    log = tmp_path / "test" / "flows.json"
    _, kinds = bench_site.test_records(log, read_labels(tmp_path / "second.labels.csv"))
    logged = np.array([json.loads(line)["quietwire"]["score"] for line in log.open()])
    benign = np.array(kinds) == "benign"
    over = logged[benign] > models["bundled"]["threshold"]
    assert abs(over.mean() - models["bundled"]["benign_over"]) <= 2 / benign.sum()

    for name in bench_site.MODELS:
        assert models[name]["benign_over"] <= 0.05, (name, table)
    for name in ("trained", "fine-tuned"):
        assert models[name]["recall_all"] > models["bundled"]["recall_all"] + 0.2, table
    assert models["fine-tuned"]["train_steps"] == 125
    assert "benign over it" in table and "syn_scan" in table
