"""Reading the recorder's write log and building device images from it.

The record layout is documented in recorder.c. A cut at position k keeps
records [0, k): the device as a power cut after the k-th recorded call could
have left it, if every write before the cut reached the disk. Dropping some
writes that no later sync covers gives the other states a cut may leave.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

PAGE = 4096

WRITE = "W"
SYNC = "S"
TRUNCATE = "T"
ZERO = "Z"
MARK = "K"
UNSUPPORTED = "U"

SYNC_CAUSES = {1: "fsync", 2: "fdatasync", 3: "O_DSYNC write", 4: "sync"}


@dataclass(slots=True)
class Record:
    kind: str
    offset: int = 0
    length: int = 0
    data: bytes = b""
    text: str = ""

    def describe(self) -> str:
        if self.kind == WRITE:
            return f"write of {self.length} bytes at {self.offset}"
        if self.kind == SYNC:
            return f"sync ({self.text})"
        if self.kind == TRUNCATE:
            return f"truncate to {self.offset}"
        if self.kind == ZERO:
            return f"zeroing of {self.length} bytes at {self.offset}"
        if self.kind == MARK:
            return f"mark {self.text!r}"
        return f"unrecorded call: {self.text}"


def read_log(path: str) -> list[Record]:
    with open(path, "rb") as f:
        raw = f.read()
    records = []
    pos = 0
    while pos < len(raw):
        kind = chr(raw[pos])
        pos += 1
        if kind == WRITE:
            offset, length = struct.unpack_from("<QI", raw, pos)
            pos += 12
            records.append(Record(kind, offset, length, raw[pos : pos + length]))
            pos += length
        elif kind == SYNC:
            records.append(Record(kind, text=SYNC_CAUSES.get(raw[pos], str(raw[pos]))))
            pos += 1
        elif kind == TRUNCATE:
            records.append(Record(kind, struct.unpack_from("<Q", raw, pos)[0]))
            pos += 8
        elif kind == ZERO:
            offset, length = struct.unpack_from("<QQ", raw, pos)
            records.append(Record(kind, offset, length))
            pos += 16
        elif kind in (MARK, UNSUPPORTED):
            (length,) = struct.unpack_from("<I", raw, pos)
            pos += 4
            records.append(Record(kind, text=raw[pos : pos + length].decode()))
            pos += length
        else:
            raise ValueError(f"{path}: unknown record kind {kind!r} at byte {pos - 1}")
    if pos != len(raw):
        raise ValueError(f"{path}: the last record is cut short")
    return records


def data_regions(path: str) -> tuple[int, list[tuple[int, bytes]]]:
    """Return the size of a sparse file and its (offset, bytes) data regions."""
    regions = []
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            regions.append((start, os.pread(fd, end - start, start)))
            offset = end
    return size, regions


def unsynced_pieces(records: list[Record], cut: int) -> list[tuple[int, int, int]]:
    """Return (record index, start, end) of each page piece written after the last sync.

    Only records before ``cut`` count. The page cache writes dirty pages back
    in any order, so each 4 KiB page of an unsynced write may or may not have
    reached the disk at the cut.
    """
    first = 0
    for index in range(cut - 1, -1, -1):
        if records[index].kind == SYNC:
            first = index + 1
            break
    pieces = []
    for index in range(first, cut):
        record = records[index]
        if record.kind != WRITE:
            continue
        start = record.offset
        end = record.offset + record.length
        while start < end:
            stop = min(end, (start // PAGE + 1) * PAGE)
            pieces.append((index, start, stop))
            start = stop
    return pieces


def build_image(
    path: str,
    baseline: tuple[int, list[tuple[int, bytes]]],
    records: list[Record],
    cut: int,
    dropped: frozenset = frozenset(),
) -> None:
    """Write the baseline and records [0, cut) to ``path``.

    The ``dropped`` page pieces, from ``unsynced_pieces``, are left out.
    """
    size, regions = baseline
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)
        for offset, data in regions:
            os.pwrite(fd, data, offset)
        dropped_by_record: dict[int, list[tuple[int, int]]] = {}
        for index, start, end in dropped:
            dropped_by_record.setdefault(index, []).append((start, end))
        for index in range(cut):
            record = records[index]
            if record.kind == WRITE:
                holes = dropped_by_record.get(index)
                if holes is None:
                    os.pwrite(fd, record.data, record.offset)
                else:
                    write_except(fd, record, holes)
            elif record.kind == TRUNCATE:
                os.ftruncate(fd, record.offset)
            elif record.kind == ZERO:
                os.pwrite(fd, bytes(record.length), record.offset)
    finally:
        os.close(fd)


def write_except(fd: int, record: Record, holes: list[tuple[int, int]]) -> None:
    position = record.offset
    for start, end in sorted(holes):
        if start > position:
            os.pwrite(
                fd,
                record.data[position - record.offset : start - record.offset],
                position,
            )
        position = end
    end = record.offset + record.length
    if position < end:
        os.pwrite(fd, record.data[position - record.offset :], position)
