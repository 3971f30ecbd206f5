"""A raw recording upstream for the conformance suite.

It accepts connections, keeps every byte it receives (in arrival order, across connections), splits
them into requests with its own deliberately *strict and independent* framing (not proxy.http1: the
thing under test must not grade itself), and answers each complete request with a fixed
``200`` + ``Content-Length``. Bytes it cannot frame are kept as an unframed tail, so a test sees them.
"""

from __future__ import annotations

import re
import select
import socket
from dataclasses import dataclass

from tests.support.backends import LoopbackAcceptor

RECV_SIZE = 65536
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
ANSWER_NO_BODY = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"
# Canonical chunked framing as the proxy re-encodes it: lowercase hex without leading zeros or
# extensions, CRLF everywhere, an empty trailer section.
_CHUNK_LINE = re.compile(rb"([1-9a-f][0-9a-f]*|0)\r\n")


@dataclass
class Received:
    head: bytes          # request line + header lines + the empty line
    body: bytes          # decoded body
    raw_body: bytes      # the body bytes as they were framed on the wire

    @property
    def method(self) -> bytes:
        return self.head.split(b" ", 1)[0]


class FramingError(ValueError):
    """The upstream got bytes that are not canonical HTTP/1.1 framing."""


def _header(head: bytes, name: bytes) -> list[bytes]:
    found = []
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.lower() == name:
            found.append(value.strip(b" \t"))
    return found


def split_message(data: bytes) -> tuple[Received, bytes] | None:
    """One complete request from the front of ``data`` and the rest; None if incomplete.

    Raises FramingError for anything not canonical: the proxy must only send what every parser
    reads the same way.
    """
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    head, rest = data[: end + 4], data[end + 4:]
    if re.search(rb"\r(?!\n)|(?<!\r)\n", head):
        raise FramingError(f"bare CR or LF in forwarded head: {head!r}")
    te, cl = _header(head, b"transfer-encoding"), _header(head, b"content-length")
    if te and cl:
        raise FramingError("forwarded both Transfer-Encoding and Content-Length")
    if te:
        if te != [b"chunked"]:
            raise FramingError(f"non-canonical Transfer-Encoding: {te!r}")
        return _split_chunked(head, rest)
    if len(cl) > 1 or (cl and not cl[0].isdigit()):
        raise FramingError(f"non-canonical Content-Length: {cl!r}")
    length = int(cl[0]) if cl else 0
    if len(rest) < length:
        return None
    return Received(head, rest[:length], rest[:length]), rest[length:]


def _split_chunked(head: bytes, data: bytes) -> tuple[Received, bytes] | None:
    body = bytearray()
    position = 0
    while True:
        line_end = data.find(b"\r\n", position)
        if line_end < 0:
            return None
        match = _CHUNK_LINE.fullmatch(data, position, line_end + 2)
        if match is None:
            raise FramingError(f"non-canonical chunk size line: {data[position:line_end + 2]!r}")
        size = int(match.group(1), 16)
        position = line_end + 2
        if size == 0:
            if len(data) < position + 2:
                return None
            if data[position:position + 2] != b"\r\n":
                raise FramingError("trailers forwarded (the proxy drops request trailers)")
            position += 2
            return Received(head, bytes(body), data[:position]), data[position:]
        if len(data) < position + size + 2:
            return None
        body += data[position:position + size]
        if data[position + size:position + size + 2] != b"\r\n":
            raise FramingError("chunk data not followed by CRLF")
        position += size + 2


class RecordingUpstream(LoopbackAcceptor):
    """Records and answers; ``reset()`` between cases, ``snapshot()`` to read."""

    def __init__(self) -> None:
        super().__init__("recorder")
        self._received: list[Received] = []
        self._errors: list[str] = []
        self._aborted: list[bytes] = []  # partial messages the proxy abandoned (it closed mid-message)
        self._partial: dict[int, int] = {}  # connection id -> unframed bytes held right now
        self._reading: set[int] = set()  # connections whose bytes (or close) are being taken in

    def reset(self) -> None:
        with self._lock:
            self._received.clear()
            self._errors.clear()
            self._aborted.clear()

    def snapshot(self) -> tuple[list[Received], list[str]]:
        with self._lock:
            return list(self._received), list(self._errors)

    @property
    def aborted(self) -> list[bytes]:
        """Incomplete messages followed by a close: streamed, then abandoned, never executed."""
        with self._lock:
            return list(self._aborted)

    @property
    def holding_partial(self) -> bool:
        """Some connection holds bytes of an incomplete message, or has bytes or a close not taken in
        yet, or waits to be accepted (poll until False to settle). Without the last two, a close the
        proxy sent at the end of one case could be recorded as an abort during the next one."""
        with self._lock:
            if any(self._partial.values()) or self._reading:
                return True
            sockets = [sock for sock in self._sockets if sock.fileno() != -1]
        try:
            return bool(select.select(sockets + [self.listener], [], [], 0)[0])
        except (OSError, ValueError):  # one closed meanwhile: not settled yet, ask again
            return True

    def _serve(self, sock: socket.socket, index: int) -> None:
        pending = b""
        key = id(sock)
        try:
            while not self.stop_event.is_set():
                if not select.select([sock], [], [], sock.gettimeout())[0]:
                    break  # idle past the backend timeout, as a timed-out recv would
                with self._lock:  # readable until taken in: holding_partial sees one or the other
                    self._reading.add(key)
                data = sock.recv(RECV_SIZE)
                if not data:
                    break
                with self._lock:
                    self._partial[key] = len(pending) + len(data)
                pending = self._answer_complete(sock, pending + data)
                with self._lock:
                    self._partial[key] = len(pending)
                    self._reading.discard(key)
        except OSError:
            pass  # the proxy closed or reset the pooled connection: fine, we record what came
        except FramingError as exc:
            with self._lock:
                self._errors.append(str(exc))
        finally:
            sock.close()
            with self._lock:
                if pending:
                    self._aborted.append(pending)
                self._partial.pop(key, None)
                self._reading.discard(key)

    def _answer_complete(self, sock: socket.socket, pending: bytes) -> bytes:
        while True:
            found = split_message(pending)
            if found is None:
                return pending
            message, pending = found
            with self._lock:
                self._received.append(message)
            sock.sendall(ANSWER_NO_BODY if message.method == b"HEAD" else ANSWER)
