"""Adversarial audit of observability: the admin listener, /metrics, /status, the access log, request ids.

Each test pins a bug the audit found (the docstring says what it was) or an important case no other
file covered. Real backends and clients on 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import array
import fcntl
import json
import os
import re
import signal
import socket
import struct
import termios
import threading
import time
from types import SimpleNamespace

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from proxy.observe.access_log import AccessLog
from proxy.observe.metrics import WorkerCounters
from tests.support.backends import named_backends
from tests.support.backends import FlakyBackend
from tests.support.client import read_small_answer
from tests.support.ports import free_port
from tests.support.processes import admin_status, children, proxy_config, running_proxy, spread_requests
from tests.test_access_log import Record as LogRecord
from tests.support.proxy import DEADLINE, config_document
from tests.support.timing import wait_for

pytestmark = pytest.mark.timeout(60)


def scrape(proxy) -> dict:
    response = requests.get(proxy.admin_url + "/metrics", timeout=DEADLINE)
    assert response.status_code == 200
    return {family.name: family for family in text_string_to_metric_families(response.text)}


def requests_counted(proxy, code: str, upstream: str = "-") -> float:
    samples = [s.value for s in scrape(proxy)["pyproxy_requests"].samples
               if s.name == "pyproxy_requests_total" and s.labels == {"upstream": upstream, "code": code}]
    return samples[0] if samples else 0.0


def json_log_lines(path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def logged_proxy(observed_proxy, tmp_path, server: dict | None = None):
    """An observed proxy in front of one backend, writing a JSON access log to tmp_path."""
    backend = FlakyBackend("a")
    log_path = tmp_path / "access.json"
    proxy = observed_proxy(config_document({"web": {"servers": [backend.address]}},
                                           server=server or {},
                                           log={"access": str(log_path), "format": "json"}))
    return proxy, backend, log_path


def send_raw(proxy, data: bytes) -> bytes:
    port = int(proxy.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
        sock.sendall(data)
        return read_small_answer(sock)


# -- 408s answered by the accept loop ---------------------------------------------------------------

@pytest.mark.parametrize("sent, method", [
    (b"GET /half HTTP/1.1\r\nHost: a\r\n", "-"),                                  # half a head, parked
    (b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nab", "POST"),  # a small body, parked
])
def test_a_408_for_a_parked_request_is_logged_and_counted(observed_proxy, tmp_path, sent, method):
    """Bug: a request parked in the selector (half a head, or a small body trickling in) that ran out
    of time got its 408 from the accept loop (HttpHandler.on_expired), which told no observer: no
    access log line and no pyproxy_requests_total{code="408"}, so slowloris-style clients were
    invisible. A 408 answered while a worker waited on the client was logged; only these were not."""
    proxy, backend, log_path = logged_proxy(observed_proxy, tmp_path,
                                            server={"header_timeout": "300ms", "body_timeout": "300ms"})
    try:
        answer = send_raw(proxy, sent)
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:80]
        wait_for(lambda: requests_counted(proxy, "408") == 1, DEADLINE, what="the 408 in /metrics")
        wait_for(lambda: any(line["status"] == 408 for line in json_log_lines(log_path)), DEADLINE,
                 what="the 408 in the access log")
        (line,) = [line for line in json_log_lines(log_path) if line["status"] == 408]
        assert line["method"] == method
        assert line["bytes"] == len(answer)
    finally:
        backend.kill()


# -- request ids ------------------------------------------------------------------------------------

@pytest.mark.parametrize("offered", [
    "z" * 5000,              # huge: it went into every log line and to the backend
    "a b",                   # a space: breaks the combined format's last field
    "id\twith-tab",          # a control character
    "caf\u00e9",             # not ASCII (sent as UTF-8, read back as latin-1 mojibake)
])
def test_an_unusable_client_request_id_is_replaced(observed_proxy, tmp_path, offered):
    """Bug: X-Request-Id was reused whatever the client sent: 5000 bytes, spaces, tabs or non-ASCII
    went to the access log, the backend and back to the client. Like Heroku's router, only a sane id
    (visible ASCII, at most 200 characters) is kept; any other is replaced by a generated one."""
    proxy, backend, log_path = logged_proxy(observed_proxy, tmp_path)
    try:
        answer = send_raw(proxy, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\nX-Request-Id: "
                          + offered.encode("utf-8") + b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:80]
        returned = [line.split(b":", 1)[1].strip().decode("latin-1")
                    for line in answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n") if line.lower().startswith(b"x-request-id:")]
        assert len(returned) == 1 and returned[0] != offered.encode("utf-8").decode("latin-1")
        assert len(returned[0]) == 32 and int(returned[0], 16) >= 0  # a generated one
        wait_for(lambda: json_log_lines(log_path), DEADLINE, what="the access log line")
        assert json_log_lines(log_path)[0]["request_id"] == returned[0]
    finally:
        backend.kill()


def test_a_sane_client_request_id_is_kept(observed_proxy, tmp_path):
    proxy, backend, log_path = logged_proxy(observed_proxy, tmp_path)
    offered = "Root=1-5759e988-bd862e3fe1be46a9/x+y=" + "k" * 150
    try:
        response = requests.get(proxy.url + "/", headers={"X-Request-Id": offered}, timeout=DEADLINE)
        assert response.headers["X-Request-Id"] == offered
        wait_for(lambda: json_log_lines(log_path), DEADLINE, what="the access log line")
        assert json_log_lines(log_path)[0]["request_id"] == offered
    finally:
        backend.kill()


# -- counters never go down ---------------------------------------------------------------------------

def upstream_counter(proxy, sample: str, upstream: str, server: str) -> float:
    family = sample.removesuffix("_total")
    found = [s.value for s in scrape(proxy)[family].samples
             if s.name == sample and s.labels == {"upstream": upstream, "server": server}]
    assert len(found) == 1, (sample, found)
    return found[0]


def test_upstream_counters_survive_a_reload_that_rebuilds_the_server(observed_proxy):
    """Bug: a reload changing a server's weight rebuilds its Server object, whose counters start at 0:
    pyproxy_upstream_requests_total / _failures_total for the same labels fell back to 0, which
    Prometheus' rate() reads as a counter reset (the whole new value counted as fresh increase)."""
    backend = FlakyBackend("a")
    document = config_document({"web": {"servers": [backend.address]}})
    proxy = observed_proxy(document)
    try:
        with requests.Session() as session:
            for _ in range(3):
                assert session.get(proxy.url + "/", timeout=DEADLINE).status_code == 200
        assert upstream_counter(proxy, "pyproxy_upstream_requests_total", "web", backend.address) == 3
        document["upstreams"]["web"]["servers"] = [{"address": backend.address, "weight": 3}]
        proxy.reload(document)
        document["upstreams"]["web"]["servers"] = [{"address": backend.address, "weight": 2}]
        proxy.reload(document)  # twice without a scrape between: no replaced object goes unseen
        assert upstream_counter(proxy, "pyproxy_upstream_requests_total", "web", backend.address) == 3
        assert requests.get(proxy.url + "/", timeout=DEADLINE).status_code == 200
        assert upstream_counter(proxy, "pyproxy_upstream_requests_total", "web", backend.address) == 4
    finally:
        backend.kill()


