"""The enclave image without Docker: a fresh virtualenv from exactly enclave/requirements.txt,
a folder holding exactly what the Dockerfile copies, and one real classification through it.

No Docker engine runs on these machines, so this is the closest honest check that the image
has everything it needs (and nothing from the project's own environment leaks in).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness import Proc, free_port, tcp_env
from nitrolesion.enclave_image import DEV_ATTESTATION_PATHS, IMAGE_PATHS
from nitrolesion.limits import PROJECT_ROOT

DOCKERFILE = PROJECT_ROOT / "Dockerfile"


def dockerfile_copies() -> list[str]:
    """Sources of the Dockerfile's COPY lines, minus the requirements copied before install."""
    sources = []
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY "):
            parts = line.split()[1:-1]
            sources.extend(p.rstrip("/") for p in parts)
    return [s for s in sources if s != "enclave/requirements.txt"]


def test_dockerfile_copies_exactly_the_image_paths():
    assert sorted(dockerfile_copies()) == sorted(IMAGE_PATHS)
    text = DOCKERFILE.read_text()
    assert "FROM python:3.11-slim" in text
    assert 'CMD ["python", "-u", "enclave/app.py", "3", "5005", "5006"]' in text
    assert "pip install --no-cache-dir --no-deps -r /app/enclave/requirements.txt" in text
    assert re.search(r"^ENV .*\bPYTHONPATH=/app\b", text, re.MULTILINE)  # the package's home
    instructions = [l for l in text.splitlines() if l.strip() and not l.startswith("#")]
    for line in instructions:  # no keys made or copied at build time, no rngd
        assert not re.search(r"rngd|\.pem|genrsa|keygen|private", line, re.IGNORECASE), line


#: Modules only the parent, the verifier or the training use: never in the image, so that
#: editing them leaves PCR0 (and every user's policy) as it is.
PARENT_OR_TRAINING_ONLY = (
    "parent/", "nitrolesion/parent/", "nitrolesion/attestation/cli.py",
    "nitrolesion/attestation/verifier.py", "nitrolesion/attestation/policy.py",
    "nitrolesion/attestation/trust.py", "nitrolesion/attestation/roots/",
    "nitrolesion/crypto/keystore.py", "nitrolesion/model/metrics.py",
    "nitrolesion/model/dataset.py", "nitrolesion/model/predictions.py", "models/splits/",
    "models/train", "models/evaluate.py", "models/compare.py", "models/training_report.json",
    "tests/", "bench/", "scripts/",
)
#: Development only: in the image only as DEV_ATTESTATION_PATHS, loaded with --dev-attestation.
DEVELOPMENT_ONLY = ("nitrolesion/attestation/dev_authority.py", "nitrolesion/attestation/cose.py")


def test_image_holds_only_what_the_enclave_runs():
    """The list the Dockerfile copies names files, each present, none parent-, training-
    or development-only."""
    assert len(set(IMAGE_PATHS)) == len(IMAGE_PATHS)
    for relative in IMAGE_PATHS:
        assert (PROJECT_ROOT / relative).is_file(), relative
        assert not relative.startswith(PARENT_OR_TRAINING_ONLY + DEVELOPMENT_ONLY), relative
    for relative in DEV_ATTESTATION_PATHS:
        assert (PROJECT_ROOT / relative).is_file() and relative not in IMAGE_PATHS, relative


