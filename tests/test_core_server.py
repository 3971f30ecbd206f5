"""SocketServer over real loopback sockets with the line-echo handler (tests/support/echo_server.py):
concurrency, keep-alive parking, timeouts, overload, phased shutdown, failing and stuck handlers."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import signal as signals
import socket
import struct
import threading
import time

import pytest

from core import Connection, ConnectionState, SocketServer, ThreadPool
from core.socket_server import ACCEPT_PAUSE, REAP_INTERVAL, SHED_LOG_INTERVAL, Listener
from core.transfer_relay import Readable
from tests.support.echo_server import EchoHandler, LineClient, STOP_TIMEOUT, overload_reply, running_server
from tests.support.timing import FakeClock, wait_for


@pytest.fixture
def handler():
    echo = EchoHandler()
    yield echo
    echo.slow_release.set()  # never leave a worker blocked on a failed test


def address(server: SocketServer):
    return server.addresses[0]


def connect_refused(addr) -> bool:
    try:
        probe = socket.create_connection(addr[:2], timeout=1.0)
    except ConnectionRefusedError:
        return True
    probe.close()
    return False


# -- serving ------------------------------------------------------------------------------------

def test_work_the_handler_leaves_runs_after_the_connection_is_parked(handler):
    # A handler may return a callable (an HTTP/2 stream to run): the worker runs it once the connection
    # is back in the selector, so the connection's next request is served meanwhile, by another worker.
    with running_server(handler, pool=ThreadPool(min_threads=2, max_threads=4)) as server:
        with LineClient(address(server)) as client:
            assert client.exchange(b"later") == b"later\n"
            assert client.exchange(b"meanwhile") == b"meanwhile\n"  # while the left work still waits
            assert not handler.later_done.is_set()
            handler.later_release.set()
            wait_for(handler.later_done.is_set, what="the work left by the handler")


def test_many_concurrent_clients(handler):
    clients, lines = 50, 20
    errors: list[str] = []
    start = threading.Barrier(clients)

    def client(n: int):
        try:
            with LineClient(addr) as c:
                start.wait(STOP_TIMEOUT)
                for i in range(lines):
                    line = f"client {n} line {i}".encode()
                    reply = c.exchange(line)
                    if reply != line + b"\n":
                        errors.append(f"{line!r} -> {reply!r}")
        except Exception as exc:  # collected and asserted on below, in the test thread
            errors.append(f"client {n}: {exc!r}")

    with running_server(handler, pool=ThreadPool(min_threads=2, max_threads=16)) as server:
        addr = address(server)
        threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads)
        assert errors == []
        # served is counted just after the reply is sent, so the last count may trail the reply
        wait_for(lambda: handler.served == clients * lines, what="every line counted")
        assert server.accepted_total == clients
        assert server.pool.threads <= 16


def test_keep_alive_reuses_one_connection(handler):
    with running_server(handler) as server:
        with LineClient(address(server)) as c:
            for i in range(200):
                assert c.exchange(b"ping %d" % i) == b"ping %d\n" % i
            assert server.accepted_total == 1
            wait_for(lambda: server.connection_counts()["idle"] == 1, what="the connection parked idle")
            # Parked: no thread holds it. The worker that parked it counts as busy until it is back
            # in the pool, a moment after the park (on a loaded machine, a long moment): wait for that.
            wait_for(lambda: server.pool.counts()["busy"] == 0, what="the worker back in the pool",
                     on_timeout=server.pool.counts)
            assert server.connection_counts()["idle"] == 1  # and the connection is still parked


def test_accepted_sockets_are_blocking_with_nodelay():
    # The accept loop sets neither per connection (it saves a syscall each): TCP_NODELAY comes from
    # the listening socket (Linux copies it), blocking mode from accept4 without SOCK_NONBLOCK.
    seen = []

    def inspect(conn):
        sock = conn.sock
        seen.append((sock.gettimeout(), sock.getblocking(),
                     sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)))
        conn.close()

    with running_server(inspect) as server:
        with socket.create_connection(address(server)[:2], timeout=STOP_TIMEOUT) as client:
            client.sendall(b"hello\n")
            wait_for(lambda: seen, what="the handler to look at the socket")
        assert seen == [(None, True, 1)]


def test_accepted_sockets_start_with_the_timeouts_the_listener_passes_on():
    # accepted_timeouts is set once on the listening socket; Linux copies it to every accepted socket,
    # and the Connection knows it, so asking for the same value again costs no syscall.
    seen = []

    def inspect(conn):
        sent = struct.unpack("ll", conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, 16))
        received = struct.unpack("ll", conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16))
        seen.append((sent, received, conn._read_timeout, conn._write_timeout))
        conn.close()

    with running_server(inspect, accepted_timeouts=(None, 2.0)) as server:
        with socket.create_connection(address(server)[:2], timeout=STOP_TIMEOUT) as client:
            client.sendall(b"hello\n")
            wait_for(lambda: seen, what="the handler to look at the socket")
        assert seen == [((2, 0), (0, 0), None, 2.0)]


def test_accepting_skips_socket_accept_and_its_enum_conversions(handler, monkeypatch):
    # socket.socket.accept converts the listener's family and type to enums on every call (four
    # Python-level calls per connection): the accept loop reads them once per listener instead.
    def refuse(self):
        raise AssertionError("socket.socket.accept called per connection")

    monkeypatch.setattr(socket.socket, "accept", refuse)
    with running_server(handler) as server:
        with LineClient(address(server)) as client:
            assert client.exchange(b"hello") == b"hello\n"
        wait_for(lambda: server.connection_count == 0, what="the first connection forgotten")
        conns = []
        with LineClient(address(server)) as client:
            assert client.exchange(b"again") == b"again\n"
            conns = list(server._connections.values())
        assert [(c.sock.family, c.sock.type) for c in conns] == [(socket.AF_INET, socket.SOCK_STREAM)]


def test_pipelined_lines_are_all_answered(handler):
    with running_server(handler) as server, LineClient(address(server)) as c:
        c.sock.sendall(b"".join(b"p%d\n" % i for i in range(10)))
        assert [c.read_line() for _ in range(10)] == [b"p%d\n" % i for i in range(10)]


def test_quit_closes_and_the_server_forgets_the_connection(handler):
    with running_server(handler) as server, LineClient(address(server)) as c:
        assert c.exchange(b"quit") == b"bye\n"
        assert c.wait_closed() == b""
        wait_for(lambda: server.connection_count == 0, what="connection forgotten")


def test_handler_ending_with_transition_closed_releases_the_connection():
    from core import ConnectionState

    def close_by_transition(conn):
        conn.transition(ConnectionState.READING)
        conn.read_until(b"\n", 100)
        conn.transition(ConnectionState.CLOSED)

    with running_server(close_by_transition) as server, LineClient(address(server)) as c:
        c.send_line(b"hi")
        assert c.wait_closed() == b""
        wait_for(lambda: server.connection_count == 0, what="connection forgotten")


def test_raising_handler_does_not_stop_the_server(handler, caplog):
    with running_server(handler) as server:
        with LineClient(address(server)) as bystander:
            assert bystander.exchange(b"before") == b"before\n"
            with caplog.at_level(logging.ERROR, logger="pyproxy.core.server"):
                with LineClient(address(server)) as victim:
                    victim.send_line(b"boom")
                    assert victim.wait_closed() == b""  # its connection is closed, nothing sent
            assert bystander.exchange(b"after") == b"after\n"
            with LineClient(address(server)) as newcomer:
                assert newcomer.exchange(b"new") == b"new\n"
        assert any("boom requested by the test" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)


def test_client_leaving_between_lines_is_not_an_error(handler, caplog):
    with caplog.at_level(logging.ERROR, logger="pyproxy.core"):
        with running_server(handler) as server:
            with LineClient(address(server)) as c:
                assert c.exchange(b"one") == b"one\n"
            wait_for(lambda: server.connection_count == 0, what="closed connection forgotten")
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


# -- timeouts -----------------------------------------------------------------------------------

def test_idle_keep_alive_connection_is_closed_after_idle_timeout(handler):
    with running_server(handler, idle_timeout=0.3) as server, LineClient(address(server)) as c:
        assert c.exchange(b"once") == b"once\n"
        idle_since = time.monotonic()
        assert c.wait_closed() == b""  # bounded by the client socket timeout
        waited = time.monotonic() - idle_since
        assert 0.25 <= waited < 0.3 + 2 * REAP_INTERVAL + 1.0
        wait_for(lambda: server.connection_count == 0, what="reaped connection forgotten")


def test_silent_new_connection_is_closed_after_header_timeout(handler):
    with running_server(handler, header_timeout=0.3, idle_timeout=60) as server:
        with LineClient(address(server)) as silent, LineClient(address(server)) as talker:
            assert talker.exchange(b"hello") == b"hello\n"
            assert silent.wait_closed() == b""
            assert talker.exchange(b"still here") == b"still here\n"  # idle_timeout is long


def test_connections_shed_in_a_flood_are_logged_once_a_second_with_a_count(handler, caplog):
    """Bug: every connection the full queue refused logged its own warning, so an overload (thousands
    shed a second) added a log flood to itself. One line per SHED_LOG_INTERVAL now, with a count."""
    clock = FakeClock()
    pool = ThreadPool(min_threads=1, max_threads=1, max_queue=1)

    def shed_lines():
        return [r.getMessage() for r in caplog.records if "work queue full" in r.getMessage()]

    with running_server(handler, pool=pool, clock=clock, idle_timeout=60, header_timeout=60) as server:
        addr = address(server)
        with LineClient(addr) as slow, LineClient(addr) as queued, \
                caplog.at_level(logging.WARNING, logger="pyproxy.core.server"):
            slow.send_line(b"slow")
            assert handler.slow_entered.wait(STOP_TIMEOUT)  # the only worker is now busy
            queued.send_line(b"queued")
            wait_for(lambda: pool.counts()["queued"] == 1, what="the second request queued")
            for _ in range(5):  # within one interval on the server's clock: one line for all five
                with LineClient(addr) as shed:
                    shed.send_line(b"shed")
                    assert shed.wait_closed() == b""
            assert shed_lines() == [shed_lines()[0]] and "closing connection from" in shed_lines()[0]
            clock.advance(SHED_LOG_INTERVAL)
            with LineClient(addr) as shed:
                shed.send_line(b"shed")
                assert shed.wait_closed() == b""
            assert len(shed_lines()) == 2 and "closed 5 connections since the last warning" in shed_lines()[1]
            handler.slow_release.set()
            assert slow.read_line() == b"slow\n"
            assert queued.read_line() == b"queued\n"


def test_reaper_never_closes_a_connection_waiting_for_a_worker(handler):
    """A parked connection whose bytes arrived is the worker's, even if it idled a long time."""
    clock = FakeClock()
    pool = ThreadPool(min_threads=1, max_threads=1)
    with running_server(handler, pool=pool, clock=clock, idle_timeout=10, header_timeout=10) as server:
        addr = address(server)
        with LineClient(addr) as slow, LineClient(addr) as waiting, LineClient(addr) as silent:
            wait_for(lambda: server.connection_count == 3, what="three connections accepted")
            slow.send_line(b"slow")
            assert handler.slow_entered.wait(STOP_TIMEOUT)  # the only worker is now busy
            waiting.send_line(b"queued")
            wait_for(lambda: pool.counts()["queued"] == 1, what="the second request queued")
            clock.advance(60)  # both waiting and silent are now "too old"
            server.call_soon(lambda: None)  # wake the loop so it reaps
            assert silent.wait_closed() == b""  # the reaper ran
            handler.slow_release.set()
            assert slow.read_line() == b"slow\n"
            assert waiting.read_line() == b"queued\n"


