"""A labelled traffic generator: benign sessions (web/TLS, DNS, NTP, SSH, mail) with attacks
mixed in, written as a pcap with a label file of 5-tuples beside it. Seeded; small by default,
larger with ``scale``. Headers are packed directly (scapy builds only the DNS questions):
scapy builds about a thousand packets a second, too slow for evaluation sets.

Attacks: SYN and UDP port scans, ping sweep, SYN and UDP floods, SSH and HTTP brute force, DNS
tunnelling, slow exfiltration, periodic C2 beaconing, slowloris; and five web exploits
(WEB_ATTACKS: SQL injection, XSS, a JNDI lookup, path traversal, command injection), each one
request of a plain-HTTP session drawn as the benign ones are (client, server, sizes, packet
counts), so only the request's bytes tell it apart.

Payloads are their protocol's bytes (protocolbytes.py, httpbytes.py, webexploits.py): TLS
records, SSH banners, SMTP dialogue, DNS answers, HTTP requests and responses. They come from
a second generator seeded from the same seed, so the sizes and timing drawn for a seed (and
so every flow statistic) do not depend on what the packets carry; SMTP commands are the
exception, as long as their text.
"""

from __future__ import annotations

import csv
import ipaddress
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scapy.all import DNS, DNSQR

from quietwire.trainer.traffic import httpbytes, protocolbytes
from quietwire.trainer.traffic.webexploits import WEB_ATTACKS, exploit_request

ATTACKS = (
    "syn_scan",
    "udp_scan",
    "ping_sweep",
    "syn_flood",
    "udp_flood",
    "ssh_bruteforce",
    "http_bruteforce",
    "dns_tunnel",
    "slow_exfil",
    "c2_beacon",
    "slowloris",
    *WEB_ATTACKS,
)
RESOLVER, MAIL, WEB, SSH_SERVER = "10.2.0.53", "10.2.0.25", "10.2.0.80", "10.2.0.22"
# The incident cause the default rules should give each attack type, and which end of its
# flows the incident's entity is (the attacker as source, or the victim).
EXPECTED_CAUSE = {
    "syn_scan": ("port_scan", "source"),
    "udp_scan": ("port_scan", "source"),
    "ping_sweep": ("host_sweep", "source"),
    "syn_flood": ("syn_flood", "victim"),
    "udp_flood": ("udp_flood", "victim"),
    "ssh_bruteforce": ("brute_force", "source"),
    "http_bruteforce": ("brute_force", "source"),
    "dns_tunnel": ("dns_tunnel", "source"),
    "slow_exfil": ("exfiltration", "source"),
    "c2_beacon": ("c2_beacon", "source"),
    "slowloris": ("slow_dos", "victim"),
    **{kind: ("web_attack", "victim") for kind in WEB_ATTACKS},  # per attacked service
}
WEB_HOST = "intranet.corp"  # the name WEB serves under
PAYLOAD_STREAM = 1  # the payload generator's seed is (seed, PAYLOAD_STREAM)
# Response status lines: benign requests mostly succeed; exploits meet more errors.
BENIGN_STATUS = {
    "200 OK": 0.9,
    "404 Not Found": 0.04,
    "302 Found": 0.03,
    "403 Forbidden": 0.02,
    "500 Internal Server Error": 0.01,
}
EXPLOIT_STATUS = {
    "200 OK": 0.65,
    "500 Internal Server Error": 0.15,
    "403 Forbidden": 0.1,
    "404 Not Found": 0.05,
    "400 Bad Request": 0.05,
}
# Sessions per web-exploit instance, each from a client and to a server drawn as a benign
# web session's (not one attacker's burst): what sets them apart is in their bytes (the
# request, and the server's more frequent errors), not in flow statistics or host context.
WEB_EXPLOIT_SESSIONS = 30
ETH_HEADER = bytes.fromhex("020000000002020000000001") + b"\x08\x00"
FLAGS = {"F": 1, "S": 2, "R": 4, "P": 8, "A": 16}
ICMP_P, TCP_P, UDP_P = 1, 6, 17


