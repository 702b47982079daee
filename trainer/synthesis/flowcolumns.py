"""What the generator (generator.py) models of a flow, and how a decoded row becomes one.

The schema (agent/features/schema.py) defines many features from others, and says where a feature
does not apply (NaN). ``free_columns`` keeps what must be modelled, re-expressed where that
makes the schema's relations hold by construction (a spread's std as its share of what the min,
mean, max and count allow; gaps' min and max as ratios to their mean, a direction's mean gap as
the share of the duration it spans; ACK and PSH counts as the packets without them, header
bytes per packet); packet lengths' min and max are modelled as they are, since their values
sit on a few header sizes that a ratio to a continuous mean would smear. ``assemble`` computes
every derived feature and every NaN from the schema's rules and moves what a decoder still
gets wrong (a min above the mean, a flag count above the packets) to the nearest valid value,
counting the values it moved per rule.
"""

from __future__ import annotations

import numpy as np

from quietwire.agent.features.schema import FEATURE_NAMES, SCHEMA
from quietwire.agent.flow.payload import DIRECTION_STATS, HTTP_STATS

DIRECTIONS = ("src2dst", "dst2src")
FLAGS = ("fin", "syn", "rst", "psh", "ack", "urg", "ece", "cwr")
INTEGER_UNITS = {"packets", "bytes", "count", "hops", "flows", "hosts", "ports"}
_J = {name: j for j, name in enumerate(FEATURE_NAMES)}
_UNIT = {f.name: f.unit for f in SCHEMA}

SPREADS = tuple((f"{d}_pkt_len", "") for d in DIRECTIONS) + tuple(
    (f"{d}_iat", "_s") for d in (*DIRECTIONS, "bidirectional")
)
# Features the schema defines from others: computed, never modelled.
DERIVED = frozenset(
    [f"{d}_{s}" for d in DIRECTIONS for s in ("pkt_len_mean", "bytes", "header_bytes")]
    + [f"{d}_payload_ratio" for d in DIRECTIONS]
    + [f"bidirectional_{s}" for s in ("packets", "bytes")]
    + [f"bidirectional_pkt_len_{s}" for s in ("min", "mean", "std", "max")]
    + ["dst2src_src2dst_bytes_ratio", "packets_per_s", "bytes_per_s"]
    + ["proto_tcp", "proto_udp", "proto_icmp", "dst_port_well_known", "dst_port_registered"]
    + ["tcp_answered", "tcp_reset"]
    + [f"{d}_{flag}_packets" for d in DIRECTIONS for flag in ("ack", "psh")]
    + [f"{p}_std{suffix}" for p, suffix in SPREADS]
    + [f"{p}_{s}_s" for p, suffix in SPREADS if suffix for s in ("min", "max")]
    + [f"{d}_iat_mean_s" for d in (*DIRECTIONS, "bidirectional")]
)
# Modelled in place of some derived ones: each std's share of its bounds (std_bounds), min and
# max of gaps over their mean, a direction's mean gap as the share of the duration its packets
# span (the flow's is duration / gaps), ACK and PSH counts as the packets without them
# (nearly always 0 or 1: every TCP packet but the SYN carries an ACK, most payload packets a
# PSH), header bytes per packet.
EXTRA = (
    "proto",
    "port_class",
    *(f"{d}_header_per_packet" for d in DIRECTIONS),
    *(f"{d}_packets_without_ack" for d in DIRECTIONS),
    *(f"{d}_payload_packets_without_psh" for d in DIRECTIONS),
    *(f"{p}_{s}_to_mean" for p, suffix in SPREADS if suffix for s in ("min", "max")),
    *(f"{p}_std_share" for p, _ in SPREADS),
    *(f"{d}_iat_span_share" for d in DIRECTIONS),
)


