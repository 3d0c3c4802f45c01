"""One memory budget for the enclave: bytes held for work in flight, across all connections.

The enclave's memory is fixed when it starts (``nitro-cli run-enclave --memory``) and it has
no swap: past it, the kernel kills the process. Two things grow with what peers send:

* frames being received and the copies made while opening them (body, decrypted payload,
  image bytes): charged ``FRAME_COPIES`` x the declared length, reserved from the 12-byte
  header *before* the body is read, and held until the request is answered;
* decoded pixels: charged the bytes the image decodes to (16-bit and multi-channel images
  count for what they are), reserved before decoding.

Beyond the budget a request is answered at once (BUSY, or BAD_IMAGE when one image alone
could never fit) instead of being buffered. ``budget_for_enclave_memory`` derives the
budget from the ``--memory`` figure the README recommends, so the two cannot drift apart.
"""

from __future__ import annotations

import threading

from nitrolesion.errors import UsageError

__all__ = [
    "BASELINE_RSS_MIB",
    "FRAME_COPIES",
    "MIB",
    "RECOMMENDED_ENCLAVE_MIB",
    "SYSTEM_MIB",
    "MemoryBudget",
    "Reservation",
    "budget_for_enclave_memory",
]

MIB = 1024 * 1024
#: What the README tells users to pass to ``nitro-cli run-enclave --memory``.
RECOMMENDED_ENCLAVE_MIB = 768
#: Enclave memory that is not the process's to spend: the unpacked root file system lives
#: in RAM (~315 MiB for python:3.11-slim with our packages) and the kernel takes ~64 MiB
#: (both measured by bench/pipeline.py, see README "Performance").
SYSTEM_MIB = 315 + 64
#: The enclave process at rest with 2 workers: Python, the model, two interpreters
#: (125 MiB at start and 142 MiB peak in the 2-minute soak; rounded up; with the triage, 135
#: MiB ready and 145-150 MiB peak for 1-4 workers, bench/worker_memory.py 2026-12-03 16:05).
BASELINE_RSS_MIB = 150
#: Share of what is left that requests may hold; the rest absorbs what is not charged
#: (allocator slack, interpreter scratch, per-connection threads).
SPENDABLE_SHARE = 0.75
#: Copies of a frame's body alive while one request is opened: the body, the decrypted
#: plaintext, and the image bytes decoded from it.
FRAME_COPIES = 3


def budget_for_enclave_memory(memory_mib: int = RECOMMENDED_ENCLAVE_MIB) -> int:
    """Bytes requests may hold in an enclave started with ``--memory memory_mib``.

    Raises UsageError if that memory cannot even hold the system and the idle process.
    """
    spare = memory_mib - SYSTEM_MIB - BASELINE_RSS_MIB
    if spare <= 0:
        raise UsageError(f"--memory {memory_mib} MiB cannot hold the root file system and kernel "
                         f"({SYSTEM_MIB} MiB) and the idle enclave ({BASELINE_RSS_MIB} MiB)")
    return int(spare * SPENDABLE_SHARE * MIB)


class Reservation:
    """Bytes taken from a budget; ``release()`` gives them back (once, idempotent)."""

    __slots__ = ("_budget", "amount")

    def __init__(self, budget: "MemoryBudget", amount: int) -> None:
        self._budget = budget
        self.amount = amount

    def release(self) -> None:
        budget, self._budget = self._budget, None
        if budget is not None:
            budget._give_back(self.amount)

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class MemoryBudget:
    """A thread-safe count of bytes reserved against a limit; never blocks."""

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError("a memory budget must be positive")
        self.limit = int(limit)
        self._used = 0
        self._peak = 0
        self._refused = 0
        self._lock = threading.Lock()

    def try_reserve(self, amount: int) -> Reservation | None:
        """A reservation of ``amount`` bytes, or None if it does not fit right now."""
        amount = max(0, int(amount))
        with self._lock:
            if self._used + amount > self.limit:
                self._refused += 1
                return None
            self._used += amount
            self._peak = max(self._peak, self._used)
        return Reservation(self, amount)

    def _give_back(self, amount: int) -> None:
        with self._lock:
            self._used -= amount

    @property
    def used(self) -> int:
        return self._used

    @property
    def peak(self) -> int:
        """The most bytes reserved at once since start."""
        return self._peak

    @property
    def refused(self) -> int:
        """How many reservations did not fit."""
        return self._refused
