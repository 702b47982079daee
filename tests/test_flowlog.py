"""The flow log (agent/output/flowlog.py, agent/output/rotation.py): the bundled captures replayed through
the Engine with a flow log; every record one EVE flow line whose identity, counts, features
and score are the meter's and the model's (bit for bit); read back by the reader the trainer
uses; rotation by size and age into gzip files under a retention cap; a full disk and an
unwritable directory counted while alerts go on; reopen after the file was moved (SIGHUP)."""

from __future__ import annotations

import gzip
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from quietwire import DATA
from quietwire.agent.capture.pcap import read_capture
from quietwire.agent.detect.model import Scores, ScoringModel
from quietwire.agent.detect.rules import load_rules
from quietwire.agent.features.schema import FEATURE_NAMES, SCHEMA_HASH, MeteredFlows
from quietwire.agent.flow.records import END_REASONS, FlowRecords
from quietwire.agent.output.alerts import AlertSink
from quietwire.agent.output.flowlog import (
    FlowLog,
    FlowLogSettings,
    FlowLogStats,
    flow_lines,
    read_flow_log,
)
from quietwire.agent.output.tablefields import identity_columns
from quietwire.agent.service.config import DEFAULT_RULES, ConfigError, load_config
from quietwire.agent.service.engine import Engine
from quietwire.agent.service.metrics import Metrics
from quietwire.cli import main

from .conftest import meter_file
from .test_daemon import netns  # noqa: F401 - the fixture: a veth pair in a namespace

CAPTURES = (DATA / "sample.pcap", DATA / "scan.pcap")


class Recorder(FlowLog):
    """A FlowLog that also keeps what the Engine handed it, to compare the lines with."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches = []

    def write(self, flows, scores, model_version, interface) -> None:
        self.batches.append((flows, scores))
        super().write(flows, scores, model_version, interface)


def replay(flow_log, alerts: Path | None = None, chunk_bytes: int = 16 << 10, captures=CAPTURES):
    """Replay the bundled captures (or ``captures``) through an Engine, each on its own (in
    16 KiB chunks: several batches)."""
    engine = Engine(
        ScoringModel(),
        load_rules(DEFAULT_RULES),
        AlertSink(alerts),
        flow_log.metrics,
        flow_log=flow_log,
    )
    for path in captures:
        for batch in read_capture(path, chunk_bytes=chunk_bytes):
            engine.process(batch, "file")
        engine.flush()
        engine.meters.clear()
    engine.sink.close()
    return engine


def records_in(engine) -> int:
    """Flow records the Engine scored: ended flows, and interim records where there are."""
    return engine.summary.flows + getattr(engine.summary, "interim", 0)


def lines_of(paths) -> list[str]:
    out = []
    for p in sorted(paths):
        opener = gzip.open if p.name.endswith(".gz") else open
        with opener(p, "rt") as handle:
            out += handle.read().splitlines()
    return out


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    """A sample's value as the metrics endpoint exports it (None if it is not exported)."""
    return metrics.registry.get_sample_value(name, labels)


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    path = tmp_path_factory.mktemp("log") / "flows.json"
    metrics = Metrics()
    flow_log = Recorder(FlowLogSettings(path), metrics)
    engine = replay(flow_log)
    flow_log.close()
    return path, flow_log, engine, metrics


