"""Transfers whose peer stopped keeping up, carried on without a worker thread.

A worker relays a body with blocking calls as long as both peers keep up (one splice after another,
no extra hops). When a peer stalls (a client that stops reading a large response, an upload that
stops arriving) the worker's call gives up after a short patience, and the protocol layer describes
what is left as a ``Wait``: copy ``count`` more bytes, send these bytes, or wait until a socket is
readable. The connection is then *held*: ``SocketServer`` gives the wait to its ``TransferRelay`` and
the worker goes back to the pool. The relay (one thread and one epoll set for all held transfers of
the process, as the tunnel relay) does the non-blocking I/O as the peers allow, enforces the gaps
(``read_gap``: the source sent nothing for that long, ``write_gap``: the destination took nothing),
and when the wait is over, successfully or not, hands the connection back to the pool, where the
protocol layer continues from where it stopped (``Wait.error`` says how it ended).

At most ``CHUNK`` bytes per transfer sit in Python memory; a splice transfer may also hold the bytes
already in its pipe when it stalled (kernel memory, at most one pipe's size).
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import ssl
import threading
import time
from collections import deque
from typing import Callable

from .wakeup import WakePipe
from .zerocopy import PeerClosed, WriteTimedOut

log = logging.getLogger("pyproxy.core.relay")

CHUNK = 64 * 1024  # bytes read per step, and the most a copying transfer keeps in Python memory
STEPS_PER_EVENT = 16  # bounds the time one fast transfer can hold the relay thread
SWEEP_INTERVAL = 0.1  # seconds between checks of the gaps
_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
_SPLICE_NONBLOCK = getattr(os, "SPLICE_F_NONBLOCK", 2)


class Wait:
    """What a held connection waits for. Subclasses do one kind of step; ``error`` is set when the
    wait failed (PeerClosed, TimeoutError for a silent source, WriteTimedOut for a full destination,
    or the OSError a socket raised), None when it completed."""

    read_gap: float = 60.0
    write_gap: float = 60.0

    def __init__(self):
        self.error: BaseException | None = None
        self.saved_timeouts: list = []  # each socket's mode before the relay made it non-blocking
        self.blocked_on: tuple | None = None  # (socket, selector event) the last step stopped on
        self.last_progress = 0.0

    def step(self) -> bool:
        """Move what can move without blocking; True when the wait is over (done or failed)."""
        raise NotImplementedError

    def sockets(self) -> tuple:
        raise NotImplementedError

    def release(self) -> None:
        """Free what the wait owns (a pipe); called once, when it is over."""

    def stalled_error(self) -> BaseException:
        reading = self.blocked_on is not None and self.blocked_on[1] == selectors.EVENT_READ
        return TimeoutError("read timed out") if reading else WriteTimedOut("write timed out")

    def gap(self) -> float:
        reading = self.blocked_on is not None and self.blocked_on[1] == selectors.EVENT_READ
        return self.read_gap if reading else self.write_gap


class Readable(Wait):
    """Wait until ``sock`` has bytes (or EOF) to read."""

    def __init__(self, sock, read_gap: float):
        super().__init__()
        self.sock, self.read_gap = sock, read_gap

    def sockets(self) -> tuple:
        return (self.sock,)

    def step(self) -> bool:
        if self.blocked_on is None:  # first step: TLS bytes may already sit decrypted in OpenSSL
            pending = getattr(self.sock, "pending", None)
            if pending is not None and pending():
                return True
            self.blocked_on = (self.sock, selectors.EVENT_READ)
            return False
        return True  # only called again once epoll saw it readable


class Send(Wait):
    """Send ``data`` to ``sock``; ``sent`` counts what went out."""

    def __init__(self, sock, data, write_gap: float):
        super().__init__()
        self.sock, self.data, self.write_gap = sock, memoryview(data), write_gap
        self.sent = 0

    def sockets(self) -> tuple:
        return (self.sock,)

    def step(self) -> bool:
        while self.sent < len(self.data):
            try:
                n = self.sock.send(self.data[self.sent:self.sent + 4 * CHUNK])
            except _WOULD_BLOCK:
                self.blocked_on = (self.sock, selectors.EVENT_WRITE)
                return False
            except OSError as exc:
                self.error = exc
                return True
            self.sent += n
            self.last_progress = -1.0  # the relay stamps progress with its clock
        return True


class Copy(Wait):
    """Copy ``count`` more bytes from ``source`` to ``dest``. ``pipe`` (read fd, write fd) holds
    ``in_pipe`` bytes already taken from the source: a splice that stalled while writing. Without a
    pipe (or when a side is TLS) the bytes pass through a buffer of at most CHUNK bytes."""

    def __init__(self, source, dest, count: int, read_gap: float, write_gap: float,
                 pipe: tuple[int, int] | None = None, in_pipe: int = 0, buffer: bytes = b""):
        super().__init__()
        self.source, self.dest, self.count = source, dest, count
        self.read_gap, self.write_gap = read_gap, write_gap
        self.pipe, self.in_pipe = pipe, in_pipe
        self.buffer = buffer
        self.splicing = (hasattr(os, "splice") and not isinstance(source, ssl.SSLSocket)
                         and not isinstance(dest, ssl.SSLSocket))
        self.moved = 0  # bytes written to dest

    def sockets(self) -> tuple:
        return (self.source, self.dest)

    def release(self) -> None:
        if self.pipe is not None:
            for fd in self.pipe:
                os.close(fd)
            self.pipe = None

    def step(self) -> bool:
        try:
            for _ in range(STEPS_PER_EVENT):
                if self.in_pipe or self.buffer:
                    if not self._write():
                        return False
                    continue
                if not self.count:
                    return True
                if not self._read():
                    return False
            self.blocked_on = None  # more to do at once: the relay comes back without an event
            return False
        except OSError as exc:
            self.error = exc
            return True

    def _write(self) -> bool:
        try:
            if self.in_pipe:
                n = os.splice(self.pipe[0], self.dest.fileno(), self.in_pipe, flags=_SPLICE_NONBLOCK)
                self.in_pipe -= n
            else:
                n = self.dest.send(self.buffer)
                self.buffer = self.buffer[n:]
        except _WOULD_BLOCK:
            self.blocked_on = (self.dest, selectors.EVENT_WRITE)
            return False
        self.moved += n
        self.last_progress = -1.0
        return True

    def _read(self) -> bool:
        want = min(self.count, CHUNK)
        try:
            if self.splicing:
                if self.pipe is None:
                    self.pipe = os.pipe()
                n = os.splice(self.source.fileno(), self.pipe[1], want, flags=_SPLICE_NONBLOCK)
            else:
                self.buffer = self.source.recv(want)
                n = len(self.buffer)
        except _WOULD_BLOCK:
            self.blocked_on = (self.source, selectors.EVENT_READ)
            return False
        if n == 0:
            raise PeerClosed(f"source closed with {self.count} bytes still expected")
        self.count -= n
        if self.splicing:
            self.in_pipe += n
        self.last_progress = -1.0
        return True


class Linger(Wait):
    """A lingering close (see ``Connection.close_lingering``): read and drop what ``sock`` still
    receives until its peer closes, stays quiet for ``read_gap``, or the clock reaches ``until``."""

    def __init__(self, sock, until: float, read_gap: float, clock):
        super().__init__()
        self.sock, self.until, self.clock = sock, until, clock
        self.read_gap = self.write_gap = read_gap

    def sockets(self) -> tuple:
        return (self.sock,)

    def step(self) -> bool:
        for _ in range(STEPS_PER_EVENT):
            if self.clock() >= self.until:
                return True
            try:
                if not self.sock.recv(CHUNK):
                    return True
            except _WOULD_BLOCK:
                self.blocked_on = (self.sock, selectors.EVENT_READ)
                return False
            except OSError:  # reset: nothing left to protect
                return True
            self.last_progress = -1.0
        self.blocked_on = None
        return False


def _stopped_error() -> OSError:
    return ConnectionAbortedError(errno.ECONNABORTED, "server stopped")


class _Held:
    __slots__ = ("wait", "on_done", "registered_fd")

    def __init__(self, wait: Wait, on_done: Callable[[], None]):
        self.wait, self.on_done, self.registered_fd = wait, on_done, None


class TransferRelay:
    """One thread and one selector for every held transfer (started with the first one)."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._incoming: deque[_Held] = deque()
        self._held: set[_Held] = set()
        self._ready: list[_Held] = []  # stopped without waiting on a socket: step again at once
        self._start_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._selector: selectors.BaseSelector | None = None  # made with the thread: a server that
        self._wakeup: WakePipe | None = None  # never holds a transfer costs no descriptors
        self._stopping = False
        self._cancel_error: BaseException | None = None  # set by cancel_all: every wait ends with it
        self._cancelled = threading.Event()

    @property
    def running(self) -> bool:
        """Started by a first held transfer: its thread runs and holds an epoll set and a wake-up pipe."""
        return self._thread is not None

    @property
    def held_count(self) -> int:
        return len(self._held) + len(self._incoming)

    def hold(self, wait: Wait, on_done: Callable[[], None]) -> None:
        """Carry ``wait`` out; call ``on_done()`` from the relay thread once it is over. Returns at once."""
        wait.saved_timeouts = [sock.gettimeout() for sock in wait.sockets()]
        for sock in wait.sockets():
            sock.settimeout(0.0)  # not setblocking: a TLS socket with per-direction timeouts keeps 0.0
        wait.last_progress = self.clock()
        held = _Held(wait, on_done)
        with self._start_lock:
            refused = _stopped_error() if self._stopping else None
            if refused is None and self._thread is None:
                refused = self._start()
            if refused is None:
                self._incoming.append(held)
        if refused is not None:  # nothing will carry it out: it ends now, as it would at the relay's end
            wait.error = refused
            self._finish(held)
            return
        self._wakeup.wake()

    def _start(self) -> OSError | None:
        """Make the thread, its epoll set and wake-up pipe (under ``_start_lock``). Out of descriptors
        or threads, returns the error instead: the wait at hand ends with it, and the next one retries."""
        selector = wakeup = None
        try:
            selector = selectors.DefaultSelector()
            wakeup = WakePipe()
            selector.register(wakeup.read_fd, selectors.EVENT_READ, None)
            self._selector, self._wakeup = selector, wakeup
            self._thread = threading.Thread(target=self._run, name="pyproxy-transfers", daemon=True)
            self._thread.start()
        except (OSError, RuntimeError) as exc:  # RuntimeError: "can't start new thread"
            log.warning("cannot start the transfer relay: %s", exc)
            self._thread = self._selector = self._wakeup = None
            if selector is not None:
                selector.close()
            if wakeup is not None:
                wakeup.close()
            return exc if isinstance(exc, OSError) else OSError(errno.EAGAIN, str(exc))
        return None

    def cancel_all(self, error: BaseException, timeout: float) -> bool:
        """End every held wait now, and any held later, with ``error`` (a drain past its deadline):
        each connection goes back to the pool, where its exchange ends as a failed one (logged, its
        server released). Returns once the relay handed them all back (True) or after ``timeout``."""
        with self._start_lock:
            if self._thread is None:
                return True
            self._cancel_error = error
            self._wakeup.wake()
        return self._cancelled.wait(timeout)

    def stop(self) -> None:
        """End the relay thread (the server is shutting down): what it still holds, and any wait
        handed over after this, ends with ECONNABORTED (its ``on_done`` runs), so no socket is left
        open with nobody to close it."""
        with self._start_lock:
            self._stopping = True
            if self._wakeup is not None:
                self._wakeup.wake()

    # -- the relay thread ----------------------------------------------------------------------
    def _run(self) -> None:
        next_sweep = self.clock() + SWEEP_INTERVAL
        while not self._stopping:
            for key, _mask in self._selector.select(0 if self._ready else SWEEP_INTERVAL):
                if key.data is None:
                    self._wakeup.drain()
                    while self._incoming:
                        held = self._incoming.popleft()
                        self._held.add(held)
                        self._advance(held)
                else:
                    self._advance(key.data)
            ready, self._ready = self._ready, []
            for held in ready:
                if held in self._held:
                    self._advance(held)
            if self._cancel_error is not None:
                self._cancel_everything()
            if self.clock() >= next_sweep:
                self._sweep()
                next_sweep = self.clock() + SWEEP_INTERVAL
        while self._incoming:
            self._held.add(self._incoming.popleft())
        for held in list(self._held):
            held.wait.error = _stopped_error()
            self._finish(held)
        self._selector.close()
        self._wakeup.close()

    def _advance(self, held: _Held) -> None:
        wait = held.wait
        try:
            over = wait.step()
        except Exception as exc:  # a bug in one transfer must not stop the others
            log.exception("held transfer failed")
            wait.error, over = exc, True
        if wait.last_progress < 0:
            wait.last_progress = self.clock()
        if over:
            self._finish(held)
        elif wait.blocked_on is None:
            self._ready.append(held)
        else:
            try:
                self._watch(held, *wait.blocked_on)
            except (OSError, ValueError, KeyError) as exc:  # a socket epoll refuses (closed under us)
                log.warning("held transfer cannot be watched: %s", exc)
                wait.error = exc if isinstance(exc, OSError) else OSError(errno.EBADF, str(exc))
                self._finish(held)

    def _watch(self, held: _Held, sock, event: int) -> None:
        fd = sock.fileno()
        if held.registered_fd == fd:
            self._selector.modify(fd, event, held)
            return
        self._unwatch(held)
        self._selector.register(fd, event, held)
        held.registered_fd = fd

    def _unwatch(self, held: _Held) -> None:
        if held.registered_fd is not None:
            try:
                self._selector.unregister(held.registered_fd)
            except (KeyError, ValueError, OSError):
                pass
            held.registered_fd = None

    def _finish(self, held: _Held) -> None:
        self._held.discard(held)
        self._unwatch(held)
        held.wait.release()
        for sock, timeout in zip(held.wait.sockets(), held.wait.saved_timeouts):
            try:
                sock.settimeout(timeout)
            except OSError:  # closed under us (a forced drain): the protocol layer sees the error
                pass
        try:
            held.on_done()
        except Exception:
            log.exception("handing a held connection back failed")

    def _cancel_everything(self) -> None:
        while self._incoming:
            self._held.add(self._incoming.popleft())
        for held in list(self._held):
            held.wait.error = self._cancel_error
            self._finish(held)
        self._cancelled.set()

    def _sweep(self) -> None:
        now = self.clock()
        for held in list(self._held):
            wait = held.wait
            if now - wait.last_progress > wait.gap():
                wait.error = wait.stalled_error()
                self._finish(held)
