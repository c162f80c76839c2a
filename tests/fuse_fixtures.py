"""Fixtures for tests that mount a store through FUSE in the test process.

Each test gets a fresh store on a sparse image file and a real mount on a
directory under /tmp. The mount directory is world-traversable so that
tests can act as an unprivileged user through ``allow_other``. Teardown
unmounts even when the test failed, and detaches the mount itself if the
server could not.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import tempfile
from dataclasses import dataclass, field

import pytest

from lcfs.fuse import FuseServer, find_mount
from lcfs.fuse.settings import FuseSettings
from lcfs.store import Store

IMAGE_SIZE = 512 << 20
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)


def _detach(path: str) -> None:
    if _libc.umount2(os.fsencode(path), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount2 of {path} failed: {os.strerror(err)}")


def fuse_available() -> bool:
    return os.geteuid() == 0 and os.path.exists("/dev/fuse")


@dataclass
class Mounted:
    """A store mounted at ``path`` by ``server``; ``image`` is the store's device."""

    path: str
    image: str
    store: Store
    server: FuseServer
    settings: FuseSettings = field(default_factory=FuseSettings)

    def at(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    def reopen(self) -> None:
        """Unmount, close the store, open it again from the image and remount."""
        self.server.stop()
        self.store.close()
        self.store = Store.open(self.image)
        self.server = FuseServer(self.store, settings=self.settings,
                                 stats=self.server.stats)  # fmt: skip
        self.server.start(self.path)


@pytest.fixture
def lcfs_image(tmp_path) -> str:
    image = str(tmp_path / "store.img")
    Store.mkfs(image, size=IMAGE_SIZE)
    return image


@pytest.fixture
def mounted(lcfs_image):
    """A mount of a fresh store with one empty writable layer named ``base``."""
    with mount_store(lcfs_image) as handle:
        yield handle


@contextlib.contextmanager
def mount_store(image: str, settings: FuseSettings | None = None):
    """Mount the store on ``image``, adding an empty layer ``base`` if it has none."""
    if not fuse_available():
        pytest.skip("FUSE mounts need root and /dev/fuse")
    settings = settings or FuseSettings()
    store = Store.open(image)
    if not store.exists("base"):
        store.create_layer("base")
        store.commit()
    mountpoint = tempfile.mkdtemp(prefix="lcfs-test-mnt-")
    os.chmod(mountpoint, 0o755)
    server = FuseServer(store, settings=settings)
    handle = Mounted(mountpoint, image, store, server, settings)
    try:
        server.start(mountpoint)
        yield handle
    finally:
        try:
            handle.server.stop()
        finally:
            if find_mount(mountpoint) is not None:
                _detach(mountpoint)
            handle.store.close()
            # rmdir, not rmtree: it never reaches into a mount left behind.
            os.rmdir(mountpoint)
