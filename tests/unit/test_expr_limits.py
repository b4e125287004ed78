"""Bounded expressions on untrusted data: linear-time regexes, sizes refused before anything is
built, and a clear error for values nested too deeply."""

from __future__ import annotations

import re
import sys
import tracemalloc
from typing import Any

import pytest
import yaml

from agentfabric.errors import (
    ExpressionEvalError,
    ExpressionSyntaxError,
    MessageValidationError,
    PermanentError,
    WorkflowError,
)
from agents.expr import MAX_NESTING, compile_expression, to_text
from agents.expr_values import MAX_ITEMS, MAX_STRING
from agents.loader import parse_workflow
from agents.template import TemplateSyntaxError, compile_template
from schemas.models import canonical_json

RE2_HINT = "patterns use RE2 syntax, which has no backreferences or lookaround"


def exact(message: str) -> str:
    return f"^{re.escape(message)}$"


def run(text: str, context: dict[str, Any]) -> Any:
    return compile_expression(text).evaluate(context)


def nested(levels: int) -> dict[str, Any]:
    """``{"a": {"a": ... {}}}`` with ``levels`` objects, built without recursion."""
    root: dict[str, Any] = {}
    node = root
    for _ in range(levels - 1):
        node["a"] = {}
        node = node["a"]
    return root


def nested_list(levels: int) -> list[Any]:
    root: list[Any] = []
    node = root
    for _ in range(levels - 1):
        node.append([])
        node = node[0]
    return root


# ---------------------------------------------------------------- matches() on RE2


@pytest.mark.timeout(5)
def test_catastrophic_pattern_is_linear() -> None:
    # a backtracking engine takes minutes on 34 characters (it doubles with each one)
    expression = compile_expression("matches(s, '(a+)+$')")
    for subject in ("a" * 34 + "!", "a" * 9_999 + "!"):
        assert expression.evaluate({"s": subject}) is False
    assert expression.evaluate({"s": "a" * 34}) is True
    assert run("matches(s, p)", {"s": "x" * 9_999 + "!", "p": "(x+x+)+y"}) is False


@pytest.mark.parametrize(("pattern", "reason"), [
    (r"(a)\1", r"invalid escape sequence: \1"),
    ("(?=a)b", "invalid perl operator: (?="),
    ("(?<=a)b", "invalid perl operator: (?<="),
    ("(?!a)b", "invalid perl operator: (?!"),
    ("[", "missing ]: ["),
])
def test_unsupported_pattern_from_data_names_re2(pattern: str, reason: str) -> None:
    message = f"matches() got an invalid regular expression ({reason}); {RE2_HINT}"
    with pytest.raises(ExpressionEvalError, match=exact(f'{message} in "matches(s, p)"')):
        run("matches(s, p)", {"s": "ab", "p": pattern})


def test_unsupported_literal_pattern_fails_when_compiled() -> None:
    text = r"matches(input.s, '(a)\\1')"
    message = (r"matches() got an invalid regular expression (invalid escape sequence: \1) "
               f'at column 18 in "{text}"; {RE2_HINT}')
    with pytest.raises(ExpressionSyntaxError, match=exact(message)):
        compile_expression(text)
    with pytest.raises(ExpressionSyntaxError, match="at most 1000 characters at column 12"):
        compile_expression("matches(s, '" + "a" * 1001 + "')")


def test_unsupported_literal_pattern_fails_when_the_workflow_loads() -> None:
    data = yaml.safe_load("""
name: demo_flow
version: 1
trigger: {source: crm, event_types: [lead.created]}
steps:
  - id: first
    kind: transform
    output: {vip: "{{ matches(input.email, '(?<=@)vip') }}"}
""")
    with pytest.raises(WorkflowError, match=re.escape(
            "wf.yaml: step 'first': field 'output.vip': matches() got an invalid regular "
            "expression (invalid perl operator: (?<=) at column 22")):
        parse_workflow(data, "wf.yaml")


def test_valid_patterns_still_match() -> None:
    context = {"t": "VP of Sales", "e": "ann@example.com"}
    assert run(r"matches(lower(t), '(^| )(vp|head)( |$)')", context) is True
    assert run(r"matches(e, '^[^@\\s]+@example\\.com$')", context) is True
    assert run(r"matches(e, '(?i)EXAMPLE')", context) is True
    assert run(r"matches('Ünïcode', '^\\p{L}+$')", context) is True


# ---------------------------------------------------------------- sizes, before building


