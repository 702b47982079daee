"""Flow tables on disk: what `quietwire flows` writes and what the trainer can read back.

Each row is one flow: its identity in the field names operators know from Suricata EVE and
Zeek conn.log, then every feature of the schema. Formats: CSV (with a header row) and JSON
lines; the writer records the schema hash in every JSON line and as the CSV's
``schema_hash`` column, so a reader can refuse a table made by another schema.
"""

from __future__ import annotations

import csv
import functools
import ipaddress
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

import numpy as np

from .communityid import flow_community_ids
from .features import FEATURE_NAMES, SCHEMA_HASH
from .flowrecords import END_REASONS, FlowRecords
from .meter import MeteredFlows
from .model import Scores

PROTO_NAMES = {1: "ICMP", 6: "TCP", 17: "UDP", 58: "IPv6-ICMP", 132: "SCTP"}
ID_FIELDS = (
    "flow_id",
    "community_id",
    "start",
    "end",
    "src_ip",
    "src_port",
    "dest_ip",
    "dest_port",
    "proto",
    "ip_version",
    "pkts_toserver",
    "pkts_toclient",
    "bytes_toserver",
    "bytes_toclient",
    "end_reason",
    "schema_hash",
)
FORMATS = ("csv", "jsonl")


class FlowFileError(Exception):
    """A flow table cannot be written or read; the message names the file and record."""


def format_ips(version: np.ndarray, hi: np.ndarray, lo: np.ndarray) -> list[str]:
    """Text addresses (dotted quad for IPv4, RFC 5952 for IPv6), each distinct one formatted
    once."""
    if len(version) and (version == 4).all():  # the common case: a 1-D unique, no ipaddress
        uniq, inverse = np.unique(lo, return_inverse=True)
        text = [f"{a >> 24 & 255}.{a >> 16 & 255}.{a >> 8 & 255}.{a & 255}" for a in uniq.tolist()]
        return [text[i] for i in inverse.reshape(-1).tolist()]
    keys = np.stack([hi, lo, version.astype(np.uint64)], axis=1)
    uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
    text = [
        str(ipaddress.IPv4Address(low & 0xFFFFFFFF))
        if v == 4
        else str(ipaddress.IPv6Address((h << 64) | low))
        for h, low, v in uniq.tolist()
    ]
    return [text[i] for i in inverse.reshape(-1).tolist()]


