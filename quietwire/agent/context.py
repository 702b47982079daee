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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .flowrecords import NEVER, FlowRecords, FlowUpdate
from .flows import host_hash

CONTEXT_FEATURES = (
    "src_host_flows",
    "src_host_distinct_dst_hosts",
    "src_host_distinct_dst_ports",
    "src_host_unanswered_share",
    "dst_host_flows",
    "dst_host_distinct_src_hosts",
)
_US = 1000  # log times in microseconds
_TIME_BITS = 40  # about 12.7 days of microseconds after the log's base time


@dataclass(frozen=True)
class ContextConfig:
    window_s: float = 60.0
    max_records: int = 1_000_000


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
        }

    def __len__(self) -> int:
        return len(self._cols["seq"])

    def observe(self, update: FlowUpdate) -> None:
        """Log a batch's new flows and first answers."""
        started = update.started
        if len(started):
            new = {
                "seq": started["seq"],
                "src": host_hash(started["src_hi"], started["src_lo"]),
                "dst": host_hash(started["dst_hi"], started["dst_lo"]),
                "port": started["dst_port"].astype(np.uint64)
                | (started["proto"].astype(np.uint64) << np.uint64(16)),
                "start": started["first_ns"] // _US,
                "answered": _to_us(started["answered_ns"]),
            }
            self._cols = {k: np.concatenate([v, new[k]]) for k, v in self._cols.items()}
        for seq, when in (
            (update.answered_seq, update.answered_ns),
            (update.ended["seq"], update.ended["answered_ns"]),
        ):
            if len(seq):
                pos = np.searchsorted(self._cols["seq"], seq)  # seq is increasing in the log
                pos = np.minimum(pos, len(self) - 1)
                hit = self._cols["seq"][pos] == seq
                ans = self._cols["answered"]
                ans[pos[hit]] = np.minimum(ans[pos[hit]], _to_us(when[hit]))

    def prune(self, now_ns: int) -> None:
        """Forget starts no future query can reach, and keep at most max_records."""
        keep = self._cols["start"] > now_ns // _US - self._retain_us
        keep[: max(len(keep) - self.config.max_records, 0)] = False  # oldest-logged first
        if not keep.all():
            self._cols = {k: v[keep] for k, v in self._cols.items()}

    def features(self, flows: FlowRecords) -> np.ndarray:
        """(len(flows), len(CONTEXT_FEATURES)) float32 context values at each flow's end."""
        out = np.zeros((len(flows), len(CONTEXT_FEATURES)), dtype=np.float32)
        if len(flows) == 0 or len(self) == 0:
            return out
        w = int(self.config.window_s * 1e6)
        t = flows["last_ns"] // _US
        # Only starts inside some query's window can count; later starts do not change the
        # "next start of the pair" of earlier ones as far as any query can see.
        lo, hi = int(t.min()) - w, int(t.max())
        c = self._cols
        in_time = (c["start"] > lo) & (c["start"] <= hi)
        q_src = host_hash(flows["src_hi"], flows["src_lo"])
        q_dst = host_hash(flows["dst_hi"], flows["dst_lo"])

        # Per client host: only its own records matter (all of a (client, peer) pair's
        # records share the client, so "next start of the pair" is exact within the subset).
        keep = in_time & np.isin(c["src"], q_src)
        src, start = c["src"][keep], c["start"][keep]
        window_end = start + w
        pair_end = np.minimum(_next_start(host_hash(src, c["dst"][keep]), start), window_end)
        port_end = np.minimum(_next_start(host_hash(src, c["port"][keep]), start), window_end)
        answered_from = np.minimum(np.maximum(start, c["answered"][keep]), window_end)
        by_src = _Windows(src, q_src, t, lo)
        src_flows = by_src.count(start, window_end)
        out[:, 0] = src_flows
        out[:, 1] = by_src.count(start, pair_end)
        out[:, 2] = by_src.count(start, port_end)
        answered = by_src.count(answered_from, window_end)
        out[:, 3] = np.where(src_flows > 0, 1.0 - answered / np.maximum(src_flows, 1), 0.0)

        # Per server host, likewise.
        keep = in_time & np.isin(c["dst"], q_dst)
        dst, start = c["dst"][keep], c["start"][keep]
        window_end = start + w
        pair_end = np.minimum(_next_start(host_hash(c["src"][keep], dst), start), window_end)
        by_dst = _Windows(dst, q_dst, t, lo)
        out[:, 4] = by_dst.count(start, window_end)
        out[:, 5] = by_dst.count(start, pair_end)
        return out


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


class _Windows:
    """Counts, per query (host, time t), the intervals [s, e) of the same host containing t.

    Host and time are packed into one sortable int64 (dense host id, then microseconds since
    ``base``), so each count is two sorts and two binary searches.
    """

    def __init__(self, host: np.ndarray, q_host: np.ndarray, q_t: np.ndarray, base: int) -> None:
        _, inverse = np.unique(np.concatenate([host, q_host]), return_inverse=True)
        self._g = inverse[: len(host)].astype(np.int64) << _TIME_BITS
        self._base = base
        self._q = self._key(inverse[len(host) :].astype(np.int64) << _TIME_BITS, q_t)

    def _key(self, g: np.ndarray, time: np.ndarray) -> np.ndarray:
        return g | np.clip(time - self._base, 0, (1 << _TIME_BITS) - 1)

    def count(self, s: np.ndarray, e: np.ndarray) -> np.ndarray:
        e = np.maximum(e, s)  # an empty interval counts nowhere
        starts = np.sort(self._key(self._g, s))
        ends = np.sort(self._key(self._g, e))
        return np.searchsorted(starts, self._q, side="right") - np.searchsorted(
            ends, self._q, side="right"
        )
