"""Incident budget benchmark: the bundled model with a learning period on a network it has never
seen. Are benign incidents within 2x of the budget, and are attacks named as with a model
trained there?

    python bench/bench_budget.py [--learn /tmp/lab-1] [--judge /tmp/lab-2] [--budget 1]
                                 [--train-steps 2000] [--seed 0] [--out bench/out/budget]

Two runs of `quietwire lab run` (real software, labelled): the learn run's benign flows are the
site's learning period, the judge run is replayed through the agent with the default rules.
Three models, each judged by trainer/evaluation/incidents.py's evaluate_incidents:

- bundled, as installed: the bundled model with the risk threshold it ships with;
- bundled + learning period: the bundled model score-calibrated on the learn run's benign
  flows (site/calibrate.py), then its risk threshold and host baselines fitted on them for
  the budget (site/riskfit.py);
- trained there: a diffusion model trained on the learn run's benign flows (default
  TrainConfig), its risk fitted on the same flows.

Printed: one line per model (benign incidents on the judge run, per 100 host-days, against
the budget and twice it; attack types named; the risk threshold), then each model's incident
table. Everything goes to OUT/budget.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BUNDLED = "bundled, as installed"
LEARNED = "bundled + learning period"
TRAINED = "trained there"


def machine() -> dict:
    """The processor, cores, memory and Python this ran on."""
    mem_kib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
                break
    except OSError:
        pass
    return {
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "memory_gib": round(mem_kib / 2**20, 1) if mem_kib else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def summary_line(name: str, r: dict, budget: float) -> str:
    """One model's verdict: benign incidents against the budget, attack types named."""
    benign = sum(r["benign_incidents"].values())
    rate = r["benign_incidents_per_100_host_days"]
    within = rate is not None and rate <= 2 * budget
    types = r["types"]
    named = sum(t["named"] for t in types.values())
    rate_text = f"{rate:,.0f}" if rate is not None else "-"
    return (
        f"{name:<26} {benign:>6} {rate_text:>12} {budget:>7g} {2 * budget:>7g} "
        f"{'yes' if within else 'NO':>7} {f'{named}/{len(types)}':>7} {r['risk_threshold']:>10.4g}"
    )


HEADER = (
    f"{'model':<26} {'benign':>6} {'/100 host-d':>12} {'budget':>7} {'2x':>7} "
    f"{'within':>7} {'named':>7} {'threshold':>10}"
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--learn", type=Path, default=Path("/tmp/lab-1"), metavar="RUN")
    ap.add_argument("--judge", type=Path, default=Path("/tmp/lab-2"), metavar="RUN")
    ap.add_argument("--budget", type=float, default=1.0, help="benign incidents per 100 host-days")
    ap.add_argument("--train-steps", type=int, default=2000, metavar="N")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "bench/out/budget", metavar="DIR")
    args = ap.parse_args()

    import numpy as np

    from quietwire.agent.detect.model import DEFAULT_MODEL
    from quietwire.agent.site.calibrate import calibrate
    from quietwire.cli.evaluation import _benign_chunks
    from quietwire.trainer.evaluation.incidents import LAB_EXPECTED_CAUSE, evaluate_incidents
    from quietwire.trainer.lab.labels import label_run, labeller
    from quietwire.trainer.model.detector import DiffusionDetector, TrainConfig
    from quietwire.trainer.model.export import export

    for run in (args.learn, args.judge):
        if not (run / "events.jsonl").exists() or not (run / "capture.pcap").exists():
            print(f"{run}: not a run of `quietwire lab run`", file=sys.stderr)
            return 2
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    host = machine()
    started = datetime.now(UTC)
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    print(f"date: {started.strftime('%Y-%m-%d %H:%M UTC')}")
    print(
        f"machine: {host['processor']}, {host['cpus']} CPUs, {host['memory_gib']} GiB, "
        f"Python {host['python']}"
    )
    print(f"command: {command}")
    seconds: dict[str, float] = {}

    t = time.perf_counter()
    learn_chunks = _benign_chunks(args.learn / "capture.pcap", labeller(label_run(args.learn)))
    learn_features = np.concatenate([f for _, f in learn_chunks])
    judge_label = labeller(label_run(args.judge))
    seconds["learn and judge sets"] = time.perf_counter() - t
    print(
        f"learn: {args.learn}, {len(learn_features):,} benign records; judge: {args.judge}; "
        f"budget {args.budget:g} benign incidents per 100 host-days"
    )

    def judge(model: Path, fit_on) -> tuple:
        t = time.perf_counter()
        result = evaluate_incidents(
            model,
            [(args.judge / "capture.pcap", judge_label)],
            dict(LAB_EXPECTED_CAUSE),
            fit_on=fit_on,
            budget=args.budget,
        )
        return result, time.perf_counter() - t

    results = {}
    # a. the bundled model as installed: its shipped risk threshold and no host baselines
    bundled = shutil.copyfile(DEFAULT_MODEL, out / "bundled.onnx")
    results[BUNDLED], seconds[f"judge: {BUNDLED}"] = judge(Path(bundled), None)

    # b. the bundled model after a learning period on the learn run's benign flows
    learned = Path(shutil.copyfile(DEFAULT_MODEL, out / "learned.onnx"))
    t = time.perf_counter()
    calibrate(learned, learn_features, learned, allow_few_flows=True)
    seconds["calibrate"] = time.perf_counter() - t
    results[LEARNED], seconds[f"fit and judge: {LEARNED}"] = judge(learned, learn_chunks)

    # c. a model trained on the same benign flows
    t = time.perf_counter()
    config = TrainConfig(train_steps=args.train_steps, seed=args.seed)
    trained = export(DiffusionDetector(config).fit(learn_features), out / "trained.onnx")
    seconds["train"] = time.perf_counter() - t
    results[TRAINED], seconds[f"fit and judge: {TRAINED}"] = judge(trained, learn_chunks)

    as_dicts = {name: r.as_dict() for name, r in results.items()}
    lines = [HEADER] + [summary_line(n, d, args.budget) for n, d in as_dicts.items()]
    print("\n" + "\n".join(lines))
    host_days = next(iter(results.values())).host_days
    if host_days:
        print(
            f"judge run: {host_days:.3g} benign host-days; one benign incident is "
            f"{100 / host_days:,.0f} per 100 host-days"
        )
    for name, r in results.items():
        print("\n" + r.table(name))
    print("\nseconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))

    report = {
        "date": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": host,
        "command": command,
        "learn": str(args.learn),
        "judge": str(args.judge),
        "learn_benign_records": int(len(learn_features)),
        "budget": args.budget,
        "train_steps": args.train_steps,
        "seed": args.seed,
        "summary": lines,
        "models": {
            name: {
                **d,
                "within_2x_budget": d["benign_incidents_per_100_host_days"] is not None
                and d["benign_incidents_per_100_host_days"] <= 2 * args.budget,
                "types_named": sum(t["named"] for t in d["types"].values()),
                "types_total": len(d["types"]),
            }
            for name, d in as_dicts.items()
        },
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    path = out / "budget.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
