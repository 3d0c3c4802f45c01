"""``parent.py classify`` as a user meets it: Ctrl-C, the progress bar, usage errors,
provenance in results files, the summary line.

The interrupt and progress-bar tests run the real CLI against a real enclave process over
TCP (``harness.EnclaveStack``, one worker so a batch takes seconds), with stderr a pipe or
a pseudo-terminal (``pty``) as a user's shell would give it.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import io
import json
import os
import pty
import re
import signal
import stat
import struct
import subprocess
import termios
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness import PARENT_CLI, PYTHON, ROOT, EnclaveStack, free_port, tcp_env, write_dev_policy
import nitrolesion
from nitrolesion.model.classifier import DEFAULT_MODEL_PATH, LesionModel
from nitrolesion.parent import classify
from nitrolesion.parent.classify import (
    CSV_COLUMNS, INTERRUPTED, NOTICE, close_progress, open_progress, read_results_csv,
    summary_of, summary_text, write_results)

#: Images in the batch that is interrupted: with one enclave worker, a few seconds' work.
BATCH = 100
#: Rows the progress bar must show done before the interrupt test presses Ctrl-C.
DONE_BEFORE_CTRL_C = 10
#: What a progress bar frame looks like ("42%|####      | 42/100 [...]").
BAR = re.compile(r"\d+%\|")
INTERRUPT_LINE = re.compile(
    r"^parent\.py classify: interrupted: (\d+) of (\d+) images classified; wrote (\S+) "
    rf"\(incomplete: (\d+) rows marked {INTERRUPTED}\)$")


# -- fixtures and helpers ------------------------------------------------------------------
@pytest.fixture(scope="module")
def slow_stack(tmp_path_factory, model_present):
    """An enclave with one worker (no parent server: sessions do not need one); its PCRs
    are installed as the key folder's policy, which classify then uses."""
    running = EnclaveStack(tmp_path_factory.mktemp("slow-stack"), enclave_args=("--workers", "1"),
                           start_server=False)
    yield running
    running.stop(wait=False)


