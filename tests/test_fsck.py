"""lcfs-fsck against stores with one structure damaged at a time.

Every corruption test copies a small real store with four layers,
directories, hard links, xattrs, symbolic links, copied-up files, and
blocks shared by reference. It damages exactly one structure by editing the
LMDB databases directly and then checks the whole cycle. A plain run
reports the problem in the phase that owns it, exits 4 and leaves the
device byte for byte unchanged. A ``--repair --yes`` run exits 1, a third
run is clean, and the store opens with every file the damage did not touch
reading back as before.
"""

import ctypes
import errno
import hashlib
import io
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import lmdb
import pytest

from lcfs.journal import intents
from lcfs.store import ROOT_INO, Store, errors
from lcfs.store.data import OWNED, REFS, SHARED
from lcfs.store.format import (
    DATABASES,
    DIRENT,
    EXTENT,
    FLAG_XATTRS,
    U64,
    U64X2,
    U64X3,
    Inode,
    Layer,
    change_dirent_key,
    change_inode_key,
    dirent_key,
    extent_key,
    inode_key,
    open_databases,
    open_env,
    read_superblock,
    xattr_key,
)
from mounts import tmpfs_at
from tools import fsck

MiB = 1 << 20
# fallocate(2) flags from linux/falloc.h.
FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2
REPO = Path(__file__).resolve().parent.parent

# struct MDB_page of LMDB 0.9 (mdb.c): the flags are a u16 at offset 10.
PAGE_FLAGS = 10
P_BRANCH, P_LEAF, P_OVERFLOW = 1, 2, 4
# md_root, the root page number, is a u64 at offset 40 of struct MDB_db, the
# record that LMDB's main database keeps for each named database.
MD_ROOT = 40
# Offsets in an LMDB 0.9 meta page: md_root of the main database and mm_txnid.
MAIN_ROOT = 128
MAIN_TXNID = 144
# The node pointers of a page follow its 16-byte header.
PAGE_POINTERS = 16

BIG = bytes(range(256)) * 16 * 20  # 20 blocks
# The layers that see child's version of a file unless they change it.
BELOW_CHILD = ("child", "leaf", "commit")
HOSTS = b"127.0.0.1 localhost\n"


# -- the template store ----------------------------------------------------------


def build_store(path: str) -> dict:
    """Build the template store and return the layer and inode numbers the tests damage.

    ``base`` contains the tree, ``child`` (a child of base) copies up and
    changes part of it, and ``leaf`` (a child of child) adds a file and
    rewrites ``/etc/hosts``, so base and child are frozen. ``commit`` is
    leaf's content committed into a second child of child.
    """
    Store.mkfs(path, size=32 * MiB)
    s = Store.open(path)
    base = s.create_layer("base").number
    etc = s.mkdir(base, ROOT_INO, b"etc", 0o755)
    hosts = s.mknod(base, etc.ino, b"hosts", stat.S_IFREG | 0o644)
    s.write(base, hosts.ino, 0, HOSTS)
    s.link(base, hosts.ino, ROOT_INO, b"hosts.hard")
    big = s.mknod(base, ROOT_INO, b"big", stat.S_IFREG | 0o644, uid=1000, gid=1000)
    s.write(base, big.ino, 0, BIG)
    s.setxattr(base, big.ino, b"user.tag", b"base")
    s.symlink(base, ROOT_INO, b"link", b"etc/hosts")
    s.mknod(base, ROOT_INO, b"null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    s.mknod(base, ROOT_INO, b"gone", stat.S_IFREG | 0o644)
    s.mkdir(base, etc.ino, b"empty.d", 0o700)

    child = s.create_layer("child", "base").number
    s.write(child, big.ino, 4096, b"X" * 4096)
    s.setxattr(child, hosts.ino, b"user.child", b"1")
    new = s.mknod(child, etc.ino, b"new", stat.S_IFREG | 0o600)
    s.write(child, new.ino, 0, b"new file\n")
    s.unlink(child, ROOT_INO, b"gone")
    s.node_id(child, new.ino)

    leaf = s.create_layer("leaf", "child").number
    own = s.mknod(leaf, ROOT_INO, b"leaf.txt", stat.S_IFREG | 0o644)
    s.write(leaf, own.ino, 0, b"leaf\n" * 2000)
    s.write(leaf, hosts.ino, 0, b"10.0.0.1")

    # Commit leaf as Docker does: Diff it, then apply that tar to a new child
    # of leaf's parent. The unchanged file content is mapped by reference, so
    # leaf and commit share the blocks of /leaf.txt through reference counts.
    diff = b"".join(s.diff("leaf"))
    commit = s.create_layer("commit", "child").number
    s.apply_diff("commit", io.BytesIO(diff))
    committed = s.lookup(commit, ROOT_INO, b"leaf.txt")
    s.close()
    return {"base": base, "child": child, "leaf": leaf, "commit": commit, "etc": etc.ino,
            "hosts": hosts.ino, "big": big.ino, "new": new.ino, "leaf.txt": own.ino,
            "committed leaf.txt": committed.ino}  # fmt: skip


def snapshot(path: str) -> dict:
    """Return {layer id: {path: attributes, content and xattrs}} of every layer."""
    with Store.open(path) as s:
        result = {}
        for layer in s.list_layers():
            files = {}
            stack = [(b"", ROOT_INO)]
            files[b"/"] = describe(s, layer.number, ROOT_INO, s.getattr(layer.number, ROOT_INO))
            while stack:
                prefix, dir_ino = stack.pop()
                for name, attr in s.readdir(layer.number, dir_ino):
                    path_name = prefix + b"/" + name
                    files[path_name] = describe(s, layer.number, attr.ino, attr)
                    if stat.S_ISDIR(attr.mode):
                        stack.append((path_name, attr.ino))
            result[layer.id] = files
        return result


def describe(s, layer: int, ino: int, attr) -> dict:
    entry = {"ino": ino, "mode": attr.mode, "nlink": attr.nlink, "uid": attr.uid, "gid": attr.gid,
             "rdev": attr.rdev, "size": attr.size, "blocks": attr.blocks, "mtime": attr.mtime_ns,
             "xattrs": {n: s.getxattr(layer, ino, n) for n in s.listxattr(layer, ino)}}  # fmt: skip
    if stat.S_ISREG(attr.mode):
        entry["data"] = s.read(layer, ino, 0, attr.size)
    elif stat.S_ISLNK(attr.mode):
        entry["target"] = s.readlink(layer, ino)
    return entry


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("template") / "store.img")
    numbers = build_store(path)
    tree = snapshot(path)
    assert fsck.main([path, "--no-progress"]) == 0
    return path, numbers, tree


@pytest.fixture
def store_image(template, tmp_path):
    """A fresh copy of the template store: (path, inode and layer numbers, tree)."""
    source, numbers, tree = template
    path = str(tmp_path / "store.img")
    shutil.copyfile(source, path)
    return path, numbers, tree


# -- damaging and checking ------------------------------------------------------------


@contextmanager
def damage(path: str):
    """Yield (txn, dbs) of a write transaction on the store's LMDB, committed at exit."""
    superblock = read_superblock(path)
    env = open_env(path, superblock["metadata_size"])
    try:
        with env.begin(write=True) as txn:
            yield txn, open_databases(env, txn)
        env.sync(True)
    finally:
        env.close()


