"""Config layer: units, every key, every problem reported at once, example configs, starter, quick mode."""
from __future__ import annotations

import dataclasses
import os
import pickle
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config.schema import (
    POLICY_NAMES, AdminConfig, Config, ConfigError, HealthConfig, ListenConfig, LogConfig,
    PassiveConfig, RouteConfig, ServerSettings, UpstreamConfig, UpstreamServerConfig, load_config,
    parse_config, parse_server_address, quick_config,
)
from proxy.config.starter import STARTER_CONFIG, render_config_dict, write_starter
from proxy.config.units import (
    format_address, format_duration, format_size, parse_address, parse_duration, parse_size,
)
from proxy.routing.table import routes_by_precedence, routing_table_lines
from tests.support.command import assert_one_line_problem, one_backend_config, run_cli, write_config
from tests.support.ports import free_port

REPO = Path(__file__).resolve().parent.parent


def minimal(**sections) -> dict:
    """The smallest valid config, with some top-level sections replaced or added."""
    data = {"routes": [{"upstream": "web"}], "upstreams": {"web": {"servers": ["127.0.0.1:3000"]}}}
    data.update(sections)
    return data


def problems_of(data: dict, source: str = "proxy.toml") -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, source)
    return caught.value.problems


def write(tmp_path: Path, text: str, name: str = "proxy.toml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


# --- units ------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, seconds", [
    (5, 5.0), (0.25, 0.25), (0, 0.0), ("250ms", 0.25), ("5s", 5.0), ("2m", 120.0), ("1h", 3600.0),
    ("1.5s", 1.5), ("0s", 0.0),
    # Go's (Caddy, Traefik) combined spelling, and HAProxy's and nginx's days
    ("1h30m", 5400.0), ("1m30s", 90.0), ("2h45m10s500ms", 9910.5), ("1d", 86400.0), ("1d12h", 129600.0),
])
def test_parse_duration_accepts(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value, reason", [
    ("5", "use a number of seconds"), ("5 s", "use a number"), ("5sec", "use a number"),
    ("-1s", "use a number"), (-1, "must not be negative"), (True, "use a number"),
    ([5], "use a number"), (float("inf"), "use a number"), ("", "use a number"),
    ("1h 30m", "use a number"), ("1h30", "use a number"), ("h", "use a number"), ("1hm", "use a number"),
])
def test_parse_duration_rejects(value, reason):
    with pytest.raises(ValueError, match="is not a valid duration") as caught:
        parse_duration(value)
    assert reason in str(caught.value)


@pytest.mark.parametrize("value, size", [
    (16384, 16384), (0, 0), ("512B", 512), ("16KiB", 16384), ("10MiB", 10 * 1024 ** 2),
    ("1GiB", 1024 ** 3), ("1.5KiB", 1536), ("16KB", 16000), ("16kB", 16000), ("2MB", 2_000_000), (4.0, 4),
])
def test_parse_size_accepts(value, size):
    assert parse_size(value) == size


@pytest.mark.parametrize("value, reason", [
    ("16kib", "use a number of bytes"), ("16 KiB", "use a number of bytes"), ("16", "use a number of bytes"),
    ("0.5B", "whole number of bytes"), (1.5, "whole number of bytes"), (-1, "must not be negative"),
    (False, "use a number of bytes"), ("16Kb", "use a number of bytes"),
])
def test_parse_size_rejects(value, reason):
    with pytest.raises(ValueError, match="is not a valid size") as caught:
        parse_size(value)
    assert reason in str(caught.value)


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:8080", ("127.0.0.1", 8080)), ("[::1]:8080", ("::1", 8080)), (":8080", ("", 8080)),
    ("localhost:1", ("localhost", 1)), ("Example.COM:65535", ("example.com", 65535)),
    ("[2001:DB8::1]:443", ("2001:db8::1", 443)), ("my_host-1.internal:80", ("my_host-1.internal", 80)),
])
def test_parse_address_accepts(text, expected):
    assert parse_address(text) == expected
    assert parse_address(format_address(*expected)) == expected


@pytest.mark.parametrize("text, message", [
    ("127.0.0.1:99999", '"127.0.0.1:99999" is not a valid address (port must be 1-65535)'),
    ("127.0.0.1:0", '"127.0.0.1:0" is not a valid address (port must be 1-65535)'),
    ("127.0.0.1", '"127.0.0.1" is not a valid address (missing port, e.g. "127.0.0.1:8080")'),
    ("127.0.0.1:", '"127.0.0.1:" is not a valid address (missing port, e.g. "127.0.0.1:8080")'),
    ("host:+80", '"host:+80" is not a valid address (port must be 1-65535)'),
    ("::1:80", '"::1:80" is not a valid address (IPv6 addresses need brackets, e.g. "[::1]:8080")'),
    ("[::1]", '"[::1]" is not a valid address (missing port, e.g. "[::1]:8080")'),
    ("[::g]:80", '"[::g]:80" is not a valid address ([::g] is not an IPv6 address)'),
    ("999.1.1.1:80", '"999.1.1.1:80" is not a valid address (999.1.1.1 is not an IPv4 address)'),
    ("bad host:80", '"bad host:80" is not a valid address ("bad host" is not a valid host name)'),
    (8080, '8080 is not a valid address (expected a string like "127.0.0.1:8080", or ":8080" for all interfaces)'),
    # nginx's "listen 8080": a port alone is not "missing port"
    ("8080", '"8080" is not a valid address (a port alone is written ":8080", for all interfaces)'),
])
def test_parse_address_rejects_with_exact_message(text, message):
    with pytest.raises(ValueError) as caught:
        parse_address(text)
    assert str(caught.value) == message


