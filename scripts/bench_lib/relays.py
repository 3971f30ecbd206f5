#!/usr/bin/env python3
"""Bare calibration relays: how fast can any Python HTTP relay go on this machine?

    python relays.py --mode threads|pool2|lf2|loop --port P --upstream 127.0.0.1:B1[,127.0.0.1:B2]

No features and minimal parsing: a message is a head up to the blank line plus a Content-Length
body (no chunked; the bench backends always send Content-Length). Requests go upstream byte for
byte, client and upstream connections are kept alive, and a request with `Connection: close` is
answered with `Connection: close` and its client connection closed; the header is removed from
what goes upstream, so the upstream connection stays reusable as it does for the real proxies.

    threads  one thread per client connection, blocking sockets
    pool2    one epoll loop parks idle clients (EPOLLONESHOT); a readable one goes to one of exactly
             two worker threads, which serves one request with blocking I/O and re-arms the socket

    lf2      leader/followers: no dispatcher thread and no queue; two threads take turns waiting on
             the one epoll set (one event each) and the thread that wakes serves the request itself

    All three keep idle upstream sockets in one pool per process (a list per backend under a lock),
    the backends taken in turn per request.
    loop     one thread, every socket non-blocking in one epoll set; a client connection holds one
             upstream connection until it closes, then the upstream one waits for the next client

Binds 127.0.0.1 only; SIGTERM or SIGINT stops it with status 0. Always one process: a ceiling
per interpreter, not a product. Errors close the connection (no 502 pages).
"""

from __future__ import annotations

import argparse
import itertools
import os
import queue
import re
import select
import signal
import socket
import sys
import threading

HEAD_END = b"\r\n\r\n"
MAX_HEAD_BYTES = 65536  # far beyond anything the bench sends; stops a runaway buffer
RECV_BYTES = 65536
BACKLOG = 4096  # as the bench's proxies: c=1000 connects all at once
ACCEPT_BATCH = 64  # accepts per wake-up, so a connect storm cannot starve ready clients
POOL_WORKERS = 2  # the calibration relay the goals were set against: "a pool of 2 threads"
THREAD_STACK_BYTES = 256 * 1024  # threads mode runs 1,000 threads at c=1000
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
CONNECTION_CLOSE = re.compile(rb"\r\nconnection:[^\r]*\bclose\b", re.IGNORECASE)
CONNECTION_LINE = re.compile(rb"\r\nconnection:[^\r]*", re.IGNORECASE)
READABLE = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR


class RelayError(Exception):
    """A peer closed early or sent what this bare relay does not handle; the connection ends."""


# --- Messages: bytes in, bytes out -----------------------------------------------------------

def take_message(buffer: bytearray) -> bytes | None:
    """Remove and return one whole message (head + Content-Length body), or None if incomplete."""
    end = buffer.find(HEAD_END)
    if end < 0:
        if len(buffer) > MAX_HEAD_BYTES:
            raise RelayError("head too long")
        return None
    length = CONTENT_LENGTH.search(buffer, 0, end)
    total = end + len(HEAD_END) + (int(length.group(1)) if length else 0)
    if len(buffer) < total:
        return None
    message = bytes(buffer[:total])
    del buffer[:total]
    return message


def asks_close(message: bytes) -> bool:
    return CONNECTION_CLOSE.search(message, 0, message.find(HEAD_END)) is not None


def without_connection(message: bytes) -> bytes:
    """Connection is hop-by-hop (RFC 9110 §7.6.1): it never travels to the next hop."""
    end = message.find(HEAD_END)
    return CONNECTION_LINE.sub(b"", message[:end]) + message[end:]


def announcing_close(response: bytes) -> bytes:
    """The response saying the connection closes after it (RFC 9112 §9.6)."""
    end = response.find(HEAD_END)
    return CONNECTION_LINE.sub(b"", response[:end]) + b"\r\nConnection: close" + response[end:]


# --- Blocking I/O (threads, pool2) -----------------------------------------------------------

def read_message(sock: socket.socket, buffer: bytearray) -> bytes | None:
    """Block until one whole message is in buffer; None if the peer closed first."""
    while (message := take_message(buffer)) is None:  # bounded: each turn reads bytes or returns
        chunk = sock.recv(RECV_BYTES)
        if not chunk:
            return None
        buffer += chunk
    return message


