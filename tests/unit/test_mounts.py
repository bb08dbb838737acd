from pathlib import Path

import pytest

from snapshotter.mounts import Mount, compose
from snapshotter.store import Kind

UP, WORK = Path("/r/snapshots/9/fs"), Path("/r/snapshots/9/work")
L1, L2, L3 = (Path(f"/r/snapshots/{i}/fs") for i in (3, 2, 1))


@pytest.mark.parametrize(
    "kind, lowers, expected",
    [
        (Kind.ACTIVE, [], [Mount("bind", str(UP), ["rw", "rbind"])]),
        (Kind.VIEW, [], [Mount("bind", str(UP), ["ro", "rbind"])]),
        (Kind.VIEW, [L1], [Mount("bind", str(L1), ["ro", "rbind"])]),
        (Kind.VIEW, [L1, L2], [Mount("overlay", "overlay", [f"lowerdir={L1}:{L2}"])]),
        (Kind.ACTIVE, [L1], [Mount("overlay", "overlay", [f"workdir={WORK}", f"upperdir={UP}", f"lowerdir={L1}"])]),
        (
            Kind.ACTIVE,
            [L1, L2, L3],
            [Mount("overlay", "overlay", [f"workdir={WORK}", f"upperdir={UP}", f"lowerdir={L1}:{L2}:{L3}"])],
        ),
    ],
)
def test_compose_matches_containerd_overlayfs(kind: Kind, lowers: list[Path], expected: list[Mount]) -> None:
    assert compose(kind, UP, WORK, lowers) == expected


def test_index_off_comes_first_for_overlay_only() -> None:
    overlay = compose(Kind.ACTIVE, UP, WORK, [L1], index_off=True)
    assert overlay[0].options[0] == "index=off"
    bind = compose(Kind.ACTIVE, UP, WORK, [], index_off=True)
    assert bind[0].options == ["rw", "rbind"]
