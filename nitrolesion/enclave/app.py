"""Enclave application: classify encrypted dermatoscopic images inside a Nitro Enclave.

    python enclave/app.py 3 5005 5006        # the Dockerfile's CMD

At boot it creates an RSA-3072 key pair in memory, loads the model once, connects to the
parent (CID 3, port 5006) and announces its public key with an attestation document, then
serves clients on port 5005 until SIGTERM (finishing requests in flight) or, with --once,
until one request has been answered.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from nitrolesion.attestation.errors import AttestationUnavailable
from nitrolesion.attestation.provider import open_attestation_provider
from nitrolesion.enclave.service import (
    DEFAULT_WORKERS, HANDSHAKE_TIMEOUT, IO_TIMEOUT, MAX_CONNECTIONS, EnclaveService, ServiceConfig,
    default_interpreters)
from nitrolesion.limits import DEFAULT_TCP_HOST, PROJECT_ROOT
from nitrolesion.errors import NitroLesionError, UsageError
from nitrolesion.memory_budget import RECOMMENDED_ENCLAVE_MIB, budget_for_enclave_memory
from nitrolesion.model.classifier import DEFAULT_MODEL_PATH, LesionModel
from nitrolesion.model.labels import DEFAULT_LABELS_PATH
from nitrolesion.model.preprocess import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from nitrolesion.transport import TRANSPORTS, check_cid, check_port, default_transport
from nitrolesion.wire.messages import MAX_IMAGE_IN_MESSAGE

#: Third-party modules the enclave needs (enclave/requirements.txt), checked by
#: nitrolesion.environment before main() runs; the TFLite runtime is ai-edge-litert or,
#: failing that, tflite-runtime.
REQUIRED_MODULES = ("Crypto", "cbor2", "cryptography", "numpy", "PIL",
                    ("ai_edge_litert", "tflite_runtime"))

#: Lines the TFLite runtime writes to fd 2 at its start ("INFO: Created TensorFlow Lite
#: XNNPACK delegate for CPU."): notices for its developers, noise for ours.
TFLITE_NOTICE = re.compile(rb"^INFO: (Created TensorFlow Lite|Initialized TensorFlow Lite)")


@contextlib.contextmanager
def without_tflite_notices():
    """Hold fd 2 while the TFLite runtime starts, then pass on everything it caught except
    the runtime's INFO notices (its C++ code writes them to fd 2, past Python's logging).

    Nothing else is lost: our own log lines and any warning or error are written out, in
    order, when the block ends. Use it while no other thread writes to stderr.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as held:
            os.dup2(held.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                held.seek(0)
                kept = [line for line in held.read().splitlines(keepends=True)
                        if not TFLITE_NOTICE.match(line)]
                if kept:
                    with open(2, "wb", closefd=False) as stderr:
                        stderr.write(b"".join(kept))
    finally:
        os.close(saved)


def write_dev_policy(authority) -> Path:
    """Write DIR/policy.json pinning the development PCRs, so a local client runs with
    ``--dev-root DIR/dev_root.pem --policy DIR/policy.json``."""
    from nitrolesion.attestation.dev_authority import DEV_POLICY_FILE
    from nitrolesion.attestation.policy import AttestationPolicy
    from nitrolesion.crypto.keystore import write_private_file

    policy = AttestationPolicy.for_dev_pcrs(authority.pcrs)
    data = (json.dumps(policy.to_dict(), indent=2) + "\n").encode()
    return write_private_file(authority.root_pem_path.parent, DEV_POLICY_FILE, data, mode=0o644)


def measured_files(args) -> list[Path]:
    """What the development authority measures into PCR0 (nothing without
    --dev-attestation: on Nitro the NSM measures the image). Imported only when needed, as
    the production image does not carry the development modules."""
    if not args.dev_attestation:
        return []
    try:
        from nitrolesion.enclave_image import image_files
    except ModuleNotFoundError as exc:  # a production image: the development files are not in it
        raise AttestationUnavailable("--dev-attestation: this image has no development "
                                     "attestation authority; only the NSM attests it") from exc
    return image_files(PROJECT_ROOT)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="app.py", description=__doc__.split("\n\n")[0],
        epilog="Without /dev/nsm the enclave refuses to start unless --dev-attestation is given.")
    parser.add_argument("parent_cid", type=int, help="CID of the parent instance (3 on Nitro; "
                                                     "ignored with tcp)")
    parser.add_argument("client_port", type=int, help="port to serve clients on (5005), 1..65535")
    parser.add_argument("parent_port", type=int, help="parent server port to announce to (5006), "
                                                      "1..65535")
    parser.add_argument("--transport", choices=TRANSPORTS, default=default_transport(),
                        help="vsock (default) or tcp for machines without Nitro; "
                             "also set by ENCLAVE_TRANSPORT")
    parser.add_argument("--host", default=DEFAULT_TCP_HOST,
                        help="with tcp: address to listen on and to reach the parent at")
    parser.add_argument("--dev-attestation", type=Path, metavar="DIR",
                        help="DEVELOPMENT ONLY: sign attestation documents with a local "
                             "development authority kept in DIR instead of /dev/nsm")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                        help="threads that decode images and deliver answers around the "
                             "interpreters (default %(default)s, the fastest measured)")
    parser.add_argument("--interpreters", type=int, default=default_interpreters(),
                        help="TFLite interpreters, the CPUs shared out between them (default "
                             "here %(default)s: 2, 1 on a one-CPU machine); each beyond the first costs "
                             "~29 MiB; on 2 CPUs 2 reached 0.96-1.03x of the best in-process rate, "
                             "1 0.87-0.94x (docs/PERFORMANCE.md)")
    parser.add_argument("--queue", type=int, default=16,
                        help="jobs waiting beyond the workers before answering BUSY (default 16)")
    parser.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS,
                        help="client connections served at once; more are refused with BUSY "
                             "(default %(default)s)")
    parser.add_argument("--io-timeout", type=float, default=IO_TIMEOUT,
                        help="seconds a client may take per frame or stay silent (default %(default)s)")
    parser.add_argument("--handshake-timeout", type=float, default=HANDSHAKE_TIMEOUT,
                        help="seconds a new connection has to send its first frame "
                             "(default %(default)s)")
    parser.add_argument("--max-image-bytes", type=int, default=DEFAULT_MAX_BYTES,
                        help="larger encoded images are refused with BAD_IMAGE (default "
                             f"%(default)s; at most {MAX_IMAGE_IN_MESSAGE}, what one message "
                             "can carry)")
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="images with more pixels are refused with BAD_IMAGE before "
                             "decoding, against decompression bombs (default %(default)s)")
    parser.add_argument("--memory", type=int, default=RECOMMENDED_ENCLAVE_MIB, metavar="MIB",
                        help="the enclave's memory as given to nitro-cli run-enclave --memory "
                             "(default %(default)s); frames in flight and decoded pixels are "
                             "held to a budget derived from it, beyond which requests get BUSY")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_PATH,
                        help="TFLite model file (default: the shipped one)")
    parser.add_argument("--labels", type=Path, default=DEFAULT_LABELS_PATH,
                        help="labels.json matching the model (default: the shipped one)")
    parser.add_argument("--once", action="store_true",
                        help="exit after answering one request (the original demo's behaviour)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log DEBUG lines too (logs go to stderr)")
    return parser


