"""containerd's own snapshotter test suite, run against ``lcfs daemon``.

tests/containerd/snapshotter_test.go wires containerd's proxy snapshotter
client to the daemon's socket and calls the suite
(github.com/containerd/containerd/snapshots/testsuite). It is built offline
in GOPATH mode from Debian's golang-go and
golang-github-containerd-containerd-dev (containerd 1.6.20 sources under
/usr/share/gocode), with no module proxy.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from mounts import unmount_under
from rootfs import cache_dir
from snapshotter_helpers import SnapshotterDaemon, check_list_consistent

GO_SOURCES = Path(__file__).resolve().parent / "containerd"
GOPATH = Path("/usr/share/gocode")
SUITE = GOPATH / "src/github.com/containerd/containerd/snapshots/testsuite"

# Every subtest of SnapshotterSuite in containerd 1.6.20. The suite itself
# skips Rename ("rename test still fails on some kernels with overlay");
# TestRenameInChildSnapshot runs that case and more.
EXPECTED_PASS = {
    "Basic", "StatActive", "StatComitted", "TransitivityTest", "PreareViewFailingtest",
    "Update", "Remove", "Walk", "LayerFileupdate", "RemoveDirectoryInLowerLayer", "Chown",
    "DirectoryPermissionOnCommit", "RemoveIntermediateSnapshot",
    "DeletedFilesInChildSnapshot", "MoveFileFromLowerLayer", "ViewReadonly", "StatInWalk",
    "CloseTwice", "RootPermission", "128LayersMount",
}  # fmt: skip
EXPECTED_SKIP = {"Rename"}

RESULT = re.compile(r"^\s*--- (PASS|FAIL|SKIP): (\S+)", re.M)

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(
        shutil.which("go") is None or not SUITE.is_dir(),
        reason="needs Debian's golang-go and golang-github-containerd-containerd-dev",
    ),
]


def go_env(**extra: str) -> dict[str, str]:
    """Return an environment that builds in GOPATH mode with no network."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("GO") and name != "CGO_ENABLED"
    }
    # The build cache lives with the other test caches, so a run without
    # HOME works and later runs rebuild in seconds.
    env.update(GOPATH=str(GOPATH), GO111MODULE="off", GOPROXY="off", GOFLAGS="",
               GOTOOLCHAIN="local", GOCACHE=str(cache_dir() / "go-build"), **extra)  # fmt: skip
    return env


@pytest.fixture(scope="module")
def suite_binary(tmp_path_factory) -> Path:
    """The compiled Go test binary (go test -c); the build cache makes rebuilds fast."""
    binary = tmp_path_factory.mktemp("go") / "snapshotter.test"
    result = subprocess.run(
        ["go", "test", "-c", "-o", str(binary), "."],
        cwd=GO_SOURCES,
        env=go_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, f"go test -c failed:\n{result.stdout}{result.stderr}"
    return binary


def run_go_tests(binary: Path, socket: Path, pattern: str, workdir: Path):
    return subprocess.run(
        [str(binary), "-test.v", "-test.run", pattern, "-test.timeout", "15m"],
        cwd=workdir,
        env=go_env(LCFS_SNAPSHOTTER_SOCKET=str(socket), TMPDIR=str(workdir)),
        capture_output=True,
        text=True,
        timeout=1200,
    )


def results(output: str) -> dict[str, str]:
    return {name: outcome for outcome, name in RESULT.findall(output)}


def test_containerd_snapshotter_suite(suite_binary, tmp_path):
    daemon = SnapshotterDaemon(tmp_path / "lcfs")
    work = tmp_path / "work"
    work.mkdir()
    try:
        daemon.start()
        run = run_go_tests(suite_binary, daemon.socket_path, "^TestSnapshotterSuite$", work)
        outcomes = results(run.stdout)
        subtests = {
            name.removeprefix("TestSnapshotterSuite/"): outcome
            for name, outcome in outcomes.items()
            if name.startswith("TestSnapshotterSuite/")
        }
        failed = sorted(name for name, outcome in subtests.items() if outcome == "FAIL")
        tail = run.stdout[-6000:] + run.stderr[-2000:]
        assert failed == [], f"failed subtests {failed}:\n{tail}"
        assert run.returncode == 0, tail
        passed = {name for name, outcome in subtests.items() if outcome == "PASS"}
        skipped = {name for name, outcome in subtests.items() if outcome == "SKIP"}
        assert passed == EXPECTED_PASS, tail
        assert skipped == EXPECTED_SKIP, tail
        check_list_consistent(daemon.list())
    finally:
        unmount_under(work)
        daemon.cleanup()
    assert daemon.process.returncode == 0
    result = daemon.fsck()
    assert result.returncode == 0, result.stdout + result.stderr


def test_rename_in_child_snapshot(suite_binary, tmp_path):
    daemon = SnapshotterDaemon(tmp_path / "lcfs")
    work = tmp_path / "work"
    work.mkdir()
    try:
        daemon.start()
        run = run_go_tests(suite_binary, daemon.socket_path, "^TestRenameInChildSnapshot$", work)
        tail = run.stdout[-4000:] + run.stderr[-2000:]
        assert results(run.stdout) == {"TestRenameInChildSnapshot": "PASS"}, tail
        assert run.returncode == 0, tail
        assert daemon.list() == []
    finally:
        unmount_under(work)
        daemon.cleanup()
    result = daemon.fsck()
    assert result.returncode == 0, result.stdout + result.stderr
