"""Typed message bodies carried inside frames (CBOR maps), with strict validation.

Each message class knows its frame type, encodes itself with ``to_body()`` and is parsed by
``decode_message(frame)``, which checks every field's type and size and raises
:class:`~nitrolesion.errors.ProtocolError` for anything else. Like the frame decoder this
module does no I/O.

The flows (see README for the sequence diagram):

- boot: enclave -> parent server  ENCLAVE_ANNOUNCE(public_key, attestation) / ANNOUNCE_ACK
- one-shot (``parent.py client``): client -> enclave HELLO(nonce) / ATTESTATION, then
  SEALED_REQUEST (hybrid envelope, reply goes to the parent server) / ACCEPTED; later the
  enclave sends SEALED_RESULT to the parent server over its announce connection.
- session (``parent.py classify``): HELLO / ATTESTATION, SESSION_OPEN(client secret wrapped
  to the attested key) / SESSION_READY(key confirmation), then any number of
  SESSION_CLASSIFY / SESSION_RESULT, each sealed with its direction's key and counter.
  The flow itself lives in nitrolesion/protocol.py; the sealed payloads (``ImagePayload``,
  ``ResultPayload``) are defined at the end of this module.
- ERROR(code, message) may answer anything; GOODBYE ends a session politely.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, fields
from typing import ClassVar

import cbor2

from nitrolesion.crypto.envelope import GCM_NONCE_SIZE, MAX_RSA_BITS, RSA_BITS
from nitrolesion.crypto.session import CONFIRMATION_SIZE
from nitrolesion.errors import ProtocolError
from nitrolesion.limits import NONCE_SIZES, REQUEST_ID_SIZE, SESSION_ID_SIZE
from nitrolesion.wire.frames import MAX_BODY, Frame, MessageType

#: Size limits for fields, in bytes. An RSA-3072 SPKI is 422 bytes; a Nitro attestation
#: document is 4-8 KiB (16 KiB leaves room for 1 KiB user_data/nonce/public_key fields).
MAX_PUBLIC_KEY = 1024
MAX_ATTESTATION = 16 * 1024
#: An RSA-OAEP ciphertext or RSA-PSS signature is as long as the modulus: any key size
#: the crypto layer accepts (RSA_BITS..MAX_RSA_BITS), so a 4096-bit parent key works.
RSA_OUTPUT_SIZES = range(RSA_BITS // 8, MAX_RSA_BITS // 8 + 1)
MAX_ERROR_TEXT = 512
#: The largest image one message can carry: a frame body is at most MAX_BODY, and sealing
#: (one-shot or in a session) adds under 2 KiB; 64 KiB leaves slack. Neither side can
#: raise it: the parent refuses bigger files before sending, the enclave refuses a
#: --max-image-bytes above it.
MAX_IMAGE_IN_MESSAGE = MAX_BODY - 64 * 1024
#: Nesting allowed in a CBOR body. Message bodies are flat maps (depth 1); a result adds
#: one map for the probabilities (depth 2); 4 leaves slack and keeps any walk shallow.
MAX_CBOR_DEPTH = 4
#: Items (map keys and values, array elements) allowed in one body. The largest body we
#: send, a result with 7 probabilities, has about 25; 256 is ample and keeps the check and
#: the decode O(1) in work per frame instead of O(frame size) in Python calls.
MAX_CBOR_ITEMS = 256
#: Keys named in a "wrong fields" error, and characters of each: enough to debug a client,
#: bounded so the ERROR frame stays under MAX_ERROR_TEXT whatever the peer sent.
_KEYS_SHOWN = 6
_KEY_CHARS = 32


def _cbor_head(data: bytes, pos: int) -> tuple[int, int, int, int]:
    """Read one CBOR initial byte and its argument (RFC 8949 section 3).

    Returns (major type, additional info, argument, next position). Indefinite lengths
    (additional info 31) and the reserved values 28-30 are refused here.
    """
    if pos >= len(data):
        raise ProtocolError("CBOR body is truncated")
    initial = data[pos]
    major, info = initial >> 5, initial & 0x1F
    pos += 1
    if info < 24:
        return major, info, info, pos
    if info > 27:
        # 28-30 are reserved; 31 is an indefinite length or "break", which our encoder
        # never produces and which makes lengths unknowable in advance.
        raise ProtocolError(f"unsupported CBOR additional information {info}")
    size = 1 << (info - 24)
    if pos + size > len(data):
        raise ProtocolError("CBOR body is truncated")
    return major, info, int.from_bytes(data[pos:pos + size], "big"), pos + size


def _check_cbor_item(data: bytes, pos: int, depth: int, budget: list[int]) -> int:
    budget[0] -= 1
    if budget[0] < 0:
        raise ProtocolError(f"CBOR body has more than {MAX_CBOR_ITEMS} items")
    major, info, argument, pos = _cbor_head(data, pos)
    if major in (0, 1):  # unsigned / negative integer: the head is the whole item
        return pos
    if major in (2, 3):  # byte / text string of a definite length
        if argument > len(data) - pos:
            raise ProtocolError(f"CBOR string declares {argument} bytes, "
                                f"only {len(data) - pos} remain")
        return pos + argument
    if major in (4, 5):  # array / map
        if depth >= MAX_CBOR_DEPTH:
            raise ProtocolError(f"CBOR nesting deeper than {MAX_CBOR_DEPTH}")
        items = argument * (2 if major == 5 else 1)
        # Each item needs at least one byte: refuse a huge declared count up front
        # instead of looping over it.
        if items > len(data) - pos:
            raise ProtocolError(f"CBOR container declares {items} items, "
                                f"only {len(data) - pos} bytes remain")
        for _ in range(items):
            pos = _check_cbor_item(data, pos, depth + 1, budget)
        return pos
    if major == 6:
        # Semantic tags make the decoder build arbitrary objects from peer bytes (bignums,
        # fractions reduced with a quadratic gcd, regexes, shared references). No message
        # of ours uses one, so none is accepted.
        raise ProtocolError(f"CBOR tag {argument} is not accepted")
    # major 7: false/true/null/undefined, simple values and floats; all fixed-size heads.
    return pos


def check_plain_cbor(data: bytes) -> None:
    """Check that ``data`` is exactly one plain CBOR item, before any decoder sees it.

    Plain means: definite lengths only, no semantic tags, at most MAX_CBOR_DEPTH levels of
    arrays/maps and MAX_CBOR_ITEMS items, and no bytes after the item. The walk reads only
    heads (strings are skipped, not copied). Raises :class:`ProtocolError` otherwise.
    """
    end = _check_cbor_item(bytes(data), 0, 0, [MAX_CBOR_ITEMS + 1])
    if end != len(data):
        raise ProtocolError(f"{len(data) - end} bytes after the CBOR item")


def loads_plain(data: bytes):
    """``cbor2.loads`` for peer bytes: :func:`check_plain_cbor` first, then decode.

    Raises :class:`ProtocolError` for anything that is not one plain CBOR item, and for a
    map that repeats a key at the top level (cbor2 would silently keep the last one).
    """
    data = bytes(data)
    check_plain_cbor(data)
    try:
        value = cbor2.loads(data)
    except Exception as exc:  # cbor2 raises several types (CBORDecodeError, ValueError, ...)
        raise ProtocolError("body is not valid CBOR") from exc
    major, _, declared, _ = _cbor_head(data, 0)
    if major == 5 and len(value) != declared:
        raise ProtocolError(f"CBOR map declares {declared} entries but repeats a key")
    return value


def _describe_keys(keys) -> list[str]:
    """Peer-chosen map keys, shortened for an error message (never their full text)."""
    shown = []
    for key in list(keys)[:_KEYS_SHOWN]:
        shown.append(repr(key[:_KEY_CHARS]) if isinstance(key, str) else f"<{type(key).__name__}>")
    if len(keys) > _KEYS_SHOWN:
        shown.append(f"... {len(keys) - _KEYS_SHOWN} more")
    return shown


class ErrorCode:
    """Codes carried by ERROR frames and sealed per-image errors."""

    BAD_FRAME = "BAD_FRAME"            # not a frame: wrong magic, version, type or length
    BAD_MESSAGE = "BAD_MESSAGE"        # a frame whose body is not the expected message
    UNEXPECTED = "UNEXPECTED"          # a valid message at the wrong point of the flow
    DECRYPT_FAILED = "DECRYPT_FAILED"  # ciphertext did not authenticate
    REPLAY = "REPLAY"                  # request id or counter seen before / out of order
    BAD_IMAGE = "BAD_IMAGE"            # decrypted fine, but not an acceptable image
    BUSY = "BUSY"                      # queue full: try again later
    TIMEOUT = "TIMEOUT"                # the peer was too slow
    UNAVAILABLE = "UNAVAILABLE"        # e.g. the parent link is down
    UNTRUSTED = "UNTRUSTED"            # an attestation did not verify against our trust
    INTERNAL = "INTERNAL"              # a bug on our side; details only in our own log


def printable(text: str) -> str:
    """``text`` from a peer, safe to print: control, format (bidi overrides), private-use
    and unassigned characters become "?", so a hostile peer cannot move the cursor, rewrite
    a line or fake another line on the user's terminal."""
    return "".join("?" if unicodedata.category(ch)[0] == "C" else ch for ch in str(text))


