"""File data of the store (a mixin of ``Store``): extents, reads and writes.

An inode version's data is a map of extents ``(file block -> physical block,
count, flag)``. The flag tells which record frees the blocks:

``OWNED``     this layer; only these blocks are overwritten in place.
``BORROWED``  an ancestor layer, which cannot be removed while this layer
              exists. A child that changes a file gets its parent's map
              with every extent borrowed.
``SHARED``    the ``refs`` database counts the extents that map each run;
              the last one to go frees it. Commit without copying maps the
              same blocks into two unrelated layers this way.

A write allocates new blocks for the 4 KiB blocks it touches unless they are
owned (branch on write). Unmapped blocks are holes and read as zeros.
"""

from __future__ import annotations

import errno
import os
import struct
import time

from . import errors
from .format import BLOCK_SIZE, EXTENT, U64, U64X2, extent_key

BORROWED, OWNED, SHARED = 0, 1, 2
REFS = struct.Struct(">QI")

# Largest run handed to one pwrite or pread.
IO_CHUNK_BLOCKS = 256


class DataMixin:
    # -- extent map ------------------------------------------------------------

    def _extents(self, ino: int, layer: int, first: int, end: int) -> list[list[int]]:
        """Return [file block, physical block, count, owned] of extents overlapping [first, end)."""
        db = self.dbs["extents"]
        prefix = U64X2.pack(ino, layer)
        start_key = extent_key(ino, layer, first)
        cursor = self._txn.cursor(db=db)
        found = []
        # The extent that starts before ``first`` may still cover it.
        moved = cursor.prev() if cursor.set_range(start_key) else cursor.last()
        if moved and cursor.key()[:16] == prefix:
            block = int.from_bytes(cursor.key()[16:24], "big")
            phys, count, owned = EXTENT.unpack(cursor.value())
            if block < first < block + count:
                found.append([block, phys, count, owned])
        if not cursor.set_range(start_key):
            return found
        for key, value in cursor.iternext():
            if key[:16] != prefix:
                break
            block = int.from_bytes(key[16:24], "big")
            if block >= end:
                break
            phys, count, owned = EXTENT.unpack(value)
            found.append([block, phys, count, owned])
        return found

    def _layer_blocks(self, ino: int, layer: int) -> int:
        """Return how many data blocks of ``ino`` the layer holds itself (owned or shared)."""
        blocks = 0
        for _key, value in self._prefix_items(self.dbs["extents"], U64X2.pack(ino, layer)):
            _phys, count, flag = EXTENT.unpack(value)
            if flag != BORROWED:
                blocks += count
        return blocks

    def _put_extent(
        self, ino: int, layer: int, block: int, phys: int, count: int, owned: int
    ) -> None:
        self._txn.put(
            extent_key(ino, layer, block),
            EXTENT.pack(phys, count, owned),
            db=self.dbs["extents"],
        )

    def _copy_extents(self, ino: int, source: int, dest: int) -> None:
        for key, value in list(
            self._prefix_items(self.dbs["extents"], U64X2.pack(ino, source))
        ):
            phys, count, _ = EXTENT.unpack(value)
            self._put_extent(
                ino, dest, int.from_bytes(key[16:24], "big"), phys, count, 0
            )

    def _unmap(self, inode, layer: int, first: int, end: int) -> None:
        """Remove the mapping of file blocks [first, end), freeing what the layer owns."""
        db = self.dbs["extents"]
        for block, phys, count, owned in self._extents(inode.ino, layer, first, end):
            self._txn.delete(extent_key(inode.ino, layer, block), db=db)
            cut_start = max(block, first)
            cut_end = min(block + count, end)
            if block < cut_start:
                self._put_extent(
                    inode.ino, layer, block, phys, cut_start - block, owned
                )
            if cut_end < block + count:
                self._put_extent(inode.ino, layer, cut_end, phys + (cut_end - block),
                                 block + count - cut_end, owned)  # fmt: skip
            self._release(phys + (cut_start - block), cut_end - cut_start, owned)
            inode.blocks -= cut_end - cut_start

    def _map(self, inode, layer: int, block: int, phys: int, count: int) -> None:
        """Map file blocks [block, block+count) to new owned blocks at ``phys``."""
        self._unmap(inode, layer, block, block + count)
        before = self._extents(inode.ino, layer, block - 1, block) if block else []
        if before:
            prev_block, prev_phys, prev_count, prev_owned = before[0]
            if (
                prev_owned == OWNED
                and prev_block + prev_count == block
                and prev_phys + prev_count == phys
            ):
                self._put_extent(
                    inode.ino, layer, prev_block, prev_phys, prev_count + count, 1
                )
                inode.blocks += count
                return
        self._put_extent(inode.ino, layer, block, phys, count, 1)
        inode.blocks += count

    def _free_extents(self, ino: int, layer: int) -> None:
        txn, db = self._txn, self.dbs["extents"]
        for key, value in list(self._prefix_items(db, U64X2.pack(ino, layer))):
            phys, count, owned = EXTENT.unpack(value)
            self._release(phys, count, owned)
            txn.delete(key, db=db)

    def _release(self, phys: int, count: int, flag: int) -> None:
        """Drop one extent's claim on blocks [phys, phys+count)."""
        if flag == OWNED:
            self.alloc.release(self._txn, phys, count)
        elif flag == SHARED:
            self._add_refs(phys, count, -1)

    def _add_refs(self, start: int, count: int, delta: int) -> None:
        """Add ``delta`` to the reference count of every block in [start, start+count).

        Runs whose count drops to zero go back to the free map. A run with no
        record has the count 0 before the change.
        """
        txn, db = self._txn, self.dbs["refs"]
        end = start + count
        pieces: list[tuple[int, int, int]] = []
        cursor = txn.cursor(db=db)
        moved = cursor.prev() if cursor.set_range(U64.pack(start)) else cursor.last()
        if moved:
            p = U64.unpack(cursor.key())[0]
            c, r = REFS.unpack(cursor.value())
            if p < start < p + c:
                pieces.append((p, c, r))
        if cursor.set_range(U64.pack(start)):
            for key, value in cursor.iternext():
                p = U64.unpack(key)[0]
                if p >= end:
                    break
                c, r = REFS.unpack(value)
                pieces.append((p, c, r))
        covered = []
        for p, c, r in pieces:
            txn.delete(U64.pack(p), db=db)
            if p < start:
                txn.put(U64.pack(p), REFS.pack(start - p, r), db=db)
            if p + c > end:
                txn.put(U64.pack(end), REFS.pack(p + c - end, r), db=db)
            covered.append((max(p, start), min(p + c, end), r))
        gaps = []
        position = start
        for lo, hi, _ in sorted(covered):
            if lo > position:
                gaps.append((position, lo, 0))
            position = max(position, hi)
        if position < end:
            gaps.append((position, end, 0))
        for lo, hi, r in sorted(covered + gaps):
            refs = r + delta
            if refs < 0:
                raise errors.StoreError(
                    f"reference count below zero for blocks {lo}..{hi - 1}"
                )
            if refs == 0:
                self.alloc.release(txn, lo, hi - lo)
            else:
                txn.put(U64.pack(lo), REFS.pack(hi - lo, refs), db=db)

    def _block_owner(self, ino: int, layer: int, block: int, phys: int) -> int | None:
        """Return the layer whose extent of ``ino`` owns ``phys``, which ``layer`` borrows."""
        current = self._layers[layer].parent
        while current is not None:
            for start, p, _count, flag in self._extents(ino, current, block, block + 1):
                if p + (block - start) != phys:
                    return None
                if flag != BORROWED:
                    return current
            current = self._layers[current].parent
        return None

    def _share_extents(self, ino: int, owner: int) -> list[list[int]]:
        """Turn the owned extents of (ino, owner) into shared ones; return its extent list."""
        extents = []
        for key, value in list(
            self._prefix_items(self.dbs["extents"], U64X2.pack(ino, owner))
        ):
            phys, count, flag = EXTENT.unpack(value)
            if flag == OWNED:
                self._add_refs(phys, count, 1)
                flag = SHARED
                self._txn.put(
                    key, EXTENT.pack(phys, count, flag), db=self.dbs["extents"]
                )
            extents.append([int.from_bytes(key[16:24], "big"), phys, count, flag])
        return extents

    # -- device I/O --------------------------------------------------------------

    def _pread(self, phys: int, length: int, offset_in_block: int = 0,
               drop_cache: bool = False) -> bytes:  # fmt: skip
        if (
            phys < 0
            or phys * BLOCK_SIZE + offset_in_block + length
            > self.data_blocks * BLOCK_SIZE
        ):
            raise errors.StoreError(f"read of block {phys} outside the data region")
        position = self.data_offset + phys * BLOCK_SIZE + offset_in_block
        if drop_cache:
            fd = self._uncached_reader()
            data = os.pread(fd, length, position)
            os.posix_fadvise(fd, position, length, os.POSIX_FADV_DONTNEED)
        else:
            data = os.pread(self.fd, length, position)
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    def _read_ahead_uncached(self, extent, end: int, length: int) -> None:
        """Start reading the ``length`` bytes after file offset ``end`` in its extent.

        Reads that drop their pages get no read-ahead from the kernel, so
        this starts reading what a sequential reader requests next.
        """
        block, phys, count, _ = extent
        ahead = min(length, (block + count) * BLOCK_SIZE - end)
        if ahead > 0:
            position = self.data_offset + phys * BLOCK_SIZE + end - block * BLOCK_SIZE
            os.posix_fadvise(self._uncached_reader(), position, ahead, os.POSIX_FADV_WILLNEED)

    def _uncached_reader(self) -> int:
        """Return the descriptor of the device for reads that drop their pages."""
        if self._uncached_fd is None:
            fd = os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)
            # Without read-ahead the kernel caches the range alone, in small
            # folios. Read-ahead on ext4 caches the range in large folios that
            # reach past it, which POSIX_FADV_DONTNEED of the range leaves.
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            self._uncached_fd = fd
        return self._uncached_fd

    def _pwrite(self, phys: int, data, offset_in_block: int = 0) -> None:
        if (
            phys < 0
            or phys * BLOCK_SIZE + offset_in_block + len(data)
            > self.data_blocks * BLOCK_SIZE
        ):
            raise errors.StoreError(f"write of block {phys} outside the data region")
        view = memoryview(data)
        position = self.data_offset + phys * BLOCK_SIZE + offset_in_block
        self._data_unsynced = True
        while view:
            try:
                written = os.pwrite(self.fd, view, position)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                # A sparse image file gets its blocks from the file system under it.
                raise errors.NoSpace(
                    f"the file system under {self.path} is full ({exc.strerror}): "
                    "free space there or move the image to a larger file system"
                ) from None
            view = view[written:]
            position += written

    # -- reading -------------------------------------------------------------------

    def read(self, layer: int, ino: int, offset: int, size: int,
             drop_cache: bool = False) -> bytes:  # fmt: skip
        """Return up to ``size`` bytes of a file from ``offset``.

        ``drop_cache`` drops the device's cached pages of what was read. A
        reader that keeps the data in a cache of its own, as the kernel does
        for a FUSE file, sets it so that the data is not cached twice.
        """
        with self.lock:
            owner, inode = self._resolve_readable(layer, ino)
            if offset < 0 or size < 0:
                raise errors.Invalid(f"invalid read range {offset}+{size}")
            end = min(offset + size, inode.size)
            if end <= offset:
                return b""
            return self._read_range(inode.ino, owner, offset, end, drop_cache)

    def _resolve_readable(self, layer: int, ino: int):
        """Return (owner layer, record) of a file whose data is read; call it holding the lock."""
        self._ready()
        self._layer(layer)
        owner, inode = self._resolve(layer, ino)
        if inode.is_dir:
            raise errors.IsDir(f"inode {ino} is a directory")
        return owner, inode

    def _read_range(self, ino: int, owner: int, offset: int, end: int,
                    drop_cache: bool = False) -> bytes:  # fmt: skip
        first = offset // BLOCK_SIZE
        last = (end + BLOCK_SIZE - 1) // BLOCK_SIZE
        extents = self._extents(ino, owner, first, last)
        if drop_cache and extents:
            self._read_ahead_uncached(extents[-1], end, end - offset)
        if len(extents) == 1:
            block, phys, count, _ = extents[0]
            if block <= first and block + count >= last:
                # One extent covers the range, so the pread result is returned as it is.
                delta = offset - block * BLOCK_SIZE
                return self._pread(
                    phys + delta // BLOCK_SIZE, end - offset, delta % BLOCK_SIZE, drop_cache
                )
        out = bytearray(end - offset)
        for block, phys, count, _ in extents:
            start = max(block * BLOCK_SIZE, offset)
            stop = min((block + count) * BLOCK_SIZE, end)
            if start >= stop:
                continue
            delta = start - block * BLOCK_SIZE
            chunk = self._pread(
                phys + delta // BLOCK_SIZE, stop - start, delta % BLOCK_SIZE, drop_cache
            )
            out[start - offset : stop - offset] = chunk
        return bytes(out)

    def seek(self, layer: int, ino: int, offset: int, hole: bool) -> int:
        """Return the first offset at or after ``offset`` that starts data, or a hole if ``hole``.

        Holes are the file blocks that no extent maps, and the end of the
        file counts as a hole, as lseek(2) specifies for SEEK_DATA and
        SEEK_HOLE. Raises PastData when ``offset`` is at or past the end,
        or when no data follows it.
        """
        with self.lock:
            owner, inode = self._resolve_readable(layer, ino)
            if offset < 0:
                raise errors.Invalid(f"invalid seek offset {offset}")
            if offset >= inode.size:
                raise errors.PastData(
                    f"offset {offset} is at or past the end of inode {ino} ({inode.size} bytes)"
                )
            first = offset // BLOCK_SIZE
            last = (inode.size + BLOCK_SIZE - 1) // BLOCK_SIZE
            block = first
            for start, _, count, _ in self._extents(inode.ino, owner, first, last):
                if start > block:
                    if hole:
                        break  # blocks [block, start) are a hole
                    return max(offset, start * BLOCK_SIZE)
                if not hole:
                    return offset  # the block at ``offset`` is mapped
                block = max(block, start + count)
            if not hole:
                raise errors.PastData(f"inode {ino} has no data after offset {offset}")
            return min(max(offset, block * BLOCK_SIZE), inode.size)

    # -- writing ---------------------------------------------------------------------

    def write(self, layer: int, ino: int, offset: int, data) -> int:
        return self._write(self._write_data, layer, ino, offset, data)

    def _write_data(self, layer, ino, offset, data, touch=True):
        self._writable(layer)
        if offset < 0:
            raise errors.Invalid(f"invalid write offset {offset}")
        current = self._regular_file(layer, ino)
        if not data:
            return 0
        inode = self._own(layer, ino)
        self._store_bytes(inode, layer, offset, memoryview(data))
        end = offset + len(data)
        inode.size = max(inode.size, end)
        if touch:
            now = self._now_ns()
            inode.mtime_ns = inode.ctime_ns = now
        self._put_inode(layer, inode)
        return len(data)

    def _regular_file(self, layer: int, ino: int):
        """Return the record of ``ino``, which must be a regular file to take data."""
        current = self._inode(layer, ino)
        if not current.is_reg:
            if current.is_dir:
                raise errors.IsDir(f"inode {ino} is a directory")
            raise errors.Invalid(f"inode {ino} is not a regular file")
        return current

    @staticmethod
    def _now_ns() -> int:
        return time.time_ns()

    def _store_bytes(self, inode, layer: int, offset: int, data: memoryview) -> None:
        """Write ``data`` at ``offset``: in place into owned blocks, to new blocks elsewhere."""
        end = offset + len(data)
        first = offset // BLOCK_SIZE
        last = (end + BLOCK_SIZE - 1) // BLOCK_SIZE
        mapping = {}
        for block, phys, count, owned in self._extents(inode.ino, layer, first, last):
            for i in range(max(block, first), min(block + count, last)):
                mapping[i] = (phys + i - block, owned)
        block = first
        while block < last:
            phys, owned = mapping.get(block, (None, 0))
            run_end = block + 1
            if owned == OWNED:
                while run_end < last and mapping.get(run_end, (None, 0))[1] == OWNED and \
                        mapping[run_end][0] == phys + run_end - block:  # fmt: skip
                    run_end += 1
                start = max(block * BLOCK_SIZE, offset)
                stop = min(run_end * BLOCK_SIZE, end)
                self._pwrite(
                    phys,
                    data[start - offset : stop - offset],
                    start - block * BLOCK_SIZE,
                )
            else:
                while run_end < last and mapping.get(run_end, (None, 0))[1] != OWNED and \
                        run_end - block < IO_CHUNK_BLOCKS:  # fmt: skip
                    run_end += 1
                self._branch(inode, layer, block, run_end, mapping, offset, data)
            block = run_end

    def _branch(self, inode, layer, first, end, mapping, offset, data) -> None:
        """Write file blocks [first, end), which the layer does not own, to new blocks."""
        length = (end - first) * BLOCK_SIZE
        buffer = bytearray(length)
        base = first * BLOCK_SIZE
        head_partial = offset > base
        tail_partial = offset + len(data) < base + length
        for block in {first, end - 1}:
            partial = (block == first and head_partial) or (
                block == end - 1 and tail_partial
            )
            old = mapping.get(block)
            if partial and old is not None:
                at = (block - first) * BLOCK_SIZE
                buffer[at : at + BLOCK_SIZE] = self._pread(old[0], BLOCK_SIZE)
        start = max(offset, base)
        stop = min(offset + len(data), base + length)
        buffer[start - base : stop - base] = data[start - offset : stop - offset]
        hint = None
        previous = mapping.get(first - 1)
        if previous is not None and previous[1] == OWNED:
            hint = previous[0] + 1
        elif first:
            before = self._extents(inode.ino, layer, first - 1, first)
            if before and before[0][3] == OWNED:
                b, p, _, _ = before[0]
                hint = p + (first - 1 - b) + 1
        done = 0
        for phys, count in self.alloc.allocate(self._txn, end - first, hint):
            self._pwrite(
                phys,
                memoryview(buffer)[done * BLOCK_SIZE : (done + count) * BLOCK_SIZE],
            )
            self._map(inode, layer, first + done, phys, count)
            for i in range(count):
                mapping[first + done + i] = (phys + i, 1)
            done += count

    def punch_hole(self, layer: int, ino: int, offset: int, length: int) -> None:
        """Deallocate bytes [offset, offset+length) of a file, which then read as zeros.

        The size stays. Whole blocks in the range lose their mapping, and the
        parts of the first and last block in it that are mapped are zeroed.
        """
        self._write(self._punch_hole, layer, ino, offset, length)

    def _punch_hole(self, layer: int, ino: int, offset: int, length: int) -> None:
        self._writable(layer)
        if offset < 0 or length <= 0:
            raise errors.Invalid(f"invalid hole range {offset}+{length}")
        current = self._regular_file(layer, ino)
        end = min(offset + length, current.size)
        if end <= offset:
            return

        inode = self._own(layer, ino)
        # Bytes past the end of the file read as zeros whatever the block
        # holds, so a range that goes past the end frees the last block
        # whole, as ext4 does.
        whole_first = (offset + BLOCK_SIZE - 1) // BLOCK_SIZE
        if offset + length > inode.size:
            whole_end = (end + BLOCK_SIZE - 1) // BLOCK_SIZE
        else:
            whole_end = end // BLOCK_SIZE

        if whole_first < whole_end:
            self._unmap(inode, layer, whole_first, whole_end)
            edges = [(offset, whole_first * BLOCK_SIZE), (whole_end * BLOCK_SIZE, end)]
        else:
            edges = [(offset, end)]
        # The partial blocks at the edges are zeroed where they are mapped.
        for start, stop in edges:
            while start < stop:
                block = start // BLOCK_SIZE
                piece_end = min(stop, (block + 1) * BLOCK_SIZE)
                if self._extents(inode.ino, layer, block, block + 1):
                    zeros = memoryview(bytes(piece_end - start))
                    self._store_bytes(inode, layer, start, zeros)
                start = piece_end

        inode.mtime_ns = inode.ctime_ns = self._now_ns()
        self._put_inode(layer, inode)

    def _truncate(self, layer: int, inode, size: int) -> None:
        """Change the file size, dropping blocks past the end and zeroing the tail block."""
        old = inode.size
        if size < old:
            keep = (size + BLOCK_SIZE - 1) // BLOCK_SIZE
            self._unmap(inode, layer, keep, 1 << 62)
            tail = size % BLOCK_SIZE
            if tail and self._extents(
                inode.ino, layer, size // BLOCK_SIZE, size // BLOCK_SIZE + 1
            ):
                self._store_bytes(
                    inode, layer, size, memoryview(bytes(BLOCK_SIZE - tail))
                )
        inode.size = size
