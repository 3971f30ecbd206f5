"""Slow and greedy clients: slowloris, slow POST, slow reader, connection floods.

The attackers outnumber the worker threads; each attack must end in 408 (or a dropped connection for a
client that reads nothing) within its deadline, a normal client is still served while it runs, and the
process's memory stays bounded.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
import requests

from tests.support.backends import stream_pattern
from tests.support.client import RawClient, raw_client, read_small_answer
from tests.support.proxy import CLIENT_TIMEOUT
from tests.support.timing import wait_for

pytestmark = pytest.mark.timeout(40)

ATTACKERS = 24     # more than max_threads below
MAX_THREADS = 8
SMALL_SERVER = {"min_threads": 2, "max_threads": MAX_THREADS, "header_timeout": "600ms"}


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def connect(proxy) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=CLIENT_TIMEOUT)


class Trickler(threading.Thread):
    """Slowloris: one byte of a never-ending head every ``gap`` seconds until told to stop."""

    def __init__(self, proxy, gap: float, stop: threading.Event):
        super().__init__(daemon=True)
        self.sock = connect(proxy)
        self.gap, self.stop = gap, stop
        self.answer = b""

    def run(self) -> None:
        head = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-Slow: " + b"a" * 10_000
        try:
            for index in range(len(head)):
                self.sock.sendall(head[index:index + 1])
                if self.stop.wait(self.gap):
                    return
        except OSError:  # the proxy closed on us: read what it said
            pass
        finally:
            self.answer = read_small_answer(self.sock)
            self.sock.close()




def _slowloris(make_backend, make_proxy) -> tuple[float, list, int]:
    """Run the trickle attack; returns (normal client's wait, attackers, RSS growth)."""
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]}, server=SMALL_SERVER)
    stop = threading.Event()
    rss_before = rss_bytes()
    attackers = [Trickler(proxy, 0.02, stop) for _ in range(ATTACKERS)]
    try:
        for attacker in attackers:
            attacker.start()
        started = time.monotonic()
        response = requests.get(proxy.url + "/", timeout=CLIENT_TIMEOUT)  # served during the attack
        waited = time.monotonic() - started
        assert response.status_code == 200
        for attacker in attackers:
            attacker.join(5)
    finally:
        stop.set()
    wait_for(lambda: proxy.process.pool.busy == 0, what="workers released")
    return waited, attackers, rss_bytes() - rss_before


def test_slowloris_gets_408_and_memory_stays_bounded(make_backend, make_proxy):
    _, attackers, rss_growth = _slowloris(make_backend, make_proxy)
    assert all(a.answer.startswith(b"HTTP/1.1 408") for a in attackers), [a.answer[:40] for a in attackers]
    assert rss_growth < 64 * 1024 * 1024


def test_slowloris_does_not_delay_a_normal_client(make_backend, make_proxy):
    waited, _, _ = _slowloris(make_backend, make_proxy)
    assert waited < 0.5, f"the normal client waited {waited:.2f}s for the attackers' deadlines"


def test_partial_heads_beyond_threads_are_all_timed_out(make_backend, make_proxy):
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]}, server=SMALL_SERVER)
    socks = [connect(proxy) for _ in range(ATTACKERS)]
    try:
        for sock in socks:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nX-Half: ")
        assert requests.get(proxy.url + "/", timeout=CLIENT_TIMEOUT).status_code == 200
        answers = [read_small_answer(sock) for sock in socks]
    finally:
        for sock in socks:
            sock.close()
    assert all(answer.startswith(b"HTTP/1.1 408") for answer in answers)


def test_slow_post_gets_408_after_the_body_timeout(make_backend, make_proxy):
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]}, server=SMALL_SERVER | {"body_timeout": "300ms"})
    assert proxy.app.settings.body_timeout == 0.3  # server.body_timeout reaches the handler
    socks = [connect(proxy) for _ in range(ATTACKERS)]
    try:
        for sock in socks:
            sock.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\npartial")
        assert requests.get(proxy.url + "/", timeout=CLIENT_TIMEOUT).status_code == 200
        answers = [RawClient(sock).read_response() for sock in socks]
    finally:
        for sock in socks:
            sock.close()
    assert {answer.status for answer in answers} == {408}
    assert backend.requests[-1].method == "GET"  # no partial POST was ever executed
    wait_for(lambda: proxy.process.pool.busy == 0, what="workers released")


def test_slow_small_posts_hold_no_thread_and_a_normal_client_is_served_at_once(make_backend, make_proxy):
    """More half-sent small bodies than threads: they wait parked in the selector, not in workers."""
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]}, server=SMALL_SERVER | {"body_timeout": "2s"})
    socks = [connect(proxy) for _ in range(ATTACKERS)]
    try:
        for sock in socks:
            sock.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\npartial")
        wait_for(lambda: proxy.process.server.connection_counts()["idle"] == ATTACKERS,
                 what="every slow POST parked")
        assert proxy.process.pool.busy == 0
        started = time.monotonic()
        assert requests.get(proxy.url + "/", timeout=CLIENT_TIMEOUT).status_code == 200
        assert time.monotonic() - started < 0.5  # not queued behind the attackers
        answers = [read_small_answer(sock) for sock in socks]
    finally:
        for sock in socks:
            sock.close()
    assert all(answer.startswith(b"HTTP/1.1 408") and b"request body not received in time" in answer
               for answer in answers)
    assert [request.method for request in backend.requests] == ["GET"]  # no POST reached the backend


