"""The trainer's commands (need the `train` extra, torch): `train` and `sample`."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from quietwire.agent.features.schema import FEATURE_NAMES

from .calibrate import add_risk_options, fit_risk_or_error
from .common import Reading, Steps, error, trainer_or_error


def cmd_train(args: argparse.Namespace) -> int:
    if trainer_or_error() is None:
        return 2
    from quietwire.trainer.model.detector import DiffusionDetector, TrainingError
    from quietwire.trainer.model.export import export

    if not args.budget > 0:
        error(f"--budget {args.budget:g}: expected a positive number")
        return 2
    init = None
    if args.init:
        init = _init_model(args.init, args.score)
        if init is None:
            return 2
    config = _train_config(args, init)
    if config is None:
        return 2
    try:
        benign = _read_benign(args)
        if benign is None:
            return 2
        gen, features = _generator(args, benign, config.train_steps)
        det = DiffusionDetector(config).fit(
            features, progress=Steps(sys.stderr.isatty()), init=init[0] if init else None
        )
        if init:
            det.summary_.fine_tuned_from = init[1]
        export(det, args.out)
        _write_generator(gen, args.out)
    except TrainingError as exc:
        error(str(exc))
        return 2
    _print_trained(args, config, det, init)
    return _fit_risk(args)


def _fit_risk(args: argparse.Namespace) -> int:
    """Entity risk fitted on the training captures and flow logs (flow tables have no flow
    records: the model then uses the agent's configured threshold until `quietwire calibrate`
    on a capture or a flow log)."""
    from quietwire.agent.site.sources import SiteFlowsError, site_records
    from quietwire.trainer.data import load_labels

    paths = list(args.benign)
    if args.labels:
        paths += [args.pcap_dir / name for name in load_labels(args.labels)["benign"]]
    try:
        chunks = site_records(paths)
    except SiteFlowsError as exc:
        error(str(exc))
        return 2
    if not chunks:
        print("incidents: no capture or flow log among the inputs: no risk threshold fitted")
        return 0
    return fit_risk_or_error(args.out, chunks, args.rules, args.budget)


def _train_config(args: argparse.Namespace, init):
    """The TrainConfig the options ask for, or None after an error line. Fine-tuning keeps the
    initial model's networks' shapes and score (its config)."""
    from quietwire.trainer.model.detector import TrainConfig

    try:
        base = init[0].config if init else TrainConfig(score=args.score or TrainConfig.score)
        return replace(
            base,
            train_steps=args.train_steps or (INIT_TRAIN_STEPS if init else TRAIN_STEPS),
            trim=args.trim,
            host_balance=args.host_balance,
            server_balance=args.server_balance,
            refit=args.refit,
            mask_augment=_mask_augment(args.mask_augment, base, init is not None),
            holdout=args.holdout,
            holdout_split=args.holdout_split or ("last" if init else "random"),
            seed=args.seed,
        )
    except ValueError as exc:
        error(str(exc))
        return None


def _read_benign(args: argparse.Namespace):
    """The benign training records (features), or None after an error line; how many were
    read and sampled goes to stderr."""
    from quietwire.trainer.data import load_benign, load_labels

    labels = load_labels(args.labels) if args.labels else load_labels()
    paths = list(args.benign)
    if args.labels:
        paths += [args.pcap_dir / name for name in labels["benign"]]
    if not paths:
        error("no benign input: give --benign PATH... or --labels FILE")
        return None
    if args.max_flows < 0:
        error(f"--max-flows: expected 0 (all) or more, got {args.max_flows}")
        return None
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
    return data.features


def _print_trained(args: argparse.Namespace, config, det, init) -> None:
    """The trained model's summary: file, records, time, losses, thresholds, lineage."""
    s = det.summary_
    print(
        f"model: {args.out} (score {config.score}, {s.inputs} inputs from {s.features} "
        f"features)\n"
        f"records: {s.train_flows} trained, {s.calibration_flows} held out for calibration "
        f"({'the last read' if config.holdout_split == 'last' else 'a random draw'})"
        + (f", {s.refit_removed} dropped by the refit" if s.refit_removed else "")
        + "\n"
        f"time: {s.seconds:.1f} s ({s.seconds_per_epoch:.3f} s per epoch), "
        f"final losses: noise {s.final_noise_loss:.3f}, time {s.final_time_loss:.3f}\n"
        "thresholds: " + ", ".join(f"FPR {k:g} -> {v:.4g}" for k, v in det.threshold_.items())
    )
    if init:
        f = init[1]
        print(
            f"fine-tuned from: {args.init} (model {f['version']}, score {config.score}, trained "
            f"on {f['trained_flows']:,} flows) in {config.train_steps} steps per network; its "
            "preprocessing kept, thresholds from the new data's held-out flows"
        )


