"""Run `lcfs daemon` as a subprocess for tests, with its own device and socket.

The daemon gets a sparse image file, a plugin socket and a log under one
work directory. Calls to the plugin go straight to its unix socket with
the same headers dockerd sends.
"""

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from dockerd import remove_stale_plugin_specs, terminate, unix_http
from mounts import mounts_under, unmount_under

log = logging.getLogger(__name__)

PLUGIN_HEADERS = {"Accept": "application/vnd.docker.plugins.v1.2+json"}


def console_script(name: str) -> str:
    """Return the path of an installed console script, preferring this interpreter's."""
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(
            f"the {name} command is not installed: run pip install -e '.[test]'"
        )
    return found


def lcfs_command() -> str:
    """Return the path of the `lcfs` command."""
    return console_script("lcfs")


def fsck_command() -> str:
    """Return the path of the `lcfs-fsck` command."""
    return console_script("lcfs-fsck")


class PluginError(RuntimeError):
    """A plugin call replied with an Err message or an unexpected status."""


class LcfsDaemon:
    """One `lcfs daemon` process with everything it writes under `workdir`.

    With `mountpoint` None the daemon mounts at the Home that dockerd's Init
    names, as it does in production; otherwise at `mountpoint` from start.
    `options` are more `lcfs daemon` options, such as FUSE settings.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        size: str = "8G",
        mountpoint: str | os.PathLike | None = None,
        options: tuple[str, ...] = (),
    ):
        self.workdir = Path(workdir)
        self.device = self.workdir / "lcfs.img"
        self.socket_path = self.workdir / "lcfs.sock"
        self.log_path = self.workdir / "lcfs.log"
        self.size = size
        self.mountpoint = Path(mountpoint) if mountpoint else None
        self.options = tuple(options)
        self.process: subprocess.Popen | None = None
        self.returncode: int | None = None

    def command(self) -> list[str]:
        """Return the daemon's command line."""
        command = [
            lcfs_command(),
            "daemon",
            "--device",
            str(self.device),
            "--size",
            self.size,
            "--socket",
            str(self.socket_path),
        ]
        if self.mountpoint is not None:
            command += ["--mountpoint", str(self.mountpoint)]
        return command + list(self.options)

    def start(self, timeout: float = 60) -> "LcfsDaemon":
        """Start the daemon and wait until it replies to Plugin.Activate.

        Raises RuntimeError with the end of the daemon's log if it exits or
        does not reply within `timeout` seconds.
        """
        self.workdir.mkdir(parents=True, exist_ok=True)
        log.info("starting lcfs daemon in %s", self.workdir)
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            code = self.process.poll()
            if code is not None:
                self.stop()
                raise RuntimeError(
                    f"lcfs daemon in {self.workdir} exited with {code} during start; "
                    f"end of {self.log_path}:\n{self.log_tail()}"
                )
            try:
                reply = self.call("Plugin.Activate")
            except (OSError, PluginError):
                reply = None
            if reply is not None:
                if "GraphDriver" not in reply.get("Implements", []):
                    self.stop()
                    raise RuntimeError(f"lcfs daemon Activate replied {reply}")
                log.info(
                    "lcfs daemon pid %d ready at %s", self.process.pid, self.socket_path
                )
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"lcfs daemon in {self.workdir} did not reply to Plugin.Activate within {timeout} s; "
                    f"end of {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def call(
        self, name: str, payload: dict | None = None, timeout: float = 120
    ) -> dict:
        """Send one plugin call and return its decoded JSON reply.

        Raises PluginError when the reply carries Err or a non-200 status.
        """
        body = json.dumps(payload).encode() if payload is not None else b""
        status, raw = unix_http(
            self.socket_path, "POST", f"/{name}", body, PLUGIN_HEADERS, timeout
        )
        try:
            reply = json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            raise PluginError(
                f"{name} replied {status} with non-JSON body {raw[:200]!r}"
            )
        if status != 200 or reply.get("Err"):
            raise PluginError(f"{name} replied {status}: {reply}")
        return reply

    def status(self) -> dict[str, str]:
        """Return the plugin's Status pairs as a dict."""
        return dict(self.call("GraphDriver.Status").get("Status") or [])

    def log_tail(self, size: int = 4000) -> str:
        """Return the last `size` characters of the daemon's log."""
        try:
            return self.log_path.read_text(errors="replace")[-size:]
        except FileNotFoundError:
            return ""

    def mounts(self) -> list[str]:
        """Return the mount points left under the work directory."""
        return mounts_under(self.workdir)

    def stop(self, timeout: float = 30) -> int | None:
        """Send SIGTERM, wait `timeout` seconds, then SIGKILL; return the exit status.

        Safe to call more than once. A negative status means the daemon did
        not exit by itself and was killed by that signal.
        """
        if self.process is not None:
            self.returncode = terminate(
                self.process, timeout, f"lcfs daemon in {self.workdir}"
            )
        return self.returncode


@contextlib.contextmanager
def running_lcfs(daemon: LcfsDaemon):
    """Start ``daemon``; on exit stop it, unmount what it left and delete its image."""
    remove_stale_plugin_specs()
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()
        unmount_under(daemon.workdir)
        daemon.device.unlink(missing_ok=True)
