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
import shutil
import signal
import socket
import stat
import statistics
import subprocess
import tarfile
import time
from fnmatch import fnmatch
from pathlib import Path

import pytest
from dockerd import DOCKER, DockerDaemon, terminate, unix_http
from lcfs_daemon import (
    PLUGIN_HEADERS,
    LcfsDaemon,
    PluginError,
    fsck_command,
    lcfs_command,
)
from mounts import mount_table, remove_tree, unmount_under

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
        docker.data_root
        / "image"
        / docker.storage_driver
        / "layerdb"
        / "mounts"
        / full_id
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
    result = docker.docker(
        *RUN, "--name", BIG_CONTAINER, busybox_image, "sh", "-c", write
    )
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


def test_commit_adds_under_one_percent(big_commit):
    growth = big_commit["growth_bytes"]
    assert growth < BIG_FILE_MIB * MiB // 100, (
        f"commit grew the device by {growth} bytes"
    )


def test_commit_time_under_a_minute(big_commit):
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


# docker commit --pause=false lets the container write a file while dockerd
# streams the Diff into ApplyDiff. The test below makes that write happen
# at a known point, through plugin calls: after ApplyDiff has compared the
# first part of the file with the container layer, and before the rest of
# the tar arrives.
RACE_FILE_MIB = 8
# MiB of file data sent before the write. ApplyDiff compares the file in
# 1 MiB pieces, and it reads one tar record past a piece before comparing
# it, so the last MiB sent stays unread until more data arrives.
RACE_SENT_MIB = 4
RACE_WRITTEN_MIB = 2


def daemon_read_bytes(pid: int) -> int:
    """Return the bytes a process has read with read(2) and pread(2) (rchar).

    Socket receives are not counted, so for the daemon during ApplyDiff
    this is what it read from the store to compare the tar with.
    """
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError(f"no rchar in /proc/{pid}/io")


def send_chunked(sock, data: bytes) -> None:
    for start in range(0, len(data), MiB):
        piece = data[start : start + MiB]
        sock.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")


