"""The export side of layer tars: which paths a layer changed, and their tar headers.

``DiffPlan`` reads a layer's change log (what the layer itself wrote) and
turns each changed inode or directory entry back into paths, comparing with
the parent layer to tell additions from modifications. A directory that is
new at its path contributes its whole subtree, and a directory that replaced
an older one gets an opaque whiteout.
"""

from __future__ import annotations

import os
import stat
import tarfile

from . import errors
from .format import ROOT_INO, U64, U64X2, Inode, xattr_key

WHITEOUT = b".wh."
OPAQUE = b".wh..wh..opq"
CHANGE_MODIFY, CHANGE_ADD, CHANGE_DELETE = 0, 1, 2


class DiffPlan:
    """The paths a layer changed against its parent, computed from its change log."""

    def __init__(self, store, layer):
        self.store = store
        self.layer = layer
        self.number = layer.number
        self.parent = layer.parent
        self._paths: dict[int, bytes | None] = {ROOT_INO: b""}
        # The layer's records and the parent's paths read so far. Neither
        # changes while the plan is made under the store lock, and the
        # parent is frozen for good.
        self._inodes: dict[int, Inode] = {}
        self._parent_paths: dict[bytes, int | None] = {b"": ROOT_INO}
        store._ready()
        # path -> (kind, ino or None for a whiteout)
        self.items: dict[bytes, tuple[int, int | None]] = {}
        # Changed inodes whose recorded name is gone, which another hard
        # link may still reach.
        self._unnamed: set[int] = set()
        # Directories whose whole subtree is in the plan already.
        self._walked: set[bytes] = set()
        self._collect()

    def _inode(self, ino: int) -> Inode:
        """Return the layer's record of ``ino``; raises NotFound."""
        inode = self._inodes.get(ino)
        if inode is None:
            inode = self._inodes[ino] = self.store._inode(self.number, ino)
        return inode

    def _path(self, ino: int) -> bytes | None:
        """Return the path of ``ino`` in the layer, or None if no name reaches it."""
        if ino in self._paths:
            return self._paths[ino]
        store, number = self.store, self.number
        try:
            inode = self._inode(ino)
        except errors.NotFound:
            return None
        path = None
        if inode.nlink and inode.parent:
            parent_path = self._path(inode.parent)
            if parent_path is not None:
                try:
                    dir_inode = store._dir(number, inode.parent)
                    found = store._entry(number, dir_inode, inode.name)
                except errors.StoreError:
                    found = None
                if found is not None and found[0] == ino:
                    path = parent_path + b"/" + inode.name
        self._paths[ino] = path
        return path

    def _parent_entry(self, path: bytes) -> int | None:
        """Return the inode at ``path`` in the parent layer, or None."""
        if self.parent is None:
            return None
        if path in self._parent_paths:
            return self._parent_paths[path]
        directory, name = path.rsplit(b"/", 1)
        dir_ino = self._parent_entry(directory)
        ino = None
        if dir_ino is not None:
            try:
                dir_inode = self.store._dir(self.parent, dir_ino)
            except errors.StoreError:
                dir_inode = None
            if dir_inode is not None:
                found = self.store._entry(self.parent, dir_inode, name)
                ino = found[0] if found is not None else None
        self._parent_paths[path] = ino
        return ino

    def _unchanged(self, path: bytes, ino: int) -> bool:
        """Return True if the layer's copy of ``ino`` differs from its parent's in nothing
        that a file comparison sees (a link count or ctime change only)."""
        if self.parent is None or self._parent_entry(path) != ino:
            return False
        store = self.store
        mine = self._inode(ino)
        try:
            parent_owner, theirs = store._resolve(self.parent, ino)
        except errors.NotFound:
            return False
        same = (
            mine.mode,
            mine.uid,
            mine.gid,
            mine.rdev,
            mine.size,
            mine.mtime_ns,
            mine.target,
        ) == (
            theirs.mode,
            theirs.uid,
            theirs.gid,
            theirs.rdev,
            theirs.size,
            theirs.mtime_ns,
            theirs.target,
        )
        if not same or mine.opaque == self.number:
            return False
        for _, value in store._prefix_items(
            store.dbs["extents"], U64X2.pack(ino, self.number)
        ):
            if value[-1]:
                return False
        mine_x = list(
            store._prefix_items(store.dbs["xattrs"], U64X2.pack(ino, self.number))
        )
        theirs_x = list(
            store._prefix_items(store.dbs["xattrs"], U64X2.pack(ino, parent_owner))
        )
        return [(k[16:], v) for k, v in mine_x] == [(k[16:], v) for k, v in theirs_x]

    def _add(self, path: bytes, ino: int) -> None:
        if path in self.items:
            return
        kind = CHANGE_MODIFY if self._parent_entry(path) is not None else CHANGE_ADD
        self.items[path] = (kind, ino)

    def _collect(self) -> None:
        store, number = self.store, self.number
        prefix = U64.pack(number)
        subtrees = []
        for key, _ in list(store._prefix_items(store.dbs["changes"], prefix)):
            if key[8:9] == b"i":
                ino = U64.unpack_from(key, 9)[0]
                path = self._path(ino)
                if path is None:
                    self._unnamed.add(ino)
                    continue
                if path and not self._unchanged(path, ino):
                    self._add(path, ino)
                    inode = self._inode(ino)
                    if inode.is_dir and inode.opaque == number:
                        self.items[path + b"/" + OPAQUE] = (CHANGE_DELETE, None)
                continue
            dir_ino = U64.unpack_from(key, 9)[0]
            name = key[17:]
            dir_path = self._path(dir_ino)
            if dir_path is None:
                continue
            path = dir_path + b"/" + name
            before = self._parent_entry(path)
            now = store._entry(number, store._dir(number, dir_ino), name)
            if now is None:
                if before is not None:
                    self.items.setdefault(path, (CHANGE_DELETE, None))
                continue
            if before == now[0] and self._unchanged(path, now[0]):
                continue  # the same file is back at its old name, as it was
            self._add(path, now[0])
            inode = self._inode(now[0])
            if inode.is_dir and before != now[0]:
                replaced = None
                if before is not None and store._inode(self.parent, before).is_dir:
                    self.items[path + b"/" + OPAQUE] = (CHANGE_DELETE, None)
                    replaced = before
                subtrees.append((path, inode, replaced))
        for path, inode, replaced in subtrees:
            self._add_subtree(path, inode, replaced)
        self._add_other_links()
        self._add_ancestors()

    def _add_ancestors(self) -> None:
        """List every directory above a change as modified, as Docker's own
        change walk does, so that a commit keeps the directories' metadata."""
        store, number = self.store, self.number
        for path in list(self.items):
            parts = path.split(b"/")
            for depth in range(2, len(parts)):
                ancestor = b"/".join(parts[:depth])
                if ancestor in self.items:
                    continue
                ino = ROOT_INO
                try:
                    for part in parts[1:depth]:
                        found = store._entry(number, store._dir(number, ino), part)
                        if found is None:
                            raise errors.NotFound(part)
                        ino = found[0]
                except errors.StoreError:
                    break
                self._add(ancestor, ino)

    def _add_other_links(self) -> None:
        """Add every other name of a changed file that has several hard links.

        An inode records one name, so a changed file whose recorded name was
        removed is found here by its other links. NOTE: finding those names
        walks the layer's whole tree, because the store keeps no index from
        an inode to its names. The walk runs only when a changed file has
        more than one link or lost its recorded name.
        """
        store, number = self.store, self.number
        wanted = set()
        for path, (kind, ino) in self.items.items():
            if ino is not None and kind != CHANGE_DELETE:
                inode = store._inode(number, ino)
                if not inode.is_dir and inode.nlink > 1:
                    wanted.add(ino)
        unnamed = set()
        for ino in self._unnamed:
            try:
                inode = store._inode(number, ino)
            except errors.NotFound:
                continue
            if inode.nlink and not inode.is_dir:
                unnamed.add(ino)
        if not wanted and not unnamed:
            return
        stack = [(b"", ROOT_INO)]
        while stack:
            prefix, dir_ino = stack.pop()
            for name, ino in store._entries(
                number, store._inode(number, dir_ino)
            ).items():
                path = prefix + b"/" + name
                if ino in wanted:
                    self._add(path, ino)
                elif ino in unnamed:
                    if not self._unchanged(path, ino):
                        self._add(path, ino)
                elif store._inode(number, ino).is_dir:
                    stack.append((path, ino))

    def _add_subtree(self, path: bytes, dir_inode: Inode, replaced: int | None = None) -> None:
        """Add everything under a directory that is new at ``path``.

        ``replaced`` is the parent layer's directory that was at ``path``,
        if any. An entry of the same name in it makes a child a
        modification, as Docker's own tree comparison reports it.
        """
        if path in self._walked:
            return
        self._walked.add(path)
        store, number = self.store, self.number
        old_dir = store._inode(self.parent, replaced) if replaced is not None else None
        for name, ino in store._entries(number, dir_inode).items():
            child = path + b"/" + name
            old = store._entry(self.parent, old_dir, name) if old_dir is not None else None
            # A child listed already, such as a directory that changed
            # itself, still has its own entries to add.
            self.items.setdefault(child, (CHANGE_ADD if old is None else CHANGE_MODIFY, ino))
            inode = self._inode(ino)
            if inode.is_dir:
                old_child = old[0] if old is not None else None
                if old_child is not None and not store._inode(self.parent, old_child).is_dir:
                    old_child = None
                self._add_subtree(child, inode, old_child)

    @staticmethod
    def _order(path: bytes):
        # An opaque marker comes right after its directory, before any entry
        # in it, as Docker's own archiver writes it. An applier treats the
        # entries before the marker as older than it, so a directory named
        # "-x" or "+x" that sorted first would be hidden by its own layer.
        return [b"" if part == OPAQUE else part for part in path.split(b"/")]

    def changes(self) -> list[tuple[bytes, int]]:
        """Return (path, kind) of every change, as Docker's Changes call lists them.

        Where the tar has an opaque whiteout, the entries of the replaced
        directory that the new one lacks are listed as deleted. The
        comparison goes on down every subdirectory name that is a directory
        in both, as Docker's own tree comparison does.
        """
        found = {}
        for path, (kind, _) in self.items.items():
            if path.endswith(b"/" + OPAQUE):
                found.update(self._replaced_entries(path[: -len(OPAQUE) - 1]))
            else:
                found[path] = kind
        return sorted(found.items(), key=lambda item: self._order(item[0]))

    def _replaced_entries(self, path: bytes) -> dict[bytes, int]:
        """Return {path: CHANGE_DELETE} for what the parent layer had in the replaced directory ``path``."""
        old_ino = self._parent_entry(path)
        new_ino = self.items.get(path, (None, None))[1]
        if old_ino is None or new_ino is None:
            return {}
        return self._entries_gone(path, old_ino, new_ino)

    def _entries_gone(self, path: bytes, old_ino: int, new_ino: int) -> dict[bytes, int]:
        """Return {path: CHANGE_DELETE} for what ``new_ino`` lacks of the parent's ``old_ino``.

        Both are directories at ``path``. The comparison goes on down every
        name that is a directory in both.
        """
        store, number = self.store, self.number
        old_dir = store._inode(self.parent, old_ino)
        new_dir = store._inode(number, new_ino)
        if not old_dir.is_dir or not new_dir.is_dir:
            return {}
        new_names = store._entries(number, new_dir)
        found = {}
        for name, old_child in store._entries(self.parent, old_dir).items():
            child = path + b"/" + name
            new_child = new_names.get(name)
            if new_child is None:
                found[child] = CHANGE_DELETE
            else:
                found.update(self._entries_gone(child, old_child, new_child))
        return found

    def size(self) -> int:
        """Return the bytes of the changed files and symlinks, each hard-linked file once.

        overlay2 counts the same way: the lstat size of every file in the
        layer's directory but directories, so a symlink adds its target's
        length.
        """
        total = 0
        seen = set()
        for _kind, ino in self.items.values():
            if ino is None or ino in seen:
                continue
            seen.add(ino)
            inode = self.store._inode(self.number, ino)
            if inode.is_reg:
                total += inode.size
            elif stat.S_ISLNK(inode.mode):
                total += len(inode.target)
        return total

    def entries(self) -> list[tuple[bytes, int, int | None]]:
        """Return (path, kind, ino) in tar order: parents first, whiteouts as ino None."""
        return [
            (path, *self.items[path]) for path in sorted(self.items, key=self._order)
        ]

    def header(self, path: bytes, kind: int, ino: int | None, written: dict[int, str]):
        name = path[1:].decode("utf-8", "surrogateescape")
        member = tarfile.TarInfo(name)
        if ino is None:
            base = path.rsplit(b"/", 1)
            if base[1] == OPAQUE:
                member.name = name
            else:
                member.name = (base[0] + b"/" + WHITEOUT + base[1])[1:].decode(
                    "utf-8", "surrogateescape"
                )
            member.type = tarfile.REGTYPE
            member.mode = 0
            member.mtime = 0
            return member, None
        store, number = self.store, self.number
        owner, inode = store._resolve(number, ino)
        member.mode = stat.S_IMODE(inode.mode)
        member.uid, member.gid = inode.uid, inode.gid
        member.uname = member.gname = ""
        member.mtime = inode.mtime_ns // 1_000_000_000
        pax = {}
        if inode.mtime_ns % 1_000_000_000:
            pax["mtime"] = _format_ns(inode.mtime_ns)
        if inode.has_xattrs:
            for xname in store.listxattr(number, ino):
                value = store._txn.get(
                    xattr_key(ino, owner, xname), db=store.dbs["xattrs"]
                )
                if value is not None:
                    key = "SCHILY.xattr." + xname.decode("utf-8", "surrogateescape")
                    pax[key] = bytes(value).decode("utf-8", "surrogateescape")
        member.pax_headers = pax
        fmt = stat.S_IFMT(inode.mode)
        # Symlinks, device nodes and FIFOs may have hard links too, and
        # Docker's own archiver writes those as tar links as well. Sockets
        # are not written at all, so no link may point at one.
        if fmt not in (stat.S_IFDIR, stat.S_IFSOCK) and inode.nlink > 1:
            if ino in written:
                member.type = tarfile.LNKTYPE
                member.linkname = written[ino]
                return member, inode
            written[ino] = name
        if fmt == stat.S_IFDIR:
            member.type = tarfile.DIRTYPE
        elif fmt == stat.S_IFREG:
            member.type = tarfile.REGTYPE
            member.size = inode.size
        elif fmt == stat.S_IFLNK:
            member.type = tarfile.SYMTYPE
            member.linkname = inode.target.decode("utf-8", "surrogateescape")
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            member.type = tarfile.CHRTYPE if fmt == stat.S_IFCHR else tarfile.BLKTYPE
            member.devmajor, member.devminor = (
                os.major(inode.rdev),
                os.minor(inode.rdev),
            )
        elif fmt == stat.S_IFIFO:
            member.type = tarfile.FIFOTYPE
        else:
            # Sockets cannot be stored in a tar; Docker's own archiver skips them too.
            return None, inode
        return member, inode


def _format_ns(ns: int) -> str:
    """Format a time in nanoseconds since 1970 as a PAX time record.

    The sign applies to the whole number, so a time before 1970 is written
    from its absolute value, as Go's archive/tar writes it.
    """
    sign = "-" if ns < 0 else ""
    seconds, fraction = divmod(abs(ns), 1_000_000_000)
    return f"{sign}{seconds}.{fraction:09d}".rstrip("0").rstrip(".")
