"""Host context: window counts on crafted scans, checked by hand."""

from __future__ import annotations

import numpy as np
import pytest
from scapy.all import IP, TCP, Ether

from quietwire.agent.features.context import WINDOW_FEATURES
from quietwire.agent.features.schema import FEATURE_NAMES

from .conftest import meter_file, write_pcap

SCANNER, TARGET, OTHER = "10.9.9.9", "10.0.0.5", "10.0.0.6"


def syn(src, dst, sport, dport):
    return Ether() / IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags="S")


def rst(src, dst, sport, dport):
    return Ether() / IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags="RA")


def synack(src, dst, sport, dport):
    return Ether() / IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags="SA")


def feature(flows, name):
    return flows.features[:, FEATURE_NAMES.index(name)]


def test_port_scan_context(tmp_path):
    """30 ports probed 0.1 s apart: 20 closed (RST), 9 filtered (silence), 1 open (SYN-ACK).
    Then a second host probed at t=100 s, beyond the 60 s window of the first probes."""
    pkts, times = [], []
    for i in range(30):
        t = 0.1 * i
        pkts.append(syn(SCANNER, TARGET, 50000, 1 + i))
        times.append(t)
        if i < 20:
            pkts.append(rst(TARGET, SCANNER, 1 + i, 50000))
            times.append(t + 0.01)
        elif i == 29:
            pkts.append(synack(TARGET, SCANNER, 1 + i, 50000))
            times.append(t + 0.01)
    pkts.append(syn(SCANNER, OTHER, 50001, 22))
    times.append(100.0)
    flows = meter_file(write_pcap(tmp_path / "scan.pcap", pkts, times))
    assert len(flows) == 31
    r = flows.records
    # the last probe of the first sweep (port 30, answered): all 30 probes are in its window
    last = int(np.flatnonzero(r["dst_port"] == 30)[0])
    assert feature(flows, "src_host_flows")[last] == 30
    assert feature(flows, "src_host_distinct_dst_ports")[last] == 30
    assert feature(flows, "src_host_distinct_dst_hosts")[last] == 1
    assert feature(flows, "src_host_unanswered_share")[last] == np.float32(29 / 30)
    assert feature(flows, "dst_host_flows")[last] == 30
    assert feature(flows, "dst_host_distinct_src_hosts")[last] == 1
    # the first probe ended at 0.01 s: only itself had started by then
    first = int(np.flatnonzero(r["dst_port"] == 1)[0])
    assert feature(flows, "src_host_flows")[first] == 1
    assert feature(flows, "src_host_unanswered_share")[first] == 1.0
    # the late probe: the sweep started over 60 s earlier and is out of the window
    late = len(flows) - 1  # flows come in start order
    assert r["dst_port"][late] == 22
    assert feature(flows, "src_host_flows")[late] == 1
    assert feature(flows, "dst_host_flows")[late] == 1


def test_silent_probes_end_by_idle_timeout_with_their_window(tmp_path):
    """Filtered ports never answer: the flows end by idle timeout, and their context is
    still computed at their last packet, not at the time they were expired."""
    pkts = [syn(SCANNER, TARGET, 40000, p) for p in range(1, 11)]
    times = [float(i) for i in range(10)]
    pkts.append(syn(OTHER, TARGET, 40000, 80))
    times.append(500.0)  # far later: every probe has idled out by then
    flows = meter_file(write_pcap(tmp_path / "quiet.pcap", pkts, times))
    probes = flows.records["src_lo"] != flows.records["src_lo"][-1]
    counts = feature(flows, "src_host_flows")[probes]
    assert counts.tolist() == list(range(1, 11))
    assert (feature(flows, "src_host_unanswered_share")[probes] == 1.0).all()


def test_service_pair_series(tmp_path):
    """A beacon every 60 s to one server port, then one more after a 4,000 s silence (a new
    series); a person's three visits to another port; identical whatever the batching."""
    c2, web = "203.0.113.9", "10.0.0.80"
    pkts, times = [], []
    for i, t in enumerate([0.0, 60.0, 120.0, 180.0, 240.0, 4240.0]):
        pkts.append(syn(TARGET, c2, 40000 + i, 443))
        times.append(t)
    for i, t in enumerate([5.0, 15.0, 105.0]):
        pkts.append(syn(TARGET, web, 41000 + i, 80))
        times.append(t)
    order = np.argsort(times, kind="stable")
    path = write_pcap(tmp_path / "beacon.pcap", [pkts[i] for i in order], sorted(times))
    flows = meter_file(path)
    r = flows.records
    beacon = r["dst_port"] == 443
    assert feature(flows, "pair_prior_flows")[beacon].tolist() == [0, 1, 2, 3, 4, 0]
    np.testing.assert_array_equal(
        feature(flows, "pair_gap_mean_s")[beacon], [np.nan, 60, 60, 60, 60, np.nan]
    )
    np.testing.assert_array_equal(
        feature(flows, "pair_gap_cv")[beacon], [np.nan, np.nan, 0, 0, 0, np.nan]
    )
    visits = r["dst_port"] == 80
    assert feature(flows, "pair_prior_flows")[visits].tolist() == [0, 1, 2]
    # gaps 10 s and 90 s: mean 50, population sd 40
    np.testing.assert_allclose(feature(flows, "pair_gap_mean_s")[visits], [np.nan, 10, 50])
    np.testing.assert_allclose(feature(flows, "pair_gap_cv")[visits], [np.nan, np.nan, 0.8])
    small = meter_file(path, chunk_bytes=64)
    np.testing.assert_array_equal(small.features, flows.features)


