"""The PROXY protocol: listeners with ``proxy_protocol = true`` and upstreams with ``send_proxy_protocol``.

First the header alone (parsing at every split point, building, malformed input), the throttled log
and the config reader; then the real proxy on 127.0.0.1 with headers written by hand (v1 and v2, IPv4
and IPv6, LOCAL, UNKNOWN, malformed, stalled, from an untrusted peer, before TLS), and an upstream that
parses the headers pyproxy sends. HAProxy in front of pyproxy is in test_proxy_protocol_haproxy.py.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading

import pytest
import trustme

from core.socket_server import bind_listener
from proxy.config.schema import ConfigError, parse_config
from proxy.http.proxy_protocol import (Origin, ProxyHeaderError, ThrottledLog, V2_SIGNATURE, build_header,
                                       header_length, parse_header)
from proxy.routing.table import routing_table_lines
from proxy.serve.runner import ProxyProcess
from proxy.upstream.pool import ServerPool
from tests.support.client import RawClient
from tests.support.proxy import CLIENT_TIMEOUT, PROXY_STOP_TIMEOUT, RunningProxy, proxy_config_dict
from tests.support.proxy_protocol_backend import ProxyProtocolBackend
from tests.support.timing import FakeClock, wait_for

pytestmark = pytest.mark.timeout(60)

GET = b"GET /who HTTP/1.1\r\nHost: app.test\r\n\r\n"


def v2(command: int, family: int, body: bytes) -> bytes:
    return V2_SIGNATURE + bytes((0x20 | command, family)) + struct.pack("!H", len(body)) + body


V2_TCP4 = v2(1, 0x11, socket.inet_aton("203.0.113.7") + socket.inet_aton("10.0.0.1") + struct.pack("!HH", 51234, 443))
V2_TCP6 = v2(1, 0x21, socket.inet_pton(socket.AF_INET6, "2001:db8::7") + socket.inet_pton(socket.AF_INET6, "2001:db8::1")
             + struct.pack("!HH", 40000, 443))
V2_LOCAL = v2(0, 0x00, b"")
TLVS = bytes((0x01, 0x00, 0x02)) + b"h2" + bytes((0xEA, 0x00, 0x05)) + b"vpc-1"  # ALPN, an AWS TLV: skipped
V2_TCP4_TLVS = v2(1, 0x11, socket.inet_aton("198.51.100.9") + socket.inet_aton("10.0.0.1")
                  + struct.pack("!HH", 1, 80) + TLVS)


# -- the header alone ---------------------------------------------------------------------------------

@pytest.mark.parametrize("header, origin", [
    (b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n", Origin("203.0.113.7", 51234, "10.0.0.1", 443)),
    (b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 443\r\n", Origin("2001:db8::7", 40000, "2001:db8::1", 443)),
    (b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n", Origin("0.0.0.0", 0, "255.255.255.255", 65535)),
    (b"PROXY UNKNOWN\r\n", None),
    (b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n", None),  # the rest is ignored
    (V2_TCP4, Origin("203.0.113.7", 51234, "10.0.0.1", 443)),
    (V2_TCP6, Origin("2001:db8::7", 40000, "2001:db8::1", 443)),
    (V2_TCP4_TLVS, Origin("198.51.100.9", 1, "10.0.0.1", 80)),
    (V2_LOCAL, None),
    (v2(1, 0x00, b""), None),                      # PROXY with UNSPEC: keep the peer
    (v2(1, 0x12, b"\x00" * 12), None),             # UDP over IPv4: not a TCP client
    (v2(1, 0x31, b"\x00" * 216), None),            # a UNIX socket
    (v2(0, 0x11, b"\x00" * 12), None),             # LOCAL ignores whatever addresses it has
])
def test_headers_parse_at_every_split_point(header, origin):
    for split in range(len(header)):
        # too little to tell (or, for v2, the length field already read), never an error
        assert header_length(header[:split]) in (None, len(header)), split
    assert header_length(header) == len(header)
    assert header_length(header + b"\x16\x03\x01GET / HTTP/1.1") == len(header)  # what follows is not taken
    assert parse_header(header) == origin


@pytest.mark.parametrize("data, problem", [
    (b"GET / HTTP/1.1\r\n\r\n", "no PROXY header"),
    (b"\x16\x03\x01\x02\x00\x01\x00", "no PROXY header"),            # a TLS ClientHello
    (b"PROXY TCP4 " + b"1" * 120, "longer than 107 bytes"),
    (b"\r\n\r\n\x00\r\nQUIX\n", "no PROXY header"),
    (b"PROXY\r\n", "no PROXY header"),
    (b"proxy TCP4 ", "no PROXY header"),
])
def test_what_cannot_start_a_header_is_refused_early(data, problem):
    with pytest.raises(ProxyHeaderError, match=problem):
        header_length(data)


@pytest.mark.parametrize("header, problem", [
    (b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\n", "CRLF"),
    (b"PROXY TCP4 203.0.113.7 10.0.0.1 51234\r\n", "exactly"),
    (b"PROXY TCP4 203.0.113.7  10.0.0.1 51234 443\r\n", "exactly"),  # two spaces
    (b"PROXY TCP4 203.0.113.007 10.0.0.1 51234 443\r\n", "not an IP address"),  # leading zeros
    (b"PROXY TCP4 2001:db8::7 10.0.0.1 51234 443\r\n", "not an IPv4 address"),
    (b"PROXY TCP6 203.0.113.7 2001:db8::1 51234 443\r\n", "not an IPv6 address"),
    (b"PROXY TCP4 203.0.113.7 10.0.0.1 65536 443\r\n", "port"),
    (b"PROXY TCP4 203.0.113.7 10.0.0.1 0443 443\r\n", "port"),
    (b"PROXY TCP4 203.0.113.7 10.0.0.1 -1 443\r\n", "port"),
    (b"PROXY UDP4 203.0.113.7 10.0.0.1 1 2\r\n", "not TCP4, TCP6 or UNKNOWN"),
    (V2_SIGNATURE + bytes((0x10, 0x11, 0, 0)), "version 1"),
    (V2_SIGNATURE + bytes((0x22, 0x11, 0, 0)), "unknown command 2"),
    (v2(1, 0x11, b"\x00" * 11), "needs 12"),
    (v2(1, 0x21, b"\x00" * 12), "needs 36"),
])
def test_malformed_headers_are_refused(header, problem):
    with pytest.raises(ProxyHeaderError, match=problem):
        parse_header(header[:header_length(header)])


@pytest.mark.parametrize("origin", [
    Origin("203.0.113.7", 51234, "10.0.0.1", 443),
    Origin("2001:db8::7", 40000, "2001:db8::1", 8443),
])
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_built_headers_read_back(version, origin):
    header = build_header(version, origin)
    assert header_length(header) == len(header)
    assert parse_header(header) == origin


def test_built_headers_without_a_client_are_local_and_unknown():
    assert build_header("v1", None) == b"PROXY UNKNOWN\r\n"
    assert build_header("v2", None) == V2_SIGNATURE + b"\x20\x00\x00\x00"
    assert parse_header(build_header("v2", None)) is None


def test_built_headers_put_both_addresses_in_one_family():
    mapped = Origin("::ffff:192.0.2.5", 1000, "::ffff:127.0.0.1", 8080)  # a dual-stack listener's IPv4 peer
    assert build_header("v1", mapped) == b"PROXY TCP4 192.0.2.5 127.0.0.1 1000 8080\r\n"
    mixed = Origin("2001:db8::7", 1000, "10.0.0.1", 80)  # the client on IPv6, the hop after it on IPv4
    assert parse_header(build_header("v2", mixed)) == Origin("2001:db8::7", 1000, "::ffff:10.0.0.1", 80)


def test_throttled_log_keeps_a_flood_to_a_few_lines(caplog):
    clock = FakeClock()
    throttled = ThrottledLog(logging.getLogger("test.throttled"), limit=3, interval=60.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="test.throttled"):
        for index in range(1000):
            throttled.warning("bad header %d", index)
        assert [r.getMessage() for r in caplog.records] == ["bad header 0", "bad header 1", "bad header 2"]
        clock.advance(61)
        throttled.warning("later")
    assert [r.getMessage() for r in caplog.records][3:] == [
        "997 more such lines were left out in the last 60s", "later"]


# -- the config -----------------------------------------------------------------------------------------

def _config(listen, **server):
    document = proxy_config_dict({"app": ["127.0.0.1:9"]}, server={"listen": listen, **server})
    return parse_config(document, "pp.toml")


def test_proxy_protocol_needs_trusted_proxies():
    with pytest.raises(ConfigError) as caught:
        _config([{"address": "127.0.0.1:8080", "proxy_protocol": True}])
    assert "pp.toml: server.listen[0].proxy_protocol: needs server.trusted_proxies" in str(caught.value)
    config = _config([{"address": "127.0.0.1:8080", "proxy_protocol": True}], trusted_proxies=["10.0.0.0/8"])
    assert config.server.listen[0].proxy_protocol
    assert not _config("127.0.0.1:8080").server.listen[0].proxy_protocol  # off unless asked for


def test_pyproxy_check_shows_both_ends():
    document = proxy_config_dict({"app": ["127.0.0.1:9"]}, upstream_options={"send_proxy_protocol": "v1"},
                                 server={"listen": [{"address": "127.0.0.1:8080", "proxy_protocol": True}],
                                         "trusted_proxies": ["10.0.0.0/8"]})
    text = "\n".join(routing_table_lines(parse_config(document, "pp.toml")))
    assert "127.0.0.1:8080 (PROXY protocol)" in text
    assert "sends a PROXY protocol v1 header on each new connection" in text


@pytest.mark.parametrize("document_change, problem", [
    ({"server": {"listen": [{"address": "127.0.0.1:80", "proxy_protocol": "yes"}], "trusted_proxies": ["::1"]}},
     'server.listen[0].proxy_protocol: expected true or false, got "yes"'),
    ({"admin": {"listen": {"address": "127.0.0.1:9901", "proxy_protocol": True}}},
     "admin.listen.proxy_protocol: only for server.listen"),
    ({"upstreams": {"app": {"servers": ["127.0.0.1:9"], "send_proxy_protocol": "v3"}}},
     'upstreams.app.send_proxy_protocol: "v3" is not one of v1 | v2'),
])
def test_config_problems_name_the_key(document_change, problem):
    document = proxy_config_dict({"app": ["127.0.0.1:9"]})
    for section, value in document_change.items():
        document[section] = {**document.get(section, {}), **value}
    with pytest.raises(ConfigError) as caught:
        parse_config(document, "pp.toml")
    assert f"pp.toml: {problem}" in str(caught.value)


# -- the proxy, headers by hand ------------------------------------------------------------------------

class ProxiedListener(RunningProxy):
    """The proxy with one proxy_protocol listener on a free port of 127.0.0.1."""

    def connect(self, source: str = "127.0.0.1") -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=CLIENT_TIMEOUT, source_address=(source, 0))


@pytest.fixture
def proxied():
    running = []

    def factory(upstreams: dict, listen: dict | None = None, server: dict | None = None, access_log=None,
                host: str = "127.0.0.1", **options):
        sock = bind_listener(host, 0)  # host "": every address, dual-stack
        port = sock.getsockname()[1]
        listen = {"address": f"{host}:{port}", "proxy_protocol": True, **(listen or {})}
        settings = {"listen": [listen], "trusted_proxies": ["127.0.0.1"], "header_timeout": "10s", **(server or {})}
        document = proxy_config_dict(upstreams, server=settings, **options)
        if access_log is not None:
            document["log"]["access"] = str(access_log)
        config = parse_config(document, "test.toml")
        process = ProxyProcess(config, listeners=[(config.server.listen[0], sock)])
        proxy = ProxiedListener(process, process.start_in_thread(), port)
        proxy.document = document  # for a test that reloads a changed copy
        running.append(proxy)
        return proxy

    yield factory
    for proxy in running:
        proxy.process.stop(force=True)
        proxy.thread.join(PROXY_STOP_TIMEOUT)


def _exchange(proxy, *parts: bytes, source: str = "127.0.0.1"):
    with proxy.connect(source) as sock:
        for part in parts:
            sock.sendall(part)
        return RawClient(sock).read_response()


def _closed_without_answer(sock: socket.socket) -> bool:
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("header, client", [
    (b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n", "203.0.113.7"),
    (b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 443\r\n", "2001:db8::7"),
    (V2_TCP4_TLVS, "198.51.100.9"),
    (V2_TCP6, "2001:db8::7"),
    (V2_LOCAL, "127.0.0.1"),                    # the balancer's own health check: the peer it is
    (b"PROXY UNKNOWN\r\n", "127.0.0.1"),
    # A balancer on a dual-stack socket names IPv4 clients mapped: written as the kernel writes them.
    (b"PROXY TCP6 ::ffff:203.0.113.7 ::ffff:10.0.0.1 51234 443\r\n", "::ffff:203.0.113.7"),
    (v2(1, 0x21, socket.inet_pton(socket.AF_INET6, "::ffff:198.51.100.9") + socket.inet_pton(socket.AF_INET6, "::1")
        + struct.pack("!HH", 1, 80)), "::ffff:198.51.100.9"),
])
def test_the_carried_address_is_the_client(make_backend, proxied, header, client):
    backend = make_backend()
    proxy = proxied({"app": [backend.address]})
    # Sent whole, and the header byte by byte (the connection parks between the pieces).
    assert _exchange(proxy, header + GET).status == 200
    assert backend.last.header("x-forwarded-for") == client
    assert _exchange(proxy, *(header[i:i + 1] for i in range(len(header))), GET).status == 200
    assert backend.last.header("x-forwarded-for") == client


def test_the_access_log_shows_the_carried_address(make_backend, proxied, tmp_path):
    backend = make_backend()
    access_log = tmp_path / "access.log"
    proxy = proxied({"app": [backend.address]}, access_log=access_log)
    assert _exchange(proxy, b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 443\r\n" + GET).status == 200
    wait_for(lambda: access_log.exists() and "/who" in access_log.read_text(), timeout=10)
    assert access_log.read_text().startswith('2001:db8::7 - - [')


def test_a_forwarded_for_header_from_the_carried_client_is_not_believed(make_backend, proxied):
    backend = make_backend()
    proxy = proxied({"app": [backend.address]})
    lie = b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 10.9.9.9\r\n\r\n"
    assert _exchange(proxy, b"PROXY TCP4 203.0.113.7 10.0.0.1 1 2\r\n" + lie).status == 200
    assert backend.last.header_all("x-forwarded-for") == ["203.0.113.7"]


@pytest.mark.parametrize("header", [b"PROXY UNKNOWN\r\n", V2_LOCAL, v2(1, 0x00, b"")])
def test_a_header_naming_no_client_does_not_make_the_client_a_trusted_proxy(make_backend, proxied, header):
    """HAProxy sends UNKNOWN (v1) or LOCAL (v2) for a client it cannot name: the bytes behind it are
    still the client's, so its X-Forwarded-For must not pass an allow list or name a fresh bucket,
    even though the peer (the balancer) is in trusted_proxies."""
    backend = make_backend()
    proxy = proxied({"app": [backend.address]},
                    routes=[{"path": "/inside", "upstream": "app", "allow": ["10.0.0.0/8"]},
                            {"path": "/", "upstream": "app", "rate_limit": {"requests": 1, "per": "1h"}}])
    claim = b"GET /inside HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 10.1.1.1\r\n\r\n"
    assert _exchange(proxy, header + claim).status == 403
    statuses = [_exchange(proxy, header + b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 10.0.0.%d\r\n\r\n" % n).status
                for n in range(3)]
    assert statuses == [200, 429, 429]
    assert backend.last.header_all("x-forwarded-for") == ["127.0.0.1"]  # replaced, not appended to


def test_allow_uses_the_carried_address(make_backend, proxied):
    backend = make_backend()
    proxy = proxied({"app": [backend.address]},
                    routes=[{"path": "/", "upstream": "app", "allow": ["203.0.113.0/24"]}])
    assert _exchange(proxy, b"PROXY TCP4 203.0.113.7 10.0.0.1 1 2\r\n" + GET).status == 200
    assert _exchange(proxy, b"PROXY TCP4 198.51.100.1 10.0.0.1 1 2\r\n" + GET).status == 403
    assert _exchange(proxy, V2_LOCAL + GET).status == 403  # the balancer itself is not allowed


def test_ip_hash_uses_the_carried_address(make_backend, proxied):
    """Every connection comes from 127.0.0.1; only the carried addresses can spread them (rendezvous
    hashing is deterministic: 16 addresses all on one of two servers would be a 1 in 32768 chance)."""
    backends = [make_backend(), make_backend()]
    proxy = proxied({"app": [b.address for b in backends]}, upstream_options={"policy": "ip_hash"})
    chosen = {}
    for host in range(1, 17):
        for _ in range(2):
            before = [len(b.requests) for b in backends]
            header = b"PROXY TCP4 203.0.113.%d 10.0.0.1 1 2\r\n" % host
            assert _exchange(proxy, header + GET).status == 200
            served = [i for i, b in enumerate(backends) if len(b.requests) > before[i]]
            assert chosen.setdefault(host, served) == served, f"203.0.113.{host} moved"
    assert sorted({tuple(v) for v in chosen.values()}) == [(0,), (1,)]


def test_a_rate_limit_keys_on_the_carried_address(make_backend, proxied, tmp_path):
    """Two clients behind one balancer (one TCP peer) get a bucket each; a refused request is logged
    with the address the header carried, as is a 403 on a route that client may not use."""
    backend = make_backend()
    access_log = tmp_path / "access.log"
    proxy = proxied({"app": [backend.address]}, access_log=access_log,
                    routes=[{"path": "/private", "upstream": "app", "deny": ["198.51.100.0/24"]},
                            {"path": "/", "upstream": "app", "rate_limit": {"requests": 1, "per": "1h"}}])
    first, second = (b"PROXY TCP4 203.0.113.%d 10.0.0.1 1 2\r\n" % n for n in (7, 8))
    assert [_exchange(proxy, first + GET).status for _ in range(2)] == [200, 429]
    assert _exchange(proxy, second + GET).status == 200
    assert _exchange(proxy, V2_TCP4 + GET).status == 429  # 203.0.113.7 again, in a v2 header
    denied = b"GET /private HTTP/1.1\r\nHost: app.test\r\n\r\n"
    assert _exchange(proxy, b"PROXY TCP4 198.51.100.1 10.0.0.1 1 2\r\n" + denied).status == 403
    assert len(backend.requests) == 2
    wait_for(lambda: access_log.exists() and len(access_log.read_text().splitlines()) == 5, timeout=10)
    # Each line is written after its answer went out, so two in quick succession may swap places.
    logged = [(line.split(" ")[0], line.split('" ')[1].split(" ")[0]) for line in access_log.read_text().splitlines()]
    assert sorted(logged) == [("198.51.100.1", "403"), ("203.0.113.7", "200"), ("203.0.113.7", "429"),
                              ("203.0.113.7", "429"), ("203.0.113.8", "200")]


@pytest.mark.parametrize("sent", [
    GET,                                                            # no header at all
    b"PROXY TCP4 203.0.113.7 10.0.0.1 99999 443\r\n" + GET,         # a bad port
    b"PROXY TCP4 " + b"1" * 200,                                    # no CRLF within 107 bytes
    V2_SIGNATURE + b"\x31\x11\x00\x0c" + b"\x00" * 12 + GET,        # v2 with version 3
])
def test_a_malformed_header_closes_the_connection_and_is_logged(make_backend, proxied, caplog, sent):
    backend = make_backend()
    proxy = proxied({"app": [backend.address]})
    with caplog.at_level(logging.WARNING, logger="pyproxy.handler"), proxy.connect() as sock:
        sock.sendall(sent)
        assert _closed_without_answer(sock)
        wait_for(lambda: "bad PROXY header" in caplog.text, timeout=5)
    assert "closed connection from 127.0.0.1: bad PROXY header" in caplog.text
    assert backend.requests == []


def test_a_close_in_the_middle_of_the_header_is_logged(make_backend, proxied, caplog):
    proxy = proxied({"app": [make_backend().address]})
    with caplog.at_level(logging.WARNING, logger="pyproxy.handler"):
        with proxy.connect() as sock:
            sock.sendall(b"PROXY TCP4 203.0")
            wait_for(lambda: proxy.process.server.connection_counts()["idle"] == 1, timeout=10)
        wait_for(lambda: "127.0.0.1: gone after 16 bytes of the PROXY header" in caplog.text, timeout=10)
        with proxy.connect():
            pass  # a connection that sends nothing (a balancer's TCP check) is not worth a line
        wait_for(lambda: proxy.process.server.connection_count == 0, timeout=10)
    assert caplog.text.count("closed connection") == 1


def test_a_peer_not_in_trusted_proxies_is_closed(make_backend, proxied, caplog):
    backend = make_backend()
    proxy = proxied({"app": [backend.address]}, server={"trusted_proxies": ["127.0.0.2"]})
    with caplog.at_level(logging.WARNING, logger="pyproxy.handler"):
        with proxy.connect("127.0.0.1") as sock:
            sock.sendall(b"PROXY TCP4 203.0.113.7 10.0.0.1 1 2\r\n" + GET)
            assert _closed_without_answer(sock)
        wait_for(lambda: "not in server.trusted_proxies" in caplog.text, timeout=5)
        assert _exchange(proxy, b"PROXY TCP4 203.0.113.7 10.0.0.1 1 2\r\n" + GET, source="127.0.0.2").status == 200
    assert "closed connection from 127.0.0.1: not in server.trusted_proxies" in caplog.text
    assert backend.last.header("x-forwarded-for") == "203.0.113.7"


def _dual_stack() -> bool:
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _dual_stack(), reason="no IPv6 sockets on this machine")
def test_a_dual_stack_listener_trusts_an_ipv4_balancer(make_backend, proxied):
    """On ":port" (IPv6 dual-stack) an IPv4 peer is reported as ::ffff:127.0.0.1; it is still the
    127.0.0.1 that trusted_proxies lists, as the docs' example (":8443", an IPv4 subnet) needs."""
    backend = make_backend()
    proxy = proxied({"app": [backend.address]}, host="")
    assert _exchange(proxy, b"PROXY TCP4 203.0.113.7 10.0.0.1 1 2\r\n" + GET).status == 200
    assert backend.last.header("x-forwarded-for") == "203.0.113.7"


