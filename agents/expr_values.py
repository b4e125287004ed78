"""The limits of the expression language and the JSON value rules its operators and functions share.

Every limit lives here, so the parser, the evaluator, the functions and the templates agree:
an expression is at most ``MAX_LENGTH`` characters and nests at most ``MAX_DEPTH`` levels; a
string it builds is at most ``MAX_STRING`` characters and a list at most ``MAX_ITEMS`` items,
checked *before* the string or list is built; a value it compares or turns into text is nested
at most ``MAX_NESTING`` levels; ``matches()`` takes a pattern of at most ``MAX_PATTERN``
characters and searches a string of at most ``MAX_SUBJECT``.
The value rules: JSON type names, equality where ``1 == 1.0`` but ``true != 1``, membership
and the ``str()`` text form. Names with a leading underscore are private to the expression
language (:mod:`agents.functions`, :mod:`agents.expr_parser`, :mod:`agents.expr`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from agentfabric.errors import ExpressionEvalError

__all__ = [
    "MAX_DEPTH",
    "MAX_ITEMS",
    "MAX_LENGTH",
    "MAX_NESTING",
    "MAX_PATTERN",
    "MAX_STRING",
    "MAX_SUBJECT",
    "to_text",
]

MAX_LENGTH = 2000  # characters in one expression
MAX_DEPTH = 50  # nested brackets, calls, unary operators and conditionals in one expression
MAX_STRING = 1_000_000  # characters in a string an operator, function or template builds
MAX_ITEMS = 100_000  # items in a list an operator or function builds
MAX_NESTING = 100  # levels of lists and objects in a value compared or turned into text
MAX_PATTERN = 1000  # characters in a matches() pattern
MAX_SUBJECT = 10_000  # characters in the string matches() searches (RE2 time is linear in it)
_PATTERN_MEMORY = 2 << 20  # bytes RE2 may use per compiled pattern (re2 caches 128 patterns)
_MAX_INT_BITS = 13_000  # in an arithmetic result: about 3900 digits, which Python turns to text


class _Problem(ExpressionEvalError):
    """An evaluation error before ``Expression.evaluate`` appends the expression text."""


def _type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "list"
    return "object" if isinstance(value, Mapping) else type(value).__name__


def _a(kind: str) -> str:
    return kind if kind == "null" else ("an " if kind[0] in "aeiou" else "a ") + kind


def _is_num(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _finite(value: Any, what: str) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        raise _Problem(f"{what} is not a finite number")
    return value


# ---------------------------------------------------------------- sizes, before building


def _too_long(what: str) -> _Problem:
    return _Problem(f"{what} would build a string longer than {MAX_STRING} characters")


def _too_many(what: str) -> _Problem:
    return _Problem(f"{what} would build a list longer than {MAX_ITEMS} items")


def _too_deep(what: str) -> _Problem:
    return _Problem(f"{what} cannot handle a value nested more than {MAX_NESTING} levels deep")


def _check_length(length: int, what: str) -> None:
    """Refuse a string of ``length`` characters before it is built."""
    if length > MAX_STRING:
        raise _too_long(what)


def _check_count(count: int, what: str) -> None:
    """Refuse a list of ``count`` items before it is built."""
    if count > MAX_ITEMS:
        raise _too_many(what)


def _text_size(value: Any, what: str) -> int:
    """About the length of ``to_text(value)`` (never more), without building it.

    Walks the value without recursion, counting every appearance of a shared list or string
    (as the text would), and stops with an error as soon as the count passes ``MAX_STRING`` or
    the walk goes deeper than ``MAX_NESTING`` levels, so the cost is bounded by the limits.
    """
    size = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        container, depth = stack.pop()
        size += 2 + len(container)  # brackets and separators
        if isinstance(container, Mapping):
            size += sum(len(key) + 2 if isinstance(key, str) else 1 for key in container)
            container = container.values()
        for item in container:
            if isinstance(item, str):
                size += len(item) + 2
            elif isinstance(item, Mapping | list | tuple):
                if depth >= MAX_NESTING:
                    raise _too_deep(what)
                stack.append((item, depth + 1))
            else:
                size += 1
            if size > MAX_STRING:
                raise _too_long(what)
    if size > MAX_STRING:
        raise _too_long(what)
    return size


def _text(value: Any, what: str) -> str:
    """``to_text`` that names ``what`` when the value is too large or too deep for text."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if _is_num(value):
        try:
            return str(value)
        except ValueError as exc:  # an integer of more digits than Python writes out
            raise _Problem(f"{what} cannot write a number this large") from exc
    if isinstance(value, Mapping | list | tuple):
        _text_size(value, what)
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        text = str(value)
    _check_length(len(text), what)  # escapes can make the text up to 6 times the estimate
    return text


def to_text(value: Any) -> str:
    """The string form used by ``str()`` and template interpolation.

    Raises ``ExpressionEvalError`` for a list or object whose text would pass ``MAX_STRING``
    characters or that is nested more than ``MAX_NESTING`` levels deep.
    """
    return _text(value, "str()")


_SHOWN = 80  # characters of a value from the data that an error message quotes


def _clip(text: str) -> str:
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


def _show(value: Any) -> str:
    """A value quoted in an error message: JSON text, cut short after ``_SHOWN`` characters."""
    if isinstance(value, str):
        return json.dumps(value[:_SHOWN]) + ("..." if len(value) > _SHOWN else "")
    if value is None:
        return "null"
    try:
        return _clip(to_text(value))
    except _Problem:  # too large or too deep to show: name its type instead
        return _a(_type(value))


# ---------------------------------------------------------------- equality and membership


def _equal(a: Any, b: Any, depth: int = 0) -> bool:
    """JSON equality: 1 == 1.0, but true != 1; refuses to walk more than ``MAX_NESTING`` deep."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    lists = isinstance(a, list | tuple) and isinstance(b, list | tuple)
    mappings = isinstance(a, Mapping) and isinstance(b, Mapping)
    if (lists or mappings) and depth >= MAX_NESTING:
        raise _Problem(f"cannot compare values nested more than {MAX_NESTING} levels deep")
    if lists:
        return len(a) == len(b) and all(
            _equal(x, y, depth + 1) for x, y in zip(a, b, strict=True)
        )
    if mappings:
        return a.keys() == b.keys() and all(_equal(a[k], b[k], depth + 1) for k in a)
    return bool(a == b)


def _contains(container: Any, item: Any, who: str) -> bool:
    if isinstance(container, str):
        if not isinstance(item, str):
            raise _Problem(f"{who} cannot look for {_a(_type(item))} in a string")
        return item in container
    if isinstance(container, list | tuple):
        return any(_equal(item, x) for x in container)
    if isinstance(container, Mapping):
        try:
            return item in container
        except TypeError:
            return False
    raise _Problem(f"{who} needs a string, list or object to look in, got {_type(container)}")
