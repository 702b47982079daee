"""A flow's identity as text, the way operators read it in Suricata EVE and Zeek logs: protocol
names, addresses (each distinct one formatted once) and ISO 8601 UTC times."""

from __future__ import annotations

import functools
import ipaddress
from datetime import UTC, datetime

import numpy as np

PROTO_NAMES = {1: "ICMP", 6: "TCP", 17: "UDP", 58: "IPv6-ICMP", 132: "SCTP"}


def format_ips(version: np.ndarray, hi: np.ndarray, lo: np.ndarray) -> list[str]:
    """Text addresses (dotted quad for IPv4, RFC 5952 for IPv6), each distinct one formatted
    once."""
    text, inverse = ip_codes(version, hi, lo)
    return [text[i] for i in inverse.tolist()]


def ip_codes(version: np.ndarray, hi: np.ndarray, lo: np.ndarray) -> tuple[list[str], np.ndarray]:
    """The distinct addresses as text, and each row's index into them."""
    if len(version) and (version == 4).all():  # the common case: a 1-D unique, no ipaddress
        uniq, inverse = np.unique(lo, return_inverse=True)
        text = [f"{a >> 24 & 255}.{a >> 16 & 255}.{a >> 8 & 255}.{a & 255}" for a in uniq.tolist()]
        return text, inverse.reshape(-1)
    keys = np.stack([hi, lo, version.astype(np.uint64)], axis=1)
    uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
    text = [
        str(ipaddress.IPv4Address(low & 0xFFFFFFFF))
        if v == 4
        else str(ipaddress.IPv6Address((h << 64) | low))
        for h, low, v in uniq.tolist()
    ]
    return text, inverse.reshape(-1)


@functools.lru_cache(maxsize=4096)
def utc_second(t: int) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def iso_times(ns: np.ndarray) -> list[str]:
    """ISO 8601 UTC timestamps with microseconds (EVE's format)."""
    seconds, micros = np.divmod(ns // 1000, 1_000_000)
    uniq, inverse = np.unique(seconds, return_inverse=True)
    stamps = [utc_second(t) for t in uniq.tolist()]
    return [
        f"{stamps[i]}.{us:06d}+0000" for i, us in zip(inverse.reshape(-1).tolist(), micros.tolist())
    ]
