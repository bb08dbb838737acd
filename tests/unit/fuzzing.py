"""Shared pieces of the property-based fuzz tests (`test_fuzz_*.py`, issue 14).

Profiles (registered in `tests/unit/conftest.py`, chosen by `HYPOTHESIS_PROFILE`):
- `ci` (the default): derandomized, so every CI run tries the same inputs; a fixed budget
  that keeps the whole fuzz set at about two minutes on a 2-core machine.
- `fuzz` (`make fuzz`): 50,000 examples per test (or `FUZZ_EXAMPLES`), random, with
  hypothesis' example database in `.hypothesis/` so a failure found once is tried first next time.

`examples(weight)` scales the profile's budget for one test: parsers that cost a
millisecond take the full budget, the slower ones (a layer built per example) less.

The property every parser of untrusted bytes must have is `parse_or_refuse`: it returns
a result, or raises the format's own error, within `TIME_BOUND` seconds; anything else
(an IndexError, a UnicodeError, a RecursionError, a hang) fails the test.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import signal
import struct
import tarfile
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from hypothesis import HealthCheck, currently_in_test_context, event, settings
from hypothesis import strategies as st

from snapshotter.formats import erofs
from snapshotter.formats.errors import FormatError

T = TypeVar("T")

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
CI_EXAMPLES = 700
FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", 50_000))
"""The `fuzz` profile's budget per test (before `examples()` weighs it); FUZZ_EXAMPLES overrides it."""
TIME_BOUND = 10.0
"""Seconds one parser call may take on a few KiB of input; real parses take microseconds."""


def register_profiles() -> None:
    common: dict[str, Any] = {
        "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                                  HealthCheck.large_base_example],
        "print_blob": True,
    }
    settings.register_profile("ci", max_examples=CI_EXAMPLES, derandomize=True, database=None, deadline=None,
                              **common)
    settings.register_profile("fuzz", max_examples=FUZZ_EXAMPLES, deadline=2000, **common)
    settings.load_profile(PROFILE)


def examples(weight: float = 1.0) -> settings:
    """The loaded profile's settings with `weight` times its example budget."""
    return settings(max_examples=max(20, int(settings.default.max_examples * weight)))


class Hung(BaseException):
    """A parser call ran past `TIME_BOUND` (a BaseException, so no parser's `except` swallows it)."""


@contextlib.contextmanager
def time_bound(seconds: float = TIME_BOUND) -> Iterator[None]:
    """Interrupt the block with `Hung` after `seconds` of wall time (SIGALRM; main thread only)."""
    def expired(signum: int, frame: Any) -> None:
        raise Hung(f"took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    outer, _ = signal.setitimer(signal.ITIMER_REAL, seconds)  # pytest-timeout's own alarm, if it set one
    started = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:  # re-arm it with what was left of it
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - started), 0.001))


def parse_or_refuse(fn: Callable[..., T], *args: Any, errors: tuple[type[BaseException], ...] = (FormatError,),
                    **kwargs: Any) -> T | None:
    """`fn(*args, **kwargs)`, or None when it refused with one of `errors`; anything else propagates."""
    with time_bound():
        try:
            result = fn(*args, **kwargs)
        except errors:
            _count(fn, "refused")
            return None
    _count(fn, "accepted")
    return result


def _count(fn: Callable[..., Any], outcome: str) -> None:
    """How often each parser accepted and refused: `pytest --hypothesis-show-statistics` shows it."""
    if currently_in_test_context():
        event(f"{getattr(fn, '__qualname__', 'call')}: {outcome}")


# --------------------------------------------------------------------------- strategies

HOSTILE_COMPONENTS = ["..", ".", "", "a", "b", "etc", "passwd", ".wh.a", ".wh..wh..opq", ".wh.", ".wh..",
                      ".wh...", "a\x00b", "\udcff", "\ud800", "é", "x" * 300, " ", "\n", "dir", "file"]
