"""Kafka clients as agentfabric uses them, with Kafka errors translated where they enter.

Delivery is at-least-once: a producer with ``acks=all`` and no idempotence (the embedded
broker refuses idempotent producers and transactions), and consumers that never
auto-commit. Duplicates are absorbed by idempotent steps (see ``streams.idempotency``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka import errors as kafka_errors
from aiokafka.errors import KafkaError
from aiokafka.helpers import create_ssl_context

from agentfabric.errors import PermanentError, UnavailableError
from agentfabric.settings import Settings
from schemas.models import AvroModel
from schemas.serde import encode

from . import groupleave, tolerant

__all__ = ["PERMANENT_SEND_ERRORS", "Outgoing", "Producer", "group_timeouts",
           "kafka_client_options", "make_consumer"]


def kafka_client_options(settings: Settings) -> dict[str, Any]:
    """Connection options every Kafka client (producer, consumer, admin) is built with: the
    bootstrap servers and the security settings (SASL, TLS), checked by the settings."""
    options: dict[str, Any] = {"bootstrap_servers": settings.bootstrap_servers,
                               "security_protocol": settings.security_protocol}
    if settings.security_protocol.startswith("SASL_"):
        assert settings.sasl_password is not None  # checked by the settings
        options.update(sasl_mechanism=settings.sasl_mechanism,
                       sasl_plain_username=settings.sasl_username,
                       sasl_plain_password=settings.sasl_password.get_secret_value())
    if settings.security_protocol.endswith("SSL"):
        options["ssl_context"] = create_ssl_context(
            cafile=settings.ssl_cafile, certfile=settings.ssl_certfile,
            keyfile=settings.ssl_keyfile)
    return options


@dataclass(frozen=True)
class Outgoing:
    """One message to produce."""

    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()

    @classmethod
    def of(cls, topic: str, key: str, model: AvroModel,
           extra_headers: Sequence[tuple[str, bytes]] = ()) -> Outgoing:
        value, headers = encode(model)
        return cls(topic, key.encode(), value, (*headers, *extra_headers))


class Producer:
    """A started producer; ``send_all`` returns once the broker acknowledged every message."""

    def __init__(self, settings: Settings, client_id: str = "agentfabric", *,
                 request_timeout_ms: int = 30_000) -> None:
        """``request_timeout_ms`` bounds how long a send waits for its acknowledgement (and
        for metadata) before it fails as unavailable; the ingress keeps it short."""
        self._settings = settings
        self._producer = AIOKafkaProducer(
            **kafka_client_options(settings), client_id=client_id, acks="all",
            enable_idempotence=False, linger_ms=0, request_timeout_ms=request_timeout_ms)

    async def start(self) -> None:
        try:
            await self._producer.start()
        except KafkaError as exc:
            await self._producer.stop()
            raise UnavailableError(
                f"cannot reach Kafka at {self._settings.bootstrap_servers} "
                f"({type(exc).__name__}); start it with `agentfabric up` or set "
                f"AGENTFABRIC_BOOTSTRAP_SERVERS") from exc

    async def stop(self) -> None:
        await self._producer.stop()

    async def partitions_for(self, topic: str) -> set[int]:
        """The partition ids of ``topic`` as this producer's partitioner sees them."""
        try:
            return set(await self._producer.partitions_for(topic))
        except KafkaError as exc:
            raise _translate(exc) from exc

    async def send_all(self, messages: Sequence[Outgoing]) -> None:
        """Produce every message and wait for every acknowledgement."""
        futures: list[asyncio.Future[Any]] = []
        try:
            for m in messages:
                futures.append(await self._producer.send(m.topic, m.value, key=m.key,
                                                         headers=list(m.headers)))
        except KafkaError as exc:
            await asyncio.gather(*futures, return_exceptions=True)  # none left unretrieved
            raise _translate(exc) from exc
        results = await asyncio.gather(*futures, return_exceptions=True)
        for result in results:
            if isinstance(result, KafkaError):
                raise _translate(result) from result
            if isinstance(result, BaseException):
                raise result


# Errors that sending the same message again can never fix: the message or the topic is
# wrong, or this client may not write there. Everything else (timeouts, a broker that is
# down, a leader election) is worth trying again later.
PERMANENT_SEND_ERRORS: tuple[type[KafkaError], ...] = (
    kafka_errors.MessageSizeTooLargeError, kafka_errors.RecordListTooLargeError,
    kafka_errors.RecordTooLargeError, kafka_errors.InvalidTopicError,
    kafka_errors.CorruptRecordException, kafka_errors.UnsupportedForMessageFormatError,
    kafka_errors.TopicAuthorizationFailedError, kafka_errors.ClusterAuthorizationFailedError,
    kafka_errors.PolicyViolationError, kafka_errors.InvalidRequiredAcksError,
)


def _translate(exc: KafkaError) -> PermanentError | UnavailableError:
    """Errors that resending cannot fix (too large, not authorised) are permanent; the rest
    (timeouts included) mean the broker is unavailable for now."""
    if isinstance(exc, PERMANENT_SEND_ERRORS):
        return PermanentError(f"the broker refused a message ({type(exc).__name__}: {exc}); "
                              f"it cannot be sent as it is")
    return UnavailableError(f"the broker did not acknowledge a message "
                            f"({type(exc).__name__}: {exc})")


def group_timeouts(settings: Settings) -> dict[str, int]:
    """A group consumer's session, heartbeat, rebalance and request timeouts (ms): a
    heartbeat every second (three per session below 3 s); requests wait longer than a
    rebalance, since the broker holds a JoinGroup answer until the rebalance ends."""
    session = settings.session_timeout_ms
    rebalance = max(10_000, session)
    return {"session_timeout_ms": session,
            "heartbeat_interval_ms": min(1_000, session // 3),
            "rebalance_timeout_ms": rebalance,
            "request_timeout_ms": max(40_000, rebalance + 5_000)}


def make_consumer(settings: Settings, group_id: str | None, *topics: str,
                  client_id: str = "agentfabric",
                  fetch_max_wait_ms: int | None = None) -> AIOKafkaConsumer:
    """A consumer that commits only explicitly and starts a new group at the earliest offset
    (and reads past records whose header keys are not UTF-8: see ``streams.tolerant``), and
    that leaves its group when it stops, also on the embedded broker (``streams.groupleave``)."""
    tolerant.install()
    groupleave.install()
    return AIOKafkaConsumer(
        *topics, **kafka_client_options(settings), group_id=group_id,
        client_id=client_id, enable_auto_commit=False, auto_offset_reset="earliest",
        fetch_max_wait_ms=fetch_max_wait_ms or settings.fetch_max_wait_ms,
        max_poll_records=settings.max_poll_records, **group_timeouts(settings),
        max_poll_interval_ms=settings.max_poll_interval_ms)
