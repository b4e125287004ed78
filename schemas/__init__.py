"""Message contracts: Avro schemas (``avro/*.avsc``), their pydantic twins, and serialization."""

from .models import DeadLetter, HandOff, Header, RunResult, StepMessage, TriggerEvent, Usage
from .serde import decode, encode

__all__ = ["DeadLetter", "HandOff", "Header", "RunResult", "StepMessage", "TriggerEvent", "Usage",
           "decode", "encode"]
