"""lcfs-fsck: check a store offline and repair what it finds.

Phases run in a fixed order, each logged as "Checking X". With ``--repair``
each problem is fixed as soon as its phase finds it, so later phases see a
store that the earlier ones already made consistent. Without it nothing on
the device changes, because the check runs in an LMDB write transaction
that is never committed. The superblock and LMDB phases apply their fixes
to that transaction in both modes, so no later phase reads a malformed
record or a missing counter.
Without ``--repair`` the later phases also skip the records of layers that
a repair removes as a whole: layers with a broken ancestry, and layers with
an unfinished import or removal.

NOTE: LMDB 0.9 (mdb.c, ``MDB_IDL_UM_MAX``) spills pages of an uncommitted
transaction to the file only once about 2^17 pages (512 MiB) are dirty.
The fixes a check applies dirty far fewer, so the device stays byte for
byte equal, but a check is not guaranteed read-only past that size.

A repair marks the superblock ``needs_fsck`` in the transaction of its
first fix, so the mark reaches the device with the first change and the
daemon will not open a device whose repair was interrupted. The mark is
cleared when a final check, run in a nested transaction that is aborted,
finds nothing. Opening the store reads every record first (see
``FsckStore``), so a damaged LMDB page stops fsck before anything changes.
The work runs in a child process (see ``tools.fsck_child``), because LMDB
aborts the process on some damaged pages.

NOTE: a page that reads well but fails LMDB's assertions on write stops a
repair that may already have committed fixes. The store then stays marked,
and every later repair stops at the same write.

Exit codes: 0 clean, 1 problems found and all repaired, 4 problems left,
8 could not run (device busy, unreadable, bad arguments).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import lmdb

from lcfs.cli import parse_seconds
from lcfs.store import errors
from lcfs.store.format import (
    BLOCK_SIZE,
    DATABASES,
    MAGIC,
    U64,
    U64X2,
    Layer,
    dirent_key,
    inode_key,
    read_superblock,
)
from tools.fsck_blocks import BlockChecks
from tools.fsck_child import death_message, run_in_child
from tools.fsck_layers import LayerChecks
from tools.fsck_namespace import NamespaceChecks
from tools.fsck_records import FsckStore, damage_advice, key_ok, well_formed

log = logging.getLogger("lcfs.fsck")

EXIT_CLEAN = 0
EXIT_REPAIRED = 1
EXIT_LEFT = 4
EXIT_FAILED = 8

# Problems of this phase are in Docker's files, not in the store.
DOCKER_PHASE = "Docker references and stale files"

EPILOG = """exit codes:
  0  the store is clean
  1  problems were found and all of them were repaired
  4  problems are left (run again with --repair)
  8  fsck could not run (device in use, unreadable, or bad arguments)
"""

COUNTERS = (b"next_ino", b"next_layer", b"next_node", b"next_intent")
LOG_LEVELS = ["debug", "info", "warning", "error", "critical"]
# LMDB errors about resources, not about damaged pages.
RESOURCE_ERRORS = (
    lmdb.MapFullError,
    lmdb.TxnFullError,
    lmdb.DiskError,
    lmdb.MemoryError,
    lmdb.ReadonlyError,
)


class Progress:
    """A one-line progress counter on stderr for long phases."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.label = ""
        self.total = 0
        self.last = 0.0

    def start(self, label: str, total: int) -> None:
        self.label, self.total, self.last = label, total, 0.0

    def update(self, done: int) -> None:
        if not self.enabled or self.total < 1000:
            return
        now = time.monotonic()
        if now - self.last < 0.2 and done < self.total:
            return
        self.last = now
        width = 30
        filled = width * done // max(self.total, 1)
        sys.stderr.write(f"\r  {self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total}")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled and self.total >= 1000:
            sys.stderr.write("\r" + " " * 70 + "\r")
            sys.stderr.flush()


