"""``redirect_https`` behind a load balancer that ends TLS and forwards the decrypted requests to the
redirecting listener: its ``X-Forwarded-Proto: https`` routes the request instead of redirecting it
again (an endless loop otherwise), but only from a peer in ``server.trusted_proxies``."""

from __future__ import annotations

import socket

import pytest

from core.socket_server import bind_listener
from proxy.config.schema import parse_config
from proxy.serve.runner import ProxyProcess
from tests.support.client import RawClient, RawResponse
from tests.support.ports import free_port
from tests.support.processes import running_proxy
from tests.support.proxy import CLIENT_TIMEOUT, PROXY_STOP_TIMEOUT, proxy_config_dict

pytestmark = pytest.mark.timeout(60)

TRUSTED, UNTRUSTED = "127.0.0.1", "127.0.0.2"


@pytest.fixture
def behind_tls(make_backend):
    """``make(server=..., listen=...)``: a proxy whose only listener has ``redirect_https``."""
    started = []

    def make(server: dict | None = None, listen: dict | None = None):
        backend = make_backend()
        sock = bind_listener("127.0.0.1", 0)
        port = sock.getsockname()[1]
        listener = {"address": f"127.0.0.1:{port}", "redirect_https": True, **(listen or {})}
        document = proxy_config_dict({"app": [backend.address]}, server={"listen": [listener], **(server or {})})
        config = parse_config(document, "test.toml")
        process = ProxyProcess(config, listeners=[(config.server.listen[0], sock)])
        thread = process.start_in_thread()
        started.append((process, thread))
        process.port, process.backend, process.document = port, backend, document
        return process

    yield make
    for process, thread in started:
        process.stop(force=True)
        thread.join(PROXY_STOP_TIMEOUT)


def _get(port: int, *fields: str, source: str = TRUSTED, before: bytes = b"") -> RawResponse:
    """GET /a?b=c with these header fields, from ``source``; ``before`` is sent first (a PROXY header)."""
    head = "GET /a?b=c HTTP/1.1\r\nHost: www.example.com\r\n" + "".join(f"{field}\r\n" for field in fields) + "\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT, source_address=(source, 0)) as sock:
        sock.sendall(before + head.encode("latin-1"))
        return RawClient(sock).read_response()


def _redirected(response: RawResponse) -> bool:
    return response.status == 308 and response.header("Location") == "https://www.example.com/a?b=c"


@pytest.mark.parametrize("fields", [
    ["X-Forwarded-Proto: https"],
    ["X-Forwarded-Proto: HTTPS"],                                 # compared case-insensitively
    ["X-Forwarded-Proto:  https "],
    ["X-Forwarded-Proto: http, https"],                           # the nearest value decides
    ["X-Forwarded-Proto: http", "X-Forwarded-Proto: https"],      # also over several fields
])
def test_https_from_a_trusted_proxy_is_routed(behind_tls, fields):
    proxy = behind_tls(server={"trusted_proxies": [TRUSTED]})
    response = _get(proxy.port, *fields)
    assert response.status == 200, response.head
    assert proxy.backend.last.path == "/a?b=c"


@pytest.mark.parametrize("fields", [
    [],
    ["X-Forwarded-Proto: http"],
    ["X-Forwarded-Proto: https, http"],
    ["X-Forwarded-Proto: https", "X-Forwarded-Proto: http"],
    ["X-Forwarded-Proto: https,"],                                # the nearest value is empty
    ["X-Forwarded-Proto: httpsx"],
])
def test_anything_but_https_from_a_trusted_proxy_is_redirected(behind_tls, fields):
    proxy = behind_tls(server={"trusted_proxies": [TRUSTED]})
    assert _redirected(_get(proxy.port, *fields))
    assert proxy.backend.requests == []


def test_https_from_an_untrusted_client_is_redirected(behind_tls):
    proxy = behind_tls(server={"trusted_proxies": [TRUSTED]})
    assert _redirected(_get(proxy.port, "X-Forwarded-Proto: https", source=UNTRUSTED))
    assert proxy.backend.requests == []


