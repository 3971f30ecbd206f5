"""Response compression for routes with ``compress`` on: which responses, which coding, and the encoders.

The handler asks ``plan_compression`` once per response. Its answer says whether the response is a
candidate at all (then it varies by Accept-Encoding, and caches must be told), and which coding to
use for this client (None: relay as it is). Compression streams: the encoder is flushed after every
upstream read, so an event stream or a long poll that a user chose to compress stays live.
"""

from __future__ import annotations

import zlib

from proxy.config.edge import CompressPolicy

# Both are dependencies. Without one the proxy still starts: the config check refuses the coding
# (proxy.config.edge.missing_library), so its encoder is never asked for.
try:
    import zstandard
except ImportError:  # pragma: no cover - depends on the environment
    zstandard = None
try:
    import brotli
except ImportError:  # pragma: no cover - depends on the environment
    brotli = None

# Skipped even when "text/*" matches, unless listed by name: a compressed stream is only live if
# every event is flushed, which costs ratio; most users want event streams relayed untouched.
EVENT_STREAM = "text/event-stream"
# Levels picked for throughput on the relay path (see docs/performance.md): zstd and gzip at their
# common defaults, brotli at 4 (its default, 11, is meant for precompressed static files).
GZIP_LEVEL = 6
BROTLI_QUALITY = 4
ZSTD_LEVEL = 3
NEVER_COMPRESSED_STATUS = frozenset({204, 206, 304})


# -- negotiation (RFC 9110 §12.5.3) ------------------------------------------------------------------

def accepted_codings(header: str) -> dict[str, float]:
    """Accept-Encoding as {coding: qvalue}; "x-gzip" counts as "gzip" (RFC 9110 §8.4.1.3)."""
    weights: dict[str, float] = {}
    for item in header.split(","):
        coding, _, params = item.partition(";")
        coding = coding.strip(" \t").lower()
        if not coding:
            continue
        if coding == "x-gzip":
            coding = "gzip"
        weights[coding] = _qvalue(params)
    return weights


def _qvalue(params: str) -> float:
    """The q parameter (1 when absent); a malformed one counts as 0, so a garbled offer is never taken."""
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip(" \t").lower() == "q":
            try:
                q = float(value.strip(" \t"))
            except ValueError:
                return 0.0
            return q if 0.0 <= q <= 1.0 else 0.0
    return 1.0


def choose_encoding(accept_encoding: str | None, offered: tuple[str, ...]) -> str | None:
    """The coding to send: the highest qvalue among ``offered`` (ties to ``offered`` order), a coding
    the client did not name taking the "*" weight; None for identity. No Accept-Encoding field means
    no compression: RFC 9110 allows any coding then, but old clients that omit it cannot decode."""
    if not accept_encoding:
        return None
    weights = accepted_codings(accept_encoding)
    wildcard = weights.get("*", 0.0)
    best, best_q = None, 0.0
    for coding in offered:
        q = weights.get(coding, wildcard)
        if q > best_q:
            best, best_q = coding, q
    return best


# -- which responses ------------------------------------------------------------------------------

def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip(" \t").lower()


def type_matches(mime: str, patterns: tuple[str, ...]) -> bool:
    """"text/*" matches any text type, "application/*+json" any JSON suffix type (RFC 6839)."""
    if not mime:
        return False
    if mime == EVENT_STREAM:
        return EVENT_STREAM in patterns
    major, _, minor = mime.partition("/")
    for pattern in patterns:
        if pattern == mime or pattern == f"{major}/*":
            return True
        if pattern.startswith(f"{major}/*+") and minor.endswith(pattern[len(major) + 2:]):
            return True
    return False


def _no_transform(cache_control: list[str]) -> bool:
    return any(directive.strip(" \t").lower() == "no-transform"
               for value in cache_control for directive in value.split(","))


def is_candidate(policy: CompressPolicy, response) -> bool:
    """Would this response be compressed for a client that accepts a coding we offer?"""
    headers = response.headers
    if response.status in NEVER_COMPRESSED_STATUS or response.status < 200:
        return False
    if "content-encoding" in headers.names or "content-range" in headers.names:
        return False  # encoded already (compressing again helps no one), or a part of a whole
    if response.content_length is not None and response.content_length < policy.min_length:
        return False
    if _no_transform(headers.get_all("cache-control")):
        return False  # RFC 9111 §5.2.2.6: intermediaries must not change the content
    return type_matches(media_type(headers.get("content-type")), policy.types)


