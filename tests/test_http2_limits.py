"""HTTP/2 limits and attacks, each with the ``h2`` package as a raw client sending exactly the frames of
the attack (over h2c: the same session code serves TLS). Docs: docs/configuration.md, "HTTP/2"."""

from __future__ import annotations

import hashlib
import logging
import socket
import threading
import time

import h2.events
import h2.exceptions
import h2.settings
import hpack
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import (ContinuationFrame, DataFrame, GoAwayFrame, HeadersFrame, PingFrame, PriorityFrame,
                              RstStreamFrame, SettingsFrame, WindowUpdateFrame)

from core.socket_server import bind_listener
from proxy.config.schema import parse_config
from proxy.http2.session import PREFACE
from proxy.observe.metrics import Metrics, render_prometheus
from proxy.observe.status import build_status
from proxy.serve.http2 import Http2Server
from proxy.serve.runner import ProxyProcess
from tests.support.backends import STREAM_PIECE, close_with_rst, pattern_bytes, pattern_sha256, stream_pattern
from tests.support.h2 import CLIENT_TIMEOUT, H2Client, start_h2_proxy, stop_quietly
from tests.support.proxy import proxy_config_dict
from tests.support.timing import wait_for

H2C = {"h2c": True}


@pytest.fixture
def h2c_proxy(make_backend):
    running = []

    def factory(server: dict | None = None, backend=None, **kwargs):
        backend = backend or make_backend()
        proxy = start_h2_proxy({"web": [backend.address]}, None, listen=H2C, server=server, **kwargs)
        running.append(proxy)
        return proxy, backend

    yield factory
    for proxy in running:
        stop_quietly(proxy)


def hanging_route(backend, release: threading.Event):
    backend.route("/hang", lambda h, record: (release.wait(CLIENT_TIMEOUT), h.reply(200, b"done")))


def unlimited_client_view(client: H2Client) -> None:
    """The client's h2 obeys our MAX_CONCURRENT_STREAMS itself: forget it, to send what an attacker would."""
    client.h2.remote_settings = h2.settings.Settings(client=False, initial_values={
        h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 10_000})


def is_goaway(event) -> bool:
    return isinstance(event, h2.events.ConnectionTerminated)


# -- streams ---------------------------------------------------------------------------------------------

def test_streams_past_max_streams_are_refused_and_the_others_finish(h2c_proxy, make_backend):
    release = threading.Event()
    backend = make_backend()
    hanging_route(backend, release)
    proxy, _ = h2c_proxy(server={"h2_max_streams": 5, "min_threads": 8}, backend=backend)
    client = H2Client.connect(proxy.port)
    assert client.h2.remote_settings.max_concurrent_streams == 5
    unlimited_client_view(client)
    streams = [client.request("/hang") for _ in range(7)]
    refused = [client.until(lambda e, s=s: isinstance(e, h2.events.StreamReset) and e.stream_id == s)
               for s in streams[5:]]
    assert [event.error_code for event in refused] == [ErrorCodes.REFUSED_STREAM] * 2
    wait_for(lambda: len(backend.requests) == 5, what="five streams upstream")
    release.set()
    for stream in streams[:5]:
        headers, body = client.response(stream)
        assert (headers[":status"], body) == ("200", b"done")
    assert len(backend.requests) == 5
    client.close()


def test_streams_leave_room_in_a_full_pool_for_their_connection_to_be_read(h2c_proxy, make_backend):
    release = threading.Event()
    backend = make_backend()
    hanging_route(backend, release)
    proxy, _ = h2c_proxy(server={"min_threads": 1, "max_threads": 1}, backend=backend)
    pool = proxy.process.pool
    client = H2Client.connect(proxy.port)
    unlimited_client_view(client)
    streams = [client.request("/hang") for _ in range(pool.max_queue + 6)]  # more than the queue holds
    wait_for(lambda: len(backend.requests) == 1, what="the one thread busy upstream")
    queued = pool.queued
    other = socket.create_connection(("127.0.0.1", proxy.port), timeout=CLIENT_TIMEOUT)
    other.sendall(PREFACE)  # another connection waits for a thread too
    wait_for(lambda: pool.queued == queued + 1, what="the other connection queued")
    client.h2.ping(b"12345678")  # the first connection has more to read: it must not be shed for it
    client.flush()
    release.set()
    ended = [client.until(lambda e, s=s: isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset))
                          and e.stream_id == s) for s in streams]
    assert None not in ended, "the connection was closed with its streams in progress"
    refused = [e for e in ended if isinstance(e, h2.events.StreamReset)]
    assert {e.error_code for e in refused} == {ErrorCodes.REFUSED_STREAM}
    assert len(backend.requests) == len(streams) - len(refused)
    other.close()
    client.close()


