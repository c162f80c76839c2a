"""Errors raised by the store, each carrying the errno a POSIX caller expects.

Adapters translate them: the FUSE frontend replies with ``errno``, the
graphdriver server sends ``str(error)`` back to Docker as ``{"Err": ...}``.
"""

import errno as _errno


class StoreError(Exception):
    errno = _errno.EIO


class NotPermitted(StoreError):
    errno = _errno.EPERM


class TooBig(StoreError):
    errno = _errno.E2BIG


class NotFound(StoreError):
    errno = _errno.ENOENT


class Exists(StoreError):
    errno = _errno.EEXIST


class NotEmpty(StoreError):
    errno = _errno.ENOTEMPTY


class ReadOnly(StoreError):
    errno = _errno.EROFS


class NotDir(StoreError):
    errno = _errno.ENOTDIR


class IsDir(StoreError):
    errno = _errno.EISDIR


class NoSpace(StoreError):
    errno = _errno.ENOSPC


class NoData(StoreError):
    errno = _errno.ENODATA


class Invalid(StoreError):
    errno = _errno.EINVAL


class PastData(StoreError):
    """No data (SEEK_DATA) or no hole (SEEK_HOLE) at or after the offset: the offset is past the end."""

    errno = _errno.ENXIO


class Busy(StoreError):
    errno = _errno.EBUSY


class NameTooLong(StoreError):
    errno = _errno.ENAMETOOLONG


class LayerNotFound(NotFound):
    pass


class LayerExists(Exists):
    pass


class LayerHasChildren(Busy):
    pass


class DeviceBusy(StoreError):
    """The device is locked by another process (the daemon or fsck)."""

    errno = _errno.EBUSY


class FormatError(StoreError):
    """The device holds no lcfs store, or one this version cannot read."""

    errno = _errno.EINVAL


class BadArchive(Invalid):
    """A layer tar is malformed or names a path outside the layer."""
