"""Per-route rate limits: a token bucket per client address (or header value), 429 past it.

The bucket table alone with a fake clock (refill, expiry, eviction), the config reader, then the real
proxy on 127.0.0.1 in front of a real backend: in this process, and as a subprocess with two worker
processes sharing one limit.
"""

from __future__ import annotations

import fcntl
import http.client
import multiprocessing
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import signal

import bcrypt
import pytest
import requests
from h2.events import ResponseReceived
from prometheus_client.parser import text_string_to_metric_families

from proxy.config.edge import RateLimitPolicy
from proxy.config.schema import ConfigError, parse_config
from proxy.http.bucket_table import GROUP, BucketTable
from proxy.http.errors import TooManyRequests
from proxy.http.rate_limit import RateLimiter
from proxy.routing.table import routing_table_lines
from tests.support.backends import named_backends
from tests.support.client import raw_client
from tests.support.h2 import H2Client, start_h2_proxy, stop_quietly
from tests.support.command import assert_one_line_problem, run_cli, write_config
from tests.support.ports import free_port
from tests.support.processes import admin_status, children, proxy_config, ready_workers, running_proxy
from tests.support.proxy import config_document, proxy_config_dict, scrape
from tests.support.timing import FakeClock, wait_for

pytestmark = pytest.mark.timeout(60)

HOUR = 3600.0
WAIT = 30.0  # generous: the machine may be busy


class Headers:
    """Stand-in for a parsed request's headers: what RateLimiter reads."""

    def __init__(self, **fields):
        self.fields = {name.replace("_", "-").lower(): [value] for name, value in fields.items()}

    def get_all(self, name):
        return list(self.fields.get(name, ()))


def limiter(requests=60, per=60.0, burst=3, header=None, table=None, clock=None):
    return RateLimiter(RateLimitPolicy(requests, per, burst, header), "/", table or BucketTable(64),
                       clock or FakeClock())


def outcomes(limit, count, client="10.0.0.1", headers=None) -> list[bool]:
    results = []
    for _ in range(count):
        try:
            limit.check(client, headers or Headers())
            results.append(True)
        except TooManyRequests:
            results.append(False)
    return results


# -- the bucket -----------------------------------------------------------------------------------------

def test_a_burst_passes_then_the_bucket_refills_at_the_rate():
    clock = FakeClock()
    limit = limiter(requests=60, per=60.0, burst=3, clock=clock)  # one token a second, three at most
    assert outcomes(limit, 4) == [True, True, True, False]
    clock.advance(0.5)
    assert outcomes(limit, 1) == [False]  # half a token is not a token
    clock.advance(0.5)
    assert outcomes(limit, 2) == [True, False]
    clock.advance(100)  # a long pause fills the bucket to the burst, no further
    assert outcomes(limit, 4) == [True, True, True, False]


def test_a_clock_reading_older_than_the_buckets_refills_nothing_twice():
    """A request reads the clock before it waits for the bucket's lock, so under load the table sees
    times out of order, as if the clock went back: the bucket's time must not go back with them,
    or the next request would be given the same seconds' tokens again."""
    clock = FakeClock()
    limit = limiter(requests=1, per=1.0, burst=1, clock=clock)  # one token a second, one at most
    assert outcomes(limit, 1) == [True]
    clock.advance(-10)  # read 10 s earlier, got the lock later
    assert outcomes(limit, 1) == [False]
    clock.advance(10.5)  # half a second after the token was taken
    assert outcomes(limit, 1) == [False]
    clock.advance(0.5)
    assert outcomes(limit, 2) == [True, False]


def test_the_headers_count_down_and_a_429_says_when_to_come_back():
    clock = FakeClock()
    limit = limiter(requests=60, per=60.0, burst=3, clock=clock)
    assert limit.check("10.0.0.1", Headers()) == "RateLimit-Limit: 3\r\nRateLimit-Remaining: 2\r\nRateLimit-Reset: 1\r\n"
    limit.check("10.0.0.1", Headers())
    limit.check("10.0.0.1", Headers())
    clock.advance(0.25)
    with pytest.raises(TooManyRequests) as refused:
        limit.check("10.0.0.1", Headers())
    assert refused.value.status == 429
    assert dict(refused.value.headers) == {"Retry-After": "1", "RateLimit-Limit": "3", "RateLimit-Remaining": "0",
                                           "RateLimit-Reset": "3"}


