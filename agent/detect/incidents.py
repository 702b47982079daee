"""Incidents: what the analyst gets instead of one alert per flow.

Each flow the rules attribute to a cause (rules.Verdicts.cause) is evidence against an
entity: the source host for scans, sweeps, brute force, tunnels, exfiltration, beacons and
unknown anomalies; the victim (destination host, or host and service) for floods and slow DoS,
however many sources there are. Evidence accumulates on one incident per (cause, entity), as
risk accumulates on an entity in risk-based alerting. An incident opens on its first evidence
(one line), is updated at most once per ``update_interval_s`` while evidence keeps coming, and
closes (one line) after ``quiet_s`` without any; times are the traffic's own (flow ends), so a
replay and a live capture of the same packets give the same incidents.

Costs are bounded whatever arrives: evidence is grouped by (cause, entity) with column
operations, so the Python work per batch grows with the number of incidents touched, not of
flows; at most ``max_open`` incidents are open, and when new entities would pass that (a
random-source flood that no cause rule explains), their evidence is folded into one incident
per victim instead, and what still does not fit is counted and dropped. Samples of peers,
ports and example flows are bounded. The line budget (alerts.LineBudget) then caps what is
written, and alerts.eve_incident formats the lines.

A flow still open is judged from its interim records (flows.FlowTable.snapshot) and again at
its end; an incident counts each flow once, and a later record of a flow it already counted
adds only the packets and bytes that are new (_Reported remembers, for a bounded number of
flows, what was counted of them).
"""

from __future__ import annotations

