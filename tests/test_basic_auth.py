"""Per-route HTTP Basic auth: bcrypt hashes inline or from an htpasswd file (bcrypt entries only).

401 with a ``WWW-Authenticate: Basic realm="...", charset="UTF-8"`` challenge until the request carries
a user's credentials; the Authorization header stops at the proxy unless ``forward_auth_header``; an
unknown user still costs a bcrypt check; bcrypt runs on a pool worker; recent successes are cached
(bounded); config problems name the file, the key (or the htpasswd line) and the problem; a SIGHUP
re-reads the users file; ``pyproxy hash-password`` makes hashes.

htpasswd files are made with ``htpasswd -B`` (Debian's apache2-utils, which scripts/test installs).
Hashes use bcrypt's lowest cost (4) so the suite stays quick; the code paths are the same at any cost.
"""

from __future__ import annotations

import base64
import logging
import shutil
import signal
import subprocess
import threading

import bcrypt
import pytest
import requests
from click.testing import CliRunner

from proxy.config.schema import ConfigError, load_config, parse_config
from proxy.config.edge import BasicAuthConfig
from proxy.http import basic_auth as basic_auth_module
from proxy.http.basic_auth import BasicAuth, hash_password, parse_credentials
from proxy.http.errors import Unauthorized
from proxy.routing.table import routing_table_lines
from proxy.serve import cli
from tests.support.backends import named_backends
from tests.support.client import raw_client
from tests.support.ports import free_port
from tests.support.processes import running_proxy
from tests.support.proxy import proxy_config_dict
from tests.support.timing import wait_for

pytestmark = pytest.mark.timeout(60)

ALICE_HASH = bcrypt.hashpw(b"wonderland", bcrypt.gensalt(4)).decode()
BOB_HASH = bcrypt.hashpw("pässwörd".encode(), bcrypt.gensalt(4)).decode()
CHALLENGE = 'Basic realm="staff", charset="UTF-8"'


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def htpasswd(*args: str) -> str:
    """One entry from Debian's htpasswd (-n: print, -b: password on the command line)."""
    if shutil.which("htpasswd") is None:
        pytest.skip("htpasswd not installed (apt-get install apache2-utils; scripts/test does it)")
    return subprocess.run(["htpasswd", "-n", "-b", *args], check=True, capture_output=True, text=True,
                          timeout=30).stdout.strip()


class CheckpwRecorder:
    """bcrypt.checkpw as the proxy calls it, with each call's hash and thread recorded."""

    def __init__(self):
        self.calls: list[tuple[bytes, str]] = []
        self._real = bcrypt.checkpw

    def __call__(self, password: bytes, hashed: bytes) -> bool:
        self.calls.append((hashed, threading.current_thread().name))
        return self._real(password, hashed)


@pytest.fixture
def checkpw(monkeypatch) -> CheckpwRecorder:
    recorder = CheckpwRecorder()
    monkeypatch.setattr(basic_auth_module.bcrypt, "checkpw", recorder)
    return recorder


# -- the check alone ------------------------------------------------------------------------------------

def auth(**config) -> BasicAuth:
    return BasicAuth(BasicAuthConfig(**{"realm": "staff", "users": (("alice", ALICE_HASH), ("bob", BOB_HASH)), **config}))


@pytest.mark.parametrize("value, expected", [
    (basic("alice", "wonderland"), ("alice", b"wonderland")),
    ("basic " + base64.b64encode(b"alice:a:b").decode(), ("alice", b"a:b")),  # the first colon ends the user
    ("Basic " + base64.b64encode(b"alice:").decode(), ("alice", b"")),
    ("Bearer abc", None),
    ("Basic not*base64", None),
    ("Basic " + base64.b64encode(b"no colon").decode(), None),
    ("Basic", None),
])
def test_credentials_are_read_from_the_authorization_header(value, expected):
    assert parse_credentials(value) == expected


