"""Folding one batch's packets into the flow table's columns (see table.py for the rules).

Packets arrive grouped by flow key (segments of a sort by key hash). ``split_runs`` finds
where a flow ends and a new one of the same key starts inside a segment (idle, active timeout,
TCP close); ``fold_runs`` reduces each run of packets with column operations and merges the
result into its flow's row: counts and sums add, minima and maxima fold, times move on. Runs
of one packet (most of a batch when many flows are open at once) skip the reductions and are
merged directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quietwire.agent.capture.decode import ACK, FIN, RST, SYN, TCP_FLAG_NAMES, Packets
from quietwire.agent.flow.payload import direction_stats, http_stats, window
from quietwire.agent.flow.records import (
    ACTIVE,
    COUNT_MAX,
    IDLE,
    NEVER,
    NS,
    TCP_END,
    either_direction,
    put_rows,
    take_rows,
)


@dataclass(frozen=True)
class GroupedBatch:
    """A batch's packets grouped by flow key: sorted by key hash (a segment per key), each
    key's packets in capture order. Per sorted packet unless said otherwise."""

    order: np.ndarray  # index of the packet in the batch
    key_hash: np.ndarray  # uint64, the packet's flow key hash
    seg_first: np.ndarray  # bool: the first packet of its key's segment
    seg_start: np.ndarray  # per segment: the position of its first packet
    seg_of: np.ndarray  # the segment the packet belongs to
    ts: np.ndarray  # int64 capture time, ns
    swapped: np.ndarray  # bool: sent from the key's second endpoint
    flags: np.ndarray  # uint8 TCP flags

    def __len__(self) -> int:
        return len(self.ts)


@dataclass(frozen=True)
class _TableFlows:
    """Per segment: the table flow its key had before this batch (zeros when ``known`` is
    False), with FIN counts in canonical orientation (``fin_a``: from the key's first
    endpoint)."""

    known: np.ndarray
    last_ns: np.ndarray
    first_ns: np.ndarray
    fin_a: np.ndarray
    fin_b: np.ndarray
    rst: np.ndarray


def _table_flows(cols: dict[str, np.ndarray], seg_slot: np.ndarray) -> _TableFlows:
    """The table state "before" each segment's first packet (slot -1: a new key)."""
    c = cols
    known = seg_slot >= 0
    ks = np.where(known, seg_slot, 0)
    t_sw = c["swapped"][ks]
    t_fin = take_rows(c["fin_packets"], ks)  # (segments, 2) in client/server orientation
    return _TableFlows(
        known=known,
        last_ns=np.where(known, c["last_ns"][ks], 0),
        first_ns=np.where(known, c["first_ns"][ks], 0),
        fin_a=np.where(known, np.where(t_sw, t_fin[:, 1], t_fin[:, 0]) > 0, False),
        fin_b=np.where(known, np.where(t_sw, t_fin[:, 0], t_fin[:, 1]) > 0, False),
        rst=np.where(known, either_direction(take_rows(c["rst_packets"], ks)), False),
    )


@dataclass(frozen=True)
class _CloseMarks:
    """Per sorted packet: the TCP flags that close a flow (0/1, with running sums over the
    batch), whether it is a bare SYN, and its gap to the key's previous packet."""

    fin_a: np.ndarray
    fin_b: np.ndarray
    rst: np.ndarray
    cum_fin_a: np.ndarray
    cum_fin_b: np.ndarray
    cum_rst: np.ndarray
    syn_only: np.ndarray
    gap: np.ndarray


def _close_marks(batch: GroupedBatch, table: _TableFlows) -> _CloseMarks:
    flags, sw, ts = batch.flags, batch.swapped, batch.ts
    is_fin = (flags & FIN) > 0
    fin_a = (is_fin & ~sw).astype(np.int64)
    fin_b = (is_fin & sw).astype(np.int64)
    rst = ((flags & RST) > 0).astype(np.int64)
    prev_ts = np.empty(len(ts), dtype=np.int64)
    prev_ts[1:] = ts[:-1]
    prev_ts[batch.seg_start] = table.last_ns
    return _CloseMarks(
        fin_a=fin_a,
        fin_b=fin_b,
        rst=rst,
        cum_fin_a=np.cumsum(fin_a),
        cum_fin_b=np.cumsum(fin_b),
        cum_rst=np.cumsum(rst),
        syn_only=(flags & (SYN | ACK)) == SYN,
        gap=ts - prev_ts,
    )


