"""Community ID v1 against the spec's own baseline vectors (corelight/community-id-spec,
baseline/baseline_deflt.json and baseline_seed1.json: sport/dport there are already the ICMP
port-equivalents)."""

import ipaddress

import numpy as np
import pytest
from scapy.all import ICMP, IP, TCP, UDP, Ether, ICMPv6EchoRequest, IPv6

from quietwire.agent.flow.communityid import (
    BATCH_MIN,
    community_id,
    community_id_chars,
    flow_community_ids,
    flow_community_ids_scalar,
    icmp_ports,
)
from quietwire.agent.flow.records import FlowRecords
from quietwire.agent.output.tablefields import identity_columns

from .conftest import meter_file, write_pcap

BASELINE = [
    (
        58,
        "fe80::200:86ff:fe05:80da",
        "fe80::260:97ff:fe07:69ea",
        135,
        136,
        "1:dGHyGvjMfljg6Bppwm3bg0LO8TY=",
    ),
    (
        58,
        "fe80::260:97ff:fe07:69ea",
        "fe80::200:86ff:fe05:80da",
        136,
        135,
        "1:dGHyGvjMfljg6Bppwm3bg0LO8TY=",
    ),
    (
        58,
        "fe80::260:97ff:fe07:69ea",
        "fe80::200:86ff:fe05:80da",
        135,
        136,
        "1:zavyT/cezQr1fmImYCwYnMXbgck=",
    ),
    (
        58,
        "3ffe:507:0:1:200:86ff:fe05:80da",
        "3ffe:501:0:1001::2",
        128,
        129,
        "1:+TW+HtLHvV1xnGhV1lv7XoJrqQg=",
    ),
    (58, "fe80::200:86ff:fe05:80da", "ff02::2", 133, 134, "1:hO+sN4H+MG5MY/8hIrXPqc4ZQz0="),
    (1, "192.168.0.89", "192.168.0.1", 8, 0, "1:X0snYXpgwiv9TZtqg64sgzUn6Dk="),
    (1, "192.168.0.1", "192.168.0.89", 0, 8, "1:X0snYXpgwiv9TZtqg64sgzUn6Dk="),
    (
        6,
        "2001:470:e5bf:dead:4957:2174:e82c:4887",
        "2607:f8b0:400c:c03::1a",
        63943,
        25,
        "1:/qFaeAR+gFe1KYjMzVDsMv+wgU4=",
    ),
    (132, "192.168.170.8", "192.168.170.56", 7, 7, "1:MP2EtRCAUIZvTw6MxJHLV7N7JDs="),
    (6, "66.35.250.204", "128.232.110.120", 80, 34855, "1:LQU9qZlK+B5F3KDmev6m5PMibrg="),
    (17, "192.168.1.52", "8.8.8.8", 54585, 53, "1:d/FP5EW3wiY1vCndhwleRRKHowQ="),
    (46, "10.1.12.2", "10.1.12.1", None, None, "1:KHlLkgoJW7ifUTyTSgyVfkFHzKw="),
]
ONE_WAY = [  # ICMP messages without a counterpart type are hashed in the order seen
    (
        58,
        "3ffe:501:1800:2345::2",
        "3ffe:507:0:1:200:86ff:fe05:80da",
        3,
        0,
        "1:2ObVBgIn28oZvibYZhZMBgh7WdQ=",
    ),
    (
        58,
        "3ffe:501:410:0:2c0:dfff:fe47:33e",
        "3ffe:507:0:1:200:86ff:fe05:80da",
        1,
        4,
        "1:hLZd0XGWojozrvxqE0dWB1iM6R0=",
    ),
    (1, "10.0.0.1", "10.0.0.2", 11, 0, "1:YHxtAirCG//0OzkcVAukqKQN9xM="),
]


@pytest.mark.parametrize("proto,src,dst,sport,dport,expected", BASELINE)
def test_spec_baseline(proto, src, dst, sport, dport, expected):
    s, d = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    assert community_id(s, d, proto, sport, dport) == expected


@pytest.mark.parametrize("proto,src,dst,sport,dport,expected", ONE_WAY)
def test_spec_one_way_icmp(proto, src, dst, sport, dport, expected):
    assert icmp_ports(proto, sport, dport)[2] is True
    s, d = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    assert community_id(s, d, proto, sport, dport, one_way=True) == expected


def test_seed_changes_the_id():
    s, d = ipaddress.ip_address("1.2.3.4").packed, ipaddress.ip_address("5.6.7.8").packed
    # Zeek's community-id test: 1.2.3.4:1122 -> 5.6.7.8:3344/tcp, seed 0.
    assert community_id(s, d, 6, 1122, 3344) == "1:wCb3OG7yAFWelaUydu0D+125CLM="
    assert community_id(s, d, 6, 1122, 3344, seed=1) != community_id(s, d, 6, 1122, 3344)


