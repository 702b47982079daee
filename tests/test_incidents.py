"""Incidents: evidence from many flows becomes one record per (cause, entity); the line budget
caps what is written; memory stays bounded when an attacker picks the number of entities."""

from __future__ import annotations

import json
from datetime import datetime

import numpy as np
import pytest
from scapy.all import IP, TCP, UDP, Ether

from quietwire.agent.detect.incidents import IncidentSettings
from quietwire.agent.detect.model import ScoringModel
from quietwire.agent.detect.rules import load_rules
from quietwire.agent.output.alerts import AlertSink, BudgetSettings, LineBudget
from quietwire.agent.service.engine import Engine, EngineSettings
from quietwire.cli import main

from .conftest import write_pcap


def random_sources(n: int, seed: int = 1) -> list[str]:
    picks = np.random.default_rng(seed).choice(254 * 254, n, replace=False)
    return [f"198.18.{1 + k // 254}.{1 + k % 254}" for k in picks.tolist()]


def syn_flood(tmp_path, n=400, victim="10.0.0.80"):
    pkts = [
        Ether() / IP(src=s, dst=victim) / TCP(sport=1024 + i, dport=80, flags="S")
        for i, s in enumerate(random_sources(n))
    ]
    return write_pcap(tmp_path / "flood.pcap", pkts, [0.001 * i for i in range(n)])


def lines_of(path):
    return [json.loads(x) for x in path.open()]


def test_random_source_flood_is_one_incident_on_its_victim(tmp_path, capsys):
    """400 spoofed sources, one victim: two lines (open, close) naming the victim and the
    cause, however many sources; not one alert per source."""
    out = tmp_path / "a.json"
    assert main(["replay", str(syn_flood(tmp_path)), "--alerts", str(out)]) == 0
    lines = lines_of(out)
    assert [x["quietwire"]["incident"]["state"] for x in lines] == ["open", "close"]
    inc = lines[-1]["quietwire"]["incident"]
    assert inc["cause"] == "syn_flood"
    assert inc["entity"] == {"ip": "10.0.0.80", "role": "victim"}
    assert inc["ports"]["sample"] == [80]
    assert lines[-1]["dest_ip"] == "10.0.0.80" and lines[-1]["alert"]["signature_id"] == 2110
    print(f"flood of 400 sources: {inc['flows']} flows in the incident")
    # The first probes, before 50 distinct sources add up, join as unknown anomalies
    # (when the model flags them) or are not evidence at all: never an incident of their own.
    assert inc["flows"] >= 350 and inc["peers"]["distinct"] == inc["flows"]
    assert len(inc["peers"]["sample"]) == 10 and inc["ports"] == {"distinct": 1, "sample": [80]}
    assert "1 incidents (syn_flood 1), 2 alerts" in capsys.readouterr().err


def engine_for(tmp_path, rules_text, incidents=None, budget=None, clock=None):
    rules = tmp_path / "r.yaml"
    rules.write_text(rules_text)
    out = tmp_path / "a.json"
    sink = AlertSink(out)
    kw = {"clock": clock} if clock else {}
    settings = EngineSettings(incidents=incidents, budget=budget)
    engine = Engine(ScoringModel(), load_rules(rules), sink, settings=settings, **kw)
    return engine, sink, out


def replay_into(engine, sink, pcap):
    from quietwire.agent.capture.pcap import read_capture

    for batch in read_capture(pcap, chunk_bytes=4096):  # many small batches
        engine.process(batch)
    engine.flush()
    sink.close()


# every flow is evidence, and every entity's first flow opens its incident
ANY_FLOW = (
    "rules:\n  - {id: 1, name: any, action: alert, min_score: -1000000, risk: 1, opens: direct}\n"
)


