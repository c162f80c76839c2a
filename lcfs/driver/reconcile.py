"""Reconciliation of the store's layers with what Docker still references.

Docker registers an image layer in several steps (Create, ApplyDiff, then a
rename of a ``layerdb/tmp/write-set-*`` directory into
``layerdb/sha256/<chain id>``), so a crash in between leaves a layer no one
names. A store layer is referenced when one of these names its id:

* ``<root>/image/*/layerdb/sha256/*/cache-id`` (image layers), except in a
  directory named ``<chain id>-<random>-removing``. dockerd renames a layer's
  directory to that name before it calls Remove and no longer loads it as a
  layer, so a layer named only there is one that Docker is deleting,
* ``<root>/image/*/layerdb/mounts/*/mount-id`` or ``init-id`` (containers),
* any file of BuildKit's databases under ``<root>/buildkit`` (its own
  snapshots, found by searching the files for the id's bytes).

A layer that none of these names, that no referenced layer descends from,
and that is older than a grace period is an orphan. If any reference source
cannot be read, no layer is called an orphan: they are reported as unknown.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import time
from dataclasses import dataclass, field

from lcfs.store.format import MKFS_TEMP_PREFIX
from lcfs.store.snapshots import is_snapshot_layer

log = logging.getLogger(__name__)

DEFAULT_GRACE = 3600.0

# dockerd's layer store renames a layer directory with this suffix before it
# calls the driver's Remove, and deletes it once Remove succeeds.
REMOVING_SUFFIX = "-removing"


@dataclass
class References:
    ids: set[str] = field(default_factory=set)
    unreadable: list[str] = field(default_factory=list)
    buildkit_blobs: list[bytes] = field(default_factory=list)

    def names(self, layer_id: str) -> bool:
        if layer_id in self.ids:
            return True
        needle = layer_id.encode()
        return any(needle in blob for blob in self.buildkit_blobs)


def _read_id(path: str, refs: References) -> None:
    try:
        with open(path) as f:
            value = f.read().strip()
    except FileNotFoundError:
        return
    except OSError as exc:
        refs.unreadable.append(f"{path}: {exc.strerror}")
        return
    if value:
        refs.ids.add(value)


def _listdir(path: str, refs: References) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []
    except OSError as exc:
        refs.unreadable.append(f"{path}: {exc.strerror}")
        return []


def layerdb_dirs(docker_root: str) -> list[str]:
    image = os.path.join(docker_root, "image")
    try:
        drivers = sorted(os.listdir(image))
    except OSError:
        return []
    return [os.path.join(image, d, "layerdb") for d in drivers if os.path.isdir(os.path.join(image, d, "layerdb"))]


def read_references(docker_root: str) -> References:
    """Collect every layer id that Docker or BuildKit under ``docker_root`` names."""
    refs = References()
    if not os.path.isdir(docker_root):
        refs.unreadable.append(f"{docker_root}: not a directory")
        return refs
    layerdbs = layerdb_dirs(docker_root)
    if not layerdbs and os.path.isdir(os.path.join(docker_root, "image")):
        refs.unreadable.append(f"{docker_root}/image: no layerdb directory")
    for layerdb in layerdbs:
        sha = os.path.join(layerdb, "sha256")
        for name in _listdir(sha, refs):
            if not name.endswith(REMOVING_SUFFIX):
                _read_id(os.path.join(sha, name, "cache-id"), refs)
        mounts = os.path.join(layerdb, "mounts")
        for name in _listdir(mounts, refs):
            _read_id(os.path.join(mounts, name, "mount-id"), refs)
            _read_id(os.path.join(mounts, name, "init-id"), refs)
    buildkit = os.path.join(docker_root, "buildkit")
    for dirpath, _, filenames in os.walk(buildkit, onerror=lambda e: refs.unreadable.append(str(e))):
        for name in filenames:
            if not name.endswith(".db"):
                continue
            path = os.path.join(dirpath, name)
            try:
                with open(path, "rb") as f:
                    refs.buildkit_blobs.append(f.read())
            except OSError as exc:
                refs.unreadable.append(f"{path}: {exc.strerror}")
    return refs


@dataclass
class OrphanReport:
    orphans: list = field(default_factory=list)
    unknown: list = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)


def find_orphans(store, docker_root: str, grace: float = DEFAULT_GRACE, now: float | None = None) -> OrphanReport:
    """Return the store's layers that nothing under ``docker_root`` references.

    Orphans are ordered children first, so removing them in order never hits
    a layer that still has children.
    """
    now = time.time() if now is None else now
    refs = read_references(docker_root)
    # containerd's snapshots are not Docker's to reference; List and Cleanup
    # of the snapshotter account for them.
    layers = [layer for layer in store.list_layers() if not is_snapshot_layer(layer.id)]
    by_number = {layer.number: layer for layer in layers}
    keep: set[int] = set()
    for layer in layers:
        if refs.names(layer.id):
            current = layer
            while current is not None and current.number not in keep:
                keep.add(current.number)
                current = by_number.get(current.parent) if current.parent is not None else None
    report = OrphanReport(unreadable=refs.unreadable)
    candidates = [layer for layer in layers if layer.number not in keep and now - layer.created >= grace]
    candidates.sort(key=lambda layer: layer.depth, reverse=True)
    if refs.unreadable:
        report.unknown = candidates
    else:
        report.orphans = candidates
    return report


@dataclass
class StaleFile:
    path: str
    reason: str
    removable: bool = True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _socket_answers(path: str) -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(1.0)
        sock.connect(path)
        return True
    except OSError:
        return False
    finally:
        sock.close()


def find_stale_files(store, docker_root: str | None, grace: float = DEFAULT_GRACE,
                     now: float | None = None) -> list[StaleFile]:  # fmt: skip
    """Return leftovers of crashed or interrupted Docker and lcfs runs."""
    now = time.time() if now is None else now
    stale: list[StaleFile] = []
    if docker_root:
        for layerdb in layerdb_dirs(docker_root):
            sha = os.path.join(layerdb, "sha256")
            for name in _safe_listdir(sha):
                if name.endswith(REMOVING_SUFFIX):
                    stale.append(StaleFile(os.path.join(sha, name), "layer directory left by an interrupted removal"))
            tmp = os.path.join(layerdb, "tmp")
            for name in _safe_listdir(tmp):
                if name.startswith("write-set-"):
                    stale.append(StaleFile(os.path.join(tmp, name), "temporary layer directory of an unfinished import"))
            mounts = os.path.join(layerdb, "mounts")
            for name in _safe_listdir(mounts):
                path = os.path.join(mounts, name)
                try:
                    with open(os.path.join(path, "mount-id")) as f:
                        mount_id = f.read().strip()
                except OSError:
                    continue
                if not mount_id or store.exists(mount_id):
                    continue
                if os.path.isdir(os.path.join(docker_root, "containers", name)):
                    # dockerd still lists the container. Without this record it
                    # would skip the container at start and never remove it.
                    # NOTE: 'docker rm' succeeds only while the daemon remembers
                    # the layer as removed (Store.was_removed).
                    stale.append(StaleFile(
                        path, f"container {name} still exists but its layer {mount_id} is gone, "
                              f"so remove the container with 'docker rm -f {name}'",
                        removable=False))  # fmt: skip
                else:
                    stale.append(StaleFile(path, f"container mount record for missing layer {mount_id}"))
    socket_path = (store.get_meta("daemon.socket") or b"").decode() or None
    if socket_path:
        pid_path = os.path.join(os.path.dirname(socket_path), os.path.basename(socket_path).rsplit(".", 1)[0] + ".pid")
        pid = None
        try:
            with open(pid_path) as f:
                pid = int(f.read().strip() or 0)
        except (OSError, ValueError):
            pid = None
        if pid is not None and not _pid_alive(pid):
            stale.append(StaleFile(pid_path, f"pid file of dead process {pid}"))
        if os.path.exists(socket_path) and not _socket_answers(socket_path):
            stale.append(StaleFile(socket_path, "socket that no process serves"))
    home = (store.get_meta("driver.home") or b"").decode() or None
    if home and os.path.isdir(home) and not os.path.ismount(home):
        for name in _safe_listdir(home):
            path = os.path.join(home, name)
            empty = os.path.isdir(path) and not os.path.islink(path) and not _safe_listdir(path)
            stale.append(StaleFile(path, "leftover entry in the unmounted driver home", removable=empty))
    tmpdir = os.environ.get("TMPDIR", "/tmp")
    for name in _safe_listdir(tmpdir):
        if name.startswith(MKFS_TEMP_PREFIX):
            path = os.path.join(tmpdir, name)
            try:
                age = now - os.lstat(path).st_mtime
            except OSError:
                continue
            if age >= grace and not _locked(path):
                stale.append(StaleFile(path, "temporary directory of an interrupted mkfs"))
    return stale


def _locked(path: str) -> bool:
    """Return whether another process holds a flock on ``path``, as a running mkfs does."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _safe_listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def remove_stale(entry: StaleFile) -> None:
    """Delete one stale file or directory tree."""
    import shutil

    try:
        if os.path.isdir(entry.path) and not os.path.islink(entry.path):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise


def docker_root_from_home(home: str | None) -> str | None:
    """Return Docker's data root for a driver home such as /var/lib/docker/lcfs."""
    if not home:
        return None
    return os.path.dirname(os.path.normpath(home))
