"""Capture workers: ``capture.workers: N`` processes, each with its own TPACKET_V3 ring per
interface in one AF_PACKET fanout group (capture/live.py), each decoding its share of the
packets into its own flow table; a central stage (this process: central.py, then the Engine)
does host context, features, scoring, rules, incidents, alerts, the flow log and metrics.

A worker sends what its table did (flow starts, first answers, ended flows and interim records)
as columns in one buffer per report: a JSON header naming each array's dtype, shape and offset,
then the raw bytes (``send_report``/``recv_report``), never a Python object per flow.

SIGTERM (or SIGINT) makes a worker read what its ring still holds, end every open flow, send
them and say ``done``; the central stage forwards SIGTERM and SIGHUP to every worker (a worker
has nothing to reload: capture and flow-table settings are read at start). The pool that
starts them and feeds the central stage is workerpool.py.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from quietwire.agent.capture.decode import Decoder, DecodeStats, Packets
from quietwire.agent.capture.live import CaptureSetupError, LiveCapture
from quietwire.agent.capture.pcap import PAD, PacketBatch, read_capture
from quietwire.agent.flow.records import NEVER, NS, START_COLUMNS, FlowRecords, empty_records
from quietwire.agent.flow.table import FlowConfig, FlowTable, host_hash
from quietwire.agent.parallel.central import WorkerReport

# Kernel timestamps of packets still in a ring block that the kernel has not retired yet (the
# retire timeout is 50 ms) can be this much older than the clock when a worker finds its ring
# empty: a quiet worker's watermark is the clock minus this.
RING_LAG_NS = 250_000_000
TICK_S = 1.0


# ---- the transport ----------------------------------------------------------------------
def send_report(conn: Connection, header: dict, report: WorkerReport | None = None) -> None:
    """One message: the JSON header, then (with a report) its columns in one buffer."""
    arrays: dict[str, np.ndarray] = {}
    if report is not None:
        header = {
            **header,
            "watermark_ns": report.watermark_ns,
            "prune_ns": report.prune_ns,
            "totals": report.totals,
        }
        if len(report.started):
            arrays.update({f"started.{k}": v for k, v in report.started.columns.items()})
        if len(report.answered_seq):
            arrays["answered_seq"] = report.answered_seq
            arrays["answered_ns"] = report.answered_ns
        if len(report.ended):
            arrays.update({f"ended.{k}": v for k, v in report.ended.columns.items()})
    layout, size = [], 0
    for name, a in arrays.items():
        layout.append([name, a.dtype.str, list(a.shape), size])
        size += -(-a.nbytes // 8) * 8  # each array 8-byte aligned
    buf = np.empty(size, np.uint8)
    for (_, _, _, at), a in zip(layout, arrays.values()):
        buf[at : at + a.nbytes] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    conn.send_bytes(json.dumps({**header, "layout": layout, "size": size}).encode())
    if size:
        conn.send_bytes(buf)


def recv_report(conn: Connection) -> tuple[dict, WorkerReport | None]:
    """The header and (when it carried one) the report, its arrays views of one buffer."""
    header = json.loads(conn.recv_bytes())
    if "watermark_ns" not in header:
        return header, None
    buf = np.empty(header["size"], np.uint8)
    if header["size"]:
        conn.recv_bytes_into(buf)
    arrays = {}
    for name, dtype, shape, at in header["layout"]:
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        arrays[name] = buf[at : at + count * dt.itemsize].view(dt).reshape(shape)
    empty = empty_records()
    started = FlowRecords({k: arrays.get(f"started.{k}", empty[k]) for k in START_COLUMNS})
    ended = FlowRecords({k: arrays.get(f"ended.{k}", v) for k, v in empty.columns.items()})
    none = np.zeros(0, np.int64)
    report = WorkerReport(
        started,
        arrays.get("answered_seq", none),
        arrays.get("answered_ns", none),
        ended,
        header["watermark_ns"],
        header["prune_ns"],
        header["totals"],
    )
    return header, report


# ---- a worker's flow table ----------------------------------------------------------------
class WorkerTable:
    """One interface's decoder and flow table in a worker: packet batches in, reports out."""

    def __init__(self, config: FlowConfig | None = None, seed: int | None = None) -> None:
        self.decoder = Decoder()
        self.table = FlowTable(config, seed=seed)
        self.decode = DecodeStats()
        self.kernel_drops = 0

    def add(self, batch: PacketBatch, share=None) -> WorkerReport:
        """Fold one batch (``share`` keeps this worker's part of a file's packets)."""
        packets, stats = self.decoder.decode(batch)
        if share is not None:
            packets, stats = share(packets, stats)
        self.decode.add(stats)
        t = self.table
        update = t.add(packets)
        ended = [update.ended]
        now = t.now_ns
        if share is not None and len(batch):  # a file's time line: the whole batch's time
            now = max(now if now is not None else -NEVER, int(batch.ts_ns.max()))
            t.now_ns = now
            ended.append(t.expire(now))
        if now is not None:
            ended.append(t.snapshot(now))
        mark = now if now is not None else -NEVER
        return self._report(update.started, update.answered_seq, update.answered_ns, ended, mark)

    def idle(self, watermark_ns: int) -> WorkerReport:
        """Nothing but the watermark and the running totals."""
        none = np.zeros(0, np.int64)
        return self._report(empty_records(), none, none, [], watermark_ns)

    def expire(self, now_ns: int, watermark_ns: int) -> WorkerReport:
        """Time passing without packets (the clock): flows timed out, interim records due."""
        ended = [self.table.expire(now_ns), self.table.snapshot(now_ns)]
        none = np.zeros(0, np.int64)
        return self._report(empty_records(), none, none, ended, watermark_ns, now_ns)

    def flush(self, limit: int) -> WorkerReport:
        """End up to ``limit`` open flows (shutdown: call until none is open)."""
        none = np.zeros(0, np.int64)
        mark = self.table.now_ns if self.table.now_ns is not None else -NEVER
        return self._report(empty_records(), none, none, [self.table.flush(limit)], mark)

    def _report(self, started, answered_seq, answered_ns, ended, mark, now=None) -> WorkerReport:
        t = self.table
        prune = mark if now is None else now
        if t.overdue_last_ns is not None:  # as FlowMeter._prune: overdue flows need their window
            prune = min(prune, t.overdue_last_ns + int(t.config.idle_timeout_s * NS))
        d = self.decode
        totals = {
            "packets": d.packets,
            "bytes": d.bytes,
            "decoded": d.decoded,
            "errors": dict(d.errors),
            "evictions": dict(t.evictions),
            "emergency": bool(t.emergency),
            "emergency_started": t.emergency_started,
            "open": len(t),
            "kernel_drops": self.kernel_drops,
            "cpu_s": time.process_time(),
        }
        return WorkerReport(
            started,
            answered_seq,
            answered_ns,
            FlowRecords.concat(ended),
            int(mark),
            int(prune),
            totals,
        )


