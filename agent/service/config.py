"""The daemon's configuration: one YAML file validated at start into typed settings.
Unknown keys and wrong types are errors naming file:line and the key."""

from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path

from quietwire.agent.detect.incidents import IncidentSettings
from quietwire.agent.detect.model import DEFAULT_MODEL
from quietwire.agent.features.context import ContextConfig
from quietwire.agent.flow.table import FlowConfig
from quietwire.agent.output.alerts import BudgetSettings
from quietwire.agent.output.flowlog import FlowLogSettings
from quietwire.agent.service.engine import EngineSettings
from quietwire.agent.service.metrics import ServerSettings
from quietwire.agent.site.learning import LearnSettings, parse_duration
from quietwire.agent.yamlnodes import Node, YamlError, load
from quietwire.rules import DEFAULT_RULES


class ConfigError(YamlError):
    """The configuration is invalid; the agent refuses to start (or keeps the old one)."""


@dataclass(frozen=True)
class CaptureSettings:
    interfaces: tuple[str, ...]
    bpf_filter: str | None = None
    promiscuous: bool = True
    ring_block_kib: int = 1024
    ring_blocks: int = 64
    snaplen: int = 65535
    # capture worker processes (workers.py); 1: this process reads the rings itself
    workers: int = 1


def default_workers() -> int:
    """One capture worker per core this process may run on, less one for the central stage
    (scoring, rules, alerts), at least one."""
    return max(len(os.sched_getaffinity(0)) - 1, 1)


@dataclass(frozen=True)
class AlertSettings:
    file: Path | None = None
    stdout: bool = False


@dataclass(frozen=True)
class Settings:
    capture: CaptureSettings
    flow: FlowConfig = field(default_factory=FlowConfig)
    context: ContextConfig = field(default_factory=ContextConfig)
    incidents: IncidentSettings = field(default_factory=IncidentSettings)
    budget: BudgetSettings = field(default_factory=BudgetSettings)
    model: Path = DEFAULT_MODEL
    rules: Path = DEFAULT_RULES
    alerts: AlertSettings = field(default_factory=AlertSettings)
    metrics: ServerSettings | None = field(default_factory=ServerSettings)
    flow_log: FlowLogSettings | None = None
    learn: LearnSettings | None = None
    source: Path | None = None
    sensor: str | None = None  # the name in EVE lines and metrics; None: the host name

    @property
    def engine(self) -> EngineSettings:
        """The sections the engine reads."""
        return EngineSettings(self.flow, self.context, self.incidents, self.budget)


def load_config(path: str | Path) -> Settings:
    """Read and validate a config file; ConfigError on the first problem."""
    path = Path(path)
    try:
        return _settings(load(path), path)
    except ConfigError:
        raise
    except YamlError as exc:
        raise ConfigError(str(exc)) from exc


def _relative(base: Path, value: str) -> Path:
    p = Path(value)
    return p if p.is_absolute() else (base.parent / p)


TOP_KEYS = {
    "capture",
    "flow",
    "host_window_s",
    "model",
    "rules",
    "alerts",
    "metrics",
    "incidents",
    "alert_budget",
    "flow_log",
    "learn",
    "sensor",
}
CAPTURE_KEYS = {
    "interfaces",
    "bpf_filter",
    "promiscuous",
    "ring_block_kib",
    "ring_blocks",
    "snaplen",
    "workers",
}
METRICS_KEYS = {
    "listen",
    "port",
    "tls_cert",
    "tls_key",
    "basic_auth",
    "allow_plaintext_auth",
    "timeout_s",
    "max_connections",
}


