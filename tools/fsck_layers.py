"""The layer-tree and journal phases of lcfs-fsck (a mixin of ``Checker``)."""

from __future__ import annotations

import logging

from lcfs.journal import intents
from lcfs.store import errors
from lcfs.store.format import EXTENT, U64, U64X2, Inode, Layer, inode_key
from tools.fsck_records import read_intent, read_layer

log = logging.getLogger("lcfs.fsck")


class LayerChecks:
    """Phases of ``Checker`` for the layer records, their links and the journal."""

    def check_layers(self):
        """layer tree"""
        layers = {}
        for key, value in self.records("layers"):
            layer = read_layer(key, value)
            layers[layer.number] = layer
        broken = self._check_ancestry(layers)
        if self.repair:
            layers = {n: layer for n, layer in layers.items() if n not in broken}
        else:
            self.skip |= broken
        healthy = {n: layer for n, layer in layers.items() if n not in broken}
        self._check_id_index(healthy)
        self._check_child_links(layers, healthy)
        for number, layer in sorted(healthy.items()):
            depth = self._depth(healthy, number)
            if layer.depth != depth:
                self.problem(f"layer {layer.id} has depth {layer.depth}, expected {depth}",
                             lambda layer=layer, depth=depth: self._set_layer(layer, depth=depth),
                             "fix the depth")  # fmt: skip
        self._reload_layers()

    def _check_ancestry(self, layers: dict[int, Layer]) -> set[int]:
        """Report layers whose parent is missing and parent cycles; return every layer above them."""
        faults: dict[int, str] = {}
        # Layers whose ancestry reaches a base layer, so later walks stop there.
        sound: set[int] = set()
        for number in sorted(layers):
            chain: dict[int, None] = {}
            current = number
            while current not in chain:
                chain[current] = None
                parent = layers[current].parent
                if parent is None or parent in sound:
                    sound.update(chain)
                    break
                if parent not in layers:
                    faults.setdefault(current, "missing")
                    break
                current = parent
            else:
                members = list(chain)
                cycle = members[members.index(current) :]
                if not any(n in faults for n in cycle):
                    faults[min(cycle)] = "cycle"
        broken: set[int] = set()
        for number, fault in sorted(faults.items()):
            layer = layers[number]
            doomed = self._descendants(layers, number)
            broken |= doomed
            if fault == "missing":
                message = f"layer {layer.id} (number {number}) has missing parent {layer.parent}"
            else:
                names = ", ".join(layers[n].id for n in sorted(doomed) if self._in_cycle(layers, n))
                message = f"layers {names} form a parent cycle"
            others = sorted(layers[n].id for n in doomed if n != number and not self._in_cycle(layers, n))
            if fault == "missing":
                text = f"remove layer {layer.id}"
            else:
                text = "remove the layers in the cycle"
            if others:
                text += f", the layers above ({', '.join(others)})"
            self.problem(message, lambda doomed=doomed: self._remove_layers(doomed),
                         text + " and all their records")  # fmt: skip
        return broken

    @staticmethod
    def _in_cycle(layers: dict[int, Layer], number: int) -> bool:
        current = layers[number].parent
        seen = set()
        while current is not None and current in layers and current not in seen:
            if current == number:
                return True
            seen.add(current)
            current = layers[current].parent
        return False

    @staticmethod
    def _descendants(layers: dict[int, Layer], number: int) -> set[int]:
        """Return ``number`` and every layer whose ancestry passes through it."""
        children: dict[int, list[int]] = {}
        for child, layer in layers.items():
            children.setdefault(layer.parent, []).append(child)
        found = {number}
        stack = [number]
        while stack:
            for child in children.get(stack.pop(), ()):
                if child not in found:
                    found.add(child)
                    stack.append(child)
        return found

    @staticmethod
    def _depth(layers: dict[int, Layer], number: int) -> int:
        depth = 0
        while layers[number].parent is not None:
            number = layers[number].parent
            depth += 1
        return depth

    def _check_id_index(self, healthy: dict[int, Layer]) -> None:
        ids = {k.decode(): U64.unpack(v)[0] for k, v in self.records("layer_ids")}
        for number, layer in sorted(healthy.items()):
            indexed = ids.get(layer.id)
            if indexed is None:
                message = f"layer {layer.id} is missing from the id index"
            elif indexed != number:
                message = f"id index maps layer {layer.id} to number {indexed}, not {number}"
            else:
                continue
            self.problem(message,
                         lambda layer=layer: self.txn.put(layer.id.encode(), U64.pack(layer.number),
                                                          db=self.db("layer_ids")),
                         "point it at the layer")  # fmt: skip
        names = {layer.id for layer in healthy.values()}
        for layer_id, number in sorted(ids.items()):
            if layer_id not in names and number not in self.skip:
                self.problem(f"id index names layer {layer_id} (number {number}) that does not exist",
                             lambda layer_id=layer_id: self.txn.delete(layer_id.encode(), db=self.db("layer_ids")),
                             "delete the index entry")  # fmt: skip

    def _check_child_links(self, layers: dict[int, Layer], healthy: dict[int, Layer]) -> None:
        children = {U64X2.unpack(k) for k, _ in self.records("children")}
        expected = {(layer.parent, n) for n, layer in healthy.items() if layer.parent is not None}
        for pair in sorted(expected - children):
            self.problem(f"child link {pair[0]} -> {pair[1]} is missing",
                         lambda pair=pair: self.txn.put(U64X2.pack(*pair), b"", db=self.db("children")),
                         "add it")  # fmt: skip
        for pair in sorted(children - expected):
            if pair[0] in self.skip or pair[1] in self.skip:
                continue
            self.problem(f"stale child link {pair[0]} -> {pair[1]}",
                         lambda pair=pair: self.txn.delete(U64X2.pack(*pair), db=self.db("children")),
                         "delete it")  # fmt: skip
        for parent in sorted({p for p, _ in expected}):
            layer = healthy[parent]
            if not layer.frozen:
                self.problem(f"layer {layer.id} has children but is not frozen",
                             lambda layer=layer: self._set_layer(layer, frozen=True), "freeze it")  # fmt: skip

    def _set_layer(self, layer: Layer, **fields) -> None:
        for name, value in fields.items():
            setattr(layer, name, value)
        self.txn.put(U64.pack(layer.number), layer.pack(), db=self.db("layers"))

    def _remove_layers(self, doomed: set[int]) -> None:
        """Delete layers and every record they own, returning the blocks their extents own."""
        txn = self.txn
        records = {layer.number: layer for layer in (read_layer(k, v) for k, v in self.records("layers"))}
        for number in doomed:
            for key, _ in list(self.store._prefix_items(self.db("changes"), U64.pack(number))):
                txn.delete(key, db=self.db("changes"))
            layer = records.get(number)
            if layer is not None and txn.get(layer.id.encode(), db=self.db("layer_ids")) == U64.pack(number):
                txn.delete(layer.id.encode(), db=self.db("layer_ids"))
            txn.delete(U64.pack(number), db=self.db("layers"))
        self._delete_where("inodes", lambda k: U64.unpack_from(k, 8)[0] in doomed)
        self._delete_where("xattrs", lambda k: U64.unpack_from(k, 8)[0] in doomed)
        self._delete_where("dirents", lambda k: U64.unpack_from(k, len(k) - 8)[0] in doomed)
        self._delete_where("children", lambda k: U64X2.unpack(k)[0] in doomed or U64X2.unpack(k)[1] in doomed)
        # Only descendants of an extent's owner borrow its blocks, and they are doomed too.
        for key, value in self.records("extents"):
            if U64.unpack_from(key, 8)[0] in doomed:
                phys, count, flag = EXTENT.unpack(value)
                txn.delete(key, db=self.db("extents"))
                try:
                    self.store._release(phys, count, flag)
                except errors.StoreError as exc:
                    # Releasing fails on a damaged free map or reference
                    # count, which the extents and free-space phases rebuild.
                    log.debug("not freeing blocks %d..%d now: %s", phys, phys + count - 1, exc)

    def _delete_where(self, name: str, predicate) -> None:
        for key, _ in self.records(name):
            if predicate(key):
                self.txn.delete(key, db=self.db(name))

    def _reload_layers(self) -> None:
        store = self.store
        store._layers.clear()
        store._ids.clear()
        store._children.clear()
        store._clear_caches()
        for key, value in self.records("layers"):
            layer = read_layer(key, value)
            if layer.number in self.skip:
                continue
            store._layers[layer.number] = layer
            store._ids[layer.id] = layer.number
        for layer in store._layers.values():
            parent = store._layers.get(layer.parent)
            layer.parent_id = parent.id if parent is not None else None
        for key, _ in self.records("children"):
            parent, child = U64X2.unpack(key)
            if parent in store._layers and child in store._layers:
                store._children.setdefault(parent, set()).add(child)

    # -- journal -----------------------------------------------------------------------

    def check_intents(self):
        """journal intents"""
        from lcfs.journal.recovery import recover

        store = self.store
        layers = store._layers
        pending = [(U64.unpack(k)[0], read_intent(v)) for k, v in self.records("intents")]
        ending: set[int] = set()
        for number, intent in pending:
            layer = layers.get(intent["layer"])
            name = layer.id if layer is not None else intent.get("id", intent["layer"])
            if intent["kind"] == "orphan":
                what = f"intent {number}: unfreed unlinked inode {intent['ino']} in layer {name}"
                # The store records an orphan only when the last link goes.
                bogus = layer is not None and self._nlink(layer.number, intent["ino"]) > 0
                reason = "but the inode still has links"
            else:
                action = {"apply": "unfinished import into", "remove": "unfinished removal of"}[intent["kind"]]
                what = f"intent {number}: {action} layer {name}"
                # The store never imports into or removes a layer with children.
                bogus = layer is not None and bool(store._children.get(layer.number))
                reason = "but the layer has child layers"
                if layer is not None and not bogus:
                    ending.add(layer.number)
            if bogus:
                self.problem(f"{what}, {reason}",
                             lambda number=number: intents.finish(self.txn, self.db("intents"), number),
                             "delete the intent")  # fmt: skip
            else:
                self.problem(what, lambda: None, "finish or roll it back")
        for layer in list(layers.values()):
            if layer.state != "removing" or layer.number in ending:
                continue
            if store._children.get(layer.number):
                self.problem(f"layer {layer.id} is marked for removal but has child layers",
                             lambda layer=layer: self._set_layer(layer, state="ready"),
                             "mark it ready again")  # fmt: skip
                continue
            self.problem(f"layer {layer.id} is marked for removal but no intent finishes the removal",
                         lambda layer=layer: intents.begin(self.txn, self.db("intents"), self.db("meta"),
                                                           "remove", layer=layer.number, id=layer.id),
                         "finish the removal")  # fmt: skip
            ending.add(layer.number)
        if not self.repair:
            # Recovery removes these layers, so the later phases leave them alone.
            self.skip |= ending
        elif pending or ending:
            store.commit()
            recover(store)
            store._ready()

    def _nlink(self, number: int, ino: int) -> int:
        raw = self.txn.get(inode_key(ino, number), db=self.db("inodes"))
        return Inode.unpack(ino, raw).nlink if raw is not None else 0
