"""Wrong keys, flipped bits, replays and ciphertext moved between sessions or types.

Against a real enclave process (tests/harness.py); the cases are in tests/hostile_cases.py.
Each test asserts the precise ERROR code and text the client got, and that the enclave then
still serves an attested session whose result matches the in-process classifier.
"""

from __future__ import annotations

import pytest

from hostile_cases import CRYPTO_CASES, case_id, check_case


@pytest.mark.parametrize("case", CRYPTO_CASES, ids=case_id)
def test_hostile_crypto(hostile, case):
    check_case(hostile, case)


def test_enclave_log_names_no_result_and_no_traceback(hostile):
    """Failures are logged without secrets: no label, no traceback, no key material."""
    log = hostile.stack.enclave.output
    assert "Traceback" not in log
    for secret in ("Melanocytic", "Nevi", "probabilities", "BEGIN", "PRIVATE"):
        assert secret not in log, f"{secret!r} in the enclave log"
