"""ServerPool checkout: every reused connection is peeked first (an EOF or stray bytes discard it).

The peek is one syscall per request, and skipping it for hot connections was measured and reverted:
unsolicited bytes that arrive on an idle connection would become the next request's response
(tests/faults: test_bytes_on_an_idle_pooled_connection_discard_it).
"""

from __future__ import annotations

import socket
import threading

import pytest
import requests

from proxy.upstream.pool import ServerPool
from tests.support.proxy import CLIENT_TIMEOUT
from tests.support.timing import FakeClock, wait_for

PEEK_WAIT = 2.0  # seconds to wait (bounded) for the server side's bytes or FIN to arrive
SWEEP_WAIT = 15.0  # a bound on waiting for the once-a-second sweep, never an expectation


@pytest.fixture
def listener():
    sock = socket.create_server(("127.0.0.1", 0))
    yield sock
    sock.close()


def _pool_with_one_idle(listener):
    """A pool holding one just-released connection, and the server side of it."""
    pool = ServerPool("127.0.0.1", listener.getsockname()[1])
    conn = pool.connect()
    server_side, _ = listener.accept()
    pool.release(conn, reusable=True)
    return pool, conn, server_side


def _wait_readable(conn) -> None:
    conn.sock.settimeout(PEEK_WAIT)
    assert conn.sock.recv(1, socket.MSG_PEEK) is not None
    conn.sock.settimeout(None)


def test_clean_idle_connection_is_reused_at_once(listener):
    pool, idle, server_side = _pool_with_one_idle(listener)
    assert pool.checkout() is idle and pool.connects_total == 1
    idle.close()
    server_side.close()


def test_connection_the_server_closed_is_replaced(listener):
    pool, dead, server_side = _pool_with_one_idle(listener)
    server_side.close()
    _wait_readable(dead)  # the FIN is here: the peek must see it, however recently it was used
    fresh = pool.checkout()
    assert fresh is not dead and pool.connects_total == 2
    fresh.close()


def test_connection_with_unsolicited_bytes_is_replaced(listener):
    pool, dirty, server_side = _pool_with_one_idle(listener)
    server_side.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil")
    _wait_readable(dirty)
    fresh = pool.checkout()
    assert fresh is not dirty and pool.connects_total == 2
    fresh.close()
    server_side.close()


def test_a_connection_checked_before_is_checked_again_at_each_reuse(listener):
    """The check's poll object stays with the connection: it must still see a FIN that arrives after
    an earlier reuse found the connection clean."""
    pool, conn, server_side = _pool_with_one_idle(listener)
    assert pool.checkout() is conn  # checked clean once: its poll object now exists
    pool.release(conn, reusable=True)
    server_side.close()
    _wait_readable(conn)
    fresh = pool.checkout()
    assert fresh is not conn and pool.connects_total == 2
    fresh.close()


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


# -- idle connections are swept without waiting for traffic --------------------------------------------
def test_sweep_closes_idle_connections_past_keepalive_timeout_and_keeps_younger_ones(listener):
    clock = FakeClock()
    pool = ServerPool("127.0.0.1", listener.getsockname()[1], keepalive_timeout=30.0, clock=clock)
    old = pool.connect()
    old_server_side, _ = listener.accept()
    pool.release(old, reusable=True)
    clock.advance(20.0)
    young = pool.connect()
    young_server_side, _ = listener.accept()
    pool.release(young, reusable=True)
    clock.advance(10.0)  # old: idle 30 s, young: 10 s
    try:
        assert pool.close_idle_expired() == 1
        assert pool.idle_count == 1 and pool.checkout() is young
        old_server_side.settimeout(PEEK_WAIT)
        assert old_server_side.recv(1) == b""  # the server sees the proxy close it
    finally:
        young.close()
        old_server_side.close()
        young_server_side.close()


def test_sweep_closes_idle_connections_the_server_closed(listener):
    pool, dead, server_side = _pool_with_one_idle(listener)
    server_side.close()
    _wait_readable(dead)
    assert pool.close_idle_expired() == 1 and pool.idle_count == 0
    assert dead.sock.fileno() == -1  # closed on the proxy's side too: no socket left in CLOSE_WAIT