def free_columns(x: np.ndarray) -> dict[str, np.ndarray]:
    """The modelled columns of raw features (n, F): every feature not in DERIVED, and EXTRA."""
    x = np.asarray(x, dtype=np.float64)
    c = {name: x[:, j] for name, j in _J.items() if name not in DERIVED}
    proto = np.full(len(x), 3.0)
    for k, name in enumerate(("proto_tcp", "proto_udp", "proto_icmp")):
        proto = np.where(x[:, _J[name]] == 1, k, proto)
    c["proto"] = proto
    wk, reg = x[:, _J["dst_port_well_known"]], x[:, _J["dst_port_registered"]]
    c["port_class"] = np.where(np.isnan(wk), np.nan, np.where(wk == 1, 0, np.where(reg == 1, 1, 2)))
    for d in DIRECTIONS:
        p = x[:, _J[f"{d}_packets"]]
        with np.errstate(invalid="ignore", divide="ignore"):
            c[f"{d}_header_per_packet"] = np.where(p > 0, x[:, _J[f"{d}_header_bytes"]] / p, np.nan)
        c[f"{d}_packets_without_ack"] = p - x[:, _J[f"{d}_ack_packets"]]
        c[f"{d}_payload_packets_without_psh"] = (
            x[:, _J[f"{d}_payload_packets"]] - x[:, _J[f"{d}_psh_packets"]]
        )
    dur = x[:, _J["duration_s"]]
    with np.errstate(invalid="ignore", divide="ignore"):
        for prefix, suffix in SPREADS:
            stat = {s: x[:, _J[f"{prefix}_{s}{suffix}"]] for s in ("min", "mean", "std", "max")}
            if suffix:  # gaps: min and max as ratios to the mean (lengths are modelled as-is)
                for s in ("min", "max"):
                    v = np.where(stat["mean"] == 0, 1.0, stat[s] / stat["mean"])  # all 0
                    c[f"{prefix}_{s}_to_mean"] = np.where(stat["mean"] >= 0, v, np.nan)
            count = _values(x, prefix)
            floor, cap = std_bounds(stat["min"], stat["mean"], stat["max"], count)
            share = np.clip((stat["std"] - floor) / (cap - floor), 0, 1)
            c[f"{prefix}_std_share"] = np.where((count > 2) & (cap > floor), share, np.nan)
        for d in DIRECTIONS:
            gaps = x[:, _J[f"{d}_packets"]] - 1
            span = x[:, _J[f"{d}_iat_mean_s"]] * gaps / dur
            c[f"{d}_iat_span_share"] = np.where((gaps > 0) & (dur > 0), span, np.nan)
    return c


def _values(x: np.ndarray, prefix: str) -> np.ndarray:
    """How many values a spread's statistics summarise: packets for lengths, gaps for gaps."""
    direction = prefix.split("_")[0]
    if direction == "bidirectional":
        packets = x[:, _J["src2dst_packets"]] + x[:, _J["dst2src_packets"]]
    else:
        packets = x[:, _J[f"{direction}_packets"]]
    return packets - 1 if prefix.endswith("_iat") else packets


def std_bounds(lo, mean, hi, count) -> tuple[np.ndarray, np.ndarray]:
    """The (population) standard deviation that ``count`` values with this min, mean and max
    can have: at least that of min and max with every other value at the mean, at most half
    the range. The model's std is its share of the way between them."""
    with np.errstate(invalid="ignore", divide="ignore"):
        floor = np.sqrt(((hi - mean) ** 2 + (mean - lo) ** 2) / np.maximum(count, 1))
    cap = (hi - lo) / 2
    return np.minimum(floor, cap), cap


# ---- the schema's rules: computing what is defined, repairing what is not ----------------------


class _Repairs:
    """Moves the values of a column that break a rule to valid ones, counting them per rule."""

    def __init__(self, c: dict[str, np.ndarray]) -> None:
        self.c = c
        self.counts: dict[str, int] = {}

    def __call__(self, rule: str, bad: np.ndarray, col: str, value) -> None:
        if bad.any():
            self.counts[rule] = self.counts.get(rule, 0) + int(bad.sum())
            self.c[col] = np.where(bad, value, self.c[col])


