"""HTTP/2 client connections on the existing design: a connection parked without a thread while idle, each
stream a request through the same pipeline as HTTP/1.1, served by its own pool worker.

``Http2Server.serve`` runs when the connection is readable (core dispatches it like any other): it feeds
what arrived to the connection's ``H2Session`` (proxy/http2/session.py), submits each new request
to the pool, and parks the connection again. ``Http2StreamHandler`` is the HTTP/1.1 handler with the
client side swapped: the same ``_exchange`` (routing, balancing, retries, health, header rules,
request ids, access log, metrics), but the response goes out as HEADERS and DATA frames within the
client's flow-control windows, and the request body comes from the stream's DATA frames.
"""

from __future__ import annotations

import functools
import logging
import threading
import time

from h2.errors import ErrorCodes

from core import ConnectionState
from core.thread_pool import PoolClosed
from proxy.http.compression import compression_for
from proxy.http.errors import ClientGone, ProxyError, UpstreamFailed
from proxy.http.forwarding import RATE_LIMIT_FIELDS
from proxy.http.http1 import LAST_CHUNK, NEED_DATA, Data, ProtocolError, encode_chunk
from proxy.http.redirects import redirect_response
from proxy.http.responses import html_response, plain_response
from proxy.http2.mapping import (from_http1_payload, interim_block, request_from_block, request_trailers,
                                 response_block, trailer_block)
from proxy.http2.flush_relay import FlushRelay
from proxy.http2.session import BODY, WINDOW, H2Session, StreamWait
from proxy.http2.timer import DeadlineTimer
from proxy.serve.handler import HttpHandler, RequestRecord, _AS_IS, _send_settled_body

log = logging.getLogger("pyproxy.http2")
S = ConnectionState


class StreamClient:
    """The client side of one stream, standing where ``_exchange`` expects the client's Connection."""

    __slots__ = ("session", "stream", "sock", "listener", "peer", "state")

    def __init__(self, session: H2Session, stream, conn):
        self.session = session
        self.stream = stream
        self.sock = conn.sock  # watched for a hang-up while the upstream thinks (core.HangupWatch)
        self.listener = conn.listener
        self.peer = conn.peer
        self.state = S.PROCESSING  # never WRITING: the HTTP/1.1 lingering close is not for a stream

    def close(self) -> None:
        """The exchange gave up on the client (it left, or an answer broke off): cancel the stream."""
        self.session.reset(self.stream, ErrorCodes.CANCEL)


