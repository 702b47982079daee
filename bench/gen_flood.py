"""Write an attacker's flood as a pcap quickly (numpy, no per-packet Python).

Every packet comes from a new random IPv4 source and source port and goes to one victim, so
every packet opens a new flow: the worst case for a flow table, a host-context window and an
alert budget. Packets are evenly spaced at --rate packets/s (100,000 by default: 2,000,000
packets span 20 s, so no flow reaches the 120 s idle timeout and the table holds them all
unless its cap evicts them). Seeded, so a kind and size always give the same file.

- ``syn``: TCP SYN to 203.0.113.10:80, 60-byte frames (54 bytes of headers, zero padding);
- ``udp``: spoofed-source UDP to 203.0.113.10:53, each a 29-byte DNS query for example.com
  with a random transaction id (71-byte frames), the shape of a reflection or water-torture
  flood.

    python bench/gen_flood.py OUT.pcap --kind syn --packets 2000000
"""

from __future__ import annotations

import argparse
import struct
from pathlib import Path

import numpy as np

VICTIM = 0xCB00710A  # 203.0.113.10 (TEST-NET-3)
KINDS = ("syn", "udp")
DNS_QUERY = (  # after a 2-byte transaction id: flags RD, 1 question, example.com A IN
    bytes.fromhex("0100 0001 0000 0000 0000")
    + b"\x07example\x03com\x00"
    + bytes.fromhex("0001 0001")
)
CHUNK_PACKETS = 1 << 20  # packets built per numpy pass (about 80 MB of records)

PCAP_HEADER = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)  # microseconds, Ethernet


def _record_dtype(payload_len: int, tcp: bool) -> np.dtype:
    """One pcap record (16-byte record header + Ethernet/IPv4/TCP-or-UDP frame) as fields."""
    l4 = [
        ("sport", ">u2"),
        ("dport", ">u2"),
    ]
    if tcp:
        l4 += [
            ("seq", ">u4"),
            ("ack", ">u4"),
            ("data_offset", "u1"),
            ("flags", "u1"),
            ("window", ">u2"),
            ("l4_checksum", ">u2"),
            ("urgent", ">u2"),
        ]
    else:
        l4 += [("udp_len", ">u2"), ("l4_checksum", ">u2")]
    return np.dtype(
        [
            ("ts_sec", "<u4"),
            ("ts_usec", "<u4"),
            ("incl_len", "<u4"),
            ("orig_len", "<u4"),
            ("eth_dst", "V6"),
            ("eth_src", "V6"),
            ("ethertype", ">u2"),
            ("version_ihl", "u1"),
            ("tos", "u1"),
            ("ip_len", ">u2"),
            ("ip_id", ">u2"),
            ("frag", ">u2"),
            ("ttl", "u1"),
            ("proto", "u1"),
            ("ip_checksum", ">u2"),
            ("src", ">u4"),
            ("dst", ">u4"),
            *l4,
            ("payload", f"V{payload_len}"),
        ]
    )


def _ones_complement_sum(words: np.ndarray) -> np.ndarray:
    """Internet checksum over rows of big-endian 16-bit words (uint64 sums, then folded)."""
    total = words.astype(np.uint64).sum(axis=1)
    while (total >> 16).any():
        total = (total & 0xFFFF) + (total >> 16)
    return (~total & 0xFFFF).astype(np.uint16)


def _build(kind: str, rng: np.random.Generator, first: int, n: int, rate_pps: float) -> bytes:
    tcp = kind == "syn"
    payload = b"" if tcp else DNS_QUERY
    header_len = 14 + 20 + (20 if tcp else 8)
    frame_len = max(60, header_len + 2 * (not tcp) + len(payload))  # + DNS transaction id
    pad = frame_len - header_len
    rec = np.zeros(n, dtype=_record_dtype(pad, tcp))

    us = (np.arange(first, first + n, dtype=np.float64) * (1e6 / rate_pps)).astype(np.int64)
    rec["ts_sec"] = 1_700_000_000 + us // 1_000_000
    rec["ts_usec"] = us % 1_000_000
    rec["incl_len"] = rec["orig_len"] = frame_len
    rec["eth_dst"] = b"\x02\x00\x00\x00\x00\x01"
    rec["eth_src"] = b"\x02\x00\x00\x00\x00\x02"
    rec["ethertype"] = 0x0800
    rec["version_ihl"] = 0x45
    rec["ip_len"] = frame_len - 14 if not tcp else 40
    rec["ip_id"] = rng.integers(0, 1 << 16, n)
    rec["ttl"] = 64
    rec["proto"] = 6 if tcp else 17
    # Unicast sources outside 0/8, 10/8 (the benign capture's clients) and 224/3.
    src = rng.integers(11 << 24, 224 << 24, n, dtype=np.uint32)
    rec["src"] = src
    rec["dst"] = VICTIM
    rec["sport"] = rng.integers(1024, 1 << 16, n)
    if tcp:
        rec["dport"] = 80
        rec["seq"] = rng.integers(0, 1 << 32, n, dtype=np.uint32)
        rec["data_offset"] = 0x50
        rec["flags"] = 0x02  # SYN
        rec["window"] = 64240
    else:
        rec["dport"] = 53
        rec["udp_len"] = 8 + 2 + len(payload)
        body = np.zeros((n, pad), dtype=np.uint8)
        body[:, :2] = rng.integers(0, 256, (n, 2), dtype=np.uint8)  # DNS transaction id
        body[:, 2 : 2 + len(payload)] = np.frombuffer(payload, np.uint8)
        rec["payload"] = body.view(f"V{pad}").ravel()

    raw = rec.view(np.uint8).reshape(n, -1)
    ip = raw[:, 30:50]
    rec["ip_checksum"] = _ones_complement_sum(ip.view(">u2"))
    if tcp:
        # Pseudo-header (src, dst, zero+proto, TCP length) + the 20-byte TCP header.
        seg = raw[:, 50:70].view(">u2")
        pseudo = np.c_[ip[:, 12:20].view(">u2"), np.full((n, 2), (6, 20), dtype=">u2")]
        rec["l4_checksum"] = _ones_complement_sum(np.c_[pseudo, seg])
    return rec.tobytes()  # UDP checksum stays 0: "not computed", which IPv4 allows


def generate(
    path: Path, packets: int, kind: str = "syn", seed: int = 11, rate_pps: float = 100_000
) -> int:
    """Write the flood; return the number of packets written."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    rng = np.random.default_rng([seed, KINDS.index(kind)])
    with path.open("wb") as out:
        out.write(PCAP_HEADER)
        for first in range(0, packets, CHUNK_PACKETS):
            out.write(_build(kind, rng, first, min(CHUNK_PACKETS, packets - first), rate_pps))
    return packets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--kind", choices=KINDS, default="syn")
    parser.add_argument("--packets", type=int, default=2_000_000)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--rate", type=float, default=100_000, help="packets per second")
    args = parser.parse_args()
    n = generate(args.out, args.packets, args.kind, args.seed, args.rate)
    size_mb = args.out.stat().st_size / 1e6
    print(f"wrote {n} {args.kind} flood packets to {args.out} ({size_mb:.0f} MB)")


if __name__ == "__main__":
    main()