def test_format_helpers():
    assert [format_duration(s) for s in (0.25, 5.0, 120.0, 3600.0, 1.5, 0)] == ["250ms", "5s", "2m", "1h", "1.5s", "0s"]
    assert [format_size(n) for n in (16384, 100, 10 * 1024 ** 2, 1024 ** 3)] == ["16KiB", "100B", "10MiB", "1GiB"]
    assert format_address("::1", 80) == "[::1]:80"


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:9001", ("127.0.0.1", 9001, False)),
    ("http://backend:8080", ("backend", 8080, False)),
    ("http://backend", ("backend", 80, False)),
    ("https://backend", ("backend", 443, True)),
    ("HTTPS://[::1]:8443/", ("::1", 8443, True)),
    ("https://[::1]", ("::1", 443, True)),
])
def test_parse_server_address(text, expected):
    assert parse_server_address(text) == expected


@pytest.mark.parametrize("text, reason", [
    (":9001", "an upstream server needs a host"),
    ("ftp://x:21", "the scheme must be http or https"),
    ("http://x:80/app", "routes decide paths"),
    ("https://x:70000", "port must be 1-65535"),
    ("http://:80", "missing host"),
])
def test_parse_server_address_rejects(text, reason):
    with pytest.raises(ValueError, match="is not a valid address") as caught:
        parse_server_address(text)
    assert reason in str(caught.value)


# --- every key --------------------------------------------------------------------------------

FULL_TOML = """
[server]
listen = ["127.0.0.1:8080", "[::1]:8081", { address = ":8443", tls_cert = "cert.pem", tls_key = "key.pem" }]
workers = 3
min_threads = 2
max_threads = 64
max_connections = 500
graceful_timeout = "20s"
header_timeout = "250ms"
idle_timeout = "2m"
max_header_bytes = "32KiB"
max_body_bytes = "1MiB"
tunnel_timeout = "1h"
body_timeout = "15s"
send_timeout = "20s"
trusted_proxies = ["10.0.0.0/8", "::1", "192.168.1.1"]

[admin]
listen = "127.0.0.1:9901"

[log]
level = "debug"
access = "logs/access.log"
format = "json"

[[routes]]
host = "API.Localhost:8080"
path = "/api/"
strip_prefix = true
upstream = "api"
set_headers = { X-Env = "dev", X-Team = "core" }

[[routes]]
host = "*.localhost"
upstream = "web"

[[routes]]
path = "/"
upstream = "web"

[upstreams.api]
servers = ["127.0.0.1:9001", { address = "127.0.0.1:9002", weight = 3 }, "https://api.internal"]
policy = "least_connections"
preserve_host = false
keepalive = 8
keepalive_timeout = "20s"
max_connections = 100
connect_timeout = "1s"
read_timeout = "30s"
retries = 1
tls_verify = false
tls_ca = "ca.pem"

[upstreams.api.health]
path = "/status?full=1"
interval = "3s"
timeout = "500ms"
expect_status = [200, 204]
healthy_after = 1
unhealthy_after = 5

[upstreams.api.passive]
max_fails = 4
fail_timeout = "15s"

[upstreams.web]
servers = ["127.0.0.1:3000"]

[upstreams.web.health]
expect_status = "3xx"
"""


@pytest.fixture
def full_config(tmp_path) -> Config:
    for name in ("cert.pem", "key.pem", "ca.pem"):
        (tmp_path / name).write_text("not really PEM; only existence is checked here\n")
    (tmp_path / "logs").mkdir()
    return load_config(write(tmp_path, FULL_TOML))