def _check_bytes(name: str, value, sizes) -> bytes:
    if not isinstance(value, bytes):
        raise ProtocolError(f"field {name!r}: expected bytes, got {type(value).__name__}")
    if isinstance(sizes, int):
        ok = len(value) == sizes
    elif isinstance(sizes, range):
        ok = len(value) in sizes
    else:
        ok = len(value) <= sizes[1]
    if not ok:
        raise ProtocolError(f"field {name!r}: unexpected length {len(value)}")
    return value


def _check_text(name: str, value, limit: int) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise ProtocolError(f"field {name!r}: expected text of at most {limit} characters")
    return value


def _check_counter(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise ProtocolError(f"field {name!r}: expected an integer counter")
    return value


def _max(limit: int):
    return (0, limit)


class Message:
    """Base class: subclasses are frozen dataclasses with a ``TYPE`` and a field schema."""

    TYPE: ClassVar[MessageType]
    SCHEMA: ClassVar[dict]

    def to_body(self) -> bytes:
        return cbor2.dumps({f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def from_fields(cls, data: dict) -> "Message":
        expected = set(cls.SCHEMA)
        if set(data) != expected:
            raise ProtocolError(
                f"{cls.TYPE.name}: expected fields {sorted(expected)}, "
                f"got {', '.join(_describe_keys(data)) or 'none'}")
        values = {}
        for name, check in cls.SCHEMA.items():
            values[name] = check(name, data[name])
        return cls(**values)


def _bytes(sizes):
    return lambda name, value: _check_bytes(name, value, sizes)


def _text(limit):
    return lambda name, value: _check_text(name, value, limit)


def _choice(*options):
    def check(name, value):
        if value not in options:
            raise ProtocolError(f"field {name!r}: expected one of {options}, got {value!r}")
        return value
    return check


@dataclass(frozen=True)
class EnclaveAnnounce(Message):
    """The enclave's public key (SPKI DER) and an attestation document that binds it."""

    public_key: bytes
    attestation: bytes
    TYPE: ClassVar = MessageType.ENCLAVE_ANNOUNCE
    SCHEMA: ClassVar = {"public_key": _bytes(_max(MAX_PUBLIC_KEY)),
                        "attestation": _bytes(_max(MAX_ATTESTATION))}


@dataclass(frozen=True)
class AnnounceAck(Message):
    TYPE: ClassVar = MessageType.ANNOUNCE_ACK
    SCHEMA: ClassVar = {}


@dataclass(frozen=True)
class Hello(Message):
    """The client's fresh nonce; the enclave answers with an attestation carrying it."""

    nonce: bytes
    TYPE: ClassVar = MessageType.HELLO
    SCHEMA: ClassVar = {"nonce": _bytes(NONCE_SIZES)}


@dataclass(frozen=True)
class Attestation(Message):
    public_key: bytes
    document: bytes
    TYPE: ClassVar = MessageType.ATTESTATION
    SCHEMA: ClassVar = {"public_key": _bytes(_max(MAX_PUBLIC_KEY)),
                        "document": _bytes(_max(MAX_ATTESTATION))}


@dataclass(frozen=True)
class SealedRequest(Message):
    """A one-shot request: image sealed to the enclave key; the result goes to the parent."""

    request_id: bytes
    parent_public_key: bytes
    wrapped_key: bytes
    nonce: bytes
    ciphertext: bytes
    TYPE: ClassVar = MessageType.SEALED_REQUEST
    SCHEMA: ClassVar = {"request_id": _bytes(REQUEST_ID_SIZE),
                        "parent_public_key": _bytes(_max(MAX_PUBLIC_KEY)),
                        "wrapped_key": _bytes(RSA_OUTPUT_SIZES),
                        "nonce": _bytes(GCM_NONCE_SIZE),
                        "ciphertext": _bytes(_max(2**40))}


@dataclass(frozen=True)
class SealedResult(Message):
    """A one-shot result sealed to the parent's key; ``signature`` by the enclave's key
    covers it and ``issued_at_ms`` (the enclave's clock)."""

    request_id: bytes
    issued_at_ms: int
    wrapped_key: bytes
    nonce: bytes
    ciphertext: bytes
    signature: bytes
    TYPE: ClassVar = MessageType.SEALED_RESULT
    SCHEMA: ClassVar = {"request_id": _bytes(REQUEST_ID_SIZE),
                        "issued_at_ms": _check_counter,
                        "wrapped_key": _bytes(RSA_OUTPUT_SIZES),
                        "nonce": _bytes(GCM_NONCE_SIZE),
                        "ciphertext": _bytes(_max(2**40)),
                        "signature": _bytes(RSA_OUTPUT_SIZES)}


@dataclass(frozen=True)
class Accepted(Message):
    request_id: bytes
    TYPE: ClassVar = MessageType.ACCEPTED
    SCHEMA: ClassVar = {"request_id": _bytes(REQUEST_ID_SIZE)}


@dataclass(frozen=True)
class SessionOpen(Message):
    """The client's fresh secret, RSA-OAEP-wrapped to the attested key (label binds session_id)."""

    session_id: bytes
    wrapped_secret: bytes
    TYPE: ClassVar = MessageType.SESSION_OPEN
    SCHEMA: ClassVar = {"session_id": _bytes(SESSION_ID_SIZE),
                        "wrapped_secret": _bytes(RSA_OUTPUT_SIZES)}


@dataclass(frozen=True)
class SessionReady(Message):
    """The enclave derived the session keys; ``confirmation`` proves it (HMAC over the transcript)."""

    session_id: bytes
    confirmation: bytes
    TYPE: ClassVar = MessageType.SESSION_READY
    SCHEMA: ClassVar = {"session_id": _bytes(SESSION_ID_SIZE),
                        "confirmation": _bytes(CONFIRMATION_SIZE)}


@dataclass(frozen=True)
class SessionClassify(Message):
    counter: int
    ciphertext: bytes
    TYPE: ClassVar = MessageType.SESSION_CLASSIFY
    SCHEMA: ClassVar = {"counter": _check_counter, "ciphertext": _bytes(_max(2**40))}


@dataclass(frozen=True)
class SessionResult(Message):
    counter: int
    ciphertext: bytes
    TYPE: ClassVar = MessageType.SESSION_RESULT
    SCHEMA: ClassVar = {"counter": _check_counter, "ciphertext": _bytes(_max(2**40))}


@dataclass(frozen=True)
class ErrorMessage(Message):
    """An error in clear: only protocol-level facts, never anything about an image."""

    code: str
    message: str
    TYPE: ClassVar = MessageType.ERROR
    SCHEMA: ClassVar = {"code": _text(32), "message": _text(MAX_ERROR_TEXT)}

    @classmethod
    def bounded(cls, code: str, text: str) -> "ErrorMessage":
        """An ERROR with ``text`` cut to MAX_ERROR_TEXT characters: a text may quote peer
        bytes, and the peer refuses longer ones."""
        if len(text) > MAX_ERROR_TEXT:
            text = text[:MAX_ERROR_TEXT - 3] + "..."
        return cls(code, text)


@dataclass(frozen=True)
class Goodbye(Message):
    TYPE: ClassVar = MessageType.GOODBYE
    SCHEMA: ClassVar = {}


MESSAGE_CLASSES = {cls.TYPE: cls for cls in (
    EnclaveAnnounce, AnnounceAck, Hello, Attestation, SealedRequest, SealedResult, Accepted,
    SessionOpen, SessionReady, SessionClassify, SessionResult, ErrorMessage, Goodbye)}


def decode_message(frame: Frame) -> Message:
    """Parse a frame body into its message class.

    Raises :class:`ProtocolError` if the body is not one plain CBOR item (see
    :func:`check_plain_cbor`), not a map, or any field is missing, extra, of the wrong type
    or size.
    """
    cls = MESSAGE_CLASSES.get(frame.type)
    if cls is None:
        raise ProtocolError(f"no message defined for frame type {int(frame.type)}")
    try:
        data = loads_plain(frame.body)
    except ProtocolError as exc:
        raise ProtocolError(f"{cls.TYPE.name}: {exc}") from exc
    if not isinstance(data, dict):
        raise ProtocolError(f"{cls.TYPE.name}: expected a CBOR map, got {type(data).__name__}")
    return cls.from_fields(data)


# -- sealed payloads: the plaintext inside SESSION_CLASSIFY / SESSION_RESULT / SEALED_RESULT --
#: A prediction names at most this many classes (the model has 7).
MAX_CLASSES = 16
MAX_LABEL_TEXT = 128


def _check_probability(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ProtocolError(f"field {name!r}: expected a probability in [0, 1]")
    return float(value)


#: What ``refer_reason`` may say: the calibrated malignant score reached the model's refer
#: threshold, or the image does not look like a dermoscopic image of a lesion at all.
REFER_REASONS = ("malignant", "not_a_lesion")
PREDICTION_FIELDS = ("code", "name", "confidence", "probabilities", "malignant", "refer",
                     "refer_reason")


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ProtocolError(f"field {name!r}: expected true or false")
    return value


@dataclass(frozen=True)
class Prediction:
    """The model's answer for one image, as the enclave's classifier makes it and every
    receiver decodes it from a sealed result: the most probable diagnosis (``code``,
    ``name``, ``confidence``), the calibrated ``probabilities`` by code, ``malignant``
    (p(mel) + p(bcc) + p(akiec)), ``refer`` and ``refer_reason`` (None when not referred,
    else one of :data:`REFER_REASONS`). Built by :func:`check_prediction` on both sides, so
    every instance passed the same strict checks."""

    code: str
    name: str
    confidence: float
    probabilities: dict[str, float]
    malignant: float
    refer: bool
    refer_reason: str | None

    def to_wire(self) -> dict:
        """The CBOR map sent on the wire (the fields in :data:`PREDICTION_FIELDS`)."""
        return {name: getattr(self, name) for name in PREDICTION_FIELDS}

    def top(self, k: int = 3) -> list[tuple[str, float]]:
        """The ``k`` most probable codes with their probabilities, best first."""
        return sorted(self.probabilities.items(), key=lambda item: -item[1])[:k]

    def triage_text(self) -> str:
        """The triage for a person (see :func:`triage_text`)."""
        return triage_text(self.malignant, self.refer, self.refer_reason)


def triage_text(malignant: float, refer: bool, refer_reason: str | None) -> str:
    """A result's triage for a person: ``malignant 0.12``, ``malignant 0.71 REFER`` or
    ``malignant 0.30 REFER (not a lesion)``."""
    text = f"malignant {malignant:.2f}"
    if refer_reason == "not_a_lesion":
        return text + " REFER (not a lesion)"
    return text + " REFER" if refer else text


def check_prediction(value) -> Prediction:
    """Decode a prediction map (the fields of :class:`Prediction`), every field's
    type, size and range checked, and ``refer_reason`` consistent with ``refer``. Raises
    ProtocolError."""
    if not isinstance(value, dict) or set(value) != set(PREDICTION_FIELDS):
        raise ProtocolError(f"prediction: expected fields {', '.join(PREDICTION_FIELDS)}")
    probabilities = value["probabilities"]
    if not isinstance(probabilities, dict) or not 0 < len(probabilities) <= MAX_CLASSES:
        raise ProtocolError(f"prediction: expected 1..{MAX_CLASSES} probabilities")
    refer = _check_flag("refer", value["refer"])
    reason = value["refer_reason"]
    if refer and reason not in REFER_REASONS:
        raise ProtocolError(f"field 'refer_reason': expected one of {REFER_REASONS} when refer is true")
    if not refer and reason is not None:
        raise ProtocolError("field 'refer_reason': expected null when refer is false")
    return Prediction(
        code=_check_text("code", value["code"], 32),
        name=_check_text("name", value["name"], MAX_LABEL_TEXT),
        confidence=_check_probability("confidence", value["confidence"]),
        probabilities={_check_text("class", code, 32): _check_probability(code[:32], p)
                       for code, p in probabilities.items()},
        malignant=_check_probability("malignant", value["malignant"]),
        refer=refer,
        refer_reason=reason)


@dataclass(frozen=True)
class ImagePayload:
    """What a SESSION_CLASSIFY carries, sealed: the image bytes."""

    image: bytes

    def encode(self) -> bytes:
        return cbor2.dumps({"image": self.image})

    @classmethod
    def decode(cls, data: bytes) -> "ImagePayload":
        """Raises ProtocolError unless ``data`` is ``{"image": bytes}`` in plain CBOR."""
        try:
            value = loads_plain(data)
        except ProtocolError as exc:
            raise ProtocolError(f"expected {{'image': bytes}}: {exc}") from None
        if not isinstance(value, dict) or set(value) != {"image"} or not isinstance(value["image"], bytes):
            raise ProtocolError("expected {'image': bytes}")
        return cls(value["image"])


@dataclass(frozen=True)
class ResultPayload:
    """What a SESSION_RESULT carries, sealed: the answer to request ``request`` (its
    counter), either a ``prediction`` (a :class:`Prediction`; a map given here is
    decoded by :func:`check_prediction`, so the enclave cannot send a malformed one) or an
    ``error`` ``(code, message)``."""

    request: int
    prediction: Prediction | None = None
    error: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        if (self.prediction is None) == (self.error is None):
            raise ValueError("a result payload has exactly one of prediction and error")
        if self.prediction is not None and not isinstance(self.prediction, Prediction):
            object.__setattr__(self, "prediction", check_prediction(self.prediction))

    def encode(self) -> bytes:
        body = {"request": self.request}
        if self.prediction is not None:
            body["result"] = self.prediction.to_wire()
        else:
            body["error"] = {"code": self.error[0], "message": self.error[1]}
        return cbor2.dumps(body)

    @classmethod
    def decode(cls, data: bytes) -> "ResultPayload":
        """Raises ProtocolError for anything but a well-formed result or error."""
        value = loads_plain(data)
        if not isinstance(value, dict) or len(value) != 2 or "request" not in value:
            raise ProtocolError("expected {'request': n, 'result' | 'error': ...}")
        request = _check_counter("request", value["request"])
        if "result" in value:
            return cls(request, prediction=check_prediction(value["result"]))
        error = value.get("error")
        if not isinstance(error, dict) or set(error) != {"code", "message"}:
            raise ProtocolError("expected {'request': n, 'result' | 'error': ...}")
        return cls(request, error=(_check_text("code", error["code"], 32),
                                   _check_text("message", error["message"], MAX_ERROR_TEXT)))
