"""Layer tars: ApplyDiff imports one into a layer, Diff exports a layer's changes.

The tar dialect is Docker's: uncompressed, PAX or GNU headers, deletions as
``.wh.NAME`` whiteout files, and ``.wh..wh..opq`` in a directory that hides
everything older layers put there. Xattrs travel as ``SCHILY.xattr.NAME``
PAX records and nanosecond times as PAX ``mtime``/``atime`` records.

Import is atomic through an ``apply`` intent: it is committed before the
first member is written and removed in the commit that finishes the import,
so a crash rolls the layer's contents back on the next open, and a malformed
tar rolls them back at once.

Diff, Changes and DiffSize read the layer's change log (what the layer itself
wrote), not a walk of the whole tree.
"""

from __future__ import annotations

import base64
import logging
import os
import reprlib
import stat
import tarfile
import time

from lcfs.journal import intents
from lcfs.journal.crash import crash_point

from . import errors, tarstream
from .data import BORROWED, SHARED
from .diff import OPAQUE, WHITEOUT, DiffPlan
from .format import (
    BLOCK_SIZE,
    ROOT_INO,
    Inode,
    change_dirent_key,
    dirent_key,
    inode_key,
)
from .namespace import NAME_MAX, XATTR_SIZE_MAX, symlink_target_problem

log = logging.getLogger(__name__)

# Bytes of file content written per store call while importing.
CHUNK = 1 << 20
# Seconds between group commits during a long import.
COMMIT_INTERVAL = 1.0
# The maximum number of symbolic links that one path walk follows, as
# Linux's MAXSYMLINKS.
MAX_SYMLINKS = 40
# Namespaces of the xattr names that Linux stores on a file. ext4 and the
# kernel's overlayfs reject any other name with EOPNOTSUPP, and Docker's
# applier skips an xattr whose setxattr fails with EOPNOTSUPP.
# The system namespace takes only the POSIX ACL names.
XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.")
SYSTEM_XATTRS = (b"system.posix_acl_access", b"system.posix_acl_default")

# The magic numbers that start the compressed streams docker load and
# docker import accept. dockerd decompresses a layer before ApplyDiff, so
# ApplyDiff takes only uncompressed tars.
COMPRESSION_MAGIC = {
    b"\x1f\x8b": "gzip",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
}

_TYPE_MODES = {
    tarfile.REGTYPE: stat.S_IFREG,
    tarfile.AREGTYPE: stat.S_IFREG,
    tarfile.CONTTYPE: stat.S_IFREG,
    # A sparse member in GNU tar's own format (tar --sparse -H gnu), whose
    # map tarfile expands. Docker 20.10's applier rejects this type with
    # "unhandled tar header type 83" but reads PAX sparse members.
    tarfile.GNUTYPE_SPARSE: stat.S_IFREG,
    tarfile.FIFOTYPE: stat.S_IFIFO,
    tarfile.CHRTYPE: stat.S_IFCHR,
    tarfile.BLKTYPE: stat.S_IFBLK,
}


def _split(name: str, layer_id: str, link_of: str | None = None) -> list[bytes]:
    """Return the components of a member name, rejecting names that leave the layer.

    ``link_of`` is the name of the hard link whose target ``name`` is.
    """
    if link_of is None:
        subject = f"member name {name!r}"
    else:
        subject = f"member {link_of!r}: hard link target {name!r}"
    raw = name.encode("utf-8", "surrogateescape")
    if raw.startswith(b"/"):
        raise errors.BadArchive(f"layer {layer_id}: {subject} is absolute")
    # ".." is resolved by name, as Docker's own applier cleans member names,
    # so only a name that climbs above the layer's root is rejected.
    parts: list[bytes] = []
    for part in raw.split(b"/"):
        if part == b"..":
            if not parts:
                raise errors.BadArchive(f"layer {layer_id}: {subject} leaves the layer")
            parts.pop()
        elif part and part != b".":
            parts.append(part)
    return parts


def _xattrs(member: tarfile.TarInfo) -> dict[bytes, bytes]:
    found = {}
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            name = key[len("SCHILY.xattr.") :].encode("utf-8", "surrogateescape")
            found[name] = value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            name = key[len("LIBARCHIVE.xattr.") :].encode("utf-8", "surrogateescape")
            padded = value + "=" * (-len(value) % 4)
            found[name] = base64.b64decode(padded)
    return found


