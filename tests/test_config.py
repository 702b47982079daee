"""Daemon configuration: typed settings from YAML; every mistake named by file:line and key."""

from __future__ import annotations

import pytest

from quietwire.agent.detect.model import DEFAULT_MODEL
from quietwire.agent.service.config import DEFAULT_RULES, ConfigError, load_config
from quietwire.cli import main

GOOD = """
capture:
  interfaces: [eth0, eth1]
  bpf_filter: "not port 22"
flow: {idle_timeout_s: 60, max_flows: 1000}
host_window_s: 30
alerts: {file: alerts.json}
metrics:
  listen: 0.0.0.0
  port: 9200
  basic_auth:
    username: prom
    password_sha256: 5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8
  allow_plaintext_auth: true
  timeout_s: 2
  max_connections: 4
"""


def test_good_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(GOOD)
    s = load_config(path)
    assert s.capture.interfaces == ("eth0", "eth1") and s.capture.bpf_filter == "not port 22"
    assert s.flow.idle_timeout_s == 60.0 and s.flow.max_flows == 1000
    assert s.flow.active_timeout_s == 1800.0 and s.context.window_s == 30.0
    assert s.alerts.file == tmp_path / "alerts.json"
    assert s.metrics.port == 9200 and s.metrics.username == "prom"
    assert s.metrics.allow_plaintext_auth and s.metrics.timeout_s == 2.0
    assert s.metrics.max_connections == 4
    assert s.model == DEFAULT_MODEL and s.rules == DEFAULT_RULES


@pytest.mark.parametrize(
    "text,message",
    [
        (
            "capture: {interfaces: [eth0]}\nflow: {idle_timeout: 3}\n",
            r"c\.yaml:2: flow: unknown key 'idle_timeout'",
        ),
        (
            "capture: {interfaces: [eth0]}\nflow: {max_flows: many}\n",
            r"c\.yaml:2: flow.max_flows: expected a integer, got 'many'",
        ),
        (
            "capture: {interfaces: [eth0]}\nflow: {idle_timeout_s: -1}\n",
            r"c\.yaml:2: flow: idle_timeout_s must be > 0",
        ),
        ("flow: {}\n", r"c\.yaml:1: config: missing key 'capture'"),
        (
            "capture: {interfaces: [eth0]}\nmetrics: {port: 70000}\n",
            r"c\.yaml:2: metrics.port: expected 0-65535",
        ),
        (
            "capture: {interfaces: [eth0]}\nmetrics: {tls_cert: a.pem}\n",
            r"c\.yaml:2: metrics: tls_cert and tls_key go together",
        ),
        (
            "capture: {interfaces: [eth0]}\nmetrics:\n  basic_auth: {username: p, "
            "password_sha256: " + "ab" * 32 + "}\n",
            r"c\.yaml:3: metrics: basic_auth without TLS sends the password in clear text",
        ),
        (
            "capture: {interfaces: [eth0]}\nmetrics: {max_connections: 0}\n",
            r"c\.yaml:2: metrics.max_connections: expected at least 1",
        ),
        ("capture: {interfaces: []}\n", r"c\.yaml:1: capture.interfaces: give at least one"),
        (
            "capture:\n  interfaces: [eth0]\n  ring_blocks: 0\n",
            r"c\.yaml:3: capture.ring_blocks: expected a positive integer",
        ),
    ],
)
def test_bad_configs(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_check_config_command(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("capture: {interfaces: [lo]}\nmetrics: false\n")
    assert main(["check-config", "--config", str(path)]) == 0
    assert "OK (interfaces lo; model" in capsys.readouterr().out
    path.write_text("capture: {interfaces: [lo]}\nrules: missing.yaml\n")
    assert main(["check-config", "--config", str(path)]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    path.write_text("capture: {interfaces: [lo]}\nmodel: nothing.onnx\n")
    assert main(["check-config", "--config", str(path)]) == 2
    assert "nothing.onnx: cannot read model" in capsys.readouterr().err


def test_the_example_config_is_valid_and_lists_the_defaults():
    from pathlib import Path

    from quietwire.agent.detect.incidents import IncidentSettings
    from quietwire.agent.output.alerts import BudgetSettings

    example = Path(__file__).resolve().parent.parent / "deploy" / "config.example.yaml"
    s = load_config(example)
    assert s.incidents == IncidentSettings() and s.budget == BudgetSettings()
    assert s.metrics.timeout_s == 5.0 and s.metrics.max_connections == 16


def test_incident_and_budget_sections(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "capture: {interfaces: [lo]}\nincidents: {quiet_s: 30, flow_alerts: true}\n"
        "alert_budget: {lines_per_s: 5, burst: 10}\n"
    )
    s = load_config(path)
    assert s.incidents.quiet_s == 30.0 and s.incidents.flow_alerts is True
    assert (s.budget.lines_per_s, s.budget.burst) == (5.0, 10)
    path.write_text("capture: {interfaces: [lo]}\nalert_budget: {burst: 0}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:2: alert_budget: lines_per_s must be > 0"):
        load_config(path)
    path.write_text("capture: {interfaces: [lo]}\nincidents: {max_open: 0}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:2: incidents.max_open: expected a positive"):
        load_config(path)


def test_incident_risk_is_a_nested_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "capture: {interfaces: [lo]}\nincidents:\n  risk: {half_life_s: 600, threshold: 25}\n"
    )
    s = load_config(path)
    assert s.incidents.risk.half_life_s == 600.0 and s.incidents.risk.threshold == 25.0
    path.write_text("capture: {interfaces: [lo]}\nincidents:\n  risk: {half_life_s: 0}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:3: incidents.risk.half_life_s: expected"):
        load_config(path)
    path.write_text("capture: {interfaces: [lo]}\nincidents:\n  risk: {weight: 2}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:3.*weight"):
        load_config(path)
