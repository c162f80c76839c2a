"""Test helpers for the containerd snapshotter: the daemon, containerd, OCI archives.

``SnapshotterDaemon`` runs ``lcfs daemon --snapshotter-socket`` with its own
device, sockets and fixed mount point under one work directory, optionally
with a crash point armed. ``Containerd`` runs Debian's containerd with its
own root, state, socket and config (CRI disabled, lcfs as a proxy plugin)
in a new network namespace, and ``ctr`` against it. ``oci_archive`` builds
an image archive that ``ctr images import`` reads, from layer tars made in
the test.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import grpc
from dockerd import terminate
from lcfs_daemon import fsck_command, lcfs_command
from mounts import unmount_under

from lcfs.driver.proto import snapshots_pb2, snapshots_pb2_grpc

log = logging.getLogger(__name__)

CONTAINERD = "/usr/bin/containerd"
CTR = "/usr/bin/ctr"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

KIND_NAMES = {
    snapshots_pb2.VIEW: "view",
    snapshots_pb2.ACTIVE: "active",
    snapshots_pb2.COMMITTED: "committed",
}


class SnapshotterDaemon:
    """One ``lcfs daemon`` serving the snapshotter socket, optionally the graphdriver too."""

    def __init__(self, workdir: str | os.PathLike, size: str = "8G", graphdriver: bool = False):
        self.workdir = Path(workdir)
        self.device = self.workdir / "lcfs.img"
        self.socket_path = self.workdir / "snapshotter.sock"
        self.plugin_socket = self.workdir / "plugin.sock" if graphdriver else None
        self.mountpoint = self.workdir / "mnt"
        self.log_path = self.workdir / "lcfs.log"
        self.size = size
        self.process: subprocess.Popen | None = None
        self._channel: grpc.Channel | None = None

    def command(self) -> list[str]:
        return [
            lcfs_command(),
            "daemon",
            "--device",
            str(self.device),
            "--size",
            self.size,
            "--socket",
            str(self.plugin_socket) if self.plugin_socket else "none",
            "--snapshotter-socket",
            str(self.socket_path),
            "--mountpoint",
            str(self.mountpoint),
        ]

    def start(self, crash_point: str | None = None, timeout: float = 60,
              env: dict[str, str] | None = None) -> SnapshotterDaemon:  # fmt: skip
        """Start the daemon and wait until List replies.

        With ``crash_point`` the daemon kills itself with SIGKILL when it
        reaches that point (see lcfs.journal.crash). ``env`` adds variables
        to the daemon's environment.
        """
        self.workdir.mkdir(parents=True, exist_ok=True)
        environment = dict(os.environ)
        environment.pop("LCFS_CRASH_POINT", None)
        if crash_point:
            environment["LCFS_CRASH_POINT"] = crash_point
        environment.update(env or {})
        log.info("starting lcfs snapshotter daemon in %s (crash point %s)", self.workdir,
                 crash_point or "none")  # fmt: skip
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=environment,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            code = self.process.poll()
            if code is not None:
                raise RuntimeError(
                    f"lcfs daemon in {self.workdir} exited with {code} during start; "
                    f"end of {self.log_path}:\n{self.log_tail()}"
                )
            if self.socket_path.exists():
                try:
                    self.list()
                    return self
                except grpc.RpcError:
                    pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"lcfs daemon in {self.workdir} did not serve List within {timeout} s; "
                    f"end of {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.2)

    @property
    def client(self) -> snapshots_pb2_grpc.SnapshotsStub:
        """A Snapshots client on a channel that is reopened after each restart."""
        if self._channel is None:
            self._channel = grpc.insecure_channel(f"unix:{self.socket_path}")
        return snapshots_pb2_grpc.SnapshotsStub(self._channel)

    def _close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def list(self, *filters: str) -> list[snapshots_pb2.Info]:
        """Return every snapshot that List streams back (matching ``filters``)."""
        request = snapshots_pb2.ListSnapshotsRequest(snapshotter="lcfs", filters=filters)
        return [info for reply in self.client.List(request, timeout=30) for info in reply.info]

    def layer_dirs(self) -> list[str]:
        """Return the snapshot layer directories under the FUSE mount root."""
        return sorted(name for name in os.listdir(self.mountpoint) if name.startswith("snapshot-"))

    def log_tail(self, size: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-size:]
        except FileNotFoundError:
            return ""

    def kill(self) -> None:
        """SIGKILL the daemon, as a crash would, and wait for it to end."""
        self._close_channel()
        if self.process is not None and self.process.poll() is None:
            log.info("killing lcfs daemon pid %d", self.process.pid)
            self.process.send_signal(signal.SIGKILL)
        self.wait_exit()

    def wait_exit(self, timeout: float = 30) -> int | None:
        """Wait for the daemon to end (after a crash point, say); return its status."""
        self._close_channel()
        if self.process is None:
            return None
        return self.process.wait(timeout)

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM the daemon (SIGKILL after ``timeout`` s) and return its exit status."""
        self._close_channel()
        if self.process is None:
            return None
        return terminate(self.process, timeout, f"lcfs daemon in {self.workdir}")

    def fsck(self) -> subprocess.CompletedProcess:
        """Run lcfs-fsck on the device of the stopped daemon."""
        return subprocess.run(
            [fsck_command(), str(self.device)], capture_output=True, text=True, timeout=600
        )

    def cleanup(self) -> None:
        """Stop the daemon and unmount whatever is left under the work directory."""
        self.stop()
        if self.workdir.exists():
            unmount_under(self.workdir)


