"""The expression language: grammar, evaluation, functions, limits and exact error messages."""

from __future__ import annotations

import re
from typing import Any

import pytest
import re2

from agentfabric.errors import (
    ConfigError,
    ExpressionEvalError,
    ExpressionSyntaxError,
    PermanentError,
)
from agents.expr import FUNCTIONS, MAX_DEPTH, MAX_LENGTH, Expression, compile_expression, to_text

KEYS = "name, email, company, n, lines, empty, if, none"
CTX: dict[str, Any] = {
    "input": {"name": "Ann", "email": "Ann@Example.COM", "company": "Acme", "n": 7,
              "lines": [{"amount": 10}, {"amount": 2.5}], "empty": {}, "if": "kw", "none": None},
    "steps": {"enrich": {"employees": 150, "tags": ["b2b", "saas"], "ok": True}},
    "run": {"id": "r-1"},
}


def exact(message: str) -> str:
    return f"^{re.escape(message)}$"


def run(text: str, context: dict[str, Any] | None = None) -> Any:
    return compile_expression(text).evaluate(CTX if context is None else context)


# ---------------------------------------------------------------- values


@pytest.mark.parametrize(("text", "expected"), [
    # literals
    ("42", 42), ("-3", -3), ("2.5", 2.5), ("1e3", 1000.0), ("- 4", -4), ("--4", 4),
    ("'single'", "single"), ('"double"', "double"), ("''", ""),
    (r"'it\'s'", "it's"), (r'"say \"hi\""', 'say "hi"'), (r"'a\nb\tc'", "a\nb\tc"),
    (r"'back\\slash'", "back\\slash"), (r"'\u00e9'", "é"), (r"'a\/b'", "a/b"),
    ("true", True), ("false", False), ("null", None),
    ("True", True), ("False", False), ("None", None),
    ("[]", []), ("[1, 'a', null, [true]]", [1, "a", None, [True]]), ("[1, 2,]", [1, 2]),
    # precedence and associativity
    ("1 + 2 * 3", 7), ("(1 + 2) * 3", 9), ("10 - 4 - 3", 3), ("2 * 3 % 4", 2),
    ("-2 * 3", -6), ("-(2 + 3)", -5), ("2 - -3", 5), ("-input.n", -7), ("-input.n + 1", -6),
    ("7 / 2", 3.5), ("7 // 2", 3), ("-7 // 2", -4), ("7 % 3", 1), ("-7 % 3", 2),
    ("1.5 + 1", 2.5), ("'ab' + 'cd'", "abcd"), ("[1] + [2, 3]", [1, 2, 3]),
    ("1 + 2 == 3", True), ("not 1 == 2", True), ("not true and false", False),
    ("true or false and false", True), ("(true or false) and false", False),
    ("not not 1", True), ("1 < 2 == true", False),
    # comparisons, chained like Python
    ("1 < 2 < 3", True), ("3 > 2 > 5", False), ("1 < 3 > 2", True), ("1 <= 1 >= 0", True),
    ("1 == 1.0", True), ("true == 1", False), ("0 == false", False), ("null == null", True),
    ("'1' == 1", False), ("[1, 2] == [1.0, 2]", True), ("[1] != [1, 2]", True),
    ("input.empty == steps.enrich", False), ("null != 0", True), ("'a' < 'b'", True),
    ("'B' < 'a'", True), ("2.5 >= 2", True), ("1 != 2 != 1", True),
    # in / not in
    ("'Ex' in input.email", True), ("'x' in 'abc'", False), ("'b2b' in steps.enrich.tags", True),
    ("1 in [1.0, 2]", True), ("true in [1]", False), ("'name' in input", True),
    ("'zzz' not in input", True), ("[1] in [[1], 2]", True), ("1 in input", False),
    # or / and return the deciding operand, like Python
    ("0 or 'fallback'", "fallback"), ("'first' or 'second'", "first"), ("null or null", None),
    ("1 and 2", 2), ("0 and 2", 0), ("'' and x", ""), ("[] or [1]", [1]),
    # conditional expression
    ("'big' if steps.enrich.employees > 100 else 'small'", "big"),
    ("'big' if steps.enrich.employees > 1000 else 'small'", "small"),
    ("1 if false else 2 if false else 3", 3), ("(1 if true else 2) + 10", 11),
    ("'a' if true or false else 'b'", "a"),
    # paths
    ("input.name", "Ann"), ("input['name']", "Ann"), ('input["name"]', "Ann"),
    ("input.lines[0].amount", 10), ("input.lines[-1].amount", 2.5),
    ("input.lines[input.n - 6].amount", 2.5), ("steps.enrich.tags[1]", "saas"),
    ("input.if", "kw"), ("input.none", None), ("(input).name", "Ann"), ("[10, 20][1]", 20),
    ("steps['enrich']['tags'][0]", "b2b"), ("get(input, 'lines')[0].amount", 10),
    # whitespace, including newlines, is free
    ("1 +\n 2", 3), ("  input . name  ", "Ann"), ("\tlen( [1,2] )\n", 2),
])
def test_values(text: str, expected: Any) -> None:
    result = run(text, {**CTX, "x": "unused"})
    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize(("text", "expected"), [
    # every whitelisted function at least once
    ("lower(input.email)", "ann@example.com"), ("upper('abc')", "ABC"), ("trim('  x y ')", "x y"),
    ("len('abc')", 3), ("len([1, 2])", 2), ("len(input.empty)", 0), ("len(steps.enrich)", 3),
    ("contains('abc', 'b')", True), ("contains([1, 2], 3)", False), ("contains(input, 'n')", True),
    ("startswith('abc', 'ab')", True), ("startswith('abc', 'b')", False),
    ("endswith('abc', 'bc')", True), ("endswith('abc', 'x')", False),
    ("split('a,b,,c', ',')", ["a", "b", "", "c"]), ("split(' a  b ')", ["a", "b"]),
    ("join(['a', 'b'], ', ')", "a, b"), ("join([1, true, null, [2]], '-')", "1-true--[2]"),
    ("join(['a', 'b'])", "ab"), ("replace('a-b-c', '-', '+')", "a+b+c"),
    ("round(2.5)", 3), ("round(-2.5)", -3), ("round(2.4)", 2), ("round(7)", 7),
    ("round(2.675, 2)", 2.68), ("round(1.005, 2)", 1.01), ("round(1234.5, -2)", 1200),
    ("round(1250, -2)", 1300), ("round(2.5, 0)", 3), ("round(0.125, 2)", 0.13),
    ("floor(2.7)", 2), ("floor(-2.5)", -3), ("floor(3)", 3), ("ceil(2.1)", 3), ("ceil(-2.1)", -2),
    ("abs(-3)", 3), ("abs(2.5)", 2.5),
    ("min(3, 1, 2)", 1), ("min([3, 1.5, 2])", 1.5), ("min('b', 'a')", "a"),
    ("max(3, 1, 2)", 3), ("max([3, 1, 2])", 3), ("max(['a', 'c', 'b'])", "c"),
    ("sum([1, 2, 3.5])", 6.5), ("sum([])", 0),
    ("int(3.9)", 3), ("int(-3.9)", -3), ("int('42')", 42), ("int(' -7 ')", -7),
    ("int('3.9')", 3), ("int(true)", 1), ("int(5)", 5),
    ("float(2)", 2.0), ("float('2.5')", 2.5), ("float('1e3')", 1000.0), ("float(false)", 0.0),
    ("str(null)", ""), ("str(true)", "true"), ("str(false)", "false"), ("str(3)", "3"),
    ("str(2.5)", "2.5"), ("str('s')", "s"), ("str([1, 'a', null])", '[1,"a",null]'),
    ("str(steps.enrich)", '{"employees":150,"tags":["b2b","saas"],"ok":true}'),
    ("str('é')", "é"), ("str([\"é\"])", '["é"]'),
    ("bool('')", False), ("bool('x')", True), ("bool([])", False), ("bool(0)", False),
    ("bool(null)", False), ("bool(input)", True),
    ("coalesce(null, input.none, 'x', 'y')", "x"), ("coalesce(null)", None),
    ("coalesce(0, 1)", 0), ("coalesce(null, false)", False),
    ("get(input, 'name')", "Ann"), ("get(input, 'nope')", None), ("get(input, 'nope', 5)", 5),
    ("get(input.lines, 1).amount", 2.5), ("get(input.lines, 9, 'd')", "d"),
    ("get(input.lines, -1).amount", 2.5), ("get(null, 'a', 'd')", "d"), ("get(input, [1])", None),
    ("has(input, 'name')", True), ("has(input, 'nope')", False), ("has(input, 'none')", True),
    ("has(input.lines, 1)", True), ("has(input.lines, 2)", False), ("has(null, 'x')", False),
    (r"matches(input.email, '@example\\.com$')", False),
    (r"matches(lower(input.email), '@example\\.com$')", True), ("matches('abc', '^b')", False),
    ("matches('abc', 'b')", True),
])
def test_functions(text: str, expected: Any) -> None:
    result = run(text)
    assert result == expected
    assert type(result) is type(expected)


