"""The lab's servers, each a real program in its host's namespace: nginx in front of a small
web application, OpenSSH and vsftpd on the file server, a Samba Active Directory domain
controller, dnsmasq as the office resolver (the AD zone to the DC, a delegated zone to the
"internet" tunnel server, the rest to an internet DNS server), and on the internet side a
download/upload server, a C2 server (HTTPS, self-signed) and iodined.

The domain is provisioned once and cached (``cache``); each run works on a copy.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from quietwire.trainer.lab.topology import BY_NAME, LabError, run

REALM = "LAB.EXAMPLE"
DOMAIN = "LAB"
ADMIN_PASSWORD = "Adm1n!Passw0rd"
TUNNEL_ZONE = "tunnel.example"
TUNNEL_PASSWORD = "tunnelpass"


@dataclass(frozen=True)
class User:
    name: str
    password: str


# Lab accounts: the same names on the file server (unix) and in the domain. bob's password is
# in the attackers' word list (found by brute force); the others are not.
USERS = (
    User("alice", "Wint3r-is-c0ming!"),
    User("bob", "sunshine1"),
    User("carol", "Gr33n-T3a-Pot"),
    User("dave", "Bl4ck-C0ffee-77"),
)
SERVICE_ACCOUNT = User("svc_sql", "SqlS3rvice-2024")  # has an SPN: Kerberoastable
NO_PREAUTH = User("legacy", "Legacy-Acct-99")  # no Kerberos pre-authentication: AS-REP roastable
SPN = "MSSQLSvc/sql.lab.example:1433"


def _python() -> str:
    return sys.executable


class Services:
    def __init__(self, workdir: Path, cache: Path) -> None:
        self.workdir = workdir
        self.cache = cache
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def _spawn(self, host: str, argv: list[str], name: str) -> None:
        log = (self.workdir / "logs" / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", BY_NAME[host].ns, *argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.procs.append((name, proc))

    def start(self) -> None:
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        unix_users()
        self._dc()
        self._resolvers()
        self._web()
        self._files()
        self._internet()
        self.wait_ready()

    def stop(self) -> None:
        for _, proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for _, proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()

    # --- readiness
    def wait_ready(self, timeout_s: float = 60.0) -> None:
        checks = [
            ("web", 80, "tcp"),
            ("files", 22, "tcp"),
            ("files", 21, "tcp"),
            ("dc", 88, "tcp"),
            ("dc", 445, "tcp"),
            ("dc", 389, "tcp"),
            ("www", 80, "tcp"),
            ("www", 443, "tcp"),
            ("c2", 443, "tcp"),
        ]
        deadline = time.monotonic() + timeout_s
        for host, port, _ in checks:
            while not _listening(host, port):
                dead = [n for n, p in self.procs if p.poll() is not None]
                if dead or time.monotonic() > deadline:
                    raise LabError(
                        f"{host}:{port} is not listening after {timeout_s:.0f} s"
                        + (
                            f" (exited: {', '.join(dead)}; logs in {self.workdir / 'logs'})"
                            if dead
                            else ""
                        )
                    )
                time.sleep(0.3)

    # --- the domain controller
    def _dc(self) -> None:
        template = provision_domain(self.cache)
        dc = self.workdir / "dc"
        shutil.copytree(template, dc, symlinks=True)
        conf = dc / "etc" / "smb.conf"
        conf.write_text(conf.read_text().replace(str(template), str(dc)))
        self._spawn("dc", ["samba", "-i", "-s", str(conf)], "samba")

    # --- DNS: the office resolver and the internet's servers
    def _resolvers(self) -> None:
        d = self.workdir
        lan = d / "dnsmasq-lan.conf"
        lan.write_text(
            "no-resolv\nno-hosts\nbind-interfaces\nlisten-address=10.77.0.13\n"
            "server=/lab.example/10.77.0.12\n"
            f"server=/{TUNNEL_ZONE}/{BY_NAME['tun'].ip}\n"
            f"server={BY_NAME['idns'].ip}\ncache-size=500\n"
        )
        self._spawn("dns", ["dnsmasq", "-k", "-C", str(lan), "--pid-file="], "dnsmasq-lan")
        www = BY_NAME["www"].ip
        wan = d / "dnsmasq-internet.conf"
        names = ("example.com", "cdn.example", "updates.example", "cloud.example", "news.example")
        wan.write_text(
            "no-resolv\nno-hosts\nbind-interfaces\n"
            f"listen-address={BY_NAME['idns'].ip}\n"
            + "".join(f"address=/{n}/{www}\n" for n in names)
            + "".join(f"mx-host={n},mail.{n},10\n" for n in names)
            + "".join(f'txt-record={n},"v=spf1 include:{n} -all"\n' for n in names)
            + f"address=/c2-update.example/{BY_NAME['c2'].ip}\n"
            # every other name is answered NXDOMAIN, as the internet would
            "address=/#/\n"
        )
        self._spawn("idns", ["dnsmasq", "-k", "-C", str(wan), "--pid-file="], "dnsmasq-wan")
        self._spawn(
            "tun",
            [
                "iodined",
                "-f",
                "-c",
                "-P",
                TUNNEL_PASSWORD,
                "-l",
                BY_NAME["tun"].ip,
                "10.99.0.1",
                TUNNEL_ZONE,
            ],
            "iodined",
        )

    # --- the web server
    def _web(self) -> None:
        d = self.workdir / "web"
        (d / "static").mkdir(parents=True, exist_ok=True)
        for i in range(8):
            (d / "static" / f"asset{i}.css").write_bytes(
                b"/* asset */\n" + b"a{}\n" * (300 * i + 50)
            )
        (d / "static" / "logo.png").write_bytes(bytes(range(256)) * 40)
        conf = d / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=d))
        self._spawn(
            "web",
            [
                _python(),
                "-m",
                "quietwire.trainer.lab.webapp",
                "--port",
                "8080",
                "--db",
                str(d / "shop.db"),
            ],
            "webapp",
        )
        self._spawn("web", ["nginx", "-c", str(conf), "-g", "daemon off;"], "nginx")

    # --- the file server: OpenSSH and vsftpd
    def _files(self) -> None:
        d = self.workdir / "files"
        d.mkdir(parents=True, exist_ok=True)
        key = d / "ssh_host_ed25519_key"
        if not key.exists():
            run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
        sshd = d / "sshd_config"
        sshd.write_text(
            f"ListenAddress {BY_NAME['files'].ip}\nHostKey {key}\nPasswordAuthentication yes\n"
            "KbdInteractiveAuthentication no\nUsePAM yes\nPermitRootLogin no\n"
            f"PidFile {d}/sshd.pid\nMaxStartups 100:30:200\nMaxAuthTries 6\nLoginGraceTime 20\n"
            "Subsystem sftp internal-sftp\n"
        )
        Path("/run/sshd").mkdir(exist_ok=True)
        self._spawn("files", ["/usr/sbin/sshd", "-D", "-e", "-f", str(sshd)], "sshd")
        ftp = d / "vsftpd.conf"
        Path("/var/run/vsftpd/empty").mkdir(parents=True, exist_ok=True)
        ftp.write_text(
            "listen=YES\nlisten_ipv6=NO\nbackground=NO\nanonymous_enable=NO\nlocal_enable=YES\n"
            "write_enable=YES\nlocal_umask=022\npam_service_name=vsftpd\nseccomp_sandbox=NO\n"
            f"listen_address={BY_NAME['files'].ip}\npasv_min_port=40000\npasv_max_port=40100\n"
            "secure_chroot_dir=/var/run/vsftpd/empty\nutf8_filesystem=YES\n"
        )
        self._spawn("files", ["vsftpd", str(ftp)], "vsftpd")

    # --- the internet: downloads and uploads, C2
    def _internet(self) -> None:
        d = self.workdir / "internet"
        d.mkdir(parents=True, exist_ok=True)
        cert, key = d / "cert.pem", d / "key.pem"
        run(
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "30",
            "-subj",
            "/CN=cdn.example",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        )
        serve = [
            _python(),
            "-m",
            "quietwire.trainer.lab.inetserver",
            "--cert",
            str(cert),
            "--key",
            str(key),
        ]
        self._spawn("www", [*serve, "--role", "www"], "www")
        self._spawn("c2", [*serve, "--role", "c2"], "c2")


def _listening(host: str, port: int) -> bool:
    proc = run("ss", "-Hltn", f"sport = :{port}", ns=BY_NAME[host].ns, check=False)
    return bool(proc.stdout.strip())


def unix_users() -> None:
    """The lab's accounts on this machine (the file server's users): create once."""
    for user in USERS:
        if run("id", user.name, check=False).returncode != 0:
            run("useradd", "-m", "-s", "/bin/bash", user.name)
        run("chpasswd", input=f"{user.name}:{user.password}\n")
        home = Path("/home") / user.name
        (home / "data").mkdir(exist_ok=True)
        shutil.chown(home / "data", user.name, user.name)


def provision_domain(cache: Path) -> Path:
    """The Samba AD domain (users, an SPN, an account without pre-authentication), made once
    into ``cache`` and reused: provisioning takes seconds, copying it less."""
    target = cache / "dc-template"
    if (target / "ready").exists():
        return target
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    dc = BY_NAME["dc"].ip
    run(
        "samba-tool",
        "domain",
        "provision",
        f"--realm={REALM}",
        f"--domain={DOMAIN}",
        "--server-role=dc",
        "--dns-backend=SAMBA_INTERNAL",
        f"--adminpass={ADMIN_PASSWORD}",
        f"--targetdir={target}",
        "--host-name=dc",
        f"--host-ip={dc}",
        "--option=bind interfaces only = yes",
        f"--option=interfaces = {dc}",
        f"--option=dns forwarder = {BY_NAME['dns'].ip}",
        f"--option=pid directory = {target}/run",
        f"--option=ncalrpc dir = {target}/run/ncalrpc",
        f"--option=log file = {target}/log.%m",
        "--option=rpc server dynamic port range = 49152-49300",
    )
    conf = target / "etc" / "smb.conf"
    text = conf.read_text()
    share = target / "share"
    share.mkdir()
    share.chmod(0o1777)
    # simple LDAP binds without TLS, as many office tools still do
    text = text.replace("[global]\n", "[global]\n\tldap server require strong auth = no\n", 1)
    conf.write_text(text + f"\n[files]\n\tpath = {share}\n\tread only = No\n")
    # an office whose policy lets a weak password through (the brute force finds it)
    run(
        "samba-tool",
        "domain",
        "passwordsettings",
        "set",
        "--complexity=off",
        "--min-pwd-length=6",
        "-s",
        str(conf),
    )
    for user in (*USERS, SERVICE_ACCOUNT, NO_PREAUTH):
        run("samba-tool", "user", "create", user.name, user.password, "-s", str(conf))
    run("samba-tool", "spn", "add", SPN, SERVICE_ACCOUNT.name, "-s", str(conf))
    # UF_DONT_REQUIRE_PREAUTH through Samba's own module stack (the system Python's samba)
    run(
        "/usr/bin/python3",
        "-c",
        "import sys; from samba.samdb import SamDB; from samba.auth import system_session; "
        "from samba.param import LoadParm; lp = LoadParm(); lp.load(sys.argv[1]); "
        "db = SamDB(url=lp.samdb_url(), session_info=system_session(), lp=lp); "
        "db.toggle_userAccountFlags('(sAMAccountName=%s)' % sys.argv[2], 0x400000, on=True)",
        str(conf),
        NO_PREAUTH.name,
    )
    (target / "run").mkdir(exist_ok=True)
    (target / "ready").write_text("")
    return target


NGINX_CONF = """worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 1024; }}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/tmp_body;
    proxy_temp_path {dir}/tmp_proxy;
    fastcgi_temp_path {dir}/tmp_fcgi;
    uwsgi_temp_path {dir}/tmp_uwsgi;
    scgi_temp_path {dir}/tmp_scgi;
    keepalive_timeout 30;
    client_body_timeout 30s;
    client_header_timeout 30s;
    server {{
        listen 10.77.0.10:80;
        location /static/ {{ alias {dir}/static/; }}
        location / {{ proxy_pass http://127.0.0.1:8080; proxy_http_version 1.1; }}
    }}
}}
"""
