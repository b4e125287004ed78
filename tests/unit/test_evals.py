"""Eval expectations, reports and baseline comparison."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from agentfabric.errors import ConfigError
from agents.evals import CaseResult, EvalCase, EvalReport, Expectation, check, compare, load_suite
from schemas.models import RunResult, Usage, utc_now

RESULT = RunResult(run_id="r", workflow="w", workflow_version=1, status="completed",
                   output={"segment": "hot", "company": "Contoso Ltd", "score": 80,
                           "tags": ["a", "b"]},
                   usage=Usage(steps=4), path=["a", "b"], event_id="e", source="crm",
                   event_type="x", started_at=utc_now(), finished_at=utc_now())
CASE = EvalCase(name="c", event={}, expect=[Expectation.model_validate({"expression": "true"})])


@pytest.mark.parametrize(("spec", "failure"), [
    ({"equals": {"path": "segment", "value": "hot"}}, None),
    ({"equals": {"path": "segment", "value": "warm"}}, "segment is 'hot', expected 'warm'"),
    ({"equals": {"path": "missing", "value": 1}}, "the output has no 'missing'"),
    ({"equals": {"path": "tags.1", "value": "b"}}, None),
    ({"contains": {"path": "company", "value": "Contoso"}}, None),
    ({"contains": {"path": "tags", "value": "z"}}, "tags (['a', 'b']) does not contain 'z'"),
    ({"schema": {"type": "object", "required": ["score"]}}, None),
    ({"schema": {"type": "object", "required": ["nope"]}}, "schema: 'nope' is a required "
                                                          "property"),
    ({"expression": "output.score >= 70 and run.status == 'completed' and "
                    "len(run.path) == 2"}, None),
    ({"expression": "output.score > 90"}, "expression is false: output.score > 90"),
    ({"expression": "output.nope > 1"}, "expression failed: output has no field 'nope'"),
])
def test_expectations(spec: dict[str, Any], failure: str | None) -> None:
    outcome = check(Expectation.model_validate(spec), RESULT, CASE)
    if failure is None:
        assert outcome is None
    else:
        assert outcome is not None
        assert outcome.startswith(failure), outcome


def test_cases_file_errors_name_the_field(tmp_path: Path) -> None:
    path = tmp_path / "cases.yaml"
    path.write_text("cases:\n  - name: x\n    event: {}\n    expect:\n"
                    "      - {equals: {path: a, value: 1}, contains: {path: a, value: 1}}\n")
    with pytest.raises(ConfigError, match=re.escape(
            f"{path}: field 'cases.0.expect.0': Value error, give exactly one of equals, "
            f"contains, schema, expression")):
        load_suite(path)


def report(*cases: tuple[str, bool, float, float]) -> EvalReport:
    return EvalReport(workflow="w", cases=[
        CaseResult(name=n, passed=p, latency_ms=ms, cost_usd=cost,
                   failures=[] if p else ["it broke"]) for n, p, ms, cost in cases])


def test_report_figures() -> None:
    r = report(*((f"c{i}", i != 0, float(i * 10), 0.001) for i in range(20)))
    summary = r.summary()
    assert summary["pass_rate"] == 0.95
    assert summary["p50_ms"] == 95.0
    assert summary["p95_ms"] == 180.0
    assert summary["cost_usd"] == pytest.approx(0.02)


def test_baseline_regressions() -> None:
    baseline = report(("a", True, 100, 0.01), ("b", True, 100, 0.01), ("c", False, 100, 0.01))
    assert compare(report(("a", True, 110, 0.01), ("b", True, 100, 0.01),
                          ("c", True, 90, 0.01)), baseline) == []
    found = compare(report(("a", False, 300, 0.02), ("b", True, 300, 0.02),
                           ("c", False, 300, 0.02)), baseline)
    assert found == [
        "case 'a' passed in the baseline and fails now: it broke",
        "pass rate fell from 67% to 33%",
        "p95 latency rose from 100 ms to 300 ms (more than 25%)",
        "cost rose from $0.030000 to $0.060000 (more than 10%)",
    ]
