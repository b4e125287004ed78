"""API keys of the run API: format, hashing, create/verify/revoke/list against the session's
real Redis, and how a request presents a key."""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

import pytest

from agentfabric.errors import ConfigError
from agentfabric.ingress.keys import ApiKeyStore, hash_key, key_id_of, presented_key

pytestmark = pytest.mark.timeout(60)


def test_hash_is_sha256_of_the_whole_key() -> None:
    key = "af_0123456789ab_" + "x" * 43
    assert hash_key(key) == hashlib.sha256(key.encode()).hexdigest()


@pytest.mark.parametrize(("text", "expected"), [
    ("0123456789ab", "0123456789ab"), ("af_0123456789ab", "0123456789ab"),
    ("af_0123456789ab_", "0123456789ab"), ("af_0123456789ab_" + "s" * 43, "0123456789ab"),
    ("nonsense", None), ("af_XYZ", None),
])
def test_key_id_of(text: str, expected: str | None) -> None:
    assert key_id_of(text) == expected


def test_presented_key() -> None:
    assert presented_key("Bearer af_k", None) == "af_k"
    assert presented_key("bearer  af_k ", None) == "af_k"
    assert presented_key(None, "af_x") == "af_x"
    assert presented_key("Basic Zm9vOmJhcg==", None) is None
    assert presented_key("Bearer ", " ") is None
    assert presented_key(None, None) is None


@pytest.fixture
def store(redis_client: Any) -> ApiKeyStore:
    return ApiKeyStore(redis_client, f"t{uuid.uuid4().hex[:10]}")


async def test_create_verify_revoke(store: ApiKeyStore, redis_client: Any) -> None:
    key, info = await store.create("acme", "ci")
    assert key.startswith(f"af_{info.key_id}_")
    assert len(key) > 50
    assert info.tenant == "acme"
    assert info.name == "ci"
    assert not info.revoked
    # only the hash is stored: the key itself is nowhere in Redis
    stored = await redis_client.hgetall(f"{store._base}{info.key_id}")
    assert stored[b"sha256"] == hash_key(key).encode()
    assert key.encode() not in b"".join(stored.values())

    verified = await store.verify(key)
    assert verified is not None
    assert verified.tenant == "acme"
    assert verified.key_id == info.key_id
    wrong_secret = key[:-4] + ("aaaa" if not key.endswith("aaaa") else "bbbb")
    assert await store.verify(wrong_secret) is None
    assert await store.verify("af_ffffffffffff_" + "s" * 43) is None  # unknown id
    assert await store.verify("not a key") is None

    revoked = await store.revoke(info.key_id)
    assert revoked.revoked
    assert revoked.revoked_at is not None
    assert await store.verify(key) is None
    again = await store.revoke(f"af_{info.key_id}_")  # idempotent; keeps the first time
    assert again.revoked_at == revoked.revoked_at


async def test_list_by_tenant_and_errors(store: ApiKeyStore) -> None:
    _, first = await store.create("acme")
    _, second = await store.create("globex", "billing")
    await store.revoke(second.key_id)
    everything = await store.list()
    assert [k.key_id for k in everything] == [first.key_id, second.key_id]
    assert [k.key_id for k in await store.list("globex")] == [second.key_id]
    assert (await store.list("globex"))[0].revoked
    assert await store.list("initech") == []
    with pytest.raises(ConfigError, match="no API key"):
        await store.revoke("ffffffffffff")
    with pytest.raises(ConfigError, match="not a tenant name"):
        await store.create("Not A Tenant")


async def test_keys_are_namespaced_by_prefix(redis_client: Any) -> None:
    one = ApiKeyStore(redis_client, f"t{uuid.uuid4().hex[:10]}")
    other = ApiKeyStore(redis_client, f"t{uuid.uuid4().hex[:10]}")
    key, _ = await one.create("acme")
    assert await one.verify(key) is not None
    assert await other.verify(key) is None
    assert await other.list() == []
