"""Regressions from an adversarial black-box audit of routing, header rewriting, Upgrade tunnels and the
drain (raw sockets against the real proxy, real backends on 127.0.0.1).

Each test pins a bug found by sending edge-case requests to a running proxy that the conformance
cases and engine tests did not catch, plus a few checks of important cases nothing covered.
"""

from __future__ import annotations

import socket

import pytest

from proxy.routing.router import Route, Router
from tests.support.client import RawClient, raw_client, read_small_answer
from tests.support.proxy import CLIENT_TIMEOUT
from tests.support.timing import wait_for
from tests.test_tls import client_context, make_tls_proxy, pki  # noqa: F401 - fixtures

pytestmark = pytest.mark.timeout(30)


def get(proxy, target: str, host: str = "a"):
    with raw_client(proxy) as client:
        client.send(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode("latin-1"))
        return client.read_response()


# -- a Host with a trailing dot is the same name ---------------------------------------------------------
# "a.test." is the fully qualified form of "a.test" (RFC 1034 §3.1). Route hosts drop the dot when the
# config is read, request hosts kept it: such a request skipped the exact and wildcard routes and went
# to the catch-all (nginx strips the dot before matching server_name).
@pytest.mark.parametrize("host, expected", [
    ("a.test.", "exact"), ("A.TEST.:8080", "exact"), ("b.test.", "wildcard"), ("other.", "catch_all"),
])
def test_host_with_a_trailing_dot_routes_like_the_name(make_backend, make_proxy, host, expected):
    backends = {name: make_backend() for name in ("exact", "wildcard", "catch_all")}
    proxy = make_proxy({name: [b.address] for name, b in backends.items()}, routes=[
        {"path": "/", "upstream": "catch_all"},
        {"host": "*.test", "upstream": "wildcard"},
        {"host": "a.test", "upstream": "exact"},
    ])
    assert get(proxy, "/x", host).status == 200
    assert [name for name, b in backends.items() if b.requests] == [expected]
    assert backends[expected].last.header("Host") == host.lower()  # forwarded as the client wrote it


# -- route prefixes are matched in the form request paths are normalised to --------------------------
# Request paths are normalised before routing (escapes of unreserved characters decoded, kept escapes
# uppercased, runs of "/" merged, dot-segments removed); route prefixes from the config were not, so a
# route written "/caf%c3%a9", "/%7euser" or "/a//b" could never match anything.
@pytest.mark.parametrize("prefix, target, forwarded", [
    ("/caf%c3%a9", "/caf%c3%a9/menu", "/caf%C3%A9/menu"),
    ("/caf%c3%a9", "/caf%C3%A9", "/caf%C3%A9"),
    ("/%7euser", "/~user/x", "/~user/x"),
    ("/a//b", "/a/b", "/a/b"),
    ("/x/./y/", "/x/y/z", "/x/y/z"),
])
def test_route_prefixes_match_in_normal_form(make_backend, make_proxy, prefix, target, forwarded):
    routed, other = make_backend(), make_backend()
    proxy = make_proxy({"routed": [routed.address], "other": [other.address]},
                       routes=[{"path": "/", "upstream": "other"}, {"path": prefix, "upstream": "routed"}])
    assert get(proxy, target).status == 200
    assert other.requests == []
    assert routed.last.path == forwarded


def test_check_lists_routes_in_the_order_the_router_tries_them():
    from proxy.config.schema import RouteConfig
    from proxy.routing.table import routes_by_precedence
    routes = [RouteConfig(path="/%7e%7e%7e", upstream="tilde"), RouteConfig(path="/abcdef", upstream="letters"),
              RouteConfig(path="/a//b", upstream="ab"), RouteConfig(path="/a/b", upstream="tie")]
    listed = [route.upstream for route in routes_by_precedence(routes)]
    router = Router([Route(None, r.path, r.upstream, index=i) for i, r in enumerate(routes)])
    assert listed == [route.upstream for route in router.routes] == ["letters", "tilde", "ab", "tie"]


def test_router_normalises_prefixes_and_keeps_precedence():
    router = Router([Route(None, "/", "root", index=0), Route(None, "/a//b", "ab", strip_prefix=True, index=1)])
    route = router.match(None, "/a/b/c")
    assert route.upstream == "ab" and route.forwarded_path("/a/b/c") == "/c"
    assert router.match(None, "/a").upstream == "root"


