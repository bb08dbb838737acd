"""Indexes built on this node (`lazysnap index create`), kept until pushed and after.

Blobs (zTOCs, index manifests) are stored content-addressed and written atomically;
`images/<image manifest digest>` names the index built for that image. The daemon
reads the same directory, so an index built locally serves lazy pulls at once, even
before (or without) it is pushed.
"""

from __future__ import annotations

from pathlib import Path

from ..atomic import write_atomically
from ..formats.digest import content_digest

DEFAULT_DIR = Path("/var/lib/lazysnap/soci")


class LocalIndexes:
    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def put_blob(self, data: bytes) -> str:
        digest = content_digest(data)
        path = self._blob_path(digest)
        if not path.exists():
            write_atomically(path, data)
        return digest

    def get_blob(self, digest: str) -> bytes | None:
        """The blob, if present and intact (a corrupt copy is removed, not returned)."""
        path = self._blob_path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if content_digest(data) != digest:
            path.unlink(missing_ok=True)
            return None
        return data

    def set_index(self, image_manifest_digest: str, index_digest: str) -> None:
        write_atomically(self._image_path(image_manifest_digest), index_digest.encode())

    def index_for(self, image_manifest_digest: str) -> str | None:
        try:
            return self._image_path(image_manifest_digest).read_text().strip() or None
        except FileNotFoundError:
            return None

    def set_name(self, image_manifest_digest: str, name: str) -> None:
        """Remember the reference the index was built for, so `index list` can show it."""
        write_atomically(self.dir / "names" / self._blob_path(image_manifest_digest).name, name.encode())

    def name_for(self, image_manifest_digest: str) -> str:
        try:
            return (self.dir / "names" / self._blob_path(image_manifest_digest).name).read_text().strip()
        except FileNotFoundError:
            return ""

    def images(self) -> list[tuple[str, str]]:
        """(image manifest digest, index digest) for every locally built index."""
        images = self.dir / "images"
        if not images.is_dir():
            return []
        return sorted((f"sha256:{p.name}", p.read_text().strip()) for p in images.iterdir() if not p.name.startswith("."))

    def _blob_path(self, digest: str) -> Path:
        algorithm, _, hex_ = digest.partition(":")
        if algorithm != "sha256" or len(hex_) != 64:
            raise ValueError(f"not a sha256 digest: {digest!r}")
        return self.dir / "blobs" / "sha256" / hex_

    def _image_path(self, digest: str) -> Path:
        return self.dir / "images" / self._blob_path(digest).name

