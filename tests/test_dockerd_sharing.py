"""dockerd on an lcfs daemon started with --share-unchanged.

Containers of one image then read its unchanged files through shared
kernel inodes, and each change copies a file up into the container's layer
first. These tests run the workloads of test_dockerd.py that change image
files in place (a script of changes, a package reinstall, a classic build)
and check that containers still see only their own changes.
"""

import os

import pytest
from lcfs_daemon import LcfsDaemon, running_lcfs
from test_dockerd import (
    CHANGES,
    CLASSIC_IMAGE,
    MINBASE_IMAGE,
    RUN,
    build,
    build_context,  # noqa: F401
    check_build_result,
    run_change_script,
)

pytest_plugins = ["docker_fixtures"]

pytestmark = [
    pytest.mark.docker,
    pytest.mark.timeout(900),
    pytest.mark.skipif(os.geteuid() != 0, reason="dockerd and FUSE mounts need root"),
]


@pytest.fixture(scope="module")
def lcfs(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lcfs-shared")
    with running_lcfs(LcfsDaemon(workdir, options=("--share-unchanged",))) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def minbase(docker, minbase_tar):
    docker.docker("import", str(minbase_tar), MINBASE_IMAGE)
    return MINBASE_IMAGE


def test_change_script_diff_and_base(docker, minbase):
    container = run_change_script(docker)
    listed = set(docker.docker("diff", container).stdout.splitlines())
    assert CHANGES - listed <= {"C /usr", "C /usr/share"}
    assert listed <= CHANGES
    script = "stat -c '%n %a' /etc/motd /etc/issue; tail -n 1 /etc/issue.net"
    lines = docker.docker(*RUN, minbase, "sh", "-c", script).stdout.splitlines()
    assert lines[:2] == ["/etc/motd 644", "/etc/issue 644"]
    assert lines[2] != "extra"
    docker.docker("rm", container)


def test_writes_stay_in_their_container(docker, minbase):
    # Two containers of one image change the same file, and each reads its own copy.
    names = ["lcfs-share-a", "lcfs-share-b"]
    for name in names:
        docker.docker("run", "--pull", "never", "--network", "none", "--detach",
                      "--name", name, minbase, "sleep", "infinity")  # fmt: skip
    try:
        inodes = {
            docker.docker("exec", name, "stat", "-L", "-c", "%i", "/etc/os-release").stdout
            for name in names
        }
        assert len(inodes) == 1, "both containers read one shared inode"
        for name in names:
            docker.docker("exec", name, "sh", "-c", f"echo {name} >> /etc/os-release")
        inodes = {
            docker.docker("exec", name, "stat", "-L", "-c", "%i", "/etc/os-release").stdout
            for name in names
        }
        assert len(inodes) == 2, "each container wrote its own copy"
        for name in names:
            last = docker.docker("exec", name, "tail", "-n", "1", "/etc/os-release")
            assert last.stdout == f"{name}\n"
        fresh = docker.docker(*RUN, minbase, "tail", "-n", "1", "/etc/os-release")
        assert fresh.stdout.strip() not in names
    finally:
        docker.docker("rm", "--force", *names)


def test_package_reinstall_and_verify(docker, minbase):
    script = (
        "apt-get install --reinstall --no-download -y sed && dpkg --verify sed "
        "&& dpkg --verify && sed --version"
    )
    result = docker.docker(*RUN, minbase, "sh", "-c", script, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "GNU sed" in result.stdout


def test_classic_build_with_sharing(docker, minbase, build_context):  # noqa: F811
    build(docker, build_context[0], CLASSIC_IMAGE, buildkit=False)
    check_build_result(docker, CLASSIC_IMAGE, build_context[1])
