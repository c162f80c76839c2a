"""The decorator every pyfuse3 request handler of lcfs goes through.

A store error becomes its errno for the kernel. Most errnos are results the
caller expects (ENOENT from a lookup, EEXIST), so they are not logged. A
full device (ENOSPC) or a store error without a more specific errno (EIO)
is logged, at most once per ``DEVICE_LOG_INTERVAL`` seconds for each errno.
"""

from __future__ import annotations

import errno
import functools
import inspect
import logging
import time

import pyfuse3

from lcfs.store import errors

log = logging.getLogger(__name__)

# Seconds between two log lines about failed requests with the same errno.
DEVICE_LOG_INTERVAL = 10.0
# The errnos of store errors that a user must see in the log, with the level
# and the next step to take. The store's ENOSPC messages name their own next
# step, which depends on what is full.
DEVICE_ERRNOS = {
    errno.ENOSPC: (logging.WARNING, ""),
    errno.EIO: (
        logging.ERROR,
        "Stop the daemon and check the device with lcfs-fsck",
    ),
}
# Handler parameters that name a node.
_NODE_PARAMETERS = ("inode", "parent_inode", "parent_inode_old", "node")


class RateLimit:
    """A limit of one event per ``interval`` seconds that counts the events over it."""

    def __init__(self, interval: float):
        self.interval = interval
        self.suppressed = 0
        self._next_allowed = float("-inf")

    def allow(self) -> int | None:
        """Count an event, and return None if it is over the limit.

        An allowed event returns how many events were suppressed before it.
        """
        now = time.monotonic()
        if now < self._next_allowed:
            self.suppressed += 1
            return None
        self._next_allowed = now + self.interval
        suppressed, self.suppressed = self.suppressed, 0
        return suppressed


# One limit per errno, made at its first use.
_device_log_limits: dict[int, RateLimit] = {}


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
        parameters = list(inspect.signature(method).parameters)[1:]
        first = parameters[0] if parameters else None

        @functools.wraps(method)
        async def wrapper(self, *args):
            started = time.perf_counter()
            if modifies:
                self.dirty = True
            try:
                result = await method(self, *args)
                if modifies:
                    if self.store.group_is_large:
                        # Commit before the open group fills the metadata
                        # area (see Store.group_is_large).
                        self.commit()
                    else:
                        self.mark_changed_layers()
                return result
            except pyfuse3.FUSEError:
                raise
            except errors.StoreError as exc:
                if exc.errno in DEVICE_ERRNOS:
                    _log_device_error(self, name, first, args[0] if args else None, exc)
                raise pyfuse3.FUSEError(exc.errno) from None
            except Exception:
                shown = ", ".join(_brief(arg) for arg in args)
                log.exception("FUSE %s(%s) failed, returning EIO", name, shown)
                raise pyfuse3.FUSEError(errno.EIO) from None
            finally:
                self.stats.record(name, time.perf_counter() - started)

        return wrapper

    return decorate


def _log_device_error(ops, name: str, parameter: str | None, value, exc) -> None:
    """Log a failed request whose errno is in ``DEVICE_ERRNOS``, unless rate-limited."""
    limit = _device_log_limits.get(exc.errno)
    if limit is None:
        limit = _device_log_limits[exc.errno] = RateLimit(DEVICE_LOG_INTERVAL)
    suppressed = limit.allow()
    if suppressed is None:
        return
    level, next_step = DEVICE_ERRNOS[exc.errno]
    subject = _subject(ops, parameter, value)
    code = errno.errorcode[exc.errno]
    message = f"FUSE {name}{subject} failed with {code}: {exc}"
    if next_step:
        message += f". {next_step}"
    if suppressed:
        message += (
            f" ({suppressed} more {code} failures since the last such message"
            " were not logged)"
        )
    log.log(level, "%s", message)


def _subject(ops, parameter: str | None, value) -> str:
    """Describe the node or handle that a request names for a log line.

    The result is " on node N (inode I of layer ID)" or shorter, or "".
    """
    if parameter == "fh" and ops.skip_opens:
        parameter = "inode"  # the kernel opened the file itself; fh is its node
    if parameter == "fh":
        handle = ops._files.get(value) or ops._dirs.get(value)
        if handle is None or handle.layer is None:
            return f" on file handle {value}"
        node, layer, ino = handle.node, handle.layer, handle.ino
    elif parameter in _NODE_PARAMETERS:
        node = value
        try:
            layer, ino = ops.store.node_target(node)
        except errors.StoreError:
            return f" on node {node}"
    else:
        return ""
    try:
        layer_id = ops.store.layer_by_number(layer).id
    except errors.StoreError:
        layer_id = f"number {layer}"
    return f" on node {node} (inode {ino} of layer {layer_id})"
