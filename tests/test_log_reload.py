"""A reload applies [log]: the level at once, a new access log target or format without losing a line."""

from __future__ import annotations

import array
import fcntl
import json
import logging
import os
import select
import signal
import sys
import termios
import threading

import requests

from proxy.observe import access_log as access_log_module
from proxy.observe.metrics import render_prometheus
from tests.support.backends import named_backends
from tests.support.ports import free_port
from tests.support.processes import proxy_config, running_proxy
from tests.support.proxy import DEADLINE, config_document
from tests.support.timing import wait_for


def lines(path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def reload_with_log(proxy, address: str, **log) -> None:
    proxy.reload(config_document({"web": {"servers": [address]}}, log=log))


def access_log_total(proxy) -> str:
    return render_prometheus(proxy.process.observability.metrics.snapshot())


def test_a_new_access_log_target_and_format_take_over_and_the_old_file_keeps_its_lines(
        tmp_path, backends, observed_proxy):
    (a,) = backends("a")
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    proxy = observed_proxy(config_document({"web": {"servers": [a.address]}},
                                           log={"access": str(first), "format": "combined"}))
    assert requests.get(proxy.url + "/before", timeout=DEADLINE).status_code == 200
    wait_for(lambda: lines(first), what="the first line")

    reload_with_log(proxy, a.address, access=str(second), format="json", level="warning")
    assert requests.get(proxy.url + "/after", timeout=DEADLINE).status_code == 200
    wait_for(lambda: lines(second), what="a line in the new file")

    assert len(lines(first)) == 1 and '"GET /before HTTP/1.1"' in lines(first)[0]
    entry = json.loads(lines(second)[0])
    assert entry["path"] == "/after" and entry["status"] == 200
    # /metrics counts the lines of both writers: none lost, none counted twice.
    wait_for(lambda: 'pyproxy_access_log_lines_total{outcome="written"} 2' in access_log_total(proxy),
             what="both lines counted", on_timeout=lambda: access_log_total(proxy))
    switch = next(listener for listener in proxy.app.reload_listeners if type(listener).__name__ == "LogSwitch")
    assert proxy.app.observers == [proxy.process.observability.metrics.observe, switch.access_log.observe]
    assert [s for s in proxy.process.services if type(s).__name__ == "AccessLog"] == [switch.access_log]


def test_access_off_and_back_on(tmp_path, backends, observed_proxy):
    (a,) = backends("a")
    path = tmp_path / "access.log"
    proxy = observed_proxy(config_document({"web": {"servers": [a.address]}},
                                           log={"access": str(path), "format": "combined"}))
    reload_with_log(proxy, a.address, access="off", format="combined", level="warning")
    assert proxy.app.observers == [proxy.process.observability.metrics.observe]
    assert requests.get(proxy.url + "/unlogged", timeout=DEADLINE).status_code == 200

    reload_with_log(proxy, a.address, access=str(path), format="combined", level="warning")
    assert requests.get(proxy.url + "/logged", timeout=DEADLINE).status_code == 200
    logged = wait_for(lambda: lines(path), what="a line once the log is back")
    assert len(logged) == 1 and "/logged" in logged[0]
    running_logs = [s for s in proxy.process.services if type(s).__name__ == "AccessLog"]
    assert len(running_logs) == 1  # only the running writer: a replaced one is stopped and dropped


def test_the_level_applies_at_once(backends, observed_proxy):
    (a,) = backends("a")
    root = logging.getLogger()
    before = root.level
    proxy = observed_proxy(config_document({"web": {"servers": [a.address]}}))
    try:
        reload_with_log(proxy, a.address, access="off", format="combined", level="debug")
        assert root.level == logging.DEBUG
        reload_with_log(proxy, a.address, access="off", format="combined", level="error")
        assert root.level == logging.ERROR
    finally:
        root.setLevel(before)


def test_sighup_moves_the_access_log_of_the_real_command(tmp_path):
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    with named_backends("a") as (a,):
        port = free_port()
        base = proxy_config(port, a.address)

        def with_log(path, fmt):
            return base.replace('access = "off"', f'access = "{path}"\nformat = "{fmt}"')

        with running_proxy(tmp_path, with_log(first, "combined")) as run:
            assert requests.get(run.url + "/one", timeout=DEADLINE).status_code == 200
            run.rewrite(with_log(second, "json"))
            run.signal(signal.SIGHUP)
            wait_for(lambda: "access log is now" in run.log(), what="the reload", on_timeout=run.log)
            assert requests.get(run.url + "/two", timeout=DEADLINE).status_code == 200
            wait_for(lambda: lines(second), what="a line in the new file", on_timeout=run.log)
            assert json.loads(lines(second)[-1])["path"] == "/two"
            assert not any("/two" in line for line in lines(first))
            assert any('"GET /one HTTP/1.1"' in line for line in lines(first))
            run.signal(signal.SIGTERM)
            assert run.wait_exit() == 0


def test_a_request_finishing_as_a_reload_switches_logs_keeps_its_line(tmp_path, backends, observed_proxy):
    """Bug: a request thread that read the observer list just before a reload swapped access logs
    handed its line to the old writer after that writer had stopped: the line sat in a queue nobody
    drained, neither written nor counted. The new writer now takes such late lines."""
    (a,) = backends("a")
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    proxy = observed_proxy(config_document({"web": {"servers": [a.address]}},
                                           log={"access": str(first), "format": "combined"}))
    entered, release = threading.Event(), threading.Event()

    def gate(record):  # holds the request's thread inside the observer loop, on the old list
        if record.target == "/late":
            entered.set()
            release.wait(DEADLINE)

    proxy.app.observers = [gate, *proxy.app.observers]
    answers = []
    client = threading.Thread(target=lambda: answers.append(requests.get(proxy.url + "/late", timeout=DEADLINE)))
    client.start()
    try:
        assert entered.wait(DEADLINE)
        reload_with_log(proxy, a.address, access=str(second), format="combined", level="warning")
    finally:
        release.set()
        client.join(DEADLINE)
    assert answers and answers[0].status_code == 200
    wait_for(lambda: any("/late" in line for line in lines(first) + lines(second)), what="the late line",
             on_timeout=lambda: access_log_total(proxy))
    assert requests.get(proxy.url + "/after", timeout=DEADLINE).status_code == 200
    wait_for(lambda: any("/after" in line for line in lines(second)), what="a line after it")
    wait_for(lambda: 'pyproxy_access_log_lines_total{outcome="written"} 2' in access_log_total(proxy),
             what="both lines counted once", on_timeout=lambda: access_log_total(proxy))


F_SETPIPE_SZ = 1031  # fcntl: the pipe's capacity (Linux)


def queued_bytes(fd: int) -> int:
    """Bytes waiting in a pipe (FIONREAD)."""
    count = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, count)
    return count[0]


