"""Tests of the FUSE frontend's request statistics, xattr shortcuts, direct I/O
and page cache settings, watchdog, and 64-bit node table.

Request counts come from the daemon's own counters: ``RequestStats`` of an
in-process ``FuseServer``, or ``lcfs stats`` of a real ``lcfs daemon``
subprocess. The process that serves a mount never touches files on it, so
every access to a mount runs in a subprocess.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from fuse_fixtures import fuse_available, lcfs_image, mount_store  # noqa: F401
from lcfs_daemon import LcfsDaemon, lcfs_command
from mounts import unmount_under

from lcfs.fuse import find_mount
from lcfs.fuse import mount as mount_module
from lcfs.fuse import watchdog as watchdog_module
from lcfs.fuse.operations import KERNEL_CACHES
from lcfs.fuse.settings import DIRECT_IO_NEVER, DIRECT_IO_WRITE_ONLY, FuseSettings
from lcfs.fuse.stats import fetch_stats
from lcfs.store import ROOT_INO, Store
from lcfs.store.format import U64
from lcfs.store.namespace import XATTR_NAME_PREFIX, XATTR_NAMES_COMPLETE

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(not fuse_available(), reason="FUSE mounts need root and /dev/fuse"),
]

DAEMON_IMAGE_SIZE = 1 << 30
UNPRIVILEGED = ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups"]
# The system interpreter, which an unprivileged user may run (this one may
# live under /root).
SYSTEM_PYTHON = "/usr/bin/python3"
# A version 2 file capability (struct vfs_cap_data) granting CAP_NET_RAW.
CAPABILITY_VALUE = (0x02000000).to_bytes(4, "little") + (1 << 13).to_bytes(4, "little") + bytes(12)
CAPABILITY_HEX = CAPABILITY_VALUE.hex()
# Names of the requests pyfuse3 3.5 passes on, plus init, and lseek and
# fallocate, which the rebuilt pyfuse3 adds.
FUSE_OPERATIONS = {
    "init", "lookup", "forget", "getattr", "setattr", "readlink", "mknod", "mkdir",
    "unlink", "rmdir", "symlink", "rename", "link", "open", "read", "write", "flush",
    "release", "fsync", "opendir", "readdir", "releasedir", "fsyncdir", "statfs",
    "setxattr", "getxattr", "listxattr", "removexattr", "access", "create", "lseek",
    "fallocate",
}  # fmt: skip


def run_python(script: str, *args: str, user: bool = False, timeout: float = 120) -> str:
    """Run a Python script in a subprocess, as uid 1000 if ``user``; return its stdout."""
    command = [SYSTEM_PYTHON if user else sys.executable, "-c", textwrap.dedent(script), *args]
    if user:
        command = UNPRIVILEGED + command
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"script failed ({result.returncode}):\n{result.stderr}"
    return result.stdout


def delta(before: dict, after: dict, operation: str, field: str = "requests") -> int:
    return after.get(operation, {}).get(field, 0) - before.get(operation, {}).get(field, 0)


def wait_until(predicate, timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def mount_options(path: str) -> tuple[list[str], list[str]]:
    """Return the per-mount and the superblock options of the mount at ``path``."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == path:
                separator = fields.index("-")
                return fields[5].split(","), fields[separator + 3].split(",")
    raise AssertionError(f"{path} is not mounted")


def create_files(image: str, count: int, directory: bytes = b"big") -> None:
    """Format ``image`` with ``count`` empty files in directory ``directory`` of layer ``base``."""
    Store.mkfs(image, size=DAEMON_IMAGE_SIZE)
    store = Store.open(image)
    try:
        layer = store.create_layer("base").number
        parent = store.mkdir(layer, ROOT_INO, directory, 0o755).ino
        for index in range(count):
            store.mknod(layer, parent, b"f%05d" % index, stat.S_IFREG | 0o644)
        store.commit()
    finally:
        store.close()


class FeatureDaemon(LcfsDaemon):
    """`lcfs daemon` on a fixed mount point, with extra command line options."""

    def __init__(self, workdir: Path, mountpoint: str, extra_args: list[str]):
        super().__init__(workdir, size="1G", mountpoint=mountpoint, options=tuple(extra_args))

    def stats(self) -> dict:
        return fetch_stats(str(self.socket_path))


@contextlib.contextmanager
def running_daemon(workdir: Path, extra_args: list[str] = (), mountpoint: str | None = None):
    """Run `lcfs daemon` on a world-traversable mount point; unmount afterwards."""
    own_mountpoint = mountpoint is None
    if own_mountpoint:
        mountpoint = tempfile.mkdtemp(prefix="lcfs-test-daemon-")
        os.chmod(mountpoint, 0o755)
    daemon = FeatureDaemon(workdir, mountpoint, list(extra_args))
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()
        if find_mount(mountpoint) is not None:
            unmount_under(mountpoint)
        if own_mountpoint:
            os.rmdir(mountpoint)


# -- request statistics ------------------------------------------------------------


