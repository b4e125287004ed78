"""The consumer group's session is a setting; the worker's and the ingress's consumers are
built with it, a heartbeat every second (three per session below 3 s)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

import streams.kafka
from agentfabric.ingress import runstore
from agentfabric.settings import Settings
from streams.kafka import group_timeouts, make_consumer


def test_the_default_is_the_session_the_fabric_always_had(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AGENTFABRIC_SESSION_TIMEOUT_MS", raising=False)
    assert group_timeouts(Settings()) == {"session_timeout_ms": 10_000,
                                          "heartbeat_interval_ms": 1_000,
                                          "rebalance_timeout_ms": 10_000,
                                          "request_timeout_ms": 40_000}


@pytest.mark.parametrize(("session", "heartbeat", "rebalance", "request_ms"), [
    (6_000, 1_000, 10_000, 40_000), (2_400, 800, 10_000, 40_000),
    (45_000, 1_000, 45_000, 50_000)])
def test_the_other_timeouts_follow_the_session(session: int, heartbeat: int, rebalance: int,
                                               request_ms: int) -> None:
    timeouts = group_timeouts(Settings(session_timeout_ms=session))
    assert timeouts == {"session_timeout_ms": session, "heartbeat_interval_ms": heartbeat,
                        "rebalance_timeout_ms": rebalance, "request_timeout_ms": request_ms}


def test_a_session_under_a_second_is_refused_at_start_up() -> None:
    with pytest.raises(ValidationError, match="session_timeout_ms"):
        Settings(session_timeout_ms=500)


def test_both_group_consumers_use_it(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, object]] = []

    def record(*_: object, **options: object) -> object:
        seen.append(options)
        return object()

    monkeypatch.setattr(streams.kafka, "AIOKafkaConsumer", record)
    monkeypatch.setattr(runstore, "AIOKafkaConsumer", record)
    s = Settings(session_timeout_ms=7_000)
    make_consumer(s, "group", "topic")
    runstore._consumer(s, "runs")
    for options in seen:
        assert (options["session_timeout_ms"], options["heartbeat_interval_ms"]) == (7_000, 1_000)
    assert len(seen) == 2
