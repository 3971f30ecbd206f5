"""A real browser over HTTP/2: headless Chromium loads a page with 100 subresources through the proxy,
all on one connection (what HTTP/1.1's six connections per host cannot do)."""

from __future__ import annotations

import pytest

from tests.support.browser import Browser, chromium_available
from tests.support.h2 import Pki, start_h2_proxy, stop_quietly

SUBRESOURCES = 100

pytestmark = pytest.mark.skipif(not chromium_available(), reason="chromium not installed (scripts/install-browser)")


def test_chromium_loads_100_subresources_over_one_h2_connection(tmp_path, make_backend):
    backend = make_backend()
    scripts = "".join(f'<script src="/r/{i}.js"></script>' for i in range(SUBRESOURCES))
    page = f"<!doctype html><title>many</title>{scripts}".encode()
    backend.route("/page", lambda h, record: h.reply(200, page, (("Content-Type", "text/html"),)))
    for index in range(SUBRESOURCES):
        backend.route(f"/r/{index}.js", lambda h, record: h.reply(
            200, b"window.loaded = (window.loaded || 0) + 1;", (("Content-Type", "text/javascript"),)))
    pki = Pki.create(tmp_path)
    proxy = start_h2_proxy({"web": [backend.address]}, pki)
    browser = Browser(tmp_path / "chromium-profile")
    try:
        browser.send("Security.setIgnoreCertificateErrors", ignore=True)  # the test CA is not Chromium's
        browser.keep_events = True
        browser.send("Network.enable")
        browser.open(proxy.url + "/page")
        browser.wait_until(f"window.loaded === {SUBRESOURCES}", what="every script run")
        protocols = browser.evaluate("performance.getEntriesByType('resource')"
                                     ".filter(e => e.name.includes('/r/')).map(e => e.nextHopProtocol)")
        navigation = browser.evaluate("performance.getEntriesByType('navigation')[0].nextHopProtocol")
        responses = [event["params"]["response"] for event in browser.events
                     if event["method"] == "Network.responseReceived"
                     and ("/r/" in event["params"]["response"]["url"] or event["params"]["type"] == "Document")]
    finally:
        browser.close()
        stop_quietly(proxy)
    assert navigation == "h2"
    assert protocols == ["h2"] * SUBRESOURCES
    # DevTools: every response came as h2, and all of them over one connection (Chromium may open a
    # spare one or two while it starts: those carry nothing).
    assert {response["protocol"] for response in responses} == {"h2"}
    assert len({response["connectionId"] for response in responses}) == 1
    assert len(responses) == SUBRESOURCES + 1
    assert len([r for r in backend.requests if r.path.startswith("/r/")]) == SUBRESOURCES
