"""deploy/: Prometheus rules (promtool), the Grafana dashboard (structure, and every metric it
names exists), the systemd unit (systemd-analyze), and a real Prometheus scraping an agent
replay: the key series carry the replay's numbers, and every dashboard and alert expression
evaluates without error."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from quietwire.agent.metrics import Metrics

from .conftest import free_port, serving_replay

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARD = DEPLOY / "grafana" / "quietwire-dashboard.json"
ALERT_RULES = DEPLOY / "prometheus" / "quietwire-alerts.yml"


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {tool} is missing (apt-get install prometheus)")
        pytest.skip(f"{tool} is not installed (Debian package prometheus)")
    return path


def panels():
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]


def alert_exprs():
    groups = yaml.safe_load(ALERT_RULES.read_text())["groups"]
    return [(r["alert"], r["expr"]) for g in groups for r in g["rules"]]


def test_promtool_checks_and_unit_tests():
    promtool = need("promtool")
    subprocess.run([promtool, "check", "rules", str(ALERT_RULES)], check=True, capture_output=True)
    res = subprocess.run(
        [promtool, "test", "rules", "quietwire-alerts.test.yml"],
        cwd=DEPLOY / "prometheus" / "tests",
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    tested = set(
        re.findall(
            r"alertname: (\w+)",
            (DEPLOY / "prometheus" / "tests" / "quietwire-alerts.test.yml").read_text(),
        )
    )
    assert tested == {name for name, _ in alert_exprs()}  # every alert has a unit test


def metric_names_in_exposition() -> set[str]:
    """Every metric family the agent exports (counters without their _total suffix)."""
    text = Metrics().exposition().decode()
    return {name for name, _ in re.findall(r"^# TYPE (\w+) (\w+)", text, re.M)}


def test_dashboard_structure_and_metrics():
    dash = json.loads(DASHBOARD.read_text())
    names = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "instance"} <= names
    exported = metric_names_in_exposition()
    for p in panels():
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["fieldConfig"]["defaults"].get("unit"), p["title"]
        assert p["targets"] and all(t["expr"] for t in p["targets"]), p["title"]
        for t in p["targets"]:
            for metric in re.findall(r"\b(quietwire_\w+)", t["expr"]):
                base = re.sub(r"_(total|bucket|count|sum)$", "", metric)
                assert base in exported or metric in exported, (p["title"], metric)
    titles = " ".join(p["title"] for p in panels()).lower()
    for topic in (
        "packets/s",
        "bytes/s",
        "active flows",
        "flows ended",
        "kernel drops",
        "evictions",
        "decode errors",
        "scoring latency",
        "severity",
        "rule",
        "score distribution",
        "suppressed",
        "model version",
        "reload",
        "incidents opened",
        "open incidents",
        "held back",
        "emergency",
    ):
        assert topic in titles, topic


def test_systemd_unit_verifies(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not available")
    unit = (DEPLOY / "systemd" / "quietwire.service").read_text()
    assert "CapabilityBoundingSet=CAP_NET_RAW" in unit and "NoNewPrivileges=yes" in unit
    exe = shutil.which("quietwire") or sys.executable
    local = tmp_path / "quietwire.service"
    local.write_text(unit.replace("/opt/quietwire/venv/bin/quietwire", exe))
    res = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "quietwire.service" not in res.stderr, res.stderr  # no warning about the unit


def api(port: int, path: str, **params) -> dict:
    url = f"http://127.0.0.1:{port}/api/v1/{path}?" + urllib.parse.urlencode(params)
    return json.loads(urllib.request.urlopen(url, timeout=10).read())


def test_prometheus_scrapes_a_replay(ndpi, tmp_path):
    prometheus = need("prometheus")
    prom_port = free_port()
    prom = None
    with serving_replay(ndpi, tmp_path) as (agent_port, summary):
        try:
            packets, flows, incidents, alerts = map(
                int,
                re.search(
                    r"replay: (\d+) packets, (\d+) flows, (\d+) incidents \([^)]*\), (\d+) alerts",
                    summary,
                ).groups(),
            )

            shipped = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
            job = shipped["scrape_configs"][0]
            job["scrape_interval"] = "1s"
            job["static_configs"] = [
                {
                    "targets": [f"127.0.0.1:{agent_port}"],
                    "labels": job["static_configs"][0]["labels"],
                }
            ]
            shipped["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
            shipped["rule_files"] = [str(ALERT_RULES)]
            config = tmp_path / "prometheus.yml"
            config.write_text(yaml.safe_dump(shipped))
            prom = subprocess.Popen(
                [
                    prometheus,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )

            def value(expr: str) -> float | None:
                r = api(prom_port, "query", query=expr)["data"]["result"]
                return float(r[0]["value"][1]) if r else None

            deadline = time.monotonic() + 60
            while True:
                try:
                    if (
                        value('up{job="quietwire"}') == 1
                        and value("sum(quietwire_packets_total)") is not None
                    ):
                        break
                except OSError:
                    pass
                assert time.monotonic() < deadline, "Prometheus never scraped the agent"
                time.sleep(0.5)
            assert value('sum(quietwire_packets_total{job="quietwire", site="hq"})') == packets
            assert value("sum(quietwire_flows_total)") == flows
            assert value("sum(quietwire_alerts_total)") == alerts
            assert value("sum(quietwire_incidents_total)") == incidents > 0
            interim = re.search(r"; (\d+) interim records of open flows", summary)
            interim = int(interim.group(1)) if interim else 0
            assert value("sum(quietwire_flow_score_count)") == flows + interim
            assert value("count(quietwire_model_info == 1)") == 1
            assert value("quietwire_config_last_reload_successful") == 1

            time.sleep(3)  # a few scrapes, so rate() and increase() have two samples
            filled = {
                "Packets/s by interface",
                "Bytes/s by interface",
                "Active flows",
                "Flows ended/s by reason",
                "Decode errors/s by reason",
                "Scoring latency per batch (p50, p99)",
                "Alerts/s by severity",
                "Alerts/s by rule",
                "Flow score distribution (p50, p90, p99)",
                "Model version and schema",
                "Model loaded",
                "Agent build",
                "Last reload successful",
                "Incidents opened/s by cause",
                "Open incidents",
                "Incidents in range by cause",
                "Flow-table emergency mode (1 = on)",
            }
            for p in panels():
                for t in p["targets"]:
                    expr = (
                        t["expr"]
                        .replace("$__rate_interval", "1m")
                        .replace("$__range", "5m")
                        .replace("$instance", ".*")
                    )
                    res = api(prom_port, "query", query=expr)
                    assert res["status"] == "success", (p["title"], expr, res)
                    if p["title"] in filled:
                        assert res["data"]["result"], (p["title"], expr)
            for name, expr in alert_exprs():
                res = api(prom_port, "query", query=expr)
                assert res["status"] == "success", (name, res)
            rules = api(prom_port, "rules")["data"]["groups"]
            assert sum(len(g["rules"]) for g in rules) == len(alert_exprs())
            assert all(r["health"] != "err" for g in rules for r in g["rules"])
        finally:
            if prom:
                prom.terminate()
                prom.wait(timeout=20)
