"""Balancing policies and Upstream.pick_server: pure logic first, then through a proxy with real backends."""

import collections
import random
import socket
import sys
import threading
import time

import pytest
import requests

from proxy.upstream.balancing import (
    POLICIES, IpHash, LeastConnections, RoundRobin, UnknownPolicyError, Upstream, WeightedRandom,
    make_policy,
)
from proxy.upstream.servers import Server
from tests.support.ports import free_port
from tests.support.proxy import DEADLINE, FAST_HEALTH, config_document
from tests.support.timing import FakeClock, wait_for

PICKS = 10_000
POLICY_NAMES = sorted(POLICIES)


def servers_with(*weights, **kwargs):
    return [Server(f"10.0.0.{i + 1}", 8000, weight=w, **kwargs) for i, w in enumerate(weights)]


def client_ips(count):
    return [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(count)]


def fresh_policy(name):
    """A policy whose random choices are reproducible."""
    return WeightedRandom(random.Random(1234)) if name == "random" else make_policy(name)


def shares(policy, servers, picks=PICKS):
    """Fraction of picks each server got; ip_hash sees a different client each time."""
    ips = client_ips(picks)
    counts = collections.Counter()
    for ip in ips:
        counts[policy.pick(servers, ip)] += 1
    return [counts[server] / picks for server in servers], counts


# -- the registry ------------------------------------------------------------------

def test_policy_registry():
    assert set(POLICIES) == {"round_robin", "least_connections", "random", "ip_hash"}
    assert isinstance(make_policy("round_robin"), RoundRobin)
    assert isinstance(make_policy("least_connections"), LeastConnections)
    assert isinstance(make_policy("random"), WeightedRandom)
    assert isinstance(make_policy("ip_hash"), IpHash)
    assert make_policy("round_robin") is not make_policy("round_robin")  # own state each


def test_unknown_policy_names_the_choices():
    with pytest.raises(UnknownPolicyError, match="'least_conn'.*expected one of: .*round_robin"):
        make_policy("least_conn")
    with pytest.raises(ValueError):
        Upstream("api", servers_with(1), "fastest")


# -- round robin ---------------------------------------------------------------------

def test_smooth_weighted_round_robin_sequence():
    a, b, c = servers_with(5, 1, 1)
    policy = RoundRobin()
    picked = [policy.pick([a, b, c], "1.1.1.1") for _ in range(14)]
    assert picked == [a, a, b, a, c, a, a] * 2


def test_equal_weights_rotate_in_order():
    servers = servers_with(1, 1, 1)
    policy = RoundRobin()
    assert [policy.pick(servers, "") for _ in range(6)] == servers * 2


def test_round_robin_skips_unavailable_and_stays_smooth():
    a, b, c = servers_with(5, 1, 1)
    b.set_health(False, "down")
    policy = RoundRobin()
    picked = [policy.pick([a, b, c], "") for _ in range(12)]
    # a:c = 5:1, and c is spread out, never two in a row and never at the start of a burst of six a's.
    assert picked.count(a) == 10 and picked.count(c) == 2 and b not in picked
    runs = "".join("a" if s is a else "c" for s in picked).split("c")
    assert max(len(run) for run in runs) <= 5


@pytest.mark.parametrize("down_positions", [(1,), (1, 3), (0, 2), (3,)])
def test_equal_weights_with_servers_down_spread_evenly(down_positions):
    servers = servers_with(1, 1, 1, 1)
    for position in down_positions:
        servers[position].set_health(False, "down")
    up = [s for i, s in enumerate(servers) if i not in down_positions]
    fractions, counts = shares(RoundRobin(), servers, picks=1200)
    for server in up:
        assert counts[server] == pytest.approx(1200 / len(up), abs=2)
    assert sum(counts[s] for s in up) == 1200


# -- distributions with weights (all policies) --------------------------------------

@pytest.mark.parametrize("name", POLICY_NAMES)
def test_weights_are_honoured(name):
    servers = servers_with(5, 3, 1, 1)
    fractions, _ = shares(fresh_policy(name), servers)
    expected = [0.5, 0.3, 0.1, 0.1]
    for got, want in zip(fractions, expected):
        assert got == pytest.approx(want, abs=0.02), (name, fractions)


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_equal_weights_spread_evenly(name):
    servers = servers_with(1, 1, 1)
    fractions, _ = shares(fresh_policy(name), servers)
    for got in fractions:
        assert got == pytest.approx(1 / 3, abs=0.02), (name, fractions)