def test_a_stalled_header_holds_no_worker_and_is_closed_after_header_timeout(make_backend, proxied, caplog):
    backend = make_backend()
    proxy = proxied({"app": [backend.address]}, server={"header_timeout": "1s", "min_threads": 1, "max_threads": 2})
    stalled = [proxy.connect() for _ in range(6)]
    with caplog.at_level(logging.WARNING, logger="pyproxy.handler"):
        try:
            for index, sock in enumerate(stalled):  # half a header of each kind, then silence
                sock.sendall(b"PROXY TCP4 203.0.1" if index % 2 else V2_TCP4[:14])
            wait_for(lambda: proxy.process.server.connection_counts()["idle"] == 6, timeout=10)
            assert proxy.process.pool.counts()["busy"] == 0
            # 6 stalled connections, 2 threads: a whole header and request is still served.
            assert _exchange(proxy, V2_TCP4 + GET).status == 200
            for sock in stalled:
                assert _closed_without_answer(sock)  # within header_timeout (the socket's own timeout bounds it)
            wait_for(lambda: caplog.text.count("no complete PROXY header within header_timeout") >= 6, timeout=10)
        finally:
            for sock in stalled:
                sock.close()
    assert "(18 bytes of it)" in caplog.text and "(14 bytes of it)" in caplog.text


