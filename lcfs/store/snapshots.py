"""containerd snapshots kept over store layers (a mixin of ``Store``).

A snapshot is a layer plus a record in the ``snapshots`` database::

    key: snapshot key or name (utf-8)
    value: JSON {"kind": "active" | "view" | "committed",
                 "layer": store layer id,
                 "parent": name of the parent snapshot, or "",
                 "created": ns, "updated": ns,
                 "labels": {str: str}}

Keys of active and view snapshots and names of committed ones share this
one key space, as in containerd. The layer of a snapshot has an id made of
``SNAPSHOT_LAYER_PREFIX`` and a number from the ``next_snapshot`` counter,
so snapshot layers never collide with Docker's hexadecimal layer ids. The
graphdriver rejects ids with this prefix, and List shows records only, so
neither side sees the other's layers.

Invariants every change keeps:

* a record names a ready layer with the prefix, and the layer of a parent
  snapshot is the parent of the child's layer;
* the layers of committed and view snapshots are frozen; an active
  snapshot's layer is writable (it never has children, because only
  committed snapshots can be parents);
* a record changes in the same LMDB transaction as the layer change it
  describes: Prepare and View create the layer and the record together,
  Commit renames the record and freezes the layer (no data is copied), and
  Remove deletes the record in the commit that records the removal intent,
  so a crash leaves either the whole snapshot or an intent that recovery
  finishes.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

from lcfs.journal.crash import crash_point

from . import errors
from .format import BLOCK_SIZE, U64, Layer

log = logging.getLogger(__name__)

SNAPSHOT_LAYER_PREFIX = "snapshot-"

KIND_VIEW = "view"
KIND_ACTIVE = "active"
KIND_COMMITTED = "committed"
KINDS = (KIND_VIEW, KIND_ACTIVE, KIND_COMMITTED)

# containerd rejects a label whose key and value together exceed 4096 bytes
# (labels.Validate in containerd 1.6).
MAX_LABEL_BYTES = 4096
# Maximum bytes of all the labels of one snapshot as protobuf encodes them. The
# snapshotter sends a snapshot's Info in one gRPC message. A message over the
# 4 MiB that gRPC clients receive by default (16 MiB for containerd 1.6's
# proxy client) fails every Stat and List that includes it, and a failed List
# stops containerd's garbage collection.
MAX_LABELS_TOTAL_BYTES = 3 * 1024 * 1024
# Bytes that protobuf adds to each label of an Info at most: the map entry's
# tag and length, and the tag and length of its key and of its value, each
# length below 16,384 (MAX_LABEL_BYTES), so two bytes long.
LABEL_ENCODING_BYTES = 9
# LMDB's default maximum key size, in bytes.
# NOTE: containerd's own snapshotters (bolt) accept longer keys. The keys
# containerd sends (namespace/sequence/key, about 100 bytes for an unpack)
# fit, but a longer one is rejected as invalid.
MAX_KEY_BYTES = 511

NEXT_SNAPSHOT = b"next_snapshot"


class SnapshotNotFound(errors.NotFound):
    """No snapshot has this key or name."""


class SnapshotExists(errors.Exists):
    """A snapshot with this key or name exists already."""


class SnapshotHasChildren(errors.Busy):
    """The snapshot is the parent of other snapshots."""


class MalformedSnapshot(errors.StoreError):
    """A snapshot record on the device does not decode."""

    def __init__(self, name: str, reason: str):
        super().__init__(
            f"snapshot record {name!r} is malformed ({reason}). Stop the daemon and "
            "run lcfs-fsck --repair on its device, which deletes the record"
        )


class WrongKind(errors.Busy):
    """The snapshot's kind does not allow the operation (commit of a view, say)."""


def is_snapshot_layer(layer_id: str) -> bool:
    """Return True if ``layer_id`` names the layer of a containerd snapshot."""
    return layer_id.startswith(SNAPSHOT_LAYER_PREFIX)


