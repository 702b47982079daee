"""What incidents already counted of flows judged while still open (from their interim
records), so that a flow's later records add only what is new: its packets and bytes since,
and its risk never twice."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quietwire.agent.flow.records import FlowRecords
from quietwire.agent.flow.table import host_hash


@dataclass(frozen=True)
class Prior:
    """Per record of a batch: whether an incident counted its flow before, and what of it."""

    seen: np.ndarray  # bool
    packets: np.ndarray  # int64
    bytes: np.ndarray  # int64
    score: np.ndarray  # float32, the highest score counted (-inf if none)

    @staticmethod
    def none(n: int) -> Prior:
        """Nothing counted before, for n records."""
        return Prior(
            np.zeros(n, bool),
            np.zeros(n, np.int64),
            np.zeros(n, np.int64),
            np.full(n, -np.inf, np.float32),
        )


class Counted:
    """Flows whose interim records were evidence, by flow key (host_hash of seq and first
    packet time): the packets, bytes and highest score counted of each. A flow is forgotten
    when its final record arrives; at most ``cap`` are kept (oldest first out: the final
    record of a forgotten flow counts as a new flow). Sorted arrays, so each batch costs a
    few searches, not Python work per flow."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.key = np.zeros(0, np.uint64)
        self.packets = np.zeros(0, np.int64)
        self.bytes = np.zeros(0, np.int64)
        self.score = np.zeros(0, np.float32)
        self.stamp = np.zeros(0, np.int64)
        self._clock = 0

    def __len__(self) -> int:
        return len(self.key)

    def _find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos = np.minimum(np.searchsorted(self.key, keys), max(len(self.key) - 1, 0))
        hit = self.key[pos] == keys if len(self.key) else np.zeros(len(keys), bool)
        return pos, hit

    def lookup(self, keys: np.ndarray) -> Prior:
        n = len(keys)
        out = Prior.none(n)
        if n and len(self.key):
            pos, hit = self._find(keys)
            out.seen[hit] = True
            out.packets[hit] = self.packets[pos[hit]]
            out.bytes[hit] = self.bytes[pos[hit]]
            out.score[hit] = self.score[pos[hit]]
        return out

    def forget(self, keys: np.ndarray) -> None:
        if len(keys) and len(self.key):
            pos, hit = self._find(keys)
            keep = np.ones(len(self.key), bool)
            keep[pos[hit]] = False
            self._take(keep)

    def remember(self, keys, packets, nbytes, score) -> None:
        """Record (or update) what was counted of these flows."""
        if not len(keys):
            return
        keys, first = np.unique(keys, return_index=True)
        self.forget(keys)
        self._clock += 1
        self.key = np.concatenate([self.key, keys])
        self.packets = np.concatenate([self.packets, packets[first]])
        self.bytes = np.concatenate([self.bytes, nbytes[first]])
        self.score = np.concatenate([self.score, score[first].astype(np.float32)])
        self.stamp = np.concatenate([self.stamp, np.full(len(keys), self._clock)])
        if len(self.key) > self.cap:  # the oldest go
            keep = np.ones(len(self.key), bool)
            keep[np.argsort(self.stamp, kind="stable")[: len(self.key) - self.cap]] = False
            self._take(keep)
        self._take(np.argsort(self.key, kind="stable"))

    def _take(self, index: np.ndarray) -> None:
        for name in ("key", "packets", "bytes", "score", "stamp"):
            setattr(self, name, getattr(self, name)[index])


def flow_keys(flows: FlowRecords, rows: np.ndarray) -> np.ndarray:
    return host_hash(
        flows["seq"][rows].astype(np.uint64), flows["first_ns"][rows].astype(np.uint64)
    )
