"""`quietwire lab`: labelled traffic from real servers, clients and attack tools (needs root)."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from .common import error


def cmd_lab_install(args: argparse.Namespace) -> int:
    from quietwire.trainer.lab.packages import install

    return install(dry_run=args.dry_run)


def cmd_lab_kinds(args: argparse.Namespace) -> int:
    from quietwire.trainer.lab.actions import BENIGN
    from quietwire.trainer.lab.attacks import ATTACKS

    for a in ATTACKS:
        print(f"{a.kind:28} {a.tool:13} {a.technique}")
    print(f"benign: {', '.join(sorted({f'{a.name} ({a.tool})' for a in BENIGN}))}")
    return 0


def cmd_lab_run(args: argparse.Namespace) -> int:
    from quietwire.trainer.lab.attacks import ATTACK_BY_KIND, ATTACKS
    from quietwire.trainer.lab.run import run_lab

    if args.attacks == "all":
        attacks = ATTACKS
    else:
        unknown = [k for k in args.attacks.split(",") if k not in ATTACK_BY_KIND]
        if unknown:
            error(f"--attacks: unknown kinds {', '.join(unknown)} (quietwire lab kinds)")
            return 2
        attacks = tuple(ATTACK_BY_KIND[k] for k in args.attacks.split(","))
    try:
        facts = run_lab(
            args.out,
            args.seed,
            args.minutes * 60,
            attacks,
            args.cache,
            log=lambda m: print(m, file=sys.stderr, flush=True),
        )
    except KeyboardInterrupt:
        error("interrupted: the lab is torn down")
        return 130
    cap = facts["capture"]
    print(
        f"lab: {facts['events']} events ({facts['attacks']} attacks) in "
        f"{facts['duration_s']:.0f} s of traffic; capture {cap['captured']} packets, "
        f"{cap['dropped']} dropped by the kernel; {facts['seconds']:.0f} s, "
        f"peak RSS {facts['max_rss_mib']:.0f} MiB",
        file=sys.stderr,
    )
    return _label(args.out)


def cmd_lab_label(args: argparse.Namespace) -> int:
    return _label(args.run)


def _label(run: Path) -> int:
    from quietwire.trainer.lab.labels import label_run, read_events, write_labels

    labelled = label_run(run)
    write_labels(labelled, run / "labels.csv")
    events = read_events(run / "events.jsonl")
    print(summary(labelled, events))
    silent = [e for e in events if not labelled.packets_per_event.get(e["id"])]
    for e in silent:
        error(f"event {e['id']} ({e['activity']} by {e['actor']['name']}) sent no packet")
    return 1 if silent else 0


def summary(labelled, events: list[dict]) -> str:
    flows = Counter(labelled.labels.tolist())
    lines = [f"{'kind':28} {'tool':13} {'technique':10} {'outcome':10} {'packets':>8} {'flows':>7}"]
    for e in events:
        if e["kind"] == "benign":
            continue
        lines.append(
            f"{e['kind']:28} {e['tool']:13} {e['technique']:10} {e['outcome']:10} "
            f"{labelled.packets_per_event.get(e['id'], 0):8d} {flows.get(e['kind'], 0):7d}"
        )
    programs = sorted({e["tool"] for e in events if e["kind"] == "benign"})
    tools = sorted({e["tool"] for e in events if e["kind"] != "benign"})
    kinds = sorted({e["kind"] for e in events if e["kind"] != "benign"})
    lines.append(
        f"{len(kinds)} attack kinds from {len(tools)} tools ({', '.join(tools)}); benign work "
        f"from {len(programs)} client programs ({', '.join(programs)}); flows: "
        f"{len(labelled.labels)} ({flows.get('benign', 0)} benign, {flows.get('mixed', 0)} "
        "mixed)"
    )
    return "\n".join(lines)


def register(sub) -> None:
    lab = sub.add_parser(
        "lab",
        help="labelled traffic from real servers, clients and attack tools (root)",
        description="Build a network of namespaces with real servers (Samba AD DC, nginx, "
        "OpenSSH, vsftpd, dnsmasq), run a seeded schedule of benign work and attacks with "
        "real tools, capture it at one point and label every flow. See docs/lab.md.",
    )
    actions = lab.add_subparsers(dest="lab_command", required=True, metavar="ACTION")
    run = actions.add_parser("run", help="build, run a schedule, capture and label")
    run.add_argument("out", type=Path, help="output folder (capture.pcap, events, labels)")
    run.add_argument("--seed", type=int, default=1)
    run.add_argument("--minutes", type=float, default=10.0, help="traffic time (10)")
    run.add_argument(
        "--attacks", default="all", help="comma-separated kinds (quietwire lab kinds), or all"
    )
    run.add_argument(
        "--cache", type=Path, help="where the provisioned domain is kept (~/.cache/quietwire/lab)"
    )
    run.set_defaults(func=cmd_lab_run)
    label = actions.add_parser("label", help="label a run's flows again (labels.csv)")
    label.add_argument("run", type=Path)
    label.set_defaults(func=cmd_lab_label)
    kinds = actions.add_parser("kinds", help="list the attacks and the benign work")
    kinds.set_defaults(func=cmd_lab_kinds)
    install = actions.add_parser("install", help="install the lab's programs (apt-get, pip)")
    install.add_argument("--dry-run", action="store_true", help="print the commands only")
    install.set_defaults(func=cmd_lab_install)
