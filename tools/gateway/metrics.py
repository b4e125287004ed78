"""Prometheus metrics of the gateway, on a registry the caller passes (nothing global):

    agentfabric_tool_calls_total{tool,outcome}     calls by how they ended (audit outcomes)
    agentfabric_tool_call_seconds{tool}            latency of a call, all attempts included
    agentfabric_tool_rate_limited_total{tool}      calls that found no rate-limit slot in time
    agentfabric_tool_breaker_state{tool}           0 closed, 1 half-open, 2 open
"""

from __future__ import annotations

from collections import Counter, defaultdict

from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client import Counter as PromCounter

__all__ = ["BREAKER_STATES", "GatewayMetrics"]

BREAKER_STATES = {"closed": 0, "half_open": 1, "half-open": 1, "open": 2}
_OK = {"ok", "fallback"}
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class GatewayMetrics:
    """The gateway's metrics on ``registry`` (a fresh one if not given)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.calls = PromCounter("agentfabric_tool_calls", "Tool calls by outcome.",
                                 ["tool", "outcome"], registry=self.registry)
        self.seconds = Histogram("agentfabric_tool_call_seconds",
                                 "Latency of a tool call (every attempt included).", ["tool"],
                                 buckets=_BUCKETS, registry=self.registry)
        self.rate_limited_calls = PromCounter(
            "agentfabric_tool_rate_limited", "Tool calls that found no rate-limit slot in time.",
            ["tool"], registry=self.registry)
        self.breaker = Gauge("agentfabric_tool_breaker_state",
                             "Circuit breaker state: 0 closed, 1 half-open, 2 open.", ["tool"],
                             registry=self.registry)
        self._outcomes: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self._breaker: dict[str, str] = {}

    def observe(self, tool: str, outcome: str, seconds: float) -> None:
        """One finished call."""
        self.calls.labels(tool, outcome).inc()
        self.seconds.labels(tool).observe(seconds)
        self._outcomes[tool][outcome] += 1

    def rate_limited(self, tool: str) -> None:
        self.rate_limited_calls.labels(tool).inc()

    def breaker_state(self, tool: str, state: str) -> None:
        """``state``: closed, half_open (or half-open) or open."""
        self._breaker[tool] = state.replace("-", "_")
        self.breaker.labels(tool).set(BREAKER_STATES.get(state, 0))

    def breaker_of(self, tool: str) -> str:
        return self._breaker.get(tool, "closed")

    def summary(self) -> list[str]:
        """One line per tool called (or whose breaker moved): calls, failures, breaker."""
        lines = []
        for tool in sorted(set(self._outcomes) | set(self._breaker)):
            outcomes = self._outcomes[tool]
            calls = sum(outcomes.values())
            failures = sum(n for outcome, n in outcomes.items() if outcome not in _OK)
            detail = ", ".join(f"{outcome} {n}" for outcome, n in sorted(outcomes.items()))
            plural = "call" if calls == 1 else "calls"
            lines.append(f"{tool}: {calls} {plural}, {failures} failed, breaker "
                         f"{self.breaker_of(tool)}" + (f" ({detail})" if detail else ""))
        return lines
