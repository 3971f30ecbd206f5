"""Data-driven conformance cases: raw request bytes -> what the client and the upstream must see.

Each ``Case`` says: the statuses the client reads (in order: several for a pipeline), whether the
proxy then closes the connection, and what the upstream received -- a list of ``Fwd`` (exact head
bytes, decoded body), one per execution, in order. The runner sends each case whole and one byte
at a time; both must give the same result.

Families and sources (each read, then written as our own cases): RFC 9112 §2-§7 and RFC 9110 §5-§10;
PortSwigger's request smuggling research (CL.TE, TE.CL, TE.TE obfuscations); defparam's smuggler
mutations (tab/space/case/lookalike Transfer-Encoding); http-garden's findings (chunk-ext, bare CR,
number parsing); HAProxy's h1 regression tests; llhttp's and h11's test suites (invalid versions,
targets, obs-fold, chunk lines).

The forwarded head is canonical: request line always HTTP/1.1 with an origin-form target, ``Host``
second, the client's end-to-end headers in order with OWS trimmed, then the proxy's own headers,
then exactly one framing header (``Content-Length`` or ``Transfer-Encoding: chunked``), so no
laxer parser downstream can read it as a different message.
"""

from __future__ import annotations

from dataclasses import dataclass, field

REQUEST_ID = "conformance"  # sent by every case, so the forwarded X-Request-Id is predictable
UPSTREAM = "{upstream}"     # placeholder for the upstream's address (Host when the client sent none)


@dataclass(frozen=True)
class Fwd:
    """What one upstream execution received."""
    head: bytes
    body: bytes = b""


@dataclass(frozen=True)
class Case:
    name: str
    request: bytes
    statuses: tuple[int, ...]
    closed: bool
    forwarded: tuple[Fwd, ...] = field(default_factory=tuple)