def test_every_server_key_parses(full_config, tmp_path):
    server = full_config.server
    assert server.listen == (
        ListenConfig("127.0.0.1", 8080), ListenConfig("::1", 8081),
        ListenConfig("", 8443, str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")),
    )
    assert [entry.address for entry in server.listen] == ["127.0.0.1:8080", "[::1]:8081", ":8443"]
    assert (server.workers, server.min_threads, server.max_threads, server.max_connections) == (3, 2, 64, 500)
    assert (server.graceful_timeout, server.header_timeout, server.idle_timeout, server.tunnel_timeout) == (20.0, 0.25, 120.0, 3600.0)
    assert (server.max_header_bytes, server.max_body_bytes) == (32768, 1024 ** 2)
    assert (server.body_timeout, server.send_timeout) == (15.0, 20.0)
    assert server.trusted_proxies == ("10.0.0.0/8", "::1", "192.168.1.1")
    assert full_config.admin == AdminConfig(ListenConfig("127.0.0.1", 9901))
    assert full_config.log == LogConfig("debug", str(tmp_path / "logs" / "access.log"), "json")


def test_every_route_key_parses(full_config):
    assert full_config.routes == (
        RouteConfig(host="api.localhost", path="/api", strip_prefix=True, upstream="api",
                    set_headers=(("X-Env", "dev"), ("X-Team", "core"))),
        RouteConfig(host="*.localhost", upstream="web"),
        RouteConfig(path="/", upstream="web"),
    )


def test_every_upstream_key_parses(full_config, tmp_path):
    api = full_config.upstreams["api"]
    assert api == UpstreamConfig(
        name="api",
        servers=(UpstreamServerConfig("127.0.0.1", 9001), UpstreamServerConfig("127.0.0.1", 9002, weight=3),
                 UpstreamServerConfig("api.internal", 443, tls=True)),
        policy="least_connections", preserve_host=False, keepalive=8, keepalive_timeout=20.0,
        max_connections=100, connect_timeout=1.0, read_timeout=30.0, retries=1,
        health=HealthConfig("/status?full=1", 3.0, 0.5, frozenset({200, 204}), 1, 5),
        passive=PassiveConfig(4, 15.0), tls_verify=False, tls_ca=str(tmp_path / "ca.pem"),
    )
    assert api.servers[2].address == "api.internal:443"
    web = full_config.upstreams["web"]
    assert web.health == HealthConfig(expect_status=frozenset(range(300, 400)))
    assert web.passive is None


def test_defaults_when_keys_are_absent():
    config = parse_config(minimal(), "proxy.toml")
    assert config.server == ServerSettings()
    assert config.server.listen == (ListenConfig("127.0.0.1", 8080),)
    assert config.admin is None
    assert config.log == LogConfig("info", "stdout", "combined")
    assert config.routes == (RouteConfig(host=None, path="/", strip_prefix=False, upstream="web"),)
    assert config.upstreams["web"] == UpstreamConfig("web", (UpstreamServerConfig("127.0.0.1", 3000),))
    assert HealthConfig().expect_status == frozenset(range(200, 300))
    assert POLICY_NAMES == ("round_robin", "least_connections", "random", "ip_hash")


def test_workers_auto_is_the_usable_cpu_count_and_empty_admin_table_uses_default():
    config = parse_config(minimal(server={"workers": "auto"}, admin={}), "proxy.toml")
    assert config.server.workers == len(os.sched_getaffinity(0))
    assert config.admin.listen.address == "127.0.0.1:9901"


def test_workers_auto_counts_only_the_cpus_this_process_may_use():
    """A process limited to one CPU (taskset, a container's cpuset) starts one worker for "auto"."""
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from proxy.config.schema import parse_workers; print(parse_workers('auto'))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert done.stdout.strip() == "1", done.stderr


@pytest.mark.parametrize("status, expected", [
    ("2xx", frozenset(range(200, 300))), ("3XX", frozenset(range(300, 400))), (204, frozenset({204})),
])
def test_expect_status_forms(status, expected):
    data = minimal(upstreams={"web": {"servers": ["127.0.0.1:3000"], "health": {"expect_status": status}}})
    assert parse_config(data, "p.toml").upstreams["web"].health.expect_status == expected


def test_config_is_immutable_and_picklable(full_config):
    with pytest.raises(dataclasses.FrozenInstanceError):
        full_config.server.workers = 9
    with pytest.raises(TypeError):
        full_config.upstreams["x"] = full_config.upstreams["api"]
    assert pickle.loads(pickle.dumps(full_config)) == full_config


# --- problems ---------------------------------------------------------------------------------

def test_contract_example_message_is_exact():
    data = minimal(upstreams={"api": {"servers": ["127.0.0.1:9001", "127.0.0.1:99999"]},
                              "web": {"servers": ["127.0.0.1:3000"]}})
    assert problems_of(data) == [
        'proxy.toml: upstreams.api.servers[1]: "127.0.0.1:99999" is not a valid address (port must be 1-65535)'
    ]


def test_server_table_address_problem_is_reported_at_the_entry():
    # The contract's own example config has servers[1] as a table; the message stays the same.
    data = minimal(upstreams={"api": {"servers": ["127.0.0.1:9001", {"address": "127.0.0.1:99999", "weight": 3}]},
                              "web": {"servers": ["127.0.0.1:3000"]}})
    assert problems_of(data) == [
        'proxy.toml: upstreams.api.servers[1]: "127.0.0.1:99999" is not a valid address (port must be 1-65535)'
    ]


def test_all_problems_are_reported_at_once():
    data = {
        "server": {"workers": 0, "min_threads": 10, "max_threads": 5, "idle_timeout": "soon",
                   "max_header_bytes": "100B", "trusted_proxies": ["10.0.0.1/8", "nope"]},
        "admin": {"listen": "127.0.0.1:8080"},
        "log": {"level": "verbose", "format": "xml"},
        "routes": [{"path": "api", "upstream": "apj", "set_headers": {"Bad Name": "x", "X-Ok": "a\r\nb"}},
                   {"host": "a*.example.com", "upstream": "web"}],
        "upstreams": {"web": {"servers": [], "policy": "fastest", "retries": -1,
                              "health": {"interval": "1s", "timeout": "2s", "expect_status": "ok"},
                              "passive": {"max_fails": 0}}},
    }
    problems = problems_of(data)
    assert problems == [
        'proxy.toml: server.workers: expected a number of processes (1-1024) or "auto", got 0',
        'proxy.toml: server.idle_timeout: "soon" is not a valid duration (use a number of seconds or a string like "250ms", "5s", "2m", "1h")',
        'proxy.toml: server.max_header_bytes: "100B" is too small (must be at least 1024 bytes)',
        'proxy.toml: server.trusted_proxies[0]: "10.0.0.1/8" is not a valid IP address or network (10.0.0.1/8 has host bits set)',
        'proxy.toml: server.trusted_proxies[1]: "nope" is not a valid IP address or network (\'nope\' does not appear to be an IPv4 or IPv6 address)',
        'proxy.toml: server.min_threads: must not exceed max_threads (10 > 5)',
        'proxy.toml: admin.listen: 127.0.0.1:8080 clashes with server.listen 127.0.0.1:8080',
        'proxy.toml: log.level: "verbose" is not one of debug | info | warning | error',
        'proxy.toml: log.format: "xml" is not one of combined | json',
        'proxy.toml: routes[0].path: "api" must start with "/"',
        'proxy.toml: routes[0].set_headers."Bad Name": "Bad Name" is not a valid header name (RFC 9110 §5.6.2 token)',
        'proxy.toml: routes[0].set_headers.X-Ok: "a\\r\\nb" is not a valid header value (no CR, LF or NUL)',
        'proxy.toml: routes[0].upstream: upstream "apj" is not defined (defined: web)',
        'proxy.toml: routes[1].host: "a*.example.com" is not a valid host (a wildcard must be the whole first label, e.g. "*.example.com")',
        'proxy.toml: upstreams.web.policy: "fastest" is not one of round_robin | least_connections | random | ip_hash',
        'proxy.toml: upstreams.web.retries: must be 0-100, got -1',
        'proxy.toml: upstreams.web.servers: expected a list of at least one server like ["127.0.0.1:9001"], got an array',
        'proxy.toml: upstreams.web.health.expect_status: expected "2xx", "3xx", a status code 200-599 or a list of them, got "ok"',
        'proxy.toml: upstreams.web.health.timeout: must not exceed interval (2s > 1s)',
        'proxy.toml: upstreams.web.passive.max_fails: must be at least 1, got 0',
    ]
    assert str(ConfigError(problems)) == "\n".join(problems)


def test_unknown_keys_suggest_the_closest_name():
    data = minimal(server={"listn": "127.0.0.1:8080", "zzz": 1}, route=[])
    data["upstreams"]["web"]["helth"] = {}
    assert problems_of(data) == [
        "proxy.toml: route: unknown key (did you mean 'routes'?)",
        "proxy.toml: server.listn: unknown key (did you mean 'listen'?)",
        "proxy.toml: server.zzz: unknown key (expected one of: listen, workers, min_threads, max_threads, "
        "thread_idle_timeout, max_connections, graceful_timeout, header_timeout, idle_timeout, max_header_bytes, max_body_bytes, "
        "tunnel_timeout, trusted_proxies, body_timeout, send_timeout, cpu_affinity, rate_limit_keys, h2_max_streams)",
        "proxy.toml: upstreams.web.helth: unknown key (did you mean 'health'?)",
    ]


def test_a_broken_route_is_not_reported_as_a_duplicate():
    data = minimal(routes=[{"path": "nope", "upstream": "web"}, {"path": "/", "upstream": "web"},
                           {"path": "/", "upstream": "web"}])
    assert problems_of(data) == [
        'proxy.toml: routes[0].path: "nope" must start with "/"',
        "proxy.toml: routes[2]: same host and path as routes[1], so it can never match",
    ]


def test_undefined_upstream_suggests_a_close_name():
    data = minimal(routes=[{"upstream": "wbe"}])
    assert problems_of(data) == ["proxy.toml: routes[0].upstream: upstream \"wbe\" is not defined (did you mean 'web'?)"]


def test_empty_document_names_the_missing_sections():
    assert problems_of({}) == [
        "proxy.toml: routes: missing: add at least one [[routes]] table",
        "proxy.toml: upstreams: missing: add at least one [upstreams.NAME] table",
    ]


@pytest.mark.parametrize("section, expected", [
    ({"server": {"listen": []}}, "proxy.toml: server.listen: needs at least one address"),
    ({"server": {"listen": ["127.0.0.1:80", ":80"]}}, "proxy.toml: server.listen[1]: :80 is listed twice"),
    ({"server": {"listen": [{"address": ":443", "tls_cert": __file__}]}},
     "proxy.toml: server.listen[0]: tls_cert and tls_key go together: give both or neither"),
    ({"server": {"max_threads": True}}, "proxy.toml: server.max_threads: expected a whole number, got true"),
    ({"server": {"header_timeout": 0}}, "proxy.toml: server.header_timeout: 0 is too short (must be more than 0)"),
    ({"log": {"level": "INFO"}},   # Python's logging spells it so
     """proxy.toml: log.level: "INFO" is not one of debug | info | warning | error (did you mean 'info'?)"""),
    # Threads are started at boot (min_threads) and a worker process each: a typo must not exhaust the machine.
    ({"server": {"min_threads": 1000000}},
     "proxy.toml: server.min_threads: must be 1-10000, got 1000000"),
    ({"server": {"max_threads": 20000}}, "proxy.toml: server.max_threads: must be 1-10000, got 20000"),
    # nginx's client_max_body_size 0 means no limit; here it would refuse every upload with 413.
    ({"server": {"max_body_bytes": 0}},
     'proxy.toml: server.max_body_bytes: 0 would refuse every request body with 413 (it is not "no limit" '
     'as in nginx: give a large size like "100GiB")'),
    # HTTP/2 advertises twice it in a 32-bit SETTINGS field: 2GiB and more broke every h2 connection.
    ({"server": {"max_header_bytes": "4GiB"}},
     'proxy.toml: server.max_header_bytes: "4GiB" is too large (must be at most 1MiB)'),
    ({"server": {"workers": 100000}}, 'proxy.toml: server.workers: expected a number of processes (1-1024) '
                                      'or "auto", got 100000'),
    ({"server": "yes"}, 'proxy.toml: server: expected a table, got "yes"'),
    ({"admin": {"listen": ["127.0.0.1:1", "127.0.0.1:2"]}}, "proxy.toml: admin.listen: expected one address, got an array"),
    ({"log": {"access": ""}}, 'proxy.toml: log.access: expected "stdout", "stderr", "off" or a file path, got ""'),
    ({"routes": [{"upstream": "web"}, {"path": "/", "upstream": "web"}]},
     "proxy.toml: routes[1]: same host and path as routes[0], so it can never match"),
    ({"routes": [{"path": "/"}]}, 'proxy.toml: routes[0]: missing required key "upstream"'),
    ({"routes": [{"upstream": "web", "strip_prefix": "yes"}]},
     'proxy.toml: routes[0].strip_prefix: expected true or false, got "yes"'),
    ({"routes": []}, "proxy.toml: routes: expected at least one [[routes]] table, got an array"),
    ({"upstreams": {"web": {"servers": ["127.0.0.1:3000", "127.0.0.1:3000"]}}},
     "proxy.toml: upstreams.web.servers[1]: 127.0.0.1:3000 is listed twice (give it a weight instead)"),
    ({"upstreams": {"web": {"servers": [{"address": "127.0.0.1:3000", "weight": 1001}]}}},
     "proxy.toml: upstreams.web.servers[0].weight: must be 1-1000, got 1001"),
    ({"upstreams": {"web": {"servers": [":3000"]}}},
     'proxy.toml: upstreams.web.servers[0]: ":3000" is not a valid address (an upstream server needs a host, e.g. "127.0.0.1:3000")'),
    ({"upstreams": {"web": {"servers": ["3000"]}}},
     'proxy.toml: upstreams.web.servers[0]: "3000" is not a valid address (an upstream server needs a host, e.g. "127.0.0.1:3000")'),
    ({"upstreams": {"web": {}}}, 'proxy.toml: upstreams.web: missing required key "servers"'),
    ({"upstreams": {"web": {"servers": ["127.0.0.1:3000"], "tls_ca": "/nonexistent/ca.pem"}}},
     'proxy.toml: upstreams.web.tls_ca: "/nonexistent/ca.pem" does not exist or is not a file'),
])
def test_single_problems(section, expected):
    assert problems_of(minimal(**section)) == [expected]


def test_paths_with_non_ascii_letters_are_kept_as_clients_send_them():
    config = parse_config(minimal(routes=[{"path": "/café/", "upstream": "web"}],
                                  upstreams={"web": {"servers": ["127.0.0.1:3000"], "health": {"path": "/état?x=é"}}}),
                          "proxy.toml")
    assert config.routes[0].path == "/caf%C3%A9"
    assert config.upstreams["web"].health.path == "/%C3%A9tat?x=%C3%A9"


def test_a_config_that_only_redirects_needs_no_upstream():
    # An old domain sent to a new one (Caddy's redir, nginx's return 308) forwards nowhere.
    config = parse_config({"routes": [{"redirect": {"to": "https://new.example.com{uri}"}}]}, "proxy.toml")
    assert config.upstreams == {} and config.routes[0].redirect.to == "https://new.example.com{uri}"
    assert problems_of({"routes": [{"redirect": {"to": "/x"}}, {"path": "/a", "upstream": "web"}]}) == [
        'proxy.toml: routes[1].upstream: upstream "web" is not defined (no upstreams are defined)',
        "proxy.toml: upstreams: missing: add at least one [upstreams.NAME] table",
    ]


def test_a_route_host_written_in_unicode_matches_its_idna_form():
    # Browsers send Host: xn--bcher-kva.example; Caddy takes the Unicode spelling in its config.
    config = parse_config(minimal(routes=[{"host": "Bücher.example:8080", "upstream": "web"},
                                          {"host": "*.例え.jp", "upstream": "web"}]), "proxy.toml")
    assert [route.host for route in config.routes] == ["xn--bcher-kva.example", "*.xn--r8jz45g.jp"]
    assert problems_of(minimal(routes=[{"host": "é" * 70 + ".example", "upstream": "web"}]))[0].endswith(
        "is not a valid host (IDNA cannot encode it)")


def test_log_file_in_a_missing_directory_is_a_problem():
    assert problems_of(minimal(log={"access": "/nonexistent-dir/access.log"})) == [
        'proxy.toml: log.access: cannot write "/nonexistent-dir/access.log": directory /nonexistent-dir does not exist'
    ]


def test_toml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, '[server]\nlisten = "127.0.0.1:8080"\nworkers 4\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [f"{path}: line 3, column 9: invalid TOML: Expected '=' after a key in a key/value pair"]


def test_missing_file_and_bad_encoding(tmp_path):
    missing = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError) as caught:
        load_config(missing)
    assert caught.value.problems == [f"{missing}: cannot read the config file (No such file or directory)"]
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"x = 1\n\xff\n")
    with pytest.raises(ConfigError, match="not valid UTF-8 text"):
        load_config(binary)


