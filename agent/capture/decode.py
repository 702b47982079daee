"""Decode: a PacketBatch's raw bytes to columns of IP and transport header fields.

Everything is computed with numpy over the whole batch; no Python object per packet. A packet
that cannot be decoded is counted under one reason in ``DecodeStats`` and dropped, never raised.

Link types: Ethernet (802.1Q/802.1ad VLAN, MPLS, PPPoE session), Linux cooked v1 and v2,
raw IPv4/IPv6, BSD loopback/null, PPP and Cisco HDLC. Tunnels (IP-in-IP, GRE, GTP, VXLAN) are
not opened: their flow is the outer one.

IP fragments: the first fragment carries the ports. Later fragments are matched to it by
(source, destination, protocol, IP id) and counted to the same flow; a later fragment whose
first fragment was never seen (or was seen too long ago) is counted as ``fragment_unmatched``.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import numpy as np

from quietwire.agent.capture.pcap import PacketBatch

ETH_IPV4, ETH_IPV6 = 0x0800, 0x86DD
ETH_VLAN = (0x8100, 0x88A8, 0x9100)
ETH_MPLS = (0x8847, 0x8848)
ETH_PPPOE_SESSION = 0x8864
PPP_IPV4, PPP_IPV6 = 0x0021, 0x0057
IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMPV6, IPPROTO_SCTP = 1, 6, 17, 58, 132
PORT_PROTOCOLS = (IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP)
IPV6_EXTENSIONS = (0, 43, 44, 51, 60)
V4_MAPPED = np.uint64(0xFFFF_0000_0000)
# Bytes of a header read at once (an IPv6 header's 40); pcap.PAD covers them past the data.
HEADER_BYTES = 40


def _member_table(members: tuple[int, ...], size: int) -> np.ndarray:
    """Whether each value below ``size`` is one of ``members``: one gather per lookup, where
    np.isin sorts each call's values."""
    table = np.zeros(size, dtype=bool)
    table[list(members)] = True
    return table


IS_VLAN, IS_MPLS = _member_table(ETH_VLAN, 1 << 16), _member_table(ETH_MPLS, 1 << 16)
HAS_PORTS = _member_table(PORT_PROTOCOLS, 256)
IS_IPV6_EXTENSION = _member_table(IPV6_EXTENSIONS, 256)

# TCP flag bits, in header order.
FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = (1 << i for i in range(8))
TCP_FLAG_NAMES = ("fin", "syn", "rst", "psh", "ack", "urg", "ece", "cwr")

DECODE_ERROR_REASONS = (
    "truncated",
    "bad_ip_header",
    "unknown_link_type",
    "non_ip",
    "fragment_unmatched",
)


@dataclass(frozen=True)
class Packets:
    """Decoded IP packets, one array per header field (all the same length)."""

    ts_ns: np.ndarray  # int64
    wirelen: np.ndarray  # int64, frame length on the wire
    interface: np.ndarray  # int32
    ip_version: np.ndarray  # uint8, 4 or 6
    src_hi: np.ndarray  # uint64: addresses as IPv6 (IPv4 mapped to ::ffff:a.b.c.d), two halves
    src_lo: np.ndarray
    dst_hi: np.ndarray
    dst_lo: np.ndarray
    proto: np.ndarray  # uint8
    sport: np.ndarray  # int32, 0 for protocols without ports
    dport: np.ndarray
    icmp_type: np.ndarray  # int16, -1 when not ICMP
    icmp_code: np.ndarray
    ip_len: np.ndarray  # int64, IP total length (header + payload)
    hdr_len: np.ndarray  # int64, IP + transport header bytes
    payload_len: np.ndarray  # int64, transport payload bytes
    ttl: np.ndarray  # int16, TTL or hop limit
    tcp_flags: np.ndarray  # uint8, 0 for non-TCP
    tcp_window: np.ndarray  # int32, -1 for non-TCP
    # Where each packet's transport payload starts in ``raw`` (the batch's buffer) and how
    # many of its bytes were captured (0 for later fragments: not the start of a payload).
    # Only the payload statistics read them (payload.py); None where there are no bytes.
    payload_offset: np.ndarray | None = None  # int64
    payload_captured: np.ndarray | None = None  # int64
    raw: np.ndarray | None = None  # uint8, shared by every packet of the batch

    def __len__(self) -> int:
        return len(self.ts_ns)

    def take(self, index: np.ndarray) -> Packets:
        """The packets at ``index`` (an integer or boolean array), in that order."""
        return Packets(
            **{
                name: value if name == "raw" or value is None else value[index]
                for name in self.__dataclass_fields__
                for value in (getattr(self, name),)
            }
        )


