"""Build the outbound request head and the head relayed back to the client.

The inbound message is never mutated; the outbound one is built from it (Go's ``ProxyRequest{In, Out}``):
hop-by-hop headers are dropped, then the proxy's own headers are added.
"""

from __future__ import annotations

# RFC 9110 §7.6.1 plus the historical ones Go's reverseproxy also strips. Lowercase.
HOP_BY_HOP = frozenset({
    "connection", "proxy-connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade",
    "proxy-authenticate", "proxy-authorization",
})
# Headers the proxy sets itself on the way out; a client's copies are replaced (or appended to).
_PROXY_SET = frozenset({"host", "x-forwarded-proto", "x-forwarded-host", "content-length"})
VIA = "1.1 pyproxy"


# RFC 9113 §3.1 deprecates the "h2c" upgrade. Relayed, it would turn the client's connection into an
# HTTP/2 connection straight to the backend, every later request on it past the proxy's routing ("h2c
# smuggling", Bishop Fox 2020). The request is forwarded without it: the server answers in HTTP/1.1.
_NEVER_TUNNELLED = frozenset({"h2c"})


def tunnel_upgrade(upgrade: str | None) -> str | None:
    """The Upgrade offer to forward: the client's protocols minus those never tunnelled (None if none left)."""
    if upgrade is None:
        return None
    offered = [token.strip(" \t") for token in upgrade.split(",")]
    kept = [token for token in offered if token and token.split("/", 1)[0].lower() not in _NEVER_TUNNELLED]
    return ", ".join(kept) if kept else None


# Request fields never copied where they stand: hop-by-hop ones, the ones the proxy sets itself, and
# X-Forwarded-For / Via, whose values are merged into the proxy's own line. Which further fields are
# skipped depends on two per-request facts, so the four sets are built once, keyed by them:
# (client is a trusted proxy, a request id is set).
_REQUEST_SKIP = HOP_BY_HOP | _PROXY_SET | {"x-forwarded-for", "via"}
_REQUEST_SKIP_BY_CASE = {
    (trusted, with_id): _REQUEST_SKIP
    | (frozenset() if trusted else {"forwarded"})  # an untrusted client's Forwarded is dropped
    | ({"x-request-id"} if with_id else frozenset())  # replaced by ours
    for trusted in (True, False) for with_id in (True, False)
}


# set_headers never write framing or hop-by-hop fields: a second Content-Length or a Transfer-Encoding
# would desynchronise the upstream connection (RFC 9112 §6.3), and these describe our hop, not the route.
# Nor X-Request-Id: the id the backend sees is the one returned to the client and logged.
_NOT_SETTABLE = HOP_BY_HOP | {"content-length", "x-request-id"}
# The proxy's own fields, in the order they follow the copied ones; a route's set_headers replace any
# of them. The numbers are the arguments of RouteHeaders.proxy_fields.format().
_PROXY_FIELDS = (("x-forwarded-for", "X-Forwarded-For: {0}\r\n"), ("x-forwarded-proto", "X-Forwarded-Proto: {1}\r\n"),
                 ("x-forwarded-host", "X-Forwarded-Host: {2}\r\n"), ("via", "Via: {3}\r\n"))


class RouteHeaders:
    """What a route's ``set_headers`` make of every request head it forwards, worked out once when the
    config loads, so that a request only formats its own values: the fields skipped when copying,
    the proxy's own fields left to write (a format string), the route's Host and its other lines."""

    __slots__ = ("skip_by_case", "proxy_fields", "host", "set_lines")

    def __init__(self, set_headers: tuple[tuple[str, str], ...] = (), dropped: frozenset[str] = frozenset()):
        # dropped: lowercase names never forwarded on this route (Authorization behind basic_auth)
        overridden = frozenset(name.lower() for name, _ in set_headers)
        fields = [(name, value) for name, value in set_headers if name.lower() not in _NOT_SETTABLE]
        # One Host, the route's: two make the request invalid (RFC 9112 §3.2).
        self.host = next((value for name, value in fields if name.lower() == "host"), None)
        self.set_lines = "".join(f"{name}: {value}\r\n" for name, value in fields if name.lower() != "host")
        self.skip_by_case = {case: skip | overridden | dropped for case, skip in _REQUEST_SKIP_BY_CASE.items()}
        self.proxy_fields = "".join(line for name, line in _PROXY_FIELDS if name not in overridden)


