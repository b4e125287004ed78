"""The whitelisted functions of the expression language, and the JSON value rules they share.

``FUNCTIONS`` maps each name an expression may call (``lower``, ``len``, ``round``, ``get``,
``matches``, ...) to its implementation; each checks its own arguments and raises a readable
error naming the function and the argument. The value rules here (JSON type names, equality
where ``1 == 1.0`` but ``true != 1``, membership, the ``str()`` text form and the size limits)
are also what the operators in :mod:`agents.expr` use, so both live below the evaluator.
Names with a leading underscore are private to the expression language (this module,
:mod:`agents.expr_parser` and :mod:`agents.expr`), not part of its API.
"""

from __future__ import annotations

import inspect
import json
import math
import re
from collections.abc import Callable, Mapping
from decimal import ROUND_HALF_UP, Context, Decimal
from functools import lru_cache
from types import MappingProxyType
from typing import Any

from agentfabric.errors import ExpressionEvalError

__all__ = [
    "FUNCTIONS",
    "MAX_ITEMS",
    "MAX_PATTERN",
    "MAX_STRING",
    "MAX_SUBJECT",
    "to_text",
]

MAX_STRING = 1_000_000  # characters in a string an operator or function builds
MAX_ITEMS = 100_000  # items in a list an operator builds
MAX_PATTERN = 1000  # characters in a matches() pattern
MAX_SUBJECT = 10_000  # characters in the string matches() searches


class _Problem(ExpressionEvalError):
    """An evaluation error before ``Expression.evaluate`` appends the expression text."""


# ---------------------------------------------------------------- value helpers


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


def to_text(value: Any) -> str:
    """The string form used by ``str()`` and template interpolation."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if _is_num(value):
        return str(value)
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(value)


def _show(value: Any) -> str:
    return json.dumps(value) if value is None or isinstance(value, str) else to_text(value)


def _equal(a: Any, b: Any) -> bool:
    """JSON equality: 1 == 1.0, but true != 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
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


def _check_size(value: Any, what: str) -> Any:
    if isinstance(value, str) and len(value) > MAX_STRING:
        raise _Problem(f"{what} would build a string longer than {MAX_STRING} characters")
    if isinstance(value, list) and len(value) > MAX_ITEMS:
        raise _Problem(f"{what} would build a list longer than {MAX_ITEMS} items")
    return value


def _finite(value: Any, what: str) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        raise _Problem(f"{what} is not a finite number")
    return value


# ---------------------------------------------------------------- functions


def _want(fn: str, pos: int | None, value: Any, *kinds: str) -> None:
    if _type(value) not in kinds:
        wanted = _a(kinds[0]) + (", " + ", ".join(kinds[1:-1]) if len(kinds) > 2 else "")
        wanted += f" or {kinds[-1]}" if len(kinds) > 1 else ""
        where = "" if pos is None else f" as argument {pos}"
        raise _Problem(f"{fn}() expects {wanted}{where}, got {_type(value)}")


def _string_fn(name: str, op: Callable[[str], Any]) -> Callable[[Any], Any]:
    def fn(s: Any) -> Any:
        _want(name, None, s, "string")
        return op(s)

    return fn


def _affix_fn(name: str, op: Callable[[str, str], bool]) -> Callable[[Any, Any], Any]:
    def fn(s: Any, affix: Any) -> Any:
        _want(name, 1, s, "string")
        _want(name, 2, affix, "string")
        return op(s, affix)

    return fn


