"""Flow labels from what the tools were told to do, followed on the wire.

An event's packets are those its actor sent to its targets during the event: the actor is known
by its MAC address on the LAN (so forged source addresses still follow the tool that forged
them) and, for a host outside, by the router's MAC and its own address. Relayed legs (the
resolver forwarding a DNS tunnel's queries) are taken by address. A flow takes the label of the
events whose packets it carries; a flow carrying packets of an attack and of something else is
``mixed`` and flagged, never guessed. Flows of no event are the network's own background
(resolver, domain controller housekeeping): benign.
"""

from __future__ import annotations

import csv
import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quietwire.agent.capture.pcap import read_capture
from quietwire.agent.features.meter import FlowMeter
from quietwire.agent.features.schema import FEATURE_NAMES, MeteredFlows
from quietwire.agent.flow.identity import PROTO_NAMES, format_ips, iso_times
from quietwire.agent.flow.records import FlowRecords, empty_records
from quietwire.trainer.lab.topology import ROUTER_LAN, ROUTER_LAN_MAC

BEFORE_S, AFTER_S = 1.0, 3.0  # an event's window around its process's start and end
BENIGN, MIXED = "benign", "mixed"


@dataclass(frozen=True)
class WirePackets:
    """The IPv4-over-Ethernet packets of a capture, one array per field."""

    ts_ns: np.ndarray
    src_mac: np.ndarray  # uint64 (48 bits)
    src_ip: np.ndarray  # uint32
    dst_ip: np.ndarray
    key: np.ndarray  # (n, 3) uint64: the flow's canonical key (see canonical_keys)


def _mac(text: str) -> int:
    return int(text.replace(":", ""), 16)


def _ip(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


def canonical_keys(proto, ip_a, port_a, ip_b, port_b) -> np.ndarray:
    """(proto, lower endpoint, higher endpoint), each endpoint ip << 16 | port; ICMP without
    ports, so a flow and its packets agree whatever the flow table makes of ICMP ids."""
    proto = proto.astype(np.uint64)
    portless = ~np.isin(proto, (6, 17, 132))
    pa = np.where(portless, 0, port_a).astype(np.uint64)
    pb = np.where(portless, 0, port_b).astype(np.uint64)
    a = ip_a.astype(np.uint64) << np.uint64(16) | pa
    b = ip_b.astype(np.uint64) << np.uint64(16) | pb
    return np.stack([proto, np.minimum(a, b), np.maximum(a, b)], axis=1)


def _big_endian(data: np.ndarray, at: np.ndarray, n: int) -> np.ndarray:
    v = np.zeros(len(at), dtype=np.uint64)
    for i in range(n):
        v = v << np.uint64(8) | data[at + i].astype(np.uint64)
    return v


def wire_packets(pcap: Path) -> WirePackets:
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("ts", "mac", "src", "dst", "key")}
    for batch in read_capture(pcap):
        d, off = batch.data, batch.offset
        eth = (batch.linktype == 1) & (batch.caplen >= 34)
        ethertype = d[off + 12].astype(np.int64) << 8 | d[off + 13]
        ok = eth & (ethertype == 0x0800)
        off = off[ok]
        ip0 = off + 14
        ihl = (d[ip0] & 15).astype(np.int64) * 4
        proto = d[ip0 + 9]
        frag = (d[ip0 + 6].astype(np.int64) & 0x1F) << 8 | d[ip0 + 7]

        src, dst = _big_endian(d, ip0 + 12, 4), _big_endian(d, ip0 + 16, 4)
        l4 = ip0 + ihl
        has_ports = np.isin(proto, (6, 17, 132)) & (frag == 0)
        sport = np.where(has_ports, _big_endian(d, l4, 2), 0)
        dport = np.where(has_ports, _big_endian(d, l4 + 2, 2), 0)
        cols["ts"].append(batch.ts_ns[ok])
        cols["mac"].append(_big_endian(d, off + 6, 6))
        cols["src"].append(src)
        cols["dst"].append(dst)
        cols["key"].append(canonical_keys(proto, src, sport, dst, dport))
    cat = {k: np.concatenate(v) if v else np.zeros(0, np.uint64) for k, v in cols.items()}
    key = cat["key"] if len(cols["key"]) else np.zeros((0, 3), np.uint64)
    return WirePackets(cat["ts"].astype(np.int64), cat["mac"], cat["src"], cat["dst"], key)


def _in_targets(ip: np.ndarray, targets: list[str]) -> np.ndarray:
    hit = np.zeros(len(ip), dtype=bool)
    for t in targets:
        if "-" in t.rsplit(".", 1)[-1]:  # a.b.c.d-e
            base, last = t.rsplit(".", 1)
            lo_s, hi_s = last.split("-")
            lo, hi = _ip(f"{base}.{lo_s}"), _ip(f"{base}.{hi_s}")
        else:
            net = ipaddress.IPv4Network(t)  # host bits set: an error, not a wider net
            lo, hi = int(net.network_address), int(net.broadcast_address)
        hit |= (ip >= lo) & (ip <= hi)
    return hit


def windows(events: list[dict]) -> dict[int, tuple[int, int]]:
    """Each event's window in ns: its process's run widened by BEFORE_S and AFTER_S, but never
    into the actor's previous or next event (one host's events run one after another)."""
    out = {}
    by_actor: dict[str, list[dict]] = {}
    for ev in sorted(events, key=lambda e: e["start"]):
        by_actor.setdefault(ev["actor"]["name"], []).append(ev)
    for evs in by_actor.values():
        for i, ev in enumerate(evs):
            lo = ev["start"] - BEFORE_S
            hi = ev["end"] + AFTER_S
            # clipped at the neighbours' own runs; events that overlap (which the runner
            # never makes) keep their windows, so what both claim comes out mixed
            if i and evs[i - 1]["end"] <= ev["start"]:
                lo = max(lo, evs[i - 1]["end"])
            if i + 1 < len(evs) and ev["end"] <= evs[i + 1]["start"]:
                hi = min(hi, evs[i + 1]["start"])
            out[ev["id"]] = (int(lo * 1e9), int(hi * 1e9))
    return out


