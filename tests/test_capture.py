"""Packet sources: pcap in both byte orders and time resolutions, pcapng with several
interfaces, chunked reading, and damaged files (error after everything before the damage)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from scapy.all import IP, TCP, UDP, Ether, rdpcap

from quietwire.agent.capture.pcap import CaptureError, read_capture

from .conftest import write_pcap


def frames(n=5):
    return [
        Ether()
        / IP(src="10.0.0.1", dst="10.0.0.2")
        / UDP(sport=1000 + i, dport=53)
        / (b"a" * (10 * i))
        for i in range(n)
    ]


def pcap_bytes(records, order="<", nanos=False, linktype=1):
    """A classic pcap: records are (seconds, fraction, data, wirelen)."""
    magic = 0xA1B23C4D if nanos else 0xA1B2C3D4
    out = struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, 65535, linktype)
    for sec, frac, data, wire in records:
        out += struct.pack(order + "IIII", sec, frac, len(data), wire) + data
    return out


def read_all(path, **kw):
    batches = list(read_capture(path, **kw))
    cat = {
        k: np.concatenate([getattr(b, k) for b in batches])
        for k in ("caplen", "wirelen", "ts_ns", "linktype", "interface")
    }
    cat["bytes"] = [bytes(b.data[o : o + c]) for b in batches for o, c in zip(b.offset, b.caplen)]
    return cat


def test_pcap_little_endian_micro_matches_scapy(tmp_path):
    path = write_pcap(tmp_path / "a.pcap", frames(), [1.5, 2.25, 3.000001, 4, 5])
    ours = read_all(path)
    theirs = rdpcap(str(path))
    assert ours["bytes"] == [bytes(p) for p in theirs]
    assert ours["ts_ns"].tolist() == [int(round(float(p.time) * 1e6)) * 1000 for p in theirs]
    assert ours["linktype"].tolist() == [1] * 5


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("nanos", [False, True])
def test_pcap_byte_orders_and_resolutions(tmp_path, order, nanos):
    data = [bytes(f) for f in frames(3)]
    recs = [(100 + i, 123456 + i, d, len(d) + 7 * i) for i, d in enumerate(data)]
    path = tmp_path / "x.pcap"
    path.write_bytes(pcap_bytes(recs, order, nanos))
    ours = read_all(path)
    scale = 1 if nanos else 1000
    assert ours["ts_ns"].tolist() == [(100 + i) * 10**9 + (123456 + i) * scale for i in range(3)]
    assert ours["bytes"] == data
    assert ours["wirelen"].tolist() == [len(d) + 7 * i for i, d in enumerate(data)]


def test_small_chunks_give_the_same_packets(tmp_path):
    path = write_pcap(tmp_path / "a.pcap", frames(40), list(range(40)))
    whole, chunked = read_all(path), read_all(path, chunk_bytes=100)
    assert whole["bytes"] == chunked["bytes"]
    assert whole["ts_ns"].tolist() == chunked["ts_ns"].tolist()


def test_truncated_pcap_yields_everything_before_the_damage(tmp_path):
    path = write_pcap(tmp_path / "a.pcap", frames(6), list(range(6)))
    raw = path.read_bytes()
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(raw[:-10])
    got = []
    with pytest.raises(CaptureError, match=r"cut\.pcap: truncated record at offset \d+"):
        for batch in read_capture(cut):
            got.append(len(batch))
    assert sum(got) == 5


def test_garbage_and_empty_files_are_refused(tmp_path):
    junk = tmp_path / "junk.pcap"
    junk.write_bytes(b"this is not a capture at all")
    with pytest.raises(CaptureError, match="junk.pcap: not a pcap or pcapng capture"):
        list(read_capture(junk))
    empty = tmp_path / "empty.pcap"
    empty.write_bytes(b"")
    with pytest.raises(CaptureError, match="empty file"):
        list(read_capture(empty))
    with pytest.raises(CaptureError, match="cannot open"):
        list(read_capture(tmp_path / "missing.pcap"))


def test_absurd_record_length_is_damage(tmp_path):
    raw = pcap_bytes([(1, 0, b"x" * 60, 60)])
    raw = raw[:32] + struct.pack("<I", 10**7) + raw[36:]
    path = tmp_path / "big.pcap"
    path.write_bytes(raw)
    with pytest.raises(CaptureError, match="offset 24: captured length 10000000"):
        list(read_capture(path))


# ---- pcapng --------------------------------------------------------------------------------


def _block(btype, body, order="<"):
    body += b"\0" * (-len(body) % 4)
    n = len(body) + 12
    return struct.pack(order + "II", btype, n) + body + struct.pack(order + "I", n)


def _shb(order="<"):
    return _block(0x0A0D0D0A, struct.pack(order + "IHHq", 0x1A2B3C4D, 1, 0, -1), order)


def _idb(linktype, tsresol=None, order="<"):
    opts = b""
    if tsresol is not None:
        opts = struct.pack(order + "HH", 9, 1) + bytes([tsresol]) + b"\0\0\0"
        opts += struct.pack(order + "HH", 0, 0)
    return _block(1, struct.pack(order + "HHI", linktype, 0, 65535) + opts, order)


def _epb(iface, ticks, data, order="<"):
    return _block(
        6,
        struct.pack(order + "IIIII", iface, ticks >> 32, ticks & 0xFFFFFFFF, len(data), len(data))
        + data,
        order,
    )


@pytest.mark.parametrize("order", ["<", ">"])
def test_pcapng_interfaces_with_own_link_types_and_resolutions(tmp_path, order):
    eth = bytes(Ether() / IP(src="1.1.1.1", dst="2.2.2.2") / TCP())
    raw = bytes(IP(src="3.3.3.3", dst="4.4.4.4") / UDP())
    blob = (
        _shb(order)
        + _idb(1, None, order)
        + _idb(101, 9, order)
        + _epb(0, 1_700_000_000_123_456, eth, order)
        + _block(5, b"statistics block, no packet", order)
        + _epb(1, 1_700_000_000_123_456_789, raw, order)
        + _block(3, struct.pack(order + "I", len(eth)) + eth, order)
    )  # simple packet
    path = tmp_path / "multi.pcapng"
    path.write_bytes(blob)
    ours = read_all(path)
    assert ours["bytes"] == [eth, raw, eth]
    assert ours["linktype"].tolist() == [1, 101, 1]
    assert ours["interface"].tolist() == [0, 1, 0]
    assert ours["ts_ns"][:2].tolist() == [1_700_000_000_123_456_000, 1_700_000_000_123_456_789]
    assert ours["ts_ns"][2] == ours["ts_ns"][1]  # a simple packet has no time: carried forward


def test_pcapng_binary_time_resolution(tmp_path):
    pkt = bytes(Ether() / IP() / UDP())
    path = tmp_path / "b.pcapng"
    path.write_bytes(_shb() + _idb(1, 0x80 | 20) + _epb(0, 3 * 2**20 + 2**19, pkt))
    assert read_all(path)["ts_ns"].tolist() == [3_500_000_000]


def test_pcapng_damage(tmp_path):
    pkt = bytes(Ether() / IP() / UDP())
    good = _shb() + _idb(1) + _epb(0, 10, pkt)
    bad_len = good + struct.pack("<II", 6, 13) + b"\0" * 20
    path = tmp_path / "bad.pcapng"
    path.write_bytes(bad_len)
    got = []
    with pytest.raises(
        CaptureError, match=r"bad\.pcapng: block at offset \d+: invalid block length 13"
    ):
        for b in read_capture(path):
            got.append(len(b))
    assert sum(got) == 1
    no_iface = _shb() + _epb(0, 10, pkt)
    path.write_bytes(no_iface)
    with pytest.raises(CaptureError, match="names interface 0, but only 0 are described"):
        list(read_capture(path))
