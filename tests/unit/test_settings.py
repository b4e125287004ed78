"""Settings are validated at start-up; unknown variables suggest the right name."""

from __future__ import annotations

import re

import pytest

from agentfabric.errors import SettingsError
from agentfabric.settings import load_settings


def test_defaults_point_at_the_embedded_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("AGENTFABRIC_BOOTSTRAP_SERVERS", "AGENTFABRIC_REDIS_URL"):
        monkeypatch.delenv(var, raising=False)
    s = load_settings()
    assert s.bootstrap_servers == "127.0.0.1:19092"
    assert s.fetch_max_wait_ms == 10


def test_unknown_variable_suggests_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTFABRIC_BOOTSTRAP_SERVER", "x:1")
    with pytest.raises(SettingsError, match=re.escape(
            "unknown setting AGENTFABRIC_BOOTSTRAP_SERVER; did you mean "
            "AGENTFABRIC_BOOTSTRAP_SERVERS?")):
        load_settings()


@pytest.mark.parametrize(("var", "value", "message"), [
    ("AGENTFABRIC_PARTITIONS", "0", "AGENTFABRIC_PARTITIONS: Input should be greater than or "
                                    "equal to 1"),
    ("AGENTFABRIC_BOOTSTRAP_SERVERS", "nohost", "'nohost' is not host:port"),
    ("AGENTFABRIC_REDIS_URL", "http://x", "must start with redis://"),
])
def test_invalid_values(monkeypatch: pytest.MonkeyPatch, var: str, value: str,
                        message: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError, match=message):
        load_settings()


def test_redis_password_is_masked() -> None:
    s = load_settings(redis_url="redis://user:hunter2@db:6379/0")
    assert "hunter2" not in s.secret_free_redis_url
    assert s.secret_free_redis_url == "redis://***@db:6379/0"
