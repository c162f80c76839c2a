"""pyfuse3 request handlers that serve every layer of a store as a directory.

The mount root (``pyfuse3.ROOT_INODE``) is a read-only directory with one
subdirectory per layer, named by the layer's Docker id. Each of those is the
root directory (``ROOT_INO``) of that layer's tree.

Invariants:

- Every node id except the mount root comes from the store's persistent node
  table (``store.node_id`` and ``store.node_target``), so st_ino is unique
  across the mount and stable across remounts. Node ids are never computed
  from bits of the layer or inode number.
- A handler raises only ``pyfuse3.FUSEError``, because any other exception
  ends the pyfuse3 main loop and leaves the mount failing every request
  with ENOTCONN. ``StoreError`` becomes its errno, and anything else is
  logged with its traceback and becomes EIO.
- Only fsync and fsyncdir commit at once. Other modifying handlers set
  ``dirty``, and ``run_commits`` commits about once a second.
- An open file pins its inode in the store, so an unlinked file stays
  readable and writable until its last descriptor is closed.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass

import pyfuse3
import trio

from lcfs.store import ROOT_INO, errors

log = logging.getLogger(__name__)

# Frozen layers never change, so the kernel may cache them for long. A
# writable layer is changed only through this mount, except by ApplyDiff
# before its first use, so one second keeps other views close to current.
FROZEN_TIMEOUT = 300.0
WRITABLE_TIMEOUT = 1.0

COMMIT_INTERVAL = 1.0

# ``ls -l`` requests security.selinux of every file unless the file system
# returned EOPNOTSUPP for it once, so an absent value of these names gets
# EOPNOTSUPP instead of ENODATA.
UNSUPPORTED_WHEN_ABSENT = frozenset({b"security.selinux"})

CAPABILITY_XATTR = b"security.capability"

RENAME_FLAGS = pyfuse3.RENAME_NOREPLACE | pyfuse3.RENAME_EXCHANGE


def _brief(value: object) -> str:
    """Return a repr of a handler argument short enough for a log line."""
    if isinstance(value, (bytes, bytearray, memoryview)) and len(value) > 64:
        return f"<{len(value)} bytes>"
    return repr(value)


def fuse_handler(modifies: bool = False):
    """Wrap a handler so that it raises only FUSEError.

    ``modifies`` marks handlers that change the store: they set the dirty
    flag that the commit task looks at, even when they fail halfway.
    """

    def decorate(method):
        @functools.wraps(method)
        async def wrapper(self: LayerOperations, *args):
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
                log.exception("FUSE %s(%s) failed, returning EIO", method.__name__, shown)
                raise pyfuse3.FUSEError(errno.EIO) from None

        return wrapper

    return decorate


@dataclass(slots=True)
class OpenFile:
    """A file handle: the node opened and what the opener may do with it."""

    node: int
    layer: int
    ino: int
    direct_io: bool
    opener_uid: int
    privileges_cleared: bool = False


@dataclass(slots=True)
class OpenDir:
    """A directory handle with the listing taken at the last read from offset 0.

    The offset handed to the kernel after entry ``i`` of the listing is
    ``i + 1``, so a listing resumes exactly where it stopped even when the
    directory changes in between. ``layer`` is None for the mount root.
    """

    node: int
    layer: int | None
    ino: int
    listing: list | None = None


class LayerOperations(pyfuse3.Operations):
    """The pyfuse3 request handlers for one mount of a store."""

    # Lookups of "." and ".." need a directory's parent, which the store
    # does not return, so export support (open_by_handle_at of a node the
    # kernel forgot) stays off.
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, store, initialized: threading.Event | None = None):
        super().__init__()
        self.store = store
        self.dirty = False
        self.initialized = initialized or threading.Event()
        self.lookup_counts: dict[int, int] = {}
        self._files: dict[int, OpenFile] = {}
        self._dirs: dict[int, OpenDir] = {}
        self._next_handle = 1
        self._mount_time_ns = time.time_ns()

    # -- lifecycle ------------------------------------------------------------

    def init(self) -> None:
        """Record that the kernel finished the FUSE handshake."""
        self.initialized.set()

    async def run_commits(self) -> None:
        """Commit the store about once a second while changes are pending."""
        while True:
            await trio.sleep(COMMIT_INTERVAL)
            if self.dirty:
                self.commit()

    def commit(self) -> None:
        """Commit pending changes, logging a failure; they stay marked for a retry."""
        try:
            self._commit_now()
        except Exception:
            log.exception("group commit of the store failed, retrying in %.0f s",
                          COMMIT_INTERVAL)

    def _commit_now(self) -> None:
        self.dirty = False
        try:
            self.store.commit()
        except BaseException:
            self.dirty = True
            raise

    def shutdown(self) -> None:
        """Release what the kernel still held open and commit; call after main()."""
        for handle, open_file in list(self._files.items()):
            log.info("unmount: releasing file handle %d of node %d", handle,
                     open_file.node)
            self._unpin(open_file)
        self._files.clear()
        self._dirs.clear()
        self.lookup_counts.clear()
        if self.dirty:
            self.commit()

    # -- helpers --------------------------------------------------------------

    def _is_frozen(self, layer: int) -> bool:
        return self.store.layer_by_number(layer).frozen

    def _target(self, node: int) -> tuple[int, int]:
        """Return (layer, ino) of a node that is not the mount root."""
        if node == pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.EROFS)
        return self.store.node_target(node)

    def _same_layer(self, node: int, other: int) -> tuple[int, int, int]:
        """Return (layer, ino, other_ino) for two nodes, EXDEV if layers differ."""
        layer, ino = self._target(node)
        other_layer, other_ino = self._target(other)
        if layer != other_layer:
            raise pyfuse3.FUSEError(errno.EXDEV)
        return layer, ino, other_ino

    def _remember(self, node: int) -> None:
        self.lookup_counts[node] = self.lookup_counts.get(node, 0) + 1

    def _remembered_entry(self, layer: int, attr):
        """Return the entry of a node the reply hands to the kernel, counting it."""
        entry = self._entry(layer, attr)
        self._remember(entry.st_ino)
        return entry

    def _entry(self, layer: int, attr, entry_timeout: float | None = None):
        frozen = self._is_frozen(layer)
        timeout = FROZEN_TIMEOUT if frozen else WRITABLE_TIMEOUT
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = self.store.node_id(layer, attr.ino)
        entry.generation = 0
        entry.st_mode = attr.mode
        entry.st_nlink = attr.nlink
        entry.st_uid = attr.uid
        entry.st_gid = attr.gid
        entry.st_rdev = attr.rdev
        entry.st_size = attr.size
        entry.st_blocks = attr.blocks
        entry.st_blksize = self.store.block_size
        entry.st_atime_ns = attr.atime_ns
        entry.st_mtime_ns = attr.mtime_ns
        entry.st_ctime_ns = attr.ctime_ns
        entry.attr_timeout = timeout
        entry.entry_timeout = timeout if entry_timeout is None else entry_timeout
        return entry

    def _root_entry(self):
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = pyfuse3.ROOT_INODE
        entry.generation = 0
        entry.st_mode = stat.S_IFDIR | 0o755
        # 1 means "subdirectory count unknown" to find and other tree walkers.
        entry.st_nlink = 1
        entry.st_blksize = self.store.block_size
        entry.st_atime_ns = self._mount_time_ns
        entry.st_mtime_ns = self._mount_time_ns
        entry.st_ctime_ns = self._mount_time_ns
        # These attributes never change while mounted. Every path walk from
        # the mount root checks them (default_permissions), so they are cached.
        entry.attr_timeout = FROZEN_TIMEOUT
        entry.entry_timeout = 0
        return entry

    def _layer_entry(self, layer):
        # Entries of the mount root are never cached, so a layer created or
        # removed after the kernel looked at its name shows at once.
        attr = self.store.getattr(layer.number, ROOT_INO)
        return self._entry(layer.number, attr, entry_timeout=0)

    def _new_owner(self, layer: int, dir_ino: int, mode: int, ctx) -> tuple[int, int]:
        """Return (mode, gid) of a new inode, honouring a setgid directory."""
        gid = ctx.gid
        parent = self.store.getattr(layer, dir_ino)
        if parent.mode & stat.S_ISGID:
            gid = parent.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        return mode, gid

    def _new_handle(self) -> int:
        handle = self._next_handle
        self._next_handle += 1
        return handle

    def _unpin(self, open_file: OpenFile) -> None:
        try:
            self.store.unpin(open_file.layer, open_file.ino)
        except errors.StoreError as exc:
            log.warning("unpin of inode %d in layer %d (node %d) failed: %s",
                        open_file.ino, open_file.layer, open_file.node, exc)

    def _clear_privileges(self, layer: int, ino: int, uid: int) -> None:
        """Drop setuid, setgid and file capabilities as a data change by ``uid`` must.

        The kernel does this itself before cached writes and truncates, but
        not for direct_io writes or for the truncate of an open with O_TRUNC,
        which libfuse makes atomic. pyfuse3 passes no kill flag, so uid 0
        serves as the CAP_FSETID check.
        """
        attr = self.store.getattr(layer, ino)
        mode = attr.mode
        if uid != 0:
            mode &= ~stat.S_ISUID
            if mode & stat.S_IXGRP:
                mode &= ~stat.S_ISGID
        if mode != attr.mode:
            self.store.setattr(layer, ino, mode=stat.S_IMODE(mode))
        if attr.has_xattrs:
            try:
                self.store.removexattr(layer, ino, CAPABILITY_XATTR)
            except errors.NoData:
                pass

    # -- names ----------------------------------------------------------------

    @fuse_handler()
    async def lookup(self, parent_inode, name, ctx):
        if parent_inode == pyfuse3.ROOT_INODE:
            if name in (b".", b".."):
                return self._root_entry()
            entry = self._layer_entry(self.store.get_layer(os.fsdecode(name)))
        else:
            layer, dir_ino = self._target(parent_inode)
            entry = self._entry(layer, self.store.lookup(layer, dir_ino, name))
        self._remember(entry.st_ino)
        return entry

    async def forget(self, inode_list):
        for node, count in inode_list:
            remaining = self.lookup_counts.get(node, 0) - count
            if remaining > 0:
                self.lookup_counts[node] = remaining
            else:
                self.lookup_counts.pop(node, None)

    @fuse_handler()
    async def getattr(self, inode, ctx):
        if inode == pyfuse3.ROOT_INODE:
            return self._root_entry()
        layer, ino = self._target(inode)
        return self._entry(layer, self.store.getattr(layer, ino))

    @fuse_handler(modifies=True)
    async def setattr(self, inode, attr, fields, fh, ctx):
        layer, ino = self._target(inode)
        changes = {}
        if fields.update_mode:
            changes["mode"] = stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            changes["uid"] = attr.st_uid
        if fields.update_gid:
            changes["gid"] = attr.st_gid
        if fields.update_size:
            changes["size"] = attr.st_size
        # pyfuse3 has already put the current time into the fields that
        # utimensat(2) set to UTIME_NOW.
        if fields.update_atime:
            changes["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            changes["mtime_ns"] = attr.st_mtime_ns
        if fields.update_ctime:
            changes["ctime_ns"] = attr.st_ctime_ns
        return self._entry(layer, self.store.setattr(layer, ino, **changes))

    @fuse_handler()
    async def readlink(self, inode, ctx):
        layer, ino = self._target(inode)
        return self.store.readlink(layer, ino)

    # -- directories ----------------------------------------------------------

    @fuse_handler()
    async def opendir(self, inode, ctx):
        if inode == pyfuse3.ROOT_INODE:
            opened = OpenDir(inode, None, 0)
        else:
            layer, ino = self._target(inode)
            if not stat.S_ISDIR(self.store.getattr(layer, ino).mode):
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            opened = OpenDir(inode, layer, ino)
        handle = self._new_handle()
        self._dirs[handle] = opened
        return handle

    @fuse_handler()
    async def readdir(self, fh, start_id, token):
        opened = self._dirs[fh]
        if start_id == 0 or opened.listing is None:
            if opened.layer is None:
                layers = sorted(self.store.list_layers(), key=lambda layer: layer.id)
                opened.listing = [(os.fsencode(layer.id), layer) for layer in layers]
            else:
                opened.listing = self.store.readdir(opened.layer, opened.ino)
        for index in range(start_id, len(opened.listing)):
            name, item = opened.listing[index]
            if opened.layer is None:
                try:
                    entry = self._layer_entry(item)
                except errors.NotFound:
                    continue  # removed since the listing was taken
            else:
                entry = self._entry(opened.layer, item)
            if not pyfuse3.readdir_reply(token, name, entry, index + 1):
                break
            # readdirplus gives the kernel a reference to every entry it takes.
            self._remember(entry.st_ino)

    @fuse_handler()
    async def releasedir(self, fh):
        del self._dirs[fh]

    @fuse_handler()
    async def fsyncdir(self, fh, datasync):
        self._commit_now()

    @fuse_handler(modifies=True)
    async def mkdir(self, parent_inode, name, mode, ctx):
        layer, dir_ino = self._target(parent_inode)
        mode, gid = self._new_owner(layer, dir_ino, mode, ctx)
        attr = self.store.mkdir(layer, dir_ino, name, mode, ctx.uid, gid)
        return self._remembered_entry(layer, attr)

    @fuse_handler(modifies=True)
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        layer, dir_ino = self._target(parent_inode)
        mode, gid = self._new_owner(layer, dir_ino, mode, ctx)
        attr = self.store.mknod(layer, dir_ino, name, mode, rdev, ctx.uid, gid)
        return self._remembered_entry(layer, attr)

    @fuse_handler(modifies=True)
    async def symlink(self, parent_inode, name, target, ctx):
        layer, dir_ino = self._target(parent_inode)
        _, gid = self._new_owner(layer, dir_ino, stat.S_IFLNK, ctx)
        attr = self.store.symlink(layer, dir_ino, name, target, ctx.uid, gid)
        return self._remembered_entry(layer, attr)

    @fuse_handler(modifies=True)
    async def link(self, inode, new_parent_inode, new_name, ctx):
        layer, ino, new_dir_ino = self._same_layer(inode, new_parent_inode)
        attr = self.store.link(layer, ino, new_dir_ino, new_name)
        return self._remembered_entry(layer, attr)

    @fuse_handler(modifies=True)
    async def unlink(self, parent_inode, name, ctx):
        layer, dir_ino = self._target(parent_inode)
        self.store.unlink(layer, dir_ino, name)

    @fuse_handler(modifies=True)
    async def rmdir(self, parent_inode, name, ctx):
        layer, dir_ino = self._target(parent_inode)
        self.store.rmdir(layer, dir_ino, name)

    @fuse_handler(modifies=True)
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new,
                     flags, ctx):
        if flags & ~RENAME_FLAGS:
            raise pyfuse3.FUSEError(errno.EINVAL)
        layer, old_dir, new_dir = self._same_layer(parent_inode_old, parent_inode_new)
        self.store.rename(layer, old_dir, name_old, new_dir, name_new, flags)

    # -- files ----------------------------------------------------------------

    def _open(self, node: int, layer: int, ino: int, flags: int, ctx):
        # A descriptor opened write-only can never be mapped, so it skips the
        # page cache: no cache pollution, and the kernel sends no
        # getxattr of security.capability before every write.
        direct_io = flags & os.O_ACCMODE == os.O_WRONLY
        self.store.pin(layer, ino)
        handle = self._new_handle()
        self._files[handle] = OpenFile(node, layer, ino, direct_io, ctx.uid)
        return pyfuse3.FileInfo(fh=handle, direct_io=direct_io, keep_cache=True)

    @fuse_handler()
    async def open(self, inode, flags, ctx):
        layer, ino = self._target(inode)
        writes = flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC
        if writes and self._is_frozen(layer):
            raise pyfuse3.FUSEError(errno.EROFS)
        # libfuse negotiates atomic O_TRUNC, so the kernel leaves the
        # truncate to this handler.
        if flags & os.O_TRUNC and stat.S_ISREG(self.store.getattr(layer, ino).mode):
            self.dirty = True
            self._clear_privileges(layer, ino, ctx.uid)
            self.store.setattr(layer, ino, size=0, mtime_ns=time.time_ns())
        return self._open(inode, layer, ino, flags, ctx)

    @fuse_handler(modifies=True)
    async def create(self, parent_inode, name, mode, flags, ctx):
        layer, dir_ino = self._target(parent_inode)
        mode, gid = self._new_owner(layer, dir_ino, mode, ctx)
        attr = self.store.mknod(layer, dir_ino, name, mode, 0, ctx.uid, gid)
        entry = self._entry(layer, attr)
        file_info = self._open(entry.st_ino, layer, attr.ino, flags, ctx)
        self._remember(entry.st_ino)
        return file_info, entry

    @fuse_handler()
    async def read(self, fh, off, size):
        open_file = self._files[fh]
        return self.store.read(open_file.layer, open_file.ino, off, size)

    @fuse_handler(modifies=True)
    async def write(self, fh, off, buf):
        open_file = self._files[fh]
        if open_file.direct_io and not open_file.privileges_cleared:
            # NOTE: once per handle, where the kernel checks on every write.
            open_file.privileges_cleared = True
            self._clear_privileges(open_file.layer, open_file.ino, open_file.opener_uid)
        return self.store.write(open_file.layer, open_file.ino, off, buf)

    @fuse_handler()
    async def flush(self, fh):
        # Data reaches the store on every write; durability is fsync's job.
        if fh not in self._files:
            raise pyfuse3.FUSEError(errno.EBADF)

    @fuse_handler()
    async def fsync(self, fh, datasync):
        self._commit_now()

    @fuse_handler()
    async def release(self, fh):
        self._unpin(self._files.pop(fh))

    # -- extended attributes --------------------------------------------------

    @fuse_handler()
    async def getxattr(self, inode, name, ctx):
        if inode == pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENODATA)
        layer, ino = self._target(inode)
        try:
            return self.store.getxattr(layer, ino, name)
        except errors.NoData:
            if name in UNSUPPORTED_WHEN_ABSENT:
                raise pyfuse3.FUSEError(errno.EOPNOTSUPP) from None
            raise

    @fuse_handler()
    async def listxattr(self, inode, ctx):
        if inode == pyfuse3.ROOT_INODE:
            return []
        layer, ino = self._target(inode)
        return self.store.listxattr(layer, ino)

    @fuse_handler(modifies=True)
    async def setxattr(self, inode, name, value, ctx):
        # pyfuse3 checks XATTR_CREATE and XATTR_REPLACE itself through
        # getxattr before it calls this handler.
        layer, ino = self._target(inode)
        self.store.setxattr(layer, ino, name, value)

    @fuse_handler(modifies=True)
    async def removexattr(self, inode, name, ctx):
        layer, ino = self._target(inode)
        self.store.removexattr(layer, ino, name)

    # -- file system ----------------------------------------------------------

    @fuse_handler()
    async def statfs(self, ctx):
        usage = self.store.statfs()
        result = pyfuse3.StatvfsData()
        result.f_bsize = usage.block_size
        result.f_frsize = usage.block_size
        result.f_blocks = usage.total_blocks
        result.f_bfree = usage.free_blocks
        result.f_bavail = usage.free_blocks
        result.f_files = usage.files
        result.f_ffree = usage.free_files
        result.f_favail = usage.free_files
        result.f_namemax = 255
        return result