def test_max_open_folds_new_entities_into_their_victim(tmp_path):
    """Every flow is an unknown anomaly keyed by its (spoofed) source: past max_open, the
    evidence of new sources goes to one incident on the victim; memory stays bounded."""
    engine, sink, out = engine_for(tmp_path, ANY_FLOW, IncidentSettings(max_open=20))
    replay_into(engine, sink, syn_flood(tmp_path, n=300))
    closes = [x["quietwire"]["incident"] for x in lines_of(out) if "close" in json.dumps(x)]
    roles = [i["entity"]["role"] for i in closes]
    assert roles.count("victim") == 1 and roles.count("source") <= 19
    assert sum(i["flows"] for i in closes) == 300  # nothing lost
    victim = next(i for i in closes if i["entity"]["role"] == "victim")
    assert victim["entity"]["ip"] == "10.0.0.80" and victim["cause"] == "unknown_anomaly"
    assert engine.summary.evidence_dropped == 0


def test_evidence_past_max_open_is_counted_when_dropped(tmp_path):
    """With room for one incident, a flood on a second victim has nowhere to go: its
    evidence is dropped, and counted (summary and metric), never silently lost."""
    from scapy.all import wrpcap

    first, second = syn_flood(tmp_path, n=50), tmp_path / "second.pcap"
    pkts = [
        Ether() / IP(src=s, dst="10.0.0.81") / TCP(sport=2000 + i, dport=80, flags="S")
        for i, s in enumerate(random_sources(40, seed=2))
    ]
    for i, p in enumerate(pkts):
        p.time = 1.0 + 0.001 * i
    wrpcap(str(second), pkts)
    engine, sink, out = engine_for(tmp_path, ANY_FLOW, IncidentSettings(max_open=1))
    from quietwire.agent.capture.pcap import read_capture

    for path in (first, second):  # one time line: both floods' flows end in the flush
        for batch in read_capture(path):
            engine.process(batch)
    engine.flush()
    sink.close()
    closes = [x["quietwire"]["incident"] for x in lines_of(out)]
    kept = sum(i["flows"] for i in closes if i["state"] == "close")
    assert engine.summary.evidence_dropped > 0
    assert kept + engine.summary.evidence_dropped == 90


def slow_scan(tmp_path, every_s=5.0, probes=60):
    pkts = [
        Ether() / IP(src="10.9.9.9", dst="10.0.0.5") / TCP(sport=40000, dport=p, flags="S")
        for p in range(1, probes + 1)
    ]
    return write_pcap(tmp_path / "slow.pcap", pkts, [every_s * i for i in range(probes)])


def test_updates_at_most_once_per_interval_and_close_after_quiet(tmp_path):
    """A scan of one probe every 5 s for 300 s: open, updates no closer than 60 s of traffic
    time, close; then a quiet gap of more than quiet_s starts a new incident."""
    pcap = slow_scan(tmp_path)
    settings = IncidentSettings(update_interval_s=60, quiet_s=120)
    engine, sink, out = engine_for(tmp_path, ANY_FLOW, settings)
    from quietwire.agent.capture.pcap import read_capture

    # Flows end after 120 s idle; expire as a live sensor would, once per traffic second.
    for batch in read_capture(pcap, chunk_bytes=256):
        engine.process(batch)
        engine.expire(int(batch.ts_ns[-1]))
    engine.expire(int(295e9 + 10**9) + 10**12)  # long after: everything ends, quiet passes
    engine.flush()
    sink.close()
    lines = lines_of(out)
    states = [x["quietwire"]["incident"]["state"] for x in lines]
    assert states[0] == "open" and states[-1] == "close" and "update" in states
    assert len({x["quietwire"]["incident"]["id"] for x in lines}) == 1
    stamps = [np.datetime64(x["timestamp"][:26]) for x in lines if x != lines[-1]]
    assert all(b - a >= np.timedelta64(60, "s") for a, b in zip(stamps, stamps[1:]))
    assert lines[-1]["quietwire"]["incident"]["flows"] == 60


def test_line_budget_token_bucket():
    now = [0.0]
    budget = LineBudget(BudgetSettings(lines_per_s=2, burst=3), clock=lambda: now[0])
    assert budget.grant(["a"] * 5) == 3  # the burst
    assert budget.held == {"a": 2}
    now[0] = 1.0
    assert budget.grant(["b", "a", "b"]) == 2  # two tokens in a second
    record = {"quietwire": {}}
    budget.note(record)
    assert record["quietwire"]["held_back"] == {"lines": 3, "by_cause": {"a": 2, "b": 1}}
    budget.note(record2 := {"quietwire": {}})
    assert "held_back" not in record2["quietwire"]  # said once
    now[0] = 100.0
    assert budget.grant(["c"] * 10) == 3  # never more than the burst


