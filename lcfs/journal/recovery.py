"""Recovery of unfinished operations when a store is opened.

Every intent left in the journal belongs to an operation that a crash cut
short. ``apply`` is rolled back (the half-applied layer is removed with all
its records), ``remove`` is finished, and ``orphan`` frees an inode whose
last link was removed while it was open. Each recovery is logged at warning
level with the layer id.
"""

from __future__ import annotations

import logging

from . import intents

log = logging.getLogger(__name__)


def recover(store) -> int:
    """Finish or roll back every intent in ``store``; return how many there were."""
    with store.lock:
        store._ready()
        pending = intents.pending(store._txn, store.dbs["intents"])
        for number, intent in pending:
            kind = intent["kind"]
            layer = store._layers.get(intent.get("layer"))
            if kind == "orphan":
                if layer is not None and layer.state == "ready":
                    log.warning("freeing inode %d of layer %s, unlinked while open before a crash",
                                intent["ino"], layer.id)  # fmt: skip
                    store._orphans[(layer.number, intent["ino"])] = number
                    store._reap_orphan(layer.number, intent["ino"])
                else:
                    store._finish_intent(number)
                continue
            if layer is None:
                log.warning("dropping %s intent %d: layer %s is already gone", kind, number,
                            intent.get("id"))  # fmt: skip
                store._finish_intent(number)
                continue
            if kind == "apply":
                log.warning(
                    "rolling back the unfinished import into layer %s", layer.id
                )
            else:
                log.warning("finishing the interrupted removal of layer %s", layer.id)
            store.remember_removed([layer.id])
            if layer.state != "removing":
                store._mark_removing(layer, record_intent=False)
            store.commit()
            store._purge(layer.number)
            store._drop_layer(layer)
            store.commit()
        if pending:
            store.commit()
        return len(pending)
