"""The admin listener: GET / (the dashboard), /healthz, /status (JSON), /metrics (Prometheus text).

It runs on its own socket and its own threads (``http.server.ThreadingHTTPServer``), apart from the
proxy's accept loop and worker pool, so an admin request never waits behind proxied traffic, and
never passes through the proxy's observers (it is not counted or access-logged as traffic). It
holds at most MAX_ADMIN_CONNECTIONS connections (one thread each), closes those left waiting for a
request, and makes room for a new one by closing the one waiting longest.

The admin listener defaults to loopback (127.0.0.1:9901). Reads need no authentication: exposing it
on another interface is the operator's choice, and /status shows the backend addresses.

The runtime API (proxy/observe/runtime_api.py) adds ``GET /upstreams[/NAME]`` and the writes
``POST /upstreams/NAME/servers/ADDRESS/drain|disable|enable``, which need ``[admin] token`` sent as
``Authorization: Bearer TOKEN``.

``AdminSources`` holds *lists* of callables producing status / metrics snapshots: one per process.
A single process passes its own; a supervisor passes one per worker and the answers are merged.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

from core.socket_server import bind_listener
from proxy.config.units import format_address
from proxy.observe.access_log import make_access_log
from proxy.config.schema import ListenConfig
from proxy.http.proxy_protocol import ThrottledLog
from proxy.upstream.health import HealthChecker
from proxy.observe.log_reload import LogSwitch
from proxy.observe.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, Metrics, merge, render_prometheus
from proxy.observe.runtime_api import ApiAnswer, RuntimeApi
from proxy.observe.status import build_status, merge_status

log = logging.getLogger("pyproxy.admin")

STOP_TIMEOUT = 5.0
ADMIN_REQUEST_TIMEOUT = 10.0  # a stuck admin client holds one admin thread this long at most
# At most this many admin connections, each on its own thread: a client leaking connections cannot
# start a thread per connection. Past it, the connection waiting longest for a request is closed to
# make room, so a health probe still gets its answer.
MAX_ADMIN_CONNECTIONS = 32
ADMIN_IDLE_TIMEOUT = 10.0  # a connection waiting this long for (the rest of) a request head is closed
_BUSY_BODY = b"503 admin listener busy\n"
BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))
MAX_DROPPED_BODY = 64 * 1024  # a request body (never used) up to this is read and dropped; past it, close
MAX_API_BODY = 64 * 1024  # a runtime API write's JSON body; past it, 413 and close
PATHS = ("/", "/healthz", "/status", "/metrics", "/upstreams")
# One self-contained page (inline CSS and JS, no CDN): it must work offline and polls /status itself.
DASHBOARD_PATH = Path(__file__).parent / "static" / "dashboard.html"


class SourceFailed(RuntimeError):
    """No process answered for a status or metrics snapshot."""


@dataclass
class AdminSources:
    """Where the admin answers come from."""

    status: list[Callable[[], dict]] = field(default_factory=list)
    metrics: list[Callable[[], dict]] = field(default_factory=list)
    draining: Callable[[], bool] = lambda: False
    serving: Callable[[], bool] = lambda: True  # False while no process serves traffic (no worker ready)
    # The runtime API: the configured token (None: writes are refused), and the write itself:
    # (upstream, address, state) -> the state it had, raising LookupError for an unknown one.
    token: Callable[[], str | None] = lambda: None
    set_server_state: Callable[[str, str, str], str] | None = None

    def status_document(self) -> dict:
        return merge_status(_collect(self.status, "status"))

    def metrics_text(self) -> str:
        return render_prometheus(merge(_collect(self.metrics, "metrics")))


def _collect(sources: list[Callable[[], dict]], what: str) -> list[dict]:
    """Call every source; one failing (say, a worker restarting) is logged and left out."""
    results = []
    for source in sources:
        try:
            results.append(source())
        except Exception:  # a broken source must not take the whole admin answer down
            log.exception("%s source %r failed", what, source)
    if sources and not results:
        raise SourceFailed(f"no {what} source answered")
    return results


class _AdminHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = ADMIN_REQUEST_TIMEOUT  # each read or write; the server bounds the wait for a whole head

    def version_string(self) -> str:
        """The Server header: the product's name alone. http.server's default adds the Python version,
        which tells a scanner what to aim at."""
        return "pyproxy"

    def handle_one_request(self) -> None:
        super().handle_one_request()
        self.server.mark_waiting(self.connection)  # answered: waiting for a next request (keep-alive)

    def parse_request(self) -> bool:
        """A target in absolute form ("http://host:9901/status", from a client behind a forward proxy)
        must be accepted (RFC 9112, 3.2.2): the endpoint is its path."""
        if not super().parse_request():
            return False
        scheme, _, rest = self.path.partition("://")
        if rest and scheme.lower() in ("http", "https"):
            path = rest[len(rest.split("/", 1)[0].split("?", 1)[0]):]  # past the authority
            self.path = path if path.startswith("/") else "/" + path
        return True

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._answer(head_only=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(head_only=True)

    def _answer(self, head_only: bool) -> None:
        self.server.mark_busy(self.connection)
        sources: AdminSources = self.server.sources
        path = self.path.split("?", 1)[0]
        try:
            if RuntimeApi.handles(path):
                self._send_api(RuntimeApi(sources).get(path), head_only)
            elif path == "/":
                # Read per request (a few kB, rare): an installed or edited page shows without a restart.
                self._send(200, DASHBOARD_PATH.read_text(encoding="utf-8"), "text/html", head_only)
            elif path == "/healthz":
                if sources.draining():
                    self._send(503, "draining\n", "text/plain", head_only)
                elif not sources.serving():  # every worker dead or starting: a load balancer must look elsewhere
                    self._send(503, "no worker serving\n", "text/plain", head_only)
                else:
                    self._send(200, "ok\n", "text/plain", head_only)
            elif path == "/status":
                body = json.dumps(sources.status_document(), indent=2, sort_keys=True) + "\n"
                self._send(200, body, "application/json", head_only)
            elif path == "/metrics":
                self._send(200, sources.metrics_text(), METRICS_CONTENT_TYPE, head_only)
            else:
                self._send(404, f"404 not found; try {', '.join(PATHS)}\n", "text/plain", head_only)
        except SourceFailed as exc:
            if RuntimeApi.handles(path):  # the API answers JSON, errors too
                self._send_api(ApiAnswer(503, {"error": str(exc)}), head_only)
            else:
                self._send(503, f"503 {exc}\n", "text/plain", head_only)

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        if not RuntimeApi.handles(path):
            self._not_allowed()
            return
        self.server.mark_busy(self.connection)
        api = RuntimeApi(self.server.sources, self.server.refusals)
        body = self._read_api_body()
        answer = body if isinstance(body, ApiAnswer) else api.post(
            path, self.headers.get("Authorization"), body, peer=format_address(*self.client_address[:2]))
        self._send_api(answer, head_only=False)

    def _not_allowed(self) -> None:
        self.server.mark_busy(self.connection)
        path = self.path.split("?", 1)[0]
        if RuntimeApi.handles(path):
            self._send_api(RuntimeApi.not_allowed(path, self.command), head_only=False)
            return
        self._send(405, "405 method not allowed\n", "text/plain", False, extra={"Allow": "GET, HEAD"})

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _not_allowed

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (an unknown method, a header line too long) come before any do_*
        method: on an API path they are JSON too. ``command`` is empty or None while the request line did
        not parse (a URI too long, say), and ``path`` is then not this request's."""
        path = getattr(self, "path", "").split("?", 1)[0] if getattr(self, "command", None) else ""
        if not RuntimeApi.handles(path):
            if code == 501 and path:  # a method with no do_* (PURGE): the endpoints' 405, as for PUT
                self._not_allowed()
                return
            super().send_error(code, message, explain)
            return
        self.close_connection = True  # the request was not read as a whole
        phrase = self.responses.get(code, ("error",))[0]
        self._send_api(ApiAnswer(code, {"error": message or phrase}), head_only=self.command == "HEAD")

    def _read_api_body(self) -> "bytes | ApiAnswer":
        """A write's body (JSON, optional), bounded. Past the bound, or chunked, the answer is an error
        and the connection closes (the rest of the body is never read)."""
        if self.headers.get("Transfer-Encoding") is not None:
            self.close_connection = True
            return ApiAnswer(411, {"error": "send the body with a Content-Length (or no body)"})
        length = (self.headers.get("Content-Length") or "0").strip()
        if not _is_length(length):
            self.close_connection = True
            return ApiAnswer(400, {"error": "bad Content-Length"})
        if int(length) > MAX_API_BODY:
            self.close_connection = True
            return ApiAnswer(413, {"error": f"body too large (at most {MAX_API_BODY} bytes)"})
        try:
            body = self.rfile.read(int(length))
        except OSError:
            body = b""
        del self.headers["Content-Length"]  # read: _send must not try to drop it again
        if len(body) != int(length):
            self.close_connection = True
            return ApiAnswer(400, {"error": "body shorter than its Content-Length"})
        return body

    def _send_api(self, answer: ApiAnswer, head_only: bool) -> None:
        body = json.dumps(answer.document, indent=2, sort_keys=True) + "\n"
        self._send(answer.status, body, "application/json", head_only, extra=answer.headers)

    def _send(self, status: int, body: str, content_type: str, head_only: bool, extra=None) -> None:
        payload = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type if "charset" in content_type else f"{content_type}; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        if self.close_connection or not self._drop_body():
            self.close_connection = True
            self.send_header("Connection", "close")
        self.end_headers()
        if not head_only:
            self.wfile.write(payload)

    def _drop_body(self) -> bool:
        """No admin endpoint reads a body, but one left unread would be parsed as the next request on
        the connection (a POST's "hello" answered "501 Unsupported method ('helloGET')"). A small one
        is read and dropped; False when the connection must close instead (chunked, or too big)."""
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") is not None:
            return False
        if length is None:
            return True
        if not _is_length(length.strip()) or int(length) > MAX_DROPPED_BODY:
            return False
        try:
            return len(self.rfile.read(int(length))) == int(length)
        except OSError:  # timed out or gone: the connection is over either way
            return False

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
        if log.isEnabledFor(logging.DEBUG):
            # The request line is the client's: escape control characters (a terminal escape sequence
            # in a path), as http.server's own log_message does (gh-100001); this override skipped it.
            message = (format % args).translate(self._control_char_table)
            log.debug("admin %s: %s", self.address_string(), message)


