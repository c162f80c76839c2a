"""Named crash points for fault-injection tests.

``crash_point("remove.marked")`` kills the process with SIGKILL when the
environment variable ``LCFS_CRASH_POINT`` names that point. ``NAME@N``
crashes at the Nth time the point is reached (counting from 1), so a test
can crash in the middle of a loop. With the variable unset a crash point
costs one dictionary look-up.
"""

from __future__ import annotations

import os
import signal

ENV = "LCFS_CRASH_POINT"

# Every crash point in the code, so tests can enumerate them.
POINTS = {
    "commit.data_synced": "data blocks flushed, metadata not yet committed",
    "commit.done": "a group commit finished",
    "create.done": "a layer record written, not yet committed",
    "apply.intent": "the apply intent committed, no member written",
    "apply.member": "a tar member applied (use @N for the Nth)",
    "apply.batch": "a periodic commit of an import finished (use @N)",
    "apply.finishing": "every member applied, the intent not yet cleared",
    "remove.marked": "the remove intent committed, nothing freed",
    "remove.batch": "a batch of a layer's records freed and committed (use @N)",
    "remove.dropping": "all records freed, the layer record not yet deleted",
}

_target: tuple[str, int] | None = None
_counts: dict[str, int] = {}


def _parse(value: str | None) -> tuple[str, int] | None:
    if not value:
        return None
    name, _, nth = value.partition("@")
    return name, int(nth) if nth else 1


_target = _parse(os.environ.get(ENV))


def crash_point(name: str) -> None:
    """Kill this process with SIGKILL if the test selected this crash point."""
    if _target is None or _target[0] != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] >= _target[1]:
        os.kill(os.getpid(), signal.SIGKILL)