def peak_of(text: str, context: dict[str, Any]) -> tuple[int, str]:
    """The error and the peak bytes allocated while evaluating (the context is built before)."""
    expression = compile_expression(text)
    tracemalloc.start()
    try:
        with pytest.raises(ExpressionEvalError) as info:
            expression.evaluate(context)
        return tracemalloc.get_traced_memory()[1], str(info.value)
    finally:
        tracemalloc.stop()


BIG = "x" * 600_000
REFS = "[" + ",".join(["s"] * 900) + "]"  # 900 references: 540 MB once turned into text
SHARED = [BIG] * 900  # the same from the context


@pytest.mark.parametrize(("text", "context", "message"), [
    ("join(l, s)", {"l": [""] * 1001, "s": BIG},
     "join() would build a string longer than 1000000 characters"),
    (f"join({REFS}, '')", {"s": BIG},
     "join() would build a string longer than 1000000 characters"),
    ("join([l], '')", {"l": SHARED},
     "join() would build a string longer than 1000000 characters"),
    (f"str({REFS})", {"s": BIG}, "str() would build a string longer than 1000000 characters"),
    ("str([l, [l, l]])", {"l": SHARED},
     "str() would build a string longer than 1000000 characters"),
    ("s + s", {"s": BIG}, "'+' would build a string longer than 1000000 characters"),
    ("l + l", {"l": [0] * 600_000}, "'+' would build a list longer than 100000 items"),
    ("replace(s, 'x', s)", {"s": BIG},
     "replace() would build a string longer than 1000000 characters"),
    ("split(s, 'x')", {"s": BIG}, "split() would build a list longer than 100000 items"),
    ("split(s)", {"s": "x " * 300_000}, "split() would build a list longer than 100000 items"),
    ("pluck(l, 'a')", {"l": [{"a": 1}] * 300_000},
     "pluck() would build a list longer than 100000 items"),
    ("lower(s)", {"s": "X" * 1_000_001},
     "lower() would build a string longer than 1000000 characters"),
    ("upper(s)", {"s": "ß" * 600_000},  # 'ß' is 'SS' in upper case: built, then refused
     "upper() would build a string longer than 1000000 characters"),
])
def test_sizes_are_refused_before_building(text: str, context: dict[str, Any],
                                           message: str) -> None:
    peak, error = peak_of(text, context)
    assert error == f'{message} in "{text}"'
    assert peak < 20_000_000, f"{peak / 1e6:.1f} MB allocated"


def test_template_text_is_refused_before_joining() -> None:
    template = compile_template("a: {{ s }} b: {{ s }}")
    tracemalloc.start()
    try:
        with pytest.raises(ExpressionEvalError, match=exact(
                'the template would build a string longer than 1000000 characters in "s"')):
            template.render({"s": BIG})
        assert tracemalloc.get_traced_memory()[1] < 20_000_000
    finally:
        tracemalloc.stop()
    refs = compile_template(f"all: {{{{ {REFS} }}}}")
    with pytest.raises(ExpressionEvalError, match=exact(
            "interpolating the value would build a string longer than 1000000 characters"
            f' in "{REFS}"')):
        refs.render({"s": BIG})


