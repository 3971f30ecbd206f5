"""A known response head (one object for a repeated response) is relayed from the fields it copied the
first time: each framing, request id and rate-limit combination still gets its own head."""

from __future__ import annotations

import itertools

from proxy.http.forwarding import build_response_head
from proxy.http.http1 import ResponseParser

REPLY = (b"HTTP/1.1 200 OK\r\nServer: backend\r\nX-Request-Id: theirs\r\nRateLimit-Limit: 9\r\n"
         b"Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nContent-Length: 2\r\n\r\n")

# (framing, request id, extra fields, keep-alive, client version): every input the head depends on.
CASES = list(itertools.product(("length", "chunked", "close", "none"), (None, "ours"),
                               ("", "RateLimit-Limit: 5\r\n"), (True, False), ("HTTP/1.1", "HTTP/1.0")))


def _parsed(known: dict | None = None):
    parser = ResponseParser("GET", known_heads=known)
    parser.feed(REPLY)
    return parser.next_event()


def _built(head, case) -> bytes:
    framing, request_id, extra_fields, keep_alive, version = case
    return build_response_head(head, framing=framing, keep_alive=keep_alive, client_version=version,
                               request_id=request_id, extra_fields=extra_fields)


def test_a_known_head_keeps_what_it_copied_and_relays_every_case_as_a_fresh_one():
    known: dict = {}
    shared = _parsed(known)
    assert _parsed(known) is shared  # the table gives the same object back: what is reused here
    for earlier, case in itertools.product(CASES, CASES):  # every case right after every other
        _built(shared, earlier)
        assert _built(shared, case) == _built(_parsed(), case), (earlier, case)
    _built(shared, CASES[0])
    assert shared.relayed_fields is not None  # the fields were kept, not copied each time
    assert _built(shared, CASES[0]) == _built(_parsed(), CASES[0])


def test_what_the_head_relays_is_not_part_of_its_value():
    known: dict = {}
    shared = _parsed(known)
    _built(shared, CASES[0])
    assert shared == _parsed() and "relayed_fields" not in repr(shared)
