"""A served layer's files on disk: what the control plane writes once and both planes rebuild it from.

Under `<root>/layers/<layer id>/`:
- `toc.gz` (an eStargz TOC member), `toc.zst` (a zstd:chunked TOC, compressed as in the
  blob) or `ztoc`: the verified index, checked against the layer record's index digest
  whenever it is loaded;
- `meta.erofs`: the EROFS image of the layer's tree, when the kernel serves its metadata;
- `device.map` (eStargz, zstd:chunked) or `extents` (SOCI): where each file's bytes sit on that image's
  data device, so the data plane serves the device without building the image or the
  tree again (`device.py`: that is the control plane's heaviest CPU work, and the data
  plane must stay responsive).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from ..cache import ChunkCache
from ..fetch.activity import FetchActivity
from ..formats import ztoc
from ..formats.erofs import Extent
from ..formats.errors import FormatError
from ..layer_modes import CHUNKED, LayerMode
from ..store import LayerRecord
from .estargz import EStargzLayer, parse_index
from .layer import Blob, UnitSource
from .soci import SociLayer

INDEX_DIR = "layers"
_INDEX_FILES: dict[str, str] = {LayerMode.ESTARGZ: "toc.gz", LayerMode.ZSTD_CHUNKED: "toc.zst", LayerMode.SOCI: "ztoc"}

_EXTENT = struct.Struct(">QQQ")


@dataclass(frozen=True)
class LayerFiles:
    dir: Path
    format: str
    """A `LayerMode` value, as the layer record saves it."""

    @property
    def index(self) -> Path:
        return self.dir / _INDEX_FILES.get(self.format, "ztoc")

    @property
    def meta(self) -> Path:
        return self.dir / "meta.erofs"

    @property
    def extents(self) -> Path:
        return self.dir / "extents"

    @property
    def device(self) -> Path:
        return self.dir / "device.map"

    def has_image(self) -> bool:
        """Whether everything a data plane needs to serve the layer through EROFS is saved."""
        return self.meta.exists() and (self.device if self.format in CHUNKED else self.extents).exists()


def files_of(root: Path, record: LayerRecord) -> LayerFiles:
    return LayerFiles(root / INDEX_DIR / str(record.id), record.format)


def build_layer(kind: str, saved: bytes, offset: int, blob: Blob, cache: ChunkCache, activity: FetchActivity | None,
                source: UnitSource | None = None) -> tuple[EStargzLayer | SociLayer, str]:
    """The layer served from a saved index, and the index's digest (to check against the record)."""
    if kind in CHUNKED:
        index = parse_index(saved, offset, kind)
        return EStargzLayer(index, blob, cache, activity, source), index.toc.digest
    if kind == LayerMode.SOCI:
        return SociLayer(ztoc.parse_ztoc(saved), blob, cache, activity, source), ztoc.ztoc_digest(saved)
    raise FormatError(f"unknown layer format {kind!r}")


def load_layer(root: Path, record: LayerRecord, blob: Blob, cache: ChunkCache, activity: FetchActivity | None = None,
               source: UnitSource | None = None) -> EStargzLayer | SociLayer:
    """Rebuild a stored layer; OSError or FormatError if its saved index is gone or not the one recorded."""
    saved = files_of(root, record).index.read_bytes()
    layer, digest = build_layer(record.format, saved, record.index_offset, blob, cache, activity, source)
    if digest != record.index_digest:
        raise FormatError(f"saved index digest {digest} is not {record.index_digest}")
    return layer


def encode_extents(data_size: int, extents: list[Extent]) -> bytes:
    return struct.pack(">Q", data_size) + b"".join(_EXTENT.pack(e.offset, e.ino, e.size) for e in extents)


def decode_extents(raw: bytes) -> tuple[int, list[Extent]]:
    """(data device size, extents in device order); FormatError if the file is torn."""
    if len(raw) < 8 or (len(raw) - 8) % _EXTENT.size:
        raise FormatError(f"extents file of {len(raw)} bytes is torn")
    (size,) = struct.unpack_from(">Q", raw)
    extents = [Extent(*fields) for fields in _EXTENT.iter_unpack(raw[8:])]
    return size, extents
