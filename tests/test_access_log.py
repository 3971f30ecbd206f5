"""Access log: the two line formats, the non-blocking writer, and lines from a running proxy."""

from __future__ import annotations

import array
import fcntl
import io
import json
import os
import re
import socket
import sys
import termios
import threading
import tracemalloc

import pytest
import requests

from proxy.config.schema import LogConfig
from proxy.http.http1 import RequestParser
from proxy.observe.access_log import COMPACT_AFTER, AccessLog, format_combined, format_json, make_access_log
from proxy.serve.handler import RequestRecord
from tests.support.backends import FlakyBackend
from tests.support.client import read_small_answer
from tests.support.proxy import DEADLINE, config_document, scrape
from tests.support.timing import wait_for
from tests.support.records import WHEN, Record

COMBINED = re.compile(r'^(\S+) - - \[([^\]]+)\] "([^"]*)" (\d{3}) (\d+) "([^"]*)" "([^"]*)" (\S+) (\S+) (\d+\.\d{3}) (\S+)$')


def test_combined_line():
    line = format_combined(Record(), WHEN)
    assert line == ('10.0.0.7 - - [10/Oct/2000:12:55:36 +0000] "GET /a?b=1 HTTP/1.1" 200 512 "-" "curl/8" '
                    'api 127.0.0.1:9001 0.012 rid-1')


def test_combined_escapes_quotes_and_control_characters_and_dashes_missing_fields():
    line = format_combined(Record(user_agent='evil" "x\x1b', upstream=None, server=None, request_id=None), WHEN)
    match = COMBINED.match(line)
    assert match, line
    assert match.group(7) == "evil\\x22 \\x22x\\x1B"
    assert match.group(8, 9, 11) == ("-", "-", "-")


def test_json_line_has_the_contract_fields():
    entry = json.loads(format_json(Record(status=502), WHEN))
    assert entry["time"] == "2000-10-10T12:55:36.000Z"
    assert {k: entry[k] for k in ("client", "method", "path", "status", "bytes", "upstream", "server",
                                  "request_id")} == {
        "client": "10.0.0.7", "method": "GET", "path": "/a?b=1", "status": 502, "bytes": 512,
        "upstream": "api", "server": "127.0.0.1:9001", "request_id": "rid-1"}
    assert entry["duration_ms"] == 12.3


def test_a_full_queue_drops_and_counts_instead_of_blocking(tmp_path):
    log = AccessLog(str(tmp_path / "access.log"), max_queue=2)  # not started: nothing drains the queue
    for _ in range(5):
        log.observe(Record())
    assert log.dropped == 3
    log.start()
    log.stop()
    assert log.written == 2 and len((tmp_path / "access.log").read_text().splitlines()) == 2


