"""Parent key store: permissions, reuse, refusal of loose files, two-process creation race."""

from __future__ import annotations

import multiprocessing
import os
import stat

import pytest

from nitrolesion.crypto.envelope import generate_keypair
from nitrolesion.crypto.keystore import KEY_FILENAME, ParentKeyStore, default_key_dir
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


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
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
    with pytest.raises(CryptoError, match="cannot open key file"):
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