def synthetic_jpegs(folder: Path, count: int) -> list[Path]:
    """``count`` small, different JPEGs (seeded noise): the model answers for any picture."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(19)
    paths = []
    for number in range(count):
        pixels = rng.integers(0, 256, size=(120, 160, 3), dtype=np.uint8)
        path = folder / f"img{number:03d}.jpg"
        Image.fromarray(pixels).save(path, format="JPEG", quality=85)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("batch") / "images"
    synthetic_jpegs(folder, BATCH)
    return folder


def cli_args(stack: EnclaveStack, *args: str) -> list[str]:
    return [str(PARENT_CLI), "classify", *args, "--port", str(stack.client_port),
            "--dev-root", str(stack.dev_root)]


class PtyRun:
    """The CLI with stderr on a pseudo-terminal (stdout a pipe), as in a user's shell:
    everything the terminal shows is collected in ``text``."""

    def __init__(self, stack: EnclaveStack, *args: str) -> None:
        master, slave = pty.openpty()
        # A real terminal has a size; tqdm sizes its bar from it.
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
        self.process = subprocess.Popen([PYTHON, *cli_args(stack, *args)], env=stack.env,
                                        cwd=ROOT, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=slave)
        os.close(slave)
        self._master = master
        self._chunks: list[bytes] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self._master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            with self._lock:
                self._chunks.append(chunk)
        os.close(self._master)

    @property
    def text(self) -> str:
        with self._lock:
            return b"".join(self._chunks).decode("utf-8", "replace")

    def wait_for(self, predicate, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self.text):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise AssertionError(f"not seen within {timeout} s (exit "
                                     f"{self.process.poll()}); terminal:\n{self.text!r}")
            time.sleep(0.02)

    def finish(self, timeout: float = 60.0) -> tuple[int, str, str]:
        """Exit status, stdout, and what the terminal showed (CR LF made LF)."""
        stdout = self.process.communicate(timeout=timeout)[0].decode()
        self._reader.join(timeout=10)
        return self.process.returncode, stdout, self.text.replace("\r\n", "\n")


def bar_count(text: str, total: int) -> int:
    """The highest count a progress bar frame shows so far."""
    return max((int(n) for n in re.findall(rf"(\d+)/{total}\b", text)), default=0)


def our_lines(terminal: str) -> list[str]:
    """The whole lines the CLI printed on the terminal: what follows the last carriage
    return on each line (a bar frame is erased or overwritten by the line after it),
    without the bar frames themselves."""
    lines = [line.split("\r")[-1] for line in terminal.split("\n")]
    return [line for line in lines if line.strip() and not BAR.search(line)]


def attestation_lines(lines: list[str]) -> list[str]:
    return [line for line in lines
            if line.startswith("Enclave attested:") or re.match(r"^  PCR[012]: [0-9a-f]{96}$", line)]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- Ctrl-C --------------------------------------------------------------------------------
def test_ctrl_c_saves_the_rows_done_marks_the_rest_and_exits_130(slow_stack, big_folder, tmp_path):
    """A user's Ctrl-C (SIGINT, stderr on a terminal) once the bar shows rows done."""
    out = tmp_path / "results.csv"
    run = PtyRun(slow_stack, str(big_folder), "--out", str(out))
    run.wait_for(lambda text: bar_count(text, BATCH) >= DONE_BEFORE_CTRL_C)
    run.process.send_signal(signal.SIGINT)
    status, stdout, terminal = run.finish()

    assert status == 130, terminal
    assert "Traceback" not in terminal and stdout == ""
    lines = our_lines(terminal)
    # The attestation lines, then exactly one line: the bar was erased, not left to bracket it.
    assert len(attestation_lines(lines)) == 4 and lines[:4] == attestation_lines(lines), terminal
    assert len(lines) == 5, terminal
    match = INTERRUPT_LINE.match(lines[4])
    assert match, lines[4]
    classified, total, written, marked = (int(match.group(1)), int(match.group(2)),
                                          match.group(3), int(match.group(4)))
    assert total == BATCH and Path(written) == out
    assert DONE_BEFORE_CTRL_C <= classified < BATCH
    assert terminal.rstrip("\n").split("\n")[-1].split("\r")[-1] == lines[4]  # nothing after it

    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert not out.with_name(f".{out.name}.tmp").exists()
    provenance, rows = read_results_csv(out)
    assert provenance["complete"] == "false"
    summary = json.loads(provenance["summary"])
    assert (summary["images"], summary["classified"], summary["failed"], summary["interrupted"],
            summary["complete"]) == (BATCH, classified, 0, marked, False)
    assert classified + marked == BATCH
    assert [row["file"] for row in rows] == [str(p) for p in sorted(big_folder.iterdir())]
    done = [row for row in rows if row["error"] == ""]
    undone = [row for row in rows if row["error"] != ""]
    assert len(done) == classified and all(row["code"] and row["p_nv"] != "" for row in done)
    assert len(undone) == marked
    assert all(row["error"].startswith(f"{INTERRUPTED}: ") and row["code"] == "" for row in undone)
    assert provenance["enclave_pcr0"] == slow_stack.authority.pcrs[0].hex()


