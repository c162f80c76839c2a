"""End to end: a real dockerd 20.10 keeping its layers in lcfs.

One `lcfs daemon` (own image file and socket) and one dockerd using it as
its graphdriver plugin serve the whole module (see docker_fixtures.py). A
second dockerd on the vfs driver is the reference that lcfs must agree
with.

Images come only from `docker import` of trees built by rootfs.py and from
builds and commits in these tests. Every `docker run` passes --pull never,
and dockerd runs in its own network namespace.

The tests run in file order and share state: later tests kill and restart
the plugin under the running dockerd, and the last one removes every image
and container and stops both daemons, so it must stay last in the file.
"""

import io
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from hashlib import sha256
from pathlib import Path

import pytest
from dockerd import DockerDaemon
from layer_compare import compare_with_vfs
from lcfs_daemon import fsck_command, lcfs_command

# Fixtures lcfs, initial_status, docker and vfs_docker, one set per module.
pytest_plugins = ["docker_fixtures"]

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.docker,
    pytest.mark.timeout(900),
    pytest.mark.skipif(os.geteuid() != 0, reason="dockerd and FUSE mounts need root"),
]

BUSYBOX_IMAGE = "lcfs-test/busybox:1"
MINBASE_IMAGE = "lcfs-test/minbase:1"
COMMITTED_IMAGE = "lcfs-test/committed:1"
CLASSIC_IMAGE = "lcfs-test/classic:1"
BUILDKIT_IMAGE = "lcfs-test/buildkit:1"
CHANGES_CONTAINER = "lcfs-test-changes"

RUN = ("run", "--pull", "never", "--network", "none", "--rm")

# Writes, deletes, chmods, hard-links and renames files inherited from the
# minbase layer. CHANGES is what `docker diff` must list for it, the same
# list that dockerd on vfs prints.
CHANGE_SCRIPT = r"""set -e
echo hello > /root/new.txt
ln /root/new.txt /root/link.txt
rm /etc/motd
chmod 0600 /etc/issue
echo extra >> /etc/issue.net
mkdir -p /srv/a/b
echo deep > /srv/a/b/c
rm -r /var/mail
mv /usr/share/doc/sed /usr/share/doc/sed-moved
"""
SED_DOCS = [
    "AUTHORS",
    "BUGS.gz",
    "NEWS.gz",
    "README",
    "THANKS.gz",
    "changelog.Debian.gz",
    "changelog.gz",
    "copyright",
    "examples",
    "examples/dc.sed",
    "sedfaq.txt.gz",
]
CHANGES = {
    "C /etc",
    "D /etc/motd",
    "C /etc/issue",
    "C /etc/issue.net",
    "C /root",
    "A /root/new.txt",
    "A /root/link.txt",
    "C /srv",
    "A /srv/a",
    "A /srv/a/b",
    "A /srv/a/b/c",
    "C /var",
    "D /var/mail",
    "C /usr",
    "C /usr/share",
    "C /usr/share/doc",
    "D /usr/share/doc/sed",
    "A /usr/share/doc/sed-moved",
} | {f"A /usr/share/doc/sed-moved/{name}" for name in SED_DOCS}

# Directories that contain a change only further down: /usr/share/doc is
# the parent of the renamed entry, /usr/share and /usr are above it.
ANCESTOR_CHANGES = {"C /usr", "C /usr/share"}

# Prints key=value lines that the commit test checks one by one.
COMMIT_CHECK_SCRIPT = r"""
echo "new=$(cat /root/new.txt)"
echo "links=$(stat -c %h /root/new.txt),$(stat -c %h /root/link.txt)"
echo "same_inode=$([ /root/new.txt -ef /root/link.txt ] && echo yes || echo no)"
echo "motd=$([ -e /etc/motd ] && echo present || echo absent)"
echo "issue_mode=$(stat -c %a /etc/issue)"
echo "issue_net_last=$(tail -n 1 /etc/issue.net)"
echo "deep=$(cat /srv/a/b/c)"
echo "mail=$([ -e /var/mail ] && echo present || echo absent)"
echo "sed_doc=$([ -e /usr/share/doc/sed ] && echo present || echo absent)"
echo "sed_moved=$(cd /usr/share/doc/sed-moved && find . | sort | tr '\n' ' ')"
"""

