"""The admin dashboard (GET / on the admin listener) and the recent-traffic numbers behind it.

The browser tests drive Debian's headless Chromium (``scripts/install-browser``) over the DevTools
protocol with a tiny client on the ``websockets`` test dependency: no browser download, no driver.
Screenshots land in ``test-artifacts/`` (gitignored) for a person to look at.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import requests

from proxy.observe.metrics import RECENT_BUCKETS, RecentTraffic, estimate_quantile
from proxy.observe.status import merge_status, summarize_traffic
from tests.support.browser import CHROMIUM, Browser, chromium_available
from tests.support.proxy import DEADLINE, FAST_HEALTH, config_document, served_by
from tests.support.ports import free_port
from tests.support.timing import FakeClock, wait_for

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
DESKTOP = (1280, 900, 1, False)
PHONE = (390, 844, 2, True)   # an iPhone-sized viewport: 390 CSS px wide, 2x pixels, touch/mobile


@pytest.fixture
def browser(tmp_path):
    if not chromium_available():
        pytest.skip(f"no Chromium at {CHROMIUM}: run scripts/install-browser (apt-get install chromium)")
    instance = Browser(tmp_path / "chromium-profile")
    yield instance
    instance.close()


def server_state(address: str) -> str:
    return f"document.querySelector('[data-server=\"{address}\"]')?.dataset.state"


# -- the page in a real browser -----------------------------------------------------------------------

def dashboard_proxy(backends, observed_proxy):
    a, b = backends("a", "b")
    # api gets a spare (never asked: a is first in turn, and no retries) because passive checks never
    # eject the only server of an upstream.
    spare = f"127.0.0.1:{free_port()}"
    document = config_document({"web": {"servers": [a.address, b.address], "health": FAST_HEALTH},
                                "api": {"servers": [a.address, spare], "retries": 0,
                                        "passive": {"max_fails": 1, "fail_timeout": "30s"}}})
    document["routes"] = [{"path": "/", "upstream": "web"}, {"host": "app.localhost", "path": "/api", "upstream": "api"}]
    return observed_proxy(document), a, b


def test_dashboard_shows_a_server_going_down_and_the_proxy_going_away(backends, observed_proxy, browser):
    proxy, a, b = dashboard_proxy(backends, observed_proxy)
    served_by(proxy, 20)
    browser.viewport(*DESKTOP)
    browser.open(proxy.admin_url + "/")
    browser.wait_until(f"{server_state(a.address)} === 'up' && {server_state(b.address)} === 'up'",
                       what="both servers shown up")
    assert browser.evaluate("document.body.dataset.connection") == "live"
    cards = browser.evaluate("[...document.querySelectorAll('[data-upstream]')].map(e => e.dataset.upstream)")
    assert cards == ["api", "web"]  # /status lists upstreams by name
    served_by(proxy, 20)  # traffic between two polls: the chart and req/s pick it up
    browser.wait_until("Number(document.body.dataset.updates) >= 3", what="three polls")
    browser.screenshot(ARTIFACTS / "dashboard-desktop-up.png")

    b.kill()
    browser.wait_until(f"{server_state(b.address)} === 'down'", what="server b shown down")
    assert browser.evaluate(server_state(a.address)) == "up"
    row = browser.evaluate(f"document.querySelector('[data-server=\"{b.address}\"]').innerText")
    assert "down since" in row and "consecutive checks failed" in row
    # The failed check and why: refused, or on a busy machine the fast check's timeout before that.
    assert re.search(r"✗ .*(refused|Connection|timed out after)", row), row
    badge = browser.evaluate("document.querySelector('[data-upstream=\"web\"] .badge').textContent")
    assert badge == "degraded"
    browser.screenshot(ARTIFACTS / "dashboard-desktop-down.png")

    browser.viewport(*PHONE)
    browser.wait_until("document.documentElement.scrollWidth <= 390", what="phone layout without sideways scroll")
    columns = browser.evaluate("getComputedStyle(document.querySelector('.cards')).gridTemplateColumns")
    assert len(columns.split()) == 1, columns  # cards stack on a phone
    browser.screenshot(ARTIFACTS / "dashboard-phone.png")

    proxy.stop()
    browser.wait_until("!document.getElementById('banner').hidden", what="the not-reachable banner")
    banner = browser.evaluate("document.getElementById('banner').textContent")
    assert re.fullmatch(r"⚠ proxy not reachable — last update \d\d:\d\d:\d\d", banner), banner
    assert browser.evaluate("document.body.dataset.connection") == "offline"
    assert browser.evaluate(server_state(b.address)) == "down"  # the last known picture stays, dimmed
    browser.screenshot(ARTIFACTS / "dashboard-phone-offline.png")


def test_dashboard_shows_an_ejected_server_and_error_rate(backends, observed_proxy, browser):
    proxy, a, _ = dashboard_proxy(backends, observed_proxy)
    a.kill()  # api's first server: the first refused request ejects it (passive, max_fails 1)
    response = requests.get(proxy.url + "/api", headers={"Host": "app.localhost"}, timeout=DEADLINE)
    assert response.status_code == 502
    browser.viewport(*DESKTOP)
    browser.open(proxy.admin_url + "/")
    selector = f"[data-upstream=\"api\"] [data-server=\"{a.address}\"]"
    browser.wait_until(f"document.querySelector('{selector}')?.dataset.state === 'ejected'", what="api server ejected")
    stats = browser.evaluate("document.querySelector('[data-upstream=\"api\"] .stats').innerText")
    assert "100%" in stats, stats  # one request, one 502



def console_errors(events: list[dict]) -> list[dict]:
    """DevTools events that a person with the console open would see as errors: an uncaught
    exception, console.error/warn, or the browser's own log entry (a failed load)."""
    return [event["params"] for event in events
            if event["method"] == "Runtime.exceptionThrown"
            or (event["method"] == "Runtime.consoleAPICalled" and event["params"]["type"] in ("error", "warning"))
            or (event["method"] == "Log.entryAdded" and event["params"]["entry"]["level"] in ("error", "warning"))]


