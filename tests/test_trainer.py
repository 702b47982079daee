"""Trainer: a small diffusion model fitted on real benign captures, exported to ONNX, scored by
onnxruntime exactly as by torch, ranking known-malicious flows above unseen benign ones."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the trainer extra (torch) is not installed")

from quietwire.agent.detect.model import ModelError, ScoringModel  # noqa: E402
from quietwire.agent.features.schema import FEATURE_NAMES, SCHEMA, SCHEMA_HASH  # noqa: E402
from quietwire.trainer.data import load_benign, load_labels  # noqa: E402
from quietwire.trainer.model.detector import DiffusionDetector, TrainConfig, TrainingError  # noqa: E402
from quietwire.trainer.model.export import export, load_detector  # noqa: E402
from quietwire.trainer.model.preprocess import Preprocessor  # noqa: E402
from quietwire.trainer.synthesis.fidelity import auroc, ks_statistic  # noqa: E402

from .conftest import meter_file  # noqa: E402


@pytest.fixture(scope="module")
def corpus(ndpi):
    labels = load_labels()
    benign = np.concatenate([meter_file(ndpi / "pcap" / f).features for f in labels["benign"]])
    malicious = {f: meter_file(ndpi / "pcap" / f).features for f in labels["malicious"]}
    rng = np.random.default_rng(0)
    order = rng.permutation(len(benign))
    return benign[order[300:]], benign[order[:300]], malicious


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    train, _, _ = corpus
    det = DiffusionDetector(TrainConfig(train_steps=1000)).fit(train)
    path = export(det, tmp_path_factory.mktemp("model") / "m.onnx")
    return det, path


def test_fit_summary(trained):
    det, _ = trained
    s = det.summary_
    print(f"trained on {s.train_flows} flows in {s.seconds:.1f} s (bench/ measures speed)")
    assert s.train_flows + s.calibration_flows > 1000
    assert s.calibration_flows >= 0.19 * s.flows
    assert np.isfinite(s.final_noise_loss) and s.final_noise_loss < 1.0  # learnt something


def test_onnxruntime_matches_torch(trained, corpus):
    det, path = trained
    _, unseen, malicious = corpus
    x = np.concatenate([unseen, malicious["synscan.pcap"][:200]])
    torch_score, torch_contrib = det.score(x)
    scores = ScoringModel(path).score(x)
    rel = np.abs(scores.score - torch_score) / np.maximum(np.abs(torch_score), 1e-3)
    print(f"max relative difference onnxruntime vs torch: {rel.max():.2e}")
    assert rel.max() < 1e-4
    # the agent gives features that do not apply (NaN) no contribution (model.Scores)
    torch_contrib = np.where(np.isnan(x), 0.0, torch_contrib)
    np.testing.assert_allclose(scores.contributions, torch_contrib, rtol=1e-3, atol=1e-4)
    assert scores.contributions.shape == (len(x), len(FEATURE_NAMES))


def quality(path, corpus) -> dict[str, float]:
    """The learned qualities the trainer's tests bound, for a model file."""
    _, unseen, malicious = corpus
    model = ScoringModel(path)
    benign_scores = model.score(unseen).score
    bad = np.concatenate(list(malicious.values()))
    return {
        "auroc": auroc(model.score(bad).score, benign_scores),
        "benign_over_1e-2": float(np.mean(benign_scores > model.threshold(1e-2))),
        "synscan_auroc": auroc(model.score(malicious["synscan.pcap"]).score, benign_scores),
    }


# Bounds from the measured spread: 10 seeds on an AVX-512 Xeon and 5 seeds under
# each of ATEN_CPU_CAPABILITY=avx2/avx512/default and avx2 with oneDNN/MKL capped at AVX2
# (38 working runs) gave AUROC 0.963-0.986, unseen benign over the 1e-2 threshold
# 0.007-0.030 and synscan AUROC 0.972-0.995 (the dispatch moved each by at most 0.002; seeds
# by ten times that). Broken models: untrained or one optimiser step, AUROC 0.16-0.73 and
# synscan AUROC 0.17-0.69; columns shuffled or trained on noise, benign over the threshold
# 0.063-1.0. Every broken run fails at least one bound. The share of synscan probes over the
# threshold is no bound: the probes are near-identical, so it jumps between 0 and 0.97 from
# one seed to the next while their rank barely moves. The dte_clean score, seeds 0-4 on one
# contended x86 machine: AUROC 0.986-0.991, unseen benign over the threshold 0.007-0.037,
# synscan AUROC 0.993-0.998 (dte on the same weights: 0.969-0.991, 0.003-0.010,
# 0.975-0.995).
BOUNDS = {"auroc": 0.9, "benign_over_1e-2": 0.05, "synscan_auroc": 0.9}


