"""The flow meter: packet batches through decode, the flow table and host context to ended
flows with their feature vectors. The one extractor that the trainer and the agent share.

Replay and live capture differ only in the iterable of PacketBatches they feed it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from quietwire.agent.capture.decode import Decoder, DecodeStats
from quietwire.agent.capture.pcap import PacketBatch
from quietwire.agent.features.context import ContextConfig, HostContext
from quietwire.agent.features.schema import FEATURE_NAMES, MeteredFlows, extract
from quietwire.agent.flow.records import END_REASONS, INTERIM, NS, FlowRecords
from quietwire.agent.flow.table import FlowConfig, FlowTable

# Features are computed this many flows at a time, so that a flush of a full table (or a mass
# expiry) holds the records and the float32 matrix, not every float64 intermediate at once.
FEATURE_CHUNK = 1 << 16
DRAIN_CHUNK = 1 << 16  # flows ended at a time by drain()


@dataclass
class MeterStats:
    """Running totals of one meter (what the CLI summary and metrics report)."""

    decode: DecodeStats = field(default_factory=DecodeStats)
    flows_ended: int = 0
    interim_records: int = 0
    ended_by_reason: dict[str, int] = field(default_factory=lambda: dict.fromkeys(END_REASONS, 0))


class DecodeTotals(Protocol):
    """Running decode totals of a meter (DecodeStats or a stand-in)."""

    @property
    def packets(self) -> int:
        """Packets seen."""
        ...

    @property
    def bytes(self) -> int:
        """Bytes on the wire of the packets seen."""
        ...

    @property
    def errors(self) -> Counter:
        """Packets dropped, by decode.DECODE_ERROR_REASONS."""
        ...


class MeterTotals(Protocol):
    """A meter's running totals as the Engine reads them (MeterStats or a stand-in)."""

    @property
    def decode(self) -> DecodeTotals:
        """What the decoder saw and dropped."""
        ...


class TableSize(Protocol):
    """What the Engine reads of a meter's flow table: its size and its settings."""

    @property
    def config(self) -> FlowConfig:
        """The table's limits and timeouts (max_flows, emergency mode's timeouts)."""
        ...

    def __len__(self) -> int:
        """Flows open now."""
        ...


class Meter(Protocol):
    """What the service's Engine needs of the meter of one interface (Engine.attach): a
    FlowMeter, or what stands in for one where the packets are metered elsewhere
    (central.CentralMeter, whose flows come in through Engine.handle, and
    filepool.PlaybackMeter, which replays a worker's meter).

    The Engine ends flows through ``expire`` and ``drain`` and, after each call, folds the
    running totals (``stats``, ``evictions``, ``emergency``, ``len(table)``) into its summary
    and metrics as deltas, so the totals only grow.
    """

    @property
    def emergency(self) -> bool:
        """The flow table is in emergency mode now: flows are scored in bulk."""
        ...

    @property
    def evictions(self) -> Counter:
        """Flows ended early under table pressure so far, by expiry.EVICTION_REASONS."""
        ...

    @property
    def stats(self) -> MeterTotals:
        """Running totals (packets, bytes and decode errors)."""
        ...

    @property
    def table(self) -> TableSize:
        """The flow table's size and settings."""
        ...

    def flood_flows(self, flows: FlowRecords) -> np.ndarray:
        """Which of ``flows`` (the records of flows this meter just returned) started in a
        flood, that is while the flow table was in emergency mode: scored in bulk."""
        ...

    def expire(self, now_ns: int) -> MeteredFlows:
        """End the flows timed out by ``now_ns`` (time passing without packets), with the
        interim records then due."""
        ...

    def drain(self) -> Iterator[MeteredFlows]:
        """End every open flow (end of input or shutdown), in parts."""
        ...


class BatchMeter(Meter, Protocol):
    """A Meter that the Engine feeds itself (Engine.process): a FlowMeter, or
    filepool.PlaybackMeter with a worker's replay steps."""

    def add(self, batch: Any) -> MeteredFlows:
        """Meter one batch (a PacketBatch for a FlowMeter); return the flows that ended and
        the interim records due."""
        ...


