"""Adversarial audit of observability: the admin listener, /metrics, /status, the access log, request ids.

Each test pins a bug the audit found (the docstring says what it was) or an important case no other
file covered. Real backends and clients on 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import json
import socket

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.backends import FlakyBackend, read_small_answer
from tests.conftest import DEADLINE, config_document
from tests.core_helpers import wait_for

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
