"""One invariant, fuzzed: for any input bytes the verifier returns a result or raises one of
its own AttestationError types, never anything else (h11's fuzzing habit)."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attestation_cases import SKIP_REASON, real_documents, split, with_payload
from nitrolesion.attestation.errors import AttestationError
from nitrolesion.attestation.policy import AttestationPolicy
from nitrolesion.attestation.verifier import verify_attestation

DOCS = real_documents()
needs_docs = pytest.mark.skipif(not DOCS, reason=SKIP_REASON)
POLICY = AttestationPolicy.any_enclave(allow_debug=True)
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None,
                print_blob=True)


def _verify_or_own_error(data: bytes, now) -> None:
    try:
        verify_attestation(data, now=now, policy=POLICY, expected_nonce=None)
    except AttestationError:
        pass


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_raise_only_attestation_errors(data):
    from attestation_cases import EPOCH

    with pytest.raises(AttestationError):
        verify_attestation(data, now=EPOCH, policy=POLICY)


# Small CBOR values to splice into documents: the shapes a hostile peer could send.
cbor_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.binary(max_size=80),
    st.text(max_size=20),
    st.floats(allow_nan=True),
)
cbor_values = st.recursive(
    cbor_leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.integers(-3, 40), st.text(max_size=12)), inner, max_size=4),
        st.builds(cbor2.CBORTag, st.sampled_from([0, 1, 2, 18, 24, 258, 55799, 1000]), inner),
    ),
    max_leaves=8,
)


@needs_docs
@FUZZ
@given(
    index=st.integers(min_value=0, max_value=len(DOCS) - 1 if DOCS else 0),
    edits=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.one_of(st.none(), st.integers(min_value=0)),
)
def test_byte_mutations_of_real_documents(index, edits, cut):
    doc = DOCS[index]
    data = bytearray(doc.data)
    for position, value in edits:
        data[position % len(data)] = value
    if cut is not None:
        del data[cut % len(data):]
    _verify_or_own_error(bytes(data), doc.time)


@needs_docs
@FUZZ
@given(
    index=st.integers(min_value=0, max_value=len(DOCS) - 1 if DOCS else 0),
    field=st.sampled_from(
        ["module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle", "public_key", "user_data", "nonce"]
    ),
    value=cbor_values,
)
def test_field_replacements_in_real_documents(index, field, value):
    doc = DOCS[index]
    _verify_or_own_error(with_payload(doc.data, **{field: value}), doc.time)


@needs_docs
@FUZZ
@given(
    index=st.integers(min_value=0, max_value=len(DOCS) - 1 if DOCS else 0),
    slot=st.integers(min_value=0, max_value=3),
    value=cbor_values,
)
def test_envelope_replacements(index, slot, value):
    doc = DOCS[index]
    parts = split(doc.data)
    parts[slot] = value
    _verify_or_own_error(cbor2.dumps(parts), doc.time)
