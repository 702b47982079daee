"""Flow table: hand-computed statistics on crafted packets, expiry rules, batch independence,
bounded memory, and agreement with nDPI's and nfstream's flow tables on real captures."""

from __future__ import annotations

import collections
import ipaddress

import numpy as np
import pytest
from scapy.all import IP, TCP, UDP, Ether, RandIP

from quietwire.agent.flowfile import identity_columns
from quietwire.agent.flowrecords import END_REASONS
from quietwire.agent.flows import FlowConfig, FlowTable

from .conftest import meter_file, write_pcap
from .ndpi_results import ndpi_flows

C, S = "10.0.0.1", "10.0.0.2"


def tcp(src, dst, sport, dport, flags, payload=b""):
    return Ether() / IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags) / payload


def session(sport=40000):
    """A TCP connection: handshake, request, response, FIN close from both sides."""
    return [
        tcp(C, S, sport, 80, "S"),
        tcp(S, C, 80, sport, "SA"),
        tcp(C, S, sport, 80, "A"),
        tcp(C, S, sport, 80, "PA", b"x" * 100),
        tcp(S, C, 80, sport, "PA", b"y" * 300),
        tcp(C, S, sport, 80, "FA"),
        tcp(S, C, 80, sport, "FA"),
        tcp(C, S, sport, 80, "A"),
    ]


def test_tcp_session_statistics_by_hand(tmp_path):
    times = [0.0, 0.010, 0.020, 0.030, 0.080, 0.100, 0.110, 0.111]
    flows = meter_file(write_pcap(tmp_path / "s.pcap", session(), times))
    assert len(flows) == 1
    r = flows.records
    # client 10.0.0.1 (first packet's sender): 5 packets; server: 3
    assert r["packets"][0].tolist() == [5, 3]
    ip_c2s = [40, 40, 140, 40, 40]  # IP lengths: 20 IP + 20 TCP (+ payload)
    ip_s2c = [40, 340, 40]
    assert r["ip_bytes"][0].tolist() == [sum(ip_c2s), sum(ip_s2c)]
    assert r["bytes"][0].tolist() == [sum(ip_c2s) + 5 * 14, sum(ip_s2c) + 3 * 14]
    assert r["payload_bytes"][0].tolist() == [100, 300]
    assert r["payload_packets"][0].tolist() == [1, 1]
    assert r["syn_packets"][0].tolist() == [1, 1]
    assert r["fin_packets"][0].tolist() == [1, 1]
    assert r["ack_packets"][0].tolist() == [4, 3]
    assert END_REASONS[r["end_reason"][0]] == "tcp_end"
    ident = identity_columns(r)
    assert (
        ident["src_ip"][0],
        ident["src_port"][0],
        ident["dest_ip"][0],
        ident["dest_port"][0],
    ) == (C, 40000, S, 80)
    from quietwire.agent.features import FEATURE_NAMES

    f = dict(zip(FEATURE_NAMES, flows.features[0].tolist()))
    assert f["duration_s"] == pytest.approx(0.111, abs=1e-6)
    assert f["src2dst_pkt_len_mean"] == pytest.approx(np.mean(ip_c2s))
    assert f["src2dst_pkt_len_std"] == pytest.approx(np.std(ip_c2s), rel=1e-5)
    assert f["dst2src_pkt_len_max"] == 340
    c2s_t = [0.0, 0.020, 0.030, 0.100, 0.111]
    assert f["src2dst_iat_mean_s"] == pytest.approx(np.mean(np.diff(c2s_t)), rel=1e-5)
    assert f["src2dst_iat_max_s"] == pytest.approx(0.070, rel=1e-5)
    assert f["bidirectional_iat_min_s"] == pytest.approx(0.001, rel=1e-3)
    assert f["bidirectional_iat_std_s"] == pytest.approx(np.std(np.diff(times)), rel=1e-4)
    assert f["dst2src_init_window"] == 8192  # scapy's default window
    assert f["tcp_answered"] == 1.0 and f["tcp_reset"] == 0.0
    assert f["src2dst_payload_ratio"] == pytest.approx(100 / sum(ip_c2s))


