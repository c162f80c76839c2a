"""The ``lcfs daemon`` process: one store, its FUSE mount and its sockets.

The daemon serves Docker's graphdriver plugin protocol on one socket,
containerd's Snapshots gRPC service on another (``--snapshotter-socket``),
or both. With the snapshotter the FUSE mount point is fixed from start to
stop, because containers keep bind mounts of snapshot directories for as
long as they run.

Start order: claim the socket path (failing when another live process
serves it), check the pid file, the device and the mount point, open the
device, write the pid file, mount, then listen. The pid file is written only
once the daemon has locked the device, so a start that fails on a busy
device leaves the running daemon's pid file alone. It replaces only a pid
file, never the device or a file with other contents. On first start the
image file is created and formatted, and a start that fails before it
listens removes that file again. Every open runs journal recovery. Stop
order on SIGTERM or SIGINT: stop listening and finish the requests in
flight, wait for their worker threads, unmount, commit, close the store,
remove the socket, and remove the pid file if it still contains this
daemon's pid.

Threads: the event loop (this module and the plugin server) runs on the
main thread, FUSE runs its own trio thread, and store calls run on an
executor whose threads the loop waits for before the store is closed.
"""

import asyncio
import contextlib
import errno
import logging
import os
import re
import signal
import socket
import stat
import struct
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from aiohttp import web

from lcfs.fuse.mount import check_mountpoint
from lcfs.fuse.settings import FuseSettings
from lcfs.store import Store, errors
from lcfs.store.format import is_under_dev, missing_device_message

from .mounts import MountError, MountManager
from .reconcile import _pid_alive, docker_root_from_home, find_orphans
from .server import GraphDriverPlugin

log = logging.getLogger(__name__)

DEFAULT_DEVICE = "/var/lib/lcfs/lcfs.img"
DEFAULT_SIZE = 64 * 1024**3
DEFAULT_SOCKET = "/run/docker/plugins/lcfs.sock"
# The FUSE mount point when the containerd snapshotter runs and no
# --mountpoint is given.
DEFAULT_SNAPSHOTTER_MOUNTPOINT = "/var/lib/lcfs/mnt"

# Threads serving store calls. Each request uses one for the length of a
# store call. Diff and ApplyDiff, the long calls, run on threads of their own.
STORE_THREADS = 16

# Seconds that a stopping daemon waits for requests in flight (a long
# ApplyDiff, say) before it cancels them; a cancelled ApplyDiff rolls back.
SHUTDOWN_TIMEOUT = 30.0
# How long a starting daemon waits for another process to release the
# device. Commands such as `lcfs layers` lock it while they read the store
# (0.23 s with 2,000 layers, measured), and a daemon until it stops.
BUSY_DEVICE_WAIT = 3.0

# Bytes in the path of a unix socket: sun_path has 108, the last for the
# terminating NUL that Python and Go's net package require.
SOCKET_PATH_MAX = 107

# Bytes read from a pid file, more than any pid and a newline need.
PID_FILE_MAX = 32
PID_TEXT = re.compile(rb"[0-9]+\n?")

FILE_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFLNK: "a symbolic link",
    stat.S_IFSOCK: "a socket",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


class DaemonError(Exception):
    """A start-up failure that the operator can fix; the message names the fix."""


@dataclass
class DaemonConfig:
    device: str = DEFAULT_DEVICE
    size: int | None = None
    socket_path: str | None = DEFAULT_SOCKET
    snapshotter_socket: str | None = None
    mountpoint: str | None = None
    pid_file: str | None = None
    stop_timeout: float = SHUTDOWN_TIMEOUT
    docker_root: str | None = None
    # Whether to log at start the layers that Docker no longer references.
    # --docker-root none turns it off.
    orphan_report: bool = True
    grace: float = 3600.0
    fuse: FuseSettings = field(default_factory=FuseSettings)

    def resolved_pid_file(self) -> str:
        """Return the pid file given, or else the socket path with .pid for .sock.

        The graphdriver socket names it when there is one, else the
        snapshotter socket.
        """
        if self.pid_file:
            return self.pid_file
        return os.path.splitext(self.socket_path or self.snapshotter_socket)[0] + ".pid"

    def resolved_mountpoint(self) -> str | None:
        """Return the fixed mount point, or None to mount at Docker's Home."""
        if self.mountpoint or not self.snapshotter_socket:
            return self.mountpoint
        return DEFAULT_SNAPSHOTTER_MOUNTPOINT


def temporary_socket_name(path: str) -> str:
    """Return the name a socket is bound under before it is renamed to ``path``."""
    return f"{path}.{os.getpid()}.tmp"


