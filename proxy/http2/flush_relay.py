"""One thread per process that finishes writing HTTP/2 connections whose client is slow to read its
socket, so that no pool worker waits for one (proxy/http2/session.py, ``H2Session._write_out``).

A session whose socket is full is handed over with its ``writing`` flag still set: the threads serving
its streams go on queueing frames (and park once 256 KiB wait), and this thread writes whenever the
socket has room, until the queue is empty (the session's writing is over) or the client took nothing
for the session's ``send_timeout`` (the session is lost). The thread runs only while a session is
handed over, and ends, with its wake-up pipe, when none is."""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from typing import Callable

log = logging.getLogger("pyproxy.http2")


class FlushRelay:
    def __init__(self, clock: Callable[[], float] = time.monotonic, name: str = "pyproxy-h2-flush"):
        self.clock = clock
        self.name = name
        self._lock = threading.Lock()
        self._added: list = []  # sessions handed over since the thread last looked
        self._wake = None  # (read fd, write fd) while the thread runs

    def add(self, session) -> None:
        """Write out what ``session`` has queued as its client allows (its ``writing`` is set)."""
        with self._lock:
            self._added.append(session)
            if self._wake is None:
                self._wake = os.pipe()
                os.set_blocking(self._wake[1], False)
                threading.Thread(target=self._run, args=(self._wake[0],), name=self.name, daemon=True).start()
            else:
                try:
                    os.write(self._wake[1], b"!")
                except BlockingIOError:
                    pass  # the pipe is full of wake-ups already

    def _run(self, wake_fd: int) -> None:
        poller = select.poll()
        poller.register(wake_fd, select.POLLIN)
        watched: dict = {}  # fd: [session, deadline, bytes written when last looked]
        while True:
            if not self._take_added(poller, watched, wake_fd):
                return
            if not watched:
                continue  # those handed over were closed meanwhile: the next look may end the thread
            now = self.clock()
            timeout = max(0.0, min(entry[1] for entry in watched.values()) - now)
            for fd, _ in poller.poll(timeout * 1000):
                if fd == wake_fd:
                    os.read(wake_fd, 4096)
                elif fd in watched:
                    self._write(poller, watched, fd)
            now = self.clock()
            for fd, (session, deadline, _) in list(watched.items()):
                if now >= deadline:
                    del watched[fd]
                    _unregister(poller, fd)
                    session.give_up_writing()

    def _take_added(self, poller, watched: dict, wake_fd: int) -> bool:
        """Watch the sessions handed over; False (the thread ends) when there is nothing to watch."""
        with self._lock:
            added, self._added = self._added, []
            if not added and not watched:
                os.close(wake_fd)
                os.close(self._wake[1])
                self._wake = None
                return False
        for session in added:
            fd = session.sock.fileno()
            if fd < 0:  # closed meanwhile: lost already
                session.give_up_writing()
                continue
            # A descriptor watched already belongs to a session lost since (its socket closed, the number
            # taken by a new connection): that one has nothing left to write.
            watched[fd] = [session, self.clock() + session.send_timeout, session.bytes_written]
            _unregister(poller, fd)
            poller.register(fd, select.POLLOUT)
        return True

    def _write(self, poller, watched: dict, fd: int) -> None:
        entry = watched[fd]
        session = entry[0]
        try:
            finished = session.write_stalled()
        except Exception:  # one connection's failure never stops the writes of the others
            log.exception("HTTP/2 write to %s failed", session.client_ip)
            session.give_up_writing()
            finished = True
        if finished:
            del watched[fd]
            _unregister(poller, fd)
        elif session.bytes_written != entry[2]:  # progress: the client reads
            entry[1] = self.clock() + session.send_timeout
            entry[2] = session.bytes_written


def _unregister(poller, fd: int) -> None:
    try:
        poller.unregister(fd)
    except KeyError:
        pass
