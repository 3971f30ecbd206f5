"""Configuration text for the backends and for each proxy under test.

All proxies get the same upstreams (both backend ports), round-robin, upstream keep-alive,
no access log and the same worker count. Upstream keep-alive is equal per backend server:
pyproxy's `keepalive` counts idle connections per server, nginx's `keepalive` counts them for the
whole upstream block (per worker), so nginx gets per_server x servers, and HAProxy gets
`pool-max-conn` per server. (With nginx at a flat `keepalive 32`, c=50 over two servers overflows
its cache and nginx opens a new upstream connection for many requests: about half its c=50
throughput on a 2-core machine.) Buffering choices keep nginx off the disk so the
comparison measures proxying, not temp files: request bodies are streamed
(proxy_request_buffering off, like HAProxy and pyproxy) and responses are buffered in memory only
(proxy_max_temp_file_size 0).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SMALL_BODY = "0123456789abcdef"  # the fixed 16-byte body of /small
BIG_FILE_BYTES = 10 * 1024 * 1024  # /big, 10 MiB
UPLOAD_LIMIT = "2m"  # room for the 1 MiB POST bodies of scenario 5
# Per-process connection ceiling, well above 10,000 idle clients + upstream sockets, and below
# the file-descriptor limit the harness can give its children (often a hard limit of 20,000).
MAX_CONNECTIONS = 16384
IDLE_TIMEOUT_S = 120  # longer than any run, so idle connections are not reaped mid-measurement
BACKLOG = 4096  # net.core.somaxconn caps it anyway; c=1000 connects all at once


@dataclass(frozen=True)
class ProxyShape:
    """What every proxy under test shares."""
    port: int
    backend_ports: list[int]
    workers: int
    keepalive_per_server: int
    admin_port: int = 0  # pyproxy with workers: its admin /status says how requests split between them
    # A second listener with TLS, HTTP/2 by ALPN (the h2 scenarios); 0: none. Same routes and upstreams.
    tls_port: int = 0
    tls_cert: str = ""
    tls_key: str = ""


@dataclass(frozen=True)
class Layout:
    """Where one server keeps its files inside the run's temporary directory."""
    root: Path
    name: str

    @property
    def config(self) -> Path:
        suffix = {"haproxy": ".cfg", "pyproxy": ".toml", "pyproxy-1w": ".toml",
                  "python-pyproxy": ".json"}.get(self.name, ".conf")
        return self.root / f"{self.name}{suffix}"

    @property
    def work_dir(self) -> Path:
        return self.root / f"{self.name}-work"


def _nginx_common(layout: Layout, workers: int) -> str:
    work = layout.work_dir
    return f"""daemon off;
master_process on;
worker_processes {workers};
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections {MAX_CONNECTIONS}; }}
"""


