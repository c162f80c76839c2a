"""Sharing of unchanged files between layers (``--share-unchanged``).

With the setting on, a regular file that a layer inherits unchanged is
served through the node of the frozen layer that contains its record.
Every layer that reads it then shares one kernel inode and one copy of its
pages. A change
through a writable layer copies the file up into that layer first. These
tests run on a real mount and check both sides: what is shared, and that
every kind of change still lands in the writable layer alone.
"""

from __future__ import annotations

import errno
import os
import stat
import threading

import pytest
from fuse_fixtures import fuse_available, lcfs_image, mount_store  # noqa: F401

from lcfs.fuse.settings import FuseSettings
from lcfs.store import Store
from tools import fsck

pytestmark = pytest.mark.skipif(not fuse_available(), reason="needs root and /dev/fuse")

DATA = b"image contents\n" * 1000


@pytest.fixture
def shared(lcfs_image):
    with mount_store(lcfs_image, FuseSettings(share_unchanged=True)) as handle:
        yield handle


def write_file(path: str, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def freeze_base(mounted, *children: str) -> list[str]:
    """Create writable layers on top of ``base``, which freezes it."""
    paths = []
    for child in children:
        mounted.store.create_layer(child, "base")
        paths.append(mounted.at(child))
    mounted.store.commit()
    return paths


def reads_sent(mounted) -> int:
    return mounted.server.stats.snapshot().get("read", {}).get("requests", 0)


def test_unchanged_file_one_inode(shared):
    write_file(shared.at("base", "f"), DATA)
    first, second = freeze_base(shared, "c1", "c2")
    base_ino = os.stat(shared.at("base", "f")).st_ino
    assert os.stat(os.path.join(first, "f")).st_ino == base_ino
    assert os.stat(os.path.join(second, "f")).st_ino == base_ino
    listed = {entry.name: entry.inode() for entry in os.scandir(second)}
    assert listed["f"] == base_ino
    # Directories stay per layer: their entries differ between layers.
    assert os.stat(first).st_ino != os.stat(second).st_ino


def test_pages_shared_across_layers(shared):
    write_file(shared.at("base", "f"), DATA)
    first, second = freeze_base(shared, "c1", "c2")
    assert read_file(os.path.join(first, "f")) == DATA
    before = reads_sent(shared)
    assert read_file(os.path.join(second, "f")) == DATA
    assert read_file(shared.at("base", "f")) == DATA
    assert reads_sent(shared) == before


def test_pages_per_layer_by_default(lcfs_image):
    with mount_store(lcfs_image) as mounted:
        write_file(mounted.at("base", "f"), DATA)
        first, second = freeze_base(mounted, "c1", "c2")
        assert os.stat(os.path.join(first, "f")).st_ino != os.stat(
            os.path.join(second, "f")
        ).st_ino
        assert read_file(os.path.join(first, "f")) == DATA
        before = reads_sent(mounted)
        assert read_file(os.path.join(second, "f")) == DATA
        assert reads_sent(mounted) > before


def test_write_copies_up_one_layer(shared):
    write_file(shared.at("base", "f"), DATA)
    first, second = freeze_base(shared, "c1", "c2")
    shared_ino = os.stat(os.path.join(first, "f")).st_ino
    assert read_file(os.path.join(first, "f")) == DATA
    with open(os.path.join(first, "f"), "r+b") as f:
        f.write(b"CHANGED")
    changed = b"CHANGED" + DATA[7:]
    assert read_file(os.path.join(first, "f")) == changed
    assert os.stat(os.path.join(first, "f")).st_ino != shared_ino
    assert read_file(os.path.join(second, "f")) == DATA
    assert read_file(shared.at("base", "f")) == DATA
    assert os.stat(os.path.join(second, "f")).st_ino == shared_ino
    # Later opens for writing go straight to the layer's own copy.
    with open(os.path.join(first, "f"), "ab") as f:
        f.write(b"more")
    assert read_file(os.path.join(first, "f")) == changed + b"more"
    assert [path for path, _ in shared.store.changes("c1")] == ["/f"]


def test_truncating_open_copies_up(shared):
    write_file(shared.at("base", "f"), DATA)
    (child,) = freeze_base(shared, "c1")
    write_file(os.path.join(child, "f"), b"new")
    assert read_file(os.path.join(child, "f")) == b"new"
    assert read_file(shared.at("base", "f")) == DATA


@pytest.mark.parametrize(
    "change, check",
    [
        (lambda p: os.chmod(p, 0o600), lambda st, p: stat.S_IMODE(st.st_mode) == 0o600),
        (lambda p: os.chown(p, 1000, 1000), lambda st, p: (st.st_uid, st.st_gid) == (1000, 1000)),
        (lambda p: os.utime(p, ns=(1, 2)), lambda st, p: st.st_mtime_ns == 2),
        (lambda p: os.truncate(p, 10), lambda st, p: st.st_size == 10),
        (
            lambda p: os.setxattr(p, "user.k", b"v"),
            lambda st, p: os.getxattr(p, "user.k") == b"v",
        ),
        (
            lambda p: os.link(p, os.path.join(os.path.dirname(p), "g")),
            lambda st, p: st.st_nlink == 2,
        ),
    ],
    ids=["chmod", "chown", "utime", "truncate", "setxattr", "link"],
)
def test_metadata_change_by_path_copies_up(shared, change, check):
    write_file(shared.at("base", "f"), DATA)
    first, second = freeze_base(shared, "c1", "c2")
    path = os.path.join(first, "f")
    base_before = os.stat(shared.at("base", "f"))
    assert os.stat(path).st_ino == base_before.st_ino
    change(path)
    after = os.stat(path)
    assert check(after, path)
    assert after.st_ino != base_before.st_ino
    for other in (shared.at("base", "f"), os.path.join(second, "f")):
        st = os.stat(other)
        assert (st.st_mode, st.st_uid, st.st_size, st.st_mtime_ns, st.st_nlink) == (
            base_before.st_mode,
            base_before.st_uid,
            base_before.st_size,
            base_before.st_mtime_ns,
            base_before.st_nlink,
        )
        assert read_file(other) == DATA


def test_unlink_and_rename_stay_in_layer(shared):
    write_file(shared.at("base", "f"), DATA)
    write_file(shared.at("base", "g"), DATA)
    first, second = freeze_base(shared, "c1", "c2")
    for layer in (first, second):
        assert read_file(os.path.join(layer, "f")) == DATA
    os.unlink(os.path.join(first, "f"))
    os.rename(os.path.join(first, "g"), os.path.join(first, "h"))
    assert sorted(os.listdir(first)) == ["h"]
    assert read_file(os.path.join(first, "h")) == DATA
    for path in (os.path.join(second, "f"), shared.at("base", "f"), os.path.join(second, "g")):
        assert os.stat(path).st_nlink == 1
        assert read_file(path) == DATA
    os.link(os.path.join(second, "f"), os.path.join(second, "f2"))
    assert os.stat(os.path.join(second, "f2")).st_nlink == 2


def test_change_by_descriptor_needs_a_path(shared):
    write_file(shared.at("base", "f"), DATA)
    (child,) = freeze_base(shared, "c1")
    path = os.path.join(child, "f")
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(2):
            with pytest.raises(OSError) as caught:
                os.fchmod(fd, 0o600)
            assert caught.value.errno == errno.ESTALE
        os.chmod(path, 0o640)
    finally:
        os.close(fd)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert stat.S_IMODE(os.stat(shared.at("base", "f")).st_mode) == 0o644


def test_frozen_layer_rejects_changes(shared):
    write_file(shared.at("base", "f"), DATA)
    freeze_base(shared, "c1")
    path = shared.at("base", "f")
    for change in (
        lambda: os.open(path, os.O_WRONLY),
        lambda: os.chmod(path, 0o600),
        lambda: os.truncate(path, 0),
        lambda: os.setxattr(path, "user.k", b"v"),
        lambda: os.removexattr(path, "user.k"),
    ):
        with pytest.raises(OSError) as caught:
            change()
        assert caught.value.errno == errno.EROFS
    with pytest.raises(OSError) as caught:
        os.link(path, shared.at("c1", "g"))
    assert caught.value.errno == errno.EXDEV
    assert read_file(path) == DATA


def test_threads_each_copy_up(shared):
    names = [f"f{index}" for index in range(8)]
    for name in names:
        write_file(shared.at("base", name), DATA)
    (child,) = freeze_base(shared, "c1")
    for name in names:
        assert read_file(os.path.join(child, name)) == DATA
    failures = []

    def change(name: str) -> None:
        try:
            for _ in range(5):
                with open(os.path.join(child, name), "ab") as f:
                    f.write(name.encode())
        except OSError as exc:
            failures.append(exc)

    threads = [threading.Thread(target=change, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    for name in names:
        assert read_file(os.path.join(child, name)) == DATA + name.encode() * 5
        assert read_file(shared.at("base", name)) == DATA


def test_executables_and_links_stay_private(shared):
    write_file(shared.at("base", "tool"), b"#!/bin/sh\necho hi\n", 0o755)
    write_file(shared.at("base", "a"), DATA)
    os.link(shared.at("base", "a"), shared.at("base", "b"))
    (child,) = freeze_base(shared, "c1")
    for name in ("tool", "a", "b"):
        assert os.stat(os.path.join(child, name)).st_ino != os.stat(
            shared.at("base", name)
        ).st_ino
    assert os.stat(os.path.join(child, "a")).st_ino == os.stat(
        os.path.join(child, "b")
    ).st_ino


def test_deep_layers_share_owner_node(shared):
    write_file(shared.at("base", "f"), DATA)
    shared.store.create_layer("middle", "base")
    shared.store.create_layer("top", "middle")
    shared.store.commit()
    base_ino = os.stat(shared.at("base", "f")).st_ino
    assert os.stat(shared.at("middle", "f")).st_ino == base_ino
    assert os.stat(shared.at("top", "f")).st_ino == base_ino
    with open(shared.at("top", "f"), "ab") as f:
        f.write(b"x")
    assert read_file(shared.at("top", "f")) == DATA + b"x"
    assert read_file(shared.at("middle", "f")) == DATA


def change_two_shared_files(mounted) -> str:
    """Append to ``f`` and chmod ``g`` through layer ``c1``; return c1's path."""
    write_file(mounted.at("base", "f"), DATA)
    write_file(mounted.at("base", "g"), DATA)
    (child,) = freeze_base(mounted, "c1")
    with open(os.path.join(child, "f"), "ab") as f:
        f.write(b"x")
    os.chmod(os.path.join(child, "g"), 0o600)
    return child


def test_sharing_survives_a_remount(shared):
    change_two_shared_files(shared)
    shared.reopen()
    assert read_file(shared.at("c1", "f")) == DATA + b"x"
    assert read_file(shared.at("base", "f")) == DATA
    assert os.stat(shared.at("c1", "f")).st_ino != os.stat(shared.at("base", "f")).st_ino
    assert stat.S_IMODE(os.stat(shared.at("c1", "g")).st_mode) == 0o600


def test_copy_ups_pass_fsck(shared):
    child = change_two_shared_files(shared)
    os.link(os.path.join(child, "g"), os.path.join(child, "h"))
    shared.server.stop()
    shared.store.close()
    assert fsck.main([shared.image, "--no-progress", "--log-level", "WARNING"]) == 0
    shared.store = Store.open(shared.image)


def test_early_reader_keeps_shared_copy(shared):
    # The cost of sharing: a read-only descriptor opened before the layer's
    # first change stays on the shared inode. Without the setting it reads
    # the change (test_reader_sees_write_after_copy_up).
    write_file(shared.at("base", "f"), DATA)
    (child,) = freeze_base(shared, "c1")
    path = os.path.join(child, "f")
    reader = os.open(path, os.O_RDONLY)
    try:
        with open(path, "r+b") as f:
            f.write(b"CHANGED")
        assert os.pread(reader, 7, 0) == DATA[:7]
    finally:
        os.close(reader)
    assert read_file(path)[:7] == b"CHANGED"