def test_ctrl_c_with_stderr_a_pipe_prints_one_line_and_saves_json(slow_stack, tmp_path):
    """Interrupted while waiting for the next image (named pipes the test feeds one by
    one), so which rows are done is known: with a window of 4, the 8th image is read only
    after the first 4 answers came back."""
    images = synthetic_jpegs(tmp_path / "sources", 8)
    pipes = []
    for number in range(20):
        pipe = tmp_path / f"pipe{number:02d}.jpg"
        os.mkfifo(pipe)
        pipes.append(pipe)
    out = tmp_path / "results.json"
    process = subprocess.Popen([PYTHON, *cli_args(slow_stack, *map(str, pipes), "--out", str(out),
                                                  "--window", "4")],
                               env=slow_stack.env, cwd=ROOT, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    fed = threading.Event()

    def feed() -> None:
        for image, pipe in zip(images, pipes):
            with open(pipe, "wb") as handle:  # blocks until classify opens it
                handle.write(image.read_bytes())
        fed.set()

    threading.Thread(target=feed, daemon=True).start()
    try:
        assert fed.wait(timeout=60), "classify did not read the first 8 images"
        time.sleep(0.5)  # it now waits for the 9th pipe (or an answer): either way, Ctrl-C
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()

    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and stdout == ""
    lines = stderr.splitlines()
    others = [line for line in lines if line not in attestation_lines(lines)]
    assert len(others) == 1, stderr
    match = INTERRUPT_LINE.match(others[0])
    assert match, others[0]
    classified = int(match.group(1))
    assert 4 <= classified <= 8 and int(match.group(4)) == len(pipes) - classified

    document = json.loads(out.read_text(encoding="utf-8"))
    assert document["summary"]["complete"] is False
    assert document["summary"]["interrupted"] == len(pipes) - classified
    assert document["provenance"]["notice"] == NOTICE
    rows = document["results"]
    assert [row["file"] for row in rows] == [str(p) for p in pipes]
    assert all("error" not in row for row in rows[:4])
    assert sum("error" not in row for row in rows) == classified
    assert all(row["error"]["code"] == INTERRUPTED for row in rows[8:])
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_ctrl_c_before_any_row_writes_nothing(tmp_path, capsys):
    args = argparse.Namespace(out=tmp_path / "results.csv", json=False)
    batch = classify._Batch(args, [tmp_path / "a.jpg"], policy={})
    assert batch.finish_interrupted() == ("interrupted before any image was classified; "
                                          "nothing written")
    assert not args.out.exists() and capsys.readouterr().out == ""


def test_ctrl_c_without_out_prints_the_rows_done(tmp_path, capsys):
    paths = [tmp_path / "a.jpg", tmp_path / "b.jpg"]
    batch = classify._Batch(argparse.Namespace(out=None, json=True), paths, policy={})
    batch.rows[1] = {"file": str(paths[1]), "error": {"code": "BAD_IMAGE", "message": "no"}}
    line = batch.finish_interrupted()
    assert line == ("interrupted: 0 of 2 images classified (1 failed); the rows done are "
                    "above on stdout")
    rows = json.loads(capsys.readouterr().out)
    assert [row["error"]["code"] for row in rows] == [INTERRUPTED, "BAD_IMAGE"]


def test_main_turns_ctrl_c_into_one_line_and_130(monkeypatch, capsys):
    import nitrolesion.parent.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_classify", interrupted)
    assert cli.main(["classify", "x.jpg"]) == 130
    assert capsys.readouterr().err == "parent.py classify: interrupted\n"


# -- progress bar --------------------------------------------------------------------------
def test_progress_bar_on_a_terminal_starts_after_attestation_and_never_brackets_lines(
        slow_stack, tmp_path):
    folder = tmp_path / "images"
    synthetic_jpegs(folder, 12)
    out = tmp_path / "results.csv"
    status, stdout, terminal = PtyRun(slow_stack, str(folder), "--out", str(out)).finish()
    assert status == 0, terminal
    first_bar = BAR.search(terminal)
    assert first_bar, terminal
    attested = terminal.index("Enclave attested")
    pcr2 = terminal.index("  PCR2: ")
    assert attested < pcr2 < first_bar.start()  # no stale 0% line before attestation
    assert "12/12" in terminal  # the finished bar is left on screen
    lines = our_lines(terminal)
    assert lines[:4] == attestation_lines(lines)
    assert lines[4] == f"wrote 12 rows to {out}"
    assert re.match(r"summary: 12 images, 12 classified, \d+ referred, 0 failed, ", lines[5]), lines[5]
    assert len(lines) == 6
    tail = terminal[terminal.index("wrote 12 rows"):]
    assert not BAR.search(tail) and "\r" not in tail  # no bar drawn after our lines


def test_no_progress_bar_when_stderr_is_not_a_terminal(slow_stack, tmp_path):
    folder = tmp_path / "images"
    synthetic_jpegs(folder, 12)
    run = subprocess.run([PYTHON, *cli_args(slow_stack, str(folder))], env=slow_stack.env,
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "\r" not in run.stderr and not BAR.search(run.stderr) and "img/s" not in run.stderr
    lines = run.stderr.splitlines()
    assert len(attestation_lines(lines)) == 4 and len(lines) == 5
    assert lines[4].startswith("summary: 12 images")


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stream, enabled, total, drawn", [
    (FakeTerminal(), True, 5, True),
    (io.StringIO(), True, 5, False),       # a pipe or a log file
    (FakeTerminal(), False, 5, False),     # --no-progress
    (FakeTerminal(), True, 1, False),      # one image: nothing to show progress of
])
def test_progress_bar_only_on_a_terminal(stream, enabled, total, drawn):
    progress = open_progress(total, stream, enabled=enabled)
    assert (progress is not None) == drawn
    if progress is not None:
        progress.update(2)
        progress.refresh()  # updates are drawn at most every 0.1 s
        close_progress(progress, keep=False)  # an error line follows: the bar is erased
        assert "2/5" in stream.getvalue() and stream.getvalue().endswith("\r")
    else:
        assert stream.getvalue() == ""


