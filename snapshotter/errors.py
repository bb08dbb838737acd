"""The errors lazysnap raises, one class per containerd errdefs class.

Code below the service raises these; `grpc_status.py` maps them to gRPC status codes in
one table, so containerd's errdefs see exactly the class they expect, and maps the codes
back for lazysnap's own clients (of containerd, and of the daemon).
"""


class SnapshotterError(Exception):
    """Base of every error lazysnap reports to a caller."""

    def __init__(self, message: str = "", *, status: str = "") -> None:
        super().__init__(message)
        self.status = status
        """The name of the gRPC status code a server answered with, when the error is a server's
        answer (`grpc_status.error_from_status`); empty for an error raised here."""


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


class Unavailable(SnapshotterError):
    """No server answered: nothing listens on the socket, or what listens does not serve the API called
    (a client's error: the daemon or containerd is not there)."""


class ConfigError(SnapshotterError):
    """The configuration file or flags are invalid."""


class AlreadyRunning(SnapshotterError):
    """Another `lazysnap serve` owns this root or this socket."""
