"""Alerts as EVE-style JSON lines (the shape SIEMs already ingest from Suricata), to a file,
stdout, or both. The file is reopened on request (SIGHUP) so logrotate can move it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import IO

from .flowfile import identity_columns
from .flowrecords import FlowRecords
from .model import Scores
from .rules import Rule


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


class AlertSink:
    """Where alerts go: a JSON-lines file (appended), stdout, or both."""

    def __init__(
        self, path: Path | None = None, stdout: bool = False, stream: IO[str] | None = None
    ) -> None:
        self.path = path
        self._stdout = stream if stream is not None else (sys.stdout if stdout else None)
        self._file: IO[str] | None = None
        self.written = 0
        self.reopen()

    def reopen(self) -> None:
        """(Re)open the file, e.g. after logrotate moved it."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", buffering=1 << 16)

    def write(self, records: list[dict]) -> None:
        if not records:
            return
        text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
        for out in (self._file, self._stdout):
            if out is not None:
                out.write(text)
        self.written += len(records)

    def flush(self) -> None:
        for out in (self._file, self._stdout):
            if out is not None:
                out.flush()

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None
