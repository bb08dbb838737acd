"""One `lazysnap serve` per root: the flock on `<root>/serve.pid`, and never unlinking a live socket."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapshotter.errors import AlreadyRunning
from snapshotter.root_lock import LOCK_FILE, claim

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def paths(short_tmp: Path) -> Iterator[tuple[Path, Path]]:
    """(root, socket address), the address short enough for a unix socket."""
    fds_before = set(os.listdir("/proc/self/fd"))
    yield short_tmp / "root", short_tmp / "ls.sock"
    leaked = set(os.listdir("/proc/self/fd")) - fds_before
    assert not {fd for fd in leaked if os.readlink(f"/proc/self/fd/{fd}").endswith(LOCK_FILE)}, \
        "a failed claim must close its lock file"


def test_first_claim_writes_our_pid_and_a_second_is_refused(paths: tuple[Path, Path]) -> None:
    root, address = paths
    fd = claim(root, address)
    try:
        assert (root / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        assert (root.stat().st_mode & 0o777) == 0o700
        with pytest.raises(AlreadyRunning, match=rf"\(pid {os.getpid()}\) is already running with root"):
            claim(root, address)
        assert (root / LOCK_FILE).read_text() == f"{os.getpid()}\n", "a refused claim must not touch the pid file"
    finally:
        os.close(fd)


def test_released_claim_can_be_taken_again(paths: tuple[Path, Path]) -> None:
    root, address = paths
    os.close(claim(root, address))
    (root / LOCK_FILE).write_text("999999\n")  # a stale pid from a daemon that was SIGKILLed
    fd = claim(root, address)
    try:
        assert (root / LOCK_FILE).read_text() == f"{os.getpid()}\n", "the pid file is rewritten, not appended to"
    finally:
        os.close(fd)


def test_live_socket_in_this_process_is_not_taken_over(paths: tuple[Path, Path]) -> None:
    root, address = paths
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(address))
        listener.listen(1)
        with pytest.raises(AlreadyRunning, match=rf"\(pid {os.getpid()}\) is already serving {address}"):
            claim(root, address)
        assert address.is_socket(), "a live socket must never be unlinked"
        assert not (root / LOCK_FILE).read_text(), "no pid is written when the claim fails"
    # The lock was released with the failure: once the socket is dead, the claim succeeds.
    fd = claim(root, address)
    os.close(fd)


def test_live_socket_of_another_process_names_its_pid(paths: tuple[Path, Path]) -> None:
    root, address = paths
    code = ("import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
            f"s.bind({str(address)!r}); s.listen(4)\n"
            "print('ready', flush=True)\n"
            "sys.stdin.read()\n")
    listener = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert listener.stdout is not None and listener.stdout.readline() == b"ready\n"
        with pytest.raises(AlreadyRunning, match=rf"another process \(pid {listener.pid}\) is already serving"):
            claim(root, address)
        assert address.is_socket()
    finally:
        listener.communicate(timeout=10)  # closing its stdin ends it
    # It died without unlinking its socket: that file is stale now, and the claim removes it.
    assert address.is_socket()
    fd = claim(root, address)
    try:
        assert not address.exists()
    finally:
        os.close(fd)


def test_stale_socket_file_is_removed(paths: tuple[Path, Path]) -> None:
    root, address = paths
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(address))  # bound, never listening, then closed: nobody accepts there
    assert address.is_socket()
    fd = claim(root, address)
    try:
        assert not address.exists(), "a dead socket file must be removed so serve can bind"
        assert (root / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    finally:
        os.close(fd)


def test_missing_socket_and_root_are_fine(paths: tuple[Path, Path]) -> None:
    root, address = paths
    assert not root.exists() and not address.exists()
    fd = claim(root / "deeper", address)
    os.close(fd)
    assert (root / "deeper" / LOCK_FILE).is_file()


def test_claim_from_another_process_is_refused_with_our_pid(paths: tuple[Path, Path]) -> None:
    root, address = paths
    code = ("import sys\nfrom pathlib import Path\n"
            "from snapshotter.errors import AlreadyRunning\nfrom snapshotter.root_lock import claim\n"
            "try:\n"
            f"    claim(Path({str(root)!r}), Path({str(address)!r}))\n"
            "except AlreadyRunning as e:\n"
            "    print(e); sys.exit(3)\n"
            "print('claimed'); sys.exit(0)\n")
    fd = claim(root, address)
    try:
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30)
        assert done.returncode == 3, done.stdout + done.stderr
        assert f"pid {os.getpid()}" in done.stdout
    finally:
        os.close(fd)
    # Once we let go, the other process gets it (and writes its own pid).
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout == "claimed\n", done.stdout + done.stderr
    pid_in_file = int((root / LOCK_FILE).read_text())
    assert pid_in_file != os.getpid()
