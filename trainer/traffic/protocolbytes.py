"""Payload bytes for trafficgen's sessions other than plain HTTP (httpbytes.py): TLS records,
SSH banners and key exchange, SMTP commands and replies, DNS answer records, ping payloads.

Each builder fills the packet sizes the generator drew, so a session keeps its sizes and
timing and only its bytes become those of its protocol; SMTP commands are the exception,
being as long as their text (``DATA`` is six bytes whatever was drawn). All randomness comes
from the generator passed in.
"""

from __future__ import annotations

import base64
import struct

import numpy as np

ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
LOWER_ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"
HEX_DIGITS = "0123456789abcdef"
BASE32 = "abcdefghijklmnopqrstuvwxyz234567"
WORDS = (
    "the network report quarterly meeting agenda project update budget review team customer "
    "order invoice delivery schedule product release notes summary office travel policy "
    "security training access account service support ticket status request approval plan "
    "design draft final version data analysis results market sales growth price energy "
    "weather news sport music video photo family holiday garden kitchen recipe book"
).split()


def pick(rng: np.random.Generator, options):
    """One of ``options``, uniformly."""
    return options[int(rng.integers(len(options)))]


def token(rng: np.random.Generator, n: int, alphabet: str) -> str:
    """n characters drawn from ``alphabet``."""
    return "".join(alphabet[i] for i in rng.integers(0, len(alphabet), n))


def words(rng: np.random.Generator, n: int) -> str:
    """n words of ordinary text, space-separated, the first capitalised."""
    text = " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n))
    return text[:1].upper() + text[1:]


# ---- TLS -----------------------------------------------------------------------------------

SUITES = (0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F, 0xC02C, 0xC030, 0xCCA9, 0xCCA8, 0xC013, 0xC014)
SNI_NAMES = (
    "www.example.com",
    "example.org",
    "fonts.example-static.com",
    "api.example.io",
    "login.example-cloud.com",
    "outlook.example-mail.com",
    "updates.vendor.net",
    "cdn.example-static.com",
    "telemetry.vendor.net",
    "shop.example.net",
)


def _ext(kind: int, data: bytes) -> bytes:
    return struct.pack("!HH", kind, len(data)) + data


def _u16s(values) -> bytes:
    return struct.pack(f"!H{len(values)}H", 2 * len(values), *values)


def tls_client_hello(rng: np.random.Generator, size: int, sni: str) -> bytes:
    """A ClientHello record of ``size`` bytes with ``sni`` as its server name: a TLS 1.3
    hello (key share, supported versions, ALPN, ...) and a padding extension that fills it,
    fewer optional extensions where the size is small."""
    host = sni.encode()
    alpn = b"\x02h2\x08http/1.1"
    optional = [
        _ext(0x0033, struct.pack("!HHH", 36, 0x001D, 32) + rng.bytes(32)),  # key_share
        _ext(0x002B, b"\x04\x03\x04\x03\x03"),  # supported_versions
        _ext(0x000D, _u16s([0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601])),
        _ext(0x0010, struct.pack("!H", len(alpn)) + alpn),
        _ext(0x000A, _u16s([0x001D, 0x0017, 0x0018, 0x0019])),  # supported_groups
        _ext(0x000B, b"\x01\x00"),  # ec_point_formats
        _ext(0x0017, b""),  # extended_master_secret
    ]
    sni_ext = _ext(0x0000, struct.pack("!HBH", len(host) + 3, 0, len(host)) + host)
    random, session = rng.bytes(32), rng.bytes(32)

    def record(exts: list[bytes], sid: int) -> bytes:
        body = (
            b"\x03\x03"
            + random
            + bytes([sid])
            + session[:sid]
            + _u16s(list(SUITES))
            + b"\x01\x00"
            + struct.pack("!H", sum(map(len, exts)))
            + b"".join(exts)
        )
        hs = b"\x01" + len(body).to_bytes(3, "big") + body
        return b"\x16\x03\x01" + struct.pack("!H", len(hs)) + hs

    for drop in range(len(optional) + 1):
        exts = [sni_ext] + optional[drop:]
        rem = size - len(record(exts, 32))
        if rem >= 4:
            return record(exts + [_ext(0x0015, bytes(rem - 4))], 32)  # padding
        if rem >= 0:  # too little room for a padding extension: a shorter session id
            return record(exts + [_ext(0x0015, b"")], 28 + rem)
    return record([sni_ext], 32)  # longer than size: the smallest hello with this name


def tls_server_hello(rng: np.random.Generator, size: int) -> bytes:
    """A TLS 1.3 server's first flight in ``size`` bytes: ServerHello, ChangeCipherSpec,
    then an encrypted record (application data) with the rest."""
    body = (
        b"\x03\x03"
        + rng.bytes(32)
        + b"\x20"
        + rng.bytes(32)
        + b"\x13\x01\x00"
        + struct.pack("!H", 46)
        + _ext(0x002B, b"\x03\x04")
        + _ext(0x0033, struct.pack("!HH", 0x001D, 32) + rng.bytes(32))
    )
    hs = b"\x02" + len(body).to_bytes(3, "big") + body
    first = b"\x16\x03\x03" + struct.pack("!H", len(hs)) + hs + b"\x14\x03\x03\x00\x01\x01"
    if size - len(first) < 6:
        return first[:size]
    return first + tls_app_data(rng, size - len(first))


