"""Tests of the containerd snapshotter: filters, store records, the gRPC service, crashes.

Store tests run on a real LMDB environment in an image file. Service tests
run a real ``lcfs daemon --snapshotter-socket`` with its FUSE mount, and the
crash tests kill it with SIGKILL at named crash points, restart it, and
check List and fsck.
"""

import asyncio
import errno
import json
import os
import stat
import subprocess
import sys
import time

import grpc
import pytest
from dockerd import unix_http
import lcfs_daemon
from lcfs_daemon import PLUGIN_HEADERS, fsck_command
from snapshotter_helpers import KIND_NAMES, SnapshotterDaemon, check_list_consistent

from lcfs.driver.proto import snapshots_pb2 as pb
from lcfs.driver.reconcile import find_orphans
from lcfs.driver.snapshotter import SnapshotService, info_message, snapshot_fields
from lcfs.driver.snapshotter_filters import FilterError, parse_filters
from lcfs.store import ROOT_INO, Store, errors
from lcfs.store.store import write_op
from lcfs.store.snapshots import (
    MAX_LABELS_TOTAL_BYTES,
    SNAPSHOT_LAYER_PREFIX,
    SnapshotExists,
    SnapshotHasChildren,
    SnapshotInfo,
    SnapshotNotFound,
    WrongKind,
)
from tools import fsck

MiB = 1 << 20


# -- filters ----------------------------------------------------------------


def info(name="a", kind="active", parent="", labels=None) -> SnapshotInfo:
    return SnapshotInfo(name, kind, parent, 1, 1, labels or {}, "snapshot-1")


FILTER_CASES = [
    (["name==a"], info("a"), True),
    (["name==a"], info("b"), False),
    (["name==b", "name==a"], info("a"), True),
    (["kind==active,name==a"], info("a"), True),
    (["kind==committed,name==a"], info("a"), False),
    (["parent==p"], info(parent="p"), True),
    (['parent!=""'], info(parent="p"), True),
    (['parent!=""'], info(parent=""), False),
    (["labels.l"], info(labels={"l": "1"}), True),
    (["labels.l"], info(labels={"m": "1"}), False),
    (["labels.l"], info(), False),
    (["labels.l==2"], info(labels={"l": "2"}), True),
    (["labels.l!=2"], info(), True),
    (['labels."containerd.io/gc.root"==check-walk'],
     info(labels={"containerd.io/gc.root": "check-walk"}), True),
    (['labels."containerd.io/gc.root"==check-walk'],
     info(labels={"containerd.io/gc.root": "other"}), False),
    (["name~=^ex"], info("extract-1"), True),
    (["name~=^ex"], info("base"), False),
    (["name~=/x-[0-9]+$/"], info("ns/x-12"), True),
    (['name~="/x$"'], info("ns/x"), True),
    (["name==a", ""], info("zzz"), True),
    ([], info("zzz"), True),
    (['name=="a\\x62"'], info("ab"), True),
    (["  name  ==  a"], info("a"), True),
    (["other==x"], info(), False),
    (["other!=x"], info(), True),
]  # fmt: skip


@pytest.mark.parametrize("filters,snapshot,expected", FILTER_CASES)
def test_filter_matches(filters, snapshot, expected):
    assert parse_filters(filters).matches(snapshot_fields(snapshot)) is expected


@pytest.mark.parametrize("text", ["name===a", "name==", "name==a b", ",", "name==a,",
                                  "labels.", 'name=="open', "na-me==a", "name~=/[/"])  # fmt: skip
def test_filter_invalid(text):
    if text == "name~=/[/":
        # A valid filter whose regular expression does not compile matches nothing.
        assert not parse_filters([text]).matches(snapshot_fields(info("[")))
        return
    with pytest.raises(FilterError):
        parse_filters([text])


def test_filter_invalid_after_empty():
    # An empty filter matches everything, but the filters after it must
    # still parse, as containerd's filters.ParseAll requires.
    with pytest.raises(FilterError):
        parse_filters(["", "name==a,"])
    assert parse_filters(["name==b", "", "name==c"]).matches(snapshot_fields(info("a")))


# -- store records ------------------------------------------------------------


@pytest.fixture
def image(tmp_path):
    path = str(tmp_path / "store.img")
    Store.mkfs(path, size=256 * MiB)
    return path