def test_a_whole_header_with_no_request_behind_it_holds_no_worker(make_backend, proxied):
    """A balancer may open a connection and send its header before it has a request: meanwhile the
    connection waits parked, as a half-sent head does, and header_timeout still closes a silent one.
    (A request after such a wait: the header sent byte by byte in test_the_carried_address_is_the_client.)"""
    backend = make_backend()
    proxy = proxied({"app": [backend.address]}, server={"header_timeout": "1s", "min_threads": 1, "max_threads": 2})
    waiting = [proxy.connect() for _ in range(6)]
    try:
        for index, sock in enumerate(waiting):
            sock.sendall(b"PROXY TCP4 203.0.113.7 10.0.0.1 1 2\r\n" if index % 2 else V2_TCP4)
        wait_for(lambda: proxy.process.server.connection_counts()["idle"] == 6, timeout=10)
        assert proxy.process.pool.counts()["busy"] == 0
        assert _exchange(proxy, V2_TCP4 + GET).status == 200  # 6 waiting, 2 threads: still served
        for sock in waiting:
            assert _closed_without_answer(sock)  # within header_timeout (the socket's own timeout bounds it)
    finally:
        for sock in waiting:
            sock.close()


def test_a_connection_accepted_after_a_reload_shortened_header_timeout_keeps_the_new_one(make_backend, proxied):
    """A connection already queued when a reload changes header_timeout was cloned by the kernel with
    the old read timeout on its socket: after its PROXY header, the wait for the request is the new one."""
    backend = make_backend()
    proxy = proxied({"app": [backend.address]}, server={"header_timeout": "60s"})
    document = proxy.document
    document["server"]["header_timeout"] = "1s"
    shorter = parse_config(document, "test.toml")
    looping, queued, reloaded = threading.Event(), threading.Event(), threading.Event()

    def reload_with_a_connection_queued():  # on the loop thread, as SIGHUP and --watch reload
        looping.set()
        if queued.wait(CLIENT_TIMEOUT):
            proxy.process.reload(shorter)
        reloaded.set()

    proxy.process.server.call_soon(reload_with_a_connection_queued)
    assert looping.wait(CLIENT_TIMEOUT)
    with proxy.connect() as sock:  # handshaken by the kernel and queued: the loop is busy reloading
        sock.sendall(V2_TCP4)
        queued.set()
        assert reloaded.wait(CLIENT_TIMEOUT)
        assert _closed_without_answer(sock)  # after 1 s, not 60 s (the client gives up after 10 s)