def test_enclave_requirements_are_pinned():
    for line in (PROJECT_ROOT / "enclave" / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            assert re.match(r"^[A-Za-z0-9_.\-]+==[0-9][^ ;]*( *;.*)?$", line), line


PINS = PROJECT_ROOT / "enclave" / "requirements.txt"
#: What python:3.11-slim brings besides the pins (pip's own tooling).
BASE_PACKAGES = {"pip", "setuptools", "wheel"}


def pinned_versions() -> dict[str, str]:
    """{canonical name: version} of enclave/requirements.txt, markers evaluated here."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in PINS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate():
                (spec,) = requirement.specifier
                pins[canonicalize_name(requirement.name)] = spec.version
    return pins


def image_python() -> str:
    """An interpreter like the image's (python:3.11-slim): this one if it is 3.11+, which
    the pins need, else a python3.11 on PATH; skips when there is none."""
    if sys.version_info >= (3, 11):
        return sys.executable
    found = shutil.which("python3.11")
    if found is None:
        pytest.skip("the image runs Python 3.11 and its pins need it; no python3.11 here")
    return found


def _outer_pip_can_target() -> bool:
    """Whether this interpreter's pip has ``--python`` (pip 22.3+) to work on another env."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return tuple(int(part) for part in version("pip").split(".")[:2]) >= (22, 3)
    except (PackageNotFoundError, ValueError):
        return False


def pip_command(python: Path) -> list[str]:
    """``pip`` acting on the virtualenv of ``python``: this interpreter's pip with --python
    when it can (the venv then needs no pip of its own), else the venv's own pip."""
    if _outer_pip_can_target():
        return [sys.executable, "-m", "pip", "--python", str(python)]
    return [str(python), "-m", "pip"]


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory) -> Path:
    """A virtualenv with only the enclave's pinned requirements (no project venv packages),
    installed as the Dockerfile does: exact pins, --no-deps."""
    root = tmp_path_factory.mktemp("enclave-venv")
    # Speed (14 s -> 5 s): no pip bootstrapped into the venv when ours can install into it
    # (ensurepip took ~2.5 s), and no byte-compiling of the whole of numpy & co. at install
    # (the enclave compiles the modules it imports). What is installed is the same.
    without_pip = ["--without-pip"] if _outer_pip_can_target() else []
    subprocess.run([image_python(), "-m", "venv", *without_pip, str(root)], check=True,
                   timeout=300)
    python = root / "bin" / "python"
    subprocess.run([*pip_command(python), "install", "--quiet", "--disable-pip-version-check",
                    "--no-deps", "--no-compile", "-r", str(PINS)], check=True, timeout=900)
    return python


def test_image_venv_holds_exactly_the_pins_and_pip_check_passes(image_venv):
    """--no-deps installs only what is listed, so a missing dependency would go unnoticed
    until the image fails at run time: pip check must find every requirement met."""
    from packaging.utils import canonicalize_name

    listed = subprocess.run([*pip_command(image_venv), "list", "--format=json",
                             "--disable-pip-version-check"],
                            capture_output=True, text=True, check=True, timeout=120)
    installed = {canonicalize_name(p["name"]): p["version"] for p in json.loads(listed.stdout)}
    for name in BASE_PACKAGES:
        installed.pop(name, None)
    assert installed == pinned_versions()
    check = subprocess.run([*pip_command(image_venv), "check", "--disable-pip-version-check"],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr


def test_tests_run_the_image_versions_of_shared_packages():
    """dev.py installs the project's venv with the image's pins as constraints, so what
    the tests import is what ships (Python 3.11+, which the pins need)."""
    if sys.version_info < (3, 11):
        pytest.skip("the image's pins need Python 3.11+; dev.py installs the nearest versions")
    from importlib.metadata import PackageNotFoundError, version

    drifted = {}
    for name, pinned in pinned_versions().items():
        try:
            here = version(name)
        except PackageNotFoundError:
            continue  # the image needs it, these tests do not (none today)
        if here != pinned:
            drifted[name] = f"{here} here, {pinned} in the image"
    assert not drifted, f"run `python3 dev.py test` to reinstall .venv: {drifted}"


def copy_image_tree(destination: Path, paths=IMAGE_PATHS + DEV_ATTESTATION_PATHS) -> Path:
    """The image's files (by default with the development authority's, for a run off
    Nitro) under ``destination``, as the Dockerfile copies them."""
    for relative in paths:
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT_ROOT / relative, target)
    return destination


