"""The fleet client (``parent.py classify --enclave ...``) against real enclave processes.

Four ``enclave/app.py`` processes over TCP, each with its own development attestation
authority (so each has its own module id and root, as real enclaves have their own NSM
documents): three report the development PCRs the policy pins; the fourth was created with
the development-only ``pcr_variant`` and reports the PCRs of "another build", so it must be
refused although its root is trusted. Every test checks the answers against the ones a
single enclave gives for the same images.

The fail-over test kills one enclave, so it comes last in this module.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from harness import ENCLAVE_APP, PARENT_CLI, PYTHON, ROOT, Proc, free_port, tcp_env
from nitrolesion.attestation.dev_authority import (
    DEV_POLICY_FILE, ROOT_CERT_FILE, DevAttestationAuthority, dev_pcrs)
from nitrolesion.attestation.policy import AttestationPolicy
from nitrolesion.wire.messages import Prediction
from nitrolesion.attestation.trust import load_pem_roots
from nitrolesion.enclave_image import image_files
from nitrolesion.errors import TransportError, UsageError
from nitrolesion.parent.classify import read_results_csv
from nitrolesion.parent.enclave_client import EnclaveClient, Trust
from nitrolesion.parent.fleet import (
    NO_ENCLAVE, Fleet, fleet_endpoints, parse_enclave, read_enclaves_file)
from nitrolesion.transport import TcpEndpoint, VsockEndpoint

#: Text the variant enclave's authority mixes into its PCRs.
OTHER_BUILD = "another build of the image (refusal tests)"


# -- endpoints and the development PCR variant ----------------------------------------------
def test_endpoints_parse_both_forms_and_refuse_anything_else():
    assert parse_enclave("vsock:16:5005") == VsockEndpoint(16, 5005)
    assert parse_enclave("tcp:10.0.0.7:8443") == TcpEndpoint(8443, "10.0.0.7")
    assert parse_enclave("tcp:[::1]:8443") == TcpEndpoint(8443, "::1")
    assert parse_enclave("tcp:relay.clinic.svc:8443") == TcpEndpoint(8443, "relay.clinic.svc")
    for bad in ("16:5005", "vsock:3:5005", "vsock:x:5005", "tcp:host", "tcp::5005",
                "tcp:host:0", "tcp:host:70000", "udp:host:1"):
        with pytest.raises(UsageError):
            parse_enclave(bad)


def test_enclaves_file_skips_comments_and_allows_repeats(tmp_path):
    listed = tmp_path / "enclaves.txt"
    listed.write_text("# the clinic's fleet\nvsock:16:5005\n\n tcp:127.0.0.1:9000  # relay\n")
    assert read_enclaves_file(listed) == ["vsock:16:5005", "tcp:127.0.0.1:9000"]
    assert fleet_endpoints(["vsock:17:5005"], listed) == [
        VsockEndpoint(17, 5005), VsockEndpoint(16, 5005), TcpEndpoint(9000)]
    # Behind a load balancer one address stands for several enclaves: one member each.
    twice = Fleet(fleet_endpoints(["vsock:16:5005"], listed), Trust(AttestationPolicy.any_enclave()))
    assert [m.name for m in twice.members] == ["vsock:16:5005", "vsock:16:5005#2", "tcp:127.0.0.1:9000"]
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(UsageError, match="names no enclave"):
        fleet_endpoints([], tmp_path / "empty.txt")
    with pytest.raises(UsageError, match="cannot be read"):
        fleet_endpoints([], tmp_path / "missing.txt")


def test_pcr_variant_is_another_build_and_survives_a_reload(tmp_path):
    files = image_files(ROOT)
    normal = DevAttestationAuthority.create(tmp_path / "normal", files, base=ROOT)
    other = DevAttestationAuthority.create(tmp_path / "other", files, base=ROOT,
                                           pcr_variant=OTHER_BUILD)
    assert normal.pcrs[1] == other.pcrs[1]  # same "kernel"
    assert normal.pcrs[0] != other.pcrs[0] and normal.pcrs[2] != other.pcrs[2]
    assert DevAttestationAuthority.load(tmp_path / "other", files, base=ROOT).pcrs == other.pcrs
    assert DevAttestationAuthority.load(tmp_path / "normal", files, base=ROOT).pcrs == normal.pcrs
    assert dev_pcrs(normal.pcrs[0]) == normal.pcrs


# -- a fleet of real enclave processes ------------------------------------------------------
class LocalEnclave:
    """One ``enclave/app.py`` over TCP with its own development authority."""

    def __init__(self, folder: Path, pcr_variant: str | None = None) -> None:
        self.dev_dir = folder / "dev-authority"
        if pcr_variant is not None:
            DevAttestationAuthority.create(self.dev_dir, image_files(ROOT), base=ROOT,
                                           pcr_variant=pcr_variant)
        self.port = free_port()
        self.proc = Proc([str(ENCLAVE_APP), "3", str(self.port), str(free_port()),
                          "--dev-attestation", str(self.dev_dir), "--workers", "1"], tcp_env())

    def wait_ready(self) -> None:
        self.proc.wait_for(r"ready in", timeout=120)

    @property
    def endpoint(self) -> TcpEndpoint:
        return TcpEndpoint(self.port)

    @property
    def name(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"

    @property
    def root(self) -> Path:
        return self.dev_dir / ROOT_CERT_FILE

    @property
    def policy(self) -> Path:
        return self.dev_dir / DEV_POLICY_FILE

    @property
    def module_id(self) -> str:
        return json.loads((self.dev_dir / "dev_authority.json").read_text())["module_id"]


class LocalFleet:
    """Three enclaves the policy pins, one of another build; one trust for all."""

    def __init__(self, folder: Path) -> None:
        self.good = [LocalEnclave(folder / f"enclave-{n}") for n in range(3)]
        self.other = LocalEnclave(folder / "enclave-other", pcr_variant=OTHER_BUILD)
        for enclave in (*self.good, self.other):
            enclave.wait_ready()
        self.policy_file = self.good[0].policy
        # Every root is trusted, the variant's too: it must be refused for its PCRs alone.
        self.trust = Trust(AttestationPolicy.from_json_file(self.policy_file),
                           [cert for e in (*self.good, self.other) for cert in load_pem_roots(e.root)])

    def trust_args(self) -> list[str]:
        args = ["--policy", str(self.policy_file)]
        for enclave in (*self.good, self.other):
            args += ["--dev-root", str(enclave.root)]
        return args

    def stop(self) -> None:
        for enclave in (*self.good, self.other):
            enclave.proc.stop()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, model_present):
    running = LocalFleet(tmp_path_factory.mktemp("fleet"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def single_answers(fleet, test_image_paths) -> dict[str, Prediction]:
    """What one enclave alone answers for each sample image (file name -> prediction)."""
    answers = {}
    with EnclaveClient(fleet.good[0].endpoint, fleet.trust) as client:
        client.attest()
        client.open_session()
        images = [path.read_bytes() for path in test_image_paths]
        for outcome in client.classify_many(images):
            answers[test_image_paths[outcome.index].name] = outcome.result
    assert len(answers) == len(test_image_paths) and all(answers.values())
    return answers


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, str(PARENT_CLI), *args], env=tcp_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_refuses_the_other_build_and_names_each_rows_enclave(fleet, single_answers, tmp_path):
    out = tmp_path / "results.json"
    enclaves = [arg for e in (*fleet.good, fleet.other) for arg in ("--enclave", e.name)]
    done = run_cli("classify", str(ROOT / "sample_images"), *enclaves, *fleet.trust_args(),
                   "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr
    assert f"Enclave {fleet.other.name} REFUSED, sent nothing" in done.stderr
    document = json.loads(out.read_text())
    summary = document["summary"]["fleet"]
    assert summary["refused"] == [fleet.other.name]
    entries = {entry["enclave"]: entry for entry in summary["enclaves"]}
    assert entries[fleet.other.name]["classified"] == 0
    assert "PCR" in entries[fleet.other.name]["reason"]
    assert sum(entry["classified"] for entry in entries.values()) == 7
    good_ids = {e.name: e.module_id for e in fleet.good}
    provenance = document["provenance"]
    assert set(provenance["enclaves"]) == set(good_ids)  # attested ones, with their PCRs
    assert fleet.other.name in provenance["enclaves_not_used"]
    for row in document["results"]:
        enclave = row["enclave"]
        assert enclave["module_id"] == good_ids[enclave["endpoint"]]  # never the refused one
        attested = provenance["enclaves"][enclave["endpoint"]]
        assert enclave["pcr0"] == attested["enclave_pcr0"] and enclave["pcr2"] == attested["enclave_pcr2"]
        expected = single_answers[Path(row["file"]).name]
        assert row["code"] == expected.code
        assert row["probabilities"] == {c: round(p, 6) for c, p in expected.probabilities.items()}


def test_cli_csv_rows_carry_the_enclave_and_the_header_its_pcrs(fleet, tmp_path):
    listed = tmp_path / "fleet.txt"
    listed.write_text("".join(f"{e.name}\n" for e in fleet.good[:2]))
    out = tmp_path / "results.csv"
    done = run_cli("classify", str(ROOT / "sample_images"), "--enclaves-file", str(listed),
                   *fleet.trust_args(), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "refused (failed attestation, sent nothing): none" in done.stderr
    provenance, rows = read_results_csv(out)
    enclaves = json.loads(provenance["enclaves"])
    assert set(enclaves) == {e.name for e in fleet.good[:2]}
    ids = {e.module_id for e in fleet.good[:2]}
    assert len(rows) == 7 and all(row["enclave_module_id"].strip('"') in ids for row in rows)


def test_a_fleet_of_only_refused_or_absent_enclaves_sends_nothing(fleet, tmp_path):
    nobody = f"tcp:127.0.0.1:{free_port()}"
    done = run_cli("classify", str(ROOT / "sample_images"), "--enclave", fleet.other.name,
                   "--enclave", nobody, *fleet.trust_args(), "--timeout", "5")
    assert done.returncode == 1
    assert "no enclave of the fleet could be used" in done.stderr
    assert f"{fleet.other.name} refused" in done.stderr and f"{nobody} unreachable" in done.stderr


def test_an_unreachable_member_is_reported_and_the_others_do_the_batch(fleet, single_answers,
                                                                        test_image_paths):
    nobody = TcpEndpoint(free_port())
    batch = Fleet([nobody, fleet.good[1].endpoint, fleet.good[2].endpoint], fleet.trust,
                  timeout=10)
    paths = test_image_paths * 3
    outcomes = {}
    for event in batch.classify(len(paths), lambda i: paths[i].read_bytes()):
        if event.outcome is not None:
            outcomes[event.outcome.index] = (event.outcome, event.member)
    assert sorted(outcomes) == list(range(len(paths)))
    for index, (outcome, member) in outcomes.items():
        assert outcome.result == single_answers[paths[index].name]
        assert member.endpoint != nobody
    report = batch.report()
    assert report["unreachable"] == [str(nobody)] and report["failed_over"] == 0
    # Work stealing: both attested enclaves took part.
    assert all(e["classified"] > 0 for e in report["enclaves"] if e["enclave"] != str(nobody))


def test_a_silent_enclave_times_out_and_its_images_go_to_the_others(fleet, single_answers,
                                                                     test_image_paths):
    """An enclave that stops answering (SIGSTOP: connection open, nothing comes back) is
    given up after --timeout; its unanswered images are classified by the others."""
    silent = fleet.good[2]
    batch = Fleet([e.endpoint for e in fleet.good], fleet.trust, timeout=3)
    paths = [test_image_paths[i % len(test_image_paths)] for i in range(60)]
    answered = {}
    try:
        for event in batch.classify(len(paths), lambda i: paths[i].read_bytes()):
            if event.outcome is not None:
                answered[event.outcome.index] = event.outcome.result
                if len(answered) == 10:
                    silent.proc.process.send_signal(signal.SIGSTOP)
    finally:
        silent.proc.process.send_signal(signal.SIGCONT)
    assert {i: r for i, r in answered.items()} == {
        i: single_answers[paths[i].name] for i in range(len(paths))}
    report = {entry["enclave"]: entry for entry in batch.report()["enclaves"]}
    assert report[silent.name]["status"] == "failed" and "within 3" in report[silent.name]["reason"]


def test_killed_enclave_fails_over_and_the_300_image_batch_completes(fleet, single_answers,
                                                                     test_image_paths):
    """Three enclaves, 300 images (the seven samples in turn); one enclave is killed after
    100 answers: every image still gets exactly one answer, equal to a single enclave's."""
    victim = fleet.good[1]
    batch = Fleet([e.endpoint for e in fleet.good], fleet.trust, timeout=30)
    paths = [test_image_paths[i % len(test_image_paths)] for i in range(300)]
    outcomes: dict[int, object] = {}
    killed = threading.Event()
    for event in batch.classify(len(paths), lambda i: paths[i].read_bytes()):
        if event.outcome is None:
            continue
        assert event.outcome.index not in outcomes, "an image was answered twice"
        outcomes[event.outcome.index] = event
        if len(outcomes) == 100 and not killed.is_set():
            victim.proc.process.send_signal(signal.SIGKILL)
            killed.set()
    assert killed.is_set()
    assert sorted(outcomes) == list(range(300))
    for index, event in outcomes.items():
        assert event.outcome.error is None, event.outcome.error
        assert event.outcome.result == single_answers[paths[index].name]
        assert event.outcome.error != NO_ENCLAVE
    report = {entry["enclave"]: entry for entry in batch.report()["enclaves"]}
    assert report[victim.name]["status"] == "failed"
    assert sum(entry["classified"] for entry in report.values()) == 300
    survivors = [report[e.name] for e in fleet.good if e is not victim]
    assert all(entry["status"] == "done" for entry in survivors)
    assert batch.report()["failed_over"] == report[victim.name]["failed_over"]


def test_fleet_needs_an_enclave():
    with pytest.raises(UsageError):
        Fleet([], Trust(AttestationPolicy.any_enclave()))


def test_no_attested_enclave_raises(tmp_path):
    batch = Fleet([TcpEndpoint(free_port())], Trust(AttestationPolicy.any_enclave()), timeout=5)
    with pytest.raises(TransportError, match="unreachable"):
        list(batch.classify(1, lambda i: b"x"))


def test_a_bad_endpoint_is_a_usage_error_before_any_trust_is_needed(tmp_path):
    env = dict(tcp_env(), NITROLESION_KEY_DIR=str(tmp_path / "no-keys"))  # no policy here
    done = subprocess.run([PYTHON, str(PARENT_CLI), "classify", str(ROOT / "sample_images"),
                           "--enclave", "vsock:16"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert "--enclave 'vsock:16': expected vsock:CID:PORT or tcp:HOST:PORT" in done.stderr
