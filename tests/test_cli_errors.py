"""The command line as a user meets it when something is wrong (issue 19 §2): one line
saying what to do, the right exit status, and at once.

- no project environment (the system Python): one line on how to get it, exit 1;
- vsock off Nitro: the enclave and the client say so within seconds, naming --transport tcp;
- the parent server down: a one-shot client hears it from the enclave at once;
- ports and CIDs that cannot be: usage errors (exit 2, one line);
- every argument has help, and every document a help text names exists;
- a policy error names its file once;
- the enclave logs to stderr, without TFLite's delegate notice.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
import venv
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from harness import ENCLAVE_APP, PARENT_CLI, PYTHON, ROOT, EnclaveStack, Proc, free_port, tcp_env


def run(args: list[str], python: str = PYTHON, env: dict | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([python, *args], capture_output=True, text=True, cwd=ROOT,
                          env=env or tcp_env(), timeout=timeout)


# -- no project environment ------------------------------------------------------------
@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> str:
    """A Python with the standard library only, like the system python3 of a fresh machine."""
    root = tmp_path_factory.mktemp("bare-venv")
    venv.EnvBuilder(with_pip=False).create(root)
    python = str(root / "bin" / "python")
    assert run(["-c", "import Crypto"], python=python).returncode != 0
    return python


def bare_env() -> dict:
    env = tcp_env()
    for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(name, None)
    return env


@pytest.mark.parametrize("script, args", [
    (PARENT_CLI, ["server", "5006"]),
    (PARENT_CLI, ["classify", "sample_images"]),
    (PARENT_CLI, ["verify-attestation", "doc.cbor"]),
    (ENCLAVE_APP, ["3", "5005", "5006"]),
], ids=["server", "classify", "verify-attestation", "enclave"])
def test_missing_packages_is_one_line_on_how_to_get_them(bare_python, script, args):
    done = run([str(script), *args], python=bare_python, env=bare_env())
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert re.match(rf"{script.name}: missing Python packages \(No module named '\w+'\)",
                    lines[0]), lines[0]
    assert f".venv/bin/python {script.parent.name}/{script.name} ..." in lines[0]
    assert "source .venv/bin/activate" in lines[0]


@pytest.mark.parametrize("script", ["parent/parent.py", "enclave/app.py"])
def test_missing_packages_without_venv_says_to_create_it(script, tmp_path, monkeypatch):
    from nitrolesion.environment import environment_problem

    monkeypatch.chdir(tmp_path)  # a clone where .venv was never made
    line = environment_problem(script, "missing Python packages (x)", root=tmp_path)
    assert "missing Python packages (x): run `python3 dev.py setup` once to create .venv, " \
           f"then use `.venv/bin/python {script} ...`" in line
    assert line.endswith("or `source .venv/bin/activate` first")


# -- vsock off Nitro -------------------------------------------------------------------
VSOCK_HINT = "off Nitro, use --transport tcp (or ENCLAVE_TRANSPORT=tcp)"


def test_enclave_over_vsock_off_nitro_says_so_at_once(tmp_path, model_present):
    """Forgetting ENCLAVE_TRANSPORT=tcp: without vsock the enclave cannot start; with a
    vsock that reaches no parent (a VM, not an enclave) it says so and exits."""
    env = tcp_env()
    env.pop("ENCLAVE_TRANSPORT")
    started = time.monotonic()
    enclave = subprocess.Popen(
        [PYTHON, str(ENCLAVE_APP), "3", str(free_port()), str(free_port()),
         "--dev-attestation", str(tmp_path / "dev")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    lines: list[str] = []
    said = threading.Event()

    def read() -> None:
        for line in enclave.stderr:
            lines.append(line)
            if VSOCK_HINT in line:
                said.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert said.wait(30), "".join(lines)
        assert time.monotonic() - started < 30
        # Where the kernel tells vsock cannot work (no transport, no route to the
        # parent's CID), the enclave exits 1 with that one reason.
        status = enclave.wait(timeout=20) if "vsock is not available" in "".join(lines) else None
    finally:
        enclave.terminate()
        enclave.wait(timeout=20)
        reader.join(timeout=5)
    output = "".join(lines)
    assert "Traceback" not in output, output
    if status is not None:
        assert status == 1, output
        assert re.search(r"^enclave: cannot (start|reach the parent): vsock is not available on "
                         r"this machine \(.*\): off Nitro, use --transport tcp", output, re.M), output


@pytest.mark.skipif(os.path.exists("/dev/nitro_enclaves"), reason="a Nitro parent instance")
def test_server_over_vsock_off_nitro_says_so_at_once(tmp_path):
    """Without vsock the server cannot listen (exit 1); on a VM with vsock but no Nitro
    Enclaves driver it listens, and says at once that no enclave runs here."""
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"allowed_pcrs": [{f"PCR{i}": "11" * 48 for i in range(3)}]}))
    env = tcp_env(tmp_path / "keys")
    env.pop("ENCLAVE_TRANSPORT")
    server = Proc([str(PARENT_CLI), "server", str(free_port()), "--policy", str(policy)], env)
    try:
        server.wait_for(re.escape(VSOCK_HINT), timeout=20)
    finally:
        server.stop()
    assert "Traceback" not in server.output, server.output
    assert re.search(r"^parent.py server: (note: this machine has no /dev/nitro_enclaves|vsock "
                     r"is not available on this machine)", server.output, re.M), server.output


def test_classify_over_vsock_off_nitro_fails_at_once(tmp_path, test_image_paths):
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"allowed_pcrs": [{f"PCR{i}": "11" * 48 for i in range(3)}]}))
    env = tcp_env(tmp_path / "keys")
    env.pop("ENCLAVE_TRANSPORT")
    started = time.monotonic()
    done = run([str(PARENT_CLI), "classify", str(test_image_paths[0]), "--port", str(free_port()),
                "--policy", str(policy), "--no-progress"], env=env)
    assert time.monotonic() - started < 20
    assert done.returncode == 1, done.stderr
    assert VSOCK_HINT in done.stderr and "Traceback" not in done.stderr


# -- the parent server down ------------------------------------------------------------
def test_one_shot_with_the_parent_server_down_fails_at_once(tmp_path, test_image_paths,
                                                            model_present):
    stack = EnclaveStack(tmp_path)
    image = [str(test_image_paths[0]), "--dev-root", str(stack.dev_root)]

    def timed(*args: str) -> tuple[subprocess.CompletedProcess, float]:
        started = time.monotonic()
        return stack.parent_cli(*args), time.monotonic() - started

    pool = ThreadPoolExecutor(max_workers=1)
    try:
        # The client forgot --transport tcp (this stack runs over TCP): said at once. It
        # never reaches the stack, so it waits out the kernel's ~2 s vsock connect beside
        # the rest of the test rather than before it.
        forgetful = pool.submit(timed, "client", "16", str(stack.client_port), "--image", *image,
                                "--transport", "vsock")

        mark = len(stack.enclave.lines)
        stack.server.stop()
        stack.enclave.wait_for(r"parent link lost", start=mark, timeout=20)
        started = time.monotonic()
        down = stack.parent_cli("client", "16", str(stack.client_port), "--image", *image)
        assert time.monotonic() - started < 10, down.stderr
        assert down.returncode == 1
        # Exactly this line: the clear text names the command to run and nothing of the image.
        assert down.stderr.splitlines() == [
            "parent.py client: the enclave refused: UNAVAILABLE: the enclave cannot reach the "
            f"parent server (start `parent.py server {stack.parent_port}`)"], down.stderr

        # Once a server is back, the enclave announces again and one-shot requests flow.
        mark = len(stack.enclave.lines)
        stack.start_server()
        stack.server.wait_for(r"Enclave public key received", timeout=30)
        stack.enclave.wait_for(r"announced public key to parent", start=mark, timeout=10)
        again = stack.parent_cli("client", "16", str(stack.client_port), "--image", *image)
        assert again.returncode == 0, again.stderr
        stack.server.wait_for(r"Classification received", timeout=30)

        forgot, seconds = forgetful.result(timeout=60)
        assert forgot.returncode == 1 and VSOCK_HINT in forgot.stderr, forgot.stderr
        assert seconds < 20
    finally:
        pool.shutdown(wait=True)
        stack.stop(wait=False)


# -- ports and CIDs --------------------------------------------------------------------
@pytest.mark.parametrize("args, line", [
    (["server", "99999"], "parent.py server: port must be between 1 and 65535, got 99999"),
    (["server", "0"], "parent.py server: port must be between 1 and 65535, got 0"),
    (["client", "16", "70000"], "parent.py client: port must be between 1 and 65535, got 70000"),
    (["client", "3", "5005"],
     "parent.py client: enclave CID must be between 4 and 4294967294, got 3"),
    (["client", "4294967295", "5005"],
     "parent.py client: enclave CID must be between 4 and 4294967294, got 4294967295"),
    (["classify", "x.jpg", "--port", "65536"],
     "parent.py classify: --port must be between 1 and 65535, got 65536"),
    (["classify", "x.jpg", "--cid", "2"],
     "parent.py classify: --cid must be between 4 and 4294967294, got 2"),
])
def test_impossible_ports_and_cids_are_usage_errors(args, line, tmp_path):
    done = run([str(PARENT_CLI), *args], env=tcp_env(tmp_path / "keys"))
    assert (done.returncode, done.stderr.splitlines()) == (2, [line])


@pytest.mark.parametrize("args, line", [
    (["3", "5005", "99999"], "app.py: parent_port must be between 1 and 65535, got 99999"),
    (["3", "0", "5006"], "app.py: client_port must be between 1 and 65535, got 0"),
    (["4294967295", "5005", "5006"],
     "app.py: parent_cid must be between 1 and 4294967294, got 4294967295"),
])
def test_enclave_refuses_impossible_ports_and_cids(args, line):
    done = run([str(ENCLAVE_APP), *args])
    assert (done.returncode, done.stderr.splitlines()) == (2, [line])


# -- help ------------------------------------------------------------------------------
def all_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every parser a user can ask for --help: parent.py and its commands, the real
    verify-attestation parser, and the enclave app."""
    from nitrolesion.enclave.app import build_parser as enclave_parser
    from nitrolesion.attestation.cli import build_parser as verify_parser
    from nitrolesion.parent.cli import build_parser as parent_parser

    top = parent_parser()
    parsers = {"parent.py": top, "parent.py verify-attestation": verify_parser(),
               "app.py": enclave_parser()}
    for action in top._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                parsers.setdefault(f"parent.py {name}", sub)
    return parsers


