"""Raw-socket clients: read a proxy's responses byte for byte, framing and all.

    with raw_client(proxy) as raw:          # proxy: anything with connect() -> socket
        raw.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        response = raw.read_response()      # RawResponse: status, headers, body, framing
"""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass, field


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    head: bytes = b""
    framing: str = ""  # "length" | "chunked" | "close" | "none"
    interim: list[int] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        lname = name.lower()
        for key, value in self.headers:
            if key.lower() == lname:
                return value
        return None


class RawClient:
    """A client socket that reads responses one by one (keeps extra bytes for the next one)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buffer += data
        return bool(data)

    def read_head(self) -> bytes:
        while b"\r\n\r\n" not in self.buffer:
            if not self._fill():
                raise ConnectionError(f"closed before a full response head: {self.buffer[:200]!r}")
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        return head + b"\r\n\r\n"

    def read_response(self, method: str = "GET", skip_interim: bool = True) -> RawResponse:
        interim = []
        while True:
            head = self.read_head()
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ")[1])
            headers = [tuple(part.strip() for part in line.split(":", 1)) for line in lines[1:] if line]
            if 100 <= status < 200 and skip_interim and status != 101:
                interim.append(status)
                continue
            break
        response = RawResponse(status, headers, b"", head, interim=interim)
        te = (response.header("Transfer-Encoding") or "").lower()
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            response.framing = "none"
        elif "chunked" in te:
            response.framing, response.body = "chunked", self._read_chunked()
        elif response.header("Content-Length") is not None:
            response.framing = "length"
            response.body = self.read_exact(int(response.header("Content-Length")))
        else:
            response.framing = "close"
            while self._fill():
                pass
            response.body, self.buffer = self.buffer, b""
        return response

    def read_exact(self, count: int) -> bytes:
        while len(self.buffer) < count:
            if not self._fill():
                raise ConnectionError(f"closed with {count - len(self.buffer)} body bytes missing")
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def _read_line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            if not self._fill():
                raise ConnectionError("closed inside a chunked body")
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def _read_chunked(self) -> bytes:
        body = bytearray()
        while True:
            size = int(self._read_line().split(b";")[0], 16)
            if size == 0:
                while self._read_line():
                    pass
                return bytes(body)
            body += self.read_exact(size)
            self._read_line()

    def at_eof(self) -> bool:
        """True once the proxy closed the connection (reads b"" or a reset), with no stray bytes."""
        if self.buffer:
            return False
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True


def read_small_answer(sock: socket.socket) -> bytes:
    """Everything until the peer closes, for small answers (error pages); a reset ends it too."""
    data = b""
    try:
        for _ in range(64):  # bounded: an error response is small
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
    except OSError:
        pass
    return data


@contextlib.contextmanager
def raw_client(proxy):
    """A ``RawClient`` on a new connection to ``proxy`` (anything with ``connect()``), closed on exit."""
    sock = proxy.connect()
    try:
        yield RawClient(sock)
    finally:
        sock.close()


def read_response(sock: socket.socket) -> bytes:
    """One response with a Content-Length body, read from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


# -- hot reload --------------------------------------------------------------------------------------