def test_function_whitelist_is_exactly_the_documented_set() -> None:
    assert set(FUNCTIONS) == {
        "lower", "upper", "trim", "len", "contains", "startswith", "endswith", "split", "join",
        "replace", "round", "floor", "ceil", "abs", "min", "max", "sum", "int", "float", "str",
        "bool", "coalesce", "get", "has", "matches", "pluck",
    }
    assert "now_iso" not in FUNCTIONS
    assert FUNCTIONS["lower"]("AbC") == "abc"
    assert FUNCTIONS["coalesce"](None, 2) == 2
    assert FUNCTIONS["pluck"]([{"a": {"b": 1}}, {"a": {}}, {}], "a.b") == [1, None, None]
    with pytest.raises(TypeError):
        FUNCTIONS["bool"] = bool  # type: ignore[index]


@pytest.mark.parametrize(("value", "expected"), [
    (None, ""), (True, "true"), (False, "false"), (0, "0"), (1.5, "1.5"), ("x", "x"),
    ([1, None, True], "[1,null,true]"), ({"a": [1, "é"]}, '{"a":[1,"é"]}'), ((1, 2), "[1,2]"),
])
def test_to_text(value: Any, expected: str) -> None:
    assert to_text(value) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("false and undefined_name", False),
    ("true or undefined_name", True),
    ("null and undefined_name.x.y", None),
    ("1 if true else undefined_name", 1),
    ("undefined_name if false else 1", 1),
    ("2 < 1 < undefined_name", False),
    ("coalesce(1, undefined_name)", 1),
    ("get(input, 'nope', 1) or undefined_name", 1),
])
def test_short_circuit_does_not_evaluate_the_rest(text: str, expected: Any) -> None:
    assert run(text) == expected


