"""The ``pyproxy`` command line (click). Reference: docs/configuration.md ("Command line").

Two ways to run the proxy:
  * from a config file:   pyproxy -c proxy.toml
  * without one (local development, like ``caddy reverse-proxy``):
        pyproxy --from :8080 --to 127.0.0.1:3000
        pyproxy --from :8080 --route app.localhost=127.0.0.1:3000 --route /api=127.0.0.1:4000

Exit codes: 0 after a clean (graceful) shutdown or a valid ``check``; 1 for a config problem or
an address the proxy cannot listen on (one line per problem, never a traceback); 2 for a command
line click cannot make sense of (unknown option, missing value).
"""

from __future__ import annotations

import errno
import getpass
import json
import logging
import os
import resource
import signal
import socket
import sys

import click

from core.cpu_affinity import pin_worker

from proxy import __version__
from proxy.http import local_ca
from proxy.config.ca_names import default_ca_dir, name_is_permitted, permitted_names
from proxy.serve import trust as trust_steps
from proxy.config.schema import (
    ACCESS_STREAMS, DEFAULT_LISTEN, MAX_WORKERS, Config, ConfigError, ListenConfig, TlsSettings, load_config, parse_workers,
    quick_config,
)
from proxy.http.basic_auth import DEFAULT_COST, hash_password
from proxy.http.tls import validity_warnings
from proxy.routing.table import routing_table_lines
from proxy.upstream.discovery import check_names
from proxy.serve.runner import (
    SERVING_SIGNALS, ProxyProcess, bind_config_listener, configure_logging, describe_listeners, tls_problems,
)
from proxy.config.starter import write_starter
from proxy.config.units import format_address, parse_address, parse_duration
from proxy.serve import ctl as ctl_client
from proxy.serve.supervisor import run_supervisor

log = logging.getLogger("pyproxy.cli")

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
DEFAULT_CONFIG_FILE = "proxy.toml"

# Why a bind failed, in words a user can act on (errno values from bind(2)).
LISTEN_ERROR_HINTS = {
    errno.EADDRINUSE: "address already in use (is another proxy or server running there?)",
    errno.EACCES: "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
    errno.EADDRNOTAVAIL: "no network interface on this machine has that address",
}


# The signals the proxy acts on (docs/configuration.md, "Signals").
HANDLED_SIGNALS = set(SERVING_SIGNALS)
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


class ListenError(Exception):
    """A listen address the proxy could not bind; the message is one line for the user."""


# ---------------------------------------------------------------------------------------------
# Helpers shared by the commands
# ---------------------------------------------------------------------------------------------

def fail(message: str) -> None:
    """Print a one-line (or one line per problem) error on stderr and exit 1."""
    click.echo(message, err=True)
    sys.exit(1)


