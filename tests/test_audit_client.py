"""Regressions from an adversarial black-box audit of the client side (raw sockets against the real proxy).

Each test pins a bug that was found by throwing malformed or edge-case requests at a running proxy
in front of real backends, and that the conformance cases and engine tests did not catch.
"""

from __future__ import annotations

import hashlib
import socket
import time

import pytest
import requests

from tests.support.backends import pattern_sha256, stream_pattern
from tests.support.client import raw_client, read_small_answer
from tests.support.proxy import CLIENT_TIMEOUT
from tests.support.timing import wait_for

pytestmark = pytest.mark.timeout(30)

HEADER_TIMEOUT = 3.0
FEW_THREADS = {"min_threads": 1, "max_threads": 2, "header_timeout": f"{HEADER_TIMEOUT}s"}
ATTACKERS = 6  # three times max_threads


def _connect(proxy) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=CLIENT_TIMEOUT)


# -- empty lines before a request line hold no worker thread ------------------------------------------
# RFC 9112 §2.2 lets a client send CRLFs before a request line (old clients add one after a POST body).
# The parser skips them, which left its buffer empty: the handler then took the connection for idle
# and blocked a worker in recv() until header_timeout instead of parking it like any partial head, so
# a handful of connections sending "\r\n" starved the pool (slowloris without the trickle).
@pytest.mark.parametrize("opening", [
    b"\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nok\r\n",  # keep-alive, CRLF after the body
], ids=["fresh-connection", "after-post-body"])
def test_empty_lines_before_a_request_are_parked_not_blocking_a_worker(make_backend, make_proxy, opening):
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]}, server=FEW_THREADS)
    socks = [_connect(proxy) for _ in range(ATTACKERS)]
    try:
        for sock in socks:
            sock.sendall(opening)
        server = proxy.process.server
        wait_for(lambda: sum(server.connection_counts().values()) >= ATTACKERS, what="attackers accepted")
        started = time.monotonic()
        response = requests.get(proxy.url + "/", timeout=CLIENT_TIMEOUT)
        waited = time.monotonic() - started
        assert response.status_code == 200
        assert waited < HEADER_TIMEOUT / 3, f"a normal client waited {waited:.2f}s behind {ATTACKERS} CRLF senders"
        wait_for(lambda: proxy.process.pool.busy == 0, what="no worker held by a CRLF sender")
    finally:
        for sock in socks:
            sock.close()


# -- another protocol on the HTTP port: 400 at once, as nginx and HAProxy answer ---------------------
# The parser only judged the request line once the whole head (CRLFCRLF) was in, so a TLS ClientHello,
# an SSH banner or an SMTP greeting sat parked until header_timeout and got a 408.
@pytest.mark.parametrize("opening", [
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",  # TLS ClientHello on a plain-text listener
    b"SSH-2.0-OpenSSH_9.6\r\n",                       # a complete line that is no request line
    b"GET /\x00 HTTP/1.1\r\nHost: a\r\n",               # complete, malformed request line, head unfinished
], ids=["tls-client-hello", "ssh-banner", "nul-in-target"])
def test_a_start_line_that_cannot_become_a_request_is_400_at_once(make_backend, make_proxy, opening):
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]}, server={"header_timeout": f"{HEADER_TIMEOUT}s"})
    with _connect(proxy) as sock:
        sock.settimeout(HEADER_TIMEOUT / 2)  # a 408 after header_timeout fails here with a timeout
        sock.sendall(opening)
        answer = read_small_answer(sock)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:60]
    assert b"Connection: close" in answer
    assert backend.requests == []


