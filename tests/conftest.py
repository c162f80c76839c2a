"""Fixtures shared by every test level.

The root filesystem fixtures are session-scoped and backed by the cache in
rootfs.py, so a whole run builds each tree at most once and later runs
reuse it.
"""

import os
import sys
from pathlib import Path

import pytest
import rootfs

# Tests start the lcfs and lcfs-fsck commands, which import lcfs from
# whichever checkout pip last installed in editable mode. This checkout
# goes first on the path of this process and of every subprocess, so that
# the tests run its code.
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = os.pathsep.join(
    path for path in (str(REPO), os.environ.get("PYTHONPATH")) if path
)


@pytest.fixture(scope="session")
def busybox_tree() -> Path:
    """A busybox-static root tree (do not modify: it is the shared cache)."""
    return rootfs.busybox_tree()


@pytest.fixture(scope="session")
def busybox_tar() -> Path:
    """An uncompressed tar of the busybox-static root tree."""
    return rootfs.busybox_tar()


@pytest.fixture(scope="session")
def minbase_tar() -> Path:
    """An uncompressed tar of a Debian bookworm minbase root, built by debootstrap."""
    return rootfs.minbase_tar()
