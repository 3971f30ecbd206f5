"""Fixtures only; the harness they hand out lives in tests/support (see its __init__ for a map).

    backend = make_backend()                          # ScriptedBackend, started, stopped at teardown
    raw = make_raw_backend(script)                    # RawBackend running script(peer) per connection
    upstream = upstreams([HEAD, write(b"..."), FIN])  # FaultyUpstream running those steps per connection
    proxy = make_proxy({"web": [backend.address]})    # RunningProxy on a thread; proxy.url, proxy.port
    a, b = backends("a", "b")                         # FlakyBackends, killed at teardown
    proxy = observed_proxy(config_document(...))      # ObservedProxy: admin listener, status(), reload()
    address = json_backends("web")                    # JsonEchoServer for the pyproxy command tests
"""

from __future__ import annotations

import threading

import pytest

from tests.support.backends import FlakyBackend, JsonEchoServer, RawBackend, ScriptedBackend, started_until_teardown
from tests.support.command import EXIT_TIMEOUT
from tests.support.faulty_upstream import FaultyUpstream
from tests.support.proxy import (ObservedProxy, RunningProxy, proxy_config_dict, start_observed_proxy,
                                 start_running_proxy)


@pytest.fixture
def make_backend():
    yield from started_until_teardown(ScriptedBackend)


@pytest.fixture
def make_raw_backend():
    yield from started_until_teardown(RawBackend)


@pytest.fixture
def upstreams():
    """A factory of started ``FaultyUpstream``s (scripted step by step), stopped at teardown."""
    yield from started_until_teardown(FaultyUpstream)


@pytest.fixture
def make_proxy():
    running: list[RunningProxy] = []

    def factory(upstreams: dict, routes: list | None = None, server: dict | None = None,
                upstream_options: dict | None = None) -> RunningProxy:
        proxy = start_running_proxy(proxy_config_dict(upstreams, routes, server, upstream_options))
        running.append(proxy)
        return proxy

    yield factory
    for proxy in running:
        proxy.stop()


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


@pytest.fixture
def observed_proxy():
    running: list[ObservedProxy] = []

    def factory(document: dict) -> ObservedProxy:
        proxy = start_observed_proxy(document)
        running.append(proxy)
        return proxy

    yield factory
    for proxy in running:
        proxy.stop()


@pytest.fixture
def json_backends():
    """A factory of named JSON echo backends (returns each one's address), all shut down at the end."""
    servers: list[tuple[JsonEchoServer, threading.Thread]] = []

    def start(name: str) -> str:
        server = JsonEchoServer(name)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        servers.append((server, thread))
        return server.address

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(timeout=EXIT_TIMEOUT)
