"""Parent key store and private files: permissions, ownership, symlinks, temp files, races."""

from __future__ import annotations

import multiprocessing
import os
import stat

import pytest

from nitrolesion.crypto.envelope import generate_keypair
from nitrolesion.crypto import keystore
from nitrolesion.crypto.keystore import (
    KEY_FILENAME,
    ParentKeyStore,
    check_private_folder,
    default_key_dir,
    ensure_private_folder,
    write_private_file,
)
from nitrolesion.errors import CryptoError


@pytest.fixture(scope="module")
def keys():
    # Two distinct real RSA-3072 keys, generated once; injected so tests skip keygen.
    return generate_keypair(), generate_keypair()


def store_with(directory, key):
    return ParentKeyStore(directory, generate=lambda: key)


def mode_of(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_creates_0600_file_in_0700_dir(tmp_path, keys):
    directory = tmp_path / "nested" / "keys"
    old_umask = os.umask(0o022)
    try:
        key = store_with(directory, keys[0]).load_or_create()
    finally:
        os.umask(old_umask)
    assert key.n == keys[0].n and key.has_private()
    assert mode_of(directory) == 0o700
    assert mode_of(directory / KEY_FILENAME) == 0o600
    assert sorted(os.listdir(directory)) == [KEY_FILENAME]  # no temp files left behind
    assert (directory / KEY_FILENAME).read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_reuses_the_same_key(tmp_path, keys):
    first = store_with(tmp_path / "k", keys[0]).load_or_create()

    def must_not_generate():
        raise AssertionError("a second key was generated")

    second = ParentKeyStore(tmp_path / "k", generate=must_not_generate).load_or_create()
    assert first.n == second.n and first.d == second.d


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660], ids=oct)
def test_refuses_group_or_other_readable_file(tmp_path, keys, mode):
    store = store_with(tmp_path / "k", keys[0])
    store.load_or_create()
    os.chmod(store.path, mode)
    with pytest.raises(CryptoError) as info:
        store.load_or_create()
    message = str(info.value)
    assert str(store.path) in message and "chmod 600" in message
    assert f"{mode:04o}" in message


def test_refuses_junk_and_never_echoes_file_content(tmp_path, keys):
    store = store_with(tmp_path / "k", keys[0])
    store.directory.mkdir(mode=0o700)
    secret = b"SECRET-MATERIAL-do-not-print"
    fd = os.open(store.path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, secret)
    os.close(fd)
    with pytest.raises(CryptoError, match="does not hold a valid RSA private key") as info:
        store.load_or_create()
    assert "SECRET" not in str(info.value) and info.value.__cause__ is None


def test_refuses_symlink_in_place_of_key(tmp_path, keys):
    real = store_with(tmp_path / "real", keys[0])
    real.load_or_create()
    store = store_with(tmp_path / "k", keys[1])
    store.directory.mkdir(mode=0o700)
    os.symlink(real.path, store.path)
    with pytest.raises(CryptoError, match="is a symbolic link; refusing to follow it"):
        store.load_or_create()


def test_lost_race_uses_the_winners_key(tmp_path, keys):
    # Deterministic version of the race: the "other process" installs its key while we
    # are generating ours, so our link must fail and we must load theirs.
    winner = store_with(tmp_path / "k", keys[0])

    def generate_while_other_process_wins():
        winner.load_or_create()
        return keys[1]

    loser = ParentKeyStore(tmp_path / "k", generate=generate_while_other_process_wins)
    key = loser.load_or_create()
    assert key.n == keys[0].n
    assert sorted(os.listdir(tmp_path / "k")) == [KEY_FILENAME]


def _create_in_child(directory, pem, barrier, results):
    from Crypto.PublicKey import RSA

    def generate():
        # Both processes have now seen "no key file"; release them together so both
        # try to install their own key at the same moment.
        barrier.wait(timeout=30)
        return RSA.import_key(pem)

    key = ParentKeyStore(directory, generate=generate).load_or_create()
    results.put(key.n)


