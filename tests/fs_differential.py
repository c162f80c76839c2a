"""Differential testing of a file system against a reference file system.

A seeded generator draws a sequence of file system operations, and the
same sequence runs on several trees: a reference directory first, then an
lcfs layer. After each operation the return value or errno must match on
every tree. So must a snapshot of each tree with the fields that any POSIX
file system reports alike: type, mode, owner, size, link count, device
number, symlink target, contents, user.* xattrs, directory listings and
which names are hard links of one file. mtime and ctime are compared as
"changed by this operation or not", because their values differ.

Differences that lcfs accepts are left out of the comparison. Directory
sizes differ (lcfs reports one block, as ext4 does for small directories),
fallocate supports only punching holes, POSIX ACLs are not supported, and
st_ino and st_dev values differ between file systems.

A divergence carries the full stat of the paths involved in every tree,
with what the file system's server stores where the tree can tell, right
after the step and again after RECHECK_DELAY, and the timings of the last
steps.

``shrink`` reduces a sequence that diverges to a small one that still does.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import hashlib
import os
import random
import stat
import time
from collections.abc import Callable

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]  # fmt: skip

AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2
SEEK_DATA = 3
SEEK_HOLE = 4
# CLOCK_REALTIME_COARSE, which the time module does not name.
CLOCK_REALTIME_COARSE = 5
COARSE_CLOCK_TICK = time.clock_getres(CLOCK_REALTIME_COARSE)

NAMES = ["a", "b", "c", "d", "e"]
LONG_NAMES = ["n" * 255, "n" * 256]
DESCRIPTOR_SLOTS = 4
MAX_DEPTH = 3
XATTR_NAMES = [b"user.one", b"user.two", b"user." + b"x" * 200]
SIZES = [0, 1, 100, 4095, 4096, 4097, 10000, 65536, 70000]
OFFSETS = [0, 1, 511, 4095, 4096, 8191, 8192, 100000, 1 << 20]
MODES = [0o644, 0o600, 0o755, 0o000, 0o4755, 0o2755, 0o2745, 0o1777, 0o7777]
OWNERS = [0, 1000, 65534, -1]
# Files larger than this are compared by their first and last MiB.
MAX_COMPARED_SIZE = 64 << 20
# Seconds before a divergence's second look at the paths involved. It is
# longer than the attribute and entry timeouts of a writable lcfs layer
# (1 s), so a value that a kernel cache kept stale shows its current state.
RECHECK_DELAY = 1.5
# How many of the last steps a divergence lists the timings of.
TIMED_STEPS = 6


def renameat2(old: str, new: str, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), old)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def pattern(seed: int, size: int) -> bytes:
    """Return ``size`` bytes derived from ``seed``, never all zeros for size > 0."""
    block = hashlib.sha256(seed.to_bytes(8, "little")).digest()
    return (block * (size // len(block) + 1))[:size]


@dataclasses.dataclass
class Tree:
    """One tree that operations run on: a directory and its open descriptors."""

    label: str
    root: str
    slots: dict[int, int] = dataclasses.field(default_factory=dict)
    # Returns what the file system's server stores for a file, given its
    # stat result, to show next to what the kernel reports after a divergence.
    inspect: Callable[[os.stat_result], object] | None = None

    def path(self, relative: str) -> str:
        return os.path.join(self.root, relative) if relative else self.root

    def close_all(self) -> None:
        for fd in self.slots.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.slots.clear()


def _errno_result(exc: OSError):
    return ("err", errno.errorcode.get(exc.errno, exc.errno))


def stat_fields(st: os.stat_result) -> tuple:
    """Return the stat fields that two POSIX file systems report alike.

    A directory's size differs by file system, so only whether it is
    nonzero counts: `test -s DIR` and `find -size 0` read that.
    """
    is_dir = stat.S_ISDIR(st.st_mode)
    rdev = st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0
    return (
        stat.filemode(st.st_mode),
        oct(stat.S_IMODE(st.st_mode)),
        st.st_uid,
        st.st_gid,
        st.st_size > 0 if is_dir else st.st_size,
        st.st_nlink,
        rdev,
    )


def user_xattrs(path: str, follow: bool = False) -> dict:
    try:
        names = os.listxattr(path, follow_symlinks=follow)
    except OSError as exc:
        return {"listxattr": errno.errorcode.get(exc.errno)}
    values = {}
    for name in sorted(n for n in names if n.startswith("user.")):
        try:
            values[name] = os.getxattr(path, name, follow_symlinks=follow)
        except OSError as exc:
            values[name] = errno.errorcode.get(exc.errno)
    return values


def read_all(path: str) -> bytes | tuple:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        return _errno_result(exc)
    try:
        size = os.fstat(fd).st_size
        digest = hashlib.sha256()
        if size > MAX_COMPARED_SIZE:
            # Reading all of a large sparse file would take too long.
            digest.update(os.pread(fd, 1 << 20, 0))
            digest.update(os.pread(fd, 1 << 20, size - (1 << 20)))
            return digest.hexdigest()
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            digest.update(chunk)
        return digest.hexdigest()
    finally:
        os.close(fd)


def snapshot(tree: Tree) -> tuple[dict, dict]:
    """Walk ``tree`` and return (comparable state, times) keyed by relative path.

    The times map each path, and each open descriptor slot, to its
    (mtime_ns, ctime_ns, st_ino).
    """
    state = {}
    times = {}
    pending = [""]
    while pending:
        relative = pending.pop()
        full = tree.path(relative)
        st = os.lstat(full)
        if not stat.S_ISFIFO(st.st_mode):
            # A FUSE server never learns of a write to a fifo, so it cannot
            # update the fifo's times as tmpfs and ext4 do.
            times[relative] = (st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        entry = {"stat": stat_fields(st)}
        if relative == "":
            # The roots of the trees are created differently.
            entry = {}
        if stat.S_ISDIR(st.st_mode):
            names = sorted(os.listdir(full))
            entry["listing"] = names
            pending.extend(os.path.join(relative, name) for name in names)
        elif stat.S_ISREG(st.st_mode):
            entry["data"] = read_all(full)
        elif stat.S_ISLNK(st.st_mode):
            entry["target"] = os.readlink(full)
        if relative:
            entry["xattrs"] = user_xattrs(full)
        state[relative] = entry
    inodes = {}
    for relative, entry in state.items():
        if relative and entry["stat"][0][0] != "d":
            inodes.setdefault(times.get(relative, (0, 0, os.lstat(tree.path(relative)).st_ino))[2],
                              []).append(relative)  # fmt: skip
    # Which names are hard links of one file, as a set of groups.
    state["<hard links>"] = {"groups": sorted(sorted(g) for g in inodes.values() if len(g) > 1)}
    for slot, fd in sorted(tree.slots.items()):
        st = os.fstat(fd)
        if not stat.S_ISFIFO(st.st_mode):
            times[f"<fd {slot}>"] = (st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        state[f"<fd {slot}>"] = {"stat": stat_fields(st)}
    return state, times


def wait_for_coarse_clock(stamp_ns: int) -> None:
    """Return once the coarse clock reads later than ``stamp_ns``.

    tmpfs and ext4 take timestamps from the coarse clock, which advances
    once per tick (4 ms with HZ=250) and, on a tickless kernel, may lag the
    precise clock by more than a tick after the CPU idled. A change made
    before the coarse clock passes the previous operation's time may keep
    that operation's timestamp, and so look like no change at all.
    """
    while time.clock_gettime_ns(CLOCK_REALTIME_COARSE) <= stamp_ns:
        time.sleep(COARSE_CLOCK_TICK / 4)


def changed_times(before: dict, after: dict) -> dict:
    """Return, for each path in both maps, whether its mtime and ctime changed."""
    return {
        path: (before[path][0] != after[path][0], before[path][1] != after[path][1])
        for path in sorted(before.keys() & after.keys())
        # A path or descriptor slot may now refer to another file.
        if before[path][2] == after[path][2]
    }


# -- operations -------------------------------------------------------------
#
# Each operation is a tuple (name, *arguments) of plain values, so that a
# sequence can be printed and replayed. ``run_operation`` applies one to a
# tree and returns ("ok", value) or ("err", errno name).


def _op_open(tree, slot, path, flags, mode):
    if slot in tree.slots:
        os.close(tree.slots.pop(slot))
    tree.slots[slot] = os.open(tree.path(path), flags, mode)


def _op_close(tree, slot):
    os.close(_fd(tree, slot))
    del tree.slots[slot]


def _fd(tree, slot):
    try:
        return tree.slots[slot]
    except KeyError:
        raise OSError(errno.EBADF, "no descriptor in slot") from None


def _op_write(tree, slot, seed, size):
    return os.write(_fd(tree, slot), pattern(seed, size))


def _op_pwrite(tree, slot, seed, size, offset):
    return os.pwrite(_fd(tree, slot), pattern(seed, size), offset)


def _op_read(tree, slot, size):
    return hashlib.sha256(os.read(_fd(tree, slot), size)).hexdigest()[:16]


def _op_pread(tree, slot, size, offset):
    return hashlib.sha256(os.pread(_fd(tree, slot), size, offset)).hexdigest()[:16]


def _op_lseek(tree, slot, offset, whence):
    return os.lseek(_fd(tree, slot), offset, whence)


def _op_ftruncate(tree, slot, size):
    os.ftruncate(_fd(tree, slot), size)


def _op_truncate(tree, path, size):
    os.truncate(tree.path(path), size)


def _op_fallocate(tree, slot, mode, offset, length):
    fallocate(_fd(tree, slot), mode, offset, length)


def _op_fsync(tree, slot):
    os.fsync(_fd(tree, slot))


def _op_fstat(tree, slot):
    return stat_fields(os.fstat(_fd(tree, slot)))


def _op_fchmod(tree, slot, mode):
    os.fchmod(_fd(tree, slot), mode)


def _op_fchown(tree, slot, uid, gid):
    os.fchown(_fd(tree, slot), uid, gid)


def _op_futimens(tree, slot, times):
    os.utime(_fd(tree, slot), ns=times) if times else os.utime(_fd(tree, slot))
    st = os.fstat(_fd(tree, slot))
    return st.st_mtime_ns if times else None


def _op_fsetxattr(tree, slot, name, seed, size, flags):
    os.setxattr(_fd(tree, slot), name, pattern(seed, size), flags)


def _op_fgetxattr(tree, slot, name):
    return os.getxattr(_fd(tree, slot), name)


def _op_flistxattr(tree, slot):
    return sorted(n for n in os.listxattr(_fd(tree, slot)) if n.startswith("user."))


def _op_fremovexattr(tree, slot, name):
    os.removexattr(_fd(tree, slot), name)


def _op_stat(tree, path, follow):
    return stat_fields(os.stat(tree.path(path), follow_symlinks=follow))


def _op_listdir(tree, path):
    return sorted(os.listdir(tree.path(path)))


def _op_mkdir(tree, path, mode):
    os.mkdir(tree.path(path), mode)


def _op_rmdir(tree, path):
    os.rmdir(tree.path(path))


def _op_unlink(tree, path):
    os.unlink(tree.path(path))


def _op_rename(tree, old, new, flags):
    renameat2(tree.path(old), tree.path(new), flags)


def _op_link(tree, old, new):
    os.link(tree.path(old), tree.path(new), follow_symlinks=False)


def _op_symlink(tree, target, path):
    os.symlink(target, tree.path(path))


def _op_readlink(tree, path):
    return os.readlink(tree.path(path))


def _op_chmod(tree, path, mode):
    os.chmod(tree.path(path), mode)


def _op_chown(tree, path, uid, gid, follow):
    os.chown(tree.path(path), uid, gid, follow_symlinks=follow)


def _op_utime(tree, path, times, follow):
    if times:
        os.utime(tree.path(path), ns=times, follow_symlinks=follow)
        st = os.stat(tree.path(path), follow_symlinks=follow)
        return (st.st_atime_ns, st.st_mtime_ns)
    os.utime(tree.path(path), follow_symlinks=follow)
    return None


def _op_setxattr(tree, path, name, seed, size, flags, follow):
    os.setxattr(tree.path(path), name, pattern(seed, size), flags, follow_symlinks=follow)


def _op_getxattr(tree, path, name, follow):
    return os.getxattr(tree.path(path), name, follow_symlinks=follow)


def _op_removexattr(tree, path, name, follow):
    os.removexattr(tree.path(path), name, follow_symlinks=follow)


def _op_listxattr(tree, path, follow):
    names = os.listxattr(tree.path(path), follow_symlinks=follow)
    return sorted(n for n in names if n.startswith("user."))


def _op_mkfifo(tree, path, mode):
    os.mkfifo(tree.path(path), mode)


def _op_mknod(tree, path, mode, device):
    os.mknod(tree.path(path), mode, device)


def _op_truncate_huge(tree, slot, size):
    """Grow a file to ``size``, then shrink it back, returning what fstat saw."""
    fd = _fd(tree, slot)
    before = os.fstat(fd).st_size
    os.ftruncate(fd, size)
    try:
        grown = os.fstat(fd).st_size
        tail = os.pread(fd, 10, size - 5)
    finally:
        os.ftruncate(fd, before)
    return grown, tail


OPERATIONS = {
    name[len("_op_"):]: function
    for name, function in globals().items()
    if name.startswith("_op_")
}


def _fd_stat(tree: Tree, slot: int) -> os.stat_result | None:
    return os.fstat(tree.slots[slot]) if slot in tree.slots else None


def comparable(reference: Tree, operation: tuple) -> bool:
    """Return False for an operation whose outcome may differ by design.

    lseek on a directory with another whence than SEEK_SET and SEEK_CUR
    is left to the kernel on a FUSE mount, which accepts what tmpfs
    rejects.
    """
    name = operation[0]
    if name == "lseek":
        st = _fd_stat(reference, operation[1])
        return not (st and stat.S_ISDIR(st.st_mode) and operation[3] not in (os.SEEK_SET, os.SEEK_CUR))
    return True


def times_comparable(reference: Tree, operation: tuple) -> bool:
    """Return False for an operation whose timestamp updates differ by file system.

    Punching a hole at or past the end of a file updates mtime and ctime
    on tmpfs but not on ext4.
    """
    if operation[0] == "fallocate":
        st = _fd_stat(reference, operation[1])
        return not (st and operation[3] >= st.st_size)
    if operation[0] == "truncate":
        # truncate(2) to the current size of a file with no blocks keeps
        # mtime and ctime on tmpfs, which frees pages only when it has
        # some. ext4 and lcfs set them.
        try:
            st = os.stat(reference.path(operation[1]))
        except OSError:
            return True
        return not (st.st_size == operation[2] and st.st_blocks == 0)
    return True


def run_operation(tree: Tree, operation: tuple):
    name, *arguments = operation
    try:
        return ("ok", OPERATIONS[name](tree, *arguments))
    except OSError as exc:
        return _errno_result(exc)


# -- generation -------------------------------------------------------------


class Generator:
    """Draws random operations on the paths that exist in a reference tree."""

    def __init__(self, seed: int, plain_names_only: bool = False):
        self.random = random.Random(seed)
        self.plain_names_only = plain_names_only

    def _walk(self, root: str) -> list[tuple[str, int]]:
        found = []
        pending = [""]
        while pending:
            relative = pending.pop()
            st = os.lstat(os.path.join(root, relative) if relative else root)
            found.append((relative, st.st_mode))
            if stat.S_ISDIR(st.st_mode) and relative.count("/") < MAX_DEPTH:
                for name in os.listdir(os.path.join(root, relative) if relative else root):
                    pending.append(os.path.join(relative, name))
        return found

    def _existing(self, entries, kind=None) -> str:
        choices = [path for path, mode in entries if path and (kind is None or kind(mode))]
        if not choices:
            return self._new(entries)
        return self.random.choice(sorted(choices))

    def _new(self, entries) -> str:
        r = self.random
        directories = sorted(path for path, mode in entries
                             if stat.S_ISDIR(mode) and path.count("/") < MAX_DEPTH - 1)  # fmt: skip
        parent = r.choice(directories)
        roll = r.random()
        if roll < 0.9 or self.plain_names_only:
            name = r.choice(NAMES)
        elif roll < 0.95:
            name = r.choice(LONG_NAMES)
        else:
            # The parents of the tree roots differ, so ".." stays inside.
            name = r.choice([".", "..", "a/", "missing/a"] if parent else [".", "a/", "missing/a"])
        return os.path.join(parent, name) if parent else name

    def path(self, entries, kind=None) -> str:
        roll = self.random.random()
        if roll < 0.6:
            return self._existing(entries, kind)
        if roll < 0.97:
            return self._new(entries)
        # A path through a file or through a missing directory.
        files = [path for path, mode in entries if path and not stat.S_ISDIR(mode)]
        base = self.random.choice(sorted(files)) if files else "missing"
        return os.path.join(base, "x")

    def _times(self):
        if self.random.random() < 0.3:
            return None
        return (self.random.randrange(0, 2 << 30) * 10**9 + self.random.randrange(10**9),
                self.random.randrange(0, 2 << 30) * 10**9 + self.random.randrange(10**9))  # fmt: skip

    def _offset(self) -> int:
        return self.random.choice(OFFSETS) + self.random.choice([0, 0, 0, self.random.randrange(5000)])

    def _open_flags(self) -> int:
        r = self.random
        access = r.choice([os.O_RDONLY, os.O_WRONLY, os.O_RDWR, os.O_RDWR])
        flags = access
        for extra, chance in ((os.O_CREAT, 0.5), (os.O_TRUNC, 0.15), (os.O_APPEND, 0.2),
                              (os.O_EXCL, 0.15), (os.O_NOFOLLOW, 0.1), (os.O_DIRECTORY, 0.05)):  # fmt: skip
            if r.random() < chance:
                flags |= extra
        return flags | os.O_NONBLOCK

    def operation(self, root: str, open_slots: set[int]) -> tuple:
        r = self.random
        entries = self._walk(root)
        slot = r.randrange(DESCRIPTOR_SLOTS)
        if open_slots and r.random() < 0.4:
            return self._descriptor_operation(r.choice(sorted(open_slots)))
        return self._path_operation(entries, slot)

    def _descriptor_operation(self, slot: int) -> tuple:
        r = self.random
        name = r.choice(["write", "write", "pwrite", "pwrite", "read", "pread", "lseek",
                         "ftruncate", "fallocate", "fsync", "fstat", "fchmod", "fchown",
                         "futimens", "fsetxattr", "fgetxattr", "flistxattr", "fremovexattr",
                         "close", "truncate_huge"])  # fmt: skip
        if name == "write":
            return (name, slot, r.randrange(1 << 30), r.choice(SIZES))
        if name == "pwrite":
            return (name, slot, r.randrange(1 << 30), r.choice(SIZES), self._offset())
        if name == "read":
            return (name, slot, r.choice(SIZES[1:]))
        if name == "pread":
            return (name, slot, r.choice(SIZES[1:]), self._offset())
        if name == "lseek":
            whence = r.choice([os.SEEK_SET, os.SEEK_CUR, os.SEEK_END, SEEK_DATA, SEEK_DATA,
                               SEEK_HOLE, SEEK_HOLE])  # fmt: skip
            return (name, slot, self._offset(), whence)
        if name == "ftruncate":
            return (name, slot, self._offset())
        if name == "fallocate":
            # lcfs supports only punching holes, by design.
            mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
            return (name, slot, mode, self._offset(), r.choice(SIZES[1:]))
        if name == "fchmod":
            return (name, slot, r.choice(MODES))
        if name == "fchown":
            return (name, slot, r.choice(OWNERS), r.choice(OWNERS))
        if name == "futimens":
            return (name, slot, self._times())
        if name == "fsetxattr":
            return (name, slot, r.choice(XATTR_NAMES), r.randrange(1 << 30),
                    r.choice([0, 1, 50]), r.choice([0, 0, os.XATTR_CREATE, os.XATTR_REPLACE]))  # fmt: skip
        if name in ("fgetxattr", "fremovexattr"):
            return (name, slot, r.choice(XATTR_NAMES))
        if name == "truncate_huge":
            return (name, slot, r.choice([1 << 32, 1 << 40]))
        return (name, slot)

    def _path_operation(self, entries, slot: int) -> tuple:
        r = self.random
        name = r.choice(["open", "open", "open", "open", "mkdir", "mkdir", "rmdir", "unlink",
                         "rename", "rename", "link", "symlink", "readlink", "chmod", "chown",
                         "utime", "setxattr", "getxattr", "removexattr", "listxattr", "mkfifo",
                         "mknod", "truncate", "stat", "listdir"])  # fmt: skip
        follow = r.random() < 0.5
        if name == "open":
            return (name, slot, self.path(entries), self._open_flags(), r.choice(MODES))
        if name == "mkdir":
            return (name, self.path(entries), r.choice([0o755, 0o700, 0o2775, 0o1777]))
        if name == "rmdir":
            return (name, self.path(entries, stat.S_ISDIR))
        if name in ("unlink", "readlink", "listdir"):
            return (name, self.path(entries))
        if name == "rename":
            flags = r.choice([0, 0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE])
            return (name, self.path(entries), self.path(entries), flags)
        if name == "link":
            return (name, self.path(entries), self.path(entries))
        if name == "symlink":
            # The absolute target is in a missing directory, so that no
            # operation through the link creates a file outside the tree.
            target = r.choice(["a", "../b", "/nonexistent-lcfs-test/x", "d/e", "t" * 300,
                               self.path(entries)])  # fmt: skip
            path = self.path(entries)
            if "/" not in path and target.startswith(".."):
                # The parents of the tree roots differ.
                target = "b"
            return (name, target, path)
        if name == "chmod":
            return (name, self.path(entries), r.choice(MODES))
        if name == "chown":
            return (name, self.path(entries), r.choice(OWNERS), r.choice(OWNERS), follow)
        if name == "utime":
            return (name, self.path(entries), self._times(), follow)
        if name == "setxattr":
            return (name, self.path(entries), r.choice(XATTR_NAMES), r.randrange(1 << 30),
                    r.choice([0, 1, 50, 4000]), r.choice([0, 0, os.XATTR_CREATE, os.XATTR_REPLACE]),
                    follow)  # fmt: skip
        if name in ("getxattr", "removexattr"):
            return (name, self.path(entries), r.choice(XATTR_NAMES), follow)
        if name == "listxattr":
            return (name, self.path(entries), follow)
        if name == "mkfifo":
            return (name, self.path(entries), r.choice([0o644, 0o600]))
        if name == "mknod":
            kind = r.choice([stat.S_IFCHR, stat.S_IFBLK, stat.S_IFREG, stat.S_IFSOCK])
            return (name, self.path(entries), kind | 0o640, os.makedev(r.choice([1, 8]), r.choice([3, 5])))
        if name == "truncate":
            return (name, self.path(entries), self._offset())
        if name == "stat":
            return (name, self.path(entries), follow)
        raise AssertionError(name)


# -- comparison -------------------------------------------------------------


@dataclasses.dataclass
class Divergence:
    """The first step at which a tree disagreed with the reference tree."""

    step: int
    operation: tuple
    kind: str
    details: dict
    # Lines that help find the cause: the full stat of each path involved,
    # then and after RECHECK_DELAY, and the timings of the last steps.
    context: list[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"step {self.step}: {self.operation!r}: {self.kind} differs"]
        for label, value in self.details.items():
            lines.append(f"  {label}: {value!r}")
        lines.extend(self.context)
        return "\n".join(lines)


@dataclasses.dataclass
class StepTiming:
    """The start of a step, in seconds from the start of its sequence, and how long its parts took."""

    step: int
    started: float
    operations: dict[str, float]
    snapshots: float

    def __str__(self) -> str:
        parts = ", ".join(f"{label} {seconds * 1000:.1f} ms"
                          for label, seconds in self.operations.items())  # fmt: skip
        return (f"  step {self.step} at {self.started:.3f} s: operation on {parts}; "
                f"snapshots {self.snapshots * 1000:.1f} ms")


# Operations whose first argument is a descriptor slot.
DESCRIPTOR_OPERATIONS = {"write", "pwrite", "read", "pread", "lseek", "ftruncate", "fallocate",
                         "fsync", "fstat", "fchmod", "fchown", "futimens", "fsetxattr",
                         "fgetxattr", "flistxattr", "close", "truncate_huge"}  # fmt: skip


def operation_paths(operation: tuple) -> list[str]:
    """Return the paths and descriptor slots ("<fd N>") that an operation names."""
    name, *arguments = operation
    if name in DESCRIPTOR_OPERATIONS:
        return [f"<fd {arguments[0]}>"]
    if name == "open":
        return [f"<fd {arguments[0]}>", arguments[1]]
    if name == "symlink":
        # The first argument is the link's target, not a path in the tree.
        arguments = arguments[1:]
    return [argument for argument in arguments if isinstance(argument, str)]


def describe(tree: Tree, relative: str) -> dict:
    """Return the main stat fields of a path or descriptor slot in ``tree``, and the server's view."""
    try:
        if relative.startswith("<fd "):
            st = os.fstat(tree.slots[int(relative[len("<fd "):-1])])
        else:
            st = os.lstat(tree.path(relative))
    except (OSError, KeyError, ValueError) as exc:
        return {"error": repr(exc)}
    fields = {
        "ino": st.st_ino,
        "mode": stat.filemode(st.st_mode),
        "nlink": st.st_nlink,
        "size": st.st_size,
        "uid": st.st_uid,
        "gid": st.st_gid,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
    }
    if tree.inspect is not None:
        try:
            fields["server"] = tree.inspect(st)
        except Exception as exc:  # a failed look must not hide the divergence
            fields["server"] = f"failed: {exc!r}"
    return fields


