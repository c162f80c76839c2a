"""``lcfs plugin-bundle``: build a managed (V2) Docker plugin from Debian packages.

The bundle is a directory with ``config.json`` and ``rootfs/``, the layout
that ``docker plugin create NAME DIR`` reads. The root filesystem is put
together offline from parts the machine already reaches:

* Debian bookworm's Python 3.11, glibc, libfuse3 and the few libraries
  they link, fetched with ``apt-get download`` and unpacked with
  ``dpkg-deb -x`` (no maintainer scripts run);
* lcfs's runtime dependencies installed by pip at the versions this
  Python has, so the bundle runs what the tests ran, with pyfuse3 built
  as ``lcfs.pyfuse3_build`` changes it (a wheel made here);
* the ``lcfs`` package itself, copied from where it is imported.

Then it is cut down. Documentation, locales, gconv modules, headers,
Python test suites and tools go, and so does every stdlib extension whose
library is absent (``_sqlite3``, ``_lzma`` and similar), because Python
treats those modules as optional. Debug symbols are stripped. Every ELF file left must find each library it
needs inside the tree, or the build fails naming it. Finally the bundle's
own interpreter, run under chroot, compiles the bytecode and imports the
daemon once as a smoke test.

The plugin runs ``lcfs daemon`` with its socket at
/run/docker/plugins/lcfs.sock inside the plugin, the store image under
/var/lib/lcfs (a bind mount of a host directory, settable as
``data.source``) and the FUSE mount under the propagated mount /mnt/lcfs,
which dockerd maps to a host directory and passes on as the driver home.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from . import pyfuse3_build

log = logging.getLogger(__name__)

# Debian bookworm packages unpacked into the root filesystem.
DEBIAN_PACKAGES = (
    "libc6",
    "zlib1g",
    "libexpat1",
    "libffi8",
    "libgcc-s1",
    "libstdc++6",
    "libssl3",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "python3.11-minimal",
    "libfuse3-3",
    "fuse3",
)
# Python distributions the daemon imports when it serves Docker: the
# containerd snapshotter's grpcio and protobuf are left out.
PYTHON_REQUIREMENTS = ("pyfuse3", "trio", "lmdb", "aiohttp", "uvloop")
PYTHON = "/usr/bin/python3.11"
SITE_PACKAGES = "usr/lib/python3/dist-packages"
STDLIB = "usr/lib/python3.11"
LIBRARY_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu")
# Programs kept from the packages; everything else under the bin
# directories goes.
PROGRAMS = ("usr/bin/python3.11", "bin/fusermount3")

# Paths inside the plugin.
PLUGIN_SOCKET = "lcfs.sock"
DATA_DIR = "/var/lib/lcfs"
PROPAGATED_MOUNT = "/mnt/lcfs"
BDI_DIR = "/sys/devices/virtual/bdi"

REMOVED_TREES = (
    "usr/share",
    "usr/lib/x86_64-linux-gnu/gconv",
    "usr/lib/x86_64-linux-gnu/audit",
    "usr/lib/python3.11/config-3.11-x86_64-linux-gnu",
    "usr/include",
    "etc/init.d",
    "lib/udev",
    "var",
)
REMOVED_STDLIB = (
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
    "distutils",
    "venv",
    "sqlite3",
    "dbm",
    "curses",
    "turtle.py",
    "pydoc.py",
)
# Subdirectories and files of installed distributions that nothing imports.
REMOVED_PACKAGE_PARTS = ("tests", "_tests", "*.pyx", "*.pxd", "*.c", "*.h", "*.pyi")


class BundleError(Exception):
    """The bundle cannot be built; the message names the step and the fix."""


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    log.debug("running %s", " ".join(command))
    result = subprocess.run(
        command, capture_output=True, text=True, check=False, **kwargs
    )
    if result.returncode != 0:
        raise BundleError(
            f"{' '.join(command)} failed with exit code {result.returncode}: "
            f"{(result.stderr or result.stdout).strip()[-2000:]}"
        )
    return result


def _require_tools() -> None:
    for tool, package in (
        ("apt-get", "apt"),
        ("dpkg-deb", "dpkg"),
        ("readelf", "binutils"),
        ("strip", "binutils"),
        ("ldconfig", "libc-bin"),
        ("chroot", "coreutils"),
        ("pkg-config", "pkg-config"),
        ("cc", "build-essential"),
    ):
        if shutil.which(tool) is None:
            raise BundleError(f"{tool} is not installed: install the {package} package")
    if os.geteuid() != 0:
        raise BundleError(
            "building the bundle needs root: it runs the bundle's Python under chroot"
        )


def download_packages(cache: Path) -> list[Path]:
    """Return a .deb of each of DEBIAN_PACKAGES in ``cache``, downloading missing ones.

    A .deb already in the cache is reused as it is, even when apt has a
    newer version; empty the cache to pick up updates.
    """
    cache.mkdir(parents=True, exist_ok=True)
    # apt drops to the _apt user to download and warns when it cannot write
    # the directory; a world-writable cache avoids the warning.
    os.chmod(cache, 0o777)
    missing = [p for p in DEBIAN_PACKAGES if not any(cache.glob(f"{p}_*.deb"))]
    if missing:
        _run(["apt-get", "download", *missing], cwd=cache)
    debs = []
    for package in DEBIAN_PACKAGES:
        found = sorted(cache.glob(f"{package}_*.deb"))
        if not found:
            raise BundleError(f"apt-get download left no {package}_*.deb in {cache}")
        debs.append(found[-1])
    return debs


def unpack_packages(debs: list[Path], rootfs: Path) -> None:
    for deb in debs:
        _run(["dpkg-deb", "--extract", str(deb), str(rootfs)])
    # bookworm's packages install under /lib, /bin and /sbin; the plugin's
    # PATH and the ELF interpreter path /lib64/ld-linux-x86-64.so.2 resolve
    # there, so the merged-/usr links are not needed.
    (rootfs / "usr/bin/python3").symlink_to("python3.11")


def install_python_packages(rootfs: Path) -> None:
    """Install the daemon's dependencies at this Python's versions, then lcfs itself."""
    target = rootfs / SITE_PACKAGES
    requirements = []
    for name in PYTHON_REQUIREMENTS:
        try:
            requirements.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            raise BundleError(
                f"{name} is not installed here: run pip install -e ."
            ) from None
    with tempfile.TemporaryDirectory(prefix="lcfs-bundle-wheel-") as wheel_dir:
        # pyfuse3 rebuilt so that the plugin, too, may turn on the kernel's
        # symlink and directory caches.
        try:
            wheel = pyfuse3_build.build_wheel(Path(wheel_dir))
        except (subprocess.CalledProcessError, SystemExit) as error:
            raise BundleError(
                f"building pyfuse3 {pyfuse3_build.VERSION} for the bundle failed ({error}); "
                "it needs libfuse3-dev, pkg-config, a C compiler and the Python headers"
            ) from None
        requirements = [
            str(wheel) if name.startswith("pyfuse3==") else name for name in requirements
        ]
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-compile",
                "--root-user-action=ignore",
                "--target",
                str(target),
                *requirements,
            ]
        )
    shutil.rmtree(target / "bin", ignore_errors=True)
    package_dir = Path(__file__).resolve().parent
    shutil.copytree(
        package_dir, target / "lcfs", ignore=shutil.ignore_patterns("__pycache__")
    )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def prune(rootfs: Path) -> None:
    """Remove documentation, tools and modules that the daemon never uses."""
    for relative in REMOVED_TREES:
        _remove(rootfs / relative)
    for relative in REMOVED_STDLIB:
        _remove(rootfs / STDLIB / relative)
    keep = {rootfs / program for program in PROGRAMS}
    for directory in ("bin", "sbin", "usr/bin", "usr/sbin", "usr/libexec"):
        for path in sorted((rootfs / directory).glob("*")):
            if path not in keep and path.name != "python3":
                _remove(path)
    site = rootfs / SITE_PACKAGES
    for pattern in REMOVED_PACKAGE_PARTS:
        for path in sorted(site.rglob(pattern)):
            _remove(path)
    for path in sorted(rootfs.rglob("__pycache__")):
        _remove(path)
    for path in sorted((rootfs / "usr/lib/x86_64-linux-gnu").glob("*.a")):
        _remove(path)


def _is_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def _needed(path: Path) -> list[str]:
    output = _run(["readelf", "--dynamic", str(path)]).stdout
    return [
        line.split("[", 1)[1].split("]", 1)[0]
        for line in output.splitlines()
        if "(NEEDED)" in line
    ]


def check_libraries(rootfs: Path) -> list[str]:
    """Strip every ELF file and check that it finds its libraries in the tree.

    An optional stdlib extension (under lib-dynload) whose library is absent
    is removed; Python then raises ImportError for it, which the modules
    that use it handle. Returns the names of the extensions removed. Raises
    BundleError naming any other file whose library is missing.
    """
    available = set()
    for directory in LIBRARY_DIRS:
        available |= {p.name for p in (rootfs / directory).glob("*.so*")}
    dynload = rootfs / STDLIB / "lib-dynload"
    removed, missing = [], []
    for path in sorted(rootfs.rglob("*")):
        if path.is_symlink() or not path.is_file() or not _is_elf(path):
            continue
        absent = [name for name in _needed(path) if name not in available]
        if absent and path.parent == dynload:
            path.unlink()
            removed.append(path.name.split(".")[0])
            continue
        if absent:
            missing.append(f"{path.relative_to(rootfs)} needs {', '.join(absent)}")
            continue
        _run(["strip", "--strip-unneeded", str(path)])
    if missing:
        raise BundleError("libraries missing from the bundle: " + "; ".join(missing))
    return removed


def compile_and_check(rootfs: Path) -> None:
    """Build the library cache and bytecode, then import the daemon with the bundle's Python."""
    _run(["ldconfig", "-r", str(rootfs)])
    _run(
        [
            "chroot",
            str(rootfs),
            PYTHON,
            "-m",
            "compileall",
            "-q",
            "/" + STDLIB,
            "/" + SITE_PACKAGES,
        ]
    )
    check = (
        "import lcfs.cli, lcfs.driver.daemon, pyfuse3, lmdb, aiohttp, trio, uvloop; "
        "from lcfs.fuse.operations import KERNEL_CACHES; "
        "assert KERNEL_CACHES, 'the bundled pyfuse3 lacks the kernel caches'; "
        "print(pyfuse3.__version__)"
    )
    _run(["chroot", str(rootfs), PYTHON, "-I", "-c", check])


