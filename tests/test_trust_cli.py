"""Trust fails closed (security review, finding 2): no PCR policy, no image sent.

Before, ``classify`` and ``client`` without --policy trusted any enclave and printed a
warning. Now they refuse with one line saying how to give a policy; ``parent.py trust``
installs one in the key folder, after which the README's original commands work as is.
"""

from __future__ import annotations

import json
import os
import stat

import pytest

from harness import PARENT_CLI, PYTHON, ROOT, free_port, tcp_env

import subprocess

PCRS = {f"PCR{i}": f"{i + 1:02x}" * 48 for i in (0, 1, 2)}


def parent(*args, key_dir, timeout=60):
    return subprocess.run([PYTHON, str(PARENT_CLI), *args], env=tcp_env(key_dir),
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize("command", [
    ["client", "16", "{port}", "--image", str(ROOT / "models" / "labels.json")],
    ["classify", str(ROOT / "models" / "labels.json"), "--port", "{port}"],
    ["server", "{port}"],
])
def test_without_a_policy_nothing_is_trusted(tmp_path, command):
    port = str(free_port())  # nothing listens there: the refusal must come before any I/O
    run = parent(*[part.format(port=port) for part in command], key_dir=tmp_path / "keys")
    assert run.returncode == 1, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr
    assert "no PCR policy, so no enclave is trusted: run `parent.py trust measurements.json`" in lines[0]
    assert "--policy FILE" in lines[0]


def test_trust_installs_the_policy_the_commands_then_use(tmp_path):
    measurements = tmp_path / "measurements.json"
    measurements.write_text(json.dumps({"Measurements": {"HashAlgorithm": "Sha384 { ... }", **PCRS}}))
    run = parent("trust", str(measurements), key_dir=tmp_path / "keys")
    assert run.returncode == 0, run.stderr
    installed = tmp_path / "keys" / "policy.json"
    assert stat.S_IMODE(installed.stat().st_mode) == 0o600
    assert json.loads(installed.read_text())["allowed_pcrs"] == [PCRS]
    assert f"PCR0 {PCRS['PCR0'][:16]}..." in run.stdout
    # Now the client gets past trust and stops at the next missing piece (no server state).
    run = parent("client", "16", "5005", "--image", str(ROOT / "models" / "labels.json"),
                 key_dir=tmp_path / "keys")
    assert run.returncode == 1 and "start `parent.py server 5006` first" in run.stderr


@pytest.mark.parametrize("policy, message", [
    ({"allowed_pcrs": []}, "allowed_pcrs"),
    ({}, "allowed_pcrs"),
    ({"allowed_pcrs": [{"PCR0": "00" * 48, "PCR1": "00" * 48, "PCR2": "00" * 48}]}, "zero"),
    ({"allowed_pcrs": [{"PCR0": "ab" * 48}]}, "PCR1"),
])
def test_trust_refuses_a_policy_that_pins_nothing(tmp_path, policy, message):
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(policy))
    run = parent("trust", str(path), key_dir=tmp_path / "keys")
    assert run.returncode == 2 and message in run.stderr, run.stderr
    assert not (tmp_path / "keys" / "policy.json").exists()


def test_an_installed_policy_others_can_write_is_refused(tmp_path):
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"allowed_pcrs": [PCRS]}))
    assert parent("trust", str(policy), key_dir=tmp_path / "keys").returncode == 0
    os.chmod(tmp_path / "keys" / "policy.json", 0o666)
    run = parent("classify", str(ROOT / "models" / "labels.json"), key_dir=tmp_path / "keys")
    assert run.returncode == 1 and "writable only by you" in run.stderr


def test_insecure_any_enclave_is_explicit_and_loud(tmp_path):
    run = parent("client", "16", str(free_port()), "--image", str(ROOT / "models" / "labels.json"),
                 "--insecure-any-enclave", key_dir=tmp_path / "keys")
    assert "WARNING: --insecure-any-enclave: PCRs are NOT checked" in run.stderr
    assert "start `parent.py server 5006` first" in run.stderr  # it went on past trust


def test_dev_attestation_writes_the_policy_a_local_run_uses(stack, test_image_paths):
    """``enclave/app.py --dev-attestation DIR`` writes DIR/policy.json beside dev_root.pem."""
    policy = stack.dev_dir / "policy.json"
    pinned = json.loads(policy.read_text())["allowed_pcrs"][0]
    assert pinned == json.loads(json.dumps(stack.trust().policy.to_dict()))["allowed_pcrs"][0]
    run = stack.parent_cli("classify", str(test_image_paths[0]), "--port", str(stack.client_port),
                           "--dev-root", str(stack.dev_root), "--policy", str(policy),
                           "--json", "--no-progress")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["label"]
