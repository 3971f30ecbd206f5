"""proxy.http.http1: every message is fed whole, one byte at a time and at seeded random split
points, and must give the same events (h11 tests/test_io.py, gunicorn tests/requests)."""

from __future__ import annotations

import random
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.http.http1 import (
    LAST_CHUNK,
    NEED_DATA,
    Data,
    EndOfMessage,
    Headers,
    ParserStateError,
    ProtocolError,
    RequestHead,
    RequestParser,
    ResponseHead,
    ResponseParser,
    encode_chunk,
)
from tests.support.http1_feeding import comparable, run, run_all_splits, valid_requests


def requests_in(data: bytes, eof=True) -> list:
    return run_all_splits(RequestParser, data, eof)


def heads(events):
    return [e for e in events if e[0] == "request"]


# ---------------------------------------------------------------------------------------
# Valid requests

GET = (b"GET /index.html?q=1 HTTP/1.1\r\nHost: Example.COM:8080\r\nUser-Agent: t/1\r\n"
       b"Accept: */*\r\nX-Empty:\r\nX-Spaces: \t padded value \t \r\nX-Obs: caf\xe9\r\n\r\n")


def test_get_request_fields():
    events = requests_in(GET)
    assert events[-1] == ("end", None) and len(events) == 2
    (_, method, target, version, raw, cl, chunked, keep_alive, host, tokens, expect, upgrade), = heads(events)
    assert (method, target, version) == ("GET", "/index.html?q=1", "HTTP/1.1")
    assert raw == (("Host", "Example.COM:8080"), ("User-Agent", "t/1"), ("Accept", "*/*"),
                   ("X-Empty", ""), ("X-Spaces", "padded value"), ("X-Obs", "café"))
    assert (cl, chunked, keep_alive, host, tokens, expect, upgrade) == (
        None, False, True, "example.com:8080", frozenset(), False, None)


def test_headers_lookup():
    parser = RequestParser()
    parser.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\nx-a: 2\r\n\r\n")
    headers = parser.next_event().headers
    assert headers.get("x-a") == "1" and headers.get_all("x-a") == ["1", "2"]
    assert headers.get("missing") is None and headers.get("missing", "d") == "d"
    assert "host" in headers and "nope" not in headers
    assert list(headers) == [("Host", "a"), ("X-A", "1"), ("x-a", "2")]
    assert headers == Headers([("Host", "a"), ("X-A", "1"), ("x-a", "2")])


def test_post_with_content_length_body():
    data = b"POST /submit HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\nhello world"
    events = requests_in(data)
    assert heads(events)[0][5] == 11
    assert events[1:] == [("data", b"hello world"), ("end", None)]


def test_repeated_identical_content_length_collapses():
    data = (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3, 3\r\n"
            b"Content-Length: 3\r\n\r\nabc")
    assert requests_in(data)[1:] == [("data", b"abc"), ("end", None)]


def test_chunked_with_extensions_and_trailers():
    data = (b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: Chunked\r\n\r\n"
            b"5;name=value\r\nhello\r\n6 ; x=\"q\"\r\n world\r\nA\r\n0123456789\r\n"
            b"0;last\r\nX-Checksum: abc\r\nX-Other:  2 \r\n\r\n")
    events = requests_in(data)
    assert heads(events)[0][6] is True
    assert events[1:] == [("data", b"hello world0123456789"),
                          ("end", (("X-Checksum", "abc"), ("X-Other", "2")))]


def test_chunked_without_trailers():
    data = b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    assert requests_in(data)[1:] == [("data", b"abc"), ("end", None)]


