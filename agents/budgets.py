"""Token and cost budgets, checked before every model call.

A workflow's ``budget: {max_tokens, max_cost_usd}`` caps each of its runs; the
``tenant_budgets`` setting caps each tenant's spend per window of ``period_s`` seconds
(kept in a :class:`SpendStore`: Redis in a worker, memory in tests). Before a model call
the step's model client (wrapped by :meth:`Budgets.guard`) adds what is spent already (the
run's usage so far, or the tenant's spend in the current window) and an estimate of the
call's prompt: ``len(JSON of messages and tools) / 4`` tokens, priced at the model's input
price. If that reaches past a limit (or the spend is already at it) the call is not made:
:class:`BudgetExceeded` is raised and the engine ends the run with status
``budget_exceeded``. After each call its usage is added to the tenant's window.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agentfabric.errors import PermanentError
from schemas.models import StepMessage, Usage

from .models import ChatResult, ModelClient

if TYPE_CHECKING:
    from .recording import ChatModel

__all__ = ["BudgetExceeded", "BudgetSpec", "BudgetedModels", "Budgets", "Limits",
           "MemorySpendStore", "SpendStore", "TenantLimits", "estimate_tokens"]

CHARS_PER_TOKEN = 4


class BudgetSpec(BaseModel):
    """A workflow's ``budget:`` (per run)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    max_tokens: int | None = Field(default=None, ge=1,
                                   description="Input plus output tokens one run may use.")
    max_cost_usd: float | None = Field(default=None, gt=0,
                                       description="Model cost one run may incur (USD).")

    @model_validator(mode="after")
    def _some_limit(self) -> BudgetSpec:
        if self.max_tokens is None and self.max_cost_usd is None:
            raise ValueError("give max_tokens, max_cost_usd or both")
        return self


class Limits(Protocol):
    @property
    def max_tokens(self) -> int | None: ...

    @property
    def max_cost_usd(self) -> float | None: ...


class TenantLimits(Limits, Protocol):
    """A tenant's budget (the ``tenant_budgets`` setting): limits per ``period_s`` window."""

    @property
    def period_s(self) -> float: ...


class BudgetExceeded(PermanentError):
    """A model call would pass a budget: the engine ends the run with status
    ``budget_exceeded`` and this reason (it is not retried: the budget would still hold)."""


class SpendStore(Protocol):
    """Tokens and cost spent per tenant and window (window = clock // period_s)."""

    async def spent(self, tenant: str, window: int) -> tuple[int, float]: ...

    async def add(self, tenant: str, window: int, period_s: float, tokens: int,
                  cost_usd: float) -> None: ...


class MemorySpendStore:
    def __init__(self) -> None:
        self._spent: dict[tuple[str, int], tuple[int, float]] = {}

    async def spent(self, tenant: str, window: int) -> tuple[int, float]:
        return self._spent.get((tenant, window), (0, 0.0))

    async def add(self, tenant: str, window: int, period_s: float, tokens: int,
                  cost_usd: float) -> None:
        tokens_before, cost_before = self._spent.get((tenant, window), (0, 0.0))
        self._spent[(tenant, window)] = (tokens_before + tokens, cost_before + cost_usd)


def estimate_tokens(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                    ) -> int:
    """A rough count of a request's prompt tokens: its JSON length / 4."""
    text = json.dumps({"messages": messages, "tools": tools or []}, separators=(",", ":"),
                      default=str)
    return len(text) // CHARS_PER_TOKEN


@dataclass
class Budgets:
    """The tenants' limits and their spend; ``clock`` (seconds) places the windows."""

    tenants: Mapping[str, TenantLimits] = field(default_factory=dict)
    store: SpendStore = field(default_factory=MemorySpendStore)
    clock: Callable[[], float] = time.time

    def guard(self, models: ChatModel, budget: BudgetSpec | None, msg: StepMessage,
              client: ModelClient | None) -> ChatModel:
        """``models`` checked against the run's ``budget`` and its tenant's (if any)."""
        tenant = self.tenants.get(msg.tenant)
        if budget is None and tenant is None:
            return models
        return BudgetedModels(models, self, budget, tenant, msg, client)


def _check(what: str, limits: Limits, tokens: int, cost: float, more_tokens: int,
           more_cost: float, model: str, msg: StepMessage) -> None:
    where = f"before a call to model '{model}' at step '{msg.step}'"
    fix = "raise the budget or make the workflow use fewer tokens"
    if limits.max_tokens is not None and (tokens >= limits.max_tokens
                                          or tokens + more_tokens > limits.max_tokens):
        raise BudgetExceeded(
            f"{what} of {limits.max_tokens} tokens would be exceeded {where}: {tokens} "
            f"used, about {more_tokens} more for its prompt; {fix}")
    if limits.max_cost_usd is not None and (cost >= limits.max_cost_usd
                                            or cost + more_cost > limits.max_cost_usd):
        raise BudgetExceeded(
            f"{what} of {limits.max_cost_usd:g} USD would be exceeded {where}: "
            f"{cost:.6f} USD spent, about {more_cost:.6f} USD more for its prompt; {fix}")


@dataclass
class BudgetedModels:
    """A step's model client that checks the budgets before each call."""

    inner: ChatModel
    budgets: Budgets
    run_budget: BudgetSpec | None
    tenant_budget: TenantLimits | None
    message: StepMessage
    client: ModelClient | None
    used: Usage = field(default_factory=Usage)  # by this step so far

    def _input_price(self, model: str) -> float:
        if self.client is None or model not in self.client.registry.models:
            return 0.0
        return self.client.registry.models[model].input_usd_per_mtok

    async def chat(self, model: str, messages: list[dict[str, Any]], *,
                   tools: list[dict[str, Any]] | None = None,
                   response_format: dict[str, Any] | None = None,
                   headers: Mapping[str, str] | None = None) -> ChatResult:
        msg = self.message
        more_tokens = estimate_tokens(messages, tools)
        more_cost = more_tokens * self._input_price(model) / 1_000_000
        if self.run_budget is not None:
            so_far = msg.usage + self.used
            _check("the run's budget", self.run_budget,
                   so_far.input_tokens + so_far.output_tokens, so_far.cost_usd, more_tokens,
                   more_cost, model, msg)
        window = 0
        if self.tenant_budget is not None:
            window = int(self.budgets.clock() // self.tenant_budget.period_s)
            tokens, cost = await self.budgets.store.spent(msg.tenant, window)
            _check(f"the budget of tenant '{msg.tenant}' per {self.tenant_budget.period_s:g} s",
                   self.tenant_budget, tokens, cost, more_tokens, more_cost, model, msg)
        result = await self.inner.chat(model, messages, tools=tools,
                                       response_format=response_format, headers=headers)
        self.used += result.usage
        if self.tenant_budget is not None and not result.journaled:
            # a call answered from the journal was counted when it was made
            spent = result.usage
            await self.budgets.store.add(msg.tenant, window, self.tenant_budget.period_s,
                                         spent.input_tokens + spent.output_tokens,
                                         spent.cost_usd)
        return result