def test_budget_caps_per_flow_lines_and_counts_what_it_held(tmp_path):
    """Per-flow alerts on every flow of a 300-source flood with a budget of 5 lines: 5 lines,
    the rest counted by cause, and the summary says so."""
    frozen = lambda: 0.0  # noqa: E731 - no refill during the test
    engine, sink, out = engine_for(
        tmp_path,
        "rules:\n  - {id: 1, name: any, action: alert, min_score: -1000000, dedupe_s: 0, "
        "cause: flood_test, entity: dest}\n",
        IncidentSettings(flow_alerts=True),
        BudgetSettings(lines_per_s=1, burst=5),
        frozen,
    )
    replay_into(engine, sink, syn_flood(tmp_path, n=300))
    lines = lines_of(out)
    assert len(lines) == 5
    assert engine.summary.held_back == 300 + 2 - 5  # 300 flow lines, open and close
    assert engine.budget.held == {"flood_test": 297}


def test_an_incident_whose_open_line_is_held_counts_once(tmp_path):
    """Three sources, one incident each, a budget of one line and no refill: one line is
    written, and the incidents opened are still three (a held-back open line is tried again
    with the next evidence, not counted again)."""
    pkts = [
        Ether() / IP(src=f"10.9.9.{1 + i % 3}", dst="10.0.0.5") / TCP(sport=40000 + i, dport=80)
        for i in range(30)
    ]
    pcap = write_pcap(tmp_path / "three.pcap", pkts, [10.0 * i for i in range(30)])
    engine, sink, out = engine_for(
        tmp_path,
        ANY_FLOW,
        IncidentSettings(quiet_s=1000),
        BudgetSettings(lines_per_s=1, burst=1),
        lambda: 0.0,
    )
    replay_into(engine, sink, pcap)
    assert len(lines_of(out)) == 1
    assert engine.summary.incidents == {"unknown_anomaly": 3}


def test_sources_that_become_a_scan_join_its_incident(tmp_path):
    """A scanner's first probes are unknown anomalies (its port count is still low); once the
    scan rule names the cause, they are part of that incident, not one of their own."""
    pkts = [
        Ether() / IP(src="10.9.9.9", dst="10.0.0.5") / TCP(sport=40000, dport=p, flags="S")
        for p in range(1, 41)
    ]
    pcap = write_pcap(tmp_path / "scan.pcap", pkts, [0.05 * i for i in range(40)])
    rules = (
        "rules:\n  - {id: 1, name: scan, action: alert, min_score: -1000000, cause: port_scan,"
        " match: {features: {src_host_distinct_dst_ports: {gte: 20}}}}\n" + ANY_FLOW[7:]
    ).replace("id: 1, name: any", "id: 2, name: any")
    engine, sink, out = engine_for(tmp_path, rules)
    replay_into(engine, sink, pcap)
    closes = [x for x in lines_of(out) if x["quietwire"]["incident"]["state"] == "close"]
    merged = [x for x in closes if x["quietwire"]["incident"].get("merged_into")]
    (scan,) = [x for x in closes if x["quietwire"]["incident"]["cause"] == "port_scan"]
    inc = scan["quietwire"]["incident"]
    assert inc["flows"] == 40 and inc["rules"] == [1, 2]
    for m in merged:  # an unknown incident that went out before the scan showed is closed
        assert m["quietwire"]["incident"]["merged_into"] == inc["id"]


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_one_source_udp_or_syn_flood(tmp_path, proto):
    """One source, many source ports, one victim service: a flood on the victim."""
    layer = (
        (lambda i: TCP(sport=2000 + i, dport=443, flags="S"))
        if proto == "tcp"
        else (lambda i: UDP(sport=2000, dport=1 + i) / (b"x" * 900))
    )
    pkts = [Ether() / IP(src="10.7.7.7", dst="10.0.0.9") / layer(i) for i in range(300)]
    pcap = write_pcap(tmp_path / "f.pcap", pkts, [0.0005 * i for i in range(300)])
    out = tmp_path / "a.json"
    assert main(["replay", str(pcap), "--alerts", str(out)]) == 0
    incs = [x["quietwire"]["incident"] for x in lines_of(out)]
    causes = {(i["cause"], i["entity"]["ip"], i["entity"]["role"]) for i in incs}
    expected = "syn_flood" if proto == "tcp" else "udp_flood"
    assert causes == {(expected, "10.0.0.9", "victim")}


