"""lcfs-fsck: check a store offline and repair what it finds.

Phases run in a fixed order, each logged as "Checking X". With ``--repair``
each problem is fixed as soon as its phase finds it, so later phases see a
store that the earlier ones already made consistent. Without it nothing on
the device changes. A repair first marks the superblock ``needs_fsck``, so
the daemon will not open a device whose repair was interrupted; the mark is
cleared when a final check finds nothing left.

Exit codes: 0 clean, 1 problems found and all repaired, 4 problems left,
8 could not run (device busy, unreadable, bad arguments).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import stat
import sys
import time

from lcfs.journal import intents
from lcfs.store import Store, errors
from lcfs.store.data import OWNED, REFS, SHARED
from lcfs.store.format import (
    DIRENT,
    EXTENT,
    FLAG_XATTRS,
    MAGIC,
    ROOT_INO,
    U64,
    U64X2,
    Inode,
    Layer,
    change_dirent_key,
    change_inode_key,
    dirent_key,
    inode_key,
    split_dirent_key,
)

log = logging.getLogger("lcfs.fsck")

EXIT_CLEAN = 0
EXIT_REPAIRED = 1
EXIT_LEFT = 4
EXIT_FAILED = 8

EPILOG = """exit codes:
  0  the store is clean
  1  problems were found and all of them were repaired
  4  problems are left (run again with --repair)
  8  fsck could not run (device in use, unreadable, or bad arguments)
"""


class Progress:
    """A one-line progress counter on stderr for long phases."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.label = ""
        self.total = 0
        self.last = 0.0

    def start(self, label: str, total: int) -> None:
        self.label, self.total, self.last = label, total, 0.0

    def update(self, done: int) -> None:
        if not self.enabled or self.total < 1000:
            return
        now = time.monotonic()
        if now - self.last < 0.2 and done < self.total:
            return
        self.last = now
        width = 30
        filled = width * done // max(self.total, 1)
        sys.stderr.write(f"\r  {self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total}")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled and self.total >= 1000:
            sys.stderr.write("\r" + " " * 70 + "\r")
            sys.stderr.flush()