def _settings(root: Node, path: Path) -> Settings:
    """The sections parsed in a fixed order: a file with several problems always reports the
    same first one."""
    top = root.mapping("config", TOP_KEYS)
    if "capture" not in top:
        raise root.error("config: missing key 'capture' (at least: capture: {interfaces: [eth0]})")
    capture = _capture(top["capture"])
    flow = _section(top, "flow", FlowConfig)
    incidents = _section(top, "incidents", IncidentSettings)
    budget = _section(top, "alert_budget", BudgetSettings)
    context = _context(top)
    model = _relative(path, top["model"].scalar("model", str)) if "model" in top else DEFAULT_MODEL
    rules = _relative(path, top["rules"].scalar("rules", str)) if "rules" in top else DEFAULT_RULES
    alerts = _alerts(top["alerts"], path) if "alerts" in top else AlertSettings()
    metrics = _metrics(top["metrics"], path) if "metrics" in top else ServerSettings()
    flow_log = _flow_log(top["flow_log"], path) if "flow_log" in top else None
    learn = _learn(top["learn"]) if "learn" in top else None
    if learn is not None and flow_log is None:
        raise top["learn"].error(
            "learn: a learning period calibrates on the flow log's records, so it needs "
            "flow_log: {path: ...} (e.g. /var/log/quietwire/flows.json)"
        )
    sensor = _sensor(top["sensor"]) if "sensor" in top else None
    return Settings(
        sensor=sensor,
        capture=capture,
        flow=flow,
        context=context,
        incidents=incidents,
        budget=budget,
        model=model,
        rules=rules,
        alerts=alerts,
        metrics=metrics,
        flow_log=flow_log,
        learn=learn,
        source=path,
    )


def _capture(node: Node) -> CaptureSettings:
    """``capture: {interfaces: [...], bpf_filter, promiscuous, ring_block_kib, ring_blocks,
    snaplen, workers}``."""
    cap = node.mapping("capture", CAPTURE_KEYS)
    if "interfaces" not in cap:
        raise node.error("capture: missing key 'interfaces'")
    interfaces = tuple(cap["interfaces"].scalars("capture.interfaces", str))
    if not interfaces:
        raise cap["interfaces"].error("capture.interfaces: give at least one interface")
    return CaptureSettings(
        interfaces=interfaces,
        bpf_filter=cap["bpf_filter"].scalar("capture.bpf_filter", str)
        if "bpf_filter" in cap
        else None,
        promiscuous=cap["promiscuous"].scalar("capture.promiscuous", bool)
        if "promiscuous" in cap
        else True,
        ring_block_kib=_positive(cap, "ring_block_kib", 1024, "capture"),
        ring_blocks=_positive(cap, "ring_blocks", 64, "capture"),
        snaplen=_positive(cap, "snaplen", 65535, "capture"),
        workers=_positive(cap, "workers", default_workers(), "capture"),
    )


def _context(top: dict[str, Node]) -> ContextConfig:
    """``host_window_s``: the host context's window (seconds, > 0)."""
    if "host_window_s" not in top:
        return ContextConfig()
    w = top["host_window_s"].scalar("host_window_s", float)
    if w <= 0:
        raise top["host_window_s"].error("host_window_s: expected > 0")
    return ContextConfig(window_s=w)


def _alerts(node: Node, path: Path) -> AlertSettings:
    """``alerts: {file, stdout}``."""
    a = node.mapping("alerts", {"file", "stdout"})
    return AlertSettings(
        file=_relative(path, a["file"].scalar("alerts.file", str)) if "file" in a else None,
        stdout=a["stdout"].scalar("alerts.stdout", bool) if "stdout" in a else False,
    )


def _metrics(node: Node, path: Path) -> ServerSettings | None:
    """``metrics: {listen, port, tls_cert, tls_key, basic_auth, allow_plaintext_auth,
    timeout_s, max_connections}``, or ``metrics: false``."""
    if node.kind == "scalar" and node.scalar("metrics", bool) is False:
        return None
    m = node.mapping("metrics", METRICS_KEYS)
    kw = {}
    if "listen" in m:
        kw["listen"] = m["listen"].scalar("metrics.listen", str)
    if "port" in m:
        kw["port"] = m["port"].scalar("metrics.port", int)
        if not 0 <= kw["port"] <= 65535:
            raise m["port"].error("metrics.port: expected 0-65535")
    for key in ("tls_cert", "tls_key"):
        if key in m:
            kw[key] = str(_relative(path, m[key].scalar(f"metrics.{key}", str)))
    if ("tls_cert" in kw) != ("tls_key" in kw):
        raise node.error("metrics: tls_cert and tls_key go together")
    if "basic_auth" in m:
        kw.update(_basic_auth(m["basic_auth"]))
    if "allow_plaintext_auth" in m:
        kw["allow_plaintext_auth"] = m["allow_plaintext_auth"].scalar(
            "metrics.allow_plaintext_auth", bool
        )
    if "timeout_s" in m:
        kw["timeout_s"] = m["timeout_s"].scalar("metrics.timeout_s", float)
    if "max_connections" in m:
        kw["max_connections"] = m["max_connections"].scalar("metrics.max_connections", int)
    try:
        return ServerSettings(**kw)
    except ValueError as exc:
        raise node.error(str(exc)) from None