def test_every_generated_attack_is_named(tmp_path):
    """trafficgen's capture (benign office traffic and eleven attacks) through `replay` with
    the default rules, the bundled model's risk fitted on another capture's benign flows (as
    `quietwire calibrate --risk-only` does): each attack type has an incident with its cause,
    on the right host."""
    import shutil

    from quietwire.agent.capture.pcap import read_capture
    from quietwire.agent.detect.model import DEFAULT_MODEL
    from quietwire.agent.features.meter import FlowMeter
    from quietwire.agent.flow.identity import format_ips
    from quietwire.agent.site.riskfit import fit_model
    from quietwire.agent.site.sources import site_records
    from quietwire.rules import DEFAULT_RULES
    from quietwire.trainer.traffic.trafficgen import (
        ATTACKS,
        EXPECTED_CAUSE,
        flow_kinds,
        generate,
        read_labels,
    )

    assert set(EXPECTED_CAUSE) == set(ATTACKS)
    # the site's benign traffic (another capture of the network) sets the risk threshold
    site, site_labels = tmp_path / "site.pcap", tmp_path / "site.labels.csv"
    generate(site, site_labels, seed=1, scale=1.0)
    site_kinds = read_labels(site_labels)
    benign = []
    for records, features in site_records([site]):
        keep = np.flatnonzero(np.array(flow_kinds(records, site_kinds)) == "benign")
        benign.append((records.take(keep), features[keep]))
    model = tmp_path / "site.onnx"
    shutil.copyfile(DEFAULT_MODEL, model)
    fit_model(model, benign, load_rules(DEFAULT_RULES), budget=1.0)
    pcap, labels = tmp_path / "gen.pcap", tmp_path / "gen.labels.csv"
    generate(pcap, labels, seed=0, scale=1.0)
    out = tmp_path / "a.json"
    assert main(["replay", str(pcap), "--model", str(model), "--alerts", str(out)]) == 0
    incidents = {
        (c["cause"], i["entity"]["ip"])
        for i in (x["quietwire"]["incident"] for x in lines_of(out))
        for c in i["timeline"]
    }
    # the hosts of each attack, from the generator's flow labels
    label_of = read_labels(labels)
    meter = FlowMeter(seed=1)
    records = [meter.add(b).records for b in read_capture(pcap)] + [meter.flush().records]
    hosts: dict[str, set] = {k: set() for k in ATTACKS}
    for r in records:
        src = format_ips(r["ip_version"], r["src_hi"], r["src_lo"])
        dst = format_ips(r["ip_version"], r["dst_hi"], r["dst_lo"])
        for i, kind in enumerate(flow_kinds(r, label_of)):
            if kind in hosts:
                hosts[kind].add(src[i] if EXPECTED_CAUSE[kind][1] == "source" else dst[i])
    missed = {
        kind: cause
        for kind, (cause, _) in EXPECTED_CAUSE.items()
        if not any((cause, ip) in incidents for ip in hosts[kind])
    }
    print(f"incidents: {sorted(incidents)}")
    assert missed == {}


