"""The agent's pipeline after the packet source: meter -> score -> rules -> alerts + metrics.

Replay and the live daemon both feed an Engine PacketBatches (one flow meter per interface),
call ``expire`` when time passes without packets, and ``flush`` at the end.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .alerts import AlertSink, eve_alerts
from .capture import PacketBatch
from .context import ContextConfig
from .flowrecords import END_REASONS
from .flows import FlowConfig
from .meter import FlowMeter, MeteredFlows
from .metrics import Metrics
from .model import ScoringModel
from .rules import RuleEngine, RuleSet


@dataclass
class Summary:
    packets: int = 0
    bytes: int = 0
    flows: int = 0
    alerts: Counter = field(default_factory=Counter)  # by severity
    decode_errors: Counter = field(default_factory=Counter)
    suppressed: int = 0

    def line(self, seconds: float) -> str:
        sev = ", ".join(f"severity {k}: {v}" for k, v in sorted(self.alerts.items())) or "none"
        errors = ", ".join(f"{k} {v}" for k, v in sorted(self.decode_errors.items()) if v)
        return (
            f"{self.packets} packets, {self.flows} flows, {sum(self.alerts.values())} alerts "
            f"({sev}), {self.suppressed} suppressed; {seconds:.2f} s, "
            f"{self.packets / max(seconds, 1e-9):,.0f} packets/s"
            + (f"; skipped packets: {errors}" if errors else "")
        )


class Engine:
    def __init__(
        self,
        model: ScoringModel,
        rules: RuleSet,
        sink: AlertSink,
        metrics: Metrics | None = None,
        flow_config: FlowConfig | None = None,
        context_config: ContextConfig | None = None,
    ) -> None:
        self.model = model
        self.rules = RuleEngine(rules, model.thresholds)
        self.sink = sink
        self.metrics = metrics
        self.flow_config = flow_config
        self.context_config = context_config
        self.meters: dict[str, FlowMeter] = {}
        self._seen: dict[str, dict] = {}
        self.summary = Summary()
        if metrics:
            metrics.set_model(
                model.version, model.metadata["schema_hash"], model.score_kind, time.time()
            )

    def _meter(self, interface: str) -> FlowMeter:
        if interface not in self.meters:
            self.meters[interface] = FlowMeter(self.flow_config, self.context_config)
            self._seen[interface] = {"packets": 0, "bytes": 0, "errors": Counter(), "evicted": 0}
        return self.meters[interface]

    def process(self, batch: PacketBatch, interface: str = "file") -> None:
        meter = self._meter(interface)
        self._handle(meter.add(batch), interface)
        self._account(interface)

    def expire(self, now_ns: int) -> None:
        """End flows that timed out by ``now_ns`` (the daemon calls this as time passes)."""
        for interface, meter in self.meters.items():
            self._handle(meter.expire(now_ns), interface)
            self._account(interface)

    def flush(self) -> None:
        """End and score every open flow (end of input, shutdown)."""
        for interface, meter in self.meters.items():
            self._handle(meter.flush(), interface)
            self._account(interface)
        self.sink.flush()

    def reload(self, model: ScoringModel | None = None, rules: RuleSet | None = None) -> None:
        if model is not None:
            self.model = model
            if self.metrics:
                self.metrics.set_model(
                    model.version, model.metadata["schema_hash"], model.score_kind, time.time()
                )
        self.rules = self.rules.replaced(rules or self.rules.ruleset, self.model.thresholds)

    def _handle(self, flows: MeteredFlows, interface: str) -> None:
        if len(flows) == 0:
            return
        started = time.perf_counter()
        scores = self.model.score(flows.features)
        elapsed = time.perf_counter() - started
        verdicts = self.rules.evaluate(
            flows.records, flows.features, scores.score, scores.tail_probability
        )
        records = eve_alerts(
            flows.records,
            scores,
            verdicts.alerts,
            self.model.version,
            None if interface == "file" else interface,
        )
        self.sink.write(records)
        s = self.summary
        s.flows += len(flows)
        for _, rule, _ in verdicts.alerts:
            s.alerts[rule.severity] += 1
        s.suppressed += sum(verdicts.suppressed_by_rule.values())
        s.suppressed += sum(verdicts.deduplicated_by_rule.values())
        m = self.metrics
        if m is None:
            return
        m.scoring_seconds.observe(elapsed)
        for value in scores.score.tolist():
            m.score.observe(value)
        for _, rule, _ in verdicts.alerts:
            m.alerts.labels(str(rule.severity), str(rule.id)).inc()
        for rid, count in verdicts.suppressed_by_rule.items():
            m.suppressed.labels(str(rid), "allowlist").inc(count)
        for rid, count in verdicts.deduplicated_by_rule.items():
            m.suppressed.labels(str(rid), "repeat").inc(count)
        reasons = np.bincount(
            flows.records["end_reason"].astype(np.int64), minlength=len(END_REASONS)
        )
        for reason, count in zip(END_REASONS, reasons.tolist()):
            if count:
                m.flows.labels(reason).inc(count)

    def _account(self, interface: str) -> None:
        """Fold the meter's running totals into the summary and the metrics (as deltas)."""
        meter, seen = self.meters[interface], self._seen[interface]
        st = meter.stats.decode
        d_packets, d_bytes = st.packets - seen["packets"], st.bytes - seen["bytes"]
        d_errors = st.errors - seen["errors"]
        d_evicted = meter.table.evicted - seen["evicted"]
        seen.update(
            packets=st.packets,
            bytes=st.bytes,
            errors=Counter(st.errors),
            evicted=meter.table.evicted,
        )
        self.summary.packets += d_packets
        self.summary.bytes += d_bytes
        self.summary.decode_errors.update(d_errors)
        m = self.metrics
        if m is None:
            return
        m.packets.labels(interface).inc(d_packets)
        m.bytes.labels(interface).inc(d_bytes)
        for reason, count in d_errors.items():
            m.decode_errors.labels(reason).inc(count)
        if d_evicted:
            m.evictions.inc(d_evicted)
        m.active_flows.set(sum(len(x.table) for x in self.meters.values()))
