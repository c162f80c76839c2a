"""Counters of the FUSE requests that one daemon has served.

Every handler of ``LayerOperations`` adds one request and its latency to a
``RequestStats`` as it returns, at the cost of two ``perf_counter`` calls
and two dict updates. The counters belong to the daemon, not to one mount:
``MountManager`` hands the same object to every mount it makes, so they
keep counting across an unmount and a remount.

The counters are written only on the FUSE thread. ``snapshot`` may run on
any thread, because copying a dict is atomic under the GIL.
"""

from __future__ import annotations

from lcfs.control import FETCH_TIMEOUT, STATS_PATH, fetch_json

# At most this many distinct getxattr names are counted one by one. Names
# beyond it are added up under OTHER_NAMES, so a client that probes many
# invented names cannot grow the table without bound.
MAX_NAMES = 256
OTHER_NAMES = "(other names)"

XATTR_OPERATIONS = ("getxattr", "listxattr", "removexattr", "setxattr")


class RequestStats:
    """Request counts and latency totals per FUSE operation."""

    def __init__(self) -> None:
        self.requests: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self.getxattr_names: dict[bytes, int] = {}
        # Xattr requests that read or changed the store's xattr database,
        # by operation. Requests resolved from the attributes kept in
        # memory, or rejected because no layer ever stored the name, are
        # not counted.
        self.xattr_store_calls: dict[str, int] = {}
        # Lookups of "." and "..", which the kernel sends to turn a file
        # handle back into a node after it has forgotten the node.
        self.dot_lookups = 0
        self.dotdot_lookups = 0
        # Numbers of the layers whose name was looked up in the mount root.
        # Any process that uses a layer's tree through the mount causes that
        # lookup at least once per mount, because the kernel's cached entry
        # ends with the mount and a listing of the root gives it none that
        # lasts. The plugin server reads the set from another
        # thread, which is safe because set membership tests and adds are
        # atomic under the GIL.
        self.layers_looked_up: set[int] = set()

    def record(self, operation: str, seconds: float) -> None:
        """Count one request of ``operation`` that took ``seconds``."""
        self.requests[operation] = self.requests.get(operation, 0) + 1
        self.seconds[operation] = self.seconds.get(operation, 0.0) + seconds

    def record_getxattr_name(self, name: bytes) -> None:
        names = self.getxattr_names
        if name in names or len(names) < MAX_NAMES:
            names[name] = names.get(name, 0) + 1
        else:
            other = OTHER_NAMES.encode()
            names[other] = names.get(other, 0) + 1

    def record_xattr_store_call(self, operation: str) -> None:
        calls = self.xattr_store_calls
        calls[operation] = calls.get(operation, 0) + 1

    def snapshot(self) -> dict:
        """Return the counters as a JSON-ready dict keyed by FUSE operation name.

        Each operation maps to ``requests`` and ``seconds`` (the sum of the
        handler latencies). The xattr operations also carry
        ``store_calls``, getxattr carries ``names`` (requests per attribute
        name) and lookup carries ``dot`` and ``dotdot``.
        """
        requests = self.requests.copy()
        seconds = self.seconds.copy()
        names = self.getxattr_names.copy()
        store_calls = self.xattr_store_calls.copy()
        result: dict[str, dict] = {}
        for operation in sorted(requests):
            result[operation] = {
                "requests": requests[operation],
                "seconds": round(seconds.get(operation, 0.0), 6),
            }
        for operation in XATTR_OPERATIONS:
            entry = result.setdefault(operation, {"requests": 0, "seconds": 0.0})
            entry["store_calls"] = store_calls.get(operation, 0)
        result["getxattr"]["names"] = {
            name.decode("utf-8", "backslashreplace"): count
            for name, count in sorted(names.items())
        }
        lookup = result.setdefault("lookup", {"requests": 0, "seconds": 0.0})
        lookup["dot"] = self.dot_lookups
        lookup["dotdot"] = self.dotdot_lookups
        return result


def fetch_stats(socket_path: str, timeout: float = FETCH_TIMEOUT) -> dict:
    """Return the snapshot that the daemon listening on ``socket_path`` serves.

    Raises OSError when the connection fails or the reply is not the
    counters.
    """
    return fetch_json(socket_path, STATS_PATH, timeout)


def format_stats(snapshot: dict) -> str:
    """Return a snapshot as a table for people, one operation per line."""
    rows = [("OPERATION", "REQUESTS", "TOTAL MS", "MEAN US")]
    for operation, entry in sorted(snapshot.items()):
        count = entry["requests"]
        if not count:
            continue
        total = entry["seconds"]
        rows.append((operation, str(count), f"{total * 1e3:.1f}", f"{total / count * 1e6:.0f}"))
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    lines = [
        f"{row[0]:<{widths[0]}}  " + "  ".join(
            f"{cell:>{width}}" for cell, width in zip(row[1:], widths[1:])
        )
        for row in rows
    ]
    names = snapshot.get("getxattr", {}).get("names", {})
    if names:
        lines.append("")
        lines.append("getxattr requests by attribute name:")
        for name, count in sorted(names.items(), key=lambda item: (-item[1], item[0])):
            lines.append(f"  {name}  {count}")
    store_calls = sum(snapshot.get(op, {}).get("store_calls", 0) for op in XATTR_OPERATIONS)
    lines.append("")
    lines.append(f"xattr requests that reached the store: {store_calls}")
    return "\n".join(lines) + "\n"
