"""A client connection: buffered reads, writes, timeouts and its lifecycle state.

The state machine lives here, as a table (h11's ``_state.py`` idea): every move goes through
``Connection.transition`` which rejects moves the table does not list.

    NEW ──► READING ──► PROCESSING ──► WRITING ──► IDLE ──► READING ...
     │         │            │             │         │
     └─────────┴────────────┴─────────────┴─────────┴──► CLOSED
    WRITING ──► TUNNEL (an Upgrade: raw bytes both ways) ──► CLOSED
    PROCESSING/WRITING ──► HELD (a stalled transfer carried on by the relay) ──► back, or CLOSED

IDLE is a keep-alive connection between requests: it is parked in the server's selector and holds
no thread. TUNNEL is a connection that stopped speaking the request/response protocol. HELD is a
connection whose body transfer waits on a slow peer: the server's ``TransferRelay`` carries it on
without a thread and hands it back to the pool, in the state it left, once the wait is over.
"""

from __future__ import annotations

import enum
import errno
import select
import socket
import ssl
import struct
import threading
import time

from . import zerocopy

READ_CHUNK = 256 * 1024  # one recv; large enough that big bodies need few syscalls


class ConnectionState(enum.Enum):
    NEW = "new"
    READING = "reading"
    PROCESSING = "processing"
    WRITING = "writing"
    IDLE = "idle"
    TUNNEL = "tunnel"
    HELD = "held"
    CLOSED = "closed"


S = ConnectionState
ALLOWED_MOVES: dict[ConnectionState, frozenset[ConnectionState]] = {
    S.NEW: frozenset({S.READING, S.CLOSED}),
    # READING → IDLE: a partial request waits parked (no thread) until more bytes or its deadline.
    S.READING: frozenset({S.PROCESSING, S.IDLE, S.CLOSED}),
    # PROCESSING → WRITING is the normal path; → READING never (a request is always answered).
    S.PROCESSING: frozenset({S.WRITING, S.HELD, S.CLOSED}),
    S.WRITING: frozenset({S.IDLE, S.READING, S.TUNNEL, S.HELD, S.CLOSED}),
    S.HELD: frozenset({S.PROCESSING, S.WRITING, S.CLOSED}),
    S.IDLE: frozenset({S.READING, S.CLOSED}),
    S.TUNNEL: frozenset({S.CLOSED}),
    S.CLOSED: frozenset(),
}
# States in which a connection holds no request: safe to close during a graceful drain.
RESTING_STATES = frozenset({S.NEW, S.IDLE})
# The same table for the hot path (four moves per request): Enum.__hash__ is a Python-level call,
# so a dict keyed by the member's value and a tuple scanned by identity check a move without it.
_MOVES_BY_VALUE: dict[str, tuple[ConnectionState, ...]] = {
    state.value: tuple(moves) for state, moves in ALLOWED_MOVES.items()}
# The moves that need no lock: out of a state only the worker serving the connection can leave, into
# one that is not CLOSED. Other threads change a connection's state in two ways only: claim(), which
# takes it out of a resting state (NEW/IDLE) and so never matches while a worker holds it in
# READING/PROCESSING/WRITING/TUNNEL, and close() (with the lock), which the server calls on a busy
# connection only at its final force-close, after the workers were given up on; the socket is closed
# then, so a straggler's next call fails anyway. Three of the four moves per request are these.
_UNCONTENDED_MOVES: dict[str, tuple[ConnectionState, ...]] = {
    state.value: (() if state in RESTING_STATES else tuple(moves - {S.CLOSED}))
    for state, moves in ALLOWED_MOVES.items()}


# Members as module constants: a global is read faster than an Enum class attribute (metaclass lookup).
_IDLE, _CLOSED = S.IDLE, S.CLOSED


class IllegalTransition(RuntimeError):
    """A move the state table does not allow: a bug in the caller, never a peer's fault."""


class ConnectionClosed(ConnectionError):
    """The peer closed the connection before the expected bytes arrived."""


