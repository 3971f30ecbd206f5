"""Stand-ins for what observers are given: a request record with sample values, and an Application
built from a small config (metrics, access log and status tests)."""

from __future__ import annotations

from proxy.config.schema import parse_config
from proxy.serve.app import Application

WHEN = 971182536.0  # 10/Oct/2000:12:55:36 UTC


class Record:
    """A stand-in for proxy.serve.handler.RequestRecord: every field, sample values; the first three
    can be given in order (what Metrics reads)."""

    def __init__(self, upstream="api", status=200, duration=0.0123, **fields):
        values = dict(started=0.0, client_ip="10.0.0.7", method="GET", target="/a?b=1", version="HTTP/1.1",
                      bytes_sent=512, body_bytes=512, server="127.0.0.1:9001", request_id="rid-1", user_agent="curl/8",
                      referer=None, host="example.com")
        values.update(upstream=upstream, status=status, duration=duration, **fields)
        self.__dict__.update(values)


def make_app(upstreams=None) -> Application:
    upstreams = upstreams or {"api": ["127.0.0.1:9001", "127.0.0.1:9002"], "web": ["127.0.0.1:9003"]}
    document = {"server": {"listen": "127.0.0.1:1"},
                "upstreams": {name: {"servers": servers} for name, servers in upstreams.items()},
                "routes": [{"path": "/", "upstream": next(iter(upstreams))}]}
    return Application(parse_config(document, "test.toml"))


def one_server_config(weight: int):
    """Upstream "web" with one server; a new weight rebuilds its Server object on reload."""
    return parse_config({"routes": [{"upstream": "web"}], "upstreams": {"web": {"servers": [
        {"address": "127.0.0.1:3001", "weight": weight}]}}}, "proxy.toml")


def app_whose_server_counted(requests: int) -> Application:
    """An Application whose one server ("web", 127.0.0.1:3001) has counted ``requests`` requests."""
    app = Application(one_server_config(1))
    server = app.runtime.upstreams["web"].servers[0]
    for _ in range(requests):
        assert server.try_acquire()
        server.release()
    return app
