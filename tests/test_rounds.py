"""RoundLoop (proxy/upstream/rounds.py): the thread the health checker and DNS discovery run on."""

from __future__ import annotations

import logging
import threading

from proxy.upstream.rounds import RoundLoop

WAIT = 10.0  # a bound on waiting for the loop's thread, never an expectation


def test_a_failed_round_is_logged_and_the_loop_goes_on(caplog):
    rounds = []
    third = threading.Event()

    def run_once() -> float:
        rounds.append(len(rounds))
        if len(rounds) == 1:
            raise RuntimeError("resolver exploded")
        if len(rounds) >= 3:
            third.set()
        return 0.0  # due again at once

    loop = RoundLoop(run_once, "test-rounds", "test round", idle_wait=0.0, log=logging.getLogger("test.rounds"))
    with caplog.at_level(logging.ERROR, logger="test.rounds"):
        loop.start()
        try:
            assert third.wait(WAIT)
        finally:
            loop.stop()
    assert "test round failed" in caplog.text and "resolver exploded" in caplog.text


def test_kick_runs_a_round_before_its_wait_is_over_and_stop_ends_the_thread():
    started = threading.Semaphore(0)

    def run_once() -> float:
        started.release()
        return 3600.0  # without a kick the next round is an hour away

    loop = RoundLoop(run_once, "test-rounds", "test round", idle_wait=1.0, log=logging.getLogger("test.rounds"))
    loop.start()
    try:
        assert started.acquire(timeout=WAIT)
        loop.kick()
        assert started.acquire(timeout=WAIT)
    finally:
        loop.stop()
    assert not loop._thread.is_alive()
