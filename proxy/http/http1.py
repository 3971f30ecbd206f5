"""Strict, fast, sans-IO HTTP/1.1 message parsing (RFC 9112, RFC 9110).

The parsers take bytes (``feed``) and hand out events (``next_event``); they never touch a
socket (docs/development.md, after h11's ``Connection.receive_data()``/``next_event()``).

Events, in order, for one message::

    RequestHead | ResponseHead      the head, with framing already decided
    Data(bytes) ...                 body bytes (chunked bodies arrive decoded)
    EndOfMessage(trailers)          trailers is a Headers or None

``NEED_DATA`` means "feed me more bytes". Every protocol violation raises ``ProtocolError``
carrying the status code it implies: 400/413/414/431/501/505 for requests,
always 502 for responses. After an error the parser stays broken: the connection must close.

Speed: a request head is parsed with a handful of C-level operations -- ``bytearray.find``
for the end of head, one latin-1 decode, one ``fullmatch`` for the request line, one
``findall`` that both validates and splits every header line, and a dict of lowercased
names built once. There is no per-character Python loop anywhere, and the common case of
each rule is decided inline (a Python call costs as much as a short header line). Parsing
heads with llhttp (httptools) was measured and is no faster: its per-header Python callback
and two decodes cost what it saves on the findall; splitting lines with ``str.split`` and
``partition`` is slower still.

Decisions the RFCs leave open (documented here so the engine and tests agree):

* ``CONNECT`` -> 501: this is a reverse proxy, it does not open tunnels (RFC 9110 §9.3.6
  is optional to implement). Authority-form targets with any other method -> 400.
* ``HTTP/1.0`` and ``HTTP/1.1`` are served. A message in a later ``HTTP/1.x`` (1.2-1.9) is read
  as HTTP/1.1, request or response (RFC 9110 §2.5, RFC 9112 §2.3: a higher minor version is
  processed as the highest minor version the recipient knows; nginx does the same), so the
  proxy answers and forwards it as 1.1. Another major version (``HTTP/2.0``, ``HTTP/3.0``)
  -> 505 (502 for a response); ``HTTP/0.x`` or a version-less (HTTP/0.9 style) request
  line -> 400.
* Request ``Transfer-Encoding`` must be exactly ``chunked``. A list whose final coding is
  not ``chunked``, or that applies ``chunked`` twice, -> 400 (RFC 9112 §6.3 item 4,
  §7.1); a well-formed list ending in ``chunked`` with other codings before it
  (``gzip, chunked``) -> 501 (RFC 9112 §6.1: "SHOULD respond with 501").
* A fragment (``#``) in the request-target -> 400: no request-target form contains one.
* ``RequestHead.host`` is the effective host, lowercased (host names are case-insensitive,
  RFC 3986 §3.2.2), port kept: the absolute-form authority if any, else the Host field.
* ``ResponseHead.content_length`` is the number of body bytes that follow the head per
  RFC 9112 §6.3: 0 for HEAD/1xx/204/304 responses whatever the header says, None for
  chunked, close-delimited and 101 responses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple

# ---------------------------------------------------------------------------------------
# Limits (defaults; the engine passes the configured values)

# The default of server.max_header_bytes, "16KiB" (nginx: 4 x 8k large header buffers).
DEFAULT_MAX_HEADER_BYTES = 16384
# The default of server.max_body_bytes, "100MiB".
DEFAULT_MAX_BODY_BYTES = 100 * 1024**2
# RFC 9112 §3: recipients SHOULD support request-lines of at least 8000 octets;
# Apache's LimitRequestLine is 8190, nginx's large buffer 8k.
DEFAULT_MAX_LINE_BYTES = 8192
# Upstream response heads may carry large Set-Cookie/CSP headers; we trust backends more.
DEFAULT_MAX_RESPONSE_HEADER_BYTES = 65536
# A chunk-size line with its extensions; real clients send "1000\r\n". Extensions are
# dropped anyway, so a long line only costs memory.
MAX_CHUNK_LINE_BYTES = 4096
# 18 decimal digits always fit in a signed 64-bit integer (what a backend will parse into).
MAX_CONTENT_LENGTH_DIGITS = 18
# A table of known heads (RequestParser's known_heads) holds at most this many, each at most this long:
# a few hundred KiB in all. A longer head is parsed every time.
KNOWN_HEADS_MAX = 256
KNOWN_HEAD_MAX_CHARS = 1024

# ---------------------------------------------------------------------------------------
# Errors and events


class ProtocolError(Exception):
    """A message we refuse, with the response status that refusal implies."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


class ParserStateError(RuntimeError):
    """The caller used the parser out of order (a bug in the caller, not the peer)."""


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


class Data(NamedTuple):
    data: bytes


class EndOfMessage(NamedTuple):
    trailers: "Headers | None" = None


_END_OF_MESSAGE = EndOfMessage(None)  # immutable: built once rather than per message


class Headers:
    """Header fields in arrival order: (original-case name, value) with OWS stripped.

    Lookups take a lowercase name (a mixed-case one works too, at the cost of a lower()); the
    lowercase names and their index are built once, when the head is parsed. ``names`` holds
    the lowercase names in arrival order, parallel to ``raw``: forwarding filters on them
    instead of lowering every name again.
    """

    __slots__ = ("raw", "names", "_index")

    def __init__(self, raw: list[tuple[str, str]], index: dict[str, list[str]] | None = None,
                 names: list[str] | None = None):
        self.raw = raw
        if index is None or names is None:
            names, index = _index_fields(raw)
        self.names = names
        self._index = index

    def get(self, name: str, default: str | None = None) -> str | None:
        values = self._index.get(name)
        if values is None:
            values = self._index.get(name.lower())
        return values[0] if values else default

    def get_all(self, name: str) -> list[str]:
        return list(self._index.get(name.lower(), ()))

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self.raw)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._index

    def __len__(self) -> int:
        return len(self.raw)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Headers):
            return self.raw == other.raw
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Headers({self.raw!r})"


