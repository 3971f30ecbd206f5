"""The local CA (proxy.http.local_ca) and listeners with ``tls = "internal"``.

Every CA lives in the test's tmp_path (``[tls] internal_ca_dir``); nothing is written elsewhere.
Clients are requests, curl and raw ``ssl`` sockets verifying against the CA's root.crt.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import shutil
import socket
import ssl
import stat
import subprocess
import threading

import pytest
import requests
import tomli_w
import trustme
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from core.socket_server import bind_listener
from proxy.config.schema import ConfigError, parse_config
from proxy.http import local_ca
from proxy.http.tls import leaf_context, server_context
from proxy.serve.cli import main
from proxy.serve.runner import ProxyProcess
from tests.support.command import proxy_running
from tests.support.proxy import CLIENT_TIMEOUT, PROXY_STOP_TIMEOUT, proxy_config_dict

pytestmark = pytest.mark.timeout(60)

START = datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc)


class Clock:
    """A settable wall clock for leaf lifetimes."""

    def __init__(self, now: datetime.datetime = START):
        self.now = now

    def __call__(self) -> datetime.datetime:
        return self.now


@dataclasses.dataclass
class InternalProxy:
    process: ProxyProcess
    thread: threading.Thread
    port: int
    ca_dir: str

    @property
    def root_file(self) -> str:
        return os.path.join(self.ca_dir, "root.crt")

    def terminator(self):
        return next(iter(self.process.app.tls_contexts.values()))


@pytest.fixture
def make_internal_proxy(make_backend, tmp_path):
    running = []

    def factory(internal_names=(), sni=None, routes=None) -> InternalProxy:
        backend = make_backend()
        listen = {"address": "127.0.0.1:1", "tls": "internal", **({"sni": sni} if sni else {})}
        document = proxy_config_dict({"web": [backend.address]}, routes=routes,
                                     server={"listen": [listen], "header_timeout": "10s"})
        ca_dir = str(tmp_path / "ca")
        document["tls"] = {"internal_ca_dir": ca_dir, "internal_names": list(internal_names)}
        config = parse_config(document, "test.toml")
        sock = bind_listener("127.0.0.1", 0)
        port = sock.getsockname()[1]
        listen_config = dataclasses.replace(config.server.listen[0], port=port)
        process = ProxyProcess(config, listeners=[(listen_config, sock)])
        proxy = InternalProxy(process, process.start_in_thread(), port, ca_dir)
        running.append(proxy)
        return proxy

    yield factory
    for proxy in running:
        proxy.process.stop(force=True)
        proxy.thread.join(PROXY_STOP_TIMEOUT)


def handshake(port: int, server_name: str | None, cafile: str) -> dict:
    """A verifying TLS handshake (chain and name) to 127.0.0.1:port; the peer certificate's fields."""
    context = ssl.create_default_context(cafile=cafile)
    context.check_hostname = server_name is not None
    if server_name is None:
        context.verify_mode = ssl.CERT_REQUIRED
    with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) as raw:
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            return tls.getpeercert()


def san(certificate: dict) -> set[str]:
    return {value for _, value in certificate["subjectAltName"]}


# -- the root -------------------------------------------------------------------------------------