def test_the_right_password_signs_in_and_a_utf8_one_too(checkpw):
    checker = auth()
    assert checker.check([basic("alice", "wonderland")]) == "alice"
    assert checker.check([basic("bob", "pässwörd")]) == "bob"


@pytest.mark.parametrize("header", [
    [], ["Bearer x"], [basic("alice", "wrong")], [basic("mallory", "wonderland")],
    [basic("alice", "wonderland"), basic("alice", "wonderland")],  # two Authorization fields
    ["Basic " + base64.b64encode(b"\xff\xfe:wonderland").decode()],  # a user name that is not UTF-8
])
def test_anything_else_is_401_with_the_challenge(header):
    with pytest.raises(Unauthorized) as refused:
        auth().check(header)
    assert refused.value.status == 401
    assert refused.value.headers == (("WWW-Authenticate", CHALLENGE),)


def test_an_unknown_user_costs_a_bcrypt_check_at_the_users_cost(checkpw):
    with pytest.raises(Unauthorized) as refused:
        auth().check([basic("mallory", "guess")], "192.0.2.7")
    (hashed, _), = checkpw.calls
    assert hashed not in (ALICE_HASH.encode(), BOB_HASH.encode())
    assert hashed.startswith(b"$2b$04$")  # the same cost as the real users', so the same time
    assert refused.value.log_detail == "unknown user 'mallory' from 192.0.2.7"


def test_a_wrong_password_is_checked_and_logged_by_user(checkpw):
    with pytest.raises(Unauthorized) as refused:
        auth().check([basic("alice", "guess")], "192.0.2.7")
    assert [hashed for hashed, _ in checkpw.calls] == [ALICE_HASH.encode()]
    assert refused.value.log_detail == "wrong password for user 'alice' from 192.0.2.7"


def test_no_credentials_is_not_logged():
    with pytest.raises(Unauthorized) as refused:
        auth().check([])
    assert refused.value.log_detail == ""


def test_a_recent_success_is_not_checked_again_but_a_wrong_password_still_is(checkpw):
    checker = auth()
    for _ in range(3):
        assert checker.check([basic("alice", "wonderland")]) == "alice"
    assert len(checkpw.calls) == 1
    with pytest.raises(Unauthorized):
        checker.check([basic("alice", "wonderland!")])
    assert len(checkpw.calls) == 2


def test_the_cache_of_recent_successes_is_bounded(monkeypatch, checkpw):
    monkeypatch.setattr(basic_auth_module, "RECENT_LIMIT", 2)
    checker = BasicAuth(BasicAuthConfig(users=tuple((f"u{n}", ALICE_HASH) for n in range(5))))
    for n in range(5):
        checker.check([basic(f"u{n}", "wonderland")])
    assert len(checker._recent) == 2
    checker.check([basic("u0", "wonderland")])  # the oldest was dropped: checked again
    assert len(checkpw.calls) == 6


def test_a_password_longer_than_bcrypt_reads_is_cut_as_htpasswd_cuts_it():
    long_password = "x" * 80
    entry = htpasswd("-B", "-C", "4", "carol", long_password)
    checker = BasicAuth(BasicAuthConfig(users=(tuple(entry.split(":", 1)),)))
    assert checker.check([basic("carol", long_password)]) == "carol"


# -- the config -----------------------------------------------------------------------------------------

def route_config(basic_auth) -> dict:
    return proxy_config_dict({"web": ["127.0.0.1:9"]}, routes=[{"path": "/", "upstream": "web", "basic_auth": basic_auth}])


def problems_of(basic_auth, base_dir=None) -> list[str]:
    with pytest.raises(ConfigError) as error:
        parse_config(route_config(basic_auth), "proxy.toml", base_dir=base_dir)
    return error.value.problems


def test_inline_users_are_read_with_safe_defaults():
    route = parse_config(route_config({"users": {"alice": ALICE_HASH}}), "proxy.toml").routes[0]
    assert route.basic_auth == BasicAuthConfig(realm="restricted", users=(("alice", ALICE_HASH),),
                                               forward_auth_header=False)