def test_series_state_is_bounded(tmp_path):
    """400 clients, one flow each to one server: the pair table keeps at most max_series
    pairs, and an ended flow's series values are not kept."""
    from quietwire.agent.capture.pcap import read_capture
    from quietwire.agent.features.context import ContextConfig
    from quietwire.agent.features.meter import FlowMeter

    pkts = [syn(f"10.1.{i // 200}.{i % 200 + 1}", TARGET, 40000, 443) for i in range(400)]
    path = write_pcap(tmp_path / "many.pcap", pkts, [i * 0.01 for i in range(400)])
    meter = FlowMeter(context_config=ContextConfig(max_series=50), seed=1)
    ended = 0
    for batch in read_capture(path, chunk_bytes=2000):
        ended += len(meter.add(batch))
        assert meter.context.sizes()["pairs"] <= 50
    ended += len(meter.flush())
    assert ended == 400
    assert meter.context.sizes()["open"] == 0


def test_flows_left_overdue_keep_their_window():
    """5,000 probes time out together and one expiry ends only 4,096 of them: the starts the
    other 904 count must outlive that expiry's pruning, so each probe still counts every
    probe started up to it (all within the 60 s window)."""
    from quietwire.agent.features.meter import FlowMeter
    from quietwire.agent.flow.table import FlowConfig

    from .test_flows import tcp_batch

    rows = [(0.001 * i, SCANNER, TARGET, 50000, 1 + i, 0x02) for i in range(5000)]
    meter = FlowMeter(FlowConfig(max_flows=10_000), seed=1)
    assert len(meter.add(tcp_batch(rows))) == 0
    first = meter.expire(int(200e9))
    assert len(first) == 4096 and meter.table.expiry_backlog == 904
    rest = meter.expire(int(201e9))
    assert len(rest) == 904 and meter.table.expiry_backlog == 0
    for flows in (first, rest):
        probe = flows.records["dst_port"] - 1  # probe i went to port i + 1
        np.testing.assert_array_equal(feature(flows, "src_host_flows"), probe + 1)


def test_start_log_is_bounded():
    from quietwire.agent.features.context import ContextConfig
    from quietwire.agent.features.meter import FlowMeter

    from .test_flows import tcp_batch

    meter = FlowMeter(context_config=ContextConfig(max_records=100), seed=1)
    for lo in range(0, 400, 50):
        rows = [(0.01 * i, SCANNER, TARGET, 50000, 1 + i, 0x02) for i in range(lo, lo + 50)]
        meter.add(tcp_batch(rows))
        assert meter.context.sizes()["starts"] <= 100
    assert len(meter.flush()) == 400


@pytest.mark.parametrize("name", ["icmp-tunnel.pcap", "http_ua_splitted_in_two_pkts.pcapng"])
def test_time_passing_between_batches_changes_nothing(ndpi, name):
    """The live daemon ends timed-out flows between batches (expire): when that empties the
    host window's log, a later answer or end must not index into it (it did: IndexError), and
    the flows and features are those of metering the file in one go."""
    from quietwire.agent.capture.pcap import read_capture
    from quietwire.agent.features.meter import FlowMeter
    from quietwire.agent.flow.records import INTERIM, FlowRecords

    path = ndpi / "pcap" / name
    meter = FlowMeter(seed=1)
    parts = []
    for batch in read_capture(path, chunk_bytes=1 << 16):
        parts.append(meter.add(batch))
        if len(batch):
            parts.append(meter.expire(int(batch.ts_ns[-1])))
    parts.append(meter.flush())
    records = FlowRecords.concat([p.records for p in parts])
    features = np.concatenate([p.features for p in parts])
    order = np.argsort(records["seq"], kind="stable")
    features = features[order[records["end_reason"][order] != INTERIM]]  # ended flows
    reference = meter_file(path)
    assert len(features) == len(reference.features)
    np.testing.assert_array_equal(features, reference.features)


