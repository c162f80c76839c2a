"""Root filesystems for tests: a busybox-static tree and a Debian minbase tar.

Both are built at most once and cached under $LCFS_TEST_CACHE, or under
.cache/tests in the repository (ignored by git), so later test runs reuse
them. Each build takes an exclusive flock on a lock file in the cache, so
two pytest processes never build the same thing at once, and each result
appears under its final name by rename(2) only when it is complete.

The Debian tree comes from `debootstrap --variant=minbase` against the
Debian mirror that the machine's apt configuration names, so the test run
talks to no host that the machine does not already use for packages.
"""

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from mounts import remove_tree

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
BUSYBOX = Path("/bin/busybox")
APT_SOURCES = Path("/etc/apt/sources.list")
APT_SOURCES_DIR = Path("/etc/apt/sources.list.d")

# Bump when a builder changes what it produces, so stale caches are not used.
BUSYBOX_FORMAT = 1
MINBASE_FORMAT = 1

DEBOOTSTRAP_TIMEOUT = 30 * 60


def cache_dir() -> Path:
    """Return the test cache directory, creating it if needed."""
    path = Path(os.environ.get("LCFS_TEST_CACHE") or REPO_ROOT / ".cache" / "tests")
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _cache_lock(name: str) -> Iterator[None]:
    lock_path = cache_dir() / f".{name}.lock"
    with open(lock_path, "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def pack_tar(tree: Path, out: Path) -> Path:
    """Pack `tree` into the uncompressed tar `out`, keeping owners and xattrs.

    GNU tar with numeric owners, all xattrs and entries sorted by name, the
    form `docker import` expects. The tar is written beside `out` and
    renamed into place when complete.
    """
    partial = out.with_name(out.name + ".partial")
    subprocess.run(
        [
            "tar",
            "--create",
            "--file",
            str(partial),
            "--directory",
            str(tree),
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "--sort=name",
            ".",
        ],
        check=True,
    )
    partial.rename(out)
    return out


# --- busybox --------------------------------------------------------------


def _busybox_key() -> str:
    digest = hashlib.sha256(BUSYBOX.read_bytes()).hexdigest()[:16]
    return f"busybox-{digest}-v{BUSYBOX_FORMAT}"


def build_busybox_tree(dest: Path) -> Path:
    """Build a minimal root tree at `dest` from the static busybox binary.

    The tree has /bin/busybox, a relative symlink for every applet at the
    path `busybox --list-full` gives (/bin/sh, /bin/ls, /usr/bin/env, ...),
    /etc/passwd and /etc/group with root and nobody, a sticky /tmp, and
    empty /proc, /sys and /dev for the container runtime to mount on.
    """
    if not BUSYBOX.exists():
        raise FileNotFoundError(
            f"{BUSYBOX} not found: install the busybox-static package"
        )
    dest.mkdir(parents=True)
    for name in (
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "etc",
        "proc",
        "sys",
        "dev",
        "var",
    ):
        (dest / name).mkdir(parents=True, exist_ok=True)
    (dest / "root").mkdir(mode=0o700)
    (dest / "tmp").mkdir()
    os.chmod(dest / "tmp", 0o1777)

    binary = dest / "bin" / "busybox"
    shutil.copyfile(BUSYBOX, binary)
    os.chmod(binary, 0o755)

    listing = subprocess.run(
        [str(BUSYBOX), "--list-full"], capture_output=True, text=True, check=True
    )
    for applet_path in listing.stdout.split():
        link = dest / applet_path
        if link == binary or link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(binary, link.parent))

    (dest / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
    )
    (dest / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    return dest


def busybox_tree() -> Path:
    """Return the cached busybox root tree, building it on first use."""
    key = _busybox_key()
    tree = cache_dir() / key
    with _cache_lock(key):
        if not tree.is_dir():
            partial = cache_dir() / f"{key}.partial"
            remove_tree(partial)
            build_busybox_tree(partial)
            partial.rename(tree)
            log.info("built busybox tree %s", tree)
    return tree


def busybox_tar() -> Path:
    """Return the cached tar of the busybox root tree, building it on first use."""
    tree = busybox_tree()
    out = tree.with_name(tree.name + ".tar")
    with _cache_lock(out.name):
        if not out.exists():
            pack_tar(tree, out)
            log.info("packed busybox tar %s", out)
    return out


# --- Debian minbase -------------------------------------------------------


def _one_line_entries(path: Path) -> Iterator[tuple[str, str, list[str]]]:
    # Format: deb [option=value ...] URI SUITE [COMPONENT ...]
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if "[" in line:
            before, _, after = line.partition("[")
            line = before + after.partition("]")[2]
        fields = line.split()
        if len(fields) >= 3:
            yield fields[0], fields[1], [fields[2]]


def _deb822_entries(path: Path) -> Iterator[tuple[str, str, list[str]]]:
    # Paragraphs of "Field: value" lines are separated by blank lines, and a
    # line starting with whitespace continues the previous field.
    paragraphs: list[dict[str, str]] = [{}]
    field = None
    for raw in path.read_text().splitlines():
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if paragraphs[-1]:
                paragraphs.append({})
            field = None
            continue
        if raw[0] in " \t" and field:
            paragraphs[-1][field] += " " + raw.strip()
            continue
        name, _, value = raw.partition(":")
        field = name.strip().lower()
        paragraphs[-1][field] = value.strip()
    for paragraph in paragraphs:
        if paragraph.get("enabled", "yes").lower() == "no":
            continue
        suites = paragraph.get("suites", "").split()
        for kind in paragraph.get("types", "").split():
            for uri in paragraph.get("uris", "").split():
                yield kind, uri, suites


def apt_source_files() -> list[Path]:
    """Return the files apt reads its package sources from, in apt's order."""
    files = [APT_SOURCES] if APT_SOURCES.is_file() else []
    if APT_SOURCES_DIR.is_dir():
        files += sorted(
            p for p in APT_SOURCES_DIR.iterdir() if p.suffix in (".list", ".sources")
        )
    return files


def debian_mirror(suite: str = "bookworm") -> str:
    """Return the URI of the first apt source that serves `suite` as a deb repository.

    Raises LookupError naming the files read if none does.
    """
    files = apt_source_files()
    for path in files:
        parse = _deb822_entries if path.suffix == ".sources" else _one_line_entries
        for kind, uri, suites in parse(path):
            if kind == "deb" and suite in suites:
                return uri
    raise LookupError(
        f"no 'deb' source for suite {suite} in {[str(p) for p in files]}: "
        "add the Debian mirror to the apt configuration"
    )


def build_minbase_tree(dest: Path, suite: str = "bookworm") -> Path:
    """Run debootstrap --variant=minbase for `suite` into `dest`.

    debootstrap mounts /proc and /sys inside the target while it runs and may
    leave them behind when it fails, so the caller removes `dest` with
    mounts.remove_tree. Raises RuntimeError with the end of debootstrap's
    log on failure.
    """
    mirror = debian_mirror(suite)
    log_path = dest.with_name(dest.name + ".log")
    command = ["debootstrap", "--variant=minbase", suite, str(dest), mirror]
    log.info("running %s (log in %s)", " ".join(command), log_path)
    with open(log_path, "w") as log_file:
        result = subprocess.run(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=DEBOOTSTRAP_TIMEOUT,
            check=False,
        )
    if result.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(
            f"debootstrap of {suite} from {mirror} failed with exit code "
            f"{result.returncode}; end of {log_path}:\n{tail}"
        )
    return dest


def minbase_tar(suite: str = "bookworm") -> Path:
    """Return the cached tar of a Debian minbase root, building it on first use."""
    key = f"debian-{suite}-minbase-v{MINBASE_FORMAT}"
    out = cache_dir() / f"{key}.tar"
    with _cache_lock(key):
        if out.exists():
            return out
        work = cache_dir() / f"{key}.build"
        remove_tree(work)
        try:
            build_minbase_tree(work, suite)
            pack_tar(work, out)
        finally:
            remove_tree(work)
        log.info("built Debian %s minbase tar %s", suite, out)
    return out