@dataclass(slots=True)
class RequestHead:
    method: str
    target: str
    version: str
    headers: Headers
    content_length: int | None
    chunked: bool
    keep_alive: bool
    host: str | None
    connection_tokens: frozenset[str]
    expect_continue: bool
    upgrade: str | None
    # The heads forwarding.build_request_head made of this one before, for a head seen again (a known
    # head): {what the head depends on: its bytes around the request id}. Not part of the head's value.
    forwarded: dict | None = field(default=None, compare=False, repr=False)


@dataclass(slots=True)
class ResponseHead:
    status: int
    reason: str
    version: str
    headers: Headers
    content_length: int | None
    chunked: bool
    keep_alive: bool
    connection_tokens: frozenset[str]
    # What forwarding.build_response_head made of the fields last time, for a head seen again (a
    # known head): (its inputs, the text). Not part of the head's value.
    relayed_fields: tuple | None = field(default=None, compare=False, repr=False)


def encode_chunk(data: bytes) -> bytes:
    """One chunk of a chunked body. Empty data gives b"" (an empty chunk would end the body)."""
    if not data:
        return b""
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"

# ---------------------------------------------------------------------------------------
# Grammar (RFC 9110 §5.6.2 token, §5.5 field-value; RFC 9112 §3, §4, §5, §7.1)

_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_FIELD_VCHAR = r"[\x21-\x7e\x80-\xff]"  # VCHAR / obs-text (text is latin-1 decoded)
# One whole field line, anchored at a line start. No whitespace before the colon, no
# obs-fold (a line starting with SP/HTAB cannot match ^token), no CTL but HTAB in the value.
_FIELD_LINE_RE = re.compile(
    rf"^({_TOKEN}):[ \t]*((?:{_FIELD_VCHAR}(?:[\t\x20-\x7e\x80-\xff]*{_FIELD_VCHAR})?)?)[ \t]*\r\n",
    re.MULTILINE,
)
_REQUEST_LINE_RE = re.compile(rf"({_TOKEN}) ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])")
# RFC 9112 §4 wants "SP reason-phrase" even when empty; many servers omit the SP.
_STATUS_LINE_RE = re.compile(r"HTTP/([0-9])\.([0-9]) ([0-9]{3})(?: ([\t\x20-\x7e\x80-\xff]*))?")
# uri-host [ ":" port ] (RFC 9110 §7.2, RFC 3986 §3.2.2); no userinfo.
# The reg-name loop is unrolled (run of plain chars, then "%XX run" groups): 2x faster than
# an alternation per character.
_REG_NAME_CHARS = r"[A-Za-z0-9\-._~!$&'()*+,;=]*"
_HOST_RE = re.compile(
    rf"(?:\[[0-9A-Fa-f:.]+\]|{_REG_NAME_CHARS}(?:%[0-9A-Fa-f]{{2}}{_REG_NAME_CHARS})*)(?::[0-9]{{0,5}})?"
)
_ABSOLUTE_FORM_RE = re.compile(r"(?i:https?)://([^/?]*)([/?].*)?")
_CONTENT_LENGTH_RE = re.compile(rf"[0-9]{{1,{MAX_CONTENT_LENGTH_DIGITS}}}")
_TOKEN_RE = re.compile(_TOKEN)
# The same request-line grammar on raw bytes, for a line whose head has not fully arrived yet.
_METHOD_PREFIX_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]*")
_REQUEST_LINE_BYTES_RE = re.compile(_REQUEST_LINE_RE.pattern.encode("latin-1"))
# chunk-size [ chunk-ext ] (RFC 9112 §7.1.1): 1-16 hex digits, then extensions by the grammar
#   chunk-ext = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS ( token / quoted-string ) ] )
# Extensions are dropped when we re-chunk, but a malformed one ("1;", "1;a=b c") is exactly what
# lets two parsers disagree on where the size line ends, so it is refused, as h11 and llhttp do.
_QUOTED_STRING = rb'"(?:[\t\x20\x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t\x20-\x7e\x80-\xff])*"'
_TOKEN_B = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_CHUNK_SIZE_LINE_RE = re.compile(
    rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[ \t]*" + _TOKEN_B
    + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN_B + rb"|" + _QUOTED_STRING + rb"))?)*"
)


def _small_chunk_pattern(data_group: bytes) -> bytes:
    """One whole chunk of 1-15 bytes with a one-digit size and no extension ("5\\r\\nhello\\r\\n").

    The data length depends on the size digit, which a regex cannot compute, so each length is
    an alternative guarded by a lookbehind on its digit. data_group is b"(" to capture the data
    or b"(?:" not to.
    """
    lengths = []
    for size in range(1, 16):
        digit = b"%x" % size
        digit_class = digit if size < 10 else b"[%b%b]" % (digit, digit.upper())
        lengths.append(b"(?<=%b\r\n).{%d}" % (digit_class, size))
    return rb"[1-9A-Fa-f]\r\n" + data_group + b"|".join(lengths) + rb")\r\n"


# A run of small chunks (a body of 1-byte chunks is the costly case): matched, then decoded by
# findall, both in C. Longer chunks and any chunk with an extension take the general path.
_SMALL_CHUNKS_RE = re.compile(rb"(?s)(?:" + _small_chunk_pattern(b"(?:") + rb")+")
_SMALL_CHUNK_DATA_RE = re.compile(rb"(?s)" + _small_chunk_pattern(b"("))
_CHUNK_SIZE_LINE_CRLF_RE = re.compile(_CHUNK_SIZE_LINE_RE.pattern + rb"\r\n")

_NO_TOKENS: frozenset[str] = frozenset()