class TarMixin:
    # -- import ------------------------------------------------------------

    def apply_diff(self, layer_id: str, fileobj) -> int:
        """Apply a layer tar to an empty writable layer; return its content size in bytes."""
        with self.lock:
            layer = self.get_layer(layer_id)
            self._begin_apply(layer)
            self.commit()
            crash_point("apply.intent")
        started = time.monotonic()
        applier = _Applier(self, layer)
        try:
            first = fileobj.read(tarfile.BLOCKSIZE)
        except BaseException:
            self._roll_back_apply(layer)
            raise
        if not first:
            # An empty body is an empty layer, as Docker's own applier reads it.
            with self.lock:
                self._end_apply(layer)
                self.commit()
            return 0
        try:
            for member, data in tarstream.members(fileobj, first):
                applier.apply(member, data)
        except errors.BadArchive as exc:
            self._roll_back_apply(layer)
            compression = _compression(first) if applier.entries == 0 else None
            if compression is not None:
                raise errors.BadArchive(
                    f"layer {layer_id}: invalid layer tar: the body is a {compression}"
                    " stream, but ApplyDiff takes an uncompressed tar; decompress it"
                    " first"
                ) from exc
            if str(exc).startswith(f"layer {layer_id}:"):
                raise
            raise errors.BadArchive(f"layer {layer_id}: {exc}") from exc
        except errors.NoSpace as exc:
            self._roll_back_apply(layer)
            raise errors.NoSpace(f"layer {layer_id}: {exc}") from exc
        except (tarfile.TarError, EOFError, ValueError) as exc:
            self._roll_back_apply(layer)
            raise errors.BadArchive(
                f"layer {layer_id}: invalid layer tar: {exc}"
            ) from exc
        except BaseException:
            # Store errors, and OSError from a stream that broke off, keep their type.
            self._roll_back_apply(layer)
            raise
        with self.lock:
            applier.finish()
            crash_point("apply.finishing")
            self._end_apply(layer)
            self.commit()
        if applier.skipped_xattrs:
            name, member_name = applier.first_skipped_xattr
            log.warning(
                "layer %s: skipped %d xattrs whose names Linux does not accept on a"
                " file, as Docker's applier does; the first was %r of member %r",
                layer_id, applier.skipped_xattrs, name, member_name,
            )  # fmt: skip
        log.info("applied %d bytes (%d by reference) in %d entries to layer %s in %.2f s",
                 applier.size, applier.referenced, applier.entries, layer_id,
                 time.monotonic() - started)  # fmt: skip
        return applier.size

    def _begin_apply(self, layer) -> None:
        from .store import write_op

        def begin(self):
            self._writable(layer.number)
            if self._has_changes(layer.number):
                raise errors.Invalid(
                    f"layer {layer.id} already has content; apply a tar to a new layer"
                )
            self._applying[layer.number] = intents.begin(self._txn, self.dbs["intents"], self.dbs["meta"], "apply",
                                           layer=layer.number, id=layer.id)  # fmt: skip

        write_op(begin)(self)

    def _end_apply(self, layer) -> None:
        self._finish_intent(self._applying.pop(layer.number))

    def _roll_back_apply(self, layer) -> None:
        """Remove everything an unfinished import wrote, leaving the layer empty."""
        with self.lock:
            log.warning("rolling back the import into layer %s", layer.id)
            self.commit()
            self._purge(layer.number)
            self._reset_root(layer)
            self._finish_intent(self._applying.pop(layer.number))
            self.commit()

    def _reset_root(self, layer) -> None:
        from .store import write_op

        def reset(self):
            if layer.parent is None:
                now = time.time_ns()
                root = Inode(ROOT_INO, stat.S_IFDIR | 0o755, nlink=2, atime_ns=now, mtime_ns=now,
                             ctime_ns=now)  # fmt: skip
                self._put_inode(layer.number, root)

        write_op(reset)(self)

    # -- export ------------------------------------------------------------------

    def changes(self, layer_id: str) -> list[tuple[str, int]]:
        """Return (path, kind) for every path the layer changed against its parent."""
        with self.lock:
            plan = DiffPlan(self, self.get_layer(layer_id))
            return [
                (path.decode("utf-8", "surrogateescape"), kind)
                for path, kind in plan.changes()
            ]

    def diff_size(self, layer_id: str) -> int:
        with self.lock:
            plan = DiffPlan(self, self.get_layer(layer_id))
            return plan.size()

    def diff(self, layer_id: str):
        """Yield the layer's changes against its parent as an uncompressed tar, in chunks."""
        with self.lock:
            plan = DiffPlan(self, self.get_layer(layer_id))
            entries = plan.entries()
            # dockerd's commit applies this tar while it still streams, so the
            # layer becomes the source for references as soon as Diff starts;
            # ApplyDiff compares every byte with it before mapping anything.
            self._last_diff = plan.number
        written: dict[int, str] = {}
        layer = plan.number
        for path, kind, ino in entries:
            with self.lock:
                self._ready()
                self._layer(layer)
                try:
                    member, inode = plan.header(path, kind, ino, written)
                except errors.NotFound:
                    # A running container deleted it after the plan was made
                    # (docker commit --pause=false). Docker's own packer,
                    # TarWithOptions in its pkg/archive, also logs a file it
                    # cannot add and goes on.
                    log.debug("diff of layer %s: skipping %r, deleted while the "
                              "diff ran", plan.layer.id, path)  # fmt: skip
                    continue
            if member is None:
                continue
            yield member.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
            if member.type == tarfile.REGTYPE and member.size:
                yield from self._file_chunks(layer, inode.ino, member.size)
        # The end-of-archive marker: two zero blocks.
        yield bytes(2 * tarfile.BLOCKSIZE)

    def _file_chunks(self, layer: int, ino: int, size: int):
        """Yield ``size`` bytes of a file and the padding to the next tar block.

        A file that shrank or was deleted since its header was written is
        padded with zeros, so the stream stays a valid tar.
        """
        offset = 0
        deleted = False
        while offset < size:
            want = min(CHUNK, size - offset)
            data = b""
            if not deleted:
                try:
                    data = self.read(layer, ino, offset, want)
                except errors.LayerNotFound:
                    raise
                except errors.NotFound:
                    # Deleted after its header went out: zeros keep the tar valid.
                    deleted = True
            if len(data) < want:
                data += bytes(want - len(data))
            yield data
            offset += want
        remainder = size % tarfile.BLOCKSIZE
        if remainder:
            yield bytes(tarfile.BLOCKSIZE - remainder)


