"""Run lcfs-fsck's work in a child process, so that an abort inside LMDB ends in exit 8.

py-lmdb bundles LMDB built with assertions, and some damaged pages fail one
(``mdb_page_search_root`` asserts that a branch page has more than one key),
which calls abort(3): Python cannot catch that. The parent forks a child
for the work, relays the child's stdout, stderr and log records, and turns
a death by signal into one line on stderr and exit 8. The parent never
opens the store, so it changes nothing on the device.
"""

from __future__ import annotations

import codecs
import ctypes
import faulthandler
import logging
import os
import pickle
import resource
import selectors
import signal
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass

from lcfs.store.format import read_superblock
from tools.fsck_records import damage_advice

# prctl(2) option from linux/prctl.h: the signal a child gets when its parent dies.
PR_SET_PDEATHSIG = 1
LENGTH = struct.Struct("<I")
# Signals that LMDB raises on a damaged page: abort(3) on a failed
# assertion, or a fault on a page number that points outside the map.
DAMAGE_SIGNALS = (signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS)
# LMDB prints a failed assertion as "<path>/mdb.c:<line>: Assertion ...".
LMDB_SOURCE = "mdb.c:"


@dataclass
class ChildResult:
    """The end of a child: its exit code or the signal that killed it, and LMDB's last assertion message."""

    code: int | None
    signal: int | None
    lmdb_message: str


class _RecordSender(logging.Handler):
    """Sends each log record, pickled with its message and traceback as text, to the parent."""

    def __init__(self, stream):
        super().__init__()
        self.stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            record.msg = record.getMessage()
            record.args = None
            if record.exc_info:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
                record.exc_info = None
            data = pickle.dumps(record)
            self.stream.write(LENGTH.pack(len(data)) + data)
            self.stream.flush()
        except Exception:  # noqa: BLE001 - a logging handler reports its errors and never raises
            self.handleError(record)


def run_in_child(work: Callable[[], int], failed: int) -> ChildResult:
    """Run ``work`` in a forked child and return how the child ended.

    ``failed`` is the exit code of a child whose ``work`` raised.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    pipes = [os.pipe() for _ in range(3)]
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        for reader, _ in pipes:
            os.close(reader)
        _child(work, failed, parent, *(writer for _, writer in pipes))
    for _, writer in pipes:
        os.close(writer)
    lmdb_message = _relay(*(reader for reader, _ in pipes))
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return ChildResult(None, os.WTERMSIG(status), lmdb_message)
    return ChildResult(os.waitstatus_to_exitcode(status), None, lmdb_message)


def _child(work, failed: int, parent: int, out: int, err: int, records: int):
    code = failed
    try:
        # A core dump of an abort would hold the whole LMDB map.
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        # Die with the parent, as the single process did before.
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(failed)
        os.dup2(out, 1)
        os.dup2(err, 2)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        if faulthandler.is_enabled():
            faulthandler.enable(sys.stderr)
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.addHandler(_RecordSender(open(records, "wb", closefd=False)))  # noqa: SIM115
        code = work()
    except BaseException:
        logging.getLogger("lcfs.fsck").exception("lcfs-fsck failed")
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _relay(out: int, err: int, records: int) -> str:
    """Copy the child's output to this process until the child closes its pipes.

    Returns the last line of the child's stderr that LMDB's source file
    names, or "".
    """
    decoders = {
        fd: codecs.getincrementaldecoder("utf-8")("replace") for fd in (out, err)
    }
    received = bytearray()
    line = ""
    lmdb_message = ""
    selector = selectors.DefaultSelector()
    for fd in (out, err, records):
        selector.register(fd, selectors.EVENT_READ)
    while selector.get_map():
        try:
            ready = selector.select()
        except KeyboardInterrupt:
            # A terminal sends SIGINT to the child too, and the child ends its own work.
            continue
        for key, _ in ready:
            chunk = os.read(key.fd, 65536)
            if not chunk:
                selector.unregister(key.fd)
                os.close(key.fd)
            elif key.fd == records:
                received += chunk
                _handle_records(received)
            else:
                text = decoders[key.fd].decode(chunk)
                stream = sys.stdout if key.fd == out else sys.stderr
                stream.write(text)
                stream.flush()
                if key.fd == err:
                    *complete, line = (line + text).split("\n")
                    for finished in complete:
                        if LMDB_SOURCE in finished:
                            lmdb_message = finished
                    # A progress bar redraws one line with \r and never ends it.
                    line = line[-4096:]
    selector.close()
    if LMDB_SOURCE in line:
        lmdb_message = line
    return lmdb_message.strip()


def _handle_records(received: bytearray) -> None:
    """Log every complete record in ``received`` here, and remove it from the buffer."""
    while len(received) >= LENGTH.size:
        (size,) = LENGTH.unpack_from(received)
        if len(received) < LENGTH.size + size:
            return
        record = pickle.loads(bytes(received[LENGTH.size : LENGTH.size + size]))
        del received[: LENGTH.size + size]
        logging.getLogger(record.name).handle(record)


def read_mark(device: str) -> bool | None:
    """Return whether the superblock of ``device`` is marked mid-repair, or None if it cannot be read.

    The read runs in a child too, because the damage that stopped the check
    may stop this read as well.
    """
    pid = os.fork()
    if pid == 0:
        code = 2
        try:
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            superblock = read_superblock(device)
            if superblock is not None:
                code = 1 if superblock.get("needs_fsck") else 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return {0: False, 1: True}.get(code)


def death_message(device: str, result: ChildResult) -> str:
    """Describe a child that a signal killed, with the state it left the store in."""
    name = signal.Signals(result.signal).name
    marked = read_mark(device)
    if marked:
        state = f"{device} stays marked as mid-repair, so the daemon will not open it"
    elif marked is False:
        state = f"{device} is not marked as mid-repair"
    else:
        state = f"the superblock of {device} is unreadable"
    if result.signal in DAMAGE_SIGNALS:
        reported = (
            f" after LMDB reported {result.lmdb_message!r}"
            if result.lmdb_message
            else ""
        )
        return (
            f"lcfs-fsck: the LMDB database on {device} appears damaged: the check "
            f"stopped with {name}{reported}; {state}. {damage_advice(device)}"
        )
    again = f"run 'lcfs-fsck --repair {device}'" if marked else "run lcfs-fsck again"
    return (
        f"lcfs-fsck: the check of {device} was stopped by {name}; {state}, so {again}"
    )
