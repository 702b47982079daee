"""Incidents: what the analyst gets instead of one alert per flow; one per entity.

Each flow the rules attribute to a cause (rules.Verdicts.cause) is evidence against an
entity: the source host for scans, sweeps, brute force, tunnels, exfiltration, beacons and
unknown anomalies; the victim host for floods, slow DoS and attacks on a service, however
many sources there are (a reflection attack spraying random ports has one entity: its
victim). All of an entity's evidence, whatever its causes, goes to one incident, which keeps
the causes as a timeline (cause, ATT&CK tactic, first and last evidence, flows).

An incident is **pending** until its entity's risk says it is worth an analyst's time
(risk.py: evidence accrues on the entity, decays, and is judged against the host's own
baseline): it is **raised** (its open line) when the excess risk reaches the threshold the
site's budget set, or at once when a cause that opens directly goes above the host's
baseline. A pending incident that goes quiet closes without a line (counted). A raised one is
updated at most once per ``update_interval_s`` while evidence keeps coming and closes (one
line) after ``quiet_s`` without any. Every line says in one sentence why it was raised. Times
are the traffic's own (flow ends), so a replay and a live capture of the same packets give the
same incidents.

Costs are bounded whatever arrives: evidence is grouped by (entity, cause) with column
operations, so the Python work per batch grows with the number of incidents touched, not of
flows; at most ``max_open`` incidents (pending or raised) are open, and when new entities
would pass that (a random-source flood no cause rule explains), their evidence is folded into
their victim's incident instead, and what still does not fit is counted and dropped. Samples
of peers, ports and example flows are bounded. The line budget (alerts.LineBudget) then caps
what is written, and alerts.eve_incident formats the lines.

A flow still open is judged from its interim records (flows.FlowTable.snapshot) and again at
its end; an incident counts each flow once (and its risk once), and a later record of a flow
it already counted adds only the packets and bytes that are new (counted.py remembers, for a
bounded number of flows, what was counted of them).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from quietwire.agent.detect.counted import Counted, Prior, flow_keys
from quietwire.agent.detect.model import Scores
from quietwire.agent.detect.risk import (
    RiskCalibration,
    RiskSettings,
    RiskTable,
    column_cause,
    entity_keys,
    flow_risk,
    risk_column,
)
from quietwire.agent.detect.rules import UNKNOWN_CAUSE, Rule, Verdicts
from quietwire.agent.flow.communityid import flow_community_ids
from quietwire.agent.flow.identity import format_ips
from quietwire.agent.flow.records import INTERIM, FlowRecords
from quietwire.agent.flow.table import host_hash


@dataclass(frozen=True)
class IncidentSettings:
    """How evidence becomes incidents (config key ``incidents``)."""

    quiet_s: float = 300.0  # close an incident after this long without evidence
    update_interval_s: float = 60.0  # at most one update line per incident per interval
    max_open: int = 10_000  # open incidents; beyond, new entities fold into their victim
    samples: int = 10  # peers, ports and example flows shown per incident
    distinct_cap: int = 1000  # distinct peers and ports counted exactly up to this many
    flow_alerts: bool = False  # also one alert line per flow and rule (the old output)
    risk: RiskSettings = field(default_factory=RiskSettings)

    def __post_init__(self) -> None:
        for name in ("quiet_s", "update_interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"incidents.{name}: expected a positive number")
        for name in ("max_open", "samples", "distinct_cap"):
            if getattr(self, name) < 1:
                raise ValueError(f"incidents.{name}: expected a positive integer")


@dataclass
class CauseSpan:
    """One cause of an incident's timeline."""

    cause: str
    tactic: str | None
    first_ns: int
    last_ns: int
    flows: int = 0


