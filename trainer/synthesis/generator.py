"""Synthetic benign flows: a mixed-type diffusion model of the feature vector, apart from the
detector (TabDDPM, Kotelnikov et al., ICML 2023; categories as in CDTD, Mueller et al. 2023:
Gaussian diffusion of one-hots, the network trained with cross-entropy to name the class).

The detector's network is trained for detection (log / robust scaling clipped at +-20, missing
values as continuous indicators); as a generator it is told apart from real flows at once
(README, "Synthetic flows"). This model is its own network, written to its own ONNX file
(``model.gen.onnx`` beside ``model.onnx``), so the scorer does not change:

- **What is modelled** ("free" columns): counts, sizes and times through a quantile transform
  to a standard normal (tables of 512 normal scores and values per column, stored in the
  file); the protocol (TCP/UDP/ICMP/other), the port class (< 1024 / registered / dynamic),
  flags and integer columns with at most ``MAX_CATEGORIES`` values as categories, one-hot at
  +-1 (a last class for "missing" where the training flows have missing values). Gaussian
  diffusion over both with one network: for numeric columns it predicts the noise (MSE), for
  each category the logits of its clean class (cross-entropy). The sampler's clean estimate
  of a category is its expected one-hot (2p - 1 under the softmax), not a clipped regression
  of the one-hot, whose argmax drew TCP for 80% of the flows against 64% in the training
  flows; after the last step each category is drawn from its probabilities.
- **What is computed** (flowcolumns.py): everything the schema defines from other features
  (bidirectional sums, the combined length statistics, means as bytes / packets, bytes as
  header + payload, ratios, rates, protocol and port flags, tcp_answered / tcp_reset; a
  std is modelled as its share of what min, mean, max and count allow, gaps' min and max as
  ratios to their mean, ACK / PSH as the packets without them) and every missing value:
  NaN exactly where agent/features/schema.py says a feature does not apply, from the generated
  protocol and counts. A decoded value that breaks a rule the model has no column for (a
  minimum above the mean, a flag count above the packets) is moved to the nearest valid value
  by ``assemble``; the values it moves are counted per rule (``last_repairs``).

The denoiser's graph takes x_t [N, D] and t [N] (float steps) and returns ``out`` [N, D]: the
predicted noise of the numeric columns, then each block's logits; the DDPM ancestral sampler
runs in numpy around it (onnxruntime, no torch).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from quietwire.agent.features.schema import FEATURE_NAMES, SCHEMA_HASH
from quietwire.trainer.model.detector import TrainingError
from quietwire.trainer.synthesis.flowcolumns import _J, _UNIT, INTEGER_UNITS, assemble, free_columns  # noqa: F401

if TYPE_CHECKING:  # onnx is imported on export and load only
    import onnx

    from quietwire.trainer.model.onnxgraph import OnnxGraph

MAX_CATEGORIES = 16  # an integer column with at most this many values is a category
QUANTILES = 512
PROTOS = ("tcp", "udp", "icmp", "other")
PORT_CLASSES = ("well_known", "registered", "dynamic")


class GeneratorError(TrainingError):
    """A generator cannot be fitted or read (too few flows, another schema, a bad file)."""


@dataclass(frozen=True)
class GeneratorConfig:
    width: int = 192  # 1.3 MB in float32 (float16 weights: the samples got worse)
    depth: int = 3
    time_dim: int = 64
    steps: int = 100  # diffusion steps (cosine schedule)
    train_steps: int = 4000
    batch_size: int = 256
    lr: float = 2e-3
    seed: int = 0


def cosine_betas(steps: int) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule (betas capped at 0.999)."""
    s = 0.008
    t = np.arange(steps + 1, dtype=np.float64) / steps
    abar = np.cos((t + s) / (1 + s) * np.pi / 2) ** 2
    return np.clip(1 - abar[1:] / abar[:-1], 0, 0.999)


def _categorical(name: str, present: np.ndarray) -> bool:
    if name in ("proto", "port_class") or _UNIT.get(name) == "bool":
        return True
    return _UNIT.get(name) in INTEGER_UNITS and len(np.unique(present)) <= MAX_CATEGORIES