def test_a_small_body_sent_in_pieces_arrives_whole(make_backend, make_proxy):
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]}, server=SMALL_SERVER | {"body_timeout": "2s"})
    body = bytes(range(256)) * 40  # 10,240 bytes
    with raw_client(proxy) as client:
        client.send(b"POST /form HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:100])
        wait_for(lambda: proxy.process.server.connection_counts()["idle"] == 1, what="the request parked")
        client.send(body[100:5000])
        client.send(body[5000:])
        response = client.read_response()
    assert response.status == 200
    assert backend.requests[-1].body == body


def test_slow_reader_is_dropped_after_the_send_timeout(make_backend, make_proxy):
    backend = make_backend().route("/big", stream_pattern(32 * 1024 * 1024))
    proxy = make_proxy({"web": [backend.address]}, server=SMALL_SERVER | {"send_timeout": "500ms"})
    assert proxy.app.settings.send_timeout == 0.5  # server.send_timeout reaches the handler
    readers = []
    for _ in range(MAX_THREADS + 2):
        sock = connect(proxy)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
        readers.append(sock)
    try:
        assert requests.get(proxy.url + "/", timeout=CLIENT_TIMEOUT).status_code == 200
        wait_for(lambda: proxy.process.pool.busy == 0, timeout=10, what="stalled sends given up")
    finally:
        for sock in readers:
            sock.close()


def test_max_connections_answers_503_fast(make_backend, make_proxy):
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]}, server={**SMALL_SERVER, "max_connections": 4,
                                                           "header_timeout": "5s"})
    held = [connect(proxy) for _ in range(4)]
    try:
        for sock in held:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n")  # incomplete: they stay open
        wait_for(lambda: sum(proxy.process.server.connection_counts().values()) >= 4, what="4 held")
        started = time.monotonic()
        with connect(proxy) as extra:
            answer = read_small_answer(extra)
        assert answer.startswith(b"HTTP/1.1 503")
        assert time.monotonic() - started < 1.0
    finally:
        for sock in held:
            sock.close()


# -- two worker threads: a client that holds one while it sends nothing starves the rest -------------
HEADER_TIMEOUT = 3.0
FEW_THREADS = {"min_threads": 1, "max_threads": 2, "header_timeout": f"{HEADER_TIMEOUT}s"}
CRLF_SENDERS = 6  # three times max_threads


# -- empty lines before a request line hold no worker thread ------------------------------------------
# RFC 9112 §2.2 lets a client send CRLFs before a request line (old clients add one after a POST body).
# The parser skips them, which left its buffer empty: the handler then took the connection for idle
# and blocked a worker in recv() until header_timeout instead of parking it like any partial head, so
# a handful of connections sending "\r\n" starved the pool (slowloris without the trickle).
@pytest.mark.parametrize("opening", [
    b"\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nok\r\n",  # keep-alive, CRLF after the body
], ids=["fresh-connection", "after-post-body"])
def test_empty_lines_before_a_request_are_parked_not_blocking_a_worker(make_backend, make_proxy, opening):
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]}, server=FEW_THREADS)
    socks = [proxy.connect() for _ in range(CRLF_SENDERS)]
    try:
        for sock in socks:
            sock.sendall(opening)
        server = proxy.process.server
        wait_for(lambda: sum(server.connection_counts().values()) >= CRLF_SENDERS, what="attackers accepted")
        started = time.monotonic()
        response = requests.get(proxy.url + "/", timeout=CLIENT_TIMEOUT)
        waited = time.monotonic() - started
        assert response.status_code == 200
        assert waited < HEADER_TIMEOUT / 3, f"a normal client waited {waited:.2f}s behind {CRLF_SENDERS} CRLF senders"
        wait_for(lambda: proxy.process.pool.busy == 0, what="no worker held by a CRLF sender")
    finally:
        for sock in socks:
            sock.close()


# -- an early answer lingers once, for a bounded time ---------------------------------------------------
# A backend answering before it read the upload (403 here) closes the client connection with the
# body unread: the proxy lingers (nginx's lingering_close, LINGER_SECONDS) and closes, even while the
# client keeps sending. A client that never stops must not keep a worker (two lingers, or an endless one).
def test_a_client_still_uploading_after_an_early_answer_is_lingered_on_once(make_raw_backend, make_proxy):
    from proxy.serve.handler import LINGER_SECONDS

    def script(peer):
        if peer.read_head():
            peer.send(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\nConnection: close\r\n\r\nno")

    backend = make_raw_backend(script)
    proxy = make_proxy({"web": [backend.address]}, upstream_options={"retries": 0})
    with proxy.connect() as sock:
        sock.sendall(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 90000000\r\n\r\n")  # under max_body_bytes
        sock.settimeout(0.05)
        answer, answered_at, piece, fin = b"", None, b"x" * 4096, False
        deadline = time.monotonic() + 4 * LINGER_SECONDS + 2  # bounded: the proxy must close well before
        try:
            while time.monotonic() < deadline:
                try:
                    sock.send(piece)  # the client keeps uploading the whole time, as curl would
                except (TimeoutError, BlockingIOError):
                    pass
                if fin:
                    time.sleep(0.05)  # pacing only: the loop waits for the reset that ends the linger
                    continue
                try:
                    got = sock.recv(4096)
                except (TimeoutError, BlockingIOError):
                    continue
                fin = not got  # the proxy's FIN starts its linger; it still reads (and drops) the upload
                answer += got
                answered_at = answered_at or time.monotonic()
        except OSError:
            pass  # reset or broken pipe: the proxy closed the socket for good
        closed_at = time.monotonic()
    assert answer.startswith(b"HTTP/1.1 403")
    assert closed_at - answered_at < LINGER_SECONDS * 1.6, f"lingered {closed_at - answered_at:.1f}s"