def test_clients_have_buckets_of_their_own():
    limit = limiter(burst=1)
    assert outcomes(limit, 2, "10.0.0.1") == [True, False]
    assert outcomes(limit, 2, "10.0.0.2") == [True, False]


def test_a_header_key_falls_back_to_the_client_address_without_the_header():
    limit = limiter(burst=1, header="x-api-key")
    assert outcomes(limit, 2, headers=Headers(x_api_key="alpha")) == [True, False]
    assert outcomes(limit, 1, headers=Headers(x_api_key="beta")) == [True]
    assert outcomes(limit, 2, headers=Headers()) == [True, False]  # 10.0.0.1's own bucket, not alpha's
    assert outcomes(limit, 1, "10.0.0.2", Headers()) == [True]


def test_one_client_has_one_bucket_however_its_address_is_written():
    limit = limiter(burst=1)
    assert outcomes(limit, 1, "10.0.0.1") == [True]
    assert outcomes(limit, 1, "::ffff:10.0.0.1") == [False]  # the same IPv4 client, as a dual-stack listener sees it
    assert outcomes(limit, 1, "2001:db8::7") == [True]
    assert outcomes(limit, 1, "2001:DB8:0:0::7") == [False]
    assert outcomes(limit, 1, "not-an-address") == [True]  # kept as it is: still a bucket of its own
    assert outcomes(limit, 1, "not-an-address") == [False]


def test_the_table_never_grows_and_evicts_the_least_recently_used_of_a_group():
    clock = FakeClock()
    table = BucketTable(64)
    for key in range(1, 1001):  # a flood of distinct keys, each keeping its bucket busy for an hour
        table.take(key, 10, 10 / HOUR, clock())
        clock.advance(0.001)
    assert table.slots == 64 and os.fstat(table._fd).st_size == 64 * 32
    assert table.used(clock()) == 64
    assert table.evictions == 1000 - 64
    # Keys 1000, 992, ... share a group (8 groups of 8 slots): its 8 most recent keys are kept, with
    # one token used; the 9th most recent was evicted, and comes back with a full bucket.
    step = table.groups
    kept = [table.take(1000 - n * step, 10, 10 / HOUR, clock()) for n in range(GROUP)]
    assert all(allowed and tokens == pytest.approx(8.0, abs=0.01) for allowed, tokens in kept)
    assert table.take(1000 - GROUP * step, 10, 10 / HOUR, clock()) == (True, 9.0)


def test_an_idle_key_expires_once_its_bucket_is_full_again():
    clock = FakeClock()
    table = BucketTable(GROUP)  # one group
    for key in range(1, GROUP + 1):
        table.take(key, 2, 1.0, clock())  # one token a second: full again after 1 s
    clock.advance(1.0)
    table.take(GROUP + 1, 2, 1.0, clock())
    assert table.evictions == 0  # it took an expired slot
    assert table.used(clock()) == 1


def _holding_inside(table_class, key: int, entered, release) -> None:
    """In a forked child: a take of ``key`` stops inside its critical section until ``release``."""
    original = table_class._slot_for

    def paused(self, fields, slot_key, now):
        if slot_key == key:
            entered.set()
            release.wait(WAIT)
        return original(self, fields, slot_key, now)

    table_class._slot_for = paused


def _blocked_lock_waits(table: BucketTable) -> int:
    """Processes waiting in the kernel for a lock on the table (the "->" lines of /proc/locks)."""
    inode = f":{os.fstat(table._fd).st_ino} "
    with open("/proc/locks") as locks:
        return sum(1 for line in locks if "->" in line and inode in line)


