"""The bench's HTTPS scenarios (scripts/bench_lib: certificate.py, h2load.py, the TLS listeners in
configs.py): a real nginx started by the harness with the generated config, driven by real h2load
over HTTP/2 and HTTP/1.1. pyproxy's part of these scenarios is its HTTPS listener config, checked
by the config parser here. scripts/bench_lib is put on sys.path as scripts/bench itself does."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from bench_lib import configs, report  # noqa: E402
from bench_lib.certificate import make_certificate  # noqa: E402
from bench_lib.h2load import H2loadError, parse_report, run_h2load  # noqa: E402
from bench_lib.scenarios import SCENARIOS, Measurement, takes_part  # noqa: E402
from bench_lib.system import find_tool  # noqa: E402
from bench_lib.targets import Lab, TargetFactory, start_backends  # noqa: E402

from proxy.config.schema import parse_config  # noqa: E402

TLS_SCENARIOS = [scenario for scenario in SCENARIOS if scenario.tls]
RUN_SECONDS = 1.0


def test_only_proxies_with_an_https_listener_take_part_in_tls_scenarios():
    assert {scenario.key for scenario in TLS_SCENARIOS} == {"h2", "h2-one", "h1-tls"}
    for scenario in TLS_SCENARIOS:
        assert [name for name in ("direct", "nginx", "haproxy", "pyproxy", "pyproxy-1w", "relay-pool2",
                                  "python-pyproxy") if takes_part(scenario, name)] == [
            "nginx", "haproxy", "pyproxy", "pyproxy-1w"]


def test_pyproxy_bench_config_with_https_listener_is_valid(tmp_path):
    certificate = make_certificate(tmp_path)
    shape = configs.ProxyShape(18080, [18081, 18082], 1, 32, tls_port=18443, certificate=certificate)
    config = parse_config(tomllib.loads(configs.pyproxy(shape)), "bench.toml")
    addresses = [listener.address for listener in config.server.listen]
    assert addresses == ["127.0.0.1:18080", "127.0.0.1:18443"]
    assert str(config.server.listen[1].tls_cert) == str(certificate.cert)


def test_h2load_report_without_alpn_h2_is_a_clear_failure():
    with pytest.raises(H2loadError, match="no protocol negotiated"):
        parse_report("starting benchmark...\nNo protocol negotiated. Aborted.\n")


def test_h2_one_goal_is_measured_against_pyproxys_own_http1_over_tls():
    measurements = [Measurement("h2-one", "pyproxy", "req/s", value=900.0),
                     Measurement("h1-tls", "pyproxy", "req/s", value=1000.0)]
    assert report.goal_verdict(measurements, "h2-one") == "0.90x own h1-tls: met"
    measurements[0].value = 800.0
    assert report.goal_verdict(measurements, "h2-one") == "0.80x own h1-tls: missed: <0.9x"


@pytest.mark.skipif(not (find_tool("nginx") and find_tool("h2load")), reason="needs nginx and h2load")
def test_nginx_https_listener_serves_h2_and_http1_to_h2load():
    with Lab(keep_files=False) as lab:
        tools = {"nginx": find_tool("nginx")}
        backends = start_backends(lab, tools, 1)
        factory = TargetFactory(lab, backends, tools, 1, 4, REPO, certificate=make_certificate(lab.root))
        target = factory.start("nginx")
        assert target.failure is None and target.tls_port
        url = f"https://127.0.0.1:{target.tls_port}/small"
        h2 = run_h2load(find_tool("h2load"), url, connections=2, streams=4, duration_s=RUN_SECONDS)
        http1 = run_h2load(find_tool("h2load"), url, connections=2, streams=4, duration_s=RUN_SECONDS,
                           http1=True)
    assert (h2.protocol, http1.protocol) == ("h2", "http/1.1")
    for run in (h2, http1):
        assert run.requests > 0 and run.errors == 0
        assert run.p50_ms is not None and run.p99_ms >= run.p50_ms
