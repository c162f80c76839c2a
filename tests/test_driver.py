"""Plugin protocol tests against a real ``lcfs daemon`` subprocess.

Each test starts the daemon (``python -m lcfs.cli daemon``) on a fresh
sparse image, with its socket and mount point in the test's temporary
directory, and talks to it with the request shapes dockerd 20.10 sends:
``POST /NAME``, an Accept header, no Content-Type, a JSON body ending in a
newline with empty fields left out (``Opts`` and the ID maps as null), an
empty body for Plugin.Activate, and a chunked tar body for ApplyDiff.

Teardown kills the daemon by pid if it is still running and detaches its
mount point if it is still mounted, touching nothing else.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import http.client
import io
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lcfs.driver.mounts import MountManager
from lcfs.driver.layer_calls import CHILD_CREATION, IMPORT, READ, REMOVAL, LayerCalls
from lcfs.driver.server import GraphDriverPlugin
from lcfs.store import Store, errors
from lcfs.store import store as store_module
from lcfs.store.format import ROOT_INO
from lcfs.store.snapshots import KIND_ACTIVE, SNAPSHOT_LAYER_PREFIX

REPO = Path(__file__).resolve().parents[1]
ACCEPT = {"Accept": "application/vnd.docker.plugins.v1.2+json"}
IMAGE_SIZE = "512M"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0

pytestmark = pytest.mark.fuse

if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
    pytest.skip(
        "the daemon's FUSE mount needs root and /dev/fuse", allow_module_level=True
    )


# -- helpers ---------------------------------------------------------------


def _unescape_mountinfo(field: str) -> str:
    for escaped, plain in (
        ("\\040", " "),
        ("\\011", "\t"),
        ("\\012", "\n"),
        ("\\134", "\\"),
    ):
        field = field.replace(escaped, plain)
    return field


def mount_type(path: str | os.PathLike) -> str | None:
    """Return the filesystem type mounted at ``path`` (the top one), or None."""
    target = os.path.realpath(path)
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            separator = fields.index("-")
            if _unescape_mountinfo(fields[4]) == target:
                found = fields[separator + 1]
    return found


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 60.0):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class PluginClient:
    """Sends plugin calls the way dockerd's plugin client does."""

    def __init__(self, socket_path: str):
        self.socket_path = socket_path

    def raw(self, name: str, args: dict | None = None) -> tuple[int, str, bytes]:
        """Send one call; return (status, content type, body)."""
        body = b"" if args is None else json.dumps(args).encode() + b"\n"
        connection = _UnixConnection(self.socket_path)
        try:
            connection.request("POST", f"/{name}", body=body, headers=ACCEPT)
            response = connection.getresponse()
            return (
                response.status,
                response.getheader("Content-Type", ""),
                response.read(),
            )
        finally:
            connection.close()

    def call(self, name: str, args: dict | None = None) -> tuple[int, dict]:
        status, _, body = self.raw(name, args)
        return status, json.loads(body)

    def ok(self, name: str, args: dict | None = None) -> dict:
        """Send a call that must succeed and return its reply."""
        status, reply = self.call(name, args)
        assert status == 200, f"{name} {args}: HTTP {status} {reply}"
        assert "Err" not in reply, f"{name} {args}: {reply}"
        return reply

    def err(self, name: str, args: dict | None = None) -> str:
        """Send a call that must fail and return its Err message."""
        status, reply = self.call(name, args)
        assert status == 500, f"{name} {args}: HTTP {status} {reply}"
        assert reply.get("Err"), f"{name} {args}: {reply}"
        return reply["Err"]

    def apply_diff(
        self, layer_id: str, parent: str, data: bytes, chunk_size: int = 8192
    ) -> tuple[int, dict]:
        """Send ApplyDiff with ``data`` as a chunked body, as dockerd streams it."""
        chunks = (data[i : i + chunk_size] for i in range(0, len(data), chunk_size))
        connection = _UnixConnection(self.socket_path)
        try:
            connection.request(
                "POST",
                f"/GraphDriver.ApplyDiff?id={layer_id}&parent={parent}",
                body=chunks,
                headers=ACCEPT,
                encode_chunked=True,
            )
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    def status_pairs(self) -> dict[str, str]:
        return dict(self.ok("GraphDriver.Status", {})["Status"])


class DaemonProcess:
    """An ``lcfs daemon`` subprocess with its own image, socket and mount point."""

    def __init__(self, directory: Path, fixed_mountpoint: bool = True):
        self.directory = directory
        self.image = directory / "lcfs.img"
        self.socket = directory / "run" / "lcfs.sock"
        self.pid_file = directory / "run" / "lcfs.pid"
        self.mountpoint = directory / "mnt" if fixed_mountpoint else None
        self.log_path = directory / "daemon.log"
        self.client = PluginClient(str(self.socket))
        self.extra_args: list[str] = []
        self.process: subprocess.Popen | None = None
        # Paths the daemon may have mounted, for teardown.
        self.mount_paths: set[Path] = set()
        if self.mountpoint is not None:
            self.mount_paths.add(self.mountpoint)

    def command(self, *extra: str) -> list[str]:
        command = [
            sys.executable, "-m", "lcfs.cli", "daemon",
            "--device", str(self.image),
            "--size", IMAGE_SIZE,
            "--socket", str(self.socket),
            "--log-level", "debug",
        ]  # fmt: skip
        if self.mountpoint is not None:
            command += ["--mountpoint", str(self.mountpoint)]
        return command + self.extra_args + list(extra)

    def spawn(self, command: list[str], log_path: Path) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        with open(log_path, "ab") as log:
            return subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO
            )

    def start(self) -> None:
        self.process = self.spawn(self.command(), self.log_path)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(
                    f"daemon exited with {self.process.returncode}:\n{self.log()}"
                )
            try:
                if self.client.call("Plugin.Activate")[0] == 200:
                    return
            except (ConnectionError, FileNotFoundError):
                pass
            time.sleep(0.05)
        pytest.fail(f"daemon not ready after {START_TIMEOUT} s:\n{self.log()}")

    def stop(self, signum: int = signal.SIGTERM) -> int:
        """Signal the daemon and return its exit code."""
        assert self.process is not None
        self.process.send_signal(signum)
        try:
            return self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"daemon did not stop within {STOP_TIMEOUT} s:\n{self.log()}")

    def restart(self) -> None:
        code = self.stop()
        assert code == 0, self.log()
        self.start()

    def log(self) -> str:
        return (
            self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        )

    def kill(self) -> None:
        """Kill the daemon if it still runs and detach what it left mounted."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
        for path in self.mount_paths:
            # Mounts may be stacked (a new one over a dead one): detach each.
            for _ in range(5):
                if mount_type(path) is None:
                    break
                subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False)


@pytest.fixture
def daemon(tmp_path):
    handle = DaemonProcess(tmp_path)
    handle.extra_args = ["--stop-timeout", "1"]
    try:
        handle.start()
        yield handle
    finally:
        handle.kill()


@pytest.fixture
def home_daemon(tmp_path):
    """A daemon without --mountpoint: it mounts at the Home that Init names."""
    handle = DaemonProcess(tmp_path, fixed_mountpoint=False)
    handle.mount_paths.add(tmp_path / "docker" / "lcfs")
    try:
        handle.start()
        yield handle
    finally:
        handle.kill()


def make_tar(entries: list[tuple]) -> bytes:
    """Build a tar from (kind, name, payload) entries.

    Kinds: ``dir``; ``file`` with bytes; ``exe`` with bytes (mode 0755);
    ``symlink`` and ``hardlink`` with a target.
    """
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for kind, name, payload in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            info.uid = info.gid = 0
            data = None
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
            elif kind in ("file", "exe"):
                info.mode = 0o755 if kind == "exe" else 0o644
                info.size = len(payload)
                data = io.BytesIO(payload)
            elif kind == "symlink":
                info.type = tarfile.SYMTYPE
                info.linkname = payload
                info.mode = 0o777
            elif kind == "hardlink":
                info.type = tarfile.LNKTYPE
                info.linkname = payload
                info.mode = 0o755
            else:
                raise ValueError(kind)
            tar.addfile(info, data)
    return buffer.getvalue()


def read_tar(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return {member.name.rstrip("/"): member for member in tar.getmembers()}


def tar_contents(data: bytes) -> dict[str, bytes]:
    contents = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar.getmembers():
            if member.isreg():
                contents[member.name] = tar.extractfile(member).read()
    return contents


def wait_for_log(daemon: DaemonProcess, text: str, timeout: float = 10.0) -> None:
    """Wait until the daemon's log contains ``text``."""
    deadline = time.monotonic() + timeout
    while text not in daemon.log():
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{daemon.log()}"
        time.sleep(0.05)


