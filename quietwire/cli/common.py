"""What every subcommand shares: the one-line error, progress displays, the bundled capture."""

from __future__ import annotations

import sys
import time

from quietwire import DATA

DEFAULT_CAPTURE = DATA / "sample.pcap"


def error(msg: str) -> None:
    print(f"quietwire: error: {msg}", file=sys.stderr)


class Progress:
    """A one-line progress display on a terminal; silent otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._last = 0.0

    def update(self, name: str, done: int, total: int, packets: int) -> None:
        now = time.monotonic()
        if not self.enabled or now - self._last < 0.2:
            return
        self._last = now
        pct = 100.0 * done / total if total else 100.0
        bar = "#" * int(pct / 5)
        print(
            f"\r{name[-30:]:>30} [{bar:<20}] {pct:5.1f}% {packets:,} packets",
            end="",
            file=sys.stderr,
            flush=True,
        )

    def done(self) -> None:
        if self.enabled:
            print("\r" + " " * 78 + "\r", end="", file=sys.stderr, flush=True)


class Reading:
    """Progress of reading training inputs: one line on a terminal, silent otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._last = 0.0
        self._shown = False

    def __call__(self, name: str, read: int, kept: int) -> None:
        now = time.monotonic()
        if not self.enabled or now - self._last < 0.2:
            return
        self._last = now
        self._shown = True
        line = f"reading {name[-40:]}: {read:,} flows, {kept:,} kept"
        print(f"\r{line:<78.78}", end="", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self._shown:
            print("\r" + " " * 78 + "\r", end="", file=sys.stderr, flush=True)


class Steps:
    """Training progress on a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, name: str, step: int, total: int) -> None:
        if self.enabled:
            end = "\n" if step == total else ""
            print(f"\r{name:>16}: step {step}/{total}", end=end, file=sys.stderr, flush=True)


def trainer_or_error():
    """The trainer package, or an error line if its extra (torch) is not installed."""
    try:
        import torch  # noqa: F401
    except ImportError:
        error("this command needs the trainer: pip install 'quietwire[train]'")
        return None
    from quietwire import trainer

    return trainer