def test_udp_flow_has_nan_tcp_features(tmp_path):
    pkts = [Ether() / IP(src=C, dst=S) / UDP(sport=5000, dport=53) / (b"q" * 20)]
    flows = meter_file(write_pcap(tmp_path / "u.pcap", pkts, [1.0]))
    from quietwire.agent.features import FEATURE_NAMES, SCHEMA

    f = dict(zip(FEATURE_NAMES, flows.features[0].tolist()))
    assert np.isnan(f["src2dst_syn_packets"]) and np.isnan(f["src2dst_init_window"])
    assert np.isnan(f["src2dst_iat_mean_s"])  # one packet: no inter-arrival time
    assert np.isnan(f["dst2src_pkt_len_mean"])  # nothing came back
    assert f["proto_udp"] == 1.0 and f["src2dst_bytes"] == 48
    nullable = {x.name for x in SCHEMA if x.nullable}
    assert {n for n, v in f.items() if np.isnan(v)} <= nullable


def test_idle_timeout_splits_and_reasons(tmp_path):
    pkts = [Ether() / IP(src=C, dst=S) / UDP(sport=5000, dport=53) for _ in range(3)]
    flows = meter_file(write_pcap(tmp_path / "i.pcap", pkts, [0.0, 1.0, 200.0]))
    assert flows.records["packets"][:, 0].tolist() == [2, 1]
    assert [END_REASONS[x] for x in flows.records["end_reason"]] == ["idle_timeout", "end_of_input"]
    flows = meter_file(tmp_path / "i.pcap", idle_timeout_s=500.0)
    assert len(flows) == 1


def test_active_timeout(tmp_path):
    pkts = [Ether() / IP(src=C, dst=S) / UDP(sport=5000, dport=53) for _ in range(6)]
    flows = meter_file(
        write_pcap(tmp_path / "a.pcap", pkts, [0, 10, 20, 30, 40, 50]), active_timeout_s=25.0
    )
    assert flows.records["packets"][:, 0].tolist() == [3, 3]
    assert END_REASONS[flows.records["end_reason"][0]] == "active_timeout"


def test_tcp_close_keeps_last_ack_and_new_syn_starts_a_flow(tmp_path):
    pkts = session() + [tcp(C, S, 40000, 80, "S"), tcp(S, C, 80, 40000, "RA")]
    times = [0.0, 0.01, 0.02, 0.03, 0.08, 0.10, 0.11, 0.111, 0.5, 0.51]
    flows = meter_file(write_pcap(tmp_path / "c.pcap", pkts, times))
    r = flows.records
    assert r["packets"].tolist() == [[5, 3], [1, 1]]  # the final ACK stayed with its flow
    assert [END_REASONS[x] for x in r["end_reason"]] == ["tcp_end", "tcp_end"]


@pytest.mark.parametrize("chunk", [64, 300, 1000])
def test_results_do_not_depend_on_batching(tmp_path, chunk):
    rng = np.random.default_rng(3)
    pkts, times = [], []
    for k in range(20):
        t0 = rng.uniform(0, 300)
        for j, p in enumerate(session(41000 + k % 5)):
            pkts.append(p)
            times.append(t0 + j * rng.uniform(0.001, 0.05))
    order = np.argsort(times, kind="stable")
    path = write_pcap(tmp_path / "m.pcap", [pkts[i] for i in order], sorted(times))
    whole = meter_file(path)
    parts = meter_file(path, chunk_bytes=chunk)
    assert len(whole) == len(parts) >= 20
    for name in (
        "packets",
        "bytes",
        "first_ns",
        "last_ns",
        "fin_packets",
        "dir_iat_max",
        "iat_min",
        "end_reason",
        "init_window",
        "answered_ns",
    ):
        np.testing.assert_array_equal(whole.records[name], parts.records[name], err_msg=name)
    np.testing.assert_allclose(whole.records["dir_iat_sum"], parts.records["dir_iat_sum"])
    np.testing.assert_allclose(whole.features, parts.features, rtol=1e-6, equal_nan=True)


