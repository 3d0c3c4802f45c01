"""Give a TFLite classifier its penultimate features as a second output.

    /path/to/.venv-train/bin/python models/add_feature_output.py [MODEL] [--out FILE]

The convention the runtime relies on (nitrolesion/model/classifier.py): output 0 is the
class probabilities, output 1 the features the classifier head reads (the global average
pool, shape [V, D] for V views or [1, D]; the runtime averages over views). The features
feed the "not a lesion" detector (nitrolesion/model/triage.py).

Only the graph's output list (and its serving signature) changes: the same operators, the
same weight buffers, so the probabilities stay bit-identical (``--check`` runs both files
on images and compares them exactly). By default the feature tensor is the input of the
last FULLY_CONNECTED operator (the classifier head); ``--tensor NAME`` picks another one.
Needs TensorFlow (training only: models/requirements-train.txt).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL = MODELS_DIR / "lesion_classifier.tflite"
FEATURES_NAME = b"features"


def builtin_name(model, operator) -> str:
    """The builtin operator name (e.g. ``FULLY_CONNECTED``) of ``operator``."""
    from tensorflow.lite.python import schema_py_generated as schema

    code = model.operatorCodes[operator.opcodeIndex]
    number = max(code.builtinCode, code.deprecatedBuiltinCode)
    names = {value: key for key, value in vars(schema.BuiltinOperator).items()
             if not key.startswith("_")}
    return names.get(number, str(number))


def head_input(model, subgraph) -> int:
    """Index of the tensor the last FULLY_CONNECTED operator reads (its activations)."""
    for operator in reversed(subgraph.operators):
        if builtin_name(model, operator) == "FULLY_CONNECTED":
            return int(operator.inputs[0])
    raise SystemExit("add_feature_output: the model has no FULLY_CONNECTED operator; "
                     "name the feature tensor with --tensor")


def with_feature_output(model, tensor_name: str | None = None):
    """``model`` (a flatbuffer_utils object model, changed in place) with the feature tensor
    appended as output 1. Refuses a model that already has more than one output."""
    import numpy as np
    from tensorflow.lite.python import schema_py_generated as schema

    subgraph = model.subgraphs[0]
    outputs = [int(index) for index in subgraph.outputs]
    if len(outputs) != 1:
        raise SystemExit(f"add_feature_output: the model has {len(outputs)} outputs; expected "
                         "exactly one (the probabilities)")
    if tensor_name is None:
        index = head_input(model, subgraph)
    else:
        found = [i for i, t in enumerate(subgraph.tensors) if t.name.decode() == tensor_name]
        if len(found) != 1:
            raise SystemExit(f"add_feature_output: {len(found)} tensors are named {tensor_name!r}")
        index = found[0]
    tensor = subgraph.tensors[index]
    if tensor.type != schema.TensorType.FLOAT32 or len(tensor.shape) != 2:
        raise SystemExit(f"add_feature_output: tensor {index} is not a float32 [N, D] tensor "
                         f"(shape {list(tensor.shape)})")
    subgraph.outputs = np.array(outputs + [index], dtype=np.int32)
    for signature in model.signatureDefs or []:
        extra = schema.TensorMapT()
        extra.name = FEATURES_NAME
        extra.tensorIndex = index
        signature.outputs = list(signature.outputs) + [extra]
    return model


def weight_buffers(model) -> list[bytes]:
    """Every constant buffer's bytes, in order (what must not change)."""
    return [bytes(b.data) if b.data is not None else b"" for b in model.buffers]


def check(original: Path, updated: Path, images: list[Path]) -> int:
    """Run both files on ``images``: probabilities must be bit-identical. Returns 0 if so."""
    import numpy as np
    from nitrolesion.model.classifier import interpreter_class
    from nitrolesion.model.preprocess import preprocess_image

    Interpreter = interpreter_class()
    before = Interpreter(model_path=str(original))
    after = Interpreter(model_path=str(updated))
    for interpreter in (before, after):
        interpreter.allocate_tensors()
    size = int(before.get_input_details()[0]["shape"][1])
    for path in images:
        pixels = preprocess_image(path.read_bytes(), size)[np.newaxis]
        answers = []
        for interpreter in (before, after):
            interpreter.set_tensor(interpreter.get_input_details()[0]["index"], pixels)
            interpreter.invoke()
            answers.append(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).copy())
        if not np.array_equal(answers[0], answers[1]):
            print(f"add_feature_output: probabilities differ on {path.name}", file=sys.stderr)
            return 1
    features = after.get_tensor(after.get_output_details()[1]["index"])
    print(f"probabilities bit-identical on {len(images)} images; features shape {features.shape}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--out", type=Path, help="where to write (default: replace MODEL)")
    parser.add_argument("--tensor", help="feature tensor name (default: the head's input)")
    parser.add_argument("--check", nargs="*", type=Path, default=None, metavar="IMAGE",
                        help="compare the probabilities of both files on these images")
    args = parser.parse_args(argv)
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(args.model))
    weights = weight_buffers(model)
    updated = with_feature_output(model, args.tensor)
    if weight_buffers(updated) != weights:
        raise SystemExit("add_feature_output: a weight buffer changed")
    out = args.out or args.model
    original_copy = out.with_suffix(".before.tflite") if args.check is not None else None
    if original_copy is not None:
        original_copy.write_bytes(args.model.read_bytes())
    flatbuffer_utils.write_model(updated, str(out))
    print(f"wrote {out} with outputs {list(updated.subgraphs[0].outputs)}")
    if original_copy is None:
        return 0
    try:
        return check(original_copy, out, args.check)
    finally:
        original_copy.unlink()


if __name__ == "__main__":
    sys.exit(main())
