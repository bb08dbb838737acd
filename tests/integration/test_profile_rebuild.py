"""Start profiles that survive a rebuild, end to end: v1 (base, libraries, app) is taught on a
node of its own and its profile pushed; v2 is a rebuild (the same base and libraries, a new
app layer). A fresh node that has never seen v2 pulls it cold: it finds v1's profile under
the shared layers' `lazysnap-profile-<layer>` tags, prefetches what v1's start read of
those layers before the container asks (`lazysnap status` names whose profile), does not
prefetch v2's new layer, and records v2's own profile as it starts.
"""

from __future__ import annotations

import hashlib
import random
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.harness.estargz import build_estargz
from tests.harness.images import File, Image, OCILayout, push, sample_layers
from tests.harness.procs import wait_until
from tests.harness.registry import Registry

from .conftest import short_tmpdir
from .test_lazy import lazysnap_cli, rpull, run_script, settled_mark, short, status
from .test_prefetch import Node, node

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MODULES = 40
MODULE_SIZE = 96 << 10
STARTUP_MODULES = 20
OWN_SIZE = 1 << 20
WORKLOAD = ("cat " + " ".join(f"/lib/app/mod{i:02d}.bin" for i in range(STARTUP_MODULES))
            + " /app/own.bin </dev/null | sha256sum")
QUIET = ("background_fetch = false", "profile_seconds = 3.0", "readahead_max_mib = 0")
TAG = "lazysnap-profile-"


@dataclass
class Build:
    ref: str
    image: Image
    expected: str


@dataclass
class Rebuild:
    v1: Build
    v2: Build
    base: str
    libs: str
    app2: str
    """v2's own app layer."""


@pytest.fixture(scope="module")
def rebuild(registry: Registry) -> Iterator[Rebuild]:
    tmp = short_tmpdir("lzs-rb-")
    try:
        rng = random.Random(1313)
        modules = [rng.randbytes(MODULE_SIZE) for _ in range(MODULES)]
        layout = OCILayout(tmp / "layout")
        base = build_estargz(sample_layers()[0], chunk_size=256 << 10).layer()
        libs = build_estargz([File(f"lib/app/mod{i:02d}.bin", m) for i, m in enumerate(modules)],
                             chunk_size=64 << 10).layer()
        builds = []
        for version in ("v1", "v2"):
            own = rng.randbytes(OWN_SIZE)
            app = build_estargz([File("app/own.bin", own), File("app/version", version)], chunk_size=64 << 10).layer()
            image = layout.add_image(version, [base, libs, app], cmd=["/bin/sh"])
            ref = push(layout.root, version, registry, f"lazysnap/rebuild:{version}", image=image)
            builds.append(Build(ref, image, hashlib.sha256(b"".join(modules[:STARTUP_MODULES]) + own).hexdigest()))
        yield Rebuild(builds[0], builds[1], base.digest, libs.digest, builds[1].image.layers[2].digest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _workload(n: Node, build: Build, cid: str) -> str:
    done, _ = run_script(n.containerd, build.ref, WORKLOAD, cid)
    return done.stdout.split()[0]


def _blob_bytes(registry: Registry, digest: str, since: int, until: int | None = None) -> int:
    return sum(r.bytes for r in registry.requests(settle=0.3)[since:until]
               if r.method == "GET" and r.blob is not None and r.blob[1] == digest)


def test_a_rebuild_prefetches_what_the_previous_build_read_of_the_layers_they_share(
        registry: Registry, rebuild: Rebuild) -> None:
    v1, v2 = rebuild.v1, rebuild.v2
    with node(*QUIET) as teacher:
        rpull(teacher.containerd, teacher.lazysnap, v1.ref)
        assert _workload(teacher, v1, "rb-teach") == v1.expected
        mark = settled_mark(registry)
        done = lazysnap_cli("profile", "push", v1.ref, "--root", str(teacher.lazysnap.root), "--plain-http",
                            "--wait", "60", timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr + teacher.lazysnap.log_tail()
        assert "tagged for its 3 layers" in done.stdout, done.stdout
        tags = {r.path.rsplit("/", 1)[1] for r in registry.requests(settle=0.3)[mark:]
                if r.method == "PUT" and f"/manifests/{TAG}" in r.path and r.status == 201}
        assert tags == {TAG + d[7:] for d in (rebuild.base, rebuild.libs, v1.image.layers[2].digest)}, tags

    with node(*QUIET) as fresh:
        start = settled_mark(registry)
        rpull(fresh.containerd, fresh.lazysnap, v2.ref)
        wait_until(lambda: re.search(rf"prefetched \d+ bytes of {rebuild.libs}", fresh.log()) is not None,
                   60, "the libraries' prefetch", fresh.lazysnap.proc)
        log = fresh.log()
        borrowed = f"start profile of {registry.host}/lazysnap/rebuild@{short(v1.image.manifest_digest)} (registry)"
        assert f"prefetching the {borrowed} for 2 shared layers" in log, log[-3000:]
        assert not re.search(rf"prefetching \d+ units of {rebuild.app2}", log), "v2's own layer is not prefetched"
        _, rows = status(fresh.lazysnap)
        assert f"prefetched the {borrowed} for 2 shared layers" in rows[short(rebuild.libs)]["rest"], rows
        assert "prefetched the" not in rows[short(rebuild.app2)]["rest"], rows

        before = settled_mark(registry)
        lookups = [r for r in registry.requests()[start:before] if f"/manifests/{TAG}" in r.path]
        assert any(r.status == 404 and rebuild.app2[7:] in r.path for r in lookups), \
            "the new layer's tag was looked up and is not there"
        prefetched_libs = _blob_bytes(registry, rebuild.libs, start, before)
        assert prefetched_libs >= STARTUP_MODULES * MODULE_SIZE, "what v1's start read of the libraries came ahead"
        assert _blob_bytes(registry, rebuild.app2, start, before) < OWN_SIZE // 4, \
            "of the new layer only its index came ahead"

        assert _workload(fresh, v2, "rb-fresh") == v2.expected
        assert _blob_bytes(registry, rebuild.libs, before) == 0, "every library byte the start read was prefetched"
        # On demand, but for what came with the index: the tail read keeps the chunks beside the TOC.
        ahead = _blob_bytes(registry, rebuild.app2, start, before)
        assert _blob_bytes(registry, rebuild.app2, before) >= OWN_SIZE - ahead, "the new layer is read on demand"

        def recorded() -> bool:
            listed = lazysnap_cli("profile", "list", "--root", str(fresh.lazysnap.root)).stdout
            return v2.image.manifest_digest in listed
        wait_until(recorded, 30, "v2's own start profile", fresh.lazysnap.proc)
