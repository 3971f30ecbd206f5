"""Access log writes that fail: a full disk, a file size limit. Lines are dropped and counted, never
written late or twice, and the proxy keeps serving without flooding its own log."""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys

import requests

from proxy.config.schema import load_config
from proxy.observe.access_log import AccessLog
from tests.support.backends import named_backends
from tests.support.ports import free_port, port_open
from tests.support.processes import (EXIT_TIMEOUT, REPO, START_TIMEOUT, proxy_config,
                                     running_proxy)
from tests.support.proxy import DEADLINE
from tests.support.records import Record
from tests.support.timing import wait_for

LINE = re.compile(r'^\S+ - - \[[^\]]+\] "GET (\S+) HTTP/1.1" 200 \d+ "[^"]*" "[^"]*" \S+ \S+ \d+\.\d{3} \S+$')
LINES_SAMPLE = re.compile(r'^pyproxy_access_log_lines_total\{outcome="(\w+)"\} (\d+)', re.MULTILINE)


def access_log_counts(admin_port: int) -> dict[str, int]:
    text = requests.get(f"http://127.0.0.1:{admin_port}/metrics", timeout=DEADLINE).text
    return {outcome: int(value) for outcome, value in LINES_SAMPLE.findall(text)}


def logged_proxy_config(tmp_path, backend, target) -> tuple[str, int]:
    admin_port = free_port()
    config = proxy_config(free_port(), backend.address, admin_port=admin_port)
    return config.replace('access = "off"', f'access = "{target}"'), admin_port


def test_stopping_a_log_whose_disk_is_full_drops_and_counts_its_lines():
    """Bug: the file's write buffer kept the bytes a full disk refused, and closing it (a reload
    switching logs, the proxy stopping) tried them again and raised OSError out of stop()."""
    log = AccessLog("/dev/full")
    log.start()
    for _ in range(3):
        log.observe(Record())
    log.stop()
    assert (log.written, log.dropped) == (0, 3)


def test_lines_dropped_while_the_disk_is_full_are_not_written_once_it_has_room(tmp_path):
    """Bug: a failed write left its bytes in the file's write buffer: lines counted "dropped" were
    written after all, late and out of order, with the next line that could be written. A line is now
    either written when its turn comes or dropped and counted, and a line the disk cut short is ended
    before the next one, never glued to it. (A file size limit, RLIMIT_FSIZE, fails a write with
    EFBIG as a full disk fails it with ENOSPC.)"""
    access = tmp_path / "access.log"
    with named_backends("a") as (backend,):
        config, admin_port = logged_proxy_config(tmp_path, backend, access)
        with running_proxy(tmp_path, config) as run:
            wait_for(lambda: access_log_counts(admin_port).get("written") == 1, DEADLINE,
                     what="the start-up request's line", on_timeout=run.log)
            _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.prlimit(run.proc.pid, resource.RLIMIT_FSIZE, (access.stat().st_size + 600, hard))
            for index in range(20):
                assert requests.get(f"{run.url}/full-{index}", timeout=DEADLINE).status_code == 200
            wait_for(lambda: sum(access_log_counts(admin_port).values()) == 21, DEADLINE,
                     what="every line written or dropped", on_timeout=run.log)
            assert access_log_counts(admin_port)["dropped"] > 0
            resource.prlimit(run.proc.pid, resource.RLIMIT_FSIZE, (hard, hard))
            assert requests.get(f"{run.url}/after", timeout=DEADLINE).status_code == 200
            wait_for(lambda: sum(access_log_counts(admin_port).values()) == 22, DEADLINE,
                     what="the last line", on_timeout=run.log)
            written = access_log_counts(admin_port)["written"]
            run.signal(signal.SIGTERM)
            assert run.wait_exit() == 0
    lines = access.read_text().splitlines()
    paths = [match.group(1) for match in map(LINE.match, lines) if match]
    assert len(paths) == written, lines
    assert paths[-1] == "/after" and paths[:-1] == sorted(paths[:-1], key=lambda p: int(p.rsplit("-", 1)[-1])
                                                           if p.startswith("/full-") else -1), lines
    assert all(line.count(" - - [") <= 1 for line in lines), lines


def test_a_full_disk_is_reported_once_a_minute_not_once_a_line(tmp_path):
    """Bug: every failed write logged a warning: a busy proxy on a full disk wrote a line to its own
    log (often the journal, on the same disk) per request. As nginx does, the failure is reported at
    most once a minute, with a count of the lines dropped meanwhile in /metrics."""
    with named_backends("a") as (backend,):
        config, admin_port = logged_proxy_config(tmp_path, backend, "/dev/full")
        with running_proxy(tmp_path, config) as run:
            for index in range(30):
                assert requests.get(f"{run.url}/{index}", timeout=DEADLINE).status_code == 200
            wait_for(lambda: access_log_counts(admin_port).get("dropped") == 31, DEADLINE,
                     what="every line dropped", on_timeout=run.log)
            reports = run.log().count("access log write failed")
            assert reports == 1, run.log()


def test_access_to_a_closed_stdout_drops_and_counts_lines_without_a_traceback(tmp_path):
    """Bug: started with stdout closed (``>&-``; Python then sets sys.stdout to None), the default
    ``access = "stdout"`` killed the writer thread with an AttributeError traceback at the first
    line; every later line sat in the queue, counted neither written nor dropped. The lines are now
    dropped and counted, reported like any failing write."""
    with named_backends("a") as (backend,):
        config, admin_port = logged_proxy_config(tmp_path, backend, "stdout")
        (tmp_path / "proxy.toml").write_text(config)
        port = load_config(tmp_path / "proxy.toml").server.listen[0].port
        with open(tmp_path / "proxy.log", "wb") as stderr:
            proc = subprocess.Popen([sys.executable, "-m", "proxy.serve.cli", "-c", str(tmp_path / "proxy.toml")],
                                    cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr,
                                    preexec_fn=lambda: os.close(1))  # noqa: PLW1509 (only closes a descriptor)
            try:
                wait_for(lambda: port_open(admin_port), START_TIMEOUT, what="the admin listener")
                for index in range(3):
                    assert requests.get(f"http://127.0.0.1:{port}/{index}", timeout=DEADLINE).status_code == 200
                wait_for(lambda: access_log_counts(admin_port).get("dropped") == 3, DEADLINE,
                         what="the lines counted dropped",
                         on_timeout=lambda: (tmp_path / "proxy.log").read_text(errors="replace"))
                assert proc.poll() is None
            finally:
                proc.terminate()
                proc.wait(EXIT_TIMEOUT)
    log = (tmp_path / "proxy.log").read_text(errors="replace")
    assert "Traceback" not in log and "stdout is closed" in log, log
