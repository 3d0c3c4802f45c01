"""CPU per image of everything the pipeline adds to in-process inference, step by step.

    .venv/bin/python bench/protocol_cost.py [--images 200] [--repeat 5]

bench/pipeline.py measures the whole pipeline against in-process inference; this script says
where the difference goes. Each step of one image's trip is timed on its own, in this
process, on the same test-split images (CPU time per image, best of ``--repeat`` passes):

- client: ``ClientSession.classify`` (payload CBOR, AES-GCM seal, frame) and
  ``ClientSession.receive`` of the answer (frame, CBOR checks, AES-GCM open);
- enclave: ``EnclaveSession.receive`` of the request and ``EnclaveSession.result`` of the
  answer (the same four operations mirrored), the memory-budget estimate the worker pool
  makes before decoding, and turning the model output into the answer's payload;
- the AES-GCM call alone as the session uses it (cryptography's AESGCM, one object per
  direction, key schedule kept), next to what it used before (pycryptodome, a new cipher
  object per message), for comparison;
- the socket: one request frame and one answer frame through a loopback TCP pair (the
  kernel's share, both directions).

Preprocessing and the interpreter are listed for scale; the in-process baseline pays them too.
On a 2-core machine whose cores the interpreter keeps busy, every millisecond of this that
runs during an inference costs about a millisecond of the inference's wall time (bench/
pipeline.py's "CPU per image" row shows the total).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import numpy as np
from Crypto.Cipher import AES
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bench.machine import load_line
from bench.pipeline import load_images
from nitrolesion.enclave.connection import prediction_payload
from nitrolesion.attestation.dev_authority import DevAttestationAuthority
from nitrolesion.attestation.policy import AttestationPolicy
from nitrolesion.attestation.verifier import verify_attestation
from nitrolesion.crypto.envelope import generate_keypair, public_key_der
from nitrolesion.model.classifier import LesionModel
from nitrolesion.model.preprocess import decoded_bytes_estimate
from nitrolesion.protocol import ClientSession, EnclaveSession
from nitrolesion.wire.frames import FrameDecoder, encode_frame
from nitrolesion.wire.messages import ResultPayload


def open_sessions(state: Path) -> tuple[ClientSession, EnclaveSession]:
    """A client and an enclave session, attested and opened in memory (no sockets)."""
    now = datetime.now(timezone.utc)
    measured = state / "app.py"
    measured.write_bytes(b"print('enclave')\n")
    authority = DevAttestationAuthority.create(state / "authority", [measured], now=now)
    key = generate_keypair()
    client, enclave = ClientSession(), EnclaveSession(key, public_key_der(key))
    requested = enclave.receive(client.hello())
    document = authority.attest(public_key=public_key_der(key), nonce=requested.nonce,
                                user_data=requested.user_data, now=now)
    offered = client.receive(enclave.attestation(document))
    client.attestation_verified(verify_attestation(
        offered.document, now=now, policy=AttestationPolicy.for_dev_pcrs(authority.pcrs),
        expected_nonce=offered.nonce, trusted_roots=[authority.root_certificate]))
    client.receive(enclave.receive(client.open_session()).reply)
    return client, enclave


def cpu_per_item(function, items, repeat: int) -> float:
    """Best-of-``repeat`` CPU microseconds per call of ``function(item)``."""
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        for item in items:
            function(item)
        best = min(best, time.process_time() - started)
    return best / len(items) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    images, source = load_images(args.images)
    model = LesionModel()
    classifier = model.new_classifier()
    print(load_line("start"))
    print(f"images: {source}")

    rows: list[tuple[str, str, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-protocol-") as state:
        client, enclave = open_sessions(Path(state))
        # Sessions accept each counter once, in order: every pass makes fresh messages.
        requests, answers, events = [], [], []

        def client_seal(image):
            requests.append(client.classify(image)[1])

        def enclave_open(frame):
            events.append(enclave.receive(frame))

        prediction = classifier.classify(images[0])
        payload = prediction_payload(prediction)

        def enclave_seal(event):
            answers.append(enclave.result(ResultPayload(event.request, prediction=payload)))

        def one_pass():
            requests.clear(), answers.clear(), events.clear()
            times = [cpu_per_item(client_seal, images, 1)]
            times.append(cpu_per_item(enclave_open, list(requests), 1))
            times.append(cpu_per_item(enclave_seal, list(events), 1))
            times.append(cpu_per_item(client.receive, list(answers), 1))
            return times

        passes = [one_pass() for _ in range(args.repeat)]
        best = [min(column) for column in zip(*passes)]
        request_bytes = sum(len(frame.body) for frame in requests) / len(requests)
        answer_bytes = sum(len(frame.body) for frame in answers) / len(answers)
        rows += [("client", "seal the request (ClientSession.classify)", best[0]),
                 ("client", "open the answer (ClientSession.receive)", best[3]),
                 ("enclave", "open the request (EnclaveSession.receive)", best[1]),
                 ("enclave", "seal the answer (EnclaveSession.result)", best[2])]

    output = np.full(7, 1 / 7)
    key, nonce, aad = os.urandom(32), os.urandom(12), os.urandom(40)
    kept = AESGCM(key)

    def pycryptodome_gcm(data):
        cipher = AES.new(key, AES.MODE_GCM, nonce=nonce, mac_len=16)
        cipher.update(aad)
        cipher.encrypt_and_digest(data)

    gcm = cpu_per_item(pycryptodome_gcm, images, args.repeat)
    rows += [("both", "  of which AES-GCM (cryptography AESGCM, key schedule kept)",
              cpu_per_item(lambda data: kept.encrypt(nonce, data, aad), images, args.repeat)),
             ("both", "  (pycryptodome, new cipher per message: before, for comparison)", gcm)]

    rows += [("enclave", "memory estimate before decoding (decoded_bytes_estimate)",
              cpu_per_item(lambda image: decoded_bytes_estimate(image, model.input_size),
                           images, args.repeat)),
             ("enclave", "output -> answer payload (prediction_from, prediction_payload)",
              cpu_per_item(lambda _: prediction_payload(classifier.prediction_from(output)),
                           images, args.repeat))]

    # The kernel's share: one request and one answer frame through loopback TCP.
    listener = socket.create_server(("127.0.0.1", 0))
    sender = socket.create_connection(listener.getsockname())
    receiver, _ = listener.accept()
    for end in (sender, receiver):
        end.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    request = encode_frame(requests[0].type, requests[0].body)
    answer = encode_frame(answers[0].type, answers[0].body)

    def round_trip(_):
        for data, out, into in ((request, sender, receiver), (answer, receiver, sender)):
            out.sendall(data)
            decoder, need = FrameDecoder(), len(data)
            while need:
                chunk = into.recv(256 * 1024)
                need -= len(chunk)
                decoder.feed(chunk)
            decoder.next_frame()

    rows.append(("kernel", "send + receive both frames over loopback TCP (+ frame codec)",
                 cpu_per_item(round_trip, images, args.repeat)))
    for end in (sender, receiver, listener):
        end.close()

    pixels = [classifier.preprocess(image) for image in images]
    rows += [("both", "for scale: preprocessing (baseline pays it too)",
              cpu_per_item(classifier.preprocess, images, args.repeat)),
             ("both", "for scale: interpreter, 1 thread (baseline pays it too)",
              cpu_per_item(classifier.predict_array, pixels, 1))]

    print(f"request frame body {request_bytes:.0f} B, answer frame body {answer_bytes:.0f} B; "
          f"CPU microseconds per image, best of {args.repeat}")
    width = max(len(what) for _, what, _ in rows)
    for side, what, micros in rows:
        print(f"{side:8}{what:{width}}  {micros:9.1f}")
    added = sum(micros for side, what, micros in rows
                if side in ("client", "enclave", "kernel") and not what.startswith("  "))
    print(f"{'':8}{'protocol total (client + enclave + kernel rows)':{width}}  {added:9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
