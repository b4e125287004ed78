"""What the ``approvals`` commands do: list the requests, and approve or reject one.

Requests are read from Redis, where every worker registers the hand-offs of the approvals
topic, and from the approvals topic itself (so a request a worker has not registered yet
is found too). A decision is recorded first-writer-wins and published on the decisions
topic, where a worker resumes or ends the run (see :mod:`agentfabric.approvals`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from schemas.models import ApprovalDecision, HandOff, utc_now
from schemas.serde import decode
from streams.batching import PipelinedRedis
from streams.reader import read_topic
from streams.topics import TopicNames

from .approvals import (
    ApprovalStore,
    DecisionPublisher,
    decision_for,
    expiry_decision,
    settle,
)
from .errors import AgentFabricError, PermanentError
from .settings import Settings
from .worker import connect_redis

__all__ = ["ApprovalRefused", "Decided", "Request", "State", "decide", "load_requests",
           "select"]

log = logging.getLogger(__name__)
MIN_PREFIX = 6  # the shortest start of a hand-off id that names it
State = Literal["pending", "overdue", "approved", "rejected", "expired"]


class ApprovalRefused(AgentFabricError):
    """A decision that cannot be made: no such request, already decided, expired, or
    ambiguous."""


@dataclass(frozen=True)
class Request:
    """One hand-off, when it expires, and its decision if there is one."""

    hand_off: HandOff
    expires_at: datetime
    decision: ApprovalDecision | None = None

    def state(self, now: datetime) -> State:
        if self.decision is None:
            return "pending" if self.expires_at > now else "overdue"
        if self.decision.expired:
            return "expired"
        return "approved" if self.decision.approved else "rejected"


@dataclass(frozen=True)
class Decided:
    """A decision that was recorded and published."""

    hand_off: HandOff
    decision: ApprovalDecision


@asynccontextmanager
async def _store(settings: Settings) -> AsyncIterator[ApprovalStore]:
    redis = await connect_redis(settings)
    try:
        yield ApprovalStore(PipelinedRedis(redis), settings.topic_prefix,
                            settings.idempotency_ttl_s, settings.approval_expiry_s)
    finally:
        await redis.aclose()


def _matches(hand_off: HandOff, target: str) -> bool:
    """Whether ``target`` names ``hand_off``: its run id, its id, or (six characters or
    more, as ``approvals list`` shows them) the start of its id."""
    return target == hand_off.run_id or hand_off.hand_off_id == target or (
        len(target) >= MIN_PREFIX and hand_off.hand_off_id.startswith(target))


async def _from_topic(settings: Settings, target: str | None = None) -> list[HandOff]:
    """The hand-offs on the approvals topic (only those ``target`` names, if given)."""
    topic = TopicNames(settings.topic_prefix).approvals
    found = []
    async for record in read_topic(settings, topic):
        try:
            hand_off = decode(record.value, record.headers, HandOff)
        except PermanentError as exc:
            log.warning("%s[%d]@%d is not a readable hand-off (%s); skipped", record.topic,
                        record.partition, record.offset, exc.reason)
            continue
        if target is None or _matches(hand_off, target):
            found.append(hand_off)
    return found


async def _requests(store: ApprovalStore, hand_offs: Sequence[HandOff]) -> list[Request]:
    decisions = await store.decisions([h.hand_off_id for h in hand_offs])
    return [Request(h, store.expires(h), decisions.get(h.hand_off_id)) for h in hand_offs]


async def load_requests(settings: Settings, *, from_topic: bool = True) -> list[Request]:
    """Every request registered in Redis (within the idempotency TTL) and, with
    ``from_topic``, every one on the approvals topic; oldest first."""
    async with _store(settings) as store:
        found = await store.hand_offs(await store.known())
        if from_topic:
            for hand_off in await _from_topic(settings):
                found.setdefault(hand_off.hand_off_id, hand_off)
        requests = await _requests(store, list(found.values()))
    return sorted(requests, key=lambda r: (r.hand_off.created_at, r.hand_off.hand_off_id))


def select(requests: Sequence[Request], *, workflow: str | None = None,
           include_decided: bool = False, now: datetime | None = None) -> list[Request]:
    """The pending requests (with ``include_decided``: all), of ``workflow`` if given."""
    now = now or utc_now()
    return [r for r in requests
            if (workflow is None or r.hand_off.workflow == workflow)
            and (include_decided or r.state(now) == "pending")]


def describe(decision: ApprovalDecision) -> str:
    """A decision in a few words: 'approved by ann at ...', 'expired at ...'."""
    when = decision.decided_at.isoformat(timespec="seconds")
    if decision.expired:
        return f"expired at {when}"
    verb = "approved" if decision.approved else "rejected"
    return f"{verb} by {decision.by} at {when}"


async def _find(store: ApprovalStore, settings: Settings, target: str) -> list[Request]:
    """The requests of run ``target``, or the request with id ``target``."""
    ids = {*await store.for_run(target), target}
    if len(target) >= MIN_PREFIX:
        ids.update(i for i in await store.known() if i.startswith(target))
    found = await store.hand_offs(sorted(ids))
    requests = await _requests(store, list(found.values()))
    if all(r.decision is not None for r in requests):
        # none open in Redis: one may not be registered yet (the topic has every hand-off)
        fresh = {h.hand_off_id: h for h in await _from_topic(settings, target)
                 if h.hand_off_id not in found}
        for hand_off in fresh.values():
            await store.register(hand_off)
        requests += await _requests(store, list(fresh.values()))
    return requests


async def decide(settings: Settings, target: str, *, approved: bool, by: str, note: str = "",
                 reason: str = "", now: datetime | None = None) -> Decided:
    """Approve or reject the pending request of run ``target`` (or the request with that
    hand-off id, or id prefix). Raises ApprovalRefused if there is none, if it was decided
    already (the first decision stands), if it expired (it is ended as expired now if
    nobody had), or if the run has more than one pending request (give the hand-off id)."""
    now = now or utc_now()
    async with _store(settings) as store:
        requests = await _find(store, settings, target)
        if not requests:
            raise ApprovalRefused(f"no approval request for run or hand-off '{target}'; "
                                  f"`agentfabric approvals list` shows the pending ones")
        open_ = [r for r in requests if r.decision is None]
        if not open_:
            done = "; ".join(f"{r.hand_off.hand_off_id} was {describe(r.decision)}"
                             for r in requests if r.decision is not None)
            raise ApprovalRefused(f"nothing to decide for '{target}': {done}")
        if len(open_) > 1:
            ids = ", ".join(f"{r.hand_off.hand_off_id} (step {r.hand_off.step})"
                            for r in open_)
            raise ApprovalRefused(f"run '{target}' has {len(open_)} pending requests: {ids}; "
                                  f"give the hand-off id instead of the run id")
        [request] = open_
        hand_off = request.hand_off
        publisher = DecisionPublisher(settings, store.redis, "agentfabric-approvals-cli")
        try:
            if request.expires_at <= now:  # end it now, as the sweeper would
                decision = expiry_decision(hand_off, request.expires_at, now)
            else:
                decision = decision_for(hand_off, approved=approved, by=by, note=note,
                                        reason=reason, now=now)
            earlier = await settle(store, publisher, hand_off, decision)
        finally:
            await publisher.close()
    if decision.expired and (earlier is None or earlier.expired):
        raise ApprovalRefused(f"the request {hand_off.hand_off_id} of run {hand_off.run_id} "
                              f"expired at {request.expires_at.isoformat(timespec='seconds')}"
                              f" before a decision, so the run ends as expired")
    if earlier is not None:
        raise ApprovalRefused(f"the request {hand_off.hand_off_id} of run {hand_off.run_id} "
                              f"was {describe(earlier)} first; that decision stands")
    return Decided(hand_off, decision)