def test_metrics_of_two_workers_do_not_go_down_when_one_is_killed_and_replaced(tmp_path):
    """Bug: with workers = 2, /metrics summed the workers that answered; a killed worker's
    replacement starts from 0, so pyproxy_requests_total (and every other counter) fell by what
    the dead worker had served, which Prometheus reads as a counter reset."""
    with named_backends("a") as (backend,):
        port, admin_port = free_port(), free_port()
        config = proxy_config(port, backend.address, workers=2, admin_port=admin_port)
        with running_proxy(tmp_path, config) as run:
            per_worker = spread_requests(run.url, admin_port, 2)
            assert len(per_worker) == 2 and all(per_worker.values())
            admin = SimpleNamespace(admin_url=f"http://127.0.0.1:{admin_port}")
            before = counter_totals(admin)
            victim = next(iter(per_worker))
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: replaced(admin_port, victim), 20, what="the killed worker's replacement")
            after = counter_totals(admin)
            assert after == pytest.approx(before)  # nothing served meanwhile: every counter where it was
            assert requests.get(run.url + "/", timeout=DEADLINE).status_code == 200
            assert counter_totals(admin)["pyproxy_requests_total"] == before["pyproxy_requests_total"] + 1


def replaced(admin_port: int, victim: int) -> bool:
    pids = [w["pid"] for w in admin_status(admin_port)["workers"]]
    return len(pids) == 2 and victim not in pids


