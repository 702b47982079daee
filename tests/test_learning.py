"""The learning period (agent/site/learning.py): the config key, the state machine driven by a fake
clock (the traffic time of replayed captures), a restart that resumes the period, too few
flows, a failed calibration, the state file; and `quietwire run` on a veth pair learning for a
few seconds, then switching its thresholds without a restart, its flow log training a model."""

from __future__ import annotations

import gzip
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from quietwire import DATA
from quietwire.agent.capture.pcap import read_capture
from quietwire.agent.detect.model import DEFAULT_MODEL, ScoringModel
from quietwire.agent.detect.rules import load_rules
from quietwire.agent.features.schema import FEATURE_NAMES
from quietwire.agent.flow.table import FlowConfig
from quietwire.agent.output.alerts import AlertSink
from quietwire.agent.output.flowlog import FlowLog, FlowLogSettings
from quietwire.agent.service.config import ConfigError, load_config
from quietwire.agent.service.engine import Engine, EngineSettings
from quietwire.agent.service.metrics import Metrics
from quietwire.agent.site.calibrate import calibrate
from quietwire.agent.site.learning import (
    Learner,
    LearnSettings,
    format_duration,
    load_state,
    parse_duration,
    state_path,
)
from quietwire.agent.site.sources import period_records
from quietwire.cli import main

from .test_daemon import PY, netns, start_daemon, total  # noqa: F401 - netns: the fixture

SCAN, PHONE = DATA / "scan.pcap", DATA / "sample.pcap"
# A named cause for the scan, and every other flow an unknown anomaly: what learning holds back
RULES = """rules:
  - {id: 1, name: scan, action: alert, cause: port_scan, match: {features: {src_host_distinct_dst_ports: {gte: 20}}}}
  - {id: 2, name: anything, action: alert, cause: unknown_anomaly, min_score: 0, risk: 1, opens: direct}
"""
PERIOD_S = 30.0  # scan.pcap lasts 23 s


# ---- the config key -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, seconds",
    [("24h", 86400), ("90m", 5400), ("30s", 30), ("1.5d", 129600), (45, 45), ("2 h", 7200)],
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_format_duration():
    assert [format_duration(s) for s in (86400, 90061, 5400, 42, 0)] == [
        "1d",
        "1d 1h",
        "1h 30m",
        "42s",
        "0s",
    ]


def write_config(tmp_path: Path, learn: str, flow_log: bool = True) -> Path:
    path = tmp_path / "c.yaml"
    text = "capture: {interfaces: [lo]}\n"
    if flow_log:
        text += f"flow_log: {{path: {tmp_path}/flows.json}}\n"
    path.write_text(text + learn)
    return path


def test_learn_config(tmp_path):
    s = load_config(write_config(tmp_path, "learn: {period: 24h}\n"))
    assert s.learn == LearnSettings(period_s=86400.0)
    assert s.learn.min_records is None and s.learn.max_records == 200_000
    s = load_config(write_config(tmp_path, "learn: {period: 90, min_records: 500}\n"))
    assert (s.learn.period_s, s.learn.min_records) == (90.0, 500)
    assert load_config(write_config(tmp_path, "learn: false\n")).learn is None
    assert load_config(write_config(tmp_path, "")).learn is None


@pytest.mark.parametrize(
    "learn, message",
    [
        ("learn: {period: 24x}\n", r"c\.yaml:3: learn\.period: expected a duration like 24h"),
        ("learn: {period: 0h}\n", r"c\.yaml:3: learn\.period: expected a duration > 0"),
        ("learn: {period: -5}\n", r"c\.yaml:3: learn\.period: expected a duration > 0"),
        ("learn: {period: true}\n", r"c\.yaml:3: learn\.period: expected a string or number"),
        ("learn: {}\n", r"c\.yaml:3: learn: missing key 'period'"),
        ("learn: 24h\n", r"c\.yaml:3: learn: expected a mapping"),
        ("learn: {period: 1h, every: 2}\n", r"c\.yaml:3: learn: unknown key 'every'"),
        ("learn:\n  period: 1h\n  min_records: 0\n", r"c\.yaml:5: learn\.min_records: expected"),
        ("learn: {period: 1h, max_records: 1.5}\n", r"c\.yaml:3: learn\.max_records: expected"),
    ],
)
def test_bad_learn_config(tmp_path, learn, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path, learn))


