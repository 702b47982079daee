"""The capture workers' central stage, one per interface: it merges what the workers' flow
tables report (flow starts, first answers, ended flows and interim records, as columns) into
one host context and computes the features, so that the Engine downstream sees what one
FlowMeter would have made of all the interface's packets.

Host context and series features need every flow of a host in start order, and workers run
at their own pace, so nothing is merged before every worker has passed its time: each worker
reports a watermark (no packet of its share is older), and the central stage takes flow starts
up to the lowest watermark, in start-time order (workers by index, then their own order, for
equal times), giving each its global ``seq``; then the ended flows up to it. A flow's window
counts only starts up to its last packet, so its features are those of one meter's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from quietwire.agent.capture.decode import DecodeStats
from quietwire.agent.features.context import ContextConfig
from quietwire.agent.features.meter import DRAIN_CHUNK, FlowMeter
from quietwire.agent.features.schema import FEATURE_NAMES, MeteredFlows
from quietwire.agent.flow.records import INTERIM, NEVER, FlowRecords, FlowUpdate, empty_records
from quietwire.agent.flow.table import EVICTION_REASONS, FlowConfig

# Ended flows and starts held for a worker that lags; past this many the lagging worker's
# watermark is not waited for (its late starts then miss some flows' host windows), counted.
DEFAULT_MAX_PENDING = 1_000_000


@dataclass
class WorkerReport:
    """One message of a worker's flow table: the starts, first answers and ended flows (and
    interim records) of a batch or an expiry, with the worker's local ``seq`` numbers."""

    started: FlowRecords  # START_COLUMNS
    answered_seq: np.ndarray
    answered_ns: np.ndarray
    ended: FlowRecords  # every column
    watermark_ns: int  # no later packet of this worker's share is older (NEVER: finished)
    prune_ns: int  # host context older than this minus the window is no longer needed
    totals: dict = field(default_factory=dict)  # running totals (see CentralMeter.receive)


