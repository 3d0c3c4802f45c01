"""A local development attestation authority: Nitro-format documents without Nitro hardware.

It plays the part of the AWS PKI and the NSM for demos and tests:

- a development root CA, an intermediate CA and a short-lived leaf, all ECDSA P-384
  (the AWS chain uses P-384 throughout), generated once per state directory;
- documents in exactly the NSM's format: untagged COSE_Sign1, protected header
  ``{1: -35}`` (ES384), raw r||s signature, payload map with module_id, digest "SHA384",
  timestamp (ms), pcrs 0..15 (48 bytes each), certificate, cabundle [root, intermediate],
  public_key, user_data, nonce (null when absent, as the NSM does).

PCRs:

- PCR0 = :func:`measure_files` over the enclave's code and model files, so changing the
  model changes PCR0 just as rebuilding an EIF would;
- PCR1 = SHA-384(``DEV_PCR1_LABEL``) and PCR2 = SHA-384(``DEV_PCR2_LABEL``): fixed,
  documented, not all-zero (so a dev document is not mistaken for a debug-mode one);
- every other PCR (3..15, including PCR8, the signing certificate) is 48 zero bytes.

DEVELOPMENT ONLY, for tests of refusal: an authority created with ``pcr_variant="..."``
(kept in its state file, so an enclave started with ``--dev-attestation DIR`` on that
folder picks it up) reports PCR0 and PCR2 mixed with that text, as if it ran another build
of the image: a policy pinning the normal development PCRs refuses it. A real enclave's PCRs
come from the NSM; nothing here can change them.

State directory layout (the directory is made 0700, private keys 0600)::

    dev_root.pem               root certificate: give it to the verifier (--root) to trust it
    dev_root.key               root private key
    dev_intermediate.pem/.key  intermediate certificate / key
    dev_authority.json         module_id (and pcr_variant, when set)

The development root is never trusted by default: the verifier only accepts these
documents when explicitly handed ``dev_root.pem``; the pinned AWS root is not touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from nitrolesion.attestation.cose import CoseSign1, encode_cose_sign1, encode_es384_protected_header
from nitrolesion.attestation.errors import DevAuthorityError, NsmError
from nitrolesion.attestation.nsm import MAX_ATTESTATION_FIELD
from nitrolesion.limits import PCR_LENGTH

ROOT_CERT_FILE = "dev_root.pem"
#: Written beside the root by the enclave app with --dev-attestation: the PCRs it attests,
#: as a policy file for `--dev-root DIR/dev_root.pem --policy DIR/policy.json`.
DEV_POLICY_FILE = "policy.json"
ROOT_KEY_FILE = "dev_root.key"
INTERMEDIATE_CERT_FILE = "dev_intermediate.pem"
INTERMEDIATE_KEY_FILE = "dev_intermediate.key"
STATE_FILE = "dev_authority.json"

DEV_PCR1_LABEL = b"nitrolesion development authority: PCR1 (kernel and boot ramfs stand-in)"
DEV_PCR2_LABEL = b"nitrolesion development authority: PCR2 (application stand-in)"
# Domain separation for PCR0, versioned so a format change cannot collide with an old value.
PCR0_DOMAIN = b"nitrolesion-dev-pcr0-v1\x00"
NUM_PCRS = 16  # the NSM reports PCR0..15 in every document
# Domain separation for a development PCR variant ("another build"), see the module doc.
PCR_VARIANT_DOMAIN = b"nitrolesion-dev-pcr-variant-v1\x00"

ROOT_LIFETIME = timedelta(days=365)
INTERMEDIATE_LIFETIME = timedelta(days=30)
# Nitro leaf certificates live about three hours; ours do too, so expiry handling is exercised.
LEAF_LIFETIME = timedelta(hours=3)
# Issue a fresh leaf when the current one has less than this left, so a document stays
# verifiable for a while after it is issued.
LEAF_RENEW_MARGIN = timedelta(minutes=30)
# Certificates start slightly in the past to tolerate clock differences.
BACKDATE = timedelta(minutes=5)

_SKIPPED_NAMES = {"__pycache__", ".git", ".pytest_cache", ".hypothesis"}
_SKIPPED_SUFFIXES = {".pyc", ".pyo"}
_CHUNK = 1 << 20


def measure_files(paths: Iterable[Path], base: Path) -> bytes:
    """SHA-384 over the files' names (relative to ``base``) and contents, in sorted order.

    Directories are walked recursively (``__pycache__``/``*.pyc`` skipped, as they change
    without the code changing). The hash input is ``PCR0_DOMAIN`` followed, per file in
    sorted order of its relative POSIX name, by ``len(name)`` (8 bytes big-endian), the
    UTF-8 name, ``len(content)`` (8 bytes big-endian) and the content; the lengths make
    the encoding unambiguous.

    Raises:
        DevAuthorityError: a path does not exist, is outside ``base``, or cannot be read.
    """
    base = Path(base).resolve()
    files: dict[str, Path] = {}
    for path in paths:
        for file in _expand(Path(path)):
            resolved = file.resolve()
            try:
                name = resolved.relative_to(base).as_posix()
            except ValueError as exc:
                raise DevAuthorityError(f"measured file: expected a path under {base}, got {resolved}") from exc
            files[name] = resolved
    if not files:
        raise DevAuthorityError("measured files: expected at least one file, got none")
    digest = hashlib.sha384(PCR0_DOMAIN)
    for name in sorted(files):
        encoded = name.encode("utf-8")
        try:
            with open(files[name], "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                digest.update(len(encoded).to_bytes(8, "big") + encoded + size.to_bytes(8, "big"))
                read = 0
                while chunk := handle.read(_CHUNK):
                    digest.update(chunk)
                    read += len(chunk)
        except OSError as exc:
            raise DevAuthorityError(f"measured file {files[name]}: expected a readable file, got {exc}") from exc
        if read != size:
            raise DevAuthorityError(f"measured file {name}: expected {size} bytes, got {read} (changed while reading)")
    return digest.digest()


def _expand(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        found = []
        for root, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_NAMES)
            found.extend(Path(root) / n for n in names if Path(n).suffix not in _SKIPPED_SUFFIXES)
        return found
    raise DevAuthorityError(f"measured file: expected an existing file or directory, got {path}")


def default_measurement_base(paths: Sequence[Path]) -> Path:
    """The common parent of the measured paths' parents (names then read e.g. "models/x")."""
    if not paths:
        raise DevAuthorityError("measured files: expected at least one path, got none")
    return Path(os.path.commonpath([str(Path(p).resolve().parent) for p in paths]))