@dataclass
class DecodeStats:
    """Packets seen and packets dropped, by reason (see DECODE_ERROR_REASONS)."""

    packets: int = 0
    bytes: int = 0
    decoded: int = 0
    errors: Counter = field(default_factory=Counter)

    def add(self, other: DecodeStats) -> None:
        self.packets += other.packets
        self.bytes += other.bytes
        self.decoded += other.decoded
        self.errors.update(other.errors)


class _Bytes:
    """Big-endian integers read at arbitrary byte positions of a buffer, many at once.

    Unaligned strided views (stride 1) let one fancy-index read a field for every packet;
    where a header has several fields to read, ``header`` copies its bytes for every packet in
    one gather instead. Positions past the data are clipped into the padding; callers check
    ``pos + width <= end`` against each packet's captured end.
    """

    def __init__(self, data: np.ndarray, data_end: int) -> None:
        # Sources pad their buffers (pcap.PAD); copy only if one did not.
        if len(data) - data_end < HEADER_BYTES:
            data = np.concatenate([data[:data_end], np.zeros(HEADER_BYTES, dtype=np.uint8)])
        self._last = len(data) - 8
        self._views = {
            w: np.ndarray((len(data) - 7,), dtype=f">u{w}", buffer=data, offset=0, strides=(1,))
            for w in (2, 4, 8)
        }
        self._u8 = data

    def _at(self, pos: np.ndarray) -> np.ndarray:
        return np.clip(pos, 0, self._last)

    def u8(self, pos: np.ndarray) -> np.ndarray:
        return self._u8[self._at(pos)]

    def be16(self, pos: np.ndarray) -> np.ndarray:
        return self._views[2][self._at(pos)].astype(np.int64)

    def be32(self, pos: np.ndarray) -> np.ndarray:
        return self._views[4][self._at(pos)].astype(np.uint64)

    def be64(self, pos: np.ndarray) -> np.ndarray:
        return self._views[8][self._at(pos)]

    def header(self, pos: np.ndarray, width: int) -> _Header:
        """The ``width`` bytes from each position, read in one gather (``width`` <=
        HEADER_BYTES: the padding keeps a header that starts in the data unclipped)."""
        # Each position's bytes as one opaque item: numpy copies such items whole.
        items = np.ndarray(
            (len(self._u8) - width + 1,), dtype=f"V{width}", buffer=self._u8, strides=(1,)
        )
        rows = items[np.clip(pos, 0, len(items) - 1)]
        return _Header(rows.view(np.uint8).reshape(len(pos), width))


class _Header:
    """One header per packet as rows of bytes; its fields are read like _Bytes reads them
    from the buffer, by their offset in the header, without a gather each."""

    def __init__(self, rows: np.ndarray) -> None:
        self._rows = rows

    def _field(self, at: int, width: int) -> np.ndarray:
        return self._rows[:, at : at + width].view(f">u{width}")[:, 0]

    def u8(self, at: int) -> np.ndarray:
        return self._rows[:, at]

    def be16(self, at: int) -> np.ndarray:
        return self._field(at, 2).astype(np.int64)

    def be32(self, at: int) -> np.ndarray:
        return self._field(at, 4).astype(np.uint64)

    def be64(self, at: int) -> np.ndarray:
        return self._field(at, 8)


