"""DNS discovery against a real DNS server: dnsmasq on loopback, started by each test, its records
pointing at backends on 127.0.0.2, .3 and .4 (one port, as the instances behind one name would be).

The discovery loop's timing and outage logging are unit-tested with a fake resolver and clock; the
end-to-end tests use ``refresh = "1s"`` and dnsmasq's 1 s TTL, and synchronise on what the proxy shows
(/status, which backend answered), never on sleeps.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time

import pytest
import requests

from proxy.config.schema import ConfigError, DnsConfig, UpstreamServerConfig, load_config, parse_config
from proxy.observe.status import build_status
from proxy.serve.app import Application
from proxy.serve.runner import bind_config_listener
from proxy.serve.supervisor import Supervisor, bind_slot_sockets
from proxy.upstream.discovery import DnsDiscovery, DnsResolver, Lookup, Target, discovery_key
from proxy.upstream.health import CheckResult, HealthChecker
from tests.support import backends as backend_support
from tests.support.command import pyproxy_command
from tests.support.dns import DOMAIN, Dnsmasq, HeldDnsServer, backends_on_loopback, common_port, running_dnsmasq
from tests.support.ports import free_port
from tests.support.processes import REPO, Load, admin_status, running_proxy, start_slow_request
from tests.support.proxy import config_document, scrape, start_observed_proxy
from tests.support.timing import FakeClock, wait_for

NAME = f"api.{DOMAIN}"
HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
WAIT = 20.0  # bound on waiting for the proxy to follow a DNS change (refresh is 1 s; the machine may be busy)


# -- the discovery loop, with a fake resolver and clock ----------------------------------------------

def _config(servers: list, dns: dict | None = None):
    return parse_config({"routes": [{"path": "/", "upstream": "api"}],
                         "upstreams": {"api": {"servers": servers}}, "dns": dns or {}}, "test.toml")


class FakeResolver:
    """Answers lookups from ``answers`` (a Lookup per call, the last one repeated); counts them."""

    def __init__(self, answers: list[Lookup]):
        self.answers = list(answers)
        self.calls = 0

    def lookup(self, entry) -> Lookup:
        self.calls += 1
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


def _target(host: str, port: int = 8080, weight: int = 1) -> Target:
    return Target(0, host, port, weight, NAME)


def _discovery(config, answers, clock):
    resolver = FakeResolver(answers)
    changes = []
    discovery = DnsDiscovery(lambda: config, lambda key, targets: changes.append(targets),
                             make_resolver=lambda settings: resolver, clock=clock)
    return discovery, resolver, changes


def test_refresh_is_the_earlier_of_refresh_and_ttl_but_never_under_a_second():
    clock = FakeClock()
    config = _config([{"address": f"{NAME}:8080", "discover": "a"}], {"refresh": "10s"})
    one = (_target("127.0.0.2"),)
    discovery, resolver, changes = _discovery(config, [Lookup(one, ttl=3)], clock)
    assert discovery.run_once() == pytest.approx(1.0)  # capped: it looks at the config every second
    assert resolver.calls == 1 and changes == [one]
    clock.advance(2.9)
    discovery.run_once()
    assert resolver.calls == 1  # the TTL (3 s) is not over
    clock.advance(0.2)
    discovery.run_once()
    assert resolver.calls == 2 and changes == [one]  # unchanged: nothing reported
    resolver.answers = [Lookup(one, ttl=0)]  # a zero TTL: once a second, not in a loop
    clock.advance(3.1)
    discovery.run_once()
    calls = resolver.calls
    clock.advance(0.5)
    discovery.run_once()
    assert resolver.calls == calls
    clock.advance(0.5)
    discovery.run_once()
    assert resolver.calls == calls + 1
    resolver.answers = [Lookup(one, ttl=3600)]  # a long TTL: refresh (10 s) rules
    clock.advance(1)
    discovery.run_once()
    calls = resolver.calls
    clock.advance(9.9)
    discovery.run_once()
    assert resolver.calls == calls
    clock.advance(0.2)
    discovery.run_once()
    assert resolver.calls == calls + 1


def test_a_failed_lookup_keeps_the_set_and_logs_once_per_outage(caplog):
    clock = FakeClock()
    config = _config([{"address": f"{NAME}:8080", "discover": "a"}], {"refresh": "2s"})
    good = (_target("127.0.0.2"), _target("127.0.0.3"))
    failed = Lookup(None, problem="no answer within 2s")
    discovery, resolver, changes = _discovery(config, [Lookup(good, ttl=1), failed, failed, failed,
                                                       Lookup(good, ttl=1)], clock)
    caplog.set_level(logging.INFO, logger="pyproxy.dns")
    discovery.run_once()
    for _ in range(3):
        clock.advance(2)
        discovery.run_once()
    assert changes == [good]  # the outage changed nothing
    assert discovery.current() == {("api", "a", NAME, 8080): good}
    failures = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == 1, [r.getMessage() for r in caplog.records]
    assert "keeping its 2 address(es)" in failures[0].getMessage()
    clock.advance(2)
    discovery.run_once()
    assert any("answers again" in r.getMessage() for r in caplog.records)
    assert changes == [good]


def test_failed_lookups_are_retried_after_1_2_4_seconds_up_to_refresh():
    clock = FakeClock()
    config = _config([{"address": f"{NAME}:8080", "discover": "a"}], {"refresh": "10s"})
    failed = Lookup(None, problem="no answer within 2s")
    discovery, resolver, _ = _discovery(config, [failed], clock)
    discovery.run_once()
    gaps, last = [], 0.0
    for step in range(1, 161):  # 40 s in steps of 0.25 s (exact in binary: no drift)
        clock.advance(0.25)
        calls = resolver.calls
        discovery.run_once()
        if resolver.calls > calls:
            gaps.append(step * 0.25 - last)
            last = step * 0.25
    assert gaps[:6] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_nxdomain_is_an_empty_set_and_records_appearing_are_reported(caplog):
    clock = FakeClock()
    config = _config([{"address": f"{NAME}:8080", "discover": "a"}])
    later = (_target("127.0.0.2"),)
    discovery, _, changes = _discovery(config, [Lookup((), problem="NXDOMAIN"), Lookup(later, ttl=1)], clock)
    caplog.set_level(logging.WARNING, logger="pyproxy.dns")
    discovery.run_once()
    assert changes == [()]
    assert any(f"no addresses for {NAME}:8080 (NXDOMAIN)" in r.getMessage() for r in caplog.records)
    clock.advance(10)
    discovery.run_once()
    assert changes == [(), later]


def test_names_follow_the_config():
    clock = FakeClock()
    configs = [_config(["127.0.0.1:9000"])]
    resolver = FakeResolver([Lookup((_target("127.0.0.2"),), ttl=60)])
    discovery = DnsDiscovery(lambda: configs[0], lambda key, targets: None,
                             make_resolver=lambda settings: resolver, clock=clock)
    discovery.run_once()
    assert resolver.calls == 0  # no discovered name: no lookup, not even a resolver
    configs[0] = _config([{"address": f"{NAME}:8080", "discover": "a"}])
    discovery.run_once()
    assert resolver.calls == 1
    configs[0] = _config([{"address": f"{NAME}:8080", "discover": "a", "weight": 3}])
    discovery.run_once()
    assert resolver.calls == 2  # a new weight: resolved (and applied) at once
    configs[0] = _config(["127.0.0.1:9000"])
    discovery.run_once()
    assert discovery.current() == {}


# -- applying a set to an upstream ---------------------------------------------------------------------

def _key(config) -> tuple:
    upstream = config.upstreams["api"]
    return discovery_key("api", upstream.servers[0])


def test_an_unchanged_address_keeps_its_server_and_pool_a_new_one_joins_a_vanished_one_leaves():
    config = _config([{"address": f"{NAME}:8080", "discover": "a", "weight": 2}])
    app = Application(config)
    key = _key(config)
    app.apply_discovered(key, (_target("127.0.0.2", weight=2), _target("127.0.0.3", weight=2)))
    upstream = app.runtime.upstreams["api"]
    kept, leaving = upstream.servers
    assert (kept.address, kept.weight, kept.name) == ("127.0.0.2:8080", 2, NAME)
    kept_pool = upstream.pools[kept]
    assert leaving.try_acquire()  # a request in flight on the address about to vanish
    app.apply_discovered(key, (_target("127.0.0.2", weight=2), _target("127.0.0.4", weight=2)))
    upstream = app.runtime.upstreams["api"]
    assert upstream.servers[0] is kept and upstream.pools[kept] is kept_pool
    assert [s.address for s in upstream.servers] == ["127.0.0.2:8080", "127.0.0.4:8080"]
    rows = {row["address"]: row for row in build_status(app)["upstreams"]["api"]["servers"]}
    assert rows["127.0.0.3:8080"]["state"] == "leaving" and rows["127.0.0.3:8080"]["name"] == NAME
    assert rows["127.0.0.4:8080"]["state"] == "up"
    assert upstream.leaving == (leaving,)
    for _ in range(20):  # no new request reaches it
        picked = upstream.pick_server("10.0.0.1")
        assert picked is not leaving
        picked.release()
    leaving.release()  # its request finished: gone from the next rebuild (and from /status at once)
    assert "127.0.0.3:8080" not in {row["address"] for row in build_status(app)["upstreams"]["api"]["servers"]}
    app.apply_discovered(key, (_target("127.0.0.2", weight=2),))
    assert app.runtime.upstreams["api"].leaving == ()


def test_addresses_gone_from_dns_are_not_kept_alive_by_the_metrics():
    # Pods come and go with new addresses for the proxy's whole life: their Server objects must not pile up
    import gc
    import weakref
    from proxy.observe.metrics import Metrics
    config = _config([{"address": f"{NAME}:8080", "discover": "a"}])
    app = Application(config)
    metrics = Metrics(app)
    key = _key(config)
    app.apply_discovered(key, (_target("10.1.0.1"), _target("10.1.0.2")))
    metrics.snapshot()
    gone = [weakref.ref(server) for server in app.runtime.upstreams["api"].servers]
    for rollout in range(2, 12):  # every rollout: new addresses, the scrape in between
        app.apply_discovered(key, (_target(f"10.1.{rollout}.1"), _target(f"10.1.{rollout}.2")))
        servers = {row["server"] for row in metrics.snapshot()["servers"]}
        assert servers == {f"10.1.{rollout}.1:8080", f"10.1.{rollout}.2:8080"}
    gc.collect()
    assert [ref() for ref in gone] == [None, None]


def test_a_joining_address_waits_for_its_first_health_check_but_the_first_answer_does_not():
    config = parse_config({"routes": [{"path": "/", "upstream": "api"}],
                           "upstreams": {"api": {"servers": [{"address": f"{NAME}:8080", "discover": "a"}],
                                                 "health": {"path": "/healthz"}}}}, "test.toml")
    app = Application(config)
    key = _key(config)
    app.apply_discovered(key, (_target("127.0.0.2"),))
    assert app.runtime.upstreams["api"].servers[0].state == "up"  # the first answer: like configured servers
    app.apply_discovered(key, (_target("127.0.0.2"), _target("127.0.0.3")))
    joined = app.runtime.upstreams["api"].servers[1]
    assert joined.state == "down" and "first health check" in joined.state_reason


def test_a_server_rebuilt_by_a_new_srv_weight_keeps_its_health_verdict():
    config = parse_config({"routes": [{"path": "/", "upstream": "api"}],
                           "upstreams": {"api": {"servers": [{"srv": f"_http._tcp.{NAME}"}],
                                                 "health": {"path": "/healthz"}}}}, "test.toml")
    app = Application(config)
    key = _key(config)
    app.apply_discovered(key, (Target(10, "127.0.0.2", 8080, 1, NAME), Target(10, "127.0.0.3", 8080, 1, NAME)))
    up, down = app.runtime.upstreams["api"].servers
    down.set_health(False, "health check failed: 500")
    app.apply_discovered(key, (Target(10, "127.0.0.2", 8080, 4, NAME), Target(10, "127.0.0.3", 8080, 4, NAME)))
    rebuilt = {s.address: s for s in app.runtime.upstreams["api"].servers}
    assert rebuilt[up.address] is not up and rebuilt[up.address].weight == 4
    assert rebuilt[up.address].state == "up"  # serving already: not "new from DNS"
    assert (rebuilt[down.address].state, rebuilt[down.address].state_reason) == ("down", "health check failed: 500")


def test_a_dns_change_keeps_rate_limits_and_an_operators_drain():
    config = parse_config({"routes": [{"path": "/", "upstream": "api", "rate_limit": {"requests": 5}}],
                           "upstreams": {"api": {"servers": [{"address": f"{NAME}:8080", "discover": "a"}]}}},
                          "test.toml")
    app = Application(config)
    key = _key(config)
    app.apply_discovered(key, (_target("127.0.0.2"), _target("127.0.0.3")))
    app.set_admin_state("api", "127.0.0.2:8080", "draining")
    app.apply_discovered(key, (_target("127.0.0.2"), _target("127.0.0.3"), _target("127.0.0.4")))
    states = {s.address: s.admin_state for s in app.runtime.upstreams["api"].servers}
    assert states == {"127.0.0.2:8080": "draining", "127.0.0.3:8080": "enabled", "127.0.0.4:8080": "enabled"}
    assert app.runtime.router.routes[0].rate_limit is not None


def test_a_name_a_reload_removed_and_another_adds_back_is_not_served_from_its_old_addresses():
    # Between the two reloads the pods may have moved: the old set must not come back (with DNS down, for good)
    discovering = _config([{"address": f"{NAME}:8080", "discover": "a"}])
    app = Application(discovering)
    app.apply_discovered(_key(discovering), (_target("127.0.0.2"),))
    app.reload(_config(["127.0.0.1:9000"]))
    assert app.discovered == {}
    app.reload(discovering)
    upstream = app.runtime.upstreams["api"]
    assert upstream.servers == () and upstream.no_server_detail() == f"no addresses for {NAME}:8080"


def test_a_name_removed_and_added_back_between_two_rounds_gets_its_set_again():
    # Two quick reloads: the loop never saw the name leave, but the first reload dropped its set
    clock = FakeClock()
    discovering, plain = _config([{"address": f"{NAME}:8080", "discover": "a"}]), _config(["127.0.0.1:9000"])
    app = Application(discovering)
    resolver = FakeResolver([Lookup((_target("127.0.0.2"),), ttl=60)])
    discovery = DnsDiscovery(lambda: app.config, app.apply_discovered, make_resolver=lambda settings: resolver,
                             clock=clock)
    app.reload_listeners.append(lambda old, new: discovery.kick())
    discovery.run_once()
    app.reload(plain)
    app.reload(discovering)
    discovery.run_once()
    assert [s.address for s in app.runtime.upstreams["api"].servers] == ["127.0.0.2:8080"]
    assert resolver.calls == 1  # handed over again, not looked up again


def test_no_addresses_gives_a_503_reason_naming_the_name():
    config = _config([{"address": f"{NAME}:8080", "discover": "a"}])
    app = Application(config)
    app.apply_discovered(_key(config), ())
    upstream = app.runtime.upstreams["api"]
    assert upstream.pick_server("10.0.0.1") is None
    assert upstream.no_server_detail() == f"no addresses for {NAME}:8080"


def test_srv_priorities_use_the_lowest_group_with_a_server_up():
    config = _config([{"srv": f"_http._tcp.{NAME}"}])
    app = Application(config)
    app.apply_discovered(_key(config), (Target(10, "127.0.0.2", 8081, 1, "a"), Target(10, "127.0.0.3", 8082, 3, "b"),
                                        Target(20, "127.0.0.4", 8083, 1, "c")))
    upstream = app.runtime.upstreams["api"]
    first, second, backup = upstream.servers
    assert (second.weight, second.priority, backup.priority) == (3, 10, 20)
    picks = []
    for _ in range(40):
        server = upstream.pick_server("10.0.0.1")
        picks.append(server.address)
        server.release()
    assert picks.count("127.0.0.3:8082") == 30 and picks.count("127.0.0.2:8081") == 10  # weights 3:1
    first.set_health(False, "test")
    second.set_health(False, "test")
    server = upstream.pick_server("10.0.0.1")
    assert server is backup
    server.release()
    second.set_health(True, "test")
    assert upstream.pick_server("10.0.0.1") is second


# -- config ----------------------------------------------------------------------------------------------

def test_config_problems_name_the_key():
    with pytest.raises(ConfigError) as caught:
        parse_config({"routes": [{"path": "/", "upstream": "api"}],
                      "upstreams": {"api": {"servers": [{"address": "10.0.0.1:80", "discover": "a"},
                                                        {"srv": "_http._tcp.x", "weight": 2},
                                                        {"address": "x:80", "discover": "aaaa"}]}},
                      "dns": {"resolvers": ["ns.example", "127.0.0.1:0"], "refresh": "500ms", "ttl": 1}},
                     "proxy.toml")
    problems = str(caught.value)
    assert 'proxy.toml: dns.ttl: unknown key' in problems
    assert "proxy.toml: dns.refresh: must be at least 1s" in problems
    assert 'proxy.toml: dns.resolvers[0]: "ns.example" is not a name server address' in problems
    assert 'proxy.toml: dns.resolvers[1]: "127.0.0.1:0" is not a name server address' in problems
    assert "upstreams.api.servers[0].discover: 10.0.0.1 is an IP address" in problems
    assert "upstreams.api.servers[1].weight: not with srv" in problems
    assert "upstreams.api.servers[2].discover" in problems


def test_config_defaults():
    config = _config([{"address": f"{NAME}:8080", "discover": "a"}, {"srv": f"_http._tcp.{NAME}"}])
    assert config.dns == DnsConfig(resolvers=(), refresh=10.0, timeout=2.0)
    assert config.upstreams["api"].servers == (UpstreamServerConfig(NAME, 8080, 1, False, "a"),
                                               UpstreamServerConfig(f"_http._tcp.{NAME}", 0, 1, False, "srv"))


# -- against dnsmasq -----------------------------------------------------------------------------------

def _document(dns_server, port: int, **upstream) -> dict:
    table = {"servers": [{"address": f"{NAME}:{port}", "discover": "a"}], "retries": 2, **upstream}
    return config_document({"api": table}, dns={"resolvers": [dns_server.resolver], "refresh": "1s",
                                                "timeout": "1s"})


def _addresses(proxy) -> dict[str, str]:
    return {row["address"]: row["state"] for row in proxy.status()["upstreams"]["api"]["servers"]}


def _served(load: Load, since: int) -> set[str]:
    return {outcome for outcome in load.outcomes()[since:] if not outcome.startswith("ERROR")}


@pytest.fixture
def dnsmasq(tmp_path):
    with running_dnsmasq(tmp_path) as server:
        yield server


def test_scale_2_3_1_under_load_new_servers_take_traffic_removed_ones_finish(dnsmasq):
    with backends_on_loopback(HOSTS) as backends:
        port = backends[HOSTS[0]].port
        dnsmasq.set_hosts({NAME: HOSTS[:2]})
        proxy = start_observed_proxy(_document(dnsmasq, port))
        load = Load(proxy.url, clients=4, max_seconds=60)
        try:
            wait_for(lambda: _served(load, 0) >= set(HOSTS[:2]), timeout=WAIT, what="both servers serving")
            assert {row["name"] for row in proxy.status()["upstreams"]["api"]["servers"]} == {NAME}

            dnsmasq.set_hosts({NAME: HOSTS})  # scale to 3
            mark = len(load.outcomes())
            wait_for(lambda: HOSTS[2] in _served(load, mark), timeout=WAIT, what="the new server to take traffic")

            # Round robin shares its turns with the load's requests, so where a slow request lands is
            # not fixed: start them one after another until every server holds one (at most 24).
            slow = []

            def every_server_holds_a_slow_request() -> bool:
                if all(b.slow_entered.is_set() for b in backends.values()):
                    return True
                if len(slow) < 24:
                    slow.append(start_slow_request(proxy.url))
                return False

            wait_for(every_server_holds_a_slow_request, timeout=WAIT, interval=0.05,
                     what="a slow request on every server")
            dnsmasq.set_hosts({NAME: HOSTS[:1]})  # scale to 1
            wait_for(lambda: _addresses(proxy) == {f"{HOSTS[0]}:{port}": "up", f"{HOSTS[1]}:{port}": "leaving",
                                                   f"{HOSTS[2]}:{port}": "leaving"},
                     timeout=WAIT, what="two servers leaving")
            since = time.monotonic()
            wait_for(lambda: len(load.outcomes_started_since(since)) > 50, timeout=WAIT,
                     what="traffic after the scale-down")
            after = load.outcomes_started_since(since)
            assert {outcome for outcome in after if not outcome.startswith("ERROR")} == {HOSTS[0]}  # nothing new
            # reaches the leaving servers (a request already in flight when they left may end on them)
            for backend in backends.values():
                backend.release.set()
            for thread, result in slow:
                thread.join(WAIT)
                assert result.get("status") == 200 and result.get("length") == 256 * 1024, result
            wait_for(lambda: _addresses(proxy) == {f"{HOSTS[0]}:{port}": "up"}, timeout=WAIT,
                     what="the leaving servers gone from /status")
        finally:
            load.stop()
            proxy.stop()
        assert load.failures() == []
        assert len(load.outcomes()) > 100


@pytest.mark.parametrize("outage", ["paused", "stopped"])
def test_dns_outage_keeps_the_last_set(dnsmasq, caplog, outage):
    caplog.set_level(logging.WARNING, logger="pyproxy.dns")
    with backends_on_loopback(HOSTS[:2]) as backends:
        port = backends[HOSTS[0]].port
        dnsmasq.set_hosts({NAME: HOSTS[:2]})
        proxy = start_observed_proxy(_document(dnsmasq, port))
        try:
            if outage == "paused":
                dnsmasq.pause()  # lookups time out
            else:
                dnsmasq.stop()  # lookups are refused (nothing listens)
            wait_for(lambda: any("lookup of" in r.getMessage() and "failed" in r.getMessage()
                                 for r in caplog.records), timeout=WAIT, what="a failed lookup")
            answered = {requests.get(proxy.url, timeout=5).headers["X-Backend"] for _ in range(10)}
            assert answered == set(HOSTS[:2])
            assert _addresses(proxy) == {f"{h}:{port}": "up" for h in HOSTS[:2]}
            if outage == "paused":
                dnsmasq.resume()
            else:
                dnsmasq.start()
            dnsmasq.set_hosts({NAME: HOSTS[:1]})
            wait_for(lambda: list(_addresses(proxy)) == [f"{HOSTS[0]}:{port}"], timeout=WAIT,
                     what="the set to follow DNS again")
        finally:
            if dnsmasq.process.poll() is None:
                dnsmasq.resume()
            proxy.stop()
        failures = [r for r in caplog.records if "lookup of" in r.getMessage()]
        assert len(failures) == 1  # once per outage, however many lookups failed


def test_nxdomain_at_start_answers_503_until_records_appear(dnsmasq, caplog):
    caplog.set_level(logging.WARNING, logger="pyproxy.dns")
    with backends_on_loopback(HOSTS[:1]) as backends:
        port = backends[HOSTS[0]].port
        proxy = start_observed_proxy(_document(dnsmasq, port))
        try:
            response = requests.get(proxy.url, timeout=5)
            assert response.status_code == 503
            assert f"no addresses for {NAME}:{port}" in response.text
            assert any("no addresses for" in r.getMessage() and "NXDOMAIN" in r.getMessage() for r in caplog.records)
            dnsmasq.set_hosts({NAME: HOSTS[:1]})
            wait_for(lambda: requests.get(proxy.url, timeout=5).status_code == 200, timeout=WAIT,
                     what="records to appear")
            assert requests.get(proxy.url, timeout=5).headers["X-Backend"] == HOSTS[0]
        finally:
            proxy.stop()


def test_a_failed_first_lookup_is_tried_again_soon_not_after_refresh(dnsmasq):
    # The name server did not answer at start: the name has no addresses and the upstream answers 503.
    # The failed lookup was tried again only after dns.refresh, here an hour, however soon DNS was back.
    with backends_on_loopback(HOSTS[:1]) as backends:
        port = backends[HOSTS[0]].port
        dnsmasq.set_hosts({NAME: HOSTS[:1]})
        dnsmasq.pause()
        document = _document(dnsmasq, port)
        document["dns"]["refresh"] = "1h"
        proxy = start_observed_proxy(document)
        try:
            assert requests.get(proxy.url, timeout=5).status_code == 503
            dnsmasq.resume()
            wait_for(lambda: requests.get(proxy.url, timeout=5).status_code == 200, timeout=WAIT,
                     what="the name resolved once DNS answers")
        finally:
            dnsmasq.resume()
            proxy.stop()


def test_a_new_address_is_health_checked_before_it_takes_traffic(dnsmasq):
    # Each backend answers its own address as the body: only 127.0.0.2 passes this check.
    health = {"path": "/", "interval": "300ms", "healthy_after": 1, "expect_body": HOSTS[0]}
    with backends_on_loopback(HOSTS[:2]) as backends:
        port = backends[HOSTS[0]].port
        dnsmasq.set_hosts({NAME: HOSTS[:1]})
        proxy = start_observed_proxy(_document(dnsmasq, port, health=health))
        try:
            dnsmasq.set_hosts({NAME: HOSTS[:2]})
            joined = f"{HOSTS[1]}:{port}"
            wait_for(lambda: joined in _addresses(proxy), timeout=WAIT, what="the new address")
            with requests.Session() as session:
                answered = {session.get(proxy.url, timeout=5).headers["X-Backend"] for _ in range(20)}
            assert answered == {HOSTS[0]}  # not a request to it before a check passes
            wait_for(lambda: backends[HOSTS[1]].requests >= 2, timeout=WAIT, what="the checker to probe it")
            assert _addresses(proxy)[joined] == "down"
            assert "first health check" in proxy.server_status("api", joined)["reason"]
            document = _document(dnsmasq, port, health={**health, "expect_body": "127.0.0"})
            proxy.reload(document)  # now it passes: up after its next check, then it takes traffic
            wait_for(lambda: _addresses(proxy)[joined] == "up", timeout=WAIT, what="its check to pass")
            with requests.Session() as session:
                answered = {session.get(proxy.url, timeout=5).headers["X-Backend"] for _ in range(20)}
            assert answered == set(HOSTS[:2])
        finally:
            proxy.stop()


def test_srv_records_give_ports_priorities_and_weights(tmp_path):
    srv = f"_http._tcp.{NAME}"
    with backends_on_loopback(HOSTS) as backends:
        port = backends[HOSTS[0]].port
        records = (f"{srv},a.{DOMAIN},{port},10,1", f"{srv},b.{DOMAIN},{port},10,3", f"{srv},c.{DOMAIN},{port},20,1")
        with running_dnsmasq(tmp_path, records) as dnsmasq:
            dnsmasq.set_hosts({f"a.{DOMAIN}": [HOSTS[0]], f"b.{DOMAIN}": [HOSTS[1]], f"c.{DOMAIN}": [HOSTS[2]]})
            document = config_document({"api": {"servers": [{"srv": srv}],
                                                 "health": {"path": "/", "interval": "300ms", "unhealthy_after": 1}}},
                                       dns={"resolvers": [dnsmasq.resolver], "refresh": "1s"})
            proxy = start_observed_proxy(document)
            try:
                rows = {row["address"]: row for row in proxy.status()["upstreams"]["api"]["servers"]}
                assert {a: (r["name"], r["weight"]) for a, r in rows.items()} == {
                    f"{HOSTS[0]}:{port}": (f"a.{DOMAIN}", 1), f"{HOSTS[1]}:{port}": (f"b.{DOMAIN}", 3),
                    f"{HOSTS[2]}:{port}": (f"c.{DOMAIN}", 1)}
                info = {(s.labels["server"], s.labels["name"]) for s in scrape(proxy)["pyproxy_upstream_server_info"].samples}
                assert info == {(f"{HOSTS[0]}:{port}", f"a.{DOMAIN}"), (f"{HOSTS[1]}:{port}", f"b.{DOMAIN}"),
                                (f"{HOSTS[2]}:{port}", f"c.{DOMAIN}")}
                with requests.Session() as session:
                    answered = [session.get(proxy.url, timeout=5).headers["X-Backend"] for _ in range(40)]
                assert answered.count(HOSTS[1]) == 30 and answered.count(HOSTS[0]) == 10  # priority 20 unused
                backends[HOSTS[0]].stop()
                backends[HOSTS[1]].stop()
                wait_for(lambda: [_addresses(proxy)[f"{h}:{port}"] for h in HOSTS[:2]] == ["down", "down"],
                         timeout=WAIT, what="the priority 10 servers down")
                assert requests.get(proxy.url, timeout=5).headers["X-Backend"] == HOSTS[2]
            finally:
                proxy.stop()


def test_an_srv_weight_change_keeps_a_healthy_server_up(tmp_path):
    # The new weight rebuilds the address's server: it was serving, so it must not wait for a "first" check
    srv = f"_http._tcp.{NAME}"
    with backends_on_loopback(HOSTS[:2]) as backends:
        port = backends[HOSTS[0]].port
        hosts = {f"a.{DOMAIN}": [HOSTS[0]], f"b.{DOMAIN}": [HOSTS[1]]}
        dnsmasq = Dnsmasq(tmp_path / "before", (f"{srv},a.{DOMAIN},{port},10,1", f"{srv},b.{DOMAIN},{port},10,1"))
        dnsmasq.start()
        proxy = None
        try:
            dnsmasq.set_hosts(hosts)
            document = config_document({"api": {"servers": [{"srv": srv}], "health": {"path": "/", "interval": "300ms"}}},
                                       dns={"resolvers": [dnsmasq.resolver], "refresh": "1s"})
            proxy = start_observed_proxy(document)
            a = f"{HOSTS[0]}:{port}"
            wait_for(lambda: set(_addresses(proxy).values()) == {"up"}, timeout=WAIT, what="both servers up")
            dnsmasq.stop()  # SRV records are fixed at dnsmasq's start: a new one on the same port, new weight
            port_before = dnsmasq.port
            dnsmasq = Dnsmasq(tmp_path / "after", (f"{srv},a.{DOMAIN},{port},10,5", f"{srv},b.{DOMAIN},{port},10,1"))
            dnsmasq.port = port_before
            dnsmasq.start()
            dnsmasq.set_hosts(hosts)
            weight = lambda: {row["address"]: row for row in proxy.status()["upstreams"]["api"]["servers"]}[a]["weight"]
            wait_for(lambda: weight() == 5, timeout=WAIT, what="the new SRV weight")
            wait_for(lambda: _addresses(proxy)[a] == "up", timeout=WAIT, what=f"{a} up with its new weight")
            with requests.Session() as session:
                answered = [session.get(proxy.url, timeout=5).headers["X-Backend"] for _ in range(12)]
            assert answered.count(HOSTS[0]) == 10, answered
        finally:
            if proxy is not None:
                proxy.stop()
            dnsmasq.stop()


def test_a_websocket_tunnel_on_a_vanished_address_goes_on_until_it_closes(dnsmasq):
    from websockets.sync.client import connect
    from websockets.sync.server import serve

    def echo(ws) -> None:
        for message in ws:
            ws.send(message)

    port = common_port(HOSTS[:2])
    servers = [serve(echo, host, port) for host in HOSTS[:2]]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    dnsmasq.set_hosts({NAME: HOSTS[:2]})
    proxy = start_observed_proxy(_document(dnsmasq, port))
    gone = f"{HOSTS[1]}:{port}"
    try:
        with contextlib.ExitStack() as stack:
            tunnels = [stack.enter_context(connect(proxy.url.replace("http", "ws") + "/chat", open_timeout=5))
                       for _ in range(2)]
            rows = {row["address"]: row["active_requests"] for row in proxy.status()["upstreams"]["api"]["servers"]}
            assert rows == {f"{HOSTS[0]}:{port}": 1, gone: 1}  # one tunnel on each
            dnsmasq.set_hosts({NAME: HOSTS[:1]})
            wait_for(lambda: _addresses(proxy).get(gone) == "leaving", timeout=WAIT, what="the tunnel's server leaving")
            for tunnel in tunnels:  # both still carry messages
                tunnel.send("still here")
                assert tunnel.recv(timeout=5) == "still here"
        wait_for(lambda: gone not in _addresses(proxy), timeout=WAIT, what="the leaving server gone once closed")
    finally:
        proxy.stop()
        for server in servers:
            server.shutdown()


def test_a_reload_to_other_resolvers_resolves_with_them(dnsmasq, tmp_path):
    with backends_on_loopback(HOSTS[:2]) as backends, running_dnsmasq(tmp_path / "other") as other:
        port = backends[HOSTS[0]].port
        dnsmasq.set_hosts({NAME: HOSTS[:1]})
        other.set_hosts({NAME: HOSTS[1:2]})
        document = _document(dnsmasq, port)
        proxy = start_observed_proxy(document)
        try:
            assert list(_addresses(proxy)) == [f"{HOSTS[0]}:{port}"]
            document["dns"]["resolvers"] = [other.resolver]
            proxy.reload(document)
            wait_for(lambda: list(_addresses(proxy)) == [f"{HOSTS[1]}:{port}"], timeout=WAIT,
                     what="the other resolver's answer")
        finally:
            proxy.stop()


def test_a_reload_that_keeps_the_upstream_keeps_the_discovered_servers(dnsmasq):
    with backends_on_loopback(HOSTS[:2]) as backends:
        port = backends[HOSTS[0]].port
        dnsmasq.set_hosts({NAME: HOSTS[:2]})
        document = _document(dnsmasq, port)
        proxy = start_observed_proxy(document)
        try:
            before = list(proxy.app.runtime.upstreams["api"].servers)
            document["routes"].append({"path": "/other", "upstream": "api"})
            proxy.reload(document)
            assert list(proxy.app.runtime.upstreams["api"].servers) == before  # the same Server objects
            assert requests.get(proxy.url + "/other", timeout=5).status_code == 200
        finally:
            proxy.stop()


# -- worker processes and the command --------------------------------------------------------------------

def _workers_config(dnsmasq, backend_port: int, port: int, admin_port: int, health: str = "",
                    workers: int = 2, token: str = "") -> str:
    """Two workers, upstream api from NAME; ``health``: the body of an [upstreams.api.health] table;
    ``token``: the runtime API's admin.token."""
    health_table = f"[upstreams.api.health]\n{health}" if health else ""
    token_line = f'token = "{token}"' if token else ""
    return f"""
[server]
listen = "127.0.0.1:{port}"
workers = {workers}
min_threads = 2
[admin]
listen = "127.0.0.1:{admin_port}"
{token_line}
[log]
access = "off"
[dns]
resolvers = ["{dnsmasq.resolver}"]
refresh = "1s"
[[routes]]
path = "/"
upstream = "api"
[upstreams.api]
servers = [{{ address = "{NAME}:{backend_port}", discover = "a" }}]
{health_table}
"""


