"""Snapshot metadata in sqlite: keys, parents, kinds, labels, usage.

This plays the part of containerd's `snapshots/storage` (a bolt DB) for lazysnap:
each RPC runs as one transaction, and a snapshot's numeric id never changes once
given, even when Commit renames it, so its directory `<root>/snapshots/<id>` can be
created before and deleted after the transaction that records it.

Ids come from AUTOINCREMENT and are never reused, so a directory left behind by a
crash can never be mistaken for a later snapshot's.
"""

from __future__ import annotations

import builtins  # `list` below a class's own list() method means the method to a type checker
import enum
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound


class Kind(enum.IntEnum):
    """Snapshot kinds, numbered as in containerd's snapshots.v1 `Kind` enum."""

    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3


@dataclass
class Snapshot:
    """One row of the store: what containerd sees as `Info`, plus our id and usage."""

    id: int
    key: str
    parent: str
    kind: Kind
    labels: dict[str, str]
    created_ns: int
    updated_ns: int
    size: int = 0
    inodes: int = 0
    layer_id: int | None = None
    """Set when the snapshot is a lazily served layer rather than a directory of ours."""
    parents: list[Parent] = field(default_factory=list)
    """All ancestors, nearest first (what the overlay lowerdir is made of)."""


@dataclass(frozen=True)
class Parent:
    id: int
    layer_id: int | None


@dataclass
class LayerRecord:
    """A layer served lazily: where it comes from and how its index was verified."""

    id: int
    digest: str
    image_ref: str
    format: str
    """A `LayerMode` value (kept a string here: a store written by a newer build may hold one this build
    does not know, and loading that layer then fails with a reason instead of reading the store)."""
    blob_size: int
    index_digest: str
    index_offset: int


SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    key        TEXT    NOT NULL UNIQUE,
    parent_id  INTEGER REFERENCES snapshots(id),
    kind       INTEGER NOT NULL,
    labels     TEXT    NOT NULL DEFAULT '{}',
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    size       INTEGER NOT NULL DEFAULT 0,
    inodes     INTEGER NOT NULL DEFAULT 0,
    layer_id   INTEGER REFERENCES layers(id)
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
CREATE TABLE IF NOT EXISTS layers (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    digest       TEXT    NOT NULL UNIQUE,
    image_ref    TEXT    NOT NULL,
    format       TEXT    NOT NULL,
    blob_size    INTEGER NOT NULL,
    index_digest TEXT    NOT NULL,
    index_offset INTEGER NOT NULL
);
"""

_LAYER_COLUMNS = "id, digest, image_ref, format, blob_size, index_digest, index_offset"

_SELECT = """
SELECT s.id, s.key, COALESCE(p.key, ''), s.kind, s.labels, s.created_ns, s.updated_ns, s.size, s.inodes, s.layer_id
FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id
"""


class Store:
    """The sqlite database at `<root>/metadata.db`, shared by the gRPC worker threads."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """One serialised read-write transaction; rolled back if the block raises."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield Transaction(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")


