"""On-device format: the device layout, the LMDB databases and their records.

A device (an image file or a block device) has two regions::

    [0, M)      an LMDB environment holding every piece of metadata
    [M, end)    file data in 4 KiB blocks, numbered from 0

LMDB is opened with ``subdir=False, lock=False, map_size=M`` and never writes
past M. It cannot initialise itself on a zeroed device, so ``mkfs`` builds a
fresh environment in a temporary file and copies it to the start of the device.

Keys use big-endian fixed-width integers so that LMDB's byte order groups the
records of one inode, one directory or one layer together.

=========  ==========================================  =============================
database   key                                          value
=========  ==========================================  =============================
meta       ascii name                                   superblock JSON, counters, settings
layers     layer u64                                    layer record JSON
layer_ids  Docker id (utf-8)                            layer u64
children   parent u64, child u64                        empty
inodes     ino u64, layer u64                           ``Inode`` record
dirents    dir ino u64, name, NUL, layer u64            ino u64 + type byte, or empty (tombstone)
xattrs     ino u64, layer u64, name                     value
extents    ino u64, layer u64, file block u64           physical block u64, count u32, flag u8
free       physical block u64                           count u64
refs       physical block u64                           count u64, references u32 (shared runs)
changes    layer u64, ``i`` + ino u64                   empty: the layer changed this inode
           layer u64, ``d`` + dir ino u64 + name        empty: the layer changed this entry
nodes      node id u64                                  layer u64, ino u64
node_keys  layer u64, ino u64                           node id u64
intents    intent u64                                   intent record JSON (see lcfs.journal)
snapshots  containerd snapshot key or name (utf-8)      snapshot record JSON (see lcfs.store.snapshots)
=========  ==========================================  =============================

Inode numbers come from one counter for the whole device, so an inode keeps
its number in every layer that inherits it; only the root directory, inode 1,
is created separately by every base layer. A layer sees the record of the
nearest layer on its ancestry that has one (per-inode copy-on-write). An
extent copied into a child when the child first changes the inode is marked
borrowed: removing the child never frees it, and the parent it belongs to
cannot be removed while the child exists. Shared extents (see
``lcfs.store.data``) are freed when the ``refs`` count of their run drops to 0.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import struct
import tempfile
import uuid
from dataclasses import dataclass, field

import lmdb

from . import errors

FORMAT_VERSION = 1
BLOCK_SIZE = 4096
ROOT_INO = 1
MAGIC = "lcfs"

DATABASES = (
    "meta",
    "layers",
    "layer_ids",
    "children",
    "inodes",
    "dirents",
    "xattrs",
    "extents",
    "free",
    "changes",
    "nodes",
    "node_keys",
    "intents",
    "refs",
    "snapshots",
)

U64 = struct.Struct(">Q")
U64X2 = struct.Struct(">QQ")
U64X3 = struct.Struct(">QQQ")
EXTENT = struct.Struct(">QIB")
DIRENT = struct.Struct(">QB")

MIN_METADATA_SIZE = 16 << 20
# Bytes at the start of an existing file or device that must all be zero for
# mkfs to format it without --force.
EMPTY_CHECK_SIZE = 1 << 20
MAX_DEFAULT_METADATA_SIZE = 64 << 30


def inode_key(ino: int, layer: int) -> bytes:
    return U64X2.pack(ino, layer)


def dirent_prefix(dir_ino: int, name: bytes) -> bytes:
    return U64.pack(dir_ino) + name + b"\0"


def dirent_key(dir_ino: int, name: bytes, layer: int) -> bytes:
    return U64.pack(dir_ino) + name + b"\0" + U64.pack(layer)


def split_dirent_key(key: bytes) -> tuple[int, bytes, int]:
    return U64.unpack_from(key)[0], key[8:-9], U64.unpack_from(key, len(key) - 8)[0]


def xattr_key(ino: int, layer: int, name: bytes) -> bytes:
    return U64X2.pack(ino, layer) + name


def extent_key(ino: int, layer: int, block: int) -> bytes:
    return U64X3.pack(ino, layer, block)


def change_inode_key(layer: int, ino: int) -> bytes:
    return U64.pack(layer) + b"i" + U64.pack(ino)


def change_dirent_key(layer: int, dir_ino: int, name: bytes) -> bytes:
    return U64.pack(layer) + b"d" + U64.pack(dir_ino) + name


# The fixed part of an inode record; the primary name and the symlink target
# follow it.
_INODE = struct.Struct(">IIIIQQQqqqQQBH")

FLAG_XATTRS = 1


@dataclass(slots=True)
class Inode:
    """One layer's version of an inode.

    ``parent`` and ``name`` locate the inode's primary link: for directories
    the only one, for files the link made last. Diff and Changes use them to
    turn a changed inode back into a path. ``opaque`` is the number of the
    layer at which this directory hides the entries of older layers (0: none).
    ``blocks`` counts mapped 4 KiB blocks.
    """

    ino: int
    mode: int
    uid: int = 0
    gid: int = 0
    nlink: int = 1
    size: int = 0
    rdev: int = 0
    blocks: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    parent: int = 0
    opaque: int = 0
    flags: int = 0
    name: bytes = b""
    target: bytes = field(default=b"")

    def pack(self) -> bytes:
        return (
            _INODE.pack(
                self.mode,
                self.uid,
                self.gid,
                self.nlink,
                self.size,
                self.rdev,
                self.blocks,
                self.atime_ns,
                self.mtime_ns,
                self.ctime_ns,
                self.parent,
                self.opaque,
                self.flags,
                len(self.name),
            )
            + self.name
            + self.target
        )

    @classmethod
    def unpack(cls, ino: int, raw: bytes) -> Inode:
        (mode, uid, gid, nlink, size, rdev, blocks, atime, mtime, ctime, parent, opaque,
         flags, name_len) = _INODE.unpack_from(raw)  # fmt: skip
        start = _INODE.size
        name = bytes(raw[start : start + name_len])
        target = bytes(raw[start + name_len :])
        return cls(ino, mode, uid, gid, nlink, size, rdev, blocks, atime, mtime, ctime,
                   parent, opaque, flags, name, target)  # fmt: skip

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def has_xattrs(self) -> bool:
        return bool(self.flags & FLAG_XATTRS)


@dataclass(slots=True)
class Layer:
    """A layer record. ``state`` is ``ready`` or ``removing``."""

    number: int
    id: str
    parent: int | None
    depth: int
    frozen: bool = False
    created: float = 0.0
    state: str = "ready"
    parent_id: str | None = None

    def pack(self) -> bytes:
        return json.dumps(
            {
                "id": self.id,
                "parent": self.parent,
                "depth": self.depth,
                "frozen": self.frozen,
                "created": self.created,
                "state": self.state,
            }
        ).encode()

    @classmethod
    def unpack(cls, number: int, raw: bytes) -> Layer:
        rec = json.loads(bytes(raw))
        return cls(number, rec["id"], rec["parent"], rec["depth"], rec["frozen"],
                   rec["created"], rec["state"])  # fmt: skip


def device_size(fd: int) -> int:
    """Return the size in bytes of an open image file or block device."""
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    raise errors.FormatError(f"{fd}: not a regular file or block device")


def default_metadata_size(size: int) -> int:
    wanted = max(MIN_METADATA_SIZE, min(size // 16, MAX_DEFAULT_METADATA_SIZE))
    return wanted // BLOCK_SIZE * BLOCK_SIZE


def open_env(path: str, metadata_size: int) -> lmdb.Environment:
    return lmdb.open(
        path,
        subdir=False,
        lock=False,
        map_size=metadata_size,
        max_dbs=len(DATABASES) + 1,
        readahead=False,
        meminit=False,
        max_spare_txns=0,
    )


def open_databases(env: lmdb.Environment, txn=None) -> dict:
    return {name: env.open_db(name.encode(), txn=txn) for name in DATABASES}


def check_database_list(path: str, txn) -> None:
    """Raise FormatError if LMDB's list of named databases is out of key order."""
    names = [bytes(key) for key in txn.cursor().iternext(values=False)]
    if any(before >= after for before, after in zip(names, names[1:])):
        listed = ", ".join(repr(name.decode(errors="replace")) for name in names)
        raise errors.FormatError(
            f"the LMDB database on {path} is damaged: its list of databases is out "
            f"of order ({listed}); run 'lcfs-fsck {path}' for the details"
        )


