"""verify_attestation against real Nitro documents and one-edit mutations of them."""

from __future__ import annotations

import hashlib
import inspect
import re
from datetime import datetime, timedelta, timezone

import cbor2
import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from attestation_cases import (
    CA_KEY_USAGE,
    DELETE,
    LEAF_KEY_USAGE,
    SKIP_REASON,
    UNKNOWN_EXTENSION,
    document,
    flip_payload_byte,
    flip_signature_byte,
    forge_leaf_and_resign,
    join,
    key_usage,
    lookalike_root,
    nitro_ca_extensions,
    nitro_leaf_extensions,
    pcr_value_offset,
    real_documents,
    split,
    substitute_root,
    swap_intermediates,
    synthetic_document,
    with_payload,
    with_protected,
    with_x509_version,
)
from cryptography import x509

from nitrolesion.attestation.dev_authority import DevAttestationAuthority
from nitrolesion.attestation.errors import (
    AttestationError,
    CertificateChainError,
    CertificateExpired,
    CertificateNotYetValid,
    CoseDecodeError,
    DebugModeRejected,
    DocumentTooOld,
    MalformedDocument,
    NonceMismatch,
    PcrMismatch,
    PinnedRootError,
    PublicKeyMismatch,
    SignatureInvalid,
    UnsupportedAlgorithm,
    UntrustedRoot,
)
from nitrolesion.attestation.policy import AttestationPolicy
from nitrolesion.attestation.trust import AWS_NITRO_ROOT_G1_SHA256, aws_nitro_root, load_pinned_root
from nitrolesion.attestation.verifier import check_public_key, verify_attestation
from nitrolesion.errors import NitroLesionError

DOCS = real_documents()
needs_docs = pytest.mark.skipif(not DOCS, reason=SKIP_REASON)
ANY = AttestationPolicy.any_enclave()
DEBUG_OK = AttestationPolicy.any_enclave(allow_debug=True)
PROD = "anjuna_prod_rsa_pubkey_2021.bin"  # production, with public key, no nonce
DEBUG_NONCE = "anjuna_debug_rsa_pubkey_nonce_2024.bin"  # debug, nonce b"Nonce\n"


def doc_ids(docs):  # pytest ids: the file names
    return [d.name for d in docs]


# -- the pinned root --------------------------------------------------------------------


def test_pinned_root_matches_its_sha256():
    root = aws_nitro_root()
    assert hashlib.sha256(root.public_bytes(Encoding.DER)).hexdigest() == AWS_NITRO_ROOT_G1_SHA256
    assert root.subject.rfc4514_string() == "CN=aws.nitro-enclaves,OU=AWS,O=Amazon,C=US"


def test_pinned_root_loader_refuses_another_certificate():
    pem = lookalike_root().public_bytes(Encoding.PEM)
    with pytest.raises(PinnedRootError, match="expected SHA-256 641a0321"):
        load_pinned_root(pem)
    with pytest.raises(PinnedRootError):
        load_pinned_root(b"not a pem")


# -- real documents verify at their own time, and only within the leaf's life ------------


@needs_docs
@pytest.mark.parametrize("doc", DOCS, ids=doc_ids(DOCS))
def test_real_document_verifies_at_its_own_timestamp(doc):
    result = verify_attestation(doc.data, now=doc.time, policy=DEBUG_OK)
    exp = doc.expected
    assert result.timestamp == doc.time and result.timestamp_ms == exp.timestamp_ms
    assert result.timestamp.tzinfo is not None
    assert result.digest == "SHA384"
    assert result.debug is exp.debug
    assert result.pcrs[0].hex().startswith(exp.pcr0_prefix)
    assert sorted(result.pcrs) == list(range(16))
    assert (None if result.public_key is None else len(result.public_key)) == exp.public_key_length
    assert result.nonce == exp.nonce
    assert (None if result.user_data is None else len(result.user_data)) == exp.user_data_length
    assert result.module_id.startswith("i-") and "-enc" in result.module_id
    assert result.root_is_aws
    assert result.certificate.not_valid_after_utc == exp.leaf_valid_until
    assert len(result.cabundle) == 4


