"""The access log's size fields against a real proxy and a real log file: `combined` logs the
response body's bytes as nginx's $body_bytes_sent (Apache %b) does, without the head; `json` keeps the
whole count in "bytes" and adds "body_bytes"."""

from __future__ import annotations

import json
import re
import socket

import pytest

from tests.support.backends import upgrade_then_echo
from tests.support.client import RawClient, read_small_answer
from tests.support.proxy import DEADLINE, config_document
from tests.support.timing import wait_for

COMBINED = re.compile(r'^\S+ - - \[[^\]]+\] "([^"]*)" (\d{3}) (\d+) ')
BODY = b"hello\n"  # 6 bytes


def answer_with_body(peer) -> None:
    for _ in range(10):  # bounded: a test sends a few requests per connection
        head, _ = peer.read_request()
        if not head:
            return
        extra = b"X-Pad: " + b"p" * 100 + b"\r\n"  # a head much larger than the body
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n" + extra + b"\r\n" + BODY)


def continue_then_answer(peer) -> None:
    head = peer.read_head()
    peer.send(b"HTTP/1.1 100 Continue\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
    while len(peer.buffer) < length:
        peer.buffer += peer.sock.recv(65536)
    peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n" + BODY)


def logging_proxy(observed_proxy, tmp_path, backend, fmt: str, **extra):
    path = tmp_path / f"access.{fmt}"
    document = config_document({"web": {"servers": [backend.address]}},
                               log={"access": str(path), "format": fmt, "level": "warning"}, **extra)
    return observed_proxy(document), path


def lines_of(path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def connect(proxy) -> socket.socket:
    return socket.create_connection(("127.0.0.1", int(proxy.url.rsplit(":", 1)[1])), timeout=DEADLINE)


def exchange(proxy, request: bytes, method: str = "GET"):
    with connect(proxy) as sock:
        client = RawClient(sock)
        client.send(request)
        return client.read_response(method)


def logged(path, count: int = 1) -> list[str]:
    return wait_for(lambda: len(lines_of(path)) >= count and lines_of(path), DEADLINE, what="access log lines")


def test_combined_logs_the_body_bytes_of_a_proxied_response(make_raw_backend, observed_proxy, tmp_path):
    """Bug: a 6-byte body was logged as 165, the head counted in; nginx's combined format logs 6."""
    proxy, path = logging_proxy(observed_proxy, tmp_path, make_raw_backend(answer_with_body), "combined")
    response = exchange(proxy, b"GET /six HTTP/1.1\r\nHost: a\r\n\r\n")
    assert response.body == BODY
    (line,) = logged(path)
    match = COMBINED.match(line)
    assert match, line
    assert match.group(2, 3) == ("200", "6")


def test_json_keeps_every_byte_and_adds_the_body_bytes(make_raw_backend, observed_proxy, tmp_path):
    proxy, path = logging_proxy(observed_proxy, tmp_path, make_raw_backend(answer_with_body), "json")
    response = exchange(proxy, b"GET /six HTTP/1.1\r\nHost: a\r\n\r\n")
    (line,) = logged(path)
    entry = json.loads(line)
    assert entry["bytes"] == len(response.head) + len(BODY)
    assert entry["body_bytes"] == len(BODY)


def test_head_request_logs_no_body_bytes(make_raw_backend, observed_proxy, tmp_path):
    proxy, path = logging_proxy(observed_proxy, tmp_path, make_raw_backend(answer_with_body), "json")
    response = exchange(proxy, b"HEAD /six HTTP/1.1\r\nHost: a\r\n\r\n", method="HEAD")
    (line,) = logged(path)
    entry = json.loads(line)
    assert entry["bytes"] == len(response.head) and entry["body_bytes"] == 0


def answer_the_body_without_a_100(peer) -> None:
    head = peer.read_head()
    length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
    while len(peer.buffer) < length:
        peer.buffer += peer.sock.recv(65536)
    peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n" + BODY)


# The server's own 100, relayed; or none, and the proxy sends its own after waiting a second.
@pytest.mark.parametrize("script", [continue_then_answer, answer_the_body_without_a_100])
def test_an_interim_100_is_not_body(make_raw_backend, observed_proxy, tmp_path, script):
    proxy, path = logging_proxy(observed_proxy, tmp_path, make_raw_backend(script), "json")
    with connect(proxy) as sock:
        client = RawClient(sock)
        client.send(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
        assert client.read_head() == b"HTTP/1.1 100 Continue\r\n\r\n"
        client.send(b"abc")
        response = client.read_response()
    assert response.status == 200 and response.body == BODY
    (line,) = logged(path)
    entry = json.loads(line)
    assert entry["body_bytes"] == len(BODY)
    assert entry["bytes"] == len(b"HTTP/1.1 100 Continue\r\n\r\n") + len(response.head) + len(BODY)


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /missing HTTP/1.1\r\nHost: nowhere.test\r\n\r\n", 404),                     # the proxy's error page
    (b"GET /a HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999\r\n\r\n", 413),         # refused with its head
    (b"GET /a HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n", 400),                # unparsable
])
def test_answers_the_proxy_makes_log_their_body_bytes(make_raw_backend, observed_proxy, tmp_path,
                                                      request_bytes, status):
    backend = make_raw_backend(answer_with_body)
    path = tmp_path / "access.json"
    document = config_document({"web": {"servers": [backend.address]}},
                               server={"max_body_bytes": 1000},
                               log={"access": str(path), "format": "json", "level": "warning"},
                               routes=[{"host": "a", "path": "/", "upstream": "web"}])
    proxy = observed_proxy(document)
    with connect(proxy) as sock:
        sock.sendall(request_bytes)
        answer = read_small_answer(sock) if status != 404 else RawClient(sock).read_response()
    if status == 404:
        head, body = answer.head, answer.body
    else:
        head, body = answer.split(b"\r\n\r\n", 1)
        head += b"\r\n\r\n"
    assert head.startswith(b"HTTP/1.1 %d " % status), head
    (line,) = logged(path)
    entry = json.loads(line)
    assert entry["status"] == status
    assert entry["bytes"] == len(head) + len(body) and entry["body_bytes"] == len(body) > 0


def test_a_redirect_logs_its_body_bytes(make_raw_backend, observed_proxy, tmp_path):
    backend = make_raw_backend(answer_with_body)
    path = tmp_path / "access.json"
    document = config_document({"web": {"servers": [backend.address]}},
                               log={"access": str(path), "format": "json", "level": "warning"},
                               routes=[{"path": "/old", "redirect": {"to": "/new"}},
                                       {"path": "/", "upstream": "web"}])
    proxy = observed_proxy(document)
    response = exchange(proxy, b"GET /old HTTP/1.1\r\nHost: a\r\n\r\n")
    assert 300 <= response.status < 400
    (line,) = logged(path)
    entry = json.loads(line)
    assert entry["body_bytes"] == len(response.body) and entry["bytes"] == len(response.head) + len(response.body)


def test_a_408_logs_its_body_bytes(make_raw_backend, observed_proxy, tmp_path):
    proxy, path = logging_proxy(observed_proxy, tmp_path, make_raw_backend(answer_with_body), "json",
                                server={"header_timeout": "300ms"})
    with connect(proxy) as sock:
        sock.sendall(b"GET /half HTTP/1.1\r\nHost: a\r\n")
        answer = read_small_answer(sock)
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 408 ")
    (line,) = logged(path)
    entry = json.loads(line)
    assert entry["bytes"] == len(answer) and entry["body_bytes"] == len(body) > 0


def test_a_tunnel_logs_what_it_relayed_after_the_101_as_body(make_raw_backend, observed_proxy, tmp_path):
    proxy, path = logging_proxy(observed_proxy, tmp_path, make_raw_backend(upgrade_then_echo), "json")
    with connect(proxy) as sock:
        client = RawClient(sock)
        client.send(b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        head = client.read_head()
        client.send(b"m" * 1000)
        assert client.read_exact(1000) == b"m" * 1000
    (line,) = logged(path)
    entry = json.loads(line)
    assert entry["status"] == 101
    assert entry["bytes"] == len(head) + 1000 and entry["body_bytes"] == 1000