def test_production_image_loads_the_enclave_without_parent_or_dev_modules(image_venv, tmp_path):
    """Exactly IMAGE_PATHS, the image's interpreter: the app and everything it imports at
    start load, and nothing parent-, training- or development-only is among them."""
    app_dir = copy_image_tree(tmp_path / "app", IMAGE_PATHS)
    code = ("import sys; import nitrolesion.enclave.app, nitrolesion.enclave.service\n"
            "print('\\n'.join(sorted(m for m in sys.modules if m.startswith(('nitrolesion', 'enclave')))))")
    env = dict(tcp_env(), PYTHONPATH=str(app_dir))
    run = subprocess.run([str(image_venv), "-c", code], cwd=app_dir, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    loaded = run.stdout.split()
    assert "nitrolesion.enclave.app" in loaded
    for module in loaded:
        path = module.replace(".", "/")
        assert not path.startswith(tuple(p.removesuffix(".py") for p in
                                         PARENT_OR_TRAINING_ONLY + DEVELOPMENT_ONLY)), module
    help_run = subprocess.run([str(image_venv), "enclave/app.py", "--help"], cwd=app_dir,
                              env=env, capture_output=True, text=True, timeout=120)
    assert help_run.returncode == 0 and "--dev-attestation" in help_run.stdout, help_run.stderr
    dev_run = subprocess.run([str(image_venv), "enclave/app.py", "3", "5005", "5006",
                              "--dev-attestation", str(tmp_path / "dev")], cwd=app_dir, env=env,
                             capture_output=True, text=True, timeout=120)
    assert dev_run.returncode == 1 and "no development attestation authority" in dev_run.stderr
    assert "Traceback" not in dev_run.stderr, dev_run.stderr


def test_enclave_runs_from_exactly_the_image_contents(image_venv, tmp_path, test_image_paths,
                                                      model_present):
    app_dir = copy_image_tree(tmp_path / "app")
    # Nothing else from the project is there (no parent/, no tests/, no requirements.txt).
    assert sorted(p.name for p in app_dir.iterdir()) == sorted({p.split("/")[0] for p in IMAGE_PATHS})
    key_dir, dev_dir = tmp_path / "parent-keys", tmp_path / "dev"
    parent_port, client_port = free_port(), free_port()
    env = tcp_env(key_dir)
    env.pop("PYTHONPATH", None)
    # The enclave imports the package from the copied tree, as the Dockerfile's ENV PYTHONPATH=/app.
    enclave_env = dict(env, PYTHONPATH=str(app_dir))
    from nitrolesion.attestation.dev_authority import DevAttestationAuthority
    from nitrolesion.attestation.policy import AttestationPolicy
    from nitrolesion.enclave_image import image_files

    # The PCRs of the copied tree, pinned before anything runs: the server believes only an
    # announcement attested with them (the enclave then reuses this development authority).
    authority = DevAttestationAuthority.load_or_create(dev_dir, image_files(app_dir), base=app_dir)
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(AttestationPolicy.for_dev_pcrs(authority.pcrs).to_dict()))
    trust = ["--policy", str(policy), "--dev-root", str(dev_dir / "dev_root.pem")]
    server = Proc([str(PROJECT_ROOT / "parent" / "parent.py"), "server", str(parent_port), *trust],
                  env)
    enclave = None
    try:
        server.wait_for("Server ready!")
        # The Dockerfile's CMD, run from the copied tree with the image's interpreter.
        enclave = subprocess.Popen(
            [str(image_venv), "-u", "enclave/app.py", "3", str(client_port), str(parent_port),
             "--dev-attestation", str(dev_dir)],
            cwd=app_dir, env=enclave_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        server.wait_for("Enclave public key received", timeout=120)
        run = subprocess.run(
            [sys.executable, str(PROJECT_ROOT / "parent" / "parent.py"), "classify",
             str(test_image_paths[0]), "--port", str(client_port), "--json", *trust],
            env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        row = json.loads(run.stdout)
        assert len(row["probabilities"]) == 7 and row["label"]
    finally:
        if enclave is not None:
            enclave.terminate()
            output = enclave.communicate(timeout=30)[0]
            assert "Traceback" not in output, output
        server.stop()