def checked_memory_budget(args) -> int:
    """The memory budget for ``args.memory``, once every setting is known to be usable.

    Raises UsageError for a port or CID that cannot be, and for limits that would refuse
    every image (0) or promise images no message can carry.
    """
    check_cid(args.parent_cid, "parent_cid", 1)
    check_port(args.client_port, "client_port")
    check_port(args.parent_port, "parent_port")
    if min(args.workers, args.interpreters, args.queue, args.max_connections) < 1:
        raise UsageError("--workers, --interpreters, --queue and --max-connections must be at "
                         "least 1")
    if not (args.io_timeout > 0 and args.handshake_timeout > 0):
        raise UsageError("--io-timeout and --handshake-timeout must be positive")
    if not 1 <= args.max_image_bytes <= MAX_IMAGE_IN_MESSAGE:
        raise UsageError(f"--max-image-bytes must be between 1 and {MAX_IMAGE_IN_MESSAGE} "
                         "(what one message can carry)")
    if args.max_image_pixels < 1:
        raise UsageError("--max-image-pixels must be at least 1")
    return budget_for_enclave_memory(args.memory)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Logs are diagnostics: stderr, like every other message of the app (stdout stays empty).
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s enclave %(levelname)s %(message)s", stream=sys.stderr)
    log = logging.getLogger("enclave")
    try:
        memory_budget = checked_memory_budget(args)
    except UsageError as exc:
        print(f"app.py: {exc.diagnostic()}", file=sys.stderr)
        return exc.exit_status
    started = time.perf_counter()
    try:
        attestor = open_attestation_provider(args.dev_attestation, measured_files(args),
                                             base=PROJECT_ROOT)
        if getattr(attestor, "is_development", False):
            dev_policy = write_dev_policy(attestor.authority)
        with without_tflite_notices():  # the runtime's notice comes with the first interpreter
            model = LesionModel(args.model, args.labels)
        config = ServiceConfig(
            transport=args.transport, host=args.host, parent_cid=args.parent_cid,
            client_port=args.client_port, parent_port=args.parent_port, workers=args.workers,
            interpreters=args.interpreters, queue_size=args.queue,
            max_connections=args.max_connections,
            io_timeout=args.io_timeout, handshake_timeout=args.handshake_timeout,
            max_image_bytes=args.max_image_bytes,
            max_image_pixels=args.max_image_pixels, memory_budget=memory_budget, once=args.once)
        with without_tflite_notices():  # the worker pool makes the other interpreters
            service = EnclaveService(config, model, attestor)
    except NitroLesionError as exc:
        print(f"enclave: cannot start: {exc}", file=sys.stderr)
        return 1
    if args.dev_attestation:
        log.warning("DEVELOPMENT attestation authority in use (%s): not a real enclave",
                    args.dev_attestation)
        if getattr(attestor, "is_development", False):
            log.info("development policy for this enclave's PCRs: --dev-root %s --policy %s",
                     attestor.authority.root_pem_path, dev_policy)

    def on_signal(signum, _frame):
        service.shutdown()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        service.bind()
    except NitroLesionError as exc:
        print(f"enclave: cannot start: {exc}", file=sys.stderr)
        return 1
    server = threading.Thread(target=service.serve, name="accept", daemon=True)
    server.start()
    service.ready.wait()
    log.info("ready in %.2f s (key generation %.2f s, %d workers, %d interpreters, model %s, "
             "memory budget %d MiB for --memory %d)", time.perf_counter() - started,
             service.keygen_seconds, args.workers, args.interpreters, args.model.name,
             memory_budget // (1024 * 1024), args.memory)
    while server.is_alive():
        server.join(timeout=0.5)
        if service.parent.fatal is not None:
            service.shutdown()  # vsock cannot work here: no parent will ever be reached (idempotent)
    if service.parent.fatal is not None:
        print(f"enclave: cannot reach the parent: {service.parent.fatal}", file=sys.stderr)
        return 1
    return 0

