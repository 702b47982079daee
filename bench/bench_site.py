"""Site benchmark: the bundled model on a generated network it has never seen, as
installed, after `quietwire calibrate`, and against models learnt from that network's flow log
(`quietwire train --benign`, from scratch with the bundled model's score and fine-tuned with
`--init` from the bundled model).

    python bench/bench_site.py [--seed 23] [--scale 8] [--duration 1200]

The network: trafficgen's office (web/TLS, DNS, NTP, SSH, mail; clients 10.1.0-3.x). Its two
halves are two trafficgen runs of it: the first (seed S) benign only, replayed through the
agent with a flow log as a site would (`quietwire replay --flow-log`); the second (seed S + 1)
with every attack type mixed in (`--attack-share`), replayed the same way. The bundled model
was trained on the nDPI captures, so any trafficgen network is new to it. Every model is then
scored on the second half's records (ended flows and interim records, as the agent scores
them) by the agent's onnxruntime scorer, at that model's own FPR-1e-2 threshold: the share of
benign records above it, and the share of each attack type's records above it (recall).
Every step runs the project's own commands in a subprocess.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

FPR = 1e-2
MODELS = ("bundled", "calibrated", "trained", "fine-tuned")
PROTO = {"TCP": 6, "UDP": 17, "ICMP": 1}


def quietwire(*args: str) -> str:
    """Run `quietwire ARGS...` (this checkout's) and return what it printed; raise with its
    output when it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "quietwire.cli", *args], capture_output=True, text=True, env=env
    )
    out = done.stdout + done.stderr
    if done.returncode:
        raise RuntimeError(f"quietwire {' '.join(args)} failed ({done.returncode}):\n{out}")
    return out


def test_records(flow_log: Path, labels: dict) -> tuple[np.ndarray, list[str]]:
    """The feature matrix of a flow log's records (the agent's reader) and each record's
    trafficgen label (by its 5-tuple)."""
    from quietwire.agent.output.flowlog import read_flow_log

    features = np.concatenate([c.features for c in read_flow_log(flow_log)])
    kinds = []
    with flow_log.open() as f:
        for line in f:
            d = json.loads(line)
            a = (int(ipaddress.ip_address(d["src_ip"])), int(d.get("src_port") or 0))
            b = (int(ipaddress.ip_address(d["dest_ip"])), int(d.get("dest_port") or 0))
            kinds.append(labels.get((PROTO[d["proto"]], *sorted([a, b])), "unlabelled"))
    if len(kinds) != len(features):
        raise RuntimeError(f"{flow_log}: {len(kinds)} lines but {len(features)} flow records")
    return features, kinds