NO_SET_HEADERS = RouteHeaders()


class Outbound:
    """What the proxy decided about one forwarded request (the parts that vary per attempt stay out)."""

    __slots__ = ("method", "target", "host", "client_ip", "scheme", "route_headers", "body", "upgrade",
                 "request_id", "trusted_forwarded")

    def __init__(self, method: str, target: str, host: str, client_ip: str, scheme: str,
                 route_headers: RouteHeaders = NO_SET_HEADERS, body: str = "none", upgrade: str | None = None,
                 request_id: str | None = None, trusted_forwarded: bool = True):
        self.method = method
        self.target = target
        self.host = host  # the Host header to send upstream
        self.client_ip = client_ip
        self.scheme = scheme
        self.route_headers = route_headers  # the route's set_headers, prepared
        self.body = body  # "none" | "length" | "chunked"
        self.upgrade = upgrade
        self.request_id = request_id
        # False when the client is not a trusted proxy: its X-Forwarded-For/Forwarded are dropped.
        self.trusted_forwarded = trusted_forwarded


# A known head keeps the outbound heads made of it for this many (route, server, client, ...) at once;
# past that it starts over. Two requests that differ only in their id then share all the rest.
FORWARDED_PER_HEAD = 16


def build_request_head(request, out: Outbound) -> bytes:
    """The request head sent upstream (always HTTP/1.1, origin-form target), in one pass over the fields.

    A known head (the parser's table gives the same object again) keeps what it was forwarded as, so a
    repeated request only puts its own X-Request-Id between the two kept parts."""
    forwarded = request.forwarded
    if forwarded is None:
        before, after = _outbound_parts(request, out)
    else:
        key = (out.route_headers, out.method, out.target, out.host, out.client_ip, out.scheme, out.body,
               out.upgrade, out.trusted_forwarded, out.request_id is None)
        parts = forwarded.get(key)
        if parts is None:
            if len(forwarded) >= FORWARDED_PER_HEAD:
                forwarded.clear()
            parts = forwarded[key] = _outbound_parts(request, out)
        before, after = parts
    if out.request_id is None:
        return before
    return before + out.request_id.encode("latin-1") + after


def _outbound_parts(request, out: Outbound) -> tuple[bytes, bytes]:
    """build_request_head's head, in the two parts around the request id's value (all of it in the
    first part when no id is sent).

    (The head grows with +=, which CPython does in place: no list to append to and join.)"""
    rules = out.route_headers
    with_id = out.request_id is not None
    skip = rules.skip_by_case[out.trusted_forwarded, with_id]
    removed = request.connection_tokens  # rare: fields named in Connection (RFC 9110 §7.6.1)
    if removed:
        skip = skip | removed
    head = f"{out.method} {out.target} HTTP/1.1\r\nHost: {out.host if rules.host is None else rules.host}\r\n"
    # Names were lowercased once by the parser (Headers.names): no lower() per field here. The skipped
    # X-Forwarded-For and Via fields are gathered on the way, each as ", ".join of its values would be.
    forwarded_for = via = None
    for lname, (name, value) in zip(request.headers.names, request.headers.raw):
        if lname not in skip:
            head += f"{name}: {value}\r\n"
        elif lname == "x-forwarded-for":
            forwarded_for = value if forwarded_for is None else f"{forwarded_for}, {value}"
        elif lname == "via":
            via = value if via is None else f"{via}, {value}"
    if not out.trusted_forwarded or "x-forwarded-for" in removed:
        forwarded_for = None
    if "via" in removed:
        via = None
    head += rules.proxy_fields.format(
        f"{forwarded_for}, {out.client_ip}" if forwarded_for else out.client_ip, out.scheme,
        request.host or out.host, f"{via}, {VIA}" if via else VIA)
    after = rules.set_lines
    if out.body == "length":
        after += f"Content-Length: {request.content_length}\r\n"
    elif out.body == "chunked":
        after += "Transfer-Encoding: chunked\r\n"
    if out.upgrade is not None:
        after += f"Connection: Upgrade\r\nUpgrade: {out.upgrade}\r\n"
    after += "\r\n"
    if with_id:  # its line comes after the proxy's fields, before the route's
        return (head + "X-Request-Id: ").encode("latin-1"), ("\r\n" + after).encode("latin-1")
    return (head + after).encode("latin-1"), b""


