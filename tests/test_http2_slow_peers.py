"""HTTP/2 clients that stop reading or sending hold no pool worker: a stream waiting on its client's
flow-control window or on its request body is parked until the client moves (or its timeout passes),
so a few threads still serve everyone else. Docs: docs/configuration.md, "HTTP/2"."""

from __future__ import annotations

import gc
import socket
import ssl
import threading
import weakref

import h2.events
import h2.settings
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame, RstStreamFrame

from proxy.config.schema import parse_config
from proxy.http2.flush_relay import FlushRelay
from proxy.http2.session import BODY, OUTGOING_LIMIT, WINDOW, H2Session, Stream, StreamWait
from tests.support.backends import stream_pattern
from tests.support.client import read_response
from tests.support.h2 import H2Client, Pki, start_h2_proxy, stop_quietly
from tests.support.proxy import proxy_config_dict
from tests.support.timing import wait_for

H2C = {"h2c": True}
# Far longer than the tests wait for anything: a stream that kept its worker for its whole wait would
# keep it past every bound below.
PATIENT = {"send_timeout": "300s", "body_timeout": "300s"}
SERVED_WITHIN = 60.0  # how long the other clients wait for their answer at most (generous: a busy CI)


def _stalled_connections(proxy, connections: int, streams_each: int) -> list[H2Client]:
    """Clients that open streams and then neither read their answer nor send their body. One
    connection at a time, each once the streams before it left the queue: a burst past half the queue
    would be refused (REFUSED_STREAM), which is another limit than this one."""
    clients = []
    for _ in range(connections):
        client = H2Client.connect(proxy.port)
        client.auto_ack = False  # no WINDOW_UPDATE ever: every answer stalls at the first 64 KiB
        for index in range(streams_each):
            if index % 2:
                client.request("/upload", method="POST", end=False)  # a body that never comes
            else:
                client.request("/big")
        clients.append(client)
        wait_for(lambda: proxy.process.pool.queued == 0 and proxy.process.app.http2_counts()["streams"]
                 == len(clients) * streams_each, timeout=SERVED_WITHIN, what="the streams taken on",
                 on_timeout=lambda: f"{proxy.process.app.http2_counts()}, pool {proxy.process.pool.counts()}")
    return clients


def test_300_stalled_streams_leave_four_workers_serving_http1_and_http2(make_backend):
    backend = make_backend()
    backend.route("/big", stream_pattern(1024 * 1024))
    proxy = start_h2_proxy({"web": [backend.address]}, None, listen=H2C,
                           server={"min_threads": 4, "max_threads": 4, **PATIENT})
    try:
        attackers = _stalled_connections(proxy, connections=30, streams_each=10)
        # Every stalled stream runs: the downloads reached the backend, and they and the uploads wait
        # on their client.
        counts = proxy.process.app.http2_counts
        wait_for(lambda: len(backend.requests) == 150, timeout=SERVED_WITHIN, what="the downloads upstream")
        assert counts()["streams"] == 300
        http1 = socket.create_connection(("127.0.0.1", proxy.port), timeout=SERVED_WITHIN)
        http1.sendall(b"GET /one HTTP/1.1\r\nHost: h1.test\r\nConnection: close\r\n\r\n")
        assert read_response(http1).startswith(b"HTTP/1.1 200 ")
        http1.close()
        other = H2Client.connect(proxy.port)
        other.sock.settimeout(SERVED_WITHIN)
        headers, _ = other.response(other.request("/two"))
        assert headers[":status"] == "200"
        other.close()
        for client in attackers:
            client.close()
        # Their streams end with their connections: the pool is idle again, nothing left waiting.
        wait_for(lambda: proxy.process.pool.busy == 0 and counts()["streams"] == 0, timeout=SERVED_WITHIN,
                 what="every stalled stream to end", on_timeout=lambda: f"{counts()}, pool {proxy.process.pool.counts()}")
    finally:
        stop_quietly(proxy)


