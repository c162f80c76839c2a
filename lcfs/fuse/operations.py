"""pyfuse3 request handlers that serve every layer of a store as a directory.

The mount root (``pyfuse3.ROOT_INODE``) is a read-only directory with one
subdirectory per layer, named by the layer's Docker id. Each of those is the
root directory (``ROOT_INO``) of that layer's tree.

Invariants:

- Every node id except the mount root comes from the store's persistent node
  table (``store.node_id`` and ``store.node_target``), which maps it to a
  64-bit layer number and a 64-bit inode number. Node ids are never computed
  from bits of those numbers and never reused, so a file handle from
  name_to_handle_at(2) stays valid across remounts: the kernel resolves a
  node it has forgotten by a lookup of "." and, for directories, "..".
- Two names lead to one node (and one st_ino) only when they lead to one
  record in the store: hard links, and, with ``share_unchanged``, a regular
  file that layers inherit unchanged from an ancestor, which is then served
  through the ancestor's node (``_node_layer``) so that its pages are
  cached once for all of them. A change to such a file through a writable
  layer is first rejected with ESTALE. The kernel then looks the path up
  again, and that lookup copies the file up into the layer and returns the
  layer's own node (``_retry_if_shared``).
- A handler raises only ``pyfuse3.FUSEError``, because any other exception
  ends the pyfuse3 main loop and leaves the mount failing every request
  with ENOTCONN. ``StoreError`` becomes its errno, and anything else is
  logged with its traceback and becomes EIO.
- Only fsync and fsyncdir commit at once. Other modifying handlers set
  ``dirty``, and the request loop calls ``commit_pending`` about once a
  second between requests (it commits also when a lookup allocated a node
  id, so that file handles survive a crash).
- No handler waits for anything but ``release`` with invalidate-on-close,
  so the mount serves requests one at a time on a plain loop
  (``lcfs.fuse.mount``) unless that setting is on.
- A file of a writable layer, of any type but a directory, stays in the
  store while the kernel has a reference to its node (``_pinned``), which
  it has while any descriptor is open. An unlinked file thus stays
  readable and writable, and an unlinked fifo or device node keeps its
  attributes, until its last descriptor is closed, with or without open
  requests.
- With ``skip_opens``, open and create return ENOSYS. The kernel then
  stops sending OPEN, CREATE (it sends MKNOD) and RELEASE for the whole
  mount, keeps every file's pages (FOPEN_KEEP_CACHE), and the rebuilt
  pyfuse3 hands read and write the node id as their file handle. That
  saves two round trips for every file a container opens. It needs no
  per-descriptor state: no direct I/O, no invalidate-on-close and no
  shared nodes, which each need an open.
- ``_attrs`` keeps the attributes of every node the kernel holds, from the
  last reply that carried them. They are trusted for a frozen layer until
  the kernel forgets the node, and for a writable layer for as long as the
  kernel trusts the same reply (``WRITABLE_TIMEOUT``). Xattr requests and
  the privilege checks of direct I/O writes read them instead of the store.
"""

from __future__ import annotations

import bisect
import dataclasses
import errno
import hashlib
import logging
import math
import os
import stat
import threading
import time
from dataclasses import dataclass

import pyfuse3
import trio

from lcfs.pyfuse3_build import PATCH_LEVEL
from lcfs.store import RENAME_WHITEOUT, ROOT_INO, errors
from lcfs.store.store import PUNCH_HOLE_MODE

from .handler import fuse_handler
from .privileges import (
    Caller,
    caller_from_context,
    mode_after_data_change,
    mode_after_owner_change,
)
from .settings import DIRECT_IO_NEVER, DIRECT_IO_WRITE_ONLY, FuseSettings
from .stats import RequestStats
from .xattrs import CAPABILITY_XATTR, XattrHandlers

log = logging.getLogger(__name__)

# Frozen layers never change, so the kernel may cache them for long. A
# writable layer is changed only through this mount, except by ApplyDiff
# before its first use, so one second keeps other views close to current.
FROZEN_TIMEOUT = 300.0
WRITABLE_TIMEOUT = 1.0

# Whether this pyfuse3 lets lcfs turn on the kernel's symlink and directory
# caches; only a build by scripts/build_pyfuse3.py does.
KERNEL_CACHES = getattr(pyfuse3, "LCFS_PATCH_LEVEL", 0) >= PATCH_LEVEL

# The write_flags bit of a WRITE that writes back pages of a shared mapping.
FUSE_WRITE_CACHE = 1

# Whether this pyfuse3 can serve reads and writes without opens (skip_opens).
NODE_HANDLES = hasattr(pyfuse3, "lcfs_serve_without_opens")

# Listings kept between the readdir requests of one directory read when
# there are no directory handles (KERNEL_CACHES).
LISTINGS_KEPT = 64

COMMIT_INTERVAL = 1.0

RENAME_FLAGS = pyfuse3.RENAME_NOREPLACE | pyfuse3.RENAME_EXCHANGE | RENAME_WHITEOUT

PRIVILEGE_BITS = stat.S_ISUID | stat.S_ISGID

EXECUTE_BITS = stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH

# How long a change rejected with ESTALE waits for the lookups of the
# kernel's retry. The retry follows at once, so this only bounds the memory
# kept for a thread that gave up.
UNSHARE_WINDOW = 10.0


@dataclass(slots=True)
class OpenFile:
    """A file handle: the node opened and what the opener may do with it.

    ``opener`` is the request context of the open. ``caller`` is the
    opener's credentials, read when a privilege check first needs them.
    ``shared`` marks a file of a frozen layer under ``share_unchanged``,
    whose pages the kernel caches once for every layer.
    """

    node: int
    layer: int
    ino: int
    direct_io: bool
    opener: object
    caller: Caller | None = None
    shared: bool = False


