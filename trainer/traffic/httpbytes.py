"""HTTP/1.1 bytes for trafficgen's plain-HTTP sessions: requests built to the size the
generator drew (benign pages, assets, API calls and form posts; login attempts; slowloris's
trickle), and responses spread over the packets of the server's side. webexploits.py builds
the requests that carry an exploit with fit_request.

A request is fitted to its size as a browser's or a tool's request varies: optional headers
come and go and the Cookie header takes the rest, so an exploit request has the length of a
benign one and only its bytes differ. All randomness comes from the generator passed in.
"""

from __future__ import annotations

from urllib.parse import quote

import numpy as np

from quietwire.trainer.traffic.protocolbytes import ALNUM, HEX_DIGITS, pick, token, words

BROWSERS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Safari/537.36 Edg/120.0.2210.91",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.2 Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:121.0) Gecko/20100101 Firefox/121.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_2 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like "
    "Gecko) Version/17.2 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.6099.144 Mobile Safari/537.36",
)
TOOLS = (
    "curl/8.5.0",
    "Wget/1.21.4",
    "python-requests/2.31.0",
    "okhttp/4.12.0",
    "Go-http-client/1.1",
    "Apache-HttpClient/4.5.14 (Java/17.0.9)",
    "Debian APT-HTTP/1.3 (2.6.1)",
    "Microsoft-CryptoAPI/10.0",
)
PAGES = (
    "/",
    "/index.html",
    "/about",
    "/contact",
    "/news/2024/03/energy-prices-fall",
    "/products/shoes/running",
    "/products/view",
    "/blog/how-to-configure-the-vpn-client",
    "/docs/latest/install.html",
    "/wiki/Main_Page",
    "/wiki/Mercury_(planet)",
    "/wiki/Python_(programming_language)",
    "/shop/cart.jsp;jsessionid={h}",
    "/search",
    "/account/orders",
    "/category.php",
    "/item.php",
)
ASSETS = (
    ("/static/css/main.{h}.css", "text/css,*/*;q=0.1", "css"),
    ("/static/js/app.{h}.js", "*/*", "js"),
    ("/static/js/vendor.{h}.chunk.js", "*/*", "js"),
    ("/images/banner-{n}.jpg", "image/avif,image/webp,image/apng,image/*,*/*;q=0.8", "jpeg"),
    ("/images/products/{n}.png", "image/avif,image/webp,image/apng,image/*,*/*;q=0.8", "png"),
    ("/favicon.ico", "image/avif,image/webp,image/apng,image/*,*/*;q=0.8", "png"),
    ("/fonts/roboto-v30-latin-regular.woff2", "*/*", "font"),
)
APIS = (
    "/api/v1/items",
    "/api/v1/users/{n}/orders",
    "/api/v2/notifications",
    "/api/v1/search",
    "/rest/status",
)
SEARCH_TERMS = (
    "red shoes",
    "vpn windows 11",
    "quarterly report 2023",
    "don't stop me now",
    "rock & roll",
    "c++ tutorial",
    "price < 50",
    "o'reilly books",
    "100% cotton",
    "weather berlin",
)
ACCEPT_PAGE = (
    "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"
)
SERVERS = ("nginx/1.24.0", "Apache/2.4.58 (Ubuntu)", "Microsoft-IIS/10.0", "cloudflare", "nginx")
COOKIE_MIN = len("Cookie: a=1\r\n")


def _query_value(rng: np.random.Generator) -> tuple[str, str]:
    """One benign query parameter, encoded as browsers and apps send them."""
    r = int(rng.integers(0, 10))
    if r == 0:
        return "q", quote(pick(rng, SEARCH_TERMS), safe="").replace("%20", "+")
    if r == 1:
        return "page", str(int(rng.integers(1, 40)))
    if r == 2:
        return "id", str(int(rng.integers(1, 100000)))
    if r == 3:
        return "utm_source", pick(rng, ("newsletter", "google", "twitter", "partner_site"))
    if r == 4:
        return "next", quote(f"/account/{pick(rng, ('settings', 'orders'))}?tab=security", safe="")
    if r == 5:
        return "redirect_uri", quote(f"https://{pick(rng, HOSTS)}/callback", safe="")
    if r == 6:
        return "sort", pick(rng, ("price_asc", "price_desc", "newest", "rating"))
    if r == 7:
        return "lang", pick(rng, ("en", "en-US", "de-DE", "fr"))
    if r == 8:
        return "filter%5Bcolor%5D", pick(rng, ("red", "blue", "black"))
    return "v", f"{int(rng.integers(1, 9))}.{int(rng.integers(0, 20))}.{int(rng.integers(0, 9))}"


