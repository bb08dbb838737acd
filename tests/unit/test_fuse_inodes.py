"""Global inode numbering across layers, without a mount."""

from __future__ import annotations

import pytest

from snapshotter.fuse.inodes import FUSE_ROOT_INO, InodeTable, UnknownInode
from snapshotter.layers.tree import ROOT_INO, LayerEntry
from tests.unit.fuse_layers import memory_layer, reg


def three_files() -> list[LayerEntry]:
    return [reg("a", b"1"), reg("d/b", b"22"), reg("d/c", b"333")]


def test_ranges_are_disjoint_and_resolve_back() -> None:
    table = InodeTable()
    layers = [memory_layer(three_files()) for _ in range(3)]
    atts = [table.attach(f"l{i}".encode(), layer) for i, layer in enumerate(layers)]
    seen: set[int] = {FUSE_ROOT_INO}
    for att, layer in zip(atts, layers):
        for node in layer.tree.nodes.values():
            ino = att.global_ino(node)
            assert ino not in seen
            seen.add(ino)
            assert table.resolve(ino) == (att, node)
        assert table.resolve(att.root_ino)[1].ino == ROOT_INO
    for bad in (0, FUSE_ROOT_INO, max(seen) + 1, 10**12):
        with pytest.raises(UnknownInode):
            table.resolve(bad)
    assert [a.name for a in table.attached()] == [b"l0", b"l1", b"l2"]


def test_numbers_are_never_reused_after_detach() -> None:
    table = InodeTable()
    first = table.attach(b"x", memory_layer(three_files()))
    old = {first.global_ino(n) for n in first.tree.nodes.values()}
    table.detach(b"x")
    again = table.attach(b"x", memory_layer(three_files()))
    assert old.isdisjoint(again.global_ino(n) for n in again.tree.nodes.values())
    with pytest.raises(UnknownInode):  # x's first incarnation was unreferenced, so it is gone
        table.resolve(first.root_ino)


def test_a_detached_layer_lives_while_referenced() -> None:
    table = InodeTable()
    att = table.attach(b"x", memory_layer(three_files()))
    table.attach(b"y", memory_layer(three_files()))
    att.lookups = 3
    att.handles = 1
    table.detach(b"x")
    assert table.get(b"x") is None and table.retired == 1 and not att.attached
    assert table.resolve(att.root_ino)[0] is att  # the kernel may still ask for its attributes
    table.forget(att.root_ino, 3)
    assert table.retired == 1, "an open file still holds it"
    att.handles = 0
    table.drop_if_unreferenced(att)
    assert table.retired == 0
    with pytest.raises(UnknownInode):
        table.resolve(att.root_ino)
    table.forget(att.root_ino, 1)  # a late forget for a dropped layer is harmless


def test_reads_in_flight_and_the_idle_event() -> None:
    att = InodeTable().attach(b"x", memory_layer(three_files()))
    assert att.idle.is_set()
    att.begin_read()
    att.begin_read()
    assert not att.idle.is_set() and att.referenced
    att.end_read()
    assert not att.idle.is_set()
    att.end_read()
    assert att.idle.is_set() and not att.referenced


@pytest.mark.parametrize("name", [b"", b".", b"..", b"a/b", b"nul\0", b"x" * 256])
def test_bad_names(name: bytes) -> None:
    with pytest.raises(ValueError):
        InodeTable().attach(name, memory_layer([]))


def test_duplicate_names() -> None:
    table = InodeTable()
    table.attach(b"x", memory_layer([]))
    with pytest.raises(ValueError):
        table.attach(b"x", memory_layer([]))
    assert table.attach(b"x" * 255, memory_layer([])).span == 1
