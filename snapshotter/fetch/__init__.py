"""Fetching a lazy layer's bytes ahead of its reads, and the blobs they come from.

It stands between the chunk cache and the registry client below and the layers above
(`layers/` builds trees and serves reads; this package decides which units to fetch,
when, and with how few range GETs). It never imports `layers/`, `fuse/`, `dataplane/`,
the daemon or the service (tests/unit/test_house_rules.py checks it). Read it in this order:

- `units.py`: the units a layer is cut into, and which of them a set of byte ranges reaches;
- `batching.py`: units grouped into runs, one range GET per run, cut back into verified units;
- `blob.py`: the layer blob those GETs read, through the registry client;
- `activity.py`: foreground fetching, which everything here yields to;
- `progress.py`: how far ahead of its reads a layer is (`lazysnap status`);
- `prefetch.py`, `readahead.py`, `background.py`: the three ways of fetching ahead
  (at mount, behind a streak of misses, once reads go quiet).

Single-flight (concurrent misses of one key fetch once) stays in `cache.py`: it is part of
the cache's state of a key (cached, being filled, or missing: `ChunkCache.wanted` must see
both), and the data plane's reader cache uses it without any of this package.
"""
