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
``FlowTable.evictions``.

A flow still open is also reported before it ends (``interim``): ``FlowTable.snapshot`` hands
on a copy of each flow that reached an age of the interim schedule (flowrecords.INTERIM_FIRST_S,
then doubling) with packets since its previous snapshot, with end reason ``interim``.

Per-flow state is counts, sums, sums of squares, minima, maxima and first/last times per
direction, so a batch is folded in with column operations: packets are grouped by flow key,
split where one of the rules above ends a flow, reduced per flow, and merged into the table
(flowfold.py). Keys are found through a numpy hash index (keyindex.py), so the cost of a packet
or a new flow does not grow with the flows open; expiry is one column scan per batch.

Memory per open flow: 473 bytes of state columns (flowrecords.COLUMNS), 8 for its key hash,
24 for the key index and 4 for the free-slot stack: 509 (bench/bench_table.py measures it; it
was 1,254 with 512-byte rows in a table that doubled past max_flows, a Python dict index and a
Python free list). Ended flows leave in start order, and no call ends more than a bounded
number (see ``FlowTable.expire``), so what a flood hands the next stages at once is bounded.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass

import numpy as np

from quietwire.agent.capture.decode import Packets
from quietwire.agent.flow.fold import fold_runs, split_runs
from quietwire.agent.flow.keyindex import KeyIndex
from quietwire.agent.flow.records import (
    ACTIVE,
    COLUMNS,
    EMERGENCY_TIMEOUT,
    END_OF_INPUT,
    EVICTED,
    IDLE,
    INTERIM,
    INTERIM_FIRST_S,
    NEVER,
    NS,
    START_COLUMNS,
    TCP_END,
    FlowRecords,
    FlowUpdate,
    either_direction,
    empty_records,
    put_rows,
    row_shape,
    take_rows,
)

# Why flows ended early under pressure (FlowTable.evictions): evicted for room while emergency
# mode was off, or for room after every unanswered flow had gone; unanswered flows ended in
# emergency mode (evicted for room first, or by the emergency unanswered timeout); answered
# flows ended by the emergency idle timeout.
EVICTION_REASONS = ("table_full", "emergency_unanswered", "emergency_idle")


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