@pytest.fixture
def store(image):
    s = Store.open(image)
    yield s
    s.close()
    assert fsck.main([image, "--no-progress", "--log-level", "WARNING"]) == 0


def write_file(store, layer_id, name: bytes, data: bytes) -> None:
    layer = store.get_layer(layer_id).number
    attr = store.mknod(layer, ROOT_INO, name, stat.S_IFREG | 0o644, 0, 0, 0)
    store.write(layer, attr.ino, 0, data)


def test_prepare_commit_view(store):
    active = store.create_snapshot("k1", "", "active", {"a": "1", "empty": ""})
    assert active.layer_id.startswith(SNAPSHOT_LAYER_PREFIX)
    assert active.labels == {"a": "1"}
    assert active.created_ns == active.updated_ns
    assert not store.get_layer(active.layer_id).frozen
    write_file(store, active.layer_id, b"f", b"hello")

    committed = store.commit_snapshot("c1", "k1", {"b": "2"})
    assert committed.kind == "committed"
    assert committed.layer_id == active.layer_id
    assert committed.labels == {"b": "2"}
    assert committed.created_ns >= active.created_ns
    assert store.get_layer(committed.layer_id).frozen
    with pytest.raises(SnapshotNotFound):
        store.stat_snapshot("k1")

    view = store.create_snapshot("v1", "c1", "view")
    layer = store.get_layer(view.layer_id)
    assert layer.frozen
    assert layer.parent_id == committed.layer_id
    inherited = store.lookup(layer.number, ROOT_INO, b"f")
    assert store.read(layer.number, inherited.ino, 0, 5) == b"hello"
    with pytest.raises(errors.ReadOnly):
        write_file(store, view.layer_id, b"g", b"x")
    assert [s.name for s in store.list_snapshots()] == ["c1", "v1"]


def test_semantic_errors(store):
    store.create_snapshot("a1", "", "active")
    store.create_snapshot("v1", "", "view")
    with pytest.raises(SnapshotExists):
        store.create_snapshot("a1", "", "active")
    with pytest.raises(SnapshotExists):
        store.create_snapshot("a1", "", "view")
    with pytest.raises(SnapshotNotFound):
        store.create_snapshot("a2", "missing", "active")
    with pytest.raises(errors.Invalid):
        store.create_snapshot("a2", "a1", "active")
    with pytest.raises(errors.Invalid):
        store.create_snapshot("", "", "active")
    with pytest.raises(errors.Invalid):
        store.create_snapshot("a2", "", "active", {"k": "v" * 4096})
    with pytest.raises(WrongKind):
        store.commit_snapshot("c1", "v1")
    with pytest.raises(SnapshotNotFound):
        store.commit_snapshot("c1", "missing")
    with pytest.raises(SnapshotExists):
        store.commit_snapshot("v1", "a1")
    store.commit_snapshot("c1", "a1")
    with pytest.raises(WrongKind):
        store.commit_snapshot("c2", "c1")
    store.create_snapshot("child", "c1", "active")
    with pytest.raises(SnapshotHasChildren, match="child"):
        store.remove_snapshot("c1")
    with pytest.raises(SnapshotNotFound):
        store.remove_snapshot("missing")
    # Nothing that failed left a record or a layer behind.
    assert sorted(s.name for s in store.list_snapshots()) == ["c1", "child", "v1"]
    assert len(store.list_layers()) == 3


def test_errors_name_the_field(store):
    store.create_snapshot("a1", "", "active")
    long_name = "n" * 600
    cases = [
        (lambda: store.create_snapshot("", "", "active"), "invalid snapshot key: it is empty"),
        (lambda: store.create_snapshot("a2", long_name, "view"),
         "invalid parent snapshot name 'nnnn"),
        (lambda: store.commit_snapshot("", "a1"), "invalid snapshot name: it is empty"),
        (lambda: store.commit_snapshot(long_name, "a1"), "invalid snapshot name 'nnnn"),
        (lambda: store.commit_snapshot("c1", ""), "invalid snapshot key: it is empty"),
        (lambda: store.update_snapshot("", {}), "invalid snapshot name: it is empty"),
        (lambda: store.remove_snapshot(""), "invalid snapshot key: it is empty"),
    ]  # fmt: skip
    for call, message in cases:
        with pytest.raises(errors.Invalid) as caught:
            call()
        assert str(caught.value).startswith(message)
    assert [s.name for s in store.list_snapshots()] == ["a1"]


