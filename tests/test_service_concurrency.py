"""Serving many clients: real enclave processes over loopback TCP, nothing mocked.

Every classification is compared with what the in-process classifier gives for the same
bytes with the same model file, so a result that went to the wrong client (or the wrong
request of the right client) fails, whatever the model's labels are.

Some tests drive the session protocol frame by frame (``RawSession``) because
``EnclaveClient.classify_many`` retries BUSY and never sends a message twice.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import threading
from pathlib import Path

import pytest

from harness import EnclaveStack
from nitrolesion.errors import ConnectionClosed
from nitrolesion.model.classifier import LesionModel, Prediction
from nitrolesion.model.labels import CODES
from nitrolesion.protocol import ResultReceived
from nitrolesion.wire.frames import Frame
from nitrolesion.wire.messages import (
    ErrorCode, ErrorMessage, Message, ResultPayload, check_prediction, decode_message)
from nitrolesion.parent.classify import CSV_COLUMNS, NOTICE, read_results_csv
from nitrolesion.parent.enclave_client import EnclaveClient

#: Concurrent clients in the many-clients test, and images each one sends.
CLIENTS = 16
IMAGES_PER_CLIENT = 3
#: Seconds to wait for any one answer: generous, so a loaded machine is slow, not flaky.
ANSWER_TIMEOUT = 30.0
#: Results must match the in-process classifier this closely (same code, same model).
TOLERANCE = 1e-6


# -- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference():
    """The in-process classifier on the same model file the enclave loads."""
    return LesionModel().new_classifier()


@pytest.fixture(scope="module")
def corpus(many_image_paths, reference) -> list[tuple[Path, bytes, Prediction]]:
    """Real images (the committed samples and crops of them: conftest.py many_image_paths)
    whose expected probability vectors are pairwise different.

    With identical expected answers, two images swapped between clients would go unnoticed;
    skipping look-alikes keeps the mix-up checks meaningful for any model (a confident or
    quantized model can give two images the same vector).
    """
    needed = CLIENTS * IMAGES_PER_CLIENT
    chosen, seen = [], set()
    for path in many_image_paths:
        data = path.read_bytes()
        expected = reference.classify(data)
        key = tuple(round(expected.probabilities[c], 6) for c in CODES)
        if key not in seen:
            seen.add(key)
            chosen.append((path, data, expected))
            if len(chosen) == needed:
                return chosen
    pytest.fail(f"the model gives only {len(chosen)} distinct answers over "
                f"{len(many_image_paths)} images; expected at least {needed} to tell clients' "
                "results apart")


@pytest.fixture(scope="module")
def shared_stack(tmp_path_factory, model_present):
    """One parent server + enclave (default workers and queue) for the non-destructive tests."""
    running = EnclaveStack(tmp_path_factory.mktemp("shared-stack"))
    yield running
    running.stop(wait=False)


@pytest.fixture(scope="module")
def trust(shared_stack):
    return shared_stack.trust()


def lone_enclave(tmp_path: Path, *args: str) -> EnclaveStack:
    """An enclave without a parent server (sessions do not need one), for tests that stop it."""
    return EnclaveStack(tmp_path, enclave_args=args, start_server=False)


# -- helpers -------------------------------------------------------------------------------
def row_result(row: dict) -> Prediction:
    """A classify results row (JSON, or CSV strings) read back through the strict decoder."""
    probabilities = row.get("probabilities") or {c: float(row[f"p_{c}"]) for c in CODES}
    return check_prediction({
        "code": row["code"], "name": row["label"], "confidence": float(row["confidence"]),
        "probabilities": {c: float(p) for c, p in probabilities.items()},
        "malignant": float(row["malignant"]), "refer": row["refer"] in (True, "true"),
        "refer_reason": row["refer_reason"] or None})


def assert_same_prediction(result: Prediction, expected: Prediction) -> None:
    assert result.code == expected.code
    assert set(result.probabilities) == set(CODES)
    for code in CODES:
        assert result.probabilities[code] == pytest.approx(expected.probabilities[code],
                                                           abs=TOLERANCE), code
    assert result.malignant == pytest.approx(expected.malignant, abs=TOLERANCE)
    assert (result.refer, result.refer_reason) == (expected.refer, expected.refer_reason)


class RawSession:
    """An attested session whose frames the test sends and reads one at a time.

    Attestation and SESSION_OPEN go through EnclaveClient (verified against ``trust``);
    after that the test sends, replays or moves the SESSION_CLASSIFY frames that the
    client state machine (``self.session``) makes, and reads answers through it.
    """

    def __init__(self, stack: EnclaveStack, trust) -> None:
        self.client = EnclaveClient(stack.endpoint(), trust, timeout=ANSWER_TIMEOUT)
        self.client.attest()
        self.client.open_session()
        self.session = self.client.session
        self.connection = self.client.connection

    def seal(self, image: bytes) -> Frame:
        """The next SESSION_CLASSIFY of this session (its counter is used up even if unsent)."""
        return self.session.classify(image)[1]

    def send(self, frame: Frame) -> None:
        self.connection.send_frame(frame)

    def classify_async(self, image: bytes) -> int:
        """Send one image without waiting; returns the request counter its result names."""
        counter, frame = self.session.classify(image)
        self.send(frame)
        return counter

    def receive(self) -> Message:
        return decode_message(self.connection.receive(timeout=ANSWER_TIMEOUT))

    def result(self) -> ResultPayload:
        """The next SESSION_RESULT, opened by the client state machine."""
        event = self.session.receive(self.connection.receive(timeout=ANSWER_TIMEOUT))
        assert isinstance(event, ResultReceived), f"expected a result, got {event!r}"
        return event.payload

    def expect_error_and_close(self, code: str) -> ErrorMessage:
        """The enclave answers with an ERROR frame ``code`` and then closes the connection."""
        message = self.receive()
        assert isinstance(message, ErrorMessage), f"expected ERROR {code}, got {message!r}"
        assert message.code == code, message
        with pytest.raises(ConnectionClosed):
            self.connection.receive(timeout=ANSWER_TIMEOUT)
        return message

    def close(self) -> None:
        self.client.close()


def assert_serves_new_session(stack: EnclaveStack, trust, item) -> None:
    """A fresh client can still attest, open a session and get a correct result."""
    _, data, expected = item
    with EnclaveClient(stack.endpoint(), trust, timeout=ANSWER_TIMEOUT) as client:
        client.attest()
        client.open_session()
        [outcome] = list(client.classify_many([data]))
    assert outcome.error is None, outcome.error
    assert_same_prediction(outcome.result, expected)


# -- many clients at once ------------------------------------------------------------------
def test_sixteen_concurrent_sessions_each_get_their_own_correct_results(shared_stack, trust, corpus):
    batches = [corpus[i * IMAGES_PER_CLIENT:(i + 1) * IMAGES_PER_CLIENT] for i in range(CLIENTS)]
    start = threading.Barrier(CLIENTS)
    outcomes: dict[int, list] = {}
    failures: dict[int, BaseException] = {}

    def run(number: int) -> None:
        try:
            with EnclaveClient(shared_stack.endpoint(), trust, timeout=ANSWER_TIMEOUT) as client:
                start.wait(timeout=ANSWER_TIMEOUT)  # all 16 attest and send at the same time
                client.attest()
                client.open_session()
                outcomes[number] = list(client.classify_many(data for _, data, _ in batches[number]))
        except BaseException as exc:  # reported by the main thread
            failures[number] = exc

    threads = [threading.Thread(target=run, args=(n,), name=f"client-{n}") for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures, failures
    assert sorted(outcomes) == list(range(CLIENTS))
    for number, batch in enumerate(batches):
        received = sorted(outcomes[number], key=lambda outcome: outcome.index)
        assert [outcome.index for outcome in received] == list(range(IMAGES_PER_CLIENT))
        for outcome, (path, _, expected) in zip(received, batch):
            assert outcome.error is None, (number, path.name, outcome.error)
            assert_same_prediction(outcome.result, expected)


# -- backpressure --------------------------------------------------------------------------
def test_full_queue_answers_busy_and_the_enclave_keeps_serving(tmp_path, corpus):
    stack = lone_enclave(tmp_path, "--workers", "1", "--queue", "1")
    try:
        trust = stack.trust()
        sessions = [RawSession(stack, trust) for _ in range(4)]
        # Eight requests per session (the enclave's SESSION_WINDOW), sent round-robin without
        # reading: 32 jobs against one worker and one queue slot.
        sent: list[dict[int, tuple]] = [{} for _ in sessions]
        for round_number in range(8):
            for number, session in enumerate(sessions):
                item = corpus[(round_number * len(sessions) + number) % len(corpus)]
                sent[number][session.classify_async(item[1])] = item
        busy = []
        for number, session in enumerate(sessions):
            answered = {}
            for _ in range(len(sent[number])):
                payload = session.result()
                answered[payload.request] = payload
            assert sorted(answered) == sorted(sent[number])
            for request, payload in answered.items():
                if payload.error is not None:
                    assert payload.error[0] == ErrorCode.BUSY, payload
                    busy.append((session, sent[number][request]))
                else:
                    assert_same_prediction(payload.prediction, sent[number][request][2])
        assert busy, "32 pipelined requests against --workers 1 --queue 1 were never refused BUSY"
        # BUSY ends neither the session nor the service: retry on the same session ...
        session, item = busy[0]
        session.classify_async(item[1])
        payload = session.result()
        assert payload.prediction is not None, payload
        assert_same_prediction(payload.prediction, item[2])
        for session in sessions:
            session.close()
        # ... and a new client is served as well.
        assert_serves_new_session(stack, trust, corpus[0])
    finally:
        stack.stop(wait=False)


# -- counters and session binding ----------------------------------------------------------
def test_replayed_session_message_is_refused_and_the_connection_closed(shared_stack, trust, corpus):
    session = RawSession(shared_stack, trust)
    message = session.seal(corpus[0][1])
    session.send(message)
    assert_same_prediction(session.result().prediction, corpus[0][2])
    session.send(message)  # the very same counter and ciphertext once more
    error = session.expect_error_and_close(ErrorCode.REPLAY)
    assert "expected counter 1, got 0" in error.message
    session.close()
    assert_serves_new_session(shared_stack, trust, corpus[1])


def test_reordered_session_message_is_refused_and_the_connection_closed(shared_stack, trust, corpus):
    session = RawSession(shared_stack, trust)
    session.seal(corpus[0][1])  # counter 0 is sealed but never arrives (dropped or held back)
    skipped_ahead = session.seal(corpus[1][1])
    session.send(skipped_ahead)
    error = session.expect_error_and_close(ErrorCode.REPLAY)
    assert "expected counter 0, got 1" in error.message
    session.close()
    assert_serves_new_session(shared_stack, trust, corpus[2])


def test_message_moved_into_another_session_does_not_decrypt(shared_stack, trust, corpus):
    first, second = RawSession(shared_stack, trust), RawSession(shared_stack, trust)
    moved = first.seal(corpus[3][1])  # counter 0 of the first session
    second.send(moved)  # the second session also expects counter 0, but has its own key and id
    second.expect_error_and_close(ErrorCode.DECRYPT_FAILED)
    second.close()
    # The message itself was sound: in its own session it is classified.
    first.send(moved)
    assert_same_prediction(first.result().prediction, corpus[3][2])
    first.close()


# -- graceful shutdown ---------------------------------------------------------------------
def test_sigterm_finishes_requests_in_flight_then_exits_cleanly(tmp_path, corpus):
    stack = lone_enclave(tmp_path)
    try:
        session = RawSession(stack, stack.trust())
        sent = {session.classify_async(data): expected for _, data, expected in corpus[:24]}
        stack.enclave.process.send_signal(signal.SIGTERM)
        answered = {}
        for _ in sent:
            payload = session.result()
            assert payload.prediction is not None, payload
            answered[payload.request] = payload.prediction
        assert sorted(answered) == sorted(sent)
        for request, expected in sent.items():
            assert_same_prediction(answered[request], expected)
        with pytest.raises(ConnectionClosed):  # then the enclave closes the connection
            session.connection.receive(timeout=ANSWER_TIMEOUT)
        session.close()
        assert stack.enclave.process.wait(timeout=30) == 0
        stack.enclave.wait_for(r"shutting down: finishing requests in flight", timeout=5)
        stack.enclave.wait_for(rf"stopped after serving {len(sent)} request\(s\)", timeout=5)
    finally:
        stack.stop()


# -- parent.py classify --------------------------------------------------------------------
@pytest.fixture(scope="module")
def policy_file(trust, tmp_path_factory) -> Path:
    """A policy JSON pinning the development PCRs of the enclave under test.

    Taken from ``trust`` (measured right after the enclave booted) rather than measured
    again, so an edit to enclave/ during the run cannot make the two disagree.
    """
    path = tmp_path_factory.mktemp("policy") / "policy.json"
    path.write_text(json.dumps(trust.policy.to_dict()), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def batch(tmp_path_factory, corpus):
    """A folder of real images (symlinks: the dataset is never copied), one text file named
    .jpg, a FIFO named .jpg (reading it would block the batch forever) and a sparse 25 MiB
    file (over the enclave's 20 MiB limit and the 24 MiB frame limit, which once aborted the
    whole batch), plus two paths given on their own that cannot be read: a dangling symlink
    and a symlink loop. (Tests run as root, so a mode-000 file would still be readable; a
    folder named x.jpg is a folder to expand, not a row.)"""
    folder = tmp_path_factory.mktemp("batch") / "images"
    folder.mkdir()
    expected = {}
    for path, _, prediction in corpus[:6]:
        (folder / path.name).symlink_to(path)
        expected[str(folder / path.name)] = prediction
    (folder / "notes.jpg").write_text("not a JPEG, just text\n", encoding="utf-8")
    os.mkfifo(folder / "pipe.jpg")
    with open(folder / "huge.jpg", "wb") as handle:
        handle.truncate(25 * 1024 * 1024)
    dangling = folder.parent / "gone.jpg"
    dangling.symlink_to(folder.parent / "does-not-exist.jpg")
    loop = folder.parent / "loop.jpg"
    loop.symlink_to(loop)
    failures = {str(folder / "notes.jpg"): "BAD_IMAGE", str(dangling): "UNREADABLE",
                str(loop): "UNREADABLE", str(folder / "pipe.jpg"): "UNREADABLE",
                str(folder / "huge.jpg"): "TOO_LARGE"}
    return [folder, dangling, loop], expected, failures


def run_classify(stack: EnclaveStack, policy: Path, paths: list[Path], out: Path):
    """classify with --json: the summary on stderr is then JSON (summary_line reads it)."""
    return stack.parent_cli(
        "classify", *map(str, paths), "--out", str(out), "--no-progress", "--json",
        "--transport", "tcp", "--cid", "16", "--port", str(stack.client_port),
        "--policy", str(policy), "--dev-root", str(stack.dev_root))


def summary_line(stderr: str) -> dict:
    match = re.search(r"^summary: (\{.*\})$", stderr, re.MULTILINE)
    assert match, stderr
    return json.loads(match.group(1))


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_classify_cli_writes_every_row_and_reports_unreadable_files(
        shared_stack, policy_file, batch, tmp_path, suffix):
    paths, expected, failures = batch
    out = tmp_path / f"results{suffix}"
    run = run_classify(shared_stack, policy_file, paths, out)
    assert run.returncode == 1, run.stderr  # some rows failed
    assert "Enclave attested" in run.stderr
    total = len(expected) + len(failures)
    summary = summary_line(run.stderr)
    assert (summary["images"], summary["classified"], summary["failed"]) == (
        total, len(expected), len(failures))
    if suffix == ".json":
        document = json.loads(out.read_text(encoding="utf-8"))
        assert document["summary"] == summary and summary["complete"] is True
        assert document["provenance"]["notice"] == NOTICE
        rows = {row["file"]: row for row in document["results"]}
        assert len(rows) == len(document["results"]) == total
        for file, prediction in expected.items():
            assert "error" not in rows[file], rows[file]
            assert_same_prediction(row_result(rows[file]), prediction)
            assert len(rows[file]["top3"]) == 3
        for file, code in failures.items():
            assert rows[file]["error"]["code"] == code, rows[file]
    else:
        provenance, table = read_results_csv(out)  # provenance: '#' lines before the header
        assert provenance["notice"] == NOTICE and provenance["complete"] == "true"
        assert list(table[0]) == CSV_COLUMNS
        rows = {row["file"]: row for row in table}
        assert len(rows) == len(table) == total
        for file, prediction in expected.items():
            row = rows[file]
            assert row["error"] == "", row
            assert row["code"] == prediction.code
            assert_same_prediction(row_result(row), prediction)
        for file, code in failures.items():
            assert rows[file]["error"].startswith(f"{code}: "), rows[file]
            assert all(rows[file][f"p_{c}"] == "" for c in CODES)
    assert not out.with_name(f".{out.name}.tmp").exists()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600  # diagnoses in clear: owner only


def test_classify_cli_checks_out_before_sending_anything(shared_stack, policy_file, batch,
                                                        tmp_path):
    run = run_classify(shared_stack, policy_file, batch[0], tmp_path / "no-such-dir" / "r.csv")
    assert run.returncode == 2
    assert "no-such-dir does not exist" in run.stderr
    assert "Enclave attested" not in run.stderr  # refused before connecting
    (tmp_path / "taken.csv").mkdir()
    run = run_classify(shared_stack, policy_file, batch[0], tmp_path / "taken.csv")
    assert run.returncode == 2 and "taken.csv is a folder" in run.stderr


def test_classify_cli_gives_the_rows_on_stdout_when_out_cannot_be_written(
        shared_stack, policy_file, batch, tmp_path):
    good = sorted(Path(file) for file in batch[1])
    out = tmp_path / "results.csv"
    (tmp_path / ".results.csv.tmp").mkdir()  # the temporary file cannot be created
    run = run_classify(shared_stack, policy_file, good, out)
    assert run.returncode == 1
    assert f"could not write {out}" in run.stderr and "follow on stdout" in run.stderr
    rows = json.loads(run.stdout)
    assert sorted(row["file"] for row in rows) == sorted(map(str, good))
    assert all("error" not in row for row in rows)
    assert not out.exists()


def test_classify_cli_exits_zero_when_every_row_succeeds(shared_stack, policy_file, batch, tmp_path):
    good = sorted(Path(file) for file in batch[1])
    out = tmp_path / "results.csv"
    stale = tmp_path / ".results.csv.tmp"  # left by a crashed run, world-readable
    stale.write_text("stale")
    stale.chmod(0o644)
    run = run_classify(shared_stack, policy_file, good, out)
    assert run.returncode == 0, run.stderr
    assert summary_line(run.stderr)["failed"] == 0
    assert os.path.getsize(out) > 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600 and not stale.exists()
