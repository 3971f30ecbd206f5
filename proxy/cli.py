"""The ``pyproxy`` command line (click). See CONFIG.md for the contract."""

from __future__ import annotations

import sys

import click

from . import __version__
from .config import ConfigError, load_config, routing_table_lines
from .runner import ProxyProcess, bind_config_listener, configure_logging, describe_listeners
from .starter import write_starter
from .supervisor import run_supervisor

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _load_or_exit(path: str):
    try:
        return load_config(path)
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)


@click.group(invoke_without_command=True, context_settings=CONTEXT)
@click.option("-c", "--config", "config_path", metavar="FILE", help="Run the proxy with this TOML config.")
@click.option("--workers", type=click.IntRange(min=1), metavar="N", help="Override server.workers.")
@click.option("--watch", is_flag=True, help="Reload gracefully whenever the config file changes.")
@click.version_option(__version__, "--version", prog_name="pyproxy", message="%(prog)s %(version)s")
@click.pass_context
def main(ctx: click.Context, config_path: str | None, workers: int | None, watch: bool) -> None:
    """pyproxy: a reverse proxy and HTTP load balancer.

    \b
    Run it:        pyproxy -c proxy.toml
    Check config:  pyproxy check -c proxy.toml
    Start one:     pyproxy init
    """
    if ctx.invoked_subcommand is not None:
        return
    if not config_path:
        click.echo(ctx.get_help())
        ctx.exit(2)
    config = _load_or_exit(config_path)
    sys.exit(run_proxy(config, config_path, workers=workers, watch=watch))


def run_proxy(config, config_path: str | None, workers: int | None = None, watch: bool = False) -> int:
    configure_logging(config.log.level)
    workers = workers or config.server.workers
    try:
        if workers > 1:  # a supervisor and N worker processes sharing these sockets (proxy.supervisor)
            listeners = [(listen, bind_config_listener(listen)) for listen in config.server.listen]
        else:
            process = ProxyProcess(config, install_signals=True, config_path=config_path)
    except OSError as exc:
        click.echo(f"pyproxy: cannot listen: {exc}", err=True)
        return 1
    if workers > 1:
        addresses = ", ".join(f"http://{listen.address}" for listen, _ in listeners)
        click.echo(f"pyproxy {__version__} listening on {addresses} with {workers} workers", err=True)
        return run_supervisor(config, config_path, listeners, workers, watch=watch)
    if watch and config_path:
        process.watch_config()
    click.echo(f"pyproxy {__version__} listening on {describe_listeners(process)}", err=True)
    process.serve_forever()
    return 0


@main.command()
@click.option("-c", "--config", "config_path", metavar="FILE", required=True, help="The config file to validate.")
def check(config_path: str) -> None:
    """Validate a config file and print the effective routing table."""
    config = _load_or_exit(config_path)
    click.echo(f"{config_path}: OK")
    for line in routing_table_lines(config):
        click.echo(line)


@main.command()
@click.argument("path", default="proxy.toml", required=False)
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def init(path: str, force: bool) -> None:
    """Write a commented starter config (default: proxy.toml)."""
    try:
        write_starter(path, force=force)
    except FileExistsError:
        click.echo(f"{path} already exists; use --force to overwrite it", err=True)
        sys.exit(1)
    click.echo(f"wrote {path}; try: pyproxy check -c {path}")


if __name__ == "__main__":
    main()
