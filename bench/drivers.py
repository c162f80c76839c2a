"""One dockerd per storage driver, each with its own data root and network namespace.

``DriverStack`` starts Debian's dockerd 20.10 (tests/dockerd.py: its own
--data-root, --exec-root, socket and pid file under a work directory,
`unshare --net`) with one of the storage drivers compared here:

- ``lcfs``: an `lcfs daemon` (tests/lcfs_daemon.py) with its own sparse
  image file, registered as a graphdriver plugin; it mounts at the Home
  that dockerd's Init names, as in production.
- ``lcfs-shared``: the same with `--share-unchanged`, which serves the
  unchanged files of an image through one kernel inode for all its
  containers.
- ``overlay2``: kernel overlayfs, built into dockerd.
- ``fuse-overlayfs``: dockerd's built-in driver that mounts with Debian's
  fuse-overlayfs binary.
- ``vfs``: full copies, built into dockerd.

Stopping a stack stops dockerd (which sends the plugin's Cleanup), then the
lcfs daemon, unmounts whatever is left under the work directory and deletes
the data roots and the image file; the daemons' logs stay.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Self

from dockerd import DockerDaemon, remove_stale_plugin_specs
from lcfs_daemon import LcfsDaemon
from mounts import unmount_under

log = logging.getLogger(__name__)

DRIVERS = ("overlay2", "fuse-overlayfs", "vfs", "lcfs", "lcfs-shared")

# `lcfs daemon` options of each lcfs variant.
LCFS_OPTIONS = {"lcfs": (), "lcfs-shared": ("--share-unchanged",)}
REFERENCE = "overlay2"

# Sparse image file size of the lcfs store; only written blocks use disk.
LCFS_DEVICE_SIZE = "64G"


class DriverStack:
    """A running dockerd with one storage driver, and the lcfs daemon behind it if any."""

    def __init__(self, driver: str, workdir: Path):
        if driver not in DRIVERS:
            raise ValueError(
                f"unknown storage driver {driver!r}: use one of {', '.join(DRIVERS)}"
            )
        self.driver = driver
        self.workdir = workdir
        self.lcfs: LcfsDaemon | None = None
        self.dockerd: DockerDaemon | None = None

    def start(self) -> DriverStack:
        """Start the daemons; on failure stop whatever started and re-raise."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            if self.driver in LCFS_OPTIONS:
                remove_stale_plugin_specs()
                self.lcfs = LcfsDaemon(
                    self.workdir / "lcfs",
                    size=LCFS_DEVICE_SIZE,
                    options=LCFS_OPTIONS[self.driver],
                ).start()
                self.dockerd = DockerDaemon(
                    self.workdir / "dockerd", plugin_socket=self.lcfs.socket_path
                )
            else:
                if (
                    self.driver == "fuse-overlayfs"
                    and shutil.which("fuse-overlayfs") is None
                ):
                    raise RuntimeError(
                        "fuse-overlayfs is not installed: apt-get install fuse-overlayfs"
                    )
                self.dockerd = DockerDaemon(
                    self.workdir / "dockerd", storage_driver=self.driver
                )
            self.dockerd.start()
        except BaseException:
            self.stop()
            raise
        reported = self.dockerd.docker("info", "--format", "{{.Driver}}").stdout.strip()
        if reported != self.dockerd.storage_driver:
            self.stop()
            raise RuntimeError(
                f"dockerd reports storage driver {reported!r}, "
                f"expected {self.dockerd.storage_driver!r}"
            )
        log.info("%s stack ready in %s", self.driver, self.workdir)
        return self

    @property
    def daemon_pid(self) -> int | None:
        """The pid of the lcfs daemon, or None for the built-in drivers."""
        if self.lcfs is None or self.lcfs.process is None:
            return None
        return self.lcfs.process.pid

    def docker(self, *args: str, **kwargs):
        """Run the 20.10 docker client against this stack's dockerd."""
        return self.dockerd.docker(*args, **kwargs)

    def stop(self) -> None:
        """Stop dockerd, then the lcfs daemon; delete their data but keep their logs."""
        try:
            if self.dockerd is not None:
                self.dockerd.stop()
        finally:
            if self.lcfs is not None:
                self.lcfs.stop()
                unmount_under(self.lcfs.workdir)
                self.lcfs.device.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