def passes(q: dict[str, float]) -> bool:
    return (
        q["auroc"] > BOUNDS["auroc"]
        and q["benign_over_1e-2"] < BOUNDS["benign_over_1e-2"]
        and q["synscan_auroc"] > BOUNDS["synscan_auroc"]
    )


def test_malicious_flows_rank_above_unseen_benign(trained, corpus):
    q = quality(trained[1], corpus)
    print(
        f"AUROC malicious vs unseen benign {q['auroc']:.3f}, synscan {q['synscan_auroc']:.3f}; "
        f"unseen benign over the FPR 1e-2 threshold {q['benign_over_1e-2']:.3f}"
    )
    assert passes(q), q


def test_the_bounds_fail_a_broken_model(corpus, tmp_path):
    """The same bounds refuse a model that did not learn (one optimiser step)."""
    det = DiffusionDetector(TrainConfig(train_steps=1)).fit(corpus[0])
    q = quality(export(det, tmp_path / "broken.onnx"), corpus)
    print(f"one-step model: {q}")
    assert not passes(q)
    assert q["auroc"] < BOUNDS["auroc"] and q["synscan_auroc"] < BOUNDS["synscan_auroc"]


def test_tail_probability_and_metadata(trained, corpus):
    det, path = trained
    model = ScoringModel(path)
    s = model.score(corpus[1])
    assert ((s.tail_probability > 0) & (s.tail_probability <= 1)).all()
    order = np.argsort(s.score)
    assert (np.diff(s.tail_probability[order]) <= 1e-6).all()  # higher score, smaller tail
    assert model.metadata["schema_hash"] == SCHEMA_HASH
    t = model.thresholds
    assert t[1e-2] <= t[1e-3] <= t[1e-4]
    top = s.top_features(3)
    assert len(top) == len(s.score) and all(name in FEATURE_NAMES for name, _ in top[0])


def test_same_data_and_seed_give_the_same_model(corpus):
    train = corpus[0][:400]
    a = DiffusionDetector(TrainConfig(train_steps=60, seed=3)).fit(train)
    b = DiffusionDetector(TrainConfig(train_steps=60, seed=3)).fit(train)
    np.testing.assert_array_equal(a.score(corpus[1])[0], b.score(corpus[1])[0])
    c = DiffusionDetector(TrainConfig(train_steps=60, seed=4)).fit(train)
    assert not np.array_equal(a.score(corpus[1])[0], c.score(corpus[1])[0])


@pytest.mark.parametrize("score", ["noise", "dte_noise", "dte_clean"])
def test_other_scores_export_too(corpus, tmp_path, score):
    det = DiffusionDetector(TrainConfig(score=score, train_steps=100)).fit(corpus[0][:600])
    path = export(det, tmp_path / "n.onnx")
    expected = det.score(corpus[1])[0]
    rel = np.abs(ScoringModel(path).score(corpus[1]).score - expected)
    assert (rel / np.maximum(np.abs(expected), 1e-3)).max() < 1e-4
    again = load_detector(path)  # the torch detector rebuilt from the file scores the same
    np.testing.assert_allclose(again.score(corpus[1])[0], expected, rtol=1e-4)


def test_samples_look_like_flows(trained):
    det, path = trained
    again = load_detector(path)
    x = again.sample(300, seed=1)
    assert x.shape == (300, len(FEATURE_NAMES))
    nullable = np.array([f.nullable for f in SCHEMA])
    assert not np.isnan(x[:, ~nullable]).any()
    counts = np.array([f.unit in ("packets", "bytes") for f in SCHEMA])
    present = x[:, counts][~np.isnan(x[:, counts])]
    assert (present >= 0).all() and np.array_equal(present, np.round(present))


def test_model_with_another_schema_is_refused(trained, tmp_path):
    import onnx

    _, path = trained
    model = onnx.load(str(path))
    for prop in model.metadata_props:
        if prop.key == "schema_hash":
            prop.value = "0000000000000000"
    other = tmp_path / "other.onnx"
    onnx.save_model(model, str(other))
    with pytest.raises(
        ModelError, match=r"other\.onnx: model expects feature schema 0000000000000000"
    ):
        ScoringModel(other)


def test_corrupt_model_is_refused(trained, tmp_path):
    _, path = trained
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ModelError, match=r"bad\.onnx: not a valid ONNX model"):
        ScoringModel(bad)
    with pytest.raises(ModelError, match="cannot read model"):
        ScoringModel(tmp_path / "missing.onnx")


