"""Redis errors translated where they enter: every form is a clear 'unavailable' state whose
one-sentence reason says what to fix, and never shows a password."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from redis import exceptions as redis_errors

from agentfabric.errors import UnavailableError
from streams.batching import redis_unavailable
from streams.joins import RedisJoinStore

OOM_TEXT = "command not allowed when used memory > 'maxmemory'."
# An error inside a Lua script (Redis 6.2) arrives as a plain ResponseError with the code inside.
SCRIPT_OOM = ("Error running script (call to f_5b7e): @user_script:2: @user_script: 2: -OOM "
              + OOM_TEXT)


@pytest.mark.parametrize(("error", "says"), [
    # out of memory: raise maxmemory, keep noeviction
    (redis_errors.OutOfMemoryError(OOM_TEXT), ["OOM", "maxmemory", "noeviction"]),
    (redis_errors.ResponseError("OOM " + OOM_TEXT), ["OOM", "maxmemory", "noeviction"]),
    (redis_errors.ResponseError(SCRIPT_OOM), ["OOM", "maxmemory", "noeviction"]),
    # every connection of the pool busy: Redis's load, or a bigger pool
    (redis_errors.ConnectionError("No connection available."),
     ["in use", "AGENTFABRIC_REDIS_POOL_WAIT_S", "AGENTFABRIC_REDIS_MAX_CONNECTIONS"]),
    (redis_errors.ConnectionError("Too many connections"),
     ["in use", "AGENTFABRIC_REDIS_MAX_CONNECTIONS"]),
    # a read-only replica: point the URL at the primary
    (redis_errors.ReadOnlyError("You can't write against a read only replica."),
     ["READONLY", "AGENTFABRIC_REDIS_URL", "primary"]),
    (redis_errors.ResponseError("READONLY You can't write against a read only replica."),
     ["READONLY", "AGENTFABRIC_REDIS_URL", "primary"]),
    # persistence failing: disk space or permissions
    (redis_errors.ResponseError(
        "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to "
        "persist to disk."), ["MISCONF", "disk"]),
    # someone else writes our keys: the prefix setting
    (redis_errors.ResponseError(
        "WRONGTYPE Operation against a key holding the wrong kind of value"),
     ["WRONGTYPE", "AGENTFABRIC_TOPIC_PREFIX", "AGENTFABRIC_REDIS_URL"]),
    (redis_errors.ResponseError(
        "Error running script (call to f_1): @user_script:2: WRONGTYPE Operation against a "
        "key holding the wrong kind of value"), ["WRONGTYPE", "AGENTFABRIC_TOPIC_PREFIX"]),
    # credentials: the URL
    (redis_errors.AuthenticationError("Authentication required."),
     ["credentials", "AGENTFABRIC_REDIS_URL"]),
    (redis_errors.ResponseError("NOAUTH Authentication required."),
     ["NOAUTH", "AGENTFABRIC_REDIS_URL"]),
    (redis_errors.ResponseError("WRONGPASS invalid username-password pair"),
     ["WRONGPASS", "AGENTFABRIC_REDIS_URL"]),
    (redis_errors.NoPermissionError("this user has no permissions to run the 'evalsha' command"),
     ["NOPERM", "ACL"]),
    # loading after a restart: nothing to fix, it resumes
    (redis_errors.BusyLoadingError("Redis is loading the dataset in memory"),
     ["LOADING", "resume"]),
    # down or slow: start it / check it
    (redis_errors.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused."),
     ["Redis is unavailable", "ConnectionError", "127.0.0.1:6379", "agentfabric up",
      "AGENTFABRIC_REDIS_URL"]),
    (ConnectionRefusedError(111, "Connection refused"),
     ["Redis is unavailable", "AGENTFABRIC_REDIS_URL"]),
    (redis_errors.TimeoutError("Timeout reading from socket"),
     ["did not answer in time", "TimeoutError", "network"]),
    (TimeoutError(), ["did not answer in time", "network"]),
])
def test_each_redis_error_says_what_to_fix(error: BaseException, says: list[str]) -> None:
    translated = redis_unavailable(error)
    assert isinstance(translated, UnavailableError)
    for words in says:
        assert words in translated.reason, (words, translated.reason)
    assert "retried" in translated.reason or "wait" in translated.reason \
        or "resume" in translated.reason


def test_the_operation_is_named_and_the_retry_clause_can_be_left_out() -> None:
    reason = redis_unavailable(redis_errors.OutOfMemoryError(OOM_TEXT), doing="a parallel join",
                               retried=False).reason
    assert "during a parallel join" in reason
    assert "wait" not in reason
    assert reason.count(";") == 1  # the fix keeps its own clause: noeviction


@pytest.mark.parametrize("text", [
    "Error connecting to redis://:s3cret-pw@redis.internal:6379/0",
    "Error connecting to rediss://app:s3cret-pw@redis.internal:6379/0",
    "ERR AUTH failed for password=s3cret-pw",
    "Error connecting with Bearer s3cret-pw",
])
@pytest.mark.parametrize("cls", [redis_errors.ConnectionError, redis_errors.ResponseError,
                                 redis_errors.TimeoutError])
def test_secrets_never_appear_in_reasons(text: str, cls: type[redis_errors.RedisError]) -> None:
    reason = redis_unavailable(cls(text)).reason
    assert "s3cret" not in reason
    assert "redis.internal" in reason or "AUTH" in reason or "Bearer" in reason


def test_every_redis_error_is_translated_to_unavailable() -> None:
    classes = [c for _, c in inspect.getmembers(redis_errors, inspect.isclass)
               if issubclass(c, redis_errors.RedisError)]
    assert len(classes) > 20
    for cls in classes:
        try:
            error = cls("some text")
        except (TypeError, ValueError):  # a few parse their text (MOVED/ASK slot host:port)
            error = cls.__new__(cls)
        translated = redis_unavailable(error)
        assert isinstance(translated, UnavailableError), cls
        assert ": " in translated.reason, cls  # a fix follows the problem
        assert translated.reason.count(". ") == 0, (cls, translated.reason)  # one sentence


class _RefusingRedis:
    """Enough of redis.asyncio.Redis for RedisJoinStore: its script raises ``error``."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def register_script(self, _source: str) -> Any:
        async def script(**_: Any) -> Any:
            raise self.error
        return script


@pytest.mark.parametrize(("error", "code"), [
    (redis_errors.OutOfMemoryError(OOM_TEXT), "OOM"),
    (redis_errors.ReadOnlyError("You can't write against a read only replica."), "READONLY"),
    (redis_errors.ResponseError(SCRIPT_OOM), "OOM"),
    (redis_errors.ConnectionError("Connection refused"), "Redis is unavailable"),
])
async def test_the_join_store_uses_the_same_translation(error: Exception, code: str) -> None:
    joins = RedisJoinStore(_RefusingRedis(error), "af", ttl_s=60)  # type: ignore[arg-type]
    with pytest.raises(UnavailableError) as refused:
        await joins.arrive("k", "a", "1", 2)
    assert code in refused.value.reason
    assert "parallel join" in refused.value.reason
    assert refused.value.__cause__ is error