def test_dashboard_loads_and_updates_without_console_errors(backends, observed_proxy, browser):
    """Bug: every load of the dashboard logged "Failed to load resource: 404" in the browser's
    console: the page named no icon, so the browser asked the admin listener for /favicon.ico. The
    page now carries an empty inline icon."""
    proxy, _, _ = dashboard_proxy(backends, observed_proxy)
    served_by(proxy, 5)
    browser.keep_events = True
    browser.send("Log.enable")
    browser.open(proxy.admin_url + "/")
    browser.wait_until("Number(document.body.dataset.updates) >= 3", what="three polls")
    served_by(proxy, 5)
    browser.wait_until("Number(document.body.dataset.updates) >= 5", what="two more polls")
    assert console_errors(browser.events) == []
    assert browser.evaluate("document.querySelectorAll('[data-upstream]').length") == 2

# -- the page over plain HTTP ---------------------------------------------------------------------------

def test_admin_root_serves_a_self_contained_page(backends, observed_proxy):
    proxy, _, _ = dashboard_proxy(backends, observed_proxy)
    response = requests.get(proxy.admin_url + "/", timeout=DEADLINE)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    assert response.headers["Cache-Control"] == "no-store"
    page = response.text
    assert page.startswith("<!doctype html>") and 'fetch("status"' in page
    # Works offline: nothing is loaded from elsewhere (the only URL is the SVG namespace name).
    assert re.findall(r"https?://[^\s\"']+", page) == ["http://www.w3.org/2000/svg"]
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=(?![\"']data:)", page)
    assert "@import" not in page and "url(" not in page
    head = requests.head(proxy.admin_url + "/", timeout=DEADLINE)
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["Content-Length"]) == len(response.content)


