"""Can two interpreters share one copy of the weights? What a second one costs, with and
without LiteRT's XNNPACK weight cache, and whether two of them run in parallel.

    .venv/bin/python bench/weight_cache.py [--cache-dir /dev/shm] [--runs 40]

Each layout is built in a fresh child process of its own (so nothing is shared by accident)
and runs one image on each of its models; the child then reports what the models added to
the process since the model bytes were read and the runtime imported, from /proc/self/smaps: RSS (counts a page of
a file mapped twice twice), PSS (a shared page divided among its mappings, so the two
mappings of the cache file count it once), USS (pages only this process maps), and the
*real* cost: PSS outside the cache file + the whole cache file, which on a tmpfs (in the
enclave every file is in RAM) is memory whether mapped or not.

Layouts: the ``Interpreter`` the enclave uses (1, 2, and 1 with a batch of 2: what a second
image's activations cost); ``CompiledModel`` (ai-edge-litert 2.x), the API whose
``CpuOptions.xnnpack_weight_cache_path`` writes XNNPACK's packed weights to a file that
later models map instead of packing their own. Then the parallel question: images/s of
two models on two Python threads against one, for both APIs, and how fast a pure-Python
thread runs during a model run (a run that holds the GIL starves it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.machine import load_line
from nitrolesion.model.classifier import DEFAULT_MODEL_PATH

LAYOUTS = {
    "interpreter": "1 Interpreter",
    "interpreter-2": "2 Interpreters",
    "interpreter-batch-2": "1 Interpreter, batch of 2",
    "compiled": "1 CompiledModel, no cache",
    "compiled-2": "2 CompiledModels, no cache",
    "compiled-cache": "1 CompiledModel, weight cache",
    "compiled-cache-2": "2 CompiledModels, one weight cache",
}


def smaps(cache: str) -> dict[str, float]:
    """MiB: Rss, Pss, USS of the whole process and Pss of the mappings of ``cache``."""
    totals = {"Rss": 0.0, "Pss": 0.0, "USS": 0.0, "cache Pss": 0.0}
    in_cache = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if not fields[0].endswith(":"):  # a mapping's header line: address range ... path
            in_cache = bool(cache) and line.endswith(cache)
            continue
        if fields[-1] != "kB":  # VmFlags and the like
            continue
        key, kib = fields[0][:-1], int(fields[1]) / 1024
        if key in ("Rss", "Pss"):
            totals[key] += kib
        if key in ("Private_Clean", "Private_Dirty"):
            totals["USS"] += kib
        if key == "Pss" and in_cache:
            totals["cache Pss"] += kib
    return totals


def build(layout: str, model_bytes: bytes, cache: str):
    """(models, run(model, image)) for ``layout``; every model has run once."""
    image = np.random.default_rng(0).random((1, 192, 192, 3), dtype=np.float32)
    count = 2 if layout.endswith("-2") else 1
    if layout.startswith("interpreter"):
        from ai_edge_litert.interpreter import Interpreter
        batch = 2 if layout == "interpreter-batch-2" else 1
        models = []
        for _ in range(1 if batch == 2 else count):
            interpreter = Interpreter(model_content=model_bytes, num_threads=1)
            index = interpreter.get_input_details()[0]["index"]
            interpreter.resize_tensor_input(index, [batch, 192, 192, 3])
            interpreter.allocate_tensors()
            models.append((interpreter, index, np.repeat(image, batch, axis=0)))

        def run(model):
            interpreter, index, pixels = model
            interpreter.set_tensor(index, pixels)
            interpreter.invoke()
            return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])[0].copy()
    else:
        from ai_edge_litert.compiled_model import CompiledModel
        from ai_edge_litert.options import CpuOptions, Options
        path = cache if "cache" in layout else ""
        models = []
        for _ in range(count):
            compiled = CompiledModel.from_buffer(model_bytes, options=Options(
                cpu_options=CpuOptions(num_threads=1, xnnpack_weight_cache_path=path)))
            inputs, outputs = compiled.create_input_buffers(0), compiled.create_output_buffers(0)
            inputs[0].write(image)
            models.append((compiled, inputs, outputs))

        def run(model):
            compiled, inputs, outputs = model
            compiled.run_by_index(0, inputs, outputs)
            names = compiled.get_signature_list()["serving_default"]["outputs"]
            return outputs[names.index("output_0")].read(7, np.float32)
    return models, run


def child(layout: str, cache: str, runs: int) -> dict:
    """One layout in this (fresh) process: its memory, outputs and speed."""
    model_bytes = DEFAULT_MODEL_PATH.read_bytes()
    import ai_edge_litert.compiled_model  # noqa: F401  the libraries are not the models' cost
    import ai_edge_litert.interpreter  # noqa: F401
    before = smaps(cache)
    models, run = build(layout, model_bytes, cache)
    outputs = [run(model).tolist() for model in models]
    after = smaps(cache)
    added = {key: after[key] - before[key] for key in ("Rss", "Pss", "USS")}
    cache_mib = os.path.getsize(cache) / 2**20 if cache and os.path.exists(cache) else 0.0
    added["real"] = added["Pss"] - after["cache Pss"] + cache_mib
    report = {"memory": added, "cache_mib": cache_mib, "outputs": outputs}
    if layout in ("interpreter-2", "compiled-2"):
        report["parallel"] = parallel(models, run, runs)
    return report


def parallel(models, run, runs: int) -> dict:
    """Images/s of one model alone, of both on two threads, and a Python thread's loop rate
    (M iterations/s) alone and while one model runs."""
    def timed(work) -> float:
        started = time.perf_counter()
        work()
        return time.perf_counter() - started

    one = runs / timed(lambda: [run(models[0]) for _ in range(runs)])
    threads = [threading.Thread(target=lambda m=m: [run(m) for _ in range(runs // 2)]) for m in models]
    two = runs / timed(lambda: ([t.start() for t in threads], [t.join() for t in threads]))
    counter, stop = [0], threading.Event()

    def spin():
        while not stop.is_set():
            counter[0] += 1

    spinner = threading.Thread(target=spin)
    spinner.start()
    time.sleep(0.3)
    start, seconds = counter[0], timed(lambda: time.sleep(0.3))
    alone = (counter[0] - start) / seconds / 1e6
    start, seconds = counter[0], timed(lambda: [run(models[0]) for _ in range(runs // 2)])
    during = (counter[0] - start) / seconds / 1e6
    stop.set()
    spinner.join()
    return {"one": one, "two": two, "loop_alone": alone, "loop_during": during}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path,
                        default=Path("/dev/shm") if Path("/dev/shm").is_dir() else None,
                        help="where the weight cache file goes (default /dev/shm: a tmpfs, "
                             "RAM, as every file in the enclave is)")
    parser.add_argument("--runs", type=int, default=40, help="runs per speed figure (default 40)")
    parser.add_argument("--child", choices=LAYOUTS, help=argparse.SUPPRESS)
    parser.add_argument("--cache", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.cache, args.runs)))
        return 0

    print(load_line("start"))
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-weight-cache-", dir=args.cache_dir) as folder:
        cache = str(Path(folder) / "lesion_classifier.xnnpack_cache")
        for layout in LAYOUTS:
            if layout == "compiled-cache-2" and not os.path.exists(cache):
                print("note: the single-model run left no cache file; the two models build it")
            run = subprocess.run([sys.executable, __file__, "--child", layout, "--cache", cache,
                                  "--runs", str(args.runs)],
                                 capture_output=True, text=True, timeout=600)
            if run.returncode:
                print(f"{layout}: failed\n{run.stderr[-2000:]}", file=sys.stderr)
                return 1
            results[layout] = json.loads(run.stdout.strip().splitlines()[-1])
    print(load_line("end  "))

    reference = results["interpreter"]["outputs"][0]
    print(f"\nwhat the models add to the process, MiB (cache file {results['compiled-cache']['cache_mib']:.1f} MiB, "
          f"in {args.cache_dir or 'the temporary directory'})")
    print(f"{'layout':36}{'RSS':>8}{'PSS':>8}{'USS':>8}{'real':>8}   output 0 = Interpreter's")
    for layout, name in LAYOUTS.items():
        memory = results[layout]["memory"]
        equal = max(abs(a - b) for out in results[layout]["outputs"] for a, b in zip(out, reference))
        print(f"{name:36}" + "".join(f"{memory[key]:>8.1f}" for key in ("Rss", "Pss", "USS", "real"))
              + f"   largest difference {equal:.1g}")
    for first, second in (("interpreter", "interpreter-2"), ("compiled-cache", "compiled-cache-2")):
        extra = results[second]["memory"]["real"] - results[first]["memory"]["real"]
        print(f"the second model costs ({LAYOUTS[second]}): {extra:.1f} MiB real")
    extra = results["interpreter-batch-2"]["memory"]["real"] - results["interpreter"]["memory"]["real"]
    print(f"a second image in the batch (its activations) costs: {extra:.1f} MiB real")
    print("\nparallel: images/s one model alone / two models on two threads; a Python thread's "
          "loop, M iterations/s, alone / during a run")
    for layout in ("interpreter-2", "compiled-2"):
        p = results[layout]["parallel"]
        print(f"{LAYOUTS[layout]:36}{p['one']:>7.1f} / {p['two']:>6.1f} img/s   "
              f"{p['loop_alone']:>5.2f} / {p['loop_during']:>5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
