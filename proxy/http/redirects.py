"""Redirects answered by the proxy itself: a route's ``redirect`` and a listener's ``redirect_https``.

A route's ``to`` is a template with placeholders filled from the request: ``{host}`` (the Host header
without its port), ``{path}`` (the normalised path the route matched), ``{query}`` (``?`` and the query
string, or nothing) and ``{uri}`` (``{path}{query}``).
"""

from __future__ import annotations

from proxy.config.edge import PLACEHOLDER, RedirectPolicy
from proxy.http.responses import plain_response

HTTPS_PORT = 443


def location(policy: RedirectPolicy, host: str | None, path: str, query: str) -> str:
    """The Location for one request. ``query`` is "" or starts with "?" (as routing splits it)."""
    values = {"host": host or "", "path": path, "query": query, "uri": path + query}
    return PLACEHOLDER.sub(lambda match: values[match.group(1)], policy.to)


def https_location(host: str, port: int, path: str, query: str) -> str:
    """The same URL on https: ``host`` without its port, the port shown only when it is not 443."""
    authority = host if port == HTTPS_PORT else f"{host}:{port}"
    return f"https://{authority}{path}{query}"


def redirect_response(status: int, target: str, *, close: bool, head_only: bool, extra_headers: tuple = ()) -> bytes:
    """A complete redirect with a short text body naming where to go (for clients that show it)."""
    return plain_response(status, f"{status} redirecting to {target}", close=close, head_only=head_only,
                          extra_headers=(("Location", target),) + tuple(extra_headers))


def https_port(listen_entries) -> int:
    """Where redirect_https sends clients: the port of the first TLS listener in the config, else 443
    (a proxy behind a load balancer that terminates TLS on 443 has no TLS listener of its own)."""
    return next((entry.port for entry in listen_entries if entry.tls), HTTPS_PORT)