@needs_docs
@pytest.mark.parametrize("doc", DOCS, ids=doc_ids(DOCS))
def test_real_document_rejected_one_second_after_leaf_expiry(doc):
    until = doc.expected.leaf_valid_until
    verify_attestation(doc.data, now=until, policy=DEBUG_OK)  # inclusive bound (RFC 5280)
    with pytest.raises(CertificateExpired, match=r"expected valid at .*got notAfter"):
        verify_attestation(doc.data, now=until + timedelta(seconds=1), policy=DEBUG_OK)


@needs_docs
def test_rejected_before_leaf_is_valid():
    doc = document(PROD)
    leaf_from = verify_attestation(doc.data, now=doc.time, policy=ANY).certificate.not_valid_before_utc
    with pytest.raises(CertificateNotYetValid, match="got notBefore"):
        verify_attestation(doc.data, now=leaf_from - timedelta(seconds=1), policy=ANY)


@needs_docs
def test_now_in_another_timezone_is_the_same_instant():
    doc = document(PROD)
    plus_two = timezone(timedelta(hours=2))
    verify_attestation(doc.data, now=doc.time.astimezone(plus_two), policy=ANY)


@needs_docs
def test_naive_now_and_empty_roots_are_api_misuse():
    doc = document(PROD)
    with pytest.raises(ValueError, match="timezone-aware"):
        verify_attestation(doc.data, now=doc.time.replace(tzinfo=None), policy=ANY)
    with pytest.raises(ValueError, match="trusted_roots"):
        verify_attestation(doc.data, now=doc.time, policy=ANY, trusted_roots=[])


# -- step 1: COSE_Sign1 decoding ---------------------------------------------------------


@needs_docs
def test_tagged_cose_sign1_is_accepted():
    doc = document(PROD)
    verify_attestation(join(split(doc.data), tagged=True), now=doc.time, policy=ANY)


@needs_docs
@pytest.mark.parametrize(
    "mangle",
    [
        lambda d: d + b"\x00",  # trailing junk
        lambda d: d[:-1],  # truncated
        lambda d: b"",
        lambda d: cbor2.dumps(cbor2.CBORTag(98, split(d))),  # COSE_Sign, not COSE_Sign1
        lambda d: cbor2.dumps(split(d)[:3]),  # 3 elements
        lambda d: cbor2.dumps({"not": "an array"}),
        lambda d: join([cbor2.loads(split(d)[0]), *split(d)[1:]]),  # protected not a bstr
        lambda d: d * 5,  # over the size limit
    ],
    ids=["trailing", "truncated", "empty", "tag98", "3-elements", "map", "protected-map", "too-large"],
)
def test_not_a_cose_sign1(mangle):
    doc = document(PROD)
    with pytest.raises(CoseDecodeError):
        verify_attestation(mangle(doc.data), now=doc.time, policy=ANY)


# -- step 2: algorithm -------------------------------------------------------------------


@needs_docs
@pytest.mark.parametrize(
    ("protected", "unprotected"),
    [
        (cbor2.dumps({1: -7}), None),  # ES256
        (cbor2.dumps({}), None),  # no alg at all
        (b"", {1: -35}),  # alg only in the unprotected header: not signed, not trusted
        (cbor2.dumps({1: "ES384"}), None),
        (cbor2.dumps({1: -35.0}), None),
    ],
    ids=["ES256", "no-alg", "unprotected-alg", "text-alg", "float-alg"],
)
def test_algorithm_must_be_es384_in_protected_header(protected, unprotected):
    doc = document(PROD)
    with pytest.raises(UnsupportedAlgorithm, match="expected -35"):
        verify_attestation(with_protected(doc.data, protected, unprotected), now=doc.time, policy=ANY)


@needs_docs
def test_critical_header_parameters_are_refused():
    doc = document(PROD)
    with pytest.raises(UnsupportedAlgorithm, match="crit: expected none"):
        verify_attestation(with_protected(doc.data, cbor2.dumps({1: -35, 2: [99]})), now=doc.time, policy=ANY)


