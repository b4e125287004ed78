"""The stages every record passes through, each with one job::

    acknowledge( decode( dedupe( execute( route ) ) ) )

A stage is a callable ``(Pass, next) -> None`` that may act before and after calling
``next`` (or not call it at all), like middleware. ``acknowledge`` sends what the inner
stages decided and then marks the output acknowledged; ``decode`` reads the record (a bad
record becomes a dead letter and goes no further); ``dedupe`` answers a record whose output
is already stored and remembers a fresh output before it is sent; ``execute`` runs the
executor under the job's timeout; ``route`` turns what it emitted, or how it failed, into
the messages to produce (next step or result, retry, dead letter). ``log_context`` binds
the record's log fields around the rest. A later concern (a lease, a metric, a span) is
one more stage in :func:`default_stages`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from aiokafka import ConsumerRecord

from agentfabric.errors import (
    AgentFabricError,
    DecodeError,
    PermanentError,
    TransientError,
    UnavailableError,
)

from .claims import ClaimStore
from .dlq import dead_letter, redact
from .executor import Emit, Executor, Job
from .idempotency import Claim, EmissionStore
from .kafka import Outgoing, Producer
from .landed import LandedCheck
from .leases import LeaseKeeper
from .logcontext import job_fields, record_fields
from .tolerant import invalid_header_keys

__all__ = ["Next", "Pass", "Pipeline", "Stage", "default_stages", "log_context"]

log = logging.getLogger(__name__)
SETTLE_MS = 2_000  # how long a stored output may take to be sent before it is looked for


@dataclass(slots=True)
class Pass:
    """One record's way through the stages."""

    record: ConsumerRecord
    executor: Executor
    job: Job | None = None
    emits: Sequence[Emit] = ()
    failure: Exception | None = None
    outputs: list[Outgoing] = field(default_factory=list)
    ack_key: str | None = None
    error: Exception | None = None  # why the outputs are a dead letter, if they are
    retried: bool = False  # the outputs are the job's next attempt
    started: float = 0.0  # wall-clock seconds when the execution began
    executed_s: float = 0.0  # how long it ran
    notes: list[Outgoing] = field(default_factory=list)  # sent beside a retry or dead letter

    def dead(self, error: Exception) -> list[Outgoing]:
        self.error = error
        return [dead_letter(self.record, error, group=self.executor.group,
                            dlq_topic=self.executor.dlq_topic,
                            message=self.job.subject if self.job else None)]


Next = Callable[[Pass], Awaitable[None]]


class Stage(Protocol):
    """A stage: acts on ``work`` before and/or after calling ``after`` (or not at all)."""

    def __call__(self, work: Pass, after: Next) -> Awaitable[None]: ...


async def _end(_: Pass) -> None:
    return None


class Pipeline:
    """The stages chained once; ``run`` takes one record through them."""

    def __init__(self, executor: Executor, stages: Sequence[Stage]) -> None:
        self.executor = executor
        self.stages = list(stages)
        chain: Next = _end
        for stage in reversed(self.stages):  # no wrapper coroutine per stage and record
            chain = functools.partial(stage, after=chain)
        self._chain = chain

    async def run(self, record: ConsumerRecord) -> Pass:
        work = Pass(record, self.executor)
        await self._chain(work)
        return work

    async def close(self) -> None:
        """Close the stages that hold resources (a stage with an async ``close``)."""
        for stage in self.stages:
            close = getattr(stage, "close", None)
            if close is not None:
                await close()