def test_status_carries_recent_traffic_per_upstream(backends, observed_proxy):
    proxy, a, _ = dashboard_proxy(backends, observed_proxy)
    served_by(proxy, 30)
    a.kill()
    assert requests.get(proxy.url + "/api", headers={"Host": "app.localhost"}, timeout=DEADLINE).status_code == 502
    # Metrics are recorded just after the response is sent (never delaying it): wait for that one.
    counted = lambda: [proxy.status()["upstreams"][name]["traffic"]["requests_total"] for name in ("web", "api")]  # noqa: E731
    wait_for(lambda: counted() == [30, 1], what="every request counted in /status")
    upstreams = proxy.status()["upstreams"]
    web, api = upstreams["web"]["traffic"], upstreams["api"]["traffic"]
    assert (web["requests"], web["errors"], web["requests_total"], web["errors_total"]) == (30, 0, 30, 0)
    assert 1.0 <= web["window_seconds"] <= 10.0
    assert web["requests_per_second"] == pytest.approx(30 / web["window_seconds"], rel=0.01)
    assert 0 < web["p50_ms"] <= web["p99_ms"] < 1000
    assert (api["requests"], api["errors"], api["error_rate"]) == (1, 1, 1.0)
    server = next(s for s in upstreams["api"]["servers"] if s["address"] == a.address)
    assert server["ejected"] is True and server["state"] == "down"


# -- pure pieces: the rolling window, quantiles, merging ------------------------------------------------

def test_recent_traffic_counts_the_last_window_and_forgets_older_seconds():
    clock = FakeClock()
    recent = RecentTraffic(window=10, clock=clock)
    clock.now += 20  # the process has been up long enough to cover a whole window
    for _ in range(5):
        recent.add("web", 200, 0.002)
    recent.add("web", 502, 0.0004)
    clock.now += 5.5
    recent.add("web", 500, 0.2)
    snap = recent.snapshot()
    assert snap["window_seconds"] == 9.5  # 9 whole seconds + the current half
    web = snap["upstreams"]["web"]
    assert (web["requests"], web["errors"]) == (7, 2)
    assert sum(web["latency_counts"]) == 7
    clock.now += 5  # the first six are now older than the window; their ring slot is stale
    web = recent.snapshot()["upstreams"]["web"]
    assert (web["requests"], web["errors"]) == (1, 1)
    clock.now += 10.0
    assert recent.snapshot()["upstreams"]["web"]["requests"] == 0


def test_recent_traffic_reuses_a_ring_slot_for_a_new_second():
    clock = FakeClock(2000.2)
    recent = RecentTraffic(window=4, clock=clock)
    recent.add("web", 200, 0.01)
    clock.now += 4  # same slot (second % 4), a different second: counts restart
    recent.add("web", 200, 0.01)
    assert recent.snapshot()["upstreams"]["web"]["requests"] == 1


def test_window_of_a_young_process_is_its_age_but_at_least_a_second():
    clock = FakeClock(500.0)
    recent = RecentTraffic(window=10, clock=clock)
    clock.now += 0.3
    assert recent.snapshot()["window_seconds"] == 1.0
    clock.now += 3
    assert recent.snapshot()["window_seconds"] == 3.3


def test_quantiles_interpolate_inside_the_bucket():
    buckets = (0.001, 0.01, 0.1)
    assert estimate_quantile(buckets, [0, 0, 0, 0], 0.5) is None
    assert estimate_quantile(buckets, [10, 0, 0, 0], 0.5) == pytest.approx(0.0005)
    assert estimate_quantile(buckets, [50, 50, 0, 0], 0.99) == pytest.approx(0.001 + 0.009 * 49 / 50)
    assert estimate_quantile(buckets, [0, 0, 0, 3], 0.5) == 0.1  # +Inf answers the largest finite bound


