"""The `lazysnap index` and `lazysnap ztoc` commands, run as a user runs them, against docker-registry 2.8."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


from snapshotter.formats import soci_index
from snapshotter.soci.local import LocalIndexes
from tests.harness.registry import Registry
from tests.unit.soci_images import Sample, pushed

SIZES = ["--span-size", "64KiB", "--min-layer-size", "64KiB"]


def lazysnap(*args: str | Path, store: Path, check: int = 0) -> subprocess.CompletedProcess[bytes]:
    done = subprocess.run([sys.executable, "-m", "snapshotter", *map(str, args), "--store", str(store),
                           "--certs-dir", str(store / "certs.d"), "--docker-config", str(store / "docker.json")],
                          capture_output=True, timeout=120)
    assert done.returncode == check, (done.stdout + done.stderr).decode(errors="replace")
    return done


def test_create_push_list_info_and_get_file(registry: Registry, image: Sample, tmp_path: Path) -> None:
    ref = pushed(registry, image, "cli/app")
    store = tmp_path / "soci"
    done = lazysnap("index", "create", ref, *SIZES, store=store)
    out, err = done.stdout.decode(), done.stderr.decode()
    table = out.split("\n\n")[0].splitlines()
    assert table[0].split() == ["LAYER", "SIZE", "ZTOC", "SPANS", "FILES", "SECONDS", "NOTE"]
    assert [line[:19] for line in table[1:]] == [layer.digest[:19] for layer in image.layers]
    assert "skipped: " in table[2] and "below the minimum layer size 64.0 KiB" in table[2]
    index_digest = LocalIndexes(store).index_for(image.manifest_digest)
    assert index_digest and f"index {index_digest} (SOCI v1, 2 of 3 layers" in out
    assert f"lazysnap index push {ref}" in out
    assert "indexing 2 layer(s)" in err and err.count(": streaming") == 2, "plain progress lines off a TTY"

    out = lazysnap("index", "push", ref, store=store).stdout.decode()
    assert f"pushed index {index_digest} (2 zTOCs" in out and "fallback tag sha256-" in out

    out = lazysnap("index", "list", ref, store=store).stdout.decode()
    assert f"{index_digest[:19]}  v1" in out and ref in out
    assert f"discovery finds {index_digest} (source v1, 2 zTOCs)" in out

    out = lazysnap("index", "info", index_digest, store=store).stdout.decode()
    head, rest = out.split("\n", 1)
    assert head == f"index {index_digest} (SOCI v1, from local)"
    doc = json.loads(rest.split("\n\n")[0])
    assert doc["config"]["mediaType"] == soci_index.INDEX_V1
    rows = rest.split("\n\n")[1].splitlines()
    assert rows[0].split()[:4] == ["LAYER", "ZTOC", "ZTOC", "SIZE"] and len(rows) == 3
    ztoc_digest = doc["layers"][1]["digest"]

    out = lazysnap("ztoc", "info", ztoc_digest, store=store).stdout.decode()
    assert "version:            0.9" in out and "span size:          65536 (64.0 KiB)" in out
    assert "first 10 of 122 entries:" in out and "srv/doc000.md" in out

    big = image.layers[0]
    done = lazysnap("ztoc", "get-file", ref, big.digest, "data/text.log", store=store)
    assert done.stdout == image.files[0]["data/text.log"]
    assert "data/text.log: 2428770 bytes to standard output; fetched " in done.stderr.decode()
    target = tmp_path / "out" / "random.bin"
    target.parent.mkdir()
    done = lazysnap("ztoc", "get-file", ref, big.digest[7:20], "/data/random.bin", "-o", target, store=store)
    assert target.read_bytes() == image.files[0]["data/random.bin"] and done.stdout == b""
    assert list(target.parent.iterdir()) == [target]

    done = lazysnap("ztoc", "get-file", ref, big.digest, "data/missing", "-o", tmp_path / "out" / "m", store=store,
                    check=1)
    assert b"lazysnap: no 'data/missing' in the layer" in done.stderr
    assert list(target.parent.iterdir()) == [target], "no partial output is left behind"


def test_convert(registry: Registry, image: Sample, tmp_path: Path) -> None:
    ref = pushed(registry, image, "cli/convert")
    new_ref = ref.replace(":v1", ":v1-soci")
    out = lazysnap("index", "convert", ref, new_ref, *SIZES, store=tmp_path / "soci").stdout.decode()
    assert f"{new_ref}: OCI image index sha256:" in out and "(linux/amd64)" in out
    assert f"{ref} ({image.manifest_digest}) is unchanged" in out
    out = lazysnap("index", "list", new_ref, store=tmp_path / "soci").stdout.decode()
    assert "(source v2, 2 zTOCs)" in out


def test_an_image_with_nothing_to_index_is_an_error_with_the_table(registry: Registry, image: Sample,
                                                                    tmp_path: Path) -> None:
    ref = pushed(registry, image, "cli/empty")
    done = lazysnap("index", "create", ref, "--min-layer-size", "1GiB", store=tmp_path / "soci", check=1)
    out = done.stdout.decode()
    assert out.count("skipped: ") == 3
    assert done.stderr.decode().strip().endswith(
        f"lazysnap: no layer of {ref} can be indexed, so there is no index (all 3 layers were skipped)")


def test_bad_sizes_and_missing_indexes(registry: Registry, image: Sample, tmp_path: Path) -> None:
    ref = pushed(registry, image, "cli/errors")
    done = lazysnap("index", "create", ref, "--span-size", "4 bananas", store=tmp_path / "soci", check=2)
    assert b"invalid size '4 bananas'" in done.stderr
    done = lazysnap("index", "push", ref, store=tmp_path / "soci", check=1)
    assert b"run `lazysnap index create" in done.stderr
    done = lazysnap("index", "info", "sha256:" + "1" * 64, store=tmp_path / "soci", check=1)
    assert b"is not in" in done.stderr
    out = lazysnap("index", "list", store=tmp_path / "soci").stdout.decode()
    assert out.strip() == f"no indexes in {tmp_path / 'soci'}"
