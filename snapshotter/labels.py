"""The snapshot labels of containerd's remote-snapshot handshake, in both families.

containerd passes a Prepare only the labels named `containerd.io/snapshot.ref` or
starting with `containerd.io/snapshot/`. Which image and layer a Prepare is for comes
in one of two families: CRI's `cri.*` (Kubernetes; `lazysnap rpull` sends these too)
and `remote/stargz.*` (`ctr-remote image rpull`). Layer descriptor annotations under
the prefix (e.g. the eStargz TOC digest) ride along.
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "containerd.io/snapshot/"
TARGET = "containerd.io/snapshot.ref"
"""The chain id containerd wants the layer committed as; its presence asks for a remote snapshot."""

CRI_IMAGE_REF = PREFIX + "cri.image-ref"
CRI_MANIFEST_DIGEST = PREFIX + "cri.manifest-digest"
CRI_LAYER_DIGEST = PREFIX + "cri.layer-digest"
CRI_IMAGE_LAYERS = PREFIX + "cri.image-layers"

STARGZ_REFERENCE = PREFIX + "remote/stargz.reference"
STARGZ_DIGEST = PREFIX + "remote/stargz.digest"
STARGZ_LAYERS = PREFIX + "remote/stargz.layers"
STARGZ_PREFETCH = PREFIX + "remote/stargz.prefetch"
STARGZ_SKIP_VERIFY = PREFIX + "remote/stargz.skipverify"

TOC_DIGEST = PREFIX + "stargz/toc.digest"
"""eStargz layer annotation: sha256 of the TOC JSON, which makes the layer verifiable."""

REMOTE = PREFIX + "remote"
"""Set on snapshots that lazysnap serves lazily (the same label stargz-snapshotter sets)."""

SOCI_INDEX_DIGEST = PREFIX + "remote/soci.index.digest"


@dataclass(frozen=True)
class LayerRequest:
    """What a Prepare with a target says about the layer it wants."""

    target: str
    image_ref: str
    layer_digest: str
    image_layers: tuple[str, ...]
    """This layer and the ones above it, bottom-up (possibly cut short by containerd's 4 KiB label limit)."""
    manifest_digest: str = ""
    toc_digest: str = ""
    skip_verify: bool = False
    soci_index_digest: str = ""

    @classmethod
    def from_labels(cls, labels: dict[str, str]) -> LayerRequest | None:
        """None when the labels do not name a target, an image and a layer."""
        target = labels.get(TARGET, "")
        image_ref = labels.get(CRI_IMAGE_REF) or labels.get(STARGZ_REFERENCE, "")
        layer = labels.get(CRI_LAYER_DIGEST) or labels.get(STARGZ_DIGEST, "")
        if not (target and image_ref and layer):
            return None
        layers = labels.get(CRI_IMAGE_LAYERS) or labels.get(STARGZ_LAYERS, "")
        return cls(
            target=target,
            image_ref=image_ref,
            layer_digest=layer,
            image_layers=tuple(d for d in layers.split(",") if d),
            manifest_digest=labels.get(CRI_MANIFEST_DIGEST, ""),
            toc_digest=labels.get(TOC_DIGEST, ""),
            skip_verify=STARGZ_SKIP_VERIFY in labels,
            soci_index_digest=labels.get(SOCI_INDEX_DIGEST, ""),
        )


def cri_labels(target: str, image_ref: str, manifest_digest: str, layer_digest: str, above: list[str]) -> dict[str, str]:
    """The labels CRI sends for a layer; `above` is this layer and those above it, bottom-up."""
    layers = ""
    for digest in above:
        candidate = f"{layers},{digest}" if layers else digest
        if len(CRI_IMAGE_LAYERS) + len(candidate) > 4000:
            break
        layers = candidate
    return {
        TARGET: target,
        CRI_IMAGE_REF: image_ref,
        CRI_MANIFEST_DIGEST: manifest_digest,
        CRI_LAYER_DIGEST: layer_digest,
        CRI_IMAGE_LAYERS: layers,
    }
