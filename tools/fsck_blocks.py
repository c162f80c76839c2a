"""The extent and free-space phases of lcfs-fsck (a mixin of ``Checker``).

Blocks in use are those of owned extents and the runs shared extents map;
borrowed extents must point into them. The free map must be exactly the
other blocks, and the ``refs`` database must count, for every block, the
shared extents that map it.
"""

from __future__ import annotations

from lcfs.store.data import BORROWED, OWNED, REFS, SHARED
from lcfs.store.format import EXTENT, U64, U64X2, U64X3, Inode, inode_key


def runs_difference(runs: list[tuple[int, int]], minus: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Return the (start, count) runs of blocks in ``runs`` and not in ``minus``.

    Both inputs are sorted by start; ``minus`` may overlap itself.
    """
    result = []
    index = 0
    for start, count in runs:
        position, end = start, start + count
        while index < len(minus) and sum(minus[index]) <= position:
            index += 1
        scan = index
        while position < end and scan < len(minus) and minus[scan][0] < end:
            cut_start, cut_end = minus[scan][0], sum(minus[scan])
            if cut_start > position:
                result.append((position, cut_start - position))
            position = max(position, cut_end)
            scan += 1
        if position < end:
            result.append((position, end - position))
    return result


def _coverage(extents: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """Return (start, end, how many extents cover it) for the blocks some extent covers."""
    events: dict[int, int] = {}
    for phys, count in extents:
        events[phys] = events.get(phys, 0) + 1
        events[phys + count] = events.get(phys + count, 0) - 1
    runs = []
    depth = 0
    previous = None
    for point in sorted(events):
        if depth and previous is not None and point > previous:
            runs.append((previous, point, depth))
        depth += events[point]
        previous = point
    return _normalise(runs)


def _normalise(runs) -> list[tuple[int, int, int]]:
    """Merge touching runs with equal counts, so equal coverage compares equal."""
    merged: list[list[int]] = []
    for start, end, refs in sorted(runs):
        if merged and merged[-1][1] == start and merged[-1][2] == refs:
            merged[-1][1] = end
        else:
            merged.append([start, end, refs])
    return [tuple(run) for run in merged]


def runs_union(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge sorted (start, count) runs that overlap or touch."""
    merged: list[list[int]] = []
    for start, count in runs:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], start + count)
        else:
            merged.append([start, start + count])
    return [(start, end - start) for start, end in merged]