def test_learning_needs_the_flow_log(tmp_path, capsys):
    path = write_config(tmp_path, "learn: {period: 24h}\n", flow_log=False)
    with pytest.raises(ConfigError, match=r"c\.yaml:2: learn: .* needs flow_log"):
        load_config(path)
    assert main(["check-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs flow_log" in err
    assert main(["run", "--config", str(path)]) == 2  # refused before any capture starts
    assert "needs flow_log" in capsys.readouterr().err


# ---- the state machine, on replayed traffic (the fake clock is the traffic time) ------------


def first_time(path: Path) -> float:
    return float(next(b for b in read_capture(path) if len(b)).ts_ns[0]) / 1e9


class Site:
    """A model, a flow log and an engine in a directory; a learner on the replay's clock."""

    def __init__(self, tmp_path: Path, settings: LearnSettings, now: float, **learner_kw):
        self.dir = tmp_path
        self.model_path = tmp_path / "model.onnx"
        if not self.model_path.exists():
            shutil.copy(DEFAULT_MODEL, self.model_path)
        (tmp_path / "rules.yaml").write_text(RULES)
        self.messages: list[str] = []
        self.metrics = Metrics()
        self.flow_log = FlowLog(FlowLogSettings(tmp_path / "flows.json"), self.metrics)
        self.learner = Learner(
            settings,
            self.flow_log.settings.path,
            ScoringModel(self.model_path),
            now,
            self.messages.append,
            self.metrics,
            background=learner_kw.pop("background", False),
        )
        self.engine = Engine(
            self.learner.model_for(ScoringModel(self.model_path)),
            load_rules(tmp_path / "rules.yaml"),
            AlertSink(tmp_path / "alerts.json"),
            self.metrics,
            # the scan's unanswered probes end in the period
            settings=EngineSettings(flow=FlowConfig(idle_timeout_s=5.0)),
            log=self.messages.append,
            flow_log=self.flow_log,
        )
        self.learner.tick(now, self.engine)

    def replay(self, path: Path, until: float = float("inf"), skip_to: float = 0.0) -> float:
        """Replay a capture's batches from ``skip_to`` to ``until`` (traffic time), ticking the
        learner before each as the daemon does every second; the last time seen."""
        now = 0.0
        for batch in read_capture(path, chunk_bytes=4 << 10):
            if not len(batch) or batch.ts_ns[0] / 1e9 < skip_to:
                continue
            if batch.ts_ns[0] / 1e9 >= until:
                break
            now = float(batch.ts_ns[0]) / 1e9
            self.learner.tick(now, self.engine)
            self.engine.process(batch)
        return now

    def advance(self, now: float) -> None:
        """Time passes without packets: flows time out, then the learner ticks."""
        self.engine.expire(int(now * 1e9))
        self.learner.tick(now, self.engine)

    def stop(self) -> None:
        """What SIGTERM does: score every open flow, close the files."""
        self.engine.flush()
        self.engine.sink.close()
        self.flow_log.close()

    def metric(self, name: str, **labels) -> float:
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(self.metrics.exposition().decode())
            for s in f.samples
        }
        return total(samples, name, **labels)

    def alerts(self) -> list[dict]:
        return [json.loads(line) for line in (self.dir / "alerts.json").open()]


def log_files(directory: Path) -> list[Path]:
    """The flow log's files: the rotated ones (gzipped), oldest first, and the live one."""

    def order(path: Path) -> tuple[str, int]:  # flows.<UTC time>[-N].json.gz
        stamp, _, n = path.name.split(".")[1].partition("-")
        return stamp, int(n or 0)

    return sorted(directory.glob("flows.*.json.gz"), key=order) + [directory / "flows.json"]


def period_features(files: list[Path], start: float, end: float) -> np.ndarray:
    """An independent reading of the flow log: every line's features whose flow ended in the
    period, by the plain json module."""
    lo = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(start)) + f".{int(start % 1 * 1e6):06d}"
    hi = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(end)) + f".{int(end % 1 * 1e6):06d}"
    rows = []
    for path in files:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as handle:
            for line in handle:
                r = json.loads(line)
                if lo <= r["flow"]["end"][:26] <= hi:
                    f = r["quietwire"]["features"]
                    rows.append([np.nan if f[n] is None else f[n] for n in FEATURE_NAMES])
    return np.array(rows, dtype=np.float32)


