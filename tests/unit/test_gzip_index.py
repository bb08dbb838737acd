"""gzip checkpoints: the blob codec, the zran-compatible builder, span inflation and digests.

The corpus is real: a tar of files from /usr/lib/python3.11, compressed by gzip at three
levels, by pigz (sync-flushed blocks, independent blocks) and as concatenated members, with
64 KiB spans so there are hundreds of checkpoints. The checkpoints are compared with those
of Debian's own zran.c (zlib1g-dev's example, compiled here), and every span is inflated
with both stdlib zlib and isal and compared with a plain decompression.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import shutil
import struct
import subprocess
import tracemalloc
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapshotter.formats import gzip_index as gi
from snapshotter.formats import inflate
from snapshotter.formats.errors import FormatError

SPAN = 64 << 10
ZRAN_DIR = Path("/usr/share/doc/zlib1g-dev/examples")
SOURCE_DIRS = [
    "usr/lib/python3.11/email", "usr/lib/python3.11/json", "usr/lib/python3.11/asyncio",
    "usr/lib/python3.11/lib-dynload", "usr/lib/python3.11/encodings", "usr/lib/python3.11/unittest",
]


@dataclass(frozen=True)
class Layer:
    name: str
    blob: bytes
    tar: bytes


def _need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is needed for the zTOC corpus: apt-get install {package}", pytrace=False)
    return path


def _run(args: list[str], data: bytes) -> bytes:
    return subprocess.run(args, input=data, stdout=subprocess.PIPE, check=True).stdout


def _members(tar: bytes, cuts: list[int], compress: list[str]) -> bytes:
    """Concatenated gzip members, cut at odd offsets (what `cat a.gz b.gz` and pigz-like tools make)."""
    bounds = [0, *cuts, len(tar)]
    return b"".join(_run(compress, tar[a:b]) for a, b in itertools.pairwise(bounds))


def build_corpus(base: Path) -> list[Layer]:
    """The corpus, built once per session and cached on disk (test_ztoc.py shares it)."""
    root = base / "ztoc-corpus"
    done = root / "done"
    tar_path = root / "layer.tar"
    if not done.exists():
        _need("gzip", "gzip")
        pigz = _need("pigz", "pigz")
        tar = _need("tar", "tar")
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run([tar, "-C", "/", "--sort=name", "-cf", str(tar_path), *SOURCE_DIRS], check=True)
        data = tar_path.read_bytes()
        rng = random.Random(7)
        cuts = sorted(rng.sample(range(1, len(data)), 11))
        variants = {
            "gzip1": _run(["gzip", "-1", "-c"], data),
            "gzip6": _run(["gzip", "-6", "-c"], data),
            "gzip9-name": subprocess.run(["gzip", "-9", "-c", str(tar_path)], stdout=subprocess.PIPE,
                                         check=True).stdout,
            "pigz": _run([pigz, "-c"], data),
            "pigz-b128-i": _run([pigz, "-b", "128", "-i", "-c"], data),
            "members-gzip": _members(data, cuts, ["gzip", "-6", "-c"]),
            "members-pigz": _members(data, cuts[::2], [pigz, "-9", "-b", "128", "-c"]),
        }
        for name, blob in variants.items():
            (root / f"{name}.gz").write_bytes(blob)
        done.touch()
    tar_bytes = tar_path.read_bytes()
    return [Layer(p.stem, p.read_bytes(), tar_bytes) for p in sorted(root.glob("*.gz"))]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Layer]:
    return build_corpus(tmp_path_factory.getbasetemp())


def chunks(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


@pytest.fixture(scope="session")
def indexes(corpus: list[Layer]) -> dict[str, gi.GzipIndex]:
    return {layer.name: gi.build_gzip_index(chunks(layer.blob, 100_003), SPAN) for layer in corpus}


@pytest.fixture(params=["zlib", "isal"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "isal":
        if inflate.isal is None:
            pytest.fail("isal is not installed: pip install isal", pytrace=False)
        monkeypatch.setattr(inflate, "module", inflate.isal)
    else:
        monkeypatch.setattr(inflate, "module", zlib)
    return str(request.param)


# --------------------------------------------------------------------------- blob codec

def _checkpoint(in_: int, out: int, bits: int, fill: int) -> gi.Checkpoint:
    return gi.Checkpoint(in_, out, bits, bytes([fill]) * gi.WINDOW_SIZE)


def test_blob_layout_is_12_plus_n_times_32785() -> None:
    cps = [_checkpoint(23, 0, 0, 0), _checkpoint(70000, 200000, 5, 0xAB), _checkpoint(140001, 400000, 7, 0xCD)]
    blob = gi.encode_checkpoints(1 << 22, cps)
    assert gi.CHECKPOINT_SIZE == 32785
    assert len(blob) == 12 + 3 * 32785
    assert struct.unpack_from("<iq", blob, 0) == (3, 1 << 22)
    for i, cp in enumerate(cps):
        at = 12 + i * 32785
        assert struct.unpack_from("<qqB", blob, at) == (cp.in_, cp.out, cp.bits)
        assert blob[at + 17:at + 17 + 32768] == cp.window
    table = gi.decode_checkpoints(blob)
    assert not table.legacy and table.span_size == 1 << 22
    assert table.checkpoints() == cps


def test_legacy_v1_blob_synthesises_checkpoint_0() -> None:
    cps = [_checkpoint(10, 0, 0, 0), _checkpoint(70000, 200000, 3, 0x11)]
    v2 = gi.encode_checkpoints(4096, cps)
    v1 = v2[:12] + v2[12 + 32785:]
    assert len(v1) == 12 + (2 - 1) * 32785
    table = gi.decode_checkpoints(v1)
    assert table.legacy
    assert table.checkpoint(0) == gi.Checkpoint(10, 0, 0, bytes(32768))
    assert table.checkpoint(1) == cps[1]


def test_legacy_v1_blob_reads_a_real_layer(corpus: list[Layer], indexes: dict[str, gi.GzipIndex]) -> None:
    """gzip from a pipe writes a 10-byte header, which is what v1 readers assume for checkpoint 0."""
    layer = next(x for x in corpus if x.name == "gzip6")
    index = indexes["gzip6"]
    assert index.checkpoints[0].in_ == 10
    v2 = index.blob()
    v1 = v2[:12] + v2[12 + gi.CHECKPOINT_SIZE:]
    spans = gi.GzipSpanIndex(gi.decode_checkpoints(v1), len(layer.blob), index.uncompressed_size)
    for i in (0, 1, spans.max_span_id):
        span = spans.span(i)
        assert gi.inflate_span(layer.blob[span.compressed_start:span.compressed_end], span) == \
            layer.tar[span.uncompressed_start:span.uncompressed_end]


@pytest.mark.parametrize("blob, message", [
    (b"", "shorter than"),
    (b"\x01\x00\x00\x00" + b"\x00" * 7, "shorter than"),
    (struct.pack("<iq", 0, 4096), "at least 1"),
    (struct.pack("<iq", -5, 4096), "at least 1"),
    (struct.pack("<iq", 1, -1) + bytes(32785), "negative span size"),
    (struct.pack("<iq", 2, 4096) + bytes(32785 + 1), "fits neither"),
    (struct.pack("<iq", 0x7FFFFFFF, 4096) + bytes(32785), "fits neither"),
    (struct.pack("<iq", 1, 4096) + struct.pack("<qqB", -1, 0, 0) + bytes(32768), "negative"),
    (struct.pack("<iq", 1, 4096) + struct.pack("<qqB", 10, 0, 8) + bytes(32768), "bits=8"),
    (struct.pack("<iq", 2, 4096) + (struct.pack("<qqB", 500, 9, 0) + bytes(32768))
     + (struct.pack("<qqB", 400, 10, 0) + bytes(32768)), "backwards"),
])
def test_malformed_checkpoint_blobs(blob: bytes, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        gi.decode_checkpoints(blob)


# --------------------------------------------------------------------------- builder vs zran.c

@pytest.fixture(scope="session")
def zran(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Debian's zran.c example, compiled with a driver that prints each access point."""
    gcc = shutil.which("gcc")
    if gcc is None or not (ZRAN_DIR / "zran.c").exists():
        pytest.fail("the zran cross-check needs gcc and zlib1g-dev (its examples/zran.c)", pytrace=False)
    work = tmp_path_factory.mktemp("zran")
    (work / "driver.c").write_text(
        '#define main zran_example_main\n#include "zran.c"\n#undef main\n'
        "int main(int argc, char **argv) {\n"
        "  FILE *in = fopen(argv[1], \"rb\");\n"
        "  struct deflate_index *index;\n"
        "  int n = deflate_index_build(in, atoll(argv[2]), &index);\n"
        "  if (n < 0) return 2;\n"
        "  struct point *p = index->list;\n"
        "  for (int i = 0; i < index->have; i++)\n"
        "    printf(\"%lld %lld %d %lu\\n\", (long long)p[i].in, (long long)p[i].out, p[i].bits,\n"
        "           crc32(0L, p[i].window, WINSIZE));\n"
        "  printf(\"length %lld\\n\", (long long)index->length);\n"
        "  return 0;\n}\n")
    exe = work / "zran-points"
    subprocess.run([gcc, "-O2", "-w", "-I", str(ZRAN_DIR), "-o", str(exe), str(work / "driver.c"), "-lz"], check=True)
    return exe


