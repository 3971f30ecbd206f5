"""Routing: which route a request takes (host names, prefixes in normal form, ;parameters and "\\"),
what a route's set_headers may replace, and the order the router (and ``pyproxy check``) tries routes.

Raw sockets against the real proxy in front of real backends on 127.0.0.1, plus the Router alone.
"""

from __future__ import annotations

import pytest

from proxy.http.forwarding import Outbound, build_request_head
from proxy.http.http1 import RequestParser
from proxy.routing.router import Route, Router
from tests.support.client import raw_client

pytestmark = pytest.mark.timeout(30)


def get(proxy, target: str, host: str = "a"):
    with raw_client(proxy) as client:
        client.send(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode("latin-1"))
        return client.read_response()


# -- a Host with a trailing dot is the same name ---------------------------------------------------------
# "a.test." is the fully qualified form of "a.test" (RFC 1034 §3.1). Route hosts drop the dot when the
# config is read, request hosts kept it: such a request skipped the exact and wildcard routes and went
# to the catch-all (nginx strips the dot before matching server_name).
@pytest.mark.parametrize("host, expected", [
    ("a.test.", "exact"), ("A.TEST.:8080", "exact"), ("b.test.", "wildcard"), ("other.", "catch_all"),
])
def test_host_with_a_trailing_dot_routes_like_the_name(make_backend, make_proxy, host, expected):
    backends = {name: make_backend() for name in ("exact", "wildcard", "catch_all")}
    proxy = make_proxy({name: [b.address] for name, b in backends.items()}, routes=[
        {"path": "/", "upstream": "catch_all"},
        {"host": "*.test", "upstream": "wildcard"},
        {"host": "a.test", "upstream": "exact"},
    ])
    assert get(proxy, "/x", host).status == 200
    assert [name for name, b in backends.items() if b.requests] == [expected]
    assert backends[expected].last.header("Host") == host.lower()  # forwarded as the client wrote it


# -- route prefixes are matched in the form request paths are normalised to --------------------------
# Request paths are normalised before routing (escapes of unreserved characters decoded, kept escapes
# uppercased, runs of "/" merged, dot-segments removed); route prefixes from the config were not, so a
# route written "/caf%c3%a9", "/%7euser" or "/a//b" could never match anything.
@pytest.mark.parametrize("prefix, target, forwarded", [
    ("/caf%c3%a9", "/caf%c3%a9/menu", "/caf%C3%A9/menu"),
    ("/caf%c3%a9", "/caf%C3%A9", "/caf%C3%A9"),
    ("/%7euser", "/~user/x", "/~user/x"),
    ("/a//b", "/a/b", "/a/b"),
    ("/x/./y/", "/x/y/z", "/x/y/z"),
])
def test_route_prefixes_match_in_normal_form(make_backend, make_proxy, prefix, target, forwarded):
    routed, other = make_backend(), make_backend()
    proxy = make_proxy({"routed": [routed.address], "other": [other.address]},
                       routes=[{"path": "/", "upstream": "other"}, {"path": prefix, "upstream": "routed"}])
    assert get(proxy, target).status == 200
    assert other.requests == []
    assert routed.last.path == forwarded


def test_check_lists_routes_in_the_order_the_router_tries_them():
    from proxy.config.schema import RouteConfig
    from proxy.routing.table import routes_by_precedence
    routes = [RouteConfig(path="/%7e%7e%7e", upstream="tilde"), RouteConfig(path="/abcdef", upstream="letters"),
              RouteConfig(path="/a//b", upstream="ab"), RouteConfig(path="/a/b", upstream="tie")]
    listed = [route.upstream for route in routes_by_precedence(routes)]
    router = Router([Route(None, r.path, r.upstream, index=i) for i, r in enumerate(routes)])
    assert listed == [route.upstream for route in router.routes] == ["letters", "tilde", "ab", "tie"]


def test_router_normalises_prefixes_and_keeps_precedence():
    router = Router([Route(None, "/", "root", index=0), Route(None, "/a//b", "ab", strip_prefix=True, index=1)])
    route = router.match(None, "/a/b/c")
    assert route.upstream == "ab" and route.forwarded_path("/a/b/c") == "/c"
    assert router.match(None, "/a").upstream == "root"


