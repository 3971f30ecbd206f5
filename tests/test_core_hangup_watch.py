"""core.hangup_watch.HangupWatch's own thread: it ends when nothing is watched for a while, and a
watch made as it ends must still be looked at."""

from __future__ import annotations

import socket
import threading

from core.hangup_watch import HangupWatch
from tests.support.timing import wait_for

WAIT = 10.0


def test_a_watch_made_as_the_idle_thread_ends_is_still_checked():
    # The thread's last look at an empty table and its exit were a check-then-act: a watch() made
    # between them found the thread still set, started none, and its client's hang-up went unnoticed
    # until the upstream answered. Here the watch() is made exactly there.
    watch = HangupWatch(interval=0.01)
    client, client_peer = socket.socketpair()
    upstream, upstream_peer = socket.socketpair()
    inserted, late = threading.Event(), []

    class Table(dict):
        armed = True

        def __setitem__(self, key, value):
            super().__setitem__(key, value)
            inserted.set()

        def __len__(self):
            size = super().__len__()
            exiting = (threading.current_thread().name == "pyproxy-hangups" and watch._start_lock.locked())
            if self.armed and size == 0 and exiting:
                self.armed = False
                helper = threading.Thread(target=lambda: late.append(watch.watch(client, upstream)))
                helper.start()
                helper.join(WAIT)  # the watch() is over before the thread acts on what it saw
            return size

    watch._watched = Table()
    with client, upstream, upstream_peer:
        client_peer.close()  # this client is gone already
        watch.unwatch(watch.watch(socket.socket(), socket.socket()))  # starts the thread, which idles out
        wait_for(lambda: late, timeout=WAIT, what="the watch made as the thread ended")
        wait_for(lambda: late[0].gone, timeout=WAIT, what="the gone client noticed")
        upstream_peer.settimeout(WAIT)
        assert upstream_peer.recv(1) == b""  # its upstream socket was shut down


def test_every_wait_on_one_gone_client_is_ended_in_one_look():
    # HTTP/2: several streams of one connection wait for their upstreams' first answers, each watched
    # with the same client socket. The check mapped a descriptor to one registration, so it ended one
    # stream per look (a worker per interval), the others held until their turn.
    from tests.support.timing import FakeClock

    clock = FakeClock()
    watch = HangupWatch(interval=0.5, clock=clock, run_thread=False)
    client, client_peer = socket.socketpair()
    pairs = [socket.socketpair() for _ in range(3)]
    try:
        streams = [watch.watch(client, upstream) for upstream, _ in pairs]
        client_peer.close()
        watch.check()  # first seen
        clock.advance(0.6)
        watch.check()
        assert [watched.gone for watched in streams] == [True, True, True]
        for (_, upstream_peer), watched in zip(pairs, streams):
            assert watch.unwatch(watched) is True
            upstream_peer.settimeout(WAIT)
            assert upstream_peer.recv(1) == b""
    finally:
        client.close()
        for upstream, upstream_peer in pairs:
            upstream.close()
            upstream_peer.close()