def diff_bytes(client: PluginClient, layer_id: str, parent: str | None) -> bytes:
    args = {"ID": layer_id}
    if parent:
        args["Parent"] = parent
    status, content_type, body = client.raw("GraphDriver.Diff", args)
    assert status == 200, body[:500]
    assert content_type == "application/x-tar"
    return body


HOSTS = b"127.0.0.1 localhost\n"
TOOL = bytes(range(256)) * 300  # 76800 bytes: more than one data block

BASE_TAR_ENTRIES = [
    ("dir", "etc", None),
    ("file", "etc/hosts", HOSTS),
    ("dir", "bin", None),
    ("exe", "bin/tool", TOOL),
    ("symlink", "bin/link", "tool"),
    ("hardlink", "bin/hard", "bin/tool"),
    ("file", "empty", b""),
]


# -- activation, Init and Home -----------------------------------------------


def test_activate_and_capabilities(daemon):
    status, content_type, body = daemon.client.raw("Plugin.Activate")
    assert status == 200
    assert content_type.startswith("application/vnd.docker.plugins.v1.2+json")
    assert json.loads(body) == {"Implements": ["GraphDriver"]}
    reply = daemon.client.ok("GraphDriver.Capabilities", {})
    assert reply == {"Capabilities": {"ReproducesExactDiffs": False}}


def test_socket_and_pid_file(daemon):
    mode = os.stat(daemon.socket).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600
    assert daemon.pid_file.read_text().strip() == str(daemon.process.pid)


def test_init_home_survives_restart(daemon, tmp_path):
    home = str(tmp_path / "docker" / "lcfs")
    init = {"Home": home, "Opts": None, "UIDMaps": None, "GIDMaps": None}
    assert daemon.client.ok("GraphDriver.Init", init) == {}
    assert daemon.client.status_pairs()["Docker Home"] == home

    daemon.restart()
    pairs = daemon.client.status_pairs()
    assert pairs["Docker Home"] == home
    # With --mountpoint, Init only records Home: the layers stay where they were.
    assert pairs["Mount Path"] == str(daemon.mountpoint)
    assert mount_type(daemon.mountpoint) == "fuse.lcfs"
    assert mount_type(home) is None


def test_status_metadata_space(daemon):
    client = daemon.client
    before = client.status_pairs()
    total = int(before["Metadata Space Total (bytes)"])
    used = int(before["Metadata Space Used (bytes)"])
    assert used > 0
    assert int(before["Metadata Space Available (bytes)"]) == total - used
    client.ok("GraphDriver.Create", {"ID": "base"})
    directory = Path(client.ok("GraphDriver.Get", {"ID": "base"})["Dir"])
    for index in range(500):
        (directory / f"file-{index}").write_bytes(b"")
    client.ok("GraphDriver.Put", {"ID": "base"})
    after = client.status_pairs()
    assert int(after["Metadata Space Used (bytes)"]) > used
    assert int(after["Metadata Space Total (bytes)"]) == total


def test_init_rejects_options(daemon, tmp_path):
    home = str(tmp_path / "home")
    message = daemon.client.err(
        "GraphDriver.Init", {"Home": home, "Opts": ["lcfs.x=1"]}
    )
    assert "lcfs.x=1" in message
    message = daemon.client.err("GraphDriver.Init", {"Home": "relative/home"})
    assert "relative/home" in message


@pytest.mark.parametrize("case", ["NUL byte", "name too long", "regular file"])
def test_init_failure_keeps_restart_working(home_daemon, tmp_path, docker_root_bind, case):
    client = home_daemon.client
    root = tmp_path / "docker"
    docker_root_bind()
    client.ok("GraphDriver.Create", {"ID": "base"})
    if case == "NUL byte":
        home = str(root / "lc\0fs")
    elif case == "name too long":
        home = str(root / ("h" * 300))
    else:
        (root / "file").write_bytes(b"x")
        home = str(root / "file")

    message = client.err("GraphDriver.Init", {"Home": home})
    assert home in message or repr(home) in message
    assert "internal error" not in message
    assert client.status_pairs()["Docker Home"] == "not initialised"

    # Every start mounts the recorded Home, so a Home that Init could not
    # mount must not be recorded.
    home_daemon.restart()
    assert client.ok("GraphDriver.Exists", {"ID": "base"}) == {"Exists": True}


@pytest.fixture
def docker_root_bind(tmp_path):
    """Bind-mount a Docker root over itself, as dockerd does when it starts."""
    root = tmp_path / "docker"
    root.mkdir(exist_ok=True)
    mounted = []

    def bind():
        subprocess.run(["mount", "--bind", str(root), str(root)], check=True)
        mounted.append(root)

    yield bind
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_home_mount_follows_init(home_daemon, tmp_path, docker_root_bind):
    client = home_daemon.client
    home = tmp_path / "docker" / "lcfs"
    docker_root_bind()
    client.ok("GraphDriver.Create", {"ID": "base"})
    assert client.status_pairs()["Mount Path"] == "not mounted"
    assert "not mounted" in client.err("GraphDriver.Get", {"ID": "base"})

    client.ok(
        "GraphDriver.Init",
        {"Home": str(home), "Opts": None, "UIDMaps": None, "GIDMaps": None},
    )
    assert mount_type(home) == "fuse.lcfs"
    assert client.ok("GraphDriver.Get", {"ID": "base"}) == {"Dir": str(home / "base")}
    assert (home / "base").is_dir()

    # dockerd sends no Init to a restarted plugin: the recorded Home is mounted.
    home_daemon.restart()
    assert mount_type(home) == "fuse.lcfs"
    assert client.ok("GraphDriver.Get", {"ID": "base"}) == {"Dir": str(home / "base")}
    assert (home / "base").is_dir()

    client.ok("GraphDriver.Cleanup", {})
    assert mount_type(home) is None
    assert client.status_pairs()["Mount Path"] == "not mounted"

    client.ok("GraphDriver.Init", {"Home": str(home)})
    assert mount_type(home) == "fuse.lcfs"
    assert (home / "base").is_dir()

    assert home_daemon.stop() == 0
    assert mount_type(home) is None


def test_restart_without_dockerd_waits_for_init(home_daemon, tmp_path, docker_root_bind):
    client = home_daemon.client
    home = tmp_path / "docker" / "lcfs"
    client.ok("GraphDriver.Create", {"ID": "base"})
    client.ok("GraphDriver.Init", {"Home": str(home)})
    client.ok("GraphDriver.Cleanup", {})
    home_daemon.restart()
    # Docker's root is no mount point, so dockerd is not running: a mount
    # made now would be hidden by the bind mount dockerd makes at start.
    assert mount_type(home) is None
    docker_root_bind()
    client.ok("GraphDriver.Init", {"Home": str(home)})
    assert mount_type(home) == "fuse.lcfs"
    assert (home / "base").is_dir()


def test_init_remounts_hidden_home(home_daemon, tmp_path, docker_root_bind):
    client = home_daemon.client
    home = tmp_path / "docker" / "lcfs"
    client.ok("GraphDriver.Create", {"ID": "base"})
    client.ok("GraphDriver.Init", {"Home": str(home)})
    assert (home / "base").is_dir()
    docker_root_bind()  # hides the mount below it
    assert not (home / "base").exists()
    client.ok("GraphDriver.Init", {"Home": str(home)})
    assert (home / "base").is_dir()
    # The hidden mount went, so only the new one is left, and the stop ends it.
    assert lcfs_mounts_at(home) == 1
    assert home_daemon.stop() == 0
    assert lcfs_mounts_at(home) == 0


