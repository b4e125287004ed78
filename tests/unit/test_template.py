"""Templated mappings: native vs string rendering, recursion, locations and errors."""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable
from typing import Any

import pytest

from agentfabric.errors import ExpressionEvalError, ExpressionSyntaxError
from agents.expr import Expression
from agents.template import Template, TemplateSyntaxError, compile_template

CTX: dict[str, Any] = {
    "input": {"name": "Ann", "score": 7, "ratio": 0.5, "tags": ["a", "b"], "ok": True,
              "none": None, "address": {"city": "Oslo"}},
    "steps": {"enrich": {"employees": 150}},
}


def exact(message: str) -> str:
    return f"^{re.escape(message)}$"


def render(value: Any) -> Any:
    return compile_template(value).render(CTX)


@pytest.mark.parametrize(("value", "expected"), [
    # exactly one {{ expr }}: the native value
    ("{{ input.score }}", 7), ("{{ input.ratio }}", 0.5), ("{{ input.ok }}", True),
    ("{{ input.none }}", None), ("{{ input.tags }}", ["a", "b"]),
    ("{{ input.address }}", {"city": "Oslo"}), ("{{ input.name }}", "Ann"),
    ("  {{input.score * 2}}  ", 14), ("\n{{ input.score }}\n", 7), ("{{ [1, 'x'] }}", [1, "x"]),
    ("{{ '}}' }}", "}}"), ("{{ \"{{\" }}", "{{"),
    # anything else: a string with each part's text form
    ("score: {{ input.score }}", "score: 7"), ("{{ input.score }}!", "7!"),
    ("{{ input.score }}{{ input.score }}", "77"), ("{{ input.score }} {{ input.ratio }}", "7 0.5"),
    ("[{{ input.none }}]", "[]"), ("ok={{ input.ok }}", "ok=true"),
    ("ok={{ not input.ok }}", "ok=false"), ("tags={{ input.tags }}", 'tags=["a","b"]'),
    ("at {{ input.address }}", 'at {"city":"Oslo"}'),
    ("Hi {{ upper(input.name) }}, {{ steps.enrich.employees }} staff",
     "Hi ANN, 150 staff"),
    ("line one\n{{ input.name }}\n", "line one\nAnn\n"),
    ("{{ 'a' }}-{{ 'b' }}", "a-b"),
    # no template parts: unchanged
    ("plain text", "plain text"), ("", ""), ("a }} b", "a }} b"), ("{ single }", "{ single }"),
    (7, 7), (2.5, 2.5), (True, True), (None, None),
])
def test_render(value: Any, expected: Any) -> None:
    result = render(value)
    assert result == expected
    assert type(result) is type(expected)


def test_nested_dicts_and_lists() -> None:
    template = compile_template({
        "score": "{{ input.score }}",
        "label": "{{ input.name }} ({{ input.score }})",
        "fixed": {"n": 1, "flag": False, "nothing": None, "text": "as is"},
        "lines": [
            {"amount": "{{ input.score * 10 }}"},
            "{{ input.tags[0] }}",
            ["{{ input.ok }}", 3],
        ],
        "{{ keys are not templates }}": "{{ input.ratio }}",
        4: "{{ input.none }}",
    })
    assert template.render(CTX) == {
        "score": 7,
        "label": "Ann (7)",
        "fixed": {"n": 1, "flag": False, "nothing": None, "text": "as is"},
        "lines": [{"amount": 70}, "a", [True, 3]],
        "{{ keys are not templates }}": 0.5,
        4: None,
    }


def test_tuples_render_as_lists_and_a_list_root_works() -> None:
    assert render(("{{ input.score }}", "x")) == [7, "x"]
    assert render(["{{ input.name }}", {"a": "{{ 1 + 1 }}"}]) == ["Ann", {"a": 2}]


def test_rendering_builds_fresh_containers() -> None:
    template = compile_template({"fixed": [1, {"a": 2}]})
    first = template.render({})
    first["fixed"][1]["a"] = 99
    assert template.render({}) == {"fixed": [1, {"a": 2}]}


def test_rendering_again_with_another_context() -> None:
    template = compile_template({"name": "{{ input.name }}", "msg": "hi {{ input.name }}"})
    assert template.render(CTX) == {"name": "Ann", "msg": "hi Ann"}
    assert template.render({"input": {"name": "Bo"}}) == {"name": "Bo", "msg": "hi Bo"}


def test_expressions_with_their_locations() -> None:
    template = compile_template({
        "score": "{{ input.score }}",
        "lines": [1, 2, {"amount": "{{ 2 * input.score }}"}],
        "a": {"b": "x {{ input.name }} y {{ input.ratio }}"},
        "plain": "nothing here",
        "my key": "{{ steps.enrich.employees }}",
    })
    assert [(where, e.text) for where, e in template.expressions()] == [
        ("score", "input.score"),
        ("lines[2].amount", "2 * input.score"),
        ("a.b", "input.name"),
        ("a.b", "input.ratio"),
        ("my key", "steps.enrich.employees"),
    ]
    assert all(isinstance(e, Expression) for _, e in template.expressions())


@pytest.mark.parametrize(("value", "expected"), [
    ("{{ input.name }}", [("", "input.name")]),
    ("a {{ 1 }} b {{ 2 }}", [("", "1"), ("", "2")]),
    (["{{ 1 }}", ["x", "{{ 2 }}"]], [("[0]", "1"), ("[1][1]", "2")]),
    ({"a": [{"b": ["{{ 3 }}"]}]}, [("a[0].b[0]", "3")]),
    ({"plain": 1, "none": None}, []),
    ("no templates", []),
    (42, []),
])
def test_expression_locations(value: Any, expected: list[tuple[str, str]]) -> None:
    template = compile_template(value)
    assert [(where, e.text) for where, e in template.expressions()] == expected


