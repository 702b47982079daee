"""The `quietwire` command. Each subcommand turns the stage errors it can meet into one line
on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from . import __version__
from .agent.capture import CaptureError, read_capture
from .agent.context import ContextConfig
from .agent.features import SCHEMA, SCHEMA_HASH, SCHEMA_NAME, SCHEMA_VERSION
from .agent.flowfile import FORMATS, FlowFileError, FlowWriter
from .agent.flows import FlowConfig
from .agent.meter import FlowMeter

DEFAULT_CAPTURE = Path(__file__).parent / "data" / "sample.pcap"


def _error(msg: str) -> None:
    print(f"quietwire: error: {msg}", file=sys.stderr)


class _Progress:
    """A one-line progress display on a terminal; silent otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._last = 0.0

    def update(self, name: str, done: int, total: int, packets: int) -> None:
        now = time.monotonic()
        if not self.enabled or now - self._last < 0.2:
            return
        self._last = now
        pct = 100.0 * done / total if total else 100.0
        bar = "#" * int(pct / 5)
        print(
            f"\r{name[-30:]:>30} [{bar:<20}] {pct:5.1f}% {packets:,} packets",
            end="",
            file=sys.stderr,
            flush=True,
        )

    def done(self) -> None:
        if self.enabled:
            print("\r" + " " * 78 + "\r", end="", file=sys.stderr, flush=True)


def cmd_flows(args: argparse.Namespace) -> int:
    try:
        flow_config = FlowConfig(
            idle_timeout_s=args.idle_timeout,
            active_timeout_s=args.active_timeout,
            max_flows=args.max_flows,
        )
        context_config = ContextConfig(window_s=args.host_window)
    except ValueError as exc:
        _error(str(exc))
        return 2
    fmt = args.format or ("jsonl" if args.output and args.output.suffix == ".jsonl" else "csv")
    out = sys.stdout
    if args.output:
        try:
            out = args.output.open("w", newline="")
        except OSError as exc:
            _error(f"{args.output}: cannot write: {exc.strerror}")
            return 2
    progress = _Progress(sys.stderr.isatty() and not args.quiet)
    writer = FlowWriter(out, fmt)
    failed = False
    started = time.perf_counter()
    packets = flows = 0
    for path in args.files:
        meter = FlowMeter(flow_config, context_config)
        total = path.stat().st_size if path.exists() else 0

        def on_progress(done: int, path=path, total=total, meter=meter) -> None:
            progress.update(str(path), done, total, meter.stats.decode.packets)

        try:
            for batch in read_capture(path, on_progress=on_progress):
                writer.write(meter.add(batch))
        except CaptureError as exc:
            progress.done()
            _error(str(exc))
            failed = True
        writer.write(meter.flush())  # what was decoded before any damage is still written
        progress.done()
        st = meter.stats
        packets += st.decode.packets
        flows += st.flows_ended
        if not args.quiet:
            errors = ", ".join(f"{k} {v}" for k, v in sorted(st.decode.errors.items()) if v)
            print(
                f"{path}: {st.decode.packets} packets, {st.flows_ended} flows"
                + (f", skipped: {errors}" if errors else ""),
                file=sys.stderr,
            )
    if out is not sys.stdout:
        out.close()
    elapsed = time.perf_counter() - started
    if not args.quiet:
        print(
            f"total: {packets} packets, {flows} flows in {elapsed:.2f} s "
            f"({packets / max(elapsed, 1e-9):,.0f} packets/s)"
            + (f", written to {args.output} ({fmt})" if args.output else ""),
            file=sys.stderr,
        )
    return 1 if failed else 0


def cmd_schema(args: argparse.Namespace) -> int:
    print(
        f"# {SCHEMA_NAME} v{SCHEMA_VERSION}, schema hash {SCHEMA_HASH}, "
        f"{len(SCHEMA)} float32 features (NaN = does not apply)"
    )
    for f in SCHEMA:
        print(f"{f.name}\t{f.unit}\t{'nullable' if f.nullable else '-'}\t{f.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quietwire", description="Network-flow anomaly detection: flows, features, scores."
    )
    parser.add_argument("--version", action="version", version=f"quietwire {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    flows = sub.add_parser(
        "flows",
        help="extract bidirectional flows and their features from captures",
        description="Read pcap/pcapng files and write one row per flow: identity (EVE/conn.log "
        "field names) and every feature of the schema. Each file is metered on its own.",
    )
    flows.add_argument(
        "files",
        nargs="*",
        type=Path,
        default=[DEFAULT_CAPTURE],
        help="capture files (default: the bundled sample capture)",
    )
    flows.add_argument("-o", "--output", type=Path, help="output file (default: stdout)")
    flows.add_argument(
        "-f",
        "--format",
        choices=FORMATS,
        help="csv or jsonl (default: from the output suffix, else csv)",
    )
    flows.add_argument(
        "--idle-timeout",
        type=float,
        default=FlowConfig.idle_timeout_s,
        metavar="S",
        help="end a flow after S seconds without packets (120)",
    )
    flows.add_argument(
        "--active-timeout",
        type=float,
        default=FlowConfig.active_timeout_s,
        metavar="S",
        help="end a flow S seconds after its start (1800)",
    )
    flows.add_argument(
        "--max-flows",
        type=int,
        default=FlowConfig.max_flows,
        metavar="N",
        help="flow-table size; the longest-idle flows are evicted beyond it",
    )
    flows.add_argument(
        "--host-window",
        type=float,
        default=ContextConfig.window_s,
        metavar="S",
        help="window of the per-host context features (60)",
    )
    flows.add_argument("-q", "--quiet", action="store_true", help="no progress or summary")
    flows.set_defaults(func=cmd_flows)

    schema = sub.add_parser(
        "schema",
        help="print the feature schema",
        description="Print every feature: name, unit, nullable, meaning.",
    )
    schema.set_defaults(func=cmd_schema)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FlowFileError as exc:
        _error(str(exc))
        return 2
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
