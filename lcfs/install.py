"""``lcfs install`` and ``lcfs uninstall``: run the daemon as a systemd service.

Install writes three files and nothing else:

* ``/etc/systemd/system/lcfs.service``, a unit that starts ``lcfs daemon``
  before ``docker.service`` and stops it with SIGTERM after dockerd;
* ``/etc/docker/plugins/lcfs.spec``, which names the plugin socket that
  dockerd connects to (``unix:///run/docker/plugins/lcfs.sock`` by default);
* ``/var/lib/lcfs/install.json``, the manifest: every file and directory
  that install created, with the sha256 of each file's content.

Nothing goes under Docker's data root and nothing is downloaded. Uninstall
reads the manifest and removes exactly those files, then the directories
install created if they are empty, then the manifest. A file whose content
was changed since install is left in place and reported. An install with
``--force`` over an earlier one keeps the earlier manifest's entries, so
uninstall still removes what either wrote.

``root`` prefixes every path written, so tests (and image builders) can
install into a directory tree instead of the running system. Paths inside
the files (the device, the socket, the command) are never prefixed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

UNIT_NAME = "lcfs.service"
UNIT_PATH = "/etc/systemd/system/" + UNIT_NAME
SPEC_DIR = "/etc/docker/plugins"
MANIFEST_PATH = "/var/lib/lcfs/install.json"
# dockerd's own unit; lcfs must be serving before it starts and stop after it.
DOCKER_UNIT = "docker.service"
# systemctl enable makes these links; their presence means the unit is enabled.
WANTS_DIRS = (
    f"/etc/systemd/system/{DOCKER_UNIT}.wants",
    "/etc/systemd/system/multi-user.target.wants",
)
# Seconds systemd waits after SIGTERM before SIGKILL. The daemon waits up
# to its --stop-timeout (30 s by default) for requests in flight first.
STOP_TIMEOUT_MARGIN = 30


class InstallError(Exception):
    """Install or uninstall cannot go on; the message names the path and the fix."""


@dataclass
class ServiceConfig:
    """The daemon options that the unit's ExecStart passes on."""

    command: list[str]
    device: str
    socket: str
    size: int | None = None
    mountpoint: str | None = None
    docker_root: str | None = None
    stop_timeout: float = 30.0
    log_level: str = "info"
    extra_args: list[str] = field(default_factory=list)

    def exec_start(self) -> str:
        """Return the unit's ExecStart command line."""
        args = [
            *self.command,
            "daemon",
            "--device",
            self.device,
            "--socket",
            self.socket,
        ]
        if self.size is not None:
            args += ["--size", str(self.size)]
        if self.mountpoint:
            args += ["--mountpoint", self.mountpoint]
        if self.docker_root:
            args += ["--docker-root", self.docker_root]
        args += [
            "--stop-timeout",
            f"{self.stop_timeout:g}",
            "--log-level",
            self.log_level,
        ]
        args += self.extra_args
        return shlex.join(args)


def default_command() -> list[str]:
    """Return the command that starts ``lcfs``, as an absolute path.

    The console script installed beside this interpreter comes first,
    because a pyenv or shell wrapper found on PATH may need an environment
    that systemd does not set.
    """
    script = Path(sys.executable).with_name("lcfs")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "lcfs.cli"]


def render_unit(config: ServiceConfig) -> str:
    """Return the text of the systemd unit that runs the daemon."""
    stop_seconds = int(config.stop_timeout) + STOP_TIMEOUT_MARGIN
    return f"""\
[Unit]
Description=lcfs copy-on-write layer store, Docker graphdriver plugin
# dockerd looks for the plugin socket when it starts and retries for about
# 16 seconds, so lcfs starts first and stops after dockerd's Cleanup.
Before={DOCKER_UNIT}
After=local-fs.target
RequiresMountsFor={os.path.dirname(config.device)}

[Service]
Type=simple
ExecStart={config.exec_start()}
# SIGTERM goes to the daemon only: it unmounts and then ends its FUSE
# watchdog itself. Whatever is left gets SIGKILL after the timeout.
KillMode=mixed
KillSignal=SIGTERM
TimeoutStopSec={stop_seconds}
Restart=on-failure
RestartSec=1
LimitNOFILE=1048576

[Install]
WantedBy={DOCKER_UNIT} multi-user.target
"""


def render_spec(socket_path: str) -> str:
    """Return the plugin spec file's content: the socket's URL and nothing else."""
    return f"unix://{socket_path}\n"


def _under(root: str, path: str) -> Path:
    return Path(root) / path.lstrip("/")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _root_option(root: str) -> str:
    """Return " --root DIR" to repeat in a suggested command, or "" for /."""
    if os.path.abspath(root) == "/":
        return ""
    return f" --root {shlex.quote(root)}"