def test_stats_served_by_daemon(tmp_path):
    with running_daemon(tmp_path) as daemon:
        daemon.call("GraphDriver.Create", {"ID": "base"})
        run_python(
            """
            import os, sys
            path = os.path.join(sys.argv[1], "base", "file")
            with open(path, "wb") as f:
                f.write(b"data")
            with open(path, "rb") as f:
                assert f.read() == b"data"
            os.stat(path)
            """,
            str(daemon.mountpoint),
        )
        command = [lcfs_command(), "stats", "--socket", str(daemon.socket_path)]
        as_json = json.loads(subprocess.run(command + ["--json"], capture_output=True,
                                            text=True, check=True).stdout)  # fmt: skip
        table = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        missing = subprocess.run([lcfs_command(), "stats", "--socket", str(tmp_path / "none")],
                                 capture_output=True, text=True)  # fmt: skip
    assert set(as_json) <= FUSE_OPERATIONS
    for operation in ("lookup", "create", "mknod", "write", "open", "read"):
        assert as_json[operation]["requests"] >= 1, operation
        assert as_json[operation]["seconds"] >= 0, operation
    assert as_json["write"]["requests"] == 1
    # The first create and the first open returned ENOSYS. From then on
    # the kernel sent MKNOD and opened and closed files itself.
    assert as_json["create"]["requests"] == 1
    assert as_json["open"]["requests"] == 1
    assert "release" not in as_json
    assert as_json["getxattr"]["store_calls"] == 0
    assert "lookup" in table
    assert table.startswith("OPERATION")
    assert missing.returncode == 2
    assert "--socket" in missing.stderr


# -- xattrs: no xattrs, no cost ----------------------------------------------------


@pytest.fixture(scope="module")
def ten_thousand_files(tmp_path_factory):
    """A daemon serving layer ``base`` with 10,000 empty files in ``big``."""
    workdir = tmp_path_factory.mktemp("xattr-daemon")
    create_files(str(workdir / "lcfs.img"), 10_000)
    with running_daemon(workdir) as daemon:
        yield daemon


