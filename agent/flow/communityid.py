"""Community ID v1 (corelight/community-id-spec): one flow hash that Zeek, Suricata and
Elastic also compute, so an alert can be joined with their logs.

``community_id`` is the spec's algorithm for one flow, in plain Python (the reference);
``community_id_chars`` computes a batch of flows as columns: the v1 input of a flow is at most
40 bytes, so its SHA-1 is one 64-byte block, hashed for every flow at once with uint32
arrays, and the digests are base64-encoded by table lookups.
"""

from __future__ import annotations

import base64
import hashlib
import struct

import numpy as np

from quietwire.agent.flow.records import FlowRecords

# ICMP type -> the type of the reply that makes it two-way (Zeek's counterpart tables).
_ICMP4_COUNTERPART = {8: 0, 0: 8, 13: 14, 14: 13, 15: 16, 16: 15, 10: 9, 9: 10, 17: 18, 18: 17}
_ICMP6_COUNTERPART = {
    128: 129,
    129: 128,
    133: 134,
    134: 133,
    135: 136,
    136: 135,
    130: 131,
    131: 130,
    139: 140,
    140: 139,
    144: 145,
    145: 144,
}
_PORT_PROTOS = (6, 17, 132)
ID_CHARS = 30  # "1:" and the base64 of a 20-byte digest
# Below this many flows hashlib one flow at a time is faster: the batch's SHA-1 is over a
# thousand array operations whatever the number of flows (1-2 ms).
BATCH_MIN = 512


def community_id(
    saddr: bytes,
    daddr: bytes,
    proto: int,
    sport: int | None,
    dport: int | None,
    seed: int = 0,
    one_way: bool = False,
) -> str:
    """The v1 ID of a flow; addresses are 4 or 16 packed bytes, ports None for portless
    protocols. For ICMP pass the port-equivalents from :func:`icmp_ports`."""
    if not one_way and (saddr, sport or 0) > (daddr, dport or 0):
        saddr, daddr, sport, dport = daddr, saddr, dport, sport
    data = struct.pack("!H", seed) + saddr + daddr + struct.pack("!BB", proto, 0)
    if sport is not None and dport is not None:
        data += struct.pack("!HH", sport, dport)
    return "1:" + base64.b64encode(hashlib.sha1(data).digest()).decode("ascii")


def icmp_ports(proto: int, icmp_type: int, icmp_code: int) -> tuple[int, int, bool]:
    """(sport, dport, one_way) that the spec hashes for an ICMP or ICMPv6 message."""
    table = _ICMP4_COUNTERPART if proto == 1 else _ICMP6_COUNTERPART
    if icmp_type in table:
        return icmp_type, table[icmp_type], False
    return icmp_type, icmp_code, True


def _packed(version: int, hi: int, lo: int) -> bytes:
    if version == 4:
        return struct.pack("!I", lo & 0xFFFFFFFF)
    return struct.pack("!QQ", hi, lo)


def flow_community_ids_scalar(flows: FlowRecords, seed: int = 0) -> list[str]:
    """flow_community_ids one flow at a time through :func:`community_id` (the reference
    that the batch is tested and benchmarked against)."""
    cols = [
        flows[k].tolist()
        for k in (
            "ip_version",
            "src_hi",
            "src_lo",
            "dst_hi",
            "dst_lo",
            "proto",
            "src_port",
            "dst_port",
            "icmp_type",
            "icmp_code",
        )
    ]
    out = []
    for ver, shi, slo, dhi, dlo, proto, sp, dp, itype, icode in zip(*cols):
        one_way = False
        if proto in _PORT_PROTOS:
            ports = (sp, dp)
        elif proto in (1, 58) and itype >= 0:
            sp, dp, one_way = icmp_ports(proto, itype, icode)
            ports = (sp, dp)
        else:
            ports = (None, None)
        out.append(
            community_id(
                _packed(ver, shi, slo),
                _packed(ver, dhi, dlo),
                proto,
                *ports,
                seed=seed,
                one_way=one_way,
            )
        )
    return out


def flow_community_ids(flows: FlowRecords, seed: int = 0) -> list[str]:
    """The Community ID of each flow (client to server, as the flow table oriented it)."""
    chars = community_id_chars(flows, seed)
    return chars.view(f"S{ID_CHARS}").reshape(-1).astype(f"U{ID_CHARS}").tolist()


