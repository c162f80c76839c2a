"""Orphaned layers and stale files, against a Docker root laid out as dockerd 20.10 writes it."""

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lcfs.driver.reconcile import find_orphans, find_stale_files
from lcfs.store import Store
from lcfs.store import format as format_module
from lcfs.store.format import open_env, read_superblock
from tools import fsck

MiB = 1 << 20


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


@pytest.fixture
def setup(tmp_path):
    image = str(tmp_path / "store.img")
    Store.mkfs(image, size=128 * MiB)
    root = tmp_path / "docker"
    layerdb = root / "image" / "lcfs" / "layerdb"
    with Store.open(image) as s:
        for layer_id, parent in [("img1", None), ("img2", "img1"), ("ctr-init", "img2"), ("ctr", "ctr-init"),
                                 ("orphan-base", None), ("orphan-child", "orphan-base"),
                                 ("bk0000000000000000000000", None)]:  # fmt: skip
            s.create_layer(layer_id, parent)
        s.set_meta("driver.home", str(root / "lcfs").encode())
    write(str(layerdb / "sha256" / "aaaa" / "cache-id"), "img1")
    write(str(layerdb / "sha256" / "bbbb" / "cache-id"), "img2")
    write(str(layerdb / "mounts" / "c1" / "mount-id"), "ctr")
    write(str(layerdb / "mounts" / "c1" / "init-id"), "ctr-init")
    write(str(layerdb / "mounts" / "gone" / "mount-id"), "no-such-layer")
    os.makedirs(layerdb / "sha256" / "cccc-1234-removing")
    os.makedirs(layerdb / "tmp" / "write-set-999")
    os.makedirs(root / "buildkit")
    (root / "buildkit" / "snapshots.db").write_bytes(b"\0\0bk0000000000000000000000\0\0")
    os.makedirs(root / "lcfs" / "leftover-mountpoint")
    return image, str(root), layerdb


def test_orphans_found_children_first(setup):
    image, root, _ = setup
    with Store.open(image) as s:
        report = find_orphans(s, root, grace=0)
        assert [layer.id for layer in report.orphans] == ["orphan-child", "orphan-base"]
        assert report.unknown == []
        assert find_orphans(s, root, grace=3600).orphans == []


def test_unreadable_references_keep_layers(setup):
    image, root, layerdb = setup
    broken = layerdb / "sha256" / "dddd"
    os.makedirs(broken / "cache-id")  # a directory where a file should be: unreadable
    with Store.open(image) as s:
        report = find_orphans(s, root, grace=0)
    assert report.orphans == []
    assert {layer.id for layer in report.unknown} >= {"orphan-child", "orphan-base"}
    assert report.unreadable


def test_stale_files_listed(setup):
    image, root, layerdb = setup
    with Store.open(image) as s:
        stale = {entry.path: entry for entry in find_stale_files(s, root, grace=0)}
    assert str(layerdb / "sha256" / "cccc-1234-removing") in stale
    assert str(layerdb / "tmp" / "write-set-999") in stale
    assert str(layerdb / "mounts" / "gone") in stale
    assert str(layerdb / "mounts" / "c1") not in stale
    assert os.path.join(root, "lcfs", "leftover-mountpoint") in stale


def test_fsck_reaps_orphans_and_leftovers(setup, capsys):
    image, root, layerdb = setup
    args = [image, "--docker-root", root, "--grace", "0", "--no-progress", "--json"]
    assert fsck.main(args) == 4
    result = json.loads(capsys.readouterr().out)
    assert sum("is an orphan" in p["problem"] for p in result["problems"]) == 2
    with Store.open(image) as s:
        assert s.exists("orphan-base")
    assert fsck.main(args[:-1] + ["--repair", "--yes"]) == 1
    assert fsck.main(args[:-1]) == 0
    with Store.open(image) as s:
        assert not s.exists("orphan-base")
        assert not s.exists("orphan-child")
        assert s.exists("ctr")
        assert s.exists("bk0000000000000000000000")
    assert not (layerdb / "tmp" / "write-set-999").exists()
    assert not (layerdb / "mounts" / "gone").exists()
    assert (layerdb / "mounts" / "c1").exists()


