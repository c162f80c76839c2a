"""Paths, system probes and statistics shared by the benchmark modules.

The dockerd, lcfs daemon, mount and root filesystem helpers live in tests/
(dockerd.py, lcfs_daemon.py, mounts.py, rootfs.py, snapshotter_helpers.py).
Importing this module puts tests/ on sys.path so the benchmarks drive the
same daemons, in the same isolation, as the end-to-end tests.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import logging
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Self

REPO_ROOT = Path(__file__).resolve().parent.parent
TESTS_DIR = REPO_ROOT / "tests"
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

MIB = 1 << 20
GIB = 1 << 30

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Return the directory that keeps generated layer tars between runs."""
    path = Path(os.environ.get("LCFS_BENCH_CACHE") or REPO_ROOT / ".cache" / "bench")
    path.mkdir(parents=True, exist_ok=True)
    return path


def drop_caches() -> None:
    """Write back dirty pages, then drop the page, dentry and inode caches."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    time.sleep(0.5)


def meminfo_kib(field: str = "Cached") -> int:
    """Return one field of /proc/meminfo in KiB."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/meminfo has no {field} line")


def process_status_kib(pid: int, field: str) -> int:
    """Return a memory field of /proc/PID/status (VmRSS, VmHWM) in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {field} line")


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def machine_cpu_seconds() -> float:
    """Return the CPU seconds all CPUs have spent busy since boot.

    Busy is user, nice, system, irq and softirq time in /proc/stat. Idle
    time, I/O wait and time stolen by a hypervisor are left out.
    """
    with open("/proc/stat") as f:
        fields = f.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[1:8])
    return (user + nice + system + irq + softirq) / _CLOCK_TICKS


def process_cpu_seconds(pid: int) -> float:
    """Return the user and system CPU seconds of all threads of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    # The command name may contain spaces, so count fields from its closing parenthesis.
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


# FS_IOC_GETFLAGS, FS_IOC_SETFLAGS and FS_TOPDIR_FL from <linux/fs.h>.
_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602
_FS_TOPDIR_FL = 0x00020000


def spread_subdirectories(directory: Path) -> bool:
    """Mark ``directory`` so that ext4 spreads its new subdirectories over the block groups.

    ext4 allocates a directory's files in the block group of the directory,
    and a subdirectory near its parent unless the parent is the root or has
    the top-directory flag (``chattr +T``). Without a journal, ext4 also
    skips every inode of the group freed in the last 60 seconds, or 360 if
    its inode table block is not yet written back (``recently_deleted`` in
    fs/ext4/ialloc.c). That scan grows with the number of such inodes.
    With the flag, the drivers' data roots land in different groups, so one
    driver does not pay for the files another deleted. Returns False where
    the file system has no such flag.
    """
    flags = array.array("i", [0])
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, flags, True)
        flags[0] |= _FS_TOPDIR_FL
        fcntl.ioctl(fd, _FS_IOC_SETFLAGS, flags, True)
    except OSError as error:
        log.info(
            "setting the top-directory flag on %s failed (%s), so the data roots "
            "may share ext4 block groups",
            directory,
            error,
        )
        return False
    finally:
        os.close(fd)
    return True


@contextlib.contextmanager
def journaled_ext4(directory: Path, size: str) -> Iterator[Path]:
    """Mount a new ext4 file system with a journal under ``directory`` and yield its path.

    The file system is made on a sparse image file of ``size``, in any form
    that truncate(1) accepts. It is mounted through a loop device with
    direct I/O, so that the page cache of the file system below does not
    keep a second copy of its data. On leaving, everything mounted at or
    under it is unmounted, and the loop device and the image file are
    removed, with the daemons' logs that were written there.
    """
    from mounts import unmount_under

    image = directory / "data-fs.img"
    mountpoint = directory / "fs"
    subprocess.run(["truncate", "-s", size, str(image)], check=True)
    try:
        subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
        loop = subprocess.run(
            ["losetup", "--find", "--show", "--direct-io=on", str(image)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        try:
            mountpoint.mkdir()
            subprocess.run(["mount", loop, str(mountpoint)], check=True)
            log.info(
                "data roots on ext4 with a journal at %s (%s, %s)",
                mountpoint,
                loop,
                size,
            )
            try:
                yield mountpoint
            finally:
                unmount_under(mountpoint)
        finally:
            subprocess.run(["losetup", "--detach", loop], check=False)
    finally:
        image.unlink(missing_ok=True)


def load_average() -> str:
    """Return the 1, 5 and 15 minute load averages as text."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def wait_for_quiet_machine(limit: float, max_wait: float) -> str:
    """Sleep until the 1-minute load average is below ``limit``, at most ``max_wait`` s.

    Returns the load average seen when the wait ended.
    """
    deadline = time.monotonic() + max_wait
    while True:
        load = float(load_average().split()[0])
        if load <= limit or time.monotonic() >= deadline:
            return load_average()
        log.info("load average %.2f is above %.2f; waiting before the run", load, limit)
        time.sleep(30)


_DD_SECONDS = re.compile(r"copied, ([0-9.e+-]+) s")


def dd_seconds(stderr: str) -> float:
    """Return the seconds that GNU dd reported for its copy on stderr."""
    match = _DD_SECONDS.search(stderr)
    if match is None:
        raise RuntimeError(f"no timing in the output of dd: {stderr!r}")
    return float(match.group(1))


def command_version(command: list[str]) -> str:
    """Return the first line a version command prints, or why it failed."""
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unavailable ({error})"
    text = (result.stdout or result.stderr).strip().splitlines()
    return text[0] if text else f"unavailable (exit {result.returncode})"


@dataclass
class Summary:
    """The median of a list of samples and its spread."""

    median: float
    low: float
    high: float
    count: int


def summarize(samples: list[float]) -> Summary | None:
    """Return the median, minimum and maximum of ``samples``, or None if empty."""
    if not samples:
        return None
    return Summary(statistics.median(samples), min(samples), max(samples), len(samples))


class Stopwatch:
    """A context manager that measures wall-clock seconds with perf_counter."""

    def __enter__(self) -> Self:
        self.started = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc_info) -> None:
        self.seconds = time.perf_counter() - self.started
