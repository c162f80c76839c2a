"""The streaming tar reader against tarfile, member by member, on every dialect."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile

import pytest

from lcfs.store import errors, tarstream

ATTRIBUTES = ("name", "type", "mode", "uid", "gid", "size", "mtime", "linkname",
              "devmajor", "devminor", "pax_headers")  # fmt: skip


def read_all(members) -> list[tuple[dict, bytes]]:
    found = []
    for member, data in members:
        content = b""
        if member.isreg():
            while chunk := data.read(7000):
                content += chunk
        found.append(({name: getattr(member, name) for name in ATTRIBUTES}, content))
    return found


def with_tarfile(raw: bytes) -> list[tuple[dict, bytes]]:
    with tarfile.open(
        fileobj=io.BytesIO(raw), mode="r|", errors="surrogateescape"
    ) as archive:
        return read_all(
            (member, archive.extractfile(member) if member.isreg() else None)
            for member in archive
        )


def with_tarstream(raw: bytes, head: int = 0) -> list[tuple[dict, bytes]]:
    stream = io.BufferedReader(io.BytesIO(raw[head:]), buffer_size=1000)
    return read_all(tarstream.members(stream, raw[:head]))


def entry(name, kind=tarfile.REGTYPE, data=b"", **fields) -> tuple:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data)
    info.mtime = fields.pop("mtime", 1_700_000_000)
    for key, value in fields.items():
        setattr(info, key, value)
    return info, data


def archive(entries, fmt, **options) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt, errors="surrogateescape",
                      **options) as tar:  # fmt: skip
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data else None)
    return out.getvalue()


LONG = "deep/" * 30 + "name-longer-than-a-hundred-bytes.txt"
ENTRIES = [
    entry("etc", tarfile.DIRTYPE, mode=0o755),
    entry("etc/hosts", data=b"127.0.0.1 localhost\n", mode=0o644, uid=0, gid=0),
    entry("etc/empty", mode=0o600, uid=1000, gid=1000),
    entry("bin/sh", tarfile.SYMTYPE, linkname="busybox", mode=0o777),
    entry("bin/busybox", data=os.urandom(70_000), mode=0o4755),
    entry("bin/ls", tarfile.LNKTYPE, linkname="bin/busybox"),
    entry("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666),
    entry("dev/loop0", tarfile.BLKTYPE, devmajor=7, devminor=0, mode=0o660),
    entry("run/fifo", tarfile.FIFOTYPE, mode=0o644),
    entry(LONG, data=b"long name\n"),
    entry("link-with-long-target", tarfile.SYMTYPE, linkname=LONG),
    entry("caf\u00e9/\u65e5\u672c", data=b"utf-8 name\n"),
    entry("raw-\udce9-name", data=b"not utf-8\n"),
    entry("big-ids", data=b"x", uid=3_000_000, gid=4_000_000),
    entry("dir-with-slash/", tarfile.DIRTYPE),
    entry("zero-block-file", data=bytes(8192) + b"tail"),
]


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT],
                         ids=["gnu", "pax"])  # fmt: skip
def test_members_match_tarfile(fmt):
    raw = archive(ENTRIES, fmt)
    expected = with_tarfile(raw)
    assert len(expected) == len(ENTRIES)
    assert with_tarstream(raw) == expected
    assert with_tarstream(raw, head=512) == expected


def test_ustar_prefix_field():
    name = "a" * 90 + "/" + "b" * 90
    raw = archive([entry(name, data=b"split name")], tarfile.USTAR_FORMAT)
    assert raw[345:350] == b"aaaaa"
    assert with_tarstream(raw) == with_tarfile(raw)
    assert with_tarstream(raw)[0][0]["name"] == name


def test_pax_records_override_header_fields():
    info, data = entry("short", data=b"abc")
    info.pax_headers = {
        "path": "from/pax/" + "p" * 120,
        "mtime": "1700000000.123456789",
        "SCHILY.xattr.security.capability": "\x01\x00\x00\x02",
        "SCHILY.xattr.user.note": "caf\u00e9",
    }
    raw = archive([(info, data)], tarfile.PAX_FORMAT)
    found = with_tarstream(raw)
    assert found == with_tarfile(raw)
    assert found[0][0]["name"] == "from/pax/" + "p" * 120
    assert found[0][0]["pax_headers"]["mtime"] == "1700000000.123456789"


def pax_tar(records: bytes) -> bytes:
    """Return a tar of one member "short" after a PAX header of raw ``records``."""
    header = tarfile.TarInfo("PaxHeaders/short")
    header.type = tarfile.XHDTYPE
    header.size = len(records)
    member = tarfile.TarInfo("short")
    member.size = 3
    return (header.tobuf(tarfile.USTAR_FORMAT) + records + bytes(-len(records) % 512)
            + member.tobuf(tarfile.USTAR_FORMAT) + b"abc" + bytes(509) + bytes(1024))  # fmt: skip


def pax_record(key: str, value: str) -> bytes:
    """Return one well-formed PAX record, whose length counts its own digits."""
    body = f" {key}={value}\n".encode()
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length += 1
    return str(length).encode() + body


# Each is a PAX header that Go's archive/tar, which Docker uses, rejects.
BAD_PAX_RECORDS = {
    "length past the end": (b"99 path=x/very/long\n", "invalid PAX record"),
    "length too short": (b"5 path=abc\n", "invalid PAX record"),
    "no newline": (b"13 path=abcd", "invalid PAX record"),
    "garbage after record": (pax_record("path", "good") + b"garbage\n",
                             "invalid PAX record 'garbage"),
    "NUL in key": (b"11 pa\0th=x\n", "invalid PAX record"),
    "uid not a number": (pax_record("uid", "1000x"), "the PAX record uid '1000x' is not a number"),
    "size not a number": (pax_record("size", "3k"), "the PAX record size '3k' is not a number"),
    "mtime not a number": (pax_record("mtime", "noon"),
                           "the PAX record mtime 'noon' is not a number"),
}


@pytest.mark.parametrize("case", sorted(BAD_PAX_RECORDS))
def test_bad_pax_records_rejected(case):
    records, problem = BAD_PAX_RECORDS[case]
    with pytest.raises(errors.BadArchive) as info:
        read_all(tarstream.members(io.BytesIO(pax_tar(records))))
    assert str(info.value).startswith("corrupt tar header: ")
    assert problem in str(info.value)


def test_pax_record_with_empty_value_keeps_header():
    # In the pax format an empty value removes the record, so the ustar name stays.
    records = pax_record("path", "") + pax_record("uid", "")
    found = read_all(tarstream.members(io.BytesIO(pax_tar(records))))
    assert [(fields["name"], fields["uid"], content) for fields, content in found] == [
        ("short", 0, b"abc")
    ]


def test_global_pax_header_reaches_later_members():
    raw = archive(ENTRIES[:3], tarfile.PAX_FORMAT,
                  pax_headers={"comment": "global", "uid": "77"})  # fmt: skip
    found = with_tarstream(raw)
    assert found == with_tarfile(raw)
    assert [fields["uid"] for fields, _ in found] == [77, 77, 77]


def test_v7_directory_and_no_end_blocks():
    raw = archive([entry("old/", tarfile.AREGTYPE), entry("old/f", data=b"v7")],
                  tarfile.GNU_FORMAT)  # fmt: skip
    without_end = raw[: 512 * 4]
    assert with_tarstream(without_end) == with_tarfile(without_end)
    assert with_tarstream(without_end)[0][0]["type"] == tarfile.DIRTYPE


def test_unread_content_is_skipped():
    raw = archive(ENTRIES, tarfile.PAX_FORMAT)
    names = [member.name for member, _ in tarstream.members(io.BytesIO(raw))]
    assert names == [fields["name"] for fields, _ in with_tarfile(raw)]


DAMAGE = {
    "checksum": "bad checksum",
    "number": "invalid number field",
    "truncated header": "truncated header",
    "extended header at the end": "tar ends after an extended header",
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_corrupt_headers_are_named(damage):
    raw = bytearray(archive(ENTRIES[:2], tarfile.PAX_FORMAT))
    second = 512  # the directory has no content, so the file's header follows
    if damage == "checksum":
        raw[second] ^= 0x55
    elif damage == "number":
        raw[second + 124 : second + 136] = b"not octal!!\0"
        raw[second + 148 : second + 156] = b"%06o\0 " % _checksum(
            raw[second : second + 512]
        )
    elif damage == "truncated header":
        raw = raw[: second + 100]
    else:
        # A name longer than 100 bytes needs a PAX header before its member.
        extended = archive([entry("p" * 150, data=b"")], tarfile.PAX_FORMAT)
        assert extended[156:157] == tarfile.XHDTYPE
        raw = raw[:second] + extended[:1024]
    with pytest.raises(errors.BadArchive) as info:
        read_all(tarstream.members(io.BytesIO(bytes(raw))))
    assert DAMAGE[damage] in str(info.value)


def _checksum(header: bytes) -> int:
    return sum(header[:148]) + 256 + sum(header[156:])


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar")
@pytest.mark.parametrize("fmt", ["gnu", "pax"])
def test_sparse_members_go_through_tarfile(tmp_path, fmt):
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "before").write_bytes(b"plain file before the sparse one")
    with open(tree / "sparse", "wb") as f:
        f.write(b"head")
        f.seek(4 << 20)
        f.write(b"tail")
    (tree / "after").write_bytes(b"plain file after it")
    out = tmp_path / "sparse.tar"
    subprocess.run(["tar", "--sparse", f"--format={fmt}", "-cf", str(out), "-C", str(tree),
                    "before", "sparse", "after"], check=True)  # fmt: skip
    raw = out.read_bytes()
    found = with_tarstream(raw)
    assert [fields["name"] for fields, _ in found] == ["before", "sparse", "after"]
    contents = {fields["name"]: content for fields, content in found}
    assert contents["sparse"] == b"head" + bytes((4 << 20) - 4) + b"tail"
    assert contents["after"] == b"plain file after it"


@pytest.mark.parametrize("size", [-1, (1 << 20) + 1], ids=["negative", "over 1 MiB"])
def test_extended_header_size_checked(size):
    info, data = entry("f")
    info.pax_headers = {"comment": "x"}
    raw = bytearray(archive([(info, data)], tarfile.PAX_FORMAT))
    assert raw[156:157] == tarfile.XHDTYPE
    # GNU base-256: a leading 0x80 marks a positive number, 0xff a negative one.
    if size < 0:
        raw[124:136] = size.to_bytes(12, "big", signed=True)
    else:
        raw[124:136] = b"\x80" + size.to_bytes(11, "big")
    raw[148:156] = b"%06o\0 " % _checksum(raw[:512])
    with pytest.raises(errors.BadArchive) as info:
        read_all(tarstream.members(io.BytesIO(bytes(raw))))
    expected = f"extended header size {size} is out of range 0 to 1048576"
    assert expected in str(info.value)


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar")
def test_numbers_checked_after_sparse_member(tmp_path):
    sparse = tmp_path / "sparse"
    with open(sparse, "wb") as f:
        f.seek(1 << 20)
        f.write(b"tail")
    out = tmp_path / "sparse.tar"
    command = ["tar", "--sparse", "--format=pax", "-cf", str(out), "-C", str(tmp_path)]
    subprocess.run([*command, "sparse"], check=True)
    first = out.read_bytes().rstrip(b"\0")
    first += bytes(-len(first) % 512)
    raw = first + archive([entry("big-uid", uid=2**70)], tarfile.PAX_FORMAT)
    found = []
    with pytest.raises(errors.BadArchive) as info:
        for member, _ in tarstream.members(io.BytesIO(raw)):
            found.append(member.name)
    assert found == ["sparse"]
    assert f"member 'big-uid': uid {2**70} is outside the range" in str(info.value)


def split_first_header(raw: bytes) -> tuple[bytes, bytes]:
    """Return the first header of ``raw`` with its content blocks, and the rest."""
    size = int(raw[124:136].rstrip(b"\0 ") or b"0", 8)
    end = tarfile.BLOCKSIZE + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    return raw[:end], raw[end:]


@pytest.mark.parametrize("kind", [tarfile.XHDTYPE, tarfile.XGLTYPE], ids=["pax", "global"])
def test_held_extended_headers_bounded(kind):
    comment = {"comment": "c" * 1_000_000}
    if kind == tarfile.XHDTYPE:
        raw = archive([entry("f", data=b"x", pax_headers=comment)], tarfile.PAX_FORMAT)
    else:
        raw = archive([entry("f", data=b"x")], tarfile.PAX_FORMAT, pax_headers=comment)
    header, rest = split_first_header(raw)
    assert header[156:157] == kind
    # Four headers of about 1 MB each fit under the bound of 4 MiB, five do not.
    within = header * 4 + rest
    assert with_tarstream(within) == with_tarfile(within)
    with pytest.raises(errors.BadArchive) as info:
        read_all(tarstream.members(io.BytesIO(header * 5 + rest)))
    assert str(info.value) == (
        "invalid layer tar: the global headers and the extended headers before"
        f" one member take more than {4 << 20} bytes"
    )


def test_skipped_content_cut_off_named():
    raw = archive([entry(".wh.gone", data=b"w" * 2000), entry("after", data=b"a")],
                  tarfile.PAX_FORMAT)  # fmt: skip
    assert raw[156:157] == tarfile.REGTYPE
    names = []
    with pytest.raises(errors.BadArchive) as info:
        # The content is left unread, as the applier leaves a whiteout's.
        for member, _ in tarstream.members(io.BytesIO(raw[: 512 + 1000])):
            names.append(member.name)
    assert names == [".wh.gone"]
    assert str(info.value) == "tar ends inside '.wh.gone'"


def test_data_after_single_zero_block_rejected():
    first = archive([entry("first", data=b"1")], tarfile.PAX_FORMAT)[:1024]
    second = archive([entry("second", data=b"2")], tarfile.PAX_FORMAT)
    names = []
    with pytest.raises(errors.BadArchive) as info:
        for member, _ in tarstream.members(io.BytesIO(first + bytes(512) + second)):
            names.append(member.name)
    assert names == ["first"]
    assert "a zero block is followed by data" in str(info.value)


@pytest.mark.parametrize("end", [b"", bytes(512), bytes(100), bytes(1024) + b"garbage"],
                         ids=["stream end", "zero block", "short zero block", "garbage after end"])  # fmt: skip
def test_single_zero_block_then_end_accepted(end):
    first = archive([entry("first", data=b"1")], tarfile.PAX_FORMAT)[:1024]
    names = [member.name for member, _ in tarstream.members(io.BytesIO(first + bytes(512) + end))]
    assert names == ["first"]


def test_padding_cut_off_ends_archive():
    raw = archive([entry("f", data=b"x" * 100)], tarfile.PAX_FORMAT)
    found = with_tarstream(raw[: 512 + 100])
    assert [(fields["name"], content) for fields, content in found] == [("f", b"x" * 100)]