def tls_app_data(rng: np.random.Generator, size: int) -> bytes:
    """One application-data record of ``size`` bytes (random, as ciphertext is)."""
    if size < 6:
        return rng.bytes(size)
    return b"\x17\x03\x03" + struct.pack("!H", size - 5) + rng.bytes(size - 5)


def tls_session(
    rng: np.random.Generator, up: list[int], down: list[int], sni: str
) -> tuple[list[bytes], list[bytes]]:
    """The client's and the server's packets of a TLS session: hellos first, then records."""
    client = [
        tls_client_hello(rng, s, sni) if i == 0 else tls_app_data(rng, s) for i, s in enumerate(up)
    ]
    server = [
        tls_server_hello(rng, s) if i == 0 else tls_app_data(rng, s) for i, s in enumerate(down)
    ]
    return client, server


# ---- SSH -----------------------------------------------------------------------------------

SSH_CLIENTS = (
    "SSH-2.0-OpenSSH_9.6",
    "SSH-2.0-OpenSSH_8.9p1 Ubuntu-3ubuntu0.6",
    "SSH-2.0-OpenSSH_for_Windows_8.1",
    "SSH-2.0-PuTTY_Release_0.80",
    "SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u2",
)
SSH_TOOLS = (
    "SSH-2.0-libssh2_1.10.0",
    "SSH-2.0-paramiko_3.4.0",
    "SSH-2.0-Go",
    "SSH-2.0-libssh_0.9.6",
    "SSH-2.0-PUTTY",
)
SSH_SERVERS = (
    "SSH-2.0-OpenSSH_8.9p1 Ubuntu-3ubuntu0.10",
    "SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3",
    "SSH-2.0-OpenSSH_7.4",
)
KEX_LISTS = (
    b"curve25519-sha256,curve25519-sha256@libssh.org,ecdh-sha2-nistp256,ecdh-sha2-nistp384,"
    b"diffie-hellman-group16-sha512,diffie-hellman-group14-sha256,ext-info-c",
    b"ssh-ed25519,ecdsa-sha2-nistp256,rsa-sha2-512,rsa-sha2-256",
    b"chacha20-poly1305@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr,aes128-gcm@openssh.com",
    b"umac-64-etm@openssh.com,hmac-sha2-256-etm@openssh.com,hmac-sha2-512-etm@openssh.com",
    b"none,zlib@openssh.com",
)


def _kexinit(rng: np.random.Generator, n: int) -> bytes:
    """The start of an SSH_MSG_KEXINIT binary packet (cookie, algorithm name-lists), cut or
    padded to n bytes."""
    lists = b"".join(struct.pack("!I", len(x)) + x for x in KEX_LISTS)
    data = struct.pack("!IBB", len(lists) + 22, 4, 20) + rng.bytes(16) + lists
    return (data + rng.bytes(max(n - len(data), 0)))[:n]


def ssh_session(
    rng: np.random.Generator,
    up: list[int],
    down: list[int],
    clients: tuple[str, ...] = SSH_CLIENTS,
) -> tuple[list[bytes], list[bytes]]:
    """SSH's packets: each side's version line first (with the start of its key exchange
    in the rest of that packet), then encrypted packets (random bytes)."""

    def side(sizes: list[int], banners: tuple[str, ...]) -> list[bytes]:
        out = []
        for i, size in enumerate(sizes):
            if i == 0:
                fits = [b for b in banners if len(b) + 2 <= size] or [min(banners, key=len)]
                line = (pick(rng, fits) + "\r\n").encode()
                out.append(line + _kexinit(rng, size - len(line)))
            else:
                out.append(rng.bytes(size))
        return out

    return side(up, clients), side(down, SSH_SERVERS)


# ---- SMTP ----------------------------------------------------------------------------------


