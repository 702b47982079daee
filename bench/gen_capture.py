"""Write a synthetic Ethernet/IPv4 pcap of N packets quickly (numpy, no per-packet Python).

Two shapes, both seeded (a size always gives the same file):

- ``generate``: TCP sessions (handshake, data both ways, FIN close from both sides) and UDP
  exchanges between random hosts, interleaved in time at about 5,000 packets/s, so a capture of
  a million packets spans 200 s: longer than the idle timeout, which lets the flow table reach
  its steady state.
- ``generate_open``: exactly ``open_flows`` flows, every one open from the first second to the
  last: N packets dealt round-robin (each round every flow sends one packet, in a shuffled
  order), the whole capture inside ``span_s`` (100 s, under the 120 s idle timeout), TCP
  sessions left open (SYN, SYN/ACK, ACK, data) and UDP exchanges. The flow table holds all of
  them at the end; 1,000,000 packets with 20,000 open flows are 50 packets per flow.
- ``generate_waves``: ``total_flows`` flows in waves of ``open_flows``, each wave shaped as
  ``generate_open`` (its share of the packets, round-robin over ``span_s``) and starting
  ``gap_s`` (130 s, past the idle timeout) after the previous one ended, so its flows have
  ended before the next wave starts. For a given total, every count open at once gives the
  same flows, packets per flow and flow durations; only how many are open together differs
  (one wave is ``generate_open``'s file).

    python bench/gen_capture.py OUT.pcap --packets 1000000
    python bench/gen_capture.py OUT.pcap --packets 1000000 --open-flows 200000
    python bench/gen_capture.py OUT.pcap --packets 1000000 --open-flows 20000 --total-flows 200000
"""

from __future__ import annotations

import argparse
import struct
from pathlib import Path

import numpy as np

BASE_SECONDS = 1_700_000_000


