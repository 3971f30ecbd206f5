"""Server state: counters, health, passive ejection (fake clock), thread safety."""

import logging
import sys
import threading
import time

import pytest

from proxy.upstream.servers import Server, format_address
from tests.support.timing import FakeClock


@pytest.fixture
def clock():
    return FakeClock()


# -- identity -----------------------------------------------------------------------

@pytest.mark.parametrize("host, port, expected", [
    ("127.0.0.1", 9001, "127.0.0.1:9001"),
    ("backend.local", 80, "backend.local:80"),
    ("::1", 8080, "[::1]:8080"),
    ("2001:db8::7", 443, "[2001:db8::7]:443"),
])
def test_address_formats_ipv6_in_brackets(host, port, expected):
    assert format_address(host, port) == expected
    assert Server(host, port).address == expected


def test_configuration_is_exposed():
    server = Server("10.0.0.1", 8443, weight=3, max_connections=7, tls=True)
    assert (server.host, server.port, server.weight, server.max_connections, server.tls) == \
        ("10.0.0.1", 8443, 3, 7, True)


@pytest.mark.parametrize("kwargs", [
    {"port": 0}, {"port": 65536}, {"weight": 0}, {"max_connections": -1},
    {"max_fails": -1}, {"fail_timeout": 0},
])
def test_invalid_configuration_is_rejected(kwargs):
    arguments = {"host": "h", "port": 80} | kwargs
    with pytest.raises(ValueError):
        Server(**arguments)


def test_servers_compare_by_identity():
    assert Server("h", 80) != Server("h", 80)
    assert len({Server("h", 80), Server("h", 80)}) == 2


# -- acquire / release ------------------------------------------------------------

def test_acquire_and_release_count_requests():
    server = Server("h", 80)
    assert server.try_acquire() and server.try_acquire()
    assert (server.active_requests, server.requests_total) == (2, 2)
    server.release()
    assert (server.active_requests, server.requests_total) == (1, 2)


def test_release_never_goes_negative(caplog):
    server = Server("h", 80)
    server.try_acquire()
    server.release()
    with caplog.at_level(logging.WARNING, logger="pyproxy.health"):
        server.release()
        server.release()
    assert server.active_requests == 0
    assert "without a matching" in caplog.text
    # The counter still works after a spurious release.
    assert server.try_acquire()
    assert server.active_requests == 1


def test_max_connections_limits_acquire():
    server = Server("h", 80, max_connections=2)
    assert server.try_acquire() and server.try_acquire()
    assert not server.available()
    assert not server.try_acquire()
    assert server.requests_total == 2
    assert server.state == "up"  # busy is not down
    server.release()
    assert server.available() and server.try_acquire()


def test_concurrent_acquire_never_exceeds_max_connections():
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # interleave check-then-act races for real
    try:
        most_seen, acquired_count, server = _hammer_one_server()
    finally:
        sys.setswitchinterval(previous)
    assert server.active_requests == 0
    assert server.requests_total == acquired_count
    assert most_seen == 3  # reached the limit (the test had teeth), never past it


def _hammer_one_server():
    server = Server("h", 80, max_connections=3)
    lock = threading.Lock()
    in_flight = 0
    most_seen = 0
    acquired_count = 0
    start = threading.Barrier(8)

    def worker():
        nonlocal in_flight, most_seen, acquired_count
        start.wait()
        for _ in range(5000):
            if not server.try_acquire():
                continue
            with lock:
                in_flight += 1
                most_seen = max(most_seen, in_flight, server.active_requests)
                acquired_count += 1
            time.sleep(0)  # hold the slot while other threads run
            with lock:
                in_flight -= 1
            server.release()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    return most_seen, acquired_count, server


# -- active health ------------------------------------------------------------------

def test_set_health_changes_state_and_reports_change(clock, caplog):
    server = Server("h", 80, clock=clock)
    assert (server.state, server.state_reason, server.state_since) == ("up", "initial", 1000.0)
    clock.advance(5)
    with caplog.at_level(logging.INFO, logger="pyproxy.health"):
        assert server.set_health(False, "3 failed checks: connection refused") is True
    assert not server.available() and not server.try_acquire()
    assert (server.state, server.state_reason, server.state_since) == \
        ("down", "3 failed checks: connection refused", 1005.0)
    assert "h:80 is unhealthy: 3 failed checks: connection refused" in caplog.text

    clock.advance(5)
    assert server.set_health(False, "still refused") is False  # no change
    assert server.state_since == 1005.0
    assert server.set_health(True, "2 checks passed") is True
    assert (server.state, server.state_reason, server.state_since) == ("up", "2 checks passed", 1010.0)
    assert server.available()


# -- passive ejection ---------------------------------------------------------------

def test_max_fails_within_window_ejects(clock, caplog):
    server = Server("h", 80, max_fails=3, fail_timeout=10, clock=clock)
    server.record_failure("connection refused")
    clock.advance(4)
    server.record_failure("connection refused")
    assert server.available()
    clock.advance(4)  # third failure 8s after the first: inside the 10s window
    with caplog.at_level(logging.INFO, logger="pyproxy.health"):
        server.record_failure("read timeout")
    assert not server.available() and not server.try_acquire()
    assert server.state == "down"
    assert server.state_reason == "ejected: read timeout"
    assert server.state_since == 1008.0
    assert server.failures_total == 3
    assert "server h:80 ejected: read timeout" in caplog.text