@dataclass(eq=False)
class Incident:
    id: str
    rule: Rule  # the rule that names it: the most severe of its most specific cause
    role: str  # "source" or "victim"
    ip: str
    first_ns: int
    last_ns: int
    flows: int = 0
    packets: int = 0
    bytes: int = 0
    max_score: float = float("-inf")
    min_tail: float = 1.0
    over: Counter = field(default_factory=Counter)  # FPR level -> flows over its threshold
    contributions: np.ndarray | None = None  # summed over the evidence
    peers: set = field(default_factory=set)  # peer address hashes, up to distinct_cap
    ports: set = field(default_factory=set)
    peer_sample: list = field(default_factory=list)
    port_sample: list = field(default_factory=list)
    examples: list = field(default_factory=list)  # community ids
    rules: set = field(default_factory=set)
    causes: dict = field(default_factory=dict)  # cause -> CauseSpan, in order of first evidence
    key_hash: int = 0  # host_hash of the entity's address, to match flows against
    entity_key: int = 0  # the risk table's key: (role, host)
    raised: bool = False  # its entity crossed the threshold (or a direct cause its baseline)
    why: str = ""  # one sentence: why it was raised
    risk: float = 0.0  # the entity's risk (all causes) at the last evidence
    excess: float = 0.0  # over its baseline, causes that open directly left out
    over_baseline: float = 0.0  # over its baseline, every cause
    threshold: float = 0.0
    peak_excess: float = 0.0  # the highest excess so far (at any threshold, raised or not)
    direct: bool = False  # a cause that opens directly went above its baseline
    counted: bool = False  # counted as opened (once, even if its open line is held back)
    merged_into: str | None = None  # the named incident that took this one over
    lines: int = 0
    records: int = 0  # evidence records folded in (a flow's interim records and its end)
    evidence_ns: int = 0  # traffic time when evidence last arrived (a flow ended)
    line_ns: int = 0  # traffic time of the line being written (its timestamp)
    last_line_ns: int = 0
    records_at_last_line: int = 0

    @property
    def cause(self) -> str:
        return self.rule.cause

    @property
    def tactics(self) -> list[str]:
        return list(dict.fromkeys(c.tactic for c in self.causes.values() if c.tactic))

    def note_rule(self, rule: Rule) -> None:
        """A named cause outranks unknown_anomaly; then the more severe rule names it."""
        if _rank(rule) < _rank(self.rule):
            self.rule = rule
        self.rules.add(rule.id)

    def absorb(self, other: Incident, samples: int, cap: int) -> None:
        """Take over another incident's evidence (its samples fill what room is left)."""
        self.flows += other.flows
        self.records += other.records
        self.packets += other.packets
        self.bytes += other.bytes
        self.first_ns = min(self.first_ns, other.first_ns)
        self.last_ns = max(self.last_ns, other.last_ns)
        self.evidence_ns = max(self.evidence_ns, other.evidence_ns)
        self.max_score = max(self.max_score, other.max_score)
        self.min_tail = min(self.min_tail, other.min_tail)
        self.over.update(other.over)
        if other.contributions is not None:
            self.contributions = (
                other.contributions
                if self.contributions is None
                else self.contributions + other.contributions
            )
        self.rules |= other.rules
        for name, span in other.causes.items():
            mine = self.causes.get(name)
            if mine is None:
                self.causes[name] = CauseSpan(
                    span.cause, span.tactic, span.first_ns, span.last_ns, span.flows
                )
            else:
                mine.first_ns = min(mine.first_ns, span.first_ns)
                mine.last_ns = max(mine.last_ns, span.last_ns)
                mine.flows += span.flows
        if self.role == other.role:  # the same host: its peers are ours
            peers, peer_sample = other.peers, other.peer_sample
        else:  # a victim taking over a source: that source is a peer
            peers, peer_sample = {other.key_hash}, [other.ip]
        for seen, sample, their_seen, their_sample in (
            (self.peers, self.peer_sample, peers, peer_sample),
            (self.ports, self.port_sample, other.ports, other.port_sample),
        ):
            sample += [v for v in their_sample if v not in sample][: samples - len(sample)]
            seen.update(list(their_seen - seen)[: max(0, cap - len(seen))])
        self.examples += other.examples[: samples - len(self.examples)]


def _rank(rule: Rule) -> tuple[bool, int]:
    return (rule.cause == UNKNOWN_CAUSE, rule.severity)


@dataclass(frozen=True)
class _Batch:
    """One scored batch, as every incident update needs it; ``prior`` is what incidents
    already counted of each flow from its earlier (interim) records, or None if nothing."""

    flows: FlowRecords
    scores: Scores
    thresholds: dict[float, float]
    rules: list[Rule]
    prior: Prior | None = None


