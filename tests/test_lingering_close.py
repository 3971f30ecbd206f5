"""The lingering close (nginx's lingering_close) holds no worker: a client whose unread bytes wait
when the proxy closes on it is lingered on by core's transfer relay, so hundreds of them cannot keep
max_threads workers from serving anyone else."""

from __future__ import annotations

import errno
import socket
import threading
import time

import pytest
import requests

from core import SocketServer, ThreadPool
from core.connection import Connection, ConnectionState
from core.transfer_relay import Linger, TransferRelay
from proxy.config.schema import parse_config
from proxy.serve import handler as handler_module
from proxy.serve.runner import ProxyProcess
from tests.support.client import read_small_answer
from tests.support.proxy import CLIENT_TIMEOUT, config_document
from tests.support.timing import FakeClock, wait_for

pytestmark = pytest.mark.timeout(120)

LINGERING_CLIENTS = 300
MAX_THREADS = 4
# A head far past max_header_bytes, more than one read of the proxy: the proxy answers 431 (or 400)
# with most of it unread, so its close lingers.
OVERSIZED_HEAD = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * (handler_module.READ_SIZE + 64 * 1024)


def held(proxy) -> int:
    return proxy.process.server.transfers.held_count


def test_clients_lingered_on_hold_no_worker(make_backend, make_proxy, monkeypatch):
    # Lingers that never end on their own within the test: before the fix each one held a worker
    # (a blocking read per linger), so four of them stopped the proxy serving anyone.
    monkeypatch.setattr(handler_module, "LINGER_SECONDS", 600.0)
    monkeypatch.setattr(handler_module, "LINGER_READ_TIMEOUT", 600.0)
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]}, server={"min_threads": 1, "max_threads": MAX_THREADS})
    lingering = []
    try:
        for index in range(LINGERING_CLIENTS):
            sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=CLIENT_TIMEOUT)
            lingering.append(sock)
            sock.sendall(OVERSIZED_HEAD)
            answer = read_small_answer(sock)
            assert answer.startswith((b"HTTP/1.1 431", b"HTTP/1.1 400")), f"client {index}: {answer[:80]!r}"
        # Every one of them is still lingered on (none got its close), and a new client is served.
        wait_for(lambda: held(proxy) == LINGERING_CLIENTS, timeout=30, what="all lingers parked", on_timeout=lambda: f"held {held(proxy)} conns {proxy.process.server.connection_count} lingering {proxy.process.server._lingering}")
        response = requests.get(f"{proxy.url}/ok", timeout=30)
        assert response.status_code == 200
        assert held(proxy) == LINGERING_CLIENTS
    finally:
        for sock in lingering:
            sock.close()
    # A client that closes ends its linger: the relay closes the proxy's socket (no descriptor kept).
    wait_for(lambda: held(proxy) == 0, timeout=30, what="lingers ended by the clients' close")


def test_a_linger_ends_when_the_peer_stays_quiet_past_the_gap():
    clock = FakeClock()
    relay = TransferRelay(clock=clock)
    ours, theirs = socket.socketpair()
    try:
        theirs.sendall(b"unread bytes")
        closed = []
        relay.hold(Linger(ours, clock() + 100.0, 0.5, clock), lambda: closed.append(ours.close()))
        for piece in (b"more", b"still more"):  # read and dropped: the peer is not told off
            wait_for(lambda: not _readable(ours), what="bytes dropped")
            clock.advance(0.4)
            theirs.sendall(piece)
        wait_for(lambda: not _readable(ours), what="bytes dropped")
        assert closed == []
        for _ in range(5):  # quiet past the gap (the relay may stamp its last read a step late)
            clock.advance(0.6)
            if _closed_soon(closed):
                break
        assert closed, "the linger outlived its quiet gap"
        theirs.settimeout(CLIENT_TIMEOUT)
        assert theirs.recv(1) == b""  # a clean close (FIN), not a reset
    finally:
        relay.stop()
        theirs.close()
        ours.close()


