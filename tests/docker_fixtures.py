"""Module-scoped fixtures for tests that run dockerd against lcfs.

A test module loads them with `pytest_plugins = ["docker_fixtures"]`.
Each module that requests them gets its own `lcfs daemon` with its own
image file and socket, a dockerd that uses it as a graphdriver plugin,
and, on request, a second dockerd on the vfs driver as the reference. The daemon mounts at the Home that dockerd's Init names, as in
production.
"""

import pytest
from dockerd import DockerDaemon
from lcfs_daemon import LcfsDaemon, running_lcfs


@pytest.fixture(scope="module")
def lcfs(tmp_path_factory):
    with running_lcfs(LcfsDaemon(tmp_path_factory.mktemp("lcfs"))) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def initial_status(lcfs) -> dict[str, str]:
    """The plugin's Status before dockerd stored anything."""
    return lcfs.status()


@pytest.fixture(scope="module")
def docker(lcfs, initial_status, tmp_path_factory):
    daemon = DockerDaemon(
        tmp_path_factory.mktemp("dockerd"), plugin_socket=lcfs.socket_path
    )
    daemon.start()
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def vfs_docker(tmp_path_factory):
    daemon = DockerDaemon(tmp_path_factory.mktemp("dockerd-vfs"), storage_driver="vfs")
    daemon.start()
    yield daemon
    daemon.stop()
