"""What the consumers beside a run's steps share (approvals, decisions, the run ledger)."""

from __future__ import annotations

from agentfabric.errors import TransientError
from streams.executor import Emit, Job
from streams.topics import TopicNames

from .settings import Settings

__all__ = ["SideConsumer"]


class SideConsumer:
    """A consumer of one topic that is not on a run's path: the settings' window and
    timeout, dead letters on the fabric's topic, a poll no faster than ``wait_ms`` (the
    embedded broker does not wake a waiting fetch, so polling these as often as a step's
    topic would only load it), and no retry topic: its work is a function of the record, or
    idempotent writes, where an ``UnavailableError`` retries in place."""

    def __init__(self, settings: Settings, *, name: str, group: str, topic: str,
                 wait_ms: int) -> None:
        self.name = name
        self.group = group
        self.topics = [topic]
        self.max_in_flight = settings.max_in_flight
        self.dlq_topic = TopicNames(settings.topic_prefix).dlq
        self.timeout_s = settings.step_timeout_s
        self.fetch_max_wait_ms = max(settings.fetch_max_wait_ms, wait_ms)

    def retry(self, job: Job, error: TransientError) -> Emit | None:
        return None
