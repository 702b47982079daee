"""`quietwire flows` (captures to flow tables) and `quietwire schema`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from quietwire.agent.capture import CaptureError, read_capture
from quietwire.agent.context import ContextConfig
from quietwire.agent.features import SCHEMA, SCHEMA_HASH, SCHEMA_NAME, SCHEMA_VERSION
from quietwire.agent.flowfile import FORMATS, FlowWriter
from quietwire.agent.flows import FlowConfig
from quietwire.agent.meter import FlowMeter
from quietwire.agent.model import DEFAULT_MODEL, ModelError, ScoringModel

from .common import DEFAULT_CAPTURE, Progress, error


def cmd_flows(args: argparse.Namespace) -> int:
    try:
        flow_config = FlowConfig(
            idle_timeout_s=args.idle_timeout,
            active_timeout_s=args.active_timeout,
            max_flows=args.max_flows,
        )
        context_config = ContextConfig(window_s=args.host_window)
    except ValueError as exc:
        error(str(exc))
        return 2
    fmt = args.format or ("jsonl" if args.output and args.output.suffix == ".jsonl" else "csv")
    out = sys.stdout
    if args.output:
        try:
            out = args.output.open("w", newline="")
        except OSError as exc:
            error(f"{args.output}: cannot write: {exc.strerror}")
            return 2
    model = None
    if args.score or args.model:
        try:
            model = ScoringModel(args.model or DEFAULT_MODEL)
        except ModelError as exc:
            error(str(exc))
            return 2
    progress = Progress(sys.stderr.isatty() and not args.quiet)
    writer = FlowWriter(out, fmt, scored=model is not None)
    alerts = 0
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
                alerts += _write(writer, meter.add(batch), model, args.fpr)
        except CaptureError as exc:
            progress.done()
            error(str(exc))
            failed = True
        # What was decoded before any damage is still written.
        for part in meter.drain():
            alerts += _write(writer, part, model, args.fpr)
        progress.done()
        st = meter.stats
        packets += st.decode.packets
        flows += st.flows_ended
        if not args.quiet:
            errors = ", ".join(f"{k} {v}" for k, v in sorted(st.decode.errors.items()) if v)
            print(
                f"{path}: {st.decode.packets} packets, {st.flows_ended} flows"
                + (f" (+{st.interim_records} interim records)" if st.interim_records else "")
                + (f", skipped: {errors}" if errors else ""),
                file=sys.stderr,
            )
    if out is not sys.stdout:
        out.close()
    elapsed = time.perf_counter() - started
    if not args.quiet and model is not None:
        print(
            f"model {model.path.name} ({model.version}): {alerts} flows above the threshold "
            f"for FPR {args.fpr:g} ({model.threshold(args.fpr):.4g})",
            file=sys.stderr,
        )
    if not args.quiet:
        print(
            f"total: {packets} packets, {flows} flows in {elapsed:.2f} s "
            f"({packets / max(elapsed, 1e-9):,.0f} packets/s)"
            + (f", written to {args.output} ({fmt})" if args.output else ""),
            file=sys.stderr,
        )
    return 1 if failed else 0


def _write(writer: FlowWriter, flows, model, fpr: float) -> int:
    """Write flows (scored when there is a model); return how many exceed the threshold."""
    if model is None:
        writer.write(flows)
        return 0
    scores = model.score(flows.features)
    writer.write(flows, scores)
    return int((scores.score > model.threshold(fpr)).sum())


def cmd_schema(args: argparse.Namespace) -> int:
    print(
        f"# {SCHEMA_NAME} v{SCHEMA_VERSION}, schema hash {SCHEMA_HASH}, "
        f"{len(SCHEMA)} float32 features (NaN = does not apply)"
    )
    for f in SCHEMA:
        print(f"{f.name}\t{f.unit}\t{'nullable' if f.nullable else '-'}\t{f.description}")
    return 0


def register(sub) -> None:
    """Add this module's subcommands to the parser."""
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
    flows.add_argument(
        "--score",
        action="store_true",
        help="score every flow with the bundled model (adds score columns)",
    )
    flows.add_argument("--model", type=Path, help="score with this ONNX model instead")
    flows.add_argument(
        "--fpr",
        type=float,
        default=1e-2,
        help="false-positive rate whose threshold the summary counts (1e-2)",
    )
    flows.add_argument("-q", "--quiet", action="store_true", help="no progress or summary")
    flows.set_defaults(func=cmd_flows)

    schema = sub.add_parser(
        "schema",
        help="print the feature schema",
        description="Print every feature: name, unit, nullable, meaning.",
    )
    schema.set_defaults(func=cmd_schema)
