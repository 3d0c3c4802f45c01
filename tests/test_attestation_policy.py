"""AttestationPolicy: the JSON format, its validation and PCR-set matching."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from nitrolesion.attestation.errors import InvalidPolicy
from nitrolesion.attestation.policy import AttestationPolicy

A = bytes(range(48))
B = bytes(range(1, 49))
C = bytes(range(2, 50))
D = bytes(range(3, 51))
ZERO = bytes(48)
GOOD_SET = {"PCR0": A.hex(), "PCR1": B.hex(), "PCR2": C.hex()}


def test_from_dict_full_format():
    policy = AttestationPolicy.from_dict(
        {
            "allowed_pcrs": [
                {"PCR0": A.hex(), "PCR1": B.hex(), "PCR2": C.hex()},
                {"PCR0": D.hex(), "PCR1": B.hex(), "PCR2": C.hex(), "PCR8": A.hex()},
            ],
            "allow_debug": False,
            "max_age_seconds": 600,
        }
    )
    assert policy.allowed_pcr_sets == ({0: A, 1: B, 2: C}, {0: D, 1: B, 2: C, 8: A})
    assert policy.allow_debug is False
    assert policy.max_age == timedelta(seconds=600)


def test_defaults_no_debug_and_no_age_limit():
    policy = AttestationPolicy.from_dict({"allowed_pcrs": [GOOD_SET]})
    assert not policy.allow_debug and policy.max_age is None and not policy.any_pcrs


@pytest.mark.parametrize(
    "data",
    [{}, {"allowed_pcrs": []}, {"allowed_pcrs": None}, {"allow_debug": True}, {"max_age_seconds": 60}],
    ids=["empty-object", "empty-list", "null", "debug-only", "age-only"],
)
def test_policy_file_without_pcr_sets_is_refused(data, tmp_path):
    # Fail closed: a policy file that names no enclave image must not accept every one.
    with pytest.raises(InvalidPolicy, match=r"allowed_pcrs: expected .*nitro-cli build-enclave"):
        AttestationPolicy.from_dict(data)
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InvalidPolicy, match="nitro-cli build-enclave"):
        AttestationPolicy.from_json_file(path)


def test_policy_without_sets_matches_nothing():
    # Built in code without sets (e.g. AttestationPolicy(max_age=...)): nothing matches.
    for policy in (AttestationPolicy(), AttestationPolicy(max_age=timedelta(minutes=5), allow_debug=True)):
        assert policy.matching_pcr_set({0: A, 1: B, 2: C}) is None
        assert policy.matching_pcr_set({}) is None


def test_any_enclave_is_explicit_and_matches_everything():
    policy = AttestationPolicy.any_enclave(max_age=timedelta(minutes=5))
    assert policy.any_pcrs and policy.allowed_pcr_sets == () and policy.max_age == timedelta(minutes=5)
    assert not policy.allow_debug and AttestationPolicy.any_enclave(allow_debug=True).allow_debug
    assert policy.matching_pcr_set({0: A, 1: B, 2: C}) == -1
    assert policy != AttestationPolicy(max_age=timedelta(minutes=5))


def test_any_pcrs_cannot_be_combined_with_sets():
    with pytest.raises(InvalidPolicy, match="any_pcrs: expected no allowed PCR sets"):
        AttestationPolicy(allowed_pcr_sets=({0: A, 1: B, 2: C},), any_pcrs=True)
    with pytest.raises(InvalidPolicy, match="any_pcrs: expected bool"):
        AttestationPolicy(any_pcrs=1)


def test_every_set_must_name_pcr0_to_2():
    with pytest.raises(InvalidPolicy, match="expected PCR0, PCR1 and PCR2, got no PCR2; .*nitro-cli build-enclave"):
        AttestationPolicy(allowed_pcr_sets=({0: A, 1: B},))
    with pytest.raises(InvalidPolicy, match="set #1: expected PCR0, PCR1 and PCR2, got no PCR0, PCR1, PCR2"):
        AttestationPolicy(allowed_pcr_sets=({0: A, 1: B, 2: C}, {8: D}))


@pytest.mark.parametrize("index", [0, 1, 2])
def test_all_zero_pcr0_to_2_need_allow_debug(index):
    # An all-zero PCR0/1/2 is what every debug-mode enclave reports: pinning it pins nothing.
    pcr_set = {0: A, 1: B, 2: C} | {index: ZERO}
    with pytest.raises(InvalidPolicy, match=f"got all-zero PCR{index} .*nitro-cli build-enclave.*allow_debug"):
        AttestationPolicy(allowed_pcr_sets=(pcr_set,))
    assert AttestationPolicy(allowed_pcr_sets=(pcr_set,), allow_debug=True).matching_pcr_set(pcr_set) == 0
    as_file = {"allowed_pcrs": [{f"PCR{i}": v.hex() for i, v in pcr_set.items()}]}
    with pytest.raises(InvalidPolicy, match="all-zero"):
        AttestationPolicy.from_dict(as_file)
    assert AttestationPolicy.from_dict(as_file | {"allow_debug": True}).allow_debug
    with pytest.raises(InvalidPolicy, match="all-zero"):
        AttestationPolicy.from_dict({"Measurements": {"HashAlgorithm": "Sha384 { ... }"} | as_file["allowed_pcrs"][0]})
    with pytest.raises(InvalidPolicy, match="all-zero"):
        AttestationPolicy.for_dev_pcrs(pcr_set)


def test_matching_sets():
    policy = AttestationPolicy(allowed_pcr_sets=({0: A, 1: B, 2: C}, {0: D, 1: B, 2: C, 8: A}))
    assert policy.matching_pcr_set({0: A, 1: B, 2: C, 8: D}) == 0
    assert policy.matching_pcr_set({0: D, 1: B, 2: C, 8: A}) == 1
    assert policy.matching_pcr_set({0: D, 1: B, 2: C, 8: D}) is None
    assert policy.matching_pcr_set({0: A, 1: B}) is None


def test_nitro_cli_build_output_is_one_allowed_set():
    output = {
        "Measurements": {"HashAlgorithm": "Sha384 { ... }", "PCR0": A.hex(), "PCR1": B.hex(), "PCR2": C.hex()}
    }
    assert AttestationPolicy.from_dict(output).allowed_pcr_sets == ({0: A, 1: B, 2: C},)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "expected a JSON object, got list"),
        ({"allowed_pcr": []}, "got unknown \\['allowed_pcr'\\]"),
        ({"allowed_pcrs": {}}, "allowed_pcrs: expected a list, got dict"),
        ({"allowed_pcrs": [{"PCR0": A.hex(), "PCR1": B.hex()}]}, "expected PCR0, PCR1 and PCR2, got no PCR2"),
        ({"allowed_pcrs": [{"PCR0": A.hex()[:-2], "PCR1": B.hex(), "PCR2": C.hex()}]}, "expected 48 bytes .*got 47"),
        ({"allowed_pcrs": [{"PCR0": "zz" * 48, "PCR1": B.hex(), "PCR2": C.hex()}]}, "expected hex"),
        ({"allowed_pcrs": [{"PCR0": A.hex(), "PCR1": B.hex(), "PCR2": C.hex(), "PCR32": A.hex()}]}, "PCR0..PCR31"),
        ({"allowed_pcrs": [{"pcr0": A.hex(), "PCR1": B.hex(), "PCR2": C.hex()}]}, "got 'pcr0'"),
        ({"allow_debug": "yes"}, "allow_debug: expected true or false"),
        ({"max_age_seconds": 0}, "max_age_seconds: expected a positive number"),
        ({"max_age_seconds": True}, "max_age_seconds: expected a positive number"),
        ({"Measurements": {"HashAlgorithm": "Sha256 { ... }", "PCR0": A.hex()}}, "expected Sha384"),
    ],
)
def test_invalid_policies(data, message):
    with pytest.raises(InvalidPolicy, match=message):
        AttestationPolicy.from_dict(data)


def test_constructor_validates():
    with pytest.raises(InvalidPolicy, match="expected 48 bytes, got 32 bytes"):
        AttestationPolicy(allowed_pcr_sets=({0: b"\x00" * 32},))
    with pytest.raises(InvalidPolicy, match="non-empty mapping"):
        AttestationPolicy(allowed_pcr_sets=({},))
    with pytest.raises(InvalidPolicy, match="max_age"):
        AttestationPolicy(max_age=timedelta(seconds=-1))


def test_policy_copies_caller_dicts():
    pcr_set = {0: A, 1: B, 2: C}
    policy = AttestationPolicy(allowed_pcr_sets=(pcr_set,))
    pcr_set[0] = D
    assert policy.matching_pcr_set({0: A, 1: B, 2: C}) == 0


def test_json_file_round_trip(tmp_path):
    policy = AttestationPolicy(allowed_pcr_sets=({0: A, 1: B, 2: C, 8: D},), allow_debug=True, max_age=timedelta(minutes=5))
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(policy.to_dict()))
    assert AttestationPolicy.from_json_file(path) == policy


def test_json_file_errors(tmp_path):
    with pytest.raises(InvalidPolicy, match="expected a readable UTF-8 file"):
        AttestationPolicy.from_json_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InvalidPolicy, match="expected JSON"):
        AttestationPolicy.from_json_file(bad)
    # Nesting past Python's recursion limit raises RecursionError, not a JSON error.
    bad.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(InvalidPolicy, match="expected JSON"):
        AttestationPolicy.from_json_file(bad)


def test_for_dev_pcrs_pins_pcr0_to_2_and_nonzero_pcr8():
    zero = bytes(48)
    assert AttestationPolicy.for_dev_pcrs({0: A, 1: B, 2: C, 3: zero, 8: zero}).allowed_pcr_sets == ({0: A, 1: B, 2: C},)
    assert AttestationPolicy.for_dev_pcrs({0: A, 1: B, 2: C, 8: D}).allowed_pcr_sets == ({0: A, 1: B, 2: C, 8: D},)
    with pytest.raises(InvalidPolicy, match="got no PCR2"):
        AttestationPolicy.for_dev_pcrs({0: A, 1: B})
