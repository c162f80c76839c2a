"""End to end: `docker load` of hand-written layer tars into lcfs and vfs.

The image has a busybox base and a layer of awkward entries: long, deep
and non-UTF-8 names, missing parent entries, hard links, special files,
xattrs, setuid and sticky modes, odd owners and times. The next layer
deletes and replaces them with whiteouts, an opaque directory, type
changes and delete-then-recreate. Small layers on top make a chain of 120
layers. dockerd 20.10 itself rejects chains deeper than 125 layers and
layer tars that name one path twice (its tar-split packer reports
"duplicates of file paths not supported"), so neither is tried here.

The same archive is loaded into a dockerd on lcfs and one on vfs, whose
tree (Docker's own tar applier on a plain directory) is the reference.
"""

import os
import tarfile

import pytest
from image_archive import LayerTar, saved_layer_digests, write_image_archive
from layer_compare import compare_with_vfs

# Fixtures lcfs, initial_status, docker and vfs_docker, one set per module.
pytest_plugins = ["docker_fixtures"]

pytestmark = [
    pytest.mark.docker,
    pytest.mark.timeout(900),
    pytest.mark.skipif(os.geteuid() != 0, reason="dockerd and FUSE mounts need root"),
]

DEEP_IMAGE = "lcfs-test/deep:1"
RUN = ("run", "--pull", "never", "--network", "none", "--rm")
LAYER_COUNT = 120
FILLER_LAYERS = LAYER_COUNT - 3

DEEP_COMMIT_IMAGE = "lcfs-test/deep-commit:1"
DEEP_CHANGE_SCRIPT = (
    "set -e; echo changed > /depth/counter; echo more >> /hz/hl-a; "
    "rm /depth/050; mv /hz/opq /hz/opq-moved; chmod 700 /hz/keep"
)
# Paths whose mtime the script sets to the time it runs.
DEEP_CHANGE_WRITES = ["depth", "depth/counter", "hz", "hz/hl-a", "hz/hl-c"]

LONG_NAME = "hz/" + "L" * 150
DEEP_DIRS = ["hz/deep"] + ["d" * 100] * 30
DEEP_PATH = "/".join(DEEP_DIRS)
NON_UTF8_NAME = b"hz/bad-\xff\xfe-name".decode("utf-8", "surrogateescape")

# Directories that the layer tars never name are created by the applier at
# the time it runs, so their mtimes differ by run. Their mode is compared
# by its own test.
CREATED_BY_APPLIER = ["np", "np/one", "np/one/two"] + [
    "/".join(DEEP_DIRS[:depth]) for depth in range(1, len(DEEP_DIRS) + 1)
]


def setup_layer() -> bytes:
    """Return the layer of awkward entries that the next layer changes."""
    layer = LayerTar()
    layer.add_dir("hz")
    layer.add_dir("hz/gone")
    layer.add("hz/gone/a", data=b"a")
    layer.add("hz/gone/b", data=b"b")
    layer.add_dir("hz/gone/sub")
    layer.add("hz/gone/sub/c", data=b"c")
    layer.add_dir("hz/opq")
    layer.add("hz/opq/old1", data=b"1")
    layer.add("hz/opq/old2", data=b"2")
    layer.add_dir("hz/recreate")
    layer.add("hz/recreate/old", data=b"old")

    layer.add("hz/keep", data=b"keep")
    layer.add("hz/replace-me", data=b"old")

    layer.add("np/one/two/file", data=b"no parent entries")
    layer.add(LONG_NAME, data=b"long")
    layer.add(DEEP_PATH + "/leaf", data=b"deep")
    layer.add(NON_UTF8_NAME, data=b"not UTF-8")

    layer.add("hz/fifo", tarfile.FIFOTYPE)
    layer.add("hz/null", tarfile.CHRTYPE, mode=0o666, device=(1, 3))
    layer.add("hz/loop", tarfile.BLKTYPE, mode=0o660, gid=6, device=(7, 0))
    layer.add("hz/abs", tarfile.SYMTYPE, linkname="/bin/busybox")
    layer.add("hz/rel", tarfile.SYMTYPE, linkname="../bin/busybox")
    layer.add("hz/dangling", tarfile.SYMTYPE, linkname="/nonexistent")

    layer.add("hz/hl-a", data=b"linked")
    layer.add("hz/hl-b", tarfile.LNKTYPE, linkname="hz/hl-a")
    layer.add("hz/hl-c", tarfile.LNKTYPE, linkname="hz/hl-a")

    layer.add("hz/suid", data=b"#!/bin/sh\n", mode=0o4755)
    layer.add_dir("hz/sticky", mode=0o1777)
    layer.add("hz/owned", data=b"owned", uid=1234, gid=5678)
    layer.add("hz/old", data=b"old", mtime=1_000_000_000)
    layer.add("hz/future", data=b"future", mtime=4_000_000_000)
    layer.add(
        "hz/xattr", data=b"x", xattrs={"user.lcfs": b"value", "user.raw": b"\x00\xff"}
    )
    layer.add("hz/zeros", data=bytes(1 << 20) + b"end")
    return layer.finish()


