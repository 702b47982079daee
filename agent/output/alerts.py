"""Alert lines as EVE-style JSON (the shape SIEMs already ingest from Suricata): one per
incident open/update/close, or (an option) per flow and rule; the line budget that caps them;
the sink that writes them to a file, stdout, or both. The file is reopened on request (SIGHUP)
so logrotate can move it."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from quietwire.agent.detect.incidents import Incident
from quietwire.agent.detect.model import Scores
from quietwire.agent.detect.rules import Rule
from quietwire.agent.features.schema import FEATURE_NAMES
from quietwire.agent.flow.identity import iso_times
from quietwire.agent.flow.records import FlowRecords
from quietwire.agent.output.tablefields import identity_columns


def eve_alerts(
    flows: FlowRecords,
    scores: Scores,
    hits: list[tuple[int, Rule, int]],
    model_version: str,
    interface: str | None = None,
) -> list[dict]:
    """One EVE alert record per (flow index, rule, suppressed repeats)."""
    if not hits:
        return []
    idx = sorted({i for i, _, _ in hits})
    sub = flows.take(idx)
    ident = identity_columns(sub)
    row_of = {flow: row for row, flow in enumerate(idx)}
    top = Scores(
        scores.score[idx], scores.tail_probability[idx], scores.contributions[idx]
    ).top_features(5)
    out = []
    for i, rule, repeats in hits:
        r = row_of[i]
        record = {
            "timestamp": ident["end"][r],
            "flow_id": ident["flow_id"][r],
            "community_id": ident["community_id"][r],
            "event_type": "alert",
            "src_ip": ident["src_ip"][r],
            "src_port": ident["src_port"][r],
            "dest_ip": ident["dest_ip"][r],
            "dest_port": ident["dest_port"][r],
            "proto": ident["proto"][r],
            "alert": {
                "action": "allowed",
                "signature_id": rule.id,
                "signature": rule.name,
                "severity": rule.severity,
                "category": rule.category,
            },
            "flow": {
                "pkts_toserver": ident["pkts_toserver"][r],
                "pkts_toclient": ident["pkts_toclient"][r],
                "bytes_toserver": ident["bytes_toserver"][r],
                "bytes_toclient": ident["bytes_toclient"][r],
                "start": ident["start"][r],
                "end": ident["end"][r],
                "reason": ident["end_reason"][r],
            },
            "quietwire": {
                "score": round(float(scores.score[i]), 6),
                "tail_probability": float(scores.tail_probability[i]),
                "model_version": model_version,
                "top_features": [{"name": n, "contribution": round(v, 4)} for n, v in top[r]],
                "suppressed_count": repeats,
            },
        }
        if interface:
            record["in_iface"] = interface
        out.append(record)
    return out


@dataclass(frozen=True)
class BudgetSettings:
    """The global cap on alert lines (config key ``alert_budget``): a token bucket."""

    lines_per_s: float = 50.0
    burst: int = 200

    def __post_init__(self) -> None:
        if not self.lines_per_s > 0 or self.burst < 1:
            raise ValueError("alert_budget: lines_per_s must be > 0 and burst >= 1")


class LineBudget:
    """A token bucket on alert lines, paced by ``clock`` (seconds): the wall clock live (it
    protects the SIEM), the traffic's time in a replay (the same lines every run). Lines it
    holds back are counted by cause, and the next line that gets through says how many."""

    def __init__(self, settings: BudgetSettings | None = None, clock=time.monotonic) -> None:
        self.settings = settings or BudgetSettings()
        self._clock = clock
        self._tokens = float(self.settings.burst)
        self._at = clock()
        self._pending: Counter = Counter()  # held back since the last line written
        self.held: Counter = Counter()  # held back in all, by cause

    def grant(self, causes: list[str]) -> int:
        """How many of these lines (in order) may be written now; the rest are held back."""
        now = self._clock()
        s = self.settings
        self._tokens = min(float(s.burst), self._tokens + max(now - self._at, 0.0) * s.lines_per_s)
        self._at = now
        k = min(len(causes), int(self._tokens))
        self._tokens -= k
        if k < len(causes):
            rest = Counter(causes[k:])
            self._pending.update(rest)
            self.held.update(rest)
        return k

    def note(self, record: dict) -> None:
        """Tell a line that is about to be written what was held back before it."""
        if self._pending:
            record["quietwire"]["held_back"] = {
                "lines": sum(self._pending.values()),
                "by_cause": dict(sorted(self._pending.items())),
            }
            self._pending.clear()


def _distinct(seen: set, sample: list, cap: int) -> dict:
    out = {"distinct": len(seen), "sample": list(sample)}
    if len(seen) >= cap:
        out["distinct_at_least"] = True  # counting stopped at the cap
    return out


def eve_incident(inc: Incident, state: str, model_version: str, cap: int) -> dict:
    """One EVE alert line for an incident's open, update or close; marks the line written."""
    inc.lines += 1
    first, last, now = iso_times(
        np.array([inc.first_ns, inc.last_ns, inc.line_ns or inc.last_ns], dtype=np.int64)
    )
    top = []
    if inc.contributions is not None:
        mean = inc.contributions / max(inc.flows, 1)
        for k in np.argsort(-mean)[:5].tolist():
            top.append({"name": FEATURE_NAMES[k], "contribution": round(float(mean[k]), 4)})
    record: dict = {"timestamp": now, "event_type": "alert"}
    record["src_ip" if inc.role == "source" else "dest_ip"] = inc.ip
    spans = sorted(inc.causes.values(), key=lambda c: c.first_ns)
    span_times = iso_times(
        np.array([t for c in spans for t in (c.first_ns, c.last_ns)], dtype=np.int64)
    )
    record["alert"] = {
        "action": "allowed",
        "signature_id": inc.rule.id,
        "signature": inc.rule.name,
        "severity": inc.rule.severity,
        "category": inc.rule.category,
    }
    record["quietwire"] = {
        "model_version": model_version,
        "incident": {
            "id": inc.id,
            "state": state,
            "cause": inc.cause,
            "why": inc.why,
            "entity": {"ip": inc.ip, "role": inc.role},
            "risk": {
                "value": round(inc.risk, 3),
                "over_baseline": round(inc.over_baseline, 3),
                "threshold": round(inc.threshold, 3),
            },
            "tactics": inc.tactics,
            "timeline": [
                {
                    "cause": c.cause,
                    **({"tactic": c.tactic} if c.tactic else {}),
                    "first_seen": span_times[2 * k],
                    "last_seen": span_times[2 * k + 1],
                    "flows": c.flows,
                }
                for k, c in enumerate(spans)
            ],
            "first_seen": first,
            "last_seen": last,
            "flows": inc.flows,
            "packets": inc.packets,
            "bytes": inc.bytes,
            "peers": _distinct(inc.peers, inc.peer_sample, cap),
            "ports": _distinct(inc.ports, inc.port_sample, cap),
            "score": {
                "max": round(inc.max_score, 6),
                "min_tail_probability": round(inc.min_tail, 6),
                "flows_over_threshold": {f"{fpr:g}": n for fpr, n in sorted(inc.over.items())},
            },
            "top_features": top,
            "examples": list(inc.examples),
            "rules": sorted(inc.rules),
            "lines": inc.lines,
        },
    }
    if inc.merged_into:
        record["quietwire"]["incident"]["merged_into"] = inc.merged_into
    return record