# -- step 3: payload fields --------------------------------------------------------------


@needs_docs
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"module_id": DELETE}, "module_id: expected a str field, got none"),
        ({"module_id": ""}, "module_id: expected 1..256"),
        ({"digest": "SHA256"}, "digest: expected 'SHA384', got 'SHA256'"),
        ({"timestamp": True}, "timestamp: expected int, got bool"),
        ({"timestamp": -5}, "timestamp: expected milliseconds"),
        ({"timestamp": 2**64}, "timestamp: expected milliseconds"),
        ({"pcrs": {0: b"\x00" * 32}}, r"pcrs\[0\]: expected 48 bytes \(SHA-384\), got 32 bytes"),
        ({"pcrs": {"0": b"\x00" * 48}}, "pcrs: expected index 0..31"),
        ({"pcrs": {}}, "pcrs: expected 1..32 entries, got 0"),
        ({"pcrs": {3: b"\x00" * 48}}, "expected PCR0, PCR1 and PCR2"),
        ({"certificate": "text"}, "certificate: expected bytes, got str"),
        ({"cabundle": []}, "cabundle: expected 1..16 certificates, got 0"),
        ({"cabundle": [b"x" * 1025]}, r"cabundle\[0\]: expected 1..1024 bytes, got 1025 bytes"),
        ({"public_key": b""}, "public_key: expected 1..1024 bytes, got 0"),
        ({"nonce": b"n" * 1025}, "nonce: expected 0..1024 bytes, got 1025"),
        ({"user_data": 7}, "user_data: expected bytes or null, got int"),
    ],
)
def test_malformed_payload_field(changes, message):
    doc = document(PROD)
    with pytest.raises(MalformedDocument, match=message):
        verify_attestation(with_payload(doc.data, **changes), now=doc.time, policy=ANY)


@needs_docs
def test_payload_that_is_not_a_map():
    doc = document(PROD)
    parts = split(doc.data)
    for payload in (cbor2.dumps([1, 2]), b"\xff", parts[2] + b"\x00"):
        parts[2] = payload
        with pytest.raises(MalformedDocument):
            verify_attestation(join(parts), now=doc.time, policy=ANY)


# -- step 4: certificate chain -----------------------------------------------------------


@needs_docs
@pytest.mark.parametrize("doc", DOCS, ids=doc_ids(DOCS))
def test_substituted_self_signed_root_is_untrusted(doc):
    with pytest.raises(UntrustedRoot, match=f"expected a trusted root \\(sha256:{AWS_NITRO_ROOT_G1_SHA256}\\)"):
        verify_attestation(substitute_root(doc.data), now=doc.time, policy=DEBUG_OK)


@needs_docs
def test_lookalike_root_is_untrusted_even_if_given_as_the_trusted_root_by_name():
    # Trusting the look-alike does not make the real intermediates chain to it.
    doc = document(PROD)
    with pytest.raises(CertificateChainError, match="expected a valid signature by cabundle\\[0\\]"):
        verify_attestation(
            substitute_root(doc.data), now=doc.time, policy=ANY, trusted_roots=[lookalike_root()]
        )


@needs_docs
def test_real_document_untrusted_when_only_another_root_is_trusted():
    doc = document(PROD)
    with pytest.raises(UntrustedRoot):
        verify_attestation(doc.data, now=doc.time, policy=ANY, trusted_roots=[lookalike_root()])


@needs_docs
def test_intermediates_out_of_order():
    doc = document(PROD)
    with pytest.raises(CertificateChainError, match="expected issuer"):
        verify_attestation(swap_intermediates(doc.data), now=doc.time, policy=ANY)


@needs_docs
def test_leaf_replaced_by_another_documents_leaf():
    # A genuine AWS leaf from another enclave: the chain breaks at the leaf's issuer.
    doc, other = document(PROD), document("blocky_prod_maxfields_2024.bin")
    forged = with_payload(doc.data, certificate=other.payload["certificate"])
    with pytest.raises(CertificateChainError):
        verify_attestation(forged, now=doc.time, policy=ANY)


