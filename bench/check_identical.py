"""Check that the product's outputs are byte-identical between two versions of the code.

Runs the commands whose bytes users keep, on real and generated captures, and records a
SHA-256 per output in a manifest:

- ``quietwire flows`` as CSV, JSON lines and Parquet (scored) on the nDPI corpus
  (``../shared/data/ndpi/pcap``) and on generated bench captures (bench/gen_capture.py:
  steady traffic and many open flows);
- ``quietwire replay`` alert lines and the uncompressed flow log on the bundled captures
  (per-flow alert lines on) and on a SYN and a UDP flood (bench/gen_flood.py; the incident
  lines: a flood's per-flow lines are thinned by a repeat limit on the wall clock).

Record on one version, then compare on another::

    python bench/check_identical.py --out /tmp/before            # writes /tmp/before/manifest.json
    python bench/check_identical.py --out /tmp/after --against /tmp/before/manifest.json

Exit 0 when every output matches, 1 naming each one that differs. Two things vary from run to
run by design and are taken out: incident ids are random (each is replaced by its order of first
appearance before hashing), and the alert line budget runs on the wall clock (replay here gets a
budget no run reaches). Parquet files carry the pyarrow version that wrote them: compare runs
made in the same environment.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import gen_capture  # noqa: E402
import gen_flood  # noqa: E402

NDPI = HERE.parent.parent / "shared" / "data" / "ndpi" / "pcap"
QW = [sys.executable, "-m", "quietwire.cli"]


def _captures(work: Path, packets: int) -> dict[str, list[Path]]:
    """Generated captures (seeded, so every run writes the same bytes) and the real ones."""
    work.mkdir(parents=True, exist_ok=True)
    steady = work / "steady.pcap"
    open_flows = work / "open.pcap"
    syn = work / "syn.pcap"
    udp = work / "udp.pcap"
    gen_capture.generate(steady, packets)
    gen_capture.generate_open(open_flows, packets, open_flows=packets // 50)
    gen_flood.generate(syn, packets, "syn")
    gen_flood.generate(udp, packets, "udp")
    sets = {"steady": [steady], "open": [open_flows], "syn_flood": [syn], "udp_flood": [udp]}
    if NDPI.is_dir():
        sets["ndpi"] = sorted(NDPI.iterdir())
    return sets


def _run(args: list[str], outputs: list[Path]) -> None:
    for path in outputs:  # the alert file and the flow log append
        path.unlink(missing_ok=True)
    proc = subprocess.run(args, capture_output=True, text=True)
    # A capture nDPI's fuzzers made may fail by itself: that is output too (exit 1), not an
    # error of this script; anything else is.
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(args)}: exit {proc.returncode}\n{proc.stderr[-2000:]}")


def _flows(name: str, files: list[Path], out: Path) -> list[Path]:
    outputs = []
    for suffix in ("csv", "jsonl", "parquet"):
        path = out / f"flows-{name}.{suffix}"
        _run([*QW, "flows", *map(str, files), "-o", str(path), "--score", "--quiet"], [path])
        outputs.append(path)
    return outputs


def _replay(name: str, files: list[Path], out: Path) -> list[Path]:
    alerts = out / f"replay-{name}.alerts.json"
    flow_log = out / f"replay-{name}.flows.json"
    _run(
        [
            *QW,
            "replay",
            *map(str, files),
            "--alerts",
            str(alerts),
            *(["--flow-alerts"] if name == "bundled" else []),
            "--lines-per-s",
            "1e12",
            "--burst",
            "1000000000",
            "--flow-log",
            str(flow_log),
            "--flow-log-no-gzip",
            "--flow-log-rotate-bytes",
            "0",
            "--flow-log-rotate-age",
            "0",
        ],
        [alerts, flow_log],
    )
    return [alerts, flow_log]


INCIDENT_ID = re.compile(rb'"id":"([0-9a-f]{16})"')


def _alerts_digest(path: Path) -> str:
    """Incident lines with their ids numbered; per-flow lines only where no repeat limit cut
    them (the bundled replay): a flood's per-flow lines are thinned on the wall clock."""
    ids: dict[bytes, int] = {}

    def number(m: re.Match) -> bytes:
        return b'"id":"%d"' % ids.setdefault(m.group(1), len(ids))

    keep_flow_lines = "bundled" in path.name
    h = hashlib.sha256()
    with path.open("rb") as f:
        for line in f:
            if keep_flow_lines or b'"incident":' in line:
                h.update(INCIDENT_ID.sub(number, line))
    return h.hexdigest()


def _digest(path: Path) -> str:
    if path.name.endswith(".alerts.json"):
        return _alerts_digest(path)
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for outputs and manifest")
    parser.add_argument("--against", type=Path, help="a manifest.json to compare with")
    parser.add_argument("--packets", type=int, default=200_000, help="per generated capture")
    args = parser.parse_args()
    started = time.perf_counter()
    sets = _captures(args.out / "captures", args.packets)
    bundled = Path(__file__).resolve().parent.parent / "quietwire" / "data"
    outputs: list[Path] = []
    for name in ("steady", "open", "ndpi"):
        if name in sets:
            outputs += _flows(name, sets[name], args.out)
    replays = {
        "bundled": [bundled / "sample.pcap", bundled / "scan.pcap"],
        "syn_flood": sets["syn_flood"],
        "udp_flood": sets["udp_flood"],
    }
    for name, files in replays.items():
        outputs += _replay(name, files, args.out)
    manifest = {p.name: _digest(p) for p in outputs}
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(f"{len(manifest)} outputs in {time.perf_counter() - started:.0f} s -> {args.out}")
    if "ndpi" not in sets:
        print(f"note: {NDPI} is missing: the nDPI corpus was not checked")
    if not args.against:
        return 0
    before = json.loads(args.against.read_text())
    differ = sorted(k for k in before.keys() | manifest.keys() if before.get(k) != manifest.get(k))
    for name in differ:
        print(f"DIFFERS {name}: {before.get(name)} -> {manifest.get(name)}")
    print(f"{len(manifest) - len(differ)} of {len(manifest)} outputs byte-identical")
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
