"""passive.statuses: answers such as 500 count as failures towards max_fails within fail_timeout
(docs/configuration.md, [upstreams.NAME.passive]); by default only connection failures count."""

from __future__ import annotations

import pytest
import requests

from proxy.config.schema import ConfigError, parse_config
from proxy.upstream.servers import Server
from tests.support.proxy import DEADLINE, config_document


def _answer(status: int, body: bytes):
    def handler(h, record):
        h.reply(status, body)
    return handler


def _two_backends(make_backend):
    broken = make_backend().route("/", _answer(500, b"broken"))
    steady = make_backend().route("/", _answer(200, b"steady"))
    return broken, steady


def _answers(proxy, count: int) -> list[tuple[int, str]]:
    with requests.Session() as session:
        return [(r.status_code, r.text) for r in (session.get(proxy.url + "/", timeout=DEADLINE)
                                                  for _ in range(count))]


def test_a_server_answering_500_is_ejected_after_max_fails_answers(make_backend, make_proxy):
    broken, steady = _two_backends(make_backend)
    proxy = make_proxy({"web": [broken.address, steady.address]},
                       upstream_options={"passive": {"max_fails": 3, "fail_timeout": "30s", "statuses": ["5xx"]}})
    answers = _answers(proxy, 20)
    errors = [index for index, (status, _) in enumerate(answers) if status == 500]
    assert len(errors) == 3 and errors[-1] < 6  # round robin: its 3 turns among the first 6, then none
    assert all(answer == (200, "steady") for answer in answers[6:])
    assert len(broken.requests) == 3


def test_without_statuses_a_500_is_an_answer_not_a_failure(make_backend, make_proxy):
    broken, steady = _two_backends(make_backend)
    proxy = make_proxy({"web": [broken.address, steady.address]},
                       upstream_options={"passive": {"max_fails": 3, "fail_timeout": "30s"}})
    assert [status for status, _ in _answers(proxy, 12)].count(500) == 6


def test_explicit_codes_count_only_those(make_backend, make_proxy):
    broken, steady = _two_backends(make_backend)
    proxy = make_proxy({"web": [broken.address, steady.address]},
                       upstream_options={"passive": {"max_fails": 2, "fail_timeout": "30s", "statuses": [502, 503]}})
    assert [status for status, _ in _answers(proxy, 12)].count(500) == 6


def test_the_only_server_is_never_ejected_for_its_answers():
    now = [0.0]
    server = Server("127.0.0.1", 9, max_fails=1, failure_statuses=frozenset({500}), clock=lambda: now[0])
    server.set_sole_server(True)
    server.record_response(500)
    assert server.state == "up"


def test_status_failures_count_within_fail_timeout_only():
    now = [0.0]
    server = Server("127.0.0.1", 9, max_fails=2, fail_timeout=10.0, failure_statuses=frozenset({503}),
                    clock=lambda: now[0])
    server.record_response(503)
    now[0] = 10.5  # the first answer is older than fail_timeout: forgotten
    server.record_response(503)
    server.record_response(200)
    assert server.state == "up"
    server.record_response(503)
    assert server.state == "down" and server.state_reason == "ejected: answered 503"
    now[0] = 21.0
    assert server.state == "up"


@pytest.mark.parametrize("statuses, problem", [
    ("5xx", 'upstreams.web.passive.statuses: expected a list of "5xx", "4xx" or status codes 400-599'),
    (["5xx", "2xx"], 'upstreams.web.passive.statuses: item 1: "2xx" is not "5xx", "4xx" or a status code'),
    ([200], "upstreams.web.passive.statuses: item 0: 200 is not"),
    ([], "upstreams.web.passive.statuses: expected a list"),
])
def test_bad_statuses_are_pinpointed(statuses, problem):
    document = config_document({"web": {"servers": ["127.0.0.1:9"], "passive": {"statuses": statuses}}})
    with pytest.raises(ConfigError) as raised:
        parse_config(document, "test.toml")
    assert len(raised.value.problems) == 1 and raised.value.problems[0].startswith(f"test.toml: {problem}")


def test_statuses_parse_classes_and_codes():
    document = config_document({"web": {"servers": ["127.0.0.1:9"], "passive": {"statuses": ["5xx", 429]}}})
    passive = parse_config(document, "test.toml").upstreams["web"].passive
    assert passive.statuses == frozenset(range(500, 600)) | {429}
