"""Acting on dead letters: select them (ids and filters), replay them to the topic they were
read from, and purge them (markers in Redis: the dead-letter topic is append-only).

A replay re-publishes a dead letter's original key and value with its original headers
(minus redacted ones and the retry bookkeeping), plus ``af-replay-of: <dead letter id>``,
which the worker dedupes on: replaying the same dead letter twice runs it once. A
``StepMessage`` is re-encoded with ``attempt=1`` and a fresh deadline.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from aiokafka import ConsumerRecord
from pydantic import BaseModel, ConfigDict, field_validator
from redis.asyncio import Redis
from redis.exceptions import RedisError

from schemas.models import DeadLetter, StepMessage, utc_now
from schemas.serde import SCHEMA_HEADER, decode, encode, header_value
from streams.batching import PipelinedRedis, redis_unavailable
from streams.claims import CLAIM_HEADER, ClaimStore
from streams.codec import FIRST_FAILURE_HEADER, REPLAY_HEADER, RETRY_DUE_HEADER
from streams.dlq import (
    REDACTED,
    SECRET_HEADER,
    from_epoch_ms,
    is_unreadable,
    read_dead_letters,
    replay_of,
)
from streams.kafka import Outgoing, Producer
from streams.topics import TopicNames

from .errors import ConfigError, DecodeError, PermanentError, UnknownWorkflowError
from .settings import Settings
from .worker import connect_redis

__all__ = ["DeadLetterFilter", "MarkStore", "Marks", "Replay", "Selection", "Unreplayable",
           "WorkflowTimeout", "full_values", "load", "mark_purged", "parse_since",
           "plan_replay", "select", "send_replays", "superseded"]

_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$", re.IGNORECASE)
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
# headers a replay does not carry over: its lineage is new, and its attempts start again
_DROPPED_HEADERS = {REPLAY_HEADER, RETRY_DUE_HEADER, FIRST_FAILURE_HEADER}

# the note of a dead letter whose value was cut short (streams.stages), for letters written
# before ``value_claim`` existed: their excerpt must not be replayed as if it were the value
_EXCERPT = "bytes was too large for the dead-letter topic; only its first"

WorkflowTimeout = Callable[[str, int], float | None]
"""A workflow's ``timeout_s`` by (name, version); raises UnknownWorkflowError if not loaded."""


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``10m``, ``2h``, ``3d`` (also ``s`` and ``w``) before ``now``, or an ISO 8601 time
    (without an offset it is UTC, as dead-letter times are shown)."""
    found = _DURATION.match(text)
    if found:
        amount = timedelta(**{_UNITS[found[2].lower()]: int(found[1])})
        return (now or utc_now()) - amount
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(f"--since '{text}' is neither a duration nor a time; give e.g. 10m, "
                          f"2h, 3d or 2026-11-01T09:30") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


class DeadLetterFilter(BaseModel):
    """Which dead letters a command acts on: ids (or unique id prefixes), narrowed by the
    filters. Without ids, the filters select among the dead letters not purged."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    ids: tuple[str, ...] = ()
    workflow: str | None = None
    step: str | None = None
    error: str | None = None
    since: datetime | None = None

    @field_validator("since", mode="before")
    @classmethod
    def _since(cls, value: object) -> object:
        return parse_since(value) if isinstance(value, str) else value

    @property
    def filtered(self) -> bool:
        """Whether any filter (not an id) is set."""
        return any(v is not None for v in (self.workflow, self.step, self.error, self.since))

    def matches(self, letter: DeadLetter) -> bool:
        """Whether ``letter`` passes the filters (ids aside)."""
        return ((self.workflow is None or letter.workflow == self.workflow)
                and (self.step is None or letter.step == self.step)
                and (self.error is None or letter.error_type.lower() == self.error.lower())
                and (self.since is None or letter.failed_at >= self.since))


@dataclass(frozen=True)
class Selection:
    letters: list[DeadLetter]
    skipped: int  # letters the filters matched but that are hidden (purged)


def select(letters: Sequence[DeadLetter], spec: DeadLetterFilter, hidden: Set[str], *,
           include_hidden: bool = False) -> Selection:
    """The dead letters ``spec`` names. Each id must match exactly one dead letter (a
    ConfigError names those that match none or several); named letters are taken even if
    ``hidden`` (purged), letters selected by filters alone only if not (or
    ``include_hidden``)."""
    if spec.ids:
        chosen, problems = [], []
        for wanted in spec.ids:
            found = [d for d in letters if d.dead_letter_id.startswith(wanted)]
            if len(found) == 1:
                if found[0] not in chosen:
                    chosen.append(found[0])
            else:
                problems.append(f"{'no' if not found else len(found)} dead letters match "
                                f"'{wanted}'")
        if problems:
            raise ConfigError(f"{'; '.join(problems)}; run `agentfabric dlq list` for the ids")
        return Selection([d for d in chosen if spec.matches(d)], 0)
    matched = [d for d in letters if spec.matches(d)]
    kept = [d for d in matched if include_hidden or d.dead_letter_id not in hidden]
    return Selection(kept, len(matched) - len(kept))


