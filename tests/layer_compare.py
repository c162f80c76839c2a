"""Compare an image's layer as lcfs serves it with the same layer under vfs."""

import trees
from dockerd import DockerDaemon
from lcfs_daemon import LcfsDaemon

# Layer tars have no entry for the root directory, so its mtime is whenever
# each driver created the layer directory, not data carried by the image.
ROOT_MTIME = {b".": {"mtime"}}


def compare_with_vfs(
    docker: DockerDaemon,
    vfs_docker: DockerDaemon,
    lcfs: LcfsDaemon,
    image: str,
    ignore: dict[bytes, set[str]] | None = None,
    same_layers: bool = True,
    layer: int = -1,
) -> list[str]:
    """Return how a layer of `image` in lcfs differs from the same layer in vfs.

    `layer` indexes the image's layers, base first, and defaults to the
    top one. Every layer is a full tree in both drivers, so it also shows
    the content of the layers below it. With `same_layers` both daemons must
    hold the image with the same layer chain; without it the images may
    differ (commits made in each daemon). `ignore` adds fields not
    compared, by path, to the root directory's mtime.
    """
    chains = docker.image_chain_ids(image)
    vfs_chains = vfs_docker.image_chain_ids(image)
    if same_layers:
        assert vfs_chains == chains, image
    lcfs_id = docker.layer_cache_id(chains[layer])
    vfs_id = vfs_docker.layer_cache_id(vfs_chains[layer])
    vfs_dir = vfs_docker.data_root / "vfs" / "dir" / vfs_id
    lcfs_dir = lcfs.call("GraphDriver.Get", {"ID": lcfs_id})["Dir"]
    try:
        return trees.differences(
            trees.snapshot(vfs_dir),
            trees.snapshot(lcfs_dir),
            ignore={**ROOT_MTIME, **(ignore or {})},
        )
    finally:
        lcfs.call("GraphDriver.Put", {"ID": lcfs_id})
