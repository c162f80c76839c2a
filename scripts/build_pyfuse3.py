"""Rebuild the installed pyfuse3 so that lcfs can turn on the kernel's caches.

The work is done by lcfs.pyfuse3_build, whose docstring explains what
changes and why. This file is the entry point that the set-up scripts run,
before or after lcfs itself is importable.
"""

import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    module = Path(__file__).resolve().parent.parent / "lcfs" / "pyfuse3_build.py"
    sys.argv[0] = str(module)
    runpy.run_path(str(module), run_name="__main__")
