"""Who a trigger event's runs belong to: the tenant comes from the source, never from the
event body alone (docs/tenancy.md).

agentfabric's own publishers (``agentfabric publish``, :class:`agentfabric.client.Client`,
the HTTP ingress and the run API) mark each trigger record with two headers::

    af-tenant:     <tenant>
    af-tenant-sig: <hex HMAC-SHA256(secret, tenant + "\\n" + event_id)>

The secret is the setting ``tenant_signing_secret``; unset, a random secret per deployment
kept in Redis under ``<prefix>:tenancy:secret`` (created by whoever needs it first), which
every trusted component can read. The router (:class:`TenantVerifier`) takes a record with
a valid signature as published for the signed tenant; any other record gets its source's
policy, the setting ``trigger_tenants`` (a fixed tenant, or a tenant header checked against
an allow-list; a source not configured is fixed to tenant ``default``). A body naming
another tenant than the one so decided is a :class:`~agentfabric.errors.TenantError`: a
dead letter that says what to configure.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, model_validator
from redis.exceptions import RedisError

from schemas.models import NAME_PATTERN, TriggerEvent
from schemas.serde import header_value

from .errors import TenantError

if TYPE_CHECKING:
    from aiokafka import ConsumerRecord
    from redis.asyncio import Redis

    from .settings import Settings

__all__ = ["DEFAULT_TENANT", "SIGNATURE_HEADER", "TENANT_HEADER", "TenantPolicy",
           "TenantSigner", "TenantVerifier", "load_secret", "sign", "tenant_headers"]

TENANT_HEADER = "af-tenant"
SIGNATURE_HEADER = "af-tenant-sig"
DEFAULT_TENANT = "default"
_NAME = re.compile(NAME_PATTERN)


class TenantPolicy(BaseModel):
    """How the tenant of an unsigned event on one trigger source is decided: ``{"fixed":
    "acme"}`` (every event is acme's), or ``{"header": "x-tenant", "allow": ["acme",
    "globex"]}`` (the header names it, and must name one of ``allow``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    fixed: str | None = Field(default=None, pattern=NAME_PATTERN)
    header: str | None = Field(default=None, min_length=1, max_length=200)
    allow: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _one_kind(self) -> TenantPolicy:
        if (self.fixed is None) == (self.header is None):
            raise ValueError('a tenant policy is either {"fixed": "<tenant>"} or {"header": '
                             '"<header name>", "allow": ["<tenant>", ...]}')
        if self.fixed is not None and self.allow:
            raise ValueError("allow goes with a header policy; a fixed policy names its one "
                             "tenant")
        if self.header is not None and not self.allow:
            raise ValueError(f"the header policy on {self.header} needs a non-empty allow "
                             f"list of the tenants that header may name")
        bad = [t for t in self.allow if not _NAME.match(t)]
        if bad:
            raise ValueError(f"allow names invalid tenants {bad}: a tenant is lowercase "
                             f"letters, digits, '_' and '-', starting with a letter")
        return self


def sign(secret: bytes, tenant: str, event_id: str) -> str:
    """The hex HMAC-SHA256 of ``tenant + "\\n" + event_id``."""
    return hmac.new(secret, f"{tenant}\n{event_id}".encode(), hashlib.sha256).hexdigest()


async def load_secret(settings: Settings, redis: Redis) -> bytes:
    """The signing secret: ``tenant_signing_secret`` if set, else the deployment's random
    secret in Redis (created with SET NX by the first component that needs it)."""
    if settings.tenant_signing_secret is not None:
        return settings.tenant_signing_secret.get_secret_value().encode()
    from streams.batching import redis_unavailable

    key = f"{settings.topic_prefix}:tenancy:secret"
    pool = getattr(redis, "connection_pool", None)  # None: a test double, nothing cached
    kwargs = pool.connection_kwargs if pool is not None else {}
    where = (str(kwargs.get("host")), str(kwargs.get("port")), str(kwargs.get("db")), key)
    if pool is not None and (known := _SECRETS.get(where)) is not None:
        return known  # never changes once created (SET NX): a Redis outage cannot stop publishing
    try:
        await redis.set(key, secrets.token_hex(32), nx=True)
        value = await redis.get(key)
    except RedisError as exc:
        raise redis_unavailable(exc, doing="reading the tenant signing secret",
                                retried=False) from exc
    if not value:
        raise TenantError(f"the tenant signing secret {key} vanished from Redis as it was "
                          f"read; set AGENTFABRIC_TENANT_SIGNING_SECRET, or keep Redis from "
                          f"evicting keys (maxmemory-policy noeviction)")
    secret = value if isinstance(value, bytes) else str(value).encode()
    if pool is not None:
        _SECRETS[where] = secret
    return secret


# the deployment secrets this process has read, by Redis server, database and key
_SECRETS: dict[tuple[str, str, str, str], bytes] = {}


class TenantSigner:
    """Signs trigger records for agentfabric's publishers; the secret is read once."""

    def __init__(self, settings: Settings, redis: Redis) -> None:
        self.settings = settings
        self.redis = redis
        self._secret: bytes | None = None

    async def secret(self) -> bytes:
        if self._secret is None:
            self._secret = await load_secret(self.settings, self.redis)
        return self._secret

    async def headers(self, tenant: str, event_id: str) -> list[tuple[str, bytes]]:
        """The ``af-tenant`` and ``af-tenant-sig`` headers of one trigger record."""
        return [(TENANT_HEADER, tenant.encode()),
                (SIGNATURE_HEADER, sign(await self.secret(), tenant, event_id).encode())]


async def tenant_headers(settings: Settings, redis: Redis, tenant: str,
                         event_id: str) -> list[tuple[str, bytes]]:
    """The headers that mark a trigger record as published for ``tenant`` (one-off use;
    a publisher of many records keeps a :class:`TenantSigner`)."""
    return await TenantSigner(settings, redis).headers(tenant, event_id)


class TenantVerifier:
    """The router's side: the tenant of a trigger record, or a :class:`TenantError`.
    ``secret`` None: no signature is valid, every record gets its source's policy."""

    def __init__(self, secret: bytes | None, policies: Mapping[str, TenantPolicy]) -> None:
        self.secret = secret
        # validated again: a settings copy made with model_copy(update=...) may hold dicts
        self.policies = {source: TenantPolicy.model_validate(policy)
                         for source, policy in policies.items()}

    @classmethod
    async def load(cls, settings: Settings, redis: Redis) -> TenantVerifier:
        return cls(await load_secret(settings, redis), settings.trigger_tenants)

    def signed_tenant(self, record: ConsumerRecord, event_id: str) -> tuple[str | None, str]:
        """The tenant a valid signature vouches for (else None), and a note on why not."""
        sig = header_value(record.headers, SIGNATURE_HEADER)
        if sig is None:
            return None, ""
        raw = header_value(record.headers, TENANT_HEADER)
        tenant = raw.decode("utf-8", "replace") if raw is not None else None
        if self.secret is None or tenant is None or not _NAME.match(tenant):
            return None, f"; its {SIGNATURE_HEADER} header could not be checked"
        expected = sign(self.secret, tenant, event_id)
        if not hmac.compare_digest(expected, sig.decode("ascii", "replace")):
            return None, (f"; its {SIGNATURE_HEADER} header does not verify (signed with "
                          f"another secret, or for another event id)")
        return tenant, ""

    def tenant_of(self, record: ConsumerRecord, event: TriggerEvent, named: str | None) -> str:
        """The tenant ``event`` (whose body names ``named``, or no tenant) runs as."""
        signed, why = self.signed_tenant(record, event.event_id)
        if signed is not None:
            if named is not None and named != signed:
                raise TenantError(f"the event names tenant '{named}' but was published for "
                                  f"tenant '{signed}'; publish it for tenant '{named}', or "
                                  f"drop the tenant from its body")
            return signed
        return self._by_policy(record, event.source, named, why)

    def _by_policy(self, record: ConsumerRecord, source: str, named: str | None,
                   why: str) -> str:
        policy = self.policies.get(source)
        if policy is None or policy.fixed is not None:
            tenant = policy.fixed if policy is not None and policy.fixed else DEFAULT_TENANT
            if named is not None and named != tenant:
                where = (f"source '{source}' is fixed to tenant '{tenant}' (trigger_tenants)"
                         if policy is not None else
                         f"source '{source}' has no tenant policy, so its unsigned events "
                         f"run as tenant '{DEFAULT_TENANT}'")
                raise TenantError(
                    f"the event names tenant '{named}' but arrived unsigned{why}, and "
                    f"{where}; publish it with agentfabric (publish, the client or the "
                    f"ingress sign it), or configure the source, e.g. "
                    f"AGENTFABRIC_TRIGGER_TENANTS='{{\"{source}\": {{\"fixed\": "
                    f"\"{named}\"}}}}' (see docs/tenancy.md)")
            return tenant
        assert policy.header is not None  # a policy is fixed or header (validated)
        raw = header_value(record.headers, policy.header)
        if raw is None:
            raise TenantError(f"the event arrived unsigned{why} without the header "
                              f"{policy.header}, which names the tenant on source "
                              f"'{source}' (trigger_tenants); have the producer set it")
        tenant = raw.decode("utf-8", "replace")[:100]
        if tenant not in policy.allow:
            raise TenantError(f"header {policy.header} names tenant '{tenant}', which is not "
                              f"in the allow-list of source '{source}' "
                              f"({', '.join(policy.allow)}); add it to trigger_tenants if "
                              f"that producer may start runs for it")
        if named is not None and named != tenant:
            raise TenantError(f"the event names tenant '{named}' but its header "
                              f"{policy.header} says '{tenant}'; make them agree, or drop the "
                              f"tenant from its body")
        return tenant
