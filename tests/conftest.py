"""Fixtures for engine integration tests: real backends and an in-process proxy, all on port 0.

    backend = make_backend()                          # ScriptedBackend, started, stopped at teardown
    raw = make_raw_backend(script)                    # RawBackend running script(peer) per connection
    proxy = make_proxy({"web": [backend.address]})    # ProxyProcess on a thread; proxy.url, proxy.port
"""

from __future__ import annotations

import socket
import threading

import pytest

from core.socket_server import bind_listener
from proxy.config import ListenConfig, parse_config
from proxy.runner import ProxyProcess
from tests.backends import RawBackend, ScriptedBackend

PROXY_STOP_TIMEOUT = 10.0
CLIENT_TIMEOUT = 10.0  # every test client socket op is bounded by this


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


@pytest.fixture
def make_backend():
    started = []

    def factory(**kwargs) -> ScriptedBackend:
        backend = ScriptedBackend(**kwargs).start()
        started.append(backend)
        return backend

    yield factory
    for backend in started:
        backend.stop()


@pytest.fixture
def make_raw_backend():
    started = []

    def factory(script) -> RawBackend:
        backend = RawBackend(script).start()
        started.append(backend)
        return backend

    yield factory
    for backend in started:
        backend.stop()


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
