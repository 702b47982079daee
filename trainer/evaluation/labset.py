"""The lab's labelled set for `quietwire eval --data lab`: train and test split by run."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from quietwire.trainer.evaluation.evaluate import EvalSet
from quietwire.trainer.lab.labels import BENIGN, MIXED, label_run


def lab_set(runs: list[Path]) -> EvalSet:
    """The lab's runs (quietwire lab run): benign flows of every run but the last to train on;
    the last run's benign and attack flows to test (split by run, never by flow). Mixed flows
    are left out."""
    if len(runs) < 2:
        raise ValueError(f"--lab-runs: need at least two runs (train, test), got {len(runs)}")
    train = [label_run(r) for r in runs[:-1]]
    test = label_run(runs[-1])
    benign = test.labels == BENIGN
    attack = ~benign & (test.labels != MIXED)
    return EvalSet(
        "lab",
        np.concatenate([t.flows.features[t.labels == BENIGN] for t in train]),
        test.flows.features[benign],
        test.flows.features[attack],
        test.labels[attack],
        ("sql_injection", "sql_injection_random_agent"),
    )
