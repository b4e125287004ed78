"""A small, safe expression language for workflow conditions and templates.

Python-like syntax over JSON values: ``steps.enrich.employees > 100 and lower(input.email)``.
Text is tokenized and parsed by hand into a tree of frozen dataclasses, which is then walked;
nothing reaches Python's ``eval``. Names read top-level keys of the context, ``.field`` and
``[index]`` read dict keys and list items only (never Python attributes), and calls are limited
to the whitelist in ``FUNCTIONS``. Parse problems raise ``ExpressionSyntaxError`` (with the
column), problems with a run's data raise ``ExpressionEvalError`` (ending with the expression).
"""

from __future__ import annotations

import inspect
import json
import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Context, Decimal
from functools import lru_cache
from types import MappingProxyType
from typing import Any, NoReturn

from agentfabric.errors import ExpressionEvalError, ExpressionSyntaxError

__all__ = [
    "FUNCTIONS",
    "MAX_DEPTH",
    "MAX_LENGTH",
    "Expression",
    "compile_expression",
    "to_text",
]

MAX_LENGTH = 2000  # characters in one expression
MAX_DEPTH = 50  # nested brackets, calls, unary operators and conditionals
MAX_STRING = 1_000_000  # characters in a string an operator or function builds
MAX_ITEMS = 100_000  # items in a list an operator builds
MAX_PATTERN = 1000  # characters in a matches() pattern


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


def _keys(mapping: Mapping[Any, Any]) -> str:
    names = [str(key) for key in list(mapping)[:20]]
    more = f", and {len(mapping) - 20} more" if len(mapping) > 20 else ""
    return ", ".join(names) + more


def _quote(text: str) -> str:
    return '"' + re.sub(r"[\r\n\t]", " ", text) + '"'


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
    return _finite(sum(items), "the result of sum()")


_NUMBER = re.compile(r"\s*[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\s*")


def _convert(name: str, value: Any) -> Any:
    _want(name, None, value, "number", "string", "boolean")
    if isinstance(value, str):
        if not _NUMBER.fullmatch(value):
            raise _Problem(f"{name}() cannot convert {_show(value)} to a number")
        try:
            value = int(value) if name == "int" and value.strip().isdigit() else float(value)
        except ValueError as exc:  # more digits than Python converts
            raise _Problem(f"{name}() cannot convert a number this long") from exc
    value = _finite(float(value) if name == "float" else value, f"the result of {name}()")
    return int(value) if name == "int" else value


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


@lru_cache(maxsize=256)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _matches(s: Any, pattern: Any) -> bool:
    _want("matches", 1, s, "string")
    _want("matches", 2, pattern, "string")
    if len(pattern) > MAX_PATTERN:
        raise _Problem(f"matches() takes a pattern of at most {MAX_PATTERN} characters")
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
    "matches": _matches,
})


def _arity(fn: Callable[..., Any]) -> tuple[int, int | None]:
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return 1, None
    return sum(p.default is p.empty for p in params), len(params)


_ARITY = {name: _arity(fn) for name, fn in FUNCTIONS.items()}

# ---------------------------------------------------------------- syntax tree


@dataclass(frozen=True, slots=True)
class _Const:
    value: Any


@dataclass(frozen=True, slots=True)
class _Name:
    name: str


@dataclass(frozen=True, slots=True)
class _Attr:
    name: str


@dataclass(frozen=True, slots=True)
class _Index:
    index: _Node


@dataclass(frozen=True, slots=True)
class _Path:
    base: _Node
    base_text: str
    steps: tuple[_Attr | _Index, ...]


@dataclass(frozen=True, slots=True)
class _List:
    items: tuple[_Node, ...]


@dataclass(frozen=True, slots=True)
class _Call:
    name: str
    args: tuple[_Node, ...]


@dataclass(frozen=True, slots=True)
class _Neg:
    operand: _Node


@dataclass(frozen=True, slots=True)
class _Not:
    operand: _Node


@dataclass(frozen=True, slots=True)
class _BoolOp:
    op: str  # "and" | "or"
    operands: tuple[_Node, ...]


@dataclass(frozen=True, slots=True)
class _Chain:  # arithmetic or comparison, left to right: first (op operand)*
    first: _Node
    rest: tuple[tuple[str, _Node], ...]


@dataclass(frozen=True, slots=True)
class _Cond:
    body: _Node
    test: _Node
    orelse: _Node


_Node = _Const | _Name | _Path | _List | _Call | _Neg | _Not | _BoolOp | _Chain | _Cond

# ---------------------------------------------------------------- tokenizer and parser