# -- resolve: the route of a (Host, target) pair, remembered -------------------------------------------
# The handler asks Router.resolve for every request: split, normalise and match once per pair, not per
# request, with a bounded memory of pairs (clients choose targets freely), and no memory of a refusal.
def test_resolve_remembers_what_a_target_routes_to():
    from proxy.routing import router as router_module
    router = Router([Route(None, "/", "root", index=0), Route("a.test", "/api", "api", strip_prefix=True, index=1)])
    assert router.resolve("a.test:8080", "/api//x/../y?q=1") == (router.routes[0], "/api/y", "?q=1", "/y?q=1")
    assert router.resolve(None, "*") == (router.routes[1], "*", "", "*")
    matched = []
    router.match = lambda host, path: matched.append(path)  # a second ask must not route again
    assert router.resolve("a.test:8080", "/api//x/../y?q=1")[3] == "/y?q=1"
    assert router.resolve("b.test", "/api") == (None, "/api", "", None) and matched == ["/api"]
    assert router.resolve("b.test", "/api") == (None, "/api", "", None) and matched == ["/api"]
    with pytest.raises(router_module.BadPath):
        Router([Route(None, "/", "root")]).resolve(None, "/%2e%2e%2fadmin;x")


def test_resolve_memory_is_bounded():
    from proxy.routing import router as router_module
    router = Router([Route(None, "/", "root")])
    for n in range(router_module.RESOLVED_MAX + 10):
        router.resolve("a", f"/{n}")
    assert 0 < len(router._resolved) <= router_module.RESOLVED_MAX
    long_target = "/" + "x" * router_module.RESOLVED_KEY_MAX
    long_host = "h" * router_module.RESOLVED_KEY_MAX
    assert router.resolve("a", long_target)[3] == long_target
    assert router.resolve(long_host, "/x")[3] == "/x"
    assert ("a", long_target) not in router._resolved and (long_host, "/x") not in router._resolved


# -- set_headers replace the proxy's own fields, never add framing ---------------------------------------
# A route's set_headers were appended after the proxy's own fields: "Host" gave the backend two Host
# fields (RFC 9112 §3.2: a server MUST answer 400), "X-Forwarded-For" two of those, and a
# "Content-Length" or "Connection" went out next to the real ones (a second Content-Length desynchronises
# the upstream connection, RFC 9112 §6.3).
def test_set_headers_replace_proxy_fields_and_never_touch_framing(make_backend, make_proxy):
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]}, routes=[{"path": "/", "upstream": "web", "set_headers": {
        "Host": "internal.example", "X-Forwarded-Proto": "https", "X-Env": "dev",
        "Content-Length": "0", "Transfer-Encoding": "chunked", "Connection": "close", "X-Request-Id": "fixed",
    }}])
    with raw_client(proxy) as client:
        client.send(b"POST /p HTTP/1.1\r\nHost: a.test\r\nX-Env: prod\r\nX-Request-Id: mine\r\n"
                    b"Content-Length: 3\r\n\r\nabc")
        response = client.read_response()
    assert response.status == 200 and response.body == b"abc"
    seen = backend.last
    assert seen.header_all("Host") == ["internal.example"]
    assert seen.header_all("X-Forwarded-Proto") == ["https"]
    assert seen.header_all("X-Forwarded-Host") == ["a.test"]  # where the client went
    assert seen.header_all("X-Env") == ["dev"]
    assert seen.header_all("Content-Length") == ["3"] and seen.header("Transfer-Encoding") is None
    assert seen.header("Connection") in (None, "keep-alive")
    assert seen.header_all("X-Request-Id") == ["mine"] == [response.header("X-Request-Id")]


