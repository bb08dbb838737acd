"""A private image served lazily, with credentials from a Docker credential helper.

The registry is Debian's docker-registry with htpasswd basic auth; the credentials live
only in a `docker-credential-*` helper script of the test's own, named for the registry
in `credHelpers` of the config.json that both `lazysnap rpull` and the daemon read. The
daemon runs the helper for the pull and again for the reads of the running container.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.containerd import Containerd
from tests.harness.images import HELLO_OUTPUT
from tests.harness.lazysnap import Lazysnap
from tests.harness.registry import Registry

from .conftest import PRIVATE_SECRET as SECRET
from .conftest import PRIVATE_USER as USER
from .conftest import serving
from .test_lazy import LAZY, PULL_ROW, lazysnap_cli, short

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

HELPER = "lzstest"
HELPER_SCRIPT = """#!/bin/sh
read -r url
echo "get $url" >> {log}
printf '{{"ServerURL":"%s","Username":"{user}","Secret":"{secret}"}}\\n' "$url"
"""


@pytest.fixture
def docker_config(workdir: Path, private_registry: Registry) -> Path:
    """config.json naming the test's helper for the private registry; the helper in workdir/bin."""
    helper = workdir / "bin" / f"docker-credential-{HELPER}"
    helper.parent.mkdir()
    helper.write_text(HELPER_SCRIPT.format(log=workdir / "helper-runs.log", user=USER, secret=SECRET))
    helper.chmod(0o755)
    path = workdir / "docker" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"credHelpers": {private_registry.host: HELPER}}))
    return path


@pytest.fixture
def lazysnap(workdir: Path, docker_config: Path, request: pytest.FixtureRequest) -> Iterator[Lazysnap]:
    """The daemon with the helper on its PATH and the config.json as its `docker_config`."""
    env = {**os.environ, "PATH": f"{docker_config.parent.parent / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    settings = [f'docker_config = "{docker_config}"']
    for daemon in serving(workdir, request, settings, env=env):
        yield daemon


def test_private_image_served_lazily_with_helper_credentials(
        containerd: Containerd, lazysnap: Lazysnap, private_registry: Registry,
        private_image: tuple[str, list[str]], docker_config: Path, workdir: Path, cid: str) -> None:
    ref, layer_digests = private_image

    # Without credentials the registry refuses, and the error says where lazysnap looked.
    anonymous = workdir / "anonymous" / "config.json"
    anonymous.parent.mkdir()
    anonymous.write_text("{}")
    done = lazysnap_cli("rpull", ref, "--plain-http", "--containerd", str(containerd.address),
                        "--address", str(lazysnap.address), "--docker-config", str(anonymous))
    assert done.returncode != 0
    assert f"{private_registry.host} wants basic authentication" in done.stderr, done.stderr
    assert f"auths of {anonymous}: nothing for {private_registry.host}" in done.stderr, done.stderr

    mark = private_registry.mark()
    done = lazysnap_cli("rpull", ref, "--plain-http", "--containerd", str(containerd.address),
                        "--address", str(lazysnap.address), "--docker-config", str(docker_config))
    output = f"$ lazysnap rpull {ref}\n{done.stdout}{done.stderr}"
    assert done.returncode == 0, f"{output}\n{lazysnap.log_tail()}"
    rows = {m["digest"]: m["how"] for m in map(PULL_ROW.match, done.stdout.splitlines()) if m}
    assert list(rows) == [short(d) for d in layer_digests], output
    assert all(how == "lazy estargz" for how in rows.values()), output

    container = containerd.run_container(ref, cid, "sh", "-c", "/hello.sh; sha256sum /bin/busybox",
                                         snapshotter=LAZY, timeout=120)
    lines = container.stdout.splitlines()
    assert lines[0] == HELLO_OUTPUT, container.stdout
    assert lines[1].split()[0] == hashlib.sha256(Path("/bin/busybox").read_bytes()).hexdigest(), container.stdout

    helper_runs = (workdir / "helper-runs.log").read_text().splitlines()
    assert helper_runs and set(helper_runs) == {f"get {private_registry.host}"}, helper_runs
    served = [r for r in private_registry.requests(settle=0.3)[mark:] if r.blob is not None and r.method == "GET"]
    assert any(r.status == 206 and r.blob[1] in layer_digests for r in served), \
        "the container's reads fetched ranges of the private layers"
    assert any(r.status == 401 for r in private_registry.requests()[mark:]), "the registry did ask for credentials"
    assert SECRET not in lazysnap.log_path.read_text(), "the secret never reaches the daemon's log"
    assert SECRET not in output

