"""``parent.py verify-attestation``: check an attestation document file from the command line.

Exit codes: 0 the document is valid, 1 verification failed (``verification failed:
<Check>: <message>`` on stderr), 2 usage error (bad arguments, unreadable files, bad policy).

``--root PEM`` adds roots to the pinned AWS root; it never replaces it, and the output
always says which root the chain ended at, so a development document can never pass for
an AWS-attested one.

Without ``--policy`` the document's chain, signature, debug mode and nonce are still
verified but its PCRs are not: any enclave image passes. The output says so plainly
(``PCRs: NOT checked`` in text, ``"pcrs_checked": false`` in JSON), so a valid result is
never mistaken for "this is our enclave".
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TextIO

from cryptography import x509

from nitrolesion.attestation.errors import AttestationError, InvalidPolicy
from nitrolesion.attestation.policy import AttestationPolicy
from nitrolesion.attestation.trust import aws_nitro_root, certificate_sha256, load_pem_roots
from nitrolesion.attestation.verifier import AttestationResult, verify_attestation
from nitrolesion.errors import UsageError

EXIT_VALID = 0
EXIT_INVALID = 1
EXIT_USAGE = 2
SHOWN_PCRS = (0, 1, 2, 8)
PCRS_NOT_CHECKED = "NOT checked (no --policy given): any enclave image passes; only the chain and signature were verified"
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parent.py verify-attestation",
        description="Verify an AWS Nitro Enclaves attestation document (COSE_Sign1, ES384) "
        "against the pinned AWS root and a PCR policy.",
    )
    parser.add_argument("file", metavar="FILE", type=Path, help="raw attestation document (CBOR COSE_Sign1)")
    when = parser.add_mutually_exclusive_group()
    when.add_argument("--at", metavar="ISO8601", help="verify as of this time (no zone = UTC); default: now")
    when.add_argument("--at-ms", metavar="MS", type=int, help="verify as of this Unix time in milliseconds")
    parser.add_argument(
        "--policy", metavar="FILE", type=Path,
        help="JSON policy with the allowed PCRs (see docs/ATTESTATION.md, section 'Attestation "
        "policy'); without it PCRs are NOT checked",
    )
    parser.add_argument("--allow-debug", action="store_true", help="accept debug-mode (all-zero PCR) enclaves")
    parser.add_argument(
        "--root", "--dev-root", metavar="PEM", type=Path, action="append", default=[],
        help="also trust the root(s) in this PEM file, e.g. the development authority's dev_root.pem",
    )
    parser.add_argument("--nonce", metavar="HEX", help="require this nonce (hex) in the document")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return parser


def main(
    argv: Sequence[str] | None = None,
    *,
    clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run the command; returns the exit code (0 valid, 1 invalid, 2 usage error)."""
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse reports usage errors (2) and --help (0) this way
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE

    try:
        now = _verification_time(args, clock)
        policy = _load_policy(args)
        extra_roots = [cert for path in args.root for cert in _load_roots(path)]
        nonce = _parse_nonce(args.nonce)
        document = _read_document(args.file)
    except UsageError as exc:
        print(f"{parser.prog}: error: {exc}", file=err)
        return EXIT_USAGE

    for cert in extra_roots:
        print(
            f"note: also trusting root sha256:{certificate_sha256(cert)} ({cert.subject.rfc4514_string()}) "
            "given with --root; it is not the AWS Nitro root",
            file=err,
        )
    try:
        result = verify_attestation(
            document, now=now, policy=policy, expected_nonce=nonce, trusted_roots=[aws_nitro_root(), *extra_roots]
        )
    except AttestationError as exc:
        print(f"verification failed: {exc.check}: {exc}", file=err)
        if args.json:
            print(json.dumps({"valid": False, "check": exc.check, "message": str(exc)}), file=out)
        return EXIT_INVALID

    if args.json:
        print(json.dumps(_as_json(result, now)), file=out)
    else:
        for line in _as_text(result, now):
            print(line, file=out)
    return EXIT_VALID


def _verification_time(args: argparse.Namespace, clock: Callable[[], datetime]) -> datetime:
    if args.at_ms is not None:
        try:
            return _EPOCH + timedelta(milliseconds=args.at_ms)
        except OverflowError as exc:
            raise UsageError(f"--at-ms: expected a representable time, got {args.at_ms}") from exc
    if args.at is not None:
        try:
            moment = datetime.fromisoformat(args.at)
        except ValueError as exc:
            raise UsageError(f"--at: expected an ISO 8601 time like 2024-09-07T15:00:00Z, got {args.at!r}") from exc
        return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment
    return clock()


