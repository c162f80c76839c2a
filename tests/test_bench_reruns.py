"""Reruns of some benchmark phases, whose figures join those of the saved full run."""

from __future__ import annotations

import os

import pytest

from bench import __main__ as bench_main
from bench import report
from bench.results import Results, Workload, machine_differences

BUILD = Workload("build", "classic `docker build` of 20 steps", "s")
IMPORT = Workload("import_minbase", "`docker import` of the Debian minbase", "s")
MACHINE = {"nproc": 2, "memory": "23.5 GiB", "kernel": "6.18.44"}


def full_run() -> Results:
    results = Results()
    for driver, value in (("overlay2", 4.0), ("vfs", 9.0), ("lcfs", 5.0)):
        results.add("build", driver, value)
        results.add("import_minbase", driver, value / 2)
    results.profiles["build"] = "old build profile"
    results.meta.update(
        MACHINE,
        date="2026-12-01",
        command="python -m bench",
        fuse_requests={"build": {"LOOKUP": 900}, "import_minbase": {"LOOKUP": 5}},
    )
    return results


def build_rerun() -> Results:
    rerun = Results()
    rerun.add("build", "overlay2", 4.2)
    rerun.add("build", "lcfs", 3.9)
    rerun.meta.update(
        MACHINE,
        date="2026-12-05",
        command="python -m bench --only build --drivers overlay2,lcfs",
        load="0.3 / 1.2",
        round_robin_phases=["build"],
        rounds=5,
    )
    rerun.notes.append("layer chain failed: device full")
    return rerun


def test_rerun_replaces_measured_workloads():
    saved = full_run()
    measured = saved.merge_rerun(build_rerun())
    assert measured == ["build"]
    # Every driver of the row comes from the rerun, so vfs has no build
    # figure now rather than one from another run.
    assert saved.samples["build"] == {"overlay2": [4.2], "lcfs": [3.9]}
    assert saved.samples["import_minbase"]["vfs"] == [4.5]
    assert "build" not in saved.profiles
    assert saved.meta["fuse_requests"] == {"import_minbase": {"LOOKUP": 5}}
    assert saved.meta["date"] == "2026-12-01"
    assert saved.meta["reruns"] == [
        {
            "date": "2026-12-05",
            "command": "python -m bench --only build --drivers overlay2,lcfs",
            "load": "0.3 / 1.2",
            "workloads": ["build"],
            "round_robin_phases": ["build"],
            "rounds": 5,
        }
    ]
    assert saved.notes == ["In the run of 2026-12-05: layer chain failed: device full"]


def test_rerun_brings_its_own_profile():
    saved = full_run()
    rerun = build_rerun()
    rerun.profiles["build"] = "new build profile"
    saved.merge_rerun(rerun)
    assert saved.profiles["build"] == "new build profile"


def test_page_names_rerun_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "plot", lambda *args: None)
    saved = full_run()
    saved.merge_rerun(build_rerun())
    page = tmp_path / "benchmarks.md"
    report.write_page(page, saved, [BUILD, IMPORT])
    text = page.read_text()
    assert "Run on 2026-12-01 with `python -m bench`" in text
    assert (
        "Every figure in these rows comes from a later run on 2026-12-05:\n\n"
        "- classic `docker build` of 20 steps\n"
    ) in text
    assert (
        "Its command was `python -m bench --only build --drivers overlay2,lcfs`"
    ) in text
    assert "load average at start / end was 0.3 / 1.2" in text
    assert "That run ran its build phase in 5 rounds of one run on each driver." in text
    # The saved run itself has no round-robin phases.
    assert "Each phase ran all its runs on one driver after the other" in text
    assert report.reruns_text(saved, [IMPORT]) == ""


def test_rerun_text_lists_several_rows():
    saved = full_run()
    rerun = build_rerun()
    rerun.add("import_minbase", "lcfs", 1.0)
    rerun.add("import_cpu", "lcfs", 2.0)
    saved.merge_rerun(rerun)
    # An indented row is part of the row above it and is not named.
    part = Workload("import_cpu", "  of which CPU", "s")
    assert report.reruns_text(saved, [BUILD, IMPORT, part]).startswith(
        "Every figure in these rows comes from a later run on 2026-12-05:\n\n"
        "- classic `docker build` of 20 steps\n"
        "- `docker import` of the Debian minbase\n\n"
    )


def test_later_rerun_replaces_earlier_rows():
    saved = full_run()
    first = build_rerun()
    first.add("import_minbase", "overlay2", 1.5)
    first.add("import_minbase", "lcfs", 1.4)
    saved.merge_rerun(first)
    second = build_rerun()
    second.meta["date"] = "2026-12-06"
    saved.merge_rerun(second)
    assert [(r["date"], r["workloads"]) for r in saved.meta["reruns"]] == [
        ("2026-12-05", ["import_minbase"]),
        ("2026-12-06", ["build"]),
    ]
    # A third rerun of the import leaves nothing of the first.
    third = Results()
    third.add("import_minbase", "lcfs", 1.3)
    third.meta.update(
        MACHINE, date="2026-12-07", command="python -m bench --only import"
    )
    saved.merge_rerun(third)
    assert [r["date"] for r in saved.meta["reruns"]] == ["2026-12-06", "2026-12-07"]
    text = report.reruns_text(saved, [BUILD, IMPORT])
    assert text.count("Every figure in these rows comes from a later run") == 2
    assert "2026-12-05" not in text