def test_a_users_file_is_read_relative_to_the_config(tmp_path):
    alice = htpasswd("-B", "-C", "4", "alice", "wonderland")
    bob = htpasswd("-B", "-C", "4", "bob", "builder")
    (tmp_path / "users.htpasswd").write_text(f"# staff\n{alice}\n\n{bob}\n")
    (tmp_path / "proxy.toml").write_text(
        '[[routes]]\npath = "/"\nupstream = "web"\n'
        'basic_auth = { realm = "staff", users_file = "users.htpasswd", forward_auth_header = true }\n'
        '[upstreams.web]\nservers = ["127.0.0.1:9"]\n')
    config = load_config(tmp_path / "proxy.toml")
    users = config.routes[0].basic_auth.users
    assert [name for name, _ in users] == ["alice", "bob"]
    assert BasicAuth(config.routes[0].basic_auth).check([basic("bob", "builder")]) == "bob"
    assert '       basic auth: realm "staff", 2 users; Authorization forwarded' in routing_table_lines(config)


def test_a_users_file_saved_with_a_byte_order_mark_keeps_its_first_user(tmp_path):
    """Notepad's "UTF-8 with BOM": the mark is not part of the first name (it made that user unable to
    sign in, with nothing said)."""
    alice = htpasswd("-B", "-C", "4", "alice", "wonderland")
    (tmp_path / "users.htpasswd").write_bytes(b"\xef\xbb\xbf" + f"{alice}\r\n".encode())
    (tmp_path / "proxy.toml").write_text(
        '[[routes]]\npath = "/"\nupstream = "web"\nbasic_auth = { users_file = "users.htpasswd" }\n'
        '[upstreams.web]\nservers = ["127.0.0.1:9"]\n')
    config = load_config(tmp_path / "proxy.toml")
    assert [name for name, _ in config.routes[0].basic_auth.users] == ["alice"]
    assert BasicAuth(config.routes[0].basic_auth).check([basic("alice", "wonderland")]) == "alice"


def test_entries_that_are_not_bcrypt_are_named_by_line(tmp_path):
    lines = [htpasswd("-B", "-C", "4", "alice", "a"), htpasswd("-m", "bob", "b"), "# a comment",
             htpasswd("-s", "carol", "c"), htpasswd("-p", "dave", "d"), "no-colon-here",
             htpasswd("-B", "-C", "4", "alice", "again")]
    users_file = tmp_path / "users.htpasswd"
    users_file.write_text("\n".join(lines) + "\n")
    problems = problems_of({"users_file": "users.htpasswd"}, base_dir=tmp_path)
    where = f"proxy.toml: routes[0].basic_auth.users_file: {users_file}: "
    assert problems == [
        where + 'line 2 (user "bob"): an MD5 ($apr1$) hash; only bcrypt hashes are accepted '
                "(make one with: pyproxy hash-password, or htpasswd -B)",
        where + 'line 4 (user "carol"): a SHA-1 ({SHA}) hash; only bcrypt hashes are accepted '
                "(make one with: pyproxy hash-password, or htpasswd -B)",
        where + 'line 5 (user "dave"): not a hash (plain text or crypt); only bcrypt hashes are accepted '
                "(make one with: pyproxy hash-password, or htpasswd -B)",
        where + 'line 6: expected "user:hash"',
        where + 'line 7: user "alice" is already on line 1',
    ]


def test_a_users_file_that_is_not_one_gives_a_few_lines_not_one_per_line(tmp_path):
    # users_file = "access.log" by mistake: a problem for each of its lines would bury the others.
    users_file = tmp_path / "access.log"
    users_file.write_text("".join(f'10.0.0.{n % 250} - - "GET /{n} HTTP/1.1" 200\n' for n in range(5000)))
    problems = problems_of({"users_file": "access.log"}, base_dir=tmp_path)
    where = f"proxy.toml: routes[0].basic_auth.users_file: {users_file}: "
    assert len(problems) == 11
    assert problems[0] == where + 'line 1: expected "user:hash"'
    assert problems[-1] == where + "4990 more problems (is it an htpasswd file?)"


