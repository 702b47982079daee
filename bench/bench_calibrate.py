"""Calibration benchmark: `quietwire calibrate`'s thresholds on the bundled model and the nDPI
benign captures, the FPR they give on flows they were not computed from, and how far a scan
mixed into the site's flows moves them with and without burst balancing.

    python bench/bench_calibrate.py [--model quietwire/data/default.onnx] [--splits 20]

Data: the benign captures of quietwire/data/ndpi_labels.yaml in ../shared/data/ndpi/pcap (the
site's flows here) and quietwire/data/scan.pcap (an nmap SYN scan: the attack).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> int:
    from quietwire import DATA
    from quietwire.agent.detect.model import DEFAULT_MODEL, ScoringModel
    from quietwire.agent.site.balance import burst_weights
    from quietwire.agent.site.calibrate import calibrate
    from quietwire.agent.site.sources import read_site_flows
    from quietwire.cli.calibrate import format_report

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--pcap-dir", type=Path, default=REPO.parent / "shared/data/ndpi/pcap")
    ap.add_argument("--splits", type=int, default=20, help="random halves for the held-out FPR")
    args = ap.parse_args()

    names = yaml.safe_load((DATA / "ndpi_labels.yaml").read_text())["benign"]
    site = read_site_flows([args.pcap_dir / n for n in names])
    x = site.features
    scan = read_site_flows([DATA / "scan.pcap"]).features
    model = ScoringModel(args.model)
    scores = model.score(x).score
    scan_scores = model.score(scan).score
    balance = {True: {}, False: {"host_balance": 0, "server_balance": 0}}
    tmp = Path(tempfile.mkdtemp())

    def thresholds(features, balanced: bool) -> dict[float, float]:
        out = tmp / "m.onnx"
        return calibrate(
            args.model, features, out, allow_few_flows=True, **balance[balanced]
        ).thresholds

    report = calibrate(
        args.model,
        x,
        tmp / "site.onnx",
        allow_few_flows=True,
        inputs=site.inputs,
        period=(site.first_start, site.last_end),
    )
    print(format_report(report))
    w = burst_weights(x, report.host_balance, report.server_balance)

    print(f"\nFPR 1e-2 on the other half, calibrated on a random half ({args.splits} splits):")
    print(f"{'balancing':<10}{'per record':>12}{'balanced':>10}{'min':>8}{'max':>8}")
    for balanced in (True, False):
        rows = []
        for seed in range(args.splits):
            half = np.random.default_rng(seed).permutation(len(x)) < len(x) // 2
            t = thresholds(x[half], balanced)[1e-2]
            s, wh = scores[~half], w[~half]
            rows.append((np.mean(s > t), wh[s > t].sum() / wh.sum()))
        a = np.array(rows)
        print(
            f"{'on' if balanced else 'off':<10}{a[:, 0].mean():>12.2%}{a[:, 1].mean():>10.2%}"
            f"{a[:, 0].min():>8.2%}{a[:, 0].max():>8.2%}"
        )

    print("\nA scan mixed into the site's flows: the FPR 1e-2 threshold, balancing on / off")
    clean = {b: thresholds(x, b)[1e-2] for b in (True, False)}
    print(f"{'scan flows mixed in':<36}{'weight':>7}{'on':>8}{'off':>8}  scan over on / off")
    print(f"{'none':<36}{'':>7}{clean[True]:>8.2f}{clean[False]:>8.2f}")
    picks = {
        "1/20 of the probes, at random": np.random.default_rng(11).permutation(len(scan))[
            : len(scan) // 20
        ],
        "the first 100 (a short scan)": np.arange(100),
        "all of them": np.arange(len(scan)),
    }
    for name, pick in picks.items():
        mixed = np.concatenate([x, scan[pick]])
        t = {b: thresholds(mixed, b)[1e-2] for b in (True, False)}
        weight = burst_weights(scan[pick], report.host_balance, report.server_balance).sum()
        label = f"{name} ({len(pick):,})"
        print(
            f"{label:<36}{weight:>7.1f}{t[True]:>8.2f}{t[False]:>8.2f}"
            f"  {np.mean(scan_scores > t[True]):.0%} / {np.mean(scan_scores > t[False]):.0%}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
