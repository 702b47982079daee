"""Flow tables on disk: what `quietwire flows` writes and what the trainer can read back.

Each row is one flow: its identity in the field names operators know from Suricata EVE and
Zeek conn.log, then every feature of the schema. Formats: CSV (with a header row) and JSON
lines; the writer records the schema hash in every JSON line and as the CSV's
``schema_hash`` column, so a reader can refuse a table made by another schema.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from quietwire.agent.detect.model import Scores
from quietwire.agent.features.schema import FEATURE_NAMES, SCHEMA_HASH, MeteredFlows
from quietwire.agent.flow.communityid import ID_CHARS, community_id_chars
from quietwire.agent.flow.identity import PROTO_NAMES, ip_codes, utc_second
from quietwire.agent.flow.records import END_REASONS, FlowRecords
from quietwire.agent.output import columntext as tf
from quietwire.agent.output.tablefields import (
    FORMATS,
    ID_FIELDS,
    SCORE_FIELDS,
    FlowFileError,
    StoredFlows,
)

ROW_CHUNK = 4096  # rows formatted at a time: the byte matrices stay a few MB
# What comes before each feature's value in a JSON object of the features: '{"name":' first.
JSON_FEATURES = [
    f'{"{" if i == 0 else ","}"{name}":'.encode() for i, name in enumerate(FEATURE_NAMES)
]
_QUOTED = {"community_id", "start", "end", "src_ip", "dest_ip", "proto", "end_reason"}


class FlowWriter:
    """Writes MeteredFlows to a CSV or JSON-lines text stream, or to a Parquet file (``out`` a
    path or binary file; see flowparquet.py); with ``scored`` each row also carries the
    model's score, tail probability and top features. Call ``close`` at the end."""

    def __init__(self, out, fmt: str, scored: bool = False, header: bool = True) -> None:
        if fmt not in FORMATS:
            raise FlowFileError(f"unknown flow table format {fmt!r} (expected one of {FORMATS})")
        self._out = out
        self._fmt = fmt
        self._scored = scored
        self._parquet = None
        self.rows = 0
        if fmt == "parquet":
            from quietwire.agent.output.parquet import ParquetFlowWriter

            self._parquet = ParquetFlowWriter(out, scored)
        elif fmt == "csv" and header:
            extra = SCORE_FIELDS if scored else ()
            out.write(",".join((*ID_FIELDS, *extra, *FEATURE_NAMES)) + "\n")

    def write(self, flows: MeteredFlows, scores: Scores | None = None) -> None:
        if len(flows) == 0:
            return
        if self._scored != (scores is not None):
            raise ValueError("scores must be given exactly when the writer is scored")
        if self._parquet is not None:
            self._parquet.write(flows, scores)
        else:
            rows = format_rows if self._fmt == "csv" else format_json_rows
            for lo in range(0, len(flows), ROW_CHUNK):
                part = slice(lo, lo + ROW_CHUNK)
                self._out.write(rows(flows.records.take(part), flows.features[part], scores, part))
        self.rows += len(flows)

    def close(self) -> None:
        """Finish the file (Parquet's footer); a text stream is left to its owner."""
        if self._parquet is not None:
            self._parquet.close()

    def append(self, part: Path, rows: int) -> None:
        """Add the rows of a part another writer of the same format wrote (without a
        header): text is copied, a Parquet part's row groups are written again."""
        if self._parquet is not None:
            self._parquet.append(part)
        else:
            with part.open(newline="") as handle:
                while chunk := handle.read(1 << 20):
                    self._out.write(chunk)
        self.rows += rows


def ip_text(version: np.ndarray, hi: np.ndarray, lo: np.ndarray) -> tf.Text | tf.Block:
    """Text addresses as a column (as format_ips writes them): IPv4 by arithmetic, each
    distinct address once where there is IPv6."""
    if len(version) and (version == 4).all():
        return tf.ipv4_block(lo)
    return tf.strings(*ip_codes(version, hi, lo))


