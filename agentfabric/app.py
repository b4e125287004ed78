"""Wiring used by the CLI, the demo and the tests: build the engine, publish events,
read results. Each function takes validated :class:`Settings`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence

from pydantic import ValidationError

from agents.engine import Engine
from agents.loader import load_workflows
from agents.models import ModelClient, load_registry
from agents.workflow import WorkflowSet
from schemas.models import RunResult, StepRecording, TriggerEvent
from schemas.serde import decode, validation_reason
from streams.kafka import Outgoing, Producer, kafka_client_options
from streams.reader import read_topic
from streams.topics import TopicNames, apply_topics
from tools.knowledge import KnowledgeBase
from tools.registry import ToolRegistry

from .errors import ConfigError, MessageValidationError
from .logs import LogFormat, configure_logging
from .settings import Settings

__all__ = [
    "build_engine",
    "build_knowledge",
    "build_models",
    "parse_events",
    "provision",
    "publish_events",
    "read_recordings",
    "read_results",
    "required_topics",
    "resolve_trigger_topic",
    "setup_logging",
]


def setup_logging(level: str = "INFO", fmt: LogFormat = "json") -> None:
    """Structured logs for a long-running process (agentfabric.logs): JSON lines on stderr,
    or ``console`` lines for a person."""
    configure_logging(level, fmt)


def build_models(settings: Settings) -> ModelClient:
    return ModelClient(load_registry(settings.models_file), timeout_s=settings.model_timeout_s,
                       max_retries=settings.model_max_retries)


def build_knowledge(settings: Settings, models: ModelClient | None = None) -> KnowledgeBase:
    """The configured vector store and embedder (nothing connects or loads until used)."""
    import tools.vectors
    from tools.vectors import (
        EmbeddedVectorStore,
        Embedder,
        MiniLMEmbedder,
        OpenAIEmbedder,
        VectorStore,
    )

    store: VectorStore
    if settings.vector_store == "weaviate":
        assert settings.weaviate_url is not None  # checked by the settings
        key = settings.weaviate_api_key.get_secret_value() if settings.weaviate_api_key \
            else None
        # imported here: the Weaviate client is an extra (a ConfigError names it if missing)
        store = tools.vectors.WeaviateVectorStore(settings.weaviate_url, api_key=key)
    else:
        store = EmbeddedVectorStore(settings.vector_dir)
    embedder: Embedder
    if settings.embedder == "openai":
        assert settings.embedding_model is not None  # checked by the settings
        client = models or build_models(settings)
        spec = client.registry.get(settings.embedding_model)
        embedder = OpenAIEmbedder(client.openai_client(spec.provider), spec.model,
                                  settings.embedding_dim)
    else:
        embedder = MiniLMEmbedder()
    return KnowledgeBase(store, embedder)


def build_engine(settings: Settings, models: ModelClient | None = None, *,
                 tools: ToolRegistry | None = None) -> Engine:
    """The engine for the configured workflows, model registry and knowledge bases, calling
    tools through the gateway (the catalog of ``settings``, plus the Python tools of
    ``tools``). Its gateway keeps state in-process until a worker connects it to Redis and
    Kafka (``Worker.run``)."""
    from tools.gateway.pipeline import load_catalog, local_gateway

    models = models or build_models(settings)
    gateway = local_gateway(settings, load_catalog(settings, tools))
    return Engine(load_workflows(settings.workflows_dir), gateway, models=models,
                  knowledge=build_knowledge(settings, models),
                  max_steps_per_run=settings.max_steps_per_run, record_all=settings.record_runs,
                  tool_timeout_s=settings.tool_timeout_s, tokens=gateway.identity,
                  max_tool_calls_per_run=settings.max_tool_calls_per_run)


def required_topics(workflows: WorkflowSet, names: TopicNames,
                    retry_tiers_s: Sequence[float] = ()) -> list[str]:
    """Every topic the loaded workflows read or write (with each step's retry tiers)."""
    topics = {names.dlq, names.approvals, names.decisions, names.recordings,
              names.audit, names.run_events}
    topics.update(names.trigger(source) for source in workflows.sources())
    for name in workflows.names():
        topics.add(names.results(name))
        for step in workflows.step_ids(name):
            topics.add(names.step(name, step))
            topics.update(names.retry(name, step, delay) for delay in retry_tiers_s)
    return sorted(topics)


async def provision(settings: Settings, engine: Engine) -> dict[str, str]:
    """Create every topic the loaded workflows need."""
    topics = required_topics(engine.workflows, TopicNames(settings.topic_prefix),
                             settings.retry_tiers_s)
    return await apply_topics(settings.bootstrap_servers, topics,
                              partitions=settings.partitions,
                              replication_factor=settings.replication_factor,
                              client_options=kafka_client_options(settings))


def resolve_trigger_topic(settings: Settings, topic: str) -> tuple[str, str]:
    """(topic, source) for a trigger topic name, or for a bare source name like ``crm``."""
    names = TopicNames(settings.topic_prefix)
    if "." not in topic:
        return names.trigger(topic), topic
    source = names.source_of(topic)
    if source is None:
        raise ConfigError(f"{topic} is not a trigger topic; publish to "
                          f"{names.trigger('<source>')}, e.g. {names.trigger('crm')}")
    return topic, source


def parse_events(text: str, source: str) -> list[TriggerEvent]:
    """A JSON object, a JSON array of objects, or JSON lines; all validated or none sent."""
    stripped = text.strip()
    if not stripped:
        raise MessageValidationError("no events: the input is empty")
    try:
        data = json.loads(stripped)
        items = data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        try:
            items = [json.loads(line) for line in stripped.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise MessageValidationError(f"the input is not JSON or JSON lines: {exc}") from exc
    events, problems = [], []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            problems.append(f"event {i + 1}: is a JSON {type(item).__name__}, not an object")
            continue
        item.setdefault("source", source)
        try:
            event = TriggerEvent.model_validate(item)
        except ValidationError as exc:
            problems.append(f"event {i + 1}: {validation_reason(exc)}")
            continue
        if event.source != source:
            problems.append(f"event {i + 1}: source '{event.source}' does not match the topic's "
                            f"source '{source}'")
        events.append(event)
    if problems:
        raise MessageValidationError("nothing was sent; " + "; ".join(problems))
    return events


async def publish_events(settings: Settings, topic: str, events: Sequence[TriggerEvent]) -> int:
    """Send ``events`` to a trigger topic, each signed for its tenant (docs/tenancy.md)."""
    from streams.redispool import open_redis

    from .tenancy import TenantSigner

    redis = open_redis(settings)
    try:
        signer = TenantSigner(settings, redis)
        messages = [Outgoing.of(topic, e.event_id, e, await signer.headers(e.tenant, e.event_id))
                    for e in events]
    finally:
        await redis.aclose()
    producer = Producer(settings, client_id="agentfabric-publish")
    await producer.start()
    try:
        await producer.send_all(messages)
    finally:
        await producer.stop()
    return len(events)


async def read_recordings(settings: Settings, run_id: str) -> list[StepRecording]:
    """Every recorded step of ``run_id`` (scans the recordings topic)."""
    topic = TopicNames(settings.topic_prefix).recordings
    found = []
    async for record in read_topic(settings, topic):
        if record.key == run_id.encode():
            found.append(decode(record.value, record.headers, StepRecording))
    return found


async def read_results(settings: Settings, workflow: str, *, follow: bool = False,
                       ) -> AsyncIterator[RunResult]:
    topic = TopicNames(settings.topic_prefix).results(workflow)
    async for record in read_topic(settings, topic, follow=follow):
        yield decode(record.value, record.headers, RunResult)