def test_checkpoints_match_zran_c(corpus: list[Layer], indexes: dict[str, gi.GzipIndex], zran: Path,
                                  tmp_path: Path) -> None:
    for layer in corpus:
        path = tmp_path / f"{layer.name}.gz"
        path.write_bytes(layer.blob)
        out = subprocess.run([str(zran), str(path), str(SPAN)], stdout=subprocess.PIPE, check=True, text=True).stdout
        *lines, length = out.splitlines()
        index = indexes[layer.name]
        # zran.c leaves its window buffer uninitialised, so windows of points before 32 KiB of
        # output differ from SOCI's zero-filled ones; compare those without the window.
        theirs = [line if int(line.split()[1]) >= gi.WINDOW_SIZE else line.rsplit(" ", 1)[0] for line in lines]
        ours = [f"{c.in_} {c.out} {c.bits}" + (f" {zlib.crc32(c.window)}" if c.out >= gi.WINDOW_SIZE else "")
                for c in index.checkpoints]
        assert ours == theirs, layer.name
        assert length == f"length {index.uncompressed_size}"


def test_every_bits_value_occurs_in_the_corpus(indexes: dict[str, gi.GzipIndex]) -> None:
    seen = {cp.bits for index in indexes.values() for cp in index.checkpoints}
    assert seen == set(range(8)), f"the corpus only has checkpoints with bits {sorted(seen)}: make it bigger"


