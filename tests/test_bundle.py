"""The managed plugin's config.json, checked without building the bundle."""

from lcfs import bundle


def test_plugin_skips_orphan_report():
    # The parent of the plugin's driver home is its propagated mount, not
    # Docker's data root, so the orphan report could only warn.
    entrypoint = bundle.plugin_config()["entrypoint"]
    assert "--docker-root" in entrypoint
    assert entrypoint[entrypoint.index("--docker-root") + 1] == "none"
