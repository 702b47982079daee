"""Flow table under a flood: bytes per open flow, and peak RSS and packets/s while a
random-source SYN flood keeps the table full.

    python bench/bench_table.py                    # 2,000,000 SYNs at 100,000/s, 500,000 flows
    python bench/bench_table.py --agent            # also the whole agent (model, rules, alerts)
    python bench/bench_table.py --packets 300000 --max-flows 50000   # a quick run
    python bench/bench_table.py --agent --before ab02a09   # and the code of a revision, to compare

First, bytes per open flow: a table filled to max_flows with no timeout or eviction, by where
tracemalloc saw the bytes allocated (table columns, key index, host context logs). Then the
flood: every packet comes from a new random IPv4 source and port to one server port and is never
answered: each is a new half-open flow. Packets are built in numpy straight into PacketBatches
(Ethernet/IPv4/TCP SYN, 54 bytes; one batch is what an 8 MiB pcap chunk holds), so no capture
file is written and generating them costs little next to the meter. Each run is its own child
process pinned to CPU 0, so its peak RSS (VmHWM) is its own; packets/s counts only the time
inside the meter (or engine) calls. At the end the meter run flushes the open flows 65,536 at
a time where the meter can (``flush(limit=...)``); the agent run calls ``Engine.flush()``.
``--no-emergency`` runs the table without emergency mode (the longest idle flows are evicted
when it is full); ``--before REV`` also runs the code of a git revision (``git archive``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_meter import _peak_rss_mib  # noqa: E402

FRAME = 54  # Ethernet 14 + IPv4 20 + TCP 20
BATCH = (8 << 20) // (16 + FRAME)  # packets in one 8 MiB pcap chunk (16-byte record headers)
SERVER = (172 << 24) | (16 << 16) | 1
FLUSH_CHUNK = 1 << 16


def _template() -> np.ndarray:
    f = np.zeros(FRAME, np.uint8)
    f[12:14] = (0x08, 0x00)  # IPv4
    f[14] = 0x45
    f[16:18] = (0, 40)  # IP total length
    f[22] = 64  # TTL
    f[23] = 6  # TCP
    f[30:34] = np.frombuffer(SERVER.to_bytes(4, "big"), np.uint8)
    f[36:38] = (0, 80)  # destination port
    f[46] = 0x50  # data offset: 5 words
    f[47] = 0x02  # SYN
    f[48:50] = (0xFA, 0xF0)  # window 64240
    return f


def flood_batches(packets: int, rate_pps: float, seed: int = 11):
    """PacketBatches of a random-source SYN flood at ``rate_pps``, generated batch by batch."""
    from quietwire.agent.capture.pcap import PAD, PacketBatch

    rng = np.random.default_rng(seed)
    template = _template()
    t0 = 1_700_000_000 * 10**9
    done = 0
    while done < packets:
        n = min(BATCH, packets - done)
        frames = np.tile(template, (n, 1))
        src = rng.integers(1, 1 << 32, n, dtype=np.uint64).astype(">u4")
        frames[:, 26:30] = src.view(np.uint8).reshape(n, 4)
        sport = rng.integers(1024, 1 << 16, n).astype(">u2")
        frames[:, 34:36] = sport.view(np.uint8).reshape(n, 2)
        data = np.zeros(n * FRAME + PAD, np.uint8)
        data[: n * FRAME] = frames.ravel()
        yield PacketBatch(
            data=data,
            offset=np.arange(n, dtype=np.int64) * FRAME,
            caplen=np.full(n, FRAME, np.int64),
            wirelen=np.full(n, FRAME, np.int64),
            ts_ns=t0 + ((done + np.arange(n)) * (1e9 / rate_pps)).astype(np.int64),
            linktype=np.ones(n, np.int32),
            interface=np.zeros(n, np.int32),
        )
        done += n


def _flow_config(args: argparse.Namespace):
    from quietwire.agent.flow.table import FlowConfig

    if args.no_emergency:
        return FlowConfig(max_flows=args.max_flows, emergency=False)
    return FlowConfig(max_flows=args.max_flows)


def _flush(meter) -> int:
    """End every open flow, 65,536 at a time where the meter can."""
    if "limit" not in inspect.signature(meter.flush).parameters:
        return len(meter.flush())
    flows = 0
    while len(meter.table):
        flows += len(meter.flush(limit=FLUSH_CHUNK))
    return flows


def child(args: argparse.Namespace) -> dict:
    from quietwire.agent.features.meter import FlowMeter

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {0})
    engine = None
    if args.agent:
        from quietwire.agent.detect.model import ScoringModel
        from quietwire.agent.detect.rules import load_rules
        from quietwire.agent.output.alerts import AlertSink
        from quietwire.agent.service.engine import Engine, EngineSettings
        from quietwire.rules import DEFAULT_RULES

        engine = Engine(
            ScoringModel(),
            load_rules(DEFAULT_RULES),
            AlertSink(),
            settings=EngineSettings(flow=_flow_config(args)),
        )
    else:
        meter = FlowMeter(_flow_config(args))
    seconds = 0.0
    flows = peak_open = 0
    for batch in flood_batches(args.packets, args.rate):
        start = time.perf_counter()
        if engine is None:
            flows += len(meter.add(batch))
        else:
            engine.process(batch, "file")
            meter = engine.meters["file"]
        seconds += time.perf_counter() - start
        peak_open = max(peak_open, len(meter.table))
    start = time.perf_counter()
    if engine is None:
        flows += _flush(meter)
    else:
        engine.flush()
        flows = engine.summary.flows
    seconds += time.perf_counter() - start
    table = meter.table
    return {
        "packets": meter.stats.decode.packets,
        "flows": flows,
        "peak_open": peak_open,
        "seconds": seconds,
        "peak_rss_mib": _peak_rss_mib(),
        "evictions": dict(getattr(table, "evictions", {"table_full": table.evicted})),
        "emergency_started": getattr(table, "emergency_started", None),
    }


def per_flow(args: argparse.Namespace) -> dict:
    """Bytes per open flow, by where they were allocated: a flood of ``max_flows`` SYNs at
    10 million/s (no timeout, no eviction) fills the meter's table; tracemalloc (which sees
    numpy's buffers) attributes what stays to the innermost line in agent/."""
    import linecache
    import tracemalloc

    from quietwire.agent.features.meter import FlowMeter

    meter = FlowMeter(_flow_config(args))
    tracemalloc.start(40)
    before = tracemalloc.take_snapshot()
    for batch in flood_batches(args.max_flows, 1e7):
        meter.add(batch)
    del batch
    diff = tracemalloc.take_snapshot().compare_to(before, "traceback")
    parts: dict[str, int] = {}
    for stat in diff:
        frames = [f for f in stat.traceback if "/agent/" in f.filename]
        if not frames:
            continue
        f = frames[-1]  # the innermost agent frame (frames run oldest first)
        code = linecache.getline(f.filename, f.lineno).strip()
        where = f"{Path(f.filename).name}:{f.lineno} {code[:60]}"
        parts[where] = parts.get(where, 0) + stat.size_diff
    return {"open": len(meter.table), "parts": parts}