def test_learning_holds_back_unknown_anomalies_then_calibrates(tmp_path):
    t0 = first_time(SCAN)
    site = Site(tmp_path, LearnSettings(PERIOD_S, min_records=20), t0)
    original = ScoringModel(site.model_path)
    assert site.learner.learning and "learning period started: 30s" in site.messages[0]
    assert site.metric("quietwire_learning_active") == 1
    assert site.metric("quietwire_model_threshold", fpr="0.01") == original.thresholds[0.01]
    last = site.replay(SCAN)
    assert site.learner.learning
    assert site.metric("quietwire_learning_seconds_left") == pytest.approx(t0 + PERIOD_S - last)
    assert site.metric("quietwire_learning_progress_ratio") == pytest.approx((last - t0) / PERIOD_S)
    site.advance(t0 + PERIOD_S)  # the period is over: calibrate, swap
    assert not site.learner.learning

    calibrated = tmp_path / "model.calibrated.onnx"
    live = site.engine.model
    assert live.path == calibrated and ScoringModel(calibrated).version == live.version
    assert live.thresholds != original.thresholds
    for fpr, value in live.thresholds.items():
        assert site.metric("quietwire_model_threshold", fpr=f"{fpr:g}") == value
    assert site.metric("quietwire_model_info", version=live.version) == 1
    assert site.metric("quietwire_learning_calibrations_total", result="calibrated") == 1
    assert site.metric("quietwire_learning_active") == 0
    assert site.metric("quietwire_learning_progress_ratio") == 1
    record = json.loads(live.metadata["calibration"])
    assert record["period"]["first_start"].startswith("2010-07-04T20:24:16")
    assert record["original_model"]["version"] == original.version

    state = load_state(state_path(tmp_path / "flows.json"))
    assert state.status == "calibrated" and state.calibrated_model == str(calibrated)
    assert (state.started_at, state.model_version) == (t0, original.version)
    done = [m for m in site.messages if m.startswith("learning period done")]
    assert done and str(calibrated) in done[0] and "0.01 " in done[0]

    # The scan was raised while learning (a named cause); the unknown anomalies were not.
    site.replay(PHONE)  # then the phone's traffic, after the period: raised again
    site.stop()
    # The reference: the same records read by plain json, calibrated by calibrate() directly.
    features = period_features(log_files(tmp_path), t0, t0 + PERIOD_S)
    assert len(features) > 1900  # the scan's probes, all ended within the period
    reference = calibrate(original.path, features, tmp_path / "ref.onnx", min_records=20)
    assert reference.thresholds == live.thresholds
    assert record["records"] == len(features) == sum(i["records"] for i in record["inputs"])
    # entity risk fitted on every record of the period (read back with their identity)
    assert live.risk is not None and live.risk.record["records"] == len(features)
    assert any("incidents: risk threshold" in m for m in site.messages)
    opened = [a for a in site.alerts() if a["quietwire"]["incident"]["state"] == "open"]
    causes_2010 = {a["quietwire"]["incident"]["cause"] for a in opened if a["timestamp"] < "2011"}
    causes_2020 = {a["quietwire"]["incident"]["cause"] for a in opened if a["timestamp"] > "2020"}
    assert causes_2010 == {"port_scan"} and causes_2020 == {"unknown_anomaly"}
    held = site.engine.held_back_incidents["unknown_anomaly"]
    assert held >= 1
    assert site.metric("quietwire_learning_incidents_held_back_total") == held
    assert f"({held} held back while learning)" in " ".join(site.messages)


def test_a_restart_resumes_the_period_and_calibrates_on_all_of_it(tmp_path):
    t0 = first_time(SCAN)
    settings = LearnSettings(PERIOD_S, min_records=20)
    first = Site(tmp_path, settings, t0)
    middle = first.replay(SCAN, until=t0 + 3)
    first.stop()  # a restart: SIGTERM, and the flow log rotated meanwhile (gzipped)
    rotated = first.flow_log.file.rotate() if first.flow_log.file.size else None
    first.flow_log.close()

    second = Site(tmp_path, settings, middle + 1)
    assert second.learner.learning
    assert any(m.startswith("learning period resumed") for m in second.messages)
    assert load_state(state_path(tmp_path / "flows.json")).started_at == t0
    second.replay(SCAN, skip_to=t0 + 3)
    second.advance(t0 + PERIOD_S)  # the end: the live file is rotated, then read
    assert not second.learner.learning
    second.stop()
    files = log_files(tmp_path)
    assert len(files) == 3 and rotated is not None  # rotated at the restart, at the end; live
    features = period_features(files, t0, t0 + PERIOD_S)
    record = json.loads(second.engine.model.metadata["calibration"])
    assert record["records"] == len(features)
    read = [Path(i["path"]).name.removesuffix(".gz") for i in record["inputs"]]
    assert read == [f.name.removesuffix(".gz") for f in files[:2]]  # both runs' records
    reference = calibrate(second.model_path, features, tmp_path / "ref.onnx", min_records=20)
    assert reference.thresholds == second.engine.model.thresholds

    # Started again after the end: no new period, and the calibrated model runs.
    third = Site(tmp_path, settings, t0 + 3600)
    assert not third.learner.learning
    assert third.engine.model.path == tmp_path / "model.calibrated.onnx"
    assert third.engine.hold_back_causes == frozenset()
    assert any("learning period over since" in m for m in third.messages)
    # ... unless the configured model is another one (a retrained model was installed)
    other = ScoringModel(tmp_path / "ref.onnx")
    assert third.learner.model_for(other) is other