class Decoder:
    """Turns PacketBatches into Packets; keeps only the small state fragment matching needs."""

    def __init__(self, fragment_memory: int = 4096) -> None:
        self._fragments: OrderedDict[tuple, tuple[int, int]] = OrderedDict()
        self._fragment_memory = fragment_memory

    def decode(self, batch: PacketBatch) -> tuple[Packets, DecodeStats]:
        """Decode one batch; return the IP packets and the counts of what was dropped."""
        stats = DecodeStats(packets=len(batch), bytes=int(batch.wirelen.sum()))
        end = batch.offset + batch.caplen
        rd = _Bytes(batch.data, int(end.max()) if len(end) else 0)
        n = len(batch)

        l3, is_ip = _network_start(batch, rd, end, stats)
        ip = _ip_header(rd, l3, end, is_ip, stats)
        _ipv6_extensions(rd, end, ip, stats)
        tp = _transport_header(rd, l3, end, ip, stats)
        ok = tp.ok
        if tp.later_fragment.any() or tp.first_fragment.any():
            matched = self._match_fragments(
                tp.first_fragment & ok,
                tp.later_fragment,
                ip.src_lo,
                ip.dst_lo,
                ip.src_hi,
                ip.dst_hi,
                ip.proto,
                ip.frag_id,
                tp.sport,
                tp.dport,
                tp.tcp_flags,
            )
            lost = tp.later_fragment & ~matched
            stats.errors["fragment_unmatched"] += int(lost.sum())
            ok &= ~lost

        stats.decoded = int(ok.sum())
        # Most batches drop nothing: their columns are taken as they are, not copied.
        keep = slice(None) if stats.decoded == n else np.flatnonzero(ok)
        assert stats.decoded + sum(stats.errors.values()) == n, "every packet has one fate"
        return _packets(batch, keep, ip, tp), stats

    def _match_fragments(
        self, first, later, src_lo, dst_lo, src_hi, dst_hi, proto, frag_id, sport, dport, flags
    ) -> np.ndarray:
        """Give later fragments their first fragment's ports; return which ones matched.

        Fragments are rare, so this walks them in Python with a bounded memory of first
        fragments (oldest forgotten first).
        """
        memory = self._fragments
        matched = np.zeros(len(first), dtype=bool)
        for i in np.flatnonzero(first | later):
            key = (
                int(src_hi[i]),
                int(src_lo[i]),
                int(dst_hi[i]),
                int(dst_lo[i]),
                int(proto[i]),
                int(frag_id[i]),
            )
            if first[i]:
                memory[key] = (int(sport[i]), int(dport[i]), int(flags[i]))
                memory.move_to_end(key)
                while len(memory) > self._fragment_memory:
                    memory.popitem(last=False)
            else:
                found = memory.get(key)
                if found is not None:
                    # Ports only: flags belong to the first fragment's header, not to these bytes.
                    sport[i], dport[i] = found[0], found[1]
                    flags[i] = 0
                    matched[i] = True
        return matched


@dataclass
class _IpFields:
    """Each packet's network-layer fields, IPv4 and IPv6 alike (meaningless where not IP).
    The IPv6 extension header walk moves ``proto``, ``l4`` and the fragment fields on."""

    v4: np.ndarray  # bool: an IPv4 packet (valid or not)
    v4_ok: np.ndarray  # bool: a whole, well-formed IPv4 header
    v6_ok: np.ndarray  # bool: a whole IPv6 header (and extension headers)
    proto: np.ndarray  # uint8
    ttl: np.ndarray  # int16
    ip_len: np.ndarray  # int64
    l4: np.ndarray  # int64, where the transport header starts
    frag_offset: np.ndarray
    more_frags: np.ndarray  # bool
    frag_id: np.ndarray  # uint64
    src_hi: np.ndarray
    src_lo: np.ndarray
    dst_hi: np.ndarray
    dst_lo: np.ndarray


@dataclass(frozen=True)
class _TransportFields:
    """Each packet's transport-layer fields, and which packets decoded so far."""

    ok: np.ndarray  # bool: link, IP and transport headers all there
    later_fragment: np.ndarray  # bool: an IP fragment after the first (no transport header)
    first_fragment: np.ndarray  # bool: the first of several IP fragments
    sport: np.ndarray
    dport: np.ndarray
    tcp_flags: np.ndarray
    tcp_window: np.ndarray
    icmp_type: np.ndarray
    icmp_code: np.ndarray
    hdr_len: np.ndarray
    payload_len: np.ndarray
    payload_offset: np.ndarray
    payload_captured: np.ndarray


