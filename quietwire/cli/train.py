"""The trainer's commands (need the `train` extra, torch): `train` and `sample`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from quietwire.agent.features import FEATURE_NAMES, SCHEMA_HASH

from .common import Reading, Steps, error, trainer_or_error


def cmd_train(args: argparse.Namespace) -> int:
    if trainer_or_error() is None:
        return 2
    from quietwire.trainer.data import load_benign, load_labels
    from quietwire.trainer.detector import DiffusionDetector, TrainConfig, TrainingError
    from quietwire.trainer.export import export

    try:
        config = TrainConfig(
            score=args.score,
            train_steps=args.train_steps,
            trim=args.trim,
            host_balance=args.host_balance,
            server_balance=args.server_balance,
            refit=args.refit,
            holdout=args.holdout,
            seed=args.seed,
        )
    except ValueError as exc:
        error(str(exc))
        return 2
    try:
        labels = load_labels(args.labels) if args.labels else load_labels()
        paths = list(args.benign)
        if args.labels:
            paths += [args.pcap_dir / name for name in labels["benign"]]
        if not paths:
            error("no benign input: give --benign PATH... or --labels FILE")
            return 2
        if args.max_flows < 0:
            error(f"--max-flows: expected 0 (all) or more, got {args.max_flows}")
            return 2
        reading = Reading(sys.stderr.isatty())
        data = load_benign(
            paths, labels["malicious"], reading, max_flows=args.max_flows or None, seed=args.seed
        )
        reading.done()
        if len(data.features) < data.flows_read:
            print(
                f"sampled {len(data.features):,} of {data.flows_read:,} flows (host-balanced "
                f"over {data.hosts:,} client hosts, seed {args.seed}; --max-flows)",
                file=sys.stderr,
            )
        interim = int(data.features[:, FEATURE_NAMES.index("flow_open")].sum())
        print(
            f"benign records: {len(data.features)} ({len(data.features) - interim} flows, "
            f"{interim} interim records of open flows) from {len(data.sources)} files",
            file=sys.stderr,
        )
        det = DiffusionDetector(config).fit(data.features, progress=Steps(sys.stderr.isatty()))
        export(det, args.out)
    except TrainingError as exc:
        error(str(exc))
        return 2
    s = det.summary_
    print(
        f"model: {args.out} (score {config.score}, {s.inputs} inputs from {s.features} "
        f"features)\n"
        f"records: {s.train_flows} trained, {s.calibration_flows} held out for calibration"
        + (f", {s.refit_removed} dropped by the refit" if s.refit_removed else "")
        + "\n"
        f"time: {s.seconds:.1f} s ({s.seconds_per_epoch:.3f} s per epoch), "
        f"final losses: noise {s.final_noise_loss:.3f}, time {s.final_time_loss:.3f}\n"
        "thresholds: " + ", ".join(f"FPR {k:g} -> {v:.4g}" for k, v in det.threshold_.items())
    )
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    if trainer_or_error() is None:
        return 2
    import numpy as np

    from quietwire.agent.flowfile import FlowFileError
    from quietwire.trainer.data import load_benign
    from quietwire.trainer.detector import TrainingError
    from quietwire.trainer.export import load_detector
    from quietwire.trainer.fidelity import compare

    try:
        det = load_detector(args.model)
    except Exception as exc:  # onnx raises several types for a bad file
        error(f"{args.model}: cannot load model ({str(exc).splitlines()[0][:200]})")
        return 2
    synthetic = det.sample(args.n, seed=args.seed)
    if args.out:
        _write_synthetic(args.out, synthetic)
        print(f"wrote {args.n} synthetic flows to {args.out}", file=sys.stderr)
    if args.compare:
        try:
            real = load_benign(list(args.compare), known_malicious={}).features
        except (TrainingError, FlowFileError) as exc:
            error(str(exc))
            return 2
        rng = np.random.default_rng(args.seed)
        real = real[rng.permutation(len(real))[: max(args.n, 1)]]
        print(compare(real, synthetic, det.preprocessor).table())
    return 0


def _write_synthetic(path: Path, features) -> None:
    """Synthetic flows as a flow table: features, no identity (end_reason 'synthetic')."""
    import math

    from quietwire.agent.flowfile import ID_FIELDS

    with path.open("w") as out:
        out.write(",".join((*ID_FIELDS, *FEATURE_NAMES)) + "\n")
        blank = ["" for _ in ID_FIELDS]
        blank[ID_FIELDS.index("end_reason")] = "synthetic"
        blank[ID_FIELDS.index("schema_hash")] = SCHEMA_HASH
        prefix = ",".join(blank)
        for row in features.tolist():
            out.write(
                prefix + "," + ",".join("" if math.isnan(v) else f"{v:.9g}" for v in row) + "\n"
            )


def register(sub) -> None:
    """Add this module's subcommands to the parser."""
    train = sub.add_parser(
        "train",
        help="fit the diffusion model on benign traffic and export ONNX",
        description="Extract flows from benign captures (or read flow tables), fit the "
        "diffusion model, calibrate thresholds on held-out flows, write one ONNX file.",
    )
    train.add_argument(
        "--benign",
        nargs="*",
        type=Path,
        default=[],
        metavar="PATH",
        help="benign captures, flow tables, flow logs (.json, .jsonl, .log, rotated .gz), "
        "or directories of them",
    )
    train.add_argument("--labels", type=Path, help="a label file: train on its benign list")
    train.add_argument(
        "--pcap-dir",
        type=Path,
        default=Path("../shared/data/ndpi/pcap"),
        help="where the label file's captures are (../shared/data/ndpi/pcap)",
    )
    train.add_argument("-o", "--out", type=Path, required=True, help="the ONNX file to write")
    train.add_argument(
        "--score",
        choices=("dte", "noise", "dte_noise"),
        default="dte",
        help="anomaly score: diffusion time estimation (dte), noise error (noise), or DTE "
        "with ties broken by the denoiser's error (dte_noise); default %(default)s",
    )
    train.add_argument(
        "--train-steps",
        type=int,
        default=2000,
        metavar="N",
        help="optimiser steps per network (2000)",
    )
    train.add_argument(
        "--trim",
        type=float,
        default=0.05,
        metavar="Q",
        help="robust training: ignore the share Q of each batch's highest "
        "losses, for benign data that may hold some attacks (0.05; 0 = off)",
    )
    train.add_argument(
        "--host-balance",
        type=int,
        default=10,
        metavar="K",
        help="robust training: a client's flows beyond K per context window are sampled "
        "less, so a scan or flood hidden in the benign data is not learnt as normal "
        "(10; 0 = off)",
    )
    train.add_argument(
        "--server-balance",
        type=int,
        default=100,
        metavar="K",
        help="robust training: flows to a server beyond K distinct clients per context "
        "window are sampled less (a spoofed or distributed flood; 100; 0 = off)",
    )
    train.add_argument(
        "--refit",
        type=float,
        default=0.0,
        metavar="Q",
        help="robust training: fit, drop the share Q of training flows scored highest, fit "
        "again (twice the time; 0 = off, the default)",
    )
    train.add_argument(
        "--holdout",
        type=float,
        default=0.2,
        metavar="Q",
        help="share of benign flows held out to calibrate thresholds (0.2)",
    )
    train.add_argument(
        "--max-flows",
        type=int,
        default=1_000_000,
        metavar="N",
        help="train on at most N flows: a seeded sample balanced across client hosts, in "
        "bounded memory however many flows the inputs hold (%(default)d; 0 = all)",
    )
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(func=cmd_train)

    sample = sub.add_parser(
        "sample",
        help="draw synthetic benign flows from a model; report their fidelity",
        description="Run the model's diffusion process backwards from noise to new flows. "
        "With --compare, print how close they are to real flows (KS and W1 per feature, and "
        "how well a classifier tells them apart).",
    )
    sample.add_argument("--model", type=Path, required=True)
    sample.add_argument("-n", type=int, default=1000, help="how many flows (1000)")
    sample.add_argument("-o", "--out", type=Path, help="write them as a flow table (CSV)")
    sample.add_argument(
        "--compare",
        nargs="*",
        type=Path,
        metavar="PATH",
        help="real benign captures or flow tables to compare with",
    )
    sample.add_argument("--seed", type=int, default=0)
    sample.set_defaults(func=cmd_sample)
