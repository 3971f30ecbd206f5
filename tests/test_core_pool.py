"""ThreadPool: grows under load, shrinks when idle (injected clock), bounded queue, exception
isolation, shutdown that drains or gives up at its timeout."""

from __future__ import annotations

import logging
import threading

import pytest

from core import ThreadPool
from core.thread_pool import HOT_THREADS, PoolClosed
from tests.support.timing import FakeClock, wait_for

TASK_WAIT = 5.0  # a blocked task gives up after this, so a failing test never hangs


@pytest.fixture
def pools():
    """Pools made by a test; shut down (releasing any blocked tasks first) afterwards."""
    made: list[ThreadPool] = []
    gate = threading.Event()

    def make(**kwargs) -> ThreadPool:
        pool = ThreadPool(**kwargs)
        made.append(pool)
        return pool

    make.gate = gate
    yield make
    gate.set()
    for pool in made:
        pool.shutdown(timeout=TASK_WAIT)


def blocked_task(gate: threading.Event, started: threading.Semaphore):
    started.release()
    gate.wait(TASK_WAIT)


def test_pool_starts_with_min_threads(pools):
    pool = pools(min_threads=3, max_threads=8)
    assert pool.counts() == {"threads": 3, "busy": 0, "queued": 0}


def test_pool_rejects_bad_bounds():
    with pytest.raises(ValueError):
        ThreadPool(min_threads=5, max_threads=2)
    with pytest.raises(ValueError):
        ThreadPool(min_threads=0, max_threads=0)


def test_pool_grows_up_to_max_threads_when_work_waits(pools):
    pool = pools(min_threads=1, max_threads=4, max_queue=100, grow_after=0.0)
    started = threading.Semaphore(0)
    for _ in range(6):
        assert pool.submit(blocked_task, pools.gate, started)
    for _ in range(4):  # four threads, each on a task
        assert started.acquire(timeout=TASK_WAIT)
    assert pool.counts() == {"threads": 4, "busy": 4, "queued": 2}
    assert not started.acquire(timeout=0.05)  # the two others wait: the pool stops at max_threads
    pools.gate.set()
    for _ in range(2):
        assert started.acquire(timeout=TASK_WAIT)
    wait_for(lambda: pool.counts()["busy"] == 0, what="all tasks finished")
    assert pool.counts() == {"threads": 4, "busy": 0, "queued": 0}


def test_pool_does_not_grow_while_an_idle_thread_can_take_the_work(pools):
    # HOT_THREADS of them: below that a task that finds every thread just finishing gets a new one.
    pool = pools(min_threads=HOT_THREADS, max_threads=HOT_THREADS + 4)
    done = threading.Semaphore(0)
    for _ in range(20):
        pool.submit(done.release)
        assert done.acquire(timeout=TASK_WAIT)  # one at a time: an idle thread is always there
    assert pool.threads == HOT_THREADS


def test_pool_shrinks_to_min_threads_after_idle_timeout(pools):
    clock = FakeClock()
    pool = pools(min_threads=1, max_threads=4, idle_timeout=30.0, clock=clock, grow_after=0.0)
    started = threading.Semaphore(0)
    gate = threading.Event()
    for _ in range(4):
        pool.submit(blocked_task, gate, started)
    for _ in range(4):
        assert started.acquire(timeout=TASK_WAIT)
    gate.set()
    wait_for(lambda: pool.counts()["busy"] == 0, what="tasks finished")

    clock.advance(29.0)  # not yet idle long enough: nobody retires
    pool.wake_idle()
    wait_for(lambda: len(pool._idle) == 4, what="nudged threads back on the idle stack")
    assert pool.threads == 4

    clock.advance(2.0)
    pool.wake_idle()
    wait_for(lambda: pool.threads == 1, what="pool shrank to min_threads")
    live = [t for t in threading.enumerate() if t.name.startswith("worker-")]
    assert pool.counts() == {"threads": 1, "busy": 0, "queued": 0}
    assert len(live) >= 1

    # The survivor still serves, and the pool can grow again.
    done = threading.Semaphore(0)
    assert pool.submit(done.release)
    assert done.acquire(timeout=TASK_WAIT)


def test_retiring_thread_never_strands_queued_work(pools):
    """min_threads=0: the last idle thread must not retire while a task waits in the queue."""
    clock = FakeClock()
    pool = pools(min_threads=0, max_threads=1, idle_timeout=1.0, clock=clock)
    done = threading.Semaphore(0)
    assert pool.submit(done.release)
    assert done.acquire(timeout=TASK_WAIT)
    assert pool.threads == 1
    clock.advance(5.0)
    # The wake-up sits ahead of the task in the queue: the thread takes it first, finds itself idle
    # past the timeout, and must still see the queued task.
    with clock.frozen():  # the thread cannot check its idle time until the task is queued
        pool.wake_idle()
        assert pool.submit(done.release)
    assert done.acquire(timeout=TASK_WAIT), "queued task stranded by a retiring thread"


def test_submit_returns_false_when_queue_is_full(pools):
    pool = pools(min_threads=1, max_threads=1, max_queue=3)
    started = threading.Semaphore(0)
    assert pool.submit(blocked_task, pools.gate, started)
    assert started.acquire(timeout=TASK_WAIT)  # the only thread is busy
    results = [pool.submit(blocked_task, pools.gate, started) for _ in range(5)]
    assert results == [True, True, True, False, False]
    assert pool.counts() == {"threads": 1, "busy": 1, "queued": 3}


