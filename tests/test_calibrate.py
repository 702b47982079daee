"""`quietwire calibrate` (agent/site/calibrate.py, agent/site/sources.py): the bundled model calibrated
on real captures, checked against the original model, hand-rolled quantiles and the trainer's
own calibration."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from quietwire import DATA
from quietwire.agent.detect.model import DEFAULT_MODEL, ScoringModel
from quietwire.agent.features.schema import FEATURE_NAMES
from quietwire.agent.site.balance import burst_weights
from quietwire.agent.site.calibrate import (
    TABLE,
    TABLE_N_PLUS_1,
    calibrate,
    tail_table,
    weighted_thresholds,
)
from quietwire.agent.site.sources import read_site_flows
from quietwire.cli import main

from .conftest import REPO

LABELS = REPO / "quietwire" / "data" / "ndpi_labels.yaml"
SCAN = DATA / "scan.pcap"
SAMPLE = DATA / "sample.pcap"
PERIOD = "2010-07-04T20:24:16 to 2020-02-23T10:47:52"  # scan.pcap starts, sample.pcap ends


def benign_names() -> list[str]:
    import yaml

    return yaml.safe_load(LABELS.read_text())["benign"]


@pytest.fixture(scope="module")
def benign(ndpi):
    """The benign nDPI captures the bundled model was trained on (the site's flows here)."""
    return read_site_flows([ndpi / "pcap" / name for name in benign_names()])


@pytest.fixture(scope="module")
def calibrated(benign, tmp_path_factory):
    out = tmp_path_factory.mktemp("cal") / "site.onnx"
    report = calibrate(
        DEFAULT_MODEL,
        benign.features,
        out,
        allow_few_flows=True,  # 1,463 flows: too few for FPR 1e-4 (10,000)
        inputs=benign.inputs,
        period=(benign.first_start, benign.last_end),
    )
    return report, out


def initializers(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def kish(w: np.ndarray) -> float:
    """The effective number of flows of a weighted sample."""
    return float(w.sum() ** 2 / (w**2).sum())


# ---- (a) only the calibration changed ------------------------------------------------------
def test_the_calibrated_model_scores_exactly_as_the_original(calibrated, benign):
    report, out = calibrated
    before, after = ScoringModel(DEFAULT_MODEL), ScoringModel(out)
    scan = read_site_flows([SCAN]).features
    for x in (benign.features, scan):
        a, b = before.score(x), after.score(x)
        np.testing.assert_array_equal(a.score, b.score)
        np.testing.assert_array_equal(a.contributions, b.contributions)
    assert after.thresholds == report.thresholds != before.thresholds
    # Everything but the table, its denominator and two metadata entries is the same bytes.
    old, new = onnx.load(str(DEFAULT_MODEL)), onnx.load(str(out))
    assert [n.SerializeToString() for n in old.graph.node] == [
        n.SerializeToString() for n in new.graph.node
    ]
    a, b = initializers(DEFAULT_MODEL), initializers(out)
    assert a.keys() == b.keys()
    changed = {k for k in a if a[k].shape != b[k].shape or not np.array_equal(a[k], b[k])}
    assert changed <= {TABLE, TABLE_N_PLUS_1}
    meta_a = {p.key: p.value for p in old.metadata_props}
    meta_b = {p.key: p.value for p in new.metadata_props}
    assert set(meta_b) == set(meta_a) | {"calibration"}
    assert {k for k in meta_a if meta_a[k] != meta_b[k]} == {"thresholds"}
    assert old.graph.output == new.graph.output and old.opset_import == new.opset_import


# ---- (b) the thresholds give the FPR on the site's flows --------------------------------------
def test_share_over_each_new_threshold_is_its_fpr(calibrated, benign):
    report, out = calibrated
    model = ScoringModel(out)
    s = model.score(benign.features).score
    w = burst_weights(benign.features, report.host_balance, report.server_balance)
    assert report.balanced_records == pytest.approx(w.sum())
    for level in report.levels:
        q, t = level.fpr, level.new_threshold
        over = w[s > t].sum() / w.sum()
        at = w[s == t].sum() / w.sum()  # the threshold's own flows: the quantile's step
        assert q - at <= over <= q, (q, over, at)  # as close to q as a site score can be
        assert over == pytest.approx(level.balanced_share_over_new)
        assert np.mean(s > t) == pytest.approx(level.share_over_new)
        assert level.too_few_flows == (w.sum() * q < 1)
    assert report.levels[-1].too_few_flows  # 1e-4 needs 10,000 balanced flows
    # Per flow (burst flows counted fully) the share is within sampling error of the level:
    # with n_eff effective flows, the binomial sd is sqrt(q (1 - q) / n_eff).
    level = report.levels[0]
    sd = np.sqrt(level.fpr * (1 - level.fpr) / kish(w))
    assert abs(level.share_over_new - level.fpr) < 3 * sd, (level.share_over_new, sd)


def test_thresholds_hold_on_site_flows_they_were_not_computed_from(benign, tmp_path):
    """Calibrated on a random half of the site's flows, the other half's (balanced) share
    over the FPR-1e-2 threshold is 1e-2 within the sampling error of both halves."""
    x = benign.features
    half = np.random.default_rng(7).permutation(len(x)) < len(x) // 2
    report = calibrate(DEFAULT_MODEL, x[half], tmp_path / "half.onnx", allow_few_flows=True)
    model = ScoringModel(tmp_path / "half.onnx")
    held = x[~half]
    s = model.score(held).score
    w = burst_weights(held, report.host_balance, report.server_balance)
    w_cal = burst_weights(x[half], report.host_balance, report.server_balance)
    q = 1e-2
    share = w[s > model.thresholds[q]].sum() / w.sum()
    sd = np.sqrt(q * (1 - q) * (1 / kish(w) + 1 / kish(w_cal)))
    assert abs(share - q) < 3 * sd, (share, sd)


def test_calibrating_on_the_training_holdout_gives_back_the_bundled_calibration(benign, tmp_path):
    """The trainer held out 20% of these flows (seeded) and stored their sorted scores and
    its thresholds; calibrating on the same flows, unbalanced as the trainer does, gives them
    back (within the difference between torch's and onnxruntime's arithmetic)."""
    model = ScoringModel(DEFAULT_MODEL)
    if len(benign.features) != model.training["flows"]:
        pytest.skip(
            f"the extractor gives {len(benign.features)} flows for the bundled model's "
            f"captures, its training saw {model.training['flows']}: retrain the bundled model"
        )
    config = json.loads(model.metadata["config"])
    n = len(benign.features)
    order = np.random.default_rng(config["seed"]).permutation(n)
    holdout = benign.features[order[: max(int(n * config["holdout"]), 20)]]
    report = calibrate(
        DEFAULT_MODEL,
        holdout,
        tmp_path / "again.onnx",
        host_balance=0,
        server_balance=0,
        allow_few_flows=True,
    )
    trained = initializers(DEFAULT_MODEL)[TABLE].ravel()
    again = initializers(tmp_path / "again.onnx")[TABLE].ravel()
    assert len(again) == len(trained) == model.training["calibration_flows"]
    np.testing.assert_allclose(again, trained, rtol=1e-4, atol=1e-3)
    for q, t in model.thresholds.items():
        assert report.thresholds[q] == pytest.approx(t, rel=1e-4)


def test_weighted_quantiles_match_hand_rolled_ones():
    rng = np.random.default_rng(3)
    scores = rng.gamma(2.0, 5.0, 1000).astype(np.float32)
    scores[::50] = scores[1]  # ties
    levels = (1e-1, 1e-2, 1e-3)
    ones = np.ones(len(scores))

    def brute(q: float, w: np.ndarray) -> float:  # smallest score with <= q of weight above
        return min(float(v) for v in scores if w[scores > v].sum() <= q * w.sum())

    for q, t in weighted_thresholds(scores, ones, levels).items():
        assert t == brute(q, ones)
    # Integer weights are the same as repeating the flows.
    w = rng.integers(1, 4, len(scores)).astype(np.float64)
    repeated = np.repeat(scores, w.astype(int))
    assert weighted_thresholds(scores, w, levels) == weighted_thresholds(
        repeated, np.ones(len(repeated)), levels
    )
    for q, t in weighted_thresholds(scores, w, levels).items():
        assert t == brute(q, w)
    # The table: every score with unit weights; weighted quantiles otherwise.
    np.testing.assert_array_equal(tail_table(scores, ones), np.sort(scores))
    table = tail_table(repeated, np.ones(len(repeated)), points=500)
    assert len(table) == 500 and (np.diff(table) >= 0).all()
    np.testing.assert_array_equal(table, tail_table(scores, w, points=500))


# ---- (c) tail probabilities follow the new table ---------------------------------------------
def test_tail_probability_is_the_share_of_site_flows_scoring_as_high(calibrated, benign):
    report, out = calibrated
    table = initializers(out)[TABLE].ravel()
    assert initializers(out)[TABLE_N_PLUS_1] == len(table) + 1 == report.table_points + 1
    assert (np.diff(table) >= 0).all()
    s = ScoringModel(out).score(benign.features)
    # The graph's arithmetic, redone in numpy on the stored table.
    count = (table[None, :] >= s.score[:, None]).sum(1)
    np.testing.assert_allclose(s.tail_probability, (count + 1) / (len(table) + 1), rtol=1e-6)
    # ... and the table stands for the site's flows: (entries >= score) / M is the balanced
    # share of site flows scoring as high, to half a table step.
    w = burst_weights(benign.features, report.host_balance, report.server_balance)
    order = np.argsort(s.score)
    ge = w[order][::-1].cumsum()[::-1]  # weight scoring >= each sorted score (ties aside)
    first = np.searchsorted(s.score[order], s.score, side="left")
    share_ge = ge[first] / w.sum()
    assert np.abs(count - len(table) * share_ge).max() <= 0.5 + 1e-6
    # At each new threshold the tail probability is about the level.
    for level in report.levels[:2]:
        at = s.tail_probability[s.score == level.new_threshold][0]
        assert level.fpr <= at <= level.fpr + 5 / len(table)


# ---- (d) the calibration is recorded --------------------------------------------------------
def test_metadata_records_the_calibration(calibrated, benign, tmp_path):
    report, out = calibrated
    original = ScoringModel(DEFAULT_MODEL)
    model = ScoringModel(out)
    record = json.loads(model.metadata["calibration"])
    assert record["records"] == len(benign.features) == sum(n for _, n in benign.inputs)
    flow_open = benign.features[:, FEATURE_NAMES.index("flow_open")]
    assert record["interim_records"] == report.interim_records == (flow_open == 1).sum() > 0
    assert record["balanced_records"] == pytest.approx(report.balanced_records, abs=1e-3)
    assert [(i["path"], i["records"]) for i in record["inputs"]] == list(benign.inputs)
    assert record["inputs_total"] == len(benign_names())
    assert record["period"] == {"first_start": benign.first_start, "last_end": benign.last_end}
    assert benign.first_start < benign.last_end
    date = datetime.strptime(record["date"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert abs((datetime.now(UTC) - date).total_seconds()) < 600
    old = json.loads(original.metadata["thresholds"])
    assert record["original_thresholds"] == record["trained_thresholds"] == old
    assert record["burst_balance"] == {"host_balance": 10, "server_balance": 100}
    assert record["levels_with_too_few_flows"] == ["0.0001"]
    assert record["original_model"]["version"] == original.version != model.version
    # Calibrated again (on other flows): the record's originals are the first calibration's,
    # the trained thresholds stay the training's.
    again = calibrate(out, benign.features[::2], tmp_path / "again.onnx", allow_few_flows=True)
    record2 = json.loads(ScoringModel(tmp_path / "again.onnx").metadata["calibration"])
    assert record2["original_thresholds"] == json.loads(model.metadata["thresholds"])
    assert record2["trained_thresholds"] == old
    assert record2["records"] == again.records == len(benign.features[::2])
    assert record2["inputs"] == [] and record2["period"]["first_start"] is None


# ---- (e) a few attacks in the site's flows ----------------------------------------------------
def test_burst_balancing_keeps_a_scan_from_setting_the_threshold(benign, tmp_path):
    """A twentieth of the bundled nmap scan's probes (about 100 flows, 6% of the input; each
    keeps the context of the whole scan, as the scan among 20 times more benign flows would)
    mixed into the site's flows: with burst balancing the FPR-1e-2 threshold moves little,
    without it the threshold goes up into the scan's scores."""
    scan = read_site_flows([SCAN]).features
    pick = np.random.default_rng(11).permutation(len(scan))[: len(scan) // 20]
    mixed = np.concatenate([benign.features, scan[pick]])

    def threshold(x, balance: bool, name: str) -> float:
        kw = {} if balance else {"host_balance": 0, "server_balance": 0}
        report = calibrate(DEFAULT_MODEL, x, tmp_path / name, allow_few_flows=True, **kw)
        return report.thresholds[1e-2]

    clean, dirty = threshold(benign.features, True, "a"), threshold(mixed, True, "b")
    clean_raw, dirty_raw = threshold(benign.features, False, "c"), threshold(mixed, False, "d")
    assert abs(dirty - clean) < 0.1 * abs(dirty_raw - clean_raw), (
        clean,
        dirty,
        clean_raw,
        dirty_raw,
    )
    assert abs(dirty - clean) < 0.25 * clean
    scores = ScoringModel(DEFAULT_MODEL).score(scan).score
    assert np.mean(scores > dirty) > 0.95  # the scan is still flagged at the new threshold
    assert np.mean(scores > dirty_raw) < 0.5  # and would mostly not be without balancing


# ---- the command, flow tables, errors ---------------------------------------------------------
def test_the_command_reports_and_reads_flow_tables(tmp_path, capsys):
    """Bundled captures only (no ../shared): the report's lines; a flow table that `quietwire
    flows` wrote from the same capture calibrates to the same model."""
    assert main(["flows", str(SCAN), "-o", str(tmp_path / "scan.csv")]) == 0
    capsys.readouterr()
    args = ["calibrate", "--model", str(DEFAULT_MODEL), "--allow-few-flows", "-o"]
    assert main([*args, str(tmp_path / "a.onnx"), str(SAMPLE), str(SCAN)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"calibrated {DEFAULT_MODEL} -> {tmp_path / 'a.onnx'}"
    x = read_site_flows([SAMPLE, SCAN]).features
    n, interim = len(x), int(x[:, FEATURE_NAMES.index("flow_open")].sum())
    assert out[1].startswith(f"records: {n:,} ({n - interim:,} flows, {interim:,} interim) from 2 ")
    assert out[1].endswith(" after burst balancing (host 10, server 100)")
    assert out[2] == f"period: {PERIOD} (UTC)"
    assert out[3].split() == "FPR old threshold -> new records over old over new (balanced)".split()
    rows = [line.split() for line in out[4:7]]
    assert [r[0] for r in rows] == ["0.01", "0.001", "0.0001"] and all(r[2] == "->" for r in rows)
    assert out[-2].startswith("* fewer balanced records than 1/FPR")
    assert out[-1].startswith("incidents: risk threshold ")  # fitted on the capture's flows

    assert main([*args, str(tmp_path / "b.onnx"), str(tmp_path / "scan.csv")]) == 0
    assert main([*args, str(tmp_path / "c.onnx"), str(SCAN)]) == 0
    capsys.readouterr()
    b, c = ScoringModel(tmp_path / "b.onnx"), ScoringModel(tmp_path / "c.onnx")
    assert b.thresholds == c.thresholds
    rb, rc = (json.loads(m.metadata["calibration"]) for m in (b, c))
    assert rb["period"] == rc["period"] and rb["records"] == rc["records"] > 1900


def _tiny_onnx(path: Path) -> Path:
    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    onnx.save_model(helper.make_model(graph), str(path))
    return path


def _other_schema(path: Path) -> Path:
    model = onnx.load(str(DEFAULT_MODEL))
    for prop in model.metadata_props:
        if prop.key == "schema_hash":
            prop.value = "0000000000000000"
    onnx.save_model(model, str(path))
    return path


def _empty_capture(path: Path) -> Path:
    path.write_bytes(SAMPLE.read_bytes()[:24])  # the pcap header, no packet
    return path


def _other_table(path: Path) -> Path:
    path.write_text(
        ",".join(("schema_hash", *FEATURE_NAMES)) + "\n" + "beef" + ",1" * len(FEATURE_NAMES) + "\n"
    )
    return path


@pytest.mark.parametrize(
    "case, model, inputs, expected",
    [
        ("missing model", lambda t: t / "nope.onnx", lambda t: [SAMPLE], "cannot read model"),
        ("not onnx", lambda t: SAMPLE, lambda t: [SAMPLE], "not a valid ONNX model"),
        (
            "not a quietwire model",
            lambda t: _tiny_onnx(t / "tiny.onnx"),
            lambda t: [SAMPLE],
            "not a quietwire model",
        ),
        (
            "model of another schema",
            lambda t: _other_schema(t / "other.onnx"),
            lambda t: [SAMPLE],
            "model expects feature schema 0000000000000000",
        ),
        (
            "table of another schema",
            lambda t: DEFAULT_MODEL,
            lambda t: [_other_table(t / "other.csv")],
            "line 2: schema_hash 'beef' does not match",
        ),
        (
            "no flows",
            lambda t: DEFAULT_MODEL,
            lambda t: [_empty_capture(t / "empty.pcap")],
            "no flows to calibrate on in",
        ),
        ("missing input", lambda t: DEFAULT_MODEL, lambda t: [t / "x.pcap"], "no such file"),
        (
            "unknown input kind",
            lambda t: DEFAULT_MODEL,
            lambda t: [LABELS],
            "not an input calibration can read",
        ),
        (
            "too few flows",
            lambda t: DEFAULT_MODEL,
            lambda t: [SAMPLE],
            "too few flows in {input} to calibrate FPR 0.0001: {flows} records (",
        ),
    ],
)
def test_bad_input_is_one_line_naming_the_file(case, model, inputs, expected, tmp_path, capsys):
    m, files = model(tmp_path), inputs(tmp_path)
    out = tmp_path / "out.onnx"
    rc = main(["calibrate", "--model", str(m), *map(str, files), "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, (case, err)
    assert err[0].startswith("quietwire: error: "), err
    named = files[0] if "flows" in case or "input" in case or "table" in case else m
    assert str(named) in err[0], (case, err)
    flows = len(read_site_flows(files).features) if case == "too few flows" else 0
    assert expected.format(input=files[0], flows=flows) in err[0], (case, err)
    assert not out.exists()
    if case == "too few flows":
        assert "needs 10,000 after burst balancing" in err[0] and "--allow-few-flows" in err[0]


def test_flow_logs_calibrate_as_the_capture_they_were_written_from(tmp_path, capsys):
    """A flow log the agent wrote (plain, gzipped after rotation, or named .jsonl) gives the
    same flows and thresholds as the capture it came from; another schema's records are
    skipped with a warning."""
    import gzip

    from quietwire.agent.capture.pcap import read_capture
    from quietwire.agent.features.meter import FlowMeter
    from quietwire.agent.output.flowlog import flow_lines

    model = ScoringModel(DEFAULT_MODEL)
    meter = FlowMeter()
    parts = [meter.add(batch) for batch in read_capture(SCAN)] + list(meter.drain())
    text = "".join(flow_lines(p, model.score(p.features), model.version) for p in parts if len(p))
    log = tmp_path / "flows.json"
    log.write_text(text)
    (tmp_path / "flows.20240102T030405Z.json.gz").write_bytes(gzip.compress(text.encode()))
    (tmp_path / "flows.jsonl").write_text(
        text.replace(f'"schema_hash":"{model.metadata["schema_hash"]}"', '"schema_hash":"beef"', 1)
    )
    args = ["calibrate", "--model", str(DEFAULT_MODEL), "--allow-few-flows", "-o"]
    assert main([*args, str(tmp_path / "capture.onnx"), str(SCAN)]) == 0
    capture = ScoringModel(tmp_path / "capture.onnx")
    for name in ("flows.json", "flows.20240102T030405Z.json.gz"):
        out = tmp_path / f"{name}.onnx"
        assert main([*args, str(out), str(tmp_path / name)]) == 0
        assert ScoringModel(out).thresholds == capture.thresholds
        record = json.loads(ScoringModel(out).metadata["calibration"])
        assert record["records"] == sum(len(p) for p in parts)
        assert record["period"] == json.loads(capture.metadata["calibration"])["period"]
    assert capsys.readouterr().err == ""
    assert main([*args, str(tmp_path / "jsonl.onnx"), str(tmp_path / "flows.jsonl")]) == 0
    assert capsys.readouterr().err.splitlines() == [
        f"quietwire: warning: {tmp_path / 'flows.jsonl'}: skipped 1 record of another "
        "feature schema (beef)"
    ]
    record = json.loads(ScoringModel(tmp_path / "jsonl.onnx").metadata["calibration"])
    assert record["records"] == sum(len(p) for p in parts) - 1
    site = read_site_flows([tmp_path])  # the directory: every log, the live and rotated files
    assert [Path(name).name for name, _ in site.inputs] == [
        "flows.20240102T030405Z.json.gz",
        "flows.json",
        "flows.jsonl",
    ]
