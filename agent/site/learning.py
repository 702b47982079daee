"""The learning period (config ``learn: {period: 24h}``): a new sensor watches its site for a
while before it trusts its model's thresholds, then calibrates the model on what it saw.

While learning, the daemon writes the flow log and raises incidents of named causes (a scan
is a scan on any network) but holds back ``unknown_anomaly`` incidents, whose threshold the
site has not set yet (counted: ``quietwire_learning_incidents_held_back_total``). At the end
it calibrates the live model (calibrate.py, in a background thread, so capture goes on) on the
flow log's records that ended within the period, saves the result beside the configured model
(``model.calibrated.onnx``; in the flow log's directory when the model's cannot be written)
and swaps it into the running engine: no restart. Too few flows, or any failure, keeps the old
thresholds, is logged and counted, and ends the period all the same.

The state (start, period, model, flow log, outcome) is a small JSON file beside the flow log
(``flows.json.learning``), replaced atomically at each change: a restarted daemon continues
the same period and calibrates on its whole span, and one started after the end keeps using
the calibrated model (while the configured model is the one it was calibrated from) instead
of learning again. Delete the file to learn again.

Time is passed in (``now``, epoch seconds): the daemon gives the wall clock, tests a fake one.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from quietwire.agent.detect.model import ModelError, ScoringModel
from quietwire.agent.detect.rules import RuleSet
from quietwire.agent.errors import QuietwireError
from quietwire.agent.flow.identity import iso_times
from quietwire.agent.site.sources import period_chunks, period_records

STATE_SUFFIX = ".learning"  # beside the flow log; not a name the flow log readers take
STATE_VERSION = 1
HELD_CAUSES = frozenset({"unknown_anomaly"})
DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhd]?)\s*$")
UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
LEARNING, CALIBRATED, TOO_FEW_FLOWS, FAILED = "learning", "calibrated", "too_few_flows", "failed"


class LearningStateError(QuietwireError):
    """The learning state file cannot be read; the message names the file."""


def parse_duration(value: str | float) -> float:
    """Seconds from a duration: a number (seconds) or text with an s, m, h or d suffix
    ("24h", "90m", "1.5d"). ValueError for anything else, or a duration that is not > 0."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 24h, 90m, 30s or 2d, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        m = DURATION.match(str(value))
        if not m:
            raise ValueError(f"expected a duration like 24h, 90m, 30s or 2d, got {value!r}")
        seconds = float(m.group(1)) * UNIT_S[m.group(2)]
    if not seconds > 0:
        raise ValueError(f"expected a duration > 0, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """A duration as an operator writes it: 1d 2h, 24h, 15m, 42s."""
    seconds = max(0, int(round(seconds)))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{v}{u}" for v, u in ((days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")) if v]
    return " ".join(parts[:2]) or "0s"


def utc(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


@dataclass(frozen=True)
class LearnSettings:
    """Config key ``learn``."""

    period_s: float  # how long to learn (config: period, a duration such as 24h)
    # Balanced records the calibration needs (None: 1 / the model's smallest false-positive
    # rate, 10,000 for the bundled model); with fewer the old thresholds stay.
    min_records: int | None = None
    max_records: int = 200_000  # a uniform sample of at most this many records is calibrated on
    # benign incidents per 100 host-days the risk threshold is fitted for, on all the period's
    # records (streamed: only their evidence is kept)
    budget: float = 1.0

    def __post_init__(self) -> None:
        if not self.period_s > 0:
            raise ValueError(f"learn.period: expected a duration > 0, got {self.period_s!r}")
        if self.min_records is not None and self.min_records < 1:
            raise ValueError(f"learn.min_records: expected at least 1, got {self.min_records}")
        if self.max_records < 1:
            raise ValueError(f"learn.max_records: expected at least 1, got {self.max_records}")
        if not self.budget > 0:
            raise ValueError(f"learn.budget: expected a positive number, got {self.budget!r}")


@dataclass(frozen=True)
class LearningState:
    """What the state file holds."""

    started_at: float  # epoch seconds
    period_s: float
    flow_log: str
    model: str  # the live model when learning started, then the one calibrated
    model_version: str
    status: str = LEARNING  # learning, calibrated, too_few_flows, failed
    finished_at: float | None = None
    calibrated_model: str | None = None
    calibrated_version: str | None = None
    detail: str | None = None  # the outcome in words

    @property
    def ends_at(self) -> float:
        return self.started_at + self.period_s


def state_path(flow_log: str | Path) -> Path:
    """Where the learning state of a flow log lives: ``flows.json`` -> ``flows.json.learning``."""
    flow_log = Path(flow_log)
    return flow_log.with_name(flow_log.name + STATE_SUFFIX)


def load_state(path: Path) -> LearningState | None:
    """The state in ``path``; None if there is none; LearningStateError if it is unreadable."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise LearningStateError(f"{path}: cannot read learning state: {exc}") from exc
    if not isinstance(data, dict) or data.pop("version", None) != STATE_VERSION:
        raise LearningStateError(f"{path}: not a learning state of version {STATE_VERSION}")
    try:
        state = LearningState(**data)
        float(state.started_at) + float(state.period_s)
    except (TypeError, ValueError) as exc:
        raise LearningStateError(f"{path}: cannot read learning state: {exc}") from exc
    return state


def save_state(path: Path, state: LearningState) -> None:
    """Write the state atomically (a temporary file, fsync, rename); OSError on failure."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = json.dumps({"version": STATE_VERSION, **asdict(state)}, indent=1) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


# --- the state machine ---------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """How a calibration at the end of a period went (made in the background thread)."""

    status: str  # calibrated, too_few_flows, failed
    detail: str  # for the log: thresholds old -> new and the records used, or why not
    model: ScoringModel | None = None  # the calibrated model, loaded
    out_path: Path | None = None


class Learner:
    """The learning period of one daemon: ``model_for`` the model to run, ``tick`` as time
    passes (every second), with the engine to hold back incidents in and swap the model of."""

    def __init__(
        self,
        settings: LearnSettings,
        flow_log: Path,
        model: ScoringModel,
        now: float,
        log: Callable[[str], None] | None = None,
        metrics=None,
        background: bool = True,
    ) -> None:
        self.settings = settings
        self.flow_log = Path(flow_log)
        self.path = state_path(self.flow_log)
        self.log = log or (lambda message: None)
        self.metrics = metrics
        self.background = background
        self._worker: threading.Thread | None = None
        self._outcome: Outcome | None = None
        self._calibrating: ScoringModel | None = None  # the live model when it started
        self._told_model_changed = False
        try:
            state = load_state(self.path)
        except LearningStateError as exc:
            self.log(f"learning: {exc}; starting a new learning period")
            state = None
        if state is not None and state.flow_log != str(self.flow_log):
            self.log(
                f"learning: {self.path} is the state of another flow log ({state.flow_log}); "
                "starting a new learning period"
            )
            state = None
        if state is None:
            state = LearningState(
                now, settings.period_s, str(self.flow_log), str(model.path), model.version
            )
            self.log(
                f"learning period started: {format_duration(settings.period_s)}, until "
                f"{utc(state.ends_at)}; unknown_anomaly incidents are held back until then, "
                f"the flow log ({self.flow_log}) is the calibration data, the state is in "
                f"{self.path}"
            )
            self._save(state)
        elif state.status == LEARNING:
            if state.period_s != settings.period_s:
                self.log(
                    f"learning: the period changed from {format_duration(state.period_s)} to "
                    f"{format_duration(settings.period_s)}; it still starts at "
                    f"{utc(state.started_at)}"
                )
                state = replace(state, period_s=settings.period_s)
                self._save(state)
            left = state.ends_at - now
            self.log(
                f"learning period resumed: started {utc(state.started_at)}, "
                + (f"{format_duration(left)} left" if left > 0 else "over: calibrating now")
                + f" (state {self.path})"
            )
        else:
            self.log(
                f"learning period over since {utc(state.finished_at or state.ends_at)} "
                f"({state.status.replace('_', ' ')}); delete {self.path} to learn again"
            )
        self.state = state
        self._progress(now)

    @property
    def learning(self) -> bool:
        """True until the period's calibration is over (held-back causes stay held)."""
        return self.state.status == LEARNING

    def model_for(self, configured: ScoringModel) -> ScoringModel:
        """The model to run for the configured one: after a calibration, the calibrated model
        while the configured file is the one it was calibrated from; else the configured."""
        s = self.state
        if s.status != CALIBRATED or not s.calibrated_model:
            return configured
        if configured.version != s.model_version:
            if not self._told_model_changed:
                self._told_model_changed = True
                self.log(
                    f"learning: the configured model ({configured.path}, {configured.version}) "
                    f"is not the one calibrated at the end of the learning period "
                    f"({s.model_version}); running it as configured"
                )
            return configured
        try:
            calibrated = ScoringModel(s.calibrated_model)
        except ModelError as exc:
            self.log(
                f"learning: cannot load the calibrated model, running {configured.path}: {exc}"
            )
            return configured
        self.log(
            f"running the model calibrated at the end of the learning period: {calibrated.path}"
        )
        return calibrated

    def tick(self, now: float, engine) -> None:
        """As time passes: hold back what learning holds back, start the calibration when the
        period is over, and swap its result into ``engine`` when it is done."""
        if not self.learning:
            return
        engine.hold_back_causes = HELD_CAUSES
        if self._worker is None and self._outcome is None and now >= self.state.ends_at:
            self._start(now, engine)
        if self._outcome is not None:
            self._finish(now, engine, self._outcome)
        self._progress(now)

    def wait(self, timeout: float | None = None) -> None:
        """Wait for a calibration running in the background (tests, shutdown)."""
        if self._worker is not None:
            self._worker.join(timeout)

    def _start(self, now: float, engine) -> None:
        if engine.flow_log is not None:  # the background reader then reads rotated files,
            engine.flow_log.rotate()  # which capture's writes and rotations leave alone
        model = self._calibrating = engine.model
        s = self.state
        self.log(
            f"learning period over ({utc(s.started_at)} to {utc(s.ends_at)}): calibrating "
            f"{model.path} on the flow log's records of the period"
        )
        args = (Path(model.path), s.started_at, s.ends_at, engine.rules.ruleset)
        if not self.background:
            self._outcome = self._calibrate(*args)
            return
        self._worker = threading.Thread(
            target=lambda: setattr(self, "_outcome", self._calibrate(*args)),
            daemon=True,
            name="quietwire-learning",
        )
        self._worker.start()

    def _calibrate(self, model_path: Path, start: float, end: float, rules: RuleSet) -> Outcome:
        """Read the period's records and calibrate, then fit entity risk on them with the
        agent's ``rules`` (the background thread). Never raises."""
        from quietwire.agent.site.calibrate import CalibrationError, TooFewFlowsError, calibrate
        from quietwire.agent.site.riskfit import describe, fit_model

        try:
            found = period_records(
                self.flow_log, start, end, self.settings.max_records, seed=int(start)
            )
            for warning in found.warnings:
                self.log(f"learning: warning: {warning}")
            out = calibrated_path(model_path, self.flow_log)
            lo, hi = iso_times(np.array([int(start * 1e9), int(end * 1e9)], dtype=np.int64))
            report = calibrate(
                model_path,
                found.features,
                out,
                min_records=self.settings.min_records,
                inputs=found.inputs,
                period=(lo, hi),
            )
            try:
                fitted = fit_model(
                    out, period_chunks(self.flow_log, start, end), rules, self.settings.budget
                )
                risk = "; " + describe(fitted)
            except ValueError as exc:  # no record with identity fields: the old risk
                risk = f"; incidents: risk not fitted ({exc})"
            model = ScoringModel(out)
        except TooFewFlowsError as exc:
            return Outcome(TOO_FEW_FLOWS, str(exc))
        except (CalibrationError, ModelError, OSError) as exc:
            return Outcome(FAILED, str(exc))
        except Exception as exc:  # noqa: BLE001 - a learning failure must not stop capture
            return Outcome(FAILED, f"{type(exc).__name__}: {exc}")
        levels = ", ".join(
            f"{lv.fpr:g} {lv.old_threshold:.4g} -> {lv.new_threshold:.4g}"
            + ("*" if lv.too_few_flows else "")
            for lv in report.levels
        )
        sampled = (
            f" (a sample of {report.records:,} of {found.records:,})"
            if found.records > report.records
            else ""
        )
        detail = (
            f"{report.records:,} records{sampled}, {report.balanced_records:,.0f} after burst "
            f"balancing, from {len(found.inputs)} file{'s' if len(found.inputs) != 1 else ''}; "
            f"thresholds (FPR old -> new) {levels}"
            + ("; * fewer balanced records than 1/FPR" if "*" in levels else "")
            + risk
        )
        return Outcome(CALIBRATED, detail, model, out)

    def _finish(self, now: float, engine, outcome: Outcome) -> None:
        self._worker, self._outcome = None, None
        s = self.state
        held = sum(engine.held_back_incidents.values())
        if outcome.status == CALIBRATED:
            previous = self._calibrating
            engine.reload(model=outcome.model)
            self.log(
                f"learning period done: calibrated {previous.path} on {outcome.detail}; saved "
                f"{outcome.out_path} (model {outcome.model.version}), now live"
            )
            s = replace(
                s,
                model=str(previous.path),
                model_version=previous.version,
                calibrated_model=str(outcome.out_path),
                calibrated_version=outcome.model.version,
            )
        elif outcome.status == TOO_FEW_FLOWS:
            self.log(
                f"learning period done, the model's thresholds stay: {outcome.detail}; "
                f"calibrate later with `quietwire calibrate --model {engine.model.path} "
                f"{self.flow_log.parent}/ -o ...`"
            )
        else:
            self.log(
                f"learning period done, the model's thresholds stay: calibration failed: "
                f"{outcome.detail}"
            )
        engine.hold_back_causes = frozenset()
        self.log(
            f"unknown_anomaly incidents are raised from now on ({held:,} held back while learning)"
        )
        self.state = replace(s, status=outcome.status, finished_at=now, detail=outcome.detail)
        self._save(self.state)
        if self.metrics:
            self.metrics.learning_calibrations.labels(outcome.status).inc()

    def _save(self, state: LearningState) -> None:
        try:
            save_state(self.path, state)
        except OSError as exc:
            self.log(
                f"learning: cannot write {self.path}: {exc.strerror or exc}; a restart would "
                "not know this state"
            )

    def _progress(self, now: float) -> None:
        if self.metrics is None:
            return
        s = self.state
        learning = s.status == LEARNING
        left = max(0.0, s.ends_at - now) if learning else 0.0
        self.metrics.learning.set(1 if learning else 0)
        self.metrics.learning_left.set(left)
        self.metrics.learning_progress.set(1.0 - left / s.period_s if learning else 1.0)


def calibrated_path(model: Path, flow_log: Path) -> Path:
    """Where a calibrated model goes: beside the model (``model.calibrated.onnx``), or in the
    flow log's directory when the model's cannot be written (the bundled model's)."""
    name = f"{model.stem}.calibrated{model.suffix or '.onnx'}"
    if os.access(model.parent, os.W_OK):
        return model.with_name(name)
    return flow_log.parent / name
