"""The HTTP side of a client connection: read a request, forward it, relay the response, repeat.

``HttpHandler`` is the callable that ``core.SocketServer`` runs on a worker thread for a connection
that has bytes waiting. It serves requests until the connection has nothing more buffered, then
leaves it IDLE (the server parks it without a thread) or CLOSED.

The forwarding path is one straight pipeline with one error funnel (Go's ``ReverseProxy.ServeHTTP``):
route → pick a server → build the outbound head → send head and body → read the response head →
relay the body. Every failure becomes a typed error that ``_exchange`` turns into one response.
"""

from __future__ import annotations

import logging
import os
import random
import select
import socket
import ssl
import struct
import time

from core import ConnectionState, IllegalTransition
from core import zerocopy
from core.hangup_watch import HangupWatch
from core.transfer_relay import CHUNK, Copy, Readable, Send
from core.zerocopy import PeerClosed, WriteTimedOut

from proxy.http.compression import compression_for
from proxy.http.proxy_protocol import HeaderReader, Origin, ProxyHeaderError, ThrottledLog
from proxy.http.redirects import https_location, location, redirect_response
from proxy.http.errors import ClientGone, NoRoute, Refused, NoServerAvailable, ProxyError, UpstreamConnectError, UpstreamFailed, UpstreamTimeout
from proxy.http.forwarding import Outbound, build_request_head, build_response_head, interim_head, tunnel_upgrade
from proxy.http.http1 import (DEFAULT_MAX_LINE_BYTES, LAST_CHUNK, NEED_DATA, Data, EndOfMessage, ProtocolError, RequestHead,
                    RequestParser, ResponseHead, ResponseParser, encode_chunk)
from proxy.http.responses import (describe_route, html_response, plain_response, unreachable_page, unreachable_text,
                        wants_html)
from proxy.routing.router import BadPath, host_without_port, split_target
from proxy.http.tls import HANDSHAKE_PENDING
from proxy.http2.session import H2Session, is_h2c_preface
from proxy.http.tunnel import TunnelRelay

log = logging.getLogger("pyproxy.handler")

READ_SIZE = 256 * 1024
# Reads from the server are smaller: what one brings (a response head with the start of its body, a
# piece of a chunked body) is sent to the client in one go, and when the client stalls it waits in a
# held Send; so no held transfer keeps more than the relay's own CHUNK in Python memory. Measured:
# chunked relay throughput the same as with 256 KiB reads.
UPSTREAM_READ_SIZE = CHUNK
REPLAY_LIMIT = 64 * 1024  # request body bytes kept so a stale-connection retry can resend them
# Content-Length bodies up to this size are read in full before the upstream is contacted. While one
# trickles in, its connection is parked in the selector, as half a head is: a slow POST (R-U-Dead-Yet)
# holds no thread, and the upstream never sees a request that will not arrive whole. Larger bodies
# stream (os.splice), holding a thread until body_timeout between reads.
SMALL_BODY_MAX = REPLAY_LIMIT
SPLICE_BODY_MIN = REPLAY_LIMIT  # larger Content-Length bodies go client → upstream through os.splice
# RFC 9110 §15.2 sets no limit on 1xx responses; a backend streaming them forever would hold a worker.
MAX_INTERIM_RESPONSES = 16
# nginx's lingering_close: after answering a request whose body we did not read to the end, read and
# drop what the client still sends for a moment before closing. Closing with unread bytes sends a
# reset, and a reset can make the client's stack discard our answer before the client reads it.
LINGER_SECONDS = 2.0
LINGER_READ_TIMEOUT = 0.5
_PEEK_NOWAIT = socket.MSG_PEEK | socket.MSG_DONTWAIT
_LINGER_ZERO = struct.pack("ii", 1, 0)  # struct linger {l_onoff = 1, l_linger = 0}: close sends RST
# RFC 9110 §9.2.2: methods whose repetition is harmless (a retry after a stale connection is safe).
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
# A request that is never resent goes on a pooled connection only if that one was used this recently:
# the older an idle connection, the likelier the server is closing it right now (gunicorn's default
# keep-alive is 2 s), and a stale connection would cost such a request a 502.
NON_IDEMPOTENT_MAX_IDLE = 1.0
S = ConnectionState
# The states as module globals: in Python 3.11 reading a member off the enum class costs ~60 ns, a
# global ~5 ns, and a request reads about twenty of them.
READING, PROCESSING, WRITING, IDLE = S.READING, S.PROCESSING, S.WRITING, S.IDLE
HELD, TUNNEL, CLOSED = S.HELD, S.TUNNEL, S.CLOSED
MAX_CLIENT_REQUEST_ID = 200  # longer X-Request-Id values are replaced (Heroku's router keeps 20-200 chars)
EXPIRED_HEAD_REPLY = plain_response(408, "408 request head not received in time", close=True)
EXPIRED_BODY_REPLY = plain_response(408, "408 request body not received in time", close=True)
PARKED = object()  # _read_head's answer when it parked a connection holding half a request head
# How long a worker waits on a client before a transfer leaves it: past this, a client not reading its
# response (or not sending its body) is carried on by the server's transfer relay without a thread,
# with send_timeout / body_timeout still counted there. Short, because every stalled client costs a
# worker this long once; long enough that a client keeping up never leaves the fast path.
CLIENT_PATIENCE = 0.05
# A client that keeps a trickle going never waits out the patience; after this long relaying one body,
# a transfer it is not keeping up with (a write it did not take whole, a read that found less than
# asked) leaves the worker too.
TRANSFER_BUDGET = 1.0
# A large body with nothing more arriving within this goes to the relay at once, without the patience:
# a client still sending delivers its next bytes sooner, and a burst of stalled uploads then costs the
# pool little.
UPLOAD_GRACE = 0.01
# How long a worker waits for the server's 100 Continue (or the client's body) before the proxy tells
# the client to go on itself: as long as curl waits before sending its body anyway.
EXPECT_PATIENCE = 1.0
CONTINUE_HEAD = b"HTTP/1.1 100 Continue\r\n\r\n"


class ClientSession:
    """Per-connection state that outlives one request (the parser keeps pipelined bytes)."""

    __slots__ = ("parser", "client_ip", "scheme", "requests", "head_deadline", "waiting_request", "held_exchange",
                 "origin", "relayed_unnamed")

    def __init__(self, parser: RequestParser, client_ip: str, scheme: str, origin: Origin | None = None,
                 relayed_unnamed: bool = False):
        self.parser = parser
        # A PROXY header that named no client (v1 UNKNOWN, v2 LOCAL or UNSPEC): client_ip is the balancer,
        # but the bytes are not its own, so the request's X-Forwarded-For is never believed.
        self.relayed_unnamed = relayed_unnamed
        # The connection as its client made it: from a PROXY header, or worked out when an upstream
        # with send_proxy_protocol first needs it (client_ip is its src_ip either way).
        self.origin = origin
        self.head_deadline: float | None = None  # while a partial request head is parked
        self.waiting_request: RequestHead | None = None  # parked until its small body is all here
        self.held_exchange = None  # the exchange (a generator) whose transfer the server's relay holds
        self.client_ip = client_ip
        self.scheme = scheme
        self.requests = 0


class RequestRecord:
    """What observers (access log, metrics) learn about one finished request."""

    __slots__ = ("started", "duration", "client_ip", "method", "target", "version", "status",
                 "bytes_sent", "head_sent", "interim_sent", "upstream", "server", "request_id", "host", "_headers")

    def __init__(self, started: float, client_ip: str, request: RequestHead | None):
        self.started = started
        self.duration = 0.0
        self.client_ip = client_ip
        if request is None:  # refused before its head was whole
            self.method, self.target, self.version, self.host = "-", "-", "HTTP/1.1", None
            self._headers = None
        else:
            self.method, self.target, self.version, self.host = (request.method, request.target,
                                                                 request.version, request.host)
            self._headers = request.headers  # read only if the access log asks (it is often off)
        self.status = 0
        self.bytes_sent = 0  # every byte of the answer: 1xx heads, the head and the body
        # head_sent (the final head, as sent) and interim_sent (bytes of 1xx heads) are set only once
        # one went out, so that the common request pays one store for them: body_bytes reads them.
        self.upstream = None
        self.server = None
        self.request_id = None

    @property
    def body_bytes(self) -> int:
        """The body bytes sent, heads excluded: nginx's $body_bytes_sent, Apache's %b."""
        heads = len(getattr(self, "head_sent", b"")) + getattr(self, "interim_sent", 0)
        return max(0, self.bytes_sent - heads)

    @property
    def user_agent(self) -> str | None:
        return None if self._headers is None else _field(self._headers, "user-agent")

    @property
    def referer(self) -> str | None:
        return None if self._headers is None else _field(self._headers, "referer")


