"""Settings of the FUSE frontend that the operator chooses (``lcfs daemon`` options)."""

from __future__ import annotations

from dataclasses import dataclass

# Direct I/O for every open that can never be memory-mapped: a descriptor
# opened O_WRONLY. Its writes bypass the page cache, and the kernel stops
# asking for security.capability before each write.
DIRECT_IO_WRITE_ONLY = "write-only"
# Every open uses the page cache.
DIRECT_IO_NEVER = "never"
DIRECT_IO_MODES = (DIRECT_IO_WRITE_ONLY, DIRECT_IO_NEVER)


@dataclass(frozen=True)
class FuseSettings:
    """Page cache and watchdog settings of the FUSE frontend.

    ``direct_io`` is one of DIRECT_IO_MODES. ``invalidate_on_close`` drops
    a file's cached pages when its last descriptor is closed. ``watchdog``
    starts a process that detaches the mount when the serving process dies.
    """

    direct_io: str = DIRECT_IO_WRITE_ONLY
    invalidate_on_close: bool = False
    watchdog: bool = True

    def __post_init__(self) -> None:
        if self.direct_io not in DIRECT_IO_MODES:
            raise ValueError(
                f"invalid direct I/O mode {self.direct_io!r}: use one of "
                f"{', '.join(DIRECT_IO_MODES)}"
            )
