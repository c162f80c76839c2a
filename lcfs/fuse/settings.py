"""Settings of the FUSE frontend that the operator chooses (``lcfs daemon`` options)."""

from __future__ import annotations

from dataclasses import dataclass

# Direct I/O for every open that can never be memory-mapped: a descriptor
# opened O_WRONLY. Its writes bypass the page cache. The daemon then replies
# to every open, because the reply sets direct I/O for each descriptor.
DIRECT_IO_WRITE_ONLY = "write-only"
# Every open uses the page cache. With the other settings at their
# defaults, the kernel then opens and closes files without asking the
# daemon (LayerOperations.skip_opens).
DIRECT_IO_NEVER = "never"
DIRECT_IO_MODES = (DIRECT_IO_WRITE_ONLY, DIRECT_IO_NEVER)

# The kernel reads ahead 128 KiB on a FUSE mount, so a cold sequential read
# arrives as 128 KiB READ requests. libfuse 3.14 accepts requests of up to
# 1 MiB, and with 1 MiB of read-ahead a cold 64 MiB read sent 64 requests
# instead of 512 and ran 2.7 times as fast here.
DEFAULT_READ_AHEAD_KB = 1024


@dataclass(frozen=True)
class FuseSettings:
    """Page cache and watchdog settings of the FUSE frontend.

    ``direct_io`` is one of DIRECT_IO_MODES. ``invalidate_on_close`` drops
    a file's cached pages when its last descriptor is closed. ``watchdog``
    starts a process that detaches the mount when the serving process dies.
    ``read_ahead_kb`` is the kernel's read-ahead for the mount, which also
    caps the size of its READ requests; 0 keeps the kernel's default.
    ``share_unchanged`` serves a regular file that a layer inherits unchanged
    through the node of the ancestor that contains its record. Every layer
    and container reading it then shares one kernel inode and one copy in
    the page cache. The first change through a writable layer copies the
    file up and gives it a node of its own. The setting is off by default
    because sharing is visible. A descriptor opened read-only before that
    copy-up keeps reading the shared copy, st_ino changes at the copy-up,
    and flock(2) locks and inotify events of a shared file reach every
    layer.
    """

    direct_io: str = DIRECT_IO_NEVER
    invalidate_on_close: bool = False
    watchdog: bool = True
    read_ahead_kb: int = DEFAULT_READ_AHEAD_KB
    share_unchanged: bool = False

    def __post_init__(self) -> None:
        if self.read_ahead_kb < 0:
            raise ValueError(f"invalid read-ahead {self.read_ahead_kb} KiB: use 0 or more")
        if self.direct_io not in DIRECT_IO_MODES:
            raise ValueError(
                f"invalid direct I/O mode {self.direct_io!r}: use one of "
                f"{', '.join(DIRECT_IO_MODES)}"
            )