DOCKERFILE = """\
FROM {base}
RUN set -e; \\
    echo built > /built.txt; \\
    rm /etc/motd; \\
    mkdir -p /opt/tree/sub; \\
    ln /built.txt /opt/tree/hardlink; \\
    ln -s ../../built.txt /opt/tree/symlink; \\
    mkfifo /opt/tree/fifo; \\
    mknod /opt/tree/null c 1 3; \\
    chown 1000:1000 /opt/tree/sub; \\
    chmod 2775 /opt/tree/sub; \\
    truncate -s 16M /opt/tree/sparse; \\
    printf tail | dd of=/opt/tree/sparse bs=1 seek=8388608 conv=notrunc status=none; \\
    mv /usr/share/doc/sed /usr/share/doc/sed-moved
COPY payload/ /payload/
RUN chmod 0700 /payload/run.sh && chown 1000:1000 /payload/data.bin && rm /payload/delete-me
"""
LONG_NAME = "long-" + "n" * 200
ODD_NAME = "spaces and ünïcödé.txt"
BUILD_CHECK_SCRIPT = rf"""
echo "built=$(cat /built.txt)"
echo "motd=$([ -e /etc/motd ] && echo present || echo absent)"
echo "hardlink=$([ /built.txt -ef /opt/tree/hardlink ] && echo same || echo different)"
echo "built_links=$(stat -c %h /built.txt)"
echo "symlink=$(readlink /opt/tree/symlink)"
echo "symlink_content=$(cat /opt/tree/symlink)"
echo "fifo=$(stat -c %F /opt/tree/fifo)"
echo "null=$(stat -c '%F %t:%T %a' /opt/tree/null)"
echo "sub=$(stat -c '%a %u:%g' /opt/tree/sub)"
echo "sparse_size=$(stat -c %s /opt/tree/sparse)"
echo "sparse_sha=$(sha256sum < /opt/tree/sparse | cut -d' ' -f1)"
echo "sparse_allocated=$(( $(stat -c %b /opt/tree/sparse) * $(stat -c %B /opt/tree/sparse) ))"
echo "sed_doc=$([ -e /usr/share/doc/sed ] && echo present || echo absent)"
echo "sed_moved=$([ -f /usr/share/doc/sed-moved/copyright ] && echo present || echo absent)"
echo "run_mode=$(stat -c %a /payload/run.sh)"
echo "data_owner=$(stat -c %u:%g /payload/data.bin)"
echo "data_sha=$(sha256sum < /payload/data.bin | cut -d' ' -f1)"
echo "delete_me=$([ -e /payload/delete-me ] && echo present || echo absent)"
echo "deep_sha=$(sha256sum < /payload/nested/deep/file.txt | cut -d' ' -f1)"
echo "long_sha=$(sha256sum < /payload/{LONG_NAME} | cut -d' ' -f1)"
echo "odd_sha=$(sha256sum < '/payload/{ODD_NAME}' | cut -d' ' -f1)"
"""


def parse_pairs(output: str) -> dict[str, str]:
    """Return the key=value lines of a check script's output as a dict."""
    pairs = {}
    for line in output.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            pairs[key] = value
    return pairs


# --- fixtures --------------------------------------------------------------


@pytest.fixture(scope="module")
def images(docker, busybox_tar, minbase_tar):
    docker.docker("import", str(busybox_tar), BUSYBOX_IMAGE)
    docker.docker("import", str(minbase_tar), MINBASE_IMAGE)
    return [BUSYBOX_IMAGE, MINBASE_IMAGE]


@pytest.fixture(scope="module")
def vfs_images(vfs_docker, minbase_tar):
    vfs_docker.docker("import", str(minbase_tar), MINBASE_IMAGE)
    return [MINBASE_IMAGE]


def run_change_script(daemon: DockerDaemon) -> str:
    """Run CHANGE_SCRIPT in a container kept after it exits; return its name."""
    daemon.docker(
        "run", "--pull", "never", "--network", "none", "--name", CHANGES_CONTAINER,
        MINBASE_IMAGE, "sh", "-c", CHANGE_SCRIPT,
    )  # fmt: skip
    return CHANGES_CONTAINER


