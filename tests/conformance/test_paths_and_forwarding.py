"""Route on the form you forward; trusted_proxies for X-Forwarded-For / Forwarded. End to end."""

from __future__ import annotations

import pytest

from proxy.routing.router import BadPath, normalize_path
from tests.support.client import raw_client
from tests.support.faulty_upstream import HEAD, LOOP, write

pytestmark = pytest.mark.timeout(30)


def get(proxy, target: str, *headers: str):
    with raw_client(proxy) as client:
        client.send((f"GET {target} HTTP/1.1\r\nHost: a\r\n" + "".join(h + "\r\n" for h in headers)
                     + "Connection: close\r\n\r\n").encode("latin-1"))
        return client.read_response()


@pytest.fixture
def two_routes(make_backend, make_proxy):
    admin, public = make_backend(), make_backend()
    proxy = make_proxy({"admin": [admin.address], "public": [public.address]},
                       routes=[{"path": "/admin", "upstream": "admin"}, {"path": "/", "upstream": "public"}])
    return proxy, admin, public


@pytest.mark.parametrize("target, routed_to, forwarded", [
    ("/public/../admin", "admin", "/admin"),
    ("/public/%2e%2e/admin", "admin", "/admin"),
    ("/public/.%2E/admin/x", "admin", "/admin/x"),
    ("/./admin", "admin", "/admin"),
    ("//admin", "admin", "/admin"),                # merged slashes: a backend merging them agrees
    ("/admin/../public", "public", "/public"),
    ("/admin/..", "public", "/"),
    ("/%61dmin", "admin", "/admin"),                # unreserved escapes decoded (RFC 3986 §6.2.2)
    ("/admin%2Fx", "public", "/admin%2Fx"),         # an encoded slash is opaque: not under /admin
    ("/public%2Fadmin", "public", "/public%2Fadmin"),
    ("/adminx", "public", "/adminx"),
])
def test_route_on_the_form_forwarded(two_routes, target, routed_to, forwarded):
    proxy, admin, public = two_routes
    response = get(proxy, target)
    assert response.status == 200
    backend = admin if routed_to == "admin" else public
    other = public if routed_to == "admin" else admin
    assert backend.last.path == forwarded
    assert other.requests == []


@pytest.mark.parametrize("target", [
    "/..", "/%2e%2e/admin", "/public/../../admin",              # escaping above the root
    "/public/..%2fadmin", "/public%2f..%2fadmin", "/public/..%2Fadmin",  # encoded slash + dots
    "/public/..%5cadmin", "/public\\..\\admin",                 # (encoded) backslash + dots
    "/public/..;/admin", "/admin/.;/x",                         # Tomcat path parameters
    "/a%00b", "/admin%00",                                      # NUL
])
def test_confusing_paths_are_400_and_reach_nobody(two_routes, target):
    proxy, admin, public = two_routes
    response = get(proxy, target)
    assert response.status == 400
    assert admin.requests == [] and public.requests == []


def test_normalize_path_is_idempotent_on_what_it_returns():
    for path in ["/a//b/./c/../d", "/%7euser/%2e/x", "/a%2Fb", "/a;b=c/d", "/v1.2/x/"]:
        once = normalize_path(path)
        assert normalize_path(once) == once
    with pytest.raises(BadPath):
        normalize_path("/x/..%2F..%2Fetc")


# -- X-Forwarded-For / Forwarded and server.trusted_proxies ---------------------------------------
def test_default_trusts_everyone_appends(make_backend, make_proxy):
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]})
    get(proxy, "/", "X-Forwarded-For: 10.1.1.1", "Forwarded: for=10.1.1.1")
    assert backend.last.header("X-Forwarded-For") == "10.1.1.1, 127.0.0.1"
    assert backend.last.header("Forwarded") == "for=10.1.1.1"


def test_untrusted_client_forwarded_headers_replaced(make_backend, make_proxy):
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]}, server={"trusted_proxies": ["10.0.0.0/8"]})
    get(proxy, "/", "X-Forwarded-For: 6.6.6.6", "X-Forwarded-For: 7.7.7.7", "Forwarded: for=6.6.6.6")
    assert backend.last.header_all("X-Forwarded-For") == ["127.0.0.1"]
    assert backend.last.header("Forwarded") is None


def test_trusted_client_forwarded_headers_appended(make_backend, make_proxy):
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]}, server={"trusted_proxies": ["127.0.0.1", "10.0.0.0/8"]})
    get(proxy, "/", "X-Forwarded-For: 203.0.113.7", "Forwarded: for=203.0.113.7")
    assert backend.last.header("X-Forwarded-For") == "203.0.113.7, 127.0.0.1"
    assert backend.last.header("Forwarded") == "for=203.0.113.7"


def test_hop_by_hop_stripped_before_proxy_headers_added(make_backend, make_proxy):
    """A client naming X-Forwarded-For in Connection cannot make us drop or keep the proxy's own."""
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]}, server={"trusted_proxies": ["10.0.0.0/8"]})
    get(proxy, "/", "Connection: X-Forwarded-For, Via, X-Request-Id", "X-Forwarded-For: 6.6.6.6")
    assert backend.last.header_all("X-Forwarded-For") == ["127.0.0.1"]
    assert backend.last.header("Via") == "1.1 pyproxy"
    assert backend.last.header("X-Request-Id")


def test_fields_an_interim_response_names_in_connection_stay_behind(upstreams, make_proxy):
    """Bug: a 1xx was relayed with the fields its own Connection header names (RFC 9110 §7.6.1: hop-by-hop,
    a proxy MUST remove them), as final responses already were; only the fixed hop-by-hop set went."""
    upstream = upstreams([HEAD, write(b"HTTP/1.1 103 Early Hints\r\nConnection: X-Hop\r\nX-Hop: secret\r\n"
                                      b"Link: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"), LOOP])
    proxy = make_proxy({"web": [upstream.address]})
    with raw_client(proxy) as raw:
        raw.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        interim = raw.read_head()
        final = raw.read_response()
    assert interim.startswith(b"HTTP/1.1 103")
    names = [line.split(b":")[0].lower() for line in interim.split(b"\r\n")[1:] if line]
    assert b"link" in names and b"x-hop" not in names
    assert (final.status, final.body) == (200, b"ok")
