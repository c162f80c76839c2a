"""The inode, directory entry and xattr phases of lcfs-fsck (a mixin of ``Checker``)."""

from __future__ import annotations

import logging
import stat

from lcfs.store import errors
from lcfs.store.format import (
    DIRENT,
    FLAG_XATTRS,
    ROOT_INO,
    U64,
    U64X2,
    Inode,
    change_dirent_key,
    change_inode_key,
    dirent_key,
    inode_key,
    split_dirent_key,
)

log = logging.getLogger("lcfs.fsck")


class NamespaceChecks:
    """Phases of ``Checker`` for inodes and link counts, directory entries and xattrs."""

    def check_inodes(self):
        """inodes and link counts"""
        store = self.store
        layers = store._layers
        orphans = []
        owned: dict[int, list[int]] = {}
        for key, _ in self.records("inodes"):
            ino, number = U64X2.unpack(key)
            if number in self.skip:
                continue
            if number not in layers:
                orphans.append(key)
                continue
            owned.setdefault(number, []).append(ino)
        for key in orphans:
            ino, number = U64X2.unpack(key)
            self.problem(f"inode {ino} belongs to missing layer {number}",
                         lambda key=key: self.txn.delete(key, db=self.db("inodes")), "delete it")  # fmt: skip
        self.progress.start("link counts", len(owned))
        for index, (number, inos) in enumerate(sorted(owned.items())):
            self.progress.update(index)
            layer = layers[number]
            names = self._count_names(number)
            for ino in inos:
                if self.txn.get(change_inode_key(number, ino), db=self.db("changes")) is None and not (
                        ino == ROOT_INO and layer.parent is None):  # fmt: skip
                    self.problem(f"inode {ino} of layer {layer.id} is missing from the change log",
                                 lambda n=number, i=ino: store._log_inode(n, i), "add it")  # fmt: skip
                inode = Inode.unpack(ino, self.txn.get(inode_key(ino, number), db=self.db("inodes")))
                expected = names.get(ino, 0)
                if (inode.is_dir and expected) or ino == ROOT_INO:
                    expected = 2 + names.get(("subdirs", ino), 0)
                if expected == 0 and inode.nlink:
                    self.problem(f"inode {ino} of layer {layer.id} has {inode.nlink} links but no name",
                                 lambda n=number, i=ino: self._free_unreachable(n, i),
                                 "free it")  # fmt: skip
                elif expected and inode.nlink != expected:
                    self.problem(f"inode {ino} of layer {layer.id} has link count {inode.nlink}, "
                                 f"expected {expected}",
                                 lambda n=number, i=ino, e=expected: self._update_inode(n, i, nlink=e),
                                 f"set it to {expected}")  # fmt: skip
        self.progress.done()

    def _count_names(self, number: int) -> dict:
        """Walk a layer's tree; count names per inode and subdirectories per directory."""
        return self._walk_names(number)[0]

    def _walk_names(self, number: int) -> tuple[dict, dict[int, list[tuple[int, bytes]]]]:
        """Walk a layer's tree; return the name counts and the (directory, name) of every subdirectory."""
        if number in self._walks:
            return self._walks[number]
        self._walks[number] = result = self._walk_tree(number)
        return result

    def _walk_tree(self, number: int) -> tuple[dict, dict[int, list[tuple[int, bytes]]]]:
        store = self.store
        counts: dict = {}
        places: dict[int, list[tuple[int, bytes]]] = {}
        stack = [ROOT_INO]
        visited = set()
        while stack:
            dir_ino = stack.pop()
            if dir_ino in visited:
                continue
            visited.add(dir_ino)
            try:
                dir_inode = store._inode(number, dir_ino)
            except errors.NotFound:
                continue
            for name, ino in store._entries(number, dir_inode).items():
                counts[ino] = counts.get(ino, 0) + 1
                try:
                    child = store._inode(number, ino)
                except errors.NotFound:
                    continue
                if child.is_dir:
                    counts[("subdirs", dir_ino)] = counts.get(("subdirs", dir_ino), 0) + 1
                    places.setdefault(ino, []).append((dir_ino, name))
                    stack.append(ino)
        return counts, places

    def _update_inode(self, number: int, ino: int, **fields) -> Inode:
        """Change fields of layer ``number``'s own record of ``ino``."""
        inode = Inode.unpack(ino, self.txn.get(inode_key(ino, number), db=self.db("inodes")))
        for name, value in fields.items():
            setattr(inode, name, value)
        self.store._put_inode(number, inode)
        return inode

    def _free_unreachable(self, number: int, ino: int) -> None:
        """Free a layer's inode that no name reaches, with the layer's entries inside it."""
        inode = self._update_inode(number, ino, nlink=0)
        if inode.is_dir:
            for key, _ in list(self.store._prefix_items(self.db("dirents"), U64.pack(ino))):
                _, name, layer = split_dirent_key(key)
                if layer == number:
                    self.txn.delete(key, db=self.db("dirents"))
                    self.txn.delete(change_dirent_key(number, ino, name), db=self.db("changes"))
        self.store._destroy_inode(number, ino)

    def check_dirents(self):
        """directory entries"""
        store = self.store
        layers = store._layers
        problems = []
        for key, value in self.records("dirents"):
            dir_ino, name, number = split_dirent_key(key)
            if number in self.skip:
                continue
            if number not in layers:
                problems.append(("missing layer", key, dir_ino, name, number))
                continue
            if self.txn.get(change_dirent_key(number, dir_ino, name), db=self.db("changes")) is None:
                problems.append(("unlogged", key, dir_ino, name, number))
            if not value:
                continue
            ino, kind = DIRENT.unpack(value)
            try:
                inode = store._inode(number, ino)
            except errors.NotFound:
                problems.append(("dangling", key, dir_ino, name, number))
                continue
            if stat.S_IFMT(inode.mode) >> 12 != kind:
                problems.append(("type", key, dir_ino, name, number))
        for kind, key, dir_ino, name, number in problems:
            text = name.decode(errors="replace")
            if kind == "missing layer":
                self.problem(f"entry {text!r} in directory {dir_ino} belongs to missing layer {number}",
                             lambda key=key: self.txn.delete(key, db=self.db("dirents")), "delete it")  # fmt: skip
            elif kind == "unlogged":
                self.problem(f"entry {text!r} in directory {dir_ino} of layer {layers[number].id} is "
                             "missing from the change log",
                             lambda n=number, d=dir_ino, nm=name: self.txn.put(
                                 change_dirent_key(n, d, nm), b"", db=self.db("changes")),
                             "add it")  # fmt: skip
            elif kind == "dangling":
                self.problem(f"entry {text!r} in directory {dir_ino} of layer {layers[number].id} "
                             "points to a missing inode",
                             lambda n=number, d=dir_ino, nm=name: self._drop_entry(n, d, nm),
                             "remove the entry")  # fmt: skip
            else:
                self.problem(f"entry {text!r} in directory {dir_ino} of layer {layers[number].id} "
                             "has the wrong file type",
                             lambda key=key, n=number: self._fix_type(key, n), "fix the type")  # fmt: skip
        linked: dict[int, list[int]] = {}
        for key, value in self.records("inodes"):
            ino, number = U64X2.unpack(key)
            if number in layers and number not in self.skip and ino != ROOT_INO and Inode.unpack(ino, value).nlink:
                linked.setdefault(number, []).append(ino)
        for number in sorted(layers):
            if number not in self.skip:
                self._check_directory_names(number)
                self._reconnect_unreachable(number, linked.get(number, []))

    def _check_directory_names(self, number: int) -> None:
        """Report directories with more than one name; the root directory has none.

        A directory keeps the name its record gives as its primary link. An
        extra name whose entry an ancestor layer owns is reported for that layer.
        """
        store = self.store
        layer = store._layers[number]
        _, places = self._walk_names(number)
        for ino, entries in sorted(places.items()):
            if len(entries) < 2 and ino != ROOT_INO:
                continue
            keep = None
            if ino != ROOT_INO:
                inode = store._inode(number, ino)
                keep = (inode.parent, inode.name) if (inode.parent, inode.name) in entries else min(entries)
            for dir_ino, name in sorted(entries):
                if (dir_ino, name) == keep:
                    continue
                if self.txn.get(dirent_key(dir_ino, name, number), db=self.db("dirents")) is None:
                    continue
                self.problem(f"directory inode {ino} of layer {layer.id} has another name "
                             f"{name.decode(errors='replace')!r} in directory {dir_ino}",
                             lambda d=dir_ino, nm=name: self._drop_entry(number, d, nm),
                             "remove that name")  # fmt: skip

    def _reconnect_unreachable(self, number: int, inos: list[int]) -> None:
        """Link inodes that no name reaches back at the name their record gives.

        ``inos`` are the layer's inodes with links. One the root does not
        reach goes back as its record's primary name when that directory is
        reachable and the name is free; the link-count phase frees the rest.
        Without --repair the entries go into the check's transaction, which is
        never committed, so later phases see the tree as a repair leaves it.
        """
        store = self.store
        layer = store._layers[number]
        reachable = {key for key in self._count_names(number) if isinstance(key, int)}
        waiting = sorted(ino for ino in inos if ino not in reachable)
        progress = True
        while waiting and progress:
            progress = False
            for ino in waiting:
                inode = store._inode(number, ino)
                if inode.parent not in reachable | {ROOT_INO} or not inode.name:
                    continue
                try:
                    parent = store._dir(number, inode.parent)
                except errors.StoreError:
                    continue
                if store._entry(number, parent, inode.name) is not None:
                    continue
                name = inode.name.decode(errors="replace")
                self.problem(f"inode {ino} of layer {layer.id} has links but no name reaches it",
                             lambda ino=ino, inode=inode: store._add_entry(number, inode.parent, inode.name, inode),
                             f"link it back as {name!r} in directory {inode.parent}", always=True)  # fmt: skip
                store._clear_caches()
                reachable = {key for key in self._count_names(number) if isinstance(key, int)}
                waiting = [i for i in waiting if i not in reachable]
                progress = True
                break

    def _drop_entry(self, number: int, dir_ino: int, name: bytes) -> None:
        """Remove a layer's entry; a tombstone keeps hiding the name if an ancestor has it."""
        store = self.store
        store._txn.delete(dirent_key(dir_ino, name, number), db=self.db("dirents"))
        parent = store._layers[number].parent
        inherited = False
        if parent is not None:
            try:
                inherited = store._entry(parent, store._inode(parent, dir_ino), name) is not None
            except errors.NotFound:
                inherited = False
        if inherited:
            store._txn.put(dirent_key(dir_ino, name, number), b"", db=self.db("dirents"))
        else:
            store._txn.delete(change_dirent_key(number, dir_ino, name), db=self.db("changes"))

    def _fix_type(self, key: bytes, number: int) -> None:
        ino, _ = DIRENT.unpack(self.txn.get(key, db=self.db("dirents")))
        inode = self.store._inode(number, ino)
        self.txn.put(key, DIRENT.pack(ino, stat.S_IFMT(inode.mode) >> 12), db=self.db("dirents"))

    def check_xattrs(self):
        """extended attributes"""
        holders: dict[tuple[int, int], list[bytes]] = {}
        for key, _ in self.records("xattrs"):
            pair = U64X2.unpack_from(key)
            if pair[1] not in self.skip:
                holders.setdefault(pair, []).append(key)
        for (ino, number), keys in sorted(holders.items()):
            raw = self.txn.get(inode_key(ino, number), db=self.db("inodes"))
            if raw is None:
                self.problem(f"{len(keys)} xattrs of inode {ino} in layer {number} have no inode",
                             lambda keys=keys: [self.txn.delete(k, db=self.db("xattrs")) for k in keys],
                             "delete them")  # fmt: skip
            elif not Inode.unpack(ino, raw).has_xattrs:
                self.problem(f"inode {ino} in layer {number} has xattrs but no xattr flag",
                             lambda ino=ino, n=number: self._set_xattr_flag(n, ino, True),
                             "set the flag")  # fmt: skip
        for key, value in self.records("inodes"):
            ino, number = U64X2.unpack(key)
            if number in self.skip:
                continue
            if Inode.unpack(ino, value).has_xattrs and (ino, number) not in holders:
                self.problem(f"inode {ino} in layer {number} is flagged with xattrs but has none",
                             lambda ino=ino, n=number: self._set_xattr_flag(n, ino, False),
                             "clear the flag")  # fmt: skip

    def _set_xattr_flag(self, number: int, ino: int, on: bool) -> None:
        flags = Inode.unpack(ino, self.txn.get(inode_key(ino, number), db=self.db("inodes"))).flags
        self._update_inode(number, ino, flags=flags | FLAG_XATTRS if on else flags & ~FLAG_XATTRS)
    # -- logs and counters -------------------------------------------------------------
