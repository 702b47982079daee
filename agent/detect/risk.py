"""Entity risk: evidence accrues on the host it is about and is judged against that host's
own baseline and a threshold the analyst's budget sets (risk-based alerting).

Each evidence flow adds risk to its entity (the source host, or the victim host for floods
and attacks on a service) under its cause: the rule's own weight (``risk``: what one flow of
that cause is worth, e.g. one brute-force session) plus the flow's surprisal above a floor,
``max(0, -log10(tail probability) - floor)`` (a flow the model puts in the benign 1e-3 tail
adds about 2). Risk decays with a half-life, so a host's risk is a recent, weighted count of
what it did.

What is normal differs by host: a backup server uploads every night, a busy proxy has more
odd flows than a printer. The baseline (``RiskBaseline``, learned by site/riskfit.py from the
site's benign flows) holds, per host and cause, the highest risk the host reached while
learning, and for hosts not seen then the site's value (the median over its hosts). An
entity's **excess** is, summed over its causes, the risk above its baseline. An incident
opens when the excess reaches ``threshold`` (set so that the site's benign traffic opens at
most ``budget`` incidents per 100 host-days), or at once when a cause whose rule says
``opens: direct`` (floods, scans, sweeps, tunnels: unambiguous at volume, their rule's counts
already the evidence; an exploit request to a server of the site) goes above the host's
baseline for it. A rule's evidence goes to its column (``risk_column``): its cause, kept
apart when the rule opens directly.

Memory is bounded: at most ``max_entities`` entities are tracked; beyond, those with the least
risk are forgotten (counted). All updates are column operations over a batch's evidence.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from quietwire.agent.flow.table import host_hash

ROLES = ("source", "victim")


@dataclass(frozen=True)
class RiskSettings:
    """How risk accrues (config key ``incidents.risk``; the model may carry its own)."""

    half_life_s: float = 3600.0  # risk halves after this long without more evidence
    floor: float = 1.0  # surprisal (-log10 tail probability) up to this adds nothing
    max_surprisal: float = 6.0  # one flow adds at most this much surprisal
    threshold: float = 10.0  # excess risk that opens an incident, when the model has none
    max_entities: int = 200_000

    def __post_init__(self) -> None:
        for name in ("half_life_s", "threshold", "max_surprisal"):
            if not getattr(self, name) > 0:
                raise ValueError(f"incidents.risk.{name}: expected a positive number")
        if self.floor < 0:
            raise ValueError("incidents.risk.floor: expected a number >= 0")
        if self.max_entities < 1:
            raise ValueError("incidents.risk.max_entities: expected a positive integer")


DIRECT_SUFFIX = ":direct"


def risk_column(cause: str, opens: str) -> str:
    """The risk table's column for a rule's evidence: its cause, kept apart when its rule
    opens directly (a cause may have rules of both kinds, e.g. a web attack on a server of
    the site opens at once, one on an outside server accrues risk)."""
    return cause + DIRECT_SUFFIX if opens == "direct" else cause


def column_cause(column: str) -> str:
    """The cause a risk column is about."""
    return column.removesuffix(DIRECT_SUFFIX)


def flow_risk(weight: np.ndarray, tail: np.ndarray, settings: RiskSettings) -> np.ndarray:
    """Each evidence flow's risk: its rule's weight plus its surprisal above the floor."""
    with np.errstate(divide="ignore", invalid="ignore"):
        surprisal = -np.log10(np.clip(tail.astype(np.float64), 1e-300, 1.0))
    surprisal = np.nan_to_num(surprisal, nan=0.0)
    surprisal = np.minimum(surprisal, settings.max_surprisal)
    return weight + np.maximum(surprisal - settings.floor, 0.0)


def entity_keys(role: np.ndarray, host: np.ndarray) -> np.ndarray:
    """One 64-bit key per (role code, host hash)."""
    return host_hash(host.astype(np.uint64), role.astype(np.uint64))


@dataclass
class RiskBaseline:
    """Per host and cause, the risk that is usual there; ``site`` for hosts not listed.

    ``hosts`` maps "role address" (e.g. "source 10.0.0.5") to a risk per cause; causes the
    baseline does not list have baseline 0 (any evidence of them is new)."""

    causes: tuple[str, ...] = ()
    site: dict[str, float] | None = None
    hosts: dict[str, dict[str, float]] | None = None

    def to_json(self) -> dict:
        return {"causes": list(self.causes), "site": self.site or {}, "hosts": self.hosts or {}}

    @staticmethod
    def from_json(data: dict) -> RiskBaseline:
        site = {str(k): float(v) for k, v in dict(data.get("site", {})).items()}
        hosts = {
            str(h): {str(k): float(v) for k, v in dict(vals).items()}
            for h, vals in dict(data.get("hosts", {})).items()
        }
        return RiskBaseline(tuple(map(str, data.get("causes", ()))), site, hosts)


@dataclass(frozen=True)
class RiskCalibration:
    """What the site's benign traffic says: the threshold and the baselines (stored in the
    model's metadata as ``risk``, JSON)."""

    threshold: float
    budget: float  # benign incidents per 100 host-days the threshold was set for
    half_life_s: float
    baseline: RiskBaseline
    record: dict  # how it was set: flows, hosts, host-days, held-out incidents, method

    def to_json(self) -> str:
        return json.dumps(
            {
                "threshold": self.threshold,
                "budget": self.budget,
                "half_life_s": self.half_life_s,
                "baseline": self.baseline.to_json(),
                "record": self.record,
            },
            separators=(",", ":"),
        )

    @staticmethod
    def from_json(text: str) -> RiskCalibration:
        data = json.loads(text)
        threshold = float(data["threshold"])
        if not math.isfinite(threshold) or threshold <= 0:
            raise ValueError(f"threshold {threshold!r} is not a positive number")
        return RiskCalibration(
            threshold,
            float(data.get("budget", 1.0)),
            float(data.get("half_life_s", RiskSettings.half_life_s)),
            RiskBaseline.from_json(data.get("baseline", {})),
            dict(data.get("record", {})),
        )