def test_traffic_summary_and_merge_over_processes():
    zero = [0] * (len(RECENT_BUCKETS) + 1)

    def process(requests, errors, slot):
        counts = list(zero)
        counts[slot] = requests
        traffic = summarize_traffic({"window_seconds": 10.0, "requests": requests, "errors": errors,
                                     "requests_total": requests * 3, "errors_total": errors,
                                     "latency_buckets": list(RECENT_BUCKETS), "latency_counts": counts})
        return {"processes": 1, "draining": False, "routes": [], "client_connections": {}, "threads": {},
                "open_tunnels": 0, "upstreams": {"web": {"policy": "round_robin", "servers": [], "traffic": traffic}}}

    one = process(40, 0, 3)  # 40 requests in (0.5 ms, 1 ms]
    assert one["upstreams"]["web"]["traffic"]["requests_per_second"] == 4.0
    assert one["upstreams"]["web"]["traffic"]["p50_ms"] == pytest.approx(0.75)
    merged = merge_status([one, process(60, 6, 8)])["upstreams"]["web"]["traffic"]  # 60 in (25, 50] ms
    assert (merged["requests"], merged["errors"], merged["requests_total"]) == (100, 6, 300)
    assert merged["requests_per_second"] == 10.0 and merged["error_rate"] == 0.06
    assert merged["p50_ms"] == pytest.approx(25 + 25 * 10 / 60, abs=0.001)  # the 50th request is the 10th of 60
    assert 25 < merged["p99_ms"] <= 50


def test_merge_keeps_traffic_when_only_one_process_reports_it():
    with_traffic = {"upstreams": {"web": {"servers": [], "traffic": {"requests": 1}}}, "routes": []}
    without = {"upstreams": {"web": {"servers": [], "traffic": None}}, "routes": []}
    assert merge_status([without, with_traffic])["upstreams"]["web"]["traffic"] == {"requests": 1}


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed (optional JS syntax check)")
def test_dashboard_script_parses():
    page = (ROOT / "proxy" / "observe" / "static" / "dashboard.html").read_text()
    script = page.split("<script>", 1)[1].split("</script>", 1)[0]
    subprocess.run(["node", "--check", "-"], input=script, text=True, check=True, timeout=DEADLINE)


def test_dashboard_shows_drained_and_disabled_servers(backends, observed_proxy, browser):
    proxy, a, b = dashboard_proxy(backends, observed_proxy)
    browser.viewport(*DESKTOP)
    browser.open(proxy.admin_url + "/")
    row = "document.querySelector('[data-upstream=\"web\"] [data-server=\"%s\"]')"
    browser.wait_until(f"{row % a.address}?.dataset.admin === 'enabled'", what="a shown enabled")
    assert browser.evaluate(f"{row % a.address}.querySelectorAll('.badge').length") == 1  # no admin badge
    proxy.app.set_admin_state("web", a.address, "draining")
    proxy.app.set_admin_state("web", b.address, "disabled")
    browser.wait_until(f"{row % a.address}.dataset.admin === 'draining' && "
                       f"{row % b.address}.dataset.admin === 'disabled'", what="the admin states shown")
    badges = browser.evaluate(f"[...{row % a.address}.querySelectorAll('.badge')].map(e => e.textContent)")
    assert badges == ["up", "draining"]
    assert browser.evaluate(f"{row % b.address}.querySelector('.badge.disabled').textContent") == "disabled"
    header = browser.evaluate("document.querySelector('[data-upstream=\"web\"] .policy').textContent")
    assert header.endswith("2/2 up · 1 draining · 1 disabled"), header
    # The same server in another upstream is not drained there.
    assert browser.evaluate(f"document.querySelector('[data-upstream=\"api\"] [data-server=\"{a.address}\"]')"
                            ".dataset.admin") == "enabled"
    browser.screenshot(ARTIFACTS / "dashboard-desktop-admin-states.png")
    proxy.app.set_admin_state("web", a.address, "enabled")
    browser.wait_until(f"{row % a.address}.dataset.admin === 'enabled'", what="a enabled again")
