"""Fixtures for integration tests: a registry with the sample image, lazysnap, containerd.

Teardown order (pytest tears fixtures down in reverse): containerd first (tasks
killed, containers removed, shims stopped, its mounts dropped), then lazysnap
(stopped, mounts below its root dropped), then the temp dirs. When a test
fails, the tails of the containerd and lazysnap logs are printed in its report.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapshotter.formats import soci_index
from snapshotter.soci.local import LocalIndexes
from tests.harness.containerd import Containerd
from tests.harness.estargz import build_estargz
from tests.harness.faultproxy import FaultProxy
from tests.harness.images import File, Image, Layer, OCILayout, push, sample_image, sample_layers
from tests.harness.lazysnap import Lazysnap
from tests.harness.procs import HarnessError, require_tool, unmount_below
from tests.harness.registry import Registry

TOOLS = {
    "containerd": "containerd", "ctr": "containerd", "containerd-shim-runc-v2": "containerd",
    "runc": "runc", "docker-registry": "docker-registry", "skopeo": "skopeo",
    "mount": "mount", "umount": "mount",
}
HERE = Path(__file__).parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "lazysnap_config(toml): settings the test's `lazysnap` fixture starts the daemon with "
                   "(written to a config file, e.g. 'read_timeout = 3.0')")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def _failed(request: pytest.FixtureRequest) -> bool:
    return any(getattr(request.node, f"rep_{w}", None) is not None and getattr(request.node, f"rep_{w}").failed
               for w in ("setup", "call"))


@pytest.fixture(scope="session", autouse=True)
def preflight() -> None:
    """Fail, with the reason, when the machine cannot run these tests."""
    if os.geteuid() != 0:
        pytest.fail("integration tests need root (they run containerd, runc and mounts)", pytrace=False)
    try:
        for tool, package in TOOLS.items():
            require_tool(tool, package)
    except HarnessError as e:
        pytest.fail(str(e), pytrace=False)
    if not Path("/bin/busybox").exists():
        pytest.fail("/bin/busybox is missing (apt-get install busybox-static)", pytrace=False)


def short_tmpdir(prefix: str = "lzs-") -> Path:
    """A temp dir with a short path: unix socket paths must stay under ~100 characters."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


@pytest.fixture(scope="session")
def registry(preflight: None) -> Iterator[Registry]:
    reg = Registry().start()
    try:
        yield reg
    finally:
        reg.close()


@pytest.fixture(scope="session")
def sample(registry: Registry) -> Iterator[tuple[Image, str]]:
    """The foundation sample image, pushed: (image, "host/lazysnap/sample:latest")."""
    tmp = short_tmpdir("lzs-img-")
    try:
        layout = OCILayout(tmp / "layout")
        image = sample_image(layout, tag="latest")
        ref = push(layout.root, "latest", registry, "lazysnap/sample", image=image)
        yield image, ref
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def sample_image_ref(sample: tuple[Image, str]) -> str:
    return sample[1]