def counter_totals(proxy) -> dict[str, float]:
    """Every counter sample summed over its labels, by sample name."""
    totals: dict[str, float] = {}
    for family in scrape(proxy).values():
        if family.type in ("counter", "histogram"):
            for sample in family.samples:
                if sample.name.endswith(("_total", "_count", "_sum")):
                    totals[sample.name] = totals.get(sample.name, 0) + sample.value
    return totals


def worker_snapshot(requests_served: int, failures: int, servers=("127.0.0.1:9001",)) -> dict:
    return {"processes": 1, "buckets": [1.0], "requests": [{"upstream": "web", "code": "200", "value": requests_served}],
            "durations": {"web": {"counts": [requests_served, 0], "sum": 0.5, "count": requests_served}},
            "servers": [{"upstream": "web", "server": s, "up": 1, "active": 1, "requests": requests_served,
                         "failures": failures} for s in servers],
            "client_connections": {"idle": 2}, "threads": {"threads": 4}, "open_tunnels": 1,
            "access_log": {"written": requests_served, "dropped": 0}}


def test_worker_counters_keep_silent_and_gone_workers_counts_but_not_their_gauges():
    counters = WorkerCounters()
    both = counters.merged({1: worker_snapshot(10, 1), 2: worker_snapshot(5, 0)})
    assert both["requests"][0]["value"] == 15 and both["processes"] == 2
    silent = counters.merged({2: worker_snapshot(6, 0)})  # worker 1 did not answer in time
    assert silent["requests"][0]["value"] == 16 and silent["durations"]["web"]["count"] == 16
    assert silent["servers"][0]["requests"] == 16 and silent["servers"][0]["active"] == 1
    assert silent["client_connections"] == {"idle": 2} and silent["processes"] == 1
    counters.gone(1)
    counters.merged({2: worker_snapshot(7, 0)})
    counters.gone(2)
    fresh = counters.merged({3: worker_snapshot(1, 0, servers=("127.0.0.1:9002",))})
    assert fresh["requests"][0]["value"] == 10 + 7 + 1
    assert fresh["access_log"] == {"written": 18, "dropped": 0}
    # a server no live worker reports (a reload removed it) is no longer a series
    assert [(g["server"], g["requests"], g["failures"]) for g in fresh["servers"]] == [("127.0.0.1:9002", 1, 0)]


# -- access log text ----------------------------------------------------------------------------------

UTF8_REQUEST = (b"GET /cafe HTTP/1.1\r\nHost: a\r\nUser-Agent: caf\xc3\xa9 \xff\r\nReferer: /\xe2\x82\xac\r\n"
                b"Connection: close\r\n\r\n")


@pytest.mark.parametrize("fmt", ["json", "combined"])
def test_non_ascii_header_bytes_are_logged_as_sent_not_as_mojibake(observed_proxy, tmp_path, fmt):
    """Bug: header values are bytes read as latin-1, and the access log wrote those characters as
    text: a User-Agent "café" sent in UTF-8 was logged as "cafÃ©" (JSON and combined), a Referer
    with "€" as "râ\\x82¬". JSON now carries the UTF-8 text (a stray byte as \\xHH); combined escapes
    every non-ASCII byte as \\xHH, as nginx does, so the line stays ASCII."""
    backend = FlakyBackend("a")
    log_path = tmp_path / "access.log"
    proxy = observed_proxy(config_document({"web": {"servers": [backend.address]}},
                                           log={"access": str(log_path), "format": fmt}))
    try:
        assert send_raw(proxy, UTF8_REQUEST).startswith(b"HTTP/1.1 200 ")
        wait_for(lambda: log_path.exists() and log_path.read_text(encoding="utf-8"), DEADLINE,
                 what="the access log line")
        text = log_path.read_text(encoding="utf-8")
        if fmt == "json":
            line = json.loads(text)
            assert (line["user_agent"], line["referer"]) == ("caf\u00e9 \\xff", "/\u20ac")
        else:
            assert text.isascii()
            assert '"/\\xE2\\x82\\xAC" "caf\\xC3\\xA9 \\xFF"' in text
    finally:
        backend.kill()


