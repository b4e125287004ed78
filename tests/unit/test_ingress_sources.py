"""Webhook source configuration: validated at start-up; deliveries mapped to trigger events."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agentfabric.errors import ConfigError
from agentfabric.ingress.sources import DeliveryRejected, WebhookSource, load_sources
from agentfabric.settings import Settings

EXAMPLE = Path(__file__).parents[2] / "agentfabric" / "examples" / "ingress.yaml"


@pytest.fixture(autouse=True)
def _secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRM_WEBHOOK_SECRET", "crm-secret")
    monkeypatch.setenv("ERP_WEBHOOK_SECRET", "erp-secret")


def _load(tmp_path: Path, text: str) -> dict[str, WebhookSource]:
    file = tmp_path / "sources.yaml"
    file.write_text(text)
    return load_sources(Settings(topic_prefix="tp", ingress_sources_file=file))


def test_the_shipped_example_loads_and_maps_a_hubspot_batch() -> None:
    sources = load_sources(Settings(topic_prefix="tp", ingress_sources_file=EXAMPLE))
    crm, erp = sources["crm"], sources["erp"]
    assert (crm.topic, crm.event_source, crm.tenant, crm.secret) == \
        ("tp.triggers.crm", "crm", "acme", "crm-secret")
    body = [{"eventId": 11, "subscriptionType": "contact.creation", "objectId": 5,
             "properties": {"lead_id": "L-5", "email": "a@b.io"}},
            {"eventId": 12, "subscriptionType": "contact.deletion", "objectId": 6}]
    events = crm.events(json.dumps(body).encode(), {})
    assert [(e.event_id, e.event_type, e.tenant, e.source) for e in events] == [
        ("hubspot-11", "lead.created", "acme", "crm"),
        ("hubspot-12", "contact.deletion", "acme", "crm")]
    assert events[0].payload == {"lead_id": "L-5", "email": "a@b.io"}
    assert events[1].payload["objectId"] == 6
    stripe_like = {"id": "evt_1", "type": "invoice.posted",
                   "data": {"object": {"invoice_id": "INV-1"}}}
    (event,) = erp.events(json.dumps(stripe_like).encode(), {})
    assert (event.event_id, event.event_type, event.payload) == \
        ("evt_1", "invoice.posted", {"invoice_id": "INV-1"})


def test_items_path_constant_type_headers_and_content_id(tmp_path: Path) -> None:
    (src,) = _load(tmp_path, """
sources:
  shop:
    scheme: github
    secret_env: CRM_WEBHOOK_SECRET
    tenant: globex
    topic: tp.triggers.orders
    items: "{{ body.data }}"
    event_type: "{{ headers['x-github-event'] }}"
    max_body_bytes: 999999999
""").values()
    assert src.topic == "tp.triggers.orders"
    assert src.event_source == "orders"
    assert src.max_body_bytes == Settings().ingress_max_body_bytes  # capped by the setting
    body = json.dumps({"data": [{"n": 1}, {"n": 2}]}).encode()
    events = src.events(body, {"x-github-event": "push"})
    assert [e.event_type for e in events] == ["push", "push"]
    assert events[0].event_id.startswith("sha256:")  # no event_id: a hash of the content
    assert events[0].event_id == src.events(body, {"x-github-event": "push"})[0].event_id
    assert events[0].event_id != events[1].event_id


@pytest.mark.parametrize(("body", "status", "code", "words"), [
    (b"not json", 400, "invalid_json", "not JSON"),
    (b"[]", 422, "no_events", "no events"),
    (b'[{"eventId": 1}]', 422, "invalid_event", "subscriptionType"),
    (b'[{"eventId": 1, "subscriptionType": "bad type!"}]', 422, "invalid_event",
     "event 1: event_type"),
    (b'[{"eventId": 1, "subscriptionType": "x", "tenant": "globex"}]', 403,
     "tenant_mismatch", "names tenant 'globex'"),
    (b'[{"eventId": 1, "subscriptionType": "x", "properties": {"tenant": "globex"}}]', 403,
     "tenant_mismatch", "authenticated for tenant 'acme'"),
])
def test_deliveries_that_do_not_map_are_rejected(body: bytes, status: int, code: str,
                                                 words: str) -> None:
    crm = load_sources(Settings(ingress_sources_file=EXAMPLE))["crm"]
    with pytest.raises(DeliveryRejected, match=words) as info:
        crm.events(body, {})
    assert (info.value.status, info.value.code) == (status, code)


def test_the_same_tenant_in_the_body_is_fine() -> None:
    crm = load_sources(Settings(ingress_sources_file=EXAMPLE))["crm"]
    (event,) = crm.events(b'[{"eventId": 1, "subscriptionType": "x", "tenant": "acme"}]', {})
    assert event.tenant == "acme"


@pytest.mark.parametrize(("text", "words"), [
    ("sources: {a: {scheme: hmac, secret_env: X, tenant: t, event_type: e}}", "scheme"),
    ("sources: {a: {scheme: github, secret_env: CRM_WEBHOOK_SECRET, tenant: t, "
     "event_type: e, colour: red}}", "colour"),
    ("sources: {a: {scheme: github, secret_env: UNSET_SECRET_VAR, tenant: t, event_type: e}}",
     "UNSET_SECRET_VAR"),
    ("sources: {a: {scheme: github, secret_env: CRM_WEBHOOK_SECRET, tenant: t, "
     "event_type: '{{ item.type '}}", "source 'a', event_type: unterminated"),
    ("sources: {a: {scheme: github, secret_env: CRM_WEBHOOK_SECRET, tenant: t, "
     "event_type: '{{ steps.x }}'}}", "'steps' is not known here"),
    ("sources: {a: {scheme: github, secret_env: CRM_WEBHOOK_SECRET, tenant: t, "
     "event_type: e, items: '{{ item }}'}}", "source 'a', items: 'item' is not known"),
    ("sources: {A!: {scheme: github, secret_env: CRM_WEBHOOK_SECRET, tenant: t, "
     "event_type: e}}", "source name 'A!'"),
    ("sources: {a: {scheme: github, secret_env: CRM_WEBHOOK_SECRET, tenant: t, "
     "event_type: e, topic: other.topic}}", "not a trigger topic"),
    ("sources: [", "not valid YAML"),
])
def test_misconfigurations_stop_the_start(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        _load(tmp_path, text)


def test_no_sources_file_means_no_sources(tmp_path: Path) -> None:
    assert load_sources(Settings()) == {}
    with pytest.raises(ConfigError, match="cannot read the webhook sources file"):
        load_sources(Settings(ingress_sources_file=tmp_path / "missing.yaml"))
