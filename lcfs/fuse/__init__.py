"""The FUSE frontend: every layer of a store served as a directory of one mount."""

from .mount import MOUNT_OPTIONS, FuseServer, find_mount
from .operations import LayerOperations
from .settings import FuseSettings
from .stats import RequestStats

__all__ = [
    "MOUNT_OPTIONS",
    "FuseServer",
    "FuseSettings",
    "LayerOperations",
    "RequestStats",
    "find_mount",
]