def test_corpus_has_multi_member_layers(indexes: dict[str, gi.GzipIndex]) -> None:
    assert indexes["members-gzip"].members == 12
    assert indexes["members-pigz"].members == 7
    assert indexes["pigz"].members == 1  # pigz alone writes one member (sync-flushed blocks)


def test_builder_is_independent_of_chunking(corpus: list[Layer], indexes: dict[str, gi.GzipIndex]) -> None:
    layer = next(x for x in corpus if x.name == "members-gzip")
    rng = random.Random(5)
    for sizes in ([1 << 20], [4096], [1, 7, 511, 3, 65537, 2, 16384]):
        pieces: list[bytes] = []
        at = 0
        while at < len(layer.blob):
            size = sizes[len(pieces) % len(sizes)] + rng.randrange(2)
            pieces.append(layer.blob[at:at + size])
            at += size
        assert gi.build_gzip_index(pieces, SPAN) == indexes[layer.name]


def test_checkpoint_windows_are_the_preceding_output(corpus: list[Layer], indexes: dict[str, gi.GzipIndex]) -> None:
    for layer in corpus:
        for cp in indexes[layer.name].checkpoints:
            assert cp.window == layer.tar[max(cp.out - 32768, 0):cp.out].rjust(32768, b"\0")


def test_spans_are_at_least_span_size_apart(indexes: dict[str, gi.GzipIndex]) -> None:
    for index in indexes.values():
        outs = [cp.out for cp in index.checkpoints]
        assert outs[0] == 0
        assert all(b - a > SPAN for a, b in itertools.pairwise(outs))


