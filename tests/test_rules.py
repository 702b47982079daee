"""Rules: validation errors as file:line, and suppress / threshold / alert / repeat semantics
on flows crafted with scapy and scored by the bundled model."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from scapy.all import IP, TCP, Ether

from quietwire.agent.detect.model import ScoringModel
from quietwire.agent.detect.rules import RuleEngine, RuleError, load_rules
from quietwire.agent.service.config import DEFAULT_RULES
from quietwire.cli import main

from .conftest import meter_file, write_pcap


def write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "body,message",
    [
        (
            "rules:\n  - id: 1\n    name: x\n    action: alert\n    fpr: 0.01\n    colour: red\n",
            r"r\.yaml:6: rule: unknown key 'colour'",
        ),
        (
            "rules:\n  - id: 1\n    name: x\n    action: shout\n",
            r"r\.yaml:4: action: 'shout' is not one of",
        ),
        (
            "rules:\n  - id: 1\n    name: x\n    action: suppress\n    match:\n      src_net: 10.0.0.0/33\n",
            r"r\.yaml:6: bad network '10.0.0.0/33'",
        ),
        (
            "rules:\n  - id: 1\n    name: x\n    action: alert\n    match:\n      features:\n        nope: {gt: 1}\n",
            r"r\.yaml:7: match.features: unknown feature 'nope'",
        ),
        (
            "rules:\n  - {id: 1, name: a, action: alert, fpr: 0.01}\n  - {id: 1, name: b, action: alert, fpr: 0.01}\n",
            r"r\.yaml:3: rule id 1 already used at .*r\.yaml:2",
        ),
        (
            "rules:\n  - id: one\n    name: x\n    action: alert\n",
            r"r\.yaml:2: id: expected a integer, got 'one'",
        ),
        ("rules: [\n", r"r\.yaml:2: malformed YAML"),
        (
            "rules:\n  - id: 1\n    name: x\n    action: alert\n    fpr: 2\n",
            r"r\.yaml:5: fpr: expected a number between 0 and 1",
        ),
        (
            "rules:\n  - id: 1\n    name: x\n    action: suppress\n    match: {src_net: $nowhere}\n",
            r"r\.yaml:5: unknown variable \$nowhere",
        ),
    ],
)
def test_rule_errors_name_file_and_line(tmp_path, body, message):
    with pytest.raises(RuleError, match=message):
        load_rules(write(tmp_path, body))


def test_rules_check_command(tmp_path, capsys):
    assert main(["rules", "check", str(DEFAULT_RULES)]) == 0
    assert "OK, 25 rules (23 alert, 1 suppress, 1 threshold)" in capsys.readouterr().out
    bad = write(
        tmp_path,
        "rules:\n  - id: 1\n    name: x\n    action: alert\n    fpr: 0.01\n    colour: red\n",
    )
    assert main(["rules", "check", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("quietwire: error: ") and f"{bad}:6:" in err and "\n" not in err


def scan_flows(tmp_path, src="10.9.9.9"):
    pkts = [
        Ether() / IP(src=src, dst="10.0.0.5") / TCP(sport=40000, dport=p, flags="S")
        for p in range(1, 60)
    ]
    return meter_file(write_pcap(tmp_path / "scan.pcap", pkts, [0.05 * i for i in range(59)]))


def evaluate(rules_text, tmp_path, flows):
    model = ScoringModel()
    scores = model.score(flows.features)
    engine = RuleEngine(load_rules(write(tmp_path, rules_text)), model.thresholds)
    v = engine.evaluate(flows.records, flows.features, scores.score, scores.tail_probability)
    alerts, deduplicated = engine.flow_alerts(v, flows.records)
    return engine, SimpleNamespace(
        alerts=alerts,
        deduplicated_by_rule=deduplicated,
        suppressed_by_rule=v.suppressed_by_rule,
        verdicts=v,
    )


SCAN_RULE = """
  - id: 10
    name: scan
    action: alert
    severity: 2
    max_tail_probability: 0.5
    match:
      proto: TCP
      features: {src_host_distinct_dst_ports: {gte: 20}}
