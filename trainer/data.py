"""Training data: benign captures through the agent's own extractor (train/serve parity),
flow tables that `quietwire flows` wrote, and flow logs the agent wrote (agent/output/flowlog.py:
live, rotated and gzipped files, read by the agent's own reader).

However much comes in, memory is bounded: the flows go through a seeded, host-balanced
reservoir (``HostReservoir``) that keeps at most ``max_flows`` of them.
"""

from __future__ import annotations

import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from quietwire import DATA
from quietwire.agent.capture.pcap import CaptureError, read_capture
from quietwire.agent.features.meter import FlowMeter
from quietwire.agent.features.schema import FEATURE_NAMES
from quietwire.agent.flow.identity import format_ips
from quietwire.agent.output.flowlog import FlowLogStats, is_flow_log, read_flow_log
from quietwire.agent.output.flowtable import read_stored_flows
from quietwire.agent.output.tablefields import FlowFileError
from quietwire.trainer.model.detector import TrainingError

LABELS = DATA / "ndpi_labels.yaml"
CAPTURE_SUFFIXES = {".pcap", ".pcapng", ".cap"}
TABLE_SUFFIXES = {".csv", ".parquet"}  # a .jsonl table: the flow log reader takes both
MAX_FLOWS = 1_000_000  # the default reservoir: 312 MB of features
HOST_BUCKETS = 1 << 20  # hosts are counted in this many hash buckets (8 MiB)


@dataclass
class Dataset:
    features: np.ndarray
    sources: list[tuple[str, int]] = field(default_factory=list)  # (file, flows)
    warnings: list[str] = field(default_factory=list)
    flows_read: int = 0  # before sampling
    hosts: int = 0  # distinct client hosts seen (hash buckets; exact for fewer than ~1,000)


def load_labels(path: Path = LABELS) -> dict:
    """The label file: {'malicious': {file: reason}, 'benign': [file, ...]}."""
    try:
        labels = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise TrainingError(f"{path}: cannot read labels ({exc})") from exc
    if (
        not isinstance(labels, dict)
        or not isinstance(labels.get("malicious"), dict)
        or not isinstance(labels.get("benign"), list)
    ):
        raise TrainingError(f"{path}: expected keys 'malicious' (a mapping) and 'benign' (a list)")
    return labels


def expand(paths: list[Path]) -> list[Path]:
    """Files as given; directories become their captures, flow tables and flow logs, sorted
    (a flow log's rotated files sort by their time)."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out += sorted(f for f in p.iterdir() if f.is_file() and _readable(f))
        elif p.exists():
            out.append(p)
        else:
            raise TrainingError(f"{p}: no such file or directory")
    return out


def _readable(path: Path) -> bool:
    return path.suffix in CAPTURE_SUFFIXES | TABLE_SUFFIXES or is_flow_log(path)


class HostReservoir:
    """A seeded sample of at most ``capacity`` flows from a stream of any length, balanced
    across client hosts: every host weighs the same, so one chatty host or scanner cannot
    fill it, and a host with fewer flows than its share keeps them all.

    Each flow draws u ~ U(0, 1); its key is u times the flows seen so far from its host, and
    the ``capacity`` smallest keys are kept (priority sampling with weight 1 / host flows).
    Keys are recomputed with the current counts at each batch, so a host that keeps talking
    loses ground to quiet ones. Hosts are counted in hash buckets (crc32 of the address), a
    fixed 8 MiB whatever their number. Once full, a batch replaces kept flows in place (one
    pass over the keys, no copy of the kept features). Below ``capacity`` every flow is kept;
    the sample comes back in arrival order."""

    def __init__(self, capacity: int, seed: int = 0, buckets: int = HOST_BUCKETS) -> None:
        if capacity < 1:
            raise ValueError(f"max_flows: expected at least 1, got {capacity}")
        self.capacity = capacity
        self.seen = np.zeros(buckets, dtype=np.int64)
        self._rng = np.random.default_rng(seed)
        self._parts: list[tuple[np.ndarray, ...]] = []  # (features, bucket, u, order) until full
        self._kept: tuple[np.ndarray, ...] | None = None  # the same, once full
        self.count = 0  # flows offered
        self.held = 0  # flows kept

    def add(self, features: np.ndarray, hosts: list[str]) -> None:
        """Offer a batch of flows (float32 features) and their client addresses."""
        n = len(features)
        if n == 0:
            return
        codes = np.fromiter((zlib.crc32(h.encode()) for h in hosts), dtype=np.int64, count=n)
        bucket = codes & (len(self.seen) - 1)
        np.add.at(self.seen, bucket, 1)
        part = (
            np.asarray(features, dtype=np.float32),
            bucket,
            self._rng.random(n),
            np.arange(self.count, self.count + n, dtype=np.int64),
        )
        self.count += n
        if self._kept is None:
            self._parts.append(part)
            self.held += n
            if self.held > self.capacity:
                joined = tuple(np.concatenate(c) for c in zip(*self._parts))
                self._parts = []
                keep = np.sort(self._smallest(joined[1], joined[2]))
                self._kept = tuple(c[keep] for c in joined)
                self.held = self.capacity
            return
        kept = self._kept
        cap = self.capacity
        chosen = self._smallest(np.r_[kept[1], bucket], np.r_[kept[2], part[2]])
        incoming = chosen[chosen >= cap] - cap
        if len(incoming):
            stays = np.zeros(cap, dtype=bool)
            stays[chosen[chosen < cap]] = True
            slots = np.flatnonzero(~stays)
            for column, new in zip(kept, part):
                column[slots] = new[incoming]

    def _smallest(self, bucket: np.ndarray, u: np.ndarray) -> np.ndarray:
        keys = u * self.seen[bucket]
        return np.argpartition(keys, self.capacity - 1)[: self.capacity]

    @property
    def hosts(self) -> int:
        """Host buckets seen (distinct hosts, as long as few share a bucket)."""
        return int(np.count_nonzero(self.seen))

    def sample(self) -> np.ndarray:
        """The kept flows' features, (held, len(FEATURE_NAMES)) float32, in arrival order."""
        if self._kept is not None:
            return self._kept[0][np.argsort(self._kept[3], kind="stable")]
        if not self._parts:
            return np.zeros((0, len(FEATURE_NAMES)), np.float32)
        return np.concatenate([p[0] for p in self._parts])


