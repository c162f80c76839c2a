"""Docker integration: commit cost, diff cost, clean stops and leftovers.

One `lcfs daemon` and one dockerd using it as its graphdriver plugin serve
the module (docker_fixtures.py). Tests that restart dockerd, or install the
daemon as a service, use daemons of their own so that the shared pair keeps
its state. The last test removes every image and checks that nothing of
them is left, so it must stay last in the file.

Images come only from `docker import` of trees built here. Every `docker
run` passes --pull never, and every dockerd runs in its own network
namespace.
"""

import hashlib
import io
import json
import logging
import os
import statistics
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from dockerd import PLUGIN_SPEC_DIR, DockerDaemon, unix_http
from lcfs_daemon import PLUGIN_HEADERS, LcfsDaemon, fsck_command
from mounts import mount_table, unmount_under

# Fixtures lcfs, initial_status, docker and vfs_docker, one set per module.
pytest_plugins = ["docker_fixtures"]

pytestmark = [
    pytest.mark.docker,
    pytest.mark.timeout(900),
    pytest.mark.skipif(os.geteuid() != 0, reason="dockerd and FUSE mounts need root"),
]

log = logging.getLogger(__name__)

RUN = ("run", "--pull", "never", "--network", "none")
DATA_USED = "Data Space Used (bytes)"
MiB = 1024 * 1024
GiB = 1024 * MiB

BUSYBOX_IMAGE = "lcfs-it/busybox:1"
BIG_IMAGE = "lcfs-it/big-commit:1"
BIG_CONTAINER = "lcfs-it-big"
BIG_FILE_MIB = 1024


def container_layers(docker: DockerDaemon, container: str) -> tuple[str, str]:
    """Return the driver's (layer id, init layer id) of a container."""
    full_id = docker.docker("inspect", "--format", "{{.Id}}", container).stdout.strip()
    record = (
        docker.data_root / "image" / docker.storage_driver / "layerdb" / "mounts" / full_id
    )
    mount_id = (record / "mount-id").read_text().strip()
    init_id = (record / "init-id").read_text().strip()
    return mount_id, init_id


def data_used(lcfs: LcfsDaemon) -> int:
    return int(lcfs.status()[DATA_USED])


@pytest.fixture(scope="module")
def busybox_image(docker, busybox_tar):
    docker.docker("import", str(busybox_tar), BUSYBOX_IMAGE)
    return BUSYBOX_IMAGE


# --- commit without copying -------------------------------------------------


@pytest.fixture(scope="module")
def big_commit(docker, lcfs, busybox_image) -> dict:
    """Commit a container that wrote 1 GiB of random data; return the figures."""
    write = (
        f"dd if=/dev/urandom of=/big bs=1M count={BIG_FILE_MIB} status=none"
        " && sha256sum /big | cut -d' ' -f1"
    )
    started = time.monotonic()
    result = docker.docker(*RUN, "--name", BIG_CONTAINER, busybox_image, "sh", "-c", write)
    write_seconds = time.monotonic() - started
    before = data_used(lcfs)
    started = time.monotonic()
    docker.docker("commit", BIG_CONTAINER, BIG_IMAGE)
    commit_seconds = time.monotonic() - started
    after = data_used(lcfs)
    figures = {
        "sha256": result.stdout.strip(),
        "write_seconds": write_seconds,
        "commit_seconds": commit_seconds,
        "growth_bytes": after - before,
        "used_before_commit": before,
    }
    log.info("commit of %d MiB: %s", BIG_FILE_MIB, figures)
    return figures


# NOTE: dockerd streams Diff into ApplyDiff (moby's CommitImage registers the
# layer from the Diff response body while it is still arriving), and the
# store takes a file by reference only from the layer whose Diff has ended,
# so with real dockerd every commit copies its data.
@pytest.mark.xfail(
    strict=True,
    reason="the store maps blocks only from a Diff that has finished, and "
    "dockerd's commit applies the Diff while it still streams",
)
def test_commit_adds_under_one_percent(big_commit):
    growth = big_commit["growth_bytes"]
    assert growth < BIG_FILE_MIB * MiB // 100, f"commit grew the device by {growth} bytes"


