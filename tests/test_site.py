"""A model fitted to a site: `quietwire train --init` (fine-tuning an existing model on the
site's flow log), and the bundled model calibrated, trained and fine-tuned on a generated
network it has never seen, at a size that runs in seconds (bench/bench_site.py measures the
same at full size)."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

pytest.importorskip("torch", reason="the trainer extra (torch) is not installed")

from quietwire import DATA  # noqa: E402
from quietwire.agent.detect.model import DEFAULT_MODEL, ScoringModel  # noqa: E402
from quietwire.agent.output.flowlog import read_flow_log  # noqa: E402
from quietwire.cli import main  # noqa: E402

PREPROCESSING = ("pre/log_mask", "pre/center", "pre/scale", "pre/indicator_index")
MODELS = ("bundled", "calibrated", "trained", "fine-tuned")
FPR = 1e-2  # each model judged at its own threshold for this false-positive rate
PROTO = {"TCP": 6, "UDP": 17, "ICMP": 1}


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
    last flows read, and its lineage in the metadata."""
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

    # Thresholds: the new model's own scores on the held-out share of the new data, the last
    # 20% read (a later time window)
    x = load_benign([site_log], known_malicious={}).features
    held = np.arange(len(x))[-max(int(len(x) * 0.2), 20) :]
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


def labelled_records(flow_log: Path, labels: dict) -> tuple[np.ndarray, np.ndarray]:
    """The features of a flow log's records as the agent reads them, and each record's
    trafficgen label (by its protocol and sorted endpoints, from the JSON line)."""
    features = np.concatenate([c.features for c in read_flow_log(flow_log)])
    kinds = []
    with flow_log.open() as f:
        for line in f:
            d = json.loads(line)
            a = (int(ipaddress.ip_address(d["src_ip"])), int(d.get("src_port") or 0))
            b = (int(ipaddress.ip_address(d["dest_ip"])), int(d.get("dest_port") or 0))
            kinds.append(labels.get((PROTO[d["proto"]], *sorted([a, b])), "unlabelled"))
    assert len(kinds) == len(features), flow_log
    return features, np.array(kinds)


def test_models_learnt_from_the_site_find_more_of_its_attacks(tmp_path):
    """A generated network the bundled model has never seen: its benign first half replayed
    with a flow log, then `quietwire calibrate`, `train` and `train --init` on that log; every
    model scores the second half (every attack type mixed in) at its own FPR-1e-2 threshold.
    The bundled model's share agrees with the scores replay wrote into the flow log; the
    models learnt from the site's flow log find more of the attacks than the bundled model."""
    from quietwire.trainer.traffic.trafficgen import generate, read_labels

    halves = {"site": (23, 0.0), "test": (24, 1.0)}  # (trafficgen seed, attack share)
    for name, (seed, attacks) in halves.items():
        pcap, log = tmp_path / f"{name}.pcap", tmp_path / name / "flows.json"
        generate(pcap, tmp_path / f"{name}.labels.csv", seed, 1.0, attacks, 300.0)
        alerts = tmp_path / name / "alerts.json"
        replay = ["replay", str(pcap), "--model", str(DEFAULT_MODEL), "--alerts", str(alerts)]
        assert main([*replay, "--flow-log", str(log)]) == 0
    site_log, test_log = tmp_path / "site" / "flows.json", tmp_path / "test" / "flows.json"
    paths = {"bundled": DEFAULT_MODEL} | {name: tmp_path / f"{name}.onnx" for name in MODELS[1:]}
    calibrate = ["calibrate", "--model", str(DEFAULT_MODEL), str(site_log), "--allow-few-flows"]
    assert main([*calibrate, "-o", str(paths["calibrated"])]) == 0
    train = ["train", "--benign", str(site_log)]
    # From scratch with the bundled model's score, so the two learnt models differ only in
    # where they start. 500 steps: on these 1,700 records, 200 leave a model from scratch
    # missing about half of the attacks.
    scratch = ["--score", ScoringModel(DEFAULT_MODEL).score_kind, "--train-steps", "500"]
    assert main([*train, "-o", str(paths["trained"]), *scratch]) == 0
    tuned = ["--init", str(DEFAULT_MODEL), "--train-steps", "125"]
    assert main([*train, "-o", str(paths["fine-tuned"]), *tuned]) == 0

    features, kinds = labelled_records(test_log, read_labels(tmp_path / "test.labels.csv"))
    benign, attack = kinds == "benign", (kinds != "benign") & (kinds != "unlabelled")
    assert "unlabelled" not in kinds and "syn_scan" in kinds
    assert len(set(kinds[attack])) >= 10  # attack types
    over = {}
    for name, path in paths.items():
        model = ScoringModel(path)
        over[name] = model.score(features).score > model.thresholds[FPR]
        print(
            f"{name}: threshold {model.thresholds[FPR]:.4g}, benign over it "
            f"{over[name][benign].mean():.2%}, attack recall {over[name][attack].mean():.2%}"
        )
        assert over[name][benign].mean() <= 0.05, name

    # The bundled model's share, counted again from the scores replay logged per record.
    logged = np.array([json.loads(line)["quietwire"]["score"] for line in test_log.open()])
    threshold = ScoringModel(DEFAULT_MODEL).thresholds[FPR]
    share = (logged[benign] > threshold).mean()
    assert abs(share - over["bundled"][benign].mean()) <= 2 / benign.sum()

    for name in ("trained", "fine-tuned"):
        assert over[name][attack].mean() > over["bundled"][attack].mean() + 0.2, name
    assert ScoringModel(paths["fine-tuned"]).training["config"]["train_steps"] == 125