class BlockChecks:
    """Phases of ``Checker`` for extents, reference counts and the free map."""

    def check_extents(self):
        """file extents"""
        limit = self.store.data_blocks
        kept: list[tuple[bytes, int, int, int, int, int]] = []
        shared: list[tuple[int, int]] = []
        bad = []
        for key, value in self.records("extents"):
            ino, number, block = U64X3.unpack(key)
            phys, count, flag = EXTENT.unpack(value)
            if number in self.skip:
                # A repair removes the layer; until then its blocks stay in use.
                if count and phys + count <= limit:
                    if flag == OWNED:
                        self.owned.append((phys, count))
                    elif flag == SHARED:
                        shared.append((phys, count))
                continue
            if self.txn.get(inode_key(ino, number), db=self.db("inodes")) is None:
                bad.append((f"extent at file block {block} of inode {ino} in layer {number} has no inode", key))
            elif count == 0 or phys + count > limit:
                bad.append((f"extent {phys}..{phys + count - 1} of inode {ino} is outside the data region", key))
            else:
                kept.append((key, ino, number, phys, count, flag))
                if flag == SHARED:
                    shared.append((phys, count))
        for message, key in bad:
            self.problem(message, lambda key=key: self.txn.delete(key, db=self.db("extents")), "remove it")

        coverage = _coverage(shared)
        self._check_refs(coverage)
        dropped = self._check_double_owners(kept, coverage)
        dropped |= self._check_borrowed(kept)

        mapped: dict[tuple[int, int], int] = {}
        for key, ino, number, _, count, _ in kept:
            if key not in dropped:
                mapped[(ino, number)] = mapped.get((ino, number), 0) + count
        for key, value in self.records("inodes"):
            ino, number = U64X2.unpack(key)
            if number in self.skip:
                continue
            inode = Inode.unpack(ino, value)
            actual = mapped.get((ino, number), 0)
            if inode.blocks != actual and inode.nlink:
                self.problem(f"inode {ino} in layer {number} counts {inode.blocks} blocks, maps {actual}",
                             lambda ino=ino, n=number, a=actual: self._update_inode(n, ino, blocks=a),
                             f"set it to {actual}")  # fmt: skip
        self.owned.sort()

    def _check_refs(self, coverage: list[tuple[int, int, int]]) -> None:
        """Compare the refs database with the number of shared extents mapping each block."""
        recorded = []
        for key, value in self.records("refs"):
            start = U64.unpack(key)[0]
            count, refs = REFS.unpack(value)
            recorded.append((start, start + count, refs))
        if _normalise(recorded) != coverage:
            self.problem(f"reference counts of shared blocks disagree with the {len(coverage)} shared runs "
                         "mapped",
                         lambda: self._rewrite_refs(coverage), "rewrite the reference counts")  # fmt: skip

    def _rewrite_refs(self, coverage: list[tuple[int, int, int]]) -> None:
        for key in [bytes(k) for k, _ in self.cursor("refs")]:
            self.txn.delete(key, db=self.db("refs"))
        for start, end, refs in coverage:
            self.txn.put(U64.pack(start), REFS.pack(end - start, refs), db=self.db("refs"))

    def _check_double_owners(self, kept, coverage) -> set[bytes]:
        """Report owned extents that overlap shared runs or an earlier owned extent.

        The runs the shared extents map come first, then the owned extents by
        first block; return the keys of the owned extents a repair unmaps.
        """
        claims = [(start, 0, end - start, None, 0, 0) for start, end, _ in coverage]
        claims += [(phys, 1, count, key, ino, number) for key, ino, number, phys, count, flag in kept
                   if flag == OWNED]  # fmt: skip
        dropped = set()
        end = -1
        for phys, _, count, key, ino, number in sorted(claims, key=lambda c: (c[0], c[1])):
            if key is not None and phys < end:
                self.problem(f"blocks {phys}..{min(end, phys + count) - 1} are owned by two extents; "
                             f"the second is inode {ino} in layer {number}",
                             lambda key=key: self.txn.delete(key, db=self.db("extents")),
                             "unmap the second owner")  # fmt: skip
                dropped.add(key)
                continue
            self.owned.append((phys, count))
            end = max(end, phys + count)
        return dropped

    def _check_borrowed(self, kept) -> set[bytes]:
        """Report borrowed extents that point outside every owned block; return their keys."""
        owned = runs_union(sorted(self.owned))
        unowned = set()
        for key, ino, number, phys, count, flag in kept:
            if flag != BORROWED or not runs_difference([(phys, count)], owned):
                continue
            self.problem(f"borrowed extent {phys}..{phys + count - 1} of inode {ino} in layer {number} "
                         "points at blocks no layer owns",
                         lambda key=key: self.txn.delete(key, db=self.db("extents")), "unmap it")  # fmt: skip
            unowned.add(key)
        return unowned

    def check_free_space(self):
        """free-space map"""
        limit = self.store.data_blocks
        used = runs_union(self.owned)
        records = sorted((U64.unpack(k)[0], U64.unpack(v)[0]) for k, v in self.records("free"))
        free = []
        previous = None
        for start, count in records:
            if count == 0 or start + count > limit:
                self.problem(f"free extent {start}..{start + count - 1} is outside the data region",
                             self._rebuild_free_map, "delete it")  # fmt: skip
                continue
            if previous is not None and start <= sum(previous):
                relation = "overlap" if start < sum(previous) else "touch"
                self.problem(f"free extents at blocks {previous[0]} and {start} {relation}",
                             self._rebuild_free_map, "merge them")  # fmt: skip
            free.append((start, count))
            previous = (start, count) if previous is None or start + count > sum(previous) else previous
        for start, count in runs_difference(runs_union(free), runs_difference(runs_union(free), used)):
            self.problem(f"blocks {start}..{start + count - 1} are both mapped and in the free map",
                         self._rebuild_free_map, "remove them from the free map")  # fmt: skip
        for start, count in runs_difference([(0, limit)], runs_union(sorted(free + used))):
            self.problem(f"{count} blocks at {start}..{start + count - 1} are neither mapped nor free",
                         self._rebuild_free_map, f"free {count} unreferenced blocks")  # fmt: skip
        self.store.alloc.count(self.txn)

    def _rebuild_free_map(self) -> None:
        """Rewrite the free map as every block outside ``self.owned`` (a no-op once done)."""
        wanted = runs_difference([(0, self.store.data_blocks)], runs_union(self.owned))
        current = [(U64.unpack(k)[0], U64.unpack(v)[0]) for k, v in self.cursor("free") if len(v) == 8]
        if current == wanted and all(len(k) == 8 for k, _ in self.cursor("free")):
            return
        for key in [bytes(k) for k, _ in self.cursor("free")]:
            self.txn.delete(key, db=self.db("free"))
        for start, count in wanted:
            self.txn.put(U64.pack(start), U64.pack(count), db=self.db("free"))
        self.store.alloc.count(self.txn)

