"""Build and install pyfuse3 with the kernel caches and the request loop lcfs uses.

pyfuse3 3.5 gives a filesystem no way to set two things the kernel's FUSE
client offers:

- FUSE_CAP_CACHE_SYMLINKS in the init reply, which lets the kernel keep
  symlink targets in its page cache instead of sending READLINK on every
  path walk through a symlink;
- a directory listing without opendir. When opendir returns ENOSYS, a
  kernel that offers FUSE_CAP_NO_OPENDIR_SUPPORT stops sending opendir
  and releasedir and keeps every listing in its cache (FOPEN_CACHE_DIR,
  FOPEN_KEEP_CACHE). Other kernels treat that ENOSYS as an error
  (libfuse's fuse_common.h). The readdir requests then carry file handle
  0, and pyfuse3 passes the handler only the file handle, never the
  directory's inode. The init handler sets ``kernel_skips_opendir`` on
  the filesystem object when the kernel offers the capability.

This script downloads the pyfuse3 source release of ``VERSION``, changes
those two handlers, adds the request functions below, and installs
the result with pip, replacing the installed pyfuse3. The changed handlers
check the filesystem object first (``enable_symlink_cache``, and a
``readdir_node(inode, start_id, token)`` method called for handle 0), so
any other pyfuse3 filesystem behaves as before. The module gets
``LCFS_PATCH_LEVEL``, which lcfs checks at mount time. Each edit checks
that the text it replaces is there, so a different pyfuse3 release fails
here, by name, instead of building wrong.

The module also gets ``lcfs_session_fd()`` and ``lcfs_process_one()``.
The second reads one request from the FUSE device and runs its handler's
coroutine to the end on the calling thread, without trio, and raises
RuntimeError if the handler waits. lcfs's handlers do not wait unless
invalidate-on-close is on, so a plain loop around it serves them with
about a third less CPU per request than pyfuse3's trio loop
(``lcfs.fuse.mount``).

Last, ``lcfs_want_init_flags(flags)`` puts a read and a write function of
its own between libfuse and the FUSE device (``fuse_session_custom_io``).
They add the given flags to libfuse's reply to the kernel's INIT request
when the kernel offered them, because libfuse 3.14 sends only the flags it
defines. lcfs requests FUSE_HANDLE_KILLPRIV_V2 this way, because without
it the kernel sends a getattr before every chown. ``lcfs_init_flags()``
returns the flags the kernel offered and the flags of the reply.

The same read function serves a filesystem whose open and create return
ENOSYS, after which the kernel opens files without asking and sends
READ and WRITE with file handle 0. After ``lcfs_serve_without_opens()``
it puts the request's node id in place of handle 0, and leaves atomic
O_TRUNC out of the init reply, so that an open with O_TRUNC arrives as a
SETATTR. pyfuse3 passes the write handler no request context, so
``lcfs_write_context()`` returns the uid, gid, pid and write flags of
the last WRITE request read.

pyfuse3 3.5 has no handlers for FALLOCATE and LSEEK, so libfuse replies
to them with ENOSYS and the kernel stops sending them. The build adds both
to libfuse's operation table. They call the filesystem's
``fallocate(inode, mode, offset, length, ctx)`` and ``lseek(inode, offset,
whence)``, and reply ENOSYS as before when the filesystem has no such
method.

pyfuse3 3.5 checks setxattr's XATTR_CREATE and XATTR_REPLACE flags
itself, and with both flags set it checks only the first. The build checks
both, so such a call fails with EEXIST or ENODATA as on ext4 and tmpfs.

Usage: python3 scripts/build_pyfuse3.py [--python PYTHON] [--check]
(--check only tells, by exit status 0 or 1, whether the build is needed.)
``lcfs plugin-bundle`` calls ``build_wheel`` for the plugin's own pyfuse3.
Needs libfuse3-dev, pkg-config and a C compiler; pip fetches Cython and
setuptools for the build from the package index.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

VERSION = "3.5.0"

# (file inside the source tree, text that must be there once, replacement)
EDITS = [
    (
        "Include/fuse_common.pxd",
        "      FUSE_CAP_HANDLE_KILLPRIV\n",
        "      FUSE_CAP_HANDLE_KILLPRIV\n      FUSE_CAP_CACHE_SYMLINKS\n"
        "      FUSE_CAP_NO_OPENDIR_SUPPORT\n",
    ),
    (
        "src/pyfuse3/handlers.pxi",
        "    # Blocking rather than async, in case we decide to let the\n",
        "    if (getattr(operations, 'enable_symlink_cache', False) and\n"
        "        conn.capable & FUSE_CAP_CACHE_SYMLINKS):\n"
        "        conn.want |= FUSE_CAP_CACHE_SYMLINKS\n"
        "    if (hasattr(operations, 'readdir_node') and\n"
        "        conn.capable & FUSE_CAP_NO_OPENDIR_SUPPORT):\n"
        "        operations.kernel_skips_opendir = True\n\n"
        "    # Blocking rather than async, in case we decide to let the\n",
    ),
    (
        "src/pyfuse3/handlers.pxi",
        "    c.off = off\n    c.fh = fi.fh\n    save_retval(fuse_readdirplus_async(c))\n",
        "    c.off = off\n    c.fh = fi.fh\n    c.ino = ino\n"
        "    save_retval(fuse_readdirplus_async(c))\n",
    ),
    (
        "src/pyfuse3/handlers.pxi",
        "        await operations.readdir(c.fh, c.off, token)\n",
        "        if c.fh == 0 and hasattr(operations, 'readdir_node'):\n"
        "            await operations.readdir_node(c.ino, c.off, token)\n"
        "        else:\n"
        "            await operations.readdir(c.fh, c.off, token)\n",
    ),
    (
        "Include/fuse_lowlevel.pxd",
        "        void (*poll) (fuse_req_t req, fuse_ino_t ino, fuse_file_info *fi,\n"
        "                      fuse_pollhandle *ph) except *\n",
        "        void (*poll) (fuse_req_t req, fuse_ino_t ino, fuse_file_info *fi,\n"
        "                      fuse_pollhandle *ph) except *\n"
        "        void (*lseek) (fuse_req_t req, fuse_ino_t ino, off_t off, int whence,\n"
        "                       fuse_file_info *fi) except *\n",
    ),
    (
        "Include/fuse_lowlevel.pxd",
        "    int fuse_reply_write(fuse_req_t req, size_t count)\n",
        "    int fuse_reply_write(fuse_req_t req, size_t count)\n"
        "    int fuse_reply_lseek(fuse_req_t req, off_t off)\n",
    ),
    (
        "src/pyfuse3/internal.pxi",
        "    fuse_ops.poll = fuse_poll\n",
        "    fuse_ops.poll = fuse_poll\n"
        "    fuse_ops.fallocate = _lcfs_fallocate\n"
        "    fuse_ops.lseek = _lcfs_lseek\n",
    ),
    (
        "src/pyfuse3/handlers.pxi",
        "        elif c.flags & libc_extra.XATTR_REPLACE: # Attribute must exist\n",
        "        if c.flags & libc_extra.XATTR_REPLACE: # Attribute must exist\n",
    ),
]

# Appended to src/pyfuse3/__init__.pyx, whose globals it uses.
LOOP_SOURCE = '''

cdef fuse_buf _lcfs_buf


def lcfs_session_fd():
    """Return the FUSE device descriptor of the mounted session."""
    return session_fd


def lcfs_process_one():
    """Read one request from the FUSE device and process it on this thread.

    Call it when the device is readable. Returns False once the session
    has ended. The handler's coroutine runs to its end here, outside
    trio, so it must not wait for anything.
    """
    cdef int res
    if session == NULL or fuse_session_exited(session):
        return False
    res = fuse_session_receive_buf(session, &_lcfs_buf)
    if res == -errno.EINTR or res == -errno.EAGAIN:
        return True
    if res < 0:
        raise OSError(-res, 'fuse_session_receive_buf failed with '
                      + strerror(-res))
    if res == 0:
        return False
    save_retval(None)
    fuse_session_process_buf(session, &_lcfs_buf)
    if py_retval is not None:
        coroutine = py_retval
        save_retval(None)
        try:
            coroutine.send(None)
        except StopIteration:
            pass
        else:
            coroutine.close()
            raise RuntimeError('a pyfuse3 handler waited inside lcfs_process_one')
    return True


from posix.uio cimport iovec, writev
from libc.stdint cimport int32_t, uint64_t
from libc.string cimport memset

cdef extern from "<fuse_lowlevel.h>" nogil:
    struct fuse_custom_io:
        ssize_t (*writev)(int fd, iovec *iov, int count, void *userdata)
        ssize_t (*read)(int fd, void *buf, size_t buf_len, void *userdata)
    int fuse_session_custom_io(fuse_session *se, const fuse_custom_io *io, int fd)

cdef enum:
    _LCFS_OPCODE_READ = 15
    _LCFS_OPCODE_WRITE = 16
    _LCFS_OPCODE_INIT = 26
    # fuse_in_header: len, opcode, unique (u64), nodeid (u64), uid, gid,
    # pid, then 4 more bytes: 40 in all.
    _LCFS_IN_NODEID = 16
    _LCFS_IN_UID = 24
    _LCFS_IN_GID = 28
    _LCFS_IN_PID = 32
    # fuse_read_in and fuse_write_in start with the file handle (u64), and
    # the write_flags of fuse_write_in follow its offset (u64) and size.
    _LCFS_IN_FH = 40
    _LCFS_WRITE_IN_FLAGS = 40 + 20
    # The flags of fuse_init_in are its 4th word.
    _LCFS_INIT_IN_FLAGS = 40 + 12
    # The kernel's FUSE_ATOMIC_O_TRUNC init flag.
    _LCFS_ATOMIC_O_TRUNC = 1 << 3

cdef fuse_custom_io _lcfs_io
cdef uint32_t _lcfs_extra_flags = 0
cdef uint32_t _lcfs_cleared_flags = 0
cdef bint _lcfs_node_handles = False
cdef uint32_t _lcfs_write_uid = 0
cdef uint32_t _lcfs_write_gid = 0
cdef uint32_t _lcfs_write_pid = 0
cdef uint32_t _lcfs_write_flags = 0
cdef uint32_t _lcfs_offered_flags = 0
cdef uint32_t _lcfs_reply_flags = 0
cdef uint64_t _lcfs_init_unique = 0
cdef bint _lcfs_init_pending = False


cdef ssize_t _lcfs_read(int fd, void *buf, size_t size, void *userdata) noexcept nogil:
    global _lcfs_init_unique, _lcfs_offered_flags, _lcfs_init_pending
    global _lcfs_write_uid, _lcfs_write_gid, _lcfs_write_pid, _lcfs_write_flags
    cdef ssize_t res = unistd.read(fd, buf, size)
    cdef char *data = <char*> buf
    cdef uint32_t opcode
    cdef uint64_t *fh
    if res < _LCFS_IN_FH + 8:
        return res
    opcode = (<uint32_t*> (data + 4))[0]
    if opcode == _LCFS_OPCODE_READ or opcode == _LCFS_OPCODE_WRITE:
        fh = <uint64_t*> (data + _LCFS_IN_FH)
        if _lcfs_node_handles and fh[0] == 0:
            fh[0] = (<uint64_t*> (data + _LCFS_IN_NODEID))[0]
        if opcode == _LCFS_OPCODE_WRITE and res >= _LCFS_WRITE_IN_FLAGS + 4:
            _lcfs_write_flags = (<uint32_t*> (data + _LCFS_WRITE_IN_FLAGS))[0]
            _lcfs_write_uid = (<uint32_t*> (data + _LCFS_IN_UID))[0]
            _lcfs_write_gid = (<uint32_t*> (data + _LCFS_IN_GID))[0]
            _lcfs_write_pid = (<uint32_t*> (data + _LCFS_IN_PID))[0]
    elif res >= _LCFS_INIT_IN_FLAGS + 4 and opcode == _LCFS_OPCODE_INIT:
        _lcfs_init_unique = (<uint64_t*> (data + 8))[0]
        _lcfs_offered_flags = (<uint32_t*> (data + _LCFS_INIT_IN_FLAGS))[0]
        _lcfs_init_pending = True
    return res


cdef ssize_t _lcfs_writev(int fd, iovec *iov, int count, void *userdata) noexcept nogil:
    global _lcfs_init_pending, _lcfs_reply_flags
    cdef char *header
    cdef uint32_t *init_out
    if _lcfs_init_pending and count >= 2 and iov[0].iov_len >= 16:
        header = <char*> iov[0].iov_base
        if (<uint64_t*> (header + 8))[0] == _lcfs_init_unique:
            _lcfs_init_pending = False
            if (<int32_t*> (header + 4))[0] == 0 and iov[1].iov_len >= 16:
                # fuse_init_out: major, minor, max_readahead, flags.
                init_out = <uint32_t*> iov[1].iov_base
                init_out[3] |= _lcfs_extra_flags & _lcfs_offered_flags
                init_out[3] &= ~_lcfs_cleared_flags
                _lcfs_reply_flags = init_out[3]
    return writev(fd, iov, count)


def lcfs_want_init_flags(uint32_t flags):
    """Request protocol flags that libfuse leaves out of its init reply.

    ``flags`` are bits of the kernel's fuse_init_out.flags. Each is added
    to the reply when the kernel offered it. Call this after init() and
    before the first request is read. ``lcfs_init_flags`` returns the outcome.
    """
    global _lcfs_extra_flags
    cdef int res
    if session == NULL:
        raise RuntimeError('lcfs_want_init_flags needs a mounted session')
    _lcfs_extra_flags = flags
    memset(&_lcfs_io, 0, sizeof(_lcfs_io))
    _lcfs_io.read = _lcfs_read
    _lcfs_io.writev = _lcfs_writev
    res = fuse_session_custom_io(session, &_lcfs_io, session_fd)
    if res != 0:
        raise OSError(-res, 'fuse_session_custom_io failed with ' + strerror(-res))


def lcfs_init_flags():
    """Return the kernel's offered init flags and the flags of the reply sent."""
    return _lcfs_offered_flags, _lcfs_reply_flags


