"""containerd's filter language, enough for ``walk`` and the gRPC List call.

Grammar (as containerd's ``filters`` package)::

    filters  := filter*                       any filter may match (OR)
    filter   := selector ("," selector)*      every selector must match (AND); "" matches everything
    selector := fieldpath (operator value)?   no operator: the field is present
    fieldpath:= field ("." field)*
    field    := quoted | [A-Za-z0-9_]+
    operator := "==" | "!=" | "~="           "~=" is a regular expression search
    value    := quoted | [^\\s,]+              after "~=" also /regex/ or |regex|
    quoted   := "..." with backslash escapes

Nothing here knows about snapshots: callers pass an *adaptor* mapping a fieldpath to ``(value, present)``.
It is generic so the images/content listings can reuse it (it could move to a shared module later).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from cargohold.errors import InvalidArgumentError
from cargohold.snapshots.base import Info

Adaptor = Callable[[tuple[str, ...]], tuple[str, bool]]
"""Maps a fieldpath (e.g. ("labels", "a.b")) to (value, present)."""

_FIELD_CHARS = re.compile(r"[A-Za-z0-9_]+")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0"}


@dataclass(frozen=True, slots=True)
class _Selector:
    fieldpath: tuple[str, ...]
    operator: str  # "", "==", "!=", "~="
    value: str
    regex: re.Pattern[str] | None

    def match(self, adaptor: Adaptor) -> bool:
        value, present = adaptor(self.fieldpath)
        if self.operator == "":
            return present
        if self.operator == "==":
            return present and value == self.value
        if self.operator == "!=":
            return value != self.value
        assert self.regex is not None
        return present and self.regex.search(value) is not None


@dataclass(frozen=True, slots=True)
class Filter:
    """A parsed list of filters: matches when any conjunction matches (no filters: everything)."""

    alternatives: tuple[tuple[_Selector, ...], ...]

    def match(self, adaptor: Adaptor) -> bool:
        if not self.alternatives:
            return True
        return any(all(sel.match(adaptor) for sel in conj) for conj in self.alternatives)


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, what: str) -> InvalidArgumentError:
        return InvalidArgumentError(f"filter {self.text!r}: {what} at offset {self.pos}")

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self, n: int = 1) -> str:
        return self.text[self.pos : self.pos + n]

    def quoted(self, quote: str) -> str:
        self.pos += 1  # opening quote
        out: list[str] = []
        while self.pos < len(self.text):
            ch = self.text[self.pos]
            self.pos += 1
            if ch == quote:
                return "".join(out)
            if ch == "\\" and self.pos < len(self.text):
                esc = self.text[self.pos]
                self.pos += 1
                # Inside /regex/ keep escapes for the regex engine, except an escaped delimiter.
                if quote != '"' and esc != quote:
                    out.append("\\" + esc)
                else:
                    out.append(_ESCAPES.get(esc, esc))
                continue
            out.append(ch)
        raise self.fail("unterminated quoted string")

    def field(self) -> str:
        self.skip_space()
        if self.peek() == '"':
            return self.quoted('"')
        m = _FIELD_CHARS.match(self.text, self.pos)
        if not m:
            raise self.fail("expected a field name")
        self.pos = m.end()
        return m.group()

    def value(self, operator: str) -> str:
        self.skip_space()
        ch = self.peek()
        if ch == '"' or (operator == "~=" and ch != "" and ch in "/|"):
            return self.quoted(ch)
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] != "," and not self.text[self.pos].isspace():
            self.pos += 1
        if self.pos == start:
            raise self.fail("expected a value")
        return self.text[start : self.pos]

    def selector(self) -> _Selector:
        path = [self.field()]
        while self.peek() == ".":
            self.pos += 1
            path.append(self.field())
        self.skip_space()
        operator = self.peek(2)
        if operator not in ("==", "!=", "~="):
            return _Selector(tuple(path), "", "", None)
        self.pos += 2
        value = self.value(operator)
        regex = None
        if operator == "~=":
            try:
                regex = re.compile(value)
            except re.error as exc:
                raise self.fail(f"bad regular expression {value!r}: {exc}") from None
        return _Selector(tuple(path), operator, value, regex)

    def conjunction(self) -> tuple[_Selector, ...]:
        self.skip_space()
        if self.pos >= len(self.text):
            return ()
        selectors = [self.selector()]
        while True:
            self.skip_space()
            if self.pos >= len(self.text):
                return tuple(selectors)
            if self.peek() != ",":
                raise self.fail("expected ','")
            self.pos += 1
            selectors.append(self.selector())


def parse_filters(filters: Sequence[str]) -> Filter:
    """Parse containerd filter strings; raises InvalidArgumentError naming the bad filter."""
    alternatives: list[tuple[_Selector, ...]] = []
    for text in filters:
        conj = _Parser(text).conjunction()
        if not conj:  # an empty filter matches everything
            return Filter(())
        alternatives.append(conj)
    return Filter(tuple(alternatives))


def map_field(mapping: Mapping[str, str], rest: tuple[str, ...]) -> tuple[str, bool]:
    """Adaptor helper for ``labels.KEY``: the rest of the path joined with "." is the key (as containerd)."""
    if not rest:
        return "", bool(mapping)
    key = ".".join(rest)
    if key in mapping:
        return mapping[key], True
    return "", False


def info_fields(info: Info) -> Callable[[tuple[str, ...]], tuple[str, bool]]:
    """The filter fields of a snapshot's Info (``kind``, ``name``, ``parent``, ``labels.KEY``), as containerd's
    snapshot adaptor: what ``Filters.match`` reads."""

    def field(path: tuple[str, ...]) -> tuple[str, bool]:
        head = path[0]
        if head == "kind":
            return info.kind.filter_name, True
        if head == "name":
            return info.name, bool(info.name)
        if head == "parent":
            return info.parent, bool(info.parent)
        if head == "labels":
            return map_field(info.labels, path[1:])
        return "", False

    return field
