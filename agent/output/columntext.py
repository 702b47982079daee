"""Text of flow tables, whole columns at a time: numbers become bytes by numpy arithmetic and
rows are the bytes of one padded matrix that are not NUL, so no Python runs per cell.

A text column is ``(chars, lens)``: an (n, w) uint8 matrix of left-aligned ASCII, NUL past each
text's length, and the (n,) length of each text. ``assemble`` joins columns, blocks of columns
and constant bytes into rows. ``g9`` writes a float32 the way Python's ``'%.9g' % float(x)``
does, byte for byte (9 significant digits round-trip every float32): whole numbers below 1000
(most features are counts, flags and small sizes) by table lookup, the others by arithmetic on
their digits; the rare value whose rounding float64 arithmetic cannot decide (a tie in the
tenth digit, or beyond 1e-14..1e30) is formatted by Python itself.
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

# The text of each whole number below _SMALL in magnitude ('%.9g' of 12.0 is '12'), the
# negative ones after the positive, then an empty text: most features are counts, flags or
# small sizes.
_SMALL = 1000
_SMALL_TEXT = [b"%d" % i for i in range(_SMALL)] + [b"-%d" % i for i in range(_SMALL)] + [b""]
_SMALL_CHARS = np.frombuffer(b"".join(t.ljust(SLOT, b"\0") for t in _SMALL_TEXT), np.uint8)
_SMALL_CHARS = _SMALL_CHARS.reshape(len(_SMALL_TEXT), SLOT)
_SMALL_LENS = np.array([len(t) for t in _SMALL_TEXT], dtype=np.int64)


def _rows16(matrix: np.ndarray) -> np.ndarray:
    """An (n, 16) uint8 matrix as n 16-byte items (fast to gather and scatter whole)."""
    return matrix.view(np.complex128).reshape(-1)


def g9(
    values: np.ndarray, nan: bytes = b"nan", inf: bytes = b"inf", minus_inf: bytes | None = None
) -> Text:
    """'%.9g' of each float32 (flattened), NaN written as ``nan``, infinity as ``inf`` and
    minus infinity as ``minus_inf`` (default: ``inf`` with its sign); (chars (n, SLOT),
    lens)."""
    # Sorting values out in float32 (half the bytes to read); only the values formatted by
    # arithmetic are widened to float64 (exactly).
    with np.errstate(invalid="ignore"):  # signalling NaNs of another float type
        v = np.asarray(values, dtype=np.float32).ravel()
    a = np.abs(v)
    finite = np.isfinite(v)
    with np.errstate(invalid="ignore"):  # (signalling NaNs)
        small = finite & (a < _SMALL) & (a == np.floor(a))  # zero and -0 too
        # Every value starts from its row of the table; those not in it from the empty last row.
        code = np.where(small, a + np.signbit(v) * np.float32(_SMALL), 2 * _SMALL)
    regular = finite & ~small
    code = code.astype(np.intp)
    chars = np.take(_SMALL_CHARS, code, axis=0)
    lens = np.take(_SMALL_LENS, code)
    idx = np.flatnonzero(regular)
    idx, exp, mant, fallback = _digits(a[idx].astype(np.float64), idx)
    order, out, out_lens = _layout(mant, exp, np.signbit(v[idx]))
    where = idx[order]
    _rows16(chars)[where] = _rows16(out)
    lens[where] = out_lens

    special = np.flatnonzero(~finite)
    if len(special):
        sv = v[special]
        minus = b"-" + inf if minus_inf is None else minus_inf
        for mask, text in ((np.isnan(sv), nan), (sv > 0, inf), (sv < 0, minus)):
            where = special[mask]
            if text and len(where):
                chars[where, : len(text)] = np.frombuffer(text, dtype=np.uint8)
                lens[where] = len(text)
    for i in fallback.tolist():
        text = (f"{float(v[i]):.9g}").encode()
        chars[i, : len(text)] = np.frombuffer(text, dtype=np.uint8)
        lens[i] = len(text)
    return chars, lens


def _digits(
    a: np.ndarray, idx: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The nine significant digits (an integer mantissa) and decimal exponent of the
    magnitudes ``a`` (float64) of the values at ``idx``: (idx, exp, mant) of those whose
    rounding float64 arithmetic decides, and the idx of the others (left to Python)."""
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
    return idx, exp, mant.astype(np.int64), fallback


