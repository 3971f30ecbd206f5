"""A real DNS server for the discovery tests: dnsmasq on 127.0.0.1, answering from a hosts file the
test rewrites (dnsmasq re-reads it on SIGHUP) and from --srv-host records fixed at start.

``Dnsmasq.set_hosts`` returns once dnsmasq answers with the new records (polled with dnspython, bounded),
so a test never races the reload. ``backends_on_loopback`` starts NamedBackends on 127.0.0.2, .3, ...
all on one port, as the instances behind one DNS name would be.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import threading
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest

from tests.support.backends import NamedBackend
from tests.support.ports import free_port
from tests.support.timing import wait_for

DNSMASQ = "/usr/sbin/dnsmasq"
DOMAIN = "svc.test"   # names under it are answered locally only: unknown ones get NXDOMAIN
START_TIMEOUT = 10.0


def dnsmasq_or_skip() -> str:
    path = DNSMASQ if os.path.exists(DNSMASQ) else shutil.which("dnsmasq")
    if not path:
        pytest.skip("dnsmasq is not installed (apt-get install dnsmasq-base)")
    return path


class Dnsmasq:
    def __init__(self, directory: Path, srv_records: tuple[str, ...] = ()):
        """``srv_records``: dnsmasq --srv-host values, "_http._tcp.api.svc.test,api1.svc.test,8080,10,5"."""
        self.binary = dnsmasq_or_skip()
        directory.mkdir(parents=True, exist_ok=True)
        self.hosts_file = directory / "hosts"
        self.log_file = directory / "dnsmasq.log"
        self.hosts_file.write_text("")
        self.port = free_port()
        self.srv_records = srv_records
        self.process: subprocess.Popen | None = None

    @property
    def resolver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "Dnsmasq":
        command = [self.binary, "--no-daemon", "--no-resolv", "--no-hosts", f"--port={self.port}",
                   "--listen-address=127.0.0.1", "--bind-interfaces", f"--addn-hosts={self.hosts_file}",
                   "--local-ttl=1", f"--local=/{DOMAIN}/", "--log-queries", f"--log-facility={self.log_file}",
                   "--pid-file=", "--user=" + _user(), "--cache-size=0"]
        command += [f"--srv-host={record}" for record in self.srv_records]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(lambda: self.process.poll() is not None or self.rcode(f"ready.{DOMAIN}") is not None,
                 timeout=START_TIMEOUT, what="dnsmasq to answer")
        if self.process.poll() is not None:
            raise RuntimeError(f"dnsmasq failed: {self.process.stderr.read().decode(errors='replace')}")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # if paused
            self.process.terminate()
            self.process.wait(timeout=10)

    def pause(self) -> None:
        """Stop answering (SIGSTOP): lookups time out, as with a name server that is down."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def set_hosts(self, records: dict[str, list[str]]) -> None:
        """Replace the A/AAAA records (name -> addresses) and wait until dnsmasq serves them."""
        lines = [f"{address} {name}" for name, addresses in records.items() for address in addresses]
        self.hosts_file.write_text("\n".join(lines) + "\n")
        self.process.send_signal(signal.SIGHUP)
        for name, addresses in records.items():
            wait_for(lambda: sorted(self.addresses(name)) == sorted(a for a in addresses if ":" not in a),
                     timeout=START_TIMEOUT, what=f"dnsmasq to serve {name} -> {addresses}")

    def clear(self, name: str) -> None:
        self.hosts_file.write_text("")
        self.process.send_signal(signal.SIGHUP)
        wait_for(lambda: self.rcode(name) == dns.rcode.NXDOMAIN, timeout=START_TIMEOUT, what=f"{name} gone")

    def _ask(self, name: str, kind: str = "A"):
        try:
            return dns.query.udp(dns.message.make_query(name, kind), "127.0.0.1", timeout=0.5, port=self.port)
        except (dns.exception.Timeout, OSError):
            return None

    def rcode(self, name: str):
        answer = self._ask(name)
        return None if answer is None else answer.rcode()

    def addresses(self, name: str) -> list[str]:
        answer = self._ask(name)
        if answer is None:
            return []
        return [record.address for rrset in answer.answer for record in rrset if hasattr(record, "address")]

    def queries(self, name: str) -> int:
        """How many queries for ``name`` dnsmasq has logged (--log-queries)."""
        if not self.log_file.exists():
            return 0
        return sum(1 for line in self.log_file.read_text(errors="replace").splitlines()
                   if "query[" in line and f" {name} from" in line)


def _user() -> str:
    """dnsmasq drops privileges to this user when started as root; stay who we are otherwise."""
    return pwd.getpwuid(os.getuid()).pw_name


@contextlib.contextmanager
def running_dnsmasq(directory: Path, srv_records: tuple[str, ...] = ()):
    server = Dnsmasq(directory, srv_records).start()
    try:
        yield server
    finally:
        server.stop()


