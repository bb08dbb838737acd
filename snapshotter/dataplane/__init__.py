"""The data plane: the small process that owns the FUSE mount and outlives `lazysnap serve`.

Running containers read their lazily served layers through a FUSE mount, and a FUSE
connection dies with the process that serves it; libfuse (so pyfuse3) cannot take over
an already-initialised `/dev/fuse` either. So the mount lives in a process of its own,
kept deliberately small: it serves reads of attached layers from the verified chunk
cache and the layer indexes saved on disk, and on a miss asks the control plane
(`lazysnap serve`: gRPC, registry, resolution, prefetch) for the unit over a local
socket, waiting up to `read_timeout` while the control plane restarts.

- `wire.py`: frames and a request/response channel over a unix socket (both sides).
- `server.py` and `__main__.py`: the data plane process (imports pyfuse3 through `fuse/`).
- `client.py`: the control plane's side: find, adopt or start data planes, attach layers.

This package's `__init__` imports nothing, so the control plane never loads pyfuse3.
"""

DIR = "dataplane"
"""Under the root: `<generation>/{pid,sock,fuse/}` for each data plane generation."""
MNT_DIR = "mnt"
"""Under the root: `<layer id>`, where each lazily served layer is mounted for overlays."""