@dataclass(frozen=True, slots=True)
class RequestIds:
    """The ids of the process behind a request, as a pyfuse3 context carries them."""

    uid: int
    gid: int
    pid: int


# The item of the "." and ".." entries of a listing.
_DOT = object()


def _name_offset(name: bytes) -> int:
    """Return the readdir offset of a directory entry: 3 or more, below 2**62 + 3.

    Two names share an offset with a chance of 2**-62 per pair; a read
    that stops between them would then skip the second.
    """
    digest = hashlib.blake2b(name, digest_size=8).digest()
    return 3 + (int.from_bytes(digest, "big") >> 2)


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


class LayerOperations(XattrHandlers, pyfuse3.Operations):
    """The pyfuse3 request handlers for one mount of a store."""

    # Export support: the kernel may look up "." and ".." to turn a file
    # handle into a node it has forgotten.
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False
    # Read by a pyfuse3 built with scripts/build_pyfuse3.py (see
    # KERNEL_CACHES); stock pyfuse3 ignores it. A symlink's target never
    # changes: a new target is a new inode.
    enable_symlink_cache = True
    # Set by the init handler of that pyfuse3 when the kernel offers
    # FUSE_CAP_NO_OPENDIR_SUPPORT. Without it, ENOSYS from opendir is an error.
    kernel_skips_opendir = False

    def __init__(self, store, initialized: threading.Event | None = None,
                 settings: FuseSettings | None = None,
                 stats: RequestStats | None = None):  # fmt: skip
        super().__init__()
        self.store = store
        self.settings = settings or FuseSettings()
        self.stats = stats or RequestStats()
        self.dirty = False
        self.initialized = initialized or threading.Event()
        self.lookup_counts: dict[int, int] = {}
        self._attrs: dict[int, tuple[object, float]] = {}
        self._open_counts: dict[int, int] = {}
        # node -> (layer, ino) of the files of writable layers, other than
        # directories, that the kernel has references to, each pinned once
        # in the store.
        self._pinned: dict[int, tuple[int, int]] = {}
        self._files: dict[int, OpenFile] = {}
        self._dirs: dict[int, OpenDir] = {}
        self._listings: dict[int, list] = {}
        # node -> xattrs of a removed directory that the kernel still references.
        # The store deletes them at the removal, but fgetxattr and
        # fsetxattr through an open descriptor work on ext4 and tmpfs.
        self._removed_xattrs: dict[int, dict[bytes, bytes]] = {}
        # Whether the kernel may keep a listing of the mount root, which
        # then has to be dropped when a layer comes or goes.
        self.root_listed = False
        # (thread id, node) of changes rejected by _retry_if_shared: the
        # monotonic time until which the retry may come, and whether a
        # lookup of the retry has led to the node again.
        self._unsharing: dict[tuple[int, int], tuple[float, bool]] = {}
        self._next_handle = 1
        self._mount_time_ns = time.time_ns()
        # Set by the mount: queues a notice that drops a node's cached
        # pages and attributes, without waiting for the kernel.
        self.invalidate_node = None
        # Set by the mount when the request loop runs each handler right after
        # reading its request: returns (uid, gid, pid, write_flags) of the
        # WRITE being served.
        self.write_context = None
        # The mount turns this off when it cannot set up the request hooks
        # that serving without opens needs.
        self.skip_opens = (NODE_HANDLES and KERNEL_CACHES
                           and self.settings.direct_io == DIRECT_IO_NEVER
                           and not self.settings.invalidate_on_close
                           and not self.settings.share_unchanged)  # fmt: skip

    # -- lifecycle ------------------------------------------------------------

    def init(self) -> None:
        """Record that the kernel finished the FUSE handshake."""
        self.stats.record("init", 0.0)
        self.initialized.set()

    async def run_commits(self) -> None:
        """Commit the store about once a second while changes are pending."""
        while True:
            await trio.sleep(COMMIT_INTERVAL)
            self.commit_pending()

    def commit_pending(self) -> None:
        """Commit if a request changed the store since the last commit."""
        # A lookup that allocated a node id left records to commit too.
        if self.dirty or self.store.uncommitted:
            self.commit()

    def mark_changed_layers(self) -> None:
        """Make the change marks of the layers a request changed durable before its reply.

        A failure is logged and the request still succeeds, as its change
        stays in the open group.
        """
        try:
            self.store.mark_changed_layers()
        except Exception:
            log.exception("commit of change marks failed; a crash before the next "
                          "group commit may lose changes without a record of them")

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
        for node in list(self._pinned):
            self._unpin(node)
        self._files.clear()
        self._dirs.clear()
        self._listings.clear()
        self._removed_xattrs.clear()
        self._open_counts.clear()
        self._attrs.clear()
        self.lookup_counts.clear()
        if self.dirty or self.store.uncommitted:
            self.commit()

    # -- helpers --------------------------------------------------------------

    def _is_frozen(self, layer: int) -> bool:
        return self.store.layer_by_number(layer).frozen

    def _node_layer(self, layer: int, attr) -> tuple[int, bool]:
        """Return (layer, frozen) of the node that serves ``attr`` in ``layer``.

        A regular file that the layer inherits unchanged is served through
        the node of the frozen ancestor that contains its record, so the kernel keeps
        one inode and one copy of its pages for every layer that reads it. A
        writable layer keeps its own node for a file with more than one
        name, because a change through another name would make it stale. It
        also keeps its own node for an executable: while one container runs
        it, the kernel rejects (ETXTBSY) opens of the shared inode for
        writing in any other.
        """
        frozen = self._is_frozen(layer)
        if (attr.inherited and self.settings.share_unchanged and stat.S_ISREG(attr.mode)
                and (frozen or (attr.nlink == 1 and not attr.mode & EXECUTE_BITS))):  # fmt: skip
            return attr.owner, True
        return layer, frozen

    def _retry_if_shared(self, node: int, layer: int, ino: int, ctx) -> None:
        """Raise ESTALE for a change to a file of a frozen layer, unless a retry led here.

        The node may serve a file that a writable layer shares
        (``_node_layer``), and a request names only the node, not the path
        that led to it. After ESTALE the kernel walks the path again with
        LOOKUP_REVAL and looks up every name anew. ``_unshared`` lets that
        lookup copy the file up into the writable layer, so the retried
        request names the layer's own node. When the retry's lookup led to
        this node again, the path goes through a frozen layer, and this
        returns for the caller to reject the change. A change by descriptor
        has no path to walk again, so it gets ESTALE every time.
        """
        if not (self.settings.share_unchanged
                and stat.S_ISREG(self._current_attr(node, layer, ino).mode)):  # fmt: skip
            return
        key = (ctx.pid, node)
        pending = self._unsharing.pop(key, None)
        if pending is not None and pending[1]:
            return
        now = time.monotonic()
        for old in [old for old, (until, _) in self._unsharing.items() if until < now]:
            del self._unsharing[old]
        self._unsharing[key] = (now + UNSHARE_WINDOW, False)
        raise pyfuse3.FUSEError(errno.ESTALE)

    def _unshared(self, layer: int, attr, ctx):
        """Return the attributes for a lookup's reply, after a copy-up if one is due.

        The copy-up is due when ``_retry_if_shared`` rejected a change of
        the shared node by the same thread: this lookup is part of its
        retry. A lookup that leads to a node of a frozen layer marks the
        retry as looked up instead.
        """
        node_layer, _ = self._node_layer(layer, attr)
        node = self.store.node_id(node_layer, attr.ino)
        key = (ctx.pid, node)
        pending = self._unsharing.get(key)
        if pending is None:
            return attr
        if node_layer == layer or self._is_frozen(layer):
            self._unsharing[key] = (pending[0], True)
            return attr
        del self._unsharing[key]
        self.dirty = True
        log.debug("copying up inode %d into layer %d for a change by thread %d "
                  "(shared node %d)", attr.ino, layer, ctx.pid, node)  # fmt: skip
        return self.store.own(layer, attr.ino)

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
        count = self.lookup_counts.get(node, 0)
        self.lookup_counts[node] = count + 1
        if count == 0:
            self._pin(node)

    def _pin(self, node: int) -> None:
        """Pin a file of a writable layer until the kernel sends FORGET for its node.

        Every type but a directory is pinned, because fstat(2) and fchmod(2)
        of an open fifo or device node work after its unlink on ext4 and
        tmpfs. getattr of a removed directory reads its attributes from
        memory instead (``_removed_directory``).

        Call it when the kernel takes its first reference to the node.
        ``_attrs`` then contains the attributes of the reply.
        """
        cached = self._attrs.get(node)
        if cached is None or stat.S_ISDIR(cached[0].mode):
            return
        layer, ino = self.store.node_target(node)
        if self._is_frozen(layer):
            return
        self.store.pin(layer, ino)
        self._pinned[node] = (layer, ino)

    def _remembered_entry(self, layer: int, attr):
        """Return the entry of a node the reply hands to the kernel, counting it."""
        entry = self._entry(layer, attr)
        self._remember(entry.st_ino)
        return entry

    def _keep_attr(self, node: int, layer: int, attr, frozen: bool | None = None) -> None:
        """Keep the attributes of a node for as long as the kernel may trust them."""
        if frozen is None:
            frozen = self._is_frozen(layer)
        valid_until = math.inf if frozen else time.monotonic() + WRITABLE_TIMEOUT
        self._attrs[node] = (attr, valid_until)

    def _current_attr(self, node: int, layer: int, ino: int):
        """Return the attributes of a node, from memory while they are valid.

        A removed directory that the kernel still references has no record
        in the store, so its attributes come from memory at any age
        (``_removed_directory``). Raises NotFound for any other missing node.
        """
        kept = self._attrs.get(node)
        if kept is not None and kept[1] > time.monotonic():
            return kept[0]
        try:
            attr = self.store.getattr(layer, ino)
        except errors.NotFound:
            return self._removed_directory(node)
        self._keep_attr(node, layer, attr)
        return attr

    def _entry(self, layer: int, attr, entry_timeout: float | None = None):
        node_layer, frozen = self._node_layer(layer, attr)
        # An inode that a writable layer inherits unchanged can change only
        # by a copy-up through this mount. The kernel learns of that from
        # the reply or its own invalidation, so the inode is cached like a
        # frozen one, and a repeated tree scan in a container sends no getattr.
        timeout = FROZEN_TIMEOUT if frozen or attr.inherited else WRITABLE_TIMEOUT
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = self.store.node_id(node_layer, attr.ino)
        self._keep_attr(entry.st_ino, node_layer, attr, frozen)
        entry.generation = 0
        entry.st_mode = attr.mode
        entry.st_nlink = attr.nlink
        entry.st_uid = attr.uid
        entry.st_gid = attr.gid
        entry.st_rdev = attr.rdev
        # The store keeps size 0 for directories. ext4 reports them in whole
        # blocks, and `test -s DIR` and `find -size 0` rely on a nonzero
        # size, so a directory reports one block. The check runs only for
        # size 0.
        # NOTE: ext4 grows a directory past one block as entries are added,
        # and this size stays at one block.
        entry.st_size = attr.size or (
            self.store.block_size if stat.S_ISDIR(attr.mode) else 0
        )
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
        entry.st_size = self.store.block_size
        entry.st_blksize = self.store.block_size
        entry.st_atime_ns = self._mount_time_ns
        entry.st_mtime_ns = self._mount_time_ns
        entry.st_ctime_ns = self._mount_time_ns
        # These attributes never change while mounted. Every path walk from
        # the mount root checks them (default_permissions), so they are cached.
        entry.attr_timeout = FROZEN_TIMEOUT
        entry.entry_timeout = 0
        return entry

    def _layer_entry(self, layer, entry_timeout: float = FROZEN_TIMEOUT):
        # A layer's name leads to the same root node for the layer's whole
        # life, so the kernel may keep the entry. Without it, one `docker
        # start` of a busybox container sent about 400 lookups of the
        # layer's name, from walks of the container's root path. Removing a
        # layer drops the entry before Remove replies (notify_layer_removed).
        # A name that is not found is not cached, so a new layer shows at once.
        attr = self.store.getattr(layer.number, ROOT_INO)
        return self._entry(layer.number, attr, entry_timeout=entry_timeout)

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

    def _unpin(self, node: int) -> None:
        """Unpin the file of a node after FORGET, so that the store frees it if unlinked."""
        layer, ino = self._pinned.pop(node)
        try:
            self.store.unpin(layer, ino)
        except Exception:
            # forget has no reply to carry an error, and an exception here
            # would end the request loop.
            log.exception("unpin of inode %d in layer %d (node %d) failed", ino, layer, node)

    def _drop_privileges(self, node: int, layer: int, ino: int, caller) -> bool:
        """Drop setuid, setgid and file capabilities as a data change must; True if any went.

        The mount leaves setuid and setgid to lcfs (FUSE_HANDLE_KILLPRIV_V2).
        Without that, the kernel drops them before buffered writes and
        truncates, but setgid only from files that their group may
        execute. It drops neither before direct I/O writes or for the
        truncate of an open with O_TRUNC, which libfuse makes atomic.
        ``caller`` is called for the writer's credentials only when the file
        has a setuid or setgid bit. See ``lcfs.fuse.privileges``.
        """
        attr = self._current_attr(node, layer, ino)
        drops_mode = stat.S_ISREG(attr.mode) and attr.mode & PRIVILEGE_BITS
        drops_capability = attr.has_xattrs and self.store.xattr_name_seen(CAPABILITY_XATTR)
        dropped = False
        if drops_mode:
            mode = mode_after_data_change(attr.mode, attr.gid, caller())
            if mode != attr.mode:
                attr = self.store.setattr(layer, ino, mode=stat.S_IMODE(mode))
                self._keep_attr(node, layer, attr)
                dropped = True
        if drops_capability:
            try:
                self.store.removexattr(layer, ino, CAPABILITY_XATTR)
            except errors.NoData:
                pass
            else:
                dropped = True
            self._keep_attr(node, layer, self.store.getattr(layer, ino))
        return dropped

    # -- names ----------------------------------------------------------------

    @fuse_handler()
    async def lookup(self, parent_inode, name, ctx):
        if name == b".":
            self.stats.dot_lookups += 1
            entry = self._node_entry(parent_inode)
        elif name == b"..":
            self.stats.dotdot_lookups += 1
            entry = self._parent_entry(parent_inode)
        elif parent_inode == pyfuse3.ROOT_INODE:
            layer = self.store.get_layer(os.fsdecode(name))
            self.stats.layers_looked_up.add(layer.number)
            entry = self._layer_entry(layer)
        else:
            layer, dir_ino = self._target(parent_inode)
            try:
                attr = self.store.lookup(layer, dir_ino, name)
            except errors.LayerNotFound:
                raise
            except errors.NotFound:
                return self._negative_entry(layer)
            if self._unsharing:
                attr = self._unshared(layer, attr, ctx)
            entry = self._entry(layer, attr)
        self._remember(entry.st_ino)
        return entry

    def _negative_entry(self, layer: int):
        """Return an entry that marks a name as absent, cached like a present one.

        Inode number 0 lets the kernel cache the absence, whereas after
        ENOENT it sends a lookup again on the next walk (a container's PATH
        search, for example). Names in a layer change only through this
        mount, whose changes the kernel tracks, or by ApplyDiff before the
        layer's first use.
        """
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = 0
        entry.entry_timeout = (
            FROZEN_TIMEOUT if self._is_frozen(layer) else WRITABLE_TIMEOUT
        )
        return entry

    def _node_entry(self, node: int):
        """Return the entry of ``node`` itself, which the kernel may have forgotten."""
        if node == pyfuse3.ROOT_INODE:
            return self._root_entry()
        layer, ino = self.store.node_target(node)
        return self._entry(layer, self.store.getattr(layer, ino))

    def _parent_entry(self, node: int):
        """Return the entry of a directory's parent; a layer root's is the mount root."""
        if node == pyfuse3.ROOT_INODE:
            return self._root_entry()
        layer, ino = self.store.node_target(node)
        if ino == ROOT_INO:
            return self._root_entry()
        return self._entry(layer, self.store.lookup_parent(layer, ino))

    async def forget(self, inode_list):
        started = time.perf_counter()
        for node, count in inode_list:
            remaining = self.lookup_counts.get(node, 0) - count
            if remaining > 0:
                self.lookup_counts[node] = remaining
            else:
                self.lookup_counts.pop(node, None)
                self._attrs.pop(node, None)
                self._removed_xattrs.pop(node, None)
                if node in self._pinned:
                    self._unpin(node)
        self.stats.record("forget", time.perf_counter() - started)

    @fuse_handler()
    async def getattr(self, inode, ctx):
        if inode == pyfuse3.ROOT_INODE:
            return self._root_entry()
        layer, ino = self._target(inode)
        try:
            attr = self.store.getattr(layer, ino)
        except errors.NotFound:
            attr = self._removed_directory(inode)
        return self._entry(layer, attr)

    def _removed_directory(self, node: int):
        """Return the attributes of a removed directory that the kernel still holds, with no links.

        A process may keep a removed directory as its working directory or
        open, and fstat(2) of it works on Linux file systems. The store
        deletes a directory's records at rmdir, so its last attributes
        come from memory, and its xattrs from ``_removed_xattrs``. Raises
        NotFound for anything else.
        """
        cached = self._attrs.get(node)
        if cached is None or not stat.S_ISDIR(cached[0].mode) or node not in self.lookup_counts:
            raise errors.NotFound(f"node {node} was removed")
        return dataclasses.replace(cached[0], nlink=0)

    def _change_removed_directory(self, node: int, layer: int, changes: dict):
        """Apply fchmod, fchown, futimens or an xattr change to a removed directory.

        Returns its attributes.

        No path leads to the directory again, so the change needs to show
        only to the descriptors still open on it, and memory keeps it.
        """
        attr = self._removed_directory(node)
        if "size" in changes:
            raise errors.IsDir(f"node {node} is a removed directory")
        if "mode" in changes:
            changes["mode"] |= stat.S_IFMT(attr.mode)
        changes.setdefault("ctime_ns", time.time_ns())
        attr = dataclasses.replace(attr, **changes)
        self._keep_attr(node, layer, attr)
        return attr

    @fuse_handler(modifies=True)
    async def setattr(self, inode, attr, fields, fh, ctx):
        layer, ino = self._target(inode)
        if self._is_frozen(layer):
            self._retry_if_shared(inode, layer, ino, ctx)
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
        # chown(2) with both ids -1 still drops setuid and setgid. It
        # reaches a FUSE server as a setattr of ctime alone, which pyfuse3
        # 3.5 passes on with no field set. Linux 6.18 sends no other
        # setattr without fields.
        no_fields = not (fields.update_mode or fields.update_size or fields.update_atime
                         or fields.update_mtime or fields.update_ctime)  # fmt: skip
        if fields.update_uid or fields.update_gid or no_fields:
            # A chown drops setuid and setgid here, not in the kernel
            # (FUSE_HANDLE_KILLPRIV_V2).
            before = self._current_attr(inode, layer, ino)
            mode = changes.get("mode", stat.S_IMODE(before.mode)) | stat.S_IFMT(before.mode)
            if mode & PRIVILEGE_BITS:
                cleared = mode_after_owner_change(mode, before.gid,
                                                  lambda: caller_from_context(ctx))  # fmt: skip
                if cleared != mode:
                    changes["mode"] = stat.S_IMODE(cleared)
        try:
            updated = self.store.setattr(layer, ino, **changes)
        except errors.NotFound:
            updated = self._change_removed_directory(inode, layer, changes)
        entry = self._entry(layer, updated)
        if fields.update_size:
            # The kernel leaves setuid and setgid to lcfs, or drops setgid
            # only from group-executable files, so a truncate drops them here.
            self._drop_privileges(inode, layer, ino, lambda: caller_from_context(ctx))
            entry = self._entry(layer, self._current_attr(inode, layer, ino))
        return entry

    @fuse_handler()
    async def readlink(self, inode, ctx):
        layer, ino = self._target(inode)
        return self.store.readlink(layer, ino)

    # -- directories ----------------------------------------------------------

    @fuse_handler()
    async def opendir(self, inode, ctx):
        if KERNEL_CACHES and self.kernel_skips_opendir:
            # The kernel then sends no more opendir or releasedir, keeps
            # each listing, and reads directories with readdir_node.
            raise pyfuse3.FUSEError(errno.ENOSYS)
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
            opened.listing = self._listing(opened.layer, opened.ino)
        self._reply_entries(opened.node, opened.layer, opened.listing, start_id, token)

    @fuse_handler(operation="readdir")
    async def readdir_node(self, node, start_id, token):
        """Read a directory without a handle (KERNEL_CACHES).

        The kernel keeps what it reads, so each directory is listed about
        once. The listing taken at offset 0 serves the requests that follow
        it, as a handle's would.
        """
        if node == pyfuse3.ROOT_INODE:
            layer, ino = None, ROOT_INO
        else:
            layer, ino = self._target(node)
        listing = self._listings.pop(node, None)
        if start_id == 0 or listing is None:
            listing = self._listing(layer, ino)
        if not self._reply_entries(node, layer, listing, start_id, token):
            self._listings[node] = listing
            while len(self._listings) > LISTINGS_KEPT:
                del self._listings[next(iter(self._listings))]

    def _listing(self, layer: int | None, ino: int) -> list:
        """Return the (offset, name, item) entries of a directory, in offset order.

        "." and ".." come first, as Linux lists them, at offsets 1 and 2.
        Every other offset comes from a hash of the name, as on ext4, so a
        read that resumes at an offset after the directory changed skips no
        entry it had not reached and sends none twice.
        """
        if layer is None:
            # Set before the layers are read, so that a layer created or
            # removed meanwhile is either in this listing or drops it.
            self.root_listed = True
            layers = self.store.list_layers()
            entries = [(os.fsencode(layer.id), layer) for layer in layers]
        else:
            entries = self.store.readdir(layer, ino)
        listing = [(_name_offset(name), name, item) for name, item in entries]
        listing.sort(key=lambda entry: entry[0])
        return [(1, b".", _DOT), (2, b"..", _DOT)] + listing

    def _reply_entries(self, node: int, layer: int | None, listing: list, start_id: int,
                       token) -> bool:  # fmt: skip
        """Give the kernel the entries past offset ``start_id``; True if it took the last one."""
        first = bisect.bisect_right(listing, start_id, key=lambda entry: entry[0])
        for offset, name, item in listing[first:]:
            if item is _DOT:
                # The kernel takes no reference to "." or ".." of a listing.
                entry = self._node_entry(node) if name == b"." else self._parent_entry(node)
                if not pyfuse3.readdir_reply(token, name, entry, offset):
                    return False
                continue
            if layer is None:
                try:
                    # The kernel gets no lasting entry from a listing, so the
                    # first walk into a layer still sends a lookup, which
                    # records the layer in stats.layers_looked_up.
                    entry = self._layer_entry(item, entry_timeout=0)
                except errors.NotFound:
                    continue  # removed since the listing was taken
            else:
                try:
                    entry = self._entry(layer, item)
                except errors.LayerNotFound:
                    # Removed since the listing was taken. The entries given
                    # so far were counted, so the kernel must get them.
                    return True
            if not pyfuse3.readdir_reply(token, name, entry, offset):
                if entry.st_ino not in self.lookup_counts:
                    self._attrs.pop(entry.st_ino, None)  # the kernel did not take it
                return False
            # readdirplus gives the kernel a reference to every entry it takes.
            self._remember(entry.st_ino)
        return True

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
        self._expire_attributes(parent_inode)
        return self._remembered_entry(layer, attr)

    @fuse_handler(modifies=True)
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        layer, dir_ino = self._target(parent_inode)
        mode, gid = self._new_owner(layer, dir_ino, mode, ctx)
        attr = self.store.mknod(layer, dir_ino, name, mode, rdev, ctx.uid, gid)
        self._expire_attributes(parent_inode)
        return self._remembered_entry(layer, attr)

    @fuse_handler(modifies=True)
    async def symlink(self, parent_inode, name, target, ctx):
        layer, dir_ino = self._target(parent_inode)
        _, gid = self._new_owner(layer, dir_ino, stat.S_IFLNK, ctx)
        attr = self.store.symlink(layer, dir_ino, name, target, ctx.uid, gid)
        self._expire_attributes(parent_inode)
        return self._remembered_entry(layer, attr)

    @fuse_handler(modifies=True)
    async def link(self, inode, new_parent_inode, new_name, ctx):
        layer, ino = self._target(inode)
        if self._is_frozen(layer):
            self._retry_if_shared(inode, layer, ino, ctx)
        layer, ino, new_dir_ino = self._same_layer(inode, new_parent_inode)
        attr = self.store.link(layer, ino, new_dir_ino, new_name)
        self._expire_attributes(new_parent_inode)
        return self._remembered_entry(layer, attr)

    @fuse_handler(modifies=True)
    async def unlink(self, parent_inode, name, ctx):
        layer, dir_ino = self._target(parent_inode)
        self.store.unlink(layer, dir_ino, name)
        self._expire_attributes(parent_inode)

    @fuse_handler(modifies=True)
    async def rmdir(self, parent_inode, name, ctx):
        layer, dir_ino = self._target(parent_inode)
        removed = self.store.lookup(layer, dir_ino, name)
        referenced = self._directory_to_keep(layer, removed)
        self.store.rmdir(layer, dir_ino, name)
        self._keep_removed_directory(layer, referenced)
        self._expire_attributes(parent_inode)

    def _directory_to_keep(self, layer: int, attr) -> tuple[int, dict[bytes, bytes]] | None:
        """Return (node, xattrs) of a directory to be removed, if the kernel references it.

        Call it before the removal, which deletes the xattrs from the store.
        """
        node = self.store.existing_node(layer, attr.ino)
        if node not in self.lookup_counts or node not in self._attrs:
            return None
        xattrs = {}
        if attr.has_xattrs:
            for name in self.store.listxattr(layer, attr.ino):
                xattrs[name] = self.store.getxattr(layer, attr.ino, name)
        return node, xattrs

    def _keep_removed_directory(self, layer: int,
                                referenced: tuple[int, dict[bytes, bytes]] | None) -> None:  # fmt: skip
        """Set the ctime of a removed directory that the kernel references, and keep its xattrs.

        ext4 and tmpfs set the ctime at the removal, and fstat(2) of an open
        removed directory shows it (``_removed_directory``). The xattrs go
        to ``_removed_xattrs`` only when the store deleted the directory's
        record. A directory that an ancestor layer also has keeps a record
        with no links, which serves its attributes and xattrs as before.
        """
        if referenced is None:
            return
        node, xattrs = referenced
        cached = self._attrs[node]
        attr = dataclasses.replace(cached[0], ctime_ns=time.time_ns())
        self._attrs[node] = (attr, cached[1])
        try:
            self.store.getattr(layer, attr.ino)
        except errors.NotFound:
            self._removed_xattrs[node] = xattrs

    @fuse_handler(modifies=True)
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new,
                     flags, ctx):
        if flags & ~RENAME_FLAGS:
            raise pyfuse3.FUSEError(errno.EINVAL)
        layer, old_dir, new_dir = self._same_layer(parent_inode_old, parent_inode_new)
        uid = gid = 0
        if flags & RENAME_WHITEOUT:
            # The whiteout is a new inode, owned as one from mknod would be.
            uid = ctx.uid
            _, gid = self._new_owner(layer, old_dir, stat.S_IFCHR, ctx)
        referenced = None
        if not flags & pyfuse3.RENAME_EXCHANGE and (old_dir, name_old) != (new_dir, name_new):
            try:
                replaced = self.store.lookup(layer, new_dir, name_new)
            except errors.NotFound:
                pass
            else:
                if stat.S_ISDIR(replaced.mode):
                    referenced = self._directory_to_keep(layer, replaced)
        self.store.rename(layer, old_dir, name_old, new_dir, name_new, flags, uid, gid)
        self._keep_removed_directory(layer, referenced)
        # The rename set the ctime of the file it moved, and of both files
        # that RENAME_EXCHANGE swapped.
        moved = [self.store.lookup(layer, new_dir, name_new)]
        if flags & pyfuse3.RENAME_EXCHANGE:
            moved.append(self.store.lookup(layer, old_dir, name_old))
        moved_nodes = [self.store.existing_node(layer, attr.ino) for attr in moved]
        self._expire_attributes(*{parent_inode_old, parent_inode_new},
                                *[node for node in moved_nodes if node is not None])

    # -- files ----------------------------------------------------------------

    def _open(self, node: int, layer: int, ino: int, flags: int, ctx):
        # A descriptor opened write-only can never be memory-mapped, so with
        # DIRECT_IO_WRITE_ONLY it skips the page cache: no cache pollution,
        # and the kernel sends no getxattr of security.capability before
        # every write. Any other descriptor may back a MAP_SHARED mapping,
        # which FUSE refuses (ENODEV) on a direct I/O file.
        direct_io = (self.settings.direct_io == DIRECT_IO_WRITE_ONLY
                     and flags & os.O_ACCMODE == os.O_WRONLY)  # fmt: skip
        open_file = OpenFile(node, layer, ino, direct_io, ctx)
        open_file.shared = self.settings.share_unchanged and self._is_frozen(layer)
        kept = self._attrs.get(node)
        writes = flags & os.O_ACCMODE != os.O_RDONLY
        if writes and kept is not None and kept[0].mode & PRIVILEGE_BITS:
            # Read the credentials now, while the opener surely still runs.
            open_file.caller = caller_from_context(ctx)
        handle = self._new_handle()
        self._files[handle] = open_file
        self._open_counts[node] = self._open_counts.get(node, 0) + 1
        return pyfuse3.FileInfo(fh=handle, direct_io=direct_io, keep_cache=True)

    @fuse_handler()
    async def open(self, inode, flags, ctx):
        if self.skip_opens:
            # The kernel stops sending OPEN and RELEASE (fc->no_open, Linux
            # fs/fuse/file.c) and opens this file and every later one itself.
            raise pyfuse3.FUSEError(errno.ENOSYS)
        layer, ino = self._target(inode)
        writes = flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC
        if writes and self._is_frozen(layer):
            self._retry_if_shared(inode, layer, ino, ctx)
            raise pyfuse3.FUSEError(errno.EROFS)
        # libfuse negotiates atomic O_TRUNC, so the kernel leaves the
        # truncate to this handler.
        if flags & os.O_TRUNC and stat.S_ISREG(self.store.getattr(layer, ino).mode):
            self.dirty = True
            self._drop_privileges(inode, layer, ino, lambda: caller_from_context(ctx))
            attr = self.store.setattr(layer, ino, size=0, mtime_ns=time.time_ns())
            self._keep_attr(inode, layer, attr)
        return self._open(inode, layer, ino, flags, ctx)

    @fuse_handler(modifies=True)
    async def create(self, parent_inode, name, mode, flags, ctx):
        if self.skip_opens:
            # The kernel sends MKNOD from now on, and opens the new file
            # without an OPEN, so it sends no RELEASE for it either.
            raise pyfuse3.FUSEError(errno.ENOSYS)
        layer, dir_ino = self._target(parent_inode)
        mode, gid = self._new_owner(layer, dir_ino, mode, ctx)
        attr = self.store.mknod(layer, dir_ino, name, mode, 0, ctx.uid, gid)
        self._expire_attributes(parent_inode)
        entry = self._entry(layer, attr)
        file_info = self._open(entry.st_ino, layer, attr.ino, flags, ctx)
        self._remember(entry.st_ino)
        return file_info, entry

    @fuse_handler()
    async def read(self, fh, off, size):
        if self.skip_opens:
            layer, ino = self._target(fh)
            return self.store.read(layer, ino, off, size)
        open_file = self._files[fh]
        # The kernel caches a shared file's pages for every layer, so a
        # second copy in the device's page cache would only double them.
        return self.store.read(open_file.layer, open_file.ino, off, size,
                               drop_cache=open_file.shared)  # fmt: skip

    @fuse_handler(modifies=True)
    async def write(self, fh, off, buf):
        if self.skip_opens:
            return self._write_node(fh, off, buf)
        open_file = self._files[fh]
        # NOTE: pyfuse3 passes no request context to write, so the opener's
        # credentials stand in for the writer's. The kernel removes
        # security.capability before a buffered write, but with
        # FUSE_HANDLE_KILLPRIV_V2 it stops looking on a file once it has
        # found none there, so the handler removes it too.
        if not self._is_writeback() and self._drop_privileges(
            open_file.node, open_file.layer, open_file.ino,
            lambda: self._opener_credentials(open_file),
        ):
            self._drop_cached_attributes(open_file.node)
        return self._store_write(open_file.layer, open_file.ino, off, buf)

    def _write_node(self, node: int, off: int, buf: bytes) -> int:
        """Write through a node that the kernel opened without asking (skip_opens)."""
        layer, ino = self._target(node)
        if self._is_frozen(layer):
            # The kernel opened the file for writing without asking, so a
            # write through a shared mapping has already changed its cached
            # pages. They are dropped, so that readers get the stored data.
            if self.invalidate_node is not None:
                self.invalidate_node(node)
            raise pyfuse3.FUSEError(errno.EROFS)
        if not self._is_writeback() and self._drop_privileges(
            node, layer, ino, self._writer_credentials
        ):
            self._drop_cached_attributes(node)
        return self._store_write(layer, ino, off, buf)

    @staticmethod
    def _drop_cached_attributes(node: int) -> None:
        """Make the kernel fetch a node's attributes again after lcfs dropped setuid or setgid.

        After a WRITE or FALLOCATE the kernel drops its cached times and
        size but keeps the mode, because it leaves setuid to the daemon
        (FUSE_HANDLE_KILLPRIV_V2). Dropping only attributes touches no
        page, so it cannot wait for a request that this thread must serve.
        """
        try:
            pyfuse3.invalidate_inode(node, attr_only=True)
        except FileNotFoundError:
            pass  # the kernel has forgotten the node

    @staticmethod
    def _expire_attributes(*nodes: int) -> None:
        """Make the kernel discard attributes of changed nodes that a late reply carries.

        Call it before the reply to a change to the entries of directories,
        for the directories and for the files that a rename moves, and to
        a change of a node's xattrs. On that reply the kernel drops its
        cached attributes of those nodes but does not advance their
        version. Linux does so in fuse_dir_changed and fuse_update_ctime
        (fs/fuse/dir.c), and the tests show it on 6.18. A getattr, lookup
        or readdirplus reply that lcfs built before the change, and that
        its requester takes after it, then puts the old nlink, mtime and
        ctime back for the whole timeout. This notice advances the
        version, so the kernel discards such a reply.
        """
        for node in nodes:
            LayerOperations._drop_cached_attributes(node)

    @fuse_handler(modifies=True)
    async def fallocate(self, node, mode, offset, length, ctx):
        """Punch a hole (FALLOC_FL_PUNCH_HOLE with FALLOC_FL_KEEP_SIZE); other modes fail.

        Blocks are allocated when data is written, so the modes that
        reserve space or zero a range get EOPNOTSUPP, after which glibc's
        posix_fallocate writes zeros itself. A punch drops setuid, setgid
        and file capabilities as a write does, as on ext4 and tmpfs.
        """
        if mode != PUNCH_HOLE_MODE:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        layer, ino = self._target(node)
        if self._is_frozen(layer):
            raise pyfuse3.FUSEError(errno.EROFS)
        if self._drop_privileges(node, layer, ino, lambda: caller_from_context(ctx)):
            self._drop_cached_attributes(node)
        self.store.punch_hole(layer, ino, offset, length)

    @fuse_handler()
    async def lseek(self, node, offset, whence):
        """Find data or a hole from the file's extent map (SEEK_DATA, SEEK_HOLE).

        NOTE: the kernel sends LSEEK without writing back dirty pages first,
        so data written through a shared mapping seeks as a hole until
        msync(2) or the kernel's writeback stores it. tmpfs and ext4 report
        it as data at once.
        """
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise pyfuse3.FUSEError(errno.EINVAL)
        if offset < 0:
            # ext4 and tmpfs reject a negative offset with ENXIO, not
            # EINVAL (measured on Linux 6.18).
            raise pyfuse3.FUSEError(errno.ENXIO)
        layer, ino = self._target(node)
        return self.store.seek(layer, ino, offset, hole=whence == os.SEEK_HOLE)

    def _is_writeback(self) -> bool:
        """Tell whether the WRITE being served writes back pages of a shared mapping.

        Linux drops setuid, setgid and security.capability on write(2) and
        truncate, but not when a mapping's pages are written back.
        """
        return self.write_context is not None and bool(self.write_context()[3] & FUSE_WRITE_CACHE)

    def _store_write(self, layer: int, ino: int, off: int, buf: bytes) -> int:
        """Write to the store, and on ENOSPC commit blocks freed since the last commit and write again."""
        try:
            return self.store.write(layer, ino, off, buf)
        except errors.NoSpace:
            if not self.store.pending_free_blocks:
                raise
        # Freed blocks become free only when the commit that frees them is
        # done, so a write right after a large delete would fail without it.
        log.info("write of %d bytes to inode %d of layer %d found no space; committing "
                 "%d freed blocks and trying again", len(buf), ino, layer,
                 self.store.pending_free_blocks)  # fmt: skip
        self._commit_now()
        return self.store.write(layer, ino, off, buf)

    def _writer_credentials(self) -> Caller:
        uid, gid, pid, _ = self.write_context()
        return caller_from_context(RequestIds(uid, gid, pid))

    @staticmethod
    def _opener_credentials(open_file: OpenFile) -> Caller:
        if open_file.caller is None:
            open_file.caller = caller_from_context(open_file.opener)
        return open_file.caller

    @fuse_handler()
    async def flush(self, fh):
        # Data reaches the store on every write, and durability is fsync's
        # job, so close(2) has nothing to do here. ENOSYS makes the kernel
        # stop sending FLUSH for the whole mount (fc->no_flush, Linux
        # fs/fuse/file.c) and return 0 from close. That saves one round trip
        # per close: a warm `tar cf - /usr` in a container sent 4,695 FLUSH
        # requests out of 18,209.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @fuse_handler()
    async def fsync(self, fh, datasync):
        self._commit_now()

    @fuse_handler()
    async def release(self, fh):
        open_file = self._files.pop(fh)
        node = open_file.node
        remaining = self._open_counts.get(node, 0) - 1
        if remaining > 0:
            self._open_counts[node] = remaining
            return
        self._open_counts.pop(node, None)
        if self.settings.invalidate_on_close:
            # invalidate_inode blocks until the kernel has dropped the pages,
            # which may wait for a request that this loop must serve.
            await trio.to_thread.run_sync(self._invalidate_cache, node)

    def _invalidate_cache(self, node: int) -> None:
        """Drop the kernel's cached pages and attributes of a node; runs on a worker thread."""
        try:
            pyfuse3.invalidate_inode(node, attr_only=False)
        except FileNotFoundError:
            pass  # the kernel has forgotten the node already
        except OSError as exc:
            log.warning("dropping the page cache of node %d failed: %s", node, exc)

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
        # Inode numbers past the store's nominal count leave free_files
        # negative, which statvfs cannot carry.
        free_files = max(usage.free_files, 0)
        result.f_files = max(usage.files, free_files)
        result.f_ffree = free_files
        result.f_favail = free_files
        result.f_namemax = 255
        return result
