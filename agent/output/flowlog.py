"""The flow log: every scored flow record as one EVE JSON line (``event_type: "flow"``), what
Suricata's and Zeek's users expect to keep, and what the trainer reads back to learn a site's
own traffic (``quietwire train --benign flows/``). One module holds both sides of the format:
``flow_lines`` writes it, ``read_flow_log`` reads it.

A line: the identity fields the alerts carry (``flow_id``, ``community_id``, ``src_ip``,
``src_port``, ``dest_ip``, ``dest_port``, ``proto``), ``in_iface`` when live, ``flow``
{packets and bytes each way, ``start``, ``end``, ``state`` (``open`` for an interim record of a
flow still open, else ``closed``), ``reason`` (flowrecords.END_REASONS)} and ``quietwire``
{``schema_hash``, ``model_version``, ``score``, ``tail_probability``, ``features`` {name:
value, NaN as null}}. Values are float32 written with 9 significant digits, so they read back
bit for bit.

Writing never stops capture or alerts: a failed open, write or rotation (a full disk, an
unwritable directory) drops that batch's lines, is counted, and is logged once until writing
works again.
"""

from __future__ import annotations

import functools
import gzip
import json
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from quietwire.agent.detect.model import Scores
from quietwire.agent.features.schema import FEATURE_NAMES, SCHEMA_HASH, MeteredFlows
from quietwire.agent.flow.records import INTERIM, FlowRecords
from quietwire.agent.output import columntext as tf
from quietwire.agent.output.flowtable import JSON_FEATURES, ROW_CHUNK, identity_text
from quietwire.agent.output.rotation import RotatingFile
from quietwire.agent.output.tablefields import records_from_identity

LOG_SUFFIXES = {".json", ".jsonl", ".log", ".gz"}
READ_CHUNK = 1 << 14  # lines parsed into one feature matrix


@dataclass(frozen=True)
class FlowLogSettings:
    """Config key ``flow_log`` (replay: ``--flow-log``). A 0 turns a limit off."""

    path: Path
    rotate_bytes: int = 100_000_000  # rotate the live file at this size
    rotate_age_s: float = 3600.0  # ... or when it is this old
    compress: bool = True  # gzip rotated files
    retention_bytes: int = 10_000_000_000  # rotated files beyond this, oldest first, go

    def __post_init__(self) -> None:
        if not str(self.path):
            raise ValueError("flow_log.path: expected a file name")
        for key in ("rotate_bytes", "retention_bytes"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"flow_log.{key}: expected a whole number of bytes >= 0, got {value!r}"
                )
        if not self.rotate_age_s >= 0:
            raise ValueError(
                f"flow_log.rotate_age_s: expected seconds >= 0, got {self.rotate_age_s!r}"
            )


@functools.lru_cache(maxsize=16)
def _constants(model_version: str, interface: str | None, host: str | None) -> tuple[bytes, bytes]:
    """The constant text of a line before its ``flow`` object and before its score."""
    iface = f'"in_iface":{json.dumps(interface)},' if interface else ""
    iface += f'"host":{json.dumps(host)},' if host is not None else ""
    quietwire = (
        f'"}},"quietwire":{{"schema_hash":"{SCHEMA_HASH}",'
        f'"model_version":{json.dumps(model_version)},"score":'
    )
    return f'",{iface}"flow":{{"pkts_toserver":'.encode(), quietwire.encode()


_STATES = ["closed", "open"]  # an interim record's flow is still open


def flow_lines(
    flows: MeteredFlows,
    scores: Scores,
    model_version: str,
    interface: str | None = None,
    host: str | None = None,
) -> str:
    """The flow log lines of a batch, as one string, formatted a column at a time (as
    ``quietwire flows -o x.jsonl`` is): the identity columns as flowfile writes them, the
    numbers float32 with 9 significant digits, NaN and infinities as null."""
    return "".join(
        _lines(
            flows.records.take(part),
            flows.features[part],
            scores.score[part],
            scores.tail_probability[part],
            *_constants(model_version, interface, host),
        )
        for part in (slice(lo, lo + ROW_CHUNK) for lo in range(0, len(flows), ROW_CHUNK))
    )


