"""Large bodies stream through the proxy with bounded memory.

The proxy runs as a subprocess (``python -m proxy.serve.cli -c FILE``, tests/support/processes.py) so its
resident memory can be read from /proc/PID/status on its own: VmRSS before, VmHWM (the peak) after
200 MiB in either direction.
"""

from __future__ import annotations

import hashlib
import socket

import pytest
import requests
import tomli_w

from tests.support.backends import (consume_and_digest, pattern_bytes, pattern_sha256, stream_pattern,
                                    stream_pattern_chunked)
from tests.support.client import RawClient
from tests.support.ports import free_port
from tests.support.processes import proc_status, running_proxy
from tests.support.proxy import CLIENT_TIMEOUT, proxy_config_dict

pytestmark = pytest.mark.timeout(60)

BIG = 200 * 1024 * 1024
MAX_GROWTH = 50 * 1024 * 1024  # the aim is "a few MiB"; this leaves room for thread stacks


@pytest.fixture
def subprocess_proxy(tmp_path, make_backend):
    """(process, url, port) of a proxy subprocess in front of a backend with huge bodies, warmed up."""
    backend = make_backend()
    backend.route("/download", stream_pattern(BIG)).route("/download-chunked", stream_pattern_chunked(BIG // 2)).route("/upload", consume_and_digest)
    document = proxy_config_dict({"web": [backend.address]}, server={"max_body_bytes": "1GiB"})
    document["server"]["listen"] = f"127.0.0.1:{free_port()}"
    with running_proxy(tmp_path, tomli_w.dumps(document)) as run:
        # warm up: first request imports and allocates what every later one reuses
        assert requests.get(f"{run.url}/warm", timeout=CLIENT_TIMEOUT).status_code == 200
        yield run.proc, run.url, run.port


def test_large_streamed_download_bounded_memory(subprocess_proxy):
    process, url, _ = subprocess_proxy
    before = proc_status(process.pid, "VmRSS")
    digest = hashlib.sha256()
    total = 0
    with requests.get(url + "/download", stream=True, timeout=CLIENT_TIMEOUT) as response:
        assert response.status_code == 200
        assert response.headers["Content-Length"] == str(BIG)
        for piece in response.iter_content(1024 * 1024):
            digest.update(piece)
            total += len(piece)
    assert total == BIG
    assert digest.hexdigest() == pattern_sha256(BIG)
    growth = (proc_status(process.pid, "VmHWM") - before) * 1024
    assert growth < MAX_GROWTH, f"proxy memory grew by {growth / 2**20:.1f} MiB"


def test_large_content_length_upload_bounded_memory(subprocess_proxy):
    process, _, port = subprocess_proxy
    before = proc_status(process.pid, "VmRSS")
    sock = socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT)
    try:
        client = RawClient(sock)
        client.send(b"POST /upload HTTP/1.1\r\nHost: big.test\r\nContent-Length: %d\r\n\r\n" % BIG)
        piece = 1024 * 1024
        for offset in range(0, BIG, piece):
            client.send(pattern_bytes(offset, piece))
        response = client.read_response()
    finally:
        sock.close()
    assert response.status == 200
    assert response.body.decode() == f"{BIG} {pattern_sha256(BIG)}"
    growth = (proc_status(process.pid, "VmHWM") - before) * 1024
    assert growth < MAX_GROWTH, f"proxy memory grew by {growth / 2**20:.1f} MiB"


def test_large_chunked_upload_bounded_memory(subprocess_proxy):
    process, url, _ = subprocess_proxy
    size = BIG // 2  # chunked bodies go through the parser (no splice): half the size keeps it quick
    before = proc_status(process.pid, "VmRSS")
    piece = 1024 * 1024

    def generate():
        for offset in range(0, size, piece):
            yield pattern_bytes(offset, piece)

    response = requests.post(url + "/upload", data=generate(), timeout=CLIENT_TIMEOUT)
    assert response.status_code == 200
    assert response.text == f"{size} {pattern_sha256(size)}"
    growth = (proc_status(process.pid, "VmHWM") - before) * 1024
    assert growth < MAX_GROWTH, f"proxy memory grew by {growth / 2**20:.1f} MiB"


def test_large_chunked_download_bounded_memory(subprocess_proxy):
    """Chunked bodies are decoded and re-chunked in Python (no splice): still bounded."""
    process, url, _ = subprocess_proxy
    size = BIG // 2
    before = proc_status(process.pid, "VmRSS")
    digest = hashlib.sha256()
    total = 0
    with requests.get(url + "/download-chunked", stream=True, timeout=CLIENT_TIMEOUT) as response:
        assert response.status_code == 200
        assert response.headers["Transfer-Encoding"] == "chunked"
        for piece in response.iter_content(1024 * 1024):
            digest.update(piece)
            total += len(piece)
    assert total == size
    assert digest.hexdigest() == pattern_sha256(size)
    growth = (proc_status(process.pid, "VmHWM") - before) * 1024
    assert growth < MAX_GROWTH, f"proxy memory grew by {growth / 2**20:.1f} MiB"