TRAIN_STEPS = 2000  # optimiser steps per network, from scratch
INIT_TRAIN_STEPS = TRAIN_STEPS // 4  # ... and from a model (--init): it adapts, not learns


def _init_model(path: Path, score: str | None):
    """(the torch detector, its lineage record) of a model to fine-tune, or None after an error
    line (a model of another schema is refused as the agent refuses it)."""
    from datetime import UTC, datetime

    from quietwire.agent.detect.model import ModelError, ScoringModel
    from quietwire.trainer.model.export import load_detector

    try:
        model = ScoringModel(path)
        det = load_detector(path)
    except ModelError as exc:
        error(f"--init {exc}")
        return None
    except Exception as exc:  # onnx raises several types for a damaged file
        error(f"--init {path}: cannot load model ({str(exc).splitlines()[0][:200]})")
        return None
    if score and score != det.config.score:
        error(
            f"--score {score}: {path} scores {det.config.score}; fine-tuning keeps the model's "
            "score (train from scratch, without --init, for another)"
        )
        return None
    calibration = json.loads(model.metadata.get("calibration", "{}") or "{}")
    lineage = {
        "model": str(path),
        "version": model.version,
        "quietwire_version": model.metadata.get("quietwire_version", "?"),
        "trained_flows": int(model.training.get("flows", 0)),
        "calibrated": {k: calibration[k] for k in ("date", "records") if k in calibration},
        "fine_tuned_from": model.training.get("fine_tuned_from", {}),  # its own lineage
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),  # of the fine-tuning
    }
    return det, lineage


def _generator(args: argparse.Namespace, benign, detector_steps: int):
    """(the generator fitted on the benign flows or None, the detector's training flows: the
    benign ones plus --augment synthetic ones)."""
    import numpy as np

    from quietwire.trainer.synthesis.generator import FlowGenerator, GeneratorConfig, GeneratorError

    steps = 5 * detector_steps if args.generator_steps is None else args.generator_steps
    if args.augment < 0 or steps < 0:
        raise GeneratorError("--augment and --generator-steps: expected 0 or more")
    if steps == 0:
        if args.augment:
            raise GeneratorError("--augment needs a generator (--generator-steps above 0)")
        return None, benign
    config = GeneratorConfig(train_steps=steps, seed=args.seed)
    gen = FlowGenerator(config).fit(benign, progress=Steps(sys.stderr.isatty()))
    if not args.augment:
        return gen, benign
    synthetic = gen.sample(args.augment, seed=args.seed)
    print(
        f"augmented: {args.augment} synthetic flows from the generator added to "
        f"{len(benign)} benign ones",
        file=sys.stderr,
    )
    return gen, np.concatenate([benign, synthetic])


def _write_generator(gen, model: Path) -> None:
    from quietwire.trainer.synthesis.generator import generator_path

    if gen is not None:
        path = gen.export(generator_path(model))
        print(
            f"generator: {path} ({gen.config.train_steps} steps, {gen.fit_seconds:.1f} s, "
            f"final loss {gen.final_loss:.3f}; quietwire sample draws from it)",
            file=sys.stderr,
        )


def cmd_sample(args: argparse.Namespace) -> int:
    if trainer_or_error() is None:
        return 2
    from quietwire.trainer.synthesis.generator import write_flow_table

    if args.n < 1:
        error(f"-n: expected at least 1 flow, got {args.n}")
        return 2
    loaded = _load_generator(args)
    if loaded is None:
        return 2
    gen, path = loaded
    synthetic = gen.sample(args.n, seed=args.seed)
    repaired = ", ".join(f"{k} {v}" for k, v in gen.last_repairs.items()) or "none"
    print(
        f"sampled {args.n} flows from {path} at {gen.last_rate:,.0f} flows/s (one thread); "
        f"values the repair step moved: {repaired}",
        file=sys.stderr,
    )
    if args.out:
        write_flow_table(args.out, synthetic, seed=args.seed)
        print(f"wrote {args.n} synthetic flows to {args.out}", file=sys.stderr)
    if args.compare or args.attacks:
        if not args.compare:
            error("--attacks needs --compare (real benign flows to score and to train on)")
            return 2
        return _compare_with_real(args, synthetic)
    return 0