def check_socket_path_length(path: str) -> None:
    """Raise DaemonError when ``path`` or its temporary name is too long to bind."""
    for name in (path, temporary_socket_name(path)):
        length = len(os.fsencode(name))
        if length > SOCKET_PATH_MAX:
            raise DaemonError(
                f"socket path {path} is too long: the daemon binds {name} "
                f"({length} bytes), and a unix socket path may have at most "
                f"{SOCKET_PATH_MAX} bytes; choose a shorter path"
            )


def claim_socket_path(path: str) -> None:
    """Make ``path`` free for a new listening socket.

    A socket file whose server is gone is removed. Raises DaemonError when a
    live process accepts connections on it, when the path is not a socket,
    or when the path is too long for a unix socket.
    """
    check_socket_path_length(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise DaemonError(
            f"{path} exists and is not a socket; remove it or pass --socket"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(path)
    except OSError as error:
        if error.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise DaemonError(f"cannot probe socket {path}: {error}") from error
    else:
        raise DaemonError(
            f"{path} is served by {_describe_server(probe)}; stop that process "
            "first or pass another --socket"
        )
    finally:
        probe.close()
    log.info("removing stale socket %s left by a process that has exited", path)
    os.unlink(path)


def _describe_server(connection: socket.socket) -> str:
    """Return "pid N" for the process listening at the other end of ``connection``."""
    credentials = connection.getsockopt(
        socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
    )
    pid, _, _ = struct.unpack("3i", credentials)
    # The kernel reports pid 0 when the server is outside this pid namespace.
    return f"pid {pid}" if pid > 0 else "another process"


def bind_socket(path: str) -> socket.socket:
    """Return a socket listening on ``path`` with mode 0600 from its first moment.

    The socket is bound under a temporary name, restricted, then renamed into
    place, so no one can connect while its mode is still the umask's. Raises
    DaemonError naming the path when it cannot be created.
    """
    temporary = temporary_socket_name(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            sock.bind(temporary)
            os.chmod(temporary, 0o600)
            os.rename(temporary, path)
            sock.listen(128)
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
    except OSError as error:
        raise DaemonError(
            f"cannot listen on --socket {path}: {error.strerror}; pass --socket "
            "a path in a writable directory outside the mount point"
        ) from error
    return sock


def file_kind(mode: int) -> str:
    """Return the kind of file that ``mode`` describes, with an article."""
    return FILE_KINDS.get(stat.S_IFMT(mode), "a special file")


def check_device(device: str) -> None:
    """Raise DaemonError unless ``device`` is a regular file, a block device, or missing outside /dev."""
    try:
        mode = os.stat(device).st_mode
    except FileNotFoundError:
        if is_under_dev(device):
            raise DaemonError(f"--device: {missing_device_message(device)}") from None
        return
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise DaemonError(
            f"--device {device} is {file_kind(mode)}, not an image file or block "
            "device; pass --device an image file (created if missing) or a "
            "block device"
        )


def open_store(device: str, size: int | None) -> tuple[Store, int | None]:
    """Open the store on ``device``, formatting a new sparse image if it is missing.

    Returns the store and the inode number of the image file if this call
    created it, else None. A created file is removed again if it cannot be
    opened.
    """
    check_device(device)
    created_inode = None
    if not os.path.exists(device):
        size = DEFAULT_SIZE if size is None else size
        log.info("creating image %s of %d bytes", device, size)
        os.makedirs(os.path.dirname(os.path.abspath(device)), mode=0o700, exist_ok=True)
        Store.mkfs(device, size=size)
        created_inode = os.stat(device).st_ino
    elif size is not None:
        log.info("ignoring --size: %s exists already", device)
    try:
        return _open_when_free(device), created_inode
    except BaseException as error:
        if created_inode is not None:
            remove_created_image(device, created_inode)
        if isinstance(error, errors.DeviceBusy):
            raise DaemonError(
                f"--device: {error}; stop that process (another lcfs daemon, for "
                "example) first, or pass another --device"
            ) from None
        raise


def _open_when_free(device: str) -> Store:
    """Open the store, waiting up to BUSY_DEVICE_WAIT seconds for another process to release it."""
    deadline = time.monotonic() + BUSY_DEVICE_WAIT
    waiting = False
    while True:
        try:
            return Store.open(device)
        except errors.DeviceBusy as error:
            if time.monotonic() >= deadline:
                raise
            if not waiting:
                log.info("%s; waiting up to %.0f s for it to be released", error,
                         BUSY_DEVICE_WAIT)  # fmt: skip
                waiting = True
            time.sleep(0.1)


def _event_loop_factory():
    """Return the function that makes the daemon's event loop.

    uvloop served a plugin call through aiohttp with about 40% less CPU
    than asyncio's own loop in a test on a kept-alive connection. Without
    uvloop installed the daemon runs on asyncio's loop.
    """
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def remove_created_image(device: str, inode: int) -> None:
    """Remove the image file that a failed first start created."""
    log.info("removing image %s: this start created it and then failed", device)
    remove_own_file(device, inode)


def read_pid_file(path: str) -> int | None:
    """Return the pid that ``path`` contains, or None when it contains anything else.

    A pid file contains decimal digits and an optional newline. A missing
    file, one that is not a regular file, or one with other contents
    returns None.
    """
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        raw = os.read(fd, PID_FILE_MAX + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(raw) > PID_FILE_MAX or not PID_TEXT.fullmatch(raw):
        return None
    return int(raw)


def check_pid_file(path: str, device: str) -> None:
    """Raise DaemonError unless ``path`` is missing or a pid file the daemon may replace.

    The daemon replaces only a regular file that contains just a pid and
    is not the device, so that a mistaken --pid-file destroys no data.
    """
    if os.path.realpath(path) == os.path.realpath(device):
        raise DaemonError(
            f"--pid-file {path} is the device; pass --pid-file another path"
        )
    try:
        pid_stat = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(pid_stat.st_mode):
        raise DaemonError(
            f"--pid-file {path} is {file_kind(pid_stat.st_mode)}, not a regular "
            "file; pass --pid-file the path of a file"
        )
    try:
        device_stat = os.stat(device)
    except FileNotFoundError:
        device_stat = None
    if device_stat is not None and os.path.samestat(pid_stat, device_stat):
        raise DaemonError(
            f"--pid-file {path} is the device {device} under another name; pass "
            "--pid-file another path"
        )
    if read_pid_file(path) is None:
        raise DaemonError(
            f"--pid-file {path} exists and does not contain just a pid; check "
            "the path, and remove the file if it is an old pid file"
        )


def write_pid_file(path: str, device: str) -> int:
    """Write this process's pid to ``path`` and return the file's inode number.

    A pid file left by a dead process is replaced. Raises DaemonError when
    ``check_pid_file`` rejects the path, when the file names another process
    that is running, or when the file cannot be written.
    """
    check_pid_file(path, device)
    holder = read_pid_file(path)
    if holder is not None and holder != os.getpid() and _pid_alive(holder):
        raise DaemonError(
            f"pid file {path} names running process {holder}; stop that process "
            "first or pass another --pid-file"
        )
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
        fd, temporary = tempfile.mkstemp(
            prefix=f"{os.path.basename(path)}.", suffix=".tmp", dir=directory
        )
        try:
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(f"{os.getpid()}\n")
            os.chmod(temporary, 0o644)
            os.rename(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        return os.lstat(path).st_ino
    except OSError as error:
        raise DaemonError(
            f"cannot write --pid-file {path}: {error.strerror}; pass --pid-file "
            "a path in a writable directory"
        ) from error


def remove_pid_file(path: str, inode: int) -> None:
    """Remove the pid file ``path`` if it is still the file this process wrote."""
    holder = read_pid_file(path)
    if holder is None:
        return
    if holder != os.getpid():
        log.warning(
            "not removing pid file %s: it names pid %s, not this daemon's pid %d",
            path,
            holder,
            os.getpid(),
        )
        return
    remove_own_file(path, inode)


def remove_own_file(path: str, expected_inode: int | None = None) -> None:
    """Remove ``path`` if it is still the file this process made (same inode)."""
    try:
        if expected_inode is not None and os.lstat(path).st_ino != expected_inode:
            log.warning("not removing %s: another process has replaced it", path)
            return
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as error:
        log.error("cannot remove %s: %s", path, error)


class Daemon:
    """One run of the daemon, from start to a signal."""

    def __init__(self, config: DaemonConfig):
        self.config = config
        self._stop = asyncio.Event()
        self._signal_name = ""
        self._workers_left = False
        # Set once every socket listens. A start that fails before then
        # removes an image file it created.
        self._listening = False

    def run(self) -> int:
        """Run until SIGTERM or SIGINT; return the exit code (0 after a clean stop)."""
        with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
            return runner.run(self._main())

    def _on_signal(self, signum: int) -> None:
        if self._stop.is_set():
            log.info("still stopping; %s ignored", signal.Signals(signum).name)
            return
        self._signal_name = signal.Signals(signum).name
        self._stop.set()

    async def _main(self) -> int:
        config = self.config
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        executor = ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="lcfs-store")
        loop.set_default_executor(executor)
        log.info("lcfs daemon starting: device %s, pid %d, event loop %s", config.device,
                 os.getpid(), type(loop).__module__.partition(".")[0])  # fmt: skip

        if not config.socket_path and not config.snapshotter_socket:
            raise DaemonError(
                "no socket to serve: give --snapshotter-socket when --socket is none"
            )
        for path in (config.socket_path, config.snapshotter_socket):
            if path:
                claim_socket_path(path)
        pid_file = config.resolved_pid_file()
        check_pid_file(pid_file, config.device)
        mountpoint = config.resolved_mountpoint()
        if mountpoint:
            try:
                check_mountpoint(mountpoint)
            except RuntimeError as error:
                raise DaemonError(f"--mountpoint: {error}") from error
        store, created_inode = await asyncio.to_thread(
            open_store, config.device, config.size
        )
        pid_inode = None
        try:
            try:
                pid_inode = write_pid_file(pid_file, config.device)
                await self._serve(store)
            finally:
                if not self._workers_left:
                    await asyncio.to_thread(self._close_store, store)
                else:
                    # NOTE: a worker thread may still be inside a store call, so
                    # closing the store is left to process exit. The next open
                    # rolls back what the thread had not committed.
                    log.error(
                        "not closing the store on %s: a store call is still running",
                        config.device,
                    )
        finally:
            if pid_inode is not None:
                remove_pid_file(pid_file, pid_inode)
            if created_inode is not None and not self._listening:
                remove_created_image(config.device, created_inode)
        log.info("lcfs daemon stopped (pid %d)", os.getpid())
        return 0

    async def _serve(self, store: Store) -> None:
        """Mount and serve until a signal, then unmount."""
        config = self.config
        mounts = MountManager(store, config.resolved_mountpoint(), fuse_settings=config.fuse)
        plugin = GraphDriverPlugin(store, config.device, mounts)
        try:
            await asyncio.to_thread(mounts.start, plugin.stored_home())
        except MountError as error:
            await asyncio.to_thread(mounts.stop)
            raise DaemonError(str(error)) from error
        runner = web.AppRunner(
            plugin.make_app(),
            handle_signals=False,
            access_log=None,
            shutdown_timeout=config.stop_timeout,
        )
        socket_inode = None
        snapshotter = None
        runner_started = False
        try:
            if config.snapshotter_socket:
                # Imported here: grpc and protobuf take about 0.1 s to import,
                # which a daemon serving only Docker need not spend at start.
                from .snapshotter import SnapshotterServer

                await asyncio.to_thread(store.reconcile_snapshots)
                snapshotter = SnapshotterServer(store, mounts, config.snapshotter_socket)
                try:
                    await snapshotter.start()
                except OSError as error:
                    raise DaemonError(
                        f"cannot listen on --snapshotter-socket "
                        f"{config.snapshotter_socket}: {error.strerror or error}; "
                        "pass a path in a writable directory outside the mount point"
                    ) from error
            if config.socket_path:
                runner_started = True
                await runner.setup()
                sock = bind_socket(config.socket_path)
                socket_inode = os.lstat(config.socket_path).st_ino
                await web.SockSite(runner, sock).start()
            self._listening = True
            await asyncio.to_thread(self._log_orphans, store, plugin.stored_home())
            log.info(
                "lcfs daemon ready: socket %s, snapshotter socket %s, mount %s",
                config.socket_path or "none",
                config.snapshotter_socket or "none",
                mounts.mountpoint or "none until Init",
            )
            await self._stop.wait()
            log.info("lcfs daemon stopping on %s", self._signal_name)
        finally:
            if snapshotter is not None:
                await snapshotter.stop(config.stop_timeout)
            if runner_started:
                await runner.cleanup()
            if socket_inode is not None:
                remove_own_file(config.socket_path, socket_inode)
            still_running = await asyncio.to_thread(
                plugin.workers.join_all, config.stop_timeout
            )
            if still_running:
                self._workers_left = True
                log.error(
                    "worker threads still running at stop: %s", ", ".join(still_running)
                )
            await asyncio.to_thread(mounts.stop)

    def _log_orphans(self, store: Store, home: str | None) -> None:
        """Log the layers that Docker no longer references; never remove them."""
        socket_path = self.config.socket_path or self.config.snapshotter_socket
        store.set_meta("daemon.socket", os.path.abspath(socket_path).encode())
        store.commit()
        if not self.config.orphan_report:
            log.info("not checking for layers that Docker no longer references "
                     "(--docker-root none)")  # fmt: skip
            return
        docker_root = self.config.docker_root or docker_root_from_home(home)
        if not docker_root:
            return
        try:
            report = find_orphans(store, docker_root, self.config.grace)
        except OSError as error:
            log.error("cannot check %s for orphaned layers: %s", docker_root, error)
            return
        for problem in report.unreadable:
            log.warning("cannot read Docker's layer references: %s", problem)
        for layer in report.orphans:
            log.warning(
                "layer %s is not referenced under %s; 'lcfs-fsck --repair --docker-root %s' "
                "removes it while the daemon is stopped",
                layer.id,
                docker_root,
                docker_root,
            )

    @staticmethod
    def _close_store(store: Store) -> None:
        try:
            store.commit()
        finally:
            store.close()