# RFC 9110 §6.5.1: fields a sender must not put in trailers because they control framing,
# routing, authentication or how the message is processed.
FORBIDDEN_TRAILERS = frozenset({
    "content-length", "transfer-encoding", "host", "connection", "keep-alive", "upgrade",
    "te", "trailer", "proxy-connection", "expect", "max-forwards", "cache-control", "range",
    "if-match", "if-none-match", "if-modified-since", "if-unmodified-since", "if-range",
    "authorization", "proxy-authorization", "cookie", "set-cookie", "www-authenticate",
    "proxy-authenticate", "content-encoding", "content-type", "content-range", "age",
    "date", "expires", "location", "retry-after", "vary",
})

# ---------------------------------------------------------------------------------------
# Pure helpers


def _bad(reason: str) -> ProtocolError:
    return ProtocolError(400, reason)


def _index_fields(raw: list[tuple[str, str]]) -> tuple[list[str], dict[str, list[str]]]:
    """(lowercase names in order, {lowercase name: values in order}), in one pass."""
    names: list[str] = []
    index: dict[str, list[str]] = {}
    for name, value in raw:
        key = name.lower()
        names.append(key)
        values = index.get(key)
        if values is None:
            index[key] = [value]
        else:
            values.append(value)
    return names, index


def _parse_fields(text: str, start: int) -> tuple[list[tuple[str, str]], list[str], dict[str, list[str]]]:
    """Field lines in text[start:], which ends with CRLF (or is empty): (raw, names, index).

    With re.MULTILINE every match starts at a line start and ends at a CRLF, and a value
    holds no LF; so there is one match per LF exactly when every line is a valid field line
    (a bare LF or an invalid line leaves an LF without its match).
    """
    raw = _FIELD_LINE_RE.findall(text, start)
    if len(raw) != text.count("\n", start):
        raise _bad(_describe_bad_field(text, start))
    names: list[str] = []
    index: dict[str, list[str]] = {}
    for name, value in raw:  # _index_fields, inlined: this runs for every head
        key = name.lower()
        names.append(key)
        values = index.get(key)
        if values is None:
            index[key] = [value]
        else:
            values.append(value)
    return raw, names, index


def _describe_bad_field(text: str, start: int) -> str:
    """Slow path, errors only: say which rule the first bad field line broke."""
    for line in text[start:].split("\r\n"):
        if not line or _FIELD_LINE_RE.match(line + "\r\n"):
            continue
        if "\n" in line or "\r" in line:
            return "bare CR or LF in header section"
        if line[0] in " \t":
            return "obsolete line folding in header section"
        name, colon, _ = line.partition(":")
        if not colon:
            return "header line without a colon"
        if name != name.rstrip(" \t"):
            return "whitespace before the colon in a header line"
        if not _TOKEN_RE.fullmatch(name):
            return "invalid header name"
        return "invalid character in header value"
    return "malformed header section"


def _has_bare_line_ending(buf: bytearray, start: int, stop: int) -> bool:
    """True if buf[start:stop] holds a CR not followed by LF or an LF not preceded by CR.

    A CR as the very last byte of the buffer is pending, not bare (callers pass
    stop = len(buf) - 1 in that case).
    """
    crlf = buf.count(b"\r\n", start, stop + 1)
    if buf.count(b"\r", start, stop) != crlf:
        return True
    return buf.count(b"\n", start, stop) != buf.count(b"\r\n", max(start - 1, 0), stop)


def _parse_content_length(values: list[str]) -> int:
    """RFC 9110 §8.6: digits only; identical repeats ("5, 5" or two fields) collapse."""
    if len(values) == 1:
        value = values[0]
        if value.isascii() and value.isdigit() and len(value) <= MAX_CONTENT_LENGTH_DIGITS:
            return int(value)
    found = set()
    for value in values:
        for item in value.split(","):
            item = item.strip(" \t")
            if not _CONTENT_LENGTH_RE.fullmatch(item):
                raise _bad("invalid Content-Length")
            found.add(int(item))
    if len(found) != 1:
        raise _bad("conflicting Content-Length values")
    return found.pop()


def _transfer_codings(values: list[str]) -> list[str]:
    codings = [item.strip(" \t").lower() for value in values for item in value.split(",")]
    if not all(_TOKEN_RE.fullmatch(coding) for coding in codings):
        raise _bad("invalid Transfer-Encoding")
    return codings


def _check_request_transfer_coding(values: list[str]) -> None:
    """Only exactly "chunked" is accepted in requests (see module docstring)."""
    if len(values) == 1 and values[0].lower() == "chunked":
        return
    codings = _transfer_codings(values)
    if codings == ["chunked"]:
        return
    if codings[-1] != "chunked" or codings.count("chunked") > 1:
        raise _bad("Transfer-Encoding must end with chunked, applied once")
    raise ProtocolError(501, "unsupported transfer coding")


def _connection_tokens(values: list[str] | None) -> frozenset[str]:
    if not values:
        return _NO_TOKENS
    if len(values) == 1 and "," not in values[0]:  # the usual "keep-alive" / "close"
        token = values[0].strip(" \t").lower()
        return frozenset((token,)) if token else _NO_TOKENS
    tokens = {item.strip(" \t").lower() for value in values for item in value.split(",")}
    tokens.discard("")
    return frozenset(tokens)


def _version(major: str, minor: str, error_status: int) -> str:
    if major == "1":
        # A later 1.x (only one digit gets here) is read as 1.1: RFC 9110 §2.5, as nginx does.
        return "HTTP/1.0" if minor == "0" else "HTTP/1.1"
    if major == "0":
        raise ProtocolError(400 if error_status == 505 else error_status, "invalid HTTP version")
    raise ProtocolError(error_status, "HTTP version not supported")


def is_token(text: str) -> bool:
    """A method name as a request line allows it (RFC 9110 §5.6.2); HTTP/2's :method too."""
    return _TOKEN_RE.fullmatch(text) is not None


def is_valid_host(host: str) -> bool:
    """A Host value as a request allows it (no userinfo, no empty host); HTTP/2's :authority too."""
    return bool(host) and host[0] != ":" and _HOST_RE.fullmatch(host) is not None