def set_root_page_flags(path: str, name: str, flags: int) -> None:
    """Overwrite the flags of the root page of database ``name``, which must be a leaf page."""
    env = lmdb.open(
        path, subdir=False, lock=False, readonly=True, max_dbs=len(DATABASES) + 1
    )
    try:
        with env.begin() as txn:
            root = struct.unpack_from("<Q", txn.get(name.encode()), MD_ROOT)[0]
            page_size = env.stat()["psize"]
    finally:
        env.close()
    with open(path, "r+b") as f:
        f.seek(root * page_size)
        header = f.read(16)
        assert struct.unpack_from("<Q", header)[0] == root
        assert struct.unpack_from("<H", header, PAGE_FLAGS)[0] == P_LEAF
        f.seek(root * page_size + PAGE_FLAGS)
        f.write(struct.pack("<H", flags))


def digest(path: str) -> str:
    h = hashlib.blake2b()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def run_fsck(path: str, capsys, *args: str) -> tuple[int, dict]:
    code = fsck.main([path, "--json", "--no-progress", *args])
    report = json.loads(capsys.readouterr().out)
    assert report["exit_code"] == code
    return code, report


def assert_repairs(image, capsys, phase: str, text: str, lost_layers=(), lost_paths=()):
    """Check, repair and recheck a damaged store; compare what is left with the template.

    ``phase`` and ``text`` must match a problem of the first run. Files in
    ``lost_paths`` ((layer id, path) pairs) and layers in ``lost_layers`` may
    be gone or changed after the repair; everything else must be intact.
    """
    path, _, tree = image
    before = digest(path)
    code, report = run_fsck(path, capsys)
    found = [(p["phase"], p["problem"]) for p in report["problems"]]
    assert code == fsck.EXIT_LEFT, found
    assert any(p == phase and text in message for p, message in found), found
    assert report["left"] == report["found"] == len(found)
    assert digest(path) == before, "a check without --repair changed the device"

    code, repair = run_fsck(path, capsys, "--repair", "--yes")
    assert code == fsck.EXIT_REPAIRED, repair["problems"]
    assert repair["left"] == 0
    assert all(p["repaired"] for p in repair["problems"])

    code, report = run_fsck(path, capsys)
    assert code == fsck.EXIT_CLEAN, report["problems"]
    assert read_superblock(path).get("needs_fsck") is None

    after = snapshot(path)
    assert set(after) == set(tree) - set(lost_layers)
    for layer_id, files in after.items():
        lost = {p for lid, p in lost_paths if lid == layer_id}
        expected = {p: v for p, v in tree[layer_id].items() if p not in lost}
        kept = {p: v for p, v in files.items() if p not in lost}
        assert kept == expected, f"layer {layer_id} changed"
    return repair


def put_inode(txn, dbs, layer: int, ino: int, **fields) -> None:
    inode = Inode.unpack(ino, txn.get(inode_key(ino, layer), db=dbs["inodes"]))
    for name, value in fields.items():
        setattr(inode, name, value)
    txn.put(inode_key(ino, layer), inode.pack(), db=dbs["inodes"])


def put_layer(txn, dbs, number: int, **fields) -> None:
    layer = Layer.unpack(number, txn.get(U64.pack(number), db=dbs["layers"]))
    for name, value in fields.items():
        setattr(layer, name, value)
    txn.put(U64.pack(number), layer.pack(), db=dbs["layers"])


def free_map(txn, dbs) -> list[tuple[int, int]]:
    return [(U64.unpack(k)[0], U64.unpack(v)[0]) for k, v in txn.cursor(db=dbs["free"])]


def shared_run(txn, dbs, n, layer="leaf", file="leaf.txt") -> tuple[int, int, int]:
    """Return (first block, count, references) of the shared extent of /leaf.txt.

    A repair may merge neighbouring runs with equal counts into one record,
    so the references come from whichever record covers the first block.
    """
    key = extent_key(n[file], n[layer], 0)
    phys, count, flag = EXTENT.unpack(txn.get(key, db=dbs["extents"]))
    assert flag == SHARED
    for key, value in txn.cursor(db=dbs["refs"]):
        start = U64.unpack(key)[0]
        length, refs = REFS.unpack(value)
        if start <= phys and phys + count <= start + length:
            return phys, count, refs
    return phys, count, 0


# -- corruption cases, in phase order -------------------------------------------------


def test_malformed_key(store_image, capsys):
    with damage(store_image[0]) as (txn, dbs):
        txn.put(b"\x00\x01\x02", b"junk", db=dbs["inodes"])
    assert_repairs(store_image, capsys, "LMDB integrity", "malformed key 000102")


def test_malformed_dirent_key(store_image, capsys):
    with damage(store_image[0]) as (txn, dbs):
        txn.put(U64.pack(ROOT_INO) + b"no-separator", DIRENT.pack(2, 4), db=dbs["dirents"])
    assert_repairs(store_image, capsys, "LMDB integrity", "in database dirents")


def test_layer_with_missing_parent(store_image, capsys):
    path, n, _ = store_image
    with damage(path) as (txn, dbs):
        put_layer(txn, dbs, n["leaf"], parent=77)
        free = sum(count for _, count in free_map(txn, dbs))
    report = assert_repairs(store_image, capsys, "layer tree", "layer leaf (number 3) has missing parent 77",
                            lost_layers=["leaf"])  # fmt: skip
    assert [p["phase"] for p in report["problems"]] == ["layer tree"]
    with Store.open(path) as s:
        assert not s.exists("leaf")
        assert s.children("child") == ["commit"]
        # Every block leaf wrote is shared with commit, so none is freed and
        # commit's extents are now the only references.
        assert s.statfs().free_blocks == free
    with damage(path) as (txn, dbs):
        assert [REFS.unpack(v)[1] for _, v in txn.cursor(db=dbs["refs"])] == [1, 1]


def test_parent_cycle(store_image, capsys):
    path, n, _ = store_image
    with damage(path) as (txn, dbs):
        put_layer(txn, dbs, n["leaf"], parent=n["commit"])
        put_layer(txn, dbs, n["commit"], parent=n["leaf"])
    assert_repairs(store_image, capsys, "layer tree", "layers leaf, commit form a parent cycle",
                   lost_layers=["leaf", "commit"])  # fmt: skip
    with Store.open(path) as s:
        assert s.children("child") == []
    with damage(path) as (txn, dbs):
        # The blocks the two layers shared went back to the free map with their counts.
        assert list(txn.cursor(db=dbs["refs"])) == []


def test_unreadable_layer_record(store_image, capsys):
    path, n, _ = store_image
    with damage(path) as (txn, dbs):
        txn.put(U64.pack(n["leaf"]), b'{"id": "leaf", "par', db=dbs["layers"])
    report = assert_repairs(store_image, capsys, "LMDB integrity", "layer record 3 (leaf) is unreadable")
    assert report["problems"][0]["action"] == "rebuild it from the id index and the child links"
    with Store.open(path) as s:
        leaf = s.get_layer("leaf")
        assert (leaf.parent_id, leaf.depth, leaf.frozen) == ("child", 2, False)


def test_layer_stuck_removing(store_image, capsys):
    path, n, _ = store_image
    with damage(path) as (txn, dbs):
        put_layer(txn, dbs, n["leaf"], state="removing")
    assert_repairs(store_image, capsys, "journal intents",
                   "layer leaf is marked for removal but no intent finishes the removal",
                   lost_layers=["leaf"])  # fmt: skip
    with Store.open(path) as s:
        assert s.children("child") == ["commit"]


def test_layer_missing_from_id_index(store_image, capsys):
    with damage(store_image[0]) as (txn, dbs):
        txn.delete(b"child", db=dbs["layer_ids"])
    assert_repairs(store_image, capsys, "layer tree", "layer child is missing from the id index")


def test_missing_child_link(store_image, capsys):
    path, n, _ = store_image
    with damage(path) as (txn, dbs):
        assert txn.delete(U64X2.pack(n["base"], n["child"]), db=dbs["children"])
    assert_repairs(store_image, capsys, "layer tree", f"child link {n['base']} -> {n['child']} is missing")
    with Store.open(path) as s:
        assert s.children("base") == ["child"]
        with pytest.raises(errors.LayerHasChildren):
            s.remove_layer("base")