def test_two_workers_crossing_stripes_wait_rather_than_fail():
    """fcntl locks belong to processes, so the kernel sees worker 1 (one thread holding stripe 1,
    another waiting for stripe 2) and worker 2 (holding stripe 2, now asking for stripe 1) as a
    deadlock and answers EDEADLK, though each thread holds one stripe and will let it go."""
    table = BucketTable(1024)  # 128 groups: key 1 is in stripe 1, key 2 in stripe 2
    context = multiprocessing.get_context("fork")  # as the supervisor makes its workers
    release, first_in, second_in, asked, ask = (context.Event() for _ in range(5))
    results = context.Queue()

    def take(name, key):
        try:
            results.put((name, table.take(key, 5, 1.0, 0.0)[0]))
        except OSError as error:
            results.put((name, error.strerror))

    def worker_one():
        _holding_inside(BucketTable, 1, first_in, release)
        holder = threading.Thread(target=take, args=("holds 1", 1))
        holder.start()
        second_in.wait(WAIT)
        take("waits for 2", 2)
        holder.join()

    def worker_two():
        _holding_inside(BucketTable, 2, second_in, release)
        real_lockf = fcntl.lockf

        def lockf(*args):
            try:
                return real_lockf(*args)
            finally:
                if threading.current_thread().name == "asker":
                    asked.set()  # the kernel has answered the first ask (or it waits there)

        fcntl.lockf = lockf
        holder = threading.Thread(target=take, args=("holds 2", 2))
        holder.start()
        first_in.wait(WAIT)
        ask.wait(WAIT)
        asker = threading.Thread(target=take, args=("asks for 1", 1), name="asker")
        asker.start()
        asker.join()
        holder.join()

    workers = [context.Process(target=worker_one), context.Process(target=worker_two)]
    for worker in workers:
        worker.start()
    try:
        wait_for(lambda: first_in.is_set() and second_in.is_set() and _blocked_lock_waits(table) == 1, WAIT,
                 what="worker one waiting in the kernel for stripe 2")
        ask.set()
        wait_for(lambda: asked.is_set() or _blocked_lock_waits(table) == 2, WAIT,
                 what="worker two asking for stripe 1")
    finally:
        release.set()
        outcomes = dict(results.get(timeout=WAIT) for _ in range(4))
        for worker in workers:
            worker.join(WAIT)
    assert outcomes == {"holds 1": True, "waits for 2": True, "holds 2": True, "asks for 1": True}


def test_a_worker_killed_inside_the_lock_does_not_wedge_the_others():
    table = BucketTable(1024)
    context = multiprocessing.get_context("fork")
    inside, never = context.Event(), context.Event()

    def worker():
        _holding_inside(BucketTable, 1, inside, never)
        table.take(1, 5, 1.0, 0.0)

    victim = context.Process(target=worker)
    victim.start()
    try:
        wait_for(inside.is_set, WAIT, what="the worker inside the critical section")
        done = context.Event()
        waiter = context.Process(target=lambda: (table.take(1, 5, 1.0, 0.0), done.set()))
        waiter.start()  # another worker, waiting for the same stripe in the kernel
        wait_for(lambda: _blocked_lock_waits(table) == 1, WAIT, what="the other worker waiting")
    finally:
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(WAIT)
    wait_for(done.is_set, WAIT, what="the waiting worker served once the holder died")
    waiter.join(WAIT)
    assert table.take(1, 5, 1.0, 0.0) == (True, 3.0)  # and this one too; the waiter took a token


# -- the config -----------------------------------------------------------------------------------------

def route_config(**route) -> dict:
    return proxy_config_dict({"web": ["127.0.0.1:9"]}, routes=[{"path": "/", "upstream": "web", **route}])


def config_problems(document: dict) -> list[str]:
    with pytest.raises(ConfigError) as error:
        parse_config(document, "proxy.toml")
    return error.value.problems


def test_a_limit_is_read_with_its_defaults():
    config = parse_config(route_config(rate_limit={"requests": 100, "per": "1m", "burst": 20, "key": "client_ip"}),
                          "proxy.toml")
    assert config.routes[0].rate_limit == RateLimitPolicy(100, 60.0, 20, None)
    config = parse_config(route_config(rate_limit={"requests": 5, "key": "header:X-Api-Key"}), "proxy.toml")
    assert config.routes[0].rate_limit == RateLimitPolicy(5, 1.0, 5, "x-api-key")  # per 1s, burst = requests
    assert parse_config(route_config(), "proxy.toml").routes[0].rate_limit is None
    assert config.server.rate_limit_keys == 65536