def _a_queries(dnsmasq) -> int:
    return sum(1 for line in dnsmasq.log_file.read_text(errors="replace").splitlines()
               if f"query[A] {NAME} from" in line)


def test_with_workers_one_process_resolves_and_every_worker_follows(dnsmasq, tmp_path):
    with backends_on_loopback(HOSTS[:2]) as backends:
        port = backends[HOSTS[0]].port
        dnsmasq.set_hosts({NAME: HOSTS[:1]})
        proxy_port, admin_port = free_port(), free_port()
        with running_proxy(tmp_path, _workers_config(dnsmasq, port, proxy_port, admin_port)) as run:
            dnsmasq.set_hosts({NAME: HOSTS[1:2]})  # the instance moved: .2 out, .3 in
            wait_for(lambda: [row["address"] for row in admin_status(admin_port)["upstreams"]["api"]["servers"]]
                     == [f"{HOSTS[1]}:{port}"], timeout=WAIT, what="every worker on the new set", on_timeout=run.log)
            backends[HOSTS[0]].stop()  # a worker still on the old set would now fail
            before = {w["pid"]: w["requests_total"] for w in admin_status(admin_port)["workers"]}
            answered = []
            for _ in range(20):  # fresh connections, which the kernel spreads over both workers
                with requests.Session() as session:
                    answered += [session.get(run.url, timeout=5) for _ in range(1)]
                after = {w["pid"]: w["requests_total"] for w in admin_status(admin_port)["workers"]}
                if len(after) == 2 and all(after[pid] > before.get(pid, 0) for pid in after):
                    break
            assert all(after[pid] > before.get(pid, 0) for pid in after), (before, after)
            assert [(r.status_code, r.headers.get("X-Backend")) for r in answered] == [(200, HOSTS[1])] * len(answered)

            # One resolver: a name is looked up at most once a second, so one process resolving makes at
            # most about one A query per elapsed second; three (supervisor and two workers) would make three.
            start, queries = time.monotonic(), _a_queries(dnsmasq)
            wait_for(lambda: _a_queries(dnsmasq) >= queries + 8, timeout=60, what="8 more lookups")
            elapsed = time.monotonic() - start
            assert _a_queries(dnsmasq) - queries <= elapsed + 2, (elapsed, _a_queries(dnsmasq) - queries)


