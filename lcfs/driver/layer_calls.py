"""The operations running on each layer, kept apart where they conflict.

The graphdriver server runs an ApplyDiff on its own thread, a Diff on
another, and Remove, Create, Changes and DiffSize on the executor. The
store alone would let a removal drop a layer under a running import, and a
read or a new child see an import half done, so each call marks its layer
in one shared ``LayerCalls`` table first.
"""

import collections
import contextlib
import threading
import time
from collections.abc import Iterator

from lcfs.store import errors

# The operations that LayerCalls tracks on one layer. A read is a Diff,
# Changes or DiffSize of the layer, and a child creation is a Create or
# CreateReadWrite that names the layer as its parent.
IMPORT = "import"
REMOVAL = "removal"
READ = "read"
CHILD_CREATION = "child creation"

# The operations that each operation cannot run beside on the same layer.
# An import conflicts with every other operation: a read would return part
# of the tar, and a new child makes the layer read-only, which fails the
# import. Reads and child creations run beside each other.
CONFLICTS = {
    IMPORT: frozenset({IMPORT, REMOVAL, READ, CHILD_CREATION}),
    REMOVAL: frozenset({IMPORT, REMOVAL}),
    READ: frozenset({IMPORT}),
    CHILD_CREATION: frozenset({IMPORT}),
}


_CONFLICT_MESSAGES = {
    (IMPORT, IMPORT): (
        "an import into layer {id} is already running; wait for that ApplyDiff "
        "to finish"
    ),
    (REMOVAL, IMPORT): (
        "layer {id} cannot be removed while an import into the layer is "
        "running; retry the Remove after the ApplyDiff finishes"
    ),
    (READ, IMPORT): (
        "the changes of layer {id} cannot be read while an import into the "
        "layer is running; retry after the ApplyDiff finishes"
    ),
    (CHILD_CREATION, IMPORT): (
        "cannot create a child of layer {id} while an import into layer {id} "
        "is running; retry after the ApplyDiff finishes"
    ),
    (IMPORT, REMOVAL): "layer {id} is being removed; apply the tar to a new layer",
    (REMOVAL, REMOVAL): "layer {id} is already being removed",
    (IMPORT, READ): (
        "the changes of layer {id} are being read by a Diff, Changes or "
        "DiffSize call; retry the ApplyDiff after that call finishes"
    ),
    (IMPORT, CHILD_CREATION): (
        "a child of layer {id} is being created, which makes the layer "
        "read-only; apply the tar to a new layer"
    ),
}


def _conflict_message(layer_id: str, requested: str, running: str) -> str:
    return _CONFLICT_MESSAGES[requested, running].format(id=layer_id)


class LayerCalls:
    """The operations running on each layer, shared by the threads that run them.

    An operation starts only when no operation in its CONFLICTS entry runs
    on the layer. One lock covers the check and the mark, so two
    conflicting operations cannot both start.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Notified whenever an operation ends, for callers that wait.
        self._ended = threading.Condition(self._lock)
        # The number of calls running each operation, by layer id.
        self._running: dict[str, collections.Counter[str]] = {}

    @contextlib.contextmanager
    def running(self, layer_id: str, operation: str, wait: float = 0.0) -> Iterator[None]:
        """Mark the layer as running ``operation`` for the block, or raise errors.Busy.

        A conflicting operation that ends within ``wait`` seconds lets this
        one start instead of raising.
        """
        deadline = time.monotonic() + wait
        with self._lock:
            while True:
                counts = self._running.get(layer_id, collections.Counter())
                conflict = next(
                    (other for other in counts if other in CONFLICTS[operation]), None
                )
                remaining = deadline - time.monotonic()
                if conflict is None or remaining <= 0:
                    break
                self._ended.wait(remaining)
            if conflict is None:
                counts[operation] += 1
                self._running[layer_id] = counts
        if conflict is not None:
            raise errors.Busy(_conflict_message(layer_id, operation, conflict))
        try:
            yield
        finally:
            with self._lock:
                counts[operation] -= 1
                if not counts[operation]:
                    del counts[operation]
                if not counts:
                    del self._running[layer_id]
                self._ended.notify_all()