def test_update_labels(store):
    store.create_snapshot("a", "", "active", {"l1": "v1", "l2": "v2", "l3": "v3"})
    updated = store.update_snapshot("a", {"l1": "updated", "l4": "v4"}, ["labels.l1", "labels.l2"])
    assert updated.labels == {"l1": "updated", "l3": "v3"}
    assert updated.updated_ns > updated.created_ns
    assert store.update_snapshot("a", {"x": "y"}, ["labels"]).labels == {"x": "y"}
    assert store.update_snapshot("a", {"z": "1"}).labels == {"z": "1"}
    with pytest.raises(errors.Invalid):
        store.update_snapshot("a", {}, ["parent"])
    with pytest.raises(SnapshotNotFound):
        store.update_snapshot("missing", {})
    assert store.stat_snapshot("a").labels == {"z": "1"}


def test_labels_total_size_limit(store):
    labels = {f"l{i:04d}": "v" * 4000 for i in range(700)}
    store.create_snapshot("a", "", "active", labels)
    more = {f"m{i:04d}": "v" * 4000 for i in range(100)}
    paths = [f"labels.{key}" for key in more]
    with pytest.raises(errors.Invalid, match="labels of snapshot a: .* bytes in all"):
        store.update_snapshot("a", more, paths)
    assert store.stat_snapshot("a").labels == labels
    with pytest.raises(errors.Invalid, match="labels of snapshot b: "):
        store.create_snapshot("b", "", "active", {**labels, **more})
    with pytest.raises(errors.Invalid, match="labels of snapshot c: "):
        store.commit_snapshot("c", "a", {**labels, **more})
    # Removing labels makes room again.
    removed = [f"labels.{key}" for key in list(labels)[:100]]
    store.update_snapshot("a", more, removed + paths)
    assert len(store.stat_snapshot("a").labels) == 700


def test_labels_limit_counts_encoding(store):
    """Many small labels must still fit one gRPC message once protobuf frames them."""
    small = {f"k{i:06d}": "v" for i in range(300_000)}
    assert sum(len(key) + len(value) for key, value in small.items()) < MAX_LABELS_TOTAL_BYTES
    with pytest.raises(errors.Invalid, match="labels of snapshot s: "):
        store.create_snapshot("s", "", "active", small)
    fitting = dict(list(small.items())[:180_000])
    info = store.create_snapshot("t", "", "active", fitting)
    assert info_message(info).ByteSize() < MAX_LABELS_TOTAL_BYTES + 4096


def test_records_survive_reopen(image):
    with Store.open(image) as store:
        store.create_snapshot("k", "", "active", {"a": "b"})
        store.commit_snapshot("c", "k")
        store.create_snapshot("v", "c", "view")
        before = store.list_snapshots()
    with Store.open(image) as store:
        assert store.list_snapshots() == before
        assert store.get_layer(store.stat_snapshot("v").layer_id).frozen


def test_usage_counts_own_changes(store):
    """Usage counts the 4 KiB blocks that a snapshot's own files take, as du would."""
    base = store.create_snapshot("base", "", "active")
    write_file(store, base.layer_id, b"big", b"x" * 10000)
    store.commit_snapshot("c", "base")
    child = store.create_snapshot("child", "c", "active")
    assert store.snapshot_usage("child") == (0, 0)
    write_file(store, child.layer_id, b"one", b"12345")
    write_file(store, child.layer_id, b"two", b"123")
    assert store.snapshot_usage("child") == (2 * 4096, 2)
    assert store.snapshot_usage("c") == (3 * 4096, 1)


def test_usage_skips_holes_and_parent_blocks(store):
    base = store.create_snapshot("base", "", "active")
    write_file(store, base.layer_id, b"big", b"x" * (10 * 4096))
    store.commit_snapshot("c", "base")
    child = store.create_snapshot("child", "c", "active")
    layer = store.get_layer(child.layer_id).number
    big = store.lookup(layer, ROOT_INO, b"big").ino
    # One byte into the inherited file copies one block, not ten.
    store.write(layer, big, 5, b"y")
    sparse = store.mknod(layer, ROOT_INO, b"sparse", stat.S_IFREG | 0o644, 0, 0, 0)
    store.write(layer, sparse.ino, 100 * 1024 * 1024, b"end")
    assert store.snapshot_usage("child") == (2 * 4096, 2)