def query(rng: np.random.Generator, n: int) -> str:
    """n benign query parameters joined with '&'."""
    return "&".join(f"{k}={v}" for k, v in (_query_value(rng) for _ in range(n)))


HOSTS = (
    "www.example.com",
    "example.org",
    "shop.example.net",
    "news.example.com",
    "cdn.example-static.com",
    "api.example.io",
    "downloads.vendor.net",
)


def cookie(rng: np.random.Generator, length: int) -> str:
    """A cookie header value of exactly ``length`` characters (session ids, analytics,
    preferences; cut where it reaches the length)."""
    pieces = [
        f"sessionid={token(rng, 32, HEX_DIGITS)}",
        f"csrftoken={token(rng, 32, ALNUM)}",
        f"_ga=GA1.2.{int(rng.integers(10**9, 10**10))}.{int(rng.integers(10**9, 10**10))}",
        f"_gid=GA1.2.{int(rng.integers(10**8, 10**9))}.{int(rng.integers(10**9, 10**10))}",
        f"lang={pick(rng, ('en', 'de', 'fr'))}",
        f"theme={pick(rng, ('dark', 'light'))}",
        "consent=%7B%22ads%22%3Afalse%2C%22stats%22%3Atrue%7D",
        f"JSESSIONID={token(rng, 32, HEX_DIGITS).upper()}",
        f"cart={int(rng.integers(0, 9))}",
    ]
    order = rng.permutation(len(pieces))
    text = "; ".join(pieces[i] for i in order)
    while len(text) < length:
        text += f"; pref{len(text) % 97}={token(rng, 24, ALNUM)}"
    text = text[:length]
    if text[-1] in "; =":
        text = text[:-1] + "x"
    return text


def fit_request(
    rng: np.random.Generator,
    size: int,
    method: str,
    target: str,
    host: str,
    accept: str,
    ua: str | None = None,
    early: tuple[tuple[str, str], ...] = (),
    tail: tuple[tuple[str, str], ...] = (),
    body: str = "",
) -> bytes:
    """An HTTP/1.1 request of ``size`` bytes: request line, Host, ``early`` headers, the
    User-Agent (``ua``, or a browser's three times in four and a tool's otherwise, a tool's
    where a browser's does not fit), a random choice of the optional headers a client sends,
    then ``tail`` headers and a Cookie that takes the rest, then the body. Longer than
    ``size`` only when the required parts alone are; up to COOKIE_MIN - 1 bytes shorter when
    they leave less room than the smallest cookie."""
    optional = [
        ("Accept", accept),
        ("Accept-Language", pick(rng, ("en-US,en;q=0.9", "de-DE,de;q=0.9,en;q=0.8", "en-GB"))),
        ("Accept-Encoding", pick(rng, ("gzip, deflate", "gzip, deflate, br"))),
        ("Referer", f"http://{host}{pick(rng, PAGES[:12])}"),
        ("Connection", "keep-alive"),
        ("Upgrade-Insecure-Requests", "1"),
        ("Cache-Control", pick(rng, ("max-age=0", "no-cache"))),
        ("DNT", "1"),
        ("If-None-Match", f'"{token(rng, 16, HEX_DIGITS)}"'),
        ("Sec-Fetch-Mode", pick(rng, ("navigate", "cors", "no-cors"))),
        ("Sec-Fetch-Site", pick(rng, ("same-origin", "none", "cross-site"))),
    ]
    if body:
        tail = tail + (("Content-Length", str(len(body.encode()))),)

    def render(headers: list[tuple[str, str]]) -> bytes:
        lines = [f"{method} {target} HTTP/1.1"] + [f"{k}: {v}" for k, v in headers]
        return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()

    base = size - len(render([("Host", host), *early, *tail]))
    if ua is None:
        ua = _user_agent(rng, base)
    required = [("Host", host), *early, ("User-Agent", ua)]
    chosen: list[tuple[str, str]] = []
    budget = size - len(render(required + list(tail)))
    for header in optional:
        cost = len(header[0]) + len(header[1]) + 4
        if rng.random() < 0.7 and (budget - cost >= COOKIE_MIN or budget == cost):
            chosen.append(header)
            budget -= cost
    if budget >= COOKIE_MIN:
        chosen.append(("Cookie", cookie(rng, budget - COOKIE_MIN + len("a=1"))))
    return render(required + chosen + list(tail))


def _user_agent(rng: np.random.Generator, room: int) -> str:
    """A browser's User-Agent three times in four, a tool's otherwise; one whose header line
    leaves 0 or at least COOKIE_MIN of ``room`` bytes where there is one."""

    def fits(ua: str) -> bool:
        left = room - len(ua) - len("User-Agent: \r\n")
        return left == 0 or left >= COOKIE_MIN

    preferred = BROWSERS if rng.random() < 0.75 else TOOLS
    for group in (preferred, TOOLS):
        options = [ua for ua in group if fits(ua)]
        if options:
            return pick(rng, options)
    return min(TOOLS, key=len)