def test_stale_child_link(store_image, capsys):
    path, n, _ = store_image
    with damage(path) as (txn, dbs):
        txn.put(U64X2.pack(n["base"], n["leaf"]), b"", db=dbs["children"])
    assert_repairs(store_image, capsys, "layer tree", f"stale child link {n['base']} -> {n['leaf']}")


def test_parent_not_frozen(store_image, capsys):
    path, n, _ = store_image
    with damage(path) as (txn, dbs):
        put_layer(txn, dbs, n["child"], frozen=False)
    assert_repairs(store_image, capsys, "layer tree", "layer child has children but is not frozen")
    with Store.open(path) as s:
        assert s.get_layer("child").frozen
        with pytest.raises(errors.ReadOnly):
            s.write(n["child"], n["big"], 0, b"x")


def test_wrong_layer_depth(store_image, capsys):
    path, n, _ = store_image
    with damage(path) as (txn, dbs):
        put_layer(txn, dbs, n["leaf"], depth=7)
    assert_repairs(store_image, capsys, "layer tree", "layer leaf has depth 7, expected 2")


@pytest.mark.parametrize("kind", ["apply", "remove"])
def test_stuck_intent(store_image, capsys, kind):
    path, n, _ = store_image
    with damage(path) as (txn, dbs):
        intents.begin(txn, dbs["intents"], dbs["meta"], kind, layer=n["leaf"], id="leaf")
    what = "unfinished import into" if kind == "apply" else "unfinished removal of"
    assert_repairs(store_image, capsys, "journal intents", f"{what} layer leaf", lost_layers=["leaf"])
    with Store.open(path) as s:
        assert not s.exists("leaf")
        assert s.children("child") == ["commit"]


def test_stuck_orphan_intent(store_image, capsys):
    path, n, _ = store_image
    with damage(path) as (txn, dbs):
        # An unlinked file that was still open when the daemon stopped.
        put_inode(txn, dbs, n["leaf"], n["leaf.txt"], nlink=0)
        txn.delete(dirent_key(ROOT_INO, b"leaf.txt", n["leaf"]), db=dbs["dirents"])
        txn.delete(change_dirent_key(n["leaf"], ROOT_INO, b"leaf.txt"), db=dbs["changes"])
        intents.begin(txn, dbs["intents"], dbs["meta"], "orphan", layer=n["leaf"], ino=n["leaf.txt"])
    assert_repairs(store_image, capsys, "journal intents", f"unfreed unlinked inode {n['leaf.txt']} in layer leaf",
                   lost_paths=[("leaf", b"/leaf.txt")])  # fmt: skip
    with Store.open(path) as s, s.lock:
        s._ready()
        assert s._txn.get(inode_key(n["leaf.txt"], n["leaf"]), db=s.dbs["inodes"]) is None


@pytest.mark.parametrize("kind", ["apply", "remove", "orphan"])
def test_intent_that_cannot_be_right(store_image, capsys, kind):
    path, n, _ = store_image
    with damage(path) as (txn, dbs):
        if kind == "orphan":
            # /leaf.txt still has its link, so freeing it would lose a live file.
            intents.begin(txn, dbs["intents"], dbs["meta"], kind, layer=n["leaf"], ino=n["leaf.txt"])
        else:
            # child has child layers: rolling it back or removing it would orphan them.
            intents.begin(txn, dbs["intents"], dbs["meta"], kind, layer=n["child"], id="child")
    reason = "still has links" if kind == "orphan" else "has child layers"
    assert_repairs(store_image, capsys, "journal intents", reason)
    with damage(path) as (txn, dbs):
        assert list(txn.cursor(db=dbs["intents"])) == []


def test_removing_layer_with_children(store_image, capsys):
    path, n, _ = store_image
    with damage(path) as (txn, dbs):
        put_layer(txn, dbs, n["child"], state="removing")
    assert_repairs(store_image, capsys, "journal intents", "layer child is marked for removal but has child layers")
    with Store.open(path) as s:
        assert s.exists("child")


def test_inode_of_missing_layer(store_image, capsys):
    path, n, _ = store_image
    with damage(path) as (txn, dbs):
        raw = txn.get(inode_key(n["hosts"], n["base"]), db=dbs["inodes"])
        txn.put(inode_key(n["hosts"], 42), raw, db=dbs["inodes"])
    assert_repairs(store_image, capsys, "inodes and link counts",
                   f"inode {n['hosts']} belongs to missing layer 42")  # fmt: skip


@pytest.mark.parametrize("target", ["file", "directory", "root"])
def test_wrong_link_count(store_image, capsys, target):
    path, n, _ = store_image
    layer, ino, right = {"file": (n["base"], n["hosts"], 2), "directory": (n["base"], n["etc"], 3),
                         "root": (n["child"], ROOT_INO, 3)}[target]  # fmt: skip
    with damage(path) as (txn, dbs):
        put_inode(txn, dbs, layer, ino, nlink=9)
    assert_repairs(store_image, capsys, "inodes and link counts",
                   f"inode {ino} of layer {('base', 'child')[layer - 1]} has link count 9, expected {right}")  # fmt: skip


def test_inode_missing_from_change_log(store_image, capsys):
    path, n, _ = store_image
    with damage(path) as (txn, dbs):
        assert txn.delete(change_inode_key(n["child"], n["new"]), db=dbs["changes"])
    assert_repairs(store_image, capsys, "inodes and link counts",
                   f"inode {n['new']} of layer child is missing from the change log")  # fmt: skip
    with Store.open(path) as s:
        assert ("/etc/new", 1) in s.changes("child")


@pytest.mark.parametrize("layer, name", [("leaf", "leaf.txt"), ("base", "etc")])
def test_unreachable_inode_linked_back(store_image, capsys, layer, name):
    path, n, _ = store_image
    with damage(path) as (txn, dbs):
        # The only entry is gone but the inode was never freed. Without base's
        # /etc, everything below it is cut off in every layer.
        assert txn.delete(dirent_key(ROOT_INO, name.encode(), n[layer]), db=dbs["dirents"])
        assert txn.delete(change_dirent_key(n[layer], ROOT_INO, name.encode()), db=dbs["changes"])
    report = assert_repairs(store_image, capsys, "directory entries",
                            f"inode {n[name]} of layer {layer} has links but no name reaches it")  # fmt: skip
    assert len(report["problems"]) == 1
    assert report["problems"][0]["action"] == f"link it back as {name!r} in directory 1"


def test_unreachable_file_freed(store_image, capsys):
    path, n, _ = store_image
    with damage(path) as (txn, dbs):
        # The entry is gone and the record names a directory that does not exist,
        # so the file cannot go back: it is freed.
        assert txn.delete(dirent_key(ROOT_INO, b"leaf.txt", n["leaf"]), db=dbs["dirents"])
        assert txn.delete(change_dirent_key(n["leaf"], ROOT_INO, b"leaf.txt"), db=dbs["changes"])
        put_inode(txn, dbs, n["leaf"], n["leaf.txt"], parent=999)
        refs = shared_run(txn, dbs, n)[2]
    assert refs == 2
    report = assert_repairs(store_image, capsys, "inodes and link counts",
                            f"inode {n['leaf.txt']} of layer leaf has 1 links but no name",
                            lost_paths=[("leaf", b"/leaf.txt")])  # fmt: skip
    # Freeing the inode dropped its reference to the shared blocks, so the
    # extents and free-space phases found nothing.
    assert [p["phase"] for p in report["problems"]] == ["inodes and link counts"]
    with damage(path) as (txn, dbs):
        assert txn.get(inode_key(n["leaf.txt"], n["leaf"]), db=dbs["inodes"]) is None
        assert shared_run(txn, dbs, n, "commit", "committed leaf.txt")[2] == 1


