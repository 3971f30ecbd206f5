"""Health probe options: method, host, headers, port and expect_body, from `pyproxy check` to a probe
of a real backend and a running proxy that reloads them (docs/configuration.md, [upstreams.NAME.health])."""

from __future__ import annotations

import pytest

from proxy.config.schema import ConfigError, HealthConfig, parse_config
from proxy.upstream.health import MAX_BODY_MATCH_BYTES, probe
from tests.support.command import run_cli, write_config
from tests.support.proxy import FAST_HEALTH, config_document, served_by
from tests.support.timing import wait_for


def _answer(status: int, body: bytes = b"", headers: tuple = ()):
    def handler(h, record):
        h.reply(status, body, headers)
    return handler


def _probe(backend, **options):
    health = HealthConfig(timeout=2.0, **options)
    return probe("127.0.0.1", backend.port, health, host_header=backend.address)


# -- the probe request ------------------------------------------------------------------------------

def test_probe_sends_the_configured_method_host_and_headers(make_backend):
    backend = make_backend().route("/healthz", _answer(204))
    result = _probe(backend, method="HEAD", host="health.internal",
                    headers=(("X-Probe", "1"), ("User-Agent", "lb-check")))
    assert result.ok, result.error
    request = backend.last
    assert (request.method, request.path) == ("HEAD", "/healthz")
    assert request.header("Host") == "health.internal"
    assert request.header("X-Probe") == "1"
    assert request.header_all("User-Agent") == ["lb-check"]  # replaces the default, not added to it


def test_probe_defaults_to_get_with_the_server_address_as_host(make_backend):
    backend = make_backend().route("/healthz", _answer(200))
    assert _probe(backend).ok
    assert (backend.last.method, backend.last.header("Host")) == ("GET", backend.address)


def test_probe_port_checks_another_port_of_the_same_host(make_backend):
    traffic = make_backend().route("/healthz", _answer(200))
    admin = make_backend().route("/healthz", _answer(503))
    result = probe("127.0.0.1", traffic.port, HealthConfig(timeout=2.0, port=admin.port),
                   host_header=traffic.address)
    assert (result.ok, result.status) == (False, 503)
    assert traffic.requests == [] and len(admin.requests) == 1


def test_probe_does_not_follow_a_redirect(make_backend):
    backend = make_backend().route("/healthz", _answer(302, b"", (("Location", "/elsewhere"),)))
    result = _probe(backend)
    assert (result.ok, result.status) == (False, 302)
    assert [r.path for r in backend.requests] == ["/healthz"]
    assert _probe(backend, expect_status=frozenset({302})).ok  # only if the config says a 302 is healthy


@pytest.mark.parametrize("expect_body, regex, ok", [
    ("ready", False, True), ("database: down", False, False),
    (r"status: *ok\b", True, True), (r"^status: *down", True, False),
])
def test_probe_matches_expect_body_as_substring_or_regex(make_backend, expect_body, regex, ok):
    backend = make_backend().route("/healthz", _answer(200, b"ready\nstatus:   ok\ndatabase: up\n"))
    result = _probe(backend, expect_body=expect_body, expect_body_regex=regex)
    assert result.ok is ok and result.status == 200
    if not ok:
        assert "body does not match" in result.error


def test_expect_body_is_looked_for_in_the_first_64_KiB_only(make_backend):
    filler = b"x" * (MAX_BODY_MATCH_BYTES - 5)
    backend = make_backend()
    backend.route("/early", _answer(200, filler + b"ok" + b"y" * 100_000))
    backend.route("/late", _answer(200, filler + b"yyyyyy" + b"ok"))
    assert _probe(backend, path="/early", expect_body="ok").ok
    late = _probe(backend, path="/late", expect_body="ok")
    assert not late.ok and "body does not match" in late.error


# -- the config -------------------------------------------------------------------------------------

def _health_problems(health: dict) -> list[str]:
    document = config_document({"web": {"servers": ["127.0.0.1:9"], "health": health}})
    with pytest.raises(ConfigError) as raised:
        parse_config(document, "test.toml")
    return raised.value.problems