def test_a_linger_ends_at_its_deadline_while_the_peer_keeps_sending():
    clock = FakeClock()
    relay = TransferRelay(clock=clock)
    ours, theirs = socket.socketpair()
    try:
        closed = []
        relay.hold(Linger(ours, clock() + 2.0, 0.5, clock), lambda: closed.append(ours.close()))
        for _ in range(10):  # 0.3 s steps, never quiet for the gap: only the deadline ends it
            theirs.sendall(b"x" * 100)
            wait_for(lambda: relay.held_count == 0 or not _readable(ours), what="bytes dropped")
            if closed:
                break
            clock.advance(0.3)
        wait_for(lambda: closed, what="linger over at its deadline")
        assert clock() - 1000.0 <= 3.0
    finally:
        relay.stop()
        theirs.close()
        ours.close()


def _closed_soon(closed: list) -> bool:
    try:
        wait_for(lambda: closed, timeout=2.0, what="linger over")
    except AssertionError:
        return False
    return True


def _readable(sock) -> bool:
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except (BlockingIOError, OSError):
        return False


def test_a_connection_outside_a_server_lingers_on_its_own_thread():
    ours, theirs = socket.socketpair()
    with theirs:
        conn = Connection(ours, ("local", 0))
        conn.transition(ConnectionState.READING)
        theirs.sendall(b"unread")
        theirs.shutdown(socket.SHUT_WR)  # the peer is done: the linger reads to its end and closes
        conn.close_lingering(60.0, 60.0)
        assert conn.state is ConnectionState.CLOSED
        theirs.settimeout(CLIENT_TIMEOUT)
        assert theirs.recv(1) == b""


def answer_then_linger(conn):
    """A handler that answers one read, then closes lingering: the linger ends when the client closes."""
    conn.transition(ConnectionState.READING)
    conn.read_some(4096)
    conn.transition(ConnectionState.PROCESSING)
    conn.transition(ConnectionState.WRITING)
    conn.sendall(b"answer\n")
    conn.close_lingering(60.0, 60.0)


