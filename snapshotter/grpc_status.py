"""lazysnap's errors as gRPC status codes and back: the one table, for the server and its clients.

The server (`service.py`) answers each error with the code containerd's errdefs expect of
its class (`status_code`); lazysnap's clients, of containerd (`containerd/client.py`) and
of the daemon (`status.py`), turn the code they get back into that class
(`error_from_status`), so that the code above them catches lazysnap's errors, never gRPC's.
"""

from __future__ import annotations

import grpc

from .errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    SnapshotterError,
    Unavailable,
)

STATUS_CODES: dict[type[SnapshotterError], grpc.StatusCode] = {
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
"""The errdefs classes. Any other lazysnap error is UNKNOWN: the base class, whose message says it all."""

CLASSES: dict[grpc.StatusCode, type[SnapshotterError]] = {code: cls for cls, code in STATUS_CODES.items()}
"""The table read the other way, for clients."""

UNREACHABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNIMPLEMENTED})
"""No server answered, or not one that serves the API called: `Unavailable`, on the client side only
(the server never answers it: containerd being away is not the daemon being away)."""


def status_code(error: SnapshotterError) -> grpc.StatusCode:
    """The server's side: the code of `error`'s class (or of the nearest base class in the table)."""
    for cls in type(error).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return grpc.StatusCode.UNKNOWN


def error_from_status(code: grpc.StatusCode, message: str) -> SnapshotterError:
    """The clients' side, the reverse of `status_code`: the error a server answered `code` for.

    The message is kept as it is; the code's name is in the error's `status`.
    """
    cls = CLASSES.get(code) or (Unavailable if code in UNREACHABLE else SnapshotterError)
    return cls(message, status=code.name)