def test_connections_past_a_full_work_queue_are_closed_and_the_queued_one_served(handler, caplog):
    """The loop hands ready connections to the pool in batches; what the full queue refuses is shed."""
    pool = ThreadPool(min_threads=1, max_threads=1, max_queue=1)
    with running_server(handler, pool=pool) as server:
        addr = address(server)
        with LineClient(addr) as slow, LineClient(addr) as queued, LineClient(addr) as shed:
            slow.send_line(b"slow")
            assert handler.slow_entered.wait(STOP_TIMEOUT)  # the only worker is now busy
            queued.send_line(b"queued")
            wait_for(lambda: pool.counts()["queued"] == 1, what="the second request queued")
            with caplog.at_level(logging.WARNING, logger="pyproxy.core.server"):
                shed.send_line(b"shed")
                assert shed.wait_closed() == b""
            assert "work queue full" in caplog.text
            handler.slow_release.set()
            assert slow.read_line() == b"slow\n"
            assert queued.read_line() == b"queued\n"
        wait_for(lambda: server.connection_count == 0, what="every connection forgotten")


# -- overload -----------------------------------------------------------------------------------

def test_max_connections_overload_reply_then_close(handler):
    with running_server(handler, max_connections=3, on_overload=overload_reply) as server:
        addr = address(server)
        existing = [LineClient(addr) for _ in range(3)]
        try:
            for i, c in enumerate(existing):
                assert c.exchange(b"hi %d" % i) == b"hi %d\n" % i
            with LineClient(addr) as extra:
                assert extra.read_line() == b"busy\n"
                assert extra.wait_closed() == b""
            assert server.overloaded_total == 1
            for i, c in enumerate(existing):  # existing clients are unaffected
                assert c.exchange(b"again %d" % i) == b"again %d\n" % i
            existing.pop().close()
            wait_for(lambda: server.connection_count == 2, what="a slot freed")
            with LineClient(addr) as late:
                assert late.exchange(b"room now") == b"room now\n"
        finally:
            for c in existing:
                c.close()