class Acknowledge:
    """Send the outputs (every acknowledgement awaited), then mark them acknowledged."""

    def __init__(self, producer: Producer, store: EmissionStore,
                 claims: ClaimStore | None = None) -> None:
        self.producer = producer
        self.store = store
        self.claims = claims

    async def __call__(self, work: Pass, after: Next) -> None:
        await after(work)
        if work.outputs:
            try:
                await self.producer.send_all(work.outputs)
            except PermanentError as exc:  # e.g. an output too large for the broker
                await self._refused(work, exc)
        if work.ack_key is not None:
            await self.store.acknowledge(work.ack_key)

    async def _refused(self, work: Pass, refused: PermanentError) -> None:
        where = f"{work.record.topic}[{work.record.partition}]@{work.record.offset}"
        if work.error is not None:
            # the dead letter itself was refused (the original bytes are too large): keep
            # an excerpt so the record is still accounted for, with its own reason
            log.error("%s: the dead letter of %s was refused (%s); sending it with the value "
                      "cut short", work.executor.name, where, refused.reason)
            full = await self.claims.put(work.record.value or b"") if self.claims else None
            await self.producer.send_all([_excerpt_dead_letter(work, work.error, full),
                                          *work.notes])
            return
        log.error("%s: %s; dead-lettering %s", work.executor.name, refused.reason, where)
        if work.ack_key is not None:
            # a replay of the dead letter computes the output afresh: the unit of work is
            # not done, though publishing the output marked it so
            await self.store.forget(work.ack_key, work.job.done_key if work.job else None)
            work.ack_key = None
        # the ledger hears of the dead letter, not of what the outputs said
        work.notes = _failure_notes(work, "dead_letter", refused)
        work.outputs = [*work.dead(refused), *work.notes]
        try:
            await self.producer.send_all(work.outputs)
        except PermanentError as again:
            await self._refused(work, again)


def _excerpt_dead_letter(work: Pass, error: Exception, claim: str | None = None,
                         keep: int = 64 * 1024) -> Outgoing:
    record = work.record
    size = len(record.value or b"")
    short = dataclasses.replace(record, value=(record.value or b"")[:keep])
    where = (f"; the full value is in Redis as claim check {claim}" if claim else "")
    return dead_letter(short, error, group=work.executor.group, logged=False,
                       dlq_topic=work.executor.dlq_topic,
                       message=work.job.subject if work.job else None, value_claim=claim,
                       note=f"the original value of {size} bytes was too large for the "
                            f"dead-letter topic; only its first {keep} bytes are kept{where}")


async def decode(work: Pass, after: Next) -> None:
    """Read the record into a job; a record that cannot be read is a dead letter."""
    try:
        bad_keys = invalid_header_keys(work.record.headers)
        if bad_keys:
            raise DecodeError(f"header key {bad_keys[0]} is not UTF-8, so no Kafka client can "
                              f"read it as a string; fix the producer that wrote it")
        work.job = work.executor.decode(work.record)
    except PermanentError as exc:
        work.outputs = work.dead(exc)
        return
    except Exception as exc:
        log.exception("%s could not decode %s[%d]@%d", work.executor.name, work.record.topic,
                      work.record.partition, work.record.offset)
        work.outputs = work.dead(exc)
        return
    await after(work)


async def log_context(work: Pass, after: Next) -> None:
    """Bind the record's log fields (run id, workflow, step, tenant, trace id, consumer) to
    every line logged while it is processed; then one line: DEBUG when it finished, INFO
    when it is retried (a dead letter logs its own WARNING line, streams.dlq)."""
    assert work.job is not None
    started = time.perf_counter()
    with record_fields(job_fields(work.job, work.executor.name)):
        await after(work)
        latency_ms = round((time.perf_counter() - started) * 1000, 3)
        if work.retried:
            log.info("%s: retrying after %s: %s", work.executor.name,
                     type(work.failure).__name__, redact(str(work.failure)),
                     extra={"outcome": "retry", "latency_ms": latency_ms})
        elif log.isEnabledFor(logging.DEBUG):
            outcome = "dead_letter" if work.error is not None else "ok"
            log.debug("%s: step finished", work.executor.name,
                      extra={"outcome": outcome, "latency_ms": latency_ms})