@pytest.mark.parametrize("rate_limit, expected", [
    ({"requests": 10, "per": "soon"}, 'proxy.toml: routes[0].rate_limit.per: "soon" is not a valid duration'),
    ({"requests": 10, "per": 0}, "proxy.toml: routes[0].rate_limit.per: 0 is too short"),
    ({"requests": -5}, "proxy.toml: routes[0].rate_limit.requests: expected a whole number of requests, at least 1, got -5"),
    ({"requests": 1.5}, "proxy.toml: routes[0].rate_limit.requests: expected a whole number"),
    ({"requests": 10, "burst": 0}, "proxy.toml: routes[0].rate_limit.burst: expected a whole number of requests, at least 1, got 0"),
    ({"requests": 10, "key": "cookie:session"}, 'proxy.toml: routes[0].rate_limit.key: "cookie:session" is not a key kind'),
    ({"requests": 10, "key": "header:"}, 'proxy.toml: routes[0].rate_limit.key: "header:" does not name a header'),
    ({"requests": 10, "window": "1m"}, "proxy.toml: routes[0].rate_limit.window: unknown key"),
    ({"per": "1m"}, 'proxy.toml: routes[0].rate_limit: missing required key "requests"'),
    (100, "proxy.toml: routes[0].rate_limit: expected a table"),
])
def test_a_bad_limit_names_the_route_and_the_key(rate_limit, expected):
    problems = config_problems(route_config(rate_limit=rate_limit))
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_a_bad_table_size_names_the_key():
    document = route_config()
    document["server"]["rate_limit_keys"] = 10
    assert config_problems(document) == ["proxy.toml: server.rate_limit_keys: must be 64-16777216, got 10"]


def test_check_shows_the_limit_of_a_route():
    config = parse_config(route_config(rate_limit={"requests": 100, "per": "1m", "burst": 20}), "proxy.toml")
    assert "       rate limit: 100 per 1m, burst 20, key client_ip" in routing_table_lines(config)


def test_pyproxy_check_names_the_file_and_the_key(tmp_path):
    text = proxy_config(8080, "127.0.0.1:3000", extra_routes=LIMITED_ROUTE.replace("burst = 10", "burst = -1"))
    result = run_cli("check", "-c", str(write_config(tmp_path, text)))
    assert_one_line_problem(result, "proxy.toml: routes[1].rate_limit.burst: expected a whole number of requests, "
                                    "at least 1, got -1")
    result = run_cli("check", "-c", str(write_config(tmp_path, text.replace("burst = -1", "burst = 10"))))
    assert result.returncode == 0 and "       rate limit: 1 per 1h, burst 10, key client_ip" in result.stdout


# -- through the proxy ----------------------------------------------------------------------------------

def get(proxy, target: str = "/", headers: str = "") -> object:
    with raw_client(proxy) as client:
        client.send(f"GET {target} HTTP/1.1\r\nHost: a\r\n{headers}Connection: close\r\n\r\n".encode("latin-1"))
        return client.read_response()


def limited_route(**limit) -> list[dict]:
    return [{"path": "/", "upstream": "web", "rate_limit": {"requests": 1, "per": "1h", **limit}}]


def test_past_the_burst_the_proxy_answers_429_and_the_backend_never_sees_it(make_backend, make_proxy):
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]}, routes=limited_route(burst=3))
    allowed = [get(proxy) for _ in range(3)]
    assert [r.status for r in allowed] == [200, 200, 200]
    assert [r.header("RateLimit-Remaining") for r in allowed] == ["2", "1", "0"]
    assert {r.header("RateLimit-Limit") for r in allowed} == {"3"}
    refused = get(proxy)
    assert refused.status == 429 and refused.body.startswith(b"429 too many requests")
    assert refused.header("RateLimit-Limit") == "3" and refused.header("RateLimit-Remaining") == "0"
    assert 3590 <= int(refused.header("Retry-After")) <= 3600  # one token an hour
    assert 3 * 3600 - 10 <= int(refused.header("RateLimit-Reset")) <= 3 * 3600
    assert len(backend.requests) == 3


