from snapshotter import labels as L

REF = "127.0.0.1:5000/app:1"


def test_cri_family() -> None:
    req = L.LayerRequest.from_labels({
        L.TARGET: "sha256:chain", L.CRI_IMAGE_REF: REF, L.CRI_LAYER_DIGEST: "sha256:l1",
        L.CRI_IMAGE_LAYERS: "sha256:l1,sha256:l2", L.CRI_MANIFEST_DIGEST: "sha256:m",
        L.TOC_DIGEST: "sha256:toc",
    })
    assert req == L.LayerRequest("sha256:chain", REF, "sha256:l1", ("sha256:l1", "sha256:l2"), "sha256:m", "sha256:toc")


def test_ctr_remote_family() -> None:
    req = L.LayerRequest.from_labels({
        L.TARGET: "sha256:chain", L.STARGZ_REFERENCE: REF, L.STARGZ_DIGEST: "sha256:l1",
        L.STARGZ_LAYERS: "sha256:l1", L.STARGZ_PREFETCH: "10485760", L.STARGZ_SKIP_VERIFY: "true",
    })
    assert req is not None and (req.image_ref, req.layer_digest, req.image_layers, req.skip_verify) == (
        REF, "sha256:l1", ("sha256:l1",), True)


def test_incomplete_labels_are_not_a_remote_request() -> None:
    assert L.LayerRequest.from_labels({L.TARGET: "sha256:chain"}) is None
    assert L.LayerRequest.from_labels({L.CRI_IMAGE_REF: REF, L.CRI_LAYER_DIGEST: "sha256:l"}) is None


def test_cri_labels_round_trip_and_respect_the_size_limit() -> None:
    above = [f"sha256:{i:064x}" for i in range(100)]
    labels = L.cri_labels("sha256:chain", REF, "sha256:m", above[0], above)
    assert all(len(k) + len(v) <= 4096 for k, v in labels.items())
    req = L.LayerRequest.from_labels(labels)
    assert req is not None and req.image_layers == tuple(above[: len(req.image_layers)])
    assert 10 < len(req.image_layers) < 100