def _frame(
    src: str,
    dst: str,
    proto: int,
    sport: int,
    dport: int,
    flags: str,
    payload: bytes,
    icmp: tuple[int, int],
) -> bytes:
    if proto == TCP_P:
        bits = sum(FLAGS[f] for f in flags)
        l4 = struct.pack("!HHIIBBHHH", sport, dport, 1, 1, 5 << 4, bits, 64240, 0, 0)
    elif proto == UDP_P:
        l4 = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
    else:
        l4 = struct.pack("!BBHI", icmp[0], icmp[1], 0, 0)
    total = 20 + len(l4) + len(payload)
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        total,
        0,
        0,
        64,
        proto,
        0,
        ipaddress.ip_address(src).packed,
        ipaddress.ip_address(dst).packed,
    )
    return ETH_HEADER + ip + l4 + payload


def _dns(name: str, response: bool, qtype: str = "A") -> bytes:
    return bytes(DNS(qr=int(response), rd=1, qd=DNSQR(qname=name, qtype=qtype)))


@dataclass
class _Capture:
    rng: np.random.Generator  # sizes, times, addresses
    fill: np.random.Generator  # payload bytes
    packets: list[tuple[float, bytes]] = field(default_factory=list)
    labels: dict[tuple, str] = field(default_factory=dict)

    def add(
        self,
        t: float,
        src: str,
        dst: str,
        proto: int,
        sport: int = 0,
        dport: int = 0,
        label: str = "benign",
        flags: str = "",
        payload: bytes = b"",
        icmp: tuple[int, int] = (8, 0),
    ) -> None:
        self.packets.append((t, _frame(src, dst, proto, sport, dport, flags, payload, icmp)))
        key = (proto,) + tuple(sorted([(_ip(src), sport), (_ip(dst), dport)]))
        # attack labels win over benign ones for a reused 5-tuple
        if self.labels.get(key, "benign") == "benign":
            self.labels[key] = label

    def port(self) -> int:
        return int(self.rng.integers(32768, 60999))

    def tcp_session(self, t, c, s, dport, label, up, down, gap=0.02, close=True):
        """Handshake, request/response exchanges (the payload of each packet), FIN close."""
        sp = self.port()

        def to_server(at, flags, payload=b""):
            self.add(at, c, s, TCP_P, sp, dport, label, flags, payload)

        def to_client(at, flags, payload=b""):
            self.add(at, s, c, TCP_P, dport, sp, label, flags, payload)

        to_server(t, "S")
        t += gap
        to_client(t, "SA")
        t += 0.001
        to_server(t, "A")
        for i in range(max(len(up), len(down))):
            if i < len(up):
                t += float(self.rng.exponential(gap))
                to_server(t, "PA", up[i])
            if i < len(down):
                t += float(self.rng.exponential(gap))
                to_client(t, "PA", down[i])
        if close:
            t += gap
            to_server(t, "FA")
            to_client(t + 0.001, "FA")
            to_server(t + 0.002, "A")
        return t

    def write(self, pcap: Path, labels: Path) -> int:
        self.packets.sort(key=lambda p: p[0])
        with pcap.open("wb") as out:
            out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
            base = 1_700_000_000
            for t, data in self.packets:
                sec = int(t)
                out.write(
                    struct.pack("<IIII", base + sec, int((t - sec) * 1e6), len(data), len(data))
                )
                out.write(data)
        with labels.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(("proto", "a_ip", "a_port", "b_ip", "b_port", "label"))
            for (proto, (a, ap), (b, bp)), label in sorted(self.labels.items()):
                w.writerow(
                    (
                        proto,
                        str(ipaddress.ip_address(a)),
                        ap,
                        str(ipaddress.ip_address(b)),
                        bp,
                        label,
                    )
                )
        return len(self.packets)


def _ip(text: str) -> int:
    return int(ipaddress.ip_address(text))


def _client(rng) -> str:
    return f"10.1.{int(rng.integers(0, 4))}.{int(rng.integers(2, 250))}"


def _web_server(rng: np.random.Generator) -> str:
    """A web session's server: WEB three times in ten, else one outside."""
    return (
        WEB
        if rng.random() < 0.3
        else f"93.184.{int(rng.integers(0, 255))}.{int(rng.integers(1, 255))}"
    )


def _http_host(fill: np.random.Generator, server: str) -> str:
    """The Host header for a web server (one of a few names for those outside)."""
    return WEB_HOST if server == WEB else protocolbytes.pick(fill, httpbytes.HOSTS)