def test_with_workers_the_supervisors_checker_checks_a_new_address_before_any_worker_uses_it(dnsmasq, tmp_path):
    passes_only_the_first = f'path = "/"\ninterval = "300ms"\nhealthy_after = 1\nexpect_body = "{HOSTS[0]}"\n'
    with backends_on_loopback(HOSTS[:2]) as backends:
        port = backends[HOSTS[0]].port
        dnsmasq.set_hosts({NAME: HOSTS[:1]})
        proxy_port, admin_port = free_port(), free_port()
        text = _workers_config(dnsmasq, port, proxy_port, admin_port, passes_only_the_first)
        with running_proxy(tmp_path, text) as run:
            dnsmasq.set_hosts({NAME: HOSTS[:2]})
            joined = f"{HOSTS[1]}:{port}"

            def rows() -> dict:
                return {row["address"]: row for row in admin_status(admin_port)["upstreams"]["api"]["servers"]}
            wait_for(lambda: joined in rows(), timeout=WAIT, what="the new address in every worker", on_timeout=run.log)
            wait_for(lambda: backends[HOSTS[1]].requests >= 2, timeout=WAIT, what="the supervisor to check it")
            answered = set()
            for _ in range(30):  # fresh connections: both workers answer some
                with requests.Session() as session:
                    answered.add(session.get(run.url, timeout=5).headers["X-Backend"])
            assert answered == {HOSTS[0]}
            assert rows()[joined]["state"] == "down" and "first health check" in rows()[joined]["reason"]

            run.rewrite(text.replace(f'expect_body = "{HOSTS[0]}"', 'expect_body = "127.0.0"'))
            run.signal(signal.SIGHUP)
            wait_for(lambda: rows()[joined]["state"] == "up", timeout=WAIT, what="its check to pass", on_timeout=run.log)
            served_before = backends[HOSTS[1]].requests
            for _ in range(30):
                with requests.Session() as session:
                    assert session.get(run.url, timeout=5).status_code == 200
            assert backends[HOSTS[1]].requests > served_before + 5  # traffic, not only checks


