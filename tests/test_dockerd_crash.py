"""Crashes under a real dockerd 20.10: SIGKILL of the lcfs daemon or of dockerd.

The lcfs daemon is killed in the middle of `docker import`, `docker commit`
and `docker rmi`, and while a container writes through FUSE. After each
kill the FUSE watchdog must have detached the dead mount, the daemon
restarts with the same device, socket and options, and its journal
recovery rolls back or finishes what the kill cut short. dockerd keeps
running (it sends no new Init to the restarted daemon) and must go on
working. At the end, with both daemons stopped, `lcfs-fsck --docker-root`
must find no layer that Docker does not reference.

A second part kills dockerd itself: while an import streams into the
plugin, and after an rmi that failed because the plugin was down. Docker
keeps no record that names such a layer (it never wrote one, or it is
deleting it), so fsck must report the layer as an orphan and one
`--repair` must remove it.

Kill points are chosen by watching the plugin's Status (layer count and
data space used) and the daemon's debug log. When a kill misses its window
(the operation ends first, or recovery finds nothing to do), the attempt is
repeated on fresh content; the assertions are never retried.

How dockerd 20.10 reacts, as these tests observe it:

- Its plugin client retries a failed call for about 15 s, but the retry
  sends what is left of the first attempt's request body. A Remove in
  flight when the daemon dies is retried with an empty body, so `docker
  rmi` fails, the image is gone from `docker image ls`, and the layers
  below the one being removed stay in Docker's layer store without an
  image. An ApplyDiff is retried with a closed body, so each retry fails.
- The layer directory that `docker rmi` renamed to
  `<chain id>-<random>-removing` stays until a clean dockerd shutdown calls
  Remove for it again.
- A SIGKILLed dockerd takes its containerd along (containerd runs with
  PR_SET_PDEATHSIG), leaving containerd's pid file behind.

Tests in the first part run in file order and share one lcfs daemon and
one dockerd. The last of them stops both, so it must stay last among them.
"""

import io
import json
import logging
import os
import re
import signal
import subprocess
import tarfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from hashlib import sha256
from pathlib import Path

import pytest
from dockerd import DockerDaemon, remove_stale_plugin_specs, terminate
from lcfs_daemon import LcfsDaemon, fsck_command, lcfs_command, running_lcfs
from mounts import mounts_under, unmount_under

from lcfs.fuse.stats import fetch_stats

pytestmark = [
    pytest.mark.docker,
    pytest.mark.timeout(600),
    pytest.mark.skipif(os.geteuid() != 0, reason="dockerd and FUSE mounts need root"),
]

log = logging.getLogger(__name__)

MiB = 1024 * 1024
DATA_USED = "Data Space Used (bytes)"
INODES_USED = "Inodes Used"
RUN = ("run", "--pull", "never", "--network", "none")

BUSYBOX_IMAGE = "lcfs-crash/busybox:1"
MINBASE_IMAGE = "lcfs-crash/minbase:1"
COMMITTED_IMAGE = "lcfs-crash/committed:1"
WRITER_CONTAINER = "lcfs-crash-writer"
SYNC_CONTAINER = "lcfs-crash-sync"

# Attempts at hitting a kill window before a test gives up.
KILL_ATTEMPTS = 3
# Seconds the FUSE watchdog may take to detach the mount of a killed daemon.
DETACH_TIMEOUT = 10
# The commit test's container writes this much random data. The commit's
# ApplyDiff compares all of it with the container's layer before it maps
# the blocks, which took 2 to 3 s on a 2-core test machine.
COMMIT_DATA_MIB = 256
# Files in each upper layer of the image that `docker rmi` removes. Removing
# one such layer took about 0.1 s on a 2-core test machine, the window for
# the kill.
FILES_PER_LAYER = 4000
UPPER_LAYERS = 3
# Seconds between the daemon logging a Remove request and the kill, so that
# the removal has been recorded in the journal before the daemon dies.
REMOVE_KILL_DELAY = 0.02
SYNCED_FILE_MIB = 32

ROLLBACK_MESSAGE = "rolling back the unfinished import into layer {}"
FINISH_REMOVE_MESSAGE = "finishing the interrupted removal of layer {}"


# --- daemons ------------------------------------------------------------------


