"""Flow table output (agent/output/columntext.py, agent/output/flowtable.py, agent/output/parquet.py) and
many files on many cores (agent/parallel/filepool.py): the vectorised text against Python's own
formatting of the same flows, Parquet round trips, --workers against one process."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from quietwire.agent.capture.pcap import read_capture
from quietwire.agent.detect.model import DEFAULT_MODEL, ScoringModel
from quietwire.agent.features.meter import FlowMeter
from quietwire.agent.features.schema import FEATURE_NAMES, SCHEMA_HASH, SCHEMA_VERSION, MeteredFlows
from quietwire.agent.flow.records import FlowRecords
from quietwire.agent.output.columntext import assemble, g9, integers, replace
from quietwire.agent.output.flowtable import FlowWriter, read_stored_flows
from quietwire.agent.output.tablefields import ID_FIELDS, FlowFileError, identity_columns
from quietwire.cli import DEFAULT_CAPTURE, main

from .conftest import meter_file

SCAN = DEFAULT_CAPTURE.with_name("scan.pcap")


def _texts(chars, lens) -> list[str]:
    """The texts of a column, after checking that every byte past a text is NUL (assemble
    keeps a row's bytes that are not NUL)."""
    past = np.arange(chars.shape[1]) >= np.asarray(lens)[:, None]
    assert not chars[past].any(), "a byte past a text's length is not NUL"
    return [bytes(c[:n]).decode() for c, n in zip(chars, lens.tolist())]


def test_g9_is_pythons_percent_9g():
    rng = np.random.default_rng(7)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    edge = [2.0**-13, -(2.0**-13), 0.0, -0.0, 1e8, 1e9, 999999999.5, 99999999.5, 1e-4]
    edge += [9.9999999e-5, 1e-5, 123456789.0, 0.5, 1.0, 1e16, 3.4e38, 1.4e-45, 1e-14, 1e30]
    values = np.concatenate(
        [
            bits.view(np.float32),  # every exponent, NaN payloads, subnormals
            np.array(edge + [math.inf, -math.inf, math.nan], dtype=np.float32),
            rng.integers(0, 2**24, 50_000).astype(np.float32),
            (rng.integers(0, 10**6, 50_000) / rng.integers(1, 1000, 50_000)).astype(np.float32),
            np.arange(-1500, 1500, 0.25, dtype=np.float32),  # whole numbers by table, and not
        ]
    )
    got = _texts(*g9(values))
    with np.errstate(invalid="ignore"):
        want = [f"{x:.9g}" for x in values.astype(np.float64).tolist()]
    assert got == want
    assert _texts(*g9(np.array([math.nan, math.inf, -math.inf], np.float32), b"null", b"Inf")) == [
        "null",
        "Inf",
        "-Inf",
    ]


def test_integers():
    signed = np.array([0, 7, 10, 99, 100, 2**63 - 1, -1, -120, -(2**63)], dtype=np.int64)
    assert _texts(*integers(signed)) == [str(v) for v in signed.tolist()]
    unsigned = np.array([0, 2**64 - 1, 10**19, 5], dtype=np.uint64)
    assert _texts(*integers(unsigned)) == [str(v) for v in unsigned.tolist()]
    rng = np.random.default_rng(3)  # every width, both signs, in one column
    mixed = rng.integers(-(2**63), 2**63 - 1, 5000) >> rng.integers(0, 64, 5000)
    assert _texts(*integers(mixed)) == [str(v) for v in mixed.tolist()]
    for dtype in (np.uint8, np.int16, np.uint32):
        small = rng.integers(0, 200, 300).astype(dtype)
        assert _texts(*integers(small)) == [str(v) for v in small.tolist()]
    assert _texts(*integers(np.zeros(0, dtype=np.int64))) == []


def test_replace_and_assemble():
    ports = integers(np.array([443, 8, 65535, 53], dtype=np.uint16))
    assert _texts(*replace(ports, np.array([False, True, True, False]), b"")) == [
        "443",
        "",
        "",
        "53",
    ]
    null = replace(ports, np.array([1]), b"null")
    assert _texts(*null) == ["443", "null", "65535", "53"]
    rows = assemble(4, [b"[", null, b"]\n"])
    assert rows == b"[443]\n[null]\n[65535]\n[53]\n"


def _reference_csv(parts, scores=None) -> str:
    """The rows written per cell in Python: the reference the column-at-a-time writer must
    match byte for byte."""
    extra = ("score", "tail_probability", "top_features") if scores else ()
    lines = [",".join((*ID_FIELDS, *extra, *FEATURE_NAMES))]
    row = ",".join(["%.9g"] * len(FEATURE_NAMES))
    for i, part in enumerate(parts):
        ident = identity_columns(part.records)
        cols = [ident[k] for k in ID_FIELDS]
        if scores:
            s = scores[i]
            cols += [
                [f"{v:.6g}" for v in s.score.tolist()],
                [f"{v:.6g}" for v in s.tail_probability.tolist()],
                [";".join(f"{n}={v:.3g}" for n, v in r) for r in s.top_features(3)],
            ]
        for ids, f in zip(zip(*cols), part.features.tolist()):
            text = ",".join("" if v is None else str(v) for v in ids)
            lines.append(text + "," + (row % tuple(f)).replace("nan", ""))
    return "\n".join(lines) + "\n"


def _parts(path):
    whole = meter_file(path, keep_interim=True)
    half = len(whole) // 2  # two writes, as the meter hands batches over
    cuts = [slice(0, half), slice(half, None)] if half else [slice(None)]
    return [MeteredFlows(whole.records.take(c), whole.features[c]) for c in cuts]


def _capture(ndpi):
    return ndpi / "pcap" / "dns_exfiltration.pcap"


@pytest.mark.parametrize("scored", [False, True])
def test_csv_bytes_are_the_per_cell_writers(ndpi, scored):
    model = ScoringModel(DEFAULT_MODEL) if scored else None
    for path in (DEFAULT_CAPTURE, SCAN, _capture(ndpi)):
        parts = _parts(path)
        scores = [model.score(p.features) for p in parts] if scored else None
        out = io.StringIO()
        writer = FlowWriter(out, "csv", scored=scored)
        for i, p in enumerate(parts):
            writer.write(p, scores[i] if scored else None)
        assert out.getvalue() == _reference_csv(parts, scores), path
        assert writer.rows == sum(len(p) for p in parts)


def test_jsonl_holds_the_same_values(tmp_path, ndpi):
    """JSON lines keep the keys and identity of json.dumps rows; the features are written as
    the flow log writes them ('%.9g', NaN null), which reads back to the same float32."""
    model = ScoringModel(DEFAULT_MODEL)
    for path in (DEFAULT_CAPTURE, _capture(ndpi)):
        parts = _parts(path)
        out = io.StringIO()
        writer = FlowWriter(out, "jsonl", scored=True)
        for p in parts:
            writer.write(p, model.score(p.features))
        rows = [json.loads(line) for line in out.getvalue().splitlines()]
        feats = np.concatenate([p.features for p in parts])
        assert len(rows) == len(feats)
        ident = {k: sum((identity_columns(p.records)[k] for p in parts), []) for k in ID_FIELDS}
        for i, row in enumerate(rows):
            assert list(row) == [
                *ID_FIELDS,
                "score",
                "tail_probability",
                "top_features",
                "features",
            ]
            assert {k: row[k] for k in ID_FIELDS} == {k: ident[k][i] for k in ID_FIELDS}
            assert list(row["features"]) == list(FEATURE_NAMES)
        got = np.array(
            [[math.nan if v is None else v for v in r["features"].values()] for r in rows],
            dtype=np.float32,
        )
        assert np.array_equal(got, feats, equal_nan=True)  # NaN payloads aside, bit for bit
        assert np.array_equal(np.isnan(got), np.isnan(feats))
        table = tmp_path / f"{path.stem}.jsonl"
        table.write_text(out.getvalue())
        assert np.array_equal(read_stored_flows(table).features, got, equal_nan=True)


def _pq():
    return pytest.importorskip("pyarrow.parquet")


def _as_cli_meters(path) -> MeteredFlows:
    """Every record of a capture in the order `quietwire flows` writes them."""
    meter = FlowMeter()
    parts = [meter.add(b) for b in read_capture(path)] + list(meter.drain())
    return MeteredFlows(
        FlowRecords.concat([p.records for p in parts]), np.concatenate([p.features for p in parts])
    )


def test_parquet_round_trip(tmp_path, ndpi):
    pq = _pq()
    for path in (DEFAULT_CAPTURE, _capture(ndpi)):
        out = tmp_path / f"{path.stem}.parquet"
        assert main(["flows", str(path), "-o", str(out), "-q"]) == 0
        assert main(["flows", str(path), "-o", str(tmp_path / "same.csv"), "-q"]) == 0
        metered = _as_cli_meters(path)
        stored = read_stored_flows(out)
        assert stored.features.dtype == np.float32
        assert np.array_equal(stored.features.view(np.uint32), metered.features.view(np.uint32))
        text = read_stored_flows(tmp_path / "same.csv")
        assert (stored.first_start, stored.last_end, stored.hosts) == (
            text.first_start,
            text.last_end,
            text.hosts,
        )
        table = pq.read_table(out)
        meta = table.schema.metadata
        assert meta[b"quietwire.schema_hash"] == SCHEMA_HASH.encode()
        assert meta[b"quietwire.schema_version"] == str(SCHEMA_VERSION).encode()
        assert table.column_names == [*ID_FIELDS, *FEATURE_NAMES]
        assert str(table.schema.field("duration_s").type) == "float"
        assert str(table.schema.field("bytes_toserver").type) == "uint64"
        ident = identity_columns(metered.records)
        assert table.column("src_port").to_pylist() == ident["src_port"]  # null without ports
        assert table.column("community_id").to_pylist() == ident["community_id"]
        assert table.column("end_reason").to_pylist() == ident["end_reason"]


def test_parquet_writing_does_not_import_pandas(tmp_path):
    """pa.array imports pandas where it is installed (a cost at every start): the
    writer builds its arrays from buffers. A fresh interpreter, as the command runs."""
    _pq()
    pytest.importorskip("pandas")
    out = tmp_path / "scored.parquet"
    code = (
        "import sys; from quietwire.cli import main; "
        f"rc = main(['flows', {str(SCAN)!r}, '--score', '-o', {str(out)!r}, '-q']); "
        "print(rc, 'pandas' in sys.modules)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.stdout.split() == ["0", "False"], run.stderr


def test_parquet_of_another_schema_is_refused(tmp_path):
    pq = _pq()
    good = tmp_path / "good.parquet"
    assert main(["flows", str(DEFAULT_CAPTURE), "-o", str(good), "-q"]) == 0
    table = pq.read_table(good)
    meta = dict(table.schema.metadata)
    meta[b"quietwire.schema_hash"] = b"0123456789abcdef"
    other = tmp_path / "other.parquet"
    pq.write_table(table.replace_schema_metadata(meta), other)
    with pytest.raises(FlowFileError, match=r"other\.parquet: schema_hash '0123456789abcdef'"):
        read_stored_flows(other)
    plain = tmp_path / "plain.parquet"
    pq.write_table(table.replace_schema_metadata({}), plain)
    with pytest.raises(FlowFileError, match=r"plain\.parquet: not a quietwire flow table"):
        read_stored_flows(plain)


def test_missing_pyarrow_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    code = main(["flows", str(DEFAULT_CAPTURE), "-o", str(tmp_path / "f.parquet"), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [
        "quietwire: error: Parquet needs pyarrow, which is not installed: "
        "pip install 'quietwire[parquet]'"
    ]


def test_train_and_calibrate_read_parquet(tmp_path):
    _pq()
    from quietwire.agent.site.sources import read_site_flows
    from quietwire.trainer.data import load_benign

    table = tmp_path / "benign.parquet"
    assert main(["flows", str(DEFAULT_CAPTURE), "-o", str(table), "-q"]) == 0
    want = read_stored_flows(table).features
    data = load_benign([table], known_malicious={})
    assert np.array_equal(data.features.view(np.uint32), want.view(np.uint32))
    assert data.sources == [(str(table), len(want))]
    site = read_site_flows([table])
    assert np.array_equal(site.features.view(np.uint32), want.view(np.uint32))
    assert main(["flows", str(DEFAULT_CAPTURE), "-o", str(tmp_path / "b.csv"), "-q"]) == 0
    text = read_stored_flows(tmp_path / "b.csv")
    assert (site.first_start, site.last_end) == (text.first_start, text.last_end)
    assert site.first_start is not None


def _three(ndpi):
    return [str(DEFAULT_CAPTURE), str(SCAN), str(_capture(ndpi))]


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_flows_workers_match_one_process(tmp_path, ndpi, fmt, capsys):
    if fmt == "parquet":
        _pq()
    files = _three(ndpi)
    one, two = tmp_path / f"one.{fmt}", tmp_path / f"two.{fmt}"
    assert main(["flows", *files, "-o", str(one), "--score"]) == 0
    first = capsys.readouterr().err.splitlines()
    assert main(["flows", *files, "-o", str(two), "--score", "--workers", "2"]) == 0
    second = capsys.readouterr().err.splitlines()
    assert first[:-1] == second[:-1]  # per-file lines in input order, the model's count
    assert first[-1].split(" in ")[0] == second[-1].split(" in ")[0]
    if fmt == "parquet":
        pq = _pq()
        a, b = pq.read_table(one), pq.read_table(two)
        assert a.schema.equals(b.schema, check_metadata=True)
        for name in a.column_names:
            x, y = a.column(name), b.column(name)
            if str(x.type) == "float":
                assert np.array_equal(x.to_numpy().view(np.uint32), y.to_numpy().view(np.uint32))
            else:
                assert x.equals(y), name
    else:
        assert one.read_bytes() == two.read_bytes()


def test_flows_workers_name_a_damaged_file(tmp_path, capsys):
    damaged = tmp_path / "cut.pcap"
    damaged.write_bytes(SCAN.read_bytes()[:3001])
    files = [str(DEFAULT_CAPTURE), str(damaged), str(SCAN)]
    assert main(["flows", *files, "-o", str(tmp_path / "one.csv"), "-q"]) == 1
    first = capsys.readouterr().err
    assert main(["flows", *files, "-o", str(tmp_path / "two.csv"), "-q", "-w", "2"]) == 1
    second = capsys.readouterr().err
    assert first == second and first.startswith(f"quietwire: error: {damaged}")
    assert (tmp_path / "one.csv").read_bytes() == (tmp_path / "two.csv").read_bytes()


def _alerts(path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        record.pop("timestamp", None)
        record.get("quietwire", {}).get("incident", {}).pop("id", None)  # random per incident
        out.append(record)
    return out


def test_replay_workers_match_one_process(tmp_path, ndpi, capsys):
    files = _three(ndpi)
    runs = []
    for name, extra in (("one", []), ("two", ["--workers", "2"])):
        log = tmp_path / f"{name}.log"
        alerts = tmp_path / f"{name}.json"
        args = ["replay", *files, "--alerts", str(alerts), "--flow-alerts"]
        args += ["--flow-log", str(log), "--flow-log-no-gzip", *extra]
        assert main(args) == 0
        summary = capsys.readouterr().err.splitlines()
        runs.append((_alerts(alerts), log.read_bytes(), summary))
    (a1, log1, s1), (a2, log2, s2) = runs
    assert a1 and a1 == a2
    assert log1 == log2
    assert s1[0].split("; ")[0] == s2[0].split("; ")[0]  # counts (the time differs)
    assert [x for x in s1[0].split("; ")[2:]] == [x for x in s2[0].split("; ")[2:]]


def test_replay_with_workers_of_one_file_replays_it(tmp_path, capsys):
    """Workers meter files side by side; one file is read in this process, not skipped."""
    from quietwire import DATA

    summaries = []
    for extra in ([], ["--workers", "2"]):
        assert (
            main(["replay", str(DATA / "scan.pcap"), "--alerts", str(tmp_path / "a.json"), *extra])
            == 0
        )
        summaries.append(capsys.readouterr().err.splitlines()[0].split("; ")[0])
    assert summaries[0] == summaries[1]
    assert not summaries[1].startswith("replay: 0 packets")


def test_the_alert_file_survives_a_full_disk_and_tears_no_line(tmp_path, monkeypatch):
    """The disk fills in the middle of a line, then takes nothing; the lines wait in the
    queue, a retry (after RETRY_S, the file reopened) writes them from where they stopped:
    every line exactly once, none torn. Past the queue the oldest are dropped, counted."""
    import errno
    import os

    from quietwire.agent.output import alerts

    now = [0.0]
    messages = []
    out = tmp_path / "alerts.json"
    sink = alerts.AlertSink(out, log=messages.append, clock=lambda: now[0])
    real_write = os.write
    state = {"room": 100}  # bytes the disk still takes

    def write(fd, data):
        if state["room"] is None:
            return real_write(fd, data)
        if state["room"] == 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = real_write(fd, bytes(data[: state["room"]]))
        state["room"] -= n
        return n

    monkeypatch.setattr(alerts.os, "write", write)
    records = [{"n": i, "pad": "x" * 40} for i in range(10)]
    sink.write(records[:5])
    assert sink.errors == 1 and 0 < sink.queued < 5 and len(messages) == 1
    assert "alerts.json: cannot write alert lines (No space left on device)" in messages[0]
    sink.write(records[5:])  # within RETRY_S: queued, not tried
    assert sink.errors == 1 and sink.queued > 5
    state["room"] = None  # space again
    now[0] = alerts.RETRY_S + 1
    sink.flush()
    assert sink.queued == 0 and sink.dropped == 0
    assert [json.loads(x)["n"] for x in out.read_text().splitlines()] == list(range(10))
    # a long outage: the queue holds QUEUE_LINES, the rest are dropped and counted
    state["room"] = 0
    monkeypatch.setattr(alerts, "QUEUE_LINES", 4)
    sink.write(records)
    assert sink.queued == 4 and sink.dropped == 6
    sink.close()  # a last try fails too: the queued lines are lost, and counted
    assert sink.dropped == 10 and len(out.read_text().splitlines()) == 10


def test_replay_with_its_alert_file_on_a_full_device(tmp_path, capsys):
    """`replay --alerts /dev/full`: the run completes (exit 0), the summary says how many
    writes failed and lines were lost, the log names the file once."""
    from quietwire import DATA

    assert main(["replay", str(DATA / "scan.pcap"), "--alerts", "/dev/full"]) == 0
    err = capsys.readouterr().err
    assert "1 incidents (port_scan 1), 2 alerts" in err
    assert "; alert file: " in err and "2 lines lost" in err
    assert err.count("/dev/full: cannot write alert lines (No space left on device)") == 1


def test_a_reader_that_closes_stdout_is_left_alone():
    """`quietwire replay | head -1`: the reader goes away; writing on is not an error."""
    from quietwire.agent.output.alerts import AlertSink

    class Closed:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    sink = AlertSink(stream=Closed())
    sink.write([{"a": 1}])
    sink.write([{"a": 2}])
    sink.close()
    assert sink.written == 2 and sink.errors == 0


def test_replay_piped_into_head_exits_quietly(tmp_path):
    """`quietwire replay --flow-alerts | head -1`: the reader closes the pipe after one line;
    the replay finishes with exit 0 and no traceback."""
    import subprocess
    import sys

    from quietwire import DATA

    script = (
        f"{sys.executable} -m quietwire.cli replay {DATA / 'scan.pcap'} --flow-alerts "
        f"2>{tmp_path / 'err.txt'} | head -1; echo ${{PIPESTATUS[0]}}"
    )
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    first, status = done.stdout.splitlines()
    assert json.loads(first)["event_type"] == "alert" and status == "0"
    err = (tmp_path / "err.txt").read_text()
    assert "replay: 2011 packets" in err and "Traceback" not in err and "Exception" not in err
