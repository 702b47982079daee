"""Flow tables as Parquet (pyarrow, the optional extra ``quietwire[parquet]``): the same rows
as the CSV, typed (counts uint64, ports uint16 with null where the protocol has none, times
timestamp[us, UTC], each feature float32 with NaN where it does not apply), and the feature
schema's hash, version and name in the file's key-value metadata, each feature's unit and
meaning in its field's metadata.

pyarrow rather than polars or fastparquet: with byte-stream-split floats and no dictionary
for them it writes these tables faster and smaller than either, and imports in less time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from quietwire.agent.detect.model import Scores
from quietwire.agent.features.schema import (
    FEATURE_NAMES,
    SCHEMA,
    SCHEMA_HASH,
    SCHEMA_NAME,
    SCHEMA_VERSION,
    MeteredFlows,
)
from quietwire.agent.flow.identity import PROTO_NAMES, ip_codes, iso_times
from quietwire.agent.flow.records import END_REASONS, FlowRecords
from quietwire.agent.output import columntext as tf
from quietwire.agent.output.tablefields import ID_FIELDS, FlowFileError, StoredFlows

INSTALL_HINT = "pip install 'quietwire[parquet]'"
META_HASH = b"quietwire.schema_hash"
META_VERSION = b"quietwire.schema_version"
META_NAME = b"quietwire.schema_name"
ROW_GROUP = 1 << 16  # rows buffered before a row group is written
_DICTIONARY = ["proto", "end_reason", "schema_hash", "src_ip", "dest_ip"]


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise FlowFileError(
            f"Parquet needs pyarrow, which is not installed: {INSTALL_HINT}"
        ) from exc
    return pa, pq


def _column(pa, type_, values: np.ndarray, null: np.ndarray | None = None):
    """An Arrow array over a numpy column's bytes, ``null`` marking null rows. Arrow arrays
    are built from buffers, never by ``pa.array``, which imports pandas where it is
    installed, a cost at every start of the command."""
    values = np.ascontiguousarray(values)
    if values.dtype.itemsize * 8 != type_.bit_width:
        raise TypeError(f"a {values.dtype} column cannot hold Arrow {type_}")
    validity = None
    if null is not None and null.any():
        validity = pa.py_buffer(np.packbits(~null, bitorder="little"))
    return pa.Array.from_buffers(type_, len(values), [validity, pa.py_buffer(values)])


def _strings(pa, texts: list[str], codes: np.ndarray | None = None):
    """An Arrow string array of ``texts`` (of ``texts[codes]`` with ``codes``)."""
    encoded = [t.encode() for t in texts]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int32)
    np.cumsum([len(t) for t in encoded], out=offsets[1:])
    array = pa.StringArray.from_buffers(
        len(encoded), pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))
    )
    if codes is None:
        return array
    return array.take(_column(pa, pa.int64(), np.asarray(codes, dtype=np.int64).reshape(-1)))


def arrow_schema(scored: bool = False):
    """The table's columns and types, with the feature schema in its metadata."""
    pa, _ = _pyarrow()
    count = pa.uint64()
    types = {
        "flow_id": pa.uint64(),
        "community_id": pa.string(),
        "start": pa.timestamp("us", tz="UTC"),
        "end": pa.timestamp("us", tz="UTC"),
        "src_ip": pa.string(),
        "src_port": pa.uint16(),
        "dest_ip": pa.string(),
        "dest_port": pa.uint16(),
        "proto": pa.string(),
        "ip_version": pa.uint8(),
        "pkts_toserver": count,
        "pkts_toclient": count,
        "bytes_toserver": count,
        "bytes_toclient": count,
        "end_reason": pa.string(),
        "schema_hash": pa.string(),
    }
    fields = [pa.field(k, types[k], nullable=k.endswith("_port")) for k in ID_FIELDS]
    if scored:
        fields += [
            pa.field("score", pa.float64(), nullable=False),
            pa.field("tail_probability", pa.float64(), nullable=False),
            pa.field("top_features", pa.string(), nullable=False),
        ]
    fields += [
        pa.field(
            f.name,
            pa.float32(),
            nullable=False,
            metadata={
                "unit": f.unit,
                "nan": "does not apply" if f.nullable else "never",
                "description": f.description,
            },
        )
        for f in SCHEMA
    ]
    return pa.schema(
        fields,
        metadata={
            META_HASH: SCHEMA_HASH.encode(),
            META_VERSION: str(SCHEMA_VERSION).encode(),
            META_NAME: SCHEMA_NAME.encode(),
        },
    )


