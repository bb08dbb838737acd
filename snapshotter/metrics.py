"""Prometheus metrics at `metrics_address` (off by default): what a node operator graphs and alerts on.

Two kinds, all named `lazysnap_*`:
- measured where they happen: range GETs of layer blobs (`lazysnap_fetch_*`, from `fetch/blob.py`);
- read at scrape time from the daemon's own state (`Collector`): layers by mode and
  fallback cause, bytes fetched, prefetched and fetched in the background, the chunk cache,
  and what the data planes counted (FUSE requests, cache hits and misses of reads, EIOs by
  cause). A scrape asks the trio loop for one consistent snapshot; the data planes get
  `STATS_TIMEOUT` each (`dataplane/client.py`), so a hung one cannot hang the scrape.

The README lists every metric.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .config import parse_address

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry()
FETCH_SECONDS = Histogram(
    "lazysnap_fetch_seconds", "Range GETs of layer blobs, from request to last byte (reads, prefetch, background)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=REGISTRY)
FETCH_BYTES = Counter("lazysnap_fetch_bytes", "Bytes of layer blobs fetched with range GETs", registry=REGISTRY)
FETCH_ERRORS = Counter("lazysnap_fetch_errors", "Range GETs of layer blobs that failed", registry=REGISTRY)


@dataclass(frozen=True)
class Snapshot:
    """The daemon's state for one scrape."""

    layers: dict[str, int] = field(default_factory=dict)
    """Layers by mode: estargz, zstd:chunked, soci, fallback, whole."""
    fallbacks: dict[str, int] = field(default_factory=dict)
    """Layers pulled whole, by `FallbackCause` value."""
    complete_layers: int = 0
    fetched_bytes: int = 0
    prefetched_bytes: int = 0
    background_bytes: int = 0
    cache_bytes: int = 0
    cache_max_bytes: int = 0
    cache_evictions: int = 0
    read_hits: int = 0
    read_misses: int = 0
    fuse_ops: dict[str, tuple[int, float]] = field(default_factory=dict)
    read_failures: dict[str, int] = field(default_factory=dict)
    data_planes: dict[str, int] = field(default_factory=dict)
    """Live data planes: current and retiring."""


class Collector:
    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        try:
            s = self.snapshot()
        except Exception:  # the daemon is stopping, or its loop is gone: serve what is measured
            log.debug("no snapshot for this scrape", exc_info=True)
            return
        yield _labelled(GaugeMetricFamily("lazysnap_layers", "Layers lazysnap was asked for, by how they are served",
                                          labels=["mode"]), s.layers)
        yield _labelled(GaugeMetricFamily("lazysnap_fallback_layers", "Layers pulled whole, by cause",
                                          labels=["cause"]), s.fallbacks)
        yield GaugeMetricFamily("lazysnap_complete_layers", "Lazy layers entirely in the cache", value=s.complete_layers)
        yield GaugeMetricFamily("lazysnap_layer_fetched_bytes", "Blob bytes fetched for the layers served now",
                                value=s.fetched_bytes)
        yield GaugeMetricFamily("lazysnap_layer_prefetched_bytes", "Bytes prefetch added to the cache, layers served now",
                                value=s.prefetched_bytes)
        yield GaugeMetricFamily("lazysnap_layer_background_bytes",
                                "Bytes background fetch added to the cache, layers served now", value=s.background_bytes)
        yield GaugeMetricFamily("lazysnap_cache_bytes", "Bytes in the chunk cache", value=s.cache_bytes)
        yield GaugeMetricFamily("lazysnap_cache_max_bytes", "The chunk cache's bound", value=s.cache_max_bytes)
        yield CounterMetricFamily("lazysnap_cache_evictions", "Chunks evicted from the cache", value=s.cache_evictions)
        yield CounterMetricFamily("lazysnap_read_hits", "Reads served from the chunk cache (data planes)",
                                  value=s.read_hits)
        yield CounterMetricFamily("lazysnap_read_misses", "Reads that asked the control plane for a chunk (data planes)",
                                  value=s.read_misses)
        requests = CounterMetricFamily("lazysnap_fuse_requests", "FUSE requests answered, by operation", labels=["op"])
        seconds = CounterMetricFamily("lazysnap_fuse_request_seconds", "Time in FUSE handlers, by operation",
                                      labels=["op"])
        for op, (count, spent) in sorted(s.fuse_ops.items()):
            requests.add_metric([op], count)
            seconds.add_metric([op], spent)
        yield requests
        yield seconds
        yield _labelled(CounterMetricFamily("lazysnap_read_errors", "Reads answered with EIO, by cause",
                                            labels=["cause"]), s.read_failures)
        yield _labelled(GaugeMetricFamily("lazysnap_data_planes", "Live data plane processes", labels=["state"]),
                        s.data_planes)


def _labelled(family: GaugeMetricFamily | CounterMetricFamily, values: dict[str, int]) -> Metric:
    for label, value in sorted(values.items()):
        family.add_metric([label], value)
    return family


def serve(address: str, snapshot: Callable[[], Snapshot]) -> Callable[[], None]:
    """Serve /metrics at `address` on a thread of its own; returns the function that stops it."""
    host, port = parse_address(address)
    REGISTRY.register(collector := Collector(snapshot))
    server, thread = start_http_server(port, host, registry=REGISTRY)
    log.info("serving Prometheus metrics on http://%s/metrics", address)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)
        REGISTRY.unregister(collector)

    return stop
