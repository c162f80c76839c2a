"""FUSE frontend tests against real mounts of a real store.

Every test mounts a fresh store (see fuse_fixtures.py) and uses plain system
calls on the mount, so the kernel's FUSE client, pyfuse3 and the store all
take part.

This process serves the mount, so it must never touch memory mapped from
the mount: the page fault blocks while holding the GIL, and the FUSE thread
that would serve the fault can then never run. Such access runs in a subprocess.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest
import trio
from fuse_fixtures import fuse_available, lcfs_image, mount_store, mounted  # noqa: F401

from lcfs.fuse import FuseServer, find_mount, operations
from lcfs.fuse.settings import FuseSettings
from lcfs.store import ROOT_INO, errors

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(not fuse_available(), reason="FUSE mounts need root and /dev/fuse"),
]

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4
UTIME_OMIT = (1 << 30) - 2
NOBODY = 65534
BUSYBOX = "/bin/busybox"
# A version 2 file capability (struct vfs_cap_data) granting CAP_NET_RAW.
CAPABILITY_VALUE = (0x02000000).to_bytes(4, "little") + (1 << 13).to_bytes(4, "little") + bytes(12)


class Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def renameat2(old: str, new: str, flags: int) -> None:
    result = _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags)
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), old)


def set_mtime_only(path: str, mtime_ns: int) -> None:
    times = (Timespec * 2)(
        Timespec(0, UTIME_OMIT), Timespec(mtime_ns // 10**9, mtime_ns % 10**9)
    )
    if _libc.utimensat(AT_FDCWD, os.fsencode(path), times, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)


def write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def expect_errno(expected: int, func, *args, **kwargs) -> None:
    with pytest.raises(OSError) as info:
        func(*args, **kwargs)
    assert info.value.errno == expected, (
        f"{func.__name__}{args} failed with {errno.errorcode.get(info.value.errno)}, "
        f"expected {errno.errorcode[expected]}"
    )


def run_as_nobody(script: str, path: str) -> None:
    subprocess.run(["/bin/sh", "-c", script, "sh", path], user=NOBODY, check=True)


def make_child(mounted, parent: str = "base", child: str = "child") -> str:
    """Create a layer ``child`` on top of ``parent``, freezing the parent."""
    mounted.store.create_layer(child, parent)
    mounted.store.commit()
    return mounted.at(child)


# -- mount and root ---------------------------------------------------------------


def test_mount_options_in_mountinfo(mounted):
    with open("/proc/self/mountinfo") as f:
        lines = [line.split() for line in f if line.split()[4] == mounted.path]
    assert len(lines) == 1
    fields = lines[0]
    mount_options = fields[5].split(",")
    separator = fields.index("-")
    fstype, source, super_options = fields[separator + 1 : separator + 4]
    assert fstype == "fuse.lcfs"
    assert source == "lcfs"
    assert "nosuid" not in mount_options
    assert "nodev" not in mount_options
    assert "noatime" in mount_options
    assert "allow_other" in super_options.split(",")
    assert "default_permissions" in super_options.split(",")


def test_root_lists_layers(mounted):
    assert os.listdir(mounted.path) == ["base"]
    mounted.store.create_layer("second")
    assert sorted(os.listdir(mounted.path)) == ["base", "second"]
    assert stat.S_ISDIR(os.stat(mounted.at("second")).st_mode)
    write_file(mounted.at("second", "f"), b"x")

    mounted.store.remove_layer("second")
    mounted.server.notify_layer_removed("second")
    assert os.listdir(mounted.path) == ["base"]
    expect_errno(errno.ENOENT, os.stat, mounted.at("second"))
    expect_errno(errno.ENOENT, os.stat, mounted.at("second", "f"))


def test_root_listing_after_unlisted_changes(mounted):
    # Layers that come and go while no process lists the root, then a listing,
    # then more changes: every listing shows the layers of that moment.
    mounted.store.create_layer("one")
    mounted.store.create_layer("two")
    assert sorted(os.listdir(mounted.path)) == ["base", "one", "two"]
    mounted.store.create_layer("three")
    assert sorted(os.listdir(mounted.path)) == ["base", "one", "three", "two"]
    mounted.store.remove_layer("one")
    mounted.server.notify_layer_removed("one")
    assert sorted(os.listdir(mounted.path)) == ["base", "three", "two"]
    mounted.store.remove_layer("two")
    mounted.server.notify_layer_removed("two")
    assert sorted(os.listdir(mounted.path)) == ["base", "three"]


def test_layer_create_waits_for_no_entry_notice(mounted):
    """A layer created while a removal's entry notice waits for a root lookup is not held up.

    The entry notice waits for the lookup, and the lookup waits for the
    store lock that the creating thread holds while it drops the root's
    listing. Before the listing notices had a thread of their own, the
    create waited behind the entry notice until INVALIDATE_WAIT ran out.
    """
    mounted.store.create_layer("gone")
    mounted.store.commit()
    os.listdir(mounted.path)  # the kernel caches the listing from now on
    store = mounted.store
    with store.lock:
        lookup = threading.Thread(target=os.path.exists, args=(mounted.at("unknown"),))
        lookup.start()
        time.sleep(0.3)  # the lookup is in flight, waiting for the store lock
        notice = threading.Thread(
            target=mounted.server.notify_layer_removed, args=("gone",)
        )
        notice.start()
        time.sleep(0.3)  # the entry notice waits for the lookup
        started = time.monotonic()
        store.create_layer("new")
        elapsed = time.monotonic() - started
    lookup.join(10)
    notice.join(10)
    assert elapsed < 1.0
    assert not lookup.is_alive()
    assert not notice.is_alive()
    assert "new" in os.listdir(mounted.path)


def test_withdrawn_request_leaves_process_running(mounted, monkeypatch):
    """A request withdrawn between poll and read does not stall the daemon.

    A process killed while its request waits in the kernel's queue takes
    the request back, though poll(2) has reported it. The plain loop's read
    of the FUSE device then blocked while it held the GIL, so no other
    thread of the daemon ran until the next request arrived.
    """
    if mounted.server.request_loop != "plain":
        pytest.skip("only the plain request loop polls before it reads")
    polled = threading.Event()
    resume = threading.Event()
    armed = threading.Event()
    patched = threading.Event()
    original = FuseServer._wait_for_request

    def wait_then_pause(poller, wait_ms):
        patched.set()
        ready = original(poller, wait_ms)
        if ready and armed.is_set():
            armed.clear()
            polled.set()
            resume.wait(10)
        return ready

    monkeypatch.setattr(FuseServer, "_wait_for_request", staticmethod(wait_then_pause))
    # The loop calls the patched wait from its next round on, at the latest
    # after its commit interval.
    assert patched.wait(10)
    armed.set()
    lookup = subprocess.Popen(["stat", mounted.at("base", "missing")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert polled.wait(10)
    lookup.send_signal(signal.SIGKILL)
    lookup.wait(10)
    # A request 5 s from now unblocks a read that waits for one.
    rescue = subprocess.Popen(["sh", "-c", f"sleep 5; stat {mounted.path}"],
                              stdout=subprocess.DEVNULL)
    try:
        started = time.monotonic()
        resume.set()
        time.sleep(0.5)  # gives the FUSE thread the GIL, then takes it back
        elapsed = time.monotonic() - started
    finally:
        rescue.wait(10)
    assert elapsed < 3.0
    assert os.listdir(mounted.at("base")) == []


def test_removed_layers_leave_no_node_state(mounted):
    """Layers that come and go, as containers' do, leave no node state behind."""
    os.makedirs(mounted.at("base", "etc"))
    write_file(mounted.at("base", "etc", "passwd"), b"root:x:0:0::/root:/bin/sh\n")
    mounted.store.create_layer("image", "base")
    operations = mounted.server.operations
    for index in range(20):
        layer = f"container{index}"
        mounted.store.create_layer(layer, "image")
        write_file(mounted.at(layer, "etc", "hostname"), b"c\n")
        for name in ("passwd", "group", "hostname"):
            with contextlib.suppress(FileNotFoundError):
                os.stat(mounted.at(layer, "etc", name))
        mounted.store.remove_layer(layer)
        mounted.server.notify_layer_removed(layer)
    remaining = {mounted.store.get_layer(name).number for name in ("base", "image")}
    # Lookups gave 4 or 5 inodes of each container layer a node id, and
    # removing the layer deletes them.
    assert {layer for layer, _ in mounted.store._nodes.values()} <= remaining
    # The kernel drops a removed layer's entry and later sends FORGET for
    # its nodes, after which the handlers keep nothing of them either.
    deadline = time.monotonic() + 10
    while len(operations.lookup_counts) > 10 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(operations.lookup_counts) <= 10, operations.lookup_counts
    assert len(operations._attrs) <= 10


