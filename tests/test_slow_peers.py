"""A peer that stops keeping up costs no thread: its transfer is held by the server's transfer relay.

A client that stops reading a large response, or stops sending a large body, leaves the worker after a
short patience; the relay carries the transfer on when the peer is ready, with send_timeout and
body_timeout still enforced, and the connection goes back to keep-alive afterwards.
"""

from __future__ import annotations

import hashlib
import http.client
import socket

import pytest

from tests.support.backends import consume_and_digest, pattern_bytes, pattern_sha256, stream_pattern, stream_pattern_chunked
from tests.support.proxy import CLIENT_TIMEOUT
from tests.support.timing import wait_for

BIG = 8 * 1024 * 1024
UPLOAD = 1024 * 1024
SENT_BEFORE_STALL = 100 * 1024


def held(proxy) -> int:
    return proxy.process.server.connection_counts().get("held", 0)


def idle_workers(proxy) -> bool:
    return proxy.process.pool.busy == 0


def slow_client(proxy) -> socket.socket:
    """A client with a small receive buffer, so that not reading stops the proxy's sends early."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(CLIENT_TIMEOUT)
    sock.connect(("127.0.0.1", proxy.port))
    return sock


def read_response(sock: socket.socket, method: str = "GET") -> tuple[int, bytes]:
    response = http.client.HTTPResponse(sock, method=method)
    response.begin()
    return response.status, response.read()


def upload_head(path: str, length: int) -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {length}\r\n\r\n".encode()


@pytest.fixture
def big_backend(make_backend):
    backend = make_backend()
    backend.route("/big", stream_pattern(BIG)).route("/chunked", stream_pattern_chunked(BIG))
    backend.route("/upload", consume_and_digest)
    return backend


@pytest.mark.parametrize("path", ["/big", "/chunked"])
def test_a_client_not_reading_its_response_holds_no_thread(big_backend, make_proxy, path):
    proxy = make_proxy({"web": [big_backend.address]})
    with slow_client(proxy) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        wait_for(lambda: held(proxy) == 1, what="the stalled response held by the relay")
        wait_for(lambda: idle_workers(proxy), what="no worker busy with it")
        status, body = read_response(sock)
        assert status == 200
        assert hashlib.sha256(body).hexdigest() == pattern_sha256(BIG)
        # the connection went back to keep-alive: it carries the next request
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
        status, body = read_response(sock)
        assert status == 200 and len(body) == BIG


def test_a_held_response_still_meets_send_timeout(big_backend, make_proxy):
    proxy = make_proxy({"web": [big_backend.address]}, server={"send_timeout": "500ms"})
    records = []
    proxy.app.observers.append(records.append)
    with slow_client(proxy) as sock:
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
        wait_for(lambda: held(proxy) == 1, what="the stalled response held by the relay")
        wait_for(lambda: records, timeout=10, what="the proxy giving up on a client that reads nothing")
    assert records[0].status == 200 and records[0].bytes_sent < BIG
    wait_for(lambda: proxy.process.server.connection_count == 0, what="the connection closed")
    server = proxy.app.runtime.upstreams["web"].servers[0]
    assert server.available()  # a client that stopped reading is not the server's failure


def test_a_stalled_upload_holds_no_thread_and_completes(big_backend, make_proxy):
    proxy = make_proxy({"web": [big_backend.address]})
    body = pattern_bytes(0, UPLOAD)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=CLIENT_TIMEOUT) as sock:
        sock.sendall(upload_head("/upload", UPLOAD) + body[:SENT_BEFORE_STALL])
        wait_for(lambda: held(proxy) == 1, what="the stalled upload held by the relay")
        wait_for(lambda: idle_workers(proxy), what="no worker busy with it")
        sock.sendall(body[SENT_BEFORE_STALL:])
        status, answer = read_response(sock, "POST")
    assert status == 200
    assert answer == f"{UPLOAD} {hashlib.sha256(body).hexdigest()}".encode()


def test_a_held_upload_still_meets_body_timeout(big_backend, make_proxy):
    proxy = make_proxy({"web": [big_backend.address]}, server={"body_timeout": "500ms"})
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=CLIENT_TIMEOUT) as sock:
        sock.sendall(upload_head("/upload", UPLOAD) + pattern_bytes(0, SENT_BEFORE_STALL))
        wait_for(lambda: held(proxy) == 1, what="the stalled upload held by the relay")
        status, answer = read_response(sock, "POST")
    assert status == 408


def test_a_stalled_chunked_upload_holds_no_thread_and_completes(big_backend, make_proxy):
    proxy = make_proxy({"web": [big_backend.address]})
    pieces = [pattern_bytes(i * 4096, 4096) for i in range(64)]
    chunks = [b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces]
    head = b"POST /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=CLIENT_TIMEOUT) as sock:
        sock.sendall(head + b"".join(chunks[:32]))
        wait_for(lambda: held(proxy) == 1, what="the stalled upload held by the relay")
        wait_for(lambda: idle_workers(proxy), what="no worker busy with it")
        sock.sendall(b"".join(chunks[32:]) + b"0\r\n\r\n")
        status, answer = read_response(sock, "POST")
    whole = b"".join(pieces)
    assert status == 200
    assert answer == f"{len(whole)} {hashlib.sha256(whole).hexdigest()}".encode()


def test_a_drain_waits_for_a_held_transfer(big_backend, make_proxy):
    proxy = make_proxy({"web": [big_backend.address]}, server={"graceful_timeout": "10s"})
    with slow_client(proxy) as sock:
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
        wait_for(lambda: held(proxy) == 1, what="the stalled response held by the relay")
        proxy.process.server.request_shutdown()
        status, body = read_response(sock)  # the drain lets the held transfer finish
    assert status == 200 and len(body) == BIG