def test_check_warns_about_names_that_do_not_resolve(dnsmasq, tmp_path):
    from tests.support.command import run_cli
    config = tmp_path / "proxy.toml"
    config.write_text(f"""
[dns]
resolvers = ["{dnsmasq.resolver}"]
timeout = "1s"
[[routes]]
path = "/"
upstream = "api"
[upstreams.api]
servers = [{{ address = "missing.{DOMAIN}:8080", discover = "a" }}]
""")
    result = run_cli("check", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert f"warning: upstreams.api: missing.{DOMAIN}:8080 has no addresses (NXDOMAIN)" in result.stderr
    assert f"missing.{DOMAIN}:8080  weight 1, each A/AAAA address a server" in result.stdout


def test_the_resolver_tells_nxdomain_from_a_failure(dnsmasq):
    dnsmasq.set_hosts({NAME: HOSTS[:2]})
    resolver = DnsResolver(DnsConfig(resolvers=(("127.0.0.1", dnsmasq.port),), timeout=1.0))
    found = resolver.lookup(UpstreamServerConfig(NAME, 8080, 3, False, "a"))
    assert found.targets == (Target(0, HOSTS[0], 8080, 3, NAME), Target(0, HOSTS[1], 8080, 3, NAME))
    assert found.ttl == 1
    missing = resolver.lookup(UpstreamServerConfig(f"missing.{DOMAIN}", 8080, 1, False, "a"))
    assert (missing.targets, missing.problem) == ((), "NXDOMAIN")
    dnsmasq.set_hosts({NAME: [HOSTS[0], "::1"]})  # AAAA records are servers too (IPv6 bracketed in addresses)
    both = resolver.lookup(UpstreamServerConfig(NAME, 8080, 1, False, "a"))
    assert [target.address for target in both.targets] == [f"{HOSTS[0]}:8080", "[::1]:8080"]
    # dnsmasq refuses names outside its local domain (it has no upstream servers): a failure, not "no addresses"
    refused = resolver.lookup(UpstreamServerConfig("api.elsewhere", 8080, 1, False, "a"))
    assert refused.targets is None and "REFUSED" in refused.problem


def test_an_answer_truncated_over_udp_says_so():
    # Too big for UDP, and TCP port 53 blocked (a common firewall rule): the problem read "the name
    # servers failed: , [Errno 111] Connection refused", the truncation an empty string.
    dns_server = HeldDnsServer({NAME: [HOSTS[0]]}, truncate=True)
    try:
        resolver = DnsResolver(DnsConfig(resolvers=(("127.0.0.1", dns_server.port),), refresh=10.0, timeout=2.0))
        lookup = resolver.lookup(UpstreamServerConfig(NAME, 8080, 1, False, "a"))
        assert lookup.targets is None
        assert lookup.problem == ("the name servers failed: [Errno 111] Connection refused, "
                                  "answer truncated (too big for UDP, and TCP failed)")
    finally:
        dns_server.close()


def test_an_srv_target_that_fails_to_resolve_does_not_hide_the_others(tmp_path):
    # dnsmasq refuses the out-of-domain target: its lookup fails, while a.svc.test answers
    srv = f"_http._tcp.{NAME}"
    records = (f"{srv},a.{DOMAIN},8080,10,1", f"{srv},api.elsewhere,8081,10,1")
    with running_dnsmasq(tmp_path, records) as dnsmasq:
        dnsmasq.set_hosts({f"a.{DOMAIN}": [HOSTS[0]]})
        resolver = DnsResolver(DnsConfig(resolvers=(("127.0.0.1", dnsmasq.port),), timeout=1.0))
        found = resolver.lookup(UpstreamServerConfig(srv, 0, 1, False, "srv"))
        assert found.targets == (Target(10, HOSTS[0], 8080, 1, f"a.{DOMAIN}"),)
        assert found.unresolved == ("api.elsewhere",)
        assert "api.elsewhere" in found.problem and "REFUSED" in found.problem
        from proxy.upstream.discovery import check_names
        warnings = check_names(_config([{"srv": srv}], {"resolvers": [dnsmasq.resolver], "timeout": "1s"}))
        assert len(warnings) == 1 and "cannot resolve SRV target(s): api.elsewhere" in warnings[0], warnings


def test_an_srv_target_of_a_dot_means_no_service_whatever_its_port(tmp_path):
    # RFC 2782: a target of "." means the service is decidedly not available. Only port 0 was taken to
    # mean so: "10 5 8080 ." had "." looked up as a host, which a name server may refuse, and the lookup
    # then failed and kept the last good set instead of emptying it.
    srv = f"_http._tcp.{NAME}"
    with running_dnsmasq(tmp_path, (f"{srv},.,8080,10,5",)) as dnsmasq:
        resolver = DnsResolver(DnsConfig(resolvers=(("127.0.0.1", dnsmasq.port),), timeout=1.0))
        found = resolver.lookup(UpstreamServerConfig(srv, 0, 1, False, "srv"))
        assert (found.targets, found.unresolved) == ((), ())
        assert found.problem == "no SRV records with addresses"


def test_an_srv_target_whose_lookup_fails_keeps_its_last_addresses(caplog):
    clock = FakeClock()
    srv = f"_http._tcp.{NAME}"
    config = _config([{"srv": srv}])
    a, b = Target(10, "127.0.0.2", 8080, 1, f"a.{DOMAIN}"), Target(10, "127.0.0.3", 8080, 1, f"b.{DOMAIN}")
    c = Target(10, "127.0.0.4", 8080, 1, f"c.{DOMAIN}")
    b_failed = Lookup((a,), ttl=1, problem=f"b.{DOMAIN}: no answer within 2s", unresolved=(f"b.{DOMAIN}",))
    discovery, _, changes = _discovery(config, [Lookup((a, b), ttl=1), b_failed, b_failed,
                                                Lookup((a, c), ttl=1)], clock)
    caplog.set_level(logging.INFO, logger="pyproxy.dns")
    discovery.run_once()
    for _ in range(2):
        clock.advance(2)
        discovery.run_once()
    assert changes == [(a, b)]  # b's lookup failed: it keeps b's addresses, and a's record still counts
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"b.{DOMAIN}" in warnings[0], warnings  # once per outage
    clock.advance(2)
    discovery.run_once()
    assert changes == [(a, b), (a, c)]


def test_dns_timeout_bounds_a_whole_srv_lookup_not_each_target():
    from tests.support.dns import SrvOnlyServer
    server = SrvOnlyServer([f"t{i}.{DOMAIN}" for i in range(5)])  # their A lookups hang
    try:
        resolver = DnsResolver(DnsConfig(resolvers=(("127.0.0.1", server.port),), timeout=1.0))
        found = resolver.lookup(UpstreamServerConfig(f"_http._tcp.{NAME}", 0, 1, False, "srv"))
        assert found.targets is None and "within 1s" in found.problem, found
        # The first target asked used up the second: the other four were never asked for
        assert len(set(server.address_queries)) == 1, server.address_queries
    finally:
        server.close()


def test_the_dashboard_shows_names_and_a_leaving_server(dnsmasq, tmp_path):
    from tests.support.browser import CHROMIUM, Browser, chromium_available
    if not chromium_available():
        pytest.skip(f"no Chromium at {CHROMIUM}: run scripts/install-browser (apt-get install chromium)")
    with backends_on_loopback(HOSTS[:2]) as backends:
        port = backends[HOSTS[0]].port
        dnsmasq.set_hosts({NAME: HOSTS[:2]})
        proxy = start_observed_proxy(_document(dnsmasq, port))
        browser = Browser(tmp_path / "chromium-profile")
        slow = []
        try:
            staying, going = f"{HOSTS[0]}:{port}", f"{HOSTS[1]}:{port}"
            slow = [start_slow_request(proxy.url) for _ in range(2)]  # one on each server (round robin)
            wait_for(lambda: backends[HOSTS[1]].slow_entered.is_set(), timeout=WAIT, what="a slow request on .3")
            browser.open(proxy.admin_url + "/")
            state = "document.querySelector('[data-server=\"{}\"]')?.dataset.state"
            browser.wait_until(f"{state.format(going)} === 'up'", what="both servers shown")
            row = browser.evaluate(f"document.querySelector('[data-server=\"{staying}\"] .addr').textContent")
            assert row == f"{NAME} → {staying}"
            dnsmasq.set_hosts({NAME: HOSTS[:1]})
            browser.wait_until(f"{state.format(going)} === 'leaving'", what="the vanished server shown leaving",
                               timeout=WAIT)
            badge = browser.evaluate("document.querySelector('[data-upstream=\"api\"] .badge').textContent")
            assert badge == "healthy"  # a server finishing its requests does not make the upstream degraded
        finally:
            for backend in backends.values():
                backend.release.set()
            for thread, _ in slow:
                thread.join(WAIT)
            browser.close()
            proxy.stop()


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("order", ["drained, then leaves DNS", "leaves DNS, then drained"])
def test_drain_wait_ends_well_when_the_server_leaves_dns_and_its_requests_finish(dnsmasq, tmp_path, workers,
                                                                               order, monkeypatch):
    # A deploy tool that drains an instance and deregisters it, in either order: the address leaves DNS
    # while its slow request goes on. "ctl drain --wait" failed (exit 3). Drained first: with workers
    # /status, whose admin states are the supervisor's, which forgets the drain of a vanished address,
    # said "enabled"; and the leaving server leaves /status the moment its last request ends, which read
    # as "no server any more". Leaving first: the drain answered 404 (no such server), though the
    # server takes no new requests, and GET /upstreams/api lists it.
    monkeypatch.setattr(backend_support, "NAMED_HOLD_LIMIT", 60.0)  # held until the test lets go, however busy
    with backends_on_loopback(HOSTS[:2]) as backends:
        port = backends[HOSTS[0]].port
        drained = f"{HOSTS[1]}:{port}"
        dnsmasq.set_hosts({NAME: HOSTS[:2]})
        backends[HOSTS[0]].release.set()  # its /slow answers at once: only HOSTS[1] holds requests
        text = _workers_config(dnsmasq, port, free_port(), free_port(), workers=workers, token="t0ken")
        with running_proxy(tmp_path, text) as run:
            def rows() -> dict:
                return {row["address"]: row for row in admin_status(run.admin_port)["upstreams"]["api"]["servers"]}

            def leave_dns() -> None:
                dnsmasq.set_hosts({NAME: HOSTS[:1]})
                wait_for(lambda: rows().get(drained, {}).get("state") == "leaving", timeout=WAIT,
                         what="it leaving DNS")

            wait_for(lambda: len(rows()) == 2, timeout=WAIT, what="both servers", on_timeout=run.log)
            slow = []
            before = sum(backend.requests for backend in backends.values())  # the proxy's readiness request too
            for _ in range(20):  # the balancer (or the kernel, with workers) decides where each one goes
                slow.append(start_slow_request(run.url))
                wait_for(lambda: sum(backend.requests for backend in backends.values()) - before >= len(slow),
                         timeout=WAIT, what="the request to reach a backend")
                if backends[HOSTS[1]].slow_entered.is_set():
                    break
            wait_for(lambda: rows()[drained]["active_requests"] == 1, timeout=WAIT, what="a request in flight")
            if order.startswith("leaves"):
                leave_dns()
            stderr = tmp_path / "ctl.err"
            with open(stderr, "w") as err_file:
                waiting = subprocess.Popen(pyproxy_command() + ["ctl", "-c", str(run.config_path), "drain", "api",
                                                                drained, "--wait", "--timeout", "60s"],
                                           cwd=REPO, stdout=subprocess.PIPE, stderr=err_file, text=True)
            try:
                if order.startswith("drained"):
                    wait_for(lambda: rows()[drained]["admin_state"] == "draining", timeout=WAIT, what="the drain")
                    leave_dns()
                    assert rows()[drained]["admin_state"] == "draining"  # not "enabled", with workers too
                else:  # the request must still run while ctl looks
                    wait_for(lambda: waiting.poll() is not None or "waiting for 1 active" in stderr.read_text(),
                             timeout=WAIT, what="ctl waiting")
                assert waiting.poll() is None, (waiting.communicate(), stderr.read_text())
                backends[HOSTS[1]].release.set()
                out, _ = waiting.communicate(timeout=WAIT)
            finally:
                if waiting.poll() is None:
                    waiting.kill()
                    waiting.communicate()
            assert waiting.returncode == 0, out + stderr.read_text()
            assert f"api/{drained}: drained" in out
            for thread, result in slow:
                thread.join(WAIT)
                assert result.get("status") == 200, result

OTHER = f"other.{DOMAIN}"


def _two_names_document(dns_server, with_name: bool, other_weight: int = 1) -> dict:
    """Upstream api from OTHER, and from NAME too when ``with_name`` (the entry a reload removes)."""
    servers = [{"address": f"{OTHER}:8080", "discover": "a", "weight": other_weight}]
    if with_name:
        servers.insert(0, {"address": f"{NAME}:8080", "discover": "a"})
    return config_document({"api": {"servers": servers}}, dns={"resolvers": [dns_server.resolver], "refresh": "1s",
                                                               "timeout": "10s"})


def _remove_a_name_while_its_lookup_is_in_flight(dns_server: HeldDnsServer, reload) -> None:
    """NAME's lookup is held; ``reload(False)`` removes NAME; the lookup then answers 127.0.0.3. Returns
    once a later discovery round has seen the config without NAME: OTHER, due every second, is asked
    twice more (once at most in the round that got the answer)."""
    dns_server.hold()
    dns_server.records[NAME] = [HOSTS[1]]
    assert dns_server.held.wait(WAIT), "no lookup of NAME"
    reload(False)
    asked = dns_server.asked(OTHER)
    dns_server.release()
    wait_for(lambda: dns_server.asked(OTHER) >= asked + 2, timeout=WAIT, what="a later discovery round")


def test_a_lookup_that_ends_after_a_reload_removed_its_name_does_not_bring_its_set_back():
    # The round looked NAME up with the old config; the answer came after a reload had removed NAME, and
    # was applied: NAME's set was back in the proxy's memory, so a later reload that lists NAME again
    # served that old set at once (with DNS down, for good) instead of waiting for a fresh lookup.
    dns_server = HeldDnsServer({NAME: [HOSTS[0]], OTHER: [HOSTS[2]]})
    proxy = start_observed_proxy(_two_names_document(dns_server, True))
    try:
        assert sorted(_addresses(proxy)) == [f"{HOSTS[0]}:8080", f"{HOSTS[2]}:8080"]
        _remove_a_name_while_its_lookup_is_in_flight(
            dns_server, lambda with_name: proxy.reload(_two_names_document(dns_server, with_name)))
        assert sorted(_addresses(proxy)) == [f"{HOSTS[2]}:8080"]
        dns_server.hold()  # the lookup of NAME added back gets no answer yet
        proxy.reload(_two_names_document(dns_server, True))
        assert sorted(_addresses(proxy)) == [f"{HOSTS[2]}:8080"]
        dns_server.release()
        wait_for(lambda: sorted(_addresses(proxy)) == [f"{HOSTS[1]}:8080", f"{HOSTS[2]}:8080"], timeout=WAIT,
                 what="NAME's fresh answer")
    finally:
        dns_server.release()
        proxy.stop()
        dns_server.close()


def _two_names_text(dns_server, backend_port: int, port: int, admin_port: int, with_name: bool,
                    other_weight: int) -> str:
    name_entry = f'{{ address = "{NAME}:{backend_port}", discover = "a" }}, ' if with_name else ""
    return f"""
[server]
listen = "127.0.0.1:{port}"
workers = 2
min_threads = 2
[admin]
listen = "127.0.0.1:{admin_port}"
[log]
access = "off"
[dns]
resolvers = ["{dns_server.resolver}"]
refresh = "1s"
timeout = "10s"
[[routes]]
path = "/"
upstream = "api"
[upstreams.api]
servers = [{name_entry}{{ address = "{OTHER}:{backend_port}", discover = "a", weight = {other_weight} }}]
"""


def test_with_workers_a_lookup_that_ends_after_a_reload_removed_its_name_does_not_bring_its_set_back(tmp_path):
    dns_server = HeldDnsServer({NAME: [HOSTS[0]], OTHER: [HOSTS[2]]})
    port, admin_port = free_port(), free_port()
    try:
        with backends_on_loopback(HOSTS) as backends:
            backend_port = backends[HOSTS[0]].port
            addresses = [f"{host}:{backend_port}" for host in HOSTS]

            def text(with_name: bool, other_weight: int) -> str:
                return _two_names_text(dns_server, backend_port, port, admin_port, with_name, other_weight)

            with running_proxy(tmp_path, text(True, 1)) as run:
                def rows() -> dict:
                    return {row["address"]: row["weight"]
                            for row in admin_status(admin_port)["upstreams"]["api"]["servers"]}

                def reload(with_name: bool, other_weight: int) -> None:  # the weight: every process has it
                    run.rewrite(text(with_name, other_weight))
                    run.signal(signal.SIGHUP)
                    wait_for(lambda: rows().get(addresses[2]) == other_weight, timeout=WAIT, what="the reload",
                             on_timeout=run.log)

                wait_for(lambda: sorted(rows()) == [addresses[0], addresses[2]], timeout=WAIT,
                         what="both names' addresses", on_timeout=run.log)
                _remove_a_name_while_its_lookup_is_in_flight(dns_server, lambda with_name: reload(with_name, 2))
                dns_server.hold()
                reload(True, 3)
                assert sorted(rows()) == [addresses[2]], run.log()
                dns_server.release()
                wait_for(lambda: sorted(rows()) == [addresses[1], addresses[2]], timeout=WAIT,
                         what="NAME's fresh answer", on_timeout=run.log)
    finally:
        dns_server.release()
        dns_server.close()


class _HeldChecks:
    """Stands in for the health checker's probe threads: keeps each submitted check for the test to end."""

    def __init__(self):
        self.checks = []

    def submit(self, check, target, upstream_config):
        self.checks.append((target, upstream_config))


def test_with_workers_an_address_that_joined_and_passed_while_a_worker_forked_is_up_in_it(tmp_path, monkeypatch):
    """A DNS change while a worker forked: the worker started with the set before it (copied at fork),
    got the new set replayed once ready, and took the new address in as joining, down until its first
    check. That check had passed in the supervisor meanwhile and its "up" went out before this worker
    had a link; the replay after "ready" sent only the down verdicts: the address stayed down in that
    worker for good while /status of the supervisor said up."""
    config_path = tmp_path / "proxy.toml"
    config_path.write_text(f"""
[server]
listen = "127.0.0.1:{free_port()}"
workers = 2
graceful_timeout = "5s"

[log]
access = "off"

[[routes]]
path = "/"
upstream = "api"

[upstreams.api]
servers = [{{ address = "{NAME}:9", discover = "a" }}]

[upstreams.api.health]
path = "/healthz"
interval = "1h"
healthy_after = 1
""")
    config = load_config(config_path)
    listen = config.server.listen[0]
    supervisor = Supervisor(config, None, bind_slot_sockets([(listen, bind_config_listener(listen))], 2))
    key = _key(config)
    supervisor.app.apply_discovered(key, (_target("127.0.0.2", 9),))  # the first answer
    clock = FakeClock()
    checker = supervisor.checker = HealthChecker(supervisor.app, clock=clock)
    checker._executor = held = _HeldChecks()
    checker.listeners.append(supervisor._broadcast_health)
    checker.run_once()
    real_fork = os.fork

    def fork_while_a_new_address_joins_and_passes() -> int:
        pid = real_fork()
        if pid != 0:  # the supervisor, before it registers the worker
            supervisor._discovered_changed(key, (_target("127.0.0.2", 9), _target("127.0.0.3", 9)))
            checker.run_once()  # the joining address is checked at once
            target, upstream_config = held.checks[-1]
            assert target.server.address == "127.0.0.3:9"
            checker.record_result(target, CheckResult(0.0, True, 1.0, 200), upstream_config.health)
        return pid

    def worker_states() -> dict:
        answers = supervisor.collect("status")
        servers = answers[0][1]["upstreams"]["api"]["servers"] if answers else []
        return {server["address"]: server["state"] for server in servers}

    try:
        monkeypatch.setattr(os, "fork", fork_while_a_new_address_joins_and_passes)
        supervisor._spawn(0)
        monkeypatch.setattr(os, "fork", real_fork)
        assert supervisor.slots[0].ready.wait(WAIT), "the worker never got ready"
        assert [server.state for server in supervisor.app.runtime.upstreams["api"].servers] == ["up", "up"]
        wait_for(lambda: worker_states() == {"127.0.0.2:9": "up", "127.0.0.3:9": "up"}, WAIT,
                 what="the joined address up in the worker", on_timeout=worker_states)
    finally:
        worker = supervisor.slots[0]
        if worker is not None:
            worker.link.close()
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(worker.pid, signal.SIGKILL)
                os.waitpid(worker.pid, 0)
        supervisor._close_all_sockets()