# -- set_headers replace the proxy's own fields, never add framing ---------------------------------------
# A route's set_headers were appended after the proxy's own fields: "Host" gave the backend two Host
# fields (RFC 9112 §3.2: a server MUST answer 400), "X-Forwarded-For" two of those, and a
# "Content-Length" or "Connection" went out next to the real ones (a second Content-Length desynchronises
# the upstream connection, RFC 9112 §6.3).
def test_set_headers_replace_proxy_fields_and_never_touch_framing(make_backend, make_proxy):
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]}, routes=[{"path": "/", "upstream": "web", "set_headers": {
        "Host": "internal.example", "X-Forwarded-Proto": "https", "X-Env": "dev",
        "Content-Length": "0", "Transfer-Encoding": "chunked", "Connection": "close", "X-Request-Id": "fixed",
    }}])
    with raw_client(proxy) as client:
        client.send(b"POST /p HTTP/1.1\r\nHost: a.test\r\nX-Env: prod\r\nX-Request-Id: mine\r\n"
                    b"Content-Length: 3\r\n\r\nabc")
        response = client.read_response()
    assert response.status == 200 and response.body == b"abc"
    seen = backend.last
    assert seen.header_all("Host") == ["internal.example"]
    assert seen.header_all("X-Forwarded-Proto") == ["https"]
    assert seen.header_all("X-Forwarded-Host") == ["a.test"]  # where the client went
    assert seen.header_all("X-Env") == ["dev"]
    assert seen.header_all("Content-Length") == ["3"] and seen.header("Transfer-Encoding") is None
    assert seen.header("Connection") in (None, "keep-alive")
    assert seen.header_all("X-Request-Id") == ["mine"] == [response.header("X-Request-Id")]


# -- bytes sent right behind an Upgrade request belong to the tunnel -------------------------------------
# A client may send the new protocol's first bytes in the same write as its Upgrade request. They
# stayed in the request parser as if they were a pipelined next request, and were lost: the server
# never saw them and a protocol waiting for them hung.
def test_bytes_sent_with_the_upgrade_request_reach_the_backend(make_raw_backend, make_proxy):
    def script(peer):
        if not peer.read_head():
            return
        peer.send(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        data = peer.buffer
        while len(data) < 4:
            piece = peer.sock.recv(4 - len(data))
            if not piece:
                return
            data += piece
        peer.send(b"got " + data)

    proxy = make_proxy({"web": [make_raw_backend(script).address]})
    with raw_client(proxy) as client:
        client.send(b"GET /t HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\nping")
        assert client.read_response().status == 101
        assert client.read_exact(8) == b"got ping"


# -- no h2c upgrade through the proxy ---------------------------------------------------------------------
# An "Upgrade: h2c" relayed and answered with 101 made the client's connection an HTTP/2 connection
# straight to the backend: every request on it bypassed the proxy's routing ("h2c smuggling"). RFC 9113
# §3.1 deprecates that upgrade; the request goes on without it and gets an ordinary answer.
def test_h2c_upgrade_is_not_forwarded(make_backend, make_proxy):
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]})
    with raw_client(proxy) as client:
        client.send(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                    b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n")
        assert client.read_response().status == 200
    names = {name.lower() for name, _ in backend.last.headers}
    assert not names & {"upgrade", "http2-settings"}
    assert backend.last.header("Connection") in (None, "keep-alive")


def test_h2c_among_other_offers_leaves_the_others(make_raw_backend, make_proxy):
    heads = []

    def script(peer):
        heads.append(peer.read_head())
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    proxy = make_proxy({"web": [make_raw_backend(script).address]})
    with raw_client(proxy) as client:
        client.send(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: h2c, websocket\r\n\r\n")
        assert client.read_response().status == 200
    assert b"\r\nUpgrade: websocket\r\n" in heads[0]


# -- the drain lets requests that are half-way in finish ---------------------------------------------------
# Uncovered by the lifecycle tests (they use complete requests): a head half sent and a small body half
# sent when the drain starts are both held in the selector, not by a thread. They must be answered
# (with Connection: close), not closed as idle keep-alive connections are.
def test_drain_answers_requests_that_were_half_way_in(make_backend, make_proxy):
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]}, server={"graceful_timeout": "5s"})
    half_head, half_body = proxy.connect(), proxy.connect()
    half_head.sendall(b"GET /h HTTP/1.1\r\nHo")
    half_body.sendall(b"POST /b HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\n\r\nabc")
    wait_for(lambda: proxy.process.server.connection_counts().get("idle", 0) >= 2, what="both parked")
    proxy.process.stop()
    wait_for(proxy.app.draining, what="drain started")
    half_head.sendall(b"st: a\r\n\r\n")
    half_body.sendall(b"def")
    for sock, body in ((half_head, b""), (half_body, b"abcdef")):
        with sock:
            client = RawClient(sock)
            response = client.read_response()
            assert response.status == 200 and response.body == body
            assert response.header("Connection") == "close"
            assert client.at_eof()
    proxy.thread.join(CLIENT_TIMEOUT)
    assert not proxy.thread.is_alive()


