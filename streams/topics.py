"""Topic and consumer-group naming, and provisioning of every topic the workflows need.

    <prefix>.triggers.<source>     trigger events (from ingress or any producer)
    <prefix>.<workflow>.<step>     a run waiting for that step
    <prefix>.retry.<workflow>.<step>.<delay>   runs waiting to try that step again
    <prefix>.results.<workflow>    finished runs
    <prefix>.dlq                   dead letters
    <prefix>.approvals             runs handed to a person
    <prefix>.decisions             people's decisions on them (and expiries): resume or end
    <prefix>.recordings            recorded steps of recorded runs (for replay)
    <prefix>.audit                 one audit event per tool call (JSON, key: run id)
    <prefix>.run-events            one RunEvent per processed step (key: run id): the ledger

One consumer group per step (named like its topic), one for the router, and one each for
the approvals topic (registers hand-offs for listing and expiry) and the decisions topic.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from agentfabric.errors import UnavailableError

__all__ = ["TopicNames", "apply_topics"]

TOPIC_EXISTS = 36


@dataclass(frozen=True)
class TopicNames:
    prefix: str

    def trigger(self, source: str) -> str:
        return f"{self.prefix}.triggers.{source}"

    def step(self, workflow: str, step: str) -> str:
        return f"{self.prefix}.{workflow}.{step}"

    def retry(self, workflow: str, step: str, delay_s: float) -> str:
        """The retry topic of one step's tier, named for its delay (``10s``, ``0_5s``)."""
        return f"{self.prefix}.retry.{workflow}.{step}.{_delay_label(delay_s)}"

    @property
    def retry_group(self) -> str:
        return f"{self.prefix}.retry"

    def results(self, workflow: str) -> str:
        return f"{self.prefix}.results.{workflow}"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}.dlq"

    @property
    def approvals(self) -> str:
        return f"{self.prefix}.approvals"

    @property
    def decisions(self) -> str:
        return f"{self.prefix}.decisions"

    @property
    def recordings(self) -> str:
        return f"{self.prefix}.recordings"

    @property
    def audit(self) -> str:
        return f"{self.prefix}.audit"

    @property
    def run_events(self) -> str:
        return f"{self.prefix}.run-events"

    @property
    def ledger_group(self) -> str:
        return f"{self.prefix}.ledger"

    @property
    def router_group(self) -> str:
        return f"{self.prefix}.router"

    @property
    def approvals_group(self) -> str:
        return f"{self.prefix}.approvals"

    @property
    def decisions_group(self) -> str:
        return f"{self.prefix}.decisions"

    def step_group(self, workflow: str, step: str) -> str:
        return self.step(workflow, step)

    def source_of(self, topic: str) -> str | None:
        """The source a trigger topic carries, or None if ``topic`` is not a trigger topic."""
        head = f"{self.prefix}.triggers."
        return topic[len(head):] if topic.startswith(head) and len(topic) > len(head) else None


def _delay_label(delay_s: float) -> str:
    return f"{delay_s:g}s".replace(".", "_")


async def apply_topics(bootstrap_servers: str, topics: list[str], *, partitions: int,
                       replication_factor: int,
                       client_options: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Create missing topics; returns topic -> 'created' or 'exists'. ``client_options``
    (``streams.kafka.kafka_client_options``) carries the security settings."""
    options = {**(client_options or {}), "bootstrap_servers": bootstrap_servers}
    admin = AIOKafkaAdminClient(**options, client_id="agentfabric-admin")
    try:
        await admin.start()
        response = await admin.create_topics(
            [NewTopic(t, partitions, replication_factor) for t in topics])
    except KafkaError as exc:
        raise UnavailableError(f"cannot create topics on {bootstrap_servers} "
                             f"({type(exc).__name__}); is the broker up?") from exc
    finally:
        await admin.close()
    outcome: dict[str, str] = {}
    for topic, code, message in response.topic_errors:
        if code == 0:
            outcome[topic] = "created"
        elif code == TOPIC_EXISTS:
            outcome[topic] = "exists"
        else:
            raise UnavailableError(f"creating topic {topic} failed with error {code}: {message}")
    return outcome