# -- the admin listener ---------------------------------------------------------------------------------

def admin_exchange(proxy, data: bytes) -> bytes:
    port = int(proxy.admin_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
        sock.sendall(data)
        received = b""
        while received.count(b"HTTP/1.1 ") < 2 and b"Connection: close" not in received:
            piece = sock.recv(65536)
            if not piece:
                break
            received += piece
        return received


@pytest.mark.parametrize("first", [
    b"POST /status HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    b"GET /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
])
def test_an_admin_request_body_is_not_read_as_the_next_request(observed_proxy, first):
    """Bug: the admin listener never read request bodies, and kept the connection: a POST's body
    ("hello") was parsed as the start of the next request, so a pipelined GET /healthz got
    "501 Unsupported method ('helloGET')". A small body is now read and dropped."""
    backend = FlakyBackend("a")
    proxy = observed_proxy(config_document({"web": {"servers": [backend.address]}}))
    try:
        answer = admin_exchange(proxy, first + b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)
        assert statuses[1:] == [b"200"] and statuses[0] in (b"405", b"200"), answer
    finally:
        backend.kill()


def test_an_admin_request_with_a_chunked_body_closes_the_connection(observed_proxy):
    backend = FlakyBackend("a")
    proxy = observed_proxy(config_document({"web": {"servers": [backend.address]}}))
    try:
        answer = admin_exchange(proxy, b"PUT /metrics HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                                       b"5\r\nhello\r\n0\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 405 ") and b"Connection: close\r\n" in answer
        assert b"Allow: GET, HEAD\r\n" in answer
    finally:
        backend.kill()


@pytest.mark.parametrize("request_line, status", [
    (b"GET /x HTTP/1.1\r\nHost: nowhere.example", b"404"),  # no route (routes below are for host "a")
    (b"GET /../x HTTP/1.1\r\nHost: a", b"400"),              # a path escaping the root
])
def test_a_request_answered_before_routing_keeps_its_request_id(observed_proxy, tmp_path, request_line, status):
    """Bug: the request id was set only after a route matched, so a 404 (no route) or a 400 (bad
    path) was answered without X-Request-Id and logged with request_id null, even when the client
    had sent one: the id a client quotes in a bug report matched no log line."""
    backend = FlakyBackend("a")
    log_path = tmp_path / "access.json"
    document = config_document({"web": {"servers": [backend.address]}},
                               log={"access": str(log_path), "format": "json"})
    document["routes"] = [{"host": "a", "path": "/", "upstream": "web"}]
    proxy = observed_proxy(document)
    try:
        answer = send_raw(proxy, request_line + b"\r\nX-Request-Id: mine-1\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 " + status), answer[:80]
        assert b"\r\nX-Request-Id: mine-1\r\n" in answer
        wait_for(lambda: json_log_lines(log_path), DEADLINE, what="the access log line")
        assert json_log_lines(log_path)[0]["request_id"] == "mine-1"
    finally:
        backend.kill()


# -- tunnels ------------------------------------------------------------------------------------------

def echo_ten_times_after_101(peer) -> None:
    peer.read_request()
    peer.send(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    for _ in range(1000):  # bounded: the test sends a few messages then closes
        data = peer.sock.recv(65536)
        if not data:
            return
        peer.send(data * 10)


def test_a_tunnel_is_logged_when_it_closes_with_the_bytes_it_relayed(make_raw_backend, tmp_path, observed_proxy):
    """nginx logs an upgraded (WebSocket) connection once it ends, with every byte sent to the client
    ($bytes_sent) and its whole lifetime ($request_time). pyproxy logs it when the 101 is relayed: a
    tunnel that moved megabytes shows 77 bytes and 0.001 s."""
    backend = make_raw_backend(echo_ten_times_after_101)
    log_path = tmp_path / "access.json"
    proxy = observed_proxy(config_document({"ws": {"servers": [backend.address]}},
                                           log={"access": str(log_path), "format": "json"}))
    port = int(proxy.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
        sock.sendall(b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(4096)
        for _ in range(5):
            sock.sendall(b"m" * 1000)
            received = 0
            while received < 10_000:
                received += len(sock.recv(65536))
    wait_for(lambda: json_log_lines(log_path), DEADLINE, what="the tunnel's access log line")
    wait_for(lambda: proxy.app.open_tunnels == 0, DEADLINE, what="the tunnel to close")
    (line,) = json_log_lines(log_path)
    assert line["status"] == 101
    assert line["bytes"] >= len(head) + 50_000


def test_the_admin_debug_log_escapes_control_characters_of_the_request_line(observed_proxy, caplog):
    """Bug: the admin handler's log_message override wrote the client's request line as it came, so a
    path holding a terminal escape sequence reached the debug log raw (http.server's own
    log_message escapes control characters since gh-100001; the override bypassed it)."""
    backend = FlakyBackend("a")
    proxy = observed_proxy(config_document({"web": {"servers": [backend.address]}}))
    try:
        with caplog.at_level("DEBUG", logger="pyproxy.admin"):
            answer = admin_exchange(proxy, b"GET /\x1b[31mred HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 404 ")
            wait_for(lambda: any("red" in r.getMessage() for r in caplog.records), DEADLINE, what="the admin log line")
        (line,) = [r.getMessage() for r in caplog.records if "red" in r.getMessage()]
        assert "\x1b" not in line and "\\x1b[31mred" in line
    finally:
        backend.kill()


def healthz(admin_port: int) -> int:
    try:
        return requests.get(f"http://127.0.0.1:{admin_port}/healthz", timeout=DEADLINE).status_code
    except requests.RequestException:
        return 0


def test_healthz_with_workers_is_503_while_no_worker_serves(tmp_path):
    """Bug: with workers = 2, the supervisor's /healthz said 200 whenever it was not draining, also
    while every worker was dead and being restarted (or backing off after dying young): a load
    balancer kept sending clients to a proxy with nobody to accept them."""
    with named_backends("a") as (backend,):
        port, admin_port = free_port(), free_port()
        config = proxy_config(port, backend.address, workers=2, admin_port=admin_port)
        with running_proxy(tmp_path, config) as run:
            wait_for(lambda: len(admin_status(admin_port)["workers"]) == 2, DEADLINE, what="both workers")
            assert healthz(admin_port) == 200
            saw_503 = False
            for _ in range(4):  # killed young again and again, the workers come back after a growing backoff
                wait_for(lambda: len(children(run.proc.pid)) == 2, 10, what="two workers")
                for pid in children(run.proc.pid):
                    os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 0.4
                while not saw_503 and time.monotonic() < deadline:
                    saw_503 = healthz(admin_port) == 503
                if saw_503:
                    break
            assert saw_503, run.log()
            wait_for(lambda: healthz(admin_port) == 200, 20, what="/healthz 200 once workers are back")
            assert requests.get(run.url + "/", timeout=DEADLINE).status_code == 200


def pipe_pending(fd: int) -> int:
    count = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, count)
    return count[0]


def test_access_log_lines_of_writers_sharing_a_pipe_are_never_cut():
    """Bug: with workers, every worker writes its access log to the same stdout; under systemd or
    docker that is a pipe, where only writes of at most PIPE_BUF (4 KiB) bytes are atomic. A worker
    wrote its whole batch (up to 256 lines) in one write, which the kernel splits when the pipe is
    full, so another worker's lines landed inside it: about 1 JSON line in 10 was cut in two under a
    slow reader. Each write is now whole lines of at most PIPE_BUF bytes. (Two writers in one process
    share the pipe as two worker processes do: the atomicity is the kernel's either way.)"""
    read_end, write_end = os.pipe()
    logs = [AccessLog(f"/dev/fd/{write_end}", "json") for _ in range(2)]
    received = bytearray()

    def read_all() -> None:
        while chunk := os.read(read_end, 65536):
            received.extend(chunk)

    try:
        for log in logs:
            log.start()
        for index in range(600):
            for writer, log in enumerate(logs):
                log.observe(LogRecord(user_agent=f"{writer}-" + "u" * 3000, target=f"/{index}"))
        wait_for(lambda: pipe_pending(read_end) >= 40_000, DEADLINE, what="the pipe to fill")  # writers now wait
        reader = threading.Thread(target=read_all, daemon=True)
        reader.start()
        for log in logs:
            log.stop()  # every queued line written
    finally:
        os.close(write_end)
    reader.join(DEADLINE)
    os.close(read_end)
    lines = received.decode("utf-8").splitlines()
    assert len(lines) == 1200
    assert all(json.loads(line)["user_agent"].endswith("u" * 3000) for line in lines)


def test_an_admin_client_resetting_mid_answer_is_a_debug_line_not_a_traceback(observed_proxy, caplog, capfd):
    """Bug: a client leaving mid-answer (a dashboard tab closed, a scrape timing out) made
    socketserver print "Exception occurred during processing of request" and a traceback straight to
    stderr, past the logging config and level. Expected socket errors now log at debug (STYLE 11)."""
    backend = FlakyBackend("a")
    proxy = observed_proxy(config_document({"web": {"servers": [backend.address]}}))
    port = int(proxy.admin_url.rsplit(":", 1)[1])
    try:
        with caplog.at_level("DEBUG", logger="pyproxy.admin"):
            for _ in range(50):  # bounded: a reset usually lands while the answers are written
                sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
                sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n" * 20)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()  # a reset, with answers still to come
                if any("went away" in r.getMessage() for r in caplog.records):
                    break
            wait_for(lambda: any("went away" in r.getMessage() for r in caplog.records), DEADLINE,
                     what="a debug line for the client that left")
        assert "Traceback" not in capfd.readouterr().err
    finally:
        backend.kill()


def test_a_tunnels_lifetime_stays_out_of_the_latency_histogram(observed_proxy):
    """Tunnels are observed when they close (above); minutes of WebSocket are no response time."""
    from proxy.serve.handler import RequestRecord
    proxy = observed_proxy(config_document({"ws": {"servers": ["127.0.0.1:9"]}}))
    metrics = next(o.__self__ for o in proxy.app.observers if hasattr(getattr(o, "__self__", None), "recent"))
    record = RequestRecord(0.0, "127.0.0.1", None)
    record.status, record.upstream, record.duration = 101, "ws", 600.0
    metrics.observe(record)
    durations = metrics.snapshot()["durations"]["ws"]
    assert durations["count"] == 1 and durations["sum"] == 0.0


@pytest.mark.parametrize("sent, status, method, path", [
    (b"GET /big-head HTTP/1.1\r\nHost: a\r\nX-Big: " + b"x" * 20000 + b"\r\n\r\n", 431, "GET", "/big-head"),
    (b"GET /bad-field HTTP/1.1\r\nHost: a\r\nBad Field: 1\r\n\r\n", 400, "GET", "/bad-field"),
    (b"POST /too-big HTTP/1.1\r\nHost: a\r\nContent-Length: 999999999999\r\n\r\n", 413, "POST", "/too-big"),
    (b"GET /v HTTP/2.0\r\nHost: a\r\n\r\n", 505, "GET", "/v"),
], ids=["431", "400", "413", "505"])
def test_a_refused_request_is_logged_with_its_request_line(observed_proxy, tmp_path, sent, status, method, path):
    """Bug: requests the proxy refused while reading the head were logged as "- - HTTP/1.1", so
    nobody could tell which URL drew the 431/413/400; nginx logs their request line."""
    proxy, _, log_path = logged_proxy(observed_proxy, tmp_path)
    assert send_raw(proxy, sent).startswith(f"HTTP/1.1 {status} ".encode())
    wait_for(lambda: json_log_lines(log_path), DEADLINE, what="the access log line")
    (line,) = json_log_lines(log_path)
    assert (line["status"], line["method"], line["path"]) == (status, method, path)
