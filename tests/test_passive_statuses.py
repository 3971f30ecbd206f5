"""passive.statuses: answers such as 500 count as failures towards max_fails within fail_timeout
(docs/configuration.md, [upstreams.NAME.passive]); by default only connection failures count."""

from __future__ import annotations

import pytest
import requests

from proxy.config.schema import ConfigError, parse_config
from proxy.upstream.servers import Server
from tests.support.processes import WORKERS, admin_status, ready_workers, running_proxy, workers_config
from tests.support.proxy import DEADLINE, config_document
from tests.support.timing import wait_for


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


# -- worker processes ----------------------------------------------------------------------------------

def test_an_ejection_in_one_worker_takes_the_server_out_in_every_worker(tmp_path, make_backend):
    """Passive checks count each worker's own traffic; the first worker to eject a server has the
    supervisor tell the others, so no worker keeps sending it requests."""
    broken, steady = _two_backends(make_backend)
    port, admin_port, config = workers_config(steady.address)
    config = config.replace(f'servers = ["{steady.address}"]', f'servers = ["{broken.address}", "{steady.address}"]')
    config += '\n[upstreams.app.passive]\nmax_fails = 3\nfail_timeout = "60s"\nstatuses = ["5xx"]\n'
    with running_proxy(tmp_path, config) as run:
        wait_for(lambda: ready_workers(run) == WORKERS, what="both workers ready")

        def down_in(worker) -> bool:
            return f"app/{broken.address}" in worker["down"]

        for _ in range(50):  # bounded: each request on a new connection, which the kernel spreads
            requests.get(run.url + "/", timeout=DEADLINE)
            if any(down_in(w) for w in admin_status(admin_port)["workers"]):
                break
        wait_for(lambda: all(down_in(w) for w in admin_status(admin_port)["workers"]),
                 what="the ejection in every worker", on_timeout=run.log)
        assert "taking it out in every worker" in run.log()
        before = len(broken.requests)
        assert {requests.get(run.url + "/", timeout=DEADLINE).status_code for _ in range(30)} == {200}
        assert len(broken.requests) == before


def test_eject_for_applies_another_workers_ejection_except_to_a_sole_server():
    now = [0.0]
    heard = []
    server = Server("127.0.0.1", 9, max_fails=3, clock=lambda: now[0])
    server.set_ejection_listener(lambda *args: heard.append(args))
    assert server.eject_for(10.0, "answered 500") is True
    assert (server.state, server.state_reason) == ("down", "ejected: answered 500")
    assert server.eject_for(99.0, "again") is False  # the ejection in force stands
    assert heard == []  # applying a peer's ejection is not announced again
    now[0] = 10.0
    assert server.state == "up"
    sole = Server("127.0.0.1", 10, max_fails=3)
    sole.set_sole_server(True)
    assert sole.eject_for(10.0, "answered 500") is False and sole.state == "up"


def test_this_process_announces_its_own_ejections_once():
    heard = []
    server = Server("127.0.0.1", 9, max_fails=2, failure_statuses=frozenset({500}))
    server.set_ejection_listener(lambda *args: heard.append(args))
    for _ in range(4):
        server.record_response(500)
    assert heard == [(server, 10.0, "answered 500")]