def test_body_that_stops_coming_gets_408_while_parked(make_backend):
    backend = make_backend()
    proxy = start_h2_proxy({"web": [backend.address]}, None, listen=H2C,
                           server={"min_threads": 1, "max_threads": 1, "body_timeout": "3s"})
    try:
        client = H2Client.connect(proxy.port)
        stream = client.request("/upload", method="POST", headers=[("content-length", "10")], end=False)
        client.h2.send_data(stream, b"12345")
        client.flush()
        # Parked: the stream is in progress, and the one worker is free for another client.
        pool, counts = proxy.process.pool, proxy.process.app.http2_counts
        wait_for(lambda: counts()["streams"] == 1 and pool.busy == 0, what="the stream parked",
                 on_timeout=lambda: f"{counts()}, pool {pool.counts()}")
        other = H2Client.connect(proxy.port)
        headers, _ = other.response(other.request("/other"))
        assert headers[":status"] == "200"
        headers, body = client.response(stream)
        assert headers[":status"] == "408" and b"request body not received in time" in body
        other.close()
        client.close()
    finally:
        stop_quietly(proxy)


class _RecordingTimer:
    def __init__(self):
        self.calls: list = []

        self.cancelled: list = []

    def add(self, deadline, callback):
        self.calls.append((deadline, callback))
        return len(self.calls) - 1

    def cancel(self, entry):
        self.cancelled.append(entry)


def test_parked_stream_is_timed_by_its_earliest_deadline():
    # A stream parked for its body (a late deadline), then for a window (an earlier one): the timer is
    # asked again for the earlier one, and each call runs the stream again only once its wait is due.
    now = [0.0]
    ours, theirs = socket.socketpair()
    try:
        conn = type("Conn", (), {"sock": ours})()
        session = H2Session(conn, client_ip="127.0.0.1", scheme="http", max_streams=10, max_header_bytes=8192,
                            send_timeout=5, clock=lambda: now[0])
        resumed = []
        session.on_resume = resumed.append
        session.timer = timer = _RecordingTimer()
        stream = Stream(1, [], end_stream=False)
        session.streams[1] = stream
        assert session.park(stream, StreamWait(BODY, 30.0))
        stream.body_ended = True
        session._resume_ready()  # the body's end arrives: run again
        assert resumed == [stream]
        session.outgoing += b"x" * OUTGOING_LIMIT  # the writer has its fill: no room to send
        assert session.park(stream, StreamWait(WINDOW, 5.0))
        assert [deadline for deadline, _ in timer.calls] == [30.0, 5.0]
        assert timer.cancelled == [0]  # one call per stream: the later one is let go
        now[0] = 4.0
        timer.calls[1][1]()  # called early (a timer is never late, but may be early): asked again
        assert resumed == [stream] and [deadline for deadline, _ in timer.calls] == [30.0, 5.0, 5.0]
        now[0] = 5.0
        timer.calls[2][1]()  # due: run again, to time out
        assert resumed == [stream, stream] and stream.waiting is None and not session.parked
        now[0] = 30.0
        timer.calls[0][1]()  # the body's deadline, long since moot: nothing
        assert resumed == [stream, stream]
        stream.answered = stream.body_ended = True
        assert session.park(stream, StreamWait(BODY, 60.0)) is False  # its body is all here
        session.outgoing.clear()
        stream.body_ended = False
        assert session.park(stream, StreamWait(BODY, 60.0))
        session.parked.clear()
        session.finish(stream)  # done: its call is cancelled, not left to keep it alive
        assert timer.cancelled == [0, 3]
    finally:
        ours.close()
        theirs.close()


def _not_reading_its_socket(port: int, streams: int, path: str = "/big", small_buffer: bool = True,
                            tls_context: ssl.SSLContext | None = None) -> H2Client:
    """A client that opens its flow-control windows all the way and then never reads its socket: only
    TCP stops the proxy's writes (soon with ``small_buffer``; but what was sent then crawls in later)."""
    client = H2Client.connect(port, tls_context=tls_context)
    if small_buffer:
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2 ** 31 - 1})
    client.h2.increment_flow_control_window(2 ** 31 - 1 - 65535)
    client.flush()
    for _ in range(streams):
        client.request(path)
    return client


