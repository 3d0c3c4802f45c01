"""The shipped model's probabilities for every test-split image, cached between runs.

The accuracy regression in tests/test_model.py needs the model's answer for all 1270
test-split images (~25 s on two cores). Those answers change only when something on the
prediction path changes, so they are kept in a gitignored file under ``.pytest_cache/``
whose name is a SHA-256 over everything that decides them:

* the model file and the labels file;
* the source of the prediction code: ``nitrolesion/model/classifier.py`` and every
  ``nitrolesion`` module it imports, transitively (found by reading the import
  statements, so a module the preprocessing starts to import is covered without editing
  this list), with their package ``__init__`` files;
* the split: the test image ids in order and the SHA-256 of each image file;
* the runtime: Python, NumPy, Pillow and the TFLite runtime versions, the machine type.

A changed model, preprocessing or split thus gives a new key: the cache misses and every
image is classified again. Even on a hit, a fixed stratified subset (the first
``SPOT_CHECK_PER_CLASS`` images of each diagnosis, in split order) is classified live and
must give the cached probabilities; if it does not (something outside the key changed the
answers), the cache is discarded and the whole split classified again. Either way the
floors are asserted on the whole split's current answers.

Set ``NITROLESION_FULL_EVALUATION=1`` to ignore the cache (the answers are still written).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import platform
import sys
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from nitrolesion.model.triage import triage_path_for

ROOT = Path(__file__).resolve().parents[1]
#: Gitignored (.gitignore lists .pytest_cache/) and outside everything the image copies.
CACHE_DIR = ROOT / ".pytest_cache" / "nitrolesion"
#: Set to a non-empty value other than 0 to classify the whole split regardless of the cache.
FULL_EVALUATION_ENV = "NITROLESION_FULL_EVALUATION"
#: Images per diagnosis classified live on a cache hit: 70 of 1270 (the rarest class, df,
#: has 14 in the split), about 1.5 s.
SPOT_CHECK_PER_CLASS = 10
#: Live and cached probabilities must agree to this (one interpreter thread gives
#: bit-identical answers run to run; JSON keeps every float exactly).
SPOT_CHECK_TOLERANCE = 1e-6
#: Cache files kept (the newest by modification time); older keys are deleted.
KEEP_FILES = 4
#: Where the prediction path starts; everything it imports from the project is hashed.
PREDICTION_ENTRY = "nitrolesion.model.classifier"
RUNTIME_PACKAGES = ("numpy", "pillow", "ai-edge-litert", "tflite-runtime")


def _module_file(name: str) -> Path | None:
    """The source file of project module ``name``, or None if it is not a module of ours
    (a third-party module, or a name imported from a module rather than a module)."""
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_names(path: Path, module: str) -> list[str]:
    """Every module name ``path`` (the source of ``module``) may import, relative imports
    resolved; ``from a import b`` gives both ``a`` and ``a.b`` (b may be a submodule)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            names.append(base)
            names += [f"{base}.{alias.name}" for alias in node.names]
    return names


def prediction_sources(entry: str = PREDICTION_ENTRY) -> list[Path]:
    """Source files of ``entry`` and every project module it imports, transitively, with
    the ``__init__.py`` of each package on the way (they run on import too)."""
    seen: dict[str, Path] = {}
    todo = [entry]
    while todo:
        name = todo.pop()
        if name in seen or name.split(".")[0] != "nitrolesion":
            continue
        path = _module_file(name)
        if path is None:
            continue
        seen[name] = path
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += _imported_names(path, name)
    return sorted(set(seen.values()))


def _runtime() -> dict[str, str]:
    found = {"python": sys.version, "machine": platform.machine()}
    for package in RUNTIME_PACKAGES:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "absent"
    return found


def cache_key(model_path: Path, labels_path: Path, images: Sequence[tuple[str, Path]]) -> str:
    """SHA-256 (hex) over the model, labels, prediction code, split and runtime."""
    key = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        # Each part as its label and its own digest: no two inputs can run together.
        key.update(label.encode() + b"\0" + hashlib.sha256(data).digest())

    add("model", Path(model_path).read_bytes())
    add("labels", Path(labels_path).read_bytes())
    # The triage file calibrates the probabilities the classifier returns.
    triage = triage_path_for(Path(model_path))
    add("triage", triage.read_bytes() if triage.is_file() else b"absent")
    for path in prediction_sources():
        add(f"source {path.relative_to(ROOT).as_posix()}", path.read_bytes())
    for image_id, path in images:
        add(f"image {image_id}", path.read_bytes())
    add("runtime", json.dumps(_runtime(), sort_keys=True).encode())
    return key.hexdigest()


def stratified_subset(ids: Sequence[str], dx_of: dict[str, str], codes: Sequence[str],
                      per_class: int = SPOT_CHECK_PER_CLASS) -> list[int]:
    """Indices of the first ``per_class`` images of each diagnosis, in split order."""
    chosen = []
    for code in codes:
        chosen += [i for i, image_id in enumerate(ids) if dx_of[image_id] == code][:per_class]
    return sorted(chosen)


def _cache_file(key: str) -> Path:
    return CACHE_DIR / f"test-split-{key}.json"


def _load(key: str, ids: Sequence[str]) -> np.ndarray | None:
    """The cached probabilities for ``key``, or None if absent, unreadable or not for ``ids``."""
    try:
        stored = json.loads(_cache_file(key).read_text(encoding="utf-8"))
        probabilities = np.array(stored["probabilities"], dtype=np.float64)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if stored.get("key") != key or stored.get("ids") != list(ids) \
            or probabilities.shape[0] != len(ids):
        return None
    return probabilities


def _save(key: str, ids: Sequence[str], probabilities: np.ndarray) -> None:
    """Write atomically (another run may read or write the same key at once), then keep
    only the newest KEEP_FILES cache files."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    target = _cache_file(key)
    partial = target.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps({"key": key, "ids": list(ids),
                                   "probabilities": probabilities.tolist()}), encoding="utf-8")
    os.replace(partial, target)
    old = sorted(CACHE_DIR.glob("test-split-*.json"), key=lambda p: p.stat().st_mtime,
                 reverse=True)[KEEP_FILES:]
    for path in old:
        path.unlink(missing_ok=True)


def split_probabilities(classify: Callable[[bytes], np.ndarray], model_path: Path,
                        labels_path: Path, images: Sequence[tuple[str, Path]],
                        dx_of: dict[str, str], codes: Sequence[str]) -> tuple[np.ndarray, str]:
    """(probabilities, one row per image in ``images`` order; how they were obtained).

    ``classify`` maps image bytes to the model's probability row (``codes`` order).
    """
    ids = [image_id for image_id, _ in images]
    key = cache_key(model_path, labels_path, images)
    full = os.environ.get(FULL_EVALUATION_ENV, "") not in ("", "0")
    cached = None if full else _load(key, ids)
    if cached is not None:
        subset = stratified_subset(ids, dx_of, codes, SPOT_CHECK_PER_CLASS)
        live = np.array([classify(images[i][1].read_bytes()) for i in subset])
        if np.allclose(live, cached[subset], rtol=0, atol=SPOT_CHECK_TOLERANCE):
            return cached, (f"cached for key {key[:12]}; {len(subset)} of {len(ids)} "
                            f"images re-classified live and identical")
        warnings.warn(f"cached test-split predictions (key {key[:12]}) differ from the "
                      f"model's live answers: classifying the whole split again")
    probabilities = np.array([classify(path.read_bytes()) for _, path in images])
    _save(key, ids, probabilities)
    return probabilities, f"all {len(ids)} images classified (key {key[:12]})"
