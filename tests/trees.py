"""Compare two directory trees file by file, as a filesystem user sees them.

A snapshot records every path below a root, without following symlinks or
crossing into other mounts. For each it keeps the file type, permission
bits (setuid, setgid and sticky included), owner, group, modification
time in whole seconds, link count and extended attributes. It also keeps
the content digest of a regular file, the target of a symlink and the
device number of a device node. Hard links are compared as groups of paths that share an inode.

Times are compared in whole seconds because Docker's layer tars store
whole seconds, so a tree unpacked from a tar has lost the nanoseconds that
the tree it was made from may still have.
"""

import errno
import hashlib
import os
import stat
from dataclasses import dataclass


@dataclass(frozen=True)
class Entry:
    """What a snapshot records about one path."""

    kind: str
    mode: int
    uid: int
    gid: int
    mtime: int
    nlink: int
    size: int | None
    content: str | None
    xattrs: tuple[tuple[bytes, bytes], ...]


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISREG, "file"),
        (stat.S_ISDIR, "dir"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISCHR, "char"),
        (stat.S_ISBLK, "block"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return name
    return "unknown"


def _xattrs(path: bytes) -> tuple[tuple[bytes, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as error:
        if error.errno in (errno.ENOTSUP, errno.ENODATA):
            return ()
        raise
    pairs = []
    for name in sorted(names):
        value = os.getxattr(path, name, follow_symlinks=False)
        pairs.append((os.fsencode(name), value))
    return tuple(pairs)


def _digest(path: bytes) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _describe(path: bytes, st: os.stat_result) -> Entry:
    kind = _kind(st.st_mode)
    content = None
    size = None
    if kind == "file":
        content = _digest(path)
        size = st.st_size
    elif kind == "symlink":
        content = os.fsdecode(os.readlink(path))
    elif kind in ("char", "block"):
        content = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    return Entry(
        kind=kind,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        mtime=int(st.st_mtime),
        nlink=st.st_nlink,
        size=size,
        content=content,
        xattrs=_xattrs(path),
    )


@dataclass
class Snapshot:
    """Entries by path relative to the root (bytes, "." for the root) and hard link groups."""

    entries: dict[bytes, Entry]
    link_groups: set[frozenset[bytes]]


def snapshot(root: str | os.PathLike) -> Snapshot:
    """Walk `root` without following symlinks or crossing mounts and record every path."""
    top = os.fsencode(os.fspath(root))
    root_device = os.lstat(top).st_dev
    entries: dict[bytes, Entry] = {}
    by_inode: dict[int, set[bytes]] = {}
    pending = [b"."]
    while pending:
        relative = pending.pop()
        path = os.path.join(top, relative) if relative != b"." else top
        st = os.lstat(path)
        entry = _describe(path, st)
        entries[relative] = entry
        if entry.kind == "file" and st.st_nlink > 1:
            by_inode.setdefault(st.st_ino, set()).add(relative)
        if entry.kind == "dir" and st.st_dev == root_device:
            for name in os.listdir(path):
                pending.append(
                    name if relative == b"." else os.path.join(relative, name)
                )
    groups = {frozenset(paths) for paths in by_inode.values() if len(paths) > 1}
    return Snapshot(entries, groups)


def _short(path: bytes, limit: int = 120) -> str:
    # Deep test paths run to thousands of bytes; keep both ends readable.
    name = os.fsdecode(path)
    if len(name) <= limit:
        return name
    return f"{name[:50]}...{name[-50:]} ({len(path)} bytes)"


def differences(
    expected: Snapshot,
    actual: Snapshot,
    ignore: dict[bytes, set[str]] | None = None,
    limit: int = 60,
) -> list[str]:
    """Return readable lines naming each path and field where two snapshots differ.

    `ignore` maps a relative path to Entry field names not compared there.
    """
    ignore = ignore or {}
    lines = []
    for path in sorted(expected.entries.keys() | actual.entries.keys()):
        name = _short(path)
        want = expected.entries.get(path)
        got = actual.entries.get(path)
        if want is None:
            lines.append(f"{name}: unexpected {got.kind}")
        elif got is None:
            lines.append(f"{name}: missing {want.kind}")
        elif want != got:
            for field in Entry.__dataclass_fields__:
                if field in ignore.get(path, ()):
                    continue
                a, b = getattr(want, field), getattr(got, field)
                if a != b:
                    lines.append(f"{name}: {field} expected {a!r}, got {b!r}")
    missing_groups = expected.link_groups - actual.link_groups
    extra_groups = actual.link_groups - expected.link_groups
    for group in sorted(missing_groups, key=sorted):
        lines.append(f"hard link group missing: {sorted(map(_short, group))}")
    for group in sorted(extra_groups, key=sorted):
        lines.append(f"unexpected hard link group: {sorted(map(_short, group))}")
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more differences"]
    return lines