def test_uploads_on_every_worker_of_a_small_pool_get_their_bodies(h2c_proxy, make_backend):
    # More streams waiting for their body than the pool has workers: a stream waiting holds none (it
    # is parked), so the DATA frames they wait for are still read, and none gets a 408.
    proxy, backend = h2c_proxy(server={"min_threads": 1, "max_threads": 2, "body_timeout": "8s"})
    pool = proxy.process.pool
    client = H2Client.connect(proxy.port)
    streams = [client.request("/up", method="POST", end=False) for _ in range(3)]
    wait_for(lambda: proxy.process.app.http2_counts()["streams"] == 3 and pool.busy == 0 and pool.queued == 0,
             what="three streams waiting for their body, no worker held")
    for stream in streams:
        client.h2.send_data(stream, b"body of %d" % stream, end_stream=True)
    client.flush()
    for stream in streams:
        headers, _ = client.response(stream)
        assert headers[":status"] == "200"
    assert sorted(r.body for r in backend.requests) == sorted(b"body of %d" % s for s in streams)
    client.close()


def test_header_list_past_max_header_bytes_gets_431_and_far_past_it_goaway(h2c_proxy):
    proxy, backend = h2c_proxy(server={"max_header_bytes": "2KiB"})
    client = H2Client.connect(proxy.port)
    assert client.h2.remote_settings.max_header_list_size == 4096  # twice max_header_bytes
    headers, _ = client.response(client.request("/big", headers=[("x-big", "a" * 3000)]))
    assert headers[":status"] == "431"
    headers, _ = client.response(client.request("/fine", headers=[("x-small", "a" * 1000)]))
    assert headers[":status"] == "200"
    client.request("/huge", headers=[("x-huge", "b" * 9000)])
    assert client.goaway() is not None
    assert [r.path for r in backend.requests] == ["/fine"]


def test_hpack_bomb_is_cut_off_while_decoding(h2c_proxy):
    proxy, backend = h2c_proxy()
    client = H2Client.connect(proxy.port)
    # The first request puts a 4 KiB field in the dynamic table; the second names it 2,000 times with
    # one byte each: 8 MiB once decoded, from 2 KiB on the wire.
    headers, _ = client.response(client.request("/seed", headers=[("x-bomb", "z" * 4000)]))
    assert headers[":status"] == "200"
    client.request("/bomb", headers=[("x-bomb", "z" * 4000)] * 2000)
    goaway = client.goaway()
    assert goaway is not None and goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM  # h2: a denial of service
    assert [r.path for r in backend.requests] == ["/seed"]


def test_rapid_reset_gets_enhance_your_calm_and_spares_the_backend(h2c_proxy):
    proxy, backend = h2c_proxy(server={"h2_max_streams": 10})
    client = H2Client.connect(proxy.port)
    for _ in range(200):
        try:
            stream = client.request("/expensive")
            client.h2.reset_stream(stream, ErrorCodes.CANCEL)
            client.flush()
        except (ConnectionError, h2.exceptions.ProtocolError):
            break  # the GOAWAY came, or the server closed
        if client.closed:
            break
        try:
            client.sock.setblocking(False)
            client.read_once()
        except BlockingIOError:
            pass
        except (ConnectionError, h2.exceptions.ProtocolError):
            break
        finally:
            client.sock.setblocking(True)
    client.sock.settimeout(CLIENT_TIMEOUT)
    goaway = client.goaway()
    assert goaway is not None and goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert len(backend.requests) <= 11  # at most the streams a worker took before their reset arrived


def test_continuation_flood_ends_the_connection(h2c_proxy):
    proxy, backend = h2c_proxy()
    client = H2Client.connect(proxy.port)
    encoded = hpack.Encoder().encode([(":method", "GET"), (":path", "/"), (":scheme", "http"),
                                      (":authority", "a")])
    first = HeadersFrame(1, data=encoded)
    flood = b"".join(ContinuationFrame(1, data=b"").serialize() for _ in range(500))
    try:
        client.send_raw(first.serialize() + flood)
    except ConnectionError:
        pass  # the server may be gone before the last frame went out
    goaway = client.goaway()
    assert goaway is not None and goaway.error_code == ErrorCodes.PROTOCOL_ERROR
    assert backend.requests == []


