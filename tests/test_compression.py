"""Response compression on routes with ``compress``: real clients (requests, curl --compressed) through
the proxy to a real backend, every coding decoded and compared with the backend's bytes."""

from __future__ import annotations

import base64
import gzip
import json
import os
import shutil
import socket
import subprocess
import threading

import brotli
import pytest
import requests
import zstandard

from proxy.config.schema import ConfigError, parse_config
from proxy.http.compression import choose_encoding
from tests.support.proxy import CLIENT_TIMEOUT, proxy_config_dict
from tests.support.timing import wait_for

pytestmark = pytest.mark.timeout(60)

JSON_BODY = json.dumps([{"id": n, "name": f"item {n}", "tags": ["a", "b"]} for n in range(2000)]).encode()
HTML_BODY = b"<html><body>" + b"<p>hello compression</p>" * 400 + b"</body></html>"


def _decode(coding: str | None, data: bytes) -> bytes:
    if coding is None:
        return data
    if coding == "gzip":
        return gzip.decompress(data)
    if coding == "br":
        return brotli.decompress(data)
    if coding == "zstd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    raise AssertionError(f"unexpected coding {coding}")


def _fixed(body: bytes, content_type: str = "application/json", headers: tuple = (), status: int = 200):
    def handler(h, record):
        h.reply(status, body, (("Content-Type", content_type),) + headers)
    return handler


def _chunked(body: bytes, content_type: str = "text/html"):
    def handler(h, record):
        h.send_response(200)
        h.send_header("Content-Type", content_type)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        for start in range(0, len(body), 3000):
            piece = body[start:start + 3000]
            h.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        h.wfile.write(b"0\r\n\r\n")
    return handler


@pytest.fixture
def compressing(make_backend, make_proxy):
    """A backend serving JSON_BODY (length), HTML_BODY (chunked) and small/skip cases, behind a proxy
    whose route compresses with every coding."""
    backend = make_backend()
    backend.route("/data.json", _fixed(JSON_BODY))
    backend.route("/page.html", _chunked(HTML_BODY))
    backend.route("/small.json", _fixed(b'{"ok": true}'))
    backend.route("/image.png", _fixed(b"\x89PNG" + bytes(5000), "image/png"))
    backend.route("/already.json", _fixed(gzip.compress(JSON_BODY), headers=(("Content-Encoding", "gzip"),)))
    backend.route("/no-transform.json", _fixed(JSON_BODY, headers=(("Cache-Control", "public, no-transform"),)))
    backend.route("/partial.json", _fixed(JSON_BODY[:2000], status=206,
                                          headers=(("Content-Range", f"bytes 0-1999/{len(JSON_BODY)}"),)))
    backend.route("/etag.json", _fixed(JSON_BODY, headers=(("ETag", '"v1"'), ("Vary", "Origin"))))
    backend.route("/weak.json", _fixed(JSON_BODY, headers=(("ETag", 'W/"v2"'), ("Accept-Ranges", "bytes"))))
    backend.route("/events", _fixed(b"data: x\n\n" * 500, "text/event-stream"))
    proxy = make_proxy({"app": [backend.address]},
                       routes=[{"path": "/", "upstream": "app", "compress": True}])
    return proxy


def _raw_get(proxy, path: str, accept_encoding: str | None, method: str = "GET") -> requests.Response:
    headers = {"Accept-Encoding": accept_encoding} if accept_encoding is not None else {}
    response = requests.request(method, proxy.url + path, headers=headers, stream=True, timeout=CLIENT_TIMEOUT)
    response.raw.decode_content = False
    response.raw_bytes = response.raw.read()
    response.close()
    return response


@pytest.mark.parametrize("coding", ["gzip", "br", "zstd"])
@pytest.mark.parametrize("path,original", [("/data.json", JSON_BODY), ("/page.html", HTML_BODY)])
def test_each_coding_decodes_to_the_backend_bytes(compressing, coding, path, original):
    response = _raw_get(compressing, path, coding)
    assert response.status_code == 200
    assert response.headers["Content-Encoding"] == coding
    assert "Content-Length" not in response.headers
    assert response.headers["Transfer-Encoding"] == "chunked"
    assert "accept-encoding" in response.headers["Vary"].lower()
    assert len(response.raw_bytes) < len(original) / 3
    assert _decode(coding, response.raw_bytes) == original