# -- ;parameters cannot move a request to another route ----------------------------------------------------
# "/admin;x" was routed as the segment "admin;x": to the catch-all, whose backend, if a servlet container
# (Tomcat, Jetty, Spring drop ;params), served it as /admin -- the path the /admin route exists to take
# (the ";" half of the path-confusion research the module cites). The same for a raw "\\", which IIS
# and browsers' URL parser read as "/". Ambiguous ones are refused; a ;param or "\\" that routes the
# same either way is forwarded untouched.
@pytest.mark.parametrize("target, status, routed_to", [
    ("/admin;x", 400, None),
    ("/admin;jsessionid=1/users", 400, None),
    ("/ADMIN;x", 200, "public"),                 # case matters in paths: /ADMIN is not /admin either way
    ("/public;jsessionid=1/x", 200, "public"),
    ("/admin/x;v=1", 200, "admin"),
    ("/admin;x/../public", 200, "public"),       # the dot-segment removed first: "/public"
    ("/admin\\x", 400, None),                     # IIS reads "\\" as "/": /admin/x
    ("/\\admin", 400, None),
    ("/public\\x", 200, "public"),
])
def test_path_parameters_never_change_the_route(make_backend, make_proxy, target, status, routed_to):
    admin, public = make_backend(), make_backend()
    proxy = make_proxy({"admin": [admin.address], "public": [public.address]},
                       routes=[{"path": "/admin", "upstream": "admin"}, {"path": "/", "upstream": "public"}])
    assert get(proxy, target).status == status
    reached = [name for name, b in (("admin", admin), ("public", public)) if b.requests]
    assert reached == ([routed_to] if routed_to else [])


# -- plain HTTP sent to a TLS listener gets told so ----------------------------------------------------------
# It was closed without a word ("empty reply from server"); nginx and Go's server answer a 400 in plain
# text. The request bytes are read away first so the close is a FIN and the answer arrives.
@pytest.mark.parametrize("request_bytes", [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /form HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
])
def test_plain_http_on_a_tls_listener_is_a_400_saying_so(make_tls_proxy, make_backend, pki, request_bytes):
    backend = make_backend()
    proxy = make_tls_proxy({"web": [backend.address]})
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=CLIENT_TIMEOUT) as sock:
        sock.sendall(request_bytes)
        answer = read_small_answer(sock)
    assert answer.startswith(b"HTTP/1.1 400 ") and b"HTTPS port" in answer
    assert backend.requests == []
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=CLIENT_TIMEOUT) as raw:  # still serving
        with client_context(pki).wrap_socket(raw, server_hostname="default.test") as tls:
            tls.sendall(b"GET /ok HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            assert read_small_answer(tls).startswith(b"HTTP/1.1 200 ")


def test_an_h2_only_alpn_client_is_still_served_http11(make_tls_proxy, make_backend, pki):
    """Uncovered: a client offering only h2 gets no ALPN protocol (not a failed handshake) and may go on in HTTP/1.1."""
    proxy = make_tls_proxy({"web": [make_backend().address]})
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=CLIENT_TIMEOUT) as raw:
        with client_context(pki, alpn=["h2"]).wrap_socket(raw, server_hostname="default.test") as tls:
            assert tls.selected_alpn_protocol() is None
            tls.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            assert read_small_answer(tls).startswith(b"HTTP/1.1 200 ")