def identity_text(flows: FlowRecords, null: bytes) -> dict[str, tf.Text | tf.Block]:
    """The identity fields as text columns (``null`` for a port the protocol has not)."""
    n = len(flows)
    no_ports = ~np.isin(flows["proto"], (6, 17, 132))
    protos, proto_codes = np.unique(flows["proto"], return_inverse=True)
    ver = flows["ip_version"]
    return {
        "flow_id": tf.integers(flows["seq"]),
        "community_id": (community_id_chars(flows), np.full(n, ID_CHARS, dtype=np.int64)),
        "start": iso_text(flows["first_ns"]),
        "end": iso_text(flows["last_ns"]),
        "src_ip": ip_text(ver, flows["src_hi"], flows["src_lo"]),
        "src_port": tf.replace(tf.integers(flows["src_port"]), no_ports, null),
        "dest_ip": ip_text(ver, flows["dst_hi"], flows["dst_lo"]),
        "dest_port": tf.replace(tf.integers(flows["dst_port"]), no_ports, null),
        "proto": tf.strings(
            [PROTO_NAMES.get(p, str(p)) for p in protos.tolist()], proto_codes.reshape(-1)
        ),
        "ip_version": tf.integers(ver),
        "pkts_toserver": tf.integers(flows["packets"][:, 0]),
        "pkts_toclient": tf.integers(flows["packets"][:, 1]),
        "bytes_toserver": tf.integers(flows["bytes"][:, 0]),
        "bytes_toclient": tf.integers(flows["bytes"][:, 1]),
        "end_reason": tf.strings(END_REASONS, flows["end_reason"].astype(np.intp)),
        "schema_hash": tf.strings([SCHEMA_HASH], np.zeros(n, dtype=np.intp)),
    }