"""Path components a hostile index uses: climbing, empty, NUL, non-UTF-8 (surrogate escape),
lone surrogates, whiteouts, over-long."""


def hostile_names(max_parts: int = 5) -> st.SearchStrategy[str]:
    """Member names: `../../etc/passwd`, `/abs`, `a//b`, `./`, NUL bytes, non-UTF-8, deep nesting."""
    component = st.one_of(st.sampled_from(HOSTILE_COMPONENTS), st.text(max_size=8))
    joined = st.lists(component, min_size=0, max_size=max_parts).map("/".join)
    deep = st.integers(1, 400).map(lambda n: "/".join(["d"] * n))
    prefixed = st.tuples(st.sampled_from(["", "/", "./", "../", "../../", "//"]), joined).map("".join)
    return st.one_of(prefixed, deep, st.text(max_size=20))


def hostile_ints(bits: int = 64, signed: bool = True) -> st.SearchStrategy[int]:
    """Integers at the edges: 0, 1, -1, powers of two, the type's limits, and just past them."""
    lo = -(1 << (bits - 1)) if signed else 0
    hi = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
    edges = {0, 1, 2, 511, 512, 513, 4096, 1 << 20, 1 << 31, (1 << 31) - 1, 1 << 32, (1 << 32) - 1, lo, hi,
             hi - 1, (1 << 62)}
    edges.update(-e for e in list(edges))
    return st.one_of(st.sampled_from(sorted(e for e in edges if lo <= e <= hi)), st.integers(lo, hi),
                     st.integers(0, 5000).filter(lambda x: lo <= x <= hi))


