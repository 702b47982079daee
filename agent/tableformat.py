"""Text of flow tables, whole columns at a time: numbers become bytes by numpy arithmetic and
rows are put together with one boolean mask, so no Python runs per cell.

A text column is ``(chars, lens)``: an (n, w) uint8 matrix of left-aligned ASCII and the (n,)
length of each text. ``assemble`` joins columns, blocks of columns and constant bytes into
rows. ``g9`` writes a float32 the way Python's ``'%.9g' % float(x)`` does, byte for byte (9
significant digits round-trip every float32); the rare value whose rounding float64
arithmetic cannot decide (a tie in the tenth digit, or beyond 1e-14..1e30) is formatted by
Python itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Text = tuple[np.ndarray, np.ndarray]  # (chars (n, w) uint8, lens (n,) int)

SLOT = 16  # the longest '%.9g' of a float32 ('-1.23456789e-38') and its special values
_P10 = 10.0 ** np.arange(23)  # exact in float64
_UNSURE = 2.0**-22  # a rounding this close to .5 is left to Python (the float64 error is 2^-24)

# The per-cell source that layouts index: four little-endian uint32 words. Words 0-2 hold the
# mantissa's digits three at a time (bytes 0-2, 4-6, 8-10), with '0', '.' and '-' in their
# fourth bytes; word 3 holds 'e', the exponent's sign and its two digits.
_ZERO, _POINT, _MINUS, _E, _EXP_SIGN, _EXP_TENS, _EXP_ONES = 3, 7, 11, 12, 13, 14, 15
_DIGIT = [0, 1, 2, 4, 5, 6, 8, 9, 10]  # where the i-th significant digit is
_TRIPLE = {
    extra: np.array(
        [int.from_bytes(f"{i:03d}".encode() + extra, "little") for i in range(1000)],
        dtype=np.uint32,
    )
    for extra in (b"0", b".", b"-")
}
_TRAILING_ZEROS = np.array([3] + [len(s) - len(s.rstrip("0")) for s in map(str, range(1, 1000))])
_FIXED_CODES = 13 * 9  # X in -4..8, significant digits 1..9
_CODES = _FIXED_CODES + 9  # + exponent notation, significant digits 1..9


def _template(code: int) -> list[int]:
    """Source bytes of the text of one layout (code < _CODES, + _CODES when negative)."""
    neg, code = divmod(code, _CODES)
    digits = code % 9 + 1
    d = _DIGIT
    if code < _FIXED_CODES:
        exp = code // 9 - 4
        if exp >= 0:
            cols = d[: exp + 1]
            if digits > exp + 1:
                cols += [_POINT, *d[exp + 1 : digits]]
        else:
            cols = [_ZERO, _POINT] + [_ZERO] * (-exp - 1) + d[:digits]
    else:
        cols = d[:1] + ([_POINT, *d[1:digits]] if digits > 1 else [])
        cols += [_E, _EXP_SIGN, _EXP_TENS, _EXP_ONES]
    return ([_MINUS] if neg else []) + cols


_TEMPLATES = [np.array(_template(c), dtype=np.intp) for c in range(2 * _CODES)]


def _rows16(matrix: np.ndarray) -> np.ndarray:
    """An (n, 16) uint8 matrix as n 16-byte items (fast to gather and scatter whole)."""
    return matrix.view(np.complex128).reshape(-1)


def g9(values: np.ndarray, nan: bytes = b"nan", inf: bytes = b"inf") -> Text:
    """'%.9g' of each float32 (flattened), NaN written as ``nan`` and +-infinity as
    ``inf`` with its sign; (chars (n, SLOT), lens)."""
    with np.errstate(invalid="ignore"):  # signalling NaNs become quiet ones
        v = np.asarray(values, dtype=np.float32).ravel().astype(np.float64)
    n = len(v)
    chars = np.zeros((n, SLOT), dtype=np.uint8)
    lens = np.zeros(n, dtype=np.int64)
    a = np.abs(v)
    with np.errstate(invalid="ignore"):
        regular = np.isfinite(v) & (a != 0)
    idx = np.flatnonzero(regular)
    a = a[idx]
    exp = np.floor(np.log10(a)).astype(np.int64)
    scaled, ok = _scale(a, exp)
    for fix, step in ((scaled < 1e8, -1), (scaled >= 1e9, 1)):  # log10 is off by one at most
        fix &= ok
        if fix.any():
            exp[fix] += step
            scaled[fix], ok[fix] = _scale(a[fix], exp[fix])
    mant = np.rint(scaled)
    ok &= np.abs(scaled - np.floor(scaled) - 0.5) > _UNSURE
    carry = mant >= 1e9  # 999999999.5 and above round up to the next power of ten
    mant[carry] = 1e8
    exp[carry] += 1
    fallback = idx[~ok]
    if not ok.all():
        idx, exp, mant = idx[ok], exp[ok], mant[ok]
    mant = mant.astype(np.int64)

    hi, rest = np.divmod(mant, 1_000_000)
    mid, lo = np.divmod(rest, 1000)
    src = np.empty((len(idx), 4), dtype=np.uint32)
    src[:, 0] = _TRIPLE[b"0"][hi]
    src[:, 1] = _TRIPLE[b"."][mid]
    src[:, 2] = _TRIPLE[b"-"][lo]
    tens, ones = np.divmod(np.abs(exp).astype(np.uint32), 10)
    sign = np.where(exp < 0, np.uint32(ord("-") << 8), np.uint32(ord("+") << 8))
    src[:, 3] = ord("e") | sign | (tens + 48) << 16 | (ones + 48) << 24
    zeros = np.where(
        lo > 0,
        _TRAILING_ZEROS[lo],
        np.where(mid > 0, 3 + _TRAILING_ZEROS[mid], 6 + _TRAILING_ZEROS[hi]),
    )
    fixed = (exp >= -4) & (exp < 9)
    code = np.where(fixed, (exp + 4) * 9, _FIXED_CODES) + (8 - zeros)
    code += np.signbit(v[idx]) * _CODES

    order = np.argsort(code.astype(np.int16), kind="stable")
    counts = np.bincount(code, minlength=2 * _CODES)
    src = _rows16(src)[order].view(np.uint8).reshape(-1, 16)
    out = np.zeros((len(idx), SLOT), dtype=np.uint8)
    out_lens = np.empty(len(idx), dtype=np.int64)
    start = 0
    for c in np.flatnonzero(counts).tolist():
        end = start + int(counts[c])
        cols = _TEMPLATES[c]
        out[start:end, : len(cols)] = src[start:end][:, cols]
        out_lens[start:end] = len(cols)
        start = end
    where = idx[order]
    _rows16(chars)[where] = _rows16(out)
    lens[where] = out_lens

    special = np.flatnonzero(~regular)
    if len(special):
        sv = v[special]
        with np.errstate(invalid="ignore"):
            kinds = (
                (np.isnan(sv), nan),
                ((sv == np.inf), inf),
                ((sv == -np.inf), b"-" + inf),
                ((sv == 0) & ~np.signbit(sv), b"0"),
                ((sv == 0) & np.signbit(sv), b"-0"),
            )
        for mask, text in kinds:
            where = special[mask]
            chars[where, : len(text)] = np.frombuffer(text, dtype=np.uint8)
            lens[where] = len(text)
    for i in fallback.tolist():
        text = (f"{v[i]:.9g}").encode()
        chars[i, : len(text)] = np.frombuffer(text, dtype=np.uint8)
        lens[i] = len(text)
    return chars, lens


def _scale(a: np.ndarray, exp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """a * 10^(8 - exp), one correctly rounded operation by an exact power of ten, and
    whether the power was within the exact range."""
    k = 8 - exp
    ok = np.abs(k) <= 22
    power = _P10[np.clip(np.abs(k), 0, 22)]
    return np.where(k >= 0, a * power, a / power), ok


def integers(values: np.ndarray) -> Text:
    """Decimal text of integers (signed or unsigned, up to 64 bits)."""
    values = np.asarray(values)
    if values.dtype.kind == "i":
        neg = values < 0
        mag = np.abs(values.astype(np.int64)).astype(np.uint64)  # -2^63 stays 2^63 as uint64
    else:
        neg = np.zeros(len(values), dtype=bool)
        mag = values.astype(np.uint64)
    width = max(1, len(str(int(mag.max())))) if len(mag) else 1
    digits = np.empty((len(mag), width), dtype=np.uint8)
    rest = mag.copy()
    for col in range(width - 1, -1, -1):
        rest, digit = np.divmod(rest, np.uint64(10))
        digits[:, col] = digit
    digits += 48
    ndigits = np.ones(len(mag), dtype=np.int64)
    for p in range(1, width):
        ndigits += mag >= np.uint64(10**p)
    lens = ndigits + neg
    # Left-align: row i starts at width - ndigits[i] (after the sign).
    shift = width - ndigits
    cols = (np.arange(width + 1)[None, :] - neg[:, None] + shift[:, None]).clip(0, width - 1)
    chars = np.take_along_axis(digits, cols, axis=1)
    chars[neg, 0] = ord("-")
    return chars, lens


def strings(texts: list[str] | tuple[str, ...], codes: np.ndarray | None = None) -> Text:
    """ASCII texts as a column; with ``codes``, the column of ``texts[codes]`` (each distinct
    text encoded once)."""
    encoded = [t.encode("ascii") for t in texts]
    width = max((len(t) for t in encoded), default=0) or 1
    table = np.zeros((len(encoded), width), dtype=np.uint8)
    if encoded:
        table[:] = np.frombuffer(
            b"".join(t.ljust(width, b"\0") for t in encoded), np.uint8
        ).reshape(len(encoded), width)
    lens = np.array([len(t) for t in encoded], dtype=np.int64)
    if codes is None:
        return table, lens
    return table[codes], lens[codes]


def replace(text: Text, where: np.ndarray, value: bytes) -> Text:
    """The column with ``value`` in the rows ``where`` (e.g. a null)."""
    chars, lens = text
    width = max(chars.shape[1], len(value))
    if width > chars.shape[1]:
        chars = np.pad(chars, ((0, 0), (0, width - chars.shape[1])))
    else:
        chars = chars.copy()
    lens = lens.copy()
    chars[where, : len(value)] = np.frombuffer(value, dtype=np.uint8) if value else 0
    lens[where] = len(value)
    return chars, lens


@dataclass(frozen=True)
class Block:
    """k columns that share a layout: per column a constant prefix (e.g. ',' or '"name":'),
    then its value. ``chars`` (n, k, w), ``lens`` (n, k)."""

    prefixes: list[bytes]
    chars: np.ndarray
    lens: np.ndarray


def assemble(n: int, parts: list[bytes | Text | Block]) -> bytes:
    """The n rows of ``parts`` (constants, text columns, blocks), one after the other."""
    widths = []
    for p in parts:
        if isinstance(p, bytes):
            widths.append(len(p))
        elif isinstance(p, Block):
            wp = max(len(x) for x in p.prefixes)
            widths.append(p.chars.shape[1] * (wp + p.chars.shape[2]))
        else:
            widths.append(p[0].shape[1])
    mat = np.empty((n, sum(widths)), dtype=np.uint8)
    mask = np.empty((n, sum(widths)), dtype=bool)
    off = 0
    for p, w in zip(parts, widths):
        if isinstance(p, bytes):
            mat[:, off : off + w] = np.frombuffer(p, dtype=np.uint8)
            mask[:, off : off + w] = True
        elif isinstance(p, Block):
            k, wv = p.chars.shape[1:]
            wp = w // k - wv
            region = mat[:, off : off + w].reshape(n, k, wp + wv)
            region_mask = mask[:, off : off + w].reshape(n, k, wp + wv)
            prefix = np.zeros((k, wp), dtype=np.uint8)
            for i, x in enumerate(p.prefixes):
                prefix[i, : len(x)] = np.frombuffer(x, dtype=np.uint8)
            plens = np.array([len(x) for x in p.prefixes])
            region[:, :, :wp] = prefix
            region_mask[:, :, :wp] = np.arange(wp) < plens[:, None]
            region[:, :, wp:] = p.chars
            region_mask[:, :, wp:] = np.arange(wv) < p.lens[:, :, None]
        else:
            chars, lens = p
            mat[:, off : off + w] = chars
            mask[:, off : off + w] = np.arange(w) < lens[:, None]
        off += w
    return mat[mask].tobytes()
