"""A bounded pool of worker threads that grows when work waits and shrinks when quiet.

Under the GIL fewer busy threads are faster (less lock convoying), so the pool starts small and adds a
thread only when a task is queued and no thread is idle to take it. Threads idle for longer than
``idle_timeout`` retire, down to ``min_threads``. A task that raises is logged with its traceback and
never kills its thread (CPython ``concurrent.futures.thread._WorkItem.run``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

log = logging.getLogger("pyproxy.core.pool")

_STOP = object()  # sentinel: the thread that takes it exits
_WAKE = object()  # sentinel: an idle thread re-checks whether it should retire
IDLE_POLL = 5.0  # seconds an idle thread sleeps between retirement checks
# Under the GIL, extra threads only pay off when the busy ones are blocked (slow upstreams, big
# bodies); with fast work they just convoy on the GIL (measured: 2 threads ~10k req/s, 16 ~6k).
# So a thread is added only when work waits AND no thread has taken any work for this long.
GROW_AFTER = 0.05


class PoolClosed(RuntimeError):
    """submit() after shutdown() began."""


class ThreadPool:
    def __init__(self, min_threads: int = 4, max_threads: int = 256, max_queue: int = 1024,
                 idle_timeout: float = 30.0, name: str = "worker", clock=time.monotonic,
                 grow_after: float = GROW_AFTER):
        if not 0 <= min_threads <= max_threads or max_threads < 1:
            raise ValueError("need 0 <= min_threads <= max_threads and max_threads >= 1")
        self.min_threads = min_threads
        self.max_threads = max_threads
        self.max_queue = max_queue
        self.idle_timeout = idle_timeout
        self.name = name
        self._clock = clock
        self.grow_after = grow_after
        self._last_take = clock()  # when a thread last took a task (the pool is making progress)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()  # C-implemented: the cheapest handoff
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._busy = 0
        self._queued = 0
        self._closed = False
        self._serial = 0
        for _ in range(min_threads):
            self._spawn()

    # -- live counts (for metrics) ----------------------------------------------------------
    @property
    def threads(self) -> int:
        return len(self._threads)

    @property
    def busy(self) -> int:
        return self._busy

    @property
    def queued(self) -> int:
        return self._queued

    def counts(self) -> dict:
        with self._lock:
            return {"threads": len(self._threads), "busy": self._busy, "queued": self._queued}

    # -- work --------------------------------------------------------------------------------
    def submit(self, fn: Callable, *args) -> bool:
        """Queue ``fn(*args)``. False if the queue is full (the caller sheds the load)."""
        with self._lock:
            if self._closed:
                raise PoolClosed("pool is shutting down")
            if self._queued >= self.max_queue:
                return False
            self._queued += 1
            if self._should_grow():
                self._spawn()
        self._queue.put((fn, args))
        return True

    def maybe_grow(self) -> None:
        """Add a thread if queued work is stalled (the accept loop calls this while work waits)."""
        with self._lock:
            if self._should_grow() and not self._closed:
                # Every thread is stuck: give each waiting task its own thread at once.
                wanted = self._queued - (len(self._threads) - self._busy)
                for _ in range(min(wanted, self.max_threads - len(self._threads))):
                    self._spawn()

    def note_progress(self) -> None:
        """The caller saw the process (not the pool) stalled: restart the stall clock."""
        with self._lock:
            self._last_take = self._clock()

    def _should_grow(self) -> bool:
        # Called with the lock held.
        threads = len(self._threads)
        if threads >= self.max_threads or self._queued <= threads - self._busy:
            return False
        return threads == 0 or self._clock() - self._last_take >= self.grow_after

    def _spawn(self) -> None:
        # Called with the lock held.
        self._serial += 1
        thread = threading.Thread(target=self._work, name=f"{self.name}-{self._serial}", daemon=True)
        self._threads.add(thread)
        thread.start()

    def _work(self) -> None:
        me = threading.current_thread()
        idle_since = self._clock()
        while True:
            try:
                item = self._queue.get(timeout=min(self.idle_timeout, IDLE_POLL))
            except queue.Empty:
                item = _WAKE
            if item is _STOP:
                break
            if item is _WAKE:
                if self._retire_if_idle(me, idle_since):
                    return
                continue
            with self._lock:
                self._queued -= 1
                self._busy += 1
                self._last_take = self._clock()
            self._run(*item)
            with self._lock:
                self._busy -= 1
            idle_since = self._clock()
        with self._lock:
            self._threads.discard(me)

    def _retire_if_idle(self, me: threading.Thread, idle_since: float) -> bool:
        if self._clock() - idle_since < self.idle_timeout:
            return False
        with self._lock:
            # Never retire while work waits: submit() counted this thread as idle when it chose not
            # to grow, so leaving now could strand the queued task with no thread to run it.
            if len(self._threads) <= self.min_threads or self._closed or self._queued:
                return False
            self._threads.discard(me)
            return True

    @staticmethod
    def _run(fn: Callable, args: tuple) -> None:
        try:
            fn(*args)
        except Exception:  # one bad task must not kill the worker (STYLE pattern 11)
            log.exception("task %r raised", fn)

    def wake_idle(self) -> None:
        """Ask idle threads to re-check retirement now (used with an injected clock in tests)."""
        for _ in range(len(self._threads)):
            self._queue.put(_WAKE)

    # -- shutdown ----------------------------------------------------------------------------
    def shutdown(self, timeout: float | None = None) -> bool:
        """Finish queued work, then stop every thread. True if all threads exited in time.

        Threads still running a task at the deadline are abandoned (they are daemon threads);
        the caller is expected to have unblocked them first (e.g. by aborting their sockets).
        """
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for _ in threads:
            self._queue.put(_STOP)
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in threads:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            thread.join(remaining)
        return not any(thread.is_alive() for thread in threads)