def plan_compression(policy: CompressPolicy, request_headers, response) -> tuple[bool, str | None]:
    """(candidate, coding): whether the answer varies with Accept-Encoding, and the coding for this client."""
    if not is_candidate(policy, response):
        return False, None
    # Every field line: a list field may be split over several (RFC 9110 §5.3).
    return True, choose_encoding(", ".join(request_headers.get_all("accept-encoding")), policy.encodings)


def compression_for(policy: CompressPolicy, request, response):
    """(head to relay, Encoder or None) for a response on a route with ``compress`` set."""
    if request.method == "HEAD":
        return response, None
    candidate, coding = plan_compression(policy, request.headers, response)
    if not candidate:
        return response, None
    return rewrite_head(response, coding), (new_encoder(coding) if coding else None)


# -- the relayed head -----------------------------------------------------------------------------

class RewrittenHead:
    """A response head with fields changed for compression; quacks like ResponseHead for
    build_response_head (status, reason, headers with names and raw, connection_tokens...)."""

    __slots__ = ("status", "reason", "version", "headers", "content_length", "chunked", "keep_alive",
                 "connection_tokens", "relayed_fields")

    def __init__(self, response, fields: list[tuple[str, str]]):
        self.status, self.reason, self.version = response.status, response.reason, response.version
        self.content_length, self.chunked = response.content_length, response.chunked
        self.keep_alive, self.connection_tokens = response.keep_alive, response.connection_tokens
        self.headers = _FieldList(fields)
        self.relayed_fields = None


class _FieldList:
    __slots__ = ("raw", "names")

    def __init__(self, fields: list[tuple[str, str]]):
        self.raw = fields
        self.names = [name.lower() for name, _ in fields]


def _varies_by_encoding(vary_values: list[str]) -> bool:
    tokens = {token.strip(" \t").lower() for value in vary_values for token in value.split(",")}
    return bool(tokens & {"*", "accept-encoding"})


def rewrite_head(response, coding: str | None) -> RewrittenHead:
    """The head with ``Vary: Accept-Encoding`` added (unless it varies by it already), and for a coding:
    Content-Encoding set, a strong ETag weakened (the bytes differ from the identity ones, RFC 9110
    §8.8.3), Accept-Ranges dropped (ranges of the compressed stream are not offered). Content-Length
    goes with the framing the handler picks."""
    fields = []
    for name, value in response.headers.raw:
        lname = name.lower()
        if coding is not None:
            if lname == "etag" and not value.startswith("W/"):
                value = "W/" + value
            elif lname == "accept-ranges":
                continue
        fields.append((name, value))
    if not _varies_by_encoding(response.headers.get_all("vary")):
        fields.append(("Vary", "Accept-Encoding"))
    if coding is not None:
        fields.append(("Content-Encoding", coding))
    return RewrittenHead(response, fields)


# -- encoders -------------------------------------------------------------------------------------

class Encoder:
    """A streaming encoder: ``compress`` may keep bytes back, ``flush`` emits all taken so far in a
    form the client can decode now, ``finish`` ends the stream."""

    def compress(self, data: bytes) -> bytes:
        raise NotImplementedError

    def flush(self) -> bytes:
        raise NotImplementedError

    def finish(self) -> bytes:
        raise NotImplementedError


class GzipEncoder(Encoder):
    def __init__(self, level: int = GZIP_LEVEL):
        self._zlib = zlib.compressobj(level, zlib.DEFLATED, 31)  # wbits 16+15: a gzip header and trailer

    def compress(self, data: bytes) -> bytes:
        return self._zlib.compress(data)

    def flush(self) -> bytes:
        return self._zlib.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        return self._zlib.flush(zlib.Z_FINISH)


class BrotliEncoder(Encoder):
    def __init__(self, quality: int = BROTLI_QUALITY):
        self._brotli = brotli.Compressor(quality=quality)

    def compress(self, data: bytes) -> bytes:
        return self._brotli.process(data)

    def flush(self) -> bytes:
        return self._brotli.flush()

    def finish(self) -> bytes:
        return self._brotli.finish()


class ZstdEncoder(Encoder):
    def __init__(self, level: int = ZSTD_LEVEL):
        self._zstd = zstandard.ZstdCompressor(level=level).compressobj()

    def compress(self, data: bytes) -> bytes:
        return self._zstd.compress(data)

    def flush(self) -> bytes:
        return self._zstd.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)

    def finish(self) -> bytes:
        return self._zstd.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH)


_ENCODERS = {"gzip": GzipEncoder, "br": BrotliEncoder, "zstd": ZstdEncoder}


def new_encoder(coding: str) -> Encoder:
    return _ENCODERS[coding]()
