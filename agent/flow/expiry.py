"""When open flows end before the input does: timeouts, TCP close, emergency mode, eviction
for room; and the interim records of flows still open.

Every call scans the state columns of the open flows as whole columns; none of them ends more
than a bounded number of flows (see ``FlowExpiry.expire``), so what a flood hands the next
stages at once is bounded.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import numpy as np

from quietwire.agent.flow.keyindex import KeyIndex
from quietwire.agent.flow.records import (
    ACTIVE,
    EMERGENCY_TIMEOUT,
    END_OF_INPUT,
    EVICTED,
    IDLE,
    INTERIM,
    INTERIM_FIRST_S,
    NEVER,
    NS,
    TCP_END,
    FlowRecords,
    either_direction,
    empty_records,
    take_rows,
)

if TYPE_CHECKING:
    from quietwire.agent.flow.table import FlowConfig

# Why flows ended early under pressure (FlowTable.evictions): evicted for room while emergency
# mode was off, or for room after every unanswered flow had gone; unanswered flows ended in
# emergency mode (evicted for room first, or by the emergency unanswered timeout); answered
# flows ended by the emergency idle timeout.
EVICTION_REASONS = ("table_full", "emergency_unanswered", "emergency_idle")


class FlowExpiry:
    """Ending open flows, as FlowTable does it (FlowTable derives from this class): the
    timeouts, emergency mode, eviction when the table needs room, interim snapshots.

    It works on the table's storage (table.py): the state columns ``_cols``, the slots of the
    open flows (``_open_slots``) and ``_release``, which takes flows out of the table.
    """

    config: FlowConfig
    emergency: bool
    emergency_started: int
    evictions: Counter[str]
    expiry_backlog: int
    overdue_last_ns: int | None
    now_ns: int | None
    _cols: dict[str, np.ndarray]
    _capacity: int
    _index: KeyIndex
    _next_seq: int
    _flood_seq: tuple[int, int]
    _expired_at_ns: int | None
    _quiet_until_ns: int
    _interim_at_ns: int
    _closed: np.ndarray
    _closing: np.ndarray

    def __len__(self) -> int:
        raise NotImplementedError

    def _open_slots(self) -> np.ndarray:
        raise NotImplementedError

    def _release(self, slots: np.ndarray, reason, registered: bool = True) -> FlowRecords:
        raise NotImplementedError

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
        closed = tcp_closed(c, slots)
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
            reason = np.where(tcp_closed(c, slots), TCP_END, END_OF_INPUT)
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


def _longest_idle(index: np.ndarray, last_ns: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` entries of ``index`` whose ``last_ns`` is smallest (all if fewer)."""
    if count <= 0:
        return index[:0]
    if count >= len(index):
        return index
    return index[np.argpartition(last_ns, count - 1)[:count]]


def tcp_closed(cols: dict[str, np.ndarray], slots: np.ndarray) -> np.ndarray:
    """Whether each flow's TCP connection closed: a reset, or a FIN from each side."""
    rst, fin = take_rows(cols["rst_packets"], slots), take_rows(cols["fin_packets"], slots)
    return either_direction(rst) | ((fin[:, 0] > 0) & (fin[:, 1] > 0))
