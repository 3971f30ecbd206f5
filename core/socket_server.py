"""The accept loop: listening sockets, parked keep-alive connections, signals and phased shutdown.

One thread (normally the main thread) runs ``serve_forever``. It waits in one epoll set on:
- the listening sockets (accept, hand the new ``Connection`` over),
- every client connection that is waiting for bytes (NEW or IDLE), registered EPOLLONESHOT so an
  event hands the connection to exactly one worker; a worker re-arms it when it parks the
  connection again, from its own thread (epoll is thread-safe), without waking this loop,
- a self-pipe that signals and other threads use to wake the loop.

Idle connections hold no thread: 10,000 idle keep-alive clients cost memory, not threads (gunicorn
gthread's poller). Shutdown runs in explicit phases with deadlines on ``time.monotonic()`` (gunicorn
``workers/gthread.py``): stop accepting → close resting connections → let in-flight work finish →
force-close at ``graceful_timeout`` → join the threads.
"""

from __future__ import annotations

import errno
import logging
import select
import signal
import socket
import threading
import time
from collections import deque
from typing import Callable, Iterable

from .connection import RESTING_STATES, Connection, ConnectionState, set_socket_timeouts
from .thread_pool import PoolClosed, ThreadPool
from .transfer_relay import Linger, TransferRelay
from .wakeup import WakePipe, ignore_late_signals, restore_wakeup_fd, stops_first

log = logging.getLogger("pyproxy.core.server")

ARMED = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLONESHOT
ACCEPT_BATCH = 64  # accepts per wake-up, so one busy listener cannot starve the rest of the loop
REAP_INTERVAL = 0.5  # seconds between idle-timeout sweeps
# Out of descriptors or memory, accept() fails while the listener stays readable: retried at once it
# would spin the loop and flood the log. The listener rests this long instead, as in nginx.
ACCEPT_PAUSE = 0.5
# Connections shed on a full work queue are logged at most once per this many seconds, with a count:
# an overload sheds thousands, and a line each would add a log flood to it.
SHED_LOG_INTERVAL = 1.0
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
GROW_CHECK_INTERVAL = 0.002  # seconds between pool growth checks while work is queued
HANDBACK_TIMEOUT = 1.0  # at a drain's deadline, the most we wait for the relay to hand held transfers back
STARVED_AFTER = 0.01  # a loop iteration this late (past its poll timeout) means the process was starved
DEFAULT_BACKLOG = 1024  # nginx's default on Linux is 511; bursts of c=1000 clients want more
# RESTING_STATES for the loop's every event: a frozenset of members calls Enum.__hash__ (Python) per
# test, a tuple is scanned by identity.
_RESTING = tuple(RESTING_STATES)
# Members read by every park, as globals: reading an Enum member off its class is a metaclass lookup.
_IDLE, _HELD, _TUNNEL, _CLOSED = (ConnectionState.IDLE, ConnectionState.HELD, ConnectionState.TUNNEL,
                                  ConnectionState.CLOSED)
# errno values that mean "this one client went away", logged at debug (docs/development.md)
EXPECTED_ERRNOS = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ECONNABORTED, errno.ENOTCONN,
                             errno.ETIMEDOUT, errno.EBADF})


