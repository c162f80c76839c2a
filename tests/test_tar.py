"""Layer tar import and export: round trips, Docker's tar dialect, and bad input."""

import bz2
import gzip
import io
import lzma
import os
import signal
import stat
import subprocess
import sys
import tarfile
import textwrap
import time

import pytest

from tools import fsck
from lcfs.store import ROOT_INO, Store, errors

MiB = 1 << 20


@pytest.fixture
def image(tmp_path):
    path = str(tmp_path / "store.img")
    Store.mkfs(path, size=2048 * MiB)
    return path


@pytest.fixture
def store(image):
    s = Store.open(image)
    yield s
    s.close()
    assert fsck.main([image, "--no-progress", "--log-level", "WARNING"]) == 0


def make_tar(entries, fmt=tarfile.PAX_FORMAT) -> bytes:
    """Build a tar from (name, type, extra) tuples; extra may hold data, linkname, mode, pax."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt, encoding="utf-8",
                      errors="surrogateescape") as archive:  # fmt: skip
        for name, kind, extra in entries:
            member = tarfile.TarInfo(name)
            member.type = kind
            member.mode = extra.get("mode", 0o755 if kind == tarfile.DIRTYPE else 0o644)
            member.mtime = extra.get("mtime", 1_700_000_000)
            member.linkname = extra.get("linkname", "")
            member.pax_headers = extra.get("pax", {})
            data = extra.get("data", b"")
            member.size = len(data) if kind == tarfile.REGTYPE else 0
            archive.addfile(member, io.BytesIO(data) if member.size else None)
    return buffer.getvalue()


DIR, REG, SYM, LNK = tarfile.DIRTYPE, tarfile.REGTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE


def tree_of(store, layer_id):
    """Return {path: (type, mode, size, content, target)} of a layer's whole tree."""
    number = store.get_layer(layer_id).number
    result = {}

    def walk(ino, prefix):
        for name, attr in store.readdir(number, ino):
            path = prefix + b"/" + name
            content = store.read(number, attr.ino, 0, attr.size) if stat.S_ISREG(attr.mode) else None
            target = store.readlink(number, attr.ino) if stat.S_ISLNK(attr.mode) else None
            result[path] = (stat.S_IFMT(attr.mode), stat.S_IMODE(attr.mode), content, target)
            if stat.S_ISDIR(attr.mode):
                walk(attr.ino, path)

    walk(ROOT_INO, b"")
    return result


def apply(store, layer_id, parent, data):
    store.create_layer(layer_id, parent)
    return store.apply_diff(layer_id, io.BytesIO(data))


def test_whiteouts_and_opaque(store):
    apply(store, "L1", None, make_tar([
        ("a", DIR, {}), ("a/x", REG, {"data": b"x"}), ("a/y", REG, {"data": b"y"}),
        ("b", DIR, {}), ("b/old", REG, {"data": b"old"}), ("c", REG, {"data": b"c"}),
    ]))  # fmt: skip
    apply(store, "L2", "L1", make_tar([
        ("a/.wh.x", REG, {}), ("b", DIR, {}), ("b/.wh..wh..opq", REG, {}),
        ("b/new", REG, {"data": b"new"}), (".wh.c", REG, {}),
    ]))  # fmt: skip
    tree = tree_of(store, "L2")
    assert b"/a/x" not in tree
    assert b"/a/y" in tree
    assert b"/b/old" not in tree
    assert tree[b"/b/new"][2] == b"new"
    assert b"/c" not in tree
    assert b"/a/x" in tree_of(store, "L1")
    changes = dict(store.changes("L2"))
    assert changes["/a/x"] == 2
    assert changes["/c"] == 2
    assert changes["/b/new"] == 1
    names = [m.name for m in tarfile.open(fileobj=io.BytesIO(b"".join(store.diff("L2"))))]
    assert "a/.wh.x" in names
    assert ".wh.c" in names
    assert "b/.wh..wh..opq" in names


def test_diff_skips_files_deleted_while_it_streams(store):
    """A Diff of a layer that a running container changes stays a valid tar.

    A file deleted before its header is left out, as Docker's own drivers
    leave out files that vanish while they pack a layer, and a file
    deleted after its header is padded with zeros.
    """
    store.create_layer("base")
    store.create_layer("c", "base")
    number = store.get_layer("c").number
    for name, size in ((b"a", 5000), (b"big", 3 * MiB), (b"gone", 5000), (b"z", 5000)):
        attr = store.mknod(number, ROOT_INO, name, stat.S_IFREG | 0o644)
        store.write(number, attr.ino, 0, name[:1] * size)
    store.commit()

    chunks = store.diff("c")
    streamed = next(chunks)
    store.unlink(number, ROOT_INO, b"gone")
    # Read up to the first MiB of "big", then delete it too.
    while streamed.count(b"b" * 1024) < 1024:
        streamed += next(chunks)
    store.unlink(number, ROOT_INO, b"big")
    streamed += b"".join(chunks)

    with tarfile.open(fileobj=io.BytesIO(streamed)) as archive:
        members = {m.name: m for m in archive.getmembers()}
        big = archive.extractfile(members["big"]).read()
        z = archive.extractfile(members["z"]).read()
    assert sorted(members) == ["a", "big", "z"]
    assert members["big"].size == 3 * MiB
    assert big[:MiB] == b"b" * MiB
    assert big[-MiB:] == bytes(MiB)
    assert z == b"z" * 5000


def test_whiteout_order_and_nested_whiteouts(store):
    apply(store, "L1", None, make_tar([
        ("d", DIR, {}), ("d/sub", DIR, {}), ("d/sub/f", REG, {"data": b"f"}), ("e", REG, {"data": b"e"}),
    ]))  # fmt: skip
    apply(store, "L2", "L1", make_tar([
        ("d/sub/.wh.f", REG, {}), (".wh.d", REG, {}), ("e2", REG, {"data": b"2"}), (".wh.e", REG, {}),
    ]))  # fmt: skip
    tree = tree_of(store, "L2")
    assert set(tree) == {b"/e2"}


def test_duplicate_entries_last_wins(store):
    apply(store, "L1", None, make_tar([
        ("f", REG, {"data": b"first"}), ("f", REG, {"data": b"second"}),
        ("g", DIR, {}), ("g", REG, {"data": b"file now"}),
    ]))  # fmt: skip
    tree = tree_of(store, "L1")
    assert tree[b"/f"][2] == b"second"
    assert tree[b"/g"][2] == b"file now"


def test_missing_parent_directories_created(store):
    apply(store, "L1", None, make_tar([("deep/er/file", REG, {"data": b"z"})]))
    tree = tree_of(store, "L1")
    assert tree[b"/deep"][0] == stat.S_IFDIR
    assert tree[b"/deep/er/file"][2] == b"z"


def test_directory_replaced_then_made_again(store):
    apply(store, "L1", None, make_tar([
        ("a", DIR, {}), ("a/x", REG, {"data": b"x"}),
        ("a", REG, {"data": b"file"}), ("a/y", REG, {"data": b"y"}),
    ]))  # fmt: skip
    tree = tree_of(store, "L1")
    assert tree[b"/a"][0] == stat.S_IFDIR
    assert tree[b"/a/y"][2] == b"y"
    assert b"/a/x" not in tree


def test_directory_removed_during_apply(store):
    data = make_tar([
        ("d", DIR, {}), ("d/f1", REG, {"data": b"1"}),
        ("pad", REG, {"data": b"p" * MiB}), ("d/f2", REG, {"data": b"2"}),
    ])  # fmt: skip
    store.create_layer("L1")
    number = store.get_layer("L1").number

    def remove_directory():
        directory = store.lookup(number, ROOT_INO, b"d")
        store.unlink(number, directory.ino, b"f1")
        store.rmdir(number, ROOT_INO, b"d")

    store.apply_diff("L1", WritingStream(data, data.index(b"p" * 512), remove_directory))
    tree = tree_of(store, "L1")
    assert tree[b"/d"][0] == stat.S_IFDIR
    assert tree[b"/d/f2"][2] == b"2"
    assert b"/d/f1" not in tree