def test_ls_long_sends_at_most_two_getxattr(ten_thousand_files):
    daemon = ten_thousand_files
    before = daemon.stats()
    listing = subprocess.run(["ls", "-l", os.path.join(daemon.mountpoint, "base", "big")],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    after = daemon.stats()
    assert len(listing.splitlines()) == 10_001  # "total" and one line per file
    assert delta(before, after, "getxattr") <= 2
    assert delta(before, after, "getxattr", "store_calls") == 0
    assert delta(before, after, "listxattr", "store_calls") == 0


def test_writes_send_at_most_one_getxattr(ten_thousand_files):
    daemon = ten_thousand_files
    path = os.path.join(daemon.mountpoint, "base", "big", "f00001")
    before = daemon.stats()
    run_python(
        """
        import os, sys
        fd = os.open(sys.argv[1], os.O_WRONLY)
        for i in range(1000):
            os.write(fd, b"x" * 100)
        os.close(fd)
        """,
        path,
    )
    after = daemon.stats()
    # A cached write that crosses into a page the kernel does not hold
    # whole went out as two requests here: 24 of the 1,000 writes cross one.
    assert 1000 <= delta(before, after, "write") <= 1030
    # The kernel looks for security.capability before the first cached
    # write, and no more once the getxattr has found none.
    assert delta(before, after, "getxattr") <= 1
    assert os.path.getsize(path) == 100_000


def test_getxattr_without_xattrs_skips_store(ten_thousand_files):
    daemon = ten_thousand_files
    directory = os.path.join(daemon.mountpoint, "base", "big")
    # One file with user.tag makes the name known, so requests for it no
    # longer fail by the never-stored rule.
    run_python("import os, sys; os.setxattr(sys.argv[1], 'user.tag', b'v')",
               os.path.join(directory, "f00000"))  # fmt: skip
    before = daemon.stats()
    output = run_python(
        """
        import errno, os, sys
        directory = sys.argv[1]
        missing = 0
        for index in range(1, 1001):
            path = os.path.join(directory, "f%05d" % index)
            try:
                os.getxattr(path, "user.tag")
            except OSError as error:
                assert error.errno == errno.ENODATA, error
                missing += 1
            assert os.listxattr(path) == []
            try:
                os.removexattr(path, "user.tag")
            except OSError as error:
                assert error.errno == errno.ENODATA, error
        print(missing, os.getxattr(os.path.join(directory, "f00000"), "user.tag").decode())
        """,
        directory,
    )
    after = daemon.stats()
    assert output.split() == ["1000", "v"]
    assert delta(before, after, "getxattr") == 1001
    assert delta(before, after, "listxattr") == 1000
    assert delta(before, after, "removexattr") == 1000
    assert delta(before, after, "getxattr", "store_calls") == 1  # the tagged file only
    assert delta(before, after, "listxattr", "store_calls") == 0
    assert delta(before, after, "removexattr", "store_calls") == 0


def test_buffered_writes_answered_from_memory(lcfs_image):
    with mount_store(lcfs_image) as mounted:
        stats = mounted.server.stats
        first = mounted.at("base", "unseen-capability")
        second = mounted.at("base", "known-capability")
        script = """
            import os, sys
            fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
            for i in range(500):
                os.write(fd, b"x" * 100)
            os.close(fd)
            """
        before = stats.snapshot()
        run_python(script, first)
        # Once one file has security.capability, the kernel's check of the
        # other files is resolved from the attributes kept in memory.
        run_python("import os, sys; os.close(os.open(sys.argv[1], os.O_CREAT, 0o644)); "
                   "os.setxattr(sys.argv[1], 'security.capability', bytes.fromhex(sys.argv[2]))",
                   mounted.at("base", "with-capability"), CAPABILITY_HEX)  # fmt: skip
        run_python(script, second)
        after = stats.snapshot()
    # A cached write that crosses a page boundary may go out as two requests.
    assert delta(before, after, "write") >= 1000
    # With FUSE_HANDLE_KILLPRIV_V2 the kernel marks a file without
    # security.capability, so it looks for one before the first write only.
    # Without the flag it looks before every write.
    checks = after["getxattr"]["names"]["security.capability"]
    if mount_module.KILLPRIV_HOOK:
        assert 2 <= checks <= 10
    else:
        assert checks >= 1000
    assert delta(before, after, "getxattr", "store_calls") == 0


def test_missing_name_cached_until_created(lcfs_image):
    with mount_store(lcfs_image) as mounted:
        stats = mounted.server.stats
        missing = mounted.at("base", "missing-name")
        run_python("import os, sys; os.stat(sys.argv[1])", mounted.at("base"))
        before = stats.snapshot()
        found = run_python("import os, sys\n"
                           "print(sum(os.path.exists(sys.argv[1]) for _ in range(50)))",
                           missing)  # fmt: skip
        after = stats.snapshot()
        created = run_python("import os, sys\n"
                             "open(sys.argv[1], 'wb').write(b'now')\n"
                             "print(open(sys.argv[1], 'rb').read().decode())",
                             missing)  # fmt: skip
    assert found.strip() == "0"
    assert delta(before, after, "lookup") == 1
    assert created.strip() == "now"


WALK_SCRIPT = """
import os, sys
count = 0
for top, dirs, files in os.walk(sys.argv[1]):
    for name in dirs + files:
        path = os.path.join(top, name)
        if os.path.islink(path):
            os.readlink(path)
        os.lstat(path)
        count += 1
print(count)
"""


def test_kernel_keeps_listings_and_symlinks(lcfs_image):
    if not KERNEL_CACHES:
        # scripts/test.sh builds the pyfuse3 that has them.
        assert not os.environ.get("CI"), "pyfuse3 was not built by scripts/build_pyfuse3.py"
        pytest.skip("stock pyfuse3 cannot turn on the kernel's directory and symlink caches")
    with mount_store(lcfs_image) as mounted:
        stats = mounted.server.stats
        tree = mounted.at("base", "tree")
        run_python("import os, sys\n"
                   "for d in range(5):\n"
                   "    os.makedirs(f'{sys.argv[1]}/d{d}')\n"
                   "    for f in range(20):\n"
                   "        open(f'{sys.argv[1]}/d{d}/f{f}', 'w').close()\n"
                   "        os.symlink(f'f{f}', f'{sys.argv[1]}/d{d}/l{f}')\n",
                   tree)  # fmt: skip
        first = run_python(WALK_SCRIPT, tree)
        before = stats.snapshot()
        second = run_python(WALK_SCRIPT, tree)
        after = stats.snapshot()
        run_python("import sys; open(sys.argv[1], 'w').close()", os.path.join(tree, "d0", "new"))
        third = run_python(WALK_SCRIPT, tree)
    assert int(first) == int(second) == 5 + 5 * 40
    assert delta(before, after, "opendir") == 0
    assert delta(before, after, "readdir") == 0
    assert delta(before, after, "readlink") == 0
    assert int(third) == int(second) + 1


def test_inherited_tree_cached_changes_seen(lcfs_image):
    with Store.open(lcfs_image) as store:
        base = store.create_layer("image").number
        for d in range(5):
            directory = store.mkdir(base, ROOT_INO, b"d%d" % d, 0o755)
            for f in range(20):
                store.mknod(base, directory.ino, b"f%d" % f, stat.S_IFREG | 0o644)
        store.create_layer("ctr", "image")
        store.commit()
    with mount_store(lcfs_image) as mounted:
        stats = mounted.server.stats
        tree = mounted.at("ctr")
        run_python(WALK_SCRIPT, tree)
        # Past the 1-second timeout of what the writable layer changed itself.
        time.sleep(1.5)
        before = stats.snapshot()
        run_python(WALK_SCRIPT, tree)
        after = stats.snapshot()
        changed = run_python(
            "import os, stat, sys\n"
            "d = os.path.join(sys.argv[1], 'd0')\n"
            "mtime = os.stat(d).st_mtime_ns\n"
            "os.chmod(os.path.join(d, 'f0'), 0o600)\n"
            "open(os.path.join(d, 'new'), 'w').close()\n"
            "print(oct(stat.S_IMODE(os.stat(os.path.join(d, 'f0')).st_mode)),\n"
            "      os.stat(d).st_mtime_ns > mtime)\n",
            tree,
        )
    # The kernel invalidates a directory's atime after reading it, so the
    # walk's lstat sends one getattr per directory (6) and none per file.
    assert delta(before, after, "getattr") <= 6
    assert delta(before, after, "lookup") == 0
    assert changed.split() == ["0o600", "True"]


def test_store_calls_match_store(lcfs_image, monkeypatch):
    with mount_store(lcfs_image) as mounted:
        store = mounted.store
        calls = {"getxattr": 0, "listxattr": 0, "removexattr": 0}
        for name in calls:
            original = getattr(store, name)

            def counted(*args, _name=name, _original=original):
                calls[_name] += 1
                return _original(*args)

            monkeypatch.setattr(store, name, counted)
        run_python(
            """
            import os, sys
            base = sys.argv[1]
            for index in range(50):
                path = os.path.join(base, "f%d" % index)
                open(path, "w").close()
                if index % 10 == 0:
                    os.setxattr(path, "user.a", b"1")
                    os.setxattr(path, "user.b", b"2")
            for index in range(50):
                path = os.path.join(base, "f%d" % index)
                for name in ("user.a", "security.selinux", "system.posix_acl_access"):
                    try:
                        os.getxattr(path, name)
                    except OSError:
                        pass
                os.listxattr(path)
                try:
                    os.removexattr(path, "user.b")
                except OSError:
                    pass
            """,
            mounted.at("base"),
        )
        snapshot = mounted.server.stats.snapshot()
    for name, count in calls.items():
        assert snapshot[name]["store_calls"] == count, name
    # Only the 5 files with xattrs reach the store.
    assert calls == {"getxattr": 5, "listxattr": 5, "removexattr": 5}
    assert snapshot["getxattr"]["requests"] >= 150


def test_never_stored_names(lcfs_image):
    with mount_store(lcfs_image) as mounted:
        output = run_python(
            """
            import errno, os, sys
            first, second = sys.argv[1], sys.argv[2]
            for path in (first, second):
                open(path, "w").close()

            def error_of(func, *args):
                try:
                    func(*args)
                except OSError as error:
                    return str(error.errno)
                return "ok"

            print(error_of(os.getxattr, first, "security.selinux"))
            print(error_of(os.getxattr, first, "system.posix_acl_access"))
            print(error_of(os.getxattr, first, "user.never"))
            print(error_of(os.getxattr, first, "security.capability"))
            print(error_of(os.setxattr, first, "security.label", b"x", os.XATTR_REPLACE))
            print(error_of(os.setxattr, first, "security.selinux", b"ctx", os.XATTR_CREATE))
            print(os.getxattr(first, "security.selinux").decode())
            print(error_of(os.getxattr, second, "security.selinux"))
            print(error_of(os.setxattr, first, "security.selinux", b"x", os.XATTR_CREATE))
            """,
            mounted.at("base", "first"),
            mounted.at("base", "second"),
        )
        assert mounted.store.xattr_name_seen(b"security.selinux")
        assert not mounted.store.xattr_name_seen(b"security.label")
    assert output.split() == [
        str(errno.EOPNOTSUPP),  # security.selinux, never stored
        str(errno.EOPNOTSUPP),  # system.posix_acl_access, never stored
        str(errno.ENODATA),  # user.never: outside security and system
        str(errno.ENODATA),  # security.capability, which containerd's differ reads
        str(errno.EOPNOTSUPP),  # XATTR_REPLACE of a never-stored name
        "ok",  # XATTR_CREATE of a never-stored name
        "ctx",
        str(errno.ENODATA),  # the name is known now
        str(errno.EEXIST),
    ]


def test_ls_long_asks_again_once_name_stored(lcfs_image):
    with mount_store(lcfs_image) as mounted:
        stats = mounted.server.stats
        directory = mounted.at("base", "dir")
        run_python(
            """
            import os, sys
            os.mkdir(sys.argv[1])
            for index in range(50):
                open(os.path.join(sys.argv[1], "f%02d" % index), "w").close()
            """,
            directory,
        )
        first = stats.snapshot()
        subprocess.run(["ls", "-l", directory], capture_output=True, check=True)
        second = stats.snapshot()
        run_python("import os, sys; os.setxattr(sys.argv[1], 'security.selinux', b'ctx')",
                   os.path.join(directory, "f00"))  # fmt: skip
        third = stats.snapshot()
        subprocess.run(["ls", "-l", directory], capture_output=True, check=True)
        fourth = stats.snapshot()
    assert delta(first, second, "getxattr") <= 2
    assert delta(third, fourth, "getxattr") >= 50
    assert delta(third, fourth, "getxattr", "store_calls") <= 2


def test_xattr_names_persist_and_old_store_indexed(lcfs_image):
    store = Store.open(lcfs_image)
    layer = store.create_layer("base").number
    ino = store.mknod(layer, ROOT_INO, b"file", stat.S_IFREG | 0o644).ino
    store.setxattr(layer, ino, b"user.kept", b"1")
    store.removexattr(layer, ino, b"user.kept")
    store.setxattr(layer, ino, b"trusted.held", b"2")
    store.commit()
    store.close()

    store = Store.open(lcfs_image)
    assert store.xattr_name_seen(b"user.kept")  # removed, but once stored
    assert store.xattr_name_seen(b"trusted.held")
    assert not store.xattr_name_seen(b"security.selinux")
    # Drop the set as a store from before it existed would lack it.
    with store.lock:
        store._ready()
        meta = store.dbs["meta"]
        for key in [k for k, _ in store._prefix_items(meta, XATTR_NAME_PREFIX)]:
            store._txn.delete(key, db=meta)
        store._txn.delete(XATTR_NAMES_COMPLETE, db=meta)
    store.commit()
    store.close()

    store = Store.open(lcfs_image)
    try:
        assert store.xattr_name_seen(b"trusted.held")
        assert not store.xattr_name_seen(b"user.kept")  # no record has it now
        with store.lock:
            store._ready()
            assert store._txn.get(XATTR_NAMES_COMPLETE, db=store.dbs["meta"]) is not None
    finally:
        store.close()


# -- direct I/O ----------------------------------------------------------------------

MMAP_SCRIPT = """
    import mmap, os, sys
    path = sys.argv[1]
    with open(path, "wb") as f:
        f.write(b"a" * 8192)
    fd = os.open(path, os.O_WRONLY)
    os.pwrite(fd, b"W" * 10, 100)
    os.close(fd)
    with open(path, "ab") as f:
        f.write(b"tail")
    with open(path, "r+b") as f:
        shared = mmap.mmap(f.fileno(), 8192, mmap.MAP_SHARED)
        private = mmap.mmap(f.fileno(), 8192, mmap.MAP_PRIVATE)
    assert shared[100:110] == b"W" * 10, shared[100:110]
    assert private[:4] == b"aaaa"
    shared[4096:4100] = b"SHRD"
    shared.flush()
    private[0:4] = b"PRIV"
    # A direct write by another descriptor shows in the shared mapping.
    fd = os.open(path, os.O_WRONLY)
    os.pwrite(fd, b"D", 5000)
    os.close(fd)
    assert shared[5000:5001] == b"D"
    shared.close()
    private.close()
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b"aaaa", data[:4]
    assert data[100:110] == b"W" * 10
    assert data[4096:4100] == b"SHRD"
    assert data[5000:5001] == b"D"
    assert data.endswith(b"tail")
    assert len(data) == 8196
    # Executable mappings, as the loader makes them, read through the cache.
    with open(path, "rb") as f:
        text = mmap.mmap(f.fileno(), 4096, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_EXEC)
        assert text[:4] == b"aaaa"
        text.close()
    fd = os.open(path, os.O_WRONLY)
    for i in range(1000):
        os.pwrite(fd, b"z", i)
    os.close(fd)
    print("ok")
"""


@pytest.mark.parametrize("direct_io", [DIRECT_IO_WRITE_ONLY, DIRECT_IO_NEVER])
def test_direct_io_setting_keeps_mmap_working(lcfs_image, direct_io):
    with mount_store(lcfs_image, FuseSettings(direct_io=direct_io)) as mounted:
        stats = mounted.server.stats
        assert run_python(MMAP_SCRIPT, mounted.at("base", "file")).strip() == "ok"
        snapshot = stats.snapshot()
    # 1,000 writes on one O_WRONLY descriptor at the end of the script, and
    # the kernel's security.capability check before every cached write,
    # or only before the first with FUSE_HANDLE_KILLPRIV_V2.
    if direct_io == DIRECT_IO_WRITE_ONLY or mount_module.KILLPRIV_HOOK:
        assert snapshot["getxattr"]["requests"] < 20
    else:
        assert snapshot["getxattr"]["requests"] >= 1000
    assert snapshot["getxattr"]["store_calls"] == 0


# -- privileges dropped by writes, against tmpfs -----------------------------------

PRIVILEGE_SCRIPT = """
    import itertools, json, os, subprocess, sys
    phase, directory = sys.argv[1], sys.argv[2]
    MMAP_WRITE = ("import mmap, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
                  "m = mmap.mmap(fd, 4); m[0:1] = bytes([35]); m.flush()")
    CAPABILITY = bytes.fromhex(sys.argv[3])
    KINDS = {
        "wronly": "dd if=/dev/zero of=\\"$1\\" bs=1 count=1 conv=notrunc status=none",
        "rdwr": "printf x 1<>\\"$1\\"",
        "append": "printf x >>\\"$1\\"",
        "trunc": "printf x >\\"$1\\"",
        "ftruncate": "truncate -s 1 \\"$1\\"",
        # A write through a shared mapping, which Linux writes back without
        # dropping anything. User 1000 cannot run this test's python under
        # /root, so Debian's own runs it.
        "mmap": f"/usr/bin/python3 -c '{MMAP_WRITE}' \\"$1\\"",
        # A hole punched into the first byte (util-linux fallocate).
        "punch": "fallocate --punch-hole --offset 0 --length 1 \\"$1\\"",
    }
    WRITES = tuple(KINDS)
    # Owner changes: root gives a root file to root again, user 1000 (in
    # group 1000 only) gives its own file to group 1000.
    KINDS["chown"] = "chown 0:0 \\"$1\\""
    KINDS["chgrp"] = "chgrp 1000 \\"$1\\""
    cases = []
    for mode, group, kind in itertools.product((0o4777, 0o2777, 0o6777, 0o2767),
                                               (0, 1000), WRITES):
        cases.append(("user", mode, group, False, kind))
    for mode, kind in itertools.product((0o4777, 0o6777), WRITES):
        cases.append(("root", mode, 0, False, kind))
    for writer, kind in itertools.product(("user", "root"), WRITES):
        cases.append((writer, 0o777, 0, True, kind))
    for mode, group in itertools.product((0o4777, 0o2777, 0o6777, 0o2767, 0o4755),
                                         (0, 1000)):
        cases.append(("root", mode, group, False, "chown"))
        cases.append(("user", mode, group, False, "chgrp"))
    cases.append(("root", 0o777, 0, True, "chown"))
    cases.append(("user", 0o777, 0, True, "chgrp"))

    def name(case):
        writer, mode, group, capability, kind = case
        return f"{writer}-{mode:o}-g{group}-{'cap' if capability else 'nocap'}-{kind}"

    for case in cases:
        writer, mode, group, capability, kind = case
        path = os.path.join(directory, name(case))
        if phase == "setup":
            with open(path, "wb") as f:
                f.write(b"#!/bin/sh\\n")
            os.chown(path, 1000 if kind == "chgrp" else 0, group)
            os.chmod(path, mode)
            if capability:
                os.setxattr(path, "security.capability", CAPABILITY)
        elif phase == "write":
            command = ["/bin/sh", "-c", KINDS[kind], "sh", path]
            if writer == "user":
                command = ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups"] + command
            subprocess.run(command, check=True)
    if phase == "report":
        report = {}
        for case in cases:
            path = os.path.join(directory, name(case))
            try:
                held = os.getxattr(path, "security.capability") == CAPABILITY
            except OSError:
                held = False
            report[name(case)] = [oct(os.stat(path).st_mode), held]
        print(json.dumps(report, sort_keys=True))
"""


def privileges_after_writes(directory: str) -> dict:
    for phase in ("setup", "write"):
        run_python(PRIVILEGE_SCRIPT, phase, directory, CAPABILITY_HEX)
    return json.loads(run_python(PRIVILEGE_SCRIPT, "report", directory, CAPABILITY_HEX))


@pytest.fixture(scope="module")
def tmpfs_privileges():
    """What tmpfs keeps of setuid, setgid and capabilities after the test writes."""
    directory = tempfile.mkdtemp(prefix="lcfs-test-tmpfs-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=755,size=16m", "lcfs-test", directory],
                   check=True)  # fmt: skip
    try:
        return privileges_after_writes(directory)
    finally:
        subprocess.run(["umount", directory], check=True)
        os.rmdir(directory)