def test_flows_get_the_spec_ids(tmp_path):
    """Real bytes through the meter: TCP, UDP, ICMP echo and ICMPv6 echo flows."""
    pkts = [
        Ether()
        / IP(src="128.232.110.120", dst="66.35.250.204")
        / TCP(sport=34855, dport=80, flags="S"),
        Ether()
        / IP(src="66.35.250.204", dst="128.232.110.120")
        / TCP(sport=80, dport=34855, flags="SA"),
        Ether() / IP(src="192.168.1.52", dst="8.8.8.8") / UDP(sport=54585, dport=53),
        Ether() / IP(src="192.168.0.89", dst="192.168.0.1") / ICMP(type=8),
        Ether()
        / IPv6(src="3ffe:507:0:1:200:86ff:fe05:80da", dst="3ffe:501:0:1001::2")
        / ICMPv6EchoRequest(),
    ]
    flows = meter_file(write_pcap(tmp_path / "c.pcap", pkts, [1, 1.1, 2, 3, 4]))
    ids = identity_columns(flows.records)["community_id"]
    assert ids == [
        "1:LQU9qZlK+B5F3KDmev6m5PMibrg=",
        "1:d/FP5EW3wiY1vCndhwleRRKHowQ=",
        "1:X0snYXpgwiv9TZtqg64sgzUn6Dk=",
        "1:+TW+HtLHvV1xnGhV1lv7XoJrqQg=",
    ]


def _random_flows(n: int, rng: np.random.Generator) -> FlowRecords:
    """Flows of every kind the spec treats apart: IPv4 and IPv6; TCP, UDP, SCTP; ICMP and
    ICMPv6 with counterpart types, one-way types and no type; portless protocols; equal
    addresses and equal ports (where the ports decide the order)."""
    ver = rng.choice([4, 6], n).astype(np.uint8)
    proto = rng.choice([6, 17, 132, 1, 58, 0, 46, 47, 50, 255], n).astype(np.uint8)
    addr = {k: rng.integers(0, 2**64, n, dtype=np.uint64) for k in ("sh", "sl", "dh", "dl")}
    same = rng.random(n) < 0.2
    addr["dh"][same], addr["dl"][same] = addr["sh"][same], addr["sl"][same]
    v4 = ver == 4
    for k in ("sh", "dh"):
        addr[k][v4] = 0
    for k in ("sl", "dl"):
        addr[k][v4] &= np.uint64(0xFFFFFFFF)
    sport = rng.integers(0, 65536, n).astype(np.int32)
    dport = rng.integers(0, 65536, n).astype(np.int32)
    equal = rng.random(n) < 0.1
    dport[equal] = sport[equal]
    itype = rng.integers(-1, 256, n).astype(np.int16)
    known = rng.random(n) < 0.5
    itype[known] = rng.choice([0, 8, 13, 14, 128, 129, 133, 134, 135, 136, 3, 11], known.sum())
    icode = rng.integers(0, 256, n).astype(np.int16)
    return FlowRecords(
        {
            "seq": np.arange(n),
            "ip_version": ver,
            "src_hi": addr["sh"],
            "src_lo": addr["sl"],
            "dst_hi": addr["dh"],
            "dst_lo": addr["dl"],
            "proto": proto,
            "src_port": sport,
            "dst_port": dport,
            "icmp_type": itype,
            "icmp_code": icode,
        }
    )


def _packed(version: int, hi: int, lo: int) -> bytes:
    if version == 4:
        return ipaddress.IPv4Address(lo).packed
    return ipaddress.IPv6Address(hi << 64 | lo).packed


@pytest.mark.parametrize("seed", [0, 1, 0xBEEF])
def test_batch_equals_the_scalar_function(seed):
    """flow_community_ids (SHA-1 and base64 on arrays) against community_id per flow."""
    flows = _random_flows(5000, np.random.default_rng(seed))
    expected = []
    for r in range(len(flows)):
        ver, proto = int(flows["ip_version"][r]), int(flows["proto"][r])
        ports: tuple = (None, None)
        one_way = False
        if proto in (6, 17, 132):
            ports = (int(flows["src_port"][r]), int(flows["dst_port"][r]))
        elif proto in (1, 58) and flows["icmp_type"][r] >= 0:
            *ports, one_way = icmp_ports(
                proto, int(flows["icmp_type"][r]), int(flows["icmp_code"][r])
            )
        src = _packed(ver, int(flows["src_hi"][r]), int(flows["src_lo"][r]))
        dst = _packed(ver, int(flows["dst_hi"][r]), int(flows["dst_lo"][r]))
        expected.append(community_id(src, dst, proto, *ports, seed=seed, one_way=one_way))
    got = flow_community_ids(flows, seed)
    assert got == expected
    assert got == flow_community_ids_scalar(flows, seed)
    # Batches under BATCH_MIN flows are hashed one flow at a time, larger ones on arrays.
    for lo, hi in ((0, 1), (1, 40), (40, 40 + BATCH_MIN)):
        part = flows.take(slice(lo, hi))
        assert flow_community_ids(part, seed) == expected[lo:hi]
        assert community_id_chars(part, seed).tobytes() == "".join(expected[lo:hi]).encode()
    # Every kind of flow was drawn.
    icmp = np.isin(flows["proto"], (1, 58)) & (flows["icmp_type"] >= 0)
    assert len(set(zip(flows["ip_version"][icmp].tolist(), flows["proto"][icmp].tolist()))) == 4
    assert (~np.isin(flows["proto"], (1, 6, 17, 58, 132))).sum() > 100


def test_empty_batch():
    assert flow_community_ids(_random_flows(0, np.random.default_rng(0))) == []
