"""Entity risk: decay, baselines, the excess that opens an incident, its bounds, and the fit
that sets the threshold from the analyst's budget on held-out benign traffic."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scapy.all import IP, TCP, Ether

from quietwire.agent.detect.model import ModelError, ScoringModel
from quietwire.agent.detect.risk import (
    RiskBaseline,
    RiskCalibration,
    RiskSettings,
    RiskTable,
    address_key,
    entity_keys,
    flow_risk,
)
from quietwire.agent.flow.table import host_hash
from quietwire.agent.site.riskfit import (
    MIN_THRESHOLD,
    HostTimes,
    SiteEvidence,
    fit_risk,
    store_risk,
    threshold_for_budget,
)
from quietwire.cli import main

from .conftest import write_pcap

S = 10**9


def key_of(ip: str, role: int = 0) -> np.uint64:
    hi, lo = address_key(ip)
    host = host_hash(np.array([hi], np.uint64), np.array([lo], np.uint64))
    return entity_keys(np.array([role]), host)[0]


def test_flow_risk_is_weight_plus_surprisal_above_the_floor():
    settings = RiskSettings(floor=1.0, max_surprisal=6.0)
    tail = np.array([1.0, 0.1, 0.01, 1e-3, 1e-12, np.nan])
    got = flow_risk(np.array([0.0, 0, 0, 2, 0, 1]), tail, settings)
    assert np.allclose(got, [0, 0, 1, 4, 5, 1])


def test_risk_decays_with_its_half_life_and_sums_per_cause():
    table = RiskTable(["a", "b"], [False, False], RiskSettings(half_life_s=60, threshold=5))
    k = key_of("10.0.0.1")
    keys, risk, excess, direct = table.add(
        np.array([k, k, k]), np.array([0, 0, 1]), np.array([2.0, 2.0, 1.0]), 0
    )
    assert keys.tolist() == [k] and risk[0].tolist() == [4.0, 1.0] and excess[0] == 5.0
    assert not direct[0]
    _, risk, excess, _ = table.add(np.array([k]), np.array([1]), np.array([1.0]), 60 * S)
    assert np.allclose(risk[0], [2.0, 1.5]) and math.isclose(excess[0], 3.5)


def test_baseline_is_the_hosts_own_then_the_sites():
    base = RiskBaseline(("a", "d"), {"a": 1.0}, {"source 10.0.0.1": {"a": 10.0, "d": 3.0}})
    table = RiskTable(["a", "d"], [False, True], baseline=base)
    busy, new = key_of("10.0.0.1"), key_of("10.0.0.2")
    keys, _, excess, direct = table.add(
        np.array([busy, new, busy]), np.array([0, 0, 1]), np.array([8.0, 8.0, 2.0]), 0
    )
    got = dict(zip(keys.tolist(), zip(excess.tolist(), direct.tolist())))
    assert got[int(busy)] == (0.0, False)  # under its own 10, and 2 of d under its usual 3
    assert got[int(new)] == (7.0, False)  # over the site's 1
    _, _, _, direct = table.add(np.array([busy]), np.array([1]), np.array([2.0]), 0)
    assert direct.tolist() == [True]  # 4 of a direct cause, over its usual 3
    # the victim role of the same address has its own (site) baseline
    assert key_of("10.0.0.1", 1) != busy


def test_risk_table_stays_bounded_and_keeps_the_riskiest():
    table = RiskTable(["a"], [False], RiskSettings(max_entities=100))
    rng = np.random.default_rng(0)
    for step in range(20):
        keys = rng.integers(1, 2**63, 500).astype(np.uint64)
        table.add(keys, np.zeros(500, np.int64), np.full(500, 1.0), step * S)
    hot = np.uint64(7)
    table.add(np.array([hot]), np.array([0]), np.array([1000.0]), 21 * S)
    table.add(
        rng.integers(1, 2**63, 500).astype(np.uint64), np.zeros(500, int), np.ones(500), 22 * S
    )
    assert len(table) == 100 and table.forgotten == 20 * 500 + 501 - 100
    assert table.top(1, 22 * S)[0][0] == int(hot)


def test_threshold_for_budget():
    peaks = np.array([0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], float)
    t, _ = threshold_for_budget(peaks, 3.0)  # three entities may reach it
    assert (peaks >= t).sum() == 3 and t > 7
    t, how = threshold_for_budget(peaks, 0.01)  # far less than one: extrapolated above all
    assert t > 10 and "exponential tail" in how
    assert threshold_for_budget(np.zeros(5), 0.01)[0] == MIN_THRESHOLD


def evidence(rows, hosts_every_600s):
    """SiteEvidence from (entity ip, cause index, risk, time s) rows, and the hosts whose
    (benign) flows every 10 minutes of a day make up the traffic."""
    keys = np.array([key_of(ip) for ip, *_ in rows], np.uint64)
    times = [(h, t) for h in hosts_every_600s for t in range(0, 86400, 600)]
    times += [(ip, t) for ip, *_, t in rows]
    hosts = np.array(
        [host_hash(*[np.array([v], np.uint64) for v in address_key(h)])[0] for h, _ in times],
        np.uint64,
    )
    ns = np.array([int(t * S) for _, t in times], np.int64)
    return SiteEvidence(
        ["unknown_anomaly", "port_scan"],
        [False, True],
        keys,
        np.array([c for _, c, _, _ in rows], np.int64),
        np.array([r for *_, r, _ in rows], float),
        np.array([int(t * S) for *_, t in rows], np.int64),
        {int(k): f"source {ip}" for k, (ip, *_) in zip(keys, rows)},
        HostTimes.of(hosts, ns, ns + S),
        flows=len(times),
        mid_ns=int(np.median(ns)),
    )


def test_fit_sets_baselines_and_a_threshold_the_held_out_half_keeps():
    """A busy host with odd flows all day, a quiet one, and a day's traffic: the busy host's
    baseline absorbs its usual risk; the threshold sits above every held-out excess."""
    day = 86400
    rows = [("10.0.0.1", 0, 2.0, t) for t in range(0, day, 600)]  # every 10 minutes
    rows += [("10.0.0.2", 0, 2.0, day * 0.75)]  # one odd flow, in the held-out half
    hosts = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    fit = fit_risk(evidence(rows, hosts), budget=1.0, settings=RiskSettings(half_life_s=3600))
    busy = fit.baseline.hosts["source 10.0.0.1"]["unknown_anomaly"]
    assert busy > 10  # about 12 odd flows an hour's half-life keeps: its usual
    assert fit.threshold > fit.record["highest_excess_held_out"] > 0
    assert fit.record["held_out_host_days"] == pytest.approx(1.5, rel=0.02)
    # stored in a model and read back by the agent
    again = RiskCalibration.from_json(fit.to_json())
    assert again.threshold == fit.threshold and again.baseline.hosts == fit.baseline.hosts


def test_a_model_carries_its_risk_calibration(tmp_path):
    from quietwire.agent.detect.model import DEFAULT_MODEL

    cal = RiskCalibration(12.5, 1.0, 3600.0, RiskBaseline(("a",), {"a": 1.0}, {}), {})
    out = tmp_path / "m.onnx"
    store_risk(DEFAULT_MODEL, cal, out)
    assert ScoringModel(out).risk.threshold == 12.5
    import onnx

    proto = onnx.load(str(out))
    for prop in proto.metadata_props:
        if prop.key == "risk":
            prop.value = json.dumps({"threshold": "soon"})
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    with pytest.raises(ModelError, match="bad.onnx: bad risk metadata"):
        ScoringModel(tmp_path / "bad.onnx")


def test_calibrate_fits_the_risk_threshold_on_a_capture(tmp_path, capsys):
    """`quietwire calibrate` on a capture writes the incident threshold and baselines; the
    replay of the same model then uses them."""
    pkts, times = [], []
    for i in range(3000):
        src = f"10.0.{i % 7}.{1 + i % 50}"
        pkts.append(Ether() / IP(src=src, dst="10.0.9.9") / TCP(sport=1024 + i, dport=80))
        times.append(0.5 * i)
    pcap = write_pcap(tmp_path / "site.pcap", pkts, times)
    out = tmp_path / "site.onnx"
    assert (
        main(
            [
                "calibrate",
                "--model",
                str(_default()),
                str(pcap),
                "-o",
                str(out),
                "--allow-few-flows",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "incidents: risk threshold" in printed
    model = ScoringModel(out)
    assert model.risk is not None and model.risk.threshold >= MIN_THRESHOLD
    assert model.risk.record["records"] >= 3000  # flows, and interim records of open ones


def _default():
    from quietwire.agent.detect.model import DEFAULT_MODEL

    return DEFAULT_MODEL


def test_host_days_count_the_minutes_a_host_was_there():
    """Two hosts: one busy for 2 h, then again 3 days later for 1 h (the gap does not count);
    one seen once (a minute). Time is counted in whole minutes, first to last of a stretch."""
    h = 3600 * S
    host = np.array([1, 1, 1, 1, 2], np.uint64)
    first = np.array([0, h, 72 * h, 72 * h + h // 2, 5 * h], np.int64)
    last = first + np.array([h // 2, h, h // 2, h // 2, 0])
    times = HostTimes.of(host, first, last)
    # host 1: minutes 0..120 (121) and 4320..4380 (61); host 2: minute 300
    assert times.days(0, 100 * h) == pytest.approx((121 + 61 + 1) / 1440)
    assert times.days(0, 10 * h) == pytest.approx((121 + 1) / 1440)
    assert times.hosts_in(0, 10 * h) == 2 and times.hosts_in(10 * h, 100 * h) == 1
    joined = HostTimes.join([times, HostTimes.of(host[:1], first[:1], last[:1])])
    assert len(joined) == len(times)  # the same minutes again add nothing


def test_train_on_captures_fits_the_risk_threshold(tmp_path, capsys):
    """`quietwire train` on captures fits entity risk on them too (a flow table would not)."""
    from quietwire import DATA

    out = tmp_path / "m.onnx"
    args = ["train", "--benign", str(DATA / "sample.pcap"), "-o", str(out), "--train-steps", "20"]
    assert main([*args, "--budget", "2"]) == 0
    assert "incidents: risk threshold" in capsys.readouterr().out
    risk = ScoringModel(out).risk
    assert risk is not None and risk.budget == 2.0 and risk.threshold >= MIN_THRESHOLD
    assert main([*args, "--budget", "0"]) == 2
    assert "--budget 0: expected a positive number" in capsys.readouterr().err


def test_calibrate_fits_the_risk_threshold_on_a_flow_log(tmp_path, capsys):
    """A flow log carries each flow's identity: calibrate --risk-only fits on it, and the
    scores' thresholds are left as they were."""
    from quietwire import DATA

    log = tmp_path / "flows.json"
    assert main(["replay", str(DATA / "sample.pcap"), "--flow-log", str(log)]) == 0
    out = tmp_path / "m.onnx"
    assert (
        main(["calibrate", "--risk-only", "--model", str(_default()), str(log), "-o", str(out)])
        == 0
    )
    assert "incidents: risk threshold" in capsys.readouterr().out
    fitted, bundled = ScoringModel(out), ScoringModel(_default())
    assert fitted.thresholds == bundled.thresholds
    assert fitted.risk.record["records"] == 70  # 63 flows, 7 interim records
    assert (
        main(
            [
                "calibrate",
                "--risk-only",
                "--model",
                str(_default()),
                str(DATA / "sample.pcap"),
                "-o",
                str(tmp_path / "c.onnx"),
            ]
        )
        == 0
    )
    # the same flows, from the capture: the same evidence
    assert ScoringModel(tmp_path / "c.onnx").risk.record == fitted.risk.record