CRASH_WITH_CHANGE_MARK = """
import os, sys
from lcfs.store import Store
store = Store.open(sys.argv[1])
info = store.create_snapshot("default/7/work-1", "", "active")
store.mark_layer(info.layer_id)
store.commit()
os._exit(0)
"""


def test_lost_changes_name_snapshot(image, caplog):
    # A process that ends with a change mark on a snapshot's layer, as a
    # daemon killed while a container writes does.
    subprocess.run([sys.executable, "-c", CRASH_WITH_CHANGE_MARK, image], check=True,
                   timeout=60)  # fmt: skip
    with caplog.at_level("WARNING", logger="lcfs.store.store"):
        reopened = Store.open(image)
    reopened.close()
    lost = [record.getMessage() for record in caplog.records
            if "may have lost the changes" in record.getMessage()]  # fmt: skip
    assert len(lost) == 1, lost
    assert "(containerd snapshot default/7/work-1)" in lost[0]


def test_remove_frees_space(store):
    free_before = store.statfs().free_blocks
    info_ = store.create_snapshot("k", "", "active")
    write_file(store, info_.layer_id, b"f", os.urandom(1 * MiB))
    store.commit()
    assert store.statfs().free_blocks < free_before
    store.remove_snapshot("k")
    store.commit()
    assert store.statfs().free_blocks == free_before
    assert store.list_layers() == []


def test_reconcile_repairs_both_directions(store):
    store.create_snapshot("kept", "", "active")
    orphan = store.create_snapshot("dangling", "", "active")
    # A record whose layer is gone, and a snapshot layer without a record,
    # as an offline repair could leave them.
    store.remove_layer(orphan.layer_id)
    store.create_layer(SNAPSHOT_LAYER_PREFIX + "999")
    store.create_layer("docker-layer")
    dropped, removed = store.reconcile_snapshots()
    assert dropped == ["dangling"]
    assert removed == [SNAPSHOT_LAYER_PREFIX + "999"]
    assert [s.name for s in store.list_snapshots()] == ["kept"]
    assert sorted(layer.id for layer in store.list_layers()) == [
        "docker-layer", store.stat_snapshot("kept").layer_id]  # fmt: skip
    assert store.reconcile_snapshots() == ([], [])


def test_orphan_check_ignores_snapshots(store, tmp_path):
    store.create_snapshot("k", "", "active")
    store.create_layer("docker-layer")
    docker_root = tmp_path / "docker"
    (docker_root / "image" / "lcfs" / "layerdb" / "sha256").mkdir(parents=True)
    (docker_root / "buildkit").mkdir()
    report = find_orphans(store, str(docker_root), grace=0, now=time.time() + 10)
    assert [layer.id for layer in report.orphans] == ["docker-layer"]


# -- the gRPC service ----------------------------------------------------------------


@pytest.fixture
def daemon(tmp_path):
    running = SnapshotterDaemon(tmp_path / "lcfs", size="2G", graphdriver=True)
    try:
        yield running.start()
    finally:
        running.cleanup()
    result = running.fsck()
    assert result.returncode == 0, result.stdout + result.stderr


def rpc_code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code()


def prepare(client, key, parent="", labels=None):
    return client.Prepare(pb.PrepareSnapshotRequest(snapshotter="lcfs", key=key, parent=parent,
                                                    labels=labels or {}))  # fmt: skip


def commit(client, name, key, labels=None):
    return client.Commit(pb.CommitSnapshotRequest(snapshotter="lcfs", name=name, key=key,
                                                  labels=labels or {}))  # fmt: skip


