"""Benchmarks of lcfs against Docker's overlay2, fuse-overlayfs and vfs drivers.

Run ``python -m bench`` (or ``bench/run``) as root from the repository root;
``--quick`` runs every workload once at reduced sizes to check the harness.
"""