def test_root_is_created_private_and_name_constrained(tmp_path):
    ca_dir = str(tmp_path / "ca")
    root, _ = local_ca.open_root(ca_dir, ("test",))
    assert stat.S_IMODE(os.stat(ca_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(os.path.join(ca_dir, "root.key")).st_mode) == 0o600
    constraints = root.extensions.get_extension_for_class(x509.NameConstraints)
    assert constraints.critical
    permitted = {str(entry.value) for entry in constraints.value.permitted_subtrees}
    assert permitted == {"localhost", ".localhost", "test", ".test", "127.0.0.0/8", "::1/128"}
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    not_before, not_after = root.not_valid_before_utc, root.not_valid_after_utc
    assert (not_after - not_before).days >= 3650
    assert root.public_key().curve.name == "secp256r1"


def test_root_survives_restarts(tmp_path):
    ca_dir = str(tmp_path / "ca")
    first, _ = local_ca.open_root(ca_dir, ())
    again, _ = local_ca.open_root(ca_dir, ())
    assert local_ca.fingerprint(first) == local_ca.fingerprint(again)


def test_a_root_key_others_can_read_is_refused(tmp_path):
    ca_dir = str(tmp_path / "ca")
    local_ca.open_root(ca_dir, ())
    os.chmod(os.path.join(ca_dir, "root.key"), 0o644)
    with pytest.raises(local_ca.LocalCaError, match="readable by other users.*chmod 600"):
        local_ca.open_root(ca_dir, ())


def test_changed_internal_names_need_a_new_root(tmp_path):
    ca_dir = str(tmp_path / "ca")
    local_ca.open_root(ca_dir, ())
    with pytest.raises(local_ca.LocalCaError, match="changing internal_names needs a new root") as raised:
        local_ca.open_root(ca_dir, (".test",))
    assert raised.value.key == "tls.internal_names"
    local_ca.open_root(ca_dir, ("localhost",))  # the same permitted set, spelled differently: fine


def forged_leaf_files(tmp_path, ca_dir: str, name: str) -> str:
    """A leaf for ``name`` signed by the root's key, bypassing the CA's own refusal (a leaked key)."""
    root, key = local_ca.open_root(ca_dir, ())
    pem, _ = local_ca.make_leaf(root, key, name, datetime.datetime.now(datetime.timezone.utc))
    path = tmp_path / "forged.pem"
    path.write_bytes(pem)
    return str(path)


def serve_one_handshake(context: ssl.SSLContext) -> tuple[int, threading.Thread]:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(CLIENT_TIMEOUT)

    def serve():
        with listener:
            conn, _ = listener.accept()
            with conn:
                try:
                    with context.wrap_socket(conn, server_side=True) as tls:
                        tls.recv(1)
                except (ssl.SSLError, OSError):
                    pass  # the client refused our certificate

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname()[1], thread


def test_a_leaf_for_a_real_domain_signed_with_the_root_key_is_rejected(tmp_path):
    ca_dir = str(tmp_path / "ca")
    port, thread = serve_one_handshake(server_context(forged_leaf_files(tmp_path, ca_dir, "example.com"), None))
    with pytest.raises(ssl.SSLCertVerificationError, match="permitted subtree violation"):
        handshake(port, "example.com", os.path.join(ca_dir, "root.crt"))
    thread.join(CLIENT_TIMEOUT)


def test_a_leaf_for_a_permitted_name_from_the_same_key_verifies(tmp_path):
    """The control for the test above: the same path with a permitted name succeeds."""
    ca_dir = str(tmp_path / "ca")
    port, thread = serve_one_handshake(server_context(forged_leaf_files(tmp_path, ca_dir, "app.localhost"), None))
    assert "app.localhost" in san(handshake(port, "app.localhost", os.path.join(ca_dir, "root.crt")))
    thread.join(CLIENT_TIMEOUT)


def test_openssl_verify_rejects_the_forged_leaf(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl command not installed")
    ca_dir = str(tmp_path / "ca")
    forged = forged_leaf_files(tmp_path, ca_dir, "example.com")
    leaf = x509.load_pem_x509_certificate(open(forged, "rb").read())
    leaf_file = tmp_path / "leaf.crt"
    leaf_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    result = subprocess.run(["openssl", "verify", "-CAfile", os.path.join(ca_dir, "root.crt"), str(leaf_file)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "permitted subtree violation" in result.stdout + result.stderr


# -- leaves: on demand, cached, renewed -----------------------------------------------------------

def test_leaves_are_cached_and_renewed_before_they_expire(tmp_path):
    clock = Clock()
    authority = local_ca.LocalCA(str(tmp_path / "ca"), (), leaf_context, now=clock)
    first = authority.context_for("app.localhost")
    assert authority.context_for("APP.localhost.") is first and authority.issued == 1
    clock.now = START + datetime.timedelta(days=4)
    assert authority.context_for("app.localhost") is first  # 3 of 7 days left: kept
    clock.now = START + datetime.timedelta(days=5)
    renewed = authority.context_for("app.localhost")
    assert renewed is not first and authority.issued == 2


def test_leaf_lifetime_is_seven_days(tmp_path):
    ca_dir = str(tmp_path / "ca")
    root, key = local_ca.open_root(ca_dir, ())
    pem, not_after = local_ca.make_leaf(root, key, "app.localhost", START)
    leaf = x509.load_pem_x509_certificate(pem[pem.index(b"-----BEGIN CERTIFICATE"):])
    assert leaf.not_valid_after_utc == not_after == START + datetime.timedelta(days=7)
    assert leaf.issuer == root.subject


def test_only_permitted_names_are_issued(tmp_path):
    authority = local_ca.LocalCA(str(tmp_path / "ca"), (".test",), leaf_context)
    for name in ("localhost", "app.localhost", "a.b.localhost", "test", "my.app.test"):
        assert authority.context_for(name) is not None, name
    for name in ("example.com", "localhost.example.com", "xtest", "evil-localhost", "test.com"):
        assert authority.context_for(name) is None, name
    assert authority.issued == 5


@pytest.mark.parametrize("name", ["*.localhost", "a..localhost", "x y.localhost", "a/b.localhost", ".localhost",
                                  "a" * 64 + ".localhost", ("a" * 60 + ".") * 5 + "localhost"])
def test_a_server_name_that_is_no_host_name_gets_no_certificate(tmp_path, name):
    """Bug: any SNI name under a permitted domain got a leaf, "*.localhost" (a wildcard certificate),
    "x y.localhost" or "a..localhost" (certificates no client asks for, which RFC 5280 forbids) among
    them. Only names made of DNS labels are issued for."""
    authority = local_ca.LocalCA(str(tmp_path / "ca"), (), leaf_context)
    assert authority.context_for(name) is None
    assert authority.issued == 0
    assert authority.context_for("my-app_1.localhost") is not None


def test_a_new_name_asked_by_many_threads_at_once_is_issued_once(tmp_path):
    authority = local_ca.LocalCA(str(tmp_path / "ca"), (), leaf_context)
    start = threading.Barrier(16)
    results = []

    def ask():
        start.wait(CLIENT_TIMEOUT)
        results.append(authority.context_for("burst.localhost"))

    threads = [threading.Thread(target=ask) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(CLIENT_TIMEOUT)
    assert len(results) == 16 and len({id(context) for context in results}) == 1
    assert authority.issued == 1


# -- a listener with tls = "internal" -------------------------------------------------------------

def test_requests_to_the_loopback_ip_verify_with_the_root(make_internal_proxy):
    proxy = make_internal_proxy()
    response = requests.get(f"https://127.0.0.1:{proxy.port}/hello", verify=proxy.root_file, timeout=CLIENT_TIMEOUT)
    assert response.status_code == 200
    assert {"127.0.0.1", "0:0:0:0:0:0:0:1", "localhost"} == san(handshake(proxy.port, None, proxy.root_file))


def test_names_get_their_own_certificate(make_internal_proxy):
    proxy = make_internal_proxy(internal_names=[".test"])
    assert san(handshake(proxy.port, "app.localhost", proxy.root_file)) == {"app.localhost"}
    assert san(handshake(proxy.port, "site.test", proxy.root_file)) == {"site.test"}


def test_a_name_outside_the_allowed_set_is_refused(make_internal_proxy):
    proxy = make_internal_proxy()
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        handshake(proxy.port, "example.com", proxy.root_file)
    assert handshake(proxy.port, "app.localhost", proxy.root_file)  # the listener still serves others


def test_curl_verifies_chain_and_name(make_internal_proxy):
    if shutil.which("curl") is None:
        pytest.skip("curl not installed")
    proxy = make_internal_proxy()

    def curl(url: str, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(["curl", "-sS", "--max-time", "10", "--cacert", proxy.root_file, *extra,
                               "-o", "/dev/null", "-w", "%{http_code}", url],
                              capture_output=True, text=True, timeout=30)

    by_name = curl(f"https://app.localhost:{proxy.port}/", "--resolve", f"app.localhost:{proxy.port}:127.0.0.1")
    assert by_name.stdout == "200", by_name.stderr
    by_ip = curl(f"https://127.0.0.1:{proxy.port}/")
    assert by_ip.stdout == "200", by_ip.stderr
    refused = curl(f"https://example.com:{proxy.port}/", "--resolve", f"example.com:{proxy.port}:127.0.0.1")
    assert refused.returncode != 0 and "unrecognized name" in refused.stderr


def test_many_clients_asking_for_a_new_name_get_one_certificate(make_internal_proxy):
    proxy = make_internal_proxy()
    authority = proxy.terminator().authority
    before = authority.issued
    start = threading.Barrier(12)
    serials = []

    def client():
        start.wait(CLIENT_TIMEOUT)
        serials.append(handshake(proxy.port, "fresh.localhost", proxy.root_file)["serialNumber"])

    threads = [threading.Thread(target=client) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(CLIENT_TIMEOUT)
    assert len(serials) == 12 and len(set(serials)) == 1
    assert authority.issued == before + 1


def test_internal_listener_with_sni_files(make_internal_proxy, tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("files.localhost")
    cert_path, key_path = tmp_path / "files.crt", tmp_path / "files.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    proxy = make_internal_proxy(sni=[{"host": "files.localhost", "tls_cert": str(cert_path), "tls_key": str(key_path)}])
    ca_file = tmp_path / "trustme.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    assert handshake(proxy.port, "files.localhost", str(ca_file))  # the file's certificate, from trustme's CA
    assert san(handshake(proxy.port, "other.localhost", proxy.root_file)) == {"other.localhost"}


# -- config and pyproxy check ---------------------------------------------------------------------

def internal_document(tmp_path, listen: dict | None = None, tls: dict | None = None) -> dict:
    document = proxy_config_dict({"web": ["127.0.0.1:3000"]},
                                 server={"listen": [listen or {"address": "127.0.0.1:8443", "tls": "internal"}]})
    document["tls"] = {"internal_ca_dir": str(tmp_path / "ca"), **(tls or {})}
    return document


def config_problems(document: dict) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        parse_config(document, "p.toml")
    return raised.value.problems


def test_unknown_tls_value_is_pinpointed(tmp_path):
    problems = config_problems(internal_document(tmp_path, {"address": "127.0.0.1:8443", "tls": "internl"}))
    assert problems == ['p.toml: server.listen[0].tls: expected "internal" (certificates from pyproxy\'s local CA), '
                        "got \"internl\" (did you mean 'internal'?)"]


def test_tls_internal_excludes_certificate_files(tmp_path):
    (tmp_path / "c.pem").write_text("x")
    listen = {"address": "127.0.0.1:8443", "tls": "internal", "tls_cert": str(tmp_path / "c.pem"),
              "tls_key": str(tmp_path / "c.pem")}
    problems = config_problems(internal_document(tmp_path, listen))
    assert len(problems) == 1 and "server.listen[0].tls: tls = \"internal\" and tls_cert/tls_key exclude" in problems[0]


def test_bad_internal_names_are_pinpointed(tmp_path):
    problems = config_problems(internal_document(tmp_path, tls={"internal_names": [".test", "bad name", "127.0.0.1"]}))
    assert [p.split(": ")[1] for p in problems] == ["tls.internal_names[1]", "tls.internal_names[2]"]


def test_default_ca_dir_follows_xdg_data_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    document = internal_document(tmp_path)
    del document["tls"]
    config = parse_config(document, "p.toml")
    assert config.tls.ca_dir == str(tmp_path / "data" / "pyproxy" / "ca")


def check(tmp_path, document: dict):
    path = tmp_path / "p.toml"
    path.write_text(tomli_w.dumps(document))
    return CliRunner().invoke(main, ["check", "-c", str(path)])


def test_check_announces_a_new_ca_without_creating_it(tmp_path):
    result = check(tmp_path, internal_document(tmp_path))
    assert result.exit_code == 0, result.output
    assert "a new local CA will be created in" in result.output
    assert not (tmp_path / "ca").exists()


def test_check_reports_a_root_whose_constraints_no_longer_match(tmp_path):
    local_ca.open_root(str(tmp_path / "ca"), ())
    result = check(tmp_path, internal_document(tmp_path, tls={"internal_names": [".test"]}))
    assert result.exit_code == 1
    assert "p.toml: tls.internal_names: the root in" in result.output
    assert "changing internal_names needs a new root" in result.output


def test_check_reports_a_readable_root_key(tmp_path):
    local_ca.open_root(str(tmp_path / "ca"), ())
    os.chmod(tmp_path / "ca" / "root.key", 0o640)
    result = check(tmp_path, internal_document(tmp_path))
    assert result.exit_code == 1
    assert "p.toml: tls.internal_ca_dir:" in result.output and "chmod 600" in result.output


@pytest.mark.parametrize("lost", [local_ca.ROOT_KEY, local_ca.ROOT_CERT])
def test_half_a_root_is_named_by_check_and_run(tmp_path, lost):
    """root.crt without root.key (or the reverse): check printed a traceback, the run blamed tls_cert."""
    local_ca.open_root(str(tmp_path / "ca"), ())
    os.unlink(tmp_path / "ca" / lost)
    path = tmp_path / "p.toml"
    path.write_text(tomli_w.dumps(internal_document(tmp_path)))
    for command in (["check", str(path)], ["-c", str(path)]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 1, result.output
        assert f"tls.internal_ca_dir: {tmp_path / 'ca' / lost} is missing" in result.output, result.output
    assert not (tmp_path / "ca" / lost).exists()  # nothing made anew: the other half may be trusted


@pytest.mark.parametrize("damaged, what", [(local_ca.ROOT_CERT, "PEM certificate"),
                                           (local_ca.ROOT_KEY, "unencrypted PEM private key")])
def test_a_damaged_root_file_is_named(tmp_path, damaged, what):
    local_ca.open_root(str(tmp_path / "ca"), ())
    (tmp_path / "ca" / damaged).write_bytes(b"-----BEGIN garbage")
    result = check(tmp_path, internal_document(tmp_path))
    assert result.exit_code == 1
    assert f"tls.internal_ca_dir: {tmp_path / 'ca' / damaged} is damaged: it holds no {what}" in result.output


def test_check_reports_a_ca_dir_that_is_not_a_directory(tmp_path):
    (tmp_path / "ca").write_text("not a directory")
    result = check(tmp_path, internal_document(tmp_path))
    assert result.exit_code == 1
    assert f"p.toml: tls.internal_ca_dir: {tmp_path / 'ca'} is not a directory" in result.output


def test_check_reports_an_unusable_ca_dir(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads and writes any directory")
    (tmp_path / "ca").mkdir(mode=0o000)
    result = check(tmp_path, internal_document(tmp_path))
    assert result.exit_code == 1
    assert "is not readable and writable by this user" in result.output


def test_run_refuses_a_readable_root_key_before_listening(tmp_path):
    local_ca.open_root(str(tmp_path / "ca"), ())
    os.chmod(tmp_path / "ca" / "root.key", 0o644)
    path = tmp_path / "p.toml"
    path.write_text(tomli_w.dumps(internal_document(tmp_path)))
    result = CliRunner().invoke(main, ["-c", str(path)])
    assert result.exit_code == 1
    assert "tls.internal_ca_dir:" in result.output and "readable by other users" in result.output


def test_the_leaf_cache_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(local_ca, "MAX_CACHED_LEAVES", 3)
    authority = local_ca.LocalCA(str(tmp_path / "ca"), (), leaf_context)
    first = authority.context_for("n0.localhost")
    for index in range(1, 5):
        authority.context_for(f"n{index}.localhost")
    assert len(authority._leaves) == 3
    assert authority.context_for("n0.localhost") is not first  # forgotten, issued again
    assert authority.issued == 6


def test_the_ca_survives_a_restart_of_the_proxy(tmp_path, make_backend, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    backend = make_backend()
    root_file = tmp_path / "data" / "pyproxy" / "ca" / "root.crt"

    def args_for_port(port):
        return ["--from", f"https://127.0.0.1:{port}", "--to", backend.address]

    fingerprints = []
    for run in ("first", "second"):
        (tmp_path / run).mkdir()
        with proxy_running(tmp_path / run, args_for_port) as running:
            certificate = x509.load_pem_x509_certificate(root_file.read_bytes())
            fingerprints.append(local_ca.fingerprint(certificate))
            assert handshake(running.port, "app.localhost", str(root_file))
    assert fingerprints[0] == fingerprints[1]


def test_a_reload_with_other_internal_names_changes_nothing(make_internal_proxy, tmp_path):
    proxy = make_internal_proxy()
    document = proxy_config_dict({"web": ["127.0.0.1:9"]},
                                 server={"listen": [{"address": "127.0.0.1:1", "tls": "internal"}]})
    document["tls"] = {"internal_ca_dir": proxy.ca_dir, "internal_names": [".test"]}
    with pytest.raises(ConfigError, match="tls.internal_names: the root in"):
        proxy.process.reload(parse_config(document, "test.toml"))
    assert handshake(proxy.port, "app.localhost", proxy.root_file)


def test_check_notes_route_hosts_the_ca_will_not_issue_for(tmp_path):
    document = internal_document(tmp_path, tls={"internal_names": [".test"]})
    document["routes"] = [{"host": "app.localhost", "path": "/", "upstream": "web"},
                          {"host": "*.site.test", "path": "/", "upstream": "web"},
                          {"host": "api.example.com", "path": "/", "upstream": "web"}]
    result = check(tmp_path, document)
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if line.startswith("note:")]
    assert notes == ["note: routes[2].host api.example.com gets no certificate from the local CA "
                     "(it issues for localhost, test); add its domain to tls.internal_names"]
