"""Idempotent steps: one execution per key, and what it emitted, in Redis.

Before a step runs it *claims* its key: it gets the stored output if there is one, learns
that the unit of work is already done, or takes a lease (renewed while it runs) so no other
worker runs it meanwhile. When it finishes it *publishes* its output: the first output
written wins, and a loser (whose lease ran out while it ran) gets the winner's bytes to
re-emit instead of its own.

Per key the store holds the encoded output messages until the broker acknowledged them,
then only that they were acknowledged. A redelivered message whose output was acknowledged
emits nothing again; one whose output was stored but not acknowledged re-emits exactly the
stored bytes, so a step's side effects and its output happen once per key even across
crashes.

A *pure* job (no effect beyond its output: routing a trigger, a transform) skips the claim
and the lease: it runs, then *settles* in one round trip, where what another run of the key
left (a stored or acknowledged output, a completed unit of work) wins over its own output.
Running it twice is harmless; sending twice is what the store prevents.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from redis.asyncio import Redis

from .batching import PipelinedRedis
from .kafka import Outgoing

__all__ = ["Claim", "EmissionStore", "MemoryEmissionStore", "Recall", "RedisEmissionStore"]

Recall = tuple[list[Outgoing] | None, bool]
_PENDING, _ACKED = b"P", b"A"
_U32 = struct.Struct(">I")
# after a pending entry's messages: when it was stored (wall-clock ms). Readers that know
# only the messages stop before it, so workers of both versions read each other's entries.
_STORED_AT = struct.Struct(">4sQ")
_STORED_AT_MAGIC = b"afT1"


def _pending(messages: list[Outgoing]) -> bytes:
    return (_PENDING + _dump(messages)
            + _STORED_AT.pack(_STORED_AT_MAGIC, int(time.time() * 1000)))


_NONE = 0xFFFFFFFF  # the length that marks a missing key (or header value)


def _dump(messages: list[Outgoing]) -> bytes:
    """Messages as length-prefixed bytes (no JSON, no base64: this is on the hot path)."""
    parts: list[bytes] = [_U32.pack(len(messages))]
    for m in messages:
        topic = m.topic.encode()
        parts += [_U32.pack(len(topic)), topic]
        parts += [_U32.pack(_NONE)] if m.key is None else [_U32.pack(len(m.key)), m.key]
        parts += [_U32.pack(len(m.value)), m.value, _U32.pack(len(m.headers))]
        for k, v in m.headers:
            name = k.encode()
            parts += [_U32.pack(len(name)), name]
            parts += [_U32.pack(_NONE)] if v is None else [_U32.pack(len(v)), v]
    return b"".join(parts)


def _load(data: bytes) -> list[Outgoing]:
    return _load_at(data)[0]


def _load_at(data: bytes) -> tuple[list[Outgoing], int]:
    """The messages and the offset just past them."""
    view, at = memoryview(data), 0

    def take() -> bytes | None:
        nonlocal at
        (size,) = _U32.unpack_from(view, at)
        at += 4
        if size == _NONE:
            return None
        chunk = bytes(view[at:at + size])
        at += size
        return chunk

    def count() -> int:
        nonlocal at
        (n,) = _U32.unpack_from(view, at)
        at += 4
        return int(n)

    out = []
    for _ in range(count()):
        topic, key, value = take(), take(), take()
        headers = []
        for _ in range(count()):
            name = take()
            headers.append(((name or b"").decode(), take()))
        out.append(Outgoing(topic=(topic or b"").decode(), key=key, value=value or b"",
                            headers=tuple(headers)))  # type: ignore[arg-type]
    return out, at


@dataclass(frozen=True)
class Claim:
    """What claiming a key found: ``leased`` (run it), ``stored`` (re-send ``outputs``),
    ``acked`` or ``done`` (nothing to do), or ``busy`` (another worker holds the lease for
    ``wait_ms`` more). A stored output says when it was stored (``stored_ms``, wall clock),
    so a record that finds it can look for it on the broker before sending it again."""

    state: Literal["leased", "stored", "acked", "done", "busy"]
    outputs: list[Outgoing] | None = None
    wait_ms: int = 0
    stored_ms: int | None = None


def _claim_of(entry: bytes | None) -> Claim | None:
    if entry is None:
        return None
    if entry[:1] == _ACKED:
        return Claim("acked")
    outputs, end = _load_at(entry[1:])
    stored_ms = None
    if len(entry) - 1 - end == _STORED_AT.size:
        magic, stored = _STORED_AT.unpack_from(entry, 1 + end)
        stored_ms = int(stored) if magic == _STORED_AT_MAGIC else None
    return Claim("stored", outputs, stored_ms=stored_ms)


class EmissionStore(Protocol):
    async def claim(self, key: str, done_key: str | None, token: str, lease_ms: int) -> Claim:
        """The stored output of ``key``; else ``done`` if ``done_key`` is marked; else a
        lease on ``key`` for ``token`` (again if ``token`` holds it already)."""

    async def publish(self, key: str, messages: list[Outgoing], token: str,
                      done_key: str | None) -> Claim | None:
        """Store ``messages`` unless another output was stored first (then return that),
        mark ``done_key`` done, and drop ``token``'s lease."""

    async def settle(self, key: str, messages: list[Outgoing], done_key: str | None,
                     mark_done: bool) -> Claim | None:
        """For a pure job, run without a claim or lease: what another run of ``key`` left
        wins (its stored output, ``acked``, or ``done`` if ``done_key`` is marked); else
        store ``messages`` and, with ``mark_done``, mark ``done_key`` done. One round trip
        where claim-then-publish takes two."""

    async def renew(self, leases: dict[str, str], lease_ms: int) -> set[str]:
        """Extend the leases (key -> token); returns the keys whose lease was lost."""

    async def acknowledge(self, key: str) -> None: ...

    async def forget(self, key: str, done_key: str | None = None) -> None:
        """Drop a stored output that could not be sent, and the mark of ``done_key`` its
        publication set, so a replay of the dead letter computes it afresh."""

    async def recall(self, key: str) -> Recall:
        """(stored output or None, whether it was acknowledged)."""

    async def remember(self, key: str, messages: list[Outgoing]) -> None: ...