QUEUE_LINES = 10_000  # alert lines held while the file cannot be written (a short outage)
RETRY_S = 5.0  # how often a failing file is tried again
LOG_EVERY_S = 60.0  # at most one message a minute about a failing output


class AlertSink:
    """Where alerts go: a JSON-lines file (appended), stdout, or both.

    The host fails too: a full disk, a deleted or read-only file, a reader that closed our
    stdout. Lines go to the file with plain appending writes; what the file cannot take (the
    rest of a line included) waits in a bounded queue (``QUEUE_LINES``) and is written, from
    where it stopped, when the file takes writes again (tried at most every ``RETRY_S``, the
    file reopened at its path), so a short outage loses nothing and tears no line. Past the
    queue the oldest lines are dropped and counted. A closed stdout is left alone. Nothing
    raises: ``errors`` (failed writes or opens), ``dropped`` and ``queued`` say what happened,
    and ``log`` gets one message a minute while an output fails."""

    def __init__(
        self,
        path: Path | None = None,
        stdout: bool = False,
        stream: IO[str] | None = None,
        host: str | None = None,
        log: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.host = host  # the sensor's name in every line (EVE's "host"), the daemon's
        self._stdout = stream if stream is not None else (sys.stdout if stdout else None)
        self._fd: int | None = None
        self._log = log or (lambda message: None)
        self._clock = clock
        self.written = 0
        self.errors = 0  # failed writes (or opens) of the file
        self.dropped = 0  # lines lost: past the queue, or never written by close
        self._queue: deque[bytes] = deque()  # lines not yet in the file
        self._offset = 0  # bytes of the first queued line already in the file
        self._retry_at = 0.0
        self._logged_at = -math.inf
        self.reopen()

    @property
    def queued(self) -> int:
        return len(self._queue)

    def reopen(self) -> None:
        """(Re)open the file, e.g. after logrotate moved it."""
        self._close_fd()
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            except OSError as exc:
                self._failed(exc)

    def _close_fd(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None

    def write(self, records: list[dict]) -> None:
        if not records:
            return
        if self.host is not None:
            records = [{**r, "host": self.host} for r in records]
        lines = [json.dumps(r, separators=(",", ":")) + "\n" for r in records]
        if self._stdout is not None:
            self._to_stdout("".join(lines))
        if self.path is not None:
            self._queue.extend(line.encode() for line in lines)
            over = len(self._queue) - QUEUE_LINES
            for _ in range(max(over, 0)):
                self._queue.popleft()
                self._offset = 0
            self.dropped += max(over, 0)
            self._drain()
        self.written += len(records)

    def _to_stdout(self, text: str) -> None:
        try:
            self._stdout.write(text)
        except (BrokenPipeError, ValueError):  # the reader went away (e.g. `| head -1`)
            self._reader_gone()
        except OSError as exc:
            self._failed(exc, "stdout")

    def _reader_gone(self) -> None:
        """Stop writing to stdout; if it is the process's, point it at /dev/null so what
        is still buffered does not fail again at exit."""
        if self._stdout is sys.stdout:
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)
            except (OSError, ValueError):
                pass
        self._stdout = None

    def _drain(self) -> None:
        """Write the queued lines to the file; what it does not take stays queued, with how
        much of the first line went in."""
        if not self._queue:
            return
        if self._fd is None:
            if self._clock() < self._retry_at:
                return
            self.reopen()
            if self._fd is None:
                return
        data = memoryview(b"".join(self._queue))[self._offset :]
        done = 0
        try:
            while done < len(data):
                done += os.write(self._fd, data[done:])
        except OSError as exc:
            self._failed(exc)
        done += self._offset
        while self._queue and done >= len(self._queue[0]):
            done -= len(self._queue.popleft())
        self._offset = done if self._queue else 0

    def _failed(self, exc: OSError, what: str | None = None) -> None:
        """Count a failed write; close the file so the next try reopens it (a deleted or
        moved file comes back at its path), not before RETRY_S."""
        self.errors += 1
        now = self._clock()
        if what is None:
            self._retry_at = now + RETRY_S
            self._close_fd()
        if now - self._logged_at >= LOG_EVERY_S:
            self._logged_at = now
            self._log(
                f"{what or self.path}: cannot write alert lines ({exc.strerror or exc}); "
                f"{len(self._queue):,} queued, {self.dropped:,} dropped so far"
            )

    def flush(self) -> None:
        self._drain()
        if self._stdout is not None:
            try:
                self._stdout.flush()
            except (BrokenPipeError, ValueError):
                self._reader_gone()
            except OSError as exc:
                self._failed(exc, "stdout")

    def close(self) -> None:
        self._retry_at = 0.0  # a last try
        self.flush()
        self.dropped += len(self._queue)  # what never reached the file
        self._queue.clear()
        self._offset = 0
        self._close_fd()