class Exchange:
    """One request/response through the proxy: the mutable facts the pipeline steps share."""

    __slots__ = ("request", "conn", "session", "record", "response_started", "body_done",
                 "replay", "client_keep_alive", "route", "server", "handed_to_tunnel", "rate_limit_fields",
                 "told_to_continue")

    def __init__(self, request, conn, session, record):
        self.request = request
        self.conn = conn
        self.session = session
        self.record = record
        self.response_started = False  # once true, failures can only abort the connection
        self.body_done = request.content_length in (None, 0) and not request.chunked
        self.replay: list[bytes] | None = []  # body bytes sent so far (None: too big to replay)
        self.client_keep_alive = request.keep_alive
        self.route = None  # the matched route, once routing succeeded (error pages name it)
        self.server = None  # the server of the current attempt
        # Upgraded (101): the tunnel relay owns the record (observed at its close) and the server slot.
        self.handed_to_tunnel = False
        self.rate_limit_fields = ""  # RateLimit-* header lines for the response, on a rate-limited route
        self.told_to_continue = False  # the proxy sent its own 100 Continue (the server was slow to)


class RequestIds:
    """New X-Request-Id values: 128 random bits each, 32 hex digits like uuid4().hex.

    uuid4() costs a getrandom syscall per request, and every syscall lets another thread take the GIL;
    a generator seeded once from the OS does not, and one call makes a batch of ids. Not a counter:
    ids returned to clients would reveal the request rate. Ids are correlation tokens, never secrets.
    Safe across threads: list.pop() and randbytes are single C calls under the GIL."""

    BATCH = 64
    _EACH = [slice(start, start + 32) for start in range(0, 32 * BATCH, 32)]  # one id's digits in a batch

    def __init__(self):
        self._random = random.Random(os.urandom(32))
        self._spare: list[str] = []

    def new(self) -> str:
        try:
            return self._spare.pop()
        except IndexError:
            batch = list(map(self._random.randbytes(16 * self.BATCH).hex().__getitem__, self._EACH))
            self._spare = batch
            return batch.pop()