def change_layer() -> bytes:
    """Return the layer that deletes and replaces entries of the setup layer."""
    layer = LayerTar()
    layer.add_dir("hz")
    # Whiteouts of a directory's children, then of the directory itself.
    layer.whiteout("hz/gone/a")
    layer.whiteout("hz/gone/sub/c")
    layer.whiteout("hz/gone")
    # A whiteout before the file it hides, in the same layer.
    layer.whiteout("hz/replace-me")
    layer.add("hz/replace-me", data=b"new")
    layer.add_dir("hz/opq")
    layer.opaque("hz/opq")
    layer.add("hz/opq/new", data=b"new")
    layer.whiteout("hz/recreate")
    layer.add_dir("hz/recreate")
    layer.add("hz/recreate/fresh", data=b"fresh")
    # A file becomes a directory and a directory becomes a file.
    layer.add_dir("hz/keep", mode=0o750)
    layer.add("hz/keep/inner", data=b"inner")
    layer.add("hz/sticky", data=b"now a file")
    # Metadata only: same content, new mode.
    layer.add("hz/owned", data=b"owned", uid=1234, gid=5678, mode=0o600)
    # One name of a hard link group becomes a file of its own.
    layer.add("hz/hl-b", data=b"unlinked")
    return layer.finish()


def filler_layer(index: int) -> bytes:
    """Return a layer that adds one file and rewrites a file all of them share."""
    layer = LayerTar()
    layer.add_dir("depth")
    layer.add(f"depth/{index:03d}", data=f"{index}\n".encode())
    layer.add("depth/counter", data=f"{index}\n".encode())
    return layer.finish()


@pytest.fixture(scope="module")
def deep_archive(tmp_path_factory, busybox_tar):
    """The archive path and its layer diff ids, base first."""
    layers = [busybox_tar.read_bytes(), setup_layer(), change_layer()]
    layers += [filler_layer(index) for index in range(FILLER_LAYERS)]
    path = tmp_path_factory.mktemp("archive") / "deep.tar"
    diff_ids = write_image_archive(path, DEEP_IMAGE, layers)
    return path, diff_ids


@pytest.fixture(scope="module")
def loaded(docker, vfs_docker, deep_archive):
    docker.docker("load", "-i", str(deep_archive[0]))
    vfs_docker.docker("load", "-i", str(deep_archive[0]))
    return DEEP_IMAGE


def test_deep_image_has_all_layers(docker, loaded):
    assert len(docker.image_chain_ids(loaded)) == LAYER_COUNT


def test_deep_image_runs(docker, loaded):
    script = (
        "ls /depth | wc -l; cat /depth/counter /depth/000 /hz/replace-me; echo; "
        "ls /hz/opq; ls /hz/recreate; ls /hz/keep"
    )
    result = docker.docker(*RUN, loaded, "sh", "-c", script)
    assert result.stdout.split() == [
        str(FILLER_LAYERS + 1),
        str(FILLER_LAYERS - 1),
        "0",
        "new",
        "new",
        "fresh",
        "inner",
    ]