def test_a_flow_judged_while_open_counts_once(tmp_path):
    """An upload of 10 minutes (one 1,000-byte segment every 5 s) to an outside host: its
    interim records (at 60, 120, 240 and 480 s) and its end are all evidence; the incident
    opens about a minute after the upload's start and counts one flow, with the bytes of the
    whole flow, once over each threshold."""
    client, server = "10.0.0.5", "203.0.113.9"
    times = [5.0 * i for i in range(121)]
    pkts = [
        Ether()
        / IP(src=client, dst=server)
        / TCP(sport=40000, dport=443, flags="PA")
        / (b"x" * 1000)
        for _ in times
    ]
    pcap = write_pcap(tmp_path / "upload.pcap", pkts, times)
    rules = (
        "rules:\n  - {id: 7, name: upload, cause: exfiltration, action: alert, "
        "min_score: -1000000, opens: direct}\n"
    )
    engine, sink, out = engine_for(tmp_path, rules)
    replay_into(engine, sink, pcap)
    assert engine.summary.flows == 1 and engine.summary.interim == 4
    lines = lines_of(out)
    states = [x["quietwire"]["incident"]["state"] for x in lines]
    assert states[0] == "open" and states[-1] == "close" and len(lines) <= 12
    first = lines[0]["quietwire"]["incident"]
    seen = [datetime.fromisoformat(first[k]) for k in ("first_seen", "last_seen")]
    # a minute, plus the rest of the batch (about 4 KiB of packets: 15 s of this upload)
    assert first["flows"] == 1 and (seen[1] - seen[0]).total_seconds() <= 75
    inc = lines[-1]["quietwire"]["incident"]
    assert inc["flows"] == 1
    assert inc["bytes"] == sum(len(p) for p in pkts)
    assert set(inc["score"]["flows_over_threshold"].values()) <= {0, 1}
    assert inc["examples"] == [first["examples"][0]]


def test_replay_writes_the_same_lines_every_time(tmp_path):
    """The line budget runs on traffic time in a replay: five scanners 200 s apart (each
    scan's flows end on the idle timeout before the next starts), a burst of 3 lines and
    1 line/s: every open line gets through (tokens come back with traffic time, where a
    wall clock gives none in a replay this fast), and two replays write the same lines."""
    pkts, times = [], []
    for s in range(5):
        for p in range(1, 41):
            pkts.append(
                Ether() / IP(src=f"10.9.9.{s + 1}", dst="10.0.0.5") / TCP(dport=p, flags="S")
            )
            times.append(200.0 * s + 0.001 * p)
    pcap = write_pcap(tmp_path / "scans.pcap", pkts, times)
    runs = []
    for k in range(2):
        run = tmp_path / str(k)
        run.mkdir()
        engine, sink, out = engine_for(run, ANY_FLOW, budget=BudgetSettings(lines_per_s=1, burst=3))
        from quietwire.agent.capture.pcap import read_capture

        for batch in read_capture(pcap, chunk_bytes=1024):
            engine.process(batch)
            engine.expire(int(batch.ts_ns[-1]))
        engine.flush()
        sink.close()
        runs.append(out.read_text())
    assert runs[0] == runs[1]  # byte for byte, incident ids included
    runs = [
        [
            (x["src_ip"], x["quietwire"]["incident"]["state"])
            for x in map(json.loads, r.splitlines())
        ]
        for r in runs
    ]
    assert [state for _, state in runs[0]].count("open") == 5


def test_a_reflection_flood_spraying_ports_is_one_incident_on_its_victim(tmp_path, capsys):
    """SYN-ACKs from 60 reflectors, 30 each, to random ports of one host (forged SYNs
    answered): one syn_flood incident on the victim, not one per destination port nor a port
    scan per reflector (each sprays 30 ports)."""
    rng = np.random.default_rng(3)
    reflectors = random_sources(60, seed=4)
    pkts = [
        Ether()
        / IP(src=reflectors[i % 60], dst="10.0.0.77")
        / TCP(sport=80, dport=int(rng.integers(1024, 65535)), flags="SA")
        for i in range(1800)
    ]
    pcap = write_pcap(tmp_path / "reflect.pcap", pkts, [0.001 * i for i in range(1800)])
    out = tmp_path / "a.json"
    assert main(["replay", str(pcap), "--alerts", str(out)]) == 0
    closes = [x["quietwire"]["incident"] for x in lines_of(out)]
    closes = [i for i in closes if i["state"] == "close"]
    assert [(i["cause"], i["entity"]["ip"], i["entity"]["role"]) for i in closes] == [
        ("syn_flood", "10.0.0.77", "victim")
    ]
    assert closes[0]["flows"] >= 1700 and closes[0]["ports"]["distinct"] == 1000  # the cap