def test_overload_reply_is_followed_by_a_clean_close_even_if_the_client_already_sent(handler):
    # Closing with the client's bytes unread would reset the connection (RST), which can destroy the
    # reply before the client reads it; the server reads and drops them first, so the close is a FIN.
    with running_server(handler, max_connections=1, on_overload=overload_reply) as server:
        with LineClient(address(server)) as first:
            assert first.exchange(b"hi") == b"hi\n"
            with socket.create_connection(address(server)[:2], timeout=STOP_TIMEOUT) as extra:
                extra.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
                wait_for(lambda: server.overloaded_total == 1, what="the extra client rejected")
                received = b""
                while not received.endswith(b"busy\n"):  # bounded by the socket timeout
                    chunk = extra.recv(100)
                    assert chunk, received
                    received += chunk
                assert extra.recv(100) == b""  # FIN, not ConnectionResetError


# -- shutdown -----------------------------------------------------------------------------------

def test_graceful_shutdown_lets_the_slow_exchange_finish(handler):
    with running_server(handler, graceful_timeout=STOP_TIMEOUT) as server:
        addr = address(server)
        with LineClient(addr) as slow, LineClient(addr) as idle:
            assert idle.exchange(b"park me") == b"park me\n"
            slow.send_line(b"slow")
            assert handler.slow_entered.wait(STOP_TIMEOUT)
            server.request_shutdown()
            assert server.draining.wait(STOP_TIMEOUT)
            wait_for(lambda: connect_refused(addr), what="the listener closed")
            assert idle.wait_closed() == b""  # resting connections close at once
            assert not server.stopped.is_set()  # in-flight work holds the drain open
            handler.slow_release.set()
            assert slow.read_line() == b"slow\n"  # the full answer
            assert slow.wait_closed() == b""  # then the connection closes (draining)
            assert server.stopped.wait(STOP_TIMEOUT)
            assert handler.slow_finished.is_set()


