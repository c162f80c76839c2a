"""The store work whose device writes the power-loss test records.

Run as ``python workload.py IMAGE STATES`` with the recorder preloaded. Each
step ends in a commit. After it the workload marks the log with the step's
index and appends the store's state to STATES (JSON lines).

A power cut inside step i must leave the store, once reopened, in the state
after step i-1 or in the state after step i. A step that imports a tar may
also leave the state after step i-1 without that step's layer, because
recovery removes a layer whose import did not finish.

No step overwrites file data that an earlier step committed. A power cut
during an in-place overwrite may leave old and new bytes mixed, which no
file system rules out, so the state comparison would flag it falsely.
"""

from __future__ import annotations

import ctypes
import io
import json
import os
import random
import stat
import sys
import tarfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lcfs.store import ROOT_INO, Store, errors
from powerloss.state import store_state

KiB = 1 << 10


def payload(seed: str, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def make_tar(entries) -> bytes:
    """Build a PAX tar from (name, type, fields) tuples.

    ``fields`` may set data, linkname, mode and pax headers.
    """
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, kind, fields in entries:
            member = tarfile.TarInfo(name)
            member.type = kind
            member.mode = fields.get(
                "mode", 0o755 if kind == tarfile.DIRTYPE else 0o644
            )
            member.mtime = 1_700_000_000
            member.linkname = fields.get("linkname", "")
            member.pax_headers = fields.get("pax", {})
            data = fields.get("data", b"")
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data) if data else None)
    return buffer.getvalue()


DIR, REG, SYM, LNK = tarfile.DIRTYPE, tarfile.REGTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE


def base_tar() -> bytes:
    entries = [("etc", DIR, {}), ("usr", DIR, {}), ("usr/lib", DIR, {})]
    entries.append(("etc/hosts", REG, {"data": b"127.0.0.1 localhost\n"}))
    entries.append(
        ("etc/cap", REG, {"data": b"x", "pax": {"SCHILY.xattr.user.note": "base"}})
    )
    for i in range(12):
        size = 1 + i * 13 * KiB
        entries.append(
            (f"usr/lib/lib{i}.so", REG, {"data": payload(f"base-{i}", size)})
        )
    entries.append(("usr/lib/big", REG, {"data": payload("base-big", 300 * KiB)}))
    entries.append(("usr/lib/current", SYM, {"linkname": "lib3.so"}))
    entries.append(("usr/lib/hard", LNK, {"linkname": "usr/lib/lib5.so"}))
    return make_tar(entries)


def mid_tar() -> bytes:
    entries = [
        ("etc", DIR, {}),
        ("etc/hosts", REG, {"data": b"127.0.0.1 localhost mid\n"}),
        ("etc/.wh.cap", REG, {}),
        ("usr", DIR, {}),
        ("usr/lib", DIR, {}),
        ("usr/lib/.wh..wh..opq", REG, {}),
        ("usr/lib/only-mid", REG, {"data": payload("mid-only", 40 * KiB)}),
        ("opt", DIR, {}),
    ]
    for i in range(8):
        entries.append(
            (
                f"opt/tool{i}",
                REG,
                {"data": payload(f"mid-{i}", 7 * KiB * (i + 1)), "mode": 0o755},
            )
        )
    return make_tar(entries)


def scratch_tar() -> bytes:
    entries = [("data", DIR, {})]
    for i in range(20):
        entries.append(
            (f"data/blob{i}", REG, {"data": payload(f"scratch-{i}", 24 * KiB + i)})
        )
    return make_tar(entries)