def test_too_few_flows_keep_the_thresholds(tmp_path):
    t0 = first_time(SCAN)
    site = Site(tmp_path, LearnSettings(10, min_records=10**9), t0)
    before = site.engine.model
    site.replay(SCAN)
    site.advance(t0 + 30)
    assert not site.learner.learning and site.engine.model is before
    assert site.engine.hold_back_causes == frozenset()
    assert site.metric("quietwire_learning_calibrations_total", result="too_few_flows") == 1
    assert site.metric("quietwire_model_threshold", fpr="0.01") == before.thresholds[0.01]
    assert any("too few flows" in m and "thresholds stay" in m for m in site.messages)
    assert not (tmp_path / "model.calibrated.onnx").exists()
    state = load_state(state_path(tmp_path / "flows.json"))
    assert state.status == "too_few_flows" and "min_records" in state.detail
    site.stop()
    again = Site(tmp_path, LearnSettings(10, min_records=10**9), t0 + 60)
    assert not again.learner.learning and again.engine.model.version == before.version


def test_a_failed_calibration_is_logged_and_capture_goes_on(tmp_path):
    t0 = first_time(SCAN)
    site = Site(tmp_path, LearnSettings(5, min_records=1), t0)
    site.replay(SCAN, until=t0 + 3)
    site.model_path.unlink()  # the model file went away: calibrate cannot load it
    site.advance(t0 + 6)
    assert not site.learner.learning
    assert site.metric("quietwire_learning_calibrations_total", result="failed") == 1
    assert any("calibration failed" in m and "cannot read model" in m for m in site.messages)
    site.replay(SCAN, skip_to=t0 + 3)  # scoring goes on with the old model
    site.stop()
    assert site.engine.summary.flows > 1900


def test_calibration_runs_in_the_background(tmp_path):
    t0 = first_time(SCAN)
    site = Site(tmp_path, LearnSettings(PERIOD_S, min_records=20), t0, background=True)
    site.replay(SCAN)
    site.advance(t0 + PERIOD_S)  # starts the thread
    assert site.learner.learning and site.learner._worker is not None
    site.learner.wait(60)
    site.advance(t0 + PERIOD_S + 1)  # picks the result up
    assert not site.learner.learning
    assert site.engine.model.path == tmp_path / "model.calibrated.onnx"


def test_a_damaged_state_file_starts_a_new_period(tmp_path):
    path = state_path(tmp_path / "flows.json")
    path.write_text("{not json")
    site = Site(tmp_path, LearnSettings(60), 1000.0)
    assert site.learner.learning and site.learner.state.started_at == 1000.0
    assert "cannot read learning state" in site.messages[0]
    assert load_state(path).started_at == 1000.0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file


def test_period_records_sample_within_the_period(tmp_path):
    t0 = first_time(SCAN)
    site = Site(tmp_path, LearnSettings(3600), t0)
    site.replay(SCAN)
    site.stop()
    everything = period_features([tmp_path / "flows.json"], t0, t0 + 10)
    found = period_records(tmp_path / "flows.json", t0, t0 + 10, max_records=10**6)
    assert found.records == len(everything) and np.array_equal(
        found.features, everything, equal_nan=True
    )
    sample = period_records(tmp_path / "flows.json", t0, t0 + 10, max_records=100, seed=3)
    assert sample.records == len(everything) and sample.features.shape == (100, len(FEATURE_NAMES))
    rows = {r.tobytes() for r in np.nan_to_num(everything, nan=-1)}
    assert all(r.tobytes() in rows for r in np.nan_to_num(sample.features, nan=-1))
    again = period_records(tmp_path / "flows.json", t0, t0 + 10, max_records=100, seed=3)
    assert np.array_equal(again.features, sample.features, equal_nan=True)  # seeded