def _previous_record(manifest: Path) -> dict:
    """Return the manifest of an earlier install that --force replaces.

    Its files and directories stay in the new manifest, so that uninstall
    removes them too. An unreadable manifest is logged, and the result is
    then empty.
    """
    try:
        record = json.loads(manifest.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        log.warning(
            "cannot read the earlier install manifest %s (%s), so lcfs "
            "uninstall will not remove what that install wrote; remove those "
            "files by hand",
            manifest,
            error,
        )
        return {}
    return record if isinstance(record, dict) else {}


def _make_dirs(root: str, directory: str, created: list[str]) -> None:
    """Create ``directory`` under ``root`` and its missing parents; record each."""
    missing = []
    current = directory
    while current != "/" and not _under(root, current).exists():
        missing.append(current)
        current = os.path.dirname(current)
    for path in reversed(missing):
        _under(root, path).mkdir(mode=0o755)
        created.append(path)


def _write_new(root: str, path: str, content: str, force: bool) -> None:
    target = _under(root, path)
    if target.exists() and not force:
        raise InstallError(f"{target} exists already; remove it or pass --force")
    partial = target.with_name(target.name + ".partial")
    partial.write_text(content)
    os.chmod(partial, 0o644)
    os.rename(partial, target)


def install(config: ServiceConfig, root: str = "/", force: bool = False) -> list[Path]:
    """Write the unit, the plugin spec and the manifest; return the paths written."""
    if not os.path.isdir(root):
        raise InstallError(f"--root {root} is not a directory; create it first")
    manifest = _under(root, MANIFEST_PATH)
    if manifest.exists() and not force:
        raise InstallError(
            f"lcfs is installed already ({manifest} exists); run "
            f"'lcfs uninstall{_root_option(root)}' first or pass --force"
        )
    previous = _previous_record(manifest)
    spec_path = f"{SPEC_DIR}/{Path(config.socket).stem}.spec"
    files = {UNIT_PATH: render_unit(config), spec_path: render_spec(config.socket)}
    created_dirs: list[str] = list(previous.get("directories", []))
    for path, content in files.items():
        _make_dirs(root, os.path.dirname(path), created_dirs)
        _write_new(root, path, content, force)
        log.debug("wrote %s", _under(root, path))
    _make_dirs(root, os.path.dirname(MANIFEST_PATH), created_dirs)
    digests = dict(previous.get("files", {}))
    digests.update((path, _sha256(content.encode())) for path, content in files.items())
    record = {"files": digests, "directories": created_dirs}
    _write_new(root, MANIFEST_PATH, json.dumps(record, indent=2) + "\n", force=True)
    return [_under(root, path) for path in [*files, MANIFEST_PATH]]


def _enabled_links(root: str) -> list[Path]:
    links = []
    for directory in WANTS_DIRS:
        link = _under(root, directory) / UNIT_NAME
        if link.is_symlink() or link.exists():
            links.append(link)
    return links


def uninstall(root: str = "/") -> tuple[list[Path], list[Path]]:
    """Remove what install wrote; return (removed paths, changed files left in place)."""
    manifest = _under(root, MANIFEST_PATH)
    try:
        record = json.loads(manifest.read_text())
    except FileNotFoundError:
        raise InstallError(
            f"lcfs is not installed: {manifest} does not exist"
        ) from None
    except (OSError, ValueError) as error:
        raise InstallError(
            f"cannot read the install manifest {manifest}: {error}"
        ) from None
    links = _enabled_links(root)
    if links:
        if _root_option(root):
            disable = f"systemctl{_root_option(root)} disable {UNIT_NAME}"
        else:
            disable = f"systemctl disable --now {UNIT_NAME}"
        raise InstallError(
            f"{UNIT_NAME} is still enabled ({', '.join(map(str, links))}); run "
            f"'{disable}' first"
        )
    removed, changed = [], []
    for path, digest in record.get("files", {}).items():
        target = _under(root, path)
        try:
            content = target.read_bytes()
        except FileNotFoundError:
            log.info("%s is gone already", target)
            continue
        if _sha256(content) != digest:
            log.warning(
                "keeping %s: it was changed after lcfs install wrote it", target
            )
            changed.append(target)
            continue
        target.unlink()
        removed.append(target)
        log.debug("removed %s", target)
    manifest.unlink()
    removed.append(manifest)
    for directory in reversed(record.get("directories", [])):
        target = _under(root, directory)
        try:
            target.rmdir()
        except FileNotFoundError:
            continue
        except OSError as error:
            log.info("keeping directory %s: %s", target, error.strerror)
            continue
        removed.append(target)
        log.debug("removed directory %s", target)
    return removed, changed
