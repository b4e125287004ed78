"""The run ledger: every processed step emits a :class:`RunEvent` on ``<prefix>.run-events``
(:func:`step_event`, called by the step executor); the :class:`LedgerExecutor` (one more
consumer in every worker's runtime) folds those events into Redis, where ``agentfabric runs
show|list`` and ``agentfabric usage`` read them (:class:`RunLedger`).

Keys (``p`` is the topic prefix; all expire after :data:`RETENTION_S`)::

    p:ledger:seen:<run>:<idempotency key>:<attempt>   SET NX: one fold per step visit
    p:ledger:run:<run>:steps                         list of the run's events (JSON)
    p:ledger:run:<run>                               hash: workflow, tenant, status, times,
                                                     totals
    p:ledger:runs                                    zset run id -> last finish (ms)
    p:ledger:usage:<hour>                            hash "tenant|workflow|step|metric"
    p:ledger:hours                                   zset of hours that have usage

Folding is one Lua script: the seen-marker and every counter change together or not at
all, so a redelivered event (the consumer is at-least-once) counts once.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from aiokafka import ConsumerRecord
from redis.asyncio import Redis
from redis.exceptions import RedisError

from agents.engine import Emitted
from schemas.models import HandOff, RunEvent, RunResult, StepMessage, Usage, utc_now
from schemas.serde import decode, unseal
from streams.batching import PipelinedRedis, redis_unavailable
from streams.executor import Emit, Job
from streams.topics import TopicNames

from .consumers import SideConsumer
from .errors import ConfigError, UnavailableError
from .redaction import redact
from .settings import Settings

__all__ = ["FAILED", "LedgerExecutor", "RunLedger", "RunSummary", "UsageRow", "failed_event",
           "parse_since", "step_event"]

RETENTION_S = 30 * 24 * 3600
HOUR_MS = 3_600_000
LEDGER_WAIT_MS = 100  # the ledger is not on a run's path: no need to poll at step speed
METRICS = ("input_tokens", "output_tokens", "cost_usd", "tool_calls", "steps")

_FOLD = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end
local ttl = ARGV[1]
redis.call('RPUSH', KEYS[2], ARGV[2])
local run = KEYS[3]
redis.call('HSETNX', run, 'workflow', ARGV[3])
redis.call('HSETNX', run, 'tenant', ARGV[4])
local started, finished = tonumber(ARGV[6]), tonumber(ARGV[7])
local s = tonumber(redis.call('HGET', run, 'started_ms') or started)
local f = tonumber(redis.call('HGET', run, 'finished_ms') or finished)
if started < s then s = started end
if finished > f then f = finished end
redis.call('HSET', run, 'started_ms', s, 'finished_ms', f)
if ARGV[5] ~= '' then
  redis.call('HSET', run, 'status', ARGV[5], 'final', '1')
elseif redis.call('HGET', run, 'final') ~= '1' then
  redis.call('HSET', run, 'status', ARGV[8])
end
redis.call('HINCRBY', run, 'input_tokens', ARGV[9])
redis.call('HINCRBY', run, 'output_tokens', ARGV[10])
redis.call('HINCRBYFLOAT', run, 'cost_usd', ARGV[11])
redis.call('HINCRBY', run, 'tool_calls', ARGV[12])
redis.call('HINCRBY', run, 'steps', ARGV[16])
redis.call('ZADD', KEYS[4], f, ARGV[13])
local u = ARGV[14]
redis.call('HINCRBY', KEYS[5], u .. 'input_tokens', ARGV[9])
redis.call('HINCRBY', KEYS[5], u .. 'output_tokens', ARGV[10])
redis.call('HINCRBYFLOAT', KEYS[5], u .. 'cost_usd', ARGV[11])
redis.call('HINCRBY', KEYS[5], u .. 'tool_calls', ARGV[12])
redis.call('HINCRBY', KEYS[5], u .. 'steps', ARGV[16])
redis.call('ZADD', KEYS[6], ARGV[15], ARGV[15])
for i = 2, 6 do redis.call('EXPIRE', KEYS[i], ttl) end
return 1
"""


def _usage_of(emitted: Emitted) -> Usage | None:
    if isinstance(emitted, StepMessage | RunResult):
        return emitted.usage
    if emitted.envelope_schema.startswith("step_message"):
        return unseal(emitted.envelope, emitted.envelope_schema, StepMessage).usage
    return None


FAILED = ("retry", "dead_letter")  # a failed attempt: listed, but not counted as a step
# the run's status after a non-final event (a result's status is final)
_RUNNING_AS = {"hand_off": "handed_off", "retry": "retrying", "dead_letter": "dead_letter"}


