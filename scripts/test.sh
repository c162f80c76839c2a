#!/usr/bin/env bash
# Install what the tests need and run the whole test suite as root.
#
# Usage: scripts/test.sh [PYTEST-ARGUMENT...]
# With no arguments every test runs, the end-to-end dockerd tests
# included. The Debian minbase and busybox root filesystems the tests
# build are cached in .cache/tests (or $LCFS_TEST_CACHE) for later runs.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

if [ "$(id -u)" -ne 0 ]; then
    echo "test.sh: run as root: the tests mount FUSE filesystems and start dockerd" >&2
    exit 2
fi

# The containerd snapshotter tests need containerd, runc and the shim, and
# build containerd's own snapshotter test suite offline from Debian's Go
# sources (GOPATH mode, no module proxy).
"$repo/scripts/apt-install.sh" \
    fuse3 libfuse3-dev pkg-config build-essential python3-dev python3-pip \
    docker.io busybox-static debootstrap \
    containerd runc golang-go golang-github-containerd-containerd-dev
# Debian's own python3 is marked externally managed; the tests need lcfs
# importable by the same interpreter that runs pytest.
PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --quiet --root-user-action=ignore -e '.[test]'
# An editable install writes no bytecode, and no import does under
# PYTHONDONTWRITEBYTECODE, so every daemon would compile lcfs at start.
python3 -m compileall -q lcfs tools
# The FUSE tests check the kernel caches that need pyfuse3 rebuilt.
if ! python3 scripts/build_pyfuse3.py --check; then
    PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore python3 scripts/build_pyfuse3.py
fi

if ! grep -qw fuse /proc/filesystems; then
    modprobe fuse
fi
if [ ! -c /dev/fuse ]; then
    echo "test.sh: /dev/fuse is missing: load the fuse kernel module" >&2
    exit 1
fi

# A test that runs longer than 20 minutes ends the whole run with a dump of
# every thread's stack. The thread method works even when the main thread
# is stuck in the kernel on a FUSE request, where a signal would never be
# handled, but it skips fixture teardown.
status=0
python3 -m pytest -q -rfE --timeout=1200 --timeout-method=thread "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "test.sh: pytest collected no tests" >&2
    exit 1
fi
exit "$status"
