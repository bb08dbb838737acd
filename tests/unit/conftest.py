from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc
from snapshotter.soci.local import LocalIndexes
from tests.harness.lazysnap import Lazysnap
from tests.harness.procs import unmount_below
from tests.harness.registry import Registry
from tests.unit.fuse_layers import force_unmount
from tests.unit.fuzzing import register_profiles
from tests.unit.soci_images import Sample, make_sample

register_profiles()  # hypothesis: `ci` unless HYPOTHESIS_PROFILE says `fuzz` (tests/unit/fuzzing.py)


@pytest.fixture
def needs_fuse() -> None:
    """FUSE tests need root and /dev/fuse; without them they fail, saying so (CI has both)."""
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.fail("FUSE tests need root and /dev/fuse", pytrace=False)


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    """An empty mount point, left unmounted whatever the test did (an overlay on it first)."""
    path = tmp_path / "mnt"
    path.mkdir()
    try:
        yield path
    finally:
        unmount_below(tmp_path)
        force_unmount(path)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temp dir with a short path: unix socket paths are limited to 107 characters."""
    with tempfile.TemporaryDirectory(prefix="lzs-", dir="/tmp") as d:
        yield Path(d)


@pytest.fixture
def daemon(short_tmp: Path) -> Iterator[Lazysnap]:
    ls = Lazysnap(root=short_tmp / "root", address=short_tmp / "ls.sock", log_path=short_tmp / "lazysnap.log")
    ls.start()
    try:
        yield ls
    finally:
        ls.close()


@pytest.fixture
def client(daemon: Lazysnap) -> Iterator[snapshots_pb2_grpc.SnapshotsStub]:
    with grpc.insecure_channel(f"unix:{daemon.address}") as channel:
        yield snapshots_pb2_grpc.SnapshotsStub(channel)


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    """A real docker-registry on loopback, one per test module."""
    with Registry() as r:
        yield r


@pytest.fixture(scope="module")
def image(registry: Registry) -> Iterator[Sample]:
    """The SOCI tests' sample image (see soci_images.py), built once per module."""
    yield from make_sample()


@pytest.fixture
def store(tmp_path: Path) -> LocalIndexes:
    """An empty local SOCI index store."""
    return LocalIndexes(tmp_path / "soci")

