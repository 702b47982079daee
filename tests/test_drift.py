"""Score drift (agent/service/drift.py): shares over the thresholds and the population stability index
over a sliding window of minute buckets, checked against hand-computed values and, for a replay
through the Engine, against the scores the flow log recorded."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from quietwire import DATA
from quietwire.agent.capture.pcap import read_capture
from quietwire.agent.detect.model import DEFAULT_MODEL, ScoringModel
from quietwire.agent.detect.rules import load_rules
from quietwire.agent.output.alerts import AlertSink
from quietwire.agent.output.flowlog import FlowLog, FlowLogSettings
from quietwire.agent.service.drift import PSI_FLOOR, ScoreDrift, calibration_table, psi
from quietwire.agent.service.engine import Engine
from quietwire.agent.service.metrics import Metrics
from quietwire.rules import DEFAULT_RULES

from .conftest import meter_file


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def drift_with(clock, thresholds=None, table=None) -> ScoreDrift:
    d = ScoreDrift(clock=clock)
    d.reset(thresholds or {0.01: 90.0, 0.001: 98.0}, table)
    return d


TABLE = np.arange(1000, dtype=np.float64)  # deciles: 0-99, 100-199, ...


def test_shares_over_the_thresholds_in_the_window():
    clock = Clock(600.0)
    d = drift_with(clock)
    assert d.snapshot().records == 0 and d.snapshot().psi is None
    d.observe(np.array([10.0, 95.0, 99.0, 50.0]))  # minute 10
    clock.now = 660.0 + 59  # minute 11
    d.observe(np.array([91.0, 1.0, 2.0, 3.0, 4.0, 5.0]))
    s = d.snapshot()
    assert s.records == 10
    assert s.share_over == {0.01: 3 / 10, 0.001: 1 / 10}
    clock.now = 600.0 + 14 * 60 + 30  # minute 24: minute 10 is still in the last 15
    assert d.snapshot().records == 10
    clock.now = 600.0 + 15 * 60  # minute 25: minute 10 has left the window
    assert d.snapshot().records == 6 and d.snapshot().share_over[0.01] == 1 / 6
    clock.now += 60
    assert d.snapshot().records == 0


def test_memory_is_one_row_per_minute():
    clock = Clock()
    d = drift_with(clock, table=TABLE)
    for minute in range(100):
        clock.now = minute * 60.0
        d.observe(np.full(1000, float(minute)))
        d.observe(np.full(10, 500.0))  # the same minute: the same row
    assert len(d._buckets) == 15


def test_psi_against_the_calibration_deciles():
    clock = Clock()
    d = drift_with(clock, table=TABLE)
    d.observe(TABLE.copy())  # the calibration's own distribution: no drift
    assert d.snapshot().psi == pytest.approx(0.0, abs=1e-12)
    d.reset({0.01: 990.0}, TABLE)
    live = np.concatenate([np.full(500, 5.0), np.full(500, 995.0)])  # half in each end decile
    d.observe(live)
    expected = 2 * (0.5 - 0.1) * np.log(0.5 / 0.1) + 8 * (PSI_FLOOR - 0.1) * np.log(PSI_FLOOR / 0.1)
    assert d.snapshot().psi == pytest.approx(expected)
    assert d.snapshot().share_over == {0.01: 0.5}


def test_psi_with_tied_calibration_scores():
    """A score ceiling (DTE ties its most unusual flows at the largest step): 30% of the table
    is one value; the deciles that fall on it hold nothing, and the same distribution live
    gives no drift."""
    table = np.concatenate([np.linspace(0, 50, 700), np.full(300, 99.0)])
    d = drift_with(Clock(), table=table)
    d.observe(table.copy())
    assert d.snapshot().psi == pytest.approx(0.0, abs=1e-12)
    d.observe(np.full(1000, 99.0))  # now 65% at the ceiling
    a = np.array([0.05] * 7 + [0, 0, 0.65])  # the live shares by bin, by hand
    e = np.array([0.1] * 7 + [0, 0, 0.3])
    assert d.snapshot().psi == pytest.approx(psi(a, e))
    assert psi(a, e) > 0.25


def test_calibration_table_is_what_the_tail_probability_counts():
    model = ScoringModel(DEFAULT_MODEL)
    table = calibration_table(model.path, model.version)
    proto = onnx.load(str(DEFAULT_MODEL))
    init = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert np.array_equal(table, init["calibration/scores"].reshape(-1).astype(np.float64))
    scores = model.score(meter_file(DATA / "scan.pcap").features)
    counted = (1 + (table[None, :] >= scores.score[:, None]).sum(axis=1)) / (len(table) + 1)
    assert np.allclose(scores.tail_probability, counted, rtol=1e-5)
    assert calibration_table(model.path, "0" * 12) is None  # another file now
    assert calibration_table(DATA / "nothing.onnx", model.version) is None


def replayed(tmp_path):
    metrics = Metrics()
    flow_log = FlowLog(FlowLogSettings(tmp_path / "flows.json"), metrics)
    engine = Engine(
        ScoringModel(), load_rules(DEFAULT_RULES), AlertSink(None), metrics, flow_log=flow_log
    )
    for path in (DATA / "sample.pcap", DATA / "scan.pcap"):
        for batch in read_capture(path, chunk_bytes=16 << 10):
            engine.process(batch)
        engine.flush()
        engine.meters.clear()
    flow_log.close()
    return engine, metrics


def test_a_replay_exports_the_drift_of_its_scores(tmp_path):
    engine, metrics = replayed(tmp_path)
    scores = np.array(
        [json.loads(line)["quietwire"]["score"] for line in (tmp_path / "flows.json").open()]
    )
    snap = metrics.drift.snapshot()
    assert snap.records == len(scores) == engine.summary.flows + engine.summary.interim
    for fpr, threshold in engine.model.thresholds.items():
        assert snap.share_over[fpr] == pytest.approx(np.mean(scores > threshold))
    table = calibration_table(engine.model.path, engine.model.version)
    edges = np.quantile(table, np.linspace(0.1, 0.9, 9))
    live = np.bincount(np.searchsorted(edges, scores, side="right"), minlength=10)
    expected = np.bincount(np.searchsorted(edges, table, side="right"), minlength=10)
    assert snap.psi == pytest.approx(psi(live.astype(float), expected.astype(float)))
    text = metrics.exposition().decode()
    assert f"quietwire_score_window_records {float(len(scores))}" in text
    assert 'quietwire_score_share_over_threshold{fpr="0.01"}' in text
    assert "quietwire_score_psi " in text
    print(
        f"bundled model, sample.pcap + scan.pcap: {len(scores)} records, over the 1e-2 "
        f"threshold {snap.share_over[0.01]:.1%}, PSI {snap.psi:.2f}"
    )
    engine.reload(model=ScoringModel())  # a new model: the window starts again
    assert metrics.drift.snapshot().records == 0
