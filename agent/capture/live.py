"""Live capture: an AF_PACKET socket with a TPACKET_V3 ring per interface, read a block
(many packets) at a time into the same PacketBatch columns the file readers yield.

The kernel fills blocks of the memory-mapped ring; each ready block is copied out in one piece
and handed back, so the only per-packet Python is following the packets' header chain. Kernel
drops come from PACKET_STATISTICS. A BPF filter is compiled by libpcap (through scapy) and
attached to the socket, so filtered packets never leave the kernel. Needs CAP_NET_RAW.

Capture workers (parallel/workers.py) each open one ring on the same interface and join one
AF_PACKET fanout group: PACKET_FANOUT_HASH sends each packet to the ring its flow hash picks, and
the kernel's flow hash is symmetric, so both directions of a flow reach one worker;
PACKET_FANOUT_FLAG_DEFRAG reassembles IPv4 fragments before the hash, so a fragmented datagram
reaches its flow's worker (whole: the worker sees one packet where a single ring sees the
fragments).
"""

from __future__ import annotations

import ctypes
import mmap
import select
import socket
import struct
from collections.abc import Iterator

import numpy as np

from quietwire.agent.capture.pcap import PAD, PacketBatch
from quietwire.agent.errors import QuietwireError

SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_VERSION = 10
PACKET_FANOUT = 18
PACKET_FANOUT_HASH = 0
PACKET_FANOUT_FLAG_DEFRAG = 0x8000
SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27
TPACKET_V3 = 2
PACKET_MR_PROMISC = 1
ETH_P_ALL = 0x0003
TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1
LINKTYPE_ETHERNET = 1
# The kernel hands a ring block over when it is full or this long after its first packet.
RETIRE_MS = 50
_BLOCK = struct.Struct("=IIIII")  # version, offset_to_priv, block_status, num_pkts, first
_PACKET = struct.Struct("=IIIIIIHH")  # next, sec, nsec, snaplen, len, status, mac, net


class CaptureSetupError(QuietwireError):
    """A live source cannot start (no such interface, no permission, bad filter)."""


