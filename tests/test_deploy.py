"""deploy/: Prometheus rules (promtool), the Grafana dashboard (structure, and every metric it
names exists), the systemd unit (systemd-analyze), and a real Prometheus scraping an agent
replay: the key series carry the replay's numbers, and every dashboard and alert expression
evaluates without error."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from quietwire.agent.service.metrics import Metrics

from .conftest import free_port, serving_replay

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
OPERATOR_GUIDE = DEPLOY.parent / "docs" / "operator.md"
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
        "drift",
        "psi",
        "learning",
        "thresholds",
        "incidents raised",
        "closed unraised",
        "risk threshold",
        "top 5",
        "incident budget",
        "entities with risk",
    ):
        assert topic in titles, topic
    ids = [p["id"] for p in json.loads(DASHBOARD.read_text())["panels"] if "id" in p]
    assert len(ids) == len(set(ids))


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
                "Score drift: share of records over each threshold (last 15 min)",
                "Score drift: PSI against the calibration (last 15 min)",
                "Learning period progress",
                "Live thresholds by FPR",
                "Incidents raised per hour by cause",
                "Entity risk: top 5 against the risk threshold",
                "Incidents raised vs closed unraised per hour",
                "Incident budget (benign incidents per 100 host-days)",
                "Risk threshold (excess risk over the host's baseline)",
                "Entities with risk tracked",
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


# ---- the model workflow of the operator guide (docs/operator.md), command by command ----------


def workflow_commands() -> list[str]:
    """The commands of the operator guide's model workflow (its first sh block), in order."""
    text = OPERATOR_GUIDE.read_text()
    section = text.split("## The model: learn, review, retrain", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_the_workflow_block_names_the_config_it_needs():
    text = OPERATOR_GUIDE.read_text().split("## The model: learn, review, retrain")[1]
    assert "#      flow_log: {path: /var/log/quietwire/flows.json}" in text
    assert "#      learn: {period: 24h}" in text
    assert len(workflow_commands()) == 10


def test_the_model_workflow(tmp_path):
    """Every command of the operator guide's model workflow, in order, on a sensor made of a
    veth pair in a network namespace: the paths are the test's, systemctl is the daemon's
    start and SIGHUP, journalctl its log, the learning period 10 s, training 20 steps."""
    from .test_daemon import PY, _can_netns, start_daemon

    why = _can_netns()
    if why or shutil.which("curl") is None:
        why = why or "needs curl"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the workflow test cannot run: {why}")
        pytest.skip(why)
    pytest.importorskip("torch")  # step 4 trains
    from quietwire import DATA
    from quietwire.agent.detect.model import DEFAULT_MODEL, ScoringModel

    etc, log_dir, lib, work = (tmp_path / d for d in ("etc", "log", "lib", "work"))
    for d in (etc, log_dir, lib, work):
        d.mkdir()
    shutil.copy(DEFAULT_MODEL, lib / "model.onnx")
    config = etc / "config.yaml"
    config.write_text(
        f"capture: {{interfaces: [qwb]}}\nmodel: {lib}/model.onnx\nflow: {{idle_timeout_s: 2}}\n"
        f"flow_log: {{path: {log_dir}/flows.json}}\nlearn: {{period: 10s, min_records: 50}}\n"
        f"alerts: {{file: {log_dir}/alerts.json}}\nmetrics: {{listen: 127.0.0.1, port: 9109}}\n"
    )
    daemon_log = tmp_path / "daemon.log"
    name = f"qwf{os.getpid()}"
    ip = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
    ip("ip", "netns", "add", name)
    ns = ["ip", "netns", "exec", name]
    proc = None
    quietwire = f"{PY} -m quietwire.cli"
    paths = {
        "/opt/quietwire/venv/bin/quietwire": quietwire,
        "/etc/quietwire/config.yaml": str(config),
        "/var/log/quietwire": str(log_dir),
        "/var/lib/quietwire": str(lib),
        "/data/pcaps/known-bad.pcap": str(DATA / "scan.pcap"),
        "-o root -g quietwire ": "",  # no quietwire group here
    }

    def shell(line: str) -> str:
        res = subprocess.run(
            [*ns, "bash", "-o", "pipefail", "-c", line],
            cwd=work,
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0, (line, res.stdout, res.stderr, daemon_log.read_text())
        return res.stdout

    def wait_for(text: str) -> None:
        deadline = time.monotonic() + 60
        while text not in daemon_log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, daemon_log.read_text()
            time.sleep(0.2)

    try:
        ip(*ns, "ip", "link", "add", "qwa", "type", "veth", "peer", "name", "qwb")
        for dev in ("qwa", "qwb", "lo"):
            ip(*ns, "ip", "link", "set", dev, "up")
        outputs = []
        for command in workflow_commands():
            line = command.removeprefix("sudo ")
            for old, new in paths.items():
                line = line.replace(old, new)
            if line.startswith("quietwire "):
                line = quietwire + line[len("quietwire") :]
            if line == "systemctl restart quietwire":
                proc = start_daemon(ns, config, daemon_log)
                for capture in ("scan.pcap", "sample.pcap"):  # the site's traffic
                    ip(*ns, "tcpreplay", "-q", "--topspeed", "-i", "qwa", str(DATA / capture))
                outputs.append("started")
                continue
            if line == "systemctl reload quietwire":
                proc.send_signal(signal.SIGHUP)
                wait_for("reloaded:")
                outputs.append(daemon_log.read_text())
                continue
            if line.startswith("journalctl -u quietwire"):
                wait_for("learning period done")
                line = line.replace("journalctl -u quietwire", f"cat {daemon_log}")
                # traffic goes on: the drift gauges of the calibrated model fill again
                ip(*ns, "tcpreplay", "-q", "--topspeed", "-i", "qwa", str(DATA / "scan.pcap"))
                deadline = time.monotonic() + 30
                metrics = "curl -s http://127.0.0.1:9109/metrics"
                while not re.search(r"^quietwire_score_psi ", shell(metrics), re.M):
                    assert time.monotonic() < deadline, "no drift gauges after the calibration"
                    time.sleep(0.5)
            if " train " in line:
                line += " --train-steps 20"
            assert not re.match(r"(sudo|systemctl|journalctl|/opt|/etc|/var)", line), line
            outputs.append(shell(line))
        (check_config, _, learning, journal, review, drift, trained, check, _, reloaded) = outputs
        assert ": OK (" in check_config and "learning period 10s" in check_config
        assert "quietwire_learning_active" in learning and "quietwire_model_threshold" in learning
        assert "learning period done: calibrated" in journal
        assert (work / "check.csv").exists() and "quietwire_score_psi" in drift
        assert "quietwire_score_share_over_threshold" in drift
        retrained = ScoringModel(lib / "model.onnx")
        assert retrained.version != ScoringModel(DEFAULT_MODEL).version
        assert f"model {retrained.version}" in reloaded.splitlines()[-1]
        metrics = shell("curl -s http://127.0.0.1:9109/metrics")
        assert f'version="{retrained.version}"' in metrics
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0, daemon_log.read_text()
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
