"""Flows: fold batches of decoded packets into a table of bidirectional flows.

A flow is a 5-tuple seen in both directions; its client is the sender of its first packet.
A flow ends when it has been idle for ``idle_timeout_s``, when it has lasted ``active_timeout_s``,
when a TCP connection has closed (RST, or FIN from both sides; packets up to
``tcp_close_linger_s`` later, such as the last ACK, still belong to it and a new SYN starts a new
flow), when the table is full (the longest-idle flows are evicted), or at the end of input.

Per-flow state is counts, sums, sums of squares, minima, maxima and first/last times per
direction, so a batch is folded in with column operations: packets are grouped by flow key,
split where one of the rules above ends a flow, reduced per flow, and merged into the table.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .decode import ACK, FIN, RST, SYN, TCP_FLAG_NAMES, Packets
from .flowrecords import (
    ACTIVE,
    COLUMNS,
    END_OF_INPUT,
    EVICTED,
    IDLE,
    NEVER,
    NS,
    TCP_END,
    FlowRecords,
    FlowUpdate,
    empty_records,
)


@dataclass(frozen=True)
class FlowConfig:
    """Flow expiry and table-size settings (defaults like nfstream's)."""

    idle_timeout_s: float = 120.0
    active_timeout_s: float = 1800.0
    tcp_close_linger_s: float = 1.0
    max_flows: int = 500_000

    def __post_init__(self) -> None:
        for name in ("idle_timeout_s", "active_timeout_s", "tcp_close_linger_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.max_flows < 1:
            raise ValueError(f"max_flows must be >= 1, got {self.max_flows!r}")


def _mix(x: np.ndarray) -> np.ndarray:
    """A 64-bit finaliser (splitmix64): spreads key bits so grouping by hash is even."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def host_hash(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """One 64-bit hash per address (given as two 64-bit halves)."""
    return _mix(_mix(hi) ^ lo)


class FlowTable:
    """The stateful table of open flows. Feed it ``add(packets)``; it returns what ended."""

    def __init__(self, config: FlowConfig | None = None, seed: int | None = None) -> None:
        self.config = config or FlowConfig()
        self._capacity = 0
        self._cols: dict[str, np.ndarray] = {}
        self._slot_of: dict[int, int] = {}  # key hash -> slot
        self._key_hash = np.zeros(0, dtype=np.uint64)
        self._free: list[int] = []
        self._next_seq = 0
        self.evicted = 0
        self.created = 0
        self.key_collisions = 0
        self.now_ns: int | None = None
        # A per-table random seed keeps crafted traffic from choosing hash collisions.
        self._seed = np.uint64(int.from_bytes(os.urandom(8), "little") if seed is None else seed)
        self._grow(1024)

    # ---- storage -----------------------------------------------------------------------
    def _grow(self, need: int) -> None:
        if need <= self._capacity:
            return
        new_cap = max(need, 2 * self._capacity)
        for name, (dtype, init, per_dir) in COLUMNS.items():
            shape = (new_cap, 2) if per_dir else (new_cap,)
            col = np.full(shape, init, dtype=dtype)
            if self._capacity:
                col[: self._capacity] = self._cols[name]
            self._cols[name] = col
        key_hash = np.zeros(new_cap, dtype=np.uint64)
        key_hash[: self._capacity] = self._key_hash
        self._key_hash = key_hash
        self._free.extend(range(new_cap - 1, self._capacity - 1, -1))
        self._capacity = new_cap

    def __len__(self) -> int:
        return len(self._slot_of)

    def _release(self, slots: np.ndarray, reason, registered: bool = True) -> FlowRecords:
        """Remove flows from the table and return them as records with their end reason.

        ``registered`` is False for flows that ended inside the batch that created them:
        their key was never entered in the lookup.
        """
        if len(slots) == 0:
            return empty_records()
        self._cols["end_reason"][slots] = reason
        out = FlowRecords({k: v[slots].copy() for k, v in self._cols.items()})
        if registered:
            for h in self._key_hash[slots].tolist():
                del self._slot_of[h]
        for name, (_, init, _) in COLUMNS.items():
            self._cols[name][slots] = init
        self._free.extend(slots.tolist())
        return out

    def open_flows(self) -> FlowRecords:
        """A snapshot of the flows still open."""
        slots = np.fromiter(self._slot_of.values(), dtype=np.int64, count=len(self._slot_of))
        return FlowRecords({k: v[np.sort(slots)].copy() for k, v in self._cols.items()})

    # ---- expiry ------------------------------------------------------------------------
    def expire(self, now_ns: int) -> FlowRecords:
        """End the flows that are idle, too long, or closed and past the linger time."""
        slots = np.fromiter(self._slot_of.values(), dtype=np.int64, count=len(self._slot_of))
        if len(slots) == 0:
            return empty_records()
        c = self._cols
        idle = now_ns - c["last_ns"][slots] >= int(self.config.idle_timeout_s * NS)
        active = now_ns - c["first_ns"][slots] >= int(self.config.active_timeout_s * NS)
        closed = _closed(c["rst_packets"][slots].sum(1), c["fin_packets"][slots]) & (
            now_ns - c["last_ns"][slots] >= int(self.config.tcp_close_linger_s * NS)
        )
        reason = np.where(closed, TCP_END, np.where(idle, IDLE, ACTIVE))
        done = idle | active | closed
        return self._release(slots[done], reason[done])

    def flush(self) -> FlowRecords:
        """End every open flow (end of input, or shutdown); closed TCP flows say tcp_end."""
        slots = np.sort(np.fromiter(self._slot_of.values(), dtype=np.int64))
        c = self._cols
        closed = _closed(c["rst_packets"][slots].sum(1), c["fin_packets"][slots])
        return self._release(slots, np.where(closed, TCP_END, END_OF_INPUT))

    def _evict(self) -> FlowRecords:
        excess = len(self._slot_of) - self.config.max_flows
        if excess <= 0:
            return empty_records()
        slots = np.fromiter(self._slot_of.values(), dtype=np.int64, count=len(self._slot_of))
        oldest = slots[np.argpartition(self._cols["last_ns"][slots], excess - 1)[:excess]]
        self.evicted += excess
        return self._release(np.sort(oldest), EVICTED)

    # ---- folding a batch ---------------------------------------------------------------
    def add(self, p: Packets) -> FlowUpdate:
        """Fold a batch of packets (in capture order) into the table."""
        if len(p) == 0:
            ended = self.expire(self.now_ns) if self.now_ns is not None else empty_records()
            return FlowUpdate(ended, empty_records(), np.zeros(0, np.int64), np.zeros(0, np.int64))
        # Canonical key: the lower (address, port) endpoint first.
        a_first = (p.src_hi < p.dst_hi) | (
            (p.src_hi == p.dst_hi)
            & ((p.src_lo < p.dst_lo) | ((p.src_lo == p.dst_lo) & (p.sport <= p.dport)))
        )
        swapped = ~a_first  # packet travels from the canonical second endpoint
        a_hi = np.where(a_first, p.src_hi, p.dst_hi)
        a_lo = np.where(a_first, p.src_lo, p.dst_lo)
        b_hi = np.where(a_first, p.dst_hi, p.src_hi)
        b_lo = np.where(a_first, p.dst_lo, p.src_lo)
        a_port = np.where(a_first, p.sport, p.dport).astype(np.uint64)
        b_port = np.where(a_first, p.dport, p.sport).astype(np.uint64)
        ports = (a_port << np.uint64(24)) | (b_port << np.uint64(8)) | p.proto.astype(np.uint64)
        h = _mix(host_hash(a_hi, a_lo) ^ _mix(host_hash(b_hi, b_lo) + ports) ^ self._seed)

        order = np.argsort(h, kind="stable")
        hs = h[order]
        n = len(order)
        seg_first = np.ones(n, dtype=bool)
        seg_first[1:] = hs[1:] != hs[:-1]
        seg_start = np.flatnonzero(seg_first)
        seg_of = np.cumsum(seg_first) - 1
        # Two keys with one 64-bit (seeded) hash in a batch would share a flow: count it.
        for col in (a_hi, a_lo, b_hi, b_lo, ports):
            cs = col[order]
            self.key_collisions += int((cs != cs[seg_start][seg_of]).any())

        ts = p.ts_ns[order]
        sw = swapped[order]
        flags = p.tcp_flags[order]

        # Table state of each segment's key (slot -1 when the key is new).
        seg_hash = hs[seg_start]
        lookup = self._slot_of.get
        seg_slot = np.fromiter((lookup(k, -1) for k in seg_hash.tolist()), np.int64, len(seg_start))
        known = seg_slot >= 0
        collided = empty_records()
        if known.any():
            ks = seg_slot[known]
            c = self._cols
            stored = np.stack([c["src_hi"][ks], c["src_lo"][ks], c["dst_hi"][ks], c["dst_lo"][ks]])
            t_sw = c["swapped"][ks]
            t_a_hi = np.where(t_sw, stored[2], stored[0])
            t_a_lo = np.where(t_sw, stored[3], stored[1])
            first_pkt = order[seg_start[known]]
            mismatch = (t_a_hi != a_hi[first_pkt]) | (t_a_lo != a_lo[first_pkt])
            if mismatch.any():  # another key owns this hash in the table: evict it
                self.key_collisions += int(mismatch.sum())
                clash = np.flatnonzero(known)[mismatch]
                collided = self._release(seg_slot[clash], EVICTED)
                seg_slot[clash] = -1
        starts, reason = self._split(seg_first, seg_start, seg_of, seg_slot, ts, sw, flags)

        # Runs of packets between starts are flows; a run that begins a known segment without
        # a split continues that segment's table flow.
        run_start = np.flatnonzero(starts | seg_first)
        run_of = np.cumsum(starts | seg_first) - 1
        run_seg = seg_of[run_start]
        continues = ~starts[run_start] & (seg_slot[run_seg] >= 0)

        ended_parts = [collided]
        # Table flows that a split in this batch ended before their first packet here.
        cut_segs = np.flatnonzero((seg_slot >= 0) & starts[seg_start])
        if len(cut_segs):
            ended_parts.append(self._release(seg_slot[cut_segs], reason[seg_start[cut_segs]]))
            seg_slot[cut_segs] = -1

        n_new = int((~continues).sum())
        self._grow(len(self._slot_of) + n_new)
        new_slots = np.array([self._free.pop() for _ in range(n_new)], dtype=np.int64)
        run_slot = np.empty(len(run_start), dtype=np.int64)
        run_slot[continues] = seg_slot[run_seg[continues]]
        run_slot[~continues] = new_slots
        new_runs = np.flatnonzero(~continues)
        self._init_flows(new_slots, order[run_start[new_runs]], p, swapped, a_first)

        self._fold(p, order, ts, sw, flags, run_start, run_of, run_slot)
        # Snapshot new flows before any of them that also ended here is released.
        by_seq = new_slots[np.argsort(self._cols["seq"][new_slots])]
        started = FlowRecords({k: v[by_seq].copy() for k, v in self._cols.items()})

        # Runs followed by another run of the same key were ended by that run's split. A run
        # that continued the table flow is registered under its key; a new one never was.
        last_run_of_seg = np.r_[run_seg[1:] != run_seg[:-1], True]
        self._key_hash[run_slot] = hs[run_start]
        closed_runs = np.flatnonzero(~last_run_of_seg)
        if len(closed_runs):
            slots = run_slot[closed_runs]
            why = reason[run_start[closed_runs + 1]]
            cont = continues[closed_runs]
            ended_parts.append(self._release(slots[cont], why[cont]))
            ended_parts.append(self._release(slots[~cont], why[~cont], registered=False))
        # The last run of each segment is the open flow of its key.
        fresh = last_run_of_seg & ~continues
        for slot, key in zip(run_slot[fresh].tolist(), hs[run_start[fresh]].tolist()):
            self._slot_of[key] = slot

        touched = run_slot[last_run_of_seg]
        ans = self._cols["answered_ns"][touched]
        answered = ans != NEVER
        answered_seq = self._cols["seq"][touched][answered]
        # Flows that ended inside this batch report their answers through `ended`.
        self.now_ns = int(ts.max()) if self.now_ns is None else max(self.now_ns, int(ts.max()))
        ended_parts.append(self.expire(self.now_ns))
        ended_parts.append(self._evict())
        return FlowUpdate(FlowRecords.concat(ended_parts), started, answered_seq, ans[answered])

    def _split(self, seg_first, seg_start, seg_of, seg_slot, ts, sw, flags):
        """Where a new flow starts inside each key's packets, and why the previous one ended.

        The rules depend on the flow a packet would join (its first time, its TCP close
        state), which depends on the earlier splits, so iterate to the fixed point; each round
        settles at least the next split from the left, and real traffic needs two or three.
        """
        cfg = self.config
        n = len(ts)
        c = self._cols
        known = seg_slot >= 0
        ks = np.where(known, seg_slot, 0)
        # State "before" each segment's first packet: the table flow's, for known keys.
        t_last = np.where(known, c["last_ns"][ks], 0)
        t_first = np.where(known, c["first_ns"][ks], 0)
        t_sw = c["swapped"][ks]
        t_fin = c["fin_packets"][ks]  # (segments, 2) in client/server orientation
        # Convert the table's FIN counts to canonical orientation (0: from endpoint a).
        t_fin_a = np.where(known, np.where(t_sw, t_fin[:, 1], t_fin[:, 0]) > 0, False)
        t_fin_b = np.where(known, np.where(t_sw, t_fin[:, 0], t_fin[:, 1]) > 0, False)
        t_rst = np.where(known, c["rst_packets"][ks].sum(1) > 0, False)

        is_fin = (flags & FIN) > 0
        fin_a = (is_fin & ~sw).astype(np.int64)
        fin_b = (is_fin & sw).astype(np.int64)
        rst = ((flags & RST) > 0).astype(np.int64)
        syn_only = (flags & (SYN | ACK)) == SYN
        idle = int(cfg.idle_timeout_s * NS)
        active = int(cfg.active_timeout_s * NS)
        linger = int(cfg.tcp_close_linger_s * NS)

        prev_ts = np.empty(n, dtype=np.int64)
        prev_ts[1:] = ts[:-1]
        prev_ts[seg_start] = t_last
        gap = ts - prev_ts
        idx = np.arange(n)
        cum_fin_a, cum_fin_b, cum_rst = np.cumsum(fin_a), np.cumsum(fin_b), np.cumsum(rst)
        starts = seg_first & ~known[seg_of]
        for _ in range(n + 1):
            run_begin = np.maximum.accumulate(np.where(starts | seg_first, idx, 0))
            continuing = ~starts[run_begin] & known[seg_of]
            first_ts = np.where(continuing, t_first[seg_of], ts[run_begin])

            def seen(per_packet, cumulative, table_flag, run_begin=run_begin, cont=continuing):
                """Whether the flag was seen in packet i's run up to and including i."""
                in_run = cumulative - cumulative[run_begin] + per_packet[run_begin]
                return (in_run > 0) | (cont & table_flag[seg_of])

            closed = seen(rst, cum_rst, t_rst) | (
                seen(fin_a, cum_fin_a, t_fin_a) & seen(fin_b, cum_fin_b, t_fin_b)
            )
            # Values "before packet i": from packet i-1 in the same segment, else the table.
            before_first = np.empty(n, dtype=np.int64)
            before_first[1:] = first_ts[:-1]
            before_closed = np.empty(n, dtype=bool)
            before_closed[1:] = closed[:-1]
            before_first[seg_start] = t_first
            before_closed[seg_start] = t_rst | (t_fin_a & t_fin_b)
            can_join = ~seg_first | known[seg_of]
            ends_by_close = before_closed & (syn_only | (gap >= linger))
            ends_by_idle = gap >= idle
            ends_by_active = ts - before_first >= active
            new_starts = (seg_first & ~known[seg_of]) | (
                can_join & (ends_by_close | ends_by_idle | ends_by_active)
            )
            if np.array_equal(new_starts, starts):
                break
            starts = new_starts
        reason = np.where(ends_by_close, TCP_END, np.where(ends_by_idle, IDLE, ACTIVE))
        return starts, reason.astype(np.int8)

    def _init_flows(self, slots, first_pkt, p: Packets, swapped, a_first) -> None:
        """Set the identity of new flows from their first packet (its sender is the client)."""
        c = self._cols
        # Number flows in the order their first packets arrived (not in hash order).
        c["seq"][slots[np.argsort(first_pkt, kind="stable")]] = np.arange(
            self._next_seq, self._next_seq + len(slots)
        )
        self._next_seq += len(slots)
        self.created += len(slots)
        for col, src in (
            ("ip_version", p.ip_version),
            ("src_hi", p.src_hi),
            ("src_lo", p.src_lo),
            ("dst_hi", p.dst_hi),
            ("dst_lo", p.dst_lo),
            ("src_port", p.sport),
            ("dst_port", p.dport),
            ("proto", p.proto),
            ("interface", p.interface),
            ("icmp_type", p.icmp_type),
            ("icmp_code", p.icmp_code),
            ("first_ns", p.ts_ns),
        ):
            c[col][slots] = src[first_pkt]
        c["swapped"][slots] = swapped[first_pkt]

    def _fold(self, p: Packets, order, ts, sw, flags, run_start, run_of, run_slot) -> None:
        """Reduce each run's packets and merge the results into its table slot."""
        c = self._cols
        slot = run_slot[run_of]
        d = (sw != c["swapped"][slot]).astype(np.int64)  # 0: client to server
        ip_len = p.ip_len[order]
        first_of_run = np.zeros(len(ts), dtype=bool)
        first_of_run[run_start] = True

        def add(col, values):
            sums = np.add.reduceat(values, run_start)
            c[col][run_slot] += sums.astype(c[col].dtype)

        # Bidirectional inter-arrival times: within the run, and from the table's last packet.
        prev = np.empty(len(ts), dtype=np.int64)
        prev[1:] = ts[:-1]
        prev[run_start] = c["last_ns"][run_slot]
        has_prev = ~first_of_run | (c["packets"][slot].sum(1) > 0)
        iat = np.where(has_prev, np.maximum(ts - prev, 0), 0)
        add("iat_sum", iat.astype(np.float64) / NS)
        add("iat_sumsq", (iat.astype(np.float64) / NS) ** 2)
        _fold_extreme(c["iat_min"], run_slot, np.minimum, np.where(has_prev, iat, NEVER), run_start)
        _fold_extreme(c["iat_max"], run_slot, np.maximum, np.where(has_prev, iat, -1), run_start)
        c["last_ns"][run_slot] = np.maximum.reduceat(ts, run_start)
        # The server answered: any packet back except a reset (a rejection, not an answer).
        answer = np.where((d == 1) & ((flags & RST) == 0), ts, NEVER)
        _fold_extreme(c["answered_ns"], run_slot, np.minimum, answer, run_start)

        wire = p.wirelen[order]
        hdr = p.hdr_len[order]
        payload = p.payload_len[order]
        ttl = p.ttl[order]
        window = p.tcp_window[order]
        flag_bits = ((flags[None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1).astype(np.int64)
        for direction in (0, 1):
            m = d == direction
            mi = m.astype(np.int64)
            sl = (run_slot, direction)
            c["packets"][sl] += np.add.reduceat(mi, run_start)
            c["bytes"][sl] += np.add.reduceat(wire * mi, run_start)
            c["ip_bytes"][sl] += np.add.reduceat(ip_len * mi, run_start)
            c["header_bytes"][sl] += np.add.reduceat(hdr * mi, run_start)
            c["payload_bytes"][sl] += np.add.reduceat(payload * mi, run_start)
            with_payload = ((payload > 0) & m).astype(np.int64)
            c["payload_packets"][sl] += np.add.reduceat(with_payload, run_start)
            lf = ip_len.astype(np.float64) * mi
            c["len_sum"][sl] += np.add.reduceat(lf, run_start)
            c["len_sumsq"][sl] += np.add.reduceat(lf * lf, run_start)
            _fold_extreme(c["len_min"], sl, np.minimum, np.where(m, ip_len, NEVER), run_start)
            _fold_extreme(c["len_max"], sl, np.maximum, np.where(m, ip_len, -1), run_start)
            _fold_extreme(c["ttl_min"], sl, np.minimum, np.where(m, ttl, 256), run_start)
            # The eight TCP flag counts in one (8, n) reduction.
            flag_sums = np.add.reduceat(flag_bits * mi, run_start, axis=1)
            for bit, name in enumerate(TCP_FLAG_NAMES):
                c[f"{name}_packets"][sl] += flag_sums[bit]

            # Per-direction times: the packets of this direction, still grouped by run.
            sel = np.flatnonzero(m)
            if len(sel) == 0:
                continue
            r = run_of[sel]
            t = ts[sel]
            dstart = np.ones(len(sel), dtype=bool)
            dstart[1:] = r[1:] != r[:-1]
            bounds = np.flatnonzero(dstart)
            dslots = run_slot[r[bounds]]
            dsl = (dslots, direction)
            prev_d = np.empty(len(sel), dtype=np.int64)
            prev_d[1:] = t[:-1]
            prev_d[bounds] = c["dir_last_ns"][dsl]
            has_prev_d = np.ones(len(sel), dtype=bool)
            has_prev_d[bounds] = c["dir_last_ns"][dsl] >= 0
            diat = np.where(has_prev_d, np.maximum(t - prev_d, 0), 0)
            df = diat.astype(np.float64) / NS
            c["dir_iat_sum"][dsl] += np.add.reduceat(df, bounds)
            c["dir_iat_sumsq"][dsl] += np.add.reduceat(df * df, bounds)
            no_iat = np.where(has_prev_d, diat, NEVER)
            _fold_extreme(c["dir_iat_min"], dsl, np.minimum, no_iat, bounds)
            _fold_extreme(c["dir_iat_max"], dsl, np.maximum, np.where(has_prev_d, diat, -1), bounds)
            fresh = c["dir_first_ns"][dsl] == NEVER
            c["dir_first_ns"][dsl] = np.minimum(c["dir_first_ns"][dsl], t[bounds])
            c["dir_last_ns"][dsl] = np.maximum.reduceat(t, bounds)
            w = window[sel][bounds]
            c["init_window"][dsl] = np.where(fresh, w, c["init_window"][dsl])


def _fold_extreme(col: np.ndarray, where, ufunc, values: np.ndarray, starts: np.ndarray) -> None:
    """col[where] = ufunc(col[where], ufunc.reduceat(values, starts)): a running min or max."""
    col[where] = ufunc(col[where], ufunc.reduceat(values, starts))


def _closed(rst_total: np.ndarray, fin: np.ndarray) -> np.ndarray:
    """TCP close: a reset, or a FIN from each side. ``fin`` is (n, 2) per direction."""
    return (rst_total > 0) | ((fin[:, 0] > 0) & (fin[:, 1] > 0))
