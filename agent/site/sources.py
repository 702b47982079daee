"""The site's flows from files, for calibration: captures (through the agent's own flow
meter, so the features are the ones it scores live), flow tables that `quietwire flows`
wrote and flow logs that the agent wrote (live, rotated or gzipped), each with the time span
of its flows; and a learning period's records (``period_records``): those of one flow log
that ended within the period, in bounded memory.

Input kinds are told apart by file name (``input_kind``) and read by one function each
(``READERS``).
"""

from __future__ import annotations

import calendar
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quietwire.agent.capture.pcap import CaptureError, read_capture
from quietwire.agent.errors import QuietwireError
from quietwire.agent.features.meter import FlowMeter
from quietwire.agent.features.schema import FEATURE_NAMES
from quietwire.agent.flow.identity import iso_times
from quietwire.agent.flow.records import FlowRecords
from quietwire.agent.output.flowlog import FlowLogStats, read_flow_log
from quietwire.agent.output.flowtable import read_stored_flows
from quietwire.agent.output.rotation import rotated_pattern

CAPTURE_SUFFIXES = (".pcap", ".pcapng", ".cap")
TABLE_SUFFIXES = (".csv", ".jsonl", ".parquet")
LOG_SUFFIXES = (".json", ".log", ".gz")  # and a .jsonl whose lines are flow events
KNOWN = ", ".join((*CAPTURE_SUFFIXES, *TABLE_SUFFIXES, *LOG_SUFFIXES))


class SiteFlowsError(QuietwireError):
    """An input cannot be read as site flows; the message names the file."""


@dataclass(frozen=True)
class FileFlows:
    """The flows of one input file."""

    features: np.ndarray  # (n, len(SCHEMA)) float32
    first_start: str | None  # the earliest flow start (EVE's ISO 8601 UTC), None if unknown
    last_end: str | None  # the latest flow end
    warning: str | None = None  # e.g. a damaged capture: the flows before the damage are kept
    records: FlowRecords | None = None  # a capture's flow records (entity risk is fitted on)


@dataclass(frozen=True)
class SiteFlows:
    """Every input's flows together, and where and when they come from."""

    features: np.ndarray
    inputs: tuple[tuple[str, int], ...]  # (file, flows), in reading order
    first_start: str | None
    last_end: str | None
    warnings: tuple[str, ...] = ()
    # (records, features) of the inputs that have flow records (captures), for fitting risk
    records: tuple[tuple[FlowRecords, np.ndarray], ...] = ()


def _read_capture(path: Path) -> FileFlows:
    meter = FlowMeter()
    parts = []
    warning = None
    try:
        for batch in read_capture(path):
            parts.append(meter.add(batch))
    except CaptureError as exc:
        warning = str(exc)
    parts += list(meter.drain())
    parts = [p for p in parts if len(p)]
    if not parts:
        return FileFlows(np.zeros((0, len(FEATURE_NAMES)), np.float32), None, None, warning)
    first = min(int(p.records["first_ns"].min()) for p in parts)
    last = max(int(p.records["last_ns"].max()) for p in parts)
    start, end = iso_times(np.array([first, last], dtype=np.int64))
    records = FlowRecords.concat([p.records for p in parts])
    return FileFlows(np.concatenate([p.features for p in parts]), start, end, warning, records)


def _read_table(path: Path) -> FileFlows:
    stored = read_stored_flows(path)
    return FileFlows(stored.features, stored.first_start, stored.last_end)


def _read_flow_log(path: Path) -> FileFlows:
    stats = FlowLogStats()
    try:
        parts = list(read_flow_log(path, stats, identity=True))
    except OSError as exc:
        raise SiteFlowsError(f"{path}: cannot read: {exc.strerror}") from exc
    skipped = []
    if stats.other_schema:
        schemas = ", ".join(sorted(stats.other_schemas)[:3])
        skipped.append(
            f"{_count(stats.other_schema, 'record')} of another feature schema ({schemas})"
        )
    if stats.malformed:
        line, reason = stats.first_malformed[0]
        skipped.append(f"{_count(stats.malformed, 'malformed line')} (line {line}: {reason})")
    if stats.truncated:
        skipped.append(f"the rest of a file cut short ({stats.truncated})")
    warning = f"{path}: skipped {'; '.join(skipped)}" if skipped else None
    features = (
        np.concatenate([c.features for c in parts])
        if parts
        else np.zeros((0, len(FEATURE_NAMES)), np.float32)
    )
    # the records of the lines with identity fields (a flow log's always have them)
    found = [c.records() for c in parts]
    records = FlowRecords.concat([r for r, _ in found])
    with_identity = np.concatenate([ok for _, ok in found]) if found else np.zeros(0, bool)
    return FileFlows(
        features,
        stats.first_start,
        stats.last_end,
        warning,
        records if with_identity.all() else None,
    )


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