def test_two_processes_racing_end_with_one_key(tmp_path, keys):
    directory = tmp_path / "race"
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_create_in_child, args=(directory, k.export_key(), barrier, results))
        for k in keys
    ]
    for proc in procs:
        proc.start()
    moduli = [results.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0
    assert moduli[0] == moduli[1]
    assert moduli[0] in (keys[0].n, keys[1].n)
    on_disk = ParentKeyStore(directory, generate=lambda: None).load_or_create()
    assert on_disk.n == moduli[0]
    assert sorted(os.listdir(directory)) == [KEY_FILENAME]


def test_default_key_dir(monkeypatch, tmp_path):
    assert default_key_dir({"NITROLESION_KEY_DIR": str(tmp_path)}) == tmp_path
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_key_dir({}) == tmp_path / ".config" / "nitrolesion"
    assert default_key_dir({"NITROLESION_KEY_DIR": ""}) == tmp_path / ".config" / "nitrolesion"


# --- private folders and files (security review: ownership, write bits, symlinks, temps) ---

FOREIGN_UID = 1234
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="chown to another uid (1234) needs root; CI runs as root"
)


def refusal(call, *fragments):
    """Run ``call``, expect a one-line CryptoError containing every fragment; return it."""
    with pytest.raises(CryptoError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def snapshot(directory):
    """Everything a refusal must leave alone: the folder's and each entry's metadata and bytes."""
    def entry(path):
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode):
            body = ("link", os.readlink(path))
        elif stat.S_ISREG(info.st_mode):
            body = ("file", path.read_bytes())
        else:
            body = ("other",)
        return (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid, info.st_mtime_ns, body)

    return entry(directory), {p.name: entry(p) for p in sorted(directory.iterdir())}


def private_folder(path, mode=0o700):
    path.mkdir()
    os.chmod(path, mode)
    return path


def test_check_private_folder_accepts_own_non_writable_folders(tmp_path):
    for mode in (0o700, 0o750, 0o755, 0o500):
        folder = tmp_path / f"ok{mode:o}"
        private_folder(folder, mode)
        check_private_folder(folder)


@needs_root
def test_refuses_folder_owned_by_another_user(tmp_path, keys):
    store = store_with(private_folder(tmp_path / "k"), keys[0])
    os.chown(store.directory, FOREIGN_UID, -1)
    fix = f"chown root {store.directory}"
    refusal(store.load_or_create, "key folder", f"uid {FOREIGN_UID}", fix)
    refusal(lambda: check_private_folder(store.directory), f"uid {FOREIGN_UID}", fix)
    refusal(lambda: write_private_file(store.directory, "state.json", b"{}"), fix)
    assert os.listdir(store.directory) == []


@needs_root
def test_refuses_key_file_owned_by_another_user(tmp_path, keys):
    store = store_with(tmp_path / "k", keys[0])
    store.load_or_create()
    os.chown(store.path, FOREIGN_UID, -1)
    refusal(store.load_or_create, "key file", f"uid {FOREIGN_UID}", f"chown root {store.path}")


@pytest.mark.parametrize("mode", [0o770, 0o720, 0o702, 0o777, 0o1777], ids=oct)
def test_refuses_group_or_world_writable_folder(tmp_path, keys, mode):
    store = store_with(private_folder(tmp_path / "k", mode), keys[0])
    fix = f"chmod go-w {store.directory}"
    refusal(store.load_or_create, "key folder", f"{stat.S_IMODE(mode):04o}", "write", fix)
    refusal(lambda: check_private_folder(store.directory), fix)
    refusal(lambda: ensure_private_folder(store.directory), fix)
    refusal(lambda: write_private_file(store.directory, "x", b"x"), fix)
    assert os.listdir(store.directory) == []
    assert stat.S_IMODE(os.stat(store.directory).st_mode) == mode  # not "fixed" for us


@pytest.mark.parametrize("mode", [0o602, 0o620, 0o666, 0o622], ids=oct)
def test_refuses_group_or_world_writable_key_file(tmp_path, keys, mode):
    store = store_with(tmp_path / "k", keys[0])
    store.load_or_create()
    os.chmod(store.path, mode)
    refusal(store.load_or_create, str(store.path), f"{mode:04o}", "write", "chmod 600")
    assert mode_of(store.path) == mode


def test_refuses_symlinked_key_file_even_dangling(tmp_path, keys):
    # A dangling link must not make us create the key at its target.
    store = store_with(private_folder(tmp_path / "k"), keys[0])
    elsewhere = tmp_path / "elsewhere.pem"
    os.symlink(elsewhere, store.path)
    refusal(store.load_or_create, "key file", "symbolic link")
    assert not elsewhere.exists()
    assert os.readlink(store.path) == str(elsewhere)