@pytest.mark.parametrize("tls", [False, True], ids=["h2c", "tls"])
def test_clients_not_reading_their_socket_leave_four_workers_serving(make_backend, tmp_path, tls):
    # Over TLS (ALPN h2) too: there the flush relay's writes and the readers share each SSL socket.
    backend = make_backend()
    backend.route("/big", stream_pattern(64 * 1024 * 1024))
    pki = Pki.create(tmp_path) if tls else None
    context = None
    if tls:
        context = ssl.create_default_context(cafile=pki.ca_file)
        context.set_alpn_protocols(["h2"])
    proxy = start_h2_proxy({"web": [backend.address]}, pki, listen=None if tls else H2C,
                           server={"min_threads": 4, "max_threads": 4, **PATIENT})
    pool, counts = proxy.process.pool, proxy.process.app.http2_counts
    try:
        stalled = []
        for _ in range(30):  # one at a time, as in _stalled_connections: a burst would be refused
            stalled.append(_not_reading_its_socket(proxy.port, streams=3, tls_context=context))
            wait_for(lambda: pool.queued == 0 and counts()["streams"] == 3 * len(stalled), timeout=SERVED_WITHIN,
                     what="the streams taken on", on_timeout=lambda: f"{counts()}, pool {pool.counts()}")
        # Every stream runs, and every connection's writes wait for its client: none on a worker.
        wait_for(lambda: len(backend.requests) == 90 and pool.busy == 0 and pool.queued == 0,
                 timeout=SERVED_WITHIN, what="every stream upstream, no worker waiting on a client",
                 on_timeout=lambda: f"{len(backend.requests)} upstream, {counts()}, pool {pool.counts()}")
        assert counts()["streams"] == 90
        http1 = socket.create_connection(("127.0.0.1", proxy.port), timeout=SERVED_WITHIN)
        if tls:
            http1 = ssl.create_default_context(cafile=pki.ca_file).wrap_socket(http1, server_hostname="127.0.0.1")
        http1.sendall(b"GET /one HTTP/1.1\r\nHost: h1.test\r\nConnection: close\r\n\r\n")
        assert read_response(http1).startswith(b"HTTP/1.1 200 ")
        http1.close()
        other = H2Client.connect(proxy.port, tls_context=context)
        other.sock.settimeout(SERVED_WITHIN)
        headers, _ = other.response(other.request("/two"))
        assert headers[":status"] == "200"
        other.close()
        for client in stalled:
            client.close()
        wait_for(lambda: pool.busy == 0 and counts()["streams"] == 0, timeout=SERVED_WITHIN,
                 what="every stalled stream to end", on_timeout=lambda: f"{counts()}, pool {pool.counts()}")
    finally:
        stop_quietly(proxy)


def test_client_not_reading_its_socket_is_dropped_after_send_timeout(make_backend):
    backend = make_backend()
    backend.route("/big", stream_pattern(64 * 1024 * 1024))
    proxy = start_h2_proxy({"web": [backend.address]}, None, listen=H2C, server={"send_timeout": "2s"})
    pool, counts = proxy.process.pool, proxy.process.app.http2_counts
    try:
        client = _not_reading_its_socket(proxy.port, streams=2)
        wait_for(lambda: len(backend.requests) == 2, what="both streams upstream")
        # Nobody waits on a thread meanwhile: the flush relay gives the connection up.
        wait_for(lambda: counts() == {"connections": 0, "streams": 0, "streams_total": 2}, timeout=SERVED_WITHIN,
                 what="the connection dropped", on_timeout=lambda: f"{counts()}, pool {pool.counts()}")
        client.close()
    finally:
        stop_quietly(proxy)


def test_stream_h2_closed_itself_is_not_parked_but_ends():
    # h2 closes a stream on some errors of the client's; a stream of ours waiting for a window on it must
    # find out (and end as cancelled), not raise h2's error in whichever thread looks at its window.
    ours, theirs = socket.socketpair()
    try:
        session = H2Session(type("Conn", (), {"sock": ours})(), client_ip="127.0.0.1", scheme="http",
                            max_streams=10, max_header_bytes=8192, send_timeout=5)
        stream = Stream(1, [], end_stream=True)  # unknown to h2: as one it closed and forgot
        session.streams[1] = stream
        assert not session.park(stream, StreamWait(WINDOW, 5.0))
        assert stream.reset
    finally:
        ours.close()
        theirs.close()


