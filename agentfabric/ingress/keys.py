"""Per-tenant API keys of the run API, stored hashed in Redis (``agentfabric keys``).

A key looks like ``af_<id>_<secret>``: ``<id>`` (12 hex characters) names the key in
listings and revocations, ``<secret>`` is 256 random bits. Only the SHA-256 of the whole key
is stored, so a copy of Redis does not give anyone a usable key; the key itself is shown
once, when it is created. Keys (``<p>`` is the topic prefix)::

    <p>:apikeys:<id>     hash: sha256, tenant, name, created_at, revoked_at ('' if live)
    <p>:apikeys:index    zset of key ids by creation time (for listing)

A request authenticates with ``Authorization: Bearer <key>`` (or ``X-API-Key: <key>``);
the tenant of everything it does is the key's tenant. Revoked keys stay listed, marked.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from redis.asyncio import Redis

from agentfabric.errors import ConfigError
from schemas.models import NAME_PATTERN, utc_now

__all__ = ["KEY_PREFIX", "ApiKey", "ApiKeyStore", "hash_key", "key_id_of", "presented_key"]

KEY_PREFIX = "af_"
_ID_CHARS = 12
_KEY = re.compile(r"^af_(?P<id>[0-9a-f]{12})_(?P<secret>[A-Za-z0-9_-]{32,128})$")
_ID = re.compile(r"^(?:af_)?(?P<id>[0-9a-f]{12})(?:_.*)?$")
_DUMMY_HASH = hashlib.sha256(b"no such key").hexdigest()


class ApiKey(BaseModel):
    """What is known about a key (never the key itself)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    key_id: str
    tenant: str = Field(pattern=NAME_PATTERN)
    name: str = ""
    created_at: datetime
    revoked_at: datetime | None = None

    @property
    def prefix(self) -> str:
        """How the key starts (``af_<id>_``): enough to recognise it, useless to use it."""
        return f"{KEY_PREFIX}{self.key_id}_"

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


def hash_key(key: str) -> str:
    """The stored form of a key: its SHA-256, hex."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_id_of(text: str) -> str | None:
    """The key id in ``text``: a bare id, ``af_<id>``, the prefix ``af_<id>_`` or a whole key."""
    match = _ID.match(text.strip())
    return match["id"] if match else None


def presented_key(authorization: str | None, api_key_header: str | None) -> str | None:
    """The key a request presents: ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``."""
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    if api_key_header and api_key_header.strip():
        return api_key_header.strip()
    return None


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")


def _fields(stored: Mapping[Any, Any]) -> dict[str, str]:
    """A Redis hash as text, whether the client decodes responses or not."""
    return {_text(k): _text(v) for k, v in stored.items()}


def _when(text: str) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


class ApiKeyStore:
    """Create, verify, list and revoke the API keys kept in ``redis`` under ``prefix``."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self.redis = redis
        self._base = f"{prefix}:apikeys:"
        self._index = f"{prefix}:apikeys:index"

    def _key(self, key_id: str) -> str:
        return self._base + key_id

    async def create(self, tenant: str, name: str = "") -> tuple[str, ApiKey]:
        """A new key for ``tenant``: the key (show it once; it is not stored) and its info."""
        if not re.match(NAME_PATTERN, tenant):
            raise ConfigError(f"'{tenant}' is not a tenant name: use lower-case letters, "
                              f"digits, '_' and '-', starting with a letter (e.g. acme)")
        while True:
            key_id = secrets.token_hex(_ID_CHARS // 2)
            key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
            info = ApiKey(key_id=key_id, tenant=tenant, name=name, created_at=utc_now())
            digest = hash_key(key)
            # HSETNX on a fresh field first: two creators can never share an id
            if await self.redis.hsetnx(self._key(key_id), "sha256", digest):
                break
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._key(key_id), mapping={
                "sha256": digest, "tenant": tenant, "name": name,
                "created_at": info.created_at.isoformat(), "revoked_at": ""})
            pipe.zadd(self._index, {key_id: info.created_at.timestamp()})
            await pipe.execute()
        return key, info

    async def verify(self, key: str) -> ApiKey | None:
        """The key's info if ``key`` is a live key; None if it is unknown, wrong or revoked.
        The comparison is constant-time (the stored hash against the presented one's)."""
        match = _KEY.match(key)
        stored = _fields(await self.redis.hgetall(self._key(match["id"]))) if match else {}
        expected = stored.get("sha256") or _DUMMY_HASH
        good = hmac.compare_digest(expected, hash_key(key))
        if not (match and stored.get("tenant") and good):
            return None
        info = self._info(match["id"], stored)
        return None if info.revoked else info

    async def get(self, key_id: str) -> ApiKey | None:
        stored = _fields(await self.redis.hgetall(self._key(key_id)))
        return self._info(key_id, stored) if stored.get("tenant") else None

    async def revoke(self, key_id_or_prefix: str) -> ApiKey:
        """Revoke a key by id (or ``af_<id>``, or the key); revoking twice keeps the first time."""
        key_id = key_id_of(key_id_or_prefix)
        info = await self.get(key_id) if key_id else None
        if key_id is None or info is None:
            raise ConfigError(f"no API key '{key_id_or_prefix}'; `agentfabric keys list` "
                              f"shows the ids")
        if info.revoked:
            return info
        now = utc_now()
        await self.redis.hset(self._key(key_id), "revoked_at", now.isoformat())
        return info.model_copy(update={"revoked_at": now})

    async def list(self, tenant: str | None = None) -> list[ApiKey]:
        """Every key (revoked ones too), oldest first; only ``tenant``'s if given."""
        found = []
        for raw in await self.redis.zrange(self._index, 0, -1):
            info = await self.get(_text(raw))
            if info is not None and (tenant is None or info.tenant == tenant):
                found.append(info)
        return found

    @staticmethod
    def _info(key_id: str, stored: dict[str, str]) -> ApiKey:
        return ApiKey(key_id=key_id, tenant=stored["tenant"], name=stored.get("name", ""),
                      created_at=_when(stored.get("created_at", "")) or datetime.fromtimestamp(
                          0, UTC),
                      revoked_at=_when(stored.get("revoked_at", "")))
