"""The two ways the agent runs: ``replay`` (capture files, as fast as possible or in real time)
and ``run`` (the daemon: live interfaces, SIGTERM = drain and exit 0, SIGHUP = reload rules and
model, keeping the old ones if the new ones are broken, and reopen the alert file and the flow
log; a learning period, site/learning.py, when configured)."""

from __future__ import annotations

import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from quietwire.agent.capture.live import LiveCapture
from quietwire.agent.capture.pcap import CaptureError, read_capture
from quietwire.agent.detect.model import ModelError, ScoringModel
from quietwire.agent.detect.rules import RuleError, RuleSet, load_rules
from quietwire.agent.output.alerts import AlertSink
from quietwire.agent.output.flowlog import FlowLog, FlowLogSettings
from quietwire.agent.service.config import ConfigError, Settings, load_config
from quietwire.agent.service.engine import Engine, EngineSettings
from quietwire.agent.service.metrics import Metrics, MetricsServer, ServerSettings
from quietwire.agent.site.learning import Learner

if TYPE_CHECKING:
    from quietwire.agent.parallel.workerpool import WorkerPool


def log(message: str) -> None:
    print(f"quietwire: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class ReplayOptions:
    """What `quietwire replay` was asked to do."""

    files: list[Path]
    model: Path
    rules: Path
    alerts: Path | None
    stdout: bool
    realtime: bool = False
    speed: float = 1.0
    serve: ServerSettings | None = None
    engine: EngineSettings = EngineSettings()
    flow_log: FlowLogSettings | None = None
    workers: int = 1  # > 1: files metered in that many processes (agent/parallel/filepool.py)


def build_engine(
    model: ScoringModel,
    rules: RuleSet,
    settings: EngineSettings,
    sink: AlertSink,
    metrics: Metrics | None,
    flow_log: FlowLog | None,
    live: bool = False,
) -> Engine:
    """The pipeline after the packet source, as replay and the daemon both run it. The
    daemon's alert line budget runs on the wall clock (it protects the SIEM); a replay's on
    the traffic's time, so replaying a capture gives the same lines every time."""
    return Engine(
        model,
        rules,
        sink,
        metrics,
        settings=settings,
        flow_log=flow_log,
        log=log,
        clock=time.monotonic if live else None,
    )


def replay(opts: ReplayOptions) -> int:
    """Score every flow of the files; 0, or 1 if a file was damaged (its flows still count)."""
    model = ScoringModel(opts.model)
    rules = load_rules(opts.rules)
    metrics = Metrics() if opts.serve else None
    server = MetricsServer(metrics, opts.serve) if opts.serve else None
    if server:
        log(f"metrics on http://{opts.serve.listen}:{server.port}/metrics")
    sink = AlertSink(opts.alerts, stdout=opts.stdout, log=log)
    flow_log = FlowLog(opts.flow_log, metrics, log) if opts.flow_log else None
    engine = build_engine(model, rules, opts.engine, sink, metrics, flow_log)
    failed = False
    started = time.perf_counter()
    if opts.workers > 1 and len(opts.files) > 1 and not opts.realtime:
        from quietwire.agent.parallel.filepool import FileReplay, replay_files

        files = FileReplay(tuple(opts.files), opts.workers, opts.engine.flow, opts.engine.context)
        failed = replay_files(engine, files, log)
    else:  # one file, one worker or real time: this process reads them
        failed = _replay_in_process(engine, opts)
    sink.close()
    engine.sink_accounting()
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


def _replay_in_process(engine: Engine, opts: ReplayOptions) -> bool:
    """Each file through the engine's own meter, one after the other, each its own time line;
    True if a file was damaged."""
    failed = False
    for path in opts.files:
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
        engine.flush()
        engine.meters.clear()
    return failed


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


class _Signals:
    """SIGTERM and SIGINT ask the daemon to drain and stop, SIGHUP to reload; the handlers only
    set a flag, which the loop reads between reads of the rings."""

    def __init__(self) -> None:
        self.stop = False
        self.reload = False
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)

    def _on_stop(self, signum, frame) -> None:
        self.stop = True

    def _on_reload(self, signum, frame) -> None:
        self.reload = True


@dataclass
class _Daemon:
    """What a running daemon holds: the engine, its outputs and its packet sources."""

    settings: Settings  # as started: a reload changes only the rules and the model
    metrics: Metrics
    server: MetricsServer | None
    learner: Learner | None
    sink: AlertSink
    flow_log: FlowLog | None
    engine: Engine
    pool: WorkerPool | None  # capture workers (workers.py), or this process reads the rings
    sources: list[LiveCapture]

    def close(self) -> None:
        if self.pool:
            self.pool.close()
        for src in self.sources:
            src.close()
        self.sink.close()
        if self.flow_log:
            self.flow_log.close()
        if self.server:
            self.server.close()


def run(settings: Settings, config_path: Path) -> int:
    """The daemon loop. Returns 0 after a clean SIGTERM/SIGINT shutdown."""
    daemon = _build(settings)
    signals = _Signals()
    started = _start_line(daemon)  # the model and rules it starts with
    if daemon.learner:
        daemon.learner.tick(time.time(), daemon.engine)  # holds back from the first packet on
    log(started)
    try:
        _loop(daemon, signals, config_path)
        _drain(daemon)
    finally:
        daemon.close()
    log(_stop_line(daemon))
    return 0


