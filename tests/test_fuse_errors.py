"""Logging of failed FUSE requests: device errors are logged and rate-limited."""

from __future__ import annotations

import errno
import logging
import os
import re
import time

import pytest
from fuse_fixtures import fuse_available, mount_store
from mounts import tmpfs_at

from lcfs.fuse import handler, mount
from lcfs.store import Store, errors

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(
        not fuse_available(), reason="FUSE mounts need root and /dev/fuse"
    ),
]

# The smallest metadata region mkfs accepts, and 1 MiB (256 blocks) of data.
SMALL_IMAGE = (16 << 20) + (1 << 20)
CHUNK = 64 << 10


@pytest.fixture
def small(tmp_path):
    image = str(tmp_path / "small.img")
    Store.mkfs(image, size=SMALL_IMAGE)
    with mount_store(image) as handle:
        yield handle


@pytest.fixture
def handler_log(monkeypatch, caplog):
    """Return the records of lcfs.fuse.handler, with fresh rate limits of 60 s."""
    monkeypatch.setattr(handler, "_device_log_limits", {})
    monkeypatch.setattr(handler, "DEVICE_LOG_INTERVAL", 60.0)
    caplog.set_level(logging.WARNING, logger=handler.log.name)
    return lambda: [r for r in caplog.records if r.name == handler.log.name]


def fill(fd: int) -> None:
    """Write to ``fd`` until the device is full and a write fails with ENOSPC."""
    with pytest.raises(OSError) as info:
        for _ in range(SMALL_IMAGE // CHUNK):
            os.write(fd, b"x" * CHUNK)
    assert info.value.errno == errno.ENOSPC


def fail_writes(fd: int, count: int) -> None:
    for _ in range(count):
        with pytest.raises(OSError) as info:
            os.write(fd, b"y" * CHUNK)
        assert info.value.errno == errno.ENOSPC


def test_enospc_logged_with_node(small, handler_log):
    fd = os.open(small.at("base", "big"), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        fill(fd)
    finally:
        os.close(fd)
    records = handler_log()
    assert len(records) == 1
    assert records[0].levelno == logging.WARNING
    message = records[0].getMessage()
    assert re.search(r"^FUSE write on node \d+ \(inode \d+ of layer base\)", message)
    assert "failed with ENOSPC: no space left" in message
    assert "docker system prune" in message


def test_enospc_log_rate_limited(small, handler_log, monkeypatch):
    monkeypatch.setattr(handler, "DEVICE_LOG_INTERVAL", 1.0)
    fd = os.open(small.at("base", "big"), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        fill(fd)
        fail_writes(fd, 5)
        assert len(handler_log()) == 1
        time.sleep(1.1)
        fail_writes(fd, 1)
    finally:
        os.close(fd)
    records = handler_log()
    assert len(records) == 2
    assert (
        "(5 more ENOSPC failures since the last such message" in records[1].getMessage()
    )


def test_store_eio_logged_as_error(small, handler_log, monkeypatch):
    with open(small.at("base", "file"), "wb") as f:
        f.write(b"data")

    def broken_read(*args, **kwargs):
        raise errors.StoreError("read of block 99 outside the data region")

    monkeypatch.setattr(small.store, "read", broken_read)
    fd = os.open(small.at("base", "file"), os.O_RDONLY | os.O_DIRECT)
    try:
        with pytest.raises(OSError) as info:
            os.read(fd, 4096)
    finally:
        os.close(fd)
    assert info.value.errno == errno.EIO
    records = handler_log()
    assert len(records) == 1
    assert records[0].levelno == logging.ERROR
    assert "block 99 outside the data region" in records[0].getMessage()
    assert "lcfs-fsck" in records[0].getMessage()


def test_expected_errnos_not_logged(small, handler_log):
    os.mkdir(small.at("base", "dir"))
    with open(small.at("base", "dir", "file"), "wb") as f:
        f.write(b"x")
    cases = [
        (errno.EEXIST, os.mkdir, small.at("base", "dir")),
        (errno.ENOTEMPTY, os.rmdir, small.at("base", "dir")),
        (errno.ENOENT, os.unlink, small.at("base", "missing")),
        (errno.ENOTDIR, os.listdir, small.at("base", "dir", "file")),
    ]
    for expected, func, path in cases:
        with pytest.raises(OSError) as info:
            func(path)
        assert info.value.errno == expected
    assert handler_log() == []


def test_write_after_delete_uses_freed_space(small):
    path = small.at("base", "big")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        fill(fd)
    finally:
        os.close(fd)
    os.unlink(path)
    # statfs counts the file's blocks as free once the kernel's FORGET for
    # its node has reached the daemon, a moment after the unlink.
    deadline = time.monotonic() + 5
    while os.statvfs(small.path).f_bfree < 128 and time.monotonic() < deadline:
        time.sleep(0.01)
    # The freed blocks become free at the next commit, about a second away,
    # so the write only succeeds if the daemon commits when it needs them.
    fd = os.open(small.at("base", "next"), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, b"z" * CHUNK)
    finally:
        os.close(fd)
    assert written == CHUNK


def test_many_small_files_fit_metadata_area(tmp_path, monkeypatch):
    # Only the size of the open group, not the clock, may start a commit.
    monkeypatch.setattr(mount, "COMMIT_INTERVAL", 3600.0)
    image = str(tmp_path / "metadata.img")
    Store.mkfs(image, size=64 << 20)
    with mount_store(image) as handle:
        directory = handle.at("base", "d")
        os.mkdir(directory)
        for index in range(10_000):
            with open(os.path.join(directory, f"f{index}"), "wb") as f:
                f.write(b"x" * 100)
        assert len(os.listdir(directory)) == 10_000
        used, total = handle.store.metadata_usage()
        assert used < total // 2


@pytest.fixture
def small_host(tmp_path):
    """A 40 MiB tmpfs for a sparse 1 GiB image file."""
    with tmpfs_at(tmp_path / "host", "40m") as host:
        yield str(host)


def test_full_host_keeps_accepted_writes(small_host):
    """Writes the mount accepted survive when the file system under the image fills up."""
    image = os.path.join(small_host, "lcfs.img")
    Store.mkfs(image, size=1 << 30, metadata_size=16 << 20)
    accepted: dict[str, int] = {}
    with mount_store(image) as mounted:
        # Files of 1 MiB until a write fails because the host is full.
        for number in range(64):
            name = f"f{number}"
            fd = os.open(mounted.at("base", name), os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                for _ in range((1 << 20) // CHUNK):
                    accepted[name] = accepted.get(name, 0) + os.write(fd, b"d" * CHUNK)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
            finally:
                os.close(fd)
        else:
            pytest.fail("64 MiB of writes fit on a 40 MiB file system")
        assert sum(accepted.values()) > 8 << 20
        # The group of all those writes commits on the full host.
        mounted.store.commit()
        assert os.statvfs(small_host).f_bavail * os.statvfs(small_host).f_frsize < 1 << 20
        # Removing files works there too, and gives their blocks back.
        for name in list(accepted)[:4]:
            os.unlink(mounted.at("base", name))
            del accepted[name]
        mounted.store.commit()
        with open(mounted.at("base", "after"), "wb") as f:
            f.write(b"a" * (1 << 20))
        accepted["after"] = 1 << 20
        mounted.reopen()
        for name, size in accepted.items():
            with open(mounted.at("base", name), "rb") as f:
                data = f.read()
            assert len(data) == size, name
            assert data == (b"a" if name == "after" else b"d") * size, name
