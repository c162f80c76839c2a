"""Measurements taken straight on an lcfs mount or daemon, where Docker adds nothing.

- Layer chain: an `lcfs daemon` with a fixed mount point gets a bottom
  layer through the plugin's ApplyDiff (small files and large files) and
  a chain of read-only children through Create. Files are read through
  the mount at depth 1 (the bottom layer itself) and at the top of the
  chain, cold (after drop_caches) and warm. Every cold read uses files no
  earlier read has touched, so neither the kernel nor the daemon has them
  cached.
- Daemon start: a store with many layers is built offline with the store
  API, then `lcfs daemon` is started on it and timed from exec to the
  first reply to Plugin.Activate.
"""

from __future__ import annotations

import io
import json
import logging
import os
import stat
import subprocess
import tarfile
import time
from pathlib import Path

from dockerd import terminate, unix_http
from lcfs_daemon import PLUGIN_HEADERS, LcfsDaemon, lcfs_command
from mounts import unmount_under

from lcfs.store import ROOT_INO, Store

from .common import MIB, Stopwatch, drop_caches
from .config import Sizes
from .results import Recorder

log = logging.getLogger(__name__)

SMALL_FILE = 4096


def _layer_id(prefix: str, number: int) -> str:
    return f"{prefix}{number:08x}".ljust(64, "0")


def _bottom_tar(small_files: int, big_files: int, big_size: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        directory = tarfile.TarInfo("data")
        directory.type = tarfile.DIRTYPE
        directory.mode = 0o755
        archive.addfile(directory)
        entries = [(f"data/small{i}", SMALL_FILE) for i in range(small_files)]
        entries += [(f"data/big{i}", big_size) for i in range(big_files)]
        for name, size in entries:
            info = tarfile.TarInfo(name)
            info.size = size
            info.mode = 0o644
            archive.addfile(info, io.BytesIO(os.urandom(size)))
    return buffer.getvalue()


# The factor by which the layer chain takes more samples than the other workloads.
CHAIN_REPEATS = 2


def _read_files(paths: list[Path]) -> None:
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.read(MIB):
                pass


def layer_chain(sizes: Sizes, workdir: Path, rec: Recorder, runs: int) -> None:
    """Read files at depth 1 and at the top of a chain of ``sizes.chain_depth`` layers.

    Each figure gets ``CHAIN_REPEATS`` times ``runs`` samples, because the
    cold reads go to the disk: three cold reads of the 64 MiB file have
    taken from 47 to 183 ms at either depth.
    """
    runs *= CHAIN_REPEATS
    depth = sizes.chain_depth
    per_read = sizes.chain_small_files
    # Each run reads fresh files cold at both depths, then re-reads them warm.
    small_total = per_read * 2 * runs
    daemon = LcfsDaemon(workdir, size="16G", mountpoint=workdir / "mnt")
    daemon.start()
    try:
        bottom = _layer_id("chain", 0)
        daemon.call("GraphDriver.Create", {"ID": bottom})
        body = _bottom_tar(small_total, 2 * runs, sizes.chain_big_file)
        status, reply = unix_http(
            daemon.socket_path,
            "POST",
            f"/GraphDriver.ApplyDiff?id={bottom}",
            body,
            PLUGIN_HEADERS,
            timeout=600,
        )
        if status != 200 or json.loads(reply).get("Err"):
            raise RuntimeError(
                f"ApplyDiff of the chain's bottom layer failed: {status} {reply!r}"
            )
        parent = bottom
        with Stopwatch() as watch:
            for number in range(1, depth):
                layer = _layer_id("chain", number)
                daemon.call("GraphDriver.Create", {"ID": layer, "Parent": parent})
                parent = layer
        rec.add("chain_create", watch.seconds)
        mount = workdir / "mnt"
        tops = {"1": mount / bottom, "n": mount / parent}
        for run in range(runs):
            for index, (suffix, top) in enumerate(tops.items()):
                first = (2 * run + index) * per_read
                small = [
                    top / "data" / f"small{i}" for i in range(first, first + per_read)
                ]
                drop_caches()
                with rec.timed(f"chain_small_{suffix}"):
                    _read_files(small)
                with rec.timed(f"chain_warm_{suffix}"):
                    _read_files(small)
                drop_caches()
                with rec.timed(f"chain_big_{suffix}"):
                    _read_files([top / "data" / f"big{2 * run + index}"])
    finally:
        daemon.stop()
        unmount_under(workdir)
        daemon.device.unlink(missing_ok=True)


def build_store(device: Path, layers: int) -> None:
    """Format ``device`` and create ``layers`` layers: chains of 10, a few files in each base."""
    Store.mkfs(str(device), size=16 << 30)
    store = Store.open(str(device))
    try:
        parent = None
        for number in range(layers):
            layer_id = _layer_id("start", number)
            if number % 10 == 0:
                parent = None
            store.create_layer(layer_id, parent)
            if parent is None:
                layer = store.get_layer(layer_id).number
                etc = store.mkdir(layer, ROOT_INO, b"etc", 0o755, 0, 0).ino
                for name in (b"hostname", b"hosts", b"passwd"):
                    ino = store.mknod(
                        layer, etc, name, stat.S_IFREG | 0o644, 0, 0, 0
                    ).ino
                    store.write(layer, ino, 0, name * 20)
            parent = layer_id
        store.commit()
    finally:
        store.close()


def _activate_replied(socket_path: Path) -> bool:
    try:
        status, _ = unix_http(
            socket_path, "POST", "/Plugin.Activate", b"", PLUGIN_HEADERS, timeout=5
        )
    except (TimeoutError, OSError):
        return False
    return status == 200


def time_daemon_start(device: Path, workdir: Path) -> float:
    """Start `lcfs daemon` on ``device``; return seconds from exec to Activate's reply."""
    socket_path = workdir / "start.sock"
    mountpoint = workdir / "start-mnt"
    mountpoint.mkdir(parents=True, exist_ok=True)
    command = [
        lcfs_command(),
        "daemon",
        "--device",
        str(device),
        "--socket",
        str(socket_path),
        "--mountpoint",
        str(mountpoint),
        "--log-level",
        "warning",
    ]
    with open(workdir / "start.log", "ab") as log_file:
        started = time.perf_counter()
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = started + 120
        while not _activate_replied(socket_path):
            if process.poll() is not None:
                raise RuntimeError(
                    f"lcfs daemon exited with {process.returncode} during start; "
                    f"see {workdir / 'start.log'}"
                )
            if time.perf_counter() > deadline:
                raise RuntimeError(
                    f"lcfs daemon did not reply within 120 s; see {workdir / 'start.log'}"
                )
            time.sleep(0.005)
        return time.perf_counter() - started
    finally:
        terminate(process, 30, "lcfs daemon (start benchmark)")
        unmount_under(mountpoint)


def daemon_start(sizes: Sizes, workdir: Path, rec: Recorder, runs: int) -> None:
    """Time the daemon's start on an empty store and on one with ``sizes.start_layers`` layers."""
    workdir.mkdir(parents=True, exist_ok=True)
    for key, layers in (
        ("daemon_start_empty", 0),
        ("daemon_start", sizes.start_layers),
    ):
        device = workdir / f"start-{layers}.img"
        build_store(device, layers)
        try:
            for _ in range(runs):
                drop_caches()
                rec.add(key, time_daemon_start(device, workdir))
        finally:
            device.unlink(missing_ok=True)
