"""Crash points: every step of every multi-step store operation, killed with SIGKILL.

Each case runs one operation in a subprocess that kills itself at a named
crash point, then reopens the device (which runs recovery) and checks that
the operation is either complete or entirely gone, that every data block is
free or referenced once, and that lcfs-fsck finds nothing to repair.
"""

import io
import os
import signal
import subprocess
import sys
import tarfile
import textwrap

import pytest

from lcfs.journal.crash import POINTS
from lcfs.store import ROOT_INO, Store
from tools import fsck

MiB = 1 << 20


def layer_tar(files=40) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        d = tarfile.TarInfo("dir")
        d.type = tarfile.DIRTYPE
        d.mode = 0o755
        archive.addfile(d)
        for i in range(files):
            data = bytes([i % 251]) * (5000 + i * 997)
            info = tarfile.TarInfo(f"dir/f{i}")
            info.size = len(data)
            info.mode = 0o644
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def tree(store, layer_id):
    number = store.get_layer(layer_id).number
    d = store.lookup(number, ROOT_INO, b"dir")
    return {name: store.read(number, attr.ino, 0, attr.size) for name, attr in store.readdir(number, d.ino)}


def expected_tree():
    archive = tarfile.open(fileobj=io.BytesIO(layer_tar()))
    return {m.name.split("/")[1].encode(): archive.extractfile(m).read() for m in archive if m.isfile()}


SCRIPTS = {
    "create": """
        s.create_layer("new", "base")
        s.commit()
    """,
    "apply": """
        s.create_layer("new", "base")
        s.commit()
        s.apply_diff("new", io.BytesIO(tar))
    """,
    "remove": """
        s.remove_layer("victim")
    """,
}

CASES = [
    ("create", "create.done"),
    ("create", "commit.data_synced"),
    ("create", "commit.done"),
    ("apply", "commit.done"),
    ("apply", "apply.intent"),
    ("apply", "apply.member@1"),
    ("apply", "apply.member@20"),
    ("apply", "apply.batch@1"),
    ("apply", "apply.batch@5"),
    ("apply", "apply.finishing"),
    ("apply", "commit.data_synced@3"),
    ("apply", "commit.done@4"),
    # The first commit is the one Store.open makes; the second records the remove intent.
    ("remove", "commit.data_synced@2"),
    ("remove", "remove.marked"),
    ("remove", "remove.batch@1"),
    ("remove", "remove.batch@3"),
    ("remove", "remove.dropping"),
    ("remove", "commit.data_synced@3"),
]


def test_every_crash_point_is_exercised():
    used = {point.split("@")[0] for _, point in CASES}
    assert used == set(POINTS)


@pytest.fixture
def prepared(tmp_path):
    """A store with a base layer and a 'victim' layer holding the test tar."""
    image = str(tmp_path / "store.img")
    Store.mkfs(image, size=512 * MiB)
    with Store.open(image) as s:
        empty = s.statfs().free_blocks
        s.create_layer("base")
        s.create_layer("victim", "base")
        s.apply_diff("victim", io.BytesIO(layer_tar()))
        with_victim = s.statfs().free_blocks
    return image, empty, with_victim


@pytest.mark.parametrize("operation,point", CASES)
def test_crash_point(prepared, operation, point, tmp_path):
    image, empty, with_victim = prepared
    tar_path = tmp_path / "layer.tar"
    tar_path.write_bytes(layer_tar())
    script = "import io\nfrom lcfs.store import Store\n"
    script += f"tar = open({str(tar_path)!r}, 'rb').read()\ns = Store.open({image!r})\n"
    script += textwrap.dedent(SCRIPTS[operation]) + "s.close()\nprint('finished')\n"
    env = dict(os.environ, LCFS_CRASH_POINT=point, LCFS_APPLY_COMMIT_INTERVAL="0", LCFS_PURGE_BATCH="10")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()[-2000:]
    with Store.open(image) as s:
        free = s.statfs().free_blocks
        if operation == "create":
            assert free == with_victim
        elif operation == "apply":
            if s.exists("new") and s.changes("new"):
                assert tree(s, "new") == expected_tree()
                assert free < with_victim
            else:
                # Either the import was rolled back with its layer, or the crash
                # came between Create and the start of ApplyDiff.
                assert free == with_victim
        else:
            if s.exists("victim"):
                assert point == "commit.data_synced@2"
                assert tree(s, "victim") == expected_tree()
                assert free == with_victim
            else:
                assert free == empty
                assert s.was_removed("victim")
    assert fsck.main([image, "--no-progress", "--log-level", "WARNING"]) == 0


def test_freed_blocks_not_reused_before_commit(tmp_path):
    """Blocks freed by an unlink stay allocated to the old file until the commit lands."""
    image = str(tmp_path / "store.img")
    Store.mkfs(image, size=64 * MiB, metadata_size=16 * MiB)
    import stat as stat_

    with Store.open(image) as s:
        n = s.create_layer("l").number
        a = s.mknod(n, ROOT_INO, b"a", stat_.S_IFREG | 0o644)
        s.write(n, a.ino, 0, b"A" * 36864)
    script = textwrap.dedent(f"""
        import os, stat
        from lcfs.store import Store, ROOT_INO
        s = Store.open({image!r}); n = s.get_layer("l").number
        s.unlink(n, ROOT_INO, b"a")
        b = s.mknod(n, ROOT_INO, b"b", stat.S_IFREG | 0o644)
        s.write(n, b.ino, 0, b"B" * 36864)
        os._exit(0)
    """)
    subprocess.run([sys.executable, "-c", script], check=True)
    with Store.open(image) as s:
        n = s.get_layer("l").number
        a = s.lookup(n, ROOT_INO, b"a")
        assert s.read(n, a.ino, 0, 36864) == b"A" * 36864
    assert fsck.main([image, "--no-progress", "--log-level", "WARNING"]) == 0
