"""The managed plugin's config.json, checked without building the bundle."""

from lcfs import bundle


def test_plugin_skips_orphan_report():
    # The parent of the plugin's driver home is its propagated mount, not
    # Docker's data root, so the orphan report could only warn.
    entrypoint = bundle.plugin_config()["entrypoint"]
    assert "--docker-root" in entrypoint
    assert entrypoint[entrypoint.index("--docker-root") + 1] == "none"


def test_plugin_writes_read_ahead():
    # The daemon sets its mount's read-ahead in /sys/class/bdi/MAJOR:MINOR,
    # a link into /sys/devices/virtual/bdi, and a plugin's /sys is read-only.
    mounts = {mount["destination"]: mount for mount in bundle.plugin_config()["mounts"]}
    bdi = mounts.get("/sys/devices/virtual/bdi")
    assert bdi is not None, sorted(mounts)
    assert bdi["source"] == "/sys/devices/virtual/bdi"
    assert bdi["type"] == "bind"
    assert "rw" in bdi["options"]
