"""Defaults and limits that keep a valid-looking config and a busy proxy reliable: the health check
timeout follows a short interval, the admin listener is bounded, the only server of an upstream is
never ejected by passive checks, and the thread pool's idle timeout is a config key."""
from __future__ import annotations

import pytest

from proxy.config.schema import ConfigError, parse_config
from proxy.config.starter import STARTER_CONFIG


def config_with_health(health: dict) -> dict:
    return {"routes": [{"upstream": "web"}],
            "upstreams": {"web": {"servers": ["127.0.0.1:3000"], "health": health}}}


# --- health check timeout defaults to the interval when that is shorter -----------------------

def test_a_short_interval_alone_is_accepted_and_lowers_the_timeout():
    config = parse_config(config_with_health({"interval": "300ms"}), "proxy.toml")
    health = config.upstreams["web"].health
    assert (health.interval, health.timeout) == (0.3, 0.3)


def test_a_long_interval_keeps_the_two_second_timeout():
    config = parse_config(config_with_health({"interval": "10s"}), "proxy.toml")
    assert config.upstreams["web"].health.timeout == 2.0


def test_an_explicit_timeout_longer_than_the_interval_is_still_refused():
    with pytest.raises(ConfigError) as caught:
        parse_config(config_with_health({"interval": "300ms", "timeout": "1s"}), "proxy.toml")
    assert caught.value.problems == [
        "proxy.toml: upstreams.web.health.timeout: must not exceed interval (1s > 300ms)"]


def test_the_starter_says_the_timeout_follows_a_shorter_interval():
    timeout_line = next(line for line in STARTER_CONFIG.splitlines() if line.startswith("# timeout"))
    assert "interval" in timeout_line