@pytest.fixture(scope="module")
def changed_container(docker, images):
    return run_change_script(docker)


@pytest.fixture(scope="module")
def committed_image(docker, changed_container):
    docker.docker("commit", changed_container, COMMITTED_IMAGE)
    return COMMITTED_IMAGE


@pytest.fixture(scope="module")
def build_context(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A build context directory and the sha256 of each payload file by check key."""
    context = tmp_path_factory.mktemp("context")
    (context / "Dockerfile").write_text(DOCKERFILE.format(base=MINBASE_IMAGE))
    payload = context / "payload"
    (payload / "nested" / "deep").mkdir(parents=True)
    contents = {
        "data_sha": ("data.bin", random.Random(7).randbytes(3 * 1024 * 1024 + 123)),
        "deep_sha": ("nested/deep/file.txt", b"deep file\n"),
        "long_sha": (LONG_NAME, b"a name over 100 bytes\n"),
        "odd_sha": (ODD_NAME, b"non-ASCII name\n"),
    }
    digests = {}
    for key, (name, data) in contents.items():
        (payload / name).write_bytes(data)
        digests[key] = sha256(data).hexdigest()
    (payload / "run.sh").write_text("#!/bin/sh\necho run\n")
    (payload / "delete-me").write_text("deleted by the last RUN\n")
    return context, digests


def build(docker: DockerDaemon, context: Path, tag: str, buildkit: bool) -> str:
    result = docker.docker(
        "build",
        "--network",
        "none",
        "--progress",
        "plain",
        "-t",
        tag,
        str(context),
        env={"DOCKER_BUILDKIT": "1" if buildkit else "0"},
    )
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def classic_image(docker, images, build_context):
    build(docker, build_context[0], CLASSIC_IMAGE, buildkit=False)
    return CLASSIC_IMAGE


@pytest.fixture(scope="module")
def buildkit_image(docker, images, build_context):
    build(docker, build_context[0], BUILDKIT_IMAGE, buildkit=True)
    return BUILDKIT_IMAGE


# --- tests -----------------------------------------------------------------


def test_subprocesses_import_this_checkout(tmp_path):
    # The lcfs and lcfs-fsck commands that these tests start must run this
    # checkout's code, also when pip installed another checkout in editable
    # mode into the same Python.
    result = subprocess.run(
        [sys.executable, "-c", "import lcfs; print(lcfs.__file__)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(result.stdout.strip()).parent.parent == REPO


def test_imported_busybox_runs(docker, images):
    result = docker.docker(
        *RUN, BUSYBOX_IMAGE, "sh", "-c", "echo hello; ls /bin/busybox"
    )
    assert result.stdout == "hello\n/bin/busybox\n"


def test_imported_minbase_runs(docker, images):
    result = docker.docker(*RUN, MINBASE_IMAGE, "cat", "/etc/debian_version")
    assert result.stdout.startswith("12.")


def test_minbase_files_match_dpkg_checksums(docker, images):
    # dpkg --verify reads every packaged file back and compares its md5sum,
    # so this checks the content that ApplyDiff stored and FUSE serves.
    result = docker.docker(*RUN, MINBASE_IMAGE, "dpkg", "--verify", check=False)
    assert result.stderr == ""
    assert result.stdout == ""
    assert result.returncode == 0


def test_dpkg_reinstall_in_container(docker, images):
    script = "apt-get install --reinstall --no-download -y sed && dpkg --verify sed && sed --version"
    result = docker.docker(*RUN, MINBASE_IMAGE, "sh", "-c", script, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Setting up sed" in result.stdout
    assert "GNU sed" in result.stdout


def test_cp_archive_copies_directories(docker, images):
    # GNU cp -a copies POSIX ACLs. It reads system.posix_acl_access and,
    # for a directory, system.posix_acl_default of the source, and fails
    # when one of them returns EOPNOTSUPP after the other did not.
    script = "cp -a /etc/apt /tmp/apt-copy && diff -r /etc/apt /tmp/apt-copy"
    result = docker.docker(*RUN, MINBASE_IMAGE, "sh", "-c", script, check=False)
    assert result.stderr == ""
    assert result.returncode == 0


def test_stat_after_write_shows_setuid_dropped(docker, images):
    # The first stat caches the mode in the kernel. The write by user 1000,
    # which lacks CAP_FSETID, drops setuid, and the second stat must show
    # that at once, as on ext4.
    script = (
        "cp /bin/true /tmp/tool && chown 1000 /tmp/tool && chmod 4755 /tmp/tool"
        " && stat -c %a /tmp/tool"
        " && setpriv --reuid 1000 --regid 1000 --clear-groups sh -c 'echo x >> /tmp/tool'"
        " && stat -c %a /tmp/tool"
    )
    result = docker.docker(*RUN, MINBASE_IMAGE, "sh", "-c", script, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["4755", "755"]


def test_docker_diff_lists_changes(docker, changed_container):
    listed = docker.docker("diff", changed_container).stdout.splitlines()
    expected = CHANGES - ANCESTOR_CHANGES
    assert len(listed) == len(set(listed)), f"duplicate lines in {listed}"
    assert set(listed) - CHANGES == set(), "listed but not changed"
    assert expected - set(listed) == set(), "changed but not listed"


# vfs and overlay2 list every directory above a change as modified.
def test_docker_diff_lists_ancestors(docker, changed_container):
    listed = docker.docker("diff", changed_container).stdout.splitlines()
    assert ANCESTOR_CHANGES - set(listed) == set()


def test_docker_diff_on_vfs_agrees(vfs_docker, vfs_images):
    # The reference: the same script on vfs lists exactly CHANGES too.
    run_change_script(vfs_docker)
    listed = vfs_docker.docker("diff", CHANGES_CONTAINER).stdout.splitlines()
    assert set(listed) == CHANGES


LINKS_DOCKERFILE = """\
FROM {base}
RUN mkdir -p /d /o/x && echo one > /d/a && ln /d/a /d/b && touch /o/x/y /o/x/z
"""
# Changes the image's hard-linked file only through its second name, after
# removing the first, and replaces a directory of the image.
LINKS_SCRIPT = "rm /d/a && echo more >> /d/b && rm -rf /o/x && mkdir /o/x && echo 3 > /o/x/w"


def diff_and_commit_links(daemon: DockerDaemon, context: Path) -> tuple[set[str], str]:
    """Build the links image, run LINKS_SCRIPT, and return (docker diff lines, committed /d/b)."""
    context.mkdir(exist_ok=True)
    (context / "Dockerfile").write_text(LINKS_DOCKERFILE.format(base=MINBASE_IMAGE))
    build(daemon, context, "lcfs-test/links:1", buildkit=False)
    daemon.docker(
        "run", "--pull", "never", "--network", "none", "--name", "lcfs-test-links",
        "lcfs-test/links:1", "sh", "-c", LINKS_SCRIPT,
    )  # fmt: skip
    listed = set(daemon.docker("diff", "lcfs-test-links").stdout.splitlines())
    daemon.docker("commit", "lcfs-test-links", "lcfs-test/links-committed:1")
    daemon.docker("rm", "lcfs-test-links")
    content = daemon.docker(*RUN, "lcfs-test/links-committed:1", "cat", "/d/b").stdout
    return listed, content


def test_change_through_second_link_committed(docker, vfs_docker, images, vfs_images, tmp_path):
    listed, content = diff_and_commit_links(docker, tmp_path / "lcfs")
    vfs_listed, vfs_content = diff_and_commit_links(vfs_docker, tmp_path / "vfs")
    assert content == "one\nmore\n"
    assert content == vfs_content
    assert {"C /d/b", "D /d/a", "D /o/x/y", "D /o/x/z", "A /o/x/w"} <= listed
    assert listed == vfs_listed


def test_commit_keeps_changes(docker, committed_image):
    result = docker.docker(*RUN, committed_image, "sh", "-c", COMMIT_CHECK_SCRIPT)
    found = parse_pairs(result.stdout)
    expected_sed_moved = (
        " ".join(sorted(["."] + [f"./{name}" for name in SED_DOCS])) + " "
    )
    assert found["new"] == "hello"
    assert found["links"] == "2,2"
    assert found["same_inode"] == "yes"
    assert found["motd"] == "absent"
    assert found["issue_mode"] == "600"
    assert found["issue_net_last"] == "extra"
    assert found["deep"] == "deep"
    assert found["mail"] == "absent"
    assert found["sed_doc"] == "absent"
    assert found["sed_moved"] == expected_sed_moved


def test_commit_leaves_base_unchanged(docker, committed_image):
    script = 'stat -c "%n %a" /etc/motd /etc/issue /var/mail /usr/share/doc/sed; ls /root; cat /etc/issue.net'
    result = docker.docker(*RUN, MINBASE_IMAGE, "sh", "-c", script)
    lines = result.stdout.splitlines()
    assert lines[:4] == [
        "/etc/motd 644",
        "/etc/issue 644",
        "/var/mail 2775",
        "/usr/share/doc/sed 755",
    ]
    assert "new.txt" not in lines
    assert "extra" not in lines


def check_build_result(
    docker: DockerDaemon, image: str, digests: dict[str, str]
) -> None:
    found = parse_pairs(
        docker.docker(*RUN, image, "sh", "-c", BUILD_CHECK_SCRIPT).stdout
    )
    sparse = bytearray(16 * 1024 * 1024)
    sparse[8388608:8388612] = b"tail"
    assert found["built"] == "built"
    assert found["motd"] == "absent"
    assert found["hardlink"] == "same"
    assert found["built_links"] == "2"
    assert found["symlink"] == "../../built.txt"
    assert found["symlink_content"] == "built"
    assert found["fifo"] == "fifo"
    assert found["null"] == "character special file 1:3 644"
    assert found["sub"] == "2775 1000:1000"
    assert found["sparse_size"] == str(len(sparse))
    assert found["sparse_sha"] == sha256(sparse).hexdigest()
    assert found["sed_doc"] == "absent"
    assert found["sed_moved"] == "present"
    assert found["run_mode"] == "700"
    assert found["data_owner"] == "1000:1000"
    assert found["delete_me"] == "absent"
    for key, digest in digests.items():
        assert found[key] == digest, key
    # Holes stay holes: only the block holding "tail" is allocated.
    assert int(found["sparse_allocated"]) <= 64 * 1024, found["sparse_allocated"]


def test_classic_build(docker, classic_image, build_context):
    check_build_result(docker, classic_image, build_context[1])


def test_buildkit_build(docker, buildkit_image, build_context):
    check_build_result(docker, buildkit_image, build_context[1])


def test_classic_build_uses_cache(docker, classic_image, build_context):
    output = build(docker, build_context[0], CLASSIC_IMAGE, buildkit=False)
    assert output.count("Using cache") == 3, output


DATA_USED = "Data Space Used (bytes)"
# The random data tar contains 160 MiB, so 20 MiB written is well inside
# its import.
RANDOM_FILES = 40
RANDOM_FILE_SIZE = 4 * 1024 * 1024
KILL_AFTER_BYTES = 20 * 1024 * 1024


def test_save_load_matches_vfs(
    docker, vfs_docker, lcfs, committed_image, classic_image, buildkit_image, tmp_path
):
    names = [committed_image, classic_image, buildkit_image]
    archive = tmp_path / "images.tar"
    docker.docker("save", "-o", str(archive), *names)
    vfs_docker.docker("load", "-i", str(archive))
    for name in names:
        found = compare_with_vfs(docker, vfs_docker, lcfs, name)
        assert found == [], f"{name}: the lcfs layer differs from vfs"


@pytest.fixture(scope="module")
def random_data_tar(busybox_tree, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A busybox root with /data/NN.bin files of random content, and their sha256.

    Nothing else in the store has this content, so importing it writes every
    byte (the store maps files equal to a recently diffed layer's by
    reference instead of writing them).
    """
    path = tmp_path_factory.mktemp("random") / "random-data.tar"
    generator = random.Random(11)
    digests = {}
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        archive.add(busybox_tree, arcname=".")
        for index in range(RANDOM_FILES):
            data = generator.randbytes(RANDOM_FILE_SIZE)
            member = tarfile.TarInfo(f"./data/{index:02d}.bin")
            member.size = len(data)
            member.mode = 0o644
            archive.addfile(member, io.BytesIO(data))
            digests[f"{index:02d}.bin"] = sha256(data).hexdigest()
    return path, digests


def test_import_killed_midway_rolls_back(docker, lcfs, images, random_data_tar):
    tar_path, digests = random_data_tar
    before = lcfs.status()
    importer = ThreadPoolExecutor(max_workers=1)
    attempt = importer.submit(
        docker.docker, "import", str(tar_path), "lcfs-test/killed:1", check=False
    )
    # Kill the plugin once the import has written data but before it ends.
    deadline = time.monotonic() + 60
    while int(lcfs.status()[DATA_USED]) < int(before[DATA_USED]) + KILL_AFTER_BYTES:
        if attempt.done():
            pytest.fail(f"the import ended before the kill: {attempt.result()}")
        assert time.monotonic() < deadline, "the import wrote too little in 60 s"
        time.sleep(0.05)
    lcfs.process.send_signal(signal.SIGKILL)
    lcfs.stop()
    # dockerd retries the dead plugin for about 15 s per call before it fails.
    failed = attempt.result(timeout=300)
    importer.shutdown()
    lcfs.start()
    after = lcfs.status()
    assert failed.returncode != 0
    assert after["Layers"] == before["Layers"]
    assert after[DATA_USED] == before[DATA_USED]

    docker.docker("import", str(tar_path), "lcfs-test/killed:1")
    script = "cd /data && sha256sum *.bin"
    result = docker.docker(*RUN, "lcfs-test/killed:1", "sh", "-c", script)
    found = dict(reversed(line.split("  ")) for line in result.stdout.splitlines())
    assert found == digests


def test_plugin_killed_then_restarted(docker, lcfs, committed_image):
    # A daemon killed by SIGKILL leaves its FUSE mount disconnected; the
    # next start detaches it and mounts again at the recorded Home.
    lcfs.process.send_signal(signal.SIGKILL)
    lcfs.stop()
    lcfs.start()
    result = docker.docker(*RUN, committed_image, "cat", "/root/new.txt")
    assert result.stdout == "hello\n"


def test_fsck_clean_while_images_stored(docker, lcfs, committed_image, buildkit_image):
    # fsck needs the device closed, so the plugin stops here while dockerd
    # runs; the next test restarts it.
    code = lcfs.stop()
    assert code == 0, lcfs.log_tail()
    result = subprocess.run(
        [fsck_command(), "--docker-root", str(docker.data_root), str(lcfs.device)],
        capture_output=True,
        text=True,
        check=False,
    )
    lcfs.start()
    assert result.returncode == 0, result.stdout + result.stderr


def test_plugin_restart_keeps_serving(docker, lcfs, committed_image):
    # dockerd sends no new Init after a plugin restart, so the daemon must
    # remount at the Home it recorded from the first Init.
    code = lcfs.stop()
    assert code == 0, lcfs.log_tail()
    lcfs.start()
    result = docker.docker(*RUN, committed_image, "cat", "/srv/a/b/c")
    assert result.stdout == "deep\n"


def test_remove_everything_empties_store(docker, lcfs, initial_status):
    """Remove all containers, images and build cache; then stop both daemons.

    Must stay the last test: it stops the module's daemons.
    """
    containers = docker.docker("ps", "-aq").stdout.split()
    if containers:
        docker.docker("rm", "-f", *containers)
    for _ in range(5):
        listed = list(dict.fromkeys(docker.docker("image", "ls", "-aq").stdout.split()))
        if not listed:
            break
        for image in listed:
            docker.docker("rmi", "-f", image, check=False)
    docker.docker("builder", "prune", "-af")
    assert docker.docker("image", "ls", "-aq").stdout.split() == []

    status = lcfs.status()
    assert status.get("Layers") == "0", status
    assert status.get(DATA_USED) == initial_status.get(DATA_USED), status

    leftover_mounts = docker.stop()
    assert leftover_mounts == [], "dockerd (or lcfs Cleanup) left mounts"
    code = lcfs.stop()
    assert code == 0, lcfs.log_tail()
    assert lcfs.mounts() == []

    listing = subprocess.run(
        [lcfs_command(), "layers", "--device", str(lcfs.device)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.splitlines()[1:] == [], listing.stdout