# KEYS: emitted, done, lease. ARGV: token, lease ms.
_CLAIM = """
local entry = redis.call('GET', KEYS[1])
if entry then return {1, entry} end
if KEYS[2] ~= '' and redis.call('EXISTS', KEYS[2]) == 1 then return {2, ''} end
if redis.call('SET', KEYS[3], ARGV[1], 'NX', 'PX', ARGV[2]) then return {3, ''} end
if redis.call('GET', KEYS[3]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[3], ARGV[2])
  return {3, ''}
end
return {4, tostring(redis.call('PTTL', KEYS[3]))}
"""
# KEYS: emitted, done, lease. ARGV: value, ttl s, token.
_PUBLISH = """
local won = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2])
if KEYS[2] ~= '' then redis.call('SET', KEYS[2], '1', 'EX', ARGV[2]) end
if redis.call('GET', KEYS[3]) == ARGV[3] then redis.call('DEL', KEYS[3]) end
if won then return false end
return redis.call('GET', KEYS[1])
"""
# KEYS: emitted, done. ARGV: value, ttl s, mark done ('1' or '').
_SETTLE = """
local entry = redis.call('GET', KEYS[1])
if entry then return {1, entry} end
if KEYS[2] ~= '' and redis.call('EXISTS', KEYS[2]) == 1 then return {2, ''} end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
if KEYS[2] ~= '' and ARGV[3] == '1' then redis.call('SET', KEYS[2], '1', 'EX', ARGV[2]) end
return {0, ''}
"""
# KEYS: lease. ARGV: token, lease ms.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


