"""The PROXY protocol (HAProxy's, versions 1 and 2): a balancer in front of us tells us who its client was.

A load balancer that relays TCP (AWS NLB, HAProxy in TCP mode) hides the client: our peer is the
balancer. With the PROXY protocol it writes one header before anything else on the connection, carrying
the client's address and port and the address it was connected to. Version 1 is a text line of at most
107 bytes (``PROXY TCP4 src dst sport dport\\r\\n``), version 2 a binary block behind a 12-byte
signature that no other protocol starts with. The receiver must know that the header comes (it cannot
guess), so it is a per-listener setting, and only believed from trusted peers (docs/hardening.md).

Parsing is sans-IO (``header_length``, ``parse_header``); ``HeaderReader`` takes a header off a socket
byte-exactly, without ever reading past it: what follows belongs to TLS or HTTP. ``build_header`` writes
one for an upstream (``send_proxy_protocol``).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
import threading
import time
from dataclasses import dataclass

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED_BYTES = 16  # signature, version/command, family/transport, length
V1_PREFIX = b"PROXY "
V1_MAX_BYTES = 107  # the spec's limit, CRLF included ("PROXY UNKNOWN" with two full IPv6 addresses)
V2_LOCAL, V2_PROXY = 0x0, 0x1
V2_TCP4, V2_TCP6 = 0x11, 0x21  # family (high nibble: 1 INET, 2 INET6) and transport (low: 1 STREAM)
_V2_ADDRESS_BYTES = {V2_TCP4: 12, V2_TCP6: 36}
PEEK_BYTES = 512  # one look at what has arrived; a longer v2 header (TLVs) is taken in several turns
_PEEK_NOWAIT = socket.MSG_PEEK | socket.MSG_DONTWAIT


class ProxyHeaderError(ValueError):
    """The bytes at the start of the connection are not a valid PROXY header."""


@dataclass(frozen=True, slots=True)
class Origin:
    """The connection as the client made it: its address and port, and the address it connected to."""

    src_ip: str
    src_port: int
    dst_ip: str
    dst_port: int


# -- reading ----------------------------------------------------------------------------------------

def header_length(data: bytes) -> int | None:
    """How long the header starting ``data`` is; None while too little has arrived to tell.
    Raises ProxyHeaderError as soon as the bytes cannot be the start of a header."""
    if data[:12] == V2_SIGNATURE:
        if len(data) < V2_FIXED_BYTES:
            return None
        return V2_FIXED_BYTES + int.from_bytes(data[14:16], "big")
    if len(data) < 12 and V2_SIGNATURE.startswith(data):
        return None
    if data[:6] == V1_PREFIX or (len(data) < 6 and V1_PREFIX.startswith(data)):
        end = data.find(b"\n", 0, V1_MAX_BYTES)
        if end >= 0:
            return end + 1
        if len(data) >= V1_MAX_BYTES:
            raise ProxyHeaderError(f"v1 header longer than {V1_MAX_BYTES} bytes")
        return None
    raise ProxyHeaderError(f"no PROXY header: the connection starts with {bytes(data[:16])!r}")


def parse_header(header: bytes) -> Origin | None:
    """The origin a whole header carries; None when it says to keep the peer's address (v2 LOCAL, an
    unspecified or non-TCP family, v1 UNKNOWN)."""
    if header[:12] == V2_SIGNATURE:
        return _parse_v2(header)
    return _parse_v1(header)


def _parse_v1(line: bytes) -> Origin | None:
    if not line.endswith(b"\r\n"):
        raise ProxyHeaderError("v1 header does not end with CRLF")
    fields = line[:-2].split(b" ")
    if fields[0] != b"PROXY" or len(fields) < 2:
        raise ProxyHeaderError("v1 header without a protocol")
    if fields[1] == b"UNKNOWN":
        return None  # the sender could not tell (spec: the rest of the line is ignored)
    if fields[1] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError(f"v1 protocol {fields[1]!r} is not TCP4, TCP6 or UNKNOWN")
    if len(fields) != 6:
        raise ProxyHeaderError("v1 header needs exactly: protocol, two addresses, two ports")
    version = 4 if fields[1] == b"TCP4" else 6
    return Origin(_v1_address(fields[2], version), _v1_port(fields[4]),
                  _v1_address(fields[3], version), _v1_port(fields[5]))


def _v1_address(text: bytes, version: int) -> str:
    try:
        address = ipaddress.ip_address(text.decode("ascii"))  # rejects IPv4 leading zeros, as the spec does
    except (UnicodeDecodeError, ValueError):
        raise ProxyHeaderError(f"v1 address {text[:45]!r} is not an IP address") from None
    if address.version != version or getattr(address, "scope_id", None):
        raise ProxyHeaderError(f"v1 address {text[:45]!r} is not an IPv{version} address")
    return _address_text(address)


def _v1_port(text: bytes) -> int:
    if not (text.isdigit() and len(text) <= 5) or (text[:1] == b"0" and text != b"0") or int(text) > 65535:
        raise ProxyHeaderError(f"v1 port {text[:8]!r} is not a number from 0 to 65535")
    return int(text)


def _parse_v2(header: bytes) -> Origin | None:
    version, command = header[12] >> 4, header[12] & 0x0F
    if version != 2:
        raise ProxyHeaderError(f"v2 header with version {version}")
    if command == V2_LOCAL:
        return None  # the balancer's own connection (a health check): its address is the real one
    if command != V2_PROXY:
        raise ProxyHeaderError(f"v2 header with unknown command {command}")
    family = header[13]
    body = header[V2_FIXED_BYTES:]
    needed = _V2_ADDRESS_BYTES.get(family)
    if needed is None:
        return None  # UNSPEC, UDP or UNIX: nothing we could use as a TCP client address
    if len(body) < needed:
        raise ProxyHeaderError(f"v2 address block of {len(body)} bytes, the family needs {needed}")
    size = 4 if family == V2_TCP4 else 16
    src, dst = body[:size], body[size:2 * size]
    src_port, dst_port = struct.unpack_from("!HH", body, 2 * size)
    # What follows the addresses (TLVs: ALPN, SNI, the NLB's endpoint id) is skipped.
    return Origin(_address_text(ipaddress.ip_address(src)), src_port, _address_text(ipaddress.ip_address(dst)),
                  dst_port)


def _address_text(address) -> str:
    """An address as the kernel writes a dual-stack listener's peer: an IPv4-mapped one (a balancer
    on a dual-stack socket sends those) as "::ffff:203.0.113.7", where Python 3.11 writes
    "::ffff:cb00:7107", a form logs, backends and allow lists in apps do not recognise."""
    mapped = getattr(address, "ipv4_mapped", None)
    return f"::ffff:{mapped}" if mapped is not None else str(address)


class HeaderReader:
    """Takes a PROXY header off a socket, a piece at a time as it arrives, never a byte past its end.

    Each turn looks at what is waiting (MSG_PEEK) and receives only the bytes that belong to the
    header, so TLS or HTTP finds the connection exactly where the header ended. Bytes of an unfinished
    header are taken off too: left in the kernel they would wake the parked connection at once again.
    """

    __slots__ = ("received", "origin", "done")

    def __init__(self):
        self.received = b""
        self.origin: Origin | None = None  # once done: what the header carried (None: keep the peer)
        self.done = False

    def read_from(self, sock: socket.socket) -> bool:
        """True once the whole header is in (``origin`` set), False while more must arrive. Raises
        ProxyHeaderError for a bad header, ConnectionError when the peer closed before its end."""
        while True:
            try:
                waiting = sock.recv(PEEK_BYTES, _PEEK_NOWAIT)
            except (BlockingIOError, InterruptedError):
                return False
            if not waiting:
                raise ConnectionError(f"gone after {len(self.received)} bytes of the PROXY header")
            seen = self.received + waiting
            total = header_length(seen)
            take = len(waiting) if total is None else min(len(waiting), total - len(self.received))
            self.received += _recv_exactly(sock, take)
            if total is not None and len(self.received) == total:
                self.origin = parse_header(self.received)
                self.done = True
                return True


def _recv_exactly(sock: socket.socket, count: int) -> bytes:
    """``count`` bytes that a peek just showed are waiting (so a blocking recv returns at once)."""
    parts = []
    while count > 0:
        part = sock.recv(count)
        if not part:
            raise ConnectionError("closed in the middle of the PROXY header")
        parts.append(part)
        count -= len(part)
    return b"".join(parts)


# -- writing ----------------------------------------------------------------------------------------

def build_header(version: str, origin: Origin | None) -> bytes:
    """The header for a new upstream connection: ``version`` "v1" or "v2"; ``origin`` None for a
    connection of our own (a health check): v2 LOCAL, v1 UNKNOWN."""
    addresses = _same_family(origin) if origin is not None else None
    if version == "v1":
        if addresses is None:
            return b"PROXY UNKNOWN\r\n"
        src, dst = addresses
        protocol = "TCP4" if src.version == 4 else "TCP6"
        return f"PROXY {protocol} {src} {dst} {origin.src_port} {origin.dst_port}\r\n".encode("ascii")
    if addresses is None:
        return V2_SIGNATURE + bytes((0x20 | V2_LOCAL, 0x00)) + b"\x00\x00"
    src, dst = addresses
    family = V2_TCP4 if src.version == 4 else V2_TCP6
    body = src.packed + dst.packed + struct.pack("!HH", origin.src_port, origin.dst_port)
    return V2_SIGNATURE + bytes((0x20 | V2_PROXY, family)) + len(body).to_bytes(2, "big") + body


def _same_family(origin: Origin):
    """Both addresses in one family, as both versions need: IPv4-mapped IPv6 (a dual-stack listener)
    becomes IPv4, and if one side is still IPv4 and the other IPv6, the IPv4 one is mapped."""
    src, dst = (_unmapped(ipaddress.ip_address(text)) for text in (origin.src_ip, origin.dst_ip))
    if src.version != dst.version:
        src, dst = (ipaddress.IPv6Address(f"::ffff:{a}") if a.version == 4 else a for a in (src, dst))
    return src, dst


def _unmapped(address):
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped if mapped is not None else address


# -- logging a flood ----------------------------------------------------------------------------------

class ThrottledLog:
    """At most ``limit`` lines per ``interval``; what is left out is counted, and the count logged
    before the next line written in a later interval. A flood of bad connections must not fill the
    disk with a line each."""

    def __init__(self, logger: logging.Logger, limit: int = 10, interval: float = 60.0, clock=time.monotonic):
        self.logger = logger
        self.limit = limit
        self.interval = interval
        self.clock = clock
        self._lock = threading.Lock()
        self._window_start = clock()
        self._written = 0
        self.suppressed = 0  # left out in the current window

    def warning(self, message: str, *args) -> None:
        with self._lock:
            now = self.clock()
            dropped = 0
            if now - self._window_start >= self.interval:
                dropped, self.suppressed = self.suppressed, 0
                self._window_start, self._written = now, 0
            write = self._written < self.limit
            if write:
                self._written += 1
            else:
                self.suppressed += 1
        if dropped:
            self.logger.warning("%d more such lines were left out in the last %gs", dropped, self.interval)
        if write:
            self.logger.warning(message, *args)
