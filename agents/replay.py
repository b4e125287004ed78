"""Replay a recorded run: re-execute its steps against the recorded model and tool answers
and compare every step's output with the recorded bytes."""

from __future__ import annotations

from dataclasses import dataclass

from agentfabric.errors import PermanentError
from schemas.models import StepMessage, StepRecording
from schemas.serde import unseal

from .engine import Engine
from .joins import MemoryJoinStore
from .recording import ReplayDivergence, output_bytes

__all__ = ["ReplayedStep", "replay_run"]


@dataclass(frozen=True)
class ReplayedStep:
    step: str
    idempotency_key: str
    recorded: str
    replayed: str

    @property
    def identical(self) -> bool:
        return self.recorded == self.replayed


async def replay_run(engine: Engine, recordings: list[StepRecording]) -> list[ReplayedStep]:
    """Follow the run from its first recorded step, through every branch and called
    workflow it emitted; each step must have a recording."""
    if not recordings:
        raise PermanentError("no recording for this run; set `record: true` on the workflow "
                             "(or AGENTFABRIC_RECORD_RUNS=true) and run it again")
    by_key = {r.idempotency_key: r for r in recordings}
    envelopes = [unseal(r.envelope, r.envelope_schema, StepMessage) for r in recordings]
    # the run's own first step: no caller, nothing run before it (called workflows' steps
    # are in the recording too, keyed by the same root run)
    starts = [m for m in envelopes if m.parent is None and not m.path]
    if len(starts) != 1:
        raise ReplayDivergence(f"the recording has {len(starts)} first steps; it should "
                               f"have one")
    pending = [starts[0]]
    replayed: list[ReplayedStep] = []
    live_joins = engine.joins
    engine.joins = MemoryJoinStore()  # the replay's parallel joins are its own
    try:
        while pending:
            message = pending.pop(0)
            recording = by_key.get(message.idempotency_key)
            if recording is None:
                raise ReplayDivergence(f"the replay reached step '{message.step}' "
                                       f"({message.idempotency_key}), which the recording never "
                                       f"ran; the run took another path")
            run = await engine.run_step(message, replay=recording.interactions)
            replayed.append(ReplayedStep(message.step, message.idempotency_key,
                                         recording.output, output_bytes(run.output)))
            pending.extend(m for m in run.emitted if isinstance(m, StepMessage))
    finally:
        engine.joins = live_joins
    return replayed
