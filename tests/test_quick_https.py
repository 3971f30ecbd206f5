"""``pyproxy --from https://...``: quick mode serving HTTPS with the local CA's certificates, and the
port 80 redirect that ``--from https://NAME`` (no port) adds. The CA lives in tmp_path (XDG_DATA_HOME).
"""

from __future__ import annotations

import dataclasses
import http.client
import shutil
import socket
import ssl
import subprocess

import pytest

from core.socket_server import bind_listener
from proxy.config.schema import ConfigError, ListenConfig, QuickListen, quick_config, quick_listen
from proxy.serve.cli import bind_listeners, listen_failure, ListenError
from proxy.serve.runner import ProxyProcess
from tests.support.command import proxy_running
from tests.support.proxy import CLIENT_TIMEOUT

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def private_data_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    return tmp_path / "data"


@pytest.mark.parametrize("text, expected", [
    ("https://:8443", QuickListen({"address": ":8443", "tls": "internal"})),
    ("https://127.0.0.1:8443/", QuickListen({"address": "127.0.0.1:8443", "tls": "internal"})),
    ("https://app.localhost:8443", QuickListen({"address": "127.0.0.1:8443", "tls": "internal"})),
    ("https://app.localhost", QuickListen({"address": "127.0.0.1:443", "tls": "internal"}, "127.0.0.1:80")),
    ("http://:8080", QuickListen(":8080")),
    ("127.0.0.1:8080", QuickListen("127.0.0.1:8080")),
])
def test_from_forms(text, expected):
    assert quick_listen(text) == expected


@pytest.mark.parametrize("text, problem", [
    ("https://example.com:8443", "example.com is not localhost or a *.localhost name"),
    ("ftp://:21", "ftp:// is not supported"),
    ("https://:99999", "port must be 1-65535"),
])
def test_bad_from_is_a_one_line_error(text, problem):
    with pytest.raises(ConfigError) as raised:
        quick_config(text, ["127.0.0.1:3000"], [])
    assert len(raised.value.problems) == 1 and f"--from {text}: " in raised.value.problems[0]
    assert problem in raised.value.problems[0]


def test_quick_config_has_an_internal_tls_listener(private_data_home):
    config = quick_config("https://:8443", [], [("app.localhost", "127.0.0.1:3000")])
    assert config.server.listen[0].tls_internal
    assert config.tls.ca_dir == str(private_data_home / "pyproxy" / "ca")


def test_pyproxy_from_https_serves_the_route_with_a_verified_certificate(tmp_path, make_backend, private_data_home):
    backend = make_backend()

    def args_for_port(port):
        return ["--from", f"https://127.0.0.1:{port}", "--route", f"app.localhost={backend.address}"]

    with proxy_running(tmp_path, args_for_port) as running:
        root = str(private_data_home / "pyproxy" / "ca" / "root.crt")
        context = ssl.create_default_context(cafile=root)
        connection = http.client.HTTPSConnection("127.0.0.1", running.port, timeout=CLIENT_TIMEOUT, context=context)
        # The name is checked against the certificate: connect to 127.0.0.1, ask for app.localhost.
        connection.sock = context.wrap_socket(socket.create_connection(("127.0.0.1", running.port),
                                                                       timeout=CLIENT_TIMEOUT),
                                              server_hostname="app.localhost")
        connection.request("GET", "/page", headers={"Host": "app.localhost"})
        response = connection.getresponse()
        assert response.status == 200
        assert backend.last.path == "/page"
        connection.close()
        if shutil.which("curl"):
            result = subprocess.run(
                ["curl", "-sS", "--max-time", "10", "--cacert", root, "--resolve",
                 f"app.localhost:{running.port}:127.0.0.1", "-o", "/dev/null", "-w", "%{http_code}",
                 f"https://app.localhost:{running.port}/"], capture_output=True, text=True, timeout=30)
            assert result.stdout == "200", result.stderr


def redirect_answer(port: int, host: str | None, path: str = "/a/b?c=d") -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=CLIENT_TIMEOUT)
    connection.putrequest("GET", path, skip_host=True)
    if host is not None:
        connection.putheader("Host", host)
    connection.endheaders()
    response = connection.getresponse()
    response.read()
    connection.close()
    return response


def test_https_name_without_a_port_adds_a_port_80_listener_redirecting_to_https(private_data_home):
    config = quick_config("https://app.localhost", ["127.0.0.1:3000"], [])
    https, plain = config.server.listen
    assert (https.address, https.tls_internal, https.redirect_https) == ("127.0.0.1:443", True, False)
    assert (plain.address, plain.tls, plain.redirect_https) == ("127.0.0.1:80", False, True)


@pytest.fixture
def quick_https_proxy(private_data_home):
    """The config --from https://app.localhost builds, on free ports instead of 443 and 80."""
    config = quick_config("https://app.localhost", ["127.0.0.1:3000"], [])
    listeners = []
    for listen in config.server.listen:
        sock = bind_listener("127.0.0.1", 0)
        listeners.append((dataclasses.replace(listen, port=sock.getsockname()[1]), sock))
    config = dataclasses.replace(config, server=dataclasses.replace(
        config.server, listen=tuple(listen for listen, _ in listeners)))
    process = ProxyProcess(config, listeners=listeners)
    thread = process.start_in_thread()
    yield (listeners[0][0].port, listeners[1][0].port)
    process.stop(force=True)
    thread.join(10)


def test_plain_http_is_redirected_to_https_with_308(quick_https_proxy):
    https_port, plain_port = quick_https_proxy
    response = redirect_answer(plain_port, "app.localhost")
    assert response.status == 308
    assert response.getheader("Location") == f"https://app.localhost:{https_port}/a/b?c=d"
    assert redirect_answer(plain_port, "app.localhost:80").getheader("Location") == \
        f"https://app.localhost:{https_port}/a/b?c=d"


def test_a_redirect_port_that_cannot_be_bound_suggests_a_high_port(private_data_home):
    taken = bind_listener("127.0.0.1", 0)
    try:
        config = quick_config("https://app.localhost", ["127.0.0.1:3000"], [])
        https, plain = config.server.listen
        config = dataclasses.replace(config, server=dataclasses.replace(config.server, listen=(
            dataclasses.replace(https, port=0), dataclasses.replace(plain, port=taken.getsockname()[1]))))
        with pytest.raises(ListenError) as raised:
            for _, sock in bind_listeners(config):
                sock.close()
    finally:
        taken.close()
    message = listen_failure(raised.value, config, None)
    assert "address already in use" in message
    assert "use a high port: --from https://app.localhost:8443" in message
    assert listen_failure(raised.value, config, "proxy.toml") == str(raised.value)  # a config file: no hint


def test_the_redirect_refuses_a_host_that_would_change_the_url(quick_https_proxy):
    _, plain_port = quick_https_proxy
    assert redirect_answer(plain_port, "evil.test/x").status == 400
    assert redirect_answer(plain_port, None).status == 400  # HTTP/1.1 without Host
