"""HTTP/2 to clients with real clients: curl (ALPN h2 and h2c prior knowledge), httpx, and a raw ``h2``
client for the header mapping of RFC 9113 §8. Limits and attacks are in test_http2_limits.py."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import signal
import socket
import ssl
import subprocess
import threading

import h2.events
import httpx
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import DataFrame

from core.socket_server import bind_listener
from proxy.config.schema import parse_config
from proxy.serve.runner import ProxyProcess
from tests.support.backends import consume_and_digest, pattern_sha256, stream_pattern, stream_pattern_chunked
from tests.support.faulty_upstream import HEAD, LOOP, write
from tests.support.h2 import CLIENT_TIMEOUT, H2Client, Pki, start_h2_proxy, stop_quietly
from tests.support.ports import free_port
from tests.support.processes import admin_status, proxy_config, ready_workers, running_proxy
from tests.support.proxy import proxy_config_dict
from tests.support.timing import wait_for

CURL_TIMEOUT = 60


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("h2pki"))


@pytest.fixture
def h2_proxy():
    running = []

    def factory(*args, **kwargs):
        proxy = start_h2_proxy(*args, **kwargs)
        running.append(proxy)
        return proxy

    yield factory
    for proxy in running:
        stop_quietly(proxy)


def _trusting(pki: Pki) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=pki.ca_file)


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", str(CURL_TIMEOUT), *args], capture_output=True,
                          timeout=CURL_TIMEOUT + 10)


needs_curl = pytest.mark.skipif(subprocess.run(["which", "curl"], capture_output=True).returncode != 0,
                                reason="curl not installed")


# -- negotiation -------------------------------------------------------------------------------------

@needs_curl
def test_curl_http2_over_tls(h2_proxy, make_backend, pki):
    backend = make_backend()
    proxy = h2_proxy({"web": [backend.address]}, pki)
    result = curl("--http2", "--cacert", pki.ca_file, "-w", "\n%{http_version} %{response_code}",
                  "--data-binary", "hello h2", proxy.url + "/echo")
    body, _, status = result.stdout.decode().rpartition("\n")
    assert status == "2 200", result.stderr
    assert body == "hello h2"
    seen = backend.last
    assert seen.method == "POST" and seen.path == "/echo" and seen.body == b"hello h2"
    assert seen.header("X-Forwarded-Proto") == "https"
    assert seen.header("X-Forwarded-Host") == f"127.0.0.1:{proxy.port}"


def _alpn(port: int, pki: Pki, offered) -> str | None:
    context = ssl.create_default_context(cafile=pki.ca_file)
    context.set_alpn_protocols(offered)
    with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return tls.selected_alpn_protocol()


def test_alpn_offers_h2_first_and_http1(h2_proxy, make_backend, pki):
    proxy = h2_proxy({"web": [make_backend().address]}, pki)
    assert _alpn(proxy.port, pki, ["h2", "http/1.1"]) == "h2"
    assert _alpn(proxy.port, pki, ["http/1.1"]) == "http/1.1"


@needs_curl
def test_http2_false_turns_h2_off(h2_proxy, make_backend, pki):
    proxy = h2_proxy({"web": [make_backend().address]}, pki, listen={"http2": False})
    assert _alpn(proxy.port, pki, ["h2", "http/1.1"]) == "http/1.1"
    result = curl("--http2", "--cacert", pki.ca_file, "-o", "/dev/null", "-w", "%{http_version}", proxy.url + "/")
    assert result.stdout == b"1.1"


@needs_curl
def test_h2c_prior_knowledge_and_http1_on_the_same_listener(h2_proxy, make_backend):
    backend = make_backend()
    proxy = h2_proxy({"web": [backend.address]}, None, listen={"h2c": True})
    result = curl("--http2-prior-knowledge", "-w", "\n%{http_version}", proxy.url + "/a")
    assert result.stdout.decode().rpartition("\n")[2] == "2", result.stderr
    result = curl("--http1.1", "-w", "\n%{http_version}", proxy.url + "/b")
    assert result.stdout.decode().rpartition("\n")[2] == "1.1"
    assert [r.path for r in backend.requests] == ["/a", "/b"]


@needs_curl
def test_plain_listener_without_h2c_answers_the_preface_in_http1(h2_proxy, make_backend):
    backend = make_backend()
    proxy = h2_proxy({"web": [backend.address]}, None)
    result = curl("--http2-prior-knowledge", proxy.url + "/a")
    assert result.returncode != 0  # curl reads an HTTP/1.1 answer, not the server preface
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=CLIENT_TIMEOUT) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 505 HTTP Version Not Supported")
    assert backend.requests == []


# -- streams on the pool ---------------------------------------------------------------------------------

def test_slow_stream_does_not_block_twenty_fast_ones_on_one_connection(h2_proxy, make_backend, pki):
    release = threading.Event()
    backend = make_backend()
    backend.route("/slow", lambda h, record: (release.wait(CLIENT_TIMEOUT), h.reply(200, b"slow")))
    proxy = h2_proxy({"web": [backend.address]}, pki, server={"min_threads": 4},
                     upstream_options={"read_timeout": "30s"})

    async def scenario():
        # httpx's async client: its thread-based sync client can leave one thread's response unread
        # behind another's (a client-side limit, not what this test is about).
        async with httpx.AsyncClient(http2=True, verify=_trusting(pki), timeout=CLIENT_TIMEOUT * 3) as client:
            assert (await client.get(proxy.url + "/warm")).http_version == "HTTP/2"  # the one connection
            slow = asyncio.ensure_future(client.get(proxy.url + "/slow"))
            await asyncio.to_thread(wait_for, lambda: any(r.path == "/slow" for r in backend.requests))
            fast = await asyncio.gather(*(client.get(f"{proxy.url}/fast/{i}") for i in range(20)))
            # Every fast stream finished while the slow one still waits for its backend.
            assert not slow.done()
            assert all(r.status_code == 200 and r.http_version == "HTTP/2" for r in fast)
            assert proxy.app.http2_counts()["connections"] == 1
            release.set()
            assert (await slow).text == "slow"

    asyncio.run(scenario())


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_download_with_exact_checksum(h2_proxy, make_backend, pki, framing):
    size = 24 * 1024 * 1024 + 7
    backend = make_backend()
    backend.route("/big", stream_pattern(size) if framing == "length" else stream_pattern_chunked(size))
    proxy = h2_proxy({"web": [backend.address]}, pki)
    digest = hashlib.sha256()
    with httpx.Client(http2=True, verify=_trusting(pki), timeout=CLIENT_TIMEOUT) as client:
        with client.stream("GET", proxy.url + "/big") as response:
            assert response.http_version == "HTTP/2"
            for piece in response.iter_bytes():
                digest.update(piece)
    assert digest.hexdigest() == pattern_sha256(size)


@pytest.mark.parametrize("with_length", [True, False])
def test_upload_with_exact_checksum(h2_proxy, make_backend, pki, with_length):
    payload = bytes(range(256)) * (40 * 1024) + b"tail"  # 10 MiB and a bit
    backend = make_backend()
    backend.route("/up", consume_and_digest)
    proxy = h2_proxy({"web": [backend.address]}, pki)

    def pieces():
        for offset in range(0, len(payload), 100_000):
            yield payload[offset:offset + 100_000]

    with httpx.Client(http2=True, verify=_trusting(pki), timeout=CLIENT_TIMEOUT) as client:
        response = client.post(proxy.url + "/up", content=payload if with_length else pieces())
    assert response.http_version == "HTTP/2"
    assert response.text == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}"
    assert backend.last.chunked is (not with_length)


@needs_curl
def test_curl_upload_and_download_over_h2c(h2_proxy, make_backend, tmp_path):
    payload = bytes(range(251)) * 20000
    source = tmp_path / "up.bin"
    source.write_bytes(payload)
    backend = make_backend()
    backend.route("/up", consume_and_digest)
    backend.route("/down", stream_pattern(3 * 1024 * 1024))
    proxy = h2_proxy({"web": [backend.address]}, None, listen={"h2c": True})
    result = curl("--http2-prior-knowledge", "--data-binary", f"@{source}", proxy.url + "/up")
    assert result.stdout.decode() == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}"
    result = curl("--http2-prior-knowledge", proxy.url + "/down")
    assert hashlib.sha256(result.stdout).hexdigest() == pattern_sha256(3 * 1024 * 1024)


# -- header mapping (RFC 9113 §8) --------------------------------------------------------------------------

def test_request_mapping_authority_cookies_and_te(h2_proxy, make_backend):
    backend = make_backend()
    proxy = h2_proxy({"web": [backend.address]}, None, listen={"h2c": True})
    client = H2Client.connect(proxy.port)
    stream = client.request("/map", headers=[("cookie", "a=1"), ("cookie", "b=2"), ("te", "trailers"),
                                             ("x-custom", "yes")])
    headers, _ = client.response(stream)
    assert headers[":status"] == "200"
    seen = backend.last
    assert seen.header_all("cookie") == ["a=1; b=2"]
    assert seen.header("x-forwarded-host") == "h2.test"
    assert seen.header("x-custom") == "yes"
    assert seen.header("te") is None  # hop-by-hop: never forwarded
    client.close()


@pytest.mark.parametrize("tls", [False, True], ids=["h2c", "tls"])
def test_behind_proxy_protocol_streams_carry_the_balancers_client(h2_proxy, make_backend, pki, tls):
    backend = make_backend()
    listen = {"proxy_protocol": True, **({} if tls else {"h2c": True})}
    proxy = h2_proxy({"web": [backend.address]}, pki if tls else None, listen=listen,
                     server={"trusted_proxies": ["127.0.0.1"]})
    context = None
    if tls:
        context = _trusting(pki)
        context.set_alpn_protocols(["h2"])
    client = H2Client.connect(proxy.port, context, prelude=b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 443\r\n")
    headers, _ = client.response(client.request("/who"))
    assert headers[":status"] == "200"
    assert backend.last.header("x-forwarded-for") == "203.0.113.7"
    client.close()
    # A header naming no client: the balancer's own address, and the client's X-Forwarded-For not believed.
    client = H2Client.connect(proxy.port, context, prelude=b"PROXY UNKNOWN\r\n")
    headers, _ = client.response(client.request("/who", headers=[("x-forwarded-for", "198.51.100.66")]))
    assert headers[":status"] == "200"
    assert backend.last.header("x-forwarded-for") == "127.0.0.1"
    client.close()


def test_connection_specific_response_fields_never_reach_the_client(h2_proxy, upstreams):
    upstream = upstreams([HEAD, write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive, X-Hop\r\n"
                                      b"Keep-Alive: timeout=5\r\nX-Hop: secret\r\nX-Kept: 1\r\n\r\nok"), LOOP])
    proxy = h2_proxy({"web": [upstream.address]}, None, listen={"h2c": True})
    client = H2Client.connect(proxy.port)  # h2 itself fails the stream on any connection-specific field
    headers, body = client.response(client.request("/"))
    assert body == b"ok"
    assert headers["x-kept"] == "1"
    assert not {"connection", "keep-alive", "x-hop", "transfer-encoding"} & set(headers)
    client.close()


def test_trailers_and_interim_responses_are_relayed(h2_proxy, upstreams):
    upstream = upstreams([HEAD, write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n"
                                      b"Connection: X-Hop\r\nX-Hop: secret\r\n\r\n"
                                      b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: grpc-status\r\n\r\n"
                                      b"5\r\nhello\r\n0\r\ngrpc-status: 0\r\n\r\n"), LOOP])
    proxy = h2_proxy({"web": [upstream.address]}, None, listen={"h2c": True})
    client = H2Client.connect(proxy.port)
    stream = client.request("/")
    headers, body = client.response(stream)
    assert headers[":status"] == "200" and body == b"hello"
    interim = [e for e in client.events if isinstance(e, h2.events.InformationalResponseReceived)]
    assert dict(interim[0].headers)[":status"] == "103"
    assert dict(interim[0].headers)["link"] == "</a.css>; rel=preload"
    assert "x-hop" not in dict(interim[0].headers)  # named in the 1xx's Connection: hop-by-hop
    trailers = [e for e in client.events if isinstance(e, h2.events.TrailersReceived)]
    assert dict(trailers[0].headers) == {"grpc-status": "0"}
    client.close()


@pytest.mark.parametrize("method, status", [("HEAD", 200), ("GET", 204), ("GET", 304)])
def test_upstream_connection_closing_after_a_bodiless_answer_is_not_reused(h2_proxy, make_raw_backend,
                                                                          method, status):
    seen = []

    def says_close_but_reads_on(peer):  # closes only when the proxy does: the proxy must believe the header
        while head := peer.read_head():
            seen.append((peer.index, head.split(b" ")[0].decode()))
            peer.send(b"HTTP/1.1 %d X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n" % status)

    backend = make_raw_backend(says_close_but_reads_on)
    proxy = h2_proxy({"web": [backend.address]}, None, listen={"h2c": True})
    client = H2Client.connect(proxy.port)
    for _ in range(2):
        headers, _ = client.response(client.request("/", method=method))
        assert headers[":status"] == str(status)
    assert seen == [(0, method), (1, method)]
    client.close()


@pytest.mark.parametrize("bad_field", [("X-Upper", "1"), ("connection", "close"), ("upgrade", "websocket"),
                                       ("te", "gzip"), ("x-space", "value "), ("host", "other.test")],
                         ids=["uppercase", "connection", "upgrade", "te", "whitespace", "host-mismatch"])
def test_malformed_request_is_a_stream_error_not_a_connection_error(h2_proxy, make_backend, bad_field):
    # RFC 9113 §8.1.1: a malformed request is a stream error (PROTOCOL_ERROR): the client's other
    # requests on the connection, maybe other users' behind a balancer, go on.
    release = threading.Event()
    backend = make_backend()
    backend.route("/slow", lambda h, record: (release.wait(CLIENT_TIMEOUT), h.reply(200, b"slow")))
    proxy = h2_proxy({"web": [backend.address]}, None, listen={"h2c": True})
    client = H2Client.connect(proxy.port, validate_outbound_headers=False, normalize_outbound_headers=False)
    slow = client.request("/slow")
    wait_for(lambda: backend.requests, what="the slow request upstream")
    bad = client.request("/bad", headers=[bad_field])
    reset = client.until(lambda e: isinstance(e, (h2.events.StreamReset, h2.events.ConnectionTerminated)))
    assert isinstance(reset, h2.events.StreamReset) and reset.stream_id == bad
    assert reset.error_code == ErrorCodes.PROTOCOL_ERROR
    release.set()
    headers, body = client.response(slow)
    assert (headers[":status"], body) == ("200", b"slow")
    headers, _ = client.response(client.request("/after"))
    assert headers[":status"] == "200"
    assert [r.path for r in backend.requests] == ["/slow", "/after"]
    client.close()


_REQUEST = [(":method", "GET"), (":path", "/bad"), (":scheme", "http"), (":authority", "h2.test")]


def test_host_differing_from_authority_only_in_case_is_served(h2_proxy, make_backend):
    # RFC 9113 §8.3.1 refuses a Host that names another entity than :authority; host names are
    # case-insensitive (RFC 3986 §3.2.2), so H2.Test and h2.test name the same one.
    backend = make_backend()
    proxy = h2_proxy({"web": [backend.address]}, None, listen={"h2c": True})
    client = H2Client.connect(proxy.port, validate_outbound_headers=False)
    headers, _ = client.response(client.request("/case", headers=[("host", "H2.Test")]))
    assert headers[":status"] == "200"
    assert [r.path for r in backend.requests] == ["/case"]
    assert backend.requests[0].header("host") == "h2.test"  # :authority wins, as RFC 9113 §8.3.1 says
    client.close()



@pytest.mark.parametrize("block", [
    _REQUEST + [("x-nul", "a\x00b")], _REQUEST + [("x-cr", "a\rb")], _REQUEST + [("x-lf", "a\nb")],
    _REQUEST + [("x-tab", "\tvalue")], _REQUEST + [("x:colon", "1")], _REQUEST + [("x space", "1")],
    _REQUEST + [("", "empty name")], _REQUEST + [("x-\x7f", "1")], _REQUEST + [("x-\xe9", "1")],
    _REQUEST + [("proxy-connection", "keep-alive")], _REQUEST + [("keep-alive", "5")],
    _REQUEST + [("transfer-encoding", "chunked")], _REQUEST + [("te", "trailers, gzip")],
    _REQUEST + [("host", "h2.test"), ("host", "h2.test")],
    _REQUEST + [(":method", "GET")], _REQUEST[:1] + [("x-a", "1")] + _REQUEST[1:],
    _REQUEST + [(":status", "200")], _REQUEST + [(":x", "1")], _REQUEST + [(":protocol", "websocket")],
    _REQUEST[1:], [_REQUEST[0], _REQUEST[2], _REQUEST[3]], [_REQUEST[0], _REQUEST[1], _REQUEST[3]],
    [(":method", "GET"), (":path", ""), (":scheme", "http"), (":authority", "h2.test")], _REQUEST[:3],
    [(":method", "CONNECT"), (":path", "/"), (":authority", "h2.test:443")],
], ids=["nul", "cr", "lf", "leading-tab", "colon-in-name", "space-in-name", "empty-name", "del-in-name",
        "high-byte-name", "proxy-connection", "keep-alive", "transfer-encoding", "te-not-trailers",
        "two-hosts", "duplicate-pseudo", "pseudo-after-regular", "response-pseudo", "unknown-pseudo",
        "protocol-without-connect", "no-method", "no-path", "no-scheme", "empty-path", "no-authority",
        "connect-with-path"])
def test_every_malformed_header_block_is_a_stream_error(h2_proxy, make_backend, block):
    # RFC 9113 §8.2-8.3, as the proxy checks them (proxy/http2/mapping.py: malformed): each block resets
    # its own stream (PROTOCOL_ERROR), reaches no backend, and the connection serves the next request.
    backend = make_backend()
    proxy = h2_proxy({"web": [backend.address]}, None, listen={"h2c": True})
    client = H2Client.connect(proxy.port, validate_outbound_headers=False, normalize_outbound_headers=False)
    bad = client.h2.get_next_available_stream_id()
    client.h2.send_headers(bad, block, end_stream=True)
    client.flush()
    reset = client.until(lambda e: isinstance(e, (h2.events.StreamReset, h2.events.ConnectionTerminated)))
    assert isinstance(reset, h2.events.StreamReset) and reset.stream_id == bad
    assert reset.error_code == ErrorCodes.PROTOCOL_ERROR
    headers, _ = client.response(client.request("/after"))
    assert headers[":status"] == "200"
    assert [r.path for r in backend.requests] == ["/after"]
    client.close()


@pytest.mark.parametrize("trailer", [(":path", "/x"), ("X-Upper", "1"), ("connection", "close"),
                                     ("te", "gzip"), ("x-cr", "a\rb")],
                         ids=["pseudo", "uppercase", "connection", "te", "cr"])
def test_malformed_trailers_reset_their_stream_alone(h2_proxy, make_backend, trailer):
    backend = make_backend()
    proxy = h2_proxy({"web": [backend.address]}, None, listen={"h2c": True})
    client = H2Client.connect(proxy.port, validate_outbound_headers=False, normalize_outbound_headers=False)
    bad = client.request("/upload", method="POST", body=b"part", end=False)
    client.h2.send_headers(bad, [trailer], end_stream=True)
    client.flush()
    reset = client.until(lambda e: isinstance(e, (h2.events.StreamReset, h2.events.ConnectionTerminated)))
    assert isinstance(reset, h2.events.StreamReset) and reset.stream_id == bad
    assert reset.error_code == ErrorCodes.PROTOCOL_ERROR
    headers, _ = client.response(client.request("/after"))
    assert headers[":status"] == "200"
    client.close()


@pytest.mark.parametrize("body", [b"longer than ten", b"short"], ids=["longer", "shorter"])
def test_body_against_its_content_length_resets_that_stream_alone(h2_proxy, make_backend, body):
    # RFC 9113 §8.1.1: DATA that does not add up to the content-length makes the request malformed, a
    # stream error: an upload in progress on the same connection goes on.
    backend = make_backend()
    proxy = h2_proxy({"web": [backend.address]}, None, listen={"h2c": True})
    client = H2Client.connect(proxy.port)
    upload = client.request("/upload", method="POST", headers=[("content-length", "10")], body=b"01234",
                            end=False)
    bad = client.h2.get_next_available_stream_id()
    client.h2.send_headers(bad, [(":method", "POST"), (":path", "/bad"), (":scheme", "http"),
                                 (":authority", "h2.test"), ("content-length", "10")])
    client.flush()
    client.send_raw(DataFrame(bad, data=body, flags=["END_STREAM"]).serialize())  # h2 checks its own
    reset = client.until(lambda e: isinstance(e, (h2.events.StreamReset, h2.events.ConnectionTerminated)))
    assert isinstance(reset, h2.events.StreamReset) and reset.stream_id == bad
    assert reset.error_code == ErrorCodes.PROTOCOL_ERROR
    client.h2.send_data(upload, b"56789", end_stream=True)
    client.flush()
    headers, echoed = client.response(upload)
    assert (headers[":status"], echoed) == ("200", b"0123456789")
    headers, _ = client.response(client.request("/after"))
    assert headers[":status"] == "200"
    client.close()


@pytest.mark.parametrize("values", [["abc"], ["5, 6"], ["5", "6"], ["-1"]], ids=lambda v: repr(v))
def test_invalid_content_length_gets_400_on_its_stream_alone(h2_proxy, make_backend, values):
    backend = make_backend()
    proxy = h2_proxy({"web": [backend.address]}, None, listen={"h2c": True})
    client = H2Client.connect(proxy.port, validate_outbound_headers=False, normalize_outbound_headers=False)
    bad = client.request("/bad", method="POST", headers=[("content-length", v) for v in values], body=b"12345")
    headers, body = client.response(bad)
    assert headers[":status"] == "400" and b"Content-Length" in body
    headers, _ = client.response(client.request("/after"))
    assert headers[":status"] == "200"
    assert [r.path for r in backend.requests] == ["/after"]
    client.close()


def _send_block(client: H2Client, **pseudo) -> int:
    """A request whose pseudo-fields the test chooses (h2's own checks of them left to the proxy)."""
    fields = {":method": "GET", ":path": "/", ":scheme": "http", ":authority": "h2.test", **pseudo}
    stream = client.h2.get_next_available_stream_id()
    client.h2.send_headers(stream, list(fields.items()), end_stream=True)
    client.flush()
    return stream


@pytest.mark.parametrize("pseudo", [{":method": "GET /admin HTTP/1.1"}, {":method": "G(T"},
                                    {":path": "/public HTTP/1.1"}, {":path": "public"}, {":path": "/a#b"},
                                    {":path": "/a\tb"}, {":path": "*"}, {":path": "http://h2.test/x"},
                                    {":authority": "user@h2.test"}, {":authority": "h2 .test"},
                                    {":authority": ":80"}],
                         ids=lambda p: repr(next(iter(p.values()))))
def test_pseudo_fields_an_http1_request_line_would_refuse_get_400(h2_proxy, make_backend, pseudo):
    # What goes upstream is an HTTP/1.1 request line: a space in :method or :path would let the
    # backend read another target than the one routed and checked, as in a request smuggled past.
    backend = make_backend()
    proxy = h2_proxy({"web": [backend.address]}, None, listen={"h2c": True})
    client = H2Client.connect(proxy.port, validate_outbound_headers=False, normalize_outbound_headers=False)
    headers, body = client.response(_send_block(client, **pseudo))
    assert headers[":status"] == "400"
    assert b"invalid :" in body  # the proxy's answer, not a backend's that got the request
    assert not backend.requests
    client.close()


@pytest.mark.parametrize("field", [("x(y", "1"), ("transfer_encoding", "chunked"), ("content_length", "5"),
                                   ("x-ctl", "a\x01b"), ("x-del", "a\x7fb")],
                         ids=["non-token-name", "te-lookalike", "cl-lookalike", "control-char", "del"])
def test_fields_an_http1_request_would_refuse_get_400(h2_proxy, make_backend, field):
    # h2 refuses only what RFC 9113 lists (uppercase, CR, LF, NUL...); the HTTP/1.1 request sent
    # upstream needs what HTTP/1.1 needs, and a framing lookalike is refused as the HTTP/1.1 parser does.
    backend = make_backend()
    proxy = h2_proxy({"web": [backend.address]}, None, listen={"h2c": True})
    client = H2Client.connect(proxy.port, validate_outbound_headers=False, normalize_outbound_headers=False)
    headers, body = client.response(client.request("/", headers=[field]))
    assert headers[":status"] == "400"
    assert b"header" in body  # the proxy's answer, not a backend's that got the request
    assert not backend.requests
    client.close()


@pytest.mark.parametrize("trailer", [("content-length", "5"), ("authorization", "Basic YTpi"), ("x(y", "1"),
                                     ("x-ctl", "a\x01b")])
def test_request_trailers_an_http1_request_would_refuse_get_400(h2_proxy, make_backend, trailer):
    backend = make_backend()
    proxy = h2_proxy({"web": [backend.address]}, None, listen={"h2c": True})
    client = H2Client.connect(proxy.port, validate_outbound_headers=False, normalize_outbound_headers=False)
    stream = client.request("/upload", method="POST", body=b"part", end=False)
    client.h2.send_headers(stream, [trailer], end_stream=True)
    client.flush()
    headers, body = client.response(stream)
    assert headers[":status"] == "400"
    assert b"trailer" in body  # the proxy's answer: the trailers never went upstream
    assert not backend.requests
    client.close()


def test_head_answer_keeps_the_upstreams_content_length(h2_proxy, make_backend):
    backend = make_backend()
    backend.route("/sized", lambda h, record: h.reply(200, b"x" * 24000))

    def unsized(h, record):  # a close-delimited answer: no length to tell
        h.send_response(200)
        h.send_header("Connection", "close")
        h.end_headers()
        h.close_connection = True

    backend.route("/unsized", unsized)
    proxy = h2_proxy({"web": [backend.address]}, None, listen={"h2c": True})
    client = H2Client.connect(proxy.port)
    headers, body = client.response(client.request("/sized", method="HEAD"))
    assert (headers[":status"], headers.get("content-length"), body) == ("200", "24000", b"")  # as GET would say
    headers, body = client.response(client.request("/unsized", method="HEAD"))
    assert (headers[":status"], body) == ("200", b"") and "content-length" not in headers
    client.close()


def test_bad_request_on_one_stream_leaves_the_connection_serving(h2_proxy, make_backend):
    backend = make_backend()
    proxy = h2_proxy({"web": [backend.address]}, None, listen={"h2c": True})
    client = H2Client.connect(proxy.port)
    bad = client.request("/a", headers=[("content-length", "5")])  # no body follows the headers
    headers, _ = client.response(bad)
    assert headers[":status"] == "400"
    headers, _ = client.response(client.request("/b"))
    assert headers[":status"] == "200"
    assert [r.path for r in backend.requests] == ["/b"]
    client.close()


def test_access_log_record_says_http2(h2_proxy, make_backend, pki):
    backend = make_backend()
    proxy = h2_proxy({"web": [backend.address]}, pki)
    records: list = []
    proxy.app.observers.append(records.append)
    with httpx.Client(http2=True, verify=_trusting(pki), timeout=CLIENT_TIMEOUT) as client:
        assert client.get(proxy.url + "/logged?x=1").status_code == 200
    record = wait_for(lambda: records and records[-1], what="the request's record")
    assert (record.version, record.method, record.target, record.status) == ("HTTP/2.0", "GET", "/logged?x=1", 200)
    assert record.request_id and record.upstream == "web"


@needs_curl
def test_h2c_with_two_workers_counted_in_status_and_drained(tmp_path, make_backend):
    backend = make_backend()
    port, admin_port = free_port(), free_port()
    text = proxy_config(port, backend.address, workers=2, admin_port=admin_port).replace(
        f'listen = "127.0.0.1:{port}"', f'listen = [{{ address = "127.0.0.1:{port}", h2c = true }}]')
    with running_proxy(tmp_path, text) as run:
        wait_for(lambda: ready_workers(run) == 2, timeout=30, what="two workers", on_timeout=run.log)
        for index in range(10):
            result = curl("--http2-prior-knowledge", "-w", "\n%{http_version}", f"{run.url}/w/{index}")
            assert result.stdout.decode().rpartition("\n")[2] == "2", result.stderr
        status = admin_status(admin_port)
        assert status["processes"] == 2 and status["http2"]["streams_total"] == 10
        run.signal(signal.SIGTERM)
        assert run.wait_exit() == 0
    assert len([r for r in backend.requests if r.path.startswith("/w/")]) == 10


@pytest.mark.parametrize("http2, expected", [(True, "h2"), (False, "http/1.1")])
def test_http2_switch_holds_for_local_ca_listeners(h2_proxy, make_backend, tmp_path, http2, expected):
    """tls = "internal": the leaf's context, which the SNI callback switches to, answers ALPN."""
    listen = {"address": "127.0.0.1:1", "tls": "internal", **({} if http2 else {"http2": False})}
    document = proxy_config_dict({"web": [make_backend().address]}, server={"listen": [listen]})
    document["tls"] = {"internal_ca_dir": str(tmp_path / "ca")}
    config = parse_config(document, str(tmp_path / "test.toml"))
    sock = bind_listener("127.0.0.1", 0)
    port = sock.getsockname()[1]
    process = ProxyProcess(config, listeners=[(dataclasses.replace(config.server.listen[0], port=port), sock)])
    thread = process.start_in_thread()
    try:
        context = ssl.create_default_context(cafile=str(tmp_path / "ca" / "root.crt"))
        context.set_alpn_protocols(["h2", "http/1.1"])
        with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                assert tls.selected_alpn_protocol() == expected
    finally:
        process.stop(force=True)
        thread.join(CLIENT_TIMEOUT)


def test_proxy_own_answers_on_a_stream_error_and_redirect(h2_proxy, make_backend):
    backend = make_backend()
    closed_port = free_port()  # nothing listens there: 502
    routes = [{"path": "/down", "upstream": "down"},
              {"path": "/moved", "redirect": {"to": "https://example.test/new", "status": 308}},
              {"path": "/", "upstream": "web"}]
    proxy = h2_proxy({"web": [backend.address], "down": [f"127.0.0.1:{closed_port}"]}, None,
                     listen={"h2c": True}, routes=routes)
    client = H2Client.connect(proxy.port)
    headers, body = client.response(client.request("/down/x", method="POST", body=b"data"))
    assert headers[":status"] == "502" and b"127.0.0.1:" in body
    assert headers["x-request-id"]
    headers, body = client.response(client.request("/moved"))
    assert headers[":status"] == "308" and headers["location"] == "https://example.test/new"
    headers, _ = client.response(client.request("/fine"))  # the connection goes on after both
    assert headers[":status"] == "200"
    client.close()
