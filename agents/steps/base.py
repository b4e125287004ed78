"""What every step kind shares: its YAML model, its compiled templates, and how it runs.

A step kind is a pydantic model registered under its ``kind`` name. The loader validates a
step's YAML against the model of its kind, then calls :meth:`StepSpec.compile`, which
parses every expression and template once. ``run`` receives a :class:`StepContext` and
returns a :class:`StepOutcome`; it holds no state between messages.
Later kinds (llm, lookup, parallel, loop, approval, workflow) register the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from agentfabric.errors import ExpressionSyntaxError, PermanentError, WorkflowError
from agents.cache import CacheSpec
from agents.expr import Expression, compile_expression
from agents.template import Template, TemplateSyntaxError, compile_template
from schemas.models import StepMessage, Usage
from tools.registry import ToolCall

if TYPE_CHECKING:
    from agents.recording import ChatModel, KnowledgeSearch, ToolCaller

__all__ = [
    "END",
    "STEP_ID_PATTERN",
    "STEP_KINDS",
    "FanOut",
    "HandOffRequest",
    "StepContext",
    "StepOutcome",
    "StepSpec",
    "SubWorkflowCall",
    "ToolCallLimitExceeded",
    "register_step_kind",
]

END = "end"
STEP_ID_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"


@dataclass
class StepContext:
    """Everything a step may use for one message: the envelope, the scope, the tools.

    ``agent`` is the step's identity (``workflow.step``) and ``token`` its signed gateway
    token (scoped to the tools the step declares). ``max_tool_calls_per_run`` caps the tool
    calls of the whole run (those of earlier steps count, from the run's usage): a step that
    would pass it raises :class:`ToolCallLimitExceeded`, and the engine ends the run."""

    message: StepMessage
    scope: dict[str, Any]
    tools: ToolCaller
    models: ChatModel | None = None
    knowledge: KnowledgeSearch | None = None
    agent: str = ""
    token: str = ""
    max_tool_calls_per_run: int | None = None
    tool_calls: int = 0
    degraded: list[str] = field(default_factory=list)

    def tool_call(self, tool: str, idempotency_key: str) -> ToolCall:
        """The identity of one tool call of this step; counts it against the run's cap."""
        used = self.message.usage.tool_calls + self.tool_calls
        if self.max_tool_calls_per_run is not None and used >= self.max_tool_calls_per_run:
            raise ToolCallLimitExceeded(
                f"run {self.message.run_id} reached its cap of {self.max_tool_calls_per_run} "
                f"tool calls (max_tool_calls_per_run) at step '{self.message.step}' and was "
                f"stopped; raise the cap if the workflow really needs more")
        self.tool_calls += 1
        msg = self.message
        return ToolCall(tool=tool, idempotency_key=idempotency_key, tenant=msg.tenant,
                        run_id=msg.run_id, agent=self.agent, token=self.token,
                        workflow=msg.workflow, step=msg.step, degraded=self.degraded)


class ToolCallLimitExceeded(PermanentError):
    """A run reached its cap on tool calls: the engine ends it with status
    ``tool_call_limit`` and this reason as its result (a runaway is stopped, not retried)."""


@dataclass(frozen=True)
class HandOffRequest:
    """The run goes to a person instead of on: why, and what kind of decision it needs;
    unanswered, it expires after ``expires_s`` (default: the approval_expiry_s setting)."""

    kind: str
    reason: str
    expires_s: float | None = None


@dataclass(frozen=True)
class SubWorkflowCall:
    """Start ``workflow`` with ``input``; this run resumes with its result."""

    workflow: str
    input: dict[str, Any]


@dataclass(frozen=True)
class FanOut:
    """Run ``branches`` (their first steps) side by side; continue at ``join`` once all
    have arrived there."""

    branches: tuple[str, ...]
    join: str


@dataclass
class StepOutcome:
    """A step's output, and where the run goes next (``None``: the following step).
    At most one of ``hand_off``, ``call`` and ``fan_out`` is set."""

    output: Any
    next_step: str | None = None
    usage: Usage = field(default_factory=Usage)
    hand_off: HandOffRequest | None = None
    call: SubWorkflowCall | None = None
    fan_out: FanOut | None = None
    degraded: list[str] = field(default_factory=list)


class StepSpec(BaseModel):
    """Fields every step has. Subclasses add their own and implement ``run``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind_name: ClassVar[str]
    # a kind whose run has no effect beyond its output (no model, tool or store call), so
    # running it twice is harmless: the runtime runs it without a lease
    pure: ClassVar[bool] = False

    id: str = Field(pattern=STEP_ID_PATTERN)
    kind: str
    description: str = ""
    next: str | None = Field(default=None, description="Step to run after this one; 'end' "
                                                       "finishes the run. Default: the next "
                                                       "step in the file.")

    max_in_flight: int | None = Field(
        default=None, ge=1, le=10_000,
        description="Records of one partition this step works on at once (default: the "
                    "max_in_flight setting).")
    timeout_s: float | None = Field(
        default=None, gt=0, le=86_400,
        description="Longest one attempt of this step may run (default: the step_timeout_s "
                    "setting); past it the attempt fails as transient and is retried.")
    tool_timeout_s: float | None = Field(
        default=None, gt=0, le=3_600,
        description="Longest one tool call of this step may run (default: the tool_timeout_s "
                    "setting).")
    cache: CacheSpec | None = Field(
        default=None,
        description="Serve this step's output from the step cache for ttl_s seconds when "
                    "the run's input and earlier outputs are the same (per tenant).")

    def compile(self, base_dir: Path) -> None:
        """Parse expressions and templates, read files beside the workflow (``base_dir``);
        raise WorkflowError naming the field."""

    def tool_names(self) -> Iterator[str]:
        """The registered tools this step may call (checked when a worker starts)."""
        return iter(())

    def model_names(self) -> Iterator[str]:
        """The registry models this step calls (checked when a worker starts)."""
        return iter(())

    def uses_knowledge(self) -> bool:
        """True if the step searches a knowledge base (checked when a worker starts)."""
        return False

    def workflow_names(self) -> Iterator[str]:
        """Other workflows this step starts (checked when the workflows load)."""
        return iter(())

    def check_placement(self, step_ids: list[str]) -> None:
        """Checks that need the whole workflow (the ids in file order); raise WorkflowError."""

    def expressions(self) -> Iterator[tuple[str, Expression]]:
        """Every compiled expression with its field path (for reference checks)."""
        return iter(())

    def targets(self) -> Iterator[tuple[str, str]]:
        """Every step id this step may jump to, with the field that names it."""
        if self.next is not None:
            yield "next", self.next

    async def run(self, ctx: StepContext) -> StepOutcome:
        raise NotImplementedError

    # helpers for subclasses
    def _template(self, field_path: str, value: Any) -> Template:
        try:
            return compile_template(value)
        except ExpressionSyntaxError as exc:
            location = exc.location if isinstance(exc, TemplateSyntaxError) else ""
            where = f"{field_path}.{location}" if location else field_path
            raise WorkflowError(str(exc), step=self.id, field=where) from exc

    def _expression(self, field_path: str, text: str) -> Expression:
        try:
            return compile_expression(text)
        except ExpressionSyntaxError as exc:
            raise WorkflowError(str(exc), step=self.id, field=field_path) from exc

    @staticmethod
    def _template_expressions(prefix: str, template: Template,
                              ) -> Iterator[tuple[str, Expression]]:
        for location, expression in template.expressions():
            yield (f"{prefix}.{location}" if location else prefix), expression


STEP_KINDS: dict[str, type[StepSpec]] = {}
S = TypeVar("S", bound=type[StepSpec])


def register_step_kind(name: str) -> Callable[[S], S]:
    """Class decorator: make a step kind available to workflow files as ``kind: <name>``."""
    def decorator(cls: S) -> S:
        cls.kind_name = name
        STEP_KINDS[name] = cls
        return cls
    return decorator
