"""Features: ended flows to one float32 matrix in a versioned schema.

This is the one extractor: the trainer fits on it and the agent scores with it, and a model
records ``SCHEMA_HASH`` so the agent can refuse a model made for another schema. The records
are ended flows and interim records of flows still open (records.INTERIM_FIRST_S; feature
``flow_open``); version 3 added them. Version 4 added payload statistics (payload.py): no
payload byte leaves the flow table, only these numbers. NaN means
"does not apply" (TCP fields of a UDP flow, inter-arrival times of a one-packet direction),
never zero; the schema's ``nullable`` says which features can be NaN.

Lengths are IP lengths (header + payload), so the same traffic gives the same features on
Ethernet, Linux cooked and raw-IP captures. Times are seconds.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np

from quietwire.agent.capture.decode import (
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    TCP_FLAG_NAMES,
)
from quietwire.agent.features.context import CONTEXT_FEATURES
from quietwire.agent.flow.payload import (
    CLASSES,
    DIRECTION_STATS,
    HTTP_STATS,
    HTTP_WINDOW,
    PAYLOAD_WINDOW,
)
from quietwire.agent.flow.records import INTERIM, INTERIM_FIRST_S, NS, FlowRecords

SCHEMA_NAME = "quietwire.flow"
SCHEMA_VERSION = 4
DIRECTIONS = ("src2dst", "dst2src")


@dataclass(frozen=True)
class Feature:
    name: str
    unit: str
    nullable: bool
    description: str


def _schema() -> tuple[Feature, ...]:
    f: list[Feature] = [Feature("duration_s", "s", False, "last packet time - first packet time")]
    for d in (*DIRECTIONS, "bidirectional"):
        sided = d != "bidirectional"
        f += [
            Feature(f"{d}_packets", "packets", False, f"{d} packets"),
            Feature(f"{d}_bytes", "bytes", False, f"{d} IP bytes (headers + payload)"),
        ]
        f += [
            Feature(f"{d}_pkt_len_{s}", "bytes", sided, f"{s} IP packet length, {d}")
            for s in ("min", "mean", "std", "max")
        ]
        f += [
            Feature(f"{d}_iat_{s}_s", "s", True, f"{s} inter-arrival time, {d}")
            for s in ("min", "mean", "std", "max")
        ]
    for d in DIRECTIONS:
        f += [
            Feature(f"{d}_payload_bytes", "bytes", False, f"transport payload bytes, {d}"),
            Feature(f"{d}_header_bytes", "bytes", False, f"IP + transport header bytes, {d}"),
            Feature(f"{d}_payload_packets", "packets", False, f"packets with payload, {d}"),
            Feature(f"{d}_payload_ratio", "ratio", True, f"payload bytes / IP bytes, {d}"),
            Feature(f"{d}_ttl_min", "hops", True, f"lowest TTL / hop limit, {d}"),
            Feature(f"{d}_init_window", "bytes", True, f"TCP window of the first packet, {d}"),
        ]
        f += [
            Feature(f"{d}_{flag}_packets", "packets", True, f"TCP packets with {flag.upper()}, {d}")
            for flag in TCP_FLAG_NAMES
        ]
    f += [
        Feature("dst2src_src2dst_bytes_ratio", "ratio", False, "bytes down / bytes up"),
        Feature("packets_per_s", "packets/s", True, "packets / duration (NaN if duration 0)"),
        Feature("bytes_per_s", "bytes/s", True, "IP bytes / duration (NaN if duration 0)"),
        Feature("proto_tcp", "bool", False, "protocol is TCP"),
        Feature("proto_udp", "bool", False, "protocol is UDP"),
        Feature("proto_icmp", "bool", False, "protocol is ICMP or ICMPv6"),
        Feature("dst_port_well_known", "bool", True, "server port < 1024 (NaN without ports)"),
        Feature("dst_port_registered", "bool", True, "server port 1024-49151"),
        Feature("tcp_answered", "bool", True, "server answered the SYN with a SYN"),
        Feature("tcp_reset", "bool", True, "a RST was seen"),
        Feature("flow_open", "bool", False, "an interim record: the flow is still open"),
    ]
    first = f"first {PAYLOAD_WINDOW} bytes of the first payload packet"
    units = {"entropy": "bits/byte", "longest_printable": "bytes"}
    what = {
        "entropy": "Shannon entropy",
        "printable_share": "share of printable bytes",
        "longest_printable": "longest run of printable bytes",
        **{f"share_{c}": f"share of {c} bytes" for c in CLASSES},
    }
    for d in DIRECTIONS:
        f += [
            Feature(f"{d}_payload_{s}", units.get(s, "ratio"), True, f"{what[s]}, {first}, {d}")
            for s in DIRECTION_STATS
        ]
    request = f"first {HTTP_WINDOW} bytes of the client's first payload, if an HTTP request"
    f += [
        Feature("http_request", "bool", True, "the client's first payload is an HTTP request"),
        Feature("http_method_get", "bool", True, f"method is GET, {request}"),
        Feature("http_uri_length", "bytes", True, f"URI length, {request}"),
        Feature("http_query_length", "bytes", True, f"query length (after ?), {request}"),
        Feature("http_uri_escapes", "count", True, f"%XX escapes in the URI, {request}"),
        Feature(
            "http_uri_specials",
            "count",
            True,
            f"quotes, <>, $ {{}} ( ) ; | ` in the URI, {request}",
        ),
        Feature("http_header_count", "count", True, f"header lines in the window, {request}"),
        Feature("http_header_bytes", "bytes", True, f"header bytes in the window, {request}"),
        Feature("http_header_specials", "count", True, f"$ {{}} < > ` | in the headers, {request}"),
        Feature(
            "http_body_specials", "count", True, f"specials in the body's first bytes, {request}"
        ),
        Feature("http_uri_dotdots", "count", True, f'".." in the URI (or %XX), {request}'),
    ]
    assert tuple(x.name for x in f[-len(HTTP_STATS) :]) == HTTP_STATS
    window = "flows started in the last window before this flow's last packet"
    f += [
        Feature("src_host_flows", "flows", False, f"{window}, by the client"),
        Feature("src_host_distinct_dst_hosts", "hosts", False, f"distinct servers, {window}"),
        Feature("src_host_distinct_dst_ports", "ports", False, f"distinct server ports, {window}"),
        Feature("src_host_unanswered_share", "ratio", False, f"share unanswered, {window}"),
        Feature("dst_host_flows", "flows", False, f"{window}, to the server"),
        Feature("dst_host_distinct_src_hosts", "hosts", False, f"distinct clients, {window}"),
    ]
    series = "earlier flows of this client to this server, protocol and port, no gap over 1 h"
    f += [
        Feature("pair_prior_flows", "flows", False, series),
        Feature("pair_gap_mean_s", "s", True, f"mean time between flow starts, {series}"),
        Feature("pair_gap_cv", "ratio", True, f"std / mean of the time between starts, {series}"),
    ]
    assert tuple(x.name for x in f[-len(CONTEXT_FEATURES) :]) == CONTEXT_FEATURES
    return tuple(f)


SCHEMA: tuple[Feature, ...] = _schema()
FEATURE_NAMES: tuple[str, ...] = tuple(f.name for f in SCHEMA)
SCHEMA_HASH = hashlib.sha256(
    json.dumps(
        {
            "name": SCHEMA_NAME,
            "version": SCHEMA_VERSION,
            "features": [asdict(x) for x in SCHEMA],
            # which records there are: ended flows, and interim ones at these ages
            "interim_first_s": INTERIM_FIRST_S,
            "payload_window": PAYLOAD_WINDOW,
            "http_window": HTTP_WINDOW,
        },
        sort_keys=True,
    ).encode()
).hexdigest()[:16]


def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, NaN where den is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _stats(count, total, sumsq, lo, hi, scale=1.0):
    """min, mean, std (population), max from mergeable sums; NaN where count is 0."""
    mean = _div(total, count)
    var = np.maximum(_div(sumsq, count) - mean * mean, 0.0)
    none = count == 0
    return (
        np.where(none, np.nan, lo / scale),
        mean,
        np.sqrt(var),
        np.where(none, np.nan, hi / scale),
    )


def extract(flows: FlowRecords, context: np.ndarray) -> np.ndarray:
    """The (len(flows), len(SCHEMA)) float32 feature matrix, columns in SCHEMA order (the
    transpose of a (feature, flow) matrix: not C-contiguous)."""
    c = flows.columns
    pk = c["packets"].astype(np.float64)
    ipb = c["ip_bytes"].astype(np.float64)
    tcp = c["proto"] == IPPROTO_TCP
    duration = (c["last_ns"] - c["first_ns"]).astype(np.float64) / NS
    v: dict[str, np.ndarray] = {"duration_s": duration}
    for i, d in enumerate(DIRECTIONS):
        _direction_features(v, c, i, d, pk, ipb, tcp)
    _bidirectional_features(v, c, pk, ipb, duration)
    _protocol_features(v, c, tcp)
    for i, d in enumerate(DIRECTIONS):
        for j, stat in enumerate(DIRECTION_STATS):
            v[f"{d}_payload_{stat}"] = c["payload_stats"][:, i, j]
    for j, stat in enumerate(HTTP_STATS):
        v[stat] = c["http_stats"][:, j]
    for j, name in enumerate(CONTEXT_FEATURES):
        v[name] = context[:, j]
    # Each feature is written as one contiguous row of a (feature, flow) matrix: written as a
    # column of the (flow, feature) one, every value of it touches its own cache line. The
    # caller's copy transposes it.
    out = np.empty((len(SCHEMA), len(flows)), dtype=np.float32)
    for j, name in enumerate(FEATURE_NAMES):
        out[j] = v[name]
    return out.T


def _direction_features(
    v: dict[str, np.ndarray],
    c: dict[str, np.ndarray],
    i: int,
    d: str,
    pk: np.ndarray,
    ipb: np.ndarray,
    tcp: np.ndarray,
) -> None:
    """The features of direction ``i`` (named ``d``): counts, packet lengths, inter-arrival
    times, header and payload bytes, TTL, initial window and TCP flag counts."""
    v[f"{d}_packets"] = pk[:, i]
    v[f"{d}_bytes"] = ipb[:, i]
    lengths = _stats(
        pk[:, i],
        c["len_sum"][:, i],
        c["len_sumsq"][:, i],
        c["len_min"][:, i],
        c["len_max"][:, i],
    )
    for s, x in zip(("min", "mean", "std", "max"), lengths):
        v[f"{d}_pkt_len_{s}"] = x
    gaps = _stats(
        np.maximum(pk[:, i] - 1, 0),
        c["dir_iat_sum"][:, i],
        c["dir_iat_sumsq"][:, i],
        c["dir_iat_min"][:, i],
        c["dir_iat_max"][:, i],
        scale=NS,
    )
    for s, x in zip(("min", "mean", "std", "max"), gaps):
        v[f"{d}_iat_{s}_s"] = x
    v[f"{d}_payload_bytes"] = c["payload_bytes"][:, i]
    v[f"{d}_header_bytes"] = c["header_bytes"][:, i]
    v[f"{d}_payload_packets"] = c["payload_packets"][:, i]
    v[f"{d}_payload_ratio"] = _div(c["payload_bytes"][:, i].astype(np.float64), ipb[:, i])
    v[f"{d}_ttl_min"] = np.where(pk[:, i] > 0, c["ttl_min"][:, i], np.nan)
    v[f"{d}_init_window"] = np.where(tcp & (pk[:, i] > 0), c["init_window"][:, i], np.nan)
    for flag in TCP_FLAG_NAMES:
        v[f"{d}_{flag}_packets"] = np.where(tcp, c[f"{flag}_packets"][:, i], np.nan)


def _bidirectional_features(
    v: dict[str, np.ndarray],
    c: dict[str, np.ndarray],
    pk: np.ndarray,
    ipb: np.ndarray,
    duration: np.ndarray,
) -> None:
    """Both directions together: counts, packet lengths, inter-arrival times and rates."""
    total = pk.sum(1)
    v["bidirectional_packets"] = total
    v["bidirectional_bytes"] = ipb.sum(1)
    lengths = _stats(
        total,
        c["len_sum"].sum(1),
        c["len_sumsq"].sum(1),
        c["len_min"].min(1),
        c["len_max"].max(1),
    )
    for s, x in zip(("min", "mean", "std", "max"), lengths):
        v[f"bidirectional_pkt_len_{s}"] = x
    gaps = _stats(
        np.maximum(total - 1, 0),
        c["iat_sum"],
        c["iat_sumsq"],
        c["iat_min"],
        c["iat_max"],
        scale=NS,
    )
    for s, x in zip(("min", "mean", "std", "max"), gaps):
        v[f"bidirectional_iat_{s}_s"] = x
    v["dst2src_src2dst_bytes_ratio"] = _div(ipb[:, 1], ipb[:, 0])
    v["packets_per_s"] = _div(total, duration)
    v["bytes_per_s"] = _div(ipb.sum(1), duration)


def _protocol_features(v: dict[str, np.ndarray], c: dict[str, np.ndarray], tcp: np.ndarray) -> None:
    """The protocol, the server port's range, the TCP handshake and whether the record is
    an interim one."""
    v["proto_tcp"] = tcp
    v["proto_udp"] = c["proto"] == IPPROTO_UDP
    v["proto_icmp"] = (c["proto"] == IPPROTO_ICMP) | (c["proto"] == IPPROTO_ICMPV6)
    has_ports = tcp | (c["proto"] == IPPROTO_UDP) | (c["proto"] == IPPROTO_SCTP)
    port = c["dst_port"]
    v["dst_port_well_known"] = np.where(has_ports, port < 1024, np.nan)
    v["dst_port_registered"] = np.where(has_ports, (port >= 1024) & (port < 49152), np.nan)
    v["tcp_answered"] = np.where(tcp, c["syn_packets"][:, 1] > 0, np.nan)
    v["tcp_reset"] = np.where(tcp, c["rst_packets"].sum(1) > 0, np.nan)
    v["flow_open"] = c["end_reason"] == INTERIM


@dataclass(frozen=True)
class MeteredFlows:
    """Ended flows and interim records of open ones (end reason ``interim``), in start order,
    and their (n, len(SCHEMA)) float32 features."""

    records: FlowRecords
    features: np.ndarray

    def __len__(self) -> int:
        return len(self.records)