def _number_fn(name: str, op: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def fn(x: Any) -> Any:
        _want(name, None, x, "number")
        return op(_finite(x, f"the argument of {name}()"))

    return fn


def _extreme_fn(name: str, pick: Callable[..., Any]) -> Callable[..., Any]:
    def fn(*args: Any) -> Any:
        items: Any = args
        if len(args) == 1:
            _want(name, None, args[0], "list")
            items = args[0]
            if not items:
                raise _Problem(f"{name}() of an empty list")
        kinds = {_type(item) for item in items}
        if kinds not in ({"number"}, {"string"}):
            got = ", ".join(sorted(kinds))
            raise _Problem(f"{name}() compares only numbers or only strings, got {got}")
        return pick(items)

    return fn


def _len(value: Any) -> int:
    _want("len", None, value, "string", "list", "object")
    return len(value)


def _contains_fn(container: Any, item: Any) -> bool:
    _want("contains", 1, container, "string", "list", "object")
    return _contains(container, item, "contains()")


def _split(s: Any, sep: Any = None) -> Any:
    _want("split", 1, s, "string")
    if sep is not None:
        _want("split", 2, sep, "string")
        if not sep:
            raise _Problem("split() needs a non-empty separator")
    return s.split(sep)


def _join(items: Any, sep: Any = "") -> str:
    _want("join", 1, items, "list")
    _want("join", 2, sep, "string")
    return str(_check_size(sep.join(to_text(item) for item in items), "join()"))


def _replace(s: Any, old: Any, new: Any) -> str:
    for pos, value in enumerate((s, old, new), 1):
        _want("replace", pos, value, "string")
    count = s.count(old) if old else len(s) + 1
    if len(s) + count * (len(new) - len(old)) > MAX_STRING:
        raise _Problem(f"replace() would build a string longer than {MAX_STRING} characters")
    return str(s.replace(old, new))


def _round(x: Any, ndigits: Any = 0) -> Any:
    _want("round", 1, x, "number")
    _want("round", 2, ndigits, "number")
    if not isinstance(ndigits, int) or abs(ndigits) > 100:
        raise _Problem(f"round() needs a whole number of digits from -100 to 100, got {ndigits}")
    if isinstance(x, int) and ndigits >= 0:
        return x
    exact = Decimal(repr(_finite(x, "the argument of round()")))
    context = Context(prec=abs(exact.adjusted()) + abs(ndigits) + 30)
    rounded = exact.quantize(Decimal(1).scaleb(-ndigits), ROUND_HALF_UP, context)
    return int(rounded) if ndigits <= 0 else float(rounded)


def _sum(items: Any) -> Any:
    _want("sum", None, items, "list")
    for item in items:
        if not _is_num(item):
            raise _Problem(f"sum() adds only numbers, got {_type(item)}")
    try:
        return _finite(sum(items), "the result of sum()")
    except OverflowError as exc:
        raise _Problem("the result of sum() is too large") from exc


_NUMBER = re.compile(r"\s*[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\s*")
_INTEGER = re.compile(r"\s*[+-]?[0-9]+\s*")


def _convert(name: str, value: Any) -> Any:
    _want(name, None, value, "number", "string", "boolean")
    if isinstance(value, str) and not _NUMBER.fullmatch(value):
        raise _Problem(f"{name}() cannot convert {_show(value)} to a number")
    try:
        if isinstance(value, str):
            value = int(value) if _INTEGER.fullmatch(value) else float(value)
        value = _finite(float(value) if name == "float" else value, f"the result of {name}()")
        return int(value) if name == "int" else value
    except (ValueError, OverflowError) as exc:  # more digits than Python converts
        raise _Problem(f"{name}() cannot convert a number this large") from exc


def _fetch(name: str, obj: Any, key: Any, default: Any) -> Any:
    if obj is None:
        return default
    _want(name, 1, obj, "object", "list")
    if isinstance(obj, Mapping):
        try:
            return obj.get(key, default)
        except TypeError:
            return default
    if not isinstance(key, int) or isinstance(key, bool):
        raise _Problem(f"{name}() on a list needs a whole-number index, got {_type(key)}")
    return obj[key] if -len(obj) <= key < len(obj) else default


def _get(obj: Any, key: Any, default: Any = None) -> Any:
    return _fetch("get", obj, key, default)


def _has(obj: Any, key: Any) -> bool:
    return _fetch("has", obj, key, _has) is not _has


def _pluck(items: Any, path: Any) -> list[Any]:
    """``pluck(hits, 'metadata.name')``: that dotted field of every item (null if missing)."""
    _want("pluck", 1, items, "list")
    _want("pluck", 2, path, "string")
    found = []
    for item in items:
        value = item
        for key in str(path).split("."):
            value = _fetch("pluck", value, key, None) if isinstance(value, Mapping) else None
        found.append(value)
    return found


@lru_cache(maxsize=256)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _matches(s: Any, pattern: Any) -> bool:
    _want("matches", 1, s, "string")
    _want("matches", 2, pattern, "string")
    if len(pattern) > MAX_PATTERN:
        raise _Problem(f"matches() takes a pattern of at most {MAX_PATTERN} characters")
    if len(s) > MAX_SUBJECT:  # bounds the time a backtracking pattern can take
        raise _Problem(
            f"matches() searches a string of at most {MAX_SUBJECT} characters, got {len(s)}"
        )
    try:
        return _regex(pattern).search(s) is not None
    except re.error as exc:
        raise _Problem(f"matches() got an invalid regular expression: {exc}") from exc


def _coalesce(*args: Any) -> Any:
    return next((arg for arg in args if arg is not None), None)


FUNCTIONS: Mapping[str, Callable[..., Any]] = MappingProxyType({
    "lower": _string_fn("lower", str.lower),
    "upper": _string_fn("upper", str.upper),
    "trim": _string_fn("trim", str.strip),
    "len": _len,
    "contains": _contains_fn,
    "startswith": _affix_fn("startswith", str.startswith),
    "endswith": _affix_fn("endswith", str.endswith),
    "split": _split,
    "join": _join,
    "replace": _replace,
    "round": _round,
    "floor": _number_fn("floor", math.floor),
    "ceil": _number_fn("ceil", math.ceil),
    "abs": _number_fn("abs", abs),
    "min": _extreme_fn("min", min),
    "max": _extreme_fn("max", max),
    "sum": _sum,
    "int": lambda value: _convert("int", value),
    "float": lambda value: _convert("float", value),
    "str": to_text,
    "bool": lambda value: bool(value),
    "coalesce": _coalesce,
    "get": _get,
    "has": _has,
    "pluck": _pluck,
    "matches": _matches,
})


def _arity(fn: Callable[..., Any]) -> tuple[int, int | None]:
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return 1, None
    return sum(p.default is p.empty for p in params), len(params)


_ARITY = {name: _arity(fn) for name, fn in FUNCTIONS.items()}
