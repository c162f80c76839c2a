"""containerd's filter syntax, as List requests carry it.

A port of containerd 1.6's ``filters`` package (scanner.go, parser.go,
quote.go, filter.go). A request has a list of filters and an item matches
when any of them matches. A filter is a comma-separated list of selectors,
all of which must match::

    selectors := selector ("," selector)*
    selector  := fieldpath (operator value)
    fieldpath := field ('.' field)*
    field     := quoted | [A-Za-z0-9_]+
    operator  := "==" | "!=" | "~="
    value     := quoted | [^\\s,]+
    quoted    := a Go string literal quoted with ", or with / or | after ~=

A selector without an operator tests that the field is present. ``!=``
matches an absent field, and ``~=`` searches the field's value (or "" when
it is absent) with a regular expression.

NOTE: ``~=`` uses Python's ``re``, not Go's RE2. The two agree on common
patterns, but not on every construct.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# A field accessor: fieldpath -> (value, present).
Adaptor = Callable[[Sequence[str]], tuple[str, bool]]

_EOF = ""
_QUOTES = "/|\""
_OPERATORS = "=!~"
_SEPARATORS = ",."


class FilterError(ValueError):
    """A filter string that does not parse; the message shows where."""


def _is_field_char(ch: str) -> bool:
    return ch == "_" or ("A" <= ch <= "Z") or ("a" <= ch <= "z") or ("0" <= ch <= "9")


def _is_value_char(ch: str) -> bool:
    return ch != "," and not ch.isspace() and ch.isprintable()


class _Scanner:
    """containerd's filter scanner: fields, values, quoted strings, operators."""

    FIELD, VALUE, QUOTED, SEPARATOR, OPERATOR, ILLEGAL, EOF, OTHER = range(8)

    def __init__(self, text: str):
        self.text = text
        self.pos = 0  # start of the character read last
        self.next_pos = 0  # start of the character after it
        self.expect_value = False
        self.error = ""

    def _next(self) -> str:
        if self.next_pos >= len(self.text):
            self.pos = self.next_pos
            return _EOF
        self.pos = self.next_pos
        ch = self.text[self.next_pos]
        self.next_pos += 1
        if ch == "\0":
            self._fail("unexpected null")
        return ch

    def peek(self) -> str:
        pos, next_pos = self.pos, self.next_pos
        ch = self._next()
        self.pos, self.next_pos = pos, next_pos
        return ch

    def _fail(self, message: str) -> None:
        if not self.error:
            self.error = message

    def scan(self) -> tuple[int, int, str]:
        """Return (position, token type, text) of the next token."""
        ch = self._next()
        while ch and ch.isspace():
            ch = self._next()
        start = self.pos
        if ch == _EOF:
            return start, self.EOF, ""
        if ch == "\0":
            return start, self.ILLEGAL, ""
        if ch in _QUOTES:
            if not self._scan_quoted(ch):
                return start, self.ILLEGAL, self.text[start : self.next_pos]
            return start, self.QUOTED, self.text[start : self.next_pos]
        if ch in _SEPARATORS:
            self.expect_value = False
            return start, self.SEPARATOR, ch
        if ch in _OPERATORS:
            while self.peek() and self.peek() in _OPERATORS:
                self._next()
            self.expect_value = True
            return start, self.OPERATOR, self.text[start : self.next_pos]
        if self.expect_value:
            while self.peek() and _is_value_char(self.peek()):
                self._next()
            self.expect_value = False
            return start, self.VALUE, self.text[start : self.next_pos]
        if _is_field_char(ch):
            while self.peek() and _is_field_char(self.peek()):
                self._next()
            return start, self.FIELD, self.text[start : self.next_pos]
        return self.pos, self.OTHER, ch

    def _scan_quoted(self, quote: str) -> bool:
        legal = True
        ch = self._next()
        while ch != quote:
            if ch in ("\n", _EOF):
                self._fail("quoted literal not terminated")
                return False
            if ch == "\\":
                ch, ok = self._scan_escape(quote)
                legal = legal and ok
            else:
                ch = self._next()
        return legal

    def _scan_escape(self, quote: str) -> tuple[str, bool]:
        ch = self._next()
        if ch and ch in "abfnrtv\\" + quote:
            return self._next(), True
        if ch and ch in "01234567":
            return self._scan_digits(ch, 8, 3)
        digits = {"x": 2, "u": 4, "U": 8}.get(ch)
        if digits:
            return self._scan_digits(self._next(), 16, digits)
        self._fail("illegal escape sequence")
        return ch, False

    def _scan_digits(self, ch: str, base: int, count: int) -> tuple[str, bool]:
        while count > 0 and ch and _digit_value(ch) < base:
            ch = self._next()
            count -= 1
        if count > 0:
            self._fail("illegal numeric escape sequence")
            return ch, False
        return ch, True


