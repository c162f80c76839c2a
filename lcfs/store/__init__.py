"""The on-device layer store. See ``lcfs.store.format`` for the layout."""

from . import errors
from .format import BLOCK_SIZE, ROOT_INO
from .namespace import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
    XATTR_CREATE,
    XATTR_REPLACE,
    Attr,
)
from .store import StatFs, Store

__all__ = [
    "BLOCK_SIZE",
    "RENAME_EXCHANGE",
    "RENAME_NOREPLACE",
    "RENAME_WHITEOUT",
    "ROOT_INO",
    "XATTR_CREATE",
    "XATTR_REPLACE",
    "Attr",
    "StatFs",
    "Store",
    "errors",
]