def iso_text(ns: np.ndarray) -> tf.Text:
    """iso_times as a text column: each distinct second formatted once, microseconds by
    arithmetic."""
    seconds, micros = np.divmod(ns // 1000, 1_000_000)
    uniq, inverse = np.unique(seconds, return_inverse=True)
    stamps, _ = tf.strings([utc_second(t) for t in uniq.tolist()])
    chars = np.empty((len(ns), 31), dtype=np.uint8)
    chars[:, :19] = stamps[inverse.reshape(-1), :19]
    chars[:, 19] = ord(".")
    digits, _ = tf.integers(micros + 1_000_000)  # a leading 1 keeps the zeros
    chars[:, 20:26] = digits[:, 1:7]
    chars[:, 26:] = np.frombuffer(b"+0000", dtype=np.uint8)
    return chars, np.full(len(ns), 31, dtype=np.int64)


def _score_texts(scores: Scores, part: slice, json_numbers: bool) -> list[tf.Text]:
    """Score, tail probability and top features of the rows ``part`` (Python per row: these
    columns exist only when a model scored the flows, whose cost is far larger)."""
    score = [f"{v:.6g}" for v in scores.score[part].tolist()]
    tail = [f"{v:.6g}" for v in scores.tail_probability[part].tolist()]
    if json_numbers:
        score, tail = ([_json_number(float(v)) for v in col] for col in (score, tail))
    sub = Scores(*(getattr(scores, f.name)[part] for f in dataclasses.fields(Scores)))
    top = [";".join(f"{name}={value:.3g}" for name, value in row) for row in sub.top_features(3)]
    return [tf.strings(score), tf.strings(tail), tf.strings(top)]


def _json_number(x: float) -> str:
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return repr(x)


def format_rows(
    flows: FlowRecords, features: np.ndarray, scores: Scores | None, part: slice
) -> str:
    """CSV rows: the identity, the scores of the rows ``part`` if any, then the features
    ('%.9g', which round-trips float32; NaN empty). No field can hold a comma or a quote."""
    ident = identity_text(flows, b"")
    columns = [ident[k] for k in ID_FIELDS]
    if scores is not None:
        columns += _score_texts(scores, part, json_numbers=False)
    parts: list = []
    for i, column in enumerate(columns):
        parts += [column] if i == 0 else [b",", column]
    chars, lens = tf.g9(features, nan=b"")
    k = features.shape[1]
    parts.append(tf.Block([b","] * k, chars.reshape(-1, k, tf.SLOT), lens.reshape(-1, k)))
    parts.append(b"\n")
    return tf.assemble(len(flows), parts).decode("ascii")


def format_json_rows(
    flows: FlowRecords, features: np.ndarray, scores: Scores | None, part: slice
) -> str:
    """JSON lines: the identity fields, the scores if any, and ``features`` as an object of
    numbers ('%.9g', as the flow log writes them; NaN is null)."""
    ident = identity_text(flows, b"null")
    named = [(k, ident[k]) for k in ID_FIELDS]
    if scores is not None:
        named += list(zip(SCORE_FIELDS, _score_texts(scores, part, json_numbers=True)))
    parts: list = []
    text = "{"
    for name, column in named:
        quote = '"' if name in _QUOTED or name in ("schema_hash", "top_features") else ""
        parts += [f'{text}"{name}":{quote}'.encode(), column]
        text = f"{quote},"
    chars, lens = tf.g9(features, nan=b"null", inf=b"Infinity")
    k = features.shape[1]
    parts.append(f'{text}"features":'.encode())
    parts.append(tf.Block(JSON_FEATURES, chars.reshape(-1, k, tf.SLOT), lens.reshape(-1, k)))
    parts.append(b"}}\n")
    return tf.assemble(len(flows), parts).decode("ascii")


def read_flow_table(path: str | Path) -> np.ndarray:
    """The (n, len(SCHEMA)) float32 features of a table written by FlowWriter.

    Raises FlowFileError naming the file and line when the schema differs or a value is bad.
    """
    return read_stored_flows(path).features


def read_stored_flows(path: str | Path) -> StoredFlows:
    """A table written by FlowWriter: its features and the span of its flows' times (the
    writer's timestamps have one width and one zone, so text order is time order)."""
    path = Path(path)
    if path.suffix == ".parquet":
        from quietwire.agent.output.parquet import read_parquet_flows

        return read_parquet_flows(path)
    rows: list[list[float]] = []
    starts: list[str] = []
    ends: list[str] = []
    hosts: list[str] = []
    try:
        with path.open(newline="") as handle:
            if path.suffix == ".csv":
                reader = csv.reader(handle)
                header = next(reader, None)
                if header is None:
                    raise FlowFileError(f"{path}: empty flow table")
                missing = [n for n in ("schema_hash", *FEATURE_NAMES) if n not in header]
                if missing:
                    raise FlowFileError(
                        f"{path}: line 1: not a quietwire flow table of schema {SCHEMA_HASH} "
                        f"(missing columns: {', '.join(missing[:5])})"
                    )
                cols = [header.index(n) for n in FEATURE_NAMES]
                hash_col = header.index("schema_hash")
                start_col = header.index("start") if "start" in header else None
                end_col = header.index("end") if "end" in header else None
                src_col = header.index("src_ip") if "src_ip" in header else None
                for line, rec in enumerate(reader, start=2):
                    _check_hash(path, line, rec[hash_col] if len(rec) > hash_col else "")
                    try:
                        rows.append([float(rec[i]) if rec[i] != "" else math.nan for i in cols])
                    except (ValueError, IndexError) as exc:
                        raise FlowFileError(f"{path}: line {line}: bad value ({exc})") from exc
                    if start_col is not None:
                        starts.append(rec[start_col])
                    if end_col is not None:
                        ends.append(rec[end_col])
                    hosts.append(rec[src_col] if src_col is not None else "")
            else:
                for line, text in enumerate(handle, start=1):
                    if not text.strip():
                        continue
                    try:
                        rec = json.loads(text)
                        _check_hash(path, line, rec.get("schema_hash", ""))
                        feats = rec["features"]
                        rows.append(
                            [
                                math.nan if feats[n] is None else float(feats[n])
                                for n in FEATURE_NAMES
                            ]
                        )
                    except (ValueError, KeyError, TypeError, AttributeError) as exc:
                        raise FlowFileError(f"{path}: line {line}: bad record ({exc!r})") from exc
                    starts.append(rec.get("start") or "")
                    ends.append(rec.get("end") or "")
                    hosts.append(str(rec.get("src_ip") or ""))
    except OSError as exc:
        raise FlowFileError(f"{path}: cannot read: {exc.strerror}") from exc
    starts = [t for t in starts if t]
    ends = [t for t in ends if t]
    return StoredFlows(
        np.asarray(rows, dtype=np.float32).reshape(len(rows), len(FEATURE_NAMES)),
        min(starts) if starts else None,
        max(ends) if ends else None,
        tuple(hosts),
    )


def _check_hash(path: Path, line: int, found: str) -> None:
    if found != SCHEMA_HASH:
        raise FlowFileError(
            f"{path}: line {line}: schema_hash {found!r} does not match this quietwire's "
            f"feature schema {SCHEMA_HASH}"
        )