def dev_pcrs(pcr0: bytes, pcr_variant: str | None = None) -> dict[int, bytes]:
    """The development PCR map for a given PCR0 (see the module docstring); with
    ``pcr_variant`` (development only) PCR0 and PCR2 are those of "another build"."""
    pcrs = {i: bytes(PCR_LENGTH) for i in range(NUM_PCRS)}
    pcrs[0] = pcr0
    pcrs[1] = hashlib.sha384(DEV_PCR1_LABEL).digest()
    pcrs[2] = hashlib.sha384(DEV_PCR2_LABEL).digest()
    if pcr_variant is not None:
        tag = PCR_VARIANT_DOMAIN + pcr_variant.encode("utf-8") + b"\x00"
        pcrs[0] = hashlib.sha384(tag + pcrs[0]).digest()
        pcrs[2] = hashlib.sha384(tag + pcrs[2]).digest()
    return pcrs


class DevAttestationAuthority:
    """Issues Nitro-format attestation documents signed by a local development PKI.

    Build with :meth:`create` (new PKI), :meth:`load` (existing state directory) or
    :meth:`load_or_create`.
    """

    def __init__(
        self,
        *,
        state_dir: Path,
        module_id: str,
        root_cert: x509.Certificate,
        root_key: ec.EllipticCurvePrivateKey,
        intermediate_cert: x509.Certificate,
        intermediate_key: ec.EllipticCurvePrivateKey,
        pcrs: dict[int, bytes],
    ) -> None:
        self._state_dir = state_dir
        self._module_id = module_id
        self._root_cert = root_cert
        self._root_key = root_key
        self._intermediate_cert = intermediate_cert
        self._intermediate_key = intermediate_key
        self._pcrs = pcrs
        self._leaf: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None

    # -- construction -------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        state_dir: Path,
        measured_files: Sequence[Path],
        *,
        base: Path | None = None,
        now: datetime | None = None,
        pcr_variant: str | None = None,
    ) -> DevAttestationAuthority:
        """Generate a new development PKI in ``state_dir`` and measure ``measured_files``.

        ``base`` is what the measured names are relative to (default: the common parent of
        the paths' parents, see :func:`default_measurement_base`). ``pcr_variant``
        (DEVELOPMENT ONLY, refusal tests) makes this authority report the PCRs of "another
        build" (see the module docstring); it is kept in the state file.

        Raises:
            DevAuthorityError: ``state_dir`` already holds an authority, or files are unreadable.
        """
        state_dir = Path(state_dir)
        now = _utc(now)
        pcrs = dev_pcrs(measure_files(measured_files, base or default_measurement_base(measured_files)),
                        pcr_variant)
        if (state_dir / ROOT_CERT_FILE).exists():
            raise DevAuthorityError(f"expected no authority in {state_dir}, got an existing {ROOT_CERT_FILE}; use load()")
        module_id = f"i-dev{secrets.token_hex(6)}-enc{secrets.token_hex(8)}"
        root_key = ec.generate_private_key(ec.SECP384R1())
        root_name = _name("nitrolesion development root (NOT AWS)")
        root_cert = _build_ca(root_name, root_key, root_name, root_key, now, ROOT_LIFETIME, path_length=1)
        intermediate_key = ec.generate_private_key(ec.SECP384R1())
        intermediate_cert = _build_ca(
            _name("nitrolesion development intermediate"), intermediate_key, root_name, root_key, now,
            INTERMEDIATE_LIFETIME, path_length=0,
        )
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(state_dir, 0o700)
            _write(state_dir / ROOT_CERT_FILE, _cert_pem(root_cert), 0o644)
            _write(state_dir / ROOT_KEY_FILE, _key_pem(root_key), 0o600)
            _write(state_dir / INTERMEDIATE_CERT_FILE, _cert_pem(intermediate_cert), 0o644)
            _write(state_dir / INTERMEDIATE_KEY_FILE, _key_pem(intermediate_key), 0o600)
            state = {"module_id": module_id}
            if pcr_variant is not None:
                state["pcr_variant"] = pcr_variant
            _write(state_dir / STATE_FILE, json.dumps(state).encode(), 0o600)
        except OSError as exc:
            raise DevAuthorityError(f"state dir {state_dir}: expected to be writable, got {exc}") from exc
        return cls(
            state_dir=state_dir, module_id=module_id, root_cert=root_cert, root_key=root_key,
            intermediate_cert=intermediate_cert, intermediate_key=intermediate_key, pcrs=pcrs,
        )

    @classmethod
    def load(
        cls, state_dir: Path, measured_files: Sequence[Path], *, base: Path | None = None
    ) -> DevAttestationAuthority:
        """Load the PKI from ``state_dir`` and measure ``measured_files`` afresh.

        Raises:
            DevAuthorityError: files missing or corrupt, keys not matching certificates.
        """
        state_dir = Path(state_dir)
        try:
            root_cert = x509.load_pem_x509_certificate((state_dir / ROOT_CERT_FILE).read_bytes())
            intermediate_cert = x509.load_pem_x509_certificate((state_dir / INTERMEDIATE_CERT_FILE).read_bytes())
            root_key = serialization.load_pem_private_key((state_dir / ROOT_KEY_FILE).read_bytes(), password=None)
            intermediate_key = serialization.load_pem_private_key(
                (state_dir / INTERMEDIATE_KEY_FILE).read_bytes(), password=None
            )
            state = json.loads((state_dir / STATE_FILE).read_text(encoding="utf-8"))
            module_id = state["module_id"]
            pcr_variant = state.get("pcr_variant")
        except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
            raise DevAuthorityError(f"state dir {state_dir}: expected a development authority, got {exc}") from exc
        for label, cert, key in (("root", root_cert, root_key), ("intermediate", intermediate_cert, intermediate_key)):
            if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
                raise DevAuthorityError(f"{label}: expected the key to match its certificate, got a different key")
        if not isinstance(module_id, str):
            raise DevAuthorityError(f"{STATE_FILE}: expected module_id string, got {type(module_id).__name__}")
        if pcr_variant is not None and not isinstance(pcr_variant, str):
            raise DevAuthorityError(f"{STATE_FILE}: expected pcr_variant string, got {type(pcr_variant).__name__}")
        pcrs = dev_pcrs(measure_files(measured_files, base or default_measurement_base(measured_files)),
                        pcr_variant)
        return cls(
            state_dir=state_dir, module_id=module_id, root_cert=root_cert, root_key=root_key,  # type: ignore[arg-type]
            intermediate_cert=intermediate_cert, intermediate_key=intermediate_key, pcrs=pcrs,  # type: ignore[arg-type]
        )

    @classmethod
    def load_or_create(
        cls, state_dir: Path, measured_files: Sequence[Path], *, base: Path | None = None
    ) -> DevAttestationAuthority:
        """:meth:`load` if ``state_dir`` holds an authority, else :meth:`create`."""
        if (Path(state_dir) / ROOT_CERT_FILE).exists():
            return cls.load(state_dir, measured_files, base=base)
        return cls.create(state_dir, measured_files, base=base)

    # -- what a verifier needs ----------------------------------------------------------

    @property
    def pcrs(self) -> dict[int, bytes]:
        """PCR0..15 as they appear in this authority's documents."""
        return dict(self._pcrs)

    @property
    def module_id(self) -> str:
        return self._module_id

    @property
    def root_certificate(self) -> x509.Certificate:
        """The development root: trust it only by passing it to the verifier explicitly."""
        return self._root_cert

    @property
    def root_pem_path(self) -> Path:
        return self._state_dir / ROOT_CERT_FILE

    @property
    def intermediate_certificate(self) -> x509.Certificate:
        return self._intermediate_cert

    # -- issuing ------------------------------------------------------------------------

    def attest(
        self,
        public_key: bytes | None = None,
        nonce: bytes | None = None,
        user_data: bytes | None = None,
        now: datetime | None = None,
    ) -> bytes:
        """Issue an attestation document, exactly in the NSM's format, timestamped ``now``.

        Raises:
            NsmError: (``InputTooLarge``) a field is over 1024 bytes, as the NSM would say.
            DevAuthorityError: the intermediate is not valid at ``now`` (recreate the state).
        """
        now = _utc(now)
        for name, value in (("public_key", public_key), ("nonce", nonce), ("user_data", user_data)):
            if value is not None and len(value) > MAX_ATTESTATION_FIELD:
                raise NsmError("InputTooLarge", f"{name}: expected at most {MAX_ATTESTATION_FIELD} bytes, got {len(value)}")
        if not self._intermediate_cert.not_valid_before_utc <= now <= self._intermediate_cert.not_valid_after_utc:
            raise DevAuthorityError(
                f"intermediate: expected valid at {now.isoformat()}, got "
                f"{self._intermediate_cert.not_valid_before_utc.isoformat()}..{self._intermediate_cert.not_valid_after_utc.isoformat()}; "
                f"delete {self._state_dir} to start a new development authority"
            )
        leaf_cert, leaf_key = self._leaf_for(now)
        timestamp_ms = (now - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(milliseconds=1)
        payload = cbor2.dumps(
            {
                "module_id": self._module_id,
                "digest": "SHA384",
                "timestamp": timestamp_ms,
                "pcrs": dict(self._pcrs),
                "certificate": leaf_cert.public_bytes(serialization.Encoding.DER),
                "cabundle": [
                    self._root_cert.public_bytes(serialization.Encoding.DER),
                    self._intermediate_cert.public_bytes(serialization.Encoding.DER),
                ],
                "public_key": None if public_key is None else bytes(public_key),
                "user_data": None if user_data is None else bytes(user_data),
                "nonce": None if nonce is None else bytes(nonce),
            }
        )
        protected = encode_es384_protected_header()
        unsigned = CoseSign1(protected=protected, unprotected={}, payload=payload)
        der_signature = leaf_key.sign(unsigned.sig_structure(), ec.ECDSA(hashes.SHA384()))
        r, s = decode_dss_signature(der_signature)
        signature = r.to_bytes(48, "big") + s.to_bytes(48, "big")  # raw r||s, RFC 8152 s8.1
        return encode_cose_sign1(CoseSign1(protected=protected, unprotected={}, payload=payload, signature=signature))

    def _leaf_for(self, now: datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        # Like the NSM, keep one leaf while it is valid; issue a new one when it runs out.
        if self._leaf is not None:
            cert = self._leaf[0]
            if cert.not_valid_before_utc <= now and now + LEAF_RENEW_MARGIN <= cert.not_valid_after_utc:
                return self._leaf
        key = ec.generate_private_key(ec.SECP384R1())
        not_after = min(now + LEAF_LIFETIME, self._intermediate_cert.not_valid_after_utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(f"{self._module_id}.dev.nitrolesion"))
            .issuer_name(self._intermediate_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(seconds=3))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .sign(self._intermediate_key, hashes.SHA384())
        )
        self._leaf = (cert, key)
        return self._leaf


# -- helpers -----------------------------------------------------------------------------


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(timezone.utc)
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")
    return now.astimezone(timezone.utc)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "nitrolesion development"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64]),
        ]
    )


def _key_usage(*, digital_signature: bool = False, cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign,
        encipher_only=False, decipher_only=False,
    )


def _build_ca(
    subject: x509.Name,
    subject_key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    now: datetime,
    lifetime: timedelta,
    *,
    path_length: int,
) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(subject_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(subject_key.public_key()), critical=False)
        .sign(issuer_key, hashes.SHA384())
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    # Create with the final mode so a private key is never readable by others, even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    os.fchmod(fd, mode)  # O_CREAT's mode is masked by umask and ignored for existing files
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def file_mode(path: Path) -> int:
    """Permission bits of ``path`` (used by tests and the demo to check 0600 keys)."""
    return stat.S_IMODE(os.stat(path).st_mode)
