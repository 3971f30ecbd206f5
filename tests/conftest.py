"""Fixtures for engine integration tests: real backends and an in-process proxy, all on port 0.

    backend = make_backend()                          # ScriptedBackend, started, stopped at teardown
    raw = make_raw_backend(script)                    # RawBackend running script(peer) per connection
    proxy = make_proxy({"web": [backend.address]})    # ProxyProcess on a thread; proxy.url, proxy.port
"""

from __future__ import annotations

import json
import socket
import threading
import urllib.request

import pytest
import requests

from core.socket_server import bind_listener
from proxy.config.schema import ListenConfig, parse_config
from proxy.serve.runner import ProxyProcess
from tests.backends import FlakyBackend, RawBackend, ScriptedBackend
from tests.core_helpers import wait_for

PROXY_STOP_TIMEOUT = 10.0
CLIENT_TIMEOUT = 10.0  # every test client socket op is bounded by this
DEADLINE = 5.0  # the health/admin tests' bound on every request and wait
FAST_HEALTH = {"path": "/healthz", "interval": "50ms", "timeout": "40ms", "healthy_after": 2, "unhealthy_after": 2}


class RunningProxy:
    def __init__(self, process: ProxyProcess, thread: threading.Thread, port: int):
        self.process = process
        self.thread = thread
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    @property
    def app(self):
        return self.process.app

    def pool(self, upstream: str, index: int = 0):
        runtime = self.app.runtime.upstreams[upstream]
        return runtime.pools[runtime.servers[index]]

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=CLIENT_TIMEOUT)
        return sock

    def stop(self) -> None:
        self.process.stop(force=True)
        self.thread.join(PROXY_STOP_TIMEOUT)
        assert not self.thread.is_alive(), "proxy did not stop"


def proxy_config_dict(upstreams: dict, routes: list | None = None, server: dict | None = None,
                      upstream_options: dict | None = None) -> dict:
    """A config document: ``upstreams`` maps a name to server addresses; one catch-all route by default."""
    options = {"connect_timeout": "2s", "read_timeout": "5s"}
    options.update(upstream_options or {})
    document = {
        "server": {"listen": "127.0.0.1:1", "min_threads": 2, "max_threads": 32,
                   "header_timeout": "5s", **(server or {})},
        "log": {"access": "off", "level": "warning"},
        "upstreams": {name: {"servers": list(addresses), **options} for name, addresses in upstreams.items()},
        "routes": routes if routes is not None else [{"path": "/", "upstream": next(iter(upstreams))}],
    }
    return document


def started_until_teardown(kind):
    """A fixture body: yields a factory that starts ``kind(...)`` servers; all are stopped at teardown."""
    started = []

    def factory(*args, **kwargs):
        server = kind(*args, **kwargs).start()
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


@pytest.fixture
def make_backend():
    yield from started_until_teardown(ScriptedBackend)


@pytest.fixture
def make_raw_backend():
    yield from started_until_teardown(RawBackend)


@pytest.fixture
def make_proxy():
    running = []

    def factory(upstreams: dict, routes: list | None = None, server: dict | None = None,
                upstream_options: dict | None = None) -> RunningProxy:
        config = parse_config(proxy_config_dict(upstreams, routes, server, upstream_options), "test.toml")
        sock = bind_listener("127.0.0.1", 0)
        port = sock.getsockname()[1]
        process = ProxyProcess(config, listeners=[(ListenConfig("127.0.0.1", port), sock)])
        proxy = RunningProxy(process, process.start_in_thread(), port)
        running.append(proxy)
        return proxy

    yield factory
    for proxy in running:
        proxy.stop()


# -- health and admin: flaky backends, an in-process proxy with an admin listener -------------------
@pytest.fixture
def backends():
    made: list[FlakyBackend] = []

    def factory(*names: str) -> list[FlakyBackend]:
        new = [FlakyBackend(name) for name in names]
        made.extend(new)
        return new

    yield factory
    for backend in made:
        backend.release.set()
        backend.kill()


class ObservedProxy:
    def __init__(self, process: ProxyProcess, port: int, admin_port: int):
        self.process = process
        self.url = f"http://127.0.0.1:{port}"
        self.admin_url = f"http://127.0.0.1:{admin_port}"
        self.thread = process.start_in_thread()

    @property
    def app(self):
        return self.process.app

    def status(self) -> dict:
        with urllib.request.urlopen(self.admin_url + "/status", timeout=DEADLINE) as response:
            return json.load(response)

    def server_status(self, upstream: str, address: str) -> dict:
        servers = self.status()["upstreams"][upstream]["servers"]
        return next(s for s in servers if s["address"] == address)

    def state(self, upstream: str, address: str) -> str:
        return self.server_status(upstream, address)["state"]

    def reload(self, document: dict) -> None:
        """SIGHUP's path with a config_document; its listen address becomes the one this proxy has."""
        document["server"]["listen"] = f"127.0.0.1:{self.url.rsplit(':', 1)[1]}"
        self.process.reload(parse_config(document, "test.toml"))

    def stop(self) -> None:
        self.process.stop(force=True)
        self.thread.join(PROXY_STOP_TIMEOUT)
        assert not self.thread.is_alive(), "proxy did not stop"


def config_document(upstreams: dict, **extra) -> dict:
    """upstreams: name -> upstream table (servers etc.); one catch-all route to the first."""
    document = {
        "server": {"listen": "127.0.0.1:1", "min_threads": 2, "max_threads": 16, "graceful_timeout": "5s"},
        "admin": {"listen": "127.0.0.1:2"},
        "log": {"access": "off", "level": "warning"},
        "upstreams": {name: {"connect_timeout": "1s", "read_timeout": "5s", **table}
                      for name, table in upstreams.items()},
        "routes": [{"path": "/", "upstream": next(iter(upstreams))}],
    }
    for key, value in extra.items():
        document[key] = {**document.get(key, {}), **value} if isinstance(value, dict) else value
    return document


@pytest.fixture
def observed_proxy():
    running: list[ObservedProxy] = []

    def factory(document: dict) -> ObservedProxy:
        config = parse_config(document, "test.toml")
        sock = bind_listener("127.0.0.1", 0)
        admin_sock = bind_listener("127.0.0.1", 0)
        port, admin_port = sock.getsockname()[1], admin_sock.getsockname()[1]
        process = ProxyProcess(config, listeners=[(ListenConfig("127.0.0.1", port), sock)], admin_socket=admin_sock)
        proxy = ObservedProxy(process, port, admin_port)
        running.append(proxy)
        wait_for(lambda: _answers(proxy.admin_url + "/healthz"), what="admin listener")
        return proxy

    yield factory
    for proxy in running:
        proxy.stop()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0):
            return True
    except OSError:
        return False


def served_by(proxy: ObservedProxy, count: int) -> dict[str, int]:
    """Send ``count`` GETs; how many each backend (by body) answered. Every one must be a 200."""
    seen: dict[str, int] = {}
    with requests.Session() as session:
        for _ in range(count):
            response = session.get(proxy.url + "/", timeout=DEADLINE)
            assert response.status_code == 200, response.text
            seen[response.text] = seen.get(response.text, 0) + 1
    return seen
