"""Layer index formats (eStargz TOCs, SOCI zTOCs and gzip checkpoints): bytes in, records out, no I/O.

Kept free of files and sockets so that every parser can be fed hostile bytes in a unit
test, and so the FUSE side can use them without pulling in the network stack.
"""
