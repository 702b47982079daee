"""The flow table's lookup from a flow key's 64-bit hash to its row (slot), in numpy.

An open-addressing hash table with linear probing, looked up and changed a whole batch of keys
at a time: each round probes one position for every key still unresolved, so a batch costs its
keys times the mean probe length, whatever the number of keys stored. The table is at most half
full of live keys (it is sized to twice the flow table's capacity); removed keys leave
tombstones, which a rebuild clears once live keys and tombstones fill 70% of it.

Memory: 12 bytes per position (an 8-byte key, a 4-byte slot), two positions per flow-table
slot: 24 bytes per slot, against about 100 for a Python dict entry with its int objects.
"""

from __future__ import annotations

import numpy as np

EMPTY = -1
REMOVED = -2
_MAX_USED = 0.7  # live keys + tombstones, as a share of the positions, before a rebuild


class KeyIndex:
    """Key hash -> slot for up to ``capacity`` live keys. Keys are well-mixed 64-bit hashes
    (their low bits pick the first position); a key is stored at most once."""

    def __init__(self, capacity: int) -> None:
        self._resize(capacity)

    def _resize(self, capacity: int) -> None:
        size = 1 << max(4, int(2 * capacity - 1).bit_length())  # a power of two >= 2 * capacity
        self._keys = np.zeros(size, np.uint64)
        self._slots = np.full(size, EMPTY, np.int32)
        self._mask = np.uint64(size - 1)
        self._live = 0
        self._used = 0  # positions that are not EMPTY

    def __len__(self) -> int:
        return self._live

    @property
    def size(self) -> int:
        return len(self._slots)

    def nbytes(self) -> int:
        return self._keys.nbytes + self._slots.nbytes

    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` live keys (rebuilding into a larger table if needed)."""
        if 2 * capacity > self.size:
            self._rebuild(capacity)

    def _positions(self, keys: np.ndarray) -> np.ndarray:
        """The position holding each key, or -1 where it is absent."""
        found = np.full(len(keys), -1, np.int64)
        pos = (keys & self._mask).astype(np.int64)
        active = np.arange(len(keys))
        while len(active):
            p = pos[active]
            s = self._slots[p]
            hit = (s >= 0) & (self._keys[p] == keys[active])
            found[active[hit]] = p[hit]
            go_on = ~hit & (s != EMPTY)  # a tombstone or another key: probe the next position
            active = active[go_on]
            pos[active] = (p[go_on] + 1) & (self.size - 1)
        return found

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """The slot of each key (int64), -1 where the key is absent."""
        pos = self._positions(keys)
        return np.where(pos >= 0, self._slots[np.maximum(pos, 0)], -1).astype(np.int64)

    def insert(self, keys: np.ndarray, slots: np.ndarray) -> None:
        """Store keys that are absent and distinct, each with its slot."""
        if len(keys) == 0:
            return
        if self._used + len(keys) > _MAX_USED * self.size:
            self._rebuild(max(self._live + len(keys), self.size // 2))
        pos = (keys & self._mask).astype(np.int64)
        active = np.arange(len(keys))
        while len(active):
            p = pos[active]
            free = self._slots[p] < 0  # EMPTY or REMOVED: the key is known to be absent
            # Keys probing the same free position: the first takes it, the others go on.
            taken, first = np.unique(p[free], return_index=True)
            winners = active[free][first]
            self._used += int((self._slots[taken] == EMPTY).sum())
            self._keys[taken] = keys[winners]
            self._slots[taken] = slots[winners]
            placed = np.zeros(len(keys), bool)
            placed[winners] = True
            go_on = ~placed[active]
            active = active[go_on]
            pos[active] = (p[go_on] + 1) & (self.size - 1)
        self._live += len(keys)

    def remove(self, keys: np.ndarray) -> None:
        """Remove keys that are present."""
        if len(keys) == 0:
            return
        pos = self._positions(keys)
        if (pos < 0).any():
            raise KeyError(f"{int((pos < 0).sum())} keys to remove are not in the index")
        self._slots[pos] = REMOVED
        self._live -= len(keys)

    def _rebuild(self, capacity: int) -> None:
        live = self._slots >= 0
        keys, slots = self._keys[live], self._slots[live]
        self._resize(capacity)
        self.insert(keys, slots)
