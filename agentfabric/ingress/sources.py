"""Webhook sources: who may call ``POST /webhooks/{source}`` and how a delivery becomes
trigger events. Declared in the YAML file named by ``AGENTFABRIC_INGRESS_SOURCES_FILE``::

    sources:
      crm:
        scheme: hubspot-v3            # hubspot-v3 | stripe | github | shared-secret
        secret_env: CRM_WEBHOOK_SECRET
        tenant: acme                  # every run of this source belongs to this tenant
        topic: crm                    # default: the source's name -> <prefix>.triggers.crm
        items: "{{ body }}"           # the list of events in a body (a lone object: one event)
        event_type: "{{ item.subscriptionType }}"   # a template, or a constant
        event_id: "{{ item.eventId }}"              # default: a hash of the content
        payload: "{{ item }}"         # default: the item itself
        max_body_bytes: 262144        # default: AGENTFABRIC_INGRESS_MAX_BODY_BYTES

Templates are the workflows' (``agents.template``) over ``body`` (the parsed JSON),
``headers`` (lower-case names) and, per event, ``item``; they are compiled, and every secret
variable read, when the server starts, so a mistake stops it there.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agentfabric.app import resolve_trigger_topic
from agentfabric.errors import AgentFabricError, ConfigError, ExpressionEvalError
from agentfabric.settings import Settings
from agents.expr import to_text
from agents.template import Template, TemplateSyntaxError, compile_template
from schemas.models import NAME_PATTERN, TriggerEvent
from schemas.serde import validation_reason

from .signatures import Scheme

__all__ = ["DeliveryRejected", "SourceConfig", "SourcesFile", "WebhookSource", "load_sources"]

MAX_ITEMS = 1000


class DeliveryRejected(AgentFabricError):
    """A delivery that cannot be accepted as sent: ``status`` is the HTTP answer, ``code``
    a short machine-readable name of the problem."""

    def __init__(self, message: str, *, status: int, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class SourceConfig(BaseModel):
    """One webhook source as declared in the sources file."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    scheme: Scheme
    secret_env: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                            description="Environment variable holding the secret.")
    tenant: str = Field(pattern=NAME_PATTERN)
    topic: str | None = Field(default=None, description="Trigger topic or source name.")
    items: str = "{{ body }}"
    event_type: str = Field(min_length=1)
    event_id: str | None = None
    payload: str = "{{ item }}"
    signature_header: str | None = None
    public_url: str | None = Field(
        default=None, description="The URL the sender calls (hubspot-v3 signs it); default: "
                                  "the URL of the request as the server saw it.")
    tolerance_s: float = Field(default=300.0, gt=0, le=3600)
    max_body_bytes: int | None = Field(default=None, ge=1)


class SourcesFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    sources: dict[str, SourceConfig]