def _digit_value(ch: str) -> int:
    if "0" <= ch <= "9":
        return ord(ch) - ord("0")
    if "a" <= ch <= "f":
        return ord(ch) - ord("a") + 10
    if "A" <= ch <= "F":
        return ord(ch) - ord("A") + 10
    return 16


_SIMPLE_ESCAPES = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11, "\\": 92}


def unquote(text: str) -> str:
    """Return the string a quoted literal stands for (Go syntax; also / and | quotes)."""
    if len(text) < 2 or text[0] != text[-1] or text[0] not in "\"'|/":
        raise FilterError("quote syntax error")
    quote, body = text[0], text[1:-1]
    if "\n" in body:
        raise FilterError("quote syntax error")
    out = bytearray()
    i = 0
    while i < len(body):
        ch = body[i]
        if ch == quote:
            raise FilterError("quote syntax error")
        if ch != "\\":
            out += ch.encode("utf-8", "surrogateescape")
            i += 1
            continue
        if i + 1 >= len(body):
            raise FilterError("quote syntax error")
        code = body[i + 1]
        i += 2
        if code in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[code])
        elif code in "\"'|/":
            if code != quote:
                raise FilterError("quote syntax error")
            out += code.encode()
        elif code in "xuU":
            width = {"x": 2, "u": 4, "U": 8}[code]
            digits = body[i : i + width]
            if len(digits) < width or any(_digit_value(d) >= 16 for d in digits):
                raise FilterError("quote syntax error")
            i += width
            value = int(digits, 16)
            if code == "x":
                out.append(value)
            elif value > 0x10FFFF:
                raise FilterError("quote syntax error")
            else:
                out += chr(value).encode("utf-8", "surrogatepass")
        elif code in "01234567":
            digits = body[i : i + 2]
            if len(digits) < 2 or any(d not in "01234567" for d in digits):
                raise FilterError("quote syntax error")
            i += 2
            value = int(code + digits, 8)
            if value > 255:
                raise FilterError("quote syntax error")
            out.append(value)
        else:
            raise FilterError("quote syntax error")
        if quote == "'" and i < len(body):
            raise FilterError("quote syntax error")
    return out.decode("utf-8", "surrogateescape")