def connect(address: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(address)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class UpstreamPool:
    """Idle keep-alive sockets per backend, shared by all threads; backends taken in turn."""

    def __init__(self, addresses: list[tuple[str, int]]) -> None:
        self.lock = threading.Lock()
        self.turns = itertools.cycle(addresses)
        self.idle: dict[tuple[str, int], list[socket.socket]] = {address: [] for address in addresses}

    def exchange(self, request: bytes) -> bytes:
        with self.lock:  # no I/O under the lock: only the pick and the checkout
            address = next(self.turns)
            reused = self.idle[address].pop() if self.idle[address] else None
        if reused is not None:
            try:
                return self._exchange_on(reused, address, request)
            except (OSError, RelayError):
                pass  # the backend closed an idle connection: one retry on a fresh one (GETs only)
        return self._exchange_on(connect(address), address, request)

    def _exchange_on(self, sock: socket.socket, address: tuple[str, int], request: bytes) -> bytes:
        buffer = bytearray()
        try:
            sock.sendall(request)
            response = read_message(sock, buffer)
            if response is None:
                raise RelayError("upstream closed the connection")
        except (OSError, RelayError):
            sock.close()
            raise
        if asks_close(response) or buffer:
            sock.close()
        else:
            with self.lock:
                self.idle[address].append(sock)
        return response


def serve_one(client: socket.socket, buffer: bytearray, upstreams: UpstreamPool) -> bool:
    """Relay one request from a blocking client socket; False when the connection is done."""
    request = read_message(client, buffer)
    if request is None:
        return False
    closing = asks_close(request)
    response = upstreams.exchange(without_connection(request) if closing else request)
    client.sendall(announcing_close(response) if closing else response)
    return not closing


# --- The epoll loop every mode runs in its main thread ---------------------------------------

class Reactor:
    """One epoll set: fd → callback(events). Returns from run() when a signal byte arrives."""

    def __init__(self, wake_fd: int) -> None:
        self.poller = select.epoll()
        self.callbacks: dict[int, object] = {}
        self.wake_fd = wake_fd
        self.poller.register(wake_fd, select.EPOLLIN)

    def watch(self, sock: socket.socket, events: int, callback) -> None:
        self.callbacks[sock.fileno()] = callback
        self.poller.register(sock.fileno(), events)

    def change(self, sock: socket.socket, events: int) -> None:
        self.poller.modify(sock.fileno(), events)  # epoll_ctl is safe from any thread

    def close(self, sock: socket.socket) -> None:
        """Forget, then close: the fd number cannot be reused by an accept in between."""
        self.callbacks.pop(sock.fileno(), None)
        sock.close()  # closing the last reference to the file also leaves the epoll set

    def run(self) -> None:
        while True:  # until a signal; poll() retries EINTR itself (PEP 475)
            for fd, events in self.poller.poll():
                if fd == self.wake_fd:
                    return
                callback = self.callbacks.get(fd)
                if callback is not None:  # closed earlier in this batch
                    callback(events)

    def accept_into(self, listener: socket.socket, on_client) -> None:
        def accept_ready(events: int) -> None:
            for _ in range(ACCEPT_BATCH):
                try:
                    client, _ = listener.accept()
                except BlockingIOError:
                    return
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                on_client(client)
        self.watch(listener, select.EPOLLIN, accept_ready)


# --- The three modes -------------------------------------------------------------------------

def serve_threads(reactor: Reactor, listener: socket.socket, addresses: list[tuple[str, int]]) -> None:
    threading.stack_size(THREAD_STACK_BYTES)
    upstreams = UpstreamPool(addresses)

    def start_thread(client: socket.socket) -> None:
        client.setblocking(True)
        threading.Thread(target=serve_connection, args=(client, upstreams), daemon=True).start()
    reactor.accept_into(listener, start_thread)
    reactor.run()


def serve_connection(client: socket.socket, upstreams: UpstreamPool) -> None:
    buffer = bytearray()
    try:
        while serve_one(client, buffer, upstreams):  # bounded by the client: it ends or closes
            pass
    except (OSError, RelayError):
        pass  # a peer went away or misbehaved: this connection ends here, nothing to report
    finally:
        client.close()


def serve_pool2(reactor: Reactor, listener: socket.socket, addresses: list[tuple[str, int]]) -> None:
    work: queue.SimpleQueue = queue.SimpleQueue()
    upstreams = UpstreamPool(addresses)
    for _ in range(POOL_WORKERS):
        threading.Thread(target=pool_worker, args=(reactor, work, upstreams), daemon=True).start()

    def park(client: socket.socket) -> None:
        client.setblocking(True)
        buffer = bytearray()
        # ONESHOT: once readable the socket is disarmed, so exactly one worker owns it until re-armed.
        reactor.watch(client, select.EPOLLIN | select.EPOLLONESHOT, lambda events: work.put((client, buffer)))
    reactor.accept_into(listener, park)
    reactor.run()


def serve_readable(client: socket.socket, buffer: bytearray, upstreams: UpstreamPool) -> bool:
    """Serve the request(s) of a client epoll found readable; False when the connection is done."""
    try:
        keep = serve_one(client, buffer, upstreams)
        while keep and HEAD_END in buffer:  # pipelined requests already read: epoll will not tell
            keep = serve_one(client, buffer, upstreams)
    except (OSError, RelayError):
        keep = False  # a peer went away or misbehaved: this connection ends here
    return keep


def pool_worker(reactor: Reactor, work: queue.SimpleQueue, upstreams: UpstreamPool) -> None:
    while True:  # daemon thread: ends with the process
        client, buffer = work.get()
        if serve_readable(client, buffer, upstreams):
            reactor.change(client, select.EPOLLIN | select.EPOLLONESHOT)
        else:
            reactor.close(client)


def serve_lf2(reactor: Reactor, listener: socket.socket, addresses: list[tuple[str, int]]) -> None:
    """pool2 without its hand-off: whichever of the two threads epoll wakes serves the event."""
    upstreams = UpstreamPool(addresses)
    clients: dict[int, tuple[socket.socket, bytearray]] = {}
    armed = select.EPOLLIN | select.EPOLLONESHOT  # one owner per event: the listener too
    shared = select.epoll()
    shared.register(listener.fileno(), armed)

    def follow() -> None:
        while True:  # daemon thread: ends with the process
            for fd, _ in shared.poll(-1, 1):
                if fd == listener.fileno():
                    accept_batch(listener, shared, clients, armed)
                    shared.modify(fd, armed)
                else:
                    serve_armed(shared, clients, fd, upstreams, armed)
    for _ in range(POOL_WORKERS):
        threading.Thread(target=follow, daemon=True).start()
    reactor.run()  # the main thread only waits for the stop signal


def accept_batch(listener: socket.socket, shared, clients: dict, armed: int) -> None:
    for _ in range(ACCEPT_BATCH):
        try:
            client, _ = listener.accept()
        except BlockingIOError:
            return
        client.setblocking(True)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        clients[client.fileno()] = (client, bytearray())
        shared.register(client.fileno(), armed)


def serve_armed(shared, clients: dict, fd: int, upstreams: UpstreamPool, armed: int) -> None:
    client, buffer = clients[fd]
    if serve_readable(client, buffer, upstreams):
        shared.modify(fd, armed)
    else:
        del clients[fd]  # forget, then close: the fd number cannot be reused by an accept in between
        client.close()


def serve_loop(reactor: Reactor, listener: socket.socket, addresses: list[tuple[str, int]]) -> None:
    upstreams = LoopUpstreams(reactor, addresses)
    reactor.accept_into(listener, lambda client: LoopConnection(reactor, upstreams, client))
    reactor.run()


class LoopUpstreams:
    """Idle non-blocking upstream sockets between client connections (one thread: no lock).
    Backends are taken in turn per new upstream connection; a client keeps its one to the end."""

    def __init__(self, reactor: Reactor, addresses: list[tuple[str, int]]) -> None:
        self.reactor, self.turns, self.idle = reactor, itertools.cycle(addresses), []

    def checkout(self, on_event) -> socket.socket:
        if self.idle:
            sock = self.idle.pop()
        else:
            sock = connect(next(self.turns))  # to 127.0.0.1 a blocking connect completes at once
            sock.setblocking(False)
            self.reactor.watch(sock, select.EPOLLIN, on_event)
        self.reactor.callbacks[sock.fileno()] = on_event
        return sock

    def checkin(self, sock: socket.socket) -> None:
        self.idle.append(sock)
        # Any event on an idle upstream socket means the backend closed it (or misbehaved).
        self.reactor.callbacks[sock.fileno()] = lambda events: self.discard(sock)

    def discard(self, sock: socket.socket) -> None:
        self.idle.remove(sock)
        self.reactor.close(sock)


class LoopConnection:
    """A client connection and the upstream connection it holds, both non-blocking in the reactor."""

    def __init__(self, reactor: Reactor, upstreams: LoopUpstreams, client: socket.socket) -> None:
        self.reactor, self.upstreams, self.client = reactor, upstreams, client
        self.upstream: socket.socket | None = None
        self.client_in, self.upstream_in = bytearray(), bytearray()
        self.outgoing: dict[socket.socket, bytearray] = {client: bytearray()}
        self.writing: set[socket.socket] = set()  # registered for EPOLLOUT: saves an epoll_ctl per send
        self.waiting = self.closing = False  # a request is upstream; close the client after it
        client.setblocking(False)
        reactor.watch(client, select.EPOLLIN, self.guarded(self.on_client))

    def guarded(self, handler):
        def run(events: int) -> None:
            try:
                handler(events)
            except (OSError, RelayError):
                self.close()  # a peer went away or misbehaved: this connection ends here
        return run

    def on_client(self, events: int) -> None:
        if events & select.EPOLLOUT and not self.flush(self.client):
            return
        if events & READABLE and self.receive(self.client, self.client_in):
            self.forward_request()

    def on_upstream(self, events: int) -> None:
        if events & select.EPOLLOUT:
            self.flush(self.upstream)
        if events & READABLE and self.receive(self.upstream, self.upstream_in):
            self.relay_response()

    def receive(self, sock: socket.socket, buffer: bytearray) -> bool:
        try:
            chunk = sock.recv(RECV_BYTES)
        except BlockingIOError:
            return False  # a stale event for a reused fd number
        if chunk:
            buffer += chunk
            return True
        if sock is self.client or self.waiting:
            raise RelayError("peer closed the connection")
        self.drop_upstream()  # the backend closed an idle keep-alive connection: take another later
        return False

    def forward_request(self) -> None:
        request = None if self.waiting else take_message(self.client_in)
        if request is None:
            return
        self.closing, self.waiting = asks_close(request), True
        if self.upstream is None:
            self.upstream = self.upstreams.checkout(self.guarded(self.on_upstream))
            self.outgoing[self.upstream] = bytearray()
        self.send(self.upstream, without_connection(request) if self.closing else request)

    def relay_response(self) -> None:
        response = take_message(self.upstream_in)
        if response is None:
            return
        self.waiting = False
        if asks_close(response):
            self.drop_upstream()
        self.send(self.client, announcing_close(response) if self.closing else response)
        if not self.closing:
            self.forward_request()  # a pipelined request may already be waiting

    def send(self, sock: socket.socket, data: bytes) -> None:
        self.outgoing[sock] += data
        self.flush(sock)

    def flush(self, sock: socket.socket) -> bool:
        """Send what is pending; False if that finished a closing client connection."""
        pending = self.outgoing[sock]
        if pending:
            try:
                del pending[:sock.send(pending)]
            except BlockingIOError:
                pass  # the kernel buffer is full; EPOLLOUT tells us when to go on
        if sock is self.client and self.closing and not self.waiting and not pending:
            self.close()
            return False
        if bool(pending) != (sock in self.writing):
            self.writing.symmetric_difference_update({sock})
            self.reactor.change(sock, select.EPOLLIN | (select.EPOLLOUT if pending else 0))
        return True

    def drop_upstream(self) -> None:
        if self.upstream is not None:
            self.outgoing.pop(self.upstream)
            self.writing.discard(self.upstream)
            self.reactor.close(self.upstream)
            self.upstream, self.upstream_in = None, bytearray()

    def close(self) -> None:
        reusable = self.upstream is not None and not (self.waiting or self.upstream_in
                                                      or self.upstream in self.writing)
        if reusable:
            self.upstreams.checkin(self.upstream)
            self.upstream = None
        self.drop_upstream()
        if self.client.fileno() >= 0:
            self.reactor.close(self.client)


# --- Command line ----------------------------------------------------------------------------

MODES = {"threads": serve_threads, "pool2": serve_pool2, "lf2": serve_lf2, "loop": serve_loop}


def parse_upstreams(text: str) -> list[tuple[str, int]]:
    addresses = []
    for item in text.split(","):
        host, _, port = item.strip().rpartition(":")
        addresses.append((host or "127.0.0.1", int(port)))
    return addresses


def stop_on_signals() -> int:
    """SIGTERM/SIGINT only write their number to a pipe (set_wakeup_fd); the reactor sees it, stops."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: None)  # the wake-up byte is the record
    return read_fd


def listen(port: int) -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(BACKLOG)
    listener.setblocking(False)
    return listener


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=sorted(MODES), required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="127.0.0.1:PORT[,127.0.0.1:PORT2]")
    args = parser.parse_args(argv)
    reactor = Reactor(stop_on_signals())
    listener = listen(args.port)
    print(f"relay {args.mode} on 127.0.0.1:{listener.getsockname()[1]}", flush=True)
    MODES[args.mode](reactor, listener, parse_upstreams(args.upstream))
    listener.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
