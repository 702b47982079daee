"""`quietwire eval`: detection quality on the labelled sets, against baselines."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import error, trainer_or_error


def cmd_eval(args: argparse.Namespace) -> int:
    if trainer_or_error() is None:
        return 2
    import json

    from quietwire.trainer.evaluation import evaluate as ev

    if args.seeds < 1:
        error(f"--seeds {args.seeds}: need at least 1")
        return 2
    seeds = tuple(range(args.seed, args.seed + args.seeds))
    out = ev.workdir(args.out)
    sets = _sets(args, out)
    if sets is None:
        return 2
    result: dict = {"train_steps": args.train_steps, "seeds": args.seeds}
    payload_borne: dict[str, dict] = {}  # per set, for the table after every set's own
    for s in sets:
        print(
            f"\n{s.name}: {len(s.train)} benign training flows; test: {len(s.benign)} "
            f"benign, {len(s.attack)} attack flows of {len(set(s.kinds.tolist()))} types"
        )
        result_set = ev.compare(s, args.train_steps, seeds)
        reports, scores = result_set.reports, result_set.scores
        print(ev.table(s.name, reports))
        entry = {k: r.as_dict() for k, r in reports.items()}
        entry["payload_borne"] = payload_borne[s.name] = ev.payload_borne(reports, s.payload_borne)
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
        entry["incidents"] = _incidents(s.name, result_set.diffusion.det, out, args)
        for png in ev.plots(out, s.name, scores):
            print(f"plot: {png}")
        result[s.name] = entry
    if any(r["types"] for r in payload_borne.values()):
        print("\n" + ev.payload_table(payload_borne))
    report = out / "report.json"
    report.write_text(json.dumps(result, indent=2))
    print(f"\nreport: {report}")
    return 0


def _sets(args: argparse.Namespace, out: Path) -> list | None:
    """The labelled sets --data asks for; None (after a one-line error) when one is missing."""
    from quietwire.trainer.evaluation import evaluate as ev
    from quietwire.trainer.evaluation.labset import lab_set

    sets = []
    if args.data in ("generated", "all"):
        sets.append(ev.generated_set(out, seed=args.seed, scale=args.scale))
    if args.data in ("real", "all"):
        if not (args.pcap_dir / "synscan.pcap").exists():
            error(f"{args.pcap_dir}: the nDPI captures are not there (--pcap-dir)")
            return None
        sets.append(ev.real_set(args.pcap_dir, seed=args.seed))
    if args.data == "lab" or (args.data == "all" and args.lab_runs):
        runs = args.lab_runs or []
        missing = [r for r in runs if not (r / "events.jsonl").exists()]
        if len(runs) < 2 or missing:
            error(
                "--lab-runs: give two or more runs of `quietwire lab run` (the last is the "
                f"test run){'; not a lab run: ' + ', '.join(map(str, missing)) if missing else ''}"
            )
            return None
        sets.append(lab_set(runs))
    return sets


def register(sub) -> None:
    """Add this module's subcommands to the parser."""
    ev = sub.add_parser(
        "eval",
        help="measure detection quality against baselines on labelled sets",
        description="Rebuild the labelled sets (generated: trafficgen's pcap; real: the "
        "nDPI captures of quietwire/data/ndpi_labels.yaml; lab: runs of `quietwire lab run`), "
        "fit the diffusion model and the "
        "baselines (Isolation Forest, LOF, autoencoder) on the same benign flows, and report "
        "AUROC, AUPRC, recall at FPR 1e-2/1e-3/1e-4 and per attack type, then the "
        "payload-borne attacks (web exploits in a request's bytes) of both sets; --hard adds "
        "contamination, masked/jittered features and augmentation with synthetic flows.",
    )
    ev.add_argument("--data", choices=("generated", "real", "lab", "all"), default="all")
    ev.add_argument(
        "--lab-runs",
        type=Path,
        nargs="+",
        metavar="DIR",
        help="runs of `quietwire lab run` for --data lab (and all): the last is tested, the "
        "others trained on",
    )
    ev.add_argument("--pcap-dir", type=Path, default=Path("../shared/data/ndpi/pcap"))
    ev.add_argument("--out", type=Path, help="where the sets, report.json and plots go")
    ev.add_argument("--train-steps", type=int, default=2000, metavar="N")
    ev.add_argument("--scale", type=float, default=2.0, help="size of the generated set")
    ev.add_argument("--hard", action="store_true", help="also run the hard cases")
    ev.add_argument("--seed", type=int, default=0, help="first seed")
    ev.add_argument(
        "--budget",
        type=float,
        default=1.0,
        metavar="N",
        help="benign incidents per 100 host-days the risk threshold is fitted for (default 1)",
    )
    ev.add_argument(
        "--seeds",
        type=int,
        default=3,
        metavar="N",
        help="fit every detector with N seeds and report the means (default 3)",
    )
    ev.set_defaults(func=cmd_eval)