def _record_with_large_head(number: int, header_bytes: int = 8192) -> RequestRecord:
    """A finished request's record, as the handler makes it, whose head carries ~8 KiB of headers."""
    fields = "".join(f"X-Pad-{i}: {number:08d}{'v' * 80}\r\n" for i in range(header_bytes // 100))
    parser = RequestParser()
    parser.feed(f"GET /r{number} HTTP/1.1\r\nHost: h\r\nUser-Agent: ua/{number}\r\n"
                f"Referer: /from/{number}\r\n{fields}\r\n".encode())
    record = RequestRecord(0.0, "10.0.0.7", parser.next_event())
    record.status, record.bytes_sent, record.upstream, record.server = 200, 512, "api", "127.0.0.1:9001"
    return record


def test_a_stalled_log_holds_only_what_its_lines_need_not_each_request_head():
    """Bug: each queued record kept the request's parsed head (for User-Agent and Referer): with
    8 KiB of headers a request, a log whose destination stalled (a FIFO nobody reads, a full disk)
    held ~37 KiB per queued line, 370 MiB for its 10,000. Past a batch queued, a record is now copied
    down to the fields a line reads."""
    lines = 2000
    log = AccessLog("unused.log", max_queue=COMPACT_AFTER + lines)  # never started: as if it stalled
    for number in range(COMPACT_AFTER):  # a batch queued whole: a writer merely busy
        log.observe(_record_with_large_head(number))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for number in range(lines):
            log.observe(_record_with_large_head(number))
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(log._pending) == COMPACT_AFTER + lines
    assert held / lines < 2048, f"{held / lines:.0f} bytes held per queued line"


@pytest.mark.parametrize("formatter", [format_combined, format_json])
def test_a_line_from_copied_fields_is_the_line_of_the_record(tmp_path, formatter):
    records = [_record_with_large_head(number, header_bytes=300) for number in range(COMPACT_AFTER + 20)]
    log = AccessLog(str(tmp_path / "access.log"), fmt="json" if formatter is format_json else "combined",
                    wall_clock=lambda: WHEN)
    for record in records:  # queued before the writer starts: the later ones are copied
        log.observe(record)
    log.start()
    log.stop()
    written = (tmp_path / "access.log").read_text().splitlines()
    assert written == [formatter(record, WHEN) for record in records]
    assert '"ua/275"' in written[-1] and '/from/275' in written[-1]


def test_access_off_installs_nothing(backends, observed_proxy):
    assert make_access_log(LogConfig(access="off")) is None
    (a,) = backends("a")
    proxy = observed_proxy(config_document({"web": {"servers": [a.address]}}))
    observability = proxy.process.observability
    assert observability.access_log is None
    assert proxy.app.observers == [observability.metrics.observe]


def _proxy_logging_to(tmp_path, backends, observed_proxy, fmt: str):
    (a,) = backends("a")
    path = tmp_path / "access.log"
    document = config_document({"web": {"servers": [a.address]}},
                               log={"access": str(path), "format": fmt, "level": "warning"})
    return observed_proxy(document), a, path


def _lines(path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_proxied_request_logged_in_combined_format(tmp_path, backends, observed_proxy):
    proxy, a, path = _proxy_logging_to(tmp_path, backends, observed_proxy, "combined")
    response = requests.get(proxy.url + "/hello?x=1", headers={"User-Agent": "tester", "Referer": "http://r/"},
                            timeout=DEADLINE)
    assert response.status_code == 200
    request_id = response.headers["X-Request-Id"]
    lines = wait_for(lambda: _lines(path), what="an access log line")
    match = COMBINED.match(lines[0])
    assert match, lines[0]
    assert match.group(1) == "127.0.0.1" and match.group(3) == "GET /hello?x=1 HTTP/1.1"
    assert match.group(4, 6, 7, 8, 9) == ("200", "http://r/", "tester", "web", a.address)
    assert int(match.group(5)) == len(response.content)  # the body only, as nginx's $body_bytes_sent
    assert match.group(11) == request_id
    assert requests.get(proxy.admin_url + "/status", timeout=DEADLINE).status_code == 200
    requests.get(proxy.url + "/second", timeout=DEADLINE)
    lines = wait_for(lambda: len(_lines(path)) >= 2 and _lines(path), what="a second line")
    assert len(lines) == 2 and "/second" in lines[1]  # the admin request was never logged


def test_proxied_request_logged_as_json_with_the_incoming_request_id(tmp_path, backends, observed_proxy):
    proxy, a, path = _proxy_logging_to(tmp_path, backends, observed_proxy, "json")
    response = requests.post(proxy.url + "/form", data=b"secret-body", headers={"X-Request-Id": "abc-123"},
                             timeout=DEADLINE)
    assert response.status_code == 200 and response.headers["X-Request-Id"] == "abc-123"
    lines = wait_for(lambda: _lines(path), what="an access log line")
    entry = json.loads(lines[0])
    assert (entry["method"], entry["path"], entry["status"], entry["upstream"], entry["server"],
            entry["request_id"]) == ("POST", "/form", 200, "web", a.address, "abc-123")
    assert entry["bytes"] > 0 and entry["duration_ms"] >= 0 and entry["client"] == "127.0.0.1"
    assert "secret-body" not in lines[0]  # bodies never reach the log


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _record(status: int, target: str = "/api/users", duration: float = 0.0123):
    from proxy.serve.handler import RequestRecord
    record = RequestRecord(0.0, "127.0.0.1", None)
    record.method, record.target, record.status, record.duration = "GET", target, status, duration
    record.upstream, record.server = "api", "127.0.0.1:9001"
    return record


def test_terminal_lines_are_coloured_by_status_class_and_aligned():
    from proxy.observe.access_log import PATH_COLUMN, format_terminal
    lines = {status: format_terminal(_record(status), 0.0) for status in (200, 304, 404, 502)}
    assert "\033[32m200\033[0m" in lines[200]
    assert "\033[36m304\033[0m" in lines[304]
    assert "\033[33m404\033[0m" in lines[404]
    assert "\033[31m502\033[0m" in lines[502]
    assert "api → 127.0.0.1:9001" in lines[200] and lines[200].endswith("12.3 ms")
    plain = format_terminal(_record(200), 0.0, colour=False)
    long = format_terminal(_record(200, target="/x" * 100), 0.0, colour=False)
    assert "\033[" not in plain
    assert len(plain) == len(long)  # a long path is cut, so the columns stay aligned
    assert ("/x" * 100)[: PATH_COLUMN - 1] + "…" in long


def test_access_log_uses_the_terminal_format_only_on_a_terminal(monkeypatch):
    from proxy.observe.access_log import AccessLog
    monkeypatch.delenv("NO_COLOR", raising=False)
    for stream, expect_pretty in ((_Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stdout", stream)
        access = AccessLog("stdout", "combined")
        access.start()
        access.observe(_record(503))
        access.stop()
        line = stream.getvalue()
        assert ("\033[31m503\033[0m" in line) is expect_pretty
        assert ('"GET /api/users HTTP/1.1" 503' in line) is not expect_pretty


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
                log.observe(Record(user_agent=f"{writer}-" + "u" * 3000, target=f"/{index}"))
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
