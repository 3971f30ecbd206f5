"""Per-route access control: ``allow`` / ``deny`` lists of addresses and CIDR networks.

The rule: deny wins over allow; with an allow list, anyone not on it is refused; with only a deny list,
everyone else gets in. Checked on the original client (after ``server.trusted_proxies``), answered 403
with a short reason, logged, validated by the config reader and replaced on reload.

The rules alone (AccessRules), the config reader, then the real proxy on 127.0.0.1 in front of a real
backend, spoken to over raw sockets.
"""

from __future__ import annotations

import logging

import pytest

from proxy.config.schema import ConfigError, parse_config
from proxy.http.access import AccessRules
from proxy.routing.table import routing_table_lines
from tests.support.client import raw_client
from tests.support.proxy import proxy_config_dict

pytestmark = pytest.mark.timeout(30)


# -- the rule ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("allow, deny, client, permitted", [
    # an allow list: only its addresses get in
    (["10.0.0.0/8"], [], "10.200.1.1", True),
    (["10.0.0.0/8"], [], "11.0.0.1", False),
    # a /32 and a bare address are one host, not its neighbours
    (["192.168.1.5/32"], [], "192.168.1.5", True),
    (["192.168.1.5/32"], [], "192.168.1.6", False),
    (["192.168.1.5"], [], "192.168.1.4", False),
    # only a deny list: everyone else gets in
    ([], ["192.0.2.0/24"], "192.0.2.77", False),
    ([], ["192.0.2.0/24"], "198.51.100.1", True),
    # overlapping: a deny inside an allow carves a hole in it (deny wins)
    (["10.0.0.0/8"], ["10.1.0.0/16"], "10.1.2.3", False),
    (["10.0.0.0/8"], ["10.1.0.0/16"], "10.2.0.1", True),
    # IPv6, with and without a prefix
    (["2001:db8::/32"], [], "2001:db8:1::5", True),
    (["2001:db8::/32"], [], "2001:db9::5", False),
    (["::1"], [], "::1", True),
    ([], ["2001:db8::/48"], "2001:db8:0:1::1", False),
    ([], ["2001:db8::/48"], "2001:db8:1::1", True),
    # an IPv4-mapped IPv6 client (a dual-stack listener's IPv4 peer) is its IPv4 address
    (["10.0.0.0/8"], [], "::ffff:10.1.2.3", True),
    ([], ["10.0.0.0/8"], "::ffff:10.1.2.3", False),
    (["10.0.0.0/8"], [], "::ffff:11.1.2.3", False),
    # a mapped rule stands for its IPv4 network
    (["::ffff:10.0.0.0/104"], [], "10.9.9.9", True),
    # the families do not mix: an IPv4 allow list refuses IPv6 clients
    (["10.0.0.0/8"], [], "2001:db8::1", False),
    # an address that does not parse (a garbled X-Forwarded-For hop) is refused
    (["10.0.0.0/8"], [], "unknown", False),
    ([], ["10.0.0.0/8"], "not-an-ip", False),
])
def test_deny_wins_and_an_allow_list_refuses_the_rest(allow, deny, client, permitted):
    rules = AccessRules(tuple(allow), tuple(deny))
    assert rules.permits(client) is permitted
    assert rules.permits(client) is permitted  # the cached verdict is the same


def test_a_route_without_lists_has_no_rules_at_all():
    assert AccessRules.from_lists((), ()) is None


# -- the config -----------------------------------------------------------------------------------------

def route_config(**route) -> dict:
    return proxy_config_dict({"web": ["127.0.0.1:9"]}, routes=[{"path": "/", "upstream": "web", **route}])


def config_problems(**route) -> list[str]:
    with pytest.raises(ConfigError) as error:
        parse_config(route_config(**route), "proxy.toml")
    return error.value.problems


def test_lists_are_read_and_normalised():
    config = parse_config(route_config(allow=["10.0.0.0/8", "2001:DB8::/32", "192.168.1.5"], deny=["10.1.0.0/16"]),
                          "proxy.toml")
    route = config.routes[0]
    assert route.allow == ("10.0.0.0/8", "2001:db8::/32", "192.168.1.5")
    assert route.deny == ("10.1.0.0/16",)


def test_a_route_without_lists_lets_everyone_in_by_default():
    route = parse_config(route_config(), "proxy.toml").routes[0]
    assert (route.allow, route.deny) == ((), ())


@pytest.mark.parametrize("route, expected", [
    ({"allow": ["10.0.0.0/8", "10.0.0.300"]},
     'proxy.toml: routes[0].allow[1]: "10.0.0.300" is not a valid IP address or network'),
    ({"deny": ["10.0.0.1/8"]},
     'proxy.toml: routes[0].deny[0]: "10.0.0.1/8" is not a valid IP address or network (10.0.0.1/8 has host bits set)'),
    ({"deny": [10]}, 'proxy.toml: routes[0].deny[0]: expected an IP address or network like "10.0.0.0/8", got 10'),
    ({"allow": "10.0.0.0/8"}, 'proxy.toml: routes[0].allow: expected a list of IP addresses or networks'),
    ({"allow": []}, "proxy.toml: routes[0].allow: an empty allow list would refuse every client"),
    ({"allow": ["10.1.2.0/24"], "deny": ["10.0.0.0/8"]},
     'proxy.toml: routes[0].allow[0]: "10.1.2.0/24" is inside deny "10.0.0.0/8", and deny wins'),
    ({"alow": ["10.0.0.0/8"]}, "proxy.toml: routes[0].alow: unknown key (did you mean 'allow'?)"),
])
def test_a_bad_list_names_the_route_the_key_and_the_entry(route, expected):
    problems = config_problems(**route)
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_an_allow_list_overlapping_a_deny_list_partly_is_fine():
    config = parse_config(route_config(allow=["10.0.0.0/8"], deny=["10.1.0.0/16", "2001:db8::/32"]), "proxy.toml")
    assert config.routes[0].deny == ("10.1.0.0/16", "2001:db8::/32")


