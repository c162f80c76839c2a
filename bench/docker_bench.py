"""Docker workloads, run against one DriverStack at a time.

Each phase sets up what it needs without timing it: images come from
`docker import` or `docker load` of tars built here, and containers start
with `--pull never`. It times only the operation it measures. Then it
removes its containers and images, so the next phase starts from the same
state on every driver. Every phase can run again in a profiling pass,
where its timed regions run under py-spy and nothing is recorded.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path

from lcfs.fuse.stats import fetch_stats

from . import artifacts
from .common import (
    MIB,
    dd_seconds,
    drop_caches,
    machine_cpu_seconds,
    meminfo_kib,
    process_cpu_seconds,
    process_status_kib,
)
from .config import Sizes
from .drivers import DriverStack
from .results import Recorder

log = logging.getLogger(__name__)

_SECONDS_LINE = re.compile(r"^([0-9]+\.[0-9]+)$", re.MULTILINE)


def _bash_time(stack: DriverStack, container: str, command: str) -> float:
    """Run ``command`` with bash's `time` inside ``container`` and return its real seconds."""
    result = stack.docker(
        "exec", container, "bash", "-c", f"TIMEFORMAT=%R; time {{ {command} ; }}"
    )
    found = _SECONDS_LINE.findall(result.stderr)
    if not found:
        raise RuntimeError(f"no time in the output of {command!r}: {result.stderr!r}")
    return float(found[-1])


def _request_counts(stack: DriverStack) -> dict[str, int] | None:
    """Return the lcfs daemon's FUSE request counts by operation, or None for other drivers."""
    if stack.lcfs is None:
        return None
    snapshot = fetch_stats(str(stack.lcfs.socket_path))
    return {
        operation: counters["requests"]
        for operation, counters in snapshot.items()
        if isinstance(counters, dict) and "requests" in counters
    }


def _record_requests(
    rec: Recorder, key: str, before: dict | None, after: dict | None
) -> None:
    """Keep the FUSE requests that one measured command sent on lcfs, for the report."""
    if before is None or after is None or rec.profiling or rec.driver != "lcfs":
        return
    sent = {
        op: after[op] - before.get(op, 0)
        for op in after
        if after[op] != before.get(op, 0)
    }
    rec.results.meta.setdefault("fuse_requests", {})[key] = sent


def _run_detached(stack: DriverStack, name: str, image: str, *command: str) -> int:
    """Start a container in the background and return the pid of its first process."""
    stack.docker("run", "-d", "--pull", "never", "--name", name, image, *command)
    pid = stack.docker("inspect", "--format", "{{.State.Pid}}", name).stdout.strip()
    return int(pid)


def _remove_containers(stack: DriverStack, *names: str) -> None:
    if names:
        stack.docker("rm", "-f", *names)


def _load(stack: DriverStack, archive: Path) -> None:
    stack.docker("load", "--input", str(archive))


def _has_image(stack: DriverStack, reference: str) -> bool:
    return stack.docker("image", "inspect", reference, check=False).returncode == 0


