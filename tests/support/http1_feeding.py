"""Feeding proxy.http.http1's parsers: ``run`` feeds pieces and lists the events, ``splits`` cuts a
message whole, byte by byte and at seeded random points, ``run_all_splits`` checks every cut gives the
same events; ``valid_requests`` is a hypothesis strategy for well-formed requests."""

from __future__ import annotations

import random

from hypothesis import strategies as st

from proxy.http.http1 import (LAST_CHUNK, NEED_DATA, Data, EndOfMessage, ProtocolError, RequestHead, ResponseHead,
                              encode_chunk)

MAX_EVENTS = 10_000  # every drain loop is bounded


# ---------------------------------------------------------------------------------------
# Feeding helpers


def _summary(event):
    if isinstance(event, RequestHead):
        return ("request", event.method, event.target, event.version, tuple(event.headers.raw),
                event.content_length, event.chunked, event.keep_alive, event.host,
                event.connection_tokens, event.expect_continue, event.upgrade)
    if isinstance(event, ResponseHead):
        return ("response", event.status, event.reason, event.version,
                tuple(event.headers.raw), event.content_length, event.chunked, event.keep_alive)
    if isinstance(event, Data):
        return ("data", event.data)
    if isinstance(event, EndOfMessage):
        return ("end", tuple(event.trailers.raw) if event.trailers is not None else None)
    raise AssertionError(f"unexpected event {event!r}")


def _drain(parser, out: list) -> None:
    for _ in range(MAX_EVENTS):
        event = parser.next_event()
        if event is NEED_DATA:
            return
        out.append(_summary(event))
        if isinstance(event, EndOfMessage):
            if parser.peer_closed:
                return  # a close-delimited body ended the connection
            parser.start_next()
        if isinstance(event, ResponseHead) and event.status == 101:
            return
    raise AssertionError("parser produced too many events")


def _merge_data(events: list) -> list:
    merged: list = []
    for event in events:
        if event[0] == "data" and merged and merged[-1][0] == "data":
            merged[-1] = ("data", merged[-1][1] + event[1])
        else:
            merged.append(event)
    return merged


def run(make_parser, pieces, eof=True) -> list:
    """Events for the pieces, Data merged; a ProtocolError ends the list as ("error", status)."""
    parser = make_parser()
    events: list = []
    try:
        for piece in pieces:
            parser.feed(piece)
            _drain(parser, events)
        if eof:
            parser.feed_eof()
            _drain(parser, events)
    except ProtocolError as exc:
        events.append(("error", exc.status))
    return _merge_data(events)


def splits(data: bytes):
    """Whole, byte by byte, and three seeded random splittings."""
    yield "whole", [data]
    yield "bytewise", [data[i:i + 1] for i in range(len(data))]
    rng = random.Random(len(data))
    for n in range(3):
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 8))))
        bounds = [0, *cuts, len(data)]
        yield f"random{n}", [data[a:b] for a, b in zip(bounds, bounds[1:])]


def comparable(events: list) -> list:
    """How much body is handed out before an error depends on the split; the rest must not."""
    if events and events[-1][0] == "error":
        return [e for e in events if e[0] != "data"]
    return events


def run_all_splits(make_parser, data: bytes, eof=True) -> list:
    results = {name: comparable(run(make_parser, pieces, eof)) for name, pieces in splits(data)}
    first = results["whole"]
    for name, events in results.items():
        assert events == first, f"{name} split differs"
    return first


_token = st.text(alphabet="!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
                 min_size=1, max_size=12)
_value = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF,
                                        blacklist_characters="\x7f"), max_size=30).map(lambda s: s.strip(" "))
_framing_names = {"host", "content-length", "transfer-encoding", "connection", "upgrade", "expect"}
_extra_header = st.tuples(_token, _value).filter(lambda h: h[0].lower() not in _framing_names)


@st.composite
def valid_requests(draw):
    """A valid request (Content-Length or chunked body), as bytes, for property tests."""
    method = draw(_token.filter(lambda m: m != "CONNECT"))
    target = "/" + draw(st.text(alphabet="abcxyz019/-._~?=&%!$'()*+,;:@", max_size=20))
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.0"]))
    headers = [("Host", draw(st.sampled_from(["example.com", "a.b:8080", "[::1]:80"])))]
    headers += draw(st.lists(_extra_header, max_size=6))
    body = draw(st.binary(max_size=50))
    chunked = version == "HTTP/1.1" and draw(st.booleans())
    if chunked:
        headers.append(("Transfer-Encoding", "chunked"))
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
        bounds = [0, *cuts, len(body)]
        encoded = b"".join(encode_chunk(body[a:b]) for a, b in zip(bounds, bounds[1:])) + LAST_CHUNK
    else:
        headers.append(("Content-Length", str(len(body))))
        encoded = body
    head = f"{method} {target} {version}\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers) + "\r\n"
    return head.encode("latin-1") + encoded
