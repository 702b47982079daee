"""Capture workers on a veth pair: `quietwire run` with 1 worker (one process) and with 2
(capture.workers: 2, two worker processes and the central stage), each fed one generated
capture by tcpreplay at top speed; kernel drops, whether the flows equal `quietwire replay`'s
of the same capture, and CPU seconds per million packets of each process role; then a table
projecting N workers.

    sudo python bench/bench_workers.py                  # 500,000 packets
    sudo python bench/bench_workers.py --packets 200000

Each daemon writes a flow log; its closed flows are compared with replay's by community id:
packet and byte counts and every feature that timing cannot change (top speed squeezes the
capture into about a second: durations, rates, inter-arrival times and host windows differ).
CPU seconds come from the daemon's stop line: each worker's own (time.process_time in the
worker) and the central stage's (the daemon process); the one-process daemon's from wait4.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
sys.path.insert(0, str(HERE))

from bench_agent import start_daemon  # noqa: E402

from quietwire.agent.features.context import CONTEXT_FEATURES  # noqa: E402
from quietwire.agent.features.schema import FEATURE_NAMES, SCHEMA  # noqa: E402

TIMING = {f.name for f in SCHEMA if f.unit in ("s", "packets/s", "bytes/s")} | set(CONTEXT_FEATURES)


def closed_flows(path: Path) -> dict[str, list]:
    """Closed flows of a flow log by community id: counts and the timing-free features."""
    kept = [n for n in FEATURE_NAMES if n not in TIMING]
    out: dict[str, list] = {}
    for line in path.open():
        rec = json.loads(line)
        if rec["flow"]["state"] != "closed":
            continue
        f, feats = rec["flow"], rec["quietwire"]["features"]
        row = [f["pkts_toserver"], f["pkts_toclient"], f["bytes_toserver"], f["bytes_toclient"]]
        out.setdefault(rec["community_id"], []).append(row + [feats[n] for n in kept])
    return {k: sorted(v, key=repr) for k, v in out.items()}


def _children(pid: int) -> list[int]:
    """The capture worker processes of a daemon, by worker index (start order)."""
    out = subprocess.run(
        ["pgrep", "-P", str(pid), "-f", "spawn_main"], capture_output=True, text=True
    ).stdout
    return sorted(int(x) for x in out.split())


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_daemon(exec_ns, work: Path, capture: Path, workers: int, ring_blocks: int) -> dict:
    config = work / f"config{workers}.yaml"
    flow_log = work / f"live{workers}.json"
    config.write_text(
        f"capture: {{interfaces: [qwb], workers: {workers}, ring_blocks: {ring_blocks}}}\n"
        f"flow_log: {{path: {flow_log}}}\nalerts: {{file: {work}/alerts{workers}.json}}\n"
        "metrics: false\n"
    )
    log = work / f"daemon{workers}.log"
    proc = start_daemon(exec_ns, config, log)
    time.sleep(1.0)  # the workers' start-up is not what is measured: CPU before sending is not
    pids = [proc.pid, *_children(proc.pid)]
    before = {pid: _cpu_s(pid) for pid in pids}
    sent = subprocess.run(
        [*exec_ns, "tcpreplay", "-i", "qwa", "--topspeed", str(capture)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    time.sleep(3.0)
    proc.send_signal(signal.SIGTERM)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text()
    m = re.search(r"stopped: (\d+) packets, (\d+) flows, .*?(\d+) kernel drops", text)
    if proc.returncode != 0 or not m:
        raise SystemExit(text)
    workers_before = [before[p] for p in pids[1:]]
    roles = {
        f"worker {i}": (int(p), float(s) - workers_before[int(i)])
        for i, p, s in re.findall(r"worker (\d+) (\d+) packets ([\d.]+) CPU s", text)
    }
    central = re.search(r"central stage ([\d.]+) CPU s", text)
    return {
        "workers": workers,
        "sent": int(re.search(r"Actual: (\d+) packets", sent).group(1)),
        "pps": float(re.search(r"([\d.]+) pps", sent).group(1)),
        "packets": int(m.group(1)),
        "flows": int(m.group(2)),
        "drops": int(m.group(3)),
        "roles": roles,
        "central_cpu": float(central.group(1)) - before[proc.pid] if central else None,
        "total_cpu": usage.ru_utime + usage.ru_stime - sum(before.values()),
        "flow_log": flow_log,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=500_000)
    parser.add_argument("--ring-blocks", type=int, default=256, help="1 MiB blocks per ring")
    args = parser.parse_args()
    if os.geteuid() != 0 or not shutil.which("tcpreplay") or not shutil.which("ip"):
        raise SystemExit("needs root, ip and tcpreplay")
    work = Path(tempfile.mkdtemp(prefix="qw-workers-"))
    ns = f"qwbw{os.getpid()}"
    sh = lambda *a: subprocess.run(a, check=True, capture_output=True, text=True)  # noqa: E731
    try:
        capture = work / "capture.pcap"
        sh(
            sys.executable,
            str(HERE / "gen_capture.py"),
            str(capture),
            "--packets",
            str(args.packets),
        )
        started = time.perf_counter()
        replay = subprocess.run(
            [
                sys.executable,
                "-m",
                "quietwire.cli",
                "replay",
                str(capture),
                "--flow-log",
                str(work / "replay.json"),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
        replay_s = time.perf_counter() - started
        r = re.search(r"replay: (\d+) packets, (\d+) flows", replay)
        reference = closed_flows(work / "replay.json")
        sh("ip", "netns", "add", ns)
        exec_ns = ["ip", "netns", "exec", ns]
        sh(*exec_ns, "ip", "link", "add", "qwa", "type", "veth", "peer", "name", "qwb")
        for dev in ("qwa", "qwb"):
            sh(*exec_ns, "sysctl", "-q", f"net.ipv6.conf.{dev}.disable_ipv6=1")
            sh(*exec_ns, "ip", "link", "set", dev, "mtu", "9000", "up")
        print(
            f"capture: {args.packets:,} packets (bench/gen_capture.py); replay: "
            f"{int(r.group(1)):,} packets, {int(r.group(2)):,} flows in {replay_s:.1f} s"
        )
        print(f"tcpreplay --topspeed onto a veth pair; rings of {args.ring_blocks} x 1 MiB")
        print(
            f"{'workers':>7} {'sent pps':>10} {'captured':>9} {'drops':>6} {'flows':>7} "
            f"{'= replay':>8} {'= 1 worker':>10}  CPU s per million packets"
        )
        runs, first = [], None
        for workers in (1, 2):
            run = run_daemon(exec_ns, work, capture, workers, args.ring_blocks)
            live = closed_flows(run["flow_log"])
            first = live if first is None else first
            same_as_one = "yes" if live == first else "no"
            same = live == reference
            differ = [k for k in set(live) | set(reference) if live.get(k) != reference.get(k)]
            if os.environ.get("QW_BENCH_DEBUG"):
                for k in differ[:3]:
                    print(k, "live", live.get(k), "replay", reference.get(k), sep="\n  ")
            differ = len(differ)
            per_m = 1e6 / max(run["packets"], 1)
            if workers == 1:
                roles = f"one process {run['total_cpu'] * per_m:.2f}"
            else:
                roles = ", ".join(
                    f"{name} {cpu * 1e6 / max(p, 1):.2f} (its {p:,} packets)"
                    for name, (p, cpu) in sorted(run["roles"].items())
                )
                roles += f", central stage {run['central_cpu'] * per_m:.2f}"
                roles += f"; all processes {run['total_cpu'] * per_m:.2f}"
            print(
                f"{workers:>7} {run['pps']:>10,.0f} {run['packets']:>9,} {run['drops']:>6,} "
                f"{run['flows']:>7,} {'yes' if same else f'no ({differ})':>8} {same_as_one:>10}  "
                f"{roles}"
            )
            runs.append(run)
        project(runs[1])
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


def project(run: dict) -> None:
    """N workers from the 2-worker run: each worker's packets per CPU second, the central
    stage's flows per CPU second, and the capture's flows per packet."""
    worker_pps = min(p / cpu for p, cpu in run["roles"].values() if cpu > 0)
    central_fps = run["flows"] / run["central_cpu"]
    flows_per_packet = run["flows"] / run["packets"]
    central_pps = central_fps / flows_per_packet
    print(
        f"\nper worker {worker_pps:,.0f} packets per CPU second (the slower of the two); "
        f"central stage {central_fps:,.0f} flows per CPU second; "
        f"{flows_per_packet * 1000:.1f} flows per 1,000 packets"
    )
    print(
        "projection, assuming workers scale linearly (one core each, fanout spreading flows "
        "evenly) until the central stage (one core) saturates:"
    )
    print(f"{'workers':>7} {'packets/s':>12}  limited by")
    for n in (1, 2, 4, 8, 16, 32):
        pps = min(n * worker_pps, central_pps)
        print(f"{n:>7} {pps:>12,.0f}  {'workers' if n * worker_pps < central_pps else 'central'}")


if __name__ == "__main__":
    main()
