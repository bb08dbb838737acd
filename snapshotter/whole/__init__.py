"""Layers lazysnap pulls whole itself.

A layer with no usable index (no eStargz TOC, no SOCI zTOC, an unsupported compression)
cannot be served lazily. Rather than letting containerd's unpacker download it, and every
layer above it, lazysnap fetches such a layer itself and unpacks it into a snapshot
directory, as containerd's applier would (issue 13). This package holds that path;
`apply.py` is the unpacking step, with `paths.py` (names and paths inside the layer) and
`headers.py` (tar headers read as containerd reads them) under it.
"""