@functools.lru_cache(maxsize=4096)
def _second(t: int) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def iso_times(ns: np.ndarray) -> list[str]:
    """ISO 8601 UTC timestamps with microseconds (EVE's format)."""
    seconds, micros = np.divmod(ns // 1000, 1_000_000)
    uniq, inverse = np.unique(seconds, return_inverse=True)
    stamps = [_second(t) for t in uniq.tolist()]
    return [
        f"{stamps[i]}.{us:06d}+0000" for i, us in zip(inverse.reshape(-1).tolist(), micros.tolist())
    ]


def identity_columns(flows: FlowRecords) -> dict[str, list]:
    """The identity fields of each flow, as lists of plain Python values."""
    port_proto = np.isin(flows["proto"], (6, 17, 132))
    ver = flows["ip_version"]
    n = len(flows)
    return {
        "flow_id": flows["seq"].tolist(),
        "community_id": flow_community_ids(flows),
        "start": iso_times(flows["first_ns"]),
        "end": iso_times(flows["last_ns"]),
        "src_ip": format_ips(ver, flows["src_hi"], flows["src_lo"]),
        "src_port": [p if ok else None for p, ok in zip(flows["src_port"].tolist(), port_proto)],
        "dest_ip": format_ips(ver, flows["dst_hi"], flows["dst_lo"]),
        "dest_port": [p if ok else None for p, ok in zip(flows["dst_port"].tolist(), port_proto)],
        "proto": [PROTO_NAMES.get(p, str(p)) for p in flows["proto"].tolist()],
        "ip_version": ver.tolist(),
        "pkts_toserver": flows["packets"][:, 0].tolist(),
        "pkts_toclient": flows["packets"][:, 1].tolist(),
        "bytes_toserver": flows["bytes"][:, 0].tolist(),
        "bytes_toclient": flows["bytes"][:, 1].tolist(),
        "end_reason": [END_REASONS[r] for r in flows["end_reason"].tolist()],
        "schema_hash": [SCHEMA_HASH] * n,
    }


SCORE_FIELDS = ("score", "tail_probability", "top_features")


class FlowWriter:
    """Writes MeteredFlows to a CSV or JSON-lines file (or an open text stream); with
    ``scored`` each row also carries the model's score, tail probability and top features."""

    def __init__(self, out: IO[str], fmt: str, scored: bool = False) -> None:
        if fmt not in FORMATS:
            raise FlowFileError(f"unknown flow table format {fmt!r} (expected one of {FORMATS})")
        self._out = out
        self._fmt = fmt
        self._scored = scored
        self.rows = 0
        if fmt == "csv":
            extra = SCORE_FIELDS if scored else ()
            out.write(",".join((*ID_FIELDS, *extra, *FEATURE_NAMES)) + "\n")
            self._float_row = ",".join(["%.9g"] * len(FEATURE_NAMES))

    def write(self, flows: MeteredFlows, scores: Scores | None = None) -> None:
        if len(flows) == 0:
            return
        if self._scored != (scores is not None):
            raise ValueError("scores must be given exactly when the writer is scored")
        ident = identity_columns(flows.records)
        columns = [ident[k] for k in ID_FIELDS]
        if scores is not None:
            top = [
                ";".join(f"{name}={value:.3g}" for name, value in row)
                for row in scores.top_features(3)
            ]
            columns += [
                [f"{v:.6g}" for v in scores.score.tolist()],
                [f"{v:.6g}" for v in scores.tail_probability.tolist()],
                top,
            ]
        names = (*ID_FIELDS, *SCORE_FIELDS) if scores is not None else ID_FIELDS
        id_rows = zip(*columns)
        feats = flows.features.tolist()
        if self._fmt == "csv":
            # No identity or score field can hold a comma or a quote (numbers, addresses,
            # base64, timestamps, names), so rows are joined directly; '%.9g' round-trips
            # float32.
            self._out.writelines(
                ",".join("" if v is None else str(v) for v in ids)
                + ","
                + (self._float_row % tuple(f)).replace("nan", "")
                + "\n"
                for ids, f in zip(id_rows, feats)
            )
        else:
            for ids, f in zip(id_rows, feats):
                row = dict(zip(names, ids))
                if scores is not None:
                    row["score"], row["tail_probability"] = float(ids[-3]), float(ids[-2])
                values = (None if math.isnan(x) else x for x in f)
                row["features"] = dict(zip(FEATURE_NAMES, values))
                self._out.write(json.dumps(row, separators=(",", ":")) + "\n")
        self.rows += len(flows)


@dataclass(frozen=True)
class StoredFlows:
    """A flow table read back: the features of its flows and the span of their times."""

    features: np.ndarray  # (n, len(SCHEMA)) float32
    first_start: str | None  # the earliest `start` (EVE's ISO 8601 UTC); None if none given
    last_end: str | None  # the latest `end`
    hosts: tuple[str, ...] = ()  # each flow's client address (src_ip; "" if not given)


def read_flow_table(path: str | Path) -> np.ndarray:
    """The (n, len(SCHEMA)) float32 features of a table written by FlowWriter.

    Raises FlowFileError naming the file and line when the schema differs or a value is bad.
    """
    return read_stored_flows(path).features


def read_stored_flows(path: str | Path) -> StoredFlows:
    """A table written by FlowWriter: its features and the span of its flows' times (the
    writer's timestamps have one width and one zone, so text order is time order)."""
    path = Path(path)
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