class FlowTable:
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

    def snapshot(self, now_ns: int, limit: int | None = None) -> FlowRecords:
        """Interim records: copies of the open flows that reached their next interim age by
        ``now_ns`` (INTERIM_FIRST_S, then each doubling, while under the active timeout) and
        had packets since their previous one (an idle flow has nothing new to judge), with end
        reason ``interim``; the flows stay open. At most ``limit`` (default as in expire), the
        oldest first; the rest come with the next call. Ages passed without a record (a flow
        quiet through one) are skipped, so a flow gets at most one record per doubling."""
        cfg = self.config
        if not cfg.interim or not len(self) or now_ns < self._interim_at_ns:
            return empty_records()
        c = self._cols
        slots = self._open_slots()
        first = c["first_ns"][slots]
        scanned = slots, first
        k = c["interims"][slots].astype(np.int64)
        step = INTERIM_FIRST_S * NS
        age = now_ns - first
        due = (age >= step << np.minimum(k, 27)) & (age < int(cfg.active_timeout_s * NS))
        if due.any():  # a flow past a timeout ends in the next expiry: no interim record
            due[due] = ~self._due(now_ns, slots[due], count=False)[0]
        slots, first, k, age = slots[due], first[due], k[due], age[due]
        if not len(slots):
            self._interim_at_ns = self._next_interim_ns(*scanned)
            return empty_records()
        limit = self._expire_limit() if limit is None else limit
        if len(slots) > limit:
            oldest = np.argpartition(first, limit - 1)[:limit]
            slots, first, k, age = slots[oldest], first[oldest], k[oldest], age[oldest]
        previous = np.where(k > 0, first + (step << np.maximum(k - 1, 0)), first - 1)
        news = c["last_ns"][slots] > previous  # packets since the previous interim age
        # Ages passed so far: the j >= 0 with step * 2**j <= age, i.e. the bit length of
        # age // step (frexp's exponent, exact for integers below 2**53).
        passed = np.frexp((age // step).astype(np.float64))[1]
        c["interims"][slots] = np.minimum(passed, 255)
        self._interim_at_ns = self._next_interim_ns(*scanned)
        # Hand the rows on in start order, read in that order (see _release).
        slots = np.sort(slots[news])
        in_start_order = slots[np.argsort(c["seq"][slots], kind="stable")]
        out = FlowRecords({name: take_rows(col, in_start_order) for name, col in c.items()})
        out.columns["end_reason"][:] = INTERIM
        return out

    def _next_interim_ns(self, slots: np.ndarray, first: np.ndarray) -> int:
        """The earliest time one of these flows reaches its next interim age (NEVER if none
        will under the active timeout)."""
        k = self._cols["interims"][slots].astype(np.int64)
        next_age = (INTERIM_FIRST_S * NS) << np.minimum(k, 27)
        pending = next_age < int(self.config.active_timeout_s * NS)
        return int((first[pending] + next_age[pending]).min()) if pending.any() else NEVER

    def flood_flows(self, seq: np.ndarray) -> np.ndarray:
        """Which of these flows (by seq) started while emergency mode was on (its latest
        episode): all of them while it is on."""
        if self.emergency:
            return np.ones(len(seq), dtype=bool)
        lo, hi = self._flood_seq
        return (seq >= lo) & (seq < hi)

    # ---- expiry and room ---------------------------------------------------------------
    def _update_emergency(self, open_flows: int) -> None:
        """Start emergency mode at the enter fill; end it below the leave fill."""
        cfg = self.config
        if not cfg.emergency:
            return
        if not self.emergency and open_flows >= cfg.emergency_enter_fill * cfg.max_flows:
            self.emergency = True
            self.emergency_started += 1
            self._flood_seq = (self._next_seq, NEVER)
        elif self.emergency and open_flows < cfg.emergency_leave_fill * cfg.max_flows:
            self.emergency = False
            self._flood_seq = (self._flood_seq[0], self._next_seq)

    def _expire_limit(self) -> int:
        """Flows one expiry may end: a sixteenth of the table (not under 4,096)."""
        return max(self.config.max_flows // 16, 4096)

    def _timeouts_ns(self) -> dict[str, int]:
        cfg = self.config
        return {
            "idle": int(cfg.idle_timeout_s * NS),
            "active": int(cfg.active_timeout_s * NS),
            "linger": int(cfg.tcp_close_linger_s * NS),
            "emergency_idle": int(min(cfg.emergency_idle_timeout_s, cfg.idle_timeout_s) * NS),
            "emergency_unanswered": int(
                min(cfg.emergency_unanswered_timeout_s, cfg.idle_timeout_s) * NS
            ),
        }

    def _due(
        self, now_ns: int, slots: np.ndarray, count: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Which of these flows are past a timeout at ``now_ns``, and the end reason of each
        (TCP_END for a closed flow, due or not). With ``count``, those past only an emergency
        timeout are counted in ``evictions`` (they are about to end)."""
        c, t = self._cols, self._timeouts_ns()
        since = now_ns - c["last_ns"][slots]
        idle = since >= t["idle"]
        active = now_ns - c["first_ns"][slots] >= t["active"]
        closed = _closed(c, slots)
        reason = np.where(closed, TCP_END, np.where(idle, IDLE, ACTIVE))
        due = idle | active | (closed & (since >= t["linger"]))
        if self.emergency:
            unanswered = c["packets"][slots, 1] == 0
            limit = np.where(unanswered, t["emergency_unanswered"], t["emergency_idle"])
            cut = ~due & (since >= limit)
            reason = np.where(cut, EMERGENCY_TIMEOUT, reason)
            if count:
                self.evictions["emergency_unanswered"] += int((cut & unanswered).sum())
                self.evictions["emergency_idle"] += int((cut & ~unanswered).sum())
            due |= cut
        return due, reason

    def expire(self, now_ns: int, limit: int | None = None) -> FlowRecords:
        """End the flows that are idle, too long, or closed and past the linger time; in
        emergency mode also those past the (shorter) emergency timeouts.

        At most ``limit`` flows end per call (default: a sixteenth of max_flows, at least
        4,096; in ``add`` at least the batch's packets), the longest idle first, so that no
        call hands on a whole table at once (say when a flood's flows all time out together).
        The rest stay, counted in ``expiry_backlog``, and end in the next calls with their
        own reason; a packet for one of them still starts a new flow.
        """
        self._update_emergency(len(self))
        self._expired_at_ns = max(now_ns, self._expired_at_ns or now_ns)
        t = self._timeouts_ns()
        c = self._cols
        self._closing = np.unique(self._closing[self._closed[self._closing]])
        scanned = None
        if self.emergency or now_ns >= self._quiet_until_ns:
            soonest = t["idle"]
            if self.emergency:
                soonest = min(soonest, t["emergency_idle"], t["emergency_unanswered"])
            slots = self._open_slots()
            scanned = slots, c["last_ns"][slots], c["first_ns"][slots]
            _, last, first = scanned
            # Only flows quiet for the shortest timeout (the linger time if closed), or past
            # the active timeout, can be due.
            maybe = (now_ns - last >= soonest) | (now_ns - first >= t["active"])
            maybe |= self._closed[slots] & (now_ns - last >= t["linger"])
            slots = slots[maybe]
        else:  # no timeout has passed (see _quiet_until_ns): only closed flows can be due
            slots = self._closing[now_ns - c["last_ns"][self._closing] >= t["linger"]]
        last = c["last_ns"][slots]
        if limit is None:
            limit = self._expire_limit()
        is_due, _ = self._due(now_ns, slots, count=False)
        due = np.flatnonzero(is_due)
        ending = np.sort(_longest_idle(due, last[due], limit))
        self.expiry_backlog = len(due) - len(ending)
        self.overdue_last_ns = None
        if self.expiry_backlog:
            is_due[ending] = False
            self.overdue_last_ns = int(last[is_due].min())
        if scanned is not None:  # the bound for the flows that stay
            stay = np.ones(len(scanned[0]), dtype=bool)
            stay[np.flatnonzero(maybe)[ending]] = False
            _, all_last, all_first = scanned
            bound = np.minimum(all_last[stay] + t["idle"], all_first[stay] + t["active"])
            self._quiet_until_ns = int(bound.min()) if len(bound) else NEVER
        slots = slots[ending]
        _, reason = self._due(now_ns, slots)
        ended = self._release(slots, reason)
        self._update_emergency(len(self))
        return ended

    def flush(self, limit: int | None = None) -> FlowRecords:
        """End every open flow, or the ``limit`` longest idle (end of input, or shutdown).
        Flows already past a timeout (see expire) end with its reason, closed TCP flows with
        tcp_end, the others with end_of_input."""
        c = self._cols
        slots = self._open_slots()
        if limit is not None:
            slots = np.sort(_longest_idle(slots, c["last_ns"][slots], limit))
        known_times = [x for x in (self.now_ns, self._expired_at_ns) if x is not None]
        if not known_times:
            reason = np.where(_closed(c, slots), TCP_END, END_OF_INPUT)
        else:
            due, reason = self._due(max(known_times), slots)
            reason = np.where(due | (reason == TCP_END), reason, END_OF_INPUT)
        ended = self._release(slots, reason)
        self._update_emergency(len(self))
        return ended

    def _make_room(self, count: int, busy: np.ndarray | None = None) -> FlowRecords:
        """Evict ``count`` open flows, sparing the slots in ``busy`` (flows this batch
        continues): in emergency mode the unanswered flows first, longest idle first."""
        slots = self._open_slots()
        if busy is not None and len(busy):
            spared = np.zeros(self._capacity, dtype=bool)
            spared[busy] = True
            slots = slots[~spared[slots]]
        count = min(count, len(slots))
        if count <= 0:
            return empty_records()
        last = self._cols["last_ns"][slots]
        first_go = np.zeros(len(slots), dtype=bool)
        if self.emergency:
            first_go = self._cols["packets"][slots, 1] == 0
        un = np.flatnonzero(first_go)
        chosen = _longest_idle(un, last[un], count)
        rest = np.flatnonzero(~first_go)
        chosen = np.r_[chosen, _longest_idle(rest, last[rest], count - len(chosen))]
        n_unanswered = int(first_go[chosen].sum())
        self.evictions["emergency_unanswered"] += n_unanswered
        self.evictions["table_full"] += count - n_unanswered
        return self._release(slots[chosen], EVICTED)

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

        # Packets grouped by key hash, each key's in capture order: numpy's unstable argsort
        # (vectorised) and a sort of (key's group, packet) numbers take half the time of one
        # stable argsort of the hashes.
        order = np.argsort(h)
        hs = h[order]
        n = len(order)
        seg_first = np.ones(n, dtype=bool)
        seg_first[1:] = hs[1:] != hs[:-1]
        seg_start = np.flatnonzero(seg_first)
        seg_of = np.cumsum(seg_first) - 1
        in_capture_order = seg_of * n + order
        in_capture_order.sort()
        order = in_capture_order - seg_of * n
        # Two keys with one 64-bit (seeded) hash in a batch would share a flow: count it.
        same_key = ~seg_first[1:]  # packet i + 1 has packet i's key hash
        for col in (a_hi, a_lo, b_hi, b_lo, ports):
            cs = col[order]
            self.key_collisions += int(((cs[1:] != cs[:-1]) & same_key).any())

        ts = p.ts_ns[order]
        sw = swapped[order]
        flags = p.tcp_flags[order]

        # Table state of each segment's key (slot -1 when the key is new).
        seg_slot = self._index.lookup(hs[seg_start])
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
        starts, reason = split_runs(
            self._cols, self._timeouts_ns(), seg_first, seg_start, seg_of, seg_slot, ts, sw, flags
        )

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

        # The last run of each segment is the open flow of its key; a new one needs room.
        last_run_of_seg = np.r_[run_seg[1:] != run_seg[:-1], True]
        fresh = last_run_of_seg & ~continues
        opening = len(self) + int(fresh.sum())
        self._update_emergency(opening)
        if opening > self.config.max_flows:
            busy = seg_slot[seg_slot >= 0]
            ended_parts.append(self._make_room(opening - self.config.max_flows, busy))

        n_new = int((~continues).sum())
        self._grow(len(self) + n_new)
        self._n_free -= n_new
        new_slots = self._free[self._n_free : self._n_free + n_new].astype(np.int64)
        run_slot = np.empty(len(run_start), dtype=np.int64)
        run_slot[continues] = seg_slot[run_seg[continues]]
        run_slot[~continues] = new_slots
        new_runs = np.flatnonzero(~continues)
        self._init_flows(new_slots, order[run_start[new_runs]], p, swapped, a_first)

        # In emergency mode a flood's flows are judged by their counts and host context:
        # payload statistics (a window of bytes per new flow) wait until it ends.
        payload = self.config.payload and not self.emergency
        fold_runs(self._cols, p, order, ts, sw, flags, run_start, run_of, run_slot, payload)
        c = self._cols
        closed = _closed(c, run_slot)
        self._closing = np.r_[self._closing, run_slot[closed & ~self._closed[run_slot]]]
        self._closed[run_slot] = closed
        # Flows this batch touched or started: none is due before its earliest packet's time
        # plus a timeout (packets out of time order can move a flow's last time back).
        t = self._timeouts_ns()
        ts_min = int(ts.min())
        self._quiet_until_ns = min(self._quiet_until_ns, ts_min + min(t["idle"], t["active"]))
        self._interim_at_ns = min(self._interim_at_ns, ts_min + INTERIM_FIRST_S * NS)
        # Snapshot new flows before any of them that also ended here is released.
        by_seq = new_slots[np.argsort(self._cols["seq"][new_slots])]
        started = FlowRecords({k: self._cols[k][by_seq] for k in START_COLUMNS})

        # Runs followed by another run of the same key were ended by that run's split. A run
        # that continued the table flow is registered under its key; a new one never was.
        self._key_hash[run_slot] = hs[run_start]
        closed_runs = np.flatnonzero(~last_run_of_seg)
        if len(closed_runs):
            slots = run_slot[closed_runs]
            why = reason[run_start[closed_runs + 1]]
            cont = continues[closed_runs]
            ended_parts.append(self._release(slots[cont], why[cont]))
            ended_parts.append(self._release(slots[~cont], why[~cont], registered=False))
        self._index.insert(hs[run_start[fresh]], run_slot[fresh])

        touched = run_slot[last_run_of_seg]
        ans = self._cols["answered_ns"][touched]
        answered = ans != NEVER
        answered_seq = self._cols["seq"][touched][answered]
        # Flows that ended inside this batch report their answers through `ended`.
        self.now_ns = int(ts.max()) if self.now_ns is None else max(self.now_ns, int(ts.max()))
        ended_parts.append(self.expire(self.now_ns, max(n, self._expire_limit())))
        # Room made above spared this batch's flows; if they alone overfill the table, the
        # longest idle of them go too.
        if len(self) > self.config.max_flows:
            ended_parts.append(self._make_room(len(self) - self.config.max_flows))
        ended = FlowRecords.concat(ended_parts, consume=True)
        return FlowUpdate(ended, started, answered_seq, ans[answered])

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


def _longest_idle(index: np.ndarray, last_ns: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` entries of ``index`` whose ``last_ns`` is smallest (all if fewer)."""
    if count <= 0:
        return index[:0]
    if count >= len(index):
        return index
    return index[np.argpartition(last_ns, count - 1)[:count]]


def _closed(cols: dict[str, np.ndarray], slots: np.ndarray) -> np.ndarray:
    """Whether each flow's TCP connection closed: a reset, or a FIN from each side."""
    rst, fin = take_rows(cols["rst_packets"], slots), take_rows(cols["fin_packets"], slots)
    return either_direction(rst) | ((fin[:, 0] > 0) & (fin[:, 1] > 0))
