"""The enclave image without Docker: a fresh virtualenv from exactly enclave/requirements.txt,
a folder holding exactly what the Dockerfile copies, and one real classification through it.

No Docker engine runs on these machines, so this is the closest honest check that the image
has everything it needs (and nothing from the project's own environment leaks in).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from harness import Proc, free_port, tcp_env
from nitrolesion.enclave_image import IMAGE_PATHS, PROJECT_ROOT

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
    instructions = [l for l in text.splitlines() if l.strip() and not l.startswith("#")]
    for line in instructions:  # no keys made or copied at build time, no rngd
        assert not re.search(r"rngd|\.pem|genrsa|keygen|private", line, re.IGNORECASE), line


def test_enclave_requirements_are_pinned():
    for line in (PROJECT_ROOT / "enclave" / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            assert re.match(r"^[A-Za-z0-9_.\-]+==[0-9][^ ;]*( *;.*)?$", line), line


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory) -> Path:
    """A virtualenv with only the enclave's pinned requirements (no project venv packages)."""
    root = tmp_path_factory.mktemp("enclave-venv")
    venv.EnvBuilder(with_pip=True).create(root)
    python = root / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    "--no-deps", "-r", str(PROJECT_ROOT / "enclave" / "requirements.txt")],
                   check=True, timeout=900)
    return python


def copy_image_tree(destination: Path) -> Path:
    for relative in IMAGE_PATHS:
        source = PROJECT_ROOT / relative
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, target)
    return destination


def test_enclave_runs_from_exactly_the_image_contents(image_venv, tmp_path, test_image_paths,
                                                      model_present):
    app_dir = copy_image_tree(tmp_path / "app")
    # Nothing else from the project is there (no parent/, no tests/, no requirements.txt).
    assert sorted(p.name for p in app_dir.iterdir()) == sorted({p.split("/")[0] for p in IMAGE_PATHS})
    key_dir, dev_dir = tmp_path / "parent-keys", tmp_path / "dev"
    parent_port, client_port = free_port(), free_port()
    env = tcp_env(key_dir)
    env.pop("PYTHONPATH", None)
    from nitrolesion.attestation.dev_authority import DevAttestationAuthority
    from nitrolesion.attestation.policy import AttestationPolicy
    from nitrolesion.enclave_image import image_files
    import json

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
            cwd=app_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
