"""Community ID v1 against the spec's own baseline vectors (corelight/community-id-spec,
baseline/baseline_deflt.json and baseline_seed1.json: sport/dport there are already the ICMP
port-equivalents)."""

import ipaddress

import pytest
from scapy.all import ICMP, IP, TCP, UDP, Ether, ICMPv6EchoRequest, IPv6

from quietwire.agent.communityid import community_id, icmp_ports
from quietwire.agent.flowfile import identity_columns

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