def _load_generator(args: argparse.Namespace):
    """(the generator of --model or --generator, its path), or None after an error line."""
    from quietwire.trainer.synthesis.generator import FlowGenerator, GeneratorError, generator_path

    try:
        import onnx

        onnx.load(str(args.model), load_external_data=False)
    except Exception as exc:  # onnx raises several types for a bad file
        error(f"{args.model}: cannot load model ({str(exc).splitlines()[0][:200]})")
        return None
    path = args.generator or generator_path(args.model)
    if not path.exists():
        error(
            f"{path}: no generator beside the model (quietwire train writes one unless "
            "--generator-steps 0; or give --generator FILE)"
        )
        return None
    try:
        return FlowGenerator.load(path), path
    except GeneratorError as exc:
        error(str(exc))
        return None


def _compare_with_real(args: argparse.Namespace, synthetic) -> int:
    """--compare: the fidelity table of the synthetic flows against real ones; --attacks: the
    utility test. The exit status."""
    import numpy as np

    from quietwire.agent.output.tablefields import FlowFileError
    from quietwire.trainer.data import load_benign
    from quietwire.trainer.model.detector import TrainingError
    from quietwire.trainer.synthesis.fidelity import compare, utility

    try:
        real = load_benign(list(args.compare), known_malicious={}).features
        attacks = (
            load_benign(list(args.attacks), known_malicious={}).features if args.attacks else None
        )
    except (TrainingError, FlowFileError) as exc:
        error(str(exc))
        return 2
    rng = np.random.default_rng(args.seed)
    real = real[rng.permutation(len(real))[: args.n]]
    print(compare(real, synthetic[: max(len(real), 1)], seed=args.seed).table())
    if attacks is not None:
        # the real-trained detector learns from one half of the real flows; both are
        # scored on the other half and the attacks
        half = len(real) // 2
        if half < 50:
            error(f"--attacks: need at least 100 real benign flows, got {len(real)}")
            return 2
        u = utility(synthetic[:half], real[:half], real[half:], attacks, args.utility_steps)
        print(
            f"utility: detector AUROC trained on {half} synthetic flows {u['synthetic']:.3f}, "
            f"on {half} real flows {u['real']:.3f} (ratio {u['ratio']:.3f}); scored on "
            f"{len(real) - half} real benign flows and {len(attacks)} attack flows"
        )
    return 0


def _mask_augment(given: float | None, base, fine_tuning: bool) -> float:
    """--mask-augment, else off when fine-tuning: a fine-tuned model keeps its first
    training's preprocessing, so a masked feature sits at that network's median, far from
    the new site's values (on trafficgen's flows, fine-tuning the bundled model with it kept
    36% of the attacks over the FPR-1e-2 threshold, without it 93%), else the trainer's."""
    if given is not None:
        return given
    return 0.0 if fine_tuning else base.mask_augment


def register(sub) -> None:
    """Add this module's subcommands to the parser."""
    train = sub.add_parser(
        "train",
        help="fit the diffusion model on benign traffic and export ONNX",
        description="Extract flows from benign captures (or read flow tables), fit the "
        "diffusion model, calibrate thresholds on held-out flows, write one ONNX file.",
    )
    _add_train_inputs(train)
    _add_model_options(train)
    _add_robust_training(train)
    _add_training_data(train)
    _add_generator_options(train)
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(func=cmd_train)
    _add_sample(sub)


def _add_train_inputs(train: argparse.ArgumentParser) -> None:
    """What to train on and what to write: benign inputs, the ONNX file, a model to fine-tune."""
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
        "--init",
        type=Path,
        metavar="MODEL",
        help="fine-tune MODEL (an ONNX file of this feature schema) on the benign data instead "
        "of training from scratch: its networks, preprocessing and score are kept, its "
        "thresholds recomputed on the new data's held-out flows",
    )


