"""Parent-side command line (``python parent/parent.py --help``): a thin entry point.

The commands live in nitrolesion.parent.cli (also installed as ``nitrolesion-parent``).
"""

import importlib.util
import sys
from pathlib import Path

# Loaded by its path: it is standard library only, so it can tell a Python without the
# project's environment how to get it.
_spec = importlib.util.spec_from_file_location(
    "nitrolesion_environment", Path(__file__).resolve().parents[1] / "nitrolesion" / "environment.py")
environment = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(environment)

if __name__ == "__main__":
    sys.exit(environment.run_entry_point("parent/parent.py", "nitrolesion.parent.cli"))