class LiveCapture:
    """One interface. ``read(timeout)`` returns a PacketBatch (possibly empty)."""

    def __init__(
        self,
        interface: str,
        bpf_filter: str | None = None,
        promiscuous: bool = True,
        block_kib: int = 1024,
        blocks: int = 64,
        snaplen: int = 65535,
        fanout_group: int | None = None,
    ) -> None:
        self.interface = interface
        self.fanout_group = fanout_group
        self.kernel_packets = 0
        self.kernel_drops = 0
        try:
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        except PermissionError as exc:
            raise CaptureSetupError(f"{interface}: opening a raw socket needs CAP_NET_RAW") from exc
        try:
            self._setup(bpf_filter, promiscuous, block_kib, blocks, snaplen)
        except OSError as exc:
            self.sock.close()
            raise CaptureSetupError(f"{interface}: {exc.strerror or exc}") from exc

    def _setup(self, bpf_filter, promiscuous, block_kib, blocks, snaplen) -> None:
        s = self.sock
        s.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
        if self.fanout_group is not None:
            # Until the socket is in its fanout group it would see every packet: take none
            # (a one-instruction filter, "return 0") until it has joined.
            _set_filter(s, [(0x06, 0, 0, 0)])
        elif bpf_filter:
            self._attach_filter(bpf_filter)
        self.block_size = block_kib * 1024
        self.blocks = blocks
        frame = 2048
        # tpacket_req3: block size, block count, frame size, frame count, retire timeout (ms),
        # private area size, feature flags
        req = struct.pack(
            "=IIIIIII",
            self.block_size,
            blocks,
            frame,
            self.block_size // frame * blocks,
            RETIRE_MS,
            0,
            0,
        )
        s.setsockopt(SOL_PACKET, PACKET_RX_RING, req)
        s.bind((self.interface, ETH_P_ALL))
        if self.fanout_group is not None:
            mode = PACKET_FANOUT_HASH | PACKET_FANOUT_FLAG_DEFRAG
            arg = (self.fanout_group & 0xFFFF) | mode << 16
            s.setsockopt(SOL_PACKET, PACKET_FANOUT, struct.pack("=I", arg))
            if bpf_filter:
                self._attach_filter(bpf_filter)
            else:
                s.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
        if promiscuous:
            index = socket.if_nametoindex(self.interface)
            s.setsockopt(
                SOL_PACKET,
                PACKET_ADD_MEMBERSHIP,
                struct.pack("=iHH8s", index, PACKET_MR_PROMISC, 0, b""),
            )
        self.ring = mmap.mmap(
            s.fileno(), self.block_size * blocks, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
        )
        self._status = [(i * self.block_size + 8) for i in range(blocks)]
        self._next = 0
        self._poll = select.poll()
        self._poll.register(s.fileno(), select.POLLIN | select.POLLERR)
        self._snaplen = snaplen

    def _attach_filter(self, expression: str) -> None:
        try:
            from scapy.arch.common import compile_filter
            from scapy.error import Scapy_Exception
        except ImportError as exc:  # pragma: no cover - scapy is a dependency
            raise CaptureSetupError(f"{self.interface}: scapy is needed for BPF filters") from exc
        try:
            program = compile_filter(expression, iface=self.interface)
        except (Scapy_Exception, OSError) as exc:
            raise CaptureSetupError(
                f"{self.interface}: bad BPF filter {expression!r} ({exc})"
            ) from exc
        self.sock.setsockopt(
            socket.SOL_SOCKET,
            SO_ATTACH_FILTER,
            bytes(
                ctypes.string_at(  # SO_ATTACH_FILTER
                    ctypes.addressof(program), ctypes.sizeof(program)
                )
            ),
        )
        self._program = program  # the instructions must outlive the setsockopt call

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self, timeout_s: float = 0.1, max_blocks: int = 64) -> PacketBatch:
        """Packets from the ready blocks (waiting up to ``timeout_s`` for the first one)."""
        ring = self.ring
        if not ring[self._status[self._next]] & TP_STATUS_USER:
            self._poll.poll(int(timeout_s * 1000))
        chunks, offsets, caplens, wirelens, secs, nsecs = [], [], [], [], [], []
        base = 0
        unpack_packet = _PACKET.unpack_from
        for _ in range(max_blocks):
            start = self._next * self.block_size
            _, _, status, count, first = _BLOCK.unpack_from(ring, start)
            if not status & TP_STATUS_USER:
                break
            block = np.frombuffer(ring, np.uint8, self.block_size, start).copy()
            ring[start + 8 : start + 12] = b"\0\0\0\0"  # hand the block back to the kernel
            at = first
            for _ in range(count):
                nxt, sec, nsec, snap, length, _, mac, _ = unpack_packet(block, at)
                offsets.append(base + at + mac)
                caplens.append(snap)
                wirelens.append(length)
                secs.append(sec)
                nsecs.append(nsec)
                at += nxt
            chunks.append(block)
            base += self.block_size
            self._next = (self._next + 1) % self.blocks
        if not chunks:
            return _empty()
        chunks.append(np.zeros(PAD, np.uint8))
        n = len(offsets)
        return PacketBatch(
            data=np.concatenate(chunks),
            offset=np.asarray(offsets, np.int64),
            caplen=np.asarray(caplens, np.int64),
            wirelen=np.asarray(wirelens, np.int64),
            ts_ns=np.asarray(secs, np.int64) * 1_000_000_000 + np.asarray(nsecs, np.int64),
            linktype=np.full(n, LINKTYPE_ETHERNET, np.int32),
            interface=np.zeros(n, np.int32),
        )

    def remaining(self) -> Iterator[PacketBatch]:
        """At shutdown, what the ring still holds: the ready blocks, then the block the kernel
        is still filling, which it hands over at most RETIRE_MS after the block's first packet
        (a read that does not wait for it loses the last packets before a SIGTERM)."""
        while True:
            batch = self.read(timeout_s=3 * RETIRE_MS / 1000)
            if not len(batch):
                return
            yield batch

    def statistics(self) -> tuple[int, int]:
        """(packets, drops) the kernel counted since the last call (it resets them)."""
        raw = self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 12)
        packets, drops, _ = struct.unpack("=III", raw)
        self.kernel_packets += packets
        self.kernel_drops += drops
        return packets, drops

    def close(self) -> None:
        try:
            self.ring.close()
        finally:
            self.sock.close()


def _set_filter(sock: socket.socket, program: list[tuple[int, int, int, int]]) -> None:
    """Attach a classic BPF program given as (code, jt, jf, k) instructions."""
    insns = (ctypes.c_uint8 * (8 * len(program)))()
    for i, insn in enumerate(program):
        struct.pack_into("=HBBI", insns, 8 * i, *insn)
    prog = struct.pack("HL", len(program), ctypes.addressof(insns))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, prog)


def _empty() -> PacketBatch:
    z = np.zeros(0, np.int64)
    return PacketBatch(
        np.zeros(PAD, np.uint8), z, z, z, z, np.zeros(0, np.int32), np.zeros(0, np.int32)
    )
