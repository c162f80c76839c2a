"""Detach an lcfs FUSE mount once the process serving it is gone.

Usage: ``python watchdog.py MOUNTPOINT MAJOR:MINOR`` with standard input
the read end of a pipe whose only write end the serving process holds.

libfuse's ``auto_unmount`` would do this job, but libfuse 3.14 implements
it through fusermount3, which forces nosuid and nodev on the mount, and
containers need setuid programs and device nodes. So the serving process
starts this program by exec (it inherits neither /dev/fuse nor any other
descriptor but the pipe) and mounts without auto_unmount. Reading the pipe
returns end-of-file when the serving process closes it or dies, SIGKILL
included. The watchdog then detaches the mount at MOUNTPOINT, but only if it
is still the FUSE mount with device number MAJOR:MINOR, so a mount that the
server already removed, or a later mount at the same path, is left alone.

NOTE: a mount made at the same path between the check in mountinfo and
the detach would be detached instead. The window is one system call wide.

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
    if len(argv) != 3:
        log.error("usage: %s MOUNTPOINT MAJOR:MINOR", argv[0])
        return 2
    mountpoint, device = argv[1], argv[2]
    # A Ctrl-C or hang-up meant for the daemon's terminal must not end the
    # watchdog before the daemon.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    wait_for_end_of_file(0)
    current = top_mount_device(mountpoint)
    if current != device:
        log.debug("mount %s of %s is gone; nothing to do", device, mountpoint)
        return 0
    log.warning("the process serving %s (device %s) has ended without unmounting; "
                "detaching the mount", mountpoint, device)
    try:
        detach(mountpoint)
    except OSError as exc:
        log.error("detaching %s (device %s) failed: %s", mountpoint, device, exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
