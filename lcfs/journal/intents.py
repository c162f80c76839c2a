"""Intent records: the write-ahead half of every multi-step store operation.

An intent is committed, durably, before the first step of its operation and
deleted in the same LMDB commit that makes the result visible. Opening the
device finds the intents that are still there and finishes or rolls back
each one (see ``lcfs.journal.recovery``).

Kinds:

``apply``   a tar is being applied to a layer; rolled back by removing the
            layer with everything written into it so far.
``remove``  a layer is being removed; finished by freeing what is left.
``orphan``  an inode whose last link is gone while a file handle still had it
            open; finished by freeing the inode.
"""

from __future__ import annotations

import json

from lcfs.store.format import U64

KINDS = ("apply", "remove", "orphan")


def begin(txn, intents_db, meta_db, kind: str, **fields) -> int:
    """Record an intent in ``txn`` and return its number."""
    if kind not in KINDS:
        raise ValueError(f"unknown intent kind {kind!r}")
    number = U64.unpack(txn.get(b"next_intent", db=meta_db))[0]
    txn.put(b"next_intent", U64.pack(number + 1), db=meta_db)
    txn.put(
        U64.pack(number), json.dumps({"kind": kind, **fields}).encode(), db=intents_db
    )
    return number


def finish(txn, intents_db, number: int) -> None:
    txn.delete(U64.pack(number), db=intents_db)


def pending(txn, intents_db) -> list[tuple[int, dict]]:
    """Return every intent still recorded, oldest first."""
    return [
        (U64.unpack(key)[0], json.loads(bytes(value)))
        for key, value in txn.cursor(db=intents_db)
    ]
