"""Extent allocator for the data region.

The free map is the ``free`` database: one record per free extent, keyed by
its first block, valued by its length. Invariant: free extents never overlap
and never touch (``free`` merges neighbours), so every block is either in
exactly one free extent or mapped by an extent record.
"""

from __future__ import annotations

import logging

from . import errors
from .format import U64

log = logging.getLogger(__name__)


class Allocator:
    """Hands out and takes back runs of 4 KiB blocks inside a transaction.

    ``free_blocks`` is kept in memory and recomputed at open; the caller
    saves and restores it around a transaction that is aborted.
    """

    def __init__(self, db, data_blocks: int, device: str = "the device"):
        self.db = db
        self.data_blocks = data_blocks
        # The device's path, for error messages.
        self.device = device
        self.free_blocks = 0
        self._next = 0
        # Runs freed since the last commit: the committed metadata may still map
        # them, so they join the free map only in the commit that frees them.
        self.pending: list[tuple[int, int]] = []

    @property
    def pending_blocks(self) -> int:
        return sum(count for _, count in self.pending)

    def count(self, txn) -> int:
        total = 0
        for _, value in txn.cursor(db=self.db):
            total += U64.unpack(value)[0]
        self.free_blocks = total
        return total

    def allocate(
        self, txn, count: int, hint: int | None = None
    ) -> list[tuple[int, int]]:
        """Take ``count`` blocks, as few runs as possible, starting at ``hint`` if it is free."""
        if count > self.free_blocks:
            raise errors.NoSpace(
                f"no space left on {self.device}: {count} blocks requested, "
                f"{self.free_blocks} free; remove unused images and containers "
                "(docker system prune)"
            )
        runs: list[tuple[int, int]] = []
        need = count
        cursor = txn.cursor(db=self.db)
        if hint is not None:
            taken = self._take_at(txn, cursor, hint, need)
            if taken:
                runs.append((hint, taken))
                need -= taken
        wrapped = False
        while need:
            if not cursor.set_range(U64.pack(self._next)):
                if wrapped:
                    raise errors.NoSpace(f"free map is short of {need} blocks")
                wrapped = True
                self._next = 0
                continue
            start = U64.unpack(cursor.key())[0]
            length = U64.unpack(cursor.value())[0]
            taken = min(length, need)
            cursor.delete()
            if taken < length:
                txn.put(U64.pack(start + taken), U64.pack(length - taken), db=self.db)
            runs.append((start, taken))
            need -= taken
            self._next = start + taken
        self.free_blocks -= count
        return runs

    def _take_at(self, txn, cursor, block: int, want: int) -> int:
        """Take up to ``want`` blocks starting exactly at ``block`` if that block is free."""
        if block >= self.data_blocks:
            return 0
        found = cursor.set_range(U64.pack(block))
        if found and U64.unpack(cursor.key())[0] == block:
            start = block
        else:
            moved = cursor.prev() if found else cursor.last()
            if not moved:
                return 0
            start = U64.unpack(cursor.key())[0]
        length = U64.unpack(cursor.value())[0]
        if not start <= block < start + length:
            return 0
        taken = min(want, start + length - block)
        cursor.delete()
        if block > start:
            txn.put(U64.pack(start), U64.pack(block - start), db=self.db)
        if block + taken < start + length:
            txn.put(
                U64.pack(block + taken),
                U64.pack(start + length - block - taken),
                db=self.db,
            )
        return taken

    def release(self, txn, start: int, count: int) -> None:
        """Free ``count`` blocks at ``start`` once the current transaction commits."""
        if count <= 0:
            return
        if start < 0 or start + count > self.data_blocks:
            raise errors.StoreError(
                f"freeing blocks {start}..{start + count - 1} outside the data region"
            )
        self.pending.append((start, count))

    def flush(self, txn) -> None:
        """Move the pending runs into the free map; call in the transaction about to commit."""
        pending, self.pending = self.pending, []
        for start, count in pending:
            self._insert(txn, start, count)

    def _insert(self, txn, start: int, count: int) -> None:
        """Put ``count`` blocks at ``start`` into the free map, merging neighbours."""
        cursor = txn.cursor(db=self.db)
        new_start, new_end = start, start + count
        if cursor.set_range(U64.pack(start)):
            nxt = U64.unpack(cursor.key())[0]
            nlen = U64.unpack(cursor.value())[0]
            if nxt < new_end:
                raise errors.StoreError(f"double free of blocks {start}..{new_end - 1}")
            if nxt == new_end:
                new_end = nxt + nlen
                cursor.delete()
            has_prev = cursor.prev() if cursor.key() else cursor.last()
        else:
            has_prev = cursor.last()
        if has_prev:
            prev = U64.unpack(cursor.key())[0]
            plen = U64.unpack(cursor.value())[0]
            if prev < start:
                if prev + plen > start:
                    raise errors.StoreError(
                        f"double free of blocks {start}..{start + count - 1}"
                    )
                if prev + plen == start:
                    new_start = prev
                    cursor.delete()
        txn.put(U64.pack(new_start), U64.pack(new_end - new_start), db=self.db)
        self.free_blocks += count
