"""A small, safe expression language for workflow conditions and templates.

Python-like syntax over JSON values: ``steps.enrich.employees > 100 and lower(input.email)``.
Text is tokenized and parsed by hand into a tree of frozen dataclasses, which is then walked;
nothing reaches Python's ``eval``. Names read top-level keys of the context, ``.field`` and
``[index]`` read dict keys and list items only (never Python attributes), and calls are limited
to the whitelist in ``FUNCTIONS``. Parse problems raise ``ExpressionSyntaxError`` (with the
column), problems with a run's data raise ``ExpressionEvalError`` (ending with the expression).
``and``, ``or``, ``x if c else y``, chained comparisons and ``coalesce()`` stop evaluating as
soon as the result is known; use ``get(obj, key, default)`` to read a field that may be missing.
The tokenizer and parser live in :mod:`agents.expr_parser`, the functions in
:mod:`agents.functions`, the limits (sizes checked before building, nesting depth) and the value
rules in :mod:`agents.expr_values`; this module evaluates the tree and re-exports the public
names.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from itertools import islice
from typing import Any

from agentfabric.errors import ExpressionEvalError, ExpressionSyntaxError
from agents.expr_parser import (
    _Attr,
    _BoolOp,
    _Call,
    _Chain,
    _Cond,
    _Const,
    _Index,
    _List,
    _Name,
    _Neg,
    _Node,
    _Not,
    _Parser,
    _Path,
    _quote,
)
from agents.expr_values import (
    _MAX_INT_BITS,
    _SHOWN,
    MAX_DEPTH,
    MAX_LENGTH,
    MAX_NESTING,
    _a,
    _check_count,
    _check_length,
    _clip,
    _contains,
    _equal,
    _finite,
    _is_num,
    _Problem,
    _show,
    _text,
    _type,
    to_text,
)
from agents.functions import FUNCTIONS

__all__ = [
    "FUNCTIONS",
    "MAX_DEPTH",
    "MAX_LENGTH",
    "MAX_NESTING",
    "Expression",
    "compile_expression",
    "to_text",
]


# ---------------------------------------------------------------- evaluation


def _keys(mapping: Mapping[Any, Any]) -> str:
    names = [_clip(str(key)) for key in islice(mapping, 20)]
    more = f", and {len(mapping) - 20} more" if len(mapping) > 20 else ""
    return ", ".join(names) + more


_ARITH: dict[str, Callable[[Any, Any], Any]] = {
    "+": operator.add, "-": operator.sub, "*": operator.mul,
    "/": operator.truediv, "//": operator.floordiv, "%": operator.mod,
}
_ARITH_ERRORS = {
    "+": "cannot add {a} and {b}", "-": "cannot subtract {b} from {a}",
    "*": "cannot multiply {a} by {b}", "/": "cannot divide {a} by {b}",
    "//": "cannot divide {a} by {b}", "%": "cannot take {a} modulo {b}",
}
_ORDER: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}


def _arith(op: str, a: Any, b: Any) -> Any:
    if op == "+" and isinstance(a, str) and isinstance(b, str):
        _check_length(len(a) + len(b), "'+'")
        return a + b
    if op == "+" and isinstance(a, list | tuple) and isinstance(b, list | tuple):
        _check_count(len(a) + len(b), "'+'")
        return [*a, *b]
    if not (_is_num(a) and _is_num(b)):
        raise _Problem(_ARITH_ERRORS[op].format(a=_type(a), b=_type(b)))
    if op in ("/", "//", "%") and b == 0:
        raise _Problem("cannot divide by zero")
    try:
        result = _ARITH[op](a, b)
    except OverflowError as exc:
        raise _Problem(f"the result of '{op}' is too large") from exc
    if isinstance(result, int) and result.bit_length() > _MAX_INT_BITS:
        raise _Problem(f"the result of '{op}' is too large")
    return _finite(result, f"the result of '{op}'")


def _compare(op: str, a: Any, b: Any) -> bool:
    if op in ("==", "!="):
        return _equal(a, b) == (op == "==")
    if op in ("in", "not in"):
        return _contains(b, a, f"'{op}'") == (op == "in")
    if not ((_is_num(a) and _is_num(b)) or (isinstance(a, str) and isinstance(b, str))):
        raise _Problem(f"cannot compare {_type(a)} and {_type(b)} with '{op}'")
    return _ORDER[op](a, b)


def _lookup(value: Any, key: Any, where: str, attr: bool) -> Any:
    kind = _type(value)
    if isinstance(value, Mapping):
        try:
            found = key in value
        except TypeError:
            found = False
        if found:
            return value[key]
        what = f"field '{_clip(key)}'" if isinstance(key, str) else f"key {_show(key)}"
        listing = f"it has: {_keys(value)}" if value else "it is empty"
        raise _Problem(f"{where} has no {what} ({listing})")
    if isinstance(value, list | tuple) and not attr and _type(key) == "number":
        if not isinstance(key, int):
            raise _Problem(f"{where} is a list, so its index must be a whole number, not {key}")
        if -len(value) <= key < len(value):
            return value[key]
        items = f"{len(value)} item{'' if len(value) == 1 else 's'}"
        raise _Problem(f"{where} has no item at index {key} (it has {items})")
    if isinstance(key, str):
        raise _Problem(
            f"{where} is {_a(kind)}, not an object, so it has no field '{_clip(key)}'"
        )
    if kind == "list":
        raise _Problem(f"{where} is a list, so its index must be a whole number, not {_type(key)}")
    raise _Problem(f"{where} is {_a(kind)}, not a list, so it has no item at index {_show(key)}")


def _eval(node: _Node, ctx: Mapping[str, Any]) -> Any:
    match node:
        case _Const(value):
            return value
        case _Name(name):
            if name in ctx:
                return ctx[name]
            known = f"known: {_keys(ctx)}" if ctx else "the context is empty"
            raise _Problem(f"unknown name '{name}' ({known})")
        case _Path(base, where, steps):
            value = _eval(base, ctx)
            for step in steps:
                attr = isinstance(step, _Attr)
                key = step.name if isinstance(step, _Attr) else _eval(step.index, ctx)
                value = _lookup(value, key, where, attr)
                plain = isinstance(key, str) and len(key) <= _SHOWN and key.isidentifier()
                where += f".{key}" if attr or plain else f"[{_show(key)}]"
            return value
        case _List(items):
            return [_eval(item, ctx) for item in items]
        case _Call("coalesce", args):  # lazy: stops at the first non-null argument
            return next((v for v in (_eval(a, ctx) for a in args) if v is not None), None)
        case _Call(name, args):
            return FUNCTIONS[name](*(_eval(arg, ctx) for arg in args))
        case _Neg(operand):
            value = _eval(operand, ctx)
            if not _is_num(value):
                raise _Problem(f"cannot negate {_a(_type(value))}")
            return -value
        case _Not(operand):
            return not _eval(operand, ctx)
        case _BoolOp(op, operands):
            for operand in operands[:-1]:
                value = _eval(operand, ctx)
                if bool(value) == (op == "or"):
                    return value
            return _eval(operands[-1], ctx)
        case _Chain(first, rest) if rest[0][0] in _ARITH:
            value = _eval(first, ctx)
            for op, operand in rest:
                value = _arith(op, value, _eval(operand, ctx))
            return value
        case _Chain(first, rest):
            left = _eval(first, ctx)
            for op, operand in rest:
                right = _eval(operand, ctx)
                if not _compare(op, left, right):
                    return False
                left = right
            return True
        case _Cond(body, test, orelse):
            return _eval(body if _eval(test, ctx) else orelse, ctx)
    raise AssertionError(f"unknown node {node!r}")  # pragma: no cover


def _children(node: _Node) -> list[_Node]:
    match node:
        case _Path(base, _, steps):
            return [base, *(s.index for s in steps if isinstance(s, _Index))]
        case _List(items) | _Call(_, items) | _BoolOp(_, items):
            return list(items)
        case _Neg(operand) | _Not(operand):
            return [operand]
        case _Chain(first, rest):
            return [first, *(operand for _, operand in rest)]
        case _Cond(body, test, orelse):
            return [body, test, orelse]
    return []


def _references(node: _Node, out: set[tuple[str, ...]]) -> None:
    children = _children(node)
    if isinstance(node, _Name):
        out.add((node.name,))
    elif isinstance(node, _Path) and isinstance(node.base, _Name):
        path = [node.base.name]
        for step in node.steps:
            if isinstance(step, _Attr):
                path.append(step.name)
            elif isinstance(step.index, _Const) and isinstance(step.index.value, str):
                path.append(step.index.value)
            else:
                break
        out.add(tuple(path))
        children = children[1:]
    for child in children:
        _references(child, out)


class Expression:
    """A parsed expression: evaluate it against a context of top-level names."""

    __slots__ = ("_root", "text")

    def __init__(self, text: str, root: _Node) -> None:
        self.text, self._root = text, root

    def evaluate(self, context: Mapping[str, Any]) -> Any:
        try:
            return _eval(self._root, context)
        except _Problem as exc:
            raise ExpressionEvalError(f"{exc} in {_quote(self.text)}") from exc.__cause__
        except RecursionError as exc:  # the depth checks run out of stack only when the
            raise ExpressionEvalError(  # caller is already deep: say so instead of crashing
                f"the value is nested too deeply to evaluate (the limit is {MAX_NESTING} levels)"
                f" in {_quote(self.text)}"
            ) from exc

    def evaluate_text(self, context: Mapping[str, Any]) -> str:
        """The value's text form (``str()``), as template interpolation puts it in a string."""
        value = self.evaluate(context)
        try:
            return _text(value, "interpolating the value")
        except _Problem as exc:
            raise ExpressionEvalError(f"{exc} in {_quote(self.text)}") from exc.__cause__

    def references(self) -> set[tuple[str, ...]]:
        """The context paths read, e.g. ``{("steps", "enrich", "employees")}``."""
        out: set[tuple[str, ...]] = set()
        _references(self._root, out)
        return out

    def __repr__(self) -> str:
        return f"Expression({self.text!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Expression) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)


def compile_expression(text: str) -> Expression:
    """Parse ``text``; raise ``ExpressionSyntaxError`` naming the column if it does not parse."""
    if not isinstance(text, str):
        raise ExpressionSyntaxError(f"an expression must be a string, got {_type(text)}")
    if len(text) > MAX_LENGTH:
        raise ExpressionSyntaxError(
            f"expression is longer than {MAX_LENGTH} characters ({len(text)})"
            f" in {_quote(text[:40] + '...')}"
        )
    return Expression(text, _Parser(text).parse())
