"""The status of runs, for ``GET /runs/{id}``: one Redis hash per run, kept for
``AGENTFABRIC_IDEMPOTENCY_TTL_S``.

    <p>:runs:<run id>    hash: tenant, workflow, status, started_at, finished_at, output
                         (JSON), usage (JSON), error, final ('result' once a RunResult is in),
                         request (hash of the API request that started it)

A run started through the ingress (the run API or a webhook) is recorded as ``running`` by
:func:`record_started`. :func:`follow_results` (a background task of the ingress server)
reads every result topic and the dead-letter topic in its own consumer group and writes
what it finds: a result sets the run's final status, output and usage; a dead letter marks
a run that has no result yet as ``dead_lettered`` with its reason (a replay that completes
it later overwrites that). Writes commute: a result recorded before its start keeps its
status, because :func:`record_started` fills in only missing fields.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from datetime import datetime
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord
from aiokafka.errors import KafkaError
from pydantic import BaseModel, ConfigDict
from redis.asyncio import Redis
from redis.exceptions import RedisError

from agentfabric.errors import AgentFabricError, UnavailableError
from schemas.models import DeadLetter, RunResult, utc_now
from schemas.serde import decode
from streams import groupleave, tolerant
from streams.batching import PipelinedRedis
from streams.claims import ClaimStore
from streams.kafka import group_timeouts, kafka_client_options

if TYPE_CHECKING:
    from agentfabric.settings import Settings

    from .context import IngressContext

__all__ = ["RUNNING", "RunView", "follow_results", "load_run", "record_dead_letter",
           "record_result", "record_started", "results_group", "run_key"]

log = logging.getLogger(__name__)
RUNNING = "running"
DEAD_LETTERED = "dead_lettered"

# KEYS: run. ARGV: ttl s, then field/value pairs. A dead letter never overwrites a result.
_DEAD_LETTER_LUA = """
if redis.call('HGET', KEYS[1], 'final') == 'result' then return 0 end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
return 1
"""


class RunView(BaseModel):
    """What ``GET /runs/{id}`` answers (and the run store holds)."""

    model_config = ConfigDict(extra="forbid")
    run_id: str
    workflow: str
    tenant: str
    status: str
    output: Any = None
    error: str | None = None
    usage: dict[str, Any] | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def finished(self) -> bool:
        return self.status != RUNNING


def run_key(prefix: str, run_id: str) -> str:
    return f"{prefix}:runs:{run_id}"


def results_group(prefix: str) -> str:
    """The consumer group of :func:`follow_results`."""
    return f"{prefix}.ingress-runs"


async def record_started(redis: Redis, prefix: str, run_id: str, tenant: str, workflow: str,
                         ttl_s: int, *, request_hash: str | None = None) -> None:
    """Record that ``run_id`` was started (status ``running``) unless it is known already:
    fields a result wrote first are kept."""
    key = run_key(prefix, run_id)
    fields = {"tenant": tenant, "workflow": workflow, "status": RUNNING,
              "started_at": utc_now().isoformat()}
    if request_hash is not None:
        fields["request"] = request_hash
    async with redis.pipeline(transaction=True) as pipe:
        for name, value in fields.items():
            pipe.hsetnx(key, name, value)
        pipe.expire(key, ttl_s)
        await pipe.execute()


def _text(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "")


async def load_run(redis: Redis, prefix: str, run_id: str) -> tuple[RunView, str] | None:
    """The run and the hash of the request that started it ('' if none), or None."""
    raw = await redis.hgetall(run_key(prefix, run_id))
    stored = {_text(k): _text(v) for k, v in raw.items()}
    if not stored.get("tenant") or not stored.get("status"):
        return None
    return RunView(
        run_id=run_id, workflow=stored.get("workflow", ""), tenant=stored["tenant"],
        status=stored["status"],
        output=json.loads(stored["output"]) if stored.get("output") else None,
        error=stored.get("error") or None,
        usage=json.loads(stored["usage"]) if stored.get("usage") else None,
        started_at=datetime.fromisoformat(stored["started_at"])
        if stored.get("started_at") else None,
        finished_at=datetime.fromisoformat(stored["finished_at"])
        if stored.get("finished_at") else None), stored.get("request", "")


async def record_result(redis: Redis, prefix: str, result: RunResult, ttl_s: int) -> None:
    """Write a finished run: its status, output, usage and times."""
    key = run_key(prefix, result.run_id)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(key, mapping={
            "tenant": result.tenant, "workflow": result.workflow, "status": result.status,
            "output": json.dumps(result.output), "usage": result.usage.model_dump_json(),
            "started_at": result.started_at.isoformat(),
            "finished_at": result.finished_at.isoformat(), "error": "", "final": "result"})
        pipe.expire(key, ttl_s)
        await pipe.execute()


async def record_dead_letter(redis: Redis, prefix: str, letter: DeadLetter,
                             ttl_s: int) -> bool:
    """Mark the dead letter's run ``dead_lettered`` with its reason, unless the run has a
    result; False if it does (or the letter names no run)."""
    if not letter.run_id:
        return False
    pairs: list[str] = [str(ttl_s), "status", DEAD_LETTERED, "error", letter.reason,
                        "finished_at", letter.failed_at.isoformat()]
    if letter.tenant:
        pairs += ["tenant", letter.tenant]
    if letter.workflow:
        pairs += ["workflow", letter.workflow]
    done = await redis.eval(_DEAD_LETTER_LUA, 1, run_key(prefix, letter.run_id),
                            *pairs)
    return bool(done)


def _consumer(settings: Settings, group: str) -> AIOKafkaConsumer:
    """Like ``streams.kafka.make_consumer``, but it looks for new topics every 5 s (a pattern
    subscription sees a result topic created after it started)."""
    tolerant.install()
    groupleave.install()
    return AIOKafkaConsumer(
        **kafka_client_options(settings), group_id=group,
        client_id="agentfabric-ingress-runs", enable_auto_commit=False,
        auto_offset_reset="earliest", fetch_max_wait_ms=settings.fetch_max_wait_ms,
        max_poll_records=settings.max_poll_records, **group_timeouts(settings),
        metadata_max_age_ms=5_000, max_poll_interval_ms=settings.max_poll_interval_ms)


async def _apply(ctx: IngressContext, claims: ClaimStore, record: ConsumerRecord) -> None:
    prefix, ttl = ctx.settings.topic_prefix, ctx.settings.idempotency_ttl_s
    try:
        record = await claims.resolve(record)
        if record.topic == ctx.names.dlq:
            await record_dead_letter(ctx.redis, prefix,
                                     decode(record.value, record.headers, DeadLetter), ttl)
        else:
            await record_result(ctx.redis, prefix,
                                decode(record.value, record.headers, RunResult), ttl)
    except (RedisError, UnavailableError):
        raise
    except AgentFabricError as exc:  # not a message we can read: nothing to record
        log.warning("run store skips %s[%d]@%d: %s", record.topic, record.partition,
                    record.offset, exc.reason)


async def follow_results(ctx: IngressContext, stop: asyncio.Event) -> None:
    """Until ``stop`` is set: record every run result and dead letter in the run store.
    Offsets are committed after the writes, so a crash re-reads (writes are idempotent).
    Kafka or Redis being away is logged and waited out; it never ends the task."""
    prefix = ctx.settings.topic_prefix
    pattern = rf"^{re.escape(prefix)}\.results\..+$|^{re.escape(ctx.names.dlq)}$"
    claims = ClaimStore(PipelinedRedis(ctx.redis), prefix, ctx.settings.idempotency_ttl_s,
                        ctx.settings.claim_check_bytes)
    backoff = 0.5
    while not stop.is_set():
        consumer = _consumer(ctx.settings, results_group(prefix))
        try:
            await consumer.start()
            consumer.subscribe(pattern=pattern)
            while not stop.is_set():
                batch = await consumer.getmany(timeout_ms=200)
                for records in batch.values():
                    for record in records:
                        await _apply(ctx, claims, record)
                if batch:
                    await consumer.commit()
                backoff = 0.5
        except (KafkaError, RedisError, UnavailableError) as exc:
            log.warning("run store: %s (%s); trying again in %.1fs", type(exc).__name__, exc,
                        backoff)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff)
            backoff = min(backoff * 2, 10.0)
        finally:
            with contextlib.suppress(KafkaError):
                await consumer.stop()
