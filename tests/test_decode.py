"""Decode: header columns for every supported link type against scapy's own dissection, and
every undecodable packet counted under its reason."""

from __future__ import annotations

import ipaddress

import pytest
from scapy.all import (
    ARP,
    ICMP,
    IP,
    PPP,
    TCP,
    UDP,
    CookedLinux,
    Dot1AD,
    Dot1Q,
    Ether,
    IPv6,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    Loopback,
    PPPoE,
    fragment,
    wrpcap,
)
from scapy.contrib.mpls import MPLS

from quietwire.agent.capture.decode import Decoder
from quietwire.agent.capture.pcap import read_capture

from .conftest import meter_file, write_pcap


def decode_file(path):
    dec = Decoder()
    out = [dec.decode(b) for b in read_capture(path)]
    assert len(out) == 1
    return out[0]


def addr(hi, lo):
    ip = ipaddress.IPv6Address((int(hi) << 64) | int(lo))
    return str(ip.ipv4_mapped or ip)


INNER = (
    IP(src="192.0.2.1", dst="198.51.100.7", ttl=33)
    / TCP(sport=4321, dport=443, flags="PA", window=999)
    / (b"z" * 50)
)


@pytest.mark.parametrize(
    "name,frame,linktype",
    [
        ("ethernet", Ether() / INNER, None),
        ("vlan", Ether() / Dot1Q(vlan=7) / INNER, None),
        ("qinq", Ether() / Dot1AD(vlan=5) / Dot1Q(vlan=7) / INNER, None),
        ("mpls", Ether(type=0x8847) / MPLS(label=16, s=0) / MPLS(label=17, s=1) / INNER, None),
        ("pppoe", Ether() / PPPoE(sessionid=1) / PPP(proto=0x0021) / INNER, None),
        ("cooked", CookedLinux() / INNER, None),
        ("null", Loopback(type=2) / INNER, None),
        ("raw", INNER, 101),
        ("ppp", PPP(proto=0x0021) / INNER, 9),
    ],
)
def test_link_types_decode_to_the_same_header_fields(tmp_path, name, frame, linktype):
    path = tmp_path / f"{name}.pcap"
    wrpcap(str(path), [frame], linktype=linktype)
    p, stats = decode_file(path)
    assert stats.decoded == 1 and not any(stats.errors.values()), stats.errors
    assert addr(p.src_hi[0], p.src_lo[0]) == "192.0.2.1"
    assert addr(p.dst_hi[0], p.dst_lo[0]) == "198.51.100.7"
    assert (p.proto[0], p.sport[0], p.dport[0]) == (6, 4321, 443)
    assert p.tcp_flags[0] == 0x18 and p.tcp_window[0] == 999 and p.ttl[0] == 33
    assert p.ip_len[0] == 90 and p.hdr_len[0] == 40 and p.payload_len[0] == 50
    assert p.wirelen[0] == len(frame)


def test_ipv6_extension_headers_and_icmp(tmp_path):
    pkts = [
        Ether()
        / IPv6(src="2001:db8::1", dst="2001:db8::2", hlim=9)
        / IPv6ExtHdrHopByHop()
        / UDP(sport=5353, dport=53)
        / (b"q" * 12),
        Ether() / IP(src="10.1.1.1", dst="10.1.1.2") / ICMP(type=3, code=1),
    ]
    p, stats = decode_file(write_pcap(tmp_path / "v6.pcap", pkts, [1, 2]))
    assert stats.decoded == 2
    assert addr(p.src_hi[0], p.src_lo[0]) == "2001:db8::1"
    assert (p.ip_version[0], p.proto[0], p.sport[0], p.dport[0], p.ttl[0]) == (6, 17, 5353, 53, 9)
    assert p.ip_len[0] == 40 + 8 + 8 + 12 and p.payload_len[0] == 12
    assert (p.proto[1], p.icmp_type[1], p.icmp_code[1], p.sport[1]) == (1, 3, 1, 0)


