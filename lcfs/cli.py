"""The ``lcfs`` command: the daemon and the small commands for operators.

Exit codes: 0 success, 1 an unexpected failure (with a traceback), 2 a
mistake the user can fix (a bad option, a busy or unformatted device),
reported in one line on stderr.
"""

import argparse
import contextlib
import os
import json
import logging
import math
import sys

from lcfs.sizes import parse_size

DEFAULT_DEVICE = "/var/lib/lcfs/lcfs.img"
DEFAULT_SOCKET = "/run/docker/plugins/lcfs.sock"

EXIT_USER_ERROR = 2

log = logging.getLogger(__name__)


class UserError(Exception):
    """A mistake in the command line or the environment; printed as one line."""


class _ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser that reports a bad command line in one line, not two."""

    def error(self, message: str):
        self.exit(
            EXIT_USER_ERROR,
            f"{self.prog}: error: {message} (see {self.prog} --help)\n",
        )


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse_seconds(text: str) -> float:
    """Parse ``text`` as a number of seconds, 0 or more, for argparse's ``type``."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(
            f"invalid number of seconds {text!r}: use a number of 0 or more"
        )
    return value


def _kib(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(
            f"invalid size in KiB {text!r}: use a whole number of 0 or more"
        )
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="lcfs", description="Copy-on-write store for container image layers."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    daemon = commands.add_parser(
        "daemon",
        help="serve the store over FUSE, as Docker's graphdriver plugin and "
        "as a containerd snapshotter",
        description="Mount the store and serve Docker's graphdriver plugin "
        "protocol, containerd's Snapshots service, or both, until SIGTERM or "
        "SIGINT.",
    )
    daemon.add_argument(
        "--device",
        default=DEFAULT_DEVICE,
        help="image file or block device holding the store; a missing image "
        f"file is created sparse and formatted (default {DEFAULT_DEVICE})",
    )
    daemon.add_argument(
        "--size",
        type=_size,
        help="size of a new image file in bytes, K, M, G or T suffix allowed "
        "(default 64G; ignored when the device exists)",
    )
    daemon.add_argument(
        "--socket",
        default="/run/docker/plugins/lcfs.sock",
        help="unix socket for Docker's graphdriver plugin protocol, or 'none' "
        "to serve only the containerd snapshotter (default %(default)s)",
    )
    daemon.add_argument(
        "--snapshotter-socket",
        metavar="PATH",
        help="also serve containerd's Snapshots gRPC service (a proxy "
        "snapshotter) on this unix socket; the FUSE mount point is then fixed "
        "(default mount point /var/lib/lcfs/mnt)",
    )
    daemon.add_argument(
        "--mountpoint",
        help="mount the layers here at start and keep them mounted; without "
        "it they are mounted at the Home that dockerd's Init names, or at "
        "/var/lib/lcfs/mnt with --snapshotter-socket",
    )
    daemon.add_argument(
        "--pid-file",
        help="file to write the daemon's pid to; an existing file is replaced "
        "only if it contains just a pid and is not the device (default: the "
        "socket path with .pid in place of .sock)",
    )
    daemon.add_argument(
        "--stop-timeout",
        type=parse_seconds,
        metavar="SECONDS",
        help="on SIGTERM or SIGINT, how long to let requests in flight finish "
        "before cancelling them; a cancelled ApplyDiff is rolled back "
        "(default 30)",
    )
    daemon.add_argument(
        "--docker-root",
        help="Docker's data root, used to log layers Docker no longer "
        "references (default: the parent directory of Init's Home), or 'none' "
        "to skip that check where Docker's data root is not visible, as in a "
        "managed plugin",
    )
    daemon.add_argument(
        "--grace",
        type=parse_seconds,
        metavar="SECONDS",
        default=3600.0,
        help="how old an unreferenced layer must be before it is logged as "
        "an orphan (default 3600)",
    )
    _add_fuse_options(daemon)
    _add_log_level(daemon, "info")

    mkfs = commands.add_parser(
        "mkfs",
        help="format a device or image file",
        description="Format DEVICE as an empty lcfs store. A missing image "
        "file is created sparse, of the size that --size gives. Without --force, an existing file or device "
        "is formatted only if it is empty: size 0, or zeros in its first MiB.",
    )
    mkfs.add_argument("device", metavar="DEVICE", help="image file or block device")
    mkfs.add_argument(
        "--size",
        type=_size,
        help="size in bytes, K, M, G or T suffix allowed; needed for a new "
        "image file (default: the size of an existing device or file)",
    )
    mkfs.add_argument(
        "--metadata-size",
        type=_size,
        help="bytes reserved for the metadata database at the start of the "
        "device, K, M, G or T suffix allowed (default: chosen from the size)",
    )
    mkfs.add_argument(
        "--force",
        action="store_true",
        help="format even if DEVICE contains an lcfs store or other data, "
        "which is destroyed",
    )
    _add_log_level(mkfs, "warning")

    layers = commands.add_parser(
        "layers",
        help="list the layers of a store",
        description="List every layer: Docker id, parent id and whether it "
        "is frozen (read-only since its first child layer was created, even "
        "after that child is removed). While a daemon has the "
        "device locked, the list comes from that daemon through its plugin "
        "socket.",
    )
    layers.add_argument(
        "--device",
        default=DEFAULT_DEVICE,
        help="image file or block device (default %(default)s)",
    )
    layers.add_argument(
        "--socket",
        default=DEFAULT_SOCKET,
        help="plugin socket of the daemon to ask when one has the device locked "
        "(default %(default)s)",
    )
    _add_log_level(layers, "warning")

    stats = commands.add_parser(
        "stats",
        help="show the FUSE requests a running daemon has served",
        description="Print the FUSE requests that a running lcfs daemon has "
        "served since it started: count and latency per operation, getxattr "
        "requests per attribute name, and xattr requests that reached the "
        "store.",
    )
    stats.add_argument(
        "--socket",
        default=DEFAULT_SOCKET,
        help="the daemon's plugin socket (default %(default)s)",
    )
    stats.add_argument(
        "--json",
        action="store_true",
        help="print the counters as JSON, keyed by FUSE operation name",
    )
    _add_log_level(stats, "warning")
    _add_install_commands(commands)
    return parser


def _add_install_commands(commands) -> None:
    install = commands.add_parser(
        "install",
        help="install the daemon as a systemd service that starts before dockerd",
        description="Write the systemd unit /etc/systemd/system/lcfs.service, "
        "the plugin spec file /etc/docker/plugins/lcfs.spec that tells dockerd "
        "where the socket is, and a manifest of both in /var/lib/lcfs. Nothing "
        "is written under Docker's data root and nothing is downloaded. Then "
        "run 'systemctl daemon-reload && systemctl enable --now lcfs' and "
        "start dockerd with --experimental --storage-driver lcfs.",
    )
    install.add_argument(
        "--device",
        default=DEFAULT_DEVICE,
        help="image file or block device the service opens; a missing image "
        "file is created at first start (default %(default)s)",
    )
    install.add_argument(
        "--size",
        type=_size,
        help="size of a new image file in bytes, K, M, G or T suffix allowed "
        "(default 64G)",
    )
    install.add_argument(
        "--socket",
        default=DEFAULT_SOCKET,
        help="plugin socket; the spec file is named after it (default %(default)s)",
    )
    install.add_argument("--mountpoint", help="passed on to 'lcfs daemon --mountpoint'")
    install.add_argument(
        "--docker-root", help="passed on to 'lcfs daemon --docker-root'"
    )
    install.add_argument(
        "--stop-timeout",
        type=parse_seconds,
        default=30.0,
        metavar="SECONDS",
        help="passed on to 'lcfs daemon --stop-timeout'; systemd waits 30 s "
        "longer before SIGKILL (default %(default)s)",
    )
    _add_fuse_options(install)
    install.add_argument(
        "--daemon-log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="the service's --log-level (default %(default)s)",
    )
    install.add_argument(
        "--command",
        dest="lcfs_command",
        metavar="PATH",
        help="the lcfs program the service runs (default: the lcfs script "
        "beside this Python, or this Python with -m lcfs.cli)",
    )
    _add_root(install)
    install.add_argument(
        "--force",
        action="store_true",
        help="overwrite files that exist already",
    )
    _add_log_level(install, "info")

    uninstall = commands.add_parser(
        "uninstall",
        help="remove what 'lcfs install' wrote",
        description="Remove the files listed in the manifest that 'lcfs "
        "install' wrote, and the directories it created if they are empty. A "
        "file changed since then is kept and reported. The store itself is "
        "not touched. Disable the service first: systemctl disable --now lcfs.",
    )
    _add_root(uninstall)
    _add_log_level(uninstall, "info")

    bundle = commands.add_parser(
        "plugin-bundle",
        help="build a managed Docker plugin (config.json and rootfs/) in OUTDIR",
        description="Build the directory that 'docker plugin create NAME OUTDIR' "
        "reads: Debian's Python 3.11 and libfuse3 from apt-get download, lcfs's "
        "dependencies from pip, and lcfs itself, cut down to what the daemon "
        "uses. Needs root, apt-get, dpkg-deb, binutils, and for the rebuilt "
        "pyfuse3 pkg-config, libfuse3-dev, a C compiler and the Python headers "
        "(python3-dev), all of which scripts/install.sh installs.",
    )
    bundle.add_argument("outdir", metavar="OUTDIR", help="directory to create")
    bundle.add_argument(
        "--cache",
        metavar="DIR",
        help="keep the downloaded .deb files here and reuse them (default: "
        "download into a temporary directory)",
    )
    _add_log_level(bundle, "info")


def _add_root(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--root",
        default="/",
        metavar="DIR",
        help="write under DIR instead of / (for tests and image builds); "
        "paths inside the files stay as given (default %(default)s)",
    )


def _add_fuse_options(parser: argparse.ArgumentParser) -> None:
    from lcfs.fuse.settings import DIRECT_IO_MODES, FuseSettings

    defaults = FuseSettings()
    parser.add_argument(
        "--direct-io",
        choices=DIRECT_IO_MODES,
        default=defaults.direct_io,
        help="which opens bypass the kernel's page cache: never to cache "
        "every open, which with the other defaults lets the kernel open files "
        "without asking the daemon; write-only for descriptors opened "
        "O_WRONLY, the only ones that can never be memory-mapped "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--invalidate-on-close",
        action=argparse.BooleanOptionalAction,
        default=defaults.invalidate_on_close,
        help="drop a file's pages from the kernel's page cache when its last "
        "descriptor is closed (default %(default)s)",
    )
    parser.add_argument(
        "--read-ahead-kb",
        type=_kib,
        default=defaults.read_ahead_kb,
        help="the kernel's read-ahead on the mount in KiB, which also sets the "
        "size of its read requests; 0 keeps the kernel's 128 (default %(default)s)",
    )
    parser.add_argument(
        "--share-unchanged",
        action=argparse.BooleanOptionalAction,
        default=defaults.share_unchanged,
        help="serve a file that a container or layer has not changed through "
        "one kernel inode for every layer that holds it, so that its pages "
        "are cached once; --no-share-unchanged gives each layer its own "
        "inodes (default %(default)s)",
    )


def _fuse_settings(args: argparse.Namespace):
    from lcfs.fuse.settings import FuseSettings

    return FuseSettings(
        direct_io=args.direct_io,
        invalidate_on_close=args.invalidate_on_close,
        read_ahead_kb=args.read_ahead_kb,
        share_unchanged=args.share_unchanged,
    )


def _fuse_arguments(settings) -> list[str]:
    """Return the `lcfs daemon` options that set ``settings``, omitting defaults."""
    from lcfs.fuse.settings import FuseSettings

    defaults = FuseSettings()
    arguments = []
    if settings.direct_io != defaults.direct_io:
        arguments += ["--direct-io", settings.direct_io]
    if settings.invalidate_on_close != defaults.invalidate_on_close:
        arguments.append(
            "--invalidate-on-close" if settings.invalidate_on_close
            else "--no-invalidate-on-close"
        )  # fmt: skip
    if settings.read_ahead_kb != defaults.read_ahead_kb:
        arguments += ["--read-ahead-kb", str(settings.read_ahead_kb)]
    if settings.share_unchanged != defaults.share_unchanged:
        arguments.append(
            "--share-unchanged" if settings.share_unchanged else "--no-share-unchanged"
        )
    return arguments


def _add_log_level(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--log-level",
        default=default,
        type=str.lower,
        choices=["debug", "info", "warning", "error"],
        help="lowest level of log messages written to stderr (default %(default)s)",
    )


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@contextlib.contextmanager
def _without_ca_certificates():
    """Point OpenSSL at no CA certificates while the block runs.

    Importing aiohttp (3.10 and later, aiohttp/connector.py) builds two TLS
    client contexts, which load the system's CA certificates: about 70 ms
    of the daemon's start on a 2-core VM. The daemon makes no TLS
    connection, so it imports aiohttp with these variables set, and sets
    them back after.
    """
    names = ("SSL_CERT_FILE", "SSL_CERT_DIR")
    saved = {name: os.environ.get(name) for name in names}
    os.environ["SSL_CERT_FILE"] = os.devnull
    os.environ["SSL_CERT_DIR"] = os.devnull
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _run_daemon(args: argparse.Namespace) -> int:
    with _without_ca_certificates():
        from lcfs.driver.daemon import Daemon, DaemonConfig

    config = DaemonConfig(
        device=args.device,
        size=args.size,
        socket_path=None if args.socket == "none" else args.socket,
        snapshotter_socket=args.snapshotter_socket,
        mountpoint=args.mountpoint,
        pid_file=args.pid_file,
        docker_root=None if args.docker_root == "none" else args.docker_root,
        orphan_report=args.docker_root != "none",
        grace=args.grace,
        fuse=_fuse_settings(args),
    )
    if args.stop_timeout is not None:
        config.stop_timeout = args.stop_timeout
    return Daemon(config).run()


def _run_mkfs(args: argparse.Namespace) -> int:
    from lcfs.store import Store, errors

    try:
        Store.mkfs(
            args.device,
            size=args.size,
            metadata_size=args.metadata_size,
            force=args.force,
        )
    except errors.DeviceBusy as error:
        raise errors.DeviceBusy(
            f"{error}; stop that process (an lcfs daemon, for example) and run "
            "lcfs mkfs again"
        ) from None
    print(f"formatted {args.device}")
    return 0


def _run_layers(args: argparse.Namespace) -> int:
    from lcfs.store import Store, errors

    try:
        store = Store.open(args.device)
    except errors.DeviceBusy as busy:
        rows = _layers_from_daemon(args.device, args.socket, busy)
    else:
        try:
            layers = sorted(store.list_layers(), key=lambda layer: layer.number)
        finally:
            store.close()
        rows = [
            (layer.id, layer.parent_id or "-", "yes" if layer.frozen else "no")
            for layer in layers
        ]
    rows.insert(0, ("ID", "PARENT", "FROZEN"))
    id_width = max(len(row[0]) for row in rows)
    parent_width = max(len(row[1]) for row in rows)
    for layer_id, parent_id, frozen in rows:
        print(f"{layer_id:<{id_width}}  {parent_id:<{parent_width}}  {frozen}")
    return 0


def _layers_from_daemon(device: str, socket_path: str, busy: Exception) -> list:
    """Return the layer rows of ``device`` from the daemon that has it locked.

    ``busy`` is the error that opening the device gave. Every failure
    message starts with it, so that the user sees which process has the
    device locked.
    """
    from lcfs.control import LAYERS_PATH, fetch_json

    try:
        reply = fetch_json(socket_path, LAYERS_PATH)
        served = tuple(reply["DeviceInode"])
        layers = reply["Layers"]
        rows = [
            (layer["ID"], layer["Parent"] or "-", "yes" if layer["Frozen"] else "no")
            for layer in layers
        ]
    except OSError as error:
        raise UserError(
            f"{busy}, and the request for the layer list on the daemon's plugin "
            f"socket {socket_path} failed: {error}; pass the plugin socket of the "
            "daemon that has the device locked with --socket, or stop that daemon "
            "(a daemon started with --socket none has no plugin socket)"
        ) from None
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(
            f"{busy}, and the reply of {socket_path} to {LAYERS_PATH} is not a "
            f"layer list ({type(error).__name__}: {error}); is that socket an "
            "lcfs daemon of this version?"
        ) from None
    local = os.stat(device)
    if served != (local.st_dev, local.st_ino):
        raise UserError(
            f"{busy}, and the daemon at {socket_path} serves another device "
            f"({reply.get('Device')}); pass the socket of the daemon that has "
            f"{device} locked with --socket"
        )
    return rows


def _run_stats(args: argparse.Namespace) -> int:
    from lcfs.fuse.stats import fetch_stats, format_stats

    try:
        snapshot = fetch_stats(args.socket)
    except OSError as error:
        raise UserError(
            f"cannot read statistics from {args.socket}: {error}; is lcfs "
            "daemon running? pass its plugin socket with --socket (a daemon "
            "started with --socket none has no plugin socket and serves no statistics)"
        ) from error
    if args.json:
        print(json.dumps(snapshot, indent=2, sort_keys=True))
    else:
        print(format_stats(snapshot), end="")
    return 0


def _run_install(args: argparse.Namespace) -> int:
    from lcfs import install

    command = [args.lcfs_command] if args.lcfs_command else install.default_command()
    config = install.ServiceConfig(
        command=command,
        device=args.device,
        socket=args.socket,
        size=args.size,
        mountpoint=args.mountpoint,
        docker_root=args.docker_root,
        stop_timeout=args.stop_timeout,
        log_level=args.daemon_log_level,
        extra_args=_fuse_arguments(_fuse_settings(args)),
    )
    try:
        written = install.install(config, root=args.root, force=args.force)
    except install.InstallError as error:
        raise UserError(str(error)) from None
    for path in written:
        print(f"wrote {path}")
    if args.root == "/":
        print(
            f"next: systemctl daemon-reload && systemctl enable --now {install.UNIT_NAME}"
        )
    return 0


def _run_uninstall(args: argparse.Namespace) -> int:
    from lcfs import install

    try:
        removed, changed = install.uninstall(root=args.root)
    except install.InstallError as error:
        raise UserError(str(error)) from None
    for path in removed:
        print(f"removed {path}")
    for path in changed:
        print(f"kept {path}: changed since install; remove it by hand")
    return 0


def _run_plugin_bundle(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lcfs import bundle

    cache = Path(args.cache) if args.cache else None
    try:
        size = bundle.build_bundle(Path(args.outdir), cache)
    except bundle.BundleError as error:
        raise UserError(str(error)) from None
    print(f"built {args.outdir}: rootfs {size / 2**20:.1f} MiB")
    print(f"next: docker plugin create lcfs {args.outdir}")
    return 0


_COMMANDS = {
    "daemon": _run_daemon,
    "mkfs": _run_mkfs,
    "layers": _run_layers,
    "stats": _run_stats,
    "install": _run_install,
    "uninstall": _run_uninstall,
    "plugin-bundle": _run_plugin_bundle,
}


def _user_error_types() -> tuple[type[BaseException], ...]:
    from lcfs.driver.daemon import DaemonError
    from lcfs.store import errors

    # NOTE: every StoreError counts as the user's to fix here (a busy, missing
    # or unformatted device, a size that does not fit). A store bug that
    # raises one loses its traceback; --log-level debug logs it.
    return (UserError, DaemonError, errors.StoreError, OSError)


def main(argv: list[str] | None = None) -> int:
    """Run the ``lcfs`` command line and return its exit code."""
    args = _build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    user_errors = _user_error_types()
    try:
        return _COMMANDS[args.command](args)
    except BrokenPipeError:
        # The reader of our output went away (``lcfs stats --json | head``).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except user_errors as error:
        log.debug("lcfs %s failed", args.command, exc_info=True)
        print(f"lcfs {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
