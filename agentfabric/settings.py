"""Typed settings, read from ``AGENTFABRIC_*`` environment variables and validated at start-up.

Nothing is read on import: call :func:`load_settings`. An unknown ``AGENTFABRIC_*``
variable is an error that suggests the setting you probably meant.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import SettingsError
from .tenancy import TenantPolicy

__all__ = ["ENV_PREFIX", "Settings", "TenantBudget", "load_settings"]

ENV_PREFIX = "AGENTFABRIC_"


class TenantBudget(BaseModel):
    """What one tenant's runs may spend on models per window of ``period_s`` seconds."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    max_tokens: int | None = Field(default=None, ge=1)
    max_cost_usd: float | None = Field(default=None, gt=0)
    period_s: float = Field(default=86_400.0, gt=0, le=366 * 86_400)

    @model_validator(mode="after")
    def _some_limit(self) -> TenantBudget:
        if self.max_tokens is None and self.max_cost_usd is None:
            raise ValueError("a tenant budget needs max_tokens, max_cost_usd or both")
        return self


class Settings(BaseSettings):
    """Everything configurable. Defaults run the embedded stack on loopback."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    bootstrap_servers: str = Field(
        default="127.0.0.1:19092",
        description="Kafka bootstrap servers, comma separated (a real cluster in production).")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        default="PLAINTEXT", description="How every Kafka client talks to the brokers.")
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        default=None, description="SASL mechanism (security_protocol SASL_*).")
    sasl_username: str | None = Field(default=None, description="SASL user name.")
    sasl_password: SecretStr | None = Field(default=None, description="SASL password.")
    ssl_cafile: Path | None = Field(
        default=None, description="CA bundle (PEM) to verify the brokers (SSL, SASL_SSL); "
                                  "unset: the system's trusted CAs.")
    ssl_certfile: Path | None = Field(default=None,
                                      description="Client certificate (PEM) for mutual TLS.")
    ssl_keyfile: Path | None = Field(default=None,
                                     description="Private key (PEM) of ssl_certfile.")
    redis_url: str = Field(default="redis://127.0.0.1:16379/0", description="Redis URL.")
    redis_max_connections: int = Field(
        default=100, ge=1, le=10_000,
        description="Most Redis connections a process opens at once; commands beyond them "
                    "wait for a free one.")
    redis_pool_wait_s: float = Field(
        default=10.0, gt=0, le=600,
        description="Longest a Redis command waits for a free connection; past it the command "
                    "fails as if Redis were down (the record is taken again).")
    topic_prefix: str = Field(default="af", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,48}$",
                              description="Prefix of every topic and consumer group.")
    partitions: int = Field(default=3, ge=1, le=1024, description="Partitions per new topic.")
    replication_factor: int = Field(default=1, ge=1, le=16)
    fetch_max_wait_ms: int = Field(
        default=10, ge=1, le=30_000,
        description="Longest a fetch waits for data. The embedded broker does not wake a "
                    "waiting fetch, so latency follows this value: keep it low there.")
    max_poll_records: int = Field(default=200, ge=1, le=10_000)
    session_timeout_ms: int = Field(
        default=10_000, ge=1_000, le=300_000,
        description="Consumer group session: a worker whose heartbeats stop for this long loses "
                    "its partitions to the others. The embedded broker assigns a joining "
                    "worker after half of it (Kafka needs at least 6000).")
    max_poll_interval_ms: int = Field(
        default=600_000, ge=10_000, le=3_600_000,
        description="Longest a batch may take before the consumer leaves its group; raise "
                    "it (or lower max_poll_records) for slow llm steps.")
    max_in_flight: int = Field(
        default=64, ge=1, le=10_000,
        description="Records of one partition in progress at once (different run ids overlap, "
                    "one run's records stay in order); a step may set its own max_in_flight.")
    commit_interval_ms: int = Field(
        default=100, ge=1, le=60_000,
        description="How often finished offsets are committed (also on revocation and stop).")
    revoke_timeout_s: float = Field(
        default=8.0, gt=0, le=300,
        description="How long a revoked partition's records in flight are awaited before they "
                    "are abandoned (uncommitted, so the next owner runs them).")
    claim_check_bytes: int = Field(
        default=512 * 1024, ge=1024, le=64 * 1024 * 1024,
        description="Messages larger than this are stored in Redis and travel as a claim "
                    "check (a reference header), so none exceeds the broker's limit; keep it "
                    "below the topics' max.message.bytes.")
    lease_ttl_s: float = Field(
        default=30.0, ge=1, le=3_600,
        description="Lease on a running step (renewed every third of it): while it holds, no "
                    "other worker runs the same step; after a crash the step runs again once "
                    "it lapses.")
    step_timeout_s: float = Field(
        default=300.0, gt=0, le=86_400,
        description="Longest one step may run; past it the attempt fails as transient and is "
                    "retried. A step may set its own timeout_s.")
    tool_timeout_s: float = Field(
        default=30.0, gt=0, le=3_600,
        description="Longest one tool call may run; past it the call fails as transient. A step "
                    "may set its own tool_timeout_s.")
    max_attempts: int = Field(default=5, ge=1, le=100,
                              description="Attempts of a step before a transient failure "
                                          "is dead-lettered.")
    retry_tiers_s: list[float] = Field(
        default=[1.0, 10.0, 60.0, 600.0], min_length=1, max_length=10,
        description="Delays of the retry tiers, as a JSON list of seconds: after failed "
                    "attempt n a run waits on tier n (the last tier repeats) on its own "
                    "retry topic, so the step's topic never waits.")
    max_tool_calls_per_run: int = Field(
        default=50, ge=1, le=100_000,
        description="Tool calls one run may make in all; a run that would make more is "
                    "ended with status tool_call_limit (a runaway agent is stopped).")
    tenant_budgets: dict[str, TenantBudget] = Field(
        default_factory=dict,
        description="Model tokens and cost each tenant may spend per period, as a JSON "
                    'object: {"acme": {"max_tokens": 1000000, "max_cost_usd": 20, '
                    '"period_s": 86400}}; a run that would pass its tenant\'s budget ends '
                    "with status budget_exceeded. Tenants not listed are not limited.")
    max_steps_per_run: int = Field(default=100, ge=1, le=10_000,
                                   description="A run that executes more steps is dead-lettered "
                                               "(runaway loop guard).")
    idempotency_ttl_s: int = Field(default=7 * 24 * 3600, ge=60,
                                   description="How long a step's emitted output is kept in "
                                               "Redis to re-emit on redelivery.")
    workflows_dir: Path | None = Field(
        default=None, description="Folder of workflow YAML files; default: the shipped samples.")
    record_runs: bool = Field(default=False,
                              description="Record every run's model and tool interactions "
                                          "(workflows can also say `record: true`).")
    models_file: Path | None = Field(
        default=None, description="Model registry YAML; default: the shipped agents/models.yaml.")
    model_timeout_s: float = Field(default=30.0, gt=0, le=600,
                                   description="Timeout of one model request.")
    model_max_retries: int = Field(default=4, ge=0, le=20,
                                   description="Retries of a model request on 429, 5xx, "
                                               "timeouts (Retry-After is honoured).")
    model_server_port: int = Field(default=18080, ge=0, le=65535,
                                   description="Port of `agentfabric model-server`.")
    vector_store: Literal["embedded", "weaviate"] = Field(
        default="embedded", description="Where knowledge bases live.")
    vector_dir: Path = Field(default=Path(".agentfabric/vectors"),
                             description="Folder of the embedded vector store (shared by "
                                         "every worker on the machine).")
    weaviate_url: str | None = Field(default=None, description="Weaviate URL (vector_store="
                                                               "weaviate).")
    weaviate_api_key: SecretStr | None = Field(default=None, description="Weaviate API key.")
    embedder: Literal["minilm", "openai"] = Field(
        default="minilm", description="minilm: the packaged all-MiniLM-L6-v2, offline; "
                                      "openai: embeddings from a model in the registry.")
    embedding_model: str | None = Field(default=None, description="Registry model for "
                                                                  "embedder=openai.")
    embedding_dim: int = Field(default=384, ge=1, le=8192,
                               description="Dimension of embedder=openai vectors.")
    state_dir: Path = Field(default=Path(".agentfabric"),
                            description="Where `agentfabric up` keeps pids and logs.")
    broker_host: str = Field(default="127.0.0.1", description="Embedded broker listen address.")
    broker_port: int = Field(default=19092, ge=1, le=65535, description="Embedded broker port.")
    redis_port: int = Field(default=16379, ge=1, le=65535, description="Embedded Redis port.")
    crm_port: int = Field(default=18081, ge=1, le=65535,
                          description="Port of the sample CRM service `agentfabric up` starts.")
    erp_port: int = Field(default=18082, ge=1, le=65535,
                          description="Port of the sample ERP service `agentfabric up` starts.")
    service_urls: dict[str, str] = Field(
        default_factory=lambda: {"crm": "http://127.0.0.1:18081", "erp": "http://127.0.0.1:18082"},
        description="Base URLs of the business systems the tool gateway calls, as a JSON "
                    "object of name to URL.")
    tools_dirs: list[Path] = Field(
        default_factory=list,
        description="Folders of tool catalog YAML files (`tools: [...]`) besides the shipped "
                    "tools/catalog, as a JSON list.")
    tool_modules: list[str] = Field(
        default_factory=list,
        description="Python modules declaring tools, as a JSON list; each has "
                    "register(catalog).")
    gateway_secret: SecretStr | None = Field(
        default=None,
        description="Secret (32+ bytes) signing agent tokens; unset: a random secret per "
                    "process (tokens are minted and checked by the same worker).")
    shutdown_timeout_s: float = Field(default=30.0, gt=0,
                                      description="How long SIGTERM waits for in-flight work.")
    metrics_port: int = Field(
        default=9464, ge=0, le=65535,
        description="Port a worker serves Prometheus metrics on (GET /metrics); 0: off. A "
                    "port already taken is logged and metrics are not served.")
    metrics_host: str = Field(default="127.0.0.1",
                              description="Listen address of the worker's metrics endpoint "
                                          "(0.0.0.0 for a scraper on another host).")
    approval_expiry_s: float = Field(
        default=86_400.0, gt=0, le=90 * 86_400,
        description="How long a run waits for a person's decision (an approval step or a "
                    "tool call needing approval) before it ends as expired; an approval step "
                    "or a tool's approval policy may set its own expires_s.")
    approval_sweep_interval_s: float = Field(
        default=1.0, gt=0, le=3_600,
        description="How often a worker looks for approval requests past their expiry (any "
                    "replica may; exactly one ends each run).")
    run_events_max_s: float = Field(
        default=300.0, gt=0, le=86_400,
        description="Longest one `GET /runs/{id}/events` stream stays open (the client "
                    "reconnects to go on watching).")
    tenant_signing_secret: SecretStr | None = Field(
        default=None,
        description="Secret signing the tenant of the trigger events agentfabric publishes "
                    "(header af-tenant-sig); unset: a random secret per deployment kept in "
                    "Redis (<prefix>:tenancy:secret). See docs/tenancy.md.")
    trigger_tenants: dict[str, TenantPolicy] = Field(
        default_factory=dict,
        description="Tenant policy of unsigned events per trigger source, as a JSON object: "
                    '{"crm": {"fixed": "acme"}} or {"crm": {"header": "x-tenant", "allow": '
                    '["acme", "globex"]}}; a source not listed runs its unsigned events as '
                    "tenant default (a body naming another tenant is dead-lettered).")
    ingress_host: str = Field(default="127.0.0.1",
                              description="Listen address of `agentfabric ingress`.")
    ingress_port: int = Field(default=18090, ge=0, le=65535,
                              description="Port of `agentfabric ingress` (webhooks, run API).")
    ingress_sources_file: Path | None = Field(
        default=None,
        description="YAML file of webhook sources (signature scheme, secret variable, tenant, "
                    "payload mapping); unset: no webhook source is accepted.")
    ingress_max_body_bytes: int = Field(
        default=1024 * 1024, ge=1024, le=64 * 1024 * 1024,
        description="Largest webhook body accepted (a source may set a lower "
                    "max_body_bytes); larger bodies get 413.")
    ingress_send_timeout_s: float = Field(
        default=5.0, gt=0, le=120,
        description="Longest the ingress waits for the broker to acknowledge a delivery's "
                    "events; past it the answer is 503 with Retry-After.")
    otlp_endpoint: str | None = Field(
        default=None,
        description="Base URL of an OTLP/HTTP collector (Jaeger, Tempo, an OpenTelemetry "
                    "Collector), e.g. http://127.0.0.1:4318: spans go to <url>/v1/traces. "
                    "Unset: no spans (needs the otel extra). See docs/operations.md.")
    service_name: str = Field(default="agentfabric", min_length=1, max_length=100,
                              description="service.name of the spans this process exports.")

    @field_validator("bootstrap_servers")
    @classmethod
    def _servers(cls, value: str) -> str:
        for server in value.split(","):
            host, _, port = server.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"'{server}' is not host:port")
        return value

    @field_validator("retry_tiers_s")
    @classmethod
    def _tiers(cls, value: list[float]) -> list[float]:
        if any(not 0 < t <= 86_400 for t in value):
            raise ValueError("every retry tier must be more than 0 and at most 86400 seconds")
        if value != sorted(value) or len(set(value)) != len(value):
            raise ValueError("retry tiers must be distinct and in increasing order")
        return value

    @field_validator("service_urls")
    @classmethod
    def _service_urls(cls, value: dict[str, str]) -> dict[str, str]:
        for name, url in value.items():
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"the URL of service '{name}' must start with http:// or "
                                 f"https://")
        return {name: url.rstrip("/") for name, url in value.items()}

    @field_validator("otlp_endpoint")
    @classmethod
    def _otlp(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https:// (OTLP over HTTP, e.g. "
                             "http://127.0.0.1:4318)")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @model_validator(mode="after")
    def _backends(self) -> Settings:
        if self.vector_store == "weaviate" and not self.weaviate_url:
            raise ValueError("vector_store=weaviate needs AGENTFABRIC_WEAVIATE_URL")
        if self.embedder == "openai" and not self.embedding_model:
            raise ValueError("embedder=openai needs AGENTFABRIC_EMBEDDING_MODEL (a model "
                             "name from the model registry)")
        return self

    @model_validator(mode="after")
    def _kafka_security(self) -> Settings:
        protocol = self.security_protocol
        if protocol.startswith("SASL_"):
            missing = [name for name in ("sasl_mechanism", "sasl_username", "sasl_password")
                       if not getattr(self, name)]
            if missing:
                raise ValueError(f"security_protocol={protocol} needs " + ", ".join(
                    ENV_PREFIX + name.upper() for name in missing))
        elif self.sasl_mechanism or self.sasl_username or self.sasl_password:
            raise ValueError(f"SASL settings are set but security_protocol={protocol}; set "
                             f"{ENV_PREFIX}SECURITY_PROTOCOL=SASL_SSL (or SASL_PLAINTEXT)")
        files = {"ssl_cafile": self.ssl_cafile, "ssl_certfile": self.ssl_certfile,
                 "ssl_keyfile": self.ssl_keyfile}
        given = [name for name, path in files.items() if path is not None]
        if given and not protocol.endswith("SSL"):
            raise ValueError(f"{', '.join(given)} set but security_protocol={protocol}; set "
                             f"{ENV_PREFIX}SECURITY_PROTOCOL=SSL (or SASL_SSL)")
        for name, path in files.items():
            if path is not None and not path.is_file():
                raise ValueError(f"{name} {path} is not a readable file")
        if self.ssl_keyfile and not self.ssl_certfile:
            raise ValueError("ssl_keyfile needs ssl_certfile")
        if protocol.endswith("SSL"):
            import ssl

            from aiokafka.helpers import create_ssl_context

            try:
                create_ssl_context(cafile=self.ssl_cafile, certfile=self.ssl_certfile,
                                   keyfile=self.ssl_keyfile)
            except (ssl.SSLError, OSError) as exc:
                raise ValueError(f"cannot build the Kafka TLS context: {exc}") from exc
        return self

    @property
    def secret_free_redis_url(self) -> str:
        """The Redis URL with any password masked, for printing."""
        scheme, sep, rest = self.redis_url.partition("://")
        if "@" in rest:
            rest = "***@" + rest.split("@", 1)[1]
        return f"{scheme}{sep}{rest}"


def load_settings(**overrides: object) -> Settings:
    """Read and validate settings; unknown ``AGENTFABRIC_*`` variables are errors."""
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    for var in os.environ:
        if var.startswith(ENV_PREFIX) and var not in known:
            guess = difflib.get_close_matches(var, sorted(known), n=1)
            hint = f"; did you mean {guess[0]}?" if guess else ""
            raise SettingsError(f"unknown setting {var}{hint}")
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(
            (f"{ENV_PREFIX}{'.'.join(map(str, e['loc'])).upper()}: " if e["loc"] else "")
            + e["msg"] for e in exc.errors())
        raise SettingsError(f"invalid settings: {problems}") from exc
