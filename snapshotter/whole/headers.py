"""Tar headers read as Go's `archive/tar` reads them for containerd, and what an entry takes from them.

Python's tarfile parses the headers, but left alone it would not do what containerd does: it
reads a special header of any size into memory, applies PAX global headers to every later
member, does not tell a clean end of the archive from a truncated one, and keeps times only as
floats, which lose the nanoseconds. `Reader` and `Header` close those gaps; `member_ids`,
`member_times` and `member_xattrs` read and check a member's owner, times and xattrs.

- PAX global headers are ignored, as containerd ignores them. A PAX or GNU long-name header
  over 1 MiB is refused, as Go's `archive/tar` refuses it (`maxSpecialFileSize`).
- The header that stopped the reader is recorded, so the caller can tell the end-of-archive
  marker from a stream that ends without it, or inside a header.
- Times have ns precision from PAX records, and are bounded as containerd bounds them
  (`boundTime`, `latestTime`).
"""

from __future__ import annotations

import re
import tarfile

from .errors import ApplyError

MAX_META_SIZE = 1 << 20
"""The largest PAX or GNU long-name header accepted (Go's archive/tar maxSpecialFileSize)."""
PAX_XATTR = "SCHILY.xattr."

_MAX_NS = (1 << 63) - 1
_NO_ID = 0xFFFFFFFF  # (uid_t)-1: "leave unchanged" to chown, never a real owner
_META_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
               tarfile.GNUTYPE_LONGLINK)
_PAX_TIME = re.compile(r"(-?)(\d+)(?:\.(\d*))?", re.ASCII)  # not any Unicode digit: Go's ParseInt refuses them


class Header(tarfile.TarInfo):
    """tarfile's header parsing, with the end of the archive recorded and Go's limits applied."""

    @classmethod
    def fromtarfile(cls, tarfile_: Reader) -> tarfile.TarInfo:  # type: ignore[override]
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.HeaderError as e:
            tarfile_.stopped_by = e  # the outermost call sets it last
            raise

    def _proc_member(self, tarfile_: Reader) -> tarfile.TarInfo:  # tarfile's documented hook
        if self.type in _META_TYPES and self.size > MAX_META_SIZE:
            raise ApplyError(f"a {self.type.decode('ascii', 'replace')!r} header of {self.size} bytes "
                             f"(at most {MAX_META_SIZE})")
        if self.type == tarfile.XGLTYPE:  # ignored, as containerd ignores it
            tarfile_.fileobj.read(self._block(self.size))  # type: ignore[attr-defined]  # private: typeshed omits it
            return self.fromtarfile(tarfile_)
        return super()._proc_member(tarfile_)  # type: ignore[misc]  # private: typeshed omits it


class Reader(tarfile.TarFile):
    """A tarfile reading `Header`s, and recording the header error that stopped it (None: not stopped)."""

    tarinfo = Header
    stopped_by: tarfile.HeaderError | None = None
    # tarfile's own state, which the applier uses in stream mode and typeshed does not declare:
    firstmember: tarfile.TarInfo | None
    members: list[tarfile.TarInfo]


def member_ids(m: tarfile.TarInfo) -> tuple[int, int]:
    """The member's (uid, gid), refused when chown could not set them."""
    for what, value in (("uid", m.uid), ("gid", m.gid)):
        if not 0 <= value < _NO_ID:
            raise ApplyError(f"member {m.name!r}: {what} {value} is out of range")
    return m.uid, m.gid


def member_xattrs(m: tarfile.TarInfo) -> list[tuple[str, bytes]]:
    """The member's PAX `SCHILY.xattr.*` records as (name, value bytes), as tarfile decoded them."""
    out = []
    for key, value in m.pax_headers.items():
        if key.startswith(PAX_XATTR):
            name = key[len(PAX_XATTR):]
            if not name or "\x00" in name:
                raise ApplyError(f"member {m.name!r}: invalid xattr name {name!r}")
            out.append((name, value.encode("utf-8", "surrogateescape")))
    return out


def member_times(m: tarfile.TarInfo) -> tuple[int, int]:
    """(atime, mtime) in ns as containerd sets them: atime = max(atime, mtime), both bounded."""
    text = m.pax_headers.get("mtime")
    mtime = _pax_ns(text, m) if text is not None else int(m.mtime) * 1_000_000_000
    text = m.pax_headers.get("atime")
    atime = max(_pax_ns(text, m), mtime) if text is not None else mtime
    return _bound(atime), _bound(mtime)


def _pax_ns(text: str, m: tarfile.TarInfo) -> int:
    """A PAX time (`1700000000.123456789`, `-1.5`) in ns, exactly; tarfile's float loses the ns."""
    match = _PAX_TIME.fullmatch(text)
    if match is None:
        raise ApplyError(f"member {m.name!r}: invalid PAX time {text!r}")
    ns = int(match[2]) * 1_000_000_000 + int((match[3] or "")[:9].ljust(9, "0"))
    return -ns if match[1] else ns


def _bound(ns: int) -> int:
    """containerd's boundTime: a time before the epoch or past 2^63-1 ns becomes the epoch."""
    return ns if 0 <= ns <= _MAX_NS else 0
