"""TLS on both sides: listener termination (SNI, ALPN, handshake timeout) and https upstreams.

Certificates come from ``trustme`` at test time; clients are requests, curl, websockets and raw ssl.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import http.server
import logging
import os
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time

import pytest
import requests
import tomli_w
import trustme
from websockets.sync.client import connect as ws_connect
from websockets.sync.server import serve as ws_serve

from core.socket_server import bind_listener
from proxy.config.schema import ConfigError, parse_config
from proxy.serve.runner import ProxyProcess
from tests.support.backends import consume_and_digest, pattern_bytes, pattern_sha256, stream_pattern
from tests.support.client import read_small_answer
from tests.support.command import proxy_running, wait_for_log, write_config
from tests.support.proxy import CLIENT_TIMEOUT, PROXY_STOP_TIMEOUT, proxy_config_dict
from tests.support.timing import wait_for

pytestmark = pytest.mark.timeout(30)

HEADER_TIMEOUT = 0.5


@dataclasses.dataclass
class Pki:
    ca: trustme.CA
    ca_file: str
    files: dict  # name -> (cert path, key path)


def _write_cert(ca: trustme.CA, directory, name: str, *hosts: str) -> tuple[str, str]:
    cert = ca.issue_cert(*hosts)
    cert_path, key_path = os.path.join(directory, f"{name}.crt"), os.path.join(directory, f"{name}.key")
    cert.private_key_pem.write_to_path(key_path)
    with open(cert_path, "wb") as out:
        for blob in cert.cert_chain_pems:
            out.write(blob.bytes())
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    ca_file = os.path.join(directory, "ca.pem")
    ca.cert_pem.write_to_path(ca_file)
    files = {
        "default": _write_cert(ca, directory, "default", "default.test", "127.0.0.1"),
        "b": _write_cert(ca, directory, "b", "b.test"),
        "c": _write_cert(ca, directory, "c", "*.c.test"),
        "backend": _write_cert(ca, directory, "backend", "127.0.0.1"),
        "other": _write_cert(ca, directory, "other", "other.test"),
    }
    return Pki(ca, ca_file, files)


class TlsProxy:
    def __init__(self, process: ProxyProcess, thread: threading.Thread, port: int):
        self.process, self.thread, self.port = process, thread, port
        self.url = f"https://127.0.0.1:{port}"

    @property
    def app(self):
        return self.process.app


@pytest.fixture
def make_tls_proxy(pki):
    running = []

    def factory(upstreams: dict, sni: bool = True, server: dict | None = None, listen_options=None) -> TlsProxy:
        cert, key = pki.files["default"]
        listen = {"address": "127.0.0.1:1", "tls_cert": cert, "tls_key": key, **(listen_options or {})}
        if sni:
            listen["sni"] = [{"host": "b.test", "tls_cert": pki.files["b"][0], "tls_key": pki.files["b"][1]},
                             {"host": ["*.c.test"], "tls_cert": pki.files["c"][0], "tls_key": pki.files["c"][1]}]
        # A handshake plus the first request must fit in header_timeout: generous, so that a loaded
        # machine never makes a test about something else time out (the timeout tests set their own).
        settings = {"listen": [listen], "header_timeout": "10s", **(server or {})}
        config = parse_config(proxy_config_dict(upstreams, server=settings), "test.toml")
        sock = bind_listener("127.0.0.1", 0)
        port = sock.getsockname()[1]
        listen_config = dataclasses.replace(config.server.listen[0], port=port)
        process = ProxyProcess(config, listeners=[(listen_config, sock)])
        proxy = TlsProxy(process, process.start_in_thread(), port)
        running.append(proxy)
        return proxy

    yield factory
    for proxy in running:
        proxy.process.stop(force=True)
        proxy.thread.join(PROXY_STOP_TIMEOUT)


@pytest.fixture
def backend(make_backend):
    return make_backend()


@pytest.fixture
def tls_proxy(make_tls_proxy, backend):
    return make_tls_proxy({"web": [backend.address]})


@pytest.fixture
def impatient_tls_proxy(make_tls_proxy, backend):
    """A TLS proxy with a short header_timeout, for the tests of that timeout."""
    return make_tls_proxy({"web": [backend.address]}, server={"header_timeout": HEADER_TIMEOUT})


def client_context(pki, alpn=None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki.ca_file)
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


def peer_names(proxy, server_name: str, pki) -> tuple[set, ssl.SSLSocket]:
    context = client_context(pki)
    context.check_hostname = False  # we want to see which certificate comes, whatever the name
    raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=CLIENT_TIMEOUT)
    tls = context.wrap_socket(raw, server_hostname=server_name)
    names = {value for kind, value in tls.getpeercert()["subjectAltName"]}
    tls.close()
    return names


# -- listener TLS ----------------------------------------------------------------------------
def test_requests_over_tls_with_forwarded_proto(tls_proxy, backend, pki):
    with requests.Session() as session:
        for path in ("/one", "/two"):  # keep-alive over TLS: the second request parks and wakes
            response = session.get(tls_proxy.url + path, verify=pki.ca_file, timeout=CLIENT_TIMEOUT)
            assert response.status_code == 200
            assert response.headers["X-Echo-Path"] == path
    assert backend.last.header("X-Forwarded-Proto") == "https"


def test_large_bodies_both_ways_over_tls(tls_proxy, backend, pki):
    # Both above the splice threshold: the proxy must take the copy path for the TLS side.
    size = 3 * 1024 * 1024
    payload = os.urandom(size)
    response = requests.post(tls_proxy.url + "/upload", data=payload, verify=pki.ca_file, timeout=CLIENT_TIMEOUT)
    assert response.status_code == 200
    assert backend.last.body_length == size
    assert backend.last.body_sha256 == hashlib.sha256(payload).hexdigest()
    backend.route("/big", stream_pattern(size))
    response = requests.get(tls_proxy.url + "/big", verify=pki.ca_file, timeout=CLIENT_TIMEOUT)
    assert response.status_code == 200
    assert hashlib.sha256(response.content).hexdigest() == pattern_sha256(size)


def test_alpn_and_protocol_version(tls_proxy, pki):
    context = client_context(pki, alpn=["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", tls_proxy.port), timeout=CLIENT_TIMEOUT) as raw:
        with context.wrap_socket(raw, server_hostname="default.test") as tls:
            assert tls.selected_alpn_protocol() == "h2"  # HTTP/2 first (tests/test_http2.py)
            assert tls.version() in ("TLSv1.2", "TLSv1.3")


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls_1_1_client_is_refused(tls_proxy, pki):
    context = client_context(pki)
    context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    context.maximum_version = ssl.TLSVersion.TLSv1_1
    with socket.create_connection(("127.0.0.1", tls_proxy.port), timeout=CLIENT_TIMEOUT) as raw:
        with pytest.raises(ssl.SSLError):
            context.wrap_socket(raw, server_hostname="default.test")


def test_sni_selects_certificate(tls_proxy, pki):
    assert "b.test" in peer_names(tls_proxy, "b.test", pki)
    assert "*.c.test" in peer_names(tls_proxy, "x.c.test", pki)
    assert "default.test" in peer_names(tls_proxy, "unknown.test", pki)  # no match: the default
    assert "default.test" in peer_names(tls_proxy, "deep.x.c.test", pki)  # a wildcard covers one label


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_with_sni_and_cacert(tls_proxy, pki, backend):
    def curl(host: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["curl", "-sS", "--max-time", "10", "--cacert", pki.ca_file,
             "--resolve", f"{host}:{tls_proxy.port}:127.0.0.1", "-o", "/dev/null", "-w", "%{http_code}",
             f"https://{host}:{tls_proxy.port}/curl"],
            capture_output=True, text=True, timeout=15)

    for host in ("b.test", "www.c.test", "default.test"):
        result = curl(host)  # curl verifies the name: only the SNI-selected certificate passes
        assert result.returncode == 0, result.stderr
        assert result.stdout == "200"
        assert backend.last.header("Host") == f"{host}:{tls_proxy.port}"
    refused = curl("nomatch.test")  # gets the default certificate, which does not name it
    assert refused.returncode == 60, refused.stderr


def test_silent_client_closed_after_header_timeout(impatient_tls_proxy):
    tls_proxy = impatient_tls_proxy
    with socket.create_connection(("127.0.0.1", tls_proxy.port), timeout=CLIENT_TIMEOUT) as raw:
        started = time.monotonic()
        assert raw.recv(1) == b""  # closed by the proxy without a word
        elapsed = time.monotonic() - started
    assert HEADER_TIMEOUT * 0.8 <= elapsed < HEADER_TIMEOUT + 2.0


def test_stalled_handshake_closed_after_header_timeout(impatient_tls_proxy):
    tls_proxy = impatient_tls_proxy
    with socket.create_connection(("127.0.0.1", tls_proxy.port), timeout=CLIENT_TIMEOUT) as raw:
        raw.sendall(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello, then silence
        started = time.monotonic()
        try:
            assert raw.recv(1024) == b""
        except ConnectionResetError:
            pass  # closed with unread bytes: an RST is as good as a FIN here
        elapsed = time.monotonic() - started
    assert HEADER_TIMEOUT * 0.8 <= elapsed < HEADER_TIMEOUT + 2.0
    wait_for(lambda: tls_proxy.process.pool.counts()["busy"] == 0, timeout=5)


def test_stalled_handshakes_hold_no_thread(make_tls_proxy, backend, pki):
    """Slowloris over TLS: clients stuck mid-ClientHello are parked like half a request head; with
    8 of them against a 2-thread pool a normal HTTPS request is still served. (Were they holding the
    threads, it would wait for their header_timeout, far past the client's timeout.)"""
    proxy = make_tls_proxy({"web": [backend.address]},
                           server={"min_threads": 1, "max_threads": 2, "header_timeout": "60s"})
    stalled = [socket.create_connection(("127.0.0.1", proxy.port), timeout=CLIENT_TIMEOUT) for _ in range(8)]
    try:
        for sock in stalled:
            sock.sendall(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello, then silence
        wait_for(lambda: proxy.process.server.connection_counts()["idle"] == 8, timeout=5)
        assert proxy.process.pool.counts()["busy"] == 0
        response = requests.get(proxy.url + "/", verify=pki.ca_file, timeout=CLIENT_TIMEOUT)
        assert response.status_code == 200
    finally:
        for sock in stalled:
            sock.close()


def test_slow_request_head_over_tls_gets_408(impatient_tls_proxy, pki):
    """Kernel timeouts do not bound TLS reads; the proxy's TLS socket must time out anyway."""
    tls_proxy = impatient_tls_proxy
    context = client_context(pki)
    with socket.create_connection(("127.0.0.1", tls_proxy.port), timeout=CLIENT_TIMEOUT) as raw:
        with context.wrap_socket(raw, server_hostname="default.test") as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: a")
            started = time.monotonic()
            reply = tls.recv(4096)
            assert reply.startswith(b"HTTP/1.1 408"), reply
    assert time.monotonic() - started < HEADER_TIMEOUT + 2.0


def test_graceful_drain_with_idle_tls_connection(tls_proxy, pki):
    with requests.Session() as session:
        response = session.get(tls_proxy.url + "/", verify=pki.ca_file, timeout=CLIENT_TIMEOUT)
        assert response.status_code == 200
        tls_proxy.process.stop()  # the idle TLS keep-alive connection is closed, nothing crashes
        tls_proxy.thread.join(PROXY_STOP_TIMEOUT)
        assert not tls_proxy.thread.is_alive()


def test_broken_key_pair_is_a_config_error(pki, tmp_path):
    from proxy.config.schema import ConfigError
    cert, _ = pki.files["default"]
    _, wrong_key = pki.files["b"]
    config = parse_config(proxy_config_dict({"web": ["127.0.0.1:9"]}, server={
        "listen": [{"address": "127.0.0.1:1", "tls_cert": cert, "tls_key": wrong_key}]}), "test.toml")
    sock = bind_listener("127.0.0.1", 0)
    try:
        with pytest.raises(ConfigError) as caught:
            ProxyProcess(config, listeners=[(config.server.listen[0], sock)])
        assert "tls_cert/tls_key cannot be loaded" in str(caught.value)
    finally:
        sock.close()


@pytest.fixture
def renewable_tls_proxy(pki, tmp_path, backend):
    """A TLS listener whose certificate files live in tmp_path, so a test can renew them in place."""
    cert, key = tmp_path / "site.crt", tmp_path / "site.key"
    shutil.copy(pki.files["default"][0], cert)
    shutil.copy(pki.files["default"][1], key)
    sock = bind_listener("127.0.0.1", 0)
    port = sock.getsockname()[1]
    listen = {"address": f"127.0.0.1:{port}", "tls_cert": str(cert), "tls_key": str(key)}
    document = proxy_config_dict({"web": [backend.address]}, server={"listen": [listen]})
    config = parse_config(document, "test.toml")
    process = ProxyProcess(config, listeners=[(config.server.listen[0], sock)])
    proxy = TlsProxy(process, process.start_in_thread(), port)
    config_file = tmp_path / "proxy.toml"
    config_file.write_text(tomli_w.dumps(document))
    process.config_path = str(config_file)  # what a SIGHUP re-reads
    yield proxy, config, cert, key
    process.stop(force=True)
    proxy.thread.join(PROXY_STOP_TIMEOUT)


def test_reload_serves_renewed_certificate_files(renewable_tls_proxy, pki):
    """Renewing the files in place and reloading (certbot's deploy hook) serves the new certificate."""
    proxy, config, cert, key = renewable_tls_proxy
    with requests.Session() as session:
        assert session.get(proxy.url, verify=pki.ca_file, timeout=CLIENT_TIMEOUT).status_code == 200
        assert "default.test" in peer_names(proxy, "default.test", pki)
        shutil.copy(pki.files["other"][0], cert)
        shutil.copy(pki.files["other"][1], key)
        proxy.process.reload(config)
        assert "other.test" in peer_names(proxy, "other.test", pki)  # the next handshake
        # A connection set up before the reload carries on with the certificate it was given.
        assert session.get(proxy.url, verify=pki.ca_file, timeout=CLIENT_TIMEOUT).status_code == 200


def test_reload_with_a_broken_certificate_changes_nothing(renewable_tls_proxy, pki, caplog):
    proxy, config, cert, key = renewable_tls_proxy
    shutil.copy(pki.files["b"][1], key)  # the wrong key for the certificate
    from proxy.config.schema import ConfigError
    with pytest.raises(ConfigError) as caught:
        proxy.process.reload(config)
    assert "tls_cert/tls_key cannot be loaded" in str(caught.value)
    # SIGHUP's path: the error is logged, the old config and certificate keep serving.
    with caplog.at_level(logging.ERROR, logger="pyproxy"):
        assert proxy.process.reload_from_file() is False
    assert "reload failed, keeping the old config" in caplog.text and "cannot be loaded" in caplog.text
    assert "default.test" in peer_names(proxy, "default.test", pki)
    assert requests.get(proxy.url, verify=pki.ca_file, timeout=CLIENT_TIMEOUT).status_code == 200


def test_a_reload_adding_a_tls_listener_loads_its_files_once(renewable_tls_proxy, pki, monkeypatch):
    """The files are loaded and checked before anything changes; the new listener takes what was
    loaded then. It used to load them a second time once the new config was in place: a file
    changed in between failed the reload half applied ("keeping the old config" while the new one
    served) and left the new address bound, its clients hanging unanswered."""
    from proxy.config.schema import ConfigError
    from proxy.serve import runner
    proxy, config, cert, key = renewable_tls_proxy
    checked = runner.tls_terminators

    def broken(*args):
        raise ConfigError(["the files changed since they were checked"])

    def then_the_files_break(new_config):
        loaded = checked(new_config)
        monkeypatch.setattr(runner, "tls_terminator", broken)
        return loaded

    monkeypatch.setattr(runner, "tls_terminators", then_the_files_break)
    sock = bind_listener("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()  # free again for the reload to bind
    added = {"address": f"127.0.0.1:{port}", "tls_cert": str(cert), "tls_key": str(key)}
    document = proxy_config_dict({"web": ["127.0.0.1:9"]}, server={"listen": [
        {"address": f"127.0.0.1:{proxy.port}", "tls_cert": str(cert), "tls_key": str(key)}, added]})
    proxy.process.reload(parse_config(document, "test.toml"))
    context = client_context(pki)
    with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) as raw:
        with context.wrap_socket(raw, server_hostname="default.test") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")


def test_sni_config_problems(pki):
    from proxy.config.schema import ConfigError
    cert, key = pki.files["default"]
    document = proxy_config_dict({"web": ["127.0.0.1:9"]}, server={"listen": [
        {"address": "127.0.0.1:1", "tls_cert": cert, "tls_key": key,
         "sni": [{"host": "bad host!", "tls_cert": "/nonexistent.pem", "tls_key": key}, {"host": "x.test"}]}]})
    with pytest.raises(ConfigError) as caught:
        parse_config(document, "test.toml")
    text = str(caught.value)
    assert "server.listen[0].sni[0].host" in text
    assert "server.listen[0].sni[0].tls_cert" in text and "does not exist" in text
    assert 'server.listen[0].sni[1]: missing required key "tls_cert"' in text


def test_a_host_given_two_sni_certificates_is_a_config_error(pki):
    """The first entry would win without a word (nginx warns of a conflicting server name): refused, naming both."""
    cert, key = pki.files["default"]
    document = proxy_config_dict({"web": ["127.0.0.1:9"]}, server={"listen": [
        {"address": "127.0.0.1:1", "tls_cert": cert, "tls_key": key,
         "sni": [{"host": ["a.test", "B.test"], "tls_cert": cert, "tls_key": key},
                 {"host": ["c.test", "b.test"], "tls_cert": cert, "tls_key": key}]}]})
    with pytest.raises(ConfigError) as caught:
        parse_config(document, "test.toml")
    assert "server.listen[0].sni[1].host: b.test is already given a certificate by server.listen[0].sni[0]" \
        in str(caught.value)


# -- WebSocket over TLS ------------------------------------------------------------------------
def test_wss_through_tls_listener(make_tls_proxy, pki):
    def echo(ws):
        for message in ws:
            ws.send(message)

    server = ws_serve(echo, "127.0.0.1", 0, max_size=None)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        # header_timeout bounds the whole TLS handshake and then the wait for the upgrade request. The
        # fixture's 0.5 s (for the handshake timeout tests) is less than a loaded machine may take
        # between the client's steps, and the proxy closed: the client read EOF instead of the 101.
        proxy = make_tls_proxy({"ws": [f"127.0.0.1:{server.socket.getsockname()[1]}"]},
                               server={"header_timeout": CLIENT_TIMEOUT})
        payload = os.urandom(2 * 1024 * 1024)
        with ws_connect(f"wss://127.0.0.1:{proxy.port}/ws", ssl=client_context(pki), max_size=None,
                        open_timeout=CLIENT_TIMEOUT) as ws:
            for message in ("hello", payload, "bye"):
                ws.send(message)
                assert ws.recv(CLIENT_TIMEOUT) == message
    finally:
        server.shutdown()
        thread.join(5)


# -- upstream TLS ------------------------------------------------------------------------------
class _SecureHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - quiet
        pass

    def handle_expect_100(self):
        if self.path == "/hang":  # never a 100, never an answer: the proxy must give up at read_timeout
            self.server.hang.wait(CLIENT_TIMEOUT)
            return False
        return super().handle_expect_100()

    def do_GET(self):
        if self.path == "/hang":
            self.server.hang.wait(CLIENT_TIMEOUT)
        body = b"secure " + self.path.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # handshakes the proxy rejects and writes to a proxy that gave up are expected here


@contextlib.contextmanager
def tls_backend(pki, name: str = "backend"):
    server = _QuietServer(("127.0.0.1", 0), _SecureHandler)
    server.hang = threading.Event()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*pki.files[name])
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", server
    finally:
        server.hang.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_https_upstream_with_tls_ca(make_proxy, pki):
    with tls_backend(pki) as (address, _):
        proxy = make_proxy({"secure": [address]}, upstream_options={"tls_ca": pki.ca_file})
        with requests.Session() as session:
            for path in ("/a", "/b"):  # the second one reuses the pooled TLS connection
                response = session.get(proxy.url + path, timeout=CLIENT_TIMEOUT)
                assert response.status_code == 200
                assert response.content == b"secure " + path.encode()
        assert proxy.pool("secure").connects_total == 1


def test_https_upstream_unknown_ca_is_502_with_clear_log(make_proxy, pki, caplog):
    with tls_backend(pki) as (address, _):
        proxy = make_proxy({"secure": [address]}, upstream_options={"retries": 0})
        with caplog.at_level(logging.INFO, logger="pyproxy"):
            response = requests.get(proxy.url + "/x", timeout=CLIENT_TIMEOUT)
        assert response.status_code == 502
        assert "CERTIFICATE_VERIFY_FAILED" in caplog.text
        assert "certificate verify failed" in caplog.text


def test_https_upstream_name_mismatch_is_502(make_proxy, pki, caplog):
    with tls_backend(pki, name="other") as (address, _):
        proxy = make_proxy({"secure": [address]}, upstream_options={"tls_ca": pki.ca_file, "retries": 0})
        with caplog.at_level(logging.INFO, logger="pyproxy"):
            response = requests.get(proxy.url + "/x", timeout=CLIENT_TIMEOUT)
        assert response.status_code == 502
        assert "mismatch" in caplog.text  # "IP address mismatch, certificate is not valid for '127.0.0.1'"


def test_https_upstream_without_verification(make_proxy, pki):
    with tls_backend(pki, name="other") as (address, _):
        proxy = make_proxy({"secure": [address]}, upstream_options={"tls_verify": False})
        response = requests.get(proxy.url + "/open", timeout=CLIENT_TIMEOUT)
        assert response.status_code == 200
        assert response.content == b"secure /open"


def test_https_upstream_read_timeout_is_504(make_proxy, pki):
    """A hung TLS backend must hit read_timeout (kernel timeouts alone would never fire)."""
    with tls_backend(pki) as (address, _):
        proxy = make_proxy({"secure": [address]},
                           upstream_options={"tls_ca": pki.ca_file, "read_timeout": "0.5s", "retries": 0})
        started = time.monotonic()
        response = requests.get(proxy.url + "/hang", timeout=CLIENT_TIMEOUT)
        assert response.status_code == 504
        assert time.monotonic() - started < 3.0


def test_https_upstream_silent_on_expect_continue_is_504_at_read_timeout(make_proxy, pki):
    """Bug: the wait for a TLS upstream's 100 Continue used a 60 s default, not read_timeout (a TLS
    socket carries its timeout on the Python side, not in SO_RCVTIMEO)."""
    with tls_backend(pki) as (address, _):
        proxy = make_proxy({"secure": [address]},
                           upstream_options={"tls_ca": pki.ca_file, "read_timeout": "0.5s", "retries": 0})
        # A pooled connection: on a fresh one the server's TLS 1.3 session tickets wake the wait early.
        assert requests.get(proxy.url + "/warm", timeout=CLIENT_TIMEOUT).status_code == 200
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=CLIENT_TIMEOUT) as sock:
            sock.sendall(b"PUT /hang HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
            # No 100 from the server within read_timeout: the proxy sends its own, then the body goes on.
            assert sock.recv(256) == b"HTTP/1.1 100 Continue\r\n\r\n"
            sock.sendall(b"hello")
            status_line = sock.recv(256).split(b"\r\n", 1)[0]
        assert status_line == b"HTTP/1.1 504 Gateway Timeout"
        assert time.monotonic() - started < 10.0  # two read_timeouts; the bug waited 60 s


# -- slow peers over TLS: held by the transfer relay, as plain connections are -----------------------
def _held(proxy) -> int:
    return proxy.process.server.connection_counts().get("held", 0)


def test_a_tls_connection_drops_the_kernel_write_timeout_a_listener_passes_on(make_tls_proxy, backend, pki):
    # Accepted sockets inherit the listener's SO_SNDTIMEO (core's accepted_timeouts); TLS keeps its
    # timeouts in Python, so a kernel one left on its descriptor would cut its blocking sends short.
    backend.route("/small", stream_pattern(10))
    proxy = make_tls_proxy({"web": [backend.address]})
    raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=CLIENT_TIMEOUT)
    with client_context(pki).wrap_socket(raw, server_hostname="default.test") as tls:
        tls.sendall(b"GET /small HTTP/1.1\r\nHost: default.test\r\n\r\n")
        response = http.client.HTTPResponse(tls, method="GET")
        response.begin()
        assert response.read() == pattern_bytes(0, 10)
        conns = list(proxy.process.server._connections.values())
        assert len(conns) == 1
        with socket.socket(fileno=os.dup(conns[0].sock.fileno())) as view:
            assert struct.unpack("ll", view.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, 16)) == (0, 0)