@pytest.mark.fuse
def test_service_status_codes(daemon):
    client = daemon.client
    prepare(client, "a1")
    client.View(pb.ViewSnapshotRequest(key="v1"))
    codes = grpc.StatusCode
    assert rpc_code(lambda: prepare(client, "a1")) == codes.ALREADY_EXISTS
    assert rpc_code(lambda: prepare(client, "a2", "missing")) == codes.NOT_FOUND
    assert rpc_code(lambda: prepare(client, "a2", "a1")) == codes.INVALID_ARGUMENT
    assert rpc_code(lambda: prepare(client, "")) == codes.INVALID_ARGUMENT
    assert rpc_code(lambda: commit(client, "c", "v1")) == codes.FAILED_PRECONDITION
    assert rpc_code(lambda: commit(client, "v1", "a1")) == codes.ALREADY_EXISTS
    assert rpc_code(lambda: commit(client, "c", "missing")) == codes.NOT_FOUND
    assert rpc_code(lambda: client.Stat(pb.StatSnapshotRequest(key="missing"))) == codes.NOT_FOUND
    assert rpc_code(lambda: client.Usage(pb.UsageRequest(key="missing"))) == codes.NOT_FOUND
    assert rpc_code(lambda: client.Mounts(pb.MountsRequest(key="missing"))) == codes.NOT_FOUND
    commit(client, "c1", "a1")
    prepare(client, "child", "c1")
    remove = pb.RemoveSnapshotRequest(key="c1")
    assert rpc_code(lambda: client.Remove(remove)) == codes.FAILED_PRECONDITION
    assert rpc_code(lambda: client.Mounts(pb.MountsRequest(key="c1"))) == codes.FAILED_PRECONDITION
    update = pb.UpdateSnapshotRequest(info=pb.Info(name="c1", parent="x"))
    update.update_mask.paths.append("parent")
    assert rpc_code(lambda: client.Update(update)) == codes.INVALID_ARGUMENT
    assert rpc_code(lambda: daemon.list("name===x")) == codes.INVALID_ARGUMENT


@pytest.mark.fuse
def test_service_logs_snapshot_of_update(daemon):
    update = pb.UpdateSnapshotRequest(info=pb.Info(name="missing-for-update"))
    assert rpc_code(lambda: daemon.client.Update(update)) == grpc.StatusCode.NOT_FOUND
    assert "Update of snapshot missing-for-update failed" in daemon.log_tail()


@pytest.mark.fuse
def test_cli_names_snapshotter_socket(daemon):
    # A user of a daemon started with --socket none has only the snapshotter
    # socket to pass, and that one speaks gRPC, not the plugin protocol.
    lcfs = lcfs_daemon.lcfs_command()
    commands = {
        "layers": [lcfs, "layers", "--device", str(daemon.device), "--socket",
                   str(daemon.socket_path)],
        "stats": [lcfs, "stats", "--socket", str(daemon.socket_path)],
    }  # fmt: skip
    for name, command in commands.items():
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        message = result.stderr.strip()
        assert result.returncode == 2, (name, result.stdout, message)
        assert len(message.splitlines()) == 1, (name, message)
        assert f"{daemon.socket_path} replied in HTTP/2" in message, (name, message)
        assert "containerd snapshotter socket" in message, (name, message)
        assert "--socket none has no plugin socket" in message, (name, message)


@pytest.mark.fuse
def test_service_info_and_mounts(daemon):
    client = daemon.client
    mounts = prepare(client, "a1", labels={"containerd.io/snapshot.ref": "r"}).mounts
    assert len(mounts) == 1
    assert mounts[0].type == "bind"
    assert list(mounts[0].options) == ["rbind", "rw"]
    source = mounts[0].source
    assert os.path.dirname(source) == str(daemon.mountpoint)
    assert os.stat(source).st_mode & 0o777 == 0o755
    with open(os.path.join(source, "file"), "wb") as f:
        f.write(b"through FUSE")
    usage = client.Usage(pb.UsageRequest(key="a1"))
    assert (usage.size, usage.inodes) == (4096, 1)

    commit(client, "c1", "a1", {"l": "1"})
    stat_info = client.Stat(pb.StatSnapshotRequest(key="c1")).info
    assert stat_info.kind == pb.COMMITTED
    assert dict(stat_info.labels) == {"l": "1"}
    assert stat_info.created_at == stat_info.updated_at
    view = client.View(pb.ViewSnapshotRequest(key="v1", parent="c1")).mounts
    assert list(view[0].options) == ["rbind", "ro"]
    assert list(client.Mounts(pb.MountsRequest(key="v1")).mounts) == list(view)
    with open(os.path.join(view[0].source, "file"), "rb") as f:
        assert f.read() == b"through FUSE"
    with pytest.raises(OSError) as caught:
        open(os.path.join(view[0].source, "new"), "wb")
    assert caught.value.errno == errno.EROFS

    listed = {i.name: (KIND_NAMES[i.kind], i.parent) for i in daemon.list()}
    assert listed == {"c1": ("committed", ""), "v1": ("view", "c1")}
    client.Remove(pb.RemoveSnapshotRequest(key="v1"))
    client.Remove(pb.RemoveSnapshotRequest(key="c1"))
    assert daemon.list() == []
    assert daemon.layer_dirs() == []


