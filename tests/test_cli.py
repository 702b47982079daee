"""`quietwire flows` end to end: the bundled default, every capture of the corpus, damaged
files (error line, exit 1, flows before the damage written) and the flow table read back."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from quietwire.agent.features.schema import FEATURE_NAMES, SCHEMA_HASH
from quietwire.agent.output.flowtable import read_flow_table
from quietwire.agent.output.tablefields import FlowFileError
from quietwire.cli import DEFAULT_CAPTURE, main

from .conftest import meter_file


def test_default_run_on_the_bundled_capture(tmp_path, capsys):
    out = tmp_path / "flows.csv"
    assert main(["flows", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "sample.pcap: 500 packets, 63 flows (+7 interim records)" in err
    rows = list(csv.DictReader(out.open()))
    ended = [r for r in rows if r["end_reason"] != "interim"]
    assert len(ended) == 63 and len(rows) == 70
    assert {r["schema_hash"] for r in rows} == {SCHEMA_HASH}
    assert sum(int(r["pkts_toserver"]) + int(r["pkts_toclient"]) for r in ended) == 475
    # rows come as flows end (a flow's interim records before its end); the reference is in
    # start (flow_id) order
    X = read_flow_table(out)[np.argsort([int(r["flow_id"]) for r in rows], kind="stable")]
    ref = meter_file(DEFAULT_CAPTURE, keep_interim=True).features
    np.testing.assert_allclose(X, ref, rtol=1e-6, equal_nan=True)


def test_console_script_help():
    res = subprocess.run(
        [sys.executable, "-m", "quietwire.cli", "flows", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--idle-timeout" in res.stdout and "--format" in res.stdout


def test_each_command_is_found_in_its_own_module():
    """`quietwire COMMAND` builds only COMMANDS[COMMAND]'s parser: every subcommand a module
    registers is listed there with that module, and the full parser has no other."""
    import argparse
    import importlib

    from quietwire.cli import COMMAND_MODULES, COMMANDS, build_parser

    registered = {}
    for name in COMMAND_MODULES:
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(f"quietwire.cli.{name}").register(sub)
        registered.update(dict.fromkeys(sub.choices, name))
    assert registered == COMMANDS
    full = build_parser()._subparsers._group_actions[0].choices
    assert set(full) == set(COMMANDS)


def test_jsonl_round_trip(tmp_path, capsys):
    out = tmp_path / "f.jsonl"
    assert main(["flows", str(DEFAULT_CAPTURE), "-o", str(out), "-q"]) == 0
    lines = [json.loads(line) for line in out.open()]
    assert set(lines[0]["features"]) == set(FEATURE_NAMES)
    assert lines[0]["community_id"].startswith("1:")
    X = read_flow_table(out)[np.argsort([r["flow_id"] for r in lines], kind="stable")]
    ref = meter_file(DEFAULT_CAPTURE, keep_interim=True).features
    np.testing.assert_allclose(X, ref, rtol=1e-6, equal_nan=True)


def test_truncated_capture_writes_what_came_before(tmp_path, capsys):
    raw = DEFAULT_CAPTURE.read_bytes()
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(raw[: len(raw) // 2 + 7])
    out = tmp_path / "f.csv"
    assert main(["flows", str(cut), str(DEFAULT_CAPTURE), "-o", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("quietwire: error:")]
    assert len(errors) == 1 and "cut.pcap: truncated record at offset" in errors[0]
    rows = list(csv.DictReader(out.open()))
    assert 63 < len(rows) < 2 * 63  # half a capture's flows, then the whole second file


def test_flow_table_with_another_schema_is_refused(tmp_path, capsys):
    out = tmp_path / "f.csv"
    main(["flows", "-o", str(out), "-q"])
    text = out.read_text().replace(SCHEMA_HASH, "0123456789abcdef", 3)
    out.write_text(text)
    with pytest.raises(FlowFileError, match=r"f\.csv: line 2: schema_hash '0123456789abcdef'"):
        read_flow_table(out)
    bad = tmp_path / "other.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(FlowFileError, match="other.csv: line 1: not a quietwire flow table"):
        read_flow_table(bad)


def test_bad_option_value_is_one_clear_line(capsys):
    assert main(["flows", "--idle-timeout", "0", "-q"]) == 2
    assert (
        capsys.readouterr().err.strip() == "quietwire: error: idle_timeout_s must be > 0, got 0.0"
    )


def test_a_stage_error_no_command_handles_is_one_line(monkeypatch, capsys):
    """Any QuietwireError a command lets through: one line, exit 2, no traceback."""
    from quietwire.agent.errors import QuietwireError
    from quietwire.cli import flows

    def failing(args) -> int:
        raise QuietwireError("model.onnx: made for another schema\n(retrain it)")

    monkeypatch.setattr(flows, "cmd_schema", failing)
    assert main(["schema"]) == 2
    err = capsys.readouterr().err
    assert err == "quietwire: error: model.onnx: made for another schema (retrain it)\n"


def test_every_corpus_capture_goes_through(ndpi, tmp_path, capsys):
    """All 544 files, fuzzer-made ones included: no traceback; damaged ones give one error
    line each and exit 1, the rest exit 0."""
    files = sorted((ndpi / "pcap").iterdir())
    assert len(files) == 544
    failed = []
    for path in files:
        code = main(["flows", str(path), "-o", str(tmp_path / "out.csv"), "-q"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code in (0, 1), path.name
        if code:
            assert len(err) == 1 and err[0].startswith(f"quietwire: error: {path}"), err
            failed.append(path.name)
        else:
            assert err == [], (path.name, err)
    # README.txt (not a capture) and one fuzzed file with a 512 KiB record length
    assert sorted(failed) == ["README.txt", "fuzz-2021-10-13.pcap"]


def test_flows_scored_with_the_bundled_model(ndpi, tmp_path, capsys):
    out = tmp_path / "scored.csv"
    scan = ndpi / "pcap" / "synscan.pcap"
    assert main(["flows", "--score", str(DEFAULT_CAPTURE), str(scan), "-o", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert sum(r["end_reason"] != "interim" for r in rows) == 63 + 1994
    scan_scores = [float(r["score"]) for r in rows if r["src_ip"] == "172.16.0.8"]
    benign_scores = [float(r["score"]) for r in rows if r["src_ip"] != "172.16.0.8"]
    assert np.median(scan_scores) > np.percentile(benign_scores, 90)
    assert all(0 < float(r["tail_probability"]) <= 1 for r in rows)
    assert rows[0]["top_features"].count("=") == 3
    assert "flows above the threshold for FPR 0.01" in capsys.readouterr().err


def test_train_and_sample_commands(tmp_path, capsys):
    pytest.importorskip("torch")
    table = tmp_path / "benign.csv"
    assert main(["flows", "-q", str(DEFAULT_CAPTURE), "-o", str(table)]) == 0
    model = tmp_path / "m.onnx"
    assert main(["train", "--benign", str(table), "-o", str(model), "--train-steps", "20"]) == 0
    printed = capsys.readouterr()
    assert (
        "benign records: 70 (63 flows, 7 interim records of open flows) from 1 files" in printed.err
    )
    assert (
        "records: 50 trained, 20 held out for calibration" in printed.out
    )  # 70 records, >= 20 held out
    assert (
        main(
            [
                "train",
                "--benign",
                str(table),
                "--train-steps",
                "20",
                "-o",
                str(tmp_path / "x.onnx"),
                "--trim",
                "0.7",
            ]
        )
        == 2
    )
    assert "trim must be in [0, 0.5)" in capsys.readouterr().err
    refused = ["train", "--benign", str(table), "-o", str(tmp_path / "y.onnx")]
    assert main([*refused, "--mask-augment", "1.5"]) == 2
    assert "mask_augment must be in [0, 1), got 1.5" in capsys.readouterr().err
    assert not (tmp_path / "y.onnx").exists()
    synth = tmp_path / "synth.csv"
    assert (
        main(
            ["sample", "--model", str(model), "-n", "40", "-o", str(synth), "--compare", str(table)]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "classifier AUC synthetic vs real" in out
    from quietwire.agent.output.flowtable import read_flow_table

    assert read_flow_table(synth).shape == (40, len(FEATURE_NAMES))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    assert main(["sample", "--model", str(bad)]) == 2
    assert "bad.onnx: cannot load model" in capsys.readouterr().err
