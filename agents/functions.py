"""The whitelisted functions of the expression language.

``FUNCTIONS`` maps each name an expression may call (``lower``, ``len``, ``round``, ``get``,
``matches``, ...) to its implementation; each checks its own arguments and raises a readable
error naming the function and the argument. Functions that build strings or lists work out the
size of the result first and refuse it, before building anything, when it would pass the
limits in :mod:`agents.expr_values` (which also holds the value rules the operators in
:mod:`agents.expr` use). ``matches()`` runs on RE2, whose time is linear in the string searched:
a pattern RE2 does not support (backreferences, lookaround) is an error, not a slow search.
Names with a leading underscore are private to the expression language (this module,
:mod:`agents.expr_parser` and :mod:`agents.expr`), not part of its API.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from decimal import ROUND_HALF_UP, Context, Decimal
from types import MappingProxyType
from typing import Any

import re2

from agents.expr_values import (
    _MAX_INT_BITS,
    _PATTERN_MEMORY,
    MAX_ITEMS,
    MAX_PATTERN,
    MAX_STRING,
    MAX_SUBJECT,
    _a,
    _check_count,
    _check_length,
    _contains,
    _finite,
    _is_num,
    _Problem,
    _show,
    _text,
    _type,
    to_text,
)

__all__ = [
    "FUNCTIONS",
    "MAX_ITEMS",
    "MAX_PATTERN",
    "MAX_STRING",
    "MAX_SUBJECT",
    "to_text",
]

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


def _case_fn(name: str, op: Callable[[str], str]) -> Callable[[Any], Any]:
    """``lower``/``upper``: a character maps to one to three, so the result is refused when
    the string alone passes the limit, and checked again once built (at most three times it)."""
    def fn(s: Any) -> Any:
        _want(name, None, s, "string")
        _check_length(len(s), f"{name}()")
        result = op(s)
        _check_length(len(result), f"{name}()")
        return result

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
    if sep is None:  # on runs of whitespace: stop one piece past the limit
        parts: list[str] = s.split(maxsplit=MAX_ITEMS)
        _check_count(len(parts), "split()")
        return parts
    _want("split", 2, sep, "string")
    if not sep:
        raise _Problem("split() needs a non-empty separator")
    _check_count(s.count(sep) + 1, "split()")
    return s.split(sep)


def _join(items: Any, sep: Any = "") -> str:
    _want("join", 1, items, "list")
    _want("join", 2, sep, "string")
    total = len(sep) * max(len(items) - 1, 0)
    _check_length(total, "join()")
    texts: list[str] = []
    for item in items:  # the texts so far stay under the limit, so nothing large is built
        text = _text(item, "join()")
        total += len(text)
        _check_length(total, "join()")
        texts.append(text)
    return str(sep).join(texts)


def _replace(s: Any, old: Any, new: Any) -> str:
    for pos, value in enumerate((s, old, new), 1):
        _want("replace", pos, value, "string")
    count = s.count(old) if old else len(s) + 1
    _check_length(len(s) + count * (len(new) - len(old)), "replace()")
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
        total = _finite(sum(items), "the result of sum()")
    except OverflowError as exc:
        raise _Problem("the result of sum() is too large") from exc
    if isinstance(total, int) and total.bit_length() > _MAX_INT_BITS:
        raise _Problem("the result of sum() is too large")
    return total


_NUMBER = re2.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_INTEGER = re2.compile(r"[+-]?[0-9]+")


def _convert(name: str, value: Any) -> Any:
    _want(name, None, value, "number", "string", "boolean")
    if isinstance(value, str) and not _NUMBER.fullmatch(value.strip()):
        raise _Problem(f"{name}() cannot convert {_show(value)} to a number")
    try:
        if isinstance(value, str):  # strip(): the whitespace int() and float() accept
            value = int(value) if _INTEGER.fullmatch(value.strip()) else float(value)
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
    _check_count(len(items), "pluck()")
    keys = path.split(".")
    found = []
    for item in items:
        value = item
        for key in keys:
            if not isinstance(value, Mapping):
                value = None
                break
            value = _fetch("pluck", value, key, None)
        found.append(value)
    return found


def _pattern_options() -> Any:
    options = re2.Options()
    options.max_mem = _PATTERN_MEMORY
    options.log_errors = False  # the reason reaches the user in the error instead
    return options


_OPTIONS = _pattern_options()


class _BadPattern(_Problem):
    """A ``matches()`` pattern that cannot be used; the parser reports a literal one."""

    def __init__(self, detail: str, hint: str = "") -> None:
        super().__init__(f"{detail}; {hint}" if hint else detail)
        self.detail, self.hint = detail, hint


def _regex(pattern: str) -> Any:
    """``pattern`` compiled by RE2 (re2 keeps the last 128 in its own LRU cache).

    Also called by the parser on a literal pattern, so a bad one fails when the workflow loads.
    """
    if len(pattern) > MAX_PATTERN:
        raise _BadPattern(f"matches() takes a pattern of at most {MAX_PATTERN} characters")
    try:
        return re2.compile(pattern, _OPTIONS)
    except re2.error as exc:
        detail = exc.args[0] if exc.args else ""
        reason = detail.decode(errors="replace") if isinstance(detail, bytes) else str(detail)
        raise _BadPattern(
            f"matches() got an invalid regular expression ({reason})",
            "patterns use RE2 syntax, which has no backreferences or lookaround",
        ) from exc


def _matches(s: Any, pattern: Any) -> bool:
    _want("matches", 1, s, "string")
    _want("matches", 2, pattern, "string")
    regex = _regex(pattern)
    if len(s) > MAX_SUBJECT:  # RE2's time is linear in it, times the pattern's size
        raise _Problem(
            f"matches() searches a string of at most {MAX_SUBJECT} characters, got {len(s)}"
        )
    return regex.search(s) is not None


def _coalesce(*args: Any) -> Any:
    return next((arg for arg in args if arg is not None), None)


FUNCTIONS: Mapping[str, Callable[..., Any]] = MappingProxyType({
    "lower": _case_fn("lower", str.lower),
    "upper": _case_fn("upper", str.upper),
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