@pytest.mark.parametrize("frame", [PingFrame(0, opaque_data=b"12345678"), SettingsFrame(0),
                                   PriorityFrame(1, depends_on=0, stream_weight=16)],
                         ids=["ping", "settings", "priority"])
def test_control_frame_flood_gets_enhance_your_calm(h2c_proxy, frame):
    proxy, _ = h2c_proxy()
    client = H2Client.connect(proxy.port)
    try:
        client.send_raw(frame.serialize() * 500)
    except ConnectionError:
        pass
    goaway = client.goaway()
    assert goaway is not None and goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM


def test_empty_data_frame_flood_gets_enhance_your_calm(h2c_proxy, make_backend):
    # CVE-2019-9518: empty DATA frames cost work, and flow control does not count them.
    release = threading.Event()
    backend = make_backend()
    hanging_route(backend, release)
    proxy, _ = h2c_proxy(backend=backend)
    client = H2Client.connect(proxy.port)
    stream = client.request("/hang", method="POST", end=False)
    try:
        client.send_raw(DataFrame(stream, data=b"").serialize() * 500)
    except ConnectionError:
        pass
    goaway = client.goaway()
    release.set()
    assert goaway is not None and goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM


# -- flow control --------------------------------------------------------------------------------------

def _counting_stream(total: int, written: list):
    def handler(h, record):
        h.send_response(200)
        h.send_header("Content-Length", str(total))
        h.end_headers()
        try:
            for offset in range(0, total, STREAM_PIECE):
                h.wfile.write(pattern_bytes(offset, min(STREAM_PIECE, total - offset)))
                written[0] += min(STREAM_PIECE, total - offset)
        except OSError:
            pass  # the proxy gave up on the stalled client and closed this connection
    return handler


def test_client_that_stops_reading_stops_the_upstream_and_meets_send_timeout(h2c_proxy, make_backend):
    total = 256 * 1024 * 1024
    written = [0]
    backend = make_backend()
    backend.route("/huge", _counting_stream(total, written))
    proxy, _ = h2c_proxy(server={"send_timeout": "2s"}, backend=backend)
    client = H2Client.connect(proxy.port)
    client.auto_ack = False  # never a WINDOW_UPDATE: the connection's window runs dry at 64 KiB
    stream = client.request("/huge")
    client.until(lambda e: isinstance(e, h2.events.DataReceived) and e.stream_id == stream)
    client.sock.settimeout(0.05)
    last_data = time.monotonic()
    ended = None
    for _ in range(600):  # 30 s at most; send_timeout is 2 s
        try:
            events = client.read_once()
        except socket.timeout:
            continue
        if any(isinstance(e, h2.events.DataReceived) for e in events):
            last_data = time.monotonic()
        ended = next((e for e in events if isinstance(e, h2.events.StreamReset) and e.stream_id == stream), None)
        if ended is not None:
            break
    client.sock.settimeout(CLIENT_TIMEOUT)
    assert ended is not None and ended.error_code == ErrorCodes.CANCEL
    assert time.monotonic() - last_data >= 1.5  # the stream waited out send_timeout with the window shut
    received = sum(len(e.data) for e in client.events if isinstance(e, h2.events.DataReceived))
    assert received <= 65535
    # The stream stopped reading its upstream: what the backend could write is what the sockets buffer.
    assert written[0] < 64 * 1024 * 1024
    headers, body = client.response(client.request("/small"))  # the connection itself still serves
    assert headers[":status"] == "200"
    client.close()


def _unsent_by_the_proxy(client_sock) -> int:
    """Bytes the proxy's end of this connection holds unsent (tx_queue in /proc/net/tcp)."""
    ours, theirs = client_sock.getsockname()[1], client_sock.getpeername()[1]
    with open("/proc/net/tcp") as table:
        for line in list(table)[1:]:
            fields = line.split()
            if (int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16)) == (theirs, ours):
                return int(fields[4].split(":")[0], 16)
    return 0


def _stalled(client_sock, samples: list) -> bool:
    """True once the proxy's send queue is full and stays so (its writes wait for the client)."""
    samples.append(_unsent_by_the_proxy(client_sock))
    time.sleep(0.1)
    return len(samples) > 3 and samples[-1] > 0 and samples[-1] == samples[-2] == samples[-3]