def test_listing_racing_layer_removal(mounted, monkeypatch):
    """A listing that a layer's removal cuts short leaves no node state behind.

    The removal runs between two entries of the listing. The kernel must
    get the entries whose nodes the handlers counted, or it never sends
    FORGET for them.
    """
    mounted.store.create_layer("gone", "base")
    gone = mounted.store.get_layer("gone").number
    os.makedirs(mounted.at("gone", "d"))
    for name in ("f1", "f2", "f3"):
        write_file(mounted.at("gone", "d", name), b"x")
    d = mounted.store.lookup(gone, ROOT_INO, b"d").ino
    files = {mounted.store.lookup(gone, d, name).ino for name in (b"f1", b"f2", b"f3")}
    operations = mounted.server.operations
    original = mounted.store.node_id
    given = []

    def remove_after_first_entry(layer, ino):
        if layer == gone and ino in files and given:
            mounted.store.remove_layer("gone")
        node = original(layer, ino)
        if layer == gone and ino in files:
            given.append(node)
        return node

    monkeypatch.setattr(mounted.store, "node_id", remove_after_first_entry)
    with contextlib.suppress(FileNotFoundError):
        os.listdir(mounted.at("gone", "d"))
    monkeypatch.undo()
    assert len(given) == 1
    mounted.server.notify_layer_removed("gone")
    deadline = time.monotonic() + 10
    while given[0] in operations.lookup_counts and time.monotonic() < deadline:
        time.sleep(0.1)
    assert given[0] not in operations.lookup_counts


def test_root_is_read_only(mounted):
    root = mounted.path
    expect_errno(errno.EROFS, os.mkdir, os.path.join(root, "new"))
    expect_errno(errno.EROFS, os.open, os.path.join(root, "new"), os.O_CREAT | os.O_WRONLY)
    expect_errno(errno.EROFS, os.symlink, "base", os.path.join(root, "link"))
    expect_errno(errno.EROFS, os.rmdir, mounted.at("base"))
    expect_errno(errno.EROFS, os.rename, mounted.at("base"), os.path.join(root, "moved"))
    expect_errno(errno.EROFS, os.chmod, root, 0o700)
    expect_errno(errno.EROFS, os.setxattr, root, "user.x", b"1")
    assert os.listxattr(root) == []
    assert os.stat(root).st_ino == 1


def test_missing_layer_and_names(mounted):
    expect_errno(errno.ENOENT, os.stat, mounted.at("no-such-layer"))
    expect_errno(errno.ENOENT, os.stat, mounted.at("base", "missing"))
    expect_errno(errno.ENOENT, os.open, mounted.at("base", "missing"), os.O_RDONLY)
    write_file(mounted.at("base", "file"), b"")
    expect_errno(errno.ENOTDIR, os.stat, mounted.at("base", "file", "below"))
    expect_errno(errno.ENAMETOOLONG, os.open, mounted.at("base", "n" * 256),
                 os.O_CREAT | os.O_WRONLY)  # fmt: skip
    write_file(mounted.at("base", "n" * 255), b"ok")
    assert read_file(mounted.at("base", "n" * 255)) == b"ok"


def test_node_ids_unique_across_layers(mounted):
    write_file(mounted.at("base", "f"), b"data")
    child = make_child(mounted)
    base_stat = os.stat(mounted.at("base", "f"))
    child_stat = os.stat(os.path.join(child, "f"))
    assert base_stat.st_ino != child_stat.st_ino
    assert os.stat(mounted.at("base")).st_ino != os.stat(child).st_ino
    assert base_stat.st_dev == child_stat.st_dev
    listed = {entry.name: entry.inode() for entry in os.scandir(child)}
    assert listed["f"] == child_stat.st_ino


# -- files ----------------------------------------------------------------------


def test_create_write_read(mounted):
    path = mounted.at("base", "file")
    data = os.urandom(3 * 1024 * 1024 + 17)
    write_file(path, data)
    st = os.stat(path)
    assert stat.S_ISREG(st.st_mode)
    assert st.st_size == len(data)
    assert st.st_blocks >= len(data) // 512
    assert hashlib.sha256(read_file(path)).digest() == hashlib.sha256(data).digest()
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(fd, 10, 1024 * 1024) == data[1024 * 1024 : 1024 * 1024 + 10]
        assert os.pread(fd, 100, len(data) - 5) == data[-5:]
        assert os.pread(fd, 100, len(data) + 100) == b""
    finally:
        os.close(fd)


def test_create_exclusive_and_modes(mounted):
    path = mounted.at("base", "file")
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
    os.close(fd)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640 & ~_current_umask()
    expect_errno(errno.EEXIST, os.open, path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_append_and_o_trunc(mounted):
    path = mounted.at("base", "file")
    write_file(path, b"hello")
    with open(path, "ab") as f:
        f.write(b" world")
    assert read_file(path) == b"hello world"
    with open(path, "r+b") as f:
        f.seek(0, os.SEEK_END)
        f.write(b"!")
    assert read_file(path) == b"hello world!"
    write_file(path, b"new")
    assert read_file(path) == b"new"


@pytest.mark.parametrize("truncate", ["open", "ftruncate", "truncate"])
def test_truncate_to_same_size_sets_mtime(mounted, truncate):
    # ext4 and tmpfs set mtime and ctime at every truncate, and POSIX
    # requires it of an open with O_TRUNC. "> stamp" in a shell touches
    # an empty stamp file that way.
    path = mounted.at("base", "stamp")
    size = 0 if truncate == "open" else 3
    write_file(path, bytes(size))
    os.utime(path, ns=(1_000_000_000, 2_000_000_000))
    before = os.stat(path)
    if truncate == "open":
        os.close(os.open(path, os.O_WRONLY | os.O_TRUNC))
    elif truncate == "ftruncate":
        fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
    else:
        os.truncate(path, size)
    after = os.stat(path)
    assert after.st_size == size
    assert after.st_mtime_ns > before.st_mtime_ns
    assert after.st_ctime_ns > before.st_ctime_ns


def test_truncate_setattr_matches_o_trunc(mounted):
    # With opens skipped, the kernel sends truncate(2) and an open with
    # O_TRUNC as the same SETATTR: a size with no time and no file handle.
    # lcfs cannot tell them apart, so it sets mtime for both, as ext4 does.
    operations = mounted.server.operations
    if not operations.skip_opens:
        pytest.skip("the kernel sends an open with O_TRUNC as OPEN here")
    requests = []
    served = operations.setattr

    async def record(inode, attr, fields, fh, ctx):
        updated = [name for name in dir(fields)
                   if name.startswith("update_") and getattr(fields, name)]  # fmt: skip
        requests.append((updated, fh, attr.st_size))
        return await served(inode, attr, fields, fh, ctx)

    path = mounted.at("base", "empty")
    write_file(path, b"")
    operations.setattr = record
    try:
        os.truncate(path, 0)
        os.close(os.open(path, os.O_WRONLY | os.O_TRUNC))
    finally:
        del operations.setattr
    assert len(requests) == 2
    assert requests[0] == (["update_size"], None, 0)
    assert requests[1] == requests[0]


def test_truncate_shrink_and_grow(mounted):
    path = mounted.at("base", "file")
    write_file(path, b"0123456789" * 1000)
    os.truncate(path, 3)
    assert read_file(path) == b"012"
    os.truncate(path, 8200)
    data = read_file(path)
    assert len(data) == 8200
    assert data[:3] == b"012"
    assert data[3:] == bytes(8197)
    expect_errno(errno.EISDIR, os.truncate, mounted.at("base"), 0)


def test_sparse_file(mounted):
    path = mounted.at("base", "sparse")
    free_before = os.statvfs(mounted.path).f_bfree
    with open(path, "wb") as f:
        f.truncate(1 << 30)
    st = os.stat(path)
    assert st.st_size == 1 << 30
    assert st.st_blocks == 0
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, b"x", 512 << 20)
        assert os.pread(fd, 4096, 100 << 20) == bytes(4096)
        assert os.pread(fd, 3, (512 << 20) - 1) == b"\0x\0"
    finally:
        os.close(fd)
    assert os.stat(path).st_blocks == 8
    assert free_before - os.statvfs(mounted.path).f_bfree <= 2