def test_a_tls_client_not_reading_a_large_response_holds_no_thread(make_tls_proxy, backend, pki):
    size = 8 * 1024 * 1024
    backend.route("/big", stream_pattern(size))
    proxy = make_tls_proxy({"web": [backend.address]})
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.settimeout(CLIENT_TIMEOUT)
    raw.connect(("127.0.0.1", proxy.port))
    with client_context(pki).wrap_socket(raw, server_hostname="default.test") as tls:
        tls.sendall(b"GET /big HTTP/1.1\r\nHost: default.test\r\n\r\n")
        wait_for(lambda: _held(proxy) == 1, what="the stalled TLS response held by the relay")
        wait_for(lambda: proxy.process.pool.busy == 0, what="no worker busy with it")
        response = http.client.HTTPResponse(tls, method="GET")
        response.begin()
        body = response.read()
        assert response.status == 200
        assert hashlib.sha256(body).hexdigest() == pattern_sha256(size)
        tls.sendall(b"GET /small HTTP/1.1\r\nHost: default.test\r\n\r\n")  # still a keep-alive connection
        response = http.client.HTTPResponse(tls, method="GET")
        response.begin()
        assert response.status == 200


def test_a_stalled_tls_upload_holds_no_thread_and_completes(make_tls_proxy, backend, pki):
    backend.route("/upload", consume_and_digest)
    proxy = make_tls_proxy({"web": [backend.address]})
    body = pattern_bytes(0, 1024 * 1024)
    raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=CLIENT_TIMEOUT)
    with client_context(pki).wrap_socket(raw, server_hostname="default.test") as tls:
        tls.sendall(b"POST /upload HTTP/1.1\r\nHost: default.test\r\nContent-Length: %d\r\n\r\n" % len(body)
                    + body[:100 * 1024])
        wait_for(lambda: _held(proxy) == 1, what="the stalled TLS upload held by the relay")
        wait_for(lambda: proxy.process.pool.busy == 0, what="no worker busy with it")
        tls.sendall(body[100 * 1024:])
        response = http.client.HTTPResponse(tls, method="POST")
        response.begin()
        assert response.status == 200
        assert response.read() == f"{len(body)} {hashlib.sha256(body).hexdigest()}".encode()