def test_watchdog_detaches_hidden_home(home_daemon, tmp_path, docker_root_bind):
    client = home_daemon.client
    home = tmp_path / "docker" / "lcfs"
    client.ok("GraphDriver.Init", {"Home": str(home)})
    docker_root_bind()  # hides the mount below it
    os.kill(home_daemon.process.pid, signal.SIGKILL)
    home_daemon.process.wait()
    deadline = time.monotonic() + 10
    while lcfs_mounts_at(home) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lcfs_mounts_at(home) == 0


def test_put_waits_for_store_lock_off_event_loop(tmp_path):
    """A Put while another thread holds the store lock leaves the event loop free.

    The loop runs store calls itself only when the lock is free, so that
    a long commit or import on another thread does not stop every other
    plugin call. Put looked up the layer's lost changes on the loop and
    so waited there for the lock.
    """
    image = str(tmp_path / "store.img")
    Store.mkfs(image, size=64 << 20)
    with Store.open(image) as store:
        store.create_layer("c")
        store.commit()
        plugin = GraphDriverPlugin(store, image, MountManager(store, None))
        plugin._gets["c"] = 1  # a Get whose Put this is
        locked = threading.Event()

        def hold_lock() -> None:
            with store.lock:
                locked.set()
                time.sleep(1.0)

        async def put_while_locked() -> float:
            holder = threading.Thread(target=hold_lock)
            holder.start()
            await asyncio.to_thread(locked.wait, 10)
            loop = asyncio.get_running_loop()
            put = asyncio.create_task(plugin.put({"ID": "c"}))
            started = loop.time()
            await asyncio.sleep(0.05)
            lag = loop.time() - started
            assert await put == {}
            await asyncio.to_thread(holder.join)
            return lag

        lag = asyncio.run(put_while_locked())
    assert lag < 0.5


def test_remove_forgets_layer_looked_up(tmp_path):
    """The record of layers looked up through the mount drops removed layers.

    Layer numbers never come back, so a daemon that ran many containers
    would otherwise keep one entry for each layer it ever served.
    """
    image = str(tmp_path / "store.img")
    Store.mkfs(image, size=64 << 20)
    with Store.open(image) as store:
        store.create_layer("kept")
        store.create_layer("c")
        store.commit()
        plugin = GraphDriverPlugin(store, image, MountManager(store, None))
        looked_up = plugin.mounts.stats.layers_looked_up
        kept = store.get_layer("kept").number
        removed = store.get_layer("c").number
        looked_up.update({kept, removed})
        assert asyncio.run(plugin.remove({"ID": "c"})) == {}
    assert looked_up == {kept}


def lcfs_mounts_at(path: Path) -> int:
    """Count the lcfs mounts at ``path`` in /proc/self/mountinfo, hidden ones too."""
    with open("/proc/self/mountinfo") as f:
        return sum(
            1 for line in f
            if line.split()[4] == str(path) and " fuse.lcfs " in line
        )  # fmt: skip


# -- layers ----------------------------------------------------------------


def test_put_makes_writes_durable(daemon):
    client = daemon.client
    client.ok("GraphDriver.Create", {"ID": "base"})
    client.ok("GraphDriver.CreateReadWrite", {"ID": "c", "Parent": "base"})
    client.ok("GraphDriver.Put", {"ID": "c"})  # nothing written yet
    directory = Path(client.ok("GraphDriver.Get", {"ID": "c"})["Dir"])
    (directory / "kept").write_bytes(b"written before Put\n")
    client.ok("GraphDriver.Put", {"ID": "c"})
    client.ok("GraphDriver.Put", {"ID": "c"})  # nothing new since
    # SIGKILL well within the mount's own one-second commit interval.
    daemon.kill()
    daemon.start()
    directory = Path(client.ok("GraphDriver.Get", {"ID": "c"})["Dir"])
    assert (directory / "kept").read_bytes() == b"written before Put\n"


def test_layer_lifecycle(daemon):
    client = daemon.client
    client.ok("GraphDriver.Create", {"ID": "base"})
    client.ok("GraphDriver.CreateReadWrite", {"ID": "c-init", "Parent": "base"})
    client.ok("GraphDriver.CreateReadWrite", {"ID": "c", "Parent": "c-init"})
    assert client.status_pairs()["Layers"] == "3"

    for layer_id in ("base", "c-init", "c"):
        assert client.ok("GraphDriver.Exists", {"ID": layer_id}) == {"Exists": True}

    directory = client.ok("GraphDriver.Get", {"ID": "c"})["Dir"]
    assert directory == str(daemon.mountpoint / "c")
    Path(directory, "hello").write_bytes(b"hello\n")
    assert client.ok("GraphDriver.Put", {"ID": "c"}) == {}

    metadata = client.ok("GraphDriver.GetMetadata", {"ID": "c"})["Metadata"]
    assert metadata["Device"] == str(daemon.image)
    assert metadata["Parent"] == "c-init"
    assert metadata["Layer"].isdigit()
    assert all(isinstance(value, str) for value in metadata.values())
    assert (
        client.ok("GraphDriver.GetMetadata", {"ID": "base"})["Metadata"]["Frozen"]
        == "true"
    )

    changes = client.ok("GraphDriver.Changes", {"ID": "c", "Parent": "c-init"})[
        "Changes"
    ]
    assert {"Path": "/hello", "Kind": 1} in changes

    for layer_id in ("c", "c-init", "base"):
        assert client.ok("GraphDriver.Remove", {"ID": layer_id}) == {}
        assert client.ok("GraphDriver.Exists", {"ID": layer_id}) == {"Exists": False}
    assert client.status_pairs()["Layers"] == "0"
    assert not Path(directory).exists()


def test_layer_directory_entry_kept_until_remove(daemon):
    client = daemon.client
    client.ok("GraphDriver.CreateReadWrite", {"ID": "c"})
    directory = Path(client.ok("GraphDriver.Get", {"ID": "c"})["Dir"])
    (directory / "old").write_bytes(b"old")
    lookups = client.ok("lcfs.Stats")["lookup"]["requests"]
    for _ in range(100):
        os.stat(directory / "old")
    assert client.ok("lcfs.Stats")["lookup"]["requests"] - lookups <= 1

    client.ok("GraphDriver.Remove", {"ID": "c"})
    assert not directory.exists()
    client.ok("GraphDriver.CreateReadWrite", {"ID": "c"})
    assert os.listdir(directory) == []
    (directory / "new").write_bytes(b"new")
    assert client.ok("GraphDriver.Changes", {"ID": "c"})["Changes"] == [
        {"Path": "/new", "Kind": 1}
    ]


def test_remove_retried_after_kill(daemon):
    """dockerd sends Remove again when a crash lost the reply to a finished removal."""
    client = daemon.client
    client.ok("GraphDriver.Create", {"ID": "base"})
    client.ok("GraphDriver.CreateReadWrite", {"ID": "c", "Parent": "base"})
    assert client.ok("GraphDriver.Remove", {"ID": "c"}) == {}
    daemon.kill()
    daemon.start()
    assert client.ok("GraphDriver.Remove", {"ID": "c"}) == {}
    assert client.ok("GraphDriver.Exists", {"ID": "c"}) == {"Exists": False}
    assert client.ok("GraphDriver.Remove", {"ID": "base"}) == {}
    assert client.status_pairs()["Layers"] == "0"
    message = client.err("GraphDriver.Remove", {"ID": UNKNOWN})
    assert "not found" in message


