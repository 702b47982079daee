"""The fields of a flow table's row, shared by every format (CSV, JSON lines, Parquet) and by
the alerts that carry a flow's identity: the identity fields in Suricata EVE / Zeek conn.log
names, the score fields, the table read back, and the error that names a table's file and
record."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quietwire.agent.errors import QuietwireError
from quietwire.agent.features.schema import SCHEMA_HASH
from quietwire.agent.flow.communityid import flow_community_ids
from quietwire.agent.flow.identity import PROTO_NAMES, format_ips, iso_times
from quietwire.agent.flow.records import END_REASONS, FlowRecords

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