def test_loaded_layers_match_vfs(docker, vfs_docker, lcfs, loaded):
    ignore = {os.fsencode(path): {"mtime", "mode"} for path in CREATED_BY_APPLIER}
    found = compare_with_vfs(docker, vfs_docker, lcfs, loaded, ignore, layer=1)
    assert found == [], "setup layer:\n" + "\n".join(found)
    # vfs copies a parent layer without its user.* xattrs, so above the
    # layer that set them the reference has lost them.
    ignore[b"hz/xattr"] = {"xattrs"}
    for layer in (2, -1):
        found = compare_with_vfs(docker, vfs_docker, lcfs, loaded, ignore, layer=layer)
        assert found == [], f"layer {layer}:\n" + "\n".join(found)


def test_xattrs_kept_up_the_chain(docker, lcfs, loaded):
    # The vfs reference loses them above their layer, so lcfs is checked
    # on its own here.
    top = docker.layer_cache_id(docker.image_chain_ids(loaded)[-1])
    root = lcfs.call("GraphDriver.Get", {"ID": top})["Dir"]
    try:
        path = os.path.join(root, "hz", "xattr")
        names = sorted(os.listxattr(path, follow_symlinks=False))
        raw = os.getxattr(path, "user.raw", follow_symlinks=False)
    finally:
        lcfs.call("GraphDriver.Put", {"ID": top})
    assert names == ["user.lcfs", "user.raw"]
    assert raw == b"\x00\xff"


# NOTE: Docker's layer applier (pkg/archive UnpackLayer in dockerd 20.10)
# creates a missing parent directory with mode 0600; lcfs uses 0755.
def test_missing_parents_created_like_docker(docker, vfs_docker, lcfs, loaded):
    ignore = {os.fsencode(path): {"mtime"} for path in CREATED_BY_APPLIER}
    found = compare_with_vfs(docker, vfs_docker, lcfs, loaded, ignore, layer=1)
    assert found == [], "\n".join(found[:5])


def test_save_reproduces_loaded_layers(docker, loaded, deep_archive, tmp_path):
    # dockerd rebuilds each layer tar from its stored tar headers and the
    # files lcfs serves, so the digests match only if every file is
    # byte for byte what ApplyDiff received.
    saved = tmp_path / "saved.tar"
    docker.docker("save", "-o", str(saved), loaded)
    assert saved_layer_digests(saved) == deep_archive[1]


def test_commit_on_deep_image_matches_vfs(docker, vfs_docker, lcfs, loaded):
    for daemon in (docker, vfs_docker):
        daemon.docker(
            "run", "--pull", "never", "--network", "none", "--name", "deep-change",
            loaded, "sh", "-c", DEEP_CHANGE_SCRIPT,
        )  # fmt: skip
        daemon.docker("commit", "deep-change", DEEP_COMMIT_IMAGE)
        daemon.docker("rm", "deep-change")
    result = docker.docker(*RUN, DEEP_COMMIT_IMAGE, "cat", "/depth/counter", "/hz/hl-c")
    assert result.stdout == "changed\nlinkedmore\n"
    # Each daemon ran the script at its own time, so the layers differ in
    # the mtimes of what the script wrote, and only there.
    ignore = {os.fsencode(path): {"mtime"} for path in DEEP_CHANGE_WRITES}
    ignore |= {os.fsencode(path): {"mtime", "mode"} for path in CREATED_BY_APPLIER}
    ignore[b"hz/xattr"] = {"xattrs"}
    found = compare_with_vfs(
        docker, vfs_docker, lcfs, DEEP_COMMIT_IMAGE, ignore, same_layers=False
    )
    assert found == [], "\n".join(found)


def test_remove_deep_images_frees_layers(docker, lcfs, loaded, initial_status):
    for image in (DEEP_COMMIT_IMAGE, loaded):
        docker.docker("rmi", image)
    status = lcfs.status()
    assert status["Layers"] == initial_status["Layers"]
    assert (
        status["Data Space Used (bytes)"] == initial_status["Data Space Used (bytes)"]
    )
