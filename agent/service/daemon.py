"""The two ways the agent runs: ``replay`` (capture files, as fast as possible or in real time)
and ``run`` (the daemon: live interfaces, SIGTERM = drain and exit 0, SIGHUP = reload rules and
model, keeping the old ones if the new ones are broken, and reopen the alert file and the flow
log; a learning period, learning.py, when configured)."""

from __future__ import annotations

import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from quietwire.agent.capture.live import LiveCapture
from quietwire.agent.capture.pcap import CaptureError, read_capture
from quietwire.agent.detect.incidents import IncidentSettings
from quietwire.agent.detect.model import ModelError, ScoringModel
from quietwire.agent.detect.rules import RuleError, load_rules
from quietwire.agent.features.context import ContextConfig
from quietwire.agent.flow.table import FlowConfig
from quietwire.agent.output.alerts import AlertSink, BudgetSettings
from quietwire.agent.output.flowlog import FlowLog, FlowLogSettings
from quietwire.agent.service.config import Settings
from quietwire.agent.service.engine import Engine
from quietwire.agent.service.metrics import Metrics, MetricsServer, ServerSettings
from quietwire.agent.site.learning import Learner


def log(message: str) -> None:
    print(f"quietwire: {message}", file=sys.stderr, flush=True)


@dataclass
class ReplayOptions:
    files: list[Path]
    model: Path
    rules: Path
    alerts: Path | None
    stdout: bool
    realtime: bool = False
    speed: float = 1.0
    serve: ServerSettings | None = None
    flow: FlowConfig | None = None
    context: ContextConfig | None = None
    incidents: IncidentSettings | None = None
    budget: BudgetSettings | None = None
    flow_log: FlowLogSettings | None = None
    workers: int = 1  # > 1: files metered in that many processes (agent/parallel/filepool.py)


def replay(opts: ReplayOptions) -> int:
    """Score every flow of the files; 0, or 1 if a file was damaged (its flows still count)."""
    model = ScoringModel(opts.model)
    rules = load_rules(opts.rules)
    metrics = Metrics() if opts.serve else None
    server = MetricsServer(metrics, opts.serve) if opts.serve else None
    if server:
        log(f"metrics on http://{opts.serve.listen}:{server.port}/metrics")
    sink = AlertSink(opts.alerts, stdout=opts.stdout)
    flow_log = FlowLog(opts.flow_log, metrics, log) if opts.flow_log else None
    engine = Engine(
        model,
        rules,
        sink,
        metrics,
        opts.flow,
        opts.context,
        opts.incidents,
        opts.budget,
        log=log,
        flow_log=flow_log,
    )
    failed = False
    started = time.perf_counter()
    if opts.workers > 1 and len(opts.files) > 1 and not opts.realtime:
        from quietwire.agent.parallel.filepool import replay_files

        failed = replay_files(engine, opts, log)
    for path in opts.files if opts.workers <= 1 or opts.realtime else ():
        chunk = (256 << 10) if opts.realtime else (8 << 20)
        pacer = _Pacer(opts.speed) if opts.realtime else None
        try:
            for batch in read_capture(path, chunk_bytes=chunk):
                if pacer and len(batch):
                    pacer.wait(int(batch.ts_ns[-1]))
                engine.process(batch, "file")
        except CaptureError as exc:
            log(f"error: {exc}")
            failed = True
        engine.flush()  # each file is its own time line
        engine.meters.clear()
    sink.close()
    if flow_log:
        flow_log.close()
    elapsed = time.perf_counter() - started
    print(f"replay: {engine.summary.line(elapsed)}", file=sys.stderr)
    if flow_log:
        print(f"replay: {_flow_log_line(flow_log)}", file=sys.stderr)
    if server:
        log("replay done; still serving metrics (Ctrl-C or SIGTERM to stop)")
        _wait_for_signal()
        server.close()
    return 1 if failed else 0


class _Pacer:
    """Sleeps so packets are processed no earlier than their capture time allows."""

    def __init__(self, speed: float) -> None:
        self.speed = speed
        self.first: int | None = None
        self.wall0 = time.monotonic()

    def wait(self, ts_ns: int) -> None:
        if self.first is None:
            self.first = ts_ns
            return
        due = (ts_ns - self.first) / 1e9 / self.speed
        delay = due - (time.monotonic() - self.wall0)
        if delay > 0:
            time.sleep(delay)


def _flow_log_line(flow_log: FlowLog) -> str:
    line = f"flow log {flow_log.settings.path}: {flow_log.lines} records, {flow_log.bytes:,} bytes"
    if flow_log.errors:
        line += f"; {flow_log.errors} errors, {flow_log.dropped} records dropped"
    return line


def _wait_for_signal() -> None:
    stop = {"flag": False}

    def handler(signum, frame) -> None:
        stop["flag"] = True

    old = signal.signal(signal.SIGTERM, handler)
    try:
        while not stop["flag"]:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, old)