def superseded(letters: Iterable[DeadLetter]) -> dict[str, str]:
    """dead letter id -> the id of the dead letter its replay produced (it failed again)."""
    return {origin: d.dead_letter_id for d in letters if (origin := replay_of(d)) is not None}


@dataclass(frozen=True)
class Marks:
    """What is remembered of dead letters beside the topic: the ids purged, and when each
    dead letter was last replayed."""

    purged: frozenset[str]
    replayed: Mapping[str, datetime]


class MarkStore:
    """Marks in Redis, without expiry: a set ``<prefix>:dlq:purged`` and a hash
    ``<prefix>:dlq:replayed`` (id -> epoch ms of the last replay)."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self.redis = redis
        self.purged_key = f"{prefix}:dlq:purged"
        self.replayed_key = f"{prefix}:dlq:replayed"

    async def read(self) -> Marks:
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.smembers(self.purged_key)
                pipe.hgetall(self.replayed_key)
                members, replays = await pipe.execute()
        except RedisError as exc:
            raise redis_unavailable(exc, doing="reading the dead-letter marks",
                                    retried=False) from exc
        replayed = {_text(k): when for k, v in replays.items()
                    if (when := from_epoch_ms(_int(v))) is not None}
        return Marks(frozenset(_text(m) for m in members), replayed)

    async def purge(self, ids: Iterable[str]) -> int:
        """Mark ``ids`` purged; returns how many were not purged before."""
        ids = list(ids)
        if not ids:
            return 0
        try:
            return int(await self.redis.sadd(self.purged_key, *ids))
        except RedisError as exc:
            raise redis_unavailable(exc, doing="marking dead letters purged",
                                    retried=False) from exc

    async def replayed(self, ids: Iterable[str], when: datetime) -> None:
        ms = str(int(when.timestamp() * 1000))
        mapping = dict.fromkeys(ids, ms)
        if not mapping:
            return
        try:
            await self.redis.hset(self.replayed_key, mapping=mapping)  # type: ignore[arg-type]
        except RedisError as exc:
            raise redis_unavailable(exc, doing="marking dead letters replayed",
                                    retried=False) from exc


def _text(raw: bytes | str) -> str:
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw


def _int(raw: bytes | str) -> int | None:
    try:
        return int(raw)
    except ValueError:
        return None


async def load(settings: Settings) -> tuple[list[DeadLetter], Marks]:
    """Every dead letter so far, and their marks."""
    letters = [d async for d in read_dead_letters(settings,
                                                  TopicNames(settings.topic_prefix).dlq)]
    redis = await connect_redis(settings)
    try:
        return letters, await MarkStore(redis, settings.topic_prefix).read()
    finally:
        await redis.aclose()


async def mark_purged(settings: Settings, ids: Iterable[str]) -> int:
    """Mark dead letters purged; returns how many were not purged before."""
    redis = await connect_redis(settings)
    try:
        return await MarkStore(redis, settings.topic_prefix).purge(ids)
    finally:
        await redis.aclose()


async def full_values(settings: Settings, letters: Sequence[DeadLetter],
                      ) -> dict[str, bytes | Unreplayable]:
    """For each letter whose value is an excerpt: the full bytes from its claim check, or
    why they cannot be had (the claim check expired with the idempotency TTL)."""
    claimed = [d for d in letters if d.value_claim is not None]
    if not claimed:
        return {}
    redis = await connect_redis(settings)
    claims = ClaimStore(PipelinedRedis(redis), settings.topic_prefix,
                        settings.idempotency_ttl_s, settings.claim_check_bytes)
    found: dict[str, bytes | Unreplayable] = {}
    try:
        for d in claimed:
            assert d.value_claim is not None
            try:
                full = await claims.resolve(_claimed_record(d, d.value_claim))
            except DecodeError as exc:
                found[d.dead_letter_id] = Unreplayable(d.dead_letter_id, exc.reason)
            else:
                found[d.dead_letter_id] = full.value or b""
    finally:
        await redis.aclose()
    return found


def _claimed_record(d: DeadLetter, digest: str) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(topic=d.topic, partition=d.partition, offset=d.offset, timestamp=-1,
                          timestamp_type=0, key=d.key, value=b"", checksum=None,
                          serialized_key_size=-1, serialized_value_size=0,
                          headers=((CLAIM_HEADER, digest.encode()),))


@dataclass(frozen=True)
class Replay:
    """What replaying one dead letter sends."""

    dead_letter_id: str
    message: Outgoing
    run: str | None  # the run id of a step message, else None (a trigger event)
    note: str = ""


@dataclass(frozen=True)
class Unreplayable:
    dead_letter_id: str
    why: str


def plan_replay(letter: DeadLetter, names: TopicNames, timeout_of: WorkflowTimeout, *,
                now: datetime | None = None, full_value: bytes | None = None,
                ) -> Replay | Unreplayable:
    """The message that replays ``letter`` (with ``full_value`` for a letter whose value is
    an excerpt, see :func:`full_values`), or why it cannot be replayed."""
    if is_unreadable(letter):
        return Unreplayable(letter.dead_letter_id, "this entry of the dead-letter topic is "
                                                   "unreadable, so there is nothing to replay")
    original = full_value if full_value is not None else letter.value
    if original is None:
        return Unreplayable(letter.dead_letter_id, "the dead letter holds no value (the "
                                                   "original was a tombstone)")
    if full_value is None and (letter.value_claim is not None or _EXCERPT in letter.reason):
        where = (f"claim check {letter.value_claim} holds the full bytes; read it first"
                 if letter.value_claim else "no claim check holds the full bytes")
        return Unreplayable(letter.dead_letter_id, f"its value is only an excerpt (the "
                                                   f"original was too large for the "
                                                   f"dead-letter topic) and {where}")
    topic = _target_topic(letter.topic, names)
    if topic is None:
        return Unreplayable(letter.dead_letter_id, f"it was read from {letter.topic}, which is "
                                                   f"not a trigger, step or retry topic of "
                                                   f"prefix '{names.prefix}'")
    headers = [(h.key, h.value) for h in letter.headers
               if h.value is not None and h.key not in _DROPPED_HEADERS
               and not (h.value == REDACTED and SECRET_HEADER.search(h.key))]
    schema = header_value(headers, SCHEMA_HEADER) or b""
    value, run, note = original, None, ""
    if schema.startswith(b"step_message.v"):
        try:
            message = decode(original, headers, StepMessage)
        except PermanentError as exc:
            note = f"sent as it was, not re-encoded: {exc.reason}"
        else:
            fresh, note = _refreshed(message, timeout_of, now or utc_now())
            value, encoded = encode(fresh)
            replaced = {k for k, _ in encoded}
            headers = [*encoded, *((k, v) for k, v in headers if k not in replaced)]
            run = message.run_id
    headers.append((REPLAY_HEADER, letter.dead_letter_id.encode()))
    return Replay(letter.dead_letter_id,
                  Outgoing(topic, letter.key, value, tuple(headers)), run, note)


def _refreshed(message: StepMessage, timeout_of: WorkflowTimeout,
               now: datetime) -> tuple[StepMessage, str]:
    """The envelope with attempt 1 and a fresh deadline, and a note if the deadline went."""
    deadline, note = None, ""
    if message.deadline is not None:
        try:
            timeout = timeout_of(message.workflow, message.workflow_version)
        except UnknownWorkflowError:
            note = (f"workflow {message.workflow} version {message.workflow_version} is not "
                    f"loaded here, so the run's deadline was dropped")
        else:
            deadline = now + timedelta(seconds=timeout) if timeout else None
            if deadline is None:
                note = (f"workflow {message.workflow} version {message.workflow_version} has "
                        f"no timeout_s now, so the run's deadline was dropped")
    return message.model_copy(update={"attempt": 1, "deadline": deadline}), note


def _target_topic(topic: str, names: TopicNames) -> str | None:
    """The topic a replay goes to: the trigger or step topic the letter was read from; for a
    retry topic ``<prefix>.retry.<wf>.<step>.<tier>``, the step topic ``<prefix>.<wf>.<step>``."""
    head = f"{names.prefix}."
    if not topic.startswith(head):
        return None
    if names.source_of(topic) is not None:
        return topic
    parts = topic[len(head):].split(".")
    if parts[0] == "retry" and len(parts) == 4:
        return names.step(parts[1], parts[2])
    if len(parts) == 2 and parts[0] not in ("triggers", "results", "retry"):
        return topic
    return None


async def send_replays(settings: Settings, replays: Sequence[Replay],
                       report: Callable[[Replay, PermanentError | None], None]) -> int:
    """Send each replay (every acknowledgement awaited; a value over ``claim_check_bytes``
    travels as a claim check, as the runtime's own outputs do), ``report`` it (with the
    error if the broker refused it) and mark the sent ones replayed; returns how many were
    sent. A broker that is down stops it (what was sent by then is marked)."""
    if not replays:
        return 0
    redis = await connect_redis(settings)
    claims = ClaimStore(PipelinedRedis(redis), settings.topic_prefix,
                        settings.idempotency_ttl_s, settings.claim_check_bytes)
    producer = Producer(settings, client_id="agentfabric-dlq-replay")
    sent: list[str] = []
    try:
        await producer.start()
        try:
            for replay in replays:
                try:
                    await producer.send_all(await claims.check([replay.message]))
                except PermanentError as exc:
                    report(replay, exc)
                    continue
                sent.append(replay.dead_letter_id)
                report(replay, None)
        finally:
            await producer.stop()
            await MarkStore(redis, settings.topic_prefix).replayed(sent, utc_now())
    finally:
        await redis.aclose()
    return len(sent)
