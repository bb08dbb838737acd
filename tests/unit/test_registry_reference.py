"""Image reference parsing and normalisation, as containerd and docker do it."""

from __future__ import annotations

import pytest

from snapshotter.registry.digest import validate
from snapshotter.registry.errors import InvalidReference
from snapshotter.registry.reference import Reference, parse

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(("text", "domain", "path", "tag", "digest"), [
    ("busybox", "docker.io", "library/busybox", "latest", None),
    ("busybox:1.36", "docker.io", "library/busybox", "1.36", None),
    ("library/busybox", "docker.io", "library/busybox", "latest", None),
    ("someone/app:v1", "docker.io", "someone/app", "v1", None),
    ("docker.io/busybox", "docker.io", "library/busybox", "latest", None),
    ("index.docker.io/library/busybox", "docker.io", "library/busybox", "latest", None),
    ("ghcr.io/org/team/app:1.0", "ghcr.io", "org/team/app", "1.0", None),
    ("localhost/app", "localhost", "app", "latest", None),
    ("localhost:5000/app:dev", "localhost:5000", "app", "dev", None),
    ("127.0.0.1:5000/a/b", "127.0.0.1:5000", "a/b", "latest", None),
    ("[::1]:5000/app", "[::1]:5000", "app", "latest", None),
    ("Registry.Example/app", "Registry.Example", "app", "latest", None),
    (f"busybox@{DIGEST}", "docker.io", "library/busybox", None, DIGEST),
    (f"quay.io/a/b:tag@{DIGEST}", "quay.io", "a/b", "tag", DIGEST),
    ("reg.io/a_b/c__d/e-f/g.h/i---j:x_Y.z-9", "reg.io", "a_b/c__d/e-f/g.h/i---j", "x_Y.z-9", None),
])
def test_parse_normalises(text: str, domain: str, path: str, tag: str | None, digest: str | None) -> None:
    ref = parse(text)
    assert (ref.domain, ref.path, ref.tag, ref.digest) == (domain, path, tag, digest)


def test_string_form_and_object() -> None:
    assert str(parse("busybox")) == "docker.io/library/busybox:latest"
    pinned = parse(f"quay.io/a/b:tag@{DIGEST}")
    assert str(pinned) == f"quay.io/a/b:tag@{DIGEST}"
    assert pinned.object == DIGEST, "a digest wins over the tag when asking for the manifest"
    assert parse("a/b:t").object == "t"
    assert parse("a/b:t").name == "docker.io/a/b"
    assert parse("a/b").with_digest(DIGEST) == Reference("docker.io", "a/b", "latest", DIGEST)


@pytest.mark.parametrize(("text", "why"), [
    ("", "empty"),
    ("Busybox", "lowercase"),
    ("docker.io/Library/busybox", "lowercase"),
    ("busy box", "whitespace"),
    (" busybox", "whitespace"),
    ("busybox:", "bad tag"),
    ("busybox:-x", "bad tag"),
    ("busybox:" + "t" * 129, "bad tag"),
    ("busybox@sha256:abc", "64 lowercase hex"),
    ("busybox@md5:" + "a" * 32, "unsupported digest algorithm"),
    ("busybox@sha256:" + "AB" * 32, "64 lowercase hex"),
    ("reg.io/", "no repository name"),
    ("reg.io//a", "bad repository name component"),
    ("a/-b", "bad repository name component"),
    ("a/b_", "bad repository name component"),
    ("a/b..c", "bad repository name component"),
    ("-bad.io/a", "bad registry host"),
    ("reg.io:port/a", "bad registry host"),
    ("a" * 64, "image id"),
    ("reg.io/" + "a" * 250, "longer than 255"),
])
def test_garbage_is_invalid_reference(text: str, why: str) -> None:
    with pytest.raises(InvalidReference, match=why):
        parse(text)


def test_invalid_reference_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        parse("UPPER")


def test_digest_validation() -> None:
    assert validate(DIGEST) == DIGEST
    assert validate("sha512:" + "0" * 128).startswith("sha512:")
    for bad in ("sha256", "sha256:", ":" + "a" * 64, "sha256:" + "a" * 63, "SHA256:" + "a" * 64):
        with pytest.raises(InvalidReference):
            validate(bad)