def test_diff_refuses_layer_that_lost_changes(daemon):
    """A kill before the group commit loses the last writes; Diff must not hide that."""
    client = daemon.client
    client.ok("GraphDriver.Create", {"ID": "base"})
    client.ok("GraphDriver.Create", {"ID": "other"})
    client.ok("GraphDriver.CreateReadWrite", {"ID": "step", "Parent": "base"})
    client.ok("GraphDriver.CreateReadWrite", {"ID": "kept", "Parent": "base"})
    # A write through the mount without a Get marks its layer before the reply.
    Path(daemon.mountpoint, "other", "direct").write_bytes(b"x")

    written = Path(client.ok("GraphDriver.Get", {"ID": "kept"})["Dir"], "done")
    written.write_bytes(b"committed")
    assert client.ok("GraphDriver.Put", {"ID": "kept"}) == {}
    step = Path(client.ok("GraphDriver.Get", {"ID": "step"})["Dir"])
    (step / "built").write_bytes(b"output of the step")

    # The group commit runs about once a second; the kill comes before it.
    daemon.kill()
    daemon.start()

    assert "step may have lost the changes" in daemon.log()
    assert "other may have lost the changes" in daemon.log()
    assert "kept may have lost" not in daemon.log()
    assert client.ok("GraphDriver.Put", {"ID": "step"}) == {}
    message = client.err("GraphDriver.Diff", {"ID": "step", "Parent": "base"})
    assert "layer step may lack the changes" in message
    assert "run the build step or the container again" in message
    # A layer whose changes a Put committed is not affected.
    assert tar_contents(diff_bytes(client, "kept", "base")) == {"done": b"committed"}
    # A container that runs on the layer again makes Diff work.
    step = Path(client.ok("GraphDriver.Get", {"ID": "step"})["Dir"])
    os.listdir(step)
    client.ok("GraphDriver.Put", {"ID": "step"})
    diff_bytes(client, "step", "base")
    # A clean stop leaves no such record.
    daemon.restart()
    assert daemon.log().count("may have lost the changes") == 2
    diff_bytes(client, "step", "base")


def lose_changes_of_container(daemon) -> PluginClient:
    """Kill the daemon while layer c has an open Get and an uncommitted write."""
    client = daemon.client
    client.ok("GraphDriver.Create", {"ID": "base"})
    client.ok("GraphDriver.CreateReadWrite", {"ID": "c", "Parent": "base"})
    container = Path(client.ok("GraphDriver.Get", {"ID": "c"})["Dir"])
    (container / "data").write_bytes(b"written before the kill")
    daemon.kill()
    daemon.start()
    return client


def test_commit_of_layer_that_lost_changes(daemon):
    """docker commit sends Get, Diff and Put; its Get must not clear the record."""
    client = lose_changes_of_container(daemon)
    assert "c may have lost the changes" in daemon.log()

    # docker commit of the stopped container, twice.
    for _ in range(2):
        client.ok("GraphDriver.Get", {"ID": "c"})
        status, content_type, body = client.raw(
            "GraphDriver.Diff", {"ID": "c", "Parent": "base"}
        )
        assert status == 500, f"Diff returned HTTP {status} {content_type}"
        assert "layer c may lack the changes" in json.loads(body)["Err"]
        assert client.ok("GraphDriver.Put", {"ID": "c"}) == {}

    # docker start: the container's Get stays open while it runs, so the
    # Get of a docker commit of the running container finds it open.
    client.ok("GraphDriver.Get", {"ID": "c"})
    client.ok("GraphDriver.Get", {"ID": "c"})
    diff_bytes(client, "c", "base")
    client.ok("GraphDriver.Put", {"ID": "c"})
    client.ok("GraphDriver.Put", {"ID": "c"})
    diff_bytes(client, "c", "base")


def test_container_run_clears_lost_changes(daemon):
    client = lose_changes_of_container(daemon)

    # docker start and docker stop with no Diff between them. The
    # container's processes walk the layer's tree through the mount.
    container = Path(client.ok("GraphDriver.Get", {"ID": "c"})["Dir"])
    os.listdir(container)
    client.ok("GraphDriver.Put", {"ID": "c"})
    diff_bytes(client, "c", "base")
    assert "layer 'c' is in use again" in daemon.log()


def test_container_run_after_root_listing(daemon):
    """A container run clears the record after a listing of the mount root.

    A listing of the mount root hands the kernel every layer's entry, so a
    later walk into the layer must still reach the daemon.
    """
    client = lose_changes_of_container(daemon)

    container = Path(client.ok("GraphDriver.Get", {"ID": "c"})["Dir"])
    assert "c" in os.listdir(container.parent)
    os.listdir(container)
    client.ok("GraphDriver.Put", {"ID": "c"})
    diff_bytes(client, "c", "base")
    assert "layer 'c' is in use again" in daemon.log()


def test_dockerd_restore_keeps_lost_changes(daemon):
    """dockerd's start after a crash sends Put, Get and Put but runs nothing.

    For each container that was running, dockerd 20.10's restore unmounts
    it (Put) and then mounts and unmounts it to learn its root path (Get,
    Put), without touching the files. That must not clear the record.
    """
    client = lose_changes_of_container(daemon)

    assert client.ok("GraphDriver.Put", {"ID": "c"}) == {}
    client.ok("GraphDriver.Get", {"ID": "c"})
    assert client.ok("GraphDriver.Put", {"ID": "c"}) == {}

    status, content_type, body = client.raw(
        "GraphDriver.Diff", {"ID": "c", "Parent": "base"}
    )
    assert status == 500, f"Diff returned HTTP {status} {content_type}"
    assert "layer c may lack the changes" in json.loads(body)["Err"]
    assert "layer 'c' is in use again" not in daemon.log()
    # docker start then runs the container on the layer.
    container = Path(client.ok("GraphDriver.Get", {"ID": "c"})["Dir"])
    os.listdir(container)
    client.ok("GraphDriver.Put", {"ID": "c"})
    diff_bytes(client, "c", "base")


def test_remove_forgets_open_gets(daemon):
    """A Get still open at Remove must not count for a new layer of the same id."""
    client = daemon.client
    client.ok("GraphDriver.Create", {"ID": "base"})
    client.ok("GraphDriver.CreateReadWrite", {"ID": "c", "Parent": "base"})
    client.ok("GraphDriver.Get", {"ID": "c"})
    client.ok("GraphDriver.Remove", {"ID": "c"})
    client.ok("GraphDriver.CreateReadWrite", {"ID": "c", "Parent": "base"})
    client.ok("GraphDriver.Get", {"ID": "c"})
    assert client.ok("GraphDriver.Put", {"ID": "c"}) == {}

    # The Put closed the only Get of the new layer, so its change mark goes
    # with the next commit, which a Create makes at once.
    client.ok("GraphDriver.Create", {"ID": "other", "Parent": "base"})
    daemon.kill()
    daemon.start()
    assert "c may have lost the changes" not in daemon.log()
    diff_bytes(client, "c", "base")


def test_create_existing_id(daemon):
    client = daemon.client
    client.ok("GraphDriver.Create", {"ID": "base"})
    message = client.err("GraphDriver.Create", {"ID": "base"})
    assert "base" in message
    assert "exists" in message
    message = client.err("GraphDriver.CreateReadWrite", {"ID": "base"})
    assert "base" in message


def test_create_invalid_id(daemon):
    for bad_id in ("a/b", "..", ""):
        message = daemon.client.err("GraphDriver.Create", {"ID": bad_id})
        assert "invalid" in message
    assert daemon.client.status_pairs()["Layers"] == "0"


UNKNOWN = "3f2a0c9e1b7d4a65"


@pytest.mark.parametrize(
    "call, args",
    [
        ("GraphDriver.Create", {"ID": "new", "Parent": UNKNOWN}),
        ("GraphDriver.CreateReadWrite", {"ID": "new", "Parent": UNKNOWN}),
        ("GraphDriver.Remove", {"ID": UNKNOWN}),
        ("GraphDriver.Get", {"ID": UNKNOWN}),
        ("GraphDriver.Put", {"ID": UNKNOWN}),
        ("GraphDriver.GetMetadata", {"ID": UNKNOWN}),
        ("GraphDriver.Diff", {"ID": UNKNOWN}),
        ("GraphDriver.Changes", {"ID": UNKNOWN}),
        ("GraphDriver.DiffSize", {"ID": UNKNOWN}),
    ],
)
def test_unknown_id(daemon, call, args):
    message = daemon.client.err(call, args)
    assert UNKNOWN in message
    assert "not found" in message
    assert daemon.client.status_pairs()["Layers"] == "0"


def test_unknown_id_exists_and_apply_diff(daemon):
    assert daemon.client.ok("GraphDriver.Exists", {"ID": UNKNOWN}) == {"Exists": False}
    status, reply = daemon.client.apply_diff(UNKNOWN, "", make_tar(BASE_TAR_ENTRIES))
    assert status == 500
    assert UNKNOWN in reply["Err"]


@pytest.fixture
def snapshot_layer(daemon) -> str:
    """The layer id of an active containerd snapshot, made while the daemon is stopped."""
    assert daemon.stop() == 0
    with Store.open(str(daemon.image)) as store:
        info = store.create_snapshot("key", "", KIND_ACTIVE)
        store.commit()
    daemon.start()
    return info.layer_id


