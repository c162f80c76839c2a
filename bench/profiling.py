"""Profiles of the lcfs daemon with py-spy, summarised as the top functions.

``PySpy.recording(key)`` attaches `py-spy record --format raw` to the
daemon for the length of a block and stops it with SIGINT, which makes
py-spy write the collapsed stacks it sampled. ``summarize_raw`` turns
those into the functions with the largest share of samples, by own time
(the frame on top of the stack) and by inclusive time (anywhere on it).
Samples of idle threads are not recorded, so the shares are of the time
the daemon's threads spent running or waiting for the GIL.
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

SAMPLE_RATE = 200
TOP = 12

# Functions in which a thread waits for work rather than runs. py-spy's idle
# detection misses some of them with --nonblocking, so samples whose top
# frame is one of these are counted as waiting and left out of the shares.
WAITING = frozenset(
    {
        "select",
        "get_events",
        "_epoll_wait",
        "wait",
        "sleep",
        "_wait_for_tstate_lock",
        "_worker",
        "_wait_for_request",
    }
)

# One frame of py-spy's raw output: "function (file.py:line)".
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^():]+)(?::\d+)?\)$")


class PySpy:
    """Records py-spy profiles of one process into ``directory``, one file per key."""

    def __init__(self, pid: int, directory: Path):
        self.pid = pid
        self.directory = directory
        self.summaries: dict[str, str] = {}

    @contextlib.contextmanager
    def recording(self, key: str) -> Iterator[None]:
        self.directory.mkdir(parents=True, exist_ok=True)
        output = self.directory / f"{key}.txt"
        log.info("profiling pid %d with py-spy for %s into %s", self.pid, key, output)
        process = subprocess.Popen(
            [
                "py-spy",
                "record",
                "--pid",
                str(self.pid),
                "--format",
                "raw",
                "--rate",
                str(SAMPLE_RATE),
                "--nonblocking",
                "--output",
                str(output),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        # py-spy needs a moment to attach before the first sample.
        time.sleep(1.0)
        started = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            process.send_signal(signal.SIGINT)
            try:
                _, stderr = process.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                _, stderr = process.communicate()
            if output.exists():
                self.summaries[key] = summarize_raw(output.read_text(), elapsed)
            else:
                log.error(
                    "py-spy wrote no profile for %s: %s",
                    key,
                    stderr.decode(errors="replace"),
                )


def _function_name(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    return f"{match['function']} ({match['file']})"


def summarize_raw(text: str, seconds: float) -> str:
    """Return the top functions of py-spy raw output as a short text table."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    waiting = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_function_name(frame) for frame in stack.split(";") if frame]
        if not frames:
            continue
        if frames[-1].split(" (")[0].rpartition(".")[2] in WAITING:
            waiting += count
            continue
        total += count
        own[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    if total == 0:
        return (
            f"{waiting} samples over {seconds:.1f} s, all in waits: the daemon was "
            "idle while the workload ran"
        )
    lines = [
        (
            f"{total} busy samples at {SAMPLE_RATE}/s over {seconds:.1f} s "
            f"(≈{total / SAMPLE_RATE:.1f} thread-seconds; {waiting} samples in "
            "waits left out)"
        ),
        "own time:",
    ]
    lines += [
        f"  {100 * count / total:5.1f}%  {name}" for name, count in own.most_common(TOP)
    ]
    lines.append("inclusive time:")
    lines += [
        f"  {100 * count / total:5.1f}%  {name}"
        for name, count in inclusive.most_common(TOP + 8)
        if not _is_entry_point(name)
    ][:TOP]
    return "\n".join(lines)


def _is_entry_point(name: str) -> bool:
    # Frames that every sample of a thread shares say nothing about the workload.
    return name.split(" (")[0] in {
        "<module>",
        "run",
        "_bootstrap",
        "_bootstrap_inner",
        "main",
        "_run_module_as_main",
        "_run_code",
        "worker",
    }