def test_ipv4_fragments_join_their_flow(tmp_path):
    big = IP(src="10.0.0.1", dst="10.0.0.2", id=77) / UDP(sport=999, dport=53) / (b"x" * 3000)
    frags = fragment(big, fragsize=1000)
    assert len(frags) == 4
    pkts = [Ether() / f for f in frags] + [
        Ether() / IP(src="10.0.0.2", dst="10.0.0.1") / UDP(sport=53, dport=999)
    ]
    flows = meter_file(write_pcap(tmp_path / "frag.pcap", pkts, [0, 0.001, 0.002, 0.003, 0.01]))
    assert len(flows) == 1
    assert flows.records["packets"][0].tolist() == [4, 1]
    assert flows.records["ip_bytes"][0, 0] == 20 + 8 + 3000 + 3 * 20


def test_ipv6_fragments_join_their_flow(tmp_path):
    base = IPv6(src="2001:db8::1", dst="2001:db8::2") / IPv6ExtHdrFragment(id=5)
    first = (
        Ether()
        / IPv6(src="2001:db8::1", dst="2001:db8::2")
        / IPv6ExtHdrFragment(id=5, m=1, offset=0)
        / UDP(sport=7, dport=8)
        / (b"a" * 64)
    )
    later = Ether() / base.copy() / (b"b" * 64)
    later[IPv6ExtHdrFragment].offset = 9
    later[IPv6ExtHdrFragment].nh = 17
    orphan = (
        Ether()
        / IPv6(src="2001:db8::9", dst="2001:db8::2")
        / IPv6ExtHdrFragment(id=6, offset=9, nh=17)
        / (b"c" * 8)
    )
    p, stats = decode_file(write_pcap(tmp_path / "f6.pcap", [first, later, orphan], [0, 1, 2]))
    assert stats.decoded == 2 and stats.errors["fragment_unmatched"] == 1
    assert p.sport.tolist() == [7, 7] and p.dport.tolist() == [8, 8]


def test_undecodable_packets_are_counted_by_reason(tmp_path):
    good = Ether() / IP(src="10.0.0.1", dst="10.0.0.2") / UDP()
    bad_ihl = Ether() / IP(src="10.0.0.1", dst="10.0.0.2", ihl=3) / UDP()
    arp = Ether() / ARP()
    cut = bytes(Ether() / IP(src="10.0.0.1", dst="10.0.0.2") / TCP())[:40]
    pkts = [good, bad_ihl, arp, Ether(cut)]
    path = write_pcap(tmp_path / "bad.pcap", pkts, [0, 1, 2, 3])
    p, stats = decode_file(path)
    assert stats.packets == 4 and stats.decoded == 1
    assert stats.errors["bad_ip_header"] == 1
    assert stats.errors["non_ip"] == 1
    assert stats.errors["truncated"] == 1


def test_unknown_link_type_is_counted(tmp_path):
    path = tmp_path / "u.pcap"
    wrpcap(str(path), [Ether() / IP() / UDP()], linktype=147)  # a user-defined DLT
    _, stats = decode_file(path)
    assert stats.errors["unknown_link_type"] == 1 and stats.decoded == 0


def test_real_corpus_decodes_without_raising(ndpi):
    """Every packet of every capture has exactly one fate (decoded or one error reason)."""
    dec = Decoder()
    totals = {"packets": 0, "decoded": 0}
    for path in sorted((ndpi / "pcap").iterdir()):
        try:
            for batch in read_capture(path):
                _, st = dec.decode(batch)
                totals["packets"] += st.packets
                totals["decoded"] += st.decoded
        except Exception as exc:  # only CaptureError is allowed out of a damaged file
            assert type(exc).__name__ == "CaptureError", f"{path.name}: {exc!r}"
    assert totals["packets"] > 100_000
    assert totals["decoded"] / totals["packets"] > 0.98
