"""Host context: what the hosts of a flow did in the window before it ended.

A scan, sweep or flood is many tiny flows that each look harmless; what gives them away is
the host's recent behaviour. For each ended flow, over the flows that *started* in the
``window_s`` seconds up to the flow's last packet:

- from its client: how many flows, to how many distinct hosts and ports, and what share were
  never answered by that time (TCP: no SYN-ACK; others: no reply packet);
- to its server: how many flows, from how many distinct hosts.

Only flow starts and first answers are logged, and both are known once the packets up to a
time are processed, so the values do not depend on how packets were batched. The log keeps the
starts that a future query can still need (idle timeout + window) and at most ``max_records``.

Each count is the number of log records whose "counts at time t" interval covers t:
a record starting at s counts for flows on [s, s+W); it is the latest start of its
(host, peer) pair on [s, min(next start of the pair, s+W)); it is answered on [a, s+W).

Series: a beacon is an ordinary small session repeated at a steady period, so what gives it
away spans flows and hours, far beyond the window. For each flow, at its start, over the
earlier flows of its service pair (client, server, protocol, server port) with no gap longer
than ``series_gap_s`` between consecutive starts: how many there were, the mean gap between
starts, and the gaps' coefficient of variation (near 0 for a timer, near 1 for a person).
These are running sums per pair, updated in start order, so they too do not depend on
batching; the pair table keeps pairs seen within ``series_gap_s`` and at most ``max_series``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quietwire.agent.flow.records import INTERIM, NEVER, FlowRecords, FlowUpdate
from quietwire.agent.flow.table import host_hash

WINDOW_FEATURES = (
    "src_host_flows",
    "src_host_distinct_dst_hosts",
    "src_host_distinct_dst_ports",
    "src_host_unanswered_share",
    "dst_host_flows",
    "dst_host_distinct_src_hosts",
)
SERIES_FEATURES = ("pair_prior_flows", "pair_gap_mean_s", "pair_gap_cv")
CONTEXT_FEATURES = WINDOW_FEATURES + SERIES_FEATURES
_US = 1000  # log times in microseconds
_TIME_BITS = 40  # about 12.7 days of microseconds after the log's base time


@dataclass(frozen=True)
class ContextConfig:
    """Host window and series settings. Memory: 64 bytes per logged start, 32 for its place
    in client and in server order and up to 48 more for the latest start of its pairs (at
    most ``max_records``: 144 MB), 40 per service pair (at most ``max_series``: 40 MB) and 20
    per open flow (its series values until it ends): under a flood of new sources both caps
    fill, so the context holds about 185 MB whatever the table size, plus a copy while a
    batch is appended."""

    window_s: float = 60.0
    max_records: int = 1_000_000
    series_gap_s: float = 3600.0
    max_series: int = 1_000_000


class HostContext:
    """The log of recent flow starts and the window queries over it."""

    def __init__(self, config: ContextConfig | None = None, retain_s: float = 120.0) -> None:
        self.config = config or ContextConfig()
        self._retain_us = int((retain_s + self.config.window_s) * 1e6)
        self._cols = {
            "seq": np.zeros(0, np.int64),
            "src": np.zeros(0, np.uint64),
            "dst": np.zeros(0, np.uint64),
            "port": np.zeros(0, np.uint64),
            "start": np.zeros(0, np.int64),
            "answered": np.zeros(0, np.int64),
            # the start of the next logged start of the same (client, server) and of the same
            # (client, server port): linked as starts are logged, so a query need not sort
            "next_pair": np.zeros(0, np.int64),
            "next_port": np.zeros(0, np.int64),
        }
        self._last_pair = _LastStart()
        self._last_port = _LastStart()
        self._by_src = _HostOrder()
        self._by_dst = _HostOrder()
        # the latest logged start linked to an earlier start (the capture's clock stepped
        # back): while it is logged, its link may skip a later start; queries sort instead
        self._misordered_seq = -1
        self._series = _Series(self.config)

    def __len__(self) -> int:
        return len(self._cols["seq"])

    def sizes(self) -> dict[str, int]:
        """What the context holds: logged starts, service pairs, open flows' series values."""
        return {"starts": len(self), "pairs": len(self._series), "open": self._series.open}

    def observe(self, update: FlowUpdate) -> None:
        """Log a batch's new flows and first answers."""
        started = update.started
        self._series.observe(started)
        if len(started):
            new = {
                "seq": started["seq"],
                "src": host_hash(started["src_hi"], started["src_lo"]),
                "dst": host_hash(started["dst_hi"], started["dst_lo"]),
                "port": started["dst_port"].astype(np.uint64)
                | (started["proto"].astype(np.uint64) << np.uint64(16)),
                "start": started["first_ns"] // _US,
                "answered": _to_us(started["answered_ns"]),
                "next_pair": np.full(len(started), NEVER // 2, np.int64),
                "next_port": np.full(len(started), NEVER // 2, np.int64),
            }
            self._by_src.log(new["src"], len(self))
            self._by_dst.log(new["dst"], len(self))
            self._cols = {k: np.concatenate([v, new[k]]) for k, v in self._cols.items()}
            for last, column, other in (
                (self._last_pair, "next_pair", new["dst"]),
                (self._last_port, "next_port", new["port"]),
            ):
                seq, start, then = last.link(host_hash(new["src"], other), new["seq"], new["start"])
                self._set(column, seq, then)
                if (then < start).any():
                    self._misordered_seq = max(self._misordered_seq, int(seq[then < start].max()))
        for seq, when in (
            (update.answered_seq, update.answered_ns),
            (update.ended["seq"], update.ended["answered_ns"]),
        ):
            rows, found = self._rows_of(seq)
            ans = self._cols["answered"]
            ans[rows] = np.minimum(ans[rows], _to_us(when[found]))

    def _links_hold(self) -> bool:
        """Whether each logged start's linked next start of its pair is the next in start
        order: when the log is in start order (starts are logged as flows start, but a
        capture's clock can step back) and no start still logged was linked to an earlier
        one (whose pruning may have hidden a later start). Else queries sort for them."""
        c = self._cols
        return self._misordered_seq < c["seq"][0] and bool(
            (c["start"][1:] >= c["start"][:-1]).all()
        )

    def _set(self, column: str, seq: np.ndarray, value: np.ndarray) -> None:
        """Set ``column`` of the logged starts ``seq`` (those still logged) to ``value``."""
        rows, found = self._rows_of(seq)
        self._cols[column][rows] = value[found]

    def _rows_of(self, seq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, found): the log rows of the starts ``seq`` still logged, and which of ``seq``
        they are. The log is in seq order and, as starts leave it oldest first, usually holds
        every seq from its first to its last: then a start's row is its seq less the first's,
        no search."""
        logged = self._cols["seq"]
        if len(logged) == 0:
            return np.zeros(0, np.intp), np.zeros(len(seq), bool)
        if int(logged[-1]) - int(logged[0]) == len(logged) - 1:
            pos = seq - logged[0]
            found = (pos >= 0) & (pos < len(logged))
        else:
            pos = np.minimum(np.searchsorted(logged, seq), len(logged) - 1)
            found = logged[pos] == seq
        return pos[found], found

    def prune(self, now_ns: int) -> None:
        """Forget starts no future query can reach, and keep at most max_records."""
        cutoff = now_ns // _US - self._retain_us
        keep = self._cols["start"] > cutoff
        keep[: max(len(keep) - self.config.max_records, 0)] = False  # oldest-logged first
        if not keep.all():
            self._cols = {k: v[keep] for k, v in self._cols.items()}
            self._by_src.keep(keep)
            self._by_dst.keep(keep)
        first_seq = int(self._cols["seq"][0]) if len(self) else None
        self._last_pair.prune(cutoff, first_seq)
        self._last_port.prune(cutoff, first_seq)
        self._series.prune(now_ns)

    def features(self, flows: FlowRecords) -> np.ndarray:
        """(len(flows), len(CONTEXT_FEATURES)) float32 context values at each flow's last
        packet (interim records included: their flows keep their series values)."""
        out = np.zeros((len(flows), len(CONTEXT_FEATURES)), dtype=np.float32)
        out[:, len(WINDOW_FEATURES) :] = self._series.take(
            flows["seq"], forget=flows["end_reason"] != INTERIM
        )
        if len(flows) == 0 or len(self) == 0:
            return out
        t = flows["last_ns"] // _US
        # Times are packed into _TIME_BITS bits after the earliest window start: flows further
        # apart (a capture with a clock jump, flows merged from capture workers) go in parts.
        part = np.int64(1 << (_TIME_BITS - 1))
        if int(t.max()) - int(t.min()) >= part:
            group = (t - t.min()) // part
            for g in np.unique(group):
                rows = np.flatnonzero(group == g)
                out[rows, : len(WINDOW_FEATURES)] = self._windows(flows.take(rows), t[rows])
        else:
            out[:, : len(WINDOW_FEATURES)] = self._windows(flows, t)
        return out

    def _windows(self, flows: FlowRecords, t: np.ndarray) -> np.ndarray:
        """The window features of flows whose last packets (``t``, us) are < 2**39 us apart."""
        out = np.zeros((len(flows), len(WINDOW_FEATURES)), dtype=np.float32)
        w = int(self.config.window_s * 1e6)
        # Only starts inside some query's window can count; later starts do not change the
        # "next start of the pair" of earlier ones as far as any query can see.
        lo, hi = int(t.min()) - w, int(t.max())
        c = self._cols
        in_time = (c["start"] > lo) & (c["start"] <= hi)
        q_src = host_hash(flows["src_hi"], flows["src_lo"])
        q_dst = host_hash(flows["dst_hi"], flows["dst_lo"])

        # Per client host: only its own records matter (all of a (client, peer) pair's
        # records share the client, so "next start of the pair" is exact within the subset).
        linked = self._links_hold()

        def next_start(rows: np.ndarray, column: str, peer: np.ndarray) -> np.ndarray:
            if linked:
                return c[column][rows]
            return _next_start(host_hash(c["src"][rows], peer), c["start"][rows])

        rows, group, q_group = self._by_src.groups(in_time, q_src)
        start = c["start"][rows]
        window_end = start + w
        pair_end = np.minimum(next_start(rows, "next_pair", c["dst"][rows]), window_end)
        port_end = np.minimum(next_start(rows, "next_port", c["port"][rows]), window_end)
        answered_from = np.minimum(np.maximum(start, c["answered"][rows]), window_end)
        by_src = _Windows(group, start, w, q_group, t, lo)
        src_flows = by_src.window()
        out[:, 0] = src_flows
        out[:, 1] = by_src.until(pair_end)
        out[:, 2] = by_src.until(port_end)
        answered = by_src.since(answered_from)
        out[:, 3] = np.where(src_flows > 0, 1.0 - answered / np.maximum(src_flows, 1), 0.0)

        # Per server host, likewise.
        rows, group, q_group = self._by_dst.groups(in_time, q_dst)
        start = c["start"][rows]
        pair_end = np.minimum(next_start(rows, "next_pair", c["dst"][rows]), start + w)
        by_dst = _Windows(group, start, w, q_group, t, lo)
        out[:, 4] = by_dst.window()
        out[:, 5] = by_dst.until(pair_end)
        return out


class _Series:
    """Per service pair: the running gap statistics of its current series of flow starts;
    per open flow: its pair's statistics as of its start, until the flow ends."""

    def __init__(self, config: ContextConfig) -> None:
        self.config = config
        self._gap_us = int(config.series_gap_s * 1e6)
        # pairs, sorted by key: last start (us); gaps, sum and sum of squares of gaps (ms),
        # in integers so that the running sums are exact whatever the batches
        self._key = np.zeros(0, np.uint64)
        self._last = np.zeros(0, np.int64)
        self._sums = np.zeros((0, 3), np.int64)
        # open flows, sorted by seq: their series features
        self._seq = np.zeros(0, np.int64)
        self._values = np.zeros((0, len(SERIES_FEATURES)), np.float32)

    def observe(self, started: FlowRecords) -> None:
        if len(started) == 0:
            return
        key = host_hash(
            host_hash(started["src_hi"], started["src_lo"]),
            host_hash(started["dst_hi"], started["dst_lo"])
            ^ (started["dst_port"].astype(np.uint64) | started["proto"].astype(np.uint64) << 16),
        )
        t = started["first_ns"] // _US
        order = np.argsort(key, kind="stable")  # within a pair: start (seq) order
        k, ts = key[order], t[order]
        first = np.r_[True, k[1:] != k[:-1]]
        # the previous start of each pair: in this batch, or the table's for a pair's first
        prev = np.r_[0, ts[:-1]]
        pos = np.searchsorted(self._key, k)
        known = first & (pos < len(self._key))
        known[known] = self._key[pos[known]] == k[known]
        prev[known] = self._last[pos[known]]
        gap = np.maximum(ts - prev, 0)
        # a series goes on from the previous start of the pair unless the gap is too long
        goes_on = (~first | known) & (gap <= self._gap_us)
        g = np.where(goes_on, gap // 1000, 0)
        step = np.stack([goes_on.astype(np.int64), g, g * g], axis=1)
        # running sums within each run of starts that goes on from its predecessor; a run
        # that goes on from the table carries the table's sums
        begins = np.flatnonzero(~goes_on | first)
        run = np.cumsum(~goes_on | first) - 1
        total = np.cumsum(step, axis=0)
        offset = -(total - step)[begins]
        carried = known[begins] & goes_on[begins]
        offset[carried] += self._sums[pos[begins[carried]]]
        sums = total + offset[run]
        n, s1, s2 = sums[:, 0], sums[:, 1] / 1e3, sums[:, 2] / 1e6  # seconds
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = np.where(n > 0, s1 / np.maximum(n, 1), np.nan)
            sd = np.sqrt(np.maximum(s2 / np.maximum(n, 1) - mean * mean, 0.0))
            cv = np.where(n > 1, np.where(mean > 0, sd / mean, 0.0), np.nan)
        values = np.empty((len(started), len(SERIES_FEATURES)), np.float32)
        values[order] = np.stack([n, mean, cv], axis=1)
        # open flows: started is in seq order, after every flow already pending
        self._seq = np.concatenate([self._seq, started["seq"]])
        self._values = np.concatenate([self._values, values])
        # pairs: each pair's last start in this batch replaces or joins the table
        last = np.r_[k[1:] != k[:-1], True]
        upd_key, upd_last, upd_sums = k[last], ts[last], sums[last]  # sorted by key
        at = np.searchsorted(self._key, upd_key)
        there = at < len(self._key)
        there[there] = self._key[at[there]] == upd_key[there]
        self._last[at[there]] = upd_last[there]
        self._sums[at[there]] = upd_sums[there]
        new, where = ~there, at[~there]
        self._key = np.insert(self._key, where, upd_key[new])
        self._last = np.insert(self._last, where, upd_last[new])
        self._sums = np.insert(self._sums, where, upd_sums[new], axis=0)

    def __len__(self) -> int:
        return len(self._key)

    @property
    def open(self) -> int:
        return len(self._seq)

    def take(self, seq: np.ndarray, forget: np.ndarray) -> np.ndarray:
        """The series features of flows (by seq); those of ended flows (``forget``) are
        forgotten afterwards."""
        out = np.zeros((len(seq), len(SERIES_FEATURES)), np.float32)
        out[:, 1:] = np.nan
        if len(seq) == 0 or len(self._seq) == 0:
            return out
        pos = np.minimum(np.searchsorted(self._seq, seq), len(self._seq) - 1)
        hit = self._seq[pos] == seq
        out[hit] = self._values[pos[hit]]
        gone = pos[hit & forget]
        if len(gone):  # (interim records forget nothing: no copy of every open flow's values)
            keep = np.ones(len(self._seq), bool)
            keep[gone] = False
            self._seq, self._values = self._seq[keep], self._values[keep]
        return out

    def prune(self, now_ns: int) -> None:
        """Forget pairs whose series has ended (no start within series_gap_s), and keep at
        most max_series pairs (the longest-quiet go first)."""
        keep = self._last >= now_ns // _US - self._gap_us
        excess = int(keep.sum()) - self.config.max_series
        if excess > 0:
            quiet = np.flatnonzero(keep)[np.argsort(self._last[keep], kind="stable")[:excess]]
            keep[quiet] = False
        if not keep.all():
            self._key, self._last, self._sums = self._key[keep], self._last[keep], self._sums[keep]


def _to_us(ns: np.ndarray) -> np.ndarray:
    return np.where(ns == NEVER, NEVER // 2, ns // _US)


def _next_start(key: np.ndarray, start: np.ndarray) -> np.ndarray:
    """For each record, the start of the next record with the same key (NEVER if none)."""
    order = np.lexsort((start, key))
    k, s = key[order], start[order]
    nxt = np.full(len(order), NEVER // 2, dtype=np.int64)
    same = k[1:] == k[:-1]
    nxt[:-1] = np.where(same, s[1:], NEVER // 2)
    out = np.empty_like(nxt)
    out[order] = nxt
    return out


class _LastStart:
    """Per key (a hash of client and peer), the latest logged start: where a newly logged
    start of the key is linked from. Sorted by key; at most one entry per logged start."""

    def __init__(self) -> None:
        self._key = np.zeros(0, np.uint64)
        self._seq = np.zeros(0, np.int64)
        self._start = np.zeros(0, np.int64)

    def link(self, key: np.ndarray, seq: np.ndarray, start: np.ndarray) -> tuple:
        """Log starts (in seq order); (seq, start, next start): each earlier start of one of
        their keys, this batch's or the table's, and the start logged next with its key."""
        order = np.argsort(key, kind="stable")  # within a key: seq order
        k, q, s = key[order], seq[order], start[order]
        same = k[1:] == k[:-1]
        first = np.r_[True, ~same]
        last = np.r_[~same, True]
        at = np.searchsorted(self._key, k[first])
        there = at < len(self._key)
        there[there] = self._key[at[there]] == k[first][there]
        linked_seq = np.concatenate([q[:-1][same], self._seq[at[there]]])
        linked_start = np.concatenate([s[:-1][same], self._start[at[there]]])
        linked_to = np.concatenate([s[1:][same], s[first][there]])
        # each key's latest start replaces the table's or joins it
        at = np.searchsorted(self._key, k[last])
        there = at < len(self._key)
        there[there] = self._key[at[there]] == k[last][there]
        self._seq[at[there]] = q[last][there]
        self._start[at[there]] = s[last][there]
        new = ~there
        self._key = np.insert(self._key, at[new], k[last][new])
        self._seq = np.insert(self._seq, at[new], q[last][new])
        self._start = np.insert(self._start, at[new], s[last][new])
        return linked_seq, linked_start, linked_to

    def prune(self, cutoff_us: int, first_seq: int | None) -> None:
        """Forget keys whose latest start the log no longer holds (pruned by time or, being
        logged before ``first_seq``, by count)."""
        keep = self._start > cutoff_us
        if first_seq is not None:
            keep &= self._seq >= first_seq
        else:
            keep[:] = False
        if not keep.all():
            self._key, self._seq, self._start = self._key[keep], self._seq[keep], self._start[keep]


class _HostOrder:
    """The logged starts in order of one host (client or server): kept as starts are logged
    and pruned (a binary search and a copy), so that a query finds its hosts' starts by
    binary searches instead of sorting the log's hosts for every batch of flows. A host's
    starts are in no particular order (the window counts sort them by time)."""

    def __init__(self) -> None:
        self._hosts = np.zeros(0, np.uint64)  # sorted
        self._rows = np.zeros(0, np.intp)  # the log row of each

    def log(self, hosts: np.ndarray, first_row: int) -> None:
        """Add the log rows ``first_row``, ``first_row + 1``, ... of ``hosts``."""
        order = np.argsort(hosts)
        at = np.searchsorted(self._hosts, hosts[order])
        self._hosts = np.insert(self._hosts, at, hosts[order])
        self._rows = np.insert(self._rows, at, first_row + order)

    def keep(self, keep: np.ndarray) -> None:
        """Forget the log rows not in ``keep`` (a mask), and renumber the others."""
        kept = keep[self._rows]
        self._hosts = self._hosts[kept]
        self._rows = (np.cumsum(keep) - 1)[self._rows[kept]]

    def groups(self, candidates: np.ndarray, queried: np.ndarray) -> tuple:
        """(rows, group, q_group): the log rows among ``candidates`` (a mask) whose host is
        queried, and a dense id per host, the same for rows and queries: a flood's victim has
        a million logged starts and one id, never a sort of the million."""
        distinct, q_group = np.unique(queried, return_inverse=True)
        lo = np.searchsorted(self._hosts, distinct)
        count = np.searchsorted(self._hosts, distinct, side="right") - lo
        group = np.repeat(np.arange(len(distinct)), count)
        # each host's run of positions: lo, lo + 1, ... (count of them)
        pos = np.arange(len(group)) + np.repeat(lo - (np.cumsum(count) - count), count)
        rows = self._rows[pos]
        hit = candidates[rows]
        return rows[hit], group[hit], q_group


class _Windows:
    """Counts, per query (host, time t), the intervals of the same host containing t, where
    every record's intervals lie inside its window [s, s + window).

    Host and time are packed into one sortable int64 (the dense host id of
    ``_HostOrder.groups``, then microseconds since ``base``); a count is the number of the
    host's interval starts at or before t minus the number of its ends at or before t: a sort
    and a binary search for each side that is neither the records' starts nor their window
    ends (those two sort in one order: one sort). The queries are searched in key order (the
    searches then walk the keys in order: three times as fast for 11,000 queries among
    190,000 keys) and the counts put back in query order.
    """

    def __init__(
        self,
        group: np.ndarray,
        start: np.ndarray,
        window: int,
        q_group: np.ndarray,
        q_t: np.ndarray,
        base: int,
    ) -> None:
        self._g = group.astype(np.int64) << _TIME_BITS
        self._base = base
        self._start = start
        q = self._key(q_group.astype(np.int64) << _TIME_BITS, q_t)
        self._q_order = np.argsort(q)
        self._q = q[self._q_order]
        starts = np.sort(self._key(self._g, start))
        self._starts = np.searchsorted(starts, self._q, side="right")
        if len(start) and int(start.max()) + window - base < 1 << _TIME_BITS:
            window_ends = starts + window  # s + window keeps the order of s (no clip here)
        else:
            window_ends = np.sort(self._key(self._g, start + window))
        self._window_ends = np.searchsorted(window_ends, self._q, side="right")

    def _key(self, g: np.ndarray, time: np.ndarray) -> np.ndarray:
        return g | np.clip(time - self._base, 0, (1 << _TIME_BITS) - 1)

    def _at_or_before(self, time: np.ndarray) -> np.ndarray:
        return np.searchsorted(np.sort(self._key(self._g, time)), self._q, side="right")

    def _as_queried(self, counts: np.ndarray) -> np.ndarray:
        out = np.empty_like(counts)
        out[self._q_order] = counts
        return out

    def window(self) -> np.ndarray:
        """Counts of the windows [s, s + window)."""
        return self._as_queried(self._starts - self._window_ends)

    def until(self, end: np.ndarray) -> np.ndarray:
        """Counts of [s, end) (end clipped to at least s: an empty interval counts nowhere)."""
        return self._as_queried(self._starts - self._at_or_before(np.maximum(end, self._start)))

    def since(self, begin: np.ndarray) -> np.ndarray:
        """Counts of [begin, s + window), for s <= begin <= s + window."""
        return self._as_queried(self._at_or_before(begin) - self._window_ends)
