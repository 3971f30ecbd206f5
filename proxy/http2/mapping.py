"""HTTP/2 header blocks to and from the proxy's HTTP/1.1 messages (RFC 9113 §8).

A request's header block becomes a ``RequestHead`` the HTTP/1.1 pipeline accepts as it is: ``:authority``
becomes Host, cookies split over several fields are joined again (§8.2.3), and nothing
connection-specific crosses (§8.2.2). A response head becomes a header block the same way back.
``malformed`` finds the blocks RFC 9113 calls malformed (uppercase names, pseudo-fields out of place,
connection-specific fields, a ``te`` other than "trailers"), which the session resets as a stream
error (proxy/http2/session.py); ``request_from_block`` then refuses with a status what an HTTP/1.1
request line or field would not carry.
"""

from __future__ import annotations

from proxy.http.forwarding import HOP_BY_HOP
import re

from proxy.http.http1 import FORBIDDEN_TRAILERS, Headers, ProtocolError, RequestHead, is_token, is_valid_host

VERSION = "HTTP/2.0"  # what the access log and the request records show for a stream
# Connection-specific fields (RFC 9113 §8.2.2) and the HTTP/1.1 framing ones: never in a header block.
_NOT_IN_H2 = HOP_BY_HOP | {"content-length", "host"}
_RESPONSE_DROP = HOP_BY_HOP
_REQUEST_PSEUDO = frozenset({":method", ":path", ":authority", ":scheme"})
# An origin-form :path (RFC 9113 §8.3.1) that fits a request line: visible characters, no fragment.
_PATH_RE = re.compile(r"/[\x21-\x22\x24-\x7e]*")
# A field as HTTP/1.1 allows it (h2 refuses only uppercase, CR, LF, NUL and a few more): a token for
# a name, no control character in a value. Bound methods: this runs for every field of every stream.
_is_field_name = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+").fullmatch
_is_field_value = re.compile(r"[\t\x20-\x7e\x80-\xff]*").fullmatch
# Names a CGI/WSGI backend folds onto a framing field, refused as the HTTP/1.1 parser refuses them.
_FRAMING_LOOKALIKES = frozenset({"content_length", "transfer_encoding"})
# RFC 9113 §8.2.1: a name without controls, spaces, uppercase, DEL, high bytes or a colon (but a
# pseudo-field's leading one); a value without NUL, CR or LF, not starting or ending in whitespace.
_is_h2_name = re.compile(rb":?[^\x00-\x20A-Z:\x7f-\xff]+").fullmatch
_is_h2_bad_value = re.compile(rb"[\x00\r\n]|\A[ \t]|[ \t]\Z").search
# RFC 9113 §8.2.2: connection-specific fields make a block malformed.
_CONNECTION_SPECIFIC = frozenset({b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding",
                                  b"upgrade"})
_H2_REQUEST_PSEUDO = frozenset({b":method", b":path", b":authority", b":scheme", b":protocol"})


def malformed(block, trailers: bool) -> bool:
    """True for a header block RFC 9113 §8.2-8.3 calls malformed (a stream error, §8.1.1): the checks
    the ``h2`` package makes when its inbound validation is on, done in one pass (it is off: it cost
    more than everything else in a request's header handling)."""
    pseudo = set()
    regular = False
    host = authority = method = None
    for name, value in block:
        if not _is_h2_name(name) or (value and _is_h2_bad_value(value)):
            return True
        if name[0] == 58:  # ":" (§8.3): before every regular field, once each, never in trailers
            if regular or trailers or name in pseudo or name not in _H2_REQUEST_PSEUDO:
                return True
            pseudo.add(name)
            if name == b":authority":
                authority = value
            elif name == b":method":
                method = value
            elif name == b":path" and not value:
                return True
            continue
        regular = True
        if name in _CONNECTION_SPECIFIC or (name == b"te" and value.lower() != b"trailers"):
            return True
        if name == b"host":
            if host is not None:
                return True
            host = value
    if trailers:
        return False
    if method is None or (b":protocol" in pseudo and method != b"CONNECT"):
        return True
    if method == b"CONNECT" and b":protocol" not in pseudo:  # §8.5: no :scheme or :path
        if b":scheme" in pseudo or b":path" in pseudo:
            return True
    elif b":scheme" not in pseudo or b":path" not in pseudo:
        return True
    if authority is None and host is None:
        return True
    # §8.3.1: a Host naming another entity than :authority; a host name's case names the same one.
    return authority is not None and host is not None and authority.lower() != host.lower()


