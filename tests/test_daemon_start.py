"""Start-up checks of `lcfs daemon` against real daemons, devices and mounts.

Each test runs a real daemon on a small image file and starts a second
`lcfs daemon` that must fail, or must start, with the message given.
Teardown stops every daemon and unmounts what is left under tmp_path.
"""

import errno
import os
import signal
import subprocess
from pathlib import Path

import pytest
from lcfs_daemon import LcfsDaemon, lcfs_command, running_lcfs
from mounts import mount_table, unmount_under
from test_fuse_features import watchdog_of

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