class Http2Server:
    """Serves the HTTP/2 connections of one process: ``start`` one, ``serve`` it when readable."""

    def __init__(self, handler: HttpHandler, pool):
        self.app = handler.app
        self.streams = Http2StreamHandler(handler)
        self.pool = pool  # each stream runs on a worker of its own
        self.submit = pool.submit
        self.deadlines = DeadlineTimer()  # of the streams parked on their client (H2Session.park)
        self.flusher = FlushRelay()  # writes for the connections whose client is slow to read
        self._lock = threading.Lock()
        # Parked streams the stopping pool would not take back: (conn, session, stream), each ended by
        # the thread that closes its connection (``_connection_closed``).
        self._stranded: list = []
        self.connections = 0
        self.open_streams = 0
        self.streams_total = 0

    def counts(self) -> dict:
        return {"connections": self.connections, "streams": self.open_streams, "streams_total": self.streams_total}

    def start(self, conn, scheme: str, received: bytes = b"", origin=None, relayed_unnamed: bool = False) -> None:
        """A connection that negotiated h2 (or sent the h2c preface): from now on its ``server_data`` is
        an H2Session and ``serve`` is called for it instead of the HTTP/1.1 path. ``origin`` and
        ``relayed_unnamed``: what a PROXY header said about the client (see ClientSession)."""
        settings = self.app.settings
        session = H2Session(conn, client_ip=origin.src_ip if origin else str(conn.peer[0]), scheme=scheme,
                            max_streams=self.app.config.server.h2_max_streams,
                            max_header_bytes=settings.max_header_bytes, send_timeout=settings.send_timeout)
        session.origin, session.relayed_unnamed = origin, relayed_unnamed
        conn.server_data = session
        with self._lock:
            self.connections += 1
        conn.on_close = _also_on_close(conn.on_close, self._connection_closed)
        session.on_resume = functools.partial(self._resume, conn, session)
        session.timer = self.deadlines
        session.flusher = self.flusher
        self._settle(conn, session, session.start(received))

    def serve(self, conn):
        """Read the connection and park it again; the last new stream is returned, for this worker to run
        once core parked the connection (core.SocketServer): one hand-off less per request, and another
        worker reads the connection meanwhile, so a slow stream still holds up no other."""
        session = conn.server_data
        new_streams = session.pump()
        run_here = new_streams.pop() if new_streams else None
        self._settle(conn, session, new_streams, run_here)
        if run_here is not None:
            return functools.partial(self._run_stream, conn, session, run_here)
        return None

    def _settle(self, conn, session: H2Session, new_streams, run_here=None) -> None:
        """Hand the new streams to the pool, then park the connection (or close it when it is done).
        ``run_here``: one more new stream, which the caller runs itself."""
        if self.app.draining() and not session.goaway_sent:
            session.goaway()
        self._hand_over(conn, session, new_streams, run_here)
        if session.lost or (session.goaway_sent and not session.active_streams):
            self._close_after_goaway(conn, session, reading=True)
            return
        settings = self.app.settings
        conn.park_deadline = session.deadline(settings.idle_timeout, settings.header_timeout)
        if time.monotonic() >= conn.park_deadline:
            # Past its deadline while sending frames that are not requests (PINGs, WINDOW_UPDATEs): core's
            # reaper skips a connection a worker holds, and such a client is always being read when it looks.
            session.goaway()
            conn.close()
            return
        if not conn.claim(S.READING, S.IDLE):  # a stream's worker closed it meanwhile
            conn.close()
            return
        if not session.active_streams:
            # The last stream may have ended while this worker read: it left the connection (and its
            # deadline, computed above) to this worker.
            conn.park_deadline = session.deadline(settings.idle_timeout, settings.header_timeout)
            if session.lost or session.goaway_sent:
                self._close_after_goaway(conn, session)

    def _hand_over(self, conn, session: H2Session, new_streams, run_here=None) -> None:
        """New streams to the pool (a stream's worker that read the connection hands them over too)."""
        if run_here is not None or new_streams:
            with self._lock:
                self.open_streams += len(new_streams) + (run_here is not None)
                self.streams_total += len(new_streams) + (run_here is not None)
        for stream in new_streams:
            if not self._submit_stream(conn, session, stream):
                session.reset(stream, ErrorCodes.REFUSED_STREAM)  # the pool is full: the client may retry it
                self._stream_done(conn, session, stream)

    def _submit_stream(self, conn, session: H2Session, stream) -> bool:
        """Queue the stream for a worker. Streams may fill only half of the pool's queue: the other half
        is for connections to be read (this one's next frames among them), which core would otherwise
        shed, closing an HTTP/2 connection with every stream in progress on it."""
        if self.pool.queued >= self.pool.max_queue // 2:
            return False
        return self.submit(self._run_stream, conn, session, stream)

    def _run_stream(self, conn, session: H2Session, stream) -> None:
        if stream.reset:  # cancelled before a worker took it (rapid reset): costs the backends nothing
            self._stream_done(conn, session, stream)
            return
        stream.started = True
        stream.task = self._serve_stream(StreamClient(session, stream, conn), session, stream)
        self._advance(conn, session, stream)

    def _resume(self, conn, session: H2Session, stream) -> None:
        """The session's call, under its lock, for a parked stream whose wait is over."""
        try:
            self.pool.resubmit(self._advance, conn, session, stream)
        except PoolClosed:  # the process is stopping: the stream ends as its connection closes
            with self._lock:
                self._stranded.append((conn, session, stream))

    def _advance(self, conn, session: H2Session, stream) -> None:
        """Run the stream until it is done, or parked waiting on its client (``StreamWait``): then this
        worker lets go of it, and the session hands it back (``_resume``) when the wait is over."""
        try:
            while True:
                if session.park(stream, stream.task.send(None)):
                    return
        except StopIteration:
            pass
        except Exception:  # one stream's failure never takes the pool worker or the connection with it
            log.exception("HTTP/2 stream %d from %s failed", stream.id, session.client_ip)
        stream.task = None
        self._stream_done(conn, session, stream)

    def _serve_stream(self, client: StreamClient, session: H2Session, stream):
        """The stream's task: its request through the exchange, or the proxy's own answer to it."""
        try:
            request = request_from_block(stream.block, stream.end_stream, self.app.settings.max_header_bytes)
        except ProtocolError as exc:
            self.streams.answer_refused(client, exc.status, exc.reason)
        else:
            if request.content_length is not None and request.content_length > self.app.settings.max_body_bytes:
                self.streams.answer_refused(client, 413, "request body too large")
            else:
                session.requests += 1
                yield from self.streams._exchange(client, session, request)
        yield from self.streams.send_unsent(client)

    def _stream_done(self, conn, session: H2Session, stream) -> None:
        with self._lock:
            self.open_streams -= 1
        if session.finish(stream):
            self._close_after_goaway(conn, session)
        elif not session.active_streams:
            settings = self.app.settings
            conn.park_deadline = session.deadline(settings.idle_timeout, settings.header_timeout)

    def _connection_closed(self, conn) -> None:
        with self._lock:
            self.connections -= 1
        conn.server_data.closed()  # however it closed (core shedding it, a drain's end): the streams end
        if self._stranded:
            self._end_stranded(conn)

    def _end_stranded(self, conn) -> None:
        """At a drain's end the pool stopped before the connections closed: their parked streams end on
        this thread instead, so that each is logged and lets go of its upstream. The session is lost, so
        each ends at its first step (ClientGone), without waiting on anything."""
        with self._lock:
            mine = [entry for entry in self._stranded if entry[0] is conn]
            self._stranded = [entry for entry in self._stranded if entry[0] is not conn]
        for conn, session, stream in mine:
            self._advance(conn, session, stream)

    # -- what core asks of a connection ----------------------------------------------------------------
    def expire(self, conn) -> None:
        """Idle (or silent) past its deadline: GOAWAY, without waiting, before core closes it."""
        conn.server_data.goaway_nowait()

    def drain(self, conn) -> None:
        """A graceful drain began: GOAWAY now (on a worker: the lock may be busy for a moment)."""
        if not self.submit(self._goaway, conn):
            conn.close()

    def _goaway(self, conn) -> None:
        if conn.server_data.goaway():
            self._close_after_goaway(conn, conn.server_data)

    def _close_after_goaway(self, conn, session: H2Session, reading: bool = False) -> None:
        """The last stream after a GOAWAY is done: close as HTTP/1.1 does, lingering, so frames the client
        sent meanwhile do not turn the close into a reset that discards the last responses in flight. A
        lost connection (gone, or ended for an attack) closes at once. ``reading``: the caller is the
        worker reading the connection; otherwise the connection is closed only if parked (claimed from
        IDLE): a worker reading it meanwhile closes it once it is done (``Http2Server._settle``), as
        closing under it would drop the frames it answers and the ones still being written. It is
        claimed as a tunnel is (kept by this thread until closed), which a worker core dispatched to read
        it meanwhile leaves alone (``_take_for_reading`` in proxy/serve/handler.py)."""
        if not conn.claim(S.READING if reading else S.IDLE, S.TUNNEL):
            return
        if session.lost:
            conn.close()
            return
        if not reading:  # frames that came meanwhile: a stream racing the GOAWAY is refused, not dropped
            for stream in session.pump():
                session.reset(stream, ErrorCodes.REFUSED_STREAM)
        # Frames still waiting for a client slow to read: the close follows them, from a worker of the
        # pool then, as no worker waits for a slow client.
        if not session.when_written(functools.partial(self._close_later, conn, session)):
            _close_lingering(conn, session)

    def _close_later(self, conn, session: H2Session) -> None:
        try:
            self.pool.resubmit(_close_lingering, conn, session)
        except PoolClosed:
            conn.close()  # the process is stopping


