"""One lab run: build the network, start the servers, capture on the LAN bridge while a seeded
schedule of benign work and attacks runs, then write the capture, the events and the flow
labels, and tear everything down (also when interrupted).

Output folder: ``capture.pcap``, ``events.jsonl`` (one line per event: tool and version,
arguments, actor namespace/address/MAC, targets, start and end, exit status, outcome, ATT&CK
technique), ``labels.csv`` (one row per flow), ``run.json`` (seed, duration, capture counts,
time and memory).
"""

from __future__ import annotations

import importlib.metadata
import json
import random
import re
import resource
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from quietwire.trainer.lab import topology
from quietwire.trainer.lab.actions import BENIGN, Action, Context, actors_of
from quietwire.trainer.lab.attacks import ATTACKS
from quietwire.trainer.lab.services import USERS, Services
from quietwire.trainer.lab.topology import BY_NAME, LAN_BRIDGE, SWITCH

TOOLS = (
    "ip",
    "ethtool",
    "tcpdump",
    "samba",
    "samba-tool",
    "nginx",
    "vsftpd",
    "dnsmasq",
    "iodined",
    "iodine",
    "nmap",
    "masscan",
    "hydra",
    "medusa",
    "hping3",
    "slowhttptest",
    "sqlmap",
    "curl",
    "wget",
    "dig",
    "ssh",
    "scp",
    "lftp",
    "smbclient",
    "kinit",
    "ldapsearch",
    "rpcclient",
    "openssl",
)
GRACE_S = 3.0  # an actor's benign work keeps this far from its own attacks


@dataclass(frozen=True)
class Event:
    action: Action
    actor: str
    start_at: float  # seconds after the schedule starts
    slot_s: float  # the time it may take


def schedule(seed: int, duration_s: float, attacks: tuple[Action, ...]) -> list[Event]:
    """Attacks laid end to end per actor across the run; benign work per client on its own
    jittered timer, kept clear of that host's attacks."""
    rng = random.Random(seed)
    events: list[Event] = []
    lanes: dict[str, list[Action]] = {}
    for action in attacks:
        who = actors_of(action)
        lane = min(who, key=lambda a: (len(lanes.get(a, [])), who.index(a)))
        lanes.setdefault(lane, []).append(action)
    busy: dict[str, list[tuple[float, float]]] = {}
    start, end = 0.08 * duration_s, 0.95 * duration_s
    for actor, actions in lanes.items():
        rng.shuffle(actions)
        slot = (end - start) / len(actions)
        for i, action in enumerate(actions):
            at = start + i * slot + rng.uniform(0, 0.1 * slot)
            length = max(action.min_s, 0.5 * slot)
            events.append(Event(action, actor, at, length))
            busy.setdefault(actor, []).append((at - GRACE_S, at + length + GRACE_S))
    for host in BY_NAME.values():
        if host.role not in ("client", "admin"):
            continue
        habits = _habits(rng, host.name)
        t = rng.uniform(0, 5)
        while t < duration_s - 5:
            action = rng.choices(habits[0], weights=habits[1])[0]
            slot = max(action.min_s, rng.uniform(5, 20))
            slot = min(slot, duration_s - t)
            clash = any(a < t + slot and t < b for a, b in busy.get(host.name, []))
            if slot >= action.min_s and not clash:
                events.append(Event(action, host.name, t, slot))
                t += slot
            t += rng.expovariate(1 / habits[2])
    return sorted(events, key=lambda e: e.start_at)


def _habits(rng: random.Random, host: str) -> tuple[list[Action], list[float], float]:
    """Each host its own mix of work and its own pace."""
    mine = [a for a in BENIGN if host in actors_of(a)]
    weights = [rng.uniform(0.2, 3.0) for _ in mine]
    return mine, weights, rng.uniform(2.0, 8.0)


def tool_versions() -> dict[str, str]:
    versions = {}
    for tool, flag in (
        ("nmap", "--version"),
        ("masscan", "--version"),
        ("hydra", "-h"),
        ("medusa", "-V"),
        ("hping3", "--version"),
        ("slowhttptest", "-h"),
        ("sqlmap", "--version"),
        ("curl", "--version"),
        ("wget", "--version"),
        ("iodine", "-v"),
        ("ssh", "-V"),
        ("lftp", "--version"),
        ("smbclient", "--version"),
        ("samba-tool", "--version"),
        ("dig", "-v"),
        ("rpcclient", "--version"),
    ):
        proc = subprocess.run([tool, flag], capture_output=True, text=True)
        text = (proc.stdout + proc.stderr).strip().splitlines()
        line = next((x for x in text if re.search(r"\d+\.\d+", x)), "")
        versions[tool] = line.strip()[:120]
    try:
        versions["impacket"] = "impacket " + importlib.metadata.version("impacket")
    except importlib.metadata.PackageNotFoundError:
        versions["impacket"] = ""
    versions["ldapsearch"] = versions["kinit"] = "Debian package"
    versions["scp"] = versions["ssh"]
    return versions


