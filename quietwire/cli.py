"""The `quietwire` command. Each subcommand turns the stage errors it can meet into one line
on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

from . import __version__
from .agent.capture import CaptureError, read_capture
from .agent.config import DEFAULT_RULES
from .agent.context import ContextConfig
from .agent.features import FEATURE_NAMES, SCHEMA, SCHEMA_HASH, SCHEMA_NAME, SCHEMA_VERSION
from .agent.flowfile import FORMATS, FlowFileError, FlowWriter
from .agent.flows import FlowConfig
from .agent.meter import FlowMeter
from .agent.metrics import ServerSettings
from .agent.model import DEFAULT_MODEL, ModelError, ScoringModel
from .agent.rules import RuleError, load_rules

DEFAULT_CAPTURE = Path(__file__).parent / "data" / "sample.pcap"


def _error(msg: str) -> None:
    print(f"quietwire: error: {msg}", file=sys.stderr)


class _Progress:
    """A one-line progress display on a terminal; silent otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._last = 0.0

    def update(self, name: str, done: int, total: int, packets: int) -> None:
        now = time.monotonic()
        if not self.enabled or now - self._last < 0.2:
            return
        self._last = now
        pct = 100.0 * done / total if total else 100.0
        bar = "#" * int(pct / 5)
        print(
            f"\r{name[-30:]:>30} [{bar:<20}] {pct:5.1f}% {packets:,} packets",
            end="",
            file=sys.stderr,
            flush=True,
        )

    def done(self) -> None:
        if self.enabled:
            print("\r" + " " * 78 + "\r", end="", file=sys.stderr, flush=True)


def cmd_flows(args: argparse.Namespace) -> int:
    try:
        flow_config = FlowConfig(
            idle_timeout_s=args.idle_timeout,
            active_timeout_s=args.active_timeout,
            max_flows=args.max_flows,
        )
        context_config = ContextConfig(window_s=args.host_window)
    except ValueError as exc:
        _error(str(exc))
        return 2
    fmt = args.format or ("jsonl" if args.output and args.output.suffix == ".jsonl" else "csv")
    out = sys.stdout
    if args.output:
        try:
            out = args.output.open("w", newline="")
        except OSError as exc:
            _error(f"{args.output}: cannot write: {exc.strerror}")
            return 2
    model = None
    if args.score or args.model:
        try:
            model = ScoringModel(args.model or DEFAULT_MODEL)
        except ModelError as exc:
            _error(str(exc))
            return 2
    progress = _Progress(sys.stderr.isatty() and not args.quiet)
    writer = FlowWriter(out, fmt, scored=model is not None)
    alerts = 0
    failed = False
    started = time.perf_counter()
    packets = flows = 0
    for path in args.files:
        meter = FlowMeter(flow_config, context_config)
        total = path.stat().st_size if path.exists() else 0

        def on_progress(done: int, path=path, total=total, meter=meter) -> None:
            progress.update(str(path), done, total, meter.stats.decode.packets)

        try:
            for batch in read_capture(path, on_progress=on_progress):
                alerts += _write(writer, meter.add(batch), model, args.fpr)
        except CaptureError as exc:
            progress.done()
            _error(str(exc))
            failed = True
        # What was decoded before any damage is still written.
        alerts += _write(writer, meter.flush(), model, args.fpr)
        progress.done()
        st = meter.stats
        packets += st.decode.packets
        flows += st.flows_ended
        if not args.quiet:
            errors = ", ".join(f"{k} {v}" for k, v in sorted(st.decode.errors.items()) if v)
            print(
                f"{path}: {st.decode.packets} packets, {st.flows_ended} flows"
                + (f", skipped: {errors}" if errors else ""),
                file=sys.stderr,
            )
    if out is not sys.stdout:
        out.close()
    elapsed = time.perf_counter() - started
    if not args.quiet and model is not None:
        print(
            f"model {model.path.name} ({model.version}): {alerts} flows above the threshold "
            f"for FPR {args.fpr:g} ({model.threshold(args.fpr):.4g})",
            file=sys.stderr,
        )
    if not args.quiet:
        print(
            f"total: {packets} packets, {flows} flows in {elapsed:.2f} s "
            f"({packets / max(elapsed, 1e-9):,.0f} packets/s)"
            + (f", written to {args.output} ({fmt})" if args.output else ""),
            file=sys.stderr,
        )
    return 1 if failed else 0