def test_a_tls_client_silent_after_its_handshake_holds_no_thread(make_tls_proxy, backend, pki):
    proxy = make_tls_proxy({"web": [backend.address]}, server={"header_timeout": "10s"})
    raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=CLIENT_TIMEOUT)
    with client_context(pki).wrap_socket(raw, server_hostname="default.test") as tls:
        wait_for(lambda: proxy.process.server.connection_counts().get("idle", 0) == 1,
                 what="the connection parked after its handshake")
        wait_for(lambda: proxy.process.pool.busy == 0, what="no worker waiting for its request")
        tls.sendall(b"GET /late HTTP/1.1\r\nHost: default.test\r\n\r\n")  # still served when it comes
        response = http.client.HTTPResponse(tls, method="GET")
        response.begin()
        assert response.status == 200


# -- plain HTTP sent to a TLS listener gets told so ----------------------------------------------------------
# It was closed without a word ("empty reply from server"); nginx and Go's server answer a 400 in plain
# text. The request bytes are read away first so the close is a FIN and the answer arrives.
@pytest.mark.parametrize("request_bytes", [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /form HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
])
def test_plain_http_on_a_tls_listener_is_a_400_saying_so(make_tls_proxy, make_backend, pki, request_bytes):
    backend = make_backend()
    proxy = make_tls_proxy({"web": [backend.address]})
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=CLIENT_TIMEOUT) as sock:
        sock.sendall(request_bytes)
        answer = read_small_answer(sock)
    assert answer.startswith(b"HTTP/1.1 400 ") and b"HTTPS port" in answer
    assert backend.requests == []
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=CLIENT_TIMEOUT) as raw:  # still serving
        with client_context(pki).wrap_socket(raw, server_hostname="default.test") as tls:
            tls.sendall(b"GET /ok HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            assert read_small_answer(tls).startswith(b"HTTP/1.1 200 ")


def test_an_h2_only_alpn_client_is_still_served_http11(make_tls_proxy, make_backend, pki):
    """Uncovered: with http2 = false, a client offering only h2 gets no ALPN protocol (not a failed
    handshake) and may go on in HTTP/1.1."""
    proxy = make_tls_proxy({"web": [make_backend().address]}, listen_options={"http2": False})
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=CLIENT_TIMEOUT) as raw:
        with client_context(pki, alpn=["h2"]).wrap_socket(raw, server_hostname="default.test") as tls:
            assert tls.selected_alpn_protocol() is None
            tls.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            assert read_small_answer(tls).startswith(b"HTTP/1.1 200 ")


