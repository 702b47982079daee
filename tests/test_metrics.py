"""The metrics endpoint under hostile clients: idle and half-open connections (plain and TLS)
delay no scrape, the connection cap holds, reads time out, basic auth needs TLS (or an explicit
opt-in), and a port in use is named."""

from __future__ import annotations

import base64
import hashlib
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from quietwire.agent.service.metrics import (
    Metrics,
    MetricsServer,
    MetricsServerError,
    ServerSettings,
)
from quietwire.cli import main

from .conftest import free_port


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 (openssl writes it)."""
    if not shutil.which("openssl"):
        pytest.fail("openssl is needed to make a test certificate (apt-get install openssl)")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(d / "key.pem"),
            "-out",
            str(d / "cert.pem"),
        ],
        check=True,
        capture_output=True,
    )
    return d / "cert.pem", d / "key.pem"


def get(port: int, tls_cert=None, auth: str | None = None, timeout: float = 5) -> bytes:
    scheme = "https" if tls_cert else "http"
    req = urllib.request.Request(f"{scheme}://127.0.0.1:{port}/metrics")
    if auth:
        req.add_header("Authorization", auth)
    ctx = ssl.create_default_context(cafile=str(tls_cert)) if tls_cert else None
    return urllib.request.urlopen(req, timeout=timeout, context=ctx).read()


def timed_scrape(port: int, tls_cert=None) -> float:
    started = time.monotonic()
    assert b"quietwire_build_info" in get(port, tls_cert)
    return time.monotonic() - started


@pytest.fixture
def serve(cert):
    servers = []

    def start(tls: bool = False, **kw) -> MetricsServer:
        if tls:
            kw.update(tls_cert=str(cert[0]), tls_key=str(cert[1]))
        server = MetricsServer(Metrics(), ServerSettings(port=0, **kw))
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.close()


def hostile_clients(port: int) -> list[socket.socket]:
    """Three idle connections and two half-open ones: a partial request line and, for TLS,
    the first bytes of a ClientHello (for plain HTTP, garbage that never ends its line)."""
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
    socks[3].sendall(b"GET /metr")
    socks[4].sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    return socks


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_idle_and_half_open_connections_delay_no_scrape(serve, cert, tls):
    server = serve(tls=tls)
    socks = hostile_clients(server.port)
    try:
        time.sleep(0.2)  # let the server accept them all first
        seconds = [timed_scrape(server.port, cert[0] if tls else None) for _ in range(3)]
        print(f"{'TLS' if tls else 'plain'}: scrapes with 5 idle/half-open clients: {seconds}")
        assert max(seconds) < 1.0
    finally:
        for s in socks:
            s.close()


def test_connection_cap_holds_and_idle_clients_time_out(serve):
    server = serve(max_connections=2, timeout_s=1.0)
    a = socket.create_connection(("127.0.0.1", server.port))
    b = socket.create_connection(("127.0.0.1", server.port))
    time.sleep(0.2)
    # a third connection, over the cap, is closed at once
    c = socket.create_connection(("127.0.0.1", server.port))
    c.settimeout(0.5)
    assert c.recv(1) == b""
    assert server.refused == 1
    # the idle ones are dropped after the read timeout, and the slots come back
    a.settimeout(3)
    started = time.monotonic()
    assert a.recv(1) == b""
    assert 0.5 < time.monotonic() - started < 2.5
    time.sleep(0.2)
    assert timed_scrape(server.port) < 1.0
    for s in (a, b, c):
        s.close()


def test_tls_handshake_that_never_comes_times_out(serve, cert):
    server = serve(tls=True, timeout_s=0.5)
    idle = socket.create_connection(("127.0.0.1", server.port))
    idle.settimeout(3)
    started = time.monotonic()
    assert idle.recv(1) == b""  # dropped without a handshake
    assert time.monotonic() - started < 2.0
    idle.close()
    assert timed_scrape(server.port, cert[0]) < 1.0


def test_basic_auth(serve, cert):
    digest = hashlib.sha256(b"s3cret").hexdigest()
    with pytest.raises(ValueError, match="clear text"):
        ServerSettings(username="prom", password_sha256=digest)
    server = serve(tls=True, username="prom", password_sha256=digest)
    good = "Basic " + base64.b64encode(b"prom:s3cret").decode()
    bad = "Basic " + base64.b64encode(b"prom:wrong").decode()
    with pytest.raises(urllib.error.HTTPError, match="401"):
        get(server.port, cert[0])
    with pytest.raises(urllib.error.HTTPError, match="401"):
        get(server.port, cert[0], bad)
    assert b"quietwire_build_info" in get(server.port, cert[0], good)
    # plain HTTP only when the operator says so
    plain = serve(username="prom", password_sha256=digest, allow_plaintext_auth=True)
    with pytest.raises(urllib.error.HTTPError, match="401"):
        get(plain.port)
    assert b"quietwire_build_info" in get(plain.port, auth=good)


def test_address_in_use_names_address_and_port(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsServerError, match=f"cannot listen on 127.0.0.1:{port}"):
            MetricsServer(Metrics(), ServerSettings(port=port))
        assert main(["replay", "--serve-metrics", f"127.0.0.1:{port}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [
            f"quietwire: error: metrics: cannot listen on 127.0.0.1:{port}: Address already in use"
        ]


def test_bad_certificate_is_one_line(tmp_path):
    bogus = tmp_path / "cert.pem"
    bogus.write_text("not a certificate\n")
    with pytest.raises(MetricsServerError, match=f"cannot load tls_cert {bogus}"):
        MetricsServer(
            Metrics(),
            ServerSettings(port=free_port(), tls_cert=str(bogus), tls_key=str(bogus)),
        )


def test_bulk_histogram_matches_prometheus_client():
    """The score histogram counts a batch with numpy; its exposition must be what
    prometheus_client's Histogram gives for the same values one by one."""
    import numpy as np
    from prometheus_client import CollectorRegistry, Histogram
    from prometheus_client.exposition import generate_latest

    from quietwire.agent.service.metrics import SCORE_BUCKETS, BulkHistogram

    values = np.r_[np.random.default_rng(0).gamma(2.0, 20.0, 5000), 1.0, 300.0, -2.0, 1e9]
    one, bulk = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("s", "d", buckets=SCORE_BUCKETS, registry=one)
    for v in values.tolist():
        reference.observe(v)
    mine = BulkHistogram("s", "d", SCORE_BUCKETS, registry=bulk)
    mine.observe_many(values[:1000])
    mine.observe_many(values[1000:])

    def samples(registry):
        text = generate_latest(registry).decode().splitlines()
        out = dict(x.rsplit(" ", 1) for x in text if x.startswith(("s_bucket", "s_count", "s_sum")))
        return {k: float(v) for k, v in out.items()}

    mine_s, ref_s = samples(bulk), samples(one)
    assert mine_s["s_sum"] == pytest.approx(ref_s.pop("s_sum"), rel=1e-12)
    del mine_s["s_sum"]
    assert mine_s == ref_s and len(ref_s) == len(SCORE_BUCKETS) + 2
