"""Community ID v1 (corelight/community-id-spec): one flow hash that Zeek, Suricata and
Elastic also compute, so an alert can be joined with their logs."""

from __future__ import annotations

import base64
import hashlib
import struct

from .flowrecords import FlowRecords

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


def flow_community_ids(flows: FlowRecords, seed: int = 0) -> list[str]:
    """The Community ID of each flow (client to server, as the flow table oriented it)."""
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