@pytest.mark.parametrize(
    "call",
    [
        "GraphDriver.Remove",
        "GraphDriver.Get",
        "GraphDriver.Put",
        "GraphDriver.GetMetadata",
        "GraphDriver.Changes",
        "GraphDriver.DiffSize",
        "GraphDriver.Diff",
    ],
)
def test_snapshot_id_not_found(daemon, snapshot_layer, call):
    status, _, body = daemon.client.raw(call, {"ID": snapshot_layer})
    assert status == 500
    message = json.loads(body)["Err"]
    assert snapshot_layer in message
    assert "not found" in message


def test_apply_diff_snapshot_id(daemon, snapshot_layer):
    tar = make_tar(BASE_TAR_ENTRIES)
    status, reply = daemon.client.apply_diff(snapshot_layer, "", tar)
    assert status == 500
    assert snapshot_layer in reply["Err"]
    assert "not found" in reply["Err"]
    assert list((daemon.mountpoint / snapshot_layer).iterdir()) == []


def test_exists_snapshot_id(daemon, snapshot_layer):
    reply = daemon.client.ok("GraphDriver.Exists", {"ID": snapshot_layer})
    assert reply == {"Exists": False}


def test_create_on_snapshot_parent(daemon, snapshot_layer):
    client = daemon.client
    args = {"ID": "dockerchild", "Parent": snapshot_layer}
    message = client.err("GraphDriver.Create", args)
    assert snapshot_layer in message
    assert repr(SNAPSHOT_LAYER_PREFIX) in message
    assert "reserved" in message
    assert client.ok("GraphDriver.Exists", {"ID": "dockerchild"}) == {"Exists": False}
    # Creating a child would have frozen the snapshot's layer.
    (daemon.mountpoint / snapshot_layer / "file").write_bytes(b"still writable")


def test_create_missing_parent(daemon):
    message = daemon.client.err("GraphDriver.Create", {"ID": "l2", "Parent": "nope"})
    assert "parent layer nope of layer l2 not found" in message


@pytest.mark.parametrize(
    "call", ["GraphDriver.Create", "GraphDriver.Get", "GraphDriver.Diff"]
)
def test_json_body_too_large(daemon, call):
    args = {"ID": "big", "Padding": "x" * (2 << 20)}
    status, content_type, body = daemon.client.raw(call, args)
    assert status == 500
    assert content_type.startswith("application/vnd.docker.plugins.v1.2+json")
    message = json.loads(body)["Err"]
    assert "request body is too large" in message
    assert str(1 << 20) in message
    log = daemon.log()
    assert f"WARNING lcfs.driver.server: {call} failed: {message}" in log
    assert "Traceback" not in log


def test_surrogate_in_string_fields(daemon):
    client = daemon.client
    for call in ("GraphDriver.Create", "GraphDriver.Get", "GraphDriver.Remove"):
        message = client.err(call, {"ID": "a\udcffb"})
        assert "invalid layer id" in message, call
    message = client.err("GraphDriver.Create", {"ID": "ok", "Parent": "p\udcff"})
    assert "invalid parent layer id" in message
    message = client.err("GraphDriver.Init", {"Home": "/home\udcff"})
    assert "invalid Home" in message
    assert client.status_pairs()["Layers"] == "0"
    assert "Traceback" not in daemon.log()


def test_layer_id_escaped_in_log(daemon):
    client = daemon.client
    client.err("GraphDriver.Get", {"ID": "a\nforged line"})
    client.err("GraphDriver.Get", {"ID": "b\x00c"})
    log = daemon.log()
    assert "GraphDriver.Get for layer 'a\\nforged line'" in log
    assert not any(line.startswith("forged line") for line in log.splitlines())
    assert "\x00" not in log


def test_storage_opt_not_object(daemon):
    client = daemon.client
    message = client.err("GraphDriver.Create", {"ID": "s", "StorageOpt": "abc"})
    assert "invalid StorageOpt 'abc'" in message
    assert client.ok("GraphDriver.Exists", {"ID": "s"}) == {"Exists": False}


@pytest.mark.parametrize(
    "call", ["GraphDriver.Get", "GraphDriver.Put", "GraphDriver.Remove"]
)
def test_missing_layer_id(daemon, call):
    message = daemon.client.err(call, {})
    assert "the layer ID is missing" in message


def test_apply_diff_missing_layer_id(daemon):
    status, reply = daemon.client.apply_diff("", "", make_tar(BASE_TAR_ENTRIES))
    assert status == 500
    assert "the layer ID is missing" in reply["Err"]


def test_remove_layer_with_children(daemon):
    client = daemon.client
    client.ok("GraphDriver.Create", {"ID": "base"})
    client.ok("GraphDriver.CreateReadWrite", {"ID": "child", "Parent": "base"})
    message = client.err("GraphDriver.Remove", {"ID": "base"})
    assert "base" in message
    assert "child" in message
    assert client.ok("GraphDriver.Exists", {"ID": "base"}) == {"Exists": True}

    client.ok("GraphDriver.Remove", {"ID": "child"})
    client.ok("GraphDriver.Remove", {"ID": "base"})
    assert client.status_pairs()["Layers"] == "0"


@pytest.mark.parametrize("purge_batch", [5000, 1])
def test_concurrent_removes_share_commit(tmp_path, monkeypatch, purge_batch):
    # With a purge batch of 1 record, each layer (two records) takes the
    # path of a large layer: marked, purged in commits, then dropped.
    monkeypatch.setattr(store_module, "PURGE_BATCH", purge_batch)
    image = str(tmp_path / "store.img")
    Store.mkfs(image, size=256 << 20)
    with Store.open(image) as store:
        names = [f"layer{index}" for index in range(8)]
        for name in names:
            number = store.create_layer(name).number
            store.mknod(number, ROOT_INO, b"file", stat.S_IFREG | 0o644)
        store.commit()
        plugin = GraphDriverPlugin(store, image, MountManager(store, None))
        commits = []
        commit = store.commit

        def counting_commit():
            commits.append(len(store.list_layers()))
            commit()

        monkeypatch.setattr(store, "commit", counting_commit)

        async def remove_all():
            calls = [plugin.remove({"ID": name}) for name in [*names, "missing"]]
            return await asyncio.gather(*calls, return_exceptions=True)

        results = asyncio.run(remove_all())
        # One commit drops all eight layers. A large layer's marks and
        # purge batches commit on their own before it.
        assert commits[-1] == 0
        if purge_batch > 1:
            assert commits == [0]
    assert results[:-1] == [{}] * len(names)
    assert isinstance(results[-1], errors.LayerNotFound)
    assert "missing" in str(results[-1])
    with Store.open(image) as store:
        assert store.list_layers() == []


def test_malformed_requests(daemon):
    status, _, body = daemon.client.raw("GraphDriver.Unknown", {})
    assert status == 404
    assert "GraphDriver.Unknown" in json.loads(body)["Err"]

    connection = _UnixConnection(str(daemon.socket))
    connection.request("POST", "/GraphDriver.Create", body=b"{not json", headers=ACCEPT)
    response = connection.getresponse()
    assert response.status == 500
    assert "JSON" in json.loads(response.read())["Err"]
    connection.close()


def test_deeply_nested_json_body(daemon):
    # Deeper than Python's recursion limit, which json.loads runs into.
    body = b"[" * 100_000 + b"]" * 100_000
    connection = _UnixConnection(str(daemon.socket))
    connection.request("POST", "/GraphDriver.Get", body=body, headers=ACCEPT)
    response = connection.getresponse()
    message = json.loads(response.read())["Err"]
    connection.close()
    assert response.status == 500
    assert "JSON body is nested too deeply" in message
    assert "internal error" not in message
    assert "Traceback" not in daemon.log()


def test_call_with_wrong_method(daemon):
    connection = _UnixConnection(str(daemon.socket))
    try:
        connection.request("GET", "/GraphDriver.Create", headers=ACCEPT)
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    assert response.status == 405
    assert response.getheader("Allow") == "POST"
    message = json.loads(body)["Err"]
    assert "'GraphDriver.Create' must be sent with POST, not GET" in message
    assert "unknown" not in message