def test_dangling_dirent(store_image, capsys):
    path, n, _ = store_image
    with damage(path) as (txn, dbs):
        txn.put(dirent_key(ROOT_INO, b"dangling", n["child"]), DIRENT.pack(999, 8), db=dbs["dirents"])
        txn.put(change_dirent_key(n["child"], ROOT_INO, b"dangling"), b"", db=dbs["changes"])
    assert_repairs(store_image, capsys, "directory entries",
                   "entry 'dangling' in directory 1 of layer child points to a missing inode")  # fmt: skip
    with Store.open(path) as s:
        with pytest.raises(errors.NotFound):
            s.lookup(n["child"], ROOT_INO, b"dangling")
        assert ("/dangling", 1) not in s.changes("child")


def test_dangling_dirent_over_inherited_name(store_image, capsys):
    path, n, _ = store_image
    with damage(path) as (txn, dbs):
        # The child's own entry for an inherited name points nowhere: the repair
        # must hide the name (as the child meant to replace it), not resurrect it.
        txn.put(dirent_key(ROOT_INO, b"link", n["child"]), DIRENT.pack(999, 10), db=dbs["dirents"])
        txn.put(change_dirent_key(n["child"], ROOT_INO, b"link"), b"", db=dbs["changes"])
    assert_repairs(store_image, capsys, "directory entries", "entry 'link' in directory 1 of layer child",
                   lost_paths=[(layer, b"/link") for layer in BELOW_CHILD])  # fmt: skip
    with Store.open(path) as s:
        assert s.lookup(n["base"], ROOT_INO, b"link")
        with pytest.raises(errors.NotFound):
            s.lookup(n["child"], ROOT_INO, b"link")


def test_directory_with_two_names(store_image, capsys):
    path, n, _ = store_image
    with damage(path) as (txn, dbs):
        # A second name for /etc, as if the directory were hard-linked.
        txn.put(dirent_key(ROOT_INO, b"etc2", n["base"]), DIRENT.pack(n["etc"], stat.S_IFDIR >> 12),
                db=dbs["dirents"])  # fmt: skip
        txn.put(change_dirent_key(n["base"], ROOT_INO, b"etc2"), b"", db=dbs["changes"])
    assert_repairs(store_image, capsys, "directory entries",
                   f"directory inode {n['etc']} of layer base has another name 'etc2' in directory 1")  # fmt: skip


def test_dirent_wrong_type(store_image, capsys):
    path, n, _ = store_image
    with damage(path) as (txn, dbs):
        key = dirent_key(ROOT_INO, b"etc", n["base"])
        txn.put(key, DIRENT.pack(n["etc"], stat.S_IFREG >> 12), db=dbs["dirents"])
    assert_repairs(store_image, capsys, "directory entries",
                   "entry 'etc' in directory 1 of layer base has the wrong file type")  # fmt: skip
    with damage(path) as (txn, dbs):
        value = txn.get(dirent_key(ROOT_INO, b"etc", n["base"]), db=dbs["dirents"])
        assert DIRENT.unpack(value) == (n["etc"], stat.S_IFDIR >> 12)


def test_dirent_missing_from_change_log(store_image, capsys):
    path, n, _ = store_image
    with damage(path) as (txn, dbs):
        assert txn.delete(change_dirent_key(n["child"], ROOT_INO, b"gone"), db=dbs["changes"])
    assert_repairs(store_image, capsys, "directory entries",
                   "entry 'gone' in directory 1 of layer child is missing from the change log")  # fmt: skip
    with Store.open(path) as s:
        assert ("/gone", 2) in s.changes("child")


def test_xattr_flag_without_xattrs(store_image, capsys):
    path, n, _ = store_image
    with damage(path) as (txn, dbs):
        put_inode(txn, dbs, n["base"], n["hosts"], flags=FLAG_XATTRS)
    assert_repairs(store_image, capsys, "extended attributes",
                   f"inode {n['hosts']} in layer {n['base']} is flagged with xattrs but has none")  # fmt: skip


def test_xattrs_without_flag(store_image, capsys):
    path, n, _ = store_image
    with damage(path) as (txn, dbs):
        put_inode(txn, dbs, n["base"], n["big"], flags=0)
    assert_repairs(store_image, capsys, "extended attributes",
                   f"inode {n['big']} in layer {n['base']} has xattrs but no xattr flag")  # fmt: skip


def test_xattrs_without_inode(store_image, capsys):
    path, n, _ = store_image
    with damage(path) as (txn, dbs):
        txn.put(xattr_key(n["hosts"], n["base"] + 100, b"user.x"), b"1", db=dbs["xattrs"])
    assert_repairs(store_image, capsys, "extended attributes", f"xattrs of inode {n['hosts']} in layer 101")


def test_extent_overlapping_free_space(store_image, capsys):
    path, n, _ = store_image
    with damage(path) as (txn, dbs):
        value = txn.get(extent_key(n["big"], n["base"], 0), db=dbs["extents"])
        phys, count, owned = EXTENT.unpack(value)
        assert owned and count == 20
        # Mark two blocks in the middle of base's /big as free as well (a double free).
        txn.put(U64.pack(phys + 5), U64.pack(2), db=dbs["free"])
    assert_repairs(store_image, capsys, "free-space map", "are both mapped and in the free map")
    with damage(path) as (txn, dbs):
        assert all(not (p <= phys + 5 < p + c) for p, c in free_map(txn, dbs))


def test_owned_extents_overlap(store_image, capsys):
    path, n, _ = store_image
    with damage(path) as (txn, dbs):
        big_phys = EXTENT.unpack(txn.get(extent_key(n["big"], n["base"], 0), db=dbs["extents"]))[0]
        key = extent_key(n["new"], n["child"], 0)
        _, count, owned = EXTENT.unpack(txn.get(key, db=dbs["extents"]))
        assert owned
        # /etc/new's only block now claims a block of base's /big.
        txn.put(key, EXTENT.pack(big_phys + 3, count, 1), db=dbs["extents"])
    assert_repairs(store_image, capsys, "file extents", "are owned by two extents",
                   lost_paths=[(layer, b"/etc/new") for layer in BELOW_CHILD])  # fmt: skip


def test_extent_outside_data_region(store_image, capsys):
    path, n, _ = store_image
    with damage(path) as (txn, dbs):
        key = extent_key(n["new"], n["child"], 0)
        txn.put(key, EXTENT.pack(1 << 40, 1, 1), db=dbs["extents"])
    assert_repairs(store_image, capsys, "file extents", "is outside the data region",
                   lost_paths=[(layer, b"/etc/new") for layer in BELOW_CHILD])  # fmt: skip


def test_borrowed_extent_without_owner(store_image, capsys):
    path, n, _ = store_image
    with damage(path) as (txn, dbs):
        free = free_map(txn, dbs)
        key = extent_key(n["big"], n["child"], 0)
        phys, count, owned = EXTENT.unpack(txn.get(key, db=dbs["extents"]))
        assert not owned
        # Point the child's borrowed block at a block in the middle of free space.
        txn.put(key, EXTENT.pack(free[0][0] + 100, count, 0), db=dbs["extents"])
    assert_repairs(store_image, capsys, "file extents", "points at blocks no layer owns",
                   lost_paths=[(layer, b"/big") for layer in BELOW_CHILD])  # fmt: skip


