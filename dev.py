#!/usr/bin/env python3
"""Set up the project's virtualenv and run a job in it. Needs only Python 3.10+.

    python3 dev.py demo [ARGS...]    # the local end-to-end demo (parent.py demo ARGS)
    python3 dev.py test [ARGS...]    # the test suite (pytest ARGS)
    python3 dev.py bench             # the benchmark scripts, one after another

The virtualenv lives in .venv/ and is (re)installed only when a requirements file changed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
REQUIREMENTS = {"demo": "requirements.txt", "test": "requirements-dev.txt",
                "bench": "requirements-dev.txt"}


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_venv(requirements: str) -> Path:
    """Create .venv and install ``requirements`` unless the same set is already installed."""
    files = [ROOT / "requirements.txt", ROOT / requirements]
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()
    stamp = VENV / f".installed-{requirements}"
    if stamp.exists() and stamp.read_text() == digest and venv_python().exists():
        return venv_python()
    if not venv_python().exists():
        print(f"dev.py: creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print(f"dev.py: installing {requirements} into {VENV}", flush=True)
    subprocess.run([str(venv_python()), "-m", "pip", "install", "--quiet",
                    "--disable-pip-version-check", "-r", str(ROOT / requirements)], check=True)
    stamp.write_text(digest)
    return venv_python()


def main(argv: list[str]) -> int:
    if sys.version_info < (3, 10):
        print("dev.py: Python 3.10 or newer is required", file=sys.stderr)
        return 2
    if not argv or argv[0] not in REQUIREMENTS:
        print(__doc__, file=sys.stderr)
        return 2
    job, rest = argv[0], argv[1:]
    python = str(ensure_venv(REQUIREMENTS[job]))
    if job == "demo":
        command = [python, str(ROOT / "parent" / "parent.py"), "demo", *rest]
    elif job == "test":
        command = [python, "-m", "pytest", *rest]
    else:
        for script in ("bench/model_latency.py", "bench/attestation.py", "bench/pipeline.py"):
            print(f"\n$ python {script}", flush=True)
            status = subprocess.run([python, str(ROOT / script)], cwd=ROOT).returncode
            if status:
                return status
        return 0
    return subprocess.run(command, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
