"""Start-up checks of `lcfs daemon` and `lcfs mkfs` against real devices and mounts.

Each test runs a real daemon on a small image file and starts a second
`lcfs daemon` that must fail, or must start, with the message given.
Teardown stops every daemon and unmounts what is left under tmp_path.
"""

import errno
import io
import os
import signal
import subprocess
import tarfile
from pathlib import Path

import pytest
from lcfs_daemon import LcfsDaemon, lcfs_command, running_lcfs
from mounts import mount_table, unmount_under
from test_fuse_features import watchdog_of

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
    """Run `lcfs daemon` with ``options`` until it exits, or send SIGTERM after START_TIMEOUT s."""
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
        output, _ = process.communicate(timeout=START_TIMEOUT)
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
        assert pid_file.read_text() == f"{a.process.pid}\n"


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
    refused = run_lcfs("mkfs", loop_device)
    assert refused.returncode == 2, refused.stdout
    assert f"{loop_device} contains data and no lcfs store" in refused.stdout
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