@pytest.mark.parametrize("damage_kind", ["count", "missing", "extra"])
def test_reference_counts_wrong(store_image, capsys, damage_kind):
    path, n, _ = store_image
    with damage(path) as (txn, dbs):
        phys, count, refs = shared_run(txn, dbs, n)
        assert refs == 2
        if damage_kind == "count":
            txn.put(U64.pack(phys), REFS.pack(count, 5), db=dbs["refs"])
        elif damage_kind == "missing":
            txn.delete(U64.pack(phys), db=dbs["refs"])
        else:
            # A reference to blocks in the middle of free space that no extent maps.
            start, length = free_map(txn, dbs)[-1]
            txn.put(U64.pack(start + 50), REFS.pack(2, 1), db=dbs["refs"])
    assert_repairs(store_image, capsys, "file extents", "reference counts of shared blocks disagree")
    with damage(path) as (txn, dbs):
        assert shared_run(txn, dbs, n) == (phys, count, 2)
    with Store.open(path) as s:
        # The counts work again: the last of the two layers frees the blocks.
        free = s.statfs().free_blocks
        s.remove_layer("leaf")
        assert s.statfs().free_blocks == free
        s.remove_layer("commit")
        assert s.statfs().free_blocks > free + count


def test_owned_extent_over_shared_blocks(store_image, capsys):
    path, n, _ = store_image
    with damage(path) as (txn, dbs):
        phys, _, _ = shared_run(txn, dbs, n)
        key = extent_key(n["new"], n["child"], 0)
        _, count, flag = EXTENT.unpack(txn.get(key, db=dbs["extents"]))
        assert flag == OWNED
        txn.put(key, EXTENT.pack(phys + 1, count, OWNED), db=dbs["extents"])
    assert_repairs(store_image, capsys, "file extents", f"the second is inode {n['new']} in layer {n['child']}",
                   lost_paths=[(layer, b"/etc/new") for layer in BELOW_CHILD])  # fmt: skip
    with damage(path) as (txn, dbs):
        assert txn.get(extent_key(n["new"], n["child"], 0), db=dbs["extents"]) is None
        assert shared_run(txn, dbs, n)[2] == 2


def test_malformed_extent_flag(store_image, capsys):
    path, n, _ = store_image
    with damage(path) as (txn, dbs):
        key = extent_key(n["new"], n["child"], 0)
        phys, count, _ = EXTENT.unpack(txn.get(key, db=dbs["extents"]))
        txn.put(key, EXTENT.pack(phys, count, 7), db=dbs["extents"])
    assert_repairs(store_image, capsys, "LMDB integrity", f"malformed value of key {key.hex()} in database extents",
                   lost_paths=[(layer, b"/etc/new") for layer in BELOW_CHILD])  # fmt: skip


@pytest.mark.parametrize("value", [b"{not json", b'{"kind": "bogus", "layer": "snapshot-1", '
                                   b'"parent": "", "created": 1, "updated": 1, "labels": {}}',
                                   b'{"kind": "active", "layer": 7}'])  # fmt: skip
def test_malformed_snapshot_record(store_image, capsys, value):
    # The daemon reads every snapshot record at start, so one that does not
    # decode would stop it there.
    path, _, _ = store_image
    with damage(path) as (txn, dbs):
        txn.put(b"bad-snapshot", value, db=dbs["snapshots"])
    key = b"bad-snapshot".hex()
    assert_repairs(store_image, capsys, "LMDB integrity",
                   f"malformed value of key {key} in database snapshots")  # fmt: skip


def test_block_count_wrong(store_image, capsys):
    path, n, _ = store_image
    with damage(path) as (txn, dbs):
        put_inode(txn, dbs, n["base"], n["big"], blocks=3)
    assert_repairs(store_image, capsys, "file extents", f"inode {n['big']} in layer {n['base']} counts 3 blocks")


@pytest.mark.parametrize("kind", ["leak", "touch", "overlap"])
def test_free_map_damaged(store_image, capsys, kind):
    path, n, _ = store_image
    with damage(path) as (txn, dbs):
        free = sum(length for _, length in free_map(txn, dbs))
        start, count = free_map(txn, dbs)[-1]
        txn.delete(U64.pack(start), db=dbs["free"])
        if kind == "leak":
            # Cut the first 5 blocks off the last free extent: neither free nor mapped.
            txn.put(U64.pack(start + 5), U64.pack(count - 5), db=dbs["free"])
            message = f"5 blocks at {start}..{start + 4} are neither mapped nor free"
        elif kind == "touch":
            txn.put(U64.pack(start), U64.pack(10), db=dbs["free"])
            txn.put(U64.pack(start + 10), U64.pack(count - 10), db=dbs["free"])
            message = f"free extents at blocks {start} and {start + 10} touch"
        else:
            txn.put(U64.pack(start), U64.pack(20), db=dbs["free"])
            txn.put(U64.pack(start + 10), U64.pack(count - 10), db=dbs["free"])
            message = f"free extents at blocks {start} and {start + 10} overlap"
    assert_repairs(store_image, capsys, "free-space map", message)
    with damage(path) as (txn, dbs):
        assert free_map(txn, dbs)[-1] == (start, count)
    with Store.open(path) as s:
        assert s.statfs().free_blocks == free


def test_change_log_names_missing_inode(store_image, capsys):
    path, n, _ = store_image
    with damage(path) as (txn, dbs):
        txn.put(change_inode_key(n["child"], 999), b"", db=dbs["changes"])
    assert_repairs(store_image, capsys, "change logs", "change log of layer child names inode 999")


def test_change_log_names_missing_entry(store_image, capsys):
    path, n, _ = store_image
    with damage(path) as (txn, dbs):
        txn.put(change_dirent_key(n["child"], n["etc"], b"nothing"), b"", db=dbs["changes"])
    assert_repairs(store_image, capsys, "change logs",
                   f"change log of layer child names an entry in directory {n['etc']}")  # fmt: skip


def test_change_log_of_missing_layer(store_image, capsys):
    path, n, _ = store_image
    with damage(path) as (txn, dbs):
        txn.put(change_inode_key(55, n["hosts"]), b"", db=dbs["changes"])
    assert_repairs(store_image, capsys, "change logs", "change log entry of missing layer 55")


@pytest.mark.parametrize("counter", ["next_ino", "next_layer", "next_node"])
def test_counter_behind(store_image, capsys, counter):
    path, n, _ = store_image
    with damage(path) as (txn, dbs):
        txn.put(counter.encode(), U64.pack(1), db=dbs["meta"])
    assert_repairs(store_image, capsys, "node ids and counters", f"counter {counter} is 1 but")
    with Store.open(path) as s:
        # New numbers no longer collide with the ones in use.
        s.create_layer("after-repair", "leaf")
        attr = s.mknod(s.get_layer("after-repair").number, ROOT_INO, b"fresh", stat.S_IFREG | 0o644)
        assert attr.ino > max(n["new"], n["leaf.txt"])
        assert s.node_id(n["leaf"], attr.ino) not in (1, 2)


def test_counter_missing(store_image, capsys):
    path, n, _ = store_image
    with damage(path) as (txn, dbs):
        assert txn.delete(b"next_ino", db=dbs["meta"])
        highest = max(U64X2.unpack(k)[0] for k, _ in txn.cursor(db=dbs["inodes"]))
    assert_repairs(store_image, capsys, "superblock", "counter next_ino is missing or malformed")
    with Store.open(path) as s:
        attr = s.mknod(n["leaf"], ROOT_INO, b"fresh", stat.S_IFREG | 0o644)
        assert attr.ino == highest + 1


def test_node_missing_forward_entry(store_image, capsys):
    path, n, _ = store_image
    with damage(path) as (txn, dbs):
        node = U64.unpack(txn.get(U64X2.pack(n["child"], n["new"]), db=dbs["node_keys"]))[0]
        assert txn.delete(U64.pack(node), db=dbs["nodes"])
    assert_repairs(store_image, capsys, "node ids and counters", f"node id {node} of inode {n['new']}")
    with Store.open(path) as s:
        assert s.node_target(node) == (n["child"], n["new"])