def edit_create(store: Store) -> None:
    top = store.get_layer("top").number
    work = store.mkdir(top, ROOT_INO, b"work", 0o750, 1000, 1000)
    for i in range(6):
        attr = store.mknod(
            top, work.ino, b"file%d" % i, stat.S_IFREG | 0o640, 0, 1000, 1000
        )
        store.write(top, attr.ino, 0, payload(f"top-{i}", 9 * KiB * (i + 1)))
    store.symlink(top, work.ino, b"latest", b"file5")
    store.link(top, store.lookup(top, work.ino, b"file1").ino, ROOT_INO, b"file1-link")
    store.mknod(top, work.ino, b"fifo", stat.S_IFIFO | 0o600)
    store.mknod(top, work.ino, b"null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    store.setxattr(top, work.ino, b"user.owner", b"workload")
    # Writing to an inherited file copies its extent map into this layer; the
    # new bytes go to freshly allocated blocks.
    opt = store.lookup(top, ROOT_INO, b"opt")
    tool = store.lookup(top, opt.ino, b"tool2")
    store.write(top, tool.ino, tool.size, b"appended by top\n")


def edit_rename(store: Store) -> None:
    top = store.get_layer("top").number
    work = store.lookup(top, ROOT_INO, b"work")
    opt = store.lookup(top, ROOT_INO, b"opt")
    store.rename(top, work.ino, b"file0", work.ino, b"renamed0")
    store.rename(top, work.ino, b"file2", opt.ino, b"moved2")
    store.unlink(top, opt.ino, b"tool0")
    store.unlink(top, work.ino, b"fifo")
    store.setattr(
        top, store.lookup(top, opt.ino, b"tool4").ino, mode=stat.S_IFREG | 0o700
    )
    store.removexattr(top, work.ino, b"user.owner")
    store.setxattr(
        top, store.lookup(top, work.ino, b"file3").ino, b"user.tag", b"v" * 300
    )


def replace_file(store: Store) -> None:
    """Unlink a committed file and write a new one of the same size in one commit."""
    top = store.get_layer("top").number
    work = store.lookup(top, ROOT_INO, b"work")
    old = store.lookup(top, work.ino, b"file4")
    store.unlink(top, work.ino, b"file4")
    new = store.mknod(top, work.ino, b"file4-new", stat.S_IFREG | 0o644)
    store.write(top, new.ino, 0, payload("replacement", old.size))


def shrink_and_grow(store: Store) -> None:
    """Truncate a committed file, then write new data elsewhere in the same commit."""
    top = store.get_layer("top").number
    work = store.lookup(top, ROOT_INO, b"work")
    file5 = store.lookup(top, work.ino, b"file5")
    store.setattr(top, file5.ino, size=4 * KiB)
    grow = store.mknod(top, work.ino, b"grown", stat.S_IFREG | 0o644)
    store.write(top, grow.ino, 0, payload("grown", 40 * KiB))


def leaf_copy_up(store: Store) -> None:
    store.create_layer("leaf", "top")
    leaf = store.get_layer("leaf").number
    lib = store.lookup(leaf, ROOT_INO, b"usr")
    lib = store.lookup(leaf, lib.ino, b"lib")
    only = store.lookup(leaf, lib.ino, b"only-mid")
    store.write(leaf, only.ino, 5 * KiB, b"leaf bytes in the middle")
    store.mkdir(leaf, ROOT_INO, b"leaf-dir", 0o755)


def import_truncated(store: Store) -> None:
    """Import a tar that ends inside a file's data; the store rolls the import back."""
    archive = scratch_tar()
    try:
        store.apply_diff("broken", io.BytesIO(archive[: len(archive) // 2]))
    except errors.BadArchive:
        return
    raise AssertionError("the truncated tar was imported without an error")


def reopen(store: Store) -> Store:
    """Close and reopen the store, which restarts block allocation from block 0."""
    path = store.path
    store.close()
    return Store.open(path)


def import_tar(layer_id: str, build):
    return lambda store: store.apply_diff(layer_id, io.BytesIO(build()))


# (name, function, the layer a tar import fills or None). A function that
# returns a store replaces the one in use.
STEPS = [
    ("open", lambda store: None, None),
    ("create base", lambda store: store.create_layer("base"), None),
    ("import base", import_tar("base", base_tar), "base"),
    ("create mid", lambda store: store.create_layer("mid", "base"), None),
    ("import mid", import_tar("mid", mid_tar), "mid"),
    ("create top", lambda store: store.create_layer("top", "mid"), None),
    ("edit top: create", edit_create, None),
    ("edit top: rename and unlink", edit_rename, None),
    ("create scratch", lambda store: store.create_layer("scratch"), None),
    ("import scratch", import_tar("scratch", scratch_tar), "scratch"),
    ("remove scratch", lambda store: store.remove_layer("scratch"), None),
    ("create broken", lambda store: store.create_layer("broken", "base"), None),
    ("import a truncated tar", import_truncated, "broken"),
    ("reopen", reopen, None),
    ("edit top: replace a file", replace_file, None),
    ("edit top: shrink and grow", shrink_and_grow, None),
    ("create leaf and copy up", leaf_copy_up, None),
    ("remove leaf", lambda store: store.remove_layer("leaf"), None),
]


def main(image: str, states_path: str) -> None:
    try:
        mark = ctypes.CDLL(None).lcfs_recorder_mark
    except AttributeError:
        sys.exit("workload.py: the recorder is not preloaded (set LD_PRELOAD)")
    mark.argtypes = [ctypes.c_char_p]
    store = Store.open(image)
    with open(states_path, "w") as out:
        for index, (name, step, imported) in enumerate(STEPS):
            result = step(store)
            if isinstance(result, Store):
                store = result
            store.commit()
            mark(str(index).encode())
            record = {"step": name, "imported": imported, "state": store_state(store)}
            out.write(json.dumps(record) + "\n")
        store.close()
        mark(b"closed")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
