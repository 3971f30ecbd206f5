"""Access log: the two line formats, the non-blocking writer, and lines from a running proxy."""

from __future__ import annotations

import io
import json
import re
import sys

import requests

from proxy.observe.access_log import AccessLog, format_combined, format_json, make_access_log
from proxy.config.schema import LogConfig
from tests.support.proxy import DEADLINE, config_document
from tests.support.timing import wait_for

WHEN = 971182536.0  # 10/Oct/2000:12:55:36 UTC
COMBINED = re.compile(r'^(\S+) - - \[([^\]]+)\] "([^"]*)" (\d{3}) (\d+) "([^"]*)" "([^"]*)" (\S+) (\S+) (\d+\.\d{3}) (\S+)$')


class Record:
    def __init__(self, **fields):
        defaults = dict(started=0.0, duration=0.0123, client_ip="10.0.0.7", method="GET", target="/a?b=1",
                        version="HTTP/1.1", status=200, bytes_sent=512, upstream="api", server="127.0.0.1:9001",
                        request_id="rid-1", user_agent="curl/8", referer=None, host="example.com")
        defaults.update(fields)
        self.__dict__.update(defaults)


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
    assert int(match.group(5)) > len(response.content)  # bytes sent: head and body
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
