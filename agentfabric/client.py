"""The Python client: publish events, run a workflow and wait for its result, read results,
inspect and replay dead letters (docs/client.md)::

    from agentfabric.client import Client

    async with Client.from_env() as af:
        result = await af.run("invoice_triage", {"invoice_id": "INV-1", ...}, tenant="acme")
        print(result.status, result.output)

Nothing connects until the client is entered (``async with``) or :meth:`Client.start` is
awaited. The client is a trusted publisher: it signs the tenant of every event it sends
(docs/tenancy.md) and starts runs on step topics directly, so give it only to code that
may act for any tenant.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from datetime import datetime
from types import TracebackType
from typing import Any, Self

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import BaseModel, ConfigDict, ValidationError
from redis.asyncio import Redis

from agents.engine import first_message, run_id_for
from agents.loader import load_workflows
from agents.workflow import WorkflowSet
from schemas.models import DeadLetter, RunResult, TriggerEvent, utc_now
from schemas.serde import decode, validation_reason
from streams.batching import PipelinedRedis
from streams.claims import ClaimStore
from streams.codec import TRACE_HEADER, trace_header
from streams.kafka import Outgoing, Producer, make_consumer
from streams.redispool import open_redis
from streams.topics import TopicNames

from . import tracing
from .errors import (
    ConfigError,
    MessageValidationError,
    PermanentError,
    RunTimeoutError,
    UnavailableError,
)
from .settings import Settings, load_settings
from .tenancy import TenantSigner

__all__ = ["Client", "ReplayOutcome"]

RUN_SOURCE = "api"  # the source of the events behind runs started with Client.run


class ReplayOutcome(BaseModel):
    """What :meth:`Client.replay` did: the dead letters re-published, and why the others
    were not (dead letter id -> one sentence)."""

    model_config = ConfigDict(frozen=True)
    replayed: list[str]
    failed: dict[str, str]


class Client:
    """An async client of one agentfabric deployment (its settings: Kafka, Redis, the topic
    prefix and the workflows folder)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.names = TopicNames(settings.topic_prefix)
        self._workflows: WorkflowSet | None = None
        self._producer: Producer | None = None
        self._redis: Redis | None = None
        self._signer: TenantSigner | None = None
        self._claims: ClaimStore | None = None
        self._traced = False

    @classmethod
    def from_env(cls, **overrides: object) -> Client:
        """A client with the ``AGENTFABRIC_*`` settings of the environment (validated)."""
        return cls(load_settings(**overrides))

    @property
    def workflows(self) -> WorkflowSet:
        """The workflows of ``settings.workflows_dir`` (loaded on first use)."""
        if self._workflows is None:
            self._workflows = load_workflows(self.settings.workflows_dir)
        return self._workflows

    async def start(self) -> None:
        """Connect the producer and Redis (``async with`` does this)."""
        if self._producer is not None:
            return
        self._traced = tracing.start(self.settings)  # a ConfigError without the otel extra
        redis = open_redis(self.settings)
        producer = Producer(self.settings, client_id="agentfabric-client")
        try:
            await producer.start()
        except BaseException:
            await redis.aclose()
            if self._traced:
                self._traced = False
                await tracing.stop()
            raise
        self._redis, self._producer = redis, producer
        self._signer = TenantSigner(self.settings, redis)
        self._claims = ClaimStore(PipelinedRedis(redis), self.settings.topic_prefix,
                                  self.settings.idempotency_ttl_s,
                                  self.settings.claim_check_bytes)

    async def close(self) -> None:
        producer, redis = self._producer, self._redis
        self._producer = self._redis = self._signer = self._claims = None
        try:
            if producer is not None:
                await producer.stop()
        finally:
            if redis is not None:
                await redis.aclose()
            if self._traced:  # flushes the client's spans
                self._traced = False
                await tracing.stop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.close()

    def _started(self) -> tuple[Producer, TenantSigner, ClaimStore]:
        if self._producer is None or self._signer is None or self._claims is None:
            raise ConfigError("the client is not started: use `async with Client(...) as c:` "
                              "or `await client.start()` first")
        return self._producer, self._signer, self._claims

    async def _send(self, messages: list[Outgoing]) -> None:
        producer, _, claims = self._started()
        await producer.send_all(await claims.check(messages))

    async def publish(self, event: TriggerEvent | Mapping[str, Any], *,
                      source: str | None = None, traceparent: str | None = None) -> list[str]:
        """Publish one trigger event (a model, or a dict as ``agentfabric publish`` takes)
        to its source's trigger topic, signed for its tenant; returns the ids of the runs
        it starts (an event no loaded workflow takes is refused before it is sent). The
        runs join the W3C trace ``traceparent`` (or, with tracing on, the current span's)."""
        _, signer, _ = self._started()
        if not isinstance(event, TriggerEvent):
            data = dict(event)
            if source is not None:
                data.setdefault("source", source)
            try:
                event = TriggerEvent.model_validate(data)
            except ValidationError as exc:
                raise MessageValidationError(f"nothing was sent: the event does not fit the "
                                             f"TriggerEvent schema: {validation_reason(exc)}"
                                             ) from exc
        if source is not None and event.source != source:
            raise MessageValidationError(f"nothing was sent: the event says source "
                                         f"'{event.source}' but source '{source}' was given")
        run_ids = [run_id_for(event, wf.name) for wf in self.workflows.starting(event)]
        headers = await signer.headers(event.tenant, event.event_id)
        with tracing.entry_span(f"publish {event.source}", traceparent, kind="producer",
                                source=event.source, tenant=event.tenant,
                                event_type=event.event_type) as span:
            if span.traceparent is not None:
                headers.append((TRACE_HEADER, span.traceparent.encode()))
            await self._send([Outgoing.of(self.names.trigger(event.source), event.event_id,
                                          event, headers)])
        return run_ids

    async def run(self, workflow: str, input: Mapping[str, Any], *,
                  tenant: str = "default",
                  timeout: float = 60.0,  # noqa: ASYNC109 (the error names the run id)
                  traceparent: str | None = None) -> RunResult:
        """Start ``workflow`` (its latest version) on ``input`` for ``tenant`` and wait for
        its result; raises :class:`~agentfabric.errors.RunTimeoutError` (naming the run id)
        if none comes within ``timeout`` seconds (the run may still finish). The run joins
        the W3C trace ``traceparent`` (or, with tracing on, the current span's)."""
        self._started()
        wf = self.workflows.latest(workflow)
        try:
            event = TriggerEvent(source=RUN_SOURCE, event_type=f"run.{wf.name}",
                                 event_id=str(uuid.uuid4()), tenant=tenant,
                                 payload=dict(input))
        except ValidationError as exc:
            raise MessageValidationError(f"the run was not started: "
                                         f"{validation_reason(exc)}") from exc
        topic = self.names.results(wf.name)
        with tracing.entry_span(f"run {wf.name}", traceparent, kind="producer",
                                workflow=wf.name, tenant=tenant) as span:
            message = first_message(wf, event, utc_now(), span.traceparent)
            span.set(run_id=message.run_id)
            async with _ResultWatch(self.settings, topic, self._claims) as watch:
                # reading from the result topic's end before the run starts: its result is
                # written after this point, so it cannot be missed
                await self._send([Outgoing.of(self.names.step(wf.name, wf.first_step),
                                              message.run_id, message,
                                              trace_header(message))])
                result = await watch.wait_for(message.run_id, timeout)
            span.set(status=result.status if result is not None else "timeout")
        if result is None:
            raise RunTimeoutError(
                f"run {message.run_id} of {wf.name} has no result after {timeout:g}s; it may "
                f"still finish: read it later with `agentfabric results {wf.name} --json` or "
                f"Client.results('{wf.name}') (match run_id {message.run_id}), and look for "
                f"it in `agentfabric dlq list --workflow {wf.name}`",
                run_id=message.run_id, workflow=wf.name)
        return result

    async def results(self, workflow: str, *, follow: bool = False,
                      ) -> AsyncIterator[RunResult]:
        """Every result of ``workflow`` so far; with ``follow``, keep waiting for more."""
        from .app import read_results

        async for result in read_results(self.settings, workflow, follow=follow):
            yield result

    async def dead_letters(self, *, workflow: str | None = None, step: str | None = None,
                           error: str | None = None, since: datetime | str | None = None,
                           include_purged: bool = False) -> list[DeadLetter]:
        """The dead letters so far, narrowed by the filters (``since``: ``10m``, ``2h``, an
        ISO time...), without the purged ones unless ``include_purged``."""
        from .dlq_ops import DeadLetterFilter, load, select

        spec = DeadLetterFilter(workflow=workflow, step=step, error=error, since=since)
        letters, marks = await load(self.settings)
        return select(letters, spec, marks.purged, include_hidden=include_purged).letters

    async def replay(self, ids: Iterable[str]) -> ReplayOutcome:
        """Re-publish the dead letters ``ids`` (full ids or unique prefixes) to the topics
        they were read from, as ``agentfabric dlq replay`` does (docs/dead-letters.md)."""
        from .dlq_ops import (
            DeadLetterFilter,
            Replay,
            Unreplayable,
            full_values,
            load,
            plan_replay,
            select,
            send_replays,
        )

        wanted = tuple(ids)
        if not wanted:
            return ReplayOutcome(replayed=[], failed={})
        letters, marks = await load(self.settings)
        chosen = select(letters, DeadLetterFilter(ids=wanted), marks.purged).letters
        values = await full_values(self.settings, chosen)
        failed: dict[str, str] = {}
        replays: list[Replay] = []
        for letter in chosen:
            full = values.get(letter.dead_letter_id)
            plan = full if isinstance(full, Unreplayable) else plan_replay(
                letter, self.names, self._timeout_of, full_value=full)
            if isinstance(plan, Replay):
                replays.append(plan)
            else:
                failed[plan.dead_letter_id] = plan.why

        def report(replay: Replay, refused: PermanentError | None) -> None:
            if refused is not None:
                failed[replay.dead_letter_id] = refused.reason

        await send_replays(self.settings, replays, report)
        return ReplayOutcome(replayed=[r.dead_letter_id for r in replays
                                       if r.dead_letter_id not in failed], failed=failed)

    def _timeout_of(self, name: str, version: int) -> float | None:
        return self.workflows.get(name, version).timeout_s


