"""The one exception root of agentfabric, and what each branch means for a message.

Hierarchy::

    AgentFabricError                 root: ``except AgentFabricError`` catches everything we raise
    ├── ConfigError                  a developer misconfigured something; fix the config and restart
    │   ├── SettingsError            bad or unknown AGENTFABRIC_* setting
    │   ├── WorkflowError            a workflow file is invalid (names the file, step and field)
    │   ├── ExpressionSyntaxError    an expression or template does not parse
    │   └── PortInUseError           the embedded stack cannot bind a port
    ├── StackError                   the embedded broker or Redis failed to start or stop
    ├── TransientError               may succeed if tried again: the step is retried
    │   ├── UnavailableError         Kafka or Redis is down: the record is rewound, not retried
    │   └── RunTimeoutError          a client's run had no result in time (it may still finish)
    └── PermanentError               retrying cannot help: the message is dead-lettered at once
        ├── DecodeError              the bytes are not a message we can read
        ├── MessageValidationError   the message decoded but does not fit its schema
        ├── UnknownWorkflowError     the message names a workflow that is not loaded
        ├── UnknownStepError         the message names a step its workflow does not have
        ├── UnroutableEventError     no loaded workflow starts on this event
        ├── TenantError              an event names a tenant its source may not start runs for
        ├── ExpressionEvalError      an expression failed on this run's data
        ├── ToolError                a tool rejected the call or failed permanently
        │   └── ToolArgumentsError   the arguments do not fit the tool's schema
        └── ScopeError               the caller may not make this tool call
    TransientError also has: RateLimitedError (no rate-limit slot in time) and
    CircuitOpenError (the tool's breaker is open). ApprovalRequired (directly under the root)
    is control flow: a write call waits for a person.

Third-party errors are translated where they enter (``raise ... from``), so callers
handle this hierarchy only. Every error carries a one-sentence ``reason`` used in
dead letters: what went wrong and what to do.
"""

from __future__ import annotations

__all__ = [
    "AgentFabricError",
    "ApprovalRequired",
    "CircuitOpenError",
    "ConfigError",
    "DecodeError",
    "ExpressionEvalError",
    "ExpressionSyntaxError",
    "MessageValidationError",
    "PermanentError",
    "PortInUseError",
    "RateLimitedError",
    "RunTimeoutError",
    "ScopeError",
    "SettingsError",
    "StackError",
    "TenantError",
    "ToolArgumentsError",
    "ToolError",
    "TransientError",
    "UnavailableError",
    "UnknownStepError",
    "UnknownWorkflowError",
    "UnroutableEventError",
    "WorkflowError",
]


class AgentFabricError(Exception):
    """Root of every error agentfabric raises."""

    @property
    def reason(self) -> str:
        """One sentence for a dead letter or a CLI message."""
        return str(self)


class ConfigError(AgentFabricError):
    """A developer misconfigured something: fix the configuration and start again."""


class SettingsError(ConfigError):
    """A setting is invalid or unknown."""


class WorkflowError(ConfigError):
    """A workflow definition is invalid; the message names the file, the step and the field."""

    def __init__(
        self, message: str, *, file: str | None = None, step: str | None = None,
        field: str | None = None,
    ) -> None:
        self.file, self.step, self.field, self.detail = file, step, field, message
        where = [p for p in (
            file,
            f"step '{step}'" if step else None,
            f"field '{field}'" if field else None,
        ) if p]
        super().__init__(f"{': '.join(where)}: {message}" if where else message)


class ExpressionSyntaxError(ConfigError):
    """An expression or template does not parse; the message gives the column."""


class PortInUseError(ConfigError):
    """A port the embedded stack needs is taken."""


class StackError(AgentFabricError):
    """The embedded broker or Redis could not be started or stopped."""


class TransientError(AgentFabricError):
    """May succeed if tried again: the message is retried, then dead-lettered."""


class UnavailableError(TransientError):
    """The fabric's own infrastructure (Kafka, Redis) is unavailable: the consumer rewinds
    the record and tries it again later; it does not count as a step attempt."""


class PermanentError(AgentFabricError):
    """Retrying cannot help: the message goes to the dead-letter topic at once."""


class DecodeError(PermanentError):
    """The message bytes cannot be decoded."""


class MessageValidationError(PermanentError):
    """The message decoded but does not fit its schema."""


class UnknownWorkflowError(PermanentError):
    """The message names a workflow that is not loaded."""


class UnknownStepError(PermanentError):
    """The message names a step its workflow does not have."""


class UnroutableEventError(PermanentError):
    """No loaded workflow starts on this event."""


class TenantError(PermanentError):
    """A trigger event names a tenant its source may not start runs for (the body and the
    signed or configured tenant disagree); see docs/tenancy.md."""


class RunTimeoutError(TransientError):
    """A run started by :meth:`agentfabric.client.Client.run` had no result within the
    timeout; the run may still finish: its result can be read later by its run id."""

    def __init__(self, message: str, *, run_id: str, workflow: str) -> None:
        super().__init__(message)
        self.run_id, self.workflow = run_id, workflow


class ExpressionEvalError(PermanentError):
    """An expression failed on this run's data."""


class ToolError(PermanentError):
    """A tool rejected its arguments or failed permanently."""


class ToolArgumentsError(ToolError):
    """A tool call's arguments do not fit the tool's schema; a model is told and may retry."""


class ScopeError(PermanentError):
    """The caller's identity does not allow this call (undeclared tool, missing scope, bad or
    expired token, another tenant)."""


class RateLimitedError(TransientError):
    """A tool's shared rate limit had no slot within the wait allowed."""


class CircuitOpenError(TransientError):
    """A tool's circuit breaker is open: the tool is not called until it recovers."""


class ApprovalRequired(AgentFabricError):
    """Control flow, not a failure: a write call needs a person's approval first. The engine
    parks the run (a hand-off on the approvals topic) and runs the step again once approved;
    the approval is granted to the call's idempotency key."""

    def __init__(self, message: str, *, tool: str, call_key: str,
                 expires_s: float) -> None:
        super().__init__(message)
        self.tool, self.call_key, self.expires_s = tool, call_key, expires_s