def test_bad_training_sets(ndpi, tmp_path):
    with pytest.raises(TrainingError, match="need at least 50 benign flows"):
        DiffusionDetector().fit(np.zeros((10, len(FEATURE_NAMES)), np.float32))
    with pytest.raises(TrainingError, match=r"synscan\.pcap: labelled malicious"):
        load_benign([ndpi / "pcap" / "synscan.pcap"])
    empty = tmp_path / "empty.csv"
    empty.write_text(",".join(("schema_hash", *FEATURE_NAMES)) + "\n")
    with pytest.raises(TrainingError, match="no flows in the benign inputs"):
        load_benign([empty])


def test_preprocessing_round_trip_and_missing_values():
    rng = np.random.default_rng(0)
    x = rng.lognormal(3, 1, (500, len(FEATURE_NAMES))).astype(np.float32)
    x[::7, FEATURE_NAMES.index("src2dst_iat_mean_s")] = np.nan
    prep = Preprocessor.fit(x)
    z = prep.transform(x)
    assert z.shape == (500, prep.n_inputs) and np.isfinite(z).all()
    col = FEATURE_NAMES.index("src2dst_iat_mean_s")
    ind = list(prep.indicator_index).index(col)
    assert (z[::7, len(FEATURE_NAMES) + ind] == 1).all() and (z[::7, col] == 0).all()
    assert abs(np.median(z[:, FEATURE_NAMES.index("src2dst_bytes")])) < 0.05  # robust centre