def failed_event(message: StepMessage, outcome: str, error: BaseException, started_s: float,
                 seconds: float) -> RunEvent:
    """The run event of an attempt that failed: retried (``retry``) or dead-lettered
    (``dead_letter``), with the error class and its redacted reason."""
    started = datetime.fromtimestamp(started_s, UTC) if started_s else utc_now()
    reason = getattr(error, "reason", None) or str(error)
    return RunEvent(
        run_id=message.run_id, workflow=message.workflow,
        workflow_version=message.workflow_version, step=message.step, tenant=message.tenant,
        idempotency_key=message.idempotency_key, attempt=message.attempt, outcome=outcome,
        started_at=started, finished_at=started + timedelta(seconds=seconds),
        latency_ms=round(seconds * 1000, 3), trace_parent=message.trace_parent,
        error=redact(f"{type(error).__name__}: {reason}")[:500])


def step_event(message: StepMessage, emitted: Sequence[Emitted], started: datetime,
               latency_ms: float) -> RunEvent:
    """The run event of one processed step: its share of the run's usage is what the run's
    usage grew by (the first emitted message carries the run's usage after the step)."""
    outcome, status, after = "next", None, None
    for out in emitted:
        if isinstance(out, RunResult):
            outcome, status = "result", out.status
        elif isinstance(out, HandOff):
            outcome = "hand_off"
        if after is None:
            after = _usage_of(out)
    spent = after or message.usage
    before = message.usage
    return RunEvent(
        run_id=message.run_id, workflow=message.workflow,
        workflow_version=message.workflow_version, step=message.step, tenant=message.tenant,
        idempotency_key=message.idempotency_key, attempt=message.attempt, outcome=outcome,
        started_at=started, finished_at=started + timedelta(milliseconds=latency_ms),
        latency_ms=round(latency_ms, 3),
        input_tokens=max(0, spent.input_tokens - before.input_tokens),
        output_tokens=max(0, spent.output_tokens - before.output_tokens),
        cost_usd=max(0.0, round(spent.cost_usd - before.cost_usd, 10)),
        tool_calls=max(0, spent.tool_calls - before.tool_calls),
        trace_parent=message.trace_parent, status=status)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)