def check_list_consistent(infos: list[snapshots_pb2.Info]) -> None:
    """Assert that every parent is listed and committed, and names are unique."""
    names = [info.name for info in infos]
    assert len(names) == len(set(names)), f"duplicate names in List: {names}"
    by_name = {info.name: info for info in infos}
    for info in infos:
        assert info.kind in KIND_NAMES, f"{info.name} has kind {info.kind}"
        if info.parent:
            assert info.parent in by_name, f"{info.name} has unlisted parent {info.parent}"
            parent_kind = by_name[info.parent].kind
            assert parent_kind == snapshots_pb2.COMMITTED, (
                f"parent {info.parent} of {info.name} is {KIND_NAMES[parent_kind]}"
            )


# -- containerd -----------------------------------------------------------------


class Containerd:
    """Debian's containerd with everything under ``workdir``, lcfs as a proxy plugin."""

    def __init__(self, workdir: str | os.PathLike, snapshotter_socket: str | os.PathLike):
        self.workdir = Path(workdir)
        self.root = self.workdir / "root"
        self.state = self.workdir / "state"
        self.socket_path = self.workdir / "containerd.sock"
        self.config_path = self.workdir / "config.toml"
        self.log_path = self.workdir / "containerd.log"
        self.snapshotter_socket = Path(snapshotter_socket)
        # A namespace of its own keeps runc's state under /run/containerd/runc
        # apart from any other containerd on the machine.
        self.namespace = f"lcfs-test-{os.getpid()}"
        self.process: subprocess.Popen | None = None

    def config(self) -> str:
        return "\n".join(
            [
                "version = 2",
                f'root = "{self.root}"',
                f'state = "{self.state}"',
                'disabled_plugins = ["io.containerd.grpc.v1.cri"]',
                "[grpc]",
                f'  address = "{self.socket_path}"',
                '[plugins."io.containerd.internal.v1.opt"]',
                f'  path = "{self.workdir / "opt"}"',
                "[proxy_plugins.lcfs]",
                '  type = "snapshot"',
                f'  address = "{self.snapshotter_socket}"',
                "",
            ]
        )

    def start(self, timeout: float = 60) -> Containerd:
        """Start containerd in a new network namespace and wait until ctr reaches it."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config())
        # containerd mounts snapshots for unpacking under TMPDIR, so a mount
        # left by a crash is under the work directory and stop() finds it.
        tmp = self.workdir / "tmp"
        tmp.mkdir(exist_ok=True)
        env = {"PATH": SYSTEM_PATH, "HOME": os.environ.get("HOME", "/root"), "TMPDIR": str(tmp)}
        log.info("starting containerd in %s", self.workdir)
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                ["unshare", "--net", "--", CONTAINERD, "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"containerd in {self.workdir} exited with {self.process.returncode}; "
                    f"end of its log:\n{self.log_tail()}"
                )
            if self.socket_path.exists() and self.ctr("version", check=False).returncode == 0:
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"containerd in {self.workdir} did not start within {timeout} s")
            time.sleep(0.2)

    def ctr(self, *args: str, check: bool = True, timeout: float = 300,
            input: bytes | None = None) -> subprocess.CompletedProcess:  # fmt: skip
        """Run ctr against this containerd in its namespace; raise on failure with ``check``."""
        command = [CTR, "--address", str(self.socket_path), "--namespace", self.namespace, *args]
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input.decode() if input is not None else None,
            env={"PATH": SYSTEM_PATH},
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(command)} exited with {result.returncode}:\n{result.stdout}"
                f"{result.stderr}\nend of the containerd log:\n{self.log_tail(2000)}"
            )
        return result

    def snapshots(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        """Run ``ctr snapshots --snapshotter lcfs ARGS``."""
        return self.ctr("snapshots", "--snapshotter", "lcfs", *args, **kwargs)

    def log_tail(self, size: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-size:]
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """Kill tasks left running, stop containerd and its shims, unmount what is left."""
        if self.process is not None and self.process.poll() is None:
            tasks = self.ctr("tasks", "ls", "-q", check=False, timeout=30)
            for task in tasks.stdout.split():
                self.ctr("tasks", "kill", "-s", "SIGKILL", task, check=False, timeout=30)
                self.ctr("tasks", "rm", "-f", task, check=False, timeout=30)
            terminate(self.process, 30, f"containerd in {self.workdir}")
        self._end_shims()
        if self.workdir.exists():
            unmount_under(self.workdir)

    def _end_shims(self) -> None:
        # Shims outlive containerd. Only those whose command line names this
        # containerd's socket were started by it.
        needle = os.fsencode(str(self.socket_path))
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"containerd-shim" in cmdline and needle in cmdline:
                log.warning("ending containerd shim pid %s of %s", entry.name, self.workdir)
                try:
                    os.kill(int(entry.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass


# -- OCI archives -----------------------------------------------------------------


def layer_tar(entries: list[tuple[str, bytes | None]], dirs: list[str] = ()) -> bytes:
    """Return an uncompressed layer tar: ``dirs`` first, then files (None: empty file).

    Whiteouts are plain entries named ``.wh.NAME`` or ``.wh..wh..opq``.
    """
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name in dirs:
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            info.mtime = 1_700_000_000
            archive.addfile(info)
        for name, content in entries:
            data = content or b""
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 1_700_000_000
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _blob(blobs: dict[str, bytes], data: bytes) -> dict:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return {"digest": digest, "size": len(data)}


def oci_archive(path: Path, layers: list[bytes], base_name: str, cmd: list[str]) -> str:
    """Write an OCI image archive of uncompressed ``layers`` and return its image name.

    The index names the image "latest", so ``ctr images import --base-name
    BASE`` creates ``BASE:latest``.
    """
    blobs: dict[str, bytes] = {}
    layer_descriptors = [
        {"mediaType": "application/vnd.oci.image.layer.v1.tar", **_blob(blobs, layer)}
        for layer in layers
    ]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": cmd, "Env": [f"PATH={SYSTEM_PATH}"]},
        "rootfs": {
            "type": "layers",
            "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest() for layer in layers],
        },
    }
    config_descriptor = {
        "mediaType": "application/vnd.oci.image.config.v1+json",
        **_blob(blobs, json.dumps(config).encode()),
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_descriptor,
        "layers": layer_descriptors,
    }
    manifest_descriptor = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        **_blob(blobs, json.dumps(manifest).encode()),
        "annotations": {"org.opencontainers.image.ref.name": "latest"},
        "platform": {"architecture": "amd64", "os": "linux"},
    }
    index = {"schemaVersion": 2, "manifests": [manifest_descriptor]}
    files = {
        "oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
        "index.json": json.dumps(index).encode(),
    }
    for digest, data in blobs.items():
        files["blobs/sha256/" + digest.removeprefix("sha256:")] = data
    with tarfile.open(path, "w") as archive:
        for directory in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(directory)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            archive.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            archive.addfile(info, io.BytesIO(data))
    return f"{base_name}:latest"


def tools_available() -> str | None:
    """Return why the containerd tests cannot run here, or None if they can."""
    for tool in (CONTAINERD, CTR, shutil.which("runc"), shutil.which("containerd-shim-runc-v2")):
        if not tool or not os.path.exists(tool):
            return f"{tool or 'runc or containerd-shim-runc-v2'} is not installed"
    return None