class DockerPhases:
    """The Docker workloads for one run's sizes; each phase takes a stack and a recorder."""

    # Phases with no set-up of their own, which the harness runs in rounds
    # of one run on each driver. The others load a large image first and
    # run all their runs on one driver before the next.
    ROUND_ROBIN = frozenset({"import", "containers", "build"})

    def __init__(self, sizes: Sizes, scratch: Path):
        self.sizes = sizes
        self.scratch = scratch
        self._keep_five = False
        self._keep_big = False
        # Daemons whose peak memory is recorded: VmHWM only grows, so only
        # the first import after a daemon's start measures that import.
        self._peak_recorded: set[int] = set()
        minbase = artifacts.minbase_tar()
        busybox = artifacts.busybox_tar()
        self.minbase = minbase
        self.busybox = busybox

        # The `docker load` archives, each built once and cached.
        apps = [
            artifacts.app_layer_tar(
                index, sizes.app_layer_files, 2048, sizes.app_layer_blob
            )
            for index in range(1, 5)
        ]
        self.five = artifacts.docker_archive(
            f"five-{sizes.app_layer_files}-{sizes.app_layer_blob}",
            "bench/five",
            [minbase, *apps],
            ["/bin/bash"],
        )
        self.big = artifacts.docker_archive(
            f"big-{sizes.big_file}",
            "bench/big",
            [minbase, artifacts.big_file_tar(sizes.big_file)],
            ["/bin/bash"],
        )
        self.many = artifacts.docker_archive(
            f"many-{sizes.many_files}",
            "bench/many",
            [busybox, artifacts.many_files_tar(sizes.many_files)],
            ["/bin/sh"],
        )
        self.shared = artifacts.docker_archive(
            f"shared-{sizes.shared_file}",
            "bench/shared",
            [busybox, artifacts.big_file_tar(sizes.shared_file, "shared")],
            ["/bin/sh"],
        )

        self.context = artifacts.build_context(
            Path(tempfile.mkdtemp(prefix="build-", dir=scratch)),
            sizes.build_steps,
            sizes.build_files_per_copy,
        )

    def phases(self):
        """Return (name, function, keys) for every phase, in run order."""
        return [
            ("import", self.import_and_load, {"import_minbase", "load_5layer"}),
            ("containers", self.containers, {"containers"}),
            ("write", self.first_write, {"write_1byte"}),
            ("read", self.sequential_read, {"read_cold", "read_warm"}),
            ("scan", self.tree_scans, {"tar_usr", "find_root", "tar_usr_read"}),
            ("commit", self.commits, {"commit_small", "commit_big"}),
            ("build", self.build, {"build"}),
            ("page_cache", self.page_cache, {"page_cache"}),
        ]

    def prepare(self, stack: DriverStack) -> None:
        """Import the busybox image that several phases start containers from."""
        stack.docker("import", str(self.busybox), "bench/busybox")

    # -- phases -----------------------------------------------------------------

    def import_and_load(self, stack: DriverStack, rec: Recorder, runs: int) -> None:
        for _ in range(runs):
            with rec.timed("import_minbase"):
                stack.docker("import", str(self.minbase), "bench/minbase")
            pid = stack.daemon_pid
            if pid is not None and pid not in self._peak_recorded:
                # VmHWM is the peak since the daemon started: its start, Init and this import.
                rec.add("daemon_peak_rss", process_status_kib(pid, "VmHWM") / 1024)
                self._peak_recorded.add(pid)
            stack.docker("rmi", "bench/minbase")
        for run in range(runs):
            if _has_image(stack, "bench/five"):
                stack.docker("rmi", "bench/five")
            with rec.timed("load_5layer"):
                _load(stack, self.five)
            if not self._keep_five:
                stack.docker("rmi", "bench/five")

    def containers(self, stack: DriverStack, rec: Recorder, runs: int) -> None:
        count = self.sizes.containers
        # CPU time used during each round by the whole machine, by dockerd and
        # by the lcfs daemon. A round keeps both CPUs busy most of the time.
        processes = {"containers_cpu_dockerd": stack.dockerd.process.pid}
        if stack.daemon_pid is not None:
            processes["containers_cpu_lcfs"] = stack.daemon_pid
        for run in range(runs):
            names = [f"bench-c{run}-{index}" for index in range(count)]
            machine_before = machine_cpu_seconds()
            before = {key: process_cpu_seconds(pid) for key, pid in processes.items()}
            with rec.timed("containers"):
                with rec.timed("containers_create"):
                    for name in names:
                        stack.docker(
                            "create",
                            "--pull",
                            "never",
                            "--name",
                            name,
                            "bench/busybox",
                            "true",
                        )
                with rec.timed("containers_start"):
                    stack.docker("start", *names)
                with rec.timed("containers_remove"):
                    stack.docker("rm", "--force", *names)
            rec.add("containers_cpu", machine_cpu_seconds() - machine_before)
            for key, pid in processes.items():
                rec.add(key, process_cpu_seconds(pid) - before[key])

    def reuse_images(self, phase_names: list[str]) -> list[dict[str, str]]:
        """Leave an image loaded for the later phase of this run that uses it too.

        The scan phase uses the import phase's 5-layer image, and the read
        phase the write phase's big-file image, because each load costs a
        driver about as much as its share of the later phase. Returns the
        reused images, for the page's description of the run.
        """
        self._keep_five = "import" in phase_names and "scan" in phase_names
        self._keep_big = "write" in phase_names and "read" in phase_names
        reused = []
        if self._keep_five:
            reused.append({"image": "5-layer", "loaded_by": "import", "used_by": "scan"})
        if self._keep_big:
            reused.append({"image": "big-file", "loaded_by": "write", "used_by": "read"})
        return reused

    def first_write(self, stack: DriverStack, rec: Recorder, runs: int) -> None:
        _load(stack, self.big)
        size = self.sizes.big_file
        try:
            for run in range(runs):
                name = f"bench-w{run}"
                pid = _run_detached(stack, name, "bench/big", "sleep", "infinity")
                # The container's root as its processes see it.
                path = f"/proc/{pid}/root/big"
                os.sync()
                with rec.timed("write_1byte"):
                    fd = os.open(path, os.O_WRONLY)
                    try:
                        os.pwrite(fd, b"x", size // 2)
                    finally:
                        os.close(fd)
                if os.stat(path).st_size != size:
                    raise RuntimeError(
                        f"{stack.driver}: /big changed size after a 1-byte write"
                    )
                _remove_containers(stack, name)
        finally:
            if not self._keep_big:
                stack.docker("rmi", "bench/big")

    def sequential_read(self, stack: DriverStack, rec: Recorder, runs: int) -> None:
        if not _has_image(stack, "bench/big"):
            _load(stack, self.big)
        mib = self.sizes.big_file / MIB
        read = ["dd", "if=/big", "of=/dev/null", "bs=1M"]
        try:
            for run in range(runs):
                # A new container per run, so no run reads pages an earlier run left.
                name = f"bench-r{run}"
                _run_detached(stack, name, "bench/big", "sleep", "infinity")
                drop_caches()
                with rec.region("read_cold"):
                    cold = stack.docker("exec", name, *read)
                rec.add("read_cold", mib / dd_seconds(cold.stderr))
                before = _request_counts(stack)
                with rec.region("read_warm"):
                    warm = stack.docker("exec", name, *read)
                rec.add("read_warm", mib / dd_seconds(warm.stderr))
                _record_requests(rec, "read_warm", before, _request_counts(stack))
                _remove_containers(stack, name)
        finally:
            stack.docker("rmi", "bench/big")

    def tree_scans(self, stack: DriverStack, rec: Recorder, runs: int) -> None:
        name = "bench-scan"
        if not _has_image(stack, "bench/five"):
            _load(stack, self.five)
        _run_detached(stack, name, "bench/five", "sleep", "infinity")
        commands = {
            "tar_usr": "tar cf /dev/null /usr",
            "find_root": "find / -xdev -ls > /dev/null",
            "tar_usr_read": "tar cf - /usr | cat > /dev/null",
        }
        try:
            for command in commands.values():
                _bash_time(stack, name, command)
            for run in range(runs):
                for key, command in commands.items():
                    before = _request_counts(stack)
                    with rec.region(key):
                        seconds = _bash_time(stack, name, command)
                    rec.add(key, seconds)
                    _record_requests(rec, key, before, _request_counts(stack))
        finally:
            _remove_containers(stack, name)
            stack.docker("rmi", "bench/five")

    def commits(self, stack: DriverStack, rec: Recorder, runs: int) -> None:
        _load(stack, self.many)
        change = "; ".join(
            f"echo changed >> /data/d000/f{index}" for index in range(10)
        )
        write = f"head -c {self.sizes.commit_write} /dev/urandom > /written"
        try:
            for run in range(runs):
                for key, image, script in (
                    ("commit_small", "bench/many", change),
                    ("commit_big", "bench/busybox", write),
                ):
                    name = f"bench-{key}-{run}"
                    stack.docker(
                        "run",
                        "--pull",
                        "never",
                        "--name",
                        name,
                        image,
                        "sh",
                        "-c",
                        script,
                    )
                    os.sync()
                    with rec.timed(key):
                        stack.docker("commit", name, f"bench/{key}")
                    _remove_containers(stack, name)
                    stack.docker("rmi", f"bench/{key}")
        finally:
            stack.docker("rmi", "bench/many")

    def build(self, stack: DriverStack, rec: Recorder, runs: int) -> None:
        for run in range(runs):
            with rec.timed("build"):
                stack.docker(
                    "build",
                    "--no-cache",
                    "--quiet",
                    "--tag",
                    "bench/built",
                    str(self.context),
                    env={"DOCKER_BUILDKIT": "0"},
                )
            stack.docker("rmi", "bench/built")

    def page_cache(self, stack: DriverStack, rec: Recorder, runs: int) -> None:
        _load(stack, self.shared)
        names = [f"bench-p{index}" for index in range(self.sizes.shared_readers)]
        try:
            for run in range(runs):
                for name in names:
                    _run_detached(stack, name, "bench/shared", "sleep", "infinity")
                drop_caches()
                # drop_caches also evicted runc, the shim and dockerd's own pages:
                # one exec per container reloads them before the baseline.
                for name in names:
                    stack.docker("exec", name, "true")
                before = meminfo_kib("Cached")
                with rec.region("page_cache"):
                    for name in names:
                        stack.docker(
                            "exec", name, "dd", "if=/shared", "of=/dev/null", "bs=1M"
                        )
                after = meminfo_kib("Cached")
                rec.add("page_cache", (after - before) / 1024)
                _remove_containers(stack, *names)
        finally:
            stack.docker("rmi", "bench/shared")