class CrashLcfsDaemon(LcfsDaemon):
    """An lcfs daemon that logs every plugin call and can be killed and restarted.

    `extra_args` are appended to the command line at each start.
    """

    def __init__(self, workdir: str | os.PathLike):
        super().__init__(workdir)
        self.extra_args: list[str] = []

    def command(self) -> list[str]:
        return [*super().command(), "--log-level", "debug", *self.extra_args]

    def kill(self, docker: DockerDaemon) -> None:
        """SIGKILL the daemon and check that its watchdog detaches the mount at Home."""
        self.process.send_signal(signal.SIGKILL)
        self.stop()
        assert self.returncode == -signal.SIGKILL
        detached = wait_until(
            lambda: not mounts_under(docker.driver_home), DETACH_TIMEOUT
        )
        assert detached, (
            f"the mount at {docker.driver_home} of the killed daemon is still "
            f"there after {DETACH_TIMEOUT} s; end of the daemon log:\n{self.log_tail()}"
        )

    def log_offset(self) -> int:
        """Return the current size of the log, to read only what follows."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_since(self, offset: int) -> str:
        """Return what the daemon logged after `offset`."""
        with open(self.log_path, "rb") as log_file:
            log_file.seek(offset)
            return log_file.read().decode(errors="replace")


class CrashDockerDaemon(DockerDaemon):
    """A dockerd that can be killed, or stopped while keeping its data root."""

    def shut_down(self, timeout: float = 30) -> int:
        """Stop dockerd with SIGTERM (SIGKILL after `timeout` s); keep its data."""
        return terminate(self.process, timeout, f"dockerd in {self.workdir}")

    def kill(self) -> None:
        """SIGKILL dockerd and clear what keeps it from starting again.

        containerd dies with dockerd, but its pid file stays. On these
        machines pid 1 reaps orphans late, so the pid can still be a zombie
        when dockerd restarts, which then waits 60 s for a containerd that
        will never reply. The pid file is removed once its process is gone
        or a zombie, as an init that reaps at once would leave it.
        """
        containerd_pid = self._containerd_pid()
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        if containerd_pid is None:
            return
        ended = wait_until(lambda: process_ended(containerd_pid), 10)
        assert ended, f"containerd pid {containerd_pid} outlived the killed dockerd"
        (self.exec_root / "containerd" / "containerd.pid").unlink(missing_ok=True)

    def image_ids(self) -> list[str]:
        """Return the ids of the images `docker image ls` lists."""
        listed = self.docker("image", "ls", "-q", "--no-trunc").stdout.split()
        return list(dict.fromkeys(listed))

    def layerdb(self) -> Path:
        return self.data_root / "image" / self.storage_driver / "layerdb"

    def referenced_layers(self) -> set[str]:
        """Return the driver layer ids that Docker's layer store names.

        Read straight from the files Docker writes: `cache-id` of each
        image layer (including those being removed) and `mount-id` and
        `init-id` of each container.
        """
        ids = set()
        for path in self.layerdb().glob("sha256/*/cache-id"):
            ids.add(path.read_text().strip())
        for name in ("mount-id", "init-id"):
            for path in self.layerdb().glob(f"mounts/*/{name}"):
                ids.add(path.read_text().strip())
        return ids

    def removing_dirs(self) -> list[str]:
        return sorted(p.name for p in self.layerdb().glob("sha256/*-removing"))


def process_ended(pid: int) -> bool:
    """Return whether `pid` has exited (gone, or a zombie not yet reaped)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    # The state follows the command name, which is in parentheses.
    return stat_line.rpartition(")")[2].split()[0] in ("Z", "X")