def _nginx_http_common(layout: Layout) -> str:
    work = layout.work_dir
    temp = "\n".join(f"    {kind}_temp_path {work}/{kind};"
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""    access_log off;
{temp}
    keepalive_requests 100000000;
    keepalive_timeout {IDLE_TIMEOUT_S}s;
    sendfile on;
    tcp_nopush on;
"""


def backend_nginx(layout: Layout, ports: list[int], www: Path, workers: int) -> str:
    """Backends: one nginx, one server block per port, each serving /small, /big and /upload."""
    servers = "".join(_backend_server(port, www) for port in ports)
    return (_nginx_common(layout, workers)
            + "http {\n" + _nginx_http_common(layout) + servers + "}\n")


def _backend_server(port: int, www: Path) -> str:
    # /upload reads the whole request body before answering, as most applications do: `mirror`
    # (with mirror_request_body on, its default) reads the body into memory first; the static
    # handler then refuses POST on www/upload with 405, which error_page turns into 200 "ok".
    # A bare `return 200` would answer early and discard the body afterwards, which makes nginx
    # (proxy_request_buffering off) close client connections: noise, not a proxy measurement.
    return f"""    server {{
        listen 127.0.0.1:{port} backlog={BACKLOG};
        client_max_body_size {UPLOAD_LIMIT};
        location = /small {{ default_type text/plain; return 200 "{SMALL_BODY}"; }}
        location = /big {{ root {www}; default_type application/octet-stream; }}
        location = /upload {{
            client_body_buffer_size {UPLOAD_LIMIT};
            mirror /upload-mirror;
            root {www};
            error_page 405 =200 /upload-ok;
        }}
        location = /upload-mirror {{ internal; return 204; }}
        location = /upload-ok {{ internal; default_type text/plain; return 200 "ok"; }}
    }}
"""


def nginx_proxy(layout: Layout, shape: ProxyShape) -> str:
    servers = "".join(f"        server 127.0.0.1:{p};\n" for p in shape.backend_ports)
    keepalive = shape.keepalive_per_server * len(shape.backend_ports)
    return (_nginx_common(layout, shape.workers) + "http {\n" + _nginx_http_common(layout) + f"""
    upstream backends {{
{servers}        keepalive {keepalive};
        keepalive_requests 100000000;
    }}
    server {{
        listen 127.0.0.1:{shape.port} backlog={BACKLOG};
{_nginx_tls_listen(shape)}        client_max_body_size {UPLOAD_LIMIT};
        location / {{
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering off;
            proxy_max_temp_file_size 0;
        }}
    }}
}}
""")


def _nginx_tls_listen(shape: ProxyShape) -> str:
    """The h2 scenarios' listener in the same server block. `listen ... ssl http2` is the syntax
    nginx before 1.25.1 (Debian 12's 1.22) knows; newer ones accept it with a deprecation warning."""
    if not shape.tls_port:
        return ""
    return (f"        listen 127.0.0.1:{shape.tls_port} ssl http2 backlog={BACKLOG};\n"
            f"        ssl_certificate {shape.tls_cert};\n        ssl_certificate_key {shape.tls_key};\n")


def haproxy(shape: ProxyShape) -> str:
    servers = "".join(f"    server b{i} 127.0.0.1:{p} pool-max-conn {shape.keepalive_per_server}\n"
                      for i, p in enumerate(shape.backend_ports, 1))
    return f"""global
    nbthread {shape.workers}
    maxconn {MAX_CONNECTIONS}
    # HAProxy sizes its fd limit as 2 x maxconn and, by default, refuses to start when it cannot
    # raise RLIMIT_NOFILE that far; idle clients hold no server connection, so a warning will do.
    no strict-limits

defaults
    mode http
    maxconn {MAX_CONNECTIONS}
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client {IDLE_TIMEOUT_S}s
    timeout server {IDLE_TIMEOUT_S}s
    timeout http-keep-alive {IDLE_TIMEOUT_S}s

frontend bench
    bind 127.0.0.1:{shape.port}
    default_backend backends

backend backends
    balance roundrobin
{servers}"""


def pyproxy(shape: ProxyShape) -> str:
    """TOML per docs/configuration.md. max_connections and idle_timeout are raised like the
    others' limits so scenario 6 (10,000 idle clients) measures memory, not a refusal. With an
    admin port, [admin] listens there (the per-worker split comes from /status)."""
    servers = ", ".join(f'"127.0.0.1:{p}"' for p in shape.backend_ports)
    admin = f'\n[admin]\nlisten = "127.0.0.1:{shape.admin_port}"\n' if shape.admin_port else ""
    listen = f'"127.0.0.1:{shape.port}"'
    if shape.tls_port:
        listen = (f'["127.0.0.1:{shape.port}", {{ address = "127.0.0.1:{shape.tls_port}", '
                  f'tls_cert = "{shape.tls_cert}", tls_key = "{shape.tls_key}" }}]')
    return f"""[server]
listen = {listen}
workers = {shape.workers}
max_connections = {MAX_CONNECTIONS}
idle_timeout = "{IDLE_TIMEOUT_S}s"
graceful_timeout = "2s"

[log]
level = "warning"
access = "off"
{admin}
[[routes]]
path = "/"
upstream = "backends"

[upstreams.backends]
servers = [{servers}]
policy = "round_robin"
keepalive = {shape.keepalive_per_server}
"""


def python_pyproxy(shape: ProxyShape) -> str:
    """JSON for python-pyproxy's `pyproxy start FILE` (its ProxyConfig): one route / to both backends,
    round robin (its default), no access log, timeouts raised like the others'. It is one asyncio
    process whatever shape.workers says, and keeps up to 64 idle connections per backend (a fixed
    pool: 0.2.2 does not read the route's pool_size), so keepalive_per_server does not apply."""
    targets = [{"host": "127.0.0.1", "port": port} for port in shape.backend_ports]
    return json.dumps({
        "server": {"bind_host": "127.0.0.1", "bind_port": shape.port, "backlog": BACKLOG,
                   "keepalive_timeout": IDLE_TIMEOUT_S, "read_timeout": IDLE_TIMEOUT_S,
                   "write_timeout": IDLE_TIMEOUT_S, "max_connections": 0},
        "logging": {"level": "warning", "format": "text", "access_log": False},
        "routes": [{"path": "/", "upstream": {"targets": targets}}],
    }, indent=2) + "\n"


def write_www(www: Path) -> None:
    """The backends' document root: the 10 MiB /big and the file behind /upload (see above)."""
    write_big_file(www / "big")
    (www / "upload").write_text("ok\n")


def write_big_file(path: Path, size: int = BIG_FILE_BYTES) -> None:
    """A fixed, non-zero pattern (no sparse file, so the page cache holds real data)."""
    block = bytes(range(256)) * 4096  # 1 MiB
    with open(path, "wb") as big:
        for _ in range(size // len(block)):
            big.write(block)
        big.write(block[: size % len(block)])
