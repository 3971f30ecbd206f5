"""Real backends for integration tests: a scripted HTTP/1.1 server and a raw-socket misbehaver.

``ScriptedBackend`` is the standard library's ``ThreadingHTTPServer`` speaking HTTP/1.1 with keep-alive.
It counts the TCP connections it accepted, records every request (method, path, headers, body) and
answers from a table of path handlers (``backend.route(path, fn)``); without a matching route it
echoes: 200 with the request body and ``X-Echo-Method``/``X-Echo-Path`` headers.

``RawBackend`` accepts connections and runs a script per connection on its own thread: the script
gets a ``RawPeer`` that reads a request head, sends bytes, hangs, closes or resets (SO_LINGER 0).

Three small named backends answer with who they are: ``FlakyBackend`` (health checks that fail or
hang on demand, kill() and revive() on the same port), ``NamedBackend`` (an ``X-Backend`` header and a
/slow path the test releases; for the subprocess proxies) and ``JsonEchoServer`` (a JSON body naming
itself and the request it saw; for the ``pyproxy`` command tests).
Everything is bounded: every socket has a timeout, every hang waits on an event released at stop().
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import struct
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BACKEND_SOCKET_TIMEOUT = 10.0  # no backend socket operation waits longer than this
HANG_LIMIT = 10.0  # a hanging FlakyBackend handler gives up after this (tests release it sooner)
FLAKY_STOP_TIMEOUT = 5.0
RECORD_BODY_LIMIT = 1024 * 1024  # bodies above this are recorded by length and digest only
STREAM_PIECE = 256 * 1024  # generated bodies are written in pieces this size
MAX_HEAD = 64 * 1024
ACCEPT_POLL = 0.05  # how often an accept loop looks at its stop event


@dataclass
class RecordedRequest:
    method: str
    path: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    body_length: int = 0
    body_sha256: str = ""
    chunked: bool = False

    def header(self, name: str) -> str | None:
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        lname = name.lower()
        return [value for key, value in self.headers if key.lower() == lname]


def pattern_bytes(offset: int, size: int) -> bytes:
    """Deterministic, position-dependent content: a dropped or duplicated piece changes the digest."""
    block = bytes(range(251))  # prime length: pieces never line up with power-of-two buffers
    start = offset % 251
    repeats = (start + size) // 251 + 1
    return (block * repeats)[start:start + size]


def pattern_sha256(total: int) -> str:
    digest = hashlib.sha256()
    for offset in range(0, total, STREAM_PIECE):
        digest.update(pattern_bytes(offset, min(STREAM_PIECE, total - offset)))
    return digest.hexdigest()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, format, *args):  # noqa: A002 - quiet: tests read records, not logs
        pass

    def setup(self):
        super().setup()
        self.connection.settimeout(BACKEND_SOCKET_TIMEOUT)

    def handle_one_request(self):
        super().handle_one_request()
        if self.server.backend.close_after_response:
            self.close_connection = True  # close without saying so (no Connection: close)

    def _dispatch(self):
        backend = self.server.backend
        fn = backend.routes.get(self.path.split("?", 1)[0])
        if fn is not None and getattr(fn, "raw_body", False):
            record = self._record(b"", 0, "", self._is_chunked())
            backend.record(record)
            fn(self, record)
            return
        record = self.read_body_and_record()
        backend.record(record)
        (fn or echo)(self, record)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_OPTIONS = do_PATCH = _dispatch

    # -- request bodies ------------------------------------------------------------------------
    def _is_chunked(self) -> bool:
        return "chunked" in (self.headers.get("Transfer-Encoding") or "").lower()

    def iter_body(self):
        """The request body in pieces (Content-Length or chunked)."""
        if self._is_chunked():
            while True:
                size_line = self.rfile.readline(MAX_HEAD)
                if not size_line:
                    raise ConnectionError("client closed before a chunk's size line")
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline(MAX_HEAD) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                remaining = size
                while remaining:
                    piece = self.rfile.read(min(remaining, STREAM_PIECE))
                    if not piece:
                        raise ConnectionError("client closed mid-chunk")
                    remaining -= len(piece)
                    yield piece
                self.rfile.readline(MAX_HEAD)
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining:
                piece = self.rfile.read(min(remaining, STREAM_PIECE))
                if not piece:
                    raise ConnectionError("client closed mid-body")
                remaining -= len(piece)
                yield piece

    def read_body_and_record(self) -> RecordedRequest:
        digest = hashlib.sha256()
        kept = bytearray()
        length = 0
        for piece in self.iter_body():
            digest.update(piece)
            length += len(piece)
            if len(kept) <= RECORD_BODY_LIMIT:
                kept += piece
        body = bytes(kept) if length <= RECORD_BODY_LIMIT else b""
        return self._record(body, length, digest.hexdigest(), self._is_chunked())

    def _record(self, body, length, sha, chunked) -> RecordedRequest:
        return RecordedRequest(self.command, self.path, self.request_version, list(self.headers.items()),
                               body, length, sha, chunked)

    # -- response helpers ----------------------------------------------------------------------
    def reply(self, status: int, body: bytes = b"", headers: tuple = ()) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        if status not in (204, 304) and not any(n.lower() == "content-length" for n, _ in headers):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and status not in (204, 304):
            self.wfile.write(body)


def echo(h: _Handler, record: RecordedRequest) -> None:
    h.reply(200, record.body, (("X-Echo-Method", record.method), ("X-Echo-Path", record.path),
                               ("X-Echo-Length", str(record.body_length))))


def stream_pattern(total: int):
    """A route handler: ``total`` pattern bytes generated on the fly, framed by Content-Length."""
    def handler(h: _Handler, record: RecordedRequest) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(total))
        h.end_headers()
        for offset in range(0, total, STREAM_PIECE):
            h.wfile.write(pattern_bytes(offset, min(STREAM_PIECE, total - offset)))
    return handler


def stream_pattern_chunked(total: int):
    """A route handler: ``total`` pattern bytes generated on the fly, sent chunked."""
    def handler(h: _Handler, record: RecordedRequest) -> None:
        h.send_response(200)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        for offset in range(0, total, STREAM_PIECE):
            piece = pattern_bytes(offset, min(STREAM_PIECE, total - offset))
            h.wfile.write(b"%x\r\n" % len(piece) + piece + b"\r\n")
        h.wfile.write(b"0\r\n\r\n")
    return handler


def consume_and_digest(h: _Handler, record: RecordedRequest) -> None:
    """A route handler for huge uploads: digest the body while reading it, answer length and digest."""
    digest = hashlib.sha256()
    length = 0
    for piece in h.iter_body():
        digest.update(piece)
        length += len(piece)
    record.body_length, record.body_sha256 = length, digest.hexdigest()
    h.reply(200, f"{length} {record.body_sha256}".encode())


consume_and_digest.raw_body = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    backend: "ScriptedBackend"

    def process_request(self, request, client_address):
        self.backend.count_connection(request)
        super().process_request(request, client_address)

    def handle_error(self, request, client_address):
        import sys
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return  # the proxy closed on us: often exactly what a test provokes
        super().handle_error(request, client_address)

    def shutdown_request(self, request):
        super().shutdown_request(request)
        self.backend.count_closed()


class ScriptedBackend:
    def __init__(self, close_after_response: bool = False):
        self.routes: dict = {}
        self.requests: list[RecordedRequest] = []
        self.connections = 0
        self.closed_connections = 0  # connections whose handler finished (peer closed or we did)
        self.close_after_response = close_after_response
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.server.backend = self
        self.port = self.server.server_address[1]
        self.address = f"127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"backend-{self.port}", daemon=True)

    def route(self, path: str, fn) -> "ScriptedBackend":
        self.routes[path] = fn
        return self

    def record(self, record: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(record)

    def count_connection(self, sock: socket.socket) -> None:
        with self._lock:
            self.connections += 1
            self._sockets.append(sock)

    def count_closed(self) -> None:
        with self._lock:
            self.closed_connections += 1

    def start(self) -> "ScriptedBackend":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            _shutdown_quietly(sock)
        self._thread.join(5)

    @property
    def last(self) -> RecordedRequest:
        with self._lock:
            return self.requests[-1]


def started_until_teardown(kind):
    """A fixture body: yields a factory that starts ``kind(...)`` servers; all are stopped at teardown."""
    started = []

    def factory(*args, **kwargs):
        server = kind(*args, **kwargs).start()
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


def _shutdown_quietly(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed by either side
        pass


def close_with_rst(sock: socket.socket) -> None:
    """Close with RST instead of FIN (SO_LINGER on with a zero timeout)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def content_length(head: bytes) -> int:
    """The Content-Length of a request head, 0 without one (tests send raw upstreams only those)."""
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    return length