@pytest.mark.parametrize("direct_io", [DIRECT_IO_WRITE_ONLY, DIRECT_IO_NEVER])
def test_write_drops_privileges_as_tmpfs(lcfs_image, tmpfs_privileges, direct_io):
    with mount_store(lcfs_image, FuseSettings(direct_io=direct_io)) as mounted:
        found = privileges_after_writes(mounted.at("base"))
    # The table covers both outcomes, so the comparison can tell a fault.
    assert any(mode == "0o104777" for mode, _ in tmpfs_privileges.values())
    assert any(mode == "0o100777" for mode, _ in tmpfs_privileges.values())
    assert any(mode == "0o102767" for mode, _ in tmpfs_privileges.values())
    differences = {
        name: (found.get(name), expected)
        for name, expected in tmpfs_privileges.items()
        if found.get(name) != expected
    }
    assert differences == {}, "lcfs and tmpfs differ (lcfs, tmpfs)"


def test_chown_sends_no_getattr(lcfs_image):
    """The kernel leaves setuid clearing to lcfs, so it fetches no mode before a chown."""
    if not mount_module.KILLPRIV_HOOK:
        assert not os.environ.get("CI"), "pyfuse3 was not built by scripts/build_pyfuse3.py"
        pytest.skip("needs the pyfuse3 that scripts/build_pyfuse3.py builds")
    with mount_store(lcfs_image) as mounted:
        assert mounted.server.privilege_clearing == "lcfs"
        path = mounted.at("base", "setuid-program")
        run_python("import os, sys; os.close(os.open(sys.argv[1], os.O_CREAT, 0o755)); "
                   "os.chmod(sys.argv[1], 0o4755); os.stat(sys.argv[1])", path)  # fmt: skip
        before = mounted.server.stats.snapshot()
        run_python("import os, sys\nfor i in range(20): os.chown(sys.argv[1], 0, i % 2)", path)
        after = mounted.server.stats.snapshot()
        mode = os.stat(path).st_mode
    assert delta(before, after, "setattr") == 20
    # Without the flag, each chown sends a getattr first.
    assert delta(before, after, "getattr") <= 2
    assert mode == stat.S_IFREG | 0o755


