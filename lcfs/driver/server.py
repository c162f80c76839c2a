"""Docker's graphdriver plugin protocol, served by aiohttp on a unix socket.

Every call is ``POST /NAME`` with a JSON body and no Content-Type, and
fields with empty values are left out. A failure is ``{"Err": "..."}`` with
HTTP status 500, because dockerd's plugin client reads Err from the body of
any non-200 reply. A non-200 status is also the only way to report a failed
Diff, whose successful reply is a raw tar stream. The message names the
layer id, because Docker shows it to the user.

Store calls block, so they run on the executor or, for the tar streams of
Diff and ApplyDiff, on a dedicated thread per request. Every call that
changes the store commits before it replies, so the reply means durable.
"""

import asyncio
import collections
import contextlib
import functools
import json
import logging
import os
import reprlib
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from aiohttp import web

from lcfs import control
from lcfs.store import errors
from lcfs.store.snapshots import SNAPSHOT_LAYER_PREFIX, is_snapshot_layer

from . import streams
from .layer_calls import CHILD_CREATION, IMPORT, READ, REMOVAL, LayerCalls
from .mounts import MountError, MountManager

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/vnd.docker.plugins.v1.2+json"

HOME_KEY = "driver.home"
OPTS_KEY = "driver.opts"

# Most bytes read from an ApplyDiff request body at a time. Each chunk costs
# one hand-off between the event loop and the applying thread. With 1 MiB
# instead of 64 KiB, a direct ApplyDiff of a 210 MB Debian minbase tar took
# 2.2 s instead of 2.9 s (2 CPUs, python -m bench's import profile showed
# the hand-offs as the event loop's main cost). At most
# streams.MAX_PENDING_CHUNKS chunks wait in memory.
APPLY_CHUNK_SIZE = 1 << 20

# Seconds a Remove waits for an import into the same layer to end. dockerd
# sends Remove as soon as its ApplyDiff fails, for example when its request
# body broke off, while the daemon may still be rolling that import back.
# dockerd does not retry the Remove, so failing it at once leaks the layer.
REMOVE_WAIT = 10.0

# Maximum length of a layer id in bytes, because it is a directory name
# under the mount point.
MAX_ID_BYTES = 255

# Maximum size in bytes of a JSON request body. A plugin call carries a few
# ids and options, so a larger body is malformed. ApplyDiff streams its tar
# body, which has no limit.
MAX_JSON_BODY = 1 << 20

# Calls that act on no layer. Every other call must name one in ID.
CALLS_WITHOUT_LAYER = frozenset(
    {
        "Plugin.Activate",
        "GraphDriver.Init",
        "GraphDriver.Status",
        "GraphDriver.Cleanup",
        "GraphDriver.Capabilities",
    }
)
CREATE_CALLS = frozenset({"GraphDriver.Create", "GraphDriver.CreateReadWrite"})

class RequestError(Exception):
    """A request that is malformed or needs a feature lcfs does not support."""


class ClientGone(Exception):
    """The client closed the connection before it sent the whole request body."""


Handler = Callable[[dict], Awaitable[dict]]
# A route's handler: the request and its arguments, already checked by _serve.
RouteHandler = Callable[[web.Request, dict], Awaitable[web.StreamResponse]]


def _error_reply(message: str) -> web.Response:
    return web.json_response({"Err": message}, status=500, content_type=CONTENT_TYPE)


def _describe(error: Exception, layer_id: str) -> str:
    message = str(error) or type(error).__name__
    if layer_id and layer_id not in message:
        message = f"layer {layer_id}: {message}"
    return message


def _for_layer(layer_id: str) -> str:
    return f" for layer {layer_id!r}" if layer_id else ""


