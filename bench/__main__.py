"""``python -m bench``: run every benchmark and regenerate the benchmark page sections.

Order: build the inputs (cached), start one dockerd per storage driver,
run each Docker phase on every driver in turn (one driver at a time), then
the measurements on lcfs alone, then containerd with both snapshotters. A full run writes the "Driver
comparison" and "containerd snapshotter" sections of docs/benchmarks.md,
the plots under docs/img/ and the samples to bench/results/; a quick run
writes the same files under .cache/bench/quick/ and leaves docs/ alone.

A run of some phases only, or of other drivers, is a rerun. The workloads
it measured take its figures in the saved results, and the rest keep
theirs (``Results.merge_rerun``). Every run also writes its own samples to
.cache/bench/last-run.json. The saved results and the page change only
when a run finishes, so an interrupted run loses nothing saved before.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

from .common import (
    REPO_ROOT,
    cache_dir,
    command_version,
    journaled_ext4,
    load_average,
    spread_subdirectories,
    wait_for_quiet_machine,
)

log = logging.getLogger("bench")

PHASE_NAMES = (
    "import",
    "containers",
    "write",
    "read",
    "scan",
    "commit",
    "build",
    "page_cache",
)
EXTRA_NAMES = ("chain", "start", "containerd")
DEFAULT_DRIVERS = "overlay2,fuse-overlayfs,vfs,lcfs,lcfs-shared"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="run every workload once at reduced sizes (under 5 minutes) to check "
        "the harness; results go under .cache/bench/quick/",
    )
    parser.add_argument(
        "--drivers",
        default=DEFAULT_DRIVERS,
        help="comma-separated storage drivers to compare, in run order "
        "(default %(default)s); with fewer, the run is a rerun (see --only)",
    )
    parser.add_argument(
        "--only",
        default=",".join(PHASE_NAMES + EXTRA_NAMES),
        help="comma-separated phases to run (default: all): "
        f"{', '.join(PHASE_NAMES + EXTRA_NAMES)}. A run of fewer phases is a "
        "rerun: the workloads it measures replace theirs in the saved results "
        "of the last full run on this machine, and the page says which",
    )
    parser.add_argument(
        "--no-profile",
        action="store_true",
        help="do not rerun missed lcfs workloads under py-spy",
    )
    parser.add_argument(
        "--max-load",
        type=float,
        default=1.5,
        help="before a full run, wait while the 1-minute load average is above "
        "this (default %(default)s)",
    )
    parser.add_argument(
        "--max-wait",
        type=float,
        default=20 * 60,
        help="maximum wait for the load average, in seconds (default %(default)s)",
    )
    parser.add_argument(
        "--report-only",
        type=Path,
        metavar="RESULTS_JSON",
        help="regenerate the page from saved results without running anything",
    )
    parser.add_argument(
        "--page",
        type=Path,
        help="page to write (default docs/benchmarks.md, "
        "or .cache/bench/quick/benchmarks.md with --quick)",
    )
    parser.add_argument(
        "--ext4-image",
        metavar="SIZE",
        help="put every driver's data root on a new ext4 file system with a "
        "journal, made on a sparse image file of this size (64G, say) in the "
        "work directory and mounted through a loop device. The daemons' logs "
        "are removed with it. Results go to "
        "bench/results/driver-comparison-ext4.json and the page section "
        "'Driver comparison on ext4 with a journal', and the page then also "
        "compares lcfs's figures with the last run without this option. By "
        "default the data roots are on the file system of the temporary "
        "directory",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    return parser


def _pyfuse3_version(pyfuse3) -> str:
    level = getattr(pyfuse3, "LCFS_PATCH_LEVEL", 0)
    if not level:
        return f"{pyfuse3.__version__} (stock: no kernel symlink or listing caches)"
    return f"{pyfuse3.__version__}, built by scripts/build_pyfuse3.py (patch level {level})"


def machine_info() -> dict[str, object]:
    import lmdb
    import pyfuse3

    with open("/proc/meminfo") as f:
        total_kib = int(f.readline().split()[1])
    fuse_overlayfs = subprocess.run(
        ["fuse-overlayfs", "--version"], capture_output=True, text=True, check=False
    ).stdout
    return {
        "date": datetime.date.today().isoformat(),
        "nproc": os.cpu_count(),
        "memory": f"{total_kib / (1 << 20):.1f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "pyfuse3": _pyfuse3_version(pyfuse3),
        "lmdb": lmdb.__version__,
        "dockerd": command_version(["dockerd", "--version"]),
        "containerd": command_version(["containerd", "--version"]),
        "fuse_overlayfs": next(
            (
                line
                for line in fuse_overlayfs.splitlines()
                if line.startswith("fuse-overlayfs")
            ),
            "unavailable",
        ),
        "libfuse": command_version(["dpkg-query", "-W", "libfuse3-3"]),
        "backing_fs": command_version(
            ["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", tempfile.gettempdir()]
        ),
    }


def _run_step(results, step: str, function, *args) -> bool:
    """Run one phase; on failure log it, note it on the page and carry on."""
    try:
        function(*args)
        return True
    except Exception as error:  # noqa: BLE001 - one failed phase must not end the run
        log.error("%s failed:\n%s", step, traceback.format_exc())
        first_line = (
            str(error).strip().splitlines()[0]
            if str(error).strip()
            else type(error).__name__
        )
        results.notes.append(f"{step} failed: {first_line}")
        return False


def _schedule(drivers: list, runs: int, in_rounds: bool):
    """Yield (driver, stack, runs, label) for each step of one phase, in order.

    With ``in_rounds`` each step is one run, in rounds over all drivers, and
    each round starts one driver further on. Otherwise each driver's runs
    form one step.
    """
    if not in_rounds:
        for driver, stack in drivers:
            yield driver, stack, runs, ""
        return
    for round_index in range(runs):
        start = round_index % len(drivers) if drivers else 0
        for driver, stack in drivers[start:] + drivers[:start]:
            yield driver, stack, 1, f" (run {round_index + 1} of {runs})"


def run_docker_phases(
    args, results, runs, chosen, docker_phases, workdir, workloads
) -> None:
    """Run each Docker phase on every driver in turn, then profile lcfs's misses.

    All dockerds run side by side, but only one works at a time. The phases
    form the outer loop, so each phase is measured on every driver within a
    few minutes and a change in the machine's load does not fall on one
    driver alone. The phases in ``DockerPhases.ROUND_ROBIN`` go further and
    run in rounds of one run on each driver, with the first driver moving
    one place each round.
    """
    from .drivers import DriverStack
    from .profiling import PySpy
    from .results import Recorder

    stacks = {}
    ready = {}
    try:
        for driver in args.drivers.split(","):
            stack = DriverStack(driver, workdir / driver)
            if _run_step(results, f"starting dockerd with {driver}", stack.start):
                stacks[driver] = stack
                if _run_step(
                    results, f"preparing {driver}", docker_phases.prepare, stack
                ):
                    ready[driver] = stack
        for name, function, _ in chosen:
            in_rounds = name in docker_phases.ROUND_ROBIN
            phase_runs = docker_phases.sizes.rounds if in_rounds else runs
            for driver, stack, step_runs, label in _schedule(
                list(ready.items()), phase_runs, in_rounds
            ):
                log.info("== %s: %s%s", driver, name, label)
                # Write back what the previous phase left dirty, so that its
                # writeback does not fall into this driver's time.
                os.sync()
                _run_step(
                    results,
                    f"{name}{label} on {driver}",
                    function,
                    stack,
                    Recorder(results, driver),
                    step_runs,
                )
        # A quick run skips the profiles, which would take it past 5 minutes.
        lcfs = ready.get("lcfs")
        if (
            lcfs is None
            or args.no_profile
            or args.quick
            or shutil.which("py-spy") is None
        ):
            return
        missed = {
            key
            for key in workloads
            if (outcome := results.check(workloads[key])).met is False
            and outcome.workload.section == "docker"
        }
        profiler = PySpy(lcfs.daemon_pid, cache_dir() / "profiles")
        for name, function, keys in chosen:
            if keys & missed:
                log.info(
                    "== lcfs: profiling %s for %s",
                    name,
                    ", ".join(sorted(keys & missed)),
                )
                recorder = Recorder(results, "lcfs", profiler, frozenset(keys & missed))
                _run_step(
                    results, f"profiling {name} on lcfs", function, lcfs, recorder, 1
                )
        results.profiles.update(profiler.summaries)
    finally:
        for stack in stacks.values():
            stack.stop()


def run(args: argparse.Namespace, results, sizes, workdir: Path) -> None:
    from . import containerd_bench, micro
    from .docker_bench import DockerPhases
    from .results import Recorder
    from .workloads import catalogue

    selected = set(args.only.split(","))
    unknown = selected - set(PHASE_NAMES + EXTRA_NAMES)
    if unknown:
        raise SystemExit(f"unknown phases: {', '.join(sorted(unknown))}")
    workloads = {w.key: w for w in catalogue(sizes)}
    runs = sizes.runs

    docker_phases = DockerPhases(sizes, workdir)
    chosen = [p for p in docker_phases.phases() if p[0] in selected]
    results.meta["reused_images"] = docker_phases.reuse_images(
        [name for name, _, _ in chosen]
    )
    results.meta["round_robin_phases"] = [
        name for name, _, _ in chosen if name in docker_phases.ROUND_ROBIN
    ]
    if chosen:
        run_docker_phases(
            args, results, runs, chosen, docker_phases, workdir, workloads
        )

    if "chain" in selected:
        log.info("== lcfs alone: layer chain of %d", sizes.chain_depth)
        _run_step(
            results,
            "layer chain",
            micro.layer_chain,
            sizes,
            workdir / "chain",
            Recorder(results, "lcfs"),
            runs,
        )
    if "start" in selected:
        log.info("== lcfs alone: daemon start with %d layers", sizes.start_layers)
        _run_step(
            results,
            "daemon start",
            micro.daemon_start,
            sizes,
            workdir / "start",
            Recorder(results, "lcfs"),
            runs,
        )
    if "containerd" in selected:
        log.info("== containerd snapshotters")
        recorders = {
            name: Recorder(results, name) for name in containerd_bench.SNAPSHOTTERS
        }
        _run_step(
            results,
            "containerd snapshotters",
            containerd_bench.run,
            sizes,
            workdir / "containerd",
            recorders,
            runs,
        )


def is_rerun(args: argparse.Namespace) -> bool:
    """Tell whether the run leaves out phases or drivers of a full run."""
    all_phases = set(args.only.split(",")) == set(PHASE_NAMES + EXTRA_NAMES)
    all_drivers = set(args.drivers.split(",")) == set(DEFAULT_DRIVERS.split(","))
    return not (all_phases and all_drivers)


def read_findings() -> str:
    """Return bench/findings.md, the hand-written explanation of the misses, if present."""
    path = REPO_ROOT / "bench" / "findings.md"
    return path.read_text() if path.exists() else ""


def saved_results(journaled: bool) -> Path:
    """Return the file of a full run's results, on journaled ext4 (--ext4-image) or not."""
    name = "driver-comparison-ext4.json" if journaled else "driver-comparison.json"
    return REPO_ROOT / "bench" / "results" / name