class _ResultWatch:
    """A consumer (no group) positioned at the current end of a result topic on entry."""

    def __init__(self, settings: Settings, topic: str, claims: ClaimStore | None) -> None:
        self.settings = settings
        self.topic = topic
        self.claims = claims
        self.consumer: AIOKafkaConsumer = make_consumer(settings, None)

    async def __aenter__(self) -> Self:
        try:
            await self.consumer.start()
            partitions = self.consumer.partitions_for_topic(self.topic)
            if partitions is None:
                await self.consumer.topics()  # refresh metadata once
                partitions = self.consumer.partitions_for_topic(self.topic)
            if not partitions:
                raise ConfigError(f"topic {self.topic} does not exist; run `agentfabric "
                                  f"topics apply`")
            tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
            self.consumer.assign(tps)
            await self.consumer.seek_to_end(*tps)
            for tp in tps:
                await self.consumer.position(tp)  # fixes the offset before the run starts
        except KafkaError as exc:
            await self.consumer.stop()
            raise UnavailableError(f"cannot read {self.topic} from "
                                   f"{self.settings.bootstrap_servers} "
                                   f"({type(exc).__name__}); is the broker up?") from exc
        except BaseException:
            await self.consumer.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.consumer.stop()

    async def wait_for(self, run_id: str, within_s: float) -> RunResult | None:
        """The result of ``run_id``, or None after ``within_s`` seconds."""
        wanted = run_id.encode()
        deadline = time.monotonic() + within_s
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within_s):
                while True:
                    left_ms = max(1, int((deadline - time.monotonic()) * 1000))
                    try:
                        batch = await self.consumer.getmany(timeout_ms=min(200, left_ms))
                    except KafkaError as exc:
                        raise UnavailableError(f"lost {self.topic} while waiting for run "
                                               f"{run_id} ({type(exc).__name__}); read its "
                                               f"result later") from exc
                    for records in batch.values():
                        for record in records:
                            if record.key != wanted:
                                continue
                            if self.claims is not None:
                                record = await self.claims.resolve(record)
                            result = decode(record.value, record.headers, RunResult)
                            if result.run_id == run_id:
                                return result
        return None