def test_tls_after_the_proxy_header(make_backend, proxied, tmp_path):
    ca = trustme.CA()
    leaf = ca.issue_cert("app.test")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf.cert_chain_pems[0].write_to_path(cert)
    leaf.private_key_pem.write_to_path(key)
    backend = make_backend()
    proxy = proxied({"app": [backend.address]}, listen={"tls_cert": str(cert), "tls_key": str(key)})
    context = ssl.create_default_context()
    ca.configure_trust(context)
    for header, client in ((V2_TCP4, "203.0.113.7"), (b"PROXY TCP6 2001:db8::7 2001:db8::1 1 443\r\n", "2001:db8::7")):
        with proxy.connect() as raw:
            raw.sendall(header[:5])  # the header in two pieces, the ClientHello right behind the second
            wait_for(lambda: proxy.process.server.connection_counts()["idle"] >= 1, timeout=10)
            raw.sendall(header[5:])
            with context.wrap_socket(raw, server_hostname="app.test") as tls:
                tls.sendall(GET)
                response = RawClient(tls).read_response()
        assert response.status == 200
        assert backend.last.header("x-forwarded-for") == client
        assert backend.last.header("x-forwarded-proto") == "https"


def test_reload_turns_proxy_protocol_off_and_on(make_backend, proxied):
    backend = make_backend()
    proxy = proxied({"app": [backend.address]})
    assert _exchange(proxy, V2_TCP4 + GET).status == 200
    document = proxy.document
    document["server"]["listen"][0]["proxy_protocol"] = False
    proxy.process.reload(parse_config(document, "test.toml"))
    assert _exchange(proxy, GET).status == 200
    assert backend.last.header("x-forwarded-for") == "127.0.0.1"
    document["server"]["listen"][0]["proxy_protocol"] = True
    proxy.process.reload(parse_config(document, "test.toml"))
    assert _exchange(proxy, b"PROXY TCP4 192.0.2.1 10.0.0.1 1 2\r\n" + GET).status == 200
    assert backend.last.header("x-forwarded-for") == "192.0.2.1"