def test_mmap_shared_read_and_write(mounted):
    # The mapping lives in another process (see the module docstring).
    path = mounted.at("base", "mapped")
    write_file(path, b"a" * 8192)
    script = (
        "import mmap, sys\n"
        "with open(sys.argv[1], 'r+b') as f:\n"
        "    with mmap.mmap(f.fileno(), 8192, mmap.MAP_SHARED) as mapped:\n"
        "        assert mapped[:4] == b'aaaa', mapped[:4]\n"
        "        mapped[4096:4100] = b'bbbb'\n"
        "        mapped.flush()\n"
    )
    subprocess.run([sys.executable, "-c", script, path], check=True, timeout=60)
    data = read_file(path)
    assert data[4096:4100] == b"bbbb"
    assert data[:4096] == b"a" * 4096


@pytest.mark.skipif(not os.path.exists(BUSYBOX), reason=f"{BUSYBOX} is missing")
def test_exec_binary_from_layer(mounted):
    path = mounted.at("base", "busybox")
    with open(BUSYBOX, "rb") as source:
        write_file(path, source.read())
    os.chmod(path, 0o755)
    make_child(mounted)
    result = subprocess.run([mounted.at("child", "busybox"), "echo", "ran"],
                            capture_output=True, check=True)  # fmt: skip
    assert result.stdout == b"ran\n"


def test_unlink(mounted):
    path = mounted.at("base", "file")
    write_file(path, b"x")
    os.unlink(path)
    expect_errno(errno.ENOENT, os.stat, path)
    expect_errno(errno.ENOENT, os.unlink, path)
    os.mkdir(mounted.at("base", "dir"))
    expect_errno(errno.EISDIR, os.unlink, mounted.at("base", "dir"))


def test_names_over_255_bytes_too_long(mounted):
    # The kernel's FUSE client sends lookups of names up to 1024 bytes long.
    directory = os.fsencode(mounted.at("base"))
    longest = directory + b"/" + b"n" * 255
    write_file(longest, b"x")
    assert os.lstat(longest).st_size == 1
    for length in (256, 600, 1024):
        path = directory + b"/" + b"n" * length
        expect_errno(errno.ENAMETOOLONG, os.lstat, path)
        expect_errno(errno.ENAMETOOLONG, os.open, path, os.O_CREAT | os.O_WRONLY, 0o644)
        expect_errno(errno.ENAMETOOLONG, os.mkdir, path)
        expect_errno(errno.ENAMETOOLONG, os.rename, longest, path)


def free_blocks_after_forget(mounted, expected: int) -> int:
    """Return the mount's free blocks once they reach ``expected``, or after 5 s.

    The kernel sends FORGET for an unlinked file's node a moment after
    its last reference goes, and the daemon frees the file then.
    """
    deadline = time.monotonic() + 5
    free = os.statvfs(mounted.path).f_bfree
    while free < expected and time.monotonic() < deadline:
        time.sleep(0.01)
        free = os.statvfs(mounted.path).f_bfree
    return free


def test_unlinked_open_file_stays_readable(mounted):
    path = mounted.at("base", "file")
    data = os.urandom(100_000)
    write_file(path, data)
    free_with_file = os.statvfs(mounted.path).f_bfree
    fd = os.open(path, os.O_RDWR)
    try:
        os.unlink(path)
        expect_errno(errno.ENOENT, os.stat, path)
        assert os.fstat(fd).st_nlink == 0
        assert os.pread(fd, len(data), 0) == data
        os.pwrite(fd, b"more", len(data))
        assert os.pread(fd, 4, len(data)) == b"more"
    finally:
        os.close(fd)
    assert free_blocks_after_forget(mounted, free_with_file + 1) > free_with_file
    assert not mounted.server.operations._pinned


@pytest.mark.parametrize("kind", ["fifo", "device", "symlink"])
def test_unlinked_open_special_file_stats(mounted, kind):
    # ext4 and tmpfs keep an inode while a descriptor refers to it, so
    # fstat and fchmod of an open fifo or device node work after its unlink.
    path = mounted.at("base", kind)
    if kind == "fifo":
        os.mkfifo(path, 0o644)
        flags = os.O_RDWR
    elif kind == "device":
        os.mknod(path, stat.S_IFCHR | 0o644, os.makedev(1, 3))
        flags = os.O_RDWR
    else:
        os.symlink("target", path)
        flags = os.O_PATH | os.O_NOFOLLOW
    mode = os.lstat(path).st_mode
    layer = mounted.store.get_layer("base").number
    ino = mounted.store.lookup(layer, ROOT_INO, kind.encode()).ino

    fd = os.open(path, flags)
    try:
        os.unlink(path)
        st = os.fstat(fd)
        assert st.st_mode == mode
        assert st.st_nlink == 0
        if kind != "symlink":  # an O_PATH descriptor cannot be changed
            os.fchmod(fd, 0o600)
            assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o600
    finally:
        os.close(fd)

    # The kernel sends FORGET for the node a moment after the last
    # descriptor is closed, and the store then frees the inode.
    deadline = time.monotonic() + 5
    while mounted.server.operations._pinned and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not mounted.server.operations._pinned
    with pytest.raises(errors.NotFound):
        mounted.store.getattr(layer, ino)


def test_open_with_trunc_empties_cached_file(mounted):
    path = mounted.at("base", "file")
    write_file(path, b"0123456789" * 1000)
    assert read_file(path) == b"0123456789" * 1000  # now in the page cache
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        assert os.fstat(fd).st_size == 0
        os.write(fd, b"ab")
    finally:
        os.close(fd)
    assert read_file(path) == b"ab"
    layer = mounted.store.get_layer("base").number
    ino = mounted.store.lookup(layer, ROOT_INO, b"file").ino
    assert mounted.store.getattr(layer, ino).size == 2


def test_reader_sees_later_write(mounted):
    path = mounted.at("base", "file")
    write_file(path, b"a" * 10000)
    reader = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(reader, 10000, 0) == b"a" * 10000
        writer = os.open(path, os.O_WRONLY)
        os.pwrite(writer, b"b" * 100, 50)
        os.close(writer)
        assert os.pread(reader, 10000, 0) == b"a" * 50 + b"b" * 100 + b"a" * 9850
        with open(path, "r+b") as f:
            f.seek(9000)
            f.write(b"c" * 10)
        assert os.pread(reader, 10, 9000) == b"c" * 10
    finally:
        os.close(reader)


def test_reader_sees_write_after_copy_up(mounted):
    write_file(mounted.at("base", "file"), b"a" * 10000)
    child = make_child(mounted)
    path = os.path.join(child, "file")
    reader = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(reader, 10, 0) == b"a" * 10
        writer = os.open(path, os.O_WRONLY)
        os.pwrite(writer, b"b" * 10, 0)
        os.close(writer)
        assert os.pread(reader, 10, 0) == b"b" * 10
    finally:
        os.close(reader)
    assert read_file(mounted.at("base", "file")) == b"a" * 10000


def test_one_byte_write_into_inherited_file(mounted):
    size = 8 << 20
    data = bytearray(os.urandom(size))
    write_file(mounted.at("base", "big"), data)
    child = make_child(mounted)
    free_before = os.statvfs(mounted.path).f_bfree
    offset = (5 << 20) + 123
    fd = os.open(os.path.join(child, "big"), os.O_WRONLY)
    try:
        os.pwrite(fd, b"Z", offset)
    finally:
        os.close(fd)
    data_before = bytes(data)
    data[offset] = ord("Z")
    assert read_file(os.path.join(child, "big")) == bytes(data)
    assert read_file(mounted.at("base", "big")) == data_before
    assert os.stat(os.path.join(child, "big")).st_size == size
    assert free_before - os.statvfs(mounted.path).f_bfree <= 2