def test_force_close_at_graceful_timeout(handler):
    with running_server(handler, graceful_timeout=0.5) as server, LineClient(address(server)) as stuck:
        stuck.send_line(b"stuck")
        assert handler.stuck_entered.wait(STOP_TIMEOUT)
        started = time.monotonic()
        server.request_shutdown()
        assert server.stopped.wait(STOP_TIMEOUT)
        elapsed = time.monotonic() - started
        assert 0.4 <= elapsed < 0.5 + 3.0  # waited for the grace period, not much longer
        assert stuck.wait_closed() == b""  # its socket was aborted


def test_forced_shutdown_does_not_wait_for_in_flight_work(handler):
    with running_server(handler, graceful_timeout=60) as server, LineClient(address(server)) as slow:
        slow.send_line(b"slow")
        assert handler.slow_entered.wait(STOP_TIMEOUT)
        started = time.monotonic()
        server.request_shutdown(force=True)
        assert server.stopped.wait(STOP_TIMEOUT)
        assert time.monotonic() - started < 5.0


def test_request_shutdown_after_stop_is_harmless(handler):
    with running_server(handler) as server:
        server.request_shutdown()
        assert server.stopped.wait(STOP_TIMEOUT)
    # The wake pipe is closed now; its fd number may belong to someone else. Must not write there.
    r, w = socket.socketpair()
    with r, w:
        r.setblocking(False)
        for _ in range(3):
            server.request_shutdown()
        with pytest.raises(BlockingIOError):
            r.recv(1)