def wait_until(condition: Callable[[], bool], timeout: float, interval=0.05) -> bool:
    """Poll `condition` until it is true or `timeout` seconds pass; return it."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def layer_exists(lcfs: LcfsDaemon, layer_id: str) -> bool:
    return lcfs.call("GraphDriver.Exists", {"ID": layer_id})["Exists"]


def fsync_requests(lcfs: LcfsDaemon) -> int:
    """Return how many FUSE fsync requests the running daemon has served."""
    stats = fetch_stats(str(lcfs.socket_path))
    return stats.get("fsync", {}).get("requests", 0)


def store_layers(device: Path) -> set[str]:
    """Return the ids of the layers on a device whose daemon is stopped."""
    listing = subprocess.run(
        [lcfs_command(), "layers", "--device", str(device)],
        capture_output=True,
        text=True,
        check=True,
    )
    return {line.split()[0] for line in listing.stdout.splitlines()[1:]}


def run_fsck(device: Path, docker_root: Path, *options: str) -> tuple[int, dict]:
    """Run lcfs-fsck with --json and return its exit code and its report."""
    result = subprocess.run(
        [fsck_command(), "--docker-root", str(docker_root), "--grace", "0",
         "--json", *options, str(device)],
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    log.info("lcfs-fsck %s exited %d:\n%s", options, result.returncode, result.stderr)
    assert result.stdout, f"lcfs-fsck printed no report:\n{result.stderr}"
    return result.returncode, json.loads(result.stdout)


def orphans_in(report: dict) -> list[str]:
    """Return the problems of an fsck report that name an orphaned layer."""
    return [p["problem"] for p in report["problems"] if "is an orphan" in p["problem"]]


def assert_listed_images_run(docker: DockerDaemon) -> None:
    """Run `true` in every image that dockerd lists."""
    for image in docker.image_ids():
        result = docker.docker(*RUN, "--rm", image, "true", check=False)
        assert result.returncode == 0, f"image {image}: {result.stderr}"


# --- kill points ---------------------------------------------------------------


class Background:
    """A docker command running on a thread of its own while a test watches."""

    def __init__(self, docker: DockerDaemon, *args: str):
        self._executor = ThreadPoolExecutor(max_workers=1)
        self.future: Future = self._executor.submit(docker.docker, *args, check=False)

    def done(self) -> bool:
        return self.future.done()

    def result(self, timeout: float = 300) -> subprocess.CompletedProcess:
        try:
            return self.future.result(timeout)
        finally:
            self._executor.shutdown()


def wait_for_apply(lcfs: LcfsDaemon, operation: Background, min_bytes: int) -> bool:
    """Wait until an ApplyDiff has created its layer, its first file and `min_bytes`.

    A new inode means that the import's journal intent is committed, and
    data space grows only with blocks that are written rather than mapped
    from another layer. Returns False if the operation ended first.
    """
    status = lcfs.status()
    layers, inodes = int(status["Layers"]), int(status[INODES_USED])
    used = int(status[DATA_USED])
    deadline = time.monotonic() + 120
    while not operation.done():
        status = lcfs.status()
        if (
            int(status["Layers"]) > layers
            and int(status[INODES_USED]) > inodes
            and int(status[DATA_USED]) >= used + min_bytes
        ):
            return True
        assert time.monotonic() < deadline, "the ApplyDiff wrote too little in 120 s"
        time.sleep(0.02)
    return False


def new_layer_ids(lcfs: CrashLcfsDaemon, offset: int, call: str) -> list[str]:
    """Return the layer ids of `call` requests logged after `offset`."""
    pattern = re.compile(rf"{re.escape(call)} for layer '([^']+)'")
    return pattern.findall(lcfs.log_since(offset))


def start_apply(
    lcfs: CrashLcfsDaemon,
    docker: DockerDaemon,
    command: tuple[str, ...],
    image: str,
    min_bytes: int,
) -> tuple[Background, str]:
    """Start a docker command that makes `image` with an ApplyDiff, and wait for it.

    Returns the running command and the id of the layer being applied, once
    the ApplyDiff has written `min_bytes`. A command that ends sooner is
    undone (its image removed) and run again, up to KILL_ATTEMPTS times.
    """
    for attempt in range(KILL_ATTEMPTS):
        offset = lcfs.log_offset()
        operation = Background(docker, *command)
        if wait_for_apply(lcfs, operation, min_bytes):
            return operation, new_layer_ids(lcfs, offset, "GraphDriver.ApplyDiff")[-1]
        log.warning("attempt %d: docker %s ended before the kill", attempt, command[0])
        operation.result()
        docker.docker("rmi", image)
    pytest.fail(
        f"docker {command[0]} ended before the kill in {KILL_ATTEMPTS} attempts"
    )


def kill_and_restart(lcfs: CrashLcfsDaemon, docker: DockerDaemon) -> str:
    """SIGKILL the daemon, start it again and return what it logged while starting."""
    lcfs.kill(docker)
    offset = lcfs.log_offset()
    lcfs.start()
    return lcfs.log_since(offset)


# --- image archives -------------------------------------------------------------


def tar_bytes(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for member, data in entries:
            archive.addfile(member, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def file_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    member = tarfile.TarInfo(name)
    member.size = len(data)
    member.mode = 0o644
    return member, data


def dir_member(name: str) -> tuple[tarfile.TarInfo, None]:
    member = tarfile.TarInfo(name)
    member.type = tarfile.DIRTYPE
    member.mode = 0o755
    return member, None


def busybox_base_layer(busybox_tar: Path, marker: str) -> bytes:
    """Return the busybox tar with one more file, so that no other image shares it."""
    entries = []
    with tarfile.open(busybox_tar) as source:
        for member in source:
            data = source.extractfile(member).read() if member.isfile() else None
            entries.append((member, data))
    entries.append(file_member("./etc/lcfs-image", marker.encode() + b"\n"))
    return tar_bytes(entries)


def write_image_archive(path: Path, tag: str, layers: list[bytes]) -> None:
    """Write a `docker load` archive of an image made of `layers`, base first."""
    diff_ids = [f"sha256:{sha256(layer).hexdigest()}" for layer in layers]
    config = json.dumps({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": f"layer {i}"} for i in range(len(layers))],
    }).encode()  # fmt: skip
    config_name = f"{sha256(config).hexdigest()}.json"
    layer_names = [
        f"{diff_id.removeprefix('sha256:')}/layer.tar" for diff_id in diff_ids
    ]
    manifest = [{"Config": config_name, "RepoTags": [tag], "Layers": layer_names}]
    with tarfile.open(path, "w") as archive:
        members = [*zip(layer_names, layers), (config_name, config),
                   ("manifest.json", json.dumps(manifest).encode())]  # fmt: skip
        for name, data in members:
            member, _ = file_member(name, data)
            archive.addfile(member, io.BytesIO(data))


def layered_image_archive(path: Path, busybox_tar: Path, tag: str) -> Path:
    """Write an image of a busybox base and UPPER_LAYERS layers of small files.

    The tag goes into every file, so that each archive has layers of its own.
    """
    layers = [busybox_base_layer(busybox_tar, tag)]
    for index in range(UPPER_LAYERS):
        entries = [dir_member(f"./layer{index}")]
        entries += [
            file_member(
                f"./layer{index}/file{number:05d}", f"{tag} {number}\n".encode()
            )
            for number in range(FILES_PER_LAYER)
        ]
        layers.append(tar_bytes(entries))
    write_image_archive(path, tag, layers)
    return path


# --- fixtures -------------------------------------------------------------------


@pytest.fixture(scope="module")
def lcfs(tmp_path_factory):
    with running_lcfs(CrashLcfsDaemon(tmp_path_factory.mktemp("lcfs"))) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def docker(lcfs, tmp_path_factory):
    daemon = CrashDockerDaemon(
        tmp_path_factory.mktemp("dockerd"), plugin_socket=lcfs.socket_path
    )
    daemon.start()
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def busybox_image(docker, busybox_tar):
    docker.docker("import", str(busybox_tar), BUSYBOX_IMAGE)
    return BUSYBOX_IMAGE


# --- the lcfs daemon killed under a running dockerd -----------------------------


def test_import_killed_midway(docker, lcfs, busybox_image, minbase_tar):
    before = lcfs.status()
    command = ("import", str(minbase_tar), MINBASE_IMAGE)
    importing, layer_id = start_apply(lcfs, docker, command, MINBASE_IMAGE, 32 * MiB)
    recovery_log = kill_and_restart(lcfs, docker)
    failed = importing.result()
    after = lcfs.status()

    assert failed.returncode != 0
    assert ROLLBACK_MESSAGE.format(layer_id) in recovery_log
    assert after["Layers"] == before["Layers"]
    assert after[DATA_USED] == before[DATA_USED]
    assert MINBASE_IMAGE not in docker.docker("image", "ls").stdout

    # dockerd was not restarted: it runs what it has and imports anew.
    result = docker.docker(*RUN, "--rm", busybox_image, "echo", "still here")
    assert result.stdout == "still here\n"
    docker.docker("import", str(minbase_tar), MINBASE_IMAGE)
    result = docker.docker(*RUN, "--rm", MINBASE_IMAGE, "cat", "/etc/debian_version")
    assert result.stdout.startswith("12.")
    assert_listed_images_run(docker)


@pytest.fixture(scope="module")
def writer_container(docker, busybox_image) -> str:
    """A stopped container that wrote COMMIT_DATA_MIB of random data; its sha256."""
    script = (
        f"dd if=/dev/urandom of=/big bs=1M count={COMMIT_DATA_MIB} status=none"
        " && sha256sum /big"
    )
    result = docker.docker(
        *RUN, "--name", WRITER_CONTAINER, busybox_image, "sh", "-c", script
    )
    return result.stdout.split()[0]


def test_commit_killed_midway(docker, lcfs, writer_container):
    before = lcfs.status()
    command = ("commit", WRITER_CONTAINER, COMMITTED_IMAGE)
    committing, layer_id = start_apply(lcfs, docker, command, COMMITTED_IMAGE, 0)
    recovery_log = kill_and_restart(lcfs, docker)
    failed = committing.result()
    after = lcfs.status()

    assert failed.returncode != 0
    assert ROLLBACK_MESSAGE.format(layer_id) in recovery_log
    assert after["Layers"] == before["Layers"]
    assert after[DATA_USED] == before[DATA_USED]
    assert COMMITTED_IMAGE not in docker.docker("image", "ls").stdout

    # The container's own layer is intact: committing it again works and
    # the image contains the data the container wrote.
    docker.docker("commit", WRITER_CONTAINER, COMMITTED_IMAGE)
    result = docker.docker(*RUN, "--rm", COMMITTED_IMAGE, "sha256sum", "/big")
    assert result.stdout.split()[0] == writer_container
    assert_listed_images_run(docker)


def test_rmi_killed_midway(docker, lcfs, busybox_image, busybox_tar, tmp_path):
    for attempt in range(KILL_ATTEMPTS):
        tag = f"lcfs-crash/layered:{attempt}"
        archive = layered_image_archive(tmp_path / f"{attempt}.tar", busybox_tar, tag)
        docker.docker("load", "-i", str(archive))
        cache_ids = [
            docker.layer_cache_id(chain) for chain in docker.image_chain_ids(tag)
        ]
        offset = lcfs.log_offset()
        removing = Background(docker, "rmi", tag)

        # Layers go top first: kill once the second one is being removed.
        def second_remove_or_end(offset=offset, removing=removing) -> bool:
            removes = new_layer_ids(lcfs, offset, "GraphDriver.Remove")
            return len(removes) >= 2 or removing.done()

        started = wait_until(second_remove_or_end, 60, interval=0.002)
        assert started, "dockerd sent no second Remove within 60 s"
        if removing.done():
            log.warning("attempt %d: the rmi ended before the kill", attempt)
            continue
        time.sleep(REMOVE_KILL_DELAY)
        recovered = kill_and_restart(lcfs, docker)
        outcome = removing.result()
        interrupted = [
            i for i in cache_ids if FINISH_REMOVE_MESSAGE.format(i) in recovered
        ]
        if interrupted:
            break
        log.warning(
            "attempt %d: the kill hit no removal in progress; rmi exited %d: %s",
            attempt,
            outcome.returncode,
            outcome.stderr.strip(),
        )
    else:
        pytest.fail(f"no kill hit a removal in progress in {KILL_ATTEMPTS} attempts")

    log.info(
        "attempt %d killed the daemon while it removed layer %s", attempt, interrupted
    )
    # The second layer from the top was being removed. dockerd retries that
    # Remove with an empty body, so the rmi fails there.
    assert interrupted == [cache_ids[-2]]
    assert outcome.returncode != 0
    assert tag not in docker.docker("image", "ls").stdout
    assert not layer_exists(lcfs, cache_ids[-1])
    assert not layer_exists(lcfs, cache_ids[-2])
    # The layers below stay in the store, and Docker's layer store still
    # names them, so they are no orphans.
    referenced = docker.referenced_layers()
    for lower in cache_ids[:-2]:
        assert layer_exists(lcfs, lower), lower
        assert lower in referenced, lower

    result = docker.docker(*RUN, "--rm", busybox_image, "echo", "still here")
    assert result.stdout == "still here\n"
    # Loading the image again reuses the layers below and adds the others.
    docker.docker("load", "-i", str(archive))
    script = "cat /etc/lcfs-image; for d in /layer*; do ls $d | wc -l; done"
    result = docker.docker(*RUN, "--rm", tag, "sh", "-c", script)
    assert result.stdout.split() == [tag] + [str(FILES_PER_LAYER)] * UPPER_LAYERS
    assert_listed_images_run(docker)


def test_fsynced_file_survives_kill(docker, lcfs, busybox_image, tmp_path):
    # The container copies a file into its layer, fsyncs it, signals through
    # a bind mount and keeps writing. The daemon dies right after the
    # signal, well within the one-second interval of its timed commits, so
    # only the commit that fsync makes keeps the file.
    exchange = tmp_path / "exchange"
    exchange.mkdir()
    data = os.urandom(SYNCED_FILE_MIB * MiB)
    (exchange / "data.bin").write_bytes(data)
    script = (
        "cp /exchange/data.bin /data.bin && sync /data.bin && touch /exchange/synced"
        " && while dd if=/dev/urandom of=/scratch.bin bs=64k count=16 2>/dev/null;"
        " do :; done"
    )
    fsyncs_before = fsync_requests(lcfs)
    docker.docker(
        *RUN, "-d", "--name", SYNC_CONTAINER, "-v", f"{exchange}:/exchange",
        busybox_image, "sh", "-c", script,
    )  # fmt: skip
    synced = wait_until(lambda: (exchange / "synced").exists(), 120, interval=0.001)
    assert synced, docker.docker("logs", SYNC_CONTAINER).stderr
    fsyncs = fsync_requests(lcfs)
    lcfs.kill(docker)
    lcfs.start()

    assert fsyncs > fsyncs_before
    copy = tmp_path / "copy.bin"
    docker.docker("cp", f"{SYNC_CONTAINER}:/data.bin", str(copy))
    assert copy.stat().st_size == len(data)
    assert sha256(copy.read_bytes()).hexdigest() == sha256(data).hexdigest()
    docker.docker("rm", "--force", SYNC_CONTAINER)
    assert_listed_images_run(docker)


# Leftovers that the last shared-daemon test found, for the test after it.
leftovers: dict[str, list[str]] = {}


def test_no_orphans_after_crashes(docker, lcfs):
    """Stop dockerd and the daemon, then check the store against Docker's records.

    Must stay the last test that uses the shared daemons: it stops them.
    """
    assert docker.shut_down() == 0, docker.log_tail()
    assert lcfs.stop() == 0, lcfs.log_tail()
    leftovers["removing"] = docker.removing_dirs()
    code, report = run_fsck(lcfs.device, docker.data_root)
    orphans = orphans_in(report)
    if code != 0:
        # The fallback: whatever the crashes left, --repair removes it.
        repair_code, repaired = run_fsck(
            lcfs.device, docker.data_root, "--repair", "--yes"
        )
        assert repair_code == 1, repaired
        assert repaired["left"] == 0, repaired
        code, report = run_fsck(lcfs.device, docker.data_root)
    assert code == 0, report
    assert store_layers(lcfs.device) == docker.referenced_layers()
    # The daemon's recovery and dockerd's own clean-up left no layer that
    # Docker does not know.
    assert orphans == []


def test_shutdown_leaves_no_removing_dirs():
    if "removing" not in leftovers:
        pytest.skip("test_no_orphans_after_crashes did not run")
    assert leftovers["removing"] == []


# --- dockerd killed while an import streams into the plugin ----------------------


@pytest.fixture
def own_daemons(tmp_path):
    """An lcfs daemon and a dockerd of this test's own."""
    remove_stale_plugin_specs()
    lcfs = CrashLcfsDaemon(tmp_path / "lcfs")
    docker = CrashDockerDaemon(tmp_path / "dockerd", plugin_socket=lcfs.socket_path)
    try:
        lcfs.start()
        docker.start()
        yield lcfs, docker
    finally:
        docker.stop()
        lcfs.stop()
        unmount_under(tmp_path)


