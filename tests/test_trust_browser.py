"""A real browser trusts the local CA after ``pyproxy trust``: headless Chromium with a fresh HOME loads
https://app.localhost:PORT/ through a ``tls = "internal"`` proxy with no certificate interstitial and
shows the backend's page. The control: the same browser without ``pyproxy trust`` gets the interstitial.

Everything lives in tmp_path: HOME (the CA under ~/.local/share, Chromium's ~/.pki/nssdb), and the
system-store step is skipped (PYPROXY_SYSTEM_STORE=skip). Screenshots land in test-artifacts/.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from proxy.serve.cli import main
from tests.support.browser import Browser, chromium_available
from tests.support.command import proxy_running

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not chromium_available(), reason="no Chromium: run scripts/install-browser"),
    pytest.mark.skipif(shutil.which("certutil") is None, reason="no certutil: apt-get install libnss3-tools"),
]

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
PAGE = b"<!doctype html><title>backend page</title><h1 id=greeting>Hello from the backend</h1>"


@pytest.fixture
def fresh_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / ".local" / "share"))
    monkeypatch.setenv("PYPROXY_SYSTEM_STORE", "skip")
    return home


@pytest.fixture
def app_behind_https(tmp_path, fresh_home, make_backend):
    backend = make_backend().route("/", lambda h, record: h.reply(200, PAGE, (("Content-Type", "text/html"),)))

    def args_for_port(port):
        return ["--from", f"https://127.0.0.1:{port}", "--route", f"app.localhost={backend.address}"]

    with proxy_running(tmp_path, args_for_port) as running:
        yield f"https://app.localhost:{running.port}/"


def page_in_chromium(home: Path, profile: Path, url: str, screenshot: str) -> tuple[str, str]:
    browser = Browser(profile, home=home)
    try:
        browser.navigate(url)
        title, text = browser.evaluate("document.title"), browser.evaluate("document.body.innerText")
        browser.screenshot(ARTIFACTS / screenshot)
        return title, text
    finally:
        browser.close()


def test_chromium_trusts_the_local_ca_after_pyproxy_trust(fresh_home, tmp_path, app_behind_https):
    result = CliRunner().invoke(main, ["trust"])
    assert result.exit_code == 0, result.output
    assert "Chromium" in result.output and "added the root" in result.output
    title, text = page_in_chromium(fresh_home, tmp_path / "profile", app_behind_https, "local-ca-trusted.png")
    assert title == "backend page"
    assert "Hello from the backend" in text


def test_without_pyproxy_trust_chromium_shows_the_interstitial(fresh_home, tmp_path, app_behind_https):
    title, text = page_in_chromium(fresh_home, tmp_path / "profile", app_behind_https, "local-ca-untrusted.png")
    assert title != "backend page"
    assert "ERR_CERT_AUTHORITY_INVALID" in text or "not private" in text, text[:500]