def _describe_bad_request_line(line: str) -> str:
    parts = line.split(" ")
    if len(parts) != 3 or "" in parts:
        return "request line must be: method SP target SP version (single spaces)"
    method, target, version = parts
    if not _TOKEN_RE.fullmatch(method):
        return "invalid method"
    if not re.fullmatch(r"[\x21-\x7e]+", target):
        return "invalid character in request target"
    return "invalid HTTP version"


def _request_target_authority(method: str, target: str) -> str | None:
    """Check the target form (RFC 9112 §3.2); return the absolute-form authority if any."""
    if "#" in target:
        raise _bad("fragment in request target")
    if target[0] == "/":
        return None
    if target == "*":
        if method != "OPTIONS":
            raise _bad("asterisk-form target is only for OPTIONS")
        return None
    match = _ABSOLUTE_FORM_RE.fullmatch(target)
    if match is None:
        raise _bad("invalid request target form")
    authority = match.group(1)
    # RFC 9110 §4.2.1: an http(s) URI with an empty host MUST be rejected.
    if not authority or authority[0] == ":" or not _HOST_RE.fullmatch(authority):
        raise _bad("invalid authority in absolute-form target")
    return authority


def _request_host(version: str, index: dict[str, list[str]], authority: str | None) -> str | None:
    """RFC 9112 §3.2: exactly one valid Host in 1.1; §3.2.2: absolute-form authority wins."""
    hosts = index.get("host")
    if hosts is None:
        if version == "HTTP/1.1":
            raise _bad("missing Host header")
        host = None
    elif len(hosts) > 1:
        raise _bad("more than one Host header")
    else:
        host = hosts[0]
        # RFC 9110 §4.2.1: an http(s) URI with an empty host is invalid, so is a Host without one.
        if not host or host[0] == ":" or not _HOST_RE.fullmatch(host):
            raise _bad("invalid Host header")
    if authority is not None:
        host = authority
    return host.lower() if host else host


# Names a server might fold onto a framing field: CGI/WSGI map "-" and "_" to the same HTTP_*
# variable, so "Transfer_Encoding" can become Transfer-Encoding behind us (nginx drops such
# headers by default: underscores_in_headers off). Refused rather than forwarded.
# Each guarded name has one hyphen, so its only lookalike is the name with an underscore there.
_LOOKALIKES = frozenset({"content_length", "transfer_encoding"})


def _check_lookalike_names(index: dict[str, list[str]]) -> None:
    lookalikes = _LOOKALIKES.intersection(index)
    if lookalikes:
        raise _bad(f"header name {min(lookalikes)!r} is a lookalike of a framing header")


def _expects_continue(values: list[str] | None) -> bool:
    """RFC 9110 §10.1.1: 100-continue is the only expectation; any other -> 417."""
    if values is None:
        return False
    items = {item.strip(" \t").lower() for value in values for item in value.split(",")}
    items.discard("")
    if items - {"100-continue"}:
        raise ProtocolError(417, "unsupported expectation")
    return bool(items)


def _check_trailers(index: dict[str, list[str]]) -> None:
    forbidden = FORBIDDEN_TRAILERS.intersection(index)
    if forbidden:
        raise _bad(f"forbidden trailer field: {sorted(forbidden)[0]}")


# ---------------------------------------------------------------------------------------
# Parser states

_HEAD = "head"
_BODY_LENGTH = "body-length"          # Content-Length body, or no body (remaining 0)
_CHUNK_SIZE = "chunk-size"
_CHUNK_DATA = "chunk-data"
_CHUNK_END = "chunk-end"              # the CRLF after chunk data
_TRAILERS = "trailers"
_BODY_UNTIL_CLOSE = "body-until-close"
_DONE = "done"                        # EndOfMessage returned; waiting for start_next()
_SWITCHED = "switched"                # 101 / tunnel: the rest is not HTTP
_CHUNKED_STATES = frozenset({_CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS})


