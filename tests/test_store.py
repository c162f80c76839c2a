"""Store tests on a real LMDB environment, on an image file and on a loop device."""

import ctypes
import errno
import io
import mmap
import os
import stat
import subprocess
import tarfile

import pytest

from mounts import tmpfs_at
from tools import fsck
from lcfs.journal import intents
from lcfs.store import RENAME_EXCHANGE, RENAME_NOREPLACE, ROOT_INO, Store, errors

MiB = 1 << 20


@pytest.fixture
def image(tmp_path):
    path = str(tmp_path / "store.img")
    Store.mkfs(path, size=256 * MiB)
    return path


@pytest.fixture
def store(image):
    s = Store.open(image)
    yield s
    s.close()
    assert fsck.main([image, "--no-progress", "--log-level", "WARNING"]) == 0


@pytest.fixture
def loop_device(tmp_path):
    backing = tmp_path / "loop.img"
    with open(backing, "wb") as f:
        f.truncate(256 * MiB)
    try:
        device = subprocess.run(["losetup", "--find", "--show", str(backing)], check=True,
                                capture_output=True, text=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"no loop device available: {exc}")
    yield device
    subprocess.run(["losetup", "-d", device], check=False)


def write_tree(s, layer):
    """Create a small tree with every file type; return {path: expected content or kind}."""
    etc = s.mkdir(layer, ROOT_INO, b"etc", 0o755)
    f = s.mknod(layer, etc.ino, b"hosts", stat.S_IFREG | 0o644)
    s.write(layer, f.ino, 0, b"127.0.0.1 localhost\n")
    big = s.mknod(layer, ROOT_INO, b"big", stat.S_IFREG | 0o600, uid=1000, gid=1000)
    payload = os.urandom(3 * MiB + 123)
    s.write(layer, big.ino, 0, payload)
    sparse = s.mknod(layer, ROOT_INO, b"sparse", stat.S_IFREG | 0o644)
    s.write(layer, sparse.ino, 100 * MiB, b"end")
    s.symlink(layer, ROOT_INO, b"link", b"etc/hosts")
    s.link(layer, f.ino, ROOT_INO, b"hosts.hard")
    s.mknod(layer, ROOT_INO, b"null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    s.mknod(layer, ROOT_INO, b"fifo", stat.S_IFIFO | 0o644)
    suid = s.mknod(layer, ROOT_INO, b"suid", stat.S_IFREG | 0o4755)
    s.setxattr(layer, suid.ino, b"security.capability", b"\x01\x00\x00\x02" + bytes(16))
    s.setattr(layer, big.ino, mtime_ns=1_600_000_000_123_456_789)
    return payload


def check_tree(s, layer, payload):
    etc = s.lookup(layer, ROOT_INO, b"etc")
    hosts = s.lookup(layer, etc.ino, b"hosts")
    assert s.read(layer, hosts.ino, 0, 100) == b"127.0.0.1 localhost\n"
    assert hosts.nlink == 2
    assert s.lookup(layer, ROOT_INO, b"hosts.hard").ino == hosts.ino
    big = s.lookup(layer, ROOT_INO, b"big")
    assert (big.uid, big.gid, stat.S_IMODE(big.mode)) == (1000, 1000, 0o600)
    assert big.mtime_ns == 1_600_000_000_123_456_789
    assert s.read(layer, big.ino, 0, 4 * MiB) == payload
    sparse = s.lookup(layer, ROOT_INO, b"sparse")
    assert sparse.size == 100 * MiB + 3
    assert sparse.blocks == 8  # one 4 KiB block in 512-byte units
    assert s.read(layer, sparse.ino, 50 * MiB, 10) == bytes(10)
    assert s.readlink(layer, s.lookup(layer, ROOT_INO, b"link").ino) == b"etc/hosts"
    null = s.lookup(layer, ROOT_INO, b"null")
    assert stat.S_ISCHR(null.mode) and null.rdev == os.makedev(1, 3)
    assert stat.S_ISFIFO(s.lookup(layer, ROOT_INO, b"fifo").mode)
    suid = s.lookup(layer, ROOT_INO, b"suid")
    assert stat.S_IMODE(suid.mode) == 0o4755
    assert s.getxattr(layer, suid.ino, b"security.capability")[:4] == b"\x01\x00\x00\x02"


@pytest.mark.parametrize("kind", ["image", "loop"])
def test_tree_survives_reopen(kind, tmp_path, request):
    if kind == "image":
        path = str(tmp_path / "store.img")
        Store.mkfs(path, size=256 * MiB)
    else:
        path = request.getfixturevalue("loop_device")
        Store.mkfs(path)
    with Store.open(path) as s:
        free_before = s.statfs().free_blocks
        layer = s.create_layer("base").number
        payload = write_tree(s, layer)
        check_tree(s, layer, payload)
    with Store.open(path) as s:
        layer = s.get_layer("base").number
        check_tree(s, layer, payload)
        s.remove_layer("base")
        assert s.statfs().free_blocks == free_before
    with Store.open(path) as s:
        assert s.list_layers() == []
        assert s.statfs().free_blocks == free_before


def test_layer_chain_1000_deep(store):
    free_before = store.statfs().free_blocks
    parent = None
    for i in range(1000):
        layer = store.create_layer(f"layer{i}", parent)
        f = store.mknod(layer.number, ROOT_INO, f"f{i}".encode(), stat.S_IFREG | 0o644)
        store.write(layer.number, f.ino, 0, f"content {i}".encode())
        parent = layer.id
    store.commit()
    top = store.get_layer("layer999").number
    names = [name for name, _ in store.readdir(top, ROOT_INO)]
    assert len(names) == 1000
    for i in range(1000):
        attr = store.lookup(top, ROOT_INO, f"f{i}".encode())
        assert store.read(top, attr.ino, 0, 100) == f"content {i}".encode()
    for i in reversed(range(1000)):
        store.remove_layer(f"layer{i}")
    free_after = store.statfs().free_blocks
    assert abs(free_after - free_before) <= free_before // 100
    assert free_after == free_before


def test_one_byte_write_branches_one_block(store):
    base = store.create_layer("base").number
    f = store.mknod(base, ROOT_INO, b"big", stat.S_IFREG | 0o644)
    data = os.urandom(8 * MiB)
    store.write(base, f.ino, 0, data)
    child = store.create_layer("child", "base").number
    free = store.statfs().free_blocks
    store.write(child, f.ino, 5 * MiB + 7, b"X")
    assert free - store.statfs().free_blocks == 1
    assert store.read(child, f.ino, 5 * MiB, 16) == data[5 * MiB : 5 * MiB + 7] + b"X" + data[5 * MiB + 8 : 5 * MiB + 16]
    assert store.read(base, f.ino, 0, 8 * MiB) == data


@pytest.mark.parametrize("offset, size", [
    (0, 3 * 4096), (5000, 6000), (4095, 2), (8192, 4096), (3 * 4096 - 1, 10000),
    (6 * 4096 - 100, 200), (9 * 4096 + 7, 100),
])  # fmt: skip
def test_read_ranges_across_extents_and_holes(store, offset, size):
    layer = store.create_layer("f").number
    f = store.mknod(layer, ROOT_INO, b"f", stat.S_IFREG | 0o644)
    # Blocks 0-2 and 6-7 hold data in two extents; 3-5 are a hole, and
    # the file ends inside block 9, which is a hole too.
    first, second = os.urandom(3 * 4096), os.urandom(2 * 4096)
    store.write(layer, f.ino, 0, first)
    store.write(layer, f.ino, 6 * 4096, second)
    store.setattr(layer, f.ino, size=9 * 4096 + 50)
    expected = first + bytes(3 * 4096) + second + bytes(4096 + 50)
    assert store.read(layer, f.ino, offset, size) == expected[offset : offset + size]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]  # fmt: skip
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def cached_pages(path: str, start: int, length: int) -> int:
    """Count the pages of a file range in the page cache, by mincore(2) of a mapping.

    Unlike a read, a mapping that is never touched reads nothing ahead.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        address = _libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
        if address == ctypes.c_void_p(-1).value:
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        try:
            pages = ctypes.create_string_buffer((length + 4095) // 4096)
            if _libc.mincore(address, length, pages) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
            return sum(flag & 1 for flag in pages.raw)
        finally:
            _libc.munmap(address, length)
    finally:
        os.close(fd)


def drop_file_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_read_dropping_device_cache(store, image):
    layer = store.create_layer("f").number
    f = store.mknod(layer, ROOT_INO, b"f", stat.S_IFREG | 0o644)
    data = os.urandom(4 * MiB)
    store.write(layer, f.ino, 0, data)
    store.commit()
    region = (store.data_offset, 16 * MiB)
    drop_file_cache(image)
    assert cached_pages(image, *region) == 0
    # Sequential 1 MiB reads, as the kernel sends them for a cold FUSE read.
    for offset in range(0, len(data), MiB):
        assert store.read(layer, f.ino, offset, MiB) == data[offset : offset + MiB]
    assert cached_pages(image, *region) >= 1024
    drop_file_cache(image)
    for offset in range(0, len(data), MiB):
        chunk = store.read(layer, f.ino, offset, MiB, drop_cache=True)
        assert chunk == data[offset : offset + MiB]
    assert cached_pages(image, *region) == 0


def test_frozen_parent_rejects_writes(store):
    base = store.create_layer("base").number
    f = store.mknod(base, ROOT_INO, b"a", stat.S_IFREG | 0o644)
    store.create_layer("child", "base")
    assert store.get_layer("base").frozen
    with pytest.raises(errors.ReadOnly) as info:
        store.write(base, f.ino, 0, b"x")
    assert info.value.errno == errno.EROFS
    with pytest.raises(errors.ReadOnly):
        store.mkdir(base, ROOT_INO, b"d", 0o755)


def test_frozen_layer_message_after_children_removed(store):
    base = store.create_layer("base").number
    store.create_layer("child", "base")
    store.remove_layer("child")
    assert store.children("base") == []
    with pytest.raises(errors.ReadOnly) as info:
        store.mkdir(base, ROOT_INO, b"d", 0o755)
    assert str(info.value) == (
        "layer base is read-only because a child layer was created on it, and a"
        " layer stays read-only after its children are removed"
    )


def test_namespace_errors(store):
    layer = store.create_layer("base").number
    d = store.mkdir(layer, ROOT_INO, b"d", 0o755)
    store.mknod(layer, d.ino, b"f", stat.S_IFREG | 0o644)
    with pytest.raises(errors.Exists):
        store.mkdir(layer, ROOT_INO, b"d", 0o755)
    with pytest.raises(errors.NotEmpty):
        store.rmdir(layer, ROOT_INO, b"d")
    with pytest.raises(errors.NotFound):
        store.lookup(layer, ROOT_INO, b"missing")
    with pytest.raises(errors.IsDir):
        store.unlink(layer, ROOT_INO, b"d")
    with pytest.raises(errors.NotDir):
        store.rmdir(layer, d.ino, b"f")
    with pytest.raises(errors.Invalid):
        store.rename(layer, ROOT_INO, b"d", d.ino, b"inside")
    with pytest.raises(errors.NameTooLong):
        store.mkdir(layer, ROOT_INO, b"x" * 256, 0o755)


def test_rename_inherited_directory(store):
    base = store.create_layer("base").number
    d = store.mkdir(base, ROOT_INO, b"dir", 0o755)
    sub = store.mkdir(base, d.ino, b"sub", 0o755)
    f = store.mknod(base, sub.ino, b"file", stat.S_IFREG | 0o644)
    store.write(base, f.ino, 0, b"data")
    child = store.create_layer("child", "base").number
    other = store.mkdir(child, ROOT_INO, b"other", 0o755)
    store.rename(child, ROOT_INO, b"dir", other.ino, b"moved")
    moved = store.lookup(child, other.ino, b"moved")
    sub2 = store.lookup(child, moved.ino, b"sub")
    assert store.read(child, store.lookup(child, sub2.ino, b"file").ino, 0, 10) == b"data"
    with pytest.raises(errors.NotFound):
        store.lookup(child, ROOT_INO, b"dir")
    assert store.lookup(base, ROOT_INO, b"dir").ino == d.ino
    changes = dict(store.changes("child"))
    assert changes["/dir"] == 2
    assert changes["/other/moved/sub/file"] == 1


def test_rename_flags(store):
    layer = store.create_layer("base").number
    a = store.mknod(layer, ROOT_INO, b"a", stat.S_IFREG | 0o644)
    b = store.mkdir(layer, ROOT_INO, b"b", 0o755)
    with pytest.raises(errors.Exists):
        store.rename(layer, ROOT_INO, b"a", ROOT_INO, b"b", RENAME_NOREPLACE)
    store.rename(layer, ROOT_INO, b"a", ROOT_INO, b"b", RENAME_EXCHANGE)
    assert store.lookup(layer, ROOT_INO, b"a").ino == b.ino
    assert store.lookup(layer, ROOT_INO, b"b").ino == a.ino
    with pytest.raises(errors.NotFound):
        store.rename(layer, ROOT_INO, b"a", ROOT_INO, b"c", RENAME_EXCHANGE)


def test_delete_then_recreate_over_inherited(store):
    base = store.create_layer("base").number
    d = store.mkdir(base, ROOT_INO, b"d", 0o755)
    store.mknod(base, d.ino, b"old", stat.S_IFREG | 0o644)
    child = store.create_layer("child", "base").number
    store.unlink(child, d.ino, b"old")
    store.rmdir(child, ROOT_INO, b"d")
    new = store.mkdir(child, ROOT_INO, b"d", 0o700)
    assert new.ino != d.ino
    assert store.readdir(child, new.ino) == []
    store.mknod(child, new.ino, b"old", stat.S_IFREG | 0o600)
    assert [n for n, _ in store.readdir(child, new.ino)] == [b"old"]


def test_chmod_keeps_mtime(store):
    base = store.create_layer("base").number
    f = store.mknod(base, ROOT_INO, b"f", stat.S_IFREG | 0o644)
    store.setattr(base, f.ino, mtime_ns=1_000_000_000)
    child = store.create_layer("child", "base").number
    attr = store.setattr(child, f.ino, mode=0o600, uid=5)
    assert attr.mtime_ns == 1_000_000_000
    assert stat.S_IMODE(attr.mode) == 0o600
    assert store.lookup(child, ROOT_INO, b"f").uid == 5


def test_truncate_zeroes_tail(store):
    layer = store.create_layer("base").number
    f = store.mknod(layer, ROOT_INO, b"f", stat.S_IFREG | 0o644)
    store.write(layer, f.ino, 0, b"x" * 10000)
    store.setattr(layer, f.ino, size=5000)
    store.setattr(layer, f.ino, size=10000)
    assert store.read(layer, f.ino, 0, 10000) == b"x" * 5000 + bytes(5000)


def unlink_pinned_file(store) -> tuple[int, int, int]:
    """Write a 64 KiB file in a new layer, pin it and unlink it.

    Return (layer, ino, free blocks before the write).
    """
    layer = store.create_layer("base").number
    f = store.mknod(layer, ROOT_INO, b"f", stat.S_IFREG | 0o644)
    free = store.statfs().free_blocks
    store.write(layer, f.ino, 0, b"y" * 65536)
    store.pin(layer, f.ino)
    store.unlink(layer, ROOT_INO, b"f")
    return layer, f.ino, free


def test_unlinked_open_file_freed_at_unpin(store):
    layer, ino, free = unlink_pinned_file(store)
    assert store.read(layer, ino, 0, 4) == b"yyyy"
    store.unpin(layer, ino)
    assert store.statfs().free_blocks == free


def pending_intent_kinds(store) -> list[str]:
    with store.env.begin() as txn:
        return [intent["kind"] for _, intent in intents.pending(txn, store.dbs["intents"])]


def test_orphan_reaped_before_commit_leaves_no_intent(store):
    layer, ino, _ = unlink_pinned_file(store)
    store.unpin(layer, ino)
    store.commit()
    assert pending_intent_kinds(store) == []


def test_pinned_orphan_reaped_after_reopen(image):
    store = Store.open(image)
    _, _, free = unlink_pinned_file(store)
    store.commit()
    assert pending_intent_kinds(store) == ["orphan"]
    # Closed with the file still pinned, as a crash leaves it.
    store.close()
    store = Store.open(image)
    try:
        assert pending_intent_kinds(store) == []
        assert store.statfs().free_blocks == free
    finally:
        store.close()


def test_remove_layer_with_children_rejected(store):
    store.create_layer("base")
    store.create_layer("child", "base")
    with pytest.raises(errors.LayerHasChildren) as info:
        store.remove_layer("base")
    assert "child" in str(info.value)
    with pytest.raises(errors.LayerExists):
        store.create_layer("child", "base")
    with pytest.raises(errors.LayerNotFound):
        store.create_layer("x", "nope")


def count_commits(monkeypatch) -> list:
    """Count Store.commit calls from here on, one item per call."""
    counted = []
    commit = Store.commit

    def counting_commit(self):
        counted.append(1)
        commit(self)

    monkeypatch.setattr(Store, "commit", counting_commit)
    return counted


@pytest.mark.parametrize("files, one_commit", [(3, True), (40, False)])
def test_small_layer_removed_in_one_commit(store, monkeypatch, files, one_commit):
    # LCFS_PURGE_BATCH is read at import; 40 files take several batches of 10.
    monkeypatch.setattr("lcfs.store.store.PURGE_BATCH", 10)
    free = store.statfs().free_blocks
    layer = store.create_layer("c").number
    for index in range(files):
        f = store.mknod(layer, ROOT_INO, b"f%d" % index, stat.S_IFREG | 0o644)
        store.write(layer, f.ino, 0, b"x" * 5000)
    store.commit()
    counted = count_commits(monkeypatch)
    store.remove_layer("c")
    # A large layer: the mark, one commit per batch, then the drop.
    assert (len(counted) == 1) == one_commit
    assert not store.exists("c")
    assert store.statfs().free_blocks == free


@pytest.mark.parametrize("batch, one_commit", [(5000, True), (10, False)])
def test_layer_removal_deletes_node_ids(store, monkeypatch, batch, one_commit):
    # 31 node ids and no change record take more than one batch of 10.
    monkeypatch.setattr("lcfs.store.store.PURGE_BATCH", batch)
    base = store.create_layer("base").number
    inos = [
        store.mknod(base, ROOT_INO, b"f%d" % index, stat.S_IFREG | 0o644).ino
        for index in range(30)
    ]
    child = store.create_layer("child", "base").number
    base_node = store.node_id(base, inos[0])
    removed = [store.node_id(child, ino) for ino in [ROOT_INO, *inos]]
    store.commit()
    counted = count_commits(monkeypatch)
    store.remove_layer("child")
    assert (len(counted) == 1) == one_commit
    for node in removed:
        with pytest.raises(errors.NotFound):
            store.node_target(node)
    assert store.node_target(base_node) == (base, inos[0])
    assert not [key for key in store._node_keys if key[0] == child]
    cursor = store._group_txn().cursor(db=store.dbs["node_keys"])
    left = [bytes(key) for key in cursor.iternext(values=False)]
    assert [key for key in left if key[:8] == child.to_bytes(8, "big")] == []
    # A new layer gets new node ids, never those of the removed one.
    again = store.create_layer("again", "base").number
    assert store.node_id(again, inos[0]) > max(removed)


def test_node_id_of_removed_layer_rejected(store, monkeypatch):
    """A lookup that races a layer's removal allocates no node id in it.

    The FUSE thread looks a name up and then requests its node id in a
    second call, and a Remove can run in between. A node id allocated then
    outlived the layer, and lcfs-fsck reported it.
    """
    base = store.create_layer("base").number
    f = store.mknod(base, ROOT_INO, b"f", stat.S_IFREG | 0o644)
    store.create_layer("gone", "base")
    gone = store.get_layer("gone").number
    attr = store.lookup(gone, ROOT_INO, b"f")
    store.remove_layer("gone")
    with pytest.raises(errors.LayerNotFound):
        store.node_id(gone, attr.ino)
    assert (gone, f.ino) not in store._node_keys

    # The same during a removal in batches, between two of them.
    monkeypatch.setattr("lcfs.store.store.PURGE_BATCH", 1)
    store.create_layer("batched", "base")
    batched = store.get_layer("batched").number
    store.node_id(batched, ROOT_INO)
    store.node_id(batched, f.ino)
    rejected = []

    def look_up_while_removing(name):
        if name == "remove.marked":
            with pytest.raises(errors.LayerNotFound):
                store.node_id(batched, f.ino + 1)
            rejected.append(name)

    monkeypatch.setattr("lcfs.store.store.crash_point", look_up_while_removing)
    store.remove_layer("batched")
    assert rejected == ["remove.marked"]
    assert not [key for key in store._node_keys if key[0] in (gone, batched)]
    store.commit()


def test_commit_skips_sync_without_data(store, monkeypatch):
    synced = []
    fdatasync = os.fdatasync

    def counting_fdatasync(fd):
        synced.append(fd)
        fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", counting_fdatasync)
    layer = store.create_layer("c").number
    f = store.mknod(layer, ROOT_INO, b"f", stat.S_IFREG | 0o644)
    store.write(layer, f.ino, 0, b"x" * 5000)
    store.commit()
    assert synced == [store.fd]
    store.setattr(layer, f.ino, mode=0o600)
    child = store.create_layer("d", "c").number
    store.commit()
    assert synced == [store.fd]
    store.write(child, f.ino, 0, b"y")
    store.commit()
    assert synced == [store.fd, store.fd]
    assert store.read(child, f.ino, 0, 2) == b"yx"


def test_node_ids_persist_and_never_repeat(image):
    with Store.open(image) as s:
        layer = s.create_layer("base").number
        f = s.mknod(layer, ROOT_INO, b"f", stat.S_IFREG | 0o644)
        node = s.node_id(layer, f.ino)
        root_node = s.node_id(layer, ROOT_INO)
    with Store.open(image) as s:
        assert s.node_target(node) == (layer, f.ino)
        assert s.node_id(layer, ROOT_INO) == root_node
        s.remove_layer("base")
        layer2 = s.create_layer("again").number
        assert s.node_id(layer2, ROOT_INO) not in (node, root_node)


def test_node_ids_leave_the_store_clean(image):
    # A Put syncs the device only while the store is dirty. A lookup that
    # allocates a node id must not make it dirty.
    with Store.open(image) as s:
        layer = s.create_layer("base").number
        s.commit()
        node = s.node_id(layer, ROOT_INO)
        assert not s.dirty
        assert s.uncommitted
        s.commit()
        assert not s.uncommitted
        s.mknod(layer, ROOT_INO, b"f", stat.S_IFREG | 0o644)
        assert s.dirty
        assert s.uncommitted
    with Store.open(image) as s:
        assert s.node_target(node) == (layer, ROOT_INO)


def test_device_locked_while_open(image):
    with Store.open(image):
        with pytest.raises(errors.DeviceBusy) as info:
            Store.open(image)
        assert str(os.getpid()) in str(info.value)


def test_mkfs_refuses_existing_store(image):
    with pytest.raises(errors.Exists):
        Store.mkfs(image)
    Store.mkfs(image, force=True)
    with Store.open(image) as s:
        assert s.list_layers() == []


def _fill_metadata(s, layer: int, directory: int) -> tuple[int, errors.NoSpace]:
    """Create files with long names and large xattrs until the store raises NoSpace."""
    count = 0
    while True:
        name = b"%08d" % count + b"y" * 200
        try:
            ino = s.mknod(layer, directory, name, stat.S_IFREG | 0o644).ino
            s.setxattr(layer, ino, b"user.pad", b"v" * 2000)
        except errors.NoSpace as error:
            return count, error
        count += 1
        if count % 500 == 0:
            s.commit()


def test_full_metadata_area_keeps_store_usable(store, image):
    # The image's metadata area is 16 MiB, which a few thousand such files fill.
    base = store.create_layer("base").number
    kept_ino = store.mknod(base, ROOT_INO, b"kept", stat.S_IFREG | 0o644).ino
    store.write(base, kept_ino, 0, b"hello")
    store.commit()
    layer = store.create_layer("rw", "base").number
    directory = store.mkdir(layer, ROOT_INO, b"d", 0o755).ino
    count, error = _fill_metadata(store, layer, directory)
    assert count > 1000
    assert "metadata area" in str(error)
    assert image in str(error)
    store.commit()
    assert store.read(base, kept_ino, 0, 5) == b"hello"
    store.unlink(layer, directory, b"%08d" % 0 + b"y" * 200)
    store.commit()
    store.remove_layer("rw")
    fresh = store.create_layer("fresh", "base").number
    store.mknod(fresh, ROOT_INO, b"new", stat.S_IFREG | 0o644)
    store.commit()
    assert [name for name, _ in store.readdir(fresh, ROOT_INO)] == [b"kept", b"new"]


def test_apply_diff_of_many_small_files_fits(tmp_path, monkeypatch):
    # Only the size of the open group, not the clock, may start a commit.
    monkeypatch.setenv("LCFS_APPLY_COMMIT_INTERVAL", "3600")
    image = str(tmp_path / "small.img")
    Store.mkfs(image, size=64 * MiB)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for index in range(6000):
            member = tarfile.TarInfo(f"f{index}")
            member.size = 100
            archive.addfile(member, io.BytesIO(b"x" * member.size))
    buffer.seek(0)
    with Store.open(image) as s:
        s.create_layer("L")
        assert s.apply_diff("L", buffer) == 6000 * 100
        number = s.get_layer("L").number
        assert len(s.readdir(number, ROOT_INO)) == 6000
        used, total = s.metadata_usage()
        assert used < total // 4
    assert fsck.main([image, "--no-progress", "--log-level", "WARNING"]) == 0


def _padded_tar(count: int) -> io.BytesIO:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for index in range(count):
            member = tarfile.TarInfo(f"d/{index:08d}" + "y" * 200)
            member.pax_headers = {"SCHILY.xattr.user.pad": "v" * 3000}
            archive.addfile(member, io.BytesIO(b""))
    buffer.seek(0)
    return buffer


def test_apply_diff_filling_metadata_rolls_back(store, image):
    store.create_layer("base")
    store.apply_diff("base", _padded_tar(1))
    layer = store.create_layer("big", "base").number
    store.commit()
    with pytest.raises(errors.NoSpace) as info:
        store.apply_diff("big", _padded_tar(6000))
    assert str(info.value).startswith("layer big: the metadata area")
    assert [name for name, _ in store.readdir(layer, ROOT_INO)] == [b"d"]
    store.remove_layer("big")
    store.create_layer("after", "base")
    store.commit()
    assert [layer.id for layer in store.list_layers()] == ["base", "after"]


@pytest.fixture
def small_file_system(tmp_path):
    """A 24 MiB tmpfs, unmounted after the test."""
    with tmpfs_at(tmp_path / "small", "24m") as mountpoint:
        yield mountpoint


def test_full_host_file_system_raises_nospace(small_file_system):
    # The image is sparse, so its data blocks come from the 24 MiB tmpfs.
    path = str(small_file_system / "store.img")
    Store.mkfs(path, size=64 * MiB)
    s = Store.open(path)
    try:
        layer = s.create_layer("base").number
        ino = s.mknod(layer, ROOT_INO, b"big", stat.S_IFREG | 0o644).ino
        s.commit()
        with pytest.raises(errors.NoSpace) as info:
            for index in range(40):
                s.write(layer, ino, index * MiB, b"x" * MiB)
        assert f"the file system under {path} is full" in str(info.value)
        assert s.getattr(layer, ino).size < 40 * MiB
    finally:
        # Closing commits, which may itself fail on the full tmpfs.
        try:
            s.close()
        except errors.StoreError:
            pass


def test_full_host_stops_metadata_growth_in_time(tmp_path):
    """Growing changes stop with NoSpace before the commit would need pages the host lacks."""
    with tmpfs_at(tmp_path / "host", "96m") as host:
        path = str(host / "store.img")
        # A metadata area larger than the pages kept allocated ahead of LMDB.
        Store.mkfs(path, size=1 << 30, metadata_size=128 * MiB)
        with Store.open(path) as s:
            layer = s.create_layer("base").number
            s.commit()
            with open(host / "filler", "wb") as filler:
                with pytest.raises(OSError) as full:
                    while True:
                        filler.write(bytes(MiB))
                        filler.flush()
            assert full.value.errno == errno.ENOSPC
            created = 0
            with pytest.raises(errors.NoSpace) as info:
                for index in range(100_000):
                    s.mknod(layer, ROOT_INO, b"f%06d" % index, stat.S_IFREG | 0o644)
                    created += 1
            assert f"the file system holding {path} is full" in str(info.value)
            assert created > 1000
            s.commit()
        with Store.open(path) as s:
            names = [name for name, _ in s.readdir(s.get_layer("base").number, ROOT_INO)]
            assert len(names) == created


def data_bytes_on_host(image: str, store) -> int:
    """Return how many bytes of the image file's data region the host file system has allocated."""
    total = 0
    with open(image, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        offset = store.data_offset
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            total += end - start
            offset = end
    return total


def test_freed_blocks_given_back_to_host(store, image):
    layer = store.create_layer("base").number
    payload = os.urandom(8 * MiB)
    big = store.mknod(layer, ROOT_INO, b"big", stat.S_IFREG | 0o644)
    store.write(layer, big.ino, 0, payload)
    keep = store.mknod(layer, ROOT_INO, b"keep", stat.S_IFREG | 0o644)
    store.write(layer, keep.ino, 0, b"k" * MiB)
    store.commit()
    before = data_bytes_on_host(image, store)
    assert before >= 9 * MiB
    store.unlink(layer, ROOT_INO, b"big")
    # Until the commit the blocks stay: the last committed state maps them.
    assert data_bytes_on_host(image, store) == before
    store.commit()
    assert data_bytes_on_host(image, store) <= before - 8 * MiB
    # The punched blocks are allocated again and hold new data.
    again = store.mknod(layer, ROOT_INO, b"again", stat.S_IFREG | 0o644)
    store.write(layer, again.ino, 0, payload)
    store.commit()
    assert store.read(layer, again.ino, 0, len(payload)) == payload
    assert store.read(layer, keep.ino, 0, MiB) == b"k" * MiB