def test_json_body_cut_off(daemon):
    calls = ["GraphDriver.Create", "GraphDriver.Get", "GraphDriver.Diff"]
    for call in calls:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(daemon.socket))
        head = (
            f"POST /{call} HTTP/1.1\r\nHost: localhost\r\n"
            "Content-Length: 100\r\nExpect: 100-continue\r\n\r\n"
        )
        try:
            sock.sendall(head.encode())
            # The interim reply comes once the daemon handles the call, so
            # the body below breaks off while the daemon reads it.
            assert sock.recv(4096).startswith(b"HTTP/1.1 100"), call
            sock.sendall(b'{"ID":"x"')
        finally:
            sock.close()
        wait_for_log(
            daemon,
            f"WARNING lcfs.driver.server: {call} failed: the client went away "
            "before the end of the request",
        )
    log = daemon.log()
    for call in calls:
        assert log.count(f"{call} failed") == 1, call
    assert "Traceback" not in log
    assert " ERROR " not in log


@pytest.mark.parametrize(
    "running, requested, allowed",
    [
        (READ, READ, True),
        (CHILD_CREATION, CHILD_CREATION, True),
        (READ, CHILD_CREATION, True),
        (READ, REMOVAL, True),
        (IMPORT, IMPORT, False),
        (IMPORT, READ, False),
        (IMPORT, CHILD_CREATION, False),
        (IMPORT, REMOVAL, False),
        (READ, IMPORT, False),
        (CHILD_CREATION, IMPORT, False),
        (REMOVAL, IMPORT, False),
        (REMOVAL, REMOVAL, False),
    ],
)
def test_layer_calls_conflicts(running, requested, allowed):
    calls = LayerCalls()
    with calls.running("base", running):
        with calls.running("other", requested):
            pass
        if allowed:
            with calls.running("base", requested):
                pass
        else:
            with (
                pytest.raises(errors.Busy, match="base"),
                calls.running("base", requested),
            ):
                pass
    # The mark ends with its block.
    with calls.running("base", requested):
        pass


def test_removal_waits_for_import_to_end():
    calls = LayerCalls()
    started = threading.Event()

    def short_import():
        with calls.running("base", IMPORT):
            started.set()
            time.sleep(0.3)

    importing = threading.Thread(target=short_import)
    importing.start()
    started.wait()
    with pytest.raises(errors.Busy, match="base"), calls.running("base", REMOVAL, wait=0.05):
        pass
    with calls.running("base", REMOVAL, wait=10):
        assert not importing.is_alive()
    importing.join()


def test_remove_during_broken_apply_diff(daemon):
    """dockerd sends Remove right after its ApplyDiff body broke off, while the import still rolls back."""
    client = daemon.client
    client.ok("GraphDriver.Create", {"ID": "cut"})
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(daemon.socket))
    head = (
        "POST /GraphDriver.ApplyDiff?id=cut&parent= HTTP/1.1\r\nHost: localhost\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    )
    part = make_tar(BASE_TAR_ENTRIES)[:2048]
    sock.sendall(head.encode() + f"{len(part):x}\r\n".encode() + part + b"\r\n")
    wait_for_log(daemon, "GraphDriver.ApplyDiff of layer 'cut': import started")
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        removing = pool.submit(client.call, "GraphDriver.Remove", {"ID": "cut"})
        wait_for_log(daemon, "GraphDriver.Remove for layer 'cut'")
        sock.close()
        status, reply = removing.result(timeout=30)
    assert status == 200, reply
    assert "Err" not in reply, reply
    assert client.ok("GraphDriver.Exists", {"ID": "cut"}) == {"Exists": False}
    assert client.status_pairs()["Layers"] == "0"


# -- tar import and export -------------------------------------------------


def test_apply_diff_then_diff(daemon):
    client = daemon.client
    client.ok("GraphDriver.Create", {"ID": "l1"})
    status, reply = client.apply_diff("l1", "", make_tar(BASE_TAR_ENTRIES))
    assert status == 200, reply
    # As overlay2 counts: the files, the hard link once, and the symlink's
    # target ("tool").
    size = len(HOSTS) + len(TOOL) + len("tool")
    assert reply == {"Size": size}
    assert client.ok("GraphDriver.DiffSize", {"ID": "l1"}) == {"Size": size}

    root = Path(client.ok("GraphDriver.Get", {"ID": "l1"})["Dir"])
    assert (root / "etc" / "hosts").read_bytes() == HOSTS
    assert (root / "bin" / "tool").read_bytes() == TOOL
    assert stat.S_IMODE((root / "bin" / "tool").stat().st_mode) == 0o755
    assert os.readlink(root / "bin" / "link") == "tool"
    assert (root / "bin" / "hard").stat().st_ino == (
        root / "bin" / "tool"
    ).stat().st_ino
    assert (root / "bin" / "tool").stat().st_nlink == 2
    assert (root / "empty").stat().st_size == 0
    client.ok("GraphDriver.Put", {"ID": "l1"})

    members = read_tar(diff_bytes(client, "l1", None))
    assert set(members) == {
        "etc",
        "etc/hosts",
        "bin",
        "bin/tool",
        "bin/link",
        "bin/hard",
        "empty",
    }
    assert members["bin/link"].issym()
    assert members["bin/link"].linkname == "tool"
    linked = {members["bin/hard"].islnk(), members["bin/tool"].islnk()}
    assert linked == {True, False}
    contents = tar_contents(diff_bytes(client, "l1", None))
    assert HOSTS == contents["etc/hosts"]
    assert TOOL == contents.get("bin/tool", contents.get("bin/hard"))

    changes = client.ok("GraphDriver.Changes", {"ID": "l1"})["Changes"]
    assert sorted((c["Path"], c["Kind"]) for c in changes) == [
        ("/bin", 1),
        ("/bin/hard", 1),
        ("/bin/link", 1),
        ("/bin/tool", 1),
        ("/empty", 1),
        ("/etc", 1),
        ("/etc/hosts", 1),
    ]


def test_apply_diff_on_child(daemon):
    client = daemon.client
    client.ok("GraphDriver.Create", {"ID": "l1"})
    assert client.apply_diff("l1", "", make_tar(BASE_TAR_ENTRIES))[0] == 200
    client.ok("GraphDriver.Create", {"ID": "l2", "Parent": "l1"})
    new_hosts = b"10.0.0.1 db\n"
    child_tar = make_tar(
        [
            ("dir", "etc", None),
            ("file", "etc/hosts", new_hosts),
            ("dir", "bin", None),
            ("file", "bin/.wh.link", b""),
            ("file", "new.txt", b"new\n"),
        ]
    )
    status, reply = client.apply_diff("l2", "l1", child_tar)
    assert status == 200, reply
    assert reply["Size"] == len(new_hosts) + len(b"new\n")

    root = Path(client.ok("GraphDriver.Get", {"ID": "l2"})["Dir"])
    assert (root / "etc" / "hosts").read_bytes() == new_hosts
    assert not (root / "bin" / "link").exists()
    assert (root / "bin" / "tool").read_bytes() == TOOL
    assert (daemon.mountpoint / "l1" / "etc" / "hosts").read_bytes() == HOSTS
    client.ok("GraphDriver.Put", {"ID": "l2"})

    changes = client.ok("GraphDriver.Changes", {"ID": "l2", "Parent": "l1"})["Changes"]
    kinds = {change["Path"]: change["Kind"] for change in changes}
    assert kinds["/etc/hosts"] == 0
    assert kinds["/bin/link"] == 2
    assert kinds["/new.txt"] == 1
    assert "/bin/tool" not in kinds

    members = read_tar(diff_bytes(client, "l2", "l1"))
    assert "bin/.wh.link" in members
    assert "new.txt" in members
    assert "bin/tool" not in members
    assert tar_contents(diff_bytes(client, "l2", "l1"))["etc/hosts"] == new_hosts

    message = client.err("GraphDriver.Diff", {"ID": "l2", "Parent": "other"})
    assert "l2" in message
    message = client.err("GraphDriver.DiffSize", {"ID": "l2"})
    assert "l2" in message


def test_diff_of_empty_layer(daemon):
    client = daemon.client
    client.ok("GraphDriver.Create", {"ID": "base"})
    assert read_tar(diff_bytes(client, "base", None)) == {}
    assert client.ok("GraphDriver.Changes", {"ID": "base"}) == {"Changes": []}
    assert client.ok("GraphDriver.DiffSize", {"ID": "base"}) == {"Size": 0}


def test_diff_client_goes_away(daemon):
    client = daemon.client
    client.ok("GraphDriver.Create", {"ID": "big"})
    payload = bytes(range(1, 256)) * 40_000  # 10 MB, more than socket buffers hold
    assert client.apply_diff("big", "", make_tar([("file", "big", payload)]))[0] == 200

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(daemon.socket))
    body = b'{"ID":"big"}\n'
    head = f"POST /GraphDriver.Diff HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(body)}\r\n\r\n"
    sock.sendall(head.encode() + body)
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    sock.close()

    deadline = time.monotonic() + 20
    while "client went away" not in daemon.log():
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.1)
    assert "Error handling request" not in daemon.log()
    assert client.ok("GraphDriver.DiffSize", {"ID": "big"}) == {"Size": len(payload)}
    assert len(diff_bytes(client, "big", None)) > len(payload)


