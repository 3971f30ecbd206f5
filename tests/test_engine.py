"""The engine end to end: real backends, an in-process proxy, real clients (requests and raw sockets)."""

from __future__ import annotations

import os
import socket
import struct

import pytest
import requests

from proxy.serve.handler import RequestIds

from tests.support.backends import serve_once_then_drop_next, stream_pattern
from tests.support.client import raw_client
from tests.support.ports import free_port
from tests.support.proxy import CLIENT_TIMEOUT
from tests.support.timing import wait_for

pytestmark = pytest.mark.timeout(30)


def get(host: str = "app.test", path: str = "/", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


@pytest.fixture
def backend(make_backend):
    return make_backend()


@pytest.fixture
def proxy(make_proxy, backend):
    return make_proxy({"web": [backend.address]})


# -- round trips -----------------------------------------------------------------------------
def test_get_round_trip(proxy, backend):
    response = requests.get(proxy.url + "/hello?x=1", timeout=CLIENT_TIMEOUT)
    assert response.status_code == 200
    assert response.headers["X-Echo-Path"] == "/hello?x=1"
    assert backend.last.method == "GET"
    assert backend.last.path == "/hello?x=1"


def test_post_round_trip_exact_body(proxy, backend):
    payload = os.urandom(100_000)
    response = requests.post(proxy.url + "/upload", data=payload, timeout=CLIENT_TIMEOUT)
    assert response.status_code == 200
    assert response.content == payload
    assert backend.last.body == payload
    assert backend.last.header("Content-Length") == str(len(payload))


def test_chunked_upload_arrives_intact(proxy, backend):
    pieces = [os.urandom(n) for n in (1, 500, 70_000, 3, 200_000)]

    def generate():
        yield from pieces

    response = requests.post(proxy.url + "/chunks", data=generate(), timeout=CLIENT_TIMEOUT)
    assert response.status_code == 200
    assert response.content == b"".join(pieces)
    assert backend.last.chunked  # forwarded chunked, not buffered into a Content-Length
    assert backend.last.body == b"".join(pieces)


# -- bodyless responses ----------------------------------------------------------------------
def _status_route(status):
    def handler(h, record):
        headers = (("ETag", '"v1"'),) if status == 304 else ()
        h.reply(status, b"", headers)
    return handler


def test_head_204_304_have_no_body_and_connection_stays_usable(proxy, backend):
    backend.route("/nocontent", _status_route(204)).route("/notmodified", _status_route(304))
    with raw_client(proxy) as client:
        client.send(f"HEAD /page HTTP/1.1\r\nHost: app.test\r\n\r\n".encode())
        head = client.read_response("HEAD")
        assert head.status == 200 and head.body == b""
        assert head.header("Content-Length") == "0"  # HEAD keeps the length a GET would get
        for path, status in (("/nocontent", 204), ("/notmodified", 304)):
            client.send(get(path=path))
            response = client.read_response()
            assert response.status == status
            assert response.header("Transfer-Encoding") is None
        client.send(get(path="/after"))
        after = client.read_response()
        assert after.status == 200 and after.header("X-Echo-Path") == "/after"
        assert client.buffer == b""  # nothing stray (a body on 204/304 would show up here)


def test_head_of_large_resource_sends_no_body(proxy, backend):
    backend.route("/big", _fixed_length(5000))
    with raw_client(proxy) as client:
        client.send(b"HEAD /big HTTP/1.1\r\nHost: app.test\r\n\r\n")
        response = client.read_response("HEAD")
        assert response.header("Content-Length") == "5000"
        client.send(get(path="/next"))
        assert client.read_response().header("X-Echo-Path") == "/next"


def _fixed_length(n):
    def handler(h, record):
        h.reply(200, b"x" * n)
    return handler


# -- Expect: 100-continue ----------------------------------------------------------------------
def test_expect_100_continue_end_to_end(proxy, backend):
    body = b"payload-after-continue"
    with raw_client(proxy) as client:
        client.send(b"POST /expect HTTP/1.1\r\nHost: app.test\r\nExpect: 100-continue\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(body))
        head = client.read_head()  # must arrive before we send a single body byte
        assert head.startswith(b"HTTP/1.1 100"), head
        client.send(body)
        response = client.read_response()
        assert response.status == 200
        assert response.body == body
    assert backend.last.body == body


# -- pipelining ----------------------------------------------------------------------------
def test_pipelined_requests_answered_in_order(proxy, backend):
    with raw_client(proxy) as client:
        client.send(get(path="/first") + b"POST /second HTTP/1.1\r\nHost: app.test\r\n"
                    b"Content-Length: 3\r\n\r\nabc" + get(path="/third"))
        paths = []
        for _ in range(3):
            response = client.read_response()
            assert response.status == 200
            paths.append(response.header("X-Echo-Path"))
        assert paths == ["/first", "/second", "/third"]
    assert [r.path for r in backend.requests] == ["/first", "/second", "/third"]
    assert backend.requests[1].body == b"abc"


# -- headers -------------------------------------------------------------------------------
def test_hop_by_hop_headers_are_not_forwarded(proxy, backend):
    with raw_client(proxy) as client:
        client.send(b"GET /hop HTTP/1.1\r\nHost: app.test\r\nConnection: keep-alive, X-Secret\r\n"
                    b"X-Secret: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nUpgrade: h2c\r\n"
                    b"Proxy-Authorization: Basic abc\r\nX-Kept: yes\r\n\r\n")
        assert client.read_response().status == 200
    names = {name.lower() for name, _ in backend.last.headers}
    for hop in ("x-secret", "keep-alive", "te", "upgrade", "proxy-authorization"):
        assert hop not in names, hop
    assert backend.last.header("Connection") in (None, "keep-alive")
    assert backend.last.header("X-Kept") == "yes"


def test_forwarded_headers_and_via(proxy, backend):
    response = requests.get(proxy.url + "/fwd", timeout=CLIENT_TIMEOUT,
                            headers={"X-Forwarded-For": "203.0.113.7", "Host": "shop.example:8443",
                                     "Via": "1.0 edge"})
    assert response.status_code == 200
    assert backend.last.header("X-Forwarded-For") == "203.0.113.7, 127.0.0.1"
    assert backend.last.header("X-Forwarded-Proto") == "http"
    assert backend.last.header("X-Forwarded-Host") == "shop.example:8443"
    assert backend.last.header("Via") == "1.0 edge, 1.1 pyproxy"
    assert backend.last.header("Host") == "shop.example:8443"  # preserve_host defaults to true


def test_request_id_generated_forwarded_and_returned(proxy, backend):
    first = requests.get(proxy.url + "/id", timeout=CLIENT_TIMEOUT)
    generated = first.headers["X-Request-Id"]
    assert len(generated) >= 16
    assert backend.last.header("X-Request-Id") == generated
    second = requests.get(proxy.url + "/id", timeout=CLIENT_TIMEOUT)
    assert second.headers["X-Request-Id"] != generated
    reused = requests.get(proxy.url + "/id", headers={"X-Request-Id": "client-chosen-42"}, timeout=CLIENT_TIMEOUT)
    assert reused.headers["X-Request-Id"] == "client-chosen-42"
    assert backend.last.header_all("X-Request-Id") == ["client-chosen-42"]


def test_request_ids_are_128_random_bits_in_hex_and_never_repeat_across_batches():
    ids = RequestIds()
    drawn = [ids.new() for _ in range(5 * RequestIds.BATCH + 3)]  # several refills
    assert all(len(value) == 32 and int(value, 16) >= 0 and value == value.lower() for value in drawn)
    assert len(set(drawn)) == len(drawn)
    assert len({value[0] for value in drawn}) > 8  # the leading digit varies too: no zero padding leak
    assert RequestIds().new() not in drawn  # each handler (each worker process) seeds its own


# -- keep-alive ----------------------------------------------------------------------------
def test_keep_alive_reuse_on_both_sides(proxy, backend):
    with requests.Session() as session:
        for i in range(100):
            response = session.get(proxy.url + f"/ka/{i}", timeout=CLIENT_TIMEOUT)
            assert response.status_code == 200
        pools = session.get_adapter(proxy.url).poolmanager.pools
        opened = [pools[key].num_connections for key in pools.keys()]
        assert opened == [1]  # client side: one connection to the proxy carried all 100
    assert backend.connections == 1  # upstream side: one pooled connection carried all 100
    assert len(backend.requests) == 100
    assert proxy.pool("web").connects_total == 1


def test_stale_pooled_connections_never_fail_a_get(make_backend, make_proxy):
    backend = make_backend(close_after_response=True)  # closes after each response, silently
    proxy = make_proxy({"web": [backend.address]})
    with requests.Session() as session:
        for i in range(50):
            response = session.get(proxy.url + f"/stale/{i}", timeout=CLIENT_TIMEOUT)
            assert response.status_code == 200, response.text
    assert len(backend.requests) == 50


def test_stale_connection_get_is_retried_on_a_new_connection(make_raw_backend, make_proxy):
    executions = []
    raw = make_raw_backend(serve_once_then_drop_next(executions))
    proxy = make_proxy({"web": [raw.address]})
    with requests.Session() as session:
        assert session.get(proxy.url + "/a", timeout=CLIENT_TIMEOUT).status_code == 200
        assert session.get(proxy.url + "/b", timeout=CLIENT_TIMEOUT).status_code == 200
    assert executions == [b"GET", b"GET", b"GET"]
    assert raw.connections == 2


def test_post_with_body_is_never_sent_twice(make_raw_backend, make_proxy):
    executions = []
    raw = make_raw_backend(serve_once_then_drop_next(executions))
    proxy = make_proxy({"web": [raw.address]})
    with requests.Session() as session:
        assert session.get(proxy.url + "/warm", timeout=CLIENT_TIMEOUT).status_code == 200
        response = session.post(proxy.url + "/pay", data=b"amount=10", timeout=CLIENT_TIMEOUT)
    assert response.status_code == 502
    assert executions == [b"GET", b"POST"]  # executed once; not replayed on a new connection
    assert raw.connections == 1


def test_posts_against_silently_closing_backend_execute_at_most_once(make_backend, make_proxy):
    backend = make_backend(close_after_response=True)
    proxy = make_proxy({"web": [backend.address]})
    statuses = []
    with requests.Session() as session:
        for i in range(30):
            statuses.append(session.post(proxy.url + f"/p/{i}", data=b"x" * 10, timeout=CLIENT_TIMEOUT).status_code)
    executed = [r.path for r in backend.requests]
    assert len(executed) == len(set(executed))  # no POST ran twice
    assert statuses.count(200) == len(executed)
    assert set(statuses) <= {200, 502}


# -- upstream failures -----------------------------------------------------------------------
def test_upstream_reset_mid_response_truncates_and_closes(make_raw_backend, make_proxy):
    def script(peer):
        peer.read_request()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"a" * 1000)
        peer.reset()
    raw = make_raw_backend(script)
    proxy = make_proxy({"web": [raw.address]})
    with raw_client(proxy) as client:
        client.send(get())
        head = client.read_head()
        assert b" 200 " in head.split(b"\r\n")[0]
        received = len(client.buffer)
        while client._fill():  # ends at EOF or reset, bounded by the socket timeout
            received = len(client.buffer)
        assert received < 100000


def test_upstream_reset_mid_chunked_response_truncates_and_closes(make_raw_backend, make_proxy):
    def script(peer):
        peer.read_request()
        peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        peer.reset()
    raw = make_raw_backend(script)
    proxy = make_proxy({"web": [raw.address]})
    with raw_client(proxy) as client:
        client.send(get())
        client.read_head()
        with pytest.raises(ConnectionError):
            client._read_chunked()  # never a complete (last-chunk terminated) body


def test_upstream_garbage_is_502(make_raw_backend, make_proxy):
    def script(peer):
        peer.read_request()
        peer.send(b"this is not http\r\n\r\n")
        peer.close()
    raw = make_raw_backend(script)
    proxy = make_proxy({"web": [raw.address]})
    response = requests.get(proxy.url + "/", timeout=CLIENT_TIMEOUT)
    assert response.status_code == 502
    assert response.headers["Content-Type"].startswith("text/plain")


def test_upstream_hang_is_504(make_raw_backend, make_proxy):
    def script(peer):
        peer.read_request()
        peer.hang()
    raw = make_raw_backend(script)
    proxy = make_proxy({"web": [raw.address]}, upstream_options={"read_timeout": "0.5s"})
    response = requests.get(proxy.url + "/", timeout=CLIENT_TIMEOUT)
    assert response.status_code == 504
    assert response.elapsed.total_seconds() < 5


def test_connection_refused_is_502(make_proxy):
    proxy = make_proxy({"web": [f"127.0.0.1:{free_port()}"]}, upstream_options={"retries": 0})
    assert requests.get(proxy.url + "/", timeout=CLIENT_TIMEOUT).status_code == 502


def test_connection_refused_then_retry_on_second_server(make_proxy, backend):
    proxy = make_proxy({"web": [f"127.0.0.1:{free_port()}", backend.address]},
                       upstream_options={"retries": 1, "policy": "round_robin"})
    for _ in range(4):  # round robin starts on either server; every request must succeed
        assert requests.get(proxy.url + "/", timeout=CLIENT_TIMEOUT).status_code == 200
    assert len(backend.requests) == 4


def _reset_before_answering(executions: list):
    """A server that dies on every request it receives: reads it, then resets (no response byte)."""
    def script(peer):
        executions.append(peer.read_request())
        peer.reset()
    return script


def test_idempotent_request_reset_before_any_response_byte_goes_to_another_server(
        make_raw_backend, make_proxy, backend):
    """RFC 9110 §9.2.2: a GET whose server failed before answering is repeated elsewhere, even on a
    fresh (not pooled) connection; a POST never is (it may have been executed)."""
    executions: list = []
    dying = make_raw_backend(_reset_before_answering(executions))
    proxy = make_proxy({"web": [dying.address, backend.address]},
                       upstream_options={"retries": 1, "policy": "round_robin", "keepalive": 0})
    for _ in range(4):  # round robin starts on either server; every GET must succeed
        assert requests.get(proxy.url + "/", timeout=CLIENT_TIMEOUT).status_code == 200
    assert executions, "the dying server was never tried"
    assert len(backend.requests) == 4

    posts_before = len(executions)
    statuses = [requests.post(proxy.url + "/", data=b"x", timeout=CLIENT_TIMEOUT).status_code
                for _ in range(4)]
    tried_dying = len(executions) - posts_before
    assert statuses.count(502) == tried_dying  # each POST the dying server got is a 502, not a retry
    assert sum(1 for r in backend.requests if r.method == "POST") == 4 - tried_dying


def test_no_route_is_404(make_proxy, backend):
    proxy = make_proxy({"web": [backend.address]}, routes=[{"host": "only.test", "upstream": "web"}])
    response = requests.get(proxy.url + "/", headers={"Host": "other.test"}, timeout=CLIENT_TIMEOUT)
    assert response.status_code == 404
    assert backend.requests == []


def test_all_servers_down_is_503(make_proxy):
    # Two servers: passive checks never eject the only server of an upstream.
    proxy = make_proxy({"web": [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]},
                       upstream_options={"retries": 0, "passive": {"max_fails": 1, "fail_timeout": "30s"}})
    statuses = [requests.get(proxy.url + "/", timeout=CLIENT_TIMEOUT).status_code for _ in range(3)]
    assert statuses == [502, 502, 503]


# -- malformed requests ------------------------------------------------------------------------
MALFORMED = {
    "cl_and_te": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "bad_cl": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3x\r\n\r\nabc",
    "differing_cl": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    "te_gzip": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    "te_chunked_not_last": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
    "obs_fold": b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n  folded\r\n\r\n",
    "space_before_colon": b"GET / HTTP/1.1\r\nHost: a\r\nX-A : 1\r\n\r\n",
    "control_char_in_value": b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\x01\r\n\r\n",
    "control_char_in_name": b"GET / HTTP/1.1\r\nHost: a\r\nX\x01A: 1\r\n\r\n",
    "invalid_chunk_size": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    "missing_host": b"GET / HTTP/1.1\r\nX-A: 1\r\n\r\n",
    "duplicate_host": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_request_is_400_and_closed(proxy, backend, name):
    with raw_client(proxy) as client:
        client.send(MALFORMED[name])
        response = client.read_response()
        assert response.status == 400, response.body
        assert response.header("Connection") == "close"
        assert client.at_eof()
    assert backend.requests == []


def test_too_large_head_is_431(make_proxy, backend):
    proxy = make_proxy({"web": [backend.address]}, server={"max_header_bytes": "4KiB"})
    with raw_client(proxy) as client:
        client.send(b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-Big: " + b"a" * 6000 + b"\r\n\r\n")
        response = client.read_response()
        assert response.status == 431
        assert client.at_eof()


def test_too_long_request_line_is_414(make_proxy, backend):
    proxy = make_proxy({"web": [backend.address]}, server={"max_header_bytes": "4KiB"})
    with raw_client(proxy) as client:
        client.send(b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: a\r\n\r\n")
        response = client.read_response()
        assert response.status == 414
        assert client.at_eof()


def test_body_over_limit_is_413(make_proxy, backend):
    proxy = make_proxy({"web": [backend.address]}, server={"max_body_bytes": 1000})
    with raw_client(proxy) as client:
        client.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\n\r\n" + b"a" * 5000)
        response = client.read_response()
        assert response.status == 413
        assert client.at_eof()
    assert backend.requests == []


def test_chunked_body_over_limit_is_413(make_proxy, backend):
    proxy = make_proxy({"web": [backend.address]}, server={"max_body_bytes": 1000})
    with raw_client(proxy) as client:
        client.send(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                    + b"%x\r\n" % 5000 + b"a" * 5000 + b"\r\n0\r\n\r\n")
        response = client.read_response()
        assert response.status == 413
        assert client.at_eof()


# -- HTTP/1.0 clients ------------------------------------------------------------------------
def test_http10_client_never_gets_chunked(make_raw_backend, make_proxy):
    def script(peer):
        while peer.read_head():
            peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    raw = make_raw_backend(script)
    proxy = make_proxy({"web": [raw.address]})
    with raw_client(proxy) as client:
        client.send(b"GET /old HTTP/1.0\r\nHost: app.test\r\n\r\n")
        response = client.read_response()
        assert response.status == 200
        assert response.framing in ("length", "close")
        assert response.body == b"hello world"
        assert response.head.startswith(b"HTTP/1.1 200") or response.head.startswith(b"HTTP/1.0 200")
        if response.framing == "length":
            assert client.at_eof()  # HTTP/1.0 without keep-alive: closed after the response


def test_http10_client_with_content_length(proxy, backend):
    with raw_client(proxy) as client:
        client.send(b"GET /old HTTP/1.0\r\n\r\n")
        response = client.read_response()
        assert response.status == 200
        assert response.header("Content-Length") == "0"
        assert client.at_eof()


# -- client gone -----------------------------------------------------------------------------
def test_client_disconnect_mid_response_closes_upstream_connection(proxy, backend):
    backend.route("/huge", stream_pattern(50 * 1024 * 1024))
    assert requests.get(proxy.url + "/warm", timeout=CLIENT_TIMEOUT).status_code == 200
    pool = proxy.pool("web")
    # released after the last byte went to the client: a moment after requests.get returns
    wait_for(lambda: pool.idle_count == 1, what="the warm-up connection back in the pool")
    with raw_client(proxy) as client:
        client.send(get(path="/huge"))
        client.read_head()
        client.read_exact(100_000)
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
    # The proxy must notice, close the upstream connection (the backend's write fails and its
    # handler ends), and not pool it.
    wait_for(lambda: backend.closed_connections == 1, what="the upstream connection to close")
    assert backend.connections == 1
    assert pool.idle_count == 0
    assert requests.get(proxy.url + "/after", timeout=CLIENT_TIMEOUT).status_code == 200
    assert backend.connections == 2


# -- routing -------------------------------------------------------------------------------
def test_strip_prefix_and_host_routing(make_backend, make_proxy):
    api, web, admin = make_backend(), make_backend(), make_backend()
    proxy = make_proxy({"api": [api.address], "web": [web.address], "admin": [admin.address]}, routes=[
        {"host": "api.test", "path": "/v1", "strip_prefix": True, "upstream": "api"},
        {"host": "admin.test", "upstream": "admin"},
        {"path": "/", "upstream": "web"},
    ])
    assert requests.get(proxy.url + "/v1/users?id=3", headers={"Host": "api.test"},
                        timeout=CLIENT_TIMEOUT).status_code == 200
    assert api.last.path == "/users?id=3"
    assert requests.get(proxy.url + "/v1", headers={"Host": "api.test:8080"}, timeout=CLIENT_TIMEOUT).ok
    assert api.last.path == "/"
    assert requests.get(proxy.url + "/v1x", headers={"Host": "api.test"}, timeout=CLIENT_TIMEOUT).ok
    assert web.last.path == "/v1x"  # prefix matches on segment boundaries only
    assert requests.get(proxy.url + "/anything", headers={"Host": "ADMIN.test"}, timeout=CLIENT_TIMEOUT).ok
    assert admin.last.path == "/anything"
    assert len(api.requests) == 2 and len(admin.requests) == 1 and len(web.requests) == 1