def assemble(free: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, int]]:
    """Raw features (n, F) float32 from decoded free columns, and the values each repair rule
    moved. Every row of the result satisfies fidelity.constraint_violations' rules."""
    n = len(free["proto"])
    c = {k: np.asarray(v, np.float64).copy() for k, v in free.items()}
    fix = _Repairs(c)
    for name, v in c.items():
        if _UNIT.get(name) in INTEGER_UNITS and not name.endswith(("_mean", "_std")):
            c[name] = np.maximum(np.round(v), 0)
    proto = c["proto"].astype(int)
    tcp = proto == 0
    fix("src2dst packets >= 1", ~(c["src2dst_packets"] >= 1), "src2dst_packets", 1)
    for d in DIRECTIONS:
        _direction_columns(c, d, tcp, fix)
    total = c["src2dst_packets"] + c["dst2src_packets"]
    _gap_columns(c, total, fix)
    c["bidirectional_packets"] = total
    c["bidirectional_bytes"] = c["src2dst_bytes"] + c["dst2src_bytes"]
    _combined_lengths(c, total)
    _rates(c, total)
    _protocol_columns(c, proto)
    for a, b in (
        ("src_host_distinct_dst_hosts", "src_host_flows"),
        ("src_host_distinct_dst_ports", "src_host_flows"),
        ("dst_host_distinct_src_hosts", "dst_host_flows"),
    ):
        fix("distinct peers <= flows", c[a] > c[b], a, c[b])
    _missing(c, tcp, total)
    out = np.empty((n, len(FEATURE_NAMES)), np.float32)
    for j, name in enumerate(FEATURE_NAMES):
        out[:, j] = c[name]
    return out, fix.counts


def _direction_columns(c: dict, d: str, tcp: np.ndarray, fix: _Repairs) -> None:
    """One direction's payload, header and total bytes, packet lengths and flag counts."""
    p = c[f"{d}_packets"]
    fix("payload packets <= packets", c[f"{d}_payload_packets"] > p, f"{d}_payload_packets", p)
    pp = c[f"{d}_payload_packets"]
    fix(
        "no payload packets, no payload",
        (pp == 0) & (c[f"{d}_payload_bytes"] > 0),
        f"{d}_payload_bytes",
        0,
    )
    fix(
        "payload packets carry payload",
        (pp > 0) & (c[f"{d}_payload_bytes"] < pp),
        f"{d}_payload_bytes",
        pp,
    )
    header = np.round(np.nan_to_num(c[f"{d}_header_per_packet"], nan=40.0) * p)
    c[f"{d}_header_bytes"] = header
    c[f"{d}_bytes"] = header + c[f"{d}_payload_bytes"]
    bytes_ = c[f"{d}_bytes"]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(p > 0, bytes_ / np.maximum(p, 1), np.nan)
    c[f"{d}_pkt_len_mean"] = mean
    _order_stats(c, f"{d}_pkt_len", p, mean, fix, integer=True, total=bytes_)
    without = np.round(c[f"{d}_packets_without_ack"])
    c[f"{d}_ack_packets"] = np.clip(p - without, 0, p)
    without = np.round(c[f"{d}_payload_packets_without_psh"])
    c[f"{d}_psh_packets"] = np.clip(pp - without, 0, p)
    for flag in FLAGS:
        name = f"{d}_{flag}_packets"
        fix("flag counts <= packets", tcp & (c[name] > p), name, np.minimum(c[name], p))