class IncidentTracker:
    """Folds each batch's evidence into incidents and says which lines to write."""

    def __init__(self, settings: IncidentSettings | None = None) -> None:
        self.settings = settings or IncidentSettings()
        self.open: dict[tuple, Incident] = {}  # (role, address) -> incident
        self.dropped = 0  # evidence flows that fitted no incident (max_open reached)
        self.quiet_unraised = 0  # pending incidents that closed without a line
        self._opened = 0
        self.now_ns = 0
        self.risk = RiskTable([], [], self.settings.risk)
        self.calibration: RiskCalibration | None = None
        # flows counted from their interim records: at most 16 per open incident allowed
        self.reported = Counted(16 * self.settings.max_open)
        # Called as on_fold(incident, flows, member rows, rule) for each fold (evaluation uses
        # it to tell which flows, of which cause, made up an incident); None in the agent.
        self.on_fold = None

    def calibrate(self, calibration: RiskCalibration | None) -> None:
        """The threshold and baselines the site's benign traffic set (the model carries them;
        None: the settings' threshold and no baselines). Risk so far is kept."""
        self.calibration = calibration
        if calibration is None:
            self.risk.threshold = self.settings.risk.threshold
            self.risk.set_baseline(None)
        else:
            self.risk.threshold = calibration.threshold
            self.risk.set_baseline(calibration.baseline)

    @property
    def threshold(self) -> float:
        return self.risk.threshold

    def observe(
        self,
        flows: FlowRecords,
        scores: Scores,
        verdicts: Verdicts,
        thresholds: dict[float, float],
    ) -> list[tuple[Incident, str]]:
        """Fold the evidence of one scored batch in; (incident, state) for each line due."""
        if len(flows):
            self.now_ns = max(self.now_ns, int(flows["last_ns"].max()))
        interim = flows["end_reason"] == INTERIM
        ev = np.flatnonzero(verdicts.cause >= 0)
        prior = None
        if len(self.reported) and len(ev):
            found = self.reported.lookup(flow_keys(flows, ev))
            prior = Prior.none(len(flows))
            for name in ("seen", "packets", "bytes", "score"):
                getattr(prior, name)[ev] = getattr(found, name)
        due = self._observe(flows, scores, verdicts, thresholds, ev, prior)
        # What was counted of flows judged while open; a flow's final record forgets it.
        counted = ev[interim[ev]]
        if len(self.reported):
            ended = np.flatnonzero(~interim)
            if len(ended):
                self.reported.forget(flow_keys(flows, ended))
        if len(counted):
            best = scores.score[counted].astype(np.float32)
            if prior is not None:
                best = np.maximum(best, prior.score[counted])
            self.reported.remember(
                flow_keys(flows, counted),
                flows["packets"][counted].sum(1),
                flows["bytes"][counted].sum(1),
                best,
            )
        return due

    def _observe(self, flows, scores, verdicts, thresholds, ev, prior) -> list:
        if len(ev) == 0:
            return []
        rules = [r for r, _ in verdicts.hits]
        columns = [risk_column(r.cause, r.opens) for r in rules]
        self.risk.ensure_causes(columns, [r.opens == "direct" for r in rules])
        rule_of = verdicts.cause[ev]
        role = np.array([r.entity != "src" for r in rules], np.int64)[rule_of]
        # An unknown anomaly towards a raised victim (a flood's sources, spoofed or many) is
        # more of that attack: it joins the victim's incident.
        unknown = np.array([r.cause == UNKNOWN_CAUSE for r in rules])[rule_of]
        victims = [i.key_hash for i in self.open.values() if i.raised and i.role == "victim"]
        if victims and unknown.any():
            dst = host_hash(flows["dst_hi"][ev], flows["dst_lo"][ev])
            role[unknown & np.isin(dst, np.array(victims, np.uint64))] = 1
        batch = _Batch(flows, scores, thresholds, rules, prior)
        due: list[tuple[Incident, str]] = []
        folded, kept, role = self._fold_groups(batch, ev, rule_of, role)
        if not folded:
            return due
        ev, rule_of, role = ev[kept], rule_of[kept], role[kept]
        weight = np.array([r.risk for r in rules])[rule_of]
        risk = flow_risk(weight, scores.tail_probability[ev], self.settings.risk)
        if prior is not None:  # a flow counted from an interim record adds its risk once
            risk[prior.seen[ev]] = 0.0
        side_hi = np.where(role == 0, flows["src_hi"][ev], flows["dst_hi"][ev])
        side_lo = np.where(role == 0, flows["src_lo"][ev], flows["dst_lo"][ev])
        keys = entity_keys(role, host_hash(side_hi, side_lo))
        cause = np.array([self.risk.cause_index[c] for c in columns])[rule_of]
        uniq, current, excess, direct = self.risk.add(keys, cause, risk, self.now_ns)
        over = np.maximum(current - self.risk.baseline_of(uniq), 0.0).sum(axis=1)
        by_key = {inc.entity_key: inc for inc in folded}
        for j, key in enumerate(uniq.tolist()):
            inc = by_key.get(key)
            if inc is None:
                continue
            inc.risk, inc.excess = float(current[j].sum()), float(excess[j])
            inc.over_baseline = float(over[j])
            inc.peak_excess = max(inc.peak_excess, inc.excess)
            inc.direct |= bool(direct[j])
            inc.threshold = self.risk.threshold
            if not inc.raised and (direct[j] or excess[j] >= self.risk.threshold):
                self._raise(inc, current[j], bool(direct[j]), due)
        return due + self._lines_due([inc for inc in folded if inc.raised])

    def _raise(self, inc: Incident, risk: np.ndarray, direct: bool, due: list) -> None:
        inc.raised = True
        inc.why = _why(inc, risk, self.risk, direct, self.now_ns)
        if inc.cause != UNKNOWN_CAUSE and inc.role == "victim":
            due += self._absorb_unknown(inc)

    def _fold_groups(
        self, batch: _Batch, ev: np.ndarray, rule_of: np.ndarray, role: np.ndarray
    ) -> tuple[list[Incident], np.ndarray, np.ndarray]:
        """Group evidence by (entity, cause) and fold each group into its entity's incident:
        the incidents touched, which evidence flows found one, and each flow's role (some
        may have moved to their victim)."""
        names, inverse = self._group(batch, ev, rule_of, role)
        for keep_share in (0.5, 0.0):
            new = {names[j] for j in range(len(names))} - self.open.keys()
            room = self.settings.max_open - len(self.open)
            if len(new) <= room:
                break
            # Too many new entities (e.g. a random-source flood no cause rule explains): the
            # largest keep their own incidents (half the room, leaving the rest for victims),
            # the evidence of the others goes to its victim's incident.
            counts = np.bincount(inverse)
            movable = [j for j, n in enumerate(names) if n in new and n[0] == 0]
            spill = sorted(movable, key=lambda j: -counts[j])[int(max(room, 0) * keep_share) :]
            role = role.copy()
            role[np.isin(inverse, spill)] = 1
            names, inverse = self._group(batch, ev, rule_of, role)
        order = np.argsort(inverse, kind="stable")
        bounds = np.r_[0, np.cumsum(np.bincount(inverse, minlength=len(names)))]
        kept = np.zeros(len(ev), bool)
        touched = []
        for j, name in enumerate(names):
            at = order[bounds[j] : bounds[j + 1]]
            members = ev[at]
            rule = batch.rules[int(rule_of[at[0]])]
            inc = self.open.get(name)
            if inc is None:
                if len(self.open) >= self.settings.max_open:
                    self.dropped += len(members)
                    continue
                inc = self._open(name, rule, batch.flows, int(members[0]))
            self._fold(inc, rule, batch, members)
            kept[at] = True
            touched.append(inc)
        return list(dict.fromkeys(touched)), kept, role

    def _absorb_unknown(self, inc: Incident) -> list:
        """A victim's incident takes over the open incidents of sources that showed nothing
        but unknown anomalies and whose only peer is the victim (a flood's sources, before
        its rule matched)."""
        out = []
        for name, other in list(self.open.items()):
            if (
                other.role != "source"
                or set(other.causes) != {UNKNOWN_CAUSE}
                or other.peers != {inc.key_hash}
            ):
                continue
            del self.open[name]
            inc.absorb(other, self.settings.samples, self.settings.distinct_cap)
            other.merged_into = inc.id
            if other.lines:  # its open line went out: close it, saying where it went
                other.line_ns = self.now_ns
                out.append((other, "close"))
        return out

    def advance(self, now_ns: int | None = None) -> list[tuple[Incident, str]]:
        """Close the incidents quiet for ``quiet_s`` by ``now_ns`` (traffic time); pending
        ones go without a line."""
        if now_ns is not None:
            self.now_ns = max(self.now_ns, now_ns)
        quiet = int(self.settings.quiet_s * 1e9)
        done = [k for k, inc in self.open.items() if self.now_ns - inc.evidence_ns >= quiet]
        return self._close([self.open.pop(k) for k in done])

    def close_all(self) -> list[tuple[Incident, str]]:
        """End of input or shutdown: every open incident closes (and the next input may
        start at any time: a replay's files are each their own time line)."""
        out = self._close(list(self.open.values()))
        self.open.clear()
        self.now_ns = 0
        return out

    def _close(self, incidents: list[Incident]) -> list[tuple[Incident, str]]:
        out = []
        for inc in incidents:
            if inc.raised:
                inc.line_ns = self.now_ns
                out.append((inc, "close"))
            else:
                self.quiet_unraised += 1
        return out

    # ---- internals -----------------------------------------------------------------------
    @staticmethod
    def _group(
        batch: _Batch, ev: np.ndarray, rule_of: np.ndarray, role: np.ndarray
    ) -> tuple[list[tuple], np.ndarray]:
        """Evidence grouped by (entity, cause): each group's incident name (role, address)
        and each flow's group."""
        flows = batch.flows
        src = host_hash(flows["src_hi"][ev], flows["src_lo"][ev])
        dst = host_hash(flows["dst_hi"][ev], flows["dst_lo"][ev])
        key = entity_keys(role, np.where(role == 0, src, dst))
        cause_code = np.array([_cause_code(r.cause) for r in batch.rules], np.uint64)[rule_of]
        _, first, inverse = np.unique(
            host_hash(key, cause_code), return_index=True, return_inverse=True
        )
        names = []
        for i in first.tolist():
            side = "src" if role[i] == 0 else "dst"
            f = int(ev[i])
            names.append((int(role[i]), (int(flows[f"{side}_hi"][f]), int(flows[f"{side}_lo"][f]))))
        return names, inverse.reshape(-1)

    def _incident_id(self, name: tuple, first_ns: int) -> str:
        """The same for the same traffic (a replay writes the same lines every time), unique
        on a sensor: the entity, its first evidence's time and how many incidents came
        before."""
        self._opened += 1
        text = f"{name}|{first_ns}|{self._opened}".encode()
        return hashlib.blake2b(text, digest_size=8).hexdigest()

    def _open(self, name: tuple, rule: Rule, flows: FlowRecords, i: int) -> Incident:
        code, _ = name
        side = "src" if code == 0 else "dst"
        one = flows.take([i])
        ip = format_ips(one["ip_version"], one[f"{side}_hi"], one[f"{side}_lo"])[0]
        host = host_hash(one[f"{side}_hi"], one[f"{side}_lo"])
        inc = Incident(
            id=self._incident_id(name, int(flows["first_ns"][i])),
            rule=rule,
            role="source" if code == 0 else "victim",
            ip=ip,
            first_ns=int(flows["first_ns"][i]),
            last_ns=int(flows["last_ns"][i]),
            key_hash=int(host[0]),
            entity_key=int(entity_keys(np.array([code]), host)[0]),
        )
        self.open[name] = inc
        return inc

    def _fold(self, inc: Incident, rule: Rule, batch: _Batch, members: np.ndarray) -> None:
        s = self.settings
        if self.on_fold is not None:
            self.on_fold(inc, batch.flows, members, rule)
        flows, scores = batch.flows, batch.scores
        inc.note_rule(rule)
        inc.records += len(members)
        packets = int(flows["packets"][members].sum())
        nbytes = int(flows["bytes"][members].sum())
        score = scores.score[members]
        was_over = np.zeros(len(members), bool)
        new = members
        p = batch.prior
        if p is not None:  # flows counted before from their interim records
            seen = p.seen[members]
            packets -= int(p.packets[members].sum())
            nbytes -= int(p.bytes[members].sum())
            new = members[~seen]
        inc.flows += len(new)
        inc.packets += packets
        inc.bytes += nbytes
        first, last = int(flows["first_ns"][members].min()), int(flows["last_ns"][members].max())
        inc.first_ns = min(inc.first_ns, first)
        inc.last_ns = max(inc.last_ns, last)
        span = inc.causes.get(rule.cause)
        if span is None:
            span = inc.causes[rule.cause] = CauseSpan(rule.cause, rule.tactic, first, last)
        span.first_ns, span.last_ns = min(span.first_ns, first), max(span.last_ns, last)
        span.flows += len(new)
        inc.evidence_ns = self.now_ns
        inc.max_score = max(inc.max_score, float(score.max()))
        inc.min_tail = min(inc.min_tail, float(scores.tail_probability[members].min()))
        for fpr, thr in batch.thresholds.items():  # flows over: each flow once
            if p is not None:
                was_over = p.score[members] > thr
            inc.over[fpr] += int(((score > thr) & ~was_over).sum())
        contrib = scores.contributions[members].sum(axis=0, dtype=np.float64)
        inc.contributions = contrib if inc.contributions is None else inc.contributions + contrib
        # Peers: the other side of each flow; ports: the destination ports.
        side = "dst" if inc.role == "source" else "src"
        peer_keys = host_hash(flows[f"{side}_hi"][members], flows[f"{side}_lo"][members])
        rows = members[_first_new(inc.peers, peer_keys, s.distinct_cap)]
        if len(inc.peer_sample) < s.samples and len(rows):
            sub = flows.take(rows[: s.samples - len(inc.peer_sample)])
            inc.peer_sample += format_ips(sub["ip_version"], sub[f"{side}_hi"], sub[f"{side}_lo"])
        ports = flows["dst_port"][members].astype(np.uint64)
        rows = members[_first_new(inc.ports, ports, s.distinct_cap)]
        if len(inc.port_sample) < s.samples:
            inc.port_sample += flows["dst_port"][rows[: s.samples - len(inc.port_sample)]].tolist()
        room = s.samples - len(inc.examples)
        if room > 0 and len(new):
            inc.examples.extend(flow_community_ids(flows.take(new[:room])))

    def _lines_due(self, touched: list[Incident]) -> list[tuple[Incident, str]]:
        every = int(self.settings.update_interval_s * 1e9)
        out = []
        for inc in touched:
            if inc.lines == 0:
                state = "open"
            elif inc.records > inc.records_at_last_line and self.now_ns - inc.last_line_ns >= every:
                state = "update"
            else:
                continue
            inc.line_ns = inc.last_line_ns = self.now_ns
            inc.records_at_last_line = inc.records
            out.append((inc, state))
        return out


