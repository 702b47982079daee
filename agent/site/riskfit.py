"""Fitting entity risk to a site: the host baselines and the incident threshold that keeps
the site's benign traffic within the analyst's budget (benign incidents per 100 host-days).

The site's flows are scored with the (calibrated) model and judged by the rules, exactly as
the agent does; each evidence flow's risk (risk.flow_risk) accrues on its entity. Then:

1. **Baselines from the first half** (by traffic time): per entity and cause, the highest
   risk it reached; the site's value for a cause, for hosts not seen then, is the median
   over the site's hosts (hosts without such evidence count as 0): what its peers usually do.
2. **The threshold from the second half**, held out: each entity's highest excess over those
   baselines. ``budget`` allows ``budget * host_days / 100`` incidents in that half; the
   threshold is the smallest that keeps the entities reaching it within that. A short
   capture allows less than one: the threshold is then extrapolated from the highest excesses
   by an exponential tail (peaks over a threshold), never below the highest one seen.
3. **Baselines for use** from the whole: the higher of the two halves' peaks.

The threshold holds on traffic the baselines were not learned from, so it is honest about
tomorrow; what it cannot hold is a cause that opens directly (its rule's counts are the
evidence): those entities are reported (``direct_incidents_held_out``), not tuned away.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from quietwire.agent.detect.model import ScoringModel
from quietwire.agent.detect.risk import (
    ROLES,
    RiskBaseline,
    RiskCalibration,
    RiskSettings,
    RiskTable,
    entity_keys,
    flow_risk,
    risk_column,
)
from quietwire.agent.detect.rules import RuleEngine, RuleSet
from quietwire.agent.flow.identity import format_ips
from quietwire.agent.flow.records import FlowRecords
from quietwire.agent.flow.table import host_hash
from quietwire.agent.site.calibrate import load_proto, save_model

SITE_QUANTILE = 0.5
MIN_THRESHOLD = 5.0  # never open on less than a few unusual flows' worth
BUCKET_NS = 60 * 10**9  # evidence replayed a minute at a time
TAIL_POINTS = 20  # highest excesses the exponential tail is fitted to


MINUTE_NS = 60 * 10**9
GAP_MINUTES = 60  # a host idle this long was away: its time does not count


@dataclass(frozen=True)
class HostTimes:
    """The minutes each source host had a flow in (host hash, minute since the epoch),
    distinct: a day of a thousand hosts is at most 1.44 million pairs, whatever the flows."""

    host: np.ndarray  # uint64
    minute: np.ndarray  # int64

    @staticmethod
    def of(host: np.ndarray, first_ns: np.ndarray, last_ns: np.ndarray) -> HostTimes:
        """From flows: the minutes of each flow's start and end (a flow longer than the idle
        gap counts its ends, which is all host-days need)."""
        h = np.concatenate([host, host]).astype(np.uint64)
        m = np.concatenate([first_ns, last_ns]).astype(np.int64) // MINUTE_NS
        pairs = np.unique(np.stack([h, m.astype(np.uint64)], axis=1), axis=0)
        return HostTimes(pairs[:, 0], pairs[:, 1].astype(np.int64))

    @staticmethod
    def join(parts: list[HostTimes]) -> HostTimes:
        if not parts:
            return HostTimes(np.zeros(0, np.uint64), np.zeros(0, np.int64))
        h = np.concatenate([p.host for p in parts])
        m = np.concatenate([p.minute for p in parts])
        pairs = np.unique(np.stack([h, m.astype(np.uint64)], axis=1), axis=0)
        return HostTimes(pairs[:, 0], pairs[:, 1].astype(np.int64))

    def __len__(self) -> int:
        return len(self.host)

    def hosts_in(self, lo: int, hi: int) -> int:
        """Hosts with a flow in [lo, hi) (ns)."""
        inside = (self.minute >= lo // MINUTE_NS) & (self.minute < -(-hi // MINUTE_NS))
        return len(np.unique(self.host[inside]))

    def days(self, lo: int, hi: int) -> float:
        """Host-days in [lo, hi) (ns): each host's minutes from a flow to its last one, split
        where it had no flow for an hour (captures joined from several days count their days,
        not the gaps), a minute at least per stretch."""
        keep = (self.minute >= lo // MINUTE_NS) & (self.minute < -(-hi // MINUTE_NS))
        if not keep.any():
            return 0.0
        h, m = self.host[keep], self.minute[keep]
        order = np.lexsort((m, h))
        h, m = h[order], m[order]
        new = np.r_[True, (h[1:] != h[:-1]) | (m[1:] - m[:-1] > GAP_MINUTES)]
        starts = np.flatnonzero(new)
        span = np.maximum.reduceat(m, starts) - np.minimum.reduceat(m, starts) + 1
        return float(span.sum()) / 1440


@dataclass
class SiteEvidence:
    """Every evidence flow of the site's traffic, and the hosts and time it spans."""

    causes: list[str]  # risk columns: a cause, with ":direct" for rules that open directly
    direct: list[bool]
    key: np.ndarray  # uint64 entity key per evidence flow
    cause: np.ndarray  # index into causes
    risk: np.ndarray  # float64
    t_ns: np.ndarray  # int64, the flow record's end
    names: dict[int, str]  # entity key -> "role address"
    hosts: HostTimes  # the minutes each source host was there, for host-days
    flows: int = 0
    mid_ns: int = 0  # the median record end: where the halves split

    def take(self, rows: np.ndarray) -> SiteEvidence:
        return SiteEvidence(
            self.causes,
            self.direct,
            self.key[rows],
            self.cause[rows],
            self.risk[rows],
            self.t_ns[rows],
            self.names,
            self.hosts,
            self.flows,
            self.mid_ns,
        )


