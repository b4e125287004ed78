"""The executor protocol: what the runtime calls to turn one decoded record into messages.

``streams`` knows records, offsets, topics and stages; it does not know workflows. The
composition package (``agentfabric.executors``) implements this protocol with the workflow
engine: the router (trigger -> first steps) and one executor per workflow step.

The runtime drives an executor through its stages::

    record --decode--> Job --dedupe--> execute --> [Emit, ...] --route--> Outgoing --> acknowledge

``decode`` reads the record at the runtime's edge into a model (a ``PermanentError`` makes a
dead letter); ``execute`` is a function of that model and returns models to emit (a
``TransientError`` retries through ``retry``; an ``UnavailableError`` means Kafka or Redis is
down and the runtime tries the same record again later). Encoding the emitted models is the
runtime's job (the ``route`` stage).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from aiokafka import ConsumerRecord

from agentfabric.errors import TransientError
from schemas.models import AvroModel, StepMessage

__all__ = ["Emit", "Executor", "Job", "Sink"]


@dataclass(frozen=True, slots=True)
class Emit:
    """One model to produce: the route stage encodes it."""

    topic: str
    key: str
    model: AvroModel
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class Job:
    """A decoded record: the input model, how to dedupe it, and how long it may run.

    ``dedupe_key`` names the record's output in the emission store (``None``: not deduped);
    ``done_key`` names the unit of work across attempts and replays (a step visit, a
    trigger): once one of them completes, the others run nothing;
    ``subject`` is the run envelope a dead letter of this record describes, if any;
    ``trace_parent`` is the W3C trace context the record carries; ``first_failure_ms``
    when the run first failed at this step (a retry) and ``due_ms`` when a held retry is due.
    ``replay_of`` is the dead letter a replayed record came from; ``approval_of`` the
    hand-off whose approval runs a step again (both are lineages: their own dedupe keys).
    ``pure`` says running the job has no effect beyond the messages it returns (routing a
    trigger, a transform): it runs without a lease, and its output is settled afterwards in
    one round trip (the first output stored still wins).
    """

    message: AvroModel
    dedupe_key: str | None
    timeout_s: float
    done_key: str | None = None
    subject: StepMessage | None = None
    trace_parent: str | None = None
    first_failure_ms: int | None = None
    due_ms: int | None = None
    replay_of: str | None = None
    approval_of: str | None = None
    pure: bool = False


# a sink executor's ``execute_batch``: writes the jobs of one fetched batch, in order
Sink = Callable[[Sequence[Job]], Awaitable[None]]


class Executor(Protocol):
    """One consumer group's work: the router, or one step of one workflow. An executor may
    also have:

    - a ``fetch_max_wait_ms`` attribute for its consumer (default: the setting);
    - an ``attempt_failed(job, outcome, error, started, seconds) -> Sequence[Emit]``
      method: messages sent beside a retry (``outcome`` "retry") or a dead letter
      ("dead_letter") of an attempt that failed (``started`` wall-clock seconds, ran
      ``seconds``), e.g. the run ledger's event;
    - an ``execute_batch(jobs)`` method that makes it a sink: idempotent writes with no
      outputs (the run ledger); a fetched batch of a partition is decoded and written at
      once, in order (``streams.consumer``)."""

    @property
    def name(self) -> str: ...

    @property
    def group(self) -> str: ...

    @property
    def topics(self) -> Sequence[str]: ...

    @property
    def max_in_flight(self) -> int:
        """Records of one partition in progress at once."""

    @property
    def dlq_topic(self) -> str: ...

    def decode(self, record: ConsumerRecord) -> Job:
        """Read the record; raise PermanentError if it cannot be run."""

    async def execute(self, job: Job) -> Sequence[Emit]:
        """Run the job; raise TransientError, PermanentError or UnavailableError."""

    def retry(self, job: Job, error: TransientError) -> Emit | None:
        """The message that tries ``job`` again, or None once its attempts are spent."""