def _network_start(
    batch: PacketBatch, rd: _Bytes, end: np.ndarray, stats: DecodeStats
) -> tuple[np.ndarray, np.ndarray]:
    """Per packet: where its network header starts, and whether it is IP behind a known,
    whole link header (the others are counted in ``stats``)."""
    l3, ethertype, link_ok = _link_layer(batch, rd)
    stats.errors["unknown_link_type"] += int((~link_ok).sum())
    link_cut = link_ok & (l3 >= end)  # not even the first byte after the link header
    stats.errors["truncated"] += int(link_cut.sum())
    link_ok &= ~link_cut
    is_ip = link_ok & ((ethertype == ETH_IPV4) | (ethertype == ETH_IPV6))
    stats.errors["non_ip"] += int((link_ok & ~is_ip).sum())
    return l3, is_ip


def _ip_header(
    rd: _Bytes, l3: np.ndarray, end: np.ndarray, is_ip: np.ndarray, stats: DecodeStats
) -> _IpFields:
    """The fixed IPv4 or IPv6 header of every packet; truncated and malformed ones counted."""
    ip = rd.header(l3, HEADER_BYTES)  # an IPv4 header's fixed part, or the IPv6 header
    version = ip.u8(0) >> 4
    v4 = is_ip & (version == 4)
    v6 = is_ip & (version == 6)
    v4_ok = v4 & (l3 + 20 <= end)
    v6_ok = v6 & (l3 + 40 <= end)
    stats.errors["truncated"] += int((v4 & ~v4_ok).sum() + (v6 & ~v6_ok).sum())
    ihl = (ip.u8(0) & 0x0F).astype(np.int64) * 4
    bad_v4 = v4_ok & (ihl < 20)
    stats.errors["bad_ip_header"] += int(bad_v4.sum() + (is_ip & ~v4 & ~v6).sum())
    v4_ok &= ~bad_v4

    length_field = np.where(v4, ip.be16(2), ip.be16(4))
    ip_len = np.where(v4, length_field, length_field + 40)
    # Segmentation offload and jumbograms capture a length field of 0: fall back to caplen.
    ip_len = np.where(length_field == 0, end - l3, ip_len)
    frag_word = ip.be16(6)
    v4_src, v4_dst = ip.be32(12), ip.be32(16)
    return _IpFields(
        v4=v4,
        v4_ok=v4_ok,
        v6_ok=v6_ok,
        proto=np.where(v4, ip.u8(9), ip.u8(6)),
        ttl=np.where(v4, ip.u8(8), ip.u8(7)).astype(np.int16),
        ip_len=ip_len,
        l4=np.where(v4, l3 + ihl, l3 + 40),
        frag_offset=np.where(v4, frag_word & 0x1FFF, 0),
        more_frags=v4 & ((frag_word & 0x2000) > 0),
        frag_id=np.where(v4, ip.be16(4), 0).astype(np.uint64),
        src_hi=np.where(v4, np.uint64(0), ip.be64(8)),
        src_lo=np.where(v4, V4_MAPPED | v4_src, ip.be64(16)),
        dst_hi=np.where(v4, np.uint64(0), ip.be64(24)),
        dst_lo=np.where(v4, V4_MAPPED | v4_dst, ip.be64(32)),
    )


def _ipv6_extensions(rd: _Bytes, end: np.ndarray, ip: _IpFields, stats: DecodeStats) -> None:
    """Step over IPv6 extension headers (hop-by-hop, routing, fragment, AH, destination
    options) to the transport header, taking the fragment header's fields on the way."""
    proto, l4 = ip.proto, ip.l4
    frag_offset, more_frags, frag_id = ip.frag_offset, ip.more_frags, ip.frag_id
    ext = ip.v6_ok & IS_IPV6_EXTENSION[proto]
    for _ in range(6):
        if not ext.any():
            break
        sel = np.flatnonzero(ext)
        at = l4[sel]
        eh_ok = at + 8 <= end[sel]
        nh = proto[sel]
        is_frag = nh == 44
        hlen = rd.u8(at + 1).astype(np.int64)
        length = np.where(is_frag, 8, np.where(nh == 51, (hlen + 2) * 4, (hlen + 1) * 8))
        word = rd.be16(at + 2)
        frag_offset[sel] = np.where(is_frag, word >> 3, frag_offset[sel])
        more_frags[sel] |= is_frag & ((word & 1) > 0)
        frag_id[sel] = np.where(is_frag, rd.be32(at + 4), frag_id[sel])
        proto[sel] = rd.u8(at)
        l4[sel] += length
        bad = ~eh_ok
        ip.v6_ok[sel[bad]] = False
        stats.errors["truncated"] += int(bad.sum())
        ext[sel] = eh_ok & IS_IPV6_EXTENSION[proto[sel]]
    if ext.any():  # more extension headers than any real stack sends
        stats.errors["bad_ip_header"] += int(ext.sum())
        ip.v6_ok &= ~ext