class Transaction:
    """The operations containerd's storage offers, inside one transaction."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def get(self, key: str) -> Snapshot:
        row = self._db.execute(_SELECT + "WHERE s.key = ?", (key,)).fetchone()
        if row is None:
            raise NotFound(f"snapshot {key!r} does not exist")
        return self._with_parents(_snapshot(row))

    def list(self) -> list[Snapshot]:
        return [_snapshot(row) for row in self._db.execute(_SELECT + "ORDER BY s.id")]

    def ids(self) -> set[int]:
        return {row[0] for row in self._db.execute("SELECT id FROM snapshots")}

    def create(self, key: str, parent: str, kind: Kind, labels: dict[str, str]) -> Snapshot:
        """Record a new active or view snapshot on top of a committed parent."""
        if not key:
            raise InvalidArgument("snapshot key must not be empty")
        if kind not in (Kind.ACTIVE, Kind.VIEW):
            raise InvalidArgument(f"cannot create a snapshot of kind {kind.name}")
        if self.exists(key):
            raise AlreadyExists(f"snapshot {key!r} already exists")
        parent_id = None
        if parent:
            try:
                p = self.get(parent)
            except NotFound:
                raise NotFound(f"parent snapshot {parent!r} does not exist") from None
            if p.kind != Kind.COMMITTED:
                raise InvalidArgument(f"parent {parent!r} is not a committed snapshot")
            parent_id = p.id
        now = time.time_ns()
        self._db.execute(
            "INSERT INTO snapshots (key, parent_id, kind, labels, created_ns, updated_ns) VALUES (?, ?, ?, ?, ?, ?)",
            (key, parent_id, int(kind), json.dumps(labels), now, now),
        )
        return self.get(key)

    def commit(self, key: str, name: str, labels: dict[str, str], size: int, inodes: int) -> Snapshot:
        """Turn active `key` into committed `name`, keeping its id (and so its directory)."""
        if not name:
            raise InvalidArgument("commit name must not be empty")
        active = self.get(key)
        if active.kind != Kind.ACTIVE:
            raise FailedPrecondition(f"snapshot {key!r} is not active (kind {active.kind.name})")
        if self.exists(name):
            raise AlreadyExists(f"snapshot {name!r} already exists")
        now = time.time_ns()
        self._db.execute(
            "UPDATE snapshots SET key = ?, kind = ?, labels = ?, created_ns = ?, updated_ns = ?, size = ?, inodes = ?"
            " WHERE id = ?",
            (name, int(Kind.COMMITTED), json.dumps(labels), now, now, size, inodes, active.id),
        )
        return self.get(name)

    def remove(self, key: str) -> Snapshot:
        """Delete a snapshot that nothing is built on."""
        snap = self.get(key)
        (children,) = self._db.execute("SELECT COUNT(*) FROM snapshots WHERE parent_id = ?", (snap.id,)).fetchone()
        if children:
            raise FailedPrecondition(f"cannot remove snapshot {key!r}: it has {children} child snapshot(s)")
        self._db.execute("DELETE FROM snapshots WHERE id = ?", (snap.id,))
        return snap

    def create_remote(self, name: str, parent: str, labels: dict[str, str], layer_id: int) -> Snapshot:
        """Record a committed snapshot whose contents are a lazily served layer."""
        if self.exists(name):
            raise AlreadyExists(f"snapshot {name!r} already exists")
        parent_id = self.get(parent).id if parent else None
        now = time.time_ns()
        self._db.execute(
            "INSERT INTO snapshots (key, parent_id, kind, labels, created_ns, updated_ns, layer_id)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (name, parent_id, int(Kind.COMMITTED), json.dumps(labels), now, now, layer_id),
        )
        return self.get(name)

    def put_layer(self, digest: str, image_ref: str, format: str, blob_size: int, index_digest: str,
                  index_offset: int) -> LayerRecord:
        """The layer record for `digest`, created if new (a layer is shared by every image that has it)."""
        self._db.execute(
            "INSERT OR IGNORE INTO layers (digest, image_ref, format, blob_size, index_digest, index_offset)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (digest, image_ref, format, blob_size, index_digest, index_offset),
        )
        row = self._db.execute(f"SELECT {_LAYER_COLUMNS} FROM layers WHERE digest = ?", (digest,)).fetchone()
        return LayerRecord(*row)

    def layers(self) -> builtins.list[LayerRecord]:
        return [LayerRecord(*row) for row in self._db.execute(f"SELECT {_LAYER_COLUMNS} FROM layers ORDER BY id")]

    def remove_unused_layers(self) -> builtins.list[LayerRecord]:
        """Forget layers no snapshot uses any more; the caller detaches and deletes their files."""
        unused = [LayerRecord(*row) for row in self._db.execute(
            f"SELECT {_LAYER_COLUMNS} FROM layers WHERE id NOT IN"
            " (SELECT layer_id FROM snapshots WHERE layer_id IS NOT NULL)"
        )]
        self._db.executemany("DELETE FROM layers WHERE id = ?", [(rec.id,) for rec in unused])
        return unused

    def remove_layer_if_unused(self, layer_id: int) -> bool:
        """Forget a layer that could not be served, unless a snapshot already uses it."""
        done = self._db.execute("DELETE FROM layers WHERE id = ? AND id NOT IN"
                                " (SELECT layer_id FROM snapshots WHERE layer_id IS NOT NULL)", (layer_id,))
        return done.rowcount > 0

    def set_labels(self, key: str, labels: dict[str, str]) -> Snapshot:
        self._db.execute(
            "UPDATE snapshots SET labels = ?, updated_ns = ? WHERE key = ?", (json.dumps(labels), time.time_ns(), key)
        )
        return self.get(key)

    def exists(self, key: str) -> bool:
        return self._db.execute("SELECT 1 FROM snapshots WHERE key = ?", (key,)).fetchone() is not None

    def _with_parents(self, snap: Snapshot) -> Snapshot:
        rows = self._db.execute(
            """
            WITH RECURSIVE chain(id, parent_id, depth) AS (
                SELECT id, parent_id, 0 FROM snapshots WHERE id = ?
                UNION ALL
                SELECT s.id, s.parent_id, chain.depth + 1 FROM snapshots s JOIN chain ON s.id = chain.parent_id
            )
            SELECT chain.id, s.layer_id FROM chain JOIN snapshots s ON s.id = chain.id
            WHERE depth > 0 ORDER BY depth
            """,
            (snap.id,),
        )
        snap.parents = [Parent(*row) for row in rows]
        return snap


def _snapshot(row: tuple) -> Snapshot:
    id_, key, parent, kind, labels, created, updated, size, inodes, layer_id = row
    return Snapshot(id_, key, parent, Kind(kind), json.loads(labels), created, updated, size, inodes, layer_id)
