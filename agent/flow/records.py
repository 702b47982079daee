"""Flow records: the columns one flow's state is kept in, and batches of flows as columns.

The flow table (table.py) holds open flows in these columns; ended flows leave it as
FlowRecords, which the context, features and output stages read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quietwire.agent.capture.decode import TCP_FLAG_NAMES
from quietwire.agent.flow.payload import DIRECTION_STATS, HTTP_STATS

NS = 1_000_000_000
NEVER = np.iinfo(np.int64).max
LEN_NONE = np.iinfo(np.int32).max  # len_min of a direction without packets
COUNT_MAX = np.iinfo(np.uint32).max  # packet counts kept in 32 bits stop here (saturate)
END_REASONS = (
    "idle_timeout",
    "active_timeout",
    "tcp_end",
    "evicted",
    "end_of_input",
    "emergency_timeout",
    "interim",  # not an end: a snapshot of a flow still open (see INTERIM_FIRST_S)
)
IDLE, ACTIVE, TCP_END, EVICTED, END_OF_INPUT, EMERGENCY_TIMEOUT, INTERIM = range(len(END_REASONS))
# Interim records: a flow still open is judged when it is INTERIM_FIRST_S old, and again each
# time its age doubles (60, 120, 240, ... s) if packets came since the previous one, so that an
# upload, a slow DoS connection or a long C2 session has a verdict within a minute, not at its
# end (up to the 30-minute active timeout). The schedule is part of the feature schema: the
# trainer and the agent must see the same kind of records (schema.SCHEMA_HASH includes it).
INTERIM_FIRST_S = 60


# Table columns: name -> (dtype, initial value, per direction? or the shape of one row's
# value). Direction 0 is client to server (src2dst), 1 is server to client (dst2src).
#
# Bytes per open flow: 133 for the columns of one value and 2 x 170 for the per-direction ones
# (473 in all, 64 of them payload statistics; see bytes_per_flow()); the flow table adds 8 for the
# key hash, 24 for its key index (keyindex.py) and 4 for the free-slot stack. Bounded values are
# kept narrow: IP lengths in 32 bits, and the counts that are not the flow's packet total (TCP
# flags, packets with payload) in unsigned 32 bits that saturate at COUNT_MAX (a single flow would
# need over 2.3 million packets/s for the whole default 30-minute active timeout to reach it; the
# features are float32, exact only to 2**24, anyway). Times, byte counts, packets and sums stay
# 64-bit.
COLUMNS: dict[str, tuple[str, float, bool | tuple[int, ...]]] = {
    "seq": ("i8", -1, False),
    "ip_version": ("u1", 0, False),
    "src_hi": ("u8", 0, False),
    "src_lo": ("u8", 0, False),
    "dst_hi": ("u8", 0, False),
    "dst_lo": ("u8", 0, False),
    "src_port": ("i4", 0, False),
    "dst_port": ("i4", 0, False),
    "proto": ("u1", 0, False),
    "interface": ("i4", 0, False),
    "icmp_type": ("i2", -1, False),
    "icmp_code": ("i2", -1, False),
    "swapped": ("?", False, False),  # client is the canonical key's second endpoint
    "first_ns": ("i8", 0, False),
    "last_ns": ("i8", 0, False),
    "answered_ns": ("i8", NEVER, False),
    "iat_sum": ("f8", 0.0, False),
    "iat_sumsq": ("f8", 0.0, False),
    "iat_min": ("i8", NEVER, False),
    "iat_max": ("i8", -1, False),
    "end_reason": ("i1", -1, False),
    "interims": ("u1", 0, False),  # interim records made of this flow so far
    "packets": ("i8", 0, True),
    "bytes": ("i8", 0, True),
    "ip_bytes": ("i8", 0, True),
    "header_bytes": ("i8", 0, True),
    "payload_bytes": ("i8", 0, True),
    "payload_packets": ("u4", 0, True),
    "len_sum": ("f8", 0.0, True),
    "len_sumsq": ("f8", 0.0, True),
    "len_min": ("i4", LEN_NONE, True),
    "len_max": ("i4", -1, True),
    "dir_last_ns": ("i8", -1, True),
    "dir_iat_sum": ("f8", 0.0, True),
    "dir_iat_sumsq": ("f8", 0.0, True),
    "dir_iat_min": ("i8", NEVER, True),
    "dir_iat_max": ("i8", -1, True),
    "ttl_min": ("i2", 256, True),
    "init_window": ("i4", -1, True),
    **{f"{flag}_packets": ("u4", 0, True) for flag in TCP_FLAG_NAMES},
    # Payload statistics of each direction's first payload packet (payload.py), and the
    # client's HTTP request line; NaN until there is one. Half precision: shares, entropy
    # and window positions (at most 256) need no more.
    "payload_stats": ("f2", np.nan, (2, len(DIRECTION_STATS))),  # [direction, statistic]
    "http_stats": ("f2", np.nan, (len(HTTP_STATS),)),
}
# What the host context needs of a flow at its start (FlowUpdate.started holds only these).
START_COLUMNS = (
    "seq",
    "src_hi",
    "src_lo",
    "dst_hi",
    "dst_lo",
    "dst_port",
    "proto",
    "first_ns",
    "answered_ns",
)


def row_shape(spec: bool | tuple[int, ...]) -> tuple[int, ...]:
    """The shape of one flow's value in a column: (2,) per direction, () for one value."""
    if isinstance(spec, tuple):
        return spec
    return (2,) if spec else ()