def _numbers(values: np.ndarray) -> tf.Text:
    """float32 values as JSON numbers, 9 significant digits; NaN and infinities as null."""
    return tf.g9(values, nan=b"null", inf=b"null", minus_inf=b"null")


def _lines(records, features, score, tail, before_flow: bytes, before_score: bytes) -> str:
    """flow_lines of at most ROW_CHUNK rows (the byte matrices stay a few MB)."""
    ident = identity_text(records, b"null")
    state = tf.strings(_STATES, (records["end_reason"] == INTERIM).astype(np.intp))

    chars, lens = _numbers(features)
    k = features.shape[1]
    parts = [
        b'{"timestamp":"', ident["end"],
        b'","flow_id":', ident["flow_id"],
        b',"community_id":"', ident["community_id"],
        b'","event_type":"flow","src_ip":"', ident["src_ip"],
        b'","src_port":', ident["src_port"],
        b',"dest_ip":"', ident["dest_ip"],
        b'","dest_port":', ident["dest_port"],
        b',"proto":"', ident["proto"],
        before_flow, ident["pkts_toserver"],
        b',"pkts_toclient":', ident["pkts_toclient"],
        b',"bytes_toserver":', ident["bytes_toserver"],
        b',"bytes_toclient":', ident["bytes_toclient"],
        b',"start":"', ident["start"],
        b'","end":"', ident["end"],
        b'","state":"', state,
        b'","reason":"', ident["end_reason"],
        before_score, _numbers(score),
        b',"tail_probability":', _numbers(tail),
        b',"features":',
        tf.Block(JSON_FEATURES, chars.reshape(-1, k, tf.SLOT), lens.reshape(-1, k)),
        b"}}}\n",
    ]  # fmt: skip
    return tf.assemble(len(records), parts).decode("ascii")


class FlowLog:
    """The Engine's ``flow_log``: ``write`` each scored batch, ``flush`` at the end; the daemon
    calls ``tick`` every second (age rotation) and ``reopen`` on SIGHUP."""

    def __init__(
        self, settings: FlowLogSettings, metrics=None, log=None, clock=time.time, host=None
    ):
        self.settings = settings
        self.host = host  # the sensor's name in every line (EVE's "host"), the daemon's
        self.metrics = metrics
        self.log = log or (lambda message: None)
        self.file = RotatingFile(
            settings.path,
            settings.rotate_bytes,
            settings.rotate_age_s,
            settings.compress,
            settings.retention_bytes,
            clock,
        )
        self.lines = 0  # written
        self.bytes = 0
        self.errors = 0  # failed operations
        self.dropped = 0  # lines not written because of them
        self._failing: str | None = None  # the first error of the current episode

    def write(
        self, flows: MeteredFlows, scores: Scores, model_version: str, interface: str | None
    ) -> None:
        """Append one line per record; on failure the lines are dropped and counted."""
        if len(flows) == 0:
            return
        data = flow_lines(flows, scores, model_version, interface, self.host).encode()
        operation = "open"
        try:
            if not self.file.is_open:
                self.file.open()
            operation = "write"
            self.file.write(data)
        except OSError as exc:
            self._failed(operation, exc, len(flows))
            return
        self.lines += len(flows)
        self.bytes += len(data)
        if self.metrics:
            self.metrics.flow_log_lines.inc(len(flows))
            self.metrics.flow_log_bytes.inc(len(data))
        if self.tick():
            self._recovered()

    def tick(self) -> bool:
        """Rotate when the live file is due (size or age), and count the compressor's
        failures; cheap enough to call every second. False if something failed."""
        ok = True
        for operation, exc in self.file.errors():
            self._failed(operation, exc, 0)
            ok = False
        if self.file.due():
            try:
                self.file.rotate()
            except OSError as exc:
                self._failed("rotate", exc, 0)
                ok = False
        return ok

    def rotate(self) -> None:
        """Rotate the live file now if it holds anything (the end of a learning period: the
        period's records then lie in rotated files, which no later write or rotation moves)."""
        if not self.file.is_open or self.file.size == 0:
            return
        try:
            self.file.rotate()
        except OSError as exc:
            self._failed("rotate", exc, 0)

    def flush(self) -> None:
        """Lines are written per batch (nothing is buffered); report compressor failures."""
        for operation, exc in self.file.errors():
            self._failed(operation, exc, 0)

    def reopen(self) -> None:
        """SIGHUP: start a new live file if the old one was moved; retry after failures."""
        try:
            self.file.reopen()
        except OSError as exc:
            self._failed("open", exc, 0)
        else:
            self._recovered()

    def close(self) -> None:
        """Close the file and wait for the compressor (at shutdown)."""
        try:
            self.file.close(wait=True)
        except OSError as exc:
            self._failed("write", exc, 0)
        self.flush()

    def _failed(self, operation: str, exc: OSError, lines: int) -> None:
        self.errors += 1
        self.dropped += lines
        if self.metrics:
            self.metrics.flow_log_errors.labels(operation).inc()
            if lines:
                self.metrics.flow_log_dropped.inc(lines)
        if operation in ("open", "write"):
            try:  # a half-written file is closed; the next batch opens it again
                self.file.close_file()
            except OSError:
                pass  # the same failure again: it is counted above
        if self._failing is None:
            self._failing = operation
            reason = exc.strerror or str(exc)
            where = exc.filename or self.settings.path
            self.log(
                f"flow log: cannot {operation} {where}: {reason}; flow records are dropped and "
                "counted (quietwire_flow_log_errors_total) until it works again"
            )

    def _recovered(self) -> None:
        if self._failing is not None:
            self._failing = None
            self.log(
                f"flow log: writing {self.settings.path} again ({self.errors} errors, "
                f"{self.dropped} records dropped so far)"
            )