class _Runner:
    def __init__(self, workdir: Path, seed: int, versions: dict[str, str], t0: float) -> None:
        self.workdir = workdir
        self.seed = seed
        self.versions = versions
        self.t0 = t0
        self.lock = threading.Lock()
        self.records: list[dict] = []
        self.stop = threading.Event()

    def run_host(self, events: list[Event]) -> None:
        for i, ev in enumerate(events):
            delay = self.t0 + ev.start_at - time.time()
            if self.stop.wait(max(0.0, delay)):
                return
            self._run_one(ev, i)

    def _run_one(self, ev: Event, i: int) -> None:
        rng = random.Random(f"{self.seed}-{ev.actor}-{i}-{ev.action.name}")
        ctx = Context(self.workdir, rng, ev.slot_s)
        argv = ev.action.command(ctx, ev.actor)
        host = BY_NAME[ev.actor]
        start = time.time()
        try:
            proc = subprocess.run(
                ["ip", "netns", "exec", host.ns, *argv],
                capture_output=True,
                stdin=subprocess.DEVNULL,
                timeout=ev.slot_s + 15,
                cwd=self.workdir,  # tools drop files where they run (secretsdump, sqlmap)
            )
            rc, out = proc.returncode, (proc.stdout + proc.stderr).decode("utf-8", "replace")
        except subprocess.TimeoutExpired as exc:
            rc = -9
            out = ((exc.stdout or b"") + (exc.stderr or b"")).decode("utf-8", "replace")
        end = time.time()
        a = ev.action
        record = {
            "kind": a.kind,
            "activity": a.name,
            "tool": a.tool,
            "version": self.versions.get(a.tool, ""),
            "argv": argv,
            "actor": {"name": host.name, "ns": host.ns, "ip": host.ip, "mac": host.mac},
            "targets": list(a.targets),
            "relays": [list(r) for r in a.relays],
            "spoofed": a.spoofed,
            "start": round(start, 6),
            "end": round(end, 6),
            "exit": rc,
            "outcome": a.outcome(rc, out) if rc != -9 or a.attack else "timeout",
            "technique": a.technique,
            "output_tail": out[-300:],
        }
        with self.lock:
            self.records.append(record)


def _keys(workdir: Path) -> None:
    keys = workdir / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    for user in USERS:
        key = keys / user.name
        if not key.exists():
            topology.run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
        ssh = Path("/home") / user.name / ".ssh"
        ssh.mkdir(mode=0o700, exist_ok=True)
        (ssh / "authorized_keys").write_text((keys / f"{user.name}.pub").read_text())
        shutil.chown(ssh, user.name, user.name)
        shutil.chown(ssh / "authorized_keys", user.name, user.name)


def _capture(workdir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            SWITCH,
            "tcpdump",
            "-i",
            LAN_BRIDGE,
            "-Z",
            "root",  # the run's folder may be root's alone (a test's tmp_path)
            "-n",
            "-s",
            "0",
            "-B",
            "65536",
            "-w",
            str(workdir / "capture.pcap"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _capture_counts(text: str) -> dict[str, int]:
    counts = {}
    for key, pattern in (
        ("captured", r"(\d+) packets? captured"),
        ("received", r"(\d+) packets? received by filter"),
        ("dropped", r"(\d+) packets? dropped by kernel"),
    ):
        m = re.search(pattern, text)
        counts[key] = int(m.group(1)) if m else -1
    return counts


def run_lab(
    out: Path,
    seed: int,
    duration_s: float,
    attacks: tuple[Action, ...] = ATTACKS,
    cache: Path | None = None,
    log=print,
) -> dict:
    """One run into ``out``; returns its run.json facts."""
    topology.require_root_and_tools(list(TOOLS))
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    cache = cache or Path.home() / ".cache" / "quietwire" / "lab"
    services = Services(work, cache)
    previous = signal.signal(signal.SIGTERM, _as_interrupt)
    try:
        log("lab: building the network")
        facts = topology.build(work)
        _keys(work)
        log(
            "lab: starting servers (Samba AD DC, nginx + web app, OpenSSH, vsftpd, dnsmasq, "
            "iodined, internet HTTPS)"
        )
        services.start()
        versions = tool_versions()
        events = schedule(seed, duration_s, attacks)
        cap = _capture(work)
        time.sleep(1.0)
        t0 = time.time() + 1.0
        log(
            f"lab: {len(events)} events over {duration_s:.0f} s "
            f"({sum(e.action.attack for e in events)} attacks), capturing on {LAN_BRIDGE}"
        )
        records = _play(_Runner(work, seed, versions, t0), events)
        time.sleep(2.0)  # the last answers reach the capture
        cap.send_signal(signal.SIGINT)
        counts = _capture_counts(cap.communicate(timeout=30)[1])
        shutil.move(str(work / "capture.pcap"), out / "capture.pcap")
    finally:
        services.stop()
        topology.teardown()
        signal.signal(signal.SIGTERM, previous)
    with (out / "events.jsonl").open("w") as f:
        for i, r in enumerate(records):
            f.write(json.dumps({"id": i, **r}, sort_keys=True) + "\n")
    facts.update(
        seed=seed,
        duration_s=duration_s,
        events=len(records),
        attacks=sum(r["kind"] != "benign" for r in records),
        capture=counts,
        seconds=round(time.perf_counter() - started, 1),
        max_rss_mib=_peak_rss_mib(),
    )
    (out / "run.json").write_text(json.dumps(facts, indent=1, sort_keys=True) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return facts


def _play(runner: _Runner, events: list[Event]) -> list[dict]:
    """Each host's events in order on its own thread; the records in start order."""
    by_host: dict[str, list[Event]] = {}
    for ev in events:
        by_host.setdefault(ev.actor, []).append(ev)
    threads = [
        threading.Thread(target=runner.run_host, args=(evs,), daemon=True)
        for evs in by_host.values()
    ]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join()
    finally:
        runner.stop.set()
    return sorted(runner.records, key=lambda r: r["start"])


def _peak_rss_mib() -> float:
    """The largest resident set of this process or of any program it ran (servers, tools)."""
    usage = (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    return round(max(resource.getrusage(u).ru_maxrss for u in usage) / 1024, 1)


def _as_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
