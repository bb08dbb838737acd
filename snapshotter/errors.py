"""The errors lazysnap raises, one class per containerd errdefs class.

Code below the service raises these; `service.py` maps them to gRPC status codes in
one table, so containerd's errdefs see exactly the class they expect.
"""


class SnapshotterError(Exception):
    """Base of every error lazysnap reports to a caller."""


class NotFound(SnapshotterError):
    """The named snapshot (or parent) does not exist."""


class AlreadyExists(SnapshotterError):
    """A snapshot with that key or name exists already."""


class FailedPrecondition(SnapshotterError):
    """The snapshot is in the wrong state for the call (e.g. has children, is not active)."""


class InvalidArgument(SnapshotterError):
    """The request itself is malformed (empty key, bad filter, oversize label)."""


class ResourceExhausted(SnapshotterError):
    """No room left: the disk under lazysnap's root is full (containerd's errdefs has no better class)."""


class ConfigError(SnapshotterError):
    """The configuration file or flags are invalid."""


class AlreadyRunning(SnapshotterError):
    """Another `lazysnap serve` owns this root or this socket."""
