"""`quietwire flows` (captures to flow tables) and `quietwire schema`."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from quietwire.agent.capture.pcap import CaptureError, read_capture
from quietwire.agent.detect.model import DEFAULT_MODEL, ModelError, ScoringModel
from quietwire.agent.features.context import ContextConfig
from quietwire.agent.features.meter import FlowMeter
from quietwire.agent.features.schema import SCHEMA, SCHEMA_HASH, SCHEMA_NAME, SCHEMA_VERSION
from quietwire.agent.flow.table import FlowConfig
from quietwire.agent.output.flowtable import FlowWriter
from quietwire.agent.output.tablefields import FORMATS
from quietwire.agent.parallel.filepool import default_workers, ordered_map

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
    suffix = args.output.suffix if args.output else ""
    fmt = args.format or {".jsonl": "jsonl", ".parquet": "parquet"}.get(suffix, "csv")
    if args.workers < 1:
        error(f"--workers: expected at least 1, got {args.workers}")
        return 2
    if fmt == "parquet" and not args.output:
        error("Parquet output needs a file: -o FILE.parquet")
        return 2
    model = None
    if args.score or args.model:
        try:
            model = ScoringModel(args.model or DEFAULT_MODEL)
        except ModelError as exc:
            error(str(exc))
            return 2
    out = sys.stdout
    if args.output and fmt != "parquet":
        try:
            out = args.output.open("w", newline="")
        except OSError as exc:
            error(f"{args.output}: cannot write: {exc.strerror}")
            return 2
    writer = FlowWriter(args.output if fmt == "parquet" else out, fmt, scored=model is not None)
    job = _Job(fmt, flow_config, context_config, model.path if model else None, args.fpr)
    started = time.perf_counter()
    if args.workers == 1 or len(args.files) < 2:
        results = _in_process(args, job, writer, model)
    else:
        results = _in_workers(args, job, writer)
    failed = False
    packets = flows = alerts = 0
    for r in results:
        failed |= r.error is not None
        packets += r.packets
        flows += r.flows
        alerts += r.alerts
    writer.close()
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


@dataclass(frozen=True)
class _Job:
    """What every file is metered and written with (sent to worker processes)."""

    fmt: str
    flow_config: FlowConfig
    context_config: ContextConfig
    model: Path | None
    fpr: float


@dataclass
class _FileResult:
    path: Path
    packets: int = 0
    flows: int = 0
    interim: int = 0
    errors: dict = field(default_factory=dict)
    alerts: int = 0
    rows: int = 0
    error: str | None = None  # the capture's damage (the flows before it are written)
    part: Path | None = None  # a worker's output, to append


def _meter_file(path: Path, job: _Job, writer: FlowWriter, model, on_progress=None):
    """Meter one capture on its own and write its flows; its account."""
    meter = FlowMeter(job.flow_config, job.context_config)
    result = _FileResult(path)
    try:
        for batch in read_capture(path, on_progress=on_progress and on_progress(meter)):
            result.alerts += _write(writer, meter.add(batch), model, job.fpr)
    except CaptureError as exc:
        result.error = str(exc)
    # What was decoded before any damage is still written.
    for part in meter.drain():
        result.alerts += _write(writer, part, model, job.fpr)
    st = meter.stats
    result.packets, result.flows = st.decode.packets, st.flows_ended
    result.interim, result.errors = st.interim_records, dict(st.decode.errors)
    result.rows = writer.rows
    return result


def _in_process(args, job: _Job, writer: FlowWriter, model):
    progress = Progress(sys.stderr.isatty() and not args.quiet)
    for path in args.files:
        total = path.stat().st_size if path.exists() else 0

        def on_progress(meter, path=path, total=total):
            return lambda done: progress.update(str(path), done, total, meter.stats.decode.packets)

        result = _meter_file(path, job, writer, model, on_progress)
        progress.done()
        _report(args, result)
        yield result


_MODELS: dict = {}  # a worker process's loaded models


def _worker(task: tuple[Path, Path, _Job]) -> _FileResult:
    """In a worker process: meter one file into a part file of the output format."""
    path, part, job = task
    model = None
    if job.model is not None:
        model = _MODELS.get(job.model) or _MODELS.setdefault(job.model, ScoringModel(job.model))
    if job.fmt == "parquet":
        writer = FlowWriter(part, job.fmt, scored=model is not None)
        result = _meter_file(path, job, writer, model)
        writer.close()
    else:
        with part.open("w", newline="") as out:
            writer = FlowWriter(out, job.fmt, scored=model is not None, header=False)
            result = _meter_file(path, job, writer, model)
    result.part = part
    return result


def _in_workers(args, job: _Job, writer: FlowWriter):
    where = args.output.parent if args.output else None
    with tempfile.TemporaryDirectory(prefix="quietwire-flows-", dir=where) as tmp:
        tasks = [
            (path, Path(tmp) / f"part-{i}.{job.fmt}", job) for i, path in enumerate(args.files)
        ]
        for (path, _, _), future in zip(tasks, ordered_map(_worker, tasks, args.workers)):
            try:
                result = future.result()
            except Exception as exc:  # the worker's own failure: name the file, go on
                result = _FileResult(path, error=f"{path}: {type(exc).__name__}: {exc}")
            if result.part is not None:
                writer.append(result.part, result.rows)
                result.part.unlink()
            _report(args, result)
            yield result


def _report(args, r: _FileResult) -> None:
    if r.error:
        error(r.error)
    if args.quiet:
        return
    errors = ", ".join(f"{k} {v}" for k, v in sorted(r.errors.items()) if v)
    print(
        f"{r.path}: {r.packets} packets, {r.flows} flows"
        + (f" (+{r.interim} interim records)" if r.interim else "")
        + (f", skipped: {errors}" if errors else ""),
        file=sys.stderr,
    )


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
        "field names) and every feature of the schema. Each file is metered on its own "
        "(with --workers, in parallel processes; the rows still come in input order).",
    )
    _add_input_output_options(flows)
    _add_metering_options(flows)
    _add_scoring_options(flows)
    flows.add_argument("-q", "--quiet", action="store_true", help="no progress or summary")
    flows.set_defaults(func=cmd_flows)

    schema = sub.add_parser(
        "schema",
        help="print the feature schema",
        description="Print every feature: name, unit, nullable, meaning.",
    )
    schema.set_defaults(func=cmd_schema)


def _add_input_output_options(flows: argparse.ArgumentParser) -> None:
    """The captures read, where and how the flows are written, and how many processes."""
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
        help="csv, jsonl or parquet (default: from the output suffix, else csv); parquet "
        "needs pyarrow: pip install 'quietwire[parquet]'",
    )
    flows.add_argument(
        "-w",
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help=f"meter up to N files at once in worker processes (1; this machine: "
        f"{default_workers()} cores); output and results as with 1",
    )


def _add_metering_options(flows: argparse.ArgumentParser) -> None:
    """The flow table's timeouts and size, and the per-host context window."""
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


def _add_scoring_options(flows: argparse.ArgumentParser) -> None:
    """Scoring every flow with a model, and the false-positive rate the summary counts at."""
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
