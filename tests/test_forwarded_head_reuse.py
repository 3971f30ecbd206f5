"""A known request head (one object for a repeated request) keeps the outbound heads made of it: every
route, server, client and request id combination still gets exactly the head a fresh one would."""

from __future__ import annotations

import itertools

from proxy.http.forwarding import FORWARDED_PER_HEAD, Outbound, RouteHeaders, build_request_head
from proxy.http.http1 import RequestParser

REQUEST = (b"GET /a?b=1 HTTP/1.1\r\nHost: example.test\r\nX-Forwarded-For: 10.0.0.9\r\nVia: 1.0 edge\r\n"
           b"Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nUser-Agent: t\r\n\r\n")
ROUTES = (RouteHeaders(), RouteHeaders((("X-Route", "r"), ("Host", "set.test"))),
          RouteHeaders((("X-Forwarded-For", "mine"),)))

# Every input of the outbound head but the request itself.
CASES = list(itertools.product(ROUTES, ("/a?b=1", "/b"), ("127.0.0.1:1", "127.0.0.1:2"), ("10.1.1.1", "10.1.1.2"),
                               ("http", "https"), (None, "id-1", "id-2"), (True, False)))


def _parsed(known: dict | None = None):
    parser = RequestParser(known_heads=known)
    parser.feed(REQUEST)
    return parser.next_event()


def _built(head, case) -> bytes:
    route, target, host, client, scheme, request_id, trusted = case
    return build_request_head(head, Outbound(head.method, target, host, client, scheme, route,
                                             request_id=request_id, trusted_forwarded=trusted))


def test_a_known_head_forwards_every_case_as_a_fresh_one_would():
    known: dict = {}
    shared = _parsed(known)
    assert _parsed(known) is shared  # the table gives the same object back: what is reused here
    fresh = {case: _built(_parsed(), case) for case in CASES}
    for earlier, case in itertools.product(CASES[::7], CASES):  # each case after many others
        _built(shared, earlier)
        assert _built(shared, case) == fresh[case], (earlier, case)
    assert 0 < len(shared.forwarded) <= FORWARDED_PER_HEAD  # kept, and bounded


def test_two_requests_differing_in_their_id_only_share_the_rest():
    known: dict = {}
    shared = _parsed(known)
    case = next(case for case in CASES if case[5] == "id-1")
    first = _built(shared, case)
    assert len(shared.forwarded) == 1
    second = _built(shared, case[:5] + ("another-id",) + case[6:])
    assert len(shared.forwarded) == 1
    assert b"X-Request-Id: id-1\r\n" in first
    assert first.replace(b"X-Request-Id: id-1", b"X-Request-Id: another-id") == second


def test_a_head_parsed_once_keeps_nothing():
    head = _parsed()  # no table: it is not met again, so nothing is kept on it
    _built(head, CASES[0])
    assert head.forwarded is None


def test_what_the_head_was_forwarded_as_is_not_part_of_its_value():
    known: dict = {}
    shared = _parsed(known)
    _built(shared, CASES[0])
    assert shared == _parsed() and "forwarded" not in repr(shared)
