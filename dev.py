#!/usr/bin/env python3
"""Set up the project's virtualenv and run a job in it. Needs only Python 3.10+.

    python3 dev.py setup             # only create .venv (then: source .venv/bin/activate)
    python3 dev.py demo [ARGS...]    # the local end-to-end demo (parent.py demo ARGS)
    python3 dev.py test [ARGS...]    # the test suite (pytest ARGS); installs Chromium as root
    python3 dev.py bench             # the benchmark scripts, one after another

``test`` also runs tests/test_training.py's TensorFlow tests when ../shared (the data) is
present: it creates or refreshes the training virtualenv .venv-train/ from
models/requirements-train.txt (plus the test tools), and those tests run in it, in a
subprocess each (NITROLESION_TRAINING_PYTHON tells them where), so none is skipped.

The virtualenv lives in .venv/ and is (re)installed only when a requirements file changed;
the project itself is installed into it in editable mode (pyproject.toml, reinstalled when
that file changes), so ``import nitrolesion`` works from any script, test or folder.
Packages the enclave image pins (enclave/requirements.txt) are installed at exactly those
versions (pip constraints), so the tests exercise what ships; that needs Python 3.11 or
newer, as the image runs 3.11 (Python 3.10 gets the newest versions that fit it).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
REQUIREMENTS = {"setup": "requirements.txt", "demo": "requirements.txt",
                "test": "requirements-dev.txt", "bench": "requirements-dev.txt"}
#: The enclave image's exact pins, used as constraints for the shared packages.
IMAGE_PINS = ROOT / "enclave" / "requirements.txt"
#: The oldest Python the image's pins install on (the image itself runs 3.11).
PINS_PYTHON = (3, 11)
#: The training virtualenv (TensorFlow, torch CPU): models/requirements-train.txt.
TRAIN_VENV = ROOT / ".venv-train"
TRAIN_REQUIREMENTS = ROOT / "models" / "requirements-train.txt"
#: Where the tests read the dataset unless $HAM10000_DIR says otherwise.
SHARED_DATA = ROOT.parent / "shared" / "ham10000"
#: Tells tests/test_training.py which Python runs its TensorFlow tests.
TRAINING_PYTHON_VARIABLE = "NITROLESION_TRAINING_PYTHON"


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_venv(requirements: str) -> Path:
    """Create .venv and install ``requirements`` unless the same set is already installed.

    With Python 3.11+ the image's pins constrain the shared packages (a version that
    drifted, e.g. ml_dtypes, is moved back to the pin), and ``pip check`` must pass.
    """
    if not venv_python().exists():
        print(f"dev.py: creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    # The venv's Python decides (it may be older than the one running dev.py).
    version = tuple(int(part) for part in subprocess.run(
        [str(venv_python()), "-c", "import sys; print(*sys.version_info[:2])"],
        capture_output=True, text=True, check=True).stdout.split())
    pinned = version >= PINS_PYTHON
    files = [ROOT / "requirements.txt", ROOT / requirements, IMAGE_PINS]
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)
                            + f"pinned={pinned}".encode()).hexdigest()
    stamp = VENV / f".installed-{requirements}"
    if stamp.exists() and stamp.read_text() == digest:
        return venv_python()
    print(f"dev.py: installing {requirements} into {VENV}", flush=True)
    pip = [str(venv_python()), "-m", "pip"]
    command = [*pip, "install", "--quiet", "--disable-pip-version-check",
               "-r", str(ROOT / requirements)]
    if pinned:
        command += ["-c", str(IMAGE_PINS)]
    else:
        print(f"dev.py: note: Python {version[0]}.{version[1]} cannot install "
              "the enclave image's pins (it runs Python 3.11); installing the newest versions "
              "that fit, so the tests do not run exactly what ships", file=sys.stderr, flush=True)
    if subprocess.run(command).returncode:
        sys.exit(f"dev.py: installing {requirements} failed (pip's message above)")
    check = subprocess.run([*pip, "check", "--disable-pip-version-check"],
                           capture_output=True, text=True)
    if check.returncode:  # a package lacks what it requires: not the set that ships
        sys.exit(f"{check.stdout}{check.stderr}dev.py: `pip check` failed in {VENV}")
    stamp.write_text(digest)
    return venv_python()


#: Folders the development scripts import from by name, besides the installed package: the
#: checkout (``bench.*``) and tests/ (the harness and hostile cases that bench/ and
#: scripts/ reuse). A .pth file in .venv lists them, as pytest.ini's ``pythonpath`` does
#: for the tests, so no script edits sys.path.
DEV_IMPORT_PATHS = (ROOT, ROOT / "tests")
DEV_PATHS_FILE = "nitrolesion-dev-paths.pth"


def write_dev_paths(python: Path | None = None) -> None:
    """Write DEV_PATHS_FILE into the site-packages of ``python``'s venv (.venv by default;
    every time: cheap, and it follows a moved checkout)."""
    site = subprocess.run([str(python or venv_python()), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, DEV_PATHS_FILE).write_text("".join(f"{path}\n" for path in DEV_IMPORT_PATHS))


def install_project() -> None:
    """Install this checkout into .venv in editable mode, unless pyproject.toml is unchanged
    since the last install. ``--no-deps``: the requirements files (with the image's pins)
    are the one place dependencies are resolved."""
    write_dev_paths()
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    stamp = VENV / ".installed-project"
    if stamp.exists() and stamp.read_text() == digest:
        return
    print(f"dev.py: installing the project into {VENV} (editable)", flush=True)
    command = [str(venv_python()), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
               "--no-deps", "--editable", str(ROOT)]
    if subprocess.run(command).returncode:
        sys.exit("dev.py: installing the project failed (pip's message above)")
    stamp.write_text(digest)


#: What the browser tests drive (tests/test_web_browser.py): Debian's Chromium and its
#: WebDriver, from apt; never a browser downloaded by a test tool.
BROWSER_PACKAGES = ("chromium", "chromium-driver")


def ensure_browser() -> None:
    """Install Chromium and chromedriver with apt when they are missing and we are root (CI
    runs as root on a fresh machine); otherwise say how, and the browser tests skip."""
    if shutil.which("chromium") and shutil.which("chromedriver"):
        return
    if os.name != "posix" or os.geteuid() != 0 or not shutil.which("apt-get"):
        print("dev.py: note: Chromium is not installed, so the browser tests will skip; "
              f"install it with `apt-get install {' '.join(BROWSER_PACKAGES)}`", file=sys.stderr, flush=True)
        return
    print(f"dev.py: installing {', '.join(BROWSER_PACKAGES)} with apt-get (browser tests)", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", *BROWSER_PACKAGES]):
        if subprocess.run(command, env=env, stdout=subprocess.DEVNULL).returncode:
            print(f"dev.py: note: `{' '.join(command)}` failed; the browser tests will skip",
                  file=sys.stderr, flush=True)
            return


def ensure_training_venv() -> Path:
    """Create .venv-train and install the training requirements, the test tools of
    requirements-dev.txt and this checkout (editable, no dependencies), unless the same
    set is already installed. Returns its Python."""
    python = TRAIN_VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    dev = ROOT / "requirements-dev.txt"
    tools = [line.split("#")[0].strip() for line in dev.read_text().splitlines()]
    tools = [tool for tool in tools if tool and not tool.startswith("-")]
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in
                                     (TRAIN_REQUIREMENTS, dev, ROOT / "pyproject.toml"))
                            ).hexdigest()
    stamp = TRAIN_VENV / ".installed-train"
    if python.exists() and stamp.exists() and stamp.read_text() == digest:
        write_dev_paths(python)  # the training tests run bench/model_latency.py there
        return python
    if not python.exists():
        print(f"dev.py: creating {TRAIN_VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(TRAIN_VENV)
    print(f"dev.py: installing {TRAIN_REQUIREMENTS.relative_to(ROOT)} into {TRAIN_VENV}",
          flush=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    for command in ([*pip, "-r", str(TRAIN_REQUIREMENTS), *tools],
                    [*pip, "--no-deps", "--editable", str(ROOT)]):
        if subprocess.run(command).returncode:
            sys.exit(f"dev.py: installing into {TRAIN_VENV} failed (pip's message above)")
    write_dev_paths(python)
    stamp.write_text(digest)
    return python


def main(argv: list[str]) -> int:
    if sys.version_info < (3, 10):
        print("dev.py: Python 3.10 or newer is required", file=sys.stderr)
        return 2
    if not argv or argv[0] not in REQUIREMENTS:
        print(__doc__, file=sys.stderr)
        return 2
    job, rest = argv[0], argv[1:]
    python = str(ensure_venv(REQUIREMENTS[job]))
    install_project()
    if job == "setup":
        def shown(path: Path) -> str:
            relative = os.path.relpath(path)
            return str(path) if relative.startswith("..") else relative

        script = shown(ROOT / "parent" / "parent.py")
        print(f"dev.py: {shown(VENV)} is ready: `source {shown(VENV / 'bin' / 'activate')}` then "
              f"`python {script} ...`, or `{shown(venv_python())} {script} ...`")
        return 0
    if job == "demo":
        command = [python, str(ROOT / "parent" / "parent.py"), "demo", *rest]
    elif job == "test":
        ensure_browser()
        command = [python, "-m", "pytest", *rest]
        data = Path(os.environ.get("HAM10000_DIR", SHARED_DATA))
        if data.is_dir():  # CI has it: the training tests run too, in their own venv
            environment = {**os.environ, TRAINING_PYTHON_VARIABLE: str(ensure_training_venv())}
            return subprocess.run(command, cwd=ROOT, env=environment).returncode
    else:
        for script in ("bench/model_latency.py", "bench/attestation.py", "bench/pipeline.py",
                       "bench/worker_memory.py", "bench/worker_count.py", "bench/fleet.py"):
            print(f"\n$ python {script}", flush=True)
            status = subprocess.run([python, str(ROOT / script)], cwd=ROOT).returncode
            if status:
                return status
        return 0
    return subprocess.run(command, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