def test_results_at_the_limits_are_built() -> None:
    half = "x" * (MAX_STRING // 2)
    assert len(run("s + s", {"s": half})) == MAX_STRING
    assert len(run("join([s, s], '')", {"s": half})) == MAX_STRING
    assert len(run("join(l, ',')", {"l": ["x"] * (MAX_ITEMS // 2)})) == MAX_ITEMS - 1
    assert len(run("split(s)", {"s": " a" * MAX_ITEMS + " "})) == MAX_ITEMS
    assert len(run("split(s, ',')", {"s": "," * (MAX_ITEMS - 1)})) == MAX_ITEMS
    assert len(run("str(l)", {"l": ["x" * 1000] * 990})) == 990 * 1003 + 1
    assert len(compile_template("{{ s }}{{ s }}").render({"s": half})) == MAX_STRING
    assert run("join([[1, 'a'], null, o], ' ')", {"o": {"k": None}}) == '[1,"a"]  {"k":null}'


def test_pluck_stops_at_the_first_missing_key() -> None:
    items = [{"a": {"b": 1}}, {"a": 2}, {}] * 30_000
    path = "a.b" + ".c" * 100_000
    assert run("pluck(l, p)", {"l": items, "p": "a.b"})[:3] == [1, None, None]
    assert run("pluck(l, p)", {"l": items, "p": path})[:3] == [None, None, None]


# ---------------------------------------------------------------- depth


DEEP = nested(10_000)


@pytest.mark.parametrize(("text", "message"), [
    ("str(d)", f"str() cannot handle a value nested more than {MAX_NESTING} levels deep"),
    ("join([d], ',')", f"join() cannot handle a value nested more than {MAX_NESTING} levels deep"),
    ("d == e", f"cannot compare values nested more than {MAX_NESTING} levels deep"),
    ("d in [e]", f"cannot compare values nested more than {MAX_NESTING} levels deep"),
    ("contains([e], d)", f"cannot compare values nested more than {MAX_NESTING} levels deep"),
])
def test_deep_values_give_a_clear_error(text: str, message: str) -> None:
    context = {"d": DEEP, "e": nested(10_000)}
    with pytest.raises(ExpressionEvalError, match=exact(f'{message} in "{text}"')):
        run(text, context)


def test_deep_values_pass_through_and_can_be_read() -> None:
    assert run("d", {"d": DEEP}) is DEEP
    assert run("len(d.a.a)", {"d": DEEP}) == 1
    assert compile_template({"x": "{{ d }}"}).render({"d": DEEP}) == {"x": DEEP}


def test_the_nesting_limit_is_inclusive() -> None:
    assert to_text(nested_list(MAX_NESTING)) == "[" * MAX_NESTING + "]" * MAX_NESTING
    assert run("a == b", {"a": nested(MAX_NESTING), "b": nested(MAX_NESTING)}) is True
    with pytest.raises(ExpressionEvalError, match="nested more than 100 levels"):
        to_text(nested_list(MAX_NESTING + 1))
    with pytest.raises(ExpressionEvalError, match="nested more than 100 levels"):
        run("a == b", {"a": nested(MAX_NESTING + 1), "b": nested(MAX_NESTING + 1)})


def test_template_interpolating_a_deep_value() -> None:
    template = compile_template("value: {{ d }}")
    with pytest.raises(ExpressionEvalError, match=exact(
            f"interpolating the value cannot handle a value nested more than {MAX_NESTING}"
            ' levels deep in "d"')):
        template.render({"d": DEEP})


def test_template_source_nested_too_deeply() -> None:
    with pytest.raises(TemplateSyntaxError, match=exact(
            f"the value nests deeper than {MAX_NESTING} levels")) as info:
        compile_template({"x": nested_list(MAX_NESTING + 5)})
    assert info.value.location.startswith("x[0][0]")


def test_running_out_of_stack_is_an_evaluation_error() -> None:
    expression = compile_expression("a == b")
    context = {"a": nested(MAX_NESTING), "b": nested(MAX_NESTING)}
    depth = 0
    frame = sys._getframe()
    while frame.f_back is not None:
        frame, depth = frame.f_back, depth + 1
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(depth + 60)  # fewer frames than comparing 100 levels takes
    try:
        with pytest.raises(ExpressionEvalError, match=exact(
                f"the value is nested too deeply to evaluate (the limit is {MAX_NESTING} levels)"
                ' in "a == b"')):
            expression.evaluate(context)
    finally:
        sys.setrecursionlimit(limit)


@pytest.mark.parametrize("dump", [canonical_json, lambda v: canonical_json({"x": v})])
def test_json_of_a_deep_value_is_a_permanent_error(dump: Any) -> None:
    with pytest.raises(MessageValidationError, match="nested too deeply to write") as info:
        dump(DEEP)
    assert isinstance(info.value, PermanentError)


def test_error_messages_quote_data_briefly() -> None:
    long = "b" * 5_000
    with pytest.raises(ExpressionEvalError, match=exact(
            f'int() cannot convert "{"x" * 80}"... to a number in "int(s)"')):
        run("int(s)", {"s": "x" * 5_000})
    with pytest.raises(ExpressionEvalError, match=exact(
            f"d has no field '{'b' * 80}...' (it has: {'a' * 80}...) in \"d[k]\"")):
        run("d[k]", {"d": {"a" * 5_000: 1}, "k": long})
    with pytest.raises(ExpressionEvalError, match=exact(
            f'd["{"b" * 80}"...] is a number, not an object, so it has no field \'x\''
            ' in "d[k].x"')):
        run("d[k].x", {"d": {long: 1}, "k": long})


def test_numbers_too_long_to_write_are_refused() -> None:
    with pytest.raises(ExpressionEvalError, match=exact(
            'the result of sum() is too large in "sum(l)"')):
        run("sum(l)", {"l": [10**4299] * 20})
    with pytest.raises(ExpressionEvalError, match=exact(
            'str() cannot write a number this large in "str(n)"')):
        run("str(n)", {"n": 10**5000})
