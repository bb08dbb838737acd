"""A gRPC server on a unix socket in a test's directory, for the API tests that need no daemon."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc


@contextmanager
def serving(tmp_path: Path, add: Callable[[grpc.Server], None], workers: int = 2) -> Iterator[Path]:
    """Serve what `add` registers on `<tmp_path>/ls.sock`; yields the socket's path."""
    address = tmp_path / "ls.sock"
    server = grpc.server(ThreadPoolExecutor(max_workers=workers))
    add(server)
    server.add_insecure_port(f"unix:{address}")
    server.start()
    try:
        yield address
    finally:
        server.stop(grace=None).wait()
