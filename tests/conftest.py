"""Fixtures shared by every test level.

The root filesystem fixtures are session-scoped and backed by the cache in
rootfs.py, so a whole run builds each tree at most once and later runs
reuse it.
"""

from pathlib import Path

import pytest
import rootfs


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