# Response fields dropped by framing (see build_response_head), built once.
_RESPONSE_DROP = {
    # "length": Content-Length is written once, from the parsed value, after the copied fields: a
    # repeated "5, 5" is never relayed (RFC 9110 §8.6), and "Connection: Content-Length" from the
    # upstream (which makes the field hop-by-hop) can never leave the client without framing.
    "length": HOP_BY_HOP | {"content-length"},
    "none": HOP_BY_HOP,  # Content-Length kept as sent: on HEAD and 304 it describes the full response
    "chunked": HOP_BY_HOP | {"content-length"}, "close": HOP_BY_HOP | {"content-length"},
    "upgrade": HOP_BY_HOP - {"connection", "upgrade"} | {"content-length"},
}
# The same with the upstream's X-Request-Id: ours replaces it (a backend echoing it gave the client two).
_RESPONSE_DROP_WITH_ID = {framing: drop | {"x-request-id"} for framing, drop in _RESPONSE_DROP.items()}


# A rate-limited route's answer carries the proxy's RateLimit-* fields; the upstream's own are dropped
# there, so each field has one value.
RATE_LIMIT_FIELDS = frozenset({"ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"})


def build_response_head(response, *, framing: str, keep_alive: bool, client_version: str,
                        request_id: str | None = None, extra_fields: str = "") -> bytes:
    """The response head relayed to the client, in one pass over the fields.

    framing: "length" (keep Content-Length), "chunked" (we re-chunk), "close" (close-delimited),
    "none" (no body: HEAD, 204, 304), "upgrade" (101: keep Connection/Upgrade as sent).
    request_id: an X-Request-Id to return to the client.
    extra_fields: header lines the proxy adds ("Name: value\r\n" each: a rate limit's RateLimit-*
    fields, which replace the upstream's own).
    """
    # A known head (the parser's table) comes back as the same object: its status line and fields
    # are copied once per framing, not per response.
    inputs = (framing, request_id is None, not extra_fields)
    relayed = response.relayed_fields
    if relayed is not None and relayed[0] == inputs:
        head = relayed[1]
    else:
        head = _status_and_fields(response, framing, request_id is not None, bool(extra_fields))
        response.relayed_fields = (inputs, head)
    if request_id is not None:
        head += f"X-Request-Id: {request_id}\r\n"
    head += extra_fields
    if framing == "chunked":
        head += "Transfer-Encoding: chunked\r\n"
    if framing != "upgrade":
        if not keep_alive:
            head += "Connection: close\r\n"
        elif client_version == "HTTP/1.0":
            head += "Connection: keep-alive\r\n"
    return (head + "\r\n").encode("latin-1")


def _status_and_fields(response, framing: str, with_request_id: bool, with_extra_fields: bool) -> str:
    """build_response_head's status line, the upstream's fields it keeps, and the Content-Length."""
    drop = (_RESPONSE_DROP_WITH_ID if with_request_id else _RESPONSE_DROP)[framing]
    if response.connection_tokens and framing != "upgrade":
        drop = drop | response.connection_tokens
    if response.status == 204:
        drop = drop | {"content-length"}  # RFC 9110 §8.6: never in a 204
    if with_extra_fields:
        drop = drop | RATE_LIMIT_FIELDS
    head = f"HTTP/1.1 {response.status} {response.reason}\r\n"
    for lname, (name, value) in zip(response.headers.names, response.headers.raw):
        if lname not in drop:
            head += f"{name}: {value}\r\n"
    if framing == "length":
        head += f"Content-Length: {response.content_length}\r\n"
    return head


_INTERIM_DROP = HOP_BY_HOP | {"content-length"}


def interim_head(response) -> bytes:
    """A 1xx response relayed to an HTTP/1.1 client (hop-by-hop headers, and those its Connection names, dropped)."""
    lines = [f"HTTP/1.1 {response.status} {response.reason}"]
    # RFC 9110 §8.6: no Content-Length in a 1xx (a client trusting one would misframe what follows).
    drop = _INTERIM_DROP | response.connection_tokens if response.connection_tokens else _INTERIM_DROP
    lines.extend(f"{n}: {v}" for n, v in response.headers if n.lower() not in drop)
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1")
