"""The helpful 502: a backend that is not running yet is named, with its route, in the answer.

Browsers (Accept lists text/html) get a small HTML page; curl and scripts get one plain-text line.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import requests

from proxy.http.responses import unreachable_page, unreachable_text, wants_html
from tests.support.ports import free_port
from tests.support.proxy import CLIENT_TIMEOUT

BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"  # what Chromium sends
HINT = "is your dev server running?"


@pytest.fixture
def dev_proxy(make_proxy, make_backend):
    """app.localhost → a port nobody listens on; /api → a running backend; /other → another dead port."""
    dead, other_dead = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    api = make_backend()
    routes = [{"host": "app.localhost", "path": "/", "upstream": "app"},
              {"path": "/api", "upstream": "api"},
              {"path": "/other", "upstream": "other"}]
    proxy = make_proxy({"app": [dead], "api": [api.address], "other": [other_dead]}, routes=routes,
                       upstream_options={"retries": 0})
    return proxy, dead, other_dead


def get(proxy, path="/", host="app.localhost", accept=None, method="GET"):
    headers = {"Host": host}
    if accept is not None:
        headers["Accept"] = accept
    return requests.request(method, proxy.url + path, headers=headers, timeout=CLIENT_TIMEOUT)


def test_browser_gets_an_html_page_naming_the_route_and_the_refusing_address(dev_proxy):
    proxy, dead, _ = dev_proxy
    response = get(proxy, accept=BROWSER_ACCEPT)
    assert response.status_code == 502
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    page = response.text
    assert page.startswith("<!doctype html>")
    assert f'pyproxy couldn\'t reach <code id="address">{dead}</code>' in page
    assert 'for route <code id="route">app.localhost/</code>' in page
    assert "Is your dev server running?" in page
    assert "<script" not in page and "http://" not in page and "https://" not in page  # self-contained
    assert int(response.headers["Content-Length"]) == len(response.content)


def test_curl_style_accept_gets_one_plain_line(dev_proxy):
    proxy, dead, _ = dev_proxy
    response = get(proxy, accept="*/*")
    assert response.status_code == 502
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert response.text == (f"502 Bad Gateway: pyproxy couldn't reach {dead} for route app.localhost/"
                             f" (connection refused) - {HINT}\n")


def test_no_accept_header_gets_plain_text(dev_proxy):
    proxy, dead, _ = dev_proxy
    response = requests.get(proxy.url + "/", headers={"Host": "app.localhost", "Accept": None},
                            timeout=CLIENT_TIMEOUT)
    assert response.status_code == 502
    assert response.headers["Content-Type"].startswith("text/plain")
    assert dead in response.text and "app.localhost/" in response.text


def test_path_route_is_named_and_a_running_backend_is_unaffected(dev_proxy):
    proxy, _, other_dead = dev_proxy
    assert get(proxy, "/api/users", host="example.test").status_code == 200
    response = get(proxy, "/other/page", host="example.test", accept=BROWSER_ACCEPT)
    assert response.status_code == 502
    assert f'<code id="address">{other_dead}</code>' in response.text
    assert '<code id="route">/other</code>' in response.text


def test_error_page_keeps_the_request_id_and_the_connection(dev_proxy):
    proxy, dead, _ = dev_proxy
    with requests.Session() as session:
        headers = {"Host": "app.localhost", "Accept": BROWSER_ACCEPT, "X-Request-Id": "trace-502"}
        first = session.get(proxy.url + "/", headers=headers, timeout=CLIENT_TIMEOUT)
        assert first.headers["X-Request-Id"] == "trace-502"
        assert "Connection" not in first.headers  # nothing was left unread: keep-alive survives
        second = session.get(proxy.url + "/api", headers={"Host": "x.test"}, timeout=CLIENT_TIMEOUT)
        assert second.status_code == 200


def test_head_gets_the_headers_without_the_page(dev_proxy):
    proxy, _, _ = dev_proxy
    response = get(proxy, accept=BROWSER_ACCEPT, method="HEAD")
    assert response.status_code == 502
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    assert int(response.headers["Content-Length"]) > 0 and response.content == b""


def test_no_route_still_answers_the_short_404(dev_proxy):
    proxy, _, _ = dev_proxy
    response = get(proxy, "/nowhere", host="example.test", accept=BROWSER_ACCEPT)
    assert response.status_code == 404
    assert response.headers["Content-Type"].startswith("text/plain")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_real_curl_sees_the_plain_line(dev_proxy):
    proxy, dead, _ = dev_proxy
    result = subprocess.run(["curl", "-sS", "-H", "Host: app.localhost", "-w", "%{http_code}", proxy.url + "/"],
                            capture_output=True, text=True, timeout=CLIENT_TIMEOUT, check=True)
    body, code = result.stdout[:-3], result.stdout[-3:]  # -w appends the status after the body
    assert code == "502"
    assert body == f"502 Bad Gateway: pyproxy couldn't reach {dead} for route app.localhost/ (connection refused) - {HINT}\n"


# -- pure pieces -----------------------------------------------------------------------------------

@pytest.mark.parametrize("accept, expected", [
    (BROWSER_ACCEPT, True), ("TEXT/HTML", True), ("*/*", False), ("application/json", False), (None, False)])
def test_wants_html(accept, expected):
    assert wants_html(accept) is expected


def test_page_escapes_everything_it_names():
    page = unreachable_page(502, "/<b>", "h:1", False, "<script>alert(1)</script>")
    assert "<script>" not in page and "&lt;script&gt;" in page and "/&lt;b&gt;" in page
    assert "Is your dev server running?" not in page  # that hint is for refused connections only


def test_text_for_a_failure_other_than_refused_carries_the_detail():
    line = unreachable_text(504, "/", "10.0.0.1:80", False, "connect to 10.0.0.1:80 timed out")
    assert line == "504 Gateway Timeout: pyproxy couldn't reach 10.0.0.1:80 for route /: connect to 10.0.0.1:80 timed out"