def _duration(ns: int) -> str:
    s = max(ns, 0) / 1e9
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def _count(n: int, noun: str, at_least: bool = False) -> str:
    return f"{n:,}{'+' if at_least else ''} {noun}{'' if n == 1 else 's'}"


def _why(inc: Incident, risk: np.ndarray, table: RiskTable, direct: bool, now_ns: int) -> str:
    """One sentence an analyst reads without the docs: what crossed what, on what evidence."""
    took = _duration(now_ns - inc.first_ns)
    timeline = " then ".join(sorted(inc.causes, key=lambda c: inc.causes[c].first_ns))
    peers = _count(len(inc.peers), "peer", len(inc.peers) >= 1000)
    flows = _count(inc.flows, "flow")
    if direct:
        base = table.baseline_of(np.array([inc.entity_key], np.uint64))[0]
        over = [
            (table.causes[k], risk[k], base[k])
            for k in np.flatnonzero(table.direct & (risk > base) & (risk > 0)).tolist()
        ]
        column, value, usual = max(over, key=lambda x: x[1] - x[2]) if over else (inc.cause, 0, 0)
        cause = column_cause(column)
        return (
            f"{cause} risk {value:.0f} over this host's usual {usual:.0f} in {took}: "
            f"{flows} with {peers} on {_count(len(inc.ports), 'port')}; {timeline}"
        )
    strict = min(inc.over, default=None)
    over = f", {inc.over[strict]} over the {strict:g} threshold" if strict is not None else ""
    return (
        f"risk {inc.excess:.0f} over threshold {table.threshold:.3g} in {took}: "
        f"{flows} to {peers}{over}; {timeline}"
    )


def _cause_code(cause: str) -> int:
    """A stable 64-bit number per cause name, mixed into the group key."""
    return int.from_bytes(hashlib.blake2b(cause.encode(), digest_size=8).digest(), "little")


def _first_new(seen: set, values: np.ndarray, cap: int) -> np.ndarray:
    """Positions (in order) of the first occurrence of each value not yet in ``seen``, which
    takes them in, up to ``cap`` values in all."""
    if len(seen) >= cap:
        return np.zeros(0, dtype=np.int64)
    uniq, where = np.unique(values, return_index=True)
    fresh = ~np.isin(uniq, np.fromiter(seen, np.uint64, len(seen)))
    where = np.sort(where[fresh])[: cap - len(seen)]
    seen.update(values[where].tolist())
    return where