@needs_docs
@pytest.mark.parametrize("doc", DOCS, ids=doc_ids(DOCS))
def test_forged_leaf_with_valid_cose_signature(doc):
    # Names, validity and the COSE signature all check out; the leaf's own signature does not.
    with pytest.raises(CertificateChainError, match=r"certificate: expected a valid signature by cabundle\[3\]"):
        verify_attestation(forge_leaf_and_resign(doc.data), now=doc.time, policy=DEBUG_OK)


@needs_docs
def test_garbage_certificate_bytes():
    doc = document(PROD)
    with pytest.raises(CertificateChainError, match="certificate: expected a DER X.509 certificate"):
        verify_attestation(with_payload(doc.data, certificate=b"\x30\x03\x02\x01\x01"), now=doc.time, policy=ANY)


@needs_docs
@pytest.mark.parametrize("slot", ["certificate", "cabundle[1]"])
def test_certificate_with_invalid_x509_version(slot):
    # Found by test_attestation_fuzz (hypothesis seed 7): one byte, and cryptography raised
    # InvalidVersion straight through the verifier.
    doc = document(PROD)
    payload = doc.payload
    if slot == "certificate":
        forged = with_payload(doc.data, certificate=with_x509_version(payload["certificate"], 1))
    else:
        cabundle = list(payload["cabundle"])
        cabundle[1] = with_x509_version(cabundle[1], 1)
        forged = with_payload(doc.data, cabundle=cabundle)
    with pytest.raises(CertificateChainError, match=rf"{re.escape(slot)}: expected a DER X.509 certificate"):
        verify_attestation(forged, now=doc.time, policy=ANY)


# -- step 4: RFC 5280 path validation, on chains built here ---------------------------

SYNTHETIC_TIME = datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc)
PATH_INVALID = "expected a certification path valid under RFC 5280"


def _verify_synthetic(**extensions):
    doc = synthetic_document(SYNTHETIC_TIME, **extensions)
    return verify_attestation(doc.data, now=doc.time, policy=ANY, trusted_roots=[doc.root])


def test_synthetic_nitro_shaped_chain_verifies():
    # The control for the defects below: with the extensions AWS uses, the chain is valid.
    result = _verify_synthetic()
    assert not result.root_is_aws and len(result.cabundle) == 2


def test_intermediate_with_unknown_critical_extension_is_refused():
    # RFC 5280 s4.2: a certificate with a critical extension the verifier does not know
    # must be rejected; the hand-written checks ignored it.
    with pytest.raises(CertificateChainError, match=PATH_INVALID) as caught:
        _verify_synthetic(intermediate_extensions=nitro_ca_extensions(0) + [(UNKNOWN_EXTENSION, True)])
    assert "2.999.1.1" in str(caught.value) and "critical" in str(caught.value)


def test_leaf_with_unknown_critical_extension_is_refused():
    with pytest.raises(CertificateChainError, match=PATH_INVALID) as caught:
        _verify_synthetic(leaf_extensions=nitro_leaf_extensions() + [(UNKNOWN_EXTENSION, True)])
    assert "2.999.1.1" in str(caught.value)


def test_unknown_non_critical_extension_is_ignored():
    # RFC 5280 s4.2: a non-critical extension may be ignored (AWS CAs carry CRL points).
    _verify_synthetic(intermediate_extensions=nitro_ca_extensions(0) + [(UNKNOWN_EXTENSION, False)])


NO_CERT_SIGN = key_usage("digital_signature", "crl_sign")
NO_DIGITAL_SIGNATURE = key_usage("content_commitment")


@pytest.mark.parametrize(
    "extensions",
    [
        [(x509.BasicConstraints(ca=True, path_length=0), True)],  # no keyUsage at all
        nitro_ca_extensions(0, key_usage=NO_CERT_SIGN),
    ],
    ids=["no-keyUsage", "keyUsage-without-keyCertSign"],
)
def test_ca_without_key_cert_sign_is_refused(extensions):
    # RFC 5280 s4.2.1.3/s6.1.4(n): a CA signs certificates only if keyUsage asserts
    # keyCertSign; the hand-written checks accepted a CA with no keyUsage at all.
    with pytest.raises(CertificateChainError, match=PATH_INVALID) as caught:
        _verify_synthetic(intermediate_extensions=extensions)
    assert re.search(r"keyCertSign|2\.5\.29\.15", str(caught.value))