class _Source:
    """What the central stage keeps of one worker (one process lifetime)."""

    def __init__(self) -> None:
        self.watermark = -NEVER
        self.prune = -NEVER
        self.starts: list[FlowRecords] = []  # not yet merged, in local seq order
        self.ended: list[FlowRecords] = []
        # local seq -> global seq of the merged flows still open, local seq increasing
        self.local = np.zeros(0, np.int64)
        self.glob = np.zeros(0, np.int64)
        self.alive = np.zeros(0, bool)
        self.totals: dict = {}
        self.finished = False

    def pending(self) -> int:
        return sum(len(p) for p in self.starts) + sum(len(p) for p in self.ended)

    def lookup(self, seq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global seq of merged flows by local seq, and which were found."""
        if not len(self.local):
            return np.zeros(len(seq), np.int64), np.zeros(len(seq), bool)
        pos = np.minimum(np.searchsorted(self.local, seq), len(self.local) - 1)
        hit = (self.local[pos] == seq) & self.alive[pos]
        return self.glob[pos], hit

    def forget(self, seq: np.ndarray) -> None:
        """Flows that ended: their mapping goes (compacted when half is dead)."""
        if len(seq) and len(self.local):
            pos = np.minimum(np.searchsorted(self.local, seq), len(self.local) - 1)
            self.alive[pos[self.local[pos] == seq]] = False
        if len(self.alive) > 4096 and self.alive.sum() * 2 < len(self.alive):
            keep = self.alive
            self.local, self.glob, self.alive = self.local[keep], self.glob[keep], keep[keep]


class _TableView:
    """What the Engine reads of a flow table: how many flows are open, and the config."""

    def __init__(self, config: FlowConfig) -> None:
        self.config = config
        self.open = 0

    def __len__(self) -> int:
        return self.open


class CentralMeter:
    """One interface's merge of its workers' flow tables, with the host context and the
    features; the Engine uses it as the interface's meter (Engine.attach)."""

    def __init__(
        self,
        flow_config: FlowConfig | None = None,
        context_config: ContextConfig | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> None:
        self._meter = FlowMeter(flow_config, context_config)
        self.context = self._meter.context
        self.table = _TableView(self._meter.table.config)
        self.max_pending = max_pending
        self.sources: dict[object, _Source] = {}
        self.stats = self._meter.stats
        self._finished_totals: list[dict] = []
        self._next_seq = 0
        self.forced_merges = 0  # times a lagging worker was not waited for (max_pending)
        self.lost_flows = 0  # open flows of workers that died

    # ---- what the Engine reads ----------------------------------------------------------
    @property
    def emergency(self) -> bool:
        return any(s.totals.get("emergency", False) for s in self.sources.values())

    def flood_flows(self, flows) -> np.ndarray:
        """Flows to score in bulk: all while a worker's table is in emergency mode."""
        return np.full(len(flows), self.emergency)

    @property
    def evictions(self) -> Counter:
        out = Counter(dict.fromkeys(EVICTION_REASONS, 0))
        for t in [*self._finished_totals, *(s.totals for s in self.sources.values())]:
            out.update(t.get("evictions", {}))
        return out

    def expire(self, now_ns: int) -> MeteredFlows:
        """Whatever the workers' watermarks now allow (they expire their own tables)."""
        return self.merge()

    def drain(self, chunk: int = DRAIN_CHUNK) -> Iterator[MeteredFlows]:
        """Everything still held (after every worker finished, or when shutting down)."""
        for source in self.sources.values():
            source.watermark = NEVER
        flows = self.merge()
        for lo in range(0, len(flows), chunk):
            yield MeteredFlows(
                flows.records.take(slice(lo, lo + chunk)), flows.features[lo : lo + chunk]
            )

    # ---- workers ------------------------------------------------------------------------
    def add_source(self, key: object) -> None:
        """A worker (process lifetime) starts reporting; nothing merges before it reports."""
        self.sources[key] = _Source()

    def receive(self, key: object, report: WorkerReport) -> None:
        """File one report of worker ``key`` (merged by ``merge``)."""
        s = self.sources[key]
        if len(report.started):
            s.starts.append(report.started)
        if len(report.answered_seq):
            self._answers(s, report.answered_seq, report.answered_ns)
        if len(report.ended):
            s.ended.append(report.ended)
        s.watermark = max(s.watermark, report.watermark_ns)
        s.prune = max(s.prune, report.prune_ns)
        if report.totals:
            s.totals = report.totals
            self._update_totals()

    def finish_source(self, key: object, lost: bool = False) -> None:
        """A worker ended (drained, or died: ``lost``); what it sent still merges, its open
        flows are forgotten (counted in ``lost_flows`` when it died)."""
        s = self.sources[key]
        s.watermark = s.prune = NEVER
        s.finished = True
        if lost:
            self.lost_flows += int(s.alive.sum()) + sum(len(p) for p in s.starts)

    def merge(self) -> MeteredFlows:
        """Starts and ended flows up to the lowest watermark, with their features."""
        if not self.sources:
            return _no_flows()
        mark = min(s.watermark for s in self.sources.values())
        if sum(s.pending() for s in self.sources.values()) > self.max_pending:
            mark = max(s.watermark for s in self.sources.values())
            self.forced_merges += 1
        self._merge_starts(mark)
        ended = self._take_ended(mark)
        self._meter.context.observe(
            FlowUpdate(ended, empty_records(), np.zeros(0, np.int64), np.zeros(0, np.int64))
        )
        out = self._meter.finish(ended) if len(ended) else _no_flows()
        prune = min(min(s.prune for s in self.sources.values()), mark)
        if -NEVER < prune < NEVER:
            self.context.prune(prune)
        for key in [k for k, s in self.sources.items() if s.finished]:
            s = self.sources[key]
            if not s.pending():
                # the open flows of a worker that died never end: drop their series values
                forgotten = s.glob[s.alive]
                self.context._series.take(forgotten, forget=np.ones(len(forgotten), bool))
                self._finished_totals.append(s.totals)
                del self.sources[key]
        return out

    def _answers(self, s: _Source, seq: np.ndarray, ns: np.ndarray) -> None:
        glob, rest = s.lookup(seq)
        if rest.any():
            self.context.observe(FlowUpdate(empty_records(), empty_records(), glob[rest], ns[rest]))
        rest = ~rest
        for part in s.starts:  # first answers of flows whose start is still held
            if not rest.any():
                break
            pos = np.minimum(np.searchsorted(part["seq"], seq), len(part) - 1)
            there = rest & (part["seq"][pos] == seq)
            np.minimum.at(part["answered_ns"], pos[there], ns[there])
            rest &= ~there

    def _merge_starts(self, mark: int) -> None:
        parts, owners = [], []
        for index, s in enumerate(self.sources.values()):
            if not s.starts:
                continue
            held = FlowRecords.concat(s.starts)
            late = np.flatnonzero(held["first_ns"] > mark)
            # a prefix in the worker's own order, so its seq mapping stays sorted
            cut = int(late[0]) if len(late) else len(held)
            if cut == 0:
                s.starts = [held]
                continue
            parts.append(held.take(slice(0, cut)))
            owners.append((index, s))
            s.starts = [held.take(slice(cut, None))] if cut < len(held) else []
        if not parts:
            return
        started = FlowRecords.concat(parts)
        worker = np.concatenate([np.full(len(p), i) for (i, _), p in zip(owners, parts)])
        local = started["seq"].copy()
        order = np.lexsort((local, worker, started["first_ns"]))
        glob = np.empty(len(order), np.int64)
        glob[order] = np.arange(self._next_seq, self._next_seq + len(order))
        self._next_seq += len(order)
        lo = 0
        for (_, s), p in zip(owners, parts):
            hi = lo + len(p)
            s.local = np.concatenate([s.local, local[lo:hi]])
            s.glob = np.concatenate([s.glob, glob[lo:hi]])
            s.alive = np.concatenate([s.alive, np.ones(hi - lo, bool)])
            lo = hi
        started.columns["seq"] = glob
        in_order = started.take(order)
        empty = np.zeros(0, np.int64)
        self.context.observe(FlowUpdate(empty_records(), in_order, empty, empty))

    def _take_ended(self, mark: int) -> FlowRecords:
        parts = []
        for s in self.sources.values():
            if not s.ended:
                continue
            held = FlowRecords.concat(s.ended)
            glob, merged = s.lookup(held["seq"])
            ready = merged & (held["last_ns"] <= mark)
            s.ended = [held.take(~ready)] if not ready.all() else []
            if not ready.any():
                continue
            part = held.take(ready)
            s.forget(part["seq"][part["end_reason"] != INTERIM])
            part.columns["seq"] = glob[ready]
            parts.append(part)
        return FlowRecords.concat(parts)

    def _update_totals(self) -> None:
        """Decode totals and open flows: the finished workers' plus the live ones' latest."""
        everything = [*self._finished_totals, *(s.totals for s in self.sources.values())]
        d = DecodeStats()
        for t in everything:
            d.packets += t.get("packets", 0)
            d.bytes += t.get("bytes", 0)
            d.decoded += t.get("decoded", 0)
            d.errors.update(t.get("errors", {}))
        self.stats.decode = d
        self.table.open = sum(s.totals.get("open", 0) for s in self.sources.values())


def _no_flows() -> MeteredFlows:
    return MeteredFlows(empty_records(), np.zeros((0, len(FEATURE_NAMES)), np.float32))
