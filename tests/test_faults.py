"""Faults with real processes: enclave SIGKILL, parent server restart, vanishing clients.

Each scenario builds its own stack (tests/hostile_cases.py FAULTS, shared with
scripts/robustness_report.py) and returns an Outcome once it has checked the recovery:
a new enclave key taken by the same parent server, a re-announce with backoff to a new
server, slots freed after clients vanish.
"""

from __future__ import annotations

import pytest

from hostile_cases import FAULTS, LesionModel


@pytest.fixture(scope="module")
def model(model_present):
    return LesionModel()


@pytest.mark.parametrize("fault", FAULTS, ids=lambda fault: fault.name)
def test_fault(tmp_path, model, fault):
    outcome = fault.run(tmp_path, model)
    assert outcome.code in fault.codes, f"{fault.name}: {outcome}"
    if fault.name == "enclave_sigkill_mid_request":
        # the client's error came at once, not at its 5 s timeout
        assert outcome.seconds < 5.0, outcome