# The route's set_headers are prepared once, with the route (Route.headers); the head is then built in
# one pass. The exact bytes pin what that pass writes and in which order: copied fields, the proxy's own
# (minus those the route replaces, merged with the client's X-Forwarded-For and Via), the request id,
# the route's fields, framing.
def test_outbound_head_bytes_with_merged_and_replaced_fields():
    parser = RequestParser()
    parser.feed(b"POST /p HTTP/1.1\r\nHost: a.test\r\nX-Forwarded-For: 1.1.1.1\r\nVia: 1.0 a\r\n"
                b"Accept: */*\r\nX-Forwarded-For: 2.2.2.2\r\nVia: 1.1 b\r\nX-Env: prod\r\nContent-Length: 3\r\n\r\n")
    request = parser.next_event()
    route = Route(None, "/", "web", set_headers=(("Host", "internal"), ("X-Forwarded-Proto", "https"),
                                                 ("X-Env", "d{0}"), ("Content-Length", "9")))
    out = Outbound("POST", "/p", "10.0.0.1:80", "9.9.9.9", "http", route.headers, "length", request_id="rid")
    assert build_request_head(request, out) == (
        b"POST /p HTTP/1.1\r\nHost: internal\r\nAccept: */*\r\n"
        b"X-Forwarded-For: 1.1.1.1, 2.2.2.2, 9.9.9.9\r\nX-Forwarded-Host: a.test\r\nVia: 1.0 a, 1.1 b, 1.1 pyproxy\r\n"
        b"X-Request-Id: rid\r\nX-Forwarded-Proto: https\r\nX-Env: d{0}\r\nContent-Length: 3\r\n\r\n")


# -- ;parameters cannot move a request to another route ----------------------------------------------------
# "/admin;x" was routed as the segment "admin;x": to the catch-all, whose backend, if a servlet container
# (Tomcat, Jetty, Spring drop ;params), served it as /admin -- the path the /admin route exists to take
# (the ";" half of the path-confusion research the module cites). The same for a raw "\\", which IIS
# and browsers' URL parser read as "/". Ambiguous ones are refused; a ;param or "\\" that routes the
# same either way is forwarded untouched.
@pytest.mark.parametrize("target, status, routed_to", [
    ("/admin;x", 400, None),
    ("/admin;jsessionid=1/users", 400, None),
    ("/ADMIN;x", 200, "public"),                 # case matters in paths: /ADMIN is not /admin either way
    ("/public;jsessionid=1/x", 200, "public"),
    ("/admin/x;v=1", 200, "admin"),
    ("/admin;x/../public", 200, "public"),       # the dot-segment removed first: "/public"
    ("/admin\\x", 400, None),                     # IIS reads "\\" as "/": /admin/x
    ("/\\admin", 400, None),
    ("/public\\x", 200, "public"),
])
def test_path_parameters_never_change_the_route(make_backend, make_proxy, target, status, routed_to):
    admin, public = make_backend(), make_backend()
    proxy = make_proxy({"admin": [admin.address], "public": [public.address]},
                       routes=[{"path": "/admin", "upstream": "admin"}, {"path": "/", "upstream": "public"}])
    assert get(proxy, target).status == status
    reached = [name for name, b in (("admin", admin), ("public", public)) if b.requests]
    assert reached == ([routed_to] if routed_to else [])




# -- the longer of two matching wildcard hosts wins ---------------------------------------------------------
# "*.inner.test" is more specific than "*.test" for "x.inner.test", as nginx picks the longest matching
# wildcard server_name before looking at locations. Wildcard routes were ordered by path only, so the
# shorter wildcard listed first (or with a longer path) took the subdomain its more specific sibling names.
@pytest.mark.parametrize("outer_path, target", [("/", "/x"), ("/api", "/api/x")])
def test_the_longest_matching_wildcard_host_wins(make_backend, make_proxy, outer_path, target):
    outer, inner = make_backend(), make_backend()
    proxy = make_proxy({"outer": [outer.address], "inner": [inner.address]}, routes=[
        {"host": "*.test", "path": outer_path, "upstream": "outer"},
        {"host": "*.inner.test", "upstream": "inner"},
    ])
    assert get(proxy, target, "x.inner.test").status == 200
    assert get(proxy, target, "x.other.test").status == 200
    assert len(inner.requests) == 1 and inner.last.header("Host") == "x.inner.test"
    assert len(outer.requests) == 1 and outer.last.header("Host") == "x.other.test"


def test_check_lists_the_longer_wildcard_first():
    from proxy.config.schema import RouteConfig
    from proxy.routing.table import routes_by_precedence
    routes = [RouteConfig(host="*.test", path="/api", upstream="outer"), RouteConfig(path="/", upstream="any"),
              RouteConfig(host="*.inner.test", path="/", upstream="inner"), RouteConfig(host="a.test", upstream="exact")]
    listed = [route.upstream for route in routes_by_precedence(routes)]
    router = Router([Route(r.host, r.path, r.upstream, index=i) for i, r in enumerate(routes)])
    assert listed == [route.upstream for route in router.routes] == ["exact", "inner", "outer", "any"]
