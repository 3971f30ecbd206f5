"""ServerPool checkout: when the one-syscall peek runs, and when a hot connection skips it."""

from __future__ import annotations

import socket

import pytest

from proxy.upstream_pool import RECENT_REUSE_S, ServerPool


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def listener():
    sock = socket.create_server(("127.0.0.1", 0))
    yield sock
    sock.close()


def _pool_with_one_idle(listener, clock, self_delimited=True):
    """A pool holding one released connection whose server side has been closed (EOF waiting)."""
    pool = ServerPool("127.0.0.1", listener.getsockname()[1], clock=clock)
    conn = pool.connect()
    server_side, _ = listener.accept()
    conn.self_delimited = self_delimited
    pool.release(conn, reusable=True)
    server_side.close()
    # Wait (bounded) until the FIN has arrived, so the peek would see it.
    conn.sock.settimeout(2.0)
    assert conn.sock.recv(1, socket.MSG_PEEK) == b""
    conn.sock.settimeout(None)
    return pool, conn


def test_closed_idle_connection_is_found_by_the_peek(listener):
    clock = FakeClock()
    pool, dead = _pool_with_one_idle(listener, clock)
    fresh = pool.checkout(retry_safe=False)  # a request with a body: always peeks
    assert fresh is not dead and pool.connects_total == 2
    fresh.close()


def test_hot_connection_skips_the_peek_for_a_retry_safe_request(listener):
    clock = FakeClock()
    pool, dead = _pool_with_one_idle(listener, clock)
    clock.now += RECENT_REUSE_S / 2
    assert pool.checkout(retry_safe=True) is dead  # no peek: the handler's stale retry covers it
    assert pool.connects_total == 1
    dead.close()


def test_connection_idle_past_the_window_is_peeked_again(listener):
    clock = FakeClock()
    pool, dead = _pool_with_one_idle(listener, clock)
    clock.now += RECENT_REUSE_S * 2
    fresh = pool.checkout(retry_safe=True)
    assert fresh is not dead and pool.connects_total == 2
    fresh.close()


def test_response_without_self_delimited_body_is_always_peeked(listener):
    # After HEAD/204/304 a misbehaving server's body may arrive late: the peek must look for it.
    clock = FakeClock()
    pool, dead = _pool_with_one_idle(listener, clock, self_delimited=False)
    fresh = pool.checkout(retry_safe=True)
    assert fresh is not dead and pool.connects_total == 2
    fresh.close()
