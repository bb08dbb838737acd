"""Property-based fuzzing of the whole-layer applier (issue 14): generated tar streams (ustar,
GNU, PAX, sparse headers, hostile names, links out of the layer, hardlink cycles, whiteouts),
byte-level mutations of them, applied into an empty directory.

Properties: `apply_layer` returns or raises `ApplyError` (a `FormatError`) within the time
bound, never anything else; it never writes outside its target: a sibling canary directory
is left exactly as it was, nothing new appears beside the target, no inode outside gains a
link, and every path under the target, walked without following links, is inside it.
"""

from __future__ import annotations

import atexit
import io
import os
import shutil
import stat
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from snapshotter.whole.apply import ApplyError, apply_layer
from tests.unit.fuzzing import HOSTILE_COMPONENTS, examples, mutated, parse_or_refuse, tar_streams

CANARY = b"canary: never written by a layer\n"


def _snapshot(root: Path) -> dict[str, Any]:
    """Everything under `root` (not following links): type, mode, size, nlink, content, link target."""
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            st_ = os.lstat(path)
            entry: tuple[Any, ...] = (stat.S_IFMT(st_.st_mode), st_.st_mode & 0o7777, st_.st_nlink, st_.st_uid)
            if stat.S_ISREG(st_.st_mode):
                entry += (Path(path).read_bytes(),)
            elif stat.S_ISLNK(st_.st_mode):
                entry += (os.readlink(path),)
            out[os.path.relpath(path, root)] = entry
    return out


def _names(outside: str) -> st.SearchStrategy[str]:
    """Member and link names aimed at the canary: relative climbs, its absolute path, via links."""
    component = st.sampled_from([*HOSTILE_COMPONENTS[:12], "outside", "canary", "evil", "link", "d"])
    relative = st.lists(component, min_size=1, max_size=4).map("/".join)
    aimed = st.sampled_from([outside, outside + "/canary", outside + "/new", "../outside/canary", "../outside/x",
                             "evil/canary", "evil/x", "evil/../../outside/y", "link/evil/x", "/..", "./", "/"])
    return st.one_of(relative, aimed)


def _tame_names(outside: str) -> st.SearchStrategy[str]:
    """Names that stay in the layer, but links that point out of it: most such layers are applied."""
    component = st.sampled_from(["a", "b", "evil", "link", "d", "canary", ".", "", ".wh.a", ".wh..wh..opq"])
    relative = st.lists(component, min_size=1, max_size=4).map("/".join)
    aimed = st.sampled_from([outside, outside + "/canary", "../outside", "../../", "evil/canary", "evil/x",
                             "link/evil/x", "/", "../outside/canary"])
    return st.one_of(relative, relative, aimed)


@st.composite
def layers(draw: st.DrawFn, outside: str) -> bytes:
    if draw(st.booleans()):
        tar = draw(tar_streams(_names(outside), max_members=10))
    else:
        tar = draw(tar_streams(_tame_names(outside), hostile=False, max_members=12))
    if draw(st.integers(0, 4)) == 0:
        tar = draw(mutated(tar))
    return tar


_WORK = tempfile.mkdtemp(prefix="lzs-fuzz-apply-")
atexit.register(shutil.rmtree, _WORK, ignore_errors=True)  # the names are fixed at import, so is the directory
OUTSIDE = os.path.join(_WORK, "outside")
"""One fixed sibling of every target (the generated names aim at its path)."""