def _benign(cap: _Capture, t: float) -> None:
    rng, fill = cap.rng, cap.fill
    c = _client(rng)
    kind = rng.choice(["web", "web", "web", "dns", "dns", "ntp", "ssh", "mail"])
    if kind == "web":
        server = _web_server(rng)
        n = int(rng.integers(1, 30))
        port = int(rng.choice([443, 443, 80]))
        up = [int(rng.integers(200, 900))]
        down = [int(rng.integers(200, 1460)) for _ in range(n)]
        if port == 443:
            sni = WEB_HOST if server == WEB else protocolbytes.pick(fill, protocolbytes.SNI_NAMES)
            payloads = protocolbytes.tls_session(fill, up, down, sni)
        else:
            request, content = httpbytes.benign_request(fill, up[0], _http_host(fill, server))
            status = _status(fill, BENIGN_STATUS)
            payloads = (
                [request],
                httpbytes.response(fill, down, content if "200" in status else "html", status),
            )
        cap.tcp_session(t, c, server, port, "benign", *payloads)
    elif kind == "dns":
        sp = cap.port()
        name = str(rng.choice(["example.com", "intranet.corp", "updates.vendor.net", "mail.corp"]))
        cap.add(t, c, RESOLVER, UDP_P, sp, 53, payload=_dns(name, False))
        answer = protocolbytes.dns_answers(fill, _dns(name, True), int(rng.integers(16, 200)))
        cap.add(t + float(rng.uniform(0.002, 0.03)), RESOLVER, c, UDP_P, 53, sp, payload=answer)
    elif kind == "ntp":
        server = f"162.159.200.{int(rng.integers(1, 4))}"
        cap.add(t, c, server, UDP_P, 123, 123, payload=b"\x23" + b"\0" * 47)
        cap.add(
            t + float(rng.uniform(0.005, 0.05)),
            server,
            c,
            UDP_P,
            123,
            123,
            payload=b"\x24" + b"\0" * 47,
        )
    elif kind == "ssh":
        n = int(rng.integers(10, 80))
        up = [int(rng.integers(36, 120)) for _ in range(n)]
        down = [int(rng.integers(36, 400)) for _ in range(n)]
        gap = float(rng.uniform(0.1, 0.8))
        cap.tcp_session(
            t, c, SSH_SERVER, 22, "benign", *protocolbytes.ssh_session(fill, up, down), gap=gap
        )
    else:
        port = int(rng.choice([25, 587]))
        up = [int(rng.integers(10, 80)) for _ in range(6)] + [1400] * int(rng.integers(1, 12))
        down = [int(rng.integers(20, 120)) for _ in range(7)]
        cap.tcp_session(t, c, MAIL, port, "benign", *protocolbytes.smtp_session(fill, up, down))


def _status(fill: np.random.Generator, table: dict[str, float]) -> str:
    return str(fill.choice(list(table), p=list(table.values())))


def _web_exploit(cap: _Capture, kind: str, t: float) -> None:
    """One plain-HTTP session whose request carries an exploit of ``kind``: client, server,
    request size and response packets drawn as a benign web session's are."""
    rng, fill = cap.rng, cap.fill
    c = _client(rng)
    server = _web_server(rng)
    n = int(rng.integers(1, 30))
    up = [int(rng.integers(200, 900))]
    down = [int(rng.integers(200, 1460)) for _ in range(n)]
    request = exploit_request(fill, kind, up[0], _http_host(fill, server))
    response = httpbytes.response(fill, down, "html", _status(fill, EXPLOIT_STATUS))
    cap.tcp_session(t, c, server, 80, kind, [request], response)


@dataclass(frozen=True)
class _Attack:
    """One attack instance: its kind (the flows' label), the two hosts drawn for it and when."""

    kind: str
    attacker: str
    target: str
    t0: float
    duration: float


def _syn_scan(cap: _Capture, a: _Attack) -> None:
    rng = cap.rng
    sp = cap.port()
    for i, port in enumerate(rng.choice(np.arange(1, 10000), 200, replace=False).tolist()):
        t = a.t0 + i * 0.01
        cap.add(t, a.attacker, a.target, TCP_P, sp, port, a.kind, "S")
        r = rng.random()
        if r < 0.7:
            cap.add(t + 0.001, a.target, a.attacker, TCP_P, port, sp, a.kind, "RA")
        elif r < 0.75:
            cap.add(t + 0.001, a.target, a.attacker, TCP_P, port, sp, a.kind, "SA")
            cap.add(t + 0.002, a.attacker, a.target, TCP_P, sp, port, a.kind, "R")


