"""Capture workers (agent/parallel/workers.py, workerpool.py, central.py): the report transport, the
central stage's merge against one meter on real captures, capture.workers in the config, and
`quietwire run` with 2 workers on a veth pair against `quietwire replay` of the same capture
(SIGTERM drains every worker, SIGHUP leaves them running, a killed worker is started again)."""

from __future__ import annotations

import json
import multiprocessing
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from quietwire.agent.capture.pcap import read_capture
from quietwire.agent.features.context import CONTEXT_FEATURES
from quietwire.agent.features.meter import FlowMeter
from quietwire.agent.features.schema import FEATURE_NAMES, SCHEMA
from quietwire.agent.flow.records import END_REASONS, FlowRecords
from quietwire.agent.parallel.central import WorkerReport
from quietwire.agent.parallel.workerpool import WorkerPool
from quietwire.agent.parallel.workers import WorkerTable, recv_report, send_report
from quietwire.agent.service.config import ConfigError, default_workers, load_config
from quietwire.cli import main

from .test_daemon import netns, send_at_top_speed, start_daemon  # noqa: F401  (the fixture)


def _report_of(path: Path) -> WorkerReport:
    """A real report: a worker table's first batch and its end (every column filled)."""
    table = WorkerTable()
    first = table.add(next(iter(read_capture(path))))
    ended = table.flush(1 << 20).ended
    return WorkerReport(
        first.started,
        first.answered_seq,
        first.answered_ns,
        FlowRecords.concat([first.ended, ended]),
        first.watermark_ns,
        first.prune_ns,
        first.totals,
    )


def test_report_round_trips_through_the_pipe_unchanged(ndpi):
    sent = _report_of(ndpi / "pcap" / "1kxun.pcap")
    assert len(sent.started) and len(sent.ended) > 100 and len(sent.answered_seq)
    ours, theirs = multiprocessing.Pipe()
    send_report(ours, {"kind": "report", "interface": "eth0"}, sent)
    header, got = recv_report(theirs)
    assert header["kind"] == "report" and header["interface"] == "eth0"
    for name in sent.ended.columns:
        a, b = sent.ended[name], got.ended[name]
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), name
        assert b.flags.writeable
    for name in sent.started.columns:
        assert np.array_equal(sent.started[name], got.started[name]), name
    assert np.array_equal(sent.answered_seq, got.answered_seq)
    assert np.array_equal(sent.answered_ns, got.answered_ns)
    assert (got.watermark_ns, got.prune_ns, got.totals) == (
        sent.watermark_ns,
        sent.prune_ns,
        sent.totals,
    )
    # a header alone (no arrays) goes too
    send_report(ours, {"kind": "error", "message": "x"})
    assert recv_report(theirs) == ({"kind": "error", "message": "x", "layout": [], "size": 0}, None)


class _Collect:
    """Stands in for the Engine: keeps what the central stage hands on."""

    def __init__(self) -> None:
        self.parts, self.meters = [], {}

    def attach(self, interface, meter) -> None:
        self.meters[interface] = meter

    def handle(self, flows, interface) -> None:
        if len(flows):
            self.parts.append(flows)


def _sorted(parts):
    records = FlowRecords.concat([p.records for p in parts])
    features = np.concatenate([p.features for p in parts])
    key = [records[k] for k in ("end_reason", "proto", "dst_port", "src_port", "first_ns")]
    order = np.lexsort(key)
    return records.take(order), features[order]


