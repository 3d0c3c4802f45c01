"""The README's three commands as real processes over TCP loopback, plus classify and demo."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import cbor2
import pytest

from harness import ENCLAVE_APP, PARENT_CLI, PYTHON, ROOT, EnclaveStack, free_port, tcp_env, write_dev_policy
from nitrolesion.crypto.envelope import generate_keypair, public_key_der
from nitrolesion.model.classifier import LesionModel
from nitrolesion.model.labels import CODES
from nitrolesion.transport import connect
from nitrolesion.wire.frames import MessageType
from nitrolesion.wire.messages import ErrorMessage, decode_message
from nitrolesion.parent.enclave_client import EnclaveClient


@pytest.fixture(scope="module")
def stack(tmp_path_factory, model_present):
    """One parent server + enclave for this module's tests instead of one per test (~1.5 s
    each): they only add requests, read the logs from their own mark onwards, and a test
    that changes the stack's files puts them back."""
    running = EnclaveStack(tmp_path_factory.mktemp("pipeline"))
    yield running
    running.stop(wait=False)


@pytest.fixture(scope="module")
def reference():
    """What the shipped model says in-process, to compare the pipeline's answers with."""
    classifier = LesionModel().new_classifier()
    return lambda path: classifier.classify(path.read_bytes())


def trust_args(stack: EnclaveStack) -> list[str]:
    policy = write_dev_policy(stack, stack.tmp / "policy.json")
    return ["--policy", str(policy), "--dev-root", str(stack.dev_root)]


def test_three_commands_classify_a_real_image(stack, test_image_paths, reference):
    image = test_image_paths[1]
    expected = reference(image)
    mark = len(stack.server.lines)
    run = stack.parent_cli("client", "16", str(stack.client_port), "--image", str(image),
                           *trust_args(stack))
    assert run.returncode == 0, run.stderr
    assert "Image encrypted and sent" in run.stdout
    match = stack.server.wait_for(
        r"Classification received: (.+) \((\d\.\d\d)\), malignant (\d\.\d\d)( REFER)?$", start=mark)
    assert match.group(1) == expected.name
    assert float(match.group(2)) == pytest.approx(expected.confidence, abs=0.006)
    assert float(match.group(3)) == pytest.approx(expected.malignant, abs=0.006)
    assert bool(match.group(4)) == expected.refer
    # The enclave keeps serving after one image (unlike the old demo): a second one works.
    second = test_image_paths[2]
    lines_before = len(stack.server.lines)
    run = stack.parent_cli("client", "16", str(stack.client_port), "--image", str(second),
                           *trust_args(stack))
    assert run.returncode == 0, run.stderr
    match = stack.server.wait_for(r"Classification received: (.+) \(", start=lines_before)
    assert match.group(1) == reference(second).name


def test_server_never_prints_or_stores_plaintext_keys(stack, test_image_paths):
    mark = len(stack.server.lines)
    stack.parent_cli("client", "16", str(stack.client_port), "--image", str(test_image_paths[0]),
                     *trust_args(stack))
    stack.server.wait_for("Classification received", start=mark)
    key_file = stack.key_dir / "parent_key.pem"
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    logs = stack.server.output + stack.enclave.output
    assert "PRIVATE KEY" not in logs and "BEGIN" not in logs


def test_classify_json_matches_in_process_model(stack, test_image_paths, reference):
    image = test_image_paths[3]
    run = stack.parent_cli("classify", str(image), "--port", str(stack.client_port), "--json",
                           *trust_args(stack))
    assert run.returncode == 0, run.stderr
    row = json.loads(run.stdout)
    expected = reference(image)
    assert row["code"] == expected.code and row["label"] == expected.name
    assert list(row["probabilities"]) == list(CODES)
    for code in CODES:
        assert row["probabilities"][code] == pytest.approx(expected.probabilities[code], abs=1e-5)
    assert [c for c, _ in row["top3"]] == [c for c, _ in expected.top(3)]
    assert row["malignant"] == pytest.approx(expected.malignant, abs=1e-5)
    assert (row["refer"], row["refer_reason"]) == (expected.refer, expected.refer_reason)
    assert "Enclave attested" in run.stderr