# -- usage errors --------------------------------------------------------------------------
@pytest.mark.parametrize("given", [["no-such-folder"], ["no-such-file.jpg"],
                                   ["{samples}", "no-such-folder"]])
def test_a_path_that_does_not_exist_is_a_usage_error_before_attesting(tmp_path, given):
    port = str(free_port())  # nothing listens: the refusal must come before any I/O
    args = [g.format(samples=ROOT / "sample_images") for g in given]
    run = subprocess.run([PYTHON, str(PARENT_CLI), "classify", *args, "--port", port],
                         env=tcp_env(tmp_path / "keys"), cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.splitlines()
    assert lines == [f"parent.py classify: no such file or folder: {args[-1]}"]


# -- provenance ----------------------------------------------------------------------------
@pytest.mark.parametrize("suffix, policy_given", [(".csv", False), (".json", True)])
def test_results_files_carry_their_provenance(slow_stack, tmp_path, suffix, policy_given):
    out = tmp_path / f"results{suffix}"
    extra = []
    if policy_given:
        policy = write_dev_policy(slow_stack, tmp_path / "policy.json")
        extra = ["--policy", str(policy)]
    else:
        policy = slow_stack.key_dir / "policy.json"  # installed by `parent.py trust`
    before = datetime.now(timezone.utc).replace(microsecond=0)
    run = subprocess.run([PYTHON, *cli_args(slow_stack, str(ROOT / "sample_images"),
                                            "--out", str(out), *extra)],
                         env=slow_stack.env, cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    after = datetime.now(timezone.utc)
    assert run.returncode == 0, run.stderr
    module_id = re.search(r"Enclave attested: module (\S+),", run.stderr).group(1)
    if suffix == ".csv":
        provenance, rows = read_results_csv(out)
        with open(out, encoding="utf-8") as handle:
            header = next(line for line in handle if not line.startswith("#"))
        assert header.rstrip("\r\n") == ",".join(f'"{c}"' for c in CSV_COLUMNS)
        assert provenance["complete"] == "true"
        assert provenance["pcrs_checked"] == "true" and provenance["enclave_debug_mode"] == "false"
        assert json.loads(provenance["summary"])["classified"] == 7
        assert len(rows) == 7 and all(row["error"] == "" for row in rows)
        triage = {Path(r["file"]).name: (float(r["malignant"]), r["refer"], r["refer_reason"])
                  for r in rows}
    else:
        document = json.loads(out.read_text(encoding="utf-8"))
        provenance = document["provenance"]
        assert set(document) == {"provenance", "results", "summary"}
        assert document["summary"]["complete"] is True
        assert provenance["pcrs_checked"] is True and provenance["enclave_debug_mode"] is False
        assert len(document["results"]) == 7
        triage = {Path(r["file"]).name: (r["malignant"], "true" if r["refer"] else "false",
                                         r["refer_reason"] or "")
                  for r in document["results"]}
    # The enclave's triage of every image reaches the file (sample images both referred,
    # e.g. the melanoma, and not, e.g. the naevus).
    reference = LesionModel().new_classifier()
    for path in sorted((ROOT / "sample_images").glob("*.jpg")):
        expected = reference.classify(path.read_bytes())
        malignant, refer, reason = triage[path.name]
        assert malignant == pytest.approx(expected.malignant, abs=1e-5), path.name
        assert (refer, reason) == ("true" if expected.refer else "false",
                                   expected.refer_reason or ""), path.name
    assert {refer for _, refer, _ in triage.values()} == {"true", "false"}
    assert provenance["notice"] == NOTICE == "research demonstrator, not a medical device"
    assert provenance["tool_version"] == nitrolesion.__version__
    for key in ("started_utc", "finished_utc", "enclave_attested_utc"):
        moment = datetime.fromisoformat(provenance[key])
        assert moment.utcoffset() == timedelta(0), key
        assert before - timedelta(seconds=5) <= moment <= after, key
    assert provenance["model_file_local"] == str(DEFAULT_MODEL_PATH)
    assert provenance["model_sha256_local"] == sha256(DEFAULT_MODEL_PATH)
    assert "copy" in provenance["model_note"] and "attested PCRs" in provenance["model_note"]
    for index in (0, 1, 2):
        assert provenance[f"enclave_pcr{index}"] == slow_stack.authority.pcrs[index].hex()
    assert provenance["enclave_module_id"] == module_id
    assert provenance["attestation_root"].startswith("development root")
    how = "--policy" if policy_given else "installed policy"
    assert provenance["policy"] == f"{how} {policy}"
    assert provenance["policy_sha256"] == sha256(policy)


def test_csv_provenance_is_comment_lines_and_a_hash_in_a_name_stays_in_its_field(tmp_path):
    out = tmp_path / "results.csv"
    row = {"file": "/scans/patient#7.jpg", "error": {"code": "BAD_IMAGE", "message": "x"}}
    provenance = {"notice": NOTICE, "policy": "--policy /p\nfake: line"}
    write_results(out, [row], summary_of([row], 1.0), provenance)
    text = out.read_text(encoding="utf-8")
    comments = [line for line in text.splitlines() if line.startswith("#")]
    assert text.splitlines()[:len(comments)] == comments  # all before the header
    assert comments[0] == f"# {NOTICE}"
    assert "# policy: --policy /p?fake: line" in comments  # one line, whatever the path holds
    assert '"/scans/patient#7.jpg"' in text  # quoted: comment='#' readers keep it whole
    read_provenance, rows = read_results_csv(out)
    assert read_provenance["notice"] == NOTICE and rows[0]["file"] == "/scans/patient#7.jpg"
    assert rows[0]["error"] == "BAD_IMAGE: x"


# -- summary -------------------------------------------------------------------------------
def test_summary_is_a_line_for_people_and_json_with_json(slow_stack, tmp_path):
    folder = tmp_path / "images"
    synthetic_jpegs(folder, 3)
    (folder / "notes.jpg").write_text("not a JPEG\n", encoding="utf-8")
    with open(folder / "huge.jpg", "wb") as handle:
        handle.truncate(25 * 1024 * 1024)
    base = cli_args(slow_stack, str(folder))
    run = subprocess.run([PYTHON, *base], env=slow_stack.env, cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 1, run.stderr
    last = run.stderr.splitlines()[-1]
    assert re.fullmatch(r"summary: 5 images, 3 classified, [0-3] referred, 2 failed "
                        r"\(BAD_IMAGE 1, TOO_LARGE 1\), "
                        r"\d+\.\d s, \d+(\.\d+)? images/s", last), last
    run = subprocess.run([PYTHON, *base, "--json"], env=slow_stack.env, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stderr
    last = run.stderr.splitlines()[-1]
    assert last.startswith("summary: {")
    summary = json.loads(last[len("summary: "):])
    assert (summary["images"], summary["classified"], summary["failed"]) == (5, 3, 2)
    assert summary["failed_by_reason"] == {"BAD_IMAGE": 1, "TOO_LARGE": 1}
    assert summary["complete"] is True and summary["interrupted"] == 0
    assert summary["images_per_second"] > 0
    assert 0 <= summary["referred"] <= 3


def test_summary_line_says_what_an_interrupt_left_undone():
    done = [{"file": "a", "code": "nv", "label": "Nevus", "confidence": 0.9,
             "probabilities": {}, "top3": [], "malignant": 0.6, "refer": True,
             "refer_reason": "malignant"},
            {"file": "b", "error": {"code": "UNREADABLE", "message": "gone"}}]
    summary = summary_of(done, 2.0, total=10)
    assert (summary["complete"], summary["interrupted"], summary["images_per_second"]) == (
        False, 8, 1.0)
    assert summary_text(summary) == ("summary: 10 images, 1 classified, 1 referred, 1 failed "
                                     "(UNREADABLE 1), 8 not done (interrupted), 2.0 s, "
                                     "1 images/s")
