"""HAProxy in front of pyproxy, as in production: HAProxy relays TCP and writes a PROXY header
(``send-proxy-v2`` and ``send-proxy``) before the client's bytes, TLS included. pyproxy runs as a real
process with ``workers = 2``; the backend must see the client's address in X-Forwarded-For and the
access log must show it. Clients connect from 127.0.0.5, HAProxy reaches pyproxy from 127.0.0.1 (the
trusted proxy). Skipped when haproxy is not installed.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess

import pytest
import trustme

from tests.support.client import RawClient
from tests.support.ports import free_port, port_open
from tests.support.processes import running_proxy
from tests.support.timing import wait_for

pytestmark = [pytest.mark.timeout(90),
              pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed")]

CLIENT = "127.0.0.5"
CLIENT_TIMEOUT = 10.0
START_TIMEOUT = 10.0


@contextlib.contextmanager
def running_haproxy(tmp_path, routes: dict[int, str]):
    """haproxy in TCP mode: each listen port in ``routes`` relays to the "server" line it maps to."""
    sections = ["defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 30s\n    timeout server 30s\n"]
    for index, (port, server) in enumerate(routes.items()):
        sections.append(f"listen relay{index}\n    bind 127.0.0.1:{port}\n    server pyproxy {server}\n")
    config = tmp_path / "haproxy.cfg"
    config.write_text("\n".join(sections))
    log = open(tmp_path / "haproxy.log", "wb")
    proc = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        def accepting() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"haproxy exited: {(tmp_path / 'haproxy.log').read_text()}")
            return all(port_open(port) for port in routes)
        wait_for(accepting, START_TIMEOUT, what="haproxy to accept connections")
        yield
    finally:
        proc.kill()
        proc.wait(START_TIMEOUT)
        log.close()


def _request(port: int, context: ssl.SSLContext | None = None) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT, source_address=(CLIENT, 0)) as sock:
        stream = context.wrap_socket(sock, server_hostname="app.test") if context else sock
        stream.sendall(b"GET /through-haproxy HTTP/1.1\r\nHost: app.test\r\nX-Forwarded-For: 10.6.6.6\r\n\r\n")
        return RawClient(stream).read_response().status


def test_haproxy_send_proxy_v1_and_v2_in_front_of_pyproxy_with_workers(make_backend, tmp_path):
    ca = trustme.CA()
    leaf = ca.issue_cert("app.test")
    leaf.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    leaf.private_key_pem.write_to_path(tmp_path / "key.pem")
    backend = make_backend()
    plain, proxied, proxied_tls = free_port(), free_port(), free_port()
    access_log = tmp_path / "access.log"
    config = f"""
[server]
# The first listener is plain: the test harness checks readiness on it.
listen = [
  "127.0.0.1:{plain}",
  {{ address = "127.0.0.1:{proxied}", proxy_protocol = true }},
  {{ address = "127.0.0.1:{proxied_tls}", proxy_protocol = true, tls_cert = "{tmp_path / 'cert.pem'}", tls_key = "{tmp_path / 'key.pem'}" }},
]
trusted_proxies = ["127.0.0.1"]
workers = 2
min_threads = 2

[log]
level = "info"
access = "{access_log}"

[[routes]]
path = "/"
upstream = "app"

[upstreams.app]
servers = ["{backend.address}"]
"""
    v2_port, v1_port, tls_port = free_port(), free_port(), free_port()
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with running_proxy(tmp_path, config) as run, running_haproxy(tmp_path, {
            v2_port: f"127.0.0.1:{proxied} send-proxy-v2",
            v1_port: f"127.0.0.1:{proxied} send-proxy",
            tls_port: f"127.0.0.1:{proxied_tls} send-proxy-v2"}):
        for port, tls in ((v2_port, None), (v1_port, None), (tls_port, context)):
            before = len(backend.requests)
            assert _request(port, tls) == 200, run.log()
            wait_for(lambda: len(backend.requests) > before, timeout=10)
            # The client's own X-Forwarded-For is not believed: it is not a trusted proxy.
            assert backend.last.header_all("x-forwarded-for") == [CLIENT]
            assert backend.last.header("x-forwarded-proto") == ("https" if tls else "http")
        wait_for(lambda: access_log.exists() and access_log.read_text().count("/through-haproxy") == 3,
                 timeout=10, what="three access log lines", on_timeout=run.log)
    lines = [line for line in access_log.read_text().splitlines() if "/through-haproxy" in line]
    assert all(line.startswith(f"{CLIENT} ") for line in lines), lines