def test_commit_time_recorded(big_commit):
    # A commit reads the 1 GiB twice (Diff and the comparison in ApplyDiff);
    # a minute is far above what it takes on two cores.
    assert big_commit["commit_seconds"] < 60, big_commit


class HashingReader(io.RawIOBase):
    """A readable stream that passes another one through and hashes what it reads."""

    def __init__(self, stream):
        self.stream = stream
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.stream.read(len(buffer))
        self.digest.update(data)
        buffer[: len(data)] = data
        return len(data)


def file_digest(stream) -> str:
    digest = hashlib.sha256()
    while chunk := stream.read(MiB):
        digest.update(chunk)
    return digest.hexdigest()


def saved_layer_digests(archive: Path) -> tuple[list[str], dict[str, str]]:
    """Read a `docker save` archive in one pass.

    Returns the sha256 digest of every layer tar, and the sha256 of every
    regular file in those layers by path.
    """
    layer_digests: list[str] = []
    file_digests: dict[str, str] = {}
    with tarfile.open(archive) as outer:
        for member in outer:
            if not member.name.endswith("/layer.tar") or not member.isfile():
                continue
            hashing = HashingReader(outer.extractfile(member))
            buffered = io.BufferedReader(hashing, MiB)
            with tarfile.open(fileobj=buffered, mode="r|") as layer:
                for entry in layer:
                    if entry.isfile():
                        path = entry.name.removeprefix("./")
                        file_digests[path] = file_digest(layer.extractfile(entry))
            while buffered.read(MiB):
                pass
            layer_digests.append("sha256:" + hashing.digest.hexdigest())
    return layer_digests, file_digests


def test_commit_save_is_exact(docker, big_commit, tmp_path):
    archive = tmp_path / "big.tar"
    docker.docker("save", "-o", str(archive), BIG_IMAGE)
    layer_digests, file_digests = saved_layer_digests(archive)
    diff_ids = json.loads(
        docker.docker(
            "image", "inspect", "--format", "{{json .RootFS.Layers}}", BIG_IMAGE
        ).stdout
    )
    # dockerd rebuilds each layer tar from its tar-split and the files under
    # the layer's directory, so the digest matches only if every byte does.
    assert sorted(layer_digests) == sorted(diff_ids)
    assert file_digests["big"] == big_commit["sha256"]


def test_committed_data_outlives_container(docker, big_commit):
    docker.docker("rm", BIG_CONTAINER)
    result = docker.docker(
        *RUN, "--rm", BIG_IMAGE, "sh", "-c", "sha256sum /big | cut -d' ' -f1"
    )
    assert result.stdout.strip() == big_commit["sha256"]


# --- Diff, Changes and DiffSize cost against the image size ---------------------

FILES_PER_DIRECTORY = 1000
SMALL_IMAGE_FILES = 1_000
LARGE_IMAGE_FILES = 100_000
CHANGED_FILES = 10
TIMING_ROUNDS = 5


def write_many_files_tar(path: Path, busybox_tree: Path, count: int) -> Path:
    """Write an image tar: the busybox tree plus ``count`` small files.

    The files are /data/dNNN/fNNN, 1,000 to a directory, so the files a
    container changes sit in directories of the same size in every image.
    """
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        archive.add(busybox_tree, arcname=".")
        directory = tarfile.TarInfo("./data")
        directory.type = tarfile.DIRTYPE
        directory.mode = 0o755
        archive.addfile(directory)
        for index in range(count):
            group, number = divmod(index, FILES_PER_DIRECTORY)
            if number == 0:
                subdirectory = tarfile.TarInfo(f"./data/d{group:03d}")
                subdirectory.type = tarfile.DIRTYPE
                subdirectory.mode = 0o755
                archive.addfile(subdirectory)
            data = f"file {index}\n".encode()
            member = tarfile.TarInfo(f"./data/d{group:03d}/f{number:03d}")
            member.size = len(data)
            member.mode = 0o644
            archive.addfile(member, io.BytesIO(data))
    return path


