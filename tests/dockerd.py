"""Run Debian's dockerd 20.10 for tests, isolated from the machine's Docker.

Each DockerDaemon owns one work directory holding its --data-root,
--exec-root, API socket, pid file and log. dockerd runs in a new network
namespace (`unshare --net`, no other namespace) so nothing it does can leave
the machine, while it still shares the mount namespace with the tests: it
must see the lcfs FUSE mount, and the tests must see (and clean up) the
mounts it makes.

dockerd 20.10 finds a graphdriver plugin by a socket in /run/docker/plugins
or a spec file in /etc/docker/plugins or /usr/lib/docker/plugins, and reads
no other directory unless it runs rootless. So a plugin under test gets a
unique name (`lcfs-test-<hex>`), a spec file
/etc/docker/plugins/<name>.spec pointing at its socket, and that file is
removed when the daemon stops.

The client is /usr/bin/docker, the 20.10 client that matches dockerd;
/usr/local/bin/docker on these machines is a newer one.
"""

import http.client
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import tempfile
import time
from hashlib import sha256
from pathlib import Path
from typing import Self

from mounts import remove_tree, unmount_under

log = logging.getLogger(__name__)

DOCKERD = "/usr/sbin/dockerd"
DOCKER = "/usr/bin/docker"
RUNC = "/usr/sbin/runc"
PLUGIN_SPEC_DIR = Path("/etc/docker/plugins")
TEST_PLUGIN_PREFIX = "lcfs-test-"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class DockerError(RuntimeError):
    """A docker client command exited with a non-zero status."""

    def __init__(
        self, args: list[str], result: subprocess.CompletedProcess, log_tail: str
    ):
        self.result = result
        super().__init__(
            f"docker {' '.join(args)} exited with {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}\n"
            f"end of the dockerd log:\n{log_tail}"
        )


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.sock = sock


