"""Pool growth from the accept loop: a stall of blocked workers grows the pool, a starved process does not."""

from __future__ import annotations

import threading

from core import SocketServer, ThreadPool
from core.socket_server import STARVED_AFTER
from core.thread_pool import HOT_THREADS
from tests.support.timing import FakeClock

TASK_WAIT = 5.0  # blocked tasks give up after this, so a failing test never hangs


def _stalled_pool(clock: FakeClock) -> tuple[ThreadPool, threading.Event]:
    """HOT_THREADS threads blocked on tasks, two more tasks waiting, and the clock past grow_after."""
    pool = ThreadPool(min_threads=1, max_threads=HOT_THREADS + 3, max_queue=10, grow_after=1.0, clock=clock)
    gate, started = threading.Event(), threading.Semaphore(0)

    def blocked() -> None:
        started.release()
        gate.wait(TASK_WAIT)

    for _ in range(HOT_THREADS + 2):
        assert pool.submit(blocked)
    for _ in range(HOT_THREADS):  # up to HOT_THREADS threads start at once, stalled or not
        assert started.acquire(timeout=TASK_WAIT)
    clock.advance(1.5)
    return pool, gate


def _server(pool: ThreadPool, clock: FakeClock) -> SocketServer:
    return SocketServer(lambda conn: None, listeners=(), pool=pool, clock=clock)


def test_stalled_workers_get_threads_when_the_loop_is_on_time():
    clock = FakeClock()
    pool, gate = _stalled_pool(clock)
    server = _server(pool, clock)
    try:
        server._note_starvation(late=0.0)
        pool.maybe_grow()
        assert pool.threads == HOT_THREADS + 2  # each waiting task got a thread
    finally:
        gate.set()
        pool.shutdown(timeout=TASK_WAIT)
        server._close_everything()


def test_a_late_loop_means_a_starved_process_and_no_growth():
    clock = FakeClock()
    pool, gate = _stalled_pool(clock)
    server = _server(pool, clock)
    try:
        server._note_starvation(late=STARVED_AFTER * 3)
        pool.maybe_grow()
        assert pool.threads == HOT_THREADS  # more threads would only convoy on the GIL
        clock.advance(1.5)  # still stalled, and now the loop runs on time: the stall is real
        server._note_starvation(late=0.0)
        pool.maybe_grow()
        assert pool.threads == HOT_THREADS + 2
    finally:
        gate.set()
        pool.shutdown(timeout=TASK_WAIT)
        server._close_everything()