def test_a_users_file_larger_than_any_htpasswd_file_is_not_read(tmp_path):
    # A disk image or a huge log named by mistake must not be read into memory whole, on every reload.
    users_file = tmp_path / "users.htpasswd"
    with open(users_file, "wb") as file:
        file.truncate(16 * 1024 ** 2 + 1)   # sparse: no disk space taken
    problems = problems_of({"users_file": "users.htpasswd"}, base_dir=tmp_path)
    assert problems == [f"proxy.toml: routes[0].basic_auth.users_file: {users_file}: "
                        "larger than 16MiB: not an htpasswd file"]


@pytest.mark.parametrize("basic_auth, expected", [
    ({"users": {"alice": "wonderland"}},
     "proxy.toml: routes[0].basic_auth.users.alice: not a hash (plain text or crypt); only bcrypt"),
    ({"users": {"alice": ALICE_HASH[:-1]}}, "proxy.toml: routes[0].basic_auth.users.alice: a malformed bcrypt hash"),
    ({"users": {"a:b": ALICE_HASH}}, 'proxy.toml: routes[0].basic_auth.users."a:b": user name "a:b" contains \':\''),
    ({"users": {}}, "proxy.toml: routes[0].basic_auth.users: no users: nobody could sign in"),
    ({"realm": "st\"aff", "users": {"alice": ALICE_HASH}},
     "proxy.toml: routes[0].basic_auth.realm: \"st\\\"aff\" must be printable ASCII without a quote or a backslash"),
    ({"realm": "staff"}, 'proxy.toml: routes[0].basic_auth: missing "users"'),
    ({"users": {"alice": ALICE_HASH}, "users_file": "x"}, "proxy.toml: routes[0].basic_auth: give users or users_file, not both"),
    ({"users_file": "missing.htpasswd"}, 'proxy.toml: routes[0].basic_auth.users_file: "missing.htpasswd" does not exist'),
    ({"users": {"alice": ALICE_HASH}, "forward_auth_header": "yes"},
     "proxy.toml: routes[0].basic_auth.forward_auth_header: expected true or false"),
    ({"users": {"alice": ALICE_HASH}, "relm": "x"}, "proxy.toml: routes[0].basic_auth.relm: unknown key (did you mean 'realm'?)"),
    ("alice", "proxy.toml: routes[0].basic_auth: expected a table"),
])
def test_a_bad_basic_auth_table_names_the_key_and_the_problem(tmp_path, basic_auth, expected):
    problems = problems_of(basic_auth, base_dir=tmp_path)
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_an_empty_users_file_is_an_error(tmp_path):
    (tmp_path / "users.htpasswd").write_text("# nobody yet\n")
    problems = problems_of({"users_file": "users.htpasswd"}, base_dir=tmp_path)
    assert problems == [f"proxy.toml: routes[0].basic_auth.users_file: {tmp_path / 'users.htpasswd'} has no "
                        "users: nobody could sign in"]


def test_pyproxy_check_reports_the_line(tmp_path):
    (tmp_path / "users.htpasswd").write_text(htpasswd("-m", "bob", "b") + "\n")
    (tmp_path / "proxy.toml").write_text(
        '[[routes]]\npath = "/"\nupstream = "web"\nbasic_auth = { users_file = "users.htpasswd" }\n'
        '[upstreams.web]\nservers = ["127.0.0.1:9"]\n')
    result = CliRunner().invoke(cli.main, ["check", str(tmp_path / "proxy.toml")])
    assert result.exit_code == 1
    assert 'routes[0].basic_auth.users_file: ' in result.output
    assert 'users.htpasswd: line 1 (user "bob"): an MD5 ($apr1$) hash' in result.output
    assert "Traceback" not in result.output


# -- through the proxy ----------------------------------------------------------------------------------