def test_submit_all_hands_a_batch_over_as_submit_would_one_by_one(pools):
    """The accept loop hands over every ready connection of a wake-up in one call: idle threads take
    tasks up to HOT_THREADS busy, the rest queue for them, and what the queue cannot hold comes back."""
    pool = pools(min_threads=4, max_threads=4, max_queue=3)
    wait_for(lambda: len(pool._idle) == 4, what="all threads idle")
    started = threading.Semaphore(0)
    tasks = [(blocked_task, (pools.gate, started)) for _ in range(HOT_THREADS + 5)]
    refused = pool.submit_all(tasks)
    assert refused == tasks[HOT_THREADS + 3:] and len(refused) == 2  # exactly the ones past the queue, in order
    for _ in range(HOT_THREADS):
        assert started.acquire(timeout=TASK_WAIT)
    assert pool.counts() == {"threads": 4, "busy": HOT_THREADS, "queued": 3}
    pools.gate.set()
    for _ in range(3):  # the queued ones run once the busy threads are free
        assert started.acquire(timeout=TASK_WAIT)
    wait_for(lambda: pool.counts()["busy"] == 0, what="the batch finished")


def test_submit_all_after_shutdown_raises(pools):
    pool = pools(min_threads=1, max_threads=1)
    pool.shutdown(timeout=TASK_WAIT)
    with pytest.raises(PoolClosed):
        pool.submit_all([(print, ())])


def test_raising_task_is_logged_and_thread_keeps_serving(pools, caplog):
    pool = pools(min_threads=1, max_threads=1)
    done = threading.Semaphore(0)

    def explode():
        raise RuntimeError("task failure for the test")

    with caplog.at_level(logging.ERROR, logger="pyproxy.core.pool"):
        for _ in range(3):
            assert pool.submit(explode)
            assert pool.submit(done.release)
            assert done.acquire(timeout=TASK_WAIT)
    failures = [r for r in caplog.records if r.exc_info and "task failure for the test" in str(r.exc_info[1])]
    assert len(failures) == 3
    assert pool.counts() == {"threads": 1, "busy": 0, "queued": 0}


def test_shutdown_drains_queued_work():
    pool = ThreadPool(min_threads=1, max_threads=2, max_queue=100, grow_after=0.0)
    gate = threading.Event()
    started = threading.Semaphore(0)
    ran = []
    lock = threading.Lock()

    def record(i):
        with lock:
            ran.append(i)

    for _ in range(2):
        pool.submit(blocked_task, gate, started)
    for _ in range(2):
        assert started.acquire(timeout=TASK_WAIT)
    for i in range(50):
        assert pool.submit(record, i)
    threading.Timer(0.05, gate.set).start()  # release the blockers while shutdown waits
    assert pool.shutdown(timeout=TASK_WAIT) is True
    assert sorted(ran) == list(range(50))
    assert pool.threads == 0
    with pytest.raises(PoolClosed):
        pool.submit(record, 99)


def test_shutdown_returns_false_when_a_task_is_stuck():
    pool = ThreadPool(min_threads=1, max_threads=1)
    gate = threading.Event()
    started = threading.Semaphore(0)
    pool.submit(blocked_task, gate, started)
    assert started.acquire(timeout=TASK_WAIT)
    try:
        assert pool.shutdown(timeout=0.2) is False
    finally:
        gate.set()
    wait_for(lambda: pool.threads == 0, what="the stuck thread exits once released")


def test_pool_grows_only_when_queued_work_is_stalled(pools):
    """With fast work the pool stays at HOT_THREADS (GIL); beyond that it adds a thread only when
    nobody took work for a while."""
    clock = FakeClock()
    pool = pools(min_threads=1, max_threads=HOT_THREADS + 3, max_queue=100, grow_after=1.0, clock=clock)
    started = threading.Semaphore(0)
    for _ in range(HOT_THREADS + 2):
        assert pool.submit(blocked_task, pools.gate, started)
    for _ in range(HOT_THREADS):  # below HOT_THREADS, waiting work gets a thread at once
        assert started.acquire(timeout=TASK_WAIT)
    pool.maybe_grow()
    assert pool.threads == HOT_THREADS  # work waits, but the clock says the pool took work just now
    clock.advance(1.5)
    pool.maybe_grow()
    assert pool.threads == HOT_THREADS + 2  # stalled for longer than grow_after: each waiting task gets a thread
    for _ in range(2):
        assert started.acquire(timeout=TASK_WAIT)


def test_new_work_goes_to_the_most_recently_idle_thread(pools):
    """LIFO hand-off: sequential work keeps landing on one hot thread while the others sleep."""
    pool = pools(min_threads=4, max_threads=4)
    names = []
    done = threading.Semaphore(0)

    def record():
        names.append(threading.current_thread().name)
        done.release()

    wait_for(lambda: len(pool._idle) == 4, what="all threads idle")
    for _ in range(50):
        assert pool.submit(record)
        assert done.acquire(timeout=TASK_WAIT)
        wait_for(lambda: len(pool._idle) == 4, what="the thread went back to the idle stack")
    assert len(set(names)) == 1
