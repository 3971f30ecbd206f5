"""Request counters kept per thread and added up on read: exact totals, and no lock shared with readers.

``Metrics.observe`` runs after every request on the request's thread; it writes that thread's own
counters only. /metrics and /status add every thread's counters up when they are read.
"""

from __future__ import annotations

import threading

import pytest

from proxy.observe.metrics import RECENT_BUCKETS, Metrics
from tests.support.records import Record, make_app

pytestmark = pytest.mark.timeout(60)

THREADS = 6
PER_THREAD = 3000
DEADLINE = 30.0


class SteppedClock:
    """A clock a test moves by hand; one test can make it block the thread that reads it."""

    def __init__(self, now: float = 100.0):
        self.now = now
        self.block_thread = None  # a thread object: calls from it wait until `release` is set
        self.blocked = threading.Event()
        self.release = threading.Event()

    def __call__(self) -> float:
        if threading.current_thread() is self.block_thread:
            self.blocked.set()
            self.release.wait(DEADLINE)
        return self.now


def hammer(metrics: Metrics, start: threading.Event, index: int) -> None:
    start.wait(DEADLINE)
    for n in range(PER_THREAD):
        # Durations exactly representable in binary, so their sum is exact whatever the order.
        metrics.observe(Record("api", 502 if n % 3 == 0 else 200, 0.25 if n % 2 else 0.5))
        if n % 500 == 0:
            metrics.observe(Record(f"extra-{index}", 200, 0.0))  # new keys while a reader copies


def test_many_threads_and_a_concurrent_reader_lose_no_increment():
    metrics = Metrics(make_app(), clock=SteppedClock())
    start, done = threading.Event(), threading.Event()
    reads = []

    def reader():
        # The writers start after the first read, so reads overlap the writes even on a busy machine.
        while len(reads) < 100_000:
            snapshot = metrics.snapshot()
            reads.append(sum(item["value"] for item in snapshot["requests"] if item["upstream"] == "api"))
            metrics.recent()
            start.set()
            if done.is_set():
                break

    workers = [threading.Thread(target=hammer, args=(metrics, start, i)) for i in range(THREADS)]
    reading = threading.Thread(target=reader)
    for thread in [*workers, reading]:
        thread.start()
    for thread in workers:
        thread.join(DEADLINE)
        assert not thread.is_alive()
    done.set()
    reading.join(DEADLINE)
    assert not reading.is_alive() and reads, "the reader never ran"
    assert reads == sorted(reads), "a read saw fewer requests than an earlier one"

    total = THREADS * PER_THREAD
    errors = THREADS * len(range(0, PER_THREAD, 3))
    snapshot = metrics.snapshot()
    requests = {(r["upstream"], r["code"]): r["value"] for r in snapshot["requests"]}
    assert requests[("api", "502")] == errors and requests[("api", "200")] == total - errors
    assert all(requests[(f"extra-{i}", "200")] == PER_THREAD // 500 for i in range(THREADS))
    histogram = snapshot["durations"]["api"]
    halves = THREADS * (PER_THREAD // 2)
    assert histogram["count"] == total == sum(histogram["counts"])
    assert histogram["sum"] == halves * 0.25 + (total - halves) * 0.5
    bucket = {bound: count for bound, count in zip(snapshot["buckets"], histogram["counts"])}
    assert bucket[0.25] == halves and bucket[0.5] == total - halves
    traffic = metrics.recent()["upstreams"]["api"]
    assert (traffic["requests_total"], traffic["errors_total"]) == (total, errors)
    assert (traffic["requests"], traffic["errors"]) == (total, errors)  # all in the clock's one second
    assert traffic["latency_counts"][RECENT_BUCKETS.index(0.25)] == halves


def test_a_slow_reader_never_holds_up_a_request():
    """observe() shares no lock with readers: a /status read stuck half way (here in the clock it reads)
    must not make a request thread wait for it."""
    clock = SteppedClock()
    metrics = Metrics(make_app(), clock=clock)
    metrics.observe(Record("api", 200, 0.01))  # this thread's counters exist: the reader has work
    reader = threading.Thread(target=metrics.recent)
    clock.block_thread = reader
    reader.start()
    try:
        assert clock.blocked.wait(DEADLINE), "the reader never reached the clock"
        observed = threading.Event()

        def request_thread():
            metrics.observe(Record("api", 200, 0.01))
            observed.set()

        worker = threading.Thread(target=request_thread)
        worker.start()
        # Bounded: with a lock shared with the reader this waits the full time and fails.
        assert observed.wait(5.0), "observe() waited for a reader"
        worker.join(DEADLINE)
    finally:
        clock.release.set()
        reader.join(DEADLINE)
    requests = {(r["upstream"], r["code"]): r["value"] for r in metrics.snapshot()["requests"]}
    assert requests[("api", "200")] == 2


def test_counts_of_threads_that_ended_are_kept_and_their_slots_freed():
    """Pool threads come and go (idle ones exit): their counts stay, and the per-thread list does not
    grow with every thread that ever served a request."""
    metrics = Metrics(make_app(), clock=SteppedClock())
    for round_number in range(5):
        thread = threading.Thread(target=lambda: [metrics.observe(Record("api", 200, 0.01)) for _ in range(7)])
        thread.start()
        thread.join(DEADLINE)
        assert not thread.is_alive()
    metrics.observe(Record("api", 200, 0.01))  # a new thread (this one) registers: ended ones are folded
    assert len(metrics._threads) == 1
    requests = {(r["upstream"], r["code"]): r["value"] for r in metrics.snapshot()["requests"]}
    assert requests[("api", "200")] == 5 * 7 + 1
    assert metrics.snapshot()["durations"]["api"]["count"] == 36
    assert metrics.recent()["upstreams"]["api"]["requests"] == 36  # the ended threads' recent seconds too


def test_recent_window_of_an_ended_thread_still_expires():
    clock = SteppedClock(1000.0)
    metrics = Metrics(make_app(), clock=clock)
    clock.now += 20
    thread = threading.Thread(target=lambda: metrics.observe(Record("api", 500, 0.01)))
    thread.start()
    thread.join(DEADLINE)
    clock.now += 1
    assert not thread.is_alive()
    metrics.observe(Record("api", 200, 0.01))  # folds the ended thread's ring into the kept one
    api = metrics.recent()["upstreams"]["api"]
    assert (api["requests"], api["errors"]) == (2, 1)
    clock.now += 9.5  # the first second has left the window, the second is still in it
    api = metrics.recent()["upstreams"]["api"]
    assert (api["requests"], api["errors"], api["requests_total"]) == (1, 0, 2)
