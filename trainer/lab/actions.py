"""What the lab's hosts do: one entry per kind of activity, each a real program's command line
run in the actor's namespace; the benign work here, the attacks in attacks.py.

An ``Action`` says which tool it runs, who may run it, which hosts it talks to (the labeller
follows the actor's packets to those targets), the ATT&CK technique for attacks, and how to
read the tool's outcome (success, attempted, failed) from its exit status and output.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from quietwire.trainer.lab.services import (
    ADMIN_PASSWORD,
    USERS,
)
from quietwire.trainer.lab.topology import BY_NAME

WEB, FILES, DC, DNS = (BY_NAME[n].ip for n in ("web", "files", "dc", "dns"))
WWW, C2, TUN = BY_NAME["www"].ip, BY_NAME["c2"].ip, BY_NAME["tun"].ip
WORDS = [
    "123456",
    "password",
    "letmein",
    "qwerty",
    "dragon",
    "monkey",
    "football",
    "iloveyou",
    "admin",
    "welcome",
    "abc123",
    "master",
    "shadow",
    "sunshine",
    "princess",
    "trustno1",
    "baseball",
    "superman",
    "michael",
    "sunshine1",
    "batman",
    "hunter2",
    "starwars",
    "summer",
]


@dataclass(frozen=True)
class Context:
    """What a command line needs: the run's folder and the tools' places."""

    workdir: Path
    rng: random.Random
    duration_s: float  # the time the schedule gives this event

    def file(self, name: str, size: int) -> Path:
        return _once(self.workdir / "payload" / name, lambda: random.Random(size).randbytes(size))

    @property
    def words(self) -> Path:
        return _once(self.workdir / "words.txt", lambda: ("\n".join(WORDS) + "\n").encode())


def _once(path: Path, content: Callable[[], bytes]) -> Path:
    """Write ``path`` if it is missing, whole or not at all: hosts run on their own threads,
    and one must never send another's half-written file."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{threading.get_ident()}")
        tmp.write_bytes(content())
        os.replace(tmp, path)
    return path


Command = Callable[[Context, str], list[str]]  # (context, actor name) -> argv
Outcome = Callable[[int, str], str]  # (exit status, output) -> success/attempted/failed


def by_exit(rc: int, out: str) -> str:
    return "success" if rc == 0 else "failed"


def found(pattern: str, otherwise: str = "attempted") -> Outcome:
    """success when the tool's output matches ``pattern`` (a regular expression, any case)."""
    regex = re.compile(pattern, re.IGNORECASE)
    return lambda rc, out: "success" if regex.search(out) else otherwise


@dataclass(frozen=True)
class Action:
    kind: str  # "benign" or the attack's name
    tool: str  # the program on the wire (its --version goes into the events)
    command: Command
    targets: tuple[str, ...]  # addresses or CIDRs the actor's packets go to
    technique: str = ""  # ATT&CK id (attacks)
    actors: tuple[str, ...] = ()  # who may run it (empty: see actors_of)
    outcome: Outcome = by_exit
    relays: tuple[tuple[str, str], ...] = ()  # (from, to) flows another host makes for it
    spoofed: bool = False  # forged source addresses: follow the actor's MAC only
    min_s: float = 5.0  # the shortest slot it needs
    activity: str = ""  # the benign activity's name

    @property
    def name(self) -> str:
        return self.activity or self.kind

    @property
    def attack(self) -> bool:
        return self.kind != "benign"


def sh(script: str) -> list[str]:
    return ["sh", "-c", script]


def _impacket(script: str) -> str:
    found_script = shutil.which(script) or str(Path(sys.executable).parent / script)
    return found_script


def _user(ctx: Context):
    return ctx.rng.choice(USERS[:1] + USERS[2:])  # not bob: his password is the weak one


def _key(ctx: Context, user: str) -> str:
    return str(ctx.workdir / "keys" / user)


SSH = [
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
    "-o",
    "BatchMode=yes",
    "-o",
    "LogLevel=ERROR",
    "-o",
    "ConnectTimeout=10",
]