def _tar(*members: tuple[str, bytes, str | bytes], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """A tar of (name, type, data or link target) members, for the explicit examples."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.REGTYPE:
                assert isinstance(payload, bytes)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            else:
                assert isinstance(payload, str)
                info.linkname = payload
                tar.addfile(info)
    return buf.getvalue()


REG, SYM, LNK, DIR = tarfile.REGTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE
ESCAPES = [
    _tar(("evil", SYM, OUTSIDE), ("evil/canary", REG, b"pwned"), ("evil/new", REG, b"pwned")),
    _tar(("evil", SYM, "../outside"), ("evil/canary", REG, b"pwned")),
    _tar(("d", DIR, ""), ("d/evil", SYM, "../../outside"), ("d/evil/x", REG, b"pwned")),
    _tar(("link", SYM, "."), ("link/evil", SYM, OUTSIDE), ("link/evil/canary", REG, b"pwned")),
    _tar(("h", LNK, OUTSIDE + "/canary")),
    _tar(("evil", SYM, OUTSIDE), ("h", LNK, "evil/canary")),
    _tar(("../outside/canary", REG, b"pwned")),
    _tar((OUTSIDE + "/canary", REG, b"pwned")),
    _tar(("a", LNK, "b"), ("b", LNK, "a")),  # a hardlink cycle
    _tar(("a", REG, b"x"), ("a", DIR, ""), ("a/b", REG, b"y"), ("a", SYM, OUTSIDE), ("a/c", REG, b"z")),
    _tar(("evil", SYM, OUTSIDE), ("evil/.wh.canary", REG, b""), ("evil/.wh..wh..opq", REG, b"")),
    _tar(("evil", SYM, OUTSIDE), ("evil", DIR, ""), ("evil/x", REG, b"x")),
    _tar(("loop", SYM, "loop/x"), ("loop/y", REG, b"y")),
]


def _huge(name: str, kind: bytes) -> bytes:
    """A member claiming 2^62 bytes of data (base-256 size) that the applier does not read, then the end."""
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, 1 << 62
    return info.tobuf(tarfile.GNU_FORMAT) + b"\0" * 1024


HUGE = [_huge("./", tarfile.REGTYPE), _huge(".wh.x", b"V"), _huge("/", tarfile.CONTTYPE)]
"""Found by the fuzzer (2.3 s for a 10 KiB layer; 2^62 bytes hung): tarfile's stream seek counted them off."""


@examples(1.0)
@given(tar=layers(OUTSIDE))
@example(tar=b"")
@example(tar=ESCAPES[0])
@example(tar=ESCAPES[1])
@example(tar=ESCAPES[2])
@example(tar=ESCAPES[3])
@example(tar=ESCAPES[4])
@example(tar=ESCAPES[5])
@example(tar=ESCAPES[6])
@example(tar=ESCAPES[7])
@example(tar=ESCAPES[8])
@example(tar=ESCAPES[9])
@example(tar=ESCAPES[10])
@example(tar=ESCAPES[11])
@example(tar=ESCAPES[12])
@example(tar=HUGE[0])
@example(tar=HUGE[1])
@example(tar=HUGE[2])
def test_apply_never_writes_outside_target(tar: bytes) -> None:
    os.makedirs(OUTSIDE, exist_ok=True)
    canary = Path(OUTSIDE, "canary")
    canary.write_bytes(CANARY)
    os.chmod(canary, 0o644)
    before_outside = _snapshot(Path(OUTSIDE))
    target = Path(tempfile.mkdtemp(prefix="target-", dir=_WORK))
    siblings = set(os.listdir(_WORK))
    try:
        parse_or_refuse(apply_layer, io.BytesIO(tar), target, errors=(ApplyError,))
        assert _snapshot(Path(OUTSIDE)) == before_outside
        assert set(os.listdir(_WORK)) == siblings
        assert os.lstat(canary).st_nlink == 1
        real_target = os.path.realpath(target)
        for dirpath, dirnames, filenames in os.walk(target, followlinks=False):
            for name in [*dirnames, *filenames]:
                path = os.path.join(dirpath, name)
                parent = os.path.realpath(dirpath)
                assert parent == real_target or parent.startswith(real_target + os.sep), path
                st_ = os.lstat(path)
                if stat.S_ISREG(st_.st_mode) and st_.st_nlink > 1:
                    assert st_.st_ino != os.lstat(canary).st_ino
    finally:
        _remove(target)


def _remove(path: Path) -> None:
    """rm -rf that also gets through directories a layer made unwritable (mode 0)."""
    for dirpath, dirnames, _ in os.walk(path, followlinks=False):
        for name in dirnames:
            full = os.path.join(dirpath, name)
            if not os.path.islink(full):
                os.chmod(full, 0o700)
    os.chmod(path, 0o700)
    shutil.rmtree(path)