def unix_http(
    socket_path: str | os.PathLike,
    method: str,
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30,
) -> tuple[int, bytes]:
    """Send one HTTP request over a unix socket and return (status, body)."""
    connection = _UnixHTTPConnection(os.fspath(socket_path), timeout)
    try:
        connection.request(method, url, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def chain_ids(diff_ids: list[str]) -> list[str]:
    """Return the layer chain ids for an image's diff ids, as Docker's layer store computes them."""
    chains: list[str] = []
    for diff_id in diff_ids:
        if not chains:
            chains.append(diff_id)
        else:
            digest = sha256(f"{chains[-1]} {diff_id}".encode()).hexdigest()
            chains.append(f"sha256:{digest}")
    return chains


def terminate(process: subprocess.Popen, timeout: float, what: str) -> int:
    """Stop a child process: SIGTERM, wait `timeout` seconds, then SIGKILL.

    Returns its exit status, negative for the signal that ended it. Does
    nothing but return the status if the process has already exited.
    """
    if process.poll() is None:
        log.info("stopping %s (pid %d)", what, process.pid)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning(
                "%s (pid %d) did not stop within %s s, killing it",
                what,
                process.pid,
                timeout,
            )
            process.kill()
            process.wait()
    return process.returncode


def remove_stale_plugin_specs() -> list[Path]:
    """Delete spec files of earlier test runs whose plugin no longer listens.

    Only files named lcfs-test-*.spec are considered, so the machine's own
    plugin specs are never touched. A spec stays while a connection to its
    socket succeeds, because another test run may still be using it.
    """
    removed = []
    if not PLUGIN_SPEC_DIR.is_dir():
        return removed
    for spec in PLUGIN_SPEC_DIR.glob(f"{TEST_PLUGIN_PREFIX}*.spec"):
        target = spec.read_text().strip().removeprefix("unix://")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(target)
                continue
            except OSError:
                pass
        spec.unlink(missing_ok=True)
        removed.append(spec)
    return removed


class DockerDaemon:
    """One dockerd for tests, with everything it writes under `workdir`.

    With `plugin_socket` set, the storage driver is a graphdriver plugin at
    that socket, registered under a unique name. Otherwise `storage_driver`
    names a built-in driver such as vfs.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        storage_driver: str = "vfs",
        plugin_socket: str | os.PathLike | None = None,
        extra_args: tuple[str, ...] = (),
    ):
        self.workdir = Path(workdir)
        self.plugin_socket = Path(plugin_socket) if plugin_socket else None
        if self.plugin_socket is not None:
            storage_driver = TEST_PLUGIN_PREFIX + secrets.token_hex(4)
        self.storage_driver = storage_driver
        self.extra_args = tuple(extra_args)
        self.data_root = self.workdir / "root"
        # containerd puts unix sockets under the exec root, and a socket path
        # may not exceed 104 bytes: pytest's temporary paths can be longer.
        self.exec_root = Path(tempfile.mkdtemp(prefix="lcfs-dx-", dir="/tmp"))
        self.socket_path = self.workdir / "docker.sock"
        self.pid_file = self.workdir / "docker.pid"
        self.log_path = self.workdir / "dockerd.log"
        self.client_config = self.workdir / "client"
        self.spec_path = PLUGIN_SPEC_DIR / f"{storage_driver}.spec"
        self.process: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        """DOCKER_HOST value for clients of this daemon."""
        return f"unix://{self.socket_path}"

    @property
    def driver_home(self) -> Path:
        """The Home directory dockerd passes to the storage driver's Init."""
        return self.data_root / self.storage_driver

    def command(self) -> list[str]:
        """Return the dockerd command line, run inside a new network namespace."""
        return [
            "unshare",
            "--net",
            "--",
            DOCKERD,
            "--experimental",
            "--data-root",
            str(self.data_root),
            "--exec-root",
            str(self.exec_root),
            "--host",
            self.host,
            "--pidfile",
            str(self.pid_file),
            "--bridge=none",
            "--iptables=false",
            "--ip6tables=false",
            "--storage-driver",
            self.storage_driver,
            *self.extra_args,
        ]

    def start(self, timeout: float = 60) -> "DockerDaemon":
        """Start dockerd and wait until its API replies to /_ping.

        Raises RuntimeError with the end of the dockerd log if dockerd
        exits or does not reply within `timeout` seconds. The daemon is
        stopped and cleaned up before the error is raised.
        """
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.client_config.mkdir(exist_ok=True)
        if self.plugin_socket is not None:
            PLUGIN_SPEC_DIR.mkdir(parents=True, exist_ok=True)
            partial = self.spec_path.with_name(self.spec_path.name + ".partial")
            partial.write_text(f"unix://{self.plugin_socket}\n")
            partial.rename(self.spec_path)

        env = dict(os.environ)
        env["PATH"] = SYSTEM_PATH
        for name in ("DOCKER_HOST", "DOCKER_CONTEXT", "NOTIFY_SOCKET"):
            env.pop(name, None)
        log.info(
            "starting dockerd in %s with storage driver %s",
            self.workdir,
            self.storage_driver,
        )
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        log.info("dockerd pid %d ready at %s", self.process.pid, self.socket_path)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            code = self.process.poll()
            if code is not None:
                raise RuntimeError(
                    f"dockerd in {self.workdir} exited with {code} during start; "
                    f"end of {self.log_path}:\n{self.log_tail()}"
                )
            try:
                status, _ = unix_http(self.socket_path, "GET", "/_ping", timeout=2)
                if status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"dockerd in {self.workdir} did not reply to /_ping within {timeout} s; "
                    f"end of {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def log_tail(self, size: int = 4000) -> str:
        """Return the last `size` characters of the dockerd log."""
        try:
            return self.log_path.read_text(errors="replace")[-size:]
        except FileNotFoundError:
            return ""

    def docker(
        self,
        *args: str,
        input: str | None = None,
        env: dict[str, str] | None = None,
        check: bool = True,
        timeout: float = 900,
        cwd: str | os.PathLike | None = None,
    ) -> subprocess.CompletedProcess:
        """Run the 20.10 docker client against this daemon and return its result.

        Raises DockerError (with the end of the dockerd log) on a non-zero
        exit unless `check` is false.
        """
        full_env = dict(os.environ)
        for name in ("DOCKER_CONTEXT", "DOCKER_CERT_PATH", "DOCKER_TLS_VERIFY"):
            full_env.pop(name, None)
        full_env.update(DOCKER_HOST=self.host, DOCKER_CONFIG=str(self.client_config))
        full_env.update(env or {})
        result = subprocess.run(
            [DOCKER, *args],
            input=input,
            capture_output=True,
            text=True,
            env=full_env,
            timeout=timeout,
            cwd=cwd,
            stdin=None if input is not None else subprocess.DEVNULL,
            check=False,
        )
        if check and result.returncode != 0:
            raise DockerError(list(args), result, self.log_tail())
        return result

    def image_chain_ids(self, image: str) -> list[str]:
        """Return the chain id of every layer of `image`, base first."""
        output = self.docker(
            "image", "inspect", "--format", "{{json .RootFS.Layers}}", image
        )
        return chain_ids(json.loads(output.stdout))

    def layer_cache_id(self, chain_id: str) -> str:
        """Return the storage driver's layer id for a layer chain id."""
        digest = chain_id.removeprefix("sha256:")
        layerdb = self.data_root / "image" / self.storage_driver / "layerdb" / "sha256"
        return (layerdb / digest / "cache-id").read_text().strip()

    def stop(self, timeout: float = 30) -> list[str]:
        """Stop dockerd and clean up after it; safe to call more than once.

        Sends SIGTERM and waits `timeout` seconds, then SIGKILLs dockerd and
        force-deletes any container left running. Unmounts whatever is left
        mounted under the work directory, deletes the data and exec roots
        (the log stays), and removes the plugin spec file. Returns the mount
        points that dockerd left behind, so a test can assert there were none.
        """
        containerd_pid = self._containerd_pid()
        if self.process is not None:
            terminate(self.process, timeout, f"dockerd in {self.workdir}")
        if containerd_pid is not None:
            self._kill_containers()
            self._end_process(containerd_pid, "containerd")
        # Shims outlive a killed containerd, including that of a dockerd
        # killed before this one started again on the same exec root.
        for pid in self._shim_pids():
            self._end_process(pid, "containerd shim")

        leftover = []
        if self.exec_root.exists():
            leftover += unmount_under(self.exec_root)
            remove_tree(self.exec_root)
        if self.workdir.exists():
            leftover += unmount_under(self.workdir)
            remove_tree(self.data_root)
        if leftover:
            log.warning("dockerd in %s left mounts behind: %s", self.workdir, leftover)
        if self.plugin_socket is not None:
            self.spec_path.unlink(missing_ok=True)
        return leftover

    def _containerd_pid(self) -> int | None:
        pid_file = self.exec_root / "containerd" / "containerd.pid"
        try:
            return int(pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def _kill_containers(self) -> None:
        # After a SIGKILL of dockerd its containers keep running under their
        # shims. runc keeps their state under this daemon's exec root.
        runc_root = self.exec_root / "runtime-runc" / "moby"
        if not runc_root.is_dir():
            return
        for state in runc_root.iterdir():
            log.warning(
                "deleting container %s left running by dockerd in %s",
                state.name,
                self.workdir,
            )
            subprocess.run(
                [RUNC, "--root", str(runc_root), "delete", "--force", state.name],
                capture_output=True,
                check=False,
            )

    def _shim_pids(self) -> list[int]:
        """Return the pids of containerd shims whose command line names this exec root."""
        exec_root = os.fsencode(str(self.exec_root))
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
            if b"containerd-shim" in cmdline.split(b"\0", 1)[0] and exec_root in cmdline:
                pids.append(int(entry.name))
        return pids

    def _end_process(self, pid: int, what: str) -> None:
        # Only a process whose command line names this work directory or
        # exec root was started by this daemon, so a reused pid is left alone.
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            return
        if not any(os.fsencode(str(path)) in cmdline for path in (self.workdir, self.exec_root)):
            return
        log.warning("ending %s pid %d left by dockerd in %s", what, pid, self.workdir)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            for _ in range(50):
                if not Path(f"/proc/{pid}").exists():
                    return
                time.sleep(0.1)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