def _krb(actor: str) -> str:
    return f"KRB5CCNAME=FILE:/tmp/qwl-krb5cc-{actor}"


# --- benign work ------------------------------------------------------------------------
def _browse(ctx: Context, actor: str) -> list[str]:
    r = ctx.rng
    urls = [f"http://{WEB}/"] + [
        f"http://{WEB}/static/asset{r.randrange(8)}.css" for _ in range(r.randint(1, 4))
    ]
    urls += [
        f"http://{WEB}/search?q=item+{r.randint(1, 60)}",
        f"http://{WEB}/item?id={r.randint(1, 60)}",
    ]
    if r.random() < 0.3:
        urls.append(f"http://{WEB}/static/logo.png")
    return ["curl", "-s", "-o", "/dev/null", "--max-time", "20", *urls]


def _download(ctx: Context, actor: str) -> list[str]:
    size = int(ctx.rng.lognormvariate(12, 1.5))
    scheme = ctx.rng.choice(["http", "https"])
    return [
        "wget",
        "-q",
        "-O",
        "/dev/null",
        "--no-check-certificate",
        "-T",
        "30",
        f"{scheme}://updates.example/file/{size}",
    ]


def _news(ctx: Context, actor: str) -> list[str]:
    return [
        "curl",
        "-sk",
        "-o",
        "/dev/null",
        "--max-time",
        "20",
        f"https://{ctx.rng.choice(['news.example', 'cdn.example', 'example.com'])}/",
    ]


def _lookups(ctx: Context, actor: str) -> list[str]:
    r = ctx.rng
    names = [
        "A",
        "www.example.com",
        "MX",
        "cdn.example",
        "TXT",
        "updates.example",
        "A",
        f"host{r.randint(1, 99)}.nonexistent.example",
        "A",
        "dc.lab.example",
        "SRV",
        "_ldap._tcp.lab.example",
    ]
    return ["dig", "+tries=1", "+time=3", f"@{DNS}", *names]


def _ssh(ctx: Context, actor: str) -> list[str]:
    user = _user(ctx).name
    wait = max(1, int(ctx.duration_s * ctx.rng.uniform(0.2, 0.8)))
    cmd = f"uname -a; ls -la; df -h; sleep {wait}; ps aux | head -20"
    return ["ssh", *SSH, "-i", _key(ctx, user), f"{user}@{FILES}", cmd]


def _long_session(ctx: Context, actor: str) -> list[str]:
    user = _user(ctx).name
    n = max(2, int(ctx.duration_s / 4))
    return [
        "ssh",
        *SSH,
        "-i",
        _key(ctx, user),
        f"{user}@{FILES}",
        f"for i in $(seq {n}); do date; uptime; sleep 3; done",
    ]


def _scp(ctx: Context, actor: str) -> list[str]:
    user = _user(ctx).name
    src = ctx.file(f"doc{ctx.rng.randint(1, 5)}.bin", ctx.rng.choice([20_000, 150_000, 900_000]))
    if ctx.rng.random() < 0.5:
        return ["scp", *SSH, "-i", _key(ctx, user), str(src), f"{user}@{FILES}:data/"]
    return ["scp", *SSH, "-i", _key(ctx, user), f"{user}@{FILES}:/etc/services", "/dev/null"]


def _ftp(ctx: Context, actor: str) -> list[str]:
    user = _user(ctx)
    src = ctx.file(f"report{ctx.rng.randint(1, 3)}.bin", ctx.rng.choice([40_000, 300_000]))
    return [
        "lftp",
        "-u",
        f"{user.name},{user.password}",
        "-e",
        f"set net:timeout 10; set net:max-retries 1; cd data; put {src}; ls; get "
        f"{src.name} -o /dev/null; bye",
        FILES,
    ]