def _transport_header(
    rd: _Bytes, l3: np.ndarray, end: np.ndarray, ip: _IpFields, stats: DecodeStats
) -> _TransportFields:
    """Ports (or ICMP type and code), TCP flags and window, and where each payload starts."""
    proto, l4 = ip.proto, ip.l4
    ip_ok = ip.v4_ok | ip.v6_ok
    later_fragment = ip_ok & (ip.frag_offset > 0)
    first_fragment = ip_ok & (ip.frag_offset == 0) & ip.more_frags

    avail = end - l4
    is_tcp = proto == IPPROTO_TCP
    has_ports = HAS_PORTS[proto]
    is_icmp = (proto == IPPROTO_ICMP) | (proto == IPPROTO_ICMPV6)
    need = np.where(is_tcp, 20, np.where(has_ports, 4, np.where(is_icmp, 2, 0)))
    transport_cut = ip_ok & ~later_fragment & (avail < need)
    stats.errors["truncated"] += int(transport_cut.sum())

    transport = rd.header(l4, 16)  # ports (or ICMP type and code), TCP flags and window
    ports = transport.be32(0).astype(np.int64)
    tcp_word = transport.be32(12).astype(np.int64)  # data offset, flags, window
    icmp = is_icmp & ~later_fragment
    l4_hdr = np.where(
        is_tcp,
        (tcp_word >> 28) * 4,
        np.where((proto == IPPROTO_UDP) | is_icmp, 8, np.where(has_ports, 12, 0)),
    )
    l4_hdr = np.where(later_fragment, 0, l4_hdr)
    hdr_len = (l4 - l3) + l4_hdr
    payload_len = np.maximum(ip.ip_len - hdr_len, 0)
    payload_offset = l4 + l4_hdr
    captured = np.minimum(np.maximum(end - payload_offset, 0), payload_len)
    return _TransportFields(
        ok=ip_ok & ~transport_cut,
        later_fragment=later_fragment,
        first_fragment=first_fragment,
        sport=np.where(has_ports, ports >> 16, 0).astype(np.int32),
        dport=np.where(has_ports, ports & 0xFFFF, 0).astype(np.int32),
        tcp_flags=np.where(is_tcp, (tcp_word >> 16) & 0xFF, 0).astype(np.uint8),
        tcp_window=np.where(is_tcp & ~later_fragment, tcp_word & 0xFFFF, -1).astype(np.int32),
        icmp_type=np.where(icmp, ports >> 24, -1).astype(np.int16),
        icmp_code=np.where(icmp, (ports >> 16) & 0xFF, -1).astype(np.int16),
        hdr_len=hdr_len,
        payload_len=payload_len,
        payload_offset=payload_offset,
        payload_captured=np.where(later_fragment, 0, captured),
    )


def _packets(
    batch: PacketBatch, keep: slice | np.ndarray, ip: _IpFields, tp: _TransportFields
) -> Packets:
    """The decoded packets at ``keep``, as columns."""
    return Packets(
        ts_ns=batch.ts_ns[keep],
        wirelen=batch.wirelen[keep],
        interface=batch.interface[keep],
        ip_version=np.where(ip.v4[keep], 4, 6).astype(np.uint8),
        src_hi=ip.src_hi[keep],
        src_lo=ip.src_lo[keep],
        dst_hi=ip.dst_hi[keep],
        dst_lo=ip.dst_lo[keep],
        proto=ip.proto[keep],
        sport=tp.sport[keep],
        dport=tp.dport[keep],
        icmp_type=tp.icmp_type[keep],
        icmp_code=tp.icmp_code[keep],
        ip_len=ip.ip_len[keep],
        hdr_len=tp.hdr_len[keep],
        payload_len=tp.payload_len[keep],
        ttl=ip.ttl[keep],
        tcp_flags=tp.tcp_flags[keep],
        tcp_window=tp.tcp_window[keep],
        payload_offset=tp.payload_offset[keep],
        payload_captured=tp.payload_captured[keep],
        raw=batch.data,
    )