class _MessageParser:
    """Buffering, head framing and body decoding shared by both directions."""

    _drops_forbidden_trailers = False  # a request with a framing field in its trailers is refused
    # A new parser's state (start_next() returns to it): class attributes, so that making a parser (one
    # per response, one per connection) sets only what differs.
    _state = _HEAD
    body_remaining: int | None = None
    _chunk_remaining = 0
    _body_total = 0
    _skipped = 0
    _head_scan = 0
    _ending_scan = 0
    _line_complete = False
    _eof = False
    _error: ProtocolError | None = None
    # Heads seen before, by their text, each with a framing its text alone decides (the subclasses say
    # which): a repeated head is looked up in next_event, not parsed. None: no table.
    _known_heads: dict | None = None

    # Each subclass's __init__ sets the rest itself, without a call to a shared one (a parser is made
    # per connection and per response): _max_header_bytes, _max_body_bytes (None: unlimited),
    # _max_line_bytes and _buf, the bytes not parsed yet.
    _max_header_bytes: int
    _max_body_bytes: int | None
    _max_line_bytes: int
    _buf: bytearray

    # -- public ---------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        if self._eof:
            raise ParserStateError("feed() after feed_eof()")
        self._buf += data

    def feed_eof(self) -> None:
        self._eof = True

    @property
    def has_buffered_data(self) -> bool:
        """Unparsed bytes are waiting (e.g. a pipelined request after start_next())."""
        return bool(self._buf)

    @property
    def head_started(self) -> bool:
        """Bytes of the next message arrived: buffered, or empty lines already skipped before its
        start line (RFC 9112 §2.2) -- those leave the buffer empty while a head is under way."""
        return bool(self._buf) or self._skipped > 0

    @property
    def body_buffered(self) -> bool:
        """In a Content-Length body, every byte of it is already buffered (next_event will not need data)."""
        return self._state is _BODY_LENGTH and len(self._buf) >= (self.body_remaining or 0)

    @property
    def peer_closed(self) -> bool:
        """feed_eof() was called: once the events run out, there will be no more."""
        return self._eof

    def take_buffered(self) -> bytes:
        """Hand back unparsed bytes and forget them.

        In a Content-Length body this hands back at most the rest of the body (and counts
        it as consumed), so bytes of a pipelined next message stay buffered; the caller
        relays body_remaining more bytes itself and then calls start_next().
        """
        buf = self._buf
        remaining = self.body_remaining
        if self._state is _BODY_LENGTH and remaining is not None and len(buf) > remaining:
            data = bytes(buf[:remaining])
            del buf[:remaining]
        else:
            data = bytes(buf)
            buf.clear()
        if self._state is _BODY_LENGTH and remaining is not None:
            self.body_remaining = remaining - len(data)
        self._head_scan = self._ending_scan = 0
        self._line_complete = False
        return data

    def start_next(self) -> None:
        """Reset for the next message on this connection, keeping buffered bytes.

        Legal after EndOfMessage, before any head byte, or in a Content-Length body the
        caller relayed itself (take_buffered + reading body_remaining bytes directly).
        """
        if self._error is not None:
            raise ParserStateError("start_next() after a protocol error")
        if self._state not in (_DONE, _BODY_LENGTH, _HEAD):
            raise ParserStateError(f"start_next() in state {self._state}")
        # Back to the class attributes' values (a new parser's state), inline: once per request.
        self._state = _HEAD
        self.body_remaining = None
        self._chunk_remaining = 0
        self._body_total = 0          # decoded chunked bytes so far (max_body_bytes)
        self._skipped = 0             # empty lines skipped before the start line
        self._head_scan = 0           # where the next search for CRLFCRLF starts
        self._ending_scan = 0         # buffer checked for bare CR/LF up to here
        self._line_complete = False   # the start line's CRLF has been seen

    def next_event(self):
        """The next event: a head, Data, EndOfMessage, or NEED_DATA (feed more bytes).

        For a RequestParser, after feed_eof() at a message boundary this keeps returning
        NEED_DATA (a clean close): check peer_closed. Mid-message EOF raises 400 (502 for
        a ResponseParser).
        """
        if self._error is not None:
            raise self._error
        state = self._state
        try:
            if state is _HEAD:
                buf = self._buf
                if not buf:
                    if not self._eof:
                        # The engine asks before every read (keep-alive: the buffer is empty each time).
                        return NEED_DATA
                elif self._known_heads is not None and not self._skipped:
                    # A head seen before, inline (every keep-alive request and response comes here),
                    # within the same limits _next_head checks; anything else is parsed there.
                    end = buf.find(b"\r\n\r\n", self._head_scan)
                    if 0 < end <= self._max_line_bytes and end + 4 <= self._max_header_bytes:
                        head = self._known_heads.get(buf[: end + 2].decode("latin-1"))
                        if head is not None:
                            del buf[: end + 4]
                            self._head_scan = self._ending_scan = 0
                            self._line_complete = False
                            self._state = _BODY_LENGTH
                            self.body_remaining = head.content_length or 0
                            return head
                return self._next_head()
            if state is _BODY_LENGTH:
                return self._next_length_data()
            if state in _CHUNKED_STATES:
                return self._next_chunked()
            if state is _BODY_UNTIL_CLOSE:
                return self._next_until_close()
        except ProtocolError as exc:
            self._error = self._convert_error(exc)
            raise self._error from None
        if state is _DONE:
            raise ParserStateError("next_event() after EndOfMessage: call start_next()")
        return NEED_DATA  # _SWITCHED: the rest is not HTTP; take_buffered() hands it over

    # -- dispatch -------------------------------------------------------------------

    def _convert_error(self, exc: ProtocolError) -> ProtocolError:
        return exc

    def _parse_head(self, text: str):
        raise NotImplementedError

    def _truncated(self) -> ProtocolError:
        return _bad("connection closed in the middle of a message")

    # -- head -----------------------------------------------------------------------

    def _next_head(self):
        buf = self._buf
        # RFC 9112 §2.2: ignore empty lines before the start line (they count to the limit).
        while buf[:2] == b"\r\n":
            del buf[:2]
            self._skipped += 2
            self._head_scan = self._ending_scan = 0
        end = buf.find(b"\r\n\r\n", self._head_scan)
        if end == -1:
            return self._incomplete_head(buf)
        if end > self._max_line_bytes and not self._line_complete:  # else the line is shorter too
            self._check_line_length(buf.find(b"\r\n"))
        if end + 4 + self._skipped > self._max_header_bytes:
            raise ProtocolError(431, "request header fields too large")
        text = buf[: end + 2].decode("latin-1")
        del buf[: end + 4]
        self._skipped = self._head_scan = self._ending_scan = 0
        self._line_complete = False
        try:
            return self._parse_head(text)
        except ProtocolError:
            self._refused_line = text[: text.find("\r\n")]  # for the access log (request_line())
            raise

    def _incomplete_head(self, buf: bytearray):
        size = len(buf)
        if not self._line_complete:
            line_end = buf.find(b"\r\n", 0, self._max_line_bytes + 2)
            if line_end == -1:
                self._check_line_length(size)
                self._check_partial_start_line(buf)
            else:
                self._line_complete = True
                self._check_start_line(buf, line_end)
        if size + self._skipped >= self._max_header_bytes:
            raise ProtocolError(431, "request header fields too large")
        stop = size - 1 if buf.endswith(b"\r") else size
        if _has_bare_line_ending(buf, self._ending_scan, stop):
            raise _bad("bare CR or LF in message head")
        self._ending_scan = stop
        self._head_scan = max(size - 3, 0)
        if self._eof and size:  # empty lines then a close is still a clean close
            raise self._truncated()
        return NEED_DATA

    def _check_partial_start_line(self, buf: bytearray) -> None:
        """Refuse a start line that can no longer become valid, before the rest of the head arrives."""

    def _check_start_line(self, buf: bytearray, line_end: int) -> None:
        """Refuse a complete but malformed start line without waiting for the rest of the head."""

    def _check_line_length(self, length: int) -> None:
        if length > self._max_line_bytes:
            raise ProtocolError(414, "request line too long")

    def _start_body(self, chunked: bool, length: int | None) -> None:
        if chunked:
            self._state = _CHUNK_SIZE
        elif length is None:
            self._state = _BODY_UNTIL_CLOSE
        else:
            self._state = _BODY_LENGTH
            self.body_remaining = length

    # -- Content-Length body --------------------------------------------------------

    def _next_length_data(self):
        remaining = self.body_remaining
        if not remaining:
            self._state = _DONE
            return _END_OF_MESSAGE
        buf = self._buf
        if not buf:
            if self._eof:
                raise self._truncated()
            return NEED_DATA
        if len(buf) <= remaining:
            data = bytes(buf)
            buf.clear()
        else:
            data = bytes(buf[:remaining])
            del buf[:remaining]
        self.body_remaining = remaining - len(data)
        return Data(data)

    # -- close-delimited body (responses) -------------------------------------------

    def _next_until_close(self):
        buf = self._buf
        if buf:
            data = bytes(buf)
            buf.clear()
            return Data(data)
        if self._eof:
            self._state = _DONE
            return _END_OF_MESSAGE
        return NEED_DATA

    # -- chunked body (RFC 9112 §7.1) -----------------------------------------------

    def _next_chunked(self):
        """Decode every complete piece in the buffer into one Data event.

        One pass by index over the buffer, which is cut once at the end. Whole chunks are taken
        by _take_whole_chunks, where a run of small ones is matched and decoded by two regex calls
        in C: a body of 1-byte chunks costs a tenth of what a Python loop turn per chunk did.
        """
        pieces: list[bytes] = []
        buf = self._buf
        pos = 0
        try:
            while True:
                state = self._state
                if state is _CHUNK_DATA:
                    if pos == len(buf):
                        break
                    pos = self._take_chunk_data(buf, pos, pieces)
                elif state is _CHUNK_SIZE:
                    pos = self._take_whole_chunks(buf, pos, pieces)
                    new_pos = self._read_chunk_size(buf, pos)
                    if new_pos == -1:
                        break
                    pos = new_pos
                elif state is _CHUNK_END:
                    ending = buf[pos:pos + 2]
                    if ending != b"\r\n":
                        if ending in (b"", b"\r"):
                            break
                        raise _bad("chunk data not followed by CRLF")
                    pos += 2
                    self._state = _CHUNK_SIZE
                else:  # _TRAILERS: deliver decoded data first
                    if pieces:
                        break
                    del buf[:pos]
                    pos = 0
                    return self._read_trailers(buf)
        finally:
            del buf[:pos]
        if pieces:
            return Data(b"".join(pieces))
        if self._eof:
            raise self._truncated()
        return NEED_DATA

    def _count_body(self, size: int) -> None:
        self._body_total += size
        if self._max_body_bytes is not None and self._body_total > self._max_body_bytes:
            raise ProtocolError(413, "request body too large")

    def _take_whole_chunks(self, buf: bytearray, pos: int, pieces: list[bytes]) -> int:
        """Decode the complete, well-formed chunks (not the last) at pos; return where they end.

        A fast path only: it stops at anything else (an incomplete or malformed chunk, the last
        chunk, an over-long size line), which _read_chunk_size then reads or refuses.
        """
        small_run = _SMALL_CHUNKS_RE.match
        size_line = _CHUNK_SIZE_LINE_CRLF_RE.match
        total = 0
        while True:
            run = small_run(buf, pos)
            if run is not None:
                data = b"".join(_SMALL_CHUNK_DATA_RE.findall(buf, pos, run.end()))
                total += len(data)
                pieces.append(data)
                pos = run.end()
            line = size_line(buf, pos)
            if line is None:
                break
            start = line.end()
            size = int(line.group(1), 16)
            stop = start + size
            if not size or start - pos > MAX_CHUNK_LINE_BYTES + 2 or buf[stop:stop + 2] != b"\r\n":
                break
            total += size
            pieces.append(buf[start:stop])
            pos = stop + 2
        self._count_body(total)
        return pos

    def _take_chunk_data(self, buf: bytearray, pos: int, pieces: list[bytes]) -> int:
        end = min(pos + self._chunk_remaining, len(buf))
        pieces.append(bytes(buf[pos:end]))
        self._chunk_remaining -= end - pos
        if not self._chunk_remaining:
            self._state = _CHUNK_END
        return end

    def _read_chunk_size(self, buf: bytearray, pos: int) -> int:
        """Read the chunk-size line at pos: the position after it, or -1 if it is incomplete."""
        lf = buf.find(b"\n", pos, pos + MAX_CHUNK_LINE_BYTES + 2)
        if lf == -1:
            if len(buf) - pos > MAX_CHUNK_LINE_BYTES:
                raise _bad("chunk size line too long")
            if buf.find(b"\r", pos, len(buf) - 1) != -1:
                raise _bad("bare CR in chunk size line")
            return -1
        if lf == pos or buf[lf - 1] != 13:
            raise _bad("chunk size line must end with CRLF")
        match = _CHUNK_SIZE_LINE_RE.fullmatch(buf, pos, lf - 1)
        if match is None:
            raise _bad("invalid chunk size line")
        size = int(match.group(1), 16)
        if size == 0:
            self._state = _TRAILERS
            return lf + 1
        self._count_body(size)
        self._chunk_remaining = size
        self._state = _CHUNK_DATA
        return lf + 1

    def _read_trailers(self, buf: bytearray):
        if buf[:2] == b"\r\n":
            del buf[:2]
            self._state = _DONE
            return _END_OF_MESSAGE
        end = buf.find(b"\r\n\r\n")
        if end == -1:
            if len(buf) >= self._max_header_bytes:
                raise ProtocolError(431, "trailer section too large")
            stop = len(buf) - 1 if buf.endswith(b"\r") else len(buf)
            if _has_bare_line_ending(buf, 0, stop):
                raise _bad("bare CR or LF in trailer section")
            if self._eof:
                raise self._truncated()
            return NEED_DATA
        if end + 4 > self._max_header_bytes:
            raise ProtocolError(431, "trailer section too large")
        text = buf[: end + 2].decode("latin-1")
        del buf[: end + 4]
        raw, names, index = _parse_fields(text, 0)
        if FORBIDDEN_TRAILERS.intersection(index):
            if not self._drops_forbidden_trailers:
                _check_trailers(index)  # raises
            # A response's body is already on its way to the client: drop the fields (RFC 9110
            # §6.5.1 lets a recipient ignore them) rather than cut a whole response off at its end.
            raw = [(name, value) for name, value in raw if name.lower() not in FORBIDDEN_TRAILERS]
            names, index = _index_fields(raw)
        self._state = _DONE
        return EndOfMessage(Headers(raw, index, names))