def _is_length(text: str) -> bool:
    """ASCII digits only: str.isdigit() takes "²" too, which int() refuses (the handler raised)."""
    return text.isascii() and text.isdigit()


class _AdminHTTPServer(ThreadingHTTPServer):
    """http.server with a bounded number of connections (one thread each).

    Every open connection maps to the time it started waiting for a request head, or None while a
    request is being answered. A waiting connection is closed after ``idle_timeout`` (an idle
    keep-alive client, or one sending its head a byte at a time), and at ``max_connections`` the one
    waiting longest is closed to make room. When every connection is busy answering, a new one gets
    a 503 without a thread.
    """

    daemon_threads = True
    block_on_close = False  # stop() closes open connections instead of waiting for their threads
    allow_reuse_address = True

    def __init__(self, sock: socket.socket, sources: AdminSources, *, clock: Callable[[], float],
                 max_connections: int, idle_timeout: float):
        self.sources = sources
        self.clock = clock
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.refusals = ThrottledLog(log, clock=clock)  # runtime API writes refused for their token
        self.busy_refusals = ThrottledLog(log, clock=clock)  # a flood of 503s: a few lines, not one each
        super().__init__(sock.getsockname()[:2], _AdminHandler, bind_and_activate=False)
        self.socket.close()  # replace the unbound socket the base class made with ours
        self.socket = sock
        self.address_family = sock.family
        self._open: dict[socket.socket, float | None] = {}  # connection -> waiting since (None: busy)
        self._open_lock = threading.Lock()

    def process_request(self, request, client_address):
        with self._open_lock:
            if len(self._open) >= self.max_connections and not self._close_longest_waiting():
                self._refuse(request)
                return
            self._open[request] = self.clock()
        threading.Thread(target=self.process_request_thread, args=(request, client_address),
                         name="pyproxy-admin-connection", daemon=True).start()

    def _close_longest_waiting(self) -> bool:
        """Close the connection that has waited longest for a request; False if all are busy."""
        waiting = [(since, sock) for sock, since in self._open.items() if since is not None]
        if not waiting:
            return False
        _, sock = min(waiting, key=lambda pair: pair[0])
        del self._open[sock]
        _shut(sock)
        log.debug("admin connection limit (%d) reached: closed the longest waiting one", self.max_connections)
        return True

    def _refuse(self, request: socket.socket) -> None:
        """A short 503 on the accept thread: never blocks (the socket buffer takes it whole)."""
        self.busy_refusals.warning("admin connection limit (%d) reached and every connection is busy: 503",
                                   self.max_connections)
        try:
            request.setblocking(False)
            request.send(BUSY_RESPONSE)
        except OSError:  # the client is gone or its buffer is full: closing is all that is left
            pass
        super().shutdown_request(request)

    def mark_waiting(self, sock: socket.socket) -> None:
        with self._open_lock:
            if sock in self._open:  # not closed to make room meanwhile
                self._open[sock] = self.clock()

    def mark_busy(self, sock: socket.socket) -> None:
        with self._open_lock:
            if sock in self._open:
                self._open[sock] = None

    def service_actions(self) -> None:
        """Called by serve_forever about every poll interval: close connections waiting too long."""
        cutoff = self.clock() - self.idle_timeout
        with self._open_lock:
            expired = [sock for sock, since in self._open.items() if since is not None and since <= cutoff]
            for sock in expired:
                del self._open[sock]
        for sock in expired:
            _shut(sock)

    def shutdown_request(self, request):
        with self._open_lock:
            self._open.pop(request, None)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        """socketserver prints a traceback to stderr for any error; a client that left mid-answer (a
        closed dashboard tab, a scrape timing out) is expected: debug, the rest logged."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            log.debug("admin client %s went away: %s", client_address[0], error)
        else:
            log.exception("admin request from %s failed", client_address[0])

    def close_open_connections(self) -> None:
        """Stopped means stopped: a handler thread would otherwise keep answering a keep-alive client."""
        with self._open_lock:
            sockets = list(self._open)
        for sock in sockets:
            _shut(sock)


def _shut(sock: socket.socket) -> None:
    """End a connection whose handler thread may be reading it: the read returns and the thread ends."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # the client closed it already
        log.debug("admin connection already closed")