def test_node_missing_reverse_entry(store_image, capsys):
    path, n, _ = store_image
    with damage(path) as (txn, dbs):
        assert txn.delete(U64X2.pack(n["child"], n["new"]), db=dbs["node_keys"])
    assert_repairs(store_image, capsys, "node ids and counters", "has no matching reverse entry")
    with Store.open(path) as s:
        node = s.node_id(n["child"], n["new"])
        assert s.node_target(node) == (n["child"], n["new"])


@pytest.mark.parametrize("records", ["both", "forward", "reverse"])
def test_node_of_missing_layer(store_image, capsys, records):
    path, _, _ = store_image
    node, target = 50_000, U64X2.pack(42, 7)
    with damage(path) as (txn, dbs):
        if records in ("both", "forward"):
            txn.put(U64.pack(node), target, db=dbs["nodes"])
        if records in ("both", "reverse"):
            txn.put(target, U64.pack(node), db=dbs["node_keys"])
    assert_repairs(store_image, capsys, "node ids and counters",
                   f"node id {node} of inode 7 names missing layer 42")  # fmt: skip
    with damage(path) as (txn, dbs):
        assert txn.get(U64.pack(node), db=dbs["nodes"]) is None
        assert txn.get(target, db=dbs["node_keys"]) is None


def test_inode_record_deleted(store_image, capsys):
    """A lost inode record damages several phases at once; one repair run fixes them all."""
    path, n, _ = store_image
    with damage(path) as (txn, dbs):
        assert txn.delete(inode_key(n["new"], n["child"]), db=dbs["inodes"])
    report = assert_repairs(store_image, capsys, "directory entries", "points to a missing inode",
                            lost_paths=[(layer, b"/etc/new") for layer in BELOW_CHILD])  # fmt: skip
    phases = {p["phase"] for p in report["problems"]}
    assert {"directory entries", "file extents", "free-space map", "change logs"} <= phases


def test_inode_key_out_of_order(store_image, capsys):
    """A damaged key in a leaf page hides records from look-ups until the database is rebuilt."""
    path, n, _ = store_image
    key = inode_key(n["new"], n["child"])
    # The same inode number with a high byte set sorts after every other inode.
    damaged = inode_key(n["new"] | 0x0009 << 48, n["child"])
    metadata_size = read_superblock(path)["metadata_size"]
    with open(path, "r+b") as f:
        metadata = f.read(metadata_size)
        offsets = []
        offset = metadata.find(key)
        while offset >= 0:
            offsets.append(offset)
            offset = metadata.find(key, offset + 1)
        assert offsets, "the inode key is not in the metadata area"
        for offset in offsets:
            f.seek(offset)
            f.write(damaged)
    report = assert_repairs(store_image, capsys, "LMDB integrity", "database inodes has 1 keys out of order",
                            lost_paths=[(layer, b"/etc/new") for layer in BELOW_CHILD])  # fmt: skip
    assert report["problems"][0]["action"].startswith("rebuild it from its")
    assert opens_in_daemon(path)


def test_empty_change_log_key(store_image, capsys):
    """A key whose length was zeroed cannot be deleted, so the database is rebuilt without it."""
    path, n, _ = store_image
    key = change_inode_key(n["base"], n["hosts"])
    metadata_size = read_superblock(path)["metadata_size"]
    with open(path, "r+b") as f:
        metadata = f.read(metadata_size)
        # A leaf node of LMDB 0.9 (struct MDB_node in mdb.c) ends its header
        # with the key length, a u16 just before the key. Old copies of the
        # page may hold the key too, so every copy is damaged.
        nodes = 0
        offset = metadata.find(key)
        while offset >= 0:
            if struct.unpack_from("<H", metadata, offset - 2)[0] == len(key):
                f.seek(offset - 2)
                f.write(b"\0\0")
                nodes += 1
            offset = metadata.find(key, offset + 1)
        assert nodes, "the change log key is not in the metadata area"
    assert_repairs(store_image, capsys, "LMDB integrity", "keys that are empty or longer than 511 bytes")
    assert opens_in_daemon(path)


# -- operational behaviour ----------------------------------------------------------------