def read_superblock(path: str) -> dict | None:
    """Return the superblock of the store on ``path``, or None if it holds none."""
    try:
        env = lmdb.open(
            path, subdir=False, lock=False, readonly=True, max_dbs=len(DATABASES) + 1
        )
    except lmdb.Error:
        return None
    try:
        with env.begin() as txn:
            try:
                meta = env.open_db(b"meta", txn=txn, create=False)
            except lmdb.Error:
                return None
            raw = txn.get(b"super", db=meta)
            return decode_superblock(path, bytes(raw)) if raw else None
    finally:
        env.close()


def is_under_dev(path: str) -> bool:
    """Return True if ``path`` names an entry of /dev, where only device nodes belong.

    /dev is a devtmpfs in memory, so an image file created there by a
    mistyped block device name would hold the store in RAM.
    """
    parent = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    return parent == "/dev" or parent.startswith("/dev/")


def missing_device_message(path: str) -> str:
    """Return the error message for a block device path under /dev that does not exist."""
    return (
        f"block device {path} not found; check its name with lsblk, or pass "
        "an image file path outside /dev"
    )


# Superblock fields that opening a store reads, with their types.
SUPERBLOCK_FIELDS = {"magic": str, "format": int, "metadata_size": int, "data_blocks": int}


def decode_superblock(path: str, raw: bytes) -> dict:
    """Decode the superblock record; raise FormatError naming the damage if it cannot be used."""
    try:
        superblock = json.loads(raw)
    except ValueError as error:  # JSONDecodeError, or UnicodeDecodeError
        raise errors.FormatError(superblock_damage(path, f"it is not valid JSON ({error})")) from None
    if not isinstance(superblock, dict):
        raise errors.FormatError(superblock_damage(path, "it is not a JSON object"))
    for name, kind in SUPERBLOCK_FIELDS.items():
        value = superblock.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise errors.FormatError(
                superblock_damage(path, f"its field {name!r} is missing or not of type {kind.__name__}")
            )
    return superblock


