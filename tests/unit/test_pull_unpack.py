"""rpull's unpacking when containerd's garbage collector takes a snapshot between two Prepares.

A pull that failed leaves its committed layers to no image; a pull retried straight away
finds them (Prepare answers AlreadyExists) and then, if containerd collects them before the
next Prepare, that Prepare fails: its parent is gone. containerd's own unpacker starts
again then, and so does rpull. The race is the garbage collector's timing, so it is played
here by a stand-in for containerd's snapshots API (CI once hit it for real:
tests/integration/test_pull_whole.py's retry after a bad blob).
"""

from __future__ import annotations

import pytest

from snapshotter.containerd.pull import UNPACK_ATTEMPTS, ImageLayers, PullError, chain_ids, unpack_image
from snapshotter.errors import AlreadyExists, NotFound
from snapshotter.layer_modes import LayerMode
from snapshotter.layers.served import Explanation
from snapshotter.registry.manifest import Descriptor

LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYERS = [Descriptor(LAYER, f"sha256:{str(i) * 64}", 100 + i) for i in range(3)]
CHAIN = chain_ids([f"sha256:{chr(ord('a') + i) * 64}" for i in range(3)])


class Snapshots:
    """containerd's view of lazysnap's snapshots: every Prepare with a target answers AlreadyExists
    (the layer is served); `collect_after` Prepares, the garbage collector removes every committed
    snapshot, `collections` times."""

    def __init__(self, existing: set[str], collect_after: int, collections: int) -> None:
        self.committed = set(existing)
        self.collect_after, self.collections = collect_after, collections
        self.prepares: list[tuple[str, str]] = []

    def prepare(self, snapshotter: str, key: str, parent: str, labels: dict[str, str]) -> list[object]:
        self.prepares.append((key.split()[-1], parent))
        if self.collections and len(self.prepares) > self.collect_after:
            self.committed.clear()
            self.collections -= 1
            self.prepares.clear()
        if parent and parent not in self.committed:
            raise NotFound(f"parent snapshot {parent} does not exist: not found")
        self.committed.add(labels["containerd.io/snapshot.ref"])
        raise AlreadyExists("target snapshot exists")

    def snapshot_exists(self, snapshotter: str, key: str) -> bool:
        return key in self.committed

    def remove_snapshot(self, snapshotter: str, key: str) -> None:
        raise AssertionError("nothing to remove: every layer was served")


async def unpack(snapshots: Snapshots, lines: list[str]) -> list[str]:
    image = ImageLayers("lazysnap", "example.com/app:1", "sha256:" + "f" * 64, tuple(LAYERS), tuple(CHAIN))
    outcomes = await unpack_image(snapshots, image,  # type: ignore[arg-type]
                                  lambda digest: Explanation(LayerMode.ESTARGZ, ""), lines.append)
    return [o.digest for o in outcomes]


async def test_a_parent_collected_between_two_prepares_starts_the_unpack_again() -> None:
    snapshots = Snapshots(existing={CHAIN[0]}, collect_after=1, collections=1)
    lines: list[str] = []
    assert await unpack(snapshots, lines) == [layer.digest for layer in LAYERS]
    assert snapshots.committed == set(CHAIN)
    assert any("was gone: unpacking again" in line for line in lines), lines


async def test_a_collector_that_keeps_collecting_fails_the_pull_saying_so() -> None:
    snapshots = Snapshots(existing={CHAIN[0]}, collect_after=1, collections=UNPACK_ATTEMPTS)
    with pytest.raises(PullError, match=rf"gone {UNPACK_ATTEMPTS} times: containerd kept collecting"):
        await unpack(snapshots, [])


async def test_a_not_found_with_the_parent_still_there_is_not_retried() -> None:
    class Refusing(Snapshots):
        def prepare(self, snapshotter: str, key: str, parent: str, labels: dict[str, str]) -> list[object]:
            if parent:
                self.prepares.append((key.split()[-1], parent))
                raise NotFound("content digest sha256:0000 not found")  # not about the parent: no retry
            return super().prepare(snapshotter, key, parent, labels)

    snapshots = Refusing(existing=set(), collect_after=0, collections=0)
    with pytest.raises(NotFound, match="content digest"):
        await unpack(snapshots, [])
    assert len(snapshots.prepares) == 2