class Checker(LayerChecks, NamespaceChecks, BlockChecks):
    """Runs the phases over an open store and keeps the tally of problems.

    ``interrupted`` is true when an earlier repair of the store did not finish.
    """

    def __init__(self, store: FsckStore, repair: bool, progress: Progress, interrupted: bool = False):
        self.store = store
        self.repair = repair
        self.progress = progress
        self.interrupted = interrupted
        self.problems: list[dict] = []
        # Tree walks per layer, reused by later phases until a fix changes the store.
        self._walks: dict[int, tuple[dict, dict]] = {}
        self.phase = ""
        self.docker_root: str | None = None
        self.grace = 3600.0
        # Layers a repair removes as a whole; without --repair later phases skip their records.
        self.skip: set[int] = set()
        # Sorted (first block, count) of the owned extents and shared runs the extents phase kept.
        self.owned: list[tuple[int, int]] = []
        # Whether the group transaction carries the needs_fsck mark of this repair.
        self.marked = False

    # -- bookkeeping ---------------------------------------------------------

    def begin_repair(self) -> None:
        """Mark the superblock ``needs_fsck`` in the transaction that carries the first fix.

        The mark and the fix reach the device in one commit, so a check that
        dies before its first fix leaves the store as it was.
        """
        if self.marked:
            return
        with self.store.lock:
            self.store._ready()
            self.store._set_state("dirty", needs_fsck=True)
        self.marked = True

    def problem(self, message: str, fix=None, fix_text: str = "", always: bool = False) -> None:
        """Record a problem; in repair mode apply ``fix`` and log what it changed.

        ``always`` applies the fix without --repair too: the check's
        transaction is never committed, so this only hides the damage from
        the later phases.
        """
        entry = {"phase": self.phase, "problem": message, "repaired": False, "action": ""}
        if fix is not None and (self.repair or always):
            self._walks.clear()
        if self.repair and fix is not None:
            self.begin_repair()
            try:
                self.store._write(fix)
            except (errors.StoreError, lmdb.Error) as exc:
                self.store._clear_caches()
                entry["action"] = f"repair failed: {exc}"
                log.error("%s: %s; repair failed: %s", self.phase, message, exc)
                self.problems.append(entry)
                return
            # Fixes write records directly, past the store's lookup caches.
            self.store._clear_caches()
            entry["repaired"] = True
            entry["action"] = fix_text
            log.warning("%s: %s; repair: %s", self.phase, message, fix_text)
        else:
            if fix is not None and always:
                fix()
            entry["action"] = f"--repair would {fix_text}" if fix is not None else "no repair available"
            log.warning("%s: %s; %s", self.phase, message, entry["action"])
        self.problems.append(entry)

    def run(self) -> None:
        store = self.store
        with store.lock:
            store._ready()
            for name in PHASES:
                method = getattr(self, f"check_{name}")
                self.phase = method.__doc__.strip().splitlines()[0].rstrip(".")
                log.info("Checking %s", self.phase)
                method()
                if self.repair:
                    store.commit()
            if self.docker_root:
                from tools.docker_refs import check_docker

                self.phase = DOCKER_PHASE
                log.info("Checking %s", self.phase)
                check_docker(self, self.docker_root, self.grace)
                if self.repair:
                    store.commit()

    @property
    def txn(self):
        # A repair commits between phases, which ends the group transaction.
        self.store._ready()
        return self.store._txn

    def db(self, name):
        return self.store.dbs[name]

    def cursor(self, name):
        return self.txn.cursor(db=self.db(name))

    def records(self, name: str) -> list[tuple[bytes, bytes]]:
        """Return (key, value) of every well-formed record of a database.

        A list, not a cursor, because phases repair records while they loop.
        NOTE: this keeps a whole database in memory (an estimate: 150 to 250
        bytes a record in CPython 3.11).
        """
        found = []
        for key, value in self.cursor(name):
            key, value = bytes(key), bytes(value)
            if well_formed(name, key, value):
                found.append((key, value))
        return found

    # -- superblock and LMDB -------------------------------------------------------

    def check_superblock(self):
        """superblock"""
        sb = self.store.superblock
        if sb.get("magic") != MAGIC:
            self.problem(f"superblock has magic {sb.get('magic')!r}, expected {MAGIC!r}")
        if sb.get("block_size") != BLOCK_SIZE:
            # Every store of this format has 4 KiB blocks (the data offsets
            # are computed with BLOCK_SIZE), so any other value is damage.
            self.problem(f"superblock has block size {sb.get('block_size')!r}, expected {BLOCK_SIZE}",
                         lambda: self.store._set_state(sb["state"], block_size=BLOCK_SIZE),
                         f"set it to {BLOCK_SIZE}")  # fmt: skip
        if self.interrupted:
            self.problem("an earlier repair was interrupted, so repairs may be half done",
                         lambda: None, "check every structure and clear the mark")  # fmt: skip
        highest = None
        for name in COUNTERS:
            raw = self.txn.get(name, db=self.db("meta"))
            if raw is None or len(raw) != 8:
                highest = highest or self._highest_in_use()
                value = highest[name] + 1
                self.problem(f"counter {name.decode()} is missing or malformed",
                             lambda name=name, value=value: self.txn.put(name, U64.pack(value), db=self.db("meta")),
                             f"set it to {value}", always=True)  # fmt: skip

    def _highest_in_use(self) -> dict[bytes, int]:
        """Return, per counter, the highest number any well-formed record uses."""
        return {
            b"next_node": max((U64.unpack(k)[0] for k, _ in self.records("nodes")), default=1),
            b"next_ino": max((U64.unpack_from(k)[0] for k, _ in self.records("inodes")), default=1),
            b"next_layer": max((U64.unpack(k)[0] for k, _ in self.records("layers")), default=0),
            b"next_intent": max((U64.unpack(k)[0] for k, _ in self.records("intents")), default=0),
        }

    def check_lmdb(self):
        """LMDB integrity"""
        for name in DATABASES:
            self._check_key_order(name)
        for name in DATABASES:
            if name == "meta":
                continue
            bad = [(bytes(k), bytes(v)) for k, v in self.cursor(name) if not well_formed(name, bytes(k), bytes(v))]
            for key, _ in bad:
                if name == "layers" and len(key) == 8:
                    self._unreadable_layer(key)
                    continue
                part = "value of key" if key_ok(name, key) else "key"
                self.problem(f"malformed {part} {key.hex()} in database {name}",
                             lambda key=key, name=name: self.txn.delete(key, db=self.db(name)),
                             "delete the record", always=True)  # fmt: skip

    def _check_key_order(self, name: str) -> None:
        """Report a database that LMDB cannot search or change, and rebuild it.

        A damaged key in a leaf page leaves the B-tree out of order, so LMDB's
        binary search misses that record and its neighbours while a cursor
        still returns them all. A key whose length was zeroed cannot even be
        deleted (MDB_BAD_VALSIZE). Writing every other record again into the
        emptied database restores the order and drops the damaged page, and a
        damaged key that LMDB accepts becomes a stray record for later phases.
        """
        records = [(bytes(key), bytes(value)) for key, value in self.cursor(name)]
        max_key = self.store.env.max_key_size()
        storable = [(key, value) for key, value in records if 0 < len(key) <= max_key]
        dropped = len(records) - len(storable)
        misplaced = sum(1 for before, after in zip(records, records[1:]) if before[0] >= after[0])
        if not misplaced and not dropped:
            return

        def rebuild():
            db = self.db(name)
            self.txn.drop(db, delete=False)
            for key, value in storable:
                self.txn.put(key, value, db=db)

        if misplaced:
            message = f"database {name} has {misplaced} keys out of order, so look-ups miss records"
            if dropped:
                message += f", and {dropped} keys that are empty or longer than {max_key} bytes"
        else:
            message = (f"database {name} has {dropped} keys that are empty or longer than "
                       f"{max_key} bytes, which LMDB cannot delete")  # fmt: skip
        kept = f"{len(storable)} other records" if dropped else f"{len(storable)} records"
        self.problem(message, rebuild, f"rebuild it from its {kept}", always=True)

    def _unreadable_layer(self, key: bytes) -> None:
        """Report a layer record that does not decode; rebuild it from the id index if it can."""
        number = U64.unpack(key)[0]
        ids = [k.decode() for k, v in self.records("layer_ids") if v == key]
        if len(ids) != 1:
            self.problem(f"layer record {number} is unreadable and no id index entry names it",
                         lambda: self.txn.delete(key, db=self.db("layers")),
                         "delete the record", always=True)  # fmt: skip
            return
        links = [U64X2.unpack(k) for k, _ in self.records("children")]
        parents = [p for p, c in links if c == number]
        layer = Layer(number, ids[0], parents[0] if len(parents) == 1 else None, 0,
                      frozen=any(p == number for p, _ in links))  # fmt: skip
        self.problem(f"layer record {number} ({layer.id}) is unreadable",
                     lambda: self.txn.put(key, layer.pack(), db=self.db("layers")),
                     "rebuild it from the id index and the child links", always=True)  # fmt: skip

    # -- inodes and entries ------------------------------------------------------------

    def check_change_logs(self):
        """change logs"""
        layers = self.store._layers
        stale = []
        for key, _ in self.records("changes"):
            number = U64.unpack_from(key)[0]
            if number in self.skip:
                continue
            if number not in layers:
                stale.append((key, f"change log entry of missing layer {number}"))
            elif key[8:9] == b"i":
                ino = U64.unpack_from(key, 9)[0]
                if self.txn.get(inode_key(ino, number), db=self.db("inodes")) is None:
                    stale.append((key, f"change log of layer {layers[number].id} names inode {ino}, "
                                       "which the layer does not have"))  # fmt: skip
            else:
                dir_ino = U64.unpack_from(key, 9)[0]
                if self.txn.get(dirent_key(dir_ino, key[17:], number), db=self.db("dirents")) is None:
                    stale.append((key, f"change log of layer {layers[number].id} names an entry in "
                                       f"directory {dir_ino} that the layer does not have"))  # fmt: skip
        for key, message in stale:
            self.problem(message, lambda key=key: self.txn.delete(key, db=self.db("changes")), "delete it")

    def _drop_node(self, node: int, target: bytes) -> None:
        """Delete the records that map ``node`` and ``target`` to each other, and no others."""
        packed = U64.pack(node)
        if self.txn.get(target, db=self.db("node_keys")) == packed:
            self.txn.delete(target, db=self.db("node_keys"))
        if self.txn.get(packed, db=self.db("nodes")) == target:
            self.txn.delete(packed, db=self.db("nodes"))

    def check_nodes(self):
        """node ids and counters"""
        forward = {U64.unpack(k)[0]: v for k, v in self.records("nodes")}
        reverse = {k: U64.unpack(v)[0] for k, v in self.records("node_keys")}
        # A store written before layer removal deleted node ids still
        # contains those of every layer removed since.
        layers = self.store._layers
        pairs = set(forward.items()) | {(node, target) for target, node in reverse.items()}
        for node, target in sorted(pairs):
            layer, ino = U64X2.unpack(target)
            if layer in layers:
                continue
            if forward.get(node) == target:
                del forward[node]
            if reverse.get(target) == node:
                del reverse[target]
            self.problem(f"node id {node} of inode {ino} names missing layer {layer}",
                         lambda node=node, target=target: self._drop_node(node, target),
                         "delete it")  # fmt: skip
        for node, target in sorted(forward.items()):
            if reverse.get(target) != node:
                self.problem(f"node id {node} has no matching reverse entry",
                             lambda node=node, target=target: self.txn.put(target, U64.pack(node),
                                                                            db=self.db("node_keys")),
                             "add it")  # fmt: skip
        for target, node in sorted(reverse.items()):
            if node not in forward:
                layer, ino = U64X2.unpack(target)
                self.problem(f"node id {node} of inode {ino} in layer {layer} has no forward entry",
                             lambda node=node, target=target: self.txn.put(U64.pack(node), target,
                                                                            db=self.db("nodes")),
                             "add it")  # fmt: skip
            elif forward[node] != target:
                self.problem(f"reverse entry of node id {node} names another inode",
                             lambda target=target: self.txn.delete(target, db=self.db("node_keys")),
                             "delete it")  # fmt: skip
        highest = self._highest_in_use()
        highest[b"next_node"] = max(highest[b"next_node"], max(reverse.values(), default=1))
        for name, top in highest.items():
            raw = self.txn.get(name, db=self.db("meta"))
            if raw is None or len(raw) != 8:
                continue  # reported by the superblock phase
            value = U64.unpack(raw)[0]
            if value <= top:
                self.problem(f"counter {name.decode()} is {value} but {top} is in use",
                             lambda name=name, top=top: self.txn.put(name, U64.pack(top + 1), db=self.db("meta")),
                             f"set it to {top + 1}")  # fmt: skip