def test_failures_spread_beyond_window_do_not_eject(clock):
    server = Server("h", 80, max_fails=3, fail_timeout=10, clock=clock)
    for _ in range(20):
        server.record_failure("reset")
        clock.advance(5)  # at most two failures in any 10s window
    assert server.available()
    assert server.state == "up"
    assert server.failures_total == 20


def test_failure_exactly_fail_timeout_old_has_expired(clock):
    server = Server("h", 80, max_fails=2, fail_timeout=10, clock=clock)
    server.record_failure("reset")
    clock.advance(10)
    server.record_failure("reset")
    assert server.available()
    clock.advance(9.999)
    server.record_failure("reset")
    assert not server.available()


def test_ejection_expires_after_fail_timeout(clock, caplog):
    server = Server("h", 80, max_fails=1, fail_timeout=10, clock=clock)
    server.record_failure("refused")
    clock.advance(9.9)
    assert not server.available() and not server.try_acquire()
    clock.advance(0.1)
    assert server.available()
    with caplog.at_level(logging.INFO, logger="pyproxy.health"):
        assert server.try_acquire()
    assert server.state == "up"
    assert server.state_reason == "ejection expired"
    assert server.state_since == 1010.0  # when it came back, not when we noticed
    assert "ejection expired" in caplog.text


def test_failures_while_ejected_do_not_extend_ejection(clock):
    server = Server("h", 80, max_fails=1, fail_timeout=10, clock=clock)
    server.record_failure("refused")
    clock.advance(5)
    server.record_failure("in-flight request failed")  # from a request started earlier
    clock.advance(5)
    assert server.available()
    assert server.failures_total == 2


def test_failures_count_within_the_window_whatever_succeeds_between(clock):
    """docs/configuration.md: "this many failed attempts within fail_timeout". Successes between them (a server
    failing every other request) forgive nothing; only time does."""
    server = Server("h", 80, max_fails=3, fail_timeout=10, clock=clock)
    for _ in range(2):
        server.record_failure("reset")
        clock.advance(1)  # a success or two would land here: the server is not told of them
    assert server.available()
    server.record_failure("reset")
    assert not server.available()


def test_max_fails_zero_never_ejects(clock):
    server = Server("h", 80, max_fails=0, clock=clock)
    for _ in range(100):
        server.record_failure("refused")
    assert server.available() and server.failures_total == 100


def test_unhealthy_reason_shows_after_ejection_ends(clock):
    server = Server("h", 80, max_fails=1, fail_timeout=10, clock=clock)
    server.record_failure("refused")
    server.set_health(False, "check failed")
    assert server.state_reason == "ejected: refused"
    clock.advance(10)
    assert (server.state, server.state_reason) == ("down", "check failed")
    assert server.state_since == 1000.0  # down the whole time
    server.set_health(True, "check passed")
    assert (server.state, server.state_reason, server.state_since) == ("up", "check passed", 1010.0)


def test_healthy_again_while_ejected_stays_down(clock):
    server = Server("h", 80, max_fails=1, fail_timeout=10, clock=clock)
    server.set_health(False, "check failed")
    server.record_failure("refused")
    assert server.set_health(True, "check passed") is True
    assert (server.state, server.state_reason) == ("down", "ejected: refused")
    clock.advance(10)
    assert (server.state, server.state_reason) == ("up", "ejection expired")


def test_snapshot(clock):
    server = Server("::1", 9001, weight=2, max_fails=1, clock=clock)
    server.try_acquire()
    server.record_failure("reset")
    assert server.snapshot() == {
        "address": "[::1]:9001", "state": "down", "reason": "ejected: reset", "would_eject": False, "slow_start_remaining": 0.0, "since": 1000.0,
        "weight": 2, "admin_state": "enabled", "active_requests": 1, "requests_total": 1, "failures_total": 1,
    }


def test_no_logging_while_holding_the_lock(clock):
    """A log handler that takes the server's lock must not deadlock (docs/development.md)."""
    server = Server("h", 80, max_fails=1, fail_timeout=10, clock=clock)
    seen = []

    class LockProbe(logging.Handler):
        def emit(self, record):
            acquired = server._lock.acquire(timeout=1)
            seen.append(acquired)
            if acquired:
                server._lock.release()

    logger = logging.getLogger("pyproxy.health")
    probe = LockProbe(level=logging.INFO)
    old_level = logger.level
    logger.addHandler(probe)
    logger.setLevel(logging.INFO)
    try:
        server.record_failure("refused")      # ejected
        clock.advance(10)
        server.try_acquire()                  # expiry noticed
        server.set_health(False, "check")     # health change
        server.release()
        server.release()                      # unmatched release warning
    finally:
        logger.removeHandler(probe)
        logger.setLevel(old_level)
    assert seen == [True, True, True, True]


def test_a_health_change_is_announced_once_not_by_every_worker(caplog):
    """The supervisor logs a verdict at info; workers applying it (announce=False) only at debug."""
    checked, worker = Server("h", 80), Server("h", 80)
    with caplog.at_level(logging.DEBUG, logger="pyproxy.health"):
        assert checked.set_health(False, "status 500")
        assert worker.set_health(False, "status 500", announce=False)
    levels = [record.levelno for record in caplog.records if "server h:80 is unhealthy" in record.getMessage()]
    assert levels == [logging.INFO, logging.DEBUG]
    assert worker.state == "down"
