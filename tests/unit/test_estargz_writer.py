"""The test-side eStargz writer makes blobs that are still ordinary tar.gz layers.

If the writer were wrong, the parser tests built on it would prove nothing; these
checks use only the standard library (tarfile, gzip, zlib), never the parser.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
import zlib
from pathlib import Path

import pytest

from tests.harness.estargz import (
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    TOC_NAME,
    build_estargz,
    extract_members,
)
from tests.harness.images import CharDev, Dir, Entry, File, Hardlink, Opaque, Symlink, Whiteout

BIG = os.urandom(300_000)


def entries() -> list[Entry]:
    return [
        Dir("d", mode=0o750, uid=5, gid=6), File("d/big", BIG, mode=0o640),
        File("d/small", "small\n"), File("empty", b""), Symlink("link", "d/small"), Hardlink("hard", "d/big"),
        CharDev("null", 1, 3), Whiteout("gone"), Opaque("d"), File("ünï/文件", "u", xattrs={"user.k": "v"}),
    ]


@pytest.mark.parametrize("options", [
    {}, {"chunk_size": 64_000}, {"chunk_size": 64_000, "min_chunk_size": 1 << 20},
    {"legacy_footer": True}, {"prefetch": ["d/small"]}, {"no_prefetch_landmark": True},
], ids=["plain", "chunked", "packed", "legacy", "prefetch", "no-prefetch"])
def test_blob_is_a_plain_tar_gz(options: dict[str, object], tmp_path: Path) -> None:
    layer = build_estargz(entries(), **options)  # type: ignore[arg-type]
    stream = gzip.decompress(layer.blob)
    assert layer.diff_id == "sha256:" + hashlib.sha256(stream).hexdigest()
    assert layer.uncompressed_size == len(stream)
    members = extract_members(layer.blob)
    assert members[TOC_NAME][1] == layer.toc_json
    assert members["d/big"][1] == BIG and members["d"][0].isdir() and members["d"][0].uid == 5
    assert members["d/small"][1] == b"small\n" and members["link"][0].linkname == "d/small"
    assert members["hard"][0].islnk() and members["hard"][0].linkname == "d/big"
    assert members["null"][0].ischr() and (members["null"][0].devmajor, members["null"][0].devminor) == (1, 3)
    assert members["ünï/文件"][0].pax_headers["SCHILY.xattr.user.k"] == "v"
    assert ".wh.gone" in members and "d/.wh..wh..opq" in members
    landmarks = {PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK} & members.keys()
    assert len(landmarks) == ("prefetch" in options or "no_prefetch_landmark" in options)
    with tarfile.open(fileobj=io.BytesIO(layer.blob), mode="r:gz") as tar:
        tar.extractall(tmp_path, filter="fully_trusted" if os.geteuid() == 0 else "data")
    assert (tmp_path / "d" / "small").read_bytes() == b"small\n"
    assert (tmp_path / "hard").read_bytes() == BIG


def test_toc_is_last_member_and_footer_is_empty() -> None:
    layer = build_estargz(entries(), chunk_size=64_000)
    toc_member = layer.blob[layer.toc_offset:-layer.footer_size]
    inflater = zlib.decompressobj(31)
    tar_tail = inflater.decompress(toc_member)
    assert inflater.eof and inflater.unused_data == b""
    assert tar_tail[:len(TOC_NAME)] == TOC_NAME.encode() and tar_tail.endswith(bytes(1024))
    assert gzip.decompress(layer.blob[-layer.footer_size:]) == b""


def test_every_payload_starts_a_member_unless_packed() -> None:
    layer = build_estargz(entries(), chunk_size=64_000)
    offsets = {e["offset"] for e in layer.toc["entries"] if "offset" in e}
    for offset in offsets:
        inflater = zlib.decompressobj(31)
        assert inflater.decompress(layer.blob[offset:offset + 4096], 1)  # a gzip header is there
    assert not any("innerOffset" in e for e in layer.toc["entries"])
    packed = build_estargz(entries(), chunk_size=64_000, min_chunk_size=1 << 20)
    assert any("innerOffset" in e for e in packed.toc["entries"])
