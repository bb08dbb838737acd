"""Byte counts as people write and read them."""

from __future__ import annotations

import re

_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(i?)(b?)\s*", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(text: str) -> int:
    """Bytes from `4MiB`, `10MB`, `64KiB`, `4M` or `65536`.

    `KiB`/`MiB`/`GiB` are powers of 1024 and `KB`/`MB`/`GB` powers of 1000; a bare
    `K`/`M`/`G` is 1024-based, as docker and containerd read it.
    """
    m = _SIZE.fullmatch(text)
    if m is None:
        raise ValueError(f"invalid size {text!r}: want e.g. 4MiB, 10MB or a number of bytes")
    number, prefix, binary, b = m.groups()
    power = _POWERS[prefix.lower()]
    if power == 0 and binary:
        raise ValueError(f"invalid size {text!r}: want e.g. 4MiB, 10MB or a number of bytes")
    base = 1000 if (b and not binary and power) else 1024
    value = float(number) * base ** power
    if value != int(value):
        raise ValueError(f"invalid size {text!r}: not a whole number of bytes")
    return int(value)


def human_size(n: int) -> str:
    """Bytes for people: 1.5 MiB."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)
