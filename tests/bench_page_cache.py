"""Measure the kernel page cache that many readers of one file leave behind.

READERS processes each read the same FILE_MIB file through their own child
layer of one lcfs mount, with the default settings, with
``--invalidate-on-close`` and with ``--share-unchanged``, and then through
their own kernel overlayfs mount of one lower directory. For each setup the script reports:

- the growth of ``Cached`` in /proc/meminfo once the readers have closed
  the file;
- the part of it that is the file backing the data (the lcfs image, or the
  overlay's lower file), measured with fincore;
- the time of a first and a second round of reads, and the READ requests
  that the second round sent to the daemon.
It also times one process that opens, reads and closes a SMALL_KIB file
REOPENS times, the pattern that pays for invalidation on every close.

Run as root on an otherwise quiet machine: ``python tests/bench_page_cache.py``.
It writes ``drop_caches`` before each setup, and mounts and unmounts only
under a temporary directory of its own. Cached is a machine-wide figure, so
other activity during a run shows up in it.
"""

from __future__ import annotations

import argparse
import os
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lcfs_daemon import LcfsDaemon  # noqa: E402
from mounts import remove_tree  # noqa: E402

from lcfs.fuse.stats import fetch_stats  # noqa: E402
from lcfs.store import ROOT_INO, Store  # noqa: E402

MIB = 1 << 20
CHUNK = 4 * MIB
SMALL_KIB = 64
REOPENS = 2000

REOPEN_SCRIPT = """
import sys, time
path, count = sys.argv[1], int(sys.argv[2])
started = time.monotonic()
for _ in range(count):
    with open(path, "rb") as f:
        f.read()
print(time.monotonic() - started)
"""


def cached_kib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1])
    raise RuntimeError("/proc/meminfo has no Cached line")


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    time.sleep(1)


def resident_mib(path: Path) -> float:
    """Return how much of a file on a local file system is in the page cache."""
    output = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    return int(output.split()[0]) / MIB


def read_all(paths: list[str]) -> float:
    """Read every file once, one process after another; return the seconds taken."""
    started = time.monotonic()
    for path in paths:
        subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M", "status=none"], check=True)
    return time.monotonic() - started


def build_image(image: Path, readers: int, data: bytes) -> None:
    Store.mkfs(str(image), size=len(data) + 512 * MIB)
    store = Store.open(str(image))
    try:
        base = store.create_layer("base").number
        ino = store.mknod(base, ROOT_INO, b"file", stat.S_IFREG | 0o644).ino
        for offset in range(0, len(data), CHUNK):
            store.write(base, ino, offset, data[offset : offset + CHUNK])
        small = store.mknod(base, ROOT_INO, b"small", stat.S_IFREG | 0o644).ino
        store.write(base, small, 0, data[: SMALL_KIB * 1024])
        for index in range(readers):
            store.create_layer(f"reader{index}", "base")
        store.commit()
    finally:
        store.close()


def reopen_microseconds(path: str) -> float:
    """Return the mean time of one open, read and close of ``path`` in one process."""
    output = subprocess.run([sys.executable, "-c", REOPEN_SCRIPT, path, str(REOPENS)],
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    return float(output) / REOPENS * 1e6


def measure(paths: list[str], backing: Path, daemon: LcfsDaemon | None) -> dict:
    drop_caches()
    before = cached_kib()
    first = read_all(paths)
    if daemon is not None:
        # A release request counts as served once its invalidation is done.
        deadline = time.monotonic() + 30
        while fetch_stats(str(daemon.socket_path))["release"]["requests"] < len(paths):
            if time.monotonic() > deadline:
                raise RuntimeError("the daemon did not finish the releases within 30 s")
            time.sleep(0.1)
    growth = (cached_kib() - before) / 1024
    backing_mib = resident_mib(backing)
    reads_before = fetch_stats(str(daemon.socket_path))["read"]["requests"] if daemon else 0
    second = read_all(paths)
    reads_after = fetch_stats(str(daemon.socket_path))["read"]["requests"] if daemon else 0
    small = os.path.join(os.path.dirname(paths[0]), "small")
    return {
        "reopen": reopen_microseconds(small),
        "growth": growth,
        "backing": backing_mib,
        "first": first,
        "second": second,
        "second_reads": reads_after - reads_before if daemon else None,
    }


def run_lcfs(workdir: Path, readers: int, options: list[str]) -> dict:
    mountpoint = workdir / "mnt"
    mountpoint.mkdir(exist_ok=True)
    daemon = LcfsDaemon(workdir, mountpoint=mountpoint, options=tuple(options))
    daemon.start()
    try:
        paths = [str(mountpoint / f"reader{index}" / "file") for index in range(readers)]
        return measure(paths, daemon.device, daemon)
    finally:
        daemon.stop()


def run_overlay(workdir: Path, readers: int, data: bytes) -> dict:
    lower = workdir / "lower"
    lower.mkdir()
    with open(lower / "file", "wb") as f:
        f.write(data)
        os.fsync(f.fileno())
    with open(lower / "small", "wb") as f:
        f.write(data[: SMALL_KIB * 1024])
    mounted = []
    try:
        for index in range(readers):
            top = workdir / f"overlay{index}"
            for part in ("upper", "work", "merged"):
                (top / part).mkdir(parents=True)
            options = f"lowerdir={lower},upperdir={top / 'upper'},workdir={top / 'work'}"
            subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options,
                            str(top / "merged")], check=True)  # fmt: skip
            mounted.append(top / "merged")
        return measure([str(path / "file") for path in mounted], lower / "file", None)
    finally:
        for path in reversed(mounted):
            subprocess.run(["umount", str(path)], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readers", type=int, default=20, help="readers (default 20)")
    parser.add_argument("--file-mib", type=int, default=200,
                        help="size of the file in MiB (default 200)")  # fmt: skip
    parser.add_argument("--workdir", default="/var/tmp",
                        help="directory on a local disk for the image and overlay "
                        "(default /var/tmp)")  # fmt: skip
    args = parser.parse_args()

    data = os.urandom(args.file_mib * MIB)
    workdir = Path(tempfile.mkdtemp(prefix="lcfs-bench-", dir=args.workdir))
    results = {}
    try:
        build_image(workdir / "lcfs.img", args.readers, data)
        for options in ([], ["--invalidate-on-close"], ["--share-unchanged"]):
            name = " ".join(["lcfs", *options]) if options else "lcfs, defaults"
            results[name] = run_lcfs(workdir, args.readers, options)
        results["overlayfs"] = run_overlay(workdir, args.readers, data)
    finally:
        remove_tree(workdir)

    print(f"{args.readers} readers of one {args.file_mib} MiB file, each through its own "
          "layer or overlay mount\n")  # fmt: skip
    print("| setup | Cached growth (MiB) | of it, image or lower file (MiB) | "
          "first round (s) | second round (s) | READ requests, second round | "
          f"open, read, close of {SMALL_KIB} KiB (us) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, result in results.items():
        second_reads = "-" if result["second_reads"] is None else str(result["second_reads"])
        print(f"| {name} | {result['growth']:.0f} | {result['backing']:.0f} | "
              f"{result['first']:.2f} | {result['second']:.2f} | {second_reads} | "
              f"{result['reopen']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
