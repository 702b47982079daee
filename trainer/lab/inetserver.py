"""The lab's internet servers: ``www`` serves downloads of any size (``/file/<bytes>``) and takes
uploads (PUT or POST anywhere) over HTTP and HTTPS; ``c2`` answers a beacon's check-ins over
HTTPS with a small task document. Certificates are self-signed.

    python -m quietwire.trainer.lab.inetserver --role www --cert cert.pem --key key.pem
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CHUNK = 1 << 16
MAX_FILE = 1 << 30


class Internet(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    role = "www"

    def log_message(self, fmt: str, *args) -> None:
        pass

    def _reply(self, status: int, body: bytes, ctype: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.role == "c2":
            task = {"sleep": 30, "task": "noop", "id": os.urandom(4).hex()}
            self._reply(200, json.dumps(task).encode(), "application/json")
            return
        parts = self.path.strip("/").split("/")
        if len(parts) == 2 and parts[0] == "file" and parts[1].isdigit():
            size = min(int(parts[1]), MAX_FILE)
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            block = os.urandom(CHUNK)
            while size > 0:
                self.wfile.write(block[: min(size, CHUNK)])
                size -= CHUNK
            return
        self._reply(200, b"<html><body>" + b"news " * 400 + b"</body></html>", "text/html")

    def _sink(self) -> None:
        left = int(self.headers.get("Content-Length") or 0)
        while left > 0:
            got = self.rfile.read(min(left, CHUNK))
            if not got:
                break
            left -= len(got)
        self._reply(200, b"stored\n" if self.role == "www" else b'{"ok":1}')

    do_PUT = _sink
    do_POST = _sink


def _serve(port: int, context: ssl.SSLContext | None) -> None:
    server = ThreadingHTTPServer(("0.0.0.0", port), Internet)
    if context:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=("www", "c2"), required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args()
    Internet.role = args.role
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    if args.role == "www":
        threading.Thread(target=_serve, args=(80, None), daemon=True).start()
    _serve(443, context)


if __name__ == "__main__":
    main()
