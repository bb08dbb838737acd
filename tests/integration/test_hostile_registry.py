"""Hostile registry answers, end to end: a registry (the fault proxy in front of the real one)
that answers a range GET with something else than what was asked.

For each kind of answer (`tests/harness/faultproxy.py`: a body longer or shorter than its
Content-Range, bytes trailing the body, a body cut off, a 206 for another range, a
multipart body delimited by another boundary than its Content-Type names, a redirect
loop, a body trickled slower than any read can wait for), a container reads a file of a
lazily served layer that was never fetched, and gets either its right bytes (lazysnap
recovered legitimately: a retry, or bytes the HTTP framing delimits rightly) or EIO, with
no byte at all, never another byte; within `read_timeout` and a margin; with the reason in
lazysnap's log. Once the registry behaves again, the same read succeeds. The same for a
SOCI layer's span reads.

At pull time, the same answers to the range GET that finds a layer's footer and TOC make
that layer fall back to a whole pull, with the reason; the same answers to every range GET
of the blob (a whole pull fetches 4 MiB segments by range too) make the pull fail cleanly,
with the reason, and it pulls once the registry behaves.

Not here: a whole pull of a blob of at most 4 MiB is one streamed GET, bounded only by
`Timeouts.read` between bytes, so a slow drip that is never silent that long holds the pull
for as long as it drips (measured: still pulling a 1 MiB layer after 150 s).
"""

from __future__ import annotations

import hashlib
import re
import time

import pytest

from snapshotter.fuse.filesystem import DEFAULT_FAIL_FAST
from snapshotter.layers.estargz import TAIL_READ
from tests.harness.containerd import Containerd
from tests.harness.faultproxy import (
    LONG_BODY,
    REDIRECT_LOOP,
    SHORT_BODY,
    SLOW_DRIP,
    TRAILING_BYTES,
    TRUNCATED,
    WRONG_BOUNDARY,
    WRONG_RANGE,
    FaultProxy,
)
from tests.harness.lazysnap import Lazysnap
from tests.harness.procs import wait_until

