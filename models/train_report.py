"""What a training run tells people: timestamped progress lines and the short metric form
that the log and models/training_report.json show.

Part of models/train.py (see its docstring for the recipe); imports no TensorFlow.
"""

from __future__ import annotations

import time

#: The figures the log and the report keep of a metrics dict from ``summarize``.
PICK = ("accuracy", "balanced_accuracy", "macro_roc_auc", "top3_accuracy")


def log(message: str) -> None:
    """Print ``message`` after the wall-clock time; flushed, so a long run can be followed."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def brief(metrics: dict) -> dict:
    """The :data:`PICK` figures of ``metrics``, rounded to 4 places."""
    return {k: round(metrics[k], 4) for k in PICK}
