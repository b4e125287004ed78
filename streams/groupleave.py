"""A consumer that stops leaves its group at once, also on a broker that numbers a new
group's first generation 0.

aiokafka (0.14) sends ``LeaveGroup`` when a consumer stops only if its generation is above
0 (``GroupCoordinator._maybe_leave_group``); "no generation" is -1 there. Kafka numbers a
group's generations from 1, so that never mattered, but Tansu (the embedded broker) gives
a new group's first generation the number 0. The first worker of a group then stopped
without leaving, and the next worker's join waited for the stopped member's session to
expire: 18 s with the 10 s session timeout, where a join otherwise takes 5 s (decision
0016). ``install`` wraps that method so that a joined member of generation 0 leaves too,
with the same request (group and member id) and the same reset afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka.consumer.group_coordinator import GroupCoordinator
from aiokafka.errors import KafkaError
from aiokafka.protocol.group import JoinGroupRequest, LeaveGroupRequest

__all__ = ["install"]

log = logging.getLogger(__name__)
_MARK = "_agentfabric_leaves_generation_zero"


def install() -> None:
    """Patch aiokafka's group coordinator once per process (idempotent)."""
    original: Callable[[Any], Awaitable[None]] = GroupCoordinator._maybe_leave_group
    if getattr(original, _MARK, False):
        return

    async def _maybe_leave_group(self: Any) -> None:
        if self.generation != 0 or self._group_instance_id is not None \
                or self.member_id == JoinGroupRequest.UNKNOWN_MEMBER_ID:
            await original(self)  # aiokafka's own: it leaves above generation 0
            return
        # joined at generation 0: leave as aiokafka does above it (a static member never
        # leaves; a failed leave is logged, the session then expires on the broker)
        try:
            await self._send_req(LeaveGroupRequest(self.group_id, self.member_id))
        except KafkaError as err:
            log.error("LeaveGroup request failed: %s", err)
        else:
            log.info("LeaveGroup request succeeded")
        self.reset_generation()

    setattr(_maybe_leave_group, _MARK, True)
    GroupCoordinator._maybe_leave_group = _maybe_leave_group
