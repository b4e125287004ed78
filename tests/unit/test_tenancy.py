"""The tenant of a trigger event: signatures, source policies, the router's dead letters."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiokafka.structs import ConsumerRecord

from agentfabric.errors import SettingsError, TenantError
from agentfabric.executors import RouterExecutor
from agentfabric.settings import Settings, load_settings
from agentfabric.tenancy import (
    SIGNATURE_HEADER,
    TENANT_HEADER,
    TenantPolicy,
    TenantSigner,
    TenantVerifier,
    load_secret,
    sign,
)
from agents.engine import Engine
from schemas.models import StepMessage, TriggerEvent
from schemas.serde import decode, encode
from streams.codec import decode_trigger
from streams.idempotency import MemoryEmissionStore
from tests.unit.test_handlers import NAMES, Handler, engine, only_dead_letter

__all__ = ["engine"]  # the fixture, shared with test_handlers

SECRET = b"s" * 32
CRM = "af.triggers.crm"


def record(value: bytes, headers: list[tuple[str, bytes]] | None = None,
           ) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(topic=CRM, partition=0, offset=0, timestamp=0, timestamp_type=0,
                          key=b"k", value=value, checksum=None, serialized_key_size=1,
                          serialized_value_size=1, headers=tuple(headers or ()))


def body(**extra: Any) -> bytes:
    return json.dumps({"event_type": "lead.created", "event_id": "e1",
                       "payload": {"lead_id": "L1", "email": "a@contoso.com"},
                       **extra}).encode()


def signed(tenant: str, event_id: str = "e1", secret: bytes = SECRET,
           ) -> list[tuple[str, bytes]]:
    return [(TENANT_HEADER, tenant.encode()),
            (SIGNATURE_HEADER, sign(secret, tenant, event_id).encode())]


def tenant(verifier: TenantVerifier, value: bytes,
           headers: list[tuple[str, bytes]] | None = None) -> str:
    return decode_trigger(record(value, headers), "crm", verifier.tenant_of).tenant


VERIFIER = TenantVerifier(SECRET, {})


def test_a_signature_binds_tenant_and_event_id() -> None:
    assert sign(SECRET, "acme", "e1") == sign(SECRET, "acme", "e1")
    assert len({sign(SECRET, "acme", "e1"), sign(SECRET, "acme", "e2"),
                sign(SECRET, "globex", "e1"), sign(b"x" * 32, "acme", "e1")}) == 4


def test_a_signed_event_runs_as_the_signed_tenant() -> None:
    assert tenant(VERIFIER, body(), signed("acme")) == "acme"
    assert tenant(VERIFIER, body(tenant="acme"), signed("acme")) == "acme"


def test_a_signed_event_whose_body_names_another_tenant_is_refused() -> None:
    with pytest.raises(TenantError, match="names tenant 'globex' but was published for "
                                          "tenant 'acme'"):
        tenant(VERIFIER, body(tenant="globex"), signed("acme"))


def test_an_avro_event_is_signed_like_json() -> None:
    value, headers = encode(TriggerEvent(event_id="e9", source="crm",
                                         event_type="lead.created", tenant="acme",
                                         payload={}))
    assert tenant(VERIFIER, value, [*headers, *signed("acme", "e9")]) == "acme"
    with pytest.raises(TenantError, match="arrived unsigned"):
        tenant(VERIFIER, value, headers)  # an Avro body always names its tenant


@pytest.mark.parametrize("headers", [
    signed("acme", secret=b"another secret"),      # another deployment's secret
    signed("acme", event_id="e2"),                 # copied from another event
    [(TENANT_HEADER, b"acme"), (SIGNATURE_HEADER, sign(SECRET, "globex", "e1").encode())],
])
def test_a_signature_that_does_not_verify_gets_the_policy(
        headers: list[tuple[str, bytes]]) -> None:
    assert tenant(VERIFIER, body(), headers) == "default"
    with pytest.raises(TenantError, match="does not verify") as caught:
        tenant(VERIFIER, body(tenant="acme"), headers)
    assert "AGENTFABRIC_TRIGGER_TENANTS" in caught.value.reason


def test_an_unconfigured_source_is_tenant_default() -> None:
    assert tenant(VERIFIER, body()) == "default"
    assert tenant(VERIFIER, body(tenant="default")) == "default"
    with pytest.raises(TenantError) as caught:
        tenant(VERIFIER, body(tenant="acme"))
    reason = caught.value.reason
    assert "names tenant 'acme' but arrived unsigned" in reason
    assert "source 'crm' has no tenant policy" in reason
    assert """AGENTFABRIC_TRIGGER_TENANTS='{"crm": {"fixed": "acme"}}'""" in reason


def test_without_a_secret_nothing_verifies() -> None:
    blind = TenantVerifier(None, {})
    assert tenant(blind, body(), signed("acme")) == "default"


def test_a_fixed_source() -> None:
    fixed = TenantVerifier(SECRET, {"crm": TenantPolicy(fixed="acme")})
    assert tenant(fixed, body()) == "acme"
    assert tenant(fixed, body(tenant="acme")) == "acme"
    with pytest.raises(TenantError, match="source 'crm' is fixed to tenant 'acme'"):
        tenant(fixed, body(tenant="globex"))
    assert tenant(fixed, body(tenant="globex"), signed("globex")) == "globex", \
        "a signature outranks the policy"


def test_a_header_source_with_an_allow_list() -> None:
    policy = TenantPolicy(header="x-tenant", allow=("acme", "globex"))
    by_header = TenantVerifier(SECRET, {"crm": policy})
    assert tenant(by_header, body(), [("x-tenant", b"globex")]) == "globex"
    assert tenant(by_header, body(tenant="acme"), [("x-tenant", b"acme")]) == "acme"
    with pytest.raises(TenantError, match="without the header x-tenant"):
        tenant(by_header, body())
    with pytest.raises(TenantError, match="names tenant 'initech', which is not in the "
                                          "allow-list of source 'crm' \\(acme, globex\\)"):
        tenant(by_header, body(), [("x-tenant", b"initech")])
    with pytest.raises(TenantError, match="names tenant 'acme' but its header x-tenant "
                                          "says 'globex'"):
        tenant(by_header, body(tenant="acme"), [("x-tenant", b"globex")])


@pytest.mark.parametrize(("policy", "fragment"), [
    ({}, "either"), ({"fixed": "acme", "header": "x"}, "either"),
    ({"header": "x-tenant"}, "non-empty allow"), ({"fixed": "acme", "allow": ["b"]},
                                                 "allow goes with a header policy"),
    ({"header": "x", "allow": ["Not A Tenant"]}, "invalid tenants"),
    ({"fixed": "Acme Corp"}, "pattern"), ({"fixed": "acme", "extra": 1}, "Extra inputs"),
])
def test_bad_policies_are_refused_at_start_up(policy: dict[str, Any], fragment: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTFABRIC_TRIGGER_TENANTS", json.dumps({"crm": policy}))
    with pytest.raises(SettingsError, match=fragment):
        load_settings()


def test_policies_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTFABRIC_TRIGGER_TENANTS", json.dumps(
        {"crm": {"fixed": "acme"}, "erp": {"header": "x-tenant", "allow": ["acme"]}}))
    found = load_settings().trigger_tenants
    assert found == {"crm": TenantPolicy(fixed="acme"),
                     "erp": TenantPolicy(header="x-tenant", allow=("acme",))}


class FakeRedis:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    async def set(self, key: str, value: str, nx: bool = False) -> bool:
        if nx and key in self.data:
            return False
        self.data[key] = value.encode()
        return True

    async def get(self, key: str) -> bytes | None:
        return self.data.get(key)


async def test_the_secret_is_made_once_per_deployment() -> None:
    redis: Any = FakeRedis()
    settings = Settings(topic_prefix="p1")
    first = await load_secret(settings, redis)
    assert first == await load_secret(settings, redis)
    assert list(redis.data) == ["p1:tenancy:secret"]
    assert len(first) == 64
    configured = Settings(tenant_signing_secret="c" * 40)
    assert await load_secret(configured, redis) == b"c" * 40
    headers = await TenantSigner(settings, redis).headers("acme", "e1")
    assert headers == [(TENANT_HEADER, b"acme"),
                       (SIGNATURE_HEADER, sign(first, "acme", "e1").encode())]
    assert tenant(TenantVerifier(first, {}), body(tenant="acme"), headers) == "acme"


async def test_the_router_dead_letters_a_tenant_it_may_not_start(engine: Engine) -> None:
    store = MemoryEmissionStore()
    router = Handler(RouterExecutor(engine, NAMES, Settings(), TenantVerifier(SECRET, {})),
                     store)
    letter = only_dead_letter((await router.handle(record(body(tenant="acme")))).messages)
    assert letter.error_type == "TenantError"
    assert "names tenant 'acme' but arrived unsigned" in letter.reason
    [out] = (await router.handle(record(body(event_id="e2"), signed("acme", "e2")))).messages
    assert decode(out.value, out.headers, StepMessage).tenant == "acme"


async def test_the_router_reads_policies_from_the_settings(engine: Engine) -> None:
    settings = Settings(trigger_tenants={"crm": {"fixed": "acme"}})
    router = Handler(RouterExecutor(engine, NAMES, settings), MemoryEmissionStore())
    [out] = (await router.handle(record(body()))).messages
    assert decode(out.value, out.headers, StepMessage).tenant == "acme"