def superblock_damage(path: str, detail: str) -> str:
    return (
        f"the superblock of {path} is damaged: {detail}. lcfs-fsck cannot rebuild it, "
        f"so restore {path} from a backup, or format it with 'lcfs mkfs --force {path}'"
    )


def mkfs(path: str, size: int | None = None, metadata_size: int | None = None,
         force: bool = False) -> dict:  # fmt: skip
    """Format ``path`` as an empty store and return its superblock.

    An image file that does not exist is created sparse with ``size`` bytes.
    Without ``force``, ``check_overwrite`` rejects a device that contains a
    store or other data.
    """
    created = False
    if not os.path.exists(path):
        if is_under_dev(path):
            raise errors.NotFound(missing_device_message(path))
        if size is None:
            raise errors.Invalid(
                f"{path} does not exist; pass --size SIZE to create it as a new "
                "image file"
            )
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        created = True
    else:
        check_overwrite(path, force)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and size is not None:
            _set_file_size(fd, path, size)
        total = device_size(fd)
        if metadata_size is None:
            metadata_size = default_metadata_size(total)
        metadata_size = metadata_size // BLOCK_SIZE * BLOCK_SIZE
        if metadata_size < MIN_METADATA_SIZE:
            raise errors.Invalid(
                f"metadata size {metadata_size} is below the minimum {MIN_METADATA_SIZE}"
            )
        data_blocks = (total - metadata_size) // BLOCK_SIZE
        if data_blocks < 16:
            raise errors.Invalid(
                f"{path}: {total} bytes leave no room for data after {metadata_size} "
                f"bytes of metadata; give it a size of at least "
                f"{metadata_size + 16 * BLOCK_SIZE} bytes"
            )
        superblock = {
            "magic": MAGIC,
            "format": FORMAT_VERSION,
            "uuid": str(uuid.uuid4()),
            "block_size": BLOCK_SIZE,
            "metadata_size": metadata_size,
            "data_blocks": data_blocks,
            "state": "clean",
        }
        image = _build_empty_environment(metadata_size, superblock)
        os.pwrite(fd, image, 0)
        if stat.S_ISREG(st.st_mode):
            # Zero the rest of the old metadata region so that no stale LMDB
            # page of an earlier store can look valid.
            os.pwrite(fd, bytes(BLOCK_SIZE * 4), len(image))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        if created:
            os.unlink(path)
        raise
    os.close(fd)
    return superblock