def _build(settings: Settings) -> _Daemon:
    """Model, rules, metrics, outputs, engine and packet sources, as configured."""
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
    sink = AlertSink(settings.alerts.file, stdout=settings.alerts.stdout, host=sensor, log=log)
    flow_log = FlowLog(settings.flow_log, metrics, log, host=sensor) if settings.flow_log else None
    engine = build_engine(model, rules, settings.engine, sink, metrics, flow_log, live=True)
    cap = settings.capture
    pool = None
    if cap.workers > 1:
        from quietwire.agent.parallel.workerpool import WorkerPool

        pool = WorkerPool(cap.workers, engine, cap, settings.flow, settings.context, metrics, log)
    sources = [
        LiveCapture(
            i, cap.bpf_filter, cap.promiscuous, cap.ring_block_kib, cap.ring_blocks, cap.snaplen
        )
        for i in (cap.interfaces if pool is None else ())
    ]
    return _Daemon(settings, metrics, server, learner, sink, flow_log, engine, pool, sources)


def _loop(daemon: _Daemon, signals: _Signals, config_path: Path) -> None:
    """Read packets until asked to stop; once a second, time passes for the engine and the
    outputs; a reload when asked."""
    last_tick = time.monotonic()
    sources = daemon.sources
    while not signals.stop:
        if daemon.pool:
            daemon.pool.pump(timeout_s=0.1)
        for src in sources:
            batch = src.read(timeout_s=0.1 / len(sources))
            if len(batch):
                daemon.engine.process(batch, src.interface)
        now = time.monotonic()
        if now - last_tick >= 1.0:
            last_tick = now
            _tick(daemon)
        if signals.reload:
            signals.reload = False
            _reload(daemon, config_path)
            if daemon.flow_log:
                daemon.flow_log.reopen()
            if daemon.pool:
                daemon.pool.reload()


def _tick(daemon: _Daemon) -> None:
    """A second passed: flows and incidents time out, kernel drops are counted, outputs are
    flushed and rotated, the learning period moves on."""
    daemon.engine.expire(time.time_ns())
    if daemon.pool:
        daemon.pool.tick()
    for src in daemon.sources:
        _count_kernel_drops(daemon.metrics, src)
    daemon.sink.flush()
    if daemon.flow_log:
        daemon.flow_log.tick()  # rotation by age, the compressor's failures
    if daemon.learner:
        daemon.learner.tick(time.time(), daemon.engine)  # progress; at the end, calibration


def _drain(daemon: _Daemon) -> None:
    """Whatever the kernel still holds, then every open flow."""
    if daemon.pool:
        daemon.pool.drain()
    for src in daemon.sources:
        for batch in src.remaining():
            daemon.engine.process(batch, src.interface)
        _count_kernel_drops(daemon.metrics, src)
    daemon.engine.flush()


def _count_kernel_drops(metrics: Metrics, src: LiveCapture) -> None:
    _, drops = src.statistics()
    if drops:
        metrics.kernel_drops.labels(src.interface, "0").inc(drops)


def _start_line(daemon: _Daemon) -> str:
    cap, server, engine = daemon.settings.capture, daemon.server, daemon.engine
    where = f", metrics on {daemon.settings.metrics.listen}:{server.port}" if server else ""
    where += f", {cap.workers} capture workers" if daemon.pool else ""
    return (
        f"capturing on {', '.join(cap.interfaces)} (model {engine.model.version}, "
        f"{len(engine.rules.ruleset)} rules{where})"
    )


def _stop_line(daemon: _Daemon) -> str:
    s, pool, flow_log = daemon.engine.summary, daemon.pool, daemon.flow_log
    drops = sum(src.kernel_drops for src in daemon.sources) + (pool.kernel_drops if pool else 0)
    return (
        f"stopped: {s.packets} packets, {s.flows} flows, {sum(s.incidents.values())} "
        f"incidents, {sum(s.alerts.values())} alert lines ({s.held_back} held back), "
        f"{drops} kernel drops"
        + (f"; {_flow_log_line(flow_log)}" if flow_log else "")
        + (f"; {pool.cpu_line()}" if pool else "")
    )


def _reload(daemon: _Daemon, config_path: Path) -> None:
    """SIGHUP: re-read the config, rules and model; on any error keep everything as it was.
    Capture settings (interfaces, filter, ring) and the learn section take effect at the next
    start; after a learning period's calibration its model stands in for the configured one
    it was calibrated from."""
    metrics, sink = daemon.metrics, daemon.sink
    try:
        new = load_config(config_path)
        rules = load_rules(new.rules)
        model = ScoringModel(new.model)
        if daemon.learner:
            model = daemon.learner.model_for(model)
    except (ConfigError, RuleError, ModelError) as exc:
        metrics.reloads.labels("failure").inc()
        metrics.reload_ok.set(0)
        log(f"reload failed, keeping the previous configuration: {exc}")
        sink.reopen()
        return
    daemon.engine.reload(model, rules)
    metrics.reloads.labels("success").inc()
    metrics.reload_ok.set(1)
    sink.reopen()
    log(f"reloaded: {len(rules)} rules, model {model.version}")