def site_evidence(
    model: ScoringModel,
    rules: RuleSet,
    chunks: Iterable[tuple[FlowRecords, np.ndarray]],
    settings: RiskSettings | None = None,
) -> SiteEvidence:
    """Score and judge the site's flows ((records, features) chunks) as the agent does."""
    settings = settings or RiskSettings()
    engine = RuleEngine(rules, model.thresholds)
    causes: list[str] = []
    direct: list[bool] = []
    parts: list[tuple] = []
    names: dict[int, str] = {}
    times: list[HostTimes] = []
    ends: list[tuple[np.ndarray, int]] = []  # a sample of record ends, and what each stands for
    seen: set[int] = set()  # flows already counted (an interim record, then the end)
    flows = 0
    for records, features in chunks:
        if not len(records):
            continue
        flows += len(records)
        times.append(
            HostTimes.of(
                host_hash(records["src_hi"], records["src_lo"]),
                records["first_ns"],
                records["last_ns"],
            )
        )
        if len(times) > 64:  # bounded: the distinct (host, minute) pairs so far
            times = [HostTimes.join(times)]
        step = max(1, len(records) // 1000)
        ends.append((np.sort(records["last_ns"])[::step].astype(np.int64), step))
        scores = model.score(features)
        verdicts = engine.evaluate(records, features, scores.score, scores.tail_probability)
        rules_hit = [r for r, _ in verdicts.hits]
        columns = [risk_column(r.cause, r.opens) for r in rules_hit]
        for r, column in zip(rules_hit, columns):
            if column not in causes:
                causes.append(column)
                direct.append(r.opens == "direct")
        ev = np.flatnonzero(verdicts.cause >= 0)
        if not len(ev):
            continue
        flow_id = host_hash(
            records["seq"][ev].astype(np.uint64), records["first_ns"][ev].astype(np.uint64)
        )
        fresh = np.array([f not in seen for f in flow_id.tolist()], bool)
        seen.update(flow_id.tolist())
        ev = ev[fresh]
        rule_of = verdicts.cause[ev]
        role = np.array([r.entity != "src" for r in rules_hit], np.int64)[rule_of]
        hi = np.where(role == 0, records["src_hi"][ev], records["dst_hi"][ev])
        lo = np.where(role == 0, records["src_lo"][ev], records["dst_lo"][ev])
        keys = entity_keys(role, host_hash(hi, lo))
        weight = np.array([r.risk for r in rules_hit])[rule_of]
        cause = np.array([causes.index(c) for c in columns])[rule_of]
        risk = flow_risk(weight, scores.tail_probability[ev], settings)
        _, at = np.unique(keys, return_index=True)
        ips = format_ips(records["ip_version"][ev][at], hi[at], lo[at])
        for k, ip, r in zip(keys[at].tolist(), ips, role[at].tolist()):
            names.setdefault(k, f"{ROLES[r]} {ip}")
        parts.append((keys, cause, risk, records["last_ns"][ev].astype(np.int64)))
    cat = [np.concatenate([p[i] for p in parts]) if parts else np.zeros(0) for i in range(4)]
    order = np.argsort(cat[3], kind="stable")
    return SiteEvidence(
        causes,
        direct,
        cat[0].astype(np.uint64)[order],
        cat[1].astype(np.int64)[order],
        cat[2].astype(np.float64)[order],
        cat[3].astype(np.int64)[order],
        names,
        HostTimes.join(times),
        flows,
        _weighted_median(ends),
    )


def _weighted_median(parts: list[tuple[np.ndarray, int]]) -> int:
    if not parts:
        return 0
    values = np.concatenate([v for v, _ in parts])
    weights = np.concatenate([np.full(len(v), w, float) for v, w in parts])
    order = np.argsort(values, kind="stable")
    cum = np.cumsum(weights[order])
    return int(values[order][np.searchsorted(cum, cum[-1] / 2)])


def replay(
    ev: SiteEvidence, settings: RiskSettings, baseline: RiskBaseline | None = None
) -> RiskTable:
    """The evidence through a risk table (a minute at a time), its peaks tracked."""
    table = RiskTable(ev.causes, ev.direct, settings, baseline, math.inf, track_peaks=True)
    if not len(ev.key):
        return table
    bucket = ev.t_ns // BUCKET_NS
    bounds = np.r_[0, np.flatnonzero(np.diff(bucket)) + 1, len(bucket)]
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        table.add(ev.key[a:b], ev.cause[a:b], ev.risk[a:b], int(ev.t_ns[b - 1]))
    return table


def baseline_from(tables: list[RiskTable], ev: SiteEvidence, hosts: int) -> RiskBaseline:
    """Per entity and cause the highest risk of any table; the site's value per cause the
    SITE_QUANTILE over ``hosts`` hosts (those without evidence of it count as 0)."""
    peaks: dict[int, np.ndarray] = {}
    for t in tables:
        for key, row in zip(t.key.tolist(), t.peak):
            peaks[key] = np.maximum(peaks[key], row) if key in peaks else row.copy()
    site: dict[str, float] = {}
    matrix = np.array(list(peaks.values())) if peaks else np.zeros((0, len(ev.causes)))
    for k, cause in enumerate(ev.causes):
        values = np.zeros(max(hosts, len(matrix)))
        values[: len(matrix)] = matrix[:, k] if len(matrix) else 0
        site[cause] = round(float(np.quantile(values, SITE_QUANTILE)), 4) if len(values) else 0.0
    host_rows = {
        ev.names[key]: {c: round(float(v), 4) for c, v in zip(ev.causes, row) if v > 0}
        for key, row in peaks.items()
        if key in ev.names
    }
    return RiskBaseline(tuple(ev.causes), site, {k: v for k, v in host_rows.items() if v})


def threshold_for_budget(peaks: np.ndarray, allowed: float) -> tuple[float, str]:
    """The smallest threshold that at most ``allowed`` of these per-entity peaks reach, and
    how it was found."""
    p = np.sort(peaks[peaks > 0])[::-1]
    if not len(p):
        return MIN_THRESHOLD, "no excess risk held out: the floor"
    if allowed >= 1 and len(p) > int(allowed):
        t = float(np.nextafter(p[int(allowed)], np.inf))
        return max(t, MIN_THRESHOLD), f"the {int(allowed) + 1}th highest held-out excess"
    if allowed >= 1:
        return MIN_THRESHOLD, "fewer entities with excess than the budget allows: the floor"
    m = min(len(p), TAIL_POINTS)
    u = float(p[m - 1])
    scale = float(np.mean(p[:m] - u)) if m > 1 else float(p[0])
    scale = max(scale, 1.0)
    t = u + scale * math.log(m / allowed)
    t = max(t, float(np.nextafter(p[0], np.inf)), MIN_THRESHOLD)
    return t, f"exponential tail over the {m} highest held-out excesses"


def fit_risk(
    ev: SiteEvidence, budget: float, settings: RiskSettings | None = None
) -> RiskCalibration:
    """Baselines and threshold for the site (see the module's description)."""
    settings = settings or RiskSettings()
    if not len(ev.hosts):
        raise ValueError("no flows to fit entity risk on")
    start = int(ev.hosts.minute.min()) * MINUTE_NS
    end = (int(ev.hosts.minute.max()) + 1) * MINUTE_NS
    # the halves at the median record end (the busy hours weigh as they are), not at the
    # middle of the time span
    mid = ev.mid_ns
    early = ev.take(np.flatnonzero(ev.t_ns < mid))
    late = ev.take(np.flatnonzero(ev.t_ns >= mid))
    first_half = replay(early, settings)
    baseline_early = baseline_from([first_half], ev, ev.hosts.hosts_in(start, mid))
    held_out = replay(late, settings, baseline_early)
    host_days = ev.hosts.days(mid, end)
    allowed = budget * host_days / 100
    threshold, method = threshold_for_budget(held_out.peak_excess, allowed)
    direct = _direct_entities(held_out, ev)
    # a table's peaks are of raw risk, whatever its baseline: the held-out replay's serve
    baseline = baseline_from([first_half, held_out], ev, ev.hosts.hosts_in(start, end))
    record = {
        "records": ev.flows,
        "evidence_flows": int(len(ev.key)),
        "hosts": ev.hosts.hosts_in(start, end),
        "held_out_host_days": round(host_days, 4),
        "allowed_incidents_held_out": round(allowed, 6),
        "entities_with_excess_held_out": int((held_out.peak_excess > 0).sum()),
        "highest_excess_held_out": round(float(held_out.peak_excess.max(initial=0)), 3),
        "direct_incidents_held_out": direct,
        "method": method,
    }
    return RiskCalibration(round(threshold, 3), budget, settings.half_life_s, baseline, record)


def _direct_entities(table: RiskTable, ev: SiteEvidence) -> int:
    """Entities of the held-out half whose causes that open directly went above baseline."""
    if not len(table.key):
        return 0
    base = table.baseline_of(table.key)
    over = (table.peak > base) & (table.peak > 0) & table.direct
    return int(over.any(axis=1).sum())


def store_risk(model_path: str | Path, calibration: RiskCalibration, out_path: str | Path) -> None:
    """Write ``calibration`` into the model's metadata (key ``risk``), atomically; the
    scores and thresholds are untouched."""
    proto = load_proto(Path(model_path))
    value = calibration.to_json()
    for prop in proto.metadata_props:
        if prop.key == "risk":
            prop.value = value
            break
    else:
        proto.metadata_props.append(onnx.StringStringEntryProto(key="risk", value=value))
    save_model(proto, Path(out_path))


def describe(cal: RiskCalibration) -> str:
    """The lines an operator reads after a fit."""
    r = cal.record
    hosts = len(cal.baseline.hosts or {})
    return (
        f"incidents: risk threshold {cal.threshold:.3g} for a budget of {cal.budget:g} benign "
        f"incidents per 100 host-days ({r.get('method')}); held out: "
        f"{r.get('held_out_host_days', 0):.3g} host-days, "
        f"{r.get('entities_with_excess_held_out', 0)} entities above their baseline "
        f"(highest {r.get('highest_excess_held_out', 0):.3g}), "
        f"{r.get('direct_incidents_held_out', 0)} by causes that open directly; baselines "
        f"for {hosts} hosts, from {r.get('evidence_flows', 0):,} evidence flows of "
        f"{r.get('records', 0):,} records"
    )


def fit_model(
    model_path: str | Path,
    chunks: Iterable[tuple[FlowRecords, np.ndarray]],
    rules: RuleSet,
    budget: float,
    settings: RiskSettings | None = None,
) -> RiskCalibration:
    """Fit entity risk for the model at ``model_path`` on the site's benign (records,
    features) and store it in the model (in place)."""
    if not budget > 0:
        raise ValueError(f"budget {budget:g}: expected a positive number")
    fitted = fit_risk(site_evidence(ScoringModel(model_path), rules, chunks, settings), budget)
    store_risk(model_path, fitted, model_path)
    return fitted