def load_benign(
    paths: list[Path],
    known_malicious: dict[str, str] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    max_flows: int | None = MAX_FLOWS,
    seed: int = 0,
) -> Dataset:
    """Features of the flows in the inputs (captures, flow tables, flow logs), at most
    ``max_flows`` of them (a host-balanced sample; None: all). A file the labels call
    malicious is refused; a damaged capture contributes the flows before the damage and a
    warning; flow log lines of another schema and malformed lines are skipped with a warning.
    ``progress(file, flows read, flows kept)`` is called as the reading goes."""
    known_malicious = load_labels()["malicious"] if known_malicious is None else known_malicious
    data = Dataset(np.zeros((0, len(FEATURE_NAMES)), np.float32))
    reservoir = HostReservoir(max_flows or sys.maxsize, seed)
    for path in expand(paths):
        if path.name in known_malicious:
            raise TrainingError(
                f"{path}: labelled malicious ({known_malicious[path.name]}); "
                "benign training data must not contain it"
            )
        before = reservoir.count
        for features, hosts in _read(path, data):
            reservoir.add(features, hosts)
            if progress:
                progress(str(path), reservoir.count, reservoir.held)
        data.sources.append((str(path), reservoir.count - before))
    data.features = reservoir.sample()
    data.flows_read = reservoir.count
    data.hosts = reservoir.hosts
    if len(data.features) == 0:
        raise TrainingError(f"no flows in the benign inputs ({', '.join(map(str, paths))})")
    return data


def _read(path: Path, data: Dataset):
    """(features, client addresses) batches of one input."""
    if path.suffix in TABLE_SUFFIXES:
        try:
            stored = read_stored_flows(path)
        except FlowFileError as exc:
            raise TrainingError(str(exc)) from exc
        yield stored.features, list(stored.hosts)
    elif path.suffix in CAPTURE_SUFFIXES:
        yield from _capture_flows(path, data)
    elif is_flow_log(path):
        yield from _log_flows(path, data)
    else:
        raise TrainingError(
            f"{path}: not a capture, flow table or flow log (names end in "
            f"{', '.join(sorted(CAPTURE_SUFFIXES | TABLE_SUFFIXES))}, .json, .jsonl, .log, .gz)"
        )


def _capture_flows(path: Path, data: Dataset):
    meter = FlowMeter()
    try:
        for batch in read_capture(path):
            part = meter.add(batch)
            if len(part):
                yield _with_hosts(part)
    except CaptureError as exc:
        _warn(data, str(exc))
    for part in meter.drain():
        yield _with_hosts(part)


def _with_hosts(flows) -> tuple[np.ndarray, list[str]]:
    r = flows.records
    return flows.features, format_ips(r["ip_version"], r["src_hi"], r["src_lo"])


def _log_flows(path: Path, data: Dataset):
    stats = FlowLogStats()
    try:
        for chunk in read_flow_log(path, stats):
            yield chunk.features, chunk.hosts
    except OSError as exc:
        raise TrainingError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if stats.other_schema:
        _warn(
            data,
            f"{path}: skipped {stats.other_schema:,} flow records of another feature schema "
            f"({', '.join(sorted(stats.other_schemas)[:3])}); retrain from logs of this version",
        )
    if stats.malformed:
        where = ", ".join(f"line {n}: {reason}" for n, reason in stats.first_malformed)
        _warn(data, f"{path}: skipped {stats.malformed:,} malformed lines ({where})")
    if stats.truncated:
        _warn(data, f"{path}: cut short {stats.truncated}; the lines before it are used")
    if stats.flows == 0 and stats.other_events:
        _warn(data, f"{path}: no flow records ({stats.other_events:,} other events)")


def _warn(data: Dataset, message: str) -> None:
    data.warnings.append(message)
    print(f"quietwire: warning: {message}", file=sys.stderr)