def test_a_photo_that_is_not_a_lesion_is_referred_as_such(stack, reference):
    """A natural photo (scikit-image's CC0 coffee cup) through the real enclave process:
    the sealed result says refer, reason not_a_lesion, in classify's row and on the
    parent server's line."""
    photo = ROOT / "tests" / "fixtures" / "not-a-lesion" / "coffee.jpg"
    assert reference(photo).refer_reason == "not_a_lesion"
    run = stack.parent_cli("classify", str(photo), "--port", str(stack.client_port), "--json",
                           *trust_args(stack))
    assert run.returncode == 0, run.stderr
    row = json.loads(run.stdout)
    assert (row["refer"], row["refer_reason"]) == (True, "not_a_lesion")
    mark = len(stack.server.lines)
    run = stack.parent_cli("client", "16", str(stack.client_port), "--image", str(photo),
                           *trust_args(stack))
    assert run.returncode == 0, run.stderr
    stack.server.wait_for(r"Classification received: .+, malignant \d\.\d\d REFER \(not a lesion\)$",
                          start=mark)


def test_classify_text_output_shows_label_confidence_and_top3(stack, test_image_paths, reference):
    image = test_image_paths[4]
    run = stack.parent_cli("classify", str(image), "--port", str(stack.client_port),
                           *trust_args(stack))
    assert run.returncode == 0, run.stderr
    expected = reference(image)
    assert re.search(rf"{image.name}: {re.escape(expected.name)} \({expected.code}\) \d\.\d\d  top-3: "
                     rf".*  malignant {expected.malignant:.2f}{' REFER' if expected.refer else ''}$",
                     run.stdout, re.MULTILINE), run.stdout


def test_non_image_gets_error_and_enclave_keeps_serving(stack, tmp_path, test_image_paths):
    junk = tmp_path / "notes.jpg"
    junk.write_text("definitely not a JPEG")
    run = stack.parent_cli("client", "16", str(stack.client_port), "--image", str(junk),
                           *trust_args(stack))
    assert run.returncode == 1
    error_lines = [line for line in run.stderr.splitlines() if "BAD_IMAGE" in line]
    # A one-shot error travels in clear past the host: it says what kind of failure, never
    # what the enclave saw in the image (format, dimensions).
    assert len(error_lines) == 1 and "could not classify this image" in error_lines[0]
    assert not re.search(r"\d+x\d+|JPEG|PNG|pixels", error_lines[0])
    mark = len(stack.server.lines)
    run = stack.parent_cli("client", "16", str(stack.client_port), "--image",
                           str(test_image_paths[0]), *trust_args(stack))
    assert run.returncode == 0, run.stderr
    stack.server.wait_for("Classification received", start=mark)


def test_malformed_frame_gets_error_frame_and_enclave_keeps_serving(stack, test_image_paths):
    connection = connect(stack.endpoint(), timeout=10)
    connection._sock.sendall(b"NL\x09\x03" + b"\x00" * 8)  # protocol version 9
    answer = decode_message(connection.receive())
    connection.close()
    assert isinstance(answer, ErrorMessage) and answer.code == "BAD_FRAME"
    assert "version" in answer.message
    connection = connect(stack.endpoint(), timeout=10)
    connection.send(MessageType.HELLO, cbor2.dumps({"nonce": 5}))  # wrong field type
    answer = decode_message(connection.receive())
    connection.close()
    assert answer.code == "BAD_MESSAGE" and "nonce" in answer.message
    with EnclaveClient(stack.endpoint(), stack.trust()) as client:
        client.attest()
        client.open_session()
        [outcome] = list(client.classify_many([test_image_paths[0].read_bytes()]))
    assert outcome.result is not None and outcome.result.code in CODES


def test_client_refuses_a_key_that_is_not_the_attested_one(stack, test_image_paths):
    """The host hands the client its own key: the client must not send anything."""
    announce = stack.key_dir / "enclave_announce.cbor"
    genuine = announce.read_bytes()
    data = cbor2.loads(genuine)
    data["public_key"] = public_key_der(generate_keypair())
    mark = len(stack.enclave.lines)
    announce.write_bytes(cbor2.dumps(data))
    try:
        run = stack.parent_cli("client", "16", str(stack.client_port), "--image",
                               str(test_image_paths[0]), *trust_args(stack))
    finally:
        announce.write_bytes(genuine)  # the module's other tests share this stack
    assert run.returncode == 1
    assert "PublicKeyMismatch" in run.stderr and "nothing was sent" in run.stderr
    assert not any("one-shot request" in line for line in stack.enclave.lines[mark:])


def test_client_rejects_an_untrusted_root(stack, test_image_paths):
    run = stack.parent_cli("client", "16", str(stack.client_port), "--image",
                           str(test_image_paths[0]))  # no --dev-root: only the AWS root
    assert run.returncode == 1
    assert "UntrustedRoot" in run.stderr and "nothing was sent" in run.stderr