class LoopbackAcceptor:
    """A listener on 127.0.0.1:0 running ``_serve(sock, index)`` on a thread per accepted connection.

    Subclasses implement ``_serve`` (and close the socket there). ``index`` is 0 for the first
    connection; ``connections`` counts them. stop() shuts every accepted socket down so blocked
    reads return, then joins the threads: everything is bounded.
    """

    def __init__(self, name: str):
        self.stop_event = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(ACCEPT_POLL)
        self.port = self.listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.connections = 0
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._accepter = threading.Thread(target=self._accept_loop, name=f"{name}-{self.port}", daemon=True)

    def start(self):
        self._accepter.start()
        return self

    def _serve(self, sock: socket.socket, index: int) -> None:
        raise NotImplementedError

    def _accept_loop(self) -> None:
        while not self.stop_event.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(BACKEND_SOCKET_TIMEOUT)
            with self._lock:
                index = self.connections
                self.connections += 1
                self._sockets.append(sock)
            thread = threading.Thread(target=self._serve, args=(sock, index), daemon=True)
            self._threads.append(thread)
            thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self._accepter.join(5)
        self.listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            _shutdown_quietly(sock)
        for thread in self._threads:
            thread.join(5)


# -- raw-socket backend ------------------------------------------------------------------------
class RawPeer:
    """One accepted connection, driven by a test script."""

    def __init__(self, sock: socket.socket, index: int, stop_event: threading.Event):
        self.sock = sock
        self.index = index  # 0 for the first connection the backend accepted
        self.stop_event = stop_event
        self.buffer = b""
        sock.settimeout(BACKEND_SOCKET_TIMEOUT)

    def read_head(self) -> bytes:
        """Bytes up to and including the blank line; b"" if the peer closed first."""
        while b"\r\n\r\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                return b""
            self.buffer += data
            if len(self.buffer) > MAX_HEAD:
                raise ValueError("request head too large")
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        return head + b"\r\n\r\n"

    def read_request(self) -> tuple[bytes, bytes]:
        """(head, body) with a Content-Length body (tests send only those to raw backends)."""
        head = self.read_head()
        length = content_length(head)
        while len(self.buffer) < length:
            data = self.sock.recv(65536)
            if not data:
                break
            self.buffer += data
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return head, body

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def hang(self) -> None:
        """Hold the connection open, saying nothing, until the backend stops."""
        self.stop_event.wait(BACKEND_SOCKET_TIMEOUT)

    def close(self) -> None:
        self.sock.close()

    def reset(self) -> None:
        """Close with RST instead of FIN (SO_LINGER with a zero timeout)."""
        close_with_rst(self.sock)