# -- a relayed 1xx is not the response: a failure after it still gets a status ----------------------
# Relaying an interim response (103 Early Hints, 100 Continue) marked the response as started, so an
# upstream that then closed or stalled left the client with a cut connection and no final status,
# where a 502/504 can still be sent (RFC 9110 §15.2: 1xx responses precede a final one).
@pytest.mark.parametrize("after_hints, status", [("close", 502), ("hang", 504)])
def test_upstream_failure_after_a_relayed_1xx_is_an_error_status(make_raw_backend, make_proxy, after_hints, status):
    def script(peer):
        if not peer.read_head():
            return
        peer.send(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n")
        if after_hints == "hang":
            peer.hang()

    backend = make_raw_backend(script)
    proxy = make_proxy({"web": [backend.address]}, upstream_options={"retries": 0, "read_timeout": "500ms"})
    with raw_client(proxy) as raw:
        raw.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        response = raw.read_response()
    assert response.interim == [103]
    assert response.status == status


# -- closing with client bytes unread must not reset away the end of the response ---------------------
# When the proxy closed after a response (Connection: close, HTTP/1.0) while bytes the client sent later
# (a pipelined request, a stray CRLF) sat unread in the socket, close() sent a reset, and the kernel
# threw away the part of the response still in the send buffer: the client read a truncated body (5.7 of
# 8 MB) then ECONNRESET. nginx lingers (lingering_close) in this case; so does the proxy now.
BIG = 16 * 1024 * 1024  # well past loopback socket buffers: the proxy is still sending when the extra comes


@pytest.mark.parametrize("request_head, extra", [
    (b"GET /big HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"),
    (b"GET /big HTTP/1.0\r\n\r\n", b"\r\n"),
], ids=["connection-close-then-pipelined", "http10-then-stray-crlf"])
def test_unread_client_bytes_at_close_do_not_truncate_the_response(make_backend, make_proxy, request_head, extra):
    backend = make_backend().route("/big", stream_pattern(BIG))
    proxy = make_proxy({"web": [backend.address]})
    with raw_client(proxy) as raw:
        raw.send(request_head)
        head = raw.read_head()
        assert head.startswith(b"HTTP/1.1 200")
        raw.send(extra)  # arrives while the proxy is still relaying the body: unread when it closes
        body = raw.read_exact(BIG)
        assert raw.at_eof()
    assert hashlib.sha256(body).hexdigest() == pattern_sha256(BIG)


# -- Upgrade in an HTTP/1.0 request is ignored ---------------------------------------------------------
# RFC 9110 §7.8: a server MUST ignore Upgrade in an HTTP/1.0 request, and §15.2: no 1xx to a 1.0 client.
# The proxy forwarded it as an HTTP/1.1 upgrade, so a backend's 101 switched a 1.0 client into a tunnel.
def test_upgrade_in_an_http10_request_is_not_forwarded(make_raw_backend, make_proxy):
    heads = []

    def script(peer):
        head = peer.read_head()
        if not head:
            return
        heads.append(head)
        if b"upgrade" in head.lower():
            peer.send(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
            peer.hang()
        else:
            peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    backend = make_raw_backend(script)
    proxy = make_proxy({"web": [backend.address]})
    with raw_client(proxy) as raw:
        raw.send(b"GET / HTTP/1.0\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        response = raw.read_response()
        assert raw.at_eof()
    assert response.status == 200 and response.body == b"ok"
    assert len(heads) == 1 and b"upgrade" not in heads[0].lower()


# -- an early answer lingers once, for a bounded time ---------------------------------------------------
# A backend answering before it read the upload (403 here) closes the client connection with the
# body unread: the proxy lingers (nginx's lingering_close, LINGER_SECONDS) and closes, even while the
# client keeps sending. A client that never stops must not keep a worker (two lingers, or an endless one).
def test_a_client_still_uploading_after_an_early_answer_is_lingered_on_once(make_raw_backend, make_proxy):
    from proxy.serve.handler import LINGER_SECONDS

    def script(peer):
        if peer.read_head():
            peer.send(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\nConnection: close\r\n\r\nno")

    backend = make_raw_backend(script)
    proxy = make_proxy({"web": [backend.address]}, upstream_options={"retries": 0})
    with _connect(proxy) as sock:
        sock.sendall(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 90000000\r\n\r\n")  # under max_body_bytes
        sock.settimeout(0.05)
        answer, answered_at, piece, fin = b"", None, b"x" * 4096, False
        deadline = time.monotonic() + 4 * LINGER_SECONDS + 2  # bounded: the proxy must close well before
        try:
            while time.monotonic() < deadline:
                try:
                    sock.send(piece)  # the client keeps uploading the whole time, as curl would
                except (TimeoutError, BlockingIOError):
                    pass
                if fin:
                    time.sleep(0.05)  # pacing only: the loop waits for the reset that ends the linger
                    continue
                try:
                    got = sock.recv(4096)
                except (TimeoutError, BlockingIOError):
                    continue
                fin = not got  # the proxy's FIN starts its linger; it still reads (and drops) the upload
                answer += got
                answered_at = answered_at or time.monotonic()
        except OSError:
            pass  # reset or broken pipe: the proxy closed the socket for good
        closed_at = time.monotonic()
    assert answer.startswith(b"HTTP/1.1 403")
    assert closed_at - answered_at < LINGER_SECONDS * 1.6, f"lingered {closed_at - answered_at:.1f}s"