def _smb_copy(ctx: Context, actor: str) -> list[str]:
    user = _user(ctx)
    src = ctx.file(f"sheet{ctx.rng.randint(1, 4)}.bin", ctx.rng.choice([30_000, 250_000]))
    return sh(
        f"export {_krb(actor)}; echo '{user.password}' | kinit {user.name}@LAB.EXAMPLE >/dev/null"
        f" && smbclient //dc.lab.example/files --use-kerberos=required -c "
        f"'put {src} {actor}-{src.name}; ls; get {actor}-{src.name} /dev/null'"
    )


def _ldap(ctx: Context, actor: str) -> list[str]:
    user = _user(ctx)
    return [
        "ldapsearch",
        "-x",
        "-LLL",
        "-o",
        "nettimeout=10",
        "-H",
        f"ldap://{DC}",
        "-D",
        f"{user.name}@lab.example",
        "-w",
        user.password,
        "-b",
        "DC=lab,DC=example",
        "(objectClass=user)",
        "sAMAccountName",
        "mail",
    ]


def _admin_rpc(ctx: Context, actor: str) -> list[str]:
    return [
        "rpcclient",
        "-U",
        f"LAB\\Administrator%{ADMIN_PASSWORD}",
        DC,
        "-c",
        "enumdomusers; enumdomgroups; querydominfo; srvinfo",
    ]


def _admin_ssh(ctx: Context, actor: str) -> list[str]:
    user = USERS[0].name
    return [
        "ssh",
        *SSH,
        "-i",
        _key(ctx, user),
        f"{user}@{FILES}",
        "uptime; free -m; ls /var/log | head; who",
    ]


def _backup(ctx: Context, actor: str) -> list[str]:
    user = USERS[0].name
    src = ctx.file("backup.tar", ctx.rng.choice([4_000_000, 9_000_000]))
    return ["scp", *SSH, "-i", _key(ctx, user), str(src), f"{user}@{FILES}:data/{actor}.tar"]


def _cloud_upload(ctx: Context, actor: str) -> list[str]:
    src = ctx.file("sync.bin", ctx.rng.choice([2_000_000, 6_000_000]))
    return [
        "curl",
        "-sk",
        "-o",
        "/dev/null",
        "--max-time",
        "60",
        "-T",
        str(src),
        f"https://cloud.example/sync/{actor}",
    ]


BENIGN = (
    Action("benign", "curl", _browse, (WEB,), activity="web_browse"),
    Action("benign", "wget", _download, (WWW, DNS), activity="download"),
    Action("benign", "curl", _news, (WWW, DNS), activity="news"),
    Action("benign", "dig", _lookups, (DNS,), activity="dns_lookups"),
    Action("benign", "ssh", _ssh, (FILES,), activity="ssh_session", min_s=8),
    Action("benign", "ssh", _long_session, (FILES,), activity="long_session", min_s=30),
    Action("benign", "scp", _scp, (FILES,), activity="scp_copy"),
    Action("benign", "lftp", _ftp, (FILES,), activity="ftp_transfer"),
    Action("benign", "smbclient", _smb_copy, (DC,), activity="smb_copy"),
    Action("benign", "ldapsearch", _ldap, (DC,), activity="ldap_query"),
    Action("benign", "rpcclient", _admin_rpc, (DC,), actors=("admin",), activity="admin_rpc"),
    Action("benign", "ssh", _admin_ssh, (FILES,), actors=("admin",), activity="admin_ssh"),
    Action(
        "benign", "scp", _backup, (FILES,), actors=("admin", "ws04"), activity="backup", min_s=20
    ),
    Action("benign", "curl", _cloud_upload, (WWW, DNS), activity="cloud_upload", min_s=20),
)


ATTACKERS = ("ws02", "ws03", "ws06")  # also do benign work outside their attacks
CLIENTS = tuple(h.name for h in BY_NAME.values() if h.role in ("client", "admin"))


def actors_of(action: Action) -> tuple[str, ...]:
    """Who may run it: its own list, else the attackers for an attack, the clients for work."""
    return action.actors or (ATTACKERS if action.attack else CLIENTS)