def _udp_scan(cap: _Capture, a: _Attack) -> None:
    rng = cap.rng
    sp = cap.port()
    for i, port in enumerate(rng.choice(np.arange(1, 2000), 100, replace=False).tolist()):
        t = a.t0 + i * 0.02
        cap.add(t, a.attacker, a.target, UDP_P, sp, port, a.kind)
        if rng.random() < 0.8:  # port unreachable, quoting the probe's headers
            cap.add(
                t + 0.001,
                a.target,
                a.attacker,
                ICMP_P,
                label=a.kind,
                icmp=(3, 3),
                payload=_frame(a.attacker, a.target, UDP_P, sp, port, "", b"", (0, 0))[14:42],
            )


def _ping_sweep(cap: _Capture, a: _Attack) -> None:
    for i in range(100):
        host = f"10.2.1.{i + 1}"
        echo = protocolbytes.ping_payload(a.t0 + i * 0.01)
        cap.add(a.t0 + i * 0.01, a.attacker, host, ICMP_P, label=a.kind, icmp=(8, 0), payload=echo)
        if cap.rng.random() < 0.3:
            cap.add(
                a.t0 + i * 0.01 + 0.001,
                host,
                a.attacker,
                ICMP_P,
                label=a.kind,
                icmp=(0, 0),
                payload=echo,
            )


def _syn_flood(cap: _Capture, a: _Attack) -> None:
    rng = cap.rng
    for i in range(600):
        src = f"198.18.{int(rng.integers(0, 256))}.{int(rng.integers(1, 255))}"
        sp = cap.port()
        t = a.t0 + i * 0.0005
        cap.add(t, src, WEB, TCP_P, sp, 80, a.kind, "S")
        if rng.random() < 0.5:
            cap.add(t + 0.0002, WEB, src, TCP_P, 80, sp, a.kind, "SA")


def _udp_flood(cap: _Capture, a: _Attack) -> None:
    rng = cap.rng
    sp = cap.port()
    for i in range(600):
        dport = int(rng.integers(1, 65535))
        payload = cap.fill.bytes(int(rng.integers(512, 1400)))
        cap.add(a.t0 + i * 0.0005, a.attacker, a.target, UDP_P, sp, dport, a.kind, payload=payload)


def _ssh_bruteforce(cap: _Capture, a: _Attack) -> None:
    for i in range(40):
        up, down = protocolbytes.ssh_session(
            cap.fill, [40, 600, 80, 96], [40, 700, 60, 52], protocolbytes.SSH_TOOLS
        )
        cap.tcp_session(a.t0 + i * 1.5, a.attacker, SSH_SERVER, 22, a.kind, up, down, gap=0.01)


def _http_bruteforce(cap: _Capture, a: _Attack) -> None:
    fill = cap.fill
    for i in range(60):
        request = httpbytes.login_request(fill, 420, WEB_HOST)
        status = protocolbytes.pick(fill, ("401 Unauthorized", "200 OK"))
        response = httpbytes.response(fill, [310], "html", status)
        cap.tcp_session(a.t0 + i * 0.5, a.attacker, WEB, 80, a.kind, [request], response, gap=0.005)


def _dns_tunnel(cap: _Capture, a: _Attack) -> None:
    rng = cap.rng
    sp = cap.port()
    client = _client(rng)
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789")
    base32 = str.maketrans("0189", "4567")  # the drawn labels, in base32's alphabet
    for i in range(300):
        t = a.t0 + i * 0.2
        name = "".join(rng.choice(letters, 60)).translate(base32) + ".t.evil.example"
        cap.add(t, client, RESOLVER, UDP_P, sp, 53, a.kind, payload=_dns(name, False, "TXT"))
        response = _dns(name, True, "TXT")
        answer = protocolbytes.dns_txt_answer(cap.fill, response, int(rng.integers(150, 400)))
        cap.add(t + 0.02, RESOLVER, client, UDP_P, 53, sp, a.kind, payload=answer)


def _slow_exfil(cap: _Capture, a: _Attack) -> None:
    client = _client(cap.rng)
    n = max(4, int(a.duration / 20))
    up, down = protocolbytes.tls_session(cap.fill, [1000] * n, [], "backup.example-files.net")
    cap.tcp_session(a.t0, client, "198.51.100.7", 443, a.kind, up, down, gap=20.0)