class LimitExceeded(ValueError):
    """More bytes than the caller's limit arrived without the delimiter."""


_TIMEVAL = struct.Struct("ll")


def set_socket_timeouts(sock: socket.socket, read: float | None, write: float | None) -> None:
    """Kernel-side timeouts on a blocking socket (SO_RCVTIMEO / SO_SNDTIMEO).

    Why not ``sock.settimeout``: CPython then polls before every recv/send, doubling the syscalls on
    the hot path. With kernel timeouts a recv is one syscall, and a timeout surfaces as EAGAIN, which
    ``Connection`` turns into ``TimeoutError``.
    """
    set_socket_timeout(sock, socket.SO_RCVTIMEO, read)
    set_socket_timeout(sock, socket.SO_SNDTIMEO, write)


def set_socket_timeout(sock: socket.socket, option: int, value: float | None) -> None:
    """One of the two kernel timeouts (``option``: SO_RCVTIMEO or SO_SNDTIMEO); None is none."""
    seconds = value or 0.0  # 0 means "no timeout" to the kernel
    whole = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, option, _TIMEVAL.pack(whole, int((seconds - whole) * 1e6)))


class Connection:
    """Wraps one accepted socket. Owned by at most one thread at a time (the server hands it over)."""

    __slots__ = ("sock", "peer", "state", "last_active", "server_data", "_buffer", "_clock",
                 "_read_timeout", "_write_timeout", "_state_lock", "fileno_cached", "listener",
                 "on_close", "park_deadline", "held_from", "held_wait", "in_pool", "lingerer")

    def __init__(self, sock: socket.socket, peer, clock=time.monotonic, listener=None,
                 timeouts: tuple[float | None, float | None] = (None, None)):
        self.sock = sock
        self.peer = peer  # (host, port, ...) as accept() returned it
        self.listener = listener  # opaque tag of the listener that accepted it (e.g. its config)
        self.state = ConnectionState.NEW
        self._clock = clock
        self.last_active = clock()
        self._buffer = b""  # bytes read but not yet consumed (pipelining, read_until leftovers)
        # The kernel timeouts the socket has now: (None, None) for a new socket, or what an accepted
        # one inherited from its listening socket (see core.socket_server.Listener).
        self._read_timeout, self._write_timeout = timeouts
        self._state_lock = threading.Lock()
        self.fileno_cached = sock.fileno()
        self.server_data = None  # a slot for the protocol layer (e.g. per-connection counters)
        self.on_close = None  # called once the socket is closed (the server forgets the connection)
        self.held_from: ConnectionState | None = None  # the state a HELD connection returns to
        self.held_wait = None  # what a HELD connection waits for (a core.transfer_relay.Wait)
        # Set while parked mid-request (e.g. half a request head): the clock time at which the
        # server gives up on it (instead of idle_timeout) and calls its on_expired callback.
        self.park_deadline: float | None = None
        # Handed to a worker whose handler has not returned yet (core.SocketServer sets and clears
        # it): the reaper and the drain leave such a connection alone even while it is still NEW/IDLE.
        self.in_pool = False
        # Where a lingering close goes on without this thread (the server's transfer relay): called with
        # the bare socket, the seconds to linger and the quiet gap that ends it. None: linger here.
        self.lingerer = None

    # -- state -------------------------------------------------------------------------------
    def transition(self, new: ConnectionState) -> None:
        if new in _UNCONTENDED_MOVES[self.state._value_]:
            self.state = new  # legal, and no other thread moves it now (see _UNCONTENDED_MOVES)
        else:
            with self._state_lock:
                if new not in _MOVES_BY_VALUE[self.state._value_]:
                    raise IllegalTransition(f"{self.state.name} -> {new.name}")
                self.state = new
        if new is _IDLE:
            # The reaper reads last_active of resting connections only: the idle clock starts here
            # (and at accept); the moves in between need no clock read.
            self.last_active = self._clock()
        elif new is _CLOSED:
            # CLOSED means the socket is gone: close() is a no-op from here on, so release it now
            # (otherwise the fd leaks and the server keeps counting the connection).
            self.close_socket()

    def claim(self, expected: ConnectionState, new: ConnectionState) -> bool:
        """Move expected → new only if still in ``expected`` (the server and a reaper may race)."""
        with self._state_lock:
            if self.state is not expected:
                return False
            self.state = new
        self.last_active = self._clock()
        return True

    @property
    def closed(self) -> bool:
        return self.state is ConnectionState.CLOSED

    # -- timeouts ----------------------------------------------------------------------------
    def set_timeouts(self, read: float | None, write: float | None = None) -> None:
        """Per-operation deadlines; a syscall only for a direction whose value actually changes."""
        if write is None:
            write = self._write_timeout if self._write_timeout is not None else read
        if read != self._read_timeout:
            set_socket_timeout(self.sock, socket.SO_RCVTIMEO, read)
            self._read_timeout = read
        if write != self._write_timeout:
            set_socket_timeout(self.sock, socket.SO_SNDTIMEO, write)
            self._write_timeout = write

    def clear_timeouts(self) -> None:
        """No kernel timeouts either way: for a protocol that keeps its own (TLS, HTTP/2)."""
        if self._read_timeout is not None or self._write_timeout is not None:
            set_socket_timeouts(self.sock, None, None)
            self._read_timeout = self._write_timeout = None

    def set_write_timeout(self, write: float | None) -> None:
        if write is None or write != self._write_timeout:  # usually unchanged: then not even a call
            self.set_timeouts(self._read_timeout, write)

    # -- reading -----------------------------------------------------------------------------
    def read_some(self, max_bytes: int = READ_CHUNK) -> bytes:
        """Buffered bytes if any, else one recv. Returns b"" at end of stream."""
        if self._buffer:
            data, self._buffer = self._buffer[:max_bytes], self._buffer[max_bytes:]
            return data
        try:
            return self.sock.recv(max_bytes)
        except BlockingIOError as exc:  # SO_RCVTIMEO expired
            raise TimeoutError("read timed out") from exc

    def read_until(self, delimiter: bytes, limit: int) -> bytes:
        """Read up to and including ``delimiter``; LimitExceeded if ``limit`` bytes pass without it."""
        data = self._buffer
        start = 0
        while True:
            index = data.find(delimiter, start)
            if index >= 0:
                end = index + len(delimiter)
                if end > limit:
                    self._buffer = data  # keep every byte read, as the no-delimiter branch does
                    raise LimitExceeded(f"no {delimiter!r} within {limit} bytes")
                self._buffer = data[end:]
                return data[:end]
            if len(data) >= limit:
                self._buffer = data
                raise LimitExceeded(f"no {delimiter!r} within {limit} bytes")
            start = max(0, len(data) - len(delimiter) + 1)
            self._buffer = b""
            chunk = self.read_some()
            if not chunk:
                self._buffer = data
                raise ConnectionClosed("peer closed before delimiter")
            data += chunk

    def read_exact(self, count: int) -> bytes:
        parts = []
        while count > 0:
            chunk = self.read_some(min(count, READ_CHUNK))
            if not chunk:
                raise ConnectionClosed(f"peer closed with {count} bytes still expected")
            parts.append(chunk)
            count -= len(chunk)
        return b"".join(parts)

    def unread(self, data: bytes) -> None:
        """Push bytes back (e.g. the start of a pipelined request read along with the previous one)."""
        if data:
            self._buffer = data + self._buffer

    def has_buffered(self) -> bool:
        return bool(self._buffer)

    def readable_now(self) -> bool:
        """Are bytes (or EOF) waiting right now? Never blocks; works for TLS sockets too."""
        if self._buffer:
            return True
        pending = getattr(self.sock, "pending", None)  # TLS: bytes already decrypted by OpenSSL
        if pending is not None and pending():
            return True
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        return bool(poller.poll(0))

    # -- writing -----------------------------------------------------------------------------
    def sendall(self, data) -> None:
        try:
            self.sock.sendall(data)
        except BlockingIOError as exc:  # SO_SNDTIMEO expired
            raise TimeoutError("write timed out") from exc

    def send_some(self, data) -> int:
        """Send ``data``; returns how much went out before the write timeout (normally all of it)."""
        sent = 0
        try:
            sent = self.sock.send(data)
            if sent == len(data):
                return sent
            view = memoryview(data)
            while sent < len(view):
                sent += self.sock.send(view[sent:])
        except (BlockingIOError, TimeoutError, ssl.SSLWantWriteError):  # the write timeout passed
            pass
        return sent

    def splice_from(self, source: socket.socket, count: int, budget: float | None = None) -> int:
        """Copy ``count`` bytes from ``source`` to this connection, in the kernel where possible
        (``budget``: see ``zerocopy.relay``; this connection is the watched side)."""
        if self._buffer:
            raise RuntimeError("splice_from with buffered input would reorder bytes")
        return zerocopy.relay(source, self.sock, count, budget)

    # -- holding -----------------------------------------------------------------------------
    def hold(self, wait) -> None:
        """Leave a stalled transfer (a ``core.transfer_relay.Wait``) to the server: the connection is
        HELD; once the handler returns, the server's relay carries the wait out without a thread and
        then runs the handler again, which calls ``resume`` and continues where it stopped."""
        self.held_from = self.state
        self.held_wait = wait
        self.transition(ConnectionState.HELD)

    def resume(self) -> None:
        """Back from HELD to the state the transfer left (the worker continues it)."""
        self.transition(self.held_from)
        self.held_from = self.held_wait = None
        # The relay switched the socket to non-blocking and back: a TLS socket keeps its timeouts in
        # Python and lost the per-direction values, so set them again at the next set_timeouts.
        self._read_timeout = self._write_timeout = None

    # -- closing -----------------------------------------------------------------------------
    def close(self) -> None:
        with self._state_lock:
            if self.state is _CLOSED:
                return
            self.state = _CLOSED
        self.close_socket()

    def close_socket(self) -> None:
        """Release the socket of a connection already moved to CLOSED (see ``claim``)."""
        try:
            self.sock.close()
        except OSError:  # already gone; nothing to release
            pass
        if self.on_close is not None:
            self.on_close(self)

    def close_lingering(self, seconds: float, quiet: float) -> None:
        """nginx's lingering close: stop sending (the peer sees the end of our answer), then drop what
        it still sends until it closes, stays ``quiet`` that long, or ``seconds`` pass, then close.
        Closing with unread bytes would send a reset, which can destroy the end of the answer before
        the peer reads it. With a ``lingerer`` the wait holds no thread: the Connection is closed (the
        server forgets it) and its socket, detached, is dropped by the lingerer once the wait is over."""
        if self.state is _CLOSED:
            return
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:  # reset or gone: nothing to linger for
            self.close()
            return
        if self.lingerer is None:
            self._linger_here(seconds, quiet)
            return
        sock = self.sock
        bare = socket.socket(sock.family, sock.type, sock.proto, fileno=sock.detach())
        self.close()
        self.lingerer(bare, seconds, quiet)

    def _linger_here(self, seconds: float, quiet: float) -> None:
        deadline = time.monotonic() + seconds
        try:
            self.set_timeouts(quiet, quiet)
            while time.monotonic() < deadline and self.read_some(READ_CHUNK):
                pass  # bounded by the deadline; ends early when the peer closes or goes quiet
        except OSError:  # quiet (timeout), reset or gone: either way we are done with it
            pass
        finally:
            self.close()

    def abort(self) -> None:
        """Wake a thread blocked on this socket (force-close at the drain deadline)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError as exc:
            if exc.errno not in (errno.ENOTCONN, errno.EBADF):
                raise

    def __repr__(self) -> str:
        return f"<Connection {self.peer!r} {self.state.name}>"
