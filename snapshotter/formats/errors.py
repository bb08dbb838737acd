"""The one error every format parser raises."""


class FormatError(ValueError):
    """The bytes are not a valid layer index, or do not match what the index promises.

    Callers treat it as "this layer cannot be served lazily" while mounting, and as EIO
    while reading; it never means "retry the same bytes".
    """
