"""NSM request/response encoding, error mapping and the ioctl plumbing, without the device."""

from __future__ import annotations

import ctypes
import os

import cbor2
import pytest

from nitrolesion.attestation.errors import AttestationUnavailable, NsmError
from nitrolesion.attestation.nsm import (
    NSM_ERROR_CODES,
    NSM_IOCTL_REQUEST,
    NSM_REQUEST_MAX_SIZE,
    NSM_RESPONSE_MAX_SIZE,
    IoctlNsmDevice,
    NsmClient,
    NsmMessage,
    build_nsm_message,
    decode_attestation_response,
    encode_attestation_request,
)


def test_request_is_the_serde_cbor_of_request_attestation():
    request = encode_attestation_request(public_key=b"spki-der", nonce=b"n0nce", user_data=None)
    assert cbor2.loads(request) == {
        "Attestation": {"user_data": None, "nonce": b"n0nce", "public_key": b"spki-der"}
    }
    # Byte-exact: a one-entry map, text key, inner map of three text keys, null for None.
    assert request == (
        b"\xa1" + b"\x6bAttestation"
        + b"\xa3"
        + b"\x69user_data" + b"\xf6"
        + b"\x65nonce" + b"\x45n0nce"
        + b"\x6apublic_key" + b"\x48spki-der"
    )


def test_request_with_all_fields_absent():
    assert cbor2.loads(encode_attestation_request()) == {
        "Attestation": {"user_data": None, "nonce": None, "public_key": None}
    }


@pytest.mark.parametrize("field", ["public_key", "nonce", "user_data"])
def test_request_field_over_1024_bytes_is_refused_before_the_device(field):
    encode_attestation_request(**{field: b"x" * 1024})
    with pytest.raises(NsmError, match=f"InputTooLarge: {field}: expected at most 1024 bytes, got 1025") as info:
        encode_attestation_request(**{field: b"x" * 1025})
    assert info.value.code == "InputTooLarge"


def test_request_field_must_be_bytes():
    with pytest.raises(TypeError):
        encode_attestation_request(nonce="text")  # type: ignore[arg-type]


def test_response_with_document():
    assert decode_attestation_response(cbor2.dumps({"Attestation": {"document": b"\x84doc"}})) == b"\x84doc"


@pytest.mark.parametrize("code", sorted(NSM_ERROR_CODES))
def test_error_response_maps_to_nsm_error_with_its_name(code):
    with pytest.raises(NsmError) as info:
        decode_attestation_response(cbor2.dumps({"Error": code}))
    assert info.value.code == code
    assert code in str(info.value) and NSM_ERROR_CODES[code] in str(info.value)


def test_unknown_error_name_is_kept():
    with pytest.raises(NsmError) as info:
        decode_attestation_response(cbor2.dumps({"Error": "SomethingNew"}))
    assert info.value.code == "SomethingNew"


@pytest.mark.parametrize(
    "response",
    [
        b"",
        b"\xff\x00",
        cbor2.dumps(["Attestation"]),
        cbor2.dumps({"Attestation": {"document": "text"}}),
        cbor2.dumps({"Attestation": {}}),
        cbor2.dumps({"Attestation": {"document": b""}}),
        cbor2.dumps({"DescribePCR": {"lock": False, "data": b""}}),
        cbor2.dumps({"Attestation": {"document": b"d"}, "Error": "InternalError"}),
        cbor2.dumps({"Error": 3}),
    ],
)
def test_malformed_responses(response):
    with pytest.raises(NsmError) as info:
        decode_attestation_response(response)
    assert info.value.code == "InvalidResponse"


class FakeNsm:
    """In-memory twin of the device: records requests, answers from a script."""

    def __init__(self, response: bytes) -> None:
        self.response = response
        self.requests: list[bytes] = []
        self.closed = False

    def exchange(self, request: bytes) -> bytes:
        self.requests.append(request)
        return self.response

    def close(self) -> None:
        self.closed = True


def test_client_round_trip_with_in_memory_device():
    device = FakeNsm(cbor2.dumps({"Attestation": {"document": b"DOC"}}))
    with NsmClient(device) as client:
        assert client.attest(public_key=b"K", nonce=b"N", user_data=b"U") == b"DOC"
    assert cbor2.loads(device.requests[0]) == {"Attestation": {"user_data": b"U", "nonce": b"N", "public_key": b"K"}}
    assert device.closed


def test_client_surfaces_nsm_errors():
    client = NsmClient(FakeNsm(cbor2.dumps({"Error": "InvalidArgument"})))
    with pytest.raises(NsmError, match="InvalidArgument"):
        client.attest(public_key=b"K")


def test_ioctl_number_is_iowr_0x0a_0_of_two_iovecs():
    # _IOWR(type, nr, size) = (READ|WRITE)=3 << 30 | size << 16 | type << 8 | nr
    assert ctypes.sizeof(NsmMessage) == 2 * (ctypes.sizeof(ctypes.c_void_p) + ctypes.sizeof(ctypes.c_size_t))
    assert NSM_IOCTL_REQUEST == (3 << 30) | (ctypes.sizeof(NsmMessage) << 16) | (0x0A << 8) | 0
    assert NSM_REQUEST_MAX_SIZE == 4096 and NSM_RESPONSE_MAX_SIZE == 12288


def test_message_points_at_the_buffers():
    request = encode_attestation_request(nonce=b"abc")
    message, request_buffer, response_buffer = build_nsm_message(request)
    assert message.request.iov_base == ctypes.addressof(request_buffer)
    assert message.request.iov_len == len(request)
    assert ctypes.string_at(message.request.iov_base, message.request.iov_len) == request
    assert message.response.iov_base == ctypes.addressof(response_buffer)
    assert message.response.iov_len == NSM_RESPONSE_MAX_SIZE
    with pytest.raises(NsmError, match="InputTooLarge"):
        build_nsm_message(b"x" * (NSM_REQUEST_MAX_SIZE + 1))


def test_missing_device_is_attestation_unavailable(tmp_path):
    with pytest.raises(AttestationUnavailable, match="expected a Nitro Secure Module"):
        NsmClient.open(tmp_path / "nsm")


def test_ioctl_failure_is_an_nsm_device_error(tmp_path):
    # A regular file rejects the ioctl (ENOTTY): exercises the real ioctl path.
    fake = tmp_path / "nsm"
    fake.write_bytes(b"")
    device = IoctlNsmDevice.open(fake)
    try:
        with pytest.raises(NsmError) as info:
            device.exchange(encode_attestation_request(nonce=b"n"))
        assert info.value.code == "DeviceError"
    finally:
        device.close()


@pytest.mark.skipif(not os.path.exists("/dev/nsm"), reason="no /dev/nsm: not inside a Nitro Enclave")
def test_real_nsm_returns_a_document():  # pragma: no cover - only on Nitro hardware
    with NsmClient.open() as client:
        document = client.attest(public_key=None, nonce=b"test-nonce")
    assert cbor2.loads(document)[0] == cbor2.dumps({1: -35})
