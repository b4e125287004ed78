"""Producer errors translated where they enter: permanent only when resending cannot help."""

from __future__ import annotations

import inspect

import pytest
from aiokafka import errors as kafka_errors

from agentfabric.errors import PermanentError, UnavailableError
from streams.kafka import PERMANENT_SEND_ERRORS, _translate


@pytest.mark.parametrize("error", [
    kafka_errors.KafkaTimeoutError(), kafka_errors.RequestTimedOutError(),
    kafka_errors.KafkaConnectionError(), kafka_errors.NotLeaderForPartitionError(),
    kafka_errors.NodeNotReadyError(),
])
def test_timeouts_and_outages_are_transient(error: kafka_errors.KafkaError) -> None:
    translated = _translate(error)
    assert isinstance(translated, UnavailableError)
    assert type(error).__name__ in translated.reason


@pytest.mark.parametrize("error", [
    kafka_errors.MessageSizeTooLargeError(), kafka_errors.RecordTooLargeError(),
    kafka_errors.TopicAuthorizationFailedError(), kafka_errors.InvalidTopicError(),
])
def test_refusals_that_resending_cannot_fix_are_permanent(
        error: kafka_errors.KafkaError) -> None:
    translated = _translate(error)
    assert isinstance(translated, PermanentError)
    assert "cannot be sent as it is" in translated.reason


def test_every_kafka_error_maps_to_exactly_one_branch() -> None:
    classes = [c for _, c in inspect.getmembers(kafka_errors, inspect.isclass)
               if issubclass(c, kafka_errors.KafkaError)
               and c is not kafka_errors.BrokerResponseError]  # abstract: no errno
    assert len(classes) > 50
    for cls in classes:
        try:
            error = cls()
        except TypeError:  # a few need arguments; their class decides the branch
            error = cls.__new__(cls)
        translated = _translate(error)
        expected = PermanentError if issubclass(cls, PERMANENT_SEND_ERRORS) else UnavailableError
        assert type(translated) is expected, cls