def test_chained_comparison_evaluates_the_middle_once() -> None:
    calls: list[int] = []

    class Counting(dict[str, Any]):
        def __getitem__(self, key: str) -> Any:
            calls.append(1)
            return super().__getitem__(key)

    assert compile_expression("1 < x < 3").evaluate(Counting(x=2)) is True
    assert len(calls) == 1


# ---------------------------------------------------------------- syntax errors

KNOWN = ", ".join(sorted(FUNCTIONS))


@pytest.mark.parametrize(("text", "message"), [
    ("a + ", "expected a value after '+' at column 5"),
    ("a + )", "expected a value after '+' but found ')' at column 5"),
    ("", "expected a value at column 1"),
    ("   ", "expected a value at column 4"),
    ("* 2", "expected a value but found '*' at column 1"),
    ("a $ b", "unexpected character '$' at column 3"),
    ("é", "unexpected character 'é' at column 1"),
    ("(a + b", "unclosed '(' opened at column 1"),
    ("x + (a + b", "unclosed '(' opened at column 5"),
    ("[1, 2", "unclosed '[' opened at column 1"),
    ("[1,", "unclosed '[' opened at column 1"),
    ("lower(a", "unclosed '(' opened at column 6"),
    ("a[0", "unclosed '[' opened at column 2"),
    ("(a b)", "expected ')' but found 'b' at column 4"),
    ("[1 2]", "expected ',' or ']' but found '2' at column 4"),
    ("lower(a b)", "expected ',' or ')' but found 'b' at column 9"),
    ("a[0 1]", "expected ']' but found '1' at column 5"),
    ("a b", "unexpected 'b' at column 3"),
    ("1 2", "unexpected '2' at column 3"),
    ("a)", "unexpected ')' at column 2"),
    ("a not b", "unexpected 'not' at column 3"),
    ("a if b", "expected 'else' but found end of expression at column 7"),
    ("a if b c", "expected 'else' but found 'c' at column 8"),
    ("a.", "expected a field name after '.' but found end of expression at column 3"),
    ("a.1", "expected a field name after '.' but found '1' at column 3"),
    ("'abc", "unterminated string starting at column 1"),
    ('x == "abc', "unterminated string starting at column 6"),
    ("'abc\\'", "unterminated string starting at column 1"),
    (r"'\q'", r"unknown escape '\q' in string at column 2"),
    ("1e999", "number 1e999 is too large at column 1"),
    ("lower()", "lower() takes 1 argument, got 0 at column 1"),
    ("lower('a', 'b')", "lower() takes 1 argument, got 2 at column 1"),
    ("x + replace('a', 'b')", "replace() takes 3 arguments, got 2 at column 5"),
    ("round(1, 2, 3)", "round() takes 1 or 2 arguments, got 3 at column 1"),
    ("get(1)", "get() takes 2 or 3 arguments, got 1 at column 1"),
    ("min()", "min() takes at least 1 argument, got 0 at column 1"),
    ("coalesce()", "coalesce() takes at least 1 argument, got 0 at column 1"),
])
def test_syntax_errors(text: str, message: str) -> None:
    shown = text.replace("\t", " ")
    with pytest.raises(ExpressionSyntaxError, match=exact(f'{message} in "{shown}"')):
        compile_expression(text)


