"""Run eval cases through the real fabric: publish each case as a trigger event, wait for
its run's result on the result topic, check the expectations, and build the report."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

from agentfabric.worker import background_worker
from agents.engine import Engine, run_id_for
from agents.evals import CaseResult, EvalReport, EvalSuite, check
from schemas.models import RunResult, TriggerEvent
from streams.kafka import Outgoing, Producer
from streams.reader import read_until
from streams.redispool import open_redis
from streams.topics import TopicNames

from .app import provision
from .errors import MessageValidationError
from .settings import Settings
from .tenancy import TenantSigner

__all__ = ["run_eval"]


async def run_eval(settings: Settings, engine: Engine, workflow: str, suite: EvalSuite, *,
                   start_worker: bool = True, timeout_s: float = 120.0) -> EvalReport:
    wf = engine.workflows.latest(workflow)
    names = TopicNames(settings.topic_prefix)
    batch = uuid.uuid4().hex[:8]
    events: list[TriggerEvent] = []
    for i, case in enumerate(suite.cases):
        data = {"source": wf.trigger.source, "event_type": wf.trigger.event_types[0],
                **case.event, "event_id": f"eval-{batch}-{i}", "workflow": workflow}
        try:
            events.append(TriggerEvent.model_validate(data))
        except ValueError as exc:
            raise MessageValidationError(f"case '{case.name}': the event is invalid: "
                                         f"{exc}") from exc
    runs = {run_id_for(e, workflow): i for i, e in enumerate(events)}
    await provision(settings, engine)
    async with contextlib.AsyncExitStack() as stack:
        if start_worker:
            await stack.enter_async_context(background_worker(settings, engine))
        results, sent_at = await _publish_and_collect(settings, names, workflow, events, runs,
                                                      timeout_s)
    cases = []
    for run_id, i in runs.items():
        case = suite.cases[i]
        found = results.get(run_id)
        if found is None:
            cases.append(CaseResult(name=case.name, passed=False, run_id=run_id,
                                    failures=[f"no result within {timeout_s:.0f}s (see "
                                              f"`agentfabric dlq list`)"]))
            continue
        result, received = found
        failures = [f for f in (check(e, result, case) for e in case.expect) if f is not None]
        cases.append(CaseResult(
            name=case.name, passed=not failures, failures=failures, run_id=run_id,
            latency_ms=round((received - sent_at[i]) * 1000, 2),
            input_tokens=result.usage.input_tokens, output_tokens=result.usage.output_tokens,
            cost_usd=result.usage.cost_usd))
    return EvalReport(workflow=workflow, cases=cases)


async def _publish_and_collect(
        settings: Settings, names: TopicNames, workflow: str, events: list[TriggerEvent],
        runs: dict[str, int], timeout_s: float,
) -> tuple[dict[str, tuple[RunResult, float]], list[float]]:
    found: dict[str, tuple[RunResult, float]] = {}

    def arrived(result: RunResult) -> None:
        if result.run_id in runs and result.run_id not in found:
            found[result.run_id] = (result, time.perf_counter())

    reader = asyncio.create_task(read_until(settings, names.results(workflow), RunResult,
                                            lambda _: len(found) == len(runs), each=arrived))
    producer = Producer(settings, client_id="agentfabric-eval")
    await producer.start()
    redis = open_redis(settings)
    signer = TenantSigner(settings, redis)  # each event signed for its tenant
    sent_at: list[float] = []
    try:
        for event in events:
            headers = await signer.headers(event.tenant, event.event_id)
            sent_at.append(time.perf_counter())
            await producer.send_all([Outgoing.of(names.trigger(event.source), event.event_id,
                                                 event, headers)])
    finally:
        await producer.stop()
        await redis.aclose()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(reader), timeout_s)
    reader.cancel()  # after a timeout: what arrived is in `found`
    with contextlib.suppress(asyncio.CancelledError):
        await reader
    return found, sent_at