def load_or_exit(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        fail(str(exc))


def parse_workers_option(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """--workers N or "auto", as server.workers takes them (--workers overrides it)."""
    if value is None:
        return None
    try:
        return parse_workers(int(value) if value.isdigit() else value)
    except ValueError:
        raise click.BadParameter(f'{value!r} is not a number of processes (1-{MAX_WORKERS}) or "auto"') from None


def parse_route_option(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[tuple[str, str]]:
    """--route KEY=ADDRESS, KEY being "/prefix", "host" or "host/prefix"."""
    routes = []
    for value in values:
        key, equals, target = value.partition("=")
        if not equals or not key or not target:
            raise click.BadParameter(
                f"{value!r} is not KEY=ADDRESS (e.g. app.localhost=127.0.0.1:3000 or /api=127.0.0.1:4000)")
        routes.append((key.strip(), target.strip()))
    return routes


def listen_error(listen: ListenConfig, exc: OSError, key: str = "") -> ListenError:
    if isinstance(exc, socket.gaierror):
        reason = f"cannot resolve the host name ({exc.strerror})"
    else:
        reason = LISTEN_ERROR_HINTS.get(exc.errno, exc.strerror or str(exc))
    named = f" ({key})" if key else ""
    return ListenError(f"pyproxy: cannot listen on {listen.address}{named}: {reason}")


def listen_key(config: Config, index: int) -> str:
    return "server.listen" if len(config.server.listen) == 1 else f"server.listen[{index}]"


def own_clash(listen: ListenConfig, bound: list[tuple[ListenConfig, socket.socket]]) -> int | None:
    """The index in ``bound`` of a listener of this config holding the address ``listen`` resolves to.
    check does not resolve listen names, so "localhost:8080" beside "127.0.0.1:8080" passes it, and
    the bind then fails as if another program held the port."""
    try:
        wanted = socket.getaddrinfo(listen.host, listen.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][4][0]
    except OSError:
        return None
    for index, (_, sock) in enumerate(bound):
        host, port = sock.getsockname()[:2]
        if port == listen.port and host in (wanted, "0.0.0.0", "::"):
            return index
    return None


def bind_error(config: Config, listen: ListenConfig, exc: OSError, key: str,
               bound: list[tuple[ListenConfig, socket.socket]]) -> ListenError:
    """Why ``listen`` could not be bound: another key of this config, or what bind(2) said."""
    clash = own_clash(listen, bound) if exc.errno == errno.EADDRINUSE else None
    if clash is None:
        return listen_error(listen, exc, key if key == "admin.listen" else "")
    return ListenError(f"pyproxy: cannot listen on {listen.address} ({key}): the same address as "
                       f"{listen_key(config, clash)} {bound[clash][0].address}")


def bind_listeners(config: Config) -> list[tuple[ListenConfig, socket.socket]]:
    """Bind every server.listen address up front, so a busy port is reported by name before any
    thread starts. Raises ListenError (after closing what was already bound)."""
    bound: list[tuple[ListenConfig, socket.socket]] = []
    for index, listen in enumerate(config.server.listen):
        try:
            bound.append((listen, bind_config_listener(listen)))
        except OSError as exc:
            error = bind_error(config, listen, exc, listen_key(config, index), bound)
            for _, sock in bound:
                sock.close()
            raise error from None
    return bound


def bind_admin(config: Config, listeners: list[tuple[ListenConfig, socket.socket]]) -> socket.socket | None:
    """Bind [admin].listen up front as well: a taken admin port was a traceback with one process,
    and with workers a proxy running without /healthz. Raises ListenError."""
    if config.admin is None:
        return None
    try:
        return bind_config_listener(config.admin.listen)
    except OSError as exc:
        raise bind_error(config, config.admin.listen, exc, "admin.listen", listeners) from None


# ---------------------------------------------------------------------------------------------
# pyproxy [OPTIONS]: run the proxy
# ---------------------------------------------------------------------------------------------

MAIN_HELP = """pyproxy: a reverse proxy and HTTP load balancer.

\b
Run from a config file:
  pyproxy init                      write a commented starter proxy.toml
  pyproxy check -c proxy.toml       validate it and show the routing table
  pyproxy -c proxy.toml             run it (Ctrl-C or SIGTERM drains and exits)

\b
Run without a config file (local development):
  pyproxy --from :8080 --to 127.0.0.1:3000
  pyproxy --from :8080 --to 127.0.0.1:3000 --to 127.0.0.1:3001      (round robin)
  pyproxy --from :8080 --route app.localhost=127.0.0.1:3000 --route /api=127.0.0.1:4000

\b
*.localhost names resolve to 127.0.0.1 in browsers and curl >= 7.85, so
http://app.localhost:8080/ works without editing /etc/hosts.
"""

MAIN_EPILOG = ("Signals: SIGTERM/SIGINT drain and exit 0; SIGHUP reloads the config file; "
               "SIGUSR1 reopens the access log file (log rotation).")


@click.group(invoke_without_command=True, context_settings=CONTEXT, help=MAIN_HELP, epilog=MAIN_EPILOG)
@click.option("-c", "--config", "config_path", metavar="FILE", help="Run the proxy with this TOML config file.")
@click.option("--workers", metavar="N", callback=parse_workers_option,
              help='Worker processes, or "auto" for one per CPU (overrides server.workers).')
@click.option("--watch", is_flag=True, help="Reload gracefully whenever the config file changes.")
@click.option("--from", "listen", metavar="ADDRESS",
              help=f'Without a config file: listen here, e.g. ":8080" (all interfaces) or "127.0.0.1:8080"; '
                   f'"https://:8443" serves HTTPS with certificates from the local CA. Default {DEFAULT_LISTEN}.')
@click.option("--to", "targets", metavar="ADDRESS", multiple=True,
              help="Without a config file: send every request here. Repeat to balance round robin.")
@click.option("--route", "routes", metavar="KEY=ADDRESS", multiple=True, callback=parse_route_option,
              help='Without a config file: send a host ("app.localhost"), a path prefix ("/api") or both '
                   '("app.localhost/api") to ADDRESS. Repeatable; the most specific route wins.')
@click.version_option(__version__, "--version", prog_name="pyproxy", message="%(prog)s %(version)s")
@click.pass_context
def main(ctx: click.Context, config_path: str | None, workers: int | None, watch: bool,
         listen: str | None, targets: tuple[str, ...], routes: list[tuple[str, str]]) -> None:
    quick = listen is not None or bool(targets) or bool(routes)
    if ctx.invoked_subcommand is not None:
        if quick or workers or watch:
            raise click.UsageError(f"--from/--to/--route/--workers/--watch run the proxy; "
                                   f"they do not go with '{ctx.invoked_subcommand}'")
        ctx.obj = {"config_path": config_path}  # "pyproxy -c FILE check" reads as "check -c FILE"
        return
    if config_path and quick:
        raise click.UsageError("use either -c FILE or --from/--to/--route, not both")
    if quick:
        if watch:
            raise click.UsageError("--watch needs a config file (-c FILE) to watch")
        config = quick_config_or_exit(DEFAULT_LISTEN if listen is None else listen, list(targets), routes)
        for line in routing_table_lines(config):
            click.echo(line, err=True)
        sys.exit(run_proxy(config, None, workers=workers, watch=False))
    if not config_path:
        click.echo(ctx.get_help())
        ctx.exit(2)
    config = load_or_exit(config_path)
    sys.exit(run_proxy(config, config_path, workers=workers, watch=watch))


PRIVILEGED_PORT_HINT = " (or use a high port: --from https://app.localhost:8443)"


def listen_failure(exc: ListenError, config: Config, config_path: str | None) -> str:
    """What a listen address that cannot be bound says. --from https://NAME without a port asks for
    ports 443 and 80 (the redirect to HTTPS), which need privileges: it suggests a high port."""
    quick_https = config_path is None and any(listen.redirect_https for listen in config.server.listen)
    return str(exc) + (PRIVILEGED_PORT_HINT if quick_https else "")


def quick_config_or_exit(listen: str, targets: list[str], routes: list[tuple[str, str]]) -> Config:
    try:
        return quick_config(listen, targets, routes)
    except ConfigError as exc:
        fail(str(exc))


def run_proxy(config, config_path: str | None, workers: int | None = None, watch: bool = False) -> int:
    """Serve until a signal drains the proxy. Returns the exit code (0 clean, 1 cannot listen)."""
    configure_logging(config.log.level)
    open_files = raise_open_files_limit()
    problems = tls_problems(config)  # load certificates once, before any socket or fork
    if problems:
        click.echo(_with_source(config, ConfigError(problems)), err=True)
        return 1
    for line in validity_warnings(config.server.listen):
        log.warning(line)
    problem = access_log_problem(config)
    if problem:
        click.echo(problem, err=True)
        return 1
    # From the bind on, clients may connect and a watchdog may signal us: the signals wait (blocked)
    # until our handlers are installed, instead of killing the process with the default action.
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    try:
        listeners = bind_listeners(config)
    except ListenError as exc:
        click.echo(listen_failure(exc, config, config_path), err=True)
        return 1
    try:
        admin_socket = bind_admin(config, listeners)
    except ListenError as exc:
        for _, sock in listeners:
            sock.close()
        click.echo(str(exc), err=True)
        return 1
    warn_if_open_files_short(config, open_files)
    workers_option, workers = workers, workers or config.server.workers
    if workers > 1:  # a supervisor and N worker processes sharing these sockets (proxy.serve.supervisor)
        if admin_socket is not None:
            admin_socket.close()  # the supervisor binds [admin] itself; it was free a moment ago
        if stop_signal_pending():  # nothing built yet: a stop that already came needs no supervisor
            for _, sock in listeners:
                sock.close()
            return 0
        # Still blocked: the supervisor unblocks them once its handlers are in place, before any fork
        # (a SIGTERM while it built its Application killed it, 2 in 10 tries).
        addresses = ", ".join(f"{'https' if listen.tls else 'http'}://{listen.address}" for listen, _ in listeners)
        click.echo(f"pyproxy {__version__} listening on {addresses} with {workers} workers", err=True)
        return run_supervisor(config, config_path, listeners, workers, watch=watch, workers_option=workers_option)
    pinned = pin_worker(config.server.cpu_affinity)  # before ProxyProcess starts its threads
    process = ProxyProcess(config, listeners=listeners, install_signals=True, config_path=config_path,
                           admin_socket=admin_socket)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)  # its handlers record them now
    if pinned is not None:
        log.info("pinned to CPU %d (server.cpu_affinity)", pinned)
    if watch and config_path:
        process.watch_config()
    click.echo(f"pyproxy {__version__} listening on {describe_listeners(process)}", err=True)
    process.serve_forever()
    return 0


def raise_open_files_limit() -> int:
    """Lift the soft limit on open files to the hard one, as Go does for every program (systemd's soft
    1024 ran out at about 1000 clients); worker processes inherit it. Returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # an infinite hard limit above the kernel's nr_open: keep the soft one
            pass
    return soft


def warn_if_open_files_short(config: Config, limit: int) -> None:
    """Each client connection may hold an upstream one too: past the limit, accept fails (EMFILE)."""
    needed = config.server.max_connections * 2
    if limit != resource.RLIM_INFINITY and limit < needed:
        log.warning("server.max_connections %d may need %d open files; the limit here is %d "
                    "(raise it: ulimit -n, or LimitNOFILE= under systemd)", config.server.max_connections,
                    needed, limit)


def stop_signal_pending() -> bool:
    """Take the blocked signals that already arrived: True if one asks to stop (SIGTERM/SIGINT).
    A SIGHUP or SIGUSR1 is dropped: the config was read and no log opened a moment ago."""
    stop = False
    while signal.sigpending() & HANDLED_SIGNALS:
        taken = signal.sigtimedwait(HANDLED_SIGNALS, 0)
        stop = stop or (taken is not None and taken.si_signo in STOP_SIGNALS)
    return stop


def access_log_problem(config: Config) -> str | None:
    """A log.access file that cannot be opened, found before any socket or fork: the writer opens it
    only when serving starts, where the error was a traceback (and, with workers, each one died and
    was restarted forever)."""
    target = config.log.access
    if target in ACCESS_STREAMS:
        return None
    try:
        with open(target, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        return f"pyproxy: cannot open the access log {target}: {exc.strerror or exc}"
    return None


def _with_source(config, exc: ConfigError) -> str:
    """ConfigErrors raised after loading lack the file name that load_config puts in front."""
    return "\n".join(p if p.startswith(config.source) else f"{config.source}: {p}" for p in exc.problems)


# ---------------------------------------------------------------------------------------------
# pyproxy check / pyproxy init
# ---------------------------------------------------------------------------------------------

@main.command(context_settings=CONTEXT)
@click.option("-c", "--config", "config_path", metavar="FILE", help=f"The config file (default {DEFAULT_CONFIG_FILE}).")
@click.argument("file", required=False, metavar="[FILE]")
@click.pass_context
def check(ctx: click.Context, config_path: str | None, file: str | None) -> None:
    """Validate a config file and print the effective routing table.

    Lists every problem at once (file, key, what is wrong) and exits 1 if there is any;
    exits 0 if the file is valid. "pyproxy check proxy.toml" works too. Discovered names (discover,
    srv) are looked up, and those that do not resolve are reported as warnings.
    """
    given = {path for path in (config_path, file, (ctx.obj or {}).get("config_path")) if path}
    if len(given) > 1:
        raise click.UsageError("give the config file once: -c FILE or FILE")
    path = given.pop() if given else DEFAULT_CONFIG_FILE
    config = load_or_exit(path)
    problems = tls_problems(config, create_ca=False)
    if problems:
        fail(_with_source(config, ConfigError(problems)))
    click.echo(f"{path}: OK")
    if any(listen.tls_internal for listen in config.server.listen):
        click.echo(describe_local_ca(config.tls.ca_dir))
        for line in hosts_without_internal_certificates(config):
            click.echo(line)
    for line in routing_table_lines(config):
        click.echo(line)
    # Names that do not resolve now may well resolve when the proxy runs (a service not deployed yet):
    # a warning, and the exit code stays 0.
    for line in check_names(config):
        click.echo(line, err=True)
    for line in validity_warnings(config.server.listen):
        click.echo(f"warning: {line}", err=True)


def describe_local_ca(ca_dir: str) -> str:
    cert_path, _ = local_ca.root_paths(ca_dir)
    if os.path.exists(cert_path):
        return f'tls = "internal": certificates from the local CA {cert_path}'
    return f'tls = "internal": a new local CA will be created in {ca_dir} on the first start'


def hosts_without_internal_certificates(config: Config) -> list[str]:
    """Route hosts the local CA will not issue for: HTTPS clients of a tls = "internal" listener
    asking for them fail the handshake. A note, not an error: the route may serve plain HTTP."""
    permitted = permitted_names(config.tls.internal_names)
    notes = []
    for index, route in enumerate(config.routes):
        if route.host and not name_is_permitted(route.host.removeprefix("*."), permitted):
            notes.append(f"note: routes[{index}].host {route.host} gets no certificate from the local CA "
                         f"(it issues for {', '.join(permitted)}); add its domain to tls.internal_names")
    return notes


@main.command(context_settings=CONTEXT)
@click.argument("path", default=DEFAULT_CONFIG_FILE, required=False, metavar="[PATH]")
@click.option("--force", is_flag=True, help="Overwrite PATH if it exists.")
def init(path: str, force: bool) -> None:
    """Write a commented starter config to PATH (default proxy.toml).

    It routes everything to 127.0.0.1:3000 and shows the most used keys with their defaults
    (docs/configuration.md has all of them); edit it, then run "pyproxy check -c PATH" and
    "pyproxy -c PATH".
    """
    try:
        write_starter(path, force=force)
    except FileExistsError:
        fail(f"{path} already exists; use --force to overwrite it")
    except OSError as exc:
        fail(f"cannot write {path}: {exc.strerror or exc}")
    click.echo(f"wrote {path}\nnext: pyproxy check -c {path}   then: pyproxy -c {path}")


# ---------------------------------------------------------------------------------------------
# pyproxy trust / pyproxy untrust: the local CA's root for browsers and tools
# ---------------------------------------------------------------------------------------------

def tls_settings_for(ctx: click.Context, config_path: str | None) -> TlsSettings:
    """The [tls] settings of the config given with -c (either side of the command), else the defaults."""
    path = config_path or (ctx.obj or {}).get("config_path")
    if path:
        return load_or_exit(path).tls
    return TlsSettings(default_ca_dir(), ())


def existing_root(ca_dir: str) -> trust_steps.Root | None:
    cert_path, _ = local_ca.root_paths(ca_dir)
    if not os.path.exists(cert_path):
        return None
    try:
        certificate, _ = local_ca.open_root(ca_dir, (), check_names=False)
    except local_ca.LocalCaError as exc:
        fail(f"pyproxy: {exc}")
    return trust_steps.Root(cert_path, local_ca.fingerprint(certificate))


def trust_options(command):
    command = click.option("--system-store", metavar="DIR|skip", envvar="PYPROXY_SYSTEM_STORE",
                           help='"skip" leaves the system store alone; a directory gets a copy of the root '
                                "instead, with no command run (env PYPROXY_SYSTEM_STORE).")(command)
    command = click.option("--dry-run", is_flag=True, help="Print the steps without doing any.")(command)
    return click.option("-c", "--config", "config_path", metavar="FILE",
                        help="Use this config's tls.internal_ca_dir (default ~/.local/share/pyproxy/ca).")(command)


def run_trust_steps(steps: list, install: bool, dry_run: bool) -> None:
    if dry_run:
        for step in steps:
            for line in trust_steps.describe(step):
                click.echo(line)
        return
    failed = False
    for step in steps:
        succeeded, line = trust_steps.run_step(step, install)
        click.echo(line, err=not succeeded)
        failed = failed or not succeeded
    if failed:
        sys.exit(1)


@main.command(context_settings=CONTEXT)
@trust_options
@click.option("--print-path", is_flag=True,
              help="Print the root certificate's path (for curl --cacert, NODE_EXTRA_CA_CERTS, REQUESTS_CA_BUNDLE).")
@click.pass_context
def trust(ctx: click.Context, config_path: str | None, dry_run: bool, system_store: str | None,
          print_path: bool) -> None:
    """Install the local CA's root (made now if needed) into the system store and the NSS
    databases of Chromium and Firefox, so they accept tls = "internal" certificates.

    Each step says what it did or why it skipped. Never asks for a password without a terminal.
    """
    settings = tls_settings_for(ctx, config_path)
    root = existing_root(settings.ca_dir)
    if root is None and dry_run:
        click.echo(f"would create a new local CA in {settings.ca_dir}")
        root = trust_steps.Root(local_ca.root_paths(settings.ca_dir)[0], "NEW-ROOT")
    elif root is None:
        try:
            local_ca.open_root(settings.ca_dir, settings.internal_names)
        except local_ca.LocalCaError as exc:
            fail(f"pyproxy: {exc}")
        root = existing_root(settings.ca_dir)
    if print_path:
        click.echo(root.path)
        return
    steps = trust_steps.plan(root, True, os.path.expanduser("~"), system_store)
    run_trust_steps(steps, install=True, dry_run=dry_run)
    if not dry_run:
        click.echo(f"root: {root.path} (for curl --cacert, NODE_EXTRA_CA_CERTS, REQUESTS_CA_BUNDLE)")


@main.command(context_settings=CONTEXT)
@trust_options
@click.pass_context
def untrust(ctx: click.Context, config_path: str | None, dry_run: bool, system_store: str | None) -> None:
    """Remove the local CA's root from the places `pyproxy trust` put it (the CA files stay)."""
    settings = tls_settings_for(ctx, config_path)
    root = existing_root(settings.ca_dir)
    if root is None:
        click.echo(f"no local CA in {settings.ca_dir}: nothing to untrust")
        return
    steps = trust_steps.plan(root, False, os.path.expanduser("~"), system_store)
    run_trust_steps(steps, install=False, dry_run=dry_run)
# ---------------------------------------------------------------------------------------------
# pyproxy ctl: the runtime API from a shell or a deploy script (proxy/serve/ctl.py)
# ---------------------------------------------------------------------------------------------

CTL_EPILOG = ("Exit codes: 0 done; 1 config file problem; 2 bad command line; 3 the proxy refused "
              "(unknown upstream or server, missing or wrong admin.token); 4 cannot reach the admin "
              "listener; 5 --wait timed out.")


@main.group(context_settings=CONTEXT, epilog=CTL_EPILOG)
@click.option("-c", "--config", "config_path", metavar="FILE",
              help=f"The proxy's config file: admin address and token (default {DEFAULT_CONFIG_FILE}).")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON answer instead of text.")
@click.pass_context
def ctl(ctx: click.Context, config_path: str | None, as_json: bool) -> None:
    """Drain, disable or enable an upstream server, or show their states, on a running proxy."""
    path = config_path or (ctx.obj or {}).get("config_path") or DEFAULT_CONFIG_FILE
    ctx.obj = {"config_path": path, "json": as_json}


def _json_option(command):
    """--json after the subcommand too ("pyproxy ctl status --json"), as well as before it."""
    def remember(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
        if value:
            ctx.obj = {**ctx.obj, "json": True}
        return value
    return click.option("--json", "as_json", is_flag=True, expose_value=False, callback=remember,
                        help="Print the API's JSON answer instead of text.")(command)


def _ctl_client(ctx: click.Context) -> "ctl_client.AdminClient":
    config = load_or_exit(ctx.obj["config_path"])
    return ctl_client.AdminClient.from_config(config)


def _run_ctl(action) -> None:
    """Run one ctl action; a CtlError ends the command with its message and exit code."""
    try:
        action()
    except ctl_client.CtlError as exc:
        click.echo(f"pyproxy ctl: {exc}", err=True)
        sys.exit(exc.code)


def _ctl_write(ctx: click.Context, action: str, upstream: str, address: str) -> dict:
    answer = _ctl_client(ctx).post(ctl_client.server_path(upstream, address, action))
    if ctx.obj["json"]:
        click.echo(json.dumps(answer, indent=2, sort_keys=True))
    else:
        click.echo(f"{upstream}/{address}: {answer.get('state')} (was {answer.get('previous')})")
    return answer


def _wait_timeout(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _not_empty(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """An empty UPSTREAM or ADDRESS would name another API path (POST /upstreams/NAME), not no server."""
    if not value.strip():
        raise click.BadParameter("must not be empty")
    return value


def _server_address(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """ADDRESS as the config writes it (/status shows that form): "[0::1]:80" is "[::1]:80"."""
    _not_empty(ctx, param, value)
    try:
        return format_address(*parse_address(value.strip()))
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@ctl.command("drain", context_settings=CONTEXT)
@click.argument("upstream", callback=_not_empty)
@click.argument("address", callback=_server_address)
@click.option("--wait", is_flag=True, help="Return only once the server has no active requests.")
@click.option("--timeout", callback=_wait_timeout, metavar="DURATION",
              help="With --wait: give up (exit 5) after this long; the server stays draining. [default: 60s]")
@_json_option
@click.pass_context
def ctl_drain(ctx: click.Context, upstream: str, address: str, wait: bool, timeout: float | None) -> None:
    """Send no new requests to ADDRESS (host:port as /status shows it); those in flight finish."""
    if timeout is not None and not wait:  # alone it would return at once: a script would deploy too early
        raise click.UsageError("--timeout goes with --wait (drain --wait --timeout DURATION)")
    timeout = ctl_client.DEFAULT_WAIT_TIMEOUT if timeout is None else timeout
    def action():
        _ctl_drain_write(ctx, upstream, address)
        if wait:
            client = _ctl_client(ctx)
            say = (lambda line: click.echo(line, err=True)) if not ctx.obj["json"] else (lambda line: None)
            had = ctl_client.wait_until_idle(client, upstream, address, timeout, say)
            if not ctx.obj["json"]:
                click.echo(f"{upstream}/{address}: drained" + (f" ({had} request(s) finished)" if had else ""))
    _run_ctl(action)


def _ctl_drain_write(ctx: click.Context, upstream: str, address: str) -> None:
    """POST drain. A server whose address left DNS is unknown to the API (404), but /upstreams/NAME
    lists it "leaving" while its requests finish: it takes no new ones, which is what a drain asks."""
    try:
        _ctl_write(ctx, "drain", upstream, address)
    except ctl_client.CtlError as exc:
        if exc.status != 404 or ctl_client.leaving_server(_ctl_client(ctx), upstream, address) is None:
            raise
        answer = {"upstream": upstream, "server": address, "state": "leaving"}
        click.echo(json.dumps(answer, indent=2, sort_keys=True) if ctx.obj["json"] else
                   f"{upstream}/{address}: leaving (its address left DNS: it takes no new requests)")


@ctl.command("disable", context_settings=CONTEXT)
@click.argument("upstream", callback=_not_empty)
@click.argument("address", callback=_server_address)
@_json_option
@click.pass_context
def ctl_disable(ctx: click.Context, upstream: str, address: str) -> None:
    """No traffic and no health checks for ADDRESS (requests in flight finish)."""
    _run_ctl(lambda: _ctl_write(ctx, "disable", upstream, address))


@ctl.command("enable", context_settings=CONTEXT)
@click.argument("upstream", callback=_not_empty)
@click.argument("address", callback=_server_address)
@_json_option
@click.pass_context
def ctl_enable(ctx: click.Context, upstream: str, address: str) -> None:
    """Put ADDRESS back: it takes traffic again when its health checks say it is up."""
    _run_ctl(lambda: _ctl_write(ctx, "enable", upstream, address))


@ctl.command("status", context_settings=CONTEXT)
@click.argument("upstream", required=False)
@_json_option
@click.pass_context
def ctl_status(ctx: click.Context, upstream: str | None) -> None:
    """Every server of UPSTREAM (default: of every upstream): state, health, active requests."""
    def action():
        client = _ctl_client(ctx)
        names = [upstream] if upstream else client.get("/upstreams").get("upstreams", [])
        views = [client.get(ctl_client.server_path(name, "")) for name in names]
        if ctx.obj["json"]:
            click.echo(json.dumps(views[0] if upstream else {"upstreams": views}, indent=2, sort_keys=True))
            return
        for view in views:
            for line in ctl_client.status_lines(view):
                click.echo(line)
    _run_ctl(action)


@main.command("hash-password", context_settings=CONTEXT)
@click.option("--cost", type=click.IntRange(4, 20), default=DEFAULT_COST, show_default=True,
              help="bcrypt work factor: each step doubles the time a check (and a guess) takes.")
def hash_password_command(cost: int) -> None:
    """Print a bcrypt hash of a password, for routes[].basic_auth.users.

    On a terminal it asks for the password twice, without echo; otherwise it reads one line from
    standard input (echo "$PASSWORD" | pyproxy hash-password).
    """
    password = read_password()
    try:
        click.echo(hash_password(password, cost))
    except ValueError as exc:
        fail(f"pyproxy: {exc}")


def read_password() -> bytes:
    """The password to hash: prompted for twice without echo on a terminal, else one line of stdin."""
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != first:
            fail("pyproxy: the passwords do not match")
        return first.encode("utf-8")
    line = sys.stdin.buffer.readline()
    return line.removesuffix(b"\n").removesuffix(b"\r")


if __name__ == "__main__":
    main()
