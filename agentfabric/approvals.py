"""Human approval: the state of hand-offs in Redis, deciding on them, and their expiry.

A run that needs a person is parked as a :class:`~schemas.models.HandOff` on
``<prefix>.approvals``. Every worker registers each hand-off here (``register``); a
decision (``agentfabric approvals approve|reject``, or the expiry sweeper) is recorded
first-writer-wins (``claim``), then published as an :class:`ApprovalDecision` on
``<prefix>.decisions``, where a worker resumes or ends the run. Keys (``<p>`` is the topic
prefix)::

    <p>:approvals:pending:<hand off id>   the hand-off (sealed Avro), kept past its decision
    <p>:approvals:run:<run id>            set of the run's hand-off ids
    <p>:approvals:all                     zset of hand-off ids by created_at (for listing)
    <p>:approvals:due                     zset of undecided hand-off ids by expires_at
    <p>:approvals:decision:<hand off id>  the decision (sealed Avro), SET NX: the first wins
    <p>:approvals:outbox                  zset of claimed decisions not yet published
    <p>:approvals:grant:<call key>        an approved tool call (JSON: who, when, note)

The grant is written with the decision, before it is published: the step that runs again
on the approval finds it (the gateway checks :func:`grant_key` for the call's idempotency
key: :class:`RedisApprovalGrants`). A decision claimed but not published (a crash in
between) stays in the outbox, and the sweeper publishes it again after
:data:`OUTBOX_GRACE_S`; the decisions consumer runs each hand-off's decision once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TypeVar

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from schemas.models import ApprovalDecision, AvroModel, HandOff, utc_now
from schemas.serde import seal, unseal
from streams.batching import PipelinedRedis
from streams.claims import ClaimStore
from streams.kafka import Outgoing, Producer
from streams.topics import TopicNames

from .errors import AgentFabricError, DecodeError
from .settings import Settings

__all__ = ["APPROVAL_HEADER", "EXPIRED_BY", "OUTBOX_GRACE_S", "ApprovalStore",
           "DecisionPublisher", "RedisApprovalGrants", "decision_for", "expires_of",
           "expiry_decision", "grant_key", "settle", "sweep", "sweep_once"]

log = logging.getLogger(__name__)
M = TypeVar("M", bound=AvroModel)

APPROVAL_HEADER = "af-approval-of"  # on a step run again: the hand-off whose approval it is
EXPIRED_BY = "expiry"  # ``by`` of a decision nobody made
OUTBOX_GRACE_S = 30.0  # a claimed decision unpublished this long is published again

# KEYS: pending, run, all, due, decision. ARGV: value, ttl s, id, created, expires, cutoff.
_REGISTER = """
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[6])
if redis.call('EXISTS', KEYS[5]) == 0 then redis.call('ZADD', KEYS[4], ARGV[5], ARGV[3]) end
return 1
"""
# KEYS: decision, due, outbox, grant ('' for none). ARGV: value, ttl s, id, now, grant.
_CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  if KEYS[4] ~= '' then redis.call('SET', KEYS[4], ARGV[5], 'EX', ARGV[2]) end
  redis.call('ZREM', KEYS[2], ARGV[3])
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[3])
  return false
end
redis.call('ZREM', KEYS[2], ARGV[3])
return redis.call('GET', KEYS[1])
"""


def grant_key(prefix: str, call_key: str) -> str:
    """The Redis key that holds the approval of the tool call with ``call_key``."""
    return f"{prefix}:approvals:grant:{call_key}"


class RedisApprovalGrants:
    """The grants of approved tool calls, for the tool gateway (its ``ApprovalGrants``):
    ``build_gateway(..., grants=RedisApprovalGrants(redis, settings.topic_prefix))``."""

    def __init__(self, redis: Redis | PipelinedRedis, prefix: str) -> None:
        self.redis = redis if isinstance(redis, PipelinedRedis) else PipelinedRedis(redis)
        self.prefix = prefix

    async def granted(self, call_key: str) -> bool:
        [found] = await self.redis.execute(
            lambda pipe: pipe.exists(grant_key(self.prefix, call_key)))
        return bool(found)


def _pack(model: AvroModel) -> bytes:
    value, schema_id = seal(model)
    return schema_id.encode() + b"\n" + value


def _unpack(raw: bytes, model: type[M]) -> M:
    schema_id, sep, value = raw.partition(b"\n")
    if not sep:
        raise DecodeError(f"a stored {model.__name__} has no schema id; it was not written by "
                          f"agentfabric")
    return unseal(value, schema_id.decode("utf-8", "replace"), model)


def expires_of(hand_off: HandOff, default_s: float) -> datetime:
    """When ``hand_off`` expires: its own ``expires_at``, else (a hand-off written before
    expiry existed) ``default_s`` after it was created."""
    return hand_off.expires_at or hand_off.created_at + timedelta(seconds=default_s)


