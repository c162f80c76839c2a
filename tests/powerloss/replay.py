"""Power cuts replayed from a write log: choosing cuts and checking each copy.

For every cut the device is rebuilt from the baseline image and a prefix of
the log (see writelog.py), opened with ``Store.open`` (which runs journal
recovery), compared with the states the workload recorded, closed, and
checked with lcfs-fsck.

Rebuild one cut's image by hand, to reproduce a failure::

    python tests/powerloss/replay.py LOG BASELINE OUT --cut K [--drop-seed SEED]

then run ``lcfs-fsck OUT`` or open OUT with ``Store.open``.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import io
import json
import logging
import multiprocessing
import os
import random
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lcfs.store import Store
from powerloss.state import differences, store_state, without_layer
from powerloss.writelog import (
    MARK,
    SYNC,
    Record,
    build_image,
    data_regions,
    read_log,
    unsynced_pieces,
)
from tools import fsck


@dataclass(frozen=True)
class Cut:
    """A power cut: records [0, position) reach the device.

    With ``drop``, some pages written since the last sync do not.
    """

    position: int
    drop: bool = False

    def describe(self, seed: int) -> str:
        if self.drop:
            return f"cut {self.position} with unsynced pages dropped (drop seed {seed})"
        return f"cut {self.position}"


class Recording:
    """A write log with the baseline image and the states the workload recorded."""

    def __init__(
        self,
        log_path: str,
        baseline_path: str,
        states_path: str | None = None,
        final_path: str | None = None,
    ):
        self.log_path = log_path
        # The image as the workload left it, to compare a replay of the whole log with.
        self.final_path = final_path
        self.baseline_path = baseline_path
        self.records: list[Record] = read_log(log_path)
        self.baseline = data_regions(baseline_path)
        self.steps: list[dict] = []
        if states_path is not None:
            with open(states_path) as f:
                self.steps = [json.loads(line) for line in f]
        # Positions of the marks the workload set after each step, in step order.
        self.marks = [
            i for i, r in enumerate(self.records) if r.kind == MARK and r.text.isdigit()
        ]
        self.syncs = [i for i, r in enumerate(self.records) if r.kind == SYNC]

    def step_at(self, position: int) -> int:
        """Return the index of the step in progress after records [0, position)."""
        return bisect.bisect_left(self.marks, position)

    def allowed_states(self, position: int) -> list[tuple[str, dict]]:
        """Return (description, state) of each state a cut at ``position`` may leave."""
        step = self.step_at(position)
        steps = self.steps
        if step >= len(steps):
            return [(f"after the last step {steps[-1]['step']!r}", steps[-1]["state"])]
        allowed = []
        if step == 0:
            allowed.append(("the empty store", steps[0]["state"]))
        else:
            allowed.append(
                (f"after step {steps[step - 1]['step']!r}", steps[step - 1]["state"])
            )
        allowed.append((f"after step {steps[step]['step']!r}", steps[step]["state"]))
        imported = steps[step]["imported"]
        if imported and step > 0:
            allowed.append(
                (
                    (
                        f"after step {steps[step - 1]['step']!r} without layer "
                        f"{imported} (import rolled back)"
                    ),
                    without_layer(steps[step - 1]["state"], imported),
                )
            )
        return allowed

    def step_name(self, position: int) -> str:
        step = self.step_at(position)
        return self.steps[step]["step"] if step < len(self.steps) else "close"

    def where(self, position: int) -> str:
        """Describe the step and the last record a cut at ``position`` keeps."""
        name = self.step_name(position)
        total = len(self.records)
        if position == 0:
            return f"in step {name!r}, before the first of {total} records"
        last = self.records[position - 1].describe()
        return f"in step {name!r}, after record {position - 1} ({last}) of {total}"


def choose_cuts(
    recording: Recording, seed: int, count: int, drop_count: int
) -> list[Cut]:
    """Pick ``count`` distinct prefix cuts and ``drop_count`` cuts with dropped pages.

    A log with at most ``count`` records gets a cut at every position. In a
    longer one half of the cuts land right before or after a sync record,
    where the order of data and metadata writes matters most. Half of the
    drop cuts come right before a sync, where the most writes are unsynced.
    """
    rng = random.Random(seed)
    records = recording.records
    total = len(records)
    syncs = recording.syncs
    if count > total:
        positions = set(range(total + 1))
    else:
        positions = {0, total}
        while len(positions) < count:
            if rng.random() < 0.5 or not syncs:
                position = rng.randint(0, total)
            else:
                position = rng.choice(syncs) + rng.choice((-1, 0, 1, 2))
            positions.add(min(max(position, 0), total))
    cuts = [Cut(position) for position in sorted(positions)]
    exposed = [p for p in range(1, total + 1) if unsynced_pieces(records, p)]
    before_sync = [p for p in syncs if unsynced_pieces(records, p)]
    chosen = set(rng.sample(before_sync, min(drop_count // 2, len(before_sync))))
    others = [p for p in exposed if p not in chosen]
    chosen.update(rng.sample(others, min(drop_count - len(chosen), len(others))))
    cuts += [Cut(position, drop=True) for position in sorted(chosen)]
    return cuts


def dropped_pages(recording: Recording, cut: Cut, seed: int) -> frozenset:
    """Return the unsynced page pieces a drop cut leaves out.

    The choice depends only on ``seed`` and the cut's position.
    """
    if not cut.drop:
        return frozenset()
    pieces = unsynced_pieces(recording.records, cut.position)
    rng = random.Random(f"{seed}:{cut.position}")
    dropped = {piece for piece in pieces if rng.random() < 0.5}
    if pieces and not dropped:
        dropped.add(rng.choice(pieces))
    return frozenset(dropped)


# Set by ``configure`` in the parent before the worker pool forks, so that
# the workers inherit them.
_recording: Recording | None = None
_seed = 0
_workdir = ""
_warnings: list[str] = []


def configure(recording: Recording, seed: int, workdir: str) -> None:
    """Set the recording, seed and scratch directory that ``check_cut`` uses."""
    global _recording, _seed, _workdir
    _recording, _seed, _workdir = recording, seed, workdir


class _Collect(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        _warnings.append(f"{record.levelname} {record.name}: {record.getMessage()}")


def _init_worker() -> None:
    root = logging.getLogger()
    root.handlers = [_Collect()]
    root.setLevel(logging.WARNING)


@dataclass
class Failure:
    """What went wrong at one cut.

    ``problems`` contains (kind, text) pairs, kind being open, state or fsck.
    """

    cut: Cut
    step: str
    where: str
    dropped: int
    problems: list[tuple[str, str]]
    log: list[str]

    def report(self, seed: int, kinds: tuple[str, ...]) -> str:
        lines = [f"{self.cut.describe(seed)} {self.where}"]
        if self.dropped:
            lines.append(f"  {self.dropped} page pieces left out of the replay")
        lines += [f"  {text}" for kind, text in self.problems if kind in kinds]
        lines += [f"  log: {message}" for message in self.log[:12]]
        return "\n".join(lines)


def check_cut(cut: Cut) -> Failure | None:
    """Rebuild the device for ``cut``, recover it, and return what failed, or None."""
    return check_replay(cut, dropped_pages(_recording, cut, _seed))


def check_replay(cut: Cut, dropped: frozenset) -> Failure | None:
    """Check the image of records [0, cut.position) less the ``dropped`` page pieces."""
    recording = _recording
    image = os.path.join(_workdir, f"cut-{os.getpid()}.img")
    build_image(image, recording.baseline, recording.records, cut.position, dropped)

    _warnings.clear()
    problems = []
    try:
        store = Store.open(image)
    except Exception as exc:  # noqa: BLE001 - any exception is the finding
        problems.append(("open", f"Store.open raised {type(exc).__name__}: {exc}"))
        store = None
    if store is not None:
        try:
            state = store_state(store)
        except Exception as exc:  # noqa: BLE001
            problems.append(
                (
                    "open",
                    f"reading the recovered store raised {type(exc).__name__}: {exc}",
                )
            )
            state = None
        try:
            store.close()
        except Exception as exc:  # noqa: BLE001
            problems.append(("open", f"Store.close raised {type(exc).__name__}: {exc}"))
        if state is not None and recording.steps:
            problems += [
                ("state", text)
                for text in state_problems(recording, cut.position, state)
            ]

    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        code = fsck.main([image, "--no-progress", "--log-level", "WARNING"])
    if code != 0:
        problems.append(
            ("fsck", f"lcfs-fsck exited {code}: {summary.getvalue().strip()}")
        )
    os.unlink(image)

    if not problems:
        return None
    return Failure(
        cut,
        recording.step_name(cut.position),
        recording.where(cut.position),
        len(dropped),
        problems,
        list(_warnings),
    )


def state_problems(recording: Recording, position: int, state: dict) -> list[str]:
    allowed = recording.allowed_states(position)
    if any(state == expected for _, expected in allowed):
        return []
    closest = min(
        allowed, key=lambda item: len(differences(item[1], state, limit=1000))
    )
    names = "; ".join(name for name, _ in allowed)
    lines = [
        f"recovered state matches none of: {names}",
        f"closest is {closest[0]}, which differs in:",
    ]
    return lines + [f"    {line}" for line in differences(closest[1], state)]


def run_cuts(
    recording: Recording, cuts: list[Cut], seed: int, workdir: str, processes: int = 2
) -> list[Failure]:
    """Check every cut on ``processes`` forked workers; return the failures."""
    configure(recording, seed, workdir)
    context = multiprocessing.get_context("fork")
    with context.Pool(processes, initializer=_init_worker) as pool:
        results = pool.map(check_cut, cuts, chunksize=4)
    return [result for result in results if result is not None]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Rebuild the device image of one power cut."
    )
    parser.add_argument("log", help="write log recorded by recorder.c")
    parser.add_argument("baseline", help="image as it was before the workload")
    parser.add_argument("output", help="image file to write")
    parser.add_argument(
        "--cut", type=int, required=True, help="keep log records [0, CUT)"
    )
    parser.add_argument(
        "--drop-seed",
        type=int,
        help="also drop unsynced pages as the test did with this seed",
    )
    args = parser.parse_args(argv)
    recording = Recording(args.log, args.baseline)
    cut = Cut(args.cut, drop=args.drop_seed is not None)
    dropped = dropped_pages(recording, cut, args.drop_seed or 0)
    build_image(
        args.output, recording.baseline, recording.records, cut.position, dropped
    )
    print(
        f"{args.output}: records [0, {cut.position}) of {len(recording.records)}, "
        f"{len(dropped)} unsynced page pieces dropped"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
