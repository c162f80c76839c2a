"""Layer tars and image archives that the benchmarks import, built once and cached.

Every input is a tree or tar built on this machine: the busybox-static tree
and the Debian minbase tar that tests/rootfs.py caches, plus layer tars
generated here (a large file, many small files, application layers). The
tars and the `docker load` archives made from them are written under the
bench cache (.cache/bench, or $LCFS_BENCH_CACHE) and renamed into place
when complete, so an interrupted run never leaves a partial input behind.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import tarfile
from collections.abc import Callable
from pathlib import Path

import rootfs

from .common import MIB, cache_dir

log = logging.getLogger(__name__)

MTIME = 1_700_000_000
# Bump when a generator changes what it writes, so stale cached tars are rebuilt.
FORMAT = 1


class _RandomReader(io.RawIOBase):
    """A readable stream of ``size`` pseudo-random bytes, 1 MiB of fresh urandom at a time."""

    def __init__(self, size: int):
        self.remaining = size

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self.remaining <= 0:
            return b""
        if size < 0 or size > MIB:
            size = MIB
        size = min(size, self.remaining)
        self.remaining -= size
        return os.urandom(size)


def _directory(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    info.mtime = MTIME
    return info


def _file(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = MTIME
    return info


def _cached(name: str, build: Callable[[Path], None]) -> Path:
    path = cache_dir() / f"{name}-v{FORMAT}.tar"
    if path.exists():
        return path
    partial = path.with_name(path.name + ".partial")
    log.info("building %s", path)
    build(partial)
    partial.rename(path)
    return path


def big_file_tar(size: int, name: str = "big") -> Path:
    """Return a layer tar holding one file ``/NAME`` of ``size`` random bytes."""

    def build(out: Path) -> None:
        with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as archive:
            archive.addfile(_file(name, size), _RandomReader(size))

    return _cached(f"layer-{name}-{size}", build)


def many_files_tar(count: int, per_dir: int = 1000, size: int = 64) -> Path:
    """Return a layer tar of ``count`` files of ``size`` bytes under /data/dNNN/."""

    def build(out: Path) -> None:
        rng = random.Random(count)
        with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as archive:
            archive.addfile(_directory("data"))
            for index in range(count):
                directory = f"data/d{index // per_dir:03d}"
                if index % per_dir == 0:
                    archive.addfile(_directory(directory))
                data = rng.randbytes(size)
                archive.addfile(
                    _file(f"{directory}/f{index % per_dir}", size), io.BytesIO(data)
                )

    return _cached(f"layer-many-{count}", build)


def app_layer_tar(index: int, files: int, file_size: int, blob_size: int) -> Path:
    """Return an application layer: ``files`` small files and one blob under /opt/appN."""

    def build(out: Path) -> None:
        rng = random.Random(index)
        with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as archive:
            archive.addfile(_directory("opt"))
            archive.addfile(_directory(f"opt/app{index}"))
            archive.addfile(_directory(f"opt/app{index}/lib"))
            for number in range(files):
                data = rng.randbytes(file_size)
                archive.addfile(
                    _file(f"opt/app{index}/lib/m{number}.py", file_size),
                    io.BytesIO(data),
                )
            archive.addfile(
                _file(f"opt/app{index}/blob", blob_size), _RandomReader(blob_size)
            )

    return _cached(f"layer-app{index}-{files}-{file_size}-{blob_size}", build)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MIB):
            digest.update(chunk)
    return digest.hexdigest()


def docker_archive(name: str, tag: str, layers: list[Path], cmd: list[str]) -> Path:
    """Return a `docker load` archive of one image made of the layer tars ``layers``.

    The layout is the one `docker save` of dockerd 20.10 writes: a manifest,
    a config whose rootfs.diff_ids are the layer tars' sha256 digests, and
    one ``<digest>/layer.tar`` per layer, base first.
    """

    def build(out: Path) -> None:
        diff_ids = [_sha256_file(layer) for layer in layers]
        config = {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": cmd, "Env": [f"PATH={rootfs_path()}"]},
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{d}" for d in diff_ids]},
            "history": [{"created_by": f"layer {i}"} for i in range(len(layers))],
        }
        config_bytes = json.dumps(config, sort_keys=True).encode()
        config_name = f"{hashlib.sha256(config_bytes).hexdigest()}.json"
        layer_names = [f"{digest}/layer.tar" for digest in diff_ids]
        manifest = [
            {
                "Config": config_name,
                "RepoTags": [f"{tag}:latest"],
                "Layers": layer_names,
            }
        ]
        with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as archive:
            for member_name, data in (
                (config_name, config_bytes),
                ("manifest.json", json.dumps(manifest).encode()),
            ):
                info = _file(member_name, len(data))
                archive.addfile(info, io.BytesIO(data))
            for member_name, layer in zip(layer_names, layers, strict=True):
                archive.add(str(layer), arcname=member_name)

    return _cached(f"image-{name}", build)


def oci_archive(name: str, layers: list[Path], base_name: str) -> tuple[Path, str]:
    """Return an OCI image archive of ``layers`` for `ctr images import`, and its reference.

    The index names the manifest "latest", so `ctr images import --base-name
    BASE` creates BASE:latest.
    """
    reference = f"{base_name}:latest"

    def build(out: Path) -> None:
        blobs: list[tuple[str, Path | bytes]] = []

        def blob(source: Path | bytes, media_type: str) -> dict:
            if isinstance(source, Path):
                digest, size = _sha256_file(source), source.stat().st_size
            else:
                digest, size = hashlib.sha256(source).hexdigest(), len(source)
            blobs.append((digest, source))
            return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": size}

        layer_descriptors = [
            blob(layer, "application/vnd.oci.image.layer.v1.tar") for layer in layers
        ]
        config = {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"], "Env": [f"PATH={rootfs_path()}"]},
            "rootfs": {
                "type": "layers",
                "diff_ids": [descriptor["digest"] for descriptor in layer_descriptors],
            },
        }
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": blob(
                json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json"
            ),
            "layers": layer_descriptors,
        }
        manifest_descriptor = blob(
            json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json"
        )
        manifest_descriptor["annotations"] = {
            "org.opencontainers.image.ref.name": "latest"
        }
        index = {"schemaVersion": 2, "manifests": [manifest_descriptor]}
        with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as archive:
            small = {
                "oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
                "index.json": json.dumps(index).encode(),
            }
            for member_name, data in small.items():
                archive.addfile(_file(member_name, len(data)), io.BytesIO(data))
            archive.addfile(_directory("blobs"))
            archive.addfile(_directory("blobs/sha256"))
            for digest, source in blobs:
                member_name = f"blobs/sha256/{digest}"
                if isinstance(source, Path):
                    archive.add(str(source), arcname=member_name)
                else:
                    archive.addfile(_file(member_name, len(source)), io.BytesIO(source))

    return _cached(f"oci-{name}", build), reference


def rootfs_path() -> str:
    """Return the PATH that the images' configs set."""
    return "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def minbase_tar() -> Path:
    """Return the cached Debian bookworm minbase tar (built by debootstrap on first use)."""
    return rootfs.minbase_tar()


def busybox_tar() -> Path:
    """Return the cached busybox-static root tar."""
    return rootfs.busybox_tar()


def build_context(directory: Path, steps: int, files_per_copy: int) -> Path:
    """Write a classic-build context: a Dockerfile of ``steps`` RUN and COPY steps.

    Steps alternate: odd steps RUN a shell command that writes files and a
    directory, even steps COPY a directory of ``files_per_copy`` 4 KiB files
    from the context. The base image is bench/busybox.
    """
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(steps)
    lines = ["FROM bench/busybox"]
    for step in range(1, steps + 1):
        if step % 2:
            lines.append(
                f"RUN mkdir -p /work/run{step} && echo step {step} > /work/run{step}/out "
                f"&& cp /bin/busybox /work/run{step}/tool && rm -f /work/run{step - 2}/tool"
            )
        else:
            source = directory / f"copy{step}"
            source.mkdir(exist_ok=True)
            for number in range(files_per_copy):
                (source / f"file{number}").write_bytes(rng.randbytes(4096))
            lines.append(f"COPY copy{step} /work/copy{step}")
    (directory / "Dockerfile").write_text("\n".join(lines) + "\n")
    return directory
