"""Held transfers attacked from outside: peers that trickle, reset or vanish while the server's
transfer relay carries their transfer, and what the proxy then logs, counts and keeps."""

from __future__ import annotations

import hashlib
import http.client
import os
import selectors
import socket
import threading

import pytest

from core.transfer_relay import CHUNK, Readable, Send, TransferRelay, Wait
from tests.support.backends import consume_and_digest, stream_pattern, stream_pattern_chunked
from tests.support.faulty_upstream import HANG, HEAD
from tests.support.proxy import CLIENT_TIMEOUT
from tests.support.timing import wait_for

BIG = 8 * 1024 * 1024
TRICKLE_PIECE = 1024
TRICKLE_GAP = 0.04
MAX_TRICKLE_PIECES = 250  # 10 s of trickling at most: the bound of every trickle loop


def held(proxy) -> int:
    return proxy.process.server.connection_counts().get("held", 0)


def read_response(sock: socket.socket, method: str = "GET") -> tuple[int, bytes]:
    response = http.client.HTTPResponse(sock, method=method)
    response.begin()
    return response.status, response.read()


def test_a_trickled_chunked_upload_leaves_the_worker(make_backend, make_proxy):
    # A client sending one small chunk every 40 ms never lets a read wait out the patience: without
    # a budget it would keep a worker for the whole upload.
    backend = make_backend().route("/upload", consume_and_digest)
    proxy = make_proxy({"web": [backend.address]})
    piece = b"a" * TRICKLE_PIECE
    chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
    seen_held = threading.Event()
    sent = 0
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=CLIENT_TIMEOUT) as sock:
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(MAX_TRICKLE_PIECES):
            sock.sendall(chunk)
            sent += 1
            if held(proxy) == 1 and proxy.process.pool.busy == 0:
                seen_held.set()
                break
            seen_held.wait(TRICKLE_GAP)
        sock.sendall(b"0\r\n\r\n")
        status, answer = read_response(sock, "POST")
    assert seen_held.is_set(), "the trickled upload kept a worker to the end"
    whole = piece * sent
    assert status == 200
    assert answer == f"{len(whole)} {hashlib.sha256(whole).hexdigest()}".encode()