class Checker:
    """Runs the phases over an open store and keeps the tally of problems."""

    def __init__(self, store: Store, repair: bool, progress: Progress):
        self.store = store
        self.repair = repair
        self.progress = progress
        self.problems: list[dict] = []
        self.phase = ""
        self.docker_root: str | None = None
        self.grace = 3600.0

    # -- bookkeeping ---------------------------------------------------------

    def problem(self, message: str, fix=None, fix_text: str = "") -> None:
        """Record a problem; in repair mode apply ``fix`` and log what it changed."""
        entry = {"phase": self.phase, "problem": message, "repaired": False, "action": ""}
        if self.repair and fix is not None:
            self.store._write(fix)
            entry["repaired"] = True
            entry["action"] = fix_text
            log.warning("%s: %s; repair: %s", self.phase, message, fix_text)
        else:
            entry["action"] = f"--repair would {fix_text}" if fix is not None else "no repair available"
            log.warning("%s: %s; %s", self.phase, message, entry["action"])
        self.problems.append(entry)

    def run(self) -> None:
        store = self.store
        with store.lock:
            store._ready()
            for name in PHASES:
                method = getattr(self, f"check_{name}")
                self.phase = method.__doc__.strip().splitlines()[0].rstrip(".")
                log.info("Checking %s", self.phase)
                method()
                if self.repair:
                    store.commit()
            if self.docker_root:
                from tools.docker_refs import check_docker

                self.phase = "Docker references and stale files"
                log.info("Checking %s", self.phase)
                check_docker(self, self.docker_root, self.grace)
                if self.repair:
                    store.commit()

    @property
    def txn(self):
        # A repair commits between phases, which ends the group transaction.
        self.store._ready()
        return self.store._txn

    def db(self, name):
        return self.store.dbs[name]

    def cursor(self, name):
        return self.txn.cursor(db=self.db(name))

    # -- phases ------------------------------------------------------------------

    def check_superblock(self):
        """superblock"""
        sb = self.store.superblock
        if sb.get("magic") != MAGIC or sb.get("block_size") != 4096:
            self.problem(f"superblock has magic {sb.get('magic')!r} and block size {sb.get('block_size')}")
        for name in (b"next_ino", b"next_layer", b"next_node", b"next_intent"):
            raw = self.txn.get(name, db=self.db("meta"))
            if raw is None or len(raw) != 8:
                self.problem(f"counter {name.decode()} is missing or malformed",
                             lambda name=name: self.txn.put(name, U64.pack(1 << 40), db=self.db("meta")),
                             f"reset {name.decode()} past every number in use")  # fmt: skip

    def check_lmdb(self):
        """LMDB integrity"""
        sizes = {"layers": (8,), "children": (16,), "inodes": (16,), "extents": (24,), "free": (8,),
                 "nodes": (8,), "node_keys": (16,), "intents": (8,)}  # fmt: skip
        for name, lengths in sizes.items():
            bad = [bytes(k) for k, _ in self.cursor(name) if len(k) not in lengths]
            for key in bad:
                self.problem(f"malformed key {key.hex()} in database {name}",
                             lambda key=key, name=name: self.txn.delete(key, db=self.db(name)),
                             "delete the record")  # fmt: skip
        bad_dirents = [bytes(k) for k, _ in self.cursor("dirents") if len(k) < 18 or k[-9:-8] != b"\0"]
        for key in bad_dirents:
            self.problem(f"malformed directory entry key {key.hex()}",
                         lambda key=key: self.txn.delete(key, db=self.db("dirents")),
                         "delete the record")  # fmt: skip

    def check_layers(self):
        """layer tree"""
        store = self.store
        layers = {}
        for key, value in self.cursor("layers"):
            number = U64.unpack(key)[0]
            try:
                layers[number] = Layer.unpack(number, value)
            except (ValueError, KeyError) as exc:
                self.problem(f"layer record {number} is unreadable: {exc}")
        for number, layer in sorted(layers.items()):
            seen = set()
            current = layer
            while current is not None and current.parent is not None:
                if current.number in seen:
                    self.problem(f"layer {layer.id} is part of a parent cycle",
                                 lambda n=number: self._remove_layer_records(n),
                                 f"remove layer {layer.id} and its records")  # fmt: skip
                    break
                seen.add(current.number)
                parent = layers.get(current.parent)
                if parent is None:
                    if current is layer:
                        self.problem(f"layer {layer.id} (number {number}) has missing parent {layer.parent}",
                                     lambda n=number: self._remove_layer_records(n),
                                     f"remove layer {layer.id} and its records")  # fmt: skip
                    break
                current = parent
        ids = {bytes(k).decode(): U64.unpack(v)[0] for k, v in self.cursor("layer_ids")}
        for number, layer in layers.items():
            if ids.get(layer.id) != number:
                self.problem(f"layer {layer.id} is missing from the id index",
                             lambda layer=layer: self.txn.put(layer.id.encode(), U64.pack(layer.number),
                                                              db=self.db("layer_ids")),
                             "add it")  # fmt: skip
        for layer_id, number in ids.items():
            if number not in layers:
                self.problem(f"id index names layer {layer_id} (number {number}) that does not exist",
                             lambda layer_id=layer_id: self.txn.delete(layer_id.encode(), db=self.db("layer_ids")),
                             "delete the index entry")  # fmt: skip
        children = {U64X2.unpack(k) for k, _ in self.cursor("children")}
        expected = {(layer.parent, number) for number, layer in layers.items() if layer.parent in layers}
        for pair in expected - children:
            self.problem(f"child link {pair[0]} -> {pair[1]} is missing",
                         lambda pair=pair: self.txn.put(U64X2.pack(*pair), b"", db=self.db("children")),
                         "add it")  # fmt: skip
        for pair in children - expected:
            self.problem(f"stale child link {pair[0]} -> {pair[1]}",
                         lambda pair=pair: self.txn.delete(U64X2.pack(*pair), db=self.db("children")),
                         "delete it")  # fmt: skip
        for parent, _ in expected:
            layer = layers[parent]
            if not layer.frozen:
                self.problem(f"layer {layer.id} has children but is not frozen",
                             lambda layer=layer: self._freeze(layer), "freeze it")  # fmt: skip
        for number, layer in layers.items():
            parent = layers.get(layer.parent) if layer.parent is not None else None
            depth = parent.depth + 1 if parent else 0
            if parent is not None or layer.parent is None:
                if layer.depth != depth:
                    self.problem(f"layer {layer.id} has depth {layer.depth}, expected {depth}",
                                 lambda layer=layer, depth=depth: self._set_depth(layer, depth),
                                 "fix the depth")  # fmt: skip
        self._reload_layers()

    def _freeze(self, layer: Layer) -> None:
        layer.frozen = True
        self.txn.put(U64.pack(layer.number), layer.pack(), db=self.db("layers"))

    def _set_depth(self, layer: Layer, depth: int) -> None:
        layer.depth = depth
        self.txn.put(U64.pack(layer.number), layer.pack(), db=self.db("layers"))

    def _remove_layer_records(self, number: int) -> None:
        """Delete a layer, its descendants and every record they own."""
        txn = self.txn
        doomed = {number}
        changed = True
        records = {U64.unpack(k)[0]: Layer.unpack(U64.unpack(k)[0], v) for k, v in self.cursor("layers")}
        while changed:
            changed = False
            for n, layer in records.items():
                if layer.parent in doomed and n not in doomed:
                    doomed.add(n)
                    changed = True
        for n in doomed:
            for key, _ in list(self.store._prefix_items(self.db("changes"), U64.pack(n))):
                txn.delete(key, db=self.db("changes"))
            layer = records.get(n)
            if layer is not None:
                txn.delete(layer.id.encode(), db=self.db("layer_ids"))
            txn.delete(U64.pack(n), db=self.db("layers"))
        self._delete_where("inodes", lambda k: U64.unpack_from(k, 8)[0] in doomed)
        self._delete_where("xattrs", lambda k: U64.unpack_from(k, 8)[0] in doomed)
        self._delete_where("dirents", lambda k: U64.unpack_from(k, len(k) - 8)[0] in doomed)
        self._delete_where("children", lambda k: U64X2.unpack(k)[0] in doomed or U64X2.unpack(k)[1] in doomed)
        for key, value in list(self.cursor("extents")):
            if U64.unpack_from(key, 8)[0] in doomed:
                phys, count, owned = EXTENT.unpack(value)
                txn.delete(key, db=self.db("extents"))
        # Blocks the removed extents owned are returned by the free-space phase.

    def _delete_where(self, name: str, predicate) -> None:
        for key in [bytes(k) for k, _ in self.cursor(name) if predicate(bytes(k))]:
            self.txn.delete(key, db=self.db(name))

    def _reload_layers(self) -> None:
        store = self.store
        store._layers.clear()
        store._ids.clear()
        store._children.clear()
        store._clear_caches()
        for key, value in self.cursor("layers"):
            number = U64.unpack(key)[0]
            layer = Layer.unpack(number, value)
            store._layers[number] = layer
            store._ids[layer.id] = number
        for key, _ in self.cursor("children"):
            parent, child = U64X2.unpack(key)
            store._children.setdefault(parent, set()).add(child)

    def check_intents(self):
        """journal intents"""
        from lcfs.journal.recovery import recover

        pending = intents.pending(self.txn, self.db("intents"))
        for number, intent in pending:
            what = {"apply": "unfinished import into", "remove": "unfinished removal of",
                    "orphan": "unfreed unlinked inode in"}.get(intent.get("kind"), "unknown intent for")  # fmt: skip
            self.problem(f"intent {number}: {what} layer {intent.get('id', intent.get('layer'))}",
                         lambda: None, "finish or roll it back")  # fmt: skip
        if pending and self.repair:
            self.store.commit()
            recover(self.store)
            self.store._ready()

    def check_inodes(self):
        """inodes and link counts"""
        store = self.store
        layers = store._layers
        orphans = []
        owned: dict[int, list[int]] = {}
        for key, value in self.cursor("inodes"):
            ino, number = U64X2.unpack(key)
            if number not in layers:
                orphans.append(bytes(key))
                continue
            try:
                Inode.unpack(ino, value)
            except Exception as exc:  # noqa: BLE001 - any decoding failure is corruption
                self.problem(f"inode {ino} of layer {layers[number].id} is unreadable: {exc}")
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
            if not store._has_changes(number) and inos == [ROOT_INO] and layer.parent is None:
                pass
            names = self._count_names(number)
            for ino in inos:
                if self.txn.get(change_inode_key(number, ino), db=self.db("changes")) is None and not (
                        ino == ROOT_INO and layer.parent is None):  # fmt: skip
                    self.problem(f"inode {ino} of layer {layer.id} is missing from the change log",
                                 lambda n=number, i=ino: store._log_inode(n, i), "add it")  # fmt: skip
                inode = Inode.unpack(ino, self.txn.get(inode_key(ino, number), db=self.db("inodes")))
                expected = names.get(ino, 0)
                if inode.is_dir and expected:
                    expected = 2 + names.get(("subdirs", ino), 0)
                if ino == ROOT_INO:
                    expected = 2 + names.get(("subdirs", ino), 0)
                if expected == 0 and inode.nlink:
                    self.problem(f"inode {ino} of layer {layer.id} has {inode.nlink} links but no name",
                                 lambda n=number, i=ino: self._free_unreachable(n, i),
                                 "free it")  # fmt: skip
                elif expected and inode.nlink != expected:
                    self.problem(f"inode {ino} of layer {layer.id} has link count {inode.nlink}, "
                                 f"expected {expected}",
                                 lambda n=number, i=ino, e=expected: self._set_nlink(n, i, e),
                                 f"set it to {expected}")  # fmt: skip
        self.progress.done()

    def _count_names(self, number: int) -> dict:
        """Walk a layer's tree; count names per inode and subdirectories per directory."""
        store = self.store
        counts: dict = {}
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
            for _, ino in store._entries(number, dir_inode).items():
                counts[ino] = counts.get(ino, 0) + 1
                try:
                    child = store._inode(number, ino)
                except errors.NotFound:
                    continue
                if child.is_dir:
                    counts[("subdirs", dir_ino)] = counts.get(("subdirs", dir_ino), 0) + 1
                    stack.append(ino)
        return counts

    def _set_nlink(self, number: int, ino: int, nlink: int) -> None:
        inode = Inode.unpack(ino, self.txn.get(inode_key(ino, number), db=self.db("inodes")))
        inode.nlink = nlink
        self.store._put_inode(number, inode)

    def _free_unreachable(self, number: int, ino: int) -> None:
        self._set_nlink(number, ino, 0)
        self.store._destroy_inode(number, ino)

    def check_dirents(self):
        """directory entries"""
        store = self.store
        layers = store._layers
        problems = []
        for key, value in self.cursor("dirents"):
            dir_ino, name, number = split_dirent_key(bytes(key))
            if number not in layers:
                problems.append(("missing layer", bytes(key), dir_ino, name, number))
                continue
            if self.txn.get(change_dirent_key(number, dir_ino, name), db=self.db("changes")) is None:
                problems.append(("unlogged", bytes(key), dir_ino, name, number))
            if not value:
                continue
            ino, kind = DIRENT.unpack(value)
            try:
                inode = store._inode(number, ino)
            except errors.NotFound:
                problems.append(("dangling", bytes(key), dir_ino, name, number))
                continue
            if stat.S_IFMT(inode.mode) >> 12 != kind:
                problems.append(("type", bytes(key), dir_ino, name, number))
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

    def _drop_entry(self, number: int, dir_ino: int, name: bytes) -> None:
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
        holders = {}
        for key, _ in self.cursor("xattrs"):
            pair = U64X2.unpack_from(key)
            holders.setdefault(pair, []).append(bytes(key))
        for (ino, number), keys in holders.items():
            raw = self.txn.get(inode_key(ino, number), db=self.db("inodes"))
            if raw is None:
                self.problem(f"{len(keys)} xattrs of inode {ino} in layer {number} have no inode",
                             lambda keys=keys: [self.txn.delete(k, db=self.db("xattrs")) for k in keys],
                             "delete them")  # fmt: skip
            elif not Inode.unpack(ino, raw).has_xattrs:
                self.problem(f"inode {ino} in layer {number} has xattrs but no xattr flag",
                             lambda ino=ino, n=number: self._set_xattr_flag(n, ino, True),
                             "set the flag")  # fmt: skip
        for key, value in self.cursor("inodes"):
            ino, number = U64X2.unpack(key)
            if Inode.unpack(ino, value).has_xattrs and (ino, number) not in holders:
                self.problem(f"inode {ino} in layer {number} is flagged with xattrs but has none",
                             lambda ino=ino, n=number: self._set_xattr_flag(n, ino, False),
                             "clear the flag")  # fmt: skip

    def _set_xattr_flag(self, number: int, ino: int, on: bool) -> None:
        inode = Inode.unpack(ino, self.txn.get(inode_key(ino, number), db=self.db("inodes")))
        inode.flags = inode.flags | FLAG_XATTRS if on else inode.flags & ~FLAG_XATTRS
        self.store._put_inode(number, inode)

    def check_extents(self):
        """file extents"""
        store = self.store
        limit = store.data_blocks
        owned: list[tuple[int, int, bytes]] = []
        borrowed: list[tuple[int, int, int, int, bytes]] = []
        shared: list[tuple[int, int]] = []
        mapped: dict[tuple[int, int], int] = {}
        bad = []
        for key, value in self.cursor("extents"):
            ino, number, block = U64.unpack_from(key)[0], U64.unpack_from(key, 8)[0], U64.unpack_from(key, 16)[0]
            phys, count, flag = EXTENT.unpack(value)
            key = bytes(key)
            if self.txn.get(inode_key(ino, number), db=self.db("inodes")) is None:
                bad.append((f"extent at file block {block} of inode {ino} in layer {number} has no inode", key))
                continue
            if count == 0 or phys + count > limit:
                bad.append((f"extent {phys}..{phys + count - 1} of inode {ino} is outside the data region", key))
                continue
            mapped[(ino, number)] = mapped.get((ino, number), 0) + count
            if flag == OWNED:
                owned.append((phys, count, key))
            elif flag == SHARED:
                shared.append((phys, count))
            else:
                borrowed.append((phys, count, ino, number, key))
        for message, key in bad:
            self.problem(message, lambda key=key: self._drop_extent(key, free=True), "remove it")
        shared_runs = _coverage(shared)
        self._check_refs(shared_runs)
        owned.extend((lo, hi - lo, None) for lo, hi, _ in shared_runs)
        owned.sort(key=lambda item: (item[0], item[2] is not None))
        previous_end, previous_key = -1, None
        clean_owned = []
        for phys, count, key in owned:
            if key is None:
                if phys < previous_end:
                    self.problem(f"blocks {phys}..{min(previous_end, phys + count) - 1} are shared and also "
                                 "owned by one extent")  # fmt: skip
                clean_owned.append((phys, count))
                previous_end = max(previous_end, phys + count)
                continue
            if phys < previous_end:
                self.problem(f"blocks {phys}..{min(previous_end, phys + count) - 1} are owned by two extents",
                             lambda key=key: self._drop_extent(key, free=False),
                             "unmap the second owner")  # fmt: skip
                continue
            clean_owned.append((phys, count))
            previous_end, previous_key = phys + count, key
        del previous_key
        starts = [p for p, _ in clean_owned]
        import bisect

        for phys, count, ino, number, key in borrowed:
            i = bisect.bisect_right(starts, phys) - 1
            if i < 0 or phys + count > clean_owned[i][0] + clean_owned[i][1]:
                self.problem(f"borrowed extent {phys}..{phys + count - 1} of inode {ino} in layer {number} "
                             "points at blocks no layer owns",
                             lambda key=key: self._drop_extent(key, free=False), "unmap it")  # fmt: skip
        for key, value in self.cursor("inodes"):
            ino, number = U64X2.unpack(key)
            inode = Inode.unpack(ino, value)
            actual = mapped.get((ino, number), 0)
            if inode.blocks != actual and inode.nlink:
                self.problem(f"inode {ino} in layer {number} counts {inode.blocks} blocks, maps {actual}",
                             lambda ino=ino, n=number, a=actual: self._set_blocks(n, ino, a),
                             f"set it to {actual}")  # fmt: skip
        self.owned = clean_owned

    def _check_refs(self, runs: list[tuple[int, int, int]]) -> None:
        """Compare the refs database with the number of shared extents mapping each block."""
        recorded = [(U64.unpack(k)[0], *REFS.unpack(v)) for k, v in self.cursor("refs")]
        recorded = [(p, p + c, r) for p, c, r in recorded]
        if _normalise(recorded) != _normalise(runs):
            self.problem(f"reference counts of shared blocks disagree with the {len(runs)} shared runs mapped",
                         lambda runs=runs: self._rewrite_refs(runs), "rewrite the reference counts")  # fmt: skip

    def _rewrite_refs(self, runs: list[tuple[int, int, int]]) -> None:
        for key in [bytes(k) for k, _ in self.cursor("refs")]:
            self.txn.delete(key, db=self.db("refs"))
        for lo, hi, refs in runs:
            self.txn.put(U64.pack(lo), REFS.pack(hi - lo, refs), db=self.db("refs"))

    def _drop_extent(self, key: bytes, free: bool) -> None:
        value = self.txn.get(key, db=self.db("extents"))
        if value is None:
            return
        self.txn.delete(key, db=self.db("extents"))

    def _set_blocks(self, number: int, ino: int, blocks: int) -> None:
        inode = Inode.unpack(ino, self.txn.get(inode_key(ino, number), db=self.db("inodes")))
        inode.blocks = blocks
        self.store._put_inode(number, inode)

    def check_free_space(self):
        """free-space map"""
        store = self.store
        limit = store.data_blocks
        owned = sorted((p, c) for p, c, _ in self._owned_extents())
        free = sorted((U64.unpack(k)[0], U64.unpack(v)[0]) for k, v in self.cursor("free"))
        events = []
        for p, c in owned:
            events.append((p, c, "owned"))
        for p, c in free:
            if c == 0 or p + c > limit:
                self.problem(f"free extent {p}..{p + c - 1} is outside the data region",
                             lambda p=p: self.txn.delete(U64.pack(p), db=self.db("free")), "delete it")  # fmt: skip
                continue
            events.append((p, c, "free"))
        events.sort()
        cursor_block = 0
        leaks = []
        overlaps = []
        for p, c, kind in events:
            if p > cursor_block:
                leaks.append((cursor_block, p - cursor_block))
            elif p < cursor_block:
                overlaps.append((p, min(cursor_block, p + c) - p, kind))
            cursor_block = max(cursor_block, p + c)
        if cursor_block < limit:
            leaks.append((cursor_block, limit - cursor_block))
        for p, c, kind in overlaps:
            self.problem(f"blocks {p}..{p + c - 1} are both mapped and in the free map",
                         lambda p=p, c=c: self._take_from_free(p, c), "remove them from the free map")  # fmt: skip
        for p, c in leaks:
            self.problem(f"{c} blocks at {p}..{p + c - 1} are neither mapped nor free",
                         lambda p=p, c=c: self._release(p, c), f"free {c} unreferenced blocks")  # fmt: skip
        store.alloc.count(self.txn)

    def _owned_extents(self):
        shared = []
        for key, value in self.cursor("extents"):
            phys, count, flag = EXTENT.unpack(value)
            if flag == OWNED:
                yield phys, count, bytes(key)
            elif flag == SHARED:
                shared.append((phys, count))
        for lo, hi, _ in _coverage(shared):
            yield lo, hi - lo, None

    def _take_from_free(self, start: int, count: int) -> None:
        end = start + count
        for key, value in list(self.cursor("free")):
            p, c = U64.unpack(key)[0], U64.unpack(value)[0]
            if p < end and start < p + c:
                self.txn.delete(key, db=self.db("free"))
                if p < start:
                    self.txn.put(U64.pack(p), U64.pack(start - p), db=self.db("free"))
                if p + c > end:
                    self.txn.put(U64.pack(end), U64.pack(p + c - end), db=self.db("free"))
        self.store.alloc.count(self.txn)

    def _release(self, start: int, count: int) -> None:
        self.store.alloc.count(self.txn)
        self.store.alloc.release(self.txn, start, count)

    def check_change_logs(self):
        """change logs"""
        layers = self.store._layers
        stale = []
        for key, _ in self.cursor("changes"):
            key = bytes(key)
            number = U64.unpack_from(key)[0]
            if number not in layers:
                stale.append((key, f"change log entry of missing layer {number}"))
                continue
            if key[8:9] == b"i":
                ino = U64.unpack_from(key, 9)[0]
                if self.txn.get(inode_key(ino, number), db=self.db("inodes")) is None:
                    stale.append((key, f"change log of layer {layers[number].id} names inode {ino}, "
                                       "which the layer does not have"))  # fmt: skip
            elif key[8:9] == b"d":
                dir_ino = U64.unpack_from(key, 9)[0]
                if self.txn.get(dirent_key(dir_ino, key[17:], number), db=self.db("dirents")) is None:
                    stale.append((key, f"change log of layer {layers[number].id} names an entry in "
                                       f"directory {dir_ino} that the layer does not have"))  # fmt: skip
            else:
                stale.append((key, f"malformed change log key {key.hex()}"))
        for key, message in stale:
            self.problem(message, lambda key=key: self.txn.delete(key, db=self.db("changes")), "delete it")

    def check_nodes(self):
        """node ids and counters"""
        top_node = 1
        for key, value in self.cursor("nodes"):
            node = U64.unpack(key)[0]
            top_node = max(top_node, node)
            back = self.txn.get(bytes(value), db=self.db("node_keys"))
            if back is None or U64.unpack(back)[0] != node:
                self.problem(f"node id {node} has no matching reverse entry",
                             lambda node=node, value=bytes(value): self.txn.put(value, U64.pack(node),
                                                                                db=self.db("node_keys")),
                             "add it")  # fmt: skip
        top = {
            b"next_node": top_node,
            b"next_ino": max((U64.unpack_from(k)[0] for k, _ in self.cursor("inodes")), default=1),
            b"next_layer": max((U64.unpack(k)[0] for k, _ in self.cursor("layers")), default=0),
            b"next_intent": max((U64.unpack(k)[0] for k, _ in self.cursor("intents")), default=0),
        }
        for name, highest in top.items():
            value = U64.unpack(self.txn.get(name, db=self.db("meta")))[0]
            if value <= highest:
                self.problem(f"counter {name.decode()} is {value} but {highest} is in use",
                             lambda name=name, highest=highest: self.txn.put(name, U64.pack(highest + 1),
                                                                            db=self.db("meta")),
                             f"set it to {highest + 1}")  # fmt: skip


