"""An upstream that expects a PROXY header (v1 or v2) on every connection, then speaks simple HTTP/1.1.

    backend = ProxyProtocolBackend().start()
    backend.headers        # one ReceivedHeader per accepted connection, in order
    backend.requests       # (connection index, request line) per request served

Its own small parser, independent of proxy.http.proxy_protocol, so a test checks pyproxy's headers
against the spec rather than against pyproxy. Each answer is 200 with the connection's index as body,
keep-alive (over TLS after the header with ``tls_context``), so a test can tell a reused upstream connection from a new one. Everything is bounded.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import struct
import threading
from dataclasses import dataclass

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
SOCKET_TIMEOUT = 10.0
ACCEPT_POLL = 0.05


@dataclass
class ReceivedHeader:
    version: int           # 1 or 2
    command: str           # "PROXY", "LOCAL" (v2) or "UNKNOWN" (v1)
    src: str | None = None
    src_port: int | None = None
    dst: str | None = None
    dst_port: int | None = None


def _read_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        part = sock.recv(count - len(data))
        if not part:
            raise ConnectionError("closed mid-header")
        data += part
    return data


def read_header(sock: socket.socket) -> ReceivedHeader:
    start = _read_exactly(sock, 12)
    if start == V2_SIGNATURE:
        fixed = _read_exactly(sock, 4)
        body = _read_exactly(sock, struct.unpack("!H", fixed[2:])[0])
        assert fixed[0] >> 4 == 2, "v2 version nibble"
        if fixed[0] & 0xF == 0:
            return ReceivedHeader(2, "LOCAL")
        if fixed[1] == 0x11:
            src, dst, sport, dport = struct.unpack("!4s4sHH", body[:12])
        else:
            assert fixed[1] == 0x21, f"family {fixed[1]:#x}"
            src, dst, sport, dport = struct.unpack("!16s16sHH", body[:36])
        return ReceivedHeader(2, "PROXY", str(ipaddress.ip_address(src)), sport,
                              str(ipaddress.ip_address(dst)), dport)
    line = start
    while not line.endswith(b"\r\n"):
        assert len(line) < 107, "v1 line too long"
        line += _read_exactly(sock, 1)
    fields = line[:-2].decode("ascii").split(" ")
    assert fields[0] == "PROXY", line
    if fields[1] == "UNKNOWN":
        return ReceivedHeader(1, "UNKNOWN")
    assert fields[1] in ("TCP4", "TCP6") and len(fields) == 6, line
    return ReceivedHeader(1, "PROXY", fields[2], int(fields[4]), fields[3], int(fields[5]))


class ProxyProtocolBackend:
    def __init__(self, tls_context: ssl.SSLContext | None = None):
        self.tls_context = tls_context  # TLS after the header, as an HTTPS server behind HAProxy
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(ACCEPT_POLL)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.headers: list[ReceivedHeader] = []
        self.requests: list[tuple[int, str]] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._connections: list[socket.socket] = []

    def start(self) -> "ProxyProtocolBackend":
        thread = threading.Thread(target=self._accept_loop, daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            for conn in self._connections:  # ends a serving thread's wait for the next request
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for thread in self._threads:
            thread.join(SOCKET_TIMEOUT)
        self.sock.close()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            with self._lock:
                self._connections.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(SOCKET_TIMEOUT)
        try:
            header = read_header(conn)
            with self._lock:
                index = len(self.headers)
                self.headers.append(header)
            if self.tls_context is not None:
                wrapped = self.tls_context.wrap_socket(conn, server_side=True)
                with self._lock:  # the wrapped socket owns the fd now: stop() must shut that one down
                    self._connections[self._connections.index(conn)] = conn = wrapped
            self._answer_requests(conn, index)
        except (AssertionError, OSError, ValueError) as exc:
            if not self._stop.is_set():
                with self._lock:
                    self.errors.append(repr(exc))
        finally:
            conn.close()

    def _answer_requests(self, conn: socket.socket, index: int) -> None:
        buffer = b""
        while not self._stop.is_set():
            while b"\r\n\r\n" not in buffer:
                part = conn.recv(65536)
                if not part:
                    return
                buffer += part
            head, buffer = buffer.split(b"\r\n\r\n", 1)
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            with self._lock:
                self.requests.append((index, request_line))
            body = str(index).encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
