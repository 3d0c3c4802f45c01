"""The parent commands' shared options and what they turn into: transport, key folder, and
the trust (PCR policy and roots) an enclave must meet.

The CLI (cli.py) and the classify command both use these, so neither imports the other.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta
from pathlib import Path

from nitrolesion.attestation.errors import InvalidPolicy
from nitrolesion.attestation.policy import AttestationPolicy
from nitrolesion.crypto.keystore import check_private_folder, default_key_dir
from nitrolesion.errors import NitroLesionError, UsageError
from nitrolesion.limits import DEFAULT_TCP_HOST
from nitrolesion.transport import TRANSPORTS, default_transport

#: Without a policy file, documents may be at most this old (the client's fresh nonce
#: already proves liveness; this bounds clock trouble).
DEFAULT_MAX_AGE = timedelta(minutes=5)


#: The policy `parent.py trust FILE` installs in the key folder; used when --policy is absent.
POLICY_FILE = "policy.json"


class NoPolicy(NitroLesionError):
    """No PCR policy is configured: refuse to trust any enclave (exit status 1)."""


def add_transport_options(parser: argparse.ArgumentParser, *, key_dir: bool = True) -> None:
    parser.add_argument("--transport", choices=TRANSPORTS, default=None,
                        help="vsock (default) or tcp; also ENCLAVE_TRANSPORT")
    parser.add_argument("--host", default=DEFAULT_TCP_HOST, help="with tcp: address CIDs map to")
    if not key_dir:
        return
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
    from nitrolesion.parent.enclave_client import Trust

    policy = load_policy(args)
    roots = []
    for path in args.dev_root:
        try:
            roots.extend(load_pem_roots(path))
        except (OSError, ValueError) as exc:
            raise UsageError(f"--dev-root {path}: not a readable PEM certificate file") from exc
    return Trust(policy, roots)



def pcr_lines(result) -> list[str]:
    return [f"  PCR{i}: {result.pcrs[i].hex()}" for i in (0, 1, 2) if i in result.pcrs]
