"""Adversarial audit of the upstream side: misbehaving raw-socket backends, what clients get.

Regressions for bugs the audit found (each test says which), plus a few checks of important cases
no other file covered. Backends are tests/faults/upstream.py scripts; clients are raw sockets.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from proxy.config.schema import HealthConfig
from proxy.upstream.health import probe
from proxy.upstream.pool import ServerPool
from tests.support.backends import close_with_rst
from tests.support.backends import started_until_teardown
from tests.support.client import RawClient, raw_client
from tests.support.timing import wait_for
from tests.faults.upstream import BODY, FIN, HANG, HEAD, LOOP, RST, FaultyUpstream, sleep, write

pytestmark = pytest.mark.timeout(30)

GET = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"


@pytest.fixture
def upstreams():
    yield from started_until_teardown(FaultyUpstream)


@pytest.fixture
def start(make_proxy):
    def factory(address: str, **upstream):
        options = {"read_timeout": "1s", "connect_timeout": "1s", **upstream}
        return make_proxy({"web": [address]}, upstream_options=options)
    return factory


def header_values(head: bytes, name: bytes) -> list[bytes]:
    prefix = name.lower() + b":"
    return [line[len(prefix):].strip() for line in head.split(b"\r\n") if line.lower().startswith(prefix)]


# -- response framing the client relies on -----------------------------------------------------
def test_connection_naming_content_length_never_strips_the_framing(upstreams, start):
    """Bug: "Connection: Content-Length" from upstream made the proxy drop Content-Length (a
    Connection-listed field is hop-by-hop) while keeping the client connection alive: the client
    got a response without framing, and the next response was read as its body (desync)."""
    upstream = upstreams([HEAD, write(b"HTTP/1.1 200 OK\r\nConnection: Content-Length\r\n"
                                      b"Content-Length: 5\r\n\r\nfirst"), LOOP])
    proxy = start(upstream.address)
    with raw_client(proxy) as raw:
        for _ in range(2):
            raw.send(GET)
            response = raw.read_response()
            assert response.framing in ("length", "chunked"), response.head
            assert response.body == b"first"


@pytest.mark.parametrize("fields", [
    b"Content-Length: 5\r\nContent-Length: 5\r\n",
    b"Content-Length: 5, 5\r\n",
])
def test_repeated_content_length_is_relayed_as_one_value(upstreams, start, fields):
    """Bug: identical repeated Content-Length values were relayed as sent; RFC 9110 §8.6 forbids
    forwarding a value that is not a single number (a stricter client rejects, a laxer one guesses)."""
    upstream = upstreams([HEAD, write(b"HTTP/1.1 200 OK\r\n" + fields + b"\r\nhello"), LOOP])
    proxy = start(upstream.address)
    with raw_client(proxy) as raw:
        raw.send(GET)
        response = raw.read_response()
    assert header_values(response.head, b"content-length") == [b"5"]
    assert response.body == b"hello"


@pytest.mark.parametrize("coding", [b"gzip, chunked", b"gzip", b"chunked, chunked", b"identity"])
def test_transfer_coding_other_than_chunked_is_502(upstreams, start, coding):
    """Bug: the proxy decoded only the final chunked (or nothing) and dropped Transfer-Encoding as
    hop-by-hop, so the client took gzip- (or twice-chunked) bytes for the content. nginx answers
    502 "upstream sent unknown Transfer-Encoding"; the proxy does the same."""
    body = b"2\r\nok\r\n0\r\n\r\n" if coding.endswith(b"chunked") else b"okgz"
    upstream = upstreams([HEAD, write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: %b\r\n\r\n%b" % (coding, body)), FIN])
    proxy = start(upstream.address, retries=0)
    with raw_client(proxy) as raw:
        raw.send(GET)
        assert raw.read_response().status == 502
    assert proxy.pool("web").idle_count == 0


def test_transfer_encoding_on_a_head_response_is_no_error(upstreams, start):
    """A HEAD response describes the GET one: its Transfer-Encoding is metadata, not framing."""
    upstream = upstreams([HEAD, write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"), LOOP])
    proxy = start(upstream.address)
    with raw_client(proxy) as raw:
        raw.send(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert raw.read_response("HEAD").status == 200


def test_content_length_is_not_relayed_on_a_204(upstreams, start):
    """Bug: "204 + Content-Length: 5" was relayed as is; RFC 9110 §8.6: a server MUST NOT send
    Content-Length in a 204 (a client trusting it waits for 5 bytes that never come)."""
    upstream = upstreams([HEAD, write(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n"), LOOP])
    proxy = start(upstream.address)
    with raw_client(proxy) as raw:
        raw.send(GET)
        response = raw.read_response()
    assert response.status == 204
    assert header_values(response.head, b"content-length") == []


# -- an upstream failing mid-body must never look like a complete response ------------------------
def test_an_echoed_request_id_reaches_the_client_once(upstreams, start):
    """Bug: a backend echoing X-Request-Id (a common middleware habit) left the client with two
    copies, ours and its own; ours replaces it, and it is the id the backend was sent."""
    upstream = upstreams([HEAD, write(b"HTTP/1.1 200 OK\r\nX-Request-Id: abc\r\n"
                                      b"Content-Length: 2\r\n\r\nok"), LOOP])
    proxy = start(upstream.address)
    with raw_client(proxy) as raw:
        raw.send(b"GET / HTTP/1.1\r\nHost: a\r\nX-Request-Id: abc\r\n\r\n")
        response = raw.read_response()
    assert header_values(response.head, b"x-request-id") == [b"abc"]
    assert response.body == b"ok"


def _read_to_end(raw: RawClient) -> str:
    """Read until the proxy ends the connection: "eof" (a clean FIN) or "reset"."""
    for _ in range(10_000):  # bounded: each recv has the client timeout
        try:
            if not raw._fill():
                return "eof"
        except ConnectionResetError:
            return "reset"
    raise AssertionError("the proxy never ended the connection")


@pytest.mark.parametrize("failure", [FIN, RST, HANG])
def test_http10_client_sees_a_reset_when_a_chunked_upstream_fails_mid_body(upstreams, start, failure):
    """Bug: an HTTP/1.0 client gets a close-delimited body; when the chunked upstream died or stalled
    mid-body, the proxy closed with a FIN, which is exactly how a whole close-delimited body ends:
    the client took the truncated body for the complete response. A reset is the only signal left."""
    upstream = upstreams([HEAD, write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"),
                          sleep(0.05), failure])
    proxy = start(upstream.address, read_timeout="300ms")
    with raw_client(proxy) as raw:
        raw.send(b"GET / HTTP/1.0\r\nHost: a\r\n\r\n")
        assert _read_to_end(raw) == "reset"


def test_http10_client_complete_close_delimited_body_ends_with_a_clean_close(upstreams, start):
    """The counterpart: a whole body still ends with a FIN, every byte delivered."""
    upstream = upstreams([HEAD, write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
                                      b"0\r\n\r\n"), LOOP])
    proxy = start(upstream.address)
    with raw_client(proxy) as raw:
        raw.send(b"GET / HTTP/1.0\r\nHost: a\r\n\r\n")
        assert _read_to_end(raw) == "eof"
        assert raw.buffer.endswith(b"\r\n\r\nhello")


# -- the health checker against misbehaving servers ----------------------------------------------
def _probe(upstream, timeout: float):
    health = HealthConfig(path="/healthz", interval=1.0, timeout=timeout, expect_status=frozenset(range(200, 300)),
                          healthy_after=1, unhealthy_after=1)
    return probe("127.0.0.1", upstream.port, health, host_header=upstream.address)


@pytest.mark.parametrize("then", [FIN, HANG])
def test_health_probe_answered_with_101_fails_at_once(upstreams, then):
    """Bug: the probe took 101 for an interim response and waited for a final one; the parser
    ignores EOF once switched, so after the server closed the probe spun on recv() returning b""
    (a whole CPU) until its timeout, then reported a timeout instead of the status."""
    upstream = upstreams([HEAD, write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: Upgrade\r\n\r\n"),
                          then])
    started = time.monotonic()
    result = _probe(upstream, timeout=3.0)
    assert time.monotonic() - started < 1.5
    assert (result.ok, result.status) == (False, 101)


def test_content_length_is_not_relayed_on_an_interim_response(upstreams, start):
    """Bug: a 1xx was relayed with every end-to-end field, Content-Length included; RFC 9110 §8.6:
    never in a 1xx (a client trusting it would take the final response's first bytes as a body)."""
    upstream = upstreams([HEAD, write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\nContent-Length: 3\r\n\r\n"
                                      b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"), LOOP])
    proxy = start(upstream.address)
    with raw_client(proxy) as raw:
        raw.send(GET)
        interim = raw.read_head()
        final = raw.read_response()
    assert interim.startswith(b"HTTP/1.1 103")
    assert header_values(interim, b"link") == [b"</a.css>"]
    assert header_values(interim, b"content-length") == []
    assert (final.status, final.body) == (200, b"ok")


# -- the keep-alive pool -------------------------------------------------------------------------
def test_checkout_past_many_dead_idle_connections_dials_a_new_one():
    """Bug: checkout recursed once per dead idle connection; a backend restart behind a pool of
    about a thousand idle connections (keepalive = 1024) made the next request's checkout raise
    RecursionError, which escaped the error funnel (no answer, a traceback in the log)."""
    count = 1100
    listener = socket.create_server(("127.0.0.1", 0), backlog=count)
    pool = ServerPool("127.0.0.1", listener.getsockname()[1], keepalive=count)
    accepted = []
    try:
        for _ in range(count):
            conn = pool.connect()
            accepted.append(listener.accept()[0])
            pool.release(conn, reusable=True)
        for sock in accepted:  # the backend restarts: every idle connection gets a FIN
            sock.close()
        last = pool._idle[-1].sock  # the one whose server side closed last: its FIN comes last
        last.settimeout(5.0)
        assert last.recv(1, socket.MSG_PEEK) == b""
        last.settimeout(None)
        fresh = pool.checkout()
        assert not fresh.reused and pool.idle_count == 0
        fresh.close()
    finally:
        pool.close_all()
        listener.close()


# -- an upstream answering before it read the request body ---------------------------------------
def test_early_answer_from_an_upstream_that_stops_reading_is_relayed_not_408(upstreams, start):
    """Bug: the upstream answered 403 after the head and kept the connection open without reading
    the upload. Once the socket buffers filled, the proxy's write to the upstream timed out, and it
    answered 408 "request body not received in time", blaming a client that had sent everything.
    The upstream's answer is relayed instead (as when it closes: test_early_response_during_upload)."""
    upstream = upstreams([HEAD, write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno"), HANG])
    proxy = start(upstream.address, read_timeout="500ms")
    size = 32 * 1024 * 1024  # well past what loopback socket buffers hold
    with raw_client(proxy) as raw:
        raw.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % size)
        sender = threading.Thread(target=_send_quietly, args=(raw.sock, b"x" * size), daemon=True)
        sender.start()
        response = raw.read_response()
        sender.join(10)
    assert (response.status, response.body) == (403, b"no")
    assert response.header("Connection") == "close"  # the rest of the body was never read


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:  # the proxy closed after answering: expected
        pass


# -- whose fault a timeout is ----------------------------------------------------------------------
def test_client_that_stops_reading_a_response_is_not_an_upstream_failure(upstreams, make_proxy):
    """Bug: a client taking nothing of a Content-Length body for send_timeout made the splice's write
    time out, which was reported as "upstream body stalled" and counted against the server: with
    passive checks, a few slow clients took a healthy server out."""
    size = 64 * 1024 * 1024  # far past what the socket buffers between them hold
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size
    upstream = upstreams([HEAD, write(answer), write(b"x" * size), HANG])
    proxy = make_proxy({"web": [upstream.address]}, server={"send_timeout": "300ms"},
                       upstream_options={"read_timeout": "5s", "passive": {"max_fails": 1, "fail_timeout": "10s"}})
    server = proxy.app.runtime.upstreams["web"].servers[0]
    with raw_client(proxy) as raw:
        raw.send(GET)
        assert raw.read_head().startswith(b"HTTP/1.1 200")
        # now read nothing: the proxy gives up on this client after send_timeout
        wait_for(lambda: server.active_requests == 0, timeout=10, what="the exchange abandoned")
    snapshot = server.snapshot()
    assert (snapshot["state"], snapshot["failures_total"]) == ("up", 0)


def test_client_resetting_mid_upload_is_not_an_upstream_failure(upstreams, make_proxy):
    """Bug: a client cancelling a large upload (reset) made the body's splice fail, which was
    reported as "sending the body upstream failed" and counted against the server: with passive
    checks, a few cancelled uploads took a healthy server out."""
    upstream = upstreams([HEAD, BODY, write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"), LOOP])
    proxy = make_proxy({"web": [upstream.address]},
                       upstream_options={"read_timeout": "5s", "passive": {"max_fails": 1, "fail_timeout": "10s"}})
    server = proxy.app.runtime.upstreams["web"].servers[0]
    sock = proxy.connect()
    sock.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10000000\r\n\r\n" + b"x" * 100_000)
    wait_for(lambda: upstream.executions == 1, what="the head forwarded")
    close_with_rst(sock)
    wait_for(lambda: server.active_requests == 0, timeout=10, what="the exchange abandoned")
    snapshot = server.snapshot()
    assert (snapshot["state"], snapshot["failures_total"]) == ("up", 0)


def test_upstream_reset_mid_length_body_counts_against_the_server(upstreams, make_proxy):
    """The other side of the same splice: an upstream resetting mid-body was taken for a gone client
    (the OSError names no side), so passive checks never counted it. The client sees an abort."""
    upstream = upstreams([HEAD, write(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n" + b"x" * 1000),
                          sleep(0.05), RST])
    proxy = make_proxy({"web": [upstream.address]}, upstream_options={"read_timeout": "5s"})
    server = proxy.app.runtime.upstreams["web"].servers[0]
    with raw_client(proxy) as raw:
        raw.send(GET)
        assert raw.read_head().startswith(b"HTTP/1.1 200")
        with pytest.raises(ConnectionError):
            raw.read_exact(10_000_000)
    wait_for(lambda: server.active_requests == 0, timeout=10, what="the exchange abandoned")
    assert server.snapshot()["failures_total"] == 1


# -- many open files --------------------------------------------------------------------------------
@pytest.fixture
def high_fds():
    """Hold enough descriptors that the next sockets get numbers past select()'s FD_SETSIZE (1024)."""
    held = []
    try:
        while len(held) < 1100:
            held.append(os.open(os.devnull, os.O_RDONLY))
        yield
    finally:
        for fd in held:
            os.close(fd)


def test_expect_continue_with_descriptors_past_1024(upstreams, start, high_fds):
    """Bug: waiting for the upstream's 100 Continue used select.select(), which raises ValueError for
    a descriptor >= 1024 (FD_SETSIZE): on a busy proxy every Expect: 100-continue request failed
    outside the error funnel (no answer at all)."""
    upstream = upstreams([HEAD, write(b"HTTP/1.1 100 Continue\r\n\r\n"), BODY, write(b"HTTP/1.1 200 OK\r\n"
                                                                                        b"Content-Length: 2\r\n\r\nok"), LOOP])
    proxy = start(upstream.address)
    with raw_client(proxy) as raw:
        assert raw.sock.fileno() > 1024
        raw.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        assert raw.read_head().startswith(b"HTTP/1.1 100")
        raw.send(b"body")
        response = raw.read_response()
    assert (response.status, response.body) == (200, b"ok")
    assert upstream.bodies == [b"body"]


# -- checks of uncovered cases (no bug found) ----------------------------------------------------------
@pytest.mark.parametrize("connection, pooled", [(b"", False), (b"Connection: keep-alive\r\n", True)])
def test_http10_upstream_is_pooled_only_when_it_says_keep_alive(upstreams, start, connection, pooled):
    """RFC 9112 §9.3: an HTTP/1.0 response persists only with "Connection: keep-alive"; reusing one
    that did not say so would send the next request into a closing connection."""
    upstream = upstreams([HEAD, write(b"HTTP/1.0 200 OK\r\n%bContent-Length: 2\r\n\r\nok" % connection), LOOP])
    proxy = start(upstream.address)
    with raw_client(proxy) as raw:
        for _ in range(2):
            raw.send(GET)
            response = raw.read_response()
            assert (response.status, response.body) == (200, b"ok")
            assert response.header("Connection") is None  # the client's connection stays open
    assert upstream.connections == (1 if pooled else 2)


# -- the stale keep-alive race with Expect: 100-continue -----------------------------------------
def test_stale_pooled_connection_put_with_expect_continue_is_retried(upstreams, start):
    """Bug: a PUT with Expect: 100-continue whose pooled connection turned out closed before any
    response byte was a 502: the retry rule wanted the whole body already read (to replay it),
    but none of it had been read or sent yet, so nothing stands in the way of a new connection."""
    first = [HEAD, write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"), HEAD, FIN]
    later = [HEAD, write(b"HTTP/1.1 100 Continue\r\n\r\n"), BODY, write(b"HTTP/1.1 201 Created\r\n"
                                                                         b"Content-Length: 4\r\n\r\nmade"), LOOP]
    upstream = upstreams(lambda index: first if index == 0 else later)
    proxy = start(upstream.address, retries=0)
    body = b"b" * 100_000  # past what the proxy reads whole before contacting the upstream
    with raw_client(proxy) as raw:
        raw.send(GET)
        assert raw.read_response().status == 200
        raw.send(b"PUT /f HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\nExpect: 100-continue\r\n\r\n" % len(body))
        assert raw.read_head().startswith(b"HTTP/1.1 100")
        raw.send(body)
        response = raw.read_response()
    assert (response.status, response.body) == (201, b"made")
    assert upstream.bodies == [body]


def test_http10_client_gets_a_clean_502_when_the_chunked_body_is_bad_before_anything_was_sent(upstreams, start):
    """The reset above is only for a response that started: a bad body caught before the head went
    out is a plain 502, closed with a FIN (a reset could destroy it before the client reads it)."""
    upstream = upstreams([HEAD, write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"), LOOP])
    proxy = start(upstream.address, retries=0)
    with raw_client(proxy) as raw:
        raw.send(b"GET / HTTP/1.0\r\nHost: a\r\n\r\n")
        assert _read_to_end(raw) == "eof"
        assert raw.buffer.startswith(b"HTTP/1.1 502")