def _line(head: str, filler: str, size: int) -> bytes:
    """``head`` and as much of ``filler`` (repeated) as makes a CRLF-ended line of ``size``
    bytes; longer when ``head`` alone is."""
    room = max(size - len(head) - 2, 0)
    return (head + (filler * (room // max(len(filler), 1) + 1))[:room] + "\r\n").encode()


def _hostname(rng: np.random.Generator, length: int, domain: str) -> str:
    """A client's host name of ``length`` characters where it can be (pc1234.ab.corp.example)."""
    name = f"pc{token(rng, 4, '0123456789')}.{domain}"
    if length > len(name) + 1:
        return f"{name[:6]}.{token(rng, length - len(name) - 1, LOWER_ALNUM)}.{domain}"
    return name[: max(length, 3)].strip(".")


def _address(rng: np.random.Generator, length: int, domain: str) -> str:
    """A mail address of about ``length`` characters (never shorter than 'x@' + domain)."""
    room = max(length - len(domain) - 1, 1)
    local = ".".join(WORDS[i] for i in rng.integers(0, len(WORDS), 6))[:room].strip(".")
    return f"{local or 'x'}@{domain}"


def smtp_session(
    rng: np.random.Generator, up: list[int], down: list[int]
) -> tuple[list[bytes], list[bytes]]:
    """A mail submission: EHLO, MAIL FROM, RCPT TO and DATA, then the message (headers,
    text, a base64 attachment when large; ended by CRLF.CRLF) over the remaining client
    sizes; the server's greeting and replies fill its sizes."""
    domain = "corp.example"
    sender = _address(rng, max(up[1] - 14, 6), domain) if len(up) > 1 else f"it@{domain}"
    rcpt = _address(rng, max(up[2] - 12, 6), "example.org") if len(up) > 2 else sender
    client = [
        f"EHLO {_hostname(rng, up[0] - 7, domain)}\r\n".encode(),
        f"MAIL FROM:<{sender}>\r\n".encode(),
        f"RCPT TO:<{rcpt}>\r\n".encode(),
        b"DATA\r\n",
    ][: len(up)]
    body_sizes = up[len(client) :]
    if body_sizes:
        message = _message(rng, sender, rcpt, sum(body_sizes) - 5) + b"\r\n.\r\n"
        at = 0
        for size in body_sizes:
            client.append(message[at : at + size])
            at += size
    host = f"mail.{domain}"
    extensions = "PIPELINING SIZE=10240000 ETRN STARTTLS ENHANCEDSTATUSCODES 8BITMIME DSN"
    replies = [
        ("220 " + host + " ESMTP Postfix", f" (Ubuntu) {words(rng, 30).lower()}"),
        ("250-" + host, "\r\n250-" + extensions.replace(" ", "\r\n250-").replace("=", " ")),
        ("250 2.1.0 Ok", f" {words(rng, 30).lower()}"),
        ("250 2.1.5 Ok", f" {words(rng, 30).lower()}"),
        ("354 End data with <CR><LF>.<CR><LF>", ""),
        (f"250 2.0.0 Ok: queued as {token(rng, 10, '0123456789ABCDEF')}", f" {words(rng, 30)}"),
        ("221 2.0.0 Bye", f" {words(rng, 30).lower()}"),
    ]
    server = [_line(*replies[min(i, len(replies) - 1)], size) for i, size in enumerate(down)]
    return client, server


def _message(rng: np.random.Generator, sender: str, rcpt: str, n: int) -> bytes:
    boundary = token(rng, 24, ALNUM)
    head = (
        f"From: {sender}\r\nTo: {rcpt}\r\nSubject: {words(rng, 4)}\r\n"
        f"Date: Tue, 14 Nov 2023 22:13:{int(rng.integers(10, 59))} +0000\r\n"
        f"Message-ID: <{token(rng, 16, HEX_DIGITS)}@corp.example>\r\nMIME-Version: 1.0\r\n"
        f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n'
        f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    )
    text = ""
    while len(text) < min(n // 3, 2000):
        text += words(rng, 11) + ".\r\n"
    text += (
        f"\r\n--{boundary}\r\nContent-Type: application/pdf; name=report.pdf\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\n"
    )
    room = max(n - len(head) - len(text), 0)
    attachment = base64.b64encode(rng.bytes(room)).decode()
    lines = "\r\n".join(attachment[i : i + 76] for i in range(0, len(attachment), 76))
    return (head + text + lines).encode()[:n]


# ---- DNS, ICMP -----------------------------------------------------------------------------


def dns_answers(rng: np.random.Generator, response: bytes, n: int) -> bytes:
    """``response`` (a DNS response with only its question) with n bytes of answer records:
    a CNAME, then A records, the answer count set to match (n >= 16)."""
    k = max(n // 16, 1)
    rdlen = n - 16 * (k - 1) - 12  # the CNAME's data: 4..19 bytes
    label = token(rng, max(rdlen - 2, 1), LOWER_ALNUM).encode()
    cname = b"\xc0\x0c" + struct.pack("!HHIH", 5, 1, 300, rdlen) + bytes([len(label)]) + label
    cname += b"\x00" * (rdlen - 1 - len(label))
    a = b"".join(
        b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 300, 4) + rng.bytes(4) for _ in range(k - 1)
    )
    return response[:6] + struct.pack("!H", k) + response[8:] + cname + a


def dns_txt_answer(rng: np.random.Generator, response: bytes, n: int) -> bytes:
    """``response`` with one TXT answer record of n bytes (n > 12) of base32-ish text, as
    a DNS tunnel's server sends data back."""
    remaining, data = n - 12, b""
    while remaining > 0:
        length = min(255, remaining - 1)
        data += bytes([length]) + token(rng, length, BASE32).encode()
        remaining -= length + 1
    record = b"\xc0\x0c" + struct.pack("!HHIH", 16, 1, 0, len(data)) + data
    return response[:6] + struct.pack("!H", 1) + response[8:] + record


def ping_payload(t: float) -> bytes:
    """Linux ping's 56 bytes: the send time (seconds, microseconds) and 0x10..0x37."""
    sec = int(t)
    return struct.pack("<QQ", 1_700_000_000 + sec, int((t - sec) * 1e6)) + bytes(range(0x10, 0x38))