def _c2_beacon(cap: _Capture, a: _Attack) -> None:
    rng, fill = cap.rng, cap.fill
    client = _client(rng)
    sni = f"cdn-{protocolbytes.token(fill, 8, protocolbytes.LOWER_ALNUM)}.example-cloud.net"
    t = a.t0
    while t < a.t0 + a.duration - 5:
        up, down = protocolbytes.tls_session(fill, [300], [200], sni)
        cap.tcp_session(t, client, "198.51.100.66", 443, a.kind, up, down, gap=0.03)
        t += 60 + float(rng.normal(0, 2))


def _slowloris(cap: _Capture, a: _Attack) -> None:
    for i in range(80):
        n = max(3, int(a.duration / 30))
        stream = httpbytes.slowloris_stream(cap.fill, 15 * n, WEB_HOST)
        up = [stream[j : j + 15] for j in range(0, 15 * n, 15)]
        cap.tcp_session(a.t0 + i * 0.05, a.attacker, WEB, 80, a.kind, up, [], gap=10.0, close=False)


def _web_exploits(cap: _Capture, a: _Attack) -> None:
    for t in np.sort(cap.rng.uniform(a.t0, a.t0 + a.duration, WEB_EXPLOIT_SESSIONS)).tolist():
        _web_exploit(cap, a.kind, t)


# How each attack kind writes its packets.
_ATTACK_WRITERS: dict[str, Callable[[_Capture, _Attack], None]] = {
    "syn_scan": _syn_scan,
    "udp_scan": _udp_scan,
    "ping_sweep": _ping_sweep,
    "syn_flood": _syn_flood,
    "udp_flood": _udp_flood,
    "ssh_bruteforce": _ssh_bruteforce,
    "http_bruteforce": _http_bruteforce,
    "dns_tunnel": _dns_tunnel,
    "slow_exfil": _slow_exfil,
    "c2_beacon": _c2_beacon,
    "slowloris": _slowloris,
    **{kind: _web_exploits for kind in WEB_ATTACKS},
}


def _attack(cap: _Capture, kind: str, t0: float, duration: float) -> None:
    # every kind draws an attacker and a target first, so the draws after them do not depend
    # on which kinds use them
    rng = cap.rng
    attacker = rng.choice([_client(rng), f"203.0.113.{int(rng.integers(2, 250))}"])
    target = f"10.2.0.{int(rng.integers(100, 200))}"
    writer = _ATTACK_WRITERS.get(kind)
    if writer is not None:
        writer(cap, _Attack(kind, attacker, target, t0, duration))


def generate(
    pcap: Path,
    labels: Path,
    seed: int = 0,
    scale: float = 1.0,
    attack_share: float = 1.0,
    duration_s: float = 600.0,
) -> dict[str, int]:
    """Write the capture and its labels; return packets and attack instances written.

    ``scale`` multiplies the benign sessions (1,500 at 1.0); ``attack_share`` multiplies the
    attack instances (each attack type once at 1.0; 0 for benign traffic only)."""
    rng = np.random.default_rng(seed)
    cap = _Capture(rng, np.random.default_rng([seed, PAYLOAD_STREAM]))
    n_benign = int(1500 * scale)
    for t in np.sort(rng.uniform(0, duration_s, n_benign)).tolist():
        _benign(cap, t)
    instances = 0
    if attack_share > 0:
        per_type = max(1, int(round(attack_share))) if attack_share >= 1 else 1
        for kind in ATTACKS:
            for _ in range(per_type):
                if attack_share < 1 and rng.random() > attack_share:
                    continue
                start = float(rng.uniform(0, duration_s * 0.5))
                _attack(cap, kind, start, duration_s - start)
                instances += 1
    return {"packets": cap.write(pcap, labels), "attacks": instances}


def read_labels(path: Path) -> dict[tuple, str]:
    """{(proto, (a_int, a_port), (b_int, b_port)): label} from a label file."""
    out = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            out[
                (
                    int(row["proto"]),
                    (_ip(row["a_ip"]), int(row["a_port"])),
                    (_ip(row["b_ip"]), int(row["b_port"])),
                )
            ] = row["label"]
    return out


def flow_kinds(records, labels: dict[tuple, str], default: str = "unlabelled") -> list[str]:
    """The label of each flow record (by its addresses, ports and protocol)."""
    out = []
    for i in range(len(records)):
        a = (int(records["src_lo"][i]) & 0xFFFFFFFF, int(records["src_port"][i]))
        b = (int(records["dst_lo"][i]) & 0xFFFFFFFF, int(records["dst_port"][i]))
        out.append(labels.get((int(records["proto"][i]),) + tuple(sorted([a, b])), default))
    return out
