"""``pyproxy ctl``: a thin client of the runtime API (proxy/observe/runtime_api.py) for operators and
deploy scripts. It reads the admin listener's address and token from the config file, so a script
needs nothing but ``-c proxy.toml``:

    pyproxy ctl -c proxy.toml drain api 10.0.0.5:8080 --wait --timeout 60s
    pyproxy ctl -c proxy.toml enable api 10.0.0.5:8080
    pyproxy ctl -c proxy.toml status [api] [--json]

Exit codes (docs/operations.md, "Draining a server for a deploy"): EXIT_OK, EXIT_CONFIG (the config
file cannot be used), EXIT_USAGE (click's), EXIT_API (the proxy answered with an error: unknown
server, missing token, ...; or the answer was not the runtime API's), EXIT_UNREACHABLE (nothing
answers on the admin address), EXIT_TIMEOUT (``--wait`` gave up with requests still in flight).
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable
from urllib.parse import quote

from proxy.config.schema import Config
from proxy.config.units import format_address

EXIT_OK = 0
EXIT_CONFIG = 1
EXIT_USAGE = 2
EXIT_API = 3
EXIT_UNREACHABLE = 4
EXIT_TIMEOUT = 5

REQUEST_TIMEOUT = 30.0  # a write waits for every worker to confirm (5 s each at most in the supervisor)
POLL_INTERVAL = 0.25    # --wait asks this often (a GET on loopback; the admin listener has threads)
DEFAULT_WAIT_TIMEOUT = 60.0
# An admin listener on every interface is still reached on loopback.
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows a redirect with every header, the token's too: the runtime API never redirects."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # the 3xx is then an HTTPError, reported as an answer that is not the API's


# No proxy from http_proxy & co, and no redirect: the admin listener is reached directly, and the token
# goes nowhere else.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects())


class CtlError(Exception):
    """Ends the command: the message for stderr and the exit code (``status``: the API's HTTP status)."""

    def __init__(self, message: str, code: int, status: int | None = None):
        super().__init__(message)
        self.code = code
        self.status = status


@dataclass
class AdminClient:
    """HTTP to the admin listener (urllib: no dependency for a command that runs in deploy scripts)."""

    base_url: str
    token: str | None

    @classmethod
    def from_config(cls, config: Config) -> "AdminClient":
        if config.admin is None:
            raise CtlError(f"{config.source}: no [admin] table: the runtime API is served on the admin "
                           "listener", EXIT_CONFIG)
        listen = config.admin.listen
        host = _WILDCARDS.get(listen.host, listen.host)
        return cls(f"http://{format_address(host, listen.port)}", config.admin.token)

    def get(self, path: str) -> dict:
        return self._call("GET", path, expect="upstreams" if path == "/upstreams" else "servers")

    def post(self, path: str) -> dict:
        return self._call("POST", path, b"{}", expect="state")

    def _call(self, method: str, path: str, body: bytes | None = None, *, expect: str) -> dict:
        """The answer's JSON object; it must have the key ``expect``: a 200 from something else on the
        admin address (the proxy could not listen there) must not pass for a drain done."""
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.base_url + path, data=body, method=method, headers=headers)
        try:
            with _DIRECT.open(request, timeout=REQUEST_TIMEOUT) as response:
                document = _json(response.read())
        except urllib.error.HTTPError as exc:
            if 300 <= exc.code < 400:
                raise CtlError(f"{method} {path}: {exc.code} {exc.reason}: a redirect, not followed: not the "
                               f"runtime API's answer (is {self.base_url} pyproxy's admin listener?)",
                               EXIT_API) from None
            document = _json(_error_body(exc))
            reason = document.get("error") or exc.reason
            raise CtlError(f"{method} {path}: {exc.code} {reason}", EXIT_API, exc.code) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise CtlError(f"cannot reach the admin listener at {self.base_url}: {reason}", EXIT_UNREACHABLE) from None
        except http.client.HTTPException as exc:  # not HTTP at all (BadStatusLine), or cut short (IncompleteRead)
            raise CtlError(f"{method} {path}: the answer is not the runtime API's ({type(exc).__name__}; is "
                           f"{self.base_url} pyproxy's admin listener?)", EXIT_API) from None
        if expect not in document:
            raise CtlError(f"{method} {path}: the answer is not the runtime API's (is {self.base_url} pyproxy's "
                           "admin listener?)", EXIT_API)
        return document


def _error_body(exc: urllib.error.HTTPError) -> bytes:
    """An error answer's body; empty if it cannot be read whole (the status still says what happened)."""
    try:
        return exc.read()
    except (http.client.HTTPException, OSError):
        return b""


def _json(data: bytes) -> dict:
    try:
        document = json.loads(data)
    except ValueError:
        return {}
    return document if isinstance(document, dict) else {}


def server_path(upstream: str, address: str, action: str = "") -> str:
    path = f"/upstreams/{quote(upstream, safe='')}"
    if address:
        path += f"/servers/{quote(address, safe='')}/{action}"
    return path


def find_server(view: dict, address: str) -> dict:
    for server in view.get("servers", ()):
        if server.get("address") == address:
            return server
    raise CtlError(f"upstream {view.get('name')!r} has no server {address!r} any more", EXIT_API)


def is_leaving(server: dict) -> bool:
    """Its address left DNS; it finishes the requests it has and takes no new ones, whatever its admin
    state says (the runtime API no longer knows it: a drain answers 404)."""
    return server.get("health") == "leaving"


def leaving_server(client: AdminClient, upstream: str, address: str) -> dict | None:
    """The server as GET /upstreams/NAME shows it, if it is leaving."""
    try:
        server = find_server(client.get(server_path(upstream, "")), address)
    except CtlError:
        return None
    return server if is_leaving(server) else None


def wait_until_idle(client: AdminClient, upstream: str, address: str, timeout: float,
                    say: Callable[[str], None], clock=time.monotonic, sleep=time.sleep) -> int:
    """Poll until the server has no active requests; returns how many it had when the wait began.
    If it is enabled again meanwhile (another client, a restart of the proxy), the wait fails: it takes
    new requests, and an idle moment would not mean it can be restarted. A server found in DNS whose
    address left it is listed only while it has requests in flight: its disappearing means they ended."""
    deadline = clock() + timeout
    first = None
    shown = None
    discovered = False
    while True:
        view = client.get(server_path(upstream, ""))
        try:
            server = find_server(view, address)
        except CtlError:
            if discovered:
                return first
            raise
        discovered = bool(server.get("name"))
        if server.get("admin_state") == "enabled" and not is_leaving(server):
            raise CtlError(f"{upstream}/{address} is enabled now: no longer draining (changed meanwhile by "
                           "another client, or the proxy restarted)", EXIT_API)
        active = server.get("active_requests", 0)
        first = active if first is None else first
        if active == 0:
            return first
        if active != shown:
            say(f"waiting for {active} active request(s) on {upstream}/{address}")
            shown = active
        if clock() >= deadline:
            raise CtlError(f"{upstream}/{address} still has {active} active request(s) after "
                           f"{timeout:g}s; it stays draining", EXIT_TIMEOUT)
        sleep(min(POLL_INTERVAL, max(0.0, deadline - clock())))


def status_lines(view: dict) -> list[str]:
    """One line per server: upstream/address, the operator's state, health, requests."""
    lines = []
    for server in view.get("servers", ()):
        reason = f" ({server['reason']})" if server.get("health") != "up" and server.get("reason") else ""
        lines.append(f"{view['name']}/{server['address']}  {server['admin_state']}  {server['health']}{reason}  "
                     f"{server['active_requests']} active  {server['requests_total']} requests")
    return lines
