"""Export a fitted DiffusionDetector as one ONNX file: preprocessing, scoring, calibration and
metadata, for onnxruntime alone (the agent has no torch).

The graph is written op by op from the fitted parameters (no tracing), so what runs in the
agent is exactly this file's arithmetic:

    features [N, F] (NaN allowed)
      -> log1p / robust standardisation / clip / missing-value indicators   -> inputs [N, D]
      -> DTE classifier: expected diffusion step                 (score, if score == "dte")
      -> denoiser at fixed steps with fixed noise: squared error (score, if score == "noise";
                                                                  contributions [N, F])
      -> DTE step x mean contribution error / its training median (score, if "dte_noise")
      -> -log P(clean | x) + weight x log(error / median, at least 1) (score, if "dte_clean")
      -> tail probability against the held-out benign scores     (tail_probability [N])

Weights are stored as initializers named after the torch parameters (``denoiser/...``,
``dte/...``), so ``load_detector`` can rebuild the torch modules, e.g. to sample flows.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from quietwire import __version__
from quietwire.agent.features.schema import FEATURE_NAMES, SCHEMA_HASH, SCHEMA_NAME, SCHEMA_VERSION
from quietwire.trainer.model.detector import DTE_SCORES, DiffusionDetector, TrainConfig
from quietwire.trainer.model.diffusion import Denoiser, timestep_embedding
from quietwire.trainer.model.onnxgraph import OnnxGraph
from quietwire.trainer.model.preprocess import CLIP, Preprocessor

OPSET = 18


def _mlp(
    g: OnnxGraph, prefix: str, model: Denoiser, x: str, step_values: list[int], tag: str
) -> str:
    """The Denoiser on x ([..., N, D]) at fixed steps: the time projection of each step's
    embedding is computed in the graph from the stored weights, shaped to broadcast over x."""
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}

    def w(name: str) -> str:  # weights transposed for MatMul
        return g.const(f"{prefix}/{name}.weight_t", sd[f"{name}.weight"].T.copy())

    def b(name: str) -> str:
        return g.const(f"{prefix}/{name}.bias", sd[f"{name}.bias"])

    emb = timestep_embedding(torch.tensor(step_values), model.time_dim, model.steps).numpy()
    t_emb = g.const(f"{prefix}/step_embedding_{tag}", emb.astype(np.float32))
    t_proj = g.op("Add", g.op("MatMul", t_emb, w("time")), b("time"))  # [K, W]
    if len(step_values) > 1:
        t_proj = g.op("Unsqueeze", t_proj, g.const(f"{prefix}/axis1", np.array([1], np.int64)))
    h = g.op("Add", g.op("Add", g.op("MatMul", x, w("inp")), b("inp")), t_proj)
    for i in range(len(model.blocks)):
        p = f"blocks.{i}"
        normed = g.op(
            "LayerNormalization",
            h,
            g.const(f"{prefix}/{p}.norm.weight", sd[f"{p}.norm.weight"]),
            b(f"{p}.norm"),
            axis=-1,
            epsilon=1e-5,
        )
        a = g.op("Add", g.op("MatMul", normed, w(f"{p}.fc1")), b(f"{p}.fc1"))
        a = g.op("Mul", a, g.op("Sigmoid", a))  # SiLU
        h = g.op("Add", h, g.op("Add", g.op("MatMul", a, w(f"{p}.fc2")), b(f"{p}.fc2")))
    normed = g.op(
        "LayerNormalization",
        h,
        g.const(f"{prefix}/norm.weight", sd["norm.weight"]),
        b("norm"),
        axis=-1,
        epsilon=1e-5,
    )
    a = g.op("Mul", normed, g.op("Sigmoid", normed))
    return g.op("Add", g.op("MatMul", a, w("out")), b("out"))


def _preprocess(g: OnnxGraph, prep: Preprocessor, features: str) -> str:
    zero = g.const("pre/zero", np.float32(0.0))
    missing = g.op("IsNaN", features)
    x0 = g.op("Where", missing, zero, features)
    logged = g.op("Log", g.op("Add", g.op("Max", x0, zero), g.const("pre/one", np.float32(1.0))))
    y = g.op("Where", g.const("pre/log_mask", prep.log_mask), logged, x0)
    z = g.op(
        "Div", g.op("Sub", y, g.const("pre/center", prep.center)), g.const("pre/scale", prep.scale)
    )
    z = g.op("Clip", z, g.const("pre/lo", np.float32(-CLIP)), g.const("pre/hi", np.float32(CLIP)))
    z = g.op("Where", missing, zero, z)
    indicators = g.op(
        "Gather",
        g.op("Cast", missing, to=TensorProto.FLOAT),
        g.const("pre/indicator_index", prep.indicator_index),
        axis=1,
    )
    return g.op("Concat", z, indicators, axis=1)


def _noise_error(g: OnnxGraph, det: DiffusionDetector, inputs: str, steps, noise, name: str) -> str:
    """Mean over steps of the squared noise-prediction error: [N, D]."""
    abar = det.schedule.alpha_bar.numpy()[list(steps)]
    k = len(steps)
    a = g.const(f"{name}/sqrt_abar", np.sqrt(abar).astype(np.float32).reshape(k, 1, 1))
    eps = noise.numpy().astype(np.float32).reshape(k, 1, -1)
    c_eps = g.const(
        f"{name}/scaled_noise", (np.sqrt(1 - abar).reshape(k, 1, 1) * eps).astype(np.float32)
    )
    eps_c = g.const(f"{name}/noise", eps)
    x3 = g.op("Unsqueeze", inputs, g.const(f"{name}/axis0", np.array([0], np.int64)))
    noisy = g.op("Add", g.op("Mul", x3, a), c_eps)  # [K, N, D]
    pred = _mlp(g, "denoiser", det.denoiser, noisy, list(steps), name)
    diff = g.op("Sub", pred, eps_c)
    return g.op(
        "ReduceMean",
        g.op("Mul", diff, diff),
        g.const(f"{name}/axes0", np.array([0], np.int64)),
        keepdims=0,
    )


def _contributions(
    g: OnnxGraph, det: DiffusionDetector, inputs: str, n_features: int
) -> tuple[str, str]:
    """The contribution error [N, D] and its first n_features columns, one per feature."""
    k = len(det.config.noise_steps)
    steps = det.config.contribution_steps
    err = _noise_error(g, det, inputs, steps, det.noise_vectors[k:], "contrib")
    contributions = g.op(
        "Slice",
        err,
        g.const("out/start", np.array([0], np.int64)),
        g.const("out/end", np.array([n_features], np.int64)),
        g.const("out/axis", np.array([1], np.int64)),
    )
    return err, contributions


def _dte_clean_score(g: OnnxGraph, det: DiffusionDetector, inputs: str, err: str) -> str:
    """-log P(clean | x) = softplus(log-odds of not clean), + weight * log(max(error /
    training median, 1)); ReduceLogSumExp subtracts the maximum, so confident logits neither
    overflow nor underflow."""
    cfg = det.config
    logits = _mlp(g, "dte", det.dte, inputs, [0], "clean")
    axes1 = g.const("score/axes1", np.array([1], np.int64))
    k = g.const("score/clean_bins", np.array([det.clean_bins()], np.int64))
    begin = g.const("score/begin", np.array([0], np.int64))
    end = g.const("score/end", np.array([cfg.dte_bins], np.int64))
    clean = g.op("Slice", logits, begin, k, axes1)
    noisy = g.op("Slice", logits, k, end, axes1)
    odds = g.op(
        "Sub",
        g.op("ReduceLogSumExp", noisy, axes1, keepdims=0),
        g.op("ReduceLogSumExp", clean, axes1, keepdims=0),
    )
    surprise = g.op("Softplus", odds)
    ratio = g.op(
        "Div",
        g.op("ReduceMean", err, axes1, keepdims=0),
        g.const("score/noise_reference", np.float32(det.noise_reference_)),
    )
    ratio = g.op("Log", g.op("Max", ratio, g.const("score/one", np.float32(1.0))))
    weight = g.const("score/noise_weight", np.float32(cfg.dte_clean_noise_weight))
    return g.op("Add", surprise, g.op("Mul", weight, ratio))


def _dte_score(g: OnnxGraph, det: DiffusionDetector, inputs: str, err: str) -> str:
    """The expected diffusion step; for dte_noise, times the mean contribution error over its
    training median."""
    cfg = det.config
    logits = _mlp(g, "dte", det.dte, inputs, [0], "clean")
    centers = (np.arange(cfg.dte_bins, dtype=np.float32) + 0.5) * (cfg.dte_max_step / cfg.dte_bins)
    score = g.op("MatMul", g.op("Softmax", logits, axis=1), g.const("dte/bin_steps", centers))
    if cfg.score == "dte_noise":
        mean_err = g.op(
            "ReduceMean", err, g.const("score/axes1", np.array([1], np.int64)), keepdims=0
        )
        ref = g.const("score/noise_reference", np.float32(det.noise_reference_))
        score = g.op("Div", g.op("Mul", score, mean_err), ref)
    return score


def _noise_score(g: OnnxGraph, det: DiffusionDetector, inputs: str, err: str) -> str:
    """The denoiser's squared error at the score's steps, averaged over the inputs."""
    k = len(det.config.noise_steps)
    score_err = _noise_error(g, det, inputs, det.config.noise_steps, det.noise_vectors[:k], "score")
    return g.op(
        "ReduceMean", score_err, g.const("score/axes1", np.array([1], np.int64)), keepdims=0
    )


# The graph of each score kind: (graph, detector, inputs, contribution error) -> score [N].
SCORE_GRAPHS: dict[str, Callable[[OnnxGraph, DiffusionDetector, str, str], str]] = {
    "dte_clean": _dte_clean_score,
    "dte": _dte_score,
    "dte_noise": _dte_score,
    "noise": _noise_score,
}


def _tail_probability(g: OnnxGraph, det: DiffusionDetector, score: str) -> str:
    """(held-out benign scores >= this score, + 1) / (held-out + 1)."""
    cal = det.calibration_scores_
    ge = g.op(
        "GreaterOrEqual",
        g.const("calibration/scores", cal.reshape(1, -1)),
        g.op("Unsqueeze", score, g.const("calibration/axis1", np.array([1], np.int64))),
    )
    count = g.op(
        "ReduceSum",
        g.op("Cast", ge, to=TensorProto.FLOAT),
        g.const("calibration/axes1", np.array([1], np.int64)),
        keepdims=0,
    )
    return g.op(
        "Div",
        g.op("Add", count, g.const("calibration/one", np.float32(1.0))),
        g.const("calibration/n_plus_1", np.float32(len(cal) + 1)),
    )


def _metadata(det: DiffusionDetector) -> dict[str, str]:
    """The model file's metadata: schema, score, thresholds, training summary and config."""
    cfg = det.config
    return {
        "quietwire_version": __version__,
        "schema_name": SCHEMA_NAME,
        "schema_version": str(SCHEMA_VERSION),
        "schema_hash": SCHEMA_HASH,
        "feature_names": json.dumps(list(FEATURE_NAMES)),
        "score": cfg.score,
        "thresholds": json.dumps({f"{k:g}": v for k, v in det.threshold_.items()}),
        "training": json.dumps(det.summary_.__dict__ if det.summary_ else {}),
        "config": json.dumps(
            {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.__dict__.items()}
        ),
    }


