"""scripts/start-daemon.sh, which scripts/install.sh runs to start the daemon.

Each test runs the script with a prefix whose bin/lcfs runs this
checkout's `lcfs`, and an image file, socket, pid file and log under
tmp_path. The daemon gets no Init, so it mounts nothing. Teardown stops
it by the pid in its pid file.
"""

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from lcfs_daemon import lcfs_command
from mounts import unmount_under

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "start-daemon.sh"

# Seconds the script and a stopping daemon may take.
TIMEOUT = 60
# Seconds teardown waits for a daemon's pid after a failed run.
PID_WAIT = 10


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def dead_pid() -> int:
    """Return the pid of a process that has exited and been reaped."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def accepts_connections(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


class Setup:
    """Paths and environment of script runs under one work directory."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.prefix = workdir / "prefix"
        self.socket = workdir / "lcfs.sock"
        self.pid_file = workdir / "lcfs.pid"
        self.log = workdir / "lcfs.log"
        self.device = workdir / "lcfs.img"
        # The pid that a test leaves in the pid file as a killed daemon's.
        self.stale_pid: int | None = None
        bin_dir = self.prefix / "bin"
        bin_dir.mkdir(parents=True)
        wrapper = bin_dir / "lcfs"
        wrapper.write_text(f'#!/bin/sh\nexec "{lcfs_command()}" "$@"\n')
        wrapper.chmod(0o755)

    def run(self, *options: str) -> subprocess.CompletedProcess:
        environment = dict(
            os.environ,
            LCFS_PREFIX=str(self.prefix),
            LCFS_LOG=str(self.log),
            LCFS_SOCKET=str(self.socket),
            LCFS_PID_FILE=str(self.pid_file),
        )
        return subprocess.run(
            [str(SCRIPT), "--device", str(self.device), "--size", "1G", *options],
            env=environment,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )

    def daemon_pid(self) -> int | None:
        """Return the live pid in the pid file, unless it is the stale one."""
        try:
            pid = int(self.pid_file.read_text())
        except (FileNotFoundError, ValueError):
            return None
        if pid == self.stale_pid or not process_alive(pid):
            return None
        return pid

    def stop(self) -> None:
        """Stop the daemon that the script started, if it is alive.

        A failed run can return before the daemon writes its pid, so this
        waits up to PID_WAIT seconds for it.
        """
        deadline = time.monotonic() + PID_WAIT
        pid = self.daemon_pid()
        while pid is None and time.monotonic() < deadline:
            time.sleep(0.1)
            pid = self.daemon_pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + TIMEOUT
        while process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if process_alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def setup(tmp_path):
    started = Setup(tmp_path)
    try:
        yield started
    finally:
        started.stop()
        unmount_under(tmp_path)


def test_start_with_stale_socket_and_pid(setup):
    # A daemon killed with SIGKILL leaves both files behind.
    stale_pid = dead_pid()
    setup.stale_pid = stale_pid
    setup.pid_file.write_text(f"{stale_pid}\n")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(setup.socket))
    stale.close()

    result = setup.run()

    assert result.returncode == 0, result.stderr
    pid = int(setup.pid_file.read_text())
    assert pid != stale_pid
    assert f"started with pid {pid};" in result.stdout
    assert process_alive(pid)
    assert accepts_connections(setup.socket)


def test_start_twice_reports_running(setup):
    first = setup.run()
    assert first.returncode == 0, first.stderr
    pid = int(setup.pid_file.read_text())

    second = setup.run()

    assert second.returncode == 0, second.stderr
    assert f"already running with pid {pid};" in second.stdout
    assert int(setup.pid_file.read_text()) == pid


def test_failed_start_returns_at_once(setup):
    started = time.monotonic()

    result = setup.run("--log-level", "chatty")

    # Without watching the daemon, the script waits 30 s for a socket.
    assert time.monotonic() - started < 10
    assert result.returncode == 1
    assert "lcfs daemon exited with status 2 before it listened" in result.stderr
    # The end of the log, which names the bad value, follows.
    assert "chatty" in result.stderr
    assert setup.daemon_pid() is None