def test_least_connections_honours_weights_under_load():
    """Held requests settle at active/weight balance: 6 and 2 for weights 3 and 1."""
    heavy, light = servers_with(3, 1)
    upstream = Upstream("u", [heavy, light], "least_connections")
    for _ in range(8):
        assert upstream.pick_server("") is not None
    assert (heavy.active_requests, light.active_requests) == (6, 2)


# -- unavailable servers -----------------------------------------------------------------

def make_unavailable(kind, server):
    if kind == "health":
        server.set_health(False, "check failed")
    elif kind == "ejected":
        server.record_failure("refused")
    else:
        assert server.try_acquire()  # max_connections=1: now full


@pytest.mark.parametrize("kind", ["health", "ejected", "full"])
@pytest.mark.parametrize("name", POLICY_NAMES)
def test_unavailable_servers_are_never_picked(name, kind):
    clock = FakeClock(start=0.0)
    servers = servers_with(1, 4, 1, max_connections=1, max_fails=1, clock=clock)
    make_unavailable(kind, servers[1])
    policy = fresh_policy(name)
    picked = {policy.pick(servers, ip) for ip in client_ips(2000)}
    assert picked == {servers[0], servers[2]}


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_all_down_gives_none(name):
    servers = servers_with(1, 2)
    for server in servers:
        server.set_health(False, "down")
    policy = fresh_policy(name)
    assert all(policy.pick(servers, ip) is None for ip in client_ips(50))
    assert policy.pick([], "1.2.3.4") is None
    assert Upstream("u", servers, name).pick_server("1.2.3.4") is None


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_ejected_server_returns_after_fail_timeout(name):
    clock = FakeClock(start=0.0)
    servers = servers_with(1, 1, max_fails=1, fail_timeout=10, clock=clock)
    servers[0].record_failure("refused")
    policy = fresh_policy(name)
    assert {policy.pick(servers, ip) for ip in client_ips(500)} == {servers[1]}
    clock.now = 10
    assert {policy.pick(servers, ip) for ip in client_ips(500)} == set(servers)


# -- least connections -----------------------------------------------------------------

def test_least_connections_prefers_idle_servers():
    a, b, c = servers_with(1, 1, 1)
    a.try_acquire(), a.try_acquire(), c.try_acquire()
    policy = LeastConnections()
    assert [policy.pick([a, b, c], "") for _ in range(5)] == [b] * 5
    b.try_acquire(), b.try_acquire()
    assert policy.pick([a, b, c], "") is c


def test_least_connections_spreads_ties_round_robin():
    servers = servers_with(1, 1, 1)
    policy = LeastConnections()
    picked = [policy.pick(servers, "") for _ in range(9)]
    assert picked == servers * 3


def test_least_connections_ties_only_among_the_least_loaded():
    a, b, c, d = servers_with(1, 1, 1, 1)
    a.try_acquire(), c.try_acquire()
    policy = LeastConnections()
    picked = [policy.pick([a, b, c, d], "") for _ in range(6)]
    assert picked.count(b) == 3 and picked.count(d) == 3


# -- ip hash -------------------------------------------------------------------------------

def test_ip_hash_same_client_same_server():
    servers = servers_with(1, 2, 1, 3)
    policy = IpHash()
    for ip in client_ips(500):
        first = policy.pick(servers, ip)
        assert all(policy.pick(servers, ip) is first for _ in range(3))
        assert IpHash().pick(servers, ip) is first  # stable across instances (no hidden state)


def test_ip_hash_does_not_depend_on_server_order():
    servers = servers_with(1, 2, 1, 3)
    policy = IpHash()
    for ip in client_ips(500):
        assert policy.pick(servers, ip) is policy.pick(servers[::-1], ip)


@pytest.mark.parametrize("weights", [(1, 1, 1, 1, 1), (3, 1, 2, 1, 1)])
def test_ip_hash_removing_a_server_remaps_only_its_clients(weights):
    servers = servers_with(*weights)
    policy = IpHash()
    ips = client_ips(PICKS)
    before = {ip: policy.pick(servers, ip) for ip in ips}
    removed = servers[2]
    removed.set_health(False, "down")
    after = {ip: policy.pick(servers, ip) for ip in ips}
    moved = [ip for ip in ips if after[ip] is not before[ip]]
    # Exactly the removed server's clients move, and they spread over the others.
    assert set(moved) == {ip for ip in ips if before[ip] is removed}
    assert len(moved) / PICKS == pytest.approx(weights[2] / sum(weights), abs=0.02)
    assert len({after[ip] for ip in moved}) == len(servers) - 1
    # Bringing it back restores the original mapping.
    removed.set_health(True, "up")
    assert all(policy.pick(servers, ip) is before[ip] for ip in ips)


