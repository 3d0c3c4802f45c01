"""The parent's long-lived RSA key, kept in a private file on the parent instance.

First use creates ``<dir>/parent_key.pem`` (PKCS#8 PEM, unencrypted, mode 0600) in a
directory created with mode 0700. Creation is race-free across processes: each writer
builds a complete key in its own temporary file (O_CREAT|O_EXCL, 0600) and then
``os.link``s it to the final name. ``link`` fails if the name exists, unlike ``rename``,
so exactly one writer wins; the losers discard their key and load the winner's. A reader
therefore only ever sees no file or a complete file.

Private folders. The key folder, and any folder given to ``write_private_file``, must be
a real directory (not a symlink), owned by the effective user, and not writable by group
or others; otherwise it is refused with a one-line CryptoError naming the fix, and
nothing in it is created, changed or removed. The folder is checked with ``lstat`` and
then opened with O_NOFOLLOW|O_DIRECTORY and ``fstat``-ed, and the two results must be the
same inode; every later operation (open, link, rename, unlink, fsync) is relative to
that open descriptor, so renaming or swapping the path after the check cannot redirect
a write. Only the last path component may not be a symlink: ``~/.config`` itself may be
one. A symlinked key folder is refused rather than followed because the checked folder
must be the one written to; point ``NITROLESION_KEY_DIR`` at the real folder instead.
Ancestors are not checked: whoever can rename the folder away can only make later runs
see a different folder, and that folder faces the same checks.

The key file must be a regular file (a symlink is refused, never followed), owned by the
effective user, with no group/other permission bits; these are checked on the open file
descriptor, so the file checked is the file read. Temporary files are created with
O_CREAT|O_EXCL|O_NOFOLLOW inside the checked folder (never in a shared /tmp) and are
removed on any failure; a file already at a temporary name is never followed, written
or deleted.

Key material is never logged or put into exception messages.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shlex
import stat
from collections.abc import Callable, Mapping
from pathlib import Path

from Crypto.PublicKey import RSA
from Crypto.PublicKey.RSA import RsaKey

from nitrolesion.crypto.envelope import RSA_BITS, generate_keypair
from nitrolesion.errors import CryptoError

__all__ = [
    "KEY_FILENAME",
    "KEY_DIR_ENV",
    "ParentKeyStore",
    "check_private_folder",
    "default_key_dir",
    "ensure_private_folder",
    "write_private_file",
]

KEY_FILENAME = "parent_key.pem"
KEY_DIR_ENV = "NITROLESION_KEY_DIR"
# Only the owner may enter the directory or read the key (as OpenSSH demands for its keys).
DIR_MODE = 0o700
FILE_MODE = 0o600
# Any group/other permission bit on the key file is refused.
FORBIDDEN_FILE_BITS = 0o077
# Group/other write on a private folder (or a file written into one) is refused.
FORBIDDEN_WRITE_BITS = 0o022
# An RSA-8192 PKCS#8 PEM is about 6.4 KB; a bigger file is not our key, so stop reading.
MAX_KEY_FILE = 64 * 1024
# O_EXCL collisions on a 64-bit random name mean someone is planting names; give up soon.
TEMP_ATTEMPTS = 8


def default_key_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Return $NITROLESION_KEY_DIR if set and non-empty, else ~/.config/nitrolesion.

    ``environ`` defaults to os.environ. Raises nothing.
    """
    env = os.environ if environ is None else environ
    value = env.get(KEY_DIR_ENV)
    if value:
        return Path(value).expanduser()
    return Path.home() / ".config" / "nitrolesion"


def check_private_folder(path: Path) -> None:
    """Raise CryptoError unless ``path`` is a private folder of the effective user.

    Private means: exists, is a directory and not a symlink to one (checked with lstat),
    is owned by ``os.geteuid()``, and has neither the group- nor the other-write bit. The
    one-line message names the folder, what is wrong and the command that fixes it
    (``chown``/``chmod``). Changes nothing on disk.
    """
    os.close(_open_private_folder(Path(path), "folder"))