def test_ca_without_basic_constraints_is_refused():
    with pytest.raises(CertificateChainError, match=PATH_INVALID):
        _verify_synthetic(intermediate_extensions=[(CA_KEY_USAGE, True)])


def test_path_length_constraint_is_enforced():
    # The root allows no CA below it, yet signs the intermediate CA.
    with pytest.raises(CertificateChainError, match=PATH_INVALID):
        _verify_synthetic(root_extensions=nitro_ca_extensions(0), intermediate_extensions=nitro_ca_extensions(0))


@pytest.mark.parametrize(
    ("extensions", "message"),
    [
        (nitro_leaf_extensions(key_usage=NO_DIGITAL_SIGNATURE), "digitalSignature"),
        ([(x509.BasicConstraints(ca=False, path_length=None), True)], "2.5.29.15"),  # no keyUsage
        ([(LEAF_KEY_USAGE, False)], "2.5.29.19"),  # no basicConstraints
        ([(x509.BasicConstraints(ca=True, path_length=None), True), (LEAF_KEY_USAGE, False)], "cA"),
    ],
    ids=["no-digitalSignature", "no-keyUsage", "no-basicConstraints", "leaf-is-a-CA"],
)
def test_leaf_profile_requires_end_entity_with_digital_signature(extensions, message):
    # The leaf profile fitted to Nitro leaves: basicConstraints cA false and keyUsage
    # digitalSignature, both required.
    with pytest.raises(CertificateChainError, match=PATH_INVALID) as caught:
        _verify_synthetic(leaf_extensions=extensions)
    assert message in str(caught.value)


def test_policy_without_pcr_sets_accepts_no_enclave():
    # Fail closed: only AttestationPolicy.any_enclave() skips the PCR check.
    doc = synthetic_document(SYNTHETIC_TIME)
    for policy in (AttestationPolicy(), AttestationPolicy(max_age=timedelta(minutes=10))):
        with pytest.raises(PcrMismatch, match="allows no PCRs"):
            verify_attestation(doc.data, now=doc.time, policy=policy, trusted_roots=[doc.root])
    assert verify_attestation(doc.data, now=doc.time, policy=ANY, trusted_roots=[doc.root]).matched_pcr_set == -1


# -- step 4: development authority documents --------------------------------------------

DEV_TIME = datetime(2025, 6, 1, tzinfo=timezone.utc)


@pytest.fixture
def dev_document(tmp_path):
    model = tmp_path / "model.bin"
    model.write_bytes(b"model")
    authority = DevAttestationAuthority.create(tmp_path / "state", [model], now=DEV_TIME)
    return authority, authority.attest(public_key=b"key", nonce=b"n", now=DEV_TIME)


def test_development_document_passes_path_validation_with_its_root(dev_document):
    authority, data = dev_document
    result = verify_attestation(
        data, now=DEV_TIME + timedelta(seconds=1), policy=AttestationPolicy.for_dev_pcrs(authority.pcrs),
        trusted_roots=[aws_nitro_root(), authority.root_certificate],
    )
    assert not result.root_is_aws and result.matched_pcr_set == 0


def test_untrusted_development_root_names_the_dev_root_option(dev_document):
    authority, data = dev_document
    with pytest.raises(UntrustedRoot, match=re.escape("--dev-root DIR/dev_root.pem")) as caught:
        verify_attestation(data, now=DEV_TIME + timedelta(seconds=1), policy=AttestationPolicy.for_dev_pcrs(authority.pcrs))
    assert str(caught.value).startswith(f"cabundle[0]: expected a trusted root (sha256:{AWS_NITRO_ROOT_G1_SHA256})")