def common_port(hosts: list[str]) -> int:
    """A port free on every one of ``hosts`` (loopback addresses)."""
    for _ in range(50):
        port = free_port()
        try:
            for host in hosts:
                with socket.socket() as sock:
                    sock.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no port free on all of {hosts}")


@contextlib.contextmanager
def backends_on_loopback(hosts: list[str], port: int | None = None):
    """A NamedBackend (named after its address) on each host, all on one port: {host: backend}."""
    port = port or common_port(hosts)
    started: dict[str, NamedBackend] = {}
    try:
        for host in hosts:
            started[host] = NamedBackend(host, host=host, port=port)
        yield started
    finally:
        for backend in started.values():
            backend.stop()


def _incoming_queries(sock: socket.socket):
    """(query, peer) for each datagram a test name server receives, until its socket is closed."""
    while True:
        try:
            data, peer = sock.recvfrom(4096)
        except OSError:  # closed
            return
        yield dns.message.from_wire(data), peer


def _add_answer(response: dns.message.Message, question, rdtype, texts: list[str]) -> None:
    """Records of ``rdtype`` for the question's name, TTL 1, one per text."""
    rrset = response.find_rrset(response.answer, question.name, dns.rdataclass.IN, rdtype, create=True)
    rrset.update_ttl(1)
    for text in texts:
        rrset.add(dns.rdata.from_text(dns.rdataclass.IN, rdtype, text))


class SrvOnlyServer:
    """A name server on 127.0.0.1 that answers SRV queries with ``targets`` (port 8080 each) and never
    answers A or AAAA queries, as a zone whose server hangs would; it records the names asked for."""

    def __init__(self, targets: list[str]):
        self.targets = targets
        self.address_queries: list[str] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        for query, peer in _incoming_queries(self.sock):
            question = query.question[0]
            if question.rdtype != dns.rdatatype.SRV:
                self.address_queries.append(question.name.to_text(omit_final_dot=True))
                continue
            response = dns.message.make_response(query)
            _add_answer(response, question, dns.rdatatype.SRV, [f"10 1 8080 {target}." for target in self.targets])
            self.sock.sendto(response.to_wire(), peer)

    def close(self) -> None:
        self.sock.close()


class HeldDnsServer:
    """A name server on 127.0.0.1 answering A queries from ``records`` (name -> addresses, TTL 1; AAAA
    has none; other names NXDOMAIN) that can hold its A answers: between ``hold()`` and ``release()``
    a lookup stays in flight, so a test can reload the proxy meanwhile. ``queries``: the names whose A
    records were asked, one per lookup (a lookup asks for A, then AAAA)."""

    def __init__(self, records: dict[str, list[str]], truncate: bool = False):
        """``truncate``: every answer has the TC flag (too big for UDP) and nothing listens on TCP."""
        self.records = dict(records)
        self.truncate = truncate
        self.queries: list[str] = []
        self.held = threading.Event()  # an A query is being held
        self._holding = False
        self._waiting: list[tuple[dns.message.Message, tuple]] = []
        self._lock = threading.Lock()
        self.sock, self._tcp = self._bind(truncate)
        self.port = self.sock.getsockname()[1]
        self.resolver = f"127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @staticmethod
    def _bind(truncate: bool) -> tuple[socket.socket, socket.socket | None]:
        """The UDP socket; with ``truncate``, a TCP socket bound (not listening) on its port too, so a
        resolver's TCP retry is refused rather than reaching some other service on that port."""
        for _ in range(50):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind(("127.0.0.1", 0))
            if not truncate:
                return udp, None
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                tcp.bind(("127.0.0.1", udp.getsockname()[1]))
                return udp, tcp
            except OSError:
                udp.close()
                tcp.close()
        raise RuntimeError("no port free for both UDP and TCP")

    def hold(self) -> None:
        with self._lock:
            self._holding = True
            self.held.clear()

    def release(self) -> None:
        with self._lock:
            self._holding = False
            waiting, self._waiting = self._waiting, []
        for query, peer in waiting:
            self._answer(query, peer)

    def asked(self, name: str) -> int:
        with self._lock:
            return self.queries.count(name)

    def _serve(self) -> None:
        for query, peer in _incoming_queries(self.sock):
            question = query.question[0]
            with self._lock:
                if question.rdtype == dns.rdatatype.A:
                    self.queries.append(question.name.to_text(omit_final_dot=True))
                if self._holding and question.rdtype == dns.rdatatype.A:
                    self._waiting.append((query, peer))
                    self.held.set()
                    continue
            self._answer(query, peer)

    def _answer(self, query: dns.message.Message, peer: tuple) -> None:
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True)
        response = dns.message.make_response(query)
        if self.truncate:
            response.flags |= dns.flags.TC
        elif name not in self.records:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif question.rdtype == dns.rdatatype.A:
            _add_answer(response, question, dns.rdatatype.A, self.records[name])
        try:
            self.sock.sendto(response.to_wire(), peer)
        except OSError:  # closed meanwhile
            pass

    def close(self) -> None:
        self.sock.close()
        if self._tcp is not None:
            self._tcp.close()