@pytest.mark.fuse
def test_list_streams_batches(daemon):
    client = daemon.client
    for i in range(230):
        prepare(client, f"key-{i:03d}", labels={"n": str(i % 2)})
    replies = list(client.List(pb.ListSnapshotsRequest()))
    assert [len(reply.info) for reply in replies] == [100, 100, 30]
    assert len(daemon.list("labels.n==1")) == 115
    check_list_consistent(daemon.list())


@pytest.mark.fuse
def test_list_batches_fit_message_limit(daemon):
    # Each Info is about 1.6 MB of labels, so three do not fit one reply
    # under the 4 MiB that a gRPC client receives by default.
    labels = {f"containerd.io/snapshot/label-{i}": "v" * 4000 for i in range(400)}
    for i in range(3):
        prepare(daemon.client, f"labelled-{i}", labels=labels)
    replies = list(daemon.client.List(pb.ListSnapshotsRequest(), timeout=60))
    assert [len(reply.info) for reply in replies] == [2, 1]
    for reply in replies:
        assert reply.ByteSize() <= 4 * MiB
    names = [info.name for reply in replies for info in reply.info]
    assert names == ["labelled-0", "labelled-1", "labelled-2"]


@pytest.mark.fuse
def test_graphdriver_and_snapshots_apart(daemon):
    def plugin(name, payload):
        status, raw = unix_http(daemon.plugin_socket, "POST", f"/{name}",
                                json.dumps(payload).encode(), PLUGIN_HEADERS, 30)  # fmt: skip
        return status, json.loads(raw)

    layer = prepare(daemon.client, "k").mounts[0].source.rsplit("/", 1)[1]
    status, reply = plugin("GraphDriver.Create", {"ID": "docker-1"})
    assert (status, reply) == (200, {})
    status, reply = plugin("GraphDriver.Create", {"ID": SNAPSHOT_LAYER_PREFIX + "77"})
    assert status == 500
    assert "reserved" in reply["Err"]
    status, reply = plugin("GraphDriver.Remove", {"ID": layer})
    assert status == 500
    assert "not found" in reply["Err"]
    status, reply = plugin("GraphDriver.Exists", {"ID": layer})
    assert reply.get("Exists") is not True
    assert [i.name for i in daemon.list()] == ["k"]
    daemon.client.Cleanup(pb.CleanupRequest())
    assert [i.name for i in daemon.list()] == ["k"]
    assert sorted(os.listdir(daemon.mountpoint)) == sorted(["docker-1", layer])