def test_a_directory_or_a_pipe_is_refused_at_once(tmp_path):
    # Opening a FIFO waits for a writer: check, or a reload on the loop thread, would hang for good.
    fifo = tmp_path / "proxy.toml"
    os.mkfifo(fifo)
    result = run_cli("check", str(fifo))
    assert_one_line_problem(result, f"{fifo}: cannot read the config file (a named pipe, not a regular file)")
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)
    assert caught.value.problems == [f"{tmp_path}: cannot read the config file (a directory, not a regular file)"]


def test_a_config_file_larger_than_any_real_one_is_refused_unread(tmp_path):
    # /dev/zero or a log named by mistake must not be read into memory whole.
    huge = tmp_path / "huge.toml"
    with open(huge, "wb") as file:
        file.truncate(16 * 1024 ** 2 + 1)   # sparse: no disk space taken
    with pytest.raises(ConfigError) as caught:
        load_config(huge)
    assert caught.value.problems == [f"{huge}: the file is larger than 16MiB: not a config file"]


def test_file_paths_resolve_against_the_config_directory(tmp_path, monkeypatch):
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "ca.pem").write_text("x")
    path = write(tmp_path, '[[routes]]\nupstream = "web"\n[upstreams.web]\nservers = ["https://a:1"]\ntls_ca = "certs/ca.pem"\n')
    monkeypatch.chdir("/")
    assert load_config(path).upstreams["web"].tls_ca == str(tmp_path / "certs" / "ca.pem")