# -- random ----------------------------------------------------------------------------

def test_random_is_reproducible_with_injected_rng():
    servers = servers_with(2, 1, 1)
    policy_a, policy_b = WeightedRandom(random.Random(7)), WeightedRandom(random.Random(7))
    sequence = [policy_a.pick(servers, "") for _ in range(50)]
    assert sequence == [policy_b.pick(servers, "") for _ in range(50)]
    assert set(sequence) == set(servers)


# -- Upstream ------------------------------------------------------------------------------

def test_pick_server_acquires_and_caller_releases():
    servers = servers_with(1, 1)
    upstream = Upstream("api", servers, "round_robin")
    server = upstream.pick_server("1.2.3.4")
    assert server is servers[0]
    assert (server.active_requests, server.requests_total) == (1, 1)
    server.release()
    assert server.active_requests == 0


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_pick_server_honours_exclude(name):
    servers = servers_with(1, 1, 1)
    upstream = Upstream("api", servers, name)
    for ip in client_ips(100):
        server = upstream.pick_server(ip, exclude={servers[0], servers[2]})
        assert server is servers[1]
        server.release()
    assert upstream.pick_server("1.1.1.1", exclude=servers) is None


def test_pick_server_skips_full_servers_and_returns_none_when_all_full():
    servers = servers_with(1, 1, max_connections=1)
    upstream = Upstream("api", servers, "ip_hash")
    first = upstream.pick_server("1.1.1.1")
    second = upstream.pick_server("1.1.1.1")
    assert {first, second} == set(servers)
    assert upstream.pick_server("1.1.1.1") is None
    assert sum(s.requests_total for s in servers) == 2


def test_pick_server_retries_after_losing_the_acquire_race():
    """available() said yes, but the slot was gone by try_acquire(): pick another."""
    servers = servers_with(1, 1, max_connections=1)

    class StalePolicy:  # always offers the first server, as a policy with a stale view would
        def pick(self, candidates, client_ip):
            return candidates[0] if candidates else None

    upstream = Upstream("api", servers, "round_robin")
    upstream._policy = StalePolicy()
    assert servers[0].try_acquire()  # someone else holds the only slot
    assert upstream.pick_server("") is servers[1]
    assert upstream.pick_server("") is None  # bounded: gives up, no spin


def test_upstream_snapshot():
    servers = servers_with(2, 1)
    upstream = Upstream("api", servers, "least_connections")
    upstream.pick_server("")
    servers[1].set_health(False, "refused")
    snapshot = upstream.snapshot()
    assert snapshot["policy"] == "least_connections"
    assert [(s["address"], s["state"], s["active_requests"], s["requests_total"])
            for s in snapshot["servers"]] == [("10.0.0.1:8000", "up", 1, 1), ("10.0.0.2:8000", "down", 0, 0)]
    assert upstream.name == "api" and upstream.policy_name == "least_connections"
    assert upstream.servers == tuple(servers)


# -- concurrency -------------------------------------------------------------------------

THREADS = 8
ROUNDS = 5_000