@pytest.fixture
def proxy(registry: Registry) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of the session registry (refer to images by `proxy.host`)."""
    with FaultProxy(registry.host) as p:
        yield p


@pytest.fixture
def own_registry() -> Iterator[Registry]:
    """A registry only this test uses, so it may stop and start it (same port, same storage)."""
    reg = Registry().start()
    try:
        yield reg
    finally:
        reg.close()


@pytest.fixture
def workdir() -> Iterator[Path]:
    tmp = short_tmpdir()
    try:
        yield tmp
    finally:
        unmount_below(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def lazysnap(workdir: Path, request: pytest.FixtureRequest) -> Iterator[Lazysnap]:
    """`lazysnap serve` for one test; `@pytest.mark.lazysnap_config("key = value")` gives it a config file."""
    marker = request.node.get_closest_marker("lazysnap_config")
    yield from serving(workdir, request, list(marker.args) if marker is not None else [])


def serving(workdir: Path, request: pytest.FixtureRequest, settings: list[str],
            env: dict[str, str] | None = None) -> Iterator[Lazysnap]:
    """A `lazysnap` fixture's body: the daemon with `settings` (config lines) and `env` (None: ours),
    its log shown if the test failed."""
    config = None
    if settings:
        config = workdir / "lazysnap.toml"
        config.write_text("\n".join(settings) + "\n")
    daemon = Lazysnap(root=workdir / "root", address=workdir / "ls.sock", log_path=workdir / "lazysnap.log",
                      config=config, env=env)
    try:
        daemon.start()
        yield daemon
    finally:
        try:
            if _failed(request):
                print(daemon.log_tail())
        finally:
            daemon.close()


@pytest.fixture
def containerd(lazysnap: Lazysnap, request: pytest.FixtureRequest) -> Iterator[Containerd]:
    ctd = Containerd(snapshotter_address=lazysnap.address, proxy_name="lazysnap")
    try:
        ctd.start()
        yield ctd
    finally:
        try:
            if _failed(request):
                print(ctd.log_tail(80))
        finally:
            ctd.stop()


@pytest.fixture
def cid() -> str:
    """A container id unique to this test run."""
    return f"lzs-{uuid.uuid4().hex[:10]}"


# --------------------------------------------------------------------------- SOCI

SOCI_SPAN = 256 << 10
SOCI_MIN_LAYER = 64 << 10


@dataclass
class SociImage:
    """An ordinary gzip image indexed by `lazysnap index create` and published by `lazysnap index push` (v1)."""

    ref: str
    """host/lazysnap/soci-index:v1 — plain gzip layers, never rewritten."""
    image: Image
    manifest_digest: str
    layers: list[Layer]
    indexed: dict[str, str]
    """Layer digest -> the digest of its zTOC (layers of at least `min_layer_size` bytes)."""
    skipped: list[str]
    """Layer digests without a zTOC (below `min_layer_size`): pulled whole by lazysnap."""
    index_digest: str
    store: Path
    """The `--store` the index was built in (a LocalIndexes directory)."""
    data: bytes
    """The content of /data/random.bin (in the last, indexed layer); /data/small.txt holds "small\\n"."""
    span_size: int = SOCI_SPAN
    min_layer_size: int = SOCI_MIN_LAYER


def lazysnap_cli(*args: str) -> str:
    """Run `python -m snapshotter ARGS` as a user would; its stdout (a failure shows both streams)."""
    done = subprocess.run([sys.executable, "-m", "snapshotter", *args], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise HarnessError(f"lazysnap {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}")
    return done.stdout


@pytest.fixture(scope="session")
def soci_image(registry: Registry) -> Iterator[SociImage]:
    """The sample image plus a data layer, with a SOCI v1 index made and pushed by the lazysnap CLI.

    The sample's middle and top layers are below the 64 KiB minimum, so they are skipped;
    the busybox layer and the data layer (3 MiB random + text, many 256 KiB spans) are indexed.
    """
    tmp = short_tmpdir("lzs-soci-")
    try:
        layout = OCILayout(tmp / "layout")
        data = random.Random(4).randbytes(3 << 20)
        text = b"".join(b"row %d of a text file\n" % i for i in range(60_000))
        layers = [Layer.from_entries(entries) for entries in sample_layers()]
        layers.append(Layer.from_entries([File("data/random.bin", data), File("data/text.log", text),
                                          File("data/small.txt", "small\n")]))
        image = layout.add_image("v1", layers, cmd=["/hello.sh"])
        ref = push(layout.root, "v1", registry, "lazysnap/soci-index", image=image)
        store = tmp / "soci"
        common = ["--store", str(store), "--plain-http"]
        lazysnap_cli("index", "create", ref, "--span-size", str(SOCI_SPAN), "--min-layer-size", str(SOCI_MIN_LAYER),
                     *common)
        lazysnap_cli("index", "push", ref, *common)
        local = LocalIndexes(store)
        index_digest = local.index_for(image.manifest_digest)
        if index_digest is None:
            raise HarnessError(f"lazysnap index create left no index for {ref} in {store}")
        index = soci_index.parse_index(local.get_blob(index_digest) or b"", index_digest)
        indexed = {layer: ref_.digest for layer, ref_ in index.ztocs.items()}
        skipped = [layer.digest for layer in layers if layer.digest not in indexed]
        yield SociImage(ref, image, image.manifest_digest, layers, indexed, skipped, index_digest, store, data)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------- a registry that wants credentials

PRIVATE_USER = "robot"
PRIVATE_SECRET = "Pr1vate-Registry-Secret-93c2"
"""A password no log, status or error message may show (tests grep for it)."""


@pytest.fixture(scope="module")
def private_registry(preflight: None) -> Iterator[Registry]:
    reg = Registry(users={PRIVATE_USER: PRIVATE_SECRET}).start()
    try:
        yield reg
    finally:
        reg.close()


@pytest.fixture(scope="module")
def private_image(private_registry: Registry) -> Iterator[tuple[str, list[str]]]:
    """The sample image as eStargz, pushed with the registry's credentials: (ref, layer digests)."""
    tmp = short_tmpdir("lzs-priv-")
    try:
        layout = OCILayout(tmp / "layout")
        layers = [build_estargz(entries, chunk_size=256 << 10).layer() for entries in sample_layers()]
        image = layout.add_image("private", layers, cmd=["/hello.sh"])
        ref = push(layout.root, "private", private_registry, "lazysnap/private:latest", image=image)
        yield ref, [layer.digest for layer in image.layers]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