# -- invalidate on close -------------------------------------------------------------

READ_TWICE_SCRIPT = """
    import sys
    for _ in range(2):
        with open(sys.argv[1], "rb") as f:
            while f.read(1 << 20):
                pass
    """


@pytest.mark.parametrize("read_ahead_kb, most_reads", [(1024, 20), (0, None)])
def test_read_ahead_sets_read_request_size(lcfs_image, read_ahead_kb, most_reads):
    with Store.open(lcfs_image) as store:
        layer = store.create_layer("base").number
        big = store.mknod(layer, ROOT_INO, b"big", stat.S_IFREG | 0o644)
        store.write(layer, big.ino, 0, os.urandom(16 << 20))
        store.commit()
    settings = FuseSettings(read_ahead_kb=read_ahead_kb)
    with mount_store(lcfs_image, settings) as mounted:
        device = find_mount(mounted.path)
        with open(f"/sys/class/bdi/{device}/read_ahead_kb") as f:
            kernel_read_ahead = int(f.read())
        drop_kernel_caches()
        before = mounted.server.stats.snapshot()
        run_python("import sys; open(sys.argv[1], 'rb').read()", mounted.at("base", "big"))
        reads = delta(before, mounted.server.stats.snapshot(), "read")
    if most_reads is None:
        # The kernel's own read-ahead of 128 KiB: one request per 128 KiB.
        assert kernel_read_ahead == 128
        assert reads >= 16 * 8
    else:
        assert kernel_read_ahead == read_ahead_kb
        assert reads <= most_reads


