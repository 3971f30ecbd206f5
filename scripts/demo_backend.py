#!/usr/bin/env python3
"""A tiny self-contained demo backend for scripts/demo (stdlib only).

    python3 scripts/demo_backend.py --name "backend 1" --port 9001

GET /         -> 200 "hello from backend 1 (port 9001)"
GET /healthz  -> 200 "ok" (what the proxy's active health checks ask for)
anything else -> 200 with the method and path echoed, so routing and prefix stripping are visible

HTTP/1.1 with keep-alive, so the proxy can reuse pooled connections (RFC 9112 §9.3).
Prints "ready http://HOST:PORT" on stdout once it listens (port 0 picks a free port).
"""

from __future__ import annotations

import argparse
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class DemoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive by default; every reply carries Content-Length
    server_version = "pyproxy-demo-backend"

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._reply(200, "ok\n")
        elif self.path == "/":
            self._reply(200, f"hello from {self.server.backend_name} (port {self.server.server_port})\n")
        else:
            self._reply(200, f"{self.server.backend_name} got GET {self.path}\n")

    def do_HEAD(self) -> None:
        self._reply(200, "", head_only=True)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        self._reply(200, f"{self.server.backend_name} got POST {self.path} with {len(body)} bytes\n")

    def _reply(self, status: int, text: str, head_only: bool = False) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Backend", self.server.backend_name)
        self.end_headers()
        if not head_only:
            self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        """Quiet: the proxy's access log already shows every request."""


class DemoServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], name: str):
        super().__init__(address, DemoHandler)
        self.backend_name = name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A tiny HTTP backend for the pyproxy demo.")
    parser.add_argument("--name", required=True, help='how it introduces itself, e.g. "backend 1"')
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0 = any free port)")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    try:
        server = DemoServer((args.host, args.port), args.name)
    except OSError as exc:
        print(f"demo_backend: cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)
        return 1
    # SIGTERM ends serve_forever through KeyboardInterrupt, so both ways out close the socket.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    print(f"ready http://{args.host}:{server.server_port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print(f"{args.name} stopped", file=sys.stderr)  # Ctrl-C or SIGTERM: the normal way out
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
