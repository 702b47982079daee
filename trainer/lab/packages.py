"""The programs the lab runs: Debian packages and PyPI's impacket (its example scripts are the
attack tools for Active Directory). ``quietwire lab install`` installs them."""

from __future__ import annotations

import os
import subprocess
import sys

DEBIAN = (
    # servers
    "samba",
    "samba-ad-dc",
    "samba-ad-provision",
    "samba-dsdb-modules",
    "samba-vfs-modules",
    "winbind",
    "krb5-user",
    "nginx",
    "openssh-server",
    "vsftpd",
    "dnsmasq-base",
    "iodine",
    # clients
    "smbclient",
    "ldap-utils",
    "openssh-client",
    "curl",
    "wget",
    "lftp",
    "bind9-dnsutils",
    "iputils-ping",
    # attack tools
    "nmap",
    "masscan",
    "hydra",
    "medusa",
    "hping3",
    "slowhttptest",
    "sqlmap",
    # the network and the capture
    "iproute2",
    "ethtool",
    "tcpdump",
    "openssl",
    "procps",
)
PYPI = ("impacket>=0.12",)  # as the lab extra in pyproject.toml


def commands() -> list[list[str]]:
    env = ["env", "DEBIAN_FRONTEND=noninteractive"]
    return [
        ["apt-get", "update", "-qq"],
        [*env, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *DEBIAN],
        [sys.executable, "-m", "pip", "install", "-q", *PYPI],
    ]


def install(dry_run: bool = False) -> int:
    """Install what the lab needs; the package scripts may not start the servers (the lab
    starts its own in namespaces)."""
    for argv in commands():
        print(" ".join(argv), flush=True)
    if dry_run:
        return 0
    if os.geteuid() != 0:
        print("quietwire: error: installing the lab's packages needs root", file=sys.stderr)
        return 2
    policy = "/usr/sbin/policy-rc.d"
    had_policy = os.path.exists(policy)
    if not had_policy:
        with open(policy, "w") as f:
            f.write("#!/bin/sh\nexit 101\n")
        os.chmod(policy, 0o755)
    try:
        for argv in commands():
            if subprocess.run(argv).returncode != 0:
                print(f"quietwire: error: {' '.join(argv[:3])} failed", file=sys.stderr)
                return 1
    finally:
        if not had_policy:
            os.unlink(policy)
    return 0