def test_syn_flood_memory_is_bounded(tmp_path):
    """Random sources, one SYN each: the table never holds more than max_flows (+ one batch)."""
    pkts = [tcp(str(RandIP()), S, 1234, 80, "S") for _ in range(3000)]
    path = write_pcap(tmp_path / "f.pcap", pkts, list(np.linspace(0, 3, 3000)))
    from quietwire.agent.capture import read_capture
    from quietwire.agent.meter import FlowMeter

    meter = FlowMeter(FlowConfig(max_flows=500), seed=1)
    peak = 0
    ended = 0
    for batch in read_capture(path, chunk_bytes=8000):
        ended += len(meter.add(batch))
        peak = max(peak, len(meter.table))
    ended += len(meter.flush())
    assert peak <= 500
    assert meter.table.evicted >= 2500
    assert ended == 3000  # evicted flows are still reported, never lost


def _our_counts(path):
    flows = meter_file(path)
    r = flows.records
    ident = identity_columns(r)
    agg = collections.defaultdict(lambda: [0, 0, 0, 0])
    for i, proto in enumerate(ident["proto"]):
        if proto not in ("TCP", "UDP"):
            continue
        key = (
            proto,
            ipaddress.ip_address(ident["src_ip"][i]),
            ident["src_port"][i],
            ipaddress.ip_address(ident["dest_ip"][i]),
            ident["dest_port"][i],
        )
        v = agg[key]
        v[0] += int(r["packets"][i, 0])
        v[1] += int(r["bytes"][i, 0])
        v[2] += int(r["packets"][i, 1])
        v[3] += int(r["bytes"][i, 1])
    return agg


def test_agrees_with_ndpi_flow_tables(ndpi):
    """Per-flow packets and bytes in each direction equal nDPI's for >= 95% of its TCP/UDP
    flows. Our flows are summed per 5-tuple, since nDPI's reader keeps one flow per 5-tuple
    where our idle timeout splits. The rest: tunnels nDPI opens (GTP, GRE, IP-in-IP, CAPWAP,
    VXLAN) and we do not, IP fragments it does not count, packets after a TCP close."""
    total = agree = 0
    worst = []
    from quietwire.agent.capture import CaptureError

    for result in sorted((ndpi / "result").glob("*.out")):
        expected = ndpi_flows(result)
        if not expected:
            continue
        try:
            ours = _our_counts(ndpi / "pcap" / result.name[:-4])
        except CaptureError:
            continue
        ok = 0
        for proto, a, pa, b, pb, p1, b1, p2, b2 in expected:
            fwd, rev = ours.get((proto, a, pa, b, pb)), ours.get((proto, b, pb, a, pa))
            ok += fwd == [p1, b1, p2, b2] or rev == [p2, b2, p1, b1]
        total += len(expected)
        agree += ok
        worst.append((ok / len(expected), result.name))
    share = agree / total
    print(f"nDPI agreement: {agree}/{total} flows = {share:.4f}; worst: {sorted(worst)[:5]}")
    assert total > 8000
    assert share >= 0.95


def test_flow_counts_match_nfstream(ndpi):
    """Same idle/active timeouts as nfstream's defaults: the same flows and packets."""
    nfstream = pytest.importorskip("nfstream")
    names = [
        "1kxun.pcap",
        "android.pcap",
        "synscan.pcap",
        "dns-tunnel-iodine.pcap",
        "telnet.pcap",
        "netflix.pcap",
        "ssh.pcap",
        "quic.pcap",
        "emotet.pcap",
        "bittorrent.pcap",
        "dropbox.pcap",
        "ftp.pcap",
    ]
    for name in names:
        path = ndpi / "pcap" / name
        theirs = nfstream.NFStreamer(
            source=str(path),
            statistical_analysis=True,
            n_meters=1,
            n_dissections=0,
            decode_tunnels=False,
        ).to_pandas()
        ours = meter_file(path)
        assert len(ours) == len(theirs), name
        assert int(ours.records["packets"].sum()) == int(theirs.bidirectional_packets.sum()), name
        assert int(ours.records["bytes"].sum()) == int(theirs.bidirectional_bytes.sum()), name


def test_table_snapshot_and_flush_are_consistent(tmp_path):
    from quietwire.agent.capture import read_capture
    from quietwire.agent.decode import Decoder

    path = write_pcap(tmp_path / "s.pcap", session(), [0, 1, 2, 3, 4, 5, 6, 7])
    table = FlowTable(seed=5)
    dec = Decoder()
    for batch in read_capture(path):
        table.add(dec.decode(batch)[0])
    assert len(table) == 1 and len(table.open_flows()) == 1
    assert len(table.flush()) == 1 and len(table) == 0