def event_packets(wire: WirePackets, event: dict, window: tuple[int, int]) -> np.ndarray:
    """The mask of the event's packets: its actor's, to its targets, in its window; and the
    relayed legs it caused."""
    lo, hi = window
    when = (wire.ts_ns >= lo) & (wire.ts_ns <= hi)
    actor = event["actor"]
    if actor["ip"].startswith(ROUTER_LAN.rsplit(".", 1)[0] + "."):
        who = wire.src_mac == _mac(actor["mac"])
    else:  # outside: through the router, by its own address
        who = (wire.src_mac == _mac(ROUTER_LAN_MAC)) & (wire.src_ip == _ip(actor["ip"]))
    mask = when & who & _in_targets(wire.dst_ip, event["targets"])
    for frm, to in event.get("relays", []):
        mask |= when & (wire.src_ip == _ip(frm)) & (wire.dst_ip == _ip(to))
    return mask


@dataclass(frozen=True)
class Labelled:
    flows: MeteredFlows
    labels: np.ndarray  # str: attack kind, "benign" or "mixed"
    event: np.ndarray  # int: the event a flow belongs to (-1: background or mixed)
    packets_per_event: dict[int, int]


def read_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def meter(pcap: Path) -> MeteredFlows:
    m = FlowMeter(seed=1)
    parts = [m.add(b) for b in read_capture(pcap)]
    parts += list(m.drain())
    parts = [p for p in parts if len(p)]
    if not parts:
        return MeteredFlows(empty_records(), np.zeros((0, len(FEATURE_NAMES)), np.float32))
    return MeteredFlows(
        FlowRecords.concat([p.records for p in parts]),
        np.concatenate([p.features for p in parts]),
    )


def label_run(run_dir: Path) -> Labelled:
    events = read_events(run_dir / "events.jsonl")
    wire = wire_packets(run_dir / "capture.pcap")
    flows = meter(run_dir / "capture.pcap")
    r = flows.records
    fkey = record_keys(r)[:, :3]
    n = len(r)
    labels = np.full(n, BENIGN, dtype=object)
    event_of = np.full(n, -1, dtype=np.int64)
    kinds: list[set] = [set() for _ in range(n)]
    owners: list[set] = [set() for _ in range(n)]
    packets = {}
    order = {tuple(k): [] for k in fkey.tolist()}
    for i, k in enumerate(fkey.tolist()):
        order[tuple(k)].append(i)
    spans = windows(events)
    for ev in events:
        lo, hi = spans[ev["id"]]
        mask = event_packets(wire, ev, (lo, hi))
        packets[ev["id"]] = int(mask.sum())
        for k in {tuple(x) for x in wire.key[mask].tolist()}:
            for i in order.get(k, ()):
                if int(r["first_ns"][i]) <= hi and int(r["last_ns"][i]) >= lo:
                    kinds[i].add(ev["kind"])
                    owners[i].add(ev["id"])
    for i in range(n):
        if not kinds[i]:
            continue
        attack = kinds[i] - {BENIGN}
        if len(kinds[i]) == 1:
            labels[i] = next(iter(kinds[i]))
            event_of[i] = min(owners[i])
        elif attack:
            labels[i] = MIXED
    return Labelled(flows, labels.astype(str), event_of, packets)


def write_labels(labelled: Labelled, path: Path) -> None:
    """One row per flow record (interim records included), in the meter's order."""
    r = labelled.flows.records
    ver = r["ip_version"]
    columns = {
        "flow_id": r["seq"].tolist(),
        "start": iso_times(r["first_ns"]),
        "end": iso_times(r["last_ns"]),
        "src_ip": format_ips(ver, r["src_hi"], r["src_lo"]),
        "src_port": r["src_port"].tolist(),
        "dest_ip": format_ips(ver, r["dst_hi"], r["dst_lo"]),
        "dest_port": r["dst_port"].tolist(),
        "proto": [PROTO_NAMES.get(p, str(p)) for p in r["proto"].tolist()],
        "label": labelled.labels.tolist(),
        "event": labelled.event.tolist(),
    }
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        w.writerows(zip(*columns.values()))


def record_keys(records: FlowRecords) -> np.ndarray:
    """Each record's canonical key (see canonical_keys) and first packet time, (n, 4)."""

    def v4(lo: np.ndarray) -> np.ndarray:
        return (lo & np.uint64(0xFFFFFFFF)).astype(np.uint64)

    key = canonical_keys(
        records["proto"],
        v4(records["src_lo"]),
        records["src_port"],
        v4(records["dst_lo"]),
        records["dst_port"],
    )
    return np.column_stack([key, records["first_ns"].astype(np.uint64)])


def labeller(labelled: Labelled):
    """A function giving the label of any record of the same capture metered again (another
    batching, interim records at other times): by its flow's key and first packet, then by
    key alone; a record of no labelled flow is background, benign."""
    keys = record_keys(labelled.flows.records).tolist()
    exact = {tuple(k): lab for k, lab in zip(keys, labelled.labels.tolist())}
    loose = {tuple(k[:3]): lab for k, lab in zip(keys, labelled.labels.tolist())}

    def label_of(records: FlowRecords) -> list[str]:
        return [
            exact.get(tuple(k), loose.get(tuple(k[:3]), BENIGN))
            for k in record_keys(records).tolist()
        ]

    return label_of