def run(settings: Settings, config_path: Path) -> int:
    """The daemon loop. Returns 0 after a clean SIGTERM/SIGINT shutdown."""
    from quietwire.agent.service.config import ConfigError, load_config

    model = ScoringModel(settings.model)
    rules = load_rules(settings.rules)
    metrics = Metrics()
    learner = None
    if settings.learn:  # config validation made sure there is a flow log
        learner = Learner(settings.learn, settings.flow_log.path, model, time.time(), log, metrics)
        model = learner.model_for(model)
    server = MetricsServer(metrics, settings.metrics) if settings.metrics else None
    sensor = settings.sensor or socket.gethostname()  # in every EVE line and the metrics
    metrics.sensor.labels(sensor).set(1)
    sink = AlertSink(settings.alerts.file, stdout=settings.alerts.stdout, host=sensor)
    flow_log = FlowLog(settings.flow_log, metrics, log, host=sensor) if settings.flow_log else None
    engine = Engine(
        model,
        rules,
        sink,
        metrics,
        settings.flow,
        settings.context,
        settings.incidents,
        settings.budget,
        log=log,
        flow_log=flow_log,
    )
    cap = settings.capture
    pool = None  # capture workers (workers.py), or this process reads the rings itself
    if cap.workers > 1:
        from quietwire.agent.parallel.workerpool import WorkerPool

        pool = WorkerPool(cap.workers, engine, cap, settings.flow, settings.context, metrics, log)
    sources = [
        LiveCapture(
            i, cap.bpf_filter, cap.promiscuous, cap.ring_block_kib, cap.ring_blocks, cap.snaplen
        )
        for i in (cap.interfaces if pool is None else ())
    ]
    state = {"stop": False, "reload": False}

    def on_stop(signum, frame) -> None:
        state["stop"] = True

    def on_reload(signum, frame) -> None:
        state["reload"] = True

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_reload)
    if learner:
        learner.tick(time.time(), engine)  # holds back from the first packet on
    where = f", metrics on {settings.metrics.listen}:{server.port}" if server else ""
    where += f", {cap.workers} capture workers" if pool else ""
    log(
        f"capturing on {', '.join(cap.interfaces)} (model {model.version}, "
        f"{len(rules)} rules{where})"
    )
    last_tick = time.monotonic()
    try:
        while not state["stop"]:
            got = 0
            if pool:
                pool.pump(timeout_s=0.1)
            for src in sources:
                batch = src.read(timeout_s=0.1 / len(sources))
                if len(batch):
                    got += len(batch)
                    engine.process(batch, src.interface)
            now = time.monotonic()
            if now - last_tick >= 1.0:
                last_tick = now
                engine.expire(time.time_ns())
                if pool:
                    pool.tick()
                for src in sources:
                    _, drops = src.statistics()
                    if drops:
                        metrics.kernel_drops.labels(src.interface, "0").inc(drops)
                sink.flush()
                if flow_log:
                    flow_log.tick()  # rotation by age, the compressor's failures
                if learner:
                    learner.tick(time.time(), engine)  # progress; at the end, calibration
            if state["reload"]:
                state["reload"] = False
                settings = _reload(
                    engine, settings, config_path, load_config, ConfigError, metrics, sink, learner
                )
                if flow_log:
                    flow_log.reopen()
                if pool:
                    pool.reload()
        # Drain: whatever the kernel still holds, then every open flow.
        if pool:
            pool.drain()
        for src in sources:
            for batch in src.remaining():
                engine.process(batch, src.interface)
            _, drops = src.statistics()
            if drops:
                metrics.kernel_drops.labels(src.interface, "0").inc(drops)
        engine.flush()
    finally:
        if pool:
            pool.close()
        for src in sources:
            src.close()
        sink.close()
        if flow_log:
            flow_log.close()
        if server:
            server.close()
    s = engine.summary
    drops = sum(src.kernel_drops for src in sources) + (pool.kernel_drops if pool else 0)
    log(
        f"stopped: {s.packets} packets, {s.flows} flows, {sum(s.incidents.values())} "
        f"incidents, {sum(s.alerts.values())} alert lines ({s.held_back} held back), "
        f"{drops} kernel drops"
        + (f"; {_flow_log_line(flow_log)}" if flow_log else "")
        + (f"; {pool.cpu_line()}" if pool else "")
    )
    return 0


def _reload(engine, settings, config_path, load_config, config_error, metrics, sink, learner):
    """SIGHUP: re-read the config, rules and model; on any error keep everything as it was.
    Capture settings (interfaces, filter, ring) and the learn section take effect at the next
    start; after a learning period's calibration its model stands in for the configured one
    it was calibrated from."""
    try:
        new = load_config(config_path)
        rules = load_rules(new.rules)
        model = ScoringModel(new.model)
        if learner:
            model = learner.model_for(model)
    except (config_error, RuleError, ModelError) as exc:
        metrics.reloads.labels("failure").inc()
        metrics.reload_ok.set(0)
        log(f"reload failed, keeping the previous configuration: {exc}")
        sink.reopen()
        return settings
    engine.reload(model, rules)
    metrics.reloads.labels("success").inc()
    metrics.reload_ok.set(1)
    sink.reopen()
    log(f"reloaded: {len(rules)} rules, model {model.version}")
    return new