def test_close_after_goaway_waits_for_a_slow_reader_without_a_worker(make_backend):
    # Frames still waiting for a client that does not read, no stream left (the client cancelled it),
    # then the client's GOAWAY: the connection closes once they are written, and no worker waits for
    # that meanwhile.
    backend = make_backend()
    backend.route("/big", stream_pattern(64 * 1024 * 1024))
    proxy = start_h2_proxy({"web": [backend.address]}, None, listen=H2C,
                           server={"min_threads": 1, "max_threads": 1, **PATIENT})
    pool, counts = proxy.process.pool, proxy.process.app.http2_counts
    try:
        client = _not_reading_its_socket(proxy.port, streams=1, small_buffer=False)
        wait_for(lambda: counts()["streams"] == 1 and pool.busy == 0, what="the stream parked on the full socket")
        goaway = GoAwayFrame(0)
        goaway.last_stream_id = 0
        client.send_raw(RstStreamFrame(1, error_code=ErrorCodes.CANCEL).serialize() + goaway.serialize())
        wait_for(lambda: counts()["streams"] == 0 and pool.busy == 0 and pool.queued == 0,
                 what="the stream ended, no worker waiting for the client",
                 on_timeout=lambda: f"{counts()}, pool {pool.counts()}")
        assert counts()["connections"] == 1  # its frames still wait to be written
        other = H2Client.connect(proxy.port)  # the one worker is free
        headers, _ = other.response(other.request("/other"))
        assert headers[":status"] == "200"
        other.close()
        client.sock.settimeout(SERVED_WITHIN)
        for _ in range(100_000):  # the client reads at last: what was queued, then the close
            if not client.sock.recv(65536):
                break
        wait_for(lambda: counts()["connections"] == 0, what="the connection closed")
        client.close()
    finally:
        stop_quietly(proxy)


def test_reload_under_a_parked_stream_lets_it_finish_from_its_upstream(make_backend):
    # The stream keeps the runtime it started with while parked, whatever a reload swaps meanwhile.
    first, second = make_backend(), make_backend()
    total = 1024 * 1024
    for backend in (first, second):
        backend.route("/big", stream_pattern(total))
    proxy = start_h2_proxy({"web": [first.address]}, None, listen=H2C)
    pool, counts = proxy.process.pool, proxy.process.app.http2_counts
    try:
        client = H2Client.connect(proxy.port)
        client.auto_ack = False  # the window stays shut: the stream parks
        stream = client.request("/big")
        wait_for(lambda: first.requests and counts()["streams"] == 1 and pool.busy == 0, what="the stream parked")
        document = proxy_config_dict({"web": [second.address]}, server={
            "listen": [{"address": f"127.0.0.1:{proxy.port}", "h2c": True}], "send_timeout": "5s"})
        proxy.process.reload(parse_config(document, "test.toml"))
        client.auto_ack = True
        for event in client.events:  # the window back for what arrived before: the stream goes on
            if isinstance(event, h2.events.DataReceived) and event.flow_controlled_length:
                client.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        client.flush()
        headers, body = client.response(stream)
        assert headers[":status"] == "200" and len(body) == total
        assert len(first.requests) == 1 and not second.requests
        headers, _ = client.response(client.request("/big"))  # a new stream takes the new upstream
        assert headers[":status"] == "200" and len(second.requests) == 1
        client.close()
    finally:
        stop_quietly(proxy)


