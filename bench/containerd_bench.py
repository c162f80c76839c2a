"""containerd: lcfs as a proxy snapshotter against containerd's overlayfs snapshotter.

One Debian containerd (tests/snapshotter_helpers.py: its own root, state,
socket and config, CRI disabled, `unshare --net`) has both snapshotters:
its built-in ``overlayfs`` and ``lcfs`` served by an `lcfs daemon
--snapshotter-socket`. For each snapshotter the run times `ctr images
import` of the Debian minbase as an OCI archive (removing the image with a
synchronous garbage collection between runs), then Prepare, Commit and
Remove cycles on the imported layer through containerd's Snapshots API.
For lcfs the same cycles also go straight to the daemon's socket, which
shows what containerd's own bookkeeping adds. Through containerd, Remove
only deletes containerd's record; the snapshotter's removal follows at
containerd's next garbage collection, which runs in the background.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import grpc
from snapshotter_helpers import Containerd, SnapshotterDaemon

from lcfs.driver.proto import snapshots_pb2, snapshots_pb2_grpc

from . import artifacts
from .common import MIB
from .config import Sizes
from .results import Recorder

log = logging.getLogger(__name__)

SNAPSHOTTERS = ("overlayfs", "lcfs")
BASE_NAME = "docker.io/bench/minbase"
LEASE = "bench-snapshot-cycles"


def _chain_id(layer: Path) -> str:
    digest = hashlib.sha256()
    with open(layer, "rb") as f:
        while chunk := f.read(4 * MIB):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def _cycles(
    stub, snapshotter: str, parent: str, count: int, prefix: str, metadata: tuple = ()
) -> dict[str, list[float]]:
    """Run ``count`` Prepare, Commit, Remove cycles; return milliseconds per step."""
    steps: dict[str, list[float]] = {
        "prepare": [],
        "commit": [],
        "remove": [],
        "cycle": [],
    }
    for number in range(count):
        key, name = f"{prefix}-active-{number}", f"{prefix}-committed-{number}"
        t0 = time.perf_counter()
        stub.Prepare(
            snapshots_pb2.PrepareSnapshotRequest(
                snapshotter=snapshotter, key=key, parent=parent
            ),
            metadata=metadata,
            timeout=60,
        )
        t1 = time.perf_counter()
        stub.Commit(
            snapshots_pb2.CommitSnapshotRequest(
                snapshotter=snapshotter, name=name, key=key
            ),
            metadata=metadata,
            timeout=60,
        )
        t2 = time.perf_counter()
        stub.Remove(
            snapshots_pb2.RemoveSnapshotRequest(snapshotter=snapshotter, key=name),
            metadata=metadata,
            timeout=60,
        )
        t3 = time.perf_counter()
        for step, seconds in (
            ("prepare", t1 - t0),
            ("commit", t2 - t1),
            ("remove", t3 - t2),
            ("cycle", t3 - t0),
        ):
            steps[step].append(seconds * 1000)
    return steps


def run(sizes: Sizes, workdir: Path, recorders: dict[str, Recorder], runs: int) -> None:
    """Measure both snapshotters; ``recorders`` maps each snapshotter name to its recorder."""
    minbase = artifacts.minbase_tar()
    archive, reference = artifacts.oci_archive("minbase", [minbase], BASE_NAME)
    chain_id = _chain_id(minbase)
    daemon = SnapshotterDaemon(workdir / "lcfs", size="16G")
    containerd = Containerd(workdir / "containerd", daemon.socket_path)
    try:
        daemon.start()
        containerd.start()
        channel = grpc.insecure_channel(f"unix:{containerd.socket_path}")
        stub = snapshots_pb2_grpc.SnapshotsStub(channel)
        # Snapshots that no image, container or lease references are garbage to
        # containerd, and its collector may remove one between Commit and
        # Remove. A lease keeps them until the cycle removes them itself.
        containerd.ctr("leases", "create", "--id", LEASE)
        metadata = (
            ("containerd-namespace", containerd.namespace),
            ("containerd-lease", LEASE),
        )
        for snapshotter in SNAPSHOTTERS:
            rec = recorders[snapshotter]
            for run_number in range(runs):
                with rec.timed("ctr_import"):
                    containerd.ctr(
                        "images",
                        "import",
                        "--snapshotter",
                        snapshotter,
                        "--base-name",
                        BASE_NAME,
                        str(archive),
                        timeout=900,
                    )
                if run_number < runs - 1:
                    containerd.ctr("images", "rm", "--sync", reference)
            with rec.region("snapshot_cycle"):
                steps = _cycles(
                    stub,
                    snapshotter,
                    chain_id,
                    sizes.snapshot_cycles,
                    f"bench-{snapshotter}",
                    metadata,
                )
            for step, values in steps.items():
                for value in values:
                    rec.add(f"snapshot_{step}", value)
            if snapshotter != "lcfs":
                containerd.ctr("images", "rm", "--sync", reference)
        channel.close()
        # containerd has no record of the direct cycles' snapshots, and its
        # garbage collector removed one of them between Prepare and Commit,
        # so those cycles run once containerd has stopped. The imported
        # image's snapshot is still in lcfs and is picked by name.
        containerd.stop()
        committed = [
            info
            for info in daemon.list("kind==committed")
            if info.name.endswith("/" + chain_id)
        ]
        if len(committed) != 1:
            raise RuntimeError(
                f"expected the one imported snapshot in lcfs, "
                f"found {[info.name for info in committed]}"
            )
        direct = _cycles(
            daemon.client, "lcfs", committed[0].name, sizes.snapshot_cycles, "bench-direct"
        )
        for value in direct["cycle"]:
            recorders["lcfs"].add("snapshot_cycle_direct", value)
    finally:
        containerd.stop()
        daemon.cleanup()
        daemon.device.unlink(missing_ok=True)
