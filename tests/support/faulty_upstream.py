"""A scriptable raw-socket upstream: each accepted connection runs a list of steps.

    FaultyUpstream([HEAD, BODY, write(b"HTTP/1.1 200 OK\\r\\n..."), FIN]).start()
    FaultyUpstream(lambda index: steps_for_connection(index))

Steps: ``HEAD`` (read up to the end of a request head; counts an execution), ``BODY`` (read the
Content-Length body of that head), ``read(n)``, ``sleep(s)`` (bounded, wakes at stop), ``write(b)``,
``drip(b, gap)`` (one byte per gap), ``FIN`` (close), ``RST`` (close with SO_LINGER 0), ``HANG``
(hold until stop), ``LOOP`` (start the steps again: a keep-alive server). Every socket operation
has a timeout; stop() releases every hang.
"""

from __future__ import annotations

import socket

from tests.support.backends import BACKEND_SOCKET_TIMEOUT, LoopbackAcceptor, MAX_HEAD, close_with_rst, content_length

MAX_LOOPS = 1000  # a LOOP script serves at most this many requests per connection

HEAD, BODY, FIN, RST, HANG, LOOP = "head", "body", "fin", "rst", "hang", "loop"


def read(count: int) -> tuple:
    return ("read", count)


def sleep(seconds: float) -> tuple:
    return ("sleep", seconds)


def write(data: bytes) -> tuple:
    return ("write", data)


def drip(data: bytes, gap: float) -> tuple:
    return ("drip", data, gap)


def ok_response(body: bytes = b"ok", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%b\r\n%b" % (len(body), extra, body)


class _Peer:
    def __init__(self, sock: socket.socket, upstream: "FaultyUpstream"):
        self.sock = sock
        self.upstream = upstream
        self.buffer = b""
        self.last_head = b""

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError
        return data

    def read_head(self) -> None:
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._recv()
            if len(self.buffer) > MAX_HEAD:
                raise EOFError
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        self.last_head = head
        self.upstream.record(head)

    def read_body(self) -> None:
        length = content_length(self.last_head)
        while len(self.buffer) < length:
            self.buffer += self._recv()
        self.upstream.record_body(self.buffer[:length])
        self.buffer = self.buffer[length:]

    def read(self, count: int) -> None:
        while len(self.buffer) < count:
            self.buffer += self._recv()
        self.buffer = self.buffer[count:]

    def run(self, steps) -> None:
        for _ in range(MAX_LOOPS):
            for step in steps:
                if self._step(step):
                    return
            if not steps or steps[-1] != LOOP:
                return

    def _step(self, step) -> bool:
        """Run one step; True when the connection is finished."""
        kind = step if isinstance(step, str) else step[0]
        stop = self.upstream.stop_event
        if kind == HEAD:
            self.read_head()
        elif kind == BODY:
            self.read_body()
        elif kind == "read":
            self.read(step[1])
        elif kind == "sleep":
            stop.wait(step[1])
        elif kind == "write":
            self.sock.sendall(step[1])
        elif kind == "drip":
            for index in range(len(step[1])):
                self.sock.sendall(step[1][index:index + 1])
                if stop.wait(step[2]):
                    return True
        elif kind == FIN:
            self.sock.close()
            return True
        elif kind == RST:
            close_with_rst(self.sock)
            return True
        elif kind == HANG:
            stop.wait(BACKEND_SOCKET_TIMEOUT)
            return True
        return False


class FaultyUpstream(LoopbackAcceptor):
    def __init__(self, steps):
        super().__init__("faulty")
        self.steps = steps if callable(steps) else (lambda index: steps)
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []

    @property
    def executions(self) -> int:
        with self._lock:
            return len(self.heads)

    def record(self, head: bytes) -> None:
        with self._lock:
            self.heads.append(head)

    def record_body(self, body: bytes) -> None:
        with self._lock:
            self.bodies.append(body)

    def _serve(self, sock: socket.socket, index: int) -> None:
        try:
            _Peer(sock, self).run(self.steps(index))
        except (OSError, EOFError):
            pass  # the proxy closed on us: usually what the test provokes
        finally:
            sock.close()
