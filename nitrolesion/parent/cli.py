"""Parent-side command line: relay ciphertext to and from the skin-lesion enclave.

    python parent/parent.py trust measurements.json     once: pin the enclave image's PCRs
    python parent/parent.py server 5006                 listen for the enclave's key and results
    python parent/parent.py client 16 5005 [--image P]  attest the enclave, send one sealed image
    python parent/parent.py classify IMAGE|DIR... [--out results.csv|.json] [--json]
    python parent/parent.py classify IMAGE|DIR... --enclave vsock:16:5005 --enclave tcp:HOST:PORT
    python parent/parent.py relay --listen 0.0.0.0:8443 --cid 16 --port 5005
    python parent/parent.py demo [--image P]            everything on this machine over TCP
    python parent/parent.py web [--port 8080]           the clinic's page: attests and encrypts in the browser
    python parent/parent.py verify-attestation FILE [--at ISO8601] [--policy F] ...

Set ENCLAVE_TRANSPORT=tcp (or --transport tcp) on machines without Nitro Enclaves: CIDs
then map to 127.0.0.1 (--host to change).

Trust fails closed: server, client and classify send nothing to (and believe nothing from)
an enclave unless a PCR policy pins its image: --policy FILE, or the policy that
`parent.py trust FILE` installed in the key folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from datetime import timedelta
from pathlib import Path

from nitrolesion.attestation.errors import InvalidPolicy
from nitrolesion.attestation.policy import AttestationPolicy
from nitrolesion.crypto.envelope import fingerprint, public_key_der
from nitrolesion.crypto.keystore import ParentKeyStore, ensure_private_folder, write_private_file
from nitrolesion.errors import ImageFileError, NitroLesionError, UsageError
from nitrolesion.limits import ANY_CID, DEFAULT_ENCLAVE_CID, DEFAULT_ENCLAVE_PORT
from nitrolesion.parent.options import (
    POLICY_FILE, add_transport_options, add_trust_options, key_dir_of, pcr_lines, transport_of,
    trust_of)
from nitrolesion.transport import MIN_ENCLAVE_CID, check_cid, check_port, endpoint_for, no_enclave_here

#: Third-party modules the commands import, some only when they run (requirements.txt);
#: nitrolesion.environment checks them before main() runs.
REQUIRED_MODULES = ("Crypto", "cbor2", "cryptography", "numpy", "PIL", "tqdm")



# -- trust ------------------------------------------------------------------------------
def cmd_trust(args) -> int:
    """Check a policy (or nitro-cli measurements) and install it as the default."""
    from nitrolesion.attestation.cli import policy_problem

    try:
        policy = AttestationPolicy.from_json_file(args.file)
    except InvalidPolicy as exc:
        raise UsageError(policy_problem(args.file, exc)) from exc
    key_dir = key_dir_of(args)
    ensure_private_folder(key_dir)
    path = write_private_file(key_dir, POLICY_FILE,
                              (json.dumps(policy.to_dict(), indent=2) + "\n").encode())
    print(f"Installed {path}: server, client and classify now trust only enclaves with")
    for number, pcr_set in enumerate(policy.allowed_pcr_sets):
        print(f"  set {number}: " + ", ".join(f"PCR{i} {value.hex()[:16]}..."
                                              for i, value in sorted(pcr_set.items())))
    if policy.allow_debug:
        print("WARNING: allow_debug is true: debug-mode enclaves (host can read them) are trusted")
    return 0


# -- server -----------------------------------------------------------------------------
def cmd_server(args) -> int:
    from nitrolesion.parent.server import ParentServer

    trust = trust_of(args)
    key = ParentKeyStore(key_dir_of(args)).load_or_create()
    endpoint = endpoint_for(transport_of(args), ANY_CID, args.port, args.host)
    if endpoint.transport == "vsock" and no_enclave_here():
        # Not refused: a container on a parent instance may lack the device node.
        print("parent.py server: note: this machine has no /dev/nitro_enclaves, so no enclave "
              "runs beside it; off Nitro, use --transport tcp (or ENCLAVE_TRANSPORT=tcp)",
              file=sys.stderr, flush=True)
    printing = threading.Lock()  # connection threads report at once; keep lines whole

    def show(event) -> None:
        with printing:
            print(event.text, flush=True)

    server = ParentServer(endpoint, key, key_dir_of(args), show, trust=trust,
                          max_connections=args.max_connections, io_timeout=args.io_timeout,
                          handshake_timeout=args.handshake_timeout)
    server.bind()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.stop()
    return 0


# -- client -----------------------------------------------------------------------------
def cmd_client(args) -> int:
    from nitrolesion.parent.enclave_client import EnclaveClient
    from nitrolesion.parent.images import NO_IMAGE_HELP, default_image
    from nitrolesion.parent.server import load_announcement

    image_path = args.image or default_image()
    if image_path is None:
        raise UsageError(NO_IMAGE_HELP)
    image = read_image(image_path)
    trust = trust_of(args)
    key_dir = key_dir_of(args)
    announced = load_announcement(key_dir)
    if announced is None:
        print(f"client: no enclave key in {key_dir}: start `parent.py server 5006` first, "
              "then the enclave, and wait for 'Enclave public key received'", file=sys.stderr)
        return 1
    parent_key = ParentKeyStore(key_dir).load_or_create()
    endpoint = endpoint_for(transport_of(args), args.cid, args.port, args.host)
    with EnclaveClient(endpoint, trust, timeout=args.timeout) as client:
        result = client.attest(expected_key=announced.public_key)
        print(f"Enclave attested: module {result.module_id}, key sha256 "
              f"{fingerprint(result.public_key)[:16]}...", flush=True)
        for line in pcr_lines(result):
            print(line)
        _, sent = client.send_one_shot(image, public_key_der(parent_key))
    print(f"Image encrypted and sent: {image_path.name}, {len(image)} bytes -> {sent} bytes "
          f"(RSA-OAEP-3072 + AES-256-GCM); the server prints the classification", flush=True)
    return 0


def read_image(path: Path) -> bytes:
    from nitrolesion.parent.images import read_image_file

    try:
        return read_image_file(Path(path), named=True)
    except ImageFileError as exc:
        raise UsageError(f"image {path}: {exc}") from exc


# -- classify ---------------------------------------------------------------------------
def cmd_classify(args) -> int:
    """Classify a batch; Ctrl-C saves the rows done and raises classify.Interrupted,
    whose text main() prints."""
    from nitrolesion.parent.classify import run_classify

    return run_classify(args, lambda: trust_of(args))


def cmd_web(args) -> int:
    from nitrolesion.parent.web import run_web

    return run_web(args)


def cmd_relay(args) -> int:
    """Relay TCP connections to the enclave, blind, until SIGTERM or Ctrl-C."""
    import logging
    import signal

    from nitrolesion.parent.relay import Relay, RelayConfig, parse_host_port, serve_health
    from nitrolesion.transport import TcpEndpoint

    host, port = parse_host_port(args.listen)
    config = RelayConfig(
        listen=TcpEndpoint(port, host),
        enclave=endpoint_for(transport_of(args), args.cid, args.port, args.host),
        max_connections=args.max_connections, idle_timeout=args.idle_timeout,
        total_timeout=args.total_timeout, connect_timeout=args.connect_timeout)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s relay %(levelname)s %(message)s")
    relay = Relay(config)
    relay.bind()
    health = None
    if args.health:
        health_host, health_port = parse_host_port(args.health, "--health")
        health = serve_health(relay, TcpEndpoint(health_port, health_host))
    # Kubernetes stops a pod with SIGTERM: accept nothing new, let connections finish.
    signal.signal(signal.SIGTERM, lambda *_: relay.stop())
    bound = "{}:{}".format(*relay.address)
    print(f"Relay ready: tcp:{bound} -> {config.enclave} (blind; at most "
          f"{config.max_connections} connections)"
          + (f"; health on http://{args.health}/ready" if health else ""), flush=True)
    try:
        relay.serve_forever()
    except KeyboardInterrupt:
        relay.stop()
    finally:
        if health is not None:
            health.shutdown()
    return 0


def cmd_demo(args) -> int:
    from nitrolesion.parent.demo import run_demo

    return run_demo(args)


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    import nitrolesion.parent.server as server_limits

    parser = argparse.ArgumentParser(
        prog="parent.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    server = sub.add_parser("server", help="listen for the enclave's key and sealed results")
    server.add_argument("port", type=int, help="parent port the enclave connects to (5006), "
                                               "1..65535")
    server.add_argument("--max-connections", type=_positive(int), default=server_limits.MAX_CONNECTIONS,
                        help="connections served at once; more are refused (default %(default)s)")
    server.add_argument("--io-timeout", type=_positive(float), default=server_limits.IO_TIMEOUT,
                        help="seconds one frame may take once it started (default %(default)s)")
    server.add_argument("--handshake-timeout", type=_positive(float),
                        default=server_limits.HANDSHAKE_TIMEOUT,
                        help="seconds a new connection has to send its first frame "
                             "(default %(default)s)")
    add_transport_options(server)
    add_trust_options(server, timeout=False)
    server.set_defaults(func=cmd_server)

    trust = sub.add_parser("trust", help="install a PCR policy (or nitro-cli build-enclave "
                                         "output) as the default trust of this key folder")
    trust.add_argument("file", type=Path, help="policy JSON or measurements.json")
    trust.add_argument("--key-dir", type=Path, default=None,
                       help="key folder to install into (default $NITROLESION_KEY_DIR or "
                            "~/.config/nitrolesion)")
    trust.set_defaults(func=cmd_trust)

    client = sub.add_parser("client", help="attest the enclave and send one sealed image; "
                                           "the server prints the result")
    client.add_argument("cid", type=int, help="enclave CID (16): the --enclave-cid given to "
                                              "nitro-cli run-enclave, 4 or more; ignored with tcp")
    client.add_argument("port", type=int, help="enclave client port (5005), 1..65535")
    client.add_argument("--image", type=Path, help="image to send (default: first of "
                                                   "sample_images/, else the dataset folder)")
    add_transport_options(client)
    add_trust_options(client)
    client.set_defaults(func=cmd_client)

    classify = sub.add_parser("classify", help="classify images over an attested session (or "
                                               "one per enclave with --enclave) and print the "
                                               "results here")
    classify.add_argument("images", nargs="+", type=Path,
                          help="image files or folders (each must exist)")
    classify.add_argument("--cid", type=int, default=DEFAULT_ENCLAVE_CID,
                          help="enclave CID (default %(default)s)")
    classify.add_argument("--port", type=int, default=DEFAULT_ENCLAVE_PORT,
                          help="enclave client port (default %(default)s)")
    classify.add_argument("--json", action="store_true",
                          help="print JSON with all 7 probabilities, and the summary as JSON")
    classify.add_argument("--out", type=Path,
                          help="write results with their provenance to FILE.csv or FILE.json")
    classify.add_argument("--window", type=int, default=4, help="requests in flight (default 4)")
    classify.add_argument("--no-progress", action="store_true",
                          help="no progress bar (drawn only when stderr is a terminal)")
    classify.add_argument("--enclave", action="append", default=[], metavar="ENDPOINT",
                          help="spread the batch over a fleet: an enclave as vsock:CID:PORT or "
                               "tcp:HOST:PORT (a relay), repeat for each; every one is attested "
                               "on its own (own nonce, same policy); replaces --cid/--port")
    classify.add_argument("--enclaves-file", type=Path, metavar="FILE",
                          help="fleet endpoints, one per line (# comments), with any --enclave")
    add_transport_options(classify)
    add_trust_options(classify)
    classify.set_defaults(func=cmd_classify)

    web = sub.add_parser("web", help="serve the clinic's page (it attests the enclave and encrypts "
                                     "in the browser) and relay its ciphertext to the enclave")
    web.add_argument("--port", type=int, default=8080, help="HTTP port of the page (default %(default)s)")
    web.add_argument("--bind", default="127.0.0.1",
                     help="address to serve on (default %(default)s: this machine only; WebCrypto "
                          "needs localhost or HTTPS, see docs/WEB.md for TLS)")
    web.add_argument("--cid", type=int, default=DEFAULT_ENCLAVE_CID,
                     help="enclave CID (default %(default)s)")
    web.add_argument("--enclave-port", type=int, default=DEFAULT_ENCLAVE_PORT,
                     help="enclave client port (default %(default)s)")
    add_transport_options(web)
    add_trust_options(web, timeout=False)
    web.set_defaults(func=cmd_web)

    import nitrolesion.parent.relay as relay_limits

    relay = sub.add_parser("relay", help="forward TCP connections to the enclave's port, blind "
                                         "(what a Kubernetes Service points at)")
    relay.add_argument("--listen", required=True, metavar="HOST:PORT",
                       help="TCP address to accept clients on, e.g. 0.0.0.0:8443")
    relay.add_argument("--cid", type=int, default=DEFAULT_ENCLAVE_CID,
                       help="enclave CID to forward to (default %(default)s; with tcp: --host)")
    relay.add_argument("--port", type=int, default=DEFAULT_ENCLAVE_PORT,
                       help="enclave client port (default %(default)s)")
    relay.add_argument("--max-connections", type=_positive(int),
                       default=relay_limits.MAX_CONNECTIONS,
                       help="connections relayed at once; more are closed at once "
                            "(default %(default)s)")
    relay.add_argument("--idle-timeout", type=_positive(float), default=relay_limits.IDLE_TIMEOUT,
                       help="seconds a connection may carry nothing either way "
                            "(default %(default)s)")
    relay.add_argument("--total-timeout", type=_positive(float), default=relay_limits.TOTAL_TIMEOUT,
                       help="seconds one connection may last (default %(default)s)")
    relay.add_argument("--connect-timeout", type=_positive(float),
                       default=relay_limits.CONNECT_TIMEOUT,
                       help="seconds to reach the enclave for a new connection "
                            "(default %(default)s)")
    relay.add_argument("--health", metavar="HOST:PORT",
                       help="serve GET /ready (200 when the enclave accepts connections) and "
                            "GET /live over HTTP here, for Kubernetes probes")
    add_transport_options(relay, key_dir=False)  # the relay holds no key: it sees ciphertext only
    relay.set_defaults(func=cmd_relay)

    demo = sub.add_parser("demo", help="run enclave, server and client on this machine (TCP)")
    demo.add_argument("--image", type=Path, help="image to classify")
    demo.add_argument("--keep", action="store_true", help="keep the temporary state folder")
    demo.set_defaults(func=cmd_demo)

    verify = sub.add_parser("verify-attestation", add_help=False,
                            help="verify an attestation document file (see its --help)")
    verify.set_defaults(func=None)
    return parser


def check_addresses(args) -> None:
    """Ports and CIDs that cannot be are usage errors (exit 2), before anything starts.

    Ports are 1..65535 for both transports (one command line works on and off Nitro);
    an enclave's CID is at least 4, as nitro-cli run-enclave --enclave-cid requires.
    Raises UsageError.
    """
    option = "--" if args.command in ("classify", "relay") else ""  # options there
    if getattr(args, "cid", None) is not None:
        check_cid(args.cid, f"{option}cid" if option else "enclave CID", MIN_ENCLAVE_CID)
    if getattr(args, "port", None) is not None:
        check_port(args.port, f"{option}port")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "verify-attestation":
        from nitrolesion.attestation.cli import main as verify_main

        return verify_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_addresses(args)
        return args.func(args)
    except NitroLesionError as exc:  # the one place: each error says its line and status
        print(f"parent.py {args.command}: {exc.diagnostic()}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt as exc:
        # Ctrl-C: one line, no traceback, 128 + SIGINT. classify raises a KeyboardInterrupt
        # that says what it saved; elsewhere there is nothing to say but that.
        print(f"parent.py {args.command}: {str(exc) or 'interrupted'}", file=sys.stderr)
        return 130

