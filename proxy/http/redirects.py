"""Redirects answered by the proxy itself: a route's ``redirect`` and a listener's ``redirect_https``.

A route's ``to`` is a template with placeholders filled from the request: ``{host}`` (the Host header
without its port), ``{path}`` (the normalised path the route matched), ``{query}`` (``?`` and the query
string, or nothing) and ``{uri}`` (``{path}{query}``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from proxy.config.units import describe_value
from proxy.http.responses import plain_response

REDIRECT_STATUSES = (301, 302, 303, 307, 308)
DEFAULT_STATUS = 308  # permanent, and the method and body are kept (unlike 301, RFC 9110 §15.4.9)
PLACEHOLDERS = ("host", "uri", "path", "query")
REDIRECT_KEYS = ("to", "status")  # the table form of a route's ``redirect``
HTTPS_PORT = 443
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


@dataclass(frozen=True)
class RedirectPolicy:
    """A route's ``redirect``, validated: the Location template and the status."""

    to: str
    status: int = DEFAULT_STATUS

    @property
    def needs_host(self) -> bool:
        return "{host}" in self.to


def location(policy: RedirectPolicy, host: str | None, path: str, query: str) -> str:
    """The Location for one request. ``query`` is "" or starts with "?" (as routing splits it)."""
    values = {"host": host or "", "path": path, "query": query, "uri": path + query}
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], policy.to)


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


# -- config ---------------------------------------------------------------------------------------

def parse_redirect(value, path: str, add) -> RedirectPolicy | None:
    """A route's ``redirect`` table {to, status}. Problems go to ``add(key path, message)``."""
    if not isinstance(value, dict):
        add(path, f'expected a table like {{ to = "https://example.com{{uri}}", status = 308 }}, '
                  f"got {describe_value(value)}")
        return None
    ok = True
    for key in value:
        if key not in REDIRECT_KEYS:
            add(f"{path}.{key}", f"unknown key (expected one of: {', '.join(REDIRECT_KEYS)})")
            ok = False
    status = value.get("status", DEFAULT_STATUS)
    if status not in REDIRECT_STATUSES or isinstance(status, bool):
        add(f"{path}.status", f"{describe_value(status)} is not one of {' | '.join(map(str, REDIRECT_STATUSES))}")
        ok = False
    if "to" not in value:
        add(path, 'missing required key "to"')
        return None
    problem = _template_problem(value["to"])
    if problem:
        add(f"{path}.to", problem)
        return None
    return RedirectPolicy(value["to"], status) if ok else None


def _template_problem(to) -> str | None:
    if not isinstance(to, str) or not to:
        return f'expected a URL like "https://example.com{{uri}}", got {describe_value(to)}'
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in to):
        return f"{describe_value(to)} is not a valid URL (no spaces or control characters)"
    if not (to.startswith("/") or to.lower().startswith(("http://", "https://"))):
        return f'{describe_value(to)} must start with "http://", "https://" or "/"'
    for name in _PLACEHOLDER.findall(to):
        if name not in PLACEHOLDERS:
            return f"unknown placeholder {{{name}}} (use {', '.join('{' + p + '}' for p in PLACEHOLDERS)})"
    if "{" in _PLACEHOLDER.sub("", to) or "}" in _PLACEHOLDER.sub("", to):
        return f"{describe_value(to)} has an unmatched brace"
    return None
