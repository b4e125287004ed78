"""Tokenizer and parser of the expression language: text in, a tree of frozen dataclasses out.

:func:`agents.expr.compile_expression` calls ``_Parser(text).parse()`` and
:mod:`agents.expr` walks the resulting ``_Node`` tree. Every problem raises
``ExpressionSyntaxError`` naming the column. Calls are checked here against the whitelist in
:data:`agents.functions.FUNCTIONS` (the name and the number of arguments), so an expression
that parses only ever calls a known function; a literal ``matches()`` pattern is compiled here
too, so a pattern RE2 cannot run fails when the workflow loads.
Names with a leading underscore are private to the expression language, not part of its API.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from agentfabric.errors import ExpressionSyntaxError
from agents.expr_values import MAX_DEPTH, _is_num
from agents.functions import _ARITY, FUNCTIONS, _BadPattern, _regex

__all__ = ["MAX_DEPTH"]


def _quote(text: str) -> str:
    return '"' + re.sub(r"[\r\n\t]", " ", text) + '"'


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
        first = self.i
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
        if name.value == "matches" and isinstance(args[1], _Const):
            self.check_pattern(args[1].value, self.toks[first : self.i])
        return _Call(name.value, args)

    def check_pattern(self, pattern: Any, toks: list[_Tok]) -> None:
        """A literal ``matches()`` pattern RE2 cannot compile fails when the workflow loads."""
        if isinstance(pattern, str):
            try:
                _regex(pattern)
            except _BadPattern as exc:  # the literal is the call's last string token
                col = next(tok.col for tok in reversed(toks) if tok.kind == "str")
                self.fail(exc.detail, col, f"; {exc.hint}" if exc.hint else "")
