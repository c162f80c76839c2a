"""Running the FUSE mount of a store on its own thread.

pyfuse3 keeps its session in module globals, so a process can serve only one
mount at a time. ``FuseServer`` enforces that, serves requests on a
dedicated thread together with the group commit, and can be started and
stopped repeatedly (the daemon mounts on Init and unmounts on Cleanup).

With the pyfuse3 that ``scripts/build_pyfuse3.py`` builds, that thread runs
a plain loop: poll the FUSE device, process one request with
``pyfuse3.lcfs_process_one``, and commit once a second has passed.
pyfuse3's own loop passes every request through trio's scheduler. On a
2-vCPU VM a getxattr cost the daemon about 99 µs of CPU there and 61 µs on
the plain loop. The trio loop still serves with a stock pyfuse3, and with
invalidate-on-close, because that release handler waits for a worker thread.

The mount does not use ``auto_unmount``: with libfuse 3.14 that option mounts
through fusermount3, which forces nosuid and nodev, and containers need
setuid binaries and device nodes. A watchdog process (``watchdog.py``)
takes its place: it detaches the mount when the serving process dies.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import select
import subprocess
import sys
import threading
import time

import pyfuse3
import trio

from . import watchdog
from .operations import COMMIT_INTERVAL, KERNEL_CACHES, LayerOperations
from .settings import FuseSettings
from .stats import RequestStats

log = logging.getLogger(__name__)

FSNAME = "lcfs"
FSTYPE = "fuse." + FSNAME

MOUNT_OPTIONS = frozenset(
    {
        "allow_other",
        "suid",
        "dev",
        "default_permissions",
        "noatime",
        f"fsname={FSNAME}",
        f"subtype={FSNAME}",
    }
)

START_TIMEOUT = 10.0

# Seconds to wait for the watchdog to exit after the mount is gone.
WATCHDOG_EXIT_TIMEOUT = 5.0

# Seconds a layer change waits for the kernel to take the notice that
# drops the layer's entry or the root's listing. An entry notice waits for
# requests in flight on the mount root, which finish in milliseconds.
INVALIDATE_WAIT = 5.0

# Whether pyfuse3 can process one request outside its trio loop.
PLAIN_LOOP = hasattr(pyfuse3, "lcfs_process_one")

# The init flag (of the kernel's protocol) that leaves clearing setuid and
# setgid on write, truncate and chown to the filesystem, which
# LayerOperations does (lcfs.fuse.privileges). Without it the kernel sends
# a getattr before every chown. libfuse 3.14 cannot ask for it, so the
# rebuilt pyfuse3 adds it to libfuse's init reply.
FUSE_HANDLE_KILLPRIV_V2 = 1 << 28
KILLPRIV_HOOK = hasattr(pyfuse3, "lcfs_want_init_flags")

_active_lock = threading.Lock()
_active_server: FuseServer | None = None


def _mount_table() -> list[tuple[str, str, str]]:
    """Return (mount point, filesystem type, device number) of every mount.

    The order is /proc/self/mountinfo's, in which later lines are mounted on
    top of earlier ones.
    """
    table = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            separator = fields.index("-")
            point = watchdog.unescape_mountinfo(fields[4])
            table.append((point, fields[separator + 1], fields[2]))
    return table


def find_mount(mountpoint: str, fstype: str = FSTYPE) -> str | None:
    """Return the device number (``major:minor``) of the top mount of ``fstype``
    at ``mountpoint``, or None when there is none."""
    mountpoint = os.path.realpath(mountpoint)
    found = None
    for point, point_fstype, device in _mount_table():
        if point == mountpoint and point_fstype == fstype:
            found = device
    return found


def find_live_mount(mountpoint: str) -> str | None:
    """Return the device number of a served lcfs mount at ``mountpoint``, or None.

    A mount whose server has died (statfs fails with ENOTCONN) is not live,
    and neither is one that a later mount over the path or a parent hides.
    """
    device = find_mount(mountpoint)
    if device is None:
        return None
    try:
        # statfs always reaches the FUSE server, but stat may return the
        # kernel's cached attributes after the server is gone.
        os.statvfs(mountpoint)
        visible = os.stat(mountpoint).st_dev
    except OSError as error:
        if error.errno in (errno.ENOTCONN, errno.ECONNABORTED):
            return None
        raise
    if f"{os.major(visible)}:{os.minor(visible)}" != device:
        return None
    return device


def find_live_mount_above(path: str) -> str | None:
    """Return the mount point of the live lcfs mount that ``path`` lies inside, or None.

    ``path`` lies inside the last mount, in mount order, whose mount point is
    one of its parent directories, because a later mount on a parent
    directory hides every earlier one below it. ``find_live_mount`` checks
    a mount at ``path`` itself.
    """
    path = os.path.realpath(path)
    enclosing = None
    for point, fstype, _ in _mount_table():
        if point != path and path.startswith(point.rstrip("/") + "/"):
            enclosing = (point, fstype)
    if enclosing is None or enclosing[1] != FSTYPE:
        return None
    if find_live_mount(enclosing[0]) is None:
        return None
    return enclosing[0]


def check_mountpoint(mountpoint: str) -> None:
    """Raise RuntimeError if ``mountpoint`` is on or inside a live lcfs mount.

    A mount there would hide the layers of the daemon that serves it.
    """
    mountpoint = os.path.realpath(mountpoint)
    live = find_live_mount(mountpoint)
    if live is not None:
        raise RuntimeError(
            f"another lcfs mount (device {live}) is live at {mountpoint}; "
            "stop the daemon that serves it, or choose another mount point"
        )
    above = find_live_mount_above(mountpoint)
    if above is not None:
        raise RuntimeError(
            f"mount point {mountpoint} is inside the live lcfs mount at {above}, "
            "and a mount there would hide its layers; choose a mount point "
            "outside it"
        )


def _init_session(operations, mountpoint: str, options: frozenset[str]) -> None:
    try:
        pyfuse3.init(operations, mountpoint, set(options))
    except RuntimeError as exc:
        # pyfuse3 leaves a created session behind when only the mount failed.
        if "fuse_session_mount" in str(exc):
            pyfuse3.close(unmount=False)
        raise RuntimeError(
            f"mount of lcfs at {mountpoint} failed ({exc}); libfuse wrote the "
            "reason to standard error"
        ) from exc
    if not KILLPRIV_HOOK:
        operations.skip_opens = False
        return
    if operations.skip_opens:
        pyfuse3.lcfs_serve_without_opens()
    try:
        pyfuse3.lcfs_want_init_flags(FUSE_HANDLE_KILLPRIV_V2)
        if PLAIN_LOOP and not operations.settings.invalidate_on_close:
            operations.write_context = pyfuse3.lcfs_write_context
    except OSError as exc:
        # The daemon clears setuid itself either way, so the mount works,
        # only with a getattr before every chown, and with open requests,
        # because the hooks that serve files without them are missing.
        operations.skip_opens = False
        log.warning("request of FUSE_HANDLE_KILLPRIV_V2 for %s failed: %s",
                    mountpoint, exc)  # fmt: skip


class _EntryInvalidator:
    """A thread that sends the kernel notices to drop directory entries.

    ``pyfuse3.invalidate_entry`` blocks while a request on the same directory
    is in flight, so it cannot run on the trio thread. pyfuse3's own
    ``invalidate_entry_async`` thread ends with the first main loop and is
    never restarted, so a remount could not use it.
    """

    def __init__(self, mountpoint: str):
        self._mountpoint = mountpoint
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._run, name=f"lcfs-fuse-invalidate {mountpoint}", daemon=True
        )
        self._thread.start()

    def invalidate(self, parent: int, name: bytes) -> threading.Event:
        """Queue a notice to drop an entry; the event is set once it has been sent."""
        return self._put(pyfuse3.invalidate_entry, parent, name)

    def invalidate_inode(self, node: int) -> threading.Event:
        """Queue a notice to drop a node's cached attributes and its listing or pages."""
        return self._put(pyfuse3.invalidate_inode, node, False)

    def _put(self, notice, *args) -> threading.Event:
        done = threading.Event()
        self._queue.put((notice, args, done))
        return done

    def stop(self) -> None:
        """Finish the queued work and end the thread; call while main() runs."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            notice, args, done = item
            try:
                notice(*args)
            except FileNotFoundError:
                pass  # the kernel had nothing cached for it
            except OSError as exc:
                log.warning("%s%r at %s failed: %s", notice.__name__, args,
                            self._mountpoint, exc)  # fmt: skip
            finally:
                done.set()


class _Watchdog:
    """A process started by exec that detaches a mount once this process is gone.

    Its standard input is a pipe whose only write end this process holds:
    the descriptor is close-on-exec and every child is started with
    close_fds, so no other process keeps it open. Closing it, or dying,
    makes the watchdog check that the same FUSE mount (the same device
    number) is still at the path and detach it.
    """

    def __init__(self, mountpoint: str, device: str):
        read_end, self._write_end = os.pipe()
        # The watchdog reaches the mount through its parent directory even
        # when a later mount over a parent hides it (watchdog.py).
        parent_fd = os.open(os.path.dirname(mountpoint), os.O_PATH | os.O_CLOEXEC)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-I", watchdog.__file__, mountpoint, device, str(parent_fd)],
                stdin=read_end,
                stdout=subprocess.DEVNULL,
                close_fds=True,
                pass_fds=(parent_fd,),
                start_new_session=True,
            )
        except BaseException:
            os.close(self._write_end)
            raise
        finally:
            os.close(read_end)
            os.close(parent_fd)
        log.info("started watchdog pid %d for %s (device %s)", self.process.pid,
                 mountpoint, device)

    def stop(self) -> None:
        """Close the pipe and wait for the watchdog; call after unmounting."""
        if self._write_end is not None:
            os.close(self._write_end)
            self._write_end = None
        try:
            self.process.wait(WATCHDOG_EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.warning("watchdog pid %d did not exit within %.0f s; killing it",
                        self.process.pid, WATCHDOG_EXIT_TIMEOUT)
            self.process.kill()
            self.process.wait()


class FuseServer:
    """The FUSE mount of one store, served on a thread of its own.

    ``stats`` counts the requests of every mount this server makes; pass
    one ``RequestStats`` to several servers to count them together.
    """

    def __init__(self, store, options: frozenset[str] = MOUNT_OPTIONS,
                 settings: FuseSettings | None = None,
                 stats: RequestStats | None = None):  # fmt: skip
        self.store = store
        self.options = options
        self.settings = settings or FuseSettings()
        self.stats = stats or RequestStats()
        self.mountpoint: str | None = None
        self.operations: LayerOperations | None = None
        self.watchdog: _Watchdog | None = None
        self._thread: threading.Thread | None = None
        self._invalidator: _EntryInvalidator | None = None
        # The root listing's notices go on a thread of their own, because
        # the store sends them under its lock. Behind an entry notice, which
        # waits for FUSE requests on the root that may wait for that lock,
        # they would hold every request up until INVALIDATE_WAIT ran out.
        self._listing_invalidator: _EntryInvalidator | None = None
        self._trio_token = None
        # The pipe that wakes the plain loop to stop: (read end, write end).
        self._wake: tuple[int, int] | None = None
        self._loop_started = threading.Event()
        self._lock = threading.Lock()
        # The device number of the mount, to tell after an unmount whether
        # it is still mounted (hidden, for example).
        self._device: str | None = None

    @property
    def request_loop(self) -> str:
        """The loop that serves the mount: "plain", or "trio" for pyfuse3's own."""
        return "plain" if self._wake is not None else "trio"

    @property
    def running(self) -> bool:
        """Whether the FUSE main loop is serving requests."""
        return self._thread is not None and self._thread.is_alive()

    def start(self, mountpoint: str, timeout: float = START_TIMEOUT) -> None:
        """Mount the store at ``mountpoint`` and return once requests are served.

        Raises RuntimeError when this server or another one in the process is
        already mounted, or when the mount does not come up within
        ``timeout`` seconds.
        """
        global _active_server
        mountpoint = os.path.realpath(mountpoint)
        if self._thread is not None and not self._thread.is_alive():
            self.stop()  # the mount ended on its own, for example by umount
        with self._lock, _active_lock:
            if _active_server is not None:
                raise RuntimeError(
                    f"cannot mount lcfs at {mountpoint}: this process already serves "
                    f"the mount at {_active_server.mountpoint}; stop it first"
                )
            check_mountpoint(mountpoint)
            initialized = threading.Event()
            operations = LayerOperations(self.store, initialized, self.settings, self.stats)
            _init_session(operations, mountpoint, self.options)
            _active_server = self
            self.mountpoint = mountpoint
            self.operations = operations
            self._trio_token = None
            if PLAIN_LOOP and not self.settings.invalidate_on_close:
                self._wake = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            self._loop_started.clear()
            self._invalidator = _EntryInvalidator(mountpoint)
            self._listing_invalidator = _EntryInvalidator(mountpoint)
            operations.invalidate_node = self._invalidator.invalidate_inode
            self.store.layers_changed = self._layers_changed
            self._thread = threading.Thread(
                target=self._serve, name=f"lcfs-fuse {mountpoint}", daemon=True
            )
            self._thread.start()
        try:
            self._wait_until_live(initialized, timeout)
            device = find_mount(mountpoint)
            self._device = device
            if self.settings.watchdog:
                self.watchdog = _Watchdog(mountpoint, device)
        except BaseException:
            self.stop()
            raise
        read_ahead = self._set_read_ahead(device)
        log.info("mounted lcfs at %s (device %s, options %s, direct I/O %s, "
                 "invalidate on close %s, share unchanged %s, kernel symlink and "
                 "directory caches %s, read-ahead %s, request loop %s, setuid "
                 "clearing by %s, open requests %s)", mountpoint,
                 device, ",".join(sorted(self.options)), self.settings.direct_io,
                 "on" if self.settings.invalidate_on_close else "off",
                 "on" if self.settings.share_unchanged else "off",
                 "on" if KERNEL_CACHES else "off (stock pyfuse3)", read_ahead,
                 self.request_loop, self.privilege_clearing,
                 "skipped" if operations.skip_opens else "served")  # fmt: skip

    @property
    def privilege_clearing(self) -> str:
        """Who clears setuid and setgid on chown: "lcfs" or "the kernel"."""
        if KILLPRIV_HOOK and pyfuse3.lcfs_init_flags()[1] & FUSE_HANDLE_KILLPRIV_V2:
            return "lcfs"
        return "the kernel"

    def _set_read_ahead(self, device: str) -> str:
        """Set the kernel's read-ahead of the new mount; return what it is, for the log."""
        path = f"/sys/class/bdi/{device}/read_ahead_kb"
        requested = self.settings.read_ahead_kb
        try:
            if requested:
                with open(path, "w") as f:
                    f.write(str(requested))
            with open(path) as f:
                return f"{f.read().strip()} KiB"
        except OSError as error:
            log.warning("setting the read-ahead of %s to %d KiB in %s failed: %s; "
                        "the kernel's value stays", self.mountpoint, requested, path,
                        error)  # fmt: skip
            return "unknown"

    def _wait_until_live(self, initialized: threading.Event, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not initialized.wait(0.05):
            if not self._thread.is_alive():
                raise RuntimeError(f"FUSE main loop for {self.mountpoint} ended "
                                   "before the kernel handshake; see the log")
            if time.monotonic() > deadline:
                raise RuntimeError(f"mount of lcfs at {self.mountpoint} timed out "
                                   f"after {timeout:.0f} s")
        if find_mount(self.mountpoint) is None:
            raise RuntimeError(f"mount of lcfs at {self.mountpoint} is missing from "
                               "/proc/self/mountinfo")

    def stop(self) -> None:
        """Unmount and wait for the FUSE thread to end; a no-op when stopped."""
        global _active_server
        with self._lock:
            thread = self._thread
            if thread is None:
                return
            mountpoint = self.mountpoint
            log.info("unmounting lcfs from %s", mountpoint)
            self.store.layers_changed = None
            if thread.is_alive():
                # Invalidations need the main loop, so they stop before it.
                self._invalidator.stop()
                self._listing_invalidator.stop()
                self._loop_started.wait(START_TIMEOUT)
                if self._wake is not None:
                    os.write(self._wake[1], b"x")
                else:
                    try:
                        trio.from_thread.run_sync(pyfuse3.terminate,
                                                  trio_token=self._trio_token)
                    except trio.RunFinishedError:
                        pass  # the loop ended on its own, for example after umount
            thread.join()
            if self._wake is not None:
                for fd in self._wake:
                    os.close(fd)
                self._wake = None
            if self.watchdog is not None:
                self.watchdog.stop()
                self.watchdog = None
            self._thread = None
            self.operations = None
            with _active_lock:
                if _active_server is self:
                    _active_server = None

    def notify_layer_removed(self, layer_id: str) -> None:
        """Make the kernel forget a removed layer's directory and everything under it.

        Returns once the kernel has the notice, so that a layer created
        again under the same id is looked up anew. Call it from any thread
        but the FUSE loop's, without holding the store lock; it is a no-op
        when no mount is running.
        """
        invalidator = self._invalidator
        if invalidator is None or not self.running:
            return
        done = invalidator.invalidate(pyfuse3.ROOT_INODE, os.fsencode(layer_id))
        self._wait(done, f"the entry of removed layer {layer_id}")

    def _layers_changed(self) -> None:
        """Make the kernel list the mount root again after a layer is created or dropped.

        The kernel keeps the root's listing when pyfuse3 has KERNEL_CACHES.
        Until a process lists the root, the kernel keeps no listing to drop,
        so layer creates and removes skip the notice and the wait. dockerd
        works through the paths that Get returns and does not list it.
        The store calls this under its lock.
        NOTE: that relies on invalidate_inode, unlike invalidate_entry, not
        waiting for FUSE requests in flight, which the tests bear out but no
        kernel documentation states; INVALIDATE_WAIT bounds the wait if not.
        """
        invalidator = self._listing_invalidator
        operations = self.operations
        if invalidator is None or not self.running or not operations.root_listed:
            return
        operations.root_listed = False
        done = invalidator.invalidate_inode(pyfuse3.ROOT_INODE)
        self._wait(done, "the listing of the mount root")

    def _wait(self, done: threading.Event, notice: str) -> None:
        if not done.wait(INVALIDATE_WAIT):
            log.warning("dropping %s at %s timed out after %d s; the kernel may "
                        "show it until its cache expires", notice, self.mountpoint,
                        INVALIDATE_WAIT)  # fmt: skip

    def _serve(self) -> None:
        mountpoint = self.mountpoint
        operations = self.operations
        try:
            if self._wake is not None:
                self._plain_loop(operations, self._wake[0])
            else:
                trio.run(self._main_loop, operations)
        except BaseException:
            log.exception("FUSE main loop for %s failed", mountpoint)
        finally:
            self._invalidator.stop()
            self._listing_invalidator.stop()
            try:
                operations.shutdown()
            except Exception:
                log.exception("final commit for %s failed", mountpoint)
            try:
                pyfuse3.close(unmount=True)
            except Exception:
                log.exception("unmount of lcfs from %s failed", mountpoint)
            else:
                self._log_unmount(mountpoint)

    def _log_unmount(self, mountpoint: str) -> None:
        # libfuse reports a failed unmount only on standard error. Bind
        # mounts of a layer directory, such as the root filesystem that
        # containerd mounts for each container of a snapshot, stay after the
        # unmount and keep the same device number.
        points = [point for point, _, device in _mount_table() if device == self._device]
        if os.path.realpath(mountpoint) in points:
            log.error("lcfs is still mounted at %s (device %s) after the "
                      "unmount; detach it with umount -l", mountpoint,
                      self._device)  # fmt: skip
        elif points:
            log.warning("unmounted lcfs from %s, but %d bind mounts of its layers "
                        "remain (%s), and reads there fail with 'transport endpoint "
                        "is not connected': stop the containers that use them, or "
                        "detach them with umount -l", mountpoint, len(points),
                        ", ".join(points[:3]) + (", ..." if len(points) > 3 else ""))  # fmt: skip
        else:
            log.info("unmounted lcfs from %s", mountpoint)

    def _plain_loop(self, operations: LayerOperations, wake_read: int) -> None:
        """Process requests one at a time until stop() or the end of the session."""
        device = pyfuse3.lcfs_session_fd()
        # lcfs_process_one reads the device while it holds the GIL. A process
        # killed after poll() reported its request takes the request back,
        # and a blocking read would then stop every thread of the daemon
        # until the next request. With O_NONBLOCK the read fails with
        # EAGAIN instead, which lcfs_process_one ignores.
        os.set_blocking(device, False)
        poller = select.poll()
        poller.register(device, select.POLLIN)
        poller.register(wake_read, select.POLLIN)
        self._loop_started.set()
        next_commit = time.monotonic() + COMMIT_INTERVAL
        while True:
            wait_ms = max(0.0, next_commit - time.monotonic()) * 1000
            ready = self._wait_for_request(poller, wait_ms)
            if time.monotonic() >= next_commit:
                operations.commit_pending()
                next_commit = time.monotonic() + COMMIT_INTERVAL
            if any(fd == wake_read for fd, _ in ready):
                return
            if ready and not pyfuse3.lcfs_process_one():
                return  # the kernel ended the session, for example on umount

    @staticmethod
    def _wait_for_request(poller: select.poll, wait_ms: float) -> list[tuple[int, int]]:
        """Return the ready descriptors among the FUSE device and the wake pipe.

        A function of its own, so that profiles of the daemon can tell this
        wait from the loop's work (bench/profiling.py).
        """
        return poller.poll(wait_ms)

    async def _main_loop(self, operations: LayerOperations) -> None:
        self._trio_token = trio.lowlevel.current_trio_token()
        self._loop_started.set()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(operations.run_commits)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