# --- reading ------------------------------------------------------------------------------


@dataclass
class FlowLogStats:
    """What ``read_flow_log`` found in one file besides the flows it returned."""

    lines: int = 0
    flows: int = 0
    other_schema: int = 0  # flow records of another feature schema (skipped)
    other_schemas: set = field(default_factory=set)
    other_events: int = 0  # lines that are no quietwire flow record (alerts, other tools)
    malformed: int = 0  # lines that are not JSON or lack a field (skipped)
    first_malformed: list = field(default_factory=list)  # (line number, reason), up to 3
    truncated: str | None = None  # a compressed file cut short: what the reader said
    first_start: str | None = None  # the earliest flow start (EVE's ISO 8601 UTC)
    last_end: str | None = None  # the latest flow end


@dataclass(frozen=True)
class FlowLogChunk:
    features: np.ndarray  # (n, len(FEATURE_NAMES)) float32
    hosts: list[str]  # each flow's client address (src_ip)
    ends: list[str | None] = field(default_factory=list)  # each record's end (EVE time)
    # with read_flow_log(identity=True): each record's identity fields (records_from_identity)
    identity: list | None = None

    def records(self) -> tuple[FlowRecords, np.ndarray]:
        """The records of the rows with identity fields, and which rows they are."""
        return records_from_identity(self.identity or [None] * len(self.features))


def is_flow_log(path: Path) -> bool:
    """A name a flow log (or a rotated one) can have: .json, .jsonl, .log, .gz."""
    return path.suffix in LOG_SUFFIXES


def read_flow_log(
    path: Path, stats: FlowLogStats | None = None, identity: bool = False
) -> Iterator[FlowLogChunk]:
    """The flows of a flow log (plain or gzipped), READ_CHUNK at a time. Flow-table JSON
    lines (`quietwire flows -o x.jsonl`) are read too. Lines of another schema, other
    events and malformed lines are skipped and counted in ``stats``; OSError if the file
    cannot be opened. ``identity``: keep each record's identity fields too (FlowLogChunk.
    records)."""
    path = Path(path)
    stats = stats if stats is not None else FlowLogStats()
    with open(path, "rb") as probe:
        compressed = probe.read(2) == b"\x1f\x8b"
    handle = gzip.open(path, "rb") if compressed else open(path, "rb")  # noqa: SIM115
    rows: list[list[float]] = []
    hosts: list[str] = []
    ends: list[str | None] = []
    numbers: list[int] = []
    ids: list | None = [] if identity else None
    number = 0
    with handle:
        try:
            for number, raw in enumerate(handle, start=1):
                stats.lines += 1
                if not raw.strip():
                    continue
                if _parse(raw, number, stats, rows, hosts, ends, ids):
                    numbers.append(number)
                if len(rows) >= READ_CHUNK:
                    yield _chunk(rows, hosts, ends, numbers, stats, ids)
                    rows, hosts, ends, numbers = [], [], [], []
                    ids = [] if identity else None
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
            stats.truncated = f"after line {number}: {exc}"
    if rows:
        yield _chunk(rows, hosts, ends, numbers, stats, ids)


