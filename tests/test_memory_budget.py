"""One memory budget for the enclave (security review, finding 4).

The attacks come from tests/memory_attacks.py (scripts/robustness_report.py runs them at
the review's full sizes); here they run smaller but still far beyond what the enclave's
memory could hold without the budget: 20 unfinished 24 MiB frames alone are 480 MiB of
buffers, one 40-megapixel 16-bit PNG took ~1 GiB to decode.
"""

from __future__ import annotations

import time

import pytest

import memory_attacks as attacks
from nitrolesion.errors import UsageError
from nitrolesion.memory_budget import (
    MIB, RECOMMENDED_ENCLAVE_MIB, MemoryBudget, budget_for_enclave_memory)


def test_budget_reserves_refuses_and_releases_once():
    budget = MemoryBudget(100)
    first = budget.try_reserve(60)
    assert first is not None and budget.used == 60
    assert budget.try_reserve(41) is None and budget.refused == 1
    with budget.try_reserve(40) as second:
        assert second.amount == 40 and budget.used == 100
    assert budget.used == 60
    first.release()
    first.release()  # idempotent: a double release must not mint memory
    assert budget.used == 0 and budget.peak == 100


def test_budget_follows_the_recommended_enclave_memory():
    default = budget_for_enclave_memory()
    assert default == budget_for_enclave_memory(RECOMMENDED_ENCLAVE_MIB)
    assert 128 * MIB < default < 256 * MIB
    assert budget_for_enclave_memory(1024) > default
    with pytest.raises(UsageError, match="cannot hold the root file system"):
        budget_for_enclave_memory(512)


@pytest.fixture(scope="module")
def attack_stack(tmp_path_factory, model_present):
    stack = attacks.new_attack_stack(tmp_path_factory.mktemp("memory"))
    yield stack
    stack.stop(wait=False)


def check(result: attacks.AttackResult) -> None:
    assert result.peak_rss_mib < attacks.PROCESS_LIMIT_MIB, result.line()
    assert result.legit_served == result.legit_total, result.line()


def test_unfinished_large_frames_are_refused_from_their_header(attack_stack):
    result = attacks.partial_frames(attack_stack, connections=20)
    check(result)
    # Two 24 MiB frames fit the 179 MiB budget (3 copies each); the rest are refused at once.
    assert result.answers["BUSY"] >= 17, result.line()


def test_images_declaring_40_megapixels_are_refused_before_decoding(attack_stack):
    result = attacks.pixel_bombs(attack_stack, images=8)
    check(result)
    assert result.answers == {"BAD_IMAGE": 8}, result.line()


def test_silent_connections_do_not_lock_legitimate_clients_out(attack_stack):
    result = attacks.silent_after_hello(attack_stack, connections=64, legit=4)
    check(result)
    assert result.answers["TIMEOUT"] >= 1, result.line()  # an idle one was closed to make room


def test_big_frame_before_hello_is_refused_from_its_header(attack_stack):
    import socket

    from nitrolesion.wire.frames import HEADER, MAGIC, PROTOCOL_VERSION, FrameDecoder, MessageType
    from nitrolesion.wire.messages import decode_message

    with socket.create_connection(("127.0.0.1", attack_stack.client_port), timeout=10) as sock:
        sock.sendall(HEADER.pack(MAGIC, PROTOCOL_VERSION, MessageType.SEALED_REQUEST, 20 * MIB))
        decoder = FrameDecoder()
        while (frame := decoder.next_frame()) is None:
            decoder.feed(sock.recv(4096))
    error = decode_message(frame)
    assert error.code == "BAD_FRAME"
    assert "20971520 bytes is not allowed in state idle" in error.message


def test_memory_of_frames_that_never_complete_is_given_back(attack_stack):
    """Connections that start a large frame and then vanish or time out must not keep their
    reservation: afterwards the whole budget serves a large image again."""
    import socket

    from nitrolesion.wire.frames import HEADER, MAGIC, PROTOCOL_VERSION, MessageType

    for _ in range(6):  # 6 x 3 x 24 MiB would exceed the budget three times over if leaked
        sock, _decoder = attacks._attested_socket(attack_stack)
        sock.sendall(HEADER.pack(MAGIC, PROTOCOL_VERSION, MessageType.SEALED_REQUEST, 24 * MIB))
        sock.sendall(bytes(MIB))
        sock.close()  # gone mid-frame
    time.sleep(0.5)  # the enclave sees each EOF within milliseconds; 0.5 s is ample margin
    result = attacks.partial_frames(attack_stack, connections=2)
    assert result.answers == {"NO_ANSWER": 2}, result.line()  # both admitted: nothing leaked