# --------------------------------------------------------------------------- spans

def test_span_geometry(corpus: list[Layer], indexes: dict[str, gi.GzipIndex]) -> None:
    for layer in corpus:
        index = indexes[layer.name]
        spans = index.span_index()
        all_spans = [spans.span(i) for i in range(spans.max_span_id + 1)]
        for span, cp in zip(all_spans, index.checkpoints, strict=True):
            assert span.compressed_start == cp.in_ - (1 if cp.bits else 0)
            assert span.uncompressed_start == cp.out
        for a, b in itertools.pairwise(all_spans):
            assert a.compressed_end == b.checkpoint.in_  # type: ignore[union-attr]
            assert a.compressed_end - b.compressed_start == (1 if b.checkpoint.bits else 0)  # type: ignore[union-attr]
            assert a.uncompressed_end == b.uncompressed_start
        assert all_spans[-1].compressed_end == len(layer.blob)
        assert all_spans[-1].uncompressed_end == len(layer.tar)
        assert spans.spans_for(0, len(layer.tar)) == all_spans
        mid = all_spans[3]
        assert spans.spans_for(mid.uncompressed_start, mid.uncompressed_start + 1) == [mid]
        assert spans.spans_for(mid.uncompressed_start - 1, mid.uncompressed_start + 1) == all_spans[2:4]
        assert spans.spans_for(5, 5) == []
        with pytest.raises(FormatError):
            spans.spans_for(0, len(layer.tar) + 1)


def test_every_span_inflates_to_the_tar_bytes(corpus: list[Layer], indexes: dict[str, gi.GzipIndex],
                                              backend: str) -> None:
    for layer in corpus:
        index = indexes[layer.name]
        spans = index.span_index()
        for i in range(spans.max_span_id + 1):
            span = spans.span(i)
            compressed = layer.blob[span.compressed_start:span.compressed_end]
            gi.verify_span(compressed, index.span_digests[i])
            assert gi.inflate_span(compressed, span) == layer.tar[span.uncompressed_start:span.uncompressed_end], \
                (layer.name, i, span.checkpoint.bits)  # type: ignore[union-attr]


def test_span_digests_are_sha256_of_the_compressed_ranges(corpus: list[Layer],
                                                          indexes: dict[str, gi.GzipIndex]) -> None:
    for layer in corpus:
        index = indexes[layer.name]
        spans = index.span_index()
        assert len(index.span_digests) == spans.max_span_id + 1
        for i, digest in enumerate(index.span_digests):
            span = spans.span(i)
            assert digest == "sha256:" + hashlib.sha256(layer.blob[span.compressed_start:span.compressed_end]).hexdigest()


