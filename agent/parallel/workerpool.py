"""The capture workers' pool, in the daemon's process: it starts the worker processes
(workers.py), takes their reports through one CentralMeter per interface (central.py) into
the Engine, forwards SIGHUP and SIGTERM to them, and starts again a worker that died
(logged, counted in ``quietwire_capture_worker_restarts_total``; the open flows it held are
lost, and their number is in the log line)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from pathlib import Path

from quietwire.agent.capture.live import CaptureSetupError
from quietwire.agent.flow.table import FlowConfig
from quietwire.agent.parallel.central import CentralMeter, WorkerReport
from quietwire.agent.parallel.workers import WorkerSpec, recv_report, run_worker

START_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 45.0  # under systemd's TimeoutStopSec (60 s in deploy/systemd)


@dataclass
class _Worker:
    index: int
    generation: int
    process: multiprocessing.process.BaseProcess
    conn: Connection
    pid: int | None = None
    done: set | None = None  # interfaces it finished
    totals: dict | None = None

    @property
    def key(self) -> tuple[int, int]:
        return (self.index, self.generation)


class WorkerPool:
    """The worker processes of one daemon and the central stage they report to: their
    reports go through one CentralMeter per interface into the Engine (``pump``)."""

    def __init__(
        self,
        count: int,
        engine,
        capture=None,
        flow: FlowConfig | None = None,
        context=None,
        metrics=None,
        log=None,
        files: tuple[Path, ...] = (),
    ) -> None:
        self.count = count
        self.engine = engine
        self.metrics = metrics
        self.log = log or (lambda message: None)
        flow = flow or FlowConfig()
        # the sensor's flow memory is shared out: each worker's table holds its part
        per_worker = replace(flow, max_flows=max(flow.max_flows // count, 1))
        interfaces = ("file",) if files else tuple(capture.interfaces)
        group = os.getpid() & 0xFFFF  # one fanout group per interface and daemon
        self._spec = WorkerSpec(
            index=0,
            count=count,
            interfaces=() if files else interfaces,
            fanout_groups=tuple((group + i) & 0xFFFF for i in range(len(interfaces))),
            flow=per_worker,
            files=tuple(files),
            **(
                {}
                if files
                else {
                    "bpf_filter": capture.bpf_filter,
                    "promiscuous": capture.promiscuous,
                    "ring_block_kib": capture.ring_block_kib,
                    "ring_blocks": capture.ring_blocks,
                    "snaplen": capture.snaplen,
                }
            ),
        )
        self.central = {name: CentralMeter(flow, context) for name in interfaces}
        for name, meter in self.central.items():
            engine.attach(name, meter)
        self._mp = multiprocessing.get_context("spawn")
        self.workers: list[_Worker | None] = [None] * count
        self.restarts = 0
        self._drops: dict[tuple, int] = {}
        self._finished_cpu: dict[int, float] = {}
        self._finished_packets: dict[int, int] = {}
        self._dead_since: dict[int, float] = {}
        try:
            for index in range(count):
                self._start(index, 0)
            deadline = time.monotonic() + START_TIMEOUT_S
            while any(w is not None and w.pid is None for w in self.workers):
                if time.monotonic() > deadline:
                    raise CaptureSetupError(f"capture workers did not start in {START_TIMEOUT_S} s")
                self.pump(0.1, starting=True)
        except BaseException:
            self.close()
            raise

    def _start(self, index: int, generation: int) -> None:
        ours, theirs = self._mp.Pipe()
        process = self._mp.Process(
            target=run_worker,
            args=(replace(self._spec, index=index), theirs),
            name=f"quietwire-worker-{index}",
        )
        process.start()
        theirs.close()
        w = _Worker(index, generation, process, ours, done=set())
        self.workers[index] = w
        for meter in self.central.values():
            meter.add_source(w.key)

    def pump(self, timeout_s: float, starting: bool = False) -> None:
        """Take the workers' reports (waiting up to ``timeout_s`` for one) into the Engine."""
        live = {w.conn: w for w in self.workers if w is not None}
        for conn in wait(list(live), timeout_s):
            w = live[conn]
            for _ in range(64):  # then the others get their turn
                try:
                    header, report = recv_report(conn)
                except (EOFError, OSError):
                    self._died(w, starting)
                    break
                self._take(w, header, report, starting)
                if not conn.poll():
                    break

    def _take(self, w: _Worker, header: dict, report: WorkerReport | None, starting) -> None:
        kind = header["kind"]
        if kind == "error":
            raise CaptureSetupError(f"capture worker {w.index}: {header['message']}")
        iface = header["interface"]
        if kind == "ready":
            w.pid = header["pid"]
        meter = self.central[iface]
        meter.receive(w.key, report)
        w.totals = report.totals
        self._count_drops(w, iface, report.totals)
        if kind == "done":
            w.done.add(iface)
            meter.finish_source(w.key)
        self.engine.handle(meter.merge(), iface)

    def _count_drops(self, w: _Worker, iface: str, totals: dict) -> None:
        seen = self._drops.get((w.key, iface), 0)
        delta = totals.get("kernel_drops", 0) - seen
        self._drops[(w.key, iface)] = seen + delta
        if delta and self.metrics:
            self.metrics.kernel_drops.labels(iface, str(w.index)).inc(delta)

    def _died(self, w: _Worker, starting: bool) -> None:
        """A worker's pipe closed: finished if it said done everywhere, else it died."""
        w.conn.close()
        w.process.join(timeout=5)
        totals = w.totals or {}
        self._finished_cpu[w.index] = self._finished_cpu.get(w.index, 0.0) + totals.get("cpu_s", 0)
        self._finished_packets[w.index] = self._finished_packets.get(w.index, 0) + totals.get(
            "packets", 0
        )
        self.workers[w.index] = None
        if len(w.done) == len(self.central):
            return
        code = w.process.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit {code}"
        lost = 0
        for iface, meter in self.central.items():
            before = meter.lost_flows
            meter.finish_source(w.key, lost=True)
            lost += meter.lost_flows - before
            self.engine.handle(meter.merge(), iface)
        if starting:
            raise CaptureSetupError(f"capture worker {w.index} ended while starting ({how})")
        self.restarts += 1
        if self.metrics:
            self.metrics.worker_restarts.inc()
        self.log(
            f"capture worker {w.index} (pid {w.pid}) died ({how}); {lost} open flows lost; "
            "starting it again"
        )
        self._start(w.index, w.generation + 1)

    def tick(self) -> None:
        """Notice a worker that died without closing its pipe (it still would be polled)."""
        for w in list(self.workers):
            if w is not None and not w.process.is_alive() and not w.conn.poll():
                self._died(w, starting=False)

    def reload(self) -> None:
        """SIGHUP reaches every worker (they keep capturing: nothing of theirs reloads)."""
        self._signal(signal.SIGHUP)

    def _signal(self, signum: int) -> None:
        for w in self.workers:
            if w is not None and w.process.is_alive():
                try:
                    os.kill(w.process.pid, signum)
                except ProcessLookupError:
                    pass

    def drain(self) -> None:
        """SIGTERM to every worker; take their last flows until each is done (or gone)."""
        self._signal(signal.SIGTERM)
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while any(w is not None for w in self.workers):
            if time.monotonic() > deadline:
                for w in self.workers:
                    if w is not None:
                        self.log(f"capture worker {w.index} did not drain; stopping it")
                        w.process.kill()
                deadline = float("inf")
            if self._all_done():
                self._reap()
            else:
                self.pump(0.2)

    def _all_done(self) -> bool:
        return all(w is None or len(w.done) == len(self.central) for w in self.workers)

    def _reap(self) -> None:
        for w in list(self.workers):
            if w is not None:
                self._died(w, starting=False)

    def run_files(self) -> None:
        """Until every file-share worker is done (tests and benches)."""
        while not self._all_done():
            self.pump(1.0)
        self._reap()

    @property
    def kernel_drops(self) -> int:
        return sum(self._drops.values())

    def cpu_line(self) -> str:
        """Packets and CPU seconds of each role: each worker (all its lifetimes) and the
        central stage (this process, since it started)."""
        cpu, packets = dict(self._finished_cpu), dict(self._finished_packets)
        for w in self.workers:
            if w is not None:
                cpu[w.index] = cpu.get(w.index, 0.0) + (w.totals or {}).get("cpu_s", 0.0)
                packets[w.index] = packets.get(w.index, 0) + (w.totals or {}).get("packets", 0)
        central = time.process_time()
        parts = ", ".join(
            f"worker {i} {packets.get(i, 0)} packets {s:.2f} CPU s" for i, s in sorted(cpu.items())
        )
        return f"{parts}, central stage {central:.2f} CPU s; {self.restarts} worker restarts"

    def close(self) -> None:
        for w in self.workers:
            if w is not None:
                if w.process.is_alive():
                    w.process.kill()
                w.process.join(timeout=5)
                w.conn.close()
        self.workers = [None] * self.count
