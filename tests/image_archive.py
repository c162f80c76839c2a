"""Build image archives in the layout that `docker load` reads.

The archive is the one `docker save` of dockerd 20.10 writes: a
manifest.json naming the image config and one `<id>/layer.tar` per layer,
base first, and a config whose rootfs.diff_ids are the sha256 digests of
the uncompressed layer tars. dockerd checks each layer against its diff
id while it loads, so a test can hand it layer tars written entry by entry,
including arrangements Docker's own tools never produce.
"""

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class LayerTar:
    """An uncompressed layer tar written entry by entry."""

    format: int = tarfile.PAX_FORMAT
    buffer: io.BytesIO = field(default_factory=io.BytesIO)

    def __post_init__(self) -> None:
        self._archive = tarfile.open(
            fileobj=self.buffer,
            mode="w",
            format=self.format,
            encoding="utf-8",
            errors="surrogateescape",
        )

    def add(
        self,
        name: str,
        kind: bytes = tarfile.REGTYPE,
        data: bytes = b"",
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
        mtime: int = 1_600_000_000,
        linkname: str = "",
        device: tuple[int, int] = (0, 0),
        xattrs: dict[str, bytes] | None = None,
    ) -> "LayerTar":
        """Append one entry; `data` is used for regular files only."""
        member = tarfile.TarInfo(name)
        member.type = kind
        member.mode = mode
        member.uid = uid
        member.gid = gid
        member.mtime = mtime
        member.linkname = linkname
        member.devmajor, member.devminor = device
        for key, value in (xattrs or {}).items():
            # PAX values are text; surrogateescape carries arbitrary bytes.
            member.pax_headers[f"SCHILY.xattr.{key}"] = value.decode(
                "utf-8", "surrogateescape"
            )
        if kind == tarfile.REGTYPE:
            member.size = len(data)
            self._archive.addfile(member, io.BytesIO(data))
        else:
            self._archive.addfile(member)
        return self

    def add_dir(self, name: str, mode: int = 0o755, **attributes) -> "LayerTar":
        """Append a directory entry."""
        return self.add(name, tarfile.DIRTYPE, mode=mode, **attributes)

    def whiteout(self, path: str) -> "LayerTar":
        """Append a whiteout that deletes `path` from the layers below."""
        parent, _, name = path.rpartition("/")
        prefix = f"{parent}/" if parent else ""
        return self.add(f"{prefix}.wh.{name}", mode=0o600)

    def opaque(self, directory: str) -> "LayerTar":
        """Append the marker that hides everything below `directory` in lower layers."""
        return self.add(f"{directory}/.wh..wh..opq", mode=0o600)

    def finish(self) -> bytes:
        """Close the tar and return its bytes."""
        self._archive.close()
        return self.buffer.getvalue()


def write_image_archive(path: Path, tag: str, layers: list[bytes]) -> list[str]:
    """Write a `docker load` archive of one image made of `layers`, base first.

    Returns the layer diff ids ("sha256:<hex>"), base first.
    """
    diff_ids = [f"sha256:{hashlib.sha256(layer).hexdigest()}" for layer in layers]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": f"layer {i}"} for i in range(len(layers))],
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_name = f"{hashlib.sha256(config_bytes).hexdigest()}.json"
    layer_names = [
        f"{diff_id.removeprefix('sha256:')}/layer.tar" for diff_id in diff_ids
    ]
    manifest = [{"Config": config_name, "RepoTags": [tag], "Layers": layer_names}]

    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        files = [
            (config_name, config_bytes),
            ("manifest.json", json.dumps(manifest).encode()),
        ]
        files += list(zip(layer_names, layers, strict=True))
        for name, data in files:
            member = tarfile.TarInfo(name)
            member.size = len(data)
            member.mode = 0o644
            archive.addfile(member, io.BytesIO(data))
    return diff_ids


def saved_layer_digests(archive_path: Path) -> list[str]:
    """Return the sha256 of each layer tar in a `docker save` archive, base first."""
    with tarfile.open(archive_path) as archive:
        manifest = json.load(archive.extractfile("manifest.json"))
        digests = []
        for name in manifest[0]["Layers"]:
            digest = hashlib.sha256()
            with archive.extractfile(name) as layer:
                while chunk := layer.read(1 << 20):
                    digest.update(chunk)
            digests.append(f"sha256:{digest.hexdigest()}")
    return digests
