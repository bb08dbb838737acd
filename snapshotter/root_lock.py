"""One daemon per root: `lazysnap serve` claims its root and its socket before touching either.

Two daemons on one root would each mount, reconcile and delete the other's state, and
the second would unlink the first's socket, leaving it unreachable. The claim is an
exclusive `flock` on `<root>/serve.pid` (released by the kernel however the process
ends, so a SIGKILL leaves no stale lock) holding the owner's pid; a socket path that
still accepts connections belongs to a live daemon and is never unlinked.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from pathlib import Path

from .errors import AlreadyRunning

LOCK_FILE = "serve.pid"


def claim(root: Path, address: Path) -> int:
    """Claim `root` and `address` for this process; the lock's fd, to keep open while serving.

    Raises AlreadyRunning naming the other daemon's pid. A dead socket file is removed.
    """
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise AlreadyRunning(f"another lazysnap serve (pid {owner}) is already running with root {root}") from None
        peer = _socket_owner(address)
        if peer is not None:
            raise AlreadyRunning(f"another process (pid {peer}) is already serving {address}; "
                                 "not taking over a live socket")
        address.unlink(missing_ok=True)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _socket_owner(address: Path) -> int | str | None:
    """The pid of whoever accepts connections on `address` (or "unknown"); None if nobody does."""
    if not address.exists() and not address.is_symlink():
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        try:
            sock.connect(str(address))
        except (ConnectionRefusedError, FileNotFoundError):
            return None
        except OSError as e:
            if e.errno in (errno.ENOTSOCK, errno.ECONNREFUSED):
                return None
            return "unknown"
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            return struct.unpack("3i", creds)[0]
        except OSError:
            return "unknown"
