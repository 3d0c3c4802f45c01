"""The project's exception hierarchy, in one place.

    NitroLesionError                 base: everything this package raises on purpose;
    │                                diagnostic() is the CLI's line, exit_status its status
    ├── UsageError                   bad arguments or options (a CLI exits 2)
    ├── ImageFileError               a local image file that is not sent (unreadable, too large)
    ├── ImageError                   the bytes are not an image we accept
    ├── ModelError                   the model file or labels are missing or inconsistent
    ├── Busy                         the enclave has no queue slot or memory for a job right now
    ├── ProtocolError                the peer sent bytes that are not a valid frame
    │   ├── FrameTooLarge            a declared length over the limit
    │   ├── BadMagic                 the header does not start with b"NL"
    │   ├── UnsupportedVersion       the header carries another protocol version
    │   ├── UnknownMessageType       the header names a message type we do not know
    │   └── UnexpectedMessage        a valid message at the wrong point of the flow
    ├── LocalProtocolError           (also a ValueError) the caller misused the wire API
    ├── CryptoError                  a ciphertext did not authenticate / a key is unusable
    │   ├── ReplayError              a session message arrived with an already-used counter
    │   └── ReorderError             a session message arrived ahead of the expected counter
    ├── TransportError               connect/read/write failed or timed out
    │   ├── TransportTimeout         a connect/send/receive did not finish within its budget
    │   └── ConnectionClosed         the peer closed cleanly between two frames
    ├── RemoteError                  the peer answered with an ERROR frame
    └── AttestationError             (nitrolesion.attestation.errors) one subclass per check

Lower-layer exceptions (Pillow, pycryptodome, socket) are translated at the boundary with
``raise ... from exc`` so callers only ever catch these types. The parent CLI catches
NitroLesionError in one place and prints ``diagnostic()``; ValueError and assert remain for
a caller's misuse of an API and for invariants.
"""

from __future__ import annotations


class NitroLesionError(Exception):
    """Base class for every error this package raises on purpose."""

    #: The status a command exits with when this error ends it.
    exit_status = 1

    def diagnostic(self) -> str:
        """The one line a command prints for this error (after its own name)."""
        return str(self)


class UsageError(NitroLesionError):
    """Bad command-line arguments or options: the CLI prints the text and exits 2."""

    exit_status = 2


class ImageFileError(NitroLesionError):
    """A local file that is not sent; ``code`` is the batch row's error code:
    ``UNREADABLE`` (missing, not a regular file, no permission) or ``TOO_LARGE``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class ImageError(NitroLesionError):
    """The submitted bytes are not an image we accept (format, size, corruption)."""


class ModelError(NitroLesionError):
    """The model or its labels file is missing, unreadable or inconsistent."""


class Busy(NitroLesionError):
    """The enclave's job queue is full, or no memory is left for the job right now: the
    peer is answered BUSY and may try again."""


class ProtocolError(NitroLesionError):
    """The peer sent bytes that do not form a valid frame or message body."""


class FrameTooLarge(ProtocolError):
    """A frame header declared a body larger than the configured maximum."""


class BadMagic(ProtocolError):
    """A frame header did not start with the protocol magic bytes."""


class UnsupportedVersion(ProtocolError):
    """A frame header carried a protocol version this build does not speak."""


class UnknownMessageType(ProtocolError):
    """A frame header carried a message type byte that is not a known MessageType."""


class UnexpectedMessage(ProtocolError):
    """A well-formed message that the protocol does not allow at this point of the flow."""


class LocalProtocolError(NitroLesionError, ValueError):
    """Our own code misused the wire API (e.g. tried to encode an oversized body).

    Distinct from ProtocolError, which always means the *peer* sent bad bytes; it is also a
    ValueError so generic argument-checking callers still catch it.
    """


class CryptoError(NitroLesionError):
    """Decryption or authentication failed, or a key could not be used."""


class ReplayError(CryptoError):
    """A session message carried a counter that was already used (a replay)."""


class ReorderError(CryptoError):
    """A session message carried a counter ahead of the next expected one (reorder/drop)."""


class TransportError(NitroLesionError):
    """A connection could not be made, or a read/write failed or timed out."""


class TransportTimeout(TransportError):
    """A connect, send or receive did not finish within its time budget.

    A separate type so a server can answer a slow peer with a TIMEOUT error instead of
    matching on message text.
    """


class ConnectionClosed(TransportError):
    """The peer closed the connection cleanly at a frame boundary."""


class RemoteError(NitroLesionError):
    """The peer answered with an ERROR frame; ``code`` says which kind."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def diagnostic(self) -> str:
        # The peer's text, made printable: a hostile peer cannot rewrite the terminal.
        from nitrolesion.wire.messages import printable

        return f"the enclave refused: {printable(self.code)}: {printable(self.message)}"
