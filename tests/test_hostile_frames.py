"""Hostile frames against the enclave's client port and the parent server's port.

Real processes (tests/harness.py); the cases live in tests/hostile_cases.py, shared with
scripts/robustness_report.py. Each test asserts the precise answer the peer got, then that
the server still serves a normal request (a classification checked against the
in-process classifier, or an announce acknowledged by the parent server).
"""

from __future__ import annotations

import pytest

from hostile_cases import FRAME_CASES, case_id, check_case


@pytest.mark.parametrize("case", FRAME_CASES, ids=case_id)
def test_hostile_frame(hostile, case):
    check_case(hostile, case)


def test_servers_logged_no_traceback(hostile):
    """Every hostile frame was handled on purpose: no handler thread died with a traceback."""
    for proc in (hostile.stack.enclave, hostile.stack.server):
        assert proc.process.poll() is None
        assert "Traceback" not in proc.output, proc.output