def test_statfs_reports_device_space(mounted):
    usage = mounted.store.statfs()
    before = os.statvfs(mounted.path)
    assert before.f_bsize == usage.block_size
    assert before.f_frsize == usage.block_size
    assert before.f_blocks == usage.total_blocks
    assert before.f_namemax == 255
    write_file(mounted.at("base", "four-mib"), os.urandom(4 << 20))
    after = os.statvfs(mounted.path)
    assert before.f_bfree - after.f_bfree >= 1024
    assert after.f_bavail == after.f_bfree
    os.unlink(mounted.at("base", "four-mib"))
    assert free_blocks_after_forget(mounted, before.f_bfree - 2) >= before.f_bfree - 2


def test_statfs_inode_counts_positive(mounted):
    # struct statfs carries f_files and f_ffree as signed longs on x86_64,
    # and Python's os.statvfs reads them as such.
    write_file(mounted.at("base", "file"), b"")
    usage = os.statvfs(mounted.path)
    assert usage.f_files > 0
    assert usage.f_ffree > 0
    assert usage.f_ffree < usage.f_files
    assert usage.f_favail == usage.f_ffree


def test_data_persists_after_remount(mounted):
    data = os.urandom(200_000)
    os.mkdir(mounted.at("base", "dir"))
    write_file(mounted.at("base", "dir", "file"), data)
    os.symlink("dir/file", mounted.at("base", "link"))
    os.setxattr(mounted.at("base", "dir", "file"), "user.tag", b"kept")
    ino = os.stat(mounted.at("base", "dir", "file")).st_ino
    mounted.reopen()
    assert read_file(mounted.at("base", "dir", "file")) == data
    assert os.readlink(mounted.at("base", "link")) == "dir/file"
    assert os.getxattr(mounted.at("base", "dir", "file"), "user.tag") == b"kept"
    assert os.stat(mounted.at("base", "dir", "file")).st_ino == ino


def test_fsync_commits_at_once(mounted):
    path = mounted.at("base", "file")
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"durable")
        os.fsync(fd)
        assert not mounted.store.dirty
    finally:
        os.close(fd)


def test_lookups_leave_nothing_for_put(mounted):
    # The node ids a walk allocates are committed by the group commit, but
    # do not count as changes that a Put must make durable.
    write_file(mounted.at("base", "file"), b"data")
    mounted.store.create_layer("walked", "base")
    mounted.store.commit()
    assert os.stat(mounted.at("walked", "file")).st_size == 4
    assert not mounted.store.dirty
    deadline = time.monotonic() + 5
    while mounted.store.uncommitted and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not mounted.store.uncommitted


def test_group_commit_runs_in_background(mounted):
    write_file(mounted.at("base", "file"), b"data")
    deadline = time.monotonic() + 5
    while mounted.store.dirty and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not mounted.store.dirty


# -- attributes -------------------------------------------------------------------


def test_chmod_changes_only_ctime(mounted):
    path = mounted.at("base", "file")
    write_file(path, b"x")
    os.utime(path, ns=(1_000_000_000, 2_000_000_000))
    before = os.stat(path)
    time.sleep(0.01)
    os.chmod(path, 0o600)
    after = os.stat(path)
    assert stat.S_IMODE(after.st_mode) == 0o600
    assert stat.S_ISREG(after.st_mode)
    assert after.st_mtime_ns == before.st_mtime_ns
    assert after.st_ctime_ns > before.st_ctime_ns