def share_hash(p: Packets) -> np.ndarray:
    """A hash of each packet's flow that is the same in both directions (the file share's
    stand-in for the kernel's symmetric flow hash)."""
    hosts = host_hash(p.src_hi, p.src_lo) ^ host_hash(p.dst_hi, p.dst_lo)
    ports = (p.sport.astype(np.uint64) + p.dport.astype(np.uint64)) << np.uint64(8)
    return host_hash(hosts, ports | p.proto.astype(np.uint64))


class FileShare:
    """A worker's share of capture files (tests and benches: what fanout does to a live
    interface, with a file's time line); worker 0 also counts what did not decode."""

    interface = "file"

    def __init__(self, files: list[Path], index: int, count: int) -> None:
        self.index, self.count = index, count
        self._batches = (b for f in files for b in read_capture(f))
        self.finished = False
        self.last_ns: int | None = None

    def read(self, timeout_s: float = 0.0) -> PacketBatch:
        for batch in self._batches:
            return batch
        self.finished = True
        z, zi = np.zeros(0, np.int64), np.zeros(0, np.int32)
        return PacketBatch(np.zeros(PAD, np.uint8), z, z, z, z, zi, zi)

    def __call__(self, packets: Packets, stats: DecodeStats) -> tuple[Packets, DecodeStats]:
        mine = share_hash(packets) % np.uint64(self.count) == self.index
        kept = DecodeStats(int(mine.sum()), int(packets.wirelen[mine].sum()), int(mine.sum()))
        if self.index == 0:  # what did not decode is counted once
            kept.packets += stats.packets - len(packets)
            kept.bytes += stats.bytes - int(packets.wirelen.sum())
            kept.errors = stats.errors
        return packets.take(mine), kept

    def statistics(self) -> tuple[int, int]:
        return 0, 0

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process opens: live interfaces in fanout groups, or a share of files."""

    index: int
    count: int
    interfaces: tuple[str, ...] = ()
    fanout_groups: tuple[int, ...] = ()
    bpf_filter: str | None = None
    promiscuous: bool = True
    ring_block_kib: int = 1024
    ring_blocks: int = 64
    snaplen: int = 65535
    flow: FlowConfig | None = None
    files: tuple[Path, ...] = ()


def worker_main(spec: WorkerSpec, conn: Connection) -> None:
    """A worker process: read its rings (or file share), report, drain on SIGTERM."""
    state = {"stop": False}

    def on_stop(signum, frame) -> None:
        state["stop"] = True

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, lambda signum, frame: None)  # nothing to reload here
    try:
        if spec.files:
            sources = [FileShare(list(spec.files), spec.index, spec.count)]
        else:
            sources = [
                LiveCapture(
                    name,
                    spec.bpf_filter,
                    spec.promiscuous,
                    spec.ring_block_kib,
                    spec.ring_blocks,
                    spec.snaplen,
                    fanout_group=group,
                )
                for name, group in zip(spec.interfaces, spec.fanout_groups)
            ]
    except CaptureSetupError as exc:
        send_report(conn, {"kind": "error", "message": str(exc)})
        return
    tables = {src.interface: WorkerTable(spec.flow) for src in sources}
    files = bool(spec.files)
    for src in sources:  # in the fanout group: no later packet is older than now
        ready = tables[src.interface].idle(-NEVER if files else time.time_ns() - RING_LAG_NS)
        send_report(conn, {"kind": "ready", "interface": src.interface, "pid": os.getpid()}, ready)
    last_tick = time.monotonic()
    caught_up = dict.fromkeys(tables, True)  # the last read found the ring empty
    try:
        while not state["stop"]:
            for src in sources:
                batch = src.read(timeout_s=0.1 / len(sources))
                caught_up[src.interface] = not len(batch)
                if len(batch):
                    report = tables[src.interface].add(batch, src if files else None)
                    send_report(conn, {"kind": "report", "interface": src.interface}, report)
            if files and all(src.finished for src in sources):
                break
            if not files and time.monotonic() - last_tick >= TICK_S:
                last_tick = time.monotonic()
                for src in sources:
                    _, drops = src.statistics()
                    table = tables[src.interface]
                    table.kernel_drops += drops
                    if not caught_up[src.interface]:
                        # packets still wait in the ring: time is theirs, and add() expires
                        # by it; the clock would end flows whose next packets are queued
                        report = table.idle(table.table.now_ns or -NEVER)
                    else:
                        now = time.time_ns()
                        mark = max(now - RING_LAG_NS, table.table.now_ns or -NEVER)
                        report = table.expire(now, mark)
                    send_report(conn, {"kind": "report", "interface": src.interface}, report)
        for src in sources:  # drain: what the ring still holds, then every open flow
            table = tables[src.interface]
            for batch in () if files else src.remaining():
                send_report(conn, {"kind": "report", "interface": src.interface}, table.add(batch))
            table.kernel_drops += src.statistics()[1]
            while len(table.table):
                report = table.flush(1 << 16)
                send_report(conn, {"kind": "report", "interface": src.interface}, report)
            send_report(conn, {"kind": "done", "interface": src.interface}, table.idle(NEVER))
    except (BrokenPipeError, EOFError):  # the central stage is gone: nothing to send to
        pass
    finally:
        for src in sources:
            src.close()
        conn.close()


def run_worker(spec: WorkerSpec, conn: Connection) -> None:
    """The spawned worker process's target."""
    try:
        worker_main(spec, conn)
    except KeyboardInterrupt:
        sys.exit(0)