def test_refuses_symlinked_key_folder(tmp_path, keys):
    # Decision: the key folder itself may not be a symlink (its ancestors may); the
    # checked inode must be the one written to, so we refuse rather than follow.
    real = store_with(tmp_path / "real", keys[0])
    real.load_or_create()
    link = tmp_path / "link"
    os.symlink(real.directory, link)
    before = snapshot(real.directory)
    refusal(store_with(link, keys[1]).load_or_create, "key folder", "symbolic link", "readlink")
    refusal(lambda: check_private_folder(link), "symbolic link")
    refusal(lambda: write_private_file(link, "x", b"x"), "symbolic link")
    assert snapshot(real.directory) == before


def swap_after_lstat(monkeypatch, path, seen):
    """Simulate a race: lstat(path) reports ``seen``'s metadata, as if the path was
    swapped between the check and the open."""
    real_lstat = os.lstat
    monkeypatch.setattr(
        keystore.os, "lstat", lambda p, **kw: real_lstat(seen if p == path else p, **kw)
    )


def test_folder_swapped_for_a_symlink_after_lstat_is_not_followed(tmp_path, monkeypatch):
    real = private_folder(tmp_path / "real")
    link = tmp_path / "link"
    os.symlink(real, link)
    swap_after_lstat(monkeypatch, link, real)
    refusal(lambda: write_private_file(link, "x", b"x"), "cannot open folder")
    monkeypatch.undo()
    assert os.listdir(real) == []


def test_folder_swapped_after_lstat_is_refused(tmp_path, monkeypatch):
    checked = private_folder(tmp_path / "checked")
    other = private_folder(tmp_path / "other")
    swap_after_lstat(monkeypatch, other, checked)
    refusal(lambda: write_private_file(other, "x", b"x"), "changed while being checked")
    monkeypatch.undo()
    assert os.listdir(checked) == [] and os.listdir(other) == []


def test_symlinked_ancestor_is_allowed(tmp_path, keys):
    # Only the last component is checked: ~/.config may be a symlink.
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "config")
    key = store_with(tmp_path / "config" / "nitrolesion", keys[0]).load_or_create()
    assert key.n == keys[0].n
    assert mode_of(tmp_path / "real" / "nitrolesion" / KEY_FILENAME) == 0o600


@pytest.mark.parametrize(
    "spoil",
    [
        pytest.param(lambda d: os.chmod(d, 0o777), id="world-writable"),
        pytest.param(lambda d: os.chmod(d, 0o770), id="group-writable"),
        pytest.param(lambda d: os.chown(d, FOREIGN_UID, -1), id="foreign-owner",
                     marks=needs_root),
    ],
)
def test_refused_folder_changes_nothing(tmp_path, keys, spoil):
    folder = private_folder(tmp_path / "k")
    (folder / KEY_FILENAME).write_bytes(keys[0].export_key(pkcs=8))
    os.chmod(folder / KEY_FILENAME, 0o644)  # loose too: must not be chmod-ed either
    (folder / "state.json").write_bytes(b"old")
    os.symlink("state.json", folder / "alias")
    spoil(folder)
    before = snapshot(folder)
    store = store_with(folder, keys[1])
    for call in (
        store.load_or_create,
        lambda: check_private_folder(folder),
        lambda: ensure_private_folder(folder),
        lambda: write_private_file(folder, "state.json", b"new"),
        lambda: write_private_file(folder, "fresh", b"new"),
    ):
        refusal(call)
        assert snapshot(folder) == before


def planted_names(monkeypatch, *names):
    """Make the module's temp-name generator hand out ``names`` first, then random ones."""
    queue = list(names)
    real = keystore._temp_name
    monkeypatch.setattr(keystore, "_temp_name", lambda name: queue.pop(0) if queue else real(name))


def test_planted_temp_symlink_is_not_followed_by_write_private_file(tmp_path, monkeypatch):
    folder = private_folder(tmp_path / "state")
    victim = tmp_path / "victim"
    victim.write_bytes(b"victim")
    os.symlink(victim, folder / ".planted")
    planted_names(monkeypatch, ".planted")
    path = write_private_file(folder, "state.json", b"payload")
    assert path == folder / "state.json" and path.read_bytes() == b"payload"
    assert victim.read_bytes() == b"victim"
    assert os.readlink(folder / ".planted") == str(victim)  # someone else's: not deleted
    assert sorted(os.listdir(folder)) == [".planted", "state.json"]