def test_pipelined_requests():
    data = (b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n"
            b"POST /2 HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi"
            b"POST /3 HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nyo\r\n0\r\n\r\n"
            b"\r\nGET /4 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    events = requests_in(data)
    assert [h[2] for h in heads(events)] == ["/1", "/2", "/3", "/4"]
    assert [e for e in events if e[0] != "request"] == [
        ("end", None), ("data", b"hi"), ("end", None), ("data", b"yo"), ("end", None), ("end", None)]
    assert heads(events)[-1][7] is False  # Connection: close


@pytest.mark.parametrize("connection, keep_alive", [
    (b"", False), (b"Connection: keep-alive\r\n", True), (b"Connection: Keep-Alive, close\r\n", False)])
def test_http10_keep_alive(connection, keep_alive):
    data = b"GET / HTTP/1.0\r\n" + connection + b"\r\n"
    (head,) = heads(requests_in(data))
    assert head[3] == "HTTP/1.0" and head[7] is keep_alive and head[8] is None


def test_absolute_form_authority_wins_over_host():
    data = b"GET http://Backend.example:81/p?q HTTP/1.1\r\nHost: other.example\r\n\r\n"
    (head,) = heads(requests_in(data))
    assert head[2] == "http://Backend.example:81/p?q" and head[8] == "backend.example:81"


def test_options_asterisk():
    (head,) = heads(requests_in(b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n"))
    assert head[1:3] == ("OPTIONS", "*")


def test_unknown_method_is_forwarded():
    (head,) = heads(requests_in(b"PURGE /x HTTP/1.1\r\nHost: h\r\n\r\n"))
    assert head[1] == "PURGE"


def test_connection_upgrade_expect_continue():
    data = (b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, Upgrade\r\n"
            b"Upgrade: websocket\r\nExpect: 100-Continue\r\n\r\n")
    (head,) = heads(requests_in(data))
    assert head[9] == frozenset({"keep-alive", "upgrade"})
    assert head[10] is True and head[11] == "websocket"


def test_upgrade_header_without_connection_token_is_ignored():
    (head,) = heads(requests_in(b"GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\r\n"))
    assert head[11] is None


def test_leading_empty_lines_are_ignored():
    events = requests_in(b"\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert len(heads(events)) == 1


def test_empty_lines_then_close_is_a_clean_close():
    assert requests_in(b"\r\n\r\n") == []


def test_clean_eof_between_requests_is_not_an_error():
    parser = RequestParser()
    parser.feed(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert isinstance(parser.next_event(), RequestHead)
    assert parser.next_event() == EndOfMessage(None)
    parser.start_next()
    parser.feed_eof()
    assert parser.next_event() is NEED_DATA and parser.peer_closed


# ---------------------------------------------------------------------------------------
# Invalid requests: (message, status). Each is fed whole, bytewise and at random splits.

H = b"Host: h\r\n"
INVALID_REQUESTS = [
    # request line
    (b"GET  / HTTP/1.1\r\n" + H + b"\r\n", 400),
    (b"GET /  HTTP/1.1\r\n" + H + b"\r\n", 400),
    (b" GET / HTTP/1.1\r\n" + H + b"\r\n", 400),
    (b"GET / HTTP/1.1 \r\n" + H + b"\r\n", 400),
    (b"GET\t/ HTTP/1.1\r\n" + H + b"\r\n", 400),
    (b"GET /\r\n\r\n", 400),                              # HTTP/0.9
    (b"GET / HTTP/0.9\r\n\r\n", 400),
    (b"GET / http/1.1\r\n" + H + b"\r\n", 400),
    (b"GET / HTTP/1.1.1\r\n" + H + b"\r\n", 400),
    (b"GET / HTTP/11\r\n" + H + b"\r\n", 400),
    (b"GET / HTTP/2.0\r\n" + H + b"\r\n", 505),
    (b"GET / HTTP/3.0\r\n" + H + b"\r\n", 505),
    (b"G(T / HTTP/1.1\r\n" + H + b"\r\n", 400),
    (b"GET /a\x01b HTTP/1.1\r\n" + H + b"\r\n", 400),
    (b"GET /a\x7fb HTTP/1.1\r\n" + H + b"\r\n", 400),
    (b"GET /caf\xe9 HTTP/1.1\r\n" + H + b"\r\n", 400),
    (b"GET /a#frag HTTP/1.1\r\n" + H + b"\r\n", 400),
    (b"GET * HTTP/1.1\r\n" + H + b"\r\n", 400),
    (b"GET example.com:80 HTTP/1.1\r\n" + H + b"\r\n", 400),
    (b"GET ftp://h/x HTTP/1.1\r\n" + H + b"\r\n", 400),
    (b"GET http:///x HTTP/1.1\r\n" + H + b"\r\n", 400),
    (b"GET http://user@h/x HTTP/1.1\r\n" + H + b"\r\n", 400),
    (b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n", 501),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n" + H + b"\r\n", 414),
    # line endings
    (b"GET / HTTP/1.1\n" + H + b"\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: h\n\n", 400),
    (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\rb\r\n\r\n", 400),
    (b"GET / HTTP/1.1\rHost: h\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: h\r\n\n", 400),
    (b"\nGET / HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    # field lines
    (b"GET / HTTP/1.1\r\nHost : h\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n" + H + b"X-A\t: 1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n" + H + b"X-A: 1\r\n continued\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n" + H + b"X-A: 1\r\n\tcontinued\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n" + H + b" X-A: 1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n" + H + b"X-A 1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n" + H + b": 1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n" + H + b"X(A): 1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x7fb\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x1bb\r\n\r\n", 400),
    # Host
    (b"GET / HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: user@a\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a:80x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a:123456\r\n\r\n", 400),
    (b"GET http://a/ HTTP/1.1\r\n\r\n", 400),
    # Content-Length
    (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +1\r\n\r\nx", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\nx", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1_0\r\n\r\nx", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1 0\r\n\r\nx", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0x5\r\n\r\nx", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: \xb2\r\n\r\nx", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Content-Length:\r\n\r\nx", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1234567890123456789\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1, 2\r\n\r\nx", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1,\r\n\r\nx", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nxx", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 104857601\r\n\r\n", 413),
    # Transfer-Encoding
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, gzip\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, chunked\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunk\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: \"chunked\"\r\n\r\n", 400),
    (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n", 501),
    # chunked body
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n-1\r\nx\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n+1\r\nx\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0x1\r\nx\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n 1\r\nx\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n1 \r\nx\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\ng\r\nx\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n\r\nx\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n" + b"1" * 17 + b"\r\n", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n1\nx\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n1\r\nxy\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n1\r\nx\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n1;a\x00b\r\nx\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\nX: a\nY: b\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n" + b"6400001\r\n", 413),
    # trailers
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\nContent-Length: 5\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\nhost: x\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\nX : 1\r\n\r\n", 400),
    # truncated by the peer
    (b"GET / HTTP/1.1\r\nHost: h\r\n", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n\r\nabc", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5\r\nab", 400),
    (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\n", 400),
]


@pytest.mark.parametrize("data, status", INVALID_REQUESTS, ids=range(len(INVALID_REQUESTS)))
def test_invalid_request(data, status):
    events = requests_in(data)
    assert events[-1] == ("error", status)
    assert not heads(events) or status in (400, 413)  # a head is only ever given for valid heads


@pytest.mark.parametrize("minor", [b"2", b"9"])
def test_request_in_a_later_http1_minor_version_is_read_as_1_1(minor):
    """RFC 9110 §2.5, RFC 9112 §2.3: a higher minor version of HTTP/1 is processed as 1.1, so the
    proxy answers and forwards it as 1.1 (keep-alive by default, Host required)."""
    events = requests_in(b"GET / HTTP/1." + minor + b"\r\nHost: h\r\n\r\n", eof=False)
    assert events == [("request", "GET", "/", "HTTP/1.1", (("Host", "h"),), None, False, True, "h",
                       frozenset(), False, None), ("end", None)]
    assert requests_in(b"GET / HTTP/1." + minor + b"\r\n\r\n")[-1] == ("error", 400)  # no Host


def test_error_is_sticky():
    parser = RequestParser()
    parser.feed(b"GET / HTTP/9.9\r\n\r\n")
    for _ in range(2):
        with pytest.raises(ProtocolError) as info:
            parser.next_event()
        assert info.value.status == 505 and info.value.reason
    with pytest.raises(ParserStateError):
        parser.start_next()


# ---------------------------------------------------------------------------------------
# Limits are detected early, before the offending message ends


def _raise_status(parser) -> int:
    with pytest.raises(ProtocolError) as info:
        parser.next_event()
    return info.value.status


def test_414_before_the_request_line_ends():
    parser = RequestParser(max_line_bytes=100)
    parser.feed(b"GET /" + b"a" * 100)
    assert _raise_status(parser) == 414


def test_request_line_at_the_limit_is_accepted():
    target = b"/" + b"a" * (100 - len(b"GET  HTTP/1.1") - 1)
    parser = RequestParser(max_line_bytes=100)
    parser.feed(b"GET " + target + b" HTTP/1.1\r\nHost: h\r\n\r\n")
    assert parser.next_event().target == target.decode()


def test_431_as_soon_as_the_buffer_passes_the_limit():
    parser = RequestParser(max_header_bytes=1024)
    parser.feed(b"GET / HTTP/1.1\r\nHost: h\r\n")
    assert parser.next_event() is NEED_DATA
    parser.feed(b"X-Big: " + b"a" * 1000)
    assert _raise_status(parser) == 431


def test_head_exactly_at_the_limit_is_accepted():
    head = b"GET / HTTP/1.1\r\nHost: h\r\nX: "
    head += b"a" * (1024 - len(head) - 4) + b"\r\n\r\n"
    assert len(head) == 1024
    for pieces in ([head], [head[:-1], head[-1:]]):
        parser = RequestParser(max_header_bytes=1024)
        for piece in pieces:
            parser.feed(piece)
        assert isinstance(parser.next_event(), RequestHead)


def test_bare_lf_detected_before_the_head_ends():
    parser = RequestParser()
    parser.feed(b"GET / HTTP/1.1\nHost: h")
    assert _raise_status(parser) == 400


def test_chunked_body_limit_413():
    parser = RequestParser(max_body_bytes=10)
    parser.feed(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n12345678\r\n")
    assert isinstance(parser.next_event(), RequestHead)
    assert parser.next_event() == Data(b"12345678")
    parser.feed(b"3\r\n")
    assert _raise_status(parser) == 413


def _python_calls(action) -> tuple[object, int]:
    """(action's result, how many Python functions it called): a count, not a time, so it is exact."""
    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        if event == "call":
            calls += 1

    sys.setprofile(count)
    try:
        result = action()
    finally:
        sys.setprofile(None)
    return result, calls


TINY_CHUNKS = b"".join(b"%x\r\n%b\r\n" % (size, b"abcdefghijklmno"[:size]) for size in [1, 2, 15, 1, 9, 10] * 200)
TINY_CHUNKS_BODY = b"".join(b"abcdefghijklmno"[:size] for size in [1, 2, 15, 1, 9, 10] * 200)


@pytest.mark.parametrize("make_parser, head", [
    (RequestParser, b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"),
    (lambda: ResponseParser("GET"), b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
], ids=["request", "response"])
def test_many_tiny_chunks_decode_in_bulk(make_parser, head):
    """1,200 chunks of 1-15 bytes in one feed: one Data event, and a handful of Python calls in all
    rather than a few per chunk (a client sending 1-byte chunks cost ~1 s of CPU per 6 MB)."""
    parser = make_parser()
    parser.feed(head + TINY_CHUNKS)
    assert isinstance(parser.next_event(), (RequestHead, ResponseHead))
    event, calls = _python_calls(parser.next_event)
    assert event == Data(TINY_CHUNKS_BODY)
    assert calls < 30
    assert parser.next_event() is NEED_DATA
    parser.feed(b"1\r\nz\r\n0\r\n\r\n")
    assert [parser.next_event(), parser.next_event()] == [Data(b"z"), EndOfMessage(None)]


def test_keep_alive_cycles_stay_within_their_python_call_budget():
    """A head is parsed for every request and every response: the common case of each rule is
    decided inline. The cost per request follows the number of Python calls (scripts/python-cost),
    which unlike a time is exact: 29 and 28 before the inlining, 14 and 20 after."""
    requests = RequestParser()
    request = b"GET /small HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\n\r\n"

    def request_cycle():  # what the handler does on a keep-alive connection
        assert requests.next_event() is NEED_DATA
        requests.feed(request)
        return [requests.next_event(), requests.next_event(), requests.start_next()]

    responses = ResponseParser("GET")
    response = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nContent-Type: text/plain\r\n"
                b"Content-Length: 2\r\nConnection: keep-alive\r\n\r\nok")

    def response_cycle():
        responses.feed(response)
        return [responses.next_event(), responses.next_event(), responses.next_event(),
                responses.start_next("GET")]

    request_cycle(), response_cycle()  # first use: nothing lazily built is counted
    events, calls = _python_calls(request_cycle)
    assert isinstance(events[0], RequestHead) and events[1] == EndOfMessage(None)
    assert calls <= 16
    events, calls = _python_calls(response_cycle)
    assert isinstance(events[0], ResponseHead) and events[1:3] == [Data(b"ok"), EndOfMessage(None)]
    assert calls <= 22


def test_chunked_body_limit_413_in_a_run_of_tiny_chunks():
    parser = RequestParser(max_body_bytes=10)
    parser.feed(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1\r\nx\r\n" * 11)
    assert isinstance(parser.next_event(), RequestHead)
    assert _raise_status(parser) == 413


# ---------------------------------------------------------------------------------------
# Body hand-off: Data events are large, take_buffered / start_next


def test_data_event_returns_everything_buffered_at_once():
    body = b"x" * 100_000
    parser = RequestParser()
    parser.feed(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 100000\r\n\r\n" + body + b"GET")
    assert parser.next_event().content_length == 100_000
    assert parser.next_event() == Data(body)
    assert parser.body_remaining == 0 and parser.next_event() == EndOfMessage(None)


def test_caller_relays_content_length_body_itself():
    parser = RequestParser()
    parser.feed(b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nhello")
    assert parser.next_event().method == "POST"
    assert parser.body_remaining == 10
    assert parser.take_buffered() == b"hello" and parser.body_remaining == 5
    parser.start_next()  # caller reads the 5 remaining body bytes from the socket itself
    parser.feed(b"GET /b HTTP/1.1\r\nHost: h\r\n\r\n")
    assert parser.next_event().target == "/b"


def test_take_buffered_keeps_the_pipelined_next_request():
    parser = RequestParser()
    parser.feed(b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabcGET /b HTTP/1.1\r\nHost: h\r\n\r\n")
    parser.next_event()
    assert parser.take_buffered() == b"abc" and parser.body_remaining == 0
    assert parser.has_buffered_data
    assert parser.next_event() == EndOfMessage(None)
    parser.start_next()
    assert parser.next_event().target == "/b"


def test_take_buffered_after_upgrade_request():
    parser = RequestParser()
    parser.feed(b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x05hello")
    assert parser.next_event().upgrade == "websocket"
    assert parser.next_event() == EndOfMessage(None)
    assert parser.take_buffered() == b"\x81\x05hello"
    assert parser.take_buffered() == b"" and not parser.has_buffered_data


def test_next_event_after_end_without_start_next_is_a_caller_bug():
    parser = RequestParser()
    parser.feed(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    parser.next_event()
    parser.next_event()
    with pytest.raises(ParserStateError):
        parser.next_event()


def test_encode_chunk():
    assert encode_chunk(b"hello") == b"5\r\nhello\r\n"
    assert encode_chunk(b"x" * 255) == b"ff\r\n" + b"x" * 255 + b"\r\n"
    assert encode_chunk(b"") == b""
    assert LAST_CHUNK == b"0\r\n\r\n"


# ---------------------------------------------------------------------------------------
# Responses


def responses_in(method: str, data: bytes, eof=True) -> list:
    return run_all_splits(lambda: ResponseParser(method), data, eof)


def test_response_content_length():
    events = responses_in("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", eof=False)
    assert events == [("response", 200, "OK", "HTTP/1.1", (("Content-Length", "5"),), 5, False, True),
                      ("data", b"hello"), ("end", None)]


def test_response_chunked_with_trailers():
    data = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3;ext\r\nabc\r\n2\r\nde\r\n0\r\nX-T: 1\r\n\r\n")
    events = responses_in("GET", data, eof=False)
    assert events[0][6] is True and events[0][5] is None
    assert events[1:] == [("data", b"abcde"), ("end", (("X-T", "1"),))]


def test_response_close_delimited():
    parser = ResponseParser("GET")
    parser.feed(b"HTTP/1.1 200 OK\r\nServer: x\r\n\r\npart1")
    head = parser.next_event()
    assert head.keep_alive is False and head.content_length is None and parser.body_close_delimited
    assert parser.next_event() == Data(b"part1")
    assert parser.next_event() is NEED_DATA
    parser.feed(b"part2")
    parser.feed_eof()
    assert parser.next_event() == Data(b"part2")
    assert parser.next_event() == EndOfMessage(None)
    events = responses_in("GET", b"HTTP/1.0 200 OK\r\n\r\nbody")
    assert events[1:] == [("data", b"body"), ("end", None)]


def test_response_te_without_chunked_is_close_delimited():
    events = responses_in("GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nzzz")
    assert events[0][7] is False and events[1:] == [("data", b"zzz"), ("end", None)]


def test_response_te_and_content_length_te_wins_no_keep_alive():
    data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 99\r\n\r\n1\r\nx\r\n0\r\n\r\n"
    events = responses_in("GET", data, eof=False)
    assert events[0][6] is True and events[0][7] is False
    assert events[1:] == [("data", b"x"), ("end", None)]


@pytest.mark.parametrize("method, status_line", [
    ("HEAD", b"HTTP/1.1 200 OK"), ("GET", b"HTTP/1.1 204 No Content"), ("GET", b"HTTP/1.1 304 Not Modified")])
def test_responses_without_body(method, status_line):
    data = status_line + b"\r\nContent-Length: 50\r\nTransfer-Encoding: chunked\r\n\r\n"
    data += b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"  # next response on the connection
    events = responses_in(method, data, eof=False)
    assert events[0][5] == 0 and events[1] == ("end", None)
    assert events[2][1] == 200 and events[3] == ("end", None)


def test_interim_responses_then_final():
    data = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"
            b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")
    events = responses_in("POST", data, eof=False)
    assert [e[1] for e in events if e[0] == "response"] == [100, 103, 201]
    assert events[-2:] == [("data", b"ok"), ("end", None)]


def test_switching_protocols_stops_and_hands_over_the_rest():
    parser = ResponseParser("GET")
    parser.feed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x02hi")
    head = parser.next_event()
    assert head.status == 101 and parser.switched
    assert parser.next_event() is NEED_DATA
    assert parser.take_buffered() == b"\x81\x02hi"


def test_status_line_without_reason():
    events = responses_in("GET", b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n", eof=False)
    assert events[0][1:3] == (200, "")


def test_response_parser_start_next_with_new_method():
    parser = ResponseParser("GET")
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nxHTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n")
    assert [type(parser.next_event()) for _ in range(3)] == [ResponseHead, Data, EndOfMessage]
    parser.start_next("HEAD")
    assert parser.next_event().content_length == 0
    assert parser.next_event() == EndOfMessage(None)


INVALID_RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\nx",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/2.0 200 OK\r\n\r\n",
    b"HTTP/1.1 20 OK\r\n\r\n",
    b"HTTP/1.1 099 Weird\r\n\r\n",
    b"HTTP/1.1 600 Weird\r\n\r\n",
    b"http/1.1 200 OK\r\n\r\n",
    b"HTTP/1.1  200 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
    b"HTTP/1.1 200 OK\r\nBad Header: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: 1\r\n folded\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nxy",
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",   # truncated by EOF
    b"HTTP/1.1 200 OK\r\n",                                  # head truncated by EOF
    b"",                                                     # closed without a response
    b"\r\n",
]


@pytest.mark.parametrize("data", INVALID_RESPONSES, ids=range(len(INVALID_RESPONSES)))
def test_invalid_response_is_502(data):
    events = run(lambda: ResponseParser("GET"), [data]) if not data else responses_in("GET", data)
    assert events[-1] == ("error", 502)


def test_response_in_a_later_http1_minor_version_is_read_as_1_1():
    """RFC 9110 §2.5: a higher minor version within major 1 is processed as the highest we know."""
    events = run(lambda: ResponseParser("GET"), [b"HTTP/1.2 200 OK\r\nContent-Length: 2\r\n\r\nok"], eof=False)
    assert events[0][:4] == ("response", 200, "OK", "HTTP/1.1")
    assert events[0][-1] is True  # keep-alive, as 1.1
    assert events[1:] == [("data", b"ok"), ("end", None)]


def test_forbidden_response_trailers_are_dropped_not_fatal():
    """The body is already relayed when trailers come: framing fields among them are ignored
    (RFC 9110 §6.5.1), the others kept, and the response completes."""
    data = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n"
            b"0\r\nContent-Length: 1\r\nX-Checksum: 7\r\nTransfer-Encoding: gzip\r\n\r\n")
    events = run(lambda: ResponseParser("GET"), [data], eof=False)
    assert events[1:] == [("data", b"ok"), ("end", (("X-Checksum", "7"),))]


def test_response_head_limit_is_502():
    parser = ResponseParser("GET", max_header_bytes=256)
    parser.feed(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 300)
    assert _raise_status(parser) == 502


# ---------------------------------------------------------------------------------------
# Property tests


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.integers(min_value=1, max_value=64))
def test_arbitrary_bytes_only_raise_protocol_error(data, piece):
    for make_parser in (RequestParser, lambda: ResponseParser("GET")):
        pieces = [data[i:i + piece] for i in range(0, len(data), piece)]
        run(make_parser, pieces)  # anything but ProtocolError propagates and fails


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"GET / HTTP/1.1\r\n", b"Host: h\r\n", b"\r\n", b"\n", b"\r",
                                 b"Content-Length: 3\r\n", b"Transfer-Encoding: chunked\r\n",
                                 b"3\r\nabc\r\n", b"0\r\n", b"HTTP/1.1 200 OK\r\n", b" ", b":",
                                 b"X: y\r\n", b"abc"]), max_size=30))
def test_http_shaped_garbage_only_raises_protocol_error(parts):
    data = b"".join(parts)
    for make_parser in (RequestParser, lambda: ResponseParser("GET")):
        whole = comparable(run(make_parser, [data]))
        assert whole == comparable(run(make_parser, [data[i:i + 1] for i in range(len(data))]))


def serialise(events: list) -> bytes:
    """Re-encode parsed request events (what the proxy does on the way out)."""
    out = b""
    for event in events:
        if event[0] == "request":
            _, method, target, version, raw, _cl, chunked = event[:7]
            out += f"{method} {target} {version}\r\n".encode("latin-1")
            out += b"".join(f"{n}: {v}\r\n".encode("latin-1") for n, v in raw) + b"\r\n"
        elif event[0] == "data":
            out += encode_chunk(event[1]) if chunked else event[1]
        elif event[0] == "end" and chunked:
            out += LAST_CHUNK
    return out


@settings(max_examples=200, deadline=None)
@given(valid_requests(), st.randoms(use_true_random=False))
def test_valid_request_round_trips(data, rng):
    cut = rng.randint(0, len(data))
    events = run(RequestParser, [data[:cut], data[cut:]])
    assert events and events[-1][0] == "end", events
    assert run(RequestParser, [serialise(events)]) == events


# ---------------------------------------------------------------------------------------
# Known heads: parsers sharing a table parse a repeated bodiless head once

def _events_through(parser, data: bytes) -> list:
    """Every event ``data`` gives, the next message started after each end, until more is needed."""
    parser.feed(data)
    events = []
    for _ in range(100):  # bounded: a few messages per feed
        event = parser.next_event()
        if event is NEED_DATA:
            return events
        events.append(event)
        if isinstance(event, EndOfMessage):
            parser.start_next()
    raise AssertionError("parser never asked for more data")


def _heads_through(parser: RequestParser, data: bytes) -> list:
    return [event for event in _events_through(parser, data) if isinstance(event, RequestHead)]


def test_parsers_sharing_a_table_share_a_repeated_bodiless_head():
    known: dict = {}
    get = b"GET /a HTTP/1.1\r\nHost: x\r\nUser-Agent: wrk\r\n\r\n"
    first, = _heads_through(RequestParser(known_heads=known), get)
    second, third = _heads_through(RequestParser(known_heads=known), get + get)
    assert second is first and third is first  # parsed once, on another connection too
    assert first == _heads_through(RequestParser(), get)[0]  # what a parser without the table makes
    # A head with a body is parsed every time: its framing sets what the parser reads next.
    post = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nok"
    parser = RequestParser(known_heads=known)
    one, two = _heads_through(parser, post + post)
    assert one == two and one is not two and len(known) == 1
    # A known head after a body, and a pipelined body after a known head: framing stays right.
    parser.feed(get + post)
    assert parser.next_event() is first and parser.next_event() == EndOfMessage()
    parser.start_next()
    assert parser.next_event().method == "POST" and parser.next_event() == Data(b"ok")


def test_a_known_head_keeps_the_limits_and_splits_of_a_parsed_one():
    known: dict = {}
    get = b"GET /a HTTP/1.1\r\nHost: x\r\nUser-Agent: wrk\r\n\r\n"
    first, = _heads_through(RequestParser(known_heads=known), get)
    # Fed a byte at a time, after empty lines, or pipelined behind another: the same head.
    parser = RequestParser(known_heads=known)
    for byte in get[:-1]:
        assert _heads_through(parser, bytes([byte])) == []
    assert _heads_through(parser, get[-1:]) == [first]
    assert _heads_through(RequestParser(known_heads=known), b"\r\n\r\n" + get)[0] == first
    assert _heads_through(RequestParser(known_heads=known), get + get + get) == [first] * 3
    # A parser with smaller limits (a reload lowered them) refuses the known text as it would parse it.
    with pytest.raises(ProtocolError) as refused:
        _heads_through(RequestParser(max_header_bytes=len(get) - 1, known_heads=known), get)
    assert refused.value.status == 431
    with pytest.raises(ProtocolError) as refused:
        _heads_through(RequestParser(max_line_bytes=10, known_heads=known), get + b"\r\n")
    assert refused.value.status == 414
    # A response parser reused for a HEAD request after a GET stops taking heads from the table.
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"
    responses: dict = {}
    parser = ResponseParser("GET", known_heads=responses)
    head, _, _ = _events_through(parser, ok + b"hi")
    parser.start_next("HEAD")
    head_reply, end = _events_through(parser, ok)
    assert head_reply is not head and head_reply.content_length == 0 and end == EndOfMessage()
    parser.start_next("GET")
    assert _events_through(parser, ok + b"hi")[0] is head


def test_known_heads_table_is_bounded_and_never_holds_refusals():
    from proxy.http import http1
    known: dict = {}
    parser = RequestParser(known_heads=known)
    for n in range(http1.KNOWN_HEADS_MAX + 5):
        _heads_through(parser, b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % n)
    assert 0 < len(known) <= http1.KNOWN_HEADS_MAX
    long_head = b"GET /" + b"x" * http1.KNOWN_HEAD_MAX_CHARS + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    assert _heads_through(parser, long_head) and not any(len(text) > http1.KNOWN_HEAD_MAX_CHARS for text in known)
    known.clear()
    with pytest.raises(ProtocolError):
        _heads_through(RequestParser(known_heads=known), b"GET /a HTTP/1.1\r\n\r\n")  # no Host: 400
    assert known == {}


def test_response_parsers_sharing_a_table_share_a_repeated_head_framed_by_length():
    known: dict = {}
    ok = b"HTTP/1.1 200 OK\r\nDate: Mon, 30 Nov 2026 02:00:00 GMT\r\nContent-Length: 2\r\n\r\nhi"
    first, body, end = _events_through(ResponseParser("GET", known_heads=known), ok)
    again = _events_through(ResponseParser("POST", known_heads=known), ok)
    assert again == [first, Data(b"hi"), end] and again[0] is first  # parsed once, framing kept
    assert first == _events_through(ResponseParser("GET"), ok)[0]  # as a parser without the table
    # The same text answers a HEAD request with no body: never taken from (or put in) the table.
    head_reply, = _events_through(ResponseParser("HEAD", known_heads=known), ok[:-2])[:-1]
    assert head_reply.content_length == 0 and head_reply is not first and list(known.values()) == [first]
    # Chunked, close-delimited and interim heads are parsed every time.
    for reply in (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                  b"HTTP/1.1 200 OK\r\n\r\n", b"HTTP/1.1 100 Continue\r\n\r\n"):
        _events_through(ResponseParser("GET", known_heads=known), reply)
    assert list(known.values()) == [first]
