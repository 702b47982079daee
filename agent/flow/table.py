"""Flows: fold batches of decoded packets into a table of bidirectional flows.

A flow is a 5-tuple seen in both directions; its client is the sender of its first packet.
A flow ends when it has been idle for ``idle_timeout_s``, when it has lasted ``active_timeout_s``,
when a TCP connection has closed (RST, or FIN from both sides; packets up to
``tcp_close_linger_s`` later, such as the last ACK, still belong to it and a new SYN starts a new
flow), when the table needs room (see below), or at the end of input.

The table holds at most ``max_flows`` open flows. Emergency mode (after Suricata's flow
engine) starts when a batch would fill it to ``emergency_enter_fill`` and lasts until it is below
``emergency_leave_fill``: meanwhile flows that never got an answer (no packet from the server)
end after ``emergency_unanswered_timeout_s`` idle and the others after
``emergency_idle_timeout_s``, and when room is still needed the unanswered flows are evicted
first, then the longest-idle ones, and no payload statistics are taken (their features stay
NaN: a flood's flows are judged by counts and host context). What ends early is counted in
``FlowTable.evictions``. How flows end before the input does (expiry, emergency mode,
eviction, interim records) is in expiry.py.

A flow still open is also reported before it ends (``interim``): ``FlowTable.snapshot`` hands
on a copy of each flow that reached an age of the interim schedule (records.INTERIM_FIRST_S,
then doubling) with packets since its previous snapshot, with end reason ``interim``.

Per-flow state is counts, sums, sums of squares, minima, maxima and first/last times per
direction, so a batch is folded in with column operations: packets are grouped by flow key,
split where one of the rules above ends a flow, reduced per flow, and merged into the table
(fold.py). Keys are found through a numpy hash index (keyindex.py), so the cost of a packet
or a new flow does not grow with the flows open; expiry is one column scan per batch.

Memory per open flow: 473 bytes of state columns (records.COLUMNS), 8 for its key hash,
24 for the key index and 4 for the free-slot stack: 509 (bench/bench_table.py measures it).
Ended flows leave in start order, and no call ends more than a bounded number (see
``FlowTable.expire``), so what a flood hands the next stages at once is bounded.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass

import numpy as np

from quietwire.agent.capture.decode import Packets
from quietwire.agent.flow.expiry import EVICTION_REASONS, FlowExpiry, tcp_closed
from quietwire.agent.flow.fold import GroupedBatch, fold_runs, split_runs
from quietwire.agent.flow.keyindex import KeyIndex
from quietwire.agent.flow.records import (
    COLUMNS,
    EVICTED,
    INTERIM_FIRST_S,
    NEVER,
    NS,
    START_COLUMNS,
    FlowRecords,
    FlowUpdate,
    empty_records,
    put_rows,
    row_shape,
    take_rows,
)


@dataclass(frozen=True)
class FlowConfig:
    """Flow expiry, table size and emergency mode (timeouts like nfstream's defaults, emergency
    mode like Suricata's flow engine; ``emergency=False`` keeps plain longest-idle eviction)."""

    idle_timeout_s: float = 120.0
    active_timeout_s: float = 1800.0
    tcp_close_linger_s: float = 1.0
    max_flows: int = 500_000
    emergency: bool = True
    emergency_enter_fill: float = 0.95
    emergency_leave_fill: float = 0.70
    emergency_idle_timeout_s: float = 10.0
    emergency_unanswered_timeout_s: float = 2.0
    interim: bool = True  # report flows still open at the interim ages (see snapshot())
    payload: bool = True  # payload statistics (payload.py); off: those features are NaN

    def __post_init__(self) -> None:
        for name in (
            "idle_timeout_s",
            "active_timeout_s",
            "tcp_close_linger_s",
            "emergency_idle_timeout_s",
            "emergency_unanswered_timeout_s",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.max_flows < 1:
            raise ValueError(f"max_flows must be >= 1, got {self.max_flows!r}")
        if not 0 < self.emergency_leave_fill < self.emergency_enter_fill <= 1:
            raise ValueError(
                "expected 0 < emergency_leave_fill < emergency_enter_fill <= 1, got "
                f"{self.emergency_leave_fill!r} and {self.emergency_enter_fill!r}"
            )


def _mix(x: np.ndarray) -> np.ndarray:
    """A 64-bit finaliser (splitmix64): spreads key bits so grouping by hash is even."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def host_hash(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """One 64-bit hash per address (given as two 64-bit halves)."""
    return _mix(_mix(hi) ^ lo)


class FlowTable(FlowExpiry):
    """The stateful table of open flows. Feed it ``add(packets)``; it returns what ended.

    For metrics and logs: ``emergency`` (emergency mode is on now), ``emergency_started`` (how
    many times it started), ``evictions`` (flows ended early, by EVICTION_REASONS), ``evicted``
    (their total), ``expiry_backlog`` (flows past a timeout left for the next expiry),
    ``key_collisions`` and ``created``.
    """

    def __init__(self, config: FlowConfig | None = None, seed: int | None = None) -> None:
        self.config = config or FlowConfig()
        self._capacity = 0
        self._cols: dict[str, np.ndarray] = {}
        self._key_hash = np.zeros(0, dtype=np.uint64)
        self._index = KeyIndex(1024)  # key hash -> slot of the open flows
        self._free = np.zeros(0, dtype=np.int32)  # a stack of free slots: _free[:_n_free]
        self._n_free = 0
        self._next_seq = 0
        self.created = 0
        self.key_collisions = 0
        self.emergency = False
        self.emergency_started = 0
        # the flows (by seq) that started while emergency mode was on, its latest episode:
        # a flood's, still to be scored in bulk after the mode ends (flood_flows)
        self._flood_seq = (0, 0)
        self.evictions: Counter[str] = Counter(dict.fromkeys(EVICTION_REASONS, 0))
        self.expiry_backlog = 0  # flows past a timeout left for the next expiry
        self._expired_at_ns: int | None = None  # the latest time expire() was given
        self.overdue_last_ns: int | None = None  # the last packet of the longest idle of them
        self.now_ns: int | None = None
        # No flow can be past its idle or active timeout before _quiet_until_ns, nor reach its
        # next interim age before _interim_at_ns (lower bounds, kept as flows start and after
        # each scan), so most batches skip the scans of every open flow. Closed TCP flows
        # (their linger is short) are tracked apart: _closed per slot, _closing their slots.
        self._quiet_until_ns = -NEVER
        self._interim_at_ns = -NEVER
        self._closed = np.zeros(0, dtype=bool)
        self._closing = np.zeros(0, dtype=np.int64)
        # A per-table random seed keeps crafted traffic from choosing hash collisions.
        self._seed = np.uint64(int.from_bytes(os.urandom(8), "little") if seed is None else seed)
        self._grow(min(1024, self.config.max_flows))

    @property
    def evicted(self) -> int:
        """Flows ended early under pressure, all reasons together."""
        return sum(self.evictions.values())

    # ---- storage -----------------------------------------------------------------------
    def _grow(self, need: int) -> None:
        """Make room for ``need`` flows; doubling, but not past max_flows unless ``need`` is
        (flows that start and end inside one batch hold a slot for that batch only)."""
        if need <= self._capacity:
            return
        new_cap = max(need, min(2 * self._capacity, self.config.max_flows))
        for name, (dtype, init, per_flow) in COLUMNS.items():
            shape = (new_cap, *row_shape(per_flow))
            col = np.full(shape, init, dtype=dtype)
            if self._capacity:
                col[: self._capacity] = self._cols[name]
            self._cols[name] = col
        key_hash = np.zeros(new_cap, dtype=np.uint64)
        key_hash[: self._capacity] = self._key_hash
        self._key_hash = key_hash
        self._closed = np.r_[self._closed, np.zeros(new_cap - self._capacity, dtype=bool)]
        free = np.empty(new_cap, dtype=np.int32)
        free[: self._n_free] = self._free[: self._n_free]
        added = new_cap - self._capacity
        free[self._n_free : self._n_free + added] = np.arange(new_cap - 1, self._capacity - 1, -1)
        self._free, self._n_free = free, self._n_free + added
        self._capacity = new_cap
        self._index.reserve(new_cap)

    def nbytes(self) -> dict[str, int]:
        """Bytes held, by part: state columns, key hashes, key index, free-slot stack."""
        return {
            "columns": sum(v.nbytes for v in self._cols.values()),
            "key_hash": self._key_hash.nbytes,
            "index": self._index.nbytes(),
            "free": self._free.nbytes,
        }

    def __len__(self) -> int:
        return len(self._index)

    def _open_slots(self) -> np.ndarray:
        """Slots of the open flows, ascending (between batches, when every slot in use is)."""
        return np.flatnonzero(self._cols["seq"] >= 0)

    def _release(self, slots: np.ndarray, reason, registered: bool = True) -> FlowRecords:
        """Remove flows from the table and return them as records with their end reason.

        ``registered`` is False for flows that ended inside the batch that created them:
        their key was never entered in the lookup.
        """
        if len(slots) == 0:
            return empty_records()
        self._cols["end_reason"][slots] = reason
        # Reset the rows in slot order (memory order: a flood releases thousands of rows
        # scattered over the table). They are handed on in start order, read in that order:
        # one gather per column takes half the time of reading in slot order, then reordering.
        by_slot = np.sort(slots)
        in_start_order = by_slot[np.argsort(self._cols["seq"][by_slot], kind="stable")]
        out = FlowRecords({k: take_rows(v, in_start_order) for k, v in self._cols.items()})
        if registered:
            self._index.remove(self._key_hash[by_slot])
        for name, (_, init, _) in COLUMNS.items():
            put_rows(self._cols[name], by_slot, init)
        self._closed[by_slot] = False
        self._free[self._n_free : self._n_free + len(slots)] = slots
        self._n_free += len(slots)
        return out

    def open_flows(self) -> FlowRecords:
        """A snapshot of the flows still open."""
        slots = self._open_slots()
        return FlowRecords({k: take_rows(v, slots) for k, v in self._cols.items()})

    # ---- folding a batch ---------------------------------------------------------------
    def add(self, p: Packets) -> FlowUpdate:
        """Fold a batch of packets (in capture order) into the table."""
        if len(p) == 0:
            ended = self.expire(self.now_ns) if self.now_ns is not None else empty_records()
            return FlowUpdate(ended, empty_records(), np.zeros(0, np.int64), np.zeros(0, np.int64))
        keys = _flow_keys(p, self._seed)
        batch = self._group(p, keys)
        # Table state of each segment's key (slot -1 when the key is new).
        seg_slot = self._index.lookup(batch.key_hash[batch.seg_start])
        ended_parts = [self._evict_collisions(batch, keys, seg_slot)]
        starts, reason = split_runs(self._cols, self._timeouts_ns(), batch, seg_slot)
        runs = _runs(batch, starts, seg_slot)
        # Table flows that a split in this batch ended before their first packet here.
        cut_segs = np.flatnonzero((seg_slot >= 0) & starts[batch.seg_start])
        if len(cut_segs):
            ended_parts.append(self._release(seg_slot[cut_segs], reason[batch.seg_start[cut_segs]]))
            seg_slot[cut_segs] = -1
        run_slot, new_slots = self._allocate(p, keys, batch, runs, seg_slot, ended_parts)

        # In emergency mode a flood's flows are judged by their counts and host context:
        # payload statistics (a window of bytes per new flow) wait until it ends.
        payload = self.config.payload and not self.emergency
        fold_runs(self._cols, p, batch, runs.start, runs.of, run_slot, payload)
        self._note_touched(run_slot, batch.ts)
        # Snapshot new flows before any of them that also ended here is released.
        by_seq = new_slots[np.argsort(self._cols["seq"][new_slots])]
        started = FlowRecords({k: self._cols[k][by_seq] for k in START_COLUMNS})
        self._retire_runs(batch, runs, run_slot, reason, ended_parts)

        touched = run_slot[runs.last_of_seg]
        ans = self._cols["answered_ns"][touched]
        answered = ans != NEVER
        answered_seq = self._cols["seq"][touched][answered]
        # Flows that ended inside this batch report their answers through `ended`.
        ts_max = int(batch.ts.max())
        self.now_ns = ts_max if self.now_ns is None else max(self.now_ns, ts_max)
        ended_parts.append(self.expire(self.now_ns, max(len(batch), self._expire_limit())))
        # Room made above spared this batch's flows; if they alone overfill the table, the
        # longest idle of them go too.
        if len(self) > self.config.max_flows:
            ended_parts.append(self._make_room(len(self) - self.config.max_flows))
        ended = FlowRecords.concat(ended_parts, consume=True)
        return FlowUpdate(ended, started, answered_seq, ans[answered])

    def _group(self, p: Packets, keys: _FlowKeys) -> GroupedBatch:
        """The batch's packets grouped by key hash, each key's in capture order; two keys
        with one 64-bit (seeded) hash in the batch would share a flow: counted in
        ``key_collisions``."""
        # numpy's unstable argsort (vectorised) and a sort of (key's group, packet) numbers
        # take half the time of one stable argsort of the hashes.
        order = np.argsort(keys.hash)
        hs = keys.hash[order]
        n = len(order)
        seg_first = np.ones(n, dtype=bool)
        seg_first[1:] = hs[1:] != hs[:-1]
        seg_start = np.flatnonzero(seg_first)
        seg_of = np.cumsum(seg_first) - 1
        in_capture_order = seg_of * n + order
        in_capture_order.sort()
        order = in_capture_order - seg_of * n
        same_key = ~seg_first[1:]  # packet i + 1 has packet i's key hash
        for col in (keys.a_hi, keys.a_lo, keys.b_hi, keys.b_lo, keys.ports):
            cs = col[order]
            self.key_collisions += int(((cs[1:] != cs[:-1]) & same_key).any())
        return GroupedBatch(
            order=order,
            key_hash=hs,
            seg_first=seg_first,
            seg_start=seg_start,
            seg_of=seg_of,
            ts=p.ts_ns[order],
            swapped=~keys.a_first[order],
            flags=p.tcp_flags[order],
        )

    def _evict_collisions(
        self, batch: GroupedBatch, keys: _FlowKeys, seg_slot: np.ndarray
    ) -> FlowRecords:
        """Evict the table flows whose key hash another key of this batch has (counted in
        ``key_collisions``); their segments become new keys (slot -1)."""
        known = seg_slot >= 0
        if not known.any():
            return empty_records()
        ks = seg_slot[known]
        c = self._cols
        stored = np.stack([c["src_hi"][ks], c["src_lo"][ks], c["dst_hi"][ks], c["dst_lo"][ks]])
        t_sw = c["swapped"][ks]
        t_a_hi = np.where(t_sw, stored[2], stored[0])
        t_a_lo = np.where(t_sw, stored[3], stored[1])
        first_pkt = batch.order[batch.seg_start[known]]
        mismatch = (t_a_hi != keys.a_hi[first_pkt]) | (t_a_lo != keys.a_lo[first_pkt])
        if not mismatch.any():
            return empty_records()
        self.key_collisions += int(mismatch.sum())
        clash = np.flatnonzero(known)[mismatch]
        collided = self._release(seg_slot[clash], EVICTED)
        seg_slot[clash] = -1
        return collided

    def _allocate(
        self,
        p: Packets,
        keys: _FlowKeys,
        batch: GroupedBatch,
        runs: _Runs,
        seg_slot: np.ndarray,
        ended_parts: list[FlowRecords],
    ) -> tuple[np.ndarray, np.ndarray]:
        """A slot for each run: its table flow's, or a new one (evicting flows for room if
        the batch's new flows would overfill the table); return the slots of the runs and
        the new slots, in run order."""
        opening = len(self) + int(runs.fresh.sum())
        self._update_emergency(opening)
        if opening > self.config.max_flows:
            busy = seg_slot[seg_slot >= 0]
            ended_parts.append(self._make_room(opening - self.config.max_flows, busy))

        continues = runs.continues
        n_new = int((~continues).sum())
        self._grow(len(self) + n_new)
        self._n_free -= n_new
        new_slots = self._free[self._n_free : self._n_free + n_new].astype(np.int64)
        run_slot = np.empty(len(runs.start), dtype=np.int64)
        run_slot[continues] = seg_slot[runs.seg[continues]]
        run_slot[~continues] = new_slots
        new_runs = np.flatnonzero(~continues)
        swapped = ~keys.a_first
        self._init_flows(new_slots, batch.order[runs.start[new_runs]], p, swapped, keys.a_first)
        return run_slot, new_slots

    def _note_touched(self, run_slot: np.ndarray, ts: np.ndarray) -> None:
        """After a fold: which flows are TCP-closed now, and the earliest time one of the
        flows this batch touched or started can be due (a timeout or an interim age)."""
        closed = tcp_closed(self._cols, run_slot)
        self._closing = np.r_[self._closing, run_slot[closed & ~self._closed[run_slot]]]
        self._closed[run_slot] = closed
        # None is due before its earliest packet's time plus a timeout (packets out of time
        # order can move a flow's last time back).
        t = self._timeouts_ns()
        ts_min = int(ts.min())
        self._quiet_until_ns = min(self._quiet_until_ns, ts_min + min(t["idle"], t["active"]))
        self._interim_at_ns = min(self._interim_at_ns, ts_min + INTERIM_FIRST_S * NS)

    def _retire_runs(
        self,
        batch: GroupedBatch,
        runs: _Runs,
        run_slot: np.ndarray,
        reason: np.ndarray,
        ended_parts: list[FlowRecords],
    ) -> None:
        """End the runs followed by another run of their key (that run's split ended them)
        and enter the new open flows in the key index. A run that continued the table flow
        is registered under its key; a new one never was."""
        hs = batch.key_hash
        self._key_hash[run_slot] = hs[runs.start]
        closed_runs = np.flatnonzero(~runs.last_of_seg)
        if len(closed_runs):
            slots = run_slot[closed_runs]
            why = reason[runs.start[closed_runs + 1]]
            cont = runs.continues[closed_runs]
            ended_parts.append(self._release(slots[cont], why[cont]))
            ended_parts.append(self._release(slots[~cont], why[~cont], registered=False))
        self._index.insert(hs[runs.start[runs.fresh]], run_slot[runs.fresh])

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


@dataclass(frozen=True)
class _FlowKeys:
    """Each packet's canonical flow key: the lower (address, port) endpoint ("a") first."""

    a_first: np.ndarray  # bool: the packet was sent by endpoint a
    a_hi: np.ndarray
    a_lo: np.ndarray
    b_hi: np.ndarray
    b_lo: np.ndarray
    ports: np.ndarray  # uint64: a's port << 24 | b's port << 8 | protocol
    hash: np.ndarray  # uint64, seeded with the table's seed


def _flow_keys(p: Packets, seed: np.uint64) -> _FlowKeys:
    a_first = (p.src_hi < p.dst_hi) | (
        (p.src_hi == p.dst_hi)
        & ((p.src_lo < p.dst_lo) | ((p.src_lo == p.dst_lo) & (p.sport <= p.dport)))
    )
    a_hi = np.where(a_first, p.src_hi, p.dst_hi)
    a_lo = np.where(a_first, p.src_lo, p.dst_lo)
    b_hi = np.where(a_first, p.dst_hi, p.src_hi)
    b_lo = np.where(a_first, p.dst_lo, p.src_lo)
    a_port = np.where(a_first, p.sport, p.dport).astype(np.uint64)
    b_port = np.where(a_first, p.dport, p.sport).astype(np.uint64)
    ports = (a_port << np.uint64(24)) | (b_port << np.uint64(8)) | p.proto.astype(np.uint64)
    h = _mix(host_hash(a_hi, a_lo) ^ _mix(host_hash(b_hi, b_lo) + ports) ^ seed)
    return _FlowKeys(a_first, a_hi, a_lo, b_hi, b_lo, ports, h)


@dataclass(frozen=True)
class _Runs:
    """The runs of a grouped batch: packets between flow starts, each one flow. A run that
    begins a known key's segment without a split continues that key's table flow; the last
    run of each segment is the open flow of its key."""

    start: np.ndarray  # position of each run's first packet
    of: np.ndarray  # the run of each packet
    seg: np.ndarray  # the segment of each run
    continues: np.ndarray  # bool: continues its key's table flow
    last_of_seg: np.ndarray  # bool: the last run of its segment
    fresh: np.ndarray  # bool: the last run of its segment, and a new flow


def _runs(batch: GroupedBatch, starts: np.ndarray, seg_slot: np.ndarray) -> _Runs:
    run_start = np.flatnonzero(starts | batch.seg_first)
    run_seg = batch.seg_of[run_start]
    continues = ~starts[run_start] & (seg_slot[run_seg] >= 0)
    last_of_seg = np.r_[run_seg[1:] != run_seg[:-1], True]
    return _Runs(
        start=run_start,
        of=np.cumsum(starts | batch.seg_first) - 1,
        seg=run_seg,
        continues=continues,
        last_of_seg=last_of_seg,
        fresh=last_of_seg & ~continues,
    )