def ensure_private_folder(path: Path) -> None:
    """Create ``path`` (mode 0700, parents as needed) if missing, then check it.

    An existing folder is never chmod-ed or chown-ed: a loose one is refused with the
    same CryptoError as ``check_private_folder``, so the owner decides how to fix it.
    """
    _close_quietly(_ensure_private_folder(Path(path), "folder"))


def write_private_file(folder: Path, name: str, data: bytes, mode: int = FILE_MODE) -> Path:
    """Atomically replace ``folder/name`` with ``data`` and return that path.

    ``folder`` must pass ``check_private_folder`` (it is not created). ``data`` goes into
    a fresh temporary file in ``folder`` (O_CREAT|O_EXCL|O_NOFOLLOW, then fchmod ``mode``
    so the umask cannot change it), is fsync-ed, and is ``os.replace``-d onto ``name``;
    the folder is then fsync-ed. Readers see the old file or the complete new one. If
    ``name`` is a symlink, the link itself is replaced, never written through.

    Raises TypeError if ``data`` is not bytes-like; ValueError if ``name`` is not a single
    plain file name or ``mode`` is outside 0o777 or grants group/other write; CryptoError
    if the folder is refused or any filesystem step fails. On failure the temporary file
    is removed and ``folder/name`` is unchanged.
    """
    _check_file_name(name)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        # Checked before anything is created; a str would need an encoding we cannot guess.
        raise TypeError(f"data must be bytes, not {type(data).__name__}")
    if mode & ~0o777 or mode & FORBIDDEN_WRITE_BITS:
        raise ValueError(f"mode {mode:04o} is not a private file mode (no group/other write)")
    folder = Path(folder)
    target = folder / name
    dir_fd = _open_private_folder(folder, "folder")
    try:
        tmp = _write_temp(dir_fd, name, data, mode, target)
        try:
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException as exc:
            _unlink_quietly(tmp, dir_fd)
            if isinstance(exc, OSError):
                raise CryptoError(f"cannot write {_s(target)}: {exc.strerror}") from exc
            raise
        _fsync_quietly(dir_fd)
    finally:
        os.close(dir_fd)
    return target


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
        """The key folder, as given."""
        return self._directory

    @property
    def path(self) -> Path:
        """The key file: ``directory / KEY_FILENAME``."""
        return self._directory / KEY_FILENAME

    def load_or_create(self) -> RsaKey:
        """Return the stored private key, creating and storing a new one if there is none.

        Raises CryptoError (one line: what is wrong and the ``chmod``/``chown`` fix) if the
        key folder is a symlink, not a directory, not owned by the effective user or
        writable by group/others; if the key file is a symlink, not a regular file, not
        owned by the effective user or has any group/other permission bit (``chmod 600``);
        if it is not an RSA private key of at least RSA_BITS; or if the folder or file
        cannot be created or read. A refused folder is left exactly as it was.
        """
        dir_fd = _ensure_private_folder(self._directory, "key folder")
        try:
            existing = self._load_existing(dir_fd)
            if existing is not None:
                return existing
            key = self._generate()
            if not isinstance(key, RsaKey) or not key.has_private():
                raise CryptoError("key generator did not return an RSA private key")
            if self._install(dir_fd, key.export_key(format="PEM", pkcs=8)):
                return key
            # Another process created the file between our check and our link: use its
            # key, so both processes end up with the same identity.
            winner = self._load_existing(dir_fd)
            if winner is None:
                raise CryptoError(f"{_s(self.path)} vanished while being created")
            return winner
        finally:
            os.close(dir_fd)

    def _load_existing(self, dir_fd: int) -> RsaKey | None:
        path = self.path
        try:
            # O_NOFOLLOW: do not follow a symlink planted in place of the key. O_NONBLOCK:
            # a FIFO there must be refused below, not hang the open.
            fd = os.open(
                KEY_FILENAME,
                os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                dir_fd=dir_fd,
            )
        except FileNotFoundError:
            return None
        except OSError as exc:
            if _is_symlink(KEY_FILENAME, dir_fd):
                raise CryptoError(
                    f"key file {_s(path)} is a symbolic link; refusing to follow it. Fix with: "
                    f"mv \"$(readlink -f {_q(path)})\" {_q(path)}"
                ) from None
            raise CryptoError(f"cannot open key file {_s(path)}: {exc.strerror}") from exc
        try:
            # fstat the open descriptor, not the path, so the checked file is the read one.
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise CryptoError(f"key file {_s(path)} is not a regular file")
            _refuse_foreign_owner(info, "key file", path)
            mode = stat.S_IMODE(info.st_mode)
            if mode & FORBIDDEN_FILE_BITS:
                raise CryptoError(
                    f"key file {_s(path)} has permissions {mode:04o}, which let group or others "
                    f"{_access_words(mode)} it; refusing to use it. "
                    f"Fix with: chmod 600 {_q(path)}"
                )
            if info.st_size > MAX_KEY_FILE:
                raise CryptoError(f"key file {_s(path)} is {info.st_size} bytes; not an RSA key")
            data = _read_all(fd, MAX_KEY_FILE)
        except OSError as exc:
            raise CryptoError(f"cannot read key file {_s(path)}: {exc.strerror}") from exc
        finally:
            os.close(fd)
        try:
            key = RSA.import_key(data)
        except (ValueError, IndexError, TypeError):
            # No chaining: parser messages could quote parts of the file.
            raise CryptoError(
                f"key file {_s(path)} does not hold a valid RSA private key"
            ) from None
        if not key.has_private():
            raise CryptoError(f"key file {_s(path)} holds a public key, expected a private key")
        if key.size_in_bits() < RSA_BITS:
            raise CryptoError(
                f"key file {_s(path)} holds RSA-{key.size_in_bits()}; at least RSA-{RSA_BITS} "
                "is required"
            )
        return key

    def _install(self, dir_fd: int, pem: bytes) -> bool:
        """Write ``pem`` to a private temp file and link it into place.

        Returns False if the key file already exists (another writer won). Raises
        CryptoError on any other filesystem error.
        """
        tmp = _write_temp(dir_fd, KEY_FILENAME, pem, FILE_MODE, self.path)
        try:
            os.link(tmp, KEY_FILENAME, src_dir_fd=dir_fd, dst_dir_fd=dir_fd,
                    follow_symlinks=False)
        except FileExistsError:
            return False
        except OSError as exc:
            raise CryptoError(f"cannot write key file {_s(self.path)}: {exc.strerror}") from exc
        finally:
            _unlink_quietly(tmp, dir_fd)
        _fsync_quietly(dir_fd)
        return True