def plugin_config() -> dict:
    """Return the plugin's config.json (Docker's plugin config version 1)."""
    return {
        "description": "lcfs: copy-on-write layer store, as a graphdriver",
        "entrypoint": [
            PYTHON,
            "-m",
            "lcfs.cli",
            "daemon",
            "--socket",
            f"/run/docker/plugins/{PLUGIN_SOCKET}",
            "--device",
            f"{DATA_DIR}/lcfs.img",
            # Docker's data root is outside the plugin, where the parent of
            # the driver home is the propagated mount.
            "--docker-root",
            "none",
        ],
        "workdir": "/",
        "interface": {"types": ["docker.graphdriver/1.0"], "socket": PLUGIN_SOCKET},
        "network": {"type": "none"},
        "propagatedMount": PROPAGATED_MOUNT,
        "mounts": [
            {
                "name": "data",
                "description": "host directory holding the store image lcfs.img",
                "source": DATA_DIR,
                "destination": DATA_DIR,
                "type": "bind",
                "options": ["rbind", "rw"],
                "settable": ["source"],
            },
            {
                # The plugin's /sys is read-only, and the daemon sets its
                # mount's read-ahead in /sys/class/bdi/MAJOR:MINOR, a link
                # into this directory.
                "name": "bdi",
                "description": "the kernel's backing-device settings, where the "
                "daemon sets the read-ahead of its mount",
                "source": BDI_DIR,
                "destination": BDI_DIR,
                "type": "bind",
                "options": ["rbind", "rw"],
            },
        ],
        "args": {
            "name": "args",
            "description": "more 'lcfs daemon' options, such as --size 64G",
            "settable": ["value"],
            "value": [],
        },
        "linux": {
            "capabilities": ["CAP_SYS_ADMIN"],
            "devices": [{"path": "/dev/fuse"}],
        },
    }