@dataclass(slots=True)
class SnapshotInfo:
    """One snapshot as containerd describes it, plus the id of its store layer."""

    name: str
    kind: str
    parent: str
    created_ns: int
    updated_ns: int
    labels: dict[str, str] = field(default_factory=dict)
    layer_id: str = ""

    def pack(self) -> bytes:
        return json.dumps(
            {
                "kind": self.kind,
                "layer": self.layer_id,
                "parent": self.parent,
                "created": self.created_ns,
                "updated": self.updated_ns,
                "labels": self.labels,
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def unpack(cls, name: str, raw: bytes) -> SnapshotInfo:
        """Decode a record; raise MalformedSnapshot naming the record if it is malformed.

        lcfs-fsck applies the same rules, so the daemon and fsck agree on
        which records are damaged.
        """
        try:
            rec = json.loads(bytes(raw))
            info = cls(name, rec["kind"], rec["parent"], rec["created"], rec["updated"],
                       rec["labels"], rec["layer"])  # fmt: skip
        except (ValueError, KeyError, TypeError) as error:
            raise MalformedSnapshot(name, f"{type(error).__name__}: {error}") from None
        if info.kind not in KINDS:
            raise MalformedSnapshot(name, f"unknown kind {info.kind!r}")
        if not (isinstance(info.layer_id, str) and is_snapshot_layer(info.layer_id)):
            raise MalformedSnapshot(name, f"invalid layer id {info.layer_id!r}")
        if not (isinstance(info.parent, str) and isinstance(info.created_ns, int)
                and isinstance(info.updated_ns, int)):  # fmt: skip
            raise MalformedSnapshot(name, "parent, created or updated has the wrong type")
        labels = info.labels
        if not (isinstance(labels, dict)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items())):  # fmt: skip
            raise MalformedSnapshot(name, "labels are not a map of strings")
        return info


def check_labels(labels: dict[str, str], name: str) -> dict[str, str]:
    """Return ``labels`` without empty values; raise Invalid for an oversized one.

    An empty value means "no label" in containerd, which never stores one.
    ``name`` is the snapshot's, for the error message.
    """
    total = 0
    for key, value in labels.items():
        size = len(key.encode()) + len(value.encode())
        if size > MAX_LABEL_BYTES:
            raise errors.Invalid(
                f"label {key[:64]!r}: key and value are {size} bytes, more than "
                f"the maximum of {MAX_LABEL_BYTES}"
            )
        if value:
            total += size + LABEL_ENCODING_BYTES
    if total > MAX_LABELS_TOTAL_BYTES:
        raise errors.Invalid(
            f"labels of snapshot {name}: {total} bytes in all, more than the maximum "
            f"of {MAX_LABELS_TOTAL_BYTES}. Remove labels before adding more"
        )
    return {key: value for key, value in labels.items() if value}


def _encode_key(key: str, field: str = "snapshot key") -> bytes:
    """Encode a snapshot key or name for the database; Invalid names ``field`` if it is bad."""
    if not key:
        raise errors.Invalid(f"invalid {field}: it is empty. Send a non-empty {field}")
    raw = key.encode("utf-8", "surrogateescape")
    if len(raw) > MAX_KEY_BYTES:
        raise errors.Invalid(
            f"invalid {field} {key[:64]!r}...: {len(raw)} bytes, more than "
            f"the maximum of {MAX_KEY_BYTES}"
        )
    return raw


class SnapshotMixin:
    # -- records ---------------------------------------------------------------

    def _snapshot(self, key: str, field: str = "snapshot key") -> SnapshotInfo | None:
        raw = self._txn.get(_encode_key(key, field), db=self.dbs["snapshots"])
        return SnapshotInfo.unpack(key, raw) if raw is not None else None

    def _existing_snapshot(self, key: str, field: str = "snapshot key") -> SnapshotInfo:
        info = self._snapshot(key, field)
        if info is None:
            raise SnapshotNotFound(f"snapshot {key} not found")
        return info

    def _put_snapshot(self, info: SnapshotInfo) -> None:
        self._txn.put(_encode_key(info.name), info.pack(), db=self.dbs["snapshots"])

    def _snapshot_layer(self, info: SnapshotInfo) -> Layer:
        number = self._ids.get(info.layer_id)
        layer = self._layers.get(number) if number is not None else None
        if layer is None or layer.state != "ready":
            raise errors.StoreError(
                f"snapshot {info.name}: its layer {info.layer_id} is missing; "
                "run Cleanup or lcfs-fsck"
            )
        return layer

    def _snapshot_names_by_layer(self, txn) -> dict[str, str]:
        """Return the name of the snapshot of each snapshot layer, by layer id.

        Used for log messages while the store opens, so a malformed record
        is skipped here (lcfs-fsck reports it) instead of failing the open.
        """
        names = {}
        for key, value in txn.cursor(db=self.dbs["snapshots"]):
            try:
                layer_id = json.loads(bytes(value))["layer"]
            except (ValueError, KeyError, TypeError):
                continue
            names[layer_id] = bytes(key).decode("utf-8", "surrogateescape")
        return names

    def _next_snapshot_layer_id(self) -> str:
        raw = self._txn.get(NEXT_SNAPSHOT, db=self.dbs["meta"])
        number = U64.unpack(raw)[0] if raw is not None else 1
        self._txn.put(NEXT_SNAPSHOT, U64.pack(number + 1), db=self.dbs["meta"])
        return f"{SNAPSHOT_LAYER_PREFIX}{number}"

    # -- reading ---------------------------------------------------------------

    def stat_snapshot(self, key: str) -> SnapshotInfo:
        """Return the snapshot with this key or name; SnapshotNotFound if none."""
        with self.lock:
            self._ready()
            return self._existing_snapshot(key)

    def list_snapshots(self) -> list[SnapshotInfo]:
        """Return every snapshot, ordered by key."""
        with self.lock:
            self._ready()
            return [
                SnapshotInfo.unpack(
                    bytes(key).decode("utf-8", "surrogateescape"), value
                )
                for key, value in self._txn.cursor(db=self.dbs["snapshots"])
            ]

    def snapshot_usage(self, key: str) -> tuple[int, int]:
        """Return (bytes, inodes) that the snapshot itself added or changed.

        Both come from the layer's change log. The bytes are the data blocks
        that the layer's own changed files take, much as containerd's
        overlayfs snapshotter counts the disk space of its upper directory.
        A hole takes none, and the blocks that a changed file still shares
        with the parent are the parent's. The inodes are the files,
        directories and links it changed.
        """
        from .diff import DiffPlan

        with self.lock:
            self._ready()
            layer = self._snapshot_layer(self._existing_snapshot(key))
            plan = DiffPlan(self, layer)
            inodes = {ino for _, ino in plan.items.values() if ino is not None}
            blocks = sum(self._layer_blocks(ino, layer.number) for ino in inodes)
            return blocks * BLOCK_SIZE, len(inodes)

    # -- changing ----------------------------------------------------------------

    def create_snapshot(self, key: str, parent: str, kind: str,
                        labels: dict[str, str] | None = None) -> SnapshotInfo:  # fmt: skip
        """Create an active or view snapshot of ``parent`` (a committed name, or "").

        O(1): one new layer whose parent is the parent snapshot's layer. A
        view's layer is frozen at once, so it is read-only.
        """
        from .store import write_op

        @write_op
        def create(self) -> SnapshotInfo:
            if kind not in (KIND_ACTIVE, KIND_VIEW):
                raise errors.Invalid(
                    f"snapshot {key}: cannot create a snapshot of kind {kind}"
                )
            clean_labels = check_labels(labels or {}, key)
            if self._snapshot(key) is not None:
                raise SnapshotExists(f"snapshot {key} already exists")
            parent_layer = None
            if parent:
                parent_info = self._snapshot(parent, "parent snapshot name")
                if parent_info is None:
                    raise SnapshotNotFound(
                        f"parent snapshot {parent} of {key} not found"
                    )
                if parent_info.kind != KIND_COMMITTED:
                    raise errors.Invalid(
                        f"parent snapshot {parent} of {key} is {parent_info.kind}, "
                        "not committed"
                    )
                parent_layer = self._snapshot_layer(parent_info).id
            layer = self.create_layer(self._next_snapshot_layer_id(), parent_layer)
            if kind == KIND_VIEW:
                self._set_frozen(layer, True)
            now = time.time_ns()
            info = SnapshotInfo(key, kind, parent, now, now, clean_labels, layer.id)
            self._put_snapshot(info)
            return info

        info = create(self)
        log.debug("created %s snapshot %s (layer %s, parent %s)", kind, key, info.layer_id,
                  parent or "-")  # fmt: skip
        return info

    def commit_snapshot(self, name: str, key: str,
                        labels: dict[str, str] | None = None) -> SnapshotInfo:  # fmt: skip
        """Turn active snapshot ``key`` into committed snapshot ``name``.

        O(1): the record moves to the new name and the layer is frozen; no
        data is copied. The new snapshot keeps the parent, gets the request's
        labels, and is created and updated now, as containerd's own
        snapshotters do.
        """
        from .store import write_op

        @write_op
        def commit(self) -> SnapshotInfo:
            clean_labels = check_labels(labels or {}, name)
            if self._snapshot(name, "snapshot name") is not None:
                raise SnapshotExists(f"snapshot {name} already exists")
            active = self._existing_snapshot(key)
            if active.kind != KIND_ACTIVE:
                raise WrongKind(f"snapshot {key} is {active.kind}, not active; only "
                                "active snapshots can be committed")  # fmt: skip
            layer = self._snapshot_layer(active)
            if not layer.frozen:
                self._set_frozen(layer, True)
            now = time.time_ns()
            info = SnapshotInfo(name, KIND_COMMITTED, active.parent, now, now, clean_labels,
                                active.layer_id)  # fmt: skip
            self._txn.delete(_encode_key(key), db=self.dbs["snapshots"])
            self._put_snapshot(info)
            return info

        info = commit(self)
        log.debug("committed snapshot %s as %s (layer %s)", key, name, info.layer_id)
        return info

    def update_snapshot(self, name: str, labels: dict[str, str],
                        paths: list[str] | None = None) -> SnapshotInfo:  # fmt: skip
        """Change the labels of a snapshot as containerd's field mask selects.

        With no ``paths`` every label is replaced. ``labels`` replaces them
        all too, and ``labels.KEY`` sets one label, or removes it when
        ``labels`` has no value for KEY. Any other path is immutable and
        raises Invalid.
        """
        from .store import write_op

        @write_op
        def update(self) -> SnapshotInfo:
            info = self._existing_snapshot(name, "snapshot name")
            new = dict(info.labels)
            if not paths:
                new = dict(labels)
            for path in paths or ():
                if path == "labels":
                    new = dict(labels)
                elif path.startswith("labels."):
                    label = path[len("labels.") :]
                    new[label] = labels.get(label, "")
                else:
                    raise errors.Invalid(
                        f"snapshot {name}: cannot update field {path!r}; only labels "
                        "can change"
                    )
            info.labels = check_labels(new, name)
            info.updated_ns = time.time_ns()
            self._put_snapshot(info)
            return info

        return update(self)

    def remove_snapshot(self, key: str) -> SnapshotInfo:
        """Remove a snapshot that has no children, and free its layer.

        The record goes in the commit that records the layer's removal
        intent, so the snapshot leaves List at once and a crash during the
        freeing is finished by recovery on the next open.
        """
        from .store import write_op

        @write_op
        def mark(self) -> tuple[SnapshotInfo, Layer]:
            info = self._existing_snapshot(key)
            layer = self._snapshot_layer(info)
            children = self._children.get(layer.number)
            if children:
                names = self._snapshot_names_of_layers(children)
                raise SnapshotHasChildren(
                    f"cannot remove snapshot {key}: it is the parent of {', '.join(names)}"
                )
            self._txn.delete(_encode_key(key), db=self.dbs["snapshots"])
            self._mark_removing(layer)
            return info, layer

        with self.lock:
            info, layer = mark(self)
            self.commit()
            # The same steps, and crash points, as Store.remove_layer.
            crash_point("remove.marked")
            self._purge(layer.number)
            crash_point("remove.dropping")
            self._drop_layer(layer)
            self.commit()
        log.debug("removed %s snapshot %s (layer %s)", info.kind, key, layer.id)
        return info

    def _snapshot_names_of_layers(self, numbers) -> list[str]:
        wanted = {
            self._layers[number].id for number in numbers if number in self._layers
        }
        names = [info.name for info in self.list_snapshots() if info.layer_id in wanted]
        return sorted(names) or sorted(wanted)

    # -- consistency -------------------------------------------------------------

    def reconcile_snapshots(self) -> tuple[list[str], list[str]]:
        """Drop records without a layer and remove snapshot layers without a record.

        Neither happens through the snapshot operations, which are atomic;
        both can follow an offline repair that removed a layer or a record.
        Returns (names of dropped records, ids of removed layers); each is
        logged as a warning.
        """
        from .store import write_op

        @write_op
        def drop_dangling(self) -> list[str]:
            dropped = []
            for info in self.list_snapshots():
                number = self._ids.get(info.layer_id)
                if number is None or self._layers[number].state != "ready":
                    self._txn.delete(_encode_key(info.name), db=self.dbs["snapshots"])
                    dropped.append(info.name)
            return dropped

        with self.lock:
            dropped = drop_dangling(self)
            for name in dropped:
                log.warning("dropped snapshot %s: its layer no longer exists", name)
            self.commit()
            recorded = {info.layer_id for info in self.list_snapshots()}
            removed = []
            for layer in self._unrecorded_snapshot_layers(recorded):
                log.warning("removing layer %s: no snapshot names it", layer.id)
                self.remove_layer(layer.id)
                removed.append(layer.id)
            return dropped, removed

    def _unrecorded_snapshot_layers(self, recorded: set[str]) -> list[Layer]:
        """Return snapshot layers without a record whose descendants have none, deepest first."""
        layers = [
            layer for layer in self.list_layers()
            if is_snapshot_layer(layer.id) and layer.id not in recorded
        ]  # fmt: skip
        keep = set()
        for layer in self.list_layers():
            if layer.id in recorded:
                current = layer
                while current.parent is not None:
                    current = self._layers[current.parent]
                    keep.add(current.number)
        doomed = [layer for layer in layers if layer.number not in keep]
        return sorted(doomed, key=lambda layer: layer.depth, reverse=True)
