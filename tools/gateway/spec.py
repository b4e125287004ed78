"""A tool's declaration and its policies: what a catalog entry (YAML or Python) says.

These models are the contract between the catalog (which builds them), the gateway stages
(which read them) and ``agentfabric tools list`` (which shows them).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "TOOL_NAME_PATTERN",
    "ApprovalPolicy",
    "BreakerPolicy",
    "FallbackPolicy",
    "HttpBinding",
    "RateLimitPolicy",
    "RetryPolicy",
    "ToolSpec",
]

TOOL_NAME_PATTERN = r"^[a-z][a-z0-9_.-]{0,127}$"
_RATE = re.compile(r"^\s*(\d+)\s*(?:/|per)\s*(\d+)?\s*(second|minute|hour|day)s?\s*$")
_UNIT_S = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RetryPolicy(_Strict):
    """Transient failures (timeouts, connection errors, 5xx, 429) are tried again inside the
    call with jittered exponential backoff; permanent ones are not. ``attempts`` counts the
    first try."""

    attempts: int = Field(default=3, ge=1, le=20)
    backoff_s: float = Field(default=0.2, ge=0, le=60)
    max_backoff_s: float = Field(default=5.0, ge=0, le=600)


class RateLimitPolicy(_Strict):
    """At most ``limit`` calls per ``period_s`` per tool and tenant, across every replica.
    A call over the limit waits for a slot up to ``max_wait_s``, then fails as transient."""

    limit: int = Field(ge=1)
    period_s: float = Field(gt=0)
    max_wait_s: float = Field(default=5.0, ge=0, le=600)

    @classmethod
    def parse(cls, text: str, max_wait_s: float = 5.0) -> RateLimitPolicy:
        """``"20/second"``, ``"100 per minute"``, ``"5/10 seconds"``."""
        match = _RATE.match(text)
        if match is None:
            raise ValueError(f"'{text}' is not a rate; write e.g. '20/second' or "
                             f"'100 per minute'")
        count, every, unit = match.groups()
        return cls(limit=int(count), period_s=int(every or 1) * _UNIT_S[unit],
                   max_wait_s=max_wait_s)

    @property
    def text(self) -> str:
        return f"{self.limit}/{self.period_s:g}s"


class BreakerPolicy(_Strict):
    """Per tool, shared by every replica: ``failures`` transient failures within
    ``window_s`` open the breaker; after ``open_s`` it is half-open and lets at most
    ``half_open_probes`` calls through at once; ``half_open_probes`` successes in a row close
    it, one failure opens it again."""

    failures: int = Field(default=5, ge=1, le=10_000)
    window_s: float = Field(default=30.0, gt=0)
    open_s: float = Field(default=10.0, gt=0)
    half_open_probes: int = Field(default=1, ge=1, le=100)


class ApprovalPolicy(_Strict):
    """A call whose arguments make ``when`` true waits for a person (``approvals`` commands).
    ``when`` is an expression over ``args`` (and ``tenant``), e.g. ``args.amount > 10000``;
    ``reason`` a template; unanswered requests expire after ``expires_s``."""

    when: str = Field(default="true", min_length=1)
    reason: str = Field(default="{{ tool }} needs approval")
    expires_s: float = Field(default=24 * 3600.0, gt=0)


class FallbackPolicy(_Strict):
    """When the call still fails after its retries (or its breaker is open): call ``tool``
    with the same arguments, or answer ``answer``. The run's result says it was degraded."""

    tool: str | None = Field(default=None, pattern=TOOL_NAME_PATTERN)
    answer: Any = None

    @model_validator(mode="after")
    def _one(self) -> FallbackPolicy:
        if (self.tool is None) == (self.answer is None):
            raise ValueError("a fallback names a tool or gives an answer (exactly one)")
        return self


class HttpBinding(_Strict):
    """An HTTP tool: ``method`` ``path`` on the service named ``service`` (its base URL comes
    from the ``service_urls`` setting), or on an absolute ``url``. Path parameters are
    ``{name}`` placeholders filled from the arguments; the other arguments go in the query
    (GET, DELETE) or as a JSON body. Every request sends ``Idempotency-Key`` and
    ``X-Tenant``."""

    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "GET"
    service: str | None = None
    url: str | None = None
    path: str = "/"
    headers: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _where(self) -> HttpBinding:
        if (self.service is None) == (self.url is None):
            raise ValueError("an http tool names a service or gives a url (exactly one)")
        return self


class ToolSpec(_Strict):
    """One tool as the catalog declares it."""

    name: str = Field(pattern=TOOL_NAME_PATTERN)
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object"},
                                       description="JSON schema of the arguments (what the "
                                                   "model sees for function calling).")
    access: Literal["read", "write"] = "read"
    timeout_s: float | None = Field(default=None, gt=0, le=600)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    rate_limit: RateLimitPolicy | None = None
    breaker: BreakerPolicy = Field(default_factory=BreakerPolicy)
    scopes: list[str] = Field(default_factory=list,
                              description="Scopes a caller's token must carry.")
    approval: ApprovalPolicy | None = None
    fallback: FallbackPolicy | None = None
    max_result_bytes: int = Field(default=64 * 1024, ge=256, le=16 * 1024 * 1024)
    redact: list[str] = Field(default_factory=list, description="Result fields (dotted paths) "
                                                                "replaced by '[redacted]'.")
    http: HttpBinding | None = None
    python: str | None = Field(default=None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
                               description="module:function implementing the tool.")
    source: str = Field(default="", description="Where the declaration came from.")

    @model_validator(mode="before")
    @classmethod
    def _rate_text(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("rate_limit"), str):
            data = {**data, "rate_limit": RateLimitPolicy.parse(data["rate_limit"])}
        return data

    @model_validator(mode="after")
    def _one_implementation(self) -> ToolSpec:
        if self.http is not None and self.python is not None:
            raise ValueError("a tool is an http tool or a python tool, not both")
        if self.fallback is not None and self.fallback.tool == self.name:
            raise ValueError("a tool cannot be its own fallback")
        return self
