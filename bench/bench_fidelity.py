"""Fidelity of the generator (trainer/synthesis/generator.py) on trafficgen's benign traffic
and on the nDPI benign captures, against real flows it never saw, with the same splits as `quietwire
eval` (70% of the benign flows to train on, 30% held out; the attacks of each set):

- the fidelity report (trainer/synthesis/fidelity.py): two-sample classifier AUC, KS / W1,
  correlation distance, rows breaking a schema rule, and the rows the repair step changed;
- sampling speed (flows/s, one thread, against the detector's own sampler with --before);
- utility: a detector (500 training steps) trained on synthetic benign flows only against one
  trained on the real training flows, both scored on the held-out benign flows and the attacks;
- augmentation: a detector trained on 200 real benign flows, and on them plus N synthetic ones
  from a generator fitted on the same 200 (what `quietwire train --augment N` does).

    OMP_NUM_THREADS=1 python bench/bench_fidelity.py [--data generated real] [--steps 4000]
        [--width 192] [--depth 3] [--batch-size 256] [--lr 0.002] [--device cpu] [--cache DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from quietwire.trainer.evaluation.evaluate import EvalSet, generated_set, real_set, workdir
from quietwire.trainer.model.detector import DiffusionDetector, TrainConfig
from quietwire.trainer.synthesis.fidelity import auroc, compare, utility
from quietwire.trainer.synthesis.generator import FlowGenerator, GeneratorConfig


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--data", nargs="+", choices=("generated", "real"), default=["generated", "real"]
    )
    ap.add_argument("--pcap-dir", type=Path, default=Path("../shared/data/ndpi/pcap"))
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--steps", type=int, default=4000, help="generator training steps")
    ap.add_argument("--width", type=int, default=GeneratorConfig.width)
    ap.add_argument("--depth", type=int, default=GeneratorConfig.depth)
    ap.add_argument("--batch-size", type=int, default=GeneratorConfig.batch_size)
    ap.add_argument("--lr", type=float, default=GeneratorConfig.lr)
    ap.add_argument(
        "--device", default="cpu", help="where the generator trains (cuda: a GPU); samples on CPU"
    )
    ap.add_argument(
        "--cache",
        type=Path,
        help="keep each set's feature matrices in DIR/NAME.npz (read them from there when "
        "present: a machine without the pcaps or scapy)",
    )
    ap.add_argument("--utility-steps", type=int, default=500)
    ap.add_argument("--augment", type=int, default=1000)
    ap.add_argument("--augment-steps", type=int, default=2000, help="its generator's steps")
    ap.add_argument("--before", action="store_true", help="also the detector's own sampler")
    ap.add_argument(
        "--diagnose",
        action="store_true",
        help="only why the detector's own sampler fails: mean KS per feature family and the "
        "two-sample AUCs of the preprocessing's round trip, the detector's samples (--before's "
        "model) and real training flows, against the held-out flows",
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name in args.data:
        s = _load_set(name, args)
        if args.diagnose:
            diagnose(name, s, args.seed)
            continue
        print(
            f"\n== {name}: {len(s.train)} benign flows to train on, {len(s.benign)} held out, "
            f"{len(s.attack)} attack flows; generator {args.steps} steps"
        )
        config = GeneratorConfig(
            width=args.width,
            depth=args.depth,
            train_steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
        )
        gen = FlowGenerator(config).fit(s.train, device=args.device)
        print(
            f"generator fit: {gen.fit_seconds:.1f} s on {args.device}, final loss "
            f"{gen.final_loss:.3f} (width {config.width}, depth {config.depth}, batch "
            f"{config.batch_size}, lr {config.lr:g})"
        )
        synthetic = gen.sample(len(s.train), seed=args.seed + 1)
        rate = gen.last_rate
        held = "held out: never seen by the generator"
        print(compare(s.benign, synthetic[: len(s.benign)], args.seed, held).table(12))
        print(f"repair step (values moved, {len(synthetic)} rows): {gen.last_repairs}")
        line = f"sampling: generator {rate:,.0f} flows/s"
        if args.before:
            det = DiffusionDetector(TrainConfig(seed=args.seed)).fit(s.train)
            started = time.perf_counter()
            old = det.sample(len(s.benign), seed=args.seed + 1)
            old_rate = len(old) / (time.perf_counter() - started)
            line += f", the detector's own sampler {old_rate:,.0f} flows/s (same run)"
            r = compare(s.benign, old, seed=args.seed)
            print(
                f"before (the detector's own sampler, default model): classifier AUC "
                f"{r.classifier_auc:.3f} logistic, {r.trees_auc:.3f} trees, mean KS "
                f"{np.nanmean(r.ks):.3f}, rows breaking a rule {r.violations:.3f}"
            )
        print(line + " (one thread, contended machine)")
        u = utility(synthetic, s.train, s.benign, s.attack, args.utility_steps, args.seed)
        print(
            f"utility: detector AUROC trained on {len(synthetic)} synthetic flows "
            f"{u['synthetic']:.3f}, on the {len(s.train)} real ones {u['real']:.3f} "
            f"(ratio {u['ratio']:.3f})"
        )
        rng = np.random.default_rng(2)
        few = s.train[rng.permutation(len(s.train))[:200]]
        small_cfg = GeneratorConfig(train_steps=args.augment_steps, seed=args.seed)
        small_gen = FlowGenerator(small_cfg).fit(few, device=args.device)
        fake = small_gen.sample(args.augment, seed=3)
        out = {}
        for label, x in (
            ("200 real", few),
            (f"200 real + {args.augment} synthetic", np.r_[few, fake]),
        ):
            det = DiffusionDetector(TrainConfig(train_steps=args.utility_steps, seed=args.seed))
            det.fit(x)
            out[label] = auroc(det.score(s.attack)[0], det.score(s.benign)[0])
        print("augmentation: AUROC " + ", ".join(f"{k} {v:.3f}" for k, v in out.items()))
        sys.stdout.flush()
    return 0


def _load_set(name: str, args) -> EvalSet:
    """The evaluation set, from --cache when it holds it (written there otherwise)."""
    cached = args.cache / f"{name}-{args.seed}.npz" if args.cache else None
    if cached and cached.exists():
        d = np.load(cached)
        return EvalSet(name, d["train"], d["benign"], d["attack"], d["kinds"], tuple(d["pb"]))
    if name == "generated":
        s = generated_set(workdir(args.workdir), args.seed)
    else:
        s = real_set(args.pcap_dir, args.seed)
    if cached:
        cached.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"train": s.train, "benign": s.benign, "attack": s.attack, "kinds": s.kinds}
        np.savez(cached, **arrays, pb=np.array(s.payload_borne, dtype=str))
    return s


FAMILIES = {
    "counts": lambda n: (
        n.split("_", 1)[-1]
        in ("packets", "bytes", "payload_bytes", "header_bytes", "payload_packets")
    ),
    "lengths": lambda n: "_pkt_len_" in n,
    "timing": lambda n: "_iat_" in n or n in ("duration_s", "packets_per_s", "bytes_per_s"),
    "payload": lambda n: n.endswith(("payload_ratio", "ttl_min", "init_window")),
    "flags": lambda n: (
        n.startswith(("proto_", "dst_port_", "tcp_", "flow_open"))
        or any(n.endswith(f"_{f}_packets") for f in ("fin", "syn", "rst", "psh", "ack", "urg"))
    ),
    "bytes stats": lambda n: "_payload_" in n and not n.endswith(("_bytes", "_packets", "_ratio")),
    "http": lambda n: n.startswith("http_"),
    "context": lambda n: n.startswith(("src_host_", "dst_host_", "pair_")),
}


def diagnose(name: str, s, seed: int) -> None:
    from quietwire.agent.features.schema import FEATURE_NAMES
    from quietwire.trainer.model.preprocess import Preprocessor
    from quietwire.trainer.synthesis.fidelity import violation_share

    prep = Preprocessor.fit(s.train)
    det = DiffusionDetector(TrainConfig(seed=seed)).fit(s.train)
    rows = {
        "preprocessing round trip": prep.inverse(prep.transform(s.train)),
        "detector's own sampler": det.sample(len(s.benign), seed=seed + 1),
        "real training flows": s.train[: len(s.benign)],
    }
    print(f"\n== {name}: {len(s.train)} training flows, {len(s.benign)} held out")
    print(
        f"{'':26} {'LR AUC':>6} {'trees':>6} {'broken':>6} {'NaN':>5} "
        + " ".join(f"{k:>7}" for k in FAMILIES)
    )
    for label, x in rows.items():
        r = compare(s.benign, x, seed=seed)
        nan_rule = violation_share(x)[1]["NaN where a feature does not apply"]
        ks = [
            np.nanmean([r.ks[j] for j, n in enumerate(FEATURE_NAMES) if test(n)])
            for test in FAMILIES.values()
        ]
        print(
            f"{label:26} {r.classifier_auc:6.3f} {r.trees_auc:6.3f} {r.violations:6.2f} "
            f"{nan_rule:5.2f} " + " ".join(f"{v:7.3f}" for v in ks)
        )
    sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main())