def test_the_upstreams_own_ratelimit_fields_give_way_to_the_proxys(make_raw_backend, make_proxy):
    def answer_with_its_own_fields(peer):
        peer.read_request()
        peer.send(b"HTTP/1.1 200 OK\r\nRateLimit-Remaining: 999\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    backend = make_raw_backend(answer_with_its_own_fields)
    proxy = make_proxy({"web": [backend.address]}, routes=limited_route(burst=5))
    response = get(proxy)
    assert response.status == 200
    assert [value for name, value in response.headers if name.lower() == "ratelimit-remaining"] == ["4"]


def test_http2_answers_carry_the_fields_too(make_raw_backend):
    def answer_with_its_own_fields(peer):
        peer.read_request()
        peer.send(b"HTTP/1.1 200 OK\r\nRateLimit-Remaining: 999\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    backend = make_raw_backend(answer_with_its_own_fields)
    proxy = start_h2_proxy({"web": [backend.address]}, None, listen={"h2c": True}, routes=limited_route(burst=3))
    try:
        client = H2Client.connect(proxy.port)
        streams, answers = [], []
        for _ in range(2):  # one after the other, so the first takes the first token
            streams.append(client.request("/"))
            answers.append(client.response(streams[-1]))
        blocks = {event.stream_id: event.headers for event in client.events if isinstance(event, ResponseReceived)}
        client.close()
    finally:
        stop_quietly(proxy)
    for stream, (headers, body), remaining in zip(streams, answers, ("2", "1")):
        assert headers[":status"] == "200" and body == b"ok"
        assert headers["ratelimit-limit"] == "3" and 0 < int(headers["ratelimit-reset"]) <= 3 * 3600
        assert [value for name, value in blocks[stream] if name == "ratelimit-remaining"] == [remaining]


def test_a_header_key_limits_each_value_and_clients_without_it_by_address(make_backend, make_proxy):
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]}, routes=limited_route(burst=2, key="header:X-Api-Key"))
    assert [get(proxy, headers="X-Api-Key: alpha\r\n").status for _ in range(3)] == [200, 200, 429]
    assert get(proxy, headers="X-Api-Key: beta\r\n").status == 200
    assert [get(proxy).status for _ in range(3)] == [200, 200, 429]  # no key: 127.0.0.1's bucket
    assert get(proxy, headers="X-Api-Key: gamma\r\n").status == 200


def test_a_second_key_field_gets_no_fresh_bucket(make_backend, make_proxy):
    """Most servers read the first (or the last) of two fields: a client with one key must not get a
    new bucket per request by adding a second field, empty or random; such a request is refused."""
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]}, routes=limited_route(burst=1, key="header:X-Api-Key"))
    assert [get(proxy, headers="X-Api-Key: alpha\r\n").status for _ in range(2)] == [200, 429]
    for second in ("", "alpha", "random-1", "random-2"):
        refused = get(proxy, headers=f"X-Api-Key: alpha\r\nX-Api-Key: {second}\r\n")
        assert refused.status == 400 and refused.body.startswith(b"400 more than one x-api-key field")
    assert len(backend.requests) == 1
    assert get(proxy, headers="X-Api-Key:\r\n").status == 200  # empty: the client address's bucket


def test_an_untrusted_client_cannot_escape_by_changing_x_forwarded_for(make_backend, make_proxy):
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]}, server={"trusted_proxies": ["192.0.2.1"]},
                       routes=limited_route(burst=2))
    statuses = [get(proxy, headers=f"X-Forwarded-For: 10.0.0.{n}\r\n").status for n in range(4)]
    assert statuses == [200, 200, 429, 429]