def test_busy_device_names_holder(store_image, capsys):
    path = store_image[0]
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from lcfs.store import Store
            s = Store.open({path!r})
            print("open", flush=True)
            sys.stdin.read()
            s.close()
        """)],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "open\n"
        before = digest(path)
        assert fsck.main([path, "--no-progress"]) == fsck.EXIT_FAILED
        err = capsys.readouterr().err
        assert f"in use by pid {holder.pid}" in err
        assert "stop that process" in err
        assert fsck.main([path, "--repair", "--yes", "--no-progress"]) == fsck.EXIT_FAILED
        assert f"in use by pid {holder.pid}" in capsys.readouterr().err
        assert digest(path) == before
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=30) == 0
    assert fsck.main([path, "--no-progress"]) == fsck.EXIT_CLEAN


def test_repair_without_yes_needs_tty(store_image):
    path, n, _ = store_image
    with damage(path) as (txn, dbs):
        put_inode(txn, dbs, n["base"], n["hosts"], nlink=9)
    before = digest(path)
    result = subprocess.run([sys.executable, "-m", "tools.fsck", path, "--repair"], cwd=REPO,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == fsck.EXIT_FAILED
    assert "--yes" in result.stderr
    assert digest(path) == before


def test_interrupted_repair_blocks_open(store_image, capsys):
    path = store_image[0]
    with damage(path) as (txn, dbs):
        superblock = json.loads(bytes(txn.get(b"super", db=dbs["meta"])))
        superblock["needs_fsck"] = True
        txn.put(b"super", json.dumps(superblock).encode(), db=dbs["meta"])
    with pytest.raises(errors.FormatError, match="lcfs-fsck --repair"):
        Store.open(path)
    assert_repairs(store_image, capsys, "superblock", "interrupted")
    Store.open(path).close()


def test_repair_killed_midway(store_image, capsys):
    path, n, _ = store_image
    with damage(path) as (txn, dbs):
        put_inode(txn, dbs, n["base"], n["hosts"], nlink=9)
    # Commits: opening marks the store dirty, then every phase commits. The
    # seventh, after the inodes phase, carries the needs_fsck mark with the
    # fixed link count. Die right after it.
    env = dict(os.environ, LCFS_CRASH_POINT="commit.done@7")
    result = subprocess.run([sys.executable, "-m", "tools.fsck", path, "--repair", "--yes"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == fsck.EXIT_FAILED, result.stderr
    assert "was stopped by SIGKILL" in result.stderr
    assert f"{path} stays marked as mid-repair" in result.stderr
    assert read_superblock(path)["needs_fsck"] is True
    with pytest.raises(errors.FormatError, match="lcfs-fsck --repair"):
        Store.open(path)
    assert_repairs(store_image, capsys, "superblock", "an earlier repair was interrupted")


def test_crash_in_a_phase_exits_8(store_image, caplog, capsys, monkeypatch):
    path = store_image[0]

    def broken_phase(checker):
        raise RuntimeError("phase bug")

    monkeypatch.setattr(fsck.Checker, "check_nodes", broken_phase)
    broken_phase.__doc__ = "node ids and counters"
    assert fsck.main([path, "--repair", "--yes", "--no-progress"]) == fsck.EXIT_FAILED
    failures = [r for r in caplog.records if r.levelname == "ERROR" and r.name == "lcfs.fsck"]
    assert failures
    # The child process sends the traceback as text.
    assert "RuntimeError: phase bug" in failures[-1].exc_text
    assert "this is a bug in lcfs-fsck" in capsys.readouterr().err
    # Nothing needed a repair, so nothing marked the store.
    assert read_superblock(path).get("needs_fsck") is None


def test_repair_failed_after_fix_stays_marked(store_image, capsys, monkeypatch):
    path, n, _ = store_image
    with damage(path) as (txn, dbs):
        put_inode(txn, dbs, n["base"], n["hosts"], nlink=9)

    def broken_phase(checker):
        raise RuntimeError("phase bug")

    broken_phase.__doc__ = "node ids and counters"
    monkeypatch.setattr(fsck.Checker, "check_nodes", broken_phase)
    assert fsck.main([path, "--repair", "--yes", "--no-progress"]) == fsck.EXIT_FAILED
    assert f"{path} stays marked as mid-repair" in capsys.readouterr().err
    # The link count was fixed and committed before the failure.
    assert read_superblock(path)["needs_fsck"] is True


def compact_metadata(path: str) -> None:
    """Rewrite the store's LMDB without free pages, and punch out the rest of its area.

    Every page a later transaction writes then needs new space on the file system.
    """
    metadata_size = read_superblock(path)["metadata_size"]
    env = open_env(path, metadata_size)
    compact = path + ".compact"
    try:
        env.copy(compact, compact=True)
    finally:
        env.close()
    data = Path(compact).read_bytes()
    os.unlink(compact)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, 0)
        libc = ctypes.CDLL(None, use_errno=True)
        punch = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
        length = ctypes.c_long(metadata_size - len(data))
        if libc.fallocate(fd, punch, ctypes.c_long(len(data)), length) != 0:
            raise OSError(ctypes.get_errno(), "fallocate failed", path)
    finally:
        os.close(fd)


def fill_file_system(directory: Path, spare_pages: int) -> None:
    """Fill the file system of ``directory`` until only ``spare_pages`` 4 KiB pages are free."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, bytes(4096))
    except OSError as error:
        assert error.errno == errno.ENOSPC
    os.ftruncate(fd, os.fstat(fd).st_size - spare_pages * 4096)
    os.close(fd)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 32 MiB tmpfs mounted for one test, unmounted at teardown."""
    with tmpfs_at(tmp_path / "tmpfs", "32m") as mountpoint:
        yield mountpoint


def test_repair_on_full_host_left_then_done(small_tmpfs):
    """Repairs that need metadata pages the full host cannot give are left, then done once it can."""
    path = str(small_tmpfs / "store.img")
    Store.mkfs(path, size=32 * MiB)
    with Store.open(path) as s:
        number = s.create_layer("many").number
        inos = [
            s.mknod(number, ROOT_INO, b"f%d" % i, stat.S_IFREG | 0o644).ino
            for i in range(2000)
        ]
    with damage(path) as (txn, dbs):
        for ino in inos:
            put_inode(txn, dbs, number, ino, nlink=9)
    compact_metadata(path)
    # Opening the store fits in 16 pages, but the repair of 2,000 inodes with its mark does not.
    fill_file_system(small_tmpfs, spare_pages=16)
    command = [sys.executable, "-m", "tools.fsck", path, "--repair", "--yes", "--no-progress"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120,
                            check=False)  # fmt: skip
    assert result.returncode == fsck.EXIT_LEFT, result.stderr
    assert f"repair failed: the file system holding {path} is full" in result.stderr
    assert "0 repaired, 2000 left" in result.stderr
    # The store opens only for lcfs-fsck until a repair finishes.
    assert read_superblock(path).get("needs_fsck") is True
    os.unlink(small_tmpfs / "filler")
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120,
                            check=False)  # fmt: skip
    assert result.returncode == fsck.EXIT_REPAIRED, result.stderr
    # The 2,000 link counts and the interrupted repair that the first run left.
    assert "2001 problems found, 2001 repaired, 0 left" in result.stderr
    assert read_superblock(path).get("needs_fsck") is None


@pytest.mark.parametrize(
    "option, value, reason",
    [
        ("--grace", "-5", "invalid number of seconds '-5'"),
        ("--log-level", "bogus", "invalid choice: 'bogus'"),
    ],
)
def test_option_value_rejected(store_image, capsys, option, value, reason):
    with pytest.raises(SystemExit) as exc:
        fsck.main([store_image[0], option, value])
    assert exc.value.code == fsck.EXIT_FAILED
    err = capsys.readouterr().err
    assert reason in err
    assert option in err
    assert "Traceback" not in err


def test_missing_device(tmp_path, capsys):
    assert fsck.main([str(tmp_path / "absent.img"), "--no-progress"]) == fsck.EXIT_FAILED
    assert "absent.img" in capsys.readouterr().err


def test_not_a_store(tmp_path, capsys):
    path = tmp_path / "zeros.img"
    path.write_bytes(bytes(MiB))
    assert fsck.main([str(path), "--no-progress"]) == fsck.EXIT_FAILED
    assert "holds no lcfs store" in capsys.readouterr().err


def test_json_output_of_clean_store(store_image, capsys):
    path = store_image[0]
    code, report = run_fsck(path, capsys)
    assert code == fsck.EXIT_CLEAN
    assert report["found"] == report["left"] == 0
    assert report["problems"] == []
    assert report["layers"] == 4
    assert 0 < report["free_blocks"] < report["total_blocks"]


def test_phases_logged_in_order(store_image, caplog):
    with caplog.at_level("INFO", logger="lcfs.fsck"):
        assert fsck.main([store_image[0], "--no-progress"]) == fsck.EXIT_CLEAN
    checking = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Checking ")]
    assert len(checking) == len(fsck.PHASES)
    assert checking[0] == "Checking superblock"
    assert checking[-1] == "Checking node ids and counters"


def test_problems_logged_as_warnings(store_image, caplog, capsys):
    path, n, _ = store_image
    with damage(path) as (txn, dbs):
        put_inode(txn, dbs, n["base"], n["hosts"], nlink=9)
    with caplog.at_level("INFO", logger="lcfs.fsck"):
        assert fsck.main([path, "--repair", "--yes", "--no-progress"]) == fsck.EXIT_REPAIRED
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name == "lcfs.fsck"]
    assert warnings == [f"inodes and link counts: inode {n['hosts']} of layer base has link count 9, "
                        "expected 2; repair: set it to 2"]  # fmt: skip
    assert "1 problems found, 1 repaired, 0 left" in capsys.readouterr().out


def test_help_documents_exit_codes(capsys):
    with pytest.raises(SystemExit) as exc:
        fsck.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for code, meaning in [(0, "clean"), (1, "repaired"), (4, "left"), (8, "could not run")]:
        assert any(line.split()[:1] == [str(code)] and meaning in line for line in text.splitlines()), code


# -- damaged LMDB pages and bad arguments -------------------------------------------------


def opens_in_daemon(path: str) -> bool:
    """Open the store as the daemon does, in a child process, because LMDB may abort it."""
    code = "import sys; from lcfs.store import Store; Store.open(sys.argv[1]).close()"
    result = subprocess.run(
        [sys.executable, "-c", code, path],
        cwd=REPO,
        capture_output=True,
        timeout=60,
        check=False,
    )
    return result.returncode == 0


@pytest.mark.parametrize("mode", [[], ["--repair", "--yes"]])
def test_lmdb_abort_exits_8(store_image, capsys, mode):
    path = store_image[0]
    # node_keys has one record, so as a branch page its root fails LMDB's
    # assertion that a branch has two keys or more, which aborts the process.
    set_root_page_flags(path, "node_keys", P_BRANCH)
    before = digest(path)
    for _ in range(2):
        assert fsck.main([path, "--no-progress", *mode]) == fsck.EXIT_FAILED
        err = capsys.readouterr().err
        assert f"lcfs-fsck: the LMDB database on {path} appears damaged" in err
        assert "stopped with SIGABRT" in err
        assert "mdb_page_search_root" in err
        assert "lcfs mkfs --force" in err
        assert read_superblock(path).get("needs_fsck") is None
    assert digest(path) == before
    assert opens_in_daemon(path)


@pytest.mark.parametrize("mode", [[], ["--repair", "--yes"]])
def test_lmdb_error_names_cause(store_image, capsys, mode):
    path = store_image[0]
    set_root_page_flags(path, "children", P_OVERFLOW)
    before = digest(path)
    assert fsck.main([path, "--no-progress", *mode]) == fsck.EXIT_FAILED
    err = capsys.readouterr().err
    assert (
        f"the LMDB database on {path} appears damaged: reading database children failed"
        in err
    )
    assert "MDB_CORRUPTED" in err
    assert "MDB_BAD_TXN" not in err
    assert "Traceback" not in err
    assert "run lcfs-fsck again" not in err
    assert read_superblock(path).get("needs_fsck") is None
    assert digest(path) == before


@pytest.mark.parametrize("value", [None, 4097])
def test_superblock_block_size_damaged(store_image, capsys, value):
    path = store_image[0]
    with damage(path) as (txn, dbs):
        superblock = json.loads(txn.get(b"super", db=dbs["meta"]))
        superblock["block_size"] = value
        txn.put(b"super", json.dumps(superblock).encode(), db=dbs["meta"])
    assert_repairs(store_image, capsys, "superblock", f"superblock has block size {value!r}, expected 4096")
    assert read_superblock(path)["block_size"] == 4096


@pytest.mark.parametrize(
    "record, detail",
    [
        (b'{"magic": "lcfs", "format": 1,, }', "it is not valid JSON"),
        (b'["lcfs"]', "it is not a JSON object"),
        (b'{"magic": "lcfs", "format": 1, "data_blocks": 4096}',
         "its field 'metadata_size' is missing or not of type int"),
    ],
)
def test_damaged_superblock_named(store_image, capsys, record, detail):
    """Every command names a damaged superblock in one line instead of a traceback."""
    path = store_image[0]
    with damage(path) as (txn, dbs):
        txn.put(b"super", record, db=dbs["meta"])
    expected = f"the superblock of {path} is damaged: {detail}"
    assert fsck.main([path, "--no-progress"]) == fsck.EXIT_FAILED
    assert expected in capsys.readouterr().err
    listing = subprocess.run([sys.executable, "-m", "lcfs.cli", "layers", "--device", path],
                             cwd=REPO, capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert listing.returncode != 0
    assert expected in listing.stderr
    assert "Traceback" not in listing.stderr


def swap_main_database_nodes(path: str) -> None:
    """Swap the first two node pointers of the root page of LMDB's list of databases."""
    env = lmdb.open(path, subdir=False, lock=False, readonly=True, max_dbs=len(DATABASES) + 1)
    try:
        page_size = env.stat()["psize"]
    finally:
        env.close()
    with open(path, "r+b") as f:
        # LMDB 0.9 keeps two meta pages, and the one with the higher txnid is
        # current. In each, MDB_meta follows the 16-byte page header, and
        # mm_dbs[1] (the main database) puts its md_root at offset 128.
        metas = []
        for page in (0, 1):
            f.seek(page * page_size)
            header = f.read(160)
            metas.append((struct.unpack_from("<Q", header, MAIN_TXNID)[0],
                          struct.unpack_from("<Q", header, MAIN_ROOT)[0]))  # fmt: skip
        root = max(metas)[1]
        f.seek(root * page_size)
        page = f.read(page_size)
        assert struct.unpack_from("<H", page, PAGE_FLAGS)[0] == P_LEAF
        first, second = struct.unpack_from("<HH", page, PAGE_POINTERS)
        f.seek(root * page_size + PAGE_POINTERS)
        f.write(struct.pack("<HH", second, first))


