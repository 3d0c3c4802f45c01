"""Reading image files on the parent: folder entries must be regular files, a named pipe is
read as a stream, and nothing past what one message can carry is read."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from harness import PARENT_CLI, tcp_env
from nitrolesion.wire.frames import MAX_BODY
from nitrolesion.wire.messages import MAX_IMAGE_IN_MESSAGE
from nitrolesion.errors import ImageFileError
from nitrolesion.parent.images import read_image_file


def read_within(path, seconds=10.0, **kwargs):
    """read_image_file in a daemon thread, so a regression that blocks fails instead of hanging."""
    outcome = {}

    def run():
        try:
            outcome["data"] = read_image_file(path, **kwargs)
        except ImageFileError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"reading {path} blocked"
    return outcome


def feed_fifo(fifo, data: bytes) -> threading.Thread:
    """A FIFO at ``fifo`` with a thread writing ``data`` into it (join the thread after)."""
    os.mkfifo(fifo)

    def write():
        with open(fifo, "wb") as handle:
            handle.write(data)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    return writer


def test_regular_file_up_to_the_limit_is_read(tmp_path):
    path = tmp_path / "ok.jpg"
    path.write_bytes(b"x" * 100)
    assert read_image_file(path, max_bytes=100) == b"x" * 100


def test_file_over_the_limit_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "big.jpg"
    path.write_bytes(b"x" * 101)
    with pytest.raises(ImageFileError, match="101 bytes; at most 100 bytes fit") as caught:
        read_image_file(path, max_bytes=100)
    assert caught.value.code == "TOO_LARGE"


def test_fifo_in_a_folder_is_refused_instead_of_blocking(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    error = read_within(fifo)["error"]  # opening it would wait for a writer forever
    assert error.code == "UNREADABLE" and "not a regular file" in str(error)


def test_character_device_in_a_folder_is_refused():
    error = read_within("/dev/zero")["error"]
    assert error.code == "UNREADABLE" and "not a regular file" in str(error)


def test_a_named_pipe_is_read_like_process_substitution(tmp_path):
    """`--image <(curl ...)` names a pipe: read it, up to the limit."""
    fifo = tmp_path / "stream"
    payload = os.urandom(300_000)  # more than one pipe buffer, so the read must loop
    writer = feed_fifo(fifo, payload)
    assert read_within(fifo, named=True)["data"] == payload
    writer.join(10)


def test_a_named_device_is_read_only_up_to_the_limit():
    error = read_within("/dev/zero", named=True, max_bytes=1000)["error"]
    assert error.code == "TOO_LARGE" and "more than 1000 bytes" in str(error)


def test_missing_file_names_the_reason(tmp_path):
    with pytest.raises(ImageFileError, match="No such file") as caught:
        read_image_file(tmp_path / "absent.jpg")
    assert caught.value.code == "UNREADABLE"


def test_the_default_limit_is_what_one_frame_can_carry():
    """An image of MAX_IMAGE_IN_MESSAGE bytes, sealed either way the parent sends images,
    must still fit in a frame, or the check would let through files that abort a batch
    (as a 25 MiB file once did)."""
    import cbor2

    from nitrolesion.crypto.envelope import (generate_keypair, new_request_id, public_key_der,
                                             seal, sealed_request_aad)
    from nitrolesion.crypto.session import SessionCipher, SessionKeys, new_session_id
    from nitrolesion.wire.frames import MessageType
    from nitrolesion.wire.messages import ImagePayload, SealedRequest, SessionClassify

    image = bytes(MAX_IMAGE_IN_MESSAGE)
    key = generate_keypair()
    parent_der, request_id = public_key_der(key), new_request_id()
    sealed = seal(key, image, sealed_request_aad(request_id, parent_der, bytes(32)))
    one_shot = SealedRequest(request_id, parent_der, sealed.wrapped_key, sealed.nonce,
                             sealed.ciphertext).to_body()
    cipher = SessionCipher(SessionKeys(bytes(32), bytes(32), bytes(32)), new_session_id(), "client")
    counter, ciphertext = cipher.seal(MessageType.SESSION_CLASSIFY, ImagePayload(image).encode())
    in_session = SessionClassify(counter, ciphertext).to_body()
    for body in (one_shot, in_session):
        assert MAX_IMAGE_IN_MESSAGE < len(body) <= MAX_BODY


def test_client_refuses_an_oversized_image_before_connecting(tmp_path):
    big = tmp_path / "big.jpg"
    with open(big, "wb") as handle:
        handle.truncate(MAX_IMAGE_IN_MESSAGE + 1)  # sparse: no disk used
    run = subprocess.run([sys.executable, str(PARENT_CLI), "client", "16", "5005", "--image",
                          str(big)], env=tcp_env(tmp_path / "keys"), capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2
    assert f"at most {MAX_IMAGE_IN_MESSAGE} bytes fit in one message" in run.stderr
    assert not (tmp_path / "keys").exists()  # refused before any key or connection


def test_demo_classifies_an_image_given_as_a_pipe(tmp_path, test_image_paths):
    fifo = tmp_path / "image"
    image = test_image_paths[0].read_bytes()
    writer = feed_fifo(fifo, image)
    run = subprocess.run([sys.executable, str(PARENT_CLI), "demo", "--image", str(fifo)],
                         env=tcp_env(), capture_output=True, text=True, timeout=180)
    writer.join(10)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "Classification received:" in run.stdout
    assert f"({len(image)} bytes)" in run.stdout  # the whole image came through the pipe