def _counterparts(table: dict[int, int]) -> np.ndarray:
    out = np.full(256, -1, dtype=np.int32)
    out[list(table)] = list(table.values())
    return out


_COUNTERPART = {1: _counterparts(_ICMP4_COUNTERPART), 58: _counterparts(_ICMP6_COUNTERPART)}


def _port_equivalents(flows: FlowRecords) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(sport, dport, has_ports, one_way) of each flow, as community_id is given them."""
    proto = flows["proto"]
    sport = flows["src_port"].astype(np.int64)
    dport = flows["dst_port"].astype(np.int64)
    has_ports = np.isin(proto, _PORT_PROTOS)
    one_way = np.zeros(len(proto), dtype=bool)
    itype = flows["icmp_type"].astype(np.int64)
    icode = flows["icmp_code"].astype(np.int64)
    for icmp, table in _COUNTERPART.items():
        rows = np.flatnonzero((proto == icmp) & (itype >= 0))
        if not len(rows):
            continue
        t = itype[rows]
        reply = np.where((t >= 0) & (t < 256), table[np.clip(t, 0, 255)], -1)
        sport[rows] = t
        dport[rows] = np.where(reply >= 0, reply, icode[rows])
        one_way[rows] = reply < 0
        has_ports[rows] = True
    return sport, dport, has_ports, one_way


def _address_bytes(version: np.ndarray, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """(n, 16) big-endian bytes of each address: IPv4 in the first 4."""
    out = np.empty((len(version), 2), dtype=">u8")
    v4 = version == 4
    out[:, 0] = np.where(v4, (lo & np.uint64(0xFFFFFFFF)) << np.uint64(32), hi)
    out[:, 1] = np.where(v4, 0, lo)
    return out.view(np.uint8).reshape(-1, 16)


def community_id_chars(flows: FlowRecords, seed: int = 0) -> np.ndarray:
    """The Community IDs of a batch of flows as an (n, 30) uint8 matrix of ASCII; the same
    IDs as :func:`community_id` of each flow."""
    n = len(flows)
    if n < BATCH_MIN:
        text = "".join(flow_community_ids_scalar(flows, seed)).encode("ascii")
        return np.frombuffer(text, dtype=np.uint8).reshape(n, ID_CHARS)
    return _batch_chars(flows, seed)


def _batch_chars(flows: FlowRecords, seed: int) -> np.ndarray:
    """community_id_chars on arrays: one SHA-1 block per flow, all flows at once."""
    n = len(flows)
    version = flows["ip_version"]
    sport, dport, has_ports, one_way = _port_equivalents(flows)
    src = _address_bytes(version, flows["src_hi"], flows["src_lo"])
    dst = _address_bytes(version, flows["dst_hi"], flows["dst_lo"])
    # The spec orders the endpoints (address, then port) unless the ICMP message is one-way;
    # big-endian bytes compare as the addresses do.
    src_key = np.ascontiguousarray(src).view(">u8").reshape(-1, 2)
    dst_key = np.ascontiguousarray(dst).view(">u8").reshape(-1, 2)
    sp0 = np.where(has_ports, sport, 0)
    dp0 = np.where(has_ports, dport, 0)
    greater = (src_key[:, 0] > dst_key[:, 0]) | (
        (src_key[:, 0] == dst_key[:, 0])
        & ((src_key[:, 1] > dst_key[:, 1]) | ((src_key[:, 1] == dst_key[:, 1]) & (sp0 > dp0)))
    )
    swap = greater & ~one_way
    src, dst = np.where(swap[:, None], dst, src), np.where(swap[:, None], src, dst)
    sport, dport = np.where(swap, dport, sport), np.where(swap, sport, dport)

    # The message: seed (2), source, destination (4 or 16 each), proto, 0, then the ports (2
    # each) if the protocol has them; then SHA-1's padding: 0x80, zeros, the length in bits.
    ports = np.empty((n, 4), dtype=np.uint8)
    ports[:, 0] = sport >> 8 & 0xFF
    ports[:, 1] = sport & 0xFF
    ports[:, 2] = dport >> 8 & 0xFF
    ports[:, 3] = dport & 0xFF
    ports[~has_ports] = (0x80, 0, 0, 0)
    v4 = version == 4
    msg = np.empty((n, 64), dtype=np.uint8)
    for rows, width in ((np.flatnonzero(v4), 4), (np.flatnonzero(~v4), 16)):
        block = np.zeros((len(rows), 64), dtype=np.uint8)
        block[:, 0] = (seed >> 8) & 0xFF
        block[:, 1] = seed & 0xFF
        block[:, 2 : 2 + width] = src[rows, :width]
        block[:, 2 + width : 2 + 2 * width] = dst[rows, :width]
        block[:, 2 + 2 * width] = flows["proto"][rows]
        block[:, 4 + 2 * width : 8 + 2 * width] = ports[rows]
        with_ports = has_ports[rows]
        block[:, 8 + 2 * width] = np.where(with_ports, 0x80, 0)
        bits = (4 + 2 * width + 4 * with_ports) * 8
        block[:, 62] = bits >> 8
        block[:, 63] = bits & 0xFF
        msg[rows] = block
    digest = _sha1_block(msg.view(">u4").astype(np.uint32))
    return _ids_text(digest)


_K = (0x5A827999, 0x6ED9EBA1, 0x8F1BBCDC, 0xCA62C1D6)
_H0 = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0)


def _sha1_block(words: np.ndarray) -> np.ndarray:
    """SHA-1 of each row's one padded 64-byte block ((n, 16) uint32 words): (n, 20) bytes
    (in-place array operations, over a thousand of them)."""
    n = len(words)
    w = np.empty((80, n), dtype=np.uint32)
    w[:16] = words.T
    hi = np.empty((3, n), dtype=np.uint32)
    for t in range(16, 80, 3):  # w[t] needs w[t - 3]: three words at a time
        k = min(3, 80 - t)
        x = w[t : t + k]
        np.bitwise_xor(w[t - 3 : t - 3 + k], w[t - 8 : t - 8 + k], out=x)
        x ^= w[t - 14 : t - 14 + k]
        x ^= w[t - 16 : t - 16 + k]
        np.right_shift(x, 31, out=hi[:k])
        x <<= 1
        x |= hi[:k]
    for i, k in enumerate(_K):  # each round adds its constant and its word: add them once
        w[20 * i : 20 * i + 20] += np.uint32(k)
    a, b, c, d, e = (np.full(n, h, dtype=np.uint32) for h in _H0)
    f = np.empty(n, dtype=np.uint32)
    g = np.empty(n, dtype=np.uint32)
    for t in range(80):
        if t < 20:
            np.bitwise_xor(c, d, out=f)
            f &= b
            f ^= d
        elif t < 40 or t >= 60:
            np.bitwise_xor(b, c, out=f)
            f ^= d
        else:
            np.bitwise_or(b, c, out=f)
            f &= d
            np.bitwise_and(b, c, out=g)
            f |= g
        e += f
        e += w[t]
        np.left_shift(a, 5, out=f)
        np.right_shift(a, 27, out=g)
        f |= g
        e += f
        np.left_shift(b, 30, out=f)
        b >>= 2
        b |= f
        a, b, c, d, e = e, a, b, c, d  # e now holds the round's new a
    out = np.empty((n, 5), dtype=">u4")
    for i, (x, h) in enumerate(zip((a, b, c, d, e), _H0)):
        out[:, i] = x + np.uint32(h)
    return out.view(np.uint8).reshape(n, 20)


_B64 = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/", np.uint8)
# Two base64 characters for each 12 bits (as the little-endian uint16 of their two bytes).
_B64_PAIRS = (_B64.astype("<u2")[:, None] | _B64.astype("<u2")[None, :] << 8).reshape(-1)


def _ids_text(digest: np.ndarray) -> np.ndarray:
    """ "1:" and the base64 of each 20-byte digest: (n, 30) ASCII."""
    n = len(digest)
    groups = np.zeros((n, 21), dtype=np.uint32)
    groups[:, :20] = digest
    groups = groups.reshape(n, 7, 3)
    triple = groups[:, :, 0] << 16 | groups[:, :, 1] << 8 | groups[:, :, 2]
    pairs = np.empty((n, 7, 2), dtype="<u2")
    pairs[:, :, 0] = _B64_PAIRS[triple >> 12]
    pairs[:, :, 1] = _B64_PAIRS[triple & 0xFFF]
    out = np.empty((n, ID_CHARS), dtype=np.uint8)
    out[:, 0] = ord("1")
    out[:, 1] = ord(":")
    out[:, 2:] = pairs.view(np.uint8).reshape(n, 28)
    out[:, -1] = ord("=")  # 20 bytes leave 2 bits over: one pad character
    return out