def test_streams_done_leave_nothing_to_the_deadline_timer(make_backend):
    # Uploads whose body comes after their head park once each; once they are answered and their
    # connections closed, the timer keeps neither their sessions (a flood of them would hold every
    # closed connection's state until body_timeout) nor a pending deadline (nor, so, its thread).
    backend = make_backend()
    proxy = start_h2_proxy({"web": [backend.address]}, None, listen=H2C,
                           server={"min_threads": 1, "max_threads": 1, **PATIENT})
    pool, counts = proxy.process.pool, proxy.process.app.http2_counts
    deadlines = counts.__self__.deadlines
    sessions = []
    try:
        for _ in range(5):
            client = H2Client.connect(proxy.port)
            stream = client.request("/upload", method="POST", headers=[("content-length", "5")], end=False)
            wait_for(lambda: counts()["streams"] == 1 and pool.busy == 0, what="the upload parked for its body",
                     on_timeout=lambda: f"{counts()}, pool {pool.counts()}")
            sessions += [weakref.ref(session) for session in gc.get_objects()
                         if type(session) is H2Session and session.streams.get(stream)]
            client.h2.send_data(stream, b"12345", end_stream=True)
            client.flush()
            headers, _ = client.response(stream)
            assert headers[":status"] == "200"
            client.close()
        assert len(sessions) == 5
        wait_for(lambda: counts()["connections"] == 0, what="every connection closed")
        wait_for(lambda: deadlines.pending == 0, what="no deadline left pending",
                 on_timeout=lambda: f"{deadlines.pending} pending")
        # The one worker's last task is now another connection's (an idle worker keeps its last one).
        other = H2Client.connect(proxy.port)
        headers, _ = other.response(other.request("/other"))
        assert headers[":status"] == "200"
        gc.collect()
        assert [ref for ref in sessions if ref() is not None] == []
        other.close()
    finally:
        stop_quietly(proxy)


class _SlowSession:
    """What the FlushRelay sees of an H2Session: a socket, and the writes it asks for."""

    def __init__(self, sock, send_timeout: float = 30.0):
        self.sock, self.send_timeout, self.client_ip = sock, send_timeout, "127.0.0.1"
        self.bytes_written = 0
        self.written = threading.Event()
        self.given_up = threading.Event()

    def write_stalled(self) -> bool:
        self.written.set()
        return True

    def give_up_writing(self) -> None:
        self.given_up.set()


def test_flush_relay_given_a_session_closed_meanwhile_goes_on_with_the_next():
    # The client left, and its connection was closed, between the writer handing the session over and
    # the relay's thread looking: given up at once, and the relay still writes for the next one.
    relay = FlushRelay()
    ours, theirs = socket.socketpair()
    gone = socket.socket()
    gone.close()  # fileno() is -1 from here on
    try:
        closed = _SlowSession(gone)
        relay.add(closed)
        assert closed.given_up.wait(SERVED_WITHIN)
        live = _SlowSession(ours)
        relay.add(live)
        assert live.written.wait(SERVED_WITHIN), "the relay no longer writes"
    finally:
        ours.close()
        theirs.close()


def test_streams_parked_when_the_drain_runs_out_are_ended_and_logged(make_backend):
    # The drain's deadline passes with streams still parked on their client (a shut window, a body
    # that never comes): the pool is stopping, and each still ends, as a held HTTP/1.1 transfer
    # does: logged (access log, metrics), its upstream connection and server slot let go.
    backend = make_backend()
    backend.route("/big", stream_pattern(1024 * 1024))
    proxy = start_h2_proxy({"web": [backend.address]}, None, listen=H2C,
                           server={"graceful_timeout": "1s", **PATIENT})
    pool, counts = proxy.process.pool, proxy.process.app.http2_counts
    app = proxy.process.app
    observed = []
    observe = app.observe
    app.observe = lambda record: (observed.append(record), observe(record))
    client = H2Client.connect(proxy.port)
    try:
        client.auto_ack = False  # no WINDOW_UPDATE ever: both downloads stall at the first 64 KiB
        client.request("/big")
        client.request("/big")
        client.request("/upload", method="POST", end=False)  # a body that never comes
        wait_for(lambda: len(backend.requests) == 2 and counts()["streams"] == 3 and pool.busy == 0,
                 what="three streams parked", on_timeout=lambda: f"{counts()}, pool {pool.counts()}")
        proxy.process.stop()  # graceful: SIGTERM's path
        proxy.thread.join(SERVED_WITHIN)
        assert not proxy.thread.is_alive()
        assert sorted(record.target for record in observed) == ["/big", "/big", "/upload"]
        assert counts()["streams"] == 0
    finally:
        client.close()
        stop_quietly(proxy)