@pytest.fixture
def frequent_thread_switches():
    """Switch threads every microsecond so check-then-act races actually interleave."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(previous)


def hammer(upstream, servers):
    """THREADS threads x ROUNDS pick+release; returns (successful picks, most in flight per server)."""
    lock = threading.Lock()
    in_flight = collections.Counter()
    most_seen = collections.Counter()
    picked = collections.Counter()
    start = threading.Barrier(THREADS)
    errors = []

    def worker(number):
        try:
            start.wait()
            for round_number in range(ROUNDS):
                server = upstream.pick_server(f"10.1.{number}.{round_number % 250}")
                if server is None:
                    continue
                with lock:
                    in_flight[server] += 1
                    seen = max(in_flight[server], server.active_requests)
                    most_seen[server] = max(most_seen[server], seen)
                    picked[server] += 1
                time.sleep(0)  # hold the slot while other threads run, as a request would
                with lock:
                    in_flight[server] -= 1
                server.release()
        except BaseException as error:  # surfaced by the assertion below
            errors.append(error)
            raise

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    return picked, most_seen


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_concurrent_pick_and_release_keeps_counters_exact(name, frequent_thread_switches):
    servers = servers_with(3, 1, 2)
    upstream = Upstream("api", servers, name)
    picked, _ = hammer(upstream, servers)
    assert sum(picked.values()) == THREADS * ROUNDS  # unlimited servers: every pick succeeds
    for server in servers:
        assert server.active_requests == 0
        assert server.requests_total == picked[server]


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_concurrent_picks_never_exceed_max_connections(name, frequent_thread_switches):
    servers = servers_with(1, 2, 1, max_connections=2)
    upstream = Upstream("api", servers, name)
    picked, most_seen = hammer(upstream, servers)
    for server in servers:
        assert server.active_requests == 0
        assert server.requests_total == picked[server]
        assert most_seen[server] <= 2
    assert sum(picked.values()) > 0
    assert max(most_seen.values()) == 2  # the limit was actually reached: the test had teeth


# -- through a proxy: retries against a dead server, ip_hash under a health flap and behind proxies -----
@pytest.mark.parametrize("policy", ["round_robin", "least_connections"])
def test_a_dead_server_is_tried_first_by_its_share_of_requests_not_by_all(make_backend, make_proxy, policy):
    """[dead, live], no passive checks: the retry's pick took the live server's round-robin turn, so the
    next request started at the dead one again: every request paid a failed connect (a whole
    connect_timeout for a blackholed server) instead of every second one."""
    live = make_backend()
    proxy = make_proxy({"web": [f"127.0.0.1:{free_port()}", live.address]},
                       upstream_options={"retries": 1, "policy": policy})
    with requests.Session() as session:
        for _ in range(10):
            assert session.get(proxy.url + "/", timeout=DEADLINE).status_code == 200
    dead, alive = proxy.app.runtime.upstreams["web"].servers
    assert dead.failures_total == 5 and alive.requests_total == 10, (dead.snapshot(), alive.snapshot())


def _get_from(proxy, source_ip: str) -> str:
    """GET / from a given loopback source address (all of 127/8 is local); the body names the backend."""
    port = int(proxy.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE, source_address=(source_ip, 0)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        data = b""
        for _ in range(100):  # bounded: Connection: close ends the answer
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return body.decode()


def test_ip_hash_moves_only_the_clients_of_a_server_that_goes_down_and_brings_them_back(backends, observed_proxy):
    a, b, c = backends("a", "b", "c")
    proxy = observed_proxy(config_document({"web": {"servers": [a.address, b.address, c.address],
                                                    "policy": "ip_hash", "health": FAST_HEALTH}}))
    clients = [f"127.0.0.{i}" for i in range(2, 32)]
    before = {ip: _get_from(proxy, ip) for ip in clients}
    assert set(before.values()) == {"a", "b", "c"}, before  # 30 clients over 3 servers: each has some
    assert before == {ip: _get_from(proxy, ip) for ip in clients}  # sticky
    b.health_status = 500
    wait_for(lambda: proxy.state("web", b.address) == "down", what="b down")
    during = {ip: _get_from(proxy, ip) for ip in clients}
    assert {ip for ip in clients if during[ip] != before[ip]} == {ip for ip in clients if before[ip] == "b"}
    b.health_status = 200
    wait_for(lambda: proxy.state("web", b.address) == "up", what="b up")
    assert {ip: _get_from(proxy, ip) for ip in clients} == before


def _served_for(proxy, forwarded_for: str) -> str:
    response = requests.get(proxy.url + "/", headers={"X-Forwarded-For": forwarded_for}, timeout=DEADLINE)
    assert response.status_code == 200, response.text
    return response.text


@pytest.mark.parametrize("trusted, spread", [(["127.0.0.1"], True), (["10.0.0.0/8"], False)],
                         ids=["behind-a-trusted-proxy", "from-an-untrusted-peer"])
def test_ip_hash_keys_on_the_client_a_trusted_proxy_forwarded_for(backends, observed_proxy, trusted, spread):
    """Behind a load balancer every request comes from its address: ip_hash sent every client to one
    server. With trusted_proxies set (nginx's set_real_ip_from), it hashes the rightmost untrusted
    X-Forwarded-For hop; from an untrusted peer the header is ignored (a client cannot pick its server)."""
    a, b, c = backends("a", "b", "c")
    proxy = observed_proxy(config_document({"web": {"servers": [a.address, b.address, c.address],
                                                    "policy": "ip_hash"}},
                                           server={"trusted_proxies": trusted}))
    clients = [f"203.0.113.{i}" for i in range(1, 31)]
    chosen = {ip: _served_for(proxy, f"{ip}, 127.0.0.1") for ip in clients}  # the last hop: trusted, skipped
    assert chosen == {ip: _served_for(proxy, ip) for ip in clients}  # sticky per client
    assert (len(set(chosen.values())) == 3) is spread, chosen
