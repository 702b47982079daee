"""Learning-period benchmark: the bundled model on a generated network it has not seen
(trafficgen with its own seed: web/TLS, DNS, NTP, SSH and mail, and by default the eleven
attacks), replayed through the agent twice: once as installed, once with a learning period over
the first half of the traffic. Printed for the second half: the drift gauges (share of the
records over each threshold, PSI against the live model's calibration) and the incidents the
analyst gets, before and after.

    python bench/bench_learning.py [--seed 11] [--scale 10] [--duration 2400] [--benign-only]

Replayed in traffic time: the learning period ends when the traffic reaches its middle (the
Learner's clock is the replay's), and the drift window is the whole second half.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def replay(capture: Path, work: Path, half_s: float, learn: bool, min_records: int) -> dict:
    """Replay ``capture`` through an Engine with a flow log (and, with ``learn``, a learning
    period of ``half_s`` from the first packet); the drift and the incidents after ``half_s``."""
    import shutil

    from quietwire.agent.capture.pcap import read_capture
    from quietwire.agent.detect.model import DEFAULT_MODEL, ScoringModel
    from quietwire.agent.detect.rules import load_rules
    from quietwire.agent.output.alerts import AlertSink
    from quietwire.agent.output.flowlog import FlowLog, FlowLogSettings
    from quietwire.agent.service.drift import calibration_table
    from quietwire.agent.service.engine import Engine
    from quietwire.agent.service.metrics import Metrics
    from quietwire.agent.site.learning import Learner, LearnSettings
    from quietwire.rules import DEFAULT_RULES

    work.mkdir(parents=True, exist_ok=True)
    shutil.copy(DEFAULT_MODEL, work / "model.onnx")
    metrics = Metrics()
    messages: list[str] = []
    flow_log = FlowLog(FlowLogSettings(work / "flows.json"), metrics)
    model = ScoringModel(work / "model.onnx")
    batches = read_capture(capture, chunk_bytes=256 << 10)
    first = next(b for b in batches if len(b))
    t0 = float(first.ts_ns[0]) / 1e9
    learner = None
    if learn:
        learner = Learner(
            LearnSettings(half_s, min_records=min_records),
            flow_log.settings.path,
            model,
            t0,
            messages.append,
            metrics,
            background=False,
        )
    engine = Engine(
        model,
        load_rules(DEFAULT_RULES),
        AlertSink(work / "alerts.json"),
        metrics,
        log=messages.append,
        flow_log=flow_log,
    )
    middle = t0 + half_s
    second_half = False
    opened_before = Counter()
    for batch in [first, *batches]:
        if not len(batch):
            continue
        now = float(batch.ts_ns[0]) / 1e9
        if learner:
            engine.expire(int(now * 1e9))
            learner.tick(now, engine)
        if not second_half and now >= middle:
            second_half = True
            opened_before = Counter(engine.summary.incidents)
            m = engine.model  # the drift window from here (a swap has reset it already)
            metrics.drift.reset(m.thresholds, calibration_table(m.path, m.version))
        engine.process(batch)
    engine.flush()
    engine.sink.close()
    flow_log.close()
    snap = metrics.drift.snapshot()
    after = Counter(engine.summary.incidents)
    after.subtract(opened_before)
    return {
        "drift": snap,
        "incidents": +after,
        "held": sum(engine.held_back_incidents.values()),
        "messages": messages,
    }


def main() -> int:
    from quietwire.trainer.traffic.trafficgen import generate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=11, help="trafficgen seed (the model used 0)")
    ap.add_argument("--scale", type=float, default=10.0, help="benign sessions x 1,500")
    ap.add_argument("--duration", type=float, default=2400.0, help="seconds of traffic")
    ap.add_argument("--benign-only", action="store_true", help="no attacks in the traffic")
    ap.add_argument("--min-records", type=int, default=2000, help="learn.min_records")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        capture = tmp / "site.pcap"
        info = generate(
            capture,
            tmp / "site.labels.csv",
            seed=args.seed,
            scale=args.scale,
            attack_share=0.0 if args.benign_only else 1.0,
            duration_s=args.duration,
        )
        print(
            f"generated network: seed {args.seed}, {info['packets']:,} packets over "
            f"{args.duration:g} s, {info['attacks']} attack instances; learning period: the "
            f"first {args.duration / 2:g} s"
        )
        half = args.duration / 2
        runs = {
            "as installed": replay(capture, tmp / "plain", half, False, args.min_records),
            "after learning": replay(capture, tmp / "learn", half, True, args.min_records),
        }
        done = [m for m in runs["after learning"]["messages"] if "learning period done" in m]
        print(
            done[0] if done else "no calibration: " + "; ".join(runs["after learning"]["messages"])
        )
        print("second half of the traffic:")
        print(f"{'model':<16}{'records':>9}{'>1e-2 thr':>11}{'>1e-3 thr':>11}{'PSI':>8}  incidents")
        for name, r in runs.items():
            d = r["drift"]
            causes = ", ".join(f"{k} {v}" for k, v in sorted(r["incidents"].items())) or "none"
            print(
                f"{name:<16}{d.records:>9,}{d.share_over.get(0.01, 0):>11.2%}"
                f"{d.share_over.get(0.001, 0):>11.2%}{d.psi or 0:>8.2f}  {causes}"
            )
            if r["held"]:
                print(f"{'':<16}(unknown_anomaly incidents held back while learning: {r['held']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