def bytes_per_flow() -> int:
    """Bytes one flow takes in the COLUMNS (the table's state columns, one row)."""
    return sum(np.dtype(t).itemsize * int(np.prod(row_shape(d))) for t, _, d in COLUMNS.values())


# Rows of the 2-D (per-direction and statistics) columns are read and written below as whole
# rows: numpy's fancy indexing copies them one element at a time, about ten times slower.
def take_rows(column: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``column[index]`` for an integer index array."""
    return np.take(column, index, axis=0)


def put_rows(column: np.ndarray, index: np.ndarray, values) -> None:
    """``column[index] = values`` for an integer index array and a contiguous column (as the
    table's are); ``values`` holds a row per index, or one value for every row."""
    if column.ndim == 1:
        column[index] = values
        return
    values = np.asarray(values, dtype=column.dtype)
    if values.ndim < column.ndim:  # one value for every row
        values = np.full((1, *column.shape[1:]), values, dtype=column.dtype)
    row_bytes = column.itemsize * int(np.prod(column.shape[1:]))
    as_items = np.dtype((np.void, row_bytes))  # one opaque item per row
    items = np.reshape(column, (len(column), -1), copy=False).view(as_items)[:, 0]
    items[index] = np.ascontiguousarray(values).reshape(len(values), -1).view(as_items)[:, 0]


def either_direction(counts: np.ndarray) -> np.ndarray:
    """Whether each row of (n, 2) per-direction counts is above 0 in a direction."""
    return (counts[:, 0] > 0) | (counts[:, 1] > 0)


@dataclass(frozen=True)
class FlowRecords:
    """Ended (or still open) flows as columns; see COLUMNS for names. Per-direction columns
    have shape (n, 2): [:, 0] client to server, [:, 1] server to client."""

    columns: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.columns["seq"])

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    def take(self, index: np.ndarray) -> FlowRecords:
        return FlowRecords({k: v[index] for k, v in self.columns.items()})

    @staticmethod
    def concat(parts: list[FlowRecords], consume: bool = False) -> FlowRecords:
        """The parts one after the other. With ``consume`` the parts are emptied column by
        column as they are copied, so that only one column is held twice at a time."""
        parts = [p for p in parts if len(p)]
        if not parts:
            return empty_records()
        if len(parts) == 1:
            return parts[0]
        out = {}
        for k in list(parts[0].columns):
            pieces = [p.columns.pop(k) if consume else p.columns[k] for p in parts]
            out[k] = np.concatenate(pieces)
            del pieces
        return FlowRecords(out)


def empty_records() -> FlowRecords:
    return FlowRecords(
        {k: np.zeros((0, *row_shape(d)), dtype=t) for k, (t, _, d) in COLUMNS.items()}
    )


@dataclass(frozen=True)
class FlowUpdate:
    """What one batch did: flows that ended, flows that started (START_COLUMNS only), flows
    first answered."""

    ended: FlowRecords
    started: FlowRecords
    answered_seq: np.ndarray
    answered_ns: np.ndarray
