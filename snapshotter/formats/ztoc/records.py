"""The zTOC's records, field for field as proto/ztoc.fbs stores them, and its constants.

`FileMetadata` (one tar member) lives in `formats.tar`, since the tar scanner makes it;
it is named here too, as the zTOC's entry.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import NamedTuple

from ..tar import FileMetadata

ZTOC_VERSION = "0.9"
DEFAULT_BUILD_TOOL = "lazysnap"
TAR_ZINFO_VERSION = 2
XATTR_PAX_PREFIX = "SCHILY.xattr."


class CompressionAlgorithm(enum.IntEnum):
    """The schema's enum; a zTOC that leaves the field out means gzip."""

    GZIP = 1
    UNCOMPRESSED = 2


@dataclass
class CompressionInfo:
    """How the blob is cut into spans: `checkpoints` is the gzip blob or a TarZinfo flatbuffer."""

    algorithm: CompressionAlgorithm = CompressionAlgorithm.GZIP
    max_span_id: int = 0
    span_digests: list[str] = field(default_factory=list)
    checkpoints: bytes = b""


@dataclass
class Ztoc:
    """A layer's zTOC: its tar members and how its blob is cut into spans."""

    version: str
    build_tool_identifier: str
    compressed_archive_size: int
    uncompressed_archive_size: int
    entries: list[FileMetadata]
    compression: CompressionInfo


class FileExtent(NamedTuple):
    """A regular file's bytes: [uncompressed_offset, +size) of the layer's uncompressed tar.

    A named tuple: a node_modules layer has 30,000, and a frozen dataclass is slow to build.
    """

    uncompressed_offset: int
    size: int

    @property
    def end(self) -> int:
        return self.uncompressed_offset + self.size


@dataclass(frozen=True)
class TarZinfo:
    """The zinfo of an uncompressed layer: spans of `span_size` bytes over `size` bytes."""

    version: int
    span_size: int
    size: int

    @property
    def max_span_id(self) -> int:
        return (self.size - 1) // self.span_size if self.size > 0 else -1


__all__ = [
    "DEFAULT_BUILD_TOOL", "TAR_ZINFO_VERSION", "XATTR_PAX_PREFIX", "ZTOC_VERSION",
    "CompressionAlgorithm", "CompressionInfo", "FileExtent", "FileMetadata", "TarZinfo", "Ztoc",
]