def request(proxy, target: str = "/admin", headers: str = "", method: str = "GET"):
    with raw_client(proxy) as client:
        client.send(f"{method} {target} HTTP/1.1\r\nHost: a\r\n{headers}Connection: close\r\n\r\n".encode("latin-1"))
        return client.read_response(method)


def protected_proxy(make_backend, make_proxy, **options):
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]}, routes=[
        {"path": "/", "upstream": "web"},
        {"path": "/admin", "upstream": "web",
         "basic_auth": {"realm": "staff", "users": {"alice": ALICE_HASH}, **options}},
    ])
    return backend, proxy


def test_without_credentials_the_answer_is_401_with_the_challenge(make_backend, make_proxy):
    backend, proxy = protected_proxy(make_backend, make_proxy)
    refused = request(proxy)
    assert refused.status == 401
    assert refused.header("WWW-Authenticate") == CHALLENGE
    assert refused.body == b"401 authentication required\n"
    head_only = request(proxy, method="HEAD")
    assert (head_only.status, head_only.body) == (401, b"")
    assert head_only.header("WWW-Authenticate") == CHALLENGE
    assert backend.requests == []
    assert request(proxy, "/public").status == 200  # other routes are open


def test_the_right_credentials_pass_and_the_header_stops_at_the_proxy(make_backend, make_proxy, checkpw):
    backend, proxy = protected_proxy(make_backend, make_proxy)
    assert request(proxy, "/admin/x", f"Authorization: {basic('alice', 'wonderland')}\r\n").status == 200
    assert backend.last.path == "/admin/x"
    assert backend.last.header("Authorization") is None
    # bcrypt ran on a pool worker, not on the accept loop
    (_, thread_name), = checkpw.calls
    assert thread_name.startswith("pyproxy-worker"), thread_name


def test_forward_auth_header_passes_the_credentials_on(make_backend, make_proxy):
    backend, proxy = protected_proxy(make_backend, make_proxy, forward_auth_header=True)
    credentials = basic("alice", "wonderland")
    assert request(proxy, "/admin", f"Authorization: {credentials}\r\n").status == 200
    assert backend.last.header("Authorization") == credentials


def test_a_wrong_password_is_401_and_logged(make_backend, make_proxy, caplog):
    backend, proxy = protected_proxy(make_backend, make_proxy)
    with caplog.at_level(logging.INFO, logger="pyproxy.handler"):
        refused = request(proxy, "/admin", f"Authorization: {basic('alice', 'nope')}\r\n")
    assert refused.status == 401 and refused.header("WWW-Authenticate") == CHALLENGE
    assert backend.requests == []
    assert "GET /admin -> 401: wrong password for user 'alice' from 127.0.0.1" in caplog.text


def test_behind_a_trusted_proxy_the_log_names_the_original_client(make_backend, make_proxy, caplog):
    """Behind a load balancer every failed sign-in came from the balancer: a fail2ban-style watcher of
    the log would ban it, and everyone with it. The client it forwarded for is named, as for 403s."""
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]}, server={"trusted_proxies": ["127.0.0.1"]}, routes=[
        {"path": "/admin", "upstream": "web", "basic_auth": {"realm": "staff", "users": {"alice": ALICE_HASH}}}])
    with caplog.at_level(logging.INFO, logger="pyproxy.handler"):
        refused = request(proxy, "/admin", f"X-Forwarded-For: 203.0.113.9\r\nAuthorization: {basic('alice', 'nope')}\r\n")
    assert refused.status == 401
    assert "GET /admin -> 401: wrong password for user 'alice' from 203.0.113.9" in caplog.text


def test_a_401_keeps_the_connection_for_the_signed_in_retry(make_backend, make_proxy):
    backend, proxy = protected_proxy(make_backend, make_proxy)
    with raw_client(proxy) as client:
        client.send(b"GET /admin HTTP/1.1\r\nHost: a\r\n\r\n")
        assert client.read_response().status == 401
        client.send(f"GET /admin HTTP/1.1\r\nHost: a\r\nAuthorization: {basic('alice', 'wonderland')}\r\n"
                    "Connection: close\r\n\r\n".encode())
        assert client.read_response().status == 200


