"""What a fleet of sensors relies on (docs/operator.md, "A fleet of sensors"): every EVE line
and the metrics name the sensor, the schema hash is the same on every sensor running the same
release and is exported with the model, no metric label is an address (a central Prometheus
gathers every sensor's series), and timestamps are UTC from the packets' own clock."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from quietwire import DATA
from quietwire.agent.detect.model import ScoringModel
from quietwire.agent.features.schema import SCHEMA_HASH
from quietwire.agent.output.alerts import AlertSink
from quietwire.agent.output.flowlog import FlowLog, FlowLogSettings
from quietwire.agent.service.config import load_config

from .conftest import free_port, meter_file, serving_replay
from .test_daemon import netns, scrape, send_at_top_speed, start_daemon  # noqa: F401 (fixture)


def test_flow_log_and_alert_lines_carry_the_sensor_name(ndpi, tmp_path):
    flows = meter_file(ndpi / "pcap" / "dns-tunnel-iodine.pcap")
    model = ScoringModel()
    scores = model.score(flows.features)
    log = FlowLog(FlowLogSettings(path=tmp_path / "flows.json"), host="sensor-7")
    log.write(flows, scores, model.version, "eth0")
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "flows.json").read_text().splitlines()]
    assert len(lines) == len(flows) > 0
    assert {x["host"] for x in lines} == {"sensor-7"}
    assert {x["in_iface"] for x in lines} == {"eth0"}
    sink = AlertSink(tmp_path / "alerts.json", host="sensor-7")
    sink.write([{"timestamp": "t", "event_type": "alert"}])
    sink.close()
    assert json.loads((tmp_path / "alerts.json").read_text())["host"] == "sensor-7"
    # replay (no sensor) writes no host field, as before
    plain = FlowLog(FlowLogSettings(path=tmp_path / "plain.json"))
    plain.write(flows, scores, model.version, None)
    plain.close()
    assert "host" not in json.loads((tmp_path / "plain.json").read_text().splitlines()[0])


def test_sensor_name_in_the_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sensor: dc1-tap3\ncapture: {interfaces: [eth0]}\n")
    assert load_config(path).sensor == "dc1-tap3"
    path.write_text("capture: {interfaces: [eth0]}\n")
    assert load_config(path).sensor is None  # the daemon takes the host name


def _is_address(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def test_the_daemon_names_its_sensor_on_every_line_and_in_the_metrics(netns, tmp_path):  # noqa: F811
    """`quietwire run` with `sensor:` on a veth pair, sent the bundled nmap scan: the sensor's
    name is the `host` of every alert and flow line and the one `sensor` label of
    quietwire_sensor_info; the model's series carries this release's schema hash; no label
    value of any series is an address."""
    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(
        "sensor: dc1-tap3\ncapture: {interfaces: [qwb]}\n"
        f"alerts: {{file: {tmp_path}/alerts.json}}\nflow_log: {{path: {tmp_path}/flows.json}}\n"
        f"metrics: {{listen: 127.0.0.1, port: {port}}}\n"
    )
    log = tmp_path / "daemon.log"
    proc = start_daemon(netns, config, log)
    try:
        send_at_top_speed(netns, DATA / "scan.pcap")
        get = f"import urllib.request as u; print(u.urlopen('http://127.0.0.1:{port}/metrics').read().decode())"
        scraped = subprocess.run(  # the endpoint listens inside the namespace
            [*netns, sys.executable, "-c", get], capture_output=True, text=True, check=True
        ).stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
    samples = [s for f in text_string_to_metric_families(scraped) for s in f.samples]
    sensors = [s for s in samples if s.name == "quietwire_sensor_info"]
    assert [(s.labels, s.value) for s in sensors] == [({"sensor": "dc1-tap3"}, 1.0)]
    models = [s for s in samples if s.name == "quietwire_model_info"]
    assert [(s.labels["schema_hash"], s.value) for s in models] == [(SCHEMA_HASH, 1.0)]
    assert sum(s.value for s in samples if s.name == "quietwire_packets_total") > 2000
    addresses = {v for s in samples for v in s.labels.values() if _is_address(v)}
    assert not addresses, addresses

    alerts = [json.loads(x) for x in (tmp_path / "alerts.json").read_text().splitlines()]
    scan = alerts[-1]["quietwire"]["incident"]
    assert scan["cause"] == "port_scan" and scan["state"] == "close"  # closed at SIGTERM
    assert {a["host"] for a in alerts} == {"dc1-tap3"}
    flows = [json.loads(x) for x in (tmp_path / "flows.json").read_text().splitlines()]
    assert len(flows) >= scan["flows"] > 1900  # the scan's flows and the others
    assert {f["host"] for f in flows} == {"dc1-tap3"}
    assert {f["in_iface"] for f in flows} == {"qwb"}
    assert {f["quietwire"]["schema_hash"] for f in flows} == {SCHEMA_HASH}


def test_a_replay_exports_no_address_and_the_release_schema(ndpi, tmp_path):
    """The same promises of the metrics after a real replay (no root needed): one model series
    with the bundled model's version and this release's schema hash, and no address in any
    label, though the replay saw thousands of addresses."""
    with serving_replay(ndpi, tmp_path) as (port, summary):
        samples = scrape(port)
    assert "incidents" in summary
    models = [
        dict(labels)
        for (name, labels), v in samples.items()
        if name == "quietwire_model_info" and v == 1
    ]
    bundled = ScoringModel()
    assert models == [
        {"version": bundled.version, "schema_hash": SCHEMA_HASH, "score": bundled.metadata["score"]}
    ]
    addresses = {v for (_, labels) in samples for _, v in labels if _is_address(v)}
    assert not addresses, addresses


def test_schema_hash_is_the_same_in_every_process():
    """Two interpreters with different hash seeds (as two sensors would be) compute the same
    schema hash, and it is the one the bundled model was trained for."""
    code = "from quietwire.agent.features.schema import SCHEMA_HASH; print(SCHEMA_HASH)"
    seen = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert seen == {SCHEMA_HASH}
    assert ScoringModel().metadata["schema_hash"] == SCHEMA_HASH


def test_timestamps_are_utc_packet_times(ndpi, tmp_path):
    flows = meter_file(ndpi / "pcap" / "dns-tunnel-iodine.pcap")
    model = ScoringModel()
    log = FlowLog(FlowLogSettings(path=tmp_path / "flows.json"))
    log.write(flows, model.score(flows.features), model.version, None)
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "flows.json").read_text().splitlines()]
    ends = [datetime.strptime(x["flow"]["end"], "%Y-%m-%dT%H:%M:%S.%f%z") for x in lines]
    assert all(e.utcoffset().total_seconds() == 0 for e in ends)
    expected = flows.records["last_ns"] // 1000
    got = np.array([int(e.timestamp() * 1_000_000 + 0.5) for e in ends])
    assert np.array_equal(got, expected)
    assert ends[0].astimezone(UTC).year == datetime.fromtimestamp(expected[0] / 1e6, UTC).year