def test_a_flipped_byte_fails_the_span_digest(corpus: list[Layer], indexes: dict[str, gi.GzipIndex]) -> None:
    layer = corpus[0]
    index = indexes[layer.name]
    span = index.span_index().span(2)
    compressed = bytearray(layer.blob[span.compressed_start:span.compressed_end])
    gi.verify_span(compressed, index.span_digests[2])
    compressed[len(compressed) // 2] ^= 0x01
    with pytest.raises(FormatError, match="span digest mismatch"):
        gi.verify_span(compressed, index.span_digests[2])
    with pytest.raises(FormatError, match="not a sha256"):
        gi.verify_span(compressed, "md5:00")


def test_inflate_span_rejects_wrong_or_corrupt_input(corpus: list[Layer], indexes: dict[str, gi.GzipIndex],
                                                     backend: str) -> None:
    layer = next(x for x in corpus if x.name == "gzip6")
    spans = indexes["gzip6"].span_index()
    span = next(spans.span(i) for i in range(1, spans.max_span_id) if spans.span(i).checkpoint.bits)  # type: ignore[union-attr]
    good = layer.blob[span.compressed_start:span.compressed_end]
    with pytest.raises(FormatError, match="compressed bytes"):
        gi.inflate_span(good[:-1], span)
    garbage = bytes(random.Random(1).randbytes(len(good)))
    with pytest.raises(FormatError, match=f"span {span.id}"):
        gi.inflate_span(garbage, span)
    last = spans.span(spans.max_span_id)
    cut = layer.blob[last.compressed_start:last.compressed_end]
    short = gi.Span(last.id, last.compressed_start, last.compressed_end - 5000, last.uncompressed_start,
                    last.uncompressed_end, last.checkpoint)
    with pytest.raises(FormatError, match="inflated to"):
        gi.inflate_span(cut[:-5000], short)


def test_preface_blocks_are_empty_deflate_blocks_ending_bits_before_a_byte_boundary() -> None:
    final_empty = 0b011  # BFINAL=1, BTYPE=01 (fixed), end-of-block: 10 bits
    modules = [zlib] + ([inflate.isal] if inflate.isal is not None else [])
    assert gi.restart._EMPTY_FIXED[1] == 10 and gi.restart._EMPTY_DYNAMIC[1] == 93
    for bits in range(1, 8):
        value, nbits = gi.restart._PREFACES[bits]
        assert (nbits + bits) % 8 == 0
        assert len(gi.preface(bits, 0xFF)) == (nbits + bits) // 8
        assert gi.preface(bits, 0xFF)[-1] >> (8 - bits) == (1 << bits) - 1
        stream = (value | (final_empty << nbits)).to_bytes((nbits + 10 + 7) // 8, "little")
        for mod in modules:
            assert mod.decompress(stream, -15) == b""


# --------------------------------------------------------------------------- builder errors and memory

@pytest.mark.parametrize("blob, message", [
    (b"", "empty"),
    (b"not gzip at all, not even close", "not a valid gzip stream"),
    (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03", "truncated"),
])
def test_builder_rejects_bad_streams(blob: bytes, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        gi.build_gzip_index([blob], SPAN)


def test_builder_rejects_truncated_and_trailing_garbage(corpus: list[Layer]) -> None:
    blob = corpus[0].blob
    with pytest.raises(FormatError, match="truncated"):
        gi.build_gzip_index([blob[:len(blob) // 2]], SPAN)
    with pytest.raises(FormatError, match="not a valid gzip stream"):
        gi.build_gzip_index([blob + b"\0" * 100], SPAN)


def _synthetic_blocks(seed: int) -> list[bytes]:
    """Four 1 MiB blocks, part text-like and part random, made before memory is traced."""
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randrange(3, 12)) for _ in range(5000)]
    blocks = []
    for _ in range(4):
        text = b" ".join(rng.choices(words, k=100_000))[:700 << 10]
        blocks.append(text + rng.randbytes((1 << 20) - len(text)))
    return blocks


def test_builder_memory_is_bounded() -> None:
    """64 MiB through the builder: peak traced memory stays a few MiB above the checkpoints' size."""
    seen = 0

    def sink(piece: bytes) -> None:
        nonlocal seen
        seen += len(piece)

    blocks = _synthetic_blocks(3)
    builder = gi.GzipIndexBuilder(1 << 22, sink)
    tracemalloc.start()
    try:
        fed = 0
        compressor = zlib.compressobj(1, zlib.DEFLATED, 31)
        for i in range(64):
            for chunk in (compressor.compress(blocks[i % 4]), compressor.flush() if i == 63 else b""):
                builder.feed(chunk)
                fed += len(chunk)
        index = builder.finish()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == index.uncompressed_size == 64 << 20
    assert fed == index.compressed_size
    checkpoints = len(index.checkpoints) * gi.CHECKPOINT_SIZE
    assert peak < checkpoints + (6 << 20), (peak, checkpoints)
