"""Incident-level evaluation: what an analyst would receive for a labelled capture.

The agent's Engine replays a capture with a given model and the default rules; every flow an
incident is built from is looked up in the labels, so each incident gets the attack type most
of its flows belong to (or benign). Reported per attack type: the causes of its incidents
(the confusion of cause against true type), whether one names the expected cause, alert lines
per incident, and the time from the attack's first packet to its first line; and benign
incidents per 100 host-days, at the risk threshold the budget set and as a curve over other
thresholds (from the same replay: an incident is raised at threshold T when a cause that
opens directly went above its baseline or its highest excess reached T).

Before the replay, the model's risk threshold and host baselines are fitted (site/riskfit.py)
on benign flows the caller names (the set's training traffic), as `quietwire calibrate` does
on a site's capture.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from quietwire.agent.capture.pcap import read_capture
from quietwire.agent.detect.incidents import Incident
from quietwire.agent.detect.model import ScoringModel
from quietwire.agent.detect.risk import RiskSettings
from quietwire.agent.detect.rules import load_rules
from quietwire.agent.features.meter import FlowMeter
from quietwire.agent.flow.identity import format_ips
from quietwire.agent.flow.records import FlowRecords
from quietwire.agent.output.alerts import AlertSink
from quietwire.agent.service.engine import Engine
from quietwire.agent.site.riskfit import describe, fit_risk, site_evidence, store_risk
from quietwire.rules import DEFAULT_RULES

# The real set's attack files and the cause the default rules should give them. None: no
# named cause can show it from flow features (malware C2 over TLS without a fixed timer, web
# exploits in one request's payload, a shell session, mining): an unknown_anomaly incident
# is the best the agent can do, and counts as detected.
REAL_EXPECTED_CAUSE = {
    "synscan": "port_scan",
    "tcp_scan": "port_scan",
    "dns-tunnel-iodine": "dns_tunnel",
    "dns2tcp_tunnel": "dns_tunnel",
    "dns_exfiltration": "dns_tunnel",
    "icmp-tunnel": "icmp_tunnel",
    # payload-borne (schema v4's payload statistics can show them)
    "WebattackSQLinj": "web_attack",
    "sql_injection": "web_attack",
    "xss": "web_attack",
    "log4j-webapp-exploit": "web_attack",
}


# The lab's attack kinds and the cause the default rules should give them (None: nothing in the
# flow features names it; any incident counts as detected).
LAB_EXPECTED_CAUSE = {
    "port_scan_syn": "port_scan",
    "port_scan_connect": "port_scan",
    "port_scan_udp": "port_scan",
    "port_scan_masscan": "port_scan",
    "host_sweep": "host_sweep",
    "brute_force_ssh": "brute_force",
    "brute_force_ftp": "brute_force",
    "brute_force_http": "brute_force",
    "syn_flood": "syn_flood",
    "udp_flood": "udp_flood",
    "slowloris": "slow_dos",
    "slow_body": "slow_dos",
    "slow_read": "slow_dos",
    "sql_injection": "web_attack",
    "sql_injection_random_agent": "web_attack",
    "dns_tunnel": "dns_tunnel",
    "c2_beacon": "c2_beacon",
    "exfiltration": "exfiltration",
    "sid_enumeration": None,
    "samr_enumeration": None,
    "rpc_endpoint_dump": None,
    "kerberoasting": None,
    "asrep_roasting": None,
    "dcsync": None,
    "dcsync_clone": None,
    "remote_service_psexec": None,
    "remote_service_smbexec": None,
}


def every_flow(label: str):
    """A labeller for a capture whose flows all have one label (a file-level label)."""
    return lambda records: [label] * len(records)


CURVE = (0.25, 0.5, 1.0, 2.0, 4.0)  # risk thresholds, as multiples of the fitted one


@dataclass
class TypeResult:
    expected: str | None  # the cause that names it; None: any incident counts
    incidents: Counter = field(default_factory=Counter)  # cause -> incidents of this type
    lines: int = 0
    first_line_s: float | None = None  # earliest, over its incidents of the expected cause

    @property
    def named(self) -> bool:
        if self.expected is None:
            return bool(self.incidents)
        return self.expected in self.incidents

    def as_dict(self) -> dict:
        n = sum(self.incidents.values())
        return {
            "expected_cause": self.expected,
            "named": self.named,
            "incidents_by_cause": dict(self.incidents),
            "lines_per_incident": self.lines / n if n else None,
            "seconds_to_first_line": self.first_line_s,
        }


@dataclass
class IncidentResult:
    types: dict[str, TypeResult] = field(default_factory=dict)
    benign_incidents: Counter = field(default_factory=Counter)  # by cause
    benign_host_hours: float = 0.0
    lines: int = 0
    threshold: float | None = None  # the fitted risk threshold the replay ran with
    fit: str = ""  # how it was fitted (riskfit.describe)
    # per threshold multiple: (benign incidents, attack types named)
    curve: dict[float, tuple[int, int]] = field(default_factory=dict)

    @property
    def host_days(self) -> float:
        return self.benign_host_hours / 24

    def per_100_host_days(self, n: int) -> float | None:
        return 100 * n / self.host_days if self.host_days else None

    def as_dict(self) -> dict:
        n = sum(self.benign_incidents.values())
        return {
            "types": {k: v.as_dict() for k, v in sorted(self.types.items())},
            "benign_incidents": dict(self.benign_incidents),
            "benign_host_days": round(self.host_days, 4),
            "benign_incidents_per_100_host_days": self.per_100_host_days(n),
            "alert_lines": self.lines,
            "risk_threshold": self.threshold,
            "risk_fit": self.fit,
            "curve": [
                {
                    "threshold": round(m * self.threshold, 3) if self.threshold else None,
                    "benign_incidents": b,
                    "benign_incidents_per_100_host_days": self.per_100_host_days(b),
                    "types_named": k,
                }
                for m, (b, k) in sorted(self.curve.items())
            ],
        }

    def table(self, name: str) -> str:
        rows = [
            f"== {name}: incidents (default rules), per attack type: causes of its incidents, "
            "lines per incident, seconds from its first packet to its first line",
            f"{'attack type':<24} {'expected cause':<16} {'named':<6} {'lines/inc':>9} "
            f"{'to 1st line':>11}  incidents by cause",
        ]
        for kind, t in sorted(self.types.items()):
            d = t.as_dict()
            per = f"{d['lines_per_incident']:.1f}" if d["lines_per_incident"] else "-"
            delay = d["seconds_to_first_line"]
            rows.append(
                f"{kind:<24} {t.expected or '(any)':<16} {'yes' if t.named else 'NO':<6} "
                f"{per:>9} {(f'{delay:.1f} s' if delay is not None else '-'):>11}  "
                + (", ".join(f"{c} {k}" for c, k in t.incidents.most_common()) or "none")
            )
        named = sum(t.named for t in self.types.values())
        benign = sum(self.benign_incidents.values())
        causes = ", ".join(f"{c} {k}" for c, k in self.benign_incidents.most_common()) or "-"
        rate = self.per_100_host_days(benign)
        rows.append(
            f"named: {named}/{len(self.types)} attack types; {self.lines} alert lines; "
            f"benign incidents: {benign} ({causes})"
            + (
                f", {rate:.3g} per 100 host-days ({self.host_days:.3g} host-days)"
                if rate is not None
                else ""
            )
        )
        if self.fit:
            rows.append(self.fit)
        if self.curve and self.threshold:
            rows.append(
                "risk threshold -> benign incidents per 100 host-days, attack types named: "
                + "; ".join(
                    f"{m * self.threshold:.3g}"
                    + (" (fitted)" if m == 1.0 else "")
                    + f" -> {self.per_100_host_days(b) or 0:.3g}, {k}/{len(self.types)}"
                    for m, (b, k) in sorted(self.curve.items())
                )
            )
        return "\n".join(rows)


def evaluate_incidents(
    model_path: Path,
    captures: list[tuple[Path, object]],
    expected: dict[str, str | None],
    fit_on: list[tuple[FlowRecords, np.ndarray]] | None = None,
    budget: float = 1.0,
) -> IncidentResult:
    """Replay each capture through the agent; ``captures`` pairs a file with a function
    giving each flow record's label ("benign" or an attack type). ``fit_on``: benign
    (records, features) to fit the risk threshold and baselines on first (written into the
    model at ``model_path``)."""
    result = IncidentResult()
    rules = load_rules(DEFAULT_RULES)
    if fit_on:
        fitted = fit_risk(site_evidence(ScoringModel(model_path), rules, fit_on), budget)
        store_risk(model_path, fitted, model_path)
        result.fit = describe(fitted)
    model = ScoringModel(model_path)
    result.threshold = model.risk.threshold if model.risk else RiskSettings().threshold
    judged: list[tuple[Incident, Counter]] = []
    for path, label_of in captures:
        judged += _replay_one(path, label_of, model, rules, expected, result)
    for m in CURVE:
        result.curve[m] = _at_threshold(judged, m * result.threshold, expected)
    return result


def _at_threshold(
    judged: list[tuple[Incident, Counter]], threshold: float, expected: dict
) -> tuple[int, int]:
    """Benign incidents and attack types named had the risk threshold been ``threshold``."""
    benign, named = 0, set()
    for inc, members in judged:
        if not (inc.direct or inc.peak_excess >= threshold):
            continue
        labels = Counter()
        for (label, _), n in members.items():
            labels[label] += n
        if labels.most_common(1)[0][0] == "benign":
            benign += 1
            continue
        for label, cause in members:
            if label != "benign" and expected.get(label) in (None, cause):
                named.add(label)
    return benign, len(named)


def _replay_one(path, label_of, model, rules, expected, result: IncidentResult) -> list:
    """Replay one capture; every incident (raised or not) with its flows' (label, cause)
    counts, for the curve."""
    stream = io.StringIO()
    engine = Engine(model, rules, AlertSink(stream=stream))
    members: dict[str, Counter] = {}  # incident id -> (label, cause) counts of its flows
    incidents: dict[str, Incident] = {}

    def on_fold(inc, flows, rows, rule) -> None:
        kinds = label_of(flows.take(rows))
        members.setdefault(inc.id, Counter()).update((k, rule.cause) for k in kinds)
        incidents[inc.id] = inc

    engine.incidents.on_fold = on_fold
    # Every flow and its label, from the same meter the engine uses.
    meter = FlowMeter(seed=1)
    parts = []
    # Small chunks, and time passing after each, as a live sensor sees the packets: the time
    # to an incident's first line is then what it would be live, not the replay's batching.
    for batch in read_capture(path, chunk_bytes=1 << 16):
        engine.process(batch)
        if len(batch):
            engine.expire(int(batch.ts_ns[-1]))
        parts.append(meter.add(batch).records)
    engine.flush()
    parts += [p.records for p in meter.drain()]
    records = FlowRecords.concat(parts)
    kinds = np.array(label_of(records)) if len(records) else np.zeros(0, str)
    src = format_ips(records["ip_version"], records["src_hi"], records["src_lo"])
    dst = format_ips(records["ip_version"], records["dst_hi"], records["dst_lo"])
    # The flow starts of each attack type per host it involves, to measure an incident from
    # the start of what it is about (see _attack_start).
    starts: dict[tuple[str, str], list[int]] = {}
    for i, (kind, t) in enumerate(zip(kinds.tolist(), records["first_ns"].tolist())):
        for host in {src[i], dst[i]}:
            starts.setdefault((kind, host), []).append(t)
    benign = kinds == "benign"
    result.benign_host_hours += _host_hours(
        np.array(src)[benign], records["first_ns"][benign], records["last_ns"][benign]
    )
    lines = [json.loads(x) for x in stream.getvalue().splitlines()]
    result.lines += len(lines)
    # an incident taken over by another counts for the one that took it
    for x in lines:
        inc = x["quietwire"]["incident"]
        if inc.get("merged_into") and inc["id"] in members:
            members.setdefault(inc["merged_into"], Counter()).update(members.pop(inc["id"]))
    by_id: dict[str, list] = {}
    for x in lines:
        by_id.setdefault(x["quietwire"]["incident"]["id"], []).append(x)
    for kind in set(kinds.tolist()) - {"benign"}:
        result.types.setdefault(kind, TypeResult(expected.get(kind)))
    for inc_id, its_lines in by_id.items():
        counts = members.get(inc_id)
        if not counts:
            continue  # merged into another incident
        labels = Counter()
        for (label, _), n in counts.items():
            labels[label] += n
        inc = its_lines[-1]["quietwire"]["incident"]
        if labels.most_common(1)[0][0] == "benign":
            result.benign_incidents[inc["cause"]] += 1
            continue
        # each attack type among its flows, under the causes its flows were evidence for
        for kind in labels:
            if kind == "benign":
                continue
            t = result.types.setdefault(kind, TypeResult(expected.get(kind)))
            causes = {cause for (label, cause) in counts if label == kind}
            for cause in causes:
                t.incidents[cause] += 1
            t.lines += len(its_lines)
            host_starts = starts.get((kind, inc["entity"]["ip"]))
            if (t.expected is None or t.expected in causes) and host_starts:
                delay = _delay(its_lines, t.expected, np.sort(host_starts))
                if delay is not None:
                    t.first_line_s = delay if t.first_line_s is None else min(t.first_line_s, delay)
    return [(incidents[i], members[i]) for i in incidents if i in members]


def _delay(lines: list[dict], expected: str | None, starts: np.ndarray) -> float | None:
    """Seconds from the attack's first flow to the first line of its incident that names
    the expected cause (any line when none is expected). An attacker's incident may have
    been raised by an earlier attack of the same host: a line already naming the cause
    before this attack began means the analyst knew at once (0 s)."""
    for line in lines:
        causes = {c["cause"] for c in line["quietwire"]["incident"]["timeline"]}
        if expected is None or expected in causes:
            stamp = int(np.datetime64(line["timestamp"][:26], "ns").astype(np.int64))
            return max(stamp - _attack_start(starts, stamp), 0) / 1e9
    return None


def _attack_start(starts: np.ndarray, line_ns: int, gap_ns: int = 3600 * 10**9) -> int:
    """The first flow start of the attack a line is about: going back from the line, the
    earliest start with no hour-long silence between it and the line (captures joined from
    several days measure from the start of the day's attack)."""
    before = starts[starts <= line_ns]
    if len(before) == 0:
        return int(starts[0])
    gaps = np.flatnonzero(np.diff(np.r_[before, line_ns]) > gap_ns)
    tail = gaps[gaps < len(before) - 1] if len(gaps) else gaps
    return int(before[tail[-1] + 1]) if len(tail) else int(before[0])


def _host_hours(hosts: np.ndarray, first_ns: np.ndarray, last_ns: np.ndarray) -> float:
    """Hours each host was seen: from a flow start to the last flow end, split where it started
    no flow for an hour (captures joined from several days count their days, not the gaps)."""
    if len(hosts) == 0:
        return 0.0
    order = np.lexsort((first_ns, hosts))
    h, start, end = hosts[order], first_ns[order], last_ns[order]
    new = np.r_[True, (h[1:] != h[:-1]) | (start[1:] - start[:-1] > 3600 * 10**9)]
    begin = np.minimum.reduceat(start, np.flatnonzero(new))
    finish = np.maximum.reduceat(end, np.flatnonzero(new))
    return float(np.maximum(finish - begin, 60 * 10**9).sum()) / 3.6e12