def test_requests_decodes_transparently_and_reuses_the_connection(compressing):
    with requests.Session() as session:
        for _ in range(3):  # the chunked re-framing ends cleanly: the kept connection carries the next
            response = session.get(compressing.url + "/data.json", headers={"Accept-Encoding": "gzip, br"},
                                   timeout=CLIENT_TIMEOUT)
            assert response.headers["Content-Encoding"] == "br"
            assert response.content == JSON_BODY


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_compressed(compressing):
    done = subprocess.run(["curl", "-sS", "--compressed", "-D", "-", "-o", "-", "--max-time", "20",
                           compressing.url + "/data.json"], capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    head, _, body = done.stdout.partition(b"\r\n\r\n")
    assert b"content-encoding:" in head.lower()
    assert body == JSON_BODY


def test_http10_client_gets_a_close_delimited_compressed_body(compressing):
    head, body = _socket_exchange(compressing, b"GET /data.json HTTP/1.0\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n")
    assert b"Content-Encoding: gzip" in head
    assert b"Transfer-Encoding" not in head and b"Content-Length" not in head
    assert gzip.decompress(body) == JSON_BODY


@pytest.mark.parametrize("accept,expected", [
    ("gzip", "gzip"),
    ("gzip, deflate, br, zstd", "zstd"),          # equal q: the server's order (zstd, br, gzip)
    ("gzip;q=1, br;q=0.5", "gzip"),               # the client's weights first
    ("zstd;q=0, br;q=0.1, gzip;q=0.2", "gzip"),
    ("*", "zstd"),
    ("*;q=0.5, gzip", "gzip"),
    ("br;q=0, *", "zstd"),
    ("*;q=0", None),
    ("identity;q=0, gzip", "gzip"),
    ("identity", None),
    ("deflate, compress", None),
    ("", None),
    ("GZIP;Q=0.5", "gzip"),                        # case-insensitive
    ("x-gzip", "gzip"),
    ("gzip;q=bogus, br;q=2", None),               # malformed weights are never taken
])
def test_q_value_negotiation(accept, expected):
    assert choose_encoding(accept, ("zstd", "br", "gzip")) == expected


def test_negotiation_through_the_proxy(compressing):
    assert _raw_get(compressing, "/data.json", "br;q=0.9, gzip").headers["Content-Encoding"] == "gzip"
    plain = _raw_get(compressing, "/data.json", "identity;q=1, *;q=0")
    assert "Content-Encoding" not in plain.headers
    assert plain.raw_bytes == JSON_BODY
    assert plain.headers["Content-Length"] == str(len(JSON_BODY))  # identity keeps its length (splice)
    assert "accept-encoding" in plain.headers["Vary"].lower()  # still varies: caches must know


def _socket_exchange(proxy, request: bytes) -> tuple[bytes, bytes]:
    """(head, body) of one request answered on a connection the proxy closes after it."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=CLIENT_TIMEOUT) as sock:
        sock.sendall(request)
        data = b""
        for _ in range(10000):  # bounded: the proxy closes after the body
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def test_no_accept_encoding_gets_identity(compressing):
    head, body = _socket_exchange(compressing, b"GET /data.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert b"Content-Encoding" not in head
    assert body == JSON_BODY


def test_accept_encoding_in_two_fields_is_read_whole(compressing):
    """A list field may come as several field lines (RFC 9110 §5.3): a coding refused in the second
    must not be sent because the first offered everything."""
    head, body = _socket_exchange(compressing, b"GET /data.json HTTP/1.1\r\nHost: x\r\nAccept-Encoding: *\r\n"
                                               b"Accept-Encoding: zstd;q=0\r\nConnection: close\r\n\r\n")
    assert b"\r\nContent-Encoding: br\r\n" in head


@pytest.mark.parametrize("path", ["/small.json", "/image.png", "/already.json", "/no-transform.json",
                                  "/partial.json", "/events"])
def test_skip_rules_leave_the_body_as_sent(compressing, path):
    backend_bytes = _raw_get(compressing, path, "identity").raw_bytes
    response = _raw_get(compressing, path, "gzip, br, zstd")
    assert response.raw_bytes == backend_bytes
    assert response.headers.get("Content-Encoding") in (None, "gzip")  # /already.json keeps its own
    assert "accept-encoding" not in response.headers.get("Vary", "").lower()
    assert "Content-Length" in response.headers


def test_head_gets_no_body(compressing):
    response = _raw_get(compressing, "/data.json", "gzip", method="HEAD")
    assert response.status_code == 200
    assert response.raw_bytes == b""


def test_strong_etag_is_weakened_and_vary_extended(compressing):
    response = _raw_get(compressing, "/etag.json", "gzip")
    assert response.headers["ETag"] == 'W/"v1"'
    assert response.headers["Vary"] == "Origin, Accept-Encoding"  # requests joins the two fields
    identity = _raw_get(compressing, "/etag.json", "identity")
    assert identity.headers["ETag"] == '"v1"'  # the identity bytes keep their strong validator


def test_weak_etag_kept_and_accept_ranges_dropped(compressing):
    response = _raw_get(compressing, "/weak.json", "zstd")
    assert response.headers["ETag"] == 'W/"v2"'
    assert "Accept-Ranges" not in response.headers
    assert _decode("zstd", response.raw_bytes) == JSON_BODY


def test_route_without_compress_is_untouched(make_backend, make_proxy):
    backend = make_backend().route("/data.json", _fixed(JSON_BODY))
    proxy = make_proxy({"app": [backend.address]})
    response = _raw_get(proxy, "/data.json", "gzip")
    assert "Content-Encoding" not in response.headers and "Vary" not in response.headers
    assert response.raw_bytes == JSON_BODY


def test_table_form_limits_encodings_types_and_min_length(make_backend, make_proxy):
    backend = make_backend()
    backend.route("/data.json", _fixed(JSON_BODY))
    backend.route("/small.txt", _fixed(b"x" * 100, "text/plain"))
    proxy = make_proxy({"app": [backend.address]}, routes=[{"path": "/", "upstream": "app", "compress": {
        "encodings": ["gzip"], "min_length": 10, "types": ["text/plain"]}}])
    json_response = _raw_get(proxy, "/data.json", "gzip, br, zstd")
    assert "Content-Encoding" not in json_response.headers  # not among the listed types
    small = _raw_get(proxy, "/small.txt", "br, gzip;q=0.1")
    assert small.headers["Content-Encoding"] == "gzip"  # the only coding offered
    assert gzip.decompress(small.raw_bytes) == b"x" * 100


# -- streaming: a compressed event stream stays live ------------------------------------------------------
EVENT_1 = b"id: 1\ndata: first\n\n"
EVENT_2 = b"id: 2\ndata: second\n\n"


class TwoEventBackend:
    """Sends event 1, waits until the test has decoded it through the proxy, then sends event 2."""

    def __init__(self):
        self.go = threading.Event()
        self.sent_second = threading.Event()

    def __call__(self, peer) -> None:
        peer.read_request()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                  + b"%x\r\n%s\r\n" % (len(EVENT_1), EVENT_1))
        if not self.go.wait(CLIENT_TIMEOUT):
            return  # the test never saw event 1: it fails on its own read
        peer.send(b"%x\r\n%s\r\n0\r\n\r\n" % (len(EVENT_2), EVENT_2))
        self.sent_second.set()
        peer.read_head()


@pytest.mark.parametrize("coding", ["gzip", "br", "zstd"])
def test_compressed_event_stream_stays_live(make_raw_backend, make_proxy, coding):
    script = TwoEventBackend()
    backend = make_raw_backend(script)
    proxy = make_proxy({"events": [backend.address]}, routes=[{"path": "/", "upstream": "events", "compress": {
        "types": ["text/event-stream"], "min_length": 0}}])
    decoder = {"gzip": lambda: _GzipStream(), "br": lambda: brotli.Decompressor(),
               "zstd": lambda: zstandard.ZstdDecompressor().decompressobj()}[coding]()
    with requests.get(proxy.url + "/events", stream=True, timeout=CLIENT_TIMEOUT,
                      headers={"Accept-Encoding": coding}) as response:
        assert response.headers["Content-Encoding"] == coding
        decoded = b""
        for _ in range(100):  # bounded: each read returns at least one byte or the stream ended
            piece = response.raw.read(1, decode_content=False)
            if not piece:
                break
            decoded += _feed(decoder, piece)
            if len(decoded) >= len(EVENT_1):
                break
        assert decoded == EVENT_1
        assert not script.sent_second.is_set()  # event 1 arrived while event 2 did not exist yet
        script.go.set()
        rest = response.raw.read(decode_content=False)
        assert decoded + _feed(decoder, rest) == EVENT_1 + EVENT_2


class _GzipStream:
    def __init__(self):
        import zlib
        self._zlib = zlib.decompressobj(31)

    def decompress(self, data: bytes) -> bytes:
        return self._zlib.decompress(data)


def _feed(decoder, data: bytes) -> bytes:
    process = getattr(decoder, "process", None) or decoder.decompress
    return process(data)


# -- config ------------------------------------------------------------------------------------------
def _route_config(compress) -> dict:
    return proxy_config_dict({"app": ["127.0.0.1:9"]}, routes=[{"path": "/", "upstream": "app", "compress": compress}])


@pytest.mark.parametrize("compress,problem", [
    ("yes", "routes[0].compress: expected true, false or a table"),
    ({"encodings": ["lz4"]}, 'routes[0].compress.encodings[0]: "lz4" is not one of zstd | br | gzip'),
    ({"encodings": ["gzip", "gzip"]}, 'routes[0].compress.encodings[1]: "gzip" is listed twice'),
    ({"encodings": []}, "routes[0].compress.encodings: expected a list"),
    ({"min_length": -1}, "routes[0].compress.min_length: -1 is not a valid size"),
    ({"types": ["json"]}, 'routes[0].compress.types[0]: "json" is not a media type'),
    ({"level": 9}, "routes[0].compress.level: unknown key"),
])
def test_check_reports_bad_compress_values(compress, problem):
    with pytest.raises(ConfigError) as caught:
        parse_config(_route_config(compress), "proxy.toml")
    assert any(line.startswith(f"proxy.toml: {problem}") for line in caught.value.problems), caught.value.problems


def test_compress_values_parse():
    on = parse_config(_route_config(True), "proxy.toml").routes[0].compress
    assert on.encodings == ("zstd", "br", "gzip") and on.min_length == 1024 and "text/*" in on.types
    assert parse_config(_route_config(False), "proxy.toml").routes[0].compress is None
    table = parse_config(_route_config({"min_length": "2KiB", "encodings": ["br"]}), "proxy.toml").routes[0].compress
    assert table.min_length == 2048 and table.encodings == ("br",)


def test_reload_turns_compression_on(make_backend, make_proxy):
    backend = make_backend().route("/data.json", _fixed(JSON_BODY))
    proxy = make_proxy({"app": [backend.address]})
    assert "Content-Encoding" not in _raw_get(proxy, "/data.json", "gzip").headers
    document = proxy_config_dict({"app": [backend.address]},
                                 routes=[{"path": "/", "upstream": "app", "compress": {"encodings": ["gzip"]}}],
                                 server={"listen": f"127.0.0.1:{proxy.port}"})  # the listener stays
    proxy.process.reload(parse_config(document, "test.toml"))  # what SIGHUP runs with the file's config
    response = _raw_get(proxy, "/data.json", "gzip")
    assert response.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(response.raw_bytes) == JSON_BODY


# -- a slow client: compressed bytes wait in the server's relay, not on a worker ----------------------------
def test_a_slow_client_of_a_compressed_body_is_held_and_gets_it_whole(make_backend, make_proxy):
    body = base64.b64encode(os.urandom(3 * 1024 * 1024))  # text that compresses little: MiBs on the wire
    backend = make_backend().route("/big.txt", _fixed(body, "text/plain"))
    proxy = make_proxy({"app": [backend.address]}, routes=[{"path": "/", "upstream": "app", "compress": {
        "encodings": ["gzip"]}}])
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # not reading stops the proxy's sends early
    sock.settimeout(CLIENT_TIMEOUT)
    with sock:
        sock.connect(("127.0.0.1", proxy.port))
        sock.sendall(b"GET /big.txt HTTP/1.1\r\nHost: t\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n")
        wait_for(lambda: proxy.process.server.connection_counts().get("held", 0) == 1,
                 what="the stalled compressed response held by the relay")
        data = b""
        for _ in range(100000):  # bounded: the proxy closes after the body
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
    head, _, chunked = data.partition(b"\r\n\r\n")
    assert b"Content-Encoding: gzip" in head and b"Transfer-Encoding: chunked" in head
    assert gzip.decompress(_dechunk(chunked)) == body


def _dechunk(data: bytes) -> bytes:
    out, position = [], 0
    for _ in range(len(data)):  # bounded: every round consumes at least a size line
        end = data.index(b"\r\n", position)
        size = int(data[position:end], 16)
        if size == 0:
            return b"".join(out)
        out.append(data[end + 2:end + 2 + size])
        position = end + 2 + size + 2
    raise AssertionError("no last chunk")
