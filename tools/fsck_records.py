"""Record validation and a tolerant store opener for lcfs-fsck.

fsck must open stores that the daemon would refuse or trip over: layer
records it cannot decode, a parent that does not exist, free-map values of
the wrong length. ``FsckStore`` loads such a store without failing, and the
``*_RULES`` tables say which keys and values each database accepts, so the
phases can report the rest and never unpack a malformed record.
"""

from __future__ import annotations

import json

import lmdb

from lcfs.journal import intents
from lcfs.store import Store, errors
from lcfs.store.data import BORROWED, OWNED, REFS, SHARED
from lcfs.store.format import DATABASES, U64, U64X2, Inode, Layer
from lcfs.store.snapshots import MAX_KEY_BYTES, MalformedSnapshot, SnapshotInfo

# Length of an inode record with an empty name and target; its last two
# bytes are the name length.
INODE_FIXED = len(Inode(0, 0).pack())


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode()
    except UnicodeDecodeError:
        return False
    return True


def _changes_key(key: bytes) -> bool:
    if len(key) == 17 and key[8:9] == b"i":
        return True
    return len(key) >= 18 and key[8:9] == b"d"


def _inode_value(value: bytes) -> bool:
    if len(value) < INODE_FIXED:
        return False
    name_len = int.from_bytes(value[INODE_FIXED - 2 : INODE_FIXED], "big")
    return INODE_FIXED + name_len <= len(value)


def read_layer(key: bytes, value: bytes) -> Layer | None:
    """Decode a layer record, or return None if it is malformed."""
    if len(key) != 8:
        return None
    number = U64.unpack(key)[0]
    try:
        layer = Layer.unpack(number, value)
    except (ValueError, KeyError, TypeError):
        return None
    valid = (
        isinstance(layer.id, str)
        and layer.id
        and (layer.parent is None or isinstance(layer.parent, int))
        and isinstance(layer.depth, int)
        and isinstance(layer.frozen, bool)
        and isinstance(layer.created, (int, float))
        and layer.state in ("ready", "removing")
    )
    return layer if valid else None


def read_intent(value: bytes) -> dict | None:
    """Decode an intent record, or return None if it is malformed."""
    try:
        intent = json.loads(value)
    except ValueError:
        return None
    if not isinstance(intent, dict) or intent.get("kind") not in intents.KINDS:
        return None
    # Recovery looks the layer up by number, and an orphan by inode too.
    if not isinstance(intent.get("layer"), int):
        return None
    if intent["kind"] == "orphan" and not isinstance(intent.get("ino"), int):
        return None
    return intent


def read_snapshot(key: bytes, value: bytes) -> SnapshotInfo | None:
    """Decode a snapshot record as the daemon does, or return None if it is malformed."""
    try:
        return SnapshotInfo.unpack(bytes(key).decode("utf-8", "surrogateescape"), value)
    except MalformedSnapshot:
        return None


KEY_RULES = {
    "layers": lambda k: len(k) == 8,
    "layer_ids": lambda k: bool(k) and _utf8(k),
    "children": lambda k: len(k) == 16,
    "inodes": lambda k: len(k) == 16,
    # dir ino, a name of at least one byte, NUL, layer
    "dirents": lambda k: len(k) >= 18 and k[-9] == 0,
    "xattrs": lambda k: len(k) >= 17,
    "extents": lambda k: len(k) == 24,
    "free": lambda k: len(k) == 8,
    "changes": _changes_key,
    "nodes": lambda k: len(k) == 8,
    "node_keys": lambda k: len(k) == 16,
    "intents": lambda k: len(k) == 8,
    "refs": lambda k: len(k) == 8,
    "snapshots": lambda k: 0 < len(k) <= MAX_KEY_BYTES,
}

VALUE_RULES = {
    "layers": lambda k, v: read_layer(k, v) is not None,
    "layer_ids": lambda k, v: len(v) == 8,
    "inodes": lambda k, v: _inode_value(v),
    "dirents": lambda k, v: len(v) in (0, 9),
    # physical block, count, and a flag: borrowed, owned or shared
    "extents": lambda k, v: len(v) == 13 and v[12] in (BORROWED, OWNED, SHARED),
    "free": lambda k, v: len(v) == 8,
    "nodes": lambda k, v: len(v) == 16,
    "node_keys": lambda k, v: len(v) == 8,
    "intents": lambda k, v: read_intent(v) is not None,
    "refs": lambda k, v: len(v) == REFS.size,
    "snapshots": lambda k, v: read_snapshot(k, v) is not None,
}


