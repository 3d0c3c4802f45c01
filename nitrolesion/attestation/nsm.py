"""Talk to the Nitro Secure Module (``/dev/nsm``) from Python, without the Rust NSM library.

The kernel driver (drivers/misc/nsm.c) takes one ioctl, ``NSM_IOCTL_REQUEST =
_IOWR(0x0A, 0, struct nsm_message) = 0xC0200A00``, whose argument is::

    struct nsm_message {
        struct iovec request;   /* CBOR request,  at most NSM_REQUEST_MAX_SIZE  (4 KiB)  */
        struct iovec response;  /* CBOR response, at most NSM_RESPONSE_MAX_SIZE (12 KiB) */
    };

The driver writes the response into the response buffer and its length into
``response.iov_len``. Requests and responses are the serde-CBOR encodings of the
``Request`` / ``Response`` enums of aws-nitro-enclaves-nsm-api: an enum variant is a
one-entry map ``{"Attestation": {...}}`` and ``Option::None`` is CBOR null.

The encoding and decoding are pure functions (tested without the device); the ioctl lives
in :class:`IoctlNsmDevice` only, and :class:`NsmClient` takes any object with
``exchange(request: bytes) -> bytes`` so tests can give it an in-memory twin.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any, Protocol

import cbor2

from nitrolesion.attestation.errors import AttestationUnavailable, NsmError

NSM_DEVICE_PATH = Path("/dev/nsm")
# _IOWR('\n', 0, struct nsm_message): dir=3 (read|write) << 30 | size 32 << 16 | type 0x0A << 8 | nr 0.
NSM_IOCTL_REQUEST = 0xC0200A00
NSM_REQUEST_MAX_SIZE = 0x1000  # 4 KiB, drivers/misc/nsm.c
NSM_RESPONSE_MAX_SIZE = 0x3000  # 12 KiB, drivers/misc/nsm.c
# Limits the NSM enforces for attestation inputs (it answers InputTooLarge above them);
# checked here first so the caller gets a message naming the field.
MAX_ATTESTATION_FIELD = 1024

# ErrorCode variants of aws-nitro-enclaves-nsm-api, with what they mean for a caller.
NSM_ERROR_CODES = {
    "InvalidArgument": "an input argument was invalid",
    "InvalidIndex": "PCR index out of bounds",
    "InvalidResponse": "the NSM produced an invalid response",
    "ReadOnlyIndex": "the PCR is locked",
    "InvalidOperation": "the operation is not allowed in this state",
    "BufferTooSmall": "the response did not fit the provided buffer",
    "InputTooLarge": "an input exceeded the allowed size",
    "InternalError": "the NSM failed internally",
}


class NsmDevice(Protocol):
    """Something that carries one CBOR request to the NSM and returns its CBOR response."""

    def exchange(self, request: bytes) -> bytes: ...


def encode_attestation_request(
    public_key: bytes | None = None, nonce: bytes | None = None, user_data: bytes | None = None
) -> bytes:
    """CBOR for ``Request::Attestation { user_data, nonce, public_key }``.

    Raises:
        NsmError: (code ``InputTooLarge``) a field is over 1024 bytes or the request over 4 KiB.
    """
    fields = {"user_data": user_data, "nonce": nonce, "public_key": public_key}
    for name, value in fields.items():
        if value is not None and not isinstance(value, (bytes, bytearray)):
            raise TypeError(f"{name} must be bytes or None, got {type(value).__name__}")
        if value is not None and len(value) > MAX_ATTESTATION_FIELD:
            raise NsmError("InputTooLarge", f"{name}: expected at most {MAX_ATTESTATION_FIELD} bytes, got {len(value)}")
    request = cbor2.dumps({"Attestation": {k: None if v is None else bytes(v) for k, v in fields.items()}})
    if len(request) > NSM_REQUEST_MAX_SIZE:
        raise NsmError("InputTooLarge", f"request: expected at most {NSM_REQUEST_MAX_SIZE} bytes, got {len(request)}")
    return request


def decode_attestation_response(response: bytes) -> bytes:
    """Extract the attestation document from the NSM's CBOR response.

    ``{"Attestation": {"document": bytes}}`` gives the document; ``{"Error": "<ErrorCode>"}``
    becomes an :class:`NsmError` whose ``code`` is that name.

    Raises:
        NsmError: the NSM reported an error, or the response is not the expected CBOR.
    """
    try:
        decoded: Any = cbor2.loads(response)
    except Exception as exc:  # noqa: BLE001 - cbor2 raises several types on garbage
        raise NsmError("InvalidResponse", f"expected CBOR from the NSM, got {type(exc).__name__}: {exc}") from exc
    if not isinstance(decoded, dict) or len(decoded) != 1:
        raise NsmError("InvalidResponse", f"expected a one-entry map, got {_describe(decoded)}")
    ((variant, body),) = decoded.items()
    if variant == "Error":
        code = body if isinstance(body, str) else "InvalidResponse"
        meaning = NSM_ERROR_CODES.get(code, "unknown NSM error code")
        raise NsmError(code, f"expected an attestation document, got NSM error {body!r} ({meaning})")
    if variant != "Attestation":
        raise NsmError("InvalidResponse", f"expected an 'Attestation' response, got {variant!r:.40}")
    document = body.get("document") if isinstance(body, dict) else None
    if not isinstance(document, bytes) or not document:
        raise NsmError("InvalidResponse", f"expected Attestation.document bytes, got {_describe(body)}")
    return document


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class NsmMessage(ctypes.Structure):
    """``struct nsm_message``: two iovecs, 32 bytes on 64-bit Linux (hence 0x20 in the ioctl)."""

    _fields_ = [("request", _IoVec), ("response", _IoVec)]


def build_nsm_message(request: bytes) -> tuple[NsmMessage, ctypes.Array[ctypes.c_char], ctypes.Array[ctypes.c_char]]:
    """Allocate the request/response buffers and the iovec pair pointing at them.

    The buffers are returned too: they must stay alive until the ioctl returns.

    Raises:
        NsmError: (``InputTooLarge``) the request is over 4 KiB.
    """
    if len(request) > NSM_REQUEST_MAX_SIZE:
        raise NsmError("InputTooLarge", f"request: expected at most {NSM_REQUEST_MAX_SIZE} bytes, got {len(request)}")
    request_buffer = ctypes.create_string_buffer(request, len(request))
    response_buffer = ctypes.create_string_buffer(NSM_RESPONSE_MAX_SIZE)
    message = NsmMessage(
        request=_IoVec(ctypes.cast(request_buffer, ctypes.c_void_p), len(request)),
        response=_IoVec(ctypes.cast(response_buffer, ctypes.c_void_p), NSM_RESPONSE_MAX_SIZE),
    )
    return message, request_buffer, response_buffer


class IoctlNsmDevice:
    """The real device: an open file descriptor on ``/dev/nsm`` driven by ioctl."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    @classmethod
    def open(cls, path: Path = NSM_DEVICE_PATH) -> IoctlNsmDevice:
        """Open the NSM device.

        Raises:
            AttestationUnavailable: the device does not exist or cannot be opened.
        """
        try:
            return cls(os.open(path, os.O_RDWR | os.O_CLOEXEC))
        except OSError as exc:
            raise AttestationUnavailable(f"expected a Nitro Secure Module at {path}, got {exc.strerror}") from exc

    def exchange(self, request: bytes) -> bytes:
        """Send one request with ``NSM_IOCTL_REQUEST`` and return the response bytes.

        Raises:
            NsmError: (``DeviceError``) the ioctl failed; (``InvalidResponse``) bad length.
        """
        import fcntl  # Linux-only; imported here so the pure functions work everywhere.

        message, _request_buffer, response_buffer = build_nsm_message(request)
        try:
            fcntl.ioctl(self._fd, NSM_IOCTL_REQUEST, message, True)
        except OSError as exc:
            raise NsmError("DeviceError", f"ioctl on the NSM failed: {exc}") from exc
        length = message.response.iov_len
        if not 0 < length <= NSM_RESPONSE_MAX_SIZE:
            raise NsmError("InvalidResponse", f"expected 1..{NSM_RESPONSE_MAX_SIZE} response bytes, got {length}")
        return response_buffer.raw[:length]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class NsmClient:
    """Ask the NSM for attestation documents.

    ``NsmClient.open()`` uses ``/dev/nsm``; ``NsmClient(device)`` takes any :class:`NsmDevice`.
    """

    def __init__(self, device: NsmDevice) -> None:
        self._device = device

    @classmethod
    def open(cls, path: Path = NSM_DEVICE_PATH) -> NsmClient:
        """Raises: AttestationUnavailable if the device cannot be opened."""
        return cls(IoctlNsmDevice.open(path))

    def attest(
        self, public_key: bytes | None = None, nonce: bytes | None = None, user_data: bytes | None = None
    ) -> bytes:
        """Return a fresh attestation document binding ``public_key``, ``nonce``, ``user_data``.

        Raises:
            NsmError: the NSM refused (``code`` = its ErrorCode name) or the call failed.
        """
        return decode_attestation_response(self._device.exchange(encode_attestation_request(public_key, nonce, user_data)))

    def close(self) -> None:
        close = getattr(self._device, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> NsmClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return f"map with keys {sorted(map(str, value))[:4]}"
    return type(value).__name__