"""


def test_alert_rule_and_repeat_window(tmp_path):
    flows = scan_flows(tmp_path)
    _, v = evaluate("rules:" + SCAN_RULE, tmp_path, flows)
    ports = flows.records["dst_port"][[i for i, _, _ in v.alerts]]
    # the first probe to reach 20 distinct ports alerts; later ones repeat within 60 s
    assert len(v.alerts) == 1 and ports[0] >= 20
    assert v.deduplicated_by_rule[10] >= 30


def test_suppress_rule_silences_alerts(tmp_path):
    flows = scan_flows(tmp_path)
    text = (
        "vars:\n  scanners: [10.9.9.0/24]\nrules:\n  - id: 1\n    name: allow\n    action: suppress\n    match: {src_net: $scanners}\n"
        + SCAN_RULE
    )
    _, v = evaluate(text, tmp_path, flows)
    assert v.alerts == [] and v.suppressed_by_rule[1] == len(flows)
    negated = text.replace("src_net: $scanners", "src_net: '!$scanners'")
    _, v = evaluate(negated, tmp_path, flows)
    assert len(v.alerts) == 1 and 1 not in v.suppressed_by_rule


def test_threshold_rule_overrides_the_fpr(tmp_path):
    flows = scan_flows(tmp_path)
    base = "rules:\n  - {id: 5, name: any, action: alert, fpr: 0.01, dedupe_s: 0}\n"
    _, loose = evaluate(base, tmp_path, flows)
    strict = (
        base
        + "  - {id: 6, name: strict, action: threshold, fpr: 0.0001, match: {dest_port: 1-1000}}\n"
    )
    _, tight = evaluate(strict, tmp_path, flows)
    model = ScoringModel()
    score = model.score(flows.features).score
    assert len(loose.alerts) == int((score > model.threshold(1e-2)).sum())
    assert len(tight.alerts) == int((score > model.threshold(1e-4)).sum())
    assert len(tight.alerts) <= len(loose.alerts)


def test_match_fields(tmp_path):
    flows = scan_flows(tmp_path)
    text = """vars: {home_net: [10.0.0.0/24]}
rules:
  - {id: 1, name: ports, action: alert, min_score: -1, dedupe_s: 0, match: {dest_port: [1, "10-12"], proto: [tcp]}}
  - {id: 2, name: service, action: alert, min_score: -1, dedupe_s: 0, match: {service: ssh}}
  - {id: 3, name: inbound, action: alert, min_score: -1, dedupe_s: 0, match: {direction: inbound}}
  - {id: 4, name: udp, action: alert, min_score: -1, dedupe_s: 0, match: {proto: UDP}}
"""
    _, v = evaluate(text, tmp_path, flows)
    by_rule = {}
    for i, rule, _ in v.alerts:
        by_rule.setdefault(rule.id, []).append(int(flows.records["dst_port"][i]))
    assert sorted(by_rule[1]) == [1, 10, 11, 12]
    assert by_rule[2] == [22]
    assert len(by_rule[3]) == len(flows)  # 10.9.9.9 is outside home_net, 10.0.0.5 inside
    assert 4 not in by_rule
    assert np.all(np.isin(by_rule[1], [1, 10, 11, 12]))


def test_each_flow_is_evidence_for_one_cause(tmp_path):
    """Named causes win in file order; unknown_anomaly takes only what no cause explains."""
    flows = scan_flows(tmp_path)
    text = """rules:
  - {id: 1, name: any, action: alert, min_score: -1000, cause: unknown_anomaly}
  - {id: 2, name: low ports, action: alert, min_score: -1000, cause: a, match: {dest_port: 1-9}}
  - {id: 3, name: more ports, action: alert, min_score: -1000, cause: b, match: {dest_port: 1-30}}
  - {id: 4, name: ports, action: alert, min_score: -1000, match: {dest_port: 25-40}}
"""
    _, v = evaluate(text, tmp_path, flows)
    port = flows.records["dst_port"]
    rule_ids = np.array([v.verdicts.hits[k][0].id for k in v.verdicts.cause])
    np.testing.assert_array_equal(rule_ids[port <= 9], 2)
    np.testing.assert_array_equal(rule_ids[(port >= 10) & (port <= 30)], 3)
    np.testing.assert_array_equal(rule_ids[(port > 30) & (port <= 40)], 4)
    np.testing.assert_array_equal(rule_ids[port > 40], 1)
    causes = {r.id: r.cause for r, _ in v.verdicts.hits}
    assert causes == {1: "unknown_anomaly", 2: "a", 3: "b", 4: "rule_4"}
    # per-flow alert lines still follow every matching rule
    assert sum(1 for _, rule, _ in v.alerts if rule.id == 1) >= 1


@pytest.mark.parametrize(
    "body,message",
    [
        ("cause: Port-Scan", r":3: cause: 'Port-Scan' is not a lower-case name"),
        ("entity: victim", r":3: entity: 'victim' is not one of src, dest, dest_service"),
        ("opens: soon", r":3: opens: 'soon' is not one of risk, direct"),
        ("tactic: hacking", r":3: tactic: 'hacking' is not one of reconnaissance, "),
        ("risk: -1", r":3: risk: expected a number from 0 to 1000"),
        ("risk: lots", r":3: risk: expected"),
    ],
)
def test_cause_entity_and_risk_keys_are_checked(tmp_path, body, message):
    text = "rules:\n  - id: 1\n    " + body + "\n    name: x\n    action: alert\n    fpr: 0.01\n"
    with pytest.raises(RuleError, match=message):
        load_rules(write(tmp_path, text))


def test_risk_weight_defaults():
    """A named cause's flow is worth 1 besides its surprisal, an unknown anomaly's nothing
    (its surprisal alone); rules open through risk unless they say direct."""
    rules = {r.id: r for r in load_rules(DEFAULT_RULES).rules}
    assert rules[2120].risk == 1.0 and rules[2120].opens == "risk"
    assert rules[2001].risk == 0.0 and rules[2101].opens == "direct"
    assert rules[2101].tactic == "discovery" and rules[2133].opens == "direct"
