"""The Docker phase of lcfs-fsck: orphaned layers and stale leftover files."""

from __future__ import annotations

import logging
import time

from lcfs.driver.reconcile import find_orphans, find_stale_files, remove_stale

log = logging.getLogger("lcfs.fsck")


def _report(checker, message: str, repair=None, action: str = "") -> None:
    """Record a problem; repairs here change Docker's files or whole layers, so they
    run outside a store transaction."""
    entry = {"phase": checker.phase, "problem": message, "repaired": False, "action": ""}
    if repair is None:
        entry["action"] = "no repair available"
        log.warning("%s: %s; %s", checker.phase, message, entry["action"])
    elif checker.repair:
        # The mark must be on the device before a change outside the store's transactions.
        checker.begin_repair()
        checker.store.commit()
        repair()
        entry["repaired"] = True
        entry["action"] = action
        log.warning("%s: %s; repair: %s", checker.phase, message, action)
    else:
        entry["action"] = f"--repair would {action}"
        log.warning("%s: %s; %s", checker.phase, message, entry["action"])
    checker.problems.append(entry)


def check_docker(checker, docker_root: str, grace: float) -> None:
    store = checker.store
    store.commit() if checker.repair else None
    # Stale files go first: deleting a container's mount record can leave
    # its init layer unreferenced, and the orphan search must see that.
    for entry in find_stale_files(store, docker_root, grace):
        repair = (lambda entry=entry: remove_stale(entry)) if entry.removable else None
        _report(checker, f"{entry.path}: {entry.reason}", repair, "delete it")
    report = find_orphans(store, docker_root, grace)
    for path in report.unreadable:
        _report(checker, f"cannot read Docker's layer references: {path}")
    for layer in report.unknown:
        _report(checker, f"layer {layer.id} is not referenced by any readable Docker record; "
                         "it is kept because some records could not be read")  # fmt: skip
    now = time.time()
    for layer in report.orphans:
        age = int(now - layer.created)
        _report(checker, f"layer {layer.id} is an orphan: nothing under {docker_root} references it "
                         f"(created {age} s ago)",
                lambda layer=layer: store.remove_layer(layer.id), "remove the layer")  # fmt: skip
    store._ready()