@pytest.mark.parametrize("invalidate", [False, True])
def test_request_loop_and_remount(lcfs_image, invalidate):
    if not mount_module.PLAIN_LOOP:
        assert not os.environ.get("CI"), "pyfuse3 was not built by scripts/build_pyfuse3.py"
        pytest.skip("stock pyfuse3 has only its trio loop")
    settings = FuseSettings(invalidate_on_close=invalidate)
    for round_number in range(2):
        with mount_store(lcfs_image, settings) as mounted:
            # invalidate-on-close needs the trio loop, whose release handler waits.
            assert mounted.server.request_loop == ("trio" if invalidate else "plain")
            path = mounted.at("base", f"file{round_number}")
            run_python("import sys; open(sys.argv[1], 'w').write('x' * 5000)", path)
            for earlier in range(round_number + 1):
                assert os.path.getsize(mounted.at("base", f"file{earlier}")) == 5000
            # Group commits run between requests on the loop's own thread.
            deadline = time.monotonic() + 5
            while mounted.store.dirty and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not mounted.store.dirty
            thread = mounted.server._thread
        assert not thread.is_alive()


@pytest.mark.parametrize("invalidate", [True, False])
def test_invalidate_on_close(lcfs_image, invalidate):
    settings = FuseSettings(invalidate_on_close=invalidate)
    with mount_store(lcfs_image, settings) as mounted:
        path = mounted.at("base", "file")
        run_python("import os, sys; open(sys.argv[1], 'wb').write(os.urandom(8 << 20))", path)
        stats = mounted.server.stats
        first = stats.snapshot()
        run_python(READ_TWICE_SCRIPT, path)
        second = stats.snapshot()
        run_python(READ_TWICE_SCRIPT, path)
        third = stats.snapshot()
    # The first pass after the write reads from the daemon either way.
    assert delta(first, second, "read") > 0
    if invalidate:
        # Every pass of every run reads from the daemon again.
        # Readahead groups pages into requests differently from run to run,
        # so the second round's count is compared with half the first's.
        assert delta(second, third, "read") * 2 >= delta(first, second, "read") > 0
    else:
        assert delta(second, third, "read") == 0