def divergence_context(trees: list[Tree], paths: list[str], times: dict, new_times: dict,
                       timings: list[StepTiming]) -> list[str]:  # fmt: skip
    """Return the lines that describe each path in every tree, now and after RECHECK_DELAY.

    ``times`` and ``new_times`` map each tree's label to the times of its
    snapshots before and after the step, as ``snapshot`` returns them
    (empty when no snapshot followed). A value that changes with no
    operation run most likely came from a stale cache.
    """
    paths = [path for path in dict.fromkeys(paths) if path != "<hard links>"]
    lines = [f"  {path or '<root>'!r} in {tree.label}: (mtime_ns, ctime_ns, ino) in the "
             f"snapshot before the step {times[tree.label].get(path)!r}, after it "
             f"{new_times.get(tree.label, {}).get(path)!r}; stat now {describe(tree, path)!r}"
             for path in paths for tree in trees]  # fmt: skip
    time.sleep(RECHECK_DELAY)
    lines += [f"  {path or '<root>'!r} in {tree.label}: stat {RECHECK_DELAY} s later "
              f"{describe(tree, path)!r}"
              for path in paths for tree in trees]  # fmt: skip
    lines.append("  timings of the last steps:")
    lines += [str(timing) for timing in timings[-TIMED_STEPS:]]
    return lines