import hashlib
import uuid
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from quietwire.agent.detect.model import Scores
from quietwire.agent.detect.rules import UNKNOWN_CAUSE, Rule, Verdicts
from quietwire.agent.flow.communityid import flow_community_ids
from quietwire.agent.flow.identity import PROTO_NAMES, format_ips
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

    def __post_init__(self) -> None:
        for name in ("quiet_s", "update_interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"incidents.{name}: expected a positive number")
        for name in ("max_open", "samples", "distinct_cap"):
            if getattr(self, name) < 1:
                raise ValueError(f"incidents.{name}: expected a positive integer")


@dataclass(eq=False)
class Incident:
    id: str
    cause: str
    rule: Rule  # the most severe rule that gave evidence: signature and category
    role: str  # "source" or "victim"
    ip: str
    proto: str | None
    port: int | None
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
    key_hash: int = 0  # host_hash of the entity's address, to match flows against
    counted: bool = False  # counted as opened (once, even if its open line is held back)
    merged_into: str | None = None  # the named incident that took this one over
    lines: int = 0
    records: int = 0  # evidence records folded in (a flow's interim records and its end)
    evidence_ns: int = 0  # traffic time when evidence last arrived (a flow ended)
    line_ns: int = 0  # traffic time of the line being written (its timestamp)
    last_line_ns: int = 0
    records_at_last_line: int = 0

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


@dataclass(frozen=True)
class _Batch:
    """One scored batch, as every incident update needs it; ``prior`` is what incidents
    already counted of each flow from its earlier (interim) records, or None if nothing."""

    flows: FlowRecords
    scores: Scores
    thresholds: dict[float, float]
    rules: list[Rule]
    prior: _Prior | None = None


@dataclass(frozen=True)
class _Prior:
    """Per record of a batch: whether an incident counted its flow before, and what of it."""

    seen: np.ndarray  # bool
    packets: np.ndarray  # int64
    bytes: np.ndarray  # int64
    score: np.ndarray  # float32, the highest score counted (-inf if none)

    @staticmethod
    def none(n: int) -> _Prior:
        """Nothing counted before, for n records."""
        return _Prior(
            np.zeros(n, bool),
            np.zeros(n, np.int64),
            np.zeros(n, np.int64),
            np.full(n, -np.inf, np.float32),
        )


class _Reported:
    """Flows whose interim records were evidence, by flow key (host_hash of seq and first
    packet time): the packets, bytes and highest score counted of each. A flow is forgotten
    when its final record arrives; at most ``cap`` are kept (oldest first out: the final
    record of a forgotten flow counts as a new flow). Sorted arrays, so each batch costs a
    few searches, not Python work per flow."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.key = np.zeros(0, np.uint64)
        self.packets = np.zeros(0, np.int64)
        self.bytes = np.zeros(0, np.int64)
        self.score = np.zeros(0, np.float32)
        self.stamp = np.zeros(0, np.int64)
        self._clock = 0

    def __len__(self) -> int:
        return len(self.key)

    def _find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos = np.minimum(np.searchsorted(self.key, keys), max(len(self.key) - 1, 0))
        hit = self.key[pos] == keys if len(self.key) else np.zeros(len(keys), bool)
        return pos, hit

    def lookup(self, keys: np.ndarray) -> _Prior:
        n = len(keys)
        out = _Prior.none(n)
        if n and len(self.key):
            pos, hit = self._find(keys)
            out.seen[hit] = True
            out.packets[hit] = self.packets[pos[hit]]
            out.bytes[hit] = self.bytes[pos[hit]]
            out.score[hit] = self.score[pos[hit]]
        return out

    def forget(self, keys: np.ndarray) -> None:
        if len(keys) and len(self.key):
            pos, hit = self._find(keys)
            keep = np.ones(len(self.key), bool)
            keep[pos[hit]] = False
            self._take(keep)

    def remember(self, keys, packets, nbytes, score) -> None:
        """Record (or update) what was counted of these flows."""
        if not len(keys):
            return
        keys, first = np.unique(keys, return_index=True)
        self.forget(keys)
        self._clock += 1
        self.key = np.concatenate([self.key, keys])
        self.packets = np.concatenate([self.packets, packets[first]])
        self.bytes = np.concatenate([self.bytes, nbytes[first]])
        self.score = np.concatenate([self.score, score[first].astype(np.float32)])
        self.stamp = np.concatenate([self.stamp, np.full(len(keys), self._clock)])
        if len(self.key) > self.cap:  # the oldest go
            keep = np.ones(len(self.key), bool)
            keep[np.argsort(self.stamp, kind="stable")[: len(self.key) - self.cap]] = False
            self._take(keep)
        self._take(np.argsort(self.key, kind="stable"))

    def _take(self, index: np.ndarray) -> None:
        for name in ("key", "packets", "bytes", "score", "stamp"):
            setattr(self, name, getattr(self, name)[index])


def _flow_keys(flows: FlowRecords, rows: np.ndarray) -> np.ndarray:
    return host_hash(
        flows["seq"][rows].astype(np.uint64), flows["first_ns"][rows].astype(np.uint64)
    )


class IncidentTracker:
    """Folds each batch's evidence into incidents and says which lines to write."""

    def __init__(self, settings: IncidentSettings | None = None) -> None:
        self.settings = settings or IncidentSettings()
        self.open: dict[tuple, Incident] = {}
        self.dropped = 0  # evidence flows that fitted no incident (max_open reached)
        self.now_ns = 0
        # flows counted from their interim records: at most 16 per open incident allowed
        self.reported = _Reported(16 * self.settings.max_open)
        # Called as on_fold(incident, flows, member rows) for each fold (evaluation uses it to
        # tell which flows made up an incident); None in the agent.
        self.on_fold = None

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
            found = self.reported.lookup(_flow_keys(flows, ev))
            prior = _Prior.none(len(flows))
            for name in ("seen", "packets", "bytes", "score"):
                getattr(prior, name)[ev] = getattr(found, name)
        due = self._observe(flows, scores, verdicts, thresholds, ev, prior)
        # What was counted of flows judged while open; a flow's final record forgets it.
        counted = ev[interim[ev]]
        if len(self.reported):
            ended = np.flatnonzero(~interim)
            if len(ended):
                self.reported.forget(_flow_keys(flows, ended))
        if len(counted):
            best = scores.score[counted].astype(np.float32)
            if prior is not None:
                best = np.maximum(best, prior.score[counted])
            self.reported.remember(
                _flow_keys(flows, counted),
                flows["packets"][counted].sum(1),
                flows["bytes"][counted].sum(1),
                best,
            )
        return due

    def _observe(self, flows, scores, verdicts, thresholds, ev, prior) -> list:
        if len(ev) == 0:
            return []
        rules = [r for r, _ in verdicts.hits]
        rule_of = verdicts.cause[ev]
        unknown = np.array([r.cause == UNKNOWN_CAUSE for r in rules])[rule_of]
        batch = _Batch(flows, scores, thresholds, rules, prior)
        due: list[tuple[Incident, str]] = []
        # Named causes first, so the anomalous flows of a scan or flood that its rule does not
        # match yet (its first probes, before the counts add up) join its incident.
        touched = self._fold_groups(batch, ev[~unknown], rule_of[~unknown], due)
        u, u_rule = ev[unknown], rule_of[unknown]
        if len(u):
            joined = np.zeros(len(u), dtype=bool)
            for side, role in (("src", "source"), ("dst", "victim")):
                named = {
                    inc.key_hash: inc
                    for inc in self.open.values()
                    if inc.role == role and inc.cause != UNKNOWN_CAUSE
                }
                if not named:
                    continue
                keys = host_hash(flows[f"{side}_hi"][u], flows[f"{side}_lo"][u])
                hit = ~joined & np.isin(keys, np.fromiter(named, np.uint64, len(named)))
                joined |= hit
                rows = np.flatnonzero(hit)
                hosts, inverse = np.unique(keys[rows], return_inverse=True)
                rows = rows[np.argsort(inverse, kind="stable")]
                bounds = np.r_[0, np.cumsum(np.bincount(inverse.reshape(-1)))]
                for j, key in enumerate(hosts.tolist()):  # one fold per host, not per flow
                    members = rows[bounds[j] : bounds[j + 1]]
                    inc = named[key]
                    self._fold(inc, rules[int(u_rule[members[0]])], batch, u[members])
                    touched.append(inc)
            touched += self._fold_groups(batch, u[~joined], u_rule[~joined], due)
        return due + self._lines_due(list(dict.fromkeys(touched)))

    def _fold_groups(
        self, batch: _Batch, ev: np.ndarray, rule_of: np.ndarray, due: list
    ) -> list[Incident]:
        """Group evidence by (cause, entity) and fold each group into its incident."""
        if len(ev) == 0:
            return []
        entity = np.array([ENTITY_CODES[r.entity] for r in batch.rules])[rule_of]
        names, inverse = self._group(batch, ev, rule_of, entity)
        dest = ENTITY_CODES["dest"]
        for keep_share in (0.5, 0.0):
            new = [j for j, name in enumerate(names) if name not in self.open]
            room = self.settings.max_open - len(self.open)
            if len(new) <= room:
                break
            # Too many new entities (e.g. a random-source flood no cause rule explains): the
            # largest keep their own incidents (half the room, leaving the rest for victims),
            # the evidence of the others goes to its victim's incident.
            counts = np.bincount(inverse)
            movable = [j for j in new if names[j][1] != dest]
            spill = sorted(movable, key=lambda j: -counts[j])[int(max(room, 0) * keep_share) :]
            entity[np.isin(inverse, spill)] = dest
            names, inverse = self._group(batch, ev, rule_of, entity)
        order = np.argsort(inverse, kind="stable")
        bounds = np.r_[0, np.cumsum(np.bincount(inverse))]
        opens_named = any(n not in self.open and n[0] != UNKNOWN_CAUSE for n in names)
        unknown = self._unknown_index() if opens_named else None
        touched = []
        for j, name in enumerate(names):
            members = ev[order[bounds[j] : bounds[j + 1]]]
            rule = batch.rules[int(rule_of[order[bounds[j]]])]
            inc = self.open.get(name)
            if inc is None:
                if len(self.open) >= self.settings.max_open:
                    self.dropped += len(members)
                    continue
                inc = self._open(name, rule, batch.flows, int(members[0]))
                self._fold(inc, rule, batch, members)
                due += self._absorb_unknown(inc, unknown)
            else:
                self._fold(inc, rule, batch, members)
            touched.append(inc)
        return touched

    def _absorb_unknown(self, inc: Incident, unknown: dict | None) -> list:
        """A named incident takes over the open unknown-anomaly incidents that were its
        beginning: the same source, or (for a victim) sources whose only peer it is.
        ``unknown`` indexes them by host hash (built once per batch, so this costs the
        incidents taken over, not every open one)."""
        if inc.cause == UNKNOWN_CAUSE or not unknown:
            return []
        out = []
        for name in unknown.pop((inc.role, inc.key_hash), []):
            other = self.open.pop(name, None)
            if other is None:
                continue
            inc.absorb(other, self.settings.samples, self.settings.distinct_cap)
            other.merged_into = inc.id
            if other.lines:  # its open line went out: close it, saying where it went
                other.line_ns = self.now_ns
                out.append((other, "close"))
        return out

    def _unknown_index(self) -> dict[tuple[str, int], list[tuple]]:
        """Open unknown-anomaly incidents (on a source) by the host a named incident on it
        would be keyed by: ("source", its own hash), and ("victim", its only peer's hash)."""
        index: dict[tuple[str, int], list[tuple]] = {}
        for name, inc in self.open.items():
            if inc.cause != UNKNOWN_CAUSE or inc.role != "source":
                continue
            index.setdefault(("source", inc.key_hash), []).append(name)
            if len(inc.peers) == 1:
                index.setdefault(("victim", next(iter(inc.peers))), []).append(name)
        return index

    def advance(self, now_ns: int | None = None) -> list[tuple[Incident, str]]:
        """Close the incidents quiet for ``quiet_s`` by ``now_ns`` (traffic time)."""
        if now_ns is not None:
            self.now_ns = max(self.now_ns, now_ns)
        quiet = int(self.settings.quiet_s * 1e9)
        done = [k for k, inc in self.open.items() if self.now_ns - inc.evidence_ns >= quiet]
        out = [(self.open.pop(k), "close") for k in done]
        for inc, _ in out:
            inc.line_ns = self.now_ns
        return out

    def close_all(self) -> list[tuple[Incident, str]]:
        """End of input or shutdown: every open incident closes (and the next input may
        start at any time: a replay's files are each their own time line)."""
        out = [(inc, "close") for inc in self.open.values()]
        for inc, _ in out:
            inc.line_ns = self.now_ns
        self.open.clear()
        self.now_ns = 0
        return out

    # ---- internals -----------------------------------------------------------------------
    @staticmethod
    def _group(
        batch: _Batch, ev: np.ndarray, rule_of: np.ndarray, entity: np.ndarray
    ) -> tuple[list[tuple], np.ndarray]:
        """Evidence grouped by (cause, entity): each group's name and each flow's group."""
        flows = batch.flows
        src = host_hash(flows["src_hi"][ev], flows["src_lo"][ev])
        dst = host_hash(flows["dst_hi"][ev], flows["dst_lo"][ev])
        service = (flows["proto"][ev].astype(np.uint64) << np.uint64(16)) | flows["dst_port"][
            ev
        ].astype(np.uint64)
        key = np.where(
            entity == ENTITY_CODES["src"],
            src,
            np.where(entity == ENTITY_CODES["dest"], dst, host_hash(dst, service)),
        )
        cause_code = np.array([_cause_code(r.cause) for r in batch.rules], np.uint64)[rule_of]
        _, first, inverse = np.unique(
            host_hash(key, cause_code), return_index=True, return_inverse=True
        )
        names = [
            IncidentTracker._name(
                flows, int(ev[i]), batch.rules[int(rule_of[i])].cause, int(entity[i])
            )
            for i in first.tolist()
        ]
        return names, inverse.reshape(-1)

    @staticmethod
    def _name(flows: FlowRecords, i: int, cause: str, code: int) -> tuple:
        """The exact identity of an incident: (cause, role, address, proto, port)."""
        side = "src" if code == ENTITY_CODES["src"] else "dst"
        address = (int(flows[f"{side}_hi"][i]), int(flows[f"{side}_lo"][i]))
        if code == ENTITY_CODES["dest_service"]:
            return (cause, code, address, int(flows["proto"][i]), int(flows["dst_port"][i]))
        return (cause, code, address, None, None)

    def _open(self, name: tuple, rule: Rule, flows: FlowRecords, i: int) -> Incident:
        cause, code, _, proto, port = name
        side = "src" if code == ENTITY_CODES["src"] else "dst"
        one = flows.take([i])
        ip = format_ips(one["ip_version"], one[f"{side}_hi"], one[f"{side}_lo"])[0]
        inc = Incident(
            id=uuid.uuid4().hex[:16],
            cause=cause,
            rule=rule,
            role="source" if code == ENTITY_CODES["src"] else "victim",
            ip=ip,
            proto=PROTO_NAMES.get(proto, str(proto)) if proto is not None else None,
            port=port,
            first_ns=int(flows["first_ns"][i]),
            last_ns=int(flows["last_ns"][i]),
            key_hash=int(host_hash(one[f"{side}_hi"], one[f"{side}_lo"])[0]),
        )
        self.open[name] = inc
        return inc

    def _fold(self, inc: Incident, rule: Rule, batch: _Batch, members: np.ndarray) -> None:
        s = self.settings
        if self.on_fold is not None:
            self.on_fold(inc, batch.flows, members)
        flows, scores = batch.flows, batch.scores
        if rule.cause == inc.cause and rule.severity < inc.rule.severity:
            inc.rule = rule  # the most severe rule of the incident's own cause names it
        inc.rules.add(rule.id)
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
        inc.first_ns = min(inc.first_ns, int(flows["first_ns"][members].min()))
        inc.last_ns = max(inc.last_ns, int(flows["last_ns"][members].max()))
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


ENTITY_CODES = {"src": 0, "dest": 1, "dest_service": 2}


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