def print_summary(results, workloads) -> None:
    from .report import _target_value, _verdict, outcomes

    if results.meta.get("mode") == "quick":
        print(
            "Targets at quick sizes, one run each. This checks that the harness "
            "works; only a full run's figures decide the targets."
        )
    else:
        print("Targets:")
    for outcome in outcomes(results, workloads):
        print(
            f"{outcome.workload.key:22} {outcome.workload.target.text:28} "
            f"{_target_value(outcome):>12}  {_verdict(outcome)}"
        )
    for note in results.notes:
        print(f"note: {note}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from .config import FULL, QUICK
    from .report import JOURNALED_EXT4, is_journaled, write_page
    from .results import Results, machine_differences
    from .workloads import catalogue

    sizes = QUICK if args.quick else FULL
    quick_dir = cache_dir() / "quick"
    page = args.page or (
        quick_dir / "benchmarks.md"
        if args.quick
        else REPO_ROOT / "docs" / "benchmarks.md"
    )
    suffix = "-ext4" if args.ext4_image else ""
    if args.quick:
        results_path = quick_dir / f"results{suffix}.json"
    else:
        results_path = saved_results(journaled=bool(args.ext4_image))

    def companion_of(results: Results) -> Results | None:
        # The last full run on the other kind of file system, for the page's
        # table of both.
        if args.quick:
            return None
        other = saved_results(journaled=not is_journaled(results))
        return Results.load(other) if other.exists() else None

    if args.report_only:
        results = Results.load(args.report_only)
        write_page(
            page, results, catalogue(sizes), read_findings(), companion_of(results)
        )
        print_summary(results, catalogue(sizes))
        return 0
    if os.geteuid() != 0:
        print(
            "python -m bench: run as root: it starts dockerd and mounts filesystems",
            file=sys.stderr,
        )
        return 2

    machine = machine_info()
    saved = None
    if not args.quick and is_rerun(args) and results_path.exists():
        saved = Results.load(results_path)
        differences = machine_differences(saved.meta, machine)
        if differences:
            print(
                f"python -m bench: {results_path} contains a run from another machine "
                f"({'; '.join(differences)}), so this run's figures cannot join it; "
                "run every phase with the default drivers to replace it",
                file=sys.stderr,
            )
            return 2
    results = Results()
    load_start = load_average()
    if not args.quick:
        load_start = wait_for_quiet_machine(args.max_load, args.max_wait)
    results.meta.update(machine)
    results.meta.update(
        mode="quick" if args.quick else "full",
        runs=sizes.runs,
        rounds=sizes.rounds,
        snapshot_cycles=sizes.snapshot_cycles,
        command="python -m bench "
        + shlex.join(argv if argv is not None else sys.argv[1:]),
    )
    workdir = Path(tempfile.mkdtemp(prefix="lcfs-bench-"))
    try:
        with contextlib.ExitStack() as data_fs:
            data_dir = workdir
            if args.ext4_image:
                data_dir = data_fs.enter_context(
                    journaled_ext4(workdir, args.ext4_image)
                )
                results.meta["data_fs"] = JOURNALED_EXT4
                results.meta["backing_fs"] = (
                    f"ext4 with a journal on a loop device ({args.ext4_image} image file "
                    f"on {results.meta['backing_fs']})"
                )
            results.meta["spread_data_roots"] = spread_subdirectories(data_dir)
            run(args, results, sizes, data_dir)
    finally:
        results.meta["load"] = f"{load_start} / {load_average()}"
        this_run = cache_dir() / f"last-run{suffix}.json"
        results.save(this_run)
        log.info("wrote this run's samples to %s", this_run)
        from mounts import remove_tree

        if results.notes:
            log.warning(
                "keeping %s for the daemons' logs, because a step failed", workdir
            )
        else:
            remove_tree(workdir)
    if saved is not None:
        measured = saved.merge_rerun(results)
        log.info(
            "%s keeps its other figures and takes this run's for %s",
            results_path,
            ", ".join(measured) or "nothing",
        )
        results = saved
    results.save(results_path)
    write_page(page, results, catalogue(sizes), read_findings(), companion_of(results))
    print(f"results: {results_path}\npage: {page}")
    print_summary(results, catalogue(sizes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