def decision_for(hand_off: HandOff, *, approved: bool, by: str, note: str = "",
                 reason: str = "", expired: bool = False,
                 now: datetime | None = None) -> ApprovalDecision:
    envelope, schema_id = seal(hand_off)
    return ApprovalDecision(
        hand_off_id=hand_off.hand_off_id, run_id=hand_off.run_id, workflow=hand_off.workflow,
        step=hand_off.step, kind=hand_off.kind, tenant=hand_off.tenant, approved=approved,
        expired=expired, by=by, note=note, reason=reason, decided_at=now or utc_now(),
        hand_off=envelope, hand_off_schema=schema_id)


def expiry_decision(hand_off: HandOff, expired_at: datetime,
                    now: datetime | None = None) -> ApprovalDecision:
    what = (f"the call of tool '{hand_off.tool}'" if hand_off.tool
            else f"step '{hand_off.step}'")
    waited = (expired_at - hand_off.created_at).total_seconds()
    reason = (f"nobody approved or rejected {what} within {waited:g}s (the request expired at "
              f"{expired_at.isoformat()}), so the run ended; start it again if it is still "
              f"wanted")
    return decision_for(hand_off, approved=False, by=EXPIRED_BY, reason=reason, expired=True,
                        now=now)


class ApprovalStore:
    """The approvals' state in Redis (see the module's docstring for the keys)."""

    def __init__(self, redis: PipelinedRedis, prefix: str, ttl_s: int,
                 default_expiry_s: float) -> None:
        self.redis = redis
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.default_expiry_s = default_expiry_s
        self._k = f"{prefix}:approvals:"

    def _key(self, kind: str, ident: str = "") -> str:
        return f"{self._k}{kind}:{ident}" if ident else f"{self._k}{kind}"

    def expires(self, hand_off: HandOff) -> datetime:
        return expires_of(hand_off, self.default_expiry_s)

    async def register(self, hand_off: HandOff, now: datetime | None = None) -> None:
        """Remember ``hand_off`` (again: idempotent); undecided, it is due at its expiry."""
        now = now or utc_now()
        expires = self.expires(hand_off)
        hid = hand_off.hand_off_id
        ttl = int(max(0.0, (expires - now).total_seconds())) + self.ttl_s
        keys = [self._key("pending", hid), self._key("run", hand_off.run_id), self._key("all"),
                self._key("due"), self._key("decision", hid)]
        args: list[bytes | str | float] = [
            _pack(hand_off), ttl, hid, hand_off.created_at.timestamp(), expires.timestamp(),
            now.timestamp() - self.ttl_s]
        await self.redis.execute(lambda pipe: pipe.eval(_REGISTER, len(keys), *keys, *args))

    async def claim(self, decision: ApprovalDecision, call_key: str | None = None,
                    now: datetime | None = None) -> ApprovalDecision | None:
        """Record ``decision`` unless one was recorded first (then return that one); an
        approved tool call's grant to ``call_key`` is written with it."""
        now = now or utc_now()
        hid = decision.hand_off_id
        grant = call_key if decision.approved and call_key else None
        keys = [self._key("decision", hid), self._key("due"), self._key("outbox"),
                grant_key(self.prefix, grant) if grant else ""]
        grant_value = json.dumps({"hand_off_id": hid, "run_id": decision.run_id,
                                  "by": decision.by, "note": decision.note,
                                  "decided_at": decision.decided_at.isoformat()})
        args: list[bytes | str | float] = [_pack(decision), self.ttl_s, hid, now.timestamp(),
                                           grant_value]
        [earlier] = await self.redis.execute(
            lambda pipe: pipe.eval(_CLAIM, len(keys), *keys, *args))
        return None if earlier is None else _unpack(earlier, ApprovalDecision)

    async def delivered(self, hand_off_id: str) -> None:
        await self.redis.execute(lambda pipe: pipe.zrem(self._key("outbox"), hand_off_id))

    async def forget_due(self, hand_off_id: str) -> None:
        await self.redis.execute(lambda pipe: pipe.zrem(self._key("due"), hand_off_id))

    async def due(self, now: datetime, limit: int = 100) -> list[str]:
        """Undecided hand-offs whose expiry has passed."""
        [ids] = await self.redis.execute(lambda pipe: pipe.zrangebyscore(
            self._key("due"), "-inf", now.timestamp(), start=0, num=limit))
        return [_text(i) for i in ids]

    async def undelivered(self, before: datetime, limit: int = 100) -> list[str]:
        """Decisions claimed before ``before`` and still not published."""
        [ids] = await self.redis.execute(lambda pipe: pipe.zrangebyscore(
            self._key("outbox"), "-inf", before.timestamp(), start=0, num=limit))
        return [_text(i) for i in ids]

    async def for_run(self, run_id: str) -> list[str]:
        [ids] = await self.redis.execute(lambda pipe: pipe.smembers(self._key("run", run_id)))
        return sorted(_text(i) for i in ids)

    async def known(self) -> list[str]:
        """Every hand-off registered within the TTL, oldest first."""
        [ids] = await self.redis.execute(lambda pipe: pipe.zrange(self._key("all"), 0, -1))
        return [_text(i) for i in ids]

    async def hand_offs(self, ids: Sequence[str]) -> dict[str, HandOff]:
        return await self._load("pending", ids, HandOff)

    async def decisions(self, ids: Sequence[str]) -> dict[str, ApprovalDecision]:
        return await self._load("decision", ids, ApprovalDecision)

    async def _load(self, kind: str, ids: Sequence[str], model: type[M]) -> dict[str, M]:
        if not ids:
            return {}

        def build(pipe: Pipeline) -> None:
            for ident in ids:
                pipe.get(self._key(kind, ident))
        found: dict[str, M] = {}
        for ident, raw in zip(ids, await self.redis.execute(build), strict=True):
            if raw is None:
                continue
            try:
                found[ident] = _unpack(raw, model)
            except DecodeError as exc:
                log.error("approvals: the stored %s of %s is unreadable (%s); ignored",
                          kind, ident, exc.reason)
        return found


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


