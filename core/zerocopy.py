"""Copy a known number of bytes from one socket to another without passing them through Python.

On Linux, ``os.splice`` moves pages socket → pipe → socket inside the kernel (what nginx and HAProxy
do for large bodies). Each thread keeps one pipe, so a transfer costs no setup syscalls. Elsewhere, or
if splice is refused, we fall back to ``recv_into`` a reusable buffer and ``sendall``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import ssl
import threading
import time

PIPE_SIZE = 1024 * 1024  # F_SETPIPE_SZ target: 1 MiB per splice round trip (the default 64 KiB costs 16x the syscalls)
FALLBACK_CHUNK = 256 * 1024
HAVE_SPLICE = hasattr(os, "splice")
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

_local = threading.local()


class PeerClosed(ConnectionError):
    """The source closed before ``count`` bytes were copied."""


class WriteTimedOut(TimeoutError):
    """The destination took nothing for its send timeout (a read timing out is a plain TimeoutError)."""


class Stall:
    """Where a relay that timed out stopped (the ``stall`` of its TimeoutError; a relay that failed
    otherwise, PeerClosed or another OSError, carries one too, for ``moved``): ``moved`` bytes were
    written to the destination; ``in_pipe`` more were taken from the source and wait in ``pipe`` (a
    splice that stalled writing: the caller owns the pipe now and must close it, see ``close_pipe``),
    or in ``unsent`` (the copy loop)."""

    __slots__ = ("moved", "pipe", "in_pipe", "unsent")

    def __init__(self, moved: int, pipe: tuple[int, int] | None = None, in_pipe: int = 0, unsent: bytes = b""):
        self.moved, self.pipe, self.in_pipe, self.unsent = moved, pipe, in_pipe, unsent


def close_pipe(pipe: tuple[int, int] | None) -> None:
    if pipe is not None:
        os.close(pipe[0])
        os.close(pipe[1])


def _timed_out(exc_type, stall: Stall, cause: BaseException) -> TimeoutError:
    exc = exc_type("write timed out" if exc_type is WriteTimedOut else "read timed out")
    exc.stall = stall
    exc.__cause__ = cause
    return exc


# How a timeout shows on each kind of socket: EAGAIN past a kernel timeout (SO_RCVTIMEO/SO_SNDTIMEO),
# TimeoutError from a socket with a Python-level timeout (TLS), OpenSSL's want-read/write when non-blocking.
_READ_TIMED_OUT = (BlockingIOError, TimeoutError, ssl.SSLWantReadError)
_WRITE_TIMED_OUT = (BlockingIOError, TimeoutError, ssl.SSLWantWriteError)


class _ThreadPipe:
    """A thread's splice pipe (``pipe``: None until made, or once given away or discarded). Closed
    when the thread ends, as its thread-local values are dropped: a pool thread that retires after
    a burst leaves no descriptors behind."""

    __slots__ = ("pipe",)

    def __init__(self):
        self.pipe: tuple[int, int] | None = None

    def __del__(self, close=os.close):  # os.close bound now: module globals may be gone at exit
        if self.pipe is not None:
            close(self.pipe[0])
            close(self.pipe[1])


def _thread_pipe() -> tuple[int, int]:
    holder = getattr(_local, "pipe", None)
    if holder is None:
        holder = _local.pipe = _ThreadPipe()
    if holder.pipe is None:
        read_end, write_end = os.pipe()
        try:
            fcntl.fcntl(write_end, _F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:  # the pipe-max-size sysctl may be lower; the default size still works
            pass
        holder.pipe = (read_end, write_end)
    return holder.pipe


def _discard_thread_pipe() -> None:
    """A transfer failed midway: bytes may be stuck in the pipe, so never reuse it."""
    holder = getattr(_local, "pipe", None)
    if holder is not None and holder.pipe is not None:
        pipe, holder.pipe = holder.pipe, None
        os.close(pipe[0])
        os.close(pipe[1])


def relay(source: socket.socket, dest: socket.socket, count: int, budget: float | None = None,
          watch: str = "dest") -> int:
    """Copy exactly ``count`` bytes. Raises PeerClosed, TimeoutError or OSError on failure.

    ``budget``: after that many seconds, a short transfer on the ``watch``ed side ("dest": a write the
    destination did not take whole; "source": a read that found less than asked) stops the relay as its
    timeout would (WriteTimedOut or TimeoutError, with the ``stall``): a peer that keeps a trickle
    going never passes its socket timeout, but it is not keeping up either."""
    if count <= 0:
        return 0
    deadline = None if budget is None else time.monotonic() + budget
    # A TLS socket's fd carries ciphertext: splicing it would copy encrypted bytes.
    if HAVE_SPLICE and not isinstance(source, ssl.SSLSocket) and not isinstance(dest, ssl.SSLSocket):
        try:
            return _relay_splice(source, dest, count, deadline, watch)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            # EINVAL before any byte moved: this socket type cannot splice; use the copy loop.
    return _relay_copy(source, dest, count, deadline, watch)


def _over(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def _relay_splice(source: socket.socket, dest: socket.socket, count: int, deadline, watch: str) -> int:
    read_end, write_end = _thread_pipe()
    src, dst = source.fileno(), dest.fileno()
    remaining = count
    try:
        while remaining:
            want = min(remaining, PIPE_SIZE)
            try:
                filled = os.splice(src, write_end, want)
            except BlockingIOError as exc:  # SO_RCVTIMEO expired; the pipe is empty
                raise _timed_out(TimeoutError, Stall(count - remaining), exc) from None
            if filled == 0:
                raise PeerClosed(f"source closed with {remaining} bytes still expected")
            short_read = filled < want
            while filled:
                try:
                    sent = os.splice(read_end, dst, filled)
                except BlockingIOError as exc:  # SO_SNDTIMEO expired: the pipe goes with the stall
                    sent, cause = 0, exc
                else:
                    cause = None
                    if sent == filled or watch != "dest" or not _over(deadline):
                        filled -= sent
                        remaining -= sent
                        continue
                remaining -= sent
                _local.pipe.pipe = None  # given away with the stall
                raise _timed_out(WriteTimedOut, Stall(count - remaining, (read_end, write_end), filled - sent),
                                 cause) from None
            if short_read and remaining and watch == "source" and _over(deadline):
                raise _timed_out(TimeoutError, Stall(count - remaining), None)
    except WriteTimedOut:
        raise  # the pipe went with the stall
    except BaseException as exc:
        _discard_thread_pipe()  # a failed transfer may leave bytes in the pipe: never reuse it
        _note_moved(exc, count - remaining)
        raise
    return count


def _note_moved(exc: BaseException, moved: int) -> None:
    """Give a failure partway its ``stall``: the caller counts the bytes that did go out."""
    if isinstance(exc, OSError) and getattr(exc, "stall", None) is None:
        exc.stall = Stall(moved)


def _relay_copy(source: socket.socket, dest: socket.socket, count: int, deadline, watch: str) -> int:
    buffer = getattr(_local, "buffer", None)
    if buffer is None:
        buffer = _local.buffer = bytearray(FALLBACK_CHUNK)
    view = memoryview(buffer)
    remaining = count
    sent = 0
    try:
        while remaining:
            want = min(remaining, FALLBACK_CHUNK)
            sent = 0
            try:
                got = source.recv_into(view, want)
            except _READ_TIMED_OUT as exc:
                raise _timed_out(TimeoutError, Stall(count - remaining), exc) from None
            if got == 0:
                raise PeerClosed(f"source closed with {remaining} bytes still expected")
            while sent < got:
                try:
                    step = dest.send(view[sent:got])
                except _WRITE_TIMED_OUT as exc:
                    raise _timed_out(WriteTimedOut, Stall(count - remaining + sent, unsent=bytes(view[sent:got])),
                                     exc) from None
                sent += step
                if sent < got and watch == "dest" and _over(deadline):
                    raise _timed_out(WriteTimedOut, Stall(count - remaining + sent, unsent=bytes(view[sent:got])),
                                     None)
            remaining -= got
            sent = 0
            if got < want and remaining and watch == "source" and _over(deadline):
                raise _timed_out(TimeoutError, Stall(count - remaining), None)
    except OSError as exc:
        _note_moved(exc, count - remaining + sent)
        raise
    return count