@dataclass
class Selector:
    """One ``fieldpath [operator value]`` test."""

    fieldpath: list[str]
    operator: str = ""  # "" tests presence
    value: str = ""
    _regex: re.Pattern | None = field(default=None, repr=False)
    _regex_failed: bool = field(default=False, repr=False)

    def matches(self, adaptor: Adaptor) -> bool:
        value, present = adaptor(self.fieldpath)
        if self.operator == "":
            return present
        if self.operator == "==":
            return present and value == self.value
        if self.operator == "!=":
            return value != self.value
        return self._search(value)

    def _search(self, value: str) -> bool:
        if self._regex is None and not self._regex_failed:
            try:
                self._regex = re.compile(self.value)
            except re.error as error:
                log.error("invalid regular expression %r in a filter: %s", self.value, error)
                self._regex_failed = True
        return self._regex is not None and self._regex.search(value) is not None


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.scanner = _Scanner(text)

    def _error(self, pos: int, message: str) -> FilterError:
        if pos < len(self.text):
            where = f"{self.text[:pos]} >|{self.text[pos]}|< {self.text[pos + 1:]}"
        else:
            where = self.text
        return FilterError(f"filters: parse error: [{where}]: {message}")

    def parse(self) -> list[Selector]:
        selectors = [self._selector()]
        while True:
            ch = self.scanner.peek()
            if ch == ",":
                self.scanner.scan()
                selectors.append(self._selector())
            elif ch == _EOF:
                return selectors
            else:
                raise self._error(self.scanner.next_pos, f"unexpected input: {ch}")

    def _selector(self) -> Selector:
        fieldpath = self._fieldpath()
        if self.scanner.peek() in (",", _EOF):
            return Selector(fieldpath)
        operator = self._operator()
        value = self._value(allow_alternative_quotes=operator == "~=")
        return Selector(fieldpath, operator, value)

    def _fieldpath(self) -> list[str]:
        fields = [self._field()]
        while self.scanner.peek() == ".":
            self.scanner.scan()
            fields.append(self._field())
        return fields

    def _field(self) -> str:
        pos, kind, text = self.scanner.scan()
        if kind == _Scanner.FIELD:
            return text
        if kind == _Scanner.QUOTED:
            return self._unquote(pos, text, allow_alternatives=False)
        if kind == _Scanner.ILLEGAL:
            raise self._error(pos, self.scanner.error)
        raise self._error(pos, "expected field or quoted")

    def _operator(self) -> str:
        pos, kind, text = self.scanner.scan()
        if kind == _Scanner.OPERATOR:
            if text in ("==", "!=", "~="):
                return text
            raise self._error(pos, f"unsupported operator {text!r}")
        if kind == _Scanner.ILLEGAL:
            raise self._error(pos, self.scanner.error)
        raise self._error(pos, 'expected an operator ("=="|"!="|"~=")')

    def _value(self, allow_alternative_quotes: bool) -> str:
        pos, kind, text = self.scanner.scan()
        if kind in (_Scanner.VALUE, _Scanner.FIELD):
            return text
        if kind == _Scanner.QUOTED:
            return self._unquote(pos, text, allow_alternative_quotes)
        if kind == _Scanner.ILLEGAL:
            raise self._error(pos, self.scanner.error)
        if kind == _Scanner.EOF:
            raise FilterError(f"filters: unexpected end of filter {self.text!r}")
        raise self._error(pos, "expected value or quoted")

    def _unquote(self, pos: int, text: str, allow_alternatives: bool) -> str:
        if not allow_alternatives and text[0] not in "'\"":
            raise self._error(pos, "invalid quote encountered")
        try:
            return unquote(text)
        except FilterError as error:
            raise self._error(pos, f"unquoting failed: {error}") from None


@dataclass
class Filter:
    """Any of several filters; each is a list of selectors that must all match."""

    alternatives: list[list[Selector]]

    def matches(self, adaptor: Adaptor) -> bool:
        if not self.alternatives:
            return True
        return any(
            all(selector.matches(adaptor) for selector in selectors)
            for selectors in self.alternatives
        )


def parse_filters(texts: Sequence[str]) -> Filter:
    """Parse a List request's filters; FilterError names the one that fails.

    An empty filter string matches everything, as does an empty list. The
    filters after an empty one are still parsed, so an invalid one fails the
    request as it does in containerd's filters.ParseAll.
    """
    alternatives = []
    matches_all = False
    for text in texts:
        if text == "":
            matches_all = True
            continue
        alternatives.append(_Parser(text).parse())
    return Filter([]) if matches_all else Filter(alternatives)