@pytest.fixture
def mounted_lcfs(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("race")
    daemon = LcfsDaemon(workdir / "lcfs", size="1G", mountpoint=workdir / "mnt")
    daemon.start()
    yield daemon
    daemon.stop()
    unmount_under(workdir)


# `docker commit --pause=false`: the container keeps writing while ApplyDiff
# runs. The new layer must contain what the Diff stream contained, not the
# later write.
def test_commit_keeps_what_diff_sent(mounted_lcfs):
    lcfs = mounted_lcfs
    lcfs.call("GraphDriver.Create", {"ID": "image"})
    lcfs.call("GraphDriver.CreateReadWrite", {"ID": "ctr-init", "Parent": "image"})
    lcfs.call("GraphDriver.CreateReadWrite", {"ID": "ctr", "Parent": "ctr-init"})
    lcfs.call("GraphDriver.Create", {"ID": "committed", "Parent": "image"})
    original = os.urandom(RACE_FILE_MIB * MiB)
    (lcfs.mountpoint / "ctr" / "big").write_bytes(original)
    diff = plugin_stream(lcfs, "GraphDriver.Diff", {"ID": "ctr", "Parent": "ctr-init"})
    with tarfile.open(fileobj=io.BytesIO(diff)) as archive:
        data_offset = archive.getmember("big").offset_data
    split = data_offset + RACE_SENT_MIB * MiB

    with socket.socket(socket.AF_UNIX) as apply:
        apply.connect(str(lcfs.socket_path))
        apply.sendall(
            b"POST /GraphDriver.ApplyDiff?id=committed&parent=image HTTP/1.1\r\n"
            b"Host: plugin\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        before = daemon_read_bytes(lcfs.process.pid)
        send_chunked(apply, diff[:split])
        compared = (RACE_SENT_MIB - 1) * MiB
        deadline = time.monotonic() + 60
        while daemon_read_bytes(lcfs.process.pid) < before + compared:
            if time.monotonic() > deadline:
                pytest.fail("ApplyDiff compared less than the data sent within 60 s")
            time.sleep(0.05)
        with open(lcfs.mountpoint / "ctr" / "big", "r+b") as container_file:
            container_file.write(os.urandom(RACE_WRITTEN_MIB * MiB))
            container_file.flush()
            os.fsync(container_file.fileno())
        send_chunked(apply, diff[split:])
        apply.sendall(b"0\r\n\r\n")
        reply = apply.makefile("rb").read()
    if b" 200 OK" not in reply.split(b"\r\n", 1)[0]:
        pytest.fail(f"ApplyDiff failed: {reply[:300]!r}")
    stored = (lcfs.mountpoint / "committed" / "big").read_bytes()
    # Digests, not the bytes: pytest's explanation of two unequal 8 MiB
    # values runs difflib over them for many minutes.
    first_difference = next(
        (
            i
            for i in range(0, len(original), 4096)
            if stored[i : i + 4096] != original[i : i + 4096]
        ),
        None,
    )
    assert hashlib.sha256(stored).hexdigest() == hashlib.sha256(original).hexdigest(), (
        f"the committed file differs from the tar from offset {first_difference}"
    )


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
    paths = " ".join(
        f"/data/d000/f{n:03d}" for n in range(0, FILES_PER_DIRECTORY, step)
    )
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
        lcfs.socket_path,
        "POST",
        f"/{name}",
        json.dumps(payload).encode(),
        PLUGIN_HEADERS,
    )
    assert status == 200, body[:300]
    return body


def tar_member_names(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return sorted(archive.getnames())


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
        "diff_members": tar_member_names(diff),
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


# --- clean stop: Cleanup unmounts, Init mounts again ---------------------------------

STOP_CYCLES = 20
FUSE_TYPE = "fuse.lcfs"


def lcfs_mounts_under(directory: Path) -> list[str]:
    """Return the lcfs FUSE mount points at or below ``directory``."""
    top = os.path.realpath(directory)
    return [
        point
        for point, fstype in mount_table()
        if fstype == FUSE_TYPE and (point == top or point.startswith(top + "/"))
    ]


def stop_keeping_data(docker: DockerDaemon) -> int:
    """Stop dockerd with SIGTERM as a service manager does, keeping its data root."""
    code = terminate(docker.process, 30, f"dockerd in {docker.workdir}")
    docker.process = None
    return code


@pytest.fixture
def cycling(tmp_path_factory):
    # A short directory name: containerd's sockets under the exec root must
    # stay within the 104-byte limit of a unix socket path.
    workdir = tmp_path_factory.mktemp("cycle")
    lcfs = LcfsDaemon(workdir / "lcfs", size="2G").start()
    docker = DockerDaemon(workdir / "dockerd", plugin_socket=lcfs.socket_path)
    yield lcfs, docker
    docker.stop()
    lcfs.stop()
    unmount_under(lcfs.workdir)


def test_dockerd_restarts_leave_one_mount(cycling, busybox_tar):
    lcfs, docker = cycling
    while_running, after_stop, exit_codes = [], [], []
    for cycle in range(STOP_CYCLES):
        docker.start()
        if cycle == 0:
            docker.docker("import", str(busybox_tar), BUSYBOX_IMAGE)
        while_running.append(lcfs_mounts_under(docker.data_root))
        exit_codes.append(stop_keeping_data(docker))
        after_stop.append(lcfs_mounts_under(docker.data_root))
    home = str(docker.driver_home)
    assert while_running == [[home]] * STOP_CYCLES
    assert after_stop == [[]] * STOP_CYCLES
    assert exit_codes == [0] * STOP_CYCLES
    assert lcfs.process.poll() is None, lcfs.log_tail()

    docker.start()
    result = docker.docker(*RUN, "--rm", BUSYBOX_IMAGE, "cat", "/etc/passwd")
    assert result.stdout.startswith("root:x:0:0:")
    assert lcfs.log_tail().count("Traceback") == 0


# --- install as a service, and start-up time ------------------------------------

SERVICE_LAYERS = 10_000
LAYER_CHAIN_DEPTH = 10
START_ROUNDS = 5


def run_lcfs(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [lcfs_command(), *args], capture_output=True, text=True, check=False
    )


def test_install_writes_unit_and_spec(tmp_path):
    result = run_lcfs(
        "install", "--root", str(tmp_path), "--device", "/srv/lcfs.img",
        "--size", "16G", "--command", "/opt/lcfs/bin/lcfs",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    unit = (tmp_path / "etc/systemd/system/lcfs.service").read_text()
    spec = (tmp_path / "etc/docker/plugins/lcfs.spec").read_text()
    lines = unit.splitlines()
    assert "Before=docker.service" in lines
    assert "WantedBy=docker.service multi-user.target" in lines
    assert "Type=simple" in lines
    assert "KillSignal=SIGTERM" in lines
    assert (
        "ExecStart=/opt/lcfs/bin/lcfs daemon --device /srv/lcfs.img "
        "--socket /run/docker/plugins/lcfs.sock --size 17179869184 "
        "--stop-timeout 30 --log-level info"
    ) in lines
    assert spec == "unix:///run/docker/plugins/lcfs.sock\n"
    written = sorted(
        str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()
    )
    assert written == [
        "etc/docker/plugins/lcfs.spec",
        "etc/systemd/system/lcfs.service",
        "var/lib/lcfs/install.json",
    ]


def test_install_passes_fuse_options(tmp_path):
    result = run_lcfs(
        "install", "--root", str(tmp_path), "--command", "/opt/lcfs/bin/lcfs",
        "--share-unchanged", "--read-ahead-kb", "512", "--direct-io", "never",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    unit = (tmp_path / "etc/systemd/system/lcfs.service").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    # The default --direct-io is left out; the others follow the log level.
    assert exec_start.endswith(
        "--log-level info --read-ahead-kb 512 --share-unchanged"
    ), exec_start
    result = run_lcfs(
        "install", "--root", str(tmp_path), "--command", "/opt/lcfs/bin/lcfs",
        "--direct-io", "write-only", "--force",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    unit = (tmp_path / "etc/systemd/system/lcfs.service").read_text()
    assert "--direct-io write-only" in unit


@pytest.mark.skipif(
    not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed"
)
def test_install_unit_passes_systemd_analyze(tmp_path):
    # verify checks that ExecStart's program exists, so the real one is used.
    assert run_lcfs("install", "--root", str(tmp_path)).returncode == 0
    unit = tmp_path / "etc/systemd/system/lcfs.service"
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "lcfs.service" not in result.stderr, result.stderr


def test_uninstall_removes_what_install_wrote(tmp_path):
    (tmp_path / "etc/docker/plugins").mkdir(parents=True)
    (tmp_path / "etc/docker/plugins/other.spec").write_text("unix:///x.sock\n")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert run_lcfs("install", "--root", str(tmp_path)).returncode == 0
    again = run_lcfs("install", "--root", str(tmp_path))
    result = run_lcfs("uninstall", "--root", str(tmp_path))
    assert again.returncode == 2
    assert "installed already" in again.stderr
    assert result.returncode == 0, result.stderr
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_uninstall_after_forced_reinstall(tmp_path):
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    first = run_lcfs(
        "install", "--root", str(tmp_path), "--socket", "/run/lcfs/first.sock"
    )
    assert first.returncode == 0, first.stderr
    again = run_lcfs("install", "--root", str(tmp_path), "--force")
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "etc/docker/plugins/first.spec").exists()
    assert (tmp_path / "etc/docker/plugins/lcfs.spec").exists()

    result = run_lcfs("uninstall", "--root", str(tmp_path))
    assert result.returncode == 0, result.stderr
    # The spec file and directories of the first install go too.
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_install_errors_name_root(tmp_path):
    assert run_lcfs("install", "--root", str(tmp_path)).returncode == 0
    again = run_lcfs("install", "--root", str(tmp_path))
    assert again.returncode == 2
    assert f"run 'lcfs uninstall --root {tmp_path}' first" in again.stderr

    wants = tmp_path / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir()
    (wants / "lcfs.service").symlink_to("/etc/systemd/system/lcfs.service")
    result = run_lcfs("uninstall", "--root", str(tmp_path))
    assert result.returncode == 2
    assert f"'systemctl --root {tmp_path} disable lcfs.service'" in result.stderr


def test_uninstall_keeps_edited_file(tmp_path):
    assert run_lcfs("install", "--root", str(tmp_path)).returncode == 0
    spec = tmp_path / "etc/docker/plugins/lcfs.spec"
    spec.write_text("unix:///elsewhere.sock\n")
    result = run_lcfs("uninstall", "--root", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert spec.read_text() == "unix:///elsewhere.sock\n"
    assert not (tmp_path / "etc/systemd/system/lcfs.service").exists()


@pytest.mark.parametrize("command", [["daemon"], ["install", "--root"]])
def test_negative_read_ahead_is_usage_error(tmp_path, command):
    if command[-1] == "--root":
        command = [*command, str(tmp_path)]
    result = run_lcfs(*command, "--read-ahead-kb", "-5")
    assert result.returncode == 2
    assert "invalid size in KiB '-5'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "etc").exists()


def test_uninstall_refuses_enabled_unit(tmp_path):
    assert run_lcfs("install", "--root", str(tmp_path)).returncode == 0
    wants = tmp_path / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir()
    (wants / "lcfs.service").symlink_to("/etc/systemd/system/lcfs.service")
    result = run_lcfs("uninstall", "--root", str(tmp_path))
    assert result.returncode == 2
    assert "disable lcfs.service' first" in result.stderr
    assert (tmp_path / "etc/systemd/system/lcfs.service").exists()


def build_many_layers(device: Path, home: Path) -> None:
    """Format ``device`` and fill it with SERVICE_LAYERS layers through the store API.

    Chains of LAYER_CHAIN_DEPTH layers, each layer adding a file, as images
    sharing nothing would. Docker's layer store under ``home``'s parent names
    every layer, as it would after dockerd registered them, so the start-up
    check for orphans reads 10,000 cache-id files.
    """
    from lcfs.store import Store

    Store.mkfs(str(device), size=4 * GiB)
    layerdb = home.parent / "image" / home.name / "layerdb" / "sha256"
    (home.parent / "buildkit").mkdir(parents=True)
    store = Store.open(str(device))
    try:
        for chain in range(SERVICE_LAYERS // LAYER_CHAIN_DEPTH):
            parent = None
            for depth in range(LAYER_CHAIN_DEPTH):
                layer_id = hashlib.sha256(f"{chain}/{depth}".encode()).hexdigest()
                layer = store.create_layer(layer_id, parent)
                attr = store.mknod(
                    layer.number,
                    1,
                    f"file{depth}".encode(),
                    stat.S_IFREG | 0o644,
                    0,
                    0,
                    0,
                )
                store.write(layer.number, attr.ino, 0, b"layer %d\n" % depth)
                record = layerdb / hashlib.sha256(layer_id.encode()).hexdigest()
                record.mkdir(parents=True)
                (record / "cache-id").write_text(layer_id)
                parent = layer_id
            store.commit()
        store.set_meta("driver.home", str(home).encode())
        store.commit()
    finally:
        store.close()


def time_daemon_start(lcfs: LcfsDaemon, home: Path) -> float:
    """Start the daemon and return the seconds from exec to its reply to Activate.

    The daemon mounts at the Home recorded in the store before it listens,
    as when it restarts under a running dockerd. It is stopped again before
    this returns.
    """
    started = time.monotonic()
    with open(lcfs.log_path, "ab") as log_file:
        lcfs.process = subprocess.Popen(
            lcfs.command(),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        while True:
            assert lcfs.process.poll() is None, lcfs.log_tail()
            try:
                lcfs.call("Plugin.Activate", timeout=5)
                break
            except (OSError, PluginError):
                pass
            assert time.monotonic() < started + 30, lcfs.log_tail()
            time.sleep(0.005)
        elapsed = time.monotonic() - started
        assert lcfs_mounts_under(home) == [str(home)]
    finally:
        code = lcfs.stop()
    assert code == 0, lcfs.log_tail()
    return elapsed


@pytest.fixture(scope="module")
def many_layers(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("start")
    lcfs = LcfsDaemon(workdir / "lcfs")
    lcfs.workdir.mkdir()
    home = workdir / "docker" / "lcfs"
    build_many_layers(lcfs.device, home)
    # A running dockerd bind-mounts its data root over itself, and the daemon
    # mounts at the recorded Home at start only then.
    subprocess.run(["mount", "--bind", home.parent, home.parent], check=True)
    yield lcfs, home
    lcfs.stop()
    unmount_under(workdir)


def test_daemon_start_with_many_layers(many_layers):
    lcfs, home = many_layers
    times = [time_daemon_start(lcfs, home) for _ in range(START_ROUNDS)]
    log.info("daemon start with %d layers: %s s", SERVICE_LAYERS, times)
    assert f"opened {lcfs.device}: {SERVICE_LAYERS} layers" in lcfs.log_tail()
    assert "WARNING" not in lcfs.log_tail()
    assert statistics.median(times) < 1.0, times


# --- managed (V2) plugin --------------------------------------------------------

MANAGED_PLUGIN = "lcfs-managed-test"
# Upper bound for the bundle's root filesystem.
BUNDLE_LIMIT = 60 * MiB


@pytest.fixture(scope="module")
def plugin_bundle(tmp_path_factory) -> Path:
    import rootfs

    outdir = tmp_path_factory.mktemp("bundle") / "lcfs-plugin"
    result = run_lcfs(
        "plugin-bundle", str(outdir), "--cache", str(rootfs.cache_dir() / "plugin-debs")
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return outdir


def test_plugin_bundle_is_small(plugin_bundle):
    from lcfs.bundle import directory_size

    size = directory_size(plugin_bundle / "rootfs")
    log.info("plugin bundle rootfs: %.1f MiB", size / MiB)
    assert size < BUNDLE_LIMIT, size


def test_plugin_bundle_config(plugin_bundle):
    config = json.loads((plugin_bundle / "config.json").read_text())
    assert config["interface"] == {
        "types": ["docker.graphdriver/1.0"],
        "socket": "lcfs.sock",
    }
    assert config["linux"]["capabilities"] == ["CAP_SYS_ADMIN"]
    assert config["linux"]["devices"] == [{"path": "/dev/fuse"}]
    entrypoint = plugin_bundle / "rootfs" / config["entrypoint"][0].lstrip("/")
    assert os.access(entrypoint, os.X_OK)
    assert (plugin_bundle / "rootfs" / config["propagatedMount"].lstrip("/")).is_dir()


@pytest.fixture
def managed_docker(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("managed")
    (workdir / "data").mkdir()
    daemon = DockerDaemon(workdir / "dockerd", storage_driver="vfs")
    yield daemon, workdir / "data"
    daemon.stop()


def test_managed_plugin_serves_dockerd(plugin_bundle, managed_docker, busybox_tar):
    # dockerd needs a storage driver to create and enable a plugin, so it
    # starts on vfs first and is then restarted with the plugin as driver.
    setup, data = managed_docker
    setup.start()
    setup.docker("plugin", "create", MANAGED_PLUGIN, str(plugin_bundle))
    setup.docker("plugin", "set", MANAGED_PLUGIN, f"data.source={data}")
    setup.docker("plugin", "set", MANAGED_PLUGIN, "args=--size 2G")
    setup.docker("plugin", "enable", MANAGED_PLUGIN)
    assert stop_keeping_data(setup) == 0

    driver = f"{MANAGED_PLUGIN}:latest"
    docker = DockerDaemon(setup.workdir, storage_driver=driver)
    docker.start()
    try:
        info = docker.docker("info", "--format", "{{.Driver}}").stdout.strip()
        docker.docker("import", str(busybox_tar), BUSYBOX_IMAGE)
        result = docker.docker(*RUN, "--rm", BUSYBOX_IMAGE, "cat", "/etc/group")
        mounted = lcfs_mounts_under(docker.data_root / "plugins")
        status = dict(json.loads(docker.docker(
            "info", "--format", "{{json .DriverStatus}}"
        ).stdout))  # fmt: skip
    finally:
        code = stop_keeping_data(docker)
        # The fixture stops the first dockerd, which shares the data root
        # but not this one's exec root under /tmp.
        unmount_under(docker.exec_root)
        remove_tree(docker.exec_root)
    assert info == driver
    assert result.stdout.startswith("root:x:0:")
    # The FUSE mount appears on the host where dockerd maps the plugin's
    # propagated mount, plugins/<id>/propagated-mount/<driver>. That directory is a
    # shared mount stacked on itself, so the mount shows up once per peer.
    points = {Path(point) for point in mounted}
    assert [(p.parent.name, p.name) for p in points] == [("propagated-mount", driver)]
    assert status["Layers"] == "1"
    assert status["Docker Home"] == f"/mnt/lcfs/{driver}"
    # --size from the plugin's args setting made the new image file 2 GiB.
    assert 0 < int(status["Data Space Total (bytes)"]) < 2 * GiB
    assert code == 0
    assert lcfs_mounts_under(docker.data_root) == []
    assert (data / "lcfs.img").is_file()


# --- no leftovers ----------------------------------------------------------------

BUILD_IMAGE = "lcfs-it/buildkit:1"
IMPORT_KILLED_IMAGE = "lcfs-it/killed:1"
KILL_AFTER_BYTES = 16 * MiB
RANDOM_FILES = 32
RANDOM_FILE_SIZE = 4 * MiB


def files_under(root: Path, skip: Path | None = None) -> list[str]:
    """Return every file and directory below ``root``, relative, sorted; not
    descending into ``skip``."""
    found = []
    for directory, subdirectories, files in os.walk(root):
        here = Path(directory)
        if skip is not None and here == skip:
            subdirectories.clear()
            continue
        for name in subdirectories + files:
            found.append(str((here / name).relative_to(root)))
    return sorted(found)


@pytest.fixture(scope="module")
def random_tar(tmp_path_factory) -> Path:
    """A tar of 128 MiB of random data, which the store cannot take by reference."""
    path = tmp_path_factory.mktemp("random") / "random.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        for index in range(RANDOM_FILES):
            member = tarfile.TarInfo(f"./data/{index:02d}.bin")
            member.size = RANDOM_FILE_SIZE
            member.mode = 0o644
            archive.addfile(member, io.BytesIO(os.urandom(RANDOM_FILE_SIZE)))
    return path


@pytest.fixture(scope="module")
def buildkit_image(docker, busybox_image, tmp_path_factory):
    context = tmp_path_factory.mktemp("build")
    (context / "Dockerfile").write_text(
        f"FROM {busybox_image}\nRUN echo built > /built.txt\nCOPY Dockerfile /\n"
    )
    docker.docker(
        "build", "--network", "none", "-t", BUILD_IMAGE, str(context),
        env={"DOCKER_BUILDKIT": "1"},
    )  # fmt: skip
    return BUILD_IMAGE


def remove_all_images(docker: DockerDaemon) -> None:
    containers = docker.docker("ps", "-aq").stdout.split()
    if containers:
        docker.docker("rm", "-f", *containers)
    images = list(dict.fromkeys(docker.docker("image", "ls", "-aq").stdout.split()))
    if images:
        docker.docker("rmi", "-f", *images)
    docker.docker("builder", "prune", "-af")


# What dockerd 20.10 keeps in its data root once every image, container and
# build cache entry is gone, with "DRIVER" for the storage driver's name.
# docs/docker-leftovers.md gives the reason for each.
DOCKER_KEEPS = [
    "buildkit",
    "buildkit/*.db",
    "buildkit/content",
    "buildkit/content/ingest",
    "buildkit/executor",
    "buildkit/executor/*",
    "containerd",
    "containerd/daemon",
    "containerd/daemon/*",
    "containers",
    "image",
    "image/DRIVER",
    "image/DRIVER/distribution",
    "image/DRIVER/imagedb",
    "image/DRIVER/imagedb/content",
    "image/DRIVER/imagedb/content/sha256",
    "image/DRIVER/imagedb/metadata",
    "image/DRIVER/imagedb/metadata/sha256",
    "image/DRIVER/layerdb",
    "image/DRIVER/layerdb/mounts",
    "image/DRIVER/layerdb/sha256",
    "image/DRIVER/layerdb/tmp",
    "image/DRIVER/repositories.json",
    "DRIVER",
    "network",
    "network/files",
    "network/files/local-kv.db",
    "plugins",
    "plugins/storage",
    "plugins/storage/ingest",
    "plugins/tmp",
    "runtimes",
    "swarm",
    "tmp",
    "trust",
    "volumes",
    "volumes/backingFsBlockDev",
    "volumes/metadata.db",
]


def unexpected_docker_files(docker: DockerDaemon) -> list[str]:
    """Return the paths under dockerd's data root that DOCKER_KEEPS does not list."""
    patterns = [
        pattern.replace("DRIVER", docker.storage_driver) for pattern in DOCKER_KEEPS
    ]
    left = files_under(docker.data_root, skip=docker.driver_home)
    return [path for path in left if not any(fnmatch(path, p) for p in patterns)]


def kill_dockerd_during_import(
    docker: DockerDaemon, lcfs: LcfsDaemon, tar: Path
) -> None:
    """SIGKILL dockerd while it imports ``tar``, once the import has written data.

    dockerd dies before the rename that names the layer in its layer store,
    so it leaves a driver layer that nothing references and a
    layerdb/tmp/write-set-* directory.
    """
    before = data_used(lcfs)
    importer = subprocess.Popen(
        [DOCKER, "import", str(tar), IMPORT_KILLED_IMAGE],
        env={**os.environ, "DOCKER_HOST": docker.host},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while data_used(lcfs) < before + KILL_AFTER_BYTES:
            assert importer.poll() is None, "the import ended before the kill"
            assert time.monotonic() < deadline, "the import wrote too little in 120 s"
            time.sleep(0.05)
        containerd = int(
            (docker.exec_root / "containerd" / "containerd.pid").read_text()
        )
        docker.process.kill()
        docker.process.wait()
    finally:
        importer.wait(timeout=120)
    # The containerd that the killed dockerd started keeps running, and a new
    # dockerd times out waiting for it, so it is stopped here.
    os.kill(containerd, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{containerd}").exists():
        assert time.monotonic() < deadline, f"containerd pid {containerd} did not exit"
        time.sleep(0.1)


def test_remove_everything_leaves_nothing(
    docker, lcfs, initial_status, buildkit_image, random_tar
):
    """Must stay last: it removes every image and stops the module's daemons."""
    remove_all_images(docker)
    assert docker.docker("image", "ls", "-aq").stdout.split() == []
    status = lcfs.status()
    assert status["Layers"] == "0", status
    assert status[DATA_USED] == initial_status[DATA_USED], status
    assert os.listdir(docker.driver_home) == []
    assert unexpected_docker_files(docker) == []
    repositories = (
        docker.data_root / "image" / docker.storage_driver / "repositories.json"
    )
    assert json.loads(repositories.read_text()) == {"Repositories": {}}

    # A dockerd killed during an import leaves a layer and a write-set
    # directory behind; the restarted dockerd does not remove either.
    kill_dockerd_during_import(docker, lcfs, random_tar)
    docker.start()
    assert docker.docker("image", "ls", "-aq").stdout.split() == []
    assert lcfs.status()["Layers"] == "1"
    layerdb_tmp = docker.data_root / "image" / docker.storage_driver / "layerdb" / "tmp"
    assert [p.name.startswith("write-set-") for p in layerdb_tmp.iterdir()] == [True]

    # dockerd's Cleanup unmounts the driver home; the daemon removes its
    # socket and pid file when it stops.
    assert stop_keeping_data(docker) == 0
    assert lcfs_mounts_under(docker.data_root) == []
    assert os.listdir(docker.driver_home) == []
    assert lcfs.stop() == 0, lcfs.log_tail()
    assert sorted(os.listdir(lcfs.workdir)) == ["lcfs.img", "lcfs.log"]

    fsck = [fsck_command(), "--docker-root", str(docker.data_root), "--grace", "0"]
    repair = subprocess.run(
        [*fsck, "--repair", "--yes", str(lcfs.device)],
        capture_output=True,
        text=True,
        check=False,
    )
    check = subprocess.run(
        [*fsck, str(lcfs.device)], capture_output=True, text=True, check=False
    )
    assert repair.returncode == 1, repair.stdout + repair.stderr
    assert "is an orphan" in repair.stderr
    assert "write-set-" in repair.stderr
    assert check.returncode == 0, check.stdout + check.stderr
    assert list(layerdb_tmp.iterdir()) == []
    assert unexpected_docker_files(docker) == []
    assert "; 0 layers," in check.stdout
