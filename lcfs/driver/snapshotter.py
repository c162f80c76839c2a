"""containerd's Snapshots gRPC service (a proxy snapshotter), on grpc.aio.

containerd loads it as a ``[proxy_plugins.NAME]`` of type ``snapshot`` and
calls it on a unix socket. Every snapshot is a store layer (see
``lcfs.store.snapshots``), served as a directory of the daemon's FUSE mount;
Mounts returns a bind mount of that directory, which containerd's differ,
the runc shim and Docker perform in the host's mount namespace.

Errors are gRPC status codes that containerd's errdefs turns back into its
error kinds: NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION (a snapshot with
children, a commit of a view), INVALID_ARGUMENT (a bad key, label, parent,
filter or field mask). Every call that changes the store commits before it
replies, so a reply means durable.

Store calls block, so they run on the event loop's executor.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from lcfs.store import errors
from lcfs.store.snapshots import (
    KIND_ACTIVE,
    KIND_COMMITTED,
    KIND_VIEW,
    SnapshotInfo,
)

from .proto import mount_pb2, snapshots_pb2, snapshots_pb2_grpc
from .snapshotter_filters import FilterError, parse_filters

log = logging.getLogger(__name__)

KIND_VALUES = {
    KIND_VIEW: snapshots_pb2.VIEW,
    KIND_ACTIVE: snapshots_pb2.ACTIVE,
    KIND_COMMITTED: snapshots_pb2.COMMITTED,
}

# Infos sent per List reply message, as containerd 1.6's own snapshots
# service (services/snapshots/service.go) batches them.
LIST_BATCH = 100
# Maximum bytes of Infos in one List reply message, so that a reply fits the
# 4 MiB that gRPC clients receive by default (containerd 1.6's proxy client
# accepts 16 MiB). Labels can make 100 Infos far larger than either, and a
# reply over the limit fails the whole List, which containerd's garbage
# collection needs. An Info larger than this on its own goes alone.
LIST_BATCH_BYTES = 4 * 1024 * 1024 - 64 * 1024
# Bytes that each Info adds to a reply besides its own: a field tag and a length.
LIST_ENTRY_OVERHEAD = 6

# Seconds a stopping server lets calls in flight finish.
STOP_GRACE = 10.0


def _timestamp(ns: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def info_message(info: SnapshotInfo) -> snapshots_pb2.Info:
    """Return the protobuf Info of a snapshot."""
    return snapshots_pb2.Info(
        name=info.name,
        parent=info.parent,
        kind=KIND_VALUES[info.kind],
        created_at=_timestamp(info.created_ns),
        updated_at=_timestamp(info.updated_ns),
        labels=info.labels,
    )


def snapshot_fields(info: SnapshotInfo) -> Callable[[list[str]], tuple[str, bool]]:
    """Return the filter adaptor of a snapshot: kind, name, parent and labels.KEY."""

    def field(path) -> tuple[str, bool]:
        if not path:
            return "", False
        head = path[0]
        if head == "kind":
            return info.kind, True
        if head == "name":
            return info.name, True
        if head == "parent":
            return info.parent, True
        if head == "labels":
            if not info.labels:
                return "", False
            key = ".".join(path[1:])
            return (info.labels[key], True) if key in info.labels else ("", False)
        return "", False

    return field


def _status_code(error: errors.StoreError) -> grpc.StatusCode:
    if isinstance(error, errors.NotFound):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(error, errors.Exists):
        return grpc.StatusCode.ALREADY_EXISTS
    if isinstance(error, errors.Invalid):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, (errors.Busy, errors.ReadOnly)):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(error, errors.NoSpace):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return grpc.StatusCode.INTERNAL


def _request_snapshot(request) -> str:
    """Return the snapshot key or name a request carries, for logs ("" if none)."""
    key = getattr(request, "key", "") or getattr(request, "name", "")
    if not key and isinstance(request, snapshots_pb2.UpdateSnapshotRequest):
        key = request.info.name
    return key


def _rpc(name: str):
    """Wrap a unary handler: log it and turn store errors into gRPC status codes."""

    def decorate(method):
        @functools.wraps(method)
        async def wrapper(self, request, context: grpc.aio.ServicerContext):
            key = _request_snapshot(request)
            log.debug("%s %s", name, key or "-")
            try:
                return await method(self, request, context)
            except errors.StoreError as error:
                code = _status_code(error)
                message = str(error) or type(error).__name__
                if code == grpc.StatusCode.INTERNAL:
                    log.exception("%s of snapshot %s failed", name, key or "-")
                else:
                    log.info("%s of snapshot %s failed: %s", name, key or "-", message)
                await context.abort(code, message)

        return wrapper

    return decorate


class SnapshotService(snapshots_pb2_grpc.SnapshotsServicer):
    """The Snapshots calls, implemented on one store and its FUSE mount."""

    def __init__(self, store, mounts):
        self.store = store
        self.mounts = mounts

    async def _run(self, func: Callable, *args) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, functools.partial(func, *args))

    def _mounts(self, info: SnapshotInfo) -> list[mount_pb2.Mount]:
        root = self.mounts.mountpoint
        if root is None:
            raise errors.StoreError(f"snapshot {info.name}: the lcfs FUSE mount is not running")
        mode = "ro" if info.kind == KIND_VIEW else "rw"
        return [
            mount_pb2.Mount(
                type="bind",
                source=os.path.join(root, info.layer_id),
                options=["rbind", mode],
            )
        ]

    def _create(self, key: str, parent: str, kind: str, labels: dict) -> SnapshotInfo:
        info = self.store.create_snapshot(key, parent, kind, labels)
        self.store.commit()
        return info

    @_rpc("Prepare")
    async def Prepare(self, request, context):
        info = await self._run(self._create, request.key, request.parent, KIND_ACTIVE,
                               dict(request.labels))  # fmt: skip
        return snapshots_pb2.PrepareSnapshotResponse(mounts=self._mounts(info))

    @_rpc("View")
    async def View(self, request, context):
        info = await self._run(self._create, request.key, request.parent, KIND_VIEW,
                               dict(request.labels))  # fmt: skip
        return snapshots_pb2.ViewSnapshotResponse(mounts=self._mounts(info))

    @_rpc("Mounts")
    async def Mounts(self, request, context):
        info = await self._run(self.store.stat_snapshot, request.key)
        if info.kind == KIND_COMMITTED:
            raise errors.Busy(
                f"snapshot {request.key} is committed; only active and view "
                "snapshots have mounts"
            )
        return snapshots_pb2.MountsResponse(mounts=self._mounts(info))

    def _commit(self, name: str, key: str, labels: dict) -> SnapshotInfo:
        info = self.store.commit_snapshot(name, key, labels)
        self.store.commit()
        return info

    @_rpc("Commit")
    async def Commit(self, request, context):
        await self._run(self._commit, request.name, request.key, dict(request.labels))
        return empty_pb2.Empty()

    def _remove(self, key: str) -> None:
        info = self.store.remove_snapshot(key)
        self.mounts.notify_layer_removed(info.layer_id)

    @_rpc("Remove")
    async def Remove(self, request, context):
        await self._run(self._remove, request.key)
        return empty_pb2.Empty()

    @_rpc("Stat")
    async def Stat(self, request, context):
        info = await self._run(self.store.stat_snapshot, request.key)
        return snapshots_pb2.StatSnapshotResponse(info=info_message(info))

    def _update(self, name: str, labels: dict, paths: list[str]) -> SnapshotInfo:
        info = self.store.update_snapshot(name, labels, paths)
        self.store.commit()
        return info

    @_rpc("Update")
    async def Update(self, request, context):
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        info = await self._run(self._update, request.info.name, dict(request.info.labels),
                               paths)  # fmt: skip
        return snapshots_pb2.UpdateSnapshotResponse(info=info_message(info))

    @_rpc("Usage")
    async def Usage(self, request, context):
        size, inodes = await self._run(self.store.snapshot_usage, request.key)
        return snapshots_pb2.UsageResponse(size=size, inodes=inodes)

    def _cleanup(self) -> None:
        dropped, removed = self.store.reconcile_snapshots()
        self.store.commit()
        for layer_id in removed:
            self.mounts.notify_layer_removed(layer_id)
        if dropped or removed:
            log.info("Cleanup dropped %d snapshot records and removed %d layers",
                     len(dropped), len(removed))  # fmt: skip

    @_rpc("Cleanup")
    async def Cleanup(self, request, context):
        await self._run(self._cleanup)
        return empty_pb2.Empty()

    async def List(self, request, context):
        filters = list(request.filters)
        log.debug("List with filters %s", filters or "none")
        try:
            matcher = parse_filters(filters)
        except FilterError as error:
            log.info("List failed: %s", error)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        try:
            infos = await self._run(self.store.list_snapshots)
        except errors.StoreError as error:
            code = _status_code(error)
            message = str(error) or type(error).__name__
            log.error("List of snapshots failed: %s", message)
            await context.abort(code, message)
        batch = []
        batch_bytes = 0
        for info in infos:
            if not matcher.matches(snapshot_fields(info)):
                continue
            message = info_message(info)
            size = message.ByteSize() + LIST_ENTRY_OVERHEAD
            if batch and (len(batch) >= LIST_BATCH or batch_bytes + size > LIST_BATCH_BYTES):
                yield snapshots_pb2.ListSnapshotsResponse(info=batch)
                batch = []
                batch_bytes = 0
            batch.append(message)
            batch_bytes += size
        if batch:
            yield snapshots_pb2.ListSnapshotsResponse(info=batch)


class SnapshotterServer:
    """The gRPC server of the Snapshots service on a unix socket."""

    def __init__(self, store, mounts, socket_path: str):
        self.socket_path = os.path.abspath(socket_path)
        self.service = SnapshotService(store, mounts)
        self._server: grpc.aio.Server | None = None
        self._socket_inode: int | None = None

    async def start(self) -> None:
        """Listen on the socket, created with mode 0600 before anyone can connect.

        gRPC binds the socket itself, so it binds a temporary name that is
        restricted and then renamed into place.
        """
        directory = os.path.dirname(self.socket_path)
        os.makedirs(directory, mode=0o755, exist_ok=True)
        temporary = f"{self.socket_path}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        server = grpc.aio.server()
        snapshots_pb2_grpc.add_SnapshotsServicer_to_server(self.service, server)
        if server.add_insecure_port(f"unix:{temporary}") == 0:
            raise OSError(f"cannot listen on {temporary}")
        await server.start()
        self._server = server
        try:
            os.chmod(temporary, 0o600)
            os.rename(temporary, self.socket_path)
        except BaseException:
            await self.stop()
            raise
        self._socket_inode = os.lstat(self.socket_path).st_ino
        log.info("containerd snapshotter listening on %s", self.socket_path)

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """Stop accepting calls, let those in flight finish for ``grace`` s, remove the socket."""
        server, self._server = self._server, None
        if server is None:
            return
        await server.stop(grace)
        try:
            # Another daemon may have taken over the path since.
            if os.lstat(self.socket_path).st_ino == self._socket_inode:
                os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        log.info("containerd snapshotter on %s stopped", self.socket_path)
