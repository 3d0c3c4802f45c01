"""Run an entry script's ``main`` or say, in one line, how to get the project's environment.

Standard library only, and importing nothing of the package at module level: the entry
scripts (``parent/parent.py``, ``enclave/app.py``) load this file by its path, so it works
in a Python where neither ``nitrolesion`` nor its third-party packages are installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

#: The checkout (or the image's /app): where .venv and dev.py live.
ROOT = Path(__file__).resolve().parents[1]

#: The package's own name: a missing submodule of it is a bug, not a missing install.
PACKAGE = "nitrolesion"


def environment_problem(script: str, problem: str, root: Path | None = None) -> str:
    """The one line printed instead of a traceback when this Python cannot run ``script``
    (a path relative to the project, e.g. "parent/parent.py"): how to get the project's
    environment. ``root`` is the checkout (default: the one holding this file)."""
    root = ROOT if root is None else root

    def shown(path: Path) -> str:
        relative = os.path.relpath(path)
        return path.as_posix() if relative.startswith("..") else relative

    venv = root / ".venv"
    python, activate = shown(venv / "bin" / "python"), shown(venv / "bin" / "activate")
    command = f"`{python} {shown(root / script)} ...` or `source {activate}` first"
    name = Path(script).name
    if Path(sys.prefix).resolve() == venv.resolve():
        return (f"{name}: {problem}: .venv is incomplete: remove it and run "
                f"`python3 {shown(root / 'dev.py')} setup`")
    if (venv / "bin" / "python").exists():
        return f"{name}: {problem} in this Python ({sys.executable}): use {command}"
    return (f"{name}: {problem}: run `python3 {shown(root / 'dev.py')} setup` once to create "
            f".venv, then use {command}")


def run_entry_point(script: str, module: str) -> int:
    """Import ``module`` and return its ``main()``; when this Python lacks the package or a
    third-party module it needs (its ``REQUIRED_MODULES``, some imported only later),
    print one line on how to get the environment and return 1."""
    if sys.version_info < (3, 10):
        print(environment_problem(script, "Python 3.10 or newer is required, this is "
                                          f"{sys.version.split()[0]}"), file=sys.stderr)
        return 1
    try:
        entry = importlib.import_module(module)
        for required in getattr(entry, "REQUIRED_MODULES", ()):
            # A tuple of alternatives means any one of them will do.
            choices = required if isinstance(required, tuple) else (required,)
            if not any(importlib.util.find_spec(name) for name in choices):
                raise ModuleNotFoundError(f"No module named {choices[0]!r}", name=choices[0])
    except ModuleNotFoundError as exc:
        if (exc.name or "").startswith(PACKAGE + "."):
            raise  # our own code is broken: the traceback helps
        print(environment_problem(script, f"missing Python packages ({exc})"), file=sys.stderr)
        return 1
    return entry.main()
