"""The catalogue of figures the benchmarks report, with their targets.

Ratios compare medians from the same run. For times, a ratio is lcfs's
time over overlay2's; "N times faster" targets are overlay2's time over
lcfs's. Throughput targets compare lcfs's MiB/s with the reference's.
"""

from __future__ import annotations

from .common import MIB
from .config import Sizes
from .results import Target, Workload


def _size(nbytes: int) -> str:
    return f"{nbytes // (1 << 30)} GiB" if nbytes >= 1 << 30 else f"{nbytes // MIB} MiB"


def _at_most(key: str, limit: float, reference: str = "overlay2") -> Target:
    return Target(
        f"lcfs/{reference} ≤ {limit:g}", (key, "lcfs"), (key, reference), limit
    )


def catalogue(sizes: Sizes) -> list[Workload]:
    """Return every figure of a run with these sizes, in report order."""
    big = _size(sizes.big_file)
    depth = sizes.chain_depth
    return [
        Workload(
            "import_minbase",
            "`docker import` of the Debian minbase",
            "s",
            target=_at_most("import_minbase", 1.5),
        ),
        Workload(
            "load_5layer",
            "`docker load` of a 5-layer image (minbase + 4 layers)",
            "s",
            target=_at_most("load_5layer", 1.5),
        ),
        Workload(
            "containers",
            f"create, start and remove {sizes.containers} containers",
            "s",
            target=_at_most("containers", 1.0),
        ),
        Workload(
            "containers_create", f"  of which `docker create` ×{sizes.containers}", "s"
        ),
        Workload(
            "containers_start", f"  of which `docker start` of {sizes.containers}", "s"
        ),
        Workload(
            "containers_remove", f"  of which `docker rm` of {sizes.containers}", "s"
        ),
        Workload(
            "containers_cpu", "  CPU time used on the machine during the round", "s"
        ),
        Workload("containers_cpu_dockerd", "  of which by dockerd", "s"),
        Workload("containers_cpu_lcfs", "  of which by the lcfs daemon", "s"),
        Workload(
            "write_1byte",
            f"first write of 1 byte into a {big} file from the image",
            "s",
            target=Target(
                "overlay2/lcfs ≥ 100",
                ("write_1byte", "overlay2"),
                ("write_1byte", "lcfs"),
                100,
                at_most=False,
            ),
        ),
        Workload(
            "commit_small",
            f"`docker commit`, 10 files changed on an image of {sizes.many_files:,} files",
            "s",
            target=_at_most("commit_small", 1.0),
        ),
        Workload(
            "commit_big",
            f"`docker commit` of a container that wrote {_size(sizes.commit_write)}",
            "s",
            target=Target(
                "overlay2/lcfs ≥ 10",
                ("commit_big", "overlay2"),
                ("commit_big", "lcfs"),
                10,
                at_most=False,
            ),
        ),
        Workload(
            "build",
            f"classic `docker build`, {sizes.build_steps} RUN and COPY steps",
            "s",
            target=_at_most("build", 1.0),
        ),
        Workload(
            "read_cold",
            f"sequential read of a {big} file in a container, cold",
            "MiB/s",
            higher_is_better=True,
            target=Target(
                "lcfs/fuse-overlayfs ≥ 0.5",
                ("read_cold", "lcfs"),
                ("read_cold", "fuse-overlayfs"),
                0.5,
                at_most=False,
            ),
        ),
        Workload(
            "read_warm",
            f"sequential read of a {big} file in a container, warm",
            "MiB/s",
            higher_is_better=True,
            target=Target(
                "lcfs/overlay2 ≥ 0.9",
                ("read_warm", "lcfs"),
                ("read_warm", "overlay2"),
                0.9,
                at_most=False,
            ),
        ),
        Workload(
            "tar_usr",
            "`tar cf /dev/null /usr` in a container, warm",
            "s",
            target=_at_most("tar_usr", 1.5),
        ),
        Workload(
            "tar_usr_read",
            "`tar cf - /usr | cat >/dev/null` (reads contents), warm",
            "s",
        ),
        Workload(
            "find_root",
            "`find / -xdev -ls` in a container, warm",
            "s",
            target=_at_most("find_root", 1.5),
        ),
        Workload(
            "page_cache",
            f"{sizes.shared_readers} containers read one {_size(sizes.shared_file)} file: "
            "growth of Cached",
            "MiB",
            target=_at_most("page_cache", 1.2),
        ),
        # Direct measurements on an lcfs mount, driver "lcfs" only.
        Workload(
            "chain_small_1",
            f"read {sizes.chain_small_files} 4 KiB files, depth 1, cold",
            "s",
            section="micro",
        ),
        Workload(
            "chain_small_n",
            f"read {sizes.chain_small_files} 4 KiB files, depth {depth}, cold",
            "s",
            section="micro",
            target=Target(
                f"depth {depth} / depth 1 ≤ 1.5",
                ("chain_small_n", "lcfs"),
                ("chain_small_1", "lcfs"),
                1.5,
            ),
        ),
        Workload(
            "chain_big_1",
            f"read a {_size(sizes.chain_big_file)} file, depth 1, cold",
            "s",
            section="micro",
        ),
        Workload(
            "chain_big_n",
            f"read a {_size(sizes.chain_big_file)} file, depth {depth}, cold",
            "s",
            section="micro",
            target=Target(
                f"depth {depth} / depth 1 ≤ 1.5",
                ("chain_big_n", "lcfs"),
                ("chain_big_1", "lcfs"),
                1.5,
            ),
        ),
        Workload(
            "chain_warm_1",
            f"read {sizes.chain_small_files} 4 KiB files, depth 1, warm",
            "s",
            section="micro",
        ),
        Workload(
            "chain_warm_n",
            f"read {sizes.chain_small_files} 4 KiB files, depth {depth}, warm",
            "s",
            section="micro",
        ),
        Workload(
            "chain_create",
            f"create a chain of {depth} layers (plugin Create calls)",
            "s",
            section="micro",
        ),
        Workload(
            "daemon_start",
            f"`lcfs daemon` start to ready, {sizes.start_layers:,} layers",
            "s",
            section="micro",
            target=Target("< 1 s", ("daemon_start", "lcfs"), None, 1.0),
        ),
        Workload(
            "daemon_start_empty",
            "`lcfs daemon` start to ready, empty store",
            "s",
            section="micro",
        ),
        Workload(
            "daemon_peak_rss",
            "peak resident memory of `lcfs daemon` importing the minbase",
            "MiB",
            section="micro",
            target=Target("< 200 MiB", ("daemon_peak_rss", "lcfs"), None, 200),
        ),
        # containerd, drivers "overlayfs" and "lcfs" (snapshotter names).
        Workload(
            "ctr_import",
            "`ctr images import` of the Debian minbase",
            "s",
            section="containerd",
        ),
        Workload(
            "snapshot_cycle",
            "Prepare + Commit + Remove through containerd",
            "ms",
            section="containerd",
        ),
        Workload("snapshot_prepare", "  of which Prepare", "ms", section="containerd"),
        Workload("snapshot_commit", "  of which Commit", "ms", section="containerd"),
        Workload("snapshot_remove", "  of which Remove", "ms", section="containerd"),
        Workload(
            "snapshot_cycle_direct",
            "Prepare + Commit + Remove on the lcfs socket, without containerd",
            "ms",
            section="containerd",
        ),
    ]