def bind_listener(host: str, port: int, backlog: int = DEFAULT_BACKLOG,
                  reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket. Host "" listens on all interfaces (IPv6 dual-stack where possible)."""
    if host in ("", "*"):
        family, address = (socket.AF_INET6, ("::", port)) if socket.has_ipv6 else (socket.AF_INET, ("0.0.0.0", port))
    else:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        family, address = info[0], info[4]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6 and host in ("", "*"):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


OVERLOAD_DRAIN_BYTES = 64 * 1024  # what a rejected client already sent that is read and dropped


def _drop_unread(sock: socket.socket) -> None:
    """Read what a client already sent (without waiting) before closing on it: closing a socket with
    unread bytes sends a reset instead of a FIN, and a reset may destroy the reply before it is read."""
    dropped = 0
    while dropped < OVERLOAD_DRAIN_BYTES:
        try:  # the plain socket's recv, never waiting: a TLS socket's bytes are dropped undecrypted
            data = socket.socket.recv(sock, OVERLOAD_DRAIN_BYTES, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            return
        dropped += len(data)


def _drop_unread_quietly(sock: socket.socket) -> None:
    """Before closing a connection whose client may have sent a request since we last looked (a drain
    closing it): dropping those bytes first makes the close a FIN, not a reset that could destroy the
    end of its previous answer, still on its way."""
    try:
        _drop_unread(sock)
    except OSError:  # reset, gone, or closed already: nothing to protect
        pass


def _close_cleanly(conn: Connection) -> None:
    """Close a connection already moved to CLOSED, with a FIN (see _drop_unread_quietly)."""
    _drop_unread_quietly(conn.sock)
    conn.close_socket()


class Listener:
    """A listening socket and an opaque tag the protocol layer attached to it (e.g. a TLS context)."""

    __slots__ = ("sock", "tag", "address", "timeouts", "_kind")

    def __init__(self, sock: socket.socket, tag=None):
        self.sock = sock
        self.tag = tag
        self.address = sock.getsockname()
        self.timeouts: tuple[float | None, float | None] = (None, None)  # what accepted sockets inherit
        # socket.accept() reads family and type through properties that convert them to enums, four
        # Python-level calls per connection: read once here, they never change.
        self._kind = (sock.family, sock.type, sock.proto)
        # Linux copies TCP_NODELAY from a listening socket to the sockets it accepts: set once here,
        # it saves the accept loop a syscall per connection (and with it a GIL hand-off).
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # not TCP (a unix socket in tests): nothing to tune
            pass

    def accept(self) -> tuple[socket.socket, tuple]:
        """``sock.accept()`` for a non-blocking listening socket, without its per-call lookups."""
        fd, peer = self.sock._accept()
        return socket.socket(*self._kind, fileno=fd), peer

    def pass_on_timeouts(self, read: float | None, write: float | None) -> None:
        """Set the kernel timeouts every accepted socket starts with. Linux copies SO_RCVTIMEO and
        SO_SNDTIMEO from a listening socket to the sockets it accepts, like TCP_NODELAY: set once
        here, the first ``Connection.set_timeouts`` asking for the same values makes no syscall."""
        if (read, write) == self.timeouts:
            return
        set_socket_timeouts(self.sock, read, write)
        self.timeouts = (read, write)


class SocketServer:
    """Accepts connections and hands each to ``handler(conn)`` on a ``ThreadPool`` worker.

    The handler serves the connection and leaves it in one of four states:
    IDLE (keep-alive: the server parks it until more bytes arrive), CLOSED, TUNNEL (the handler
    keeps ownership and closes it later), or HELD (``Connection.hold``: the server's transfer relay
    carries a stalled transfer on, then runs the handler again). Any other state is treated as a bug
    and the socket closed. The handler may return a callable: the worker runs it once the connection
    is parked again (work of the connection's that need not hold up its reading: an HTTP/2 stream).
    """

    def __init__(self, handler: Callable[[Connection], Callable[[], None] | None], listeners: Iterable = (("127.0.0.1", 0),),
                 pool: ThreadPool | None = None, *, max_connections: int = 10000,
                 idle_timeout: float = 75.0, header_timeout: float = 10.0,
                 graceful_timeout: float = 30.0, backlog: int = DEFAULT_BACKLOG,
                 reuse_port: bool = False, on_overload: Callable[[socket.socket], None] | None = None,
                 on_expired: Callable[[Connection], None] | None = None,
                 accepted_timeouts: tuple[float | None, float | None] = (None, None),
                 clock=time.monotonic):
        self.handler = handler
        self.pool = pool or ThreadPool()
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.header_timeout = header_timeout
        self.graceful_timeout = graceful_timeout
        self.on_overload = on_overload
        self.on_expired = on_expired  # non-blocking last words to a connection parked past its deadline
        # (read, write) kernel timeouts accepted sockets start with: the protocol layer's usual ones.
        # Every process sharing a listening socket must pass the same values (a constant, not config).
        self.accepted_timeouts = accepted_timeouts
        # Called on the loop thread for each open connection as a drain starts, for a protocol that can
        # announce it (HTTP/2's GOAWAY); it must not block.
        self.on_drain: Callable[[Connection], None] | None = None
        self.clock = clock
        self.draining = threading.Event()  # the protocol layer reads it: answer with Connection: close
        self._draining = False  # the same, read by every park without a call (set just before it)
        self.stopped = threading.Event()
        self.signal_handlers: dict[int, Callable[[], None]] = {}  # extra per-signal actions, run in the loop
        self._backlog, self._reuse_port = backlog, reuse_port
        self._epoll = select.epoll()
        self._wakeup = WakePipe()
        self._epoll.register(self._wakeup.read_fd, select.EPOLLIN)
        self._listeners: dict[int, Listener] = {}
        self._resting: dict[int, float] = {}  # listener fd -> when it accepts again (out of descriptors)
        self._connections: dict[int, Connection] = {}
        self._lingering = 0  # sockets of closed connections the relay lingers on: max_connections counts them
        self._conn_lock = threading.Lock()
        self._shed_lock = threading.Lock()
        self._shed_logged_at: float | None = None
        self._shed_unlogged = 0  # connections shed since the last warning
        # A connection handed to the pool whose handler has not returned yet is marked ``in_pool``.
        # It may still be in NEW/IDLE (queued, or the handler has not moved it): the reaper and the
        # drain must not take it for a resting one and close it under the worker.
        self._calls: deque[Callable[[], None]] = deque()
        self._pending_signals: deque[int] = deque()
        self._previous_wakeup_fd: int | None = None  # set while signals wake this loop (see install_signal_handlers)
        self._signals_handled: tuple[int, ...] = ()  # by install_signal_handlers
        self._shutdown_requested = False
        self._force = False
        self.transfers = TransferRelay(clock=clock)  # held connections' stalled transfers
        self.accepted_total = 0
        self.overloaded_total = 0
        for item in listeners:
            self.add_listener(item)

    # -- listeners ---------------------------------------------------------------------------
    def add_listener(self, item, tag=None) -> Listener:
        """Add a socket, a (host, port) pair, or a Listener. Safe before serve_forever starts;
        from other threads while it runs, wrap the call in ``call_soon``."""
        if isinstance(item, Listener):
            listener = item
        elif isinstance(item, socket.socket):
            item.setblocking(False)
            listener = Listener(item, tag)
        else:
            host, port = item[0], item[1]
            listener = Listener(bind_listener(host, port, self._backlog, self._reuse_port), tag)
        listener.pass_on_timeouts(*self.accepted_timeouts)
        self._listeners[listener.sock.fileno()] = listener
        self._epoll.register(listener.sock.fileno(), select.EPOLLIN)
        return listener

    def remove_listener(self, listener: Listener, close: bool = True) -> None:
        fd = listener.sock.fileno()
        if self._listeners.pop(fd, None) is not None:
            self._resting.pop(fd, None)
            self._epoll.unregister(fd)
            if close:
                listener.sock.close()

    @property
    def listeners(self) -> list[Listener]:
        return list(self._listeners.values())

    @property
    def addresses(self) -> list[tuple]:
        return [listener.address for listener in self._listeners.values()]

    # -- limits ------------------------------------------------------------------------------
    def set_limits(self, *, max_connections: int | None = None, idle_timeout: float | None = None,
                   header_timeout: float | None = None, graceful_timeout: float | None = None) -> None:
        """Change limits of a running server (a config reload); None keeps a limit. Each is read where
        it applies: max_connections at the next accept, the timeouts at the next reaper sweep (resting
        connections included) and graceful_timeout when a drain starts."""
        if max_connections is not None:
            self.max_connections = max_connections
        if idle_timeout is not None:
            self.idle_timeout = idle_timeout
        if header_timeout is not None:
            self.header_timeout = header_timeout
        if graceful_timeout is not None:
            self.graceful_timeout = graceful_timeout

    # -- counts --------------------------------------------------------------------------------
    def connection_counts(self) -> dict[str, int]:
        """Connections by state name (for metrics: pyproxy_client_connections{state})."""
        counts = {state.value: 0 for state in ConnectionState if state is not ConnectionState.CLOSED}
        with self._conn_lock:
            conns = list(self._connections.values())
        for conn in conns:
            if conn.state is not ConnectionState.CLOSED:
                counts[conn.state.value] += 1
        return counts

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    # -- other threads talk to the loop through these -------------------------------------------
    def call_soon(self, fn: Callable[[], None]) -> None:
        self._calls.append(fn)
        self._wake()

    @property
    def stopping(self) -> bool:
        """A shutdown was asked for; the drain may not have begun yet (signals come in batches)."""
        return self._shutdown_requested

    def request_shutdown(self, force: bool = False) -> None:
        """Begin the graceful drain (idempotent). ``force`` skips waiting for in-flight work."""
        self._force = self._force or force
        self._shutdown_requested = True
        self._wake()

    def _wake(self) -> None:
        self._wakeup.wake()

    # -- signals (the handler only records; the loop acts) ----------------------------------------
    def install_signal_handlers(self, signals=(signal.SIGTERM, signal.SIGINT, signal.SIGHUP)) -> None:
        self._previous_wakeup_fd = signal.set_wakeup_fd(self._wakeup.write_fd, warn_on_full_buffer=False)
        self._signals_handled = tuple(signals)
        for signum in signals:
            signal.signal(signum, self._record_signal)

    def _record_signal(self, signum, frame) -> None:
        self._pending_signals.append(signum)

    def _dispatch_signals(self) -> None:
        if not self._pending_signals:
            return
        batch = []
        while self._pending_signals:  # popped one by one: a handler may append meanwhile
            batch.append(self._pending_signals.popleft())
        for signum in stops_first(batch):
            action = self.signal_handlers.get(signum)
            if action is not None:
                action()
            elif signum in (signal.SIGTERM, signal.SIGINT):
                # A second SIGINT during a drain means "stop now".
                force = self._shutdown_requested and signum == signal.SIGINT
                log.info("received %s: %s", signal.Signals(signum).name,
                         "stopping now" if force else "draining")
                self.request_shutdown(force=force)

    # -- the loop ------------------------------------------------------------------------------
    def serve_forever(self) -> None:
        next_reap = self.clock() + REAP_INTERVAL
        try:
            while not self._shutdown_requested:
                if self.pool.queued:
                    # Work already waits for a busy thread: let ready connections gather in epoll
                    # and take them as one batch once the threads catch up (see wait_for_room).
                    self.pool.wait_for_room(GROW_CHECK_INTERVAL)
                # While work is queued, wake often: the pool may need a thread (maybe_grow).
                self._poll_once(GROW_CHECK_INTERVAL if self.pool.queued else REAP_INTERVAL, watch_starvation=True)
                if self.pool.queued:
                    self.pool.maybe_grow()
                if self.clock() >= next_reap:
                    self._reap_expired()
                    next_reap = self.clock() + REAP_INTERVAL
            self._drain()
        finally:
            self._close_everything()
            self.stopped.set()

    def _note_starvation(self, late: float) -> None:
        """A poll that came back ``late`` (past its timeout) means the process was starved.

        The loop was waiting for a CPU or the GIL: other processes had the cores, our threads were
        runnable, not blocked in I/O, and threads added then only convoy on the GIL (measured with
        two CPU hogs beside wrk -c50: 4 -> 52 threads, p99 100 ms). So that time counts as the
        pool's progress, before this wake-up's dispatches (submit) may grow the pool.
        """
        if late > STARVED_AFTER:
            self.pool.note_progress()

    def _poll_once(self, timeout: float, watch_starvation: bool = False) -> None:
        if self._resting:
            timeout = self._wake_rested_listeners(timeout)
        polled_at = self.clock() if watch_starvation else 0.0
        try:
            events = self._epoll.poll(timeout)
        except InterruptedError:
            events = ()
        if watch_starvation:
            self._note_starvation(self.clock() - polled_at - timeout)
        ready = []
        for fd, mask in events:
            if fd == self._wakeup.read_fd:
                self._wakeup.drain()
            elif fd in self._listeners:
                self._accept(self._listeners[fd])
            else:
                conn = self._connections.get(fd)
                if conn is not None and conn.state in _RESTING:
                    ready.append(conn)
        if ready:
            self._dispatch_all(ready)
        self._dispatch_signals()
        while self._calls:
            self._calls.popleft()()

    def _accept(self, listener: Listener) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    self._rest_listener(listener, exc)
                else:
                    log.warning("accept failed on %s: %s", listener.address, exc)
                return
            self.accepted_total += 1
            if len(self._connections) + self._lingering >= self.max_connections:
                self._reject_overload(sock)
                continue
            # accept4 without SOCK_NONBLOCK already gives a blocking socket; only a process-wide
            # socket.setdefaulttimeout() would make it otherwise. Skipping the call saves a syscall.
            if sock.gettimeout() is not None:
                sock.setblocking(True)
            conn = Connection(sock, peer, clock=self.clock, listener=listener.tag, timeouts=listener.timeouts)
            conn.on_close = self._forget
            conn.lingerer = self._linger
            with self._conn_lock:
                self._connections[conn.fileno_cached] = conn
            self._epoll.register(conn.fileno_cached, ARMED)

    def _rest_listener(self, listener: Listener, exc: OSError) -> None:
        """Stop watching a listener that cannot accept (no descriptors left) for ACCEPT_PAUSE: the
        clients wait in its backlog meanwhile, and the log gets a line per pause, not per retry."""
        fd = listener.sock.fileno()
        self._epoll.modify(fd, 0)  # still registered, reporting nothing
        self._resting[fd] = self.clock() + ACCEPT_PAUSE
        log.warning("accept failed on %s: %s; not accepting new connections for %.1f s",
                    listener.address, exc, ACCEPT_PAUSE)

    def _wake_rested_listeners(self, timeout: float) -> float:
        """Watch rested listeners again once their pause is over; the poll timeout, cut to the next end."""
        now = self.clock()
        for fd, until in list(self._resting.items()):
            if now >= until:
                del self._resting[fd]
                self._epoll.modify(fd, select.EPOLLIN)
            else:
                timeout = min(timeout, until - now)
        return timeout

    def _reject_overload(self, sock: socket.socket) -> None:
        self.overloaded_total += 1
        try:
            if self.on_overload is not None:
                sock.setblocking(False)
                self.on_overload(sock)
                _drop_unread(sock)
        except OSError as exc:
            log.debug("overload reply failed: %s", exc)
        finally:
            sock.close()

    def _dispatch(self, conn: Connection) -> None:
        self._dispatch_all([conn])

    def _dispatch_held(self, conn: Connection) -> None:
        """A held transfer is over: its exchange continues on a worker even when the queue is full
        (closing it then would cut the exchange half done)."""
        conn.in_pool = True
        try:
            self.pool.resubmit(self._serve, conn)
        except PoolClosed:
            self._close_after_workers_stopped(conn, "its transfer ended")

    def _dispatch_all(self, conns: list[Connection]) -> None:
        """Hand connections to the pool in one go (one lock round, not one per connection)."""
        serve = self._serve
        for conn in conns:
            conn.in_pool = True
        try:
            refused = self.pool.submit_all([(serve, (conn,)) for conn in conns])
        except PoolClosed:
            # The drain stopped the workers after its last look at these connections (a worker parked
            # one whose next request came in since): closed unanswered, like any left at a drain's end.
            for conn in conns:
                self._close_after_workers_stopped(conn, "its request came")
            return
        for _, (conn,) in refused:
            conn.in_pool = False
            self._log_shed(conn.peer)
            conn.close()

    def _log_shed(self, peer) -> None:
        """One warning per SHED_LOG_INTERVAL for connections closed on a full queue, counting the rest."""
        with self._shed_lock:
            now = self.clock()
            self._shed_unlogged += 1
            if self._shed_logged_at is not None and now - self._shed_logged_at < SHED_LOG_INTERVAL:
                return
            count, self._shed_unlogged, self._shed_logged_at = self._shed_unlogged, 0, now
        if count == 1:
            log.warning("work queue full: closing connection from %s", peer)
        else:
            log.warning("work queue full: closed %d connections since the last warning (the last from %s)",
                        count, peer)

    @staticmethod
    def _close_after_workers_stopped(conn: Connection, what: str) -> None:
        conn.in_pool = False
        log.info("draining: closing connection from %s, %s after the workers stopped", conn.peer, what)
        _drop_unread_quietly(conn.sock)
        conn.close()

    def _serve(self, conn: Connection) -> None:
        then = None
        try:
            then = self.handler(conn)
        except OSError as exc:
            # ConnectionError covers ConnectionClosed/PeerClosed (a peer left mid-read, errno None):
            # as ordinary as ECONNRESET, so debug, not an error with a traceback per client.
            expected = exc.errno in EXPECTED_ERRNOS or isinstance(exc, (TimeoutError, ConnectionError))
            level = logging.DEBUG if expected else logging.ERROR
            log.log(level, "connection %s: %s", conn.peer, exc, exc_info=level >= logging.ERROR)
            conn.close()
        except Exception:
            log.exception("handler failed on connection %s", conn.peer)
            conn.close()
        conn.in_pool = False
        self.park(conn)
        if then is not None:
            try:
                then()
            except Exception:
                log.exception("work left by the handler of connection %s failed", conn.peer)

    def park(self, conn: Connection) -> None:
        """Put a connection the handler left IDLE back in the selector; close anything else."""
        state = conn.state
        if state is _IDLE:
            if self._draining and conn.park_deadline is None:
                # Drain at a request boundary: a request that already arrived is served (the protocol
                # layer answers it with "Connection: close"); only a connection holding none closes.
                if self._request_pending(conn):
                    self._dispatch(conn)
                elif conn.claim(ConnectionState.IDLE, ConnectionState.CLOSED):
                    _close_cleanly(conn)
                return
            if conn.has_buffered():  # a pipelined request is already here: no need to wait
                self._dispatch(conn)
                return
            try:
                self._epoll.modify(conn.fileno_cached, ARMED)
            except (OSError, ValueError):  # closed by the reaper in the meantime
                conn.close()
        elif state is _HELD:
            self.transfers.hold(conn.held_wait, lambda: self._dispatch_held(conn))
        elif state is not _TUNNEL and state is not _CLOSED:
            conn.close()

    def _linger(self, sock: socket.socket, seconds: float, quiet: float) -> None:
        """A lingering close (``Connection.close_lingering``), carried out by the transfer relay: a
        client that keeps sending after its answer holds a descriptor for a while, not a worker."""
        with self._conn_lock:
            self._lingering += 1
        self.transfers.hold(Linger(sock, self.clock() + seconds, quiet, self.clock), lambda: self._lingered(sock))

    def _lingered(self, sock: socket.socket) -> None:
        sock.close()
        with self._conn_lock:
            self._lingering -= 1

    def _forget(self, conn: Connection) -> None:
        with self._conn_lock:
            if self._connections.get(conn.fileno_cached) is conn:
                del self._connections[conn.fileno_cached]

    def _reap_expired(self) -> None:
        """Close connections that waited too long: NEW past header_timeout, IDLE past idle_timeout."""
        now = self.clock()
        with self._conn_lock:
            conns = [c for c in self._connections.values() if not c.in_pool]
        for conn in conns:
            state = conn.state
            if state not in RESTING_STATES:
                continue
            if conn.park_deadline is not None:  # parked mid-request: its own deadline
                if now >= conn.park_deadline and conn.claim(state, ConnectionState.CLOSED):
                    self._expire(conn)
                continue
            limit = self.header_timeout if state is ConnectionState.NEW else self.idle_timeout
            if now - conn.last_active > limit and conn.claim(state, ConnectionState.CLOSED):
                log.debug("closing %s connection %s after %.1fs", state, conn.peer, limit)
                conn.close_socket()

    def _expire(self, conn: Connection) -> None:
        """A connection parked mid-request ran out of time: the protocol's last word, then close."""
        try:
            if self.on_expired is not None:
                self.on_expired(conn)
        except OSError as exc:
            log.debug("expiry reply to %s failed: %s", conn.peer, exc)
        finally:
            conn.close_socket()

    # -- shutdown ------------------------------------------------------------------------------
    def _drain(self) -> None:
        started = self.clock()
        deadline = started if self._force else started + self.graceful_timeout
        for listener in list(self._listeners.values()):
            self.remove_listener(listener)
        self._draining = True
        self.draining.set()
        log.info("draining: %d connections open", len(self._connections))
        self._announce_drain()
        pending = self._close_resting()
        # Resting connections whose next request already arrived count as work: the loop must stay
        # up to dispatch them (their epoll event), or they would be closed unanswered at the end. So
        # does a busy worker: between letting go of a connection and parking it, it may find the
        # next request there and hand it back to the pool, which must still be running. Lingering
        # closes (held by the relay, no longer connections) get their few seconds to end cleanly.
        while self.clock() < deadline and not self._force and (
                pending or self._active_connections() or self._workers_busy() or self.transfers.held_count):
            self._poll_once(0.05)
            if self.pool.queued:  # as serve_forever does: the drain's own work (GOAWAYs) may be queued
                self.pool.maybe_grow()
            pending = self._close_resting()
        leftover = self._active_connections()
        if leftover:
            log.warning("graceful timeout: force-closing %d connections", len(leftover))
            for conn in leftover:
                conn.abort()
        if leftover or self.transfers.held_count:
            # A held transfer may wait on its other peer (a server between sends): end them all now,
            # so that their exchanges reach the pool, and finish there, before it stops (and a
            # lingering close is cut short, not left open).
            self.transfers.cancel_all(ConnectionAbortedError(errno.ECONNABORTED, "server shutting down"),
                                      timeout=HANDBACK_TIMEOUT)
        remaining = max(0.1, deadline - self.clock()) if not self._force else 0.5
        if not self.pool.shutdown(timeout=min(remaining, 5.0)):
            log.warning("some worker threads did not finish in time")

    def _announce_drain(self) -> None:
        if self.on_drain is None:
            return
        with self._conn_lock:
            conns = list(self._connections.values())
        for conn in conns:
            try:
                self.on_drain(conn)
            except Exception:  # one connection's failure never stops the drain
                log.exception("drain notice to %s failed", conn.peer)

    def _active_connections(self) -> list[Connection]:
        with self._conn_lock:
            conns = list(self._connections.values())
        return [c for c in conns if c.state is not ConnectionState.CLOSED
                and (c.state not in RESTING_STATES or c.in_pool or c.park_deadline is not None)]

    def _workers_busy(self) -> bool:
        counts = self.pool.counts()
        return counts["busy"] > 0 or counts["queued"] > 0

    def _close_resting(self) -> int:
        """Close connections holding no request; one whose next request already arrived is left to
        be served. Returns how many were left that way."""
        with self._conn_lock:
            conns = [c for c in self._connections.values() if not c.in_pool]
        pending = 0
        for conn in conns:
            state = conn.state
            if state in RESTING_STATES:
                if conn.park_deadline is not None:
                    pending += 1  # a request half-way in: let it finish (or meet its deadline)
                elif self._request_pending(conn):
                    pending += 1  # its event is (or will be) dispatched by the loop; it closes after
                elif conn.claim(state, ConnectionState.CLOSED):
                    _close_cleanly(conn)
        return pending

    @staticmethod
    def _request_pending(conn: Connection) -> bool:
        if conn.has_buffered():
            return True
        pending = getattr(conn.sock, "pending", None)
        if pending is not None:  # a TLS socket refuses MSG_PEEK: decrypted bytes, or any on the fd
            if pending() > 0:
                return True
            poller = select.poll()  # not select.select: fds past 1024 are common here
            poller.register(conn.fileno_cached, select.POLLIN)
            return bool(poller.poll(0))
        try:
            return bool(conn.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return False

    def _close_everything(self) -> None:
        for listener in list(self._listeners.values()):
            self.remove_listener(listener)
        with self._conn_lock:
            conns = list(self._connections.values())
        for conn in conns:
            conn.close()
        self.transfers.stop()
        self._epoll.close()
        if self._previous_wakeup_fd is not None:
            ignore_late_signals(self._signals_handled)  # a reload now would meet no loop, then kill the exit
            # Before the pipe closes: a signal now would write to whatever file reuses its number.
            restore_wakeup_fd(self._previous_wakeup_fd)
        self._wakeup.close()