_TOKEN = re.compile(
    r"(?P<space>\s+)|(?P<num>[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<op>//|==|!=|<=|>=|[-+*/%<>()\[\],.])"
)
_LITERALS = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}
_KEYWORDS = {"and", "or", "not", "in", "if", "else", *_LITERALS}
_ESCAPES = {"\\": "\\", "'": "'", '"': '"', "n": "\n", "t": "\t", "r": "\r", "/": "/", "0": "\0"}
_HINTS = {"=": "use '==' to compare", "!": "use 'not' or '!='", "&": "use 'and'", "|": "use 'or'"}
_COMPARISONS = {"==", "!=", "<", "<=", ">", ">="}


@dataclass(frozen=True, slots=True)
class _Tok:
    kind: str  # num str name kw op end
    value: Any
    col: int  # 1-based
    text: str

    @property
    def desc(self) -> str:
        return "end of expression" if self.kind == "end" else f"'{self.text}'"


class _Parser:
    def __init__(self, text: str) -> None:
        self.text, self.i, self.depth = text, 0, -1
        self.toks = self._tokenize()

    def fail(self, message: str, col: int, hint: str = "") -> NoReturn:
        raise ExpressionSyntaxError(f"{message} at column {col} in {_quote(self.text)}{hint}")

    def _tokenize(self) -> list[_Tok]:
        text, toks, i = self.text, [], 0
        while i < len(text):
            if text[i] in "'\"":
                value, end = self._string(i)
                toks.append(_Tok("str", value, i + 1, text[i:end]))
                i = end
                continue
            m = _TOKEN.match(text, i)
            if m is None:
                hint = f"; {_HINTS[text[i]]}" if text[i] in _HINTS else ""
                self.fail(f"unexpected character '{text[i]}'", i + 1, hint)
            kind, word = m.lastgroup or "", m.group()
            if kind == "num":
                num = float(word) if any(c in word for c in ".eE") else int(word)
                if not math.isfinite(num):
                    self.fail(f"number {word} is too large", i + 1)
                toks.append(_Tok(kind, num, i + 1, word))
            elif kind != "space":
                kind = "kw" if kind == "name" and word in _KEYWORDS else kind
                toks.append(_Tok(kind, word, i + 1, word))
            i = m.end()
        return [*toks, _Tok("end", None, len(text) + 1, "")]

    def _string(self, start: int) -> tuple[str, int]:
        text, out, i = self.text, [], start + 1
        while i < len(text) and text[i] != text[start]:
            if text[i] == "\\" and i + 1 < len(text):
                esc, hexa = text[i + 1], text[i + 2 : i + 6]
                if esc == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", hexa):
                    out.append(chr(int(hexa, 16)))
                    i += 6
                    continue
                if esc not in _ESCAPES:
                    self.fail(f"unknown escape '\\{esc}' in string", i + 1)
                out.append(_ESCAPES[esc])
                i += 1
            else:
                out.append(text[i])
            i += 1
        if i >= len(text):
            self.fail("unterminated string starting", start + 1)
        return "".join(out), i + 1

    def peek(self, ahead: int = 0) -> _Tok:
        return self.toks[min(self.i + ahead, len(self.toks) - 1)]

    def at(self, kind: str, value: str) -> bool:
        tok = self.peek()
        return tok.kind == kind and tok.value == value

    def take(self) -> _Tok:
        tok = self.peek()
        self.i = min(self.i + 1, len(self.toks) - 1)
        return tok

    def expect(self, value: str, opener: _Tok | None = None, label: str = "") -> _Tok:
        tok = self.peek()
        if tok.kind in ("op", "kw") and tok.value == value:
            return self.take()
        if tok.kind == "end" and opener is not None:
            self.fail(f"unclosed '{opener.text}' opened", opener.col)
        self.fail(f"expected {label or repr(value)} but found {tok.desc}", tok.col)

    def nest(self, col: int, delta: int = 1) -> None:
        self.depth += delta
        if self.depth > MAX_DEPTH:
            self.fail(f"expression nests deeper than {MAX_DEPTH} levels", col)

    def parse(self) -> _Node:
        node = self.expr()
        if self.peek().kind != "end":
            self.fail(f"unexpected {self.peek().desc}", self.peek().col)
        return node

    def expr(self) -> _Node:
        self.nest(self.peek().col)
        node = self.or_expr()
        if self.at("kw", "if"):
            self.take()
            test = self.or_expr()
            self.expect("else")
            node = _Cond(node, test, self.expr())
        self.nest(0, -1)
        return node

    def or_expr(self) -> _Node:
        return self.bool_op("or", self.and_expr)

    def and_expr(self) -> _Node:
        return self.bool_op("and", self.not_expr)

    def bool_op(self, word: str, sub: Callable[[], _Node]) -> _Node:
        operands = [sub()]
        while self.at("kw", word):
            self.take()
            operands.append(sub())
        return operands[0] if len(operands) == 1 else _BoolOp(word, tuple(operands))

    def not_expr(self) -> _Node:
        if not self.at("kw", "not"):
            return self.comparison()
        self.nest(self.take().col)
        node = _Not(self.not_expr())
        self.nest(0, -1)
        return node

    def comparison(self) -> _Node:
        first, rest = self.additive(), []
        while True:
            tok, nxt = self.peek(), self.peek(1)
            if (tok.kind == "op" and tok.value in _COMPARISONS) or self.at("kw", "in"):
                op = self.take().value
            elif self.at("kw", "not") and nxt.kind == "kw" and nxt.value == "in":
                self.i += 2
                op = "not in"
            else:
                break
            rest.append((op, self.additive()))
        return _Chain(first, tuple(rest)) if rest else first

    def additive(self) -> _Node:
        return self.arith(("+", "-"), self.term)

    def term(self) -> _Node:
        return self.arith(("*", "/", "//", "%"), self.unary)

    def arith(self, ops: tuple[str, ...], sub: Callable[[], _Node]) -> _Node:
        first, rest = sub(), []
        while self.peek().kind == "op" and self.peek().value in ops:
            op = self.take().value
            rest.append((op, sub()))
        return _Chain(first, tuple(rest)) if rest else first

    def unary(self) -> _Node:
        if not self.at("op", "-"):
            return self.postfix()
        self.nest(self.take().col)
        operand = self.unary()
        self.nest(0, -1)
        if isinstance(operand, _Const) and _is_num(operand.value):
            return _Const(-operand.value)
        return _Neg(operand)

    def postfix(self) -> _Node:
        start = self.peek()
        node = self.primary()
        end = self.toks[self.i - 1]
        steps: list[_Attr | _Index] = []
        while self.at("op", ".") or self.at("op", "["):
            opener = self.take()
            if opener.value == "[":
                steps.append(_Index(self.expr()))
                self.expect("]", opener)
                continue
            name = self.peek()
            if name.kind not in ("name", "kw"):
                self.fail(f"expected a field name after '.' but found {name.desc}", name.col)
            steps.append(_Attr(self.take().text))
        if not steps:
            return node
        return _Path(node, self.text[start.col - 1 : end.col - 1 + len(end.text)], tuple(steps))

    def primary(self) -> _Node:
        tok = self.peek()
        if tok.kind in ("num", "str"):
            return _Const(self.take().value)
        if tok.kind == "kw" and tok.value in _LITERALS:
            return _Const(_LITERALS[self.take().value])
        if tok.kind == "name":
            self.take()
            return self.call(tok) if self.at("op", "(") else _Name(tok.value)
        if tok.kind == "op" and tok.value in ("(", "["):
            opener = self.take()
            if opener.value == "[":
                return _List(self.items("]", opener))
            node = self.expr()
            self.expect(")", opener)
            return node
        after = f" after '{self.toks[self.i - 1].text}'" if self.i else ""
        found = "" if tok.kind == "end" else f" but found {tok.desc}"
        self.fail(f"expected a value{after}{found}", tok.col)

    def items(self, closer: str, opener: _Tok) -> tuple[_Node, ...]:
        items: list[_Node] = []
        while not self.at("op", closer):
            if self.peek().kind == "end":
                self.fail(f"unclosed '{opener.text}' opened", opener.col)
            items.append(self.expr())
            if not self.at("op", ","):
                break
            self.take()
        self.expect(closer, opener, f"',' or '{closer}'")
        return tuple(items)

    def call(self, name: _Tok) -> _Node:
        if name.value not in FUNCTIONS:
            known = ", ".join(sorted(FUNCTIONS))
            self.fail(f"unknown function '{name.value}'", name.col, f"; known functions: {known}")
        args = self.items(")", self.take())
        low, high = _ARITY[name.value]
        if len(args) < low or (high is not None and len(args) > high):
            count = (
                f"at least {low}" if high is None
                else f"{low}" if low == high
                else f"{low} or {high}" if high == low + 1
                else f"{low} to {high}"
            )
            plural = "" if (low if high is None else high) == 1 else "s"
            self.fail(f"{name.value}() takes {count} argument{plural}, got {len(args)}", name.col)
        return _Call(name.value, args)


# ---------------------------------------------------------------- evaluation

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
    if op == "+" and (type(a), type(b)) in ((str, str), (list, list)):
        return _check_size(a + b, "'+'")
    if not (_is_num(a) and _is_num(b)):
        raise _Problem(_ARITH_ERRORS[op].format(a=_type(a), b=_type(b)))
    if op in ("/", "//", "%") and b == 0:
        raise _Problem("cannot divide by zero")
    try:
        return _finite(_ARITH[op](a, b), f"the result of '{op}'")
    except OverflowError as exc:
        raise _Problem(f"the result of '{op}' is too large") from exc


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
        what = f"field '{key}'" if isinstance(key, str) else f"key {_show(key)}"
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
        raise _Problem(f"{where} is {_a(kind)}, not an object, so it has no field '{key}'")
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
                plain = isinstance(key, str) and key.isidentifier()
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
