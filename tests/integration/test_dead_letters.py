"""Malformed input lands on the dead-letter topic with a reason; good events around it finish."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agentfabric.app import publish_events
from agentfabric.settings import Settings
from schemas.models import StepMessage, TriggerEvent, utc_now
from streams.kafka import Outgoing, Producer
from streams.topics import TopicNames

from .helpers import (
    cases,
    check_results,
    collect_dead_letters,
    collect_results,
    publish_cases,
    running_worker,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _bad_messages(names: TopicNames) -> dict[bytes, Outgoing]:
    crm = names.trigger("crm")
    unknown_step_workflow = StepMessage(
        run_id="r-1", workflow="no_such_workflow", workflow_version=1, step="normalise",
        idempotency_key="r-1:normalise:0", input={}, event_id="e", source="crm",
        event_type="lead.created", started_at=utc_now())
    unknown_step = unknown_step_workflow.model_copy(update={
        "run_id": "r-2", "workflow": "lead_enrichment", "step": "no_such_step",
        "idempotency_key": "r-2:no_such_step:0"})
    return {
        b"not-json": Outgoing(crm, b"not-json", b"\x00\x01 this is not json"),
        b"wrong-schema": Outgoing(crm, b"wrong-schema", json.dumps(
            {"event_type": "lead.created", "payload": "should be an object",
             "colour": "blue"}).encode()),
        b"unknown-type": Outgoing(crm, b"unknown-type", json.dumps(
            {"event_type": "lead.deleted", "payload": {"lead_id": "L-9"}}).encode()),
        b"unknown-workflow": Outgoing(crm, b"unknown-workflow", json.dumps(
            {"event_type": "lead.created", "workflow": "no_such_workflow",
             "payload": {"lead_id": "L-9"}}).encode()),
        b"r-1": Outgoing.of(names.step("lead_enrichment", "normalise"), "r-1",
                            unknown_step_workflow),
        b"r-2": Outgoing.of(names.step("lead_enrichment", "enrich"), "r-2", unknown_step),
        b"bad-tool-args": Outgoing(names.trigger("erp"), b"bad-tool-args", json.dumps(
            {"event_type": "invoice.posted", "payload": {
                "invoice_id": "INV-X", "vendor_id": "V-1001", "amount": "lots",
                "currency": "USD", "invoice_date": "2026-11-01",
                "due_date": "2026-12-01"}}).encode()),
    }


EXPECTED_REASONS = {
    b"not-json": ("DecodeError", "neither an agentfabric message nor JSON"),
    b"wrong-schema": ("MessageValidationError", "payload: Input should be a valid dictionary"),
    b"unknown-type": ("UnroutableEventError", "no workflow starts on event type 'lead.deleted'"),
    b"unknown-workflow": ("UnknownWorkflowError", "workflow 'no_such_workflow' is not loaded"),
    b"r-1": ("UnknownWorkflowError", "workflow 'no_such_workflow' is not loaded"),
    b"r-2": ("UnknownStepError", "has no step 'no_such_step'"),
    b"bad-tool-args": ("ToolArgumentsError", "tool 'erp.validate_invoice' rejected its arguments"),
}


async def test_malformed_events_are_dead_lettered_and_good_ones_complete(
        settings: Settings) -> None:
    names = TopicNames(settings.topic_prefix)
    good = cases(40, seed=3)
    bad = _bad_messages(names)
    async with running_worker(settings):
        await publish_cases(settings, good[:20])
        producer = Producer(settings)
        await producer.start()
        try:
            await producer.send_all(list(bad.values()))
        finally:
            await producer.stop()
        await publish_cases(settings, good[20:])
        letters = await collect_dead_letters(settings, len(bad))
        results = [*await collect_results(settings, "lead_enrichment", 20),
                   *await collect_results(settings, "invoice_triage", 20)]
    check_results(good, results)
    assert len(letters) == len(bad), [d.reason for d in letters]
    # the bad tool call fails two steps into its run: it is keyed by the run, not the event
    by_key = {b"bad-tool-args" if d.step == "validate" else d.key: d for d in letters}
    for key, (error_type, fragment) in EXPECTED_REASONS.items():
        letter = by_key[key]
        assert letter.error_type == error_type, (key, letter.reason)
        assert fragment in letter.reason, (key, letter.reason)
        if key != b"bad-tool-args":
            assert letter.value == bad[key].value, "the original bytes must be kept for replay"
    assert by_key[b"r-2"].run_id == "r-2"
    assert by_key[b"r-2"].step == "no_such_step"
    tool_letter = by_key[b"bad-tool-args"]
    assert tool_letter.workflow == "invoice_triage"
    assert tool_letter.run_id is not None
    assert "amount" in tool_letter.reason


def _blow_up(settings: Settings, folder: Path, **update: object) -> Settings:
    """A workflow whose one step multiplies its input by nine, on one partition."""
    import yaml

    (folder / "blow_up.yaml").write_text(yaml.safe_dump({
        "name": "blow_up", "version": 1,
        "trigger": {"source": "crm", "event_types": ["grow"]},
        "steps": [{"id": "grow", "kind": "transform",
                   "output": "{{ replace(input.blob, 'x', 'xxxxxxxxx') }}"}]}))
    return settings.model_copy(update={"workflows_dir": folder, "partitions": 1, **update})


def _grow(event_id: str, size: int) -> TriggerEvent:
    return TriggerEvent(event_id=event_id, source="crm", event_type="grow",
                        payload={"blob": "x" * size})


async def test_an_output_too_large_for_the_broker_is_dead_lettered_not_retried_forever(
        settings: Settings, tmp_path: Path) -> None:
    """A step whose output the broker can never take must not stall its partition."""
    # claim checks off (threshold above the broker's limit): the broker refuses the output
    big = _blow_up(settings, tmp_path, claim_check_bytes=64 * 1024 * 1024)
    async with running_worker(big):
        await publish_events(big, TopicNames(big.topic_prefix).trigger("crm"),
                             [_grow("huge", 110_000), _grow("small", 2)])
        [letter] = await collect_dead_letters(big, 1)
        results = await collect_results(big, "blow_up", 1)
    assert letter.error_type == "PermanentError"
    assert "MessageSizeTooLargeError" in letter.reason
    assert letter.topic == f"{big.topic_prefix}.blow_up.grow"
    assert [r.event_id for r in results] == ["small"], "the partition kept going"
    assert results[0].output == "x" * 18


async def test_an_output_too_large_for_the_broker_travels_as_a_claim_check(
        settings: Settings, tmp_path: Path) -> None:
    """With claim checks on (the default), the same run completes."""
    big = _blow_up(settings, tmp_path)
    async with running_worker(big):
        await publish_events(big, TopicNames(big.topic_prefix).trigger("crm"),
                             [_grow("huge", 110_000)])
        [result] = await collect_results(big, "blow_up", 1)
    assert result.output == "x" * 990_000, "read back through the claim check"