class RawBackend(LoopbackAcceptor):
    """Accepts connections and runs ``script(peer)`` for each on its own thread."""

    def __init__(self, script):
        super().__init__("raw")
        self.script = script
        self.errors: list[BaseException] = []

    def _serve(self, sock: socket.socket, index: int) -> None:
        peer = RawPeer(sock, index, self.stop_event)
        try:
            self.script(peer)
        except OSError as exc:  # the proxy closed on us: often exactly what the test provokes
            self.errors.append(exc)
        finally:
            try:
                peer.sock.close()
            except OSError:
                pass


def upgrade_then_echo(peer: RawPeer) -> None:
    """A raw script: answer the upgrade request with 101, then echo what comes until the proxy closes."""
    if not peer.read_head():
        return
    peer.send(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    for _ in range(1000):  # bounded: ends when the proxy closes the tunnel
        data = peer.sock.recv(65536)
        if not data:
            return
        peer.send(data)


def serve_once_then_drop_next(executions: list, reset: bool = False):
    """A raw script: the first request on a connection is answered with keep-alive; the second is read
    fully, its method appended to ``executions``, then dropped without a response byte (the keep-alive
    race) by a FIN, or by a RST when ``reset``."""
    def script(peer: RawPeer) -> None:
        head, _ = peer.read_request()
        if not head:
            return
        executions.append(head.split(b" ")[0])
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        head, _ = peer.read_request()
        if head:
            executions.append(head.split(b" ")[0])
            if reset:
                peer.reset()
            else:
                peer.close()
    return script


# -- a backend that misbehaves on demand (health checks) ---------------------------------------------
class _FlakyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # head and body go in two writes: no 40 ms Nagle/delayed-ACK stall

    def log_message(self, format, *args):  # noqa: A002
        pass

    def do_GET(self):  # noqa: N802
        backend: FlakyBackend = self.server.backend
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            backend.count("health")
            if backend.hang_health:
                backend.release.wait(HANG_LIMIT)
            self._reply(backend.health_status, b"health")
        elif path == "/slow":
            backend.count("slow")
            backend.slow_entered.set()
            backend.release.wait(HANG_LIMIT)
            self._reply(200, b"slow " + backend.name.encode())
        else:
            backend.count("traffic")
            self._reply(200, backend.name.encode())

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))  # read and forget: keep-alive stays sane
        self.server.backend.count("traffic")
        self._reply(200, self.server.backend.name.encode())

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _FlakyServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def process_request(self, request, client_address):
        self.backend.track(request)
        super().process_request(request, client_address)

    def handle_error(self, request, client_address):
        pass  # killed connections are what these tests provoke


