"""Start-up checks of `lcfs daemon` and `lcfs mkfs` against real devices and mounts.

Each test runs a real daemon on a small image file and starts a second
`lcfs daemon` that must fail, or must start, with the message given.
Teardown stops every daemon and unmounts what is left under tmp_path.
"""

import errno
import io
import os
import signal
import ssl
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from lcfs_daemon import (
    LcfsDaemon,
    PluginError,
    fsck_command,
    lcfs_command,
    running_lcfs,
)
from mounts import mount_table, unmount_under
from test_fuse_features import watchdog_of

from lcfs import cli
from lcfs.store import Store
from lcfs.store.format import read_superblock

# Seconds a daemon that must fail at start may take to exit.
START_TIMEOUT = 60


@pytest.fixture
def workdir(tmp_path):
    """tmp_path, with every mount left under it unmounted at teardown."""
    try:
        yield tmp_path
    finally:
        unmount_under(tmp_path)


def run_daemon(*options: str) -> subprocess.CompletedProcess:
    """Run `lcfs daemon` with ``options`` until it exits.

    A daemon still running after START_TIMEOUT s gets SIGTERM, and SIGKILL
    after START_TIMEOUT s more.
    """
    process = subprocess.Popen(
        [lcfs_command(), "daemon", *options],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=START_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        try:
            output, _ = process.communicate(timeout=START_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        output += f"\n[still running after {START_TIMEOUT} s; stopped by the test]"
    return subprocess.CompletedProcess(process.args, process.returncode, output)


def lcfs_mounts_at(path: Path) -> int:
    """Return how many fuse.lcfs mounts /proc/self/mountinfo lists at ``path``."""
    target = os.path.realpath(path)
    return sum(
        1
        for point, fstype in mount_table()
        if point == target and fstype == "fuse.lcfs"
    )


def daemon_a(workdir: Path) -> LcfsDaemon:
    return LcfsDaemon(workdir / "a", size="64M", mountpoint=workdir / "a.mnt")


def test_mount_over_live_mount(workdir):
    with running_lcfs(daemon_a(workdir)) as a:
        a.call("GraphDriver.Create", {"ID": "base"})
        result = run_daemon(
            "--device", str(workdir / "c.img"), "--size", "64M",
            "--socket", str(workdir / "c.sock"), "--mountpoint", str(a.mountpoint),
        )  # fmt: skip
        assert result.returncode == 2, result.stdout
        assert f"is live at {a.mountpoint}" in result.stdout
        assert "another lcfs mount" in result.stdout
        assert lcfs_mounts_at(a.mountpoint) == 1
        assert os.listdir(a.mountpoint) == ["base"]
        assert not (workdir / "c.pid").exists()


def test_mount_over_stale_mount(workdir):
    a = daemon_a(workdir).start()
    try:
        watchdog = watchdog_of(a.process.pid)
        os.kill(watchdog, signal.SIGKILL)
        os.kill(a.process.pid, signal.SIGKILL)
        a.process.wait(START_TIMEOUT)
    finally:
        a.stop()
    with pytest.raises(OSError) as stale:
        os.statvfs(a.mountpoint)
    assert stale.value.errno == errno.ENOTCONN
    b = LcfsDaemon(workdir / "b", size="64M", mountpoint=a.mountpoint)
    with running_lcfs(b):
        assert "detaching stale lcfs mount" in b.log_tail()
        assert lcfs_mounts_at(a.mountpoint) == 1


def test_busy_device_keeps_pid_file(workdir):
    with running_lcfs(daemon_a(workdir)) as a:
        pid_file = a.workdir / "lcfs.pid"
        result = run_daemon(
            "--device", str(a.device), "--socket", str(workdir / "b.sock"),
            "--pid-file", str(pid_file), "--mountpoint", str(workdir / "b.mnt"),
        )  # fmt: skip
        assert result.returncode == 2, result.stdout
        assert f"is in use by pid {a.process.pid}" in result.stdout
        assert "(another lcfs daemon, for example) first, or pass another --device" in result.stdout
        assert pid_file.read_text() == f"{a.process.pid}\n"


HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_device_held_briefly(workdir):
    """A daemon that starts while a command such as lcfs layers reads the device waits for it."""
    b = LcfsDaemon(workdir / "b", size="64M", mountpoint=workdir / "b.mnt")
    b.workdir.mkdir()
    assert run_lcfs("mkfs", "--size", "64M", str(b.device)).returncode == 0
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(b.device), "1.5"], stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout.readline() == b"locked\n"
        with running_lcfs(b):
            log_text = b.log_tail(20000)
    finally:
        holder.wait(timeout=10)
    assert f"is in use by pid {holder.pid} ({sys.executable} -c" in log_text
    assert "waiting up to 3 s for it to be released" in log_text


def test_pid_file_of_running_process(workdir):
    pid_file = workdir / "b.pid"
    pid_file.write_text(f"{os.getpid()}\n")
    result = run_daemon(
        "--device", str(workdir / "b.img"), "--size", "64M",
        "--socket", str(workdir / "b.sock"), "--pid-file", str(pid_file),
        "--mountpoint", str(workdir / "b.mnt"),
    )  # fmt: skip
    assert result.returncode == 2, result.stdout
    assert f"pid file {pid_file} names running process {os.getpid()}" in result.stdout
    assert pid_file.read_text() == f"{os.getpid()}\n"


def test_exit_keeps_replaced_pid_file(workdir):
    a = daemon_a(workdir)
    pid_file = a.workdir / "lcfs.pid"
    with running_lcfs(a):
        assert pid_file.read_text() == f"{a.process.pid}\n"
        pid_file.write_text("1\n")
    assert a.returncode == 0
    assert pid_file.read_text() == "1\n"
    assert "not removing pid file" in a.log_tail()


def test_exit_removes_own_pid_file(workdir):
    a = daemon_a(workdir)
    with running_lcfs(a):
        pass
    assert a.returncode == 0
    assert not (a.workdir / "lcfs.pid").exists()


def test_size_zero_rejected(workdir):
    device = workdir / "zero.img"
    result = run_daemon(
        "--device", str(device), "--size", "0", "--socket", str(workdir / "z.sock"),
        "--mountpoint", str(workdir / "z.mnt"),
    )  # fmt: skip
    assert result.returncode == 2, result.stdout
    assert f"{device}: 0 bytes leave no room for data" in result.stdout
    assert "give it a size of at least 16842752 bytes" in result.stdout
    assert not device.exists()


def test_socket_path_too_long(workdir):
    directory = workdir / ("d" * 120)
    directory.mkdir()
    socket_path = directory / "lcfs.sock"
    result = run_daemon(
        "--device", str(workdir / "long.img"), "--size", "64M",
        "--socket", str(socket_path), "--mountpoint", str(workdir / "long.mnt"),
    )  # fmt: skip
    assert result.returncode == 2, result.stdout
    assert f"socket path {socket_path} is too long" in result.stdout
    assert "at most 107 bytes" in result.stdout
    assert not (workdir / "long.img").exists()


def test_socket_served_names_pid(workdir):
    with running_lcfs(daemon_a(workdir)) as a:
        result = run_daemon(
            "--device", str(workdir / "b.img"), "--size", "64M",
            "--socket", str(a.socket_path), "--mountpoint", str(workdir / "b.mnt"),
        )  # fmt: skip
        assert result.returncode == 2, result.stdout
        assert f"{a.socket_path} is served by pid {a.process.pid}" in result.stdout
        assert "stop that process first or pass another --socket" in result.stdout
        assert not (workdir / "b.img").exists()


def test_docker_root_none_skips_orphans(workdir):
    # A managed plugin cannot see Docker's data root, because the parent of
    # its driver home is the plugin's propagated mount.
    daemon = LcfsDaemon(workdir / "a", size="64M", mountpoint=workdir / "a.mnt",
                        options=("--docker-root", "none"))  # fmt: skip
    daemon.start()
    try:
        daemon.call("GraphDriver.Create", {"ID": "base"})
    finally:
        assert daemon.stop() == 0
    log_text = daemon.log_tail(20000)
    assert "(--docker-root none)" in log_text
    assert "layer references" not in log_text
    assert "WARNING" not in log_text


def daemon_options(
    workdir: Path,
    name: str,
    device: Path | None = None,
    socket: Path | None = None,
    mountpoint: Path | None = None,
    pid_file: Path | None = None,
) -> list[str]:
    """Return `lcfs daemon` options for a daemon ``name`` with its files in ``workdir``.

    The device defaults to a new 64 MiB image ``name``.img.
    """
    options = [
        "--device", str(device or workdir / f"{name}.img"), "--size", "64M",
        "--socket", str(socket or workdir / f"{name}.sock"),
        "--mountpoint", str(mountpoint or workdir / f"{name}.mnt"),
    ]  # fmt: skip
    if pid_file is not None:
        options += ["--pid-file", str(pid_file)]
    return options


def run_lcfs(*arguments: str) -> subprocess.CompletedProcess:
    """Run `lcfs` with ``arguments`` and return the result, stderr merged into stdout."""
    return subprocess.run(
        [lcfs_command(), *arguments],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=START_TIMEOUT,
        check=False,
    )


def write_tar(path: Path) -> bytes:
    """Write a small tar archive to ``path`` and return its bytes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        member = tarfile.TarInfo("etc/hostname")
        content = b"keep\n"
        member.size = len(content)
        archive.addfile(member, io.BytesIO(content))
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def make_store(path: Path) -> dict:
    """Format a 64 MiB image at ``path`` with one layer and return its superblock."""
    superblock = Store.mkfs(str(path), size=64 << 20)
    with Store.open(str(path)) as store:
        store.create_layer("base")
    return superblock


@pytest.mark.parametrize("name", ["same path", "hard link"])
def test_pid_file_is_device(workdir, name):
    device = workdir / "pf.img"
    superblock = make_store(device)
    pid_file = device if name == "same path" else workdir / "pf.pid"
    if name == "hard link":
        os.link(device, pid_file)
    result = run_daemon(
        *daemon_options(workdir, "pf", device=device, pid_file=pid_file)
    )
    assert result.returncode == 2, result.stdout
    assert f"--pid-file {pid_file} is the device" in result.stdout
    assert device.stat().st_size == 64 << 20
    assert read_superblock(str(device))["uuid"] == superblock["uuid"]
    with Store.open(str(device)) as store:
        assert [layer.id for layer in store.list_layers()] == ["base"]


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("pid_file", "--pid-file {path} exists and does not contain just a pid"),
        ("device", "{path} holds no lcfs store"),
    ],
)
def test_data_file_kept(workdir, option, message):
    path = workdir / "keep.tar"
    content = write_tar(path)
    result = run_daemon(*daemon_options(workdir, "keep", **{option: path}))
    assert result.returncode == 2, result.stdout
    assert message.format(path=path) in result.stdout
    assert path.read_bytes() == content
    assert not (workdir / "keep.img").exists()


@pytest.mark.parametrize("kind", ["directory", "FIFO"])
def test_pid_file_not_regular(workdir, kind):
    pid_file = workdir / "pf.pid"
    if kind == "directory":
        pid_file.mkdir()
    else:
        os.mkfifo(pid_file)
    result = run_daemon(*daemon_options(workdir, "pf", pid_file=pid_file))
    assert result.returncode == 2, result.stdout
    assert f"--pid-file {pid_file} is a {kind}, not a regular file" in result.stdout
    assert "Errno" not in result.stdout
    assert pid_file.is_dir() == (kind == "directory")
    assert not (workdir / "pf.img").exists()


def test_stale_pid_file_replaced(workdir):
    exited = subprocess.Popen(["true"])
    exited.wait()
    a = daemon_a(workdir)
    pid_file = a.workdir / "lcfs.pid"
    a.workdir.mkdir()
    pid_file.write_text(f"{exited.pid}\n")
    with running_lcfs(a):
        assert pid_file.read_text() == f"{a.process.pid}\n"
    assert a.returncode == 0
    assert not pid_file.exists()


def test_mkfs_refuses_data_file(workdir):
    path = workdir / "victim.bin"
    content = write_tar(path)
    result = run_lcfs("mkfs", str(path))
    assert result.returncode == 2, result.stdout
    assert f"{path} contains data and no lcfs store" in result.stdout
    assert "pass --force to format it, which destroys its contents" in result.stdout
    assert path.read_bytes() == content
    forced = run_lcfs("mkfs", "--force", "--size", "64M", str(path))
    assert forced.returncode == 0, forced.stdout
    assert read_superblock(str(path))["magic"] == "lcfs"


@pytest.mark.parametrize("content", ["size 0", "zeros", "data after 1 MiB"])
def test_mkfs_formats_empty_file(workdir, content):
    path = workdir / "empty.img"
    path.touch()
    if content != "size 0":
        os.truncate(path, 64 << 20)
    if content == "data after 1 MiB":
        with open(path, "r+b") as f:
            f.seek(1 << 20)
            f.write(b"x")
    result = run_lcfs("mkfs", "--size", "64M", str(path))
    assert result.returncode == 0, result.stdout
    assert read_superblock(str(path))["magic"] == "lcfs"


def test_mkfs_missing_file_without_size(workdir):
    path = workdir / "new.img"
    result = run_lcfs("mkfs", str(path))
    assert result.returncode == 2, result.stdout
    assert f"{path} does not exist" in result.stdout
    assert "pass --size SIZE to create it as a new image file" in result.stdout
    assert not path.exists()


def test_mkfs_busy_device(workdir):
    with running_lcfs(daemon_a(workdir)) as a:
        result = run_lcfs("mkfs", "--force", str(a.device))
        assert result.returncode == 2, result.stdout
        assert f"{a.device} is in use by pid {a.process.pid}" in result.stdout
        assert "stop that process (an lcfs daemon, for example)" in result.stdout
        assert "run lcfs mkfs again" in result.stdout


@pytest.fixture
def loop_device(workdir):
    """A loop device over a 64 MiB file of zeros in workdir, detached at teardown."""
    backing = workdir / "loop.img"
    with open(backing, "wb") as f:
        f.truncate(64 << 20)
    try:
        device = subprocess.run(
            ["losetup", "--find", "--show", str(backing)],
            check=True, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"no loop device available: {error}")
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


def test_mkfs_block_device(loop_device):
    with open(loop_device, "r+b") as f:
        f.seek(512 << 10)
        f.write(b"data")
    rejected = run_lcfs("mkfs", loop_device)
    assert rejected.returncode == 2, rejected.stdout
    assert f"{loop_device} contains data and no lcfs store" in rejected.stdout
    with open(loop_device, "rb") as f:
        f.seek(512 << 10)
        assert f.read(4) == b"data"
    with open(loop_device, "r+b") as f:
        f.write(bytes(1 << 20))
    formatted = run_lcfs("mkfs", loop_device)
    assert formatted.returncode == 0, formatted.stdout
    assert read_superblock(loop_device)["magic"] == "lcfs"


@pytest.mark.parametrize("below", ["l2", "l2/sub"])
def test_mount_inside_live_mount(workdir, below):
    with running_lcfs(daemon_a(workdir)) as a:
        a.call("GraphDriver.Create", {"ID": "l2"})
        mountpoint = a.mountpoint / below
        result = run_daemon(*daemon_options(workdir, "e", mountpoint=mountpoint))
        assert result.returncode == 2, result.stdout
        assert (
            f"mount point {mountpoint} is inside the live lcfs mount at {a.mountpoint}"
            in result.stdout
        )
        assert lcfs_mounts_at(mountpoint) == 0
        assert os.listdir(a.mountpoint / "l2") == []
        assert not (workdir / "e.img").exists()
        assert not (workdir / "e.pid").exists()


def test_init_home_inside_live_mount(workdir):
    with running_lcfs(daemon_a(workdir)) as a:
        a.call("GraphDriver.Create", {"ID": "l2"})
        home = a.mountpoint / "l2" / "home"
        with running_lcfs(LcfsDaemon(workdir / "b", size="64M")) as b:
            with pytest.raises(PluginError) as info:
                b.call("GraphDriver.Init", {"Home": str(home)})
        assert f"inside the live lcfs mount at {a.mountpoint}" in str(info.value)
        assert os.listdir(a.mountpoint / "l2") == []
        assert lcfs_mounts_at(home) == 0


def test_device_directory(workdir):
    device = workdir / "dir.img"
    device.mkdir()
    result = run_daemon(*daemon_options(workdir, "dir", device=device))
    assert result.returncode == 2, result.stdout
    assert f"--device {device} is a directory" in result.stdout
    assert "pass --device an image file" in result.stdout
    assert "Errno" not in result.stdout


@pytest.fixture
def missing_dev_path():
    """A path in /dev that names no device, removed again if a test creates it."""
    path = Path(f"/dev/lcfs-missing-{os.getpid()}")
    assert not path.exists()
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def test_missing_block_device(workdir, missing_dev_path):
    device = missing_dev_path
    result = run_daemon(*daemon_options(workdir, "dev", device=device))
    assert result.returncode == 2, result.stdout
    assert f"--device: block device {device} not found" in result.stdout
    assert "pass an image file path outside /dev" in result.stdout
    assert not device.exists()

    formatted = run_lcfs("mkfs", "--size", "64M", str(device))
    assert formatted.returncode == 2, formatted.stdout
    assert f"block device {device} not found" in formatted.stdout
    assert not device.exists()

    checked = subprocess.run(
        [fsck_command(), str(device)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 8, checked.stderr
    assert f"block device {device} not found" in checked.stderr
    assert "lcfs mkfs" not in checked.stderr


def test_socket_in_read_only_mount(workdir):
    mountpoint = workdir / "ro.mnt"
    socket_path = mountpoint / "ro.sock"
    result = run_daemon(
        *daemon_options(workdir, "ro", socket=socket_path, mountpoint=mountpoint)
    )
    assert result.returncode == 2, result.stdout
    assert (
        f"cannot listen on --socket {socket_path}: Read-only file system"
        in result.stdout
    )
    assert "Errno" not in result.stdout
    assert lcfs_mounts_at(mountpoint) == 0
    assert not (workdir / "ro.img").exists()


def test_size_too_large(workdir):
    size = 99999 << 40
    probe = workdir / "probe.img"
    with open(probe, "wb") as f:
        try:
            f.truncate(size)
        except OSError:
            allowed = False
        else:
            allowed = True
    probe.unlink()
    if allowed:
        pytest.skip(f"the file system under {workdir} allows files of 99999 TiB")
    device = workdir / "big.img"
    options = daemon_options(workdir, "big", device=device)
    options[options.index("--size") + 1] = "99999T"
    result = run_daemon(*options)
    assert result.returncode == 2, result.stdout
    assert (
        f"cannot set the size of image file {device} to {size} bytes: File too large"
        in result.stdout
    )
    assert "give a smaller --size" in result.stdout
    assert not device.exists()


def test_mount_failure_removes_new_image(workdir):
    blocker = workdir / "file"
    blocker.write_text("not a directory\n")
    mountpoint = blocker / "mnt"
    result = run_daemon(*daemon_options(workdir, "mf", mountpoint=mountpoint))
    assert result.returncode == 2, result.stdout
    assert f"cannot create mount point {mountpoint}" in result.stdout
    assert not (workdir / "mf.img").exists()
    assert not (workdir / "mf.pid").exists()


def test_mount_failure_keeps_existing_image(workdir):
    device = workdir / "mf.img"
    superblock = make_store(device)
    mountpoint = workdir / "file" / "mnt"
    mountpoint.parent.write_text("not a directory\n")
    result = run_daemon(
        *daemon_options(workdir, "mf", device=device, mountpoint=mountpoint)
    )
    assert result.returncode == 2, result.stdout
    assert f"cannot create mount point {mountpoint}" in result.stdout
    assert read_superblock(str(device))["uuid"] == superblock["uuid"]


def test_aiohttp_imported_without_ca_certificates(monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt")
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    with cli._without_ca_certificates():
        # A context built inside, as aiohttp builds two at import, loads no CA.
        assert ssl.create_default_context().cert_store_stats()["x509_ca"] == 0
    # The daemon's children, and TLS after the imports, see the old values.
    assert os.environ["SSL_CERT_FILE"] == "/etc/ssl/certs/ca-certificates.crt"
    assert "SSL_CERT_DIR" not in os.environ