def test_client_without_server_state_says_what_to_do(tmp_path):
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"allowed_pcrs": [{f"PCR{i}": "ab" * 48 for i in (0, 1, 2)}]}))
    run = subprocess.run([PYTHON, str(PARENT_CLI), "client", "16", "5005", "--image",
                          str(ROOT / "models" / "labels.json"), "--policy", str(policy)],
                         env=tcp_env(tmp_path / "keys"), capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "start `parent.py server 5006` first" in run.stderr


@pytest.mark.parametrize("args, message", [
    (["--window", "0"], "--window must be at least 1"),
    (["--out", "results.txt"], "--out must end in .csv or .json"),
    (["--out", "{tmp}/no-such-dir/results.csv"], "no-such-dir does not exist"),
])
def test_classify_usage_errors_exit_2_without_a_traceback(tmp_path, args, message):
    """These are raised in nitrolesion/parent/classify.py: parent.py once had a second
    UsageError class there, and each one ended in a traceback."""
    args = [a.format(tmp=tmp_path) for a in args]
    run = subprocess.run([PYTHON, str(PARENT_CLI), "classify", str(ROOT / "models"), *args],
                         env=tcp_env(tmp_path / "keys"), capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    assert "parent.py classify: " in run.stderr and message in run.stderr
    assert "Traceback" not in run.stderr


def test_once_exits_after_one_request(tmp_path, test_image_paths, model_present):
    stack = EnclaveStack(tmp_path, enclave_args=("--once",))
    try:
        run = stack.parent_cli("client", "16", str(stack.client_port), "--image",
                               str(test_image_paths[0]), *trust_args(stack))
        assert run.returncode == 0, run.stderr
        assert stack.enclave.process.wait(timeout=30) == 0
        stack.enclave.wait_for(r"stopped after serving 1 request")
    finally:
        stack.stop()


def test_enclave_refuses_to_start_without_nsm_or_dev_flag(model_present):
    run = subprocess.run([PYTHON, str(ENCLAVE_APP), "3", str(free_port()), str(free_port())],
                         env=tcp_env(), capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert "cannot start" in run.stderr and "/dev/nsm" in run.stderr


@pytest.mark.parametrize("args, message", [
    (["--workers", "0"], "--workers, --interpreters, --queue and --max-connections must be at"),
    (["--interpreters", "0"], "--workers, --interpreters, --queue and --max-connections must be at"),
    (["--io-timeout", "0"], "--io-timeout and --handshake-timeout must be positive"),
    (["--max-image-bytes", "0"], "--max-image-bytes must be between 1 and"),
    (["--max-image-bytes", str(30 * 1024 * 1024)], "(what one message can carry)"),
    (["--max-image-pixels", "-5"], "--max-image-pixels must be at least 1"),
])
def test_enclave_refuses_settings_that_would_refuse_every_image(tmp_path, args, message):
    """Checked before anything starts: a limit of 0 would answer BAD_IMAGE to everything,
    one above what a message can carry would promise images that can never arrive."""
    run = subprocess.run([PYTHON, str(ENCLAVE_APP), "3", str(free_port()), str(free_port()),
                          "--dev-attestation", str(tmp_path / "dev"), *args],
                         env=tcp_env(), capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and message in run.stderr, run.stderr
    assert not (tmp_path / "dev").exists()  # refused before the authority was created


def test_demo_end_to_end(test_image_paths):
    run = subprocess.run([PYTHON, str(PARENT_CLI), "demo", "--image", str(test_image_paths[0])],
                         capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    for step in ("Server ready!", "Enclave public key received", "verified: module",
                 "PCR0 ", "sent ", "Classification received: ", "top-3: ", "triage: malignant ",
                 "enclave exited with status 0"):
        assert step in out, step
    assert out.index("Enclave public key received") < out.index("verified: module") \
        < out.index("Classification received: ")


def test_demo_without_any_image_says_what_to_do(tmp_path):
    env = dict(tcp_env(), HAM10000_DIR=str(tmp_path / "none"))
    code = ("import sys; import nitrolesion.parent.images as i; "
            "from pathlib import Path; i.SAMPLE_IMAGES_DIR = Path(%r); "
            "from nitrolesion.parent.cli import main; sys.exit(main(['demo']))") % str(tmp_path)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 2 and "--image PATH" in run.stderr and "sample_images/" in run.stderr