@needs_docs
def test_untrusted_other_root_does_not_suggest_the_dev_root_option():
    doc = document(PROD)
    with pytest.raises(UntrustedRoot) as caught:
        verify_attestation(substitute_root(doc.data), now=doc.time, policy=ANY)
    assert "--dev-root" not in str(caught.value)


# -- step 5: signature -------------------------------------------------------------------


@needs_docs
@pytest.mark.parametrize("doc", DOCS, ids=doc_ids(DOCS))
@pytest.mark.parametrize("index", [0, 47, 48, 95])
def test_flipped_signature_byte(doc, index):
    with pytest.raises(SignatureInvalid, match="expected a signature by the leaf key"):
        verify_attestation(flip_signature_byte(doc.data, index), now=doc.time, policy=DEBUG_OK)


@needs_docs
def test_signature_of_wrong_length():
    doc = document(PROD)
    parts = split(doc.data)
    parts[3] = parts[3][:64]
    with pytest.raises(SignatureInvalid, match="expected a 96-byte r||s signature, got 64 bytes"):
        verify_attestation(join(parts), now=doc.time, policy=ANY)


@needs_docs
@pytest.mark.parametrize("doc", [d for d in DOCS if not d.expected.debug], ids=doc_ids([d for d in DOCS if not d.expected.debug]))
def test_flipped_payload_byte_in_a_pcr_breaks_the_signature(doc):
    # The payload still parses and the chain is intact: only the signature can catch it.
    tampered = flip_payload_byte(doc.data, pcr_value_offset(doc.data, 1) + 7)
    with pytest.raises(SignatureInvalid):
        verify_attestation(tampered, now=doc.time, policy=ANY)


@needs_docs
def test_flipped_payload_byte_anywhere_is_rejected():
    doc = document(PROD)
    payload_length = len(split(doc.data)[2])
    for offset in range(0, payload_length, 37):
        with pytest.raises(AttestationError):
            verify_attestation(flip_payload_byte(doc.data, offset), now=doc.time, policy=ANY)


@needs_docs
def test_resigned_unprotected_header_change_is_harmless():
    # The unprotected header is not signed; data there must not change the outcome.
    doc = document(PROD)
    parts = split(doc.data)
    parts[1] = {4: b"kid"}
    verify_attestation(join(parts), now=doc.time, policy=ANY)


# -- step 6: policy ----------------------------------------------------------------------


@needs_docs
@pytest.mark.parametrize("doc", [d for d in DOCS if d.expected.debug], ids=doc_ids([d for d in DOCS if d.expected.debug]))
def test_debug_document_rejected_by_default_and_accepted_when_allowed(doc):
    with pytest.raises(DebugModeRejected, match="got all-zero PCR0, PCR1, PCR2"):
        verify_attestation(doc.data, now=doc.time, policy=ANY)
    assert verify_attestation(doc.data, now=doc.time, policy=DEBUG_OK).debug is True


@needs_docs
@pytest.mark.parametrize("doc", [d for d in DOCS if not d.expected.debug], ids=doc_ids([d for d in DOCS if not d.expected.debug]))
def test_production_documents_are_not_debug(doc):
    assert verify_attestation(doc.data, now=doc.time, policy=ANY).debug is False


def _pcr_set(doc, *indices):
    pcrs = doc.payload["pcrs"]
    return {i: pcrs[i] for i in indices}


@needs_docs
def test_pcrs_matching_an_allowed_set():
    doc, other = document(PROD), document("anjuna_prod_2021.bin")
    policy = AttestationPolicy(allowed_pcr_sets=(_pcr_set(other, 0, 1, 2), _pcr_set(doc, 0, 1, 2, 8)))
    assert verify_attestation(doc.data, now=doc.time, policy=policy).matched_pcr_set == 1


@needs_docs
def test_pcr0_mismatch():
    doc, other = document(PROD), document("anjuna_prod_2021.bin")
    wrong = _pcr_set(doc, 0, 1, 2) | {0: other.payload["pcrs"][0]}
    policy = AttestationPolicy(allowed_pcr_sets=(wrong,))
    with pytest.raises(PcrMismatch, match=f"expected PCR0 {other.payload['pcrs'][0].hex()}, got {doc.payload['pcrs'][0].hex()}"):
        verify_attestation(doc.data, now=doc.time, policy=policy)