def _load_policy(args: argparse.Namespace) -> AttestationPolicy:
    if args.policy is None:
        # Explicitly insecure, and the output says so (PCRS_NOT_CHECKED).
        return AttestationPolicy.any_enclave(allow_debug=args.allow_debug)
    try:
        policy = AttestationPolicy.from_json_file(args.policy)
    except InvalidPolicy as exc:
        raise UsageError(policy_problem(args.policy, exc, f"--policy {args.policy}")) from exc
    if args.allow_debug and not policy.allow_debug:
        policy = AttestationPolicy(
            allowed_pcr_sets=policy.allowed_pcr_sets, allow_debug=True, max_age=policy.max_age
        )
    return policy


def policy_problem(path: Path, exc: InvalidPolicy, label: str | None = None) -> str:
    """"LABEL: what is wrong" for a policy file that did not load, naming the file once.

    ``label`` defaults to the path ("--policy p.json" for an option). InvalidPolicy's
    messages about the file itself already start with "policy file PATH: ", and those
    about its content with "policy: "; that prefix is dropped for the label.
    """
    cause = exc.__cause__
    if isinstance(cause, OSError) and cause.strerror:
        # str(OSError) names the path a third time: keep only the reason.
        return f"{label or path}: expected a readable file, got {cause.strerror}"
    text = str(exc)
    for prefix in (f"policy file {path}: ", "policy: "):
        if text.startswith(prefix):
            text = text[len(prefix):]
            break
    return f"{label or path}: {text}"


def _load_roots(path: Path) -> list[x509.Certificate]:
    try:
        return load_pem_roots(path)
    except OSError as exc:
        raise UsageError(f"--root {path}: expected a readable file, got {exc.strerror}") from exc
    except ValueError as exc:
        raise UsageError(f"--root {path}: expected PEM certificates, got unparsable data") from exc


def _parse_nonce(text: str | None) -> bytes | None:
    if text is None:
        return None
    try:
        return bytes.fromhex(text)
    except ValueError as exc:
        raise UsageError(f"--nonce: expected hex, got {text!r}") from exc


def _read_document(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"{path}: expected a readable attestation document, got {exc.strerror}") from exc


def _root_label(result: AttestationResult) -> str:
    fingerprint = certificate_sha256(result.root)
    if result.root_is_aws:
        return f"AWS Nitro Enclaves Root-G1 (sha256:{fingerprint})"
    return f"sha256:{fingerprint} from --root, NOT the AWS Nitro root ({result.root.subject.rfc4514_string()})"


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _pcrs_checked(result: AttestationResult) -> bool:
    # -1: the policy was AttestationPolicy.any_enclave(), so no PCR set was compared.
    return result.matched_pcr_set >= 0


def _as_text(result: AttestationResult, now: datetime) -> list[str]:
    lines = [
        f"module_id: {result.module_id}",
        f"time: {_iso(result.timestamp)} ({result.timestamp_ms} ms)",
        f"digest: {result.digest}",
        f"debug: {'yes (all-zero PCRs)' if result.debug else 'no'}",
    ]
    lines += [f"PCR{i}: {result.pcrs[i].hex() if i in result.pcrs else 'none'}" for i in SHOWN_PCRS]
    if _pcrs_checked(result):
        lines.append(f"PCRs: checked, match allowed set #{result.matched_pcr_set} of the policy")
    else:
        lines.append(f"PCRs: {PCRS_NOT_CHECKED}")
    key = "none"
    if result.public_key is not None:
        key = f"sha256:{result.public_key_sha256} ({len(result.public_key)} bytes)"
    lines += [
        f"public_key: {key}",
        f"nonce: {'none' if result.nonce is None else f'{len(result.nonce)} bytes'}",
        f"user_data: {'none' if result.user_data is None else f'{len(result.user_data)} bytes'}",
        f"root: {_root_label(result)}",
        f"verified at: {_iso(now)}",
        "result: valid" if _pcrs_checked(result) else "result: valid, but PCRs NOT checked (no --policy given)",
    ]
    return lines


def _as_json(result: AttestationResult, now: datetime) -> dict[str, Any]:
    return {
        "valid": True,
        "module_id": result.module_id,
        "time": _iso(result.timestamp),
        "timestamp_ms": result.timestamp_ms,
        "digest": result.digest,
        "debug": result.debug,
        "pcrs": {f"PCR{i}": result.pcrs[i].hex() for i in SHOWN_PCRS if i in result.pcrs},
        "pcrs_checked": _pcrs_checked(result),
        "matched_pcr_set": result.matched_pcr_set if _pcrs_checked(result) else None,
        "pcrs_note": None if _pcrs_checked(result) else f"PCRs {PCRS_NOT_CHECKED}",
        "public_key_sha256": result.public_key_sha256,
        "public_key_length": None if result.public_key is None else len(result.public_key),
        "nonce_length": None if result.nonce is None else len(result.nonce),
        "user_data_length": None if result.user_data is None else len(result.user_data),
        "root_sha256": certificate_sha256(result.root),
        "root_is_aws": result.root_is_aws,
        "verified_at": _iso(now),
    }


if __name__ == "__main__":
    sys.exit(main())
