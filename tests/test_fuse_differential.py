"""Differential test of a mount against tmpfs with random operation sequences.

``fs_differential`` draws seeded sequences of file system calls and runs
each one on an lcfs layer and on a tmpfs directory, comparing every result
and the whole tree after every call. The seeds are fixed, so a failure
repeats unless timing caused it. Its message lists the operations that led
to it, the kernel's and the store's view of the paths involved, and the
timings of the last steps.
"""

from __future__ import annotations

import os

import fs_differential
import pytest
from fuse_fixtures import fuse_available, lcfs_image, mount_store  # noqa: F401
from mounts import tmpfs_at

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(not fuse_available(), reason="FUSE mounts need root and /dev/fuse"),
]

PLAIN_SEEDS = (0, 1, 2, 3, 5)
LAYERED_SEEDS = (1, 2, 3)
OPERATIONS = 300
# Operations that build each lower layer of the layered runs.
LOWER_OPERATIONS = 80
LOWER_LEVELS = 2


def new_root(directory: str) -> str:
    """Create the tree root ``w`` in ``directory``.

    A symlink target starting with ".." then stays inside the layer or
    the tmpfs, even from the top of the tree.
    """
    root = os.path.join(directory, "w")
    os.mkdir(root)
    return root


def store_view(mounted):
    """Return a ``Tree.inspect`` function that reads a file's attributes from the store."""

    def inspect(st: os.stat_result) -> dict:
        layer, ino = mounted.store.node_target(st.st_ino)
        attr = mounted.store.getattr(layer, ino)
        return {"layer": layer, "ino": ino, "nlink": attr.nlink, "size": attr.size,
                "mtime_ns": attr.mtime_ns, "ctime_ns": attr.ctime_ns}  # fmt: skip

    return inspect


def check_sequence(trees: list[fs_differential.Tree], seed: int, count: int,
                   compare_times: bool = True) -> None:  # fmt: skip
    try:
        operations, divergence = fs_differential.run_sequence(
            trees, None, compare_times=compare_times, seed=seed, count=count
        )
    finally:
        for tree in trees:
            tree.close_all()
    if divergence is not None:
        listing = "\n".join(f"  {operation!r}" for operation in operations)
        pytest.fail(f"seed {seed}: {divergence}\noperations run:\n{listing}")


@pytest.fixture
def reference(tmp_path):
    with tmpfs_at(tmp_path / "reference", "256m") as directory:
        yield directory


def run_writable_layers(mounted, reference) -> None:
    for seed in PLAIN_SEEDS:
        layer = f"plain-{seed}"
        mounted.store.create_layer(layer)
        mounted.store.commit()
        (reference / layer).mkdir()
        tmpfs_tree = fs_differential.Tree("tmpfs", new_root(str(reference / layer)))
        lcfs_tree = fs_differential.Tree("lcfs", new_root(mounted.at(layer)),
                                         inspect=store_view(mounted))  # fmt: skip
        check_sequence([tmpfs_tree, lcfs_tree], seed, OPERATIONS)


def run_layer_stacks(mounted, reference) -> None:
    """Run sequences on layer stacks, each lower layer changed before a child freezes it.

    The tmpfs tree gets the changes of every layer in turn (new files,
    removals, renames, xattrs), and the top layer then runs the main
    sequence.
    """
    for seed in LAYERED_SEEDS:
        plain = reference / f"stack-{seed}"
        plain.mkdir()
        tmpfs_root = new_root(str(plain))
        parent = None
        for level in range(LOWER_LEVELS + 1):
            layer = f"stack-{seed}-{level}"
            mounted.store.create_layer(layer, parent)
            mounted.store.commit()
            if parent is None:
                new_root(mounted.at(layer))
            trees = [fs_differential.Tree("tmpfs", tmpfs_root),
                     fs_differential.Tree("lcfs", mounted.at(layer, "w"),
                                          inspect=store_view(mounted))]  # fmt: skip
            if level < LOWER_LEVELS:
                check_sequence(trees, seed * 100 + level + 10_000, LOWER_OPERATIONS,
                               compare_times=False)  # fmt: skip
            else:
                check_sequence(trees, seed, OPERATIONS)
            parent = layer


def test_random_operations_match_tmpfs(lcfs_image, reference):
    with mount_store(lcfs_image) as mounted:
        run_writable_layers(mounted, reference)
        run_layer_stacks(mounted, reference)


# xattr changes through descriptors of directories removed while open, by
# rmdir ("d") and by a rename over them ("e"). ext4 and tmpfs apply them
# until the last descriptor closes.
REMOVED_DIRECTORY_SETUP = [
    ("mkdir", "d", 0o755),
    ("setxattr", "d", b"user.one", 1, 50, 0, False),
    ("mkdir", "e", 0o700),
    ("mkdir", "f", 0o755),
]
REMOVED_DIRECTORY_XATTRS = [
    ("open", 0, "d", os.O_RDONLY | os.O_DIRECTORY, 0),
    ("open", 1, "e", os.O_RDONLY | os.O_DIRECTORY, 0),
    ("rmdir", "d"),
    ("rename", "f", "e", 0),
    ("fgetxattr", 0, b"user.one"),
    ("flistxattr", 0),
    ("fsetxattr", 0, b"user.two", 2, 50, 0),
    ("fsetxattr", 0, b"user.two", 3, 10, os.XATTR_CREATE),
    ("fsetxattr", 0, b"user.three", 3, 10, os.XATTR_REPLACE),
    ("fsetxattr", 0, b"user.two", 4, 0, os.XATTR_REPLACE),
    ("fgetxattr", 0, b"user.two"),
    ("fremovexattr", 0, b"user.one"),
    ("fremovexattr", 0, b"user.one"),
    ("fgetxattr", 0, b"user.one"),
    ("flistxattr", 0),
    ("fsetxattr", 1, b"user.one", 5, 1, 0),
    ("fgetxattr", 1, b"user.one"),
    ("flistxattr", 1),
    ("fremovexattr", 1, b"user.one"),
    ("flistxattr", 1),
    ("fstat", 0),
    ("fstat", 1),
]


@pytest.mark.parametrize("origin", ["own", "inherited"])
def test_removed_directory_xattrs_match_tmpfs(lcfs_image, reference, origin):
    with mount_store(lcfs_image) as mounted:
        tmpfs_root = new_root(str(reference))
        lcfs_root = new_root(mounted.at("base"))
        trees = [fs_differential.Tree("tmpfs", tmpfs_root),
                 fs_differential.Tree("lcfs", lcfs_root)]  # fmt: skip
        _, divergence = fs_differential.run_sequence(trees, REMOVED_DIRECTORY_SETUP)
        assert divergence is None, str(divergence)
        if origin == "inherited":
            mounted.store.create_layer("child", "base")
            mounted.store.commit()
            trees[1] = fs_differential.Tree("lcfs", mounted.at("child", "w"))
        try:
            _, divergence = fs_differential.run_sequence(trees, REMOVED_DIRECTORY_XATTRS)
        finally:
            for tree in trees:
                tree.close_all()
        assert divergence is None, str(divergence)