@pytest.mark.parametrize("name", ["1kxun.pcap", "synscan.pcap", "wechat.pcap"])
def test_workers_meter_what_one_meter_does(ndpi, name):
    """Three worker processes, each metering its share of the capture (split by a symmetric
    flow hash, as fanout does), through the real transport and the central stage: every
    record (ended and interim, every column but seq) and every feature equal one FlowMeter's.
    1kxun.pcap jumps six years in the middle; wechat.pcap has interim records."""
    path = ndpi / "pcap" / name
    engine = _Collect()
    pool = WorkerPool(3, engine, files=(path,))
    pool.run_files()
    for meter in engine.meters.values():
        for part in meter.drain():
            engine.handle(part, "file")
    meter = FlowMeter()
    ours, ours_f = _sorted(engine.parts)
    ref, ref_f = _sorted([meter.add(b) for b in read_capture(path)] + list(meter.drain()))
    assert len(ours) == len(ref) > 0
    for column in ref.columns:
        if column != "seq":
            assert np.array_equal(ours[column], ref[column], equal_nan=True), column
    assert np.array_equal(ours_f, ref_f, equal_nan=True)
    if name == "wechat.pcap":
        assert (ref["end_reason"] == END_REASONS.index("interim")).sum() > 0
    shares = [int(p) for p in re.findall(r"(\d+) packets", pool.cpu_line())]
    assert len(shares) == 3 and sum(shares) == sum(len(b) for b in read_capture(path))
    assert min(shares) > 0  # every worker had a share
    # flow ids are the one meter's start order too: unique, 0..n-1 over ended flows
    ended = ours["end_reason"] != END_REASONS.index("interim")
    assert sorted(ours["seq"][ended].tolist()) == list(range(ended.sum()))


def test_one_merge_across_a_clock_jump(ndpi):
    """Everything a worker reported merged at once (its watermark held back to the end):
    1kxun.pcap's flows from 2016 and 2022 get their features in one call, as one meter gives
    them batch by batch (the host windows pack times in 40 bits: about 12.7 days)."""
    from quietwire.agent.flow.records import NEVER
    from quietwire.agent.parallel.central import CentralMeter

    path = ndpi / "pcap" / "1kxun.pcap"
    table, central = WorkerTable(), CentralMeter()
    central.add_source("w")
    for batch in read_capture(path, chunk_bytes=1 << 16):
        central.receive("w", _held(table.add(batch)))
    while len(table.table):
        central.receive("w", _held(table.flush(1 << 16)))
    central.receive("w", table.idle(NEVER))
    ours = central.merge()
    assert np.ptp(ours.records["last_ns"]) > 365 * 86400 * 10**9
    meter = FlowMeter()
    parts = [meter.add(b) for b in read_capture(path, chunk_bytes=1 << 16)]
    ours_r, ours_f = _sorted([ours])
    ref_r, ref_f = _sorted(parts + list(meter.drain()))
    assert np.array_equal(ours_r["packets"], ref_r["packets"])
    assert np.array_equal(ours_f, ref_f, equal_nan=True)
    assert ours_f[:, FEATURE_NAMES.index("src_host_flows")].max() > 1


def _held(report: WorkerReport) -> WorkerReport:
    from dataclasses import replace

    from quietwire.agent.flow.records import NEVER

    return replace(report, watermark_ns=-NEVER + 1, prune_ns=-NEVER + 1)


def test_capture_workers_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("capture: {interfaces: [eth0], workers: 3}\n")
    assert load_config(path).capture.workers == 3
    path.write_text("capture: {interfaces: [eth0]}\n")
    assert load_config(path).capture.workers == default_workers() >= 1
    for bad, why in (("0", "expected a positive integer, got 0"), ("many", "expected a")):
        path.write_text(f"capture:\n  interfaces: [eth0]\n  workers: {bad}\n")
        with pytest.raises(ConfigError, match=rf"{path}:3: capture.workers: {why}"):
            load_config(path)


# ---- the daemon with 2 workers on a veth pair -------------------------------------------

# Top speed squeezes the capture into milliseconds: timing features and the host context
# (everything falls into one window) differ from replay's; what the packets are does not.
TIMING = {f.name for f in SCHEMA if f.unit in ("s", "packets/s", "bytes/s")} | set(CONTEXT_FEATURES)


