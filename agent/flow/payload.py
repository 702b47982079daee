"""Payload statistics: what the first bytes of each direction of a flow look like, never the bytes
themselves. For the first packet with payload in each direction, over its first PAYLOAD_WINDOW
(128) captured bytes: the share of each byte class (CLASSES; the rest is other punctuation),
Shannon entropy in bits per byte, the printable share and the longest printable run. For a
client payload that starts with an HTTP request line (recognised from the bytes, not the port),
over its first HTTP_WINDOW (1024) bytes: whether the method is GET, the URI's length, its
query's length, its %XX escapes, special characters (quotes, angle brackets, script punctuation,
as sent or %-encoded) and ".." (path traversal, decoded too), the header lines, bytes and
unusual characters ($ { } < > ` |) that follow, and the special characters of the body's first
bytes. This is PAYL's idea (Wang & Stolfo, RAID 2004: byte distributions of normal payloads)
reduced to a few numbers per flow, which the diffusion model learns jointly with the flow
statistics and the host context.

Everything is computed with numpy over the selected packets of a batch (one row per packet,
one column per window byte); the window is read from the capture buffer and dropped, and
only these statistics enter the flow table. The window lengths are part of the feature schema
(schema.SCHEMA_HASH): another length would change every value, so they are not settings;
the one setting is off (flow.payload: false), for privacy.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

PAYLOAD_WINDOW = 128  # bytes of the first payload packet of each direction: byte statistics
HTTP_WINDOW = 1024  # bytes of a client's first payload that starts with an HTTP method
ROWS_AT_ONCE = 2048  # windows per vectorised pass

CLASSES = (
    "letters",
    "digits",
    "space",  # space, tab, CR, LF
    "quotes",  # ' "
    "angle",  # < >
    "script",  # $ { } ( ) ; | `
    "escapes",  # %XX (all three bytes)
    "control",  # other bytes below 0x20, and 0x7f
    "high",  # 0x80-0xff
)
DIRECTION_STATS = (
    "entropy",
    "printable_share",
    "longest_printable",
    *(f"share_{c}" for c in CLASSES),
)
HTTP_STATS = (
    "http_request",
    "http_method_get",
    "http_uri_length",
    "http_query_length",
    "http_uri_escapes",
    "http_uri_specials",
    "http_header_count",
    "http_header_bytes",
    "http_header_specials",
    "http_body_specials",
    "http_uri_dotdots",
)
METHODS = (b"GET ", b"POST ", b"HEAD ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ", b"CONNECT ")


def _class_table() -> np.ndarray:
    table = np.full(256, len(CLASSES), dtype=np.int64)  # the rest: other punctuation
    code = {name: i for i, name in enumerate(CLASSES)}
    for b in range(256):
        ch = chr(b)
        if b >= 0x80:
            table[b] = code["high"]
        elif ch.isascii() and ch.isalpha():
            table[b] = code["letters"]
        elif ch.isdigit():
            table[b] = code["digits"]
        elif ch in " \t\r\n":
            table[b] = code["space"]
        elif ch in "'\"":
            table[b] = code["quotes"]
        elif ch in "<>":
            table[b] = code["angle"]
        elif ch in "${}();|`":
            table[b] = code["script"]
        elif b < 0x20 or b == 0x7F:
            table[b] = code["control"]
    return table


CLASS_OF = _class_table()
PRINTABLE = np.array([0x20 <= b < 0x7F or b in (9, 10, 13) for b in range(256)])
PRINTABLE8 = PRINTABLE.astype(np.uint8)
# A window's class counts are sums of its byte histogram's columns: the byte values in class
# order (BY_CLASS), where each class that holds byte values starts (no byte value is in
# "escapes": _escapes finds them), and the classes of the printable bytes (every class is
# printable or not as a whole; tests/test_payload.py checks it).
BY_CLASS = np.argsort(CLASS_OF, kind="stable")
HELD_CLASSES = np.unique(CLASS_OF)
CLASS_STARTS = np.searchsorted(CLASS_OF[BY_CLASS], HELD_CLASSES)
PRINTABLE_CLASSES = np.unique(CLASS_OF[PRINTABLE])
_c = np.arange(PAYLOAD_WINDOW + 1, dtype=np.float64)
C_LOG_C = np.where(_c > 0, _c * np.log2(np.maximum(_c, 1)), 0.0)  # c * log2(c), c = 0..256
HEX = np.array([chr(b) in "0123456789abcdefABCDEF" for b in range(256)])
HEX_VALUE = np.array([int(chr(b), 16) if HEX[b] else 0 for b in range(256)], dtype=np.int64)
SPECIAL = np.isin(CLASS_OF, [CLASSES.index(c) for c in ("quotes", "angle", "script")])
# In headers, ( ) ; and quotes are ordinary (User-Agent, Cookie, ETag); these are not.
HEADER_SPECIAL = np.isin(np.arange(256), [ord(c) for c in "${}<>`|"])


def window(
    raw: np.ndarray, offset: np.ndarray, length: np.ndarray, width: int = PAYLOAD_WINDOW
) -> tuple[np.ndarray, np.ndarray]:
    """The first ``width`` bytes at each offset as an (n, width) uint8 matrix, and how many
    of them are the payload's (``length`` bytes are; what follows is whatever the buffer
    holds there, its last byte again past its end, and every statistic masks it out)."""
    n_bytes = np.minimum(np.maximum(length, 0), width)
    # A window is a copy of one row of a view of the buffer's width-byte runs (a copy per row:
    # 15 times as fast as gathering byte by byte), but for a window running past the end.
    last = len(raw) - width
    if last >= 0:
        w = sliding_window_view(raw, width)[np.minimum(offset, last)]
    else:
        w = np.empty((len(offset), width), dtype=raw.dtype)
    late = np.flatnonzero(offset > last)
    w[late] = raw[np.minimum(offset[late, None] + np.arange(width), len(raw) - 1)]
    return w, n_bytes


def direction_stats(w: np.ndarray, n_bytes: np.ndarray) -> np.ndarray:
    """(n, len(DIRECTION_STATS)) float32 statistics of windows (rows with no bytes: NaN)."""
    out = np.full((len(w), len(DIRECTION_STATS)), np.nan, dtype=np.float32)
    for lo in range(0, len(w), ROWS_AT_ONCE):
        rows = slice(lo, lo + ROWS_AT_ONCE)
        out[rows] = _direction_stats(w[rows], n_bytes[rows])
    return out


def _direction_stats(w: np.ndarray, n_bytes: np.ndarray) -> np.ndarray:
    """One bincount makes a byte histogram per window (windows in rows, so each one's counts
    stay together in memory); class counts (its columns summed by class), printable bytes
    and the entropy come from it. The longest printable run is a running count down the
    windows, all of them at once. Only text windows holding a '%' are searched for escapes."""
    n, width = w.shape
    n_cls = len(CLASSES) + 1  # the classes, then the rest
    inside = np.arange(width, dtype=np.int32)[None, :] < n_bytes[:, None].astype(np.int32)
    codes = w.astype(np.int32)
    codes[~inside] = 256  # past the end: bin 256, dropped
    codes += (np.arange(n, dtype=np.int32) * 257)[:, None]
    hist = np.bincount(codes.ravel(), minlength=257 * n).reshape(n, 257)
    hist[:, 256] = 0
    # Sums of the histogram's columns by class, down the columns of its transpose (no BLAS
    # product: unpinned, OpenBLAS's threads spun up to ten times the CPU of the sum).
    counts = np.zeros((n, n_cls), dtype=np.int64)
    by_class = np.take(hist, BY_CLASS, axis=1).T
    counts[:, HELD_CLASSES] = np.add.reduceat(by_class, CLASS_STARTS, axis=0).T
    printable = counts[:, PRINTABLE_CLASSES].sum(axis=1)
    length = np.maximum(n_bytes, 1).astype(np.float64)
    # entropy: H = log2(L) - sum(c log2 c) / L over the byte counts c of a window of L bytes
    entropy = np.log2(length) - C_LOG_C[hist].sum(axis=1) / length
    # %XX escapes of text (every byte printable): their three bytes move from their own
    # classes to "escapes" (in a binary window a % is just a byte)
    pct = np.flatnonzero((hist[:, ord("%")] > 0) & (printable == n_bytes))
    if len(pct):
        esc = _escapes(w[pct], inside[pct])
        covered = esc.copy()
        covered[:, 1:] |= esc[:, :-1]
        covered[:, 2:] |= esc[:, :-2]
        moved = np.bincount(
            (np.arange(len(pct))[:, None] * n_cls + CLASS_OF[w[pct]])[covered],
            minlength=len(pct) * n_cls,
        ).reshape(len(pct), n_cls)
        counts[pct] -= moved
        counts[pct, CLASSES.index("escapes")] += moved.sum(axis=1)
    # longest printable run: the whole window unless a byte is not printable
    longest = n_bytes.astype(np.float64)
    if (printable < n_bytes).any():
        down = PRINTABLE8[w.T] & inside.T  # (width, n): step down every window at once
        run = np.zeros(n, np.uint8)
        best = np.zeros(n, np.uint8)
        for row in down:
            run += row
            run *= row
            np.maximum(best, run, out=best)
        longest = best.astype(np.float64)
    out = np.column_stack(
        [entropy, printable / length, longest, counts[:, : len(CLASSES)] / length[:, None]]
    ).astype(np.float32)
    out[n_bytes == 0] = np.nan
    return out


def _escapes(w: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Where a %XX escape starts (the three bytes inside the window)."""
    out = np.zeros(w.shape, dtype=bool)
    if w.shape[1] >= 3:
        out[:, :-2] = (w[:, :-2] == ord("%")) & HEX[w[:, 1:-1]] & HEX[w[:, 2:]] & inside[:, 2:]
    return out


