"""The zTOC writer: records to the flatbuffer, with the flatc-generated code (`ztoc_fbs`)."""

from __future__ import annotations

from collections.abc import Sequence

import flatbuffers

from ..tar import encode_text
from ..ztoc_fbs.zinfo import TarZinfo as fb_tar_zinfo
from ..ztoc_fbs.ztoc import TOC as fb_toc
from ..ztoc_fbs.ztoc import CompressionInfo as fb_compression_info
from ..ztoc_fbs.ztoc import FileMetadata as fb_file_metadata
from ..ztoc_fbs.ztoc import Xattr as fb_xattr
from ..ztoc_fbs.ztoc import Ztoc as fb_ztoc
from .records import FileMetadata, TarZinfo, Ztoc


def serialize_ztoc(z: Ztoc) -> bytes:
    """The flatbuffer, built in the order soci's Go marshaller builds it.

    Same call order means the same bytes for the same content, which keeps zTOC digests
    stable; it was not checked against soci itself (no soci binary here).
    """
    c = z.compression
    b = flatbuffers.Builder(len(c.checkpoints) + 256 * len(z.entries) + 1024)
    version = b.CreateString(encode_text(z.version))
    tool = b.CreateString(encode_text(z.build_tool_identifier))
    toc = _serialize_toc(b, z.entries)
    checkpoints = b.CreateByteVector(bytes(c.checkpoints))
    digest_offsets = [b.CreateString(encode_text(d)) for d in c.span_digests]
    fb_compression_info.StartSpanDigestsVector(b, len(digest_offsets))
    for off in reversed(digest_offsets):
        b.PrependUOffsetTRelative(off)
    digests = b.EndVector()
    fb_compression_info.Start(b)
    fb_compression_info.AddMaxSpanId(b, c.max_span_id)
    fb_compression_info.AddSpanDigests(b, digests)
    fb_compression_info.AddCheckpoints(b, checkpoints)
    fb_compression_info.AddCompressionAlgorithm(b, int(c.algorithm))
    info = fb_compression_info.End(b)
    fb_ztoc.Start(b)
    fb_ztoc.AddVersion(b, version)
    fb_ztoc.AddBuildToolIdentifier(b, tool)
    fb_ztoc.AddToc(b, toc)
    fb_ztoc.AddCompressedArchiveSize(b, z.compressed_archive_size)
    fb_ztoc.AddUncompressedArchiveSize(b, z.uncompressed_archive_size)
    fb_ztoc.AddCompressionInfo(b, info)
    b.Finish(fb_ztoc.End(b))
    return bytes(b.Output())


def _serialize_toc(b: flatbuffers.Builder, entries: Sequence[FileMetadata]) -> int:
    offsets = [0] * len(entries)
    for i in range(len(entries) - 1, -1, -1):
        offsets[i] = _serialize_file_metadata(b, entries[i])
    fb_toc.StartMetadataVector(b, len(offsets))
    for off in reversed(offsets):
        b.PrependUOffsetTRelative(off)
    metadata = b.EndVector()
    fb_toc.Start(b)
    fb_toc.AddMetadata(b, metadata)
    return int(fb_toc.End(b))


def _serialize_file_metadata(b: flatbuffers.Builder, e: FileMetadata) -> int:
    name, etype, linkname, uname, gname, mod_time = (
        b.CreateString(encode_text(s)) for s in (e.name, e.type, e.linkname, e.uname, e.gname, e.mod_time))
    xattr_offsets = []
    for key in sorted(e.xattrs):
        k = b.CreateString(encode_text(key))
        v = b.CreateString(bytes(e.xattrs[key]))
        fb_xattr.Start(b)
        fb_xattr.AddKey(b, k)
        fb_xattr.AddValue(b, v)
        xattr_offsets.append(fb_xattr.End(b))
    fb_file_metadata.StartXattrsVector(b, len(xattr_offsets))
    for off in reversed(xattr_offsets):
        b.PrependUOffsetTRelative(off)
    xattrs = b.EndVector()
    fb_file_metadata.Start(b)
    fb_file_metadata.AddName(b, name)
    fb_file_metadata.AddType(b, etype)
    fb_file_metadata.AddUncompressedOffset(b, e.uncompressed_offset)
    fb_file_metadata.AddUncompressedSize(b, e.uncompressed_size)
    fb_file_metadata.AddLinkname(b, linkname)
    fb_file_metadata.AddMode(b, e.mode)
    fb_file_metadata.AddUid(b, e.uid & 0xFFFFFFFF)
    fb_file_metadata.AddGid(b, e.gid & 0xFFFFFFFF)
    fb_file_metadata.AddUname(b, uname)
    fb_file_metadata.AddGname(b, gname)
    fb_file_metadata.AddModTime(b, mod_time)
    fb_file_metadata.AddDevmajor(b, e.devmajor)
    fb_file_metadata.AddDevminor(b, e.devminor)
    fb_file_metadata.AddXattrs(b, xattrs)
    return int(fb_file_metadata.End(b))


def serialize_tar_zinfo(t: TarZinfo) -> bytes:
    b = flatbuffers.Builder(64)
    fb_tar_zinfo.Start(b)
    fb_tar_zinfo.AddVersion(b, t.version)
    fb_tar_zinfo.AddSpanSize(b, t.span_size)
    fb_tar_zinfo.AddSize(b, t.size)
    b.Finish(fb_tar_zinfo.End(b))
    return bytes(b.Output())