class FlakyBackend:
    """HTTP backend whose health path can fail (health_status) or hang; kill() and revive() keep the port."""

    def __init__(self, name: str):
        self.name = name
        self.health_status = 200
        self.hang_health = False
        self.release = threading.Event()
        self.slow_entered = threading.Event()
        self.counts = {"health": 0, "traffic": 0, "slow": 0}
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.port = 0
        self._server = None
        self._thread = None
        self.revive()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def count(self, kind: str) -> None:
        with self._lock:
            self.counts[kind] += 1

    def get(self, kind: str) -> int:
        with self._lock:
            return self.counts[kind]

    def track(self, sock) -> None:
        with self._lock:
            self._sockets.append(sock)

    def revive(self) -> None:
        self._server = _FlakyServer(("127.0.0.1", self.port), _FlakyHandler)
        self._server.backend = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True, name=f"flaky-{self.name}")
        self._thread.start()

    def kill(self) -> None:
        """Stop accepting, close the listener, cut every open connection (as a crash would)."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the peer
        self._thread.join(FLAKY_STOP_TIMEOUT)
        self._server = None


# -- a named backend with a slow path (the subprocess proxies' tests) --------------------------------
NAMED_HOLD_LIMIT = 10.0  # a held /slow response is released after this whatever happens
SLOW_BODY = 256 * 1024  # the size of a /slow answer


class _NamedHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # head and body are two writes: Nagle + delayed ACK would add 40 ms

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        backend: NamedBackend = self.server.backend
        backend.count()
        if self.path.startswith("/slow"):
            backend.slow_entered.set()
            backend.release.wait(NAMED_HOLD_LIMIT)
            body = b"x" * SLOW_BODY
        else:
            body = backend.name.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Backend", backend.name)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args) -> None:  # noqa: A002
        return


class NamedBackend:
    """A keep-alive HTTP/1.1 backend answering its name; /slow holds until ``release`` is set."""

    def __init__(self, name: str, host: str = "127.0.0.1", port: int = 0):
        self.name = name
        self.requests = 0
        self.slow_entered = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer((host, port), _NamedHandler)
        self.httpd.daemon_threads = True
        self.httpd.backend = self
        self.port = self.httpd.server_address[1]
        self.address = f"{host}:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    def count(self) -> None:
        with self._lock:
            self.requests += 1

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@contextlib.contextmanager
def named_backends(*names):
    """``NamedBackend``s, started now and stopped when the block ends."""
    started = [NamedBackend(name) for name in names]
    try:
        yield started
    finally:
        for backend in started:
            backend.stop()


# -- a JSON echo backend (the pyproxy command's tests) --------------------------------------------------
class _JsonEchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802
        body = json.dumps({"name": self.server.name, "path": self.path,
                           "host": self.headers.get("Host")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        """Quiet in test output."""


class JsonEchoServer(ThreadingHTTPServer):
    """Answers every GET with JSON naming itself and the request: {"name", "path", "host"}."""

    daemon_threads = True

    def __init__(self, name: str):
        super().__init__(("127.0.0.1", 0), _JsonEchoHandler)
        self.name = name

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_port}"
