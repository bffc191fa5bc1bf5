"""The one seam to ``pyarrow.fs``: URIs, ranged reads into caller buffers, atomic writes, listing.

Nothing here knows about tensors. Paths stay strings because ``s3://bucket/x`` is not a ``Path``.
"""

from elastic_ckpt.storage.fs import Storage, join_uri, resolve

__all__ = ["Storage", "join_uri", "resolve"]
