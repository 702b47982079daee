"""Rules: which scored flows become alerts. One YAML file (or a directory of them), validated
at load with file:line errors, evaluated over a batch of flows with column operations.

Actions, applied in this order to each flow:
- ``suppress``: matching flows raise no alert (allowlists: known scanners, backups, monitoring);
- ``threshold``: matching flows are judged at another false-positive rate (per service/subnet);
- ``alert``: matching flows whose score passes the rule's condition are evidence for the
  rule's ``cause`` (port_scan, syn_flood, ...) against its ``entity`` (the source host, the
  destination host, or the destination host and service). Each flow is evidence for one cause:
  the first alert rule in file order that names a cause other than ``unknown_anomaly`` and
  matches it; ``unknown_anomaly`` rules take only the flows no other cause explains. The
  incidents stage (incidents.py) turns evidence into incidents. Per-flow alert lines (an
  option) still follow every matching rule, with repeats per (rule, source address) inside
  the rule's ``dedupe_s`` window counted, not written; the next alert carries the count.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from quietwire.agent.detect.thresholds import nearest_threshold
from quietwire.agent.features.schema import FEATURE_NAMES
from quietwire.agent.flow.records import FlowRecords
from quietwire.agent.yamlnodes import Node, YamlError, load

ACTIONS = ("alert", "suppress", "threshold")
UNKNOWN_CAUSE = "unknown_anomaly"
# Who an incident is about: the host that sends (scans, tunnels, beacons) or the victim.
ENTITIES = ("src", "dest", "dest_service")
# How a cause's evidence opens an incident: through the entity's risk (the default), or at
# once when it goes above the host's baseline (floods, scans, sweeps, tunnels: unambiguous at
# volume; an exploit request to a server of the site).
OPENS = ("risk", "direct")
# ATT&CK tactics a rule may name (an incident lists the tactics its causes span).
TACTICS = (
    "reconnaissance",
    "initial-access",
    "execution",
    "credential-access",
    "discovery",
    "lateral-movement",
    "collection",
    "command-and-control",
    "exfiltration",
    "impact",
)
DIRECTIONS = ("inbound", "outbound", "internal", "external")
PROTOS = {"TCP": 6, "UDP": 17, "ICMP": 1, "IPV6-ICMP": 58, "ICMPV6": 58, "SCTP": 132}
SERVICES = {
    "http": [80, 8000, 8080],
    "https": [443, 8443],
    "dns": [53],
    "ssh": [22],
    "telnet": [23],
    "ftp": [20, 21],
    "smtp": [25, 465, 587],
    "pop3": [110, 995],
    "imap": [143, 993],
    "ntp": [123],
    "snmp": [161, 162],
    "syslog": [514],
    "ldap": [389, 636],
    "smb": [139, 445],
    "rdp": [3389],
    "mysql": [3306],
    "postgres": [5432],
    "rsync": [873],
    "sip": [5060, 5061],
    "kerberos": [88],
    "vnc": [5900],
    "mqtt": [1883, 8883],
}
COMPARISONS = {"gt": np.greater, "gte": np.greater_equal, "lt": np.less, "lte": np.less_equal}
RULE_KEYS = {
    "id",
    "name",
    "action",
    "severity",
    "category",
    "fpr",
    "max_tail_probability",
    "min_score",
    "match",
    "dedupe_s",
    "cause",
    "entity",
    "risk",
    "opens",
    "tactic",
}
MATCH_KEYS = {
    "proto",
    "src_net",
    "dest_net",
    "src_port",
    "dest_port",
    "direction",
    "service",
    "features",
}
DEDUPE_MEMORY = 100_000


class RuleError(YamlError):
    """A rule file is invalid: file:line, the key, what was expected."""


@dataclass(frozen=True)
class Network:
    hi: int
    lo: int
    mask_hi: int
    mask_lo: int
    negate: bool = False

    @staticmethod
    def parse(text: str) -> Network:
        negate = text.startswith("!")
        net = ipaddress.ip_network(text.lstrip("!"), strict=False)
        if net.version == 4:
            value = (0xFFFF << 32) | int(net.network_address)
            bits = 96 + net.prefixlen
        else:
            value, bits = int(net.network_address), net.prefixlen
        mask = ((1 << 128) - 1) ^ ((1 << (128 - bits)) - 1)
        return Network(value >> 64, value & (2**64 - 1), mask >> 64, mask & (2**64 - 1), negate)

    def contains(self, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
        inside = ((hi & np.uint64(self.mask_hi)) == np.uint64(self.hi)) & (
            (lo & np.uint64(self.mask_lo)) == np.uint64(self.lo)
        )
        return ~inside if self.negate else inside


def _in_any(nets: list[Network], hi, lo) -> np.ndarray:
    """Positive networks are alternatives; negated ones must all hold."""
    positive = [n for n in nets if not n.negate]
    out = np.zeros(len(hi), bool) if positive else np.ones(len(hi), bool)
    for n in positive:
        out |= n.contains(hi, lo)
    for n in nets:
        if n.negate:
            out &= n.contains(hi, lo)
    return out


@dataclass(frozen=True)
class Rule:
    id: int
    name: str
    action: str
    where: str  # file:line, for messages
    severity: int = 3
    category: str = "Anomalous flow"
    fpr: float | None = None
    max_tail_probability: float | None = None
    min_score: float | None = None
    dedupe_s: float = 60.0
    cause: str = UNKNOWN_CAUSE
    entity: str = "src"
    risk: float = 1.0  # risk one matching flow adds besides its surprisal (0: surprisal only)
    opens: str = "risk"
    tactic: str | None = None
    protos: tuple[int, ...] = ()
    src_nets: tuple[Network, ...] = ()
    dest_nets: tuple[Network, ...] = ()
    src_ports: tuple[tuple[int, int], ...] = ()
    dest_ports: tuple[tuple[int, int], ...] = ()
    direction: str | None = None
    features: tuple[tuple[int, str, float], ...] = ()

    def matches(self, flows: FlowRecords, features: np.ndarray, home: list[Network]) -> np.ndarray:
        """Flow-field and feature conditions (not the score) for every flow."""
        n = len(flows)
        m = np.ones(n, dtype=bool)
        if self.protos:
            m &= np.isin(flows["proto"], self.protos)
        if self.src_nets:
            m &= _in_any(list(self.src_nets), flows["src_hi"], flows["src_lo"])
        if self.dest_nets:
            m &= _in_any(list(self.dest_nets), flows["dst_hi"], flows["dst_lo"])
        for ranges, col in ((self.src_ports, "src_port"), (self.dest_ports, "dst_port")):
            if ranges:
                port = flows[col]
                hit = np.zeros(n, dtype=bool)
                for lo, hi in ranges:
                    hit |= (port >= lo) & (port <= hi)
                m &= hit & np.isin(flows["proto"], (6, 17, 132))
        if self.direction:
            src_home = _in_any(home, flows["src_hi"], flows["src_lo"])
            dst_home = _in_any(home, flows["dst_hi"], flows["dst_lo"])
            m &= {
                "inbound": ~src_home & dst_home,
                "outbound": src_home & ~dst_home,
                "internal": src_home & dst_home,
                "external": ~src_home & ~dst_home,
            }[self.direction]
        for column, op, value in self.features:
            with np.errstate(invalid="ignore"):
                m &= COMPARISONS[op](features[:, column], value)  # NaN never matches
        return m


@dataclass
class RuleSet:
    rules: list[Rule]
    home_net: list[Network] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rules)


def load_rules(path: str | Path) -> RuleSet:
    """Load a rule file or every *.yaml/*.yml file of a directory; RuleError on any problem."""
    path = Path(path)
    files = (
        sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml"))
        if path.is_dir()
        else [path]
    )
    if not files:
        raise RuleError(f"{path}: no rule files (*.yaml) in this directory")
    rules: list[Rule] = []
    home: list[Network] = []
    for f in files:
        try:
            rs = _load_file(f)
        except YamlError as exc:
            raise RuleError(str(exc)) from exc
        rules += rs.rules
        home = home or rs.home_net
    seen: dict[int, Rule] = {}
    for r in rules:
        if r.id in seen:
            raise RuleError(f"{r.where}: rule id {r.id} already used at {seen[r.id].where}")
        seen[r.id] = r
    return RuleSet(rules, home, [str(f) for f in files])


def _load_file(path: Path) -> RuleSet:
    top = load(path).mapping("rule file", {"version", "vars", "rules"})
    if "version" in top and top["version"].scalar("version", int) != 1:
        raise top["version"].error("version: only version 1 is known")
    variables: dict[str, list[str]] = {}
    if "vars" in top:
        for name, node in top["vars"].mapping("vars").items():
            variables[name] = node.scalars(f"vars.{name}", str)
    home = [
        n for text in variables.get("home_net", []) for n in _network(text, top["vars"], variables)
    ]
    if "rules" not in top:
        raise load(path).error("rule file: missing key 'rules'")
    rules = [_rule(node, variables) for node in top["rules"].items("rules")]
    return RuleSet(rules, home)


def _network(text: str, node: Node, variables: dict[str, list[str]]) -> list[Network]:
    neg = text.startswith("!")
    name = text.lstrip("!")
    if name.startswith("$"):
        if name[1:] not in variables:
            raise node.error(f"unknown variable {name} (define it under vars)")
        nets = [n for t in variables[name[1:]] for n in _network(t, node, variables)]
        if neg:
            return [Network(n.hi, n.lo, n.mask_hi, n.mask_lo, not n.negate) for n in nets]
        return nets
    try:
        return [Network.parse(text)]
    except ValueError as exc:
        raise node.error(f"bad network {text!r}: {exc}") from exc


def _ports(node: Node, what: str) -> tuple[tuple[int, int], ...]:
    out = []
    for item in node.scalars(what, (int, str)):
        text = str(item)
        lo, _, hi = text.partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise node.error(
                f"{what}: bad port or range {item!r} (e.g. 443 or 1024-2048)"
            ) from None
        if not 0 <= a <= b <= 65535:
            raise node.error(f"{what}: port range {item!r} outside 0-65535")
        out.append((a, b))
    return tuple(out)


def _choice(node: Node, key: str, choices: tuple[str, ...]) -> str:
    value = node.scalar(key, str)
    if value not in choices:
        raise node.error(f"{key}: {value!r} is not one of {', '.join(choices)}")
    return value


def _rule(node: Node, variables: dict[str, list[str]]) -> Rule:
    m = node.mapping("rule", RULE_KEYS)
    for key in ("id", "name", "action"):
        if key not in m:
            raise node.error(f"rule: missing key {key!r}")
    rid = m["id"].scalar("id", int)
    action = m["action"].scalar("action", str)
    if action not in ACTIONS:
        raise m["action"].error(f"action: {action!r} is not one of {', '.join(ACTIONS)}")
    kw: dict = {
        "id": rid,
        "name": m["name"].scalar("name", str),
        "action": action,
        "where": f"{node.path}:{node.line}",
    }
    if "severity" in m:
        kw["severity"] = m["severity"].scalar("severity", int)
        if not 1 <= kw["severity"] <= 4:
            raise m["severity"].error("severity: expected 1 (highest) to 4")
    if "category" in m:
        kw["category"] = m["category"].scalar("category", str)
    for key in ("fpr", "max_tail_probability"):
        if key in m:
            kw[key] = m[key].scalar(key, float)
            if not 0 < kw[key] < 1:
                raise m[key].error(f"{key}: expected a number between 0 and 1")
    if "min_score" in m:
        kw["min_score"] = m["min_score"].scalar("min_score", float)
    if "dedupe_s" in m:
        kw["dedupe_s"] = m["dedupe_s"].scalar("dedupe_s", float)
        if kw["dedupe_s"] < 0:
            raise m["dedupe_s"].error("dedupe_s: expected >= 0")
    if "cause" in m:
        kw["cause"] = m["cause"].scalar("cause", str)
        if not kw["cause"].replace("_", "").isalnum() or not kw["cause"].islower():
            raise m["cause"].error(
                f"cause: {kw['cause']!r} is not a lower-case name (letters, digits, _)"
            )
    elif "match" in m:
        kw["cause"] = f"rule_{rid}"  # a rule with conditions explains what it matches
    for key, choices in (("entity", ENTITIES), ("opens", OPENS), ("tactic", TACTICS)):
        if key in m:
            kw[key] = _choice(m[key], key, choices)
    if "risk" in m:
        kw["risk"] = m["risk"].scalar("risk", float)
        if not 0 <= kw["risk"] <= 1000:
            raise m["risk"].error("risk: expected a number from 0 to 1000")
    elif kw.get("cause", UNKNOWN_CAUSE) == UNKNOWN_CAUSE:
        kw["risk"] = 0.0  # an unknown anomaly is worth its surprisal alone
    if action == "threshold" and "fpr" not in m:
        raise node.error("rule: a threshold rule needs 'fpr'")
    if (
        action == "alert"
        and not ({"fpr", "max_tail_probability", "min_score"} & m.keys())
        and "match" not in m
    ):
        raise node.error(
            "rule: an alert rule needs a score condition (fpr, "
            "max_tail_probability, min_score) or a match"
        )
    if "match" in m:
        kw.update(_match(m["match"], variables))
    return Rule(**kw)


def _match(node: Node, variables: dict[str, list[str]]) -> dict:
    m = node.mapping("match", MATCH_KEYS)
    out: dict = {}
    if "proto" in m:
        names = [p.upper() for p in m["proto"].scalars("match.proto", str)]
        bad = [p for p in names if p not in PROTOS]
        if bad:
            raise m["proto"].error(f"match.proto: unknown {bad[0]!r} (one of {', '.join(PROTOS)})")
        out["protos"] = tuple(PROTOS[p] for p in names)
    for key, field_name in (("src_net", "src_nets"), ("dest_net", "dest_nets")):
        if key in m:
            texts = m[key].scalars(f"match.{key}", str)
            out[field_name] = tuple(n for t in texts for n in _network(t, m[key], variables))
    for key, field_name in (("src_port", "src_ports"), ("dest_port", "dest_ports")):
        if key in m:
            out[field_name] = _ports(m[key], f"match.{key}")
    if "service" in m:
        ports = []
        for name in m["service"].scalars("match.service", str):
            if name not in SERVICES:
                raise m["service"].error(
                    f"match.service: unknown {name!r} (one of {', '.join(sorted(SERVICES))})"
                )
            ports += [(p, p) for p in SERVICES[name]]
        out["dest_ports"] = tuple(out.get("dest_ports", ())) + tuple(ports)
    if "direction" in m:
        d = m["direction"].scalar("match.direction", str)
        if d not in DIRECTIONS:
            raise m["direction"].error(f"match.direction: {d!r} is not one of {DIRECTIONS}")
        out["direction"] = d
    if "features" in m:
        conds = []
        for name, cond in m["features"].mapping("match.features").items():
            if name not in FEATURE_NAMES:
                raise cond.error(
                    f"match.features: unknown feature {name!r} (see `quietwire schema`)"
                )
            for op, value in cond.mapping(f"match.features.{name}", set(COMPARISONS)).items():
                conds.append(
                    (
                        FEATURE_NAMES.index(name),
                        op,
                        value.scalar(f"match.features.{name}.{op}", float),
                    )
                )
        out["features"] = tuple(conds)
    return out


@dataclass
class Verdicts:
    """What the rules decided for one batch."""

    hits: list[tuple[Rule, np.ndarray]]  # each alert rule and the flows it matched (bool)
    cause: np.ndarray  # per flow: index into hits of the rule naming its cause, or -1
    suppressed_by_rule: dict[int, int]  # rule id -> flows an allowlist silenced


class RuleEngine:
    """Applies a RuleSet to scored flows, with the per-(rule, source) repeat memory of the
    per-flow alert lines."""

    def __init__(self, ruleset: RuleSet, thresholds: dict[float, float]) -> None:
        self.ruleset = ruleset
        self.thresholds = thresholds
        self._last: OrderedDict[tuple[int, int, int], list] = OrderedDict()

    def threshold(self, fpr: float) -> float:
        return nearest_threshold(self.thresholds, fpr)

    def replaced(self, ruleset: RuleSet, thresholds: dict[float, float]) -> RuleEngine:
        """A new engine for new rules or thresholds that keeps the repeat windows."""
        engine = RuleEngine(ruleset, thresholds)
        engine._last = self._last
        return engine

    def evaluate(
        self, flows: FlowRecords, features: np.ndarray, score: np.ndarray, tail: np.ndarray
    ) -> Verdicts:
        n = len(flows)
        home = self.ruleset.home_net
        silenced = np.zeros(n, dtype=bool)
        suppressed: dict[int, int] = {}
        override = np.full(n, np.nan)
        hits: list[tuple[Rule, np.ndarray]] = []
        for rule in self.ruleset.rules:
            if rule.action == "suppress":
                hit = rule.matches(flows, features, home) & ~silenced
                if hit.any():
                    suppressed[rule.id] = int(hit.sum())
                silenced |= hit
            elif rule.action == "threshold":
                hit = rule.matches(flows, features, home) & np.isnan(override)
                override[hit] = self.threshold(rule.fpr)
        for rule in self.ruleset.rules:
            if rule.action == "alert":  # after every suppress and threshold rule
                hit = rule.matches(flows, features, home) & ~silenced
                if rule.fpr is not None:
                    thr = np.where(np.isnan(override), self.threshold(rule.fpr), override)
                    hit &= score > thr
                if rule.max_tail_probability is not None:
                    hit &= tail <= rule.max_tail_probability
                if rule.min_score is not None:
                    hit &= score >= rule.min_score
                hits.append((rule, hit))
        cause = np.full(n, -1, dtype=np.int64)
        for named in (True, False):  # named causes first; unknown_anomaly takes the rest
            for k, (rule, hit) in enumerate(hits):
                if (rule.cause != UNKNOWN_CAUSE) == named:
                    cause[hit & (cause < 0)] = k
        return Verdicts(hits, cause, suppressed)

    def flow_alerts(
        self, verdicts: Verdicts, flows: FlowRecords
    ) -> tuple[list[tuple[int, Rule, int]], dict[int, int]]:
        """Per-flow alert lines (an option): (flow index, rule, repeats held back before it)
        for every matching rule, and rule id -> alerts held back as repeats."""
        alerts: list[tuple[int, Rule, int]] = []
        deduplicated: dict[int, int] = {}
        for rule, hit in verdicts.hits:
            for i in np.flatnonzero(hit).tolist():
                repeats = self._admit(rule, flows, i)
                if repeats is None:
                    deduplicated[rule.id] = deduplicated.get(rule.id, 0) + 1
                else:
                    alerts.append((i, rule, repeats))
        return alerts, deduplicated

    def _admit(self, rule: Rule, flows: FlowRecords, i: int) -> int | None:
        """None if this alert repeats one inside the rule's window, else the count of
        repeats held back since the last alert written for the same (rule, source)."""
        key = (rule.id, int(flows["src_hi"][i]), int(flows["src_lo"][i]))
        now = int(flows["last_ns"][i])
        state = self._last.get(key)
        if state is not None and now - state[0] < rule.dedupe_s * 1e9:
            state[1] += 1
            return None
        held = state[1] if state is not None else 0
        self._last[key] = [now, 0]
        self._last.move_to_end(key)
        while len(self._last) > DEDUPE_MEMORY:
            self._last.popitem(last=False)
        return held