@dataclass(frozen=True)
class WebhookSource:
    """A source ready to serve: its secret read, its templates compiled, its topic named."""

    name: str
    config: SourceConfig
    secret: str
    topic: str
    event_source: str
    max_body_bytes: int
    items: Template
    event_type: Template
    event_id: Template | None
    payload: Template

    @property
    def tenant(self) -> str:
        return self.config.tenant

    def events(self, body: bytes, headers: Mapping[str, str]) -> list[TriggerEvent]:
        """The trigger events of one authenticated delivery, all valid or none: raises
        :class:`DeliveryRejected` (400 not JSON, 422 does not map, 403 another tenant)."""
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise DeliveryRejected(f"the body is not JSON ({exc})", status=400,
                                   code="invalid_json") from None
        self._check_tenant(data, "the body")
        scope: dict[str, Any] = {"body": data, "headers": dict(headers)}
        found = self._render(self.items, scope, "items")
        items = found if isinstance(found, list) else [found]
        if not items:
            raise DeliveryRejected("the delivery holds no events", status=422, code="no_events")
        if len(items) > MAX_ITEMS:
            raise DeliveryRejected(f"the delivery holds {len(items)} events; at most "
                                   f"{MAX_ITEMS} are accepted at once", status=413,
                                   code="too_many_events")
        return [self._event(i, item, scope) for i, item in enumerate(items)]

    def _event(self, index: int, item: Any, scope: dict[str, Any]) -> TriggerEvent:
        where = f"event {index + 1}"
        self._check_tenant(item, where)
        scope = {**scope, "item": item}
        payload = self._render(self.payload, scope, f"{where}: payload")
        if not isinstance(payload, dict):
            raise DeliveryRejected(f"{where}: the payload is not a JSON object; map it with "
                                   f"`payload` in the source's configuration", status=422,
                                   code="invalid_event")
        self._check_tenant(payload, where)
        event_id = self._render(self.event_id, scope, f"{where}: event_id") \
            if self.event_id is not None else None
        try:
            return TriggerEvent(
                event_id=to_text(event_id) if event_id is not None else "",
                source=self.event_source, tenant=self.tenant, payload=payload,
                event_type=to_text(self._render(self.event_type, scope,
                                                f"{where}: event_type")))
        except ValidationError as exc:
            raise DeliveryRejected(f"{where}: {validation_reason(exc)}", status=422,
                                   code="invalid_event") from None

    def _render(self, template: Template, scope: Mapping[str, Any], what: str) -> Any:
        try:
            return template.render(scope)
        except ExpressionEvalError as exc:
            raise DeliveryRejected(f"{what}: {exc}", status=422,
                                   code="invalid_event") from None

    def _check_tenant(self, value: Any, where: str) -> None:
        named = value.get("tenant") if isinstance(value, dict) else None
        if named is not None and named != self.tenant:
            raise DeliveryRejected(
                f"{where} names tenant '{to_text(named)[:64]}', but source '{self.name}' is "
                f"authenticated for tenant '{self.tenant}'; a webhook source may start runs "
                f"only for its own tenant", status=403, code="tenant_mismatch")


def _compile(value: str, where: str, allowed: set[str]) -> Template:
    try:
        template = compile_template(value)
    except TemplateSyntaxError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    unknown = sorted({path[0] for path in template.references()} - allowed)
    if unknown:
        raise ConfigError(f"{where}: '{unknown[0]}' is not known here; a template may read "
                          f"{', '.join(sorted(allowed))}")
    return template


def _source(settings: Settings, name: str, config: SourceConfig, file: Path) -> WebhookSource:
    where = f"{file}: source '{name}'"
    secret = os.environ.get(config.secret_env, "")
    if not secret:
        raise ConfigError(f"{where}: the environment variable {config.secret_env} (its "
                          f"{config.scheme} secret) is not set")
    topic, event_source = resolve_trigger_topic(settings, config.topic or name)
    per_item = {"body", "headers", "item"}
    return WebhookSource(
        name=name, config=config, secret=secret, topic=topic, event_source=event_source,
        max_body_bytes=min(config.max_body_bytes or settings.ingress_max_body_bytes,
                           settings.ingress_max_body_bytes),
        items=_compile(config.items, f"{where}, items", {"body", "headers"}),
        event_type=_compile(config.event_type, f"{where}, event_type", per_item),
        event_id=_compile(config.event_id, f"{where}, event_id", per_item)
        if config.event_id is not None else None,
        payload=_compile(config.payload, f"{where}, payload", per_item))


def load_sources(settings: Settings) -> dict[str, WebhookSource]:
    """The webhook sources of ``settings.ingress_sources_file`` (none if it is unset),
    validated: an unknown field, a template that does not parse, an unset secret variable
    is a :class:`ConfigError` naming the file and the source."""
    file = settings.ingress_sources_file
    if file is None:
        return {}
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read the webhook sources file {file}: {exc.strerror}; "
                          f"fix AGENTFABRIC_INGRESS_SOURCES_FILE") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file} is not valid YAML: {exc}") from exc
    try:
        parsed = SourcesFile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{file}: {validation_reason(exc)}") from exc
    sources = {}
    for name, config in parsed.sources.items():
        if not _valid_name(name):
            raise ConfigError(f"{file}: source name '{name}' must be lower-case letters, "
                              f"digits, '-' or '_' (it is part of the URL and the topic)")
        sources[name] = _source(settings, name, config, file)
    return sources


def _valid_name(name: str) -> bool:
    return re.fullmatch(NAME_PATTERN, name) is not None
