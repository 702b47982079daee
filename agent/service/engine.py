"""The agent's pipeline after the packet source: meter -> score -> rules -> incidents ->
alert lines (under the line budget) + metrics.

Replay and the live daemon both feed an Engine PacketBatches (one flow meter per interface),
call ``expire`` when time passes without packets, and ``flush`` at the end.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, cast

import numpy as np

from quietwire.agent.capture.pcap import PacketBatch
from quietwire.agent.detect.incidents import Incident, IncidentSettings, IncidentTracker
from quietwire.agent.detect.model import Scores, ScoringModel
from quietwire.agent.detect.rules import Rule, RuleEngine, RuleSet
from quietwire.agent.features.context import ContextConfig
from quietwire.agent.features.meter import BatchMeter, FlowMeter, Meter
from quietwire.agent.features.schema import MeteredFlows
from quietwire.agent.flow.records import END_REASONS, INTERIM
from quietwire.agent.flow.table import FlowConfig
from quietwire.agent.output.alerts import (
    AlertSink,
    BudgetSettings,
    LineBudget,
    eve_alerts,
    eve_incident,
)
from quietwire.agent.service.drift import calibration_table
from quietwire.agent.service.metrics import Metrics

RISK_TOP = 5  # the riskiest entities exported as metrics (by rank, not address)


class FlowLogWriter(Protocol):
    """Where every metered record goes once scored (agent/output/flowlog.py's FlowLog)."""

    def write(
        self, flows: MeteredFlows, scores: Scores, model_version: str, interface: str | None
    ) -> None: ...

    def flush(self) -> None: ...


@dataclass(frozen=True)
class EngineSettings:
    """The config sections the engine reads; None: that section's defaults."""

    flow: FlowConfig | None = None  # the flow table of each interface's meter
    context: ContextConfig | None = None  # the host context of each interface's meter
    incidents: IncidentSettings | None = None
    budget: BudgetSettings | None = None  # the alert line budget


@dataclass
class Summary:
    packets: int = 0
    bytes: int = 0
    flows: int = 0
    interim: int = 0  # interim records of flows still open (judged before their end)
    incidents: Counter = field(default_factory=Counter)  # opened, by cause
    alerts: Counter = field(default_factory=Counter)  # alert lines written, by severity
    held_back: int = 0  # alert lines the budget held back
    decode_errors: Counter = field(default_factory=Counter)
    suppressed: int = 0  # flows allowlisted, and per-flow alerts held back as repeats
    evictions: Counter = field(default_factory=Counter)  # flows ended early, by reason
    emergencies: int = 0  # times a flow table entered emergency mode
    evidence_dropped: int = 0  # evidence flows no incident could take (max_open reached)
    alert_write_errors: int = 0  # failed writes of the alert file (full disk, ...)
    alert_lines_lost: int = 0  # alert lines that never reached the file

    def line(self, seconds: float) -> str:
        causes = ", ".join(f"{k} {v}" for k, v in sorted(self.incidents.items())) or "none"
        sev = ", ".join(f"severity {k}: {v}" for k, v in sorted(self.alerts.items())) or "none"
        errors = ", ".join(f"{k} {v}" for k, v in sorted(self.decode_errors.items()) if v)
        return (
            f"{self.packets} packets, {self.flows} flows, {sum(self.incidents.values())} "
            f"incidents ({causes}), {sum(self.alerts.values())} alerts ({sev}), "
            f"{self.held_back} held back, {self.suppressed} suppressed; {seconds:.2f} s, "
            f"{self.packets / max(seconds, 1e-9):,.0f} packets/s"
            + (f"; {self.interim} interim records of open flows" if self.interim else "")
            + (f"; skipped packets: {errors}" if errors else "")
            + (
                f"; evidence dropped (incidents.max_open reached): {self.evidence_dropped}"
                if self.evidence_dropped
                else ""
            )
            + (
                f"; alert file: {self.alert_write_errors} failed writes, "
                f"{self.alert_lines_lost} lines lost"
                if self.alert_write_errors or self.alert_lines_lost
                else ""
            )
            + (
                f"; flow table: emergency mode {self.emergencies} times, ended early: "
                + ", ".join(f"{k} {v}" for k, v in sorted(self.evictions.items()))
                if self.evictions
                else ""
            )
        )


class Engine:
    def __init__(
        self,
        model: ScoringModel,
        rules: RuleSet,
        sink: AlertSink,
        metrics: Metrics | None = None,
        *,
        settings: EngineSettings = EngineSettings(),
        flow_log: FlowLogWriter | None = None,
        log: Callable[[str], None] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        """``flow_log``, when given, receives every metered record, scored; ``log`` takes the
        operational messages (the daemon's log); ``clock`` paces the alert line budget (the
        live daemon: the wall clock, which protects the SIEM; None: the traffic's own time, so
        a replay writes the same lines however fast the machine runs)."""
        self.model = model
        self.settings = settings
        self.flow_log = flow_log
        self.log = log or (lambda message: None)
        self.rules = RuleEngine(rules, model.thresholds)
        self.incidents = IncidentTracker(settings.incidents)
        self.incidents.calibrate(model.risk)
        self.budget = LineBudget(settings.budget, clock or self._traffic_clock)
        self.sink = sink
        self.metrics = metrics
        if settings.flow is not None and not settings.flow.payload:
            self.log(
                "payload statistics are off (flow.payload: false): the model's payload "
                "features are missing (NaN) for every flow, scored as if it had no payload"
            )
        self.meters: dict[str, Meter] = {}
        self._seen: dict[str, dict] = {}
        self.summary = Summary()
        # Causes whose incidents are not raised (a learning period's unknown_anomaly): their
        # lines are not written, and an incident opened while held stays held until it closes.
        self.hold_back_causes: frozenset[str] = frozenset()
        self._held_incidents: set[str] = set()
        self.held_back_incidents: Counter = Counter()  # by cause
        self._unraised_seen = 0
        if metrics:
            self._model_metrics()

    def _traffic_clock(self) -> float:
        return self.incidents.now_ns / 1e9

    def _meter(self, interface: str) -> BatchMeter:
        """The meter ``process`` feeds: the interface's own FlowMeter unless one was attached."""
        if interface not in self.meters:
            self.attach(interface, FlowMeter(self.settings.flow, self.settings.context))
        return cast(BatchMeter, self.meters[interface])

    def attach(self, interface: str, meter: Meter) -> None:
        """Meter ``interface`` with ``meter``: a FlowMeter, or what stands in for one where
        capture workers meter the packets (central.CentralMeter: its expire, drain, running
        totals and table size); their flows come in through ``handle``."""
        self.meters[interface] = meter
        self._seen[interface] = {
            "packets": 0,
            "bytes": 0,
            "errors": Counter(),
            "evictions": Counter(),
            "emergency": False,
        }

    def process(self, batch: PacketBatch, interface: str = "file") -> None:
        """Meter, score, judge and log one batch of ``interface``'s packets (a PacketBatch, or
        what an attached BatchMeter takes)."""
        meter = self._meter(interface)
        self._handle(meter.add(batch), interface)
        self._account(interface)

    def handle(self, flows: MeteredFlows, interface: str) -> None:
        """Score, judge and log flows metered elsewhere (the capture workers' central stage,
        workers.py), as ``process`` does those of its own meter; ``attach`` came first."""
        self._handle(flows, interface)
        self._account(interface)

    def expire(self, now_ns: int) -> None:
        """End flows that timed out by ``now_ns`` (the daemon calls this as time passes), and
        close the incidents that went quiet."""
        for interface, meter in self.meters.items():
            self._handle(meter.expire(now_ns), interface)
            self._account(interface)
        self._write_incidents(self.incidents.advance(now_ns))

    def flush(self) -> None:
        """End and score every open flow, and close every incident (end of input, shutdown)."""
        for interface, meter in self.meters.items():
            for part in meter.drain():
                self._handle(part, interface)
                self._account(interface)
        self._write_incidents(self.incidents.close_all())
        self.sink.flush()
        self.sink_accounting()
        if self.flow_log is not None:
            self.flow_log.flush()

    def reload(self, model: ScoringModel | None = None, rules: RuleSet | None = None) -> None:
        if model is not None:
            self.model = model
            self.incidents.calibrate(model.risk)
            if self.metrics:
                self._model_metrics()
        self.rules = self.rules.replaced(rules or self.rules.ruleset, self.model.thresholds)

    def _model_metrics(self) -> None:
        """The live model's info and thresholds; its calibration table is drift's reference."""
        m = self.model
        table = calibration_table(m.path, m.version)
        self.metrics.set_model(
            m.version, m.metadata["schema_hash"], m.score_kind, time.time(), m.thresholds, table
        )

    def _handle(self, flows: MeteredFlows, interface: str) -> None:
        if len(flows) == 0:
            return
        started = time.perf_counter()
        meter = self.meters[interface]
        if meter.emergency:  # a flood: score each distinct shape once
            scores = self.model.score_bulk(flows.features)
        elif (flood := meter.flood_flows(flows.records)).any():
            # a flood's flows still open when emergency mode ended: in bulk too
            scores = self.model.score_mixed(flows.features, flood)
        else:
            scores = self.model.score(flows.features)
        elapsed = time.perf_counter() - started
        if self.flow_log is not None:
            self.flow_log.write(
                flows, scores, self.model.version, None if interface == "file" else interface
            )
        verdicts = self.rules.evaluate(
            flows.records, flows.features, scores.score, scores.tail_probability
        )
        dropped = self.incidents.dropped
        due = self.incidents.observe(flows.records, scores, verdicts, self.model.thresholds)
        dropped = self.incidents.dropped - dropped
        self._write_incidents(due + self.incidents.advance())
        deduplicated: dict[int, int] = {}
        if self.incidents.settings.flow_alerts:
            alerts, deduplicated = self.rules.flow_alerts(verdicts, flows.records)
            if self.hold_back_causes:
                alerts = [a for a in alerts if a[1].cause not in self.hold_back_causes]
            granted = self._grant([rule.cause for _, rule, _ in alerts])
            records = eve_alerts(
                flows.records,
                scores,
                alerts[:granted],
                self.model.version,
                None if interface == "file" else interface,
            )
            self._write([(rule, record) for (_, rule, _), record in zip(alerts, records)])
        reasons = np.bincount(
            flows.records["end_reason"].astype(np.int64), minlength=len(END_REASONS)
        )
        s = self.summary
        s.flows += len(flows) - int(reasons[INTERIM])
        s.interim += int(reasons[INTERIM])
        s.suppressed += sum(verdicts.suppressed_by_rule.values())
        s.suppressed += sum(deduplicated.values())
        s.evidence_dropped += dropped
        m = self.metrics
        if m is None:
            return
        if dropped:
            m.evidence_dropped.inc(dropped)
        m.scoring_seconds.observe(elapsed)
        m.score.observe_many(scores.score)
        m.drift.observe(scores.score)
        for rid, count in verdicts.suppressed_by_rule.items():
            m.suppressed.labels(str(rid), "allowlist").inc(count)
        for rid, count in deduplicated.items():
            m.suppressed.labels(str(rid), "repeat").inc(count)
        for reason, count in zip(END_REASONS, reasons.tolist()):
            if count and reason != "interim":
                m.flows.labels(reason).inc(count)
        m.interim_records.inc(int(reasons[INTERIM]))

    def _write_incidents(self, due: list[tuple[Incident, str]]) -> None:
        """Incident lines, as far as the budget allows (opened incidents count either way)."""
        if self.hold_back_causes or self._held_incidents:
            due = self._hold_back(due)
        for inc, state in due:
            if state == "open" and not inc.counted:  # a held-back open line comes again
                inc.counted = True
                self.summary.incidents[inc.cause] += 1
                if self.metrics:
                    self.metrics.incidents.labels(inc.cause).inc()
        granted = self._grant([inc.cause for inc, _ in due])
        cap = self.incidents.settings.distinct_cap
        self._write(
            [
                (inc.rule, eve_incident(inc, state, self.model.version, cap))
                for inc, state in due[:granted]
            ]
        )
        if self.metrics:
            self._risk_metrics()

    def _risk_metrics(self) -> None:
        m, tracker = self.metrics, self.incidents
        m.open_incidents.set(len(tracker.open))
        m.risk_threshold.set(tracker.threshold)
        cal = tracker.calibration
        m.incident_budget.set(cal.budget if cal else 0.0)  # 0: no fitted threshold
        m.risk_entities.set(len(tracker.risk))
        top = tracker.risk.top(RISK_TOP, tracker.now_ns)
        for rank in range(RISK_TOP):
            m.entity_risk.labels(str(rank + 1)).set(top[rank][1] if rank < len(top) else 0.0)
        unraised = tracker.quiet_unraised - self._unraised_seen
        if unraised:
            m.incidents_unraised.inc(unraised)
            self._unraised_seen = tracker.quiet_unraised

    def _hold_back(self, due: list[tuple[Incident, str]]) -> list[tuple[Incident, str]]:
        """Drop the lines of held incidents; count each held incident once, when it opens. A
        held incident whose cause is no longer held back (its entity's evidence turned out to
        be a named cause) is released: its next line is its open line."""
        kept = []
        for inc, state in due:
            if inc.id in self._held_incidents and inc.cause not in self.hold_back_causes:
                self._held_incidents.discard(inc.id)
                if state != "close" or inc.lines:
                    kept.append((inc, "open" if inc.lines == 0 else state))
                continue
            if inc.id not in self._held_incidents and not (
                state == "open" and not inc.counted and inc.cause in self.hold_back_causes
            ):
                kept.append((inc, state))
                continue
            if inc.id not in self._held_incidents:
                self._held_incidents.add(inc.id)
                self.held_back_incidents[inc.cause] += 1
                if self.metrics:
                    self.metrics.learning_held_back.labels(inc.cause).inc()
            if state == "close":
                self._held_incidents.discard(inc.id)
        return kept

    def _grant(self, causes: list[str]) -> int:
        """How many of these lines the budget lets through; the rest are counted by cause."""
        granted = self.budget.grant(causes)
        held = causes[granted:]
        self.summary.held_back += len(held)
        if self.metrics and held:
            for cause, count in Counter(held).items():
                self.metrics.held_back.labels(cause).inc(count)
        return granted

    def sink_accounting(self) -> None:
        """The alert sink's failures into the summary and the metrics (as deltas); after
        writes, and once more after the sink is closed (what it never wrote is lost)."""
        s, sink = self.summary, self.sink
        errors, lost = sink.errors - s.alert_write_errors, sink.dropped - s.alert_lines_lost
        s.alert_write_errors, s.alert_lines_lost = sink.errors, sink.dropped
        if self.metrics:
            if errors:
                self.metrics.alert_write_errors.inc(errors)
            if lost:
                self.metrics.alert_lines_dropped.inc(lost)
            self.metrics.alert_lines_queued.set(sink.queued)

    def _write(self, lines: list[tuple[Rule, dict]]) -> None:
        if not lines:
            return
        self.budget.note(lines[0][1])
        self.sink.write([record for _, record in lines])
        self.sink_accounting()
        for rule, _ in lines:
            self.summary.alerts[rule.severity] += 1
            if self.metrics:
                self.metrics.alerts.labels(str(rule.severity), str(rule.id)).inc()

    def _account(self, interface: str) -> None:
        """Fold the meter's running totals into the summary and the metrics (as deltas)."""
        meter, seen = self.meters[interface], self._seen[interface]
        st = meter.stats.decode
        d_packets, d_bytes = st.packets - seen["packets"], st.bytes - seen["bytes"]
        d_errors = st.errors - seen["errors"]
        d_evicted = Counter(meter.evictions)
        d_evicted.subtract(seen["evictions"])
        seen.update(
            packets=st.packets,
            bytes=st.bytes,
            errors=Counter(st.errors),
            evictions=Counter(meter.evictions),
        )
        s = self.summary
        s.packets += d_packets
        s.bytes += d_bytes
        s.decode_errors.update(d_errors)
        s.evictions.update(+d_evicted)
        if meter.emergency != seen["emergency"]:
            seen["emergency"] = meter.emergency
            table = meter.table
            if meter.emergency:
                s.emergencies += 1
                if self.metrics:
                    self.metrics.emergency_starts.labels(interface).inc()
                self.log(
                    f"{interface}: flow table emergency mode on ({len(table):,} flows open of "
                    f"{table.config.max_flows:,}): unanswered flows end after "
                    f"{table.config.emergency_unanswered_timeout_s:g} s idle, the others after "
                    f"{table.config.emergency_idle_timeout_s:g} s; flows are scored in bulk"
                )
            else:
                self.log(
                    f"{interface}: flow table emergency mode off ({len(table):,} flows open); "
                    "ended early so far: "
                    + ", ".join(f"{k} {v:,}" for k, v in sorted(meter.evictions.items()))
                )
        m = self.metrics
        if m is None:
            return
        m.packets.labels(interface).inc(d_packets)
        m.bytes.labels(interface).inc(d_bytes)
        for reason, count in d_errors.items():
            m.decode_errors.labels(reason).inc(count)
        for reason, count in d_evicted.items():
            if count > 0:
                m.evictions.labels(reason).inc(count)
        m.emergency.labels(interface).set(int(meter.emergency))
        m.emergency_starts.labels(interface).inc(0)  # present from the first batch
        m.active_flows.set(sum(len(x.table) for x in self.meters.values()))