READERS: dict[str, Callable[[Path], FileFlows]] = {
    "capture": _read_capture,
    "flow table": _read_table,
    "flow log": _read_flow_log,
}


def input_kind(path: Path) -> str | None:
    """Which reader a file goes to, by its name (a .jsonl by its first line: a flow log's
    lines are EVE events); None for a file of no known kind."""
    if path.suffix in CAPTURE_SUFFIXES:
        return "capture"
    if path.suffix == ".jsonl" and _first_line_is_event(path):
        return "flow log"
    if path.suffix in TABLE_SUFFIXES:
        return "flow table"
    if path.suffix in LOG_SUFFIXES:
        return "flow log"
    return None


def _first_line_is_event(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return b'"event_type"' in handle.readline(1 << 16)
    except OSError:
        return False  # the table reader will say why it cannot be read


def expand(paths: list[Path]) -> list[Path]:
    """Files as given; a directory becomes its files of a known kind, sorted."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.iterdir() if f.is_file() and input_kind(f))
        elif not p.exists():
            raise SiteFlowsError(f"{p}: no such file or directory")
        elif input_kind(p) is None:
            raise SiteFlowsError(f"{p}: not an input calibration can read (names end in {KNOWN})")
        else:
            out.append(p)
    return out


def read_site_flows(paths: list[Path], progress: Callable[[str], None] | None = None) -> SiteFlows:
    """Every flow of the inputs (files or directories). A damaged capture gives the flows
    before the damage and a warning; an input that cannot be read at all raises."""
    parts: list[np.ndarray] = []
    inputs: list[tuple[str, int]] = []
    starts: list[str] = []
    ends: list[str] = []
    warnings: list[str] = []
    with_records: list[tuple[FlowRecords, np.ndarray]] = []
    files = expand(paths)
    if not files:
        raise SiteFlowsError(f"{', '.join(map(str, paths))}: no input files ({KNOWN})")
    for path in files:
        if progress:
            progress(str(path))
        part = READERS[input_kind(path)](path)
        parts.append(part.features)
        inputs.append((str(path), len(part.features)))
        starts += [part.first_start] if part.first_start else []
        ends += [part.last_end] if part.last_end else []
        warnings += [part.warning] if part.warning else []
        if part.records is not None:
            with_records.append((part.records, part.features))
    features = np.concatenate(parts) if parts else np.zeros((0, len(FEATURE_NAMES)), np.float32)
    return SiteFlows(
        features,
        tuple(inputs),
        min(starts) if starts else None,
        max(ends) if ends else None,
        tuple(warnings),
        tuple(with_records),
    )


def site_records(paths: list[Path]) -> list[tuple[FlowRecords, np.ndarray]]:
    """The (records, features) of the captures and flow logs among the inputs (files or
    directories); flow tables are left out (they are read for their features only)."""
    out = []
    for path in expand(paths):
        if input_kind(path) in ("capture", "flow log"):
            part = READERS[input_kind(path)](path)
            if part.records is not None and len(part.records):
                out.append((part.records, part.features))
    return out


# --- a learning period's records (learning.py) ------------------------------------------


@dataclass(frozen=True)
class PeriodRecords:
    """The flow log's records of a period, for calibration."""

    features: np.ndarray  # (n, F) float32: all of them, or a uniform sample of max_records
    records: int  # records of the period found (before sampling)
    inputs: tuple[tuple[str, int], ...]  # (file, records of the period in it)
    warnings: tuple[str, ...] = ()


def period_chunks(
    flow_log: Path, start: float, end: float
) -> Iterator[tuple[FlowRecords, np.ndarray]]:
    """Every record of ``flow_log`` (live and rotated files) that ended within [start, end]
    (epoch seconds), as (records, features) a chunk at a time (entity risk is fitted on all
    of them, streamed: what is kept is the evidence, not the records). Unreadable files and
    lines without identity fields are passed over (period_records reported them)."""
    lo, hi = iso_times(np.array([int(start * 1e9), int(end * 1e9)], dtype=np.int64))
    for path in flow_log_files(flow_log, start):
        for candidate in (path, path.with_name(path.name + ".gz")):
            try:
                for chunk in read_flow_log(candidate, identity=True):
                    records, ok = chunk.records()
                    within = np.fromiter(
                        (e is not None and lo <= e <= hi for e in chunk.ends), bool, len(ok)
                    )
                    keep = within[ok]
                    yield records.take(np.flatnonzero(keep)), chunk.features[ok][keep]
                break
            except FileNotFoundError:  # gzipped (and the plain file deleted) meanwhile
                continue
            except OSError:
                break


def flow_log_files(flow_log: Path, since: float) -> list[Path]:
    """The flow log's files that can hold records from ``since`` on: the files rotated at or
    after it (oldest first; a gzipped one rather than its uncompressed twin) and the live one."""
    pattern = rotated_pattern(flow_log)
    found: dict[str, tuple[tuple, Path]] = {}
    try:
        names = os.listdir(flow_log.parent)
    except FileNotFoundError:
        names = []
    for name in names:
        m = pattern.match(name)
        if not m:
            continue
        rotated = calendar.timegm(time.strptime(m.group(1), "%Y%m%dT%H%M%SZ"))
        if rotated < int(since):  # renamed before the period began: all its records did too
            continue
        base = name.removesuffix(".gz")
        if base not in found or name.endswith(".gz"):
            found[base] = ((m.group(1), int(m.group(2) or 0)), flow_log.parent / name)
    files = [p for _, p in sorted(found.values())]
    return files + ([flow_log] if flow_log.exists() else [])


class _Sample:
    """A seeded uniform sample of at most ``size`` rows in bounded memory: each row draws a
    uniform key and the rows with the smallest keys are kept."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.rng = np.random.default_rng(seed)
        self.rows: list[np.ndarray] = []
        self.keys: list[np.ndarray] = []
        self.held = 0

    def add(self, x: np.ndarray) -> None:
        self.rows.append(x)
        self.keys.append(self.rng.random(len(x)))
        self.held += len(x)
        if self.held > 2 * self.size:
            self._shrink()

    def _shrink(self) -> None:
        x, k = np.concatenate(self.rows), np.concatenate(self.keys)
        if len(k) > self.size:
            keep = np.sort(np.argpartition(k, self.size - 1)[: self.size])
            x, k = x[keep], k[keep]
        self.rows, self.keys, self.held = [x], [k], len(k)

    def features(self) -> np.ndarray:
        if self.held > self.size:
            self._shrink()
        if not self.rows:
            return np.zeros((0, len(FEATURE_NAMES)), np.float32)
        return np.concatenate(self.rows)


def _read_period(path: Path, lo: str, hi: str, sample: _Sample, stats: FlowLogStats) -> int:
    """Add the records of one file that ended within [lo, hi] (EVE times) to the sample."""
    n = 0
    for chunk in read_flow_log(path, stats):
        mask = np.fromiter(
            (e is not None and lo <= e <= hi for e in chunk.ends), bool, len(chunk.ends)
        )
        sample.add(chunk.features[mask])
        n += int(mask.sum())
    return n


def period_records(
    flow_log: Path, start: float, end: float, max_records: int, seed: int = 0
) -> PeriodRecords:
    """The records of ``flow_log`` (live and rotated files) that ended within [start, end]
    (epoch seconds); a seeded uniform sample of ``max_records`` of them when there are more,
    so a long period costs bounded memory. Unreadable files and skipped lines are warnings."""
    lo, hi = iso_times(np.array([int(start * 1e9), int(end * 1e9)], dtype=np.int64))
    sample = _Sample(max_records, seed)
    inputs: list[tuple[str, int]] = []
    warnings: list[str] = []
    for path in flow_log_files(flow_log, start):
        stats = FlowLogStats()
        try:
            try:
                n = _read_period(path, lo, hi, sample, stats)
            except FileNotFoundError:  # gzipped (and the plain file deleted) meanwhile
                path = path.with_name(path.name + ".gz")
                n = _read_period(path, lo, hi, sample, stats)
        except OSError as exc:
            warnings.append(f"{path}: cannot read: {exc.strerror or exc}")
            continue
        if stats.other_schema or stats.malformed:
            warnings.append(
                f"{path}: skipped {stats.other_schema:,} records of another feature schema "
                f"and {stats.malformed:,} malformed lines"
            )
        if n:
            inputs.append((str(path), n))
    records = sum(n for _, n in inputs)
    return PeriodRecords(sample.features(), records, tuple(inputs), tuple(warnings))
