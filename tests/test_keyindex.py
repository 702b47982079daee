"""The flow table's key index: batches of inserts, removals and lookups against a dict."""

from __future__ import annotations

import numpy as np
import pytest

from quietwire.agent.flow.keyindex import KeyIndex


def test_agrees_with_a_dict_through_inserts_removals_and_rebuilds():
    rng = np.random.default_rng(7)
    index = KeyIndex(1000)
    reference: dict[int, int] = {}
    sizes = set()
    for _ in range(300):
        new = np.unique(rng.integers(0, 2**64 - 1, rng.integers(0, 200), dtype=np.uint64))
        new = np.array([k for k in new.tolist() if k not in reference], dtype=np.uint64)
        new = new[: 1000 - len(reference)]
        slots = rng.integers(0, 1000, len(new))
        index.insert(new, slots)
        reference.update(zip(new.tolist(), slots.tolist()))
        if reference:
            stored = np.array(list(reference), dtype=np.uint64)
            gone = rng.choice(
                stored, size=min(len(stored), int(rng.integers(0, 150))), replace=False
            )
            index.remove(gone)
            for k in gone.tolist():
                del reference[k]
        absent = rng.integers(0, 2**64 - 1, 50, dtype=np.uint64)
        query = np.r_[np.array(list(reference), dtype=np.uint64), absent]
        expected = [reference.get(k, -1) for k in query.tolist()]
        assert index.lookup(query).tolist() == expected
        assert len(index) == len(reference)
        sizes.add(index.size)
    assert sizes == {2048}  # tombstones were cleared by rebuilds, never by growing


def test_keys_sharing_a_first_position_probe_on():
    """Keys whose low bits agree all start at one position: each lands on the next free one."""
    index = KeyIndex(16)
    keys = (np.arange(1, 13, dtype=np.uint64) << np.uint64(40)) | np.uint64(5)
    index.insert(keys[:8], np.arange(8))
    index.remove(keys[2:5])
    index.insert(keys[8:], np.arange(8, 12))  # reuse the tombstones, then probe past them
    expected = [0, 1, -1, -1, -1, 5, 6, 7, 8, 9, 10, 11]
    assert index.lookup(keys).tolist() == expected


def test_reserve_grows_and_keeps_the_keys():
    index = KeyIndex(4)
    keys = np.arange(1, 101, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    index.reserve(100)
    index.insert(keys, np.arange(100))
    assert index.size >= 200
    assert index.lookup(keys).tolist() == list(range(100))


def test_removing_an_absent_key_is_an_error():
    index = KeyIndex(8)
    index.insert(np.array([3], np.uint64), np.array([0]))
    with pytest.raises(KeyError):
        index.remove(np.array([4], np.uint64))