def test_dockerd_killed_during_import(own_daemons, busybox_tar, minbase_tar):
    lcfs, docker = own_daemons
    docker.docker("import", str(busybox_tar), BUSYBOX_IMAGE)
    offset = lcfs.log_offset()
    command = ("import", str(minbase_tar), MINBASE_IMAGE)
    importing, layer_id = start_apply(lcfs, docker, command, MINBASE_IMAGE, 32 * MiB)
    docker.kill()
    failed = importing.result()
    assert failed.returncode != 0

    # The body broke off, so the daemon rolls back what it wrote and keeps
    # the empty layer that Create made: dockerd would Remove it on an
    # ordinary failure, but a dead dockerd never does.
    rolled_back = f"rolling back the import into layer {layer_id}"
    assert wait_until(lambda: rolled_back in lcfs.log_since(offset), 60)
    assert layer_exists(lcfs, layer_id)

    # Restarted with no grace period, the daemon logs the orphan and keeps it.
    lcfs.stop()
    lcfs.extra_args = ["--grace", "0"]
    restart = lcfs.log_offset()
    lcfs.start()
    assert f"layer {layer_id} is not referenced under" in lcfs.log_since(restart)
    assert layer_exists(lcfs, layer_id)

    docker.start()
    assert MINBASE_IMAGE not in docker.docker("image", "ls").stdout
    assert_listed_images_run(docker)
    assert docker.shut_down() == 0, docker.log_tail()
    assert lcfs.stop() == 0, lcfs.log_tail()

    code, report = run_fsck(lcfs.device, docker.data_root)
    assert code == 4, report
    assert len(orphans_in(report)) == 1, report
    assert layer_id in orphans_in(report)[0]
    stale = [p["problem"] for p in report["problems"] if "write-set-" in p["problem"]]
    assert len(stale) == 1, report

    code, repaired = run_fsck(lcfs.device, docker.data_root, "--repair", "--yes")
    assert code == 1, repaired
    assert repaired["left"] == 0, repaired
    code, report = run_fsck(lcfs.device, docker.data_root)
    assert code == 0, report
    assert store_layers(lcfs.device) == docker.referenced_layers()
    assert layer_id not in store_layers(lcfs.device)

    lcfs.start()
    docker.start()
    assert docker.docker("image", "ls", "-q", BUSYBOX_IMAGE).stdout.strip()
    assert_listed_images_run(docker)
    docker.docker("import", str(minbase_tar), MINBASE_IMAGE)
    result = docker.docker(*RUN, "--rm", MINBASE_IMAGE, "cat", "/etc/debian_version")
    assert result.stdout.startswith("12.")