def _ensure_private_folder(directory: Path, what: str) -> int:
    """Create ``directory`` (0700) if missing; return an fd to it once it passes checks."""
    created = False
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        try:
            directory.mkdir(mode=DIR_MODE)
            created = True
        except FileExistsError:
            pass
    except OSError as exc:
        raise CryptoError(f"cannot create {what} {_s(directory)}: {exc.strerror}") from exc
    fd = _open_private_folder(directory, what)
    if created:
        try:
            # mkdir's mode is filtered by the umask; set it exactly, on the checked fd.
            os.fchmod(fd, DIR_MODE)
        except OSError as exc:
            os.close(fd)
            raise CryptoError(f"cannot chmod {what} {_s(directory)}: {exc.strerror}") from exc
    return fd


def _open_private_folder(directory: Path, what: str) -> int:
    """Check ``directory`` and return an O_DIRECTORY fd to it; CryptoError if refused."""
    try:
        before = os.lstat(directory)
    except FileNotFoundError:
        raise CryptoError(f"{what} {_s(directory)} does not exist") from None
    except OSError as exc:
        raise CryptoError(f"cannot inspect {what} {_s(directory)}: {exc.strerror}") from exc
    if stat.S_ISLNK(before.st_mode):
        raise CryptoError(
            f"{what} {_s(directory)} is a symbolic link; refusing to follow it. Fix with: "
            f"use the folder it points to, $(readlink -f {_q(directory)}), instead"
        )
    if not stat.S_ISDIR(before.st_mode):
        raise CryptoError(f"{what} {_s(directory)} exists but is not a directory")
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise CryptoError(f"cannot open {what} {_s(directory)}: {exc.strerror}") from exc
    try:
        info = os.fstat(fd)
        # The path could have been swapped between lstat and open: insist on one inode.
        if (info.st_dev, info.st_ino) != (before.st_dev, before.st_ino):
            raise CryptoError(f"{what} {_s(directory)} changed while being checked; try again")
        _refuse_foreign_owner(info, what, directory)
        mode = stat.S_IMODE(info.st_mode)
        if mode & FORBIDDEN_WRITE_BITS:
            raise CryptoError(
                f"{what} {_s(directory)} has permissions {mode:04o}, which let group or others "
                f"write to it; refusing to use it. Fix with: chmod go-w {_q(directory)}"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def _refuse_foreign_owner(info: os.stat_result, what: str, path: Path) -> None:
    euid = os.geteuid()
    if info.st_uid != euid:
        me = _user_name(euid)
        raise CryptoError(
            f"{what} {_s(path)} is owned by {_user_label(info.st_uid)}, not by you, "
            f"{_user_label(euid)}; refusing to use it. Fix with: chown {me} {_q(path)}"
        )


def _write_temp(dir_fd: int, name: str, data: bytes, mode: int, target: Path) -> str:
    """Write ``data`` to a new fsync-ed temp file in ``dir_fd``; return its name.

    Only ever creates a new file (O_EXCL|O_NOFOLLOW): an existing entry at the chosen
    name, symlink or not, is left alone and another random name is tried. On failure the
    temp file is removed and CryptoError is raised.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(TEMP_ATTEMPTS):
        tmp = _temp_name(name)
        try:
            fd = os.open(tmp, flags, mode, dir_fd=dir_fd)
        except FileExistsError:
            continue
        except OSError as exc:
            raise CryptoError(f"cannot write {_s(target)}: {exc.strerror}") from exc
        break
    else:
        raise CryptoError(
            f"cannot write {_s(target)}: {TEMP_ATTEMPTS} temporary names were already taken"
        )
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have narrowed it; make it exact
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            # Durable before it becomes visible under the real name.
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException as exc:
        # Only this file, which we created, is removed: nothing half-written remains.
        _unlink_quietly(tmp, dir_fd)
        if isinstance(exc, OSError):
            raise CryptoError(f"cannot write {_s(target)}: {exc.strerror}") from exc
        raise
    return tmp


def _temp_name(name: str) -> str:
    # Hidden, per-process and unguessable; patched in tests to plant a file at this name.
    return f".{name}.{os.getpid()}.{secrets.token_hex(8)}.tmp"


def _check_file_name(name: str) -> None:
    if not isinstance(name, str):
        raise ValueError(f"file name must be a str, not {type(name).__name__}")
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"{name!r} is not a plain file name")


def _is_symlink(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _access_words(mode: int) -> str:
    readable = bool(mode & 0o044)
    writable = bool(mode & 0o022)
    if readable and writable:
        return "read and write"
    if writable:
        return "write"
    if readable:
        return "read"
    return "execute"


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _user_label(uid: int) -> str:
    name = _user_name(uid)
    return f"uid {uid}" if name == str(uid) else f"{name} (uid {uid})"


def _s(path: Path | str) -> str:
    # Escape control characters (a newline in a path) so every message stays on one line.
    text = str(path)
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text


def _q(path: Path | str) -> str:
    # The path as a copy-pastable shell word, for the "Fix with:" commands.
    return shlex.quote(_s(path))


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


def _unlink_quietly(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _fsync_quietly(dir_fd: int) -> None:
    # Make the new directory entry durable; best effort where directories cannot fsync.
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