def test_behind_a_trusted_proxy_each_original_client_has_its_bucket(make_backend, make_proxy):
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]}, server={"trusted_proxies": ["127.0.0.1"]},
                       routes=limited_route(burst=1))
    assert [get(proxy, headers="X-Forwarded-For: 10.0.0.1\r\n").status for _ in range(2)] == [200, 429]
    assert get(proxy, headers="X-Forwarded-For: 10.0.0.2\r\n").status == 200


def test_a_mapped_ipv4_client_shares_the_bucket_of_its_ipv4_address(make_backend, make_proxy):
    """A dual-stack balancer in front writes its IPv4 clients as ::ffff:a.b.c.d, a plain one as a.b.c.d:
    the limit is the same client's either way (as allow / deny see it)."""
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]}, server={"trusted_proxies": ["127.0.0.1"]},
                       routes=limited_route(burst=1))
    statuses = [get(proxy, headers=f"X-Forwarded-For: {client}\r\n").status
                for client in ("10.0.0.1", "::ffff:10.0.0.1", "0:0:0:0:0:FFFF:10.0.0.1")]
    assert statuses == [200, 429, 429]
    assert len(backend.requests) == 1


def test_failed_logins_take_tokens(make_backend, make_proxy):
    backend = make_backend()
    password_hash = bcrypt.hashpw(b"right", bcrypt.gensalt(4)).decode("ascii")
    routes = limited_route(burst=3)
    routes[0]["basic_auth"] = {"users": {"alice": password_hash}}
    proxy = make_proxy({"web": [backend.address]}, routes=routes)
    wrong = "Authorization: Basic YWxpY2U6d3Jvbmc=\r\n"  # alice:wrong
    right = "Authorization: Basic YWxpY2U6cmlnaHQ=\r\n"  # alice:right
    assert [get(proxy, headers=wrong).status for _ in range(3)] == [401, 401, 401]
    assert get(proxy, headers=right).status == 429  # the guesses used the tokens up
    assert backend.requests == []


def test_a_reload_keeps_the_buckets_of_an_unchanged_limit_and_starts_a_changed_one_afresh(make_backend, make_proxy):
    backend = make_backend()
    document = proxy_config_dict({"web": [backend.address]}, routes=limited_route(burst=1))
    proxy = make_proxy({"web": [backend.address]}, routes=document["routes"])
    document["server"]["listen"] = f"127.0.0.1:{proxy.port}"
    assert [get(proxy).status for _ in range(2)] == [200, 429]

    proxy.process.reload(parse_config(document, "test.toml"))  # the same limit: still used up
    assert get(proxy).status == 429

    document["routes"] = limited_route(burst=3)
    proxy.process.reload(parse_config(document, "test.toml"))
    assert [get(proxy).status for _ in range(4)] == [200, 200, 200, 429]

    document["routes"] = [{"path": "/", "upstream": "web"}]  # the limit removed
    proxy.process.reload(parse_config(document, "test.toml"))
    response = get(proxy)
    assert response.status == 200 and response.header("RateLimit-Limit") is None


def test_a_flood_of_distinct_keys_evicts_within_the_table_and_metrics_count_it(make_backend, observed_proxy):
    backend = make_backend()
    document = config_document({"web": {"servers": [backend.address]}}, server={"rate_limit_keys": 64})
    document["routes"] = [{"path": "/", "upstream": "web",
                           "rate_limit": {"requests": 1, "per": "1h", "burst": 1, "key": "header:X-Api-Key"}}]
    proxy = observed_proxy(document)
    with requests.Session() as session:
        for n in range(300):
            assert session.get(proxy.url, headers={"X-Api-Key": f"key-{n}"}, timeout=5).status_code == 200
        assert session.get(proxy.url, headers={"X-Api-Key": "key-299"}, timeout=5).status_code == 429
    table = proxy.app.rate_table()
    assert table.slots == 64 and table.used(time.monotonic()) <= 64
    families = scrape(proxy)
    assert families["pyproxy_rate_limit_evictions"].samples[0].value >= 300 - 64
    assert families["pyproxy_rate_limited"].samples[0].value == 1


# -- two workers, one limit ---------------------------------------------------------------------------

