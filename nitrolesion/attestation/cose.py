"""COSE_Sign1 (RFC 8152 section 4.2) encoding and decoding, as used by the Nitro NSM.

Pure functions over bytes; no keys and no I/O here. The NSM emits the *untagged* form
``[protected: bstr, unprotected: map, payload: bstr, signature: bstr]``; RFC 8152 also
allows it wrapped in CBOR tag 18, and both are accepted.

Raises only :class:`~nitrolesion.attestation.errors.CoseDecodeError` on bad input.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import cbor2

from nitrolesion.attestation.errors import CoseDecodeError

# RFC 8152 section 4.2: CBOR tag for COSE_Sign1.
COSE_SIGN1_TAG = 18
# RFC 8152 section 3.1: header label "alg"; section 8.1: ES384 is -35.
HEADER_ALG = 1
ALG_ES384 = -35

# The NSM response buffer is 12 KiB (NSM_RESPONSE_MAX_SIZE in aws-nitro-enclaves-nsm-api),
# so no genuine document is bigger; 16 KiB leaves room for the tag and hand-made
# documents while bounding what a hostile peer can make us parse.
MAX_DOCUMENT_SIZE = 16 * 1024


def decode_cbor(data: bytes, what: str) -> Any:
    """Decode exactly one CBOR item from ``data``; trailing bytes are an error.

    Raises:
        CoseDecodeError: ``data`` is not exactly one well-formed CBOR item.
    """
    stream = io.BytesIO(data)
    try:
        decoder = cbor2.CBORDecoder(stream, allow_duplicate_keys=False, max_depth=32)
        value = decoder.decode()
    # cbor2 signals hostile input with CBORDecodeError but also ValueError, TypeError,
    # OverflowError, RecursionError or MemoryError depending on where it trips; all of
    # them mean "these bytes are not CBOR we accept".
    except Exception as exc:  # noqa: BLE001 - translated at the boundary on purpose
        raise CoseDecodeError(f"{what}: expected well-formed CBOR, got {type(exc).__name__}: {exc}") from exc
    trailing = len(data) - stream.tell()
    if trailing:
        raise CoseDecodeError(f"{what}: expected end of data after one CBOR item, got {trailing} trailing bytes")
    return value


@dataclass(frozen=True)
class CoseSign1:
    """One COSE_Sign1 message, with the protected header kept as its original bytes.

    The signature covers the protected header *bytes*, so they are never re-encoded.
    """

    protected: bytes
    unprotected: dict[Any, Any] = field(default_factory=dict)
    payload: bytes = b""
    signature: bytes = b""

    def protected_header(self) -> dict[Any, Any]:
        """Decode the protected header map (an empty bstr means an empty map, RFC 8152 s3).

        Raises:
            CoseDecodeError: the header bytes are not a CBOR map.
        """
        if not self.protected:
            return {}
        header = decode_cbor(self.protected, "protected header")
        if not isinstance(header, dict):
            raise CoseDecodeError(f"protected header: expected a CBOR map, got {type(header).__name__}")
        return header

    def sig_structure(self, external_aad: bytes = b"") -> bytes:
        """The bytes that are signed (RFC 8152 section 4.4)."""
        return sig_structure(self.protected, self.payload, external_aad)


def sig_structure(protected: bytes, payload: bytes, external_aad: bytes = b"") -> bytes:
    """RFC 8152 section 4.4: ``Sig_structure = ["Signature1", body_protected, external_aad, payload]``."""
    return cbor2.dumps(["Signature1", protected, external_aad, payload])


def decode_cose_sign1(data: bytes) -> CoseSign1:
    """Parse a tagged (18) or untagged COSE_Sign1 message.

    Raises:
        CoseDecodeError: not bytes, too large, not CBOR, wrong tag, or wrong array shape/types.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CoseDecodeError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > MAX_DOCUMENT_SIZE:
        raise CoseDecodeError(f"expected at most {MAX_DOCUMENT_SIZE} bytes, got {len(data)}")
    item = decode_cbor(data, "COSE_Sign1")
    if isinstance(item, cbor2.CBORTag):
        if item.tag != COSE_SIGN1_TAG:
            raise CoseDecodeError(f"expected CBOR tag {COSE_SIGN1_TAG} (COSE_Sign1) or no tag, got tag {item.tag}")
        item = item.value
    # cbor2 hands back the content of a tag as a tuple, an untagged array as a list.
    if not isinstance(item, (list, tuple)) or len(item) != 4:
        shape = f"array of {len(item)}" if isinstance(item, (list, tuple)) else type(item).__name__
        raise CoseDecodeError(f"expected a 4-element array, got {shape}")
    protected, unprotected, payload, signature = item
    for name, value, wanted in (
        ("protected", protected, bytes),
        ("unprotected", unprotected, Mapping),  # a cbor2.frozendict inside a tag
        ("payload", payload, bytes),
        ("signature", signature, bytes),
    ):
        if not isinstance(value, wanted):
            raise CoseDecodeError(f"{name}: expected {wanted.__name__}, got {type(value).__name__}")
    return CoseSign1(protected=protected, unprotected=dict(unprotected), payload=payload, signature=signature)


def encode_cose_sign1(message: CoseSign1, *, tagged: bool = False) -> bytes:
    """Serialise a COSE_Sign1 message; untagged by default, as the NSM does."""
    body = [message.protected, message.unprotected, message.payload, message.signature]
    if tagged:
        return cbor2.dumps(cbor2.CBORTag(COSE_SIGN1_TAG, body))
    return cbor2.dumps(body)


def encode_es384_protected_header() -> bytes:
    """The protected header the NSM uses: ``{1: -35}`` (alg: ES384)."""
    return cbor2.dumps({HEADER_ALG: ALG_ES384})
