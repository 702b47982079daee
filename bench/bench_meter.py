"""Flow-meter benchmark: quietwire vs nfstream vs scapy on one generated capture, one core.

    python bench/bench_meter.py                  # 1,000,000 packets, then 2,000,000 for memory
    python bench/bench_meter.py --packets 200000 --no-second-size --open-flows ""  # quick

Then the whole `quietwire flows` command (CSV, and Parquet when the command can write it)
against nfstream's to_csv on the same file, with where quietwire's time goes
(bench/stage_times.py), the pcap record walk alone (lanes against the plain walk), and
captures of the same packet count with --open-flows flows open at once (gen_capture.py
generate_open), where quietwire's CPU time per packet is compared with its own at the first.
Those captures hold ten times the flows at ten times the count (and so ten times the rows
written): each whole command's time is then split into a cost per packet and a cost per row
written, and the cost per row that 1.5x the time per packet would allow is printed. The
controlled rows that follow (--waves F: gen_capture.py generate_waves) hold the flows, packets
per flow and flow durations equal and vary only how many are open at once.
Those rows are whole processes (start-up and import included): CPU seconds (user + system,
with reaped children: nfstream's meter process) from wait4, each pinned to CPU 0.

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


def _peak_rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_quietwire(path: str, payload: bool = True, max_flows: int = 0) -> dict:
    from quietwire.agent.capture.pcap import read_capture
    from quietwire.agent.features.meter import FlowMeter
    from quietwire.agent.flow.table import FlowConfig

    config = FlowConfig(payload=payload)
    if max_flows:
        config = FlowConfig(payload=payload, max_flows=max_flows)
    meter = FlowMeter(config)
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


def run_nfstream_csv(path: str, out: str) -> dict:
    from nfstream import NFStreamer

    start = time.perf_counter()
    streamer = NFStreamer(source=path, statistical_analysis=True, n_meters=1, n_dissections=0)
    flows = streamer.to_csv(path=out)
    return {"packets": None, "flows": flows, "seconds": time.perf_counter() - start}


def run_read(path: str, lanes: bool) -> dict:
    """The capture reader alone: the pcap record walk in lanes, or the plain walk."""
    from quietwire.agent.capture import pcap as capture

    capture.VECTOR_WALK = lanes
    start = time.perf_counter()
    cpu = time.process_time()
    packets = sum(len(batch) for batch in capture.read_capture(path))
    seconds = time.perf_counter() - start
    return {"packets": packets, "flows": None, "seconds": seconds, "cpu": time.process_time() - cpu}


def run_community_id(path: str) -> dict:
    """Community IDs of the capture's flows, in the writer's chunks: the batch (SHA-1 and
    base64 on arrays) and the reference one flow at a time (what the writer did before)."""
    from quietwire.agent.capture.pcap import read_capture
    from quietwire.agent.features.meter import FlowMeter
    from quietwire.agent.flow.communityid import community_id_chars, flow_community_ids_scalar
    from quietwire.agent.flow.records import FlowRecords
    from quietwire.agent.output.flowtable import ROW_CHUNK

    meter = FlowMeter()
    parts = [meter.add(batch).records for batch in read_capture(path)]
    flows = FlowRecords.concat([*parts, meter.flush().records])
    out: dict = {"packets": None, "flows": len(flows), "seconds": 0.0}
    for name, fn in (("batch", community_id_chars), ("scalar", flow_community_ids_scalar)):
        cpu = time.process_time()
        for lo in range(0, len(flows), ROW_CHUNK):
            fn(flows.take(slice(lo, lo + ROW_CHUNK)))
        out[name] = time.process_time() - cpu
    return out


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


def child(tool: str, path: str, limit: int, max_flows: int = 0) -> None:
    os.sched_setaffinity(0, {0})
    if tool == "quietwire":
        result = run_quietwire(path, max_flows=max_flows)
    elif tool == "nfstream-csv":
        result = run_nfstream_csv(path, path + ".nfstream.csv")
    elif tool in ("read", "read-plain"):
        result = run_read(path, lanes=tool == "read")
    elif tool == "no-payload":  # quietwire without payload statistics (flow.payload: false)
        result = run_quietwire(path, payload=False)
    elif tool == "nfstream":
        result = run_nfstream(path)
    elif tool == "community-id":
        result = run_community_id(path)
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
    if result["packets"] is not None:
        result["pps"] = result["packets"] / result["seconds"]
    return result


def run_process(cmd: list[str]) -> dict:
    """Run a command pinned to CPU 0; wall and CPU seconds (user + system, its reaped
    children's included) and peak RSS from wait4; its exit status and output."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(["taskset", "-c", "0", *cmd], stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # taskset execs the command: its pid
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return {
            "wall": wall,
            "cpu": usage.ru_utime + usage.ru_stime,
            "rss": usage.ru_maxrss / 1024,
            "rc": proc.returncode,
            "stdout": out.read().decode(errors="replace"),
            "stderr": err.read().decode(errors="replace").strip(),
        }


HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def compile_bytecode() -> None:
    """Byte-compile quietwire's modules, as installing a wheel does: an editable checkout
    run with PYTHONDONTWRITEBYTECODE (as on this project's machines) would otherwise compile
    every module from source at each start, which nfstream and numpy, installed with their
    bytecode, never do."""
    import compileall

    for package in ("agent", "quietwire", "rules", "trainer"):
        compileall.compile_dir(ROOT / package, quiet=2)


QUIETWIRE = [sys.executable, "-m", "quietwire.cli"]
OPEN_FLOWS_MAX = 2_000_000  # --max-flows of the open-flows rows: the table holds every flow


def generate_file(path: Path, packets: int, open_flows: int = 0, total_flows: int = 0) -> int:
    """Write a capture with gen_capture.py in its own process (so that the processes this
    one starts do not inherit its peak RSS: Linux carries it over fork and exec)."""
    cmd = [sys.executable, str(HERE / "gen_capture.py"), str(path), "--packets", str(packets)]
    if open_flows:
        cmd += ["--open-flows", str(open_flows)]
    if total_flows:
        cmd += ["--total-flows", str(total_flows)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return int(out.split()[1])


def child_cmd(tool: str, path: Path, max_flows: int = 0) -> list[str]:
    return [sys.executable, __file__, "--child", tool, str(path), "--max-flows", str(max_flows)]


def flows_cmd(path: Path, suffix: str, max_flows: int = 0) -> list[str]:
    extra = ["--max-flows", str(max_flows)] if max_flows else []
    return [*QUIETWIRE, "flows", str(path), "-o", f"{path}.{suffix}", "-q", *extra]


def fastest(tools: dict[str, list[str]], repeat: int) -> dict[str, dict]:
    """Run each command ``repeat`` times, interleaved; the run with the least CPU counts."""
    runs: dict[str, list] = {label: [] for label in tools}
    for _ in range(repeat):
        for label, cmd in tools.items():
            runs[label].append(run_process(cmd))
    return {label: min(r, key=lambda x: x["cpu"]) for label, r in runs.items()}


def print_processes(results: dict[str, dict], packets: int, peers: dict[str, str]) -> None:
    """A table of whole-process runs; ``peers`` names each row's nfstream row."""
    print(
        f"{'':<30} {'wall s':>7} {'cpu s':>7} {'packets/cpu-s':>14} {'peak RSS':>9}  "
        "quietwire is (per CPU second)"
    )
    for label, r in results.items():
        if r["rc"] != 0:
            why = r["stderr"].splitlines()[-1:] or [f"exit {r['rc']}"]
            print(f"{label:<30} skipped: the command failed ({why[0][:90]})")
            continue
        peer = results.get(peers.get(label, ""))
        ratio = ""
        if peer and peer["rc"] == 0:
            ratio = f"{peer['cpu'] / r['cpu']:.2f}x {peers[label]}"
        print(
            f"{label:<30} {r['wall']:>7.2f} {r['cpu']:>7.2f} {packets / r['cpu']:>14,.0f} "
            f"{r['rss']:>6,.0f} MiB  {ratio}"
        )


def print_stages(path: Path, max_flows: int = 0) -> None:
    """Where `quietwire flows -o FILE.csv` spends its CPU time (bench/stage_times.py)."""
    extra = ["--max-flows", str(max_flows)] if max_flows else []
    cmd = [sys.executable, str(HERE / "stage_times.py"), str(path), "-o", f"{path}.csv", "-q"]
    r = run_process([*cmd, *extra])
    if r["rc"] != 0:
        print(f"where the time goes: stage_times.py failed ({r['stderr'][-200:]})")
        return
    stages = json.loads(r["stdout"].strip().splitlines()[-1])
    stages.pop("status")
    total = sum(stages.values())
    parts = ", ".join(
        f"{name} {sec:.2f} s ({sec / total:.0%})"
        for name, sec in sorted(stages.items(), key=lambda kv: -kv[1])
        if sec >= 0.005 * total
    )
    print(f"where the CPU time of quietwire flows -o csv goes ({total:.2f} s): {parts}")


def print_walk(path: Path, repeat: int) -> None:
    """The capture reader alone, the pcap record walk in lanes against the plain walk."""
    runs: dict[str, list] = {"read": [], "read-plain": []}
    for _ in range(repeat):
        for tool in runs:
            runs[tool].append(measure(tool, path))
    lanes, plain = (min(runs[t], key=lambda x: x["cpu"]) for t in ("read", "read-plain"))
    print(
        f"pcap record walk: read_capture alone {lanes['packets'] / lanes['cpu']:,.0f} packets "
        f"per CPU second with lanes, {plain['packets'] / plain['cpu']:,.0f} with the plain walk "
        f"({plain['cpu'] / lanes['cpu']:.2f}x)"
    )


def print_community_id(path: Path) -> None:
    """Community ID per flow: the batch against the scalar reference, the capture's flows."""
    r = measure("community-id", path)
    print(
        f"community ID of {r['flows']:,} flows: {r['batch'] / r['flows'] * 1e6:.2f} us per flow "
        f"in batches (numpy SHA-1), {r['scalar'] / r['flows'] * 1e6:.2f} us one flow at a time "
        f"(hashlib; {r['scalar'] / r['batch']:.1f}x)"
    )


def open_flows_section(workdir: Path, packets: int, counts: list[int], repeat: int) -> None:
    """Captures of ``packets`` packets with each count of flows open at once."""
    per_packet: dict[int, dict[str, float]] = {}
    cost: dict[int, dict[str, tuple[int, int, float]]] = {}
    for k in counts:
        path = workdir / f"open-{k}.pcap"
        n = generate_file(path, packets, k)
        print(
            f"\ncapture: {n:,} packets, {k:,} flows open at once, "
            f"{path.stat().st_size / 1e6:,.0f} MB (gen_capture.py --open-flows {k}); "
            f"quietwire --max-flows {OPEN_FLOWS_MAX:,}"
        )
        tools = {
            "quietwire flow meter (API)": child_cmd("quietwire", path, OPEN_FLOWS_MAX),
            "quietwire flows -o csv": flows_cmd(path, "csv", OPEN_FLOWS_MAX),
            "nfstream (meter)": child_cmd("nfstream", path),
            "nfstream to_csv": child_cmd("nfstream-csv", path),
        }
        results = fastest(tools, repeat)
        peers = {
            "quietwire flow meter (API)": "nfstream (meter)",
            "quietwire flows -o csv": "nfstream to_csv",
        }
        print_processes(results, n, peers)
        per_packet[k] = {label: r["cpu"] / n for label, r in results.items() if r["rc"] == 0}
        cost[k] = {
            label: (n, output_rows(label, path, r), r["cpu"])
            for label, r in results.items()
            if r["rc"] == 0 and label in ROW_FIT
        }
        print_stages(path, OPEN_FLOWS_MAX)
        print_walk(path, repeat)
        for leftover in workdir.glob(f"open-{k}.pcap*"):
            leftover.unlink()
    base = counts[0]
    print(
        f"\nquietwire's CPU time per packet against its own at {base:,} open flows "
        "(target <= 1.5x):"
    )
    for label in ("quietwire flow meter (API)", "quietwire flows -o csv"):
        cells = [
            f"{k:,} open {per_packet[k][label] / per_packet[base][label]:.2f}x "
            f"({per_packet[k][label] * 1e6:.2f} us)"
            for k in counts
            if label in per_packet[k] and label in per_packet[base]
        ]
        print(f"  {label:<28} " + ", ".join(cells))
    print_row_fit(cost, base)


ROW_FIT = ("quietwire flows -o csv", "nfstream to_csv")


def output_rows(label: str, path: Path, result: dict) -> int:
    """Rows a whole-command run wrote: quietwire's CSV lines less the header (interim
    records included), nfstream's flows."""
    if label.startswith("nfstream"):
        return int(json.loads(result["stdout"].strip().splitlines()[-1])["flows"])
    lines = 0
    with open(f"{path}.csv", "rb") as handle:
        while chunk := handle.read(1 << 24):
            lines += chunk.count(b"\n")
    return lines - 1


def print_row_fit(cost: dict[int, dict[str, tuple[int, int, float]]], base: int) -> None:
    """Split each command's CPU time into a cost per packet and a cost per output row (cpu =
    packets x a + rows x b through the first capture and each other one), and the cost per row
    that 1.5x the first capture's time per packet would allow: the captures hold equal packets
    but more flows, so more rows, as more flows are open at once."""
    print(
        "\nwhat the time per packet is made of (cpu = packets x a + output rows x b, solved "
        f"through the {base:,}-open capture and each other one; a includes the fixed costs, "
        "such as the import):"
    )
    for label in ROW_FIT:
        for k in cost:
            if k == base or label not in cost[k] or label not in cost[base]:
                continue
            (p0, r0, t0), (p1, r1, t1) = cost[base][label], cost[k][label]
            if p0 != p1 or r1 == r0:
                continue
            b = (t1 - t0) / (r1 - r0)
            a = (t0 - r0 * b) / p0
            allowed = 0.5 * a * p0 / (r1 - 1.5 * r0) if r1 > 1.5 * r0 else float("inf")
            print(
                f"  {label:<24} {r0:,} rows at {base:,} open, {r1:,} at {k:,}: "
                f"a = {a * 1e6:.2f} us per packet, b = {b * 1e6:.1f} us per row; "
                f"{t1 / t0:.2f}x the time per packet; 1.5x would need b <= "
                f"{allowed * 1e6:.1f} us per row"
            )


def waves_section(
    workdir: Path, packets: int, counts: list[int], total_flows: int, repeat: int
) -> None:
    """The controlled rows: ``total_flows`` flows of equal length in every capture, in waves
    of each count open at once; quietwire's CPU time per packet against its own at the
    first count."""
    counts = [k for k in counts if k <= total_flows and total_flows % k == 0]
    if not counts:
        return
    print(
        f"\ncontrolled: {packets:,} packets of {total_flows:,} flows ({packets // total_flows} "
        "packets each, dealt round-robin over the same 100 s) in every capture; only how many "
        "are open at once differs (gen_capture.py --open-flows K --total-flows "
        f"{total_flows}: waves of K flows, 130 s apart); quietwire --max-flows "
        f"{OPEN_FLOWS_MAX:,}, best of {repeat}"
    )
    print(f"{'':<40} {'cpu s':>7} {'us/packet':>10} {'peak RSS':>9}  against the first")
    per_packet: dict[str, float] = {}
    for k in counts:
        path = workdir / f"waves-{k}.pcap"
        n = generate_file(path, packets, k, total_flows)
        tools = {
            "quietwire flow meter (API)": child_cmd("quietwire", path, OPEN_FLOWS_MAX),
            "quietwire flows -o csv": flows_cmd(path, "csv", OPEN_FLOWS_MAX),
        }
        for label, r in fastest(tools, repeat).items():
            if r["rc"] != 0:
                print(f"{label}, {k:,} open: the command failed ({r['stderr'][-90:]})")
                continue
            us = r["cpu"] / n * 1e6
            base = per_packet.setdefault(label, us)
            name = f"{label}, {k:,} open"
            print(
                f"{name:<40} {r['cpu']:>7.2f} {us:>10.2f} {r['rss']:>6,.0f} MiB  {us / base:.2f}x"
            )
        for leftover in workdir.glob(f"waves-{k}.pcap*"):
            leftover.unlink()


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
    parser.add_argument(
        "--open-flows",
        default="20000,200000,1000000",
        help="flows open at once in the equal-packet-count captures (comma-separated; '' none)",
    )
    parser.add_argument(
        "--waves",
        type=int,
        default=200_000,
        metavar="F",
        help="controlled rows after the open-flow ones: F flows in all, in waves of each "
        "--open-flows count that divides F (0: none)",
    )
    parser.add_argument("--max-flows", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--child", nargs=2, metavar=("TOOL", "PCAP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.scapy_packets, args.max_flows)
        return

    compile_bytecode()
    workdir = Path(tempfile.mkdtemp(prefix="qw-bench-", dir=args.dir))
    sizes = [args.packets] if args.no_second_size else [args.packets, 2 * args.packets]
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}; every tool pinned to one core; quietwire's "
        "modules byte-compiled first, as an install does"
    )
    try:
        for i, size in enumerate(sizes):
            path = workdir / f"gen-{size}.pcap"
            n = generate_file(path, size)
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
            if i == 0:
                print(f"\nthe whole command on the same capture (best of {args.repeat}):")
                whole = {
                    "quietwire flows -o csv": flows_cmd(path, "csv"),
                    "quietwire flows -o parquet": flows_cmd(path, "parquet"),
                    "nfstream to_csv": child_cmd("nfstream-csv", path),
                }
                peers = dict.fromkeys(list(whole)[:2], "nfstream to_csv")
                print_processes(fastest(whole, args.repeat), n, peers)
                print_stages(path)
                print_community_id(path)
                print_walk(path, args.repeat)
            for leftover in workdir.glob(f"{path.name}*"):
                leftover.unlink()
        counts = [int(k) for k in args.open_flows.split(",") if k.strip()]
        if counts:
            open_flows_section(workdir, args.packets, counts, args.repeat)
        if counts and args.waves:
            waves_section(workdir, args.packets, counts, args.waves, args.repeat)
    finally:
        for leftover in workdir.glob("*"):
            leftover.unlink()
        workdir.rmdir()


if __name__ == "__main__":
    main()