class DecisionPublisher:
    """Publishes decisions on ``<prefix>.decisions`` (a large one as a claim check, as the
    runtime's outputs are); the producer starts on first use."""

    def __init__(self, settings: Settings, redis: PipelinedRedis, client_id: str) -> None:
        self.topic = TopicNames(settings.topic_prefix).decisions
        self.claims = ClaimStore(redis, settings.topic_prefix, settings.idempotency_ttl_s,
                                 settings.claim_check_bytes)
        self.settings = settings
        self.client_id = client_id
        self.producer: Producer | None = None

    async def send(self, decision: ApprovalDecision) -> None:
        if self.producer is None:
            producer = Producer(self.settings, client_id=self.client_id)
            await producer.start()
            self.producer = producer
        message = Outgoing.of(self.topic, decision.run_id, decision)
        await self.producer.send_all(await self.claims.check([message]))

    async def close(self) -> None:
        if self.producer is not None:
            await self.producer.stop()
            self.producer = None


async def settle(store: ApprovalStore, publisher: DecisionPublisher, hand_off: HandOff,
                 decision: ApprovalDecision) -> ApprovalDecision | None:
    """Record ``decision`` (first writer wins) and publish it; returns None if it was
    recorded, else the decision recorded before it (nothing is published then)."""
    earlier = await store.claim(decision, hand_off.call_key)
    if earlier is not None:
        return earlier
    await publisher.send(decision)
    await store.delivered(decision.hand_off_id)
    return None


async def sweep_once(store: ApprovalStore, publisher: DecisionPublisher,
                     now: datetime | None = None) -> int:
    """End the runs whose hand-off expired undecided, and publish again the decisions
    claimed but not published (a crash in between); returns how many expired here."""
    now = now or utc_now()
    expired = 0
    due = await store.due(now)
    found = await store.hand_offs(due)
    for hid in due:
        hand_off = found.get(hid)
        if hand_off is None:  # gone with its TTL, or unreadable: nothing left to end
            await store.forget_due(hid)
            continue
        decision = expiry_decision(hand_off, store.expires(hand_off), now)
        if await settle(store, publisher, hand_off, decision) is None:
            expired += 1
            log.info("approval %s of run %s expired; the run ends as expired", hid,
                     hand_off.run_id)
    late = await store.undelivered(now - timedelta(seconds=OUTBOX_GRACE_S))
    recorded = await store.decisions(late)
    for hid in late:
        unsent = recorded.get(hid)
        if unsent is not None:
            log.warning("approvals: the decision on %s was recorded but not published; "
                        "publishing it now", hid)
            await publisher.send(unsent)
        await store.delivered(hid)
    return expired


async def sweep(store: ApprovalStore, publisher: DecisionPublisher, interval_s: float,
                stop: asyncio.Event) -> None:
    """Every ``interval_s`` until ``stop``: :func:`sweep_once`. Any replica may run it (the
    first to claim a decision ends the run); a failure is logged and tried next time."""
    last_warning = 0.0
    while not stop.is_set():
        try:
            await sweep_once(store, publisher)
        except Exception as exc:  # logged, never silent: the sweeper must outlive it
            if time.monotonic() - last_warning > 5:  # not once per tick while Redis is down
                if isinstance(exc, AgentFabricError):
                    log.warning("approvals: the expiry sweep failed (%s); trying again",
                                exc.reason)
                else:
                    log.exception("approvals: the expiry sweep failed; trying again")
                last_warning = time.monotonic()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
