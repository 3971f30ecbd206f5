"""Responses the proxy writes itself: short plain-text errors, the status line table, and the
"upstream unreachable" page a developer sees in the browser when their dev server is not running."""

from __future__ import annotations

import html
from http import HTTPStatus

REASONS = {status.value: status.phrase for status in HTTPStatus}


def reason_phrase(status: int) -> str:
    return REASONS.get(status, "Unknown")


def plain_response(status: int, body: str, *, close: bool, extra_headers: tuple = (),
                   head_only: bool = False) -> bytes:
    """A complete HTTP/1.1 response with a text/plain body (``head_only`` for HEAD requests)."""
    payload = (body.rstrip("\n") + "\n").encode("utf-8")
    return _response(status, "text/plain; charset=utf-8", payload, close, extra_headers, head_only)


def html_response(status: int, page: str, *, close: bool, extra_headers: tuple = (),
                  head_only: bool = False) -> bytes:
    """A complete HTTP/1.1 response with a text/html body; ``page`` must already be escaped HTML."""
    return _response(status, "text/html; charset=utf-8", page.encode("utf-8"), close, extra_headers, head_only)


def _response(status: int, content_type: str, payload: bytes, close: bool, extra_headers: tuple,
              head_only: bool) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason_phrase(status)}",
             f"Content-Type: {content_type}",
             f"Content-Length: {len(payload)}"]
    lines.extend(f"{name}: {value}" for name, value in extra_headers)
    if close:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + payload


def wants_html(accept: str | None) -> bool:
    """Browsers list text/html in Accept (RFC 9110 §12.5.1); curl sends "*/*", scripts often nothing."""
    return accept is not None and "text/html" in accept.lower()


# -- "upstream unreachable" ----------------------------------------------------------------------------

def describe_route(host: str | None, path: str) -> str:
    """A route as people write it: "app.localhost/", "/api", or "*.test/docs"."""
    return f"{host}{path}" if host else path


def unreachable_text(status: int, route: str, address: str, refused: bool, detail: str) -> str:
    """The plain-text body for curl and scripts: one line that says what to fix."""
    if refused:
        return (f"{status} {reason_phrase(status)}: pyproxy couldn't reach {address} for route {route}"
                f" (connection refused) - is your dev server running?")
    return f"{status} {reason_phrase(status)}: pyproxy couldn't reach {address} for route {route}: {detail}"


def unreachable_page(status: int, route: str, address: str, refused: bool, detail: str) -> str:
    """The HTML page for browsers: names the route and the address, and says what to try."""
    e = html.escape
    hint = ("Nothing is listening there. Is your dev server running? Start it, then reload this page."
            if refused else "The connection did not succeed. Check that the server is up and reachable.")
    return UNREACHABLE_PAGE.format(status=status, reason=e(reason_phrase(status)), route=e(route),
                                   address=e(address), hint=e(hint), detail=e(detail))


# Self-contained (no external fonts, scripts or styles): it is shown exactly when things are broken.
UNREACHABLE_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{status} - {address} unreachable - pyproxy</title>
<style>
:root {{ color-scheme: light dark; --bg: #f6f7f9; --card: #fff; --fg: #1f2328; --muted: #57606a;
         --accent: #b42318; --code: #eef1f4; --border: #d8dee4; }}
@media (prefers-color-scheme: dark) {{
  :root {{ --bg: #0d1117; --card: #161b22; --fg: #e6edf3; --muted: #9da7b3; --accent: #ff7b72;
           --code: #21262d; --border: #30363d; }} }}
body {{ margin: 0; min-height: 100vh; display: grid; place-items: center; background: var(--bg); color: var(--fg);
        font: 16px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }}
main {{ box-sizing: border-box; width: min(40rem, 100% - 2rem); margin: 1rem; padding: 2rem;
        background: var(--card); border: 1px solid var(--border); border-radius: 12px;
        border-top: 6px solid var(--accent); }}
.status {{ color: var(--accent); font-weight: 700; letter-spacing: .04em; text-transform: uppercase; font-size: .85rem; }}
h1 {{ font-size: 1.5rem; line-height: 1.3; margin: .25rem 0 1rem; overflow-wrap: anywhere; }}
code {{ font: .95em ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: var(--code);
        padding: .1em .35em; border-radius: 4px; overflow-wrap: anywhere; }}
dl {{ display: grid; grid-template-columns: max-content 1fr; gap: .35rem 1rem; margin: 1.25rem 0; }}
dt {{ color: var(--muted); }} dd {{ margin: 0; overflow-wrap: anywhere; }}
footer {{ color: var(--muted); font-size: .85rem; margin-top: 1.5rem; }}
</style></head>
<body><main>
<div class="status">{status} {reason}</div>
<h1>pyproxy couldn't reach <code id="address">{address}</code> for route <code id="route">{route}</code></h1>
<p id="hint">{hint}</p>
<dl><dt>Route</dt><dd>{route}</dd><dt>Upstream address</dt><dd>{address}</dd>
<dt>Error</dt><dd>{detail}</dd></dl>
<footer>This page was sent by pyproxy, not by your application.</footer>
</main></body></html>
"""


OVERLOADED = plain_response(503, "503 Service Unavailable: the proxy is overloaded, try again later", close=True)


def write_overloaded(sock) -> None:
    """core.SocketServer's overload callback: one non-blocking send, then the server closes."""
    sock.send(OVERLOADED)