def test_directory_symlinks_followed(store):
    apply(store, "img", None, make_tar([
        ("usr", DIR, {}), ("usr/lib", DIR, {}), ("usr/bin", DIR, {}), ("etc", DIR, {}),
        ("usr/lib/libc.so", REG, {"data": b"libc"}), ("usr/lib/old.so", REG, {"data": b"old"}),
        ("lib", SYM, {"linkname": "usr/lib"}),
        ("bin", SYM, {"linkname": "/usr/../usr/bin"}),
        ("etc/alt", SYM, {"linkname": "../../../usr/lib"}),
    ]))  # fmt: skip
    apply(store, "L2", "img", make_tar([
        # Docker's applier ignores an opaque marker in a directory that is a link.
        ("lib/.wh..wh..opq", REG, {}),
        ("lib/new.so", REG, {"data": b"new"}),
        ("lib/sub/deep", REG, {"data": b"deep"}),
        ("bin/tool", REG, {"data": b"tool"}),
        ("etc/alt/via-dotdot", REG, {"data": b"dotdot"}),
        ("lib/hard", LNK, {"linkname": "bin/tool"}),
        ("lib/.wh.old.so", REG, {}),
    ]))  # fmt: skip
    tree = tree_of(store, "L2")
    assert tree[b"/lib"][0] == stat.S_IFLNK
    assert tree[b"/lib"][3] == b"usr/lib"
    assert tree[b"/bin"][0] == stat.S_IFLNK
    assert tree[b"/etc/alt"][0] == stat.S_IFLNK
    assert tree[b"/usr/lib/libc.so"][2] == b"libc"
    assert tree[b"/usr/lib/new.so"][2] == b"new"
    assert tree[b"/usr/lib/sub/deep"][2] == b"deep"
    assert tree[b"/usr/bin/tool"][2] == b"tool"
    assert tree[b"/usr/lib/via-dotdot"][2] == b"dotdot"
    assert tree[b"/usr/lib/hard"][2] == b"tool"
    assert b"/usr/lib/old.so" not in tree


# Case: (members, the reason the error ends with).
BAD_LINK_PATHS = {
    "dangling": (
        [("s", SYM, {"linkname": "nowhere"}), ("s/f", REG, {"data": b"x"})],
        "a symbolic link whose target names 'nowhere', which is missing",
    ),
    "to a file": (
        [("f", REG, {"data": b"x"}), ("s", SYM, {"linkname": "f"}), ("s/f", REG, {"data": b"y"})],
        "a symbolic link whose target names 'f', which is not a directory",
    ),
    "loop": (
        [("a", SYM, {"linkname": "s"}), ("s", SYM, {"linkname": "a"}), ("s/f", REG, {"data": b"z"})],
        "more than 40 symbolic links",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_LINK_PATHS))
def test_path_through_bad_symlink_rejected(store, case):
    members, reason = BAD_LINK_PATHS[case]
    store.create_layer("L")
    with pytest.raises(errors.BadArchive) as info:
        store.apply_diff("L", io.BytesIO(make_tar(members)))
    assert str(info.value) == f"layer L: member 's/f': its directory path leads through {reason}"
    assert store.changes("L") == []


def test_long_and_non_utf8_names(store):
    long_name = "d" * 200 + "/" + "f" * 250
    odd = b"caf\xe9".decode("utf-8", "surrogateescape")
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        layer_id = f"L{fmt}"
        apply(store, layer_id, None, make_tar([(long_name, REG, {"data": b"long"}), (odd, REG, {"data": b"odd"})], fmt))
        tree = tree_of(store, layer_id)
        assert tree[b"/" + long_name.encode()][2] == b"long"
        assert tree[b"/caf\xe9"][2] == b"odd"
        out = tarfile.open(fileobj=io.BytesIO(b"".join(store.diff(layer_id))), encoding="utf-8",
                           errors="surrogateescape")  # fmt: skip
        assert {m.name for m in out} >= {long_name, odd}


def test_xattr_names_linux_rejects_skipped(store, caplog):
    pax = {
        "SCHILY.xattr.user.kept": "1",
        "SCHILY.xattr.system.posix_acl_default": "2",
        "SCHILY.xattr.noprefix": "3",
        "SCHILY.xattr.system.other": "4",
    }
    apply(store, "L", None, make_tar([("f", REG, {"data": b"1", "pax": pax})]))
    number = store.get_layer("L").number
    ino = store.lookup(number, ROOT_INO, b"f").ino
    assert sorted(store.listxattr(number, ino)) == [b"system.posix_acl_default", b"user.kept"]
    assert "skipped 2 xattrs" in caplog.text
    assert "noprefix" in caplog.text


@pytest.mark.parametrize(
    "name, value, problem",
    [
        ("", "v", "it is empty"),
        ("user.", "v", "it has nothing after the namespace"),
        ("user." + "n" * 300, "v", "it is 305 bytes long, and the limit is 255"),
        ("user.big", "v" * 70_000, "its value is 70000 bytes long, and the limit is 65536"),
    ],
    ids=["empty", "namespace alone", "name too long", "value too large"],
)
def test_invalid_xattr_named(store, name, value, problem):
    store.create_layer("L")
    data = make_tar([("f", REG, {"data": b"1", "pax": {"SCHILY.xattr." + name: value}})])
    with pytest.raises(errors.BadArchive) as info:
        store.apply_diff("L", io.BytesIO(data))
    message = str(info.value)
    assert message.startswith("layer L: member 'f': invalid xattr ")
    assert message.endswith(problem)
    assert store.changes("L") == []


def test_hard_links_and_xattrs_round_trip(store):
    cap = "\x01\x00\x00\x02" + "\x00" * 16
    apply(store, "L1", None, make_tar([
        ("bin", DIR, {}),
        ("bin/ping", REG, {"data": b"ELF", "mode": 0o4755,
                           "pax": {"SCHILY.xattr.security.capability": cap,
                                   "mtime": "1700000000.123456789"}}),
        ("bin/ping2", LNK, {"linkname": "bin/ping"}),
    ]))  # fmt: skip
    number = store.get_layer("L1").number
    bin_dir = store.lookup(number, ROOT_INO, b"bin")
    ping = store.lookup(number, bin_dir.ino, b"ping")
    assert ping.nlink == 2
    assert ping.mtime_ns == 1_700_000_000_123_456_789
    assert stat.S_IMODE(ping.mode) == 0o4755
    assert store.lookup(number, bin_dir.ino, b"ping2").ino == ping.ino
    assert store.getxattr(number, ping.ino, b"security.capability") == cap.encode("latin-1")
    members = {m.name: m for m in tarfile.open(fileobj=io.BytesIO(b"".join(store.diff("L1"))))}
    assert members["bin/ping"].pax_headers["SCHILY.xattr.security.capability"].encode(
        "utf-8", "surrogateescape") == cap.encode("latin-1")  # fmt: skip
    assert members["bin/ping"].pax_headers["mtime"] == "1700000000.123456789"
    assert members["bin/ping2"].type == LNK


def test_sparse_file_keeps_holes(store):
    data = bytes(64 * MiB) + b"tail"
    free = store.statfs().free_blocks
    apply(store, "L1", None, make_tar([("lastlog", REG, {"data": data})]))
    assert free - store.statfs().free_blocks == 1
    number = store.get_layer("L1").number
    assert store.read(number, store.lookup(number, ROOT_INO, b"lastlog").ino, 64 * MiB, 10) == b"tail"