def test_a_reload_does_not_wait_for_an_access_log_writer_stuck_on_its_destination(
        tmp_path, backends, observed_proxy, monkeypatch):
    """Bug: switching away from an access log whose destination stalled (a FIFO nobody reads) waited
    for its writer for STOP_TIMEOUT (5 s) inside the reload: with SIGHUP that is the accept loop, so
    no connection was served meanwhile. The old writer now finishes on its own thread; the reload
    goes on at once, and the old writer's lines are still written once its reader comes back."""
    monkeypatch.setattr(access_log_module, "STOP_TIMEOUT", 60.0)  # a wait would outlast the test's
    (a,) = backends("a")
    fifo, second = tmp_path / "access.fifo", tmp_path / "second.log"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # opened, not read: the writer blocks when full
    try:
        fcntl.fcntl(reader, F_SETPIPE_SZ, 4096)
        proxy = observed_proxy(config_document({"web": {"servers": [a.address]}},
                                               log={"access": str(fifo), "format": "combined"}))
        writer = proxy.process.observability.access_log
        with requests.Session() as session:
            sent = 0
            while (queued_bytes(reader) < 4096 or not writer._pending) and sent < 1000:  # a blocked write
                assert session.get(proxy.url + "/" + "x" * 100, timeout=DEADLINE).status_code == 200
                sent += 1
        assert writer._pending, "the FIFO never filled"
        reloading = threading.Thread(target=reload_with_log, args=(proxy, a.address),
                                     kwargs={"access": str(second), "format": "combined", "level": "warning"})
        reloading.start()
        reloading.join(DEADLINE)
        assert not reloading.is_alive(), "the reload waited for the stuck access log writer"
        assert requests.get(proxy.url + "/after", timeout=DEADLINE).status_code == 200
        wait_for(lambda: lines(second), what="a line in the new file")
        received = b""
        while received.count(b"\n") < sent:  # the reader comes back: every old line arrives
            wait_for(lambda: select.select([reader], [], [], 0)[0], timeout=DEADLINE, what="more old lines")
            received += os.read(reader, 65536)
        assert received.count(b"\n") == sent
    finally:
        os.close(reader)
    wait_for(lambda: f'pyproxy_access_log_lines_total{{outcome="written"}} {sent + 1}' in access_log_total(proxy),
             what="every line counted once", on_timeout=lambda: access_log_total(proxy))


def test_the_written_total_never_counts_a_retired_log_twice_nor_goes_down(tmp_path, backends, observed_proxy):
    """Bug: a reload added the old writer's count to the retired totals before it made the new writer
    the one /metrics reads: a scrape in between counted the old writer's lines twice, and the next
    one saw the counter go down (a counter reset to Prometheus)."""
    (a,) = backends("a")
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    proxy = observed_proxy(config_document({"web": {"servers": [a.address]}}, log={"access": str(logs[0])}))
    metrics = proxy.process.observability.metrics
    for _ in range(5):
        assert requests.get(proxy.url + "/x", timeout=DEADLINE).status_code == 200
    wait_for(lambda: metrics.snapshot()["access_log"].get("written") == 5, what="the five lines written")
    seen, done = [], threading.Event()

    def scrape() -> None:
        while not done.is_set() and len(seen) < 1_000_000:
            seen.append(metrics.snapshot()["access_log"].get("written", 0))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # threads take turns often: the scrapes land all through each switch
    scraper = threading.Thread(target=scrape)
    scraper.start()
    try:
        for index in range(1, 41):  # each switch retires the running writer
            reload_with_log(proxy, a.address, access=str(logs[index % 2]))
    finally:
        done.set()
        scraper.join(DEADLINE)
        sys.setswitchinterval(interval)
    assert max(seen) == 5, f"counted {max(seen)} lines of 5"
    assert all(later >= earlier for earlier, later in zip(seen, seen[1:])), "the total went down"
