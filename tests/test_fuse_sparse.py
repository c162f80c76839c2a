"""Tests of holes on the mount: lseek with SEEK_DATA and SEEK_HOLE, and fallocate.

The same script runs on a tmpfs and on the mount, and the two must agree.
Every access to a mount runs in a subprocess, because the process that
serves a mount must not touch files on it.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import tempfile
import textwrap

import pytest
from fuse_fixtures import fuse_available, lcfs_image, mounted, mount_store  # noqa: F401

from lcfs.fuse.operations import KERNEL_CACHES
from lcfs.fuse.settings import DIRECT_IO_NEVER, DIRECT_IO_WRITE_ONLY, FuseSettings
from lcfs.store import Store
from tools import fsck

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(not fuse_available(), reason="FUSE mounts need root and /dev/fuse"),
    pytest.mark.skipif(not KERNEL_CACHES, reason="lseek and fallocate need the rebuilt pyfuse3"),
]

MiB = 1 << 20
# errno.errorcode's name for EOPNOTSUPP, which equals ENOTSUP on Linux.
UNSUPPORTED = errno.errorcode[errno.EOPNOTSUPP]

# Writes a sparse file, then records the lseek results, the contents and
# the allocated size after each of three hole punches. Prints JSON.
HOLES_SCRIPT = r"""
import ctypes, errno, hashlib, json, os, sys

libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
PUNCH = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
MiB = 1 << 20

def punch(fd, offset, length):
    if libc.fallocate(fd, PUNCH, offset, length) != 0:
        return errno.errorcode[ctypes.get_errno()]
    return "ok"

def seek(fd, offset, whence):
    try:
        return os.lseek(fd, offset, whence)
    except OSError as error:
        return errno.errorcode[error.errno]

def state(fd):
    size = os.fstat(fd).st_size
    offsets = [0, 100, 4095, 4096, 8191, 8192, 500000, MiB - 1, MiB, MiB + 4095, size - 1, size]
    data = os.pread(fd, size, 0)
    return {
        "size": size,
        "data": [seek(fd, offset, os.SEEK_DATA) for offset in offsets],
        "hole": [seek(fd, offset, os.SEEK_HOLE) for offset in offsets],
        "sha256": hashlib.sha256(data).hexdigest(),
        "zero_runs": [[start, end] for start, end in zero_runs(data)],
        "blocks": os.fstat(fd).st_blocks,
    }

def zero_runs(data):
    runs, start = [], None
    for index in range(0, len(data), 512):
        zero = not any(data[index:index + 512])
        if zero and start is None:
            start = index
        elif not zero and start is not None:
            runs.append((start, index))
            start = None
    if start is not None:
        runs.append((start, len(data)))
    return runs

path = sys.argv[1]
fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
os.pwrite(fd, bytes(range(256)) * 48, 0)        # 12 KiB of data at the start
os.pwrite(fd, b"b" * 4096, MiB)                 # one block at 1 MiB
os.pwrite(fd, b"c" * 6000, 2 * MiB)             # a last block that ends mid-block
steps = {"written": state(fd)}
steps["partial"] = punch(fd, 4000, 5000)        # parts of the first three blocks
steps["after_partial"] = state(fd)
steps["whole"] = punch(fd, MiB - 4096, 3 * 4096)  # a hole block and the block at 1 MiB
steps["after_whole"] = state(fd)
steps["past_end"] = punch(fd, 2 * MiB + 100, MiB)  # from inside the last block on
steps["after_past_end"] = state(fd)
os.close(fd)
print(json.dumps(steps))
"""


def run_script(script: str, *args: str) -> dict:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, f"script failed ({result.returncode}):\n{result.stderr}"
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def tmpfs_holes():
    """The script's record on a tmpfs (/dev/shm), the reference."""
    with tempfile.TemporaryDirectory(dir="/dev/shm") as directory:
        return run_script(HOLES_SCRIPT, os.path.join(directory, "sparse"))


def without_blocks(record: dict) -> dict:
    """Return the record with st_blocks left out, which differs by file system."""
    return {
        step: {key: value for key, value in found.items() if key != "blocks"}
        if isinstance(found, dict) else found
        for step, found in record.items()
    }  # fmt: skip


# The kernel opens files itself with the first, the daemon serves opens
# with the others, and the last serves requests on pyfuse3's trio loop.
SETTINGS = {
    "never": FuseSettings(direct_io=DIRECT_IO_NEVER),
    "write-only": FuseSettings(direct_io=DIRECT_IO_WRITE_ONLY),
    "share-unchanged": FuseSettings(share_unchanged=True),
    "invalidate-on-close": FuseSettings(invalidate_on_close=True),
}