def check_overwrite(path: str, force: bool) -> None:
    """Raise unless the existing ``path`` may be formatted.

    Only a regular file or a block device can be formatted. Without ``force``
    it must be empty: a file of size 0, or one whose first
    ``EMPTY_CHECK_SIZE`` bytes are all zero. A store, or any other data,
    needs ``force``.
    """
    mode = os.stat(path).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise errors.Invalid(
            f"{path} is not a regular file or block device; give the path of an "
            "image file or a block device"
        )
    if force:
        return
    if read_superblock(path) is not None:
        raise errors.Exists(
            f"{path} already contains an lcfs store; pass --force to overwrite it"
        )
    with open(path, "rb") as f:
        head = f.read(EMPTY_CHECK_SIZE)
    if head.count(0) != len(head):
        raise errors.NotEmpty(
            f"{path} contains data and no lcfs store; check the path, or pass "
            "--force to format it, which destroys its contents"
        )


def _set_file_size(fd: int, path: str, size: int) -> None:
    try:
        os.ftruncate(fd, size)
    except (OSError, OverflowError) as error:
        # OverflowError: the size does not fit in off_t at all.
        reason = getattr(error, "strerror", None) or os.strerror(errno.EFBIG)
        raise errors.Invalid(
            f"cannot set the size of image file {path} to {size} bytes: "
            f"{reason}; give a smaller --size"
        ) from error


# Prefix of the temporary directory in which mkfs builds the LMDB environment.
MKFS_TEMP_PREFIX = "lcfs-mkfs-"


def _build_empty_environment(metadata_size: int, superblock: dict) -> bytes:
    with tempfile.TemporaryDirectory(prefix=MKFS_TEMP_PREFIX) as tmp:
        # lcfs-fsck reads this lock as "in use": the directory is not stale.
        lock_fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            return _write_empty_environment(tmp, metadata_size, superblock)
        finally:
            os.close(lock_fd)


def _write_empty_environment(tmp: str, metadata_size: int, superblock: dict) -> bytes:
    path = os.path.join(tmp, "meta.lmdb")
    env = open_env(path, metadata_size)
    with env.begin(write=True) as txn:
        dbs = open_databases(env, txn)
        txn.put(b"super", json.dumps(superblock).encode(), db=dbs["meta"])
        txn.put(b"next_ino", U64.pack(ROOT_INO + 1), db=dbs["meta"])
        txn.put(b"next_layer", U64.pack(1), db=dbs["meta"])
        txn.put(b"next_node", U64.pack(2), db=dbs["meta"])
        txn.put(b"next_intent", U64.pack(1), db=dbs["meta"])
        txn.put(U64.pack(0), U64.pack(superblock["data_blocks"]), db=dbs["free"])
    env.sync(True)
    env.close()
    with open(path, "rb") as f:
        return f.read()