def lcfs_serve_without_opens():
    """Prepare the session for a filesystem whose open and create return ENOSYS.

    The kernel then opens files without asking and sends READ and WRITE
    with file handle 0. From now on such a request reaches the handler
    with the node id as its file handle. The init reply leaves out atomic
    O_TRUNC, so that the kernel sends a SETATTR for an open with O_TRUNC
    instead of leaving the truncate to the open it no longer sends. Call
    this before ``lcfs_want_init_flags``, which puts the request hooks in place.
    """
    global _lcfs_node_handles, _lcfs_cleared_flags
    _lcfs_node_handles = True
    _lcfs_cleared_flags |= _LCFS_ATOMIC_O_TRUNC


def lcfs_write_context():
    """Return (uid, gid, pid, write_flags) of the last WRITE request read."""
    return _lcfs_write_uid, _lcfs_write_gid, _lcfs_write_pid, _lcfs_write_flags


cdef void _lcfs_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset,
                          off_t length, fuse_file_info *fi):
    cdef _Container c = _Container()
    c.req = req
    c.ino = ino
    c.flags = mode
    c.off = offset
    c.size = <size_t> length
    save_retval(_lcfs_fallocate_async(c))

async def _lcfs_fallocate_async(_Container c):
    cdef int ret
    if not hasattr(operations, 'fallocate'):
        # As without a handler: the kernel stops sending FALLOCATE.
        ret = fuse_reply_err(c.req, errno.ENOSYS)
    else:
        try:
            await operations.fallocate(c.ino, c.flags, c.off, c.size,
                                       get_request_context(c.req))
        except FUSEError as e:
            ret = fuse_reply_err(c.req, e.errno)
        else:
            ret = fuse_reply_err(c.req, 0)
    if ret != 0:
        log.error('fuse_fallocate(): fuse_reply_* failed with %s', strerror(-ret))


