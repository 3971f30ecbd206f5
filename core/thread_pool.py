"""A bounded pool of worker threads that grows when work waits and shrinks when quiet.

Under the GIL fewer busy threads are faster (less lock convoying), so the pool adds a thread only when a
task is queued and no thread is idle to take it, and hands new work to the most recently idle thread
(a stack, not a queue): under moderate load the same few threads stay hot while the rest sleep,
instead of every thread taking turns and paying a context switch and a GIL hand-off each time. Threads idle for longer than
``idle_timeout`` retire, down to ``min_threads``. A task that raises is logged with its traceback and
never kills its thread (CPython ``concurrent.futures.thread._WorkItem.run``).
"""

from __future__ import annotations

import logging
from collections import deque
import threading
import time
from typing import Callable

log = logging.getLogger("pyproxy.core.pool")

IDLE_POLL = 5.0  # seconds an idle thread sleeps between retirement checks
# Under the GIL, extra threads only pay off when the busy ones are blocked (slow upstreams, big
# bodies); with fast work they just convoy on the GIL (measured: 2 threads ~10k req/s, 16 ~6k).
# So a thread is added only when work waits AND no thread has taken any work for this long.
GROW_AFTER = 0.05
# The same reasoning for threads that already exist but sleep: up to HOT_THREADS take new work at
# once; beyond that, new work waits for a busy thread unless no thread has taken work for WAKE_AFTER,
# which means the busy ones are blocked. Several hot threads, not one: a proxy thread spends much of
# each request blocked on its upstream's reply, and the others run Python meanwhile. How many is
# measured, not derived (docs/performance.md, "What moved the numbers"): four, as many as min_threads'
# default, since requests got cheap enough that the GIL convoy costs less than the idle waits.
HOT_THREADS = 4
WAKE_AFTER = 0.005


class PoolClosed(RuntimeError):
    """submit() after shutdown() began."""


