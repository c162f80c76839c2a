"""The layer store: one device, many copy-on-write layers.

Concurrency: every public method takes ``Store.lock``. All LMDB access goes
through one long-lived write transaction (the group transaction) that
``commit`` makes durable. Each modifying call runs in a nested transaction of
the group, so a call that fails part way leaves nothing behind. LMDB is
opened without its own lock file, so the store takes an exclusive ``flock``
on the device for as long as it is open.

Invariants every change keeps:

* a layer with children is frozen, and nothing changes the records of a
  frozen layer;
* every record a layer owns (inode, entry, xattr, extent) is named by that
  layer's change log, so removing a layer or diffing it walks the log only;
* data blocks are written before the metadata that maps them is committed,
  and a block mapped by an extent that its layer does not own is never
  written to.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import lmdb

from lcfs.journal import intents
from lcfs.journal.crash import crash_point

from . import errors
from .alloc import Allocator
from .data import DataMixin
from .format import (
    BLOCK_SIZE,
    ROOT_INO,
    U64,
    U64X2,
    Inode,
    Layer,
    change_inode_key,
    check_database_list,
    device_size,
    is_under_dev,
    inode_key,
    missing_device_message,
    open_databases,
    open_env,
    read_superblock,
)
from .namespace import NamespaceMixin
from .snapshots import SnapshotMixin, is_snapshot_layer
from .tar import TarMixin

log = logging.getLogger(__name__)

# Frozen-layer lookups are cached; the caches are dropped when they grow past this.
CACHE_LIMIT = 200_000
# Records removed per LMDB commit while a layer is purged.
PURGE_BATCH = int(os.environ.get("LCFS_PURGE_BATCH", "5000"))
# Pages of the metadata area (LMDB's map) kept free for commits and for
# operations that free space. LMDB needs free pages to commit, and to
# delete, since it copies every page it changes. Without them a full map
# fails the group commit, which loses every change since the last one.
RESERVE_PAGES = 64
# Once fewer pages than this may be free, every growing operation first
# checks that the reserve is there (``Store._check_reserve``).
LOW_SPACE_PAGES = 1024
# Growing operations between two estimates of the free pages.
ESTIMATE_EVERY = 16
# Metadata pages past LMDB's last page that the store keeps allocated in
# the file system under an image file (``Store._reserve_host_space``).
HOST_HEADROOM_PAGES = 16 * LOW_SPACE_PAGES

# Keys in the meta database, each followed by a packed layer number: a
# change mark (``mark_changed_layers``) and a record of changes lost when
# the daemon stopped before committing them (``lost_changes``).
CHANGE_MARK = b"change-mark:"
LOST_CHANGES = b"lost-changes:"
# A value this size takes one overflow page of its own, so each probe put
# needs a free page but never a run of them.
_PROBE_VALUE = bytes(2560)


@dataclass(slots=True, frozen=True)
class StatFs:
    block_size: int
    total_blocks: int
    free_blocks: int
    files: int
    free_files: int


def write_op(fn):
    """Run a modifying method in a nested transaction that is aborted if it raises."""
    return _nested_write(fn, changes_files=True)


def freeing_op(fn):
    """Run a method like ``write_op`` that may use the metadata reserve.

    For the steps that free space (removing a layer, rolling back an
    import, finishing an intent), so they work on a full metadata area.
    """
    return _nested_write(fn, changes_files=True, frees=True)


def bookkeeping_op(fn):
    """Run a method like ``write_op`` for records outside the layers' contents.

    Such a record (a node id allocated by a lookup) is committed with the
    next group but does not make the store ``dirty``, so a Put does not
    sync the device for it. It may use the metadata reserve, so that
    lookups keep working on a full metadata area.
    """
    return _nested_write(fn, changes_files=False, frees=True)


def _nested_write(fn, changes_files: bool, frees: bool = False):
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        with self.lock:
            if self._nested is not None:
                return fn(self, *args, **kwargs)
            group = self._group_txn()
            if not frees:
                self._guard_reserve(group)
            nested = self.env.begin(write=True, parent=group)
            self._txn = self._nested = nested
            free_before = self.alloc.free_blocks
            pending_mark = len(self.alloc.pending)
            undo_mark = len(self._undo)
            try:
                result = fn(self, *args, **kwargs)
                nested.commit()
            except BaseException as exc:
                # LMDB has already ended a nested transaction whose commit failed.
                nested.abort()
                self.alloc.free_blocks = free_before
                del self.alloc.pending[pending_mark:]
                while len(self._undo) > undo_mark:
                    self._undo.pop()()
                if isinstance(exc, lmdb.MapFullError):
                    self._reserve_low = True
                    raise self._metadata_full() from None
                raise
            else:
                self._uncommitted = True
                self._group_ops += 1
                if changes_files:
                    self._dirty = True
                return result
            finally:
                self._txn = group
                self._nested = None
                del self._undo[undo_mark:]

    return wrapper


def read_op(fn):
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        with self.lock:
            if self._txn is None:
                self._txn = self._group_txn()
            return fn(self, *args, **kwargs)

    return wrapper


def lock_holder(path: str) -> int | None:
    """Return the pid holding a flock on ``path``, from /proc/locks, if any."""
    try:
        st = os.stat(path)
        with open("/proc/locks") as f:
            lines = f.readlines()
    except OSError:
        return None
    wanted = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    for line in lines:
        parts = line.split()
        if len(parts) < 6 or parts[1] != "FLOCK":
            continue
        try:
            major, minor, lock_ino = parts[5].split(":")
            if (int(major, 16), int(minor, 16), int(lock_ino)) == wanted:
                return int(parts[4])
        except ValueError:
            continue
    return None


def describe_holder(holder: int | None) -> str:
    """Return "pid N (COMMAND LINE)" of the process ``holder`` from lock_holder, for messages."""
    if holder is None:
        return "another process, which has ended or is not visible here"
    try:
        with open(f"/proc/{holder}/cmdline", "rb") as f:
            command = f.read().replace(b"\0", b" ").strip()
    except OSError:
        return f"pid {holder}"
    if not command:
        return f"pid {holder}"
    return f"pid {holder} ({command.decode('utf-8', 'replace')})"


# fallocate(2) mode that deallocates a range of a file and keeps its size:
# FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE (linux/falloc.h).
PUNCH_HOLE_MODE = 0x02 | 0x01
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate ``length`` bytes at ``offset`` of a file; raise OSError on failure."""
    _fallocate(fd, PUNCH_HOLE_MODE, offset, length)


