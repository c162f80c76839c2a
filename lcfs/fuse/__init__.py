"""The FUSE frontend: every layer of a store served as a directory of one mount."""

from .mount import MOUNT_OPTIONS, FuseServer, find_mount
from .operations import LayerOperations

__all__ = ["MOUNT_OPTIONS", "FuseServer", "LayerOperations", "find_mount"]
