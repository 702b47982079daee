"""Many capture files on many cores: each file is metered on its own in a worker process (as
one process meters it), and the results come back in input order.

``ordered_map`` runs a function over jobs in worker processes, a bounded window ahead, and
yields results in the jobs' order. For replay, a worker writes the meter's output step by
step (``meter_steps``) to a file; the central process feeds the steps to its Engine through
a ``PlaybackMeter`` (``play``), so scoring, rules, incidents, alerts and the flow log see the
same flows, in the same order and with the same meter state, as if the file was metered
there.
"""

from __future__ import annotations

import os
import pickle
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from quietwire.agent.capture.pcap import CaptureError, read_capture
from quietwire.agent.features.context import ContextConfig
from quietwire.agent.features.meter import FlowMeter, Meter
from quietwire.agent.features.schema import MeteredFlows
from quietwire.agent.flow.table import FlowConfig

if TYPE_CHECKING:
    from concurrent.futures import Future


def default_workers() -> int:
    """One per core this process may use."""
    return max(1, len(os.sched_getaffinity(0)))


def ordered_map(func: Callable, jobs: Iterable, workers: int) -> Iterator[Future]:
    """Futures of ``func(job)`` in the jobs' order, run in ``workers`` processes with at most
    2 x workers submitted ahead of the one being consumed."""
    jobs = iter(jobs)
    # Imported here: importing multiprocessing slows every start of `quietwire flows`, and
    # only --workers needs it.
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        pending: deque[Future] = deque()
        for job in jobs:
            pending.append(pool.submit(func, job))
            if len(pending) >= 2 * workers:
                break
        while pending:
            done = pending.popleft()
            done.exception()  # wait for it
            yield done
            job = next(jobs, None)
            if job is not None:
                pending.append(pool.submit(func, job))


@dataclass
class Step:
    """What one call of the meter gave (one batch, or one part of the drain) and the meter's
    state after it."""

    flows: MeteredFlows
    packets: int
    bytes: int
    errors: Counter
    evictions: Counter
    emergency: bool
    open_flows: int
    flood: np.ndarray  # which of the flows started in emergency mode (FlowMeter.flood_flows)


@dataclass
class StepsResult:
    """A worker's account of one file: where its steps are, and the error that cut it short."""

    path: Path
    steps: Path
    error: str | None = None


def meter_steps(job: tuple[Path, Path, FlowConfig | None, ContextConfig | None]) -> StepsResult:
    """Meter one capture, writing each step to a pickle stream (bounded memory)."""
    path, out, flow_config, context_config = job
    meter = FlowMeter(flow_config, context_config)
    error = None
    with out.open("wb") as handle:

        def emit(flows: MeteredFlows) -> None:
            st = meter.stats.decode
            step = Step(
                flows,
                st.packets,
                st.bytes,
                Counter(st.errors),
                Counter(meter.evictions),
                meter.emergency,
                len(meter.table),
                meter.flood_flows(flows.records),
            )
            pickle.dump(step, handle, protocol=pickle.HIGHEST_PROTOCOL)

        try:
            for batch in read_capture(path):
                emit(meter.add(batch))
        except CaptureError as exc:
            error = str(exc)
        for part in meter.drain():
            emit(part)
    return StepsResult(path, out, error)


@dataclass
class _Decode:
    packets: int = 0
    bytes: int = 0
    errors: Counter = field(default_factory=Counter)


@dataclass
class _Stats:
    decode: _Decode = field(default_factory=_Decode)


class _Table:
    def __init__(self, config: FlowConfig | None) -> None:
        self.config = config or FlowConfig()
        self.open = 0

    def __len__(self) -> int:
        return self.open


class PlaybackMeter:
    """Stands in for an Engine's FlowMeter: ``add(step)`` returns the flows a worker's meter
    gave and takes on that meter's state (counts, evictions, emergency mode)."""

    def __init__(self, flow_config: FlowConfig | None = None) -> None:
        self.stats = _Stats()
        self.evictions: Counter = Counter()
        self.emergency = False
        self.table = _Table(flow_config)
        self._flood = np.zeros(0, dtype=bool)

    def add(self, step: Step) -> MeteredFlows:
        d = self.stats.decode
        d.packets, d.bytes, d.errors = step.packets, step.bytes, step.errors
        self.evictions = step.evictions
        self.emergency = step.emergency
        self.table.open = step.open_flows
        self._flood = step.flood
        return step.flows

    def flood_flows(self, flows) -> np.ndarray:
        return self._flood  # of the flows the last add returned, as the worker's meter said

    def drain(self) -> Iterator[MeteredFlows]:
        return iter(())  # the worker drained its meter; those parts came as steps

    def expire(self, now_ns: int) -> MeteredFlows:  # replay never calls it
        raise NotImplementedError


class ReplayEngine(Protocol):
    """What replay's files are played into (service/engine.py's Engine)."""

    meters: dict[str, Meter]

    def attach(self, interface: str, meter: Meter) -> None: ...

    def process(self, batch: Any, interface: str) -> None: ...

    def flush(self) -> None: ...


@dataclass(frozen=True)
class FileReplay:
    """The capture files to replay with ``workers`` metering processes, and how to meter them."""

    files: tuple[Path, ...]
    workers: int
    flow: FlowConfig | None = None
    context: ContextConfig | None = None


def play(engine: ReplayEngine, result: StepsResult, flow_config: FlowConfig | None) -> None:
    """Feed one file's steps to ``engine`` as its meter for "file" (then the caller flushes
    the engine and clears its meters, as after a file metered in process)."""
    engine.attach("file", PlaybackMeter(flow_config))
    with result.steps.open("rb") as handle:
        while True:
            try:
                step = pickle.load(handle)
            except EOFError:
                break
            engine.process(step, "file")
    result.steps.unlink(missing_ok=True)


def replay_files(engine: ReplayEngine, replay: FileReplay, log: Callable[[str], None]) -> bool:
    """daemon.replay's loop over files with ``replay.workers`` metering processes: each file
    metered in a worker, then played into ``engine`` in input order and flushed (each file its
    own time line, as in process). True if a file was damaged or its worker failed."""
    import tempfile

    failed = False
    with tempfile.TemporaryDirectory(prefix="quietwire-replay-") as tmp:
        tasks = [
            (path, Path(tmp) / f"steps-{i}.pickle", replay.flow, replay.context)
            for i, path in enumerate(replay.files)
        ]
        for (path, *_), future in zip(tasks, ordered_map(meter_steps, tasks, replay.workers)):
            try:
                result = future.result()
            except Exception as exc:  # the worker's own failure: name the file, go on
                log(f"error: {path}: {type(exc).__name__}: {exc}")
                failed = True
                continue
            play(engine, result, replay.flow)
            if result.error:
                log(f"error: {result.error}")
                failed = True
            engine.flush()
            engine.meters.clear()
    return failed
