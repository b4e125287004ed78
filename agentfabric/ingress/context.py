"""What every ingress route needs, built once when the server starts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from agentfabric.settings import Settings
    from agents.workflow import WorkflowSet
    from streams.kafka import Producer
    from streams.topics import TopicNames

__all__ = ["IngressContext"]


@dataclass
class IngressContext:
    """The server's shared clients: one producer (acks=all), one Redis client, the loaded
    workflows (to know which workflows an event starts and their run ids), topic names."""

    settings: Settings
    producer: Producer
    redis: Redis
    workflows: WorkflowSet
    names: TopicNames
