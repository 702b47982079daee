"""The lab's network: one network namespace per host, veth pairs into two bridges (the office
LAN and the "internet"), a router between them with netem delay, and one capture point: the
LAN bridge, where a sensor would listen.

Every name starts with ``qwl-`` so that teardown finds everything the lab made, and nothing
else. Addresses are the lab's own (10.77.0.0/24 inside, 198.51.100.0/24 outside); no packet
leaves the namespaces. Each host gets its own "personality" (initial TTL, TCP timestamps, SACK,
window scaling) and NIC offloads are off on every veth, so packets from the kernel's stack and
from raw-socket tools (nmap, hping3, masscan) look alike on the wire.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from quietwire.agent.errors import QuietwireError

PREFIX = "qwl-"
SWITCH = f"{PREFIX}switch"  # holds the two bridges; the sensor captures on LAN_BRIDGE here
LAN_BRIDGE = "lan0"
WAN_BRIDGE = "wan0"
LAN_NET = "10.77.0"
WAN_NET = "198.51.100"
ROUTER_LAN = f"{LAN_NET}.1"
ROUTER_WAN = f"{WAN_NET}.1"
ROUTER_LAN_MAC = "02:77:00:00:00:01"  # what hosts outside look like on the LAN
NETEM = ("delay", "20ms", "5ms", "distribution", "normal")  # the internet is some way off


class LabError(QuietwireError):
    """The lab cannot be built or run here (not root, a tool missing, a command failed)."""


@dataclass(frozen=True)
class Host:
    name: str
    ip: str
    role: str  # server, client, admin, internet
    ttl: int = 64
    timestamps: bool = True
    sack: bool = True
    window_scaling: bool = True

    @property
    def ns(self) -> str:
        return PREFIX + self.name

    @property
    def lan(self) -> bool:
        return self.ip.startswith(LAN_NET + ".")

    @property
    def mac(self) -> str:
        """Locally administered, derived from the address so that labels can name it."""
        a = int(IPv4Address(self.ip))
        octets = [0x02, 0x77 if self.lan else 0x51, a >> 24 & 255, a >> 16 & 255, a >> 8 & 255]
        return ":".join(f"{b:02x}" for b in [*octets, a & 255])

    @property
    def gateway(self) -> str:
        return ROUTER_LAN if self.lan else ROUTER_WAN


# Personalities: a Linux default, an older Linux stack, and Windows-like values.
_LINUX = {"ttl": 64}
_OLD = {"ttl": 64, "timestamps": False}
_WINDOWS = {"ttl": 128, "timestamps": False}

HOSTS: tuple[Host, ...] = (
    Host("web", f"{LAN_NET}.10", "server"),
    Host("files", f"{LAN_NET}.11", "server"),
    Host("dc", f"{LAN_NET}.12", "server", **_WINDOWS),
    Host("dns", f"{LAN_NET}.13", "server"),
    Host("admin", f"{LAN_NET}.50", "admin", **_WINDOWS),
    Host("ws01", f"{LAN_NET}.101", "client", **_WINDOWS),
    Host("ws02", f"{LAN_NET}.102", "client", **_WINDOWS),
    Host("ws03", f"{LAN_NET}.103", "client"),
    Host("ws04", f"{LAN_NET}.104", "client", **_OLD),
    Host("ws05", f"{LAN_NET}.105", "client", **_WINDOWS),
    Host("ws06", f"{LAN_NET}.106", "client"),
    Host("www", f"{WAN_NET}.10", "internet"),
    Host("idns", f"{WAN_NET}.53", "internet"),
    Host("tun", f"{WAN_NET}.54", "internet"),
    Host("c2", f"{WAN_NET}.66", "internet"),
    Host("remote", f"{WAN_NET}.200", "internet"),
)
BY_NAME = {h.name: h for h in HOSTS}


def run(*argv: str, ns: str | None = None, check: bool = True, **kw) -> subprocess.CompletedProcess:
    cmd = ["ip", "netns", "exec", ns, *argv] if ns else list(argv)
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr.strip()[-400:]}")
    return proc


def require_root_and_tools(tools: list[str]) -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, veth pairs, bridges)")
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise LabError(
            f"missing programs: {', '.join(missing)} (quietwire lab install installs them)"
        )


def namespaces() -> list[str]:
    out = run("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)]


def teardown() -> None:
    """Kill every process in the lab's namespaces, then delete them (and their veths)."""
    for ns in namespaces():
        pids = run("ip", "netns", "pids", ns, check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
    time.sleep(0.2 if namespaces() else 0)
    for ns in namespaces():
        run("ip", "netns", "del", ns, check=False)
        shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)