class HttpHandler:
    def __init__(self, app):
        self.app = app

        self._request_ids = RequestIds()  # every worker process builds its handler after the fork: its own seed
        self.tunnels = TunnelRelay(app)  # upgraded connections: one relay thread for all of them
        self.hangups = HangupWatch()  # clients that leave while their request waits for its answer
        self.proxy_header_problems = ThrottledLog(log)  # refused PROXY-protocol connections, a flood kept short
        self.known_heads: dict = {}  # request heads every connection's parser shares (RequestParser)
        self.known_responses: dict = {}  # the same for response heads (ResponseParser)
        # HTTP/2 connections (proxy/serve/http2.py, Http2Server), plugged in by the process that owns
        # the pool their streams run on (ProxyProcess always does).
        self.http2 = None

    def on_expired(self, conn) -> None:
        """core's callback for a connection parked past its deadline (half a head or a small body):
        a 408, never blocking, logged and counted like any other answer (observers never block)."""
        session = conn.server_data
        if session is None:
            return  # a TLS handshake that stalled: no HTTP has been spoken, so none is answered
        if session.__class__ is HeaderReader:  # a PROXY header, then maybe a TLS handshake, still unfinished
            if not session.done:
                self.proxy_header_problems.warning(
                    "closed connection from %s: no complete PROXY header within header_timeout (%d bytes of it)",
                    conn.peer[0], len(session.received))
            return
        if session.__class__ is H2Session:  # HTTP/2: GOAWAY, not a 408
            self.http2.expire(conn)
            return
        request = session.waiting_request  # the head is known when the body was late
        if request is None and not session.parser.head_started:
            return  # a TLS client that never sent a request: closed without a word, as a plain one
        record = RequestRecord(time.monotonic(), session.client_ip, request)
        record.status = 408
        conn.sock.setblocking(False)  # the accept loop calls this: it must never wait on a client
        try:
            reply = EXPIRED_HEAD_REPLY if request is None else EXPIRED_BODY_REPLY
            record.head_sent = _head_of(reply)
            record.bytes_sent = conn.sock.send(reply)
        finally:  # a client gone already (OSError, core logs it) still had its request time out
            self.app.observe(record)

    def on_drain(self, conn) -> None:
        """core's callback as a drain starts: an HTTP/2 connection is told GOAWAY (HTTP/1.1 ones learn
        it from the next answer's Connection: close)."""
        session = conn.server_data
        if session.__class__ is H2Session and not conn.closed:
            self.http2.drain(conn)

    # -- connection loop ---------------------------------------------------------------------
    def __call__(self, conn) -> None:
        session = conn.server_data
        if conn.state is HELD:  # a held transfer is over: continue its exchange where it stopped
            wait = conn.held_wait
            conn.resume()
            if not self._finish_exchange(conn, session, self._drive(conn, session, session.held_exchange, wait)):
                return
        else:
            if not _take_for_reading(conn):
                return
            if session is None or session.__class__ is HeaderReader:
                session = self._open_session(conn)
                if session is None or session is PARKED:
                    return  # PARKED: a TLS client between flights or before its request, held without a thread
            elif session.__class__ is H2Session:  # an HTTP/2 connection (proxy/serve/http2.py)
                return self.http2.serve(conn)  # a stream to run once the connection is parked again
        while True:
            request = session.waiting_request or self._read_head(conn, session)
            if request is not PARKED and request is not None and request.content_length and _wants_whole_body(request):
                request = self._read_small_body(conn, session, request)
            if request is PARKED:
                return  # half a head or a small body so far: held without a thread until more comes
            if request is None:
                self._close(conn)
                return
            conn.transition(PROCESSING)
            if not self._finish_exchange(conn, session, self._drive(conn, session, self._exchange(conn, session, request))):
                return

    @staticmethod
    def _drive(conn, session, exchange, wait=None):
        """Run an exchange (a generator) until it returns whether the connection may carry another
        request, or yields a ``Wait`` on a stalled peer: then the connection is held (the server's relay
        carries the wait out and runs us again) and the answer is ``ConnectionState.HELD``."""
        try:
            if wait is None:
                step = exchange.send(None)
            elif wait.error is not None:
                step = exchange.throw(wait.error)
            else:
                step = exchange.send(wait)
        except StopIteration as finished:
            session.held_exchange = None
            return finished.value
        session.held_exchange = exchange
        conn.hold(step)
        return HELD

    def _finish_exchange(self, conn, session, keep_alive) -> bool:
        """After an exchange: True to read the next request now, False when the connection left this
        worker (held, tunnelled, closed, or parked until its next request arrives)."""
        if keep_alive is HELD or conn.state is TUNNEL:
            return False
        if not keep_alive or conn.state is CLOSED:
            self._close(conn)
            return False
        conn.transition(IDLE)
        session.parser.start_next()
        if not session.parser.has_buffered_data and not (session.scheme == "https" and _tls_pending(conn)):
            return False  # the server parks the connection until its next request arrives
        conn.transition(READING)
        return True

    def _open_session(self, conn):
        """The connection's ClientSession once it can speak HTTP; None if it failed (closed), PARKED
        while its TLS handshake waits for the client (header_timeout bounds the whole handshake)."""
        settings = self.app.settings
        scheme = "http"
        origin = None
        relayed_unnamed = False
        after_header = False  # a PROXY header came first
        proxied = self.app.runtime.proxy_protocol_listeners
        # A connection keeps the mode it started in, whatever a reload changes meanwhile: one whose header
        # began goes on with it; one whose TLS handshake began without one never gets asked for one.
        if conn.server_data is not None or (proxied and getattr(conn.listener, "address", None) in proxied
                                            and not isinstance(conn.sock, ssl.SSLSocket)):
            header = self._read_proxy_header(conn)
            if header is None or header is PARKED:
                return header
            origin = header.origin
            relayed_unnamed = origin is None
            after_header = True
        tls = self.app.tls_for_listener(conn.listener)
        if tls is not None:
            scheme = "https"
            done = tls.handshake(conn)
            if done is HANDSHAKE_PENDING:
                if conn.park_deadline is None:
                    conn.park_deadline = time.monotonic() + settings.header_timeout
                conn.transition(IDLE)
                return PARKED
            handshake_deadline, conn.park_deadline = conn.park_deadline, None
            if not done:
                conn.close()
                return None
            if self.http2 is not None and conn.sock.selected_alpn_protocol() == "h2":
                self.http2.start(conn, scheme, origin=origin, relayed_unnamed=relayed_unnamed)
                return PARKED
        elif self.http2 is not None and self._h2c_listener(conn.listener):
            prior_knowledge = is_h2c_preface(conn)
            if prior_knowledge is None:  # a few bytes of what may be the preface: wait for the rest
                conn.park_deadline = conn.park_deadline or time.monotonic() + settings.header_timeout
                conn.transition(IDLE)
                return PARKED
            conn.park_deadline = None
            if prior_knowledge:
                conn.clear_timeouts()  # HTTP/2 sets its own, not those the listener passed on
                self.http2.start(conn, scheme, origin=origin, relayed_unnamed=relayed_unnamed)
                return PARKED
        parser = RequestParser(max_header_bytes=settings.max_header_bytes,
                               max_body_bytes=settings.max_body_bytes,
                               # a line past a small max_header_bytes is still a 414 (docs/configuration.md)
                               max_line_bytes=min(DEFAULT_MAX_LINE_BYTES, settings.max_header_bytes),
                               known_heads=self.known_heads)
        session = ClientSession(parser, origin.src_ip if origin else str(conn.peer[0]), scheme, origin,
                                relayed_unnamed)
        conn.server_data = session
        if tls is None and conn.park_deadline is not None:  # after a PROXY header: the head has what is left
            session.head_deadline, conn.park_deadline = conn.park_deadline, None
        if after_header and tls is None and not conn.readable_now():
            # A PROXY header with no request behind it yet: wait parked, not on this thread (a read here
            # would also trust the socket's read timeout, which a reload may change after its accept).
            session.head_deadline = conn.park_deadline = (session.head_deadline
                                                          or time.monotonic() + settings.header_timeout)
            conn.transition(IDLE)
            return PARKED
        if tls is not None and not conn.readable_now():
            # Handshake done, no request yet: wait parked, not on this thread (slowloris over TLS),
            # within the header_timeout that started with the handshake.
            session.head_deadline = conn.park_deadline = (handshake_deadline
                                                          or time.monotonic() + settings.header_timeout)
            conn.transition(IDLE)
            return PARKED
        return session

    def _read_proxy_header(self, conn):
        """A PROXY-protocol listener's header (the HeaderReader, done) before anything else on the
        connection; PARKED while it is arriving (header_timeout counts from its first bytes); None when
        the connection was refused: an untrusted peer, a bad header, or a close before its end (logged)."""
        reader = conn.server_data
        peer = str(conn.peer[0])
        if reader is None:
            if not self.app.runtime.is_trusted(peer):
                self.proxy_header_problems.warning(
                    "closed connection from %s: not in server.trusted_proxies, which a proxy_protocol "
                    "listener requires", peer)
                conn.close()
                return None
            reader = conn.server_data = HeaderReader()
        if reader.done:
            return reader  # an earlier turn read it; the TLS handshake after it is what waits
        try:
            if reader.read_from(conn.sock):
                return reader
        except ProxyHeaderError as exc:
            self.proxy_header_problems.warning("closed connection from %s: bad PROXY header: %s", peer, exc)
            conn.close()
            return None
        except OSError as exc:
            if reader.received:
                self.proxy_header_problems.warning("closed connection from %s: %s", peer, exc)
            conn.close()
            return None
        if conn.park_deadline is None:
            conn.park_deadline = time.monotonic() + self.app.settings.header_timeout
        conn.transition(IDLE)
        return PARKED

    def _h2c_listener(self, tag) -> bool:
        """Does this plain listener take HTTP/2 with prior knowledge (h2c = true)? The reloaded config's
        entry for its address decides; a listener the config does not name (tests on port 0) its own."""
        if tag is None:
            return False
        h2c = self.app.runtime.h2c_by_address.get(tag.address)
        return getattr(tag, "h2c", False) if h2c is None else h2c

    def _read_head(self, conn, session) -> RequestHead | None:
        """The next request head, or None when the client closed (or was told off) between requests."""
        parser = session.parser
        settings = self.app.settings
        deadline = session.head_deadline  # set when an earlier call parked half a head
        try:
            while True:
                event = parser.next_event()
                if event is not NEED_DATA:
                    session.head_deadline = conn.park_deadline = None
                    return event
                now = time.monotonic()
                if deadline is None:
                    deadline = now + settings.header_timeout  # slowloris: the whole head, not each read
                    left = settings.header_timeout  # exactly: the socket usually has it already, no syscall
                elif now >= deadline:
                    raise TimeoutError
                else:
                    left = max(0.001, deadline - now)
                if parser.head_started and not conn.readable_now():
                    # A client trickling its head must not hold a worker until header_timeout
                    # (slowloris): park the connection with the head's deadline instead. Empty lines
                    # count: the parser drops them, a client sending only "\r\n" must not hold one.
                    session.head_deadline = conn.park_deadline = deadline
                    conn.transition(IDLE)
                    return PARKED
                conn.set_timeouts(left, CLIENT_PATIENCE)
                data = conn.read_some(READ_SIZE)
                if not data:
                    if parser.has_buffered_data:
                        log.debug("client %s closed mid-request", session.client_ip)
                    return None
                parser.feed(data)
        except ProtocolError as exc:
            self._reject(conn, session, exc.status, exc.reason)
        except TimeoutError:
            if parser.has_buffered_data:
                self._reject(conn, session, 408, "request head not received in time")
        except OSError as exc:
            log.debug("client %s: %s", session.client_ip, exc)
        return None

    def _read_small_body(self, conn, session, request: RequestHead):
        """All of a small Content-Length body into the parser's buffer; PARKED while it trickles in;
        None if the client left, stalled past body_timeout between reads, or was told off."""
        parser = session.parser
        settings = self.app.settings
        session.waiting_request = conn.park_deadline = None
        try:
            while not parser.body_buffered:
                if not conn.readable_now():
                    # The deadline is a gap between reads (nginx client_body_timeout): set anew each time.
                    session.waiting_request = request
                    conn.park_deadline = time.monotonic() + settings.body_timeout
                    conn.transition(IDLE)
                    return PARKED
                conn.set_timeouts(settings.body_timeout, CLIENT_PATIENCE)
                data = conn.read_some(READ_SIZE)
                if not data:
                    log.debug("client %s closed mid-body", session.client_ip)
                    return None
                parser.feed(data)
        except TimeoutError:
            self._reject(conn, session, 408, "request body not received in time", request)
            return None
        except OSError as exc:
            log.debug("client %s: %s", session.client_ip, exc)
            return None
        return request

    def _reject(self, conn, session, status: int, reason: str, request: RequestHead | None = None) -> None:
        """Answer a request we could not parse (or whose body never came), and close: the connection
        can no longer be trusted."""
        record = RequestRecord(time.monotonic(), session.client_ip, request)
        record.status = status
        line = session.parser.request_line() if request is None else None
        if line is not None:  # the refused request's line, for the access log
            record.method, record.target, record.version = line
        payload = plain_response(status, f"{status} {reason}", close=True)
        try:
            conn.set_timeouts(1.0, 1.0)
            if conn.state is READING:
                conn.transition(PROCESSING)
            conn.transition(WRITING)
            conn.sendall(payload)
            record.head_sent = _head_of(payload)
            record.bytes_sent = len(payload)
        except OSError:
            pass  # the client is gone too; nothing left to tell it
        self.app.observe(record)
        # The client may still be sending what was refused: none of it waiting now does not mean none
        # is coming, and a byte arriving at a closed socket draws a reset that can destroy the answer.
        self._close_lingering(conn)

    # -- one request ---------------------------------------------------------------------------
    def _exchange(self, conn, session, request: RequestHead) -> bool:
        """Serve one request; returns whether the client connection may carry another. A generator:
        it yields a ``Wait`` where a peer stalled, and continues with it once the wait is over."""
        app = self.app
        record = RequestRecord(time.monotonic(), session.client_ip, request)
        ex = Exchange(request, conn, session, record)
        session.requests += 1
        if app.draining():
            ex.client_keep_alive = False  # drain at a request boundary: this answer says close
        try:
            upstream, out = self._plan(ex, app.runtime)
            if upstream is None:  # a redirect: ``out`` is (status, location), answered here
                self._answer_redirect(ex, *out)
            else:
                yield from self._send_with_retries(ex, upstream, out)
        except ProtocolError as exc:  # the client's body was malformed or too large
            ex.client_keep_alive = False
            self._answer_error(ex, exc.status, exc.reason)
        except UpstreamConnectError as exc:
            self._answer_error(ex, exc.status, exc.detail, self._unreachable_body(ex, exc))
        except Refused as exc:  # a route's edge policy said no: 403, 401
            if exc.log_detail:
                log.info("%s %s -> %d: %s", request.method, request.target, exc.status, exc.log_detail)
            self._answer_error(ex, exc.status, exc.detail, headers=exc.headers)
        except ProxyError as exc:
            self._answer_error(ex, exc.status, exc.detail)
        except ClientGone as exc:
            log.debug("client %s gone: %s", session.client_ip, exc)
            if not ex.response_started:
                record.status = 499  # nginx's code for a client that left before its answer
            ex.client_keep_alive = False
            conn.close()
        if not ex.handed_to_tunnel:
            record.duration = time.monotonic() - record.started
            app.observe(record)
        if not ex.body_done and ex.response_started and conn.state is WRITING:
            self._close_lingering(conn)  # answered before the whole body came in: close, lingering once
        return ex.client_keep_alive and ex.body_done

    def _close(self, conn) -> None:
        """Close the client connection. Bytes it sent that were never read (a request pipelined behind
        Connection: close, a stray CRLF, a refused body) would make close() send a reset, and a reset
        discards the end of our answer still in the send buffer: linger first (nginx lingering_close)."""
        if conn.state is not CLOSED and _has_early_answer(conn.sock):  # the same peek: bytes are waiting
            self._close_lingering(conn)
        conn.close()

    @staticmethod
    def _close_lingering(conn) -> None:
        """nginx's lingering close: stop sending, drop what the client still sends, briefly, then
        close (once: a closed connection is never lingered on again). Core carries the wait out
        without holding this worker (``Connection.close_lingering``)."""
        conn.close_lingering(LINGER_SECONDS, LINGER_READ_TIMEOUT)

    def _answer_error(self, ex: Exchange, status: int, detail: str, body=None, headers: tuple = ()) -> None:
        """The one error response; ``body`` is an optional (content kind, text) replacing the short default,
        ``headers`` further (name, value) fields (a 401's challenge)."""
        if ex.response_started:
            # Headers already went out: the only honest signal left is an aborted connection.
            log.warning("aborting response to %s after it started: %s", ex.session.client_ip, detail)
            ex.client_keep_alive = False
            ex.record.status = ex.record.status or status
            ex.conn.close()
            return
        if not ex.body_done:
            ex.client_keep_alive = False  # unread body bytes would be taken for the next request
        if ex.conn.state is TUNNEL or ex.conn.state is CLOSED:
            return
        if status >= 500:
            log.info("%s %s -> %d: %s", ex.request.method, ex.request.target, status, detail)
        kind, text = body or ("text", f"{status} {detail}")
        respond = html_response if kind == "html" else plain_response
        payload = respond(status, text, close=not ex.client_keep_alive,
                          head_only=ex.request.method == "HEAD",
                          extra_headers=self._request_id_header(ex) + headers)
        ex.record.status = status
        try:
            ex.conn.set_timeouts(self.app.settings.send_timeout, self.app.settings.send_timeout)
            if ex.conn.state is not WRITING:  # _relay_response moves there before the first byte
                ex.conn.transition(WRITING)
            ex.conn.sendall(payload)
            ex.record.head_sent = _head_of(payload)
            ex.record.bytes_sent += len(payload)
        except OSError:
            ex.client_keep_alive = False
            ex.conn.close()

    @staticmethod
    def _unreachable_body(ex: Exchange, exc: UpstreamConnectError):
        """Name the route and the address that failed: a dev server not started yet is the usual cause."""
        if ex.route is None or exc.address is None:
            return None
        route = describe_route(ex.route.host, ex.route.path)
        if wants_html(ex.request.headers.get("accept")):
            return "html", unreachable_page(exc.status, route, exc.address, exc.refused, exc.detail)
        return "text", unreachable_text(exc.status, route, exc.address, exc.refused, exc.detail)

    @staticmethod
    def _request_id_header(ex: Exchange) -> tuple:
        return (("X-Request-Id", ex.record.request_id),) if ex.record.request_id else ()

    def _plan(self, ex: Exchange, runtime):
        """Route the request: its upstream and what to send there (an Outbound), or a typed error."""
        request = ex.request
        # First: a 404 or a bad path is logged and answered with the id too (the client's, if it sent one).
        ex.record.request_id = self._request_id(request)
        if runtime.https_redirects:
            port = runtime.https_redirects.get(getattr(ex.conn.listener, "address", None))
            # redirect_https: the same URL on https, whatever the route; unless TLS ended in a trusted
            # balancer in front, which forwards its decrypted requests here (else they loop forever).
            if port is not None and self._forwarded_proto(ex, runtime) != "https":
                return None, (308, https_location(self._redirect_host(request), port, *split_target(request.target)))
        try:
            route, path, query, target = runtime.router.resolve(request.host, request.target)
        except BadPath as exc:
            raise ProtocolError(400, f"bad request path: {exc}") from exc
        if route is None:
            raise NoRoute(f"no route for {request.host or '(no host)'}{path}")
        if route.access is not None:  # before anything else is spent on a client the route refuses
            route.access.check(self._original_client(ex, runtime))
        if route.rate_limit is not None:  # before basic_auth: failed sign-ins take tokens too
            ex.rate_limit_fields = route.rate_limit.check(self._original_client(ex, runtime), request.headers)
        if route.basic_auth is not None:  # bcrypt runs here, on the pool worker
            route.basic_auth.check(request.headers.get_all("authorization"), self._original_client(ex, runtime))
        if route.redirect is not None:
            ex.route = route
            host = self._redirect_host(request) if route.redirect.needs_host else None
            return None, (route.redirect.status, location(route.redirect, host, path, query))
        upstream = runtime.upstreams[route.upstream]
        ex.route = route
        ex.record.upstream = upstream.name
        body = "chunked" if request.chunked else "length" if request.content_length else "none"
        scheme = ex.session.scheme
        if runtime.trusted:  # the scheme a trusted balancer saw (it ended TLS), as Traefik passes it on
            scheme = self._forwarded_proto(ex, runtime) or scheme
        out = Outbound(request.method, target, "", ex.session.client_ip, scheme, route.headers, body,
                       tunnel_upgrade(request.upgrade) if request.upgrade is not None else None,
                       ex.record.request_id,
                       runtime.is_trusted(ex.session.client_ip) and not ex.session.relayed_unnamed)
        return upstream, out

    @staticmethod
    def _forwarded_proto(ex: Exchange, runtime) -> str | None:
        """"http" or "https": how the client came to a trusted proxy, by its X-Forwarded-Proto; else None.
        Only a peer in server.trusted_proxies is believed (with none listed, nobody is: as for allow /
        deny), and only the nearest value, the one that proxy wrote; a PROXY header's client is the peer,
        as everywhere."""
        if "x-forwarded-proto" not in ex.request.headers.names:
            return None
        if not runtime.trusted or ex.session.relayed_unnamed or not runtime.is_trusted(ex.session.client_ip):
            return None
        nearest = ex.request.headers.get_all("x-forwarded-proto")[-1].rsplit(",", 1)[-1].strip().lower()
        return nearest if nearest in ("http", "https") else None

    @staticmethod
    def _redirect_host(request: RequestHead) -> str:
        """The Host a redirect keeps (its port dropped); HTTP/1.0 may send none, and then there is no URL."""
        host = host_without_port(request.host)
        if not host:
            raise ProtocolError(400, "a redirect needs the request's Host header")
        return host

    def _answer_redirect(self, ex: Exchange, status: int, target: str) -> None:
        """A redirect answered by the proxy (no upstream); a body the client sent is not read."""
        if not ex.body_done:
            ex.client_keep_alive = False  # unread body bytes would be taken for the next request
        payload = redirect_response(status, target, close=not ex.client_keep_alive,
                                    head_only=ex.request.method == "HEAD", extra_headers=self._request_id_header(ex))
        ex.record.status = status
        try:
            ex.conn.set_timeouts(self.app.settings.send_timeout, self.app.settings.send_timeout)
            ex.conn.transition(WRITING)
            ex.conn.sendall(payload)
            ex.record.head_sent = _head_of(payload)
            ex.record.bytes_sent += len(payload)
        except OSError:
            ex.client_keep_alive = False
            ex.conn.close()

    def _request_id(self, request: RequestHead) -> str:
        """The client's X-Request-Id if it is a sane token, else a new one: it goes into every log
        line, to the backend and back to the client, so 16 KiB of it, or spaces, control characters
        and non-ASCII bytes (header values are read as latin-1), are replaced, as Heroku's router does."""
        if "x-request-id" in request.headers.names:  # most requests bring none: no lookup then
            offered = request.headers.get("x-request-id")
            if offered and len(offered) <= MAX_CLIENT_REQUEST_ID and offered.isascii() and offered.isprintable() \
                    and " " not in offered:
                return offered
        return self._request_ids.new()

    # -- attempts and retries ------------------------------------------------------------------
    @staticmethod
    def _original_client(ex: Exchange, runtime) -> str:
        """The address the request started from (behind trusted proxies, the one they forwarded for)."""
        if ex.session.relayed_unnamed:
            return ex.session.client_ip
        forwarded_for = ", ".join(ex.request.headers.get_all("x-forwarded-for"))  # every field, in order
        return runtime.original_client(ex.session.client_ip, forwarded_for)

    def _send_with_retries(self, ex: Exchange, upstream, out: Outbound) -> None:
        tried = []
        attempts_left = 1 + upstream.config.retries
        last_error: ProxyError | None = None
        fresh = False  # after a stale pooled connection: the retry dials a new one
        failed_unanswered = None  # why the last server failed before answering, until the retry is made
        # The client address ip_hash keys on: behind trusted proxies, the one they forwarded for. The
        # other policies ignore it: no header parsing per request for them.
        client_ip = (ex.session.client_ip if upstream.config.policy != "ip_hash"
                     else self._original_client(ex, self.app.runtime))
        while attempts_left > 0:
            attempts_left -= 1
            server = upstream.pick_server(client_ip, exclude=tried, retry_of=last_error)
            if server is None:
                if last_error is not None:
                    raise last_error
                raise NoServerAvailable(upstream.no_server_detail())
            if failed_unanswered is not None:  # logged here, once a retry is really made
                log.info("retrying %s %s on %s: %s", ex.request.method, ex.request.target, server.address,
                         failed_unanswered)
                failed_unanswered = None
            tried.append(server)
            ex.record.server = server.address
            out.host = ex.request.host if upstream.config.preserve_host and ex.request.host else server.address
            try:
                ex.server = server
                yield from self._attempt(ex, upstream, server, out, fresh)
                if server.failure_statuses:  # passive.statuses: a 5xx may count as a failure
                    server.record_response(ex.record.status)
                return
            except UpstreamConnectError as exc:
                server.record_failure(exc.detail)
                last_error = exc  # nothing was sent: always safe to try the next server
            except UpstreamFailed as exc:
                if not exc.stale and exc.no_response and self._repeatable(ex):
                    # The server failed (killed, reset) before answering an idempotent request:
                    # RFC 9110 §9.2.2 allows repeating it, as nginx's proxy_next_upstream does. It
                    # counts against the server and against `retries`, and goes to another server.
                    server.record_failure(exc.detail)
                    last_error = exc
                    failed_unanswered = exc.detail
                    continue
                if not (exc.stale and self._repeatable(ex, any_method=exc.not_taken)):
                    if not exc.stale:
                        server.record_failure(exc.detail)
                    raise
                last_error = exc
                tried.pop()  # a stale pooled connection is not the server's fault
                # Nor does it use up `retries` (those count further servers): the stale race must
                # never reach a client when a retry is safe. Bounded: a new connection is never
                # stale, so this happens at most once per request.
                if not fresh:
                    attempts_left += 1
                fresh = True
                log.debug("retrying after stale connection to %s", server.address)
            except UpstreamTimeout as exc:
                server.record_failure(exc.detail)
                raise
            finally:
                if not ex.handed_to_tunnel:
                    server.release()
        raise last_error or NoServerAvailable(upstream.no_server_detail())

    @staticmethod
    def _repeatable(ex: Exchange, any_method: bool = False) -> bool:
        """Safe to send again: idempotent (RFC 9110 §9.2.2; a POST's bytes may have reached a server
        that acted on them before it failed, so it is never resent, as in nginx and Go), nothing of the
        response reached the client, and the body is still whole here (or none of it was sent).
        ``any_method``: the server said it did not take the request (a 408), so the method is no bar."""
        if ex.response_started or ex.replay is None or (ex.request.method not in IDEMPOTENT and not any_method):
            return False
        has_body = ex.request.chunked or bool(ex.request.content_length)
        return not has_body or ex.body_done or not ex.replay

    def _attempt(self, ex: Exchange, upstream, server, out: Outbound, fresh: bool = False) -> None:
        """One try on one server: send the request, relay the response, and give the connection back to
        the pool (kept if the exchange left it reusable). One generator for all of it on the common path."""
        pool = upstream.pools[server]
        if pool.proxy_protocol is not None:  # its connections name a client: only that client's fit
            upstream_conn = self._checkout_for_client(ex, pool, fresh)
        elif fresh:
            upstream_conn = pool.connect()
        elif ex.request.method in IDEMPOTENT:
            upstream_conn = pool.checkout()
        else:  # it cannot be resent if the connection turns out stale: only a recently used one
            upstream_conn = pool.checkout(max_idle=NON_IDEMPOTENT_MAX_IDLE)
        reusable = False
        try:
            head = build_request_head(ex.request, out)
            link = UpstreamLink(upstream_conn, ex)
            if ex.request.expect_continue and not ex.body_done:
                response, parser = yield from self._send_expecting_continue(ex, link, head)
            else:
                try:
                    if _no_body_to_send(ex):  # the common case: no generator for the body
                        link.send(head)
                    else:
                        yield from self._send_body(ex, link, head)
                except (UpstreamFailed, UpstreamTimeout):
                    # The server may have answered (413, 401, ...) and closed, or stopped reading, before
                    # taking the whole body, which RFC 9112 §9.6 allows: relay its answer, as nginx does,
                    # rather than a 502/504.
                    if not _has_early_answer(link.sock):
                        raise
                response, parser = yield from self._read_response_head(ex, link)
            reusable = yield from self._relay_response(ex, link, response, parser)
        finally:
            if ex.conn.state is not TUNNEL:  # otherwise the tunnel relay owns the socket now
                pool.release(upstream_conn, reusable)

    @staticmethod
    def _checkout_for_client(ex: Exchange, pool, fresh: bool):
        """_attempt's checkout for a server with send_proxy_protocol, by the same rules."""
        origin = _origin(ex)
        if fresh:
            return pool.connect(origin)
        max_idle = None if ex.request.method in IDEMPOTENT else NON_IDEMPOTENT_MAX_IDLE
        return pool.checkout(max_idle=max_idle, origin=origin)

    def _send_expecting_continue(self, ex: Exchange, link, head: bytes):
        """Expect: 100-continue: the head, then the body once the server asks for it (or the client sends
        it anyway); returns the final response head and its parser."""
        link.send(head)
        response, parser = yield from self._await_continue(ex, link)
        if response is None:  # the client sent its body without waiting, or 100 arrived
            try:
                yield from self._send_body(ex, link, b"")
            except (UpstreamFailed, UpstreamTimeout):
                if not _has_early_answer(link.sock):  # as in _attempt: a refusal (413) sent mid-body
                    raise
            # After a 100 the parser goes on: the final response may have come in the same read.
            response, parser = yield from self._read_response_head(ex, link, parser=parser)
        return response, parser

    # -- request body ------------------------------------------------------------------------
    def _send_body(self, ex: Exchange, link, head: bytes) -> None:
        """Stream the request body upstream, coalescing what is already buffered into few sends."""
        if _send_settled_body(ex, link, head):
            return
        parser = ex.session.parser
        if not ex.request.chunked and ex.request.content_length > SPLICE_BODY_MIN:
            yield from self._splice_body(ex, link, head, parser)
            return
        pending = [head] if head else []
        chunked = ex.request.chunked
        while True:
            try:
                event = parser.next_event()
            except ProtocolError:
                raise
            if event is NEED_DATA:
                if pending:
                    link.send(b"".join(pending))
                    pending.clear()
                parser.feed((yield from self._read_client(ex)))
                continue
            if type(event) is Data:
                piece = encode_chunk(event.data) if chunked else event.data
            elif type(event) is EndOfMessage:
                piece = LAST_CHUNK if chunked else b""
                ex.body_done = True
            else:  # pragma: no cover - the parser only yields these inside a body
                raise ProtocolError(400, "unexpected message in request body")
            if piece:
                pending.append(piece)
                self._keep_for_replay(ex, piece)
            if ex.body_done:
                link.send(b"".join(pending))
                return

    def _splice_body(self, ex: Exchange, link, head: bytes, parser) -> None:
        """A large Content-Length body: what is buffered goes with the head, the rest in the kernel."""
        link.send(head + parser.take_buffered())
        ex.replay = None  # not kept: such a request is never retried once it started
        remaining = parser.body_remaining
        if remaining:
            ex.conn.set_timeouts(CLIENT_PATIENCE, CLIENT_PATIENCE)
            gaps = {"read_gap": self.app.settings.body_timeout, "write_gap": link.conn_timeout()}
            try:
                if not (ex.conn.readable_now() or _readable([ex.conn.sock], UPLOAD_GRACE)):  # stalled: no worker waits
                    yield Copy(ex.conn.sock, link.sock, remaining, **gaps)
                else:
                    try:
                        zerocopy.relay(ex.conn.sock, link.sock, remaining, budget=TRANSFER_BUDGET, watch="source")
                    except WriteTimedOut as stalled:  # the server stopped reading: a 504, and the pipe is ours
                        zerocopy.close_pipe(stalled.stall.pipe)
                        raise
                    except TimeoutError as stalled:  # the client stopped sending: the relay carries on
                        yield self._rest_of(stalled.stall, ex.conn.sock, link.sock, remaining, **gaps)
            except PeerClosed as exc:
                raise ClientGone("client closed during the request body") from exc
            except WriteTimedOut as exc:
                raise UpstreamTimeout("upstream stopped reading the request body") from exc
            except TimeoutError as exc:
                raise ProtocolError(408, "request body not received in time") from exc
            except OSError as exc:
                if _client_broke(ex.conn.sock):  # a cancelled upload is not the server's failure
                    raise ClientGone(f"client failed during the request body: {exc.strerror or exc}") from exc
                raise UpstreamFailed(f"sending the body upstream failed: {exc.strerror or exc}") from exc
        parser.body_remaining = 0
        ex.body_done = True

    @staticmethod
    def _keep_for_replay(ex: Exchange, piece: bytes) -> None:
        if ex.replay is not None:
            ex.replay.append(piece)
            if sum(map(len, ex.replay)) > REPLAY_LIMIT:
                ex.replay = None

    def _read_client(self, ex: Exchange) -> bytes:
        conn = ex.conn
        try:
            # Past the budget a client that trickles (a small piece before each patience runs out)
            # waits for its next bytes in the relay too, or it would keep this worker to the end.
            if time.monotonic() - ex.record.started > TRANSFER_BUDGET and not conn.readable_now():
                yield Readable(conn.sock, self.app.settings.body_timeout)
            while True:
                conn.set_timeouts(CLIENT_PATIENCE, CLIENT_PATIENCE)  # again after a wait: see resume()
                try:
                    data = conn.read_some(READ_SIZE)
                    break
                except TimeoutError:  # nothing came: wait in the server's relay, not on this thread
                    yield Readable(conn.sock, self.app.settings.body_timeout)
        except TimeoutError as exc:
            raise ProtocolError(408, "request body not received in time") from exc
        except OSError as exc:
            raise ClientGone(str(exc)) from exc
        if not data:
            raise ClientGone("client closed during the request body")
        return data

    def _await_continue(self, ex: Exchange, link):
        """RFC 9110 §10.1.1: wait for the upstream's 100 (relay it) or the client's body, whichever first."""
        if ex.session.parser.has_buffered_data or ex.told_to_continue:
            # The client sent body bytes without waiting (they came with the head, so the socket
            # will not turn readable for them), or was told to go on before this retry: send the
            # body now rather than wait for a 100 that a server may never send (it MAY omit 100).
            return None, None
        ready = _readable([ex.conn.sock, link.sock], min(CLIENT_PATIENCE, link.conn_timeout()))
        if not ready:
            # The rest of the second is waited in the server's relay, not on this worker: a flood of
            # such requests would otherwise fill the pool. It waits on the server, whose 100 or early
            # answer ends it; a client that sends its body anyway is seen once it is over.
            try:
                yield Readable(link.sock, min(EXPECT_PATIENCE, link.conn_timeout()))
                ready = {link.sock.fileno()}
            except TimeoutError:
                ready = _readable([ex.conn.sock], 0)
            except OSError as exc:
                raise UpstreamFailed(f"upstream connection failed: {exc.strerror or exc}") from exc
        if not ready:
            # Neither the server's answer nor the client's body came: tell the client to go on, as
            # nginx does, so that waiting for its body parks the connection instead of holding this
            # worker until read_timeout. A later 100 from the server is then not relayed twice.
            if ex.request.version == "HTTP/1.1":
                yield from self._send_1xx(ex, CONTINUE_HEAD)
                ex.told_to_continue = True
            return None, None
        if link.sock.fileno() not in ready:
            return None, None
        # (None, the parser) once a 100 Continue was relayed: now the body
        return (yield from self._read_response_head(ex, link, stop_at_continue=True))

    # -- response ------------------------------------------------------------------------------
    def _read_response_head(self, ex: Exchange, link, stop_at_continue: bool = False, parser=None):
        """The final response head and its parser (``parser``: one that already stopped at a 100 and
        may hold what followed it). ``stop_at_continue``: return (None, parser) once a 100 is relayed."""
        if parser is None:
            parser = ResponseParser(ex.request.method, max_header_bytes=self.app.settings.max_response_header_bytes,
                                    known_heads=self.known_responses)
            event = NEED_DATA  # a new parser holds nothing yet: read before asking it
            interim = 0
        else:
            event = None  # ask it first: the final head may be buffered behind the 100
            interim = 1  # that 100
        while True:
            if event is NEED_DATA:
                data = link.recv() if link.received_any else link.first_answer(ex.conn.sock, self.hangups)
                if not data:
                    raise UpstreamFailed("upstream closed the connection without a response",
                                         stale=link.fresh_failure(), no_response=not link.received_any)
                parser.feed(data)
            try:
                event = parser.next_event()
            except ProtocolError as exc:
                raise UpstreamFailed(f"invalid response from upstream: {exc.reason}") from exc
            if event is NEED_DATA:
                continue
            # A head. After a 1xx the loop asks the parser again before reading: the final
            # response may already be buffered behind it.
            response: ResponseHead = event
            if response.status == 408 and not interim and self._closing_when_reused(ex, link):
                raise UpstreamFailed("upstream answered 408 on a reused connection", stale=True, not_taken=True)
            if 100 <= response.status < 200 and response.status != 101:
                interim += 1
                if interim > MAX_INTERIM_RESPONSES:  # a backend looping on 1xx: the client gets a 502
                    raise UpstreamFailed("upstream sent too many 1xx responses")
                if response.status == 100 and ex.told_to_continue:
                    continue  # the client had its 100 from the proxy already
                yield from self._send_interim(ex, response)
                if response.status == 100 and stop_at_continue:
                    return None, parser
                continue
            if response.chunked and "content-length" in response.headers:
                # RFC 9112 §6.3 item 3: "ought to be handled as an error" -- the response-splitting
                # signature; the parser would let chunked win, a proxy refuses it (nginx: 502).
                raise UpstreamFailed("upstream sent both Content-Length and Transfer-Encoding")
            if response.content_length is None and response.status != 101 and not _chunked_only(response):
                # Only chunked is decoded, and Transfer-Encoding is hop-by-hop: a body in any other
                # coding (gzip, chunked twice) would reach the client as if it were the content.
                # nginx refuses these too: 502 "upstream sent unknown Transfer-Encoding".
                raise UpstreamFailed("upstream sent an unsupported Transfer-Encoding")
            return response, parser

    def _closing_when_reused(self, ex: Exchange, link) -> bool:
        """A 408 as the first answer on a reused connection: the server timed the idle connection out as
        the request went in (it sends one as it closes), and did not take the request. Resending it on
        a new connection is then safe if the body can be sent whole again, as HAProxy does."""
        return link.upstream_conn.reused and self._repeatable(ex, any_method=True)

    def _send_interim(self, ex: Exchange, response: ResponseHead):
        if ex.request.version == "HTTP/1.1":  # RFC 9110 §15.2: never send 1xx to 1.0 clients
            yield from self._send_1xx(ex, interim_head(response))

    def _send_1xx(self, ex: Exchange, head: bytes):
        """An interim response: neither the answer (a failure after it still gets a final status) nor
        body bytes in the access log."""
        ex.record.interim_sent = getattr(ex.record, "interim_sent", 0) + len(head)
        yield from self._to_client(ex, head, final=False)

    def _relay_response(self, ex: Exchange, link, response: ResponseHead, parser) -> bool:
        request = ex.request
        ex.record.status = response.status
        if response.status == 101:
            return (yield from self._start_tunnel(ex, link, response, parser))
        no_body = request.method == "HEAD" or response.status in (204, 304)
        if no_body:
            framing = "none"
        elif response.chunked or response.content_length is None:
            # Re-chunk both chunked and close-delimited bodies for 1.1 clients: the client keeps
            # its connection. A 1.0 client gets a close-delimited body (it cannot read chunked).
            framing = "chunked" if request.version == "HTTP/1.1" else "close"
        else:
            framing = "length"
        encoder = None
        if ex.route is not None and ex.route.compress is not None and framing != "none":
            response, encoder = compression_for(ex.route.compress, request, response)
            if encoder is not None:  # compressed bodies are re-framed: no Content-Length, no splice
                framing = "chunked" if request.version == "HTTP/1.1" else "close"
        if framing == "close" or not ex.body_done:
            ex.client_keep_alive = False
        if self.app.draining():
            ex.client_keep_alive = False
        head = build_response_head(response, framing=framing, keep_alive=ex.client_keep_alive,
                                   client_version=request.version,
                                   request_id=ex.record.request_id if self.app.return_request_id else None,
                                   extra_fields=ex.rate_limit_fields)
        ex.record.head_sent = head  # its length is taken only if the access log asks (body_bytes)
        ex.conn.transition(WRITING)
        if framing == "none":
            yield from self._to_client(ex, head)
            complete = not parser.has_buffered_data  # a body on HEAD/204/304: never reuse that connection
        elif framing == "length":
            complete = yield from self._relay_length(ex, link, head, parser, response.content_length)
        elif framing == "chunked":
            complete = yield from self._relay_events(ex, link, head, parser, chunked=True, encoder=encoder)
        else:
            try:
                complete = yield from self._relay_events(ex, link, head, parser, chunked=False, encoder=encoder)
            except ProxyError:
                # A close-delimited body ends at our FIN, so after an upstream failure a FIN would
                # tell the client it has the whole body. The abort that follows must be a reset
                # (not before the head went out: then a plain 502 follows, and a FIN after it).
                if ex.response_started:
                    _reset_on_close(ex.conn.sock)
                raise
        return complete and response.keep_alive and ex.body_done and not parser.body_close_delimited

    def _relay_length(self, ex: Exchange, link, head: bytes, parser, length: int) -> bool:
        buffered = parser.take_buffered()
        first = buffered[:length]
        data = head + first
        sent = self._send_now(ex, data)
        if sent < len(data):
            yield from self._send_later(ex, memoryview(data)[sent:])
        remaining = length - len(first)
        if remaining:
            relayed = 0  # of the remaining bytes, those that reached the client (for bytes_sent)
            try:
                try:
                    ex.conn.splice_from(link.sock, remaining, budget=TRANSFER_BUDGET)
                    relayed = remaining
                except WriteTimedOut as stalled:  # the client stopped reading: the relay carries on
                    rest = self._rest_of(stalled.stall, link.sock, ex.conn.sock, remaining,
                                         read_gap=link.conn_timeout(), write_gap=self.app.settings.send_timeout)
                    relayed = stalled.stall.moved
                    try:
                        yield rest
                    finally:  # done or failed, what the relay moved went to the client
                        relayed += rest.moved
                except OSError as failed:  # partway (the server quit, a reset): count what went out
                    relayed = failed.stall.moved if getattr(failed, "stall", None) else 0
                    raise
            except PeerClosed as exc:
                raise UpstreamFailed(f"upstream closed mid-body: {exc}") from exc
            except WriteTimedOut as exc:  # the client took nothing for send_timeout: not the server's fault
                raise ClientGone("client stopped reading the response") from exc
            except TimeoutError as exc:
                raise UpstreamTimeout("upstream body stalled") from exc
            except OSError as exc:
                if _client_broke(ex.conn.sock):
                    raise ClientGone(str(exc)) from exc
                raise UpstreamFailed(f"upstream failed mid-body: {exc.strerror or exc}") from exc
            finally:
                ex.record.bytes_sent += relayed
        return not parser.has_buffered_data  # bytes after the body: never reuse that connection

    def _relay_events(self, ex: Exchange, link, head: bytes, parser, chunked: bool, encoder=None) -> bool:
        """Chunked or close-delimited upstream bodies: decode, (compress,) re-frame for the client, and
        send what each upstream read gave before reading again, so event streams stay live. Trailers
        are kept: they describe the whole message."""
        encoder = encoder or _AS_IS
        frame = encode_chunk if chunked else bytes
        pending = head
        while True:
            try:
                event = parser.next_event()
            except ProtocolError as exc:
                raise UpstreamFailed(f"invalid response body: {exc.reason}") from exc
            if event is NEED_DATA:
                pending += frame(encoder.flush())
                if pending:
                    yield from self._to_client(ex, pending)
                    pending = b""
                data = link.recv()
                if data:
                    parser.feed(data)
                else:
                    parser.feed_eof()
                continue
            if type(event) is Data:
                pending += frame(encoder.compress(event.data))
            else:  # EndOfMessage
                pending += frame(encoder.finish())
                if chunked:
                    pending += self._last_chunk(event.trailers)
                yield from self._to_client(ex, pending)
                return not parser.has_buffered_data  # bytes after the last chunk: never reuse

    @staticmethod
    def _last_chunk(trailers) -> bytes:
        if not trailers:
            return LAST_CHUNK
        lines = "".join(f"{name}: {value}\r\n" for name, value in trailers)
        return b"0\r\n" + lines.encode("latin-1") + b"\r\n"

    def _to_client(self, ex: Exchange, data: bytes, final: bool = True) -> None:
        sent = self._send_now(ex, data, final)
        if sent < len(data):  # the client's buffer stayed full: the relay sends the rest
            yield from self._send_later(ex, memoryview(data)[sent:])

    @staticmethod
    def _send_now(ex: Exchange, data: bytes, final: bool = True) -> int:
        """What the client takes of ``data`` within CLIENT_PATIENCE (normally all of it), counted as sent."""
        ex.response_started = ex.response_started or final
        conn = ex.conn
        try:
            conn.set_write_timeout(CLIENT_PATIENCE)
            sent = conn.send_some(data)
        except OSError as exc:
            raise ClientGone(str(exc)) from exc
        ex.record.bytes_sent += sent
        return sent

    def _send_later(self, ex: Exchange, rest_of_data: memoryview) -> None:
        """The part of an answer the client did not take at once, sent by the server's relay."""
        rest = Send(ex.conn.sock, rest_of_data, self.app.settings.send_timeout)
        try:
            yield rest
        except OSError as exc:  # WriteTimedOut included: the client took nothing for send_timeout
            raise ClientGone(str(exc)) from exc
        finally:  # done or failed, what the relay sent went to the client
            ex.record.bytes_sent += rest.sent

    @staticmethod
    def _rest_of(stall, source, dest, count: int, read_gap: float, write_gap: float) -> Copy:
        """The part of a ``count``-byte relay left after it stalled, as a wait for the server's relay."""
        left = count - stall.moved - stall.in_pipe - len(stall.unsent)
        return Copy(source, dest, left, read_gap, write_gap, pipe=stall.pipe, in_pipe=stall.in_pipe,
                    buffer=stall.unsent)

    def _start_tunnel(self, ex: Exchange, link, response: ResponseHead, parser) -> bool:
        offered = tunnel_upgrade(ex.request.upgrade)
        if offered is None:
            raise UpstreamFailed("upstream switched protocols without an Upgrade request")
        if not _switch_offered(response.headers.get("upgrade"), offered):
            # RFC 9110 §7.8: a server must not switch to a protocol the client did not ask for.
            raise UpstreamFailed("upstream switched to a protocol the client did not offer")
        head = build_response_head(response, framing="upgrade", keep_alive=True, client_version="HTTP/1.1")
        ex.record.head_sent = head  # what the tunnel relays after it counts as body
        ex.conn.transition(WRITING)
        yield from self._to_client(ex, head + parser.take_buffered())
        ex.conn.transition(TUNNEL)
        if ex.body_done:
            # The request is over: all that is buffered behind it belongs to the new protocol. (Without
            # this, take_buffered() kept it as a pipelined next request, and it never reached the server.)
            ex.session.parser.start_next()
        leftover = ex.session.parser.take_buffered()
        link.detach()
        # The relay thread owns both sockets, the access-log record (logged at the close, with every
        # byte and the whole lifetime, as nginx does) and the server slot (an open WebSocket is a
        # connection to that server for max_connections and least_connections, as in nginx) from
        # here; this worker goes back to the pool.
        ex.handed_to_tunnel = True
        self.tunnels.start_tunnel(ex.conn, link.sock, leftover, self.app.settings.tunnel_timeout,
                                  ex.record, ex.server.release)
        return False


