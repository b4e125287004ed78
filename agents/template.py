"""Templated mappings: YAML values whose strings may hold ``{{ expression }}`` parts.

A string that is exactly one ``{{ expr }}`` (surrounding spaces aside) renders to the
expression's native value: a number stays a number, a dict stays a dict. Any other string with
``{{ ... }}`` parts renders to a string, each part replaced by its text form (``str()`` in the
expression language: null is "", booleans are true/false, lists and dicts are compact JSON).
Dicts and lists are compiled recursively, at most ``MAX_NESTING`` levels deep; dict keys are
plain strings, never templates. A rendered string is at most ``MAX_STRING`` characters: the
parts are converted one by one and the string is refused before it is joined.
A part that does not parse raises ``TemplateSyntaxError``, an ``ExpressionSyntaxError`` whose
``location`` is the field path inside the value, as ``Template.expressions()`` reports it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agentfabric.errors import ExpressionEvalError, ExpressionSyntaxError
from agents.expr import Expression, compile_expression
from agents.expr_values import MAX_NESTING, MAX_STRING

__all__ = ["Template", "TemplateSyntaxError", "compile_template"]


class TemplateSyntaxError(ExpressionSyntaxError):
    """A template part does not parse; ``location`` is where in the value ("" for the root).

    The message is the expression's own (or the unterminated ``{{`` one), without the location,
    so a caller can put the location where it belongs, e.g. in ``WorkflowError.field``.
    """

    def __init__(self, message: str, location: str = "") -> None:
        super().__init__(message)
        self.location = location

    def __reduce__(self) -> tuple[type[TemplateSyntaxError], tuple[str, str]]:
        return type(self), (str(self), self.location)


@dataclass(frozen=True, slots=True)
class _Literal:
    value: Any


@dataclass(frozen=True, slots=True)
class _Whole:
    expression: Expression


@dataclass(frozen=True, slots=True)
class _Text:
    parts: tuple[str | Expression, ...]


@dataclass(frozen=True, slots=True)
class _Dict:
    items: tuple[tuple[Any, _Node], ...]


@dataclass(frozen=True, slots=True)
class _List:
    items: tuple[_Node, ...]


_Node = _Literal | _Whole | _Text | _Dict | _List


def _close(text: str, start: int) -> int:
    """Index of the ``}}`` ending the expression that starts at ``start``, or -1."""
    i, quote = start, ""
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif text.startswith("}}", i):
            return i
        i += 1
    # an unclosed string literal inside: let the expression parser report it
    return -1 if not quote else text.find("}}", start)


def _unterminated(text: str, start: int, where: str) -> TemplateSyntaxError:
    line = text.count("\n", 0, start) + 1
    column = start - (text.rfind("\n", 0, start) + 1) + 1
    at = f"line {line}, column {column}" if "\n" in text else f"column {column}"
    shown = text
    if len(text) > 200 or "\n" in text:
        shown = re.sub(r"\s", " ", text[start : start + 40]) + ("..." * (len(text) > start + 40))
    return TemplateSyntaxError(
        f"unterminated '{{{{' at {at} in \"{shown}\": close it with '}}}}'", where
    )


def _compile_string(text: str, where: str) -> _Node:
    parts: list[str | Expression] = []
    pos = 0
    while (start := text.find("{{", pos)) != -1:
        end = _close(text, start + 2)
        if end == -1:
            raise _unterminated(text, start, where)
        if start > pos:
            parts.append(text[pos:start])
        try:
            parts.append(compile_expression(text[start + 2 : end].strip()))
        except ExpressionSyntaxError as exc:
            raise TemplateSyntaxError(str(exc), where) from exc
        pos = end + 2
    if pos < len(text):
        parts.append(text[pos:])
    expressions = [part for part in parts if isinstance(part, Expression)]
    if not expressions:
        return _Literal(text)
    if len(expressions) == 1 and all(isinstance(p, Expression) or not p.strip() for p in parts):
        return _Whole(expressions[0])
    return _Text(tuple(parts))


def _field(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _compile(value: Any, where: str, depth: int = 0) -> _Node:
    """Compile ``value``, found at field path ``where`` (paths are spelled as in ``_walk``)."""
    if isinstance(value, str):
        return _compile_string(value, where)
    if isinstance(value, Mapping | list | tuple) and depth >= MAX_NESTING:
        raise TemplateSyntaxError(f"the value nests deeper than {MAX_NESTING} levels", where)
    if isinstance(value, Mapping):
        return _Dict(tuple(
            (k, _compile(item, _field(where, k), depth + 1)) for k, item in value.items()
        ))
    if isinstance(value, list | tuple):
        return _List(tuple(
            _compile(item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value)
        ))
    return _Literal(value)


def _join(parts: tuple[str | Expression, ...], context: Mapping[str, Any]) -> str:
    texts, total = [], 0
    for part in parts:
        text = part if isinstance(part, str) else part.evaluate_text(context)
        total += len(text)
        if total > MAX_STRING:
            at = f' in "{part.text}"' if isinstance(part, Expression) else ""
            raise ExpressionEvalError(
                f"the template would build a string longer than {MAX_STRING} characters{at}"
            )
        texts.append(text)
    return "".join(texts)


def _render(node: _Node, context: Mapping[str, Any]) -> Any:
    match node:
        case _Literal(value):
            return value
        case _Whole(expression):
            return expression.evaluate(context)
        case _Text(parts):
            return _join(parts, context)
        case _Dict(items):
            return {key: _render(item, context) for key, item in items}
        case _List(items):
            return [_render(item, context) for item in items]
    raise AssertionError(f"unknown template node {node!r}")  # pragma: no cover


def _walk(node: _Node, where: str, out: list[tuple[str, Expression]]) -> None:
    match node:
        case _Whole(expression):
            out.append((where, expression))
        case _Text(parts):
            out.extend((where, part) for part in parts if isinstance(part, Expression))
        case _Dict(items):
            for key, item in items:
                _walk(item, _field(where, key), out)
        case _List(items):
            for index, item in enumerate(items):
                _walk(item, f"{where}[{index}]", out)


class Template:
    """A compiled YAML value: ``render`` it against a context to get plain data back."""

    __slots__ = ("_root",)

    def __init__(self, root: _Node) -> None:
        self._root = root

    def render(self, context: Mapping[str, Any]) -> Any:
        """The value with every expression evaluated; raises ``ExpressionEvalError``."""
        return _render(self._root, context)

    def references(self) -> set[tuple[str, ...]]:
        """Every context path any expression in the value reads."""
        out: set[tuple[str, ...]] = set()
        for _, expression in self.expressions():
            out |= expression.references()
        return out

    def expressions(self) -> list[tuple[str, Expression]]:
        """Each expression with its field path inside the value ("" for the root)."""
        out: list[tuple[str, Expression]] = []
        _walk(self._root, "", out)
        return out

    def __repr__(self) -> str:
        return f"Template({[e.text for _, e in self.expressions()]!r})"


def compile_template(value: Any) -> Template:
    """Compile any YAML value; raise ``TemplateSyntaxError`` if an expression does not parse."""
    return Template(_compile(value, ""))
