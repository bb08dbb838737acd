"""Build eStargz layers in tests, independently of the parser under test.

`build_estargz` turns the declarative entries of `tests.harness.images` (`Dir`, `File`,
`Symlink`, `Hardlink`, `CharDev`, `Whiteout`, `Opaque`) into an eStargz blob: every
file payload starts a gzip member (or, with `min_chunk_size`, small payloads share one
and are found by `innerOffset`), files over `chunk_size` are split into `chunk`
entries, the TOC is the last tar member in its own gzip member, then the footer. The
result is still an ordinary tar.gz.

Tests that need a broken layer take a good one apart: `EStargzLayer.payload` plus
`toc_member` (any JSON bytes) plus `footer` gives a blob with a TOC of their choosing.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import io
import json
import tarfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .images import MEDIA_LAYER_GZIP, Entry, File, Layer, sha256_digest

TOC_NAME = "stargz.index.json"
PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
LANDMARK_CONTENT = b"\x0f"
TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"
DEFAULT_CHUNK_SIZE = 4 << 20

_TYPES = {
    tarfile.DIRTYPE: "dir", tarfile.REGTYPE: "reg", tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hardlink",
    tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo",
}


@dataclass
class EStargzLayer:
    """A built eStargz blob and the facts a test checks the parser against."""

    blob: bytes
    toc_json: bytes
    toc_offset: int
    diff_id: str                  # sha256 of the whole uncompressed tar stream
    uncompressed_size: int
    footer_size: int
    toc: dict[str, Any] = field(default_factory=dict)

    @property
    def toc_digest(self) -> str:
        return sha256_digest(self.toc_json)

    @property
    def digest(self) -> str:
        return sha256_digest(self.blob)

    @property
    def payload(self) -> bytes:
        """Everything before the TOC member: the file members a broken-TOC test keeps."""
        return self.blob[:self.toc_offset]

    @property
    def annotations(self) -> dict[str, str]:
        return {TOC_DIGEST_ANNOTATION: self.toc_digest, UNCOMPRESSED_SIZE_ANNOTATION: str(self.uncompressed_size)}

    def layer(self) -> Layer:
        """As an image layer for `OCILayout.add_image`, with the annotations a converter adds."""
        return Layer(self.blob, self.diff_id, MEDIA_LAYER_GZIP, annotations=self.annotations)


def footer(toc_offset: int, *, legacy: bool = False) -> bytes:
    """The footer: an empty gzip member whose extra field carries the TOC offset in hex."""
    subfield = b"%016xSTARGZ" % toc_offset
    extra = subfield if legacy else b"SG" + len(subfield).to_bytes(2, "little") + subfield
    header = b"\x1f\x8b\x08\x04" + b"\x00\x00\x00\x00" + b"\x00\xff" + len(extra).to_bytes(2, "little") + extra
    empty_stored_final_block = b"\x01\x00\x00\xff\xff"
    return header + empty_stored_final_block + b"\x00" * 8


def gzip_member(data: bytes, level: int = 6) -> bytes:
    compressor = zlib.compressobj(level, zlib.DEFLATED, 31)
    return compressor.compress(data) + compressor.flush()


def toc_tar(toc_json: bytes) -> bytes:
    """The tar bytes of the TOC member: its header, the JSON, padding, the end-of-archive blocks."""
    info = tarfile.TarInfo(TOC_NAME)
    info.size = len(toc_json)
    info.mode = 0o644
    return info.tobuf(tarfile.USTAR_FORMAT) + _padded(toc_json) + b"\x00" * 1024


def toc_member(toc_json: bytes, level: int = 6) -> bytes:
    return gzip_member(toc_tar(toc_json), level)


def assemble(payload: bytes, toc_json: bytes, *, legacy: bool = False) -> bytes:
    """A blob from payload members and any TOC JSON bytes (for tests of broken TOCs)."""
    return payload + toc_member(toc_json) + footer(len(payload), legacy=legacy)


def encode_toc(toc: dict[str, Any]) -> bytes:
    return json.dumps(toc, indent="\t", ensure_ascii=False).encode()


def build_estargz(entries: Iterable[Entry], *, chunk_size: int = DEFAULT_CHUNK_SIZE, min_chunk_size: int = 0,
                  prefetch: Sequence[str] | None = None, no_prefetch_landmark: bool = False,
                  legacy_footer: bool = False, chunk_digests: bool = True, level: int = 6) -> EStargzLayer:
    """An eStargz blob of `entries`, in order.

    `prefetch` moves those paths (and the directories above them) to the front, followed
    by `.prefetch.landmark`; `no_prefetch_landmark` puts `.no.prefetch.landmark` first.
    `chunk_digests=False` leaves out `chunkDigest`, as legacy stargz did.
    """
    ordered = _ordered(list(entries), prefetch, no_prefetch_landmark)
    writer = _Writer(chunk_size, min_chunk_size, chunk_digests, level)
    for entry in ordered:
        writer.add(entry)
    return writer.finish(legacy_footer)


def _ordered(entries: list[Entry], prefetch: Sequence[str] | None, no_prefetch: bool) -> list[Entry]:
    if no_prefetch:
        return [File(NO_PREFETCH_LANDMARK, LANDMARK_CONTENT), *entries]
    if prefetch is None:
        return entries
    by_name = {e.name: e for e in entries}
    first: list[Entry] = []
    for path in prefetch:
        parts = path.strip("/").split("/")
        for depth in range(1, len(parts) + 1):
            entry = by_name.get("/".join(parts[:depth]))
            if entry is not None and entry not in first:
                first.append(entry)
    rest = [e for e in entries if e not in first]
    return [*first, File(PREFETCH_LANDMARK, LANDMARK_CONTENT), *rest]


def _padded(data: bytes) -> bytes:
    return data + b"\x00" * (-len(data) % tarfile.BLOCKSIZE)


class _Writer:
    """Writes the tar stream into gzip members, cutting a new member where a payload must start one."""

    def __init__(self, chunk_size: int, min_chunk_size: int, chunk_digests: bool, level: int) -> None:
        self.chunk_size = chunk_size
        self.min_chunk_size = min_chunk_size
        self.chunk_digests = chunk_digests
        self.level = level
        self.out = bytearray()
        self.stream = bytearray()
        self.member: zlib._Compress | None = None
        self.member_start = 0
        self.member_raw = 0
        self.member_payload = 0
        self.seen: dict[str, Entry] = {}
        self.toc_entries: list[dict[str, Any]] = []

    def _open(self) -> None:
        if self.member is None:
            self.member = zlib.compressobj(self.level, zlib.DEFLATED, 31)
            self.member_start = len(self.out)
            self.member_raw = 0
            self.member_payload = 0

    def _close(self) -> None:
        if self.member is not None:
            self.out += self.member.flush()
            self.member = None

    def _write(self, data: bytes) -> None:
        self._open()
        assert self.member is not None
        self.out += self.member.compress(data)
        self.member_raw += len(data)
        self.stream += data

    def add(self, entry: Entry) -> None:
        name = entry.name
        if entry.kind == tarfile.LNKTYPE:
            target = self.seen[entry.linkname]
            entry = replace(entry, mode=target.mode, uid=target.uid, gid=target.gid, mtime=target.mtime)
        self.seen[name] = entry
        self._write(self._header(entry))
        toc = self._toc_entry(entry)
        if entry.kind != tarfile.REGTYPE or not entry.data:
            self.toc_entries.append(toc)
            return
        data = entry.data
        toc["digest"] = sha256_digest(data)
        for start in range(0, len(data), self.chunk_size):
            piece = data[start:start + self.chunk_size]
            pack = self.min_chunk_size > 0 and self.member is not None and 0 < self.member_payload < self.min_chunk_size
            if not pack:
                self._close()
            self._open()
            if start > 0:
                toc = {"name": name, "type": "chunk"}
            toc["offset"] = self.member_start
            if self.member_raw:
                toc["innerOffset"] = self.member_raw
            if start > 0:
                toc["chunkOffset"] = start
            if start + len(piece) < len(data):
                toc["chunkSize"] = len(piece)
            if self.chunk_digests:
                toc["chunkDigest"] = sha256_digest(piece)
            self._write(piece)
            self.member_payload += len(piece)
            self.toc_entries.append(toc)
        self._write(b"\x00" * (-len(data) % tarfile.BLOCKSIZE))

    @staticmethod
    def _header(entry: Entry) -> bytes:
        info = tarfile.TarInfo(entry.name + "/" if entry.kind == tarfile.DIRTYPE else entry.name)
        info.type = entry.kind
        info.mode = entry.mode
        info.uid, info.gid = entry.uid, entry.gid
        info.uname = info.gname = ""
        info.mtime = entry.mtime
        info.linkname = entry.linkname
        info.devmajor, info.devminor = entry.devmajor, entry.devminor
        info.size = len(entry.data) if entry.kind == tarfile.REGTYPE else 0
        if entry.xattrs:
            info.pax_headers = {f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") if isinstance(v, bytes)
                                else v for k, v in entry.xattrs.items()}
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")

    @staticmethod
    def _toc_entry(entry: Entry) -> dict[str, Any]:
        toc: dict[str, Any] = {"name": entry.name + "/" if entry.kind == tarfile.DIRTYPE else entry.name,
                     "type": _TYPES[entry.kind]}
        if entry.kind == tarfile.REGTYPE and entry.data:
            toc["size"] = len(entry.data)
        if entry.mtime:
            toc["modtime"] = _rfc3339(entry.mtime)
        if entry.linkname:
            toc["linkName"] = entry.linkname
        for key, value in (("mode", entry.mode), ("uid", entry.uid), ("gid", entry.gid)):
            if value:
                toc[key] = value
        if entry.kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            toc["devMajor"], toc["devMinor"] = entry.devmajor, entry.devminor
        if entry.xattrs:
            toc["xattrs"] = {k: base64.b64encode(v if isinstance(v, bytes) else v.encode()).decode()
                             for k, v in entry.xattrs.items()}
        if entry.kind == tarfile.REGTYPE and not entry.data:
            toc["digest"] = sha256_digest(b"")
        return toc

    def finish(self, legacy_footer: bool) -> EStargzLayer:
        self._close()
        toc = {"version": 1, "entries": self.toc_entries}
        toc_json = encode_toc(toc)
        toc_offset = len(self.out)
        tar_tail = toc_tar(toc_json)
        self.stream += tar_tail
        blob = bytes(self.out) + gzip_member(tar_tail, self.level) + footer(toc_offset, legacy=legacy_footer)
        return EStargzLayer(
            blob=blob, toc_json=toc_json, toc_offset=toc_offset,
            diff_id="sha256:" + hashlib.sha256(self.stream).hexdigest(),
            uncompressed_size=len(self.stream),
            footer_size=47 if legacy_footer else 51, toc=toc,
        )


def _rfc3339(seconds: int) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def extract_members(blob: bytes) -> dict[str, tuple[tarfile.TarInfo, bytes]]:
    """What Python's tarfile reads from the blob as a plain tar.gz: name -> (member, file bytes)."""
    out = {}
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        for member in tar:
            data = b""
            if member.isreg():
                extracted = tar.extractfile(member)
                assert extracted is not None
                data = extracted.read()
            out[member.name.rstrip("/")] = (member, data)
    return out