class _AsIs:
    """The encoder of a body relayed as it came (the compressors' interface)."""

    @staticmethod
    def compress(data: bytes) -> bytes:
        return data

    @staticmethod
    def flush() -> bytes:
        return b""

    finish = flush


_AS_IS = _AsIs()


def _client_broke(sock) -> bool:
    """After a relay between client and server failed with an OSError, which carries no side: True if
    the client's socket is the broken one (reset or closed). TLS: the raw socket is peeked (SSLSocket
    refuses MSG_PEEK); ciphertext waiting means open."""
    try:
        return socket.socket.recv(sock, 1, _PEEK_NOWAIT) == b""
    except BlockingIOError:
        return False  # open, nothing waiting: the client is fine
    except OSError:
        return True


def _reset_on_close(sock) -> None:
    """Make the socket's close send a RST instead of a FIN (SO_LINGER on, zero timeout)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    except OSError:  # already gone: it cannot end cleanly either
        pass


def _head_of(answer: bytes) -> bytes:
    """The head of an answer the proxy wrote itself (all of it for a HEAD request's)."""
    end = answer.find(b"\r\n\r\n")
    return answer if end < 0 else answer[:end + 4]


def _chunked_only(response: ResponseHead) -> bool:
    """No Transfer-Encoding (close-delimited), or exactly "chunked": what the relay can decode."""
    values = response.headers.get_all("transfer-encoding")
    if not values:
        return True
    codings = [item.strip(" \t").lower() for value in values for item in value.split(",")]
    return [coding for coding in codings if coding] == ["chunked"]


def _protocols(header: str | None) -> list[str]:
    return [token.strip(" \t").lower() for token in (header or "").split(",") if token.strip(" \t")]


def _switch_offered(chosen: str | None, offered: str) -> bool:
    """A 101's Upgrade names protocols, every one of them among those the client offered."""
    switched = _protocols(chosen)
    return bool(switched) and set(switched) <= set(_protocols(offered))


def _field(headers, name: str) -> str | None:
    """The first value of a field (lowercase ``name``), or None. Most requests lack the fields asked
    for here, and a miss costs Headers.get three calls: a scan of the lowercase names costs none."""
    return headers.get(name) if name in headers.names else None


def _origin(ex: Exchange) -> Origin:
    """The client connection's origin for an upstream's PROXY header: what a PROXY header told us, or
    the connection's own peer and local address (worked out once per connection, on first need)."""
    session = ex.session
    if session.origin is None:
        local = ex.conn.sock.getsockname()
        session.origin = Origin(session.client_ip, ex.conn.peer[1], local[0], local[1])
    return session.origin


def _take_for_reading(conn) -> bool:
    """Move a dispatched connection to READING; False if it was closed meanwhile. A drain closes
    resting connections from the accept loop, and one can be closed in the moment between a worker
    handing it back and dispatching it again for a request already buffered. An HTTP/2 connection
    can be taken meanwhile (TUNNEL) by the thread closing it after its GOAWAY."""
    try:
        conn.transition(READING)
    except IllegalTransition:
        if conn.closed or conn.state is TUNNEL:
            return False
        raise
    return True


def _send_settled_body(ex: Exchange, link, head: bytes) -> bool:
    """The cases every client side shares: no body (the head alone), or a retry resending the body
    bytes kept from the first attempt. True when that was all there was to send."""
    if _no_body_to_send(ex):
        if head:
            link.send(head)
        return True
    if ex.body_done:
        link.send(head + b"".join(ex.replay))
        return True
    return False


def _no_body_to_send(ex: Exchange) -> bool:
    """A request with no body bytes to send (none, nor any kept for a retry): its head goes alone."""
    return ex.body_done and ex.replay is not None and not ex.replay


def _wants_whole_body(request: RequestHead) -> bool:
    """A small Content-Length body the client sends at once (no Expect: 100-continue, no Upgrade)."""
    length = request.content_length
    return (bool(length) and length <= SMALL_BODY_MAX and not request.expect_continue
            and request.upgrade is None)


def _readable(socks, timeout: float) -> set[int]:
    """The descriptors among ``socks`` that are readable (or hung up) within ``timeout`` seconds.

    poll(), not select(): select() refuses descriptors >= FD_SETSIZE (1024), which a busy proxy has.
    """
    poller = select.poll()
    for sock in socks:
        poller.register(sock, select.POLLIN)
    return {fd for fd, _ in poller.poll(timeout * 1000)}


def _has_early_answer(sock) -> bool:
    """Bytes from the server wait on a connection whose request body could not be sent in full."""
    try:
        if isinstance(sock, ssl.SSLSocket):  # MSG_PEEK is not allowed on TLS sockets
            return bool(sock.pending() or _readable([sock], 0))
        return bool(sock.recv(1, _PEEK_NOWAIT))
    except OSError:  # nothing (EAGAIN), or a reset with nothing before it
        return False


def _tls_pending(conn) -> bool:
    """Decrypted bytes inside OpenSSL: epoll would never wake a parked connection for them."""
    pending = getattr(conn.sock, "pending", None)
    return pending is not None and pending() > 0


class UpstreamLink:
    """The upstream side of one attempt: sends and receives, mapping socket errors to typed ones."""

    __slots__ = ("upstream_conn", "sock", "ex", "received_any", "detached")

    def __init__(self, upstream_conn, ex: Exchange):
        self.upstream_conn = upstream_conn
        self.sock = upstream_conn.sock
        self.ex = ex
        self.received_any = False
        self.detached = False

    def fresh_failure(self) -> bool:
        """A reused connection that died before any response byte: the stale keep-alive race."""
        return self.upstream_conn.reused and not self.received_any

    def conn_timeout(self) -> float:
        """The connection's read_timeout (its socket's timeouts are set to it)."""
        return self.upstream_conn.read_timeout

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (BlockingIOError, TimeoutError) as exc:
            raise UpstreamTimeout("upstream stopped reading the request") from exc
        except OSError as exc:
            raise UpstreamFailed(f"sending to upstream failed: {exc.strerror or exc}",
                                 stale=self.fresh_failure(), no_response=not self.received_any) from exc

    def first_answer(self, client_sock, hangups) -> bytes:
        """The server's first bytes (b"" if it closed), in one blocking recv. ``hangups`` (a
        core.HangupWatch) watches the client meanwhile: one that hangs up shuts this socket down, the
        recv returns, and the wait ends as ClientGone (logged 499, as nginx does) instead of running
        until the server answers or read_timeout passes."""
        watched = hangups.watch(client_sock, self.sock)
        try:
            data = self.recv()
        except ProxyError:
            if hangups.unwatch(watched):
                raise ClientGone("client closed the connection before the response") from None
            raise
        if hangups.unwatch(watched):
            raise ClientGone("client closed the connection before the response")
        return data

    def recv(self) -> bytes:
        try:
            data = self.sock.recv(UPSTREAM_READ_SIZE)
        except (BlockingIOError, TimeoutError) as exc:  # SO_RCVTIMEO: read_timeout passed
            raise UpstreamTimeout("upstream did not answer in time") from exc
        except OSError as exc:
            raise UpstreamFailed(f"upstream connection failed: {exc.strerror or exc}",
                                 stale=self.fresh_failure(), no_response=not self.received_any) from exc
        if data:
            self.received_any = True
        return data

    def detach(self) -> None:
        """The tunnel owns the socket now: make sure the pool never gets it back."""
        self.detached = True
