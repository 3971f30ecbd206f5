"""The engine end to end: real backends, an in-process proxy, real clients (requests and raw sockets)."""

from __future__ import annotations

import contextlib
import os
import socket

import pytest
import requests

from tests.backends import RawClient, closed_port
from tests.conftest import CLIENT_TIMEOUT

pytestmark = pytest.mark.timeout(30)


@contextlib.contextmanager
def raw_client(proxy):
    sock = proxy.connect()
    try:
        yield RawClient(sock)
    finally:
        sock.close()


def get(host: str = "app.test", path: str = "/", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


@pytest.fixture
def backend(make_backend):
    return make_backend()


@pytest.fixture
def proxy(make_proxy, backend):
    return make_proxy({"web": [backend.address]})


# -- round trips -----------------------------------------------------------------------------
def test_get_round_trip(proxy, backend):
    response = requests.get(proxy.url + "/hello?x=1", timeout=CLIENT_TIMEOUT)
    assert response.status_code == 200
    assert response.headers["X-Echo-Path"] == "/hello?x=1"
    assert backend.last.method == "GET"
    assert backend.last.path == "/hello?x=1"


def test_post_round_trip_exact_body(proxy, backend):
    payload = os.urandom(100_000)
    response = requests.post(proxy.url + "/upload", data=payload, timeout=CLIENT_TIMEOUT)
    assert response.status_code == 200
    assert response.content == payload
    assert backend.last.body == payload
    assert backend.last.header("Content-Length") == str(len(payload))


def test_chunked_upload_arrives_intact(proxy, backend):
    pieces = [os.urandom(n) for n in (1, 500, 70_000, 3, 200_000)]

    def generate():
        yield from pieces

    response = requests.post(proxy.url + "/chunks", data=generate(), timeout=CLIENT_TIMEOUT)
    assert response.status_code == 200
    assert response.content == b"".join(pieces)
    assert backend.last.chunked  # forwarded chunked, not buffered into a Content-Length
    assert backend.last.body == b"".join(pieces)