def pax_sparse_tar(name: str, size: int, regions: list[tuple[int, bytes]]) -> bytes:
    """Build a tar of one sparse member in GNU's PAX sparse format 0.1."""
    member = tarfile.TarInfo(name)
    body = b"".join(data for _, data in regions)
    member.size = len(body)
    member.mtime = 1_700_000_000
    member.pax_headers = {
        "GNU.sparse.size": str(size),
        "GNU.sparse.numblocks": str(len(regions)),
        "GNU.sparse.map": ",".join(f"{offset},{len(data)}" for offset, data in regions),
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        archive.addfile(member, io.BytesIO(body))
    return buffer.getvalue()


def test_sparse_member_hole_not_read(image, tmp_path):
    """A sparse member with a 1 PiB hole imports without reading the hole as zeros."""
    size = 1 << 50
    tar_path = tmp_path / "sparse.tar"
    tar_path.write_bytes(pax_sparse_tar("huge", size, [(0, b"head"), (size - 4, b"tail")]))
    with Store.open(image) as s:
        free = s.statfs().free_blocks
    script = textwrap.dedent(f"""
        from lcfs.store import Store
        with Store.open({image!r}) as s:
            s.create_layer("L")
            with open({str(tar_path)!r}, "rb") as tar:
                s.apply_diff("L", tar)
    """)
    try:
        subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the import of a sparse member with a 1 PiB hole took over 60 s")
    with Store.open(image) as s:
        number = s.get_layer("L").number
        huge = s.lookup(number, ROOT_INO, b"huge")
        assert huge.size == size
        assert s.read(number, huge.ino, 0, 8) == b"head" + bytes(4)
        assert s.read(number, huge.ino, size - 8, 8) == bytes(4) + b"tail"
        assert free - s.statfs().free_blocks == 2
    assert fsck.main([image, "--no-progress", "--log-level", "WARNING"]) == 0


@pytest.mark.parametrize("tar_format", ["gnu", "posix"])
def test_gnu_tar_sparse_member(store, tmp_path, tar_format):
    source = tmp_path / "source"
    source.mkdir()
    with open(source / "sparse", "wb") as f:
        f.seek(5 * MiB)
        f.write(b"middle")
        f.truncate(10 * MiB)
    tar_path = tmp_path / "sparse.tar"
    subprocess.run(["tar", "-C", str(source), "--sparse", "-H", tar_format, "-cf",
                    str(tar_path), "sparse"], check=True)  # fmt: skip
    free = store.statfs().free_blocks
    store.create_layer("L")
    with open(tar_path, "rb") as tar:
        store.apply_diff("L", tar)
    number = store.get_layer("L").number
    sparse = store.lookup(number, ROOT_INO, b"sparse")
    assert stat.S_ISREG(sparse.mode)
    assert sparse.size == 10 * MiB
    assert store.read(number, sparse.ino, 5 * MiB - 2, 10) == bytes(2) + b"middle" + bytes(2)
    assert free - store.statfs().free_blocks == 1


@pytest.mark.parametrize(
    "regions, bad",
    [
        ([(0, b"abcd"), (2, b"efgh")], "of 4 bytes at offset 2"),
        ([(8, b"abcd"), (0, b"efgh")], "of 4 bytes at offset 0"),
        ([(98, b"abcd")], "of 4 bytes at offset 98"),
    ],
    ids=["overlapping", "out of order", "past the end"],
)
def test_bad_sparse_map_rejected(store, regions, bad):
    store.create_layer("L")
    with pytest.raises(errors.BadArchive) as info:
        store.apply_diff("L", io.BytesIO(pax_sparse_tar("f", 100, regions)))
    message = str(info.value)
    assert message.startswith("layer L: invalid layer tar: member 'f': the sparse map region ")
    assert bad in message
    assert message.endswith("lies outside the file size 100")
    assert store.changes("L") == []


def test_special_files_survive(store):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, kind in (("null", tarfile.CHRTYPE), ("loop0", tarfile.BLKTYPE), ("fifo", tarfile.FIFOTYPE)):
            member = tarfile.TarInfo(name)
            member.type = kind
            member.devmajor, member.devminor = 7, 3
            member.mode = 0o660
            archive.addfile(member)
    apply(store, "L1", None, buffer.getvalue())
    members = {m.name: m for m in tarfile.open(fileobj=io.BytesIO(b"".join(store.diff("L1"))))}
    assert members["null"].type == tarfile.CHRTYPE
    assert (members["loop0"].devmajor, members["loop0"].devminor) == (7, 3)
    assert members["fifo"].type == tarfile.FIFOTYPE
    assert members["null"].mode == 0o660


BAD_TARS = {
    "truncated": lambda: make_tar([("f", REG, {"data": os.urandom(100_000)})])[:60_000],
    "random bytes": lambda: os.urandom(50_000),
    "dotdot": lambda: make_tar([("ok", REG, {"data": b"1"}), ("../escape", REG, {"data": b"x"})]),
    "absolute": lambda: make_tar([("ok", REG, {"data": b"1"}), ("/etc/evil", REG, {"data": b"x"})]),
    "missing link target": lambda: make_tar([("ok", REG, {"data": b"1" * 9000}), ("l", LNK, {"linkname": "nope"})]),
    # A whiteout's content is skipped, not read: the tar ends 1000 bytes into it.
    "whiteout cut off": lambda: make_tar([("ok", REG, {"data": b"1"}), (".wh.gone", REG, {"data": b"w" * 2000})])[:2536],
    # Go's archive/tar rejects a header after a single zero block.
    "zero block inside": lambda: (make_tar([("ok", REG, {"data": b"1"})])[:1024] + bytes(512)
                                  + make_tar([("lost", REG, {"data": b"2"})])),
}


@pytest.mark.parametrize("case", sorted(BAD_TARS))
def test_bad_tar_rolled_back(image, case):
    with Store.open(image) as s:
        s.create_layer("base")
        s.apply_diff("base", io.BytesIO(make_tar([("keep", REG, {"data": b"kept" * 3000})])))
        free = s.statfs().free_blocks
        s.create_layer("L", "base")
        with pytest.raises(errors.BadArchive) as info:
            s.apply_diff("L", io.BytesIO(BAD_TARS[case]()))
        assert "layer L" in str(info.value)
        assert s.statfs().free_blocks == free
        assert s.changes("L") == []
    with Store.open(image) as s:
        assert s.statfs().free_blocks == free
        assert s.changes("L") == []
        assert tree_of(s, "L")[b"/keep"][2] == b"kept" * 3000


def test_dotdot_inside_layer_resolved(image):
    entries = [
        ("a/", DIR, {}),
        ("a/./b/", DIR, {}),
        ("a/./b/../c", REG, {"data": b"in a"}),
        ("a/b/../../top", LNK, {"linkname": "a/b/../c"}),
    ]
    with Store.open(image) as s:
        apply(s, "L", None, make_tar(entries))
        tree = tree_of(s, "L")
    assert tree[b"/a/c"][2] == b"in a"
    assert tree[b"/top"][2] == b"in a"
    assert b"/a/b/c" not in tree


def test_apply_killed_midway_rolled_back_on_open(image, tmp_path):
    """SIGKILL during an import leaves no half-made layer after the next open."""
    with Store.open(image) as s:
        free = s.statfs().free_blocks
    script = textwrap.dedent(f"""
        import io, os, sys, tarfile, threading
        from lcfs.store import Store
        s = Store.open({image!r})
        s.create_layer("half")
        s.commit()
        r, w = os.pipe()

        def produce():
            with tarfile.open(fileobj=os.fdopen(w, "wb"), mode="w|") as archive:
                for i in range(100000):
                    info = tarfile.TarInfo(f"f{{i}}")
                    data = os.urandom(8192)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))

        threading.Thread(target=produce, daemon=True).start()
        print("started", flush=True)
        s.apply_diff("half", os.fdopen(r, "rb"))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"started"
        time.sleep(2.5)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    with Store.open(image) as s:
        assert not s.exists("half")
        assert s.statfs().free_blocks == free


def manifest(root):
    """Return {path: attributes} of a tree as GNU tar extracted it, hard links as groups."""
    import hashlib

    entries = {}
    groups = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            item = {
                "type": stat.S_IFMT(st.st_mode),
                "mode": stat.S_IMODE(st.st_mode),
                "owner": (st.st_uid, st.st_gid),
                "mtime_ns": st.st_mtime_ns,
                "xattrs": {x: os.getxattr(path, x, follow_symlinks=False)
                           for x in os.listxattr(path, follow_symlinks=False)},  # fmt: skip
            }
            if stat.S_ISREG(st.st_mode):
                item["size"] = st.st_size
                with open(path, "rb") as f:
                    item["sha256"] = hashlib.sha256(f.read()).hexdigest()
                if st.st_nlink > 1:
                    groups.setdefault(st.st_ino, []).append(rel)
            elif stat.S_ISLNK(st.st_mode):
                item["target"] = os.readlink(path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                item["rdev"] = st.st_rdev
            entries[rel] = item
    return entries, sorted(sorted(g) for g in groups.values())


@pytest.fixture
def tmpfs_pair(tmp_path):
    mounted = []
    try:
        for name in ("expected", "actual"):
            target = tmp_path / name
            target.mkdir()
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2g", "tmpfs", str(target)], check=True)
            mounted.append(target)
        yield mounted
    finally:
        for target in mounted:
            subprocess.run(["umount", str(target)], check=False)


def gnu_extract(tar_path, dest):
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf", str(tar_path),
                    "-C", str(dest)], check=True)  # fmt: skip


def test_minbase_round_trip_matches_gnu_tar(store, tmpfs_pair, tmp_path):
    from rootfs import minbase_tar

    source = minbase_tar()
    expected_dir, actual_dir = tmpfs_pair
    with open(source, "rb") as f:
        store.create_layer("minbase")
        store.apply_diff("minbase", f)
    exported = tmp_path / "exported.tar"
    with open(exported, "wb") as out:
        for chunk in store.diff("minbase"):
            out.write(chunk)
    gnu_extract(source, expected_dir)
    gnu_extract(exported, actual_dir)
    expected, expected_links = manifest(expected_dir)
    actual, actual_links = manifest(actual_dir)
    assert len(expected) > 1000
    assert sorted(expected) == sorted(actual)
    differing = [path for path in expected if expected[path] != actual[path]]
    assert differing == [], {p: (expected[p], actual[p]) for p in differing[:5]}
    assert expected_links == actual_links


def test_corrupt_second_header_rejected(store):
    good = make_tar([("first", REG, {"data": b"x" * 5000}), ("second", REG, {"data": b"y"})])
    store.create_layer("L")
    with pytest.raises(errors.BadArchive) as info:
        store.apply_diff("L", io.BytesIO(good[: 512 + 5120] + os.urandom(4096)))
    assert "layer L" in str(info.value)
    assert store.changes("L") == []


@pytest.mark.parametrize("compression", ["gzip", "bzip2", "xz"])
def test_compressed_tar_named(store, compression):
    compress = {"gzip": gzip.compress, "bzip2": bz2.compress, "xz": lzma.compress}
    small = make_tar([("f", REG, {"data": b"1"})])
    large = make_tar([(f"f{i}", REG, {"data": os.urandom(3000)}) for i in range(5)])
    for number, data in enumerate((small, large)):
        layer_id = f"L{number}"
        store.create_layer(layer_id)
        with pytest.raises(errors.BadArchive) as info:
            store.apply_diff(layer_id, io.BytesIO(compress[compression](data)))
        assert f"layer {layer_id}" in str(info.value)
        assert f"is a {compression} stream" in str(info.value)
        assert store.changes(layer_id) == []


def test_tar_named_like_magic_accepted(store):
    # A member name may start with the bytes of a compression magic number.
    store.create_layer("L")
    store.apply_diff("L", io.BytesIO(make_tar([("BZh9", REG, {"data": b"1"})])))
    assert tree_of(store, "L")[b"/BZh9"][2] == b"1"


def test_empty_body_is_empty_layer(store):
    store.create_layer("L")
    assert store.apply_diff("L", io.BytesIO(b"")) == 0
    assert store.changes("L") == []


def test_diff_streams_large_files(store):
    apply(store, "L1", None, make_tar([("big", REG, {"data": os.urandom(20 * MiB)})]))
    sizes = [len(chunk) for chunk in store.diff("L1")]
    assert sum(sizes) > 20 * MiB
    assert max(sizes) <= MiB + 4096


def container_with_changes(store):
    """Build image -> init -> container layers; the container writes 8 MiB and edits files."""
    apply(store, "img", None, make_tar([("etc", DIR, {}), ("etc/conf", REG, {"data": b"a" * 10000})]))
    store.create_layer("ctr-init", "img")
    store.create_layer("ctr", "ctr-init")
    number = store.get_layer("ctr").number
    big = store.mknod(number, ROOT_INO, b"big", stat.S_IFREG | 0o644)
    payload = os.urandom(8 * MiB)
    store.write(number, big.ino, 0, payload)
    etc = store.lookup(number, ROOT_INO, b"etc")
    conf = store.lookup(number, etc.ino, b"conf")
    store.write(number, conf.ino, 5, b"CHANGED")
    return number, payload


def test_commit_takes_blocks_by_reference(store):
    number, payload = container_with_changes(store)
    diff = b"".join(store.diff("ctr"))
    free = store.statfs().free_blocks
    apply(store, "committed", "img", diff)
    assert free - store.statfs().free_blocks < 8 * MiB // 4096 // 100
    committed = store.get_layer("committed").number
    big = store.lookup(committed, ROOT_INO, b"big")
    assert store.read(committed, big.ino, 0, 8 * MiB) == payload
    store.write(number, store.lookup(number, ROOT_INO, b"big").ino, 0, b"after commit")
    assert store.read(committed, big.ino, 0, 12) == payload[:12]
    store.remove_layer("ctr")
    store.remove_layer("ctr-init")
    assert store.read(committed, big.ino, 0, 8 * MiB) == payload
    etc = store.lookup(committed, ROOT_INO, b"etc")
    conf = store.lookup(committed, etc.ino, b"conf")
    assert store.read(committed, conf.ino, 0, 20) == b"aaaaaCHANGEDaaaaaaaa"


def test_commit_diverging_tar_writes_rest(store):
    number, payload = container_with_changes(store)
    diff = bytearray(b"".join(store.diff("ctr")))
    at = diff.index(payload[:64])
    diff[at + 4 * MiB] ^= 0xFF
    free = store.statfs().free_blocks
    apply(store, "committed", "img", bytes(diff))
    # The first 4 MiB matched and stay shared; the rest is written anew.
    assert free - store.statfs().free_blocks == 4 * MiB // 4096
    committed = store.get_layer("committed").number
    expected = bytearray(payload)
    expected[4 * MiB] ^= 0xFF
    big = store.lookup(committed, ROOT_INO, b"big")
    assert store.read(committed, big.ino, 0, 8 * MiB) == bytes(expected)


@pytest.mark.parametrize("differs", [False, True], ids=["same", "differing"])
def test_commit_of_small_file(store, differs):
    """A file of at most one chunk is created, mapped or written in one operation."""
    apply(store, "img", None, make_tar([("small", REG, {"data": b"img"})]))
    store.create_layer("ctr", "img")
    number = store.get_layer("ctr").number
    content = os.urandom(64 * 1024)
    store.write(number, store.lookup(number, ROOT_INO, b"small").ino, 0, content)
    diff = bytearray(b"".join(store.diff("ctr")))
    if differs:
        diff[diff.index(content[:64]) + 40_000] ^= 0xFF
    free = store.statfs().free_blocks
    apply(store, "committed", "img", bytes(diff))
    new_blocks = free - store.statfs().free_blocks
    assert new_blocks == (16 if differs else 0)
    committed = store.get_layer("committed").number
    small = store.lookup(committed, ROOT_INO, b"small")
    expected = bytearray(content)
    if differs:
        expected[40_000] ^= 0xFF
    assert store.read(committed, small.ino, 0, len(content) + 1) == bytes(expected)
    store.remove_layer("ctr")
    assert store.read(committed, small.ino, 0, len(content)) == bytes(expected)


class WritingStream(io.BytesIO):
    """A tar stream that runs ``action`` once, after ``after`` bytes were read."""

    def __init__(self, data, after, action):
        super().__init__(data)
        self.after = after
        self.action = action

    def read(self, size=-1):
        if self.action is not None and self.tell() >= self.after:
            action, self.action = self.action, None
            action()
        return super().read(size)


@pytest.mark.parametrize("change", ["overwrite", "truncate", "remove"])
def test_commit_ignores_later_source_changes(store, change):
    number, payload = container_with_changes(store)
    diff = b"".join(store.diff("ctr"))
    big = store.lookup(number, ROOT_INO, b"big")

    def change_source():
        if change == "overwrite":
            store.write(number, big.ino, 0, os.urandom(8 * MiB))
        elif change == "truncate":
            store.setattr(number, big.ino, size=0)
        else:
            store.unlink(number, ROOT_INO, b"big")

    store.create_layer("committed", "img")
    stream = WritingStream(diff, diff.index(payload[:64]) + 3 * MiB, change_source)
    store.apply_diff("committed", stream)
    committed = store.get_layer("committed").number
    stored = store.lookup(committed, ROOT_INO, b"big")
    assert store.read(committed, stored.ino, 0, 8 * MiB) == payload


def test_commit_of_changed_source_stores_tar(store):
    number, payload = container_with_changes(store)
    diff = b"".join(store.diff("ctr"))
    big = store.lookup(number, ROOT_INO, b"big")
    store.write(number, big.ino, 5 * MiB, b"later")
    apply(store, "committed", "img", diff)
    committed = store.get_layer("committed").number
    stored = store.lookup(committed, ROOT_INO, b"big")
    assert store.read(committed, stored.ino, 0, 8 * MiB) == payload


def test_shared_blocks_freed_by_last_owner(store):
    free_empty = store.statfs().free_blocks
    container_with_changes(store)
    apply(store, "committed", "img", b"".join(store.diff("ctr")))
    for layer_id in ("committed", "ctr", "ctr-init", "img"):
        store.remove_layer(layer_id)
    assert store.statfs().free_blocks == free_empty


def test_commit_keeps_hard_links_of_changed_file(store):
    apply(store, "img", None, make_tar([
        ("etc", DIR, {}), ("etc/hosts", REG, {"data": b"old"}), ("hosts.hard", LNK, {"linkname": "etc/hosts"}),
    ]))  # fmt: skip
    store.create_layer("ctr", "img")
    number = store.get_layer("ctr").number
    etc = store.lookup(number, ROOT_INO, b"etc")
    hosts = store.lookup(number, etc.ino, b"hosts")
    store.write(number, hosts.ino, 0, b"new")
    changes = dict(store.changes("ctr"))
    assert changes["/etc/hosts"] == 0
    assert changes["/hosts.hard"] == 0
    apply(store, "committed", "img", b"".join(store.diff("ctr")))
    committed = store.get_layer("committed").number
    hard = store.lookup(committed, ROOT_INO, b"hosts.hard")
    assert store.read(committed, hard.ino, 0, 10) == b"new"
    assert hard.nlink == 2
    etc = store.lookup(committed, ROOT_INO, b"etc")
    assert store.lookup(committed, etc.ino, b"hosts").ino == hard.ino


def test_changes_list_every_ancestor_directory(store):
    apply(store, "img", None, make_tar([
        ("usr", DIR, {}), ("usr/share", DIR, {}), ("usr/share/doc", DIR, {}),
        ("usr/share/doc/sed", DIR, {}), ("usr/share/doc/sed/README", REG, {"data": b"r"}),
    ]))  # fmt: skip
    store.create_layer("ctr", "img")
    number = store.get_layer("ctr").number
    usr = store.lookup(number, ROOT_INO, b"usr")
    share = store.lookup(number, usr.ino, b"share")
    doc = store.lookup(number, share.ino, b"doc")
    store.rename(number, doc.ino, b"sed", doc.ino, b"sed-moved")
    changes = dict(store.changes("ctr"))
    assert changes["/usr"] == 0
    assert changes["/usr/share"] == 0
    assert changes["/usr/share/doc"] == 0
    assert changes["/usr/share/doc/sed"] == 2
    assert changes["/usr/share/doc/sed-moved"] == 1


def test_missing_parents_made_like_docker(store):
    apply(store, "img", None, make_tar([("np/one/file", REG, {"data": b"x"})]))
    number = store.get_layer("img").number
    np_dir = store.lookup(number, ROOT_INO, b"np")
    assert stat.S_IMODE(np_dir.mode) == 0o600


def one_entry_tar(
    name="f", kind=REG, fmt=tarfile.PAX_FORMAT, data=b"", **fields
) -> bytes:
    """Build a tar of one member. ``fields`` sets TarInfo attributes such as uid."""
    member = tarfile.TarInfo(name)
    member.type = kind
    member.size = len(data)
    member.mtime = 1_700_000_000
    for key, value in fields.items():
        setattr(member, key, value)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as archive:
        archive.addfile(member, io.BytesIO(data) if data else None)
    return buffer.getvalue()


def with_header_bytes(raw: bytes, start: int, value: bytes) -> bytes:
    """Return ``raw`` with the first header's bytes from ``start`` replaced and its checksum fixed."""
    patched = bytearray(raw)
    patched[start : start + len(value)] = value
    checksum = sum(patched[:148]) + 256 + sum(patched[156:512])
    patched[148:156] = b"%06o\0 " % checksum
    return bytes(patched)


GNU, CHR = tarfile.GNU_FORMAT, tarfile.CHRTYPE
TIMES = "-9223372036.854775808 to 9223372036.854775807 seconds"
# Case: (tar, expected text naming the field and its value, expected range).
BAD_NUMBERS = {
    "base-256 size -1": (
        lambda: with_header_bytes(one_entry_tar(data=b"x"), 124, b"\xff" * 12),
        "member 'f': size -1 ",
        "0 to 9223372036854775807",
    ),
    "pax mtime 1e400": (
        lambda: one_entry_tar(pax_headers={"mtime": "1e400"}),
        "member 'f': mtime 1e400 ",
        TIMES,
    ),
    "pax mtime 1e22": (
        lambda: one_entry_tar(pax_headers={"mtime": "99999999999999999999999"}),
        "member 'f': mtime 99999999999999999999999 ",
        TIMES,
    ),
    "pax atime nan": (
        lambda: one_entry_tar(pax_headers={"atime": "nan"}),
        "member 'f': atime nan ",
        TIMES,
    ),
    "gnu uid 2**40": (
        lambda: one_entry_tar(fmt=GNU, uid=2**40),
        "member 'f': uid 1099511627776 ",
        "0 to 4294967295",
    ),
    "gnu gid 2**40": (
        lambda: one_entry_tar(fmt=GNU, gid=2**40),
        "member 'f': gid 1099511627776 ",
        "0 to 4294967295",
    ),
    "pax uid 2**70": (
        lambda: one_entry_tar(uid=2**70),
        f"member 'f': uid {2**70} ",
        "0 to 4294967295",
    ),
    "gnu devmajor 2**40": (
        lambda: one_entry_tar("c", CHR, fmt=GNU, devmajor=2**40),
        "member 'c': devmajor 1099511627776 ",
        "0 to 4095",
    ),
    "gnu devminor 2**20": (
        lambda: one_entry_tar("c", CHR, fmt=GNU, devminor=2**20),
        "member 'c': devminor 1048576 ",
        "0 to 1048575",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_NUMBERS))
def test_bad_number_field_rejected(store, case):
    build, field, allowed = BAD_NUMBERS[case]
    store.create_layer("L")
    with pytest.raises(errors.BadArchive) as info:
        store.apply_diff("L", io.BytesIO(build()))
    message = str(info.value)
    assert message.startswith("layer L: invalid layer tar: ")
    assert field in message
    assert f"is outside the range {allowed}" in message
    assert store.changes("L") == []


def test_number_field_limits_accepted(store):
    times = {"mtime": "-9223372036.854775808", "atime": "9223372036.854775807"}
    raw = one_entry_tar(
        "c",
        CHR,
        uid=2**32 - 1,
        gid=2**32 - 1,
        devmajor=4095,
        devminor=2**20 - 1,
        pax_headers=times,
    )
    apply(store, "L", None, raw)
    number = store.get_layer("L").number
    attr = store.lookup(number, ROOT_INO, b"c")
    assert attr.uid == 2**32 - 1
    assert attr.gid == 2**32 - 1
    assert attr.rdev == os.makedev(4095, 2**20 - 1)
    assert attr.mtime_ns == -(2**63)
    assert attr.atime_ns == 2**63 - 1


def test_hard_link_leaving_layer_named(store):
    raw = one_entry_tar("h", LNK, linkname="../../etc/passwd")
    store.create_layer("L")
    with pytest.raises(errors.BadArchive) as info:
        store.apply_diff("L", io.BytesIO(raw))
    assert str(info.value) == (
        "layer L: member 'h': hard link target '../../etc/passwd' leaves the layer"
    )


def test_hard_link_to_directory_named(store):
    raw = make_tar([("d", DIR, {}), ("h", LNK, {"linkname": "d"})])
    store.create_layer("L")
    with pytest.raises(errors.BadArchive) as info:
        store.apply_diff("L", io.BytesIO(raw))
    assert str(info.value) == (
        "layer L: member 'h': hard link target 'd' is a directory,"
        " which cannot be hard-linked"
    )
    assert store.changes("L") == []


# Case: (the symlink's make_tar extra, the reason the error ends with).
BAD_SYMLINK_TARGETS = {
    "empty": ({"linkname": ""}, "it is empty"),
    "nul": ({"pax": {"linkpath": "a\0b"}}, "it contains a NUL byte"),
    "too long": ({"linkname": "t" * 4096}, "it is 4096 bytes long, over the limit of 4095"),
}


@pytest.mark.parametrize("case", sorted(BAD_SYMLINK_TARGETS))
def test_bad_symlink_target_rejected(store, case):
    extra, reason = BAD_SYMLINK_TARGETS[case]
    raw = make_tar([("keep", REG, {"data": b"1"}), ("s", SYM, extra)])
    store.create_layer("L")
    with pytest.raises(errors.BadArchive) as info:
        store.apply_diff("L", io.BytesIO(raw))
    message = str(info.value)
    assert message.startswith("layer L: member 's': invalid symbolic link target ")
    assert message.endswith(reason)
    assert store.changes("L") == []


def test_longest_symlink_target_accepted(store):
    target = "t" * 4095
    apply(store, "L", None, make_tar([("s", SYM, {"linkname": target})]))
    number = store.get_layer("L").number
    link = store.lookup(number, ROOT_INO, b"s")
    assert store.readlink(number, link.ino) == target.encode()


def hard_linked_image(store) -> tuple[int, int]:
    """Make layer ``img`` with d/a and its hard link d/b, and a container layer on it.

    Returns the container layer's number and the inode number of d.
    """
    apply(store, "img", None, make_tar([
        ("d", DIR, {}), ("d/a", REG, {"data": b"one\n"}), ("d/b", LNK, {"linkname": "d/a"}),
    ]))  # fmt: skip
    store.create_layer("ctr", "img")
    number = store.get_layer("ctr").number
    return number, store.lookup(number, ROOT_INO, b"d").ino


# Changes to the file behind d/b. Each test makes one before or after it
# removes d/a, the name that the inode records.
LINK_CHANGES = {
    "append": lambda store, number, ino: store.write(number, ino, 4, b"more\n"),
    "chmod": lambda store, number, ino: store.setattr(number, ino, mode=0o600),
    "chown": lambda store, number, ino: store.setattr(number, ino, uid=9, gid=9),
    "utimes": lambda store, number, ino: store.setattr(number, ino, mtime_ns=978_307_200 * 10**9),
}


@pytest.mark.parametrize("first", ["change", "unlink"])
@pytest.mark.parametrize("change", LINK_CHANGES)
def test_commit_keeps_change_through_remaining_link(store, change, first):
    number, d = hard_linked_image(store)
    ino = store.lookup(number, d, b"b").ino
    if first == "change":
        LINK_CHANGES[change](store, number, ino)
        store.unlink(number, d, b"a")
    else:
        store.unlink(number, d, b"a")
        LINK_CHANGES[change](store, number, ino)
    expected = store.getattr(number, ino)
    changes = dict(store.changes("ctr"))
    assert changes == {"/d": 0, "/d/a": 2, "/d/b": 0}
    apply(store, "committed", "img", b"".join(store.diff("ctr")))
    committed = store.get_layer("committed").number
    committed_d = store.lookup(committed, ROOT_INO, b"d")
    remaining = store.lookup(committed, committed_d.ino, b"b")
    with pytest.raises(errors.NotFound):
        store.lookup(committed, committed_d.ino, b"a")
    assert store.read(committed, remaining.ino, 0, 100) == store.read(number, ino, 0, 100)
    assert (remaining.mode, remaining.uid, remaining.gid, remaining.mtime_ns // 10**9) == (
        expected.mode, expected.uid, expected.gid, expected.mtime_ns // 10**9,
    )  # fmt: skip


def test_unlinking_first_link_leaves_other_unchanged(store):
    number, d = hard_linked_image(store)
    store.unlink(number, d, b"a")
    # Only the link count and ctime of d/b changed, which a file
    # comparison does not see, so overlay2 lists no change for it either.
    assert dict(store.changes("ctr")) == {"/d": 0, "/d/a": 2}


def test_changes_list_entries_of_replaced_directory(store):
    apply(store, "img", None, make_tar([
        ("o", DIR, {}), ("o/x", DIR, {}), ("o/x/y", REG, {"data": b"y"}),
        ("o/x/z", DIR, {}), ("o/x/z/deep", REG, {"data": b"deep"}),
    ]))  # fmt: skip
    store.create_layer("ctr", "img")
    number = store.get_layer("ctr").number
    o = store.lookup(number, ROOT_INO, b"o").ino
    x = store.lookup(number, o, b"x").ino
    z = store.lookup(number, x, b"z").ino
    store.unlink(number, z, b"deep")
    store.rmdir(number, x, b"z")
    store.unlink(number, x, b"y")
    store.rmdir(number, o, b"x")
    new_x = store.mkdir(number, o, b"x", 0o755).ino
    store.mknod(number, new_x, b"w", stat.S_IFREG | 0o644)
    store.mknod(number, new_x, b"y", stat.S_IFREG | 0o644)
    # As Docker's tree comparison: the old entries that are gone are
    # deleted, one level deep, and a new entry with an old name is modified.
    assert dict(store.changes("ctr")) == {
        "/o": 0, "/o/x": 0, "/o/x/w": 1, "/o/x/y": 0, "/o/x/z": 2,
    }  # fmt: skip
    names = [m.name for m in tarfile.open(fileobj=io.BytesIO(b"".join(store.diff("ctr"))))]
    assert "o/x/.wh..wh..opq" in names


def test_changes_list_entries_of_directory_moved_away(store):
    apply(store, "img", None, make_tar([
        ("o", DIR, {}), ("o/x", DIR, {}), ("o/x/y", REG, {"data": b"y"}),
    ]))  # fmt: skip
    store.create_layer("ctr", "img")
    number = store.get_layer("ctr").number
    store.rename(number, ROOT_INO, b"o", ROOT_INO, b"o2")
    new_o = store.mkdir(number, ROOT_INO, b"o", 0o755).ino
    store.mknod(number, new_o, b"new", stat.S_IFREG | 0o644)
    assert dict(store.changes("ctr")) == {
        "/o": 0, "/o/new": 1, "/o/x": 2, "/o2": 1, "/o2/x": 1, "/o2/x/y": 1,
    }  # fmt: skip


def test_changes_list_deletions_below_replaced_directory(store):
    apply(store, "img", None, make_tar([
        ("o", DIR, {}), ("o/sub", DIR, {}), ("o/sub/gone", REG, {"data": b"g"}),
        ("o/sub/deeper", DIR, {}), ("o/sub/deeper/gone", REG, {"data": b"g"}),
        ("p", DIR, {}), ("p/sub", DIR, {}), ("p/sub/deeper", DIR, {}),
    ]))  # fmt: skip
    store.create_layer("ctr", "img")
    number = store.get_layer("ctr").number
    store.rename(number, ROOT_INO, b"o", ROOT_INO, b"o2")
    store.rename(number, ROOT_INO, b"p", ROOT_INO, b"o")
    # As Docker's tree comparison: it compares the old and new "sub" and
    # "deeper" too, because both are directories at the same path.
    changes = dict(store.changes("ctr"))
    assert changes["/o/sub/gone"] == 2
    assert changes["/o/sub/deeper/gone"] == 2
    assert changes["/o/sub/deeper"] == 0


def test_diff_keeps_mtime_before_1970(store):
    store.create_layer("ctr", None)
    number = store.get_layer("ctr").number
    ino = store.mknod(number, ROOT_INO, b"old", stat.S_IFREG | 0o644).ino
    store.setattr(number, ino, mtime_ns=-3600_000_000_005)
    data = b"".join(store.diff("ctr"))
    member = tarfile.open(fileobj=io.BytesIO(data)).getmember("old")
    assert member.pax_headers["mtime"] == "-3600.000000005"
    apply(store, "committed", None, data)
    committed = store.get_layer("committed").number
    assert store.lookup(committed, ROOT_INO, b"old").mtime_ns == -3600_000_000_005


def test_opaque_directory_counts_only_its_own_subdirectories(store):
    apply(store, "img", None, make_tar([
        ("o", DIR, {}), ("o/x", DIR, {}), ("o/x/y", REG, {"data": b"y"}),
        ("o/z", DIR, {}), ("o/top", REG, {"data": b"t"}),
    ]))  # fmt: skip
    # A subdirectory before the marker (tar order), and one after it.
    apply(store, "L2", "img", make_tar([
        ("o", DIR, {}), ("o/+early", DIR, {}), ("o/.wh..wh..opq", REG, {}),
        ("o/late", DIR, {}),
    ]))  # fmt: skip
    apply(store, "L3", "img", make_tar([("o", DIR, {}), ("o/.wh..wh..opq", REG, {})]))
    for layer_id, expected in (("img", 4), ("L2", 4), ("L3", 2)):
        number = store.get_layer(layer_id).number
        assert store.lookup(number, ROOT_INO, b"o").nlink == expected, layer_id
    assert sorted(tree_of(store, "L2")) == [b"/o", b"/o/+early", b"/o/late"]


OPAQUE_BASE = [
    ("d", DIR, {}), ("d/sub", DIR, {}), ("d/sub/old", REG, {"data": b"old"}),
    ("d/f", REG, {"data": b"f"}), ("d/other", DIR, {}),
]  # fmt: skip


@pytest.mark.parametrize(
    "entries, expected, d_links",
    [
        ([("d/sub/new", REG, {"data": b"new"}), ("d/.wh..wh..opq", REG, {})],
         [b"/d", b"/d/sub", b"/d/sub/new"], 3),
        ([("d/sub/.wh.old", REG, {}), ("d/.wh..wh..opq", REG, {})],
         [b"/d", b"/d/sub"], 3),
        ([("h", LNK, {"linkname": "d/f"}), ("d/.wh..wh..opq", REG, {})],
         [b"/d", b"/h"], 2),
        ([("d/other/.wh.none", REG, {}), ("d/.wh..wh..opq", REG, {}),
          ("d/other/new", REG, {"data": b"new"})],
         [b"/d", b"/d/other", b"/d/other/new"], 3),
    ],
    ids=["entry added below", "entry removed below", "hard link", "walked before"],
)
def test_opaque_marker_after_changes_below(image, entries, expected, d_links):
    # overlay2 makes a changed subdirectory in the upper directory, so the
    # opaque marker does not hide it, and older entries below it stay hidden.
    with Store.open(image) as s:
        apply(s, "img", None, make_tar(OPAQUE_BASE))
        apply(s, "L", "img", make_tar(entries))
        tree = tree_of(s, "L")
        assert sorted(tree) == expected
        number = s.get_layer("L").number
        assert s.lookup(number, ROOT_INO, b"d").nlink == d_links
        if b"/h" in tree:
            assert tree[b"/h"][2] == b"f"
            assert s.lookup(number, ROOT_INO, b"h").nlink == 1
        # The layer's own diff, applied again, makes the same tree.
        s.create_layer("copy", "img")
        s.apply_diff("copy", io.BytesIO(b"".join(s.diff("L"))))
        assert tree_of(s, "copy") == tree
    assert fsck.main([image, "--no-progress", "--log-level", "WARNING"]) == 0


def test_opaque_marker_after_change_two_levels_below(store):
    # overlay2 makes d/sub/deep and d/sub in the upper directory for the
    # new file, so the marker on d hides neither.
    apply(store, "img", None, make_tar([
        ("d", DIR, {}), ("d/sub", DIR, {}), ("d/sub/deep", DIR, {}),
        ("d/sub/deep/old", REG, {"data": b"old"}), ("d/sub/gone", REG, {"data": b"g"}),
    ]))  # fmt: skip
    apply(store, "L", "img", make_tar([
        ("d/sub/deep/new", REG, {"data": b"new"}), ("d/.wh..wh..opq", REG, {}),
    ]))  # fmt: skip
    tree = tree_of(store, "L")
    assert sorted(tree) == [b"/d", b"/d/sub", b"/d/sub/deep", b"/d/sub/deep/new"]
    assert tree[b"/d/sub/deep/new"][2] == b"new"
    number = store.get_layer("L").number
    d = store.lookup(number, ROOT_INO, b"d")
    assert d.nlink == 3
    assert store.lookup(number, d.ino, b"sub").nlink == 3
    apply(store, "copy", "img", b"".join(store.diff("L")))
    assert tree_of(store, "copy") == tree


def test_entry_moved_away_and_back_is_no_change(store):
    apply(store, "img", None, make_tar([
        ("x", DIR, {}), ("x/sl", SYM, {"linkname": "target"}), ("x/f", REG, {"data": b"f"}),
    ]))  # fmt: skip
    store.create_layer("ctr", "img")
    number = store.get_layer("ctr").number
    x = store.lookup(number, ROOT_INO, b"x").ino
    for name in (b"sl", b"f"):
        store.rename(number, x, name, ROOT_INO, name + b"-away")
        store.rename(number, ROOT_INO, name + b"-away", x, name)
    # As Docker's tree comparison: only the directory, whose times changed.
    assert dict(store.changes("ctr")) == {"/x": 0}


def test_moved_directory_keeps_sibling_entries(store):
    apply(store, "img", None, make_tar([
        ("o", DIR, {}), ("o/x", DIR, {}), ("o/x/y", DIR, {}), ("o/x/y/f", REG, {"data": b"f"}),
        ("o/x/ylink", SYM, {"linkname": "y"}), ("o/x/g", REG, {"data": b"g"}),
    ]))  # fmt: skip
    store.create_layer("ctr", "img")
    number = store.get_layer("ctr").number
    store.rename(number, ROOT_INO, b"o", ROOT_INO, b"o2")
    o2 = store.lookup(number, ROOT_INO, b"o2").ino
    x = store.lookup(number, o2, b"x").ino
    # The rename inside x changes x itself, so x is listed before the walk
    # of the new o2 reaches it.
    store.rename(number, x, b"y", x, b"y2")
    changes = dict(store.changes("ctr"))
    assert changes["/o2/x/ylink"] == 1
    assert changes["/o2/x/g"] == 1
    apply(store, "committed", "img", b"".join(store.diff("ctr")))
    assert tree_of(store, "committed") == tree_of(store, "ctr")


@pytest.mark.parametrize("marker", ["d/.wh.a", "d/.wh..wh..opq"])
def test_removed_directory_drops_outside_links(store, marker):
    apply(store, "img", None, make_tar([
        ("c", REG, {"data": b"x"}), ("s", SYM, {"linkname": "t"}), ("twice", REG, {"data": b"t"}),
        ("d", DIR, {}), ("d/a", DIR, {}), ("d/a/c", LNK, {"linkname": "c"}),
        ("d/a/s", LNK, {"linkname": "s"}), ("d/a/deeper", DIR, {}),
        ("d/a/deeper/t1", LNK, {"linkname": "twice"}), ("d/a/deeper/t2", LNK, {"linkname": "twice"}),
    ]))  # fmt: skip
    apply(store, "L2", "img", make_tar([("d", DIR, {}), (marker, REG, {})]))
    number = store.get_layer("L2").number
    # As after `rm -r /d/a` in a container: the names left outside the
    # removed directory are the only links of their files.
    assert store.lookup(number, ROOT_INO, b"c").nlink == 1
    assert store.lookup(number, ROOT_INO, b"s").nlink == 1
    assert store.lookup(number, ROOT_INO, b"twice").nlink == 1
    store.create_layer("ctr", "L2")
    ctr = store.get_layer("ctr").number
    c = store.lookup(ctr, ROOT_INO, b"c")
    store.unlink(ctr, ROOT_INO, b"c")
    assert store.getattr(ctr, c.ino).nlink == 0


def test_commit_keeps_hard_linked_symlinks(store):
    apply(store, "img", None, make_tar([
        ("s", SYM, {"linkname": "target"}), ("d", DIR, {}), ("d/s2", LNK, {"linkname": "s"}),
    ]))  # fmt: skip
    store.create_layer("ctr", "img")
    number = store.get_layer("ctr").number
    link = store.lookup(number, ROOT_INO, b"s")
    store.setattr(number, link.ino, uid=7, gid=7)
    members = {m.name: m for m in tarfile.open(fileobj=io.BytesIO(b"".join(store.diff("ctr"))))}
    # The first name in tar order carries the symlink, the other links to it.
    assert members["d/s2"].issym()
    assert members["s"].islnk()
    assert members["s"].linkname == "d/s2"
    apply(store, "committed", "img", b"".join(store.diff("ctr")))
    committed = store.get_layer("committed").number
    first = store.lookup(committed, ROOT_INO, b"s")
    d = store.lookup(committed, ROOT_INO, b"d")
    second = store.lookup(committed, d.ino, b"s2")
    assert second.ino == first.ino
    assert first.nlink == 2
    assert first.uid == 7


def test_commit_keeps_directory_xattr_removal(store):
    apply(store, "img", None, make_tar([
        ("d", DIR, {"pax": {"SCHILY.xattr.user.gone": "1", "SCHILY.xattr.user.kept": "2"}}),
        ("d/f", REG, {"data": b"f"}),
    ]))  # fmt: skip
    store.create_layer("ctr", "img")
    number = store.get_layer("ctr").number
    d = store.lookup(number, ROOT_INO, b"d")
    store.removexattr(number, d.ino, b"user.gone")
    apply(store, "committed", "img", b"".join(store.diff("ctr")))
    committed = store.get_layer("committed").number
    d = store.lookup(committed, ROOT_INO, b"d")
    assert store.listxattr(committed, d.ino) == [b"user.kept"]
    assert store.getxattr(committed, d.ino, b"user.kept") == b"2"
    # The image's own layer keeps both.
    image = store.get_layer("img").number
    image_d = store.lookup(image, ROOT_INO, b"d")
    assert sorted(store.listxattr(image, image_d.ino)) == [b"user.gone", b"user.kept"]


def test_sizes_count_symlinks_like_overlay2(store):
    # overlay2 reports the lstat sizes of a layer's files but directories,
    # hard-linked files once: 3 + 4 + len("target") here.
    size = apply(store, "img", None, make_tar([
        ("f", REG, {"data": b"abc"}), ("f2", LNK, {"linkname": "f"}), ("d", DIR, {}),
        ("d/g", REG, {"data": b"defg"}), ("s", SYM, {"linkname": "target"}),
    ]))  # fmt: skip
    assert size == 13
    store.create_layer("ctr", "img")
    number = store.get_layer("ctr").number
    store.symlink(number, ROOT_INO, b"new", b"0123456789")
    store.write(number, store.lookup(number, ROOT_INO, b"f").ino, 3, b"d")
    assert store.diff_size("ctr") == 10 + 4


def test_opaque_marker_precedes_directory_entries(store):
    # "-x" sorts before ".wh..wh..opq", and the old directory had a "-x" too.
    apply(store, "img", None, make_tar([
        ("d", DIR, {}), ("d/-x", DIR, {}), ("d/-x/f", REG, {"data": b"f"}),
        ("d/old", REG, {"data": b"o"}),
    ]))  # fmt: skip
    store.create_layer("ctr", "img")
    number = store.get_layer("ctr").number
    d = store.lookup(number, ROOT_INO, b"d").ino
    dash_x = store.lookup(number, d, b"-x").ino
    store.unlink(number, dash_x, b"f")
    store.rmdir(number, d, b"-x")
    store.unlink(number, d, b"old")
    store.rmdir(number, ROOT_INO, b"d")
    new_d = store.mkdir(number, ROOT_INO, b"d", 0o755).ino
    new_x = store.mkdir(number, new_d, b"-x", 0o755).ino
    store.mknod(number, new_x, b"g", stat.S_IFREG | 0o644)
    data = b"".join(store.diff("ctr"))
    names = [m.name for m in tarfile.open(fileobj=io.BytesIO(data))]
    assert names.index("d/.wh..wh..opq") < names.index("d/-x")
    apply(store, "committed", "img", data)
    assert sorted(tree_of(store, "committed")) == [b"/d", b"/d/-x", b"/d/-x/g"]
