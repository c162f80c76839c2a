"""Mount policy of the FUSE filesystem: which path, and when to mount and unmount.

Two modes:

* A fixed mount point (``lcfs daemon --mountpoint DIR``): mounted at start,
  kept until the daemon stops. Init only records Docker's Home, and Cleanup
  leaves the mount alone.
* Docker's Home: Init mounts at the Home it names (creating the directory),
  Cleanup unmounts, and the next Init mounts again. A daemon that restarts
  while dockerd runs mounts at the Home recorded by the last Init, because
  dockerd does not call Init again.

Every method blocks (mounting waits for the FUSE thread), so the plugin
server calls them from worker threads. One lock serialises them.
"""

import errno
import logging
import os
import subprocess
import threading
from collections.abc import Callable

from lcfs.fuse.mount import FSTYPE, FuseServer, check_mountpoint, find_mount
from lcfs.fuse.settings import FuseSettings
from lcfs.fuse.stats import RequestStats
from lcfs.fuse.watchdog import detach, unescape_mountinfo

log = logging.getLogger(__name__)


class MountError(Exception):
    """The filesystem could not be mounted or unmounted at a path."""


def _is_disconnected(path: str) -> bool:
    # statfs always reaches the FUSE server, where stat may be answered from
    # the kernel's attribute cache even after the server is gone.
    try:
        os.statvfs(path)
    except OSError as error:
        return error.errno == errno.ENOTCONN
    return False