@pytest.mark.parametrize(("text", "hint"), [
    ("a = b", "use '==' to compare"), ("!a", "use 'not' or '!='"),
    ("a && b", "use 'and'"), ("a | b", "use 'or'"),
])
def test_syntax_error_hints_follow_the_quoted_text(text: str, hint: str) -> None:
    with pytest.raises(ExpressionSyntaxError, match=re.escape(f'in "{text}"; {hint}') + "$"):
        compile_expression(text)


@pytest.mark.parametrize(("text", "column"), [
    ("foo(1)", 1), ("1 + foo()", 5), ("now_iso()", 1), ("__import__('os')", 1),
    ("eval('1')", 1), ("getattr(input, '__class__')", 1), ("exec('x')", 1),
])
def test_unknown_function_is_a_syntax_error_listing_the_whitelist(text: str, column: int) -> None:
    name = text.split("(")[0].split()[-1]
    message = (f"unknown function '{name}' at column {column} in \"{text}\"; "
               f"known functions: {KNOWN}")
    with pytest.raises(ExpressionSyntaxError, match=exact(message)):
        compile_expression(text)


def test_newlines_in_the_quoted_text_become_spaces_so_columns_line_up() -> None:
    with pytest.raises(ExpressionSyntaxError, match=exact(
            'expected a value after \'+\' at column 11 in "1 +  2 +  "')):
        compile_expression("1 +\n 2 +\n ")


def test_non_string_expression() -> None:
    message = "an expression must be a string, got number"
    with pytest.raises(ExpressionSyntaxError, match=exact(message)):
        compile_expression(5)  # type: ignore[arg-type]