@pytest.mark.fuse
def test_malformed_record_start_and_repair(daemon):
    prepare(daemon.client, "kept")
    assert daemon.stop() == 0

    @write_op
    def put_bad_record(store):
        store._txn.put(b"broken", b"{not json", db=store.dbs["snapshots"])

    with Store.open(str(daemon.device)) as store:
        put_bad_record(store)
        store.commit()
    with pytest.raises(RuntimeError) as caught:
        daemon.start()
    assert "snapshot record 'broken' is malformed" in str(caught.value)
    assert "lcfs-fsck --repair" in str(caught.value)
    assert "Traceback" not in daemon.log_tail()

    repair = subprocess.run([fsck_command(), "--repair", "--yes", str(daemon.device)],
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert repair.returncode == fsck.EXIT_REPAIRED, repair.stdout + repair.stderr
    daemon.start()
    assert [i.name for i in daemon.list()] == ["kept"]


class AbortCalled(Exception):
    """Raised by FakeContext.abort, as grpc.aio's abort raises to end the call."""


class FakeContext:
    def __init__(self):
        self.code = None
        self.details = None

    async def abort(self, code, details):
        self.code = code
        self.details = details
        raise AbortCalled()


class FailingStore:
    def list_snapshots(self):
        raise errors.StoreError("commit of lcfs.img failed (I/O error); restart the daemon")


def test_list_store_failure_status():
    service = SnapshotService(FailingStore(), mounts=None)
    context = FakeContext()

    async def drain():
        return [reply async for reply in service.List(pb.ListSnapshotsRequest(), context)]

    with pytest.raises(AbortCalled):
        asyncio.run(drain())
    assert context.code == grpc.StatusCode.INTERNAL
    assert context.details.startswith("commit of lcfs.img failed")


# -- crashes ------------------------------------------------------------------------


def crash_during(daemon: SnapshotterDaemon, point: str, action, env=None) -> None:
    """Restart the daemon armed with ``point``, run ``action``, expect it to die there."""
    assert daemon.stop() == 0
    daemon.start(crash_point=point, env=env)
    with pytest.raises(grpc.RpcError):
        action(daemon.client)
    assert daemon.wait_exit() == -9, daemon.log_tail()
    daemon.start()


def populate(client, mountpoint) -> None:
    """Make c1 (committed, with files) and a1 (active, on c1)."""
    source = prepare(client, "base").mounts[0].source
    for i in range(12):
        with open(os.path.join(source, f"f{i}"), "wb") as f:
            f.write(os.urandom(8192))
    commit(client, "c1", "base")
    prepare(client, "a1", "c1")


def remove_all(client, keys) -> None:
    for key in keys:
        client.Remove(pb.RemoveSnapshotRequest(key=key))


# Prepare and View are one LMDB transaction, which create.done interrupts;
# Remove has the steps of Store.remove_layer and its crash points.
CRASHES = [
    ("create.done", lambda c: prepare(c, "new", "c1"),
     {"c1": "committed", "a1": "active"}),
    ("create.done", lambda c: c.View(pb.ViewSnapshotRequest(key="new", parent="c1")),
     {"c1": "committed", "a1": "active"}),
    ("remove.marked", lambda c: c.Remove(pb.RemoveSnapshotRequest(key="a1")),
     {"c1": "committed"}),
    ("remove.batch@2", lambda c: remove_all(c, ["a1", "c1"]), {}),
    ("remove.dropping", lambda c: remove_all(c, ["a1", "c1"]), {"c1": "committed"}),
]  # fmt: skip


@pytest.mark.fuse
@pytest.mark.parametrize("point,action,expected", CRASHES,
                         ids=["prepare", "view", "remove", "remove-batch", "remove-drop"])
def test_crash_point(daemon, point, action, expected):
    populate(daemon.client, daemon.mountpoint)
    # Small purge batches make the removal of c1's records take several commits.
    crash_during(daemon, point, action, env={"LCFS_PURGE_BATCH": "3"})
    infos = daemon.list()
    check_list_consistent(infos)
    assert {i.name: KIND_NAMES[i.kind] for i in infos} == expected
    assert len(daemon.layer_dirs()) == len(expected)
    # The store works on: what survived can be removed, and a new import prepared.
    for name in sorted(expected, key=lambda n: expected[n] == "committed"):
        daemon.client.Remove(pb.RemoveSnapshotRequest(key=name))
    prepare(daemon.client, "after")
    assert [i.name for i in daemon.list()] == ["after"]


@pytest.mark.fuse
def test_reply_means_durable(daemon):
    client = daemon.client
    source = prepare(client, "a1").mounts[0].source
    with open(os.path.join(source, "data"), "wb") as f:
        f.write(b"written before Commit")
    commit(client, "c1", "a1")
    prepare(client, "a2", "c1")
    daemon.kill()
    daemon.start()
    listed = {i.name: KIND_NAMES[i.kind] for i in daemon.list()}
    assert listed == {"c1": "committed", "a2": "active"}
    view = client_view(daemon, "v", "c1")
    with open(os.path.join(view, "data"), "rb") as f:
        assert f.read() == b"written before Commit"


def client_view(daemon, key, parent) -> str:
    return daemon.client.View(pb.ViewSnapshotRequest(key=key, parent=parent)).mounts[0].source

