"""Reading image files on the parent: only regular files, never more than the enclave takes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from harness import PARENT_CLI, tcp_env
from parent.images import ImageFileError, read_image_file


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


def test_regular_file_up_to_the_limit_is_read(tmp_path):
    path = tmp_path / "ok.jpg"
    path.write_bytes(b"x" * 100)
    assert read_image_file(path, max_bytes=100) == b"x" * 100


def test_file_over_the_limit_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "big.jpg"
    path.write_bytes(b"x" * 101)
    with pytest.raises(ImageFileError, match="101 bytes; the enclave accepts images up to 100") as caught:
        read_image_file(path, max_bytes=100)
    assert caught.value.code == "TOO_LARGE"


def test_fifo_is_refused_instead_of_blocking(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    error = read_within(fifo)["error"]  # opening it would wait for a writer forever
    assert error.code == "UNREADABLE" and "not a regular file" in str(error)


def test_character_device_is_refused_instead_of_filling_memory():
    error = read_within("/dev/zero")["error"]
    assert error.code == "UNREADABLE" and "not a regular file" in str(error)


def test_missing_file_names_the_reason(tmp_path):
    with pytest.raises(ImageFileError, match="No such file") as caught:
        read_image_file(tmp_path / "absent.jpg")
    assert caught.value.code == "UNREADABLE"


def test_client_refuses_an_oversized_image_before_connecting(tmp_path):
    big = tmp_path / "big.jpg"
    with open(big, "wb") as handle:
        handle.truncate(21 * 1024 * 1024)  # sparse: over the 20 MiB limit, no disk used
    run = subprocess.run([sys.executable, str(PARENT_CLI), "client", "16", "5005", "--image",
                          str(big)], env=tcp_env(tmp_path / "keys"), capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2
    assert "the enclave accepts images up to 20971520 bytes" in run.stderr
    assert not (tmp_path / "keys").exists()  # refused before any key or connection