def test_a_drain_lets_a_linger_end_and_leaves_no_socket_behind():
    # A linger holds a socket the server no longer lists: the drain used to stop the relay under it,
    # leaving the socket open with nobody reading (at the process's exit, a reset to the client).
    server = SocketServer(answer_then_linger, listeners=[("127.0.0.1", 0)],
                          pool=ThreadPool(min_threads=1, max_threads=2), graceful_timeout=30.0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with socket.create_connection(server.addresses[0][:2], timeout=CLIENT_TIMEOUT) as client:
            client.sendall(b"request\n")
            assert client.recv(100) == b"answer\n"
            wait_for(lambda: server.transfers.held_count == 1, what="the linger held by the relay")
            server.request_shutdown()
            wait_for(lambda: server.draining.is_set(), what="the drain started")
            client.sendall(b"more, read and dropped")
            assert not server.stopped.wait(0.3), "the drain ended with a linger still going on"
        wait_for(server.stopped.is_set, timeout=30, what="the drain over once the client closed")
        assert server.transfers.held_count == 0
    finally:
        server.request_shutdown(force=True)
        thread.join(CLIENT_TIMEOUT)


def test_a_lingering_socket_still_counts_against_max_connections():
    # Lingered on by the relay, a socket is no longer a listed connection, but it is still a client's
    # descriptor: max_connections must bound those too, as it did while a worker lingered.
    def overloaded(sock):
        sock.sendall(b"busy\n")

    server = SocketServer(answer_then_linger, listeners=[("127.0.0.1", 0)], max_connections=1,
                          on_overload=overloaded, pool=ThreadPool(min_threads=1, max_threads=2))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    address = server.addresses[0][:2]
    try:
        with socket.create_connection(address, timeout=CLIENT_TIMEOUT) as lingering:
            lingering.sendall(b"request\n")
            assert lingering.recv(100) == b"answer\n"
            wait_for(lambda: server.transfers.held_count == 1, what="the linger held by the relay")
            with socket.create_connection(address, timeout=CLIENT_TIMEOUT) as second:
                second.sendall(b"request\n")
                assert second.recv(100) == b"busy\n"
        wait_for(lambda: server.transfers.held_count == 0, what="the linger over")
        with socket.create_connection(address, timeout=CLIENT_TIMEOUT) as third:  # room again
            third.sendall(b"request\n")
            assert third.recv(100) == b"answer\n"
    finally:
        server.request_shutdown(force=True)
        thread.join(CLIENT_TIMEOUT)


def test_a_stopped_relay_ends_what_it_holds_and_what_comes_after():
    # The relay's end (the server's very last step) abandoned what it still held, and a wait handed
    # over after it: a lingering socket then stayed open with nobody reading it.
    clock = FakeClock()
    relay = TransferRelay(clock=clock)
    ours, theirs = socket.socketpair()
    late, late_peer = socket.socketpair()
    try:
        ended = []
        relay.hold(Linger(ours, clock() + 100.0, 100.0, clock), lambda: ended.append("held"))
        wait_for(lambda: relay.running and relay.held_count == 1, what="linger held")
        relay.stop()
        wait_for(lambda: ended == ["held"], what="the held linger ended by the stop")
        relay.hold(Linger(late, clock() + 100.0, 100.0, clock), lambda: ended.append("late"))
        wait_for(lambda: ended == ["held", "late"], what="a linger handed over after the stop ended")
    finally:
        for sock in (ours, theirs, late, late_peer):
            sock.close()


def test_a_wait_the_relay_cannot_start_for_ends_at_once_and_the_relay_starts_later(monkeypatch):
    # Out of descriptors (a flood of clients), making the relay's epoll set or wake-up pipe failed
    # after the wait was queued: the error reached the worker as a traceback, and the wait sat in a
    # queue nobody read, its socket open (a linger: counted against max_connections for good).
    from core import transfer_relay

    relay = TransferRelay()
    ours, theirs = socket.socketpair()
    later, later_peer = socket.socketpair()
    real_pipe = transfer_relay.WakePipe

    def out_of_descriptors():
        raise OSError(errno.EMFILE, "Too many open files")

    try:
        monkeypatch.setattr(transfer_relay, "WakePipe", out_of_descriptors)
        done = []
        relay.hold(Linger(ours, time.monotonic() + 60.0, 60.0, time.monotonic), lambda: done.append(ours.close()))
        assert done == [None], "the wait was left queued"
        assert ours.fileno() == -1 and relay.held_count == 0 and not relay.running
        monkeypatch.setattr(transfer_relay, "WakePipe", real_pipe)  # descriptors again: the next one starts it
        closed = []
        relay.hold(Linger(later, time.monotonic() + 60.0, 60.0, time.monotonic), lambda: closed.append(later.close()))
        later_peer.close()  # the peer's close ends this linger
        wait_for(lambda: closed, what="the linger carried out by a started relay")
    finally:
        relay.stop()
        for sock in (ours, theirs, later, later_peer):
            sock.close()



def test_a_refused_head_lingers_though_the_rest_of_it_has_not_arrived_yet():
    # The close lingered only if the client's next bytes were already waiting. A client still sending
    # the head the proxy refused (431: the rest in flight, or its sender not scheduled yet) had its
    # connection closed at once: the rest of its head then drew a reset, and bytes arriving just
    # between the look and the close made the close itself a reset, either of which can destroy the
    # answer on its way. A refusal now always lingers (without a worker: core's relay carries it).
    process = ProxyProcess(parse_config(config_document({"web": {"servers": ["127.0.0.1:9"]}}), "test.toml"),
                           listeners=[])
    client, server_side = socket.socketpair()
    try:
        conn = Connection(server_side, ("127.0.0.1", 40000))
        lingered = []
        conn.lingerer = lambda sock, seconds, quiet: (lingered.append(seconds), sock.close())
        client.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 20000)  # past max_header_bytes, one read
        process.server.handler(conn)
        assert conn.closed
        assert lingered, "closed at once, with the rest of the refused head still to come"
        client.settimeout(CLIENT_TIMEOUT)
        assert client.recv(65536).startswith(b"HTTP/1.1 431")
    finally:
        client.close()
        process.pool.shutdown(timeout=5)
