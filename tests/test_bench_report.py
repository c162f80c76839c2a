"""The benchmark page's sections for runs on the two kinds of file system."""

from __future__ import annotations

import pytest

from bench import report
from bench.results import Results, Target, Workload

IMPORT = Workload(
    "import_minbase",
    "`docker import` of the Debian minbase",
    "s",
    target=Target(
        "lcfs/overlay2 ≤ 1.5",
        ("import_minbase", "lcfs"),
        ("import_minbase", "overlay2"),
        1.5,
    ),
)
START = Workload(
    "daemon_start",
    "`lcfs daemon` start to ready",
    "s",
    target=Target("< 1 s", ("daemon_start", "lcfs"), None, 1.0),
    section="micro",
)
WORKLOADS = [IMPORT, START]


def run_results(import_lcfs: float, journaled: bool) -> Results:
    results = Results()
    for value in (2.0, 2.1, 1.9):
        results.add("import_minbase", "overlay2", value)
        results.add("import_minbase", "lcfs", value * import_lcfs / 2.0)
    results.add("daemon_start", "lcfs", 0.8)
    results.meta.update(date="2026-12-05", backing_fs="ext4 /dev/vda")
    if journaled:
        results.meta["data_fs"] = report.JOURNALED_EXT4
    return results


@pytest.fixture
def page(tmp_path, monkeypatch):
    # The plots need matplotlib, which only bench/requirements.txt installs.
    monkeypatch.setattr(report, "plot", lambda *args: None)
    return tmp_path / "benchmarks.md"


def test_plain_run_fills_driver_comparison(page):
    report.write_page(page, run_results(1.0, journaled=False), WORKLOADS, "Hand notes.")
    text = page.read_text()
    assert "## Driver comparison\n" in text
    assert "on the file system of the work directory" in text
    assert "Hand notes." in text
    assert "## Driver comparison on ext4 with a journal" not in text
    assert "## lcfs on both file systems" not in text


def test_journaled_run_adds_its_own_section(page):
    plain = run_results(1.0, journaled=False)
    report.write_page(page, plain, WORKLOADS, "Hand notes.")
    report.write_page(page, run_results(3.2, journaled=True), WORKLOADS, "", plain)
    text = page.read_text()
    both = text.index("## lcfs on both file systems")
    main = text.index("## Driver comparison\n")
    ext4 = text.index("## Driver comparison on ext4 with a journal")
    assert both < main < ext4
    assert text.count("Hand notes.") == 1
    assert "img/ext4-driver-times.png" in text
    assert "on a new ext4 file system with a journal" in text[ext4:]


def test_file_systems_table_rows(page):
    plain = run_results(1.0, journaled=False)
    journaled = run_results(3.2, journaled=True)
    text = report.file_systems_section(plain, journaled, WORKLOADS)
    rows = {line.split(" | ")[0]: line for line in text.splitlines()}
    assert rows["| `docker import` of the Debian minbase"].endswith(
        "| 0.50: met | 1.60: **missed** |"
    )
    assert rows["| `lcfs daemon` start to ready"].endswith(
        "| 0.8 s: met | 0.8 s: met |"
    )
    assert "On the work directory's file system: 2 of 2 targets met." in text
    assert "On ext4 with a journal: 1 of 2 targets met." in text


def test_rewrite_keeps_one_copy_of_each_section(page):
    plain = run_results(1.0, journaled=False)
    journaled = run_results(1.2, journaled=True)
    for _ in range(2):
        report.write_page(page, plain, WORKLOADS, "", journaled)
        report.write_page(page, journaled, WORKLOADS, "", plain)
    text = page.read_text()
    for name in ("file-systems", "driver-comparison", "driver-comparison-ext4"):
        assert text.count(report.markers(name)[0]) == 1


@pytest.mark.parametrize(
    ("mode", "heading"),
    [
        (
            "quick",
            (
                "Targets at quick sizes, one run each. This checks that the "
                "harness works; only a full run's figures decide the targets."
            ),
        ),
        ("full", "Targets:"),
    ],
)
def test_summary_heading_per_mode(mode, heading, capsys):
    from bench.__main__ import print_summary

    results = run_results(import_lcfs=4.0, journaled=False)
    results.meta["mode"] = mode
    print_summary(results, WORKLOADS)
    first_line, first_row, *_ = capsys.readouterr().out.splitlines()
    assert first_line == heading
    assert first_row.startswith("import_minbase")
    assert "**missed**" in first_row


def test_method_names_reused_images(page):
    results = run_results(1.0, journaled=False)
    report.write_page(page, results, WORKLOADS, "")
    assert "instead of loading it again" not in page.read_text()
    results.meta["reused_images"] = [
        {"image": "big-file", "loaded_by": "write", "used_by": "read"}
    ]
    report.write_page(page, results, WORKLOADS, "")
    assert (
        "The read phase used the big-file image that the write phase had loaded, "
        "instead of loading it again." in page.read_text()
    )
