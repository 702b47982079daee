"""What a fleet of sensors relies on (deploy/README.md, "A fleet of sensors"): every EVE line
names its sensor, the schema hash is the same on every sensor running the same release, and
timestamps are UTC from the packets' own clock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime

import numpy as np

from quietwire.agent.detect.model import ScoringModel
from quietwire.agent.features.schema import SCHEMA_HASH
from quietwire.agent.output.alerts import AlertSink
from quietwire.agent.output.flowlog import FlowLog, FlowLogSettings
from quietwire.agent.service.config import load_config
from quietwire.agent.service.metrics import Metrics

from .conftest import meter_file


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


def test_sensor_name_in_the_config_and_the_metrics(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sensor: dc1-tap3\ncapture: {interfaces: [eth0]}\n")
    assert load_config(path).sensor == "dc1-tap3"
    path.write_text("capture: {interfaces: [eth0]}\n")
    assert load_config(path).sensor is None  # the daemon takes the host name
    m = Metrics()
    m.sensor.labels("dc1-tap3").set(1)
    assert m.registry.get_sample_value("quietwire_sensor_info", {"sensor": "dc1-tap3"}) == 1


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