def test_errors_belong_to_the_documented_branches() -> None:
    with pytest.raises(ConfigError):
        compile_expression("a +")
    with pytest.raises(PermanentError):
        run("nope")


# ---------------------------------------------------------------- limits


def test_length_limit() -> None:
    assert compile_expression("a" * MAX_LENGTH).text == "a" * MAX_LENGTH
    text = "a" * (MAX_LENGTH + 1)
    message = f'expression is longer than 2000 characters (2001) in "{"a" * 40}..."'
    with pytest.raises(ExpressionSyntaxError, match=exact(message)):
        compile_expression(text)


def test_nesting_limit_for_brackets() -> None:
    assert MAX_DEPTH == 50
    assert run("(" * 50 + "1" + ")" * 50) == 1
    assert run("[" * 50 + "]" * 50) is not None
    text = "(" * 51 + "1" + ")" * 51
    with pytest.raises(ExpressionSyntaxError, match=exact(
            f'expression nests deeper than 50 levels at column 52 in "{text}"')):
        compile_expression(text)


@pytest.mark.parametrize(("text", "column"), [
    ("-" * 51 + "1", 51),
    ("not " * 51 + "x", 201),
    ("abs(" * 51 + "1" + ")" * 51, 205),
    ("x" + "[x" * 51 + "]" * 51, 103),
    ("1 if x else " * 51 + "2", 613),
])
def test_nesting_limit_for_operators_calls_and_indexes(text: str, column: int) -> None:
    with pytest.raises(ExpressionSyntaxError, match=exact(
            f'expression nests deeper than 50 levels at column {column} in "{text}"')):
        compile_expression(text)


def test_long_flat_chains_are_fine() -> None:
    assert run(" + ".join(["1"] * 400)) == 400
    assert run("0" + " or 0" * 300 + " or 1") == 1
    assert run("[" + ", ".join(["1"] * 600) + "]") == [1] * 600
    deep = {"a": {}}
    node = deep["a"]
    for _ in range(300):
        node["a"] = {}
        node = node["a"]
    assert run("d" + ".a" * 301, {"d": deep}) == {}


@pytest.mark.parametrize(("text", "message"), [
    ("s + s", "'+' would build a string longer than 1000000 characters"),
    ("l + l", "'+' would build a list longer than 100000 items"),
    ("replace(s, 'x', 'xx')", "replace() would build a string longer than 1000000 characters"),
    ("join([s, s], '')", "join() would build a string longer than 1000000 characters"),
    ("s * 2", "cannot multiply string by number"),
    ("l * 2", "cannot multiply list by number"),
    ("matches('a', p)", "matches() takes a pattern of at most 1000 characters"),
])
def test_size_limits(text: str, message: str) -> None:
    context = {"s": "x" * 600_000, "l": [0] * 60_000, "p": "a" * 1001}
    with pytest.raises(ExpressionEvalError, match=exact(f'{message} in "{text}"')):
        run(text, context)


# ---------------------------------------------------------------- evaluation errors