class AdminServer:
    """Service (start/stop) serving the admin endpoints on ``listen`` or a pre-bound ``sock``."""

    def __init__(self, listen: ListenConfig | None, sources: AdminSources, sock: socket.socket | None = None,
                 *, clock: Callable[[], float] = time.monotonic, max_connections: int = MAX_ADMIN_CONNECTIONS,
                 idle_timeout: float = ADMIN_IDLE_TIMEOUT):
        if sock is None:
            sock = bind_listener(listen.host, listen.port)
        sock.setblocking(True)
        self.listen = listen
        self.sources = sources
        self._httpd = _AdminHTTPServer(sock, sources, clock=clock, max_connections=max_connections,
                                       idle_timeout=idle_timeout)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple:
        return self._httpd.socket.getsockname()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="pyproxy-admin", daemon=True)
        self._thread.start()
        log.info("admin listening on %s", format_address(*self.address[:2]))

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=STOP_TIMEOUT)
            self._thread = None
        self._httpd.server_close()
        self._httpd.close_open_connections()


class AdminRelocation:
    """A reload listener: a changed ``[admin].listen`` opens the new address, then closes the old one.

    The new socket is bound first, so a failure (port taken, no such interface) leaves the admin
    listener where it was, with the reason logged. Removing ``[admin]`` closes it; adding it opens one.
    """

    def __init__(self, services: list, sources: AdminSources, current: AdminServer | None, on_change=None):
        self.services = services
        self.sources = sources
        self.current = current
        self.on_change = on_change  # called with the new AdminServer (or None)

    def __call__(self, old_config, new_config) -> None:
        if _admin_listen(old_config) == _admin_listen(new_config):
            return  # a new token is read per request: nothing to move
        fresh = None
        if new_config.admin is not None:
            try:
                fresh = AdminServer(new_config.admin.listen, self.sources)
            except OSError as exc:
                log.error("cannot move the admin listener to %s: %s; it stays where it was",
                          new_config.admin.listen.address, exc)
                return
            fresh.start()
            self.services.append(fresh)
        if self.current is not None:
            closed = format_address(*self.current.address[:2])
            self.current.stop()
            if self.current in self.services:
                self.services.remove(self.current)
            log.info("admin listener on %s closed", closed)
        self.current = fresh
        if self.on_change is not None:
            self.on_change(fresh)




