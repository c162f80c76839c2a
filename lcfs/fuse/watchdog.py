"""Detach an lcfs FUSE mount once the process serving it is gone.

Usage: ``python watchdog.py MOUNTPOINT MAJOR:MINOR [PARENT_FD]`` with
standard input the read end of a pipe whose only write end the serving
process holds. PARENT_FD is an inherited O_PATH descriptor of the mount
point's parent directory, opened when the mount was made.

libfuse's ``auto_unmount`` would do this job, but libfuse 3.14 implements
it through fusermount3, which forces nosuid and nodev on the mount, and
containers need setuid programs and device nodes. So the serving process
starts this program by exec (it inherits neither /dev/fuse nor any other
descriptor but the pipe) and mounts without auto_unmount. Reading the pipe
returns end-of-file when the serving process closes it or dies, SIGKILL
included. The watchdog then detaches the mount at MOUNTPOINT, but only if it
is still the FUSE mount with device number MAJOR:MINOR, so a mount that the
server already removed, or a later mount at the same path, is left alone.

With PARENT_FD the watchdog opens the mount point through that descriptor,
which reaches the mount even where a later mount over a parent directory
hides it, checks the mount id of what it opened, and detaches exactly
that mount. NOTE: without PARENT_FD, a mount made at the same path
between the check in mountinfo and the detach would be detached instead.
The window is one system call wide.

This file imports only the standard library, so that it starts fast when
run by path with ``python -I``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

log = logging.getLogger("lcfs.fuse.watchdog")

MNT_DETACH = 2
FSTYPE = "fuse.lcfs"


def unescape_mountinfo(field: str) -> str:
    # The kernel writes space, tab, newline and backslash as octal escapes.
    for escaped, plain in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(escaped, plain)
    return field


def top_mount_device(mountpoint: str) -> str | None:
    """Return ``major:minor`` of the topmost lcfs FUSE mount at ``mountpoint``, or None."""
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            separator = fields.index("-")
            if unescape_mountinfo(fields[4]) == mountpoint:
                # A later line is mounted on top of the earlier ones.
                found = fields[2] if fields[separator + 1] == FSTYPE else None
    return found


def mount_ids(device: str) -> set[int]:
    """Return the mount ids of every lcfs FUSE mount with ``major:minor``, hidden or not.

    A bind mount of a directory of the mount has the same device number.
    """
    found = set()
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            separator = fields.index("-")
            if fields[2] == device and fields[separator + 1] == FSTYPE:
                found.add(int(fields[0]))
    return found


def detach_through_parent(parent_fd: int, mountpoint: str, device: str) -> bool:
    """Detach the mount of ``device`` at the mount point below ``parent_fd``.

    Returns False when the mount point there is missing or no mount of
    ``device`` now, such as after the daemon unmounted it while bind mounts
    of its layers stay elsewhere. Raises OSError when the open or the
    detach fails.
    """
    path = f"/proc/self/fd/{parent_fd}/{os.path.basename(mountpoint)}"
    # The kernel serves an O_PATH open without asking the FUSE server, so
    # the dead server cannot block it.
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as f:
            found = next(int(line.split()[1]) for line in f if line.startswith("mnt_id:"))
        if found not in mount_ids(device):
            return False
        detach(f"/proc/self/fd/{fd}")
        return True
    finally:
        os.close(fd)


def detach(mountpoint: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(mountpoint), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), mountpoint)


def wait_for_end_of_file(fd: int) -> None:
    """Block until the write end of the pipe on ``fd`` is closed everywhere."""
    while True:
        try:
            if not os.read(fd, 4096):
                return
        except InterruptedError:
            continue


def main(argv: list[str]) -> int:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if len(argv) not in (3, 4):
        log.error("usage: %s MOUNTPOINT MAJOR:MINOR [PARENT_FD]", argv[0])
        return 2
    mountpoint, device = argv[1], argv[2]
    parent_fd = int(argv[3]) if len(argv) == 4 else None
    # A Ctrl-C or hang-up meant for the daemon's terminal must not end the
    # watchdog before the daemon.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    wait_for_end_of_file(0)
    try:
        if parent_fd is not None:
            detached = detach_through_parent(parent_fd, mountpoint, device)
        elif top_mount_device(mountpoint) == device:
            detach(mountpoint)
            detached = True
        else:
            detached = False
    except OSError as exc:
        log.error("detaching %s (device %s) failed: %s", mountpoint, device, exc)
        return 1
    if detached:
        log.warning("the process serving %s (device %s) ended without unmounting, "
                    "so the watchdog detached the mount", mountpoint, device)
    else:
        log.debug("the mount of device %s at %s was already gone", device, mountpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
