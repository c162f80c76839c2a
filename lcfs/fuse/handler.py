"""The decorator every pyfuse3 request handler of lcfs goes through."""

from __future__ import annotations

import errno
import functools
import logging
import time

import pyfuse3

from lcfs.store import errors

log = logging.getLogger(__name__)


def _brief(value: object) -> str:
    """Return a repr of a handler argument short enough for a log line."""
    if isinstance(value, (bytes, bytearray, memoryview)) and len(value) > 64:
        return f"<{len(value)} bytes>"
    return repr(value)


def fuse_handler(modifies: bool = False, operation: str | None = None):
    """Wrap a handler so that it raises only FUSEError and is counted in ``self.stats``.

    ``modifies`` marks handlers that change the store: they set the dirty
    flag that the commit task looks at, even when they fail halfway.
    ``operation`` names the FUSE request in the statistics when the
    method's own name differs.
    """

    def decorate(method):
        name = operation or method.__name__

        @functools.wraps(method)
        async def wrapper(self, *args):
            started = time.perf_counter()
            if modifies:
                self.dirty = True
            try:
                return await method(self, *args)
            except pyfuse3.FUSEError:
                raise
            except errors.StoreError as exc:
                raise pyfuse3.FUSEError(exc.errno) from None
            except Exception:
                shown = ", ".join(_brief(arg) for arg in args)
                log.exception("FUSE %s(%s) failed, returning EIO", name, shown)
                raise pyfuse3.FUSEError(errno.EIO) from None
            finally:
                self.stats.record(name, time.perf_counter() - started)

        return wrapper

    return decorate