class Dedupe:
    """One execution per key, emit-once. Before running, a record claims its key: an
    acknowledged output or a completed unit of work (``job.done_key``, e.g. a replayed dead
    letter of a step that has since completed) sends nothing; a stored output is re-sent as
    it was; otherwise the record takes a lease (waiting while another worker holds it) and
    runs. Its output, dead letters included, is published before it is sent, and the first
    output published wins: a record that lost its lease re-sends the winner's bytes.
    A pure job (``Job.pure``) runs without claim or lease and settles its output afterwards
    in one round trip, with the same outcome: what was stored or done first wins."""

    def __init__(self, store: EmissionStore, lease_ttl_s: float = 30.0,
                 landed: LandedCheck | None = None) -> None:
        self.store = store
        self.leases = LeaseKeeper(store, int(lease_ttl_s * 1000))
        self.instance = uuid.uuid4().hex[:12]  # tokens of this stage's leases
        self.landed = landed

    async def close(self) -> None:
        await self.leases.close()
        if self.landed is not None:
            await self.landed.close()

    async def __call__(self, work: Pass, after: Next) -> None:
        job = work.job
        key = job.dedupe_key if job else None
        if job is None or key is None:
            await after(work)
            return
        if job.pure:
            await self._settle(work, key, after)
            return
        record = work.record  # the same record tried again in place holds the same lease
        token = f"{self.instance}:{record.topic}:{record.partition}:{record.offset}"
        wait_s = 0.02
        while True:
            claim = await self.store.claim(key, job.done_key, token, self.leases.ttl_ms)
            if claim.state in ("acked", "done"):
                return
            if claim.state == "stored":
                work.outputs, work.ack_key = await self._unsent(work, key, claim), key
                return
            if claim.state == "leased":
                break
            # another worker runs this step now: wait for its output or its lease to lapse
            await asyncio.sleep(min(wait_s, max(claim.wait_ms, 10) / 1000))
            wait_s = min(wait_s * 2, 1.0)
        self.leases.hold(key, token)
        try:
            await after(work)
        finally:
            self.leases.drop(key)
        done_key = job.done_key if work.error is None and not work.retried else None
        winner = await self.store.publish(key, work.outputs, token, done_key)
        if winner is None:
            work.ack_key = key
            return
        log.warning("%s: another worker published the output of %s first; sending its "
                    "output instead", work.executor.name, key)
        await self._adopt(work, key, winner)

    async def _settle(self, work: Pass, key: str, after: Next) -> None:
        """A pure job: run it, then keep its output unless another run's came first."""
        job = work.job
        assert job is not None
        await after(work)
        found = await self.store.settle(key, work.outputs, job.done_key,
                                        work.error is None and not work.retried)
        if found is None:
            work.ack_key = key
            return
        await self._adopt(work, key, found)

    async def _adopt(self, work: Pass, key: str, found: Claim) -> None:
        """Another run's outcome for ``key`` stands: its stored output is sent (what is not
        on the broker yet) or, acknowledged or its unit of work completed, nothing is. This
        run's own outcome goes with it, a failure included, so neither the ledger nor the
        metrics report a failure whose retry or dead letter was never sent. What it emitted
        stays, for the metrics: the tokens and cost it spent were spent all the same (a retry
        is not a step's output: its message is dropped, so no usage is read from it)."""
        if work.retried:
            work.emits = ()
        work.error, work.retried, work.failure, work.notes = None, False, None, []
        if found.state == "stored":
            work.outputs, work.ack_key = await self._unsent(work, key, found), key
        else:
            work.outputs = []

    async def _unsent(self, work: Pass, key: str, claim: Claim) -> list[Outgoing]:
        """Of a stored output, what is not on the broker yet (``streams.landed``): a worker
        that stored it a moment ago is given ``SETTLE_MS`` to send it and mark it sent."""
        outputs = claim.outputs or []
        if self.landed is None or claim.stored_ms is None or not outputs:
            return outputs
        # (bounded: the clock that stamped it may be ahead of this one)
        wait_ms = min(claim.stored_ms + SETTLE_MS - int(time.time() * 1000), SETTLE_MS)
        if wait_ms > 0:  # looked at again and again (from 20 ms), until it is marked sent
            deadline, pause = time.monotonic() + wait_ms / 1000, 0.02
            while True:
                await asyncio.sleep(max(0.0, min(pause, deadline - time.monotonic())))
                stored, acked = await self.store.recall(key)
                if acked:
                    return []
                if stored is None:  # forgotten: the broker refused it and its sender dead-
                    return []       # lettered the record, or a replay cleared it
                outputs = stored
                if time.monotonic() >= deadline:
                    break
                pause *= 2
        missing = await self.landed.missing(outputs, claim.stored_ms)
        if len(missing) < len(outputs):
            log.info("%s: %d of %d stored outputs of %s are on the broker already; sending "
                     "%d", work.executor.name, len(outputs) - len(missing), len(outputs),
                     key, len(missing))
        return missing


