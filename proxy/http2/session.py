"""One HTTP/2 client connection: the ``h2`` state machine, its socket, and the streams it carries.

The protocol is the ``h2`` package's (sans-IO, HPACK included); this module does the I/O around it and
the limits a proxy needs. Several threads use a session at once: the pool worker that reads what the
client sent (``pump``) and one worker per stream that writes its response (``send_headers``,
``send_body``, ``end_stream``). ``lock`` covers the state machine (``h2`` is not thread-safe) and is
never held across a system call; ``io_lock`` covers each socket call (an OpenSSL connection must not be
read and written from two threads at once) and nothing else. The socket is non-blocking: the frames
``h2`` produces go to ``outgoing`` under ``lock``, in order, and one thread at a time (``writing``)
writes them out. A writer that finds the send buffer full hands the rest to the process's
``FlushRelay`` (proxy/http2/flush_relay.py), which writes as the client reads and loses the session
after ``send_timeout`` without progress (a client that does not read its TCP stream cannot send
WINDOW_UPDATEs either), while the other streams and the reader go on with their bookkeeping; a stream
that finds ``outgoing`` past OUTGOING_LIMIT is parked until the writer takes it.

Flow control both ways (RFC 9113 §5.2): a stream sends no more than the client's window allows, so a
client that stops reading stops its stream reading from the upstream. Received body bytes are
acknowledged when the stream takes them, so a stream buffers at most its window.

A stream that must wait on its client (a shut window, a full ``outgoing``, body not here yet) holds no
thread: its exchange yields a ``StreamWait``, its worker ``park``s it and goes, and whoever changes what
it waits for (the reader on a WINDOW_UPDATE or DATA, the writer emptying ``outgoing``, a reset, the
``DeadlineTimer`` at its deadline) hands it to ``on_resume``, which runs it again on a pool worker.
"""

from __future__ import annotations

import collections
import math
import socket
import ssl
import threading
import time

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import h2.stream
import hpack.hpack
import hpack.table
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

from proxy.http.errors import ClientGone
from proxy.http.http1 import ProtocolError
from proxy.http2.mapping import malformed

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # RFC 9113 §3.4: what an h2c client sends first
READ_SIZE = 256 * 1024
# Frames queued for the writer past which a stream producing more is parked (the client's windows
# alone could let a client that does not read make us buffer megabytes).
OUTGOING_LIMIT = 256 * 1024
# Reads per ``pump`` before the reader lets go of the lock for a moment (a client sending without
# pause would otherwise keep every stream from writing).
READS_PER_ROUND = 16
# Windows we grant: a stream buffers at most STREAM_WINDOW of request body, a connection at most
# CONNECTION_WINDOW across its streams (the RFC's 65,535 default throttles uploads on a fast link).
STREAM_WINDOW = 256 * 1024
CONNECTION_WINDOW = 1024 * 1024
# PING, SETTINGS, PRIORITY and empty DATA frames a client may send between two requests. Each costs
# work (the first two an answer); a client that sends them in a loop (CVE-2019-9512, -9513, -9515,
# -9518) gets GOAWAY ENHANCE_YOUR_CALM.
MAX_CONTROL_FRAMES = 100
# SETTINGS_MAX_HEADER_LIST_SIZE is this many times max_header_bytes: a request between the two is
# decoded and answered 431 on its stream (proxy/http2/mapping.py), as HTTP/1.1 answers one; past it
# the header block is not even decoded and the connection ends (a COMPRESSION_ERROR GOAWAY).
HEADER_LIST_SLACK = 2
# Streams a client may cancel before their answer, beyond those it let finish: past max_streams of
# them the connection is an attack (rapid reset, CVE-2023-44487) and gets ENHANCE_YOUR_CALM.
RAPID_RESET_FACTOR = 1
# What a parked stream waits for (``StreamWait.why``).
WINDOW = "window"  # room to send: the client's flow-control windows open, and ``outgoing`` has room
BODY = "body"  # more of the request body, or its end


