"""A layer blob held in memory, counting the range reads a layer makes of it."""

from __future__ import annotations


class MemoryBlob:
    def __init__(self, data: bytes, digest: str = "sha256:" + "ab" * 32) -> None:
        self.data, self._digest, self.fetched_bytes, self.reads = bytearray(data), digest, 0, 0

    @property
    def digest(self) -> str:
        return self._digest

    @property
    def size(self) -> int:
        return len(self.data)

    async def read(self, start: int, end: int) -> bytes:
        self.reads += 1
        self.fetched_bytes += end - start
        return bytes(self.data[start:end])