# ---- the live daemon ------------------------------------------------------------------------


def test_live_learning_switches_thresholds_and_the_flow_log_trains(netns, tmp_path):  # noqa: F811
    """`quietwire run` with a learning period of 10 s on a veth pair fed by tcpreplay: the
    metrics show the bundled thresholds while learning and the calibrated ones after, without
    a restart; the calibrated model exists beside the configured one and loads; the flow log
    trains a model with `quietwire train`."""
    model = tmp_path / "model.onnx"
    shutil.copy(DEFAULT_MODEL, model)
    flows = tmp_path / "log" / "flows.json"
    port = 9109
    config = tmp_path / "config.yaml"
    config.write_text(
        f"capture: {{interfaces: [qwb]}}\nmodel: {model}\nflow: {{idle_timeout_s: 2}}\n"
        f"flow_log: {{path: {flows}}}\nlearn: {{period: 10s, min_records: 50}}\n"
        f"alerts: {{file: {tmp_path}/alerts.json}}\nmetrics: {{listen: 127.0.0.1, port: {port}}}\n"
    )
    log = tmp_path / "daemon.log"
    proc = start_daemon(netns, config, log)
    bundled = ScoringModel(model)
    try:
        m = scrape_metrics(netns, port)
        assert total(m, "quietwire_learning_active") == 1
        assert 0 < total(m, "quietwire_learning_seconds_left") <= 10
        before = {fpr: total(m, "quietwire_model_threshold", fpr=f"{fpr:g}") for fpr in (0.01,)}
        assert before[0.01] == bundled.thresholds[0.01]
        for capture in (SCAN, PHONE):
            subprocess.run(
                [*netns, "tcpreplay", "-q", "--topspeed", "-i", "qwa", str(capture)],
                check=True,
                capture_output=True,
            )
        wait_for_line(log, proc, "learning period done", timeout_s=60)
        m = scrape_metrics(netns, port)
        loaded = ScoringModel(tmp_path / "model.calibrated.onnx")
        after = {
            fpr: total(m, "quietwire_model_threshold", fpr=f"{fpr:g}") for fpr in loaded.thresholds
        }
        print(
            f"live learning: thresholds {bundled.thresholds} -> {after}; "
            + next(x for x in log.read_text().splitlines() if "learning period done" in x)
        )
        assert after == loaded.thresholds and after[0.01] != before[0.01]
        assert total(m, "quietwire_model_info", version=loaded.version) == 1
        assert total(m, "quietwire_learning_active") == 0
        assert total(m, "quietwire_learning_calibrations_total", result="calibrated") == 1
        assert proc.poll() is None  # no restart
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
    records = [
        line
        for path in log_files(flows.parent)
        for line in (gzip.open(path, "rt") if path.suffix == ".gz" else path.open())
    ]
    assert len(records) > 1900 and all('"in_iface":"qwb"' in r for r in records)
    assert_flow_log_trains(flows.parent, tmp_path / "site.onnx", bundled)


def scrape_metrics(namespace: list[str], port: int) -> dict:
    """The daemon's metrics, read from inside its network namespace: (name, labels) -> value."""
    out = subprocess.run(
        [
            *namespace,
            PY,
            "-c",
            "import urllib.request,sys;sys.stdout.write(urllib.request.urlopen("
            f"'http://127.0.0.1:{port}/metrics').read().decode())",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(out)
        for s in f.samples
    }


def wait_for_line(log: Path, proc: subprocess.Popen, text: str, timeout_s: float) -> None:
    """Until ``text`` is in the daemon's log; fails if the daemon exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while text not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)


def assert_flow_log_trains(log_dir: Path, trained: Path, bundled: ScoringModel) -> None:
    """`quietwire train` on the flow log's directory gives a model of the same schema."""
    pytest.importorskip("torch")
    res = subprocess.run(
        [PY, "-m", "quietwire.cli", "train", "--benign", str(log_dir), "--train-steps", "20"]
        + ["-o", str(trained)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert ScoringModel(trained).metadata["schema_hash"] == bundled.metadata["schema_hash"]
