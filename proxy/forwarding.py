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


def build_request_head(request, out: Outbound) -> bytes:
    """The request head sent upstream (always HTTP/1.1, origin-form target)."""
    drop = HOP_BY_HOP | request.connection_tokens if request.connection_tokens else HOP_BY_HOP
    override = {name.lower() for name, _ in out.set_headers}
    lines = [f"{out.method} {out.target} HTTP/1.1", f"Host: {out.host}"]
    forwarded_for = None
    via = None
    original_host = request.host or out.host
    for name, value in request.headers:
        lname = name.lower()
        if lname in drop or lname in _PROXY_SET or lname in override:
            continue
        if lname == "x-forwarded-for":
            if out.trusted_forwarded:
                forwarded_for = value if forwarded_for is None else f"{forwarded_for}, {value}"
            continue
        if lname == "forwarded" and not out.trusted_forwarded:
            continue
        if lname == "via":
            via = value if via is None else f"{via}, {value}"
            continue
        if lname == "x-request-id" and out.request_id is not None:
            continue
        lines.append(f"{name}: {value}")
    lines.append(f"X-Forwarded-For: {forwarded_for}, {out.client_ip}" if forwarded_for else
                 f"X-Forwarded-For: {out.client_ip}")
    lines.append(f"X-Forwarded-Proto: {out.scheme}")
    lines.append(f"X-Forwarded-Host: {original_host}")
    lines.append(f"Via: {via}, {VIA}" if via else f"Via: {VIA}")
    if out.request_id is not None:
        lines.append(f"X-Request-Id: {out.request_id}")
    lines.extend(f"{name}: {value}" for name, value in out.set_headers)
    if out.body == "length":
        lines.append(f"Content-Length: {request.content_length}")
    elif out.body == "chunked":
        lines.append("Transfer-Encoding: chunked")
    if out.upgrade is not None:
        lines.append("Connection: Upgrade")
        lines.append(f"Upgrade: {out.upgrade}")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1")


def build_response_head(response, *, framing: str, keep_alive: bool, client_version: str,
                        extra: tuple = ()) -> bytes:
    """The response head relayed to the client.

    framing: "length" (keep Content-Length), "chunked" (we re-chunk), "close" (close-delimited),
    "none" (no body: HEAD, 204, 304), "upgrade" (101: keep Connection/Upgrade as sent).
    """
    if framing == "upgrade":
        drop = HOP_BY_HOP - {"connection", "upgrade"}
    else:
        drop = HOP_BY_HOP | response.connection_tokens if response.connection_tokens else HOP_BY_HOP
    lines = [f"HTTP/1.1 {response.status} {response.reason}"]
    keep_length = framing in ("length", "none")
    for name, value in response.headers:
        lname = name.lower()
        if lname in drop or (lname == "content-length" and not keep_length):
            continue
        lines.append(f"{name}: {value}")
    lines.extend(f"{name}: {value}" for name, value in extra)
    if framing == "chunked":
        lines.append("Transfer-Encoding: chunked")
    if framing != "upgrade":
        if not keep_alive:
            lines.append("Connection: close")
        elif client_version == "HTTP/1.0":
            lines.append("Connection: keep-alive")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1")


def interim_head(response) -> bytes:
    """A 1xx response relayed to an HTTP/1.1 client (hop-by-hop headers dropped)."""
    lines = [f"HTTP/1.1 {response.status} {response.reason}"]
    lines.extend(f"{n}: {v}" for n, v in response.headers if n.lower() not in HOP_BY_HOP)
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1")