def _basic_auth(node: Node) -> dict[str, str]:
    """``metrics.basic_auth: {username, password_sha256}``: both, the digest as 64 hex digits."""
    b = node.mapping("metrics.basic_auth", {"username", "password_sha256"})
    for key in ("username", "password_sha256"):
        if key not in b:
            raise node.error(f"metrics.basic_auth: missing key {key!r}")
    username = b["username"].scalar("metrics.basic_auth.username", str)
    digest = b["password_sha256"].scalar("metrics.basic_auth.password_sha256", str)
    if len(digest) != 64 or any(c not in "0123456789abcdefABCDEF" for c in digest):
        raise b["password_sha256"].error(
            "metrics.basic_auth.password_sha256: expected 64 hex digits (sha256sum of the password)"
        )
    return {"username": username, "password_sha256": digest}


def _sensor(node: Node) -> str:
    """``sensor``: the name in EVE lines and metrics."""
    sensor = node.scalar("sensor", str)
    if not sensor.strip():
        raise node.error("sensor: expected a name (default: the host name)")
    return sensor


def _flow_log(node: Node, path: Path) -> FlowLogSettings | None:
    """``flow_log: {path: ..., rotate_bytes, rotate_age_s, compress, retention_bytes}``, or
    ``flow_log: false``."""
    if node.kind == "scalar" and node.scalar("flow_log", bool) is False:
        return None
    kinds = {"rotate_bytes": int, "rotate_age_s": float, "compress": bool, "retention_bytes": int}
    m = node.mapping("flow_log", {"path", *kinds})
    if "path" not in m:
        raise node.error("flow_log: missing key 'path' (the live file, e.g. flows.json)")
    kw = {k: m[k].scalar(f"flow_log.{k}", kind) for k, kind in kinds.items() if k in m}
    try:
        return FlowLogSettings(path=_relative(path, m["path"].scalar("flow_log.path", str)), **kw)
    except ValueError as exc:
        key = str(exc).split(":")[0].removeprefix("flow_log.")
        raise (m[key] if key in m else node).error(str(exc)) from None


def _learn(node: Node) -> LearnSettings | None:
    """``learn: {period: 24h, min_records, max_records, budget}``, or ``learn: false``."""
    if node.kind == "scalar" and node.scalar("learn", (bool, str, float)) is False:
        return None
    m = node.mapping("learn", {"period", "min_records", "max_records", "budget"})
    if "period" not in m:
        raise node.error("learn: missing key 'period' (how long to learn, e.g. period: 24h)")
    try:
        period = parse_duration(m["period"].scalar("learn.period", (str, float)))
    except ValueError as exc:
        raise m["period"].error(f"learn.period: {exc}") from None
    kw = {k: m[k].scalar(f"learn.{k}", int) for k in ("min_records", "max_records") if k in m}
    if "budget" in m:
        kw["budget"] = m["budget"].scalar("learn.budget", float)
    try:
        return LearnSettings(period_s=period, **kw)
    except ValueError as exc:
        key = str(exc).split(":")[0].removeprefix("learn.")
        raise (m[key] if key in m else node).error(str(exc)) from None


def _section(top: dict[str, Node], key: str, cls):
    """A section whose keys are the fields of a settings dataclass, typed like their
    defaults (a field whose default is itself a settings dataclass is a nested section);
    the dataclass's own checks become errors at the section's line."""
    if key not in top:
        return cls()
    nested = {
        f.name: f.default_factory
        for f in fields(cls)
        if f.default is MISSING and is_dataclass(f.default_factory)
    }
    kinds = {f.name: type(f.default) for f in fields(cls) if f.name not in nested}
    given = top[key].mapping(key, set(kinds) | set(nested))
    kw = {
        k: _section(given, k, nested[k]) if k in nested else v.scalar(f"{key}.{k}", kinds[k])
        for k, v in given.items()
    }
    try:
        return cls(**kw)
    except ValueError as exc:
        message = str(exc)
        named = key in message.split(":", 1)[0].split(".")
        raise top[key].error(message if named else f"{key}: {message}") from None


def _positive(m: dict[str, Node], key: str, default: int, where: str) -> int:
    if key not in m:
        return default
    value = m[key].scalar(f"{where}.{key}", int)
    if value <= 0:
        raise m[key].error(f"{where}.{key}: expected a positive integer, got {value}")
    return value
