"""Inodes, directory entries and xattrs of the store (a mixin of ``Store``).

Resolution: layer L sees inode i through the record ``(i, A)`` of the
nearest layer A on L's ancestry that has one, and sees name n in directory d
through the entry ``(d, n, A)`` of the nearest such layer, stopping at the
layer where d became opaque. An empty entry value is a tombstone: the name
was deleted in that layer. Changing an inode first copies its record, its
xattrs and its extent map (not its data) into the leaf layer.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass

from . import errors
from .format import (
    BLOCK_SIZE,
    DIRENT,
    FLAG_XATTRS,
    ROOT_INO,
    U64,
    U64X2,
    Inode,
    change_dirent_key,
    dirent_key,
    dirent_prefix,
    inode_key,
    split_dirent_key,
    xattr_key,
)

# Layers tried one by one before a lookup reads every version of its key at once.
WALK_STEPS = 8
# Frozen-layer lookups are cached; a cache is dropped when it grows past this.
CACHE_LIMIT = 200_000

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
# Leave a whiteout (a character device 0:0) at the old name, for overlayfs.
RENAME_WHITEOUT = 4
XATTR_CREATE = 1
XATTR_REPLACE = 2
NAME_MAX = 255
# The maximum length in bytes of a symbolic link target: Linux's PATH_MAX
# (4096) less the terminating NUL. symlink(2) fails with ENAMETOOLONG above it.
SYMLINK_MAX = 4095
XATTR_SIZE_MAX = 65536
# Keys of the meta database that record the xattr names ever stored.
XATTR_NAME_PREFIX = b"xattr-name:"
XATTR_NAMES_COMPLETE = b"xattr-names-complete"


def _now() -> int:
    return time.time_ns()


def check_name(name: bytes) -> None:
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise errors.Invalid(f"invalid file name {os.fsdecode(name)!r}")
    check_name_length(name)


def check_name_length(name: bytes) -> None:
    """Raise NameTooLong for a name longer than NAME_MAX bytes.

    The kernel's FUSE client sends names of up to 1024 bytes (FUSE_NAME_MAX).
    """
    if len(name) > NAME_MAX:
        prefix = os.fsdecode(name[:40])
        raise errors.NameTooLong(
            f"file name {prefix!r}... ({len(name)} bytes) is longer than {NAME_MAX} bytes"
        )


def symlink_target_problem(target: bytes) -> str | None:
    """Return why symlink(2) rejects ``target`` as a link target, or None if it accepts it."""
    if not target:
        return "it is empty"
    if b"\0" in target:
        return "it contains a NUL byte"
    if len(target) > SYMLINK_MAX:
        return f"it is {len(target)} bytes long, over the limit of {SYMLINK_MAX}"
    return None


@dataclass(slots=True, frozen=True)
class Attr:
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    has_xattrs: bool
    # The record belongs to an ancestor: the layer has not changed the inode.
    inherited: bool = False
    # The number of the ancestor whose record it is, when ``inherited``.
    owner: int = 0

    @classmethod
    def of(cls, inode: Inode, inherited: bool = False, owner: int = 0) -> Attr:
        return cls(inode.ino, inode.mode, inode.nlink, inode.uid, inode.gid, inode.rdev,
                   inode.size, inode.blocks * (BLOCK_SIZE // 512), inode.atime_ns,
                   inode.mtime_ns, inode.ctime_ns, inode.has_xattrs, inherited, owner)  # fmt: skip


class NamespaceMixin:
    # -- resolution ----------------------------------------------------------

    def _resolve(self, layer: int, ino: int) -> tuple[int, Inode]:
        """Return (owner layer, record) of inode ``ino`` as layer ``layer`` sees it.

        The nearest few layers are tried one by one; past them, every version
        of the inode (they are adjacent in the ``inodes`` database) is read
        once and the deepest one on the layer's ancestry wins, so the cost
        does not grow with the depth of the layer chain.
        """
        layers = self._layers
        frozen = layers[layer].frozen
        if frozen:
            cached = self._inode_cache.get((layer, ino))
            if cached is not None:
                return cached[0], Inode.unpack(ino, cached[1])
        found = None
        number = layer
        for _ in range(WALK_STEPS):
            raw = self._txn.get(inode_key(ino, number), db=self.dbs["inodes"])
            if raw is not None:
                found = (number, bytes(raw))
                break
            number = layers[number].parent
            if number is None:
                break
        else:
            found = self._deepest_version(self.dbs["inodes"], U64.pack(ino), layer, 0)
        if found is None:
            raise errors.NotFound(f"inode {ino} not found in layer {layers[layer].id}")
        if frozen:
            if len(self._inode_cache) > CACHE_LIMIT:
                self._inode_cache.clear()
            self._inode_cache[(layer, ino)] = found
        return found[0], Inode.unpack(ino, found[1])

    def _deepest_version(self, db, prefix: bytes, layer: int, min_depth: int):
        """Return (layer, value) of the record under ``prefix`` from the deepest
        ancestor of ``layer`` at ``min_depth`` or below it, or None.

        Keys are ``prefix`` followed by a layer number (u64).
        """
        chain = self._ancestry(layer)
        best = None
        best_depth = -1
        size = len(prefix) + 8
        for key, value in self._prefix_items(db, prefix):
            if len(key) != size:
                continue
            number = U64.unpack_from(key, len(prefix))[0]
            depth = chain.get(number)
            if depth is not None and depth >= min_depth and depth > best_depth:
                best, best_depth = (number, value), depth
        return best

    def _inode(self, layer: int, ino: int) -> Inode:
        return self._resolve(layer, ino)[1]

    def _own(self, layer: int, ino: int) -> Inode:
        """Return layer's own record of ``ino``, copying it up from an ancestor first."""
        owner, inode = self._resolve(layer, ino)
        if owner != layer:
            txn, dbs = self._txn, self.dbs
            prefix = U64X2.pack(ino, owner)
            for key, value in list(self._prefix_items(dbs["xattrs"], prefix)):
                txn.put(xattr_key(ino, layer, key[16:]), value, db=dbs["xattrs"])
            self._copy_extents(ino, owner, layer)
            self._put_inode(layer, inode)
            self._log_inode(layer, ino)
        return inode

    def _put_inode(self, layer: int, inode: Inode) -> None:
        self._txn.put(inode_key(inode.ino, layer), inode.pack(), db=self.dbs["inodes"])

    def _prefix_items(self, db, prefix: bytes):
        cursor = self._txn.cursor(db=db)
        if not cursor.set_range(prefix):
            return
        for key, value in cursor:
            if not key.startswith(prefix):
                return
            yield bytes(key), bytes(value)

    def _dir(self, layer: int, ino: int) -> Inode:
        inode = self._inode(layer, ino)
        if not inode.is_dir:
            raise errors.NotDir(f"inode {ino} is not a directory")
        return inode

    def _boundary(self, layer: int, dir_inode: Inode) -> int:
        """Return the lowest depth whose entries the directory still shows."""
        if dir_inode.opaque:
            return self._layers[dir_inode.opaque].depth
        return 0

    def _entry(
        self, layer: int, dir_inode: Inode, name: bytes
    ) -> tuple[int, int] | None:
        """Return (ino, type) of ``name`` in the directory, or None.

        Looks up like ``_resolve``: the nearest layers one by one, then every
        version of the entry at once, ignoring layers older than the layer at
        which the directory became opaque.
        """
        layers = self._layers
        frozen = layers[layer].frozen
        key = (layer, dir_inode.ino, name)
        if frozen and key in self._entry_cache:
            return self._entry_cache[key]
        depth_limit = self._boundary(layer, dir_inode)
        raw = None
        number = layer
        for _ in range(WALK_STEPS):
            if layers[number].depth < depth_limit:
                break
            value = self._txn.get(
                dirent_key(dir_inode.ino, name, number), db=self.dbs["dirents"]
            )
            if value is not None:
                raw = bytes(value)
                break
            number = layers[number].parent
            if number is None:
                break
        else:
            found = self._deepest_version(
                self.dbs["dirents"],
                dirent_prefix(dir_inode.ino, name),
                layer,
                depth_limit,
            )
            raw = found[1] if found is not None else None
        result = DIRENT.unpack(raw) if raw else None
        if frozen:
            if len(self._entry_cache) > CACHE_LIMIT:
                self._entry_cache.clear()
            self._entry_cache[key] = result
        return result

    def _child(self, layer: int, dir_ino: int, name: bytes) -> Inode:
        return self._inode(layer, self._child_ino(layer, dir_ino, name))

    def _child_ino(self, layer: int, dir_ino: int, name: bytes) -> int:
        dir_inode = self._dir(layer, dir_ino)
        found = self._entry(layer, dir_inode, name)
        if found is None:
            raise errors.NotFound(
                f"{name.decode(errors='replace')!r} not found in directory inode {dir_ino}"
            )
        return found[0]

    def _attr(self, layer: int, ino: int):
        """Return the attributes of ``ino`` in ``layer``, marked if inherited."""
        owner, inode = self._resolve(layer, ino)
        if owner == layer:
            return Attr.of(inode)
        return Attr.of(inode, inherited=True, owner=owner)

    def _entries(self, layer: int, dir_inode: Inode) -> dict[bytes, int]:
        """Return {name: ino} of every live entry of a directory."""
        chain = self._ancestry(layer)
        limit = self._boundary(layer, dir_inode)
        best: dict[bytes, tuple[int, bytes]] = {}
        for key, value in self._prefix_items(
            self.dbs["dirents"], U64.pack(dir_inode.ino)
        ):
            _, name, number = split_dirent_key(key)
            depth = chain.get(number)
            if depth is None or depth < limit:
                continue
            current = best.get(name)
            if current is None or depth > current[0]:
                best[name] = (depth, value)
        return {
            name: DIRENT.unpack(value)[0] for name, (_, value) in best.items() if value
        }

    def _add_entry(self, layer: int, dir_ino: int, name: bytes, inode: Inode) -> None:
        value = DIRENT.pack(inode.ino, stat.S_IFMT(inode.mode) >> 12)
        self._txn.put(dirent_key(dir_ino, name, layer), value, db=self.dbs["dirents"])
        self._txn.put(
            change_dirent_key(layer, dir_ino, name), b"", db=self.dbs["changes"]
        )

    def _remove_entry(self, layer: int, dir_inode: Inode, name: bytes) -> None:
        txn, dbs = self._txn, self.dbs
        self.entry_removals += 1
        txn.delete(dirent_key(dir_inode.ino, name, layer), db=dbs["dirents"])
        parent = self._layers[layer].parent
        inherited = False
        if parent is not None and self._layers[parent].depth >= self._boundary(
            layer, dir_inode
        ):
            inherited = self._entry(parent, dir_inode, name) is not None
        if inherited:
            txn.put(dirent_key(dir_inode.ino, name, layer), b"", db=dbs["dirents"])
            txn.put(
                change_dirent_key(layer, dir_inode.ino, name), b"", db=dbs["changes"]
            )
        else:
            txn.delete(change_dirent_key(layer, dir_inode.ino, name), db=dbs["changes"])

    def _touch_dir(self, layer: int, dir_ino: int, nlink_delta: int = 0) -> Inode:
        inode = self._own(layer, dir_ino)
        now = _now()
        inode.mtime_ns = inode.ctime_ns = now
        inode.nlink += nlink_delta
        self._put_inode(layer, inode)
        return inode

    def _is_inherited(self, layer: int, ino: int) -> bool:
        parent = self._layers[layer].parent
        if parent is None:
            return False
        try:
            self._resolve(parent, ino)
        except errors.NotFound:
            return False
        return True

    def _destroy_inode(self, layer: int, ino: int) -> None:
        """Free a layer's copy of an inode that has no links and no open handles."""
        inherited = self._is_inherited(layer, ino)
        self._drop_inode_records(layer, ino, keep_record=inherited)
        if not inherited:
            self._txn.delete(
                U64.pack(layer) + b"i" + U64.pack(ino), db=self.dbs["changes"]
            )

    def _drop_inode_records(
        self, layer: int, ino: int, keep_record: bool = False
    ) -> None:
        txn, dbs = self._txn, self.dbs
        self._free_extents(ino, layer)
        for key, _ in list(self._prefix_items(dbs["xattrs"], U64X2.pack(ino, layer))):
            txn.delete(key, db=dbs["xattrs"])
        if keep_record:
            raw = txn.get(inode_key(ino, layer), db=dbs["inodes"])
            if raw is not None:
                inode = Inode.unpack(ino, raw)
                inode.nlink = 0
                inode.size = 0
                inode.blocks = 0
                inode.flags &= ~FLAG_XATTRS
                self._put_inode(layer, inode)
        else:
            txn.delete(inode_key(ino, layer), db=dbs["inodes"])

    # -- reading ---------------------------------------------------------------

    def getattr(self, layer: int, ino: int):
        with self.lock:
            self._ready()
            self._layer(layer)
            return self._attr(layer, ino)

    def lookup(self, layer: int, dir_ino: int, name: bytes):
        # ext4 and tmpfs fail a lookup of a longer name with ENAMETOOLONG.
        check_name_length(name)
        with self.lock:
            self._ready()
            self._layer(layer)
            return self._attr(layer, self._child_ino(layer, dir_ino, name))

    def lookup_parent(self, layer: int, dir_ino: int):
        """Return the attributes of a directory's parent; the root is its own parent."""
        with self.lock:
            self._ready()
            self._layer(layer)
            inode = self._dir(layer, dir_ino)
            parent = inode.parent if dir_ino != ROOT_INO and inode.parent else ROOT_INO
            return Attr.of(self._dir(layer, parent))

    def readdir(self, layer: int, dir_ino: int) -> list:
        with self.lock:
            self._ready()
            self._layer(layer)
            entries = self._entries(layer, self._dir(layer, dir_ino))
            return [(name, self._attr(layer, entries[name])) for name in sorted(entries)]

    def readlink(self, layer: int, ino: int) -> bytes:
        with self.lock:
            self._ready()
            self._layer(layer)
            inode = self._inode(layer, ino)
            if not stat.S_ISLNK(inode.mode):
                raise errors.Invalid(f"inode {ino} is not a symbolic link")
            return inode.target

    def _ready(self) -> None:
        if self._txn is None:
            self._txn = self._group_txn()

    # -- creating ----------------------------------------------------------------

    def _create(self, layer: int, dir_ino: int, name: bytes, mode: int, uid: int, gid: int,
                rdev: int = 0, target: bytes = b""):  # fmt: skip
        check_name(name)
        self._writable(layer)
        dir_inode = self._dir(layer, dir_ino)
        if self._entry(layer, dir_inode, name) is not None:
            raise errors.Exists(
                f"{name.decode(errors='replace')!r} already exists in directory inode {dir_ino}"
            )
        now = _now()
        is_dir = stat.S_ISDIR(mode)
        inode = Inode(self._next_counter(b"next_ino"), mode, uid, gid, 2 if is_dir else 1,
                      len(target), rdev, 0, now, now, now, dir_ino, 0, 0, name, target)  # fmt: skip
        self._put_inode(layer, inode)
        self._log_inode(layer, inode.ino)
        self._add_entry(layer, dir_ino, name, inode)
        self._touch_dir(layer, dir_ino, 1 if is_dir else 0)
        return Attr.of(inode)

    def mknod(
        self,
        layer: int,
        dir_ino: int,
        name: bytes,
        mode: int,
        rdev: int = 0,
        uid: int = 0,
        gid: int = 0,
    ):
        fmt = stat.S_IFMT(mode) or stat.S_IFREG
        if fmt not in (
            stat.S_IFREG,
            stat.S_IFIFO,
            stat.S_IFSOCK,
            stat.S_IFCHR,
            stat.S_IFBLK,
        ):
            raise errors.Invalid(f"mknod of file type {oct(fmt)} is not supported")
        if fmt not in (stat.S_IFCHR, stat.S_IFBLK):
            rdev = 0
        return self._write(
            self._create, layer, dir_ino, name, fmt | stat.S_IMODE(mode), uid, gid, rdev
        )

    def mkdir(
        self,
        layer: int,
        dir_ino: int,
        name: bytes,
        mode: int,
        uid: int = 0,
        gid: int = 0,
    ):
        return self._write(
            self._create,
            layer,
            dir_ino,
            name,
            stat.S_IFDIR | stat.S_IMODE(mode),
            uid,
            gid,
        )

    def symlink(
        self,
        layer: int,
        dir_ino: int,
        name: bytes,
        target: bytes,
        uid: int = 0,
        gid: int = 0,
    ):
        problem = symlink_target_problem(target)
        if problem is not None:
            raise errors.Invalid(
                f"invalid symbolic link target {target[:40]!r}: {problem}"
            )
        return self._write(
            self._create,
            layer,
            dir_ino,
            name,
            stat.S_IFLNK | 0o777,
            uid,
            gid,
            0,
            target,
        )

    def own(self, layer: int, ino: int):
        """Copy an inherited inode's record into a writable layer; return its attributes.

        The copy shares the data blocks, as any copy-up does. The layer's
        changes list the inode from then on, as after a change of its data.
        """
        return self._write(self._own_attr, layer, ino)

    def _own_attr(self, layer, ino):
        self._writable(layer)
        return Attr.of(self._own(layer, ino))

    def link(self, layer: int, ino: int, new_dir_ino: int, new_name: bytes):
        return self._write(self._link, layer, ino, new_dir_ino, new_name)

    def _link(self, layer, ino, new_dir_ino, new_name):
        check_name(new_name)
        self._writable(layer)
        inode = self._inode(layer, ino)
        if inode.is_dir:
            raise errors.NotPermitted(
                f"inode {ino} is a directory and cannot be hard-linked"
            )
        dir_inode = self._dir(layer, new_dir_ino)
        if self._entry(layer, dir_inode, new_name) is not None:
            raise errors.Exists(
                f"{new_name.decode(errors='replace')!r} already exists in directory inode {new_dir_ino}"
            )
        inode = self._own(layer, ino)
        inode.nlink += 1
        inode.ctime_ns = _now()
        self._put_inode(layer, inode)
        self._add_entry(layer, new_dir_ino, new_name, inode)
        self._touch_dir(layer, new_dir_ino)
        return Attr.of(inode)

    # -- removing ------------------------------------------------------------------

    def unlink(self, layer: int, dir_ino: int, name: bytes) -> None:
        return self._free(self._unlink, layer, dir_ino, name)

    def _unlink(self, layer, dir_ino, name):
        self._writable(layer)
        dir_inode = self._dir(layer, dir_ino)
        inode = self._child(layer, dir_ino, name)
        if inode.is_dir:
            raise errors.IsDir(f"{name.decode(errors='replace')!r} is a directory")
        self._remove_entry(layer, dir_inode, name)
        self._touch_dir(layer, dir_ino)
        self._drop_link(layer, inode.ino)

    def _drop_link(self, layer: int, ino: int) -> None:
        inode = self._own(layer, ino)
        inode.nlink = max(inode.nlink - 1, 0)
        inode.ctime_ns = _now()
        self._put_inode(layer, inode)
        if inode.nlink == 0:
            if self._pinned(layer, ino):
                self._orphan(layer, ino)
            else:
                self._destroy_inode(layer, ino)

    def _orphan(self, layer: int, ino: int) -> None:
        if (layer, ino) in self._orphans:
            return
        # Most orphans are reaped before the next commit, so the intent that
        # lets recovery reap one after a crash is written by the commit
        # (``_record_orphans``) only for those still pinned then.
        self._orphans[(layer, ino)] = None
        self._undo.append(lambda: self._orphans.pop((layer, ino), None))

    def rmdir(self, layer: int, dir_ino: int, name: bytes) -> None:
        return self._free(self._rmdir, layer, dir_ino, name)

    def _rmdir(self, layer, dir_ino, name):
        self._writable(layer)
        dir_inode = self._dir(layer, dir_ino)
        inode = self._child(layer, dir_ino, name)
        if not inode.is_dir:
            raise errors.NotDir(f"{name.decode(errors='replace')!r} is not a directory")
        if self._entries(layer, inode):
            raise errors.NotEmpty(
                f"directory {name.decode(errors='replace')!r} is not empty"
            )
        self._remove_entry(layer, dir_inode, name)
        self._touch_dir(layer, dir_ino, -1)
        self._drop_dir(layer, inode.ino)

    def _drop_dir(self, layer: int, ino: int) -> None:
        if self._is_inherited(layer, ino):
            inode = self._own(layer, ino)
            inode.nlink = 0
            inode.ctime_ns = _now()
            self._put_inode(layer, inode)
        else:
            self._drop_inode_records(layer, ino)
            self._txn.delete(
                U64.pack(layer) + b"i" + U64.pack(ino), db=self.dbs["changes"]
            )

    # -- rename --------------------------------------------------------------------

    def rename(self, layer: int, old_dir: int, old_name: bytes, new_dir: int, new_name: bytes,
               flags: int = 0, uid: int = 0, gid: int = 0) -> None:  # fmt: skip
        """Rename an entry as renameat2(2) does with ``flags``.

        ``uid`` and ``gid`` own the whiteout that RENAME_WHITEOUT leaves.
        """
        return self._write(
            self._rename, layer, old_dir, old_name, new_dir, new_name, flags, uid, gid
        )

    def _rename(self, layer, old_dir, old_name, new_dir, new_name, flags, uid=0, gid=0):
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT) or (
            flags & RENAME_EXCHANGE and flags & (RENAME_NOREPLACE | RENAME_WHITEOUT)
        ):
            raise errors.Invalid(f"invalid rename flags {flags}")
        check_name(new_name)
        self._writable(layer)
        old_dir_inode = self._dir(layer, old_dir)
        new_dir_inode = self._dir(layer, new_dir)
        source = self._child(layer, old_dir, old_name)
        found = self._entry(layer, new_dir_inode, new_name)
        target = self._inode(layer, found[0]) if found else None
        if old_dir == new_dir and old_name == new_name:
            return
        if target is not None and flags & RENAME_NOREPLACE:
            raise errors.Exists(f"{new_name.decode(errors='replace')!r} already exists")
        if source.is_dir:
            self._check_not_inside(layer, source.ino, new_dir)
        if flags & RENAME_EXCHANGE:
            if target is None:
                raise errors.NotFound(
                    f"{new_name.decode(errors='replace')!r} not found"
                )
            if target.is_dir:
                self._check_not_inside(layer, target.ino, old_dir)
            self._exchange(
                layer, old_dir_inode, old_name, source, new_dir_inode, new_name, target
            )
            return
        if target is not None:
            if target.ino == source.ino:
                return
            if source.is_dir and not target.is_dir:
                raise errors.NotDir(
                    f"{new_name.decode(errors='replace')!r} is not a directory"
                )
            if not source.is_dir and target.is_dir:
                raise errors.IsDir(
                    f"{new_name.decode(errors='replace')!r} is a directory"
                )
            if target.is_dir:
                if self._entries(layer, target):
                    raise errors.NotEmpty(
                        f"directory {new_name.decode(errors='replace')!r} is not empty"
                    )
                self._touch_dir(layer, new_dir, -1)
                self._drop_dir(layer, target.ino)
            else:
                self._drop_link(layer, target.ino)
        self._add_entry(layer, new_dir, new_name, source)
        self._remove_entry(layer, self._dir(layer, old_dir), old_name)
        self._relink(layer, source.ino, new_dir, new_name)
        if source.is_dir and old_dir != new_dir:
            self._touch_dir(layer, old_dir, -1)
            self._touch_dir(layer, new_dir, 1)
        else:
            self._touch_dir(layer, old_dir)
            if new_dir != old_dir:
                self._touch_dir(layer, new_dir)
        if flags & RENAME_WHITEOUT:
            self._create(layer, old_dir, old_name, stat.S_IFCHR, uid, gid)

    def _exchange(
        self, layer, old_dir_inode, old_name, source, new_dir_inode, new_name, target
    ):
        old_dir, new_dir = old_dir_inode.ino, new_dir_inode.ino
        self._add_entry(layer, new_dir, new_name, source)
        self._add_entry(layer, old_dir, old_name, target)
        self._relink(layer, source.ino, new_dir, new_name)
        self._relink(layer, target.ino, old_dir, old_name)
        if old_dir != new_dir and source.is_dir != target.is_dir:
            delta = 1 if source.is_dir else -1
            self._touch_dir(layer, new_dir, delta)
            self._touch_dir(layer, old_dir, -delta)
        else:
            self._touch_dir(layer, old_dir)
            self._touch_dir(layer, new_dir)

    def _relink(self, layer: int, ino: int, dir_ino: int, name: bytes) -> None:
        inode = self._own(layer, ino)
        inode.parent = dir_ino
        inode.name = name
        inode.ctime_ns = _now()
        self._put_inode(layer, inode)

    def _check_not_inside(self, layer: int, dir_ino: int, target_dir: int) -> None:
        """Raise Invalid if ``target_dir`` is ``dir_ino`` or below it."""
        current = target_dir
        seen = 0
        while current and current != ROOT_INO:
            if current == dir_ino:
                raise errors.Invalid(
                    f"cannot move directory inode {dir_ino} into itself"
                )
            current = self._inode(layer, current).parent
            seen += 1
            if seen > 100_000:
                raise errors.StoreError(
                    f"directory parent loop above inode {target_dir}"
                )
        if current == dir_ino:
            raise errors.Invalid(f"cannot move directory inode {dir_ino} into itself")

    # -- attributes ------------------------------------------------------------------

    def setattr(self, layer: int, ino: int, mode=None, uid=None, gid=None, size=None,
                atime_ns=None, mtime_ns=None, ctime_ns=None):  # fmt: skip
        return self._write(
            self._setattr,
            layer,
            ino,
            mode,
            uid,
            gid,
            size,
            atime_ns,
            mtime_ns,
            ctime_ns,
        )

    def _setattr(self, layer, ino, mode, uid, gid, size, atime_ns, mtime_ns, ctime_ns):
        self._writable(layer)
        current = self._inode(layer, ino)
        if size is not None:
            if current.is_dir:
                raise errors.IsDir(f"inode {ino} is a directory")
            if not current.is_reg:
                raise errors.Invalid(f"inode {ino} is not a regular file")
            if size < 0:
                raise errors.Invalid(f"invalid file size {size}")
        inode = self._own(layer, ino)
        now = _now()
        if mode is not None:
            inode.mode = stat.S_IFMT(inode.mode) | stat.S_IMODE(mode)
        if uid is not None:
            inode.uid = uid
        if gid is not None:
            inode.gid = gid
        if atime_ns is not None:
            inode.atime_ns = atime_ns
        if mtime_ns is not None:
            inode.mtime_ns = mtime_ns
        if size is not None:
            if size != inode.size:
                self._truncate(layer, inode, size)
            # truncate(2), ftruncate(2) and an open with O_TRUNC set mtime
            # even when the size stays, as ext4 does on Linux 6.18. The
            # kernel's FUSE client sends no mtime with the size of any of
            # them. tmpfs keeps the times of a file with no blocks.
            if mtime_ns is None:
                inode.mtime_ns = now
        inode.ctime_ns = ctime_ns if ctime_ns is not None else now
        self._put_inode(layer, inode)
        return Attr.of(inode)

    # -- xattrs ----------------------------------------------------------------------

    def getxattr(self, layer: int, ino: int, name: bytes) -> bytes:
        with self.lock:
            self._ready()
            self._layer(layer)
            owner, inode = self._resolve(layer, ino)
            if inode.has_xattrs:
                value = self._txn.get(
                    xattr_key(ino, owner, name), db=self.dbs["xattrs"]
                )
                if value is not None:
                    return bytes(value)
            raise errors.NoData(
                f"no xattr {name.decode(errors='replace')!r} on inode {ino}"
            )

    def listxattr(self, layer: int, ino: int) -> list[bytes]:
        with self.lock:
            self._ready()
            self._layer(layer)
            owner, inode = self._resolve(layer, ino)
            if not inode.has_xattrs:
                return []
            return [
                key[16:]
                for key, _ in self._prefix_items(
                    self.dbs["xattrs"], U64X2.pack(ino, owner)
                )
            ]

    def setxattr(
        self, layer: int, ino: int, name: bytes, value: bytes, flags: int = 0
    ) -> None:
        return self._write(self._setxattr, layer, ino, name, value, flags)

    def _setxattr(self, layer, ino, name, value, flags):
        if not name or len(name) > NAME_MAX or b"\0" in name:
            raise errors.Invalid(f"invalid xattr name {name[:40]!r}")
        if len(value) > XATTR_SIZE_MAX:
            raise errors.TooBig(
                f"xattr {name!r} value of {len(value)} bytes is over {XATTR_SIZE_MAX}"
            )
        self._writable(layer)
        inode = self._own(layer, ino)
        key = xattr_key(ino, layer, name)
        exists = (
            inode.has_xattrs and self._txn.get(key, db=self.dbs["xattrs"]) is not None
        )
        if flags & XATTR_CREATE and exists:
            raise errors.Exists(
                f"xattr {name.decode(errors='replace')!r} already exists on inode {ino}"
            )
        if flags & XATTR_REPLACE and not exists:
            raise errors.NoData(
                f"no xattr {name.decode(errors='replace')!r} on inode {ino}"
            )
        self._txn.put(key, value, db=self.dbs["xattrs"])
        if name not in self._xattr_names:
            self._record_xattr_name(name)
        inode.flags |= FLAG_XATTRS
        inode.ctime_ns = _now()
        self._put_inode(layer, inode)

    def removexattr(self, layer: int, ino: int, name: bytes) -> None:
        return self._free(self._removexattr, layer, ino, name)

    def _removexattr(self, layer, ino, name):
        self._writable(layer)
        if not self._inode(layer, ino).has_xattrs:
            raise errors.NoData(
                f"no xattr {name.decode(errors='replace')!r} on inode {ino}"
            )
        inode = self._own(layer, ino)
        if not self._txn.delete(xattr_key(ino, layer, name), db=self.dbs["xattrs"]):
            raise errors.NoData(
                f"no xattr {name.decode(errors='replace')!r} on inode {ino}"
            )
        if not any(
            True for _ in self._prefix_items(self.dbs["xattrs"], U64X2.pack(ino, layer))
        ):
            inode.flags &= ~FLAG_XATTRS
        inode.ctime_ns = _now()
        self._put_inode(layer, inode)

    # -- xattr names ever stored ---------------------------------------------------
    #
    # The meta database holds a key XATTR_NAME_PREFIX + name for every xattr
    # name that any layer has stored, and XATTR_NAMES_COMPLETE once those
    # keys cover every record of the xattrs database. Names are never taken
    # out, so a name missing from the set is held by no inode of any layer.

    def xattr_name_seen(self, name: bytes) -> bool:
        """Return whether any layer has ever stored an xattr called ``name``.

        Reads only memory and takes no lock, so a FUSE handler can ask on
        every request, even while another thread holds the store lock.
        """
        return name in self._xattr_names

    def _load_xattr_names(self) -> None:
        """Read the set of xattr names, indexing the xattrs database once if needed."""
        txn, meta = self._txn, self.dbs["meta"]
        start = len(XATTR_NAME_PREFIX)
        names = {key[start:] for key, _ in self._prefix_items(meta, XATTR_NAME_PREFIX)}
        if txn.get(XATTR_NAMES_COMPLETE, db=meta) is None:
            # A store formatted before the set was kept: keys are ino u64,
            # layer u64, name.
            for key, _ in txn.cursor(db=self.dbs["xattrs"]):
                names.add(bytes(key[16:]))
            if not self.readonly:
                for name in names:
                    txn.put(XATTR_NAME_PREFIX + name, b"", db=meta)
                txn.put(XATTR_NAMES_COMPLETE, b"", db=meta)
        self._xattr_names = names

    def _record_xattr_name(self, name: bytes) -> None:
        self._txn.put(XATTR_NAME_PREFIX + name, b"", db=self.dbs["meta"])
        self._xattr_names.add(name)
        self._undo.append(lambda: self._xattr_names.discard(name))