def test_stream_waiting_on_a_full_socket_leaves_the_other_streams_going(h2c_proxy, make_backend):
    # A stream whose writes wait for a client that does not read its socket holds no lock the others
    # need: the reader still takes new requests off the connection and forwards them, and every frame
    # still arrives whole and in order once the client reads.
    total = 32 * 1024 * 1024
    backend = make_backend()
    backend.route("/huge", stream_pattern(total))
    proxy, _ = h2c_proxy(server={"send_timeout": "60s"}, backend=backend)
    client = H2Client.connect(proxy.port)
    client.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2 ** 31 - 1})
    client.h2.increment_flow_control_window(2 ** 31 - 1 - 65535)  # only TCP stops the proxy, not h2
    client.flush()
    huge = client.request("/huge")
    samples: list = []
    wait_for(lambda: _stalled(client.sock, samples), timeout=30, what="the proxy's writes to wait")
    small = client.request("/small")
    # Well inside send_timeout: a stream holding the session's lock while it waits would keep the
    # request from the backend for all of it.
    wait_for(lambda: any(r.path == "/small" for r in backend.requests), timeout=20, what="/small upstream")
    headers, body = client.response(small)
    assert headers[":status"] == "200"
    ended = client.until(lambda e: isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset))
                         and e.stream_id == huge)
    assert isinstance(ended, h2.events.StreamEnded)
    body = b"".join(e.data for e in client.events if isinstance(e, h2.events.DataReceived) and e.stream_id == huge)
    assert len(body) == total and hashlib.sha256(body).hexdigest() == pattern_sha256(total)
    client.close()


def test_connection_error_behind_a_stalled_writer_is_not_read_over_and_over(h2c_proxy, make_backend,
                                                                             monkeypatch):
    # After a connection error the GOAWAY waits behind a stream writing to a client that does not read;
    # the reader must wait for that writer, not park the still-readable connection and take it again.
    reads = [0]
    serve = Http2Server.serve

    def counting_serve(self, conn):
        reads[0] += 1
        return serve(self, conn)

    monkeypatch.setattr(Http2Server, "serve", counting_serve)
    backend = make_backend()
    backend.route("/huge", stream_pattern(32 * 1024 * 1024))
    proxy, _ = h2c_proxy(server={"send_timeout": "3s"}, backend=backend)
    client = H2Client.connect(proxy.port)
    client.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2 ** 31 - 1})
    client.h2.increment_flow_control_window(2 ** 31 - 1 - 65535)  # only TCP stops the proxy, not h2
    client.flush()
    client.request("/huge")
    samples: list = []
    wait_for(lambda: _stalled(client.sock, samples), timeout=30, what="the proxy's writes to wait")
    before = reads[0]
    client.send_raw(b"\x00\x00\x00\x00\x00\x00\x00\x00\x00")  # DATA on stream 0: a connection error
    client.send_raw(PingFrame(0, opaque_data=b"12345678").serialize())  # and more bytes, left unread
    wait_for(lambda: build_status(proxy.app)["http2"]["connections"] == 0, timeout=30,
             what="the connection closed once the writer gave up (send_timeout)")
    assert reads[0] - before <= 3
    client.close()