def test_failed_rmi_then_dockerd_killed(own_daemons, busybox_tar):
    # While the daemon is down, dockerd renames the layer's directory to
    # `-removing` and then fails to Remove it. Killed before its shutdown
    # would retry the Remove, dockerd leaves a layer that only that
    # directory names, which one fsck repair must remove with the directory.
    lcfs, docker = own_daemons
    docker.docker("import", str(busybox_tar), BUSYBOX_IMAGE)
    cache_id = docker.layer_cache_id(docker.image_chain_ids(BUSYBOX_IMAGE)[0])
    assert lcfs.stop() == 0, lcfs.log_tail()
    failed = docker.docker("rmi", BUSYBOX_IMAGE, check=False)
    assert failed.returncode != 0
    assert len(docker.removing_dirs()) == 1
    lcfs.start()
    assert layer_exists(lcfs, cache_id)
    assert BUSYBOX_IMAGE not in docker.docker("image", "ls").stdout
    docker.kill()
    assert lcfs.stop() == 0, lcfs.log_tail()

    code, report = run_fsck(lcfs.device, docker.data_root)
    assert code == 4, report
    assert len(orphans_in(report)) == 1, report
    assert cache_id in orphans_in(report)[0]
    code, repaired = run_fsck(lcfs.device, docker.data_root, "--repair", "--yes")
    assert code == 1, repaired
    assert repaired["left"] == 0, repaired
    code, report = run_fsck(lcfs.device, docker.data_root)
    assert code == 0, report
    assert docker.removing_dirs() == []
    assert store_layers(lcfs.device) == docker.referenced_layers()
    assert cache_id not in store_layers(lcfs.device)