@pytest.mark.parametrize("name", sorted(all_parsers()))
def test_every_argument_has_help(name):
    parser = all_parsers()[name]
    bare = [action.option_strings or [action.dest] for action in parser._actions
            if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))
            and not (action.help or "").strip()]
    assert not bare, f"{name}: no help for {bare}"


def headings(path: Path) -> set[str]:
    return {line.lstrip("#").strip() for line in path.read_text(encoding="utf-8").splitlines()
            if line.startswith("#")}


@pytest.mark.parametrize("name", sorted(all_parsers()))
def test_documents_named_in_help_exist(name):
    text = " ".join(all_parsers()[name].format_help().split())  # undo argparse's wrapping
    for match in re.finditer(r"((?:[\w.-]+/)*[\w.-]+\.md)(?:,? section '([^']+)')?", text):
        document = ROOT / match.group(1)
        assert document.is_file(), f"{name} --help names {match.group(1)}, which does not exist"
        if match.group(2):
            assert match.group(2) in headings(document), \
                f"{name} --help names section {match.group(2)!r} of {match.group(1)}: no such heading"


def test_help_points_policy_readers_at_the_attestation_document():
    for name in ("parent.py verify-attestation", "parent.py server", "parent.py client",
                 "parent.py classify"):
        text = " ".join(all_parsers()[name].format_help().split())
        assert "docs/ATTESTATION.md, section 'Attestation policy'" in text, name