@pytest.mark.parametrize(("text", "message"), [
    # lookups
    ("input.compnay",
     f"input has no field 'compnay' (it has: {KEYS})"),
    ("steps.enrich.x", "steps.enrich has no field 'x' (it has: employees, tags, ok)"),
    ("steps['enrich']['x']", "steps.enrich has no field 'x' (it has: employees, tags, ok)"),
    ("input.empty.x", "input.empty has no field 'x' (it is empty)"),
    ("input[0]", f"input has no key 0 (it has: {KEYS})"),
    ("foo", "unknown name 'foo' (known: input, steps, run)"),
    ("foo.bar", "unknown name 'foo' (known: input, steps, run)"),
    ("steps.enrich.employees.x",
     "steps.enrich.employees is a number, not an object, so it has no field 'x'"),
    ("input.name.first", "input.name is a string, not an object, so it has no field 'first'"),
    ("input.none.x", "input.none is null, not an object, so it has no field 'x'"),
    ("steps.enrich.ok.x", "steps.enrich.ok is a boolean, not an object, so it has no field 'x'"),
    ("steps.enrich.tags.x", "steps.enrich.tags is a list, not an object, so it has no field 'x'"),
    ("input.name[0]", "input.name is a string, not a list, so it has no item at index 0"),
    ("steps.enrich.tags[2]", "steps.enrich.tags has no item at index 2 (it has 2 items)"),
    ("steps.enrich.tags[-3]", "steps.enrich.tags has no item at index -3 (it has 2 items)"),
    ("[1][1]", "[1] has no item at index 1 (it has 1 item)"),
    ("steps.enrich.tags[1.5]",
     "steps.enrich.tags is a list, so its index must be a whole number, not 1.5"),
    ("steps.enrich.tags[true]",
     "steps.enrich.tags is a list, so its index must be a whole number, not boolean"),
    ("input.lines[0].amount.x",
     "input.lines[0].amount is a number, not an object, so it has no field 'x'"),
    ("input.lines[input.n].amount", "input.lines has no item at index 7 (it has 2 items)"),
    ("input['a b']", f"input has no field 'a b' (it has: {KEYS})"),
    ("input['a b'] if false else input.lines[1]['a b'].c",
     "input.lines[1] has no field 'a b' (it has: amount)"),
    ("get(input, 'name').x",
     "get(input, 'name') is a string, not an object, so it has no field 'x'"),
    # arithmetic
    ("input.name + 1", "cannot add string and number"),
    ("1 + 'a'", "cannot add number and string"),
    ("[1] + 'a'", "cannot add list and string"),
    ("true + 1", "cannot add boolean and number"),
    ("null + 1", "cannot add null and number"),
    ("'a' - 'b'", "cannot subtract string from string"),
    ("'ab' * 2", "cannot multiply string by number"),
    ("6 / 'a'", "cannot divide number by string"),
    ("6 // null", "cannot divide number by null"),
    ("6 % []", "cannot take number modulo list"),
    ("1 / 0", "cannot divide by zero"),
    ("1 // 0.0", "cannot divide by zero"),
    ("1 % 0", "cannot divide by zero"),
    ("-'a'", "cannot negate a string"),
    ("-input", "cannot negate an object"),
    ("-true", "cannot negate a boolean"),
    ("1e308 * 10", "the result of '*' is not a finite number"),
    # ordering
    ("'a' < 1", "cannot compare string and number with '<'"),
    ("null < 1", "cannot compare null and number with '<'"),
    ("1 >= null", "cannot compare number and null with '>='"),
    ("true > false", "cannot compare boolean and boolean with '>'"),
    ("[1] <= [2]", "cannot compare list and list with '<='"),
    ("1 < 2 < 'a'", "cannot compare number and string with '<'"),
    # membership
    ("1 in 'abc'", "'in' cannot look for a number in a string"),
    ("'a' not in 5", "'not in' needs a string, list or object to look in, got number"),
    ("'a' in null", "'in' needs a string, list or object to look in, got null"),
])
def test_evaluation_errors(text: str, message: str) -> None:
    with pytest.raises(ExpressionEvalError, match=exact(f'{message} in "{text}"')):
        run(text)