def test_invalidate_on_close_with_concurrent_opens(lcfs_image):
    settings = FuseSettings(invalidate_on_close=True)
    with mount_store(lcfs_image, settings) as mounted:
        path = mounted.at("base", "file")
        run_python("import sys; open(sys.argv[1], 'wb').write(bytes(range(256)) * 4096)", path)
        script = """
            import mmap, sys
            expected = bytes(range(256)) * 4096
            for i in range(100):
                with open(sys.argv[1], "rb") as f:
                    assert f.read() == expected
                    if i % 10 == 0:
                        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
                            assert m[:256] == expected[:256]
            """
        workers = [
            subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), path])
            for _ in range(4)
        ]
        codes = [worker.wait(timeout=120) for worker in workers]
        releases = mounted.server.stats.snapshot()["release"]["requests"]
    assert codes == [0, 0, 0, 0]
    assert releases >= 400


# -- suid, dev and the watchdog -----------------------------------------------------

GETEUID_SOURCE = """
#include <stdio.h>
#include <unistd.h>
int main(void) { printf("%d\\n", (int)geteuid()); return 0; }
"""


def build_geteuid_program(directory: Path) -> Path:
    source = directory / "geteuid.c"
    source.write_text(GETEUID_SOURCE)
    program = directory / "geteuid"
    subprocess.run(["cc", "-static", "-O", "-o", str(program), str(source)], check=True)
    return program


def watchdog_of(daemon_pid: int) -> int:
    """Return the pid of the daemon's child running the watchdog."""
    for task in os.listdir(f"/proc/{daemon_pid}/task"):
        with open(f"/proc/{daemon_pid}/task/{task}/children") as f:
            for pid in f.read().split():
                with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                    if b"watchdog.py" in cmdline.read():
                        return int(pid)
    raise AssertionError(f"daemon pid {daemon_pid} has no watchdog child")


def test_suid_dev_and_unmount_after_sigkill(tmp_path):
    program = build_geteuid_program(tmp_path)
    with running_daemon(tmp_path / "daemon") as daemon:
        mountpoint = str(daemon.mountpoint)
        daemon.call("GraphDriver.Create", {"ID": "base"})
        mount_flags, super_options = mount_options(mountpoint)
        assert "nosuid" not in mount_flags
        assert "nodev" not in mount_flags
        assert "allow_other" in super_options
        layer = os.path.join(mountpoint, "base")
        run_python(
            """
            import os, shutil, stat, sys
            layer, program = sys.argv[1], sys.argv[2]
            shutil.copy(program, os.path.join(layer, "geteuid"))
            os.chmod(os.path.join(layer, "geteuid"), 0o4755)
            os.mknod(os.path.join(layer, "null"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
            with open(os.path.join(layer, "null"), "wb") as f:
                f.write(b"discarded")
            with open(os.path.join(layer, "null"), "rb") as f:
                assert f.read() == b""
            """,
            layer,
            str(program),
        )
        as_user = subprocess.run(UNPRIVILEGED + [os.path.join(layer, "geteuid")],
                                 capture_output=True, text=True, check=True)  # fmt: skip
        assert as_user.stdout.strip() == "0"

        watchdog = watchdog_of(daemon.process.pid)
        descriptors = [os.readlink(f"/proc/{watchdog}/fd/{fd}")
                       for fd in os.listdir(f"/proc/{watchdog}/fd")]  # fmt: skip
        assert "/dev/fuse" not in descriptors
        # The pipe, /dev/null, the log, and the mount point's parent directory.
        assert len(descriptors) == 4, descriptors
        assert os.path.dirname(mountpoint) in descriptors

        device = find_mount(mountpoint)
        assert device is not None
        os.kill(daemon.process.pid, signal.SIGKILL)
        killed = time.monotonic()
        assert wait_until(lambda: find_mount(mountpoint) is None, timeout=2.0)
        gone_after = time.monotonic() - killed
        assert wait_until(lambda: not os.path.exists(f"/proc/{watchdog}"), timeout=5.0)
    assert gone_after < 2.0


def test_watchdog_leaves_other_mount(lcfs_image):
    with mount_store(lcfs_image, FuseSettings(watchdog=False)) as mounted:
        read_end, write_end = os.pipe()
        watchdog = subprocess.Popen(
            [sys.executable, "-I", watchdog_module.__file__, mounted.path, "0:9999"],
            stdin=read_end,
        )
        os.close(read_end)
        os.close(write_end)
        assert watchdog.wait(timeout=10) == 0
        assert find_mount(mounted.path) is not None
        assert mounted.server.watchdog is None


def test_stop_with_layer_bind_mount(tmp_path):
    # containerd bind-mounts a snapshot's directory as each container's root
    # filesystem, and that mount outlives the daemon's unmount.
    bound = tmp_path / "rootfs"
    bound.mkdir()
    try:
        with running_daemon(tmp_path / "daemon") as daemon:
            daemon.call("GraphDriver.Create", {"ID": "base"})
            layer = os.path.join(daemon.mountpoint, "base")
            subprocess.run(["mount", "--bind", layer, str(bound)], check=True)
            assert daemon.stop() == 0
            log_text = daemon.log_tail(20000)
            assert find_mount(str(daemon.mountpoint)) is None
            assert find_mount(str(bound)) is not None
    finally:
        unmount_under(tmp_path)
    assert "still mounted" not in log_text
    assert f"1 bind mounts of its layers remain ({bound})" in log_text
    assert "ended without unmounting" not in log_text


# -- 64-bit layer and inode numbers, file handles ------------------------------------

