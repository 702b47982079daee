"""An append-only log file rotated by size and age, with gzip and a retention cap (the flow
log's file; logrotate-style, inside the agent so a sensor needs nothing else).

The live file is ``NAME.SUFFIX`` (e.g. ``flows.json``). Rotation renames it to
``NAME.<UTC time>[-N].SUFFIX`` (``flows.20240102T030405Z.json``) and opens a new one; a
background thread gzips the rotated file (``.json.gz``; zlib releases the GIL, so capture
goes on) and then deletes the oldest rotated files while together they exceed the retention
cap. The live file is never deleted. Every failure is an OSError for the caller to count;
the thread's failures wait in ``errors()``.
"""

from __future__ import annotations

import gzip
import os
import queue
import re
import shutil
import threading
import time
from pathlib import Path

COPY_CHUNK = 1 << 20
# zlib level 3: on flow log JSON, most of level 6's compression at about twice its speed; the
# sensor's CPU is scarcer than its disk.
GZIP_LEVEL = 3


class RotatingFile:
    """Appends bytes to ``path``; ``rotate()`` when ``due()`` (size or age reached)."""

    def __init__(
        self,
        path: Path,
        rotate_bytes: int = 0,
        rotate_age_s: float = 0.0,
        compress: bool = True,
        retention_bytes: int = 0,
        clock=time.time,
    ) -> None:
        self.path = Path(path)
        self.rotate_bytes = rotate_bytes  # 0: no rotation by size
        self.rotate_age_s = rotate_age_s  # 0: no rotation by age
        self.compress = compress
        self.retention_bytes = retention_bytes  # 0: keep every rotated file
        self._clock = clock
        self._file = None
        self.size = 0  # bytes in the live file
        self.opened_at = 0.0  # when the live file was opened or last rotated (clock time)
        self._pattern = rotated_pattern(self.path)
        self._queue: queue.Queue[Path | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._errors: list[tuple[str, OSError]] = []
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        return self._file is not None

    def open(self) -> None:
        """Open (or create) the live file for appending. A line cut short by an earlier
        failure (a full disk) is ended first, so the next line starts on its own."""
        if self._file is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+b", buffering=0)  # noqa: SIM115 - held open until close()
        try:
            self.size = os.fstat(f.fileno()).st_size
            if self.size:
                f.seek(self.size - 1)
                if f.read(1) != b"\n":
                    self._write_all(f, b"\n")
                    self.size += 1
        except OSError:
            f.close()
            raise
        self._file = f
        self.opened_at = self._clock()

    def write(self, data: bytes) -> None:
        """Append ``data`` (whole lines) to the live file, opening it if needed."""
        self.open()
        try:
            self._write_all(self._file, data)
        finally:
            self.size = os.fstat(self._file.fileno()).st_size if self._file else self.size

    def due(self) -> bool:
        """The live file reached its size or age and holds something."""
        if self._file is None or self.size == 0:
            return False
        if self.rotate_bytes and self.size >= self.rotate_bytes:
            return True
        return bool(self.rotate_age_s) and self._clock() - self.opened_at >= self.rotate_age_s

    def rotate(self) -> Path:
        """Rename the live file to its rotated name, start a new one, and hand the old one to
        the compressor (or apply the retention cap at once when not compressing)."""
        self.close_file()
        target = self._rotated_name()
        os.rename(self.path, target)
        self.opened_at = self._clock()
        self.size = 0
        if self.compress:
            self._start_worker()
            self._queue.put(target)
        else:
            self.apply_retention()
        self.open()
        return target

    def reopen(self) -> None:
        """Close and open the live file again (after logrotate or an operator moved it)."""
        self.close_file()
        self.open()

    def close_file(self) -> None:
        if self._file is not None:
            f, self._file = self._file, None
            f.close()

    def close(self, wait: bool = True) -> None:
        """Close the live file; with ``wait``, let the compressor finish its queue first."""
        self.close_file()
        if self._worker is not None:
            self._queue.put(None)
            if wait:
                self._worker.join()
            self._worker = None

    def errors(self) -> list[tuple[str, OSError]]:
        """(operation, error) of the background thread's failures since the last call."""
        with self._lock:
            out, self._errors = self._errors, []
        return out

    def rotated_files(self) -> list[Path]:
        """The rotated files of this log, oldest first (compressed or not yet)."""
        found = []
        try:
            names = os.listdir(self.path.parent)
        except FileNotFoundError:
            return []
        for name in names:
            m = self._pattern.match(name)
            if m:
                found.append(((m.group(1), int(m.group(2) or 0)), self.path.parent / name))
        return [p for _, p in sorted(found)]

    def apply_retention(self) -> list[Path]:
        """Delete the oldest rotated files while together they exceed the cap. With
        compression on, only compressed files count: one still waiting for the compressor is
        counted (and may go) after it has shrunk, not at its uncompressed size."""
        if not self.retention_bytes:
            return []
        sizes = []
        for p in self.rotated_files():
            if self.compress and p.suffix != ".gz":
                continue
            try:
                sizes.append((p, p.stat().st_size))
            except FileNotFoundError:  # deleted meanwhile (an operator, or a compression)
                continue
        total = sum(s for _, s in sizes)
        deleted = []
        for p, s in sizes:
            if total <= self.retention_bytes:
                break
            p.unlink(missing_ok=True)
            total -= s
            deleted.append(p)
        return deleted

    def _rotated_name(self) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._clock()))
        stem, suffix = _split(self.path.name)
        for n in range(10_000):
            extra = f"-{n}" if n else ""
            target = self.path.with_name(f"{stem}.{stamp}{extra}{suffix}")
            if not target.exists() and not target.with_name(target.name + ".gz").exists():
                return target
        raise FileExistsError(f"{self.path}: too many rotated files named for {stamp}")

    def _start_worker(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(
                target=self._compress_loop, daemon=True, name="quietwire-flowlog-gzip"
            )
            self._worker.start()

    def _compress_loop(self) -> None:
        while True:
            path = self._queue.get()
            if path is None:
                return
            for operation, step in (("compress", gzip_file), ("retention", None)):
                try:
                    if step is not None:
                        step(path)
                    else:
                        self.apply_retention()
                except OSError as exc:
                    with self._lock:
                        self._errors.append((operation, exc))

    @staticmethod
    def _write_all(f, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = f.write(view)
            view = view[written:]


def gzip_file(path: Path) -> Path | None:
    """``path`` to ``path.gz`` (via a ``.part`` file, so a reader never sees half of one),
    then delete ``path``. None when ``path`` is gone already (the retention cap took it)."""
    target = path.with_name(path.name + ".gz")
    part = path.with_name(path.name + ".gz.part")
    try:
        src = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return None
    try:
        with src, gzip.open(part, "wb", compresslevel=GZIP_LEVEL) as out:
            shutil.copyfileobj(src, out, COPY_CHUNK)
        os.replace(part, target)
    except OSError:
        part.unlink(missing_ok=True)
        raise
    path.unlink()
    return target


def rotated_pattern(path: Path) -> re.Pattern:
    """Matches the names of ``path``'s rotated files: (UTC time, collision number)."""
    stem, suffix = _split(Path(path).name)
    return re.compile(
        rf"^{re.escape(stem)}\.(\d{{8}}T\d{{6}}Z)(?:-(\d+))?{re.escape(suffix)}(?:\.gz)?$"
    )


def _split(name: str) -> tuple[str, str]:
    stem, dot, suffix = name.rpartition(".")
    return (stem, dot + suffix) if stem else (name, "")