def _truncated_tar() -> bytes:
    data = make_tar([("file", "big", os.urandom(200_000))])
    return data[:150_000]


def _garbage_after_member() -> bytes:
    good = make_tar([("file", "first", b"x" * 5000)])
    # Cut the end-of-archive blocks and put random bytes where a header belongs.
    return good[: 512 + 5120] + os.urandom(4096)


BAD_TARS = {
    "truncated": _truncated_tar,
    "random bytes": lambda: os.urandom(20_000),
    "parent reference": lambda: make_tar(
        [("file", "ok", b"x" * 9000), ("file", "../x", b"evil")]
    ),
    "absolute name": lambda: make_tar(
        [("file", "ok", b"x" * 9000), ("file", "/etc/evil", b"evil")]
    ),
    "hard link to missing target": lambda: make_tar(
        [("file", "ok", b"x" * 9000), ("hardlink", "link", "missing")]
    ),
}


def _assert_layer_empty(client: PluginClient, layer_id: str, mountpoint: Path) -> None:
    assert client.ok("GraphDriver.Changes", {"ID": layer_id}) == {"Changes": []}, (
        layer_id
    )
    assert client.ok("GraphDriver.DiffSize", {"ID": layer_id}) == {"Size": 0}, layer_id
    assert list((mountpoint / layer_id).iterdir()) == [], layer_id


def test_bad_tars_leave_nothing(daemon):
    client = daemon.client
    used_before = client.status_pairs()["Data Space Used (bytes)"]
    layer_ids = []
    for number, (case, build) in enumerate(BAD_TARS.items()):
        layer_id = f"bad{number}"
        layer_ids.append(layer_id)
        client.ok("GraphDriver.Create", {"ID": layer_id})
        status, reply = client.apply_diff(layer_id, "", build())
        assert status == 500, f"{case}: {reply}"
        assert layer_id in reply["Err"], case
        _assert_layer_empty(client, layer_id, daemon.mountpoint)
        assert client.status_pairs()["Data Space Used (bytes)"] == used_before, case

    daemon.restart()
    for layer_id in layer_ids:
        _assert_layer_empty(client, layer_id, daemon.mountpoint)
    assert client.status_pairs()["Data Space Used (bytes)"] == used_before


def test_garbage_after_member_rejected(daemon):
    client = daemon.client
    client.ok("GraphDriver.Create", {"ID": "bad"})
    status, reply = client.apply_diff("bad", "", _garbage_after_member())
    assert status == 500, reply
    _assert_layer_empty(client, "bad", daemon.mountpoint)


def test_apply_diff_body_cut_off(daemon):
    """A client that disconnects mid-body leaves an empty layer, not a partial one."""
    client = daemon.client
    client.ok("GraphDriver.Create", {"ID": "cut"})
    used_before = client.status_pairs()["Data Space Used (bytes)"]
    data = make_tar([("file", f"f{i}", os.urandom(20_000)) for i in range(20)])
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(daemon.socket))
    head = (
        "POST /GraphDriver.ApplyDiff?id=cut&parent= HTTP/1.1\r\n"
        "Host: localhost\r\nAccept: application/vnd.docker.plugins.v1.2+json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    )
    sock.sendall(head.encode())
    # Send whole members only, so that what arrived would parse as a shorter tar.
    part = data[: 512 + 20_480 + 512 + 20_480]
    sock.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")
    time.sleep(0.5)
    sock.close()

    deadline = time.monotonic() + 10
    while "ApplyDiff failed for layer 'cut'" not in daemon.log():
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.1)
    _assert_layer_empty(client, "cut", daemon.mountpoint)
    assert client.status_pairs()["Data Space Used (bytes)"] == used_before


def _open_apply_diff(daemon: DaemonProcess, layer_id: str) -> socket.socket:
    """Connect and send the head of an ApplyDiff with a chunked body."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(daemon.socket))
    head = (
        f"POST /GraphDriver.ApplyDiff?id={layer_id}&parent= HTTP/1.1\r\n"
        "Host: localhost\r\nAccept: application/vnd.docker.plugins.v1.2+json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    )
    sock.sendall(head.encode())
    return sock


def _send_chunk(sock: socket.socket, data: bytes) -> None:
    sock.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n")


def _finish_apply_diff(sock: socket.socket, rest: bytes) -> tuple[int, dict]:
    """Send the rest of a chunked ApplyDiff body; return the reply's status and JSON."""
    _send_chunk(sock, rest)
    sock.sendall(b"0\r\n\r\n")
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, json.loads(response.read())


def _start_slow_apply_diff(daemon: DaemonProcess, layer_id: str) -> socket.socket:
    """Send an ApplyDiff head and one whole tar member, then leave the body open."""
    sock = _open_apply_diff(daemon, layer_id)
    part = make_tar([("file", "first", b"1" * 20_000), ("file", "second", b"2")])
    _send_chunk(sock, part[: 512 + 20_480])
    return sock


def test_remove_during_apply_diff(daemon):
    client = daemon.client
    client.ok("GraphDriver.Create", {"ID": "r-rm"})
    payload = b"x" * (10 << 20)
    data = make_tar([("file", f"f{index}", payload) for index in range(4)])
    # After 16 MiB the import has started, because the daemon buffers at most
    # about 10 MiB ahead of it (streams.MAX_PENDING_CHUNKS chunks of 1 MiB,
    # plus the reader's and the socket's buffers).
    started = 16 << 20
    sock = _open_apply_diff(daemon, "r-rm")
    try:
        for offset in range(0, started, 1 << 20):
            _send_chunk(sock, data[offset : offset + (1 << 20)])

        message = client.err("GraphDriver.Remove", {"ID": "r-rm"})
        assert "r-rm" in message
        assert "an import into the layer is running" in message
        status, reply = client.apply_diff("r-rm", "", make_tar(BASE_TAR_ENTRIES))
        assert status == 500
        assert "an import into layer r-rm is already running" in reply["Err"]

        status, reply = _finish_apply_diff(sock, data[started:])
    finally:
        sock.close()
    assert status == 200, reply
    assert reply == {"Size": 4 * len(payload)}
    client.ok("GraphDriver.Remove", {"ID": "r-rm"})
    assert client.ok("GraphDriver.Exists", {"ID": "r-rm"}) == {"Exists": False}
    assert "Traceback" not in daemon.log()


# The tar that _import_running sends: enough members that the import reads
# the body in many steps.
IMPORT_FILES = 500
IMPORT_PAYLOAD = b"i" * 1000


@contextlib.contextmanager
def _import_running(daemon: DaemonProcess, layer_id: str) -> Iterator[None]:
    """Run the block while an ApplyDiff imports into ``layer_id``, then finish it.

    The block starts once the daemon has read the first tenth of the tar and
    the import has started. After the block the rest of the tar goes out,
    and the ApplyDiff must succeed.
    """
    entries = [("file", f"f{index}", IMPORT_PAYLOAD) for index in range(IMPORT_FILES)]
    data = make_tar(entries)
    first = len(data) // 10
    sock = _open_apply_diff(daemon, layer_id)
    try:
        _send_chunk(sock, data[:first])
        wait_for_log(
            daemon, f"GraphDriver.ApplyDiff of layer {layer_id!r}: import started"
        )
        yield
        status, reply = _finish_apply_diff(sock, data[first:])
    finally:
        sock.close()
    assert status == 200, reply
    assert reply == {"Size": IMPORT_FILES * len(IMPORT_PAYLOAD)}


