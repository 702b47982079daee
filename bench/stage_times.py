"""Where the time of a quietwire run goes: timing hooks around each stage's entry points.

    python bench/stage_times.py CAPTURE [flows arguments...]   # JSON: seconds per stage

Each hook adds its call's time to its stage, less the time of hooked calls inside it, so the
stages add up to the hooked total without counting anything twice. The hooks wrap calls made
once per batch (never per packet), so they cost next to nothing. ``import`` is the CPU time
from the interpreter's start to quietwire.cli being imported.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path

# CPU time of this process: on a shared machine wall time also counts other processes' turns.
_clock = time.process_time

STAGES = (
    "import",
    "read",
    "decode",
    "flow table",
    "key index",
    "expiry and interim scans",
    "payload statistics",
    "host context",
    "features",
    "formatting and writing",
)


class StageTimer:
    """Exclusive CPU time per stage of hooked functions (nested hooks subtract)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._inner: list[float] = []

    def _account(self, stage: str, elapsed: float) -> None:
        self.seconds[stage] += elapsed - self._inner.pop()
        if self._inner:
            self._inner[-1] += elapsed

    def hook(self, owner, name: str, stage: str) -> None:
        fn = getattr(owner, name)

        def timed(*args, **kwargs):
            self._inner.append(0.0)
            start = _clock()
            try:
                return fn(*args, **kwargs)
            finally:
                self._account(stage, _clock() - start)

        setattr(owner, name, timed)

    def hook_generator(self, owner, name: str, stage: str) -> None:
        """Time each step of a generator function (the work between its yields)."""
        fn = getattr(owner, name)

        def timed(*args, **kwargs):
            it = fn(*args, **kwargs)
            while True:
                self._inner.append(0.0)
                start = _clock()
                try:
                    item = next(it)
                except StopIteration:
                    self._account(stage, _clock() - start)
                    return
                self._account(stage, _clock() - start)
                yield item

        setattr(owner, name, timed)


def install(timer: StageTimer) -> None:
    """Hook the stages of `quietwire flows` (import quietwire.cli first)."""
    import quietwire.agent.capture.decode as decode
    import quietwire.agent.features.context as context
    import quietwire.agent.features.meter as meter
    import quietwire.agent.flow.fold as flowfold
    import quietwire.agent.flow.keyindex as keyindex
    import quietwire.agent.flow.table as flows
    import quietwire.agent.output.flowtable as flowfile
    import quietwire.cli.flows as cli_flows

    timer.hook_generator(cli_flows, "read_capture", "read")
    timer.hook(decode.Decoder, "decode", "decode")
    timer.hook(flows.FlowTable, "add", "flow table")
    for name in ("lookup", "insert", "remove"):
        timer.hook(keyindex.KeyIndex, name, "key index")
    for name in ("expire", "snapshot", "flush", "_make_room"):
        timer.hook(flows.FlowTable, name, "expiry and interim scans")
    timer.hook(flowfold, "_fold_payload", "payload statistics")
    for name in ("observe", "prune", "features"):
        timer.hook(context.HostContext, name, "host context")
    timer.hook(meter, "extract", "features")
    for name in dir(flowfile):  # the writer classes: CSV/JSON lines, and Parquet if present
        cls = getattr(flowfile, name)
        if isinstance(cls, type) and cls.__module__ == flowfile.__name__ and "Writer" in name:
            for method in ("write", "close"):
                if method in vars(cls):
                    timer.hook(cls, method, "formatting and writing")


def main() -> None:
    import quietwire.cli as cli

    imported = time.process_time()  # CPU time since the process started
    timer = StageTimer()
    install(timer)
    start = _clock()
    status = cli.main(["flows", *sys.argv[1:]])
    run = _clock() - start
    out = {"import": imported, **timer.seconds}
    out["other"] = run - sum(timer.seconds.values())
    out["status"] = status
    print(json.dumps(out))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
