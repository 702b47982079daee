"""Model benchmark: the three anomaly scores compared on detection and speed, onnxruntime
scoring throughput on one thread, and the trainer's time per epoch on 100k flows.

    python bench/bench_model.py [--train-steps 2000] [--model quietwire/data/default.onnx]

Data: the nDPI captures of quietwire/data/ndpi_labels.yaml in ../shared/data/ndpi/pcap;
benign flows are split 80/20 (the 20% are never trained on), every malicious flow is scored.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def features_of(path: Path) -> np.ndarray:
    from quietwire.agent.capture.pcap import read_capture
    from quietwire.agent.features.meter import FlowMeter

    meter = FlowMeter(seed=1)
    parts = [meter.add(b).features for b in read_capture(path)]
    parts += [p.features for p in meter.drain()]
    return np.concatenate(parts)


def throughput(model, x: np.ndarray, batch: int, seconds: float = 2.0) -> float:
    """Flows per second scoring ``batch`` flows per call, for about ``seconds``."""
    chunk = x[:batch] if len(x) >= batch else np.resize(x, (batch, x.shape[1]))
    model.score(chunk)  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        model.score(chunk)
        done += batch
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pcap-dir", type=Path, default=REPO.parent / "shared/data/ndpi/pcap")
    parser.add_argument("--train-steps", type=int, default=2000)
    parser.add_argument(
        "--model",
        type=Path,
        default=REPO / "quietwire/data/default.onnx",
        help="the model whose scoring throughput is measured",
    )
    args = parser.parse_args()

    import torch

    from quietwire.agent.detect.model import ScoringModel
    from quietwire.trainer.data import load_labels
    from quietwire.trainer.model.detector import DiffusionDetector, TrainConfig
    from quietwire.trainer.model.diffusion import noise_loss, time_loss
    from quietwire.trainer.model.export import export
    from quietwire.trainer.synthesis.fidelity import auroc

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )
    labels = load_labels()
    benign = np.concatenate([features_of(args.pcap_dir / f) for f in labels["benign"]])
    malicious = {f: features_of(args.pcap_dir / f) for f in labels["malicious"]}
    order = np.random.default_rng(0).permutation(len(benign))
    n_test = len(benign) // 5
    test, train = benign[order[:n_test]], benign[order[n_test:]]
    bad = np.concatenate(list(malicious.values()))
    print(
        f"benign: {len(train)} train, {len(test)} unseen; malicious: {len(bad)} flows "
        f"in {len(malicious)} files\n"
    )

    print(
        f"{'score':<9} {'AUROC':>6} {'mean file AUROC':>16} {'recall@1e-2':>11} "
        f"{'flows/s b=1':>12} {'flows/s b=4096':>15} {'fit s':>6}"
    )
    tmp = Path(tempfile.mkdtemp(prefix="qw-model-"))
    for score in ("dte_clean", "dte", "noise", "dte_noise"):
        det = DiffusionDetector(TrainConfig(score=score, train_steps=args.train_steps)).fit(train)
        model = ScoringModel(export(det, tmp / f"{score}.onnx"))
        s_test = model.score(test).score
        total = auroc(model.score(bad).score, s_test)
        per_file = np.mean([auroc(model.score(x).score, s_test) for x in malicious.values()])
        recall = np.mean(model.score(bad).score > model.threshold(1e-2))
        print(
            f"{score:<9} {total:6.3f} {per_file:16.3f} {recall:11.3f} "
            f"{throughput(model, test, 1):12,.0f} {throughput(model, benign, 4096):15,.0f} "
            f"{det.summary_.seconds:6.1f}"
        )

    if args.model.exists():
        model = ScoringModel(args.model)
        print(
            f"\n{args.model.name} (score {model.score_kind}), onnxruntime, one thread: "
            f"batch 1: {throughput(model, test, 1):,.0f} flows/s, "
            f"batch 4096: {throughput(model, benign, 4096):,.0f} flows/s"
        )

    # Trainer: one epoch over 100k flows (benign flows resampled), batch 256, both networks.
    from quietwire.trainer.model.diffusion import Denoiser
    from quietwire.trainer.model.preprocess import Preprocessor

    prep = Preprocessor.fit(train)
    rows = np.random.default_rng(1).integers(0, len(train), 100_000)
    inputs = torch.from_numpy(prep.transform(train[rows]))
    det = DiffusionDetector(TrainConfig())
    d = inputs.shape[1]
    gen = torch.Generator().manual_seed(0)
    timings = {}
    losses = {
        "denoiser": (Denoiser(d, d), lambda m, b: noise_loss(m, det.schedule, b, gen)),
        "time estimator": (
            Denoiser(d, 30),
            lambda m, b: time_loss(m, det.schedule, b, 300, 30, gen),
        ),
    }
    for name, (model, loss) in losses.items():
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        start = time.perf_counter()
        for i in range(0, len(inputs), 256):
            opt.zero_grad()
            loss(model, inputs[i : i + 256]).mean().backward()
            opt.step()
        timings[name] = time.perf_counter() - start
    print(
        "\ntrainer, one epoch of 100,000 flows (batch 256): "
        + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
    )


if __name__ == "__main__":
    main()
