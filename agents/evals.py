"""Eval cases, expectations and reports (the pure part; running them is
``agentfabric.evals``).

A cases file::

    workflow: lead_enrichment          # optional: the CLI argument wins
    cases:
      - name: big software lead is hot
        event: {event_type: lead.created, payload: {...}}   # source defaults to the trigger's
        expect:
          - equals: {path: segment, value: hot}
          - contains: {path: company, value: Contoso}
          - schema: {type: object, required: [score]}
          - expression: "output.score >= 70 and run.status == 'completed'"

Paths are dotted into the run's output (``""`` is the whole output). Expressions use the
workflow expression language with ``output``, ``run`` (status, path, usage) and ``case``.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agentfabric.errors import AgentFabricError, ConfigError
from schemas.models import RunResult, canonical_json

from .expr import Expression, compile_expression

__all__ = ["CaseResult", "EvalCase", "EvalReport", "EvalSuite", "Expectation", "check",
           "compare", "load_suite"]


class Expectation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    equals: dict[str, Any] | None = None
    contains: dict[str, Any] | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    expression: str | None = None
    _compiled: Expression | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Expectation:
        given = [k for k in ("equals", "contains", "schema_", "expression")
                 if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of equals, contains, schema, expression")
        for kind in ("equals", "contains"):
            spec = getattr(self, kind)
            if spec is not None and set(spec) != {"path", "value"}:
                raise ValueError(f"{kind} takes path and value")
        if self.schema_ is not None:
            jsonschema.Draft202012Validator.check_schema(self.schema_)
        if self.expression is not None:
            self._compiled = compile_expression(self.expression)
        return self


class EvalCase(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    event: dict[str, Any]
    expect: list[Expectation] = Field(min_length=1)


class EvalSuite(BaseModel):
    model_config = ConfigDict(extra="forbid")
    workflow: str | None = None
    cases: list[EvalCase] = Field(min_length=1)


def load_suite(path: Path) -> EvalSuite:
    try:
        return EvalSuite.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the cases ({exc})") from exc
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"{path}: field '{where}': {err['msg']}") from exc
    except AgentFabricError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def _at(output: Any, path: str) -> Any:
    value = output
    for part in [p for p in path.split(".") if p]:
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.lstrip("-").isdigit():
            value = value[int(part)]
        else:
            raise KeyError(path)
    return value


def check(expectation: Expectation, result: RunResult, case: EvalCase) -> str | None:
    """None if the expectation holds, else what is wrong."""
    output = result.output
    try:
        if expectation.equals is not None:
            actual = _at(output, expectation.equals["path"])
            wanted = expectation.equals["value"]
            return None if canonical_json(actual) == canonical_json(wanted) else \
                f"{expectation.equals['path'] or 'output'} is {actual!r}, expected {wanted!r}"
        if expectation.contains is not None:
            actual = _at(output, expectation.contains["path"])
            wanted = expectation.contains["value"]
            holds = (wanted in actual) if isinstance(actual, str | list | dict) else False
            where = expectation.contains["path"] or "output"
            return None if holds else f"{where} ({actual!r}) does not contain {wanted!r}"
    except KeyError as exc:
        return f"the output has no {exc.args[0]!r}"
    if expectation.schema_ is not None:
        errors = list(jsonschema.Draft202012Validator(expectation.schema_).iter_errors(output))
        return None if not errors else f"schema: {errors[0].message}"
    assert expectation._compiled is not None
    scope = {"output": output, "case": {"name": case.name},
             "run": {"status": result.status, "path": result.path,
                     "usage": result.usage.model_dump()}}
    try:
        return None if expectation._compiled.evaluate(scope) else \
            f"expression is false: {expectation.expression}"
    except AgentFabricError as exc:
        return f"expression failed: {exc}"


class CaseResult(BaseModel):
    name: str
    passed: bool
    failures: list[str] = Field(default_factory=list)
    latency_ms: float | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    run_id: str | None = None


class EvalReport(BaseModel):
    workflow: str
    cases: list[CaseResult]

    @property
    def pass_rate(self) -> float:
        return sum(c.passed for c in self.cases) / len(self.cases)

    def _latencies(self) -> list[float]:
        return sorted(c.latency_ms for c in self.cases if c.latency_ms is not None)

    @property
    def p50_ms(self) -> float | None:
        values = self._latencies()
        return statistics.median(values) if values else None

    @property
    def p95_ms(self) -> float | None:
        values = self._latencies()
        return values[max(0, round(0.95 * len(values)) - 1)] if values else None

    def summary(self) -> dict[str, Any]:
        return {"workflow": self.workflow, "cases": len(self.cases),
                "pass_rate": round(self.pass_rate, 4),
                "p50_ms": None if self.p50_ms is None else round(self.p50_ms, 1),
                "p95_ms": None if self.p95_ms is None else round(self.p95_ms, 1),
                "input_tokens": sum(c.input_tokens for c in self.cases),
                "output_tokens": sum(c.output_tokens for c in self.cases),
                "cost_usd": round(sum(c.cost_usd for c in self.cases), 8)}


def compare(report: EvalReport, baseline: EvalReport, *, latency_tolerance: float = 0.25,
            cost_tolerance: float = 0.10) -> list[str]:
    """Regressions of ``report`` against ``baseline``, one sentence each."""
    found = []
    before = {c.name: c for c in baseline.cases}
    for case in report.cases:
        old = before.get(case.name)
        if old is not None and old.passed and not case.passed:
            found.append(f"case '{case.name}' passed in the baseline and fails now: "
                         f"{'; '.join(case.failures)}")
    if report.pass_rate < baseline.pass_rate:
        found.append(f"pass rate fell from {baseline.pass_rate:.0%} to {report.pass_rate:.0%}")
    new, old_p95 = report.p95_ms, baseline.p95_ms
    if new is not None and old_p95 and new > old_p95 * (1 + latency_tolerance):
        found.append(f"p95 latency rose from {old_p95:.0f} ms to {new:.0f} ms "
                     f"(more than {latency_tolerance:.0%})")
    new_cost, old_cost = report.summary()["cost_usd"], baseline.summary()["cost_usd"]
    if old_cost and new_cost > old_cost * (1 + cost_tolerance):
        found.append(f"cost rose from ${old_cost:.6f} to ${new_cost:.6f} "
                     f"(more than {cost_tolerance:.0%})")
    return found