class FlowMeter:
    """Decoder + FlowTable + HostContext + features: feed PacketBatches, get MeteredFlows."""

    def __init__(
        self,
        flow_config: FlowConfig | None = None,
        context_config: ContextConfig | None = None,
        seed: int | None = None,
    ) -> None:
        self.decoder = Decoder()
        self.table = FlowTable(flow_config, seed=seed)
        self.context = HostContext(context_config, retain_s=self.table.config.idle_timeout_s)
        self.stats = MeterStats()

    @property
    def emergency(self) -> bool:
        """The flow table is in emergency mode now (see table.FlowConfig)."""
        return self.table.emergency

    def flood_flows(self, flows: FlowRecords) -> np.ndarray:
        """Which flows started while the flow table was in emergency mode (a flood's: scored
        in bulk, see model.score_bulk, also when they end after the mode did)."""
        return self.table.flood_flows(flows["seq"])

    @property
    def emergency_started(self) -> int:
        """How many times the flow table's emergency mode started."""
        return self.table.emergency_started

    @property
    def evictions(self) -> Counter:
        """Flows ended early under table pressure, by expiry.EVICTION_REASONS."""
        return self.table.evictions

    def add(self, batch: PacketBatch) -> MeteredFlows:
        """Fold one batch; return the flows that ended."""
        packets, dstats = self.decoder.decode(batch)
        self.stats.decode.add(dstats)
        update = self.table.add(packets)
        self.context.observe(update)
        ended = update.ended
        if self.table.now_ns is not None:
            ended = FlowRecords.concat([ended, self.table.snapshot(self.table.now_ns)])
        out = self._finish(ended)
        if self.table.now_ns is not None:
            self._prune(self.table.now_ns)
        return out

    def expire(self, now_ns: int) -> MeteredFlows:
        """End the flows that have timed out by ``now_ns`` (time passing without packets),
        and report those due an interim record."""
        ended = self.table.expire(now_ns)
        out = self._finish(FlowRecords.concat([ended, self.table.snapshot(now_ns)]))
        self._prune(now_ns)
        return out

    def flush(self, limit: int | None = None) -> MeteredFlows:
        """End every open flow (end of input or shutdown) and return them; with ``limit``,
        only that many (the longest idle): call again until ``len(meter.table)`` is 0."""
        return self._finish(self.table.flush(limit))

    def drain(self, chunk: int = DRAIN_CHUNK) -> Iterator[MeteredFlows]:
        """End every open flow, ``chunk`` at a time (longest idle first), so a full table's
        end of input holds one chunk's records and features at once, not all of them."""
        while len(self.table):
            yield self.flush(limit=chunk)

    def finish(self, ended: FlowRecords) -> MeteredFlows:
        """Features of flows that ended in another flow table (a capture worker's; see
        central.py): their starts and first answers must be in ``self.context`` already."""
        return self._finish(ended)

    def _prune(self, now_ns: int) -> None:
        # Flows the table left overdue for a later call still need the starts of their window.
        overdue = self.table.overdue_last_ns
        if overdue is not None:
            now_ns = min(now_ns, overdue + int(self.table.config.idle_timeout_s * NS))
        self.context.prune(now_ns)

    def _finish(self, ended: FlowRecords) -> MeteredFlows:
        if (np.diff(ended["seq"]) < 0).any():  # each part of the table's output is in order
            order = np.argsort(ended["seq"], kind="stable")
            for name, column in ended.columns.items():  # one column held twice at a time
                ended.columns[name] = column[order]
        counts = np.bincount(ended["end_reason"].astype(np.int64), minlength=len(END_REASONS))
        for reason, count in zip(END_REASONS, counts.tolist()):
            self.stats.ended_by_reason[reason] += count
        self.stats.interim_records += int(counts[INTERIM])
        self.stats.flows_ended += len(ended) - int(counts[INTERIM])
        features = np.empty((len(ended), len(FEATURE_NAMES)), dtype=np.float32)
        for lo in range(0, len(ended), FEATURE_CHUNK):
            part = ended.take(slice(lo, lo + FEATURE_CHUNK))
            features[lo : lo + FEATURE_CHUNK] = extract(part, self.context.features(part))
        return MeteredFlows(ended, features)
