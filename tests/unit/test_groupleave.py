"""streams.groupleave: a member that joined at generation 0 (the embedded broker's first
generation) sends LeaveGroup when it stops, as one of a later generation does; a consumer
that never joined sends nothing."""

from __future__ import annotations

from typing import Any

from aiokafka.consumer.group_coordinator import GroupCoordinator
from aiokafka.errors import KafkaConnectionError
from aiokafka.protocol.group import LeaveGroupRequest

from streams import groupleave


class _Coordinator:
    def __init__(self, generation: int, member_id: str, instance_id: str | None = None,
                 fails: bool = False) -> None:
        self.generation, self.member_id = generation, member_id
        self.group_id, self._group_instance_id = "g", instance_id
        self.fails = fails
        self.sent: list[Any] = []

    async def _send_req(self, request: Any) -> None:
        self.sent.append(request)
        if self.fails:
            raise KafkaConnectionError("broker gone")

    def reset_generation(self) -> None:
        self.generation, self.member_id = -1, ""


async def _leave(generation: int, member_id: str, **options: Any) -> _Coordinator:
    groupleave.install()
    coordinator = _Coordinator(generation, member_id, **options)
    await GroupCoordinator._maybe_leave_group(coordinator)  # type: ignore[arg-type]
    return coordinator


async def test_a_member_of_generation_zero_leaves() -> None:
    coordinator = await _leave(0, "m-1")
    [request] = coordinator.sent
    assert isinstance(request, LeaveGroupRequest)
    assert (request._group, request._member_id) == ("g", "m-1")
    assert (coordinator.generation, coordinator.member_id) == (-1, "")


async def test_a_member_of_a_later_generation_still_leaves() -> None:
    assert len((await _leave(3, "m-1")).sent) == 1


async def test_a_consumer_that_never_joined_sends_nothing() -> None:
    assert (await _leave(-1, "")).sent == []


async def test_a_static_member_of_generation_zero_does_not_leave() -> None:
    coordinator = await _leave(0, "m-1", instance_id="worker-a")
    assert coordinator.sent == []


async def test_a_leave_the_broker_refuses_still_resets_the_member() -> None:
    coordinator = await _leave(0, "m-1", fails=True)
    assert len(coordinator.sent) == 1
    assert (coordinator.generation, coordinator.member_id) == (-1, "")


def test_install_wraps_once() -> None:
    groupleave.install()
    wrapped = GroupCoordinator._maybe_leave_group
    groupleave.install()
    assert GroupCoordinator._maybe_leave_group is wrapped