async def execute(work: Pass, after: Next) -> None:
    """Run the executor under the job's timeout; a timeout is a transient failure."""
    assert work.job is not None
    work.started, clock = time.time(), time.perf_counter()
    try:
        async with asyncio.timeout(work.job.timeout_s):
            work.emits = await work.executor.execute(work.job)
    except UnavailableError:
        raise  # Kafka or Redis is down: the runtime tries this record again, no attempt spent
    except TimeoutError:
        work.failure = TransientError(
            f"{work.executor.name} took longer than its timeout of {work.job.timeout_s:g}s; "
            f"raise the step's timeout_s or find what is slow")
    except Exception as exc:  # noqa: BLE001 - a step's failure is routed, never raised
        work.failure = exc
    work.executed_s = time.perf_counter() - clock
    await after(work)


async def route(work: Pass, after: Next) -> None:
    """Where the run goes: the emitted messages, a retry, or a dead letter."""
    assert work.job is not None
    failure = work.failure
    if isinstance(failure, TransientError):
        retry = work.executor.retry(work.job, failure)
        if retry is None:
            attempts = work.job.subject.attempt if work.job.subject else 1
            # the same error class, so the dead letter says what kind of failure it was
            failure.args = (f"{failure.reason} (gave up after {attempts} attempts; replay the "
                            f"dead letter once the cause is fixed)",)
        else:
            work.emits = (retry,)
            work.retried = True
            failure = None
    if failure is None:
        try:
            work.outputs = [Outgoing.of(e.topic, e.key, e.model, e.headers) for e in work.emits]
        except Exception as exc:  # noqa: BLE001 - an output that cannot be encoded
            failure = exc
    if failure is not None:
        if not isinstance(failure, AgentFabricError):
            log.error("%s failed on %s[%d]@%d: %s: %s", work.executor.name, work.record.topic,
                      work.record.partition, work.record.offset, type(failure).__name__,
                      failure, exc_info=failure)
        work.outputs = work.dead(failure)
    failed = failure if failure is not None else work.failure
    if failed is not None:
        work.notes = _failure_notes(work, "retry" if work.retried else "dead_letter", failed)
        work.outputs += work.notes
    await after(work)


def _failure_notes(work: Pass, outcome: str, failure: Exception) -> list[Outgoing]:
    """What the executor sends beside a retry or a dead letter (its ``attempt_failed``
    hook, e.g. the run ledger's event of the failed attempt); never in the way of either."""
    hook = getattr(work.executor, "attempt_failed", None)
    if hook is None or work.job is None:
        return []
    try:
        emits = hook(work.job, outcome, failure, work.started, work.executed_s)
        return [Outgoing.of(e.topic, e.key, e.model, e.headers) for e in emits]
    except Exception:  # a note is not worth losing the retry or the dead letter for
        log.exception("%s: could not note a failed attempt", work.executor.name)
        return []


class ClaimChecks:
    """Before decoding: put back a value that travelled as a claim check. Around execution:
    replace outputs too large to send by claim checks (before they are stored)."""

    def __init__(self, claims: ClaimStore) -> None:
        self.claims = claims

    async def incoming(self, work: Pass, after: Next) -> None:
        try:
            work.record = await self.claims.resolve(work.record)
        except DecodeError as exc:
            work.outputs = work.dead(exc)
            return
        await after(work)

    async def outgoing(self, work: Pass, after: Next) -> None:
        await after(work)
        if work.outputs and work.error is None:
            work.outputs = await self.claims.check(work.outputs)


def default_stages(producer: Producer, store: EmissionStore, claims: ClaimStore | None = None,
                   lease_ttl_s: float = 30.0, observe: Stage | None = None,
                   landed: LandedCheck | None = None) -> list[Stage]:
    """The stages in order; ``observe`` (e.g. ``streams.metrics.Observe``) goes first, so it
    sees the outputs as acknowledged."""
    first = [observe] if observe is not None else []
    if claims is None:
        return [*first, Acknowledge(producer, store), decode, log_context,
                Dedupe(store, lease_ttl_s, landed), execute, route]
    checks = ClaimChecks(claims)
    return [*first, Acknowledge(producer, store, claims), checks.incoming, decode,
            log_context, Dedupe(store, lease_ttl_s, landed), checks.outgoing, execute, route]
