"""The step cache: opt-in per step (``cache: {ttl_s: N}``), outputs kept by workflow,
version, step, tenant and a digest of what the step reads.

The input digest is SHA-256 of the canonical JSON of the run's ``input``, the outputs of
earlier steps (``steps``) and the event's type and source: everything a step's templates
may read except the run's identity (``run.id``, ``run.started_at``, ``run.attempt``,
``event.id``), which differs between otherwise identical runs. A hit returns the stored
output (and branch choice) with zero usage, calling no model and no tool; a miss runs the
step and stores a plain outcome (no hand-off, call, fan-out or degraded answer). Each
look-up is reported to ``on_cache(workflow, step, hit)`` if one is set (metrics).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from schemas.models import StepMessage, canonical_json

if TYPE_CHECKING:
    from .steps.base import StepContext, StepOutcome, StepSpec

__all__ = ["CacheHook", "CacheSpec", "MemoryStepCache", "StepCache", "cache_key",
           "input_digest", "run_cached"]

CacheHook = Callable[[str, str, bool], None]  # (workflow, step, hit)


class CacheSpec(BaseModel):
    """A step's ``cache:`` field."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    ttl_s: float = Field(gt=0, le=90 * 86_400,
                         description="How long a cached output is served.")


class StepCache(Protocol):
    """Where cached step outputs live (text values, expiring after ``ttl_s``)."""

    async def get(self, key: str) -> str | None: ...

    async def put(self, key: str, value: str, ttl_s: float) -> None: ...


class MemoryStepCache:
    """An in-process cache (tests, a single worker); ``clock`` in seconds."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._items: dict[str, tuple[float, str]] = {}

    async def get(self, key: str) -> str | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item[0] <= self._clock():
            del self._items[key]
            return None
        return item[1]

    async def put(self, key: str, value: str, ttl_s: float) -> None:
        self._items[key] = (self._clock() + ttl_s, value)


def input_digest(msg: StepMessage) -> str:
    """What the step reads, hashed (not the run's identity: see the module docstring)."""
    what = {"input": msg.input, "steps": msg.context,
            "event": {"type": msg.event_type, "source": msg.source}}
    return hashlib.sha256(canonical_json(what).encode()).hexdigest()


def cache_key(msg: StepMessage) -> str:
    """The cache key of the step ``msg`` is for."""
    return (f"{msg.workflow}:{msg.workflow_version}:{msg.step}:{msg.tenant}:"
            f"{input_digest(msg)}")


def _plain(outcome: StepOutcome) -> bool:
    return (outcome.hand_off is None and outcome.call is None and outcome.fan_out is None
            and not outcome.degraded)


async def run_cached(cache: StepCache | None, step: StepSpec, ctx: StepContext,
                     interactions: list[dict[str, Any]], on_cache: CacheHook | None = None,
                     ) -> StepOutcome:
    """Run ``step``, or answer it from ``cache`` if it opts in. A hit puts the stored
    interactions into ``interactions`` (so a recorded run still replays)."""
    from .steps.base import StepOutcome

    if cache is None or step.cache is None:
        return await step.run(ctx)
    msg = ctx.message
    key = cache_key(msg)
    found = await cache.get(key)
    if on_cache is not None:
        on_cache(msg.workflow, step.id, found is not None)
    if found is not None:
        stored = json.loads(found)
        interactions.extend(stored.get("interactions", ()))
        return StepOutcome(output=stored["output"], next_step=stored.get("next_step"))
    outcome = await step.run(ctx)
    if _plain(outcome):
        await cache.put(key, canonical_json({"output": outcome.output,
                                             "next_step": outcome.next_step,
                                             "interactions": interactions}),
                        step.cache.ttl_s)
    return outcome
