"""trafficgen's payloads: each benign kind carries its protocol's bytes, the web-exploit
sessions are shaped like benign HTTP sessions and carry their exploits, and what the packets
carry does not change their sizes and times. The capture is read back from the pcap bytes
(a parser here, not the generator's code)."""

from __future__ import annotations

import re
import struct
from collections import defaultdict
from urllib.parse import unquote

import numpy as np
import pytest
from scapy.all import DNS

from quietwire.trainer.traffic import trafficgen
from quietwire.trainer.traffic.trafficgen import WEB_ATTACKS, generate, read_labels


def read_sessions(pcap, labels) -> dict[tuple, dict]:
    """Every flow of a trafficgen pcap (Ethernet, IPv4, TCP/UDP/ICMP without options): its
    label, and its packets as (time, from the first sender, IP length, payload)."""
    table = read_labels(labels)
    data = pcap.read_bytes()
    flows: dict[tuple, dict] = {}
    at = 24
    while at < len(data):
        sec, usec, n, _ = struct.unpack_from("<IIII", data, at)
        frame = data[at + 16 : at + 16 + n]
        at += 16 + n
        ip = frame[14:34]
        proto, src, dst = ip[9], int.from_bytes(ip[12:16], "big"), int.from_bytes(ip[16:20], "big")
        if proto in (6, 17):
            sport, dport = struct.unpack("!HH", frame[34:38])
            payload = frame[54:] if proto == 6 else frame[42:]
        else:
            sport = dport = 0
            payload = frame[42:]
        key = (proto,) + tuple(sorted([(src, sport), (dst, dport)]))
        flow = flows.setdefault(key, {"label": table.get(key), "first": (src, sport), "pkts": []})
        t = sec + usec / 1e6
        flow["pkts"].append((t, (src, sport) == flow["first"], len(frame) - 14, payload))
    return flows


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen")
    generate(out / "g.pcap", out / "g.csv", seed=3, scale=0.5)
    return read_sessions(out / "g.pcap", out / "g.csv")


def server_port(key) -> int:
    return min(key[1][1], key[2][1])


def payloads(flow, client: bool) -> list[bytes]:
    return [p for _, c, _, p in flow["pkts"] if c == client and p]


def parse_http(data: bytes, first_line: str) -> tuple[str, dict[str, str], bytes]:
    """(start line, headers, body) of an HTTP/1.1 message; asserts its syntax."""
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, data[:200]
    lines = head.decode("ascii").split("\r\n")
    assert re.fullmatch(first_line, lines[0]), lines[0]
    headers = {}
    for line in lines[1:]:
        assert re.fullmatch(r"[A-Za-z0-9-]+: [^\r\n]*", line), line
        name, value = line.split(": ", 1)
        headers[name.lower()] = value
    return lines[0], headers, body


def test_benign_payloads_speak_their_protocol(sessions):
    by_port = defaultdict(list)
    for key, flow in sessions.items():
        if flow["label"] == "benign" and key[0] == 6:
            by_port[server_port(key)].append(flow)
    assert {22, 25, 80, 443, 587} <= set(by_port)

    for flow in by_port[443]:
        hello, *rest = payloads(flow, True)
        # TLS record: handshake, version 3.x, length of the rest; a ClientHello naming a server
        assert hello[0] == 0x16 and hello[1] == 3 and hello[5] == 1
        assert struct.unpack("!H", hello[3:5])[0] == len(hello) - 5
        assert re.search(rb"\x00\x00[\x00-\xff]{4}\x00[\x00-\xff]{2}[a-z0-9.-]+\.[a-z]+", hello)
        for p in rest:
            assert p[:3] == b"\x17\x03\x03" and struct.unpack("!H", p[3:5])[0] == len(p) - 5
        for p in payloads(flow, False):
            assert p[0] in (0x16, 0x17) and p[1:3] == b"\x03\x03"
            at = 0  # whole records, back to back
            while at < len(p):
                at += 5 + struct.unpack("!H", p[at + 3 : at + 5])[0]
            assert at == len(p)

    for flow in by_port[80]:
        (request,) = payloads(flow, True)
        start, headers, body = parse_http(request, r"(GET|POST) /\S* HTTP/1\.1")
        assert "host" in headers and "user-agent" in headers
        if start.startswith("POST"):
            assert int(headers["content-length"]) == len(body) > 0
        else:
            assert body == b""
        _, headers, body = parse_http(b"".join(payloads(flow, False)), r"HTTP/1\.1 \d{3} .+")
        assert int(headers["content-length"]) == len(body)

    for flow in by_port[22]:
        for client in (True, False):
            first = payloads(flow, client)[0]
            assert re.match(rb"SSH-2\.0-[\x21-\x7e]+( [\x20-\x7e]+)?\r\n", first), first[:60]

    for flow in by_port[25] + by_port[587]:
        sent = b"".join(payloads(flow, True))
        assert re.match(rb"EHLO \S+\r\nMAIL FROM:<\S+@\S+>\r\nRCPT TO:<\S+@\S+>\r\nDATA\r\n", sent)
        assert sent.endswith(b"\r\n.\r\n") and b"\r\nSubject: " in sent
        replies = payloads(flow, False)
        assert replies[0].startswith(b"220 ") and all(r[:3].isdigit() for r in replies)

    dns = [f for k, f in sessions.items() if f["label"] == "benign" and server_port(k) == 53]
    for flow in dns:
        answer = DNS(payloads(flow, False)[0])
        assert answer.qr == 1 and answer.ancount >= 1
        assert answer.an[0].type == 5 and all(a.type == 1 for a in list(answer.an)[1:])
        assert answer.ancount == len(list(answer.an))