def test_chmod_inherited_file_keeps_mtimes(mounted):
    os.mkdir(mounted.at("base", "dir"))
    write_file(mounted.at("base", "dir", "file"), b"x")
    os.mknod(mounted.at("base", "dir", "null"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
    child = make_child(mounted)
    base_mode = os.stat(mounted.at("base", "dir", "file")).st_mode
    file_before = os.stat(os.path.join(child, "dir", "file"))
    dir_before = os.stat(os.path.join(child, "dir"))
    os.chmod(os.path.join(child, "dir", "file"), 0o600)
    os.chown(os.path.join(child, "dir", "null"), 7, 7)
    file_after = os.stat(os.path.join(child, "dir", "file"))
    assert stat.S_IMODE(file_after.st_mode) == 0o600
    assert file_after.st_mtime_ns == file_before.st_mtime_ns
    assert file_after.st_ctime_ns > file_before.st_ctime_ns
    assert os.stat(os.path.join(child, "dir")).st_mtime_ns == dir_before.st_mtime_ns
    null = os.stat(os.path.join(child, "dir", "null"))
    assert stat.S_ISCHR(null.st_mode)
    assert null.st_rdev == os.makedev(1, 3)
    assert (null.st_uid, null.st_gid) == (7, 7)
    assert os.stat(mounted.at("base", "dir", "file")).st_mode == base_mode


def test_chown(mounted):
    path = mounted.at("base", "file")
    write_file(path, b"x")
    os.chown(path, 1234, 5678)
    st = os.stat(path)
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.chown(path, -1, 42)
    st = os.stat(path)
    assert (st.st_uid, st.st_gid) == (1234, 42)


def test_chown_without_ids_drops_setuid(mounted):
    # chown(2) with uid and gid -1 drops setuid, and setgid from a
    # group-executable file, as on ext4 and tmpfs, even for root.
    path = mounted.at("base", "tool")
    write_file(path, b"x")
    os.chmod(path, 0o6755)
    before = os.stat(path).st_ctime_ns
    os.chown(path, -1, -1)
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o755
    assert st.st_ctime_ns > before
    # setgid on a file that its group may not execute marks mandatory
    # locking, and chown keeps it.
    locking = mounted.at("base", "locking")
    write_file(locking, b"x")
    os.chmod(locking, 0o2745)
    os.chown(locking, -1, -1)
    assert stat.S_IMODE(os.stat(locking).st_mode) == 0o2745
    directory = mounted.at("base", "dir")
    os.mkdir(directory)
    os.chmod(directory, 0o6755)
    os.chown(directory, -1, -1)
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o6755


def test_utimens_explicit_now_and_omit(mounted):
    path = mounted.at("base", "file")
    write_file(path, b"x")
    os.utime(path, ns=(1_111_000_000_123, 2_222_000_000_456))
    st = os.stat(path)
    assert st.st_atime_ns == 1_111_000_000_123
    assert st.st_mtime_ns == 2_222_000_000_456

    before_now = time.time_ns()
    os.utime(path)  # both times UTIME_NOW
    st = os.stat(path)
    assert st.st_atime_ns >= before_now - 10**9
    assert st.st_mtime_ns >= before_now - 10**9

    os.utime(path, ns=(5_000_000_000, 6_000_000_000))
    set_mtime_only(path, 7_000_000_000)
    st = os.stat(path)
    assert st.st_atime_ns == 5_000_000_000
    assert st.st_mtime_ns == 7_000_000_000


def test_setuid_bit_kept_and_cleared_by_write(mounted):
    scripts = (
        ("buffered", 'printf x 1<> "$1"'),
        ("write-only", 'printf x >> "$1"'),
        ("truncating", 'printf x > "$1"'),
    )
    for name, script in scripts:
        path = mounted.at("base", name)
        write_file(path, b"#!/bin/sh\n")
        os.chmod(path, 0o6777)
        mode = os.stat(path).st_mode
        assert mode & stat.S_ISUID, name
        assert mode & stat.S_ISGID, name
        run_as_nobody(script, path)
        mode = os.stat(path).st_mode
        assert not mode & stat.S_ISUID, f"{name} write by an unprivileged user kept setuid"
        assert not mode & stat.S_ISGID, f"{name} write by an unprivileged user kept setgid"
        assert stat.S_IMODE(mode) == 0o777, name


def test_setuid_bit_kept_on_root_write(mounted):
    path = mounted.at("base", "tool")
    write_file(path, b"x")
    os.chmod(path, 0o4755)
    with open(path, "ab") as f:
        f.write(b"y")
    assert os.stat(path).st_mode & stat.S_ISUID


def test_setgid_directory_inherits_group(mounted):
    parent = mounted.at("base", "shared")
    os.mkdir(parent)
    os.chown(parent, 0, 4321)
    os.chmod(parent, 0o2775)
    os.mkdir(os.path.join(parent, "sub"))
    write_file(os.path.join(parent, "file"), b"")
    sub = os.stat(os.path.join(parent, "sub"))
    assert sub.st_gid == 4321
    assert sub.st_mode & stat.S_ISGID
    assert os.stat(os.path.join(parent, "file")).st_gid == 4321


# -- directories ------------------------------------------------------------------


def test_mkdir_and_rmdir(mounted):
    base = mounted.at("base")
    nlink = os.stat(base).st_nlink
    os.mkdir(mounted.at("base", "dir"), 0o750)
    st = os.stat(mounted.at("base", "dir"))
    assert stat.S_ISDIR(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o750 & ~_current_umask()
    assert st.st_nlink == 2
    assert os.stat(base).st_nlink == nlink + 1
    expect_errno(errno.EEXIST, os.mkdir, mounted.at("base", "dir"))
    write_file(mounted.at("base", "dir", "f"), b"")
    expect_errno(errno.ENOTEMPTY, os.rmdir, mounted.at("base", "dir"))
    expect_errno(errno.ENOTDIR, os.rmdir, mounted.at("base", "dir", "f"))
    expect_errno(errno.ENOENT, os.rmdir, mounted.at("base", "missing"))
    os.unlink(mounted.at("base", "dir", "f"))
    os.rmdir(mounted.at("base", "dir"))
    assert os.stat(base).st_nlink == nlink
    expect_errno(errno.ENOENT, os.stat, mounted.at("base", "dir"))


@pytest.mark.parametrize("origin", ["own", "inherited"])
@pytest.mark.parametrize("removal", ["rmdir", "rename"])
def test_removed_directory_still_stats(mounted, origin, removal):
    # A process may hold a removed directory open or as its working
    # directory. On Linux file systems fstat of it shows no links, and
    # the removal set its ctime.
    layer = "base"
    os.mkdir(mounted.at("base", "gone"))
    os.mkdir(mounted.at("base", "other"))
    if origin == "inherited":
        make_child(mounted)
        layer = "child"
    path = mounted.at(layer, "gone")
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        before = os.fstat(fd).st_ctime_ns
        if removal == "rmdir":
            os.rmdir(path)
        else:
            os.rename(mounted.at(layer, "other"), path)
        st = os.fstat(fd)
        assert stat.S_ISDIR(st.st_mode)
        assert st.st_nlink == 0
        assert st.st_ctime_ns > before
        # glibc takes the kernel's ENOENT for a removed directory as its end.
        assert os.listdir(fd) == []
        # ext4 and tmpfs apply changes to it until the last descriptor closes.
        os.fchmod(fd, 0o700)
        os.fchown(fd, 1234, 5678)
        os.utime(fd, ns=(10**18, 2 * 10**18))
        st = os.fstat(fd)
        assert st.st_mode == stat.S_IFDIR | 0o700
        assert (st.st_uid, st.st_gid) == (1234, 5678)
        assert (st.st_atime_ns, st.st_mtime_ns) == (10**18, 2 * 10**18)
    finally:
        os.close(fd)
    if removal == "rmdir":
        expect_errno(errno.ENOENT, os.stat, path)


def test_directory_size_is_one_block(mounted):
    # ext4 reports directories in whole blocks and tmpfs a size that grows
    # with entries, so `test -s DIR` is true and `find -size 0` lists no
    # directory there. `find -size 0 -delete` would otherwise remove empty ones.
    os.makedirs(mounted.at("base", "full", "sub"))
    os.mkdir(mounted.at("base", "empty"))
    write_file(mounted.at("base", "full", "empty-file"), b"")
    for parts in [(), ("base",), ("base", "empty"), ("base", "full"), ("base", "full", "sub")]:
        st = os.stat(mounted.at(*parts))
        assert st.st_size == 4096, parts
    listed = subprocess.run(["find", mounted.at("base"), "-size", "0"], capture_output=True,
                            text=True, check=True).stdout.split()  # fmt: skip
    assert listed == [mounted.at("base", "full", "empty-file")]
    tested = subprocess.run(["sh", "-c", 'test -s "$1"', "sh", mounted.at("base", "empty")])
    assert tested.returncode == 0
    # A file keeps its own size: only directories report a block.
    assert os.stat(mounted.at("base", "full", "empty-file")).st_size == 0


@pytest.mark.parametrize("removal", ["rmdir", "rename"])
def test_removed_directory_xattrs_after_timeout(mounted, monkeypatch, removal):
    # The mount keeps a node's attributes for as long as the kernel trusts
    # them, 1 s on a writable layer. A zero timeout makes each xattr request
    # find them expired, as one that comes more than 1 s after the last
    # getattr does. On ext4 and tmpfs, flistxattr and fgetxattr of an open
    # removed directory return its xattrs.
    monkeypatch.setattr(operations, "WRITABLE_TIMEOUT", 0.0)
    # A name that the store contains, so that getxattr reads the store.
    write_file(mounted.at("base", "f"), b"")
    os.setxattr(mounted.at("base", "f"), "user.one", b"1")
    path = mounted.at("base", "gone")
    os.mkdir(path)
    os.mkdir(mounted.at("base", "other"))
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if removal == "rmdir":
            os.rmdir(path)
        else:
            os.rename(mounted.at("base", "other"), path)
        assert os.fstat(fd).st_nlink == 0
        assert os.listxattr(fd) == []
        expect_errno(errno.ENODATA, os.getxattr, fd, "user.one")
    finally:
        os.close(fd)


# statx(2) flags: AT_SYMLINK_NOFOLLOW, and AT_STATX_FORCE_SYNC, which makes
# a FUSE client send GETATTR even while its cached attributes are valid.
AT_SYMLINK_NOFOLLOW = 0x100
AT_STATX_FORCE_SYNC = 0x2000
STATX_BASIC_STATS = 0x7FF


def statx_force_sync(path: str) -> None:
    """Fetch the attributes of ``path`` from the file system, bypassing the kernel's cache."""
    buffer = ctypes.create_string_buffer(256)  # struct statx
    flags = AT_SYMLINK_NOFOLLOW | AT_STATX_FORCE_SYNC
    if _libc.statx(AT_FDCWD, os.fsencode(path), flags, STATX_BASIC_STATS, buffer) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)


@contextlib.contextmanager
def late_getattr(mounted, monkeypatch, path: str):
    """Fetch the attributes of ``path`` on another thread, and deliver them after the block.

    The getattr handler builds the reply at once and delays it until the
    block has run, so the reply carries the attributes from before
    whatever the block changes. Needs the request loop used with
    invalidate-on-close, which serves other requests meanwhile.
    """
    operations = mounted.server.operations
    node = os.lstat(path).st_ino
    built = threading.Event()
    release = threading.Event()
    getattr_handler = operations.getattr

    async def held_getattr(inode, ctx):
        entry = await getattr_handler(inode, ctx)
        if inode == node and not built.is_set():
            built.set()
            await trio.to_thread.run_sync(release.wait, 10.0)
        return entry

    monkeypatch.setattr(operations, "getattr", held_getattr)
    reader = threading.Thread(target=statx_force_sync, args=(path,))
    reader.start()
    try:
        assert built.wait(10.0)
        yield
    finally:
        release.set()
        reader.join()


@pytest.mark.parametrize("change", ["mkdir", "rmdir", "rename"])
def test_directory_change_beats_late_getattr(lcfs_image, monkeypatch, change):
    # A getattr reply that lcfs built before a change to a directory's
    # entries can reach its requester after the change's reply. The
    # kernel must not keep the old nlink and mtime from it for the whole
    # attribute timeout, because ext4 and tmpfs show the change at once.
    settings = FuseSettings(invalidate_on_close=True)
    with mount_store(lcfs_image, settings) as mounted:
        directory = mounted.at("base", "dir")
        os.mkdir(directory)
        os.mkdir(os.path.join(directory, "old"))
        os.mkdir(mounted.at("base", "elsewhere"))
        before = os.stat(directory)
        with late_getattr(mounted, monkeypatch, directory):
            if change == "mkdir":
                os.mkdir(os.path.join(directory, "new"))
            elif change == "rmdir":
                os.rmdir(os.path.join(directory, "old"))
            else:
                os.rename(os.path.join(directory, "old"), mounted.at("base", "elsewhere", "old"))
        after = os.stat(directory)
    expected_nlink = before.st_nlink + (1 if change == "mkdir" else -1)
    assert after.st_nlink == expected_nlink
    assert after.st_mtime_ns > before.st_mtime_ns
    assert after.st_ctime_ns > before.st_ctime_ns


@pytest.mark.parametrize("flags", [0, RENAME_EXCHANGE])
def test_renamed_file_beats_late_getattr(lcfs_image, monkeypatch, flags):
    # rename(2) sets the ctime of the file it moves, and of both files that
    # RENAME_EXCHANGE swaps, on ext4 and tmpfs. A getattr reply built
    # before the rename must not bring the old ctime back.
    settings = FuseSettings(invalidate_on_close=True)
    with mount_store(lcfs_image, settings) as mounted:
        moved = mounted.at("base", "moved")
        other = mounted.at("base", "other")
        write_file(moved, b"")
        write_file(other, b"")
        before = os.stat(moved)
        with late_getattr(mounted, monkeypatch, moved):
            renameat2(moved, other, flags)
        after = os.stat(other)
    assert after.st_ino == before.st_ino
    assert after.st_ctime_ns > before.st_ctime_ns


@pytest.mark.parametrize("change", ["setxattr", "removexattr"])
def test_xattr_change_beats_late_getattr(lcfs_image, monkeypatch, change):
    # Setting or removing an xattr sets the file's ctime on ext4 and
    # tmpfs. A getattr reply built before the change must not bring the
    # old ctime back.
    settings = FuseSettings(invalidate_on_close=True)
    with mount_store(lcfs_image, settings) as mounted:
        path = mounted.at("base", "f")
        write_file(path, b"")
        os.setxattr(path, "user.old", b"1")
        before = os.stat(path)
        with late_getattr(mounted, monkeypatch, path):
            if change == "setxattr":
                os.setxattr(path, "user.new", b"2")
            else:
                os.removexattr(path, "user.old")
        after = os.stat(path)
    assert after.st_ctime_ns > before.st_ctime_ns


def test_listings_start_with_dot_entries(mounted):
    os.mkdir(mounted.at("base", "dir"))
    write_file(mounted.at("base", "dir", "f"), b"")
    for parts, parent in [((), None), (("base",), ()), (("base", "dir"), ("base",))]:
        path = mounted.at(*parts)
        listed = subprocess.run(["ls", "-a1i", "-U", path], capture_output=True, text=True,
                                check=True).stdout.split()  # fmt: skip
        numbers, names = listed[0::2], listed[1::2]
        assert names[:2] == [".", ".."], path
        assert int(numbers[0]) == os.stat(path).st_ino, path
        # ls takes the number of the mount root's ".." from outside the mount.
        if parent is not None:
            assert int(numbers[1]) == os.stat(mounted.at(*parent)).st_ino, path
    assert sorted(os.listdir(mounted.at("base", "dir"))) == ["f"]


@pytest.mark.parametrize("created", [b"a", b"f250x", b"zz"])
def test_readdir_sends_no_entry_twice_when_directory_grows(mounted, created):
    directory = mounted.at("base", "d")
    os.mkdir(directory)
    for index in range(500):
        write_file(os.path.join(directory, f"f{index}"), b"")
    seen = []
    with os.scandir(directory) as entries:
        for _ in range(5):
            seen.append(next(entries).name)
        # The kernel reads a FUSE directory a page at a time, so the rest
        # comes from requests made after the directory changed.
        write_file(os.path.join(directory, created.decode()), b"")
        seen.extend(entry.name for entry in entries)
    assert len(seen) == len(set(seen))
    assert {f"f{index}" for index in range(500)} <= set(seen)


def test_readdir_large_directory(mounted):
    directory = mounted.at("base", "big")
    os.mkdir(directory)
    names = {f"{i:05d}-" + "x" * 120 for i in range(3000)}
    for name in names:
        os.close(os.open(os.path.join(directory, name), os.O_CREAT | os.O_WRONLY))
    listed = [entry.name for entry in os.scandir(directory)]
    assert len(listed) == len(names)
    assert set(listed) == names
    for entry in list(os.scandir(directory))[::500]:
        assert entry.inode() == os.stat(entry.path).st_ino


def test_readdir_resumes_while_directory_changes(mounted):
    directory = mounted.at("base", "dir")
    os.mkdir(directory)
    for i in range(2000):
        os.close(os.open(os.path.join(directory, f"f{i:04d}-{'y' * 60}"), os.O_CREAT))
    seen = []
    with os.scandir(directory) as entries:
        for count, entry in enumerate(entries):
            seen.append(entry.name)
            if count == 10:
                for i in range(0, 2000, 2):
                    os.unlink(os.path.join(directory, f"f{i:04d}-{'y' * 60}"))
                os.close(os.open(os.path.join(directory, "aaa-new"), os.O_CREAT))
    assert len(seen) == len(set(seen))
    assert len(seen) == 2000
    assert sorted(os.listdir(directory)) == sorted(
        ["aaa-new"] + [f"f{i:04d}-{'y' * 60}" for i in range(1, 2000, 2)]
    )


def test_symlink_and_readlink(mounted):
    link = mounted.at("base", "link")
    os.symlink("target/path", link)
    st = os.lstat(link)
    assert stat.S_ISLNK(st.st_mode)
    assert st.st_size == len("target/path")
    assert os.readlink(link) == "target/path"
    expect_errno(errno.EEXIST, os.symlink, "other", link)
    write_file(mounted.at("base", "file"), b"")
    expect_errno(errno.EINVAL, os.readlink, mounted.at("base", "file"))
    os.symlink("file", mounted.at("base", "to-file"))
    assert read_file(mounted.at("base", "to-file")) == b""


def test_hard_links(mounted):
    first = mounted.at("base", "first")
    second = mounted.at("base", "second")
    write_file(first, b"shared")
    os.link(first, second)
    assert os.stat(first).st_ino == os.stat(second).st_ino
    assert os.stat(first).st_nlink == 2
    assert os.stat(second).st_nlink == 2
    listed = {entry.name: entry.inode() for entry in os.scandir(mounted.at("base"))}
    assert listed["first"] == listed["second"]
    with open(second, "ab") as f:
        f.write(b"!")
    assert read_file(first) == b"shared!"
    expect_errno(errno.EEXIST, os.link, first, second)
    expect_errno(errno.ENOENT, os.link, mounted.at("base", "missing"), mounted.at("base", "x"))
    os.unlink(first)
    assert os.stat(second).st_nlink == 1
    assert read_file(second) == b"shared!"


def test_hard_links_after_copy_up(mounted):
    write_file(mounted.at("base", "first"), b"old")
    os.link(mounted.at("base", "first"), mounted.at("base", "second"))
    child = make_child(mounted)
    write_file(os.path.join(child, "first"), b"new")
    first = os.stat(os.path.join(child, "first"))
    second = os.stat(os.path.join(child, "second"))
    assert first.st_ino == second.st_ino
    assert first.st_nlink == 2
    assert second.st_nlink == 2
    assert read_file(os.path.join(child, "second")) == b"new"
    assert read_file(mounted.at("base", "second")) == b"old"


def test_link_and_rename_across_layers(mounted):
    mounted.store.create_layer("other")
    write_file(mounted.at("base", "file"), b"x")
    expect_errno(errno.EXDEV, os.link, mounted.at("base", "file"), mounted.at("other", "file"))
    expect_errno(errno.EXDEV, os.rename, mounted.at("base", "file"), mounted.at("other", "file"))


def test_mknod_fifo_and_devices(mounted):
    fifo = mounted.at("base", "fifo")
    os.mkfifo(fifo, 0o600)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    null = mounted.at("base", "null")
    os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    st = os.stat(null)
    assert stat.S_ISCHR(st.st_mode)
    assert st.st_rdev == os.makedev(1, 3)
    # The mount has the dev option, so the device node works.
    with open(null, "wb") as f:
        f.write(b"discarded")
    assert read_file(null) == b""
    block = mounted.at("base", "block")
    os.mknod(block, stat.S_IFBLK | 0o600, os.makedev(7, 0))
    assert stat.S_ISBLK(os.stat(block).st_mode)
    assert os.stat(block).st_rdev == os.makedev(7, 0)
    expect_errno(errno.EEXIST, os.mknod, null, stat.S_IFCHR | 0o666, os.makedev(1, 3))


def test_xattrs(mounted):
    path = mounted.at("base", "file")
    write_file(path, b"")
    assert os.listxattr(path) == []
    expect_errno(errno.ENODATA, os.getxattr, path, "user.missing")
    os.setxattr(path, "user.one", b"1")
    os.setxattr(path, "user.two", b"\x00binary\xff")
    assert os.getxattr(path, "user.one") == b"1"
    assert os.getxattr(path, "user.two") == b"\x00binary\xff"
    assert sorted(os.listxattr(path)) == ["user.one", "user.two"]
    expect_errno(errno.EEXIST, os.setxattr, path, "user.one", b"x", os.XATTR_CREATE)
    expect_errno(errno.ENODATA, os.setxattr, path, "user.new", b"x", os.XATTR_REPLACE)
    both = os.XATTR_CREATE | os.XATTR_REPLACE
    expect_errno(errno.EEXIST, os.setxattr, path, "user.one", b"x", both)
    expect_errno(errno.ENODATA, os.setxattr, path, "user.new", b"x", both)
    os.setxattr(path, "user.one", b"replaced", os.XATTR_REPLACE)
    assert os.getxattr(path, "user.one") == b"replaced"
    os.removexattr(path, "user.one")
    expect_errno(errno.ENODATA, os.removexattr, path, "user.one")
    assert os.listxattr(path) == ["user.two"]
    os.setxattr(path, "security.capability", CAPABILITY_VALUE)
    assert os.getxattr(path, "security.capability") == CAPABILITY_VALUE
    os.setxattr(mounted.at("base"), "user.dir", b"d")
    assert os.getxattr(mounted.at("base"), "user.dir") == b"d"


def posix_acl(entries: list[tuple[int, int, int]]) -> bytes:
    """Return the xattr value of a POSIX ACL from (tag, permissions, qualifier) entries."""
    header = (2).to_bytes(4, "little")  # POSIX_ACL_XATTR_VERSION
    packed = [
        tag.to_bytes(2, "little")
        + permissions.to_bytes(2, "little")
        + qualifier.to_bytes(4, "little")
        for tag, permissions, qualifier in entries
    ]
    return header + b"".join(packed)


# An ACL of a 0644 file that denies user nobody everything: user::rw-,
# user:nobody:---, group::r--, mask::r--, other::r--.
NO_ID = 0xFFFFFFFF
ACL_DENYING_NOBODY = posix_acl(
    [(0x01, 6, NO_ID), (0x02, 0, NOBODY), (0x04, 4, NO_ID), (0x10, 4, NO_ID), (0x20, 4, NO_ID)]
)


def test_acls_and_unknown_xattr_namespaces_rejected(mounted):
    # The mount does not enforce POSIX ACLs, so an ACL that it stored would
    # leave a denied user with access. ext4 mounted with noacl rejects
    # ACLs with EOPNOTSUPP, and ext4 and tmpfs reject unknown namespaces.
    path = mounted.at("base", "file")
    write_file(path, b"secret")
    os.chmod(path, 0o644)
    directory = mounted.at("base", "dir")
    os.mkdir(directory)
    cases = [
        (path, "system.posix_acl_access"),
        (directory, "system.posix_acl_default"),
        (path, "bogus.name"),
        (path, "plain"),
    ]
    for target, name in cases:
        expect_errno(errno.EOPNOTSUPP, os.setxattr, target, name, ACL_DENYING_NOBODY)
        expect_errno(errno.EOPNOTSUPP, os.removexattr, target, name)
        assert os.listxattr(target) == []
    os.setxattr(path, "user.kept", b"1")
    expect_errno(errno.EOPNOTSUPP, os.removexattr, path, "system.posix_acl_access")
    assert os.listxattr(path) == ["user.kept"]


def test_trusted_xattrs_listed_only_to_sys_admin(mounted):
    # ext4 and tmpfs list trusted.* names only to callers with
    # CAP_SYS_ADMIN, which root in a default Docker container lacks. The
    # kernel rejects a read of those values by other callers in any case.
    path = mounted.at("base", "file")
    write_file(path, b"")
    os.setxattr(path, "user.u", b"1")
    os.setxattr(path, "trusted.t", b"2")
    lister = [
        "/usr/bin/python3",
        "-c",
        "import os, sys; print(' '.join(sorted(os.listxattr(sys.argv[1]))))",
        path,
    ]
    without_sys_admin = ["setpriv", "--inh-caps=-sys_admin", "--bounding-set=-sys_admin"]
    callers = {
        "root": ([], "trusted.t user.u"),
        "root without CAP_SYS_ADMIN": (without_sys_admin, "user.u"),
        "nobody": (["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"],
                   "user.u"),  # fmt: skip
    }
    for caller, (prefix, expected) in callers.items():
        listed = subprocess.run(prefix + lister, capture_output=True, text=True, check=True)
        assert listed.stdout.strip() == expected, caller


def test_write_drops_file_capability(mounted):
    for name, flags in (("buffered", os.O_RDWR), ("write-only", os.O_WRONLY)):
        path = mounted.at("base", name)
        write_file(path, b"binary")
        os.setxattr(path, "security.capability", CAPABILITY_VALUE)
        fd = os.open(path, flags)
        try:
            os.pwrite(fd, b"B", 0)
        finally:
            os.close(fd)
        expect_errno(errno.ENODATA, os.getxattr, path, "security.capability")


# -- rename -----------------------------------------------------------------------


def test_rename_files_and_directories(mounted):
    at = mounted.at
    write_file(at("base", "a"), b"a")
    write_file(at("base", "b"), b"b")
    os.rename(at("base", "a"), at("base", "c"))
    assert read_file(at("base", "c")) == b"a"
    expect_errno(errno.ENOENT, os.stat, at("base", "a"))
    os.rename(at("base", "c"), at("base", "b"))
    assert read_file(at("base", "b")) == b"a"
    assert os.listdir(at("base")) == ["b"]
    expect_errno(errno.ENOENT, os.rename, at("base", "missing"), at("base", "x"))

    os.makedirs(at("base", "d1", "inner"))
    os.mkdir(at("base", "d2"))
    os.rename(at("base", "d1"), at("base", "d2", "moved"))
    assert os.path.isdir(at("base", "d2", "moved", "inner"))
    expect_errno(errno.EINVAL, os.rename, at("base", "d2"), at("base", "d2", "moved", "x"))

    os.mkdir(at("base", "full"))
    write_file(at("base", "full", "f"), b"")
    os.mkdir(at("base", "empty"))
    expect_errno(errno.ENOTEMPTY, os.rename, at("base", "empty"), at("base", "full"))
    expect_errno(errno.ENOTDIR, os.rename, at("base", "empty"), at("base", "b"))
    expect_errno(errno.EISDIR, os.rename, at("base", "b"), at("base", "empty"))
    os.rename(at("base", "full"), at("base", "empty"))
    assert os.listdir(at("base", "empty")) == ["f"]


def test_rename_inherited_directory(mounted):
    os.makedirs(mounted.at("base", "etc", "conf.d"))
    write_file(mounted.at("base", "etc", "conf.d", "a.conf"), b"setting")
    child = make_child(mounted)
    os.rename(os.path.join(child, "etc"), os.path.join(child, "etc.old"))
    assert read_file(os.path.join(child, "etc.old", "conf.d", "a.conf")) == b"setting"
    expect_errno(errno.ENOENT, os.stat, os.path.join(child, "etc"))
    os.rename(os.path.join(child, "etc.old", "conf.d"), os.path.join(child, "conf.d"))
    assert os.listdir(os.path.join(child, "conf.d")) == ["a.conf"]
    assert read_file(mounted.at("base", "etc", "conf.d", "a.conf")) == b"setting"
    # Delete an inherited directory, then move a new one onto its name.
    os.unlink(os.path.join(child, "conf.d", "a.conf"))
    os.rmdir(os.path.join(child, "conf.d"))
    os.makedirs(os.path.join(child, "new", "x"))
    os.rename(os.path.join(child, "new"), os.path.join(child, "conf.d"))
    assert os.listdir(os.path.join(child, "conf.d")) == ["x"]
    assert os.listdir(mounted.at("base", "etc", "conf.d")) == ["a.conf"]


def test_rename_noreplace(mounted):
    write_file(mounted.at("base", "a"), b"a")
    write_file(mounted.at("base", "b"), b"b")
    expect_errno(errno.EEXIST, renameat2, mounted.at("base", "a"), mounted.at("base", "b"),
                 RENAME_NOREPLACE)  # fmt: skip
    assert read_file(mounted.at("base", "b")) == b"b"
    renameat2(mounted.at("base", "a"), mounted.at("base", "c"), RENAME_NOREPLACE)
    assert read_file(mounted.at("base", "c")) == b"a"


def test_rename_exchange(mounted):
    os.mkdir(mounted.at("base", "dir"))
    write_file(mounted.at("base", "dir", "inside"), b"")
    write_file(mounted.at("base", "file"), b"content")
    renameat2(mounted.at("base", "dir"), mounted.at("base", "file"), RENAME_EXCHANGE)
    assert read_file(mounted.at("base", "dir")) == b"content"
    assert os.listdir(mounted.at("base", "file")) == ["inside"]
    expect_errno(errno.ENOENT, renameat2, mounted.at("base", "dir"),
                 mounted.at("base", "missing"), RENAME_EXCHANGE)  # fmt: skip


def assert_whiteout(path: str) -> None:
    st = os.lstat(path)
    assert stat.S_ISCHR(st.st_mode), path
    assert st.st_rdev == 0, path
    assert stat.S_IMODE(st.st_mode) == 0, path


def test_rename_whiteout(mounted):
    # overlayfs renames with RENAME_WHITEOUT on its upper file system,
    # which ext4 and tmpfs support: the old name becomes a character
    # device 0:0 in the same step.
    at = mounted.at
    write_file(at("base", "a"), b"a")
    write_file(at("base", "c"), b"c")
    os.makedirs(at("base", "dir", "inner"))
    renameat2(at("base", "a"), at("base", "b"), RENAME_WHITEOUT)
    assert read_file(at("base", "b")) == b"a"
    assert_whiteout(at("base", "a"))
    renameat2(at("base", "b"), at("base", "c"), RENAME_WHITEOUT)
    assert read_file(at("base", "c")) == b"a"
    assert_whiteout(at("base", "b"))
    nlink = os.stat(at("base")).st_nlink
    renameat2(at("base", "dir"), at("base", "moved"), RENAME_WHITEOUT)
    assert os.listdir(at("base", "moved")) == ["inner"]
    assert_whiteout(at("base", "dir"))
    assert os.stat(at("base")).st_nlink == nlink
    assert sorted(os.listdir(at("base"))) == ["a", "b", "c", "dir", "moved"]
    expect_errno(errno.EEXIST, renameat2, at("base", "c"), at("base", "a"),
                 RENAME_WHITEOUT | RENAME_NOREPLACE)  # fmt: skip
    expect_errno(errno.EINVAL, renameat2, at("base", "c"), at("base", "a"),
                 RENAME_WHITEOUT | RENAME_EXCHANGE)  # fmt: skip

    child = make_child(mounted)
    renameat2(os.path.join(child, "c"), os.path.join(child, "d"), RENAME_WHITEOUT)
    assert_whiteout(os.path.join(child, "c"))
    assert read_file(os.path.join(child, "d")) == b"a"
    assert read_file(at("base", "c")) == b"a"


# -- frozen layers ----------------------------------------------------------------


def open_and_write(path: str, flags: int) -> None:
    """Open ``path`` with ``flags`` and write to it.

    When open requests return ENOSYS, the kernel opens a file of a frozen
    layer for writing itself, and the write is what fails.
    """
    fd = os.open(path, flags)
    try:
        os.write(fd, b"changed")
    finally:
        os.close(fd)


def test_frozen_layer_drops_rejected_mapped_write(mounted):
    path = mounted.at("base", "file")
    write_file(path, b"H" * 4096)
    make_child(mounted)
    script = """
import errno, mmap, os, sys
try:
    fd = os.open(sys.argv[1], os.O_RDWR)
except OSError as exc:
    print("open", exc.errno)
    sys.exit()
mapping = mmap.mmap(fd, 4096, mmap.MAP_SHARED)
mapping[0:4] = b"MMAP"
try:
    mapping.flush()
except OSError as exc:
    print("msync", exc.errno)
mapping.close()
os.close(fd)
"""
    result = subprocess.run([sys.executable, "-c", script, path],
                            capture_output=True, text=True, check=True)  # fmt: skip
    assert result.stdout.split()[1] == str(errno.EROFS), result.stdout
    # The daemon drops the pages that the rejected write changed, without
    # waiting for the kernel, so the first reads may still see them.
    deadline = time.monotonic() + 5
    while read_file(path)[:4] != b"HHHH" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert read_file(path) == b"H" * 4096


def test_frozen_layer_rejects_changes(mounted):
    at = mounted.at
    os.mkdir(at("base", "dir"))
    write_file(at("base", "file"), b"frozen")
    os.setxattr(at("base", "file"), "user.x", b"1")
    make_child(mounted)
    cases = [
        (os.mkdir, at("base", "new")),
        (os.open, at("base", "new"), os.O_CREAT | os.O_WRONLY),
        (open_and_write, at("base", "file"), os.O_WRONLY),
        (open_and_write, at("base", "file"), os.O_RDWR),
        (os.truncate, at("base", "file"), 0),
        (os.unlink, at("base", "file")),
        (os.rmdir, at("base", "dir")),
        (os.rename, at("base", "file"), at("base", "moved")),
        (os.link, at("base", "file"), at("base", "linked")),
        (os.symlink, "file", at("base", "symlink")),
        (os.mkfifo, at("base", "fifo")),
        (os.chmod, at("base", "file"), 0o600),
        (os.chown, at("base", "file"), 1, 1),
        (os.utime, at("base", "file")),
        (os.setxattr, at("base", "file"), "user.y", b"2"),
        (os.removexattr, at("base", "file"), "user.x"),
    ]
    for func, *args in cases:
        expect_errno(errno.EROFS, func, *args)
    assert read_file(at("base", "file")) == b"frozen"
    assert os.getxattr(at("base", "file"), "user.x") == b"1"
    assert sorted(os.listdir(at("base"))) == ["dir", "file"]


# -- server -----------------------------------------------------------------------


def test_unexpected_error_returns_eio(mounted, monkeypatch, caplog):
    os.symlink("target", mounted.at("base", "link"))

    def broken_readlink(layer, ino):
        raise RuntimeError("simulated store bug")

    monkeypatch.setattr(mounted.store, "readlink", broken_readlink)
    expect_errno(errno.EIO, os.readlink, mounted.at("base", "link"))
    assert "simulated store bug" in caplog.text
    monkeypatch.undo()
    assert os.readlink(mounted.at("base", "link")) == "target"
    assert os.listdir(mounted.at("base")) == ["link"]


def test_stop_twice_and_restart(mounted):
    write_file(mounted.at("base", "file"), b"x")
    mounted.server.stop()
    mounted.server.stop()
    assert find_mount(mounted.path) is None
    mounted.server.start(mounted.path)
    assert read_file(mounted.at("base", "file")) == b"x"
    mounted.store.create_layer("late")
    mounted.server.notify_layer_removed("late")  # the layer still exists
    assert sorted(os.listdir(mounted.path)) == ["base", "late"]


def test_one_mount_per_process(mounted):
    other = FuseServer(mounted.store)
    with pytest.raises(RuntimeError, match="already serves"):
        other.start(mounted.path)
    other.stop()
    assert os.listdir(mounted.path) == ["base"]


def test_stop_after_external_unmount(mounted):
    write_file(mounted.at("base", "file"), b"x")
    subprocess.run(["umount", mounted.path], check=True)
    deadline = time.monotonic() + 5
    while mounted.server.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not mounted.server.running
    mounted.server.stop()
    mounted.server.start(mounted.path)
    assert read_file(mounted.at("base", "file")) == b"x"


def test_concurrent_readers_and_writers(mounted):
    failures = []

    def worker(index: int) -> None:
        path = mounted.at("base", f"worker-{index}")
        data = os.urandom(256 * 1024)
        try:
            for _ in range(5):
                write_file(path, data)
                if read_file(path) != data:
                    failures.append(f"{path}: read back differs")
        except OSError as exc:
            failures.append(f"{path}: {exc}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []



def test_start_fails_on_missing_directory(mounted):
    mounted.server.stop()
    missing = mounted.path + "-missing"
    with pytest.raises(RuntimeError, match="failed"):
        mounted.server.start(missing)
    assert not mounted.server.running
    mounted.server.start(mounted.path)
    assert os.listdir(mounted.path) == ["base"]
