"""The workloads measured, their targets, and the samples recorded for each driver.

A ``Workload`` names one figure and its unit. ``Results`` keeps every sample
by workload and driver, the profiles taken for missed targets, and facts
about the run, and is written to JSON so the report can be regenerated
without running the benchmarks again.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .common import Stopwatch, summarize

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """A goal: the ratio of two medians (or one median) compared with a limit.

    ``numerator`` and ``denominator`` are (workload key, driver) pairs. With
    no denominator the numerator's median itself is compared. With
    ``at_most`` the value must be at most ``limit``, otherwise at least it.
    """

    text: str
    numerator: tuple[str, str]
    denominator: tuple[str, str] | None
    limit: float
    at_most: bool = True


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    unit: str
    higher_is_better: bool = False
    target: Target | None = None
    section: str = "docker"


@dataclass
class Outcome:
    """A target checked against the results: the value found and whether it was met."""

    workload: Workload
    value: float | None
    met: bool | None


# Facts of the run's meta that must agree before a rerun's figures may join
# a saved run's, because figures from different machines do not compare.
MACHINE_KEYS = ("nproc", "memory", "kernel")


def machine_differences(saved: dict, current: dict) -> list[str]:
    """Return how the machine of ``saved`` differs from ``current``, one fact per item."""
    return [
        f"{key} {saved.get(key, '?')} there, {current.get(key, '?')} here"
        for key in MACHINE_KEYS
        if saved.get(key) != current.get(key)
    ]


@dataclass
class Results:
    """Samples by workload key and driver, and what the report needs besides."""

    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    profiles: dict[str, str] = field(default_factory=dict)
    meta: dict[str, object] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, key: str, driver: str, value: float) -> None:
        self.samples.setdefault(key, {}).setdefault(driver, []).append(value)

    def median(self, key: str, driver: str) -> float | None:
        summary = summarize(self.samples.get(key, {}).get(driver, []))
        return summary.median if summary else None

    def check(self, workload: Workload) -> Outcome:
        """Return the target's value (a ratio or a median) and whether it is met."""
        target = workload.target
        if target is None:
            return Outcome(workload, None, None)
        value = self.median(*target.numerator)
        if value is not None and target.denominator is not None:
            denominator = self.median(*target.denominator)
            value = value / denominator if denominator else None
        if value is None:
            return Outcome(workload, None, None)
        met = value <= target.limit if target.at_most else value >= target.limit
        return Outcome(workload, value, met)

    def merge_rerun(self, rerun: Results) -> list[str]:
        """Replace the figures of the workloads that ``rerun`` measured and return their keys.

        Each such workload gets all of its samples, for every driver, from
        the rerun, so that a ratio still compares drivers measured in one
        run. Its profile and FUSE request counts come from the rerun too,
        or are dropped when the rerun has none. Every other figure stays,
        and ``meta["reruns"]`` records the rerun's date, command and
        workloads for the page. An earlier rerun's record loses the
        workloads measured again, and is removed when none is left.
        """
        measured = sorted(rerun.samples)
        requests = self.meta.setdefault("fuse_requests", {})
        rerun_requests = rerun.meta.get("fuse_requests") or {}
        for key in measured:
            self.samples[key] = rerun.samples[key]
            self.profiles.pop(key, None)
            requests.pop(key, None)
            if key in rerun.profiles:
                self.profiles[key] = rerun.profiles[key]
            if key in rerun_requests:
                requests[key] = rerun_requests[key]
        date = rerun.meta.get("date", "?")
        self.notes += [f"In the run of {date}: {note}" for note in rerun.notes]
        reruns = []
        for earlier in self.meta.get("reruns", []):
            not_remeasured = [
                key for key in earlier["workloads"] if key not in rerun.samples
            ]
            if not_remeasured:
                reruns.append({**earlier, "workloads": not_remeasured})
        self.meta["reruns"] = reruns
        reruns.append(
            {
                "date": date,
                "command": rerun.meta.get("command", "?"),
                "load": rerun.meta.get("load", "?"),
                "workloads": measured,
                "round_robin_phases": rerun.meta.get("round_robin_phases", []),
                "rounds": rerun.meta.get("rounds"),
            }
        )
        return measured

    def save(self, path: Path) -> None:
        data = {
            "meta": self.meta,
            "notes": self.notes,
            "samples": self.samples,
            "profiles": self.profiles,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Path) -> Results:
        data = json.loads(path.read_text())
        return cls(
            data["samples"],
            data.get("profiles", {}),
            data.get("meta", {}),
            data.get("notes", []),
        )


class Recorder:
    """Records the samples of one driver, or profiles them instead.

    In a profiling pass (``profiler`` set) the regions of the keys in
    ``profile_keys`` run under the profiler and nothing is recorded, so a
    rerun of a workload for its profile does not add samples.
    """

    def __init__(
        self,
        results: Results,
        driver: str,
        profiler=None,
        profile_keys: frozenset[str] = frozenset(),
    ):
        self.results = results
        self.driver = driver
        self.profiler = profiler
        self.profile_keys = profile_keys

    @property
    def profiling(self) -> bool:
        return self.profiler is not None

    def add(self, key: str, value: float) -> None:
        if self.profiling:
            return
        log.debug("%s %s: %.4g", self.driver, key, value)
        self.results.add(key, self.driver, value)

    @contextlib.contextmanager
    def region(self, key: str) -> Iterator[None]:
        """Run the block under the profiler when ``key`` is being profiled."""
        if self.profiling and key in self.profile_keys:
            with self.profiler.recording(key):
                yield
        else:
            yield

    @contextlib.contextmanager
    def timed(self, key: str) -> Iterator[Stopwatch]:
        """Time the block and record its seconds under ``key``."""
        with self.region(key), Stopwatch() as watch:
            yield watch
        self.add(key, watch.seconds)
