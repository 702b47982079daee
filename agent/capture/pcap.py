"""Packet sources: pcap and pcapng files read in bounded chunks, yielded as columnar batches.

A source is any iterable of :class:`PacketBatch`. Replay reads files with :func:`read_capture`;
live capture (live.py) yields the same batches from a socket's ring, so the stages after this
one do not know where packets came from.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quietwire.agent.errors import QuietwireError

CHUNK_BYTES = 8 << 20
PAD = 64  # zero bytes after each buffer's data (see PacketBatch.data; decode.HEADER_BYTES)
# No real capture has a packet this large; a bigger length means the file is damaged.
MAX_RECORD_BYTES = 1 << 18
# The pcap record walk (_walk_records): lanes of about this many records step in parallel;
# a lane's first header is searched for in 4 mean records' bytes after its guessed offset.
LANE_RECORDS = 64
MAX_SYNC_BYTES = 2048
# Walk the records of buffers from VECTOR_WALK_BYTES up in lanes (off: one record after
# another, the plain walk). The lanes pay off because the sync looks for the times' top byte
# before whole times and accepts runs of lanes that meet at once; bench/bench_meter.py
# times both walks.
VECTOR_WALK = True
VECTOR_WALK_BYTES = 1 << 20

PCAP_MAGIC = {
    b"\xd4\xc3\xb2\xa1": ("<", 1_000),  # little-endian, microseconds
    b"\xa1\xb2\xc3\xd4": (">", 1_000),
    b"\x4d\x3c\xb2\xa1": ("<", 1),  # little-endian, nanoseconds
    b"\xa1\xb2\x3c\x4d": (">", 1),
}
PCAPNG_SHB = 0x0A0D0D0A
PCAPNG_BOM = 0x1A2B3C4D


class CaptureError(QuietwireError):
    """A capture file cannot be read (further); the message names the file and the offset."""


@dataclass(frozen=True)
class PacketBatch:
    """Packets as columns over one shared byte buffer."""

    data: np.ndarray  # uint8, the bytes the offsets point into, then >= PAD zero bytes
    offset: np.ndarray  # int64, start of each packet's first byte (link layer) in data
    caplen: np.ndarray  # int64, bytes captured
    wirelen: np.ndarray  # int64, bytes on the wire
    ts_ns: np.ndarray  # int64, nanoseconds since the epoch
    linktype: np.ndarray  # int32, DLT/LINKTYPE value per packet
    interface: np.ndarray  # int32, interface index within the source

    def __len__(self) -> int:
        return len(self.offset)


def _batch_from_lists(arrays: dict[str, list], data: np.ndarray) -> PacketBatch:
    return PacketBatch(
        data=data,
        offset=np.asarray(arrays["offset"], dtype=np.int64),
        caplen=np.asarray(arrays["caplen"], dtype=np.int64),
        wirelen=np.asarray(arrays["wirelen"], dtype=np.int64),
        ts_ns=np.asarray(arrays["ts_ns"], dtype=np.int64),
        linktype=np.asarray(arrays["linktype"], dtype=np.int32),
        interface=np.asarray(arrays["interface"], dtype=np.int32),
    )


def read_capture(
    path: str | Path,
    chunk_bytes: int = CHUNK_BYTES,
    on_progress: Callable[[int], None] | None = None,
) -> Iterator[PacketBatch]:
    """Yield the packets of a pcap or pcapng file in batches; raise CaptureError on damage.

    Every packet before the damage has been yielded when the error is raised.
    ``on_progress`` is called with the bytes read so far after each chunk.
    """
    path = Path(path)
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise CaptureError(f"{path}: cannot open: {exc.strerror}") from exc
    with handle:
        head = handle.read(4)
        if head in PCAP_MAGIC:
            yield from _read_pcap(path, handle, head, chunk_bytes, on_progress)
        elif len(head) == 4 and struct.unpack("<I", head)[0] == PCAPNG_SHB:
            yield from _read_pcapng(path, handle, head, chunk_bytes, on_progress)
        elif not head:
            raise CaptureError(f"{path}: empty file, not a pcap or pcapng capture")
        else:
            raise CaptureError(f"{path}: not a pcap or pcapng capture (magic {head.hex()})")


class _Chunks:
    """A file read in chunks into fresh buffers; the unconsumed tail of one chunk (a record cut
    by the chunk boundary) starts the next. PAD zero bytes follow the data, so header fields
    can be read a few bytes past the end without a bounds check per record."""

    def __init__(
        self,
        path: Path,
        handle,
        chunk_bytes: int,
        on_progress,
        start: bytes = b"",
        file_pos: int = 0,
    ) -> None:
        self._path = path
        self._handle = handle
        self._size = chunk_bytes
        self._on_progress = on_progress
        self._pending = start
        self.file_pos = file_pos - len(start)  # file offset of the next buffer's first byte
        self.eof = False

    def next(self) -> tuple[bytearray, int]:
        """The next buffer and the number of valid bytes in it."""
        n = len(self._pending)
        buf = bytearray(n + self._size + PAD)
        buf[:n] = self._pending
        got = self._handle.readinto(memoryview(buf)[n : n + self._size]) or 0
        self.eof = got == 0
        return buf, n + got

    def advance(self, buf: bytearray, off: int, end: int, unit: str) -> bool:
        """Records up to ``off`` are consumed: carry the rest to the next chunk, report
        progress, and say whether the file is done (a partial ``unit`` at the end of the
        file is damage)."""
        self._pending = bytes(buf[off:end])
        self.file_pos += off
        if self._on_progress:
            self._on_progress(self.file_pos)
        if self.eof and self._pending:
            raise CaptureError(
                f"{self._path}: truncated {unit} at offset {self.file_pos} "
                f"({len(self._pending)} bytes left, file ends mid-{unit})"
            )
        return self.eof


def _read_pcap(path: Path, handle, magic: bytes, chunk_bytes: int, on_progress):
    order, frac_to_ns = PCAP_MAGIC[magic]
    header = magic + handle.read(20)
    if len(header) < 24:
        raise CaptureError(f"{path}: truncated pcap file header ({len(header)} of 24 bytes)")
    linktype = struct.unpack(order + "I", header[20:24])[0] & 0x0FFFFFFF
    caplen_at = struct.Struct(order + "I").unpack_from
    fraction_limit = 1_000_000_000 // frac_to_ns  # microseconds or nanoseconds in a second
    chunks = _Chunks(path, handle, chunk_bytes, on_progress, file_pos=24)
    while True:
        buf, end = chunks.next()
        starts, off = _walk_records(buf, end, order, fraction_limit)
        yield from _pcap_batch(buf, starts, order, frac_to_ns, linktype)
        if off + 16 <= end and caplen_at(buf, off + 8)[0] > MAX_RECORD_BYTES:
            raise CaptureError(
                f"{path}: record at offset {chunks.file_pos + off}: captured length "
                f"{caplen_at(buf, off + 8)[0]} exceeds {MAX_RECORD_BYTES} bytes (damaged file)"
            )
        if chunks.advance(buf, off, end, "record"):
            return


def _walk_python(buf, end: int, off: int, stop: int, caplen_at) -> tuple[list[int], int, bool]:
    """Record starts from ``off`` (a record's start) until one at or past ``stop`` or one that
    does not fit in ``buf[:end]``; the offset reached, and whether a record did not fit."""
    starts: list[int] = []
    append = starts.append
    # One header read per record. Past `end` the padding reads as a zero length, so a
    # partial header also stops it.
    while off < stop:
        nxt = off + 16 + caplen_at(buf, off + 8)[0]
        if nxt > end:
            return starts, off, True
        append(off)
        off = nxt
    return starts, off, False


def _words(buf, order: str) -> np.ndarray:
    """The buffer's 32-bit words in the file's byte order at every byte offset (a stride-1
    view: a header can start anywhere)."""
    return np.ndarray((len(buf) - 3,), dtype=order + "u4", buffer=buf, offset=0, strides=(1,))


def _walk_records(buf, end: int, order: str, fraction_limit: int) -> tuple[np.ndarray, int]:
    """The start of every record that fits wholly in ``buf[:end]`` (records from offset 0), and
    the offset after the last of them: what one walk from header to header finds.

    Each record's offset follows from the previous one's length, so the walk is split into
    lanes that step in parallel, one numpy operation per step for all lanes: a lane starts at
    a guessed offset where a plausible header begins (a time near the chunk's first record's,
    a valid fraction, a sane length, and the header it points to plausible too). A guess is
    only trusted when the lane before it lands exactly on it, which a true record start is
    always landed on and a false one never; where none does, the plain walk covers the gap.
    So the result is the walk's whatever the bytes (damage included).
    """
    caplen_at = struct.Struct(order + "I").unpack_from
    if not VECTOR_WALK or end < VECTOR_WALK_BYTES:  # a small buffer: the lanes cost more
        starts, off, _ = _walk_python(buf, end, 0, end, caplen_at)
        return np.fromiter(starts, np.int64, len(starts)), off  # faster than np.asarray
    head, off, cut = _walk_python(buf, end, 0, min(end, 1 << 14), caplen_at)
    if cut or off >= end or len(head) < 16:  # done, or large records: few to walk
        rest, off, _ = _walk_python(buf, end, off, end, caplen_at)
        return np.asarray(head + rest, dtype=np.int64), off
    words = _words(buf, order)
    mean_record = off // len(head)
    sync_bytes = min(max(4 * mean_record, 128), MAX_SYNC_BYTES)
    lane_bytes = max(LANE_RECORDS * mean_record, 4 * sync_bytes)
    guesses = np.arange(off + lane_bytes, end - sync_bytes - 32, lane_bytes, dtype=np.int64)
    synced = _sync(buf, order, guesses, lane_bytes, sync_bytes, end, fraction_limit)
    lane_start = np.concatenate([[off], synced])
    lane_limit = np.concatenate([synced, [end]])
    # Every lane steps at once until it reaches the next lane's start (or a record that does
    # not fit: the chunk's last, or damage); a row of offsets per step, -1 where a lane is done.
    pos = lane_start.copy()
    found = []
    while True:
        nxt = pos + 16 + words[pos + 8]
        go = (pos < lane_limit) & (nxt <= end)
        if not go.any():
            break
        found.append(np.where(go, pos, -1))
        np.copyto(pos, nxt, where=go)
    cut = (pos < lane_limit) & (nxt > end)
    # Chain the lanes: each accepted one ends where the next accepted one starts. Where lanes
    # run into each other (most do) a whole run of them is accepted in one step.
    accepted = np.zeros(len(pos), dtype=bool)
    walked = [np.asarray(head, dtype=np.int64)]
    runs_on = np.r_[(pos[:-1] == lane_start[1:]) & ~cut[:-1], False]
    run_last = np.flatnonzero(~runs_on)  # the last lane of each run of lanes
    starts, ends, cuts = lane_start.tolist(), pos.tolist(), cut.tolist()
    at, lane = off, 0
    while at < end:
        while lane < len(starts) and starts[lane] < at:
            lane += 1
        if lane < len(starts) and starts[lane] == at:
            last = int(run_last[np.searchsorted(run_last, lane)])
            accepted[lane : last + 1] = True
            lane = last
            at = ends[lane]
            if cuts[lane]:
                break
            continue
        stop = starts[lane] if lane < len(starts) else end
        gap, at, stopped = _walk_python(buf, end, at, stop, caplen_at)
        walked.append(np.asarray(gap, dtype=np.int64))
        if stopped:
            break
    found_at = np.stack(found)[:, accepted].ravel()
    walked.append(found_at[found_at >= 0])
    return np.sort(np.concatenate(walked)), at


def _sync(buf, order: str, guesses, lane_bytes: int, width: int, end: int, fraction_limit):
    """For each guessed offset, the first offset within ``width`` bytes after it where a plausible
    record header begins (one that points to another plausible header, or to the end); guesses
    with none are dropped. Ascending."""
    if not len(guesses):
        return guesses
    words = _words(buf, order)
    # A time within a day of the chunk's first record's: rare in packet bytes. Its top byte is
    # looked for first, a byte per offset, then the whole time at those offsets only.
    earliest, span = max(int(words[0]) - 86_400, 0), 2 * 86_400
    top = np.frombuffer(buf, np.uint8)[3 if order == "<" else 0 :]
    window = np.lib.stride_tricks.as_strided(
        top[guesses[0] :], shape=(len(guesses), width), strides=(lane_bytes, 1)
    )
    near = window == earliest >> 24
    if (earliest + span) >> 24 != earliest >> 24:
        near |= window == ((earliest + span) >> 24) % 256  # (32-bit times wrap, as below)
    lane, shift = np.divmod(np.flatnonzero(near), width)  # faster than a 2-D nonzero
    cand = guesses[lane] + shift
    earliest, span = np.uint32(earliest), np.uint32(span)
    near = (words[cand] - earliest) <= span
    lane, cand = lane[near], cand[near]
    nxt = cand + 16 + words[cand + 8]
    ok = (words[cand + 4] < fraction_limit) & (words[cand + 8] <= MAX_RECORD_BYTES) & (nxt <= end)
    ahead = np.minimum(nxt, end - 16)
    ok &= (nxt == end) | (
        (words[ahead + 4] < fraction_limit)
        & (words[ahead + 8] <= MAX_RECORD_BYTES)
        & ((words[ahead] - earliest) <= span)
    )
    lane, cand = lane[ok], cand[ok]
    first = np.ones(len(lane), dtype=bool)  # nonzero lists each lane's offsets in order
    first[1:] = lane[1:] != lane[:-1]
    return cand[first]


def _pcap_batch(buf: bytes, starts, order: str, frac_to_ns: int, linktype: int):
    if not len(starts):
        return
    data = np.frombuffer(buf, dtype=np.uint8)
    rec = np.asarray(starts, dtype=np.int64)
    # The record headers in one gather, each as one opaque 16-byte item, then as four words.
    headers = np.ndarray((len(buf) - 15,), dtype="V16", buffer=buf, strides=(1,))[rec]
    seconds, fraction, caplen, wirelen = headers.view(order + "u4").reshape(-1, 4).T
    caplen = caplen.astype(np.int64)
    ts_ns = seconds.astype(np.int64) * 1_000_000_000 + fraction.astype(np.int64) * frac_to_ns
    wirelen = wirelen.astype(np.int64)
    yield PacketBatch(
        data=data,
        offset=rec + 16,
        caplen=caplen,
        wirelen=np.maximum(wirelen, caplen),
        ts_ns=ts_ns,
        linktype=np.full(len(rec), linktype, dtype=np.int32),
        interface=np.zeros(len(rec), dtype=np.int32),
    )


@dataclass
class _Interface:
    linktype: int
    snaplen: int
    ticks_per_second: int
    offset_seconds: int


def _read_pcapng(path: Path, handle, head: bytes, chunk_bytes: int, on_progress):
    chunks = _Chunks(path, handle, chunk_bytes, on_progress, start=head, file_pos=len(head))
    order = "<"
    interfaces: list[_Interface] = []
    while True:
        buf, end = chunks.next()
        names = ("offset", "caplen", "wirelen", "ticks", "interface")
        cols: dict[str, list] = {k: [] for k in names}
        off = 0
        try:
            while off + 12 <= end:
                btype = struct.unpack_from(order + "I", buf, off)[0]
                if btype == PCAPNG_SHB:
                    bom = bytes(buf[off + 8 : off + 12])
                    if off + 12 > end:
                        break
                    if bom == b"\x4d\x3c\x2b\x1a":
                        order = "<"
                    elif bom == b"\x1a\x2b\x3c\x4d":
                        order = ">"
                    else:
                        raise CaptureError(
                            f"{path}: section header at offset {chunks.file_pos + off}: "
                            f"bad byte-order magic {bom.hex()}"
                        )
                    interfaces = []
                blen = struct.unpack_from(order + "I", buf, off + 4)[0]
                if blen < 12 or blen % 4 or blen > MAX_RECORD_BYTES + 64:
                    raise CaptureError(
                        f"{path}: block at offset {chunks.file_pos + off}: "
                        f"invalid block length {blen} (damaged file)"
                    )
                if off + blen > end:
                    break
                _pcapng_block(path, buf, off, blen, btype, order, interfaces, cols, chunks.file_pos)
                off += blen
        except CaptureError:
            yield from _pcapng_batch(buf, cols, interfaces)
            raise
        yield from _pcapng_batch(buf, cols, interfaces)
        if chunks.advance(buf, off, end, "block"):
            return


def _pcapng_block(path, buf, off, blen, btype, order, interfaces, cols, file_pos) -> None:
    body = off + 8
    body_end = off + blen - 4
    if btype == 1:  # interface description
        if body_end - body < 8:
            raise CaptureError(f"{path}: interface block at offset {file_pos + off} too short")
        linktype, _, snaplen = struct.unpack_from(order + "HHI", buf, body)
        ticks, tsoffset = 1_000_000, 0
        opt = body + 8
        while opt + 4 <= body_end:
            code, olen = struct.unpack_from(order + "HH", buf, opt)
            if code == 0:
                break
            value = opt + 4
            if code == 9 and olen >= 1:
                res = buf[value]
                ticks = 2 ** (res & 0x7F) if res & 0x80 else 10**res
            elif code == 14 and olen >= 8:
                tsoffset = struct.unpack_from(order + "q", buf, value)[0]
            opt = value + ((olen + 3) & ~3)
        interfaces.append(_Interface(linktype, snaplen, ticks, tsoffset))
        return
    if btype in (6, 2):  # enhanced packet, obsolete packet
        if btype == 6:
            if body_end - body < 20:
                raise CaptureError(f"{path}: packet block at offset {file_pos + off} too short")
            iface, ts_hi, ts_lo, incl, orig = struct.unpack_from(order + "IIIII", buf, body)
        else:
            if body_end - body < 20:
                raise CaptureError(f"{path}: packet block at offset {file_pos + off} too short")
            iface, _, ts_hi, ts_lo, incl, orig = struct.unpack_from(order + "HHIIII", buf, body)
        data = body + 20
        if iface >= len(interfaces):
            raise CaptureError(
                f"{path}: packet block at offset {file_pos + off} names interface {iface}, "
                f"but only {len(interfaces)} are described"
            )
        if data + incl > body_end:
            raise CaptureError(
                f"{path}: packet block at offset {file_pos + off}: captured length {incl} "
                f"overruns the block"
            )
        cols["offset"].append(data)
        cols["caplen"].append(incl)
        cols["wirelen"].append(orig)
        cols["ticks"].append((ts_hi << 32) | ts_lo)
        cols["interface"].append(iface)
    elif btype == 3:  # simple packet: no timestamp, interface 0
        if not interfaces or body_end - body < 4:
            raise CaptureError(f"{path}: simple packet block at offset {file_pos + off} is invalid")
        orig = struct.unpack_from(order + "I", buf, body)[0]
        incl = min(orig, body_end - body - 4)
        if interfaces[0].snaplen:
            incl = min(incl, interfaces[0].snaplen)
        cols["offset"].append(body + 4)
        cols["caplen"].append(incl)
        cols["wirelen"].append(orig)
        cols["ticks"].append(-1)  # filled from the previous packet's time
        cols["interface"].append(0)
    # Other blocks (name resolution, statistics, custom, decryption secrets) carry no packets.


def _pcapng_batch(buf: bytes, cols: dict[str, list], interfaces: list[_Interface]):
    if not cols["offset"]:
        return
    iface = np.asarray(cols["interface"], dtype=np.int32)
    ticks = np.asarray(cols["ticks"], dtype=np.int64)
    ts_ns = np.zeros(len(ticks), dtype=np.int64)
    linktype = np.zeros(len(ticks), dtype=np.int32)
    for i, spec in enumerate(interfaces):
        sel = iface == i
        if not sel.any():
            continue
        linktype[sel] = spec.linktype
        t = ticks[sel]
        if spec.ticks_per_second == 1_000_000_000:
            ns = t
        elif 1_000_000_000 % spec.ticks_per_second == 0:
            ns = t * (1_000_000_000 // spec.ticks_per_second)
        else:
            sec, frac = np.divmod(t, spec.ticks_per_second)
            ns = sec * 1_000_000_000 + (frac * (1e9 / spec.ticks_per_second)).astype(np.int64)
        ts_ns[sel] = ns + spec.offset_seconds * 1_000_000_000
    missing = ticks < 0
    if missing.any():
        # Simple packet blocks have no time: carry the last known one forward (0 if none).
        idx = np.where(missing, -1, np.arange(len(ticks)))
        np.maximum.accumulate(idx, out=idx)
        ts_ns = np.where(idx >= 0, ts_ns[np.maximum(idx, 0)], 0)
    cols["ts_ns"] = ts_ns
    cols["linktype"] = linktype
    yield _batch_from_lists(cols, np.frombuffer(buf, dtype=np.uint8))