def _gap_columns(c: dict, total: np.ndarray, fix: _Repairs) -> None:
    """The duration, and each direction's and the flow's gap statistics from it."""
    fix("one packet, no duration", (total == 1) & (c["duration_s"] != 0), "duration_s", 0.0)
    c["duration_s"] = np.maximum(c["duration_s"], 0)
    dur = c["duration_s"]
    for d in (*DIRECTIONS, "bidirectional"):
        gaps = (total if d == "bidirectional" else c[f"{d}_packets"]) - 1
        share = 1.0 if d == "bidirectional" else np.clip(c[f"{d}_iat_span_share"], 0, 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(gaps > 0, share * dur / np.maximum(gaps, 1), np.nan)
        c[f"{d}_iat_mean_s"] = mean
        for s in ("min", "max"):
            c[f"{d}_iat_{s}_s"] = np.maximum(c[f"{d}_iat_{s}_to_mean"], 0) * mean
        _order_stats(c, f"{d}_iat", gaps, mean, fix, suffix="_s")


def _rates(c: dict, total: np.ndarray) -> None:
    """The byte ratio of the directions, packets and bytes per second, payload ratios."""
    with np.errstate(invalid="ignore", divide="ignore"):
        dur = c["duration_s"]
        c["dst2src_src2dst_bytes_ratio"] = c["dst2src_bytes"] / c["src2dst_bytes"]
        c["packets_per_s"] = np.where(dur > 0, total / dur, np.nan)
        c["bytes_per_s"] = np.where(dur > 0, c["bidirectional_bytes"] / dur, np.nan)
        for d in DIRECTIONS:
            b = c[f"{d}_bytes"]
            c[f"{d}_payload_ratio"] = np.where(b > 0, c[f"{d}_payload_bytes"] / b, np.nan)


def _protocol_columns(c: dict, proto: np.ndarray) -> None:
    """Protocol and port-class flags, and the TCP handshake's answer and reset."""
    ported = proto <= 1
    for k, name in enumerate(("proto_tcp", "proto_udp", "proto_icmp")):
        c[name] = (proto == k).astype(np.float64)
    pc = c["port_class"]
    c["dst_port_well_known"] = np.where(ported, pc == 0, np.nan)
    c["dst_port_registered"] = np.where(ported, pc == 1, np.nan)
    c["tcp_answered"] = (c["dst2src_syn_packets"] > 0).astype(np.float64)
    c["tcp_reset"] = ((c["src2dst_rst_packets"] + c["dst2src_rst_packets"]) > 0).astype(float)


def _order_stats(c, prefix, count, mean, fix, integer=False, total=None, suffix="") -> None:
    """min <= mean <= max (a min above the mean or a max below it is moved, and counted), std
    from its share of what min, mean, max and count allow; one value: min = mean = max, std 0;
    two values: min and max fix the std (and, for lengths, the sum)."""
    lo_n, sd_n, hi_n, mean_n = (f"{prefix}_{s}{suffix}" for s in ("min", "std", "max", "mean"))
    lo, hi = c[lo_n], c[hi_n]
    share = np.clip(np.nan_to_num(c[f"{prefix}_std_share"], nan=0.5), 0, 1)
    if integer:
        lo, hi = np.round(lo), np.round(hi)
    one, two = count == 1, count == 2
    m_lo = np.floor(mean) if integer else mean
    m_hi = np.ceil(mean) if integer else mean
    bad = (count >= 1) & ((lo > m_lo) | (hi < m_hi))
    fix("min <= mean <= max", bad, lo_n, lo)  # counts the rows; the values follow
    lo, hi = np.minimum(lo, m_lo), np.maximum(hi, m_hi)
    lo = np.maximum(lo, 0)
    if integer and total is not None:
        hi2 = np.clip(hi, m_hi, total - np.maximum(lo, 0))  # two packets: the other one is lo
        lo = np.where(two, total - hi2, lo)
        hi = np.where(two, hi2, hi)
        sd2 = (hi - lo) / 2
    else:  # two gaps: their mean is the mean, min and max straddle it
        half = np.minimum(mean - lo, hi - mean)
        lo = np.where(two, mean - half, lo)
        hi = np.where(two, mean + half, hi)
        sd2 = half
    lo = np.where(one, mean, lo)
    hi = np.where(one, mean, hi)
    floor, cap = std_bounds(lo, mean, hi, count)
    sd = np.where(two, sd2, np.where(one, 0.0, floor + share * (cap - floor)))
    c[lo_n], c[hi_n], c[sd_n] = lo, hi, sd
    if mean_n in c:
        c[mean_n] = mean


def _combined_lengths(c, total) -> None:
    ps = [c[f"{d}_packets"] for d in DIRECTIONS]
    with np.errstate(invalid="ignore", divide="ignore"):
        lo = np.fmin(
            *(np.where(p > 0, c[f"{d}_pkt_len_min"], np.nan) for d, p in zip(DIRECTIONS, ps))
        )
        hi = np.fmax(
            *(np.where(p > 0, c[f"{d}_pkt_len_max"], np.nan) for d, p in zip(DIRECTIONS, ps))
        )
        mean = c["bidirectional_bytes"] / total
        sumsq = sum(
            np.where(p > 0, p * (c[f"{d}_pkt_len_std"] ** 2 + c[f"{d}_pkt_len_mean"] ** 2), 0.0)
            for d, p in zip(DIRECTIONS, ps)
        )
        sd = np.sqrt(np.maximum(sumsq / total - mean**2, 0.0))
    c["bidirectional_pkt_len_min"], c["bidirectional_pkt_len_max"] = lo, hi
    c["bidirectional_pkt_len_mean"] = mean
    c["bidirectional_pkt_len_std"] = np.where(total == 1, 0.0, np.minimum(sd, (hi - lo) / 2))


def not_applicable(
    c: dict, tcp: np.ndarray, total: np.ndarray
) -> list[tuple[list[str], np.ndarray]]:
    """The schema's missing-value rules (agent/features/schema.py) as (features, rows where they
    are NaN): what the generator writes and what fidelity.constraint_violations checks."""
    rules = []
    for d in DIRECTIONS:
        p = c[f"{d}_packets"]
        rules += [
            (
                [f"{d}_pkt_len_{s}" for s in ("min", "mean", "std", "max")] + [f"{d}_ttl_min"],
                p == 0,
            ),
            ([f"{d}_payload_ratio"], c[f"{d}_bytes"] == 0),
            ([f"{d}_iat_{s}_s" for s in ("min", "mean", "std", "max")], p <= 1),
            ([f"{d}_init_window"], ~tcp | (p == 0)),
            ([f"{d}_{f}_packets" for f in FLAGS], ~tcp),
            ([f"{d}_payload_{s}" for s in DIRECTION_STATS], c[f"{d}_payload_packets"] == 0),
        ]
    return rules + [
        ([f"bidirectional_iat_{s}_s" for s in ("min", "mean", "std", "max")], total <= 1),
        (["packets_per_s", "bytes_per_s"], c["duration_s"] == 0),
        (["tcp_answered", "tcp_reset"], ~tcp),
        (["http_request"], c["src2dst_payload_packets"] == 0),
        ([n for n in HTTP_STATS if n != "http_request"], c["http_request"] != 1),
        (["pair_gap_mean_s"], c["pair_prior_flows"] == 0),
        (["pair_gap_cv"], c["pair_prior_flows"] <= 1),
    ]


def _missing(c, tcp, total) -> None:
    """NaN exactly where agent/features/schema.py says a feature does not apply. Until nothing
    changes: a rule can read a feature another rule makes missing (no client payload, so no
    HTTP request, so none of its statistics)."""
    changed = True
    while changed:
        changed = False
        for names, where in not_applicable(c, tcp, total):
            for name in names:
                new = np.where(where, np.nan, c[name])
                changed |= bool((np.isnan(new) != np.isnan(c[name])).any())
                c[name] = new
