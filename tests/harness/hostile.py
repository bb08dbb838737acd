"""eStargz layers whose TOC lies about the tar it sits in, for tests of hostile indexes.

`build_hostile_estargz` builds a good eStargz layer with `tests.harness.estargz`, lets the
caller rewrite its TOC (a JSON object), and puts the blob back together around the new
TOC. The file members are untouched, so the blob is still a valid tar.gz that containerd
applies as an ordinary layer; only what the TOC says is hostile. Everything that depends
on the TOC bytes is recomputed, so nothing but the TOC's content gives it away:

- the TOC member and the footer (the TOC starts where it did: the payload is the same);
- the diff id (the TOC is the tar's last member, so the uncompressed stream changes too);
- the `containerd.io/snapshot/stargz/toc.digest` annotation (`EStargzLayer.annotations`),
  so lazysnap verifies the TOC and finds it is the one the image vouches for.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
from collections.abc import Callable, Iterable
from typing import Any

from .estargz import DEFAULT_CHUNK_SIZE, EStargzLayer, assemble, build_estargz, encode_toc
from .images import Entry

TocHook = Callable[[dict[str, Any]], None]
"""Rewrites a TOC in place: `{"version": 1, "entries": [{"name": ..., "type": ..., ...}, ...]}`."""


def build_hostile_estargz(entries: Iterable[Entry], mutate_toc: TocHook, *,
                          chunk_size: int = DEFAULT_CHUNK_SIZE) -> EStargzLayer:
    """An eStargz layer of `entries` whose TOC is what `mutate_toc` made of the honest one."""
    honest = build_estargz(entries, chunk_size=chunk_size)
    toc = copy.deepcopy(honest.toc)
    mutate_toc(toc)
    toc_json = encode_toc(toc)
    if toc_json == honest.toc_json:
        raise ValueError("mutate_toc left the TOC as it was")
    blob = assemble(honest.payload, toc_json)
    stream = gzip.decompress(blob)  # every member, the footer's empty one included
    return EStargzLayer(
        blob=blob, toc_json=toc_json, toc_offset=honest.toc_offset,
        diff_id="sha256:" + hashlib.sha256(stream).hexdigest(), uncompressed_size=len(stream),
        footer_size=honest.footer_size, toc=toc,
    )


def retarget_hardlink(path: str, target: str) -> TocHook:
    """A hook that points the TOC's hardlink entry `path` at `target` (the tar member keeps its own)."""

    def mutate(toc: dict[str, Any]) -> None:
        links = [e for e in toc["entries"] if e.get("type") == "hardlink" and e.get("name") == path]
        if len(links) != 1:
            raise ValueError(f"the TOC has {len(links)} hardlink entries named {path!r}")
        links[0]["linkName"] = target

    return mutate
