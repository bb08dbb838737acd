"""Fixtures for integration tests: a registry with the sample image, lazysnap, containerd.

Teardown order (pytest tears fixtures down in reverse): containerd first (tasks
killed, containers removed, shims stopped, its mounts dropped), then lazysnap
(stopped, mounts below its root dropped), then the temp dirs. When a test
fails, the tails of the containerd and lazysnap logs are printed in its report.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.containerd import Containerd
from tests.harness.images import Image, OCILayout, push, sample_image
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
    config = None
    marker = request.node.get_closest_marker("lazysnap_config")
    if marker is not None:
        config = workdir / "lazysnap.toml"
        config.write_text("\n".join(marker.args) + "\n")
    daemon = Lazysnap(root=workdir / "root", address=workdir / "ls.sock", log_path=workdir / "lazysnap.log",
                      config=config)
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