# Our header blocks are built lowercase, trimmed and valid (proxy/http2/mapping.py): h2 need not check
# or normalize them again. What the client sends is checked by ``_ServerStream`` in one pass instead of
# h2's chain of generators; cookies split over fields are joined by the mapping (RFC 9113 §8.2.3).
H2_CONFIGURATION = h2.config.H2Configuration(client_side=False, header_encoding=None,
                                             validate_outbound_headers=False, normalize_outbound_headers=False,
                                             validate_inbound_headers=False, normalize_inbound_headers=False)


class _NoDebugLog:
    """Stands for hpack's module loggers: hpack logs every field it codes at debug level (about fifty
    calls a request), which costs a few µs a request even with debug off, and is never wanted: at
    pyproxy's own debug level it would flood the log with header bytes."""

    @staticmethod
    def debug(*args, **kwargs) -> None:
        pass


hpack.hpack.log = hpack.table.log = _NoDebugLog()


class MalformedBlock(list):
    """The header list of a malformed request or trailers (RFC 9113 §8.1.1), as h2's event carries it."""


class _ServerStream(h2.stream.H2Stream):
    """h2's stream, except that a malformed header block (an uppercase name, a connection-specific field,
    Host against :authority: ``malformed`` in proxy/http2/mapping.py, in place of h2's own inbound
    checks) is handed on as a MalformedBlock, for the session to reset that stream alone
    (PROTOCOL_ERROR, a stream error as RFC 9113 §8.1.1 says) where h2 would end the connection."""

    def _process_received_headers(self, headers, header_validation_flags, header_encoding):
        headers = list(headers)  # bytes as decoded: no header_encoding, no normalizing (cookies: mapping)
        if malformed(headers, header_validation_flags.is_trailer):
            return MalformedBlock(headers)
        return headers

    def _initialize_content_length(self, headers):
        try:
            super()._initialize_content_length(headers)
        except h2.exceptions.ProtocolError:
            pass  # not a number, or two that differ: 400 on this stream alone (proxy/http2/mapping.py)

    wrong_length = False  # the body broke its content-length (set on the instance)

    def _track_content_length(self, length, end_stream):
        try:
            super()._track_content_length(length, end_stream)
        except h2.exceptions.InvalidBodyLengthError:
            self.wrong_length = True

    def receive_data(self, data, end_stream, flow_control_len):
        """A body longer or shorter than its content-length is a malformed request, so a stream error
        (RFC 9113 §8.1.1), reported as a WrongBodyLength event: h2 would end the connection."""
        frames, events = super().receive_data(data, end_stream, flow_control_len)
        if self.wrong_length:
            events.append(WrongBodyLength(self.stream_id))
        return frames, events


class WrongBodyLength:
    """An event of our own: the stream's DATA did not add up to its content-length."""

    __slots__ = ("stream_id",)

    def __init__(self, stream_id: int):
        self.stream_id = stream_id


class _ServerConnection(h2.connection.H2Connection):
    """h2's connection, except that a stream past SETTINGS_MAX_CONCURRENT_STREAMS is left to the session,
    which refuses that stream alone (REFUSED_STREAM, RFC 9113 §5.1.2) where h2 would end the connection
    and every stream in progress with it; the same for a malformed request (``_ServerStream``)."""

    @property
    def open_inbound_streams(self) -> int:
        h2.connection.H2Connection.open_inbound_streams.fget(self)  # it also forgets closed streams
        return 0

    def _begin_new_stream(self, stream_id, allowed_ids):
        stream = super()._begin_new_stream(stream_id, allowed_ids)
        stream.__class__ = _ServerStream
        return stream

    def _receive_goaway_frame(self, frame):
        """The client's GOAWAY says it opens no more streams; those it opened are still answered (RFC 9113
        §6.8), where h2 would close the connection's state machine and refuse every frame from here on,
        the answers in progress included. The session refuses the client's later streams itself."""
        event = h2.events.ConnectionTerminated()
        event.error_code = h2.errors._error_code_from_int(frame.error_code)
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


class StreamWait:
    """What a stream's exchange yields when it cannot go on until its client moves: ``why`` (WINDOW or
    BODY), and until when at most (by the session's clock; the exchange checks it when run again)."""

    __slots__ = ("why", "deadline")

    def __init__(self, why: str, deadline: float):
        self.why = why
        self.deadline = deadline


