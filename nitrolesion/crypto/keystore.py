"""The parent's long-lived RSA key, kept in a private file on the parent instance.

First use creates ``<dir>/parent_key.pem`` (PKCS#8 PEM, unencrypted, mode 0600) in a
directory created with mode 0700. Creation is race-free across processes: each writer
builds a complete key in its own temporary file (O_CREAT|O_EXCL, 0600) and then
``os.link``s it to the final name. ``link`` fails if the name exists, unlike ``rename``,
so exactly one writer wins; the losers discard their key and load the winner's. A reader
therefore only ever sees no file or a complete file.

Key material is never logged or put into exception messages.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable, Mapping
from pathlib import Path

from Crypto.PublicKey import RSA
from Crypto.PublicKey.RSA import RsaKey

from nitrolesion.crypto.envelope import RSA_BITS, generate_keypair
from nitrolesion.errors import CryptoError

__all__ = ["KEY_FILENAME", "KEY_DIR_ENV", "ParentKeyStore", "default_key_dir"]

KEY_FILENAME = "parent_key.pem"
KEY_DIR_ENV = "NITROLESION_KEY_DIR"
# Only the owner may enter the directory or read the key (as OpenSSH demands for its keys).
DIR_MODE = 0o700
FILE_MODE = 0o600
# Any group/other permission bit on the key file is refused.
FORBIDDEN_FILE_BITS = 0o077
# An RSA-8192 PKCS#8 PEM is about 6.4 KB; a bigger file is not our key, so stop reading.
MAX_KEY_FILE = 64 * 1024


def default_key_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Return $NITROLESION_KEY_DIR if set and non-empty, else ~/.config/nitrolesion.

    ``environ`` defaults to os.environ. Raises nothing.
    """
    env = os.environ if environ is None else environ
    value = env.get(KEY_DIR_ENV)
    if value:
        return Path(value).expanduser()
    return Path.home() / ".config" / "nitrolesion"


class ParentKeyStore:
    """Loads the parent's RSA key from ``directory``, creating it on first use."""

    def __init__(
        self, directory: Path, *, generate: Callable[[], RsaKey] = generate_keypair
    ) -> None:
        """``generate`` makes a new key when none exists (injectable for tests)."""
        self._directory = Path(directory)
        self._generate = generate

    @property
    def directory(self) -> Path:
        return self._directory

    @property
    def path(self) -> Path:
        """The key file: ``directory / KEY_FILENAME``."""
        return self._directory / KEY_FILENAME

    def load_or_create(self) -> RsaKey:
        """Return the stored private key, creating and storing a new one if there is none.

        Raises CryptoError if the key file is group/other accessible (the message names the
        file and says ``chmod 600``), is not a regular file, is not an RSA private key of at
        least RSA_BITS, or if the directory or file cannot be created or read.
        """
        self._ensure_directory()
        existing = self._load_existing()
        if existing is not None:
            return existing
        key = self._generate()
        if not isinstance(key, RsaKey) or not key.has_private():
            raise CryptoError("key generator did not return an RSA private key")
        if self._install(key.export_key(format="PEM", pkcs=8)):
            return key
        # Another process created the file between our check and our link: use its key,
        # so both processes end up with the same identity.
        winner = self._load_existing()
        if winner is None:
            raise CryptoError(f"{self.path} vanished while being created")
        return winner

    def _ensure_directory(self) -> None:
        directory = self._directory
        try:
            directory.parent.mkdir(parents=True, exist_ok=True)
            try:
                directory.mkdir(mode=DIR_MODE)
            except FileExistsError:
                pass
            else:
                # mkdir's mode is filtered by the umask; set it explicitly.
                os.chmod(directory, DIR_MODE)
        except OSError as exc:
            raise CryptoError(f"cannot create key directory {directory}: {exc.strerror}") from exc
        if not directory.is_dir():
            raise CryptoError(f"key directory {directory} exists but is not a directory")

    def _load_existing(self) -> RsaKey | None:
        path = self.path
        try:
            # O_NOFOLLOW: do not follow a symlink planted in place of the key.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CryptoError(f"cannot open key file {path}: {exc.strerror}") from exc
        try:
            # fstat the open descriptor, not the path, so the checked file is the read one.
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise CryptoError(f"key file {path} is not a regular file")
            mode = stat.S_IMODE(info.st_mode)
            if mode & FORBIDDEN_FILE_BITS:
                raise CryptoError(
                    f"key file {path} has permissions {mode:04o}, which let group or others "
                    f"read it; refusing to use it. Fix with: chmod 600 {path}"
                )
            if info.st_size > MAX_KEY_FILE:
                raise CryptoError(f"key file {path} is {info.st_size} bytes; not an RSA key")
            data = _read_all(fd, MAX_KEY_FILE)
        except OSError as exc:
            raise CryptoError(f"cannot read key file {path}: {exc.strerror}") from exc
        finally:
            os.close(fd)
        try:
            key = RSA.import_key(data)
        except (ValueError, IndexError, TypeError):
            # No chaining: parser messages could quote parts of the file.
            raise CryptoError(f"key file {path} does not hold a valid RSA private key") from None
        if not key.has_private():
            raise CryptoError(f"key file {path} holds a public key, expected a private key")
        if key.size_in_bits() < RSA_BITS:
            raise CryptoError(
                f"key file {path} holds RSA-{key.size_in_bits()}; at least RSA-{RSA_BITS} "
                "is required"
            )
        return key

    def _install(self, pem: bytes) -> bool:
        """Write ``pem`` to a private temp file and link it into place.

        Returns False if the key file already exists (another writer won). Raises
        CryptoError on any other filesystem error.
        """
        directory = self._directory
        tmp = directory / f".{KEY_FILENAME}.{os.getpid()}.{secrets.token_hex(8)}.tmp"
        try:
            fd = os.open(
                tmp,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                FILE_MODE,
            )
            try:
                os.fchmod(fd, FILE_MODE)  # the umask could only narrow it, but be explicit
                view = memoryview(pem)
                while view:
                    view = view[os.write(fd, view) :]
                # Durable before it becomes visible under the real name.
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                return False
            _fsync_directory(directory)
            return True
        except OSError as exc:
            raise CryptoError(f"cannot write key file {self.path}: {exc.strerror}") from exc
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


def _read_all(fd: int, limit: int) -> bytes:
    chunks = []
    total = 0
    while True:
        chunk = os.read(fd, 8192)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > limit:
            raise CryptoError(f"key file is larger than {limit} bytes; not an RSA key")
        chunks.append(chunk)


def _fsync_directory(directory: Path) -> None:
    # Make the new directory entry durable; best effort where directories cannot be opened.
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