_SINCE = re.compile(r"^(?P<n>\d+(?:\.\d+)?)(?P<unit>[smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now: float | None = None) -> int:
    """``1h``, ``30m``, ``2d`` (ago) or an ISO 8601 time, as epoch milliseconds."""
    now = time.time() if now is None else now
    match = _SINCE.match(text.strip())
    if match:
        return int((now - float(match["n"]) * _UNITS[match["unit"]]) * 1000)
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise ConfigError(f"--since {text!r}: give a duration like 30m, 1h, 7d or an ISO "
                          f"time like 2026-11-22T09:00") from exc
    return _ms(when if when.tzinfo else when.replace(tzinfo=UTC))


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    workflow: str
    tenant: str
    status: str
    started_ms: int
    finished_ms: int
    totals: Usage


@dataclass
class UsageRow:
    tenant: str
    workflow: str
    step: str  # "*" when grouped by workflow
    usage: Usage = field(default_factory=Usage)


class RunLedger:
    """Folds run events into Redis and answers ``runs show``, ``runs list`` and ``usage``."""

    def __init__(self, redis: Redis, prefix: str, retention_s: int = RETENTION_S) -> None:
        self.redis = redis
        self.base = f"{prefix}:ledger"
        self.retention_s = retention_s
        # folds of concurrent events share one round trip
        self._pipelined = PipelinedRedis(redis)

    def _run_key(self, run_id: str) -> str:
        return f"{self.base}:run:{run_id}"

    async def fold(self, event: RunEvent) -> bool:
        """Count ``event`` once; False if it was counted before (a redelivery)."""
        [counted] = await self.fold_many([event])
        return counted

    async def fold_many(self, events: Sequence[RunEvent]) -> list[bool]:
        """Count each event once, in order, in one round trip; per event whether it counted
        now (False: counted before, a redelivery)."""
        if not events:
            return []
        try:
            replies = await self._pipelined.script(_FOLD, [self._fold_call(e) for e in events])
        except UnavailableError:
            raise
        except RedisError as exc:
            raise redis_unavailable(exc, doing="folding run events") from exc
        return [bool(counted) for counted in replies]

    def _fold_call(self, event: RunEvent) -> tuple[list[str], list[Any]]:
        hour = _ms(event.finished_at) // HOUR_MS
        run = self._run_key(event.run_id)
        # a failed attempt has a key of its own: a replay of its dead letter runs the same
        # step visit and attempt again, and that event must count too
        failed = f":{event.outcome}" if event.outcome in FAILED else ""
        keys = [f"{self.base}:seen:{event.run_id}:{event.idempotency_key}:{event.attempt}"
                f"{failed}",
                f"{run}:steps", run, f"{self.base}:runs", f"{self.base}:usage:{hour}",
                f"{self.base}:hours"]
        args: list[Any] = [
            self.retention_s, event.model_dump_json(), event.workflow, event.tenant,
            event.status or "" if event.outcome == "result" else "",
            _ms(event.started_at), _ms(event.finished_at),
            _RUNNING_AS.get(event.outcome, "running"),
            event.input_tokens, event.output_tokens, repr(event.cost_usd), event.tool_calls,
            event.run_id, f"{event.tenant}|{event.workflow}|{event.step}|", hour,
            0 if event.outcome in FAILED else 1]
        return keys, args

    async def steps(self, run_id: str) -> list[RunEvent]:
        """The run's step events in the order they started."""
        raw = await self.redis.lrange(f"{self._run_key(run_id)}:steps", 0, -1)
        events = [RunEvent.model_validate_json(item) for item in raw]
        return sorted(events, key=lambda e: (e.started_at, e.finished_at))

    async def summary(self, run_id: str) -> RunSummary | None:
        data = await self.redis.hgetall(self._run_key(run_id))
        return _summary(run_id, data) if data else None

    async def runs(self, *, workflow: str | None = None, status: str | None = None,
                   since_ms: int | None = None, limit: int = 20) -> list[RunSummary]:
        """Runs by last activity, newest first."""
        ids = await self.redis.zrevrangebyscore(f"{self.base}:runs", "+inf",
                                                since_ms if since_ms is not None else "-inf",
                                                start=0, num=max(limit * 20, 1000))
        found: list[RunSummary] = []
        chunk = 200
        for at in range(0, len(ids), chunk):
            pipe = self.redis.pipeline(transaction=False)
            for run_id in ids[at:at + chunk]:
                pipe.hgetall(self._run_key(_text(run_id)))
            for run_id, data in zip(ids[at:at + chunk], await pipe.execute(), strict=True):
                if not data:
                    continue
                item = _summary(_text(run_id), data)
                if (workflow and item.workflow != workflow) or (status and
                                                                item.status != status):
                    continue
                found.append(item)
                if len(found) >= limit:
                    return found
        return found

    async def usage(self, *, since_ms: int, tenant: str | None = None,
                    by: Literal["workflow", "step"] = "workflow",
                    ) -> tuple[list[UsageRow], int]:
        """Usage per (tenant, workflow[, step]) in the hours from ``since_ms``'s hour on,
        and how many hours that window spans (for a burn rate)."""
        first = since_ms // HOUR_MS
        hours = [int(_text(h)) for h in await self.redis.zrangebyscore(f"{self.base}:hours", first,
                                                                "+inf")]
        rows: dict[tuple[str, str, str], dict[str, float]] = {}
        for hour in hours:
            for name, value in (await self.redis.hgetall(f"{self.base}:usage:{hour}")).items():
                who, wf, step, metric = _text(name).split("|")
                if tenant is not None and who != tenant:
                    continue
                key = (who, wf, step if by == "step" else "*")
                totals = rows.setdefault(key, dict.fromkeys(METRICS, 0.0))
                totals[metric] += float(value)
        span = max(1, int(time.time() * 1000) // HOUR_MS - first + 1)
        return [UsageRow(t, w, s, _usage(v)) for (t, w, s), v in sorted(rows.items())], span


def _usage(values: dict[str, float]) -> Usage:
    return Usage(input_tokens=int(values["input_tokens"]),
                 output_tokens=int(values["output_tokens"]),
                 cost_usd=round(values["cost_usd"], 10), tool_calls=int(values["tool_calls"]),
                 steps=int(values["steps"]))


def _summary(run_id: str, data: Mapping[Any, Any]) -> RunSummary:
    text = {_text(k): _text(v) for k, v in data.items()}
    return RunSummary(run_id=run_id, workflow=text.get("workflow", "-"),
                      tenant=text.get("tenant", "-"), status=text.get("status", "running"),
                      started_ms=int(text.get("started_ms", 0)),
                      finished_ms=int(text.get("finished_ms", 0)),
                      totals=_usage({m: float(text.get(m, 0)) for m in METRICS}))


class LedgerExecutor(SideConsumer):
    """Reads the run-events topic and folds each event into the ledger (idempotently);
    emits nothing. A sink: each fetched batch is folded at once."""

    def __init__(self, settings: Settings, ledger: RunLedger) -> None:
        names = TopicNames(settings.topic_prefix)
        super().__init__(settings, name="ledger", group=names.ledger_group,
                         topic=names.run_events, wait_ms=LEDGER_WAIT_MS)
        self.ledger = ledger

    def decode(self, record: ConsumerRecord) -> Job:
        return Job(message=decode(record.value, record.headers, RunEvent), dedupe_key=None,
                   timeout_s=self.timeout_s)

    async def execute(self, job: Job) -> Sequence[Emit]:
        assert isinstance(job.message, RunEvent)
        await self.ledger.fold(job.message)
        return []

    async def execute_batch(self, jobs: Sequence[Job]) -> None:
        """A sink: a fetched batch of events folded in one round trip (``streams.consumer``)."""
        events = [job.message for job in jobs]
        assert all(isinstance(e, RunEvent) for e in events)
        await self.ledger.fold_many(events)  # type: ignore[arg-type]


def event_json(event: RunEvent) -> dict[str, Any]:
    """An event as plain JSON values (for ``--json``)."""
    data: dict[str, Any] = json.loads(event.model_dump_json())
    return data