from .conftest import SociImage
from .test_lazy import (  # noqa: F401  (lazy_images: a fixture)
    READ_SECRET,
    SMALL_TEXT,
    LazyImages,
    _pull_and_warm,
    assert_secret_fails,
    assert_secret_reads,
    lazy_images,
    lazysnap_cli,
    rpull,
    run_script,
    secret_outcome,
    snapshot_keys,
    short,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

READ_TIMEOUT = 3.0
RESOLVE_TIMEOUT = 5.0
MARGIN = 5.0
"""Seconds a container takes to start, run `cat` and stop, on top of what the read may wait."""
CONFIG = (f"read_timeout = {READ_TIMEOUT}", f"resolve_timeout = {RESOLVE_TIMEOUT}",
          "background_fetch = false")   # nothing but the reads under test may fetch the secret
RIGHT, EIO = "right bytes", "EIO"


@pytest.fixture
def images(request: pytest.FixtureRequest) -> LazyImages:
    """The images of test_lazy.py (its module-scoped `lazy_images`)."""
    return request.getfixturevalue("lazy_images")


def _cases() -> list:
    """(kind, options, what the reader gets, the reason lazysnap logs): what lazysnap does today."""
    return [
        pytest.param(LONG_BODY, {}, EIO, r"-byte answer, more than the \d+ bytes expected", id="long-body"),
        # Content-Length frames the right bytes; the garbage after them is never read as an answer:
        # a connection with unread bytes is not reused.
        pytest.param(TRAILING_BYTES, {}, RIGHT, None, id="trailing-bytes"),
        pytest.param(SHORT_BODY, {}, EIO, r"body has \d+ bytes, Content-Range promised \d+", id="short-body"),
        pytest.param(TRUNCATED, {}, EIO, r"RemoteProtocolError: peer closed connection", id="truncated"),
        pytest.param(TRUNCATED, {"times": 1}, RIGHT, None, id="truncated-once-then-retried"),
        pytest.param(WRONG_RANGE, {}, EIO, r"server sent bytes \d+-\d+ \(wrong Content-Range\)", id="wrong-range"),
        pytest.param(WRONG_BOUNDARY, {}, EIO, r"multipart body without its boundary", id="wrong-boundary"),
        pytest.param(WRONG_BOUNDARY, {"variant": "prefix"}, EIO, r"malformed multipart boundary line",
                     id="boundary-prefix"),
        pytest.param(REDIRECT_LOOP, {"variant": "self"}, EIO, r"more than \d+ redirects", id="redirect-to-itself"),
        pytest.param(REDIRECT_LOOP, {"variant": "pair"}, EIO, r"more than \d+ redirects", id="redirect-ping-pong"),
        pytest.param(SLOW_DRIP, {}, EIO, rf"no answer within {READ_TIMEOUT:g} s", id="slow-drip"),
    ]


def _secret_digest(images: LazyImages) -> str:
    return hashlib.sha256(images.secret).hexdigest()


def _eio_lines(log: str) -> list[str]:
    """The data plane's EIO lines (with kernel metadata a layer's file bytes are read through
    its EROFS data device, so a line names the layer's /data file, not /secret.bin)."""
    return [line for line in log.splitlines() if "EIO: layer" in line]


@pytest.mark.lazysnap_config(*CONFIG)
@pytest.mark.parametrize(("kind", "options", "expected", "reason"), _cases())
def test_hostile_answer_to_a_read(kind: str, options: dict, expected: str, reason: str | None,
                                  containerd: Containerd, lazysnap: Lazysnap, images: LazyImages,
                                  proxy: FaultProxy, cid: str) -> None:
    ref = f"{proxy.host}/lazysnap/{images.big.tag}:latest"
    data_digest = images.big.layer_digests[-1]
    _pull_and_warm(containerd, lazysnap, ref, cid)
    log_mark = len(lazysnap.log_text())

    proxy.hostile(kind, match=data_digest, **options)
    done, seconds = run_script(containerd, ref, READ_SECRET, cid + "-hostile", check=False)
    assert proxy.hostile_answers[kind] > 0, f"no {kind} answer was sent: the read never reached the registry"
    rc, digest = secret_outcome(done.stdout)
    # Never other bytes: either every byte, right, or none at all.
    if rc == 0:
        assert digest == _secret_digest(images), f"cat returned wrong bytes:\n{done.stdout}"
    else:
        assert_secret_fails(done.stdout, images.secret)
    got = RIGHT if rc == 0 else EIO
    log = lazysnap.log_text()[log_mark:]
    print(f"{kind} {options}: {got} in {seconds:.1f} s; logged: {_eio_lines(log)[:1]}")
    assert got == expected, f"{kind} {options}: expected {expected}, got {got}\n{done.stdout}\n{_eio_lines(log)}"
    assert seconds < READ_TIMEOUT + MARGIN, f"the read took {seconds:.1f} s (read_timeout {READ_TIMEOUT} s)"
    if expected == EIO:
        assert reason is not None
        eio = _eio_lines(log)
        assert eio, f"no EIO logged:\n{log[-4000:]}"
        assert any(re.search(reason, line) for line in eio), (
            f"the logged EIO does not give the reason /{reason}/:\n" + "\n".join(eio))

    proxy.calm()
    time.sleep(2 * DEFAULT_FAIL_FAST)  # reads within DEFAULT_FAIL_FAST of a failure fail at once, by design
    done, _ = run_script(containerd, ref, READ_SECRET, cid + "-calm")
    assert_secret_reads(done.stdout, images.secret)


def _pull_cases() -> list:
    """Hostile answers to the range GET of the data layer's tail (footer and TOC), and the reason
    the layer then falls back with."""
    return [
        pytest.param(LONG_BODY, {}, r"more than the \d+ bytes expected", id="long-body"),
        pytest.param(SHORT_BODY, {}, r"Content-Range promised", id="short-body"),
        pytest.param(TRUNCATED, {}, r"peer closed connection", id="truncated"),
        pytest.param(WRONG_RANGE, {}, r"wrong Content-Range", id="wrong-range"),
        pytest.param(WRONG_BOUNDARY, {}, r"multipart body without its boundary", id="wrong-boundary"),
        pytest.param(REDIRECT_LOOP, {}, r"more than \d+ redirects", id="redirect-loop"),
        pytest.param(SLOW_DRIP, {}, rf"{RESOLVE_TIMEOUT:g} s", id="slow-drip"),
    ]


def _tail_range(images: LazyImages) -> str:
    """The Range header of the GET that finds the data layer's footer and TOC (`layers/estargz.read_tail`)."""
    size = len(images.big.image.layers[-1].blob)
    return f"bytes={max(0, size - TAIL_READ)}-{size - 1}"


@pytest.mark.lazysnap_config(*CONFIG)
@pytest.mark.parametrize(("kind", "options", "reason"), _pull_cases())
def test_hostile_answer_to_the_index_fetch_falls_back(kind: str, options: dict, reason: str,
                                                     containerd: Containerd, lazysnap: Lazysnap,
                                                     images: LazyImages, proxy: FaultProxy, cid: str) -> None:
    ref = f"{proxy.host}/lazysnap/{images.big.tag}:latest"
    *lower, data_digest = images.big.layer_digests
    proxy.hostile(kind, match=data_digest, range=_tail_range(images), **options)
    began = time.monotonic()
    output, rows = rpull(containerd, lazysnap, ref)
    seconds = time.monotonic() - began
    assert proxy.hostile_answers[kind] > 0, f"no {kind} answer was sent:\n{output}"
    data = rows[short(data_digest)]
    print(f"{kind} {options}: {data.how} in {seconds:.1f} s: {data.why}")
    assert data.how == "pulled whole by lazysnap", output
    assert re.search(reason, data.why), f"the fallback reason must say what was wrong (/{reason}/):\n{output}"
    assert all(rows[short(d)].how == "lazy estargz" for d in lower), output
    assert seconds < RESOLVE_TIMEOUT + 30, f"the pull took {seconds:.1f} s"

    # The layer is whole on disk: its files read right, the registry still hostile.
    done, _ = run_script(containerd, ref, f"cat /small.txt; {READ_SECRET}", cid)
    assert done.stdout.startswith(SMALL_TEXT), done.stdout
    assert_secret_reads(done.stdout, images.secret)


def _pull_fails_cases() -> list:
    """Hostile answers to every range GET of the data layer: neither a lazy mount nor a whole pull
    (range GETs of 4 MiB segments) can have it."""
    return [
        pytest.param(LONG_BODY, {}, r"more than the \d+ bytes expected", id="long-body"),
        pytest.param(TRUNCATED, {}, r"peer closed connection", id="truncated"),
        pytest.param(WRONG_RANGE, {}, r"wrong Content-Range", id="wrong-range"),
        pytest.param(WRONG_BOUNDARY, {}, r"multipart body without its boundary", id="wrong-boundary"),
        pytest.param(REDIRECT_LOOP, {"variant": "pair"}, r"more than \d+ redirects", id="redirect-loop"),
    ]


@pytest.mark.lazysnap_config(*CONFIG)
@pytest.mark.parametrize(("kind", "options", "reason"), _pull_fails_cases())
def test_hostile_registry_fails_the_pull_cleanly(kind: str, options: dict, reason: str, containerd: Containerd,
                                                lazysnap: Lazysnap, images: LazyImages, proxy: FaultProxy,
                                                cid: str) -> None:
    """The pull fails, saying why (not "internal error"), and pulls once the registry behaves."""
    ref = f"{proxy.host}/lazysnap/{images.big.tag}:latest"
    data_digest = images.big.layer_digests[-1]
    proxy.hostile(kind, match=data_digest, **options)
    began = time.monotonic()
    done = lazysnap_cli("rpull", ref, "--plain-http", "--containerd", str(containerd.address),
                        "--address", str(lazysnap.address))
    seconds = time.monotonic() - began
    output = f"{done.stdout}{done.stderr}"
    print(f"{kind} {options}: rpull exit {done.returncode} in {seconds:.1f} s:\n{output}")
    assert proxy.hostile_answers[kind] > 0, output
    assert done.returncode != 0, f"the pull of a layer that cannot be had succeeded:\n{output}"
    assert "internal error" not in output, f"the pull failed as an internal error:\n{output}\n{lazysnap.log_tail()}"
    assert re.search(reason, output), f"the pull's error must say why (/{reason}/):\n{output}\n{lazysnap.log_tail()}"
    assert seconds < RESOLVE_TIMEOUT + 30, f"the failing pull took {seconds:.1f} s"

    proxy.calm()
    # The failed pull's layers belong to no image: containerd collects them, but its scheduler may
    # wait for more mutations before it does (CI once waited 30 s in vain). A pull racing that
    # collection may find a parent gone between two Prepares, so collect now and wait for it.
    containerd.gc()
    wait_until(lambda: snapshot_keys(containerd) == [], 30, "containerd to collect the failed pull's snapshots")
    output, rows = rpull(containerd, lazysnap, ref)
    assert rows[short(data_digest)].how == "lazy estargz", output
    done, _ = run_script(containerd, ref, READ_SECRET, cid)
    assert_secret_reads(done.stdout, images.secret)


def _soci_cases() -> list:
    return [
        pytest.param(LONG_BODY, {}, EIO, r"more than the \d+ bytes expected", id="long-body"),
        pytest.param(TRUNCATED, {}, EIO, r"peer closed connection", id="truncated"),
        pytest.param(TRUNCATED, {"times": 1}, RIGHT, None, id="truncated-once-then-retried"),
        pytest.param(WRONG_RANGE, {}, EIO, r"wrong Content-Range", id="wrong-range"),
        pytest.param(WRONG_BOUNDARY, {}, EIO, r"multipart body without its boundary", id="wrong-boundary"),
        pytest.param(SLOW_DRIP, {}, EIO, rf"no answer within {READ_TIMEOUT:g} s", id="slow-drip"),
    ]


@pytest.mark.lazysnap_config(*CONFIG)
@pytest.mark.parametrize(("kind", "options", "expected", "reason"), _soci_cases())
def test_hostile_answer_to_a_soci_span_read(kind: str, options: dict, expected: str, reason: str | None,
                                            containerd: Containerd, lazysnap: Lazysnap, soci_image: SociImage,
                                            proxy: FaultProxy, cid: str) -> None:
    """The same through a SOCI layer, whose reads fetch zTOC spans of a plain gzip blob."""
    ref = soci_image.ref.replace(soci_image.ref.split("/")[0], proxy.host, 1)
    data_digest = soci_image.layers[-1].digest
    output, rows = rpull(containerd, lazysnap, ref)
    assert rows[short(data_digest)].how == "lazy soci", output
    log_mark = len(lazysnap.log_text())
    block = 300
    script = (f"dd if=/data/random.bin of=/tmp/out bs=4096 skip={block} count=1; echo dd-rc=$?; "
              "sha256sum /tmp/out")
    want = hashlib.sha256(soci_image.data[block * 4096:(block + 1) * 4096]).hexdigest()

    proxy.hostile(kind, match=data_digest, **options)
    done, seconds = run_script(containerd, ref, script, cid + "-hostile", check=False)
    assert proxy.hostile_answers[kind] > 0, f"no {kind} answer was sent: the read never reached the registry"
    rc = re.search(r"^dd-rc=(\d+)$", done.stdout, re.MULTILINE)
    digest = re.search(r"^([0-9a-f]{64})\s+/tmp/out$", done.stdout, re.MULTILINE)
    assert rc and digest, done.stdout
    if rc[1] == "0":
        assert digest[1] == want, f"dd returned wrong bytes:\n{done.stdout}"
    else:
        assert re.search(r"Input/output error|I/O error", done.stdout), done.stdout
        assert digest[1] == hashlib.sha256(b"").hexdigest(), f"dd returned bytes that are not the file's:\n{done.stdout}"
    got = RIGHT if rc[1] == "0" else EIO
    log = lazysnap.log_text()[log_mark:]
    print(f"soci {kind} {options}: {got} in {seconds:.1f} s; logged: {_eio_lines(log)[:1]}")
    assert got == expected, f"{kind} {options}: expected {expected}, got {got}\n{done.stdout}\n{_eio_lines(log)}"
    assert seconds < READ_TIMEOUT + MARGIN, f"the read took {seconds:.1f} s (read_timeout {READ_TIMEOUT} s)"
    if expected == EIO:
        assert reason is not None
        eio = _eio_lines(log)
        assert any(re.search(reason, line) for line in eio), (
            f"the logged EIO does not give the reason /{reason}/:\n" + "\n".join(eio) + log[-3000:])

    proxy.calm()
    time.sleep(2 * DEFAULT_FAIL_FAST)
    done, _ = run_script(containerd, ref, script, cid + "-calm")
    assert want in done.stdout, done.stdout