def _write(writer: FlowWriter, flows, model, fpr: float) -> int:
    """Write flows (scored when there is a model); return how many exceed the threshold."""
    if model is None:
        writer.write(flows)
        return 0
    scores = model.score(flows.features)
    writer.write(flows, scores)
    return int((scores.score > model.threshold(fpr)).sum())


def _listen(text: str) -> ServerSettings:
    host, _, port = text.rpartition(":")
    return ServerSettings(listen=host or "127.0.0.1", port=int(port))


def cmd_replay(args: argparse.Namespace) -> int:
    from .agent.daemon import ReplayOptions, replay

    try:
        flow_config = FlowConfig(
            idle_timeout_s=args.idle_timeout, active_timeout_s=args.active_timeout
        )
        serve = _listen(args.serve_metrics) if args.serve_metrics else None
    except ValueError as exc:
        _error(str(exc))
        return 2
    opts = ReplayOptions(
        files=args.files,
        model=args.model,
        rules=args.rules,
        alerts=None if args.alerts in (None, "-") else Path(args.alerts),
        stdout=args.alerts == "-",
        realtime=args.realtime or args.speed is not None,
        speed=args.speed or 1.0,
        serve=serve,
        flow=flow_config,
    )
    try:
        return replay(opts)
    except (ModelError, RuleError, OSError) as exc:
        _error(str(exc))
        return 2


def cmd_run(args: argparse.Namespace) -> int:
    from .agent.config import ConfigError, load_config
    from .agent.daemon import run
    from .agent.livecapture import CaptureSetupError

    try:
        settings = load_config(args.config)
        return run(settings, args.config)
    except (ConfigError, ModelError, RuleError, CaptureSetupError, OSError) as exc:
        _error(str(exc))
        return 2


def cmd_check_config(args: argparse.Namespace) -> int:
    from .agent.config import ConfigError, load_config

    try:
        settings = load_config(args.config)
        model = ScoringModel(settings.model)
        rules = load_rules(settings.rules)
    except (ConfigError, ModelError, RuleError) as exc:
        _error(str(exc))
        return 2
    print(
        f"{args.config}: OK (interfaces {', '.join(settings.capture.interfaces)}; model "
        f"{model.path} {model.version}; {len(rules)} rules from {', '.join(rules.sources)})"
    )
    return 0


def cmd_rules_check(args: argparse.Namespace) -> int:
    failed = 0
    for path in args.files:
        try:
            rules = load_rules(path)
        except RuleError as exc:
            _error(str(exc))
            failed = 1
            continue
        counts = Counter(r.action for r in rules.rules)
        print(
            f"{path}: OK, {len(rules)} rules ("
            + ", ".join(f"{n} {a}" for a, n in sorted(counts.items()))
            + ")"
        )
    return 2 if failed else 0