def json_values(max_leaves: int = 20) -> st.SearchStrategy[Any]:
    """Any JSON value, floats and huge integers included."""
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10),
                        st.integers(min_value=1 << 63, max_value=1 << 80))
    return st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                        max_leaves=max_leaves)


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of the strategies, each drawn with its weight."""
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(table) - 1).flatmap(lambda i: table[i])


def mostly(good: st.SearchStrategy[Any], odds: int = 9) -> st.SearchStrategy[Any]:
    """`good`, except one time in `odds + 1` any JSON value (a wrong type, null, a huge number, nesting).

    (`st.one_of(good, good, junk)` does not weigh: hypothesis draws its branches unevenly.)"""
    junk = json_values(4)
    return st.integers(0, odds).flatmap(lambda i: good if i else junk)


def mutated(data: bytes) -> st.SearchStrategy[bytes]:
    """`data` with byte-level mutations: flips, overwrites, inserts, deletions, truncation, duplication."""
    def apply(ops: list[tuple[int, int, int, int]]) -> bytes:
        out = bytearray(data)
        for kind, pos, value, length in ops:
            at = pos % (len(out) + 1)
            if kind == 0 and out:
                out[at % len(out)] ^= 1 << (value % 8)
            elif kind == 1 and out:
                out[at % len(out)] = value
            elif kind == 2:
                out[at:at] = bytes([value]) * (length % 16 + 1)
            elif kind == 3:
                del out[at:at + length % 64 + 1]
            elif kind == 4:
                del out[at:]
            elif kind == 5:
                out[at:at] = out[at:at + length % 64 + 1]
            elif kind == 6 and len(out) >= 8:  # an interesting 32-bit value: sizes and offsets
                value32 = [0, 0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, len(out), len(out) + 1][value % 6]
                at %= len(out) - 3
                out[at:at + 4] = value32.to_bytes(4, "little")
        return bytes(out)

    op = st.tuples(st.integers(0, 6), st.integers(0, 1 << 30), st.integers(0, 255), st.integers(0, 1 << 16))
    return st.lists(op, min_size=1, max_size=6).map(apply)


# --------------------------------------------------------------------------- tree checks

def check_tree(tree: Any) -> list[str]:
    """The paths of a `LayerTree` after checking that none leaves the layer; returns them all.

    Every name is one real component (not empty, `.` or `..`, no `/` or NUL), directories
    form a tree (each reached once), and every path from the root is relative and stays
    below it. The EROFS metadata image of the tree is then built, or refused with a FormatError.
    """
    seen_dirs: set[int] = set()
    paths: list[str] = []
    stack = [(tree.root, "")]
    while stack:
        node, path = stack.pop()
        assert node.ino not in seen_dirs, f"directory {path!r} reached twice: a cycle"
        seen_dirs.add(node.ino)
        for name, child in tree.entries(node.ino):
            assert isinstance(name, bytes)
            assert name and name not in (b".", b"..") and b"/" not in name and b"\0" not in name, name
            child_path = f"{path}/{name.decode('utf-8', 'surrogateescape')}".lstrip("/")
            normal = posixpath.normpath(child_path)
            assert normal == child_path and not normal.startswith(("/", "../")) and normal != "..", child_path
            paths.append(child_path)
            if child.is_dir:
                assert child.nlink >= 2
                stack.append((child, child_path))
    parse_or_refuse(erofs.build, tree.nodes, tree.root.ino)  # the metadata image made of an accepted tree
    return paths


# --------------------------------------------------------------------------- tar streams

def writable(text: str) -> bool:
    """Whether a tar header can hold `text` (a lone surrogate has no bytes)."""
    try:
        text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return False
    return True


TAR_TYPES = [tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE,
             tarfile.BLKTYPE, tarfile.FIFOTYPE, tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE, b"V", b"Z", b"\xff"]
PAX_KEYS = ["path", "linkpath", "size", "uid", "gid", "mtime", "atime", "uname", "gname", "hdrcharset", "comment",
            "SCHILY.xattr.user.a", "SCHILY.xattr.trusted.overlay.opaque", "SCHILY.xattr.", "SCHILY.xattr.security.x",
            "GNU.sparse.major", "GNU.sparse.minor", "GNU.sparse.name", "GNU.sparse.realsize", "GNU.sparse.size",
            "GNU.sparse.numblocks", "GNU.sparse.offset", "GNU.sparse.numbytes", "GNU.sparse.map"]
PAX_VALUES = st.one_of(st.sampled_from(["0", "1", "-1", "1.5", "1700000000.123456789", "-1.000000001", "1e3",
                                        "99999999999999999999999", "0,10,20,30", "1,2", "", "BINARY", "../x",
                                        "/abs", "a\x00b", "\udcff", "9" * 5000]),
                       st.text(max_size=12))


def _tobuf(info: tarfile.TarInfo, fmt: int) -> bytes | None:
    for each in (fmt, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        try:
            return info.tobuf(each, "utf-8", "surrogateescape")
        except (ValueError, UnicodeError, OverflowError, struct.error):
            continue
    return None


def _rechecksum(header: bytearray) -> None:
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\x00 " % (sum(header) & 0o777777)


_NUMBER_FIELDS = {"mode": (100, 8), "uid": (108, 8), "gid": (116, 8), "size": (124, 12), "mtime": (136, 12),
                  "devmajor": (329, 8), "devminor": (337, 8)}


@st.composite
def header_edits(draw: st.DrawFn) -> Callable[[bytearray], None]:
    """Rewrite one field of a header block at the byte level, checksum fixed up: base-256 and
    negative numbers, spaces and garbage in octal fields, magic and type flag bytes, the prefix."""
    field_name = draw(st.sampled_from([*_NUMBER_FIELDS, "type", "magic", "prefix", "name"]))
    if field_name in _NUMBER_FIELDS:
        at, width = _NUMBER_FIELDS[field_name]
        raw = draw(st.one_of(
            st.builds(lambda v: (0x80 | (v >> (8 * width - 8)) & 0x7F).to_bytes(1, "big")
                      + (v & ((1 << (8 * width - 8)) - 1)).to_bytes(width - 1, "big"), st.integers(0, (1 << 64) - 1)),
            st.builds(lambda v: b"\xff" + (v % (1 << (8 * width - 8))).to_bytes(width - 1, "big"),
                      st.integers(0, 1 << 64)),
            st.sampled_from([b"7" * width, b" " * width, b"\0" * width, b"-1", b"9", b"0x10", b"  12  \0"]),
            st.binary(min_size=width, max_size=width)))
        value = raw[:width].ljust(width, b"\0")
    elif field_name == "type":
        at, value = 156, bytes([draw(st.integers(0, 255))])
    elif field_name == "magic":
        at, value = 257, draw(st.sampled_from([b"ustar\x0000", b"ustar  \x00", b"\0" * 8, b"ustar\x00xx"]))
    elif field_name == "prefix":
        at, value = 345, draw(st.sampled_from([b"..", b"/", b"../..", b"a" * 155, b"x\xff"])).ljust(155, b"\0")
    else:
        at, value = 0, draw(st.sampled_from([b"..", b"/", b"../../x", b"a\xffb", b"", b"./"])).ljust(100, b"\0")

    def edit(header: bytearray) -> None:
        header[at:at + len(value)] = value
        _rechecksum(header)
    return edit


@st.composite
def tar_members(draw: st.DrawFn, names: st.SearchStrategy[str] | None = None, *, hostile: bool = True
                ) -> tuple[bytes, bytes, tarfile.TarInfo] | None:
    """One member: (header bytes, data bytes padded, the TarInfo written), with hostile fields."""
    names = names if names is not None else hostile_names()
    kind = draw(st.sampled_from(TAR_TYPES if hostile else TAR_TYPES[:8]))
    info = tarfile.TarInfo(draw(names.filter(writable)))
    info.type = kind
    info.mode = draw(st.one_of(st.integers(0, 0o7777), st.sampled_from([0o4755, 0o1777, 0o7777])))
    info.uid = draw(st.one_of(st.integers(0, 65535), st.sampled_from([0xFFFFFFFF, 1 << 40]) if hostile
                              else st.just(0)))
    info.gid = draw(st.integers(0, 65535))
    info.mtime = draw(st.one_of(st.integers(0, 1 << 33), st.integers(-(1 << 40), 1 << 40) if hostile
                                else st.just(0)))
    info.linkname = draw(names.filter(writable)) if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
    info.devmajor, info.devminor = draw(st.integers(0, 4095)), draw(st.integers(0, 255))
    info.uname = info.gname = ""
    if hostile:
        info.pax_headers = draw(st.dictionaries(st.sampled_from(PAX_KEYS), PAX_VALUES.filter(writable), max_size=3))
    data = draw(st.binary(max_size=700)) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE,
                                                      tarfile.GNUTYPE_SPARSE) else b""
    info.size = len(data)
    fmt = draw(st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]))
    header = _tobuf(info, fmt)
    if header is None:
        return None
    if hostile and draw(st.integers(0, 4)) == 0:
        block = bytearray(header[-512:])
        draw(header_edits())(block)
        header = header[:-512] + bytes(block)
    return header, data + b"\0" * (-len(data) % 512), info


def tar_streams(names: st.SearchStrategy[str] | None = None, *, hostile: bool = True,
                max_members: int = 8) -> st.SearchStrategy[bytes]:
    """Whole tar streams of `tar_members`, ending with the end-of-archive blocks, cut short, or
    without them; sometimes with a global PAX header first."""
    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        members = [m for m in draw(st.lists(tar_members(names, hostile=hostile), max_size=max_members)) if m]
        out = bytearray()
        if hostile and draw(st.integers(0, 9)) == 0:
            out += tarfile.TarInfo.create_pax_global_header({"path": "g", "comment": "x"})
        for header, data, _ in members:
            out += header + data
        ending = draw(st.sampled_from(["end", "end", "end", "record", "none", "cut"])) if hostile else "end"
        if ending in ("end", "record"):
            out += b"\0" * 1024
            if ending == "record":
                out += b"\0" * (-len(out) % tarfile.RECORDSIZE)
        elif ending == "cut" and out:
            del out[draw(st.integers(0, len(out) - 1)):]
        return bytes(out)
    return build()