def test_saved_results_round_trip_keeps_reruns(tmp_path):
    saved = full_run()
    saved.merge_rerun(build_rerun())
    path = tmp_path / "results.json"
    saved.save(path)
    assert Results.load(path).meta["reruns"][0]["workloads"] == ["build"]


def test_machine_differences_name_both_values():
    assert machine_differences(MACHINE, dict(MACHINE)) == []
    other = dict(MACHINE, kernel="6.1.0", memory="8.0 GiB")
    assert machine_differences(MACHINE, other) == [
        "memory 23.5 GiB there, 8.0 GiB here",
        "kernel 6.18.44 there, 6.1.0 here",
    ]


@pytest.mark.parametrize(
    ("only", "drivers", "rerun"),
    [
        (None, None, False),
        ("build", None, True),
        (None, "overlay2,lcfs", True),
        (None, "lcfs-shared,lcfs,vfs,fuse-overlayfs,overlay2", False),
    ],
)
def test_is_rerun(only, drivers, rerun):
    args = bench_main._parser().parse_args(
        [
            *(["--only", only] if only else []),
            *(["--drivers", drivers] if drivers else []),
        ]
    )
    assert bench_main.is_rerun(args) is rerun


@pytest.fixture
def bench_run(tmp_path, monkeypatch):
    """main() with each run's phases replaced by the function given, and its files in tmp_path."""
    saved_path = tmp_path / "driver-comparison.json"
    monkeypatch.setenv("LCFS_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(bench_main, "saved_results", lambda journaled: saved_path)
    monkeypatch.setattr(bench_main, "machine_info", lambda: dict(MACHINE))
    monkeypatch.setattr(bench_main, "wait_for_quiet_machine", lambda *args: "0.1")
    monkeypatch.setattr(report, "plot", lambda *args: None)
    if os.geteuid() != 0:
        monkeypatch.setattr(bench_main.os, "geteuid", lambda: 0)
    phases = []

    def fake_run(args, results, sizes, workdir):
        phases.pop(0)(results)

    monkeypatch.setattr(bench_main, "run", fake_run)

    def main(*argv, phase):
        phases.append(phase)
        return bench_main.main([*argv, "--page", str(tmp_path / "page.md")])

    main.saved_path = saved_path
    main.last_run = tmp_path / "cache" / "last-run.json"
    return main


def _measure_build(results):
    results.add("build", "overlay2", 4.4)
    results.add("build", "lcfs", 4.0)


def test_main_rerun_keeps_other_figures(bench_run):
    full_run().save(bench_run.saved_path)
    assert bench_run("--only", "build", phase=_measure_build) == 0
    saved = Results.load(bench_run.saved_path)
    assert saved.samples["build"] == {"overlay2": [4.4], "lcfs": [4.0]}
    assert saved.samples["import_minbase"]["lcfs"] == [2.5]
    assert saved.meta["reruns"][0]["command"] == (
        f"python -m bench --only build --page {bench_run.saved_path.parent}/page.md"
    )
    # The run's own file holds only what it measured.
    assert set(Results.load(bench_run.last_run).samples) == {"build"}


def test_interrupted_run_keeps_saved_results(bench_run):
    full_run().save(bench_run.saved_path)
    before = bench_run.saved_path.read_text()

    def interrupted(results):
        _measure_build(results)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        bench_run(phase=interrupted)
    assert bench_run.saved_path.read_text() == before
    assert Results.load(bench_run.last_run).samples["build"]["lcfs"] == [4.0]


def test_rerun_rejects_other_machine(bench_run, capsys):
    saved = full_run()
    saved.meta["kernel"] = "6.1.0"
    saved.save(bench_run.saved_path)
    before = bench_run.saved_path.read_text()
    assert bench_run("--only", "build", phase=_measure_build) == 2
    assert "kernel 6.1.0 there, 6.18.44 here" in capsys.readouterr().err
    assert bench_run.saved_path.read_text() == before


def test_full_run_replaces_saved_results(bench_run):
    full_run().save(bench_run.saved_path)
    assert bench_run(phase=_measure_build) == 0
    saved = Results.load(bench_run.saved_path)
    assert set(saved.samples) == {"build"}
    assert "reruns" not in saved.meta


def test_schedule_of_round_robin_phase():
    drivers = [("overlay2", "o"), ("vfs", "v"), ("lcfs", "l")]
    steps = list(bench_main._schedule(drivers, 3, in_rounds=True))
    assert [driver for driver, *_ in steps] == [
        "overlay2", "vfs", "lcfs",
        "vfs", "lcfs", "overlay2",
        "lcfs", "overlay2", "vfs",
    ]  # fmt: skip
    assert {runs for _, _, runs, _ in steps} == {1}
    assert steps[3][3] == " (run 2 of 3)"


def test_schedule_of_other_phase():
    drivers = [("overlay2", "o"), ("lcfs", "l")]
    steps = list(bench_main._schedule(drivers, 3, in_rounds=False))
    assert steps == [("overlay2", "o", 3, ""), ("lcfs", "l", 3, "")]


def test_page_describes_round_robin_phases(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "plot", lambda *args: None)
    results = full_run()
    results.meta.update(
        round_robin_phases=["import", "containers", "build"], runs=3, rounds=5
    )
    page = tmp_path / "benchmarks.md"
    report.write_page(page, results, [BUILD, IMPORT])
    text = page.read_text()
    assert (
        "each figure is the median of 3 run(s), or of 5 for the import, "
        "containers and build phases, with the spread"
    ) in text
    assert (
        "The import, containers and build phases ran in rounds of one run on each driver"
    ) in text
    assert "Every other phase, which first loads a large image" in text