def test_without_trusted_proxies_nobody_is_believed(behind_tls):
    proxy = behind_tls()
    assert _redirected(_get(proxy.port, "X-Forwarded-Proto: https"))
    assert proxy.backend.requests == []


def test_a_reload_that_drops_the_proxy_from_the_list_redirects_it_again(behind_tls):
    proxy = behind_tls(server={"trusted_proxies": [TRUSTED]})
    assert _get(proxy.port, "X-Forwarded-Proto: https").status == 200
    proxy.document["server"]["trusted_proxies"] = ["192.0.2.1"]
    proxy.reload(parse_config(proxy.document, "test.toml"))  # what SIGHUP runs with the file's config
    assert _redirected(_get(proxy.port, "X-Forwarded-Proto: https"))


# -- what the upstream is told ------------------------------------------------------------------------------
@pytest.mark.parametrize("listen,source,sent,forwarded", [
    ({}, TRUSTED, "https", "https"),                      # the balancer ended TLS: the app is told so
    ({"redirect_https": False}, TRUSTED, "https", "https"),  # on any listener, not only a redirecting one
    ({"redirect_https": False}, TRUSTED, "HTTP", "http"),
    ({"redirect_https": False}, TRUSTED, "gopher", "http"),  # not a scheme: the connection's own
    ({"redirect_https": False}, UNTRUSTED, "https", "http"),  # a client's own word changes nothing
])
def test_the_upstream_is_told_the_scheme_a_trusted_proxy_saw(behind_tls, listen, source, sent, forwarded):
    proxy = behind_tls(server={"trusted_proxies": [TRUSTED]}, listen=listen)
    assert _get(proxy.port, f"X-Forwarded-Proto: {sent}", source=source).status == 200
    assert proxy.backend.last.header_all("x-forwarded-proto") == [forwarded]


def test_without_trusted_proxies_the_upstream_is_told_the_connection_scheme(behind_tls):
    proxy = behind_tls(listen={"redirect_https": False})
    assert _get(proxy.port, "X-Forwarded-Proto: https").status == 200
    assert proxy.backend.last.header_all("x-forwarded-proto") == ["http"]


# -- behind a PROXY protocol header: its client is the peer whose word counts ------------------------------
@pytest.mark.parametrize("header,routed", [
    (b"PROXY TCP4 10.0.0.9 10.0.0.1 51234 80\r\n", True),        # a trusted proxy's connection, relayed
    (b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 80\r\n", False),    # a client's own header: not believed
    (b"PROXY UNKNOWN\r\n", False),                                # names nobody: the bytes are someone else's
])
def test_behind_a_proxy_protocol_header(behind_tls, header, routed):
    proxy = behind_tls(server={"trusted_proxies": [TRUSTED, "10.0.0.0/8"], "header_timeout": "10s"},
                       listen={"proxy_protocol": True})
    response = _get(proxy.port, "X-Forwarded-Proto: https", before=header)
    if routed:
        assert response.status == 200 and proxy.backend.last.path == "/a?b=c"
    else:
        assert _redirected(response) and proxy.backend.requests == []


# -- with worker processes ---------------------------------------------------------------------------------
REQUESTS_PER_CASE = 8  # on fresh connections, so that both workers are likely to answer some


def test_with_two_workers(make_backend, tmp_path):
    backend = make_backend()
    plain, redirecting = free_port(), free_port()
    # The first listener is the one the harness waits on (its /ready must be a 200, not a 308).
    config = f"""
[server]
listen = [{{ address = "127.0.0.1:{plain}" }}, {{ address = "127.0.0.1:{redirecting}", redirect_https = true }}]
workers = 2
min_threads = 4
trusted_proxies = ["{TRUSTED}"]

[log]
access = "off"

[[routes]]
path = "/"
upstream = "app"

[upstreams.app]
servers = ["{backend.address}"]
"""
    with running_proxy(tmp_path, config):
        for _ in range(REQUESTS_PER_CASE):
            assert _get(redirecting, "X-Forwarded-Proto: https").status == 200
            assert _redirected(_get(redirecting, "X-Forwarded-Proto: https", source=UNTRUSTED))
            assert _redirected(_get(redirecting, "X-Forwarded-Proto: http"))