@pytest.mark.parametrize("answered", [b"", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf."],
                         ids=["before-the-head", "mid-body"])
def test_stream_reset_while_its_upstream_thinks_closes_that_upstream_connection(h2c_proxy, make_raw_backend,
                                                                                answered):
    events = []

    def thinks_until_dropped(peer):
        peer.read_head()
        if answered:
            peer.send(answered)
        events.append("request")
        try:
            events.append("closed" if peer.sock.recv(1) == b"" else "data")
        except TimeoutError:
            events.append("still open")

    backend = make_raw_backend(thinks_until_dropped)
    proxy, _ = h2c_proxy(backend=backend, upstream_options={"read_timeout": "60s"})
    client = H2Client.connect(proxy.port)
    stream = client.request("/think")
    wait_for(lambda: events == ["request"], what="the request upstream")
    if answered:
        client.until(lambda e: isinstance(e, h2.events.DataReceived) and e.stream_id == stream)
    client.h2.reset_stream(stream)
    client.flush()
    # As nginx does: the cancelled request's upstream connection is closed, its worker freed, at once,
    # not when the upstream answers or read_timeout passes.
    wait_for(lambda: len(events) == 2, what="the upstream connection closed")
    assert events == ["request", "closed"]
    wait_for(lambda: build_status(proxy.app)["http2"]["streams"] == 0, what="the stream finished")
    assert backend.connections == 1  # not retried elsewhere
    client.close()


def _window_back(client: H2Client, size: int) -> bool:
    """Read (bounded) until the connection's send window is back past half of ``size`` (h2 gives
    window back in steps of half of it); False if it never is."""
    try:
        client.until(lambda e: client.h2.outbound_flow_control_window > size // 2, rounds=200)
    except (AssertionError, socket.timeout):
        return False
    return True


def _upload(client: H2Client, size: int, headers=(), end: bool = True) -> int:
    """A POST whose body goes out at once, in frames of the client's size, all in one write."""
    stream = client.request("/upload", method="POST", headers=headers, end=False)
    frame = client.h2.max_outbound_frame_size
    for offset in range(0, size, frame):
        client.h2.send_data(stream, b"x" * min(frame, size - offset), end_stream=end and offset + frame >= size)
    client.flush()
    return stream


def test_body_of_a_stream_answered_before_reading_it_gives_the_window_back(h2c_proxy):
    proxy, backend = h2c_proxy(server={"max_body_bytes": "100KiB"})
    client = H2Client.connect(proxy.port)
    start = client.h2.outbound_flow_control_window
    for _ in range(4):  # 800 KB sent, in the proxy's 1 MiB connection window: none of it ever read
        headers, _ = client.response(_upload(client, 200_000, [("content-length", "200000")]))
        assert headers[":status"] == "413"
    # Stream bytes nobody reads are the connection's to give back, or its window runs dry for good
    # and every later upload on the connection stalls.
    assert _window_back(client, start)
    assert not backend.requests
    client.close()


def test_body_of_a_stream_reset_before_its_worker_gives_the_window_back(h2c_proxy, make_backend):
    release = threading.Event()
    backend = make_backend()
    hanging_route(backend, release)
    proxy, _ = h2c_proxy(server={"min_threads": 1, "max_threads": 1}, backend=backend)
    client = H2Client.connect(proxy.port)
    start = client.h2.outbound_flow_control_window
    client.request("/hang")  # the only worker waits on it: the uploads below queue in the pool
    wait_for(lambda: len(backend.requests) == 1, what="the hanging stream upstream")
    for _ in range(4):
        client.h2.reset_stream(_upload(client, 200_000, end=False))
        client.flush()
    release.set()
    assert _window_back(client, start)
    client.close()


# -- slowloris ---------------------------------------------------------------------------------------------

def _closed_by_server(client: H2Client) -> bool:
    """Wait (bounded by the socket timeout) for the server to close; True if it did."""
    try:
        client.until(lambda e: False, rounds=200)
    except (AssertionError, socket.timeout):
        return False
    except ConnectionError:
        return True
    return client.closed


def test_silent_connection_is_closed_after_header_timeout(h2c_proxy):
    proxy, _ = h2c_proxy(server={"header_timeout": "1s"})
    client = H2Client.connect(proxy.port)
    assert _closed_by_server(client)
    assert any(is_goaway(e) for e in client.events)


def test_half_sent_header_block_is_closed_after_header_timeout(h2c_proxy):
    proxy, backend = h2c_proxy(server={"header_timeout": "1s", "idle_timeout": "60s"})
    client = H2Client.connect(proxy.port)
    headers, _ = client.response(client.request("/first"))  # past the first request: idle_timeout rules
    assert headers[":status"] == "200"
    encoded = hpack.Encoder().encode([(":method", "GET")])
    client.send_raw(HeadersFrame(3, data=encoded).serialize())  # no END_HEADERS, and nothing more
    assert _closed_by_server(client)
    assert [r.path for r in backend.requests] == ["/first"]


def test_pings_do_not_keep_an_idle_connection_open(h2c_proxy):
    proxy, _ = h2c_proxy(server={"idle_timeout": "1s"})
    client = H2Client.connect(proxy.port)
    headers, _ = client.response(client.request("/one"))
    assert headers[":status"] == "200"
    client.sock.settimeout(0.3)
    closed = False
    for _ in range(300):  # a ping every 0.1 s, 30 s at most; idle_timeout is 1 s
        time.sleep(0.1)  # pacing the client, not waiting for the server
        if any(is_goaway(e) for e in client.events):
            closed = _closed_by_server(client)
            break
        try:
            client.h2.ping(b"keepit!!")
            client.flush()
            client.read_once()
        except socket.timeout:
            continue
        except (ConnectionError, OSError):
            closed = True
            break
        if client.closed:
            closed = True
            break
    assert closed
    goaway = next(e for e in client.events if is_goaway(e))
    assert goaway.error_code == ErrorCodes.NO_ERROR  # idle_timeout, not the flood limit (100 PINGs)


# -- lifecycle and observability ---------------------------------------------------------------------------

def test_drain_sends_goaway_with_last_stream_and_lets_it_finish(h2c_proxy, make_backend):
    release = threading.Event()
    backend = make_backend()
    hanging_route(backend, release)
    proxy, _ = h2c_proxy(server={"graceful_timeout": "20s"}, backend=backend)
    client = H2Client.connect(proxy.port)
    stream = client.request("/hang")
    wait_for(lambda: backend.requests, what="the request upstream")
    proxy.process.stop()  # graceful: SIGTERM's path
    goaway = client.goaway()
    assert goaway.error_code == ErrorCodes.NO_ERROR and goaway.last_stream_id == stream
    client.request_after_goaway(stream + 2, "/late")  # after GOAWAY: refused, never forwarded
    release.set()
    frames = client.frames_until_close()  # ...and then the server closes the connection
    refused = [f for f, _ in frames if isinstance(f, RstStreamFrame) and f.stream_id == stream + 2]
    assert refused and refused[0].error_code == ErrorCodes.REFUSED_STREAM
    answer = [headers for f, headers in frames if isinstance(f, HeadersFrame) and f.stream_id == stream]
    assert answer and answer[0][":status"] == "200"
    body = b"".join(f.data for f, _ in frames if isinstance(f, DataFrame) and f.stream_id == stream)
    assert body == b"done"
    proxy.thread.join(CLIENT_TIMEOUT)
    assert not proxy.thread.is_alive()
    assert [r.path for r in backend.requests] == ["/hang"]


def test_drain_sends_goaway_at_once_while_every_worker_runs_a_stream(h2c_proxy, make_backend):
    # The GOAWAYs are work for the pool: a pool busy with long streams must grow for them, as it does
    # outside a drain, or the clients learn of the drain only when a stream ends.
    release = threading.Event()
    backend = make_backend()
    hanging_route(backend, release)
    proxy, _ = h2c_proxy(server={"graceful_timeout": "30s"}, backend=backend,
                         upstream_options={"read_timeout": "60s"})
    clients = [H2Client.connect(proxy.port) for _ in range(12)]
    streams = [client.request("/hang") for client in clients]
    wait_for(lambda: len(backend.requests) == len(clients), what="every request upstream")
    proxy.process.stop()  # graceful: SIGTERM's path
    try:
        for client, stream in zip(clients, streams):
            frames = client.frames_until_close(until=lambda frame: isinstance(frame, GoAwayFrame))
            assert frames[-1][0].last_stream_id == stream  # before its answer, which the backend holds
    finally:
        release.set()
    for client, stream in zip(clients, streams):
        answer = [headers for f, headers in client.frames_until_close() if isinstance(f, HeadersFrame)]
        assert answer and answer[0][":status"] == "200"
        client.close()


LATE_STREAMS = 500


def test_drain_delivers_every_last_answer_while_late_streams_are_refused(h2c_proxy, make_backend):
    # The last stream ending while another worker reads the connection (a stream racing the GOAWAY)
    # must not close it under that worker: the answer and the refusal both reach the client.
    release = threading.Event()
    backend = make_backend()
    body = pattern_bytes(0, 60_000)  # within the stream window: the raw reader gives none back
    backend.route("/hang", lambda h, record: (release.wait(CLIENT_TIMEOUT), h.reply(200, body)))
    proxy, _ = h2c_proxy(server={"graceful_timeout": "20s", "min_threads": 8}, backend=backend)
    clients = [H2Client.connect(proxy.port) for _ in range(12)]
    streams = [client.request("/hang") for client in clients]
    wait_for(lambda: len(backend.requests) == len(clients), what="every request upstream")
    proxy.process.stop()  # graceful: SIGTERM's path
    for client, stream in zip(clients, streams):
        goaway = client.frames_until_close(until=lambda frame: isinstance(frame, GoAwayFrame))[-1][0]
        assert goaway.error_code == ErrorCodes.NO_ERROR and goaway.last_stream_id == stream
        for late in range(stream + 2, stream + 2 + 2 * LATE_STREAMS, 2):  # the reader is busy refusing
            client.request_after_goaway(late, "/late")                      # them as the answers come
    release.set()
    for client, stream in zip(clients, streams):
        frames = client.frames_until_close()
        refused = [f for f, _ in frames if isinstance(f, RstStreamFrame) and f.stream_id == stream + 2]
        assert refused and refused[0].error_code == ErrorCodes.REFUSED_STREAM
        answer = [headers for f, headers in frames if isinstance(f, HeadersFrame) and f.stream_id == stream]
        assert answer and answer[0][":status"] == "200"
        assert b"".join(f.data for f, _ in frames if isinstance(f, DataFrame) and f.stream_id == stream) == body
        client.close()
    proxy.thread.join(CLIENT_TIMEOUT)
    assert [r.path for r in backend.requests] == ["/hang"] * len(clients)


def test_status_counts_http2_connections_and_streams(h2c_proxy, make_backend):
    release = threading.Event()
    backend = make_backend()
    hanging_route(backend, release)
    proxy, _ = h2c_proxy(backend=backend)
    client = H2Client.connect(proxy.port)
    client.request("/hang")
    client.request("/hang")
    wait_for(lambda: len(backend.requests) == 2, what="two streams upstream")
    status = build_status(proxy.app, proxy.process.server, proxy.process.pool)
    assert status["http2"]["connections"] == 1 and status["http2"]["streams"] == 2
    release.set()
    client.close()
    wait_for(lambda: build_status(proxy.app)["http2"] == {"connections": 0, "streams": 0, "streams_total": 2},
             what="the counts back to zero")


def test_no_websocket_over_h2_advertised(h2c_proxy):
    proxy, _ = h2c_proxy()
    client = H2Client.connect(proxy.port)
    assert client.h2.remote_settings.get(h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL, 0) == 0
    client.close()


def test_metrics_show_http2_connections_and_streams(h2c_proxy):
    proxy, _ = h2c_proxy()
    client = H2Client.connect(proxy.port)
    headers, _ = client.response(client.request("/counted"))
    assert headers[":status"] == "200"
    text = render_prometheus(Metrics(proxy.app).snapshot())
    assert "pyproxy_http2_connections 1" in text
    assert "pyproxy_http2_streams_total 1" in text
    client.close()


def test_h2c_and_h2_max_streams_apply_on_reload_to_new_connections(make_backend):
    backend = make_backend()
    sock = bind_listener("127.0.0.1", 0)
    port = sock.getsockname()[1]

    def config(**listen):
        document = proxy_config_dict({"web": [backend.address]},
                                     server={"listen": [{"address": f"127.0.0.1:{port}", **listen}],
                                             "h2_max_streams": 7 if listen else 100})
        return parse_config(document, "test.toml")

    first = config()
    process = ProxyProcess(first, listeners=[(first.server.listen[0], sock)])
    thread = process.start_in_thread()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) as plain:
            plain.sendall(PREFACE)
            assert plain.recv(100).startswith(b"HTTP/1.1 ")  # no h2c yet: an HTTP/1.1 refusal
        process.reload(config(h2c=True))
        client = H2Client.connect(port)
        assert client.h2.remote_settings.max_concurrent_streams == 7
        headers, _ = client.response(client.request("/after-reload"))
        assert headers[":status"] == "200"
        client.close()
    finally:
        process.stop(force=True)
        thread.join(CLIENT_TIMEOUT)


def test_client_resetting_right_after_the_preface_is_no_error(h2c_proxy, caplog):
    proxy, _ = h2c_proxy()
    for _ in range(20):  # the reset usually lands before a worker answers the preface
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=CLIENT_TIMEOUT)
        sock.sendall(PREFACE + SettingsFrame(0).serialize())
        close_with_rst(sock)
    client = H2Client.connect(proxy.port)  # the proxy serves on
    headers, _ = client.response(client.request("/after"))
    assert headers[":status"] == "200"
    client.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_streams_in_progress_are_answered_after_the_clients_goaway(h2c_proxy, make_backend, caplog):
    # RFC 9113 §6.8: a client's GOAWAY says it opens no more streams; those it opened still get their
    # answers (its last-stream-id is about streams *we* would open: none). Then the connection closes.
    release = threading.Event()
    backend = make_backend()
    hanging_route(backend, release)
    proxy, _ = h2c_proxy(backend=backend)
    client = H2Client.connect(proxy.port)
    streams = [client.request("/hang"), client.request("/hang")]
    wait_for(lambda: len(backend.requests) == 2, what="both streams upstream")
    goaway = GoAwayFrame(0)
    goaway.last_stream_id = 0
    client.send_raw(goaway.serialize())  # raw: the client's own h2 would accept no frame after it
    late = client.request("/late")  # sent after it: refused, never served
    refused = client.until(lambda e: isinstance(e, h2.events.StreamReset) and e.stream_id == late)
    assert refused is not None and refused.error_code == ErrorCodes.REFUSED_STREAM
    release.set()
    for stream in streams:
        headers, body = client.response(stream)
        assert (headers[":status"], body) == ("200", b"done")
    assert client.until(lambda e: False) is None  # then the proxy closes the connection
    assert not any(r.path == "/late" for r in backend.requests)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    client.close()