# -- many idle connections, few threads ---------------------------------------------------------

def test_idle_connections_hold_no_threads(handler):
    count, max_threads = 500, 16
    threads_before = threading.active_count()  # earlier tests' daemon threads may still be ending
    pool = ThreadPool(min_threads=1, max_threads=max_threads)
    with running_server(handler, pool=pool) as server:
        clients = []
        try:
            for i in range(count):
                c = LineClient(address(server))
                clients.append(c)
                assert c.exchange(b"%d" % i) == b"%d\n" % i
            wait_for(lambda: server.connection_counts()["idle"] == count, what="all parked")
            assert pool.threads <= max_threads
            # far below one per connection: the pool's threads and the server's own few
            assert threading.active_count() - threads_before <= max_threads + 5
            assert pool.counts()["busy"] == 0
            assert clients[0].exchange(b"first again") == b"first again\n"
            assert clients[-1].exchange(b"last again") == b"last again\n"
        finally:
            for c in clients:
                c.close()


def test_peer_leaving_mid_read_is_logged_at_debug_not_error(caplog):
    from core import ConnectionState

    def strict_reader(conn):  # does not catch ConnectionClosed: the server must classify it
        conn.transition(ConnectionState.READING)
        conn.read_until(b"\n", 100)

    with caplog.at_level(logging.DEBUG, logger="pyproxy.core"):
        with running_server(strict_reader) as server:
            with LineClient(address(server)) as c:
                c.sock.sendall(b"no newline, then gone")
            wait_for(lambda: server.accepted_total == 1 and server.connection_count == 0,
                     what="connection accepted, then closed")
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert any("peer closed before delimiter" in r.getMessage() for r in caplog.records)


def test_graceful_drain_serves_a_request_still_queued_for_a_worker(handler):
    pool = ThreadPool(min_threads=1, max_threads=1)
    with running_server(handler, pool=pool, graceful_timeout=STOP_TIMEOUT) as server:
        addr = address(server)
        with LineClient(addr) as slow, LineClient(addr) as queued:
            slow.send_line(b"slow")
            assert handler.slow_entered.wait(STOP_TIMEOUT)
            queued.send_line(b"waiting")
            wait_for(lambda: pool.counts()["queued"] == 1, what="the request queued")
            server.request_shutdown()
            assert server.draining.wait(STOP_TIMEOUT)
            handler.slow_release.set()
            assert slow.read_line() == b"slow\n"
            assert queued.read_line() == b"waiting\n"
            assert server.stopped.wait(STOP_TIMEOUT)


def test_a_request_parked_after_the_drain_stopped_the_workers_is_logged_as_draining(handler, caplog):
    """The race a drain can lose: a worker parks a connection whose next request came in after the
    drain's last look, and the pool is shut by then. It is closed, and the log says why (not "queue full")."""
    with running_server(handler, graceful_timeout=STOP_TIMEOUT) as server:
        server.request_shutdown()
        assert server.stopped.wait(STOP_TIMEOUT)  # the drain is over: its pool takes no more work
        with socket.create_server(("127.0.0.1", 0)) as listener, \
                socket.create_connection(listener.getsockname(), timeout=STOP_TIMEOUT) as client:
            accepted, peer = listener.accept()
            conn = Connection(accepted, peer)
            conn.transition(ConnectionState.READING)
            conn.transition(ConnectionState.IDLE)  # where a worker leaves it between two requests
            client.sendall(b"next\n")
            assert select.select([accepted], [], [], STOP_TIMEOUT)[0], "the request never arrived"
            with caplog.at_level(logging.INFO, logger="pyproxy.core.server"):
                server.park(conn)
            assert conn.state is ConnectionState.CLOSED
            assert closed_by_peer(client)
    messages = [record.getMessage() for record in caplog.records if record.name == "pyproxy.core.server"]
    assert any(message.startswith("draining: closing connection from") for message in messages), messages
    assert not any("work queue full" in message for message in messages), messages