cdef void _lcfs_lseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence,
                      fuse_file_info *fi):
    cdef _Container c = _Container()
    c.req = req
    c.ino = ino
    c.off = off
    c.flags = whence
    save_retval(_lcfs_lseek_async(c))

async def _lcfs_lseek_async(_Container c):
    cdef int ret
    cdef off_t found
    if not hasattr(operations, 'lseek'):
        ret = fuse_reply_err(c.req, errno.ENOSYS)
    else:
        try:
            found = await operations.lseek(c.ino, c.off, c.flags)
        except FUSEError as e:
            ret = fuse_reply_err(c.req, e.errno)
        else:
            ret = fuse_reply_lseek(c.req, found)
    if ret != 0:
        log.error('fuse_lseek(): fuse_reply_* failed with %s', strerror(-ret))
'''

# Raised whenever EDITS or LOOP_SOURCE change; lcfs uses them only at this level.
PATCH_LEVEL = 9
MARKER = f"\n# Set by lcfs's pyfuse3 build.\nLCFS_PATCH_LEVEL = {PATCH_LEVEL}\n"
CHECK = (
    "import sys, pyfuse3; "
    f"sys.exit(getattr(pyfuse3, 'LCFS_PATCH_LEVEL', 0) < {PATCH_LEVEL})"
)


def run(*command: str) -> None:
    log.info("running %s", " ".join(command))
    subprocess.run(command, check=True)


def is_current(python: str = sys.executable) -> bool:
    """Tell whether ``python`` imports a pyfuse3 of this build."""
    return subprocess.run([python, "-c", CHECK]).returncode == 0


def patched_source(work_dir: Path, python: str = sys.executable) -> Path:
    """Download the pyfuse3 source release into ``work_dir`` and change it; return its tree."""
    run(python, "-m", "pip", "download", "--quiet", "--no-deps",
        "--no-binary", "pyfuse3", "--dest", str(work_dir), f"pyfuse3=={VERSION}")  # fmt: skip
    archives = list(work_dir.glob("pyfuse3-*.tar.gz"))
    if len(archives) != 1:
        raise SystemExit(f"pyfuse3 build: pip left {archives} in {work_dir}")
    with tarfile.open(archives[0]) as archive:
        archive.extractall(work_dir, filter="data")
    tree = work_dir / f"pyfuse3-{VERSION}"
    patch(tree)
    return tree


def build_wheel(wheel_dir: Path, python: str = sys.executable) -> Path:
    """Build a wheel of the changed pyfuse3 for ``python`` into ``wheel_dir``; return it."""
    with tempfile.TemporaryDirectory(prefix="lcfs-pyfuse3-") as work:
        tree = patched_source(Path(work), python)
        run(python, "-m", "pip", "wheel", "--quiet", "--no-deps",
            "--wheel-dir", str(wheel_dir), str(tree))  # fmt: skip
    wheels = list(wheel_dir.glob(f"pyfuse3-{VERSION}-*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"pyfuse3 build: pip left {wheels} in {wheel_dir}")
    return wheels[0]


def patch(tree: Path) -> None:
    for relative, old, new in EDITS:
        path = tree / relative
        text = path.read_text()
        if text.count(old) != 1:
            raise SystemExit(
                f"pyfuse3 build: {relative} of pyfuse3 {VERSION} does not hold "
                f"{old.strip()!r} exactly once; this script fits pyfuse3 {VERSION} only"
            )
        path.write_text(text.replace(old, new))
    init = tree / "src/pyfuse3/__init__.pyx"
    init.write_text(init.read_text() + LOOP_SOURCE + MARKER)
    # The release ships the C file Cython made from the unchanged sources.
    (tree / "src/pyfuse3/__init__.c").unlink(missing_ok=True)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter whose pyfuse3 is replaced (default: this one)")  # fmt: skip
    parser.add_argument("--check", action="store_true",
                        help="exit 0 if the installed pyfuse3 is this build, 1 if not")  # fmt: skip
    args = parser.parse_args()
    if args.check:
        return 0 if is_current(args.python) else 1
    with tempfile.TemporaryDirectory(prefix="lcfs-pyfuse3-") as work:
        tree = patched_source(Path(work), args.python)
        run(args.python, "-m", "pip", "install", "--quiet", "--no-deps",
            "--force-reinstall", str(tree))  # fmt: skip
    if not is_current(args.python):
        raise SystemExit("pyfuse3 build: the installed pyfuse3 is not this build")
    log.info("pyfuse3 %s with kernel symlink and directory caching and the plain "
             "request loop installed (patch level %d)", VERSION, PATCH_LEVEL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
