"""Property tests on top of tests/test_http1.py's (which cover arbitrary bytes, HTTP-shaped garbage and
the request round trip): mutations of valid requests, the response round trip, the proxy's own
outbound head, and a bound on the work per byte (no hang).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.http.forwarding import Outbound, build_request_head
from proxy.http.http1 import (LAST_CHUNK, NEED_DATA, EndOfMessage, ProtocolError, RequestHead, RequestParser,
                         ResponseParser, encode_chunk)
from tests.support.http1_feeding import comparable, run, valid_requests

# Bytes that the smuggling research finds parsers disagree on.
DANGEROUS = [b"\r", b"\n", b"\x00", b" ", b"\t", b"\x0b", b",", b";", b":", b"-", b"_", b"0", b"x", b"\xff",
             b"\r\n", b"\r\n\r\n", b"Transfer-Encoding: chunked\r\n", b"Content-Length: 5\r\n", b"Host: b\r\n",
             b"0\r\n\r\n", b"HTTP/1.1"]


@st.composite
def mutated_requests(draw):
    data = bytearray(draw(valid_requests()))
    for _ in range(draw(st.integers(1, 3))):
        position = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["insert", "replace", "delete"]))
        piece = draw(st.sampled_from(DANGEROUS))
        if action == "insert":
            data[position:position] = piece
        elif action == "replace" and position < len(data):
            data[position:position + 1] = piece
        elif position < len(data):
            del data[position]
    return bytes(data)


def bounded_events(parser, data: bytes) -> int:
    """Feed byte by byte; count next_event calls. A parser that loops without progress fails here."""
    calls = 0
    for index in range(len(data)):
        parser.feed(data[index:index + 1])
        for _ in range(8):  # one byte can complete at most a head, a Data and an EndOfMessage
            calls += 1
            event = parser.next_event()
            if event is NEED_DATA:
                break
            if type(event) is EndOfMessage:
                parser.start_next()
        else:
            raise AssertionError("a single byte produced more than 8 events")
    return calls


@settings(max_examples=400, deadline=None)
@given(mutated_requests())
def test_mutated_requests_whole_equals_bytewise_and_only_protocol_errors(data):
    whole = comparable(run(RequestParser, [data]))
    bytewise = comparable(run(RequestParser, [data[i:i + 1] for i in range(len(data))]))
    assert whole == bytewise
    try:
        bounded_events(RequestParser(), data)
    except ProtocolError:
        pass


@st.composite
def valid_responses(draw):
    status = draw(st.sampled_from([200, 201, 301, 404, 500, 503]))
    reason = draw(st.sampled_from(["OK", "", "Whatever Reason"]))
    body = draw(st.binary(max_size=60))
    headers = draw(st.lists(st.tuples(st.sampled_from(["X-A", "Set-Cookie", "Cache-Control", "ETag"]),
                                      st.text(alphabet="abc=; /,", max_size=12).map(str.strip)), max_size=4))
    if draw(st.booleans()):
        headers.append(("Transfer-Encoding", "chunked"))
        cut = draw(st.integers(0, len(body)))
        encoded = encode_chunk(body[:cut]) + encode_chunk(body[cut:]) + LAST_CHUNK
    else:
        headers.append(("Content-Length", str(len(body))))
        encoded = body
    head = f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers) + "\r\n"
    return head.encode("latin-1") + encoded, body


def reserialise_response(events) -> bytes:
    _, status, reason, version, raw, _length, chunked, _keep = events[0]
    out = f"{version} {status} {reason}\r\n".encode("latin-1")
    out += b"".join(f"{n}: {v}\r\n".encode("latin-1") for n, v in raw) + b"\r\n"
    body = b"".join(e[1] for e in events if e[0] == "data")
    return out + ((encode_chunk(body) + LAST_CHUNK) if chunked else body)


@settings(max_examples=300, deadline=None)
@given(valid_responses(), st.integers(1, 17))
def test_valid_response_round_trips(message, piece):
    data, body = message
    pieces = [data[i:i + piece] for i in range(0, len(data), piece)]
    events = run(lambda: ResponseParser("GET"), pieces, eof=False)
    assert events[-1][0] == "end", events
    assert b"".join(e[1] for e in events if e[0] == "data") == body
    again = run(lambda: ResponseParser("GET"), [reserialise_response(events)], eof=False)
    assert again == events


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.sampled_from(["GET", "HEAD", "POST"]))
def test_response_parser_bounded_on_garbage(data, method):
    try:
        bounded_events(ResponseParser(method), data)
    except ProtocolError as exc:
        assert exc.status == 502


def _head_of(data: bytes) -> RequestHead:
    parser = RequestParser()
    parser.feed(data)
    head = parser.next_event()
    assert isinstance(head, RequestHead)
    return head


@settings(max_examples=300, deadline=None)
@given(valid_requests())
def test_the_proxys_outbound_head_parses_strictly_to_the_same_request(data):
    """What build_request_head sends upstream is itself a strict, unambiguous message."""
    parser = RequestParser()
    parser.feed(data)
    try:
        request = parser.next_event()
    except ProtocolError:
        return  # a few generated requests are refused (e.g. 1.0 + chunked): nothing to forward
    body_mode = "chunked" if request.chunked else ("length" if request.content_length else "none")
    out = Outbound(request.method, request.target, request.host or "upstream:80", "127.0.0.1", "http",
                   body=body_mode, request_id="rid")
    head = build_request_head(request, out)
    forwarded = _head_of(head + (LAST_CHUNK if request.chunked else b""))
    assert (forwarded.method, forwarded.target, forwarded.version) == (request.method, request.target,
                                                                      "HTTP/1.1")
    expected_length = request.content_length if body_mode == "length" else None
    assert (forwarded.content_length, forwarded.chunked) == (expected_length, request.chunked)
    kept = [(n, v) for n, v in request.headers if n.lower() not in
            {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "te", "trailer",
             "upgrade", "proxy-connection", "proxy-authenticate", "proxy-authorization", "x-forwarded-for",
             "x-forwarded-proto", "x-forwarded-host", "via", "x-request-id"}
            and n.lower() not in request.connection_tokens]
    assert [h for h in forwarded.headers if h in kept] == kept
    assert forwarded.headers.get_all("x-forwarded-for")[-1].endswith("127.0.0.1")


@st.composite
def chunked_bodies(draw):
    """A chunked body of mostly tiny chunks, sizes in any hex case, some with leading zeros or
    extensions (those take the general path, the others the bulk one), and optional trailers."""
    body = b""
    encoded = b""
    for size in draw(st.lists(st.one_of(st.integers(1, 15), st.integers(16, 40)), max_size=30)):
        data = draw(st.binary(min_size=size, max_size=size))
        digits = draw(st.sampled_from([b"%x", b"%X", b"0%x"])) % size
        extension = draw(st.sampled_from([b"", b"", b"", b";a", b" ; b=\"c\""]))
        body += data
        encoded += digits + extension + b"\r\n" + data + b"\r\n"
    trailers = draw(st.sampled_from([b"", b"X-Sum: 1\r\n"]))
    return encoded + b"0\r\n" + trailers + b"\r\n", body


_CHUNKED_HEADS = {
    "request": (RequestParser, b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"),
    "response": (lambda: ResponseParser("GET"), b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
}


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted({cut % (len(data) + 1) for cut in cuts}), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


@settings(max_examples=300, deadline=None)
@given(chunked_bodies(), st.sampled_from(sorted(_CHUNKED_HEADS)), st.lists(st.integers(0, 10_000), max_size=6))
def test_chunked_bodies_decode_the_same_at_any_split(message, direction, cuts):
    encoded, body = message
    make_parser, head = _CHUNKED_HEADS[direction]
    data = head + encoded
    events = run(make_parser, _split(data, cuts), eof=False)
    assert b"".join(e[1] for e in events if e[0] == "data") == body
    assert events[-1][0] == "end"
    assert events == run(make_parser, [data[i:i + 1] for i in range(len(data))], eof=False)


@settings(max_examples=400, deadline=None)
@given(chunked_bodies(), st.sampled_from(sorted(_CHUNKED_HEADS)), st.integers(0, 10_000),
       st.sampled_from(["insert", "replace", "delete"]), st.sampled_from(DANGEROUS), st.lists(st.integers(0, 10_000), max_size=6))
def test_mutated_chunked_bodies_split_anywhere_agree_with_bytewise(message, direction, position, action, piece, cuts):
    """A run of tiny chunks is decoded in bulk when it is buffered whole, one chunk at a time when
    fed byte by byte: a damaged body must get the same verdict either way."""
    encoded, _ = message
    make_parser, head = _CHUNKED_HEADS[direction]
    body = bytearray(encoded)
    position %= len(body) + 1
    if action == "insert":
        body[position:position] = piece
    elif action == "replace":
        body[position:position + 1] = piece
    else:
        del body[position:position + 1]
    data = head + bytes(body)
    bytewise = comparable(run(make_parser, [data[i:i + 1] for i in range(len(data))]))
    assert comparable(run(make_parser, [data])) == bytewise
    assert comparable(run(make_parser, _split(data, cuts))) == bytewise