# --- shipped configs, starter, round-trips ----------------------------------------------------

@pytest.mark.parametrize("name", ["demo.toml", "dev-routing.toml", "production.toml"])
def test_example_configs_load(name):
    config = load_config(REPO / "configs" / name)
    assert config.routes and config.upstreams


def test_demo_config_is_what_the_docs_promise():
    config = load_config(REPO / "configs" / "demo.toml")
    assert config.server.listen == (ListenConfig("127.0.0.1", 8080),)
    assert config.admin == AdminConfig(ListenConfig("127.0.0.1", 9901))
    demo = config.upstreams["demo"]
    assert [s.address for s in demo.servers] == ["127.0.0.1:9001", "127.0.0.1:9002"]
    assert (demo.policy, demo.health.path, demo.health.interval) == ("round_robin", "/healthz", 2.0)


def test_production_config_shape():
    config = load_config(REPO / "configs" / "production.toml")
    assert config.server.listen == (ListenConfig("", 8080),)
    assert config.server.workers == len(os.sched_getaffinity(0))
    assert config.log.format == "json" and config.log.access == "stdout"
    assert config.admin.listen.host == "127.0.0.1"
    assert len(config.upstreams) == 2
    assert all(u.health and u.passive for u in config.upstreams.values())


def test_starter_config_is_valid_and_write_starter_refuses_to_overwrite(tmp_path):
    path = tmp_path / "proxy.toml"
    write_starter(path, force=False)
    assert path.read_text(encoding="utf-8") == STARTER_CONFIG
    config = load_config(path)
    assert config.upstreams["app"].servers == (UpstreamServerConfig("127.0.0.1", 3000),)
    path.write_text("# mine\n")
    with pytest.raises(FileExistsError):
        write_starter(path, force=False)
    assert path.read_text() == "# mine\n"
    write_starter(path, force=True)
    assert path.read_text(encoding="utf-8") == STARTER_CONFIG