def _link_layer(batch: PacketBatch, rd: _Bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per packet: offset of the network header, its ethertype, and whether the link is known."""
    n = len(batch)
    l3 = np.zeros(n, dtype=np.int64)
    ethertype = np.zeros(n, dtype=np.int64)
    known = np.zeros(n, dtype=bool)
    types = batch.linktype
    single = n > 0 and bool((types == types[0]).all())  # as a file's packets are
    for linktype in [int(types[0])] if single else np.unique(types).tolist():
        sel = slice(None) if single else np.flatnonzero(types == linktype)
        pos = batch.offset[sel]
        if linktype == 1:  # Ethernet, then any depth of 802.1Q/802.1ad tags
            l3_sel = pos + 14
            et = rd.be16(pos + 12)
            end = pos + batch.caplen[sel]
            vlan = IS_VLAN[et]
            while vlan.any():
                et = np.where(vlan, rd.be16(l3_sel + 2), et)
                l3_sel = np.where(vlan, l3_sel + 4, l3_sel)
                vlan &= IS_VLAN[et] & (l3_sel < end)
            et, l3_sel = _mpls_pppoe(et, l3_sel, rd)
        elif linktype == 113:  # Linux cooked v1
            et, l3_sel = rd.be16(pos + 14), pos + 16
        elif linktype == 276:  # Linux cooked v2
            et, l3_sel = rd.be16(pos), pos + 20
        elif linktype in (0, 108):  # BSD null / OpenBSD loop: 4-byte address family
            et, l3_sel = _from_version_nibble(pos + 4, rd), pos + 4
        elif linktype in (12, 14, 101, 228, 229):  # raw IP
            et, l3_sel = _from_version_nibble(pos, rd), pos
        elif linktype in (9, 50):  # PPP, PPP in HDLC framing
            framed = rd.be16(pos) == 0xFF03
            et = _ppp_to_ethertype(np.where(framed, rd.be16(pos + 2), rd.be16(pos)))
            l3_sel = pos + np.where(framed, 4, 2)
        elif linktype == 104:  # Cisco HDLC
            et, l3_sel = rd.be16(pos + 2), pos + 4
        else:
            continue
        known[sel] = True
        l3[sel] = l3_sel
        ethertype[sel] = et
    return l3, ethertype, known


def _from_version_nibble(pos: np.ndarray, rd: _Bytes) -> np.ndarray:
    version = rd.u8(pos) >> 4
    return np.where(version == 4, ETH_IPV4, np.where(version == 6, ETH_IPV6, 0)).astype(np.int64)


def _ppp_to_ethertype(proto: np.ndarray) -> np.ndarray:
    return np.where(proto == PPP_IPV4, ETH_IPV4, np.where(proto == PPP_IPV6, ETH_IPV6, 0))


def _mpls_pppoe(et: np.ndarray, l3: np.ndarray, rd: _Bytes) -> tuple[np.ndarray, np.ndarray]:
    """Step over MPLS label stacks and PPPoE session headers to the IP header."""
    mpls = IS_MPLS[et]
    for _ in range(8):
        if not mpls.any():
            break
        bottom = (rd.u8(l3 + 2) & 1) > 0
        l3 = np.where(mpls, l3 + 4, l3)
        inner = _from_version_nibble(l3, rd)
        et = np.where(mpls & bottom, inner, et)
        mpls &= ~bottom
    pppoe = et == ETH_PPPOE_SESSION
    if pppoe.any():
        et = np.where(pppoe, _ppp_to_ethertype(rd.be16(l3 + 6)), et)
        l3 = np.where(pppoe, l3 + 8, l3)
    return et, l3