def detach_stale_mount(path: str) -> None:
    """Detach an lcfs mount at ``path`` whose FUSE server has died.

    A FUSE server killed without unmounting (SIGKILL, a crash) leaves its
    mount point returning ENOTCONN to every access. Mounting on top of it
    would hide the problem rather than fix it. Only an lcfs mount in that
    state is detached, with ``fusermount3 -u -z``.
    """
    if find_mount(path, FSTYPE) is None or not _is_disconnected(path):
        return
    log.warning("detaching stale lcfs mount at %s left by a dead daemon", path)
    result = subprocess.run(
        ["fusermount3", "-u", "-z", path], check=False, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise MountError(
            f"cannot detach the stale lcfs mount at {path}: "
            f"{result.stderr.strip() or 'fusermount3 failed'}; unmount it by hand"
        )


def _mount_table() -> list[tuple[str, str]]:
    """Return (mount point, filesystem type) of every mount, in the order mounted."""
    table = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            separator = fields.index("-")
            table.append((unescape_mountinfo(fields[4]), fields[separator + 1]))
    return table


def is_mount_point(path: str) -> bool:
    path = os.path.abspath(path)
    return any(point == path for point, _ in _mount_table())


def is_hidden(path: str) -> bool:
    """Return True if the lcfs mount at ``path`` is covered by a later mount.

    dockerd bind-mounts its data root over itself at start when the root is
    not a mount point already; an lcfs mount made below it before that is
    hidden from every process, dockerd and runc included.
    """
    path = os.path.abspath(path)
    table = _mount_table()
    ours = [i for i, (point, fstype) in enumerate(table) if point == path and fstype == FSTYPE]
    if not ours:
        return False
    for point, _ in table[ours[-1] + 1 :]:
        if point == path or path.startswith(point.rstrip("/") + "/"):
            return True
    return False


class MountManager:
    """Mounts the store's FUSE filesystem at the fixed mount point or Docker's Home."""

    def __init__(
        self,
        store,
        fixed_mountpoint: str | None,
        fuse_factory: Callable = FuseServer,
        fuse_settings: FuseSettings | None = None,
    ):
        self._store = store
        self._fuse_settings = fuse_settings or FuseSettings()
        # FUSE request counters of every mount this manager makes.
        self.stats = RequestStats()
        self._fixed = os.path.abspath(fixed_mountpoint) if fixed_mountpoint else None
        self._fuse_factory = fuse_factory
        self._lock = threading.Lock()
        self._server = None
        self._mountpoint: str | None = None
        # An O_PATH descriptor of the mount point's parent directory, opened
        # when mounting. A path through it reaches the mount even after a
        # later mount over a parent directory hides it. It keeps the parent's
        # mount in use, not the lcfs mount, so an unmount of lcfs still works.
        self._parent_fd: int | None = None

    @property
    def mountpoint(self) -> str | None:
        """The path the filesystem is mounted at now, or None."""
        return self._mountpoint

    @property
    def fixed(self) -> bool:
        """Whether the mount point was given at start and is kept until the end."""
        return self._fixed is not None

    def start(self, stored_home: str | None) -> None:
        """Mount at the fixed mount point, or else at the Home of an earlier Init."""
        with self._lock:
            if self._fixed is not None:
                self._mount(self._fixed)
            elif stored_home:
                docker_root = os.path.dirname(os.path.abspath(stored_home))
                if not is_mount_point(docker_root):
                    # dockerd is not running: its start would bind-mount its
                    # root over itself and hide a mount made now.
                    log.info(
                        "not mounting at Docker's Home %s until Init: %s is not "
                        "mounted yet, so dockerd is not running",
                        stored_home,
                        docker_root,
                    )
                    return
                log.info("mounting at Docker's Home %s recorded by Init", stored_home)
                self._mount(stored_home)

    def init(self, home: str) -> None:
        """Mount at ``home`` unless a fixed mount point is in use."""
        with self._lock:
            if self._fixed is not None:
                return
            if self._mountpoint == home:
                if not is_hidden(home):
                    return
                log.warning(
                    "the lcfs mount at %s is hidden by a mount made over Docker's "
                    "root after it; mounting again",
                    home,
                )
                self._detach_hidden()
                self._unmount()
            if self._mountpoint is not None:
                log.info("Home moved from %s to %s", self._mountpoint, home)
                self._unmount()
            self._mount(home)

    def cleanup(self) -> None:
        """Unmount the filesystem mounted at Docker's Home; keep a fixed mount."""
        with self._lock:
            if self._fixed is None:
                self._unmount()

    def stop(self) -> None:
        """Unmount whatever is mounted."""
        with self._lock:
            self._unmount()

    def notify_layer_removed(self, layer_id: str) -> None:
        """Tell the FUSE frontend to drop what the kernel caches about a layer."""
        server = self._server
        if server is not None:
            server.notify_layer_removed(layer_id)
        # Layer numbers never come back, so only live layers stay in the
        # record, which otherwise grows by every layer the daemon served.
        live_numbers = {layer.number for layer in self._store.list_layers()}
        self.stats.layers_looked_up.intersection_update(live_numbers)

    def _mount(self, path: str) -> None:
        path = os.path.abspath(path)
        detach_stale_mount(path)
        # Checked before the directory is made, so that a Home inside another
        # daemon's mount leaves nothing behind in that daemon's layers.
        try:
            check_mountpoint(path)
        except RuntimeError as error:
            raise MountError(f"cannot mount lcfs at {path}: {error}") from None
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except OSError as error:
            raise MountError(f"cannot create mount point {path}: {error}") from error
        server = self._fuse_factory(
            self._store, settings=self._fuse_settings, stats=self.stats
        )
        try:
            server.start(path)
        except Exception as error:
            server.stop()
            raise MountError(f"cannot mount lcfs at {path}: {error}") from error
        self._server = server
        self._mountpoint = path
        try:
            self._parent_fd = os.open(os.path.dirname(path), os.O_PATH | os.O_CLOEXEC)
        except OSError as error:
            log.warning("cannot open the parent directory of %s (%s); a later "
                        "mount over it would leave this mount hidden", path, error)  # fmt: skip

    def _detach_hidden(self) -> None:
        """Detach the lcfs mount that a later mount over a parent directory hides.

        umount2(2) of the mount point reaches the covering mount instead,
        so the path goes through the descriptor of the parent directory
        opened at mount time. The FUSE thread then ends with the session.
        """
        if self._parent_fd is None or self._mountpoint is None:
            return
        name = os.path.basename(self._mountpoint)
        path = f"/proc/self/fd/{self._parent_fd}/{name}"
        try:
            detach(path)
        except OSError as error:
            log.warning("detaching the hidden lcfs mount at %s failed: %s",
                        self._mountpoint, error.strerror)  # fmt: skip
        else:
            log.info("detached the hidden lcfs mount at %s", self._mountpoint)

    def _unmount(self) -> None:
        server, path = self._server, self._mountpoint
        if self._parent_fd is not None:
            os.close(self._parent_fd)
            self._parent_fd = None
        if server is None:
            return
        self._server = None
        self._mountpoint = None
        try:
            server.stop()
        except Exception as error:
            raise MountError(f"cannot unmount lcfs from {path}: {error}") from error