def _incidents(name: str, det, out: Path, args: argparse.Namespace) -> dict:
    """Incident-level results: the set's captures replayed by the agent with the first
    seed's diffusion model (exported to ONNX) and the default rules."""
    from quietwire.trainer.evaluation import evaluate as ev
    from quietwire.trainer.evaluation.incidents import (
        REAL_EXPECTED_CAUSE,
        evaluate_incidents,
        every_flow,
    )
    from quietwire.trainer.model.export import export
    from quietwire.trainer.traffic.trafficgen import (
        EXPECTED_CAUSE,
        flow_kinds,
        generate,
        read_labels,
    )

    model = export(det, out / f"{name}.onnx")
    if name == "generated":
        # a fresh capture of the same network (another seed): no flow of it was trained on
        pcap, label_file = out / "incidents.pcap", out / "incidents.labels.csv"
        generate(pcap, label_file, seed=args.seed + 1000, scale=args.scale)
        labels = read_labels(label_file)
        captures = [(pcap, lambda r: flow_kinds(r, labels, default="benign"))]
        expected = {k: cause for k, (cause, _) in EXPECTED_CAUSE.items()}
        train_labels = read_labels(out / "generated.labels.csv")
        fit_on = _benign_chunks(
            out / "generated.pcap", lambda r: flow_kinds(r, train_labels, default="benign")
        )
        note = "a fresh generated capture (seed + 1000)"
    elif name == "lab":
        from quietwire.trainer.evaluation.incidents import LAB_EXPECTED_CAUSE
        from quietwire.trainer.lab.labels import label_run, labeller

        run = args.lab_runs[-1]
        captures = [(run / "capture.pcap", labeller(label_run(run)))]
        expected = dict(LAB_EXPECTED_CAUSE)
        fit_on = [
            chunk
            for r in args.lab_runs[:-1]
            for chunk in _benign_chunks(r / "capture.pcap", labeller(label_run(r)))
        ]
        note = f"the test run {run} (none of its flows trained on)"
    else:
        lab = ev.load_labels()
        captures = [
            (args.pcap_dir / f, every_flow(f.rsplit(".", 1)[0])) for f in lab["malicious"]
        ] + [(args.pcap_dir / f, every_flow("benign")) for f in lab["benign"]]
        expected = {f.rsplit(".", 1)[0]: None for f in lab["malicious"]} | REAL_EXPECTED_CAUSE
        fit_on = [chunk for f in lab["benign"] for chunk in _benign_chunks(args.pcap_dir / f, None)]
        note = (
            "every capture of the set (benign incidents: 70% of those flows were trained on, "
            "and the risk threshold was fitted on all of them)"
        )
    result = evaluate_incidents(model, captures, expected, fit_on, budget=args.budget)
    print(f"\nincidents on {note}:\n" + result.table(name))
    return result.as_dict()


def _benign_chunks(pcap: Path, label_of) -> list:
    """A capture's benign (records, features), as the agent meters them (``label_of`` None:
    every flow is benign)."""
    import numpy as np

    from quietwire.agent.capture.pcap import read_capture
    from quietwire.agent.features.meter import FlowMeter

    meter = FlowMeter(seed=1)
    parts = [meter.add(b) for b in read_capture(pcap)] + list(meter.drain())
    out = []
    for part in parts:
        if not len(part):
            continue
        if label_of is None:
            out.append((part.records, part.features))
            continue
        keep = np.flatnonzero(np.array(label_of(part.records)) == "benign")
        out.append((part.records.take(keep), part.features[keep]))
    return out
