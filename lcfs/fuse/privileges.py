"""Which privilege bits a data or owner change by a caller removes, as Linux decides it.

The mount requests FUSE_HANDLE_KILLPRIV_V2 from the kernel, which leaves
clearing setuid and setgid on write, truncate and chown to the
filesystem. Without it the kernel sends a getattr before every chown. The
kernel still removes security.capability before a truncate or a chown,
and before a buffered write until it has found a file without one, but
not before a direct I/O write. pyfuse3 3.5 passes the handlers no kill
flag. The frontend then applies the rules of
Linux 6.x itself. A data change (``setattr_should_drop_suidgid``) drops,
on a regular file:

- setuid always, unless the caller has CAP_FSETID;
- setgid when the group may execute the file, or when the caller is
  neither in the file's group nor has CAP_FSETID, and again never when the
  caller has CAP_FSETID;
- security.capability on every data change, by any caller.

An owner change drops them by the rules in ``mode_after_owner_change``.

The caller's capabilities and groups come from /proc/PID/status of the
process that opened the file, or that sent the request. FUSE reports that
pid in the pid namespace of the mounting process, which is the daemon's.
"""

from __future__ import annotations

import logging
import stat
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

CAP_FSETID = 4
CAP_SYS_ADMIN = 21


@dataclass(frozen=True, slots=True)
class Caller:
    """The credentials of a process that matter for dropping privilege bits and listing xattrs."""

    uid: int
    gid: int
    groups: frozenset[int]
    fsetid: bool
    sys_admin: bool = False

    def in_group(self, gid: int) -> bool:
        return gid == self.gid or gid in self.groups


def caller_from_context(ctx) -> Caller:
    """Return the credentials of the process behind a pyfuse3 request context.

    When the process has already exited, only the uid and gid of the
    request remain, and only uid 0 counts as having CAP_FSETID and
    CAP_SYS_ADMIN.
    """
    fallback = Caller(ctx.uid, ctx.gid, frozenset(), ctx.uid == 0, ctx.uid == 0)
    if ctx.pid <= 0:
        return fallback
    try:
        with open(f"/proc/{ctx.pid}/status", encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        log.debug("cannot read the credentials of pid %d: %s", ctx.pid, exc)
        return fallback
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    try:
        effective = int(fields["CapEff"].strip(), 16)
        groups = frozenset(int(group) for group in fields["Groups"].split())
    except (KeyError, ValueError):
        return fallback
    return Caller(ctx.uid, ctx.gid, groups, bool(effective & (1 << CAP_FSETID)),
                  bool(effective & (1 << CAP_SYS_ADMIN)))  # fmt: skip


def mode_after_data_change(mode: int, file_gid: int, caller: Caller) -> int:
    """Return ``mode`` without the setuid and setgid bits a data change by ``caller`` drops."""
    if not stat.S_ISREG(mode) or caller.fsetid:
        return mode
    if mode & stat.S_ISUID:
        mode &= ~stat.S_ISUID
    if mode & stat.S_ISGID and (mode & stat.S_IXGRP or not caller.in_group(file_gid)):
        mode &= ~stat.S_ISGID
    return mode


def mode_after_owner_change(mode: int, file_gid: int, caller: Callable[[], Caller]) -> int:
    """Return ``mode`` without the setuid and setgid bits that chown(2) drops.

    On anything but a directory, Linux (``chown_common``) drops setuid
    for every caller, root included. It drops setgid when the group may
    execute the file, or when the caller is neither in the file's group
    (``file_gid``, the group before the change) nor has CAP_FSETID.
    ``caller`` is called for the credentials only in that last case.
    """
    if stat.S_ISDIR(mode):
        return mode
    mode &= ~stat.S_ISUID
    if mode & stat.S_ISGID:
        if mode & stat.S_IXGRP:
            mode &= ~stat.S_ISGID
        else:
            chowner = caller()
            if not (chowner.fsetid or chowner.in_group(file_gid)):
                mode &= ~stat.S_ISGID
    return mode
