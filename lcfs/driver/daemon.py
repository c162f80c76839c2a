"""The ``lcfs daemon`` process: one store, its FUSE mount and its sockets.

The daemon serves Docker's graphdriver plugin protocol on one socket,
containerd's Snapshots gRPC service on another (``--snapshotter-socket``),
or both. With the snapshotter the FUSE mount point is fixed from start to
stop, because containers keep bind mounts of snapshot directories for as
long as they run.

Start order: claim the socket path (failing when another live process
serves it), open the device, write the pid file, mount, then listen. The pid
file is written only once the daemon has locked the device, so a start that
fails on a busy device leaves the running daemon's pid file alone. On first start
the image file is created and formatted, and every open runs journal
recovery. Stop order on SIGTERM or SIGINT: stop listening and finish the
requests in flight, wait for their worker threads, unmount, commit, close
the store, remove the socket, and remove the pid file if it still contains
this daemon's pid.

Threads: the event loop (this module and the plugin server) runs on the
main thread, FUSE runs its own trio thread, and store calls run on an
executor whose threads the loop waits for before the store is closed.
"""

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from aiohttp import web

from lcfs.fuse.mount import check_mountpoint
from lcfs.fuse.settings import FuseSettings
from lcfs.store import Store

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

# Bytes in the path of a unix socket: sun_path has 108, the last for the
# terminating NUL that Python and Go's net package require.
SOCKET_PATH_MAX = 107


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
            f"another process is serving {path}; stop it first or pass another --socket"
        )
    finally:
        probe.close()
    log.info("removing stale socket %s left by a process that has exited", path)
    os.unlink(path)


def bind_socket(path: str) -> socket.socket:
    """Return a socket listening on ``path`` with mode 0600 from its first moment.

    The socket is bound under a temporary name, restricted, then renamed into
    place, so no one can connect while its mode is still the umask's.
    """
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    temporary = temporary_socket_name(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(temporary)
        os.chmod(temporary, 0o600)
        os.rename(temporary, path)
        sock.listen(128)
    except BaseException:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return sock


def open_store(device: str, size: int | None) -> Store:
    """Open the store on ``device``, formatting a new sparse image if it is missing."""
    if not os.path.exists(device):
        size = DEFAULT_SIZE if size is None else size
        log.info("creating image %s of %d bytes", device, size)
        os.makedirs(os.path.dirname(os.path.abspath(device)), mode=0o700, exist_ok=True)
        Store.mkfs(device, size=size)
    elif size is not None:
        log.info("ignoring --size: %s exists already", device)
    return Store.open(device)


def read_pid_file(path: str) -> int | None:
    """Return the pid that ``path`` contains, or None when it is missing or malformed."""
    try:
        with open(path, encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def write_pid_file(path: str) -> None:
    """Write this process's pid to ``path``, replacing a file left by a dead process.

    Raises DaemonError when the file names another process that is running.
    """
    holder = read_pid_file(path)
    if holder is not None and holder != os.getpid() and _pid_alive(holder):
        raise DaemonError(
            f"pid file {path} names running process {holder}; stop that process "
            "first or pass another --pid-file"
        )
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="ascii") as f:
        f.write(f"{os.getpid()}\n")
    os.rename(temporary, path)


def remove_pid_file(path: str) -> None:
    """Remove the pid file ``path`` if it still contains this process's pid."""
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
    remove_own_file(path)


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

    def run(self) -> int:
        """Run until SIGTERM or SIGINT; return the exit code (0 after a clean stop)."""
        return asyncio.run(self._main())

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
        log.info("lcfs daemon starting: device %s, pid %d", config.device, os.getpid())

        if not config.socket_path and not config.snapshotter_socket:
            raise DaemonError(
                "no socket to serve: give --snapshotter-socket when --socket is none"
            )
        for path in (config.socket_path, config.snapshotter_socket):
            if path:
                claim_socket_path(path)
        pid_file = config.resolved_pid_file()
        mountpoint = config.resolved_mountpoint()
        if mountpoint:
            try:
                check_mountpoint(mountpoint)
            except RuntimeError as error:
                raise DaemonError(f"--mountpoint: {error}") from error
        store = await asyncio.to_thread(open_store, config.device, config.size)
        pid_written = False
        try:
            try:
                write_pid_file(pid_file)
                pid_written = True
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
            if pid_written:
                remove_pid_file(pid_file)
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
                await snapshotter.start()
            if config.socket_path:
                runner_started = True
                await runner.setup()
                sock = bind_socket(config.socket_path)
                socket_inode = os.lstat(config.socket_path).st_ino
                await web.SockSite(runner, sock).start()
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