def _tls_pki(tmp_path):
    ca = trustme.CA()
    leaf = ca.issue_cert("app.test")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf.cert_chain_pems[0].write_to_path(cert)
    leaf.private_key_pem.write_to_path(key)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return {"tls_cert": str(cert), "tls_key": str(key)}, context


def test_a_handshake_under_way_when_a_reload_turns_proxy_protocol_on_completes(make_backend, proxied, tmp_path):
    files, context = _tls_pki(tmp_path)
    backend = make_backend()
    proxy = proxied({"app": [backend.address]}, listen={"proxy_protocol": False, **files})
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname="app.test")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    hello = outgoing.read()
    with proxy.connect() as sock:
        sock.sendall(hello[:10])
        wait_for(lambda: proxy.process.server.connection_counts()["idle"] == 1, timeout=10)
        proxy.document["server"]["listen"][0]["proxy_protocol"] = True
        proxy.process.reload(parse_config(proxy.document, "test.toml"))
        sock.sendall(hello[10:])
        for _ in range(10):  # TLS 1.3: one flight each way
            try:
                client.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                incoming.write(sock.recv(65536))
        client.write(GET)
        sock.sendall(outgoing.read())
        answer = b""
        while b"\r\n\r\n" not in answer:
            incoming.write(sock.recv(65536))
            try:
                answer += client.read(65536)
            except ssl.SSLWantReadError:
                continue
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert backend.last.header("x-forwarded-for") == "127.0.0.1"  # it began without a header, so none was read


