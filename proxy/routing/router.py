r"""Route matching: host (exact > "*.wildcard", longest first > any) then the longest path prefix, ties to
file order.

Matching runs on a normalised path (RFC 3986 §6.2.2: unreserved percent-escapes decoded, dot-segments
removed), so ``/api/../admin`` cannot slip past a route meant for ``/admin``. The same normalised path
is what we forward (route on the form you forward), with the route's prefix stripped if asked.

Decisions (the request smuggling / path confusion research: Orange Tsai's "Breaking Parser Logic"):

* ``%2F`` and ``%5C`` stay encoded and are opaque characters for routing: ``/api%2Fx`` is not under
  ``/api``. APIs use them in identifiers (``/projects/group%2Fname``), so they are not refused...
* ...except next to a dot-segment: a backend that decodes ``%2F``/``%5C`` or treats ``\`` as ``/``
  would read ``/public/..%2Fadmin`` as ``/admin`` on a route we matched as ``/public``. Any path that
  still holds a ``.``/``..`` segment once ``%2F``, ``%5C`` and ``\`` are read as ``/`` and ``;params``
  are cut from segments (Tomcat's ``/..;/``) -> 400.
* Runs of ``/`` are merged (nginx ``merge_slashes on``): ``//admin`` routes and forwards as ``/admin``,
  since many backends merge them and would otherwise serve a path we routed differently.
* ``;params`` and ``\`` stay in the path and route as part of their segment, unless reading the path
  as lenient backends do (servlet containers cut ;params, IIS takes ``\`` for ``/``) would pick another
  route: ``/admin;x`` or ``/admin\x`` with a route for ``/admin`` -> 400, while ``/app;jsessionid=1/x``
  with no route that tells the two apart is forwarded as it is.
* ``%00`` and a ``..`` above the root -> 400.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from proxy.http.access import AccessRules
from proxy.http.basic_auth import BasicAuth
from proxy.http.forwarding import RouteHeaders
from proxy.http.rate_limit import RateLimiter

# RFC 3986 §2.3 unreserved characters: decoding them never changes a URI's meaning.
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")


class BadPath(ValueError):
    """A path that cannot be normalised safely (escapes above the root, encoded NUL...)."""


def _decode_unreserved(match: re.Match) -> str:
    code = int(match.group(1), 16)
    if code == 0:
        raise BadPath("encoded NUL in path")
    if code in _UNRESERVED:
        return chr(code)
    return "%" + match.group(1).upper()  # RFC 3986 §6.2.2.1: normalise case of kept escapes


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4, but a ".." above the root is an error rather than silently dropped."""
    output: list[str] = []
    segments = path.split("/")
    for index, segment in enumerate(segments[1:], start=1):
        last = index == len(segments) - 1
        if segment == ".":
            if last:
                output.append("")
        elif segment == "..":
            if not output:
                raise BadPath("path escapes above the root")
            output.pop()
            if last:
                output.append("")
        else:
            output.append(segment)
    return "/" + "/".join(output)


_SLASH_RUNS = re.compile(r"//+")
_PATH_PARAMS = re.compile(r";[^/]*")  # ";jsessionid=..." in a segment (RFC 3986 §3.3 leaves its meaning open)


def _lenient_view(path: str) -> str:
    """The path as lenient backends read it: "\\" as "/" (IIS; browsers' URL parser does the same),
    ;params dropped (servlet containers), runs of "/" merged."""
    return _SLASH_RUNS.sub("/", _PATH_PARAMS.sub("", path.replace("\\", "/")))


# What some backend might take for a path separator besides "/" (see the module docstring).
_SEPARATOR_LOOKALIKES = re.compile(r"%2[Ff]|%5[Cc]|\\")


def _hides_dot_segment(path: str) -> bool:
    """Would a backend that reads %2F, %5C or \\ as "/" (or drops ;params) see a dot-segment?"""
    if "." not in path:
        return False
    view = _SEPARATOR_LOOKALIKES.sub("/", path)
    return any(segment.split(";", 1)[0] in (".", "..") for segment in view.split("/"))


def normalize_path(path: str) -> str:
    """Normalise the path part of an origin-form target (no query). Fast when nothing needs doing."""
    if "%" in path:
        path = _PERCENT.sub(_decode_unreserved, path)
    if "//" in path:
        path = _SLASH_RUNS.sub("/", path)
    if "/." in path:
        path = _remove_dot_segments(path)
    if ("%" in path or ";" in path or "\\" in path) and _hides_dot_segment(path):
        raise BadPath("dot-segment hidden behind an encoded slash, backslash or ;parameter")
    return path


def split_target(target: str) -> tuple[str, str]:
    """Split "/path?query" into ("/path", "?query"); absolute-form targets lose scheme and authority."""
    if not target.startswith("/"):
        scheme_end = target.find("://")
        if scheme_end >= 0:
            slash = target.find("/", scheme_end + 3)
            query_start = target.find("?", scheme_end + 3)
            if slash < 0 or (0 <= query_start < slash):
                rest = target[query_start:] if query_start >= 0 else ""
                return "/", rest
            target = target[slash:]
        elif target == "*":
            return "*", ""
    question = target.find("?")
    if question < 0:
        return target, ""
    return target[:question], target[question:]