def _brute_force_windows(records, window_s=60.0):
    """The six window features by their definition, one flow at a time: over the flows whose
    start lies in (t - window, t], t the flow's last packet (nothing pruned: small captures)."""
    from quietwire.agent.flow.table import host_hash

    src = host_hash(records["src_hi"], records["src_lo"])
    dst = host_hash(records["dst_hi"], records["dst_lo"])
    port = records["dst_port"].astype(np.int64) | records["proto"].astype(np.int64) << 16
    start = records["first_ns"] // 1000
    answered = records["answered_ns"] // 1000
    out = np.zeros((len(records), 6), np.float32)
    w = int(window_s * 1e6)
    for i in range(len(records)):
        t = records["last_ns"][i] // 1000
        inw = (start > t - w) & (start <= t)
        mine = inw & (src == src[i])
        n = int(mine.sum())
        unanswered = int((mine & ~((answered <= t) & (answered >= 0))).sum())
        theirs = inw & (dst == dst[i])
        out[i] = (
            n,
            len(set(dst[mine])),
            len(set(port[mine])),
            unanswered / n if n else 0.0,
            int(theirs.sum()),
            len(set(src[theirs])),
        )
    return out


def _meter_probes(path, monkeypatch=None):
    from quietwire.agent.capture.pcap import read_capture
    from quietwire.agent.features.context import HostContext
    from quietwire.agent.features.meter import FlowMeter
    from quietwire.agent.flow.records import INTERIM, FlowRecords

    if monkeypatch:  # the reference: every query sorts for the next starts
        monkeypatch.setattr(HostContext, "_links_hold", lambda self: False)
    meter = FlowMeter(seed=1)
    parts = [meter.add(b) for b in read_capture(path, chunk_bytes=1 << 10)]
    parts.append(meter.flush())
    records = FlowRecords.concat([p.records for p in parts])
    features = np.concatenate([p.features for p in parts])
    ended = records["end_reason"] != INTERIM
    return records.take(np.flatnonzero(ended)), features[ended]


# the order _brute_force_windows computes them in
WINDOW_COLUMNS = [FEATURE_NAMES.index(n) for n in WINDOW_FEATURES]


@pytest.mark.parametrize("step_back", [False, True])
def test_window_counts_across_batches(tmp_path, monkeypatch, step_back):
    """Probes of two scanners to a few hosts and ports, pairs repeated, metered in many small
    batches. In time order the window counts are those of the definition, and the "next
    start of the pair" linked as starts are logged gives what sorting the log gives. When the
    capture's clock steps back (probes 60-89 stamped 200 s early: starts linked to earlier
    ones, which are pruned while the later ones still count, so the log is in start order
    again), the counts are still those of sorting."""
    rng = np.random.default_rng(7)
    pkts, times = [], []
    for i in range(120):
        t = 250 + 0.5 * i - (200 if step_back and 60 <= i < 90 else 0)
        dst = f"10.0.0.{rng.integers(1, 5)}"
        dport = int(rng.choice([22, 80, 443, 8080]))
        src, sport = (SCANNER if i % 3 else OTHER), 40000 + i
        pkts.append(syn(src, dst, sport, dport))
        times.append(t)
        if i % 4 == 0:
            pkts.append(rst(dst, src, dport, sport))
            times.append(t + 0.01)
    path = write_pcap(tmp_path / "probes.pcap", pkts, times)
    records, features = _meter_probes(path)
    _, sorted_features = _meter_probes(path, monkeypatch)
    np.testing.assert_array_equal(features, sorted_features)
    if not step_back:
        expected = _brute_force_windows(records)
        np.testing.assert_allclose(features[:, WINDOW_COLUMNS], expected, rtol=1e-6)


def test_host_order_finds_the_logged_starts_of_queried_hosts():
    """The host order kept as starts are logged and pruned finds, for queried hosts, the
    same rows as scanning the whole log: batches of a few repeated hosts, rows pruned from
    the front and from the middle, candidates a mask."""
    from quietwire.agent.features.context import _HostOrder

    rng = np.random.default_rng(3)
    order, log = _HostOrder(), np.zeros(0, np.uint64)
    for _ in range(12):
        hosts = rng.integers(1, 9, rng.integers(0, 40)).astype(np.uint64) * np.uint64(2**61)
        order.log(hosts, len(log))
        log = np.concatenate([log, hosts])
        keep = rng.random(len(log)) > 0.2
        keep[: len(log) // 4] = False
        order.keep(keep)
        log = log[keep]
        candidates = rng.random(len(log)) > 0.3
        queried = rng.choice(np.arange(0, 10, dtype=np.uint64) * np.uint64(2**61), 7)
        rows, group, q_group = order.groups(candidates, queried)
        expected = np.flatnonzero(candidates & np.isin(log, queried))
        np.testing.assert_array_equal(np.sort(rows), expected)
        distinct = np.unique(queried)
        np.testing.assert_array_equal(distinct[group], log[rows])
        np.testing.assert_array_equal(distinct[q_group], queried)
