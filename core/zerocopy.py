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

PIPE_SIZE = 1024 * 1024  # F_SETPIPE_SZ target: 1 MiB per splice round trip (the default 64 KiB costs 16x the syscalls)
FALLBACK_CHUNK = 256 * 1024
HAVE_SPLICE = hasattr(os, "splice")
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

_local = threading.local()


class PeerClosed(ConnectionError):
    """The source closed before ``count`` bytes were copied."""


class WriteTimedOut(TimeoutError):
    """The destination took nothing for its send timeout (a read timing out is a plain TimeoutError)."""


def _thread_pipe() -> tuple[int, int]:
    pipe = getattr(_local, "pipe", None)
    if pipe is None:
        read_end, write_end = os.pipe()
        try:
            fcntl.fcntl(write_end, _F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:  # the pipe-max-size sysctl may be lower; the default size still works
            pass
        pipe = _local.pipe = (read_end, write_end)
    return pipe


def _discard_thread_pipe() -> None:
    """A transfer failed midway: bytes may be stuck in the pipe, so never reuse it."""
    pipe = getattr(_local, "pipe", None)
    if pipe is not None:
        _local.pipe = None
        os.close(pipe[0])
        os.close(pipe[1])


def relay(source: socket.socket, dest: socket.socket, count: int) -> int:
    """Copy exactly ``count`` bytes. Raises PeerClosed, TimeoutError or OSError on failure."""
    if count <= 0:
        return 0
    # A TLS socket's fd carries ciphertext: splicing it would copy encrypted bytes.
    if HAVE_SPLICE and not isinstance(source, ssl.SSLSocket) and not isinstance(dest, ssl.SSLSocket):
        try:
            return _relay_splice(source, dest, count)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            # EINVAL before any byte moved: this socket type cannot splice; use the copy loop.
    return _relay_copy(source, dest, count)


def _relay_splice(source: socket.socket, dest: socket.socket, count: int) -> int:
    read_end, write_end = _thread_pipe()
    src, dst = source.fileno(), dest.fileno()
    remaining = count
    try:
        while remaining:
            try:
                filled = os.splice(src, write_end, min(remaining, PIPE_SIZE))
            except BlockingIOError as exc:  # SO_RCVTIMEO expired
                raise TimeoutError("read timed out") from exc
            if filled == 0:
                raise PeerClosed(f"source closed with {remaining} bytes still expected")
            while filled:
                try:
                    sent = os.splice(read_end, dst, filled)
                except BlockingIOError as exc:  # SO_SNDTIMEO expired
                    raise WriteTimedOut("write timed out") from exc
                filled -= sent
                remaining -= sent
    except BaseException:
        _discard_thread_pipe()
        raise
    return count


def _relay_copy(source: socket.socket, dest: socket.socket, count: int) -> int:
    buffer = getattr(_local, "buffer", None)
    if buffer is None:
        buffer = _local.buffer = bytearray(FALLBACK_CHUNK)
    view = memoryview(buffer)
    remaining = count
    while remaining:
        try:
            got = source.recv_into(view, min(remaining, FALLBACK_CHUNK))
        except BlockingIOError as exc:
            raise TimeoutError("read timed out") from exc
        if got == 0:
            raise PeerClosed(f"source closed with {remaining} bytes still expected")
        try:
            dest.sendall(view[:got])
        except BlockingIOError as exc:
            raise WriteTimedOut("write timed out") from exc
        remaining -= got
    return count