class ParquetFlowWriter:
    """Row groups of up to ROW_GROUP flows; ``close`` writes the footer."""

    def __init__(self, out, scored: bool = False) -> None:
        pa, pq = _pyarrow()
        self._pa = pa
        self.schema = arrow_schema(scored)
        self._scored = scored
        self._pending: list = []
        self._rows = 0
        try:
            self._writer = pq.ParquetWriter(
                str(out) if isinstance(out, Path) else out,
                self.schema,
                compression="zstd",
                use_dictionary=_DICTIONARY,
                column_encoding=dict.fromkeys(FEATURE_NAMES, "BYTE_STREAM_SPLIT"),
            )
        except OSError as exc:
            raise FlowFileError(f"{out}: cannot write: {exc}") from exc

    def write(self, flows: MeteredFlows, scores: Scores | None = None) -> None:
        self._pending.append(self._batch(flows.records, flows.features, scores))
        self._rows += len(flows)
        if self._rows >= ROW_GROUP:
            self._flush()

    def close(self) -> None:
        self._flush()
        self._writer.close()

    def append(self, part: Path) -> None:
        """Write the row groups of a part file of the same schema."""
        self._flush()
        _, pq = _pyarrow()
        source = pq.ParquetFile(part)
        for i in range(source.num_row_groups):
            self._writer.write_table(source.read_row_group(i).cast(self.schema))

    def _flush(self) -> None:
        if self._pending:
            table = self._pa.Table.from_batches(self._pending, self.schema)
            self._writer.write_table(table, row_group_size=max(len(table), 1))
        self._pending, self._rows = [], 0

    def _batch(self, flows: FlowRecords, features: np.ndarray, scores: Scores | None):
        from quietwire.agent.flow.communityid import ID_CHARS, community_id_chars

        pa = self._pa
        no_ports = ~np.isin(flows["proto"], (6, 17, 132))
        protos, proto_codes = np.unique(flows["proto"], return_inverse=True)
        ver = flows["ip_version"]

        cols = {
            "flow_id": flows["seq"].astype(np.uint64),
            "community_id": pa.StringArray.from_buffers(  # fixed-width ASCII: offsets by step
                len(flows),
                pa.py_buffer(np.arange(len(flows) + 1, dtype=np.int32) * ID_CHARS),
                pa.py_buffer(community_id_chars(flows)),
            ),
            "start": flows["first_ns"] // 1000,
            "end": flows["last_ns"] // 1000,
            "src_ip": self._ips(ver, flows["src_hi"], flows["src_lo"]),
            "src_port": _column(pa, pa.uint16(), flows["src_port"].astype(np.uint16), no_ports),
            "dest_ip": self._ips(ver, flows["dst_hi"], flows["dst_lo"]),
            "dest_port": _column(pa, pa.uint16(), flows["dst_port"].astype(np.uint16), no_ports),
            "proto": _strings(
                pa, [PROTO_NAMES.get(p, str(p)) for p in protos.tolist()], proto_codes
            ),
            "ip_version": ver.astype(np.uint8),
            "pkts_toserver": flows["packets"][:, 0].astype(np.uint64),
            "pkts_toclient": flows["packets"][:, 1].astype(np.uint64),
            "bytes_toserver": flows["bytes"][:, 0].astype(np.uint64),
            "bytes_toclient": flows["bytes"][:, 1].astype(np.uint64),
            "end_reason": _strings(pa, list(END_REASONS), flows["end_reason"].astype(np.intp)),
            "schema_hash": _strings(pa, [SCHEMA_HASH], np.zeros(len(flows), dtype=np.intp)),
        }
        if scores is not None:
            cols["score"] = scores.score.astype(np.float64)
            cols["tail_probability"] = scores.tail_probability.astype(np.float64)
            cols["top_features"] = _strings(
                pa, [";".join(f"{n}={v:.3g}" for n, v in row) for row in scores.top_features(3)]
            )
        by_column = np.ascontiguousarray(np.asarray(features, dtype=np.float32).T)  # no copies
        for i, name in enumerate(FEATURE_NAMES):
            cols[name] = by_column[i]
        arrays = [
            c if isinstance(c, pa.Array) else _column(pa, f.type, c)
            for c, f in zip(cols.values(), self.schema)
        ]
        return pa.RecordBatch.from_arrays(arrays, schema=self.schema)

    def _ips(self, version: np.ndarray, hi: np.ndarray, lo: np.ndarray):
        """Text addresses as an Arrow string array (IPv4 by arithmetic, as the CSV writer)."""
        pa = self._pa
        if len(version) and (version == 4).all():
            block = tf.ipv4_block(lo)
            offsets = np.zeros(len(lo) + 1, dtype=np.int32)
            np.cumsum(block.lens.sum(axis=1) + 3, out=offsets[1:])  # four octets, three dots
            text = tf.assemble(len(lo), [block])
            return pa.StringArray.from_buffers(len(lo), pa.py_buffer(offsets), pa.py_buffer(text))
        return _strings(pa, *ip_codes(version, hi, lo))


