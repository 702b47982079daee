"""The pcap record walk in lanes (capture._walk_records) finds exactly the records that one
walk from header to header finds: on generated traffic, with payload bytes crafted to look like
record headers where lanes guess their starts, and on damaged buffers."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from quietwire.agent.capture import pcap as capture
from quietwire.agent.capture.pcap import CaptureError, read_capture


def _records(rng, n, seconds=1_700_000_000, sizes=(60, 1514), order="<"):
    """A pcap body of n records with random lengths and random payload bytes."""
    out = bytearray()
    for i in range(n):
        size = int(rng.integers(*sizes))
        out += struct.pack(order + "IIII", seconds + i // 1000, i % 1_000_000, size, size)
        out += rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    return out


def _fake_headers(body, rng, seconds=1_700_000_000):
    """Write plausible record headers (right time, valid fraction, a length pointing at another
    plausible header) into payload bytes all over the body: false lane starts."""
    body = bytearray(body)
    for at in range(100, len(body) - 64, 997):
        body[at : at + 16] = struct.pack("<IIII", seconds, 5, 0, 0)  # points at the next 16
        body[at + 16 : at + 32] = struct.pack("<IIII", seconds, 6, 20, 20)
    return body


def _plain(buf, end):
    caplen_at = struct.Struct("<I").unpack_from
    starts, off, _ = capture._walk_python(buf, end, 0, end, caplen_at)
    return starts, off


def _lanes(buf, end):
    starts, off = capture._walk_records(buf, end, "<", 1_000_000)
    return starts.tolist(), off


@pytest.fixture(autouse=True)
def lanes_on_any_buffer(monkeypatch):
    """The lanes on buffers of any size (read_capture walks small ones plainly)."""
    monkeypatch.setattr(capture, "VECTOR_WALK_BYTES", 0)
    monkeypatch.setattr(capture, "VECTOR_WALK", True)


def _buffer(body):
    buf = bytearray(len(body) + capture.PAD)
    buf[: len(body)] = body
    return buf


@pytest.mark.parametrize("sizes", [(60, 1514), (40, 120), (1000, 9000)])
def test_lanes_find_the_walks_records(sizes):
    rng = np.random.default_rng(len(sizes) + sizes[0])
    body = _records(rng, 6000 if sizes[1] < 2000 else 800, sizes=sizes)
    for end in (len(body), len(body) - 7, len(body) // 2 + 3):  # cut records at the end too
        buf = _buffer(body[:end])
        assert capture._walk_records(buf, end, "<", 1_000_000)[0].dtype == np.int64
        assert _lanes(buf, end) == _plain(buf, end)


@pytest.mark.parametrize("order, seconds", [(">", 1_700_000_000), ("<", (102 << 24) - 3)])
def test_lanes_in_either_byte_order_and_across_a_top_byte(order, seconds):
    """Big-endian headers; and times whose top byte (what the sync looks for first) changes
    within the capture."""
    rng = np.random.default_rng(6)
    body = _records(rng, 6000, seconds=seconds, order=order)
    buf = _buffer(body)
    caplen_at = struct.Struct(order + "I").unpack_from
    starts, off, _ = capture._walk_python(buf, len(body), 0, len(body), caplen_at)
    lanes, at = capture._walk_records(buf, len(body), order, 1_000_000)
    assert (lanes.tolist(), at) == (starts, off)
    assert len(starts) == 6000


def test_false_headers_in_payloads_change_nothing():
    rng = np.random.default_rng(3)
    body = _fake_headers(_records(rng, 5000), rng)
    buf = _buffer(body)
    plain = _plain(buf, len(body))
    assert _lanes(buf, len(body)) == plain
    assert len(plain[0]) < 5000  # the fake headers did damage the records they overwrote


def test_damage_mid_buffer_stops_where_the_walk_stops(tmp_path):
    rng = np.random.default_rng(4)
    body = bytearray(_records(rng, 4000))
    caplen_at = struct.Struct("<I").unpack_from
    starts, _, _ = capture._walk_python(body + bytes(16), len(body), 0, len(body), caplen_at)
    bad = starts[2500]
    body[bad + 8 : bad + 12] = struct.pack("<I", 10_000_000)  # an absurd captured length
    buf = _buffer(body)
    assert _lanes(buf, len(body)) == _plain(buf, len(body)) == (starts[:2500], bad)
    path = tmp_path / "bad.pcap"
    path.write_bytes(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1) + body)
    got = 0
    with pytest.raises(CaptureError, match=rf"bad\.pcap: record at offset {24 + bad}: captured"):
        for batch in read_capture(path):
            got += len(batch)
    assert got == 2500


def test_file_read_is_the_same_with_and_without_lanes(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    body = _records(rng, 9000)
    path = tmp_path / "a.pcap"
    path.write_bytes(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1) + body)

    def read(**kw):
        b = list(read_capture(path, **kw))
        return [np.concatenate([getattr(x, k) for x in b]).tolist() for k in ("caplen", "ts_ns")]

    lanes = read(chunk_bytes=3 << 20)
    monkeypatch.setattr(capture, "VECTOR_WALK", False)
    assert lanes == read(chunk_bytes=3 << 20) == read(chunk_bytes=1 << 16)
    assert len(lanes[0]) == 9000