class Stream:
    """One request on the connection, as the reader received it and its worker answers it."""

    __slots__ = ("id", "block", "end_stream", "body", "body_ended", "trailers", "reset", "answered", "started",
                 "upstream", "task", "waiting", "timer_at", "timer_entry", "unsent")

    def __init__(self, stream_id: int, block, end_stream: bool):
        self.id = stream_id
        self.block = block  # the request's header block: (name, value) bytes pairs
        self.end_stream = end_stream  # the headers ended the stream: no body
        self.body: collections.deque = collections.deque()  # (data, flow-controlled length) not taken yet
        self.body_ended = end_stream
        self.trailers = None
        self.reset = False  # the client cancelled it, or the connection is gone
        self.answered = False  # our END_STREAM (or RST_STREAM) went out
        self.started = False  # its worker picked it up
        self.upstream = None  # the upstream socket its worker reads, shut down if the stream is cancelled
        self.task = None  # its exchange (a generator), kept while it is parked (proxy/serve/http2.py)
        self.waiting = None  # the StreamWait it is parked on, holding no thread
        self.timer_at = None  # the earliest deadline the DeadlineTimer will call it back at
        self.timer_entry = None  # that call's entry in the DeadlineTimer, cancelled when the stream is done
        self.unsent = None  # the end of an answer of the proxy's own, waiting for the client's window