def _flows(path: Path) -> dict[str, list]:
    """Closed flows of a flow log by community id: counts, then the timing-free features."""
    kept = [i for i, n in enumerate(FEATURE_NAMES) if n not in TIMING]
    out: dict[str, list] = {}
    for line in path.open():
        rec = json.loads(line)
        if rec["flow"]["state"] != "closed":
            continue
        f = rec["flow"]
        feats = rec["quietwire"]["features"]
        row = [f["pkts_toserver"], f["pkts_toclient"], f["bytes_toserver"], f["bytes_toclient"]]
        row += [feats[FEATURE_NAMES[i]] for i in kept]
        out.setdefault(rec["community_id"], []).append(row)
    return {k: sorted(v, key=repr) for k, v in out.items()}


def _children(pid: int) -> list[int]:
    """The worker processes of a daemon (not multiprocessing's resource tracker)."""
    out = subprocess.run(
        ["pgrep", "-P", str(pid), "-f", "spawn_main"], capture_output=True, text=True
    ).stdout
    return [int(x) for x in out.split()]


def _wait_for(log: Path, text: str, seconds: float = 20) -> str:
    deadline = time.monotonic() + seconds
    while text not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    return log.read_text()


def test_two_workers_live_match_replay(ndpi, netns, tmp_path, capsys):  # noqa: F811
    capture = ndpi / "pcap" / "netflix.pcap"  # every frame fits the veth's MTU
    config = tmp_path / "config.yaml"
    config.write_text(
        "capture: {interfaces: [qwb], workers: 2}\n"
        f"flow_log: {{path: {tmp_path}/live.json}}\nmetrics: false\n"
    )
    log = tmp_path / "daemon.log"
    proc = start_daemon(netns, config, log)
    assert "2 capture workers" in log.read_text()
    workers = _children(proc.pid)
    try:
        proc.send_signal(signal.SIGHUP)  # reaches the workers; they keep capturing
        _wait_for(log, "reloaded:")
        sent = send_at_top_speed(netns, capture)
        assert set(_children(proc.pid)) >= set(workers)  # the same processes, none restarted
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
    text = log.read_text()
    m = re.search(r"stopped: (\d+) packets, (\d+) flows, .* (\d+) kernel drops", text)
    assert m, text
    packets, flows, drops = map(int, m.groups())
    shares = [int(x) for x in re.findall(r"worker \d (\d+) packets", text)]
    assert "0 worker restarts" in text
    assert main(["replay", str(capture), "--flow-log", str(tmp_path / "replay.json")]) == 0
    r = re.search(r"replay: (\d+) packets, (\d+) flows", capsys.readouterr().err)
    sent_packets = int(re.search(r"Actual: (\d+) packets", sent).group(1))
    assert drops == 0
    assert packets == sent_packets == int(r.group(1))
    assert len(shares) == 2 and sum(shares) == packets and min(shares) > 0
    assert flows == int(r.group(2))
    live, replayed = _flows(tmp_path / "live.json"), _flows(tmp_path / "replay.json")
    assert sum(map(len, live.values())) == flows
    assert live == replayed


def test_a_killed_worker_is_started_again(ndpi, netns, tmp_path):  # noqa: F811
    config = tmp_path / "config.yaml"
    config.write_text("capture: {interfaces: [qwb], workers: 2}\nmetrics: false\n")
    log = tmp_path / "daemon.log"
    proc = start_daemon(netns, config, log)
    try:
        victim = _children(proc.pid)[0]
        subprocess.run(["kill", "-KILL", str(victim)], check=True)
        text = _wait_for(log, "starting it again")
        assert re.search(rf"capture worker \d \(pid {victim}\) died \(killed by signal 9\)", text)
        deadline = time.monotonic() + 20
        while len(_children(proc.pid)) < 2:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        send_at_top_speed(netns, ndpi / "pcap" / "synscan.pcap")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
    text = log.read_text()
    assert "1 worker restarts" in text
    assert re.search(r"stopped: 2011 packets, \d+ flows", text), text