def cmd_eval(args: argparse.Namespace) -> int:
    if _trainer() is None:
        return 2
    import json

    from .trainer import evaluate as ev

    if args.seeds < 1:
        _error(f"--seeds {args.seeds}: need at least 1")
        return 2
    seeds = tuple(range(args.seed, args.seed + args.seeds))
    out = ev.workdir(args.out)
    sets = []
    if args.data in ("generated", "all"):
        sets.append(ev.generated_set(out, seed=args.seed, scale=args.scale))
    if args.data in ("real", "all"):
        if not (args.pcap_dir / "synscan.pcap").exists():
            _error(f"{args.pcap_dir}: the nDPI captures are not there (--pcap-dir)")
            return 2
        sets.append(ev.real_set(args.pcap_dir, seed=args.seed))
    result: dict = {"train_steps": args.train_steps, "seeds": args.seeds}
    for s in sets:
        print(
            f"\n{s.name}: {len(s.train)} benign training flows; test: {len(s.benign)} "
            f"benign, {len(s.attack)} attack flows of {len(set(s.kinds.tolist()))} types"
        )
        result_set = ev.compare(s, args.train_steps, seeds)
        reports, scores = result_set.reports, result_set.scores
        print(ev.table(s.name, reports))
        entry = {k: r.as_dict() for k, r in reports.items()}
        b, a = scores[result_set.diffusion.name]
        entry["imbalance_auprc"] = ev.imbalance(b, a)
        print(
            "AUPRC of the diffusion model at attack shares of the test flows: "
            + ", ".join(f"{k}: {v:.3f}" for k, v in entry["imbalance_auprc"].items())
        )
        if args.hard:
            entry["degradation_auroc"] = ev.degradation(s, result_set.diffusion)
            print(
                "AUROC with degraded test features: "
                + ", ".join(f"{k}: {v:.3f}" for k, v in entry["degradation_auroc"].items())
            )
            entry["contamination"] = ev.contamination(s, args.train_steps, seeds=seeds)
            print(
                "contaminated training (AUROC / recall@1e-3): "
                + "; ".join(
                    f"{k}: {v['auroc']:.3f} / {v['recall_at_1e-3']:.3f}"
                    for k, v in entry["contamination"].items()
                )
            )
            for mode in ev.MODES:
                c = entry["contamination"]
                clean, dirty = c[f"{mode} contamination=0"], c[f"{mode} contamination=0.05"]
                print(
                    f"  {mode}: 5% contamination drops AUROC by "
                    f"{clean['auroc'] - dirty['auroc']:.3f} ({clean['auroc']:.3f} -> "
                    f"{dirty['auroc']:.3f}, sd {dirty['auroc_sd']:.3f} over {len(seeds)} seeds)"
                )
            entry["augmentation"] = ev.augmentation(s, args.train_steps)
            print(
                "200 benign training flows, AUROC: "
                + ", ".join(f"{k}: {v:.3f}" for k, v in entry["augmentation"].items())
            )
        for png in ev.plots(out, s.name, scores):
            print(f"plot: {png}")
        result[s.name] = entry
    report = out / "report.json"
    report.write_text(json.dumps(result, indent=2))
    print(f"\nreport: {report}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    print(
        f"# {SCHEMA_NAME} v{SCHEMA_VERSION}, schema hash {SCHEMA_HASH}, "
        f"{len(SCHEMA)} float32 features (NaN = does not apply)"
    )
    for f in SCHEMA:
        print(f"{f.name}\t{f.unit}\t{'nullable' if f.nullable else '-'}\t{f.description}")
    return 0


def _trainer():
    """The trainer package, or an error line if its extra (torch) is not installed."""
    try:
        import torch  # noqa: F401
    except ImportError:
        _error("this command needs the trainer: pip install 'quietwire[train]'")
        return None
    from . import trainer

    return trainer