def _add_model_options(train: argparse.ArgumentParser) -> None:
    """The anomaly score and the optimiser steps."""
    train.add_argument(
        "--score",
        choices=("dte_clean", "dte", "noise", "dte_noise"),
        help="anomaly score: how surely the diffusion time estimator says a flow is not clean, "
        "plus the denoiser's error (dte_clean), the expected diffusion step (dte), noise "
        "error (noise), or the expected step times the denoiser's error (dte_noise); default "
        "dte_clean (with --init: the model's)",
    )
    train.add_argument(
        "--train-steps",
        type=int,
        metavar="N",
        help=f"optimiser steps per network ({TRAIN_STEPS}; {INIT_TRAIN_STEPS} with --init)",
    )


def _add_robust_training(train: argparse.ArgumentParser) -> None:
    """Robust training: what keeps attacks hidden in the benign data from being learnt."""
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
        "--mask-augment",
        type=float,
        metavar="Q",
        help="robust training: in half of each batch's flows up to the share Q of the features "
        "are encoded as missing, so features missing at random are no anomaly (0.15; 0 = off, "
        "the default with --init)",
    )


def _add_training_data(train: argparse.ArgumentParser) -> None:
    add_risk_options(train)
    """How the benign flows are split and sampled."""
    train.add_argument(
        "--holdout",
        type=float,
        default=0.2,
        metavar="Q",
        help="share of benign flows held out to calibrate thresholds (0.2)",
    )
    train.add_argument(
        "--holdout-split",
        choices=("random", "last"),
        default=None,
        help="which flows are held out: a random draw, or the last read (a later time "
        "window of the inputs, so the thresholds hold on traffic the model did not learn "
        "from); default: last with --init (fine-tuning adapts to its flows quickly), random "
        "otherwise",
    )
    train.add_argument(
        "--max-flows",
        type=int,
        default=1_000_000,
        metavar="N",
        help="train on at most N flows: a seeded sample balanced across client hosts, in "
        "bounded memory however many flows the inputs hold (%(default)d; 0 = all)",
    )


def _add_generator_options(train: argparse.ArgumentParser) -> None:
    """The generator written beside the model, and synthetic flows added to training."""
    train.add_argument(
        "--generator-steps",
        type=int,
        metavar="N",
        help="training steps of the generator written beside the model (MODEL.gen.onnx, "
        "what quietwire sample draws from; default: 5 x --train-steps; 0 = none)",
    )
    train.add_argument(
        "--augment",
        type=int,
        default=0,
        metavar="N",
        help="add N synthetic flows from the generator (fitted on the benign flows first) to "
        "the detector's training flows, for scarce benign data (0)",
    )


def _add_sample(sub) -> None:
    """The `sample` subcommand."""
    sample = sub.add_parser(
        "sample",
        help="draw synthetic benign flows from a model's generator; report their fidelity",
        description="Draw flows from the generator written beside the model (model.gen.onnx: "
        "a mixed-type diffusion model of the benign flows). -o writes them as a flow table "
        "with placeholder documentation addresses. --compare prints how close they are to "
        "real flows the generator never saw: two-sample classifier AUC, KS and W1 per feature, "
        "a correlation distance and the share of rows breaking a schema rule; --attacks adds "
        "a utility test (a detector trained on synthetic flows only against one trained on "
        "real ones).",
    )
    sample.add_argument("--model", type=Path, required=True)
    sample.add_argument(
        "--generator", type=Path, help="the generator file (default: MODEL.gen.onnx beside it)"
    )
    sample.add_argument("-n", type=int, default=1000, help="how many flows (1000)")
    sample.add_argument("-o", "--out", type=Path, help="write them as a flow table (CSV)")
    sample.add_argument(
        "--compare",
        nargs="*",
        type=Path,
        metavar="PATH",
        help="real benign captures or flow tables to compare with (held out: not the flows "
        "the generator was trained on)",
    )
    sample.add_argument(
        "--attacks",
        nargs="*",
        type=Path,
        metavar="PATH",
        help="attack captures or flow tables for the utility test",
    )
    sample.add_argument(
        "--utility-steps",
        type=int,
        default=500,
        metavar="N",
        help="training steps of the utility test's detectors (500)",
    )
    sample.add_argument("--seed", type=int, default=0)
    sample.set_defaults(func=cmd_sample)