def slow_client(proxy) -> socket.socket:
    """A client with a small receive buffer, so that not reading stops the proxy's sends early."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(CLIENT_TIMEOUT)
    sock.connect(("127.0.0.1", proxy.port))
    return sock


def read_to_end(sock: socket.socket) -> int:
    """Bytes received until the peer's FIN (or reset), bounded by the socket's timeout per read."""
    total = 0
    try:
        while data := sock.recv(65536):
            total += len(data)
    except ConnectionResetError:
        pass
    return total


@pytest.mark.parametrize("path", ["/big", "/chunked"])
def test_a_held_response_given_up_logs_the_bytes_the_client_got(make_backend, make_proxy, path):
    # nginx's bytes_sent is what went to the client: a transfer that ended in the relay counts what
    # the relay moved too, not only what the worker sent before it stalled.
    backend = make_backend()
    backend.route("/big", stream_pattern(BIG)).route("/chunked", stream_pattern_chunked(BIG))
    proxy = make_proxy({"web": [backend.address]}, server={"send_timeout": "300ms"})
    records = []
    proxy.app.observers.append(records.append)
    with slow_client(proxy) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        wait_for(lambda: held(proxy) == 1, what="the stalled response held by the relay")
        wait_for(lambda: records, timeout=10, what="the proxy giving up on a client that reads nothing")
        received = read_to_end(sock)
    assert 0 < received < BIG
    assert records[0].bytes_sent == received


def test_an_upstream_reset_while_held_logs_the_bytes_the_client_got(make_raw_backend, make_proxy):
    reset_now = threading.Event()

    def script(peer):
        peer.read_head()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG + b"x" * (BIG // 2))
        reset_now.wait(CLIENT_TIMEOUT)
        peer.reset()

    backend = make_raw_backend(script)
    proxy = make_proxy({"web": [backend.address]})
    records = []
    proxy.app.observers.append(records.append)
    with slow_client(proxy) as sock:
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
        wait_for(lambda: held(proxy) == 1, what="the stalled response held by the relay")
        reset_now.set()
        received = read_to_end(sock)
    wait_for(lambda: records, what="the request logged")
    assert received > BIG // 2  # the head and every body byte the server sent
    assert records[0].bytes_sent == received
    server = proxy.app.runtime.upstreams["web"].servers[0]
    assert server.failures_total == 1  # the server broke the transfer: it counts against it


def upload_head(length: int) -> bytes:
    return f"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: {length}\r\n\r\n".encode()


def test_a_drain_past_its_deadline_logs_a_held_upload(make_backend, make_proxy):
    # At graceful_timeout the held upload is cut: its exchange must still end as any other (logged,
    # its server slot released), not vanish because the pool stopped before the relay let it go.
    backend = make_backend().route("/upload", consume_and_digest)
    proxy = make_proxy({"web": [backend.address]}, server={"graceful_timeout": "200ms"})
    records = []
    proxy.app.observers.append(records.append)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=CLIENT_TIMEOUT) as sock:
        sock.sendall(upload_head(1024 * 1024) + b"a" * (100 * 1024))
        wait_for(lambda: held(proxy) == 1, what="the stalled upload held by the relay")
        proxy.process.server.request_shutdown()
        proxy.thread.join(CLIENT_TIMEOUT)
    assert not proxy.thread.is_alive()
    assert [record.status for record in records] == [499]
    server = proxy.app.runtime.upstreams["web"].servers[0]
    assert server.active_requests == 0 and server.failures_total == 0


def test_a_drain_past_its_deadline_logs_a_held_response_waiting_on_its_server(make_raw_backend, make_proxy):
    # The client caught up and the relay waits for the server's next bytes: cutting the client
    # alone would leave the transfer waiting until the server's read_timeout.
    def script(peer):
        peer.read_head()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG + b"x" * (BIG // 2))
        peer.hang()

    backend = make_raw_backend(script)
    proxy = make_proxy({"web": [backend.address]}, server={"graceful_timeout": "200ms"},
                       upstream_options={"read_timeout": "30s"})
    records = []
    proxy.app.observers.append(records.append)
    with slow_client(proxy) as sock:
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
        wait_for(lambda: held(proxy) == 1, what="the stalled response held by the relay")
        received = 0
        while received < BIG // 2:  # all the server sent: the relay now waits on the server
            received += len(sock.recv(65536))
        proxy.process.server.request_shutdown()
        proxy.thread.join(CLIENT_TIMEOUT)
    assert not proxy.thread.is_alive()
    assert [record.status for record in records] == [200]
    server = proxy.app.runtime.upstreams["web"].servers[0]
    assert server.active_requests == 0 and server.failures_total == 0


@pytest.mark.parametrize("framing", ["chunked", "close-delimited"])
def test_a_held_response_keeps_at_most_one_chunk_in_python(make_raw_backend, make_proxy, framing):
    # A body decoded in Python (chunked, or ending at the server's close) is read from the server in
    # pieces; a client that stops reading must not leave a large piece waiting in a Send.
    piece = b"q" * (1024 * 1024)

    def script(peer):
        peer.read_head()
        if framing == "chunked":
            peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(8):
                peer.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            peer.send(b"0\r\n\r\n")
        else:
            peer.send(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + piece * 8)

    backend = make_raw_backend(script)
    proxy = make_proxy({"web": [backend.address]})
    with slow_client(proxy) as sock:
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
        wait_for(lambda: held(proxy) == 1, what="the stalled response held by the relay")
        waits = [conn.held_wait for conn in list(proxy.process.server._connections.values()) if conn.held_wait]
        assert [type(wait) for wait in waits] == [Send]
        assert len(waits[0].data.obj) <= CHUNK + 1024  # one piece, its chunk framing and the head


class _BrokenWait(Wait):
    """A wait that stops on a socket the relay cannot watch (closed under it)."""

    def __init__(self, sock):
        super().__init__()
        self.sock = sock

    def sockets(self) -> tuple:
        return (self.sock,)

    def step(self) -> bool:
        self.sock.close()
        self.blocked_on = (self.sock, selectors.EVENT_READ)
        return False


def test_a_transfer_the_relay_cannot_watch_fails_alone():
    relay = TransferRelay()
    done = []
    broken_a, broken_b = socket.socketpair()
    good_a, good_b = socket.socketpair()
    try:
        relay.hold(_BrokenWait(broken_a), lambda: done.append("broken"))
        wait_for(lambda: "broken" in done, what="the broken transfer handed back with its error")
        relay.hold(Readable(good_a, read_gap=CLIENT_TIMEOUT), lambda: done.append("good"))
        good_b.sendall(b"x")
        wait_for(lambda: "good" in done, what="the relay still serving the next transfer")
    finally:
        relay.stop()
        for sock in (broken_a, broken_b, good_a, good_b):
            sock.close()


def open_pipes() -> int:
    """Pipe descriptors of this process (the proxy runs in it; the test's own sockets are not pipes)."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{name}").startswith("pipe:")
        except OSError:  # closed since the listing
            pass
    return count


def test_an_upload_the_server_stops_reading_leaks_no_pipe(upstreams, make_proxy):
    # The splice that timed out writing to the server hands its pipe (and the bytes in it) to the
    # caller; a 504 must close it, or every such upload costs the process two descriptors.
    upstream = upstreams([HEAD, HANG])
    proxy = make_proxy({"web": [upstream.address]}, upstream_options={"read_timeout": "300ms", "retries": 0})
    body = b"a" * (64 * 1024 * 1024)
    statuses, counts = [], []
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=CLIENT_TIMEOUT) as sock:
            sender = threading.Thread(target=_send_quietly, args=(sock, upload_head(len(body)) + body))
            sender.start()
            statuses.append(read_response(sock, "POST")[0])
            sock.shutdown(socket.SHUT_RDWR)
            sender.join(CLIENT_TIMEOUT)
        wait_for(lambda: proxy.process.server.connection_count == 0, what="the connection closed")
        counts.append(open_pipes())
    assert statuses == [504, 504, 504]
    assert counts[2] == counts[1] == counts[0], counts


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:  # the proxy answered and closed before the whole body went
        pass


@pytest.mark.parametrize("ending", ["fin", "reset"])
def test_an_upstream_failing_mid_body_logs_the_bytes_the_client_got(make_raw_backend, make_proxy, ending):
    # The same count when the body was not held at all: the client kept up and the server quit.
    def script(peer):
        peer.read_head()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG + b"x" * (BIG // 2))
        if ending == "reset":
            peer.reset()

    backend = make_raw_backend(script)
    proxy = make_proxy({"web": [backend.address]})
    records = []
    proxy.app.observers.append(records.append)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=CLIENT_TIMEOUT) as sock:
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
        received = read_to_end(sock)
    wait_for(lambda: records, what="the request logged")
    # A reset discards what the proxy had not read yet, so then only some of the half arrives.
    assert (BIG // 2 if ending == "fin" else 0) < received < BIG
    assert records[0].bytes_sent == received