class H2Session:
    """The server side of one HTTP/2 connection. ``client_ip``, ``scheme`` and ``requests`` are what the
    request pipeline reads from a client session."""

    def __init__(self, conn, *, client_ip: str, scheme: str, max_streams: int, max_header_bytes: int,
                 send_timeout: float, clock=time.monotonic):
        self.conn = conn
        self.sock = conn.sock
        self.client_ip = client_ip
        self.scheme = scheme
        self.origin = None  # the client connection as a PROXY header told it (see ClientSession.origin)
        self.relayed_unnamed = False  # a PROXY header that named no client (see ClientSession)
        self.requests = 0
        self.max_streams = max_streams
        self.send_timeout = send_timeout
        self.clock = clock
        self.lock = threading.Lock()
        self.io_lock = threading.Lock()  # one socket call at a time (see the module docstring)
        # One reader at a time, from the read to h2 taking its bytes (two would hand them over out of
        # order): the pool worker core dispatches, or the one closing the connection after a GOAWAY.
        self.read_lock = threading.Lock()
        self.streams: dict[int, Stream] = {}  # those not finished by their worker
        self.parked: dict[int, Stream] = {}  # those waiting on the client without a thread (``park``)
        self.on_resume = None  # called under the lock with a parked stream to run again (the server's)
        self.timer = None  # the process's DeadlineTimer (proxy/http2/timer.py), for the parked streams
        self.control_frames = 0
        self.early_resets = 0
        self.goaway_sent = False  # no new streams from here on (a drain, an attack, an expiry)
        self.last_stream_id = 0  # the highest stream we took on (GOAWAY's last-stream-id)
        self.lost = False  # the socket failed or the client closed it: nothing more can be sent
        self.closing = False  # lost once ``outgoing`` is written (a GOAWAY for a protocol error)
        self.outgoing = bytearray()  # frames h2 produced, not yet handed to the writer
        self.writing = False  # a thread, or the FlushRelay, is writing ``outgoing`` out (``_write_out``)
        # Taken from ``outgoing``, not sent yet: retried as it is (OpenSSL wants a write repeated with the
        # same bytes). Only the one writer touches it.
        self.pending = memoryview(b"")
        self.bytes_written = 0
        self.flusher = None  # the process's FlushRelay (proxy/http2/flush_relay.py)
        self.after_written = None  # what to run once writing is over (``when_written``)
        self.last_activity = clock()
        self.h2 = _ServerConnection(H2_CONFIGURATION)
        self.h2.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_streams,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: HEADER_LIST_SLACK * max_header_bytes,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
        })
        # HPACK bomb: decoding stops once the decoded list passes the advertised size, whether or not
        # the client acknowledged our SETTINGS yet (h2 applies the setting to its decoder only then).
        self.h2.decoder.max_header_list_size = HEADER_LIST_SLACK * max_header_bytes
        self.sock.settimeout(0.0)

    # -- the reader -------------------------------------------------------------------------------
    def start(self, received: bytes = b"") -> list[Stream]:
        """Send our SETTINGS (the server preface) and take what the client already sent."""
        with self.lock:
            self.h2.initiate_connection()
            self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
            new = self._take(received) if received else []
            write = self._queue()
        self._write_out_for_reader(write)
        return new + self.pump()

    def pump(self) -> list[Stream]:
        """Read what the client sent, answer what ``h2`` answers by itself (SETTINGS ACK, PING ACK,
        WINDOW_UPDATE), and return the new requests to serve. Never waits for the client."""
        new: list[Stream] = []
        for _ in range(READS_PER_ROUND):
            if self.lost:
                break
            with self.read_lock:
                data = self._recv()
                if data is None:
                    break
                with self.lock:
                    if not data:
                        self._lose()
                        break
                    if self.closing:
                        # After a connection error: dropped unread, so that a connection whose GOAWAY
                        # waits for a slow reader is not readable again and again meanwhile.
                        continue
                    new += self._take(data)
                    write = self._queue()
            self._write_out_for_reader(write)
        return [stream for stream in new if not stream.reset]

    def _recv(self) -> bytes | None:
        """What the socket has (b"" once the client closed it or it failed), None if nothing waits."""
        try:
            with self.io_lock:
                return self.sock.recv(READ_SIZE)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError, InterruptedError):
            return None
        except (OSError, ValueError):  # ValueError: an SSL socket shut down meanwhile (_lose)
            return b""

    def _take(self, data: bytes) -> list[Stream]:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            # h2 queued a GOAWAY with the error's code (a CONTINUATION flood, an oversized header
            # list, a frame out of place): send it and stop reading this client.
            self._close_after_writing()
            return []
        new = []
        for event in events:
            handle = self._HANDLERS.get(type(event))
            if handle is not None:
                stream = handle(self, event)
                if stream is not None:
                    new.append(stream)
        if self.parked:
            self._resume_ready()
        return new

    def _on_request(self, event) -> Stream | None:
        self.control_frames = 0
        self.last_activity = self.clock()
        if event.headers.__class__ is MalformedBlock:
            self._reset_unserved(event.stream_id, ErrorCodes.PROTOCOL_ERROR)
            return None
        if self.goaway_sent or len(self.streams) >= self.max_streams:
            # After our GOAWAY no new stream is served; past max_streams (a client that did not wait
            # for our SETTINGS) the stream is refused, which tells the client it may retry it.
            try:
                self.h2.reset_stream(event.stream_id, ErrorCodes.REFUSED_STREAM)
            except h2.exceptions.StreamClosedError:
                pass  # the client cancelled it already, in the same read
            return None
        stream = Stream(event.stream_id, event.headers, event.stream_ended is not None)
        self.streams[event.stream_id] = stream
        self.last_stream_id = max(self.last_stream_id, event.stream_id)
        return stream

    def _on_data(self, event) -> None:
        if not event.flow_controlled_length:  # an empty frame: nothing to read, and no window spent
            if event.stream_ended is None:  # not the usual one ending a body: counted as a PING is
                self._on_control(event)
            return
        stream = self.streams.get(event.stream_id)
        if stream is None or stream.reset:
            # Nobody will read it: give the window back at once, or the connection's would run dry.
            self._acknowledge(event.flow_controlled_length, event.stream_id)
            return
        stream.body.append((event.data, event.flow_controlled_length))

    def _on_end(self, event) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.body_ended = True

    def _on_trailers(self, event) -> None:
        if event.headers.__class__ is MalformedBlock:
            self._on_malformed_body(event)
            return
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.trailers = event.headers

    def _on_malformed_body(self, event) -> None:
        """Malformed trailers, or DATA against the content-length: that stream alone is reset."""
        self._reset_unserved(event.stream_id, ErrorCodes.PROTOCOL_ERROR)
        if event.stream_id in self.streams:  # its worker stops as for a client's cancel
            self._on_reset(event)

    def _reset_unserved(self, stream_id: int, code: ErrorCodes) -> None:
        try:
            self.h2.reset_stream(stream_id, code)
        except h2.exceptions.StreamClosedError:
            pass  # the client cancelled it already, in the same read

    def _on_reset(self, event) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None or stream.answered:
            return
        _cancel(stream)
        if not stream.started:  # no worker will finish it: it no longer counts against max_streams
            del self.streams[event.stream_id]
            self._release_body(stream)
        self.early_resets += 1
        if self.early_resets > self.max_streams * RAPID_RESET_FACTOR:
            self._goaway(ErrorCodes.ENHANCE_YOUR_CALM)

    def _on_control(self, event) -> None:
        self.control_frames += 1
        if self.control_frames > MAX_CONTROL_FRAMES:
            self._goaway(ErrorCodes.ENHANCE_YOUR_CALM)

    def _on_goaway(self, event) -> None:
        self.goaway_sent = True  # the client leaves: no new streams; those running may finish

    _HANDLERS = {
        h2.events.RequestReceived: _on_request,
        h2.events.DataReceived: _on_data,
        h2.events.StreamEnded: _on_end,
        h2.events.TrailersReceived: _on_trailers,
        WrongBodyLength: _on_malformed_body,
        h2.events.StreamReset: _on_reset,
        h2.events.PingReceived: _on_control,
        h2.events.RemoteSettingsChanged: _on_control,
        h2.events.PriorityUpdated: _on_control,
        h2.events.ConnectionTerminated: _on_goaway,
    }

    # -- what a stream's worker calls ----------------------------------------------------------------
    def send_headers(self, stream: Stream, block, end_stream: bool = False, flush: bool = True) -> None:
        """``flush=False`` leaves the frame queued for the next write (the body that follows at once):
        one TLS record and one system call for a small response instead of three."""
        with self.lock:
            self._check(stream)
            self.h2.send_headers(stream.id, block, end_stream=end_stream)
            if end_stream:
                stream.answered = True
            write = flush and self._queue()
        if write:
            self._write_out()

    def flush(self) -> None:
        """Send what is queued (a response head held back by ``send_headers(flush=False)``)."""
        with self.lock:
            write = self._queue()
        if write:
            self._write_out()

    def send_some(self, stream: Stream, data, end_stream: bool = False):
        """Send what the client's windows and ``outgoing`` take of ``data`` now, never waiting for more
        room (the last frame ending the stream with ``end_stream``); the rest is returned, empty when
        all went out. ClientGone when the stream or the connection is gone."""
        view = memoryview(data)
        if not view and end_stream:
            self.end_stream(stream)
            return view
        with self.lock:
            self._check(stream)
            while view:
                room = self._room(stream)
                if not room:
                    break
                piece, view = view[:room], view[room:]
                last = end_stream and not view
                self.h2.send_data(stream.id, piece.tobytes(), end_stream=last)
                if last:
                    stream.answered = True
            write = self._queue()
        if write:
            self._write_out()
        return view

    def _room(self, stream: Stream) -> int:
        """Under the lock: how much of the stream's body may go out now (0: wait for a WINDOW_UPDATE,
        or for the writer to take what is queued)."""
        if len(self.outgoing) >= OUTGOING_LIMIT:
            return 0
        try:
            window = self.h2.local_flow_control_window(stream.id)
        except h2.exceptions.NoSuchStreamError:  # h2 closed it (a stream error the client made)
            _cancel(stream)
            return 0
        return max(0, min(window, self.h2.max_outbound_frame_size))

    def end_stream(self, stream: Stream, trailers=None) -> None:
        with self.lock:
            self._check(stream)
            if trailers:
                self.h2.send_headers(stream.id, trailers, end_stream=True)
            else:
                self.h2.end_stream(stream.id)
            stream.answered = True
            write = self._queue()
        if write:
            self._write_out()

    def take_body(self, stream: Stream) -> bytes | None:
        """The next piece of the request body: b"" once it ended, None while no more has arrived.
        ClientGone if the stream is reset (for its body too: a wrong length reads no more of it)."""
        with self.lock:
            self._check(stream)
            data = None
            while stream.body and not data:  # a DATA frame of padding alone carries no bytes
                data, counted = stream.body.popleft()
                self._acknowledge(counted, stream.id)
            if not data:
                data = b"" if stream.body_ended else None
            write = self._queue()
        if write:
            self._write_out()
        return data

    # -- parked streams ------------------------------------------------------------------------------
    def park(self, stream: Stream, wait: StreamWait) -> bool:
        """The stream's worker lets go of it until what it waits for happens or ``wait.deadline``
        passes: then ``on_resume(stream)`` runs it again. False when there is nothing to wait for any
        more (it came meanwhile, or the stream is gone): the caller runs it on at once."""
        with self.lock:
            if self._ready(stream, wait.why):
                return False
            stream.waiting = wait
            self.parked[stream.id] = stream
            if stream.timer_at is None or wait.deadline < stream.timer_at:
                self._arm(stream, wait.deadline)
        return True

    def _arm(self, stream: Stream, deadline: float) -> None:
        """Under the lock: the DeadlineTimer calls the stream back at ``deadline``, instead of any
        later call asked before (one entry per stream, cancelled when it is done)."""
        if stream.timer_entry is not None:
            self.timer.cancel(stream.timer_entry)
        stream.timer_at = deadline
        stream.timer_entry = self.timer.add(deadline, lambda: self._at_deadline(stream, deadline))

    def _ready(self, stream: Stream, why: str) -> bool:
        """Under the lock: a stream waiting for ``why`` may go on (or is gone, and finds out)."""
        if stream.reset or self.lost:
            return True
        if why == BODY:
            return bool(stream.body) or stream.body_ended
        return self._room(stream) > 0 or stream.reset

    def _resume_ready(self) -> None:
        """Under the lock: every parked stream whose wait is over runs again."""
        for stream in list(self.parked.values()):
            if self._ready(stream, stream.waiting.why):
                self._resume(stream)

    def _resume(self, stream: Stream) -> None:
        del self.parked[stream.id]
        stream.waiting = None
        self.on_resume(stream)

    def _at_deadline(self, stream: Stream, deadline: float) -> None:
        """The DeadlineTimer's call: a stream still parked past its deadline runs again, to time out."""
        with self.lock:
            if stream.timer_at == deadline:
                stream.timer_at = stream.timer_entry = None
            if stream.waiting is None:
                return
            later = stream.waiting.deadline
            if self.clock() >= later:
                self._resume(stream)
                return
            if stream.timer_at is not None:
                return  # an earlier call is due already
            self._arm(stream, later)  # parked again since, with a later deadline

    def reset(self, stream: Stream, code: ErrorCodes = ErrorCodes.CANCEL) -> None:
        with self.lock:
            if stream.answered or stream.reset or self.lost:
                return
            stream.answered = True
            try:
                self.h2.reset_stream(stream.id, code)
            except h2.exceptions.H2Error:
                pass  # the stream closed meanwhile: nothing left to cancel
            write = self._queue()
        self._write_out_for_reader(write)  # the client gone is no error here either

    def finish(self, stream: Stream) -> bool:
        """The stream's worker is done with it. True when the connection has nothing left to do (closing
        after a GOAWAY, or lost): the caller closes it."""
        if not stream.answered:
            self.reset(stream, ErrorCodes.INTERNAL_ERROR)
        elif not stream.body_ended and not stream.reset:
            self.reset(stream, ErrorCodes.NO_ERROR)  # RFC 9113 §8.1: answered before its body came
        with self.lock:
            self.streams.pop(stream.id, None)
            self._release_body(stream)
            if stream.timer_entry is not None:  # it parked: its deadline may not keep it (and us) alive
                self.timer.cancel(stream.timer_entry)
                stream.timer_entry = stream.timer_at = None
            if not stream.reset and self.early_resets:
                self.early_resets -= 1
            self.last_activity = self.clock()
            write = self._queue()
        self._write_out_for_reader(write)
        with self.lock:
            return self.lost or (self.goaway_sent and not self.streams)

    # -- the connection as a whole ---------------------------------------------------------------------
    def goaway(self, code: ErrorCodes = ErrorCodes.NO_ERROR) -> bool:
        """Tell the client no new stream will be served (a drain, an idle connection closed). True when
        no stream is running: the caller closes the connection."""
        with self.lock:
            self._goaway(code)
            write = self._queue()
        self._write_out_for_reader(write)
        with self.lock:
            return not self.streams

    def goaway_nowait(self) -> None:
        """GOAWAY from a thread that must not wait (the accept loop expiring the connection): one
        non-blocking send, unless a writer is busy (the GOAWAY then follows what it writes)."""
        if self.lock.acquire(blocking=False):
            try:
                self.outgoing += self.h2.data_to_send() + self._goaway_frame(ErrorCodes.NO_ERROR)
                if not self.lost and not self.writing and self.io_lock.acquire(blocking=False):
                    try:
                        self.sock.send(self.outgoing)
                    finally:
                        self.io_lock.release()
            except (OSError, ValueError, ssl.SSLError):
                pass  # best effort: the connection closes either way
            finally:
                self.lock.release()

    def when_written(self, callback) -> bool:
        """Run ``callback()`` once what is queued is written (or the session lost), on the thread that
        finishes writing it (the FlushRelay's, for a client slow to read), so that no thread waits for
        it. False when nothing is being written: the caller goes on at once."""
        with self.lock:
            if not self.writing or self.lost:
                return False
            self.after_written = callback
            return True

    def _writing_over(self) -> None:
        """After a write ended: the ``when_written`` callback, if writing is over."""
        if self.after_written is None:
            return
        with self.lock:
            if self.writing and not self.lost:
                return  # another thread took over: it calls this when it is done
            callback, self.after_written = self.after_written, None
        if callback is not None:
            callback()

    def closed(self) -> None:
        """The connection was closed: its streams end, the parked ones run again to find out."""
        with self.lock:
            if not self.lost:
                self._lose()

    def _goaway(self, code: ErrorCodes) -> None:
        if self.goaway_sent and code == ErrorCodes.NO_ERROR:
            return
        self.goaway_sent = True
        if code != ErrorCodes.NO_ERROR:  # an attack: the streams running are ended with the connection
            for stream in self.streams.values():
                stream.reset = True
        self.outgoing += self.h2.data_to_send() + self._goaway_frame(code)
        if code != ErrorCodes.NO_ERROR:
            self._close_after_writing()

    def _goaway_frame(self, code: ErrorCodes) -> bytes:
        # Built by hand: h2's close_connection() would refuse every later frame, the WINDOW_UPDATEs that
        # the streams still running need included.
        frame = GoAwayFrame(0)
        frame.last_stream_id = self.last_stream_id
        frame.error_code = code
        return frame.serialize()

    def deadline(self, idle_timeout: float, header_timeout: float) -> float:
        """When the connection is closed if nothing happens: never while a stream runs; otherwise
        idle_timeout after the last stream (header_timeout before the first one, and while a header
        block is half received: slowloris)."""
        with self.lock:
            if self.streams:
                return math.inf
            limit = idle_timeout if self.last_stream_id else header_timeout
            if getattr(self.h2.incoming_buffer, "_headers_buffer", None):
                limit = min(limit, header_timeout)
            return self.last_activity + limit

    @property
    def active_streams(self) -> int:
        return len(self.streams)

    # -- socket -------------------------------------------------------------------------------------
    def _check(self, stream: Stream) -> None:
        if stream.reset or self.lost:
            raise ClientGone("client cancelled the stream" if stream.reset else "client connection lost")

    def _acknowledge(self, size: int, stream_id: int) -> None:
        if size:  # h2 gives the connection's window back even when the stream is closed
            self.h2.acknowledge_received_data(size, stream_id)

    def _release_body(self, stream: Stream) -> None:
        """Give back the window of body bytes the stream will never read (answered without reading
        them, or cancelled): they count against the connection's window, shared by every stream."""
        while stream.body:
            self._acknowledge(stream.body.popleft()[1], stream.id)

    def _queue(self) -> bool:
        """Under the lock: what h2 produced goes to ``outgoing``. True when the caller is to write it out,
        after releasing the lock (``_write_out``): no other thread is writing."""
        data = self.h2.data_to_send()
        if data:
            self.outgoing += data
        if not self.outgoing or self.writing or self.lost:
            return False
        self.writing = True
        return True

    def _write_out(self) -> None:
        """Write ``outgoing`` until it is empty, the lock taken only around each non-blocking send (so
        in order, and one writer at a time). A full socket hands the rest to the FlushRelay, with
        ``writing`` still set, so no thread waits for a client slow to read. ClientGone when the
        socket fails, which loses the session."""
        try:
            if not self._write_some():
                self.flusher.add(self)
                return
        except ClientGone:
            self._writing_over()
            raise
        self._writing_over()

    def write_stalled(self) -> bool:
        """The FlushRelay's write, once the socket has room: True when writing is over (all written, or
        the session lost), False when the socket is full again."""
        try:
            if not self._write_some():
                return False
        except ClientGone:
            pass
        self._writing_over()
        return True

    def give_up_writing(self) -> None:
        """The FlushRelay's call when the client took nothing for ``send_timeout``: the session is lost."""
        with self.lock:
            self.writing = False
            if not self.lost:
                self._lose()
        self._writing_over()

    def _write_some(self) -> bool:
        """Write what is queued while the socket takes it: True once all went out, False when the
        socket is full (``writing`` stays set, ``pending`` kept for the next try). ClientGone on failure."""
        done = False
        try:
            while True:
                with self.lock:
                    if self.lost:
                        raise ClientGone("client connection lost")
                    if not self.pending:
                        if not self.outgoing:
                            self.writing = False
                            done = True
                            if self.closing:
                                self._lose()
                            return True
                        self.pending = memoryview(bytes(self.outgoing))
                        del self.outgoing[:]
                        if self.parked:
                            self._resume_ready()  # room for the streams waiting on it
                sent = self._send(self.pending)
                if not sent:
                    done = True  # still writing: the FlushRelay takes it over
                    return False
                self.pending = self.pending[sent:]
                self.bytes_written += sent
        finally:
            if not done:  # an error: the next thread with frames to send writes (if there is anything left)
                with self.lock:
                    self.writing = False

    def _send(self, data) -> int:
        """One non-blocking send, 0 when the socket has no room."""
        try:
            with self.io_lock:
                return self.sock.send(data)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError, InterruptedError):
            return 0
        except (OSError, ValueError) as exc:  # ValueError: an SSL socket shut down meanwhile (_lose)
            with self.lock:
                self._lose()
            raise ClientGone(f"writing to the client failed: {exc}") from exc

    def _write_out_for_reader(self, write: bool) -> None:
        """The reader's write: a client gone is no error there (the session is lost, and the caller
        closes the connection); a stream's write raises ClientGone into its exchange instead."""
        if write:
            try:
                self._write_out()
            except ClientGone:
                pass

    def _close_after_writing(self) -> None:
        """Under the lock: the connection ends once what is queued (a GOAWAY) is written; the reader
        stops reading now, and the streams running end as for a client's cancel."""
        self.closing = True
        self.outgoing += self.h2.data_to_send()
        for stream in self.streams.values():
            _cancel(stream)
        if self.parked:
            self._resume_ready()
        if not self.outgoing and not self.writing:
            self._lose()

    def _lose(self) -> None:
        """Nothing more can be sent: every stream ends, the next ``finish`` or ``pump`` closes."""
        self.lost = True
        for stream in self.streams.values():
            _cancel(stream)
        if self.parked:
            self._resume_ready()
        try:
            # Under io_lock: on a TLS socket the shutdown drops the SSL object another thread's send or
            # recv may be using. Every socket call is non-blocking, so the wait is one call at most.
            with self.io_lock:
                self.sock.shutdown(socket.SHUT_RDWR)  # wakes a reader; the close itself is the caller's
        except OSError:
            pass


def _cancel(stream: Stream) -> None:
    """The stream's answer is no longer wanted: its worker, maybe waiting on the upstream, must stop (as
    nginx closes the upstream connection of a cancelled request, not waiting for its answer)."""
    stream.reset = True
    if stream.upstream is not None:
        try:
            stream.upstream.shutdown(socket.SHUT_RDWR)  # the worker's recv returns; it sees ``reset``
        except OSError:
            pass  # closed already


def is_h2c_preface(conn) -> bool | None:
    """On an h2c listener: True if the client opened with the HTTP/2 preface, False for HTTP/1.1, None
    while too few bytes arrived to tell (peeked: the bytes stay for whichever parser takes them)."""
    try:
        start = conn.sock.recv(len(PREFACE), socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return False
    if start.startswith(PREFACE[:4]):
        return True
    if start and PREFACE.startswith(start):
        return None
    return False