def _offloads_off(dev: str, ns: str) -> None:
    # Each feature on its own: a veth may refuse one, which must not keep the others on.
    for feature in ("tx", "rx", "tso", "gso", "gro", "sg"):
        run("ethtool", "-K", dev, feature, "off", ns=ns, check=False)


def _sysctl(ns: str, **values: int) -> None:
    for key, value in values.items():
        run("sysctl", "-qw", f"{key.replace('__', '.')}={value}", ns=ns, check=False)


def _new_ns(ns: str) -> None:
    run("ip", "netns", "add", ns)
    run("ip", "link", "set", "lo", "up", ns=ns)
    _sysctl(
        ns,
        net__ipv6__conf__all__disable_ipv6=1,
        net__ipv6__conf__default__disable_ipv6=1,
    )


def _plug(ns: str, dev: str, bridge: str, mac: str, cidr: str) -> None:
    """A veth from ``ns`` (as ``dev``) into ``bridge`` in the switch namespace."""
    peer = "v" + mac.replace(":", "")  # 13 characters: under IFNAMSIZ
    run(
        "ip",
        "link",
        "add",
        dev,
        "netns",
        ns,
        "address",
        mac,
        "type",
        "veth",
        "peer",
        peer,
        "netns",
        SWITCH,
    )
    run("ip", "link", "set", peer, "master", bridge, "up", ns=SWITCH)
    run("ip", "addr", "add", cidr, "dev", dev, ns=ns)
    run("ip", "link", "set", dev, "up", ns=ns)
    _offloads_off(dev, ns)
    _offloads_off(peer, SWITCH)


def build(workdir: Path) -> dict:
    """The switch, the router and every host, with per-namespace resolv.conf and krb5.conf;
    returns facts for the run's metadata."""
    teardown()
    _new_ns(SWITCH)
    for bridge in (LAN_BRIDGE, WAN_BRIDGE):
        run(
            "ip",
            "link",
            "add",
            bridge,
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
            ns=SWITCH,
        )
        run("ip", "link", "set", bridge, "up", ns=SWITCH)
        _offloads_off(bridge, SWITCH)
    router = f"{PREFIX}router"
    _new_ns(router)
    _sysctl(router, net__ipv4__ip_forward=1)
    _plug(router, "lan", LAN_BRIDGE, ROUTER_LAN_MAC, f"{ROUTER_LAN}/24")
    _plug(router, "wan", WAN_BRIDGE, "02:51:00:00:00:01", f"{ROUTER_WAN}/24")
    # netem is a kernel module that some kernels (minimal VM kernels) lack: the lab still
    # runs, without the added delay, and the run's metadata says so.
    netem = run("tc", "qdisc", "add", "dev", "wan", "root", "netem", *NETEM, ns=router, check=False)
    for host in HOSTS:
        _new_ns(host.ns)
        bridge = LAN_BRIDGE if host.lan else WAN_BRIDGE
        _plug(host.ns, "eth0", bridge, host.mac, f"{host.ip}/24")
        run("ip", "route", "add", "default", "via", host.gateway, ns=host.ns)
        _sysctl(
            host.ns,
            net__ipv4__ip_default_ttl=host.ttl,
            net__ipv4__tcp_timestamps=int(host.timestamps),
            net__ipv4__tcp_sack=int(host.sack),
            net__ipv4__tcp_window_scaling=int(host.window_scaling),
        )
        etc = Path("/etc/netns") / host.ns
        etc.mkdir(parents=True, exist_ok=True)
        resolver = BY_NAME["dns"].ip if host.lan else BY_NAME["idns"].ip
        (etc / "resolv.conf").write_text(f"nameserver {resolver}\nsearch lab.example\n")
        (etc / "krb5.conf").write_text(KRB5_CONF)
        (etc / "hosts").write_text(HOSTS_FILE)
    # `ip netns exec` bind-mounts each of these over its /etc namesake, which must exist.
    for name in ("resolv.conf", "krb5.conf", "hosts"):
        (Path("/etc") / name).touch(exist_ok=True)
    return {"wan_delay": " ".join(NETEM) if netem.returncode == 0 else None}


KRB5_CONF = """[libdefaults]
    default_realm = LAB.EXAMPLE
    dns_lookup_realm = false
    dns_lookup_kdc = false
    rdns = false
[realms]
    LAB.EXAMPLE = {
        kdc = 10.77.0.12
        admin_server = 10.77.0.12
    }
[domain_realm]
    .lab.example = LAB.EXAMPLE
    lab.example = LAB.EXAMPLE
"""

HOSTS_FILE = (
    "127.0.0.1 localhost\n"
    + "".join(f"{h.ip} {h.name}.lab.example {h.name}\n" for h in HOSTS if h.lan)
    + f"{LAN_NET}.12 lab.example\n"
)