@pytest.mark.parametrize(("text", "message"), [
    ("lower(1)", "lower() expects a string, got number"),
    ("upper(null)", "upper() expects a string, got null"),
    ("trim([])", "trim() expects a string, got list"),
    ("len(1)", "len() expects a string, list or object, got number"),
    ("contains(1, 1)", "contains() expects a string, list or object as argument 1, got number"),
    ("contains('abc', 1)", "contains() cannot look for a number in a string"),
    ("startswith('a', 1)", "startswith() expects a string as argument 2, got number"),
    ("endswith(1, 'a')", "endswith() expects a string as argument 1, got number"),
    ("split(1, ',')", "split() expects a string as argument 1, got number"),
    ("split('a', '')", "split() needs a non-empty separator"),
    ("join('abc', ',')", "join() expects a list as argument 1, got string"),
    ("join([], 1)", "join() expects a string as argument 2, got number"),
    ("replace('a', 1, 'b')", "replace() expects a string as argument 2, got number"),
    ("round('1')", "round() expects a number as argument 1, got string"),
    ("round(1.5, 0.5)", "round() needs a whole number of digits from -100 to 100, got 0.5"),
    ("round(1.5, 1000)", "round() needs a whole number of digits from -100 to 100, got 1000"),
    ("floor('1')", "floor() expects a number, got string"),
    ("ceil(true)", "ceil() expects a number, got boolean"),
    ("abs(null)", "abs() expects a number, got null"),
    ("min([])", "min() of an empty list"),
    ("min(4)", "min() expects a list, got number"),
    ("max(1, 'a')", "max() compares only numbers or only strings, got number, string"),
    ("max([null, 1])", "max() compares only numbers or only strings, got null, number"),
    ("sum([1, '2'])", "sum() adds only numbers, got string"),
    ("sum('12')", "sum() expects a list, got string"),
    ("int('abc')", "int() cannot convert \"abc\" to a number"),
    ("int('')", "int() cannot convert \"\" to a number"),
    ("float('nan')", "float() cannot convert \"nan\" to a number"),
    ("float('1e999')", "the result of float() is not a finite number"),
    ("int(null)", "int() expects a number, string or boolean, got null"),
    ("float([])", "float() expects a number, string or boolean, got list"),
    ("get(1, 'a')", "get() expects an object or list as argument 1, got number"),
    ("get([1], 'a')", "get() on a list needs a whole-number index, got string"),
    ("has('abc', 'a')", "has() expects an object or list as argument 1, got string"),
    ("has([1], null)", "has() on a list needs a whole-number index, got null"),
    ("matches(1, 'a')", "matches() expects a string as argument 1, got number"),
    ("matches('a', run.id + '(')",
     "matches() got an invalid regular expression (missing ): r-1(); patterns use RE2 syntax,"
     " which has no backreferences or lookaround"),
    ("coalesce(null, nope)", "unknown name 'nope' (known: input, steps, run)"),
])
def test_function_misuse(text: str, message: str) -> None:
    with pytest.raises(ExpressionEvalError, match=exact(f'{message} in "{text}"')):
        run(text)


def test_unknown_name_in_an_empty_context() -> None:
    message = 'unknown name \'a\' (the context is empty) in "a"'
    with pytest.raises(ExpressionEvalError, match=exact(message)):
        run("a", {})


def test_long_key_listings_are_cut() -> None:
    context = {"d": {f"k{i}": i for i in range(25)}}
    keys = ", ".join(f"k{i}" for i in range(20))
    with pytest.raises(ExpressionEvalError, match=exact(
            f"d has no field 'x' (it has: {keys}, and 5 more) in \"d.x\"")):
        run("d.x", context)


# ---------------------------------------------------------------- safety


@pytest.mark.parametrize(("text", "message"), [
    ("input.__class__",
     f"input has no field '__class__' (it has: {KEYS})"),
    ("input['__class__']",
     f"input has no field '__class__' (it has: {KEYS})"),
    ("input.name.__class__",
     "input.name is a string, not an object, so it has no field '__class__'"),
    ("steps.enrich.tags.append",
     "steps.enrich.tags is a list, not an object, so it has no field 'append'"),
    ("__builtins__", "unknown name '__builtins__' (known: input, steps, run)"),
    ("lower", "unknown name 'lower' (known: input, steps, run)"),
    ("input.keys", f"input has no field 'keys' (it has: {KEYS})"),
])
def test_python_internals_are_unreachable(text: str, message: str) -> None:
    with pytest.raises(ExpressionEvalError, match=exact(f'{message} in "{text}"')):
        run(text)