@dataclass(frozen=True)
class Route:
    host: str | None  # lowercased; "*.example.com" for wildcards; None matches any host
    path: str  # prefix, without trailing slash except for "/"
    upstream: str
    strip_prefix: bool = False
    set_headers: tuple[tuple[str, str], ...] = ()
    index: int = 0  # position in the config file (ties go to the first)
    access: AccessRules | None = field(default=None, compare=False)  # allow / deny; None: everyone
    basic_auth: BasicAuth | None = field(default=None, compare=False)  # users; None: no sign-in
    compress: object = None  # a proxy.http.compression.CompressPolicy, or None
    redirect: object = None  # a proxy.http.redirects.RedirectPolicy: answered here, upstream is ""
    rate_limit: RateLimiter | None = field(default=None, compare=False)  # token buckets; None: no limit
    # set_headers prepared for building request heads: once per route, not per request.
    headers: RouteHeaders = field(init=False, compare=False, repr=False)

    def __post_init__(self):
        dropped = self.basic_auth.dropped_headers if self.basic_auth is not None else frozenset()
        object.__setattr__(self, "headers", RouteHeaders(self.set_headers, dropped))

    def matches_path(self, path: str) -> bool:
        prefix = self.path
        if prefix == "/":
            return True
        # Segment boundaries: "/api" matches /api and /api/x, never /apix.
        return path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/")

    def forwarded_path(self, path: str) -> str:
        if not self.strip_prefix or self.path == "/":
            return path
        rest = path[len(self.path):]
        return rest if rest.startswith("/") else "/" + rest


def normal_prefix(prefix: str) -> str:
    """A route prefix normalised as request paths are ("/caf%c3%a9" -> "/caf%C3%A9", "/%7euser" ->
    "/~user", "/a//b" -> "/a/b"): a prefix in any other form could never match."""
    try:
        return normalize_path(prefix).rstrip("/") or "/"
    except BadPath:
        return prefix  # "/.." and the like match no normalised request anyway; nothing to gain


def _in_normal_form(route: Route) -> Route:
    path = normal_prefix(route.path)
    return route if path == route.path else replace(route, path=path)


def _host_rank(host: str | None) -> int:
    if host is None:
        return 2
    return 1 if host.startswith("*.") else 0


def wildcard_length(host: str | None) -> int:
    """How specific a wildcard host is: of two that match a name ("*.test", "*.inner.test"), the
    longer wins, as nginx picks the longest wildcard server_name. 0 for other hosts."""
    return len(host) if host is not None and host.startswith("*.") else 0


# Router.resolve remembers this many (Host, target) pairs, each at most this long (Host and target
# together): 4096 x 512 characters bound its memory to about 2 MiB, whatever clients send.
RESOLVED_MAX = 4096
RESOLVED_KEY_MAX = 512


class Router:
    """Routes sorted once by precedence; a lookup walks the few candidates for one host."""

    def __init__(self, routes: list[Route]):
        routes = [_in_normal_form(route) for route in routes]
        self.routes = sorted(routes, key=lambda r: (_host_rank(r.host), -wildcard_length(r.host), -len(r.path),
                                                    r.index))
        self._exact: dict[str, list[Route]] = {}
        self._wildcard: list[Route] = []
        self._any: list[Route] = []
        for route in self.routes:
            if route.host is None:
                self._any.append(route)
            elif route.host.startswith("*."):
                self._wildcard.append(route)
            else:
                self._exact.setdefault(route.host, []).append(route)
        self._cache: dict[str, list[Route]] = {}
        self._resolved: dict[tuple[str | None, str], tuple[Route | None, str, str, str]] = {}

    def resolve(self, host: str | None, target: str) -> tuple[Route | None, str, str, str]:
        """A request's (route or None, normalised path, query, target to forward) from its Host field
        and its target, remembered per pair: a keep-alive client asks for the same few again and again.
        BadPath, as ``normalize_path`` and ``match`` raise it, is never remembered."""
        key = (host, target)
        found = self._resolved.get(key)
        if found is None:
            path, query = split_target(target)
            if path != "*":
                path = normalize_path(path)
            route = self.match(host_without_port(host), path)
            forwarded = None if route is None else (route.forwarded_path(path) if path != "*" else "*") + query
            found = (route, path, query, forwarded)
            if len(target) + len(host or "") <= RESOLVED_KEY_MAX:  # bounded: clients choose both freely
                if len(self._resolved) >= RESOLVED_MAX:
                    self._resolved.clear()  # a scan of many URLs: start over rather than stop learning
                self._resolved[key] = found
        return found

    def candidates(self, host: str | None) -> list[Route]:
        """Routes that may serve this host, best first (cached per host name)."""
        key = host or ""
        found = self._cache.get(key)
        if found is None:
            found = list(self._exact.get(key, ()))
            found += [r for r in self._wildcard if key.endswith(r.host[1:]) and len(key) > len(r.host) - 1]
            found += self._any
            if len(self._cache) < 4096:  # bounded: clients choose Host freely
                self._cache[key] = found
        return found

    def match(self, host: str | None, path: str) -> Route | None:
        """The best route for this host and normalised path. BadPath when ";params" or a backslash make
        the route ambiguous: servlet containers (Tomcat, Jetty) drop ;params and IIS reads "\\" as "/",
        so a backend behind the route taken for "/admin;x" would serve "/admin", which the route for
        /admin exists to handle."""
        route = self._first_match(host, path)
        if (";" in path or "\\" in path) and self._first_match(host, _lenient_view(path)) is not route:
            raise BadPath("a ;parameter or backslash in the path hides the route the path takes without it")
        return route

    def _first_match(self, host: str | None, path: str) -> Route | None:
        for route in self.candidates(host):
            if route.matches_path(path):
                return route
        return None


def host_without_port(host: str | None) -> str | None:
    """Lowercase and drop the port: "API.localhost:8080" → "api.localhost"; "[::1]:80" → "[::1]".
    A trailing dot goes too: "api.localhost." is the same (fully qualified) name, as route hosts
    are read (config drops it) and as nginx matches server_name."""
    if not host:
        return None
    host = host.lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    colon = host.rfind(":")
    if colon >= 0:
        host = host[:colon]
    return host[:-1] if host.endswith(".") else host