def test_planted_temp_symlink_is_not_followed_by_the_key_store(tmp_path, keys, monkeypatch):
    store = store_with(private_folder(tmp_path / "k"), keys[0])
    victim = tmp_path / "victim"
    victim.write_bytes(b"victim")
    os.symlink(victim, store.directory / ".planted")
    planted_names(monkeypatch, ".planted")
    assert store.load_or_create().n == keys[0].n
    assert victim.read_bytes() == b"victim"
    assert sorted(os.listdir(store.directory)) == [".planted", KEY_FILENAME]


def test_every_temp_name_taken_fails_cleanly(tmp_path, monkeypatch):
    folder = private_folder(tmp_path / "state")
    (folder / "state.json").write_bytes(b"old")
    victim = tmp_path / "victim"
    os.symlink(victim, folder / ".planted")  # dangling: following it would create victim
    monkeypatch.setattr(keystore, "_temp_name", lambda name: ".planted")
    refusal(lambda: write_private_file(folder, "state.json", b"new"), "temporary names")
    assert not victim.exists()
    assert (folder / "state.json").read_bytes() == b"old"
    assert sorted(os.listdir(folder)) == [".planted", "state.json"]


def test_write_private_file_replaces_atomically_with_exact_mode(tmp_path):
    folder = private_folder(tmp_path / "state")
    old_umask = os.umask(0o077)
    try:
        write_private_file(folder, "state.json", b"one")
        path = write_private_file(folder, "state.json", b"two")
        write_private_file(folder, "policy.json", b"{}", mode=0o644)
    finally:
        os.umask(old_umask)
    assert path.read_bytes() == b"two" and mode_of(path) == 0o600
    assert mode_of(folder / "policy.json") == 0o644  # the umask did not narrow it
    assert sorted(os.listdir(folder)) == ["policy.json", "state.json"]


def test_write_private_file_replaces_a_symlink_instead_of_writing_through(tmp_path):
    folder = private_folder(tmp_path / "state")
    victim = tmp_path / "victim"
    victim.write_bytes(b"victim")
    os.symlink(victim, folder / "state.json")
    write_private_file(folder, "state.json", b"mine")
    assert not (folder / "state.json").is_symlink()
    assert (folder / "state.json").read_bytes() == b"mine"
    assert victim.read_bytes() == b"victim"


def test_write_private_file_failure_leaves_nothing_half_written(tmp_path, monkeypatch):
    folder = private_folder(tmp_path / "state")
    (folder / "state.json").write_bytes(b"old")

    def failing_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(keystore.os, "fsync", failing_fsync)
    refusal(lambda: write_private_file(folder, "state.json", b"new"), "Input/output error")
    monkeypatch.undo()
    assert os.listdir(folder) == ["state.json"]
    assert (folder / "state.json").read_bytes() == b"old"


def test_write_private_file_rename_failure_removes_temp(tmp_path):
    folder = private_folder(tmp_path / "state")
    (folder / "sub").mkdir()
    (folder / "sub" / "keep").write_bytes(b"x")
    refusal(lambda: write_private_file(folder, "sub", b"new"), "cannot write")
    assert os.listdir(folder) == ["sub"]


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x", "a\0b"])
def test_write_private_file_rejects_non_plain_names(tmp_path, name):
    folder = private_folder(tmp_path / "state")
    with pytest.raises(ValueError):
        write_private_file(folder, name, b"x")
    assert os.listdir(folder) == []


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o666, 0o4600], ids=oct)
def test_write_private_file_rejects_writable_modes(tmp_path, mode):
    folder = private_folder(tmp_path / "state")
    with pytest.raises(ValueError):
        write_private_file(folder, "x", b"x", mode=mode)
    assert os.listdir(folder) == []


def test_write_private_file_rejects_text_before_creating_anything(tmp_path):
    folder = private_folder(tmp_path / "state")
    with pytest.raises(TypeError):
        write_private_file(folder, "x", "text")
    assert os.listdir(folder) == []


def test_write_private_file_needs_an_existing_folder(tmp_path):
    refusal(lambda: write_private_file(tmp_path / "missing", "x", b"x"), "does not exist")
    assert not (tmp_path / "missing").exists()


def test_ensure_private_folder_creates_0700(tmp_path):
    folder = tmp_path / "a" / "b"
    old_umask = os.umask(0o277)  # would leave the owner without write/exec
    try:
        ensure_private_folder(folder)
    finally:
        os.umask(old_umask)
    assert mode_of(folder) == 0o700
    ensure_private_folder(folder)  # idempotent
    write_private_file(folder, "x", b"x")