def _admin_listen(config) -> ListenConfig | None:
    return config.admin.listen if config.admin is not None else None


def configured_token(config) -> str | None:
    """The runtime API's token in this config, or None (writes refused)."""
    return config.admin.token if config.admin is not None else None


# -- wiring for one process ------------------------------------------------------------------------

@dataclass
class Observability:
    """What install_observability plugged into a ProxyProcess."""

    metrics: Metrics
    access_log: object | None
    checker: HealthChecker | None
    admin: AdminServer | None
    sources: AdminSources


def install_observability(process, *, admin_socket: socket.socket | None = None, health: bool = True,
                          admin: bool = True) -> Observability:
    """Metrics + access log observers, the health checker and the admin listener for one process.

    A future worker process would pass health=False, admin=False (its supervisor runs both, fed by
    every worker's ``metrics.snapshot`` / ``build_status`` and forwarding the checker's verdicts).
    """
    app, config = process.app, process.app.config
    access_log = make_access_log(config.log)
    metrics = Metrics(app, server=process.server, pool=process.pool, access_log=access_log)
    app.observers.append(metrics.observe)
    if access_log is not None:
        app.observers.append(access_log.observe)
        process.add_service(access_log)
    app.reload_listeners.append(LogSwitch(process, metrics, access_log))  # [log] on SIGHUP
    checker = HealthChecker(app) if health else None
    if checker is not None:
        process.add_service(checker)
    sources = AdminSources(
        status=[lambda: build_status(app, process.server, process.pool, checker, traffic=metrics.recent)],
        metrics=[metrics.snapshot],
        draining=app.draining,
        token=lambda: configured_token(app.config),
        set_server_state=app.set_admin_state if admin else None)
    admin_server = None
    if admin and (config.admin is not None or admin_socket is not None):
        admin_server = AdminServer(config.admin.listen if config.admin else None, sources, sock=admin_socket)
        process.add_service(admin_server)
    observability = Observability(metrics, access_log, checker, admin_server, sources)
    if admin:
        app.reload_listeners.append(AdminRelocation(
            process.services, sources, admin_server,
            on_change=lambda server: setattr(observability, "admin", server)))
    return observability