class RequestParser(_MessageParser):
    """Parses the requests a client sends, one after another (pipelining included)."""

    _refused_line: str | None = None  # a complete head's start line the parser refused

    def __init__(
        self,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        known_heads: dict[str, RequestHead] | None = None,
    ) -> None:
        self._max_header_bytes = max_header_bytes
        self._max_body_bytes = max_body_bytes
        self._max_line_bytes = max_line_bytes
        self._buf = bytearray()
        # Keep-alive clients send the same head over and over: the parsers of one owner (a process's
        # connections) may share a table of bodiless heads by their text, so that a head seen before is
        # not parsed again. Heads are never changed once parsed, and a bodiless head's parse depends on
        # its text alone (max_body_bytes only judges a Content-Length), so one object serves them all.
        self._known_heads = known_heads

    # A peer speaking another protocol (a TLS ClientHello on a plain port, SSH, SMTP) sends no CRLFCRLF
    # for a long while: waiting for it would answer 408 after header_timeout. nginx and HAProxy answer
    # 400 at the first byte a request line cannot hold; so do we, for the method and the whole line.
    def _check_partial_start_line(self, buf: bytearray) -> None:
        method_end = _METHOD_PREFIX_RE.match(buf).end()
        if method_end < len(buf) and buf[method_end] != 0x20 and not (
                buf[method_end] == 0x0D and method_end == len(buf) - 1):  # a CR whose LF is on its way
            raise _bad("invalid method")

    def _check_start_line(self, buf: bytearray, line_end: int) -> None:
        if not _REQUEST_LINE_BYTES_RE.fullmatch(buf, 0, line_end):
            raise _bad(_describe_bad_request_line(buf[:line_end].decode("latin-1")))

    def request_line(self) -> tuple[str, str, str] | None:
        """After a ProtocolError: the refused request's method, target and version, for the access log
        (nginx logs the line of a request it answered 400/414/431); None without a whole line of three."""
        line = self._refused_line
        if line is None:
            end = self._buf.find(b"\r\n", 0, self._max_line_bytes + 2)
            line = self._buf[:end].decode("latin-1") if end > 0 else ""
        parts = line.split(" ")
        return (parts[0], parts[1], parts[2]) if len(parts) == 3 else None

    def _parse_head(self, text: str) -> RequestHead:
        """A head next_event did not find among the known ones."""
        line_end = text.find("\r\n")
        line = text[:line_end]
        match = _REQUEST_LINE_RE.fullmatch(line)
        if match is None:
            raise _bad(_describe_bad_request_line(line))
        method, target, major, minor = match.groups()
        # The common case of each step is decided inline, the rest in the helpers: a head is parsed
        # for every request, and each Python call saved shows in the cost per request.
        if major == "1":
            version = "HTTP/1.0" if minor == "0" else "HTTP/1.1"
        else:
            version = _version(major, minor, 505)
        if method == "CONNECT":
            raise ProtocolError(501, "CONNECT is not supported")
        if target[0] == "/" and "#" not in target:
            authority = None  # origin-form, the usual target
        else:
            authority = _request_target_authority(method, target)
        raw, names, index = _parse_fields(text, line_end + 2)
        if not _LOOKALIKES.isdisjoint(index):
            _check_lookalike_names(index)
        host = _request_host(version, index, authority)
        if "transfer-encoding" in index or "content-length" in index:
            content_length, chunked = self._request_framing(version, index)
        else:
            content_length, chunked = None, False
        connection = index.get("connection")
        tokens = _connection_tokens(connection) if connection else _NO_TOKENS
        expect = "expect" in index and _expects_continue(index["expect"])
        # RFC 9110 §7.8: Upgrade in an HTTP/1.0 request MUST be ignored (nor may a 1.0 client get a 101,
        # §15.2); forwarded as 1.1, it would let the backend switch protocols on a 1.0 client.
        upgrade = index.get("upgrade") if "upgrade" in tokens and version == "HTTP/1.1" else None
        # RFC 9112 §9.3: 1.1 persists unless "close"; 1.0 only with "keep-alive".
        keep_alive = "close" not in tokens and (version == "HTTP/1.1" or "keep-alive" in tokens)
        head = RequestHead(
            method, target, version, Headers(raw, index, names), content_length, chunked,
            keep_alive, host, tokens,
            expect and version == "HTTP/1.1",  # RFC 9110 §10.1.1: ignored in HTTP/1.0
            ", ".join(upgrade) if upgrade else None,
        )
        if chunked:
            self._state = _CHUNK_SIZE
        else:  # a request without framing has no body (RFC 9112 §6.3)
            self._state = _BODY_LENGTH
            self.body_remaining = content_length or 0
            known = self._known_heads
            if known is not None and not content_length and len(text) <= KNOWN_HEAD_MAX_CHARS:
                if len(known) >= KNOWN_HEADS_MAX:
                    known.clear()  # many different heads: start over rather than stop learning
                known[text] = head
                head.forwarded = {}  # a head met again: what it is forwarded as is worth keeping
        return head

    def _request_framing(self, version: str, index: dict[str, list[str]]) -> tuple[int | None, bool]:
        """RFC 9112 §6.1-§6.3 for requests: (content_length, chunked)."""
        te = index.get("transfer-encoding")
        cl = index.get("content-length")
        if te is not None:
            if version == "HTTP/1.0":
                raise _bad("Transfer-Encoding in an HTTP/1.0 request")
            if cl is not None:
                raise _bad("both Content-Length and Transfer-Encoding")
            _check_request_transfer_coding(te)
            return None, True
        if cl is None:
            return None, False
        length = _parse_content_length(cl)
        if length > self._max_body_bytes:
            raise ProtocolError(413, "request body too large")
        return length, False


