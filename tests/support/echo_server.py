"""The core tests' server: a tiny line-echo protocol built on core alone, a running-server context
manager and a line client.

The echo protocol: each handler call serves one line (so keep-alive parking happens between lines).
    "quit"  → reply "bye", close
    "slow"  → signal ``slow_entered``, wait for ``slow_release`` (the test controls it), reply "slow"
    "boom"  → raise RuntimeError (the server must keep serving others)
    "stuck" → signal ``stuck_entered``, block on an event nobody sets until the socket is aborted
    "later" → reply "later", and leave core work to run once the connection is parked again: it waits
              for ``later_release``, then signals ``later_done``
    other   → reply the same line
"""

from __future__ import annotations

import contextlib
import socket
import threading

from core import Connection, ConnectionClosed, ConnectionState, SocketServer, ThreadPool

MAX_LINE = 4096  # longest line the echo protocol accepts
LINE_CLIENT_TIMEOUT = 5.0  # every LineClient socket op is bounded by this
STOP_TIMEOUT = 10.0  # serve_forever must return within this after a (forced) shutdown


class EchoHandler:
    """The line-echo handler, with events the tests use to hold or observe a slow exchange."""

    def __init__(self):
        self.slow_entered = threading.Event()
        self.slow_release = threading.Event()
        self.slow_finished = threading.Event()
        self.stuck_entered = threading.Event()
        self.never = threading.Event()  # "stuck" waits on it; nobody sets it
        self.later_release = threading.Event()
        self.later_done = threading.Event()
        self.served = 0
        self._lock = threading.Lock()

    def __call__(self, conn: Connection):
        conn.transition(ConnectionState.READING)
        try:
            line = conn.read_until(b"\n", MAX_LINE)
        except ConnectionClosed:  # the client went away between lines: an ordinary end
            conn.close()
            return
        conn.transition(ConnectionState.PROCESSING)
        reply = self._process(conn, line)
        conn.transition(ConnectionState.WRITING)
        conn.sendall(reply)
        with self._lock:
            self.served += 1
        if line == b"quit\n":
            conn.close()
        else:
            conn.transition(ConnectionState.IDLE)
        if line == b"slow\n":
            self.slow_finished.set()
        if line == b"later\n":
            return self._later
        return None

    def _later(self) -> None:
        if self.later_release.wait(STOP_TIMEOUT):
            self.later_done.set()

    def _process(self, conn: Connection, line: bytes) -> bytes:
        if line == b"boom\n":
            raise RuntimeError("boom requested by the test")
        if line == b"quit\n":
            return b"bye\n"
        if line == b"slow\n":
            self.slow_entered.set()
            if not self.slow_release.wait(STOP_TIMEOUT):
                raise AssertionError("the test never released the slow exchange")
        if line == b"stuck\n":
            self.stuck_entered.set()
            self._wait_until_aborted(conn)
        return line

    def _wait_until_aborted(self, conn: Connection) -> None:
        # Block like a handler waiting on a dead upstream: only the server's abort() ends this.
        conn.set_timeouts(None)
        data = conn.sock.recv(1)  # returns b"" once the server shuts the socket down
        raise ConnectionClosed(f"stuck handler woke up with {data!r}")


def overload_reply(sock: socket.socket) -> None:
    sock.sendall(b"busy\n")


@contextlib.contextmanager
def running_server(handler, **kwargs):
    """A SocketServer on 127.0.0.1:0 running serve_forever in a thread; stopped (forced) on exit."""
    kwargs.setdefault("pool", ThreadPool(min_threads=1, max_threads=16, idle_timeout=5.0))
    server = SocketServer(handler, listeners=[("127.0.0.1", 0)], **kwargs)
    thread = threading.Thread(target=server.serve_forever, name="serve_forever", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        if not server.stopped.is_set():
            server.request_shutdown(force=True)
        thread.join(STOP_TIMEOUT)
        assert not thread.is_alive(), "serve_forever did not return after a forced shutdown"


class LineClient:
    """A raw-socket client of the echo protocol."""

    def __init__(self, address, timeout: float = LINE_CLIENT_TIMEOUT):
        self.sock = socket.create_connection(address[:2], timeout=timeout)
        self._reader = self.sock.makefile("rb")

    def send_line(self, line: bytes) -> None:
        self.sock.sendall(line + b"\n")

    def read_line(self) -> bytes:
        return self._reader.readline()

    def exchange(self, line: bytes) -> bytes:
        self.send_line(line)
        return self.read_line()

    def wait_closed(self) -> bytes:
        """Read until EOF (bounded by the socket timeout); returns whatever arrived before it."""
        rest = b""
        while True:
            try:
                chunk = self._reader.read1(4096)
            except ConnectionResetError:
                return rest
            if not chunk:
                return rest
            rest += chunk

    def close(self) -> None:
        self._reader.close()
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
