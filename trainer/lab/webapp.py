"""The lab's web application, behind nginx: a shop with a login form, a search and an item
page. The item page builds its SQL by string concatenation, as vulnerable applications do, so
that sqlmap finds a real injection; the login form is what hydra brute-forces.

    python -m quietwire.trainer.lab.webapp --port 8080 --db shop.db
"""

from __future__ import annotations

import argparse
import html
import sqlite3
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

ITEMS = [
    (i, f"item {i}", f"A fine product number {i} for every office", round(3.5 * i + 1, 2))
    for i in range(1, 61)
]
LOGINS = {"alice": "Wint3r-is-c0ming!", "bob": "sunshine1"}

PAGE = (
    "<html><head><title>{title}</title><link rel=stylesheet href=/static/asset0.css></head>"
    "<body><h1>{title}</h1>{body}</body></html>"
)


def init(db: Path) -> None:
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE IF NOT EXISTS items (id INTEGER, name TEXT, text TEXT, price REAL)")
    con.execute("CREATE TABLE IF NOT EXISTS users (name TEXT, password TEXT)")
    if not con.execute("SELECT count(*) FROM items").fetchone()[0]:
        con.executemany("INSERT INTO items VALUES (?, ?, ?, ?)", ITEMS)
        con.executemany("INSERT INTO users VALUES (?, ?)", LOGINS.items())
    con.commit()
    con.close()


class Shop(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    db: Path

    def log_message(self, fmt: str, *args) -> None:
        pass

    def _send(self, status: int, body: str, ctype: str = "text/html") -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        con = sqlite3.connect(self.db)
        try:
            if url.path == "/":
                rows = con.execute("SELECT id, name FROM items LIMIT 12").fetchall()
                body = "".join(f"<a href=/item?id={i}>{html.escape(n)}</a><br>" for i, n in rows)
                self._send(200, PAGE.format(title="shop", body=body))
            elif url.path == "/search":
                term = q.get("q", "")
                rows = con.execute(
                    "SELECT id, name FROM items WHERE name LIKE ?", (f"%{term}%",)
                ).fetchall()
                body = "".join(f"<p>{i}: {html.escape(n)}</p>" for i, n in rows)
                self._send(200, PAGE.format(title="search", body=body or "nothing found"))
            elif url.path == "/item":
                # deliberately injectable
                sql = "SELECT id, name, text, price FROM items WHERE id = " + q.get("id", "0")
                try:
                    rows = con.execute(sql).fetchall()
                except sqlite3.Error as exc:
                    self._send(500, PAGE.format(title="error", body=html.escape(str(exc))))
                    return
                body = "".join(f"<p>{html.escape(str(r))}</p>" for r in rows)
                self._send(200 if rows else 404, PAGE.format(title="item", body=body or "none"))
            elif url.path == "/login":
                form = (
                    "<form method=post action=/login><input name=user><input name=pass "
                    "type=password><input type=submit></form>"
                )
                self._send(200, PAGE.format(title="login", body=form))
            else:
                self._send(404, PAGE.format(title="not found", body=""))
        finally:
            con.close()

    def do_POST(self) -> None:
        length = min(int(self.headers.get("Content-Length") or 0), 1 << 20)
        form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode("latin-1")).items()}
        if urlsplit(self.path).path != "/login":
            self._send(404, PAGE.format(title="not found", body=""))
            return
        if LOGINS.get(form.get("user", "")) == form.get("pass"):
            self._send(200, PAGE.format(title="welcome", body="logged in"))
        else:
            self._send(200, PAGE.format(title="login", body="Login failed"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--db", type=Path, required=True)
    args = parser.parse_args()
    init(args.db)
    Shop.db = args.db
    ThreadingHTTPServer(("127.0.0.1", args.port), Shop).serve_forever()


if __name__ == "__main__":
    main()