def key_ok(name: str, key: bytes) -> bool:
    rule = KEY_RULES.get(name)
    return rule is None or bool(rule(key))


def well_formed(name: str, key: bytes, value: bytes) -> bool:
    if not key_ok(name, key):
        return False
    value_rule = VALUE_RULES.get(name)
    return value_rule is None or value_rule(key, value)


def damage_advice(device: str) -> str:
    """Return what to do about LMDB pages that fsck cannot read."""
    return (
        f"lcfs-fsck repairs lcfs records but not LMDB's own pages, so restore "
        f"{device} from a backup, or format it with 'lcfs mkfs --force {device}' "
        "and pull the images again"
    )


class DamagedDatabase(errors.StoreError):
    """An LMDB database of the store cannot be read to the end."""


def read_databases(path: str, metadata_size: int) -> None:
    """Read every key of every database read-only; raise DamagedDatabase naming the first damage.

    LMDB's list of named databases must be in key order: otherwise look-ups
    by name find a wrong or an empty database, and a repair would then
    delete every record it misses there. The read happens before the store
    opens, in a read-only environment, because in the store's write
    transaction py-lmdb reports some damaged pages only as MDB_BAD_TXN.
    """
    env = lmdb.open(path, subdir=False, lock=False, readonly=True, map_size=metadata_size,
                    max_dbs=len(DATABASES) + 1)  # fmt: skip
    source = "the list of databases"
    try:
        with env.begin() as txn:
            names = [bytes(key) for key in txn.cursor().iternext(values=False)]
            if any(before >= after for before, after in zip(names, names[1:])):
                listed = ", ".join(repr(name.decode(errors="replace")) for name in names)
                raise DamagedDatabase(
                    f"the LMDB database on {path} appears damaged: its list of databases "
                    f"is out of order ({listed}). {damage_advice(path)}"
                )
            for name in DATABASES:
                source = f"database {name}"
                if name.encode() not in names:
                    continue  # Opening the store creates it.
                db = env.open_db(name.encode(), txn=txn, create=False)
                for _ in txn.cursor(db=db).iternext(values=False):
                    pass
    except lmdb.Error as exc:
        raise DamagedDatabase(
            f"the LMDB database on {path} appears damaged: reading {source} "
            f"failed: {exc}. {damage_advice(path)}"
        ) from None
    finally:
        env.close()


class FsckStore(Store):
    """A store opened for checking.

    Loading first reads every record of every database, so that a damaged
    LMDB page stops fsck before a repair writes anything. It skips layer
    records it cannot decode and tolerates a parent that does not exist,
    where ``Store._load`` would raise, so that the phases can report and
    repair them. It otherwise loads what ``Store._load`` loads.
    """

    def __init__(self, path: str, fd: int, superblock: dict):
        # Store.__init__ opens every database in a write transaction that it
        # commits, and creates any it does not find by name. On a damaged list
        # of databases that would write to the device before the first check.
        read_databases(path, superblock["metadata_size"])
        super().__init__(path, fd, superblock)

    def _load(self) -> None:
        with self.lock:
            txn = self._txn = self._group_txn()
            self._read_every_record(txn)
            for key, value in txn.cursor(db=self.dbs["layers"]):
                layer = read_layer(bytes(key), bytes(value))
                if layer is not None:
                    self._layers[layer.number] = layer
                    self._ids[layer.id] = layer.number
            for key, _ in txn.cursor(db=self.dbs["children"]):
                if len(key) == 16:
                    parent, child = U64X2.unpack(key)
                    self._children.setdefault(parent, set()).add(child)
            for layer in self._layers.values():
                parent = self._layers.get(layer.parent)
                layer.parent_id = parent.id if parent is not None else None
            free = txn.cursor(db=self.dbs["free"])
            self.alloc.free_blocks = sum(U64.unpack(v)[0] for _, v in free if len(v) == 8)
            if not self.readonly:
                self._set_state("dirty")
        if not self.readonly:
            self.commit()

    def _read_every_record(self, txn) -> None:
        """Walk every database once; raise DamagedDatabase naming the first that fails."""
        for name in (None, *DATABASES):
            try:
                cursor = txn.cursor(db=self.dbs[name]) if name else txn.cursor()
                for _ in cursor.iternext(values=False):
                    pass
            except lmdb.Error as exc:
                # The transaction failed, so closing the store must not commit it.
                self.readonly = True
                source = f"database {name}" if name else "the list of databases"
                raise DamagedDatabase(
                    f"the LMDB database on {self.path} appears damaged: reading {source} "
                    f"failed: {exc}. {damage_advice(self.path)}"
                ) from None
