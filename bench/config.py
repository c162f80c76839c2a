"""Sizes and repetition counts of a full run and of a quick (--quick) run."""

from __future__ import annotations

from dataclasses import dataclass

from .common import GIB, MIB


@dataclass(frozen=True)
class Sizes:
    runs: int
    # Runs of the phases that run in rounds over the drivers. Their
    # workloads take seconds, so one run moves with the machine's state:
    # on a 2-CPU VM the build's ratio went from 0.89 to 1.35 between rounds.
    rounds: int
    containers: int
    big_file: int
    many_files: int
    commit_write: int
    build_steps: int
    build_files_per_copy: int
    shared_file: int
    shared_readers: int
    chain_depth: int
    chain_small_files: int
    chain_big_file: int
    start_layers: int
    snapshot_cycles: int
    app_layer_files: int
    app_layer_blob: int


FULL = Sizes(
    runs=3,
    rounds=5,
    containers=50,
    big_file=GIB,
    many_files=100_000,
    commit_write=GIB,
    build_steps=20,
    build_files_per_copy=50,
    shared_file=200 * MIB,
    shared_readers=20,
    chain_depth=500,
    chain_small_files=100,
    chain_big_file=64 * MIB,
    start_layers=10_000,
    snapshot_cycles=100,
    app_layer_files=500,
    app_layer_blob=16 * MIB,
)

# Every workload once, at sizes that keep the whole run under 5 minutes on
# 2 cores. Its figures check that the harness works; they are not results.
QUICK = Sizes(
    runs=1,
    rounds=1,
    containers=5,
    big_file=64 * MIB,
    many_files=5_000,
    commit_write=64 * MIB,
    build_steps=6,
    build_files_per_copy=10,
    shared_file=32 * MIB,
    shared_readers=4,
    chain_depth=50,
    chain_small_files=20,
    chain_big_file=8 * MIB,
    start_layers=1_000,
    snapshot_cycles=10,
    app_layer_files=100,
    app_layer_blob=2 * MIB,
)
