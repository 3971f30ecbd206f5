"""Retry budgets: retries stay under `percent` of the requests of the last 10 s, or under
`min_per_second`; a refused retry answers the original error (docs/configuration.md, Retries)."""

from __future__ import annotations

import pytest
import requests

from proxy.config.schema import ConfigError, RetryBudgetConfig, parse_config
from proxy.upstream.retry_budget import WINDOW, RetryBudget
from tests.support.proxy import DEADLINE, config_document, scrape
from tests.support.timing import FakeClock


def _spend(budget: RetryBudget, attempts: int) -> int:
    return sum(budget.try_retry() for _ in range(attempts))


def test_min_per_second_allows_retries_on_a_quiet_upstream():
    budget = RetryBudget(percent=20, min_per_second=3, clock=FakeClock())
    assert _spend(budget, 50) == 3 * WINDOW
    assert (budget.retries_total, budget.exhausted_total) == (30, 20)


def test_percent_of_the_requests_of_the_window():
    budget = RetryBudget(percent=20, min_per_second=0, clock=FakeClock())
    for _ in range(1000):
        budget.count_request()
    assert _spend(budget, 500) == 200


def test_the_window_slides():
    clock = FakeClock()
    budget = RetryBudget(percent=0, min_per_second=1, clock=clock)
    assert _spend(budget, 20) == 10
    clock.advance(WINDOW - 1)
    assert _spend(budget, 5) == 0  # the first second's retries are still in the window
    clock.advance(1)
    assert _spend(budget, 20) == 10


def test_a_reload_changes_the_limits_and_keeps_the_counts():
    budget = RetryBudget(percent=0, min_per_second=1, clock=FakeClock())
    assert _spend(budget, 20) == 10
    budget.configure(percent=0, min_per_second=2)
    assert _spend(budget, 20) == 10 and budget.retries_total == 20


def test_the_default_is_20_percent_or_3_per_second():
    document = config_document({"web": {"servers": ["127.0.0.1:9"]}})
    assert parse_config(document, "test.toml").upstreams["web"].retry_budget == RetryBudgetConfig(20, 3)


@pytest.mark.parametrize("budget, problem", [
    ({"percent": 101}, "upstreams.web.retry_budget.percent: must be 0-100, got 101"),
    ({"min_per_second": -1}, "upstreams.web.retry_budget.min_per_second: must be at least 0, got -1"),
    ({"percnt": 20}, "upstreams.web.retry_budget.percnt: unknown key (did you mean 'percent'?)"),
    (20, "upstreams.web.retry_budget: expected a table, got 20"),
])
def test_bad_retry_budget_is_pinpointed(budget, problem):
    document = config_document({"web": {"servers": ["127.0.0.1:9"], "retry_budget": budget}})
    with pytest.raises(ConfigError) as raised:
        parse_config(document, "test.toml")
    assert raised.value.problems == [f"test.toml: {problem}"]


# -- a retry storm against real backends ---------------------------------------------------------------

def _drop_every_connection(peer):
    head, _ = peer.read_request()
    peer.reset()  # before any response byte: an idempotent GET may be retried elsewhere


def _retry_counts(proxy) -> tuple[float, float]:
    families = scrape(proxy)
    (retries,) = [s.value for s in families["pyproxy_retries"].samples if s.labels == {"upstream": "web"}]
    (refused,) = [s.value for s in families["pyproxy_retry_budget_exhausted"].samples if s.labels == {"upstream": "web"}]
    return retries, refused


def test_retries_to_a_server_dropping_every_connection_stay_within_the_budget(make_raw_backend, make_backend,
                                                                               observed_proxy):
    dropper = make_raw_backend(_drop_every_connection)
    healthy = make_backend()
    document = config_document({"web": {"servers": [dropper.address, healthy.address],
                                        "retry_budget": {"percent": 20, "min_per_second": 0}}})
    proxy = observed_proxy(document)
    with requests.Session() as session:
        statuses = [session.get(proxy.url + "/", timeout=DEADLINE).status_code for _ in range(100)]
    retries, refused = _retry_counts(proxy)
    assert statuses.count(502) == refused and statuses.count(200) == 100 - refused
    assert retries <= 0.2 * 100 + 1 and retries >= 15  # the budget, used up: not merely a lower bound
    assert len(healthy.requests) == 50 + retries  # its own turns, plus the retries only
    document["upstreams"]["web"]["retry_budget"] = {"percent": 100, "min_per_second": 0}
    proxy.reload(document)
    with requests.Session() as session:
        assert {session.get(proxy.url + "/", timeout=DEADLINE).status_code for _ in range(20)} == {200}
    assert _retry_counts(proxy)[0] == retries + 10  # counters carried over the reload