def test_create_during_import(daemon):
    client = daemon.client
    client.ok("GraphDriver.Create", {"ID": "imp"})
    with _import_running(daemon, "imp"):
        for call in ("GraphDriver.Create", "GraphDriver.CreateReadWrite"):
            message = client.err(call, {"ID": "impchild", "Parent": "imp"})
            assert "impchild" in message, call
            assert "an import into layer imp is running" in message, call
            assert "retry after the ApplyDiff finishes" in message, call
    assert "rolling back the import into layer imp" not in daemon.log()
    client.ok("GraphDriver.Create", {"ID": "impchild", "Parent": "imp"})
    assert client.ok("GraphDriver.Exists", {"ID": "impchild"}) == {"Exists": True}


def test_diff_during_import(daemon):
    client = daemon.client
    client.ok("GraphDriver.Create", {"ID": "imp"})
    with _import_running(daemon, "imp"):
        for call in ("GraphDriver.Diff", "GraphDriver.Changes", "GraphDriver.DiffSize"):
            message = client.err(call, {"ID": "imp"})
            assert "layer imp cannot be read" in message, call
            assert "an import into the layer is running" in message, call
            assert "retry after the ApplyDiff finishes" in message, call
    size = IMPORT_FILES * len(IMPORT_PAYLOAD)
    assert client.ok("GraphDriver.DiffSize", {"ID": "imp"}) == {"Size": size}
    changes = client.ok("GraphDriver.Changes", {"ID": "imp"})["Changes"]
    assert len(changes) == IMPORT_FILES
    assert len(tar_contents(diff_bytes(client, "imp", None))) == IMPORT_FILES


def test_sigterm_during_apply_diff(daemon):
    """A stop that cancels an import rolls it back before the store is closed."""
    client = daemon.client
    client.ok("GraphDriver.Create", {"ID": "slow"})
    sock = _start_slow_apply_diff(daemon, "slow")
    try:
        deadline = time.monotonic() + 10
        while "GraphDriver.ApplyDiff for layer 'slow'" not in daemon.log():
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.05)
        started = time.monotonic()
        assert daemon.stop(signal.SIGTERM) == 0
        # --stop-timeout 1 below, plus the rollback and unmount.
        assert time.monotonic() - started < 10
    finally:
        sock.close()
    log = daemon.log()
    assert "ApplyDiff of layer 'slow' cancelled because the daemon is stopping" in log
    assert "rolling back the import into layer slow" in log
    assert mount_type(daemon.mountpoint) is None

    daemon.start()
    _assert_layer_empty(client, "slow", daemon.mountpoint)


# -- process life ------------------------------------------------------------


def test_sigterm_unmounts_and_exits_zero(daemon):
    client = daemon.client
    client.ok("GraphDriver.Create", {"ID": "base"})
    directory = client.ok("GraphDriver.Get", {"ID": "base"})["Dir"]
    Path(directory, "file").write_bytes(b"data")
    assert mount_type(daemon.mountpoint) == "fuse.lcfs"

    assert daemon.stop(signal.SIGTERM) == 0
    assert mount_type(daemon.mountpoint) is None
    assert not daemon.socket.exists()
    assert not daemon.pid_file.exists()
    log = daemon.log()
    assert "lcfs daemon stopping on SIGTERM" in log
    assert "lcfs daemon stopped" in log

    daemon.start()
    assert (daemon.mountpoint / "base" / "file").read_bytes() == b"data"
    assert daemon.stop(signal.SIGINT) == 0
    assert mount_type(daemon.mountpoint) is None


def test_restart_after_sigkill(daemon):
    """A daemon killed without unmounting is replaced cleanly by the next one."""
    client = daemon.client
    client.ok("GraphDriver.Create", {"ID": "base"})
    Path(client.ok("GraphDriver.Get", {"ID": "base"})["Dir"], "file").write_bytes(b"x")
    client.ok("GraphDriver.Put", {"ID": "base"})
    daemon.stop(signal.SIGKILL)

    daemon.start()
    assert (daemon.mountpoint / "base" / "file").read_bytes() == b"x"
    target = os.path.realpath(daemon.mountpoint)
    with open("/proc/self/mountinfo") as f:
        stacked = [line for line in f if _unescape_mountinfo(line.split()[4]) == target]
    assert len(stacked) == 1, stacked
    assert daemon.stop() == 0
    assert mount_type(daemon.mountpoint) is None


def test_second_daemon_rejected(daemon, tmp_path):
    other = DaemonProcess(tmp_path / "other")
    (tmp_path / "other").mkdir()
    other.socket = daemon.socket
    other.mount_paths = {other.mountpoint}
    try:
        process = other.spawn(other.command("--log-level", "info"), other.log_path)
        assert process.wait(START_TIMEOUT) == 2
    finally:
        other.kill()
    message = other.log()
    assert str(daemon.socket) in message
    assert "Traceback" not in message
    assert daemon.client.ok("Plugin.Activate") == {"Implements": ["GraphDriver"]}


def test_stale_socket_replaced(tmp_path):
    handle = DaemonProcess(tmp_path)
    handle.socket.parent.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(handle.socket))
    stale.close()
    assert handle.socket.exists()
    try:
        handle.start()
        assert handle.client.ok("Plugin.Activate") == {"Implements": ["GraphDriver"]}
        assert "removing stale socket" in handle.log()
    finally:
        handle.kill()


# -- the lcfs command ----------------------------------------------------------


def run_lcfs(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "lcfs.cli", *args],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )


def test_mkfs_and_layers(tmp_path):
    image = str(tmp_path / "cli.img")
    result = run_lcfs("mkfs", image, "--size", "256M")
    assert result.returncode == 0, result.stderr
    assert os.path.getsize(image) == 256 << 20

    result = run_lcfs("mkfs", image, "--size", "256M")
    assert result.returncode == 2
    assert image in result.stderr
    assert "--force" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1

    result = run_lcfs("layers", "--device", image)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ID", "PARENT", "FROZEN"]


def test_layers_lists_daemon_layers(daemon):
    client = daemon.client
    client.ok("GraphDriver.Create", {"ID": "base"})
    client.ok("GraphDriver.Create", {"ID": "top", "Parent": "base"})

    expected = [
        ["ID", "PARENT", "FROZEN"],
        ["base", "-", "yes"],
        ["top", "base", "no"],
    ]
    # While the daemon has the device locked, the list comes from its socket.
    result = run_lcfs("layers", "--device", str(daemon.image), "--socket", str(daemon.socket))
    assert result.returncode == 0, result.stderr
    assert [line.split() for line in result.stdout.splitlines()] == expected

    assert daemon.stop() == 0
    result = run_lcfs("layers", "--device", str(daemon.image))
    assert result.returncode == 0, result.stderr
    assert [line.split() for line in result.stdout.splitlines()] == expected


def test_layers_of_busy_device_error(daemon, tmp_path):
    missing = tmp_path / "no-such.sock"
    result = run_lcfs("layers", "--device", str(daemon.image), "--socket", str(missing))
    assert result.returncode == 2
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1
    assert f"{daemon.image} is in use by pid {daemon.process.pid}" in message
    assert str(missing) in message
    assert "--socket" in message

    # A device that another process has locked, asked through a daemon that
    # serves a different device, is not listed with that daemon's layers.
    other = tmp_path / "other.img"
    assert run_lcfs("mkfs", str(other), "--size", "64M").returncode == 0
    with open(other, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        result = run_lcfs("layers", "--device", str(other), "--socket", str(daemon.socket))
    assert result.returncode == 2
    message = result.stderr.strip()
    assert f"{other} is in use by pid {os.getpid()}" in message
    assert f"serves another device ({daemon.image})" in message
    assert result.stdout == ""


@pytest.mark.parametrize("size", ["10Q", "-5", "1.5"])
def test_bad_size_is_one_line(tmp_path, size):
    result = run_lcfs("mkfs", str(tmp_path / "x.img"), "--size", size)
    assert result.returncode == 2
    assert size in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.img").exists()
