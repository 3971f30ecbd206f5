"""Typed failures of the forwarding path. Each carries the status the client should see.

Client-side protocol errors come from the parser (``proxy.http.http1.ProtocolError``, 400/413/414/431...);
the ones here are about the upstream side and the proxy itself.
"""

from __future__ import annotations


class ProxyError(Exception):
    """A failure that maps to one response from the proxy itself."""

    status = 502
    reason = "Bad Gateway"

    def __init__(self, detail: str = "", status: int | None = None):
        super().__init__(detail or self.reason)
        if status is not None:
            self.status = status
        self.detail = detail or self.reason


class NoRoute(ProxyError):
    status, reason = 404, "no route matches this request"


class Refused(ProxyError):
    """A route's edge policy said no. The answer says only that (plus ``headers``, such as a 401's
    challenge); ``log_detail`` (which address, which user) goes to the log, not to the client, and
    an empty one is not logged."""

    headers: tuple[tuple[str, str], ...] = ()

    def __init__(self, detail: str = "", status: int | None = None, *, log_detail: str = "",
                 headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(detail, status)
        self.log_detail = log_detail
        self.headers = headers


class Forbidden(Refused):
    """A route's allow / deny rules refuse this client."""

    status, reason = 403, "access denied"


class Unauthorized(Refused):
    """A route's basic_auth wants credentials: none came, or they are wrong. ``headers`` carry the
    WWW-Authenticate challenge (RFC 9110 §11.6.1: a 401 must have one)."""

    status, reason = 401, "authentication required"


class TooManyRequests(Refused):
    """A route's rate_limit has no token left for this client: ``headers`` carry Retry-After and the
    RateLimit-* fields."""

    status, reason = 429, "too many requests"


class NoServerAvailable(ProxyError):
    status, reason = 503, "no server available"


class UpstreamConnectError(ProxyError):
    """The request never reached the server: always safe to try another one.

    ``address`` is the server dialled ("host:port") and ``refused`` says nothing was listening there
    (ECONNREFUSED): the error page uses both to tell a developer which dev server is not running.
    """

    status, reason = 502, "could not connect to upstream"

    def __init__(self, detail: str = "", status: int | None = None, *, address: str | None = None,
                 refused: bool = False):
        super().__init__(detail, status)
        self.address = address
        self.refused = refused


class UpstreamTimeout(ProxyError):
    status, reason = 504, "upstream timed out"


class UpstreamFailed(ProxyError):
    """Refused, reset or garbage after the request (or part of it) was sent."""

    status, reason = 502, "upstream failed"

    def __init__(self, detail: str = "", status: int | None = None, stale: bool = False,
                 no_response: bool = False, not_taken: bool = False):
        super().__init__(detail, status)
        # stale: a reused keep-alive connection died before any response byte (retry may be safe)
        self.stale = stale
        # not_taken: the server said it did not take the request (a 408 on a reused connection), so
        # it may be repeated whatever its method (RFC 9110 §15.5.9)
        self.not_taken = not_taken
        # no_response: the connection failed before any response byte (an idempotent request may
        # be repeated elsewhere, RFC 9110 §9.2.2)
        self.no_response = no_response or stale


class ClientGone(Exception):
    """The client closed or reset its connection; nothing can be sent to it any more."""