def test_a_listener_out_of_descriptors_rests_instead_of_spinning(handler, caplog, monkeypatch):
    """accept() failing with EMFILE leaves the listener readable: retried at once, it spun the loop and
    logged hundreds of thousands of lines a second. The listener rests for ACCEPT_PAUSE (by the
    server's clock), with one log line, then accepts the clients that waited in its backlog."""
    clock = FakeClock()
    real_accept = Listener.accept
    calls = []
    out_of_files = threading.Event()
    out_of_files.set()

    def accept(listener):
        calls.append(listener)
        if out_of_files.is_set():
            raise OSError(errno.EMFILE, "Too many open files")
        return real_accept(listener)

    monkeypatch.setattr(Listener, "accept", accept)
    with caplog.at_level(logging.WARNING, logger="pyproxy.core.server"), \
            running_server(handler, clock=clock) as server:
        client = LineClient(address(server))  # waits in the backlog: the listener stays readable
        wait_for(lambda: calls, timeout=STOP_TIMEOUT)
        for _ in range(20):  # twenty turns of the loop: a spinning one would try accept() on each
            turned = threading.Event()
            server.call_soon(turned.set)
            assert turned.wait(STOP_TIMEOUT)
        assert len(calls) == 1
        out_of_files.clear()
        clock.advance(ACCEPT_PAUSE)
        server.call_soon(lambda: None)  # a turn of the loop that sees the pause over
        client.send_line(b"hello")
        assert client.read_line() == b"hello\n"
        client.close()
    resting = [record for record in caplog.records if "not accepting new connections" in record.getMessage()]
    assert len(resting) == 1, [record.getMessage() for record in caplog.records]


def test_a_held_connection_coming_back_to_a_full_queue_is_queued_not_closed(caplog):
    """Bug: a held transfer that ended while the pool's queue was full was closed ("work queue full"),
    its exchange cut half done (the client may have had part of its answer). It was admitted before,
    so it is queued past max_queue, which sheds new work only."""
    resumed, gate, occupied = threading.Event(), threading.Event(), threading.Event()

    def handler(conn):
        if conn.state is ConnectionState.HELD:  # the relay handed it back: continue the exchange
            conn.resume()
            resumed.set()
            conn.close()
            return
        conn.transition(ConnectionState.READING)
        conn.sock.recv(1)
        conn.transition(ConnectionState.PROCESSING)
        conn.hold(Readable(conn.sock, STOP_TIMEOUT * 4))  # waits, without a thread, for the next byte

    pool = ThreadPool(min_threads=1, max_threads=1, max_queue=1)
    with caplog.at_level(logging.WARNING, logger="pyproxy.core.server"), \
            running_server(handler, pool=pool) as server, \
            socket.create_connection(address(server), timeout=STOP_TIMEOUT) as client:
        client.sendall(b"x")
        wait_for(lambda: server.connection_counts()["held"] == 1, timeout=STOP_TIMEOUT)
        # The only worker busy (busy == 1 alone may still be the handler's first call finishing)...
        assert pool.submit(lambda: (occupied.set(), gate.wait(STOP_TIMEOUT * 4)))
        assert occupied.wait(STOP_TIMEOUT)
        assert pool.submit(lambda: None) and pool.queued == 1  # ...and the queue full
        client.sendall(b"y")  # the held wait is over: back to the pool
        wait_for(lambda: pool.queued == 2 or "work queue full" in caplog.text, timeout=STOP_TIMEOUT)
        gate.set()
        assert resumed.wait(STOP_TIMEOUT), caplog.text
    assert "work queue full" not in caplog.text


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:  # closed with the request unread: Linux sends a reset
        return True


