"""The Prometheus endpoint (`metrics_address`), scraped after a lazy run as an operator's Prometheus would."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness.containerd import Containerd
from tests.harness.lazysnap import Lazysnap
from tests.harness.procs import free_port

from .conftest import serving
from .test_lazy import HELLO_OUTPUT, LazyImages, lazy_images, rpull, run_script  # noqa: F401  (lazy_images: a fixture)


@pytest.fixture
def metrics_port() -> int:
    return free_port()


@pytest.fixture
def lazysnap(workdir: Path, metrics_port: int, request: pytest.FixtureRequest) -> Iterator[Lazysnap]:
    """`lazysnap serve` with its metrics endpoint on a loopback port of its own."""
    yield from serving(workdir, request, [f'metrics_address = "127.0.0.1:{metrics_port}"', "background_fetch = false"])


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_after_a_lazy_run(containerd: Containerd, lazysnap: Lazysnap, metrics_port: int, cid: str,
                                  request: pytest.FixtureRequest) -> None:
    images: LazyImages = request.getfixturevalue("lazy_images")
    before = scrape(metrics_port)
    assert before[("lazysnap_data_planes", (("state", "current"),))] == 1
    assert before.get(("lazysnap_fetch_bytes_total", ()), 0) == 0

    lazy, whole = images.estargz, images.gzip
    output, rows = rpull(containerd, lazysnap, lazy.ref)
    assert all(row.how == "lazy estargz" for row in rows.values()), output
    done, _ = run_script(containerd, lazy.ref, "/hello.sh", cid)
    assert done.stdout.splitlines() == [HELLO_OUTPUT]
    output, rows = rpull(containerd, lazysnap, whole.ref)
    assert all(row.how == "pulled whole by lazysnap" for row in rows.values()), output

    after = scrape(metrics_port)
    layers = len(lazy.layer_digests)
    assert after[("lazysnap_layers", (("mode", "estargz"),))] == layers
    assert after[("lazysnap_layers", (("mode", "whole"),))] == len(whole.layer_digests)
    assert after[("lazysnap_fallback_layers", (("cause", "no_index"),))] == len(whole.layer_digests)
    assert after[("lazysnap_fetch_seconds_count", ())] > 0
    assert after[("lazysnap_fetch_bytes_total", ())] >= after[("lazysnap_layer_fetched_bytes", ())] > 0
    assert after[("lazysnap_fuse_requests_total", (("op", "read"),))] > 0
    assert after[("lazysnap_read_hits_total", ())] + after[("lazysnap_read_misses_total", ())] > 0
    assert after[("lazysnap_cache_bytes", ())] > 0
    assert not any(name == "lazysnap_read_errors_total" and value for (name, _), value in after.items())
