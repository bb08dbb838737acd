"""containerd's filter language, as `List` receives it.

    labels."containerd.io/snapshot.ref"==sha256:abc,parent=="default/2/x"

A filter is selectors joined by `,` (all must hold); a list of filters matches when
any filter does. A selector is a field path (`name`, `parent`, `kind`,
`labels.<key>`; a key may be double-quoted), optionally followed by `==`, `!=` or
`~=` (regular expression) and a value, bare or double-quoted. A bare field path
means "present and not empty".
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from .errors import InvalidArgument
from .store import Kind, Snapshot

_OPERATORS = ("==", "!=", "~=")
_BARE_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_\-/]*")


@dataclass(frozen=True)
class Selector:
    path: tuple[str, ...]
    operator: str | None = None
    value: str = ""

    def matches(self, lookup: Callable[[tuple[str, ...]], str | None]) -> bool:
        actual = lookup(self.path)
        if self.operator is None:
            return bool(actual)
        if self.operator == "==":
            return actual == self.value
        if self.operator == "!=":
            return actual != self.value
        return actual is not None and re.search(self.value, actual) is not None


Filter = list[Selector]


def parse(text: str) -> Filter:
    """Parse one filter string; raise InvalidArgument with the position on error."""
    return _Parser(text).filter()


def matcher(filters: list[str]) -> Callable[[Snapshot], bool]:
    """A predicate for snapshots: true when any of `filters` matches (all when none)."""
    parsed = [parse(f) for f in filters if f.strip()]
    if not parsed:
        return lambda snap: True

    def match(snap: Snapshot) -> bool:
        lookup = lambda path: snapshot_field(snap, path)  # noqa: E731
        return any(all(sel.matches(lookup) for sel in f) for f in parsed)

    return match


def snapshot_field(snap: Snapshot, path: tuple[str, ...]) -> str | None:
    """The value of a field path on a snapshot, as containerd's snapshot adaptor gives it."""
    head, rest = path[0], path[1:]
    if head == "labels":
        return snap.labels.get(".".join(rest)) if rest else None
    if rest:
        return None
    if head == "name":
        return snap.key
    if head == "parent":
        return snap.parent
    if head == "kind":
        return {Kind.ACTIVE: "active", Kind.VIEW: "view", Kind.COMMITTED: "committed"}.get(snap.kind)
    return None


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, what: str) -> InvalidArgument:
        return InvalidArgument(f"invalid filter {self.text!r} at position {self.pos}: {what}")

    def filter(self) -> Filter:
        selectors = [self.selector()]
        while self.skip_space() and self.peek(","):
            self.pos += 1
            selectors.append(self.selector())
        if self.pos != len(self.text):
            raise self.fail("expected ',' or end of filter")
        return selectors

    def selector(self) -> Selector:
        path = [self.field()]
        while self.peek("."):
            self.pos += 1
            path.append(self.field())
        self.skip_space()
        for op in _OPERATORS:
            if self.peek(op):
                self.pos += len(op)
                self.skip_space()
                value = self.value()
                if op == "~=":
                    try:
                        re.compile(value)
                    except re.error as e:
                        raise self.fail(f"bad regular expression: {e}") from None
                return Selector(tuple(path), op, value)
        return Selector(tuple(path))

    def field(self) -> str:
        self.skip_space()
        if self.peek('"'):
            return self.quoted()
        m = _BARE_FIELD.match(self.text, self.pos)
        if m is None:
            raise self.fail("expected a field name")
        self.pos = m.end()
        return m.group()

    def value(self) -> str:
        if self.peek('"'):
            return self.quoted()
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in ", \t":
            self.pos += 1
        if start == self.pos:
            raise self.fail("expected a value")
        return self.text[start:self.pos]

    def quoted(self) -> str:
        self.pos += 1
        out: list[str] = []
        while self.pos < len(self.text):
            ch = self.text[self.pos]
            self.pos += 1
            if ch == '"':
                return "".join(out)
            if ch == "\\" and self.pos < len(self.text):
                ch = self.text[self.pos]
                self.pos += 1
                ch = {"n": "\n", "t": "\t"}.get(ch, ch)
            out.append(ch)
        raise self.fail("unterminated quoted string")

    def peek(self, s: str) -> bool:
        return self.text.startswith(s, self.pos)

    def skip_space(self) -> bool:
        while self.pos < len(self.text) and self.text[self.pos] in " \t":
            self.pos += 1
        return True