def show_per_flow(r: dict, label: str) -> None:
    n = r["open"]
    parts = sorted(r["parts"].items(), key=lambda kv: -kv[1])
    total = sum(v for _, v in parts)
    print(f"{label}: {total / n:,.0f} bytes per open flow ({n:,} open flows)")
    for where, size in parts:
        if size / n >= 2:
            print(f"  {size / n:>7,.1f}  {where}")


def checkout(rev: str, into: Path) -> Path:
    """The package at a git revision, laid out for import as ``quietwire`` (the repository's
    top-level agent/, rules/ and trainer/ are quietwire.agent, .rules and .trainer)."""
    repo = Path(__file__).resolve().parent.parent
    tree = into / "tree"
    tree.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", rev], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    pkg = into / "pkg"
    shutil.copytree(tree / "quietwire", pkg / "quietwire")
    for sub in ("agent", "rules", "trainer"):
        shutil.copytree(tree / sub, pkg / "quietwire" / sub)
    return pkg


def _child(what: str, args: argparse.Namespace, label: str, pythonpath: Path | None) -> dict:
    cmd = [sys.executable, __file__, "--child", what, "--packets", str(args.packets)]
    cmd += ["--rate", str(args.rate), "--max-flows", str(args.max_flows)]
    if args.no_emergency:
        cmd.append("--no-emergency")
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"{label} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(what: str, args: argparse.Namespace, label: str, pythonpath: Path | None = None) -> None:
    r = _child(what, args, label, pythonpath)
    ev = ", ".join(f"{k} {v:,}" for k, v in r["evictions"].items() if v) or "no evictions"
    if r["emergency_started"] is not None:
        ev += f"; emergency started {r['emergency_started']}x"
    print(
        f"{label:<26}{r['packets'] / r['seconds']:>11,.0f}{r['seconds']:>9.2f}"
        f"{r['peak_open']:>11,}{r['peak_rss_mib']:>7,.0f} MiB  {ev}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=2_000_000)
    parser.add_argument("--rate", type=float, default=100_000, help="flood packets per second")
    parser.add_argument("--max-flows", type=int, default=500_000)
    parser.add_argument("--agent", action="store_true", help="also run the whole agent")
    parser.add_argument("--no-emergency", action="store_true", help="emergency mode off")
    parser.add_argument("--before", metavar="REV", help="also run the code of a git revision")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.agent = args.child == "agent"
        print(json.dumps(per_flow(args) if args.child == "per-flow" else child(args)))
        return
    print(
        f"flood: {args.packets:,} SYNs from random sources at {args.rate:,.0f}/s, "
        f"table of {args.max_flows:,} flows, batches of {BATCH:,} packets"
    )
    runs = ["meter"] + (["agent"] if args.agent else [])
    suffix = " (no emergency)" if args.no_emergency else ""
    with tempfile.TemporaryDirectory() as tmp:
        before = checkout(args.before, Path(tmp)) if args.before else None
        if before is not None:
            show_per_flow(_child("per-flow", args, "per flow", before), f"@ {args.before}")
        show_per_flow(_child("per-flow", args, "per flow", None), "now")
        head = f"{'run':<26}{'packets/s':>11}{'seconds':>9}{'peak open':>11}{'peak RSS':>11}"
        print(head + "  ended early")
        for what in runs:
            if before is not None:
                run(what, args, f"{what} @ {args.before}", before)
            run(what, args, f"{what}{suffix}")


if __name__ == "__main__":
    main()
