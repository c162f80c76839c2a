"""End-to-end tests: Debian's containerd and ctr using lcfs as a proxy snapshotter.

containerd runs with its own root, state, socket and config, CRI disabled,
in a new network namespace. Images are OCI archives built in the test from
the busybox-static tree and small layers with whiteouts; nothing is pulled.
"""

import io
import json
import os
import tarfile
import threading
import time
from pathlib import Path

import pytest
from snapshotter_helpers import (
    Containerd,
    SnapshotterDaemon,
    check_list_consistent,
    layer_tar,
    oci_archive,
    tools_available,
)

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(tools_available() is not None, reason=str(tools_available())),
]

BASE_NAME = "docker.io/lcfs/test"


def ctr_keys(output: str) -> list[str]:
    """Return the first column of ctr's table output, without the header."""
    return [line.split()[0] for line in output.splitlines()[1:] if line.strip()]


def wait_until(condition, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def reconnected(containerd: Containerd) -> bool:
    return containerd.snapshots("ls", check=False, timeout=30).returncode == 0


@pytest.fixture
def stack(tmp_path):
    daemon = SnapshotterDaemon(tmp_path / "lcfs")
    containerd = Containerd(tmp_path / "containerd", daemon.socket_path)
    try:
        daemon.start()
        containerd.start()
        yield daemon, containerd
    finally:
        containerd.stop()
        daemon.cleanup()


@pytest.fixture
def image(tmp_path, busybox_tar) -> tuple[Path, str]:
    """An OCI archive of busybox plus two layers: files, then whiteouts and an opaque dir."""
    second = layer_tar(
        [("data/keep", b"old\n"), ("data/drop", b"drop me\n"), ("data/dir/x", b"x\n"),
         ("data/dir/y", b"y\n")],
        dirs=["data", "data/dir"],
    )  # fmt: skip
    third = layer_tar(
        [("data/keep", b"new\n"), ("data/.wh.drop", None), ("data/dir/.wh..wh..opq", None),
         ("data/dir/z", b"z\n")],
        dirs=["data", "data/dir"],
    )  # fmt: skip
    path = tmp_path / "image.tar"
    ref = oci_archive(path, [busybox_tar.read_bytes(), second, third], BASE_NAME, ["sh"])
    return path, ref


def import_image(containerd: Containerd, path: Path, **kwargs):
    return containerd.ctr("images", "import", "--base-name", BASE_NAME, "--snapshotter", "lcfs",
                          str(path), **kwargs)  # fmt: skip


def finish(daemon: SnapshotterDaemon, containerd: Containerd, ref: str) -> None:
    """Remove the image with a synchronous GC and check that the store is empty and clean."""
    containerd.ctr("images", "rm", "--sync", ref)
    wait_until(lambda: not daemon.list(), 30, "garbage collection of every snapshot")
    assert daemon.layer_dirs() == []
    containerd.stop()
    assert daemon.stop() == 0
    result = daemon.fsck()
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 layers" in result.stdout


def test_import_run_and_gc(stack, image):
    daemon, containerd = stack
    path, ref = image
    import_image(containerd, path)

    committed = daemon.list("kind==committed")
    assert len(committed) == 3
    check_list_consistent(daemon.list())
    listed = ctr_keys(containerd.snapshots("ls").stdout)
    assert len(listed) == 3

    script = ("cat /data/keep; ls /data; ls /data/dir; echo written > /data/new; "
              "cat /data/new; test ! -e /data/drop && echo dropped")  # fmt: skip
    run = containerd.ctr("run", "--rm", "--snapshotter", "lcfs", ref, "run-1", "sh", "-c", script)
    assert run.stdout.split() == ["new", "dir", "keep", "z", "written", "dropped"]
    # The container's snapshot went with the container; only the image's are left.
    wait_until(lambda: len(daemon.list()) == 3, 30, "removal of the container snapshot")

    usage = containerd.snapshots("usage", "-b").stdout
    sizes = {line.split()[0]: int(line.split()[1]) for line in usage.splitlines()[1:]}
    # Two small files, one 4 KiB block each.
    assert sizes[listed_top(committed)] == 2 * 4096

    finish(daemon, containerd, ref)


def listed_top(committed) -> str:
    """Return the ctr name of the top committed snapshot, which no other names as parent."""
    parents = {info.parent for info in committed}
    tops = [info.name for info in committed if info.name not in parents]
    assert len(tops) == 1, tops
    return ctr_name(tops[0])


def ctr_name(backend_name: str) -> str:
    """Return the name ctr shows for a backend name ``NAMESPACE/SEQUENCE/NAME``."""
    return backend_name.split("/", 2)[2]


def test_ctr_snapshot_commands(stack, image):
    daemon, containerd = stack
    path, ref = image
    import_image(containerd, path)
    top = listed_top(daemon.list("kind==committed"))

    prepared = containerd.snapshots("prepare", "--mounts", "work-1", top).stdout
    mounts = json.loads(prepared)
    assert len(mounts) == 1
    assert mounts[0]["Type"] == "bind"
    assert mounts[0]["Options"] == ["rbind", "rw"]
    layer_dir = Path(mounts[0]["Source"])
    assert layer_dir.parent == daemon.mountpoint
    assert (layer_dir / "data" / "keep").read_bytes() == b"new\n"
    (layer_dir / "added").write_bytes(b"12345678")

    usage = containerd.snapshots("usage", "-b", "work-1").stdout.splitlines()[1].split()
    assert usage[0] == "work-1"
    assert int(usage[1]) == 4096
    assert int(usage[2]) == 1

    containerd.snapshots("label", "work-1", "containerd.io/snapshot/lcfs-test=one")
    labels = {info.name: dict(info.labels) for info in daemon.list()}
    work = [name for name in labels if name.endswith("/work-1")]
    assert len(work) == 1
    assert labels[work[0]] == {"containerd.io/snapshot/lcfs-test": "one"}

    containerd.snapshots("commit", "saved-1", "work-1")
    info = json.loads(containerd.snapshots("info", "saved-1").stdout)
    assert info["Kind"] == "Committed"
    assert info["Parent"] == top
    backend = daemon.list('kind==committed,name~="/saved-1$"')
    assert len(backend) == 1
    assert (daemon.mountpoint / layer_dir.name / "added").read_bytes() == b"12345678"
    with pytest.raises(OSError):
        (layer_dir / "more").write_bytes(b"x")

    removal = containerd.snapshots("rm", top, check=False)
    assert removal.returncode != 0
    containerd.snapshots("rm", "saved-1")
    # containerd removes it from the snapshotter at its next garbage collection,
    # which finish() runs and checks.
    assert "saved-1" not in ctr_keys(containerd.snapshots("ls").stdout)
    check_list_consistent(daemon.list())

    finish(daemon, containerd, ref)


def test_ctr_snapshot_diff(stack, image):
    daemon, containerd = stack
    path, ref = image
    import_image(containerd, path)
    top = listed_top(daemon.list("kind==committed"))
    # containerd's differ mounts the snapshot and its parent and compares
    # them file by file, reading security.capability of each. It writes the
    # opaque directory as a whiteout per name it hid.
    diff = containerd.snapshots("diff", "--media-type", "application/vnd.oci.image.layer.v1.tar",
                                top, check=False)  # fmt: skip
    assert diff.returncode == 0, diff.stderr
    with tarfile.open(fileobj=io.BytesIO(diff.stdout.encode())) as archive:
        names = sorted(archive.getnames())
    assert names == ["data", "data/.wh.drop", "data/dir", "data/dir/.wh.x", "data/dir/.wh.y",
                     "data/dir/z", "data/keep"]  # fmt: skip

    finish(daemon, containerd, ref)


def big_image(tmp_path, busybox_tar) -> tuple[Path, str]:
    """An image whose second layer takes a few seconds to unpack through FUSE."""
    files = [(f"bulk/{i // 100:02d}/file-{i}", os.urandom(4096)) for i in range(3000)]
    files.append(("bulk/large", os.urandom(48 << 20)))
    dirs = ["bulk"] + [f"bulk/{i:02d}" for i in range(30)]
    path = tmp_path / "big.tar"
    ref = oci_archive(path, [busybox_tar.read_bytes(), layer_tar(files, dirs=dirs)],
                      BASE_NAME, ["sh"])  # fmt: skip
    return path, ref


def test_kill_during_import(stack, tmp_path, busybox_tar):
    daemon, containerd = stack
    path, ref = big_image(tmp_path, busybox_tar)
    outcome = {}

    def run_import():
        outcome["result"] = import_image(containerd, path, check=False, timeout=600)

    importer = threading.Thread(target=run_import)
    importer.start()
    try:
        # The second layer is the large one: kill while containerd writes it.
        wait_until(lambda: daemon.list('kind==active,name~=extract,parent!=""'), 120,
                   "the extraction snapshot of the second layer", interval=0.05)  # fmt: skip
        time.sleep(0.5)
        daemon.kill()
    finally:
        importer.join(600)
    assert outcome["result"].returncode != 0, "the import finished before the daemon was killed"

    daemon.start()
    wait_until(lambda: reconnected(containerd), 60, "containerd to reach the restarted daemon")
    check_list_consistent(daemon.list())

    import_image(containerd, path)
    check_list_consistent(daemon.list())
    run = containerd.ctr("run", "--rm", "--snapshotter", "lcfs", ref, "after-import", "sh", "-c",
                         "ls /bulk/00 | wc -l; wc -c < /bulk/large")  # fmt: skip
    assert run.stdout.split() == ["100", str(48 << 20)]

    finish(daemon, containerd, ref)


def test_kill_during_run(stack, image):
    daemon, containerd = stack
    path, ref = image
    import_image(containerd, path)
    loop = "i=0; while true; do echo $i > /data/counter; i=$((i+1)); sleep 0.01; done"
    containerd.ctr("run", "-d", "--snapshotter", "lcfs", ref, "busy-1", "sh", "-c", loop)
    wait_until(lambda: daemon.list("kind==active"), 30, "the container's snapshot")
    time.sleep(1.0)
    daemon.kill()

    daemon.start()
    wait_until(lambda: reconnected(containerd), 60, "containerd to reach the restarted daemon")
    infos = daemon.list()
    check_list_consistent(infos)
    assert len([info for info in infos if info.kind == 2]) == 1

    containerd.ctr("tasks", "kill", "-s", "SIGKILL", "busy-1", check=False)
    containerd.ctr("tasks", "rm", "-f", "busy-1")
    containerd.ctr("containers", "rm", "busy-1")
    run = containerd.ctr("run", "--rm", "--snapshotter", "lcfs", ref, "run-2", "cat", "/data/keep")
    assert run.stdout == "new\n"
    check_list_consistent(daemon.list())

    finish(daemon, containerd, ref)
