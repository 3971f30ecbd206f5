"""A headless Chromium driven over the DevTools protocol (JSON over a websocket), for tests that need a
real browser's view of a page: certificate checks, rendering. Debian's package (scripts/install-browser);
no browser is ever downloaded. ``home`` gives the browser its own HOME, where Chromium on Linux reads
the NSS database (~/.pki/nssdb) holding user-trusted roots.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import subprocess
import time
from pathlib import Path

import requests
from websockets.sync.client import connect as ws_connect

from tests.support.timing import wait_for

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
BROWSER_START_TIMEOUT = 20.0  # a cold Chromium start on a busy CI machine
CDP_TIMEOUT = 10.0            # one DevTools command
PAGE_DEADLINE = 10.0          # a page (or an error page) to finish loading
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--remote-debugging-port=0")


def chromium_available() -> bool:
    return os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)


class BrowserError(RuntimeError):
    """Chromium did not start, or a DevTools command failed."""


class Browser:
    """One headless Chromium with one page."""

    def __init__(self, profile: Path, home: Path | None = None):
        env = dict(os.environ, HOME=str(home)) if home else None
        self.process = subprocess.Popen([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        self._ids = itertools.count(1)
        self.keep_events = False
        self.events: list[dict] = []
        self._closing = contextlib.ExitStack()
        try:
            port = self._devtools_port(profile / "DevToolsActivePort")
            page = wait_for(lambda: self._page_target(port), timeout=BROWSER_START_TIMEOUT, interval=0.05,
                            what="a page target")
            self.socket = self._closing.enter_context(
                ws_connect(page["webSocketDebuggerUrl"], max_size=64 * 1024 * 1024, open_timeout=CDP_TIMEOUT))
        except BaseException:
            self.close()
            raise
        self.send("Page.enable")
        self.send("Runtime.enable")

    def _devtools_port(self, port_file: Path) -> int:
        """Chromium writes the port it picked (we asked for 0) to this file once it listens."""
        deadline = time.monotonic() + BROWSER_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrowserError(f"chromium exited with {self.process.returncode}: "
                                   f"{self.process.stderr.read().decode(errors='replace')[-2000:]}")
            if port_file.exists():
                lines = port_file.read_text().split("\n")
                if lines and lines[0].strip().isdigit():
                    return int(lines[0])
            time.sleep(0.05)
        raise BrowserError(f"chromium did not open its DevTools port within {BROWSER_START_TIMEOUT}s")

    @staticmethod
    def _page_target(port: int) -> dict | None:
        targets = requests.get(f"http://127.0.0.1:{port}/json/list", timeout=CDP_TIMEOUT).json()
        return next((t for t in targets if t.get("type") == "page"), None)

    def send(self, method: str, **params) -> dict:
        """Send one command; events arriving meanwhile are dropped, or kept in ``events`` once
        ``keep_events`` is set (a test reading Network.responseReceived, say)."""
        message_id = next(self._ids)
        self.socket.send(json.dumps({"id": message_id, "method": method, "params": params}))
        deadline = time.monotonic() + CDP_TIMEOUT
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"{method}: no answer within {CDP_TIMEOUT}s")
            message = json.loads(self.socket.recv(timeout=left))
            if self.keep_events and "method" in message:
                self.events.append(message)
            if message.get("id") == message_id:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def viewport(self, width: int, height: int, scale: float, mobile: bool) -> None:
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=scale, mobile=mobile)

    def navigate(self, url: str) -> None:
        """Go to url and wait until a document (the page, or Chromium's error page) has loaded."""
        self.send("Page.navigate", url=url)
        wait_for(lambda: self.evaluate("document.readyState") == "complete" and
                 self.evaluate("location.href") != "about:blank", timeout=PAGE_DEADLINE, what=f"{url} to load")

    def open(self, url: str) -> None:
        """Go to url and wait until that very page has loaded (not an error page in its place)."""
        self.send("Page.navigate", url=url)
        wait_for(lambda: self.evaluate("document.readyState") == "complete" and
                 self.evaluate("location.href") == url, timeout=PAGE_DEADLINE, what=f"{url} to load")

    def wait_until(self, expression: str, what: str, timeout: float = PAGE_DEADLINE):
        return wait_for(lambda: self.evaluate(expression), timeout=timeout, interval=0.05, what=what)

    def screenshot(self, path: Path) -> Path:
        """The whole page (not just the viewport), as PNG."""
        size = self.send("Page.getLayoutMetrics")["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        data = self.send("Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        self._closing.close()
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self.process.stderr.close()
