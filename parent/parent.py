"""Parent-side command line: relay ciphertext to and from the skin-lesion enclave.

    python parent/parent.py trust measurements.json     once: pin the enclave image's PCRs
    python parent/parent.py server 5006                 listen for the enclave's key and results
    python parent/parent.py client 16 5005 [--image P]  attest the enclave, send one sealed image
    python parent/parent.py classify IMAGE|DIR... [--out results.csv|.json] [--json]
    python parent/parent.py demo [--image P]            everything on this machine over TCP
    python parent/parent.py verify-attestation FILE [--at ISO8601] [--policy F] ...

Set ENCLAVE_TRANSPORT=tcp (or --transport tcp) on machines without Nitro Enclaves: CIDs
then map to 127.0.0.1 (--host to change).

Trust fails closed: server, client and classify send nothing to (and believe nothing from)
an enclave unless a PCR policy pins its image: --policy FILE, or the policy that
`parent.py trust FILE` installed in the key folder.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import threading
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, sys.path[0] is parent/ and "import parent" would find this file.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(ROOT)
elif str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: Third-party modules the commands import, some only when they run (requirements.txt).
REQUIRED_MODULES = ("Crypto", "cbor2", "cryptography", "numpy", "PIL", "tqdm")


def environment_problem(script: str, problem: str) -> str:
    """The one line printed instead of a traceback when this Python cannot run ``script``
    (a path relative to the project, e.g. "parent/parent.py"): how to get the project's
    environment. Standard library only: it runs when the packages are missing."""
    def shown(path: Path) -> str:
        relative = os.path.relpath(path)
        return path.as_posix() if relative.startswith("..") else relative

    venv = ROOT / ".venv"
    python, activate = shown(venv / "bin" / "python"), shown(venv / "bin" / "activate")
    command = f"`{python} {shown(ROOT / script)} ...` or `source {activate}` first"
    name = Path(script).name
    if Path(sys.prefix).resolve() == venv.resolve():
        return (f"{name}: {problem}: .venv is incomplete: remove it and run "
                f"`python3 {shown(ROOT / 'dev.py')} setup`")
    if (venv / "bin" / "python").exists():
        return f"{name}: {problem} in this Python ({sys.executable}): use {command}"
    return (f"{name}: {problem}: run `python3 {shown(ROOT / 'dev.py')} setup` once to create "
            f".venv, then use {command}")


# Guard the third-party imports: with the system Python (no .venv) a user gets one line
# saying how to get the environment, not a ModuleNotFoundError traceback.
if sys.version_info < (3, 10) and __name__ == "__main__":
    print(environment_problem("parent/parent.py", "Python 3.10 or newer is required, this is "
                              f"{sys.version.split()[0]}"), file=sys.stderr)
    sys.exit(1)
try:
    from nitrolesion.attestation.errors import AttestationError, InvalidPolicy  # noqa: E402
    from nitrolesion.attestation.policy import AttestationPolicy  # noqa: E402
    from nitrolesion.crypto.envelope import fingerprint, public_key_der  # noqa: E402
    from nitrolesion.crypto.keystore import (  # noqa: E402
        ParentKeyStore, check_private_folder, default_key_dir, ensure_private_folder,
        write_private_file)
    from nitrolesion.errors import NitroLesionError, RemoteError  # noqa: E402
    from nitrolesion.transport import (  # noqa: E402
        MIN_ENCLAVE_CID, TRANSPORTS, Endpoint, check_cid, check_port, default_transport,
        no_enclave_here)
    from nitrolesion.wire.messages import printable  # noqa: E402

    for _module in REQUIRED_MODULES:  # those imported only when a command runs
        if importlib.util.find_spec(_module) is None:
            raise ModuleNotFoundError(f"No module named {_module!r}", name=_module)
except ModuleNotFoundError as _exc:
    if __name__ != "__main__" or (_exc.name or "").split(".")[0] in ("nitrolesion", "parent"):
        raise  # imported as a library, or our own code is broken: the traceback helps
    print(environment_problem("parent/parent.py", f"missing Python packages ({_exc})"),
          file=sys.stderr)
    sys.exit(1)

#: CID the enclave runs at in the README's nitro-cli command, and its client port.
DEFAULT_ENCLAVE_CID = 16
DEFAULT_ENCLAVE_PORT = 5005
#: Without a policy file, documents may be at most this old (the client's fresh nonce
#: already proves liveness; this bounds clock trouble).
DEFAULT_MAX_AGE = timedelta(minutes=5)


#: The policy `parent.py trust FILE` installs in the key folder; used when --policy is absent.
POLICY_FILE = "policy.json"


class UsageError(Exception):
    """Bad arguments: exit status 2."""


class NoPolicy(NitroLesionError):
    """No PCR policy is configured: refuse to trust any enclave (exit status 1)."""


def add_transport_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--transport", choices=TRANSPORTS, default=None,
                        help="vsock (default) or tcp; also ENCLAVE_TRANSPORT")
    parser.add_argument("--host", default="127.0.0.1", help="with tcp: address CIDs map to")
    parser.add_argument("--key-dir", type=Path, default=None,
                        help="parent key and state folder (default $NITROLESION_KEY_DIR or "
                             "~/.config/nitrolesion)")


def add_trust_options(parser: argparse.ArgumentParser, *, timeout: bool = True) -> None:
    parser.add_argument("--policy", type=Path,
                        help="JSON attestation policy (allowed PCR sets, debug, max age); "
                             f"default: {POLICY_FILE} in the key folder, installed by "
                             "`parent.py trust FILE`; see docs/ATTESTATION.md, section "
                             "'Attestation policy'")
    parser.add_argument("--dev-root", type=Path, action="append", default=[],
                        help="DEVELOPMENT ONLY: also trust this root PEM (the dev authority's "
                             "dev_root.pem); the pinned AWS root stays trusted")
    parser.add_argument("--insecure-any-enclave", action="store_true",
                        help="TESTS ONLY, INSECURE: accept any PCRs, i.e. any enclave image "
                             "with a valid attestation, including one the host built to "
                             "copy your images")
    if timeout:
        parser.add_argument("--timeout", type=float, default=60.0,
                            help="seconds to wait for each answer from the enclave (default 60)")


def transport_of(args) -> str:
    return args.transport or default_transport()


def key_dir_of(args) -> Path:
    return args.key_dir or default_key_dir()


def load_policy(args) -> AttestationPolicy:
    """The PCR policy: --policy, else the one installed in the key folder; with
    --insecure-any-enclave, any PCRs (loudly). Raises NoPolicy when there is none."""
    from nitrolesion.attestation.cli import policy_problem

    if args.policy:
        try:
            return AttestationPolicy.from_json_file(args.policy)
        except InvalidPolicy as exc:
            raise UsageError(policy_problem(args.policy, exc, f"--policy {args.policy}")) from exc
    installed = key_dir_of(args) / POLICY_FILE
    if installed.exists():
        check_private_folder(key_dir_of(args))
        info = installed.lstat()
        if info.st_uid != os.geteuid() or info.st_mode & 0o022 or not installed.is_file():
            raise NoPolicy(f"{installed} is not a regular file of yours writable only by you; "
                           f"install it again with `parent.py trust FILE`")
        try:
            return AttestationPolicy.from_json_file(installed)
        except InvalidPolicy as exc:
            raise NoPolicy(f"{policy_problem(installed, exc)}; install a good one with "
                           "`parent.py trust FILE`") from exc
    if getattr(args, "insecure_any_enclave", False):
        print("WARNING: --insecure-any-enclave: PCRs are NOT checked; any enclave image with a "
              "valid attestation is trusted. Never use this outside tests.", file=sys.stderr)
        return AttestationPolicy.any_enclave(max_age=DEFAULT_MAX_AGE)
    raise NoPolicy("no PCR policy, so no enclave is trusted: run `parent.py trust "
                   "measurements.json` once (the output of `nitro-cli build-enclave`), or pass "
                   "--policy FILE")


def trust_of(args):
    from nitrolesion.attestation.trust import load_pem_roots
    from parent.enclave_client import Trust

    policy = load_policy(args)
    roots = []
    for path in args.dev_root:
        try:
            roots.extend(load_pem_roots(path))
        except (OSError, ValueError) as exc:
            raise UsageError(f"--dev-root {path}: not a readable PEM certificate file") from exc
    return Trust(policy, roots)


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


def pcr_lines(result) -> list[str]:
    return [f"  PCR{i}: {result.pcrs[i].hex()}" for i in (0, 1, 2) if i in result.pcrs]


# -- server -----------------------------------------------------------------------------
def cmd_server(args) -> int:
    from parent.server import ParentServer

    trust = trust_of(args)
    key = ParentKeyStore(key_dir_of(args)).load_or_create()
    endpoint = Endpoint(transport_of(args), 0xFFFFFFFF, args.port, args.host)
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
    from parent.enclave_client import EnclaveClient
    from parent.images import NO_IMAGE_HELP, default_image
    from parent.server import load_announcement

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
    endpoint = Endpoint(transport_of(args), args.cid, args.port, args.host)
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
    from parent.images import ImageFileError, read_image_file

    try:
        return read_image_file(Path(path), named=True)
    except ImageFileError as exc:
        raise UsageError(f"image {path}: {exc}") from exc


# -- classify ---------------------------------------------------------------------------
def cmd_classify(args) -> int:
    """Classify a batch; Ctrl-C saves the rows done and raises classify.Interrupted,
    whose text main() prints."""
    from parent.classify import run_classify

    return run_classify(args, lambda: trust_of(args))


def cmd_demo(args) -> int:
    from parent.demo import run_demo

    return run_demo(args)


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    import parent.server as server_limits

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

    classify = sub.add_parser("classify", help="classify images over one attested session and "
                                               "print the results here")
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
    add_transport_options(classify)
    add_trust_options(classify)
    classify.set_defaults(func=cmd_classify)

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
    option = "--" if args.command == "classify" else ""  # classify takes them as options
    try:
        if getattr(args, "cid", None) is not None:
            check_cid(args.cid, f"{option}cid" if option else "enclave CID", MIN_ENCLAVE_CID)
        if getattr(args, "port", None) is not None:
            check_port(args.port, f"{option}port")
    except ValueError as exc:
        raise UsageError(str(exc)) from None


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
    except UsageError as exc:
        print(f"parent.py {args.command}: {exc}", file=sys.stderr)
        return 2
    except RemoteError as exc:
        print(f"parent.py {args.command}: the enclave refused: {printable(exc.code)}: "
              f"{printable(exc.message)}", file=sys.stderr)
        return 1
    except AttestationError as exc:
        print(f"parent.py {args.command}: attestation failed, nothing was sent: "
              f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except NitroLesionError as exc:
        print(f"parent.py {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        # Ctrl-C: one line, no traceback, 128 + SIGINT. classify raises a KeyboardInterrupt
        # that says what it saved; elsewhere there is nothing to say but that.
        print(f"parent.py {args.command}: {str(exc) or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # Run as a script, this file is __main__, but the commands import parent.parent (for
    # UsageError), a second copy with classes of its own that __main__'s handlers would
    # not catch. Run that copy, so there is one UsageError.
    from parent.parent import main as package_main

    sys.exit(package_main())