LIMITED_ROUTE = """
[[routes]]
path = "/limited"
upstream = "app"
rate_limit = { requests = 1, per = "1h", burst = 10 }
"""


def worker_totals(admin_port: int) -> dict[int, int]:
    return {w["pid"]: w["requests_total"] for w in admin_status(admin_port)["workers"]}


def connection_per_worker(port: int, admin_port: int, workers: int = 2) -> dict[int, http.client.HTTPConnection]:
    """An open keep-alive connection to each worker process. The kernel hashes each new connection to
    one worker's listening socket; a request on it, and whose count then went up, names its worker."""
    owned: dict[int, http.client.HTTPConnection] = {}
    for _ in range(40):  # two workers: all 40 landing on one is a 1 in 2**39 chance
        before = worker_totals(admin_port)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/")
        response = conn.getresponse()
        response.read()
        assert response.status == 200

        def owner():
            after = worker_totals(admin_port)
            return next((pid for pid, total in after.items() if total > before.get(pid, 0)), None)

        pid = wait_for(owner, what="a worker to count the request")
        if pid in owned:
            conn.close()
        else:
            owned[pid] = conn
        if len(owned) == workers:
            return owned
    raise AssertionError(f"40 connections reached only workers {sorted(owned)}")


def test_two_workers_enforce_one_limit_between_them(tmp_path):
    port, admin_port = free_port(), free_port()
    config = proxy_config(port, "{backend}", workers=2, admin_port=admin_port, extra_routes=LIMITED_ROUTE)
    with named_backends("a") as (backend,), \
            running_proxy(tmp_path, config.replace("{backend}", backend.address)) as run:
        connections = connection_per_worker(port, admin_port)
        statuses = []
        for _ in range(30):  # taking turns: each worker checks half of the 60 requests
            for conn in connections.values():
                conn.request("GET", "/limited")
                response = conn.getresponse()
                response.read()
                statuses.append(response.status)
        for conn in connections.values():
            conn.close()
        assert statuses.count(200) == 10 and statuses.count(429) == 50
        assert metric(admin_port, "pyproxy_rate_limited") == 50  # summed over the workers

        def one(_):
            with requests.Session() as session:  # a fresh connection each: the kernel spreads them
                return session.get(run.url + "/limited", timeout=10).status_code

        # A reload that changes the limit reaches every worker; the new buckets are shared too.
        run.rewrite(config.replace("{backend}", backend.address).replace("burst = 10", "burst = 4"))
        run.signal(signal.SIGHUP)
        wait_for(lambda: run.log().count(") reloaded") == 2, 20, what="both workers reloaded", on_timeout=run.log)
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(one, range(20)))
        assert statuses.count(200) == 4 and statuses.count(429) == 16



def test_a_restarted_worker_takes_tokens_from_the_same_buckets(tmp_path):
    port, admin_port = free_port(), free_port()
    config = proxy_config(port, "{backend}", workers=2, admin_port=admin_port,
                          extra_routes=LIMITED_ROUTE.replace("burst = 10", "burst = 3"))
    with named_backends("a") as (backend,), \
            running_proxy(tmp_path, config.replace("{backend}", backend.address)) as run:
        wait_for(lambda: ready_workers(run) == 2, 20, what="both workers ready", on_timeout=run.log)

        def one(_):
            with requests.Session() as session:
                return session.get(run.url + "/limited", timeout=10).status_code

        with ThreadPoolExecutor(4) as pool:
            assert sorted(pool.map(one, range(6))) == [200, 200, 200, 429, 429, 429]
        victim = min(children(run.proc.pid))
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: ready_workers(run) == 3 and victim not in children(run.proc.pid), 20,
                 what="a replacement worker ready", on_timeout=run.log)
        with ThreadPoolExecutor(4) as pool:  # fresh connections reach the replacement too
            assert list(pool.map(one, range(20))) == [429] * 20
        assert len(admin_status(admin_port)["workers"]) == 2

def metric(admin_port: int, name: str) -> float:
    text = requests.get(f"http://127.0.0.1:{admin_port}/metrics", timeout=10).text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    return families[name].samples[0].value