@pytest.mark.parametrize("setting", SETTINGS)
def test_holes_match_tmpfs(lcfs_image, tmpfs_holes, setting):
    with mount_store(lcfs_image, SETTINGS[setting]) as mounted:
        found = run_script(HOLES_SCRIPT, mounted.at("base", "sparse"))
    assert without_blocks(found) == without_blocks(tmpfs_holes)
    # Both count 4 KiB blocks, so each punch freed the same blocks.
    blocks = {step: value["blocks"] for step, value in found.items() if isinstance(value, dict)}
    assert blocks == {
        "written": 8 * 6,
        "after_partial": 8 * 5,  # the second block lies wholly in the range
        "after_whole": 8 * 4,
        "after_past_end": 8 * 3,  # the block past the end goes, the one before is zeroed
    }
    assert blocks == {
        step: value["blocks"] for step, value in tmpfs_holes.items() if isinstance(value, dict)
    }


# Builds files with holes at the start, middle and end, and with hole
# punches inside and past the end, then records SEEK_DATA and SEEK_HOLE
# at every 512th offset from -1024 to two blocks past the end. Prints JSON.
SEEK_MATRIX_SCRIPT = r"""
import ctypes, errno, json, os, sys

libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
PUNCH = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
B = 4096
MiB = 1 << 20

# Steps: ("write", offset, length), ("truncate", size), ("punch", offset, length).
FILES = {
    "data_only": [("write", 0, 10000)],
    "hole_at_start": [("write", 3 * B, 100)],
    "hole_in_middle": [("write", 0, B), ("write", 3 * B, B)],
    "hole_at_end": [("write", 0, B), ("truncate", 5 * B)],
    "hole_after_partial_block": [("write", 0, 100), ("truncate", 10000)],
    "only_hole": [("truncate", 3 * B)],
    "punch_inside": [("write", 0, 4 * B), ("punch", B, B)],
    "punch_inside_unaligned": [("write", 0, 4 * B), ("punch", 100, 2 * B)],
    "punch_past_end": [("write", 0, 10000), ("punch", 5000, MiB)],
    "punch_last_block_past_end": [("write", 0, 10000), ("punch", 2 * B, MiB)],
    "punch_inside_last_block_past_end": [("write", 0, 10000), ("punch", 9000, MiB)],
    "punch_from_end": [("write", 0, 10000), ("punch", 10000, B)],
    "punch_beyond_end": [("write", 0, 10000), ("punch", 20000, B)],
    "punch_to_unaligned_end": [("write", 0, 10000), ("punch", 2 * B, 10000 - 2 * B)],
    "punch_everything": [("write", 0, 3 * B), ("punch", 0, MiB)],
    "punch_last_data_block": [("write", 0, B), ("write", 4 * B, B), ("punch", 4 * B, B)],
    "punch_hole_at_end_past_end": [("write", 0, B), ("write", 2 * B, 100),
                                   ("truncate", 6 * B), ("punch", 2 * B, MiB)],
    "punch_after_grow": [("write", 0, 2 * B), ("truncate", 5 * B), ("punch", B + 10, MiB)],
    "shrink_then_grow": [("write", 0, 3 * B), ("truncate", 5000), ("truncate", 3 * B)],
}

def apply(fd, step):
    if step[0] == "write":
        os.pwrite(fd, b"x" * step[2], step[1])
    elif step[0] == "truncate":
        os.ftruncate(fd, step[1])
    elif libc.fallocate(fd, PUNCH, step[1], step[2]) != 0:
        raise OSError(ctypes.get_errno(), "fallocate failed", step)

def seek(fd, offset, whence):
    try:
        return os.lseek(fd, offset, whence)
    except OSError as error:
        return errno.errorcode[error.errno]

results = {}
for name, steps in FILES.items():
    fd = os.open(os.path.join(sys.argv[1], name), os.O_RDWR | os.O_CREAT, 0o644)
    for step in steps:
        apply(fd, step)
    size = os.fstat(fd).st_size
    offsets = sorted({*range(-1024, size + 2 * B, 512), size - 1, size, size + 1})
    results[name] = {
        str(offset): [seek(fd, offset, os.SEEK_DATA), seek(fd, offset, os.SEEK_HOLE)]
        for offset in offsets
    }
    os.close(fd)
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def tmpfs_seeks():
    with tempfile.TemporaryDirectory(dir="/dev/shm") as directory:
        return run_script(SEEK_MATRIX_SCRIPT, directory)


@pytest.mark.parametrize("setting", SETTINGS)
def test_seek_matrix_matches_tmpfs(lcfs_image, tmpfs_seeks, setting):
    with mount_store(lcfs_image, SETTINGS[setting]) as mounted:
        found = run_script(SEEK_MATRIX_SCRIPT, mounted.at("base"))
    assert found.keys() == tmpfs_seeks.keys()
    for name, expected in tmpfs_seeks.items():
        different = {offset: (expected[offset], found[name].get(offset))
                     for offset in expected if found[name].get(offset) != expected[offset]}  # fmt: skip
        assert different == {}, f"{name}: offset: (tmpfs, lcfs) [SEEK_DATA, SEEK_HOLE]"


SEEK_SCRIPT = """
import json, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
print(json.dumps([os.lseek(fd, 0, os.SEEK_HOLE), os.lseek(fd, 4096, os.SEEK_DATA),
                  os.lseek(fd, 3 * 4096, os.SEEK_HOLE)]))
