"""Parse the per-flow lines of nDPI's result files (../shared/data/ndpi/result/*.out)."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

LINE = re.compile(
    r"^\t\d+\t(\w+) (\S+) (?:<->|->) (\S+) .*?"
    r"\[(\d+) pkts/(\d+) bytes (?:<->|->) (\d+) pkts/(\d+) bytes\]"
)


def _endpoint(text: str):
    addr, port = text[1:].rsplit("]:", 1) if text.startswith("[") else text.rsplit(":", 1)
    return ipaddress.ip_address(addr), int(port)


def ndpi_flows(path: Path) -> list[tuple]:
    """(proto, client, cport, server, sport, c2s_pkts, c2s_bytes, s2c_pkts, s2c_bytes) for
    each TCP/UDP flow nDPI listed; lines whose addresses nDPI printed garbled are left out."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        m = LINE.match(line)
        if not m or m.group(1) not in ("TCP", "UDP"):
            continue
        try:
            (a, pa), (b, pb) = _endpoint(m.group(2)), _endpoint(m.group(3))
        except ValueError:
            continue
        out.append((m.group(1), a, pa, b, pb, *map(int, m.group(4, 5, 6, 7))))
    return out
