"""Training data: benign captures through the agent's own extractor (train/serve parity), or
flow tables that `quietwire flows` wrote."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from quietwire import DATA
from quietwire.agent.capture import CaptureError, read_capture
from quietwire.agent.features import FEATURE_NAMES
from quietwire.agent.flowfile import read_flow_table
from quietwire.agent.meter import FlowMeter

from .detector import TrainingError

LABELS = DATA / "ndpi_labels.yaml"
CAPTURE_SUFFIXES = {".pcap", ".pcapng", ".cap"}
TABLE_SUFFIXES = {".csv", ".jsonl"}


@dataclass
class Dataset:
    features: np.ndarray
    sources: list[tuple[str, int]] = field(default_factory=list)  # (file, flows)
    warnings: list[str] = field(default_factory=list)


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
    """Files as given; directories become their captures and flow tables, sorted."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out += sorted(f for f in p.iterdir() if f.suffix in CAPTURE_SUFFIXES | TABLE_SUFFIXES)
        elif p.exists():
            out.append(p)
        else:
            raise TrainingError(f"{p}: no such file or directory")
    return out


def load_benign(
    paths: list[Path],
    known_malicious: dict[str, str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Dataset:
    """Features of every flow in the inputs. A file the labels call malicious is refused;
    a damaged capture contributes the flows before the damage and a warning."""
    known_malicious = load_labels()["malicious"] if known_malicious is None else known_malicious
    parts: list[np.ndarray] = []
    data = Dataset(np.zeros((0, len(FEATURE_NAMES)), np.float32))
    for path in expand(paths):
        if path.name in known_malicious:
            raise TrainingError(
                f"{path}: labelled malicious ({known_malicious[path.name]}); "
                "benign training data must not contain it"
            )
        if progress:
            progress(str(path))
        if path.suffix in TABLE_SUFFIXES:
            x = read_flow_table(path)
        else:
            x = _capture_features(path, data)
        parts.append(x)
        data.sources.append((str(path), len(x)))
    if parts:
        data.features = np.concatenate(parts)
    if len(data.features) == 0:
        raise TrainingError(f"no flows in the benign inputs ({', '.join(map(str, paths))})")
    return data


def _capture_features(path: Path, data: Dataset) -> np.ndarray:
    meter = FlowMeter()
    parts = []
    try:
        for batch in read_capture(path):
            parts.append(meter.add(batch).features)
    except CaptureError as exc:
        data.warnings.append(str(exc))
        print(f"quietwire: warning: {exc}", file=sys.stderr)
    parts += [p.features for p in meter.drain()]
    return np.concatenate(parts)