# Requests whose response is framed by the method, not by the head alone (RFC 9112 §6.3 items 1-2).
_OWN_FRAMING_METHODS = frozenset({"HEAD", "CONNECT"})


class ResponseParser(_MessageParser):
    """Parses the response(s) to one request: any 1xx, then the final response."""

    _drops_forbidden_trailers = True  # requests refuse them (400); see _read_trailers

    def __init__(self, request_method: str, max_header_bytes: int = DEFAULT_MAX_RESPONSE_HEADER_BYTES,
                 known_heads: dict[str, ResponseHead] | None = None):
        self._max_header_bytes = self._max_line_bytes = max_header_bytes
        self._max_body_bytes = None
        self._buf = bytearray()
        self._request_method = request_method
        # As RequestParser's: final heads with a Content-Length (the usual small response), by their
        # text. A HEAD or CONNECT request frames the same text differently: none is looked up for those.
        self._known_table = known_heads
        if request_method not in _OWN_FRAMING_METHODS:
            self._known_heads = known_heads

    def start_next(self, request_method: str | None = None) -> None:
        """Reset for the response to the next request sent on this connection."""
        super().start_next()
        if request_method is not None:
            self._request_method = request_method
            self._known_heads = self._known_table if request_method not in _OWN_FRAMING_METHODS else None

    @property
    def body_close_delimited(self) -> bool:
        return self._state is _BODY_UNTIL_CLOSE

    @property
    def switched(self) -> bool:
        """A 101 (or 2xx to CONNECT) arrived: the rest of the stream is not HTTP."""
        return self._state is _SWITCHED

    def _convert_error(self, exc: ProtocolError) -> ProtocolError:
        if exc.status == 502:
            return exc
        return ProtocolError(502, f"invalid upstream response: {exc.reason}")

    def _truncated(self) -> ProtocolError:
        if self._state is _HEAD and not self._buf and not self._skipped:
            return ProtocolError(502, "upstream closed the connection without a response")
        return ProtocolError(502, "upstream closed the connection in the middle of a response")

    def _incomplete_head(self, buf: bytearray):
        if self._eof and not buf:  # no response will come: never NEED_DATA after EOF
            raise self._truncated()
        return super()._incomplete_head(buf)

    def _parse_head(self, text: str) -> ResponseHead:
        """A head next_event did not find among the known ones."""
        known = self._known_heads  # None for a HEAD or CONNECT request
        line_end = text.find("\r\n")
        match = _STATUS_LINE_RE.fullmatch(text, 0, line_end)
        if match is None:
            raise _bad("malformed status line")
        major, minor, code, reason = match.groups()
        if major == "1":
            version = "HTTP/1.0" if minor == "0" else "HTTP/1.1"
        else:
            version = _version(major, minor, 502)
        status = int(code)
        if status < 100 or status > 599:
            raise _bad("status code out of range")
        raw, names, index = _parse_fields(text, line_end + 2)
        connection = index.get("connection")
        tokens = _connection_tokens(connection) if connection else _NO_TOKENS
        # RFC 9112 §9.3: 1.1 persists unless "close"; 1.0 only with "keep-alive".
        keep_alive = "close" not in tokens and (version == "HTTP/1.1" or "keep-alive" in tokens)
        content_length, chunked, keep_alive = self._response_framing(status, version, index, keep_alive)
        head = ResponseHead(
            status, reason or "", version, Headers(raw, index, names), content_length, chunked,
            keep_alive, tokens,
        )
        if known is not None and self._state is _BODY_LENGTH and len(text) <= KNOWN_HEAD_MAX_CHARS:
            if len(known) >= KNOWN_HEADS_MAX:
                known.clear()  # many different heads (a Date per second, ids): start over
            known[text] = head
        return head

    def _response_framing(self, status, version, index, keep_alive):
        """RFC 9112 §6.3, in order. Returns (content_length, chunked, keep_alive)."""
        method = self._request_method
        if status == 101 or (method == "CONNECT" and 200 <= status < 300):
            self._state = _SWITCHED
            return None, False, False
        if status < 200:
            return 0, False, keep_alive  # interim: stay in _HEAD for the final response
        if method == "HEAD" or status in (204, 304):
            self._start_body(False, 0)
            return 0, False, keep_alive
        te = index.get("transfer-encoding")
        cl = index.get("content-length")
        if te is not None:
            if version == "HTTP/1.0":
                raise _bad("Transfer-Encoding in an HTTP/1.0 response")
            chunked = _transfer_codings(te)[-1] == "chunked"
            keep_alive = keep_alive and chunked and cl is None  # §6.3 item 3
            self._start_body(chunked, None)
            return None, chunked, keep_alive
        if cl is not None:
            value = cl[0]  # the usual single "16" inline; lists and oddities in the helper
            if len(cl) == 1 and value.isdigit() and value.isascii() and len(value) <= MAX_CONTENT_LENGTH_DIGITS:
                length = int(value)
            else:
                length = _parse_content_length(cl)
            self._state = _BODY_LENGTH  # _start_body(False, length), inline: every response gets here
            self.body_remaining = length
            return length, False, keep_alive
        self._start_body(False, None)
        return None, False, False