def allocate(fd: int, offset: int, length: int) -> None:
    """Allocate the holes in ``length`` bytes at ``offset`` of a file; raise OSError on failure."""
    _fallocate(fd, 0, offset, length)


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


class Store(NamespaceMixin, DataMixin, TarMixin, SnapshotMixin):
    """An open store. Create one with ``Store.open``; see the module docstring."""

    block_size = BLOCK_SIZE
    readonly = False

    def __init__(self, path: str, fd: int, superblock: dict):
        self.path = path
        self.fd = fd
        # Opened on the first read that drops its pages (DataMixin.read).
        self._uncached_fd: int | None = None
        self.superblock = superblock
        self.metadata_size = superblock["metadata_size"]
        self.data_blocks = superblock["data_blocks"]
        self.data_offset = self.metadata_size
        self.lock = threading.RLock()
        self.env = open_env(path, self.metadata_size)
        self._group = None
        self._txn = None
        self._nested = None
        self._undo: list = []
        # Whether data blocks were written since the last fdatasync of the
        # device (DataMixin._pwrite sets it).
        self._data_unsynced = True
        # Whether commits give freed blocks back to the file system under an
        # image file (_give_back); a block device keeps them.
        self._punch_holes = stat.S_ISREG(os.fstat(fd).st_mode)
        # Metadata pages, from the start, known to have blocks in the file
        # system under an image file (_reserve_host_space). None on a block
        # device, where every page has its blocks.
        self._host_pages: int | None = 0 if self._punch_holes else None
        self._host_full = False
        # Called after a layer is created or dropped; the FUSE mount sets it.
        self.layers_changed = None
        self._dirty = False
        self._uncommitted = False
        try:
            with self.env.begin(write=True) as txn:
                # A list out of order would make open_databases find wrong or
                # empty databases and create the ones it misses.
                check_database_list(path, txn)
                self.dbs = open_databases(self.env, txn)
        except errors.FormatError:
            self.env.close()
            raise
        self.alloc = Allocator(self.dbs["free"], self.data_blocks, path)
        self._layers: dict[int, Layer] = {}
        self._ids: dict[str, int] = {}
        self._children: dict[int, set[int]] = {}
        self._ancestors: dict[int, dict[int, int]] = {}
        self._inode_cache: dict[tuple[int, int], tuple[int, bytes]] = {}
        self._entry_cache: dict[tuple[int, int, bytes], tuple[int, int] | None] = {}
        # The number of directory entries removed in any layer. An apply that
        # caches directory paths drops the cache when this number changes.
        self.entry_removals = 0
        self._nodes: dict[int, tuple[int, int]] = {}
        self._node_keys: dict[tuple[int, int], int] = {}
        # layer -> {ino: pin count}. The FUSE mount pins every regular file
        # whose node the kernel references, so a layer's pins go together.
        self._pins: dict[int, dict[int, int]] = {}
        # (layer, ino) of unlinked files still pinned -> the number of the
        # intent that records them, or None until a commit writes it.
        self._orphans: dict[tuple[int, int], int | None] = {}
        self._applying: dict[int, int] = {}
        self._xattr_names: set[bytes] = set()
        # The layer whose Diff finished last: ApplyDiff maps its blocks when the tar matches.
        self._last_diff: int | None = None
        self._closed = False
        self._page_size = self.env.stat()["psize"]
        # Free pages of the metadata area: an estimate made at the last
        # commit, the pages live then, and the growing operations since.
        self._free_pages = 0
        self._live_pages = 0
        self._growing_ops = 0
        # Operations in the open group, for ``group_is_large``.
        self._group_ops = 0
        # Set when fewer than LOW_SPACE_PAGES pages may be free, so that
        # every growing operation checks the reserve first.
        self._reserve_low = False
        # The reason a group commit failed. The changes it carried are lost
        # and the in-memory state no longer matches the device, so every
        # later operation fails until the store is opened again.
        self._failure: str | None = None
        # Writable layers that an operation changed in the open group, the
        # layers with a durable change mark, and the marks the open group adds.
        self._group_layers: set[int] = set()
        self._marked_layers: set[int] = set()
        self._new_marks: set[int] = set()
        # Layer number -> the time (ns) at which the store was opened after
        # a stop that may have lost changes to that layer.
        self._lost_changes: dict[int, int] = {}

    # -- opening and closing -------------------------------------------------

    @classmethod
    def mkfs(cls, path: str, size: int | None = None, metadata_size: int | None = None,
             force: bool = False) -> dict:  # fmt: skip
        from .format import mkfs

        holder = lock_holder(path) if os.path.exists(path) else None
        if holder is not None:
            raise errors.DeviceBusy(f"{path} is in use by {describe_holder(holder)}")
        superblock = mkfs(path, size, metadata_size, force)
        log.info("formatted %s: %d data blocks, %d bytes of metadata", path,
                 superblock["data_blocks"], superblock["metadata_size"])  # fmt: skip
        return superblock

    @classmethod
    def open(cls, path: str, recover: bool = True, readonly: bool = False,
             for_fsck: bool = False) -> Store:  # fmt: skip
        """Open the store on ``path``, lock it, and recover unfinished operations.

        ``readonly`` never commits anything (fsck without --repair). A store
        whose last repair was interrupted opens only ``for_fsck``.
        """
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            if is_under_dev(path):
                raise errors.NotFound(missing_device_message(path)) from None
            raise errors.NotFound(
                f"{path} does not exist; create it with 'lcfs mkfs --size SIZE {path}'"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = describe_holder(lock_holder(path))
            raise errors.DeviceBusy(f"{path} is in use by {holder}") from None
        try:
            superblock = read_superblock(path)
            if superblock is None or superblock.get("magic") != "lcfs":
                raise errors.FormatError(
                    f"{path} holds no lcfs store; check that it is the right device, "
                    f"then format it with 'lcfs mkfs {path}' (mkfs asks for --force "
                    "if it contains data, which formatting destroys)"
                )
            if superblock["format"] != 1:
                raise errors.FormatError(
                    f"{path}: unsupported format version {superblock['format']}"
                )
            needed = (
                superblock["metadata_size"] + superblock["data_blocks"] * BLOCK_SIZE
            )
            if device_size(fd) < needed:
                raise errors.FormatError(
                    f"{path} is smaller than its store ({needed} bytes)"
                )
            if superblock.get("needs_fsck") and not for_fsck:
                raise errors.FormatError(
                    f"{path} was left mid-repair by lcfs-fsck; run 'lcfs-fsck --repair {path}' first"
                )
            store = cls(path, fd, superblock)
            store.readonly = readonly
        except BaseException:
            os.close(fd)
            raise
        try:
            store._load()
            if recover:
                store._recover()
        except BaseException:
            store.close()
            raise
        log.info("opened %s: %d layers, %d of %d data blocks free", path, len(store._layers),
                 store.alloc.free_blocks, store.data_blocks)  # fmt: skip
        return store

    def _load(self) -> None:
        with self.lock:
            txn = self._txn = self._group_txn()
            for layer in self._read_layers(txn):
                self._layers[layer.number] = layer
                self._ids[layer.id] = layer.number
            for key, _ in txn.cursor(db=self.dbs["children"]):
                parent, child = U64X2.unpack(key)
                self._children.setdefault(parent, set()).add(child)
            for layer in self._layers.values():
                if layer.parent is not None:
                    parent = self._layers.get(layer.parent)
                    if parent is None:
                        raise errors.FormatError(
                            f"{self.path}: layer {layer.id} names missing parent {layer.parent}; "
                            f"run 'lcfs-fsck --repair {self.path}'"
                        )
                    layer.parent_id = parent.id
            self.alloc.count(txn)
            self._load_xattr_names()
            self._load_change_marks(txn)
            if not self.readonly:
                self._set_state("dirty")
        if not self.readonly:
            self.commit()

    def _load_change_marks(self, txn) -> None:
        """Turn change marks left by a process that ended without committing into lost-change records.

        A layer keeps a durable change mark while a container may change
        it (``mark_layer``, ``mark_changed_layers``), so a mark found at
        open means that the last process ended while changes to the layer
        may have been waiting for a commit.
        """
        meta = self.dbs["meta"]
        for key, value in list(self._prefix_items(meta, LOST_CHANGES)):
            self._lost_changes[U64.unpack(key[len(LOST_CHANGES):])[0]] = U64.unpack(value)[0]
        now = time.time_ns()
        snapshot_names = None
        for key, _ in list(self._prefix_items(meta, CHANGE_MARK)):
            number = U64.unpack(key[len(CHANGE_MARK):])[0]
            layer = self._layers.get(number)
            if not self.readonly:
                txn.delete(key, db=meta)
            if layer is None or layer.frozen:
                continue
            described = layer.id
            if is_snapshot_layer(layer.id):
                # containerd's users know the snapshot by its name, not by
                # the id of its layer.
                if snapshot_names is None:
                    snapshot_names = self._snapshot_names_by_layer(txn)
                name = snapshot_names.get(layer.id)
                if name is not None:
                    described = f"{layer.id} (containerd snapshot {name})"
            log.warning(
                "layer %s may have lost the changes made through the mount in "
                "the last second before the process that had %s open ended "
                "without committing them", described, self.path)  # fmt: skip
            self._lost_changes[number] = now
            if not self.readonly:
                txn.put(LOST_CHANGES + U64.pack(number), U64.pack(now), db=meta)

    def _read_layers(self, txn) -> list[Layer]:
        """Decode every layer record, in one JSON parse when all are well formed.

        One parse of all records takes a fifth of the time of one parse per
        record, which is most of the open time of a store of 10,000 layers.
        Any record that does not decode sends every record through
        ``Layer.unpack``, which names the unreadable one.
        """
        numbers, raws = [], []
        for key, value in txn.cursor(db=self.dbs["layers"]):
            numbers.append(U64.unpack(key)[0])
            raws.append(bytes(value))
        try:
            records = json.loads(b"[" + b",".join(raws) + b"]")
            if len(records) == len(raws):
                return [
                    Layer(
                        number,
                        rec["id"],
                        rec["parent"],
                        rec["depth"],
                        rec["frozen"],
                        rec["created"],
                        rec["state"],
                    )
                    for number, rec in zip(numbers, records, strict=True)
                ]
        except (ValueError, KeyError, TypeError):
            pass
        layers = []
        for number, raw in zip(numbers, raws, strict=True):
            try:
                layers.append(Layer.unpack(number, raw))
            except (ValueError, KeyError) as exc:
                raise errors.FormatError(
                    f"{self.path}: layer record {number} is unreadable ({exc}); "
                    f"run 'lcfs-fsck --repair {self.path}'"
                ) from None
        return layers

    def _recover(self) -> None:
        from lcfs.journal.recovery import recover

        recover(self)

    def _set_state(self, state: str, **fields) -> None:
        self.superblock["state"] = state
        self.superblock.update(fields)
        self._txn.put(
            b"super", json.dumps(self.superblock).encode(), db=self.dbs["meta"]
        )

    def close(self) -> None:
        """Commit, mark the store clean and release the device."""
        with self.lock:
            if self._closed:
                return
            try:
                if self._nested is None and not self.readonly:
                    self._txn = self._group_txn()
                    self._set_state("clean")
                    # This commit contains every change, so no mark stays.
                    for number in self._marked_layers | self._new_marks:
                        self._txn.delete(CHANGE_MARK + U64.pack(number), db=self.dbs["meta"])
                    self._marked_layers = set()
                    self._new_marks = set()
                    self.commit()
            finally:
                if self._group is not None:
                    self._group.abort()
                    self._group = None
                self.env.close()
                os.close(self.fd)
                if self._uncached_fd is not None:
                    os.close(self._uncached_fd)
                self._closed = True
            log.info("closed %s", self.path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _group_txn(self):
        if self._closed:
            raise errors.StoreError(f"store {self.path} is closed")
        if self._failure is not None:
            raise errors.StoreError(self._failure)
        if self._group is None:
            self._group = self.env.begin(write=True)
        return self._group

    def commit(self) -> None:
        """Make every change so far durable (data first, then metadata)."""
        with self.lock:
            if self._nested is not None:
                raise errors.StoreError("commit inside an operation")
            if self._group is None:
                return
            if self.readonly:
                raise errors.ReadOnly(f"store {self.path} is open read-only")
            freed = list(self.alloc.pending)
            try:
                self._record_orphans()
                self.alloc.flush(self._group)
            except lmdb.Error as exc:
                self._fail_commit(exc)
            self._reserve_host_space()
            # A commit that follows no data write (a layer created, removed
            # or renamed, a chmod) has no data to make durable first.
            if self._data_unsynced:
                self._data_unsynced = False
                os.fdatasync(self.fd)
            crash_point("commit.data_synced")
            try:
                self._group.commit()
            except lmdb.Error as exc:
                self._fail_commit(exc)
            self._group = None
            self._txn = None
            self._dirty = False
            self._uncommitted = False
            self._group_ops = 0
            self._marked_layers |= self._new_marks
            self._new_marks = set()
            self._group_layers = set()
            self._estimate_free_pages()
            self._give_back(freed)
            crash_point("commit.done")

    def _reserve_host_space(self, target: int | None = None) -> None:
        """Allocate blocks in the host file system for the metadata pages the next commits may use.

        LMDB writes the pages that a commit adds past its last page into
        the holes of a sparse image file. On a full host file system that
        write fails, and the whole group with it: the writes the mount has
        accepted since the last commit, and every later commit, because
        removing anything needs new pages too. So the store keeps
        HOST_HEADROOM_PAGES pages past LMDB's last page allocated, and
        counts only allocated pages as free (``_estimate_free_pages``):
        growing operations then fail with NoSpace while the reserve is
        still there for the operations that free space.

        ``target`` is the number of pages from the start to allocate, by
        default HOST_HEADROOM_PAGES past LMDB's last page.
        """
        if self._host_pages is None:
            return
        total = self.metadata_size // self._page_size
        # LMDB has written every page up to its last, so those have blocks.
        written = self.env.info()["last_pgno"] + 1
        self._host_pages = max(self._host_pages, written)
        if target is None:
            target = written + HOST_HEADROOM_PAGES
        target = min(total, target)
        if target <= self._host_pages:
            return
        try:
            allocate(self.fd, self._host_pages * self._page_size,
                     (target - self._host_pages) * self._page_size)  # fmt: skip
        except OSError as exc:
            if exc.errno == errno.EOPNOTSUPP:
                # The file system cannot allocate ahead, so every page of
                # the metadata area counts as free.
                self._host_pages = None
                return
            if not self._host_full:
                self._host_full = True
                log.warning("the file system holding %s is full (%s): %d of %d metadata "
                            "pages are allocated, so lcfs rejects changes that need more "
                            "until it has space again", self.path, exc, self._host_pages,
                            target)  # fmt: skip
            return
        if self._host_full:
            self._host_full = False
            log.info("the file system holding %s has space again: %d metadata pages "
                     "are allocated", self.path, target)  # fmt: skip
        self._host_pages = target

    def _give_back(self, runs: list[tuple[int, int]]) -> None:
        """Punch the data blocks that a commit freed out of an image file, so the host gets the space.

        Only after the commit is durable may the blocks go: before it, a
        crash would bring back records that map them. No allocation can
        take them in between, because the caller holds the store lock.
        Block devices keep their blocks.
        """
        if not runs or not self._punch_holes:
            return
        merged: list[list[int]] = []
        for start, count in sorted(runs):
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1][1] += count
            else:
                merged.append([start, count])
        for start, count in merged:
            try:
                punch_hole(self.fd, self.data_offset + start * BLOCK_SIZE, count * BLOCK_SIZE)
            except OSError as exc:
                self._punch_holes = False
                log.warning("punching freed blocks out of %s failed (%s); freed space "
                            "stays allocated in the file until lcfs reuses it",
                            self.path, exc)  # fmt: skip
                return

    def _record_orphans(self) -> None:
        """Write the intent of every orphan that has none into the group transaction."""
        for (layer, ino), number in self._orphans.items():
            if number is None:
                self._orphans[(layer, ino)] = intents.begin(
                    self._group, self.dbs["intents"], self.dbs["meta"], "orphan",
                    layer=layer, ino=ino,
                )  # fmt: skip

    def _fail_commit(self, exc: lmdb.Error) -> None:
        """End the group transaction after a failed commit, and fail from then on."""
        self._group.abort()
        self._group = None
        self._txn = None
        self._dirty = False
        self._uncommitted = False
        self._group_ops = 0
        self._failure = (
            f"commit of {self.path} failed ({exc}); the changes since the last "
            "commit are lost, so restart the daemon to open the store again"
        )
        log.critical("%s", self._failure)
        raise errors.StoreError(self._failure) from None

    def _count_live_pages(self, txn) -> int:
        """Count the pages of every database in ``txn``'s view, the main one included."""
        pages = 0
        for stats in [txn.stat()] + [txn.stat(db) for db in self.dbs.values()]:
            pages += stats["branch_pages"] + stats["leaf_pages"] + stats["overflow_pages"]
        # LMDB's two meta pages. The pages of its free list are estimated by
        # _estimate_free_pages.
        return pages + 2

    @read_op
    def metadata_usage(self) -> tuple[int, int]:
        """Return the bytes of the metadata area in use and its size."""
        return self._count_live_pages(self._txn) * self._page_size, self.metadata_size

    def _estimate_free_pages(self) -> None:
        """Estimate the free pages of the metadata area after a commit."""
        with self.env.begin() as txn:
            live = self._count_live_pages(txn)
        total = self.metadata_size // self._page_size
        if self._host_pages is not None:
            total = min(total, self._host_pages)
        self._live_pages = live
        # An estimate: one page of LMDB's free list holds about 500 8-byte page numbers.
        self._free_pages = (total - live) - (total - live) // 500
        self._growing_ops = 0
        self._reserve_low = self._free_pages < LOW_SPACE_PAGES

    def _guard_reserve(self, group) -> None:
        """Raise NoSpace when a growing operation could eat into the reserve.

        Between commits, the estimate counts what the open group used: the
        growth of the live pages, again as much for the copies LMDB keeps
        of the pages it changed, and two pages per operation.
        """
        if not self._reserve_low:
            self._growing_ops += 1
            if self._growing_ops % ESTIMATE_EVERY:
                return
            growth = max(0, self._count_live_pages(group) - self._live_pages)
            used = 2 * growth + 2 * self._growing_ops
            if self._free_pages - used >= LOW_SPACE_PAGES:
                return
            self._reserve_low = True
        self._check_reserve(group)

    def _check_reserve(self, group) -> None:
        """Raise NoSpace unless RESERVE_PAGES pages of the metadata area are free.

        Puts that take one page each, in a nested transaction that is then
        aborted, find out whether LMDB can still allocate the pages. LMDB
        cannot tell that pages past ``_host_pages`` have no blocks in the
        host file system, so under an image file the estimate of the pages
        the group used decides there, after an attempt to allocate more.
        """
        total = self.metadata_size // self._page_size
        if self._host_pages is not None and self._host_pages < total:
            growth = max(0, self._count_live_pages(group) - self._live_pages)
            used = 2 * growth + 2 * self._growing_ops
            if self._free_pages - used < LOW_SPACE_PAGES:
                before = self._host_pages
                self._reserve_host_space(before + HOST_HEADROOM_PAGES)
                # None: the file system cannot allocate ahead, so every page counts.
                after = total if self._host_pages is None else self._host_pages
                self._free_pages += after - before
                if self._free_pages - used < RESERVE_PAGES:
                    raise self._metadata_full()
                if self._free_pages - used >= LOW_SPACE_PAGES:
                    self._reserve_low = False
        probe = self.env.begin(write=True, parent=group)
        try:
            for number in range(RESERVE_PAGES):
                probe.put(b"reserve-probe:%d" % number, _PROBE_VALUE, db=self.dbs["meta"])
        except lmdb.MapFullError:
            raise self._metadata_full() from None
        finally:
            probe.abort()

    def _metadata_full(self) -> errors.NoSpace:
        if self._host_full:
            return errors.NoSpace(
                f"the file system holding {self.path} is full, so the store's metadata "
                "cannot grow; free space there, or remove layers, images or files"
            )
        return errors.NoSpace(
            f"the metadata area of {self.path} ({self.metadata_size} bytes) is full; "
            "remove layers, images or files to free space"
        )

    @write_op
    def _write(self, fn: Callable, *args, **kwargs):
        """Return ``fn(*args, **kwargs)``, run in one nested transaction as a write_op method is."""
        return fn(*args, **kwargs)

    @freeing_op
    def _free(self, fn: Callable, *args, **kwargs):
        """Return ``fn(*args, **kwargs)``, run as a freeing_op method is."""
        return fn(*args, **kwargs)

    @property
    def dirty(self) -> bool:
        """True while a change to the layers' contents awaits a commit."""
        return self._dirty

    @property
    def group_is_large(self) -> bool:
        """True when the open group should be committed before it grows further.

        Until the commit, LMDB keeps a copy of every page that the group
        changed. A group of a few thousand operations thus filled a 16 MiB
        metadata area whose records took 3 MB, and the commit after an
        import's rollback then failed for want of pages. The group counts
        as large once its operations may have used half of the pages free
        at the last commit, at two pages each as ``_guard_reserve``
        estimates (about one each was measured for small files).
        """
        return self._group_ops * 2 >= self._free_pages // 2

    @property
    def pending_free_blocks(self) -> int:
        """Data blocks freed since the last commit, which become free at the next."""
        return self.alloc.pending_blocks

    @property
    def uncommitted(self) -> bool:
        """True while any record awaits a commit, node ids included."""
        return self._uncommitted

    # -- settings --------------------------------------------------------------

    @read_op
    def get_meta(self, key: str) -> bytes | None:
        value = self._txn.get(b"setting:" + key.encode(), db=self.dbs["meta"])
        return bytes(value) if value is not None else None

    @write_op
    def set_meta(self, key: str, value: bytes) -> None:
        self._txn.put(b"setting:" + key.encode(), value, db=self.dbs["meta"])

    def _next_counter(self, name: bytes) -> int:
        value = U64.unpack(self._txn.get(name, db=self.dbs["meta"]))[0]
        self._txn.put(name, U64.pack(value + 1), db=self.dbs["meta"])
        return value

    @read_op
    def statfs(self) -> StatFs:
        used = self._txn.stat(self.dbs["inodes"])["entries"]
        # Inode numbers are 64-bit, so report a large fixed total that stays
        # above them. f_files of struct statfs is a signed long on x86_64, so the
        # total is the largest one it carries: 1 << 63 showed as negative.
        files = (1 << 63) - 1
        free = self.alloc.free_blocks + self.alloc.pending_blocks
        return StatFs(BLOCK_SIZE, self.data_blocks, free, files, files - used)

    # -- layers ----------------------------------------------------------------

    @read_op
    def exists(self, layer_id: str) -> bool:
        number = self._ids.get(layer_id)
        return number is not None and self._layers[number].state == "ready"

    @read_op
    def get_layer(self, layer_id: str) -> Layer:
        number = self._ids.get(layer_id)
        if number is None or self._layers[number].state != "ready":
            raise errors.LayerNotFound(f"layer {layer_id} not found")
        return self._layers[number]

    @read_op
    def layer_by_number(self, number: int) -> Layer:
        return self._layer(number)

    @read_op
    def list_layers(self) -> list[Layer]:
        return [layer for layer in self._layers.values() if layer.state == "ready"]

    @read_op
    def children(self, layer_id: str) -> list[str]:
        number = self.get_layer(layer_id).number
        return sorted(self._layers[c].id for c in self._children.get(number, ()))

    def _layer(self, number: int) -> Layer:
        layer = self._layers.get(number)
        if layer is None or layer.state != "ready":
            raise errors.LayerNotFound(f"layer number {number} not found")
        return layer

    def _writable(self, number: int) -> Layer:
        layer = self._layer(number)
        if layer.frozen:
            raise errors.ReadOnly(
                f"layer {layer.id} is read-only because a child layer was created"
                " on it, and a layer stays read-only after its children are removed"
            )
        self._group_layers.add(number)
        return layer

    # -- change marks ------------------------------------------------------------

    def mark_layer(self, layer_id: str) -> None:
        """Give a writable layer a change mark, durable with the next commit.

        A layer keeps its mark while a container may change it: from
        CreateReadWrite, whose commit makes the mark durable at no cost,
        to the Put that ends its last Get (``release_change_mark``). A
        process killed meanwhile leaves the mark, and the next open
        records that the layer may have lost changes (``lost_changes``).
        """
        with self.lock:
            self._put_change_marks({self.get_layer(layer_id).number})

    def release_change_mark(self, layer_id: str) -> None:
        """Delete a layer's change mark once no container uses it; the next commit makes that durable.

        Deleting it lazily is safe: a store with changes pending commits
        them in the same group as the deletion.
        """
        with self.lock:
            number = self._ids.get(layer_id)
            if number is not None and (number in self._marked_layers or number in self._new_marks):
                self._delete_change_mark(number)

    @bookkeeping_op
    def _delete_change_mark(self, number: int) -> None:
        self._txn.delete(CHANGE_MARK + U64.pack(number), db=self.dbs["meta"])
        self._marked_layers.discard(number)
        self._new_marks.discard(number)

    def mark_changed_layers(self) -> None:
        """Give each layer changed in the open group a durable change mark.

        The FUSE mount calls this before it replies to a request that changed
        a layer. A layer changed without a mark (outside a Get and its
        Put) gets one in a commit of the open group, before the reply.
        """
        with self.lock:
            new = self._group_layers - self._marked_layers - self._new_marks
            if new and not self.readonly:
                self._put_change_marks(new)
                self.commit()

    @bookkeeping_op
    def _put_change_marks(self, numbers: set[int]) -> None:
        for number in numbers:
            self._txn.put(CHANGE_MARK + U64.pack(number), b"", db=self.dbs["meta"])
        self._new_marks |= numbers

    def lost_changes(self, layer_id: str) -> int | None:
        """Return when the store was opened after losing changes to the layer (ns), or None."""
        with self.lock:
            number = self._ids.get(layer_id)
            return None if number is None else self._lost_changes.get(number)

    def forget_lost_changes(self, layer_id: str) -> None:
        """Drop the record of lost changes to the layer, once its user has seen its new state."""
        with self.lock:
            number = self._ids.get(layer_id)
            if number is not None and number in self._lost_changes:
                self._drop_lost_changes(number)

    @bookkeeping_op
    def _drop_lost_changes(self, number: int) -> None:
        self._txn.delete(LOST_CHANGES + U64.pack(number), db=self.dbs["meta"])
        when = self._lost_changes.pop(number)
        self._undo.append(lambda: self._lost_changes.__setitem__(number, when))

    @staticmethod
    def _check_layer_id(layer_id: str) -> None:
        if (not isinstance(layer_id, str) or not layer_id or len(layer_id) > 255 or "/" in layer_id
                or "\0" in layer_id or layer_id in (".", "..")):  # fmt: skip
            raise errors.Invalid(
                f"invalid layer id {layer_id!r}: use 1 to 255 characters without '/'"
            )

    @write_op
    def create_layer(self, layer_id: str, parent_id: str | None = None) -> Layer:
        """Create a layer that inherits ``parent_id``'s tree, in O(1), and freeze the parent."""
        self._check_layer_id(layer_id)
        if layer_id in self._ids:
            raise errors.LayerExists(f"layer {layer_id} already exists")
        parent = None
        if parent_id:
            parent = self.get_layer(parent_id)
        number = self._next_counter(b"next_layer")
        layer = Layer(number, layer_id, parent.number if parent else None,
                      parent.depth + 1 if parent else 0, created=time.time(),
                      parent_id=parent.id if parent else None)  # fmt: skip
        txn, dbs = self._txn, self.dbs
        txn.put(U64.pack(number), layer.pack(), db=dbs["layers"])
        txn.put(layer_id.encode(), U64.pack(number), db=dbs["layer_ids"])
        if parent is None:
            now = time.time_ns()
            root = Inode(ROOT_INO, stat.S_IFDIR | 0o755, nlink=2, atime_ns=now, mtime_ns=now,
                         ctime_ns=now)  # fmt: skip
            txn.put(inode_key(ROOT_INO, number), root.pack(), db=dbs["inodes"])
        else:
            txn.put(U64X2.pack(parent.number, number), b"", db=dbs["children"])
            if not parent.frozen:
                self._set_frozen(parent, True)
            self._children.setdefault(parent.number, set()).add(number)
            self._undo.append(lambda: self._children[parent.number].discard(number))
        self._layers[number] = layer
        self._ids[layer_id] = number
        self._undo.append(lambda: (self._layers.pop(number), self._ids.pop(layer_id)))
        self._layers_changed()
        log.debug(
            "created layer %s (number %d, parent %s)", layer_id, number, parent_id
        )
        crash_point("create.done")
        return layer

    def _set_frozen(self, layer: Layer, frozen: bool) -> None:
        layer.frozen = frozen
        self._txn.put(U64.pack(layer.number), layer.pack(), db=self.dbs["layers"])
        self._undo.append(
            lambda: (setattr(layer, "frozen", not frozen), self._clear_caches())
        )
        self._ancestors.pop(layer.number, None)

    def remove_layer(self, layer_id: str, commit: bool = True) -> None:
        """Remove a layer and return all of its space; atomic through the journal.

        A layer whose change log fits in one batch goes in one transaction.
        A larger one is marked first, and the store lock is released between
        the batches that free its records, so other layers stay usable
        during a long removal. The layer counts as gone from the moment it
        is marked. With ``commit`` false the last step stays in the open
        group, and the caller commits it, together with other removals.
        """
        with self.lock:
            layer = self.get_layer(layer_id)
            kids = self._children.get(layer.number)
            if kids:
                names = ", ".join(sorted(self._layers[c].id for c in kids))
                raise errors.LayerHasChildren(
                    f"layer {layer_id} has child layers: {names}"
                )
            if self._records_below(layer.number, PURGE_BATCH):
                try:
                    self._remove_at_once(layer)
                except errors.NoSpace:
                    # A full metadata area has too few free pages for LMDB to
                    # copy every page this changes; the batches below adapt.
                    log.warning("removing layer %s in small batches: the metadata area "
                                "of %s is full", layer_id, self.path)  # fmt: skip
                else:
                    if commit:
                        self.commit()
                    log.info("removed layer %s (number %d) in one transaction",
                             layer_id, layer.number)  # fmt: skip
                    return
            self._mark_removing(layer)
            self.commit()
        crash_point("remove.marked")
        self._purge(layer.number)
        crash_point("remove.dropping")
        with self.lock:
            self._drop_layer(layer)
            if commit:
                self.commit()
        log.info("removed layer %s (number %d)", layer_id, layer.number)

    def _records_below(self, number: int, limit: int) -> bool:
        """Tell whether layer ``number`` has fewer than ``limit`` change and node id records."""
        prefix = U64.pack(number)
        txn = self._group_txn()
        count = 0
        for name in ("changes", "node_keys"):
            cursor = txn.cursor(db=self.dbs[name])
            if not cursor.set_range(prefix):
                continue
            for key in cursor.iternext(values=False):
                if key[:8] != prefix:
                    break
                count += 1
                if count >= limit:
                    return False
        return True

    @freeing_op
    def _remove_at_once(self, layer: Layer) -> None:
        self._purge_batch(layer.number)
        self._drop_layer(layer)

    @freeing_op
    def _mark_removing(self, layer: Layer, record_intent: bool = True) -> None:
        if record_intent:
            intents.begin(self._txn, self.dbs["intents"], self.dbs["meta"], "remove",
                          layer=layer.number, id=layer.id)  # fmt: skip
        layer.state = "removing"
        self._undo.append(lambda: setattr(layer, "state", "ready"))
        self._txn.put(U64.pack(layer.number), layer.pack(), db=self.dbs["layers"])

    def _purge(self, number: int) -> None:
        """Delete every record layer ``number`` owns, in batches of commits.

        A batch that finds too few free pages in the metadata area is
        retried at a quarter of its size. Each commit makes the pages that
        the batch freed usable again, so the batches grow back.
        """
        limit = PURGE_BATCH
        while True:
            with self.lock:
                try:
                    more = self._purge_batch(number, limit)
                except errors.NoSpace:
                    if limit == 1:
                        raise
                    limit = max(1, limit // 4)
                    continue
                if not more:
                    break
                self.commit()
                limit = min(PURGE_BATCH, limit * 2)
            crash_point("remove.batch")
        self._forget_cached(number)

    @freeing_op
    def _purge_batch(self, number: int, limit: int = PURGE_BATCH) -> bool:
        txn, dbs = self._txn, self.dbs
        prefix = U64.pack(number)
        cursor = txn.cursor(db=dbs["changes"])
        done = 0
        found = cursor.set_range(prefix)
        while found and cursor.key()[:8] == prefix and done < limit:
            key = bytes(cursor.key())
            if key[8:9] == b"i":
                ino = U64.unpack_from(key, 9)[0]
                self._drop_inode_records(number, ino)
            else:
                dir_ino = U64.unpack_from(key, 9)[0]
                txn.delete(prefix_dirent(dir_ino, key[17:], number), db=dbs["dirents"])
            if not cursor.delete():
                break
            done += 1
        done += self._drop_node_ids(number, limit - done)
        self._pins.pop(number, None)
        return done > 0

    def _drop_node_ids(self, number: int, limit: int) -> int:
        """Delete up to ``limit`` node ids of layer ``number`` and return how many were deleted.

        A lookup gives each inode it finds in a layer a node id, so every
        container's layer has a few dozen. Nothing uses them once the layer
        is gone, because layer numbers are never reused.
        """
        txn, dbs = self._txn, self.dbs
        prefix = U64.pack(number)
        cursor = txn.cursor(db=dbs["node_keys"])
        done = 0
        if limit <= 0 or not cursor.set_range(prefix):
            return 0
        while cursor.key()[:8] == prefix and done < limit:
            key = U64X2.unpack(cursor.key())
            packed_node = bytes(cursor.value())
            txn.delete(packed_node, db=dbs["nodes"])
            # The maps only cache the records, so an abort that keeps the
            # records costs a read of them, not a wrong result.
            self._node_keys.pop(key, None)
            self._nodes.pop(U64.unpack(packed_node)[0], None)
            if not cursor.delete():
                break
            done += 1
        return done

    @freeing_op
    def _drop_layer(self, layer: Layer) -> None:
        txn, dbs = self._txn, self.dbs
        txn.delete(U64.pack(layer.number), db=dbs["layers"])
        txn.delete(layer.id.encode(), db=dbs["layer_ids"])
        # A base layer's root directory is made with the layer, outside its change log.
        self._drop_inode_records(layer.number, ROOT_INO)
        if layer.parent is not None:
            txn.delete(U64X2.pack(layer.parent, layer.number), db=dbs["children"])
            self._children.get(layer.parent, set()).discard(layer.number)
        for number, intent in intents.pending(txn, dbs["intents"]):
            if intent.get("layer") == layer.number:
                intents.finish(txn, dbs["intents"], number)
        meta = dbs["meta"]
        txn.delete(CHANGE_MARK + U64.pack(layer.number), db=meta)
        self._marked_layers.discard(layer.number)
        txn.delete(LOST_CHANGES + U64.pack(layer.number), db=meta)
        self._lost_changes.pop(layer.number, None)
        self._layers.pop(layer.number, None)
        if self._ids.get(layer.id) == layer.number:
            del self._ids[layer.id]
        self._children.pop(layer.number, None)
        self._forget_cached(layer.number)
        self._layers_changed()

    def _layers_changed(self) -> None:
        """Tell the mount, if any, that the set of layers changed."""
        if self.layers_changed is not None:
            self.layers_changed()

    def _forget_cached(self, number: int) -> None:
        """Drop the cached ancestry of layer ``number``, whose records went.

        The inode and entry caches hold frozen layers only, keyed by layer
        number. A layer stays frozen once it is, and numbers come from a
        counter, so no other layer's entries change. The entries of
        ``number`` are not looked up again, and the size limit clears them.
        """
        self._ancestors.pop(number, None)

    def _clear_caches(self) -> None:
        self._inode_cache.clear()
        self._entry_cache.clear()
        self._ancestors.clear()

    def _ancestry(self, number: int) -> dict[int, int]:
        """Return {layer number: depth} for ``number`` and all its ancestors."""
        chain = self._ancestors.get(number)
        if chain is not None:
            return chain
        chain = {}
        current = number
        while current is not None:
            layer = self._layers[current]
            chain[current] = layer.depth
            current = layer.parent
        # A layer's ancestry never changes, so every layer's is cached.
        if len(self._ancestors) > 256:
            self._ancestors.clear()
        self._ancestors[number] = chain
        return chain

    def _has_changes(self, number: int) -> bool:
        cursor = self._txn.cursor(db=self.dbs["changes"])
        prefix = U64.pack(number)
        return cursor.set_range(prefix) and cursor.key()[:8] == prefix

    def _log_inode(self, layer: int, ino: int) -> None:
        self._txn.put(change_inode_key(layer, ino), b"", db=self.dbs["changes"])

    # How many ids of removed layers are remembered, for ``was_removed``.
    REMOVED_KEEP = 1000

    @write_op
    def remember_removed(self, layer_ids: list[str]) -> None:
        """Record that ``layer_ids`` were removed, in the transaction that removes them."""
        ids = self._removed_ids()
        new = [layer_id for layer_id in layer_ids if layer_id not in ids]
        if new:
            ids = (ids + new)[-self.REMOVED_KEEP :]
            # The key keeps its first name, from when only recovery used it.
            self._txn.put(
                b"recovered_ids", json.dumps(ids).encode(), db=self.dbs["meta"]
            )

    def _removed_ids(self) -> list[str]:
        raw = self._txn.get(b"recovered_ids", db=self.dbs["meta"])
        return json.loads(bytes(raw)) if raw else []

    @read_op
    def was_removed(self, layer_id: str) -> bool:
        """Return True if ``layer_id`` is gone and was one of the last REMOVED_KEEP layers removed.

        dockerd retries the Remove of a layer whose Remove or import a crash
        cut short, or whose reply a crash lost after the removal was
        committed. Like Docker's own drivers, it expects that to succeed.
        """
        return layer_id not in self._ids and layer_id in self._removed_ids()

    @freeing_op
    def _finish_intent(self, number: int) -> None:
        intents.finish(self._txn, self.dbs["intents"], number)

    # -- node ids --------------------------------------------------------------

    def node_id(self, layer: int, ino: int) -> int:
        """Return the node id of (layer, inode), allocating a new one on first use.

        Raises LayerNotFound for a layer that is removed or being removed,
        which a lookup made before the removal may still name. Its node id
        would outlive the layer, because the removal deletes node ids first.
        """
        with self.lock:
            node = self._node_keys.get((layer, ino))
            if node is not None:
                return node
            self._layer(layer)
            return self._allocate_node(layer, ino)

    def existing_node(self, layer: int, ino: int) -> int | None:
        """Return the node id of (layer, inode) if this process has used one, without allocating."""
        with self.lock:
            return self._node_keys.get((layer, ino))

    @bookkeeping_op
    def _allocate_node(self, layer: int, ino: int) -> int:
        key = (layer, ino)
        packed = U64X2.pack(layer, ino)
        raw = self._txn.get(packed, db=self.dbs["node_keys"])
        if raw is not None:
            node = U64.unpack(raw)[0]
        else:
            node = self._next_counter(b"next_node")
            self._txn.put(packed, U64.pack(node), db=self.dbs["node_keys"])
            self._txn.put(U64.pack(node), packed, db=self.dbs["nodes"])
            self._undo.append(lambda: self._forget_node(node, key))
        self._node_keys[key] = node
        self._nodes[node] = key
        return node

    def _forget_node(self, node: int, key: tuple[int, int]) -> None:
        self._node_keys.pop(key, None)
        self._nodes.pop(node, None)

    @read_op
    def node_target(self, node: int) -> tuple[int, int]:
        """Return the (layer number, inode) a node id stands for."""
        target = self._nodes.get(node)
        if target is None:
            raw = self._txn.get(U64.pack(node), db=self.dbs["nodes"])
            if raw is None:
                raise errors.NotFound(f"node id {node} not found")
            target = U64X2.unpack(raw)
            self._nodes[node] = target
            self._node_keys[target] = node
        return target

    # -- open files ----------------------------------------------------------------

    @read_op
    def pin(self, layer: int, ino: int) -> None:
        pins = self._pins.setdefault(layer, {})
        pins[ino] = pins.get(ino, 0) + 1

    def unpin(self, layer: int, ino: int) -> None:
        with self.lock:
            pins = self._pins.get(layer, {})
            count = pins.get(ino, 0) - 1
            if count > 0:
                pins[ino] = count
                return
            pins.pop(ino, None)
            if not pins:
                self._pins.pop(layer, None)
            if (layer, ino) in self._orphans:
                self._reap_orphan(layer, ino)

    def _pinned(self, layer: int, ino: int) -> bool:
        return ino in self._pins.get(layer, ())

    @freeing_op
    def _reap_orphan(self, layer: int, ino: int) -> None:
        number = self._orphans.pop((layer, ino))
        self._undo.append(lambda: self._orphans.__setitem__((layer, ino), number))
        if number is not None:
            intents.finish(self._txn, self.dbs["intents"], number)
        if layer in self._layers and self._layers[layer].state == "ready":
            self._destroy_inode(layer, ino)


def prefix_dirent(dir_ino: int, name: bytes, layer: int) -> bytes:
    from .format import dirent_key

    return dirent_key(dir_ino, name, layer)
