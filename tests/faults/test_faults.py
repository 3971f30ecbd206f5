"""Broken upstreams and aborting clients, against a scriptable raw upstream (tests/support/faulty_upstream.py).

After every test: no leaked sockets (the process's fds back near where they started), no stuck
worker threads (pool busy 0) and no held slots (every server's active_requests 0).
"""

from __future__ import annotations

import os
import socket

import pytest

from tests.support.client import RawClient, raw_client
from tests.support.faulty_upstream import BODY, FIN, HANG, HEAD, LOOP, RST, drip, ok_response, sleep, write
from tests.support.ports import free_port
from tests.support.timing import wait_for

pytestmark = pytest.mark.timeout(30)

FD_TOLERANCE = 6  # sockets a backend thread may still be closing; pooled idle ones are counted apart


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def start(make_proxy):
    """make_proxy plus a leak check at teardown."""
    proxies = []
    baseline = open_fds()

    def factory(addresses, **options):
        upstream_options = {"read_timeout": "1s", "connect_timeout": "1s", **options.pop("upstream", {})}
        proxy = make_proxy({"web": list(addresses)}, upstream_options=upstream_options, **options)
        proxies.append(proxy)
        return proxy

    yield factory
    for proxy in proxies:
        servers = proxy.app.runtime.upstreams["web"].servers
        wait_for(lambda: all(s.active_requests == 0 for s in servers), what="server slots released")
        wait_for(lambda: proxy.process.pool.busy == 0, what="worker threads back to idle")
        wait_for(lambda: proxy.process.server.connection_counts().get("PROCESSING", 0) == 0, what="no stuck conn")
    idle = sum(proxy.pool("web", i).idle_count for proxy in proxies
               for i in range(len(proxy.app.runtime.upstreams["web"].servers)))
    # each proxy adds a listener, a pool of threads (no fds), its loop's epoll + waker; idle pooled
    # upstream connections hold one fd each on both sides; a transfer relay that started, its epoll + waker
    relays = sum(proxy.process.server.transfers.running for proxy in proxies)
    allowance = FD_TOLERANCE + 4 * len(proxies) + 2 * idle + 3 * relays
    wait_for(lambda: open_fds() <= baseline + allowance, what=f"fds back near {baseline} (+{allowance})")


def get(proxy, target="/", method="GET", extra=b"") -> tuple[RawClient, object]:
    raw = RawClient(proxy.connect())
    raw.send(b"%s %s HTTP/1.1\r\nHost: a\r\n%b\r\n" % (method.encode(), target.encode(), extra))
    return raw, raw.read_response(method)


def status_of(proxy, method="GET", extra=b"") -> int:
    raw, response = get(proxy, method=method, extra=extra)
    raw.sock.close()
    return response.status


# -- connecting ------------------------------------------------------------------------------------
def test_refused_is_502(start):
    proxy = start([f"127.0.0.1:{free_port()}"])
    assert status_of(proxy) == 502


