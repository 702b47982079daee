"""Flow-meter benchmark: quietwire vs nfstream vs scapy on one generated capture, one core.

    python bench/bench_meter.py                  # 1,000,000 packets, then 2,000,000 for memory
    python bench/bench_meter.py --packets 200000 --no-second-size   # a quick run

"no-payload" is quietwire's meter with payload statistics off (flow.payload: false), the meter
as it was before them. Every tool runs in its own child process pinned to CPU 0 (nfstream's
meter process too), so each peak RSS is its own. Figures are packets/s over the whole file,
and quietwire's ratio to each peer measured in the same run. scapy dissects only the first
--scapy-packets packets (it is two orders of magnitude slower); its packets/s is over those.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gen_capture import generate  # noqa: E402


def _peak_rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_quietwire(path: str, payload: bool = True) -> dict:
    from quietwire.agent.capture import read_capture
    from quietwire.agent.flows import FlowConfig
    from quietwire.agent.meter import FlowMeter

    meter = FlowMeter(FlowConfig(payload=payload))
    start = time.perf_counter()
    flows = 0
    for batch in read_capture(path):
        flows += len(meter.add(batch))
    flows += len(meter.flush())
    seconds = time.perf_counter() - start
    return {"packets": meter.stats.decode.packets, "flows": flows, "seconds": seconds}


def run_nfstream(path: str) -> dict:
    from nfstream import NFStreamer

    start = time.perf_counter()
    flows = packets = 0
    streamer = NFStreamer(source=path, statistical_analysis=True, n_meters=1, n_dissections=0)
    for flow in streamer:
        flows += 1
        packets += flow.bidirectional_packets
    seconds = time.perf_counter() - start
    return {"packets": packets, "flows": flows, "seconds": seconds}


def run_scapy(path: str, limit: int) -> dict:
    from scapy.utils import PcapReader

    start = time.perf_counter()
    packets = 0
    with PcapReader(path) as reader:
        for _ in reader:
            packets += 1
            if packets >= limit:
                break
    seconds = time.perf_counter() - start
    return {"packets": packets, "flows": None, "seconds": seconds}


def child(tool: str, path: str, limit: int) -> None:
    os.sched_setaffinity(0, {0})
    if tool == "quietwire":
        result = run_quietwire(path)
    elif tool == "no-payload":  # quietwire without payload statistics (flow.payload: false)
        result = run_quietwire(path, payload=False)
    elif tool == "nfstream":
        result = run_nfstream(path)
    else:
        result = run_scapy(path, limit)
    result["peak_rss_mib"] = _peak_rss_mib()
    print(json.dumps(result))


def measure(tool: str, path: Path, *extra: str, script: str = __file__) -> dict:
    """Run ``script --child TOOL PCAP`` in its own process; its JSON result plus packets/s."""
    out = subprocess.run(
        [sys.executable, script, "--child", tool, str(path), *extra],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["pps"] = result["packets"] / result["seconds"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=1_000_000)
    parser.add_argument("--scapy-packets", type=int, default=100_000)
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per tool, interleaved; the fastest counts"
    )
    parser.add_argument(
        "--no-second-size",
        action="store_true",
        help="skip the memory check on a capture twice as large",
    )
    parser.add_argument("--dir", type=Path, default=None, help="where to write the captures")
    parser.add_argument("--child", nargs=2, metavar=("TOOL", "PCAP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.scapy_packets)
        return

    workdir = Path(tempfile.mkdtemp(prefix="qw-bench-", dir=args.dir))
    sizes = [args.packets] if args.no_second_size else [args.packets, 2 * args.packets]
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}; every tool pinned to one core"
    )
    try:
        for i, size in enumerate(sizes):
            path = workdir / f"gen-{size}.pcap"
            n = generate(path, size)
            size_mb = path.stat().st_size / 1e6
            print(f"\ncapture: {n:,} packets, {size_mb:,.0f} MB (bench/gen_capture.py)")
            tools = ["quietwire", "no-payload", "nfstream", "scapy"] if i == 0 else ["quietwire"]
            limit = ("--scapy-packets", str(args.scapy_packets))
            # Each tool --repeat times, the runs of the tools interleaved; the fastest of each
            # (noise on a shared machine only ever slows a run down).
            runs: dict[str, list] = {t: [] for t in tools}
            for _ in range(args.repeat):
                for t in tools:
                    runs[t].append(measure(t, path, *limit))
            results = {t: min(r, key=lambda x: x["seconds"]) for t, r in runs.items()}
            print(
                f"{'tool':<10} {'packets':>10} {'flows':>8} {'seconds':>8} "
                f"{'packets/s':>11} {'peak RSS':>9}  quietwire is"
            )
            qw = results["quietwire"]["pps"]
            for tool, r in results.items():
                ratio = "" if tool == "quietwire" else f"{qw / r['pps']:.2f}x as fast"
                flows = "" if r["flows"] is None else f"{r['flows']:,}"
                print(
                    f"{tool:<10} {r['packets']:>10,} {flows:>8} {r['seconds']:>8.2f} "
                    f"{r['pps']:>11,.0f} {r['peak_rss_mib']:>6.0f} MiB  {ratio}"
                )
            if "no-payload" in results:
                off = results["no-payload"]["pps"]
                print(
                    f"payload statistics cost {1 - qw / off:.1%} of the meter's packets/s; "
                    f"ratio to nfstream {off / results['nfstream']['pps']:.2f}x without them, "
                    f"{qw / results['nfstream']['pps']:.2f}x with them"
                )
            path.unlink()
    finally:
        for leftover in workdir.glob("*"):
            leftover.unlink()
        workdir.rmdir()


if __name__ == "__main__":
    main()