@pytest.mark.parametrize("health, problem", [
    ({"method": "POST"}, 'upstreams.web.health.method: "POST" is not one of GET | HEAD'),
    ({"port": 0}, "upstreams.web.health.port: must be 1-65535, got 0"),
    ({"host": "a b"}, 'upstreams.web.health.host: "a b" is not a valid Host header'),
    ({"headers": {"Host": "x"}}, "upstreams.web.health.headers.Host: the probe sets Host itself (use health.host)"),
    ({"headers": {"X-A": 1}}, "upstreams.web.health.headers.X-A: expected a string, got 1"),
    ({"headers": "X-A: 1"}, "upstreams.web.health.headers: expected a table"),
    ({"expect_body": "~(unclosed"}, 'upstreams.web.health.expect_body: "~(unclosed" is not a valid regular expression'),
    ({"expect_body": ""}, "upstreams.web.health.expect_body: expected a substring"),
    ({"method": "HEAD", "expect_body": "ok"}, "upstreams.web.health.expect_body: a HEAD answer has no body to match"),
    # Characters the probe's head cannot carry (a path with them is percent-encoded instead): each check crashed (a traceback logged every interval,
    # the server taken down) while `pyproxy check` called the config valid.
    ({"host": "\u20ac.example"}, 'upstreams.web.health.host: "\u20ac.example" is not a valid Host header (write'),
    ({"headers": {"X-A": "\u20ac"}}, 'upstreams.web.health.headers.X-A: "\u20ac" is not a valid header value'),
])
def test_bad_probe_options_are_pinpointed(health, problem):
    problems = _health_problems(health)
    assert len(problems) == 1 and problems[0].startswith(f"test.toml: {problem}"), problems


def test_pyproxy_check_names_the_file_and_key_of_a_bad_regex(tmp_path):
    path = write_config(tmp_path, '[[routes]]\npath = "/"\nupstream = "web"\n\n[upstreams.web]\n'
                                  'servers = ["127.0.0.1:9001"]\n\n[upstreams.web.health]\nexpect_body = "~[ok"\n')
    result = run_cli("check", str(path))
    assert result.returncode == 1
    assert result.stderr.startswith(f'{path}: upstreams.web.health.expect_body: "~[ok" is not a valid regular '
                                    "expression (unterminated character set")


def test_probe_options_parse_into_the_health_config():
    document = config_document({"web": {"servers": ["127.0.0.1:9"], "health": {
        "method": "HEAD", "host": "h.example:8080", "headers": {"X-Token": "t"}, "port": 9090}}})
    health = parse_config(document, "test.toml").upstreams["web"].health
    assert (health.method, health.host, health.headers, health.port) == ("HEAD", "h.example:8080",
                                                                         (("X-Token", "t"),), 9090)
    regex = config_document({"web": {"servers": ["127.0.0.1:9"], "health": {"expect_body": "~^ok$"}}})
    health = parse_config(regex, "test.toml").upstreams["web"].health
    assert (health.expect_body, health.expect_body_regex) == ("^ok$", True)


# -- in a running proxy ----------------------------------------------------------------------------

def test_expect_body_takes_a_server_out_and_a_reload_brings_it_back(backends, observed_proxy):
    """FlakyBackend's health path answers 200 "health": a body check for something else fails it."""
    a, b = backends("a", "b")
    health = {**FAST_HEALTH, "expect_body": "~^health$"}
    document = config_document({"web": {"servers": [a.address, b.address], "health": health}})
    proxy = observed_proxy(document)
    wait_for(lambda: all(s["last_check"] for s in proxy.status()["upstreams"]["web"]["servers"]),
             what="a first check of every server")
    assert served_by(proxy, 4) == {"a": 2, "b": 2}
    document["upstreams"]["web"]["health"] = {**FAST_HEALTH, "expect_body": "database ok"}
    proxy.reload(document)
    wait_for(lambda: proxy.state("web", a.address) == proxy.state("web", b.address) == "down",
             what="both down on the body check")
    assert "body does not match 'database ok'" in proxy.server_status("web", a.address)["reason"]
    document["upstreams"]["web"]["health"] = {**FAST_HEALTH, "expect_body": "heal"}
    proxy.reload(document)
    wait_for(lambda: proxy.state("web", a.address) == proxy.state("web", b.address) == "up",
             what="both back up")
    assert served_by(proxy, 4) == {"a": 2, "b": 2}