def change_script() -> str:
    """A script that appends to CHANGED_FILES files spread over the first directory."""
    step = FILES_PER_DIRECTORY // CHANGED_FILES
    paths = " ".join(f"/data/d000/f{n:03d}" for n in range(0, FILES_PER_DIRECTORY, step))
    return f"for f in {paths}; do echo changed >> $f; done"


def time_call(function, rounds: int = TIMING_ROUNDS) -> float:
    """Return the median wall time of ``rounds`` calls of ``function``, in seconds."""
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def plugin_stream(lcfs: LcfsDaemon, name: str, payload: dict) -> bytes:
    """Send a plugin call whose reply is a raw stream (Diff) and return the body."""
    status, body = unix_http(
        lcfs.socket_path, "POST", f"/{name}", json.dumps(payload).encode(), PLUGIN_HEADERS
    )
    assert status == 200, body[:300]
    return body


def measure_diff_calls(docker, lcfs, tmp_path, busybox_tree, count: int) -> dict:
    """Import an image of ``count`` files, change 10 of them in a container, and
    time the driver's Changes, DiffSize and Diff of that container."""
    tar = write_many_files_tar(tmp_path / f"files-{count}.tar", busybox_tree, count)
    image = f"lcfs-it/files:{count}"
    container = f"lcfs-it-files-{count}"
    started = time.monotonic()
    docker.docker("import", str(tar), image)
    import_seconds = time.monotonic() - started
    tar.unlink()
    docker.docker(*RUN, "--name", container, image, "sh", "-c", change_script())
    layer, init = container_layers(docker, container)

    request = {"ID": layer, "Parent": init}
    changes = lcfs.call("GraphDriver.Changes", request)["Changes"]
    diff = plugin_stream(lcfs, "GraphDriver.Diff", request)
    figures = {
        "files": count,
        "import_seconds": import_seconds,
        "changes": time_call(lambda: lcfs.call("GraphDriver.Changes", request)),
        "diff_size": time_call(lambda: lcfs.call("GraphDriver.DiffSize", request)),
        "diff": time_call(lambda: plugin_stream(lcfs, "GraphDriver.Diff", request)),
        "docker_diff": time_call(lambda: docker.docker("diff", container)),
        "changed_paths": sorted(change["Path"] for change in changes),
        "diff_members": sorted(
            member.name for member in tarfile.open(fileobj=io.BytesIO(diff))
        ),
    }
    docker.docker("rm", container)

    log.info(
        "image of %d files: import %.1f s, Changes %.4f s, DiffSize %.4f s, "
        "Diff %.4f s, docker diff %.4f s",
        count, import_seconds, figures["changes"], figures["diff_size"],
        figures["diff"], figures["docker_diff"],
    )  # fmt: skip
    return figures


@pytest.fixture(scope="module")
def diff_timings(docker, lcfs, busybox_image, busybox_tree, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("many-files")
    small = measure_diff_calls(docker, lcfs, tmp_path, busybox_tree, SMALL_IMAGE_FILES)
    large = measure_diff_calls(docker, lcfs, tmp_path, busybox_tree, LARGE_IMAGE_FILES)
    return small, large


def test_diff_lists_only_changed_files(diff_timings):
    step = FILES_PER_DIRECTORY // CHANGED_FILES
    changed = [f"/data/d000/f{n:03d}" for n in range(0, FILES_PER_DIRECTORY, step)]
    directories = {"/data", "/data/d000"}
    for figures in diff_timings:
        listed = set(figures["changed_paths"])
        assert set(changed) <= listed, figures["files"]
        assert listed - set(changed) <= directories, figures["files"]
        members = {"/" + name for name in figures["diff_members"]}
        assert set(changed) <= members, figures["files"]
        assert members - set(changed) <= directories, figures["files"]


@pytest.mark.parametrize("call", ["changes", "diff_size", "diff", "docker_diff"])
def test_diff_cost_independent_of_image_size(diff_timings, call):
    small, large = diff_timings
    # 100 times the files must not cost more than twice the time, plus 20 ms
    # for scheduling noise on a shared two-core machine.
    assert large[call] <= 2 * small[call] + 0.02, (small[call], large[call])