def test_references_are_the_union_over_all_expressions() -> None:
    template = compile_template({
        "a": "{{ input.name }} {{ lower(input.email) }}",
        "b": ["{{ steps.enrich.employees > 100 }}", "{{ input.name }}"],
        "c": "{{ 1 + 1 }}",
        "d": "static",
    })
    assert template.references() == {
        ("input", "name"), ("input", "email"), ("steps", "enrich", "employees"),
    }
    assert compile_template({"x": 1}).references() == set()


def test_template_object() -> None:
    template = compile_template({"a": "{{ input.score }}", "b": "x{{ 1 }}"})
    assert isinstance(template, Template)
    assert repr(template) == "Template(['input.score', '1'])"


@pytest.mark.parametrize(("value", "message"), [
    ("Hello {{ input.name", "unterminated '{{' at column 7 in \"Hello {{ input.name\""),
    ("{{", "unterminated '{{' at column 1 in \"{{\""),
    ("{{ a }} and {{ b }", "unterminated '{{' at column 13 in \"{{ a }} and {{ b }\""),
    ("Dear\nHello {{ input.name", "unterminated '{{' at line 2, column 7 in \"{{ input.name\""),
    ("x" * 300 + " {{ a" + "y" * 100,
     "unterminated '{{' at column 302 in \"{{ a" + "y" * 36 + "...\""),
])
def test_unterminated_braces(value: str, message: str) -> None:
    with pytest.raises(ExpressionSyntaxError, match=exact(f"{message}: close it with '}}}}'")):
        compile_template(value)


def test_unterminated_braces_deep_inside_a_value() -> None:
    with pytest.raises(ExpressionSyntaxError, match=re.escape("unterminated '{{' at column 1")):
        compile_template({"a": [{"b": "{{ oops"}]})


@pytest.mark.parametrize(("value", "message"), [
    ("{{ input.score + }}", 'expected a value after \'+\' at column 14 in "input.score +"'),
    ("total: {{ a $ b }}", 'unexpected character \'$\' at column 3 in "a $ b"'),
    ("{{ (a + b }}", 'unclosed \'(\' opened at column 1 in "(a + b"'),
    ("{{ }}", 'expected a value at column 1 in ""'),
    ("{{ 'abc }}", 'unterminated string starting at column 1 in "\'abc"'),
    ({"k": ["{{ nope(1) }}"]},
     "unknown function 'nope' at column 1 in \"nope(1)\"; known functions: "),
])
def test_expression_syntax_errors_propagate_unprefixed(value: Any, message: str) -> None:
    with pytest.raises(ExpressionSyntaxError, match="^" + re.escape(message)):
        compile_template(value)


def test_evaluation_errors_propagate() -> None:
    template = compile_template({"a": "x {{ input.nope }}"})
    message = "input has no field 'nope' (it has: name, score, ratio, tags, ok, none, address)"
    with pytest.raises(ExpressionEvalError, match=exact(f'{message} in "input.nope"')):
        template.render(CTX)
    with pytest.raises(ExpressionEvalError, match=exact('cannot add string and number in "a + 1"')):
        compile_template("{{ a + 1 }}").render({"a": "s"})


@pytest.mark.parametrize(("value", "location"), [
    ("{{ 1 + }}", ""),
    ("total: {{ a $ b }}", ""),
    ({"a": {"b": "{{ 1 + }}"}}, "a.b"),
    ({"a": {"b": "x {{ ok }} y {{ (1 }}"}}, "a.b"),
    ({"lines": [1, 2, {"amount": "{{ 2 * }}"}]}, "lines[2].amount"),
    (["{{ 1 }}", ["x", "{{ nope(1) }}"]], "[1][1]"),
    (("{{ 1 }}", "{{ ) }}"), "[1]"),
    ({"my key": {4: "{{ 'abc }}"}}, "my key.4"),
    ({"ok": "{{ 1 }}", "bad": "Hello {{ input.name"}, "bad"),
    ({"a": [{"b": "{{ oops"}]}, "a[0].b"),
])
def test_syntax_errors_name_their_location(value: Any, location: str) -> None:
    with pytest.raises(TemplateSyntaxError) as info:
        compile_template(value)
    assert info.value.location == location
    assert isinstance(info.value, ExpressionSyntaxError)


@pytest.mark.parametrize("shape", [
    lambda part: part,
    lambda part: {"a": {"b": part}},
    lambda part: {"lines": [1, {"amount": "x " + part}]},
    lambda part: [["x", part]],
    lambda part: {7: ("y", {"z z": part})},
])
def test_syntax_error_location_is_spelled_like_expressions(shape: Callable[[str], Any]) -> None:
    [(where, _)] = compile_template(shape("{{ 1 }}")).expressions()
    with pytest.raises(TemplateSyntaxError) as info:
        compile_template(shape("{{ 1 + }}"))
    assert info.value.location == where


def test_template_syntax_error_message_is_the_expressions() -> None:
    with pytest.raises(TemplateSyntaxError) as info:
        compile_template({"a": {"b": "{{ 1 + }}"}})
    assert str(info.value) == "expected a value after '+' at column 4 in \"1 +\""
    assert isinstance(info.value.__cause__, ExpressionSyntaxError)
    assert not isinstance(info.value.__cause__, TemplateSyntaxError)
    copied = pickle.loads(pickle.dumps(info.value))
    assert (str(copied), copied.location) == (str(info.value), "a.b")