def test_listeners_without_proxy_protocol_are_unchanged(make_backend, make_proxy):
    backend = make_backend()
    proxy = make_proxy({"app": [backend.address]}, server={"trusted_proxies": ["127.0.0.1"]})
    with proxy.connect() as sock:
        sock.sendall(b"PROXY TCP4 203.0.113.7 10.0.0.1 1 2\r\n" + GET)
        assert RawClient(sock).read_response().status == 400  # not a header here: a bad request line


# -- sending the header upstream ------------------------------------------------------------------------

@pytest.fixture
def pp_backend():
    backend = ProxyProtocolBackend().start()
    yield backend
    backend.stop()


def _get(proxy, source: str, *pooled_after: str) -> bytes:
    """One request from ``source`` on a new client connection; then wait until the pool holds idle
    connections for exactly the clients ``pooled_after`` names (the proxy releases the upstream
    connection just after the client has its answer)."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=CLIENT_TIMEOUT,
                                  source_address=(source, 0)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        response = RawClient(sock).read_response()
    assert response.status == 200
    pool = proxy.pool("app")
    wait_for(lambda: [c.client for c in pool._idle] == list(pooled_after), timeout=10,
             what=f"pooled connections for {pooled_after}")
    return response.body


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_send_proxy_protocol_names_the_client_and_pools_per_client(make_proxy, pp_backend, version):
    proxy = make_proxy({"app": [pp_backend.address]}, upstream_options={"send_proxy_protocol": version})
    # Each request on a new client connection: the upstream connection is what may be reused.
    first = [_get(proxy, "127.0.0.2", "127.0.0.2") for _ in range(3)]
    other = [_get(proxy, "127.0.0.3", "127.0.0.2", "127.0.0.3") for _ in range(2)]
    assert first == [b"0"] * 3, "one client's requests share its upstream connection"
    assert other == [b"1"] * 2, "another client never gets the first one's connection"
    assert _get(proxy, "127.0.0.2", "127.0.0.3", "127.0.0.2") == b"0"
    assert pp_backend.errors == []
    headers = pp_backend.headers
    assert [(h.version, h.command, h.src, h.dst, h.dst_port) for h in headers] == [
        (int(version[1]), "PROXY", "127.0.0.2", "127.0.0.1", proxy.port),
        (int(version[1]), "PROXY", "127.0.0.3", "127.0.0.1", proxy.port)]
    assert headers[0].src_port > 0


def test_send_proxy_protocol_carries_an_inbound_proxy_header_on(proxied, pp_backend):
    proxy = proxied({"app": [pp_backend.address]}, upstream_options={"send_proxy_protocol": "v2"})
    assert _exchange(proxy, V2_TCP6 + GET).status == 200
    header = pp_backend.headers[0]
    assert (header.src, header.src_port, header.dst, header.dst_port) == ("2001:db8::7", 40000, "2001:db8::1", 443)


def test_the_header_goes_before_tls_to_an_https_server(make_proxy, tmp_path):
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    backend = ProxyProtocolBackend(tls_context=context).start()
    try:
        ca.cert_pem.write_to_path(tmp_path / "ca.pem")
        proxy = make_proxy({"app": [f"https://{backend.address}"]},
                           upstream_options={"send_proxy_protocol": "v2", "tls_ca": str(tmp_path / "ca.pem")})
        assert _get(proxy, "127.0.0.2", "127.0.0.2") == b"0"
        assert backend.errors == []
        assert (backend.headers[0].command, backend.headers[0].src) == ("PROXY", "127.0.0.2")
    finally:
        backend.stop()


def test_a_full_pool_makes_room_for_the_latest_client(make_proxy, pp_backend):
    proxy = make_proxy({"app": [pp_backend.address]}, upstream_options={"send_proxy_protocol": "v1", "keepalive": 1})
    assert _get(proxy, "127.0.0.2", "127.0.0.2") == b"0"
    assert _get(proxy, "127.0.0.3", "127.0.0.3") == b"1"  # the pool holds one: 127.0.0.2's made room
    assert _get(proxy, "127.0.0.3", "127.0.0.3") == b"1"
    assert _get(proxy, "127.0.0.2", "127.0.0.2") == b"2"


def test_reload_starts_sending_the_header_on_new_connections(make_proxy, pp_backend):
    proxy = make_proxy({"app": [pp_backend.address]}, upstream_options={"send_proxy_protocol": "v1"})
    assert _get(proxy, "127.0.0.2", "127.0.0.2") == b"0"
    document = proxy_config_dict({"app": [pp_backend.address]}, upstream_options={"send_proxy_protocol": "v2"},
                                 server={"listen": f"127.0.0.1:{proxy.port}"})
    proxy.process.reload(parse_config(document, "test.toml"))
    assert _get(proxy, "127.0.0.2", "127.0.0.2") == b"1"  # a new pool: the v1 connection is not reused
    assert [h.version for h in pp_backend.headers] == [1, 2]


@pytest.mark.parametrize("version, command", [("v1", "UNKNOWN"), ("v2", "LOCAL")])
def test_health_checks_send_a_header_without_a_client(make_proxy, pp_backend, version, command):
    make_proxy({"app": [pp_backend.address]},
               upstream_options={"send_proxy_protocol": version,
                                 "health": {"path": "/healthz", "interval": "200ms", "timeout": "200ms"}})
    wait_for(lambda: any(line == "GET /healthz HTTP/1.1" for _, line in pp_backend.requests), timeout=10)
    index = next(i for i, line in pp_backend.requests if line == "GET /healthz HTTP/1.1")
    assert (pp_backend.headers[index].version, pp_backend.headers[index].command) == (int(version[1]), command)


def test_health_checks_on_another_port_send_no_header(make_proxy, make_backend, pp_backend):
    """health.port is a separate (admin) listener, which does not read PROXY headers: as in HAProxy,
    whose checks send one only to the traffic port unless check-send-proxy says otherwise."""
    admin = make_backend()
    admin_port = int(admin.address.rsplit(":", 1)[1])
    make_proxy({"app": [pp_backend.address]},
               upstream_options={"send_proxy_protocol": "v2",
                                 "health": {"path": "/healthz", "interval": "200ms", "timeout": "200ms",
                                            "port": admin_port}})
    wait_for(lambda: any(r.path == "/healthz" for r in admin.requests), timeout=10,
             what="a health check the admin port could read")
    assert pp_backend.requests == []  # the traffic port was not probed


# -- the pool's rule, with a fake clock ---------------------------------------------------------------

def test_a_pool_sending_headers_reuses_only_the_same_clients_young_connections():
    clock = FakeClock()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        pool = ServerPool("127.0.0.1", listener.getsockname()[1], keepalive_timeout=30.0, proxy_protocol="v1",
                          clock=clock)
        alice, bob = (Origin(ip, 5000, "127.0.0.1", 80) for ip in ("192.0.2.1", "192.0.2.2"))
        first = pool.checkout(origin=alice)
        server_side, _ = listener.accept()
        with server_side:
            server_side.settimeout(CLIENT_TIMEOUT)
            assert server_side.recv(100) == b"PROXY TCP4 192.0.2.1 127.0.0.1 5000 80\r\n"
            pool.release(first, reusable=True)
            assert pool.checkout(origin=alice) is first
            pool.release(first, reusable=True)
            other = pool.checkout(origin=bob)  # never alice's
            assert other is not first and pool.connects_total == 2
            other.close()
            clock.advance(5)
            for_a_post = pool.checkout(origin=alice, max_idle=1.0)
            assert for_a_post is not first  # too old for a request that cannot be resent: a new one
            for_a_post.close()
            clock.advance(30)
            assert pool.idle_count == 1  # alice's first, now past keepalive_timeout: dropped at the next look
            fresh = pool.checkout(origin=alice)
            assert fresh is not first and pool.idle_count == 0
            fresh.close()
            first.close()