@needs_docs
def test_pcr8_mismatch():
    doc = document(PROD)
    policy = AttestationPolicy(allowed_pcr_sets=(_pcr_set(doc, 0, 1, 2) | {8: b"\x01" * 48},))
    with pytest.raises(PcrMismatch, match="expected PCR8"):
        verify_attestation(doc.data, now=doc.time, policy=policy)


@needs_docs
def test_debug_document_still_subject_to_pcr_sets():
    doc, prod = document(DEBUG_NONCE), document(PROD)
    policy = AttestationPolicy(allowed_pcr_sets=(_pcr_set(prod, 0, 1, 2),), allow_debug=True)
    with pytest.raises(PcrMismatch):
        verify_attestation(doc.data, now=doc.time, policy=policy)


@needs_docs
def test_nonce_equal_to_the_one_sent():
    doc = document(DEBUG_NONCE)
    assert verify_attestation(doc.data, now=doc.time, policy=DEBUG_OK, expected_nonce=b"Nonce\n").nonce == b"Nonce\n"


@needs_docs
def test_nonce_mismatch():
    doc = document(DEBUG_NONCE)
    with pytest.raises(NonceMismatch, match="expected nonce 5 bytes 4f74686572, got 6 bytes 4e6f6e63650a"):
        verify_attestation(doc.data, now=doc.time, policy=DEBUG_OK, expected_nonce=b"Other")
    with pytest.raises(NonceMismatch):
        verify_attestation(doc.data, now=doc.time, policy=DEBUG_OK, expected_nonce=b"Nonce")


@needs_docs
def test_nonce_expected_but_document_has_none():
    doc = document(PROD)
    with pytest.raises(NonceMismatch, match="got no nonce"):
        verify_attestation(doc.data, now=doc.time, policy=ANY, expected_nonce=b"fresh")


@needs_docs
def test_document_age():
    doc = document(PROD)
    policy = AttestationPolicy.any_enclave(max_age=timedelta(minutes=10))
    verify_attestation(doc.data, now=doc.time + timedelta(minutes=10), policy=policy)
    with pytest.raises(DocumentTooOld, match="expected age at most 0:10:00, got 0:10:01"):
        verify_attestation(doc.data, now=doc.time + timedelta(minutes=10, seconds=1), policy=policy)
    # Without max_age the same document is fine at that time (the leaf is still valid).
    verify_attestation(doc.data, now=doc.time + timedelta(minutes=10, seconds=1), policy=ANY)


# -- step 7: the wrapping key ------------------------------------------------------------


@needs_docs
def test_check_public_key():
    doc = document(PROD)
    result = verify_attestation(doc.data, now=doc.time, policy=ANY)
    check_public_key(result, doc.payload["public_key"])
    with pytest.raises(PublicKeyMismatch, match=f"expected public key sha256:{result.public_key_sha256}"):
        check_public_key(result, doc.payload["public_key"][:-1] + b"\x00")
    no_key = verify_attestation(document("anjuna_prod_2021.bin").data, now=document("anjuna_prod_2021.bin").time, policy=ANY)
    with pytest.raises(PublicKeyMismatch, match="without public_key"):
        check_public_key(no_key, doc.payload["public_key"])


def test_error_hierarchy():
    for error in (CoseDecodeError, UntrustedRoot, CertificateExpired, PcrMismatch, PublicKeyMismatch):
        assert issubclass(error, AttestationError) and issubclass(error, NitroLesionError)
    assert issubclass(UntrustedRoot, CertificateChainError)
    assert SignatureInvalid("x").check == "SignatureInvalid"


def test_now_is_a_required_keyword():
    # The verifier never reads the clock: `now` is keyword-only and has no default.
    param = inspect.signature(verify_attestation).parameters["now"]
    assert param.kind is inspect.Parameter.KEYWORD_ONLY and param.default is inspect.Parameter.empty