def http_stats(raw: np.ndarray, offset: np.ndarray, length: np.ndarray) -> np.ndarray:
    """(n, len(HTTP_STATS)) float32: request-line and header statistics of client payloads
    that start with an HTTP method, over their first HTTP_WINDOW bytes; http_request is 0
    for other payloads (the others NaN), and every value is NaN for rows without bytes."""
    n = len(offset)
    out = np.full((n, len(HTTP_STATS)), np.nan, dtype=np.float32)
    out[:, 0] = np.where(length > 0, 0.0, np.nan)
    head, n_head = window(raw, offset, length, max(len(m) for m in METHODS))
    method_len = np.zeros(n, dtype=np.int64)
    for m in METHODS:
        hit = (head[:, : len(m)] == np.frombuffer(m, np.uint8)).all(axis=1) & (n_head >= len(m))
        method_len = np.where(hit & (method_len == 0), len(m), method_len)
    req = np.flatnonzero(method_len > 0)
    if len(req) == 0:
        return out
    w, n_bytes = window(raw, offset[req], length[req], HTTP_WINDOW)
    start = method_len[req]  # the URI's first byte
    width = HTTP_WINDOW
    idx = np.arange(width)[None, :]
    inside = idx < n_bytes[:, None]
    after = (idx >= start[:, None]) & inside
    ends_uri = (w == ord(" ")) | (w == ord("\r")) | (w == ord("\n"))
    uri_end = np.where((ends_uri & after).any(axis=1), np.argmax(ends_uri & after, axis=1), n_bytes)
    in_uri = after & (idx < uri_end[:, None])
    question = (w == ord("?")) & in_uri
    has_query = question.any(axis=1)
    query_len = np.where(has_query, uri_end - np.argmax(question, axis=1) - 1, 0)
    crlf = np.zeros(w.shape, dtype=bool)
    crlf[:, :-1] = (w[:, :-1] == ord("\r")) & (w[:, 1:] == ord("\n")) & inside[:, 1:]
    has_line = crlf.any(axis=1)
    headers_from = np.where(has_line, np.argmax(crlf, axis=1) + 2, n_bytes)
    blank = np.zeros(w.shape, dtype=bool)
    blank[:, :-3] = crlf[:, :-3] & crlf[:, 2:-1]
    blank &= idx >= (headers_from - 2)[:, None]
    headers_to = np.where(blank.any(axis=1), np.argmax(blank, axis=1) + 2, n_bytes)
    in_headers = (idx >= headers_from[:, None]) & (idx < headers_to[:, None])
    out[req, 0] = 1.0
    out[req, 1] = (start == len(b"GET ")) & (w[:, 0] == ord("G"))
    out[req, 2] = uri_end - start
    out[req, 3] = query_len
    esc = _escapes(w, inside)
    # specials as sent or %-encoded (%27 is a quote to the server that decodes it)
    decoded = np.zeros(w.shape, dtype=bool)
    decoded[:, :-2] = esc[:, :-2] & SPECIAL[HEX_VALUE[w[:, 1:-1]] * 16 + HEX_VALUE[w[:, 2:]]]
    special = SPECIAL[w] | decoded
    # ".." in the URI as decoded (%2e%2e, .%2e, ...): each character is a byte or an escape,
    # and the one after it starts 1 or 3 bytes on
    value = np.where(esc, 0, w.astype(np.int64))
    value[:, :-2] = np.where(
        esc[:, :-2], HEX_VALUE[w[:, 1:-1]] * 16 + HEX_VALUE[w[:, 2:]], value[:, :-2]
    )
    starts_char = ~(np.roll(esc, 1, axis=1) | np.roll(esc, 2, axis=1))  # not inside an escape
    after = np.minimum(idx + np.where(esc, 3, 1), width - 1)
    dot = value == ord(".")
    dotdot = dot & np.take_along_axis(dot & in_uri, after, axis=1) & starts_char & in_uri
    in_body = (idx >= headers_to[:, None]) & inside & blank.any(axis=1)[:, None]
    out[req, 4] = (esc & in_uri).sum(axis=1)
    out[req, 5] = (special & in_uri).sum(axis=1)
    out[req, 6] = (crlf & in_headers).sum(axis=1) + (
        (headers_to > headers_from) & ~blank.any(axis=1)  # a last line the window cut
    )
    out[req, 7] = np.maximum(headers_to - headers_from, 0)
    out[req, 8] = (HEADER_SPECIAL[w] & in_headers).sum(axis=1)
    out[req, 9] = (special & in_body).sum(axis=1)
    out[req, 10] = dotdot.sum(axis=1)
    return out