def address_key(text: str) -> tuple[int, int]:
    """(hi, lo) of an address as the flow table stores it (IPv4 mapped into IPv6)."""
    import ipaddress

    ip = ipaddress.ip_address(text)
    value = (0xFFFF << 32) | int(ip) if ip.version == 4 else int(ip)
    return value >> 64, value & (2**64 - 1)


class RiskTable:
    """Decayed risk per entity and cause, and each entity's excess over its baseline."""

    def __init__(
        self,
        causes: list[str],
        direct: list[bool],
        settings: RiskSettings | None = None,
        baseline: RiskBaseline | None = None,
        threshold: float | None = None,
        track_peaks: bool = False,
    ) -> None:
        self.settings = settings or RiskSettings()
        self.causes = list(causes)
        self.cause_index = {c: i for i, c in enumerate(self.causes)}
        self.direct = np.array(direct, dtype=bool)
        self.threshold = float(threshold if threshold is not None else self.settings.threshold)
        self._half_life_ns = self.settings.half_life_s * 1e9
        n = len(self.causes)
        self.key = np.zeros(0, np.uint64)
        self.risk = np.zeros((0, n))
        self.at = np.zeros(0, np.int64)
        self.peak = np.zeros((0, n)) if track_peaks else None
        self.peak_excess = np.zeros(0) if track_peaks else None
        self.forgotten = 0  # entities dropped at max_entities
        self.set_baseline(baseline)

    def set_baseline(self, baseline: RiskBaseline | None) -> None:
        """Baselines by entity key (role, host); the site's for every other entity."""
        self._baseline = baseline
        n = len(self.causes)
        self.site = np.zeros(n)
        self.base_key = np.zeros(0, np.uint64)
        self.base = np.zeros((0, n))
        if baseline is None:
            return
        for cause, value in (baseline.site or {}).items():
            if cause in self.cause_index:
                self.site[self.cause_index[cause]] = value
        rows, keys = [], []
        for name, values in (baseline.hosts or {}).items():
            role, _, ip = name.partition(" ")
            if role not in ROLES:
                continue
            try:
                hi, lo = address_key(ip)
            except ValueError:
                continue
            host = host_hash(np.array([hi], np.uint64), np.array([lo], np.uint64))
            keys.append(entity_keys(np.array([ROLES.index(role)]), host)[0])
            row = np.zeros(n)
            for cause, value in values.items():
                if cause in self.cause_index:
                    row[self.cause_index[cause]] = value
            rows.append(row)
        if keys:
            order = np.argsort(np.array(keys, np.uint64))
            self.base_key = np.array(keys, np.uint64)[order]
            self.base = np.array(rows)[order]

    def __len__(self) -> int:
        return len(self.key)

    def ensure_causes(self, causes: list[str], direct: list[bool]) -> None:
        """Track these causes too (a rule reload may bring new ones): new columns of zeros."""
        new = [(c, d) for c, d in zip(causes, direct) if c not in self.cause_index]
        for c, d in zip(causes, direct):
            if c in self.cause_index:
                self.direct[self.cause_index[c]] = d
        if not new:
            return
        for c, d in new:
            self.cause_index[c] = len(self.causes)
            self.causes.append(c)
            self.direct = np.append(self.direct, d)
        k = len(new)
        self.risk = np.pad(self.risk, ((0, 0), (0, k)))
        if self.peak is not None:
            self.peak = np.pad(self.peak, ((0, 0), (0, k)))
        self.set_baseline(self._baseline)

    def baseline_of(self, keys: np.ndarray) -> np.ndarray:
        out = np.tile(self.site, (len(keys), 1))
        if len(self.base_key) and len(keys):
            pos = np.minimum(np.searchsorted(self.base_key, keys), len(self.base_key) - 1)
            hit = self.base_key[pos] == keys
            out[hit] = self.base[pos[hit]]
        return out

    def add(
        self, keys: np.ndarray, cause: np.ndarray, risk: np.ndarray, now_ns: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Add each evidence flow's risk (entity key, cause index, risk) at ``now_ns``. For each
        entity touched: its key, its risk per cause, its excess (over the baseline, causes that
        open directly left out) and whether a direct cause went above its baseline."""
        n = len(self.causes)
        uniq, inverse = np.unique(keys, return_inverse=True)
        inverse = inverse.reshape(-1)
        added = np.zeros((len(uniq), n))
        np.add.at(added, (inverse, cause), risk)
        pos = np.searchsorted(self.key, uniq)
        found = pos < len(self.key)
        found[found] = self.key[pos[found]] == uniq[found]
        current = np.zeros((len(uniq), n))
        if found.any():
            rows = pos[found]
            current[found] = self.risk[rows] * self._decay(self.at[rows], now_ns)[:, None]
        current += added
        if found.any():
            self.risk[pos[found]] = current[found]
            self.at[pos[found]] = now_ns
        new = ~found
        if new.any():
            self._insert(uniq[new], current[new], now_ns)
        base = self.baseline_of(uniq)
        over = current - base
        excess = np.where(self.direct, 0.0, np.maximum(over, 0.0)).sum(axis=1)
        direct = ((over > 0) & (current > 0) & self.direct).any(axis=1)
        if self.peak is not None:
            at = np.searchsorted(self.key, uniq)
            self.peak[at] = np.maximum(self.peak[at], current)
            self.peak_excess[at] = np.maximum(self.peak_excess[at], excess)
        self._bound()
        return uniq, current, excess, direct

    def _decay(self, at: np.ndarray, now_ns: int) -> np.ndarray:
        return np.exp2(-np.maximum(now_ns - at, 0) / self._half_life_ns)

    def _insert(self, keys: np.ndarray, risk: np.ndarray, now_ns: int) -> None:
        """New entities (``keys`` sorted, none present) into their places: one copy, no sort."""
        pos = np.searchsorted(self.key, keys)
        self.key = np.insert(self.key, pos, keys)
        self.risk = np.insert(self.risk, pos, risk, axis=0)
        self.at = np.insert(self.at, pos, now_ns)
        if self.peak is not None:
            self.peak = np.insert(self.peak, pos, risk, axis=0)
            self.peak_excess = np.insert(self.peak_excess, pos, 0.0)

    def _bound(self) -> None:
        extra = len(self.key) - self.settings.max_entities
        if extra <= 0:
            return
        now = int(self.at.max())
        total = self.risk.sum(axis=1) * self._decay(self.at, now)
        drop = np.argpartition(total, extra - 1)[:extra]
        keep = np.ones(len(self.key), bool)
        keep[drop] = False
        self.forgotten += extra
        self._take(np.flatnonzero(keep))

    def _take(self, index: np.ndarray) -> None:
        for name in ("key", "risk", "at", "peak", "peak_excess"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[index])

    def top(self, k: int, now_ns: int) -> list[tuple[int, float]]:
        """The k entities with the most risk now: (key, risk summed over causes)."""
        if not len(self.key):
            return []
        total = self.risk.sum(axis=1) * self._decay(self.at, now_ns)
        head = np.argpartition(-total, k - 1)[:k] if len(total) > k else np.arange(len(total))
        order = head[np.argsort(-total[head])]
        return [(int(self.key[i]), float(total[i])) for i in order]