def test_drain_lets_a_stream_parked_on_its_window_finish(h2c_proxy, make_backend):
    # A stream waiting for its client's window holds no worker, but the drain still counts it: GOAWAY
    # at once, and the whole answer once the client opens its window, then the close.
    total = 1024 * 1024
    backend = make_backend()
    backend.route("/big", stream_pattern(total))
    proxy, _ = h2c_proxy(server={"graceful_timeout": "30s"}, backend=backend)
    client = H2Client.connect(proxy.port)
    client.auto_ack = False
    stream = client.request("/big")
    counts, pool = proxy.process.app.http2_counts, proxy.process.pool
    wait_for(lambda: backend.requests and counts()["streams"] == 1 and pool.busy == 0, what="the stream parked")
    proxy.process.stop()  # graceful: SIGTERM's path
    received = sum(len(e.data) for e in client.events if isinstance(e, h2.events.DataReceived))
    frames = client.frames_until_close(until=lambda f: isinstance(f, GoAwayFrame))
    assert frames[-1][0].error_code == ErrorCodes.NO_ERROR and frames[-1][0].last_stream_id == stream
    received += sum(len(f.data) for f, _ in frames if isinstance(f, DataFrame))
    got = received
    ended = False
    for _ in range(2000):  # the window opened by what arrived, frame by frame, as a reading client does
        if received:
            client.send_raw(WindowUpdateFrame(0, window_increment=received).serialize()
                            + WindowUpdateFrame(stream, window_increment=received).serialize())
        frames = client.frames_until_close(until=lambda f: isinstance(f, DataFrame))
        data = [f for f, _ in frames if isinstance(f, DataFrame) and f.stream_id == stream]
        received = sum(len(f.data) for f in data)
        got += received
        if any("END_STREAM" in f.flags for f in data) or not frames:
            ended = bool(data) and "END_STREAM" in data[-1].flags
            break
    assert ended and got == total, f"the stream's answer did not finish: {got} bytes"
    assert client.frames_until_close() == []  # then the connection closes
    proxy.thread.join(CLIENT_TIMEOUT)
    assert not proxy.thread.is_alive()
    client.close()


