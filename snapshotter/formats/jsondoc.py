"""JSON documents from untrusted bytes (a TOC, a SOCI index or prefetch artifact, a
profile): the one place that turns each way they can be malformed into a FormatError.

`json.loads` raises RecursionError, not ValueError, on deeply nested input, so every
reader must catch both; this module is where that is done.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import FormatError


def load_object(raw: bytes, what: str, max_size: int | None = None) -> dict[str, Any]:
    """The JSON object in `raw`; `what` names the document in the error."""
    if max_size is not None and len(raw) > max_size:
        raise FormatError(f"{what} is {len(raw)} bytes, more than the {max_size} allowed")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise FormatError(f"{what} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{what} is a JSON {type(doc).__name__}, want an object")
    return doc
