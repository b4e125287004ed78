"""Message contracts: Avro schemas (``avro/*.avsc``), their pydantic twins, and serialization."""

from .models import (
    ApprovalDecision,
    DeadLetter,
    HandOff,
    Header,
    RunResult,
    StepMessage,
    TriggerEvent,
    Usage,
)
from .serde import decode, encode

__all__ = ["ApprovalDecision", "DeadLetter", "HandOff", "Header", "RunResult", "StepMessage",
           "TriggerEvent", "Usage", "decode", "encode"]