def test_stream_ids_going_backwards_end_the_connection_and_late_data_its_stream(h2c_proxy, make_backend, caplog):
    # RFC 9113 §5.1.1: a stream id lower than one already used is a connection error (PROTOCOL_ERROR);
    # §5.1: DATA on a stream the client ended is a stream error (STREAM_CLOSED), the others go on.
    release = threading.Event()
    backend = make_backend()
    hanging_route(backend, release)
    proxy, _ = h2c_proxy(backend=backend)
    client = H2Client.connect(proxy.port)
    stream = client.request("/hang")
    wait_for(lambda: backend.requests, what="the request upstream")
    client.send_raw(DataFrame(stream, data=b"late", flags=["END_STREAM"]).serialize())
    reset = client.until(lambda e: isinstance(e, h2.events.StreamReset) and e.stream_id == stream)
    assert reset.error_code == ErrorCodes.STREAM_CLOSED
    release.set()
    headers, _ = client.response(client.request("/after"))  # the connection serves on
    assert headers[":status"] == "200"
    client.close()
    client = H2Client.connect(proxy.port)
    encoder = hpack.Encoder()
    for stream_id in (5, 3):
        block = encoder.encode([(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "h2.test")])
        client.send_raw(HeadersFrame(stream_id, data=block, flags=["END_HEADERS", "END_STREAM"]).serialize())
    frames = client.frames_until_close()
    goaway = [f for f, _ in frames if isinstance(f, GoAwayFrame)]
    assert goaway and goaway[0].error_code == ErrorCodes.PROTOCOL_ERROR
    client.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