def client_hello(server_name: bytes) -> bytes:
    """A TLS ClientHello naming ``server_name`` as it is, bytes the ssl module would refuse to send."""
    context = ssl.create_default_context()
    placeholder = "q" * len(server_name)
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname=placeholder)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read().replace(placeholder.encode(), server_name)


@pytest.mark.parametrize("server_name", [b"caf\xc3\xa9.test", b"\xff\xfe.test"])
def test_a_server_name_that_is_not_ascii_is_refused_without_a_traceback(pki, make_backend, tmp_path, server_name):
    """Bug: the ssl module decodes the SNI name as ASCII before the proxy's certificate callback
    runs; a name that is not (UTF-8, or any byte past 127) printed "Exception ignored in: ...
    Traceback ... UnicodeDecodeError" on stderr for every such handshake, a flood anyone could send.
    The handshake is still refused (OpenSSL's alert), and a debug line says why."""
    backend = make_backend()
    cert, key = pki.files["default"]
    sni = f'sni = [{{ host = "b.test", tls_cert = "{pki.files["b"][0]}", tls_key = "{pki.files["b"][1]}" }}]'

    def args_for_port(port):
        text = (f'[server]\nlisten = [{{ address = "127.0.0.1:{port}", tls_cert = "{cert}", tls_key = "{key}", '
                f'{sni} }}]\n\n[log]\nlevel = "debug"\naccess = "off"\n\n[[routes]]\npath = "/"\nupstream = "web"\n\n'
                f'[upstreams.web]\nservers = ["{backend.address}"]\n')
        return ["-c", str(write_config(tmp_path, text))]

    with proxy_running(tmp_path, args_for_port) as running:
        with socket.create_connection(("127.0.0.1", running.port), timeout=CLIENT_TIMEOUT) as raw:
            raw.sendall(client_hello(server_name))
            assert raw.recv(1) == b"\x15"  # a TLS alert record: the handshake is refused
        response = requests.get(f"https://127.0.0.1:{running.port}/", verify=pki.ca_file, timeout=CLIENT_TIMEOUT)
        assert response.status_code == 200
        wait_for_log(running, "whose server name is not ASCII")
    assert "Traceback" not in running.stderr() and "Exception ignored" not in running.stderr(), running.stderr()
