#!/usr/bin/env bash
# Install lcfs and everything it needs on Debian bookworm, then start
# `lcfs daemon` in the background on the default image file
# (/var/lib/lcfs/lcfs.img, created sparse on first start) with its plugin
# socket at /run/docker/plugins/lcfs.sock, where dockerd finds it.
#
# Usage: scripts/install.sh   (as root)
# Environment: LCFS_PREFIX (virtual environment, default /opt/lcfs),
# LCFS_LOG (daemon log, default /var/log/lcfs.log).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
prefix=${LCFS_PREFIX:-/opt/lcfs}
log=${LCFS_LOG:-/var/log/lcfs.log}

if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root: lcfs mounts FUSE filesystems for dockerd" >&2
    exit 2
fi

"$repo/scripts/apt-install.sh" \
    fuse3 libfuse3-dev pkg-config build-essential \
    python3-dev python3-venv docker.io

# A virtual environment keeps lcfs and its dependencies out of the system
# Python, which Debian marks as externally managed.
python3 -m venv "$prefix"
"$prefix/bin/pip" install --quiet "$repo"
# Rebuild pyfuse3 so that lcfs can turn on the kernel's symlink and
# directory caches; lcfs runs on stock pyfuse3 too, only slower.
if ! "$prefix/bin/python" "$repo/scripts/build_pyfuse3.py" --check; then
    "$prefix/bin/python" "$repo/scripts/build_pyfuse3.py"
fi
ln -sf "$prefix/bin/lcfs" /usr/local/bin/lcfs
ln -sf "$prefix/bin/lcfs-fsck" /usr/local/bin/lcfs-fsck

if ! grep -qw fuse /proc/filesystems; then
    modprobe fuse
fi

LCFS_PREFIX=$prefix LCFS_LOG=$log exec "$repo/scripts/start-daemon.sh"
