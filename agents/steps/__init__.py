"""Step kinds. Importing this package registers the built-in kinds in ``STEP_KINDS``."""

from . import branch, flow, llm, lookup, tool, transform
from .base import END, STEP_KINDS, StepContext, StepOutcome, StepSpec, register_step_kind

__all__ = [
    "END",
    "STEP_KINDS",
    "StepContext",
    "StepOutcome",
    "StepSpec",
    "branch",
    "flow",
    "llm",
    "lookup",
    "register_step_kind",
    "tool",
    "transform",
]