class _Steps:
    """Training progress on a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, name: str, step: int, total: int) -> None:
        if self.enabled:
            end = "\n" if step == total else ""
            print(f"\r{name:>16}: step {step}/{total}", end=end, file=sys.stderr, flush=True)


def cmd_train(args: argparse.Namespace) -> int:
    if _trainer() is None:
        return 2
    from .trainer.data import load_benign, load_labels
    from .trainer.detector import DiffusionDetector, TrainConfig, TrainingError
    from .trainer.export import export

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
        _error(str(exc))
        return 2
    try:
        labels = load_labels(args.labels) if args.labels else load_labels()
        paths = list(args.benign)
        if args.labels:
            paths += [args.pcap_dir / name for name in labels["benign"]]
        if not paths:
            _error("no benign input: give --benign PATH... or --labels FILE")
            return 2
        data = load_benign(paths, labels["malicious"])
        print(f"benign flows: {len(data.features)} from {len(data.sources)} files", file=sys.stderr)
        det = DiffusionDetector(config).fit(data.features, progress=_Steps(sys.stderr.isatty()))
        export(det, args.out)
    except TrainingError as exc:
        _error(str(exc))
        return 2
    s = det.summary_
    print(
        f"model: {args.out} (score {config.score}, {s.inputs} inputs from {s.features} "
        f"features)\n"
        f"flows: {s.train_flows} trained, {s.calibration_flows} held out for calibration"
        + (f", {s.refit_removed} dropped by the refit" if s.refit_removed else "")
        + "\n"
        f"time: {s.seconds:.1f} s ({s.seconds_per_epoch:.3f} s per epoch), "
        f"final losses: noise {s.final_noise_loss:.3f}, time {s.final_time_loss:.3f}\n"
        "thresholds: " + ", ".join(f"FPR {k:g} -> {v:.4g}" for k, v in det.threshold_.items())
    )
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    if _trainer() is None:
        return 2
    import numpy as np

    from .agent.flowfile import FlowFileError
    from .trainer.data import load_benign
    from .trainer.detector import TrainingError
    from .trainer.export import load_detector
    from .trainer.fidelity import compare

    try:
        det = load_detector(args.model)
    except Exception as exc:  # onnx raises several types for a bad file
        _error(f"{args.model}: cannot load model ({str(exc).splitlines()[0][:200]})")
        return 2
    synthetic = det.sample(args.n, seed=args.seed)
    if args.out:
        _write_synthetic(args.out, synthetic)
        print(f"wrote {args.n} synthetic flows to {args.out}", file=sys.stderr)
    if args.compare:
        try:
            real = load_benign(list(args.compare), known_malicious={}).features
        except (TrainingError, FlowFileError) as exc:
            _error(str(exc))
            return 2
        rng = np.random.default_rng(args.seed)
        real = real[rng.permutation(len(real))[: max(args.n, 1)]]
        print(compare(real, synthetic, det.preprocessor).table())
    return 0


def _write_synthetic(path: Path, features) -> None:
    """Synthetic flows as a flow table: features, no identity (end_reason 'synthetic')."""
    import math

    from .agent.flowfile import ID_FIELDS

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quietwire", description="Network-flow anomaly detection: flows, features, scores."
    )
    parser.add_argument("--version", action="version", version=f"quietwire {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    flows = sub.add_parser(
        "flows",
        help="extract bidirectional flows and their features from captures",
        description="Read pcap/pcapng files and write one row per flow: identity (EVE/conn.log "
        "field names) and every feature of the schema. Each file is metered on its own.",
    )
    flows.add_argument(
        "files",
        nargs="*",
        type=Path,
        default=[DEFAULT_CAPTURE],
        help="capture files (default: the bundled sample capture)",
    )
    flows.add_argument("-o", "--output", type=Path, help="output file (default: stdout)")
    flows.add_argument(
        "-f",
        "--format",
        choices=FORMATS,
        help="csv or jsonl (default: from the output suffix, else csv)",
    )
    flows.add_argument(
        "--idle-timeout",
        type=float,
        default=FlowConfig.idle_timeout_s,
        metavar="S",
        help="end a flow after S seconds without packets (120)",
    )
    flows.add_argument(
        "--active-timeout",
        type=float,
        default=FlowConfig.active_timeout_s,
        metavar="S",
        help="end a flow S seconds after its start (1800)",
    )
    flows.add_argument(
        "--max-flows",
        type=int,
        default=FlowConfig.max_flows,
        metavar="N",
        help="flow-table size; the longest-idle flows are evicted beyond it",
    )
    flows.add_argument(
        "--host-window",
        type=float,
        default=ContextConfig.window_s,
        metavar="S",
        help="window of the per-host context features (60)",
    )
    flows.add_argument(
        "--score",
        action="store_true",
        help="score every flow with the bundled model (adds score columns)",
    )
    flows.add_argument("--model", type=Path, help="score with this ONNX model instead")
    flows.add_argument(
        "--fpr",
        type=float,
        default=1e-2,
        help="false-positive rate whose threshold the summary counts (1e-2)",
    )
    flows.add_argument("-q", "--quiet", action="store_true", help="no progress or summary")
    flows.set_defaults(func=cmd_flows)

    rp = sub.add_parser(
        "replay",
        help="score captures end to end: flows, model, rules, EVE alerts",
        description="Read captures as fast as possible (or in real time), score every flow, "
        "apply the rules, write alerts as EVE JSON lines and print a summary.",
    )
    rp.add_argument(
        "files",
        nargs="*",
        type=Path,
        default=[DEFAULT_CAPTURE, DEFAULT_CAPTURE.with_name("scan.pcap")],
        help="capture files (default: the bundled sample and scan captures)",
    )
    rp.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="ONNX model (bundled)")
    rp.add_argument(
        "--rules",
        type=Path,
        default=DEFAULT_RULES,
        help="rule file or directory (rules/default.yaml)",
    )
    rp.add_argument(
        "--alerts",
        metavar="FILE",
        default="-",
        help="alert file (JSON lines); '-' for stdout (the default)",
    )
    rp.add_argument("--realtime", action="store_true", help="honour the capture's timing")
    rp.add_argument("--speed", type=float, help="real time times X (implies --realtime)")
    rp.add_argument(
        "--serve-metrics",
        metavar="[HOST:]PORT",
        help="serve Prometheus metrics, and keep serving after the replay",
    )
    rp.add_argument("--idle-timeout", type=float, default=FlowConfig.idle_timeout_s, metavar="S")
    rp.add_argument(
        "--active-timeout", type=float, default=FlowConfig.active_timeout_s, metavar="S"
    )
    rp.set_defaults(func=cmd_replay)

    run = sub.add_parser(
        "run",
        help="the daemon: live capture, scoring, alerts, metrics",
        description="Capture on the configured interfaces until SIGTERM "
        "(drain, score every open flow, exit 0); SIGHUP reloads rules and "
        "model and reopens the alert file.",
    )
    run.add_argument("--config", type=Path, default=Path("/etc/quietwire/config.yaml"))
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check-config", help="validate a daemon config without starting")
    check.add_argument("--config", type=Path, default=Path("/etc/quietwire/config.yaml"))
    check.set_defaults(func=cmd_check_config)

    rules = sub.add_parser("rules", help="rule files")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True, metavar="ACTION")
    rc = rules_sub.add_parser("check", help="validate rule files (errors as file:line)")
    rc.add_argument("files", nargs="+", type=Path)
    rc.set_defaults(func=cmd_rules_check)

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
        help="benign captures, directories of them, or flow tables",
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

    ev = sub.add_parser(
        "eval",
        help="measure detection quality against baselines on labelled sets",
        description="Rebuild the labelled sets (generated: trafficgen's pcap; real: the "
        "nDPI captures of quietwire/data/ndpi_labels.yaml), fit the diffusion model and the "
        "baselines (Isolation Forest, LOF, autoencoder) on the same benign flows, and report "
        "AUROC, AUPRC, recall at FPR 1e-2/1e-3/1e-4 and per attack type; --hard adds "
        "contamination, masked/jittered features and augmentation with synthetic flows.",
    )
    ev.add_argument("--data", choices=("generated", "real", "all"), default="all")
    ev.add_argument("--pcap-dir", type=Path, default=Path("../shared/data/ndpi/pcap"))
    ev.add_argument("--out", type=Path, help="where the sets, report.json and plots go")
    ev.add_argument("--train-steps", type=int, default=2000, metavar="N")
    ev.add_argument("--scale", type=float, default=2.0, help="size of the generated set")
    ev.add_argument("--hard", action="store_true", help="also run the hard cases")
    ev.add_argument("--seed", type=int, default=0, help="first seed")
    ev.add_argument(
        "--seeds",
        type=int,
        default=3,
        metavar="N",
        help="fit every detector with N seeds and report the means (default 3)",
    )
    ev.set_defaults(func=cmd_eval)

    schema = sub.add_parser(
        "schema",
        help="print the feature schema",
        description="Print every feature: name, unit, nullable, meaning.",
    )
    schema.set_defaults(func=cmd_schema)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FlowFileError as exc:
        _error(str(exc))
        return 2
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