"""


def make_sparse_parent(mounted) -> None:
    """Write ``sparse`` into layer ``base`` through the store, then freeze it under ``child``."""
    store = mounted.store
    layer = store.get_layer("base").number
    inode = store.mknod(layer, 1, b"sparse", 0o100644)
    store.write(layer, inode.ino, 0, b"a" * 4096)
    store.write(layer, inode.ino, 3 * 4096, b"b" * 100)
    store.create_layer("child", "base")
    store.commit()


@pytest.mark.parametrize("setting", ["never", "share-unchanged"])
def test_seek_in_inherited_file(lcfs_image, setting):
    with mount_store(lcfs_image, SETTINGS[setting]) as mounted:
        make_sparse_parent(mounted)
        found = run_script(SEEK_SCRIPT, mounted.at("child", "sparse"))
    assert found == [4096, 3 * 4096, 3 * 4096 + 100]


FALLOCATE_SCRIPT = """
import ctypes, errno, json, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]

def fallocate(path, mode, offset, length):
    fd = os.open(path, os.O_RDWR)
    try:
        if libc.fallocate(fd, mode, offset, length) != 0:
            return errno.errorcode[ctypes.get_errno()]
        return "ok"
    finally:
        os.close(fd)

results = {}
for name, mode in [("allocate", 0), ("keep_size", 0x01), ("zero_range", 0x10),
                   ("zero_range_keep_size", 0x11), ("punch", 0x03)]:
    results[name] = [fallocate(path, mode, 0, 4096) for path in sys.argv[1:]]
fd = os.open(sys.argv[1], os.O_RDWR)
os.posix_fallocate(fd, 0, 3 * 4096)
results["posix_fallocate_size"] = os.fstat(fd).st_size
results["posix_fallocate_tail"] = os.pread(fd, 8192, 4096) == bytes(8192)
os.close(fd)
with open(sys.argv[1], "rb") as child, open(sys.argv[2], "rb") as parent:
    results["child_head"] = child.read(4096).hex()[:16]
    results["parent_head"] = parent.read(4096).hex()[:16]
print(json.dumps(results))
"""


def test_fallocate_modes_and_frozen_layer(mounted, capsys):
    make_sparse_parent(mounted)
    results = run_script(
        FALLOCATE_SCRIPT, mounted.at("child", "sparse"), mounted.at("base", "sparse")
    )
    image = mounted.image
    # Blocks are allocated on write, so only punching is served; a frozen
    # layer rejects it.
    for mode in ("allocate", "keep_size", "zero_range", "zero_range_keep_size"):
        assert results[mode] == [UNSUPPORTED, UNSUPPORTED], mode
    assert results["punch"] == ["ok", "EROFS"]
    # glibc's posix_fallocate writes zeros when fallocate is not supported.
    assert results["posix_fallocate_size"] == 3 * 4096 + 100
    assert results["posix_fallocate_tail"] is True
    # The punch in the child layer left the parent's copy of the block alone.
    assert results["child_head"] == "00" * 8
    assert results["parent_head"] == "61" * 8
    # The block accounting after the punches passes lcfs-fsck.
    mounted.server.stop()
    mounted.store.close()
    code = fsck.main([image, "--json", "--no-progress"])
    report = json.loads(capsys.readouterr().out)
    mounted.store = Store.open(image)  # for the fixture's teardown
    assert code == 0, report
