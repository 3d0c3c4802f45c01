"""``parent.py demo``: the whole confidential flow on one machine, over TCP loopback.

The enclave app runs as a separate process with the development attestation authority;
the parent server runs in this process; the client verifies the enclave's attestation
against the development root and a PCR policy computed here from the same files, then
sends one sealed image. Every step is printed. Temporary keys live in a 0700 temp folder
that is removed at the end.
"""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from nitrolesion.attestation.dev_authority import (
    DEV_POLICY_FILE, ROOT_CERT_FILE, DevAttestationAuthority)
from nitrolesion.attestation.policy import AttestationPolicy
from nitrolesion.attestation.trust import load_pem_roots
from nitrolesion.crypto.envelope import fingerprint, public_key_der
from nitrolesion.crypto.keystore import ParentKeyStore
from nitrolesion.enclave_image import image_files
from nitrolesion.errors import NitroLesionError
from nitrolesion.limits import DEFAULT_TCP_HOST, PARENT_CID, PROJECT_ROOT
from nitrolesion.transport import TcpEndpoint, free_tcp_port
from nitrolesion.parent.enclave_client import EnclaveClient, Trust
from nitrolesion.parent.images import NO_IMAGE_HELP, default_image, read_image_file
from nitrolesion.parent.server import ParentServer, ServerEvent

#: Seconds to wait for the enclave to boot and announce its key (key generation and
#: model load take ~1-2 s; the slack covers a loaded CI machine).
BOOT_TIMEOUT = 60.0
RESULT_TIMEOUT = 60.0


class DemoStepFailed(NitroLesionError):
    """A step of the demo did not happen: the enclave exited, the server refused, or time ran out."""


def step(text: str) -> None:
    print(f"==> {text}", flush=True)


class EnclaveProcess:
    """The enclave app as a child process, its output relayed with a prefix."""

    def __init__(self, client_port: int, parent_port: int, dev_dir: Path) -> None:
        command = [sys.executable, "-u", str(PROJECT_ROOT / "enclave" / "app.py"), str(PARENT_CID),
                   str(client_port), str(parent_port), "--transport", "tcp",
                   "--host", DEFAULT_TCP_HOST, "--dev-attestation", str(dev_dir)]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, cwd=PROJECT_ROOT)
        self.lines: list[str] = []
        threading.Thread(target=self._relay, daemon=True).start()

    def _relay(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip())
            sys.stdout.write(f"    [enclave] {line.rstrip()}\n")
            sys.stdout.flush()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()  # SIGTERM: graceful shutdown
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def wait_for(events: "queue.Queue[ServerEvent]", kind: str, timeout: float,
             enclave: EnclaveProcess) -> ServerEvent:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if enclave.process.poll() is not None:
            raise DemoStepFailed(f"the enclave exited with status {enclave.process.returncode}")
        try:
            event = events.get(timeout=0.2)
        except queue.Empty:
            continue
        if event.kind == kind:
            return event
        if event.kind in ("error", "refused"):
            raise DemoStepFailed(event.text)
    raise DemoStepFailed(f"timed out after {timeout:g} s waiting for the server's '{kind}' event")


def run_demo(args) -> int:
    image_path = args.image or default_image()
    if image_path is None:
        print(f"demo: {NO_IMAGE_HELP}", file=sys.stderr)
        return 2
    try:
        image = read_image_file(Path(image_path), named=args.image is not None)
    except ImageFileError as exc:
        print(f"demo: image {image_path}: {exc}", file=sys.stderr)
        return 2

    state = Path(tempfile.mkdtemp(prefix="nitrolesion-demo-"))
    os.chmod(state, 0o700)
    enclave = None
    server = None
    try:
        step(f"parent key pair (RSA-3072) in {state / 'parent'} (0600)")
        parent_key = ParentKeyStore(state / "parent").load_or_create()

        parent_port, client_port = free_tcp_port(), free_tcp_port()
        events: queue.Queue = queue.Queue()

        def on_event(event: ServerEvent) -> None:
            sys.stdout.write(f"    [server] {event.text}\n")
            sys.stdout.flush()
            events.put(event)

        dev_dir = state / "dev-authority"
        step(f"development attestation authority in {dev_dir} (stands for the AWS Nitro PKI); "
             "PCRs measured here from the image's files (nitrolesion/enclave_image.py)")
        DevAttestationAuthority.load_or_create(dev_dir, image_files(PROJECT_ROOT), base=PROJECT_ROOT)
        step(f"parent server on tcp:127.0.0.1:{parent_port} (stands for vsock port 5006); "
             "it believes only an announcement attested with those PCRs")
        server = ParentServer(TcpEndpoint(parent_port), parent_key, state / "parent", on_event,
                              trust=Trust.for_dev_enclave(dev_dir))
        server.bind()
        threading.Thread(target=server.serve_forever, daemon=True).start()

        step(f"enclave app as a separate process on tcp:127.0.0.1:{client_port} "
             "(stands for CID 16 port 5005), development attestation authority")
        enclave = EnclaveProcess(client_port, parent_port, dev_dir)
        announced = wait_for(events, "key", BOOT_TIMEOUT, enclave)

        # What a local user runs: --dev-root DIR/dev_root.pem --policy DIR/policy.json.
        trust = Trust(AttestationPolicy.from_json_file(dev_dir / DEV_POLICY_FILE),
                      load_pem_roots(dev_dir / ROOT_CERT_FILE))
        step(f"client: fresh nonce -> attestation document; verifying chain to the dev root, "
             f"signature, nonce and the PCRs of {dev_dir / DEV_POLICY_FILE}")
        endpoint = TcpEndpoint(client_port)
        with EnclaveClient(endpoint, trust) as client:
            result = client.attest(expected_key=announced.data["public_key"])
            print(f"    verified: module {result.module_id}, enclave key sha256 "
                  f"{fingerprint(result.public_key)[:16]}... matches the announced key", flush=True)
            for index in (0, 1, 2):
                print(f"    PCR{index} {result.pcrs[index].hex()}", flush=True)
            step(f"client: sealing {Path(image_path).name} ({len(image)} bytes) to the attested key")
            _, sent = client.send_one_shot(image, public_key_der(parent_key))
            print(f"    sent {sent} bytes of ciphertext (RSA-OAEP wrapped AES-256-GCM key); "
                  "the host saw no pixel", flush=True)
        outcome = wait_for(events, "result", RESULT_TIMEOUT, enclave)
        step("server decrypted the enclave's answer with the parent's private key:")
        print(f"    {outcome.text}", flush=True)
        prediction = outcome.data["prediction"]
        print("    top-3: " + ", ".join(f"{code} {p:.2f}" for code, p in prediction.top(3)),
              flush=True)
        print(f"    triage: {prediction.triage_text()}", flush=True)
        step("stopping the enclave (SIGTERM)")
        status = enclave.stop()
        print(f"    enclave exited with status {status}", flush=True)
        print("Demo finished: image and result crossed the host only as ciphertext.")
        return 0
    except Exception as exc:  # noqa: BLE001 - the demo reports any failure in one line
        print(f"demo failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        if enclave is not None:
            enclave.stop()
        if server is not None:
            server.stop()
        if getattr(args, "keep", False):
            print(f"state kept in {state}")
        else:
            shutil.rmtree(state, ignore_errors=True)