def test_the_starter_shows_defaults_and_the_keys_a_newcomer_reaches_for():
    # `pyproxy init -h` promises the defaults: a starter value that differs would mislead silently.
    data = tomllib.loads(STARTER_CONFIG)
    bare = parse_config({"admin": {}, "routes": data["routes"],
                         "upstreams": {"app": {"servers": data["upstreams"]["app"]["servers"]}}}, "proxy.toml")
    starter = parse_config(data, "proxy.toml")
    assert (starter.server, starter.log, starter.admin, starter.upstreams["app"]) == (
        bare.server, bare.log, bare.admin, bare.upstreams["app"])
    for key in ("tunnel_timeout", "tls_cert", "tls_key", "tls_ca", "tls_verify"):   # WebSockets, HTTPS
        assert f"{key} = " in STARTER_CONFIG, key


def test_tomli_w_round_trip_gives_an_equal_config(tmp_path):
    data = tomllib.loads(FULL_TOML)
    for name in ("cert.pem", "key.pem", "ca.pem"):
        (tmp_path / name).write_text("x")
    (tmp_path / "logs").mkdir()
    direct = parse_config(data, "in memory", base_dir=str(tmp_path))
    path = write(tmp_path, render_config_dict(data), "rendered.toml")
    assert dataclasses.replace(load_config(path), source="in memory") == direct


# --- routing table ----------------------------------------------------------------------------

def test_routes_by_precedence_exact_then_wildcard_then_any_host_then_longest_path():
    routes = (
        RouteConfig(path="/", upstream="a"),                          # 0
        RouteConfig(host="*.example.com", upstream="a"),              # 1
        RouteConfig(path="/api", upstream="a"),                       # 2
        RouteConfig(host="app.example.com", upstream="a"),            # 3
        RouteConfig(host="*.eu.example.com", upstream="a"),           # 4
        RouteConfig(host="app.example.com", path="/x/y", upstream="a"),  # 5
        RouteConfig(path="/api", host="b.example.com", upstream="a"),    # 6
    )
    ordered = routes_by_precedence(routes)
    assert [routes.index(r) for r in ordered] == [5, 6, 3, 4, 1, 2, 0]  # the longer wildcard first


def test_routing_table_lines_are_ordered_and_complete():
    data = minimal(
        routes=[{"path": "/", "upstream": "web"},
                {"path": "/api", "strip_prefix": True, "upstream": "api", "set_headers": {"X-Env": "dev"}},
                {"host": "*.localhost", "upstream": "web"},
                {"host": "app.localhost", "upstream": "web"}],
        upstreams={"web": {"servers": ["127.0.0.1:3000"]},
                   "api": {"servers": ["127.0.0.1:4000", {"address": "https://api.local", "weight": 5}],
                           "policy": "ip_hash", "health": {}, "passive": {}},
                   "spare": {"servers": ["127.0.0.1:5000"]}},
        admin={"listen": "127.0.0.1:9901"},
    )
    assert routing_table_lines(parse_config(data, "proxy.toml")) == [
        "listen: 127.0.0.1:8080 (1 worker)",
        "admin: 127.0.0.1:9901",
        "routes (most specific first):",
        "  1. app.localhost / -> web (round_robin)",
        "       127.0.0.1:3000  weight 1",
        "       health: not checked",
        "  2. *.localhost / -> web (round_robin)",
        "       127.0.0.1:3000  weight 1",
        "       health: not checked",
        "  3. (any host) /api (strip prefix) -> api (ip_hash)",
        "       set header X-Env: dev",
        "       127.0.0.1:4000  weight 1",
        "       https://api.local:443  weight 5",
        "       health: GET /healthz every 5s, timeout 2s, expect 2xx; up after 2 passes, down after 3 failures",
        "       passive: out for 10s after 3 failures within 10s",
        "  4. (any host) / -> web (round_robin)",
        "       127.0.0.1:3000  weight 1",
        "       health: not checked",
        "unused upstream: spare (round_robin)",
        "       127.0.0.1:5000  weight 1",
        "       health: not checked",
    ]


# --- quick mode -------------------------------------------------------------------------------

def test_quick_config_builds_routes_and_upstreams():
    config = quick_config(":8080", ["127.0.0.1:3000"],
                          [("app.localhost", "127.0.0.1:3001"), ("/api", "127.0.0.1:4000,127.0.0.1:4001"),
                           ("docs.localhost/v2", "127.0.0.1:3001")])
    assert config.source == "command line"
    assert config.server.listen == (ListenConfig("", 8080),)
    by_key = {(r.host, r.path): [s.address for s in config.upstreams[r.upstream].servers] for r in config.routes}
    assert by_key == {
        ("app.localhost", "/"): ["127.0.0.1:3001"],
        (None, "/api"): ["127.0.0.1:4000", "127.0.0.1:4001"],
        ("docs.localhost", "/v2"): ["127.0.0.1:3001"],
        (None, "/"): ["127.0.0.1:3000"],
    }
    assert len(config.upstreams) == 3   # routes to the same servers share one upstream


