"""Find and remove mounts below a directory that a test owns.

Tests unmount only what they mounted themselves (or what a process they
started mounted), so every helper here takes a directory and touches only
mount points strictly inside it or equal to it, as listed in
/proc/self/mountinfo.
"""

import contextlib
import logging
import os
import re
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

_OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")


def _unescape(field: bytes) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    raw = _OCTAL_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), field)
    return os.fsdecode(raw)


def mount_table() -> list[tuple[str, str]]:
    """Return (mount point, filesystem type) for every mount, in mount order."""
    entries = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            separator = fields.index(b"-")
            entries.append((_unescape(fields[4]), os.fsdecode(fields[separator + 1])))
    return entries


def mounts_under(directory: str | os.PathLike) -> list[str]:
    """Return the mount points at or below `directory`, most recently mounted first."""
    top = os.path.realpath(directory)
    prefix = top.rstrip("/") + "/"
    found = [
        point for point, _ in mount_table() if point == top or point.startswith(prefix)
    ]
    # Unmount in reverse mount order so that mounts stacked later go first.
    return list(reversed(found))


def unmount_under(directory: str | os.PathLike) -> list[str]:
    """Unmount everything at or below `directory` and return what was unmounted.

    A plain umount is tried first. A busy or disconnected mount (one whose
    FUSE server died) is then detached lazily. Raises RuntimeError if a mount is
    still there afterwards.
    """
    removed = []
    for _ in range(3):
        points = mounts_under(directory)
        if not points:
            return removed
        for point in points:
            result = subprocess.run(
                ["umount", point], capture_output=True, text=True, check=False
            )
            if result.returncode != 0:
                log.warning(
                    "umount %s failed (%s), detaching it lazily",
                    point,
                    result.stderr.strip(),
                )
                subprocess.run(
                    ["umount", "-l", point], capture_output=True, check=False
                )
            removed.append(point)
    left = mounts_under(directory)
    if left:
        raise RuntimeError(f"mounts still present below {directory}: {left}")
    return removed


def remove_tree(directory: str | os.PathLike) -> None:
    """Unmount everything below `directory`, then delete it.

    Deleting first would descend into whatever is mounted there (a proc or
    sysfs mount left by debootstrap, or a dockerd bind mount), so the mounts
    must go before the files.
    """
    path = Path(directory)
    if not path.exists():
        return
    unmount_under(path)
    subprocess.run(["rm", "-rf", "--one-file-system", "--", str(path)], check=True)


@contextlib.contextmanager
def tmpfs_at(directory: Path, size: str):
    """Mount a tmpfs of ``size`` (a mount option value such as "32m") on a new ``directory``.

    The tmpfs is unmounted lazily on exit, even when the test fails.
    """
    directory.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "lcfs-test-tmpfs",
                    str(directory)], check=True)  # fmt: skip
    try:
        yield directory
    finally:
        subprocess.run(["umount", "--lazy", str(directory)], check=True)
