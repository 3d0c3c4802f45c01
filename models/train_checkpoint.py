"""Checkpoints: after every epoch, the network's weights, its optimizer's state and the
caller's own bookkeeping (epoch choice, history) are written to a folder, so a run stopped
midway (a session ending, a machine restarted) continues from the last finished epoch with
``train.py --resume``.

Part of models/train.py (see its docstring for the recipe). Every file is written to a
temporary name and renamed, the state file last: a run killed while writing leaves the
previous epoch's checkpoint whole. Keras is imported by the caller, never here.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

STATE_FILE = "state.json"
MODEL_FILE = "model.weights.h5"
OPTIMIZER_FILE = "optimizer.npz"


def save_arrays(path: Path, arrays: list[np.ndarray]) -> None:
    """Write a list of arrays (a ``get_weights()`` snapshot) atomically, in order."""
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, *arrays)
    os.replace(tmp, path)


def load_arrays(path: Path) -> list[np.ndarray]:
    """The arrays :func:`save_arrays` wrote, in order."""
    with np.load(path) as data:
        return [data[f"arr_{i}"] for i in range(len(data.files))]


class Checkpoint:
    """One training stage's checkpoint folder. ``identity`` (the recipe and anything else
    that must match) is stored with it; resuming a checkpoint written by another recipe
    is refused, not silently mixed."""

    def __init__(self, folder: Path, identity: dict) -> None:
        self.folder = folder
        self.identity = json.loads(json.dumps(identity))  # as it reads back from JSON
        #: The caller's bookkeeping, saved with each epoch and restored by :meth:`load`.
        self.extra: dict = {}

    def clear(self) -> None:
        """Forget any earlier checkpoint in the folder (a fresh run)."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def load(self) -> dict | None:
        """The last finished epoch, ``{"stage": ..., "epoch": ...}``, or None when the folder
        holds none; :attr:`extra` is restored from it. SystemExit when the checkpoint was
        written by a different recipe."""
        state_path = self.folder / STATE_FILE
        if not state_path.exists():
            return None
        state = json.loads(state_path.read_text(encoding="utf-8"))
        if state["identity"] != self.identity:
            raise SystemExit(f"{self.folder} holds a checkpoint of another run "
                             f"({state['identity']}, not {self.identity}): resume with the "
                             "same flags, or start afresh without --resume")
        self.extra = state["extra"]
        return {"stage": state["stage"], "epoch": state["epoch"]}

    def save(self, model, optimizer, stage: str, epoch: int) -> None:
        """Record that ``stage`` epoch ``epoch`` finished: the model's weights, the
        optimizer's variables (Adam's moments and its step count, which the learning-rate
        schedule reads) and :attr:`extra`."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / ("tmp." + MODEL_FILE)
        model.save_weights(tmp)
        os.replace(tmp, self.folder / MODEL_FILE)
        save_arrays(self.folder / OPTIMIZER_FILE, [np.asarray(v) for v in optimizer.variables])
        state = {"identity": self.identity, "stage": stage, "epoch": epoch, "extra": self.extra}
        tmp = self.folder / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=1), encoding="utf-8")
        os.replace(tmp, self.folder / STATE_FILE)

    def restore(self, model, optimizer) -> None:
        """Put the saved weights into ``model`` and the saved variables into ``optimizer``
        (built here for ``model``'s trainable variables, as fit() would build it)."""
        model.load_weights(self.folder / MODEL_FILE)
        optimizer.build(model.trainable_variables)
        saved = load_arrays(self.folder / OPTIMIZER_FILE)
        if len(saved) != len(optimizer.variables):
            raise SystemExit(f"{self.folder}: the optimizer state does not fit this network")
        for variable, value in zip(optimizer.variables, saved):
            variable.assign(value)

    def path(self, name: str) -> Path:
        """A file of the caller's in the checkpoint folder (created if need be)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        return self.folder / name