@dataclass
class Encoding:
    """Fitted column encodings: numeric columns as quantile tables (normal score -> value),
    categorical ones as their values, one-hot at +-1, with a last class for "missing" where
    the training flows have missing values (a value never seen has no hot entry)."""

    numeric: list[str]
    scores: np.ndarray  # (Q,) normal scores of the table's quantile levels
    tables: np.ndarray  # (len(numeric), Q) values at those levels
    categorical: list[str]
    values: list[np.ndarray]  # each categorical column's values, sorted
    missing: list[bool]  # whether the column's block ends with a "missing" class

    @property
    def width(self) -> int:
        return len(self.numeric) + sum(self.block_sizes())

    def block_sizes(self) -> list[int]:
        """Classes of each categorical block, in order (values, then "missing" if any)."""
        return [len(v) + m for v, m in zip(self.values, self.missing)]

    def block_groups(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """The categorical blocks grouped by size, so a softmax runs per group, not per block:
        each group as (its blocks' model-space columns (k, size), their block numbers (k,))."""
        starts = np.cumsum([len(self.numeric), *self.block_sizes()])[:-1]
        groups: dict[int, tuple[list, list]] = {}
        for k, (start, size) in enumerate(zip(starts, self.block_sizes())):
            cols, blocks = groups.setdefault(size, ([], []))
            cols.append(np.arange(start, start + size))
            blocks.append(k)
        return [(np.array(c, np.int64), np.array(b, np.int64)) for c, b in groups.values()]

    @staticmethod
    def fit(free: dict[str, np.ndarray]) -> Encoding:
        levels = (np.arange(QUANTILES) + 0.5) / QUANTILES
        scores = _normal_quantile(levels)
        numeric, tables, categorical, values, missing = [], [], [], [], []
        for name, v in free.items():
            present = v[~np.isnan(v)]
            if len(present) == 0:
                present = np.zeros(1)
            if _categorical(name, present):
                categorical.append(name)
                values.append(np.unique(present))
                missing.append(bool(np.isnan(v).any()))
            else:
                numeric.append(name)
                tables.append(np.quantile(present, levels))
        return Encoding(
            numeric, scores, np.array(tables).reshape(-1, QUANTILES), categorical, values, missing
        )

    def encode(self, free: dict[str, np.ndarray]) -> np.ndarray:
        """(n, width) float32: normal scores (0 where missing), then one-hot blocks at +-1."""
        n = len(next(iter(free.values())))
        parts = []
        for name, table in zip(self.numeric, self.tables):
            v = free[name]
            # midpoint of the table's span of v (ties map to the middle of their quantiles)
            up = np.interp(v, table, self.scores)
            down = -np.interp(-v, -table[::-1], -self.scores[::-1])
            parts.append(np.where(np.isnan(v), 0.0, (up + down) / 2)[:, None])
        for name, vals, has_missing in zip(self.categorical, self.values, self.missing):
            v = free[name]
            hot = -np.ones((n, len(vals) + has_missing))
            idx = np.searchsorted(vals, np.nan_to_num(v, nan=vals[0]))
            idx = np.clip(idx, 0, len(vals) - 1)
            ok = ~np.isnan(v) & (vals[idx] == v)
            hot[np.flatnonzero(ok), idx[ok]] = 1.0
            if has_missing:
                hot[np.isnan(v), -1] = 1.0
            parts.append(hot)
        return np.concatenate(parts, axis=1).astype(np.float32)

    def classes(self, z: np.ndarray) -> np.ndarray:
        """(n, blocks) int64: each categorical block's hot class (argmax) in model space."""
        out, pos = [], len(self.numeric)
        for size in self.block_sizes():
            out.append(np.argmax(z[:, pos : pos + size], axis=1))
            pos += size
        return np.stack(out, 1) if out else np.zeros((len(z), 0), np.int64)

    def decode(
        self, z: np.ndarray, rng: np.random.Generator | None = None
    ) -> dict[str, np.ndarray]:
        """Model space back to free columns: inverse quantile transform; per category its
        argmax, or with ``rng`` a draw from the block read as probabilities ((z + 1) / 2, as
        the sampler leaves them). Never "missing": the schema's rules say where a value is
        missing (assemble), so a row that needs one gets the likeliest or a drawn value."""
        out: dict[str, np.ndarray] = {}
        for k, (name, table) in enumerate(zip(self.numeric, self.tables)):
            out[name] = np.interp(z[:, k], self.scores, table)
        pos = len(self.numeric)
        for name, vals, size in zip(self.categorical, self.values, self.block_sizes()):
            block = z[:, pos : pos + len(vals)].astype(np.float64)
            if rng is None:
                idx = np.argmax(block, axis=1)
            else:
                p = np.maximum((block + 1) / 2, 0) + 1e-12
                cum = np.cumsum(p / p.sum(1, keepdims=True), axis=1)
                idx = np.minimum((rng.random((len(z), 1)) > cum).sum(1), len(vals) - 1)
            out[name] = vals[idx]
            pos += size
        return out

    def clip_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Where clean model inputs can lie (the sampler clips predicted clean inputs)."""
        hi = np.ones(self.width, np.float32)
        hi[: len(self.numeric)] = self.scores[-1]
        return -hi, hi


def _normal_quantile(p: np.ndarray) -> np.ndarray:
    import torch

    return torch.special.ndtri(torch.from_numpy(np.asarray(p, np.float64))).numpy()


# ---- the model -----------------------------------------------------------------------------


class FlowGenerator:
    """fit(X) on benign raw features; sample(n) synthetic ones; export / load as ONNX."""

    def __init__(self, config: GeneratorConfig | None = None) -> None:
        self.config = config or GeneratorConfig()
        self.encoding: Encoding | None = None
        self.denoiser = None  # torch module while fitted in this process
        self._session = None  # onnxruntime session once loaded from a file
        self.last_repairs: dict[str, int] = {}
        self.last_rate = 0.0  # flows per second of the last sample()
        self.fit_seconds = 0.0
        self.final_loss = float("nan")

    def fit(
        self,
        x: np.ndarray,
        progress: Callable[[str, int, int], None] | None = None,
        device: str = "cpu",
    ):
        """Fit on benign raw features (n, F); ``device``: where torch trains (the fitted
        denoiser comes back to the CPU, where sampling and export run)."""
        import torch

        from quietwire.trainer.model.diffusion import Denoiser

        cfg = self.config
        x = np.asarray(x, np.float32)
        if x.ndim != 2 or x.shape[1] != len(FEATURE_NAMES) or len(x) < 20:
            raise GeneratorError(f"need at least 20 flows of this schema to fit, got {x.shape}")
        started = time.perf_counter()
        self.encoding = enc = Encoding.fit(free_columns(x))
        encoded = enc.encode(free_columns(x))
        data = torch.from_numpy(encoded).to(device)
        targets = torch.from_numpy(enc.classes(encoded)).to(device)
        groups = [
            (torch.from_numpy(c).to(device), torch.from_numpy(b).to(device))
            for c, b in enc.block_groups()
        ]
        n_num, n_terms = len(enc.numeric), len(enc.numeric) + len(enc.categorical)
        torch.manual_seed(cfg.seed)
        gen = torch.Generator(device).manual_seed(cfg.seed)
        d = data.shape[1]
        net = Denoiser(d, d, cfg.width, cfg.depth, cfg.time_dim, cfg.steps).to(device)
        abar = torch.from_numpy(np.cumprod(1 - cosine_betas(cfg.steps))).float().to(device)
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.train_steps)
        net.train()
        recent: deque = deque(maxlen=100)
        # on another device, what the denoiser makes (its time embedding) must be made there
        # too (the context slows every op down, so the CPU trains without it)
        with contextlib.nullcontext() if device == "cpu" else torch.device(device):
            for step in range(cfg.train_steps):
                rows = torch.randint(0, len(data), (cfg.batch_size,), generator=gen)
                batch = data[rows]
                t = torch.randint(0, cfg.steps, (len(batch),), generator=gen)
                noise = torch.randn(batch.shape, generator=gen)
                a = abar[t].unsqueeze(1)
                out = net(a.sqrt() * batch + (1 - a).sqrt() * noise, t)
                # numeric columns: the noise (MSE); each category: its class (cross-entropy)
                loss = ((out[:, :n_num] - noise[:, :n_num]) ** 2).sum(1).mean()
                for cols, blocks in groups:
                    logits = out[:, cols]  # (batch, blocks, size)
                    loss = loss + torch.nn.functional.cross_entropy(
                        logits.transpose(1, 2), targets[rows][:, blocks], reduction="sum"
                    ) / len(batch)
                loss = loss / n_terms
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                recent.append(loss.detach())
                if progress and (step % 50 == 0 or step == cfg.train_steps - 1):
                    progress("generator", step + 1, cfg.train_steps)
        net.eval()
        self.denoiser = net.cpu()
        self.final_loss = float(torch.stack(list(recent)).mean())
        self.fit_seconds = time.perf_counter() - started
        return self

    def _net(self) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        """The denoiser as a function of (x_t, t): the predicted noise of the numeric columns,
        then each categorical block's logits of its clean class."""
        if self._session is not None:
            sess = self._session
            return lambda x, t: sess.run(["out"], {"x_t": x, "t": t})[0]
        if self.denoiser is None:
            raise GeneratorError("the generator is not fitted")
        import torch

        def net(x, t):
            with torch.no_grad():
                return self.denoiser(torch.from_numpy(x), torch.from_numpy(t)).numpy()

        return net

    def sample_inputs(self, n: int, seed: int = 0) -> np.ndarray:
        """DDPM ancestral sampling in model space, clean-input predictions clipped to where
        encoded flows lie."""
        net = self._net()
        cfg, enc = self.config, self.encoding
        betas = cosine_betas(cfg.steps)
        abar = np.cumprod(1 - betas)
        abar_prev = np.r_[1.0, abar[:-1]]
        rng = np.random.default_rng(seed)
        lo, hi = enc.clip_bounds()
        num = len(enc.numeric)
        groups = enc.block_groups()
        x = rng.standard_normal((n, enc.width)).astype(np.float32)
        for t in range(cfg.steps - 1, -1, -1):
            out = net(x, np.full(n, t, np.float32))
            x0 = np.empty_like(x)
            e = out[:, :num]
            x0[:, :num] = np.clip(
                (x[:, :num] - np.sqrt(1 - abar[t]) * e) / np.sqrt(abar[t]), lo[:num], hi[:num]
            )
            for cols, _ in groups:  # a category's clean input: its expected one-hot, 2p - 1
                logits = out[:, cols]
                p = np.exp(logits - logits.max(2, keepdims=True))
                x0[:, cols] = 2 * p / p.sum(2, keepdims=True) - 1
            c0 = betas[t] * np.sqrt(abar_prev[t]) / (1 - abar[t])
            ct = (1 - abar_prev[t]) * np.sqrt(1 - betas[t]) / (1 - abar[t])
            x = c0 * x0 + ct * x
            if t > 0:
                var = betas[t] * (1 - abar_prev[t]) / (1 - abar[t])
                x = x + np.sqrt(var) * rng.standard_normal(x.shape)
            x = x.astype(np.float32)
        return x0

    def sample(self, n: int, seed: int = 0, batch: int = 4096) -> np.ndarray:
        """n synthetic benign flows, (n, F) float32 raw features; ``last_repairs`` counts the
        values each repair rule moved, ``last_rate`` the flows per second."""
        if self.encoding is None:
            raise GeneratorError("the generator is not fitted")
        started = time.perf_counter()
        parts, repairs = [], {}
        for k, start in enumerate(range(0, n, batch)):
            z = self.sample_inputs(min(batch, n - start), seed + k)
            draws = np.random.default_rng([seed + k, 1])  # the categories' last draw
            x, fixed = assemble(self.encoding.decode(z, draws))
            parts.append(x)
            for rule, rows in fixed.items():
                repairs[rule] = repairs.get(rule, 0) + rows
        self.last_repairs = repairs
        self.last_rate = n / max(time.perf_counter() - started, 1e-9)
        return np.concatenate(parts) if parts else np.zeros((0, len(FEATURE_NAMES)), np.float32)

    # ---- ONNX ------------------------------------------------------------------------------
    def export(self, path: str | Path) -> Path:
        """Write the denoiser graph (x_t, t -> eps) with the encoding's
        tables as initializers and the column layout as metadata."""
        import onnx

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(_graph(self), str(path))
        return path

    @staticmethod
    def load(path: str | Path) -> FlowGenerator:
        import onnx
        import onnxruntime as ort
        from onnx import numpy_helper

        try:
            model = onnx.load(str(path))
            meta = {p.key: p.value for p in model.metadata_props}
            if meta.get("quietwire_generator") == "1":
                raise GeneratorError(
                    f"{path}: generator of an older kind (categories as Gaussian one-hots, "
                    f"quietwire {meta.get('quietwire_version', '?')}): retrain it "
                    "(quietwire train --generator-steps N)"
                )
            if meta.get("quietwire_generator") != "2":
                raise GeneratorError(f"{path}: not a quietwire generator")
            if meta.get("schema_hash") != SCHEMA_HASH:
                raise GeneratorError(
                    f"{path}: generator for feature schema {meta.get('schema_hash')!r}, this "
                    f"quietwire's is {SCHEMA_HASH}"
                )
            layout = json.loads(meta["layout"])
            modelled = set(free_columns(np.zeros((1, len(FEATURE_NAMES)), np.float32)))
            if set(layout["numeric"]) | set(layout["categorical"]) != modelled:
                raise GeneratorError(
                    f"{path}: generator of other modelled columns (written by quietwire "
                    f"{meta.get('quietwire_version', '?')} before a change to them): retrain it "
                    "(quietwire train --generator-steps N)"
                )
            inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
            gen = FlowGenerator(GeneratorConfig(**json.loads(meta["config"])))
            gen.encoding = Encoding(
                layout["numeric"],
                inits["encoding/scores"].astype(np.float64),
                inits["encoding/tables"].astype(np.float64).reshape(len(layout["numeric"]), -1),
                layout["categorical"],
                [np.array(v, np.float64) for v in layout["values"]],
                [bool(m) for m in layout["missing"]],
            )
            options = ort.SessionOptions()
            options.log_severity_level = 3  # the tables are initializers no node reads
            options.intra_op_num_threads = 1
            gen._session = ort.InferenceSession(
                model.SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
        except GeneratorError:
            raise
        except Exception as exc:  # onnx / onnxruntime raise several types for a bad file
            raise GeneratorError(f"{path}: cannot load generator ({str(exc)[:200]})") from exc
        return gen


def generator_path(model: str | Path) -> Path:
    """Where the generator of a model file lives: model.onnx -> model.gen.onnx."""
    model = Path(model)
    return model.with_name(model.stem + ".gen.onnx")


def _linear(g: OnnxGraph, sd: dict[str, np.ndarray], x: str, name: str) -> str:
    w = g.const(f"gen/{name}.weight_t", sd[f"{name}.weight"].T.copy())
    return g.op("Add", g.op("MatMul", x, w), g.const(f"gen/{name}.bias", sd[f"{name}.bias"]))


def _norm(g: OnnxGraph, sd: dict[str, np.ndarray], x: str, name: str) -> str:
    w = g.const(f"gen/{name}.weight", sd[f"{name}.weight"])
    return g.op(
        "LayerNormalization",
        x,
        w,
        g.const(f"gen/{name}.bias", sd[f"{name}.bias"]),
        axis=-1,
        epsilon=1e-5,
    )


def _silu(g: OnnxGraph, x: str) -> str:
    return g.op("Mul", x, g.op("Sigmoid", x))


def _denoiser_nodes(g: OnnxGraph, net, cfg: GeneratorConfig) -> str:
    """x_t [N, D] and t [N] -> the network's output [N, D], from its fitted weights
    (``gen/<torch parameter name>``, MatMul weights transposed): sinusoidal step embedding,
    input and time projections, residual blocks, output layer."""
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in net.state_dict().items()}
    half = cfg.time_dim // 2
    freqs = np.exp(-np.log(10_000.0) * np.arange(half, dtype=np.float32) / half)
    freqs = (freqs * (1000.0 / cfg.steps)).astype(np.float32).reshape(1, half)
    angles = g.op(
        "MatMul",
        g.op("Unsqueeze", "t", g.const("gen/axis1", np.array([1], np.int64))),
        g.const("gen/freqs", freqs),
    )
    emb = g.op("Concat", g.op("Sin", angles), g.op("Cos", angles), axis=1)
    h = g.op("Add", _linear(g, sd, "x_t", "inp"), _linear(g, sd, emb, "time"))
    for i in range(cfg.depth):
        p = f"blocks.{i}"
        hidden = _silu(g, _linear(g, sd, _norm(g, sd, h, f"{p}.norm"), f"{p}.fc1"))
        h = g.op("Add", h, _linear(g, sd, hidden, f"{p}.fc2"))
    return _linear(g, sd, _silu(g, _norm(g, sd, h, "norm")), "out")


def _generator_metadata(gen: FlowGenerator) -> dict[str, str]:
    """The generator file's metadata: its kind, schema, config, column layout and training."""
    from quietwire import __version__

    enc = gen.encoding
    return {
        "quietwire_generator": "2",  # 2: categories as logits of their class (1: one-hots)
        "quietwire_version": __version__,
        "schema_hash": SCHEMA_HASH,
        "config": json.dumps(gen.config.__dict__),
        "layout": json.dumps(
            {
                "numeric": enc.numeric,
                "categorical": enc.categorical,
                "values": [v.tolist() for v in enc.values],
                "missing": enc.missing,
            }
        ),
        "training": json.dumps({"seconds": round(gen.fit_seconds, 2), "loss": gen.final_loss}),
    }


def _graph(gen: FlowGenerator) -> onnx.ModelProto:
    """The generator's ONNX model: the denoiser's graph, the encoding's tables as initializers
    and the column layout as metadata."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from quietwire import __version__
    from quietwire.trainer.model.onnxgraph import OnnxGraph

    if gen.denoiser is None:
        raise GeneratorError("the generator is not fitted")
    g = OnnxGraph()
    out = _denoiser_nodes(g, gen.denoiser, gen.config)
    g.nodes.append(helper.make_node("Identity", [out], ["out"]))
    enc = gen.encoding
    g.inits.append(numpy_helper.from_array(enc.scores.astype(np.float32), "encoding/scores"))
    g.inits.append(numpy_helper.from_array(enc.tables.astype(np.float32), "encoding/tables"))
    d = enc.width
    graph = helper.make_graph(
        g.nodes,
        "quietwire_generator",
        [
            helper.make_tensor_value_info("x_t", TensorProto.FLOAT, ["N", d]),
            helper.make_tensor_value_info("t", TensorProto.FLOAT, ["N"]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", d])],
        g.inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 18)],
        producer_name="quietwire",
        producer_version=__version__,
    )
    model.ir_version = 8
    for key, value in _generator_metadata(gen).items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    onnx.checker.check_model(model)
    return model


# ---- a flow table without a real address ---------------------------------------------------

CLIENT_NET, SERVER_NET = "192.0.2.", "198.51.100."  # RFC 5737 documentation ranges
PROTO_TEXT = ("TCP", "UDP", "ICMP", "")
PORT_RANGES = ((1, 1024), (1024, 49152), (49152, 65536))


def write_flow_table(path: str | Path, features: np.ndarray, seed: int = 0) -> int:
    """Synthetic flows as a `quietwire flows` CSV table. The identity is placeholder: clients in
    192.0.2.0/24, servers in 198.51.100.0/24 (RFC 5737 documentation ranges), ports drawn in
    the flow's port class, no times; the features are the generated ones. Returns rows."""
    from quietwire.agent.output.tablefields import ID_FIELDS

    x = np.asarray(features, np.float32)
    n = len(x)
    rng = np.random.default_rng(seed)
    col = {name: x[:, j] for name, j in _J.items()}
    proto = np.full(n, 3)
    for k, name in enumerate(("proto_tcp", "proto_udp", "proto_icmp")):
        proto = np.where(col[name] == 1, k, proto)
    klass = np.where(
        col["dst_port_well_known"] == 1, 0, np.where(col["dst_port_registered"] == 1, 1, 2)
    )
    dport = np.zeros(n, np.int64)
    for k, (lo, hi) in enumerate(PORT_RANGES):
        dport = np.where(klass == k, rng.integers(lo, hi, n), dport)
    sport = rng.integers(49152, 65536, n)
    ported = proto <= 1
    client = rng.integers(1, 255, n)
    server = rng.integers(1, 255, n)
    counts = [
        np.nan_to_num(col[name]).astype(np.int64)
        for name in ("src2dst_packets", "dst2src_packets", "src2dst_bytes", "dst2src_bytes")
    ]
    ident = {
        "flow_id": np.arange(n).astype(str),
        "community_id": np.full(n, ""),
        "start": np.full(n, ""),
        "end": np.full(n, ""),
        "src_ip": np.char.add(CLIENT_NET, client.astype(str)),
        "src_port": np.where(ported, sport.astype(str), ""),
        "dest_ip": np.char.add(SERVER_NET, server.astype(str)),
        "dest_port": np.where(ported, dport.astype(str), ""),
        "proto": np.array(PROTO_TEXT)[proto],
        "ip_version": np.full(n, "4"),
        "pkts_toserver": counts[0].astype(str),
        "pkts_toclient": counts[1].astype(str),
        "bytes_toserver": counts[2].astype(str),
        "bytes_toclient": counts[3].astype(str),
        "end_reason": np.full(n, "synthetic"),
        "schema_hash": np.full(n, SCHEMA_HASH),
    }
    prefix = [",".join(row) for row in zip(*(ident[k].tolist() for k in ID_FIELDS))]
    fmt = ",".join(["%.9g"] * len(FEATURE_NAMES))
    with Path(path).open("w") as out:
        out.write(",".join((*ID_FIELDS, *FEATURE_NAMES)) + "\n")
        out.writelines(
            p + "," + (fmt % tuple(f)).replace("nan", "") + "\n" for p, f in zip(prefix, x.tolist())
        )
    return n