def _close_lingering(conn, session: H2Session) -> None:
    if session.lost:
        conn.close()
        return
    conn.sock.settimeout(None)  # the session's socket is non-blocking; the linger reads with timeouts
    HttpHandler._close_lingering(conn)


def _declared_length(response) -> int | None:
    """The Content-Length of a HEAD or 304 answer: the size a GET would have, relayed as HTTP/1.1 does."""
    value = response.headers.get("content-length")
    return int(value) if value is not None and value.isdigit() and len(value) <= 18 else None


def _check_cancelled(stream) -> None:
    if stream.reset:
        raise ClientGone("client cancelled the stream")


def _upstream_recv(link, stream) -> bytes:
    """The next response bytes; ClientGone if the stream was cancelled meanwhile (the session shut the
    upstream socket down to wake us)."""
    try:
        data = link.recv()
    except ProxyError:
        _check_cancelled(stream)
        raise
    _check_cancelled(stream)
    return data


def _also_on_close(first, then):
    def on_close(conn):
        if first is not None:
            first(conn)
        then(conn)
    return on_close


class Http2StreamHandler(HttpHandler):
    """The HTTP/1.1 exchange with the client side replaced by a stream's (see the module docstring)."""

    def __init__(self, parent: HttpHandler):  # noqa: super().__init__ not called: the parent's pieces are shared
        self.app = parent.app
        self._request_ids = parent._request_ids
        self.hangups = parent.hangups
        self.known_responses = parent.known_responses
        self.tunnels = None

    def answer_refused(self, client: StreamClient, status: int, reason: str) -> None:
        """A stream whose head the proxy cannot serve: answered and logged, never forwarded."""
        record = RequestRecord(time.monotonic(), client.session.client_ip, None)
        record.version = "HTTP/2.0"
        record.status = status
        self._respond(client, plain_response(status, f"{status} {reason}", close=False), record)
        self.app.observe(record)

    # -- the request body ---------------------------------------------------------------------------------
    def _send_body(self, ex, link, head: bytes):
        if _send_settled_body(ex, link, head):
            return
        client = ex.conn
        settings = self.app.settings
        chunked = ex.request.chunked
        expected = ex.request.content_length
        received = 0
        link.send(head)
        session, stream = client.session, client.stream
        deadline = session.clock() + settings.body_timeout
        while True:
            piece = session.take_body(stream)
            if piece is None:  # none yet: wait for it without a thread
                if session.clock() >= deadline:
                    raise ProtocolError(408, "request body not received in time")
                yield StreamWait(BODY, deadline)
                continue
            if not piece:
                break
            deadline = session.clock() + settings.body_timeout
            received += len(piece)
            if received > settings.max_body_bytes:
                raise ProtocolError(413, "request body too large")
            if expected is not None and received > expected:
                raise ProtocolError(400, "request body longer than its Content-Length")
            data = encode_chunk(piece) if chunked else piece
            if data:
                link.send(data)
                self._keep_for_replay(ex, data)
        if expected is not None and received != expected:
            raise ProtocolError(400, "request body shorter than its Content-Length")
        if chunked:
            trailers = client.stream.trailers
            last = self._last_chunk(request_trailers(trailers)) if trailers else LAST_CHUNK
            link.send(last)
            self._keep_for_replay(ex, last)
        ex.body_done = True

    # -- the response ---------------------------------------------------------------------------------
    def _read_response_head(self, ex, link, stop_at_continue: bool = False, parser=None):
        """HTTP/1.1's, with the upstream socket lent to the stream: a client cancelling the stream shuts
        it down (H2Session), which ends the wait for the answer at once."""
        stream = ex.conn.stream
        stream.upstream = link.sock
        try:
            _check_cancelled(stream)
            return (yield from super()._read_response_head(ex, link, stop_at_continue, parser))
        except ProxyError:  # a shut-down upstream is no upstream failure: no 502, no retry
            _check_cancelled(stream)
            raise

    def _send_interim(self, ex, response):
        ex.conn.session.send_headers(ex.conn.stream, interim_block(response))
        return
        yield

    def _relay_response(self, ex, link, response, parser):
        request = ex.request
        ex.record.status = response.status
        if response.status == 101:
            raise UpstreamFailed("upstream switched protocols on an HTTP/2 stream")
        no_body = request.method == "HEAD" or response.status in (204, 304)
        encoder = None
        if ex.route is not None and ex.route.compress is not None and not no_body:
            response, encoder = compression_for(ex.route.compress, request, response)
        length = response.content_length if encoder is None and not response.chunked else None
        if no_body:  # the parser counts 0 bytes of body; the length to tell is the one the upstream sent
            length = _declared_length(response) if response.status != 204 else None
        request_id = ex.record.request_id if self.app.return_request_id else None
        session, stream = ex.conn.session, ex.conn.stream
        ex.response_started = True
        # The head waits for the first body bytes (or for the next upstream read): a small response
        # leaves in one write.
        block = response_block(response, request_id, length)
        if ex.rate_limit_fields:  # the route's RateLimit-* fields, in place of the upstream's own
            block = _with_rate_limit_fields(block, ex.rate_limit_fields)
        session.send_headers(stream, block, end_stream=no_body, flush=no_body)
        if no_body:  # reusable only as HTTP/1.1's would be: the server keeps it, and took the whole request
            return not parser.has_buffered_data and response.keep_alive and ex.body_done
        encoder = encoder or _AS_IS
        pending = b""  # body bytes decoded but not sent yet: the last piece goes with END_STREAM
        while True:
            try:
                event = parser.next_event()
            except ProtocolError as exc:
                raise UpstreamFailed(f"invalid response body: {exc.reason}") from exc
            if event is NEED_DATA:
                pending += encoder.flush()
                if pending:
                    yield from self._send(ex, pending)
                    pending = b""
                else:
                    session.flush()  # the head, before waiting on the upstream
                data = _upstream_recv(link, stream)
                if data:
                    parser.feed(data)
                else:
                    parser.feed_eof()
                continue
            if type(event) is Data:
                pending += encoder.compress(event.data)
                continue
            pending += encoder.finish()  # EndOfMessage
            if event.trailers:
                yield from self._send(ex, pending)
                session.end_stream(stream, trailer_block(event.trailers))
            else:
                yield from self._send(ex, pending, end_stream=True)
            break
        return (response.keep_alive and ex.body_done and not parser.body_close_delimited
                and not parser.has_buffered_data)

    def _send(self, ex, data: bytes, end_stream: bool = False):
        """Send body bytes as the client's windows allow, parked while they are shut (ClientGone past
        ``send_timeout`` without room for a byte)."""
        if data or end_stream:
            yield from self._send_within_windows(ex.conn, data, end_stream)
            ex.record.bytes_sent += len(data)

    def _send_within_windows(self, client: StreamClient, data, end_stream: bool):
        session, stream = client.session, client.stream
        rest = session.send_some(stream, data, end_stream)
        deadline = session.clock() + self.app.settings.send_timeout
        while rest:
            if session.clock() >= deadline:
                raise ClientGone("client did not open its flow-control window in time")
            yield StreamWait(WINDOW, deadline)
            left = len(rest)
            rest = session.send_some(stream, rest, end_stream)
            if len(rest) < left:  # progress: the client reads
                deadline = session.clock() + self.app.settings.send_timeout

    def send_unsent(self, client: StreamClient):
        """The end of an answer the proxy wrote itself that the client's windows did not take at once."""
        unsent, client.stream.unsent = client.stream.unsent, None
        if unsent:
            try:
                yield from self._send_within_windows(client, unsent, end_stream=True)
            except ClientGone:
                client.close()

    def _answer_error(self, ex, status: int, detail: str, body=None, headers: tuple = ()) -> None:
        if ex.response_started:  # the head went out: cancelling the stream is the only honest signal
            log.warning("aborting HTTP/2 response to %s after it started: %s", ex.session.client_ip, detail)
            ex.record.status = ex.record.status or status
            ex.conn.session.reset(ex.conn.stream, ErrorCodes.INTERNAL_ERROR)
            return
        if status >= 500:
            log.info("%s %s -> %d: %s", ex.request.method, ex.request.target, status, detail)
        kind, text = body or ("text", f"{status} {detail}")
        respond = html_response if kind == "html" else plain_response
        payload = respond(status, text, close=False, head_only=ex.request.method == "HEAD",
                          extra_headers=self._request_id_header(ex) + headers)
        ex.record.status = status
        self._respond(ex.conn, payload, ex.record)

    def _answer_redirect(self, ex, status: int, target: str) -> None:
        payload = redirect_response(status, target, close=False, head_only=ex.request.method == "HEAD",
                                    extra_headers=self._request_id_header(ex))
        ex.record.status = status
        self._respond(ex.conn, payload, ex.record)

    @staticmethod
    def _respond(client: StreamClient, payload: bytes, record) -> None:
        """A response the proxy wrote itself, as HTTP/1.1 bytes, sent on the stream."""
        block, body = from_http1_payload(payload)
        try:
            client.session.send_headers(client.stream, block, end_stream=not body, flush=not body)
            if body:  # what the windows do not take now waits for the stream's task to end (send_unsent)
                client.stream.unsent = client.session.send_some(client.stream, body, end_stream=True)
            record.bytes_sent += len(body)
        except ClientGone:
            pass  # the client cancelled the stream or left: nothing left to tell it


def _with_rate_limit_fields(block: list, fields: str) -> list:
    """A response block with the rate limit's fields (HTTP/1.1 header lines, as the handler keeps
    them) instead of any the upstream sent under those names."""
    block = [(name, value) for name, value in block if name not in RATE_LIMIT_FIELDS]
    for line in fields.split("\r\n"):
        if line:
            name, _, value = line.partition(": ")
            block.append((name.lower(), value))
    return block