def test_fidelity_measures_on_known_cases():
    a = np.arange(100.0)
    assert ks_statistic(a, a) == 0.0
    assert ks_statistic(a, a + 1000) == 1.0
    assert auroc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert auroc(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == 0.5


def test_refit_drops_the_highest_scoring_training_flows(corpus):
    """Robust refit: the second fit trains without the share of training flows the first
    model scored highest (its effect on contamination is measured by quietwire eval)."""
    train, _, _ = corpus
    x = train[:600]
    det = DiffusionDetector(TrainConfig(train_steps=100, refit=0.1)).fit(x)
    s = det.summary_
    fitted = len(x) - s.calibration_flows
    assert abs(s.refit_removed - 0.1 * fitted) <= 2
    assert s.train_flows == fitted - s.refit_removed
    with pytest.raises(ValueError, match="refit"):
        TrainConfig(refit=0.5)


def test_train_from_a_flow_log(tmp_path, capsys):
    """`quietwire train --benign DIR` on what `replay --flow-log` wrote: the rotated gzip
    files and the live file give the meter's own features back; a line of another schema and
    a broken line are skipped with a warning naming the file (and the line); an alert file in
    the same directory adds nothing; the model trained from it loads in the agent."""
    import gzip
    import json

    from quietwire import DATA
    from quietwire.cli import main

    from .conftest import meter_file

    logs = tmp_path / "logs"
    capture = DATA / "sample.pcap"
    replay = ["replay", str(capture), "--alerts", str(logs / "alerts.json")]
    assert main([*replay, "--flow-log", str(logs / "flows.json")]) == 0
    lines = (logs / "flows.json").read_text().splitlines()
    half = len(lines) // 2  # as if rotated: the first half gzipped, under a rotated name
    (logs / "flows.20240101T000000Z.json.gz").write_bytes(
        gzip.compress("\n".join(lines[:half]).encode() + b"\n")
    )
    other = json.loads(lines[0])
    other["quietwire"]["schema_hash"] = "0000000000000000"
    broken = lines[1][:100]
    (logs / "flows.json").write_text("\n".join([*lines[half:], json.dumps(other), broken]) + "\n")
    alert = {"event_type": "alert", "quietwire": {"incident": {"id": "x"}}}
    (logs / "alerts.json").write_text(json.dumps(alert) + "\n")  # sample.pcap raises none
    capsys.readouterr()

    data = load_benign([logs], known_malicious={})
    expected = meter_file(capture, keep_interim=True).features  # the log has every record

    def rows(x):  # each row's bytes, every NaN one bit pattern (the log writes null)
        return sorted(map(bytes, np.where(np.isnan(x), np.float32(np.nan), x)))

    assert rows(data.features) == rows(expected)
    assert data.flows_read == len(expected) and len(data.sources) == 3  # alerts.json too
    err = capsys.readouterr().err
    assert f"{logs / 'flows.json'}: skipped 1 flow records of another feature schema" in err
    assert f"{logs / 'flows.json'}: skipped 1 malformed lines (line {len(lines) - half + 2}" in err
    assert "alerts.json: no flow records" in err

    out = tmp_path / "site.onnx"
    assert main(["train", "--benign", str(logs), "-o", str(out), "--train-steps", "20"]) == 0
    assert len(ScoringModel(out).score(expected).score) == len(expected)


def test_host_balanced_reservoir():
    """At most N flows however many come; every host weighs the same (a scanner's 10,000
    flows do not crowd out 100 quiet hosts); seeded; below N every flow, in order."""
    from quietwire.trainer.data import HostReservoir

    rng = np.random.default_rng(0)
    hosts = ["10.0.0.1"] * 10_000 + [f"10.0.1.{i}" for i in range(100) for _ in range(10)]
    order = rng.permutation(len(hosts))
    hosts = [hosts[i] for i in order]
    x = np.zeros((len(hosts), len(FEATURE_NAMES)), np.float32)
    x[:, 0] = np.arange(len(hosts))  # which flow it was
    kept = []
    for seed in (1, 1, 2):
        r = HostReservoir(500, seed=seed)
        for lo in range(0, len(hosts), 700):
            r.add(x[lo : lo + 700], hosts[lo : lo + 700])
        sample = r.sample()
        assert sample.shape == (500, len(FEATURE_NAMES)) and r.count == len(hosts)
        assert (np.diff(sample[:, 0]) > 0).all()  # arrival order
        kept.append(sample[:, 0])
        scanner = sum(hosts[int(i)] == "10.0.0.1" for i in sample[:, 0])
        # water level: 100 quiet hosts and the scanner share 500 flows, about 5 each
        assert scanner < 20, scanner
        assert r.hosts == 101
    np.testing.assert_array_equal(kept[0], kept[1])
    assert not np.array_equal(kept[0], kept[2])
    small = HostReservoir(10_000)
    small.add(x[:300], hosts[:300])
    small.add(x[300:600], hosts[300:600])
    np.testing.assert_array_equal(small.sample(), x[:600])


def test_as_missing_encodes_a_feature_as_transform_encodes_nan():
    """Mask augmentation's inputs are exactly what the scorer sees for a missing feature."""
    rng = np.random.default_rng(1)
    x = rng.lognormal(3, 1, (200, len(FEATURE_NAMES))).astype(np.float32)
    x[::5, FEATURE_NAMES.index("src2dst_iat_mean_s")] = np.nan
    prep = Preprocessor.fit(x)
    missing = rng.random(x.shape) < 0.3
    expected = prep.transform(np.where(missing, np.nan, x))
    got = prep.as_missing(torch.from_numpy(prep.transform(x)), torch.from_numpy(missing))
    assert np.array_equal(got.numpy(), expected)
    assert missing[:, prep.indicator_index].any()  # the draw covers features with indicators


MASKED_AUROC = 0.82  # 30% of features masked; measured 0.905-0.906 with, 0.703-0.718 without


def masked_auroc(det, corpus, share=0.3):
    _, unseen, malicious = corpus
    bad = np.concatenate(list(malicious.values()))
    rng = np.random.default_rng(7)
    masked = [np.where(rng.random(x.shape) < share, np.nan, x) for x in (unseen, bad)]
    return auroc(det.score(masked[1])[0], det.score(masked[0])[0])


def test_features_missing_at_random_do_not_make_benign_flows_anomalous(trained, corpus):
    """Mask augmentation (the default): with 30% of every test flow's features missing,
    malicious flows still rank above unseen benign ones; the same model trained without it
    fails the same bound."""
    with_mask = masked_auroc(trained[0], corpus)
    plain = DiffusionDetector(TrainConfig(train_steps=1000, mask_augment=0.0)).fit(corpus[0])
    without = masked_auroc(plain, corpus)
    print(f"AUROC with 30% of features masked: {with_mask:.3f}, without augmentation {without:.3f}")
    assert trained[0].config.mask_augment > 0
    assert with_mask >= MASKED_AUROC > without


def test_holdout_split_last_calibrates_on_the_flows_read_last(corpus):
    """holdout_split "last": the thresholds are those of the last 20% of the flows as read (a
    later time window), which the networks never trained on."""
    train, _, _ = corpus
    x = train[:400]
    det = DiffusionDetector(TrainConfig(train_steps=5, holdout_split="last")).fit(x)
    fitted = dict(det.threshold_)
    det.calibrate(x[-80:])
    assert det.threshold_ == fitted
    with pytest.raises(ValueError, match="holdout_split must be one of"):
        TrainConfig(holdout_split="first")