def build_model(det: DiffusionDetector) -> onnx.ModelProto:
    """The ONNX model of a fitted detector."""
    det._check_fitted()
    n_features = len(det.preprocessor.center)
    g = OnnxGraph()
    inputs = _preprocess(g, det.preprocessor, "features")
    err, contributions = _contributions(g, det, inputs, n_features)
    score = SCORE_GRAPHS[det.config.score](g, det, inputs, err)
    tail = _tail_probability(g, det, score)
    for name, src in (
        ("score", score),
        ("tail_probability", tail),
        ("contributions", contributions),
    ):
        g.nodes.append(helper.make_node("Identity", [src], [name]))

    graph = helper.make_graph(
        g.nodes,
        "quietwire_diffusion",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", n_features])],
        [
            helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"]),
            helper.make_tensor_value_info("tail_probability", TensorProto.FLOAT, ["N"]),
            helper.make_tensor_value_info("contributions", TensorProto.FLOAT, ["N", n_features]),
        ],
        g.inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="quietwire",
        producer_version=__version__,
    )
    model.ir_version = 8
    for key, value in _metadata(det).items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    onnx.checker.check_model(model)
    return model


def export(det: DiffusionDetector, path: str | Path) -> Path:
    """Write the ONNX file; the model version is a hash of its bytes (in the agent)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(build_model(det), str(path))
    return path


def load_detector(path: str | Path) -> DiffusionDetector:
    """Rebuild the torch detector from an exported file (for sampling and fidelity)."""
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    raw = json.loads(meta["config"])
    cfg = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    det = DiffusionDetector(cfg)
    det.preprocessor = Preprocessor(
        log_mask=inits["pre/log_mask"],
        center=inits["pre/center"],
        scale=inits["pre/scale"],
        indicator_index=inits["pre/indicator_index"],
    )
    d = det.preprocessor.n_inputs
    det.denoiser = Denoiser(d, d, cfg.width, cfg.depth, cfg.time_dim, cfg.steps)
    det.denoiser.load_state_dict(_state_dict(inits, "denoiser", det.denoiser))
    det.denoiser.eval()
    if cfg.score in DTE_SCORES:
        det.dte = Denoiser(d, cfg.dte_bins, cfg.width, cfg.depth, cfg.time_dim, cfg.steps)
        det.dte.load_state_dict(_state_dict(inits, "dte", det.dte))
        det.dte.eval()
    noise = [
        inits[f"{n}/noise"].reshape(-1, d) for n in ("score", "contrib") if f"{n}/noise" in inits
    ]
    if cfg.score != "noise":  # the score's noise vectors are fixed at fit even when unused
        noise.insert(0, np.zeros((len(cfg.noise_steps), d), np.float32))
    if "score/noise_reference" in inits:
        det.noise_reference_ = float(inits["score/noise_reference"])
    det.noise_vectors = torch.from_numpy(np.concatenate(noise))
    det.calibration_scores_ = inits["calibration/scores"].reshape(-1)
    det.threshold_ = {float(k): v for k, v in json.loads(meta["thresholds"]).items()}
    return det


def _state_dict(inits: dict, prefix: str, like: Denoiser) -> dict:
    out = {}
    for name in like.state_dict():
        if name.endswith(".weight") and f"{prefix}/{name}_t" in inits:
            out[name] = torch.from_numpy(inits[f"{prefix}/{name}_t"].T.copy())
        else:
            out[name] = torch.from_numpy(inits[f"{prefix}/{name}"].copy())
    return out
