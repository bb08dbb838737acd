"""lazysnap's whole root on a filesystem that fills up: pulls, reads and a profile save.

The root is a 48 MiB tmpfs, filled but for about a megabyte before the pulls (the chunk
cache's own bound is far larger, so only the disk stops it). Then:
- an eStargz image is pulled: its layers are served lazily (indexes are small) or, if an
  index cannot be saved, Prepare fails cleanly; a container reading a 12 MiB file gets
  its right bytes (the cache cannot keep them) or EIO, never other bytes;
- a plain gzip image, which lazysnap must pull whole, fails cleanly, naming the full disk,
  and leaves no half-applied directory;
- the start profile recorded meanwhile cannot be saved: the daemon logs it and lives on.
Once the filler is deleted, both images pull and read right.
"""

from __future__ import annotations

import errno
import hashlib
import random
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness.containerd import Containerd
from tests.harness.estargz import build_estargz
from tests.harness.images import File, Layer, OCILayout, push, sample_layers
from tests.harness.lazysnap import Lazysnap
from tests.harness.registry import Registry

from .conftest import short_tmpdir
from .test_lazy import lazysnap_cli, rpull, run_script, status

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ROOT_SIZE = 48 << 20
LEFT_FREE = 1 << 20
BIG_SIZE = 12 << 20
PROFILE_SECONDS = 2
ENOSPC_TEXT = "No space left on device"


@dataclass
class Images:
    lazy_ref: str
    whole_ref: str
    big_sha256: str


@pytest.fixture(scope="module")
def images(registry: Registry) -> Iterator[Images]:
    tmp = short_tmpdir("lzs-full-")
    try:
        layout = OCILayout(tmp / "layout")
        big = random.Random(7).randbytes(BIG_SIZE)
        base = [build_estargz(entries).layer() for entries in sample_layers()]
        data = build_estargz([File("big.bin", big), File("small.txt", "small\n")]).layer()
        lazy = layout.add_image("full-lazy", [*base, data], cmd=["/hello.sh"])
        plain = [Layer.from_entries(entries) for entries in sample_layers()]
        plain.append(Layer.from_entries([File("big.bin", big)]))
        whole = layout.add_image("full-whole", plain, cmd=["/hello.sh"])
        yield Images(push(layout.root, lazy.tag, registry, "lazysnap/full-lazy:latest", image=lazy),
                     push(layout.root, whole.tag, registry, "lazysnap/full-whole:latest", image=whole),
                     hashlib.sha256(big).hexdigest())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def small_root(workdir: Path) -> Iterator[Path]:
    """The `lazysnap` fixture's root as a small tmpfs, made before lazysnap starts (request it first)."""
    root = workdir / "root"
    root.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={ROOT_SIZE},mode=0700", "tmpfs", str(root)], check=True,
                   capture_output=True)
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)], capture_output=True)


def fill(root: Path, leave: int) -> Path:
    """A filler file taking all of `root`'s filesystem but `leave` bytes."""
    filler = root / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\xa5" * (256 << 10))
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    with open(filler, "r+b") as f:
        f.truncate(max(0, filler.stat().st_size - leave))
    return filler


def try_rpull(containerd: Containerd, daemon: Lazysnap, ref: str) -> tuple[int, str]:
    done = lazysnap_cli("rpull", ref, "--plain-http", "--containerd", str(containerd.address),
                        "--address", str(daemon.address))
    return done.returncode, done.stdout + done.stderr


def read_big(containerd: Containerd, ref: str, cid: str) -> tuple[str, str]:
    """(sha256 of /big.bin or "", the output) from a container of `ref`."""
    done, _ = run_script(containerd, ref, "sha256sum /big.bin", cid, check=False)
    words = done.stdout.split()
    return (words[0] if done.returncode == 0 and words else ""), done.stdout + done.stderr


@pytest.mark.lazysnap_config("background_fetch = false", "prefetch = false", "cache_max_mib = 1024",
                             f"profile_seconds = {PROFILE_SECONDS}")
def test_a_full_root_fails_cleanly_never_serves_wrong_bytes_and_recovers(
        small_root: Path, containerd: Containerd, lazysnap: Lazysnap, images: Images, cid: str) -> None:
    filler = fill(small_root, LEFT_FREE)

    code, output = try_rpull(containerd, lazysnap, images.lazy_ref)
    assert "Traceback" not in output and "internal error" not in output, output
    if code == 0:
        digest, read = read_big(containerd, images.lazy_ref, cid + "-lazy")
        assert digest in (images.big_sha256, ""), f"wrong bytes from a full disk:\n{read}"
        assert digest or "Input/output error" in read, read
    else:
        assert ENOSPC_TEXT in output, output

    code, output = try_rpull(containerd, lazysnap, images.whole_ref)
    assert code != 0 and ENOSPC_TEXT in output, output
    assert "Traceback" not in output, output
    snapshots = small_root / "snapshots"
    assert not [p.name for p in snapshots.iterdir() if p.name.startswith("new-")], "a half-applied layer is left"

    time.sleep(PROFILE_SECONDS + 1)  # the recording window ends; saving the profile finds no room
    assert lazysnap.proc is not None and lazysnap.proc.running, lazysnap.log_tail()
    status(lazysnap)

    filler.unlink()
    for n, ref in enumerate((images.lazy_ref, images.whole_ref)):
        output, _ = rpull(containerd, lazysnap, ref)
        digest, read = read_big(containerd, ref, f"{cid}-freed-{n}")
        assert digest == images.big_sha256, f"after freeing space:\n{read}\n{output}"
    assert "Traceback" not in lazysnap.log_text(), lazysnap.log_tail()