class _Worker:
    """One thread and its private wake-up: a lock held while it sleeps, released to hand it work."""

    __slots__ = ("thread", "wake", "item", "idle_since")

    def __init__(self, now: float):
        self.thread: threading.Thread | None = None
        self.wake = threading.Lock()
        self.wake.acquire()
        self.item: tuple | None = None  # the task handed over with the wake-up
        self.idle_since = now  # when it last ran out of work (it retires idle_timeout after)


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
        self.wake_after = min(WAKE_AFTER, grow_after)
        self._last_take = clock()  # when a thread last took a task (the pool is making progress)
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # signalled when the last queued task is taken
        self._pending: deque[tuple] = deque()  # tasks no idle thread was there to take
        self._idle: list[_Worker] = []  # a stack: the last one is the most recently idle
        self._workers: set[_Worker] = set()
        self._busy = 0
        self._closed = False
        self._serial = 0
        with self._lock:
            for _ in range(min_threads):
                self._spawn()

    # -- live counts (for metrics) ----------------------------------------------------------
    @property
    def threads(self) -> int:
        return len(self._workers)

    @property
    def busy(self) -> int:
        return self._busy

    @property
    def queued(self) -> int:
        return len(self._pending)

    def counts(self) -> dict:
        with self._lock:
            return {"threads": len(self._workers), "busy": self._busy, "queued": len(self._pending)}

    # -- work --------------------------------------------------------------------------------
    def submit(self, fn: Callable, *args) -> bool:
        """Run ``fn(*args)`` on a worker. False if the queue is full (the caller sheds the load)."""
        return self._submit((fn, args), self.max_queue)

    def resubmit(self, fn: Callable, *args) -> None:
        """Run ``fn(*args)``, work admitted before (a held transfer coming back to finish its
        exchange): queued even past ``max_queue``, which sheds new work only. Refusing it would cut
        an exchange half done. It adds at most one task per held connection."""
        self._submit((fn, args), None)

    def _submit(self, task: tuple, max_queue: int | None) -> bool:
        # What submit_all([task]) does, without its list work: a third of its time (HTTP/2 submits a
        # task per stream).
        with self._lock:
            if self._closed:
                raise PoolClosed("pool is shutting down")
            if self._idle and (self._busy < HOT_THREADS or self._stalled(self.wake_after)):
                worker = self._hand_to_idle(task)
            else:
                # A busy thread takes it next, unless it turns out to be stuck (maybe_grow).
                if max_queue is not None and len(self._pending) >= max_queue:
                    return False
                self._pending.append(task)
                if self._should_grow():
                    self._spawn()
                return True
        worker.wake.release()
        return True

    def submit_all(self, tasks: list[tuple[Callable, tuple]]) -> list[tuple[Callable, tuple]]:
        """Run each ``(fn, args)`` task on a worker, as ``submit`` would one by one, under one lock
        round (the accept loop hands over every connection one epoll wake-up found ready). Returns
        the tasks the full queue refused (the caller sheds them)."""
        with self._lock:
            if self._closed:
                raise PoolClosed("pool is shutting down")
            woken = self._wake_for(tasks)
            refused = self._queue(tasks[len(woken):]) if len(woken) < len(tasks) else ()
        for worker in woken:
            worker.wake.release()
        return refused

    def _wake_for(self, tasks: list[tuple]) -> list[_Worker]:
        # Called with the lock held: idle threads take tasks while fewer than HOT_THREADS are busy,
        # or when the busy ones are stuck.
        woken = []
        for task in tasks:
            if not self._idle or (self._busy >= HOT_THREADS and not self._stalled(self.wake_after)):
                break
            woken.append(self._hand_to_idle(task))
        return woken

    def _queue(self, tasks: list[tuple]) -> list[tuple]:
        # Called with the lock held: a busy thread takes these next, unless it turns out to be stuck
        # (maybe_grow). Returns what did not fit in max_queue.
        room = max(0, self.max_queue - len(self._pending))
        self._pending.extend(tasks[:room])
        for _ in range(min(room, len(tasks))):
            if not self._should_grow():
                break
            self._spawn()
        return tasks[room:]

    def _hand_to_idle(self, item: tuple) -> _Worker:
        # Called with the lock held; the caller releases the worker's wake-up after unlocking.
        worker = self._idle.pop()
        worker.item = item
        self._busy += 1
        self._last_take = self._clock()
        return worker

    def _stalled(self, after: float) -> bool:
        return self._clock() - self._last_take >= after

    def maybe_grow(self) -> None:
        """Add threads if queued work is stalled (the accept loop calls this while work waits)."""
        woken = []
        with self._lock:
            if self._closed or not self._pending:
                return
            # The busy threads are stuck (slow upstreams, big bodies): wake idle ones first...
            while self._idle and self._pending and self._stalled(self.wake_after):
                woken.append(self._hand_to_idle(self._pending.popleft()))
            # ...and if none is left, give each waiting task its own new thread at once.
            if self._should_grow():
                for _ in range(min(len(self._pending), self.max_threads - len(self._workers))):
                    self._spawn()
        for worker in woken:
            worker.wake.release()

    def wait_for_room(self, timeout: float) -> None:
        """Block until no task waits for a thread (or ``timeout``): the accept loop's back-pressure.

        While tasks queue behind busy threads, polling for more ready connections only wakes the loop
        (and takes the GIL) once per event to queue work nobody can start yet. Waiting here instead
        lets events pile up in epoll and come back as one batch (measured with wrk -c50: a fifth less
        CPU and a quarter fewer context switches per request).
        """
        with self._lock:
            if self._pending and not self._closed:
                self._room.wait(timeout)

    def note_progress(self) -> None:
        """The caller saw the process (not the pool) stalled: restart the stall clock."""
        with self._lock:
            self._last_take = self._clock()

    def resize(self, min_threads: int, max_threads: int, max_queue: int | None = None,
               idle_timeout: float | None = None) -> None:
        """New bounds for a running pool (a config reload). A raised ``min_threads`` starts its threads
        now; threads above a lowered ``max_threads`` leave at their next idle moment (idle ones are
        woken to check), those above a lowered ``min_threads`` after ``idle_timeout`` as usual. A new
        ``idle_timeout`` counts from when each thread went idle (idle ones are woken to re-check)."""
        if not 0 <= min_threads <= max_threads or max_threads < 1:
            raise ValueError("need 0 <= min_threads <= max_threads and max_threads >= 1")
        if idle_timeout is not None and idle_timeout <= 0:
            raise ValueError("idle_timeout must be positive")
        with self._lock:
            self.min_threads, self.max_threads = min_threads, max_threads
            if max_queue is not None:
                self.max_queue = max_queue
            shorter_idle = idle_timeout is not None and idle_timeout < self.idle_timeout
            if idle_timeout is not None:
                self.idle_timeout = idle_timeout
            if self._closed:
                return
            while len(self._workers) < min_threads:
                self._spawn()
            too_many = len(self._workers) > max_threads
        if too_many or shorter_idle:
            self._nudge_idle()

    def _should_grow(self) -> bool:
        # Called with the lock held.
        threads = len(self._workers)
        if threads >= self.max_threads or len(self._pending) <= len(self._idle):
            return False
        # Fewer than HOT_THREADS threads: a new one is what a sleeping hot thread would be (min_threads
        # = 1 otherwise caps a busy pool at one thread: measured ~9,000 against ~14,000 req/s).
        return threads < HOT_THREADS or self._stalled(self.grow_after)

    def _spawn(self) -> None:
        # Called with the lock held.
        self._serial += 1
        worker = _Worker(self._clock())
        worker.thread = threading.Thread(target=self._work, args=(worker,),
                                         name=f"{self.name}-{self._serial}", daemon=True)
        self._workers.add(worker)
        worker.thread.start()

    def _work(self, me: _Worker) -> None:
        finished = False
        while True:
            item = self._next_task(me, finished)
            if item is None:  # a timeout or a nudge (wake_idle, shutdown): maybe leave
                finished = False
                if self._leave_if_done(me):
                    return
                continue
            fn, args = item
            try:
                fn(*args)
            except Exception:  # one bad task must not kill the worker
                log.exception("task %r raised", fn)
            finished = True

    def _next_task(self, me: _Worker, finished: bool) -> tuple | None:
        with self._lock:
            # The thread stops counting as busy only here, under the same lock as the pending check,
            # so submit() never sees "nobody busy" while this thread is about to take more work.
            if finished:
                self._busy -= 1
            if self._pending:
                self._busy += 1
                self._last_take = self._clock()
                item = self._pending.popleft()
                if not self._pending:
                    self._room.notify()
                return item
            if self._closed:
                return None
            if finished:  # out of work from here (not after a timeout or a nudge while idle)
                me.idle_since = self._clock()
            self._idle.append(me)
        if not me.wake.acquire(timeout=min(self.idle_timeout, IDLE_POLL)):
            with self._lock:
                chosen = me not in self._idle  # popped by submit/wake_idle just as we timed out
                if not chosen:
                    self._idle.remove(me)
            if chosen:
                me.wake.acquire()  # its release is on the way; keep the lock balanced
        item, me.item = me.item, None
        return item

    def _leave_if_done(self, me: _Worker) -> bool:
        with self._lock:
            if self._pending:
                return False
            if self._closed:
                self._workers.discard(me)
                return True
            # Retire only when idle long enough, above the floor, and with no work waiting; at once
            # above the ceiling (lowered by resize).
            threads = len(self._workers)
            if threads > self.max_threads or (
                    self._clock() - me.idle_since >= self.idle_timeout and threads > self.min_threads):
                self._workers.discard(me)
                return True
            return False

    def _nudge_idle(self) -> None:
        """Wake every idle thread without work (they re-check retirement or shutdown)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.wake.release()

    def wake_idle(self) -> None:
        """Ask idle threads to re-check retirement now (used with an injected clock in tests)."""
        self._nudge_idle()

    # -- shutdown ----------------------------------------------------------------------------
    def shutdown(self, timeout: float | None = None) -> bool:
        """Finish queued work, then stop every thread. True if all threads exited in time.

        Threads still running a task at the deadline are abandoned (they are daemon threads);
        the caller is expected to have unblocked them first (e.g. by aborting their sockets).
        """
        with self._lock:
            self._closed = True
            threads = [worker.thread for worker in self._workers]
        self._nudge_idle()
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in threads:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            thread.join(remaining)
        return not any(thread.is_alive() for thread in threads)