# Entries come before link counts, so the counts see the entries as repaired.
PHASES = (
    "superblock",
    "lmdb",
    "layers",
    "intents",
    "dirents",
    "inodes",
    "xattrs",
    "extents",
    "free_space",
    "change_logs",
    "nodes",
)


class _ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser that exits with EXIT_FAILED, not 2, on a bad command line."""

    def error(self, message: str):
        self.exit(
            EXIT_FAILED, f"{self.prog}: error: {message} (see {self.prog} --help)\n"
        )


def parse_args(argv):
    parser = _ArgumentParser(
        prog="lcfs-fsck",
        description="Check an lcfs store offline and, with --repair, fix what is wrong.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("device", help="image file or block device holding the store")
    parser.add_argument("--repair", action="store_true", help="fix the problems found")
    parser.add_argument("--yes", action="store_true", help="repair without asking for confirmation")
    parser.add_argument("--docker-root", help="Docker's data root, to find orphaned layers and stale files")
    parser.add_argument("--grace", type=parse_seconds, default=3600.0, metavar="SECONDS",
                        help="seconds a layer must be old before it counts as an orphan (default 3600)")  # fmt: skip
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="show progress bars on long phases (default: when stderr is a terminal)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    parser.add_argument(
        "--log-level",
        default="info",
        type=str.lower,
        choices=LOG_LEVELS,
        help="lowest level of log messages written to stderr (default info)",
    )
    args = parser.parse_args(argv)
    root = args.docker_root
    if root is not None and not os.path.isdir(root):
        problem = "is not a directory" if os.path.exists(root) else "does not exist"
        parser.error(
            f"--docker-root {root} {problem}: give Docker's data root, "
            "such as /var/lib/docker"
        )
    return args


def open_store(device: str, repair: bool) -> FsckStore | None:
    """Open the device for checking, or print why it cannot be and return None."""
    try:
        return FsckStore.open(device, recover=False, readonly=not repair, for_fsck=True)
    except errors.DeviceBusy as exc:
        print(f"lcfs-fsck: {exc}; stop that process (an lcfs daemon, for example) "
              "and run lcfs-fsck again", file=sys.stderr)  # fmt: skip
    except errors.StoreError as exc:
        print(f"lcfs-fsck: {exc}", file=sys.stderr)
    except OSError as exc:
        print(f"lcfs-fsck: cannot open {device}: {exc.strerror}", file=sys.stderr)
    except (ValueError, KeyError, TypeError, lmdb.Error) as exc:
        cause = first_error(exc)
        if isinstance(cause, lmdb.Error):
            print(failure_message(device, cause), file=sys.stderr)
        else:
            print(
                f"lcfs-fsck: {device}: the superblock or the LMDB environment "
                f"is unreadable: {cause}",
                file=sys.stderr,
            )
    return None


def verify(store: FsckStore, docker_root: str | None, grace: float, progress: Progress) -> list[dict]:
    """Run every phase again without repairing and return the problems still there.

    The run happens in a nested transaction that is aborted, so nothing it
    does reaches the device.
    """
    checker = Checker(store, False, progress)
    checker.docker_root, checker.grace = docker_root, grace
    with store.lock:
        store._ready()
        group = store._txn
        store._txn = store.env.begin(write=True, parent=group)
        fsck_log = logging.getLogger("lcfs.fsck")
        fsck_log.disabled = True
        try:
            checker.run()
        finally:
            fsck_log.disabled = False
            store._txn.abort()
            store._txn = group
            store._clear_caches()
            checker.skip.clear()
            checker._reload_layers()
            store.alloc.count(group)
    return checker.problems


def confirm_repair(device: str) -> bool:
    """Ask on the terminal before a repair; without a terminal, ask for --yes instead."""
    if not sys.stdin.isatty():
        print(f"lcfs-fsck: --repair changes {device}; pass --yes to confirm", file=sys.stderr)
        return False
    answer = input(f"Repair the store on {device}? [y/N] ")
    return answer.strip().lower() in ("y", "yes")


def check_store(store: FsckStore, args, progress: Progress) -> tuple[list[dict], int, int]:
    """Run the phases (and, after a repair, a final check); return (problems, found, left)."""
    interrupted = bool(store.superblock.get("needs_fsck"))
    checker = Checker(store, args.repair, progress, interrupted)
    checker.docker_root, checker.grace = args.docker_root, args.grace
    checker.run()
    problems = checker.problems
    found = len(problems)
    left = sum(1 for p in problems if not p["repaired"])
    left_in_store = left
    if args.repair and found:
        remaining = verify(store, args.docker_root, args.grace, progress)
        for entry in remaining:
            log.error("%s: %s; still there after the repair", entry["phase"], entry["problem"])
            entry["action"] = "still there after the repair"
        problems = problems + remaining
        left = len(remaining)
        left_in_store = sum(1 for entry in remaining if entry["phase"] != DOCKER_PHASE)
    # Problems left in Docker's files (a container to remove with docker rm,
    # unreadable references) leave the store consistent, so the daemon may open it.
    if args.repair and left_in_store == 0 and store.superblock.get("needs_fsck"):
        with store.lock:
            store._ready()
            store.superblock.pop("needs_fsck", None)
            store._set_state("dirty")
            store.commit()
    return problems, found, left


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(levelname)s %(message)s",
        stream=sys.stderr,
    )
    tty = sys.stderr.isatty()
    progress = Progress(tty if args.progress is None else args.progress)
    if args.repair and not args.yes and not confirm_repair(args.device):
        return EXIT_FAILED
    result = run_in_child(lambda: run(args, progress), EXIT_FAILED)
    if result.signal is None:
        return result.code
    print(death_message(args.device, result), file=sys.stderr)
    return EXIT_FAILED


def first_error(exc: BaseException) -> BaseException:
    """Return the first exception of a chain: one raised while handling another is a follow-on."""
    while True:
        earlier = exc.__cause__ or (
            None if exc.__suppress_context__ else exc.__context__
        )
        if earlier is None:
            return exc
        exc = earlier


def failure_message(device: str, exc: BaseException) -> str:
    """Log a failure of the check and return the one-line message for the user, with the next step."""
    cause = first_error(exc)
    if isinstance(cause, lmdb.Error) and not isinstance(cause, RESOURCE_ERRORS):
        log.debug("lcfs-fsck failed on %s", device, exc_info=cause)
        return (
            f"lcfs-fsck: the LMDB database on {device} appears damaged: {cause}. "
            f"{damage_advice(device)}"
        )
    if isinstance(cause, (errors.StoreError, OSError, lmdb.Error)):
        log.debug("lcfs-fsck failed on %s", device, exc_info=cause)
        return (
            f"lcfs-fsck: failed on {device}: {cause}; the store was not checked to "
            "the end, so fix that and run lcfs-fsck again"
        )
    log.error("lcfs-fsck failed on %s", device, exc_info=cause)
    return (
        f"lcfs-fsck: failed on {device}: {type(cause).__name__}: {cause}; this is "
        "a bug in lcfs-fsck, so report it with the traceback above"
    )


def close_after_failure(store: FsckStore) -> None:
    """Close the store without committing the changes of the phase that failed."""
    with store.lock:
        if store._group is not None:
            store._group.abort()
            store._group = None
        store._txn = None
        # close() commits unless the store is read-only.
        store.readonly = True
    try:
        store.close()
    except (errors.StoreError, lmdb.Error) as exc:
        log.debug("closing %s after the failure failed too: %s", store.path, exc)


def run(args, progress: Progress) -> int:
    """Check the device that ``args`` names, repair it with --repair, and return the exit code."""
    store = open_store(args.device, args.repair)
    if store is None:
        return EXIT_FAILED
    try:
        problems, found, left = check_store(store, args, progress)
        stats = store.statfs()
        layer_count = len(store._layers)
    except BaseException as exc:
        close_after_failure(store)
        if not isinstance(exc, Exception):
            raise
        # Exit 8, not Python's 1, which would claim that everything was repaired.
        message = failure_message(args.device, exc)
        superblock = read_superblock(args.device) if args.repair else None
        if superblock and superblock.get("needs_fsck"):
            message += (
                f"; {args.device} stays marked as mid-repair, "
                "so the daemon will not open it"
            )
        print(message, file=sys.stderr)
        return EXIT_FAILED
    if store.readonly:
        with store.lock:
            if store._group is not None:
                store._group.abort()
                store._group = None
    store.close()

    if found == 0:
        code = EXIT_CLEAN
    elif left == 0:
        code = EXIT_REPAIRED
    else:
        code = EXIT_LEFT
    repaired = max(found - left, 0) if args.repair else 0
    summary = (f"{args.device}: {found} problems found, {repaired} repaired, {left} left; "
               f"{layer_count} layers, {stats.free_blocks} of {stats.total_blocks} blocks free")  # fmt: skip
    log.info("%s", summary)
    if args.json:
        print(json.dumps({"device": args.device, "exit_code": code, "found": found, "left": left,
                          "layers": layer_count, "free_blocks": stats.free_blocks,
                          "total_blocks": stats.total_blocks, "problems": problems}))  # fmt: skip
    else:
        print(summary)
    return code


if __name__ == "__main__":
    sys.exit(main())