def _blackholed_listener():
    """A loopback listener whose accept queue is full: further SYNs are dropped (connect hangs)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(8):  # bounded: the queue holds backlog+1 on Linux
        sock = socket.socket()
        sock.setblocking(False)
        if sock.connect_ex(listener.getsockname()) not in (0, 115):  # EINPROGRESS
            sock.close()
            break
        fillers.append(sock)
        probe = socket.socket()
        probe.settimeout(0.2)
        try:
            probe.connect(listener.getsockname())
        except (TimeoutError, OSError):
            probe.close()
            return listener, fillers
        fillers.append(probe)
    for sock in fillers:
        sock.close()
    listener.close()
    return None, []


def test_blackholed_connect_is_504(start):
    listener, fillers = _blackholed_listener()
    if listener is None:
        pytest.skip("this kernel accepted every connect on a full backlog: no loopback blackhole")
    try:
        proxy = start([f"127.0.0.1:{listener.getsockname()[1]}"], upstream={"connect_timeout": "300ms"})
        assert status_of(proxy) == 504
    finally:
        for sock in fillers:
            sock.close()
        listener.close()


def test_all_servers_at_max_connections_is_503_fast(upstreams, start):
    upstream = upstreams([HEAD, HANG])
    proxy = start([upstream.address], upstream={"max_connections": 1, "read_timeout": "3s"})
    with raw_client(proxy) as first:
        first.send(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
        wait_for(lambda: upstream.executions == 1, what="the first request to hold the only slot")
        assert status_of(proxy) == 503
    assert upstream.executions == 1


# -- the pooled connection's keep-alive boundary ---------------------------------------------------
def test_stale_pooled_connection_post_executed_at_most_once(upstreams, start):
    # Every connection serves one request keep-alive style, then closes without saying so.
    upstream = upstreams([HEAD, BODY, write(ok_response()), FIN])
    proxy = start([upstream.address])
    statuses = []
    with raw_client(proxy) as raw:
        for index in range(12):
            body = b"post-%02d" % index
            raw.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
            response = raw.read_response()
            statuses.append(response.status)
            if response.header("Connection") == "close":
                break
    wait_for(lambda: len(upstream.bodies) >= statuses.count(200), what="bodies recorded")
    assert len(upstream.bodies) == len(set(upstream.bodies)), "a POST was executed twice"
    assert set(statuses) <= {200, 502}
    assert statuses.count(200) == len(upstream.bodies)


# -- failures before and after the response started ------------------------------------------------
@pytest.mark.parametrize("steps, status", [
    ([HEAD, RST], 502),
    ([HEAD, FIN], 502),
    ([HEAD, write(b"SSH-2.0-OpenSSH_9.6\r\n"), FIN], 502),            # junk instead of HTTP
    ([HEAD, write(b"\x00\x01\x02garbage\r\n\r\n"), FIN], 502),
    ([HEAD, HANG], 504),
    ([HEAD, write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"3\r\nabc\r\n0\r\n\r\n"), LOOP], 502),               # conflicting framing
    ([HEAD, write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"), LOOP], 502),
    ([HEAD, write(b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok"), LOOP], 502),   # space before colon
    ([HEAD, write(b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 2\r\n\r\nok"), LOOP], 502),  # obs-fold
    ([HEAD, write(b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok"), LOOP], 502),
    ([HEAD, write(b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok"), LOOP], 502),         # bare LF
    ([HEAD, write(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n"), LOOP], 502),  # oversized head
    ([HEAD, write(b"HTTP/1.1 1000 Bad\r\nContent-Length: 0\r\n\r\n"), LOOP], 502),
    ([HEAD, write(b"HTTP/2 200\r\nContent-Length: 0\r\n\r\n"), LOOP], 502),
    ([HEAD, write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"), LOOP], 502),  # bad chunk
])
def test_broken_response_before_it_started_is_an_error_status(upstreams, start, steps, status):
    upstream = upstreams(steps)
    proxy = start([upstream.address], upstream={"retries": 0, "read_timeout": "500ms"})
    raw, response = get(proxy)
    with raw.sock:
        assert response.status == status
    assert proxy.pool("web").idle_count == 0  # never pooled


@pytest.mark.parametrize("steps", [
    [HEAD, write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"), RST],
    [HEAD, write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"), FIN],
    [HEAD, write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"), HANG],
    [HEAD, write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"), FIN],
    [HEAD, write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"), sleep(0.05),
     write(b"zz\r\n"), HANG],
])
def test_failure_after_response_started_aborts_the_client_connection(upstreams, start, steps):
    upstream = upstreams(steps)
    proxy = start([upstream.address], upstream={"read_timeout": "500ms"})
    with raw_client(proxy) as raw:
        raw.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        head = raw.read_head()
        assert head.startswith(b"HTTP/1.1 200")
        with pytest.raises(ConnectionError):  # truncated, then closed: never a clean end
            raw._read_chunked() if b"chunked" in head else raw.read_exact(10)
    assert proxy.pool("web").idle_count == 0


def test_endless_1xx_is_cut_off(upstreams, start):
    """1xx are relayed (RFC 9110 §15.2), but not forever: past 16 the client gets a 502."""
    upstream = upstreams([HEAD, write(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" * 40), HANG])
    proxy = start([upstream.address], upstream={"read_timeout": "2s"})
    with raw_client(proxy) as raw:
        raw.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        response = raw.read_response()
    assert response.status == 502
    assert response.interim == [103] * 16


def test_slow_drip_within_read_timeout_is_delivered(upstreams, start):
    upstream = upstreams([HEAD, drip(ok_response(b"dripped"), 0.01), LOOP])
    proxy = start([upstream.address], upstream={"read_timeout": "1s"})
    raw, response = get(proxy)
    with raw.sock:
        assert (response.status, response.body) == (200, b"dripped")


# -- response bodies where none may be, bytes after the response, idle pooled bytes ---------------
@pytest.mark.parametrize("method, answer", [
    ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
    ("GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello"),
    ("GET", b"HTTP/1.1 304 Not Modified\r\n\r\nhello"),
    ("GET", ok_response() + b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nspoofed"),
    ("GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\nextra"),
])
def test_bytes_beyond_the_response_never_reach_the_next_request(upstreams, start, method, answer):
    upstream = upstreams([HEAD, write(answer), LOOP])
    proxy = start([upstream.address])
    with raw_client(proxy) as raw:
        for _ in range(3):
            raw.send(b"%s / HTTP/1.1\r\nHost: a\r\n\r\n" % method.encode())
            response = raw.read_response(method)
            assert response.body in (b"", b"ok")
            assert b"spoofed" not in raw.buffer and b"hello" not in raw.buffer
    assert upstream.connections == 3  # each connection was discarded, never reused


def test_bytes_on_an_idle_pooled_connection_discard_it(upstreams, start):
    # The first connection answers, then (idle in the pool) sends an unsolicited response at once.
    first = [HEAD, write(ok_response(b"one")), sleep(0.005), write(ok_response(b"evil")), HANG]
    upstream = upstreams(lambda index: first if index == 0 else [HEAD, write(ok_response(b"two")), LOOP])
    proxy = start([upstream.address])
    raw, response = get(proxy)
    raw.sock.close()
    assert response.body == b"one"
    wait_for(lambda: _pooled_dirty(proxy), what="the unsolicited bytes on the pooled connection")
    raw, response = get(proxy)
    raw.sock.close()
    assert response.body == b"two"


def _pooled_dirty(proxy) -> bool:
    idle = proxy.pool("web")._idle
    if not idle:
        return False
    try:
        return bool(idle[0].sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except (BlockingIOError, OSError):
        return False


def test_connection_close_from_upstream_is_not_pooled(upstreams, start):
    upstream = upstreams([HEAD, write(ok_response(extra=b"Connection: close\r\n")), HANG])
    proxy = start([upstream.address])
    for _ in range(2):
        assert status_of(proxy) == 200
    assert upstream.connections == 2
    assert proxy.pool("web").idle_count == 0


# -- uploads ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [1000, 4 * 1024 * 1024, 32 * 1024 * 1024])
def test_early_response_during_upload_is_relayed(upstreams, start, size):
    """The upstream answers 413 after the head and closes without reading the body (nginx, RFC 9112 §9.6)."""
    upstream = upstreams([HEAD, write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\n"
                                      b"Connection: close\r\n\r\nbig!"), sleep(0.05), FIN])
    proxy = start([upstream.address])
    with raw_client(proxy) as raw:
        raw.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % size)
        try:
            raw.send(b"x" * size)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the proxy stopped reading once the upstream answered: fine
        response = raw.read_response()
    assert response.status == 413
    assert upstream.executions == 1


def test_reset_during_upload_without_an_answer_is_502_and_the_client_reads_it(upstreams, start):
    """No early answer to relay: the upload failing upstream is a 502, which the client still gets
    (the proxy lingers, dropping the rest of the body, instead of resetting the client)."""
    upstream = upstreams([HEAD, RST])
    proxy = start([upstream.address])
    size = 32 * 1024 * 1024
    with raw_client(proxy) as raw:
        raw.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % size)
        try:
            raw.send(b"x" * size)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the proxy may stop reading once it gave up: fine, the answer is still there
        response = raw.read_response()
    assert response.status == 502
    assert upstream.executions == 1


def test_client_abort_mid_request_closes_upstream(upstreams, start):
    """A large body streams: the upstream has the head when the client goes, and sees the abort."""
    upstream = upstreams([HEAD, BODY, write(ok_response()), LOOP])
    proxy = start([upstream.address])
    with raw_client(proxy) as raw:
        raw.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\nonly-some")
        wait_for(lambda: upstream.executions == 1, what="the head forwarded")
    wait_for(lambda: proxy.pool("web").idle_count == 0 and upstream.bodies == [], what="abort propagated")


def test_client_abort_mid_small_body_never_reaches_the_upstream(upstreams, start):
    """A small body is read whole before the upstream is contacted: an abort leaves it untouched."""
    upstream = upstreams([HEAD, BODY, write(ok_response()), LOOP])
    proxy = start([upstream.address])
    with raw_client(proxy) as raw:
        raw.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nonly-some")
        wait_for(lambda: proxy.process.server.connection_counts().get("idle") == 1, what="the request parked")
    wait_for(lambda: proxy.process.server.connection_count == 0, what="the connection forgotten")
    assert upstream.connections == 0 and upstream.executions == 0


def test_client_abort_mid_response_closes_upstream(upstreams, start):
    big = b"HTTP/1.1 200 OK\r\nContent-Length: 20000000\r\n\r\n" + b"x" * 65536
    upstream = upstreams([HEAD, write(big), HANG])
    proxy = start([upstream.address], upstream={"read_timeout": "5s"})
    with raw_client(proxy) as raw:
        raw.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert raw.read_head().startswith(b"HTTP/1.1 200")
    # the proxy notices on its next write (or the read timeout) and drops both sides
    wait_for(lambda: proxy.pool("web").idle_count == 0 and proxy.process.pool.busy == 0, timeout=8,
             what="the exchange to be abandoned")