def _layout(
    mant: np.ndarray, exp: np.ndarray, negative: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The texts of these mantissas and exponents, grouped by layout (fixed or exponent
    notation, digits after trailing zeros go, sign): the order of the values in the groups,
    and the texts in that order as (chars (n, SLOT), lens)."""
    hi, rest = np.divmod(mant, 1_000_000)
    mid, lo = np.divmod(rest, 1000)
    src = np.empty((len(mant), 4), dtype=np.uint32)
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
    code += negative * _CODES

    order = np.argsort(code.astype(np.int16), kind="stable")
    counts = np.bincount(code, minlength=2 * _CODES)
    src = _rows16(src)[order].view(np.uint8).reshape(-1, 16)
    out = np.zeros((len(mant), SLOT), dtype=np.uint8)
    out_lens = np.empty(len(mant), dtype=np.int64)
    start = 0
    for c in np.flatnonzero(counts).tolist():
        end = start + int(counts[c])
        cols = _TEMPLATES[c]
        out[start:end, : len(cols)] = src[start:end][:, cols]
        out_lens[start:end] = len(cols)
        start = end
    return order, out, out_lens


def _scale(a: np.ndarray, exp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """a * 10^(8 - exp), one correctly rounded operation by an exact power of ten, and
    whether the power was within the exact range."""
    k = 8 - exp
    ok = np.abs(k) <= 22
    power = _P10[np.clip(np.abs(k), 0, 22)]
    return np.where(k >= 0, a * power, a / power), ok


_POW10 = 10 ** np.arange(20, dtype=np.uint64)  # 1 .. 10^19
_PAIRS = np.array([[48 + i // 10, 48 + i % 10] for i in range(100)], dtype=np.uint8)  # '00'..'99'


def integers(values: np.ndarray) -> Text:
    """Decimal text of integers (signed or unsigned, up to 64 bits)."""
    values = np.asarray(values)
    n = len(values)
    if values.dtype.kind == "i":
        neg = values < 0
        mag = np.abs(values.astype(np.int64)).astype(np.uint64)  # -2^63 stays 2^63 as uint64
    else:
        neg = np.zeros(n, dtype=bool)
        mag = values.astype(np.uint64)
    ndigits = np.maximum(np.searchsorted(_POW10, mag, side="right"), 1)
    lens = ndigits + neg
    width = int(lens.max()) if n else 1
    # Right-aligned in the first half of (n, 2 * width) two digits at a time, then each row
    # read from its start (a flat gather that reads NULs past the text).
    buf = np.zeros((n, 2 * width), dtype=np.uint8)
    rest = mag
    col = width
    hundred = np.uint64(100)
    while col > 0:
        rest, pair = np.divmod(rest, hundred)
        if col >= 2:
            buf[:n, col - 2 : col] = _PAIRS[pair]
        else:
            buf[:n, 0] = _PAIRS[pair, 1]
        col -= 2
    if neg.any():
        rows = np.flatnonzero(neg)
        buf[rows, width - lens[rows]] = ord("-")
    start = np.arange(n) * (2 * width) + (width - lens)
    chars = buf.reshape(-1)[start[:, None] + np.arange(width)]
    return chars, lens.astype(np.int64)


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


_OCTETS = strings([str(i) for i in range(256)])


def ipv4_block(addresses: np.ndarray) -> Block:
    """Dotted quads of IPv4 addresses (the low 32 bits of each value) as a block of four
    octet columns; the first column's prefix is empty, so a row gets its separator before."""
    a = np.asarray(addresses).astype(np.uint32)
    octets = np.stack([(a >> np.uint32(s)) & np.uint32(255) for s in (24, 16, 8, 0)], axis=1)
    chars, lens = _OCTETS
    return Block([b"", b".", b".", b"."], chars[octets], lens[octets])


def replace(text: Text, where: np.ndarray, value: bytes) -> Text:
    """The column with ``value`` in the rows ``where`` (e.g. a null)."""
    chars, lens = text
    width = max(chars.shape[1], len(value))
    if width > chars.shape[1]:
        chars = np.pad(chars, ((0, 0), (0, width - chars.shape[1])))
    else:
        chars = chars.copy()
    lens = lens.copy()
    chars[where] = 0
    chars[where, : len(value)] = np.frombuffer(value, dtype=np.uint8)
    lens[where] = len(value)
    return chars, lens


@dataclass(frozen=True)
class Block:
    """k columns that share a layout: per column a constant prefix (e.g. ',' or '"name":'),
    then its value. ``chars`` (n, k, w), ``lens`` (n, k)."""

    prefixes: list[bytes]
    chars: np.ndarray
    lens: np.ndarray


def _ranges(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ranges of these lengths one after the other: each element's range and its index
    within it."""
    group = np.repeat(np.arange(len(lengths)), lengths)
    return group, np.arange(len(group)) - (np.cumsum(lengths) - lengths)[group]


def _block_layout(p: Block) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where a block's bytes go when each column is only as wide as its prefix and its longest
    value in these rows: the row of prefix bytes (NUL where values go), and per value byte its
    position in the row and its index in a row of ``chars``."""
    k, wv = p.chars.shape[1:]
    plens = np.array([len(x) for x in p.prefixes], dtype=np.int64)
    longest = p.lens.max(axis=0) if len(p.lens) else np.zeros(k, dtype=np.int64)
    widths = plens + longest
    starts = np.cumsum(widths) - widths
    row = np.zeros(int(widths.sum()), dtype=np.uint8)
    column, index = _ranges(plens)
    row[starts[column] + index] = np.frombuffer(b"".join(p.prefixes), dtype=np.uint8)
    column, index = _ranges(longest)
    return row, starts[column] + plens[column] + index, column * wv + index


def assemble(n: int, parts: list[bytes | Text | Block]) -> bytes:
    """The n rows of ``parts`` (constants, text columns, blocks), one after the other.

    Every part is laid out in a padded (n, width) byte matrix; the rows are its bytes that are
    not NUL, in order (a text is NUL-padded past its length and holds no NUL itself). A block's
    columns are each only as wide as their prefix and their longest text in these rows (most
    features are a few characters of the 16 a float32 can take)."""
    layouts = [_block_layout(p) if isinstance(p, Block) else None for p in parts]
    widths = []
    for p, layout in zip(parts, layouts):
        if isinstance(p, bytes):
            widths.append(len(p))
        elif layout is not None:
            widths.append(len(layout[0]))
        else:
            widths.append(p[0].shape[1])
    mat = np.empty((n, sum(widths)), dtype=np.uint8)
    off = 0
    for p, w, layout in zip(parts, widths, layouts):
        if isinstance(p, bytes):
            mat[:, off : off + w] = np.frombuffer(p, dtype=np.uint8)
        elif layout is not None:
            row, value_at, source = layout
            chars = p.chars.reshape(n, -1)
            # Scattering bytes into the matrix costs more than gathering them, so the fewer
            # of prefix and value bytes are scattered: values into a copy of the prefix row
            # (JSON's named fields), or prefixes into the gathered values (CSV's commas).
            if len(value_at) <= len(row) - len(value_at):
                mat[:, off : off + w] = row
                mat[:, off + value_at] = chars[:, source]
            else:
                full = np.zeros(w, dtype=np.intp)
                full[value_at] = source
                block = np.take(chars, full, axis=1)
                prefix_at = np.flatnonzero(row)
                block[:, prefix_at] = row[prefix_at]
                mat[:, off : off + w] = block
        else:
            mat[:, off : off + w] = p[0]
        off += w
    return mat[mat != 0].tobytes()