def generate(
    path: Path, packets: int, seed: int = 7, mean_flow_packets: int = 20, rate_pps: float = 5000
) -> int:
    """Write the capture; return the number of packets written."""
    rng = np.random.default_rng(seed)
    n_flows = max(1, packets // mean_flow_packets)
    sizes = rng.geometric(1 / mean_flow_packets, n_flows) + 6
    sizes = sizes[np.cumsum(sizes) <= packets]
    if sizes.sum() < packets:
        sizes = np.r_[sizes, packets - sizes.sum()]
    n_flows = len(sizes)
    n = int(sizes.sum())
    flow = np.repeat(np.arange(n_flows), sizes)
    first = np.r_[0, np.cumsum(sizes)[:-1]]
    pos = np.arange(n) - first[flow]  # index of the packet within its flow
    left = sizes[flow] - 1 - pos  # packets still to come in the flow

    hosts = _hosts(rng, n_flows)
    start = np.sort(rng.uniform(0, n / rate_pps, n_flows))
    gaps = rng.exponential(0.02, n)
    gaps[first] = 0
    ts = start[flow] + np.cumsum(gaps) - np.repeat(np.cumsum(gaps)[first], sizes)
    order = np.argsort(ts, kind="stable")
    _write(path, rng, ts[order], flow[order], pos[order], left[order], hosts, True, order)
    return n


def generate_open(
    path: Path, packets: int, open_flows: int, seed: int = 7, span_s: float = 100.0
) -> int:
    """Write ``packets`` packets of ``open_flows`` flows that are all open at once (see the
    module docstring); return the number of packets written."""
    rng = np.random.default_rng(seed)
    n_flows = min(open_flows, packets)
    flow, pos, left = _round_robin(rng, packets, n_flows)
    ts = np.arange(packets) * (span_s / packets)
    _write(path, rng, ts, flow, pos, left, _hosts(rng, n_flows), False, np.arange(packets))
    return packets


def generate_waves(
    path: Path,
    packets: int,
    open_flows: int,
    total_flows: int,
    seed: int = 7,
    span_s: float = 100.0,
    gap_s: float = 130.0,
) -> int:
    """Write ``packets`` packets of ``total_flows`` flows, ``open_flows`` of them open at once
    (see the module docstring); return the number of packets written."""
    if total_flows % open_flows or packets % (total_flows // open_flows):
        raise ValueError("total_flows must be a multiple of open_flows, and packets of waves")
    waves = total_flows // open_flows
    if waves == 1:
        return generate_open(path, packets, open_flows, seed, span_s)
    rng = np.random.default_rng(seed)
    per_wave = packets // waves
    parts = [_round_robin(rng, per_wave, open_flows) for _ in range(waves)]
    flow = np.concatenate([f + w * open_flows for w, (f, _, _) in enumerate(parts)])
    pos = np.concatenate([p for _, p, _ in parts])
    left = np.concatenate([lf for _, _, lf in parts])
    within = np.arange(per_wave) * (span_s / per_wave)
    ts = np.concatenate([w * (span_s + gap_s) + within for w in range(waves)])
    _write(path, rng, ts, flow, pos, left, _hosts(rng, total_flows), False, np.arange(packets))
    return packets


def _round_robin(rng, packets: int, n_flows: int):
    """Flow, position in the flow and packets left after it, for ``packets`` packets dealt
    round-robin to ``n_flows`` flows: round r holds one packet of every flow that has more
    than r packets, shuffled."""
    rounds = -(-packets // n_flows)
    per_flow = np.full(n_flows, packets // n_flows)
    per_flow[: packets % n_flows] += 1
    flow = np.concatenate(
        [rng.permutation(np.flatnonzero(per_flow > r)) for r in range(rounds)]
    ).astype(np.int64)
    pos = np.repeat(np.arange(rounds), [int((per_flow > r).sum()) for r in range(rounds)])
    left = per_flow[flow] - 1 - pos
    return flow, pos, left


def _hosts(rng, n_flows: int) -> dict[str, np.ndarray]:
    """Client and server address, ports and protocol of each flow."""
    return {
        "tcp": rng.random(n_flows) < 0.8,
        "client": (10 << 24) + rng.integers(1, 1 << 16, n_flows),
        "server": (172 << 24) + (16 << 16) + rng.integers(1, 1 << 12, n_flows),
        "cport": rng.integers(32768, 61000, n_flows),
        "sport": rng.choice(np.array([80, 443, 22, 25, 8080, 53, 123, 3306]), n_flows),
    }


def _write(path: Path, rng, ts, flow, pos, left, hosts, close: bool, drawn) -> None:
    """Write packets in the given (time) order: ``pos`` is each packet's index within its
    flow, ``left`` how many of the flow's packets follow it. With ``close``, a TCP flow's last
    three packets are its FIN, the other side's FIN and the last ACK. Payload sizes are drawn
    in the packets' order before sorting (``drawn`` maps to it: files stay as they were)."""
    n = len(ts)
    is_tcp = hosts["tcp"][flow]
    to_server = (pos % 2 == 0) | (pos == 2)
    flags = np.full(n, 0x18, dtype=np.uint8)  # PSH|ACK
    flags[is_tcp & (pos == 0)] = 0x02  # SYN
    flags[is_tcp & (pos == 1)] = 0x12  # SYN|ACK
    flags[is_tcp & (pos == 2)] = 0x10  # ACK
    no_payload = is_tcp & (pos < 3)
    if close:
        # TCP closes: FIN from the client, FIN from the server, the client's last ACK.
        to_server = np.where(is_tcp & (left < 3), left != 1, to_server)
        flags[is_tcp & (left == 2)] = 0x11  # FIN|ACK
        flags[is_tcp & (left == 1)] = 0x11
        flags[is_tcp & (left == 0)] = 0x10
        no_payload |= is_tcp & (left < 3)
    up, down = rng.integers(0, 400, n), rng.integers(0, 1400, n)  # client, server sizes
    payload = np.where(to_server, up[drawn], down[drawn])
    payload[no_payload] = 0
    l4 = np.where(is_tcp, 20, 8)
    ip_len = 20 + l4 + payload
    frame = 14 + ip_len
    src = np.where(to_server, hosts["client"][flow], hosts["server"][flow])
    dst = np.where(to_server, hosts["server"][flow], hosts["client"][flow])
    sp = np.where(to_server, hosts["cport"][flow], hosts["sport"][flow])
    dp = np.where(to_server, hosts["sport"][flow], hosts["cport"][flow])

    rec = 16 + frame
    off = np.r_[0, np.cumsum(rec)[:-1]] + 24
    buf = np.zeros(int(off[-1] + rec[-1]), dtype=np.uint8)
    buf[:24] = np.frombuffer(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1), np.uint8)

    def put(at, value, width, order_="<"):
        b = np.asarray(value, dtype=np.int64)
        for i in range(width):
            shift = 8 * (i if order_ == "<" else width - 1 - i)
            buf[at + i] = (b >> shift) & 0xFF

    sec = np.floor(ts).astype(np.int64)
    put(off, BASE_SECONDS + sec, 4)
    put(off + 4, ((ts - sec) * 1e6).astype(np.int64), 4)
    put(off + 8, frame, 4)
    put(off + 12, frame, 4)
    eth = off + 16
    put(eth + 12, 0x0800, 2, ">")
    ip = eth + 14
    buf[ip] = 0x45
    put(ip + 2, ip_len, 2, ">")
    buf[ip + 8] = 64
    buf[ip + 9] = np.where(is_tcp, 6, 17)
    put(ip + 12, src, 4, ">")
    put(ip + 16, dst, 4, ">")
    tp = ip + 20
    put(tp, sp, 2, ">")
    put(tp + 2, dp, 2, ">")
    tcp = np.flatnonzero(is_tcp)
    buf[tp[tcp] + 12] = 0x50
    buf[tp[tcp] + 13] = flags[tcp]
    put(tp[tcp] + 14, np.full(len(tcp), 64240), 2, ">")
    udp = np.flatnonzero(~is_tcp)
    put(tp[udp] + 4, 8 + payload[udp], 2, ">")
    path.write_bytes(buf.tobytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--packets", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--rate", type=float, default=5000, help="packets per second")
    parser.add_argument(
        "--open-flows",
        type=int,
        default=0,
        metavar="K",
        help="instead: K flows, all open at once for the whole capture (100 s)",
    )
    parser.add_argument(
        "--total-flows",
        type=int,
        default=0,
        metavar="F",
        help="with --open-flows K: F flows in waves of K open at once (F/K waves, each 100 s, "
        "130 s apart)",
    )
    args = parser.parse_args()
    if args.open_flows and args.total_flows:
        n = generate_waves(args.out, args.packets, args.open_flows, args.total_flows, args.seed)
    elif args.open_flows:
        n = generate_open(args.out, args.packets, args.open_flows, args.seed)
    else:
        n = generate(args.out, args.packets, args.seed, rate_pps=args.rate)
    print(f"wrote {n} packets to {args.out} ({args.out.stat().st_size / 1e6:.0f} MB)")


if __name__ == "__main__":
    main()