def test_check_shows_the_lists_of_a_route():
    config = parse_config(route_config(allow=["10.0.0.0/8"], deny=["10.1.0.0/16"]), "proxy.toml")
    lines = routing_table_lines(config)
    assert "       allow: 10.0.0.0/8" in lines and "       deny: 10.1.0.0/16" in lines


# -- through the proxy ----------------------------------------------------------------------------------

def get(proxy, target: str = "/", headers: str = "") -> object:
    with raw_client(proxy) as client:
        client.send(f"GET {target} HTTP/1.1\r\nHost: a\r\n{headers}Connection: close\r\n\r\n".encode("latin-1"))
        return client.read_response()


def test_a_denied_client_gets_403_and_the_backend_never_sees_it(make_backend, make_proxy, caplog):
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]}, routes=[
        {"path": "/", "upstream": "web"},
        {"path": "/admin", "upstream": "web", "deny": ["127.0.0.0/8"]},
    ])
    with caplog.at_level(logging.INFO, logger="pyproxy.handler"):
        refused = get(proxy, "/admin/users")
    assert refused.status == 403
    assert refused.body == b"403 access denied\n"
    assert backend.requests == []
    assert "GET /admin/users -> 403: client 127.0.0.1 is not allowed on this route" in caplog.text
    assert get(proxy, "/public").status == 200  # the other route has no rules
    assert [r.path for r in backend.requests] == ["/public"]


def test_a_client_on_the_allow_list_is_served(make_backend, make_proxy):
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]}, routes=[
        {"path": "/", "upstream": "web", "allow": ["192.0.2.0/24", "127.0.0.1/32"]},
    ])
    assert get(proxy, "/x").status == 200
    assert backend.last.path == "/x"


def test_a_403_keeps_the_connection_for_the_next_request(make_backend, make_proxy):
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]}, routes=[
        {"path": "/", "upstream": "web"},
        {"path": "/admin", "upstream": "web", "allow": ["192.0.2.1"]},
    ])
    with raw_client(proxy) as client:
        client.send(b"GET /admin HTTP/1.1\r\nHost: a\r\n\r\nGET /ok HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert client.read_response().status == 403
        assert client.read_response().status == 200
    assert [r.path for r in backend.requests] == ["/ok"]


@pytest.mark.parametrize("forwarded_for, status", [
    ("10.1.2.3", 200),                      # the original client is on the allow list
    ("192.0.2.9", 403),                     # it is not
    ("10.1.2.3, 127.0.0.1", 200),           # a trusted hop on the way is skipped
    ("10.5.5.5", 403),                      # inside the deny hole
    ("2001:db8::7", 200),                   # IPv6 original client
    ("::ffff:10.1.2.3", 200),               # IPv4-mapped: checked as 10.1.2.3
    ("garbage", 403),                       # not an address: refused
])
def test_behind_a_trusted_proxy_the_original_client_is_checked(make_backend, make_proxy, forwarded_for, status):
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]}, server={"trusted_proxies": ["127.0.0.1"]}, routes=[
        {"path": "/", "upstream": "web", "allow": ["10.0.0.0/8", "2001:db8::/32"], "deny": ["10.5.0.0/16"]},
    ])
    assert get(proxy, "/", f"X-Forwarded-For: {forwarded_for}\r\n").status == status
    assert len(backend.requests) == (1 if status == 200 else 0)


def test_an_untrusted_client_cannot_claim_an_allowed_address(make_backend, make_proxy):
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]}, server={"trusted_proxies": ["192.0.2.1"]}, routes=[
        {"path": "/", "upstream": "web", "allow": ["10.0.0.0/8"]},
    ])
    assert get(proxy, "/", "X-Forwarded-For: 10.1.2.3\r\n").status == 403  # 127.0.0.1 is not a trusted proxy
    assert backend.requests == []


def test_a_reload_replaces_the_lists(make_backend, make_proxy):
    backend = make_backend()
    document = proxy_config_dict({"web": [backend.address]}, routes=[
        {"path": "/", "upstream": "web", "deny": ["127.0.0.1"]}])
    proxy = make_proxy({"web": [backend.address]}, routes=document["routes"])
    document["server"]["listen"] = f"127.0.0.1:{proxy.port}"  # the reload keeps the listener it has
    assert get(proxy).status == 403

    document["routes"] = [{"path": "/", "upstream": "web", "allow": ["127.0.0.1"]}]
    proxy.process.reload(parse_config(document, "test.toml"))
    assert get(proxy).status == 200

    document["routes"] = [{"path": "/", "upstream": "web", "allow": ["::1"]}]
    proxy.process.reload(parse_config(document, "test.toml"))
    assert get(proxy).status == 403
    assert len(backend.requests) == 1
