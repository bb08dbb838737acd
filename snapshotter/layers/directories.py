"""Which files share a directory: what readahead predicts from when a start reads a package.

A first start reads a package's modules in the order its code imports them, not in the
layer's order (a directory walk, names sorted), so half of its misses go backward and no
streak of forward misses forms (`fetch/readahead.py`). The other files of a directory whose
files are being read are what the next reads are likely to be: a package's modules, the
`.pyc` files of one `__pycache__`.
"""

from __future__ import annotations

from collections.abc import Callable

from .tree import LayerTree, Node


class Directories:
    """Each file of a layer (by the key the layer's units name it by) and the directory holding it."""

    def __init__(self, tree: LayerTree, file_key: Callable[[Node], int | None]) -> None:
        """`file_key`: the key of a node's file (`Unit.file`), None for a node with no bytes to fetch."""
        self._directory_of: dict[int, int] = {}
        self._files: dict[int, list[int]] = {}
        for node in tree.nodes.values():
            key = file_key(node)
            if key is None or key in self._directory_of:  # a hardlink: its first name's directory
                continue
            self._directory_of[key] = node.parent
            self._files.setdefault(node.parent, []).append(key)

    def of(self, file: int) -> int:
        """The inode of the directory holding the file `file`; -1 if no file has that key."""
        return self._directory_of.get(file, -1)

    def files(self, directory: int) -> list[int]:
        """The keys of the files in `directory`."""
        return self._files.get(directory, [])