def read_parquet_flows(path: Path) -> StoredFlows:
    """A Parquet table written by FlowWriter: its features (bit for bit), the span of its
    flows' times and each flow's client address. Refuses another feature schema."""
    pa, pq = _pyarrow()
    try:
        pf = pq.ParquetFile(path)
    except OSError as exc:
        raise FlowFileError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except pa.ArrowException as exc:
        raise FlowFileError(f"{path}: not a Parquet file ({exc})") from exc
    meta = pf.schema_arrow.metadata or {}
    found = meta.get(META_HASH)
    if found is None:
        raise FlowFileError(
            f"{path}: not a quietwire flow table of schema {SCHEMA_HASH} (no "
            f"{META_HASH.decode()} in its metadata)"
        )
    if found.decode(errors="replace") != SCHEMA_HASH:
        raise FlowFileError(
            f"{path}: schema_hash {found.decode(errors='replace')!r} does not match this "
            f"quietwire's feature schema {SCHEMA_HASH}"
        )
    names = set(pf.schema_arrow.names)
    missing = [n for n in FEATURE_NAMES if n not in names]
    if missing:
        raise FlowFileError(f"{path}: missing feature columns: {', '.join(missing[:5])}")
    extra = [n for n in ("start", "end", "src_ip") if n in names]
    try:
        table = pf.read(columns=[*FEATURE_NAMES, *extra])
    except pa.ArrowException as exc:
        raise FlowFileError(f"{path}: cannot read: {exc}") from exc
    features = np.empty((table.num_rows, len(FEATURE_NAMES)), dtype=np.float32)
    for i, name in enumerate(FEATURE_NAMES):
        features[:, i] = table.column(name).to_numpy()
    first = last = None
    if table.num_rows and "start" in extra and "end" in extra:
        import pyarrow.compute as pc

        lo = pc.min(table.column("start").cast(pa.int64())).as_py()
        hi = pc.max(table.column("end").cast(pa.int64())).as_py()
        if lo is not None and hi is not None:
            first, last = iso_times(np.array([lo, hi], dtype=np.int64) * 1000)
    hosts = (
        tuple(table.column("src_ip").to_pylist()) if "src_ip" in extra else ("",) * len(features)
    )
    return StoredFlows(features, first, last, tuple(h or "" for h in hosts))
