"""Redirects answered by the proxy: a route's ``redirect`` (each placeholder, each status) and a
listener's ``redirect_https``; bad values are reported by the config check with file, key and problem."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys

import pytest
import requests

from core.socket_server import bind_listener
from proxy.config.schema import ConfigError, parse_config
from proxy.serve.runner import ProxyProcess
from tests.support.proxy import CLIENT_TIMEOUT, PROXY_STOP_TIMEOUT, config_document, proxy_config_dict

pytestmark = pytest.mark.timeout(60)


def _redirect_routes(*routes: dict) -> list[dict]:
    return [{"path": "/", "upstream": "app"}, *routes]


def _get(url: str, method: str = "GET", **kwargs) -> requests.Response:
    return requests.request(method, url, allow_redirects=False, timeout=CLIENT_TIMEOUT, **kwargs)


@pytest.fixture
def redirecting(make_backend, make_proxy):
    backend = make_backend()
    proxy = make_proxy({"app": [backend.address]}, routes=_redirect_routes(
        {"path": "/old", "redirect": {"to": "https://example.com{uri}"}},
        {"path": "/host", "redirect": {"to": "https://{host}/moved", "status": 301}},
        {"path": "/path", "redirect": {"to": "http://new.example{path}", "status": 302}},
        {"path": "/query", "redirect": {"to": "/search?from=old&{query}", "status": 303}},
        {"path": "/temp", "redirect": {"to": "/elsewhere{uri}", "status": 307}},
        {"host": "old.test", "path": "/", "redirect": {"to": "https://new.test{uri}", "status": 308}},
    ))
    proxy.backend = backend
    return proxy


def test_default_status_is_308_with_uri(redirecting):
    response = _get(redirecting.url + "/old/a/b?x=1&y=2")
    assert response.status_code == 308
    assert response.headers["Location"] == "https://example.com/old/a/b?x=1&y=2"
    assert "example.com/old/a/b" in response.text  # a short body names the target
    assert redirecting.backend.requests == []  # answered by the proxy, never forwarded


@pytest.mark.parametrize("target,status,location", [
    ("/host/x", 301, "https://redirect.test/moved"),                  # {host}: the Host, port dropped
    ("/path/a?q=1", 302, "http://new.example/path/a"),                 # {path}: no query
    ("/query?a=b", 303, "/search?from=old&?a=b"),                      # {query}: with its "?"
    ("/query", 303, "/search?from=old&"),                              # {query}: empty without one
    ("/temp/../temp/x?k", 307, "/elsewhere/temp/x?k"),                 # the normalised path
])
def test_each_placeholder_and_status(redirecting, target, status, location):
    response = _get(redirecting.url + target, headers={"Host": "Redirect.test:8443"})
    assert response.status_code == status
    assert response.headers["Location"] == location


@pytest.mark.parametrize("to, location", [
    ("https://例え.jp{uri}", "https://xn--r8jz45g.jp/intl/x?q=1"),            # a Unicode host: its IDNA form
    ("https://exämple.com:8443/über{uri}", "https://xn--exmple-cua.com:8443/%C3%BCber/intl/x?q=1"),
    ("/café{path}", "/caf%C3%A9/intl/x"),                                      # a path: percent-encoded UTF-8
])
def test_a_unicode_target_is_sent_as_an_ascii_url(make_backend, make_proxy, to, location):
    """A Location is a URI (ASCII): a Unicode host or path in ``to`` is encoded as browsers encode a
    typed URL, not sent as raw bytes (or not at all, for characters outside latin-1)."""
    backend = make_backend()
    proxy = make_proxy({"app": [backend.address]}, routes=_redirect_routes({"path": "/intl", "redirect": {"to": to}}))
    response = _get(proxy.url + "/intl/x?q=1")
    assert response.status_code == 308
    assert response.headers["Location"] == location


def test_host_route_redirects_and_others_are_forwarded(redirecting):
    assert _get(redirecting.url + "/page?a=1", headers={"Host": "old.test"}).headers["Location"] == \
        "https://new.test/page?a=1"
    forwarded = _get(redirecting.url + "/page", headers={"Host": "other.test"})
    assert forwarded.status_code == 200 and redirecting.backend.last.path == "/page"


def test_keep_alive_and_head_and_post(redirecting):
    with requests.Session() as session:
        first = session.get(redirecting.url + "/old/1", allow_redirects=False, timeout=CLIENT_TIMEOUT)
        second = session.head(redirecting.url + "/old/2", allow_redirects=False, timeout=CLIENT_TIMEOUT)
        assert first.status_code == second.status_code == 308
        assert second.headers["Location"] == "https://example.com/old/2" and second.content == b""
        assert "close" not in first.headers.get("Connection", "")
        post = session.post(redirecting.url + "/temp/form", data=b"x" * 100, allow_redirects=False,
                            timeout=CLIENT_TIMEOUT)
        assert post.status_code == 307 and post.headers["Location"] == "/elsewhere/temp/form"
    assert redirecting.backend.requests == []


def test_requests_follows_a_redirect_route_to_the_backend(make_backend, make_proxy):
    backend = make_backend()
    proxy = make_proxy({"app": [backend.address]},
                       routes=_redirect_routes({"path": "/v1", "redirect": {"to": "/v2{query}", "status": 302}}))
    response = requests.get(proxy.url + "/v1?id=7", timeout=CLIENT_TIMEOUT)
    assert response.status_code == 200
    assert [r.status_code for r in response.history] == [302]
    assert backend.last.path == "/v2?id=7"


def test_http10_without_host_gets_400_for_a_host_placeholder(redirecting):
    with socket.create_connection(("127.0.0.1", redirecting.port), timeout=CLIENT_TIMEOUT) as sock:
        sock.sendall(b"GET /host/x HTTP/1.0\r\n\r\n")
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"Host" in answer


# -- redirect_https on a listener ------------------------------------------------------------------------
@pytest.fixture
def https_redirect_proxy(make_backend):
    """A proxy whose plain listener redirects to https; ``make(tls_port)`` adds a TLS listener entry
    (only in the config, not bound) so the port chosen can be checked."""
    started = []

    def make(listen_extra: list | None = None):
        backend = make_backend()
        sock = bind_listener("127.0.0.1", 0)
        port = sock.getsockname()[1]
        document = proxy_config_dict({"app": [backend.address]},
                                     server={"listen": [{"address": f"127.0.0.1:{port}", "redirect_https": True},
                                                        *(listen_extra or [])]})
        config = parse_config(document, "test.toml")
        process = ProxyProcess(config, listeners=[(config.server.listen[0], sock)])
        thread = process.start_in_thread()
        started.append((process, thread))
        process.url, process.port, process.backend, process.document = f"http://127.0.0.1:{port}", port, backend, document
        return process

    yield make
    for process, thread in started:
        process.stop(force=True)
        thread.join(PROXY_STOP_TIMEOUT)


def test_redirect_https_uses_443_without_a_tls_listener(https_redirect_proxy):
    proxy = https_redirect_proxy()
    response = _get(proxy.url + "/a/b?c=d", headers={"Host": "www.example.com:8080"})
    assert response.status_code == 308
    assert response.headers["Location"] == "https://www.example.com/a/b?c=d"
    assert proxy.backend.requests == []


def test_redirect_https_names_the_tls_listener_port(https_redirect_proxy, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("not read by the config check\n")
    key.write_text("not read by the config check\n")
    proxy = https_redirect_proxy([{"address": "127.0.0.1:8443", "tls_cert": str(cert), "tls_key": str(key)}])
    response = _get(proxy.url + "/x", headers={"Host": "[::1]:80"})
    assert response.headers["Location"] == "https://[::1]:8443/x"


def test_reload_turns_redirect_https_off(https_redirect_proxy):
    proxy = https_redirect_proxy()
    assert _get(proxy.url + "/x").status_code == 308
    proxy.document["server"]["listen"][0]["redirect_https"] = False
    proxy.reload(parse_config(proxy.document, "test.toml"))  # what SIGHUP runs with the file's config
    response = _get(proxy.url + "/x")
    assert response.status_code == 200 and proxy.backend.last.path == "/x"


# -- config ------------------------------------------------------------------------------------------
def _problems(routes: list | None = None, listen=None) -> list[str]:
    document = proxy_config_dict({"app": ["127.0.0.1:9"]}, routes=routes, server={"listen": listen} if listen else None)
    with pytest.raises(ConfigError) as caught:
        parse_config(document, "proxy.toml")
    return caught.value.problems


@pytest.mark.parametrize("route,problem", [
    ({"redirect": {"to": "https://x{uri}", "status": 300}}, "routes[1].redirect.status: 300 is not one of 301 | 302 | 303 | 307 | 308"),
    ({"redirect": {"to": "https://x{url}"}}, "routes[1].redirect.to: unknown placeholder {url}"),
    ({"redirect": {"to": "example.com/x"}}, 'routes[1].redirect.to: "example.com/x" must start with'),
    ({"redirect": {"to": "https://x/{uri"}}, "routes[1].redirect.to: \"https://x/{uri\" has an unmatched brace"),
    ({"redirect": {"to": "https://x/a b"}}, "routes[1].redirect.to: \"https://x/a b\" is not a valid URL"),
    ({"redirect": {"to": "https://" + "ü" * 64 + ".com/"}}, 'routes[1].redirect.to: "https://üüü'),
    ({"redirect": {"status": 301}}, 'routes[1].redirect: missing required key "to"'),
    ({"redirect": "https://x"}, "routes[1].redirect: expected a table"),
    ({"redirect": {"to": "/x", "code": 301}}, "routes[1].redirect.code: unknown key"),
    ({"redirect": {"to": "/x"}, "upstream": "app"}, 'routes[1]: give either "upstream" or "redirect", not both'),
    ({"redirect": {"to": "/x"}, "compress": True}, "routes[1].compress: does not apply to a redirect route"),
    ({}, 'routes[1]: missing required key "upstream"'),
])
def test_check_reports_bad_redirects(route, problem):
    problems = _problems(_redirect_routes({"path": "/r", **route}))
    assert any(line.startswith(f"proxy.toml: {problem}") for line in problems), problems


def test_check_reports_bad_redirect_https(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("x\n")
    key.write_text("x\n")
    problems = _problems(listen=[{"address": "127.0.0.1:8080", "redirect_https": "yes"},
                                 {"address": "127.0.0.1:8443", "tls_cert": str(cert), "tls_key": str(key),
                                  "redirect_https": True}])
    assert "proxy.toml: server.listen[0].redirect_https: expected true or false, got \"yes\"" in problems
    assert any(line.startswith("proxy.toml: server.listen[1].redirect_https: a TLS listener is https already")
               for line in problems), problems


def test_pyproxy_check_names_file_key_and_problem(tmp_path):
    config = tmp_path / "proxy.toml"
    config.write_text('[[routes]]\npath = "/"\nredirect = { to = "https://x{nope}", status = 399 }\n'
                      '[upstreams.app]\nservers = ["127.0.0.1:9"]\n')
    done = subprocess.run([sys.executable, "-m", "proxy.serve.cli", "check", "-c", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert f"{config}: routes[0].redirect.status: 399 is not one of 301 | 302 | 303 | 307 | 308" in done.stderr + done.stdout
    assert "unknown placeholder {nope}" in done.stderr + done.stdout
    assert "Traceback" not in done.stderr


def test_pyproxy_check_shows_redirects_in_the_routing_table(tmp_path):
    config = tmp_path / "proxy.toml"
    config.write_text('[server]\nlisten = [{ address = "127.0.0.1:8080", redirect_https = true }]\n'
                      '[[routes]]\npath = "/old"\nredirect = { to = "/new{query}", status = 301 }\n'
                      '[[routes]]\npath = "/"\nupstream = "app"\ncompress = true\n'
                      '[upstreams.app]\nservers = ["127.0.0.1:9"]\n')
    done = subprocess.run([sys.executable, "-m", "proxy.serve.cli", "check", "-c", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "(any host) /old -> redirect 301 to /new{query}" in done.stdout
    assert "127.0.0.1:8080 (redirects to https)" in done.stdout
    assert "compress: zstd, br, gzip" in done.stdout


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_sees_the_redirect(redirecting):
    done = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}", "--max-time", "20",
                           redirecting.url + "/old/z?q=1"], capture_output=True, text=True, timeout=30)
    assert done.stdout == "308 https://example.com/old/z?q=1"


def test_status_names_redirect_routes(observed_proxy, make_backend):
    document = config_document({"app": {"servers": [make_backend().address]}})
    document["routes"].append({"path": "/old", "redirect": {"to": "/new{uri}", "status": 301}})
    proxy = observed_proxy(document)
    routes = proxy.status()["routes"]
    assert {"host": None, "path": "/old", "upstream": "", "strip_prefix": False,
            "redirect": {"to": "/new{uri}", "status": 301}} in routes
    assert {"host": None, "path": "/", "upstream": "app", "strip_prefix": False} in routes