def _coverage(extents: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """Return (start, end, how many extents cover it) for the blocks some extent covers."""
    events: dict[int, int] = {}
    for phys, count in extents:
        events[phys] = events.get(phys, 0) + 1
        events[phys + count] = events.get(phys + count, 0) - 1
    runs = []
    depth = 0
    previous = None
    for point in sorted(events):
        if depth and previous is not None and point > previous:
            runs.append((previous, point, depth))
        depth += events[point]
        previous = point
    return _normalise(runs)


def _normalise(runs) -> list[tuple[int, int, int]]:
    """Merge touching runs with equal counts, so equal coverage compares equal."""
    merged: list[list[int]] = []
    for lo, hi, refs in sorted(runs):
        if merged and merged[-1][1] == lo and merged[-1][2] == refs:
            merged[-1][1] = hi
        else:
            merged.append([lo, hi, refs])
    return [tuple(run) for run in merged]


PHASES = (
    "superblock",
    "lmdb",
    "layers",
    "intents",
    "inodes",
    "dirents",
    "xattrs",
    "extents",
    "free_space",
    "change_logs",
    "nodes",
)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="lcfs-fsck",
        description="Check an lcfs store offline and, with --repair, fix what is wrong.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("device", help="image file or block device holding the store")
    parser.add_argument("--repair", action="store_true", help="fix the problems found")
    parser.add_argument("--yes", action="store_true", help="repair without asking for confirmation")
    parser.add_argument("--docker-root", help="Docker's data root, to find orphaned layers and stale files")
    parser.add_argument("--grace", type=float, default=3600.0,
                        help="seconds a layer must be old before it counts as an orphan (default 3600)")  # fmt: skip
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="show progress bars on long phases (default: when stderr is a terminal)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(message)s", stream=sys.stderr)
    progress = Progress(sys.stderr.isatty() if args.progress is None else args.progress)
    if args.repair and not args.yes:
        if not sys.stdin.isatty():
            print(f"lcfs-fsck: --repair changes {args.device}; pass --yes to confirm", file=sys.stderr)
            return EXIT_FAILED
        answer = input(f"Repair the store on {args.device}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            return EXIT_FAILED
    try:
        store = Store.open(args.device, recover=False, readonly=not args.repair, for_fsck=True)
    except errors.StoreError as exc:
        print(f"lcfs-fsck: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"lcfs-fsck: cannot open {args.device}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILED
    try:
        if args.repair:
            with store.lock:
                store._ready()
                store._set_state("dirty", needs_fsck=True)
                store.commit()
        checker = Checker(store, args.repair, progress)
        checker.docker_root, checker.grace = args.docker_root, args.grace
        checker.run()
        found = len(checker.problems)
        left = sum(1 for p in checker.problems if not p["repaired"])
        if args.repair and found:
            verify = Checker(store, False, progress)
            logging.getLogger("lcfs.fsck").disabled = True
            try:
                verify.run()
            finally:
                logging.getLogger("lcfs.fsck").disabled = False
            left = len(verify.problems)
        if args.repair and left == 0:
            with store.lock:
                store._ready()
                store.superblock.pop("needs_fsck", None)
                store._set_state("dirty")
                store.commit()
        stats = store.statfs()
        layer_count = len(store._layers)
    finally:
        if store.readonly:
            with store.lock:
                if store._group is not None:
                    store._group.abort()
                    store._group = None
        store.close()
    code = EXIT_CLEAN if found == 0 else (EXIT_REPAIRED if left == 0 else EXIT_LEFT)
    summary = (f"{args.device}: {found} problems found, {found - left if args.repair else 0} repaired, "
               f"{left} left; {layer_count} layers, {stats.free_blocks} of {stats.total_blocks} blocks free")  # fmt: skip
    log.info("%s", summary)
    if args.json:
        print(json.dumps({"device": args.device, "exit_code": code, "found": found, "left": left,
                          "layers": layer_count, "free_blocks": stats.free_blocks,
                          "total_blocks": stats.total_blocks, "problems": checker.problems}))  # fmt: skip
    else:
        print(summary)
    return code


if __name__ == "__main__":
    sys.exit(main())