def test_quick_config_problems_name_the_option():
    with pytest.raises(ConfigError) as caught:
        quick_config("x:0", ["nohost"], [("/a?b", "127.0.0.1:99999")])
    assert caught.value.problems == [
        'command line: --route /a?b=127.0.0.1:99999: "127.0.0.1:99999" is not a valid address (port must be 1-65535)',
        "command line: --route /a?b=127.0.0.1:99999: \"/a?b\" is not a valid path prefix (no spaces, control characters, '?' or '#')",
        'command line: --to nohost: "nohost" is not a valid address (missing port, e.g. "127.0.0.1:8080")',
        'command line: --from x:0: "x:0" is not a valid address (port must be 1-65535)',
    ]
    with pytest.raises(ConfigError, match="nothing to proxy to"):
        quick_config(":8080", [], [])


@pytest.mark.parametrize("targets, routes, problem", [
    ([], [("/api", "127.0.0.1:1"), ("/api/", "127.0.0.1:2")],
     "command line: --route /api/=127.0.0.1:2: same host and path as --route /api=127.0.0.1:1, so it can never match"),
    (["127.0.0.1:1"], [("/", "127.0.0.1:2")],
     "command line: --to 127.0.0.1:1: same host and path as --route /=127.0.0.1:2, so it can never match"),
    ([], [("App.localhost", "127.0.0.1:1"), ("app.localhost/", "127.0.0.1:2")],
     "command line: --route app.localhost/=127.0.0.1:2: same host and path as --route App.localhost=127.0.0.1:1, "
     "so it can never match"),
    ([], [("/api", "127.0.0.1:1,127.0.0.1:1")],
     "command line: --route /api=127.0.0.1:1,127.0.0.1:1: 127.0.0.1:1 is listed twice"),
    (["127.0.0.1:1", "127.0.0.1:1"], [], "command line: --to 127.0.0.1:1: 127.0.0.1:1 is listed twice"),
])
def test_quick_config_conflicts_name_the_options_not_config_keys(targets, routes, problem):
    # The user wrote options: "routes[1]" or "upstreams.\"127.0.0.1_1\"" would name keys of no file.
    with pytest.raises(ConfigError) as caught:
        quick_config(":8080", targets, routes)
    assert caught.value.problems == [problem]


def test_quick_config_upstream_names_that_sanitise_alike_stay_apart():
    # "a:1,b:2" and "a_1_b:2" both sanitise to a_1_b_2: one route must not take the other's servers.
    config = quick_config(":8080", [], [("/one", "a:1,b:2"), ("/two", "a_1_b:2")])
    servers = {route.path: [s.address for s in config.upstreams[route.upstream].servers] for route in config.routes}
    assert servers == {"/one": ["a:1", "b:2"], "/two": ["a_1_b:2"]}


# --- robustness -------------------------------------------------------------------------------

_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10, 100000), st.floats(allow_nan=True),
                     st.sampled_from(["", "5s", "16KiB", "127.0.0.1:1", ":0", "auto", "/x", "*.a", "2xx", "web"]),
                     st.text(max_size=8))
_KEYS = st.sampled_from(["server", "admin", "log", "routes", "upstreams", "listen", "workers", "servers",
                         "upstream", "path", "host", "health", "passive", "web", "address", "weight",
                         "set_headers", "expect_status", "policy", "tls_cert", "access"])
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=4),
                       max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_KEYS, _VALUES, max_size=6))
def test_parse_config_raises_only_config_error(data):
    try:
        parse_config(data, "fuzz.toml")
    except ConfigError as error:
        assert error.problems and all(line.startswith("fuzz.toml: ") for line in error.problems)


# --- log.access: "a file path"; a config error "never shows a traceback" --------------------------

def test_access_log_path_that_is_a_directory_is_a_config_problem(tmp_path):
    (tmp_path / "logs").mkdir()
    path = write_config(tmp_path, one_backend_config('listen = "127.0.0.1:1"', log='access = "logs"'))
    assert_one_line_problem(run_cli("check", "-c", str(path)), "log.access", "is a directory")
    assert_one_line_problem(run_cli("-c", str(path)), "log.access", "is a directory")


# --- duplicate listen addresses are a config problem, not "address already in use" at start -------

@pytest.mark.parametrize("first, second", [
    ("0.0.0.0:{port}", "127.0.0.1:{port}"),
    ("[::]:{port}", "127.0.0.1:{port}"),
    ("[::]:{port}", "[::1]:{port}"),
    ("127.0.0.1:{port}", "0.0.0.0:{port}"),
    (":{port}", "[::1]:{port}"),
])
def test_overlapping_listen_addresses_fail_check(tmp_path, first, second):
    port = 18931
    listen = f'listen = ["{first.format(port=port)}", "{second.format(port=port)}"]'
    result = run_cli("check", "-c", str(write_config(tmp_path, one_backend_config(listen))))
    assert_one_line_problem(result, f"server.listen[1]: {second.format(port=port)} is listed twice")


def test_admin_on_a_port_the_wildcard_listener_holds_fails_check(tmp_path):
    text = one_backend_config('listen = "0.0.0.0:18932"', extra='[admin]\nlisten = "127.0.0.1:18932"\n')
    result = run_cli("check", "-c", str(write_config(tmp_path, text)))
    assert_one_line_problem(result, "admin.listen: 127.0.0.1:18932 clashes with server.listen 0.0.0.0:18932")