def test_dead_daemon_pid_and_socket(tmp_path):
    image = str(tmp_path / "store.img")
    Store.mkfs(image, size=64 * MiB)
    sock = tmp_path / "run" / "lcfs.sock"
    os.makedirs(sock.parent)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "run" / "lcfs.pid").write_text(str(dead.pid))
    import socket

    s_ = socket.socket(socket.AF_UNIX)
    s_.bind(str(sock))
    s_.close()
    with Store.open(image) as s:
        s.set_meta("daemon.socket", str(sock).encode())
        stale = {entry.path for entry in find_stale_files(s, None, grace=0, now=time.time())}
    assert str(sock) in stale
    assert str(tmp_path / "run" / "lcfs.pid") in stale


def test_repair_reaps_init_layer_of_stale_record(setup, capsys):
    """Deleting a mount record leaves its init layer unreferenced, and the same repair removes it."""
    image, root, layerdb = setup
    with Store.open(image) as s:
        s.create_layer("gone-init", "img2")
    write(str(layerdb / "mounts" / "gone" / "init-id"), "gone-init")
    args = [image, "--docker-root", root, "--grace", "0", "--no-progress"]
    assert fsck.main(args + ["--repair", "--yes"]) == 1
    assert fsck.main(args) == 0
    assert not (layerdb / "mounts" / "gone").exists()
    with Store.open(image) as s:
        assert not s.exists("gone-init")
        assert s.exists("ctr-init")



def test_repair_leaving_docker_problems_clears_mark(setup, capsys):
    """Problems left in Docker's files only must not keep the daemon from opening the store."""
    image, root, _ = setup
    (Path(root) / "lcfs" / "leftover-file").write_text("not an empty directory")
    args = [image, "--docker-root", root, "--grace", "0", "--no-progress"]
    assert fsck.main(args + ["--repair", "--yes"]) == 4
    assert read_superblock(image).get("needs_fsck") is None
    capsys.readouterr()
    assert fsck.main(args + ["--json"]) == 4
    problems = [p["problem"] for p in json.loads(capsys.readouterr().out)["problems"]]
    assert problems == [f"{root}/lcfs/leftover-file: leftover entry in the unmounted driver home"]


def test_record_of_listed_container_kept(setup, capsys):
    """A container that dockerd still lists keeps its mount record, so 'docker rm' can remove it."""
    image, root, layerdb = setup
    os.makedirs(os.path.join(root, "containers", "gone"))
    with Store.open(image) as s:
        s.create_layer("gone-init", "img2")
    write(str(layerdb / "mounts" / "gone" / "init-id"), "gone-init")
    args = [image, "--docker-root", root, "--grace", "0", "--no-progress", "--json"]
    assert fsck.main(args[:-1] + ["--repair", "--yes"]) == 4
    capsys.readouterr()
    assert fsck.main(args) == 4
    problems = [p["problem"] for p in json.loads(capsys.readouterr().out)["problems"]]
    assert problems == [
        f"{layerdb / 'mounts' / 'gone'}: container gone still exists but its layer "
        "no-such-layer is gone, so remove the container with 'docker rm -f gone'"
    ]
    assert (layerdb / "mounts" / "gone").exists()
    # The repair changed files and left only Docker's side, so the daemon may open the store.
    assert read_superblock(image).get("needs_fsck") is None
    with Store.open(image) as s:
        assert s.exists("gone-init")


def test_mkfs_directory_in_use_kept(tmp_path, monkeypatch):
    """A temporary directory that a running mkfs has locked is not stale, even with no grace period."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    image = str(tmp_path / "store.img")
    Store.mkfs(image, size=64 * MiB)
    busy = tmpdir / "lcfs-mkfs-busy"
    busy.mkdir()
    lock_fd = os.open(busy, os.O_RDONLY)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        with Store.open(image) as s:
            stale = {entry.path for entry in find_stale_files(s, None, grace=0)}
        assert str(busy) not in stale
    finally:
        os.close(lock_fd)
    with Store.open(image) as s:
        stale = {entry.path for entry in find_stale_files(s, None, grace=0)}
    assert str(busy) in stale


def test_mkfs_locks_its_directory(tmp_path, monkeypatch):
    locked = []

    def checking_open_env(path, metadata_size):
        probe = os.open(os.path.dirname(path), os.O_RDONLY)
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked.append(False)
        except BlockingIOError:
            locked.append(True)
        finally:
            os.close(probe)
        return open_env(path, metadata_size)

    monkeypatch.setattr(format_module, "open_env", checking_open_env)
    Store.mkfs(str(tmp_path / "store.img"), size=64 * MiB)
    assert locked == [True]