def request_from_block(block, end_stream: bool, max_header_bytes: int) -> RequestHead:
    """The ``RequestHead`` for a stream's header block (a list of (bytes, bytes) pairs); ProtocolError
    (with the status to answer) for a request the proxy cannot serve."""
    pseudo: dict[str, str] = {}
    raw: list[tuple[str, str]] = []
    cookies: list[str] = []
    size = 0
    for name_bytes, value_bytes in block:
        name, value = name_bytes.decode("latin-1"), value_bytes.decode("latin-1")
        size += len(name) + len(value) + 32  # RFC 9113 §6.5.2: the size SETTINGS_MAX_HEADER_LIST_SIZE counts
        if name.startswith(":"):
            pseudo[name] = value
            continue
        if not _is_field_name(name) or name in _FRAMING_LOOKALIKES:
            raise ProtocolError(400, "invalid header name")
        if not _is_field_value(value):
            raise ProtocolError(400, "invalid character in header value")
        if name == "cookie":
            cookies.append(value)
        else:  # h2 refused connection-specific fields already; forwarding drops the hop-by-hop rest
            raw.append((name, value))
    if size > max_header_bytes:
        raise ProtocolError(431, "request header fields too large")
    if set(pseudo) - _REQUEST_PSEUDO:
        raise ProtocolError(400, "unknown pseudo-header field")
    method = pseudo.get(":method", "")
    if method == "CONNECT":  # RFC 9113 §8.5: a tunnel, which this proxy does not open over HTTP/2
        raise ProtocolError(501, "CONNECT is not supported over HTTP/2")
    target = pseudo.get(":path", "")
    if not method or not target or ":scheme" not in pseudo:
        raise ProtocolError(400, "missing :method, :scheme or :path")
    # They become an HTTP/1.1 request line upstream: anything a request line refuses is refused here,
    # or the backend could read another target than the one routed and checked.
    if not is_token(method):
        raise ProtocolError(400, "invalid :method")
    if not (_PATH_RE.fullmatch(target) or (target == "*" and method == "OPTIONS")):
        raise ProtocolError(400, "invalid :path")
    if cookies:
        raw.append(("cookie", "; ".join(cookies)))  # RFC 9113 §8.2.3
    headers = Headers(raw)
    host = pseudo.get(":authority") or headers.get("host")  # RFC 9113 §8.3.1: :authority wins over Host
    if host is None:
        raise ProtocolError(400, "missing :authority")
    if not is_valid_host(host):
        raise ProtocolError(400, "invalid :authority")
    content_length = _content_length(headers)
    if end_stream and content_length:
        raise ProtocolError(400, "Content-Length promised a body the stream does not carry")
    # A body without Content-Length is sent upstream chunked; a stream ended with its headers has none.
    chunked = not end_stream and content_length is None
    return RequestHead(method=method, target=target, version=VERSION, headers=_without_framing(headers),
                       content_length=content_length, chunked=chunked, keep_alive=True, host=host,
                       connection_tokens=frozenset(), expect_continue=False, upgrade=None)


def request_trailers(block) -> list[tuple[str, str]]:
    """A stream's request trailers, for the chunked body upstream; ProtocolError 400 for a field the
    HTTP/1.1 parser refuses in trailers too (RFC 9110 §6.5.1: framing, routing, authentication)."""
    trailers = []
    for name_bytes, value_bytes in block:
        name, value = name_bytes.decode("latin-1"), value_bytes.decode("latin-1")
        if not _is_field_name(name) or not _is_field_value(value):
            raise ProtocolError(400, "invalid trailer field")
        if name in FORBIDDEN_TRAILERS or name in _FRAMING_LOOKALIKES:
            raise ProtocolError(400, f"forbidden trailer field: {name}")
        trailers.append((name, value))
    return trailers


def _content_length(headers: Headers) -> int | None:
    values = headers.get_all("content-length")
    if not values:
        return None
    if len(set(values)) != 1 or not values[0].isdigit() or len(values[0]) > 18:
        raise ProtocolError(400, "invalid Content-Length")
    return int(values[0])


def _without_framing(headers: Headers) -> Headers:
    """Host and Content-Length are written by the forwarding code from the parsed values."""
    if "host" not in headers.names and "content-length" not in headers.names:
        return headers
    return Headers([(name, value) for name, value in headers.raw if name not in ("host", "content-length")])


def response_block(response, request_id: str | None, content_length: int | None) -> list[tuple[str, str]]:
    """The header block for a response head: ``:status`` first, names lowercase, nothing hop-by-hop
    (and nothing the upstream's Connection field named)."""
    drop = _RESPONSE_DROP | {"content-length"}
    if response.connection_tokens:
        drop = drop | response.connection_tokens
    if request_id is not None:
        drop = drop | {"x-request-id"}
    block = [(":status", str(response.status))]
    block.extend((lname, value) for lname, (_, value) in zip(response.headers.names, response.headers.raw)
                 if lname not in drop)
    if content_length is not None:
        block.append(("content-length", str(content_length)))
    if request_id is not None:
        block.append(("x-request-id", request_id))
    return block


def interim_block(response) -> list[tuple[str, str]]:
    """A 1xx (100 Continue, 103 Early Hints) for the client, as an informational header block; the
    fields its Connection header names stay behind, as in a final response (RFC 9110 §7.6.1)."""
    drop = _NOT_IN_H2 | response.connection_tokens if response.connection_tokens else _NOT_IN_H2
    return [(":status", str(response.status))] + [
        (lname, value) for lname, (_, value) in zip(response.headers.names, response.headers.raw)
        if lname not in drop]


def trailer_block(trailers) -> list[tuple[str, str]]:
    """Trailer fields (name, value) for the client: no pseudo-fields, nothing connection-specific."""
    return [(name.lower(), value) for name, value in trailers
            if not name.startswith(":") and name.lower() not in _NOT_IN_H2]


def from_http1_payload(payload: bytes) -> tuple[list[tuple[str, str]], bytes]:
    """A complete HTTP/1.1 response the proxy wrote itself (an error page, a redirect) as a header
    block and a body, so that both protocols answer with the same words."""
    head, _, body = payload.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    block = [(":status", lines[0].split(" ", 2)[1])]
    for line in lines[1:]:
        name, _, value = line.partition(":")
        lname = name.strip().lower()
        if lname not in HOP_BY_HOP:
            block.append((lname, value.strip()))
    return block, body