@pytest.mark.parametrize("mode", [[], ["--repair", "--yes"]])
def test_database_list_out_of_order(store_image, capsys, mode):
    """Look-ups of databases by name fail, so fsck must stop before it writes anything."""
    path = store_image[0]
    swap_main_database_nodes(path)
    before = digest(path)
    assert fsck.main([path, "--no-progress", *mode]) == fsck.EXIT_FAILED
    err = capsys.readouterr().err
    assert f"the LMDB database on {path} appears damaged: its list of databases is out of order" in err
    assert "Traceback" not in err
    assert digest(path) == before


def test_daemon_rejects_database_list_out_of_order(store_image):
    path = store_image[0]
    swap_main_database_nodes(path)
    before = digest(path)
    assert not opens_in_daemon(path)
    listing = subprocess.run([sys.executable, "-m", "lcfs.cli", "layers", "--device", path],
                             cwd=REPO, capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert listing.returncode != 0
    assert f"the LMDB database on {path} is damaged: its list of databases is out of order" in listing.stderr
    assert "Traceback" not in listing.stderr
    assert digest(path) == before


@pytest.mark.parametrize("mode", [[], ["--repair", "--yes"]])
def test_bad_page_bounds_name_cause(store_image, capsys, mode):
    """A leaf whose free-space bounds are damaged; py-lmdb reports it as MDB_BAD_TXN in a write transaction."""
    path = store_image[0]
    env = lmdb.open(path, subdir=False, lock=False, readonly=True, max_dbs=len(DATABASES) + 1)
    try:
        with env.begin() as txn:
            root = struct.unpack_from("<Q", txn.get(b"refs"), MD_ROOT)[0]
            page_size = env.stat()["psize"]
    finally:
        env.close()
    with open(path, "r+b") as f:
        # mp_upper, the end of the page's free space, is a u16 at offset 14.
        f.seek(root * page_size + 14)
        upper = struct.unpack("<H", f.read(2))[0]
        f.seek(root * page_size + 14)
        f.write(struct.pack("<H", upper + 152))
    before = digest(path)
    assert fsck.main([path, "--no-progress", *mode]) == fsck.EXIT_FAILED
    err = capsys.readouterr().err
    assert f"the LMDB database on {path} appears damaged: reading database refs failed" in err
    assert "MDB_CORRUPTED" in err
    assert "MDB_BAD_TXN" not in err
    assert digest(path) == before


def test_lmdb_error_in_phase_names_cause(store_image, capsys, monkeypatch):
    path = store_image[0]

    def broken_phase(checker):
        # An aborted transaction makes any later write, as closing the store does, fail too.
        checker.txn.abort()
        raise lmdb.CorruptedError(
            "mdb_cursor_get: MDB_CORRUPTED: Located page was wrong type"
        )

    broken_phase.__doc__ = "node ids and counters"
    monkeypatch.setattr(fsck.Checker, "check_nodes", broken_phase)
    assert fsck.main([path, "--repair", "--yes", "--no-progress"]) == fsck.EXIT_FAILED
    err = capsys.readouterr().err
    assert (
        f"the LMDB database on {path} appears damaged: mdb_cursor_get: MDB_CORRUPTED"
        in err
    )
    assert "closed/deleted/dropped" not in err
    assert "run lcfs-fsck again" not in err
    assert read_superblock(path).get("needs_fsck") is None


@pytest.mark.parametrize(
    "kind, problem", [("missing", "does not exist"), ("file", "is not a directory")]
)
def test_docker_root_invalid(tmp_path, capsys, kind, problem):
    root = tmp_path / "docker"
    if kind == "file":
        root.write_text("")
    with pytest.raises(SystemExit) as exc:
        fsck.main([str(tmp_path / "absent.img"), "--docker-root", str(root)])
    assert exc.value.code == fsck.EXIT_FAILED
    err = capsys.readouterr().err
    assert f"--docker-root {root} {problem}" in err
    # The check comes before the device is opened.
    assert "absent.img" not in err