def _state_difference(states: dict[str, dict]) -> dict:
    """Return the entries of the first path on which the states disagree."""
    labels = list(states)
    paths = sorted(set().union(*(state.keys() for state in states.values())))
    for path in paths:
        values = {label: states[label].get(path) for label in labels}
        if any(value != values[labels[0]] for value in values.values()):
            keys = set().union(*((value or {}).keys() for value in values.values()))
            for key in sorted(keys):
                per_tree = {label: (value or {}).get(key) for label, value in values.items()}
                if any(v != per_tree[labels[0]] for v in per_tree.values()):
                    return {"path": path, "field": key, **per_tree}
    return {}


def run_sequence(trees: list[Tree], operations, compare_times: bool = True,
                 seed: int | None = None, count: int = 0,
                 explain: bool = True) -> tuple[list[tuple], Divergence | None]:  # fmt: skip
    """Run operations on every tree; return those run and the first divergence.

    With ``seed`` the operations are drawn as they run, ``count`` of them,
    on the paths of the first tree, which is the reference: exclusions
    are decided on it too. Otherwise ``operations`` is the list
    to replay. With ``explain`` a divergence carries ``divergence_context``,
    which takes RECHECK_DELAY seconds.
    """
    generator = Generator(seed) if seed is not None else None
    if generator is not None:
        operations = [None] * count
    done = []
    states = {}
    times = {}
    timings: list[StepTiming] = []
    sequence_start = time.monotonic()
    last_stamp = time.time_ns()

    def diverged(divergence: Divergence, paths: list[str], new_times: dict):
        if explain:
            divergence.context = divergence_context(trees, paths, times, new_times, timings)
        return done, divergence

    for tree in trees:
        states[tree.label], times[tree.label] = snapshot(tree)
    for step, operation in enumerate(operations):
        reference = trees[0]
        if generator is not None:
            operation = generator.operation(reference.root, set(reference.slots))
        done.append(operation)
        if not comparable(reference, operation):
            continue
        compare_step_times = compare_times and times_comparable(reference, operation)
        if compare_times:
            wait_for_coarse_clock(last_stamp)
        started = time.monotonic()
        results = {}
        durations = {}
        for tree in trees:
            operation_start = time.monotonic()
            results[tree.label] = run_operation(tree, operation)
            durations[tree.label] = time.monotonic() - operation_start
            if tree is reference:
                last_stamp = time.time_ns()
        timing = StepTiming(step, started - sequence_start, durations, 0.0)
        timings.append(timing)
        del timings[:-TIMED_STEPS]
        first = results[reference.label]
        if any(result != first for result in results.values()):
            return diverged(Divergence(step, operation, "result", results),
                            operation_paths(operation), {})  # fmt: skip
        snapshots_start = time.monotonic()
        new_states = {}
        new_times = {}
        for tree in trees:
            new_states[tree.label], new_times[tree.label] = snapshot(tree)
        timing.snapshots = time.monotonic() - snapshots_start
        difference = _state_difference(new_states)
        if difference:
            return diverged(Divergence(step, operation, "state", difference),
                            [difference["path"]] + operation_paths(operation),
                            new_times)  # fmt: skip
        if compare_step_times:
            changes = {label: changed_times(times[label], new_times[label]) for label in new_times}
            reference_changes = changes[reference.label]
            for label, change in changes.items():
                if change != reference_changes:
                    different = {path: (reference_changes.get(path), change.get(path))
                                 for path in sorted(set(change) | set(reference_changes))
                                 if reference_changes.get(path) != change.get(path)}  # fmt: skip
                    divergence = Divergence(step, operation, "times (mtime, ctime changed)",
                                            {f"{reference.label} vs {label}": different})  # fmt: skip
                    return diverged(divergence, list(different) + operation_paths(operation),
                                    new_times)  # fmt: skip
        states, times = new_states, new_times
    return done, None


def shrink(operations: list[tuple], reproduces) -> list[tuple]:
    """Return a smaller list of operations for which ``reproduces`` is still true.

    A plain delta debugging loop: drop chunks of halving size, then single
    operations, while the divergence remains.
    """
    current = list(operations)
    chunk = max(1, len(current) // 2)
    while chunk >= 1:
        index = 0
        changed = False
        while index < len(current):
            candidate = current[:index] + current[index + chunk:]
            if candidate and reproduces(candidate):
                current = candidate
                changed = True
            else:
                index += chunk
        if not changed:
            chunk //= 2
    return current
