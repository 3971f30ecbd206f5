"""The proxy in this process: a ``ProxyProcess`` serving on a thread, on listeners bound to port 0.

``RunningProxy`` (the ``make_proxy`` fixture) is the plain one, built from ``proxy_config_dict``;
``ObservedProxy`` (the ``observed_proxy`` fixture) also has an admin listener, reads /status and
reloads, built from ``config_document``; ``scrape`` reads its /metrics.
"""

from __future__ import annotations

import json
import socket
import threading
import urllib.request

import requests
from prometheus_client.parser import text_string_to_metric_families

from core.socket_server import bind_listener
from proxy.config.schema import ListenConfig, parse_config
from proxy.serve.runner import ProxyProcess
from tests.support.timing import wait_for

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


def start_running_proxy(document: dict) -> RunningProxy:
    """A ``RunningProxy`` serving ``document`` (its listen address replaced by a port-0 listener)."""
    config = parse_config(document, "test.toml")
    sock = bind_listener("127.0.0.1", 0)
    port = sock.getsockname()[1]
    process = ProxyProcess(config, listeners=[(ListenConfig("127.0.0.1", port), sock)])
    return RunningProxy(process, process.start_in_thread(), port)


# -- with an admin listener -----------------------------------------------------------------------------
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


def start_observed_proxy(document: dict) -> ObservedProxy:
    """An ``ObservedProxy`` serving ``document``, returned once its admin listener answers."""
    config = parse_config(document, "test.toml")
    sock = bind_listener("127.0.0.1", 0)
    admin_sock = bind_listener("127.0.0.1", 0)
    port, admin_port = sock.getsockname()[1], admin_sock.getsockname()[1]
    process = ProxyProcess(config, listeners=[(ListenConfig("127.0.0.1", port), sock)], admin_socket=admin_sock)
    proxy = ObservedProxy(process, port, admin_port)
    try:
        wait_for(lambda: _answers(proxy.admin_url + "/healthz"), what="admin listener")
    except AssertionError:
        proxy.stop()
        raise
    return proxy


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0):
            return True
    except OSError:
        return False


def scrape(proxy) -> dict:
    """The admin listener's /metrics (``proxy``: anything with an ``admin_url``), parsed by the official
    Prometheus parser: {family name: family}."""
    response = requests.get(proxy.admin_url + "/metrics", timeout=DEADLINE)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return {family.name: family for family in text_string_to_metric_families(response.text)}


def served_by(proxy: ObservedProxy, count: int) -> dict[str, int]:
    """Send ``count`` GETs; how many each backend (by body) answered. Every one must be a 200."""
    seen: dict[str, int] = {}
    with requests.Session() as session:
        for _ in range(count):
            response = session.get(proxy.url + "/", timeout=DEADLINE)
            assert response.status_code == 200, response.text
            seen[response.text] = seen.get(response.text, 0) + 1
    return seen


def upstream_counter(proxy, sample: str, upstream: str, server: str) -> float:
    family = sample.removesuffix("_total")
    found = [s.value for s in scrape(proxy)[family].samples
             if s.name == sample and s.labels == {"upstream": upstream, "server": server}]
    assert len(found) == 1, (sample, found)
    return found[0]