def test_a_denied_client_never_costs_a_bcrypt_check(make_backend, make_proxy, checkpw):
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]}, routes=[
        {"path": "/", "upstream": "web", "deny": ["127.0.0.1"], "basic_auth": {"users": {"alice": ALICE_HASH}}},
    ])
    assert request(proxy, "/", f"Authorization: {basic('alice', 'wonderland')}\r\n").status == 403
    assert checkpw.calls == []


def test_sighup_rereads_the_users_file(tmp_path):
    users_file = tmp_path / "users.htpasswd"
    users_file.write_text(htpasswd("-B", "-C", "4", "alice", "old") + "\n")
    with named_backends("a") as (a,):
        port = free_port()
        text = (f'[server]\nlisten = "127.0.0.1:{port}"\nmin_threads = 2\n[log]\nlevel = "info"\naccess = "off"\n'
                f'[[routes]]\npath = "/"\nupstream = "app"\n'
                f'[[routes]]\npath = "/admin"\nupstream = "app"\nbasic_auth = {{ users_file = "users.htpasswd" }}\n'
                f'[upstreams.app]\nservers = ["{a.address}"]\n')
        with running_proxy(tmp_path, text) as run:
            url = f"{run.url}/admin"
            assert status_of(url, "alice", "old") == 200
            users_file.write_text(htpasswd("-B", "-C", "4", "alice", "new") + "\n")
            run.signal(signal.SIGHUP)
            wait_for(lambda: "config reloaded" in run.log(), what="the reload", on_timeout=run.log)
            assert status_of(url, "alice", "old") == 401
            assert status_of(url, "alice", "new") == 200

            users_file.write_text(htpasswd("-m", "alice", "md5") + "\n")  # invalid: the old config stays
            run.signal(signal.SIGHUP)
            wait_for(lambda: "an MD5 ($apr1$) hash" in run.log(), what="the refused reload", on_timeout=run.log)
            assert status_of(url, "alice", "new") == 200


def status_of(url: str, user: str, password: str) -> int:
    return requests.get(url, auth=(user, password), timeout=10).status_code


# -- pyproxy hash-password ----------------------------------------------------------------------------

def test_hash_password_reads_a_line_from_stdin():
    result = CliRunner().invoke(cli.main, ["hash-password", "--cost", "4"], input="pässwörd\r\n")
    assert result.exit_code == 0, result.output
    hashed = result.output.strip()
    assert hashed.startswith("$2b$04$")
    assert bcrypt.checkpw("pässwörd".encode(), hashed.encode())


@pytest.mark.parametrize("given, message", [
    ("\n", "pyproxy: the password is empty"),
    ("", "pyproxy: the password is empty"),
    ("x" * 73 + "\n", "pyproxy: the password is 73 bytes long; bcrypt reads only the first 72"),
])
def test_hash_password_refuses_what_bcrypt_cannot_take_whole(given, message):
    result = CliRunner().invoke(cli.main, ["hash-password", "--cost", "4"], input=given)
    assert result.exit_code == 1
    assert message in result.output


def test_hash_password_on_a_terminal_asks_twice_without_echo(monkeypatch):
    answers = iter(["secret", "secret", "secret", "other"])
    prompts = []
    monkeypatch.setattr(cli.sys.stdin, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(cli.getpass, "getpass", lambda prompt: prompts.append(prompt) or next(answers))
    password = cli.read_password()
    assert password == b"secret" and prompts == ["Password: ", "Again: "]
    with pytest.raises(SystemExit) as exited:
        cli.read_password()
    assert exited.value.code == 1


def test_hash_password_makes_hashes_the_config_takes():
    hashed = hash_password(b"wonderland", cost=4)
    route = parse_config(route_config({"users": {"alice": hashed}}), "proxy.toml").routes[0]
    assert BasicAuth(route.basic_auth).check([basic("alice", "wonderland")]) == "alice"
