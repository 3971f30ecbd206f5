"""Clients that hang up while their worker waits on another socket.

A worker waiting for an upstream's first answer blocks in one ``recv`` on the upstream socket: the
cheapest wait there is. If the client hangs up meanwhile, nobody would notice until the upstream
answers or its read timeout passes. So the worker registers the pair here first (a dict insert, no
system call, no clock read); one thread looks, every ``interval``, at the clients it has seen waiting
for at least that long, and for one that hung up shuts the other socket down, which wakes the worker
at once. A fast answer never meets this thread; a slow one learns of a gone client within about two
intervals.
"""

from __future__ import annotations

import select
import socket
import threading
import time

_PEEK_NOWAIT = socket.MSG_PEEK | socket.MSG_DONTWAIT
_HUNG_UP = select.POLLRDHUP | select.POLLHUP | select.POLLERR
IDLE_CHECKS = 10  # intervals with nothing watched before the thread ends (a stopped proxy keeps none)


def hung_up(sock) -> bool:
    """The peer closed (or reset) this socket. TLS sockets are peeked raw: ciphertext waiting is not a close."""
    try:
        return socket.socket.recv(sock, 1, _PEEK_NOWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


class Watched:
    """One registration: ``gone`` turns True when the client hung up and the other socket was shut down.
    ``since`` is when the checker first saw it (None until then)."""

    __slots__ = ("client", "other", "since", "gone")

    def __init__(self, client, other):
        self.client, self.other, self.since, self.gone = client, other, None, False


class HangupWatch:
    def __init__(self, interval: float = 0.5, clock=time.monotonic, run_thread: bool = True):
        self.interval = interval
        self.clock = clock
        self._run_thread = run_thread  # False: the owner calls check() itself (tests, with a fake clock)
        self._watched: dict[Watched, Watched] = {}  # keyed by itself (hashed by identity): no id() call
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        # Whoever pops a registration from _watched owns it (dict.pop is atomic): unwatch, and the
        # other socket is never shut down, so a worker that got its answer in time relays it on an
        # intact connection; or the checker, which shuts it down under this lock, so that an unwatch
        # that lost waits for the shutdown to be done. The common unwatch takes no lock.
        self._decide = threading.Lock()

    def watch(self, client, other) -> Watched:
        watched = Watched(client, other)
        self._watched[watched] = watched
        if self._thread is None and self._run_thread:
            self._start()
        return watched

    def unwatch(self, watched: Watched) -> bool:
        """Stop watching; True if the client hung up (the other socket was shut down)."""
        if self._watched.pop(watched, None) is not None:
            return False
        with self._decide:  # the checker took it first: its shutdown is done once this lock is free
            return watched.gone

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pyproxy-hangups", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        idle = 0
        while True:
            time.sleep(self.interval)
            if self._watched:
                idle = 0
                self.check()
                continue
            idle += 1
            if idle >= IDLE_CHECKS:  # nothing to watch for a while: end; the next watch() starts anew
                with self._start_lock:
                    if self._watched:
                        continue
                    self._thread = None
                # A watch() made since the look above saw this thread still set and started none:
                # look again now that it reads None (and would start one itself from here on).
                if self._watched:
                    self._start()
                return

    def check(self) -> None:
        """Shut down the other socket of every client that hung up after waiting an interval or more."""
        now = self.clock()
        waiting = []
        for watched in list(self._watched.values()):
            if watched.since is None:
                watched.since = now  # seen for the first time: it waits an interval from here
            elif now - watched.since >= self.interval:
                waiting.append(watched)
        if not waiting:
            return
        poller = select.poll()
        by_fd: dict[int, list[Watched]] = {}  # several per client: an HTTP/2 connection's streams
        for watched in waiting:
            try:
                fd = watched.client.fileno()
            except (OSError, ValueError):
                continue
            if fd >= 0:
                by_fd.setdefault(fd, []).append(watched)
                poller.register(fd, select.POLLRDHUP)
        for fd, mask in poller.poll(0):
            registrations = by_fd[fd]
            if mask & _HUNG_UP and hung_up(registrations[0].client):
                for watched in registrations:
                    self._end(watched)

    def _end(self, watched: Watched) -> None:
        """The client hung up: shut the other socket down, unless its worker unwatched it meanwhile."""
        with self._decide:
            if self._watched.pop(watched, None) is None:
                return  # the answer came meanwhile
            watched.gone = True
            try:
                socket.socket.shutdown(watched.other, socket.SHUT_RDWR)  # raw: never the TLS state
            except OSError:  # closed already
                pass
