"""Mount composition: a pure function of a snapshot's kind and its directories.

The rules are those of containerd's overlayfs snapshotter, so that containerd's
applier (which writes straight into `upperdir=`) and every shim treat lazysnap's
mounts exactly like overlayfs ones:

- no parent: bind mount of the snapshot's own directory (rw if active, ro if a view);
- a view with one parent: read-only bind of that parent (overlay needs two layers);
- otherwise overlay, `lowerdir=` nearest parent first, plus `upperdir=`/`workdir=`
  for an active snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .store import Kind

OVERLAY_INDEX_PARAM = Path("/sys/module/overlay/parameters/index")


@dataclass(frozen=True)
class Mount:
    """One mount, as containerd's `types.Mount` (the target is chosen by the caller)."""

    type: str
    source: str
    options: list[str] = field(default_factory=list)


def overlay_index_off() -> bool:
    """Whether to pass `index=off`: containerd does when the kernel has the parameter."""
    return OVERLAY_INDEX_PARAM.exists()


def compose(kind: Kind, upper: Path, work: Path, lowers: list[Path], *, index_off: bool = False) -> list[Mount]:
    """The mounts for a snapshot whose own dirs are `upper`/`work`, lowers nearest first."""
    if not lowers:
        mode = "ro" if kind == Kind.VIEW else "rw"
        return [Mount("bind", str(upper), [mode, "rbind"])]
    options = ["index=off"] if index_off else []
    if kind == Kind.ACTIVE:
        options += [f"workdir={work}", f"upperdir={upper}"]
    elif len(lowers) == 1:
        return [Mount("bind", str(lowers[0]), ["ro", "rbind"])]
    options.append("lowerdir=" + ":".join(map(str, lowers)))
    return [Mount("overlay", "overlay", options)]