# -- policy errors ---------------------------------------------------------------------
@pytest.fixture(params=["not-json", "bad-content", "missing"])
def bad_policy(request, tmp_path) -> tuple[Path, str]:
    path = tmp_path / "p.json"
    if request.param == "not-json":
        path.write_text("{")
        return path, "expected JSON"
    if request.param == "bad-content":
        path.write_text('{"allowed_pcrs": []}')
        return path, "allowed_pcrs: expected at least one PCR set"
    return path, "expected a readable file, got No such file or directory"


@pytest.mark.parametrize("command", ["server", "verify-attestation", "trust"])
def test_policy_error_names_its_file_once(command, bad_policy, tmp_path):
    path, reason = bad_policy
    args = {"server": ["server", "5006", "--policy", str(path)],
            "verify-attestation": ["verify-attestation", str(tmp_path / "doc"), "--policy",
                                   str(path)],
            "trust": ["trust", str(path)]}[command]
    done = run([str(PARENT_CLI), *args], env=tcp_env(tmp_path / "keys"))
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert line.count(str(path)) == 1 and reason in line, line
    label = f"{path}" if command == "trust" else f"--policy {path}"
    assert f"{label}: {reason}" in line, line


# -- enclave logging -------------------------------------------------------------------
def test_enclave_logs_to_stderr_without_the_tflite_notice(tmp_path, model_present):
    enclave = subprocess.Popen(
        [PYTHON, str(ENCLAVE_APP), "3", str(free_port()), str(free_port()),
         "--dev-attestation", str(tmp_path / "dev")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=tcp_env(), cwd=ROOT)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in enclave.stderr:
            lines.append(line)
            if "ready in" in line:
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(60), "".join(lines)
    finally:
        enclave.terminate()
        stdout = enclave.stdout.read()
        enclave.wait(timeout=20)
        reader.join(timeout=5)
    errors = "".join(lines)
    assert stdout == ""
    assert " enclave INFO listening for clients on tcp:" in errors
    assert "XNNPACK" not in errors and "TensorFlow Lite" not in errors, errors


def test_tflite_notice_filter_keeps_everything_else(capfd):
    from nitrolesion.enclave.app import without_tflite_notices

    with without_tflite_notices():
        os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n")
        os.write(2, b"WARNING: something the runtime wants us to know\n")
        print("a log line of ours", file=sys.stderr)
    print("after", file=sys.stderr)
    err = capfd.readouterr().err
    # (Order is not checked: under capfd, sys.stderr bypasses fd 2.)
    assert sorted(err.splitlines()) == sorted([
        "WARNING: something the runtime wants us to know", "a log line of ours", "after"])