class _Applier:
    def __init__(self, store, layer):
        self.store = store
        self.layer = layer
        self.number = layer.number
        self.size = 0
        self.entries = 0
        self.dir_times: dict[int, tuple[int, int]] = {}
        # The inodes of the directories from the root down to each directory
        # path of the tar, for the parents of later members. A symbolic link
        # on the way makes them differ from the path. The cache is dropped
        # whenever an entry is removed anywhere in the store.
        self.dirs: dict[tuple[bytes, ...], tuple[int, ...]] = {}
        self.removals_seen = store.entry_removals
        # Bytes of file content mapped from another layer instead of written.
        self.referenced = 0
        # Xattrs left out because Linux rejects their names (XATTR_NAMESPACES),
        # and the name and member of the first one.
        self.skipped_xattrs = 0
        self.first_skipped_xattr: tuple[bytes, str] | None = None
        self.commit_interval = float(
            os.environ.get("LCFS_APPLY_COMMIT_INTERVAL", COMMIT_INTERVAL)
        )
        self.last_commit = time.monotonic()

    def apply(self, member: tarfile.TarInfo, data) -> None:
        parts = _split(member.name, self.layer.id)
        write = self.store._write
        self.entries += 1
        if parts and parts[-1].startswith(WHITEOUT):
            write(self._whiteout, parts)
        elif not parts:
            if member.isdir():
                write(self._set_metadata, ROOT_INO, member)
        elif member.isreg() and 0 < member.size <= CHUNK:
            # The content is read before the store lock is taken, because the
            # stream may wait for the network.
            content = self._read_content(member, data)
            write(self._create_small_file, parts, member, content)
            self.size += member.size
        elif member.isreg() and member.size:
            ino = write(self._create, parts, member)
            regions = tarstream.data_regions(member)
            if regions is None:
                self._copy_data(ino, parts, member, data)
            else:
                self._copy_regions(ino, member, data, regions)
            write(self._set_metadata, ino, member)
        else:
            write(self._create_with_metadata, parts, member)
            if member.issym():
                # overlay2 counts a symlink's lstat size, its target's length.
                self.size += len(member.linkname.encode("utf-8", "surrogateescape"))
        crash_point("apply.member")
        self._commit_if_due()

    def _create_with_metadata(self, parts: list[bytes], member: tarfile.TarInfo) -> None:
        ino = self._create(parts, member)
        if not member.islnk():
            self._set_metadata(ino, member)

    def _read_content(self, member: tarfile.TarInfo, data) -> bytes:
        content = data.read(member.size)
        while len(content) < member.size:
            more = data.read(member.size - len(content))
            if not more:
                raise errors.BadArchive(
                    f"layer {self.layer.id}: tar ends inside {member.name!r}"
                )
            content += more
        return content

    def _create_small_file(self, parts: list[bytes], member: tarfile.TarInfo,
                           content: bytes) -> None:  # fmt: skip
        """Create a regular file with all its content in one store operation.

        Like ``_copy_data``, it maps the blocks of the same file in the last
        diffed layer when they contain exactly ``content``. The store lock
        is held throughout, so the source cannot change between the
        comparison and the mapping.
        """
        ino = self._create(parts, member)
        source = self._reference_source(parts, member)
        if (
            source is not None
            and self.store.read(*source, 0, member.size) == content
            and self._map_reference(ino, source, member.size)
        ):
            self.referenced += member.size
        else:
            runs = _nonzero_runs(content, bytes(4096))
            if runs:
                self._write_runs(ino, 0, content, runs)
        self._set_metadata(ino, member)

    def _commit_if_due(self) -> None:
        due = time.monotonic() - self.last_commit >= self.commit_interval
        if due or self.store.group_is_large:
            self.store.commit()
            self.last_commit = time.monotonic()
            crash_point("apply.batch")

    def _parent(self, parts: list[bytes], create: bool, name: str = "") -> int | None:
        """Return the inode of the directory holding ``parts[-1]``, or None if it is missing.

        With ``create``, missing directories of the path are made, and a
        file in the place of one is replaced. A symbolic link among the
        directories is followed, as the kernel follows it when Docker's
        applier, chrooted into the layer, opens the path: an absolute target
        starts at the layer's root, and ".." stops there. What a link target
        names is never made or replaced, so a link to a missing directory or
        to a file, or more than MAX_SYMLINKS links, returns None, or with
        ``create`` raises BadArchive naming the member ``name``.
        """
        store, number, dirs = self.store, self.number, self.dirs
        if self.removals_seen != store.entry_removals:
            dirs.clear()
            self.removals_seen = store.entry_removals
        path = tuple(parts[:-1])
        stack = dirs.get(path)
        if stack is None:
            stack = self._walk(path, create, name)
            if stack is None:
                return None
        return stack[-1] if stack else ROOT_INO

    def _walk(self, path: tuple[bytes, ...], create: bool, name: str) -> tuple[int, ...] | None:
        """Resolve the directory ``path``; return the inodes of the directories from the root down.

        Each prefix of ``path`` that the walk resolves goes into ``self.dirs``.
        """
        store, number, dirs = self.store, self.number, self.dirs
        depth = len(path)
        while depth and path[:depth] not in dirs:
            depth -= 1
        stack = list(dirs[path[:depth]]) if depth else []
        # Components still to walk, last first: (name, how much of ``path``
        # is resolved once the walk is past it, or None in a link target).
        pending: list[tuple[bytes, int | None]] = [
            (part, index) for index, part in enumerate(path[depth:], depth + 1)
        ][::-1]
        links = 0
        while pending:
            part, resolved = pending.pop()
            if part == b"..":
                if stack:
                    stack.pop()
            elif part and part != b".":
                ino = stack[-1] if stack else ROOT_INO
                dir_inode = store._dir(number, ino)
                found = store._entry(number, dir_inode, part)
                inode = store._inode(number, found[0]) if found is not None else None
                if inode is not None and inode.is_dir:
                    stack.append(inode.ino)
                elif inode is not None and stat.S_ISLNK(inode.mode):
                    links += 1
                    if links > MAX_SYMLINKS:
                        return self._unresolved(create, name, "more than "
                                                f"{MAX_SYMLINKS} symbolic links")  # fmt: skip
                    if inode.target.startswith(b"/"):
                        stack = []
                    # The marker (b"", resolved) caches the prefix once the
                    # walk has followed the link.
                    pending.append((b"", resolved))
                    pending += [(step, None) for step in inode.target.split(b"/")][::-1]
                    continue
                elif resolved is None or not create:
                    component = part.decode("utf-8", "surrogateescape")
                    kind = "missing" if inode is None else "not a directory"
                    return self._unresolved(create, name, "a symbolic link whose "
                                            f"target names {component!r}, which is {kind}")  # fmt: skip
                else:
                    if inode is not None:
                        self._remove(dir_inode, part)
                    # Docker's applier makes missing parent directories with mode 0600.
                    created = store._create(number, ino, part, stat.S_IFDIR | 0o600, 0, 0)
                    stack.append(created.ino)
            if resolved is not None:
                dirs[path[:resolved]] = tuple(stack)
        return tuple(stack)

    def _unresolved(self, create: bool, name: str, reason: str) -> None:
        """Return None, or with ``create`` raise BadArchive for the member ``name``."""
        if not create:
            return None
        raise errors.BadArchive(
            f"layer {self.layer.id}: member {name!r}: its directory path leads"
            f" through {reason}"
        )

    def _whiteout(self, parts: list[bytes]) -> None:
        store, number = self.store, self.number
        dir_ino = self._parent(parts, create=False)
        if dir_ino is None:
            return
        name = parts[-1]
        if name == OPAQUE:
            if self._is_symlink(parts[:-1]):
                # Docker's applier walks the marker's directory without
                # following a link in its place, so it removes nothing.
                return
            self._make_opaque(dir_ino)
            return
        if name.startswith(WHITEOUT + WHITEOUT):
            return
        target = name[len(WHITEOUT) :]
        dir_inode = store._dir(number, dir_ino)
        if store._entry(number, dir_inode, target) is not None:
            self._remove(dir_inode, target)

    def _make_opaque(self, dir_ino: int) -> None:
        """Hide the entries that older layers put in a directory.

        A subdirectory of an older layer that this layer changed before the
        marker (its metadata, or entries added or removed at any depth below
        it) keeps its name and becomes opaque too. Docker's overlay2 driver
        likewise makes that subdirectory in the upper directory. A hidden file with other names elsewhere loses the hidden
        name's link (``_drop_hidden``), so the link count matches the names
        left.
        """
        store, number, txn = self.store, self.number, self.store._txn
        inode = store._own(number, dir_ino)
        hidden = {
            name: ino
            for name, ino in store._entries(number, inode).items()
            if txn.get(dirent_key(dir_ino, name, number), db=store.dbs["dirents"]) is None
        }
        inode.opaque = number
        store._put_inode(number, inode)
        for name, ino in hidden.items():
            child = store._inode(number, ino)
            if child.is_dir and self._changed_below(ino):
                store._add_entry(number, dir_ino, name, child)
                self._make_opaque(ino)
            else:
                self._drop_hidden(ino)
        # The older layers' subdirectories no longer count as links, but
        # those this layer made or kept still do.
        inode = store._own(number, dir_ino)
        inode.nlink = 2 + sum(
            1 for ino in store._entries(number, inode).values()
            if store._inode(number, ino).is_dir
        )  # fmt: skip
        store._put_inode(number, inode)
        # Cached walks may lead through a directory that is hidden now.
        self.dirs.clear()

    def _changed_below(self, dir_ino: int) -> bool:
        """Tell whether this layer changed the directory ``dir_ino`` or one below it.

        Adding or removing an entry changes the directory's times, so this
        layer then owns the directory's inode.
        """
        store, number = self.store, self.number
        owner, inode = store._resolve(number, dir_ino)
        if owner == number:
            return True
        return any(
            store._inode(number, ino).is_dir and self._changed_below(ino)
            for ino in store._entries(number, inode).values()
        )

    def _is_symlink(self, parts: list[bytes]) -> bool:
        """Tell whether the path ``parts`` names a symbolic link."""
        if not parts:
            return False
        dir_ino = self._parent(parts, create=False)
        if dir_ino is None:
            return False
        store, number = self.store, self.number
        found = store._entry(number, store._dir(number, dir_ino), parts[-1])
        return found is not None and stat.S_ISLNK(store._inode(number, found[0]).mode)

    def _remove(self, dir_inode, name: bytes) -> None:
        store, number = self.store, self.number
        found = store._entry(number, dir_inode, name)
        inode = store._inode(number, found[0])
        store._remove_entry(number, dir_inode, name)
        store._touch_dir(number, dir_inode.ino, -1 if inode.is_dir else 0)
        if inode.is_dir:
            self._drop_subtree(inode)
            store._drop_dir(number, inode.ino)
        else:
            store._drop_link(number, inode.ino)

    def _drop_subtree(self, dir_inode) -> None:
        """Drop what a whiteout removes below a directory.

        The tombstone on the directory hides the entries inherited from older
        layers, so they need no records of their own. Only an inherited file
        with more than one link loses one (see ``_drop_hidden``).
        """
        store, number, txn = self.store, self.number, self.store._txn
        for name, ino in store._entries(number, dir_inode).items():
            key = dirent_key(dir_inode.ino, name, number)
            if txn.get(key, db=store.dbs["dirents"]) is not None:
                txn.delete(key, db=store.dbs["dirents"])
                txn.delete(
                    change_dirent_key(number, dir_inode.ino, name),
                    db=store.dbs["changes"],
                )
            self._drop_hidden(ino)

    def _drop_hidden(self, ino: int) -> None:
        """Drop one name of ``ino``, which a whiteout or an opaque directory hides.

        The records this layer wrote for it are dropped. An inherited file
        with more than one link loses one, as `rm` in a container does, so the
        names left elsewhere show the right link count and the last unlink
        frees the file.
        """
        store, number = self.store, self.number
        child = store._inode(number, ino)
        owned = store._txn.get(inode_key(ino, number), db=store.dbs["inodes"]) is not None
        if child.is_dir:
            self._drop_subtree(child)
            if owned:
                store._drop_dir(number, ino)
        elif owned or child.nlink > 1:
            store._drop_link(number, ino)

    def _create(self, parts: list[bytes], member: tarfile.TarInfo) -> int:
        store, number = self.store, self.number
        dir_ino = self._parent(parts, create=True, name=member.name)
        name = parts[-1]
        dir_inode = store._dir(number, dir_ino)
        found = store._entry(number, dir_inode, name)
        if found is not None:
            existing = store._inode(number, found[0])
            if existing.is_dir and member.isdir():
                return existing.ino
            self._remove(dir_inode, name)
        uid, gid = member.uid, member.gid
        if member.isdir():
            ino = store._create(number, dir_ino, name, stat.S_IFDIR | 0o755, uid, gid).ino
            self.dirs[tuple(parts)] = self.dirs.get(tuple(parts[:-1]), ()) + (ino,)
            return ino
        if member.issym():
            target = member.linkname.encode("utf-8", "surrogateescape")
            problem = symlink_target_problem(target)
            if problem is not None:
                raise errors.BadArchive(
                    f"layer {self.layer.id}: member {member.name!r}: invalid symbolic"
                    f" link target {reprlib.repr(member.linkname)}: {problem}"
                )
            return store._create(
                number, dir_ino, name, stat.S_IFLNK | 0o777, uid, gid, 0, target
            ).ino
        if member.islnk():
            link_parts = _split(member.linkname, self.layer.id, link_of=member.name)
            source_dir = self._parent(link_parts, create=False) if link_parts else None
            source = None
            if source_dir is not None:
                source = store._entry(
                    number, store._dir(number, source_dir), link_parts[-1]
                )
            if source is None:
                raise errors.BadArchive(
                    f"layer {self.layer.id}: hard link {member.name!r} points to missing {member.linkname!r}"
                )
            if store._inode(number, source[0]).is_dir:
                raise errors.BadArchive(
                    f"layer {self.layer.id}: member {member.name!r}: hard link target"
                    f" {member.linkname!r} is a directory, which cannot be hard-linked"
                )
            return store._link(number, source[0], dir_ino, name).ino
        fmt = _TYPE_MODES.get(member.type)
        if fmt is None:
            raise errors.BadArchive(
                f"layer {self.layer.id}: unsupported tar entry type {member.type!r} for {member.name!r}"
            )
        rdev = 0
        if member.ischr() or member.isblk():
            rdev = os.makedev(member.devmajor, member.devminor)
        return store._create(number, dir_ino, name, fmt | 0o644, uid, gid, rdev).ino

    def _copy_data(self, ino: int, parts: list[bytes], member: tarfile.TarInfo,
                   stream) -> None:  # fmt: skip
        """Store a regular file's content, by reference when the source layer holds it.

        When the layer whose Diff was produced last has a regular file of the
        same path and size, its blocks are mapped into ``ino`` first, under
        the store lock, and the stream is then compared with ``ino`` itself.
        A container that writes to the source file afterwards branches onto
        new blocks, so what is compared is what stays. At the first chunk
        that differs, the mapping from there on is dropped and the rest is
        written from the stream.
        """
        source = self._reference_source(parts, member)
        mapped = source is not None and self.store._write(
            self._map_reference, ino, source, member.size
        )
        offset = 0
        while offset < member.size:
            chunk = stream.read(min(CHUNK, member.size - offset))
            if not chunk:
                raise errors.BadArchive(
                    f"layer {self.layer.id}: tar ends inside {member.name!r}"
                )
            if mapped:
                if self.store.read(self.number, ino, offset, len(chunk)) == chunk:
                    offset += len(chunk)
                    continue
                mapped = False
                head = self.store._write(self._unmap_from, ino, offset)
                self._write_chunk(ino, offset - len(head), head + chunk)
            else:
                self._write_chunk(ino, offset, chunk)
            offset += len(chunk)
            self._commit_if_due()
        if mapped:
            self.referenced += member.size
        self.size += member.size

    def _copy_regions(self, ino: int, member, stream,
                      regions: list[tuple[int, int]]) -> None:  # fmt: skip
        """Store the data regions of a sparse member and leave its holes unwritten.

        Reading the holes as zeros would cost time in proportion to the file
        size, which a sparse member of a few bytes can set to 2**63-1.
        """
        for start, length in regions:
            stream.seek(start)
            offset, end = start, start + length
            while offset < end:
                chunk = stream.read(min(CHUNK, end - offset))
                if not chunk:
                    raise errors.BadArchive(
                        f"layer {self.layer.id}: tar ends inside {member.name!r}"
                    )
                self._write_chunk(ino, offset, chunk)
                offset += len(chunk)
                self._commit_if_due()
        self.size += member.size

    def _unmap_from(self, ino: int, offset: int) -> bytes:
        """Drop the mapping of ``ino`` from the block holding ``offset`` on.

        Returns the bytes between that block's start and ``offset``, which
        the caller writes again with the rest.
        """
        store, number = self.store, self.number
        first = offset // BLOCK_SIZE
        head = store.read(number, ino, first * BLOCK_SIZE, offset - first * BLOCK_SIZE)
        inode = store._own(number, ino)
        store._unmap(inode, number, first, 1 << 62)
        store._put_inode(number, inode)
        return head

    def _write_chunk(self, ino: int, offset: int, chunk: bytes) -> None:
        runs = _nonzero_runs(chunk, bytes(4096))
        if runs:
            self.store._write(self._write_runs, ino, offset, chunk, runs)

    def _reference_source(
        self, parts: list[bytes], member: tarfile.TarInfo
    ) -> tuple[int, int] | None:
        """Return (layer, ino) of the same regular file in the last diffed layer, if any."""
        store = self.store
        layer = store._last_diff
        if layer is None or layer == self.number:
            return None
        with store.lock:
            store._ready()
            if (
                store._layers.get(layer) is None
                or store._layers[layer].state != "ready"
            ):
                return None
            ino = ROOT_INO
            try:
                for part in parts:
                    found = store._entry(layer, store._dir(layer, ino), part)
                    if found is None:
                        return None
                    ino = found[0]
                inode = store._inode(layer, ino)
            except errors.StoreError:
                return None
        if not inode.is_reg or inode.size != member.size:
            return None
        return layer, ino

    def _map_reference(self, ino: int, source: tuple[int, int], size: int) -> bool:
        """Map the source file's blocks into ``ino`` of this layer without copying.

        Owned blocks of the source become shared, so a later write to the
        source branches instead of changing them. Blocks the source only
        borrows are borrowed here too, but only when their owner is also an
        ancestor of this layer. If not, or if the source no longer has
        ``size`` bytes, nothing is mapped and False is returned.
        """
        store, number = self.store, self.number
        if store._layers.get(source[0]) is None:
            return False
        owner, current = store._resolve(source[0], source[1])
        if not current.is_reg or current.size != size:
            return False
        ancestry = store._ancestry(number)
        extents = store._extents(source[1], owner, 0, 1 << 62)
        for block, phys, count, flag in extents:
            if (
                flag == BORROWED
                and store._block_owner(source[1], owner, block, phys) not in ancestry
            ):
                return False
        inode = store._own(number, ino)
        for block, phys, count, flag in store._share_extents(source[1], owner):
            if flag == SHARED:
                store._add_refs(phys, count, 1)
            store._put_extent(ino, number, block, phys, count, flag)
            inode.blocks += count
        inode.size = size
        store._put_inode(number, inode)
        return True

    def _write_runs(self, ino, offset, chunk, runs) -> None:
        view = memoryview(chunk)
        for start, stop in runs:
            self.store._write_data(
                self.number, ino, offset + start, view[start:stop], touch=False
            )

    def _set_metadata(self, ino: int, member: tarfile.TarInfo) -> None:
        store, number = self.store, self.number
        inode = store._own(number, ino)
        if member.isreg() and inode.size != member.size:
            store._truncate(number, inode, member.size)
        inode.mode = stat.S_IFMT(inode.mode) | (member.mode & 0o7777)
        if stat.S_ISLNK(inode.mode):
            inode.mode = stat.S_IFLNK | 0o777
        inode.uid, inode.gid = member.uid, member.gid
        inode.mtime_ns = tarstream.time_ns(member, "mtime")
        inode.atime_ns = tarstream.time_ns(member, "atime")
        inode.ctime_ns = time.time_ns()
        store._put_inode(number, inode)
        xattrs = {
            name: value
            for name, value in _xattrs(member).items()
            if self._xattr_accepted(member, name, value)
        }
        if inode.is_dir and inode.has_xattrs:
            # A directory that is there already takes the member's xattrs
            # only, as the new upper directory of an overlay2 layer does, so
            # an xattr removed before a commit stays removed.
            for name in store.listxattr(number, ino):
                if name not in xattrs:
                    store._removexattr(number, ino, name)
        for name, value in xattrs.items():
            store._setxattr(number, ino, name, value, 0)
        if inode.is_dir:
            self.dir_times[ino] = (inode.atime_ns, inode.mtime_ns)

    def _xattr_accepted(self, member, name: bytes, value: bytes) -> bool:
        """Tell whether to store an xattr, as Linux would; raise BadArchive for a bad one.

        A name outside the namespaces that Linux stores is skipped and
        counted. An empty name, a namespace alone, a name over NAME_MAX
        bytes or a value over XATTR_SIZE_MAX bytes fails the import, as
        setxattr fails with ERANGE, EINVAL or E2BIG and Docker's applier
        with it.
        """
        if name and not (name.startswith(XATTR_NAMESPACES) or name in SYSTEM_XATTRS):
            if self.first_skipped_xattr is None:
                self.first_skipped_xattr = (name, member.name)
            self.skipped_xattrs += 1
            return False
        problem = None
        if not name:
            problem = "it is empty"
        elif name in XATTR_NAMESPACES:
            problem = "it has nothing after the namespace"
        elif len(name) > NAME_MAX:
            problem = f"it is {len(name)} bytes long, and the limit is {NAME_MAX}"
        elif b"\0" in name:
            problem = "it contains a NUL byte"
        elif len(value) > XATTR_SIZE_MAX:
            problem = (
                f"its value is {len(value)} bytes long, and the limit is {XATTR_SIZE_MAX}"
            )
        if problem is None:
            return True
        raise errors.BadArchive(
            f"layer {self.layer.id}: member {member.name!r}: invalid xattr"
            f" {reprlib.repr(name.decode('utf-8', 'surrogateescape'))}: {problem}"
        )

    def finish(self) -> None:
        """Set directory times again, now that adding their entries has moved them."""
        from .store import write_op

        def restore(store):
            for ino, (atime_ns, mtime_ns) in self.dir_times.items():
                try:
                    inode = store._own(self.number, ino)
                except errors.NotFound:
                    continue
                inode.atime_ns, inode.mtime_ns = atime_ns, mtime_ns
                store._put_inode(self.number, inode)

        write_op(restore)(self.store)


def _compression(head: bytes) -> str | None:
    """Return the name of the compression format that ``head`` starts with, or None."""
    for magic, name in COMPRESSION_MAGIC.items():
        if head.startswith(magic):
            return name
    return None


def _nonzero_runs(chunk: bytes, zero: bytes) -> list[tuple[int, int]]:
    """Return byte ranges of ``chunk`` that are not whole zero 4 KiB blocks."""
    runs = []
    start = None
    size = len(chunk)
    for offset in range(0, size, 4096):
        block = chunk[offset : offset + 4096]
        is_zero = len(block) == 4096 and block == zero
        if is_zero:
            if start is not None:
                runs.append((start, offset))
                start = None
        elif start is None:
            start = offset
    if start is not None:
        runs.append((start, size))
    return runs
