"""The TOC's two readers give one answer (`formats/toc.py`), and the collector pause is undone.

`toc_document` decodes with msgspec and falls back to the field-by-field checker on
anything it does not accept; these tests hold the fast path to the checker's results
and errors, on hand-made documents and on a few thousand seeded random ones.
"""

from __future__ import annotations

import gc
import json
import random
import threading
from typing import Any

import pytest

from snapshotter.formats import toc as toc_module
from snapshotter.formats.entries import gc_paused
from snapshotter.formats.errors import FormatError

D = "sha256:" + "ab" * 32


def answer(read: Any, raw: bytes) -> tuple[str, Any]:
    try:
        return "ok", read(raw)
    except FormatError as e:
        return "error", str(e)


def same_answer(raw: bytes) -> tuple[str, Any]:
    fast = answer(toc_module.toc_document, raw)
    assert fast == answer(toc_module._checked_document, raw)
    return fast


def doc(*entries: dict[str, Any], version: Any = 1) -> bytes:
    return json.dumps({"version": version, "entries": list(entries)}).encode()


GOOD = {"name": "a/b", "type": "reg", "size": 3, "offset": 10, "digest": D, "chunkDigest": D,
        "modtime": "2020-01-02T03:04:05Z", "mode": 420, "uid": 1, "gid": 2, "userName": "u", "groupName": "g"}


@pytest.mark.parametrize("raw", [
    doc(GOOD),
    doc(GOOD, {"name": "a/b", "type": "chunk", "offset": 20, "chunkOffset": 2, "chunkSize": 1}),
    doc({"name": "d", "type": "dir", "xattrs": {"user.a": "YQ=="}}),
    doc({"name": "d", "type": "dir", "xattrs": {"user.a": "RRRR="}}),  # b64decode takes it, msgspec does not
    doc({**GOOD, "digest": "sha512:" + "cd" * 64}),  # legal, left to the checker
    doc({**GOOD, "digest": "sha256:" + "AB" * 32}),
    doc({**GOOD, "chunkDigest": D + "\n"}),
    doc({**GOOD, "modtime": "2020-13-01T00:00:00Z"}),
    doc({**GOOD, "size": None}),
    doc({**GOOD, "size": True}),
    doc({**GOOD, "size": 1.0}),
    doc({**GOOD, "size": 1 << 63}),
    doc({**GOOD, "type": "bogus"}),
    doc({**GOOD, "name": ""}),
    doc({"type": "reg"}),
    doc({**GOOD, "unknown": [[{"deep": None}]]}),
    doc(version=True),
    doc(version=1 << 70),
    b'{"version": 1, "entries": null}',
    b'{"version": 1, "entries": {}}',
    b'{"version": 1}',
    b'{"version": 1, "entries": [{"name": "a", "name": "b", "type": "reg"}]}',
    b'{"version": 1, "entries": [{"n\\u0061me": "a", "type": "reg", "s\\u0069ze": 5}]}',
    b'{"version": 1, "entries": [{"name": "\\ud800", "type": "reg"}]}',
    b'{"version": 1, "entries": [{"name": "\xed\xa0\x80", "type": "reg"}]}',
    b'{"version": 1, "entries": [{"name": "\xff", "type": "reg"}]}',
    b'\xef\xbb\xbf{"version": 1}',
    b'{"version": 1, "x": NaN}',
    b'{"version": 1} trailing',
    b'{"version": 1, "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b"[]",
    b"",
])
def test_the_fast_path_answers_as_the_checker(raw: bytes) -> None:
    same_answer(raw)


def test_a_good_toc_takes_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(raw: bytes) -> None:
        raise AssertionError("the checker was asked")

    monkeypatch.setattr(toc_module, "_checked_document", refuse)
    version, entries = toc_module.toc_document(doc(GOOD, {"name": "d", "type": "dir"}))
    assert version == 1 and [e.name for e in entries] == ["a/b", "d"]
    assert entries[0].user_name == "u" and entries[0].inner_offset == 0 and entries[0].has_payload


def test_seeded_random_documents_get_one_answer() -> None:
    rng = random.Random(15)
    names = ["a", "a/b", "./c", "a/../b", "", "d/.wh.x", "\ud800", "n\x00"]
    types = ["dir", "reg", "reg", "symlink", "hardlink", "chunk", "char", "bogus", 5, None]
    digests = [D, D, "", "sha256:" + "A" * 64, "sha384:" + "a" * 96, "md5:00", 7, None]
    ints = [0, 1, 4096, -1, 1 << 63, True, 1.5, "3", None]
    oks = 0
    for _ in range(2000):
        entries = []
        for _ in range(rng.randint(0, 6)):
            entry: dict[str, Any] = {"name": rng.choice(names), "type": rng.choice(types)}
            for key in ("size", "offset", "mode", "chunkOffset", "chunkSize", "innerOffset"):
                if rng.random() < 0.3:
                    entry[key] = rng.choice(ints) if rng.random() < 0.3 else rng.randint(0, 9000)
            for key in ("digest", "chunkDigest"):
                if rng.random() < 0.5:
                    entry[key] = rng.choice(digests)
            if rng.random() < 0.3:
                entry["modtime"] = rng.choice(["2020-01-02T03:04:05Z", "", "bad", 3])
            if rng.random() < 0.1:
                entry["xattrs"] = rng.choice([{"user.a": "YQ=="}, {"user.a": "YQ"}, None, [], {"k": 1}])
            entries.append(entry)
        oks += same_answer(doc(*entries))[0] == "ok"
    assert oks > 100  # both paths were exercised


@pytest.mark.parametrize("digests, want", [
    ([D, D], True),
    ([], True),
    (["sha256:" + "AB" * 32], False),
    (["abcdefa" + "sha256:" + "a" * 57], False),
    (["sha256:" + "a" * 56 + "\nsha256:", "0" * 71], False),
    (["sha256:" + "a" * 63 + "\n", D], False),
    (["sha256:" + "é" * 64], False),
    (["hsa256:" + "a" * 64], False),
    (["sha512:" + "a" * 64], False),
    ([D + "a"], False),
])
def test_digests_are_checked_all_at_once(digests: list[str], want: bool) -> None:
    assert toc_module._all_sha256(digests) is want


def test_the_collector_pause_is_undone() -> None:
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(ValueError), gc_paused():
        raise ValueError
    assert gc.isenabled()


def test_a_pause_leaves_a_disabled_collector_disabled() -> None:
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_the_collector_comes_back_when_the_last_thread_lets_go() -> None:
    inside, release = threading.Event(), threading.Event()

    def hold() -> None:
        with gc_paused():
            inside.set()
            release.wait(5)

    worker = threading.Thread(target=hold)
    worker.start()
    inside.wait(5)
    with gc_paused():
        pass
    assert not gc.isenabled()  # the worker still holds it
    release.set()
    worker.join(5)
    assert gc.isenabled()