def test_objects_are_read_by_key_never_by_attribute() -> None:
    class Thing:
        secret = "s3cret"

    with pytest.raises(ExpressionEvalError, match=exact(
            "t is a Thing, not an object, so it has no field 'secret' in \"t.secret\"")):
        run("t.secret", {"t": Thing()})
    with pytest.raises(ExpressionSyntaxError, match="unknown function '__import__' at column 1"):
        compile_expression("__import__('os').system('true')")


# ---------------------------------------------------------------- references and the object


@pytest.mark.parametrize(("text", "expected"), [
    ("steps.enrich.employees > 100 and lower(input.email)",
     {("steps", "enrich", "employees"), ("input", "email")}),
    ("1 + 2", set()),
    ("input", {("input",)}),
    ("steps['enrich'].tags[0].name", {("steps", "enrich", "tags")}),
    ("steps[run.step].x", {("steps",), ("run", "step")}),
    ("input.lines[input.n - 1].amount", {("input", "lines"), ("input", "n")}),
    ("get(input, 'a').b", {("input",)}),
    ("(input).x", {("input", "x")}),
    ("[a, b.c][0].d", {("a",), ("b", "c")}),
    ("x if y.z else not w", {("x",), ("y", "z"), ("w",)}),
    ("coalesce(a.b, -c, 'd' in e)", {("a", "b"), ("c",), ("e",)}),
    ("a.b == a.b", {("a", "b")}),
    ("input.if", {("input", "if")}),
])
def test_references(text: str, expected: set[tuple[str, ...]]) -> None:
    assert compile_expression(text).references() == expected


def test_expression_object() -> None:
    expression = compile_expression("input.n * 2")
    assert isinstance(expression, Expression)
    assert expression.text == "input.n * 2"
    assert expression.evaluate(CTX) == 14
    assert expression.evaluate({"input": {"n": 1}}) == 2
    assert repr(expression) == "Expression('input.n * 2')"
    assert expression == compile_expression("input.n * 2")
    assert len({expression, compile_expression("input.n * 2")}) == 1


def test_evaluation_error_keeps_the_regex_cause() -> None:
    with pytest.raises(ExpressionEvalError) as info:
        run("matches('a', p)", {"p": "["})
    assert isinstance(info.value.__cause__, re2.error)


@pytest.mark.parametrize(("text", "message"), [
    ("n * n * n * n * n", "the result of '*' is too large"),
    ("n / 3", "the result of '/' is too large"),
    ("float(n)", "float() cannot convert a number this large"),
    ("sum([n, 0.5])", "the result of sum() is too large"),
    ("int(digits)", "int() cannot convert a number this large"),
])
def test_huge_numbers_fail_cleanly(text: str, message: str) -> None:
    context = {"n": 10**1000, "digits": "1" * 5000}
    with pytest.raises(ExpressionEvalError, match=exact(f'{message} in "{text}"')):
        run(text, context)


def test_python_sequences_in_the_context_act_as_lists() -> None:
    context = {"t": (1, 2)}
    assert run("t + t", context) == [1, 2, 1, 2]
    assert run("t + [3]", context) == [1, 2, 3]
    assert run("t == [1, 2]", context) is True
    assert run("t[-1]", context) == 2
    assert run("int('-12345678901234567890')") == -12345678901234567890


def test_matches_caps_the_string_it_searches() -> None:
    subject = "a" * 10_000
    assert run("matches(s, 'a$')", {"s": subject}) is True
    text = "matches(s, 'a$')"
    message = "matches() searches a string of at most 10000 characters, got 10001"
    with pytest.raises(ExpressionEvalError, match=exact(f'{message} in "{text}"')):
        run(text, {"s": subject + "a"})


def test_functions_module_is_what_expr_reexports() -> None:
    import agents.functions as functions

    assert functions.FUNCTIONS is FUNCTIONS
    assert functions.to_text is to_text
    assert functions.MAX_SUBJECT == 10_000
