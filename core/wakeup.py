"""A self-pipe: the way other threads (and signal handlers, via ``signal.set_wakeup_fd``) wake a loop
that waits in epoll/select/a selector. Used by the accept loop, the supervisor and the tunnel relay."""

from __future__ import annotations

import os
import signal
import threading


class WakePipe:
    def __init__(self):
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._lock = threading.Lock()  # orders wake() against close(): a closed fd number may be reused

    def wake(self) -> None:
        """Make the read end readable. Safe from any thread, and after close() (then a no-op)."""
        with self._lock:
            if self.write_fd < 0:
                return
            try:
                os.write(self.write_fd, b"\0")
            except BlockingIOError:  # the pipe is full: the loop is waking anyway
                pass

    def drain(self) -> None:
        """Consume every pending wake-up (call from the loop after it woke)."""
        try:
            while os.read(self.read_fd, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        with self._lock:
            self._close_fds()

    def close_in_child(self) -> None:
        """close() in a process just forked: only the forking thread runs there, and the lock may have
        been copied held by another thread of the parent (taking it would wait forever)."""
        self._close_fds()

    def _close_fds(self) -> None:
        if self.write_fd >= 0:
            os.close(self.read_fd)
            os.close(self.write_fd)
            self.read_fd = self.write_fd = -1


def restore_wakeup_fd(previous: int) -> None:
    """Point the signal wake-up (``signal.set_wakeup_fd``) back where it was before a loop took it,
    before the loop's pipe closes: a signal after that would write to whatever file reused its
    number. Only the main thread may; elsewhere (a loop run on another thread) it is left alone."""
    try:
        signal.set_wakeup_fd(previous)
    except ValueError:
        pass


STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


def stops_first(batch: list[int]) -> list[int]:
    """A batch of recorded signals, the stops first and the rest in the order recorded. Python runs the
    handlers of signals that arrive together in signal-number order: a SIGHUP sent right behind a
    SIGTERM is recorded before it, and acted on first it would reload a process on its way out."""
    return sorted(batch, key=lambda signum: signum not in STOP_SIGNALS)  # stable


def ignore_late_signals(signals) -> None:
    """Once a loop that handled ``signals`` has ended: ignore those asking for something other than a
    stop (a reload, a reopen). Python's exit puts the default action back on every signal it handled,
    and for SIGHUP or SIGUSR1 that ends the process, whose exit status then says it was killed by it.
    A stop signal keeps its meaning. Only the main thread may; elsewhere they are left alone."""
    for signum in signals:
        if signum in STOP_SIGNALS:
            continue
        try:
            signal.signal(signum, signal.SIG_IGN)
        except ValueError:
            return