def site_figures(
    work: Path,
    seed: int = 23,
    scale: float = 8.0,
    duration: float = 1200.0,
    attack_share: float = 1.0,
    train_steps: int | None = None,
    init_steps: int | None = None,
    allow_few_flows: bool = False,
    log=print,
) -> dict:
    """Generate the network, replay both halves, calibrate, train and fine-tune; the figures
    of each model on the second half."""
    from quietwire.agent.detect.model import DEFAULT_MODEL, ScoringModel
    from quietwire.trainer.traffic.trafficgen import generate, read_labels

    work.mkdir(parents=True, exist_ok=True)
    bundled = work / "bundled.onnx"  # a copy: every step uses the same model
    shutil.copy(DEFAULT_MODEL, bundled)
    first, second = work / "first.pcap", work / "second.pcap"
    info = [
        generate(first, work / "first.labels.csv", seed, scale, 0.0, duration),
        generate(second, work / "second.labels.csv", seed + 1, scale, attack_share, duration),
    ]
    log(
        f"network: trafficgen seeds {seed} (first half, benign) and {seed + 1} (second half, "
        f"{info[1]['attacks']} attack instances), {scale:g} x 1,500 sessions over {duration:g} s "
        f"each: {info[0]['packets']:,} and {info[1]['packets']:,} packets"
    )
    site_log, test_log = work / "site" / "flows.json", work / "test" / "flows.json"
    for pcap, flow_log in ((first, site_log), (second, test_log)):
        out = quietwire(
            "replay", str(pcap), "--model", str(bundled),
            "--alerts", str(flow_log.parent / "alerts.json"), "--flow-log", str(flow_log),
        )  # fmt: skip
        log(next(line for line in out.splitlines() if "flow log" in line))

    paths = {"bundled": bundled}
    paths["calibrated"] = work / "calibrated.onnx"
    few = ["--allow-few-flows"] if allow_few_flows else []
    out = quietwire(
        "calibrate", "--model", str(bundled), str(site_log), "-o",
        str(paths["calibrated"]), *few,
    )  # fmt: skip
    log(next(line for line in out.splitlines() if line.startswith("records:")))
    seconds = {}
    # From scratch with the bundled model's score, so the two learnt models differ only in
    # where they start (--init keeps the model's score).
    score = ScoringModel(bundled).score_kind
    log(f"bundled model: {DEFAULT_MODEL.name} (model {ScoringModel(bundled).version}, {score})")
    for name, extra, steps in (
        ("trained", ["--score", score], train_steps),
        ("fine-tuned", ["--init", str(bundled)], init_steps),
    ):
        paths[name] = work / f"{name}.onnx"
        started = time.perf_counter()
        out = quietwire(
            "train", "--benign", str(site_log), "-o", str(paths[name]), *extra,
            *(["--train-steps", str(steps)] if steps else []),
        )  # fmt: skip
        wall = time.perf_counter() - started
        fit = float(re.search(r"^time: ([0-9.]+) s", out, re.M).group(1))
        seconds[name] = (fit, wall)
        log(f"{name}: " + next(line for line in out.splitlines() if line.startswith("records:")))

    features, kinds = test_records(test_log, read_labels(work / "second.labels.csv"))
    benign = np.array([k == "benign" for k in kinds])
    attack_kinds = sorted({k for k in kinds if k not in ("benign", "unlabelled")})
    result = {
        "benign_records": int(benign.sum()),
        "attack_records": Counter(k for k in kinds if k != "benign"),
        "site_records": sum(1 for _ in site_log.open()),
        "models": {},
    }
    for name in MODELS:
        model = ScoringModel(paths[name])
        score = model.score(features).score
        over = score > model.thresholds[FPR]  # the agent alerts on score > threshold
        attack = ~benign & (np.array(kinds) != "unlabelled")
        result["models"][name] = {
            "path": paths[name],
            "threshold": model.thresholds[FPR],
            "benign_over": float(over[benign].mean()),
            "recall": {k: float(over[np.array(kinds) == k].mean()) for k in attack_kinds},
            "recall_all": float(over[attack].mean()) if attack.any() else float("nan"),
            "train_seconds": seconds.get(name),
            "train_steps": model.training.get("config", {}).get("train_steps"),
        }
    return result


def format_table(result: dict) -> str:
    """One table: a row per figure, a column per model."""
    models = result["models"]
    width = 12
    head = f"{'second half (records)':<30}" + "".join(f"{m:>{width}}" for m in MODELS)
    lines = [head]

    def row(label: str, values, fmt=lambda v: f"{v:.2%}") -> None:
        lines.append(f"{label:<30}" + "".join(f"{fmt(v):>{width}}" for v in values))

    row("FPR-1e-2 threshold", [models[m]["threshold"] for m in MODELS], lambda v: f"{v:.4g}")
    benign = f"benign over it ({result['benign_records']:,})"
    row(benign, [models[m]["benign_over"] for m in MODELS])
    kinds = list(models[MODELS[0]]["recall"])
    n_attack = sum(result["attack_records"][k] for k in kinds)
    row(f"attack recall ({n_attack:,})", [models[m]["recall_all"] for m in MODELS])
    row(
        "  mean over attack types",
        [float(np.mean(list(models[m]["recall"].values()))) for m in MODELS],
    )
    for k in kinds:
        row(f"  {k} ({result['attack_records'][k]:,})", [models[m]["recall"][k] for m in MODELS])
    steps = [models[m]["train_steps"] if models[m]["train_seconds"] else None for m in MODELS]
    row("training steps per network", steps, lambda v: "" if v is None else f"{v:,}")
    fits = [(models[m]["train_seconds"] or (None,))[0] for m in MODELS]
    row("training time (fit, s)", fits, lambda v: "" if v is None else f"{v:.1f}")
    if result["attack_records"].get("unlabelled"):
        lines.append(f"({result['attack_records']['unlabelled']} records without a label left out)")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=23, help="the first half's trafficgen seed")
    ap.add_argument("--scale", type=float, default=8.0, help="benign sessions per half x 1,500")
    ap.add_argument("--duration", type=float, default=1200.0, help="seconds of traffic per half")
    ap.add_argument("--attack-share", type=float, default=1.0, help="attack instances per type")
    ap.add_argument("--train-steps", type=int, help="quietwire train's (its default: 2000)")
    ap.add_argument("--init-steps", type=int, help="quietwire train --init's (its default: 500)")
    ap.add_argument("--keep", type=Path, help="work in this directory and keep it")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = site_figures(
            args.keep or Path(tmp),
            args.seed,
            args.scale,
            args.duration,
            args.attack_share,
            args.train_steps,
            args.init_steps,
        )
    print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