# What each exploit type's requests carry, read after URL decoding (twice: some are double
# encoded); benign requests carry none of them.
EXPLOIT = {
    "web_sqli": r"union\s+(all\s+)?select|'\s*(or|and)\s|\bor\s+\(?1=1|'--|sleep\(|drop\s+table|convert\(int",
    "web_xss": r"<script|onerror=|onload=|ontoggle=|javascript:",
    "web_jndi": r"\$\{(jndi|\$\{)",
    "web_traversal": r"\.\./|\.\.\\|/etc/passwd",
    "web_cmdi": r"(;|\||`|\$\(|&&)\s*(cat|id|whoami|wget|nc|curl|uname)\b",
}


def decoded(request: bytes) -> str:
    head = request.partition(b"\r\n\r\n")[0].decode("ascii")
    return unquote(unquote(head.replace("+", " "))).lower()


def test_web_exploits_are_shaped_like_benign_http(sessions):
    benign = [f for k, f in sessions.items() if f["label"] == "benign" and server_port(k) == 80]
    exploits = {kind: [f for f in sessions.values() if f["label"] == kind] for kind in WEB_ATTACKS}
    assert len(benign) > 50 and all(
        len(v) == trafficgen.WEB_EXPLOIT_SESSIONS for v in exploits.values()
    )

    def packets(flows):
        return np.array([len(f["pkts"]) for f in flows])

    def request_lengths(flows):
        return np.array([len(payloads(f, True)[0]) for f in flows])

    def ks(a, b) -> float:  # two-sample Kolmogorov-Smirnov statistic
        grid = np.union1d(a, b)
        cdf = [np.searchsorted(np.sort(x), grid, side="right") / len(x) for x in (a, b)]
        return float(np.abs(cdf[0] - cdf[1]).max())

    every = [f for v in exploits.values() for f in v]
    # packet counts: handshake, one request, 1..29 response packets, close, like benign
    for flows in [every, *exploits.values()]:
        n = packets(flows)
        assert n.min() >= packets(benign).min() and n.max() <= packets(benign).max()
        assert all(len(payloads(f, True)) == 1 for f in flows)
    assert ks(packets(every), packets(benign)) < 0.2
    # request lengths: fitted to the benign range (200..899 bytes), the same distribution
    sizes, benign_sizes = request_lengths(every), request_lengths(benign)
    assert benign_sizes.min() >= 190 and benign_sizes.max() < 900
    assert sizes.min() >= 190 and sizes.max() < 920
    assert ks(sizes, benign_sizes) < 0.2
    assert abs(np.median(sizes) / np.median(benign_sizes) - 1) < 0.15

    for kind, flows in exploits.items():
        texts = [decoded(payloads(f, True)[0]) for f in flows]
        hits = [bool(re.search(EXPLOIT[kind], t)) for t in texts]
        assert all(hits), [t[:120] for t, h in zip(texts, hits) if not h]
        assert len({t.split(" ")[1] for t in texts}) > len(texts) // 2  # not one fixed string
        for f in flows:  # the rest of the request is valid HTTP
            parse_http(payloads(f, True)[0], r"GET /\S* HTTP/1\.1")
    # some of each query-borne type are %-encoded, some are not
    for kind in ("web_sqli", "web_xss"):
        raw = [payloads(f, True)[0].split(b" ")[1] for f in exploits[kind]]
        assert any(b"%3C" in r or b"%27" in r for r in raw)
        assert any(b"<" in r or b"'" in r for r in raw)
    for f in benign:
        text = decoded(payloads(f, True)[0])
        assert not any(re.search(p, text) for p in EXPLOIT.values()), text[:200]


def test_payload_bytes_do_not_move_sizes_or_times(tmp_path, monkeypatch):
    """Another payload stream, the same capture shape: every packet's time, addresses and
    length are the same, except SMTP commands (as long as their text) and a few HTTP
    requests whose headers could not be fitted to the last byte."""
    shapes = []
    for stream in (1, 2):
        monkeypatch.setattr(trafficgen, "PAYLOAD_STREAM", stream)
        pcap = tmp_path / f"{stream}.pcap"
        generate(pcap, tmp_path / f"{stream}.csv", seed=4, scale=0.2)
        flows = read_sessions(pcap, tmp_path / f"{stream}.csv")
        shapes.append(flows)
    one, two = shapes
    assert one.keys() == two.keys()
    moved = 0
    for key, flow in one.items():
        a, b = flow["pkts"], two[key]["pkts"]
        assert [(t, c) for t, c, _, _ in a] == [(t, c) for t, c, _, _ in b]
        if server_port(key) in (25, 587):
            continue
        lengths = np.array([n for _, _, n, _ in a]) - np.array([n for _, _, n, _ in b])
        if server_port(key) == 80:
            moved += int(np.count_nonzero(lengths))
            assert np.abs(lengths).max() < trafficgen.httpbytes.COOKIE_MIN
        else:
            assert not lengths.any()
        if key[0] == 6 and any(p for *_, p in a):
            assert [p for *_, p in a] != [p for *_, p in b]  # other bytes, same shape
    assert moved <= 3
