"""A comparable summary of everything a store holds, through its public API.

The workload records one after every commit and the replay computes one for
each recovered copy, so the two must come from the same function.
"""

from __future__ import annotations

import hashlib
import stat

from lcfs.store import ROOT_INO


def store_state(store) -> dict:
    """Return {"layers": {id: layer summary}, "free_blocks": n} as plain JSON values."""
    layers = {}
    for layer in sorted(store.list_layers(), key=lambda item: item.id):
        layers[layer.id] = {
            "parent": layer.parent_id,
            "frozen": layer.frozen,
            "tree": layer_tree(store, layer.number),
        }
    return {"layers": layers, "free_blocks": store.statfs().free_blocks}


def layer_tree(store, number: int) -> dict:
    """Return {path: attributes and content hash} of every entry visible in a layer."""
    tree = {"/": entry(store, number, store.getattr(number, ROOT_INO))}
    pending = [(b"", ROOT_INO)]
    while pending:
        prefix, dir_ino = pending.pop()
        for name, attr in store.readdir(number, dir_ino):
            path = prefix + b"/" + name
            tree[path.decode("utf-8", "surrogateescape")] = entry(store, number, attr)
            if stat.S_ISDIR(attr.mode):
                pending.append((path, attr.ino))
    return dict(sorted(tree.items()))


# The fields of one ``entry``, in order; ``content`` is the sha256 of a regular
# file's data or a symlink's target.
ENTRY_FIELDS = (
    "ino",
    "mode",
    "nlink",
    "uid",
    "gid",
    "rdev",
    "size",
    "blocks",
    "atime_ns",
    "mtime_ns",
    "ctime_ns",
    "content",
    "xattrs",
)


def entry(store, number: int, attr) -> list:
    xattrs = sorted(
        [
            name.decode(),
            hashlib.sha256(store.getxattr(number, attr.ino, name)).hexdigest(),
        ]
        for name in store.listxattr(number, attr.ino)
    )
    if stat.S_ISREG(attr.mode):
        content = hashlib.sha256(store.read(number, attr.ino, 0, attr.size)).hexdigest()
    elif stat.S_ISLNK(attr.mode):
        content = store.readlink(number, attr.ino).decode("utf-8", "surrogateescape")
    else:
        content = ""
    return [
        attr.ino,
        attr.mode,
        attr.nlink,
        attr.uid,
        attr.gid,
        attr.rdev,
        attr.size,
        attr.blocks,
        attr.atime_ns,
        attr.mtime_ns,
        attr.ctime_ns,
        content,
        xattrs,
    ]


def without_layer(state: dict, layer_id: str) -> dict:
    """Return ``state`` without one layer, as recovery leaves an unfinished import."""
    layers = {key: value for key, value in state["layers"].items() if key != layer_id}
    return {"layers": layers, "free_blocks": state["free_blocks"]}


def differences(expected: dict, actual: dict, limit: int = 6) -> list[str]:
    """Return short descriptions of how ``actual`` differs from ``expected``."""
    found = []
    if expected["free_blocks"] != actual["free_blocks"]:
        found.append(
            f"free blocks {actual['free_blocks']}, expected {expected['free_blocks']}"
        )
    for layer_id in sorted(set(expected["layers"]) | set(actual["layers"])):
        want = expected["layers"].get(layer_id)
        have = actual["layers"].get(layer_id)
        if want is None or have is None:
            found.append(
                f"layer {layer_id} {'unexpected' if want is None else 'missing'}"
            )
            continue
        if (want["parent"], want["frozen"]) != (have["parent"], have["frozen"]):
            found.append(f"layer {layer_id}: parent or frozen flag differs")
        for path in sorted(set(want["tree"]) | set(have["tree"])):
            found += entry_differences(
                f"layer {layer_id} {path}",
                want["tree"].get(path),
                have["tree"].get(path),
            )
    return found[:limit]


def entry_differences(where: str, want: list | None, have: list | None) -> list[str]:
    if want == have:
        return []
    if want is None or have is None:
        return [f"{where}: {'unexpected' if want is None else 'missing'}"]
    return [
        f"{where}: {name} is {_short(h)}, expected {_short(w)}"
        for name, w, h in zip(ENTRY_FIELDS, want, have)
        if w != h
    ]


def _short(value) -> str:
    text = str(value)
    return text if len(text) <= 24 else text[:20] + "..."