def directory_size(path: Path) -> int:
    """Return the bytes used by the files below ``path``, symlinks not followed."""
    total = 0
    for entry in path.rglob("*"):
        info = entry.lstat()
        if stat.S_ISREG(info.st_mode):
            total += info.st_size
    return total


def build_bundle(outdir: Path, cache: Path | None = None) -> int:
    """Build the plugin bundle in ``outdir`` (which must not exist); return rootfs bytes."""
    _require_tools()
    if outdir.exists():
        raise BundleError(
            f"{outdir} exists already; remove it or name another directory"
        )
    outdir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".lcfs-bundle-", dir=outdir.parent))
    try:
        rootfs = work / "rootfs"
        rootfs.mkdir()
        debs = download_packages(cache or work / "debs")
        unpack_packages(debs, rootfs)
        install_python_packages(rootfs)
        prune(rootfs)
        removed = check_libraries(rootfs)
        log.info(
            "left out stdlib extensions whose libraries are not bundled: %s",
            ", ".join(removed) or "none",
        )
        for directory in (
            "dev",
            "proc",
            "sys",
            "tmp",
            "run/docker/plugins",
            DATA_DIR.lstrip("/"),
            PROPAGATED_MOUNT.lstrip("/"),
        ):
            (rootfs / directory).mkdir(parents=True, exist_ok=True)
        os.chmod(rootfs / "tmp", 0o1777)
        compile_and_check(rootfs)
        (work / "config.json").write_text(json.dumps(plugin_config(), indent=2) + "\n")
        shutil.rmtree(work / "debs", ignore_errors=True)
        os.rename(work, outdir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    size = directory_size(outdir / "rootfs")
    log.info("built plugin bundle %s: rootfs of %.1f MiB", outdir, size / 2**20)
    return size