class RedisEmissionStore:
    """The store in Redis, shared by every replica; entries expire after ``ttl_s``.

    Per key: ``emitted:<key>`` holds ``P`` + the stored output while it is pending, then
    just ``A`` once acknowledged; ``lease:<key>`` the token of the worker running it;
    ``done:<done key>`` marks a unit of work (a step visit, a trigger) as completed, so a
    replayed dead letter of it runs nothing. Each operation is one command (small Lua
    scripts), and concurrent records share round trips (see ``streams.batching``)."""

    def __init__(self, redis: Redis | PipelinedRedis, prefix: str, ttl_s: int) -> None:
        self._redis = redis if isinstance(redis, PipelinedRedis) else PipelinedRedis(redis)
        self._prefix = f"{prefix}:emitted:"
        self._lease = f"{prefix}:lease:"
        self._done = f"{prefix}:done:"
        self._ttl_s = ttl_s

    async def _script(self, text: str, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        return await self._redis.script(text, calls)

    async def claim(self, key: str, done_key: str | None, token: str, lease_ms: int) -> Claim:
        [(code, detail)] = await self._script(
            _CLAIM, [([self._prefix + key, self._done + done_key if done_key else "",
                       self._lease + key], [token, lease_ms])])
        if code == 1:
            found = _claim_of(detail)
            assert found is not None
            return found
        if code == 2:
            return Claim("done")
        if code == 3:
            return Claim("leased")
        return Claim("busy", wait_ms=max(0, int(detail)))

    async def publish(self, key: str, messages: list[Outgoing], token: str,
                      done_key: str | None) -> Claim | None:
        [winner] = await self._script(
            _PUBLISH, [([self._prefix + key, self._done + done_key if done_key else "",
                         self._lease + key], [_pending(messages),
                                              self._ttl_s, token])])
        return _claim_of(winner) if winner else None

    async def settle(self, key: str, messages: list[Outgoing], done_key: str | None,
                     mark_done: bool) -> Claim | None:
        [(code, detail)] = await self._script(
            _SETTLE, [([self._prefix + key, self._done + done_key if done_key else ""],
                       [_pending(messages), self._ttl_s, "1" if mark_done else ""])])
        if code == 1:
            return _claim_of(detail)
        return Claim("done") if code == 2 else None

    async def renew(self, leases: dict[str, str], lease_ms: int) -> set[str]:
        items = list(leases.items())
        if not items:
            return set()
        replies = await self._script(_RENEW, [([self._lease + key], [token, lease_ms])
                                              for key, token in items])
        return {key for (key, _), ok in zip(items, replies, strict=True) if not ok}

    async def recall(self, key: str) -> Recall:
        [entry] = await self._redis.execute(lambda pipe: pipe.get(self._prefix + key))
        found = _claim_of(entry)
        if found is None:
            return None, False
        return found.outputs, found.state == "acked"

    async def remember(self, key: str, messages: list[Outgoing]) -> None:
        value = _pending(messages)
        await self._redis.execute(
            lambda pipe: pipe.set(self._prefix + key, value, ex=self._ttl_s))

    async def acknowledge(self, key: str) -> None:
        await self._redis.execute(
            lambda pipe: pipe.set(self._prefix + key, _ACKED, ex=self._ttl_s))

    async def forget(self, key: str, done_key: str | None = None) -> None:
        keys = [self._prefix + key, *([self._done + done_key] if done_key else [])]
        await self._redis.execute(lambda pipe: pipe.delete(*keys))


class MemoryEmissionStore:
    """The same contract in memory, for unit tests (leases by wall-clock expiry)."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[bytes, bool]] = {}
        self.done: set[str] = set()
        self.leases: dict[str, tuple[str, float]] = {}

    async def claim(self, key: str, done_key: str | None, token: str, lease_ms: int) -> Claim:
        if (found := self._found(key)) is not None:
            return found
        if done_key is not None and done_key in self.done:
            return Claim("done")
        now = time.monotonic()
        holder = self.leases.get(key)
        if holder is not None and holder[0] != token and holder[1] > now:
            return Claim("busy", wait_ms=int((holder[1] - now) * 1000))
        self.leases[key] = (token, now + lease_ms / 1000)
        return Claim("leased")

    async def publish(self, key: str, messages: list[Outgoing], token: str,
                      done_key: str | None) -> Claim | None:
        if done_key is not None:
            self.done.add(done_key)
        if self.leases.get(key, ("", 0.0))[0] == token:
            del self.leases[key]
        if (found := self._found(key)) is not None:
            return found
        self.entries[key] = (_dump(messages), False)
        return None

    async def settle(self, key: str, messages: list[Outgoing], done_key: str | None,
                     mark_done: bool) -> Claim | None:
        if (found := self._found(key)) is not None:
            return found
        if done_key is not None and done_key in self.done:
            return Claim("done")
        self.entries[key] = (_dump(messages), False)
        if done_key is not None and mark_done:
            self.done.add(done_key)
        return None

    def _found(self, key: str) -> Claim | None:
        """What is stored under ``key``: acknowledged, a stored output, or None."""
        if key not in self.entries:
            return None
        out, acked = self.entries[key]
        return Claim("acked") if acked else Claim("stored", _load(out))

    async def renew(self, leases: dict[str, str], lease_ms: int) -> set[str]:
        lost = set()
        for key, token in leases.items():
            if self.leases.get(key, ("", 0.0))[0] == token:
                self.leases[key] = (token, time.monotonic() + lease_ms / 1000)
            else:
                lost.add(key)
        return lost

    async def recall(self, key: str) -> Recall:
        if key not in self.entries:
            return None, False
        out, acked = self.entries[key]
        return (None if acked else _load(out)), acked

    async def remember(self, key: str, messages: list[Outgoing]) -> None:
        self.entries[key] = (_dump(messages), False)

    async def acknowledge(self, key: str) -> None:
        self.entries[key] = (b"", True)

    async def forget(self, key: str, done_key: str | None = None) -> None:
        self.entries.pop(key, None)
        if done_key is not None:
            self.done.discard(done_key)