def test_connection_parked_mid_request_holds_no_thread_and_expires_at_its_deadline():
    """A handler may park a half-received message with a deadline (slowloris defence): no thread
    waits for the rest; more bytes re-dispatch it; at the deadline on_expired has the last word."""
    from core import ConnectionState as S

    def handler(conn):
        conn.transition(S.READING)
        conn.set_timeouts(5.0)
        data = conn.read_some()
        if b"\n" in data:
            conn.transition(S.PROCESSING)
            conn.transition(S.WRITING)
            conn.sendall(b"got:" + data)
            conn.park_deadline = None
            conn.transition(S.IDLE)
            return
        conn.park_deadline = time.monotonic() + 0.3
        conn.transition(S.IDLE)

    def last_words(conn):
        conn.sock.setblocking(False)
        conn.sock.send(b"too slow\n")

    with running_server(handler, on_expired=last_words) as server:
        client = socket.create_connection(server.addresses[0][:2], timeout=5.0)
        client.sendall(b"partial")
        wait_for(lambda: server.connection_counts()["idle"] == 1, what="the partial message parked")
        assert server.pool.busy == 0  # parked: no thread holds it
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = client.recv(100)
            if not chunk:
                break
            reply += chunk
        assert reply == b"too slow\n"
        assert client.recv(100) == b""  # and then closed
        client.close()


def test_a_request_sent_while_the_drain_takes_its_last_look_is_served(handler):
    """The drain's last look can fall between a worker's two steps: it let go of a keep-alive
    connection (no longer in the pool's hands) but has not parked it yet, and the client's next
    request is already there. The drain took it for resting and stopped the workers, so the park
    found the pool shut and closed the connection unanswered. A worker still busy is work left."""
    with running_server(handler, graceful_timeout=STOP_TIMEOUT) as server:
        real_park, real_close_resting = server.park, server._close_resting
        at_park = threading.Event()
        looks = []

        def park(conn):
            if not at_park.is_set():
                at_park.set()
                # Hold the worker here until the drain looked again (fixed) or shut the pool (the race
                # lost): bounded either way.
                for _ in range(int(STOP_TIMEOUT / 0.01)):
                    if len(looks) >= 2 or server.pool._closed:
                        break
                    time.sleep(0.01)
            real_park(conn)

        def close_resting():
            pending = real_close_resting()
            looks.append(pending)
            if len(looks) == 1:  # the slow request is still on its worker: let it finish now
                handler.slow_release.set()
                assert at_park.wait(STOP_TIMEOUT)
                client.send_line(b"next")
                conn = next(iter(server._connections.values()))
                wait_for(lambda: conn.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT),
                         what="the next request at the proxy")
            return pending

        server.park, server._close_resting = park, close_resting
        with LineClient(address(server)) as client:
            client.send_line(b"slow")
            assert handler.slow_entered.wait(STOP_TIMEOUT)
            server.request_shutdown()
            assert client.read_line() == b"slow\n"
            assert client.read_line() == b"next\n"
            assert client.wait_closed() == b""
        assert server.stopped.wait(STOP_TIMEOUT)


@contextlib.contextmanager
def signal_state_restored(watched):
    """The process's handlers of ``watched`` and its signal wake-up descriptor, put back afterwards
    (a test that installs a server's handlers must not leave them to the next test). Yields the
    wake-up descriptor as it was."""
    before = {signum: signals.getsignal(signum) for signum in watched}
    previous = signals.set_wakeup_fd(-1)
    signals.set_wakeup_fd(previous)
    try:
        yield previous
    finally:
        signals.set_wakeup_fd(previous)
        for signum, action in before.items():
            signals.signal(signum, action)


def test_a_stopped_server_leaves_no_signal_wakeup_on_its_closed_pipe(handler):
    # The loop's self-pipe is also the signal wake-up descriptor. Closed at the end, it stayed
    # registered: a signal after that (a second SIGTERM while the services stop) made CPython write a
    # byte to whatever file had reused the number since, a log or a socket.
    watched = (signals.SIGTERM, signals.SIGINT, signals.SIGHUP)
    with signal_state_restored(watched) as previous:
        server = SocketServer(handler, listeners=[("127.0.0.1", 0)])
        server.install_signal_handlers(watched)
        wakeup_fd = server._wakeup.write_fd
        server.request_shutdown(force=True)
        server.serve_forever()  # on this (the main) thread, as a process runs it: drains and returns
        assert server.stopped.is_set()
        current = signals.set_wakeup_fd(previous)
        assert current != wakeup_fd, "the signal wake-up still points at the closed pipe"


