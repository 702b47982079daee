"""Shared test helpers: crafted captures (scapy writes them) and the real corpus in ../shared."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import pytest
from scapy.all import wrpcap

from quietwire.agent.capture.pcap import read_capture
from quietwire.agent.features.meter import FlowMeter
from quietwire.agent.features.schema import MeteredFlows

REPO = Path(__file__).resolve().parent.parent

# The trainer's tests: one intra-op thread and deterministic kernels, so one machine always
# trains the same model. Other CPUs may still take other kernels and train a slightly other
# one: the learned-quality bounds in test_trainer.py come from the measured spread.
try:
    import torch

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
except ImportError:  # an agent-only install: the trainer's tests skip
    pass
SHARED = Path(os.environ.get("QUIETWIRE_SHARED", REPO.parent / "shared")) / "data" / "ndpi"


@pytest.fixture(scope="session")
def ndpi() -> Path:
    """The nDPI corpus (pcap/ and result/); skipped in a user's clone, required in CI."""
    if not (SHARED / "pcap").is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the shared captures are missing at {SHARED}")
        pytest.skip(f"shared captures not found at {SHARED} (a user's clone has no ../shared)")
    return SHARED


def write_pcap(path: Path, packets: list, times: list[float]) -> Path:
    for pkt, t in zip(packets, times):
        pkt.time = t
    wrpcap(str(path), packets)
    return path


def meter_file(
    path: Path, chunk_bytes: int = 8 << 20, keep_interim: bool = False, **config
) -> MeteredFlows:
    """Every flow of a capture, in flow-start order, with features; interim records of flows
    still open (made as by default) only with ``keep_interim``."""
    from quietwire.agent.flow.records import INTERIM, FlowRecords
    from quietwire.agent.flow.table import FlowConfig

    meter = FlowMeter(FlowConfig(**config) if config else None, seed=1)
    parts = [meter.add(b) for b in read_capture(path, chunk_bytes=chunk_bytes)]
    parts.append(meter.flush())
    records = FlowRecords.concat([p.records for p in parts])
    feats = np.concatenate([p.features for p in parts]) if parts else np.zeros((0, 0))
    order = np.argsort(records["seq"], kind="stable")
    if not keep_interim:
        order = order[records["end_reason"][order] != INTERIM]
    return MeteredFlows(records.take(order), feats[order])


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


REPLAY_FILES = ("synscan.pcap", "1kxun.pcap", "dns-tunnel-iodine.pcap")


@contextlib.contextmanager
def serving_replay(ndpi: Path, tmp_path: Path):
    """`quietwire replay REPLAY_FILES --serve-metrics`: yields (metrics port, summary line)
    once the replay is done and still serving; stops it with SIGTERM, which must exit 0."""
    import signal
    import subprocess
    import sys

    port = free_port()
    files = [str(ndpi / "pcap" / f) for f in REPLAY_FILES]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "quietwire.cli",
            "replay",
            *files,
            "--serve-metrics",
            f"127.0.0.1:{port}",
            "--alerts",
            str(tmp_path / "alerts.json"),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "still serving metrics" in line:
                break
        yield port, next(x for x in lines if x.startswith("replay: "))
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