def test_sweep_runs_while_a_checkout_polls_the_same_connection(listener):
    """A checkout polls a connection's own poll object; the sweep must not use it at the same moment
    (one poll object refuses a second caller: the worker's request failed with a RuntimeError)."""
    pool, conn, server_side = _pool_with_one_idle(listener)
    in_poll = threading.Thread(target=conn.poller.poll, args=(CLIENT_TIMEOUT * 1000,), daemon=True)
    in_poll.start()

    def poller_busy() -> bool:
        try:
            conn.poller.poll(0)
        except RuntimeError:  # the other thread is inside poll(): the race is set up
            return True
        return False

    try:
        wait_for(poller_busy, timeout=CLIENT_TIMEOUT)
        assert pool.close_idle_expired() == 0 and pool.idle_count == 1
    finally:
        server_side.sendall(b"x")  # ends the other thread's poll
        in_poll.join(CLIENT_TIMEOUT)
        conn.close()
        server_side.close()
    assert not in_poll.is_alive()


class _SweepPauses:
    """A pool's lock that holds the sweeping thread twice: once it has copied the idle list (before it
    polls it), and before it takes out what it found unusable. Other threads use the lock as usual."""

    def __init__(self, lock, sweeper_name: str):
        self.lock, self.sweeper_name = lock, sweeper_name
        self.uses = 0
        self.paused = [threading.Event(), threading.Event()]
        self.go_on = [threading.Event(), threading.Event()]

    def _pause(self, index: int) -> None:
        self.paused[index].set()
        self.go_on[index].wait(CLIENT_TIMEOUT)

    def __enter__(self):
        sweeping = threading.current_thread().name == self.sweeper_name
        if sweeping and self.uses == 1:
            self._pause(1)
        self.lock.acquire()

    def __exit__(self, *exc):
        self.lock.release()
        if threading.current_thread().name == self.sweeper_name:
            self.uses += 1
            if self.uses == 1:
                self._pause(0)


def test_a_sweep_never_closes_a_connection_used_and_released_while_it_looked(listener):
    """The sweep copies the idle list, polls it, then takes out what it found unusable. A connection
    a request took meanwhile is readable while its response arrives: when the request released it
    (read to the end, clean) before the sweep took its findings out, the sweep closed a good
    connection just put back in the pool."""
    pool, conn, server_side = _pool_with_one_idle(listener)
    pool._lock = pauses = _SweepPauses(pool._lock, "test-sweeper")
    sweep = threading.Thread(target=pool.close_idle_expired, name="test-sweeper")
    try:
        sweep.start()
        assert pauses.paused[0].wait(CLIENT_TIMEOUT), "the sweep never copied the idle list"
        assert pool.checkout() is conn
        server_side.sendall(b"x")  # the response arrives: readable while the request reads it
        _wait_readable(conn)
        pauses.go_on[0].set()
        assert pauses.paused[1].wait(CLIENT_TIMEOUT), "the sweep never got to take its findings out"
        assert conn.sock.recv(1) == b"x"
        pool.release(conn, reusable=True)
    finally:
        for event in pauses.go_on:
            event.set()
        sweep.join(CLIENT_TIMEOUT)
    try:
        assert not sweep.is_alive()
        assert pool.idle_count == 1 and conn.sock.fileno() >= 0
        assert pool.checkout() is conn
    finally:
        conn.close()
        server_side.close()


def _get_once(proxy) -> None:
    """One GET through the proxy, returned once the exchange is over (its upstream connection released:
    observers run after that)."""
    observed = threading.Event()
    proxy.app.observers.append(lambda record: observed.set())
    assert requests.get(proxy.url + "/", timeout=CLIENT_TIMEOUT).status_code == 200
    assert observed.wait(CLIENT_TIMEOUT)


def test_the_proxy_closes_an_idle_connection_past_keepalive_timeout_without_more_traffic(make_backend, make_proxy):
    """Bug: expired idle connections were closed only by the next checkout of the same server, so a
    server that got no more requests had them held open for ever, whatever keepalive_timeout said."""
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]}, upstream_options={"keepalive_timeout": "1s"})
    _get_once(proxy)
    pool = proxy.pool("web")
    assert pool.connects_total == 1
    # The backend's own idle timeout is 10 s; the pool's count shows the proxy's side whatever it does.
    wait_for(lambda: pool.idle_count == 0 and backend.closed_connections == 1, timeout=SWEEP_WAIT,
             what="the idle connection closed by the proxy")


def test_the_proxy_closes_an_idle_connection_the_server_closed_without_more_traffic(make_backend, make_proxy):
    """A backend that closes idle connections (keepalive_timeout left at 30 s) leaves no socket in
    CLOSE_WAIT in the proxy's pool."""
    backend = make_backend(close_after_response=True)  # closes without saying so: the proxy pools it
    proxy = make_proxy({"web": [backend.address]})
    _get_once(proxy)
    pool = proxy.pool("web")
    wait_for(lambda: backend.closed_connections == 1, timeout=SWEEP_WAIT, what="the backend closing")
    wait_for(lambda: pool.idle_count == 0, timeout=SWEEP_WAIT, what="the dead idle connection closed")
