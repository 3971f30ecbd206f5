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
_NOTHING: frozenset[str] = frozenset()


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


class Outbound:
    """What the proxy decided about one forwarded request (the parts that vary per attempt stay out)."""

    __slots__ = ("method", "target", "host", "client_ip", "scheme", "set_headers", "body", "upgrade",
                 "request_id", "trusted_forwarded")

    def __init__(self, method: str, target: str, host: str, client_ip: str, scheme: str,
                 set_headers: tuple = (), body: str = "none", upgrade: str | None = None,
                 request_id: str | None = None, trusted_forwarded: bool = True):
        self.method = method
        self.target = target
        self.host = host  # the Host header to send upstream
        self.client_ip = client_ip
        self.scheme = scheme
        self.set_headers = set_headers
        self.body = body  # "none" | "length" | "chunked"
        self.upgrade = upgrade
        self.request_id = request_id
        # False when the client is not a trusted proxy: its X-Forwarded-For/Forwarded are dropped.
        self.trusted_forwarded = trusted_forwarded


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


def build_request_head(request, out: Outbound) -> bytes:
    """The request head sent upstream (always HTTP/1.1, origin-form target)."""
    headers = request.headers
    skip = _REQUEST_SKIP_BY_CASE[out.trusted_forwarded, out.request_id is not None]
    # Rare: fields named in Connection (RFC 9110 §7.6.1) or replaced by the route's set_headers.
    removed = request.connection_tokens
    set_fields = out.set_headers
    overridden = _NOTHING  # the proxy's own fields a route's set_headers replace (Host, X-Forwarded-*, Via)
    if set_fields:
        overridden = frozenset(name.lower() for name, _ in set_fields)
        removed = removed | overridden
        set_fields = [(name, value) for name, value in set_fields if name.lower() not in _NOT_SETTABLE]
    if removed:
        skip = skip | removed
    host = out.host
    if "host" in overridden:  # one Host, the route's: two make the request invalid (RFC 9112 §3.2)
        host = next(value for name, value in set_fields if name.lower() == "host")
        set_fields = [(name, value) for name, value in set_fields if name.lower() != "host"]
    lines = [f"{out.method} {out.target} HTTP/1.1", f"Host: {host}"]
    # Names were lowercased once by the parser (Headers.names): no lower() per field here. (A plain
    # loop: a list comprehension is slower in Python 3.11, it runs as a nested function.)
    for lname, (name, value) in zip(headers.names, headers.raw):
        if lname not in skip:
            lines.append(f"{name}: {value}")
    forwarded_for = ""
    if out.trusted_forwarded and "x-forwarded-for" not in removed:
        forwarded_for = ", ".join(headers.get_all("x-forwarded-for"))
    via = "" if "via" in removed else ", ".join(headers.get_all("via"))
    if "x-forwarded-for" not in overridden:
        lines.append(f"X-Forwarded-For: {forwarded_for}, {out.client_ip}" if forwarded_for else
                     f"X-Forwarded-For: {out.client_ip}")
    if "x-forwarded-proto" not in overridden:
        lines.append(f"X-Forwarded-Proto: {out.scheme}")
    if "x-forwarded-host" not in overridden:
        lines.append(f"X-Forwarded-Host: {request.host or out.host}")
    if "via" not in overridden:
        lines.append(f"Via: {via}, {VIA}" if via else f"Via: {VIA}")
    if out.request_id is not None:
        lines.append(f"X-Request-Id: {out.request_id}")
    if set_fields:
        lines += [f"{name}: {value}" for name, value in set_fields]
    if out.body == "length":
        lines.append(f"Content-Length: {request.content_length}")
    elif out.body == "chunked":
        lines.append("Transfer-Encoding: chunked")
    if out.upgrade is not None:
        lines.append("Connection: Upgrade")
        lines.append(f"Upgrade: {out.upgrade}")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1")


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


def build_response_head(response, *, framing: str, keep_alive: bool, client_version: str,
                        extra: tuple = ()) -> bytes:
    """The response head relayed to the client.

    framing: "length" (keep Content-Length), "chunked" (we re-chunk), "close" (close-delimited),
    "none" (no body: HEAD, 204, 304), "upgrade" (101: keep Connection/Upgrade as sent).
    """
    drop = _RESPONSE_DROP[framing]
    if response.connection_tokens and framing != "upgrade":
        drop = drop | response.connection_tokens
    if response.status == 204:
        drop = drop | {"content-length"}  # RFC 9110 §8.6: never in a 204
    if extra:  # ours replace the upstream's (a backend echoing X-Request-Id gave the client two)
        drop = drop | {name.lower() for name, _ in extra}
    headers = response.headers
    lines = [f"HTTP/1.1 {response.status} {response.reason}"]
    for lname, (name, value) in zip(headers.names, headers.raw):
        if lname not in drop:
            lines.append(f"{name}: {value}")
    if framing == "length":
        lines.append(f"Content-Length: {response.content_length}")
    if extra:
        lines += [f"{name}: {value}" for name, value in extra]
    if framing == "chunked":
        lines.append("Transfer-Encoding: chunked")
    if framing != "upgrade":
        if not keep_alive:
            lines.append("Connection: close")
        elif client_version == "HTTP/1.0":
            lines.append("Connection: keep-alive")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1")


_INTERIM_DROP = HOP_BY_HOP | {"content-length"}


def interim_head(response) -> bytes:
    """A 1xx response relayed to an HTTP/1.1 client (hop-by-hop headers dropped)."""
    lines = [f"HTTP/1.1 {response.status} {response.reason}"]
    # RFC 9110 §8.6: no Content-Length in a 1xx (a client trusting one would misframe what follows).
    lines.extend(f"{n}: {v}" for n, v in response.headers if n.lower() not in _INTERIM_DROP)
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1")