@pytest.mark.parametrize("listen", [
    '["127.0.0.1:18933", "[::1]:18933"]',
    '["0.0.0.0:18933", "[::1]:18933"]',
    '["127.0.0.1:18933", "127.0.0.2:18933"]',
])
def test_listen_addresses_that_can_share_a_port_pass_check(tmp_path, listen):
    result = run_cli("check", "-c", str(write_config(tmp_path, one_backend_config(f"listen = {listen}"))))
    assert result.returncode == 0, result.stderr


# --- durations: a number of seconds or "250ms"/"5s"/"2m"; one that breaks the proxy is refused -----

def test_absurdly_long_durations_are_config_problems(tmp_path):
    text = one_backend_config('listen = "127.0.0.1:1"\ngraceful_timeout = 1e12\nidle_timeout = "99999999h"')
    text += 'connect_timeout = 1e12\n'
    result = run_cli("check", "-c", str(write_config(tmp_path, text)))
    assert_one_line_problem(result, "server.graceful_timeout: 1000000000000.0 is too long",
                            'server.idle_timeout: "99999999h" is too long', "upstreams.web.connect_timeout")


# --- "pyproxy check: exit 0 if valid": what the proxy refuses to start with, check refuses too ------

UPSTREAM_WITH_CA = """\
[[routes]]
upstream = "web"

[upstreams.web]
servers = ["https://127.0.0.1:3000"]
tls_ca = "ca.pem"
"""


def test_a_tls_ca_file_without_certificates_is_a_config_problem(tmp_path):
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    text = f'[server]\nlisten = "127.0.0.1:{free_port()}"\n[log]\naccess = "off"\n{UPSTREAM_WITH_CA}'
    path = write_config(tmp_path, text)
    expected = f"{path}: upstreams.web.tls_ca: {tmp_path / 'ca.pem'} holds no usable PEM certificate"
    assert_one_line_problem(run_cli("check", "-c", str(path)), expected)
    assert_one_line_problem(run_cli("-c", str(path)), expected)


def test_check_refuses_a_certificate_and_key_that_do_not_match_as_the_run_does(tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    ca.issue_cert("a.test").cert_chain_pems[0].write_to_path(str(tmp_path / "a.crt"))
    ca.issue_cert("b.test").private_key_pem.write_to_path(str(tmp_path / "b.key"))
    listen = f'listen = [{{ address = "127.0.0.1:{free_port()}", tls_cert = "a.crt", tls_key = "b.key" }}]'
    path = write_config(tmp_path, one_backend_config(listen))
    for command in (["check", "-c", str(path)], ["-c", str(path)]):
        assert_one_line_problem(run_cli(*command), f"{path}: server.listen ", "tls_cert/tls_key cannot be loaded")


# --- a config file saved "UTF-8 with BOM" (Notepad and others) reads like any other ----------------

def test_a_byte_order_mark_at_the_start_of_the_file_is_accepted(tmp_path):
    path = tmp_path / "proxy.toml"
    path.write_bytes(b"\xef\xbb\xbf" + one_backend_config('listen = "127.0.0.1:1"').encode())
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert f"{path}: OK" in result.stdout
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"\xef\xbb\xbf[server]\nlisten = \xff\n")
    assert_one_line_problem(run_cli("check", "-c", str(bad)), f"{bad}: not valid UTF-8 text")


# -- HTTP/2 keys --------------------------------------------------------------------------------------

def test_http2_keys_parse_with_safe_defaults():
    config = parse_config(minimal(server={"listen": [{"address": ":8443", "tls_cert": __file__, "tls_key": __file__},
                                                     {"address": ":8080", "h2c": True}],
                                          "h2_max_streams": 250}), "proxy.toml")
    tls, plain = config.server.listen
    assert (tls.http2, tls.h2c, plain.http2, plain.h2c) == (True, False, True, True)
    assert config.server.h2_max_streams == 250
    assert parse_config(minimal(), "proxy.toml").server.h2_max_streams == 100


@pytest.mark.parametrize("server, problem", [
    ({"h2_max_streams": 0}, "server.h2_max_streams: must be 1-10000, got 0"),
    ({"h2_max_streams": "many"}, "server.h2_max_streams: expected a whole number, got \"many\""),
    ({"listen": [{"address": ":8443", "tls_cert": __file__, "tls_key": __file__, "h2c": True}]},
     "server.listen[0].h2c: only for plain listeners; a TLS listener offers h2 by ALPN (http2)"),
    ({"listen": [{"address": ":8080", "http2": False}]},
     "server.listen[0].http2: only for TLS listeners (ALPN); a plain listener takes HTTP/2 with h2c = true"),
    ({"listen": [{"address": ":8080", "h2c": "yes"}]}, "server.listen[0].h2c: expected true or false"),
])
def test_http2_key_problems_name_the_key(server, problem):
    problems = problems_of(minimal(server=server))
    assert len(problems) == 1 and problems[0].startswith(f"proxy.toml: {problem}"), problems


def test_admin_listener_takes_no_http2_keys():
    problems = problems_of(minimal(admin={"listen": {"address": "127.0.0.1:9901", "h2c": True}}))
    assert problems == ["proxy.toml: admin.listen.h2c: only for server.listen (the admin listener speaks HTTP/1.1)"]


def test_check_shows_which_listeners_speak_http2():
    config = parse_config(minimal(server={"listen": [
        {"address": "127.0.0.1:8443", "tls_cert": __file__, "tls_key": __file__},
        {"address": "127.0.0.1:8444", "tls_cert": __file__, "tls_key": __file__, "http2": False},
        {"address": "127.0.0.1:8080", "h2c": True}, "127.0.0.1:8081"]}), "proxy.toml")
    first = routing_table_lines(config)[0]
    assert first == ("listen: 127.0.0.1:8443 (TLS, HTTP/2), 127.0.0.1:8444 (TLS), 127.0.0.1:8080 (h2c), "
                     "127.0.0.1:8081 (1 worker)"), first