def req(line: str, *headers: str, body: bytes = b"", rid: bool = True) -> bytes:
    """A raw request: ``line``, headers (each a full "Name: value" text, sent as given), body."""
    lines = [line, *headers] + ([f"X-Request-Id: {REQUEST_ID}"] if rid else [])
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def fwd(method: str = "GET", target: str = "/", host: str = "a", headers: tuple = (), body: bytes = b"",
        framing: str | None = None, forwarded_host: str | None = None, xff: str = "127.0.0.1",
        via: str = "1.1 pyproxy") -> Fwd:
    """The canonical head the proxy must send upstream (see the module docstring)."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", *headers,
             f"X-Forwarded-For: {xff}", "X-Forwarded-Proto: http",
             f"X-Forwarded-Host: {forwarded_host or host}", f"Via: {via}", f"X-Request-Id: {REQUEST_ID}"]
    if framing is None:
        framing = "length" if body else "none"
    if framing == "length":
        lines.append(f"Content-Length: {len(body)}")
    elif framing == "chunked":
        lines.append("Transfer-Encoding: chunked")
    return Fwd(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), body)


def ok(name: str, request: bytes, *forwarded: Fwd, closed: bool = False) -> Case:
    return Case(name, request, (200,) * len(forwarded), closed, forwarded)


def refused(name: str, request: bytes, status: int = 400) -> Case:
    """Refused before anything reached the upstream; the connection is closed (RFC 9112 §11.2)."""
    return Case(name, request, (status,), True, ())


POST = "POST / HTTP/1.1"
GET = "GET / HTTP/1.1"
HOST = "Host: a"
TE = "Transfer-Encoding: chunked"
CHUNKED_ABC = b"3\r\nabc\r\n0\r\n\r\n"


def _te_variant(name: str, te_line: str, chunked_ok: bool, status: int = 400) -> Case:
    request = req(POST, HOST, te_line, body=CHUNKED_ABC)
    if chunked_ok:
        return ok(name, request, fwd("POST", body=b"abc", framing="chunked"))
    return refused(name, request, status)


# -- 1. Transfer-Encoding / Content-Length conflicts and obfuscations ------------------------------
TE_CL = [
    refused("te-and-cl", req(POST, HOST, TE, "Content-Length: 3", body=CHUNKED_ABC)),
    refused("cl-and-te", req(POST, HOST, "Content-Length: 3", TE, body=CHUNKED_ABC)),
    refused("cl-and-te-cl-zero", req(POST, HOST, "Content-Length: 0", TE, body=CHUNKED_ABC)),
    _te_variant("te-uppercase-value", "Transfer-Encoding: CHUNKED", True),
    _te_variant("te-mixed-case-value", "Transfer-Encoding: ChUnKeD", True),
    _te_variant("te-lowercase-name", "transfer-encoding: chunked", True),
    _te_variant("te-tab-before-value", "Transfer-Encoding:\tchunked", True),
    _te_variant("te-trailing-ows", "Transfer-Encoding: chunked \t", True),
    _te_variant("te-no-space", "Transfer-Encoding:chunked", True),
    _te_variant("te-space-before-colon", "Transfer-Encoding : chunked", False),
    _te_variant("te-tab-before-colon", "Transfer-Encoding\t: chunked", False),
    _te_variant("te-xchunked", "Transfer-Encoding: xchunked", False),
    _te_variant("te-chunked-x", "Transfer-Encoding: chunkedx", False),
    _te_variant("te-chunked-identity", "Transfer-Encoding: chunked, identity", False),
    _te_variant("te-identity-chunked", "Transfer-Encoding: identity, chunked", False, 501),
    _te_variant("te-gzip-chunked", "Transfer-Encoding: gzip, chunked", False, 501),
    _te_variant("te-chunked-twice-list", "Transfer-Encoding: chunked, chunked", False),
    _te_variant("te-vertical-tab", "Transfer-Encoding: \x0bchunked", False),
    _te_variant("te-form-feed", "Transfer-Encoding: \x0cchunked", False),
    _te_variant("te-quoted", 'Transfer-Encoding: "chunked"', False),
    _te_variant("te-empty", "Transfer-Encoding: ", False),
    # RFC 9110 §5.6.1.2 asks recipients to skip empty list elements; refusing is stricter and safe.
    _te_variant("te-empty-list-element", "Transfer-Encoding: , chunked", False),
    _te_variant("te-underscore-lookalike", "Transfer_Encoding: chunked", False),
    refused("te-duplicate-headers", req(POST, HOST, TE, TE, body=CHUNKED_ABC)),
    refused("te-second-header-other", req(POST, HOST, TE, "Transfer-Encoding: identity", body=CHUNKED_ABC)),
    refused("te-with-http10", req("POST / HTTP/1.0", HOST, TE, body=CHUNKED_ABC)),
    refused("te-obs-fold", req(POST, HOST, "Transfer-Encoding:", " chunked", body=CHUNKED_ABC)),
    refused("cl-lookalike-with-te", req(POST, HOST, "Content_Length: 3", TE, body=CHUNKED_ABC)),
    ok("chunked-body-on-get", req(GET, HOST, TE, body=CHUNKED_ABC), fwd("GET", body=b"abc", framing="chunked")),
]

# -- 2. Content-Length values ----------------------------------------------------------------------
def _cl(name: str, value: str, body: bytes = b"abc") -> Case:
    return refused(name, req(POST, HOST, f"Content-Length: {value}", body=body))


CONTENT_LENGTH = [
    _cl("cl-plus", "+3"),
    _cl("cl-minus", "-1"),
    _cl("cl-underscore", "1_0"),
    _cl("cl-hex", "0x3"),
    _cl("cl-inner-space", "1 0"),
    _cl("cl-overflow", "99999999999999999999"),
    _cl("cl-list-different", "1,2"),
    _cl("cl-empty", ""),
    _cl("cl-decimal", "3.0"),
    _cl("cl-superscript-digit", "\u00b3"),
    _cl("cl-exponent", "3e0"),
    refused("cl-two-different-headers", req(POST, HOST, "Content-Length: 3", "Content-Length: 4", body=b"abcd")),
    refused("cl-space-before-colon", req(POST, HOST, "Content-Length : 3", body=b"abc")),
    refused("cl-too-large", req(POST, HOST, "Content-Length: 999999999999", body=b"abc"), 413),
    ok("cl-identical-list", req(POST, HOST, "Content-Length: 3, 3", body=b"abc"), fwd("POST", body=b"abc")),
    ok("cl-identical-headers", req(POST, HOST, "Content-Length: 3", "Content-Length: 3", body=b"abc"),
       fwd("POST", body=b"abc")),
    ok("cl-leading-zeros", req(POST, HOST, "Content-Length: 003", body=b"abc"), fwd("POST", body=b"abc")),
    ok("cl-on-get", req(GET, HOST, "Content-Length: 3", body=b"abc"), fwd("GET", body=b"abc")),
    ok("cl-zero-post", req(POST, HOST, "Content-Length: 0"), fwd("POST")),
]

# -- 3. Chunked framing ----------------------------------------------------------------------------
def _chunks(name: str, body: bytes, status: int = 400) -> Case:
    return refused(name, req(POST, HOST, TE, body=body), status)


CHUNKS = [
    _chunks("chunk-ext-bare-lf", b"1;a=b\nX\r\n0\r\n\r\n"),
    _chunks("chunk-size-bare-lf", b"1\nX\r\n0\r\n\r\n"),
    _chunks("chunk-size-bare-cr", b"1\rX\r\n0\r\n\r\n"),
    _chunks("chunk-size-negative", b"-1\r\nX\r\n0\r\n\r\n"),
    _chunks("chunk-size-0x", b"0x5\r\nXXXXX\r\n0\r\n\r\n"),
    _chunks("chunk-size-17-hex-digits", b"10000000000000001\r\nX\r\n0\r\n\r\n"),
    _chunks("chunk-size-huge", b"ffffffffffffffff\r\nX\r\n0\r\n\r\n", 413),
    _chunks("chunk-size-leading-space", b" 1\r\nX\r\n0\r\n\r\n"),
    _chunks("chunk-size-trailing-space", b"1 \r\nX\r\n0\r\n\r\n"),
    _chunks("chunk-size-underscore", b"1_0\r\n" + b"X" * 16 + b"\r\n0\r\n\r\n"),
    _chunks("chunk-size-empty", b"\r\nX\r\n0\r\n\r\n"),
    _chunks("chunk-ext-empty", b"1;\r\nX\r\n0\r\n\r\n"),
    _chunks("chunk-ext-space-in-value", b"1;a=b c\r\nX\r\n0\r\n\r\n"),
    _chunks("chunk-ext-nul", b"1;a=\x00\r\nX\r\n0\r\n\r\n"),
    _chunks("chunk-data-too-long", b"1\r\nXY\r\n0\r\n\r\n"),
    _chunks("chunk-data-lf-only", b"1\r\nX\n0\r\n\r\n"),
    _chunks("last-chunk-bare-lf", b"0\r\n\n"),
    _chunks("trailer-bare-lf", b"0\r\nX-T: 1\n\r\n"),
    _chunks("trailer-content-length", b"0\r\nContent-Length: 5\r\n\r\n"),
    _chunks("trailer-transfer-encoding", b"0\r\nTransfer-Encoding: chunked\r\n\r\n"),
    _chunks("trailer-host", b"0\r\nHost: evil\r\n\r\n"),
    _chunks("trailer-obs-fold", b"0\r\nX-T: 1\r\n 2\r\n\r\n"),
    ok("chunk-ext-dropped", req(POST, HOST, TE, body=b"3;name=value;q=\"a b\"\r\nabc\r\n0;z\r\n\r\n"),
       fwd("POST", body=b"abc", framing="chunked")),
    ok("chunk-size-leading-zeros-uppercase", req(POST, HOST, TE, body=b"000A\r\n0123456789\r\n0\r\n\r\n"),
       fwd("POST", body=b"0123456789", framing="chunked")),
    ok("chunk-benign-trailer-dropped", req(POST, HOST, TE, body=b"3\r\nabc\r\n0\r\nX-Checksum: 1\r\n\r\n"),
       fwd("POST", body=b"abc", framing="chunked")),
    ok("chunk-empty-body", req(POST, HOST, TE, body=b"0\r\n\r\n"), fwd("POST", framing="chunked")),
]

# -- 4. The head: line endings, folding, whitespace, control bytes, names -------------------------
HEAD = [
    refused("bare-cr-in-request-line", b"GET / HTTP/1.1\rHost: a\r\n\r\n"),
    refused("bare-lf-after-request-line", b"GET / HTTP/1.1\nHost: a\r\n\r\n"),
    refused("bare-lf-between-headers", b"GET / HTTP/1.1\r\nHost: a\nX-A: b\r\n\r\n"),
    refused("bare-lf-end-of-head", b"GET / HTTP/1.1\r\nHost: a\n\n"),
    refused("bare-cr-in-value", req(GET, HOST, "X-A: b\rc")),
    refused("obs-fold-space", req(GET, HOST, "X-A: b", " c")),
    refused("obs-fold-tab", req(GET, HOST, "X-A: b", "\tc")),
    refused("obs-fold-first-header", req(GET, " Host: a")),
    refused("space-before-colon", req(GET, "Host : a")),
    refused("tab-before-colon", req(GET, HOST, "X-A\t: b")),
    refused("nul-in-value", req(GET, HOST, "X-A: b\x00c")),
    refused("nul-in-name", req(GET, HOST, "X-\x00A: b")),
    refused("ctl-in-value", req(GET, HOST, "X-A: b\x01c")),
    refused("del-in-value", req(GET, HOST, "X-A: b\x7fc")),
    refused("vtab-in-value", req(GET, HOST, "X-A: b\x0bc")),
    refused("space-in-name", req(GET, HOST, "X A: b")),
    refused("quote-in-name", req(GET, HOST, 'X"A: b')),
    refused("paren-in-name", req(GET, HOST, "(X): b")),
    refused("empty-name", req(GET, HOST, ": b")),
    refused("no-colon", req(GET, HOST, "X-A b")),
    refused("high-bit-name", req(GET, HOST, "X-\xe9: b")),
    refused("method-non-token", req("G@T / HTTP/1.1", HOST)),
    refused("method-with-nul", req("GE\x00T / HTTP/1.1", HOST)),
    refused("method-empty", req(" / HTTP/1.1", HOST)),
    refused("double-space-after-method", req("GET  / HTTP/1.1", HOST)),
    refused("tab-separator", req("GET\t/ HTTP/1.1", HOST)),
    refused("trailing-space-after-version", req("GET / HTTP/1.1 ", HOST)),
    ok("empty-lines-before-request", b"\r\n\r\n" + req(GET, HOST), fwd()),
    ok("obs-text-in-value-kept", req(GET, HOST, "X-A: caf\xe9"), fwd(headers=("X-A: caf\xe9",))),
    ok("custom-token-method", req("PROPFIND / HTTP/1.1", HOST), fwd("PROPFIND")),
    ok("ows-trimmed", req(GET, HOST, "X-A: \t b  c \t"), fwd(headers=("X-A: b  c",))),
    ok("name-case-kept-host-canonical", req(GET, "host: a", "x-a: b"), fwd(headers=("x-a: b",))),
]

# -- 5. Versions ---------------------------------------------------------------------------------
VERSIONS = [
    refused("http-2.0", req("GET / HTTP/2.0", HOST), 505),
    refused("http-3.0", req("GET / HTTP/3.0", HOST), 505),
    # RFC 9110 §2.5, RFC 9112 §2.3: a later HTTP/1 minor version is handled, and forwarded, as 1.1.
    ok("http-1.2-handled-as-1.1", req("GET / HTTP/1.2", HOST), fwd()),
    refused("http-0.9-no-version", b"GET /\r\n\r\n"),
    refused("http-0.9-version", req("GET / HTTP/0.9", HOST)),
    refused("http-1.10", req("GET / HTTP/1.10", HOST)),
    refused("http-lowercase", req("GET / http/1.1", HOST)),
    refused("http-leading-zero", req("GET / HTTP/01.1", HOST)),
    refused("http-no-minor", req("GET / HTTP/1", HOST)),
    refused("http-garbage", req("GET / HTTPS/1.1", HOST)),
    ok("http-1.0-forwarded-as-1.1-then-closed", req("GET / HTTP/1.0", HOST), fwd(), closed=True),
    ok("http-1.0-keep-alive", req("GET / HTTP/1.0", HOST, "Connection: keep-alive"), fwd()),
]

# -- 6. Request targets, CONNECT -----------------------------------------------------------------
TARGETS = [
    refused("target-relative", req("GET foo HTTP/1.1", HOST)),
    refused("target-asterisk-get", req("GET * HTTP/1.1", HOST)),
    refused("target-authority-get", req("GET a:80 HTTP/1.1", HOST)),
    refused("target-fragment", req("GET /a#b HTTP/1.1", HOST)),
    refused("target-ftp-scheme", req("GET ftp://a/ HTTP/1.1", HOST)),
    refused("target-empty-authority", req("GET http:///x HTTP/1.1", HOST)),
    refused("target-userinfo", req("GET http://u@a/ HTTP/1.1", HOST)),
    refused("target-nul", req("GET /a\x00b HTTP/1.1", HOST)),
    refused("target-high-bit", req("GET /caf\xe9 HTTP/1.1", HOST)),
    refused("target-del", req("GET /a\x7f HTTP/1.1", HOST)),
    refused("connect", req("CONNECT a:443 HTTP/1.1", "Host: a:443"), 501),
    refused("connect-origin-form", req("CONNECT / HTTP/1.1", HOST), 501),
    ok("options-asterisk", req("OPTIONS * HTTP/1.1", HOST), fwd("OPTIONS", "*")),
    ok("absolute-form-without-path", req("GET http://a HTTP/1.1", HOST), fwd()),
    ok("absolute-form-query-only", req("GET http://a?q=1 HTTP/1.1", HOST), fwd(target="/?q=1")),
    ok("absolute-form-https-scheme-case", req("GET HTTPS://a/x HTTP/1.1", HOST), fwd(target="/x")),
    ok("query-kept-verbatim", req("GET /p?a=%2e%2e/../x&b HTTP/1.1", HOST), fwd(target="/p?a=%2e%2e/../x&b")),
]

# -- 7. Host -------------------------------------------------------------------------------------
HOSTS = [
    refused("host-missing", req(GET)),
    refused("host-duplicate", req(GET, HOST, HOST)),
    refused("host-duplicate-different", req(GET, HOST, "Host: b")),
    refused("host-list", req(GET, "Host: a, b")),
    refused("host-space", req(GET, "Host: a b")),
    refused("host-userinfo", req(GET, "Host: u@a")),
    refused("host-slash", req(GET, "Host: a/b")),
    refused("host-empty", req(GET, "Host: ")),
    refused("host-port-only", req(GET, "Host: :80")),
    ok("underscore-in-other-names-forwarded", req(GET, HOST, "X_Custom: b"), fwd(headers=("X_Custom: b",))),
    refused("host-invalid-with-absolute-form", req("GET http://b/ HTTP/1.1", "Host: a/b")),
    ok("host-with-port", req(GET, "Host: a:8080"), fwd(host="a:8080")),
    ok("host-lowercased", req(GET, "Host: A.Example"), fwd(host="a.example")),
    ok("host-ipv6", req(GET, "Host: [::1]:80"), fwd(host="[::1]:80")),
    # RFC 9112 §3.2.2: the absolute-form authority wins; the upstream hears the target's host.
    ok("host-disagrees-with-absolute-form", req("GET http://b/x HTTP/1.1", HOST), fwd(target="/x", host="b")),
    ok("host-missing-absolute-form-http10", req("GET http://b/x HTTP/1.0"), fwd(target="/x", host="b"),
       closed=True),
    ok("host-missing-http10", req("GET / HTTP/1.0"), fwd(host=UPSTREAM), closed=True),
]

# -- 8. Pipelines --------------------------------------------------------------------------------
_FIRST = req(GET, HOST)
_SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
PIPELINES = [
    Case("pipeline-valid-then-valid", _FIRST + req("GET /2 HTTP/1.1", HOST), (200, 200), False,
         (fwd(), fwd(target="/2"))),
    Case("pipeline-second-bad-cl", _FIRST + req(POST, HOST, "Content-Length: -1"), (200, 400), True, (fwd(),)),
    Case("pipeline-second-te-cl", _FIRST + req(POST, HOST, TE, "Content-Length: 3", body=CHUNKED_ABC),
         (200, 400), True, (fwd(),)),
    Case("pipeline-second-bare-lf", _FIRST + b"GET /2 HTTP/1.1\nHost: a\r\n\r\n", (200, 400), True, (fwd(),)),
    Case("pipeline-second-http09", _FIRST + b"GET /2\r\n\r\n", (200, 400), True, (fwd(),)),
    Case("pipeline-second-bad-chunk", _FIRST + req(POST, HOST, TE, body=b"zz\r\n\r\n"), (200, 400), True,
         (fwd(),)),
    Case("pipeline-body-looks-like-request",
         req(POST, HOST, f"Content-Length: {len(_SMUGGLED)}", body=_SMUGGLED) + req("GET /2 HTTP/1.1", HOST),
         (200, 200), False, (fwd("POST", body=_SMUGGLED), fwd(target="/2"))),
    Case("pipeline-chunked-then-get", req(POST, HOST, TE, body=b"3\r\nabc\r\n0\r\n\r\n") + _FIRST, (200, 200),
         False, (fwd("POST", body=b"abc", framing="chunked"), fwd())),
    Case("pipeline-after-close-ignored", req(GET, HOST, "Connection: close") + req("GET /2 HTTP/1.1", HOST),
         (200,), True, (fwd(),)),
]

# -- 9. Expect -----------------------------------------------------------------------------------
EXPECT = [
    refused("expect-unknown", req(POST, HOST, "Expect: something-else", "Content-Length: 3", body=b"abc"), 417),
    refused("expect-list-with-unknown", req(GET, HOST, "Expect: 100-continue, foo"), 417),
    ok("expect-100-body-sent-eagerly", req(POST, HOST, "Expect: 100-continue", "Content-Length: 3", body=b"abc"),
       fwd("POST", headers=("Expect: 100-continue",), body=b"abc")),
    ok("expect-100-case-insensitive-no-body", req(GET, HOST, "Expect: 100-Continue"),
       fwd(headers=("Expect: 100-Continue",))),
]

# -- 10. Hop-by-hop and forwarding headers ---------------------------------------------------------
FORWARDING = [
    ok("hop-by-hop-stripped",
       req(GET, HOST, "Connection: keep-alive, X-Secret", "X-Secret: 1", "Keep-Alive: timeout=5", "TE: trailers",
           "Proxy-Connection: keep-alive", "Trailer: X-T", "Upgrade: h2c", "Proxy-Authorization: Basic eA==",
           "X-Kept: yes"),
       fwd(headers=("X-Kept: yes",))),
    ok("connection-names-a-proxy-header", req(GET, HOST, "Connection: X-Forwarded-For", "X-Forwarded-For: 6.6.6.6"),
       fwd()),
    ok("xff-appended-by-default", req(GET, HOST, "X-Forwarded-For: 10.0.0.1"), fwd(xff="10.0.0.1, 127.0.0.1")),
    ok("xff-repeated-joined", req(GET, HOST, "X-Forwarded-For: 10.0.0.1", "X-Forwarded-For: 10.0.0.2"),
       fwd(xff="10.0.0.1, 10.0.0.2, 127.0.0.1")),
    ok("client-x-forwarded-proto-host-replaced",
       req(GET, HOST, "X-Forwarded-Proto: https", "X-Forwarded-Host: evil"), fwd()),
    ok("via-appended", req(GET, HOST, "Via: 1.0 edge"), fwd(via="1.0 edge, 1.1 pyproxy")),
]

ALL_CASES: list[Case] = (TE_CL + CONTENT_LENGTH + CHUNKS + HEAD + VERSIONS + TARGETS + HOSTS + PIPELINES
                         + EXPECT + FORWARDING)