def _parse(
    raw: bytes,
    number: int,
    stats: FlowLogStats,
    rows: list,
    hosts: list,
    ends: list,
    ids: list | None = None,
) -> bool:
    """Append the line's features, host and end time (and, into ``ids``, its identity
    fields) if it is a flow record of this schema."""
    try:
        # null -> NaN before parsing (json reads NaN), so a row is floats only
        rec = json.loads(raw.replace(b":null", b":NaN").replace(b": null", b": NaN"))
        if not isinstance(rec, dict):
            raise TypeError("not a JSON object")
        if "quietwire" in rec:  # a flow log line; else perhaps a flow table's row
            if rec.get("event_type") != "flow":
                stats.other_events += 1
                return False
            body = rec["quietwire"]
        elif "features" in rec and "schema_hash" in rec:
            body = rec
        else:
            stats.other_events += 1  # another tool's event
            return False
        if body["schema_hash"] != SCHEMA_HASH:
            stats.other_schema += 1
            stats.other_schemas.add(str(body["schema_hash"]))
            return False
        features = body["features"]
        row = [features[name] for name in FEATURE_NAMES]
        host = rec["src_ip"]
        times = rec.get("flow", rec)  # a flow log nests them in "flow", a table does not
        start, end = times.get("start"), times.get("end")
    except (ValueError, KeyError, TypeError) as exc:
        _malformed(stats, number, _reason(exc))
        return False
    rows.append(row)
    hosts.append(str(host))
    ends.append(end if isinstance(end, str) else None)
    if ids is not None:
        ids.append(_identity(rec, times, start, end))
    # EVE timestamps have one width and one zone: text order is time order
    if isinstance(start, str) and (stats.first_start is None or start < stats.first_start):
        stats.first_start = start
    if isinstance(end, str) and (stats.last_end is None or end > stats.last_end):
        stats.last_end = end
    return True


def _identity(rec: dict, times: dict, start, end) -> tuple | None:
    """The fields records_from_identity reads, or None if the line lacks one."""
    try:
        return (
            rec["flow_id"],
            rec["src_ip"],
            rec.get("src_port"),
            rec["dest_ip"],
            rec.get("dest_port"),
            rec["proto"],
            start,
            end,
            times["pkts_toserver"],
            times["pkts_toclient"],
            times["bytes_toserver"],
            times["bytes_toclient"],
            times.get("reason", rec.get("end_reason")),
        )
    except (KeyError, TypeError):
        return None


def _malformed(stats: FlowLogStats, number: int, reason: str) -> None:
    stats.malformed += 1
    if len(stats.first_malformed) < 3:
        stats.first_malformed.append((number, reason))


def _chunk(
    rows: list, hosts: list, ends: list, numbers: list, stats: FlowLogStats, ids: list | None
) -> FlowLogChunk:
    try:
        x = np.array(rows, dtype=np.float32)
    except (ValueError, TypeError):  # a value that is no number: find the rows, drop them
        good = []
        for row, number in zip(rows, numbers):
            try:
                np.array(row, dtype=np.float32)
                good.append(True)
            except (ValueError, TypeError):
                good.append(False)
                _malformed(stats, number, "a feature value that is not a number")
        x = np.array([r for r, ok in zip(rows, good) if ok], dtype=np.float32)
        hosts = [h for h, ok in zip(hosts, good) if ok]
        ends = [e for e, ok in zip(ends, good) if ok]
        if ids is not None:
            ids = [i for i, ok in zip(ids, good) if ok]
    x = x.reshape(len(hosts), len(FEATURE_NAMES))
    stats.flows += len(x)
    return FlowLogChunk(x, hosts, ends, ids)


def _reason(exc: Exception) -> str:
    if isinstance(exc, KeyError):
        return f"missing field {exc.args[0]!r}"
    return str(exc).splitlines()[0][:80] or type(exc).__name__
