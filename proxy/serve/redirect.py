"""Plain HTTP that answers every request with a 308 to the same URL over HTTPS.

Quick mode's ``--from https://app.localhost`` listens on 443 and, like Caddy's reverse-proxy, on port
80 too, only to send browsers to https://. A small threaded server from the standard library is
enough: it reads one request head (bounded in size and time), answers, and closes.
"""

from __future__ import annotations

import http.server
import logging
import socket
import socketserver
import threading

from proxy.config.units import parse_host

log = logging.getLogger("pyproxy.redirect")

READ_TIMEOUT = 10.0  # a client that does not finish its request head within this is dropped


class _Redirect(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = READ_TIMEOUT
    server_version = "pyproxy"

    def _answer(self) -> None:
        host = _host_of(self.headers.get("Host", "")) or self.server.default_host
        if host is None:
            self.send_error(400, "missing or invalid Host header")
            return
        shown = f"[{host}]" if ":" in host else host
        port = "" if self.server.https_port == 443 else f":{self.server.https_port}"
        path = self.path if self.path.startswith("/") else "/"
        self.send_response(308)
        self.send_header("Location", f"https://{shown}{port}{path}")
        self.send_header("Content-Length", "0")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _answer

    def log_message(self, format, *args):  # noqa: A002 - the proxy's own logging, at debug
        log.debug("redirect %s: " + format, self.client_address[0], *args)


def _host_of(header: str) -> str | None:
    """The host of a Host header without its port, validated (it goes into the Location header)."""
    text = header.strip()
    if text.startswith("["):
        text = text[:text.find("]") + 1] if "]" in text else ""
    else:
        text = text.rsplit(":", 1)[0] if text.count(":") == 1 else text
    try:
        return parse_host(text) if text else None
    except ValueError:
        return None


class RedirectServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True

    def __init__(self, sock: socket.socket, https_port: int, default_host: str | None):
        super().__init__(sock.getsockname()[:2], _Redirect, bind_and_activate=False)
        self.socket.close()
        self.socket = sock  # already bound and listening (the CLI binds before it starts anything)
        self.https_port = https_port
        self.default_host = default_host

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="redirect-to-https", daemon=True)
        thread.start()
        return thread
