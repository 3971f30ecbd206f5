"""server.cpu_affinity: each worker process (all its threads) pinned to one CPU.

The pinning itself is checked on the real ``pyproxy`` command in a subprocess (pinning the test
process would slow every other test), by reading each thread's allowed CPUs from /proc.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import requests

from core.cpu_affinity import available_cpus, cpu_for_worker, current_cpu
from proxy.config.schema import ConfigError, parse_config
from tests.support.backends import named_backends
from tests.support.ports import free_port
from tests.support.processes import children, proxy_config, running_proxy
from tests.support.timing import wait_for

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux CPU affinity only")]


def thread_cpus(pid: int) -> dict[int, set[int]]:
    """{thread id: the CPUs it may run on} for every thread of ``pid``."""
    result = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            result[int(task.name)] = os.sched_getaffinity(int(task.name))
        except ProcessLookupError:
            continue  # the thread ended while we looked
    return result


def config_with(port: int, address: str, affinity: str, workers: int = 1) -> str:
    return proxy_config(port, address, workers=workers).replace(
        "[server]\n", f"[server]\ncpu_affinity = {affinity}\n", 1)


# -- choosing a CPU --------------------------------------------------------------------------------

def test_workers_take_the_cpus_in_turn():
    assert [cpu_for_worker(slot, [2, 5, 7]) for slot in range(5)] == [2, 5, 7, 2, 5]


def test_a_single_process_stays_where_the_scheduler_put_it_or_takes_the_first_allowed():
    cpus = available_cpus()
    assert current_cpu() in cpus
    assert cpu_for_worker(None, cpus) in cpus
    assert cpu_for_worker(None, [cpu + 1000 for cpu in cpus]) == cpus[0] + 1000  # never where we run


def test_no_cpus_means_no_pinning():
    assert cpu_for_worker(0, []) is None
    assert cpu_for_worker(None, []) is None


# -- the config key --------------------------------------------------------------------------------

def server_config(value) -> dict:
    return {"server": {"cpu_affinity": value},
            "routes": [{"path": "/", "upstream": "app"}],
            "upstreams": {"app": {"servers": ["127.0.0.1:9"]}}}


def test_default_is_auto_and_off_or_cpu_lists_are_accepted():
    assert parse_config(server_config("auto"), "t.toml").server.cpu_affinity == "auto"
    assert parse_config(server_config("off"), "t.toml").server.cpu_affinity == "off"
    first = available_cpus()[0]
    assert parse_config(server_config([first]), "t.toml").server.cpu_affinity == (first,)
    default = {key: value for key, value in server_config("auto").items() if key != "server"}
    assert parse_config(default, "t.toml").server.cpu_affinity == "auto"


@pytest.mark.parametrize("value, problem", [
    ("sometimes", 'expected "auto", "off" or a list of CPU numbers'),
    ([], 'expected "auto", "off" or a list of CPU numbers'),
    ([-1], 'expected "auto", "off" or a list of CPU numbers'),
    ([True], 'expected "auto", "off" or a list of CPU numbers'),
    ([100000], "CPU 100000 not available here"),
])
def test_bad_values_name_the_key(value, problem):
    with pytest.raises(ConfigError) as caught:
        parse_config(server_config(value), "t.toml")
    assert any(p.startswith("t.toml: server.cpu_affinity:") and problem in p for p in caught.value.problems), \
        caught.value.problems


# -- the real command --------------------------------------------------------------------------------

def test_every_thread_of_the_proxy_is_pinned_to_the_cpu_asked_for(tmp_path):
    cpu = available_cpus()[-1]
    with named_backends("a") as (a,):
        port = free_port()
        with running_proxy(tmp_path, config_with(port, a.address, f"[{cpu}]")) as run:
            assert requests.get(run.url, timeout=5).status_code == 200
            threads = thread_cpus(run.proc.pid)
            assert len(threads) >= 3  # the loop, pool threads, the health scheduler...
            assert all(cpus == {cpu} for cpus in threads.values()), threads
            assert f"pinned to CPU {cpu}" in run.log()


def test_off_leaves_the_proxy_free_to_run_anywhere(tmp_path):
    with named_backends("a") as (a,):
        with running_proxy(tmp_path, config_with(free_port(), a.address, '"off"')) as run:
            assert requests.get(run.url, timeout=5).status_code == 200
            assert all(cpus == set(available_cpus()) for cpus in thread_cpus(run.proc.pid).values())
            assert "pinned" not in run.log()


@pytest.mark.skipif(len(available_cpus()) < 2, reason="needs two CPUs")
def test_auto_puts_each_worker_on_its_own_cpu_and_leaves_the_supervisor_free(tmp_path):
    with named_backends("a") as (a,):
        config = config_with(free_port(), a.address, '"auto"', workers=2)
        with running_proxy(tmp_path, config) as run:
            wait_for(lambda: run.log().count(") ready") == 2, what="both workers ready", on_timeout=run.log)
            workers = children(run.proc.pid)
            assert len(workers) == 2
            per_worker = [set().union(*thread_cpus(pid).values()) for pid in workers]
            assert all(len(cpus) == 1 for cpus in per_worker), per_worker
            assert per_worker[0] != per_worker[1]
            assert set().union(*thread_cpus(run.proc.pid).values()) == set(available_cpus())
