"""The fields of a flow table's row, shared by every format (CSV, JSON lines, Parquet) and by
the alerts that carry a flow's identity: the identity fields in Suricata EVE / Zeek conn.log
names, the score fields, the table read back, and the error that names a table's file and
record."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import numpy as np

from quietwire.agent.errors import QuietwireError
from quietwire.agent.features.schema import SCHEMA_HASH
from quietwire.agent.flow.communityid import flow_community_ids
from quietwire.agent.flow.identity import PROTO_NAMES, format_ips, iso_times
from quietwire.agent.flow.records import COLUMNS, END_REASONS, FlowRecords, row_shape

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
FORMATS = ("csv", "jsonl", "parquet")
SCORE_FIELDS = ("score", "tail_probability", "top_features")


class FlowFileError(QuietwireError):
    """A flow table cannot be written or read; the message names the file and record."""


@dataclass(frozen=True)
class StoredFlows:
    """A flow table read back: the features of its flows and the span of their times."""

    features: np.ndarray  # (n, len(SCHEMA)) float32
    first_start: str | None  # the earliest `start` (EVE's ISO 8601 UTC); None if none given
    last_end: str | None  # the latest `end`
    hosts: tuple[str, ...] = ()  # each flow's client address (src_ip; "" if not given)


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


PROTO_NUMBERS = {name: number for number, name in PROTO_NAMES.items()}


def records_from_identity(rows: list) -> tuple[FlowRecords, np.ndarray]:
    """Flow records from identity fields as flow logs and tables write them: (flow_id,
    src_ip, src_port, dest_ip, dest_port, proto, start, end, pkts_toserver, pkts_toclient,
    bytes_toserver, bytes_toclient, end_reason) per row, or None for a row without them. What
    identity_columns leaves out (timing and payload statistics) stays at its initial value:
    enough for what reads flows by who, where and when (rules, entity risk). Returns the
    records of the rows that parse and, per row, whether it did."""
    n = len(rows)
    cols = {k: np.full((n, *row_shape(d)), v, dtype=t) for k, (t, v, d) in COLUMNS.items()}
    ok = np.zeros(n, bool)
    for i, row in enumerate(rows):
        try:
            _put_identity(cols, i, row)
        except (ValueError, TypeError, KeyError, OverflowError):
            continue
        ok[i] = True
    return FlowRecords({k: v[ok] for k, v in cols.items()}), ok


def _port(value) -> int:
    """A port as written (null, read as None or NaN, for protocols without ports: 0)."""
    return 0 if value is None or value != value else int(value)


def _put_identity(cols: dict, i: int, row) -> None:
    seq, src, sport, dst, dport, proto, start, end, p0, p1, b0, b1, reason = row
    for side, text in (("src", src), ("dst", dst)):
        ip = ipaddress.ip_address(text)
        value = (0xFFFF << 32) | int(ip) if ip.version == 4 else int(ip)
        cols[f"{side}_hi"][i], cols[f"{side}_lo"][i] = value >> 64, value & (2**64 - 1)
        cols["ip_version"][i] = ip.version
    cols["seq"][i] = int(seq)
    cols["src_port"][i], cols["dst_port"][i] = _port(sport), _port(dport)
    cols["proto"][i] = PROTO_NUMBERS[proto] if proto in PROTO_NUMBERS else int(proto)
    cols["packets"][i] = (int(p0), int(p1))
    cols["bytes"][i] = (int(b0), int(b1))
    cols["end_reason"][i] = END_REASONS.index(reason) if reason in END_REASONS else -1
    cols["first_ns"][i] = np.datetime64(str(start)[:26], "ns").astype(np.int64)
    cols["last_ns"][i] = np.datetime64(str(end)[:26], "ns").astype(np.int64)