def split_runs(
    cols: dict[str, np.ndarray],
    timeouts_ns: dict[str, int],
    batch: GroupedBatch,
    seg_slot: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Where a new flow starts inside each key's packets, and why the previous one ended
    (per sorted packet: a bool, and an int8 end reason). ``seg_slot`` is each segment's
    table slot, -1 for a key not in the table.

    The rules depend on the flow a packet would join (its first time, its TCP close
    state), which depends on the earlier splits, so iterate to the fixed point; each round
    settles at least the next split from the left, and real traffic needs two or three.
    """
    table = _table_flows(cols, seg_slot)
    marks = _close_marks(batch, table)
    starts = batch.seg_first & ~table.known[batch.seg_of]
    for _ in range(len(batch) + 1):
        new_starts, ends_by_close, ends_by_idle = _next_starts(
            batch, table, marks, starts, timeouts_ns
        )
        if np.array_equal(new_starts, starts):
            break
        starts = new_starts
    reason = np.where(ends_by_close, TCP_END, np.where(ends_by_idle, IDLE, ACTIVE))
    return starts, reason.astype(np.int8)


def _next_starts(
    batch: GroupedBatch,
    table: _TableFlows,
    marks: _CloseMarks,
    starts: np.ndarray,
    timeouts_ns: dict[str, int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One round of split_runs: the flow starts the rules give when flows start at
    ``starts``, and per packet whether it ends the flow before it by a TCP close or by the
    idle timeout (else, where it starts one, by the active timeout)."""
    seg_first, seg_start, seg_of, ts = batch.seg_first, batch.seg_start, batch.seg_of, batch.ts
    known = table.known
    idx = np.arange(len(ts))
    run_begin = np.maximum.accumulate(np.where(starts | seg_first, idx, 0))
    continuing = ~starts[run_begin] & known[seg_of]
    first_ts = np.where(continuing, table.first_ns[seg_of], ts[run_begin])

    def seen(per_packet, cumulative, table_flag):
        """Whether the flag was seen in packet i's run up to and including i."""
        in_run = cumulative - cumulative[run_begin] + per_packet[run_begin]
        return (in_run > 0) | (continuing & table_flag[seg_of])

    m = marks
    closed = seen(m.rst, m.cum_rst, table.rst) | (
        seen(m.fin_a, m.cum_fin_a, table.fin_a) & seen(m.fin_b, m.cum_fin_b, table.fin_b)
    )
    # Values "before packet i": from packet i-1 in the same segment, else the table.
    before_first = np.empty(len(ts), dtype=np.int64)
    before_first[1:] = first_ts[:-1]
    before_closed = np.empty(len(ts), dtype=bool)
    before_closed[1:] = closed[:-1]
    before_first[seg_start] = table.first_ns
    before_closed[seg_start] = table.rst | (table.fin_a & table.fin_b)
    can_join = ~seg_first | known[seg_of]
    ends_by_close = before_closed & (m.syn_only | (m.gap >= timeouts_ns["linger"]))
    ends_by_idle = m.gap >= timeouts_ns["idle"]
    ends_by_active = ts - before_first >= timeouts_ns["active"]
    new_starts = (seg_first & ~known[seg_of]) | (
        can_join & (ends_by_close | ends_by_idle | ends_by_active)
    )
    return new_starts, ends_by_close, ends_by_idle


def fold_runs(
    cols: dict[str, np.ndarray],
    p: Packets,
    batch: GroupedBatch,
    run_start: np.ndarray,
    run_of: np.ndarray,
    run_slot: np.ndarray,
    payload: bool = True,
) -> None:
    """Reduce each run's packets and merge the results into its table slot; with
    ``payload``, also the payload statistics of each direction's first payload packet.

    Runs of one packet (every run, when many flows are open and each has one packet in the
    batch) are merged directly, without the per-run reductions; each run has its own slot,
    so the two kinds fold independently and give the same values either way."""
    c = cols
    order, ts, flags = batch.order, batch.ts, batch.flags
    d = (batch.swapped != c["swapped"][run_slot[run_of]]).astype(np.int64)  # 0: client to server
    if payload and p.raw is not None:
        _fold_payload(c, p, order, d, run_of, run_slot)
    lengths = np.diff(np.r_[run_start, len(ts)])
    single = lengths == 1
    if single.any():
        runs = np.flatnonzero(single)
        at = run_start[runs]
        _fold_single(c, p, order[at], ts[at], d[at], flags[at], run_slot[runs])
        if len(runs) == len(run_start):
            return
        runs = np.flatnonzero(~single)
        lengths = lengths[runs]
        sel = np.flatnonzero(~single[run_of])
        order, ts, d, flags = order[sel], ts[sel], d[sel], flags[sel]
        run_slot = run_slot[runs]
        run_start = np.cumsum(lengths) - lengths
        run_of = np.repeat(np.arange(len(runs)), lengths)
    _fold_grouped(c, p, order, ts, d, flags, run_start, run_of, run_slot)


def _fold_single(c, p: Packets, order, ts, d, flags, slots) -> None:
    """fold_runs for runs of one packet each: packet i is the whole run of slot ``slots[i]``
    and travels in direction ``d[i]``."""
    has_prev = either_direction(take_rows(c["packets"], slots))
    iat = np.where(has_prev, np.maximum(ts - c["last_ns"][slots], 0), 0)
    iat_s = iat.astype(np.float64) / NS
    c["iat_sum"][slots] += iat_s
    c["iat_sumsq"][slots] += iat_s**2
    c["iat_min"][slots] = np.minimum(c["iat_min"][slots], np.where(has_prev, iat, NEVER))
    c["iat_max"][slots] = np.maximum(c["iat_max"][slots], np.where(has_prev, iat, -1))
    c["last_ns"][slots] = ts
    answer = np.where((d == 1) & ((flags & RST) == 0), ts, NEVER)
    c["answered_ns"][slots] = np.minimum(c["answered_ns"][slots], answer)

    # Per-direction columns are (slots, 2): index them flat, at 2 * slot + direction.
    at = 2 * slots + d
    ip_len = p.ip_len[order]
    payload = p.payload_len[order]

    col = _flat_view(c)
    fresh = col("packets")[at] == 0  # the direction's first packet sets its initial TCP window
    col("packets")[at] += 1
    col("bytes")[at] += p.wirelen[order]
    col("ip_bytes")[at] += ip_len
    col("header_bytes")[at] += p.hdr_len[order]
    col("payload_bytes")[at] += payload
    _add_one(col("payload_packets"), at[payload > 0])
    lf = ip_len.astype(np.float64)
    col("len_sum")[at] += lf
    col("len_sumsq")[at] += lf * lf
    col("len_min")[at] = np.minimum(col("len_min")[at], ip_len)
    col("len_max")[at] = np.maximum(col("len_max")[at], ip_len)
    col("ttl_min")[at] = np.minimum(col("ttl_min")[at], p.ttl[order])
    seen = int(np.bitwise_or.reduce(flags))  # the TCP flags seen in the batch
    for bit, name in enumerate(TCP_FLAG_NAMES):
        if seen >> bit & 1:
            _add_one(col(f"{name}_packets"), at[(flags & (1 << bit)) > 0])

    last_d = col("dir_last_ns")[at]
    has_prev_d = last_d >= 0
    diat = np.where(has_prev_d, np.maximum(ts - last_d, 0), 0)
    df = diat.astype(np.float64) / NS
    col("dir_iat_sum")[at] += df
    col("dir_iat_sumsq")[at] += df * df
    col("dir_iat_min")[at] = np.minimum(col("dir_iat_min")[at], np.where(has_prev_d, diat, NEVER))
    col("dir_iat_max")[at] = np.maximum(col("dir_iat_max")[at], np.where(has_prev_d, diat, -1))
    col("dir_last_ns")[at] = ts
    init = col("init_window")
    init[at] = np.where(fresh, p.tcp_window[order], init[at])


def _fold_grouped(c, p: Packets, order, ts, d, flags, run_start, run_of, run_slot) -> None:
    """fold_runs for runs of any length: per-run reductions (reduceat) merged into the slots."""
    packets_before = take_rows(c["packets"], run_slot)  # (runs, 2): before this batch
    _fold_run_times(c, ts, d, flags, run_start, run_of, run_slot, packets_before)

    # Per-direction state: the packets of each (run, direction) together, still in order (a
    # stable sort; runs are contiguous already), reduced once into the flat (slot, direction)
    # index 2 * slot + direction. The sums regrouped here are of whole numbers (exact in any
    # order); the inter-arrival times keep each direction's packets in their order.
    key = 2 * run_of + d
    g = np.argsort(key, kind="stable")
    key = key[g]
    bounds = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    group = key[bounds]
    at = 2 * run_slot[group >> 1] + (group & 1)
    pick = order[g]

    fresh = np.reshape(packets_before, -1)[group] == 0  # (runs, 2) flat: 2 * run + direction
    ip_len = p.ip_len[pick]
    payload = p.payload_len[pick]
    col = _flat_view(c)
    col("packets")[at] += np.diff(np.r_[bounds, len(g)])
    col("bytes")[at] += np.add.reduceat(p.wirelen[pick], bounds, dtype=np.int64)
    col("ip_bytes")[at] += np.add.reduceat(ip_len, bounds, dtype=np.int64)
    col("header_bytes")[at] += np.add.reduceat(p.hdr_len[pick], bounds, dtype=np.int64)
    col("payload_bytes")[at] += np.add.reduceat(payload, bounds, dtype=np.int64)
    with_payload = (payload > 0).astype(np.int64)
    _add_count(col("payload_packets"), at, np.add.reduceat(with_payload, bounds))
    lf = ip_len.astype(np.float64)
    col("len_sum")[at] += np.add.reduceat(lf, bounds)
    col("len_sumsq")[at] += np.add.reduceat(lf * lf, bounds)
    _fold_extreme(col("len_min"), at, np.minimum, ip_len, bounds)
    _fold_extreme(col("len_max"), at, np.maximum, ip_len, bounds)
    _fold_extreme(col("ttl_min"), at, np.minimum, p.ttl[pick], bounds)
    _fold_flag_counts(col, at, flags[g], bounds)
    _fold_direction_times(col, at, ts[g], bounds)
    # The first packet of a direction sets its initial TCP window.
    init = col("init_window")
    init[at] = np.where(fresh, p.tcp_window[pick][bounds], init[at])


def _flat_view(c: dict[str, np.ndarray]):
    """A lookup of per-direction (slots, 2) columns as flat views, indexed at
    2 * slot + direction (writes reach the table)."""

    def col(name: str) -> np.ndarray:
        return np.reshape(c[name], -1, copy=False)

    return col


def _fold_run_times(c, ts, d, flags, run_start, run_of, run_slot, packets_before) -> None:
    """Bidirectional inter-arrival times (within the run, and from the table's last packet),
    last packet times and the server's first answer of each run."""
    first_of_run = np.zeros(len(ts), dtype=bool)
    first_of_run[run_start] = True

    def add(col, values):
        sums = np.add.reduceat(values, run_start)
        c[col][run_slot] += sums.astype(c[col].dtype)

    prev = np.empty(len(ts), dtype=np.int64)
    prev[1:] = ts[:-1]
    prev[run_start] = c["last_ns"][run_slot]
    has_prev = ~first_of_run | either_direction(packets_before)[run_of]
    iat = np.where(has_prev, np.maximum(ts - prev, 0), 0)
    add("iat_sum", iat.astype(np.float64) / NS)
    add("iat_sumsq", (iat.astype(np.float64) / NS) ** 2)
    _fold_extreme(c["iat_min"], run_slot, np.minimum, np.where(has_prev, iat, NEVER), run_start)
    _fold_extreme(c["iat_max"], run_slot, np.maximum, np.where(has_prev, iat, -1), run_start)
    c["last_ns"][run_slot] = np.maximum.reduceat(ts, run_start)
    # The server answered: any packet back except a reset (a rejection, not an answer).
    answer = np.where((d == 1) & ((flags & RST) == 0), ts, NEVER)
    _fold_extreme(c["answered_ns"], run_slot, np.minimum, answer, run_start)


def _fold_flag_counts(col, at: np.ndarray, flags: np.ndarray, bounds: np.ndarray) -> None:
    """The counts of the TCP flags seen in the batch (adding 0 changes no count), per
    (slot, direction) group, in one (flags, n) reduction."""
    seen = int(np.bitwise_or.reduce(flags))
    bits = [bit for bit in range(8) if seen >> bit & 1]
    flag_bits = (flags[None, :] >> np.array(bits, dtype=np.uint8)[:, None]) & 1
    flag_sums = np.add.reduceat(flag_bits, bounds, axis=1, dtype=np.int64)
    for row, bit in enumerate(bits):
        _add_count(col(f"{TCP_FLAG_NAMES[bit]}_packets"), at, flag_sums[row])


def _fold_direction_times(col, at: np.ndarray, t: np.ndarray, bounds: np.ndarray) -> None:
    """Per-direction inter-arrival times and last times, per (slot, direction) group of
    packets ``t`` (each group's in capture order)."""
    dir_last = col("dir_last_ns")
    prev_d = np.empty(len(t), dtype=np.int64)
    prev_d[1:] = t[:-1]
    prev_d[bounds] = dir_last[at]
    has_prev_d = np.ones(len(t), dtype=bool)
    has_prev_d[bounds] = dir_last[at] >= 0
    diat = np.where(has_prev_d, np.maximum(t - prev_d, 0), 0)
    df = diat.astype(np.float64) / NS
    col("dir_iat_sum")[at] += np.add.reduceat(df, bounds)
    col("dir_iat_sumsq")[at] += np.add.reduceat(df * df, bounds)
    _fold_extreme(col("dir_iat_min"), at, np.minimum, np.where(has_prev_d, diat, NEVER), bounds)
    _fold_extreme(col("dir_iat_max"), at, np.maximum, np.where(has_prev_d, diat, -1), bounds)
    dir_last[at] = np.maximum.reduceat(t, bounds)


def _fold_payload(c, p: Packets, order, d, run_of, run_slot) -> None:
    """Statistics of each direction's first packet with payload (payload.py), for flows that
    had none in that direction before this batch."""
    has = p.payload_len[order] > 0
    rows, dirs, slots = [], [], []
    for direction in (0, 1):
        sel = np.flatnonzero(has & (d == direction))
        if len(sel) == 0:
            continue
        r = run_of[sel]
        first = sel[np.r_[True, r[1:] != r[:-1]]]  # packets are grouped by run, in order
        slot = run_slot[run_of[first]]
        fresh = c["payload_packets"][slot, direction] == 0  # (folded after this)
        rows.append(first[fresh])
        dirs.append(np.full(int(fresh.sum()), direction))
        slots.append(slot[fresh])
    if not rows:
        return
    rows, dirs, slots = np.concatenate(rows), np.concatenate(dirs), np.concatenate(slots)
    if len(rows) == 0:
        return
    pkt = order[rows]
    w, n_bytes = window(p.raw, p.payload_offset[pkt], p.payload_captured[pkt])
    stats = direction_stats(w, n_bytes)
    per_direction = np.reshape(c["payload_stats"], (-1, stats.shape[1]), copy=False)
    put_rows(per_direction, 2 * slots + dirs, stats)  # row 2 * slot + direction
    client = dirs == 0
    if client.any():
        http = http_stats(p.raw, p.payload_offset[pkt[client]], p.payload_captured[pkt[client]])
        put_rows(c["http_stats"], slots[client], http)


def _fold_extreme(col: np.ndarray, where, ufunc, values: np.ndarray, starts: np.ndarray) -> None:
    """col[where] = ufunc(col[where], ufunc.reduceat(values, starts)): a running min or max."""
    col[where] = ufunc(col[where], ufunc.reduceat(values, starts))


def _add_one(col: np.ndarray, at: np.ndarray) -> None:
    """col[at] += 1 for a flat 32-bit count column (distinct ``at``), saturating at COUNT_MAX."""
    count = col[at]
    col[at] = count + (count < COUNT_MAX)


def _add_count(col: np.ndarray, where, values: np.ndarray) -> None:
    """col[where] += values for a 32-bit count column, saturating at COUNT_MAX."""
    col[where] = np.minimum(col[where] + values, COUNT_MAX)