def test_a_stopped_server_ignores_the_signals_it_handled_except_the_stops(handler):
    # Python's exit puts the default action back on every signal it handled: a SIGHUP (a reload) that
    # came after the loop ended killed the exiting process, whose status then read "killed by SIGHUP".
    watched = (signals.SIGTERM, signals.SIGINT, signals.SIGHUP, signals.SIGUSR1)
    with signal_state_restored(watched):
        server = SocketServer(handler, listeners=[("127.0.0.1", 0)])
        server.install_signal_handlers(watched)
        server.request_shutdown(force=True)
        server.serve_forever()  # on this (the main) thread, as a process runs it: drains and returns
        assert signals.getsignal(signals.SIGHUP) is signals.SIG_IGN
        assert signals.getsignal(signals.SIGUSR1) is signals.SIG_IGN
        for stop in (signals.SIGTERM, signals.SIGINT):  # a stop keeps its meaning
            assert signals.getsignal(stop) not in (signals.SIG_IGN, signals.SIG_DFL)


def test_a_reload_signalled_with_a_stop_finds_the_server_stopping(handler):
    # Python runs the handlers of signals that arrive together in signal-number order: a SIGHUP sent
    # right behind a SIGTERM was recorded, and acted on, first. The proxy reloaded on its way out
    # (opening a new config's listeners, telling its workers to reload) before it began the drain.
    watched = (signals.SIGTERM, signals.SIGHUP)
    with signal_state_restored(watched):
        server = SocketServer(handler, listeners=[("127.0.0.1", 0)])
        stopping_at_reload = []
        server.install_signal_handlers(watched)
        server.signal_handlers[signals.SIGHUP] = lambda: stopping_at_reload.append(server.stopping)
        signals.pthread_sigmask(signals.SIG_BLOCK, watched)
        try:
            os.kill(os.getpid(), signals.SIGTERM)
            os.kill(os.getpid(), signals.SIGHUP)
        finally:
            signals.pthread_sigmask(signals.SIG_UNBLOCK, watched)  # both land now, in one batch
        server.serve_forever()  # acts on the batch, drains and returns
        assert stopping_at_reload == [True]


def test_a_request_parked_after_the_workers_stopped_gets_a_clean_close(handler):
    # Closed with the request unread, the connection was reset: a reset may destroy the previous
    # answer's end still on its way to the client. What the client sent is read and dropped first.
    with running_server(handler, graceful_timeout=STOP_TIMEOUT) as server:
        server.request_shutdown()
        assert server.stopped.wait(STOP_TIMEOUT)
        with socket.create_server(("127.0.0.1", 0)) as listener, \
                socket.create_connection(listener.getsockname(), timeout=STOP_TIMEOUT) as client:
            accepted, peer = listener.accept()
            conn = Connection(accepted, peer)
            conn.transition(ConnectionState.READING)
            conn.transition(ConnectionState.IDLE)
            client.sendall(b"next\n")
            assert select.select([accepted], [], [], STOP_TIMEOUT)[0], "the request never arrived"
            server.park(conn)
            assert conn.state is ConnectionState.CLOSED
            assert client.recv(100) == b""  # FIN, not ConnectionResetError


def test_a_request_that_arrives_as_the_drain_closes_its_idle_connection_gets_a_clean_close(handler):
    # The drain looks for a request on an idle connection, finds none, and closes it; one that came in
    # between was unread, and the close a reset (which may destroy the answer before it, in flight).
    with running_server(handler, graceful_timeout=STOP_TIMEOUT) as server:
        real_request_pending = server._request_pending
        with LineClient(address(server)) as client:
            assert client.exchange(b"hello") == b"hello\n"
            wait_for(lambda: server.connection_counts()["idle"] == 1, what="the connection parked")

            late = []

            def request_pending(conn):
                pending = real_request_pending(conn)
                if not pending and not late:
                    late.append(conn)
                    client.send_line(b"just too late")  # arrives after the look, before the close
                    wait_for(lambda: conn.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT),
                             what="the late request at the server")
                return pending

            server._request_pending = request_pending
            server.request_shutdown()
            assert server.stopped.wait(STOP_TIMEOUT)
            assert late, "the drain never looked at the idle connection"
            assert client.sock.recv(100) == b""  # FIN: a reset would raise ConnectionResetError