def benign_request(rng: np.random.Generator, size: int, host: str) -> tuple[bytes, str]:
    """An ordinary request of ``size`` bytes and the kind of content it asks for."""
    r = rng.random()
    method, body, tail, early = "GET", "", (), ()
    if r < 0.45:  # a page, with a query string some of the time
        target = pick(rng, PAGES).format(h=token(rng, 32, HEX_DIGITS).upper())
        accept, content = ACCEPT_PAGE, "html"
        if rng.random() < 0.45:
            target += "?" + query(rng, int(rng.integers(1, 4)))
    elif r < 0.75:  # an asset of a page
        pattern, accept, content = ASSETS[int(rng.integers(len(ASSETS)))]
        target = pattern.format(h=token(rng, 8, HEX_DIGITS), n=int(rng.integers(1, 500)))
        if rng.random() < 0.3:
            target += f"?v={int(rng.integers(1, 400))}"
    elif r < 0.88:  # an API call
        target = pick(rng, APIS).format(n=int(rng.integers(1, 99999)))
        accept, content = "application/json", "json"
        if rng.random() < 0.6:
            target += (
                f"?limit={int(rng.integers(1, 5)) * 10}&offset={int(rng.integers(0, 20)) * 10}"
            )
        early = (("Authorization", f"Bearer {_jwt(rng)}"),) if rng.random() < 0.5 else ()
    elif r < 0.95:  # a form post
        method, accept, content = "POST", ACCEPT_PAGE, "html"
        target = pick(rng, ("/search", "/comment", "/cart/add", "/contact", "/subscribe"))
        body = _form(rng, min(size // 4, 160))
        tail = (("Content-Type", "application/x-www-form-urlencoded"),)
    else:  # JSON to an API
        method, accept, content = "POST", "application/json", "json"
        target = pick(rng, ("/api/v1/events", "/api/v1/telemetry", "/graphql"))
        body = _json_body(rng, min(size // 4, 180))
        tail = (("Content-Type", "application/json"),)
    return fit_request(rng, size, method, target, host, accept, None, early, tail, body), content


def _jwt(rng: np.random.Generator) -> str:
    b64 = ALNUM + "-_"
    return f"eyJhbGciOiJIUzI1NiJ9.{token(rng, 48, b64)}.{token(rng, 43, b64)}"


def _form(rng: np.random.Generator, length: int) -> str:
    fields = [
        f"email={quote(words(rng, 1).lower(), safe='')}%40corp.example",
        f"name={quote(words(rng, 2), safe='').replace('%20', '+')}",
        f"qty={int(rng.integers(1, 5))}",
        f"comment={quote(words(rng, 12), safe='').replace('%20', '+')}",
        f"csrf_token={token(rng, 32, ALNUM)}",
    ]
    text = "&".join(fields[i] for i in rng.permutation(len(fields)))
    return text[: max(length, 20)].rstrip("%&=")


def _json_body(rng: np.random.Generator, length: int) -> str:
    text = (
        f'{{"event":"{pick(rng, ("click", "view", "scroll"))}",'
        f'"ts":{int(rng.integers(1_700_000_000_000, 1_700_100_000_000))},'
        f'"session":"{token(rng, 16, HEX_DIGITS)}","items":['
    )
    while len(text) < length - 2:
        text += f'{{"id":{int(rng.integers(1, 99999))},"n":{int(rng.integers(1, 9))}}},'
    return text.rstrip(",") + "]}"


def login_request(rng: np.random.Generator, size: int, host: str) -> bytes:
    """A password guess: a form POST to a login page, as a brute-force tool sends it."""
    user = pick(rng, ("admin", "administrator", "root", "test", "user", "webmaster"))
    guess = pick(rng, ("123456", "password", "admin123", "qwerty", "letmein", "Summer2023!"))
    guess += token(rng, int(rng.integers(0, 4)), ALNUM)
    body = f"username={user}&password={quote(guess, safe='')}&submit=Login"
    target = pick(rng, ("/login", "/wp-login.php", "/admin/login", "/user/login"))
    ua = pick(rng, ("Mozilla/5.0 (Hydra)", *TOOLS[:3], BROWSERS[0]))
    tail = (("Content-Type", "application/x-www-form-urlencoded"),)
    return fit_request(rng, size, "POST", target, host, ACCEPT_PAGE, ua, (), tail, body)


# ---- responses -----------------------------------------------------------------------------


def response(
    rng: np.random.Generator, sizes: list[int], content: str, status: str = "200 OK"
) -> list[bytes]:
    """A response whose bytes fill ``sizes`` (one entry per packet): status line and headers
    in the first packet, the body (of ``content``: html, json, css, js, png, jpeg, font) after
    them, Content-Length matching."""
    total = sum(sizes)
    types = {
        "html": "text/html; charset=utf-8",
        "json": "application/json",
        "css": "text/css",
        "js": "application/javascript",
        "png": "image/png",
        "jpeg": "image/jpeg",
        "font": "font/woff2",
    }
    headers = [
        (
            "Date",
            f"{pick(rng, ('Mon', 'Tue', 'Wed'))}, 14 Nov 2023 22:{int(rng.integers(10, 59))}:"
            f"{int(rng.integers(10, 59))} GMT",
        ),
        ("Server", pick(rng, SERVERS)),
        ("Content-Type", types[content]),
    ]
    optional = [
        ("Cache-Control", pick(rng, ("no-cache", "max-age=3600", "public, max-age=31536000"))),
        ("ETag", f'"{token(rng, 16, HEX_DIGITS)}"'),
        ("Vary", "Accept-Encoding"),
        ("X-Frame-Options", "SAMEORIGIN"),
        ("Set-Cookie", f"sessionid={token(rng, 32, HEX_DIGITS)}; Path=/; HttpOnly"),
        ("Connection", "keep-alive"),
    ]
    room = sizes[0] - 24  # leave a little body in the first packet
    for h in optional:
        if rng.random() < 0.6 and _head_len(status, headers + [h], total) <= room:
            headers.append(h)
    head_len = _head_len(status, headers, total)
    body_len = max(total - head_len, 0)
    head = _head(status, headers, body_len)
    data = head + _body(rng, content, body_len)
    out, at = [], 0
    for size in sizes:
        out.append(data[at : at + size])
        at += size
    return out


def _head(status: str, headers: list[tuple[str, str]], body_len: int) -> bytes:
    lines = [f"HTTP/1.1 {status}"] + [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines + [f"Content-Length: {body_len}"]) + "\r\n\r\n").encode()


def _head_len(status: str, headers: list[tuple[str, str]], total: int) -> int:
    """The head's length when it and the body fill ``total`` bytes (the Content-Length's
    digits depend on the body's length, which depends on the head's)."""
    n = len(_head(status, headers, total))
    return len(_head(status, headers, max(total - n, 0)))


def _body(rng: np.random.Generator, content: str, n: int) -> bytes:
    if content in ("png", "jpeg", "font"):
        magic = {
            "png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
            "jpeg": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01",
            "font": b"wOF2\x00\x01\x00\x00",
        }[content]
        return (magic + rng.bytes(n))[:n]
    if content == "json":
        text = '{"items":['
        while len(text) < n:
            text += (
                f'{{"id":{int(rng.integers(1, 99999))},"name":"{words(rng, 2)}",'
                f'"price":{int(rng.integers(1, 500))}.{int(rng.integers(0, 99)):02d},'
                f'"in_stock":{pick(rng, ("true", "false"))}}},'
            )
    elif content in ("css", "js"):
        text = ""
        while len(text) < n:
            if content == "css":
                name, color = (
                    f"{words(rng, 1).lower()}-{token(rng, 4, ALNUM)}",
                    token(rng, 6, HEX_DIGITS),
                )
                text += f".{name}{{margin:0 auto;color:#{color}}}\n"
            else:
                name, field = words(rng, 1).lower(), words(rng, 1).lower()
                text += (
                    f"function {name}(e){{return e&&e.{field}?{int(rng.integers(0, 99))}:null}}\n"
                )
    else:
        text = (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{words(rng, 3)}</title>"
            '<link rel="stylesheet" href="/static/css/main.css"></head><body>\n'
        )
        while len(text) < n:
            text += (
                f'<div class="item"><h2>{words(rng, 3)}</h2><p>{words(rng, 18)}.</p>'
                f'<a href="/products/{int(rng.integers(1, 9999))}">More</a></div>\n'
            )
    return text.encode()[:n]


def slowloris_stream(rng: np.random.Generator, n: int, host: str) -> bytes:
    """The first n bytes a slowloris connection trickles out: a request line and headers,
    then one more bogus header line at a time, never the blank line that ends them."""
    text = (
        f"GET /?{int(rng.integers(0, 5000))} HTTP/1.1\r\nHost: {host}\r\n"
        f"User-Agent: {pick(rng, BROWSERS)}\r\nAccept-language: en-US,en,q=0.5\r\n"
    )
    while len(text) < n:
        text += f"X-a: {int(rng.integers(1, 5000))}\r\n"
    return text[:n].encode()