def _printable(text: str) -> str:
    """Return ``text`` with control characters and lone surrogates escaped.

    An error message may contain a layer id from the request, and escaping
    keeps an id with a newline or NUL from breaking the log line.
    """
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _check_utf8(value: str, label: str) -> None:
    """Raise RequestError if ``value`` has a lone surrogate, which JSON's \\u escapes allow."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        surrogate = value[error.start : error.end]
        raise RequestError(
            f"invalid {label} {value!r}: it contains the lone surrogate "
            f"{surrogate!r}, which is not valid UTF-8"
        ) from None


def _string_field(args: dict, name: str, label: str = "") -> str:
    """Return the string field ``name`` of ``args``, or "" if it is missing.

    ``label`` names the value in the error for a string that is not UTF-8.
    """
    value = args.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RequestError(f"invalid request: field {name} must be a string")
    _check_utf8(value, label or f"field {name}")
    return value


def _check_layer_request(name: str, layer_id: str) -> None:
    """Raise unless the call ``name`` may act on ``layer_id``.

    Layers whose id has the snapshot prefix belong to containerd's
    snapshotter, so every call but Create and CreateReadWrite reports them as
    not found, and those two reject the ids as invalid (see validate_layer_id).
    """
    if name in CALLS_WITHOUT_LAYER:
        return
    if not layer_id:
        # dockerd 20.10 retries a call with what is left of its body, so a
        # call cut off by a daemon restart arrives without its ID.
        call = name.rpartition(".")[2]
        raise RequestError(f"invalid {call} request: the layer ID is missing")
    if is_snapshot_layer(layer_id) and name not in CREATE_CALLS:
        raise errors.LayerNotFound(f"layer {layer_id} not found")


def _json_route(handler: Handler) -> RouteHandler:
    """Wrap a handler that returns a dict into one that replies with it as JSON."""

    async def route(request: web.Request, args: dict) -> web.Response:
        return web.json_response(await handler(args), content_type=CONTENT_TYPE)

    return route


def validate_layer_id(layer_id: str) -> None:
    """Raise RequestError unless ``layer_id`` can name a directory under the mount."""
    if not layer_id:
        raise RequestError("invalid request: the layer ID is missing")
    _check_utf8(layer_id, "layer id")
    encoded = layer_id.encode("utf-8")
    if (
        layer_id in (".", "..")
        or "/" in layer_id
        or "\0" in layer_id
        or len(encoded) > MAX_ID_BYTES
    ):
        raise RequestError(
            f"invalid layer id {layer_id!r}: it must be a file name of 1 to "
            f"{MAX_ID_BYTES} bytes without '/'"
        )
    if is_snapshot_layer(layer_id):
        raise RequestError(
            f"invalid layer id {layer_id!r}: the prefix {SNAPSHOT_LAYER_PREFIX!r} "
            "is reserved for containerd snapshots"
        )


class GraphDriverPlugin:
    """The graphdriver calls, implemented on one store and one mount manager."""

    def __init__(self, store, device: str, mounts: MountManager):
        self.store = store
        self.device = device
        self.mounts = mounts
        self.workers = streams.WorkerThreads()
        self.layer_calls = LayerCalls()
        # Remove calls waiting for the next batch, and the task that runs
        # the batches (see remove).
        self._removals: list[tuple[str, asyncio.Future]] = []
        # Gets without their Put so far, by layer id.
        self._gets: collections.Counter[str] = collections.Counter()
        # Layers whose Diff was rejected for lost changes while a Get was open.
        self._rejected_diffs: set[str] = set()
        self._removing: asyncio.Task | None = None

    def make_app(self) -> web.Application:
        """Return the aiohttp application that routes every plugin call."""
        app = web.Application(client_max_size=MAX_JSON_BODY)
        json_calls: dict[str, Handler] = {
            "Plugin.Activate": self.activate,
            "GraphDriver.Init": self.init,
            "GraphDriver.Create": self.create,
            "GraphDriver.CreateReadWrite": self.create_read_write,
            "GraphDriver.Remove": self.remove,
            "GraphDriver.Get": self.get,
            "GraphDriver.Put": self.put,
            "GraphDriver.Exists": self.exists,
            "GraphDriver.Status": self.status,
            "GraphDriver.GetMetadata": self.get_metadata,
            "GraphDriver.Cleanup": self.cleanup,
            "GraphDriver.Changes": self.changes,
            "GraphDriver.DiffSize": self.diff_size,
            "GraphDriver.Capabilities": self.capabilities,
        }
        routes: dict[str, RouteHandler] = {
            name: _json_route(handler) for name, handler in json_calls.items()
        }
        routes["GraphDriver.Diff"] = self.diff
        routes["GraphDriver.ApplyDiff"] = self.apply_diff
        for name, route in routes.items():
            app.router.add_post(f"/{name}", functools.partial(self._serve, name, route))
        app.router.add_post(control.STATS_PATH, self.fuse_stats)
        app.router.add_post(control.LAYERS_PATH, self.layer_list)
        # aiohttp gives a request with a known path but another method to
        # the first route that matches both, which is this one.
        known_calls = frozenset(routes) | {
            path.lstrip("/") for path in (control.STATS_PATH, control.LAYERS_PATH)
        }
        app.router.add_route(
            "*", "/{call:.*}", functools.partial(self.unknown_call, known_calls)
        )
        return app

    async def _run(self, func: Callable, *args) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, functools.partial(func, *args))

    async def _run_short(self, func: Callable, *args) -> Any:
        """Run a store call that reads only memory, on the event loop when the store is free.

        Handing it to a worker thread and back costs two thread wake-ups,
        which made a Get take 0.30 ms on the socket instead of 0.22 ms.
        When another thread has the store lock (an ApplyDiff, a commit),
        the call waits in a worker instead, so the loop does not wait for
        the lock.
        """
        lock = self.store.lock
        if not lock.acquire(blocking=False):
            return await self._run(func, *args)
        try:
            return func(*args)
        finally:
            lock.release()

    async def _serve(
        self, name: str, route: RouteHandler, request: web.Request
    ) -> web.StreamResponse:
        """Read a call's arguments, check the layer it names, and run its route.

        Every call goes through here, so no layer call reaches the store
        without a layer id or with the id of a containerd snapshot's layer.
        """
        layer_id = ""
        try:
            args = await self._read_args(name, request)
            layer_id = _string_field(args, "ID", "layer id")
            log.debug("%s%s", name, _for_layer(layer_id))
            try:
                _check_layer_request(name, layer_id)
            except errors.LayerNotFound:
                if name != "GraphDriver.Exists":
                    raise
                # Exists reports a missing layer in its reply, not as an error.
                return web.json_response({"Exists": False}, content_type=CONTENT_TYPE)
            return await route(request, args)
        except ClientGone as error:
            log.warning(
                "%s failed%s: the client went away before the end of the request (%s)",
                name,
                _for_layer(layer_id),
                error,
            )
            # The reply goes nowhere, but returning one keeps aiohttp from
            # logging the lost connection with a traceback.
            return _error_reply(f"the client went away: {error}")
        except (errors.StoreError, RequestError, MountError) as error:
            message = _describe(error, layer_id)
            log.warning(
                "%s failed%s: %s", name, _for_layer(layer_id), _printable(message)
            )
            return _error_reply(message)
        except Exception as error:
            log.exception("%s failed%s", name, _for_layer(layer_id))
            return _error_reply(f"internal error: {_describe(error, layer_id)}")

    @staticmethod
    async def _read_args(name: str, request: web.Request) -> dict:
        if name == "GraphDriver.ApplyDiff":
            # The body is the layer tar, so the arguments are in the query.
            return {
                "ID": request.query.get("id"),
                "Parent": request.query.get("parent"),
            }
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise RequestError(
                "invalid request: the request body is too large; the limit is "
                f"{MAX_JSON_BODY} bytes"
            ) from None
        except ConnectionError as error:
            raise ClientGone(str(error) or type(error).__name__) from error
        if not body.strip():
            return {}
        try:
            args = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RequestError(f"invalid request: body is not JSON: {error}") from None
        except RecursionError:
            raise RequestError(
                "invalid request: the JSON body is nested too deeply to decode; "
                "the arguments of a plugin call are one flat JSON object"
            ) from None
        if not isinstance(args, dict):
            raise RequestError("invalid request: body is not a JSON object")
        return args

    # -- plugin and driver set-up ------------------------------------------

    async def activate(self, args: dict) -> dict:
        return {"Implements": ["GraphDriver"]}

    async def init(self, args: dict) -> dict:
        home = _string_field(args, "Home", "Home")
        if not home or not os.path.isabs(home):
            raise RequestError(f"invalid Home {home!r}: it must be an absolute path")
        if "\0" in home:
            raise RequestError(
                f"invalid Home {home!r}: it contains a NUL byte; pass a path without one"
            )
        opts = args.get("Opts") or []
        if not isinstance(opts, list):
            raise RequestError("invalid request: field Opts must be a list")
        if opts:
            raise RequestError(
                f"unknown storage options {', '.join(map(str, opts))}: "
                "lcfs takes none; remove the --storage-opt flags"
            )
        if args.get("UIDMaps") or args.get("GIDMaps"):
            raise RequestError(
                "user namespace remapping is not supported by lcfs; "
                "start dockerd without --userns-remap"
            )
        # Mounted before it is recorded, because every start mounts the
        # recorded Home and fails if it cannot.
        await self._run(self.mounts.init, home)
        await self._run(self._record_init, home, opts)
        log.info("initialised by dockerd: Home %s", home)
        return {}

    def _record_init(self, home: str, opts: list) -> None:
        self.store.set_meta(HOME_KEY, home.encode())
        self.store.set_meta(OPTS_KEY, json.dumps(opts).encode())
        self.store.commit()

    def stored_home(self) -> str | None:
        """Return the Home that the last Init recorded, or None."""
        value = self.store.get_meta(HOME_KEY)
        return value.decode() if value else None

    async def capabilities(self, args: dict) -> dict:
        exact = bool(getattr(self.store, "reproduces_exact_diffs", False))
        return {"Capabilities": {"ReproducesExactDiffs": exact}}

    async def status(self, args: dict) -> dict:
        return {"Status": await self._run(self._status_pairs)}

    def _status_pairs(self) -> list[list[str]]:
        # Status has no error reply in dockerd's plugin client, so a failing
        # part is reported as a pair rather than failing the whole call.
        pairs = [
            ["Device", self.device],
            ["Mount Path", self.mounts.mountpoint or "not mounted"],
        ]
        try:
            home = self.stored_home()
            pairs.append(["Docker Home", home or "not initialised"])
            stat = self.store.statfs()
            block_size = stat.block_size
            pairs += [
                ["Block Size", str(block_size)],
                [
                    "Data Space Used (bytes)",
                    str((stat.total_blocks - stat.free_blocks) * block_size),
                ],
                ["Data Space Total (bytes)", str(stat.total_blocks * block_size)],
                ["Data Space Available (bytes)", str(stat.free_blocks * block_size)],
            ]
            metadata_used, metadata_total = self.store.metadata_usage()
            pairs += [
                ["Metadata Space Used (bytes)", str(metadata_used)],
                ["Metadata Space Total (bytes)", str(metadata_total)],
                ["Metadata Space Available (bytes)", str(metadata_total - metadata_used)],
                ["Inodes Used", str(stat.files - stat.free_files)],
                ["Layers", str(len(self.store.list_layers()))],
            ]
        except Exception as error:
            log.exception("Status could not read the store on %s", self.device)
            pairs.append(["Error", str(error)])
        return pairs

    async def cleanup(self, args: dict) -> dict:
        await self._run(self.store.commit)
        await self._run(self.mounts.cleanup)
        return {}

    # -- layers --------------------------------------------------------------

    async def create_read_write(self, args: dict) -> dict:
        """Create a container's layer, with a change mark (``Store.mark_layer``)."""
        return await self.create(args, writable=True)

    async def create(self, args: dict, writable: bool = False) -> dict:
        layer_id = _string_field(args, "ID")
        parent_id = _string_field(args, "Parent", "parent layer id") or None
        validate_layer_id(layer_id)
        if parent_id and is_snapshot_layer(parent_id):
            raise RequestError(
                f"invalid parent layer {parent_id} of layer {layer_id}: the prefix "
                f"{SNAPSHOT_LAYER_PREFIX!r} is reserved for containerd snapshots, "
                "so name a layer that dockerd created"
            )
        storage_opt = args.get("StorageOpt") or {}
        if not isinstance(storage_opt, dict):
            raise RequestError(
                f"invalid StorageOpt {reprlib.repr(storage_opt)} for layer "
                f"{layer_id}: it must be a JSON object of option names and values"
            )
        if storage_opt:
            names = ", ".join(sorted(map(str, storage_opt)))
            raise RequestError(
                f"layer {layer_id}: storage options {names} are not supported by lcfs"
            )
        await self._run(self._create_layer, layer_id, parent_id, writable)
        log.debug("created layer %r with parent %r", layer_id, parent_id)
        return {}

    def _create_layer(self, layer_id: str, parent_id: str | None, writable: bool = False) -> None:
        if parent_id is None:
            marked = contextlib.nullcontext()
        else:
            marked = self.layer_calls.running(parent_id, CHILD_CREATION)
        try:
            with marked:
                self.store.create_layer(layer_id, parent_id)
        except errors.LayerNotFound:
            # The new layer's own id cannot be missing, so the parent is.
            raise errors.LayerNotFound(
                f"parent layer {parent_id} of layer {layer_id} not found; "
                "create the parent layer first"
            ) from None
        if writable:
            self.store.mark_layer(layer_id)
        self.store.commit()

    async def remove(self, args: dict) -> dict:
        layer_id = _string_field(args, "ID")
        # `docker rm` of many containers sends their Removes at once. Those
        # that arrive while a batch runs form the next batch, which shares
        # one durable commit instead of syncing the device for each layer.
        removed = asyncio.get_running_loop().create_future()
        self._removals.append((layer_id, removed))
        if self._removing is None or self._removing.done():
            self._removing = asyncio.create_task(self._run_removals())
        await removed
        # Gets still open on the removed layer must not count for a new layer
        # of the same id.
        self._gets.pop(layer_id, None)
        self._rejected_diffs.discard(layer_id)
        log.debug("removed layer %r", layer_id)
        return {}

    async def _run_removals(self) -> None:
        while self._removals:
            batch, self._removals = self._removals, []
            layer_ids = [layer_id for layer_id, _ in batch]
            try:
                outcomes = await self._run(self._remove_layers, layer_ids)
            except Exception as error:  # noqa: BLE001 (each caller's reply logs it)
                # A failure outside a single layer's removal, such as the
                # shared commit, fails every call of the batch.
                outcomes = [error] * len(batch)
            for (_, removed), outcome in zip(batch, outcomes):
                if removed.done():
                    continue
                if outcome is None:
                    removed.set_result(None)
                else:
                    removed.set_exception(outcome)

    def _remove_layers(self, layer_ids: list[str]) -> list[Exception | None]:
        """Remove layers with one commit; return each one's error or None."""
        outcomes: list[Exception | None] = []
        removed = []
        for layer_id in layer_ids:
            try:
                with self.layer_calls.running(layer_id, REMOVAL, wait=REMOVE_WAIT):
                    if self.store.was_removed(layer_id):
                        log.info(
                            "layer %r was already removed, by crash recovery or by a "
                            "Remove whose reply was lost", layer_id
                        )  # fmt: skip
                    else:
                        self.store.remove_layer(layer_id, commit=False)
                        removed.append(layer_id)
                outcomes.append(None)
            except Exception as error:  # noqa: BLE001 (the caller's reply logs it)
                outcomes.append(error)
        if removed:
            # In the same commit, so that a Remove retried after a crash
            # lost this reply succeeds.
            self.store.remember_removed(removed)
            self.store.commit()
            if len(removed) > 1:
                log.debug("committed the removal of %d layers at once", len(removed))
        for layer_id in removed:
            self.mounts.notify_layer_removed(layer_id)
        return outcomes

    async def get(self, args: dict) -> dict:
        layer_id = _string_field(args, "ID")
        await self._run_short(self.store.get_layer, layer_id)
        already_in_use = self._gets[layer_id] > 0
        self._gets[layer_id] += 1
        if not already_in_use:
            self._rejected_diffs.discard(layer_id)
        elif await self._run_short(self.store.lost_changes, layer_id) is not None:
            # docker commit sends Get right before Diff, so a Get alone does
            # not show that a container uses the layer's new state. A Get
            # while another is open (a running container) does.
            # NOTE: two commits of one stopped container at once also open
            # two Gets, so the second one's Diff is not rejected.
            await self._forget_lost_changes(layer_id)
        mountpoint = self.mounts.mountpoint
        if mountpoint is None:
            raise RequestError(
                f"layer {layer_id}: lcfs is not mounted; dockerd must call Init "
                "first, or start the daemon with --mountpoint"
            )
        return {"Dir": os.path.join(mountpoint, layer_id)}

    async def put(self, args: dict) -> dict:
        layer_id = _string_field(args, "ID")
        # A layer that no container uses needs no change mark. After a
        # restart a Put may come without a Get.
        opened = self._gets[layer_id] > 0
        self._gets[layer_id] -= 1
        if self._gets[layer_id] <= 0:
            del self._gets[layer_id]
            diff_rejected = layer_id in self._rejected_diffs
            self._rejected_diffs.discard(layer_id)
            if (
                opened
                and not diff_rejected
                and await self._run_short(self.store.lost_changes, layer_id) is not None
            ):
                if await self._run_short(self._used_through_mount, layer_id):
                    # A container started and stopped on the layer's new state.
                    await self._forget_lost_changes(layer_id)
                else:
                    # dockerd's start sends Get and Put for each container
                    # that was running, to learn its root path, and runs
                    # nothing on it.
                    log.info(
                        "layer %r: Put after a Get with no access to the layer "
                        "through the mount since the daemon started, so Diff of "
                        "it still fails until a container runs on it",
                        layer_id,
                    )
            await self._run_short(self.store.release_change_mark, layer_id)
        # Put makes the changes made through the mount durable. Most Puts
        # follow no change, so no worker needs to run a commit.
        if await self._run_short(self._changes_pending, layer_id):
            await self._run(self.store.commit)
        return {}

    async def _forget_lost_changes(self, layer_id: str) -> None:
        await self._run(self.store.forget_lost_changes, layer_id)
        log.info("layer %r is in use again after it lost changes to an "
                 "unclean stop; Diff of it works again", layer_id)  # fmt: skip

    def _used_through_mount(self, layer_id: str) -> bool:
        number = self.store.get_layer(layer_id).number
        return number in self.mounts.stats.layers_looked_up

    def _changes_pending(self, layer_id: str) -> bool:
        self.store.get_layer(layer_id)
        return self.store.dirty

    async def exists(self, args: dict) -> dict:
        layer_id = _string_field(args, "ID")
        try:
            found = await self._run_short(self.store.exists, layer_id)
        except Exception:
            log.exception("Exists could not look up layer %r", layer_id)
            found = False
        return {"Exists": bool(found)}

    async def get_metadata(self, args: dict) -> dict:
        layer_id = _string_field(args, "ID")
        layer = await self._run(self.store.get_layer, layer_id)
        metadata = {
            "Device": self.device,
            "Layer": str(layer.number),
            "Frozen": "true" if layer.frozen else "false",
        }
        if layer.parent_id:
            metadata["Parent"] = layer.parent_id
        return {"Metadata": metadata}

    # -- diffs ---------------------------------------------------------------

    def _check_parent(self, layer_id: str, parent_id: str, *, required: bool) -> None:
        """Raise RequestError unless ``parent_id`` is the layer's own parent.

        The store tracks changes against a layer's own parent only, so a diff
        against any other layer cannot be computed. With ``required`` false an
        empty ``parent_id`` passes.
        """
        layer = self.store.get_layer(layer_id)
        actual = layer.parent_id or ""
        if parent_id == actual or (not parent_id and not required):
            return
        raise RequestError(
            f"layer {layer_id} has parent {actual or '(none)'}, not "
            f"{parent_id or '(none)'}; lcfs computes diffs only against a "
            "layer's own parent"
        )

    async def changes(self, args: dict) -> dict:
        layer_id = _string_field(args, "ID")
        parent_id = _string_field(args, "Parent")
        changes = await self._run(self._changes, layer_id, parent_id)
        return {"Changes": [{"Path": path, "Kind": kind} for path, kind in changes]}

    def _changes(self, layer_id: str, parent_id: str) -> list[tuple[str, int]]:
        with self.layer_calls.running(layer_id, READ):
            self._check_parent(layer_id, parent_id, required=True)
            return self.store.changes(layer_id)

    async def diff_size(self, args: dict) -> dict:
        layer_id = _string_field(args, "ID")
        parent_id = _string_field(args, "Parent")
        size = await self._run(self._diff_size, layer_id, parent_id)
        return {"Size": size}

    def _diff_size(self, layer_id: str, parent_id: str) -> int:
        with self.layer_calls.running(layer_id, READ):
            self._check_parent(layer_id, parent_id, required=True)
            return self.store.diff_size(layer_id)

    def _check_changes_kept(self, layer_id: str) -> None:
        """Raise StoreError if the layer may have lost changes to an unclean stop.

        dockerd sends Diff to turn a container or build step into an image
        layer. A layer whose last changes were lost would make an image
        without them and report success, so Diff fails until a container
        uses the layer again: a Get while another Get is open, or a Put that
        closes the Gets without a rejected Diff between them, once the
        layer was used through the mount since the daemon started. Runs in
        a worker thread.
        """
        lost = self.store.lost_changes(layer_id)
        if lost is None:
            return
        self._rejected_diffs.add(layer_id)
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(lost / 1e9))
        raise errors.StoreError(
            f"layer {layer_id} may lack the changes made through the mount in the "
            "last second before the lcfs daemon ended without committing them "
            f"(found at its start at {when}), so it cannot become an image layer; "
            "run the build step or the container again (docker start clears this)"
        )

    async def diff(self, request: web.Request, args: dict) -> web.StreamResponse:
        """Stream the layer's changes against its parent as an uncompressed tar."""
        layer_id = _string_field(args, "ID")
        parent_id = _string_field(args, "Parent")

        def read_diff() -> Iterator[bytes]:
            # The layer stays marked as read until the stream ends or the
            # worker closes this generator.
            with self.layer_calls.running(layer_id, READ):
                self._check_parent(layer_id, parent_id, required=True)
                self._check_changes_kept(layer_id)
                yield from self.store.diff(layer_id)

        chunks = streams.iterate_in_thread(read_diff, self.workers, f"diff-{layer_id}")
        async with contextlib.aclosing(chunks):
            # An error before the first chunk goes to _serve, which replies
            # with it. Later ones come after the status line.
            first = await anext(chunks, b"")
            response = web.StreamResponse(headers={"Content-Type": "application/x-tar"})
            await response.prepare(request)
            sent = len(first)
            try:
                await response.write(first)
                async for chunk in chunks:
                    await response.write(chunk)
                    sent += len(chunk)
            except asyncio.CancelledError:
                log.warning(
                    "GraphDriver.Diff of layer %r cancelled after %d bytes "
                    "because the daemon is stopping",
                    layer_id,
                    sent,
                )
                raise
            except ConnectionError as error:
                # Returning, not raising, keeps aiohttp from logging the lost
                # connection again with a traceback.
                log.warning(
                    "GraphDriver.Diff of layer %r: the client went away after "
                    "%d bytes (%s)",
                    layer_id,
                    sent,
                    error,
                )
                return response
            except Exception:
                # The status line is gone already: break the connection so that
                # dockerd reads a truncated tar instead of a complete one.
                log.exception(
                    "GraphDriver.Diff of layer %r failed after %d bytes; aborting",
                    layer_id,
                    sent,
                )
                if request.transport is not None:
                    request.transport.abort()
                return response
        await response.write_eof()
        log.debug("GraphDriver.Diff of layer %r sent %d bytes", layer_id, sent)
        return response

    async def apply_diff(self, request: web.Request, args: dict) -> web.Response:
        """Import the request body, a tar, into a layer as it arrives."""
        layer_id = _string_field(args, "ID")
        parent_id = _string_field(args, "Parent")

        def work(fileobj) -> int:
            with self.layer_calls.running(layer_id, IMPORT):
                log.debug("GraphDriver.ApplyDiff of layer %r: import started", layer_id)
                self._check_parent(layer_id, parent_id, required=False)
                size = self.store.apply_diff(layer_id, fileobj)
                self.store.commit()
                return size

        try:
            size = await streams.consume_in_thread(
                request.content.iter_chunked(APPLY_CHUNK_SIZE),
                work,
                self.workers,
                f"apply-{layer_id}",
            )
        except streams.BodyAborted as error:
            message = _describe(error, layer_id)
            log.warning(
                "GraphDriver.ApplyDiff failed for layer %r: %s",
                layer_id,
                _printable(message),
            )
            return _error_reply(message)
        except asyncio.CancelledError:
            log.warning(
                "GraphDriver.ApplyDiff of layer %r cancelled because the daemon "
                "is stopping; the import is rolled back",
                layer_id,
            )
            raise
        except ConnectionError as error:
            log.warning(
                "GraphDriver.ApplyDiff failed for layer %r: the client went away "
                "before the end of the tar (%s)",
                layer_id,
                error,
            )
            # The reply goes nowhere, but returning one keeps aiohttp from
            # logging the lost connection a second time with a traceback.
            return _error_reply(_describe(error, layer_id))
        log.debug("GraphDriver.ApplyDiff of layer %r applied %d bytes", layer_id, size)
        return web.json_response({"Size": size}, content_type=CONTENT_TYPE)

    async def fuse_stats(self, request: web.Request) -> web.Response:
        """Reply with the FUSE request counters (``lcfs stats``), not a Docker call."""
        return web.json_response(self.mounts.stats.snapshot())

    async def layer_list(self, request: web.Request) -> web.Response:
        """Reply with the device and its layers (``lcfs layers``), not a Docker call."""
        layers = await self._run(self.store.list_layers)
        rows = [
            {"ID": layer.id, "Parent": layer.parent_id or "", "Frozen": layer.frozen}
            for layer in sorted(layers, key=lambda layer: layer.number)
        ]
        device = os.fstat(self.store.fd)
        return web.json_response({
            "Device": self.device,
            "DeviceInode": [device.st_dev, device.st_ino],
            "Layers": rows,
        })

    async def unknown_call(
        self, known_calls: frozenset[str], request: web.Request
    ) -> web.Response:
        call = request.match_info.get("call", "")
        if call in known_calls:
            method = request.method
            log.warning("plugin call %r sent with %s instead of POST", call, method)
            message = f"plugin call {call!r} must be sent with POST, not {method}"
            return web.json_response(
                {"Err": message},
                status=405,
                headers={"Allow": "POST"},
                content_type=CONTENT_TYPE,
            )
        log.warning("unknown plugin call %s %r", request.method, call)
        return web.json_response(
            {"Err": f"unknown plugin call {call!r}: lcfs implements GraphDriver"},
            status=404,
            content_type=CONTENT_TYPE,
        )
