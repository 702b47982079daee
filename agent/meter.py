"""The flow meter: packet batches through decode, the flow table and host context to ended
flows with their feature vectors. The one extractor that the trainer and the agent share.

Replay and live capture differ only in the iterable of PacketBatches they feed it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .capture import PacketBatch
from .context import ContextConfig, HostContext
from .decode import Decoder, DecodeStats
from .features import extract
from .flowrecords import END_REASONS, FlowRecords
from .flows import FlowConfig, FlowTable


@dataclass(frozen=True)
class MeteredFlows:
    """Ended flows (in start order) and their (n, len(SCHEMA)) float32 features."""

    records: FlowRecords
    features: np.ndarray

    def __len__(self) -> int:
        return len(self.records)


@dataclass
class MeterStats:
    """Running totals of one meter (what the CLI summary and metrics report)."""

    decode: DecodeStats = field(default_factory=DecodeStats)
    flows_ended: int = 0
    ended_by_reason: dict[str, int] = field(default_factory=lambda: dict.fromkeys(END_REASONS, 0))


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

    def add(self, batch: PacketBatch) -> MeteredFlows:
        """Fold one batch; return the flows that ended."""
        packets, dstats = self.decoder.decode(batch)
        self.stats.decode.add(dstats)
        update = self.table.add(packets)
        self.context.observe(update)
        out = self._finish(update.ended)
        if self.table.now_ns is not None:
            self.context.prune(self.table.now_ns)
        return out

    def expire(self, now_ns: int) -> MeteredFlows:
        """End the flows that have timed out by ``now_ns`` (time passing without packets)."""
        out = self._finish(self.table.expire(now_ns))
        self.context.prune(now_ns)
        return out

    def flush(self) -> MeteredFlows:
        """End every open flow (end of input or shutdown) and return them."""
        return self._finish(self.table.flush())

    def _finish(self, ended: FlowRecords) -> MeteredFlows:
        ended = ended.take(np.argsort(ended["seq"], kind="stable"))
        self.stats.flows_ended += len(ended)
        counts = np.bincount(ended["end_reason"].astype(np.int64), minlength=len(END_REASONS))
        for reason, count in zip(END_REASONS, counts.tolist()):
            self.stats.ended_by_reason[reason] += count
        return MeteredFlows(ended, extract(ended, self.context.features(ended)))