def test_one_line_per_record_with_the_meters_values(logged):
    path, flow_log, engine, metrics = logged
    lines = path.read_text().splitlines()
    assert len(lines) == records_in(engine) == flow_log.lines > 2000
    assert len(flow_log.batches) >= 5  # several batches, each appended
    records = FlowRecords.concat([f.records for f, _ in flow_log.batches])
    features = np.concatenate([f.features for f, _ in flow_log.batches])
    score = np.concatenate([s.score for _, s in flow_log.batches])
    tail = np.concatenate([s.tail_probability for _, s in flow_log.batches])
    ident = identity_columns(records)
    parsed = [json.loads(line) for line in lines]
    for i, rec in enumerate(parsed):
        assert rec["event_type"] == "flow" and "in_iface" not in rec  # a replay: no interface
        for key in ("flow_id", "community_id", "src_ip", "src_port", "dest_ip", "dest_port"):
            assert rec[key] == ident[key][i], key
        assert rec["proto"] == ident["proto"][i] and rec["timestamp"] == ident["end"][i]
        flow = rec["flow"]
        for key in ("pkts_toserver", "pkts_toclient", "bytes_toserver", "bytes_toclient"):
            assert flow[key] == ident[key][i], key
        assert (flow["start"], flow["end"]) == (ident["start"][i], ident["end"][i])
        assert flow["reason"] == ident["end_reason"][i] and flow["reason"] in END_REASONS
        assert flow["state"] == ("open" if flow["reason"] == "interim" else "closed")
        q = rec["quietwire"]
        assert q["schema_hash"] == SCHEMA_HASH and q["model_version"] == engine.model.version
        assert np.float32(q["score"]) == score[i] and np.float32(q["tail_probability"]) == tail[i]
        assert list(q["features"]) == list(FEATURE_NAMES)
    # every feature, bit for bit (NaN written as null)
    written = np.array(
        [
            [math.nan if v is None else v for v in r["quietwire"]["features"].values()]
            for r in parsed
        ],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(written, features)
    assert np.isnan(features).any()  # the null case was exercised
    assert {r["src_ip"] for r in parsed} >= {"172.16.0.8"}  # nmap's source, from scan.pcap
    size = path.stat().st_size
    assert flow_log.bytes == size
    assert sample(metrics, "quietwire_flow_log_lines_total") == len(lines)
    assert sample(metrics, "quietwire_flow_log_bytes_total") == size
    assert sample(metrics, "quietwire_flow_log_errors_total", operation="write") == 0


def test_the_reader_gives_back_the_features_and_hosts(logged, tmp_path):
    path, flow_log, _, _ = logged
    features = np.concatenate([f.features for f, _ in flow_log.batches])
    stats = FlowLogStats()
    chunks = list(read_flow_log(path, stats))
    np.testing.assert_array_equal(np.concatenate([c.features for c in chunks]), features)
    hosts = [h for c in chunks for h in c.hosts]
    assert hosts == [json.loads(line)["src_ip"] for line in path.read_text().splitlines()]
    assert stats.flows == len(features) and stats.malformed == stats.other_schema == 0
    assert stats.first_start < stats.last_end

    # another schema, an alert line, a broken line, a non-number: skipped and counted
    lines = path.read_text().splitlines()[:50]
    other = json.loads(lines[0])
    other["quietwire"]["schema_hash"] = "0000000000000000"
    alert = {"event_type": "alert", "quietwire": {"incident": {}}}
    broken = lines[1][: len(lines[1]) // 2]
    bad_value = lines[2].replace('"duration_s":', '"duration_s":"x","ignored":', 1)
    mixed = tmp_path / "mixed.log"
    mixed.write_text(
        "\n".join([*lines[3:10], json.dumps(other), json.dumps(alert), broken, bad_value, ""])
    )
    stats = FlowLogStats()
    x = np.concatenate([c.features for c in read_flow_log(mixed, stats)])
    assert len(x) == 7 and stats.other_schema == 1 and stats.other_events == 1
    assert stats.other_schemas == {"0000000000000000"}
    assert stats.malformed == 2 and [n for n, _ in stats.first_malformed] == [10, 11]

    # a gzip file cut short: the lines before the cut, and what happened
    whole = gzip.compress("\n".join(lines).encode() + b"\n")
    cut = tmp_path / "cut.json.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    stats = FlowLogStats()
    x = [c.features for c in read_flow_log(cut, stats)]
    assert stats.truncated and 0 < stats.flows < 50


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float = 7.0) -> None:
        self.now += seconds


def in_slices(logged, size: int):
    """The replay's records and scores again, ``size`` at a time (many small batches)."""
    _, recorder, engine, _ = logged
    records = FlowRecords.concat([f.records for f, _ in recorder.batches])
    features = np.concatenate([f.features for f, _ in recorder.batches])
    scores = [np.concatenate([getattr(s, k) for _, s in recorder.batches]) for k in Scores_fields]
    for lo in range(0, len(features), size):
        part = slice(lo, lo + size)
        yield (
            MeteredFlows(records.take(part), features[part]),
            Scores(*(column[part] for column in scores)),
            engine.model.version,
        )


Scores_fields = ("score", "tail_probability", "contributions")


def test_rotation_by_size_gzips_whole_lines_and_keeps_every_record(logged, tmp_path):
    clock = FakeClock()
    path = tmp_path / "flows.json"
    settings = FlowLogSettings(path, rotate_bytes=500_000, rotate_age_s=0, retention_bytes=0)
    flow_log = FlowLog(settings, Metrics(), clock=clock)
    for flows, scores, version in in_slices(logged, 100):
        flow_log.write(flows, scores, version, "eth1")
    flow_log.close()
    rotated = flow_log.file.rotated_files()
    assert len(rotated) >= 5 and all(p.name.endswith(".json.gz") for p in rotated)
    assert all(p.name.startswith("flows.2023") for p in rotated)  # the clock's UTC time
    assert [p.name for p in rotated][:2] == [
        "flows.20231114T221320Z.json.gz",
        "flows.20231114T221320Z-1.json.gz",  # the same second: numbered, in order
    ]
    assert not list(tmp_path.glob("*.part"))
    lines = lines_of(rotated) + path.read_text().splitlines()
    assert len(lines) == flow_log.lines == logged[1].lines  # nothing lost, nothing twice
    assert all(json.loads(line)["in_iface"] == "eth1" for line in lines)  # whole lines
    for p in rotated:  # rotated at the first batch past the size
        assert 500_000 <= len(gzip.decompress(p.read_bytes())) < 500_000 + 100 * 3000
    # the trainer's reader takes the rotated files as they are
    read = sum(len(c.features) for p in rotated for c in read_flow_log(p))
    assert read == len(lines) - len(path.read_text().splitlines())


def test_rotation_by_age_and_the_retention_cap(logged, tmp_path):
    clock = FakeClock()
    path = tmp_path / "flows.json"
    cap = 60_000
    settings = FlowLogSettings(path, rotate_bytes=0, rotate_age_s=60, retention_bytes=cap)
    flow_log = FlowLog(settings, clock=clock)
    for flows, scores, version in in_slices(logged, 50):
        flow_log.write(flows, scores, version, None)
        clock.tick(20)  # a rotation every third batch
    flow_log.file.close()  # wait for the compressor (and its retention pass)
    rotated = flow_log.file.rotated_files()
    assert rotated and all(p.name.endswith(".gz") for p in rotated)
    assert sum(p.stat().st_size for p in rotated) <= cap
    assert path.exists() and path.stat().st_size > 0  # the live file is never deleted
    assert flow_log.errors == 0
    # the cap deleted the oldest (the first rotation was at 22:14:20, 60 s of clock in)
    assert rotated[0].name > "flows.20231114T221420Z.json.gz"
    assert len(rotated) >= 2
    # rotation by age happens without traffic too (the daemon ticks every second; age counts
    # from the open) ...
    flow_log.file.open()
    clock.tick(61)
    flow_log.tick()
    assert path.stat().st_size == 0
    # ... but an empty live file is not rotated, however old
    flow_log.file.close()
    before = flow_log.file.rotated_files()
    flow_log.file.open()
    clock.tick(3600)
    flow_log.tick()
    flow_log.file.close()
    assert flow_log.file.rotated_files() == before


def test_an_unwritable_directory_is_counted_and_alerts_go_on(tmp_path, capsys):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    alerts = tmp_path / "alerts.json"
    code = main(
        [
            "replay",
            *map(str, CAPTURES),
            "--alerts",
            str(alerts),
            "--flow-log",
            str(blocker / "flows.json"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 0
    assert len(alerts.read_text().splitlines()) == 2  # the scan's incident, open and close
    assert err.count("flow log: cannot open") == 1  # one log line for the whole episode
    assert "records dropped" in err and "flow log" in err.splitlines()[-1]
    assert "0 records" in err.splitlines()[-1]


def test_writing_resumes_when_the_directory_can_be_written(tmp_path):
    blocker = tmp_path / "logs"
    blocker.write_text("")  # a file where the directory should be
    messages = []
    metrics = Metrics()
    flow_log = Recorder(FlowLogSettings(blocker / "flows.json"), metrics, messages.append)
    engine = Engine(ScoringModel(), load_rules(DEFAULT_RULES), AlertSink(None), metrics)
    engine.flow_log = flow_log
    batches = list(read_capture(CAPTURES[1], chunk_bytes=16 << 10))
    for batch in batches[: len(batches) // 2]:
        engine.process(batch, "file")
    failed = flow_log.dropped
    assert failed == sum(len(f) for f, _ in flow_log.batches) and flow_log.lines == 0
    assert (
        sample(metrics, "quietwire_flow_log_errors_total", operation="open") == flow_log.errors > 0
    )
    assert sample(metrics, "quietwire_flow_log_lines_dropped_total") == failed
    blocker.unlink()  # the operator fixes it
    for batch in batches[len(batches) // 2 :]:
        engine.process(batch, "file")
    engine.flush()
    flow_log.close()
    assert flow_log.lines == records_in(engine) - failed > 0
    assert len((blocker / "flows.json").read_text().splitlines()) == flow_log.lines
    assert [m.split(":")[1].strip().split()[0] for m in messages] == ["cannot", "writing"]


def test_a_full_disk_is_counted_and_scoring_goes_on(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full (a device that always says: no space left on device)")
    messages = []
    metrics = Metrics()
    flow_log = FlowLog(FlowLogSettings(Path("/dev/full")), metrics, messages.append)
    alerts = tmp_path / "alerts.json"
    engine = replay(flow_log, alerts)
    flow_log.close()
    assert flow_log.lines == 0 and flow_log.dropped == records_in(engine)
    assert (
        sample(metrics, "quietwire_flow_log_errors_total", operation="write") == flow_log.errors > 1
    )
    assert len(messages) == 1 and "No space left on device" in messages[0]
    lines = alerts.read_text().splitlines()
    assert len(lines) == sum(engine.summary.alerts.values()) > 0  # the alert path kept working


def test_reopen_after_the_file_was_moved(tmp_path):
    path = tmp_path / "flows.json"
    flow_log = FlowLog(FlowLogSettings(path))
    replay(flow_log, captures=CAPTURES[:1])
    first = len(path.read_text().splitlines())
    assert first > 0
    moved = tmp_path / "flows.json.1"
    path.rename(moved)  # logrotate
    flow_log.reopen()  # SIGHUP
    replay(flow_log, captures=CAPTURES[1:2])
    flow_log.close()
    assert len(moved.read_text().splitlines()) == first  # nothing more went to the moved file
    assert len(path.read_text().splitlines()) == flow_log.lines - first > 1900


def test_a_line_cut_short_is_ended_before_the_next(tmp_path):
    path = tmp_path / "flows.json"
    path.write_text('{"event_type":"flow","cut sh')  # what a full disk can leave
    flow_log = FlowLog(FlowLogSettings(path))
    replay(flow_log, captures=CAPTURES[:1])
    flow_log.close()
    stats = FlowLogStats()
    n = sum(len(c.features) for c in read_flow_log(path, stats))
    assert n == flow_log.lines and stats.malformed == 1 and stats.first_malformed[0][0] == 1


def test_flow_log_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "capture: {interfaces: [lo]}\n"
        "flow_log: {path: logs/flows.json, rotate_bytes: 1000, rotate_age_s: 60,\n"
        "           compress: false, retention_bytes: 5000}\n"
    )
    s = load_config(path).flow_log
    assert s == FlowLogSettings(tmp_path / "logs" / "flows.json", 1000, 60.0, False, 5000)
    path.write_text("capture: {interfaces: [lo]}\n")
    assert load_config(path).flow_log is None
    for text, message in [
        ("flow_log: {rotate_bytes: 10}", r"c\.yaml:2: flow_log: missing key 'path'"),
        ("flow_log: {path: f.json, rotate_bytes: -1}", r"c\.yaml:2: flow_log.rotate_bytes: "),
        ("flow_log: {path: f.json, rotate_age_s: x}", r"c\.yaml:2: flow_log.rotate_age_s: "),
        ("flow_log: {path: f.json, gzip: true}", r"c\.yaml:2: flow_log: unknown key 'gzip'"),
        (
            "flow_log:\n  path: f.json\n  retention_bytes: -5",
            r"c\.yaml:4: flow_log.retention_bytes: expected a whole number of bytes >= 0",
        ),
    ]:
        path.write_text("capture: {interfaces: [lo]}\n" + text + "\n")
        with pytest.raises(ConfigError, match=message):
            load_config(path)


def test_the_example_config_has_a_flow_log():
    s = load_config(Path(__file__).resolve().parent.parent / "deploy" / "config.example.yaml")
    assert s.flow_log is not None and s.flow_log.path.name == "flows.json"
    defaults = FlowLogSettings(s.flow_log.path)
    assert s.flow_log == defaults


def test_infinities_and_nans_are_written_as_null(logged):
    _, recorder, engine, _ = logged
    flows, scores = recorder.batches[0]
    features = flows.features.copy()
    features[0, 0], features[0, 1], features[1, 2] = np.inf, -np.inf, np.nan
    score = scores.score.copy()
    score[1] = np.nan
    text = flow_lines(
        MeteredFlows(flows.records, features),
        Scores(score, scores.tail_probability, scores.contributions),
        engine.model.version,
        'eth0"%s',  # quoted and '%'-safe
    )
    first, second = (json.loads(line) for line in text.splitlines()[:2])
    assert first["in_iface"] == 'eth0"%s'
    values = list(first["quietwire"]["features"].values())
    assert values[:2] == [None, None] and values[2] is not None
    assert second["quietwire"]["score"] is None
    assert list(second["quietwire"]["features"].values())[2] is None


def _reference_lines(flows, scores, model_version, interface=None, host=None) -> str:
    """The lines written one %-format per line, the reference flow_lines' column-at-a-time
    formatting must match: identity_columns' values, '%.9g' of each number, NaN and
    infinities null."""
    iface = f'"in_iface":{json.dumps(interface)},' if interface else ""
    iface += f'"host":{json.dumps(host)},' if host is not None else ""
    features = ",".join(f'"{name}":%s' for name in FEATURE_NAMES)
    template = (
        '{"timestamp":"%s","flow_id":%d,"community_id":"%s","event_type":"flow",'
        '"src_ip":"%s","src_port":%s,"dest_ip":"%s","dest_port":%s,"proto":"%s",'
        + iface.replace("%", "%%")
        + '"flow":{"pkts_toserver":%d,"pkts_toclient":%d,"bytes_toserver":%d,'
        '"bytes_toclient":%d,"start":"%s","end":"%s","state":"%s","reason":"%s"},'
        f'"quietwire":{{"schema_hash":"{SCHEMA_HASH}","model_version":'
        + json.dumps(model_version).replace("%", "%%")
        + ',"score":%s,"tail_probability":%s,"features":{'
        + features
        + "}}}\n"
    )
    ident = identity_columns(flows.records)
    keys = ["end", "flow_id", "community_id", "src_ip", "src_port", "dest_ip", "dest_port"]
    keys += ["proto", "pkts_toserver", "pkts_toclient", "bytes_toserver", "bytes_toclient"]
    keys += ["start", "end"]
    lines = []
    for i in range(len(flows)):
        ids = ["null" if ident[k][i] is None else ident[k][i] for k in keys]
        reason = ident["end_reason"][i]
        numbers = [scores.score[i], scores.tail_probability[i], *flows.features[i]]
        text = ["null" if not math.isfinite(x) else f"{x:.9g}" for x in map(float, numbers)]
        state = "open" if reason == "interim" else "closed"
        lines.append(template % (*ids, state, reason, *text))
    return "".join(lines)


def test_lines_are_the_per_line_writers(logged, ndpi):
    """Byte for byte the lines of a %-format per line, on the bundled captures' batches and
    a capture with IPv6 and ICMP, with NaN and both infinities in scores and features, an
    interface and a host name that need quoting."""
    _, recorder, engine, _ = logged
    batches = list(recorder.batches)
    model = engine.model
    for name in ("http_ipv6.pcap", "icmp-tunnel.pcap", "malformed_icmp.pcap"):
        flows = meter_file(ndpi / "pcap" / name, keep_interim=True)
        batches.append((flows, model.score(flows.features)))
    assert any((f.records["ip_version"] == 6).any() for f, _ in batches)
    flows, scores = batches[0]
    features = flows.features.copy()
    features[0, :3] = [np.inf, -np.inf, np.nan]
    score, tail = scores.score.copy(), scores.tail_probability.copy()
    score[1], tail[2] = np.nan, -np.inf
    batches[0] = (MeteredFlows(flows.records, features), Scores(score, tail, scores.contributions))
    for i, (flows, scores) in enumerate(batches):
        iface, host = [(None, None), ("eth0", "sensor-1"), ('eth"%s', "h%\u00e9")][i % 3]
        got = flow_lines(flows, scores, model.version, iface, host)
        assert got == _reference_lines(flows, scores, model.version, iface, host), i


def test_the_daemon_reopens_its_flow_log_on_sighup(netns, tmp_path):  # noqa: F811
    """`quietwire run` with flow_log: records of live traffic (in_iface), the file moved away
    and SIGHUP: the next records go to a new file; SIGTERM writes the rest and exits 0."""
    import signal
    import subprocess
    import time

    from .test_daemon import start_daemon

    path = tmp_path / "flows.json"
    config = tmp_path / "config.yaml"
    config.write_text(
        f"capture: {{interfaces: [qwb]}}\nmetrics: false\nflow_log: {{path: {path}}}\n"
    )
    log = tmp_path / "daemon.log"
    proc = start_daemon(netns, config, log)

    def replay(capture: Path) -> None:
        subprocess.run(
            [*netns, "tcpreplay", "-q", "--topspeed", "-i", "qwa", str(capture)],
            check=True,
            capture_output=True,
        )

    def wait_for(check, what: str) -> None:
        deadline = time.monotonic() + 15
        while not check():
            assert proc.poll() is None and time.monotonic() < deadline, (what, log.read_text())
            time.sleep(0.1)

    try:
        replay(CAPTURES[0])  # the phone's sessions: the closed ones end at once
        wait_for(lambda: path.exists() and path.stat().st_size > 0, "first records")
        moved = tmp_path / "flows.json.1"
        path.rename(moved)
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reloaded" in log.read_text(), "the reload")
        wait_for(path.exists, "a new live file")
        before = moved.read_text()
        replay(CAPTURES[1])  # nmap's probes
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
    assert moved.read_text() == before  # nothing more went to the moved file
    new = [json.loads(line) for line in path.read_text().splitlines()]
    old = [json.loads(line) for line in before.splitlines()]
    assert all(r["in_iface"] == "qwb" and r["event_type"] == "flow" for r in old + new)
    assert sum(r["src_ip"] == "172.16.0.8" for r in new) > 900  # the scan, after the move
    assert "flow log" in log.read_text().splitlines()[-1]


def test_flow_log_records_read_back_with_their_identity(tmp_path):
    """A capture's records written as a flow log and read back with identity=True: every
    identity column equal to what the meter made (what entity risk is fitted on); a line
    whose address is not one is left out of the records, not of the features."""
    from quietwire import DATA
    from quietwire.agent.capture.pcap import read_capture
    from quietwire.agent.detect.model import ScoringModel
    from quietwire.agent.features.meter import FlowMeter
    from quietwire.agent.flow.records import FlowRecords
    from quietwire.agent.output.flowlog import flow_lines, read_flow_log

    meter = FlowMeter()
    parts = [meter.add(b) for b in read_capture(DATA / "scan.pcap")] + list(meter.drain())
    parts = [p for p in parts if len(p)]
    model = ScoringModel()
    text = "".join(flow_lines(p, model.score(p.features), model.version) for p in parts)
    lines = text.splitlines(keepends=True)
    lines[3] = lines[3].replace('"src_ip":"', '"src_ip":"not-an-address', 1)
    log = tmp_path / "flows.json"
    log.write_text("".join(lines))
    (chunk,) = list(read_flow_log(log, identity=True))
    records, ok = chunk.records()
    assert len(chunk.features) == len(lines) and ok.sum() == len(lines) - 1 and not ok[3]
    made = FlowRecords.concat([p.records for p in parts])
    made = made.take(np.flatnonzero(np.arange(len(made)) != 3))
    for name in (
        "seq",
        "ip_version",
        "src_hi",
        "src_lo",
        "dst_hi",
        "dst_lo",
        "src_port",
        "dst_port",
        "proto",
        "first_ns",
        "last_ns",
        "packets",
        "bytes",
        "end_reason",
    ):
        assert np.array_equal(records[name], made[name]), name