HANDLE_SCRIPT = """
    import ctypes, errno, json, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    AT_FDCWD = -100
    MAX_HANDLE_SZ = 128

    class FileHandle(ctypes.Structure):
        _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                    ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ)]

    def save(paths):
        handles = {}
        for path in paths:
            handle = FileHandle(handle_bytes=MAX_HANDLE_SZ)
            mount_id = ctypes.c_int()
            if libc.name_to_handle_at(AT_FDCWD, path.encode(), ctypes.byref(handle),
                                      ctypes.byref(mount_id), 0) != 0:
                raise OSError(ctypes.get_errno(), "name_to_handle_at", path)
            data = bytes(handle.f_handle[: handle.handle_bytes])
            handles[path] = [handle.handle_type, data.hex()]
        return handles

    def open_all(mountpoint, handles):
        mount_fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
        result = {}
        for path, (handle_type, data) in handles.items():
            raw = bytes.fromhex(data)
            handle = FileHandle(handle_bytes=len(raw), handle_type=handle_type)
            ctypes.memmove(handle.f_handle, raw, len(raw))
            fd = libc.open_by_handle_at(mount_fd, ctypes.byref(handle), os.O_RDONLY)
            if fd < 0:
                result[path] = errno.errorcode[ctypes.get_errno()]
                continue
            if os.path.isdir(f"/proc/self/fd/{fd}"):
                result[path] = sorted(os.listdir(fd))
            else:
                result[path] = os.read(fd, 100).decode()
            os.close(fd)
        return result

    command = sys.argv[1]
    if command == "save":
        print(json.dumps(save(sys.argv[2:])))
    else:
        print(json.dumps(open_all(sys.argv[2], json.loads(sys.stdin.read()))))
"""


def open_handles(mountpoint: str, handles: dict) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(HANDLE_SCRIPT), "open", mountpoint],
        input=json.dumps(handles), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def drop_kernel_caches() -> None:
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def prepare_large_numbers(image: str) -> dict:
    """Format ``image`` with layers numbered above 2**32, inodes above 2**48 and
    node ids above 2**40."""
    Store.mkfs(image, size=DAEMON_IMAGE_SIZE)
    store = Store.open(image)
    try:
        with store.lock:
            store._ready()
            meta = store.dbs["meta"]
            store._txn.put(b"next_layer", U64.pack(2**32 + 5), db=meta)
            store._txn.put(b"next_ino", U64.pack(2**48 + 7), db=meta)
            store._txn.put(b"next_node", U64.pack(2**40 + 3), db=meta)
        store.commit()
        base = store.create_layer("base").number
        directory = store.mkdir(base, ROOT_INO, b"dir", 0o755).ino
        file = store.mknod(base, directory, b"file", stat.S_IFREG | 0o644).ino
        store.write(base, file, 0, b"base data")
        child = store.create_layer("child", "base").number
        store.commit()
        return {"base": base, "child": child, "dir": directory, "file": file}
    finally:
        store.close()


def test_large_numbers_and_file_handles(tmp_path):
    numbers = prepare_large_numbers(str(tmp_path / "lcfs.img"))
    assert numbers["base"] > 2**32
    assert numbers["child"] > 2**32
    assert numbers["dir"] > 2**48
    assert numbers["file"] > 2**48
    mountpoint = tempfile.mkdtemp(prefix="lcfs-test-handles-")
    os.chmod(mountpoint, 0o755)
    base = os.path.join(mountpoint, "base")
    child = os.path.join(mountpoint, "child")
    saved_paths = [
        os.path.join(base, "dir", "file"),
        os.path.join(child, "dir", "file"),
        os.path.join(child, "dir", "new"),
        os.path.join(child, "dir"),
        os.path.join(base, "dir"),
    ]
    expected = {
        saved_paths[0]: "base data",
        saved_paths[1]: "child data",
        saved_paths[2]: "new file",
        saved_paths[3]: ["file", "new"],
        saved_paths[4]: ["file"],
    }
    try:
        with running_daemon(tmp_path, mountpoint=mountpoint) as daemon:
            inodes = json.loads(run_python(
                """
                import json, os, sys
                base, child = sys.argv[1], sys.argv[2]
                assert open(os.path.join(child, "dir", "file")).read() == "base data"
                with open(os.path.join(child, "dir", "file"), "r+") as f:
                    f.write("child data")
                with open(os.path.join(child, "dir", "new"), "w") as f:
                    f.write("new file")
                os.statvfs(child)
                paths = [base, child] + [os.path.join(layer, "dir", name)
                                         for layer in (base, child) for name in ("", "file")]
                paths.append(os.path.join(child, "dir", "new"))
                print(json.dumps({path: os.stat(path).st_ino for path in paths}))
                """,
                base, child,
            ))  # fmt: skip
            assert len(set(inodes.values())) == len(inodes), inodes
            assert all(ino > 2**40 for ino in inodes.values())
            handles = json.loads(run_python(HANDLE_SCRIPT, "save", *saved_paths))

            before = daemon.stats()
            drop_kernel_caches()
            assert wait_until(lambda: delta(before, daemon.stats(), "forget") > 0, timeout=5)
            assert open_handles(mountpoint, handles) == expected
            after = daemon.stats()
            assert after["lookup"]["dot"] > before["lookup"]["dot"]
            assert after["lookup"]["dotdot"] > before["lookup"]["dotdot"]

        # A new daemon resolves the same handles from the persistent node table.
        with running_daemon(tmp_path, mountpoint=mountpoint) as daemon:
            assert open_handles(mountpoint, handles) == expected
            assert daemon.stats()["lookup"]["dot"] >= len(handles)
            run_python("import os, sys; os.unlink(sys.argv[1])", saved_paths[2])
            drop_kernel_caches()
            reopened = open_handles(mountpoint, handles)
            # Removing a layer deletes its node ids, and with them its handles.
            daemon.call("GraphDriver.Remove", {"ID": "child"})
            drop_kernel_caches()
            after_removal = open_handles(mountpoint, handles)
        assert reopened[saved_paths[2]] == "ESTALE"
        assert reopened[saved_paths[3]] == ["file"]
        assert after_removal[saved_paths[0]] == "base data"
        assert after_removal[saved_paths[4]] == ["file"]
        for path in saved_paths[1:4]:
            assert after_removal[path] == "ESTALE", path
    finally:
        os.rmdir(mountpoint)
